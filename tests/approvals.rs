//! Just-in-time approvals end to end: a real OpenID Provider (oidc-provider under Node.js),
//! the real agent, `portcullis request|approvals|grants` run as unprivileged users with their
//! own logins, and connections through the real kernel redirect that a grant lets through
//! (or not). Slots 14, 15, 173–185 and 191–194.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use portcullis_e2e::oidc::{self, craft_jwt, OidcOptions, OidcProvider, OidcUser, Signing, Ttls};
use portcullis_e2e::postgres::{self as pg, client_command, PgOptions, Postgres, RunAs};
use portcullis_e2e::{e2e_enabled, Agent, EchoServer, Held, Probe, Slot, Target, TestCgroup};
use serde_json::{json, Value};

fn enabled() -> bool {
    e2e_enabled() && oidc::oidc_enabled()
}

const CI_AUDIENCE: &str = "portcullis-ci";

/// alice asks; bob approves for dba-leads, carol for security; dave is in both; alice is in
/// dba-leads herself, which must not let her approve her own request.
fn people() -> OidcOptions {
    OidcOptions {
        users: vec![
            OidcUser::new("alice", &["engineering", "dba-leads"]),
            OidcUser::new("bob", &["dba-leads"]),
            OidcUser::new("carol", &["security"]),
            OidcUser::new("dave", &["dba-leads", "security"]),
        ],
        ..OidcOptions::default()
    }
}

fn connect_needs(annotations: &str) -> String {
    format!(
        "@id(\"db-with-approval\")\n{annotations}\npermit (principal, action == Portcullis::Action::\"connect\", resource);\n"
    )
}

struct World {
    cg: TestCgroup,
    slot: Slot,
    _server: EchoServer,
    agent: Agent,
    provider: OidcProvider,
}

fn world(name: &str, n: u8, policy: &str) -> World {
    world_with_target(name, n, policy, "")
}

/// [`world`] with `target_extra` (settings of the target `db`, one per line).
fn world_with_target(name: &str, n: u8, policy: &str, target_extra: &str) -> World {
    world_of(name, n, policy, target_extra, people())
}

/// [`world_with_target`] with the provider's people and token lifetimes.
fn world_of(name: &str, n: u8, policy: &str, target_extra: &str, people: OidcOptions) -> World {
    let provider = OidcProvider::start(people);
    let slot = Slot::new(n);
    let cg = TestCgroup::new(name);
    let server = EchoServer::start(&[slot.v4(1)]);
    let v4 = slot.v4(1).ip().to_string();
    let config = format!(
        "[identity]\nissuer = \"{iss}\"\nleeway_secs = 5\n\
         [[identity.trusted_issuer]]\nissuer = \"{iss}\"\naudience = \"{CI_AUDIENCE}\"\n\
         required_claims = {{ repository = \"acme/infra\" }}\n\
         [insecure]\nallow_plaintext_loopback = true\n",
        iss = provider.issuer()
    );
    let mut agent = Agent::prepare(
        name,
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
        Some(&config),
        &[],
    );
    std::fs::write(agent.dir.path().join("policies").join("e2e.cedar"), policy).unwrap();
    // The generated config ends with the target's table.
    let mut text = std::fs::read_to_string(&agent.config).unwrap();
    text.push_str(target_extra);
    std::fs::write(&agent.config, text).unwrap();
    agent.spawn();
    World {
        cg,
        slot,
        _server: server,
        agent,
        provider,
    }
}

fn cli(agent: &Agent, uid: u32, args: &[&str]) -> Command {
    agent.cli_as(uid, args)
}

