//! Identity end to end: a real OpenID Provider (oidc-provider under Node.js) on loopback,
//! the real agent, `portcullis login` run as unprivileged users, and connections through
//! the real kernel redirect that carry (or lack) a verified identity.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use portcullis_e2e::oidc::{self, craft_jwt, OidcOptions, OidcProvider, OldKey, Signing, Ttls};
use portcullis_e2e::{e2e_enabled, Agent, EchoServer, Held, Probe, Slot, Target, TestCgroup};
use serde_json::{json, Value};

fn enabled() -> bool {
    e2e_enabled() && oidc::oidc_enabled()
}

const CI_AUDIENCE: &str = "portcullis-ci";

/// Identity settings for the agent: the provider as issuer and as trusted CI issuer. It
/// serves plain http on loopback, which the agent accepts only when told so.
fn identity_config(provider: &OidcProvider, extra: &str) -> String {
    format!(
        "[identity]\nissuer = \"{iss}\"\nleeway_secs = 5\n{extra}\n\
         [[identity.trusted_issuer]]\nissuer = \"{iss}\"\naudience = \"{CI_AUDIENCE}\"\n\
         required_claims = {{ repository = \"acme/infra\" }}\n\
         [insecure]\nallow_plaintext_loopback = true\n",
        iss = provider.issuer()
    )
}

struct World {
    cg: TestCgroup,
    slot: Slot,
    _server: EchoServer,
    agent: Agent,
}

fn world(name: &str, n: u8, provider: &OidcProvider, extra: &str) -> World {
    let slot = Slot::new(n);
    let cg = TestCgroup::new(name);
    let server = EchoServer::start(&[slot.v4(1)]);
    let v4 = slot.v4(1).ip().to_string();
    let config = identity_config(provider, extra);
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
        Some(&config),
        &[],
    );
    World {
        cg,
        slot,
        _server: server,
        agent,
    }
}

fn cli(agent: &Agent, uid: u32, args: &[&str]) -> Command {
    agent.cli_as(uid, args)
}

/// The address with the code filled in, from the line `portcullis login` prints for it.
fn complete_uri(line: &str) -> Option<String> {
    line.trim()
        .strip_prefix("(or open ")
        .map(|rest| rest.trim_end_matches(" directly)").to_string())
}

