//! SIEM streaming end to end: a real agent forwards its hash-chained store to a syslog
//! receiver (RFC 5424, octet-counted TCP) and to an HTTP webhook, both written here on std
//! sockets. Every record arrives, in order, through a restart of the receiver in the middle;
//! what is re-sent is recognisable by (host, seq); the webhook never sees a seq again after
//! it answered 2xx for it; the bearer token is sent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_e2e::postgres::BadCertificate;
use portcullis_e2e::{e2e_enabled, Agent, EchoServer, Probe, Slot, Target, TestCgroup};

/// The agent names itself by the kernel hostname (no `audit.central.host_name` here).
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// Accepts octet-counted RFC 5424 frames; `stop` closes the listener and, after draining
/// what the agent already sent, every connection (a receiver restart).
struct SyslogReceiver {
    port: u16,
    frames: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SyslogReceiver {
    fn start(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut me = Self {
            port,
            frames,
            stop,
            threads: Vec::new(),
        };
        me.listen(listener);
        me
    }

    fn listen(&mut self, listener: TcpListener) {
        let frames = Arc::clone(&self.frames);
        let stop = Arc::clone(&self.stop);
        self.threads.push(std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let frames = Arc::clone(&frames);
                        let stop = Arc::clone(&stop);
                        conns.push(std::thread::spawn(move || read_frames(s, &frames, &stop)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            drop(listener);
            for c in conns {
                c.join().unwrap();
            }
        }));
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }

    fn restart(&mut self) {
        self.stop.store(false, Ordering::SeqCst);
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        self.listen(listener);
    }

    fn frames(&self) -> Vec<String> {
        self.frames.lock().unwrap().clone()
    }
}

impl Drop for SyslogReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_frames(mut s: TcpStream, frames: &Mutex<Vec<String>>, stop: &AtomicBool) {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut closing: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) && closing.is_none() {
            // A clean restart: our FIN tells the agent, which reconnects later; what it
            // sent before seeing it is still read below, for a moment.
            let _ = s.shutdown(Shutdown::Write);
            closing = Some(Instant::now());
        }
        if closing.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
        // MSG-LEN SP SYSLOG-MSG (RFC 6587 §3.4.1).
        while let Some(sp) = buf.iter().position(|b| *b == b' ') {
            let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
            if buf.len() < sp + 1 + len {
                break;
            }
            let msg = String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap();
            frames.lock().unwrap().push(msg);
            buf.drain(..sp + 1 + len);
        }
    }
}

/// The parts of an RFC 5424 message the assertions need.
#[derive(Debug)]
struct Parsed {
    pri: u32,
    version: String,
    timestamp: String,
    hostname: String,
    app: String,
    msgid: String,
    sd: HashMap<String, String>,
    msg: serde_json::Value,
}

fn parse_5424(m: &str) -> Parsed {
    let rest = m.strip_prefix('<').unwrap();
    let (pri, rest) = rest.split_once('>').unwrap();
    let mut fields = rest.splitn(7, ' ');
    let version = fields.next().unwrap().to_string();
    let timestamp = fields.next().unwrap().to_string();
    let hostname = fields.next().unwrap().to_string();
    let app = fields.next().unwrap().to_string();
    let _procid = fields.next().unwrap();
    let msgid = fields.next().unwrap().to_string();
    let rest = fields.next().unwrap();
    let body = rest.strip_prefix("[portcullis@32473").unwrap();
    // Walk the SD-PARAMs honouring the §6.3.3 escapes.
    let mut sd = HashMap::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek() == Some(&']') {
            chars.next();
            break;
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'));
        let mut value = String::new();
        loop {
            match chars.next().unwrap() {
                '\\' => value.push(chars.next().unwrap()),
                '"' => break,
                c => value.push(c),
            }
        }
        sd.insert(name, value);
    }
    let msg: String = chars.collect();
    let json = msg
        .strip_prefix(" \u{feff}")
        .expect("MSG starts with SP and a BOM");
    Parsed {
        pri: pri.parse().unwrap(),
        version,
        timestamp,
        hostname,
        app,
        msgid,
        sd,
        msg: serde_json::from_str(json).unwrap(),
    }
}

/// One POST as the webhook receiver saw it.
#[derive(Debug, Clone)]
struct Request {
    headers: HashMap<String, String>,
    lines: Vec<serde_json::Value>,
    status: u16,
}

/// A minimal HTTP/1.1 server: keep-alive, Content-Length bodies, 200 or (while `failing`) 500.
struct WebhookReceiver {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    failing: Arc<AtomicBool>,
}