fn run(agent: &Agent, uid: u32, args: &[&str]) -> Output {
    cli(agent, uid, args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn login(w: &World, uid: u32, user: &str) {
    login_to(&w.agent, &w.provider, uid, user);
}

/// Runs `portcullis login` as `uid` and finishes the device flow in "the browser" as `user`.
fn login_to(agent: &Agent, provider: &OidcProvider, uid: u32, user: &str) {
    provider.login(agent, uid, user);
}

/// Logs `uid` in as a CI workload whose token also claims the approver groups.
fn login_ci(w: &World, uid: u32) {
    let now = portcullis_e2e::now_secs();
    let claims = json!({
        "iss": w.provider.issuer(), "aud": CI_AUDIENCE, "sub": "repo:acme/infra:ref:refs/heads/main",
        "repository": "acme/infra", "run_id": "9876", "run_attempt": "2",
        "groups": ["dba-leads", "security"], "iat": now, "exp": now + 600,
    });
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": w.provider.kid()});
    let token = craft_jwt(
        &header,
        &claims,
        Signing::Rs256 {
            private_pem: w.provider.signing_key_pem(),
        },
    );
    let mut child = cli(&w.agent, uid, &["login", "--token-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "CI login: {}", text(&o));
}

/// `portcullis request db --for … --reason …` as `uid`; the request's JSON.
fn request(w: &World, uid: u32, duration: &str) -> Value {
    let o = run(
        &w.agent,
        uid,
        &[
            "request", "db", "--for", duration, "--reason", "INC-4711", "--json",
        ],
    );
    assert!(o.status.success(), "request: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn show(agent: &Agent, uid: u32, id: &str) -> Value {
    let o = run(agent, uid, &["approvals", "show", id, "--json"]);
    assert!(o.status.success(), "show {id}: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn approve(agent: &Agent, uid: u32, id: &str) -> Output {
    run(
        agent,
        uid,
        &["approvals", "approve", id, "--reason", "looks right"],
    )
}

fn probe(w: &World, uid: u32) -> Probe<'_> {
    Probe {
        cgroup: &w.cg,
        uid,
        netns: None,
    }
}

fn via_proxy(r: &Value) -> bool {
    r["ok"] == true && r["via_proxy"] == true
}

/// The request id a refusal names (`request r-0123456789 asks for …`).
fn request_id_in(reason: &str) -> String {
    let at = reason.find("request r-").expect(reason) + "request ".len();
    reason[at..at + 12].to_string()
}

#[test]
fn a_grant_lets_connections_through_and_revocation_ends_an_open_session() {
    if !enabled() {
        return;
    }
    let w = world(
        "appr-grant",
        173,
        &connect_needs("@approval(\"dba-leads\")"),
    );
    let (alice, bob, carol) = (48173, 48174, 48175);
    login(&w, alice, "alice");
    login(&w, bob, "bob");
    login(&w, carol, "carol");

    // Without a grant the connect is refused, naming the request made for it.
    let refused = w.agent.expect_refusal(
        &probe(&w, alice),
        w.slot.v4(1),
        "approval required: request r-",
    );
    assert_eq!(refused["decision"], "approval", "{refused}");
    let id = request_id_in(refused["reason"].as_str().unwrap());
    // A retry waits on the same request rather than making another.
    let again = w.agent.expect_refusal(&probe(&w, alice), w.slot.v4(1), &id);
    assert_eq!(request_id_in(again["reason"].as_str().unwrap()), id);
    let r = show(&w.agent, alice, &id);
    assert_eq!(r["state"], "pending", "{r}");
    assert_eq!(r["requester"]["subject"], "alice", "{r}");
    assert_eq!(r["asked"]["actions"], json!(["connect"]), "{r}");

    // Root sees every request but has no bypass: without a login of its own in the group,
    // its approval is refused.
    assert_eq!(show(&w.agent, 0, &id)["state"], "pending");
    let o = approve(&w.agent, 0, &id);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("portcullis login"), "{}", text(&o));
    // Someone outside the group is told so and counts for nothing.
    let o = approve(&w.agent, carol, &id);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no approval request"), "{}", text(&o));
    let o = approve(&w.agent, bob, &id);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("approved: grant g-"), "{}", text(&o));
    let grant = show(&w.agent, bob, &id)["grant_id"]
        .as_str()
        .unwrap()
        .to_string();

    // The grant lets alice through, and only alice.
    let mut held = Held::open(&probe(&w, alice), w.slot.v4(1));
    assert_eq!(held.exchange("ping")["reply"], "ping");
    w.agent
        .expect_refusal(&probe(&w, carol), w.slot.v4(1), "approval required");
    let opened = w.agent.wait_events("connection.opened", 1);
    assert!(
        opened.iter().any(|e| e["policy_ids"]
            .as_array()
            .unwrap()
            .contains(&json!(format!("grant:{grant}")))),
        "{opened:?}"
    );
    assert!(!w.agent.wait_events("grant.used", 1).is_empty());
    let listed = run(&w.agent, alice, &["grants", "list", "--json"]);
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["id"], grant.as_str(), "{listed}");

    // Revocation closes the open session and refuses the next connect.
    let o = run(
        &w.agent,
        bob,
        &["grants", "revoke", &grant, "--reason", "incident over"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("1 open connection(s) closed"),
        "{}",
        text(&o)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = held.exchange("still there?");
        if r["ok"] == false || r["reply"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the revoked grant's session stays open: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed = w.agent.wait_events("connection.closed", 1);
    assert!(
        closed.iter().any(|e| e["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("grant {grant} revoked")))),
        "{closed:?}"
    );
    let revoked = w.agent.wait_events("grant.revoked", 1);
    assert_eq!(revoked[0]["grant_id"], grant.as_str(), "{revoked:?}");
    assert_eq!(revoked[0]["requester"], "alice@example.test", "{revoked:?}");
    assert_eq!(revoked[0]["approvers"], json!(["bob"]), "{revoked:?}");
    w.agent
        .expect_refusal(&probe(&w, alice), w.slot.v4(1), "approval required");
    assert!(!via_proxy(&probe(&w, alice).connect(w.slot.v4(1), &[])));

    let requested = w.agent.events_of("approval.requested");
    assert_eq!(requested[0]["request_id"], id.as_str(), "{requested:?}");
    assert_eq!(
        requested[0]["required"],
        "1 approval from group `dba-leads`"
    );
    let approved = w.agent.events_of("approval.approved");
    assert_eq!(approved[0]["identity"]["subject"], "bob", "{approved:?}");
    assert_eq!(approved[0]["approval_state"], "approved", "{approved:?}");
    assert!(w.agent.verify_audit().status.success());
}

#[test]
fn a_grant_expires_and_its_open_session_ends() {
    if !enabled() {
        return;
    }
    let w = world(
        "appr-expiry",
        174,
        &connect_needs("@approval(\"dba-leads\")"),
    );
    let (alice, bob) = (48176, 48177);
    login(&w, alice, "alice");
    login(&w, bob, "bob");
    let r = request(&w, alice, "4s");
    let id = r["id"].as_str().unwrap();
    let o = approve(&w.agent, bob, id);
    assert!(o.status.success(), "{}", text(&o));
    let mut held = Held::open(&probe(&w, alice), w.slot.v4(1));
    assert_eq!(held.exchange("ping")["reply"], "ping");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = held.exchange("still there?");
        if r["ok"] == false || r["reply"].is_null() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the expired grant's session stays open: {r}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let expired = w.agent.wait_events("grant.expired", 1);
    assert!(
        expired[0]["reason"]
            .as_str()
            .unwrap()
            .contains("1 open connection(s) closed"),
        "{expired:?}"
    );
    w.agent
        .expect_refusal(&probe(&w, alice), w.slot.v4(1), "approval required");
}

#[test]
fn self_approval_the_same_person_twice_and_a_ci_identity_do_not_count() {
    if !enabled() {
        return;
    }
    let w = world(
        "appr-duties",
        175,
        &connect_needs("@approval(\"dba-leads\")\n@approvals(\"2\")"),
    );
    let (alice, bob, bob_again, ci, dave) = (48178, 48179, 48180, 48181, 48182);
    login(&w, alice, "alice");
    login(&w, bob, "bob");
    login(&w, bob_again, "bob");
    login(&w, dave, "dave");
    login_ci(&w, ci);
    let r = request(&w, alice, "1h");
    let id = r["id"].as_str().unwrap();
    assert_eq!(r["reason"], "INC-4711");

    // alice is in dba-leads, and still may not approve what she asked for.
    let o = approve(&w.agent, alice, id);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("segregation of duties"), "{}", text(&o));
    // A CI workload whose token claims the group may not approve.
    let o = approve(&w.agent, ci, id);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("CI workload"), "{}", text(&o));
    // It may ask, and its request names the pipeline run it came from.
    let from_ci = request(&w, ci, "30m");
    assert_eq!(
        from_ci["requester"]["name"], "acme/infra run 9876 (attempt 2)",
        "{from_ci}"
    );
    let asked = w
        .agent
        .wait_events("approval.requested", 2)
        .into_iter()
        .find(|e| e["request_id"] == from_ci["id"])
        .unwrap();
    assert_eq!(
        asked["requester"], "repo:acme/infra:ref:refs/heads/main (acme/infra run 9876 (attempt 2))",
        "{asked}"
    );
    // bob on two uids is one person.
    let o = approve(&w.agent, bob, id);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("still pending"), "{}", text(&o));
    let o = approve(&w.agent, bob_again, id);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("each person counts once"), "{}", text(&o));
    let r = show(&w.agent, alice, id);
    assert_eq!(r["state"], "pending", "{r}");
    w.agent
        .expect_refusal(&probe(&w, alice), w.slot.v4(1), "approval required");

    // The request survives a restart of the agent, still pending.
    let mut agent = w.agent;
    agent.kill9();
    agent.spawn();
    let w = World { agent, ..w };
    assert_eq!(show(&w.agent, alice, id)["state"], "pending");
    let o = approve(&w.agent, dave, id);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("approved: grant"), "{}", text(&o));
    let r = show(&w.agent, alice, id);
    assert_eq!(r["state"], "approved", "{r}");
    assert!(via_proxy(&probe(&w, alice).connect(w.slot.v4(1), &[])));
    // The refused attempts left no trace as approvals.
    let approved = w.agent.events_of("approval.approved");
    let subjects: Vec<&Value> = approved.iter().map(|e| &e["identity"]["subject"]).collect();
    assert_eq!(
        subjects,
        vec![&json!("bob"), &json!("dave")],
        "{approved:?}"
    );
}

#[test]
fn one_approval_from_each_of_two_groups_is_needed() {
    if !enabled() {
        return;
    }
    let w = world(
        "appr-and",
        176,
        &connect_needs("@approvals(\"dba-leads:1,security:1\")"),
    );
    let (alice, bob, carol, dave) = (48183, 48184, 48185, 48186);
    login(&w, alice, "alice");
    login(&w, bob, "bob");
    login(&w, carol, "carol");
    login(&w, dave, "dave");

    // dave is in both groups, and still one person: one place of two.
    let r = request(&w, alice, "1h");
    let id = r["id"].as_str().unwrap();
    let o = approve(&w.agent, dave, id);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("still pending"), "{}", text(&o));
    let o = approve(&w.agent, bob, id);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("approved: grant"), "{}", text(&o));
    assert!(via_proxy(&probe(&w, alice).connect(w.slot.v4(1), &[])));

    // A second request: dba-leads alone (bob) is not enough; security (carol) completes it.
    let o = run(&w.agent, alice, &["grants", "list", "--json"]);
    let grants: Value = serde_json::from_slice(&o.stdout).unwrap();
    let grant = grants[0]["id"].as_str().unwrap();
    let o = run(
        &w.agent,
        alice,
        &["grants", "revoke", grant, "--reason", "done"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let r = request(&w, alice, "2h");
    let id = r["id"].as_str().unwrap();
    let o = approve(&w.agent, bob, id);
    assert!(text(&o).contains("still pending"), "{}", text(&o));
    w.agent
        .expect_refusal(&probe(&w, alice), w.slot.v4(1), "approval required");
    let o = approve(&w.agent, carol, id);
    assert!(text(&o).contains("approved: grant"), "{}", text(&o));
    assert!(via_proxy(&probe(&w, alice).connect(w.slot.v4(1), &[])));
    let approved = w.agent.events_of("approval.approved");
    let last = approved.last().unwrap();
    assert_eq!(
        last["required"],
        "1 approval from group `dba-leads` and 1 approval from group `security`"
    );
    assert_eq!(last["approvers"], json!(["bob", "carol"]), "{last}");
}

#[test]
fn a_denied_request_gives_no_grant_and_says_why() {
    if !enabled() {
        return;
    }
    let w = world("appr-deny", 177, &connect_needs("@approval(\"dba-leads\")"));
    let (alice, bob) = (48187, 48188);
    login(&w, alice, "alice");
    login(&w, bob, "bob");
    let r = request(&w, alice, "1h");
    let id = r["id"].as_str().unwrap();
    let o = run(
        &w.agent,
        bob,
        &["approvals", "deny", id, "--reason", "not during the freeze"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let r = show(&w.agent, alice, id);
    assert_eq!(r["state"], "denied", "{r}");
    assert_eq!(r["verdicts"][0]["reason"], "not during the freeze", "{r}");
    let o = approve(&w.agent, bob, id);
    assert!(text(&o).contains("already denied"), "{}", text(&o));
    w.agent
        .expect_refusal(&probe(&w, alice), w.slot.v4(1), "approval required");
    let denied = w.agent.wait_events("approval.denied", 1);
    assert_eq!(denied[0]["reason"], "not during the freeze", "{denied:?}");
}

const STATEMENT_POLICIES: &str = r#"
@id("connect")
permit (principal, action == Portcullis::Action::"connect", resource);

@id("read")
permit (principal, action == Portcullis::Action::"query", resource)
when { ["read", "transaction", "utility"].contains(context.statement_class) };

@id("ddl-after-approval")
@approval("dba-leads")
permit (principal, action == Portcullis::Action::"query", resource)
when { context.statement_class == "ddl" };
"#;

/// Waits for an event of `kind` that `pick` chooses (statement events are written when the
/// writer's next batch goes out).
fn wait_event(agent: &Agent, kind: &str, pick: impl Fn(&Value) -> bool) -> Value {
    agent.wait_event(kind, pick)
}

/// Waits until `uid` sees a pending request other than those in `seen`; returns it.
fn next_pending(agent: &Agent, uid: u32, seen: &[String]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = run(agent, uid, &["approvals", "list", "--json"]);
        assert!(o.status.success(), "{}", text(&o));
        let list: Value = serde_json::from_slice(&o.stdout).unwrap();
        if let Some(r) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|r| !seen.contains(&r["id"].as_str().unwrap().to_string()))
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no pending request for uid {uid}:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_statement_waits_for_approval_then_runs_and_a_denied_one_gives_42501() {
    if !enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let PgWorld {
        provider,
        postgres,
        cg,
        agent,
        _files,
    } = pg_world("appr-stmt", 178, &[("e2e.cedar", STATEMENT_POLICIES)]);
    let (alice, bob) = (48189, 48190);
    login_to(&agent, &provider, alice, "alice");
    login_to(&agent, &provider, bob, "bob");

    // One psql session: a DDL statement that waits and runs once approved, one that is
    // denied, and a query after it in the same session.
    let conninfo = conninfo(&postgres);
    let mut psql = client_command(
        "psql",
        RunAs {
            uid: Some(alice),
            cgroup: Some(&cg.path),
        },
    )
    .args(["-X", "-A", "-t", "-v", "VERBOSITY=verbose", "-d", &conninfo])
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    psql.stdin
        .take()
        .unwrap()
        .write_all(
            b"CREATE TABLE approved_t (id int);\n\
              SELECT 'created', count(*) FROM pg_tables WHERE tablename = 'approved_t';\n\
              DROP TABLE approved_t;\n\
              SELECT 'still here', count(*) FROM pg_tables WHERE tablename = 'approved_t';\n",
        )
        .unwrap();

    let create = next_pending(&agent, bob, &[]);
    assert_eq!(create["asked"]["kind"], "statement", "{create}");
    assert!(
        create["asked"]["statement"]
            .as_str()
            .unwrap()
            .starts_with("CREATE TABLE approved_t (id int)"),
        "{create}"
    );
    assert_eq!(create["requester"]["subject"], "alice", "{create}");
    let create_id = create["id"].as_str().unwrap().to_string();
    // Nothing reached the server while it waited.
    assert!(
        !postgres
            .psql("app", "SELECT tablename FROM pg_tables")
            .contains("approved_t"),
        "the waiting statement ran"
    );
    let o = approve(&agent, bob, &create_id);
    assert!(o.status.success(), "{}", text(&o));

    let drop = next_pending(&agent, bob, std::slice::from_ref(&create_id));
    assert!(
        drop["asked"]["statement"]
            .as_str()
            .unwrap()
            .starts_with("DROP TABLE approved_t"),
        "{drop}"
    );
    let drop_id = drop["id"].as_str().unwrap().to_string();
    let o = run(
        &agent,
        bob,
        &["approvals", "deny", &drop_id, "--reason", "keep the table"],
    );
    assert!(o.status.success(), "{}", text(&o));

    let out = psql.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        stderr.contains(&format!(
            "NOTICE:  01000: Portcullis: this statement waits for approval: request {create_id}"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("portcullis approvals approve {create_id}")),
        "{stderr}"
    );
    assert!(stdout.contains("created|1"), "{stdout}\n{stderr}");
    assert!(stderr.contains("ERROR:  42501"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "approval request {drop_id} was denied by bob@example.test: keep the table"
        )),
        "{stderr}"
    );
    assert!(stdout.contains("still here|1"), "{stdout}\n{stderr}");

    let ran = wait_event(&agent, "statement.executed", |e| {
        e["statement"]
            .as_str()
            .is_some_and(|t| t.starts_with("CREATE TABLE approved_t"))
    });
    assert!(
        ran["policy_ids"]
            .as_array()
            .unwrap()
            .contains(&json!(format!("approval:{create_id}"))),
        "{ran}"
    );
    wait_event(&agent, "statement.denied", |e| {
        e["statement"]
            .as_str()
            .is_some_and(|t| t.starts_with("DROP TABLE approved_t"))
            && e["decision"] == "approval"
    });
    // A client that goes away while its statement waits ends its session then, not at the
    // request's timeout.
    let mut gone = client_command(
        "psql",
        RunAs {
            uid: Some(alice),
            cgroup: Some(&cg.path),
        },
    )
    .args(["-X", "-d", &conninfo, "-c", "CREATE TABLE never_t (id int)"])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    next_pending(&agent, bob, &[create_id.clone(), drop_id.clone()]);
    gone.kill().unwrap();
    gone.wait().unwrap();
    wait_event(&agent, "connection.closed", |e| {
        e["reason"] == "client closed the connection while a statement waited for approval"
    });
    let requested = agent.events_of("approval.requested");
    assert!(
        requested.iter().any(|e| e["approval_statement"]
            .as_str()
            .is_some_and(|t| t.starts_with("CREATE TABLE approved_t"))),
        "{requested:?}"
    );
}

/// The extended protocol (what drivers send): tokio-postgres's Parse/Bind/Execute of a
/// statement that needs approval waits at its Bind like a simple query does, runs once
/// approved (its event names the request), and is refused with 42501 when denied while the
/// connection goes on.
#[test]
fn a_drivers_prepared_statement_waits_at_bind_then_runs_or_is_refused() {
    if !enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let PgWorld {
        provider,
        postgres,
        cg,
        agent,
        _files,
    } = pg_world("appr-ext", 191, &[("e2e.cedar", STATEMENT_POLICIES)]);
    let (alice, bob) = (48189, 48190);
    login_to(&agent, &provider, alice, "alice");
    login_to(&agent, &provider, bob, "bob");
    let conninfo = conninfo(&postgres);
    let mut client = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis-pgclient"));
    portcullis_e2e::exec_in_cgroup_as(&mut client, Some(&cg.path), Some(alice));
    let client = client
        .args([
            conninfo.as_str(),
            "CREATE TABLE ext_t (id int)",
            "DROP TABLE ext_t",
            "SELECT count(*)::int FROM pg_tables WHERE tablename = 'ext_t'",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let create = next_pending(&agent, bob, &[]);
    assert_eq!(create["asked"]["kind"], "statement", "{create}");
    assert_eq!(
        create["asked"]["statement"], "CREATE TABLE ext_t (id int)",
        "{create}"
    );
    let create_id = create["id"].as_str().unwrap().to_string();
    assert!(
        !postgres
            .psql("app", "SELECT tablename FROM pg_tables")
            .contains("ext_t"),
        "the waiting statement ran"
    );
    let o = approve(&agent, bob, &create_id);
    assert!(o.status.success(), "{}", text(&o));
    let drop = next_pending(&agent, bob, std::slice::from_ref(&create_id));
    assert_eq!(drop["asked"]["statement"], "DROP TABLE ext_t", "{drop}");
    let drop_id = drop["id"].as_str().unwrap().to_string();
    let o = run(
        &agent,
        bob,
        &["approvals", "deny", &drop_id, "--reason", "keep it"],
    );
    assert!(o.status.success(), "{}", text(&o));

    let out = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(lines[0]["rows"], json!([]), "{stdout}");
    assert_eq!(lines[1]["code"], "42501", "{stdout}");
    assert!(
        lines[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("{drop_id} was denied")) && e.contains("keep it")),
        "{stdout}"
    );
    assert_eq!(lines[2]["rows"], json!([[1]]), "the table stayed: {stdout}");
    let ran = wait_event(&agent, "statement.executed", |e| {
        e["statement"] == "CREATE TABLE ext_t (id int)"
    });
    assert!(
        ran["policy_ids"]
            .as_array()
            .unwrap()
            .contains(&json!(format!("approval:{create_id}"))),
        "{ran}"
    );
}

/// A target with `wait_for_approval = true`: a connection that needs approval is held
/// (plain TCP: unanswered, its bytes kept) until an approver decides; approved, it goes
/// through and the grant lets the next one through at once; denied, it is refused with the
/// denial as the reason; a client that gives up while it waits withdraws the request.
#[test]
fn a_connection_to_a_waiting_target_is_held_until_approved_or_refused_when_denied() {
    if !enabled() {
        return;
    }
    let w = world_with_target(
        "appr-wait",
        192,
        &connect_needs("@approval(\"dba-leads\")"),
        "wait_for_approval = true\n",
    );
    let (alice, bob, carol) = (48173, 48174, 48175);
    login(&w, alice, "alice");
    login(&w, bob, "bob");
    login(&w, carol, "carol");

    let held = std::thread::scope(|scope| {
        let waiting = scope.spawn(|| probe(&w, alice).connect(w.slot.v4(1), &[]));
        let asked = next_pending(&w.agent, bob, &[]);
        assert_eq!(asked["asked"]["kind"], "grant", "{asked}");
        assert_eq!(asked["requester"]["subject"], "alice", "{asked}");
        let o = approve(&w.agent, bob, asked["id"].as_str().unwrap());
        assert!(o.status.success(), "{}", text(&o));
        waiting.join().unwrap()
    });
    assert!(
        via_proxy(&held),
        "the held connection did not go through: {held}"
    );
    // The grant the approval made lets the next connection through without waiting.
    assert!(via_proxy(&probe(&w, alice).connect(w.slot.v4(1), &[])));

    // Denied: the held connection is refused, and says why in the trail.
    let denied = std::thread::scope(|scope| {
        let waiting = scope.spawn(|| probe(&w, carol).connect(w.slot.v4(1), &[]));
        let asked = next_pending(&w.agent, bob, &[]);
        assert_eq!(asked["requester"]["subject"], "carol", "{asked}");
        let id = asked["id"].as_str().unwrap().to_string();
        let o = run(
            &w.agent,
            bob,
            &["approvals", "deny", &id, "--reason", "not carol"],
        );
        assert!(o.status.success(), "{}", text(&o));
        (waiting.join().unwrap(), id)
    });
    assert_eq!(denied.0["ok"], false, "{}", denied.0);
    wait_event(&w.agent, "connection.refused", |e| {
        e["reason"].as_str().is_some_and(|r| {
            r.contains(&format!("approval request {} was denied by", denied.1))
                && r.contains("not carol")
        })
    });
}

/// Groups are the provider's, as of the decision: an approver whose group was removed at the
/// provider no longer counts once their session is refreshed, though they were in it when
/// they logged in; the request stays pending.
#[test]
fn an_approver_whose_group_was_removed_at_the_provider_no_longer_counts() {
    if !enabled() {
        return;
    }
    // ID tokens of 125 s: the agent refreshes 120 s before expiry, so every few seconds.
    let mut opts = people();
    opts.ttl = Ttls {
        id_token: Duration::from_secs(125),
        access_token: Duration::from_secs(125),
        ..Ttls::default()
    };
    let mut w = world_of(
        "appr-regroup",
        194,
        &connect_needs("@approval(\"dba-leads\")"),
        "",
        opts,
    );
    let (alice, bob) = (48173, 48174);
    login(&w, alice, "alice");
    login(&w, bob, "bob");
    let asked = request(&w, alice, "1h");
    let id = asked["id"].as_str().unwrap().to_string();

    // Before: bob may decide it (he sees it as one of its approvers).
    assert_eq!(show(&w.agent, bob, &id)["state"], "pending");
    w.provider.set_groups("bob", &["analysts"]);
    // Until bob's session is refreshed, his token still says dba-leads.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let me: Value =
            serde_json::from_slice(&run(&w.agent, bob, &["whoami", "--json"]).stdout).unwrap();
        let groups = me["groups"].as_array().cloned().unwrap_or_default();
        if !groups.contains(&json!("dba-leads")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob's session was not refreshed: {me}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let o = approve(&w.agent, bob, &id);
    assert!(
        !o.status.success(),
        "an approver without the group counted: {}",
        text(&o)
    );
    // Out of the group, the request is not his to see, let alone decide.
    assert!(
        text(&o).contains(&format!("no approval request `{id}` that you may see")),
        "{}",
        text(&o)
    );
    assert_eq!(show(&w.agent, alice, &id)["state"], "pending");
}

/// The same on a PostgreSQL target: psql is told which request its connection waits for
/// (a NOTICE during its start-up), and connects once it is approved.
#[test]
fn a_psql_connection_to_a_waiting_target_is_told_the_request_and_connects_once_approved() {
    if !enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let policies = format!(
        "{}\n@id(\"read\")\npermit (principal, action == Portcullis::Action::\"query\", resource)\n\
         when {{ [\"read\", \"utility\"].contains(context.statement_class) }};\n",
        connect_needs("@approval(\"dba-leads\")")
    );
    let w = pg_world_with(
        "appr-wait-pg",
        193,
        &[("e2e.cedar", &policies)],
        "wait_for_approval = true\n",
    );
    let (alice, bob) = (48189, 48190);
    login_to(&w.agent, &w.provider, alice, "alice");
    login_to(&w.agent, &w.provider, bob, "bob");
    let conninfo = conninfo(&w.postgres);
    // No connect timeout: the connection waits as long as the approval takes.
    let psql = client_command(
        "psql",
        RunAs {
            uid: Some(alice),
            cgroup: Some(&w.cg.path),
        },
    )
    .args([
        "-X",
        "-A",
        "-t",
        "-d",
        &conninfo,
        "-c",
        "SELECT 'connected', 40 + 2",
    ])
    .env_remove("PGCONNECT_TIMEOUT")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let asked = next_pending(&w.agent, bob, &[]);
    assert_eq!(asked["asked"]["kind"], "grant", "{asked}");
    let id = asked["id"].as_str().unwrap().to_string();
    let o = approve(&w.agent, bob, &id);
    assert!(
        o.status.success(),
        "{}\n{:?}\n{}",
        text(&o),
        w.agent.events_of("approval.expired"),
        w.agent.log()
    );
    let out = psql.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        stderr.contains(&format!(
            "Portcullis: this connection waits for approval: request {id}"
        )),
        "{stderr}"
    );
    assert!(stdout.contains("connected|42"), "{stdout}\n{stderr}");
}

/// A PostgreSQL server with role `app` and database `app`, the provider, and an agent
/// protecting the server as target `db` with `policies` (file name, text).
struct PgWorld {
    provider: OidcProvider,
    postgres: Postgres,
    cg: TestCgroup,
    agent: Agent,
    _files: tempfile::TempDir,
}

fn pg_world(name: &str, slot: u8, policies: &[(&str, &str)]) -> PgWorld {
    pg_world_with(name, slot, policies, "")
}

/// [`pg_world`] with `target_extra` (settings of the target `db`, one per line).
fn pg_world_with(name: &str, slot: u8, policies: &[(&str, &str)], target_extra: &str) -> PgWorld {
    let provider = OidcProvider::start(people());
    let files = tempfile::tempdir().unwrap();
    let (postgres, creds) = pg::app_server(files.path());
    let cg = TestCgroup::new(name);
    let config = format!(
        "[identity]\nissuer = \"{iss}\"\nleeway_secs = 5\n[insecure]\nallow_plaintext_loopback = true\n\
         [[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1\"\nport = {port}\n\
         {target_extra}[target.postgres]\nca_file = \"{ca}\"\ncredentials_file = \"{creds}\"\n",
        iss = provider.issuer(),
        port = postgres.port(),
        ca = postgres.ca_pem_path().display(),
        creds = creds.display(),
    );
    let mut agent = Agent::prepare(name, Slot::new(slot), &cg, &[], Some(&config), &[]);
    for (file, text) in policies {
        std::fs::write(agent.dir.path().join("policies").join(file), text).unwrap();
    }
    agent.spawn();
    PgWorld {
        provider,
        postgres,
        cg,
        agent,
        _files: files,
    }
}

/// The libpq connection string of the world's server, as the role `app`.
fn conninfo(postgres: &Postgres) -> String {
    format!(
        "host=127.0.0.1 port={} user=app dbname=app sslmode=disable",
        postgres.port()
    )
}

/// psql as `uid` through the redirect to the world's server, reading `script` from stdin;
/// its output once it ends.
fn psql_script(w: &PgWorld, uid: u32, script: &str) -> Child {
    psql_in(&w.postgres, &w.cg, uid, script)
}

/// [`psql_script`] to `postgres` from the cgroup `cg`.
fn psql_in(postgres: &Postgres, cg: &TestCgroup, uid: u32, script: &str) -> Child {
    pg::psql_app_script(postgres, &cg.path, uid, script)
}

#[test]
fn a_statement_not_approved_in_time_gives_42501_and_the_session_goes_on() {
    if !enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let w = pg_world(
        "appr-timeout",
        179,
        &[
            ("e2e.cedar", STATEMENT_POLICIES),
            ("approvals.toml", "timeout_seconds = 3\n"),
        ],
    );
    let alice = 48191;
    login_to(&w.agent, &w.provider, alice, "alice");
    let started = Instant::now();
    let psql = psql_script(
        &w,
        alice,
        "CREATE TABLE late_t (id int);\nSELECT 'after', count(*) FROM pg_tables WHERE tablename = 'late_t';\n",
    );
    let out = psql.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(stderr.contains("waits at most 3 s"), "{stderr}");
    assert!(stderr.contains("ERROR:  42501"), "{stderr}");
    assert!(
        stderr.contains("expired: not approved within 3 s"),
        "{stderr}"
    );
    assert!(stdout.contains("after|0"), "{stdout}\n{stderr}");
    assert!(started.elapsed() >= Duration::from_secs(3));
    let expired = wait_event(&w.agent, "approval.expired", |_| true);
    assert_eq!(expired["asked"], "statement", "{expired}");
    // Noticed first by the waiting statement, recorded once (the sweep after it finds it
    // expired already).
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(w.agent.events_of("approval.expired").len(), 1);
    assert_eq!(expired["requester"], "alice@example.test", "{expired}");
    wait_event(&w.agent, "statement.denied", |e| {
        e["statement"]
            .as_str()
            .is_some_and(|t| t.starts_with("CREATE TABLE late_t"))
            && e["decision"] == "approval"
    });
}

#[test]
fn ctrl_c_ends_the_wait_and_withdraws_the_request() {
    if !enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let w = pg_world("appr-cancel", 180, &[("e2e.cedar", STATEMENT_POLICIES)]);
    let alice = 48192;
    login_to(&w.agent, &w.provider, alice, "alice");
    let psql = psql_script(&w, alice, "CREATE TABLE canceled_t (id int);\n");
    let waiting = next_pending(&w.agent, alice, &[]);
    let id = waiting["id"].as_str().unwrap().to_string();
    // What Ctrl-C does: psql sends a CancelRequest on a new connection.
    let sent = Command::new("kill")
        .args(["-INT", &psql.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = psql.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(stderr.contains("ERROR:  42501"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "canceled by the client while waiting for approval request {id}"
        )),
        "{stderr}"
    );
    let r = show(&w.agent, alice, &id);
    assert_eq!(r["state"], "withdrawn", "{r}");
    let expired = wait_event(&w.agent, "approval.expired", |e| {
        e["request_id"] == id.as_str()
    });
    assert_eq!(expired["approval_state"], "withdrawn", "{expired}");
    assert!(
        !w.postgres
            .psql("app", "SELECT tablename FROM pg_tables")
            .contains("canceled_t"),
        "the canceled statement ran"
    );
}

#[test]
fn a_session_the_agent_ends_while_its_statement_waits_withdraws_the_request() {
    if !enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let w = pg_world("appr-logout", 181, &[("e2e.cedar", STATEMENT_POLICIES)]);
    let alice = 48193;
    login_to(&w.agent, &w.provider, alice, "alice");
    let psql = psql_script(&w, alice, "CREATE TABLE logged_out_t (id int);\n");
    let waiting = next_pending(&w.agent, alice, &[]);
    let id = waiting["id"].as_str().unwrap().to_string();
    // Logging out ends alice's sessions: the agent closes the connection, not the client.
    let out = run(&w.agent, alice, &["logout"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = psql.wait_with_output().unwrap();
    assert!(!out.status.success());
    // An approval arriving now would approve a statement nobody waits for.
    let expired = wait_event(&w.agent, "approval.expired", |e| {
        e["request_id"] == id.as_str()
    });
    assert_eq!(expired["approval_state"], "withdrawn", "{expired}");
    assert_eq!(show(&w.agent, 0, &id)["state"], "withdrawn");
    assert!(
        !w.postgres
            .psql("app", "SELECT tablename FROM pg_tables")
            .contains("logged_out_t"),
        "the statement ran"
    );
}

// ---------------------------------------------------------------------------------------
// Notifications and break-glass (slots 182–185).

/// A webhook receiver on loopback, for the agent's notifications: a plain `TcpListener`
/// speaking just enough HTTP/1.1 (one request per connection, its body read by
/// Content-Length), answering 503 to the first `fail_first` requests and 204 after. Every
/// request is kept: its path, headers, the status it got and its JSON body.
struct Receiver {
    port: u16,
    got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
}

#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: String,
    status: u16,
    body: Value,
}

impl Receiver {
    fn start(fail_first: usize) -> Self {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Received>::new()));
        let kept = std::sync::Arc::clone(&got);
        // Lives as long as the test process; it only ever answers on loopback.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut data = Vec::new();
                let mut buf = [0u8; 16384];
                let (head, body) = loop {
                    let n = s.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break (String::new(), Vec::new());
                    }
                    data.extend_from_slice(&buf[..n]);
                    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&data[..end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let l = l.to_ascii_lowercase();
                            l.strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if data.len() >= end + 4 + len {
                        break (head, data[end + 4..end + 4 + len].to_vec());
                    }
                };
                if head.is_empty() {
                    continue;
                }
                let mut all = kept.lock().unwrap();
                let status = if all.len() < fail_first { 503 } else { 204 };
                all.push(Received {
                    path: head
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .split(' ')
                        .nth(1)
                        .unwrap_or_default()
                        .to_string(),
                    headers: head.clone(),
                    status,
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                });
                drop(all);
                let reason = if status == 503 {
                    "Service Unavailable"
                } else {
                    "No Content"
                };
                let _ = s.write_all(
                    format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Self { port, got }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Waits for a delivered (2xx) request whose body `pick` chooses.
    fn wait(&self, what: &str, pick: impl Fn(&Value) -> bool) -> Received {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(r) = self
                .all()
                .into_iter()
                .find(|r| r.status == 204 && pick(&r.body))
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} arrived: {:?}",
                self.all()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A file only root may read, as the agent wants secrets.
fn root_only(dir: &std::path::Path, name: &str, content: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

/// The approvals people plus erin, in the emergency group, and frank, who is not.
fn people_with_glass() -> OidcOptions {
    let mut options = people();
    options
        .users
        .push(OidcUser::new("erin", &["engineering", "oncall-emergency"]));
    options.users.push(OidcUser::new("frank", &["engineering"]));
    options
}

/// As `world`, with erin and frank, and `approvals` appended to the agent's config (its
/// `[approvals]` part).
fn glass_world(name: &str, n: u8, policy: &str, approvals: &str) -> World {
    let provider = OidcProvider::start(people_with_glass());
    let slot = Slot::new(n);
    let cg = TestCgroup::new(name);
    let server = EchoServer::start(&[slot.v4(1)]);
    let v4 = slot.v4(1).ip().to_string();
    let config = format!(
        "[identity]\nissuer = \"{iss}\"\nleeway_secs = 5\n\
         [insecure]\nallow_plaintext_loopback = true\n{approvals}",
        iss = provider.issuer()
    );
    let mut agent = Agent::prepare(
        name,
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
        Some(&config),
        &[],
    );
    std::fs::write(agent.dir.path().join("policies").join("e2e.cedar"), policy).unwrap();
    agent.spawn();
    World {
        cg,
        slot,
        _server: server,
        agent,
        provider,
    }
}

const SLACK_SECRET: &str = "T000/B000/slack-secret-path-XK42";
const TOKEN: &str = "notify-bearer-token-Q93";

/// Two webhooks: `generic` (JSON, a bearer token) and `chat` (Slack, its URL in a file).
fn two_webhooks(json: &Receiver, slack: &Receiver, files: &std::path::Path) -> String {
    let token = root_only(files, "notify.token", TOKEN);
    let url = root_only(
        files,
        "slack.url",
        &format!("{}\n", slack.url(&format!("/services/{SLACK_SECRET}"))),
    );
    format!(
        "[[approvals.notify]]\nname = \"generic\"\nurl = \"{}\"\ntoken_file = \"{}\"\n\
         [[approvals.notify]]\nname = \"chat\"\nformat = \"slack\"\nurl_file = \"{}\"\n",
        json.url("/hooks/approvals"),
        token.display(),
        url.display()
    )
}

#[test]
fn a_request_and_its_approval_are_notified_as_json_and_as_slack() {
    if !enabled() {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let (json, slack) = (Receiver::start(0), Receiver::start(0));
    let w = glass_world(
        "appr-notify",
        182,
        &connect_needs("@approval(\"dba-leads\")"),
        &two_webhooks(&json, &slack, files.path()),
    );
    let (alice, bob) = (48200, 48201);
    login(&w, alice, "alice");
    login(&w, bob, "bob");
    let r = request(&w, alice, "1h");
    let id = r["id"].as_str().unwrap().to_string();

    let asked = json.wait("the JSON request", |b| b["kind"] == "approval.requested");
    let b = &asked.body;
    assert_eq!(asked.path, "/hooks/approvals");
    assert!(
        asked.headers.to_ascii_lowercase().contains(&format!(
            "authorization: bearer {}",
            TOKEN.to_ascii_lowercase()
        )),
        "{}",
        asked.headers
    );
    assert_eq!(b["source"], "portcullis", "{b}");
    assert_eq!(b["request_id"], id.as_str(), "{b}");
    assert_eq!(b["requester"], "alice@example.test", "{b}");
    assert_eq!(b["target"], "db", "{b}");
    assert_eq!(b["asked"], "grant", "{b}");
    assert_eq!(b["actions"], json!(["connect"]), "{b}");
    assert_eq!(b["duration_secs"], 3600, "{b}");
    assert_eq!(b["required"], "1 approval from group `dba-leads`", "{b}");
    assert_eq!(b["approvers"], json!([]), "{b}");
    assert_eq!(b["decision"], "pending", "{b}");
    assert_eq!(b["reason"], "INC-4711", "{b}");
    assert_eq!(b["break_glass"], false, "{b}");
    assert_eq!(b["expires_ms"], r["expires_ms"], "{b}");
    assert_eq!(
        b["follow"],
        format!("portcullis approvals show {id}").as_str(),
        "{b}"
    );
    let chat = slack.wait("the Slack request", |b| {
        b["text"]
            .as_str()
            .is_some_and(|t| t.contains("alice@example.test asks for connect on db for 1h"))
    });
    assert_eq!(chat.path, format!("/services/{SLACK_SECRET}"));
    assert!(
        !chat.headers.to_ascii_lowercase().contains("authorization"),
        "{}",
        chat.headers
    );
    assert!(chat.body["blocks"].is_array(), "{}", chat.body);
    assert!(
        chat.body
            .to_string()
            .contains(&format!("portcullis approvals show {id}")),
        "{}",
        chat.body
    );

    let o = approve(&w.agent, bob, &id);
    assert!(o.status.success(), "{}", text(&o));
    let approved = json.wait("the JSON approval", |b| b["kind"] == "approval.approved");
    let b = &approved.body;
    assert_eq!(b["request_id"], id.as_str(), "{b}");
    assert_eq!(b["decision"], "approved", "{b}");
    assert_eq!(b["actor"], "bob@example.test", "{b}");
    assert_eq!(b["approvers"], json!(["bob"]), "{b}");
    assert_eq!(b["reason"], "looks right", "{b}");
    assert!(b["grant_id"].as_str().unwrap().starts_with("g-"), "{b}");
    assert!(b["expires_ms"].as_u64().unwrap() > b["time_ms"].as_u64().unwrap());
    slack.wait("the Slack approval", |b| {
        b["text"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("bob@example.test approved {id}: approved")))
    });
    // Each webhook got each event once, in order.
    let kinds: Vec<Value> = json.all().iter().map(|r| r.body["kind"].clone()).collect();
    assert_eq!(
        kinds,
        vec![json!("approval.requested"), json!("approval.approved")]
    );
    assert_eq!(slack.all().len(), 2);
    // The Slack URL and the token are secrets: not in the log, not in the trail.
    let log = w.agent.log();
    assert!(log.contains("approval notifications on"), "{log}");
    let trail = serde_json::to_string(&w.agent.events()).unwrap();
    for secret in [SLACK_SECRET, TOKEN] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        assert!(!trail.contains(secret), "{secret} in the trail");
    }
}

#[test]
fn a_notification_the_receiver_refuses_at_first_arrives_on_retry() {
    if !enabled() {
        return;
    }
    let json = Receiver::start(2);
    let w = glass_world(
        "appr-retry",
        183,
        &connect_needs("@approval(\"dba-leads\")"),
        &format!(
            "[[approvals.notify]]\nname = \"flaky\"\nurl = \"{}\"\n",
            json.url("/hooks")
        ),
    );
    let alice = 48202;
    login(&w, alice, "alice");
    let r = request(&w, alice, "2h");
    let id = r["id"].as_str().unwrap();
    json.wait("the retried request", |b| b["request_id"] == id);
    let got = json.all();
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 503, 204], "{got:?}");
    assert!(
        got.iter().all(|r| r.body == got[2].body),
        "each attempt sends the same notification: {got:?}"
    );
    let log = w.agent.log();
    assert!(
        log.contains("approval notification failed; retrying"),
        "{log}"
    );
    assert!(w
        .agent
        .events_of("approval.notification_dropped")
        .is_empty());
    // The request never waited on the webhook.
    assert_eq!(show(&w.agent, alice, id)["state"], "pending");
}

const GLASS: &str = "[approvals]\nbreak_glass_group = \"oncall-emergency\"\n";

#[test]
fn break_glass_self_approval_lets_the_connection_through_loudly() {
    if !enabled() {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let (json, slack) = (Receiver::start(0), Receiver::start(0));
    let w = glass_world(
        "appr-glass",
        184,
        &connect_needs("@approvals(\"dba-leads:1,security:1\")"),
        &format!("{GLASS}{}", two_webhooks(&json, &slack, files.path())),
    );
    let erin = 48203;
    login(&w, erin, "erin");
    // The emergency: erin's connect is refused, naming the request it made.
    let refused = w.agent.expect_refusal(
        &probe(&w, erin),
        w.slot.v4(1),
        "approval required: request r-",
    );
    let id = request_id_in(refused["reason"].as_str().unwrap());
    let o = run(
        &w.agent,
        erin,
        &[
            "approvals",
            "approve",
            &id,
            "--break-glass",
            "--reason",
            "INC-911: primary down, nobody reachable",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("BREAK-GLASS"), "{}", text(&o));
    let r = show(&w.agent, erin, &id);
    assert_eq!(r["state"], "approved", "{r}");
    let grant = r["grant_id"].as_str().unwrap().to_string();

    // One break-glass approval fills both groups: erin is through.
    let mut held = Held::open(&probe(&w, erin), w.slot.v4(1));
    assert_eq!(held.exchange("ping")["reply"], "ping");

    let glass = w.agent.wait_events("approval.break_glass", 1);
    let e = &glass[0];
    assert_eq!(e["request_id"], id.as_str(), "{e}");
    assert_eq!(e["requester"], "erin@example.test", "{e}");
    assert_eq!(e["identity"]["subject"], "erin", "{e}");
    assert_eq!(e["break_glass"], true, "{e}");
    assert_eq!(e["approval_state"], "approved", "{e}");
    assert_eq!(e["approvers"], json!(["erin"]), "{e}");
    assert_eq!(e["grant_id"], grant.as_str(), "{e}");
    assert_eq!(e["grant_actions"], json!(["connect"]), "{e}");
    let reason = e["reason"].as_str().unwrap();
    assert!(
        reason.contains("break-glass by erin@example.test as a member of `oncall-emergency`")
            && reason.contains(
                "filling 1 approval from group `dba-leads` and 1 approval from group `security`"
            )
            && reason.ends_with("INC-911: primary down, nobody reachable"),
        "{e}"
    );
    assert!(
        w.agent.events_of("approval.approved").is_empty(),
        "a break-glass is not an ordinary approval"
    );
    let used = w.agent.wait_events("grant.used", 1);
    assert_eq!(used[0]["break_glass"], true, "{used:?}");

    // The alert, in both formats, marked as break-glass.
    let alert = json.wait("the JSON alert", |b| b["kind"] == "approval.break_glass");
    assert_eq!(alert.body["break_glass"], true, "{}", alert.body);
    assert_eq!(alert.body["requester"], "erin@example.test");
    assert_eq!(alert.body["grant_id"], grant.as_str());
    assert!(alert.body["reason"]
        .as_str()
        .unwrap()
        .contains("INC-911: primary down"));
    let chat = slack.wait("the Slack alert", |b| {
        b["text"].as_str().is_some_and(|t| {
            t.starts_with(":rotating_light:")
                && t.contains("BREAK-GLASS: erin@example.test approved their own request")
        })
    });
    assert!(
        chat.body.to_string().contains("INC-911: primary down"),
        "{}",
        chat.body
    );
    json.wait("the JSON notice of the grant's use", |b| {
        b["kind"] == "grant.used" && b["break_glass"] == true
    });

    // `portcullis status` lists the open break-glass grant, for root and for erin.
    let status = w.agent.status();
    let listed = &status["break_glass_grants"];
    assert_eq!(listed[0]["id"], grant.as_str(), "{status}");
    assert_eq!(listed[0]["who"], "erin@example.test", "{status}");
    assert_eq!(listed[0]["target"], "db", "{status}");
    assert!(listed[0]["expires_ms"].as_u64().unwrap() > portcullis_e2e::now_secs() * 1000);
    assert_eq!(
        listed[0]["reason"], "INC-911: primary down, nobody reachable",
        "{status}"
    );
    assert_eq!(
        w.agent.status_as(erin)["break_glass_grants"][0]["id"],
        grant.as_str()
    );
    let o = run(&w.agent, 0, &["status"]);
    let shown = text(&o);
    assert!(shown.contains("BREAK-GLASS grants open (1)"), "{shown}");
    assert!(
        shown.contains(&format!("{grant}  erin@example.test on db (connect)")),
        "{shown}"
    );
    // Revoked, it is no longer open.
    let o = run(
        &w.agent,
        0,
        &["grants", "revoke", &grant, "--reason", "incident over"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(w.agent.status()["break_glass_grants"].is_null());
    json.wait("the JSON revocation", |b| {
        b["kind"] == "grant.revoked" && b["break_glass"] == true
    });
    assert!(w.agent.verify_audit().status.success());
}

#[test]
fn break_glass_is_refused_without_the_flag_without_a_reason_and_outside_the_group() {
    if !enabled() {
        return;
    }
    let w = glass_world(
        "appr-noglass",
        185,
        &connect_needs("@approval(\"dba-leads\")"),
        GLASS,
    );
    let (erin, frank) = (48204, 48205);
    login(&w, erin, "erin");
    login(&w, frank, "frank");
    let mine = request(&w, erin, "1h");
    let mine = mine["id"].as_str().unwrap();

    // A member of the emergency group, without the flag: it is their own request.
    let o = approve(&w.agent, erin, mine);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("segregation of duties"), "{}", text(&o));
    assert!(
        text(&o).contains("you may break the glass instead"),
        "{}",
        text(&o)
    );
    // With the flag and no reason (or only spaces).
    for reason in [None, Some("   ")] {
        let mut args = vec!["approvals", "approve", mine, "--break-glass"];
        if let Some(r) = reason {
            args.extend(["--reason", r]);
        }
        let o = run(&w.agent, erin, &args);
        assert!(!o.status.success(), "{}", text(&o));
        assert!(
            text(&o).contains("--break-glass needs --reason"),
            "{}",
            text(&o)
        );
    }
    // Someone outside the group, with the flag and a reason.
    let theirs = request(&w, frank, "1h");
    let theirs = theirs["id"].as_str().unwrap();
    let o = run(
        &w.agent,
        frank,
        &[
            "approvals",
            "approve",
            theirs,
            "--break-glass",
            "--reason",
            "I say so",
        ],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("break-glass is for members of `oncall-emergency` only"),
        "{}",
        text(&o)
    );
    // Nothing was approved, nothing alerted, nobody is through.
    assert_eq!(show(&w.agent, erin, mine)["state"], "pending");
    assert_eq!(show(&w.agent, frank, theirs)["state"], "pending");
    assert!(w.agent.events_of("approval.break_glass").is_empty());
    assert!(w.agent.events_of("approval.approved").is_empty());
    w.agent
        .expect_refusal(&probe(&w, erin), w.slot.v4(1), "approval required");
    w.agent
        .expect_refusal(&probe(&w, frank), w.slot.v4(1), "approval required");
}

/// Two bastions share one central PostgreSQL: each agent's login role is a member of the
/// insert-only group role the migration makes. The central server is also a protected `tcp`
/// target of both: the agents' own connections to it carry the exempt mark and are not
/// redirected into themselves.
const FLEET_DB: &str = "portcullis";

/// `(name, slot, host, role)`: the agent's test name and slot, its bastion name in the log,
/// and its database role.
fn fleet_agent(
    (name, slot, host, role): (&str, u8, &str, &str),
    provider: &OidcProvider,
    postgres: &Postgres,
    central: &Postgres,
    files: &std::path::Path,
) -> (TestCgroup, Agent) {
    let secret = files.join(format!("{role}-pw"));
    std::fs::write(&secret, format!("{role}-secret")).unwrap();
    let admin = files.join("admin-pw");
    std::fs::write(&admin, pg::SUPERUSER_PASSWORD).unwrap();
    for f in [&secret, &admin] {
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let creds = files.join("credentials.toml");
    let cg = TestCgroup::new(name);
    let config = format!(
        "[identity]\nissuer = \"{iss}\"\nleeway_secs = 5\n[insecure]\nallow_plaintext_loopback = true\n\
         [audit.central]\nurl = \"postgres://{role}@127.0.0.1:{central}/{FLEET_DB}\"\n\
         password_file = \"{secret}\"\ntls = \"disable\"\nhost_name = \"{host}\"\n\
         migrate_url = \"postgres://postgres@127.0.0.1:{central}/{FLEET_DB}\"\n\
         migrate_password_file = \"{admin}\"\n\
         [[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1\"\nport = {port}\n\
         [target.postgres]\nca_file = \"{ca}\"\ncredentials_file = \"{creds}\"\n\
         [[target]]\nname = \"audit-db\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1\"\nport = {central}\n",
        iss = provider.issuer(),
        port = postgres.port(),
        central = central.port(),
        secret = secret.display(),
        admin = admin.display(),
        ca = postgres.ca_pem_path().display(),
        creds = creds.display(),
    );
    let mut agent = Agent::prepare(name, Slot::new(slot), &cg, &[], Some(&config), &[]);
    std::fs::write(
        agent.dir.path().join("policies").join("e2e.cedar"),
        STATEMENT_POLICIES,
    )
    .unwrap();
    agent.spawn();
    (cg, agent)
}

#[test]
fn a_statement_waiting_on_one_bastion_is_approved_on_another_through_the_central_store() {
    if !enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let provider = OidcProvider::start(people());
    let files = tempfile::tempdir().unwrap();
    let (postgres, _creds) = pg::app_server(files.path());
    let central = Postgres::start_with(PgOptions::default());
    central.create_database(FLEET_DB, None);
    central.psql(
        FLEET_DB,
        "CREATE ROLE portcullis_writer NOLOGIN; \
         CREATE ROLE bastion_a LOGIN PASSWORD 'bastion_a-secret' IN ROLE portcullis_writer; \
         CREATE ROLE bastion_b LOGIN PASSWORD 'bastion_b-secret' IN ROLE portcullis_writer",
    );
    let (cg_a, a) = fleet_agent(
        ("appr-fleet-a", 14, "bastion-a", "bastion_a"),
        &provider,
        &postgres,
        &central,
        files.path(),
    );
    let (_cg_b, b) = fleet_agent(
        ("appr-fleet-b", 15, "bastion-b", "bastion_b"),
        &provider,
        &postgres,
        &central,
        files.path(),
    );
    let (alice, bob) = (48301, 48302);
    login_to(&a, &provider, alice, "alice");
    login_to(&b, &provider, bob, "bob");

    let psql = psql_in(
        &postgres,
        &cg_a,
        alice,
        "CREATE TABLE fleet_t (id int);\n\
         SELECT 'created', count(*) FROM pg_tables WHERE tablename = 'fleet_t';\n\
         DROP TABLE fleet_t;\n\
         SELECT 'still here', count(*) FROM pg_tables WHERE tablename = 'fleet_t';\n",
    );

    // Made on a, seen by bob on b.
    let create = next_pending(&b, bob, &[]);
    let create_id = create["id"].as_str().unwrap().to_string();
    assert!(
        create["asked"]["statement"]
            .as_str()
            .unwrap()
            .starts_with("CREATE TABLE fleet_t"),
        "{create}"
    );
    assert_eq!(create["host"], "bastion-a", "{create}");

    // The central store refusing the write: nothing is approved, the request stays pending.
    central.psql(
        FLEET_DB,
        "REVOKE INSERT ON portcullis_approval_log FROM portcullis_writer",
    );
    let o = approve(&b, bob, &create_id);
    assert!(!o.status.success(), "approved without the central store");
    assert!(
        text(&o).contains("nothing was decided") || text(&o).contains("may not have been recorded"),
        "{}",
        text(&o)
    );
    assert_eq!(show(&a, alice, &create_id)["state"], "pending");
    assert!(
        !postgres
            .psql("app", "SELECT tablename FROM pg_tables")
            .contains("fleet_t"),
        "the waiting statement ran"
    );
    central.psql(
        FLEET_DB,
        "GRANT INSERT ON portcullis_approval_log TO portcullis_writer",
    );

    // Approved on b (after its connection came back): the statement on a runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = approve(&b, bob, &create_id);
        if o.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&o));
        std::thread::sleep(Duration::from_millis(500));
    }
    // Denied on b: 42501 on a, and the session goes on.
    let drop = next_pending(&b, bob, std::slice::from_ref(&create_id));
    let drop_id = drop["id"].as_str().unwrap().to_string();
    let o = run(
        &b,
        bob,
        &["approvals", "deny", &drop_id, "--reason", "keep it"],
    );
    assert!(o.status.success(), "{}", text(&o));

    let out = psql.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(stdout.contains("created|1"), "{stdout}\n{stderr}");
    assert!(stderr.contains("ERROR:  42501"), "{stderr}");
    assert!(stderr.contains("keep it"), "{stderr}");
    assert!(stdout.contains("still here|1"), "{stdout}\n{stderr}");

    // Each bastion's own trail: a recorded the request, b the decisions.
    wait_event(&a, "approval.requested", |e| {
        e["request_id"] == create_id.as_str()
    });
    wait_event(&b, "approval.approved", |e| {
        e["request_id"] == create_id.as_str()
    });
    wait_event(&b, "approval.denied", |e| {
        e["request_id"] == drop_id.as_str()
    });
    assert!(a.events_of("approval.approved").is_empty());
    // The log names the database role that wrote each change, which no agent chooses.
    let writers = central.psql(
        FLEET_DB,
        &format!(
            "SELECT host || ' ' || written_by || ' ' || (change->>'change') FROM portcullis_approval_log \
             WHERE change->>'request_id' = '{create_id}' OR change->'request'->>'id' = '{create_id}' ORDER BY id"
        ),
    );
    let lines: Vec<&str> = writers.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines,
        ["bastion-a bastion_a ask", "bastion-b bastion_b verdict"],
        "{writers}"
    );
    // The agent's role cannot rewrite the log.
    let o = central.psql_tcp(
        "bastion_b",
        "bastion_b-secret",
        FLEET_DB,
        "UPDATE portcullis_approval_log SET change = '{}'::jsonb",
    );
    assert!(!o.status.success(), "the agent's role changed the log");
}
