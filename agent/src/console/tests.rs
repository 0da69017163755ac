//! The console's router in process, with a real approvals store and audit log in a
//! temporary directory and sessions put in place of a sign-in (the sign-in itself runs
//! against the real OpenID Provider in tests/console.rs).

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests"
)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use super::auth::{Auth, Roles, SignedIn, NO_UID, SESSION_COOKIE};
use super::routes::{self, State, CONTENT_SECURITY_POLICY};
use crate::approvals::{ApprovalStore, Ask, Asked, GrantEndListener, StoreOptions};
use crate::audit::AuditLog;
use crate::config::Config;
use crate::identity::{Identity, IdentityKind};

const CONFIG: &str = "[identity]\nissuer = \"https://idp.example\"\n\
    [console]\nlisten = \"127.0.0.1:9443\"\nauditor_groups = [\"audit\"]\napprover_groups = [\"dba-leads\"]\n\
    [[target]]\nname = \"billing-db\"\nprotocol = \"tcp\"\naddress = \"10.0.0.7\"\nport = 5432\n";

/// The policies the explain form is asked about.
const POLICIES: &str = r#"
@id("dba-reads")
permit (principal in Portcullis::Group::"dba-leads", action == Portcullis::Action::"query", resource)
when { context.statement_class == "read" };

@id("no-drops")
forbid (principal, action == Portcullis::Action::"query", resource)
when { context.command == "DROP TABLE" };
"#;

struct NoConnections(Mutex<Vec<String>>);
impl GrantEndListener for NoConnections {
    fn grant_ended(&self, grant_id: &str, _reason: &str) -> usize {
        self.0.lock().unwrap().push(grant_id.to_owned());
        0
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    state: Arc<State>,
}

fn person(subject: &str, groups: &[&str]) -> Identity {
    Identity {
        kind: IdentityKind::User,
        uid: NO_UID,
        gid: NO_UID,
        user: None,
        subject: Some(subject.into()),
        email: Some(format!("{subject}@example.test")),
        name: None,
        groups: groups.iter().map(|g| (*g).to_string()).collect(),
        issuer: Some("https://idp.example".into()),
    }
}

fn fixture() -> Fixture {
    fixture_with(CONFIG)
}

fn fixture_with(text: &str) -> Fixture {
    fixture_of(text, StoreOptions::default())
}

fn fixture_of(text: &str, options: StoreOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (config, targets) = Config::parse(std::path::Path::new("/t.toml"), text).unwrap();
    let settings = config.console().unwrap();
    let (audit, _) = AuditLog::open(
        &crate::config::AuditConfig::default(),
        &dir.path().join("audit"),
        Vec::new(),
    )
    .unwrap();
    let audit = Arc::new(audit);
    let approvals = ApprovalStore::open(
        &dir.path().join("approvals"),
        Arc::clone(&audit),
        Arc::new(NoConnections(Mutex::new(Vec::new()))),
        options,
    )
    .unwrap();
    let auth = Auth::new(&config, &settings, None).unwrap();
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("p.cedar"), POLICIES).unwrap();
    let policies = crate::policy::Policies::load(&policy_dir, Arc::clone(&audit)).unwrap();
    Fixture {
        _dir: dir,
        state: Arc::new(State {
            settings,
            auth,
            audit,
            approvals,
            registry: Arc::default(),
            policies,
            targets: Arc::new(targets),
            shipped_path: None,
            signing_key: None,
            central: None,
        }),
    }
}

impl Fixture {
    /// A signed-in session for `identity`; its cookie value and CSRF token.
    fn sign_in(&self, id: &str, identity: Identity) -> SignedIn {
        let roles = Roles::of(&identity.groups, &self.state.settings);
        let s = SignedIn {
            identity,
            roles,
            csrf: format!("csrf-of-{id}"),
            expires_ms: crate::audit::now_ms() + 600_000,
        };
        self.state.auth.insert_for_test(id, s.clone());
        s
    }

    fn ask_statement(&self, requester: Identity, statement: &str) -> String {
        self.state
            .approvals
            .ask(Ask {
                requester,
                asked: Asked::Statement {
                    connection_id: 7,
                    target: "db".into(),
                    statement: statement.into(),
                    parameters: vec![Some("\"><img src=x>".into()), None],
                },
                reason: "statement needs approval".into(),
                requirement: portcullis_policy::ApprovalRequirement {
                    quorums: vec![portcullis_policy::Quorum {
                        group: "dba-leads".into(),
                        approvals: 1,
                    }],
                },
                policy_ids: vec!["ddl-after-approval".into()],
                timeout: Duration::from_secs(600),
            })
            .unwrap()
            .id
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
        let response = routes::router(Arc::clone(&self.state))
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn get(
        &self,
        path: &str,
        cookie: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let mut r = Request::get(path);
        if let Some(c) = cookie {
            r = r.header(header::COOKIE, format!("{SESSION_COOKIE}={c}"));
        }
        self.send(r.body(Body::empty()).unwrap()).await
    }

    async fn post(
        &self,
        path: &str,
        cookie: Option<&str>,
        origin: Option<&str>,
        form: &[(&str, &str)],
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let body: Vec<String> = form
            .iter()
            .map(|(k, v)| format!("{k}={}", super::pages::query_value(v)))
            .collect();
        let mut r =
            Request::post(path).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            r = r.header(header::COOKIE, format!("other=1; {SESSION_COOKIE}={c}"));
        }
        if let Some(o) = origin {
            r = r.header(header::ORIGIN, o);
        }
        self.send(r.body(Body::from(body.join("&"))).unwrap()).await
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        self.state.audit.flush();
        portcullis_audit_store::Reader::all(self.state.audit.dir())
            .unwrap()
            .map(|r| serde_json::from_str::<Value>(&r.unwrap().event).unwrap())
            .filter(|e| e["event"] == kind)
            .collect()
    }

