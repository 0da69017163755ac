use super::*;

use bytes::Bytes;
use portcullis_pgwire::{encode_backend, ErrorFields};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use super::super::stream::Stream;

fn config(size: u32, wait_secs: u64) -> PoolConfig {
    PoolConfig {
        size,
        idle_timeout_secs: 300,
        wait_secs,
    }
}

fn key() -> PoolKey {
    PoolKey {
        target_id: 3,
        upstream: "127.0.0.1:5432".parse().unwrap(),
        startup: vec![
            ("user".into(), "app".into()),
            ("database".into(), "db".into()),
        ],
    }
}

fn started() -> Vec<(String, String)> {
    vec![
        ("application_name".into(), String::new()),
        ("is_superuser".into(), "off".into()),
        ("TimeZone".into(), "UTC".into()),
    ]
}

/// An authenticated server session as `upstream::establish` leaves it, over a loopback
/// socket whose other end (returned) the test speaks for the server.
async fn session(pid: u32) -> (Upstream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_side = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server_side, _) = listener.accept().await.unwrap();
    let conn = Upstream {
        stream: Stream::Plain(agent_side),
        buf: BytesMut::new(),
        parameters: started(),
        process_id: pid,
        secret_key: Bytes::from_static(&[1, 2, 3, 4]),
    };
    (conn, server_side)
}

fn clean_end() -> SessionEnd {
    SessionEnd {
        client_left: true,
        transaction: TransactionStatus::Idle,
        awaits_nothing: true,
        drained: true,
    }
}

/// The server's side of a reset: reads the agent's Query, answers with `answer`.
async fn answer_reset(server: &mut TcpStream, answer: Vec<BackendMessage>) -> Vec<u8> {
    let mut query = vec![0u8; 17];
    server.read_exact(&mut query).await.unwrap();
    let mut out = BytesMut::new();
    for m in &answer {
        encode_backend(m, &mut out);
    }
    server.write_all(&out).await.unwrap();
    query
}

fn discarded() -> Vec<BackendMessage> {
    vec![
        BackendMessage::CommandComplete {
            tag: "DISCARD ALL".into(),
        },
        BackendMessage::ReadyForQuery {
            status: TransactionStatus::Idle,
        },
    ]
}

/// Gives `slot` back a session of backend `pid` its client left clean, the server answering
/// the reset as `DISCARD ALL` does: the query the pool sent, and the server's end.
async fn give_back_clean(pools: &Pools, slot: Slot, pid: u32) -> (Vec<u8>, TcpStream) {
    let (conn, mut server) = session(pid).await;
    let (query, ()) = tokio::join!(
        answer_reset(&mut server, discarded()),
        pools.give_back(slot, conn, clean_end(), async { true })
    );
    (query, server)
}

#[test]
fn only_a_session_the_client_left_idle_and_drained_is_kept() {
    let clean = clean_end();
    assert_eq!(may_keep(&clean), Ok(()));
    for (end, why) in [
        (
            SessionEnd {
                client_left: false,
                ..clean
            },
            "did not end with the client leaving",
        ),
        (
            SessionEnd {
                transaction: TransactionStatus::InBlock,
                ..clean
            },
            "inside a transaction block",
        ),
        (
            SessionEnd {
                transaction: TransactionStatus::Failed,
                ..clean
            },
            "failed transaction",
        ),
        (
            SessionEnd {
                awaits_nothing: false,
                ..clean
            },
            "owed replies",
        ),
        (
            SessionEnd {
                drained: false,
                ..clean
            },
            "unread or unsent",
        ),
    ] {
        let err = may_keep(&end).unwrap_err();
        assert!(err.contains(why), "{end:?}: {err}");
    }
}

