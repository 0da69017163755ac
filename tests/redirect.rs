//! The kernel redirect end to end: real eBPF programs attached to a test cgroup, the real
//! agent binary, an unchanged client run as an unprivileged uid, loopback servers only.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_e2e::{
    e2e_enabled, Agent, EchoServer, Fixture, Probe, Slot, Target, TestCgroup, ECONNREFUSED, EPERM,
};
use serde_json::Value;

fn canonical(a: &str) -> String {
    let a: SocketAddr = a.parse().unwrap();
    SocketAddr::new(a.ip().to_canonical(), a.port()).to_string()
}

fn assert_via_proxy(r: &Value, what: &str) {
    assert_eq!(r["ok"], true, "{what}: {r}");
    assert_eq!(
        r["via_proxy"], true,
        "{what} should have gone through the proxy: {r}"
    );
}

#[test]
fn protected_v4_v6_and_v4_mapped_connections_go_through_the_proxy_with_their_origin() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(1);
    let cg = TestCgroup::new("origin");
    let _server = EchoServer::start(&[slot.v4(1), slot.v6_loopback()]);
    let v4 = slot.v4(1).ip().to_string();
    let agent = Agent::start(
        "origin",
        slot,
        &cg,
        &[
            Target {
                name: "echo4",
                address: &v4,
                port: slot.server_port,
                upstream: None,
            },
            Target {
                name: "echo6",
                address: "::1",
                port: slot.server_port,
                upstream: None,
            },
        ],
    );
    let probe = Probe {
        cgroup: &cg,
        uid: 41001,
        netns: None,
    };
    let dialled = [slot.v4(1), slot.v6_loopback(), slot.mapped(1)];
    let mut results = Vec::new();
    for addr in dialled {
        let r = probe.connect(addr, &[]);
        assert_via_proxy(&r, &addr.to_string());
        results.push(r);
    }
    let opened = agent.wait_events("connection.opened", 3);
    assert_eq!(opened.len(), 3, "events: {:?}", agent.events());
    for (i, addr) in dialled.iter().enumerate() {
        let r = &results[i];
        let local = r["local"].as_str().unwrap();
        let ev = opened
            .iter()
            .find(|e| canonical(e["client"].as_str().unwrap()) == local)
            .unwrap_or_else(|| panic!("no opened event for client {local}: {opened:?}"));
        let origin = &ev["origin"];
        assert_eq!(origin["uid"], 41001);
        assert_eq!(origin["gid"], 41001);
        assert_eq!(origin["pid"], r["pid"], "{ev}");
        assert_eq!(
            origin["comm"], "portcullis-prob",
            "comm is the kernel's 15-character task name"
        );
        assert_eq!(
            origin["destination"].as_str().unwrap(),
            canonical(&addr.to_string())
        );
        assert_eq!(ev["identity"]["uid"], 41001);
        assert!(origin["cgroup_id"].as_u64().unwrap() > 0);
        assert!(origin["socket_cookie"].as_u64().unwrap() > 0);
    }
    let status = agent.status();
    // The agent runs in the same cgroup: its own upstream connects met the hooks and were exempt.
    assert!(
        status["counters"]["exempt_agent"].as_u64().unwrap() >= 3,
        "{status}"
    );
    assert_eq!(status["counters"]["redirected"], 3);
}

#[test]
fn client_getpeername_reports_the_dialled_destination() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(2);
    let cg = TestCgroup::new("peername");
    let _server = EchoServer::start(&[slot.v4(7), slot.v6_loopback()]);
    let v4 = slot.v4(7).ip().to_string();
    let _agent = Agent::start(
        "peername",
        slot,
        &cg,
        &[
            Target {
                name: "a",
                address: &v4,
                port: slot.server_port,
                upstream: None,
            },
            Target {
                name: "b",
                address: "::1",
                port: slot.server_port,
                upstream: None,
            },
        ],
    );
    let probe = Probe {
        cgroup: &cg,
        uid: 41002,
        netns: None,
    };
    for addr in [slot.v4(7), slot.v6_loopback(), slot.mapped(7)] {
        let r = probe.connect(addr, &[]);
        assert_via_proxy(&r, &addr.to_string());
        assert_eq!(
            r["peer"].as_str().unwrap(),
            addr.to_string(),
            "getpeername must show what was dialled"
        );
        assert_ne!(
            r["server_saw"].as_str().unwrap(),
            r["local"].as_str().unwrap(),
            "the server saw the proxy, not the client"
        );
    }
}