impl WebhookReceiver {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicBool::new(false));
        let (r, f) = (Arc::clone(&requests), Arc::clone(&failing));
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(s) = s else { continue };
                let (r, f) = (Arc::clone(&r), Arc::clone(&f));
                std::thread::spawn(move || serve_http(s, &r, &f));
            }
        });
        Self {
            port,
            requests,
            failing,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve_http(s: TcpStream, requests: &Mutex<Vec<Request>>, failing: &AtomicBool) {
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut out = s;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        assert!(request_line.starts_with("POST "), "{request_line}");
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
        let len: usize = headers["content-length"].parse().unwrap();
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).unwrap();
        let lines = String::from_utf8(body)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let status = if failing.load(Ordering::SeqCst) {
            500
        } else {
            200
        };
        requests.lock().unwrap().push(Request {
            headers,
            lines,
            status,
        });
        let reason = if status == 200 { "OK" } else { "Oops" };
        write!(
            out,
            "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        out.flush().unwrap();
    }
}

struct Setup {
    agent: Agent,
    cg: TestCgroup,
    slot: Slot,
    _server: EchoServer,
}

fn setup(name: &str, n: u8, section: &str) -> Setup {
    let slot = Slot::new(n);
    let cg = TestCgroup::new(name);
    let server = EchoServer::start(&[slot.v4(1)]);
    let v4 = slot.v4(1).ip().to_string();
    // Plaintext to a loopback receiver is refused unless the config says so; TLS needs no flag.
    let plaintext = section.contains("tls = \"disable\"") || section.contains("http://");
    let allow = if plaintext {
        "allow_plaintext_loopback = true\n"
    } else {
        ""
    };
    let extra = format!("[insecure]\nunix_identity_only = true\n{allow}{section}\n");
    let agent = Agent::start_with(
        name,
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
        Some(&extra),
        &[],
    );
    Setup {
        agent,
        cg,
        slot,
        _server: server,
    }
}

impl Setup {
    fn connect(&self, count: usize) {
        let results = Probe {
            cgroup: &self.cg,
            uid: 47001,
            netns: None,
        }
        .run(&[
            "connect",
            &self.slot.v4(1).to_string(),
            "--count",
            &count.to_string(),
        ]);
        assert_eq!(results.len(), count);
        assert!(
            results.iter().all(|r| r["ok"] == true),
            "{results:?}\n{}",
            self.agent.log()
        );
    }

    /// The number of records in the local store once `closed` sessions ended.
    fn local_records(&self, closed: usize) -> u64 {
        assert!(self.agent.wait_events("connection.closed", closed).len() >= closed);
        self.agent.events().len() as u64
    }
}