/// Runs `portcullis login` as `uid` and finishes the device flow in "the browser" as `user`.
fn login(agent: &Agent, provider: &OidcProvider, uid: u32, user: &str) -> Output {
    let mut child = cli(agent, uid, &["login"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut shown = String::new();
    let url = loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let o = child.wait_with_output().unwrap();
            panic!(
                "login ended early:\n{shown}\n{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        shown.push_str(&line);
        if let Some(url) = complete_uri(&line) {
            break url;
        }
    };
    provider.complete_device_flow(&url, user).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let mut o = child.wait_with_output().unwrap();
    o.stdout = format!("{shown}{rest}").into_bytes();
    o
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn via_proxy(r: &Value) -> bool {
    r["ok"] == true && r["via_proxy"] == true
}

#[test]
fn logged_in_user_connects_as_themselves_and_another_uid_is_refused() {
    if !enabled() {
        return;
    }
    let provider = OidcProvider::start(OidcOptions::default());
    let w = world("id-login", 20, &provider, "");
    let o = login(&w.agent, &provider, 45001, "alice");
    assert!(o.status.success(), "{}", text(&o));
    let shown = text(&o);
    assert!(shown.contains("enter the code"), "{shown}");
    assert!(
        shown.contains("Logged in as Alice <alice@example.test>"),
        "{shown}"
    );

    let alice = Probe {
        cgroup: &w.cg,
        uid: 45001,
        netns: None,
    };
    assert!(
        via_proxy(&alice.connect(w.slot.v4(1), &[])),
        "alice is logged in"
    );
    let opened = w.agent.wait_events("connection.opened", 1);
    let id = &opened[0]["identity"];
    assert_eq!(id["kind"], "user");
    assert_eq!(id["subject"], "alice");
    assert_eq!(id["email"], "alice@example.test");
    assert_eq!(id["groups"], json!(["engineering", "dba"]));
    assert_eq!(id["uid"], 45001);
    assert_eq!(id["issuer"], provider.issuer());

    // Another uid has no session and cannot use alice's.
    let other = Probe {
        cgroup: &w.cg,
        uid: 45002,
        netns: None,
    };
    let r = other.connect(w.slot.v4(1), &[]);
    assert_eq!(r["ok"], false, "no login, no connection: {r}");
    let refused = w.agent.wait_events("connection.refused", 1);
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .contains("run `portcullis login`"),
        "{}",
        refused[0]
    );
    let whoami = cli(&w.agent, 45002, &["whoami"]).output().unwrap();
    assert!(!whoami.status.success());
    assert!(text(&whoami).contains("not logged in"));
    let whoami = cli(&w.agent, 45001, &["whoami", "--json"])
        .output()
        .unwrap();
    let me: Value = serde_json::from_slice(&whoami.stdout).unwrap();
    assert_eq!(me["subject"], "alice");
    assert_eq!(me["uid"], 45001);
    // The session file holds the refresh token; it is root-only and never in an event.
    let events = serde_json::to_string(&w.agent.events()).unwrap();
    assert!(!events.contains("refresh_token"));
    assert!(
        w.agent.verify_audit().status.success(),
        "the audit chain verifies"
    );
}

#[test]
fn sessions_survive_an_agent_restart() {
    if !enabled() {
        return;
    }
    let provider = OidcProvider::start(OidcOptions::default());
    let mut w = world("id-restart", 21, &provider, "");
    assert!(login(&w.agent, &provider, 45011, "bob").status.success());
    w.agent.kill9();
    w.agent.spawn();
    let bob = Probe {
        cgroup: &w.cg,
        uid: 45011,
        netns: None,
    };
    assert!(
        via_proxy(&bob.connect(w.slot.v4(1), &[])),
        "the session was restored from the state directory"
    );
    let opened = w.agent.wait_events("connection.opened", 1);
    assert_eq!(opened[0]["identity"]["subject"], "bob");
}

#[test]
fn logout_revokes_and_closes_open_connections() {
    if !enabled() {
        return;
    }
    let provider = OidcProvider::start(OidcOptions::default());
    let w = world("id-logout", 22, &provider, "");
    assert!(login(&w.agent, &provider, 45021, "alice").status.success());
    let alice = Probe {
        cgroup: &w.cg,
        uid: 45021,
        netns: None,
    };
    let mut held = Held::open(&alice, w.slot.v4(1));
    assert_eq!(held.exchange("one")["reply"], "one");

    let out = cli(&w.agent, 45021, &["logout"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("refresh token revoked"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("1 open connection(s) closed"),
        "{}",
        text(&out)
    );
    assert_eq!(
        held.exchange("two")["ok"],
        false,
        "the open connection was closed"
    );
    let closed = w.agent.wait_events("connection.closed", 1);
    assert_eq!(closed[0]["reason"], "logged out");
    assert_eq!(w.agent.events_of("logout").len(), 1);
    // No new connections after logout: refused by the agent, for want of a login.
    w.agent
        .expect_refusal(&alice, w.slot.v4(1), "run `portcullis login`");
}

#[test]
fn workload_tokens_are_validated_like_id_tokens() {
    if !enabled() {
        return;
    }
    let provider = OidcProvider::start(OidcOptions::default());
    let w = world("id-token", 23, &provider, "");
    let now = portcullis_e2e::now_secs();
    let good = json!({
        "iss": provider.issuer(), "aud": CI_AUDIENCE, "sub": "repo:acme/infra:ref:refs/heads/main",
        "repository": "acme/infra", "iat": now, "exp": now + 600,
    });
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": provider.kid()});
    let key = Signing::Rs256 {
        private_pem: provider.signing_key_pem(),
    };
    let other_key = oidc::SigningKey::generate();
    let with = |overrides: Value| {
        let mut c = good.clone();
        for (k, v) in overrides.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            craft_jwt(&header, &with(json!({"exp": now - 60})), key),
            "expired",
        ),
        (
            "wrong audience",
            craft_jwt(&header, &with(json!({"aud": "someone-else"})), key),
            "audience",
        ),
        (
            "untrusted issuer",
            craft_jwt(
                &header,
                &with(json!({"iss": "https://token.untrusted.example"})),
                key,
            ),
            "not trusted",
        ),
        (
            "bad signature",
            craft_jwt(
                &header,
                &good,
                Signing::Rs256 {
                    private_pem: &other_key.private_pem,
                },
            ),
            "signature",
        ),
        (
            "alg none",
            craft_jwt(
                &json!({"alg": "none", "typ": "JWT"}),
                &good,
                Signing::Unsigned,
            ),
            "malformed",
        ),
        (
            "HS256 signed with the issuer's public key",
            craft_jwt(
                &json!({"alg": "HS256", "typ": "JWT", "kid": provider.kid()}),
                &good,
                Signing::Hs256 {
                    secret: provider.public_key_pem().as_bytes(),
                },
            ),
            "not allowed",
        ),
        (
            "missing required claim",
            craft_jwt(&header, &with(json!({"repository": "acme/other"})), key),
            "repository",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for (what, token, needle) in &cases {
        let file = dir.path().join("token");
        std::fs::write(&file, token).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let out = cli(
            &w.agent,
            45031,
            &["login", "--token-file", file.to_str().unwrap()],
        )
        .output()
        .unwrap();
        assert!(
            !out.status.success(),
            "{what} must be rejected: {}",
            text(&out)
        );
        assert!(text(&out).contains(needle), "{what}: {}", text(&out));
    }
    let ci = Probe {
        cgroup: &w.cg,
        uid: 45031,
        netns: None,
    };
    // No rejected token logged anyone in: the agent refuses for want of a login.
    w.agent
        .expect_refusal(&ci, w.slot.v4(1), "run `portcullis login`");

    // The valid one, from standard input.
    let mut child = cli(&w.agent, 45031, &["login", "--token-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(craft_jwt(&header, &good, key).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(via_proxy(&ci.connect(w.slot.v4(1), &[])));
    let opened = w.agent.wait_events("connection.opened", 1);
    assert_eq!(opened[0]["identity"]["kind"], "workload");
    assert_eq!(
        opened[0]["identity"]["subject"],
        "repo:acme/infra:ref:refs/heads/main"
    );
    assert!(w.agent.events_of("login.failed").len() >= cases.len());
}

#[test]
fn key_rotation_at_the_provider_is_followed() {
    if !enabled() {
        return;
    }
    let mut provider = OidcProvider::start(OidcOptions::default());
    let w = world("id-rotate", 24, &provider, "");
    assert!(login(&w.agent, &provider, 45041, "alice").status.success());
    let old_kid = provider.kid().to_string();
    provider.rotate_keys(OldKey::Withdrawn);
    assert_ne!(provider.kid(), old_kid);
    // A new login's ID token names the new key; the agent refetches the key set.
    let o = login(&w.agent, &provider, 45042, "bob");
    assert!(o.status.success(), "{}", text(&o));
    let bob = Probe {
        cgroup: &w.cg,
        uid: 45042,
        netns: None,
    };
    assert!(via_proxy(&bob.connect(w.slot.v4(1), &[])));
}

#[test]
fn provider_down_during_login_is_a_clear_error() {
    if !enabled() {
        return;
    }
    let mut provider = OidcProvider::start(OidcOptions::default());
    let w = world("id-down", 25, &provider, "");
    provider.stop();
    let out = cli(&w.agent, 45051, &["login"]).output().unwrap();
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("cannot reach the identity provider"), "{t}");
    assert!(t.contains(provider.issuer()), "{t}");
}

#[test]
fn refresh_keeps_a_session_alive_and_a_failed_refresh_ends_it_at_expiry() {
    if !enabled() {
        return;
    }
    let ttl = Ttls {
        id_token: Duration::from_secs(12),
        access_token: Duration::from_secs(12),
        ..Ttls::default()
    };
    let mut provider = OidcProvider::start(OidcOptions {
        ttl,
        ..OidcOptions::default()
    });
    let w = world("id-refresh", 26, &provider, "refresh_before_secs = 8");
    assert!(login(&w.agent, &provider, 45061, "alice").status.success());
    let alice = Probe {
        cgroup: &w.cg,
        uid: 45061,
        netns: None,
    };
    let mut held = Held::open(&alice, w.slot.v4(1));

    // Past the first ID token's lifetime: refreshed, still valid.
    std::thread::sleep(Duration::from_secs(14));
    assert!(
        via_proxy(&alice.connect(w.slot.v4(1), &[])),
        "refreshed before expiry"
    );
    assert_eq!(held.exchange("still here")["reply"], "still here");

    // The provider goes away: refresh fails, the session lasts until it expires, then
    // new connections are refused and the open one is closed (the default).
    provider.stop();
    let expires_at = {
        let me: Value = serde_json::from_slice(
            &cli(&w.agent, 45061, &["whoami", "--json"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        me["expires_at"].as_u64().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.agent.events_of("login.refresh_failed").is_empty() {
        assert!(Instant::now() < deadline, "no refresh failure recorded");
        std::thread::sleep(Duration::from_millis(200));
    }
    if portcullis_e2e::now_secs() + 1 < expires_at {
        assert!(
            via_proxy(&alice.connect(w.slot.v4(1), &[])),
            "still valid until expiry"
        );
    }
    while portcullis_e2e::now_secs() <= expires_at + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let expired = w.agent.wait_events("login.expired", 1);
    assert_eq!(expired.len(), 1);
    // Expired: refused by the agent for want of a login.
    w.agent
        .expect_refusal(&alice, w.slot.v4(1), "run `portcullis login`");
    assert_eq!(
        held.exchange("gone?")["ok"],
        false,
        "the open connection was closed at expiry"
    );
    let closed = w.agent.wait_events("connection.closed", 2);
    assert!(
        closed.iter().any(|e| e["reason"] == "session expired"),
        "{closed:?}"
    );
}

#[test]
fn keep_setting_leaves_open_connections_after_expiry() {
    if !enabled() {
        return;
    }
    let ttl = Ttls {
        id_token: Duration::from_secs(6),
        access_token: Duration::from_secs(6),
        ..Ttls::default()
    };
    let provider = OidcProvider::start(OidcOptions {
        ttl,
        ..OidcOptions::default()
    });
    // No refresh before expiry: refresh_before is 0.
    let w = world(
        "id-keep",
        27,
        &provider,
        "refresh_before_secs = 0\non_session_end = \"keep\"",
    );
    assert!(login(&w.agent, &provider, 45071, "bob").status.success());
    let bob = Probe {
        cgroup: &w.cg,
        uid: 45071,
        netns: None,
    };
    let mut held = Held::open(&bob, w.slot.v4(1));
    w.agent.wait_events("login.expired", 1);
    assert_eq!(w.agent.events_of("login.expired").len(), 1);
    assert_eq!(
        held.exchange("kept")["reply"],
        "kept",
        "on_session_end = keep"
    );
    // But new connections are refused, by the agent, for want of a login.
    w.agent
        .expect_refusal(&bob, w.slot.v4(1), "run `portcullis login`");
}

/// A `[[identity.service]]` for the test provider's confidential client, mapped by
/// `mapping` (`uid = …` or `unit = "…"`), with its secret in a 0600 file under `dir`.
fn service_config(dir: &std::path::Path, name: &str, mapping: &str) -> String {
    let secret = dir.join("service.secret");
    std::fs::write(&secret, oidc::SERVICE_CLIENT_SECRET).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    format!(
        "\n[[identity.service]]\nname = \"{name}\"\n{mapping}\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\n",
        oidc::SERVICE_CLIENT_ID,
        secret.display()
    )
}

/// The service token arrives shortly after start: retry until the connection goes through.
fn connect_once_the_service_has_a_token(probe: &Probe<'_>, w: &World) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = probe.connect(w.slot.v4(1), &[]);
        if via_proxy(&r) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the service identity never got a token: {r}\n{}",
            w.agent.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn service_identity_for_a_cron_uid_uses_client_credentials() {
    if !enabled() {
        return;
    }
    let provider = OidcProvider::start(OidcOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let extra = service_config(dir.path(), "nightly-backup", "uid = 45081");
    let w = world("id-service", 28, &provider, &extra);
    let cron = Probe {
        cgroup: &w.cg,
        uid: 45081,
        netns: None,
    };
    connect_once_the_service_has_a_token(&cron, &w);
    let opened = w.agent.wait_events("connection.opened", 1);
    assert_eq!(opened[0]["identity"]["kind"], "service");
    assert_eq!(opened[0]["identity"]["subject"], oidc::SERVICE_CLIENT_ID);
    assert_eq!(opened[0]["identity"]["name"], "nightly-backup");
    // Another uid gets nothing from the service mapping.
    let other = Probe {
        cgroup: &w.cg,
        uid: 45082,
        netns: None,
    };
    let refused = w
        .agent
        .expect_refusal(&other, w.slot.v4(1), "run `portcullis login`");
    assert!(refused["identity"].is_null(), "{refused}");
}

#[test]
fn root_lists_and_revokes_logins() {
    if !enabled() {
        return;
    }
    let provider = OidcProvider::start(OidcOptions::default());
    let w = world("id-admin", 29, &provider, "");
    assert!(login(&w.agent, &provider, 45091, "alice").status.success());
    let list = cli(&w.agent, 0, &["logins", "list", "--json"])
        .output()
        .unwrap();
    let sessions: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(sessions.as_array().unwrap().len(), 1);
    assert_eq!(sessions[0]["subject"], "alice");
    let denied = cli(&w.agent, 45091, &["logins", "list"]).output().unwrap();
    assert!(
        !denied.status.success(),
        "a normal user may not list everyone's logins"
    );
    let out = cli(&w.agent, 0, &["logins", "revoke", "alice"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let alice = Probe {
        cgroup: &w.cg,
        uid: 45091,
        netns: None,
    };
    w.agent
        .expect_refusal(&alice, w.slot.v4(1), "run `portcullis login`");
    assert_eq!(w.agent.events_of("login.revoked").len(), 1);
}

#[test]
fn ctrl_c_during_login_cancels_it_at_the_agent() {
    if !enabled() {
        return;
    }
    let provider = OidcProvider::start(OidcOptions::default());
    let w = world("id-cancel", 30, &provider, "");
    let mut child = cli(&w.agent, 45101, &["login"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let url = loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "login ended early");
        if let Some(url) = complete_uri(&line) {
            break url;
        }
    };
    // Ctrl-C as soon as the code is shown: the login is one conversation with the agent,
    // so there is no moment in which the CLI is gone but the agent keeps polling.
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(!child.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(500));
    // The user finishing in the browser afterwards logs nobody in: the agent stopped polling.
    provider.complete_device_flow(&url, "alice").unwrap();
    std::thread::sleep(Duration::from_secs(7));
    let whoami = cli(&w.agent, 45101, &["whoami"]).output().unwrap();
    assert!(!whoami.status.success(), "{}", text(&whoami));
    let alice = Probe {
        cgroup: &w.cg,
        uid: 45101,
        netns: None,
    };
    w.agent
        .expect_refusal(&alice, w.slot.v4(1), "run `portcullis login`");
}

#[test]
fn service_identity_for_a_unit_matches_its_cgroup() {
    if !enabled() {
        return;
    }
    let provider = OidcProvider::start(OidcOptions::default());
    let dir = tempfile::tempdir().unwrap();
    // A unit is matched by its cgroup; a path with a slash names a cgroup below the cgroup2
    // root, which lets the test use its own cgroup in place of system.slice/<unit>.
    let extra = service_config(dir.path(), "unit-job", "unit = \"portcullis-e2e/id-unit\"");
    let w = world("id-unit", 31, &provider, &extra);
    // Any uid in that cgroup acts as the unit's identity.
    let job = Probe {
        cgroup: &w.cg,
        uid: 45111,
        netns: None,
    };
    connect_once_the_service_has_a_token(&job, &w);
    let opened = w.agent.wait_events("connection.opened", 1);
    assert_eq!(opened[0]["identity"]["kind"], "service");
    assert_eq!(opened[0]["identity"]["name"], "unit-job");
}

#[test]
fn login_no_wait_returns_at_once_and_the_agent_finishes_the_login() {
    if !enabled() {
        return;
    }
    let provider = OidcProvider::start(OidcOptions::default());
    let w = world("id-nowait", 32, &provider, "");
    let out = cli(&w.agent, 45121, &["login", "--no-wait"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("Not waiting"), "{shown}");
    let url = shown.lines().find_map(complete_uri).unwrap();
    provider.complete_device_flow(&url, "bob").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let whoami = cli(&w.agent, 45121, &["whoami"]).output().unwrap();
        if whoami.status.success() {
            assert!(text(&whoami).contains("Bob"), "{}", text(&whoami));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never finished the login"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