#[test]
fn unprotected_destinations_are_untouched() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(3);
    let cg = TestCgroup::new("untouched");
    let other_port: SocketAddr = format!("127.{}.0.1:{}", slot.net, slot.server_port + 100)
        .parse()
        .unwrap();
    let _server = EchoServer::start(&[slot.v4(1), slot.v4(2), other_port]);
    let v4 = slot.v4(1).ip().to_string();
    let agent = Agent::start(
        "untouched",
        slot,
        &cg,
        &[Target {
            name: "only",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
    );
    let probe = Probe {
        cgroup: &cg,
        uid: 41003,
        netns: None,
    };
    for addr in [slot.v4(2), other_port] {
        let r = probe.connect(addr, &[]);
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["via_proxy"], false, "{addr} is not protected: {r}");
        assert_eq!(r["peer"].as_str().unwrap(), addr.to_string());
    }
    assert!(agent.events_of("connection.opened").is_empty());
    assert_eq!(agent.status()["counters"]["redirected"], 0);
}

#[test]
fn killed_agent_fails_closed_restart_readopts_and_detach_goes_direct() {
    if !e2e_enabled() {
        return;
    }
    let Fixture {
        slot,
        cg,
        server,
        mut agent,
    } = Fixture::new("failclosed", 4);
    let probe = Probe {
        cgroup: &cg,
        uid: 41004,
        netns: None,
    };
    assert_via_proxy(&probe.connect(slot.v4(1), &[]), "before the crash");

    agent.kill9();
    let seen_before = server.accepted();
    for extra in [&[][..], &["--nonblocking"][..]] {
        let r = probe.connect(slot.v4(1), extra);
        assert_eq!(
            r["ok"], false,
            "a protected connect must fail while the agent is down: {r}"
        );
        assert_eq!(r["errno"], ECONNREFUSED, "{r}");
    }
    assert_eq!(
        server.accepted(),
        seen_before,
        "nothing may reach the real server while the agent is down"
    );
    assert!(
        agent.pin_dir.join("v1/portcullis_connect4").exists(),
        "the pins outlive the agent"
    );

    agent.spawn();
    assert_via_proxy(&probe.connect(slot.v4(1), &[]), "after the restart");

    let out = agent.detach();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut child = agent.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the agent did not stop after --detach"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!agent.pin_dir.join("v1").exists());
    let r = probe.connect(slot.v4(1), &[]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["via_proxy"], false,
        "after --detach connections go direct: {r}"
    );
    assert!(
        agent.events_of("agent.detached").len() == 1,
        "{:?}",
        agent.events()
    );
}