/// One row per answer a server can give to `DISCARD ALL`, by the state it was left in.
#[test]
fn the_reset_keeps_only_a_session_back_to_its_start_up_state() {
    let complete = BackendMessage::CommandComplete {
        tag: "DISCARD ALL".into(),
    };
    let ready = |status| BackendMessage::ReadyForQuery { status };
    let error = |m: &str| BackendMessage::ErrorResponse(ErrorFields::new("ERROR", "25001", m));
    let status = |name: &str, value: &str| BackendMessage::ParameterStatus {
        name: name.into(),
        value: value.into(),
    };
    let rows: Vec<(&str, Vec<BackendMessage>, Option<&str>)> = vec![
        (
            "idle",
            vec![complete.clone(), ready(TransactionStatus::Idle)],
            None,
        ),
        (
            "a SET application_name undone, reported back as at start-up",
            vec![
                status("application_name", ""),
                complete.clone(),
                ready(TransactionStatus::Idle),
            ],
            None,
        ),
        (
            "a notification queued before UNLISTEN",
            vec![
                BackendMessage::NotificationResponse {
                    process_id: 9,
                    channel: "c".into(),
                    payload: "secret".into(),
                },
                complete.clone(),
                ready(TransactionStatus::Idle),
            ],
            None,
        ),
        (
            "inside a transaction block",
            vec![
                error("DISCARD ALL cannot run inside a transaction block"),
                ready(TransactionStatus::InBlock),
            ],
            Some("DISCARD ALL failed"),
        ),
        (
            "a failed transaction",
            vec![
                error("current transaction is aborted"),
                ready(TransactionStatus::Failed),
            ],
            Some("DISCARD ALL failed"),
        ),
        (
            "in a COPY FROM STDIN",
            vec![error("unexpected message type 0x51 during COPY from stdin")],
            Some("DISCARD ALL failed"),
        ),
        (
            "in a COPY TO STDOUT",
            vec![BackendMessage::CopyData(Bytes::from_static(b"1\n"))],
            Some("unexpected CopyData"),
        ),
        (
            "a query's rows still coming",
            vec![BackendMessage::CommandComplete {
                tag: "SELECT 1".into(),
            }],
            Some("unexpected CommandComplete"),
        ),
        (
            "ready before the reset completed",
            vec![ready(TransactionStatus::Idle)],
            Some("unexpected ReadyForQuery"),
        ),
        (
            "ready in a block after it",
            vec![complete.clone(), ready(TransactionStatus::InBlock)],
            Some("after DISCARD ALL"),
        ),
        (
            "a reported setting that stayed changed",
            vec![
                complete.clone(),
                status("is_superuser", "on"),
                ready(TransactionStatus::Idle),
            ],
            Some("is_superuser = on, not off"),
        ),
        (
            "a setting not reported at start-up",
            vec![status("search_path", "evil"), complete.clone()],
            Some("did not report at start-up"),
        ),
    ];
    for (state, messages, closed) in rows {
        let mut reset = Reset::default();
        let mut outcome = None;
        for m in &messages {
            match reset.on_message(m, &started()) {
                ResetStep::More => {}
                ResetStep::Clean => outcome = Some(Ok(())),
                ResetStep::Close(why) => {
                    outcome = Some(Err(why));
                    break;
                }
            }
        }
        match (closed, outcome) {
            (None, Some(Ok(()))) => {}
            (Some(expected), Some(Err(why))) => {
                assert!(why.contains(expected), "{state}: {why}")
            }
            (expected, got) => panic!("{state}: expected {expected:?}, got {got:?}"),
        }
    }
}

#[tokio::test]
async fn a_full_pool_refuses_after_its_wait_and_a_returned_session_goes_to_the_waiter() {
    let pools = Pools::default();
    let first = pools.borrow(&key(), &config(1, 0)).await.unwrap();
    assert!(first.reused.is_none(), "an empty pool lends a slot to dial");
    let err = pools.borrow(&key(), &config(1, 0)).await.err().unwrap();
    assert!(
        err.to_string()
            .contains("has all its 1 server sessions in use; waited 0 s"),
        "{err}"
    );
    // Another key (another role) has a pool of its own.
    let mut other = key();
    other.startup[0].1 = "other".into();
    assert!(pools.borrow(&other, &config(1, 0)).await.is_ok());

    let pools = Arc::new(pools);
    let waiter = tokio::spawn({
        let pools = Arc::clone(&pools);
        async move { pools.borrow(&key(), &config(1, 30)).await }
    });
    let (conn, mut server) = session(77).await;
    let (slot, _) = first.into_slot();
    let (_, ()) = tokio::join!(
        async {
            answer_reset(&mut server, discarded()).await;
        },
        pools.give_back(slot, conn, clean_end(), async { true })
    );
    let lent = waiter.await.unwrap().unwrap();
    assert_eq!(lent.reused.as_ref().map(|c| c.process_id), Some(77));
    assert_eq!(pools.idle_count(3), 0);
}