    fn state_of(&self, id: &str) -> &'static str {
        self.state.approvals.state_of(id).unwrap().state.as_str()
    }
}

#[tokio::test]
async fn without_a_session_pages_go_to_sign_in_and_forms_are_refused() {
    let f = fixture();
    for path in [
        "/",
        "/sessions",
        "/sessions/7?from=1",
        "/approvals",
        "/grants",
        "/health",
        "/live",
        "/explain",
    ] {
        let (status, headers, _) = f.get(path, None).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(headers[header::LOCATION], "/signin", "{path}");
        // An unknown or ended session is no session.
        let (status, _, _) = f.get(path, Some("not-a-session")).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{path}");
    }
    let alice = person("alice", &["engineering"]);
    let id = f.ask_statement(alice, "DROP TABLE t");
    let (status, _, body) = f
        .post(
            &format!("/approvals/{id}"),
            None,
            None,
            &[("csrf", "x"), ("decision", "approve"), ("reason", "ok")],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("You are not signed in"), "{body}");
    assert_eq!(f.state_of(&id), "pending");
    let denied = f.events("console.denied");
    assert!(
        denied
            .iter()
            .any(|e| e["reason"] == "deciding approvals: no session"),
        "{denied:?}"
    );
}

#[tokio::test]
async fn every_answer_carries_the_csp_no_framing_and_no_caching() {
    let f = fixture();
    let bob = f.sign_in("s-bob", person("bob", &["dba-leads", "audit"]));
    let answers = [
        f.get("/", None).await,
        f.get("/approvals", Some("s-bob")).await,
        f.get("/no-such-page", Some("s-bob")).await,
        f.get("/console.css", None).await,
        f.post("/signout", Some("s-bob"), None, &[("csrf", "wrong")])
            .await,
    ];
    for (status, headers, _) in &answers {
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY,
            "{status}"
        );
        assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers[header::REFERRER_POLICY], "same-origin");
    }
    // No script may run, inline or loaded; nothing but the console's own stylesheet.
    assert!(CONTENT_SECURITY_POLICY.starts_with("default-src 'none';"));
    assert!(!CONTENT_SECURITY_POLICY.contains("script-src"));
    assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
    let (_, _, page) = &answers[1];
    assert!(!page.contains("<script"), "{page}");
    assert!(!page.contains("style="), "{page}");
    assert!(
        page.contains(&format!("name=\"csrf\" value=\"{}\"", bob.csrf)),
        "{page}"
    );
    // Signing out ends the session server-side and clears the cookie.
    let (status, headers, _) = f
        .post("/signout", Some("s-bob"), None, &[("csrf", &bob.csrf)])
        .await;
    assert_eq!(status, StatusCode::OK);
    let cleared = headers[header::SET_COOKIE].to_str().unwrap();
    assert!(
        cleared.starts_with(&format!("{SESSION_COOKIE}=;")),
        "{cleared}"
    );
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    assert_eq!(
        f.get("/approvals", Some("s-bob")).await.0,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn a_reader_cannot_approve_and_a_forged_form_is_refused() {
    let f = fixture();
    let alice = person("alice", &["engineering"]);
    let id = f.ask_statement(alice, "CREATE TABLE t (id int)");
    let path = format!("/approvals/{id}");
    // An auditor reads sessions but decides nothing, even with their own valid token.
    let carol = f.sign_in("s-carol", person("carol", &["audit"]));
    let (status, _, body) = f.get("/approvals", Some("s-carol")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("Your roles (auditor) do not allow seeing approvals"),
        "{body}"
    );
    let (status, _, body) = f
        .post(
            &path,
            Some("s-carol"),
            None,
            &[
                ("csrf", &carol.csrf),
                ("decision", "approve"),
                ("reason", "ok"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(f.state_of(&id), "pending");

    let bob = f.sign_in("s-bob", person("bob", &["dba-leads"]));
    type Forged<'a> = (Option<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let forged: [Forged<'_>; 4] = [
        (
            None,
            vec![("decision", "approve"), ("reason", "ok")],
            "without this session's CSRF token",
        ),
        (
            None,
            vec![
                ("csrf", "csrf-of-s-carol"),
                ("decision", "approve"),
                ("reason", "ok"),
            ],
            "without this session's CSRF token",
        ),
        (
            None,
            vec![("csrf", ""), ("decision", "approve"), ("reason", "ok")],
            "without this session's CSRF token",
        ),
        (
            Some("https://evil.example"),
            vec![
                ("csrf", &bob.csrf),
                ("decision", "approve"),
                ("reason", "ok"),
            ],
            "another origin",
        ),
    ];
    for (origin, form, why) in &forged {
        let (status, _, body) = f.post(&path, Some("s-bob"), *origin, form).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{form:?}: {body}");
        assert_eq!(f.state_of(&id), "pending", "{form:?}");
        assert!(
            f.events("console.denied")
                .iter()
                .any(|e| e["reason"].as_str().unwrap().contains(why)
                    && e["identity"]["subject"] == "bob"),
            "{why}"
        );
    }
    let (status, _, body) = f
        .post(
            &path,
            Some("s-bob"),
            Some("https://127.0.0.1:9443"),
            &[
                ("csrf", &bob.csrf),
                ("decision", "approve"),
                ("reason", "looks right"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains(&format!("Request {id} is now approved.")),
        "{body}"
    );
    let approved = f.events("approval.approved");
    assert_eq!(approved.len(), 1, "{approved:?}");
    assert_eq!(approved[0]["identity"]["subject"], "bob");
    assert_eq!(approved[0]["identity"]["uid"], u64::from(NO_UID));
    let carols = f.events("console.denied");
    assert!(
        carols.iter().any(|e| e["identity"]["subject"] == "carol"
            && e["reason"] == "deciding approvals: not allowed to auditor"),
        "{carols:?}"
    );
}

#[tokio::test]
async fn the_requester_cannot_approve_their_own_request_in_the_console() {
    let f = fixture();
    // alice is an approver herself: the store, not the page, refuses her own request.
    let alice = f.sign_in("s-alice", person("alice", &["dba-leads"]));
    let id = f.ask_statement(alice.identity.clone(), "DROP TABLE t");
    let (status, _, body) = f
        .post(
            &format!("/approvals/{id}"),
            Some("s-alice"),
            None,
            &[
                ("csrf", &alice.csrf),
                ("decision", "approve"),
                ("reason", "mine"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("you asked for this yourself; someone else must approve it"),
        "{body}"
    );
    assert_eq!(f.state_of(&id), "pending");
    assert!(f.events("approval.approved").is_empty());
}

#[tokio::test]
async fn a_requester_in_the_break_glass_group_breaks_the_glass_on_their_own_request_and_nobody_else_can(
) {
    let f = fixture_of(
        CONFIG,
        StoreOptions {
            break_glass_group: Some("oncall".into()),
            ..StoreOptions::default()
        },
    );
    let alice = f.sign_in("s-alice", person("alice", &["dba-leads", "oncall"]));
    let bob = f.sign_in("s-bob", person("bob", &["dba-leads", "oncall"]));
    let dave = f.sign_in("s-dave", person("dave", &["dba-leads"]));
    let id = f.ask_statement(alice.identity.clone(), "DROP TABLE t");
    let daves = f.ask_statement(dave.identity.clone(), "DROP TABLE u");
    let glass = |csrf: &str, reason: &str| {
        vec![
            ("csrf".to_string(), csrf.to_string()),
            ("decision".to_string(), "break_glass".to_string()),
            ("reason".to_string(), reason.to_string()),
        ]
    };
    let post = |path: String, session: &'static str, form: Vec<(String, String)>| {
        let f = &f;
        async move {
            let form: Vec<(&str, &str)> =
                form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            f.post(&path, Some(session), None, &form).await
        }
    };

    // The page offers the glass on one's own request only, and only to the group's members.
    let (_, _, page) = f.get("/approvals", Some("s-alice")).await;
    assert!(page.contains(r#"value="break_glass""#), "{page}");
    assert!(
        page.contains("you break the glass as a member of oncall"),
        "{page}"
    );
    let (_, _, page) = f.get("/approvals", Some("s-bob")).await;
    assert!(!page.contains(r#"value="break_glass""#), "{page}");
    let (_, _, page) = f.get("/approvals", Some("s-dave")).await;
    assert!(!page.contains(r#"value="break_glass""#), "{page}");
    assert!(page.contains("This is your own request: another approver decides it.</p>"));

    // Whatever the page offers, the store decides: bob for alice, dave without the group,
    // alice without a reason, and a form without the CSRF token are all refused.
    let refusals = [
        (
            id.clone(),
            "s-bob",
            glass(&bob.csrf, "it is urgent"),
            "approves only your own request",
        ),
        (
            daves.clone(),
            "s-dave",
            glass(&dave.csrf, "it is urgent"),
            "for members of `oncall` only",
        ),
        (
            id.clone(),
            "s-alice",
            glass(&alice.csrf, "  "),
            "breaking the glass needs a reason",
        ),
        (
            id.clone(),
            "s-alice",
            glass("csrf-of-s-bob", "it is urgent"),
            "does not carry your session&#39;s token",
        ),
    ];
    for (request, session, form, why) in refusals {
        let (status, _, body) = post(format!("/approvals/{request}"), session, form).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{session}: {body}");
        assert!(body.contains(why), "{session}: {body}");
        assert_eq!(f.state_of(&request), "pending", "{session}");
    }
    assert!(f.events("approval.break_glass").is_empty());
    let denied = f.events("console.denied");
    assert!(
        denied.iter().any(|e| e["identity"]["subject"] == "bob"
            && e["reason"]
                .as_str()
                .unwrap()
                .contains("approves only your own request")),
        "{denied:?}"
    );

    // Alice breaks the glass with a reason: approved at once, as the CLI's --break-glass.
    let (status, _, body) = post(
        format!("/approvals/{id}"),
        "s-alice",
        glass(&alice.csrf, "billing is down"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains(&format!("Request {id} is now approved.")),
        "{body}"
    );
    assert_eq!(f.state_of(&id), "approved");
    let broken = f.events("approval.break_glass");
    assert_eq!(broken.len(), 1, "{broken:?}");
    assert_eq!(broken[0]["identity"]["subject"], "alice");
    let why = broken[0]["reason"].as_str().unwrap();
    assert!(
        why.starts_with("break-glass by alice@example.test as a member of `oncall`")
            && why.ends_with(": billing is down"),
        "{why}"
    );
    assert!(f.events("approval.approved").is_empty());

    // Without a configured group nobody breaks the glass, whatever their groups.
    let off = fixture();
    let carl = off.sign_in("s-carl", person("carl", &["dba-leads", "oncall"]));
    let his = off.ask_statement(carl.identity.clone(), "DROP TABLE v");
    let (_, _, page) = off.get("/approvals", Some("s-carl")).await;
    assert!(!page.contains(r#"value="break_glass""#), "{page}");
    let form = glass(&carl.csrf, "it is urgent");
    let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, _, body) = off
        .post(&format!("/approvals/{his}"), Some("s-carl"), None, &form)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("break-glass is not configured"), "{body}");
    assert_eq!(off.state_of(&his), "pending");
}

#[tokio::test]
async fn hostile_statements_and_names_are_escaped() {
    let f = fixture();
    let mut mallory = person("mallory", &["engineering"]);
    mallory.email = Some("<b>m</b>@example.test".into());
    f.ask_statement(
        mallory,
        "SELECT '<script>alert(1)</script>' -- \" onmouseover=",
    );
    f.sign_in("s-bob", person("bob", &["dba-leads"]));
    let (status, _, page) = f.get("/approvals", Some("s-bob")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(!page.contains("<script>"), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(page.contains("&lt;b&gt;m&lt;/b&gt;@example.test"), "{page}");
    assert!(
        page.contains("&#39;&quot;&gt;&lt;img src=x&gt;&#39;"),
        "{page}"
    );
    assert!(!page.contains("<img"), "{page}");
}

#[tokio::test]
async fn a_callback_without_its_sign_in_is_refused_and_recorded() {
    let f = fixture();
    let (status, headers, body) = f
        .get("/auth/callback?code=stolen&state=guessed", None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("not started in this browser"), "{body}");
    assert!(headers
        .get(header::SET_COOKIE)
        .is_some_and(|c| c.to_str().unwrap().contains("Max-Age=0")));
    assert!(!headers.get_all(header::SET_COOKIE).iter().any(|c| c
        .to_str()
        .unwrap()
        .starts_with(&format!("{SESSION_COOKIE}="))));
    let denied = f.events("console.denied");
    assert!(
        denied
            .iter()
            .any(|e| e["reason"].as_str().unwrap().starts_with("sign-in refused")),
        "{denied:?}"
    );
}

#[tokio::test]
async fn a_callback_with_another_state_is_refused_and_its_sign_in_is_spent() {
    let f = fixture();
    f.state
        .auth
        .insert_flow_for_test("flow-1", "the-real-state");
    let callback = |state: &'static str| {
        Request::get(format!("/auth/callback?code=c&state={state}"))
            .header(
                header::COOKIE,
                format!("{}=flow-1", super::auth::FLOW_COOKIE),
            )
            .body(Body::empty())
            .unwrap()
    };
    // The issuer is never asked: the state is checked first (the fixture's issuer does not
    // exist, so reaching it would read as another error).
    let (status, _, body) = f.send(callback("forged-state")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("does not carry this sign-in&#39;s state"),
        "{body}"
    );
    // One answer per sign-in: the right state afterwards finds nothing to finish.
    let (status, _, body) = f.send(callback("the-real-state")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("not started in this browser"), "{body}");
}

/// An issuer on a loopback port: discovery, a key set with the identity tests' RSA key,
/// and a token endpoint that answers every code with the ID token the test put in `next`.
struct Issuer {
    url: String,
    next: Arc<Mutex<String>>,
}

impl Issuer {
    async fn start() -> Self {
        use rsa::pkcs8::DecodePublicKey;
        use rsa::traits::PublicKeyParts;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let public = rsa::RsaPublicKey::from_public_key_pem(
            std::str::from_utf8(include_bytes!("../identity/testdata/rsa1.pub.pem")).unwrap(),
        )
        .unwrap();
        let b64 = |v: Vec<u8>| {
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, v)
        };
        let jwks =
            serde_json::json!({"keys": [{"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
            "n": b64(public.n().to_bytes_be()), "e": b64(public.e().to_bytes_be())}]})
            .to_string();
        let discovery = serde_json::json!({
            "issuer": url, "authorization_endpoint": format!("{url}/auth"),
            "token_endpoint": format!("{url}/token"), "jwks_uri": format!("{url}/jwks"),
            "response_types_supported": ["code"], "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
        .to_string();
        let next = Arc::new(Mutex::new(String::new()));
        let token = Arc::clone(&next);
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 8192];
                // The token request's form follows its head; one read past the head is
                // enough for these small bodies, and the answer closes the connection.
                while !String::from_utf8_lossy(&request).contains("\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&request).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let body = match path.as_str() {
                    "/.well-known/openid-configuration" => discovery.clone(),
                    "/jwks" => jwks.clone(),
                    "/token" => serde_json::json!({"access_token": "at", "token_type": "Bearer",
                        "expires_in": 300, "id_token": token.lock().unwrap().clone()})
                    .to_string(),
                    _ => "{}".into(),
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.unwrap();
                let _ = socket.shutdown().await;
            }
        });
        Self { url, next }
    }

    /// Signs the next ID token: `nonce` (if any) and `groups` for `sub`.
    fn answer_with(&self, sub: &str, groups: &[&str], nonce: Option<&str>) {
        let now = crate::audit::now_ms() / 1000;
        let mut claims = serde_json::json!({"iss": self.url, "aud": "portcullis", "sub": sub,
            "email": format!("{sub}@example.test"), "groups": groups, "iat": now, "exp": now + 600});
        if let Some(n) = nonce {
            claims["nonce"] = n.into();
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some("k1".into());
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(include_bytes!(
            "../identity/testdata/rsa1.pem"
        ))
        .unwrap();
        *self.next.lock().unwrap() = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    }
}

#[tokio::test]
async fn an_id_token_for_another_sign_in_or_without_a_role_gives_no_session() {
    let issuer = Issuer::start().await;
    let f = fixture_with(&format!(
        "[identity]\nissuer = \"{}\"\n[insecure]\nallow_plaintext_loopback = true\n\
         [console]\nlisten = \"127.0.0.1:9443\"\nauditor_groups = [\"audit\"]\n",
        issuer.url
    ));
    let callback = |flow: &str| {
        f.state.auth.insert_flow_for_test(flow, "state");
        Request::get("/auth/callback?code=c&state=state")
            .header(
                header::COOKIE,
                format!("{}={flow}", super::auth::FLOW_COOKIE),
            )
            .body(Body::empty())
            .unwrap()
    };
    // The flow's nonce is "nonce" (insert_flow_for_test): a token minted for another
    // sign-in, or with none, is refused although its signature and audience are good.
    for (flow, nonce) in [("f1", Some("another-sign-ins-nonce")), ("f2", None)] {
        issuer.answer_with("carol", &["audit"], nonce);
        let (status, headers, body) = f.send(callback(flow)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{nonce:?}: {body}");
        assert!(
            body.contains("does not carry this sign-in&#39;s nonce"),
            "{body}"
        );
        assert!(!headers.get_all(header::SET_COOKIE).iter().any(|c| c
            .to_str()
            .unwrap()
            .starts_with(&format!("{SESSION_COOKIE}="))));
    }
    // The right nonce but no console group: refused, named.
    issuer.answer_with("erin", &["engineering"], Some("nonce"));
    let (status, _, body) = f.send(callback("f3")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("erin@example.test holds no console role (groups: engineering)"),
        "{body}"
    );
    // The right nonce and a role: signed in, with the session cookie's flags.
    issuer.answer_with("carol", &["audit"], Some("nonce"));
    let (status, headers, body) = f.send(callback("f4")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let cookie = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|c| c.to_str().unwrap().to_string())
        .find(|c| c.starts_with(&format!("{SESSION_COOKIE}=")))
        .unwrap();
    for flag in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.split("; ").any(|a| a == flag), "{flag}: {cookie}");
    }
    let id = cookie
        .split(';')
        .next()
        .unwrap()
        .split_once('=')
        .unwrap()
        .1
        .to_string();
    assert_eq!(f.get("/sessions", Some(&id)).await.0, StatusCode::OK);
    let denied = f.events("console.denied");
    assert_eq!(
        denied
            .iter()
            .filter(|e| e["reason"]
                == "sign-in refused: the ID token does not carry this sign-in's nonce")
            .count(),
        2,
        "{denied:?}"
    );
    assert_eq!(f.events("console.signin").len(), 1);
}

#[tokio::test]
async fn an_approver_sees_grants_and_revokes_one_and_an_auditor_cannot() {
    let f = fixture();
    let alice = person("alice", &["engineering"]);
    let request = f
        .state
        .approvals
        .ask(Ask {
            requester: alice,
            asked: Asked::Grant {
                target: "db".into(),
                actions: vec!["connect".into()],
                duration_secs: 3600,
            },
            reason: "INC-1 <urgent>".into(),
            requirement: portcullis_policy::ApprovalRequirement {
                quorums: vec![portcullis_policy::Quorum {
                    group: "dba-leads".into(),
                    approvals: 1,
                }],
            },
            policy_ids: vec!["prod-connect".into()],
            timeout: Duration::from_secs(600),
        })
        .unwrap();
    let bob = f.sign_in("s-bob", person("bob", &["dba-leads"]));
    let carol = f.sign_in("s-carol", person("carol", &["audit"]));
    let (status, _, body) = f
        .post(
            &format!("/approvals/{}", request.id),
            Some("s-bob"),
            None,
            &[
                ("csrf", &bob.csrf),
                ("decision", "approve"),
                ("reason", "ok"),
            ],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let grant = f
        .state
        .approvals
        .state_of(&request.id)
        .unwrap()
        .grant_id
        .unwrap();
    let (status, _, page) = f.get("/grants", Some("s-bob")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(&format!("action=\"/grants/{grant}/revoke\"")),
        "{page}"
    );
    // The auditor neither sees nor revokes grants.
    assert_eq!(
        f.get("/grants", Some("s-carol")).await.0,
        StatusCode::FORBIDDEN
    );
    let path = format!("/grants/{grant}/revoke");
    let (status, _, _) = f
        .post(
            &path,
            Some("s-carol"),
            None,
            &[("csrf", &carol.csrf), ("reason", "x")],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(f.events("grant.revoked").is_empty());
    let (status, _, body) = f
        .post(
            &path,
            Some("s-bob"),
            None,
            &[("csrf", &bob.csrf), ("reason", "done early")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(&format!("Grant {grant} revoked")), "{body}");
    let revoked = f.events("grant.revoked");
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0]["identity"]["subject"], "bob");
}

#[tokio::test]
async fn an_auditor_searches_and_exports_the_trail_and_an_approver_cannot() {
    use crate::audit::{AuditEvent, EventKind};
    let f = fixture();
    for i in 0..3 {
        let mut ev = AuditEvent::new(EventKind::ConnectionRefused)
            .reason(format!("refused <script>alert({i})</script>"));
        ev.target = Some("db".into());
        f.state.audit.record(ev);
    }
    f.state
        .audit
        .record(AuditEvent::new(EventKind::AgentStarted).reason("started"));
    f.state.audit.flush();
    f.sign_in("s-carol", person("carol", &["audit"]));
    f.sign_in("s-bob", person("bob", &["dba-leads"]));
    let (status, _, page) = f
        .get("/audit?kind=connection.refused&text=alert", Some("s-carol"))
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("3 events in records"), "{page}");
    assert!(
        page.contains("refused &lt;script&gt;alert(2)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains("<script>"), "{page}");
    assert!(!page.contains("agent.started"), "{page}");
    let (status, headers, body) = f
        .get("/audit.ndjson?kind=connection.refused", Some("s-carol"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/x-ndjson");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{body}");
    // Oldest first, as stored.
    assert_eq!(lines[0]["reason"], "refused <script>alert(0)</script>");
    assert!(lines.iter().all(|e| e["event"] == "connection.refused"));
    // A bad time is named, not guessed.
    let (_, _, page) = f.get("/audit?since=yesterday", Some("s-carol")).await;
    assert!(page.contains("since:"), "{page}");
    for path in ["/audit", "/audit.ndjson"] {
        let (status, _, _) = f.get(path, Some("s-bob")).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }
}

#[tokio::test]
async fn an_auditor_explains_a_decision_in_the_page_as_the_cli_does_and_an_approver_cannot() {
    let f = fixture();
    f.sign_in("aud", person("carol", &["audit"]));
    f.sign_in("appr", person("bob", &["dba-leads"]));
    let (auditor, approver) = ("aud", "appr");
    // The form alone, then a question: a read by a DBA lead is allowed by `dba-reads`.
    let (status, _, page) = f.get("/explain", Some(auditor)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains(r#"<option value="billing-db">"#), "{page}");
    let asked = "/explain?target=billing-db&kind=user&subject=alice&groups=dba-leads&sql=SELECT+1%3B+DROP+TABLE+t%3B+%3Cscript%3E";
    let (status, _, page) = f.get(asked, Some(auditor)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let set = f.state.policies.current();
    let cli = crate::policy::explain(
        &set,
        &f.state.targets[0],
        crate::policy::ExplainInput {
            principal: Some(portcullis_policy::Principal {
                kind: portcullis_policy::PrincipalKind::User,
                id: "alice".into(),
                email: None,
                name: None,
                groups: vec!["dba-leads".into()],
            }),
            action: "connect".into(),
            comm: "psql".into(),
            uid: 1000,
            time: i64::try_from(crate::audit::now_ms() / 1000).unwrap(),
            sql: Some("SELECT 1; DROP TABLE t; <script>".into()),
            ..Default::default()
        },
    );
    // The SQL does not parse (`<script>`): the page says so as the CLI would, escaped.
    let Err(why) = cli else { panic!("{cli:?}") };
    assert!(page.contains(&super::pages::esc(&why)), "{page}");
    assert!(!page.contains("<script>"), "{page}");
    let (_, _, page) = f
        .get(
            "/explain?target=billing-db&subject=alice&groups=dba-leads&sql=SELECT+1%3B+DROP+TABLE+t",
            Some(auditor),
        )
        .await;
    assert!(page.contains("dba-reads"), "{page}");
    assert!(page.contains("no-drops"), "{page}");
    // An unknown target or no principal is said, not guessed.
    let (_, _, page) = f
        .get("/explain?target=nope&subject=alice", Some(auditor))
        .await;
    assert!(page.contains("no target named `nope`"), "{page}");
    let (_, _, page) = f.get("/explain?target=billing-db", Some(auditor)).await;
    assert!(page.contains("name the principal"), "{page}");
    // An approver who is neither auditor nor admin is refused, on the record.
    let (status, _, _) = f.get("/explain", Some(approver)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(f
        .events("console.denied")
        .iter()
        .any(|e| e["reason"].as_str().unwrap().contains("explaining policy")));
}

#[tokio::test]
async fn an_admin_sees_the_policy_generation_and_how_far_the_central_store_is_behind() {
    let config = CONFIG.replace(
        "approver_groups = [\"dba-leads\"]\n",
        "approver_groups = [\"dba-leads\"]\nadmin_groups = [\"platform\"]\n",
    );
    let mut f = fixture_with(&config);
    let progress = f._dir.path().join("audit-shipped");
    std::fs::write(&progress, "1\n").unwrap();
    Arc::get_mut(&mut f.state).unwrap().shipped_path = Some(progress.clone());
    for i in 0..3 {
        f.state.audit.record(
            crate::audit::AuditEvent::new(crate::audit::EventKind::AgentStarted)
                .reason(format!("{i}")),
        );
    }
    f.state.audit.flush();
    let last = f.state.audit.last_seq();
    assert!(last >= 3, "{last}");
    f.sign_in("pat", person("pat", &["platform"]));
    let (status, _, page) = f.get("/health", Some("pat")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("generation 1: 2 policies"), "{page}");
    assert!(
        page.contains(&format!(
            "shipped up to record 1; {} record(s) behind",
            last - 1
        )),
        "{page}"
    );
    // A progress file that cannot be read is said, not taken for zero.
    std::fs::write(&progress, "garbage").unwrap();
    let (_, _, page) = f.get("/health", Some("pat")).await;
    assert!(page.contains("progress unknown"), "{page}");
    // Without [audit.central], it says so.
    let plain = fixture_with(&config);
    plain.sign_in("pat", person("pat", &["platform"]));
    let (_, _, page) = plain.get("/health", Some("pat")).await;
    assert!(
        page.contains("Central audit store</th><td>not configured"),
        "{page}"
    );
}

#[tokio::test]
async fn an_auditor_replays_a_recorded_terminal_step_by_step_without_a_script() {
    let f = fixture();
    let recordings = crate::audit::recording::Recordings::new(Arc::clone(&f.state.audit));
    let rec = recordings
        .start(
            77,
            b"{\"version\":2,\"width\":40,\"height\":5,\"command\":\"bash -c 'ls; rm -rf x'\"}\n"
                .to_vec(),
            crate::config::RecordingFailure::Close,
        )
        .await
        .unwrap();
    for line in [
        "[0.5,\"o\",\"$ ls\\r\\n\"]\n",
        "[1.0,\"o\",\"notes.txt\\r\\n$ \"]\n",
        "[2.0,\"m\",\"before rm\"]\n",
        // A line editor's redraw and a hostile escape-laden name: shown as text, escaped.
        "[3.0,\"o\",\"rm -rf <script>x\\u001b[31m\\r\\n\"]\n",
        "[9.0,\"o\",\"\\u001b[2J\\u001b[Hcleared\"]\n",
    ] {
        rec.append(line.as_bytes().to_vec()).await.unwrap();
    }
    rec.finish().await.unwrap();
    f.state.audit.flush();
    f.sign_in("aud", person("carol", &["audit"]));
    f.sign_in("appr", person("bob", &["dba-leads"]));

    // The timeline links to the replay; the replay at 1 s shows what the terminal showed.
    let (status, _, page) = f.get("/sessions/77", Some("aud")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains(r#"href="/sessions/77/replay""#), "{page}");
    let (status, _, page) = f.get("/sessions/77/replay?t=1", Some("aud")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("$ ls\nnotes.txt\n$</pre>"), "{page}");
    assert!(page.contains("at 1.0 s of 9.0 s"), "{page}");
    assert!(
        page.contains(r#"<a href="/sessions/77/replay?n=0&amp;t=2.0">+1 s</a>"#),
        "{page}"
    );
    assert!(page.contains("before rm"), "{page}");
    // At 3 s the hostile line is text; the colour sequence drew nothing.
    let (_, _, page) = f.get("/sessions/77/replay?t=3", Some("aud")).await;
    assert!(page.contains("$ rm -rf &lt;script&gt;x</pre>"), "{page}");
    assert!(!page.contains("<script"), "{page}");
    // The end (the default) shows the cleared screen.
    let (_, _, page) = f.get("/sessions/77/replay", Some("aud")).await;
    assert!(
        page.contains(r#"aria-label="The terminal at 9.0 s">cleared</pre>"#),
        "{page}"
    );
    // The page carries the console's CSP: no script at all.
    let (_, headers, _) = f.get("/sessions/77/replay", Some("aud")).await;
    assert_eq!(
        headers[header::CONTENT_SECURITY_POLICY],
        CONTENT_SECURITY_POLICY
    );
    // No recording: said. An approver who is not an auditor: refused.
    let (status, _, page) = f.get("/sessions/78/replay", Some("aud")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{page}");
    let (status, _, _) = f.get("/sessions/77/replay", Some("appr")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_replay_plays_by_itself_a_second_a_step_at_the_chosen_speed_and_pauses_without_a_script()
{
    let f = fixture();
    let recordings = crate::audit::recording::Recordings::new(Arc::clone(&f.state.audit));
    let rec = recordings
        .start(
            78,
            b"{\"version\":2,\"width\":40,\"height\":5}\n".to_vec(),
            crate::config::RecordingFailure::Close,
        )
        .await
        .unwrap();
    for line in [
        "[0.5,\"o\",\"$ date\\r\\n\"]\n",
        "[4.0,\"o\",\"Sat Dec  5\\r\\n$ \"]\n",
        "[6.0,\"o\",\"exit\"]\n",
    ] {
        rec.append(line.as_bytes().to_vec()).await.unwrap();
    }
    rec.finish().await.unwrap();
    f.state.audit.flush();
    f.sign_in("aud", person("carol", &["audit"]));

    // Paused (the default): no refresh, and a link to play at each speed from here.
    let (_, _, page) = f.get("/sessions/78/replay?t=1", Some("aud")).await;
    assert!(!page.contains("http-equiv=\"refresh\""), "{page}");
    assert!(
        page.contains(r#"<a href="/sessions/78/replay?n=0&amp;t=1.0&amp;play=2">Play at 2×</a>"#),
        "{page}"
    );
    // Playing at 2×: the browser is asked for the frame 2 s later in 1 s, Pause stays here.
    let (status, headers, page) = f.get("/sessions/78/replay?t=1&play=2", Some("aud")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(r#"<meta http-equiv="refresh" content="1; url=/sessions/78/replay?n=0&amp;t=3.0&amp;play=2">"#),
        "{page}"
    );
    assert!(page.contains("<strong>playing at 2×</strong>"), "{page}");
    assert!(
        page.contains(r#"<a href="/sessions/78/replay?n=0&amp;t=1.0">Pause</a>"#),
        "{page}"
    );
    assert!(page.contains("$ date</pre>"), "{page}");
    assert_eq!(
        headers[header::CONTENT_SECURITY_POLICY],
        CONTENT_SECURITY_POLICY
    );
    // The last step stops at the end, and at the end it stops playing.
    let (_, _, page) = f.get("/sessions/78/replay?t=5&play=2", Some("aud")).await;
    assert!(page.contains("t=6&amp;play=2\">"), "{page}");
    let (_, _, page) = f.get("/sessions/78/replay?t=6&play=2", Some("aud")).await;
    assert!(!page.contains("http-equiv=\"refresh\""), "{page}");
    assert!(page.contains("$ exit</pre>"), "{page}");
    // A speed not offered plays nothing.
    let (_, _, page) = f
        .get("/sessions/78/replay?t=1&play=1000", Some("aud"))
        .await;
    assert!(!page.contains("http-equiv=\"refresh\""), "{page}");
}

#[tokio::test]
async fn a_recording_whose_client_sent_no_window_size_replays_at_80_by_24() {
    // `ssh -tt` without a terminal asks for a pty of 0×0 (found in Chromium by the SSH
    // replay test: the page showed an empty screen).
    let f = fixture();
    let recordings = crate::audit::recording::Recordings::new(Arc::clone(&f.state.audit));
    let rec = recordings
        .start(
            79,
            b"{\"version\":2,\"width\":0,\"height\":0}\n".to_vec(),
            crate::config::RecordingFailure::Close,
        )
        .await
        .unwrap();
    rec.append(b"[0.5,\"o\",\"$ echo hi\\r\\nhi\\r\\n\"]\n".to_vec())
        .await
        .unwrap();
    rec.append(b"[0.64,\"r\",\"0x0\"]\n".to_vec())
        .await
        .unwrap();
    rec.finish().await.unwrap();
    f.state.audit.flush();
    f.sign_in("aud", person("carol", &["audit"]));
    let (status, _, page) = f.get("/sessions/79/replay", Some("aud")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("(login shell, 80×24)"), "{page}");
    assert!(page.contains(">$ echo hi\nhi</pre>"), "{page}");
    // An end that is not a whole tenth: End and the last step of a playing replay go to it
    // exactly, and there playing stops (rounded to 0.6 it reloaded 0.6 for ever).
    let (_, _, page) = f.get("/sessions/79/replay?t=0&play=8", Some("aud")).await;
    assert!(page.contains("t=0.64&amp;play=8\">"), "{page}");
    assert!(page.contains(r#"t=0.64">End</a>"#), "{page}");
    let (_, _, page) = f
        .get("/sessions/79/replay?t=0.64&play=8", Some("aud"))
        .await;
    assert!(!page.contains("http-equiv=\"refresh\""), "{page}");
}

#[tokio::test]
async fn a_sessions_sftp_operations_are_a_table_of_their_own_with_sizes_hashes_and_answers() {
    use portcullis_core::event::SftpFields;
    let f = fixture();
    let sftp = |fields: SftpFields, decision: Option<crate::audit::Decision>| {
        let mut ev = crate::audit::AuditEvent::new(crate::audit::EventKind::SshSftp);
        ev.connection_id = Some(91);
        ev.decision = decision;
        ev.ssh = Some(Box::new(portcullis_core::event::SshFields {
            sftp: Some(Box::new(fields)),
            ..Default::default()
        }));
        f.state.audit.record(ev);
    };
    let mut opened = crate::audit::AuditEvent::new(crate::audit::EventKind::ConnectionOpened);
    opened.connection_id = Some(91);
    f.state.audit.record(opened);
    sftp(
        SftpFields {
            sftp_operation: "close".into(),
            path: Some("/home/alice/report<1>.csv".into()),
            sftp_status: Some("ok".into()),
            bytes_written: Some(1234),
            write_sha256: Some("ab".repeat(32)),
            ..SftpFields::default()
        },
        Some(crate::audit::Decision::Allow),
    );
    sftp(
        SftpFields {
            sftp_operation: "rename".into(),
            path: Some("/tmp/a".into()),
            new_path: Some("/tmp/b".into()),
            sftp_status: Some("permission denied".into()),
            ..SftpFields::default()
        },
        Some(crate::audit::Decision::Allow),
    );
    sftp(
        SftpFields {
            sftp_operation: "open".into(),
            path: Some("/etc/shadow".into()),
            open_flags: Some("read".into()),
            ..SftpFields::default()
        },
        Some(crate::audit::Decision::Deny),
    );
    f.state.audit.flush();
    f.sign_in("aud", person("carol", &["audit"]));
    let (status, _, page) = f.get("/sessions/91", Some("aud")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(r#"<h2 id="files">File operations</h2>"#),
        "{page}"
    );
    let rows: Vec<&str> = page
        .split("<tr><td>")
        .skip(1)
        .map(|r| r.split("</tr>").next().unwrap())
        .collect();
    assert_eq!(rows.len(), 3, "{page}");
    assert!(
        rows[0].contains(
            "<td>close</td><td>/home/alice/report&lt;1&gt;.csv</td><td>ok</td><td>-</td>"
        ) && rows[0].contains(&format!(
            "1234 bytes<br><code>sha256 {}</code>",
            "ab".repeat(32)
        )),
        "{}",
        rows[0]
    );
    assert!(
        rows[1].contains("<td>rename</td><td>/tmp/a -&gt; /tmp/b</td><td>permission denied</td>"),
        "{}",
        rows[1]
    );
    assert!(
        rows[2].contains("<td>open (read)</td><td>/etc/shadow</td><td>refused by policy</td>"),
        "{}",
        rows[2]
    );
    // `sessions show` prints the same substance, a line each.
    let (events, _) = crate::audit::query::session_events(f.state.audit.dir(), 91, 1).unwrap();
    let lines: Vec<String> = crate::audit::query::file_operations(&events)
        .iter()
        .map(crate::audit::query::FileOperation::line)
        .collect();
    assert!(
        lines[0].ends_with(&format!(
            " close /home/alice/report<1>.csv: ok, 1234 bytes written (sha256 {})",
            "ab".repeat(32)
        )),
        "{lines:?}"
    );
    assert!(
        lines[1].ends_with(" rename /tmp/a -> /tmp/b: permission denied"),
        "{lines:?}"
    );
    assert!(
        lines[2].ends_with(" open /etc/shadow [read]: refused by policy"),
        "{lines:?}"
    );
    // A session without file operations has no such table.
    let (_, _, page) = f.get("/sessions/92", Some("aud")).await;
    assert!(!page.contains("File operations"), "{page}");
}

#[tokio::test]
async fn an_auditor_downloads_the_access_review_sealed_as_the_cli_makes_it() {
    let f = fixture();
    for i in 0..3 {
        f.state.audit.record(
            crate::audit::AuditEvent::new(crate::audit::EventKind::AgentStarted)
                .reason(format!("{i}")),
        );
    }
    f.state.audit.flush();
    f.sign_in("aud", person("carol", &["audit"]));
    f.sign_in("appr", person("bob", &["dba-leads"]));
    let (status, _, page) = f.get("/review", Some("aud")).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains(r#"action="/review/report""#), "{page}");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let (status, headers, report) = f
        .get(
            &format!("/review/report?from=2026-01-01&to={today}&format=html"),
            Some("aud"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(headers["x-portcullis-verified"], "yes");
    assert!(headers[header::CONTENT_DISPOSITION]
        .to_str()
        .unwrap()
        .starts_with("attachment; filename=\"portcullis-review-2026-01-01-"));
    assert!(report.starts_with("<!DOCTYPE html>"), "{report}");
    assert!(report.contains(r#"<section id="signature""#), "{report}");
    // The same body `portcullis review report` computes over the same trail and policies.
    let policies = f.state.policies.current();
    let targets: Vec<portcullis_policy::Target> =
        f.state.targets.iter().map(crate::policy::target).collect();
    let cli = crate::review::run(
        f.state.audit.dir(),
        &crate::review::PolicyView {
            policies: Some(&policies),
            targets: &targets,
        },
        &crate::review::Options {
            period: crate::review::period("2026-01-01", &today).unwrap(),
            target: None,
            stale_days: 30,
            format: crate::review::Format::Html,
        },
        None,
    )
    .unwrap();
    assert_eq!(report, cli.text);
    let (_, headers, csv) = f
        .get(
            &format!("/review/report?from=2026-01-01&to={today}&format=csv"),
            Some("aud"),
        )
        .await;
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    assert!(csv.starts_with("section,"), "{csv}");
    // A wrong date is said on the form; an approver who is not an auditor is refused.
    let (status, _, page) = f
        .get("/review/report?from=yesterday&to=2026-12-31", Some("aud"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("is not a date"), "{page}");
    let (status, _, _) = f
        .get("/review/report?from=2026-01-01&to=2026-12-31", Some("appr"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}