#[test]
fn normal_user_cannot_bypass_the_redirect() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(5);
    let cg = TestCgroup::new("bypass");
    let alias = slot.v4_in(200, 9);
    let loopback4: SocketAddr = format!("127.0.0.1:{}", slot.server_port).parse().unwrap();
    let _server = EchoServer::start(&[slot.v4(1), alias, loopback4, slot.v6_loopback()]);
    let cidr = format!("127.{}.0.0/16", slot.net);
    let agent = Agent::start(
        "bypass",
        slot,
        &cg,
        &[
            Target {
                name: "net",
                address: &cidr,
                port: slot.server_port,
                upstream: None,
            },
            // Where connects to the unspecified addresses land when the socket is unbound.
            Target {
                name: "loopback4",
                address: "127.0.0.1",
                port: slot.server_port,
                upstream: None,
            },
            Target {
                name: "loopback6",
                address: "::1",
                port: slot.server_port,
                upstream: None,
            },
        ],
    );
    let probe = Probe {
        cgroup: &cg,
        uid: 41005,
        netns: None,
    };
    let bind = format!("127.{}.99.1:0", slot.net);
    let port = slot.server_port;
    let any4: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let any6: SocketAddr = format!("[::]:{port}").parse().unwrap();
    let any_mapped: SocketAddr = format!("[::ffff:0.0.0.0]:{port}").parse().unwrap();
    // The kernel sends a connect to an unspecified address to the socket's bound address
    // (IPv4, v4-mapped) or to loopback (unbound; and `::` always), after the hook ran.
    let bound_protected = format!("127.{}.0.1:0", slot.net);
    let bound_protected_mapped = format!("[::ffff:127.{}.0.1]:0", slot.net);
    let bound_mapped_elsewhere = format!("[::ffff:127.{}.99.1]:0", slot.net);
    let cases: Vec<(&str, SocketAddr, Vec<&str>)> = vec![
        ("0.0.0.0, unbound (goes to 127.0.0.1)", any4, vec![]),
        (
            "0.0.0.0 from a socket bound to a protected address",
            any4,
            vec!["--bind", &bound_protected],
        ),
        ("::, unbound (goes to ::1)", any6, vec![]),
        ("::, bound to ::1", any6, vec!["--bind", "[::1]:0"]),
        (
            ":: from a socket bound to a v4-mapped address (goes to 127.0.0.1)",
            any6,
            vec!["--bind", &bound_mapped_elsewhere],
        ),
        ("::ffff:0.0.0.0, unbound", any_mapped, vec![]),
        (
            "::ffff:0.0.0.0 from a socket bound to a protected v4-mapped address",
            any_mapped,
            vec!["--bind", &bound_protected_mapped],
        ),
        ("0.0.0.0 non-blocking", any4, vec!["--nonblocking"]),
        ("0.0.0.0 with TCP Fast Open", any4, vec!["--fastopen"]),
        (
            "another loopback alias in the protected CIDR",
            alias,
            vec![],
        ),
        ("IPv4-mapped IPv6", slot.mapped(1), vec![]),
        (
            "IPv4-mapped alias",
            format!("[::ffff:{}]:{}", alias.ip(), alias.port())
                .parse()
                .unwrap(),
            vec![],
        ),
        ("bind before connect", slot.v4(1), vec!["--bind", &bind]),
        ("non-blocking connect", alias, vec!["--nonblocking"]),
        (
            "TCP Fast Open (sendto MSG_FASTOPEN)",
            slot.v4(1),
            vec!["--fastopen"],
        ),
        (
            "TCP Fast Open over IPv4-mapped IPv6",
            slot.mapped(1),
            vec!["--fastopen"],
        ),
        // The closing attack pass (issue 15): other ways into the same connect.
        (
            "io_uring connect (IORING_OP_CONNECT)",
            slot.v4(1),
            vec!["--via", "io-uring"],
        ),
        (
            "io_uring connect to IPv4-mapped IPv6",
            slot.mapped(1),
            vec!["--via", "io-uring"],
        ),
        (
            "io_uring connect to 0.0.0.0",
            any4,
            vec!["--via", "io-uring"],
        ),
        (
            "sendmsg with MSG_FASTOPEN",
            slot.v4(1),
            vec!["--via", "sendmsg-fastopen"],
        ),
        (
            "TCP_FASTOPEN_CONNECT, then connect",
            alias,
            vec!["--via", "fastopen-connect"],
        ),
        (
            "connect(AF_UNSPEC) after a connect elsewhere, then connect",
            alias,
            vec!["--via", "unspec-first"],
        ),
        (
            "SO_BINDTODEVICE lo",
            slot.v4(1),
            vec!["--bind-device", "lo"],
        ),
    ];
    for (what, addr, extra) in &cases {
        assert_via_proxy(&probe.connect(*addr, extra), what);
    }
    let opened = agent.wait_events("connection.opened", cases.len());
    assert_eq!(opened.len(), cases.len());
    assert!(opened.iter().all(|e| e["origin"]["uid"] == 41005));
    // The record names where the connection really went, never the unspecified address.
    for ev in &opened {
        let dest = canonical(ev["origin"]["destination"].as_str().unwrap());
        let ip: SocketAddr = dest.parse().unwrap();
        assert!(!ip.ip().is_unspecified(), "{ev}");
    }

    // The exemption mark cannot be set without CAP_NET_ADMIN.
    let mark = probe.run(&["setmark"]);
    assert_eq!(mark[0]["ok"], false);
    assert_eq!(mark[0]["errno"], EPERM);
    // Nor choose any source address (IP_TRANSPARENT needs CAP_NET_ADMIN).
    let transparent = probe.run(&["transparent"]);
    assert_eq!(transparent[0]["ok"], false);
    assert_eq!(transparent[0]["errno"], EPERM);
    // Nor can the user leave the cgroup the programs are attached to.
    let root = portcullis_e2e::cgroup2_root().unwrap();
    for dest in [root.clone(), root.join("portcullis-e2e")] {
        let moved = probe.run(&["move-cgroup", dest.to_str().unwrap()]);
        assert_eq!(
            moved[0]["ok"],
            false,
            "moving to {} must fail: {}",
            dest.display(),
            moved[0]
        );
    }
}

#[test]
fn direct_connection_to_the_proxy_listener_is_refused() {
    if !e2e_enabled() {
        return;
    }
    let Fixture {
        slot,
        cg,
        server: _server,
        agent,
    } = Fixture::new("direct", 6);
    let probe = Probe {
        cgroup: &cg,
        uid: 41006,
        netns: None,
    };
    let r = probe.connect(slot.proxy_v4(), &[]);
    assert_eq!(r["ok"], false, "no origin record, so no service: {r}");
    let refused = agent.wait_events("connection.refused", 1);
    assert_eq!(refused.len(), 1);
    assert!(refused[0]["reason"]
        .as_str()
        .unwrap()
        .contains("no origin record"));
}

/// Number of entries in a pinned map, read with bpftool (works while no agent runs).
fn pinned_entries(path: &std::path::Path) -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().map_or(0, Vec::len)
}

