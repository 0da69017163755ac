//! The client of idle TLS sessions (the `portcullis-idle-tls` binary of the PostgreSQL suite,
//! and `cargo xtask idle-client` for `bench postgres --case idle10k`), run inside the agent's
//! cgroup (so its connects meet the redirect) as an unprivileged uid. It opens many
//! PostgreSQL sessions with TLS to the agent (verifying the agent's certificate against its
//! CA), logs each in, and holds them. One process with a few threads of blocking sockets: a
//! psql or psycopg connection per session would weigh more than what is measured.
//!
//! Protocol with its caller on stdin/stdout: it prints `open N` once N sessions are up (or
//! the time limit passed), waits for a line on stdin, sends `SELECT 1` on every session,
//! prints `answered M`, waits for another line, and closes them all.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

const THREADS: usize = 8;
/// The SSLRequest code (PostgreSQL protocol, 1234.5679).
const SSL_REQUEST: u32 = 80_877_103;
const PROTOCOL_3_0: u32 = 196_608;

struct Args {
    addr: SocketAddr,
    user: String,
    database: String,
    ca: std::path::PathBuf,
    sessions: usize,
    limit: Duration,
}

/// `ADDR USER DATABASE CA_PEM SESSIONS SECONDS`
pub fn run(args: &[String]) -> Result<()> {
    let [addr, user, database, ca, sessions, seconds] = args else {
        bail!("usage: portcullis-idle-tls ADDR USER DATABASE CA_PEM SESSIONS SECONDS");
    };
    let args = Args {
        addr: addr.parse().context("ADDR")?,
        user: user.clone(),
        database: database.clone(),
        ca: ca.into(),
        sessions: sessions.parse().context("SESSIONS")?,
        limit: Duration::from_secs(seconds.parse().context("SECONDS")?),
    };
    raise_fd_limit()?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.ca).context("the agent's CA")? {
        roots.add(cert?)?;
    }
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let deadline = Instant::now() + args.limit;
    let failed = AtomicBool::new(false);
    let first_error = std::sync::Mutex::new(None::<String>);
    let mut sessions: Vec<Tls> = Vec::with_capacity(args.sessions);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let share = args.sessions / THREADS + usize::from(t < args.sessions % THREADS);
                let (config, args, failed, first_error) = (&config, &args, &failed, &first_error);
                scope.spawn(move || {
                    let mut mine = Vec::with_capacity(share);
                    while mine.len() < share
                        && Instant::now() < deadline
                        && !failed.load(Ordering::Relaxed)
                    {
                        match open(config, args) {
                            Ok(s) => mine.push(s),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                first_error
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .get_or_insert(format!("{e:#}"));
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        for h in handles {
            if let Ok(mut mine) = h.join() {
                sessions.append(&mut mine);
            }
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        eprintln!("after {} sessions: {e}", sessions.len());
    }
    println!("open {}", sessions.len());
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;

    // Every held session still answers, in parallel chunks like the opening.
    let answered = AtomicBool::new(false);
    let count = std::sync::atomic::AtomicUsize::new(0);
    let chunk = sessions.len().div_ceil(THREADS).max(1);
    std::thread::scope(|scope| {
        for part in sessions.chunks_mut(chunk) {
            let (count, answered) = (&count, &answered);
            scope.spawn(move || {
                for s in part {
                    match select_one(s) {
                        Ok(()) => {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            if !answered.swap(true, Ordering::Relaxed) {
                                eprintln!("a held session did not answer: {e:#}");
                            }
                        }
                    }
                }
            });
        }
    });
    println!("answered {}", count.load(Ordering::Relaxed));
    std::io::stdout().flush()?;
    line.clear();
    std::io::stdin().lock().read_line(&mut line)?;
    for mut s in sessions {
        // Terminate, so the agent records a clean end rather than a reset.
        let _ = s.write_all(&[b'X', 0, 0, 0, 4]);
        let _ = s.flush();
    }
    Ok(())
}

/// Raises this process's soft open-file limit to the hard one (children inherit it) and
/// returns that limit: one descriptor per session here, two per session in the agent.
#[allow(
    unsafe_code,
    reason = "getrlimit/setrlimit have no safe wrapper in std"
)]
pub fn raise_fd_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if !raised {
        bail!(
            "setting the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(limit.rlim_max)
}

/// Connects, asks for TLS, verifies the agent's certificate for the address dialled, logs in
/// (the agent asks for no password here) and waits for the first ReadyForQuery.
fn open(config: &Arc<rustls::ClientConfig>, args: &Args) -> Result<Tls> {
    let mut tcp = TcpStream::connect_timeout(&args.addr, Duration::from_secs(10))?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(30)))?;
    tcp.set_nodelay(true)?;
    let mut request = Vec::with_capacity(8);
    request.extend_from_slice(&8u32.to_be_bytes());
    request.extend_from_slice(&SSL_REQUEST.to_be_bytes());
    tcp.write_all(&request)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)?;
    if answer != *b"S" {
        bail!("the agent declined TLS (answered {:?})", answer[0] as char);
    }
    let name = ServerName::IpAddress(args.addr.ip().into());
    let conn = rustls::ClientConnection::new(Arc::clone(config), name)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut startup = Vec::with_capacity(64);
    startup.extend_from_slice(&[0; 4]);
    startup.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for (k, v) in [
        ("user", args.user.as_str()),
        ("database", args.database.as_str()),
    ] {
        startup.extend_from_slice(k.as_bytes());
        startup.push(0);
        startup.extend_from_slice(v.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let len = u32::try_from(startup.len())?.to_be_bytes();
    startup.splice(0..4, len);
    tls.write_all(&startup)?;
    tls.flush()?;
    loop {
        let (tag, body) = read_message(&mut tls)?;
        match tag {
            b'R' if body.get(..4) == Some(&[0, 0, 0, 0]) => {}
            b'R' => bail!("the agent asked for a password (authentication {body:?})"),
            b'E' => bail!("login refused: {}", error_text(&body)),
            b'Z' => return Ok(tls),
            _ => {}
        }
    }
}

/// `SELECT 1` on a held session: its one row must say 1.
fn select_one(s: &mut Tls) -> Result<()> {
    let query = b"SELECT 1\0";
    let mut msg = Vec::with_capacity(5 + query.len());
    msg.push(b'Q');
    msg.extend_from_slice(&u32::try_from(4 + query.len())?.to_be_bytes());
    msg.extend_from_slice(query);
    s.write_all(&msg)?;
    s.flush()?;
    let mut one = false;
    loop {
        let (tag, body) = read_message(s)?;
        match tag {
            // One column, length 1, "1".
            b'D' => one = body == [0, 1, 0, 0, 0, 1, b'1'],
            b'E' => bail!("SELECT 1 failed: {}", error_text(&body)),
            b'Z' if one => return Ok(()),
            b'Z' => bail!("SELECT 1 returned no row 1"),
            _ => {}
        }
    }
}

fn read_message(s: &mut Tls) -> Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let [tag, a, b, c, d] = head;
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if !(4..=1 << 20).contains(&len) {
        bail!("message {:?} of length {len}", tag as char);
    }
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body)?;
    Ok((tag, body))
}

/// The `M` field of an ErrorResponse.
fn error_text(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .find_map(|f| f.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_else(|| "no message".into())
}
