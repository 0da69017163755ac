//! Targets reachable under several addresses: a list of addresses, a DNS host whose records
//! are protected (at start, when their TTL runs out, on SIGHUP), and the start-up warning
//! about a protected service listening on an address no target lists. Real agent, real
//! eBPF redirect, a DNS server of the test's own on loopback; loopback addresses only.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed expectation should stop the test loudly"
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_e2e::{e2e_enabled, Agent, EchoServer, Probe, Slot, TestCgroup};
use serde_json::Value;

fn via_proxy(r: &Value) -> bool {
    r["ok"] == true && r["via_proxy"] == true
}

fn direct(r: &Value) -> bool {
    r["ok"] == true && r["via_proxy"] == false
}

/// The test's DNS server (tests/scripts/dns_server.py), killed on drop.
struct DnsServer {
    child: Child,
    addr: SocketAddr,
    zone: std::path::PathBuf,
}

impl DnsServer {
    fn start(dir: &Path, addr: SocketAddr) -> Self {
        let zone = dir.join("zone.json");
        std::fs::write(&zone, "{}").unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dns_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(&zone)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the DNS server did not start");
        Self { child, addr, zone }
    }

    /// Replaces the zone atomically (the server reads it for every query).
    fn serve(&self, name: &str, a: &[&str], ttl: u32) {
        let zone = serde_json::json!({ format!("{name}."): { "A": a, "ttl": ttl } });
        let staged = self.zone.with_extension("staged");
        std::fs::write(&staged, zone.to_string()).unwrap();
        std::fs::rename(&staged, &self.zone).unwrap();
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent whose one target lists `addresses` and names `host`, resolved by `dns`.
fn host_target_agent(
    name: &str,
    slot: Slot,
    cg: &TestCgroup,
    dns: &DnsServer,
    host: &str,
    addresses: &[String],
    ttl_bounds: (u64, u64),
) -> Agent {
    let list = addresses
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let extra = format!(
        "[insecure]\nunix_identity_only = true\n\
         [dns]\nnameservers = [\"{ns}\"]\nmin_ttl_secs = {min}\nmax_ttl_secs = {max}\n\
         [[target]]\nname = \"db\"\nprotocol = \"tcp\"\nhost = \"{host}\"\naddresses = [{list}]\nport = {port}\n",
        ns = dns.addr,
        min = ttl_bounds.0,
        max = ttl_bounds.1,
        port = slot.server_port,
    );
    let mut agent = Agent::prepare(name, slot, cg, &[], Some(&extra), &[]);
    agent.spawn();
    agent
}

/// Waits until `n` address changes are recorded.
fn wait_changes(agent: &Agent, n: usize) -> Vec<Value> {
    let changes = agent.wait_events("target.addresses_changed", n);
    assert!(
        changes.len() >= n,
        "expected {n} address changes, got {changes:?}\n{}",
        agent.log()
    );
    changes
}

#[test]
fn every_listed_address_and_every_address_of_a_dns_host_is_protected_and_follows_the_ttl() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(130);
    let cg = TestCgroup::new("dns-ttl");
    let files = tempfile::tempdir().unwrap();
    let first = slot.v4(1);
    let second = slot.v4(2);
    let listed = slot.v4(3);
    let _server = EchoServer::start(&[first, second, listed]);
    let dns = DnsServer::start(
        files.path(),
        format!("127.0.0.1:{}", 53000 + 130).parse().unwrap(),
    );
    let host = "db.portcullis-e2e.test";
    dns.serve(host, &[&first.ip().to_string()], 1);
    let agent = host_target_agent(
        "dns-ttl",
        slot,
        &cg,
        &dns,
        host,
        &[listed.ip().to_string()],
        (1, 2),
    );
    let probe = Probe {
        cgroup: &cg,
        uid: 41130,
        netns: None,
    };
    assert!(via_proxy(&probe.connect(first, &[])), "the host's address");
    assert!(via_proxy(&probe.connect(listed, &[])), "a listed address");
    assert!(direct(&probe.connect(second, &[])), "not (yet) the host's");
    let status = agent.status();
    let shown = status["targets"][0]["address"].as_str().unwrap();
    assert!(
        shown.contains(&listed.ip().to_string()) && shown.contains(&first.ip().to_string()),
        "status names the listed and the resolved addresses: {shown}"
    );

    // The record moves; once its 1 s TTL runs out the agent asks again and follows it.
    dns.serve(host, &[&second.ip().to_string()], 1);
    let changes = wait_changes(&agent, 1);
    let reason = changes[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("added: {}", second.ip()))
            && reason.contains(&format!("removed: {}", first.ip())),
        "{reason}"
    );
    assert_eq!(changes[0]["target"], "db");
    assert!(via_proxy(&probe.connect(second, &[])), "the new address");
    assert!(
        direct(&probe.connect(first, &[])),
        "the old address is no longer the host's"
    );
    assert!(
        via_proxy(&probe.connect(listed, &[])),
        "the listed address stays"
    );