/// Waits until `seqs()` covers 1..=n (n re-read each round: events keep being written).
fn wait_all(agent: &Agent, mut seqs: impl FnMut() -> Vec<u64>) -> (u64, Vec<u64>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let n = agent.events().len() as u64;
        let got = seqs();
        let set: BTreeSet<u64> = got.iter().copied().collect();
        if (n > 0 && set == (1..=n).collect()) || Instant::now() > deadline {
            return (n, got);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every seq of 1..=n arrived, first arrivals are in order, and a seq arrives again only as
/// part of a re-sent run that starts after the last acknowledged one (never out of order).
fn assert_complete_in_order(n: u64, got: &[u64], log: &str) {
    let set: BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(
        set,
        (1..=n).collect::<BTreeSet<u64>>(),
        "missing seqs; got {got:?}\n{log}"
    );
    let mut first: Vec<u64> = Vec::new();
    for s in got {
        if !first.contains(s) {
            first.push(*s);
        }
    }
    assert_eq!(
        first,
        (1..=n).collect::<Vec<_>>(),
        "first arrivals out of order"
    );
    for w in got.windows(2) {
        assert!(
            w[1] == w[0] + 1 || w[1] <= w[0],
            "a gap between {} and {}: {got:?}",
            w[0],
            w[1]
        );
    }
}

#[test]
fn syslog_delivers_every_record_once_in_order_through_a_receiver_restart() {
    if !e2e_enabled() {
        return;
    }
    let mut rx = SyslogReceiver::start(0);
    let s = setup(
        "siem-syslog",
        71,
        &format!(
            "[audit.syslog]\naddress = \"127.0.0.1:{}\"\ntls = \"disable\"\nfacility = \"local3\"\n",
            rx.port
        ),
    );
    s.connect(10);
    let before = s.local_records(10);
    let seqs_of = |rx: &SyslogReceiver| -> Vec<u64> {
        rx.frames()
            .iter()
            .map(|f| parse_5424(f).sd["seq"].parse().unwrap())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while (seqs_of(&rx).len() as u64) < before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }

    // The restart: no listener for a few seconds while connections keep flowing.
    rx.stop();
    s.connect(10);
    std::thread::sleep(Duration::from_secs(3));
    s.connect(5);
    rx.restart();
    s.connect(10);
    s.local_records(35);

    let (n, got) = wait_all(&s.agent, || seqs_of(&rx));
    assert!(n > before, "events were written during the outage");
    assert_complete_in_order(n, &got, &s.agent.log());
    let dups = got.len() as u64 - n;
    assert_eq!(
        dups, 0,
        "a clean receiver restart re-sends nothing: {got:?}"
    );
    assert!(
        s.agent.log().contains("audit forwarding failed"),
        "the restart was seen and retried:\n{}",
        s.agent.log()
    );

    // Every frame is well-formed RFC 5424 and carries the stored event verbatim.
    let local = s.agent.events();
    for f in rx.frames() {
        let p = parse_5424(&f);
        let seq: usize = p.sd["seq"].parse().unwrap();
        assert_eq!(p.version, "1");
        assert_eq!(p.app, "portcullis");
        assert_eq!(p.hostname, host());
        assert_eq!(p.sd["host"], host());
        assert_eq!(p.sd["hash"].len(), 64);
        assert_eq!(p.msg, local[seq - 1], "seq {seq}");
        assert_eq!(p.msgid, p.msg["event"].as_str().unwrap());
        let severity = if p.msgid == "connection.refused" {
            4
        } else {
            6
        };
        assert_eq!(p.pri, 19 * 8 + severity, "local3 = 19: {f}");
        assert!(
            p.timestamp.len() == 24 && p.timestamp.ends_with('Z'),
            "{}",
            p.timestamp
        );
    }
    let progress =
        std::fs::read_to_string(s.agent.dir.path().join("state/audit-syslog-shipped")).unwrap();
    assert!(progress.trim().parse::<u64>().unwrap() >= n);
}

#[test]
fn webhook_delivers_ndjson_batches_with_token_through_a_failing_receiver() {
    if !e2e_enabled() {
        return;
    }
    let rx = WebhookReceiver::start();
    let secrets = tempfile::tempdir().unwrap();
    let token = secrets.path().join("token");
    std::fs::write(&token, "e2e-webhook-token\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = setup(
        "siem-webhook",
        72,
        &format!(
            "[audit.webhook]\nurl = \"http://127.0.0.1:{}/ingest\"\ntoken_file = \"{}\"\n\
             batch_size = 7\ntimeout_secs = 5\n",
            rx.port,
            token.display()
        ),
    );
    s.connect(10);
    s.local_records(10);

    // The receiver fails every request for a few seconds: the same records come back later.
    rx.failing.store(true, Ordering::SeqCst);
    s.connect(10);
    std::thread::sleep(Duration::from_secs(4));
    rx.failing.store(false, Ordering::SeqCst);
    s.connect(10);
    s.local_records(30);

    let acked = |rx: &WebhookReceiver| -> Vec<u64> {
        rx.requests()
            .iter()
            .filter(|r| r.status == 200)
            .flat_map(|r| r.lines.iter().map(|l| l["seq"].as_u64().unwrap()))
            .collect()
    };
    let (n, got) = wait_all(&s.agent, || acked(&rx));
    assert_complete_in_order(n, &got, &s.agent.log());
    assert_eq!(got.len() as u64, n, "a seq was delivered twice after a 2xx");

    let requests = rx.requests();
    assert!(
        requests.iter().any(|r| r.status == 500),
        "the outage was seen by the agent"
    );
    let local = s.agent.events();
    for r in &requests {
        assert_eq!(r.headers["content-type"], "application/x-ndjson");
        assert_eq!(r.headers["authorization"], "Bearer e2e-webhook-token");
        assert_eq!(r.headers["x-portcullis-host"], host());
        assert!(!r.lines.is_empty() && r.lines.len() <= 7);
        let first = r.lines[0]["seq"].as_u64().unwrap();
        let last = r.lines[r.lines.len() - 1]["seq"].as_u64().unwrap();
        assert_eq!(r.headers["x-portcullis-first-seq"], first.to_string());
        assert_eq!(r.headers["x-portcullis-last-seq"], last.to_string());
        for (i, l) in r.lines.iter().enumerate() {
            let seq = l["seq"].as_u64().unwrap();
            assert_eq!(seq, first + i as u64);
            assert_eq!(l["host"], host().as_str());
            assert_eq!(l["event"], local[seq as usize - 1]);
        }
    }
    // Failed requests were retried with the same records, so nothing was skipped.
    assert!(
        s.agent.log().contains("answered HTTP 500"),
        "{}",
        s.agent.log()
    );
    let failed: BTreeSet<u64> = requests
        .iter()
        .filter(|r| r.status == 500)
        .flat_map(|r| r.lines.iter().map(|l| l["seq"].as_u64().unwrap()))
        .collect();
    let acked: BTreeSet<u64> = got.into_iter().collect();
    assert!(failed.is_subset(&acked));
    assert!(
        !s.agent.log().contains("e2e-webhook-token"),
        "the token reached the log"
    );
}

#[test]
fn both_forwarders_resume_from_their_progress_after_kill9() {
    if !e2e_enabled() {
        return;
    }
    let syslog = SyslogReceiver::start(0);
    let webhook = WebhookReceiver::start();
    let mut s = setup(
        "siem-both",
        73,
        &format!(
            "[audit.syslog]\naddress = \"127.0.0.1:{}\"\ntls = \"disable\"\n\
             [audit.webhook]\nurl = \"http://127.0.0.1:{}/\"\nbatch_size = 4\n",
            syslog.port, webhook.port
        ),
    );
    let syslog_seqs = || -> Vec<u64> {
        syslog
            .frames()
            .iter()
            .map(|f| parse_5424(f).sd["seq"].parse().unwrap())
            .collect()
    };
    let webhook_seqs = || -> Vec<u64> {
        webhook
            .requests()
            .iter()
            .filter(|r| r.status == 200)
            .flat_map(|r| r.lines.iter().map(|l| l["seq"].as_u64().unwrap()))
            .collect()
    };
    s.connect(5);
    s.local_records(5);
    let (n, _) = wait_all(&s.agent, syslog_seqs);
    wait_all(&s.agent, webhook_seqs);

    // Killed once everything it had was acknowledged and recorded as such: the restart
    // re-sends nothing and continues after each forwarder's own progress. (A kill between
    // the acknowledgement and the progress file would re-send that batch, by design.)
    let state = s.agent.dir.path().join("state");
    let progress = |file: &str| -> u64 {
        std::fs::read_to_string(state.join(file))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ["audit-syslog-shipped", "audit-webhook-shipped"]
        .iter()
        .any(|f| progress(f) < n)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    s.agent.kill9();
    for file in ["audit-syslog-shipped", "audit-webhook-shipped"] {
        assert_eq!(progress(file), n, "{file}");
    }
    s.agent.spawn();
    s.connect(5);
    s.local_records(10);
    for (name, seqs) in [
        ("syslog", &syslog_seqs as &dyn Fn() -> Vec<u64>),
        ("webhook", &webhook_seqs),
    ] {
        let (total, got) = wait_all(&s.agent, seqs);
        assert!(total > n, "{name}: events after the restart");
        assert_complete_in_order(total, &got, &s.agent.log());
        assert_eq!(
            got.len() as u64,
            total,
            "{name}: re-sent after kill -9: {got:?}"
        );
    }
}

/// A CA and a `localhost` server certificate it signs, made with the openssl CLI.
fn tls_material(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the TLS test needs the openssl CLI");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=portcullis-e2e-ca",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    ]);
}

#[test]
fn syslog_over_tls_verifies_the_receiver_and_delivers_every_record() {
    if !e2e_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    tls_material(dir.path());
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // `openssl s_server -quiet` writes what it receives to stdout: the octet-counted frames.
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-cert", "srv.pem", "-key", "srv.key"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let received = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut stdout = server.stdout.take().unwrap();
    let sink = Arc::clone(&received);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 65536];
        while let Ok(n) = stdout.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    let s = setup(
        "siem-tls",
        74,
        &format!(
            "[audit.syslog]\naddress = \"127.0.0.1:{port}\"\ntls = \"require\"\n\
             server_name = \"localhost\"\nca_file = \"{}\"\n",
            dir.path().join("ca.pem").display()
        ),
    );
    s.connect(5);
    s.local_records(5);
    let frames = || -> Vec<String> {
        let mut buf = received.lock().unwrap().clone();
        let mut out = Vec::new();
        while let Some(sp) = buf.iter().position(|b| *b == b' ') {
            let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
            if buf.len() < sp + 1 + len {
                break;
            }
            out.push(String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap());
            buf.drain(..sp + 1 + len);
        }
        out
    };
    let (n, got) = wait_all(&s.agent, || {
        frames()
            .iter()
            .map(|f| parse_5424(f).sd["seq"].parse().unwrap())
            .collect()
    });
    let _ = server.kill();
    let _ = server.wait();
    assert_complete_in_order(n, &got, &s.agent.log());
    assert_eq!(got.len() as u64, n);
    let local = s.agent.events();
    for f in frames() {
        let p = parse_5424(&f);
        let seq: usize = p.sd["seq"].parse().unwrap();
        assert_eq!(p.msg, local[seq - 1]);
    }
}