#[tokio::test]
async fn a_kept_session_is_reset_with_discard_all_and_lent_again() {
    let pools = Pools::default();
    let (slot, _) = pools
        .borrow(&key(), &config(2, 0))
        .await
        .unwrap()
        .into_slot();
    let (query, _server) = give_back_clean(&pools, slot, 41).await;
    assert_eq!(&query[..1], b"Q");
    assert_eq!(&query[5..16], b"DISCARD ALL");
    assert_eq!(pools.idle_count(3), 1);
    let again = pools.borrow(&key(), &config(2, 0)).await.unwrap();
    let conn = again.reused.as_ref().unwrap();
    assert_eq!(conn.process_id, 41);
    assert_eq!(conn.parameters, started(), "replayed as at start-up");
}

#[tokio::test]
async fn a_session_left_in_a_transaction_or_with_a_cancel_pending_is_terminated() {
    let pools = Pools::default();
    for (end, cancel_done) in [
        (
            SessionEnd {
                transaction: TransactionStatus::InBlock,
                ..clean_end()
            },
            true,
        ),
        (clean_end(), false),
    ] {
        let (slot, _) = pools
            .borrow(&key(), &config(1, 0))
            .await
            .unwrap()
            .into_slot();
        let (conn, mut server) = session(5).await;
        pools
            .give_back(slot, conn, end, async move { cancel_done })
            .await;
        let mut sent = Vec::new();
        server.read_to_end(&mut sent).await.unwrap();
        assert_eq!(sent, [b'X', 0, 0, 0, 4], "Terminate, no reset: {end:?}");
        assert_eq!(pools.idle_count(3), 0);
    }
    // Its slot came back: the pool lends again.
    assert!(pools.borrow(&key(), &config(1, 0)).await.is_ok());
}

#[tokio::test]
async fn a_reset_the_server_refuses_closes_the_session() {
    let pools = Pools::default();
    let (slot, _) = pools
        .borrow(&key(), &config(1, 0))
        .await
        .unwrap()
        .into_slot();
    let (conn, mut server) = session(5).await;
    let refused = vec![BackendMessage::ErrorResponse(ErrorFields::new(
        "ERROR",
        "25001",
        "DISCARD ALL cannot run inside a transaction block",
    ))];
    let (_, ()) = tokio::join!(
        answer_reset(&mut server, refused),
        pools.give_back(slot, conn, clean_end(), async { true })
    );
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, [b'X', 0, 0, 0, 4]);
    assert_eq!(pools.idle_count(3), 0);
}