    // A resolver outage keeps what is protected.
    dns.serve("other.portcullis-e2e.test", &["127.0.0.1"], 1);
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        assert!(
            via_proxy(&probe.connect(second, &[])),
            "NXDOMAIN removed protection"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        agent.log().contains("DNS lookup failed"),
        "the failed lookup is logged:\n{}",
        agent.log()
    );
    assert_eq!(agent.events_of("target.addresses_changed").len(), 1);
}

#[test]
fn sighup_resolves_a_host_again_before_its_ttl_runs_out() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(131);
    let cg = TestCgroup::new("dns-hup");
    let files = tempfile::tempdir().unwrap();
    let first = slot.v4(1);
    let second = slot.v4(2);
    let _server = EchoServer::start(&[first, second]);
    let dns = DnsServer::start(
        files.path(),
        format!("127.0.0.1:{}", 53000 + 131).parse().unwrap(),
    );
    let host = "db.portcullis-e2e.test";
    dns.serve(host, &[&first.ip().to_string()], 3600);
    let agent = host_target_agent("dns-hup", slot, &cg, &dns, host, &[], (3600, 3600));
    let probe = Probe {
        cgroup: &cg,
        uid: 41131,
        netns: None,
    };
    assert!(via_proxy(&probe.connect(first, &[])));
    dns.serve(
        host,
        &[&first.ip().to_string(), &second.ip().to_string()],
        3600,
    );
    assert!(
        direct(&probe.connect(second, &[])),
        "the hour-long TTL has not run out"
    );
    // std can send SIGKILL only; the agent must get SIGHUP.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let changes = wait_changes(&agent, 1);
    assert!(
        changes[0]["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("added: {}", second.ip())),
        "{changes:?}"
    );
    assert!(via_proxy(&probe.connect(second, &[])));
    assert!(via_proxy(&probe.connect(first, &[])));
}

#[test]
fn a_host_that_does_not_resolve_stops_the_start_with_its_name() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(132);
    let cg = TestCgroup::new("dns-nx");
    let files = tempfile::tempdir().unwrap();
    let dns = DnsServer::start(
        files.path(),
        format!("127.0.0.1:{}", 53000 + 132).parse().unwrap(),
    );
    let extra = format!(
        "[insecure]\nunix_identity_only = true\n[dns]\nnameservers = [\"{}\"]\n\
         [[target]]\nname = \"db\"\nprotocol = \"tcp\"\nhost = \"missing.portcullis-e2e.test\"\nport = {}\n",
        dns.addr, slot.server_port
    );
    let agent = Agent::prepare("dns-nx", slot, &cg, &[], Some(&extra), &[]);
    let out = Command::new(portcullis_e2e::agent_bin())
        .args(["agent", "--config"])
        .arg(&agent.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the agent must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("target `db`") && err.contains("missing.portcullis-e2e.test"),
        "{err}"
    );
    assert!(!agent.pin_dir.exists(), "nothing was attached");
}

#[test]
fn a_protected_port_served_on_an_unlisted_local_address_is_warned_about() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(133);
    let cg = TestCgroup::new("exposed");
    // The service listens on every address; the target lists one of them.
    let wildcard: SocketAddr = format!("0.0.0.0:{}", slot.server_port).parse().unwrap();
    let _server = EchoServer::start(&[wildcard]);
    let protected = slot.v4(1).ip().to_string();
    let agent = Agent::start(
        "exposed",
        slot,
        &cg,
        &[portcullis_e2e::Target {
            name: "db",
            address: "127.0.0.1",
            port: slot.server_port,
            upstream: None,
        }],
    );
    let log = agent.log();
    assert!(
        log.contains("listens on an address the target does not list")
            && log.contains(&format!("0.0.0.0:{}", slot.server_port)),
        "{log}"
    );
    // The warning is about a real hole: another local address reaches the service directly.
    let probe = Probe {
        cgroup: &cg,
        uid: 41133,
        netns: None,
    };
    assert!(via_proxy(&probe.connect(
        format!("127.0.0.1:{}", slot.server_port).parse().unwrap(),
        &[]
    )));
    assert!(
        direct(&probe.connect(slot.v4(1), &[])),
        "{protected} is not listed"
    );
}