#[test]
fn thousand_connections_from_fifty_uids_are_attributed_and_the_maps_drain() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(7);
    let cg = TestCgroup::new("attribution");
    let _server = EchoServer::start(&[slot.v4(1)]);
    let v4 = slot.v4(1).ip().to_string();
    let dead = slot.v4(2).ip().to_string();
    // A second target whose upstream is down: the client's connection is accepted by the
    // proxy and then refused, a failed connection from the user's point of view.
    let mut agent = Agent::prepare(
        "attribution",
        slot,
        &cg,
        &[
            Target {
                name: "db",
                address: &v4,
                port: slot.server_port,
                upstream: None,
            },
            Target {
                name: "down",
                address: &dead,
                port: slot.server_port,
                upstream: None,
            },
        ],
        None,
        &[],
    );
    // Three event loops: accepted sockets are handed from the accepting loop to the others,
    // and every connection must still be attributed and closed.
    let config = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        config.replacen("[proxy]\n", "[proxy]\nthreads = 3\n", 1),
    )
    .unwrap();
    agent.spawn();
    let pid = agent.child.as_ref().unwrap().id();
    let loops = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|comm| comm.starts_with("portcullis-io-"))
        .count();
    assert_eq!(loops, 2, "two event loops besides the main thread's");
    let target = slot.v4(1).to_string();
    let children: Vec<_> = (0..50u32)
        .map(|i| {
            let probe = Probe {
                cgroup: &cg,
                uid: 42000 + i,
                netns: None,
            };
            probe
                .command(&["connect", &target, "--count", "20", "--hold-ms", "1500"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut owner: HashMap<String, (u32, u64)> = HashMap::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let r: Value = serde_json::from_str(line).unwrap();
            assert_via_proxy(&r, "held connection");
            let uid = 42000 + u32::try_from(i).unwrap();
            owner.insert(
                r["local"].as_str().unwrap().to_string(),
                (uid, r["pid"].as_u64().unwrap()),
            );
        }
    }
    assert_eq!(owner.len(), 1000, "1,000 distinct client connections");
    let closed = agent.wait_events("connection.closed", 1000);
    assert_eq!(closed.len(), 1000);
    for ev in &closed {
        let client = canonical(ev["client"].as_str().unwrap());
        let (uid, pid) = owner[&client];
        assert_eq!(ev["origin"]["uid"], uid, "misattributed: {ev}");
        assert_eq!(ev["origin"]["pid"], pid, "misattributed: {ev}");
    }

    // Connections held until the agent answers, to the target whose upstream is down:
    // each one is ended by the agent for that reason, attributed to its uid. The upstream
    // is dialled while `connection.opened` is written, so each is recorded as opened and
    // then closed, saying the upstream was unreachable.
    let dead_addr = slot.v4(2).to_string();
    let waiting = Probe {
        cgroup: &cg,
        uid: 42101,
        netns: None,
    };
    let answers = waiting.run(&["connect", &dead_addr, "--count", "200"]);
    assert_eq!(answers.len(), 200);
    assert!(answers.iter().all(|r| r["ok"] == false), "{answers:?}");
    let ended = || -> Vec<Value> {
        agent
            .events_of("connection.closed")
            .into_iter()
            .filter(|e| e["origin"]["uid"] == 42101)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ended().len() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let ended = ended();
    assert_eq!(ended.len(), 200, "one end per dead-upstream connection");
    assert!(agent.refusals_of(42101).is_empty());
    for ev in &ended {
        assert_eq!(ev["origin"]["destination"], dead_addr.as_str(), "{ev}");
        let reason = ev["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(&format!("upstream {dead_addr} unreachable")),
            "{ev}"
        );
        assert_eq!(ev["bytes_client_to_upstream"], 0, "{ev}");
    }
    let ids: std::collections::HashSet<_> =
        ended.iter().map(|e| e["connection_id"].clone()).collect();
    assert_eq!(ids.len(), 200, "200 distinct connections");

    // Churn: many short connections, half of them to a target whose upstream is down.
    // A churned client is gone before the agent reads most origins, so those refusals say
    // "no origin record"; only the maps draining is asserted below.
    let probe = Probe {
        cgroup: &cg,
        uid: 42100,
        netns: None,
    };
    let ok = probe.run(&["churn", &target, "--count", "2000"]);
    assert_eq!(ok[0]["ok"], 2000);
    let down = probe.run(&["churn", &dead_addr, "--count", "2000"]);
    assert_eq!(
        down[0]["ok"], 2000,
        "the proxy accepts, then ends the connection for the dead upstream"
    );
    // Churned clients are mostly gone before their origin is read, and those refusals are
    // summarized per interval: wait for the agent to settle, not for one event each.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = agent.status();
        let settled = status["pending_origins"] == 0 && status["open_connections"] == 0;
        if settled || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["pending_origins"], 0, "{status}");
    assert_eq!(status["open_connections"], 0, "{status}");
    assert_eq!(
        status["counters"]["published"],
        status["counters"]["redirected"]
    );
    assert_eq!(status["counters"]["publish_failed"], 0);

    // Connects that fail outright (no agent) leave nothing behind either.
    agent.kill9();
    let failed = probe.run(&["churn", &target, "--count", "2000"]);
    assert_eq!(failed[0]["failed"], 2000);
    let pending = agent.pin_dir.join("v1/maps/PORTCULLIS_PENDING_ORIGINS");
    assert_eq!(
        pinned_entries(&pending),
        0,
        "the pending-origin map returns to empty"
    );
}

#[test]
fn foreign_network_namespace_connects_are_refused() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(8);
    let cg = TestCgroup::new("netns");
    let ns = "portcullis-e2e-8";
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
    assert!(Command::new("ip")
        .args(["netns", "add", ns])
        .status()
        .unwrap()
        .success());
    assert!(Command::new("ip")
        .args(["-n", ns, "link", "set", "lo", "up"])
        .status()
        .unwrap()
        .success());
    struct DropNs(&'static str);
    impl Drop for DropNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", self.0]).status();
        }
    }
    let _ns = DropNs(ns);
    let server = EchoServer::start(&[slot.v4(1)]);
    // The same addresses served inside the namespace: a refused connect there is the
    // kernel program's doing, and the unprotected one must reach its server directly.
    let other: SocketAddr = format!("127.{}.0.9:{}", slot.net, slot.server_port)
        .parse()
        .unwrap();
    let inside = EchoServer::start_in_netns(ns, &[slot.v4(1), other]);
    let v4 = slot.v4(1).ip().to_string();
    let agent = Agent::start(
        "netns",
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
    );
    let probe = Probe {
        cgroup: &cg,
        uid: 41008,
        netns: Some(ns),
    };
    let r = probe.connect(slot.v4(1), &[]);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(
        r["errno"], EPERM,
        "refused by the kernel program, not redirected: {r}"
    );
    assert_eq!(
        inside.accepted(),
        0,
        "the protected connect reached nothing"
    );
    // An unprotected destination in that namespace is left alone: reached directly.
    let r = probe.connect(other, &[]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["via_proxy"], false, "{r}");
    assert_eq!(inside.accepted(), 1, "{r}");
    assert_eq!(server.accepted(), 0);
    assert_eq!(agent.status()["counters"]["denied_foreign_netns"], 1);
    // The kernel program's own log line reaches the agent's log through aya-log.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent
        .log()
        .contains("refused connect to a protected target from network namespace")
    {
        assert!(
            Instant::now() < deadline,
            "no kernel log line in the agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigterm_drains_open_connections_and_refuses_new_ones() {
    if !e2e_enabled() {
        return;
    }
    let Fixture {
        slot,
        cg,
        server,
        mut agent,
    } = Fixture::new("drain", 9);
    let probe = Probe {
        cgroup: &cg,
        uid: 41009,
        netns: None,
    };
    let mut session = probe
        .command(&["session", &slot.v4(1).to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = session.stdin.take().unwrap();
    let mut output = BufReader::new(session.stdout.take().unwrap());
    let mut read = || {
        let mut l = String::new();
        output.read_line(&mut l).unwrap();
        serde_json::from_str::<Value>(&l).unwrap()
    };
    assert_eq!(read()["ok"], true);
    writeln!(input, "before").unwrap();
    assert_eq!(read()["reply"], "before");

    let mut child = agent.sigterm();
    std::thread::sleep(Duration::from_millis(300));
    writeln!(input, "during the drain").unwrap();
    assert_eq!(
        read()["reply"],
        "during the drain",
        "open connections keep working while draining"
    );
    // No new connections while draining: the agent closed its listener, so the redirected
    // connect is refused at once (a hung agent would leave it in the accept queue, a
    // crashed one would be caught below), and nothing reaches the server directly.
    let accepted = server.accepted();
    let r = probe.connect(slot.v4(1), &[]);
    assert_eq!(r["ok"], false, "no new connections while draining: {r}");
    assert_eq!(r["errno"], ECONNREFUSED, "refused, not timed out: {r}");
    assert_eq!(server.accepted(), accepted, "nothing went direct");
    assert!(
        agent.log().contains("draining: no new connections"),
        "{}",
        agent.log()
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent waits for the open connection"
    );

    drop(input);
    session.wait().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let closed = agent.events_of("connection.closed");
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0]["reason"], "closed");
    assert_eq!(agent.events_of("agent.stopped").len(), 1);
}

#[test]
fn status_shows_a_normal_user_only_their_own_connections() {
    if !e2e_enabled() {
        return;
    }
    let Fixture {
        slot,
        cg,
        server: _server,
        agent,
    } = Fixture::new("status", 10);
    let probe = Probe {
        cgroup: &cg,
        uid: 43001,
        netns: None,
    };
    let mut session = probe
        .command(&["session", &slot.v4(1).to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = session.stdin.take().unwrap();
    let mut output = BufReader::new(session.stdout.take().unwrap());
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    let pid = serde_json::from_str::<Value>(&line).unwrap()["pid"].clone();
    writeln!(input, "twelve bytes").unwrap();
    line.clear();
    output.read_line(&mut line).unwrap();

    let root_view = agent.status();
    let conns = root_view["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{root_view}");
    assert_eq!(conns[0]["uid"], 43001);
    assert_eq!(conns[0]["pid"], pid);
    assert_eq!(conns[0]["comm"], "portcullis-prob");
    assert_eq!(conns[0]["target"], "db");
    assert_eq!(conns[0]["bytes_client_to_upstream"], 13);
    assert_eq!(root_view["programs"].as_array().unwrap().len(), 5);
    assert_eq!(root_view["targets"][0]["name"], "db");

    let owner_view = agent.status_as(43001);
    assert_eq!(owner_view["connections"].as_array().unwrap().len(), 1);
    let other_view = agent.status_as(43002);
    assert_eq!(
        other_view["connections"].as_array().unwrap().len(),
        0,
        "{other_view}"
    );
    assert_eq!(other_view["viewer_uid"], 43002);
    drop(input);
    session.wait().unwrap();
}

/// `portcullis status` as a normal user lists the targets the connect policy lets that
/// user's identity use and their own connections, and nothing of how the host is set up:
/// no upstream address, no pins or counters, no policy directory, no policy errors.
#[test]
fn status_shows_a_normal_user_only_the_targets_policy_lets_them_use() {
    if !e2e_enabled() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let slot = Slot::new(125);
    let cg = TestCgroup::new("status-scope");
    let _server = EchoServer::start(&[slot.v4(1), slot.v4(2), slot.v4(3)]);
    let (db, secret) = (slot.v4(1).ip().to_string(), slot.v4(2).ip().to_string());
    let mut agent = Agent::prepare(
        "status-scope",
        slot,
        &cg,
        &[
            Target {
                name: "db",
                address: &db,
                port: slot.server_port,
                upstream: Some(slot.v4(3)),
            },
            Target {
                name: "secret-db",
                address: &secret,
                port: slot.server_port,
                upstream: None,
            },
        ],
        None,
        &[],
    );
    let policies = agent.dir.path().join("policies");
    std::fs::write(
        policies.join("e2e.cedar"),
        "@id(\"uid-45125-reaches-db\")\n\
         permit (principal, action == Portcullis::Action::\"connect\", resource == Portcullis::Target::\"db\")\n\
         when { context.source_uid == 45125 };\n",
    )
    .unwrap();
    agent.spawn();
    let user = Probe {
        cgroup: &cg,
        uid: 45125,
        netns: None,
    };
    // What status will list is what the proxy decides.
    assert_via_proxy(&user.connect(slot.v4(1), &[]), "uid 45125 to db");
    assert_eq!(user.connect(slot.v4(2), &[])["ok"], false);
    let refused = agent.wait_events("connection.refused", 1);
    assert_eq!(refused[0]["target"], "secret-db", "{refused:?}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("denied by policy"),
        "{refused:?}"
    );

    let mut session = user
        .command(&["session", &slot.v4(1).to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = session.stdin.take().unwrap();
    let mut output = BufReader::new(session.stdout.take().unwrap());
    let mut line = String::new();
    output.read_line(&mut line).unwrap();
    writeln!(input, "ping").unwrap();
    line.clear();
    output.read_line(&mut line).unwrap();

    // A refused reload: root sees why, nobody else does.
    std::fs::write(
        policies.join("broken.cedar"),
        "permit (principal, action, resource) when { nope };\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let root = loop {
        let s = agent.status();
        if s["policy"]["last_error"].is_string() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the broken policy was never reported: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(root["targets"].as_array().unwrap().len(), 2, "{root}");
    assert_eq!(root["targets"][0]["upstream"], slot.v4(3).to_string());
    assert_eq!(root["connections"][0]["upstream"], slot.v4(3).to_string());
    assert!(root["policy"]["dir"].is_string(), "{root}");
    assert_eq!(
        root["insecure"],
        serde_json::json!(["insecure.unix_identity_only"])
    );

    let mine = agent.status_as(45125);
    let names: Vec<&str> = mine["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["db"], "{mine}");
    assert_eq!(mine["targets"][0]["address"], db);
    assert_eq!(mine["open_connections"], 1, "{mine}");
    assert_eq!(mine["connections"][0]["target"], "db");
    assert_eq!(
        mine["insecure"],
        serde_json::json!(["insecure.unix_identity_only"])
    );
    for hidden in [
        "cgroup",
        "pin_dir",
        "programs",
        "counters",
        "pending_origins",
        "policy",
    ] {
        assert!(
            mine.get(hidden).is_none(),
            "`{hidden}` shown to uid 45125: {mine}"
        );
    }
    let json = mine.to_string();
    for leak in [
        slot.v4(3).ip().to_string(),
        policies.display().to_string(),
        "broken.cedar".into(),
        "nope".into(),
    ] {
        assert!(!json.contains(&leak), "`{leak}` shown to uid 45125: {mine}");
    }

    let other = agent.status_as(45126);
    assert_eq!(other["targets"], serde_json::json!([]), "{other}");
    assert_eq!(other["open_connections"], 0, "{other}");

    // The text form, as the user reads it.
    let out = Command::new(portcullis_e2e::agent_bin())
        .args(["status", "--socket"])
        .arg(&agent.socket)
        .uid(45125)
        .gid(45125)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("targets you may connect to (1)"), "{text}");
    assert!(
        text.contains("INSECURE     insecure.unix_identity_only"),
        "{text}"
    );
    assert!(!text.contains("secret-db"), "{text}");
    assert!(!text.contains(&slot.v4(3).ip().to_string()), "{text}");
    assert!(
        !text.contains("broken.cedar") && !text.contains("policies"),
        "{text}"
    );
    drop(input);
    session.wait().unwrap();

    // The lab setting is announced at every start.
    std::fs::remove_file(policies.join("broken.cedar")).unwrap();
    agent.kill9();
    agent.spawn();
    let warnings = agent
        .log()
        .matches("INSECURE: connections are attributed to the Unix account alone")
        .count();
    assert_eq!(warnings, 2, "{}", agent.log());
}

#[test]
fn agent_rejects_a_malformed_config_naming_file_and_line() {
    let bin = portcullis_e2e::agent_bin();
    if !bin.is_file() {
        assert!(
            !e2e_enabled(),
            "the agent binary must exist under cargo xtask test"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, "[proxy]\nport = 940\n\n[[target]]\nname = \"db\"\nprotocol = \"tcp\"\naddress = \"127.0.0.300\"\nport = 5432\n").unwrap();
    let out = Command::new(&bin)
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:7:", path.display())), "{err}");
    assert!(err.contains("target[0].address"), "{err}");
    std::fs::write(&path, "[proxy]\nprot = 940\n").unwrap();
    let out = Command::new(&bin)
        .args(["agent", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2:", path.display())) && err.contains("unknown field `prot`"),
        "{err}"
    );
}

#[test]
fn agent_notifies_systemd_ready_only_once_enforcement_is_attached() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(11);
    let cg = TestCgroup::new("notify");
    let _server = EchoServer::start(&[slot.v4(1)]);
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let v4 = slot.v4(1).ip().to_string();
    let path = notify_path.to_str().unwrap().to_string();
    // The agent is ready (it answers status) before start_with_env returns; the datagram
    // was sent before that, so it is waiting in the socket.
    let agent = Agent::start_with_env(
        "notify",
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
        &[("NOTIFY_SOCKET", &path)],
    );
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    let log = agent.log();
    let attached = log.find("enforcement attached").expect("attach logged");
    let ready = log.find("agent ready").expect("ready logged");
    assert!(
        attached < ready,
        "READY=1 comes after the programs are attached:\n{log}"
    );
    let probe = Probe {
        cgroup: &cg,
        uid: 41011,
        netns: None,
    };
    assert_via_proxy(&probe.connect(slot.v4(1), &[]), "after READY=1");
}

#[test]
fn agent_without_privileges_exits_with_a_clear_error() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(12);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = dir.path().join("portcullis.toml");
    let cg = portcullis_e2e::cgroup2_root().unwrap();
    std::fs::write(
        &config,
        Agent::config_text(dir.path(), "unprivileged", slot, &cg, &[]),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    use std::os::unix::process::CommandExt;
    let out = Command::new(portcullis_e2e::agent_bin())
        .args(["agent", "--config"])
        .arg(&config)
        .uid(41012)
        .gid(41012)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing capabilities CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN;"),
        "{err}"
    );
    assert!(!std::path::Path::new("/sys/fs/bpf/portcullis-e2e-unprivileged").exists());
}

#[test]
fn restart_under_load_never_lets_a_connection_go_direct() {
    if !e2e_enabled() {
        return;
    }
    let Fixture {
        slot,
        cg,
        server: _server,
        mut agent,
    } = Fixture::new("restart", 13);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let target = slot.v4(1).to_string();
    let load = {
        let stop = std::sync::Arc::clone(&stop);
        let cgroup = cg.path.clone();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            // Bounded: at most 200 rounds of 20 connections.
            for _ in 0..200 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let out = Command::new(portcullis_e2e::probe_bin())
                    .arg("--cgroup")
                    .arg(&cgroup)
                    .args([
                        "--uid", "41013", "--gid", "41013", "connect", &target, "--count", "20",
                    ])
                    .output()
                    .unwrap();
                for l in String::from_utf8_lossy(&out.stdout).lines() {
                    lines.push(serde_json::from_str::<Value>(l).unwrap());
                }
            }
            lines
        })
    };
    // While the agent is down, the pinned programs still redirect to its empty port: a
    // connect is refused. The agent stays down until a connect has seen that (bounded), so
    // a loaded machine whose load rounds miss a short window cannot fail the test.
    let probe = Probe {
        cgroup: &cg,
        uid: 41013,
        netns: None,
    };
    let mut refused_while_down = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        agent.kill9();
        for _ in 0..50 {
            let r = probe.connect(slot.v4(1), &[]);
            let refused = r["errno"] == ECONNREFUSED;
            refused_while_down.push(r);
            if refused {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        agent.spawn();
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut lines = load.join().unwrap();
    lines.extend(refused_while_down);
    let direct: Vec<_> = lines
        .iter()
        .filter(|l| l["ok"] == true && l["via_proxy"] != true)
        .collect();
    assert!(
        direct.is_empty(),
        "connections went direct during restarts: {direct:?}"
    );
    assert!(
        lines.iter().any(|l| l["ok"] == true),
        "some connections succeeded"
    );
    assert!(
        lines.iter().any(|l| l["errno"] == ECONNREFUSED),
        "some were refused while the agent was down"
    );
}

/// A loopback server that answers `peer=<address>\n` on accept, then keeps everything the
/// connection sends until it ends: what reached the upstream, connection by connection.
struct RecordingServer {
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    received: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl RecordingServer {
    fn start(addr: SocketAddr) -> Self {
        use std::io::Read;
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind(addr).unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, r) = (accepted.clone(), received.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                a.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                std::thread::spawn(move || {
                    let peer = stream.peer_addr().unwrap();
                    let _ = writeln!(stream, "peer={peer}");
                    stream
                        .set_read_timeout(Some(Duration::from_secs(20)))
                        .unwrap();
                    let mut got = Vec::new();
                    // A reset (the agent closing with our greeting unread) ends it too.
                    let _ = stream.read_to_end(&mut got);
                    r.lock().unwrap().push(got);
                });
            }
        });
        Self { accepted, received }
    }

    /// What each finished connection sent, once every accepted one has finished.
    fn all_received(&self) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.received.lock().unwrap().clone();
            if got.len() == self.accepted.load(std::sync::atomic::Ordering::SeqCst) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "upstream connections did not end"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A size-limited tmpfs, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs on {}", dir.display());
        Self(dir.to_path_buf())
    }

    /// Fills the filesystem to the last block.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while f.write(&block).is_ok_and(|n| n > 0) {}
        let _ = f.sync_all();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The upstream connect runs while `connection.opened` is being made durable, yet a
/// connection whose event cannot be written gets nothing through: its upstream was dialled
/// and is closed without one byte, while the connections recorded before the disk filled
/// carry their bytes.
#[test]
fn an_opening_the_audit_store_cannot_record_dials_its_upstream_but_forwards_nothing() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(44);
    let cg = TestCgroup::new("overlap");
    let upstream = RecordingServer::start(slot.v4(1));
    let v4 = slot.v4(1).ip().to_string();
    let mut agent = Agent::prepare(
        "overlap",
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
        None,
        &[],
    );
    let disk = SmallDisk::mount(&agent.dir.path().join("state/audit"), "2m");
    agent.spawn();
    let probe = Probe {
        cgroup: &cg,
        uid: 41044,
        netns: None,
    };
    assert_via_proxy(&probe.connect(slot.v4(1), &[]), "before the disk fills");
    assert_eq!(agent.wait_events("connection.closed", 1).len(), 1);
    assert_eq!(upstream.all_received(), vec![b"hello\n".to_vec()]);

    disk.fill();
    // Forty connections held open together: none closes meanwhile, so the first event
    // that does not fit on the disk is an opening (the last page's slack takes a few).
    let target = slot.v4(1).to_string();
    let answers = probe.run(&["connect", &target, "--count", "40", "--hold-ms", "300"]);
    assert_eq!(answers.len(), 40);
    // Every connection that got an answer was recorded first: none went ahead of its
    // event while the event was being written. (A refused one may have its event on disk
    // too: a batch that failed half-way still holds the lines written before the error.)
    let recorded: std::collections::HashSet<String> = agent
        .events_of("connection.opened")
        .iter()
        .map(|e| canonical(e["client"].as_str().unwrap()))
        .collect();
    for r in answers.iter().filter(|r| r["ok"] == true) {
        let client = canonical(r["local"].as_str().unwrap());
        assert!(
            recorded.contains(&client),
            "{client} was answered without its connection.opened"
        );
    }
    let forwarded = answers.iter().filter(|r| r["ok"] == true).count();
    assert!(forwarded < 40, "no connection was refused on a full disk");
    assert!(
        agent
            .log()
            .contains("cannot record the connection; refusing it"),
        "{}",
        agent.log()
    );

    let received = upstream.all_received();
    let after = received.get(1..).unwrap_or_default();
    let carried = after.iter().filter(|b| !b.is_empty()).count();
    assert!(
        after.iter().all(|b| b.is_empty() || b == b"hello\n"),
        "{after:?}"
    );
    assert_eq!(
        carried, forwarded,
        "bytes reached the upstream of a connection the agent could not record"
    );
    assert!(
        after.len() > forwarded,
        "no refused connection had its upstream dialled ({} dialled, {forwarded} forwarded)",
        after.len()
    );
}