#[tokio::test]
async fn idle_sessions_are_terminated_after_the_idle_timeout_and_at_shutdown() {
    let pools = Pools::default();
    let mut servers = Vec::new();
    let mut slots = Vec::new();
    for _ in 0..2 {
        slots.push(
            pools
                .borrow(&key(), &config(2, 0))
                .await
                .unwrap()
                .into_slot()
                .0,
        );
    }
    for (pid, slot) in [1, 2].into_iter().zip(slots) {
        let (_, server) = give_back_clean(&pools, slot, pid).await;
        servers.push(server);
    }
    assert_eq!(pools.idle_count(3), 2);
    let now = Instant::now();
    pools.sweep(now + Duration::from_secs(299), false).await;
    assert_eq!(pools.idle_count(3), 2, "not yet idle for 300 s");
    // One lent and given back: its idle time starts again.
    let (slot, conn) = pools
        .borrow(&key(), &config(2, 0))
        .await
        .unwrap()
        .into_slot();
    let conn = conn.unwrap();
    let pid = conn.process_id;
    let index = usize::try_from(pid - 1).unwrap();
    let (_, ()) = tokio::join!(
        answer_reset(&mut servers[index], discarded()),
        pools.give_back(slot, conn, clean_end(), async { true })
    );
    pools.sweep(now + Duration::from_secs(300), false).await;
    assert_eq!(pools.idle_count(3), 1, "the one idle 300 s is closed");
    let other = 1 - index;
    let mut sent = Vec::new();
    servers[other].read_to_end(&mut sent).await.unwrap();
    assert_eq!(sent, [b'X', 0, 0, 0, 4], "closed with a Terminate");

    pools.sweep(Instant::now(), true).await;
    assert_eq!(pools.idle_count(3), 0, "shutdown closes them all");
    let mut sent = Vec::new();
    servers[index].read_to_end(&mut sent).await.unwrap();
    assert_eq!(sent, [b'X', 0, 0, 0, 4]);
    // After shutdown began nothing is kept.
    let (slot, _) = pools
        .borrow(&key(), &config(2, 0))
        .await
        .unwrap()
        .into_slot();
    let (conn, mut server) = session(9).await;
    pools
        .give_back(slot, conn, clean_end(), async { true })
        .await;
    let mut sent = Vec::new();
    server.read_to_end(&mut sent).await.unwrap();
    assert_eq!(sent, [b'X', 0, 0, 0, 4]);
    assert_eq!(pools.idle_count(3), 0);
}

#[tokio::test]
async fn an_idle_session_the_server_closed_is_not_lent() {
    let pools = Pools::default();
    let (slot, _) = pools
        .borrow(&key(), &config(1, 0))
        .await
        .unwrap()
        .into_slot();
    let (_, server) = give_back_clean(&pools, slot, 8).await;
    // An administrator's pg_terminate_backend: a FATAL, then the end of the stream.
    drop(server);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let lent = pools.borrow(&key(), &config(1, 0)).await.unwrap();
    assert!(lent.reused.is_none(), "dialed afresh");
}

#[tokio::test]
async fn a_cancel_on_its_way_holds_the_session_until_it_is_done() {
    assert!(cancels_finished(Arc::new(())).await, "none on its way");
    let token = Arc::new(());
    let forwarding = Arc::clone(&token);
    let released = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(forwarding);
    });
    let started = std::time::Instant::now();
    assert!(cancels_finished(token).await);
    assert!(started.elapsed() >= Duration::from_millis(40));
    released.await.unwrap();
}

#[tokio::test]
async fn a_target_keeps_at_most_size_idle_sessions_whatever_start_ups_its_clients_vary() {
    let pools = Pools::default();
    // Three start-ups (an application_name each) of one target whose pool size is 2.
    let keyed = |name: &str| {
        let mut k = key();
        k.startup.push(("application_name".into(), name.into()));
        k
    };
    let mut servers = Vec::new();
    for (pid, name) in [(1, "a"), (2, "b"), (3, "c")] {
        let (slot, _) = pools
            .borrow(&keyed(name), &config(2, 0))
            .await
            .unwrap()
            .into_slot();
        // Each one resets cleanly; the third is closed all the same: the target is at its
        // bound.
        let (_, server) = give_back_clean(&pools, slot, pid).await;
        servers.push(server);
    }
    assert_eq!(
        pools.idle_count(3),
        2,
        "at most pool.size idle for the target"
    );
    let mut rest = Vec::new();
    servers[2].read_to_end(&mut rest).await.unwrap();
    assert_eq!(
        rest,
        [b'X', 0, 0, 0, 4],
        "the third closed with a Terminate"
    );
    // Its own pool has room again for the next client: nothing is held for it.
    let lent = pools.borrow(&keyed("c"), &config(2, 0)).await.unwrap();
    assert!(lent.reused.is_none(), "nothing kept for c");
}