/// `openssl s_server` on 127.0.0.1:`port` with the given certificate, collecting what it
/// receives after the handshake (nothing, when the agent refuses the certificate).
struct TlsReceiver {
    child: std::process::Child,
    received: Arc<Mutex<Vec<u8>>>,
}

impl TlsReceiver {
    fn start(port: u16, (cert, key): (std::path::PathBuf, std::path::PathBuf)) -> Self {
        let mut child = std::process::Command::new("openssl")
            .args(["s_server", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut chunk = [0u8; 65536];
            while let Ok(n) = stdout.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s_server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, received }
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }
}

impl Drop for TlsReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the agent's log has more lines with both `a` and `b` than `before`.
fn wait_log_lines(agent: &Agent, a: &str, b: &str, before: usize) -> usize {
    let count = || {
        agent
            .log()
            .lines()
            .filter(|l| l.contains(a) && l.contains(b))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count() <= before {
        assert!(
            Instant::now() < deadline,
            "no log line with `{a}` and `{b}`:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    count()
}

#[test]
fn forwarders_refuse_receivers_with_a_wrong_ca_name_or_expired_certificate() {
    if !e2e_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    portcullis_e2e::postgres::make_test_certificates(dir.path());
    let free = || {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (syslog_port, webhook_port) = (free(), free());
    let ca = dir.path().join("ca.pem");
    let slot = Slot::new(117);
    let cg = TestCgroup::new("siem-badtls");
    let server = EchoServer::start(&[slot.v4(1)]);
    let v4 = slot.v4(1).ip().to_string();
    let extra = format!(
        "[insecure]\nunix_identity_only = true\n\
         [audit.syslog]\naddress = \"127.0.0.1:{syslog_port}\"\ntls = \"require\"\n\
         server_name = \"localhost\"\nca_file = \"{ca}\"\n\
         [audit.webhook]\nurl = \"https://127.0.0.1:{webhook_port}/ingest\"\ntimeout_secs = 2\n",
        ca = ca.display()
    );
    // The webhook trusts the system's roots; SSL_CERT_FILE makes the test CA the only one.
    let ca_env = ca.display().to_string();
    let agent = Agent::start_with(
        "siem-badtls",
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
        Some(&extra),
        &[("SSL_CERT_FILE", ca_env.as_str())],
    );
    let s = Setup {
        agent,
        cg,
        slot,
        _server: server,
    };
    s.connect(3);
    s.local_records(3);
    // What rustls names for each, in each forwarder's warning. The forwarders retry with
    // backoff, so each certificate is served until both have met it.
    let cases = [
        (BadCertificate::WrongCa, "UnknownIssuer"),
        (BadCertificate::WrongName, "not valid for name"),
        (BadCertificate::Expired, "Expired"),
    ];
    for (bad, needle) in cases {
        let count = |sink: &str| {
            s.agent
                .log()
                .lines()
                .filter(|l| l.contains(sink) && l.contains(needle))
                .count()
        };
        let (syslog_seen, webhook_seen) = (count("syslog"), count("webhook request failed"));
        let syslog = TlsReceiver::start(syslog_port, bad.files(dir.path()));
        let webhook = TlsReceiver::start(webhook_port, bad.files(dir.path()));
        wait_log_lines(&s.agent, "syslog", needle, syslog_seen);
        wait_log_lines(&s.agent, "webhook request failed", needle, webhook_seen);
        assert_eq!(syslog.received(), "", "{bad:?}: syslog delivered nothing");
        assert_eq!(webhook.received(), "", "{bad:?}: webhook delivered nothing");
    }
    // With the good certificate both deliver: the refusals were the certificates'.
    let good = (dir.path().join("server.crt"), dir.path().join("server.key"));
    let syslog = TlsReceiver::start(syslog_port, good.clone());
    let webhook = TlsReceiver::start(webhook_port, good);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(syslog.received().contains("agent.started")
        && webhook.received().starts_with("POST /ingest"))
    {
        assert!(
            Instant::now() < deadline,
            "nothing delivered with the good certificate: syslog {:?}, webhook {:?}\n{}",
            syslog.received(),
            webhook.received(),
            s.agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
