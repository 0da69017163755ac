//! Policy end to end: the agent decides every redirected connection with the Cedar policy
//! set in its policy directory, reloads it on SIGHUP and on file changes without dropping
//! open connections, and never replaces a good set with a bad one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_e2e::{e2e_enabled, Agent, EchoServer, Fixture, Probe, Slot, Target, TestCgroup};
use serde_json::Value;

/// Replaces the policy files without a moment in which a half-written set is visible:
/// each new file is renamed into place, then the files no longer wanted are removed.
fn write_policies(agent: &Agent, files: &[(&str, &str)]) {
    let dir = agent.dir.path().join("policies");
    for (name, text) in files {
        let staged = dir.join(format!(".{name}.staged"));
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, dir.join(name)).unwrap();
    }
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if !files.iter().any(|(n, _)| *n == name) {
            std::fs::remove_file(path).unwrap();
        }
    }
}

fn sighup(agent: &Agent) {
    Command::new("kill")
        .args(["-HUP", &agent.pid().to_string()])
        .status()
        .unwrap();
}

/// Waits for a reload past generation `from` that holds `policies` policies (the final set,
/// not an intermediate one the file watcher may have seen), or for a refused reload.
fn wait_reload(agent: &Agent, from: u64, policies: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = agent.status();
        let p = &s["policy"];
        if !p["last_error"].is_null()
            || (p["generation"].as_u64().unwrap() > from
                && p["policies"].as_u64() == Some(policies))
        {
            return p.clone();
        }
        assert!(Instant::now() < deadline, "no reload: {p}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const OPS: &str = r#"
@id("ops-connect")
permit (
    principal,
    action == Portcullis::Action::"connect",
    resource
) when { principal == Portcullis::User::"unix:46001" || principal == Portcullis::User::"unix:46002" };

@id("no-prod-for-46002")
@description("46002 never reaches production")
forbid (
    principal == Portcullis::User::"unix:46002",
    action == Portcullis::Action::"connect",
    resource
) when { resource.hasTag("environment") && resource.getTag("environment") == "production" };

@id("approval-for-46004")
@approval("dba-leads")
permit (
    principal == Portcullis::User::"unix:46004",
    action == Portcullis::Action::"connect",
    resource
);
"#;

#[test]
fn connections_are_decided_by_policy_and_forbid_wins() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(40);
    let cg = TestCgroup::new("policy-decide");
    let _server = EchoServer::start(&[slot.v4(1)]);
    let v4 = slot.v4(1).ip().to_string();
    let agent = start_with_label(&cg, slot, &v4, "production");
    write_policies(&agent, &[("ops.cedar", OPS)]);
    let g = agent.status()["policy"]["generation"].as_u64().unwrap();
    sighup(&agent);
    let p = wait_reload(&agent, g, 3);
    assert!(p["last_error"].is_null(), "{p}");

    let allowed = Probe {
        cgroup: &cg,
        uid: 46001,
        netns: None,
    };
    let r = allowed.connect(slot.v4(1), &[]);
    assert_eq!(r["via_proxy"], true, "{r}");
    let opened = agent.wait_events("connection.opened", 1);
    assert_eq!(opened[0]["decision"], "allow");
    assert_eq!(opened[0]["policy_ids"], serde_json::json!(["ops-connect"]));

    let forbidden = Probe {
        cgroup: &cg,
        uid: 46002,
        netns: None,
    };
    assert_eq!(
        forbidden.connect(slot.v4(1), &[])["ok"],
        false,
        "forbid wins over permit"
    );
    let nobody = Probe {
        cgroup: &cg,
        uid: 46003,
        netns: None,
    };
    assert_eq!(nobody.connect(slot.v4(1), &[])["ok"], false, "default deny");
    let waits = Probe {
        cgroup: &cg,
        uid: 46004,
        netns: None,
    };
    assert_eq!(
        waits.connect(slot.v4(1), &[])["ok"],
        false,
        "approval needed"
    );

    let refused = agent.wait_events("connection.refused", 3);
    let by_uid = |uid: u64| {
        refused
            .iter()
            .find(|e| e["origin"]["uid"] == uid)
            .unwrap()
            .clone()
    };
    let e = by_uid(46002);
    assert_eq!(e["decision"], "deny");
    assert!(
        e["policy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == "no-prod-for-46002"),
        "{e}"
    );
    assert!(
        e["reason"]
            .as_str()
            .unwrap()
            .contains("never reaches production"),
        "{e}"
    );
    let e = by_uid(46003);
    assert_eq!(e["decision"], "deny");
    assert_eq!(e["policy_ids"], Value::Null, "nothing matched: {e}");
    let e = by_uid(46004);
    assert_eq!(e["decision"], "approval");
    assert!(e["reason"].as_str().unwrap().contains("dba-leads"), "{e}");
}

fn start_with_label(cg: &TestCgroup, slot: Slot, v4: &str, env: &str) -> Agent {
    let extra = "[insecure]\nunix_identity_only = true\n".to_string();
    let agent = Agent::start_with(
        "policy-decide",
        slot,
        cg,
        &[Target {
            name: "db",
            address: v4,
            port: slot.server_port,
            upstream: None,
        }],
        Some(&extra),
        &[],
    );
    // The harness writes no labels: add one to the (last) target and restart with it.
    let text = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        format!("{text}labels = {{ environment = \"{env}\" }}\n"),
    )
    .unwrap();
    let mut agent = agent;
    agent.kill9();
    agent.spawn();
    agent
}

#[test]
fn reload_on_sighup_and_on_file_change_keeps_open_connections() {
    if !e2e_enabled() {
        return;
    }
    let Fixture {
        slot,
        cg,
        server: _server,
        agent,
    } = Fixture::new("policy-reload", 41);
    let only = |uid: u32| {
        format!("@id(\"only-{uid}\")\npermit (principal == Portcullis::User::\"unix:{uid}\", action == Portcullis::Action::\"connect\", resource);\n")
    };
    write_policies(&agent, &[("p.cedar", &only(46011))]);
    let g = agent.status()["policy"]["generation"].as_u64().unwrap();
    sighup(&agent);
    assert!(wait_reload(&agent, g, 1)["last_error"].is_null());

    let first = Probe {
        cgroup: &cg,
        uid: 46011,
        netns: None,
    };
    let mut session = first
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

    // Swap to a set that allows only 46012: by SIGHUP.
    let g = agent.status()["policy"]["generation"].as_u64().unwrap();
    write_policies(&agent, &[("p.cedar", &only(46012))]);
    sighup(&agent);
    assert!(wait_reload(&agent, g, 1)["last_error"].is_null());
    let second = Probe {
        cgroup: &cg,
        uid: 46012,
        netns: None,
    };
    assert_eq!(second.connect(slot.v4(1), &[])["via_proxy"], true);
    // New decisions use the new set: 46011 is now refused by policy, by default deny.
    let refused = agent.expect_refusal(&first, slot.v4(1), "denied by policy");
    assert_eq!(refused["decision"], "deny", "{refused}");
    assert_eq!(
        refused["policy_ids"],
        Value::Null,
        "nothing matched: {refused}"
    );
    writeln!(input, "still open").unwrap();
    assert_eq!(
        read()["reply"],
        "still open",
        "a reload does not drop open connections"
    );

    // And back, by editing the file only: the agent notices the change.
    let g = agent.status()["policy"]["generation"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    write_policies(&agent, &[("p.cedar", &only(46011))]);
    assert!(wait_reload(&agent, g, 1)["last_error"].is_null());
    assert_eq!(first.connect(slot.v4(1), &[])["via_proxy"], true);
    assert!(agent.events_of("policy.reloaded").len() >= 3);
    drop(input);
    session.wait().unwrap();
}

#[test]
fn a_bad_policy_file_never_replaces_the_good_set() {
    if !e2e_enabled() {
        return;
    }
    let Fixture {
        slot,
        cg,
        server: _server,
        agent,
    } = Fixture::new("policy-bad", 42);
    let user = Probe {
        cgroup: &cg,
        uid: 46021,
        netns: None,
    };
    assert_eq!(user.connect(slot.v4(1), &[])["via_proxy"], true);
    let g = agent.status()["policy"]["generation"].as_u64().unwrap();
    std::fs::write(
        agent.dir.path().join("policies/broken.cedar"),
        "@id(\"broken\")\npermit (\n    principal == Portcullis::Usr::\"x\",\n    action,\n    resource\n);\n",
    )
    .unwrap();
    sighup(&agent);
    let p = wait_reload(&agent, g, 0);
    let err = p["last_error"].as_str().unwrap();
    assert!(
        err.contains("broken.cedar") && err.contains("line 3"),
        "{err}"
    );
    assert_eq!(
        p["generation"].as_u64().unwrap(),
        g,
        "the good set stays in force"
    );
    assert_eq!(
        user.connect(slot.v4(1), &[])["via_proxy"],
        true,
        "decisions still use the good set"
    );
    assert_eq!(agent.events_of("policy.reload_failed").len(), 1);
    let text = Command::new(portcullis_e2e::agent_bin())
        .args(["status", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("LAST RELOAD REFUSED"));
}

#[test]
fn policy_check_and_explain_work_offline() {
    let bin = portcullis_e2e::agent_bin();
    if !bin.is_file() {
        assert!(
            !e2e_enabled(),
            "the agent binary must exist under cargo xtask test"
        );
        return;
    }
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/examples");
    // Every example set, so a new one cannot ship without passing the check.
    let sets: Vec<_> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(sets.len() >= 6, "{sets:?}");
    for set in sets {
        let out = Command::new(&bin)
            .args(["policy", "check"])
            .arg(&set)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            set.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.cedar"),
        "@id(\"x\")\npermit(principal, action, resource)\nwhen { 1 + };\n",
    )
    .unwrap();
    let out = Command::new(&bin)
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.cedar"));

    // explain: a config naming a production target, the production-changes examples.
    let cfg = dir.path().join("portcullis.toml");
    let mut f = std::fs::File::create(&cfg).unwrap();
    writeln!(
        f,
        "[[target]]\nname = \"billing-db\"\nprotocol = \"tcp\"\naddress = \"127.0.0.9\"\nport = 5432\nlabels = {{ environment = \"production\" }}"
    )
    .unwrap();
    let out = Command::new(&bin)
        .args(["policy", "explain", "--config"])
        .arg(&cfg)
        .arg("--policy-dir")
        .arg(examples.join("production-changes"))
        .args(["--user", "nobody-in-particular", "--target", "billing-db"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (decision, decided) = explained(&text);
    assert_eq!(decision, "deny", "{text}");
    assert!(text.contains("denied by default"), "{text}");
    assert!(
        decided.is_empty(),
        "no policy decides a default deny: {text}"
    );
    assert!(text.contains("policies considered (11):"), "{text}");

    // explain --sql classifies as the proxy does, one explanation per statement.
    let out = Command::new(&bin)
        .args(["policy", "explain", "--config"])
        .arg(&cfg)
        .arg("--policy-dir")
        .arg(examples.join("production-changes"))
        .args([
            "--user",
            "alice",
            "--group",
            "dba",
            "--group",
            "engineers",
            "--target",
            "billing-db",
        ])
        .args(["--db-user", "app", "--db-name", "billing"])
        .args(["--sql", "SELECT 1; DROP DATABASE billing"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each statement is decided on its own: the read by the engineers' permit, the DROP
    // by the guardrail's forbid, which wins over the DBAs' change-window permit at any hour.
    let (first, second) = text
        .split_once("-- statement 2: DROP DATABASE billing\n")
        .unwrap_or_else(|| panic!("two explanations: {text}"));
    assert!(first.starts_with("-- statement 1: SELECT 1\n"), "{text}");
    assert_eq!(
        explained(first),
        ("allow", vec!["engineers-read"]),
        "{text}"
    );
    assert_eq!(
        explained(second),
        ("deny", vec!["no-drop-database-production"]),
        "{text}"
    );
    let out = Command::new(&bin)
        .args(["policy", "explain", "--config"])
        .arg(&cfg)
        .args([
            "--user",
            "alice",
            "--target",
            "billing-db",
            "--sql",
            "SELEC 1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not parse"));
}

/// The decision of one `policy explain` explanation and the ids of the policies that
/// decided it (`satisfied; decided`).
fn explained(text: &str) -> (&str, Vec<&str>) {
    let decision = text
        .lines()
        .find_map(|l| l.strip_prefix("decision: "))
        .unwrap_or_else(|| panic!("no decision line: {text}"));
    let decided = text
        .lines()
        .filter(|l| l.ends_with("): satisfied; decided"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    (decision, decided)
}

#[test]
fn the_agent_refuses_to_start_with_an_invalid_policy_set() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(43);
    let dir = tempfile::tempdir().unwrap();
    let cg = portcullis_e2e::cgroup2_root()
        .unwrap()
        .join("portcullis-e2e")
        .join("policy-start");
    std::fs::create_dir_all(dir.path().join("policies")).unwrap();
    std::fs::write(
        dir.path().join("policies/x.cedar"),
        "permit(principal, action, resource);\n",
    )
    .unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        Agent::config_text(dir.path(), "policy-start", slot, &cg, &[]),
    )
    .unwrap();
    let out = Command::new(portcullis_e2e::agent_bin())
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("x.cedar") && err.contains("@id"), "{err}");
    let _ = std::fs::remove_dir(&cg);
}
