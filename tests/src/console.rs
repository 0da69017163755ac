//! The web console's end-to-end world, shared by tests/console.rs (an HTTP client) and
//! tests/console_browser.rs (headless Chromium): the real agent serving the console on the
//! slot's server port of 127.0.0.1 with a certificate from its CA, the real OpenID Provider
//! with the console as a public client (authorization code with PKCE), and a PostgreSQL
//! target whose DDL waits for dba-leads' approval.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test harness: a failure is a test failure"
)]

use std::path::PathBuf;
use std::process::Child;

use serde_json::json;

use crate::oidc::{OidcOptions, OidcProvider, OidcUser};
use crate::postgres::Postgres;
use crate::{Agent, Slot, TestCgroup};

/// The console's client at the provider.
pub const CONSOLE_CLIENT: &str = "portcullis-console";

/// Reads pass, DDL waits for dba-leads, anything else (an INSERT) is denied.
pub const STATEMENT_POLICIES: &str = r#"
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

pub struct World {
    pub provider: OidcProvider,
    pub postgres: Postgres,
    pub cg: TestCgroup,
    pub agent: Agent,
    /// `https://127.0.0.1:<slot's server port>`.
    pub console: String,
    _files: tempfile::TempDir,
}

impl World {
    /// The agent's CA, which signs the console's certificate.
    pub fn ca(&self) -> PathBuf {
        self.agent.dir.path().join("state/ca/ca.pem")
    }

    /// psql as `uid` through the redirect to the world's server, reading `script` from
    /// stdin (closed after it).
    pub fn psql_script(&self, uid: u32, script: &str) -> Child {
        crate::postgres::psql_app_script(&self.postgres, &self.cg.path, uid, script)
    }
}

/// The world of test `name` on `slot`, with `users` at the provider. Roles: `audit` audits,
/// `dba-leads` approves, `platform` administers.
pub fn world(name: &str, slot: u8, users: Vec<OidcUser>) -> World {
    let slot = Slot::new(slot);
    let console = format!("https://127.0.0.1:{}", slot.server_port);
    let provider = OidcProvider::start(OidcOptions {
        users,
        // A web client: the authorization code grant with PKCE, no secret, its one
        // redirect URI the console's callback.
        extra_clients: vec![json!({
            "client_id": CONSOLE_CLIENT,
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "redirect_uris": [format!("{console}/auth/callback")],
        })],
        ..OidcOptions::default()
    });
    let files = tempfile::tempdir().unwrap();
    let (postgres, creds) = crate::postgres::app_server(files.path());
    let cg = TestCgroup::new(name);
    let config = format!(
        "[identity]\nissuer = \"{iss}\"\nleeway_secs = 5\n[insecure]\nallow_plaintext_loopback = true\n\
         [console]\nlisten = \"127.0.0.1:{port}\"\nclient_id = \"{CONSOLE_CLIENT}\"\n\
         auditor_groups = [\"audit\"]\napprover_groups = [\"dba-leads\"]\nadmin_groups = [\"platform\"]\n\
         [[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1\"\nport = {pg}\n\
         [target.postgres]\nca_file = \"{ca}\"\ncredentials_file = \"{creds}\"\n",
        iss = provider.issuer(),
        port = slot.server_port,
        pg = postgres.port(),
        ca = postgres.ca_pem_path().display(),
        creds = creds.display(),
    );
    let mut agent = Agent::prepare(name, slot, &cg, &[], Some(&config), &[]);
    std::fs::write(
        agent.dir.path().join("policies").join("e2e.cedar"),
        STATEMENT_POLICIES,
    )
    .unwrap();
    agent.spawn();
    World {
        provider,
        postgres,
        cg,
        agent,
        console,
        _files: files,
    }
}

/// A page as an HTTP client got it.
pub struct HttpPage {
    pub url: reqwest::Url,
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

/// A console's visitor without a browser: cookies kept, the console's CA alone trusted,
/// redirects followed on loopback only. Signs in through the provider's own forms.
pub struct Http {
    client: reqwest::blocking::Client,
    pub console: String,
}

impl Http {
    pub fn new(console: &str, ca: &std::path::Path) -> Self {
        let ca = std::fs::read(ca).unwrap();
        let policy = reqwest::redirect::Policy::custom(|attempt| {
            let loopback = attempt
                .url()
                .host_str()
                .and_then(|h| h.parse::<std::net::IpAddr>().ok())
                .is_some_and(|ip| ip.is_loopback());
            if attempt.previous().len() > 10 {
                attempt.error("too many redirects")
            } else if !loopback {
                attempt.error("redirect away from loopback")
            } else {
                attempt.follow()
            }
        });
        let client = reqwest::blocking::Client::builder()
            .cookie_store(true)
            .redirect(policy)
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(std::time::Duration::from_secs(20))
            .build()
            .unwrap();
        Self {
            client,
            console: console.to_string(),
        }
    }

    fn page(response: reqwest::blocking::Response) -> HttpPage {
        HttpPage {
            url: response.url().clone(),
            status: response.status(),
            headers: response.headers().clone(),
            body: response.text().unwrap(),
        }
    }

    /// GET of a path of the console.
    pub fn get(&self, path: &str) -> HttpPage {
        Self::page(
            self.client
                .get(format!("{}{path}", self.console))
                .send()
                .unwrap(),
        )
    }

    pub fn post(&self, url: &str, form: &[(String, String)]) -> HttpPage {
        Self::page(self.client.post(url).form(form).send().unwrap())
    }

    /// Signs in as `user` through the provider's login and consent forms; the callback's
    /// page.
    pub fn sign_in(&self, provider: &OidcProvider, user: &str) -> HttpPage {
        let mut page = self.get("/signin");
        for _ in 0..5 {
            if page.url.path() == "/auth/callback" {
                return page;
            }
            assert!(
                page.status.is_success(),
                "{} {}: {}\n{}",
                page.status,
                page.url,
                page.body,
                provider.log()
            );
            let form = crate::oidc::html::forms(&page.body)
                .into_iter()
                .next()
                .unwrap_or_else(|| panic!("no form at {}: {}", page.url, page.body));
            let fields: Vec<(String, String)> = form
                .inputs
                .iter()
                .map(|i| {
                    let value = match (i.kind.as_str(), i.name.as_str()) {
                        (_, "login") => user.to_string(),
                        ("password", _) => "any password".to_string(),
                        _ => i.value.clone(),
                    };
                    (i.name.clone(), value)
                })
                .collect();
            let action = page.url.join(&form.action).unwrap();
            page = self.post(action.as_str(), &fields);
        }
        panic!("no way back to the console: {} {}", page.url, page.body);
    }

    /// The session's CSRF token, as the sign-out form on every page carries it.
    pub fn csrf(&self) -> String {
        let page = self.get("/approvals");
        crate::oidc::html::forms(&page.body)
            .into_iter()
            .find(|f| f.action == "/signout")
            .and_then(|f| f.inputs.into_iter().find(|i| i.name == "csrf"))
            .unwrap_or_else(|| panic!("no sign-out form: {}", page.body))
            .value
    }

    /// A decision on `request` the page did not offer, posted with this session's own
    /// token: what the server alone must refuse.
    pub fn decide_unoffered(&self, request: &str, decision: &str, reason: &str) -> HttpPage {
        let csrf = self.csrf();
        self.post(
            &format!("{}/approvals/{request}", self.console),
            &[
                ("csrf".into(), csrf),
                ("decision".into(), decision.into()),
                ("reason".into(), reason.into()),
            ],
        )
    }

    /// The form on the approvals page that decides `request`: its action and CSRF token.
    pub fn decision_form(&self, request: &str) -> Option<(String, String)> {
        let page = self.get("/approvals");
        assert_eq!(page.status, reqwest::StatusCode::OK, "{}", page.body);
        crate::oidc::html::forms(&page.body)
            .into_iter()
            .find(|f| f.action == format!("/approvals/{request}"))
            .map(|f| {
                let csrf = f.inputs.iter().find(|i| i.name == "csrf").unwrap();
                (format!("{}{}", self.console, f.action), csrf.value.clone())
            })
    }

    /// Approves (`approve`) or denies (`deny`) `request` with the page's own form.
    pub fn decide(&self, request: &str, decision: &str, reason: &str) -> HttpPage {
        let (action, csrf) = self
            .decision_form(request)
            .unwrap_or_else(|| panic!("request {request} is not on the approvals page"));
        self.post(
            &action,
            &[
                ("csrf".into(), csrf),
                ("decision".into(), decision.into()),
                ("reason".into(), reason.into()),
            ],
        )
    }

    /// The first request on the approvals page not in `seen`, waiting up to 30 s for one.
    pub fn next_pending(&self, seen: &[String]) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let page = self.get("/approvals");
            let found = crate::oidc::html::forms(&page.body)
                .into_iter()
                .find_map(|f| {
                    f.action
                        .strip_prefix("/approvals/")
                        .map(str::to_string)
                        .filter(|id| !seen.contains(id))
                });
            if let Some(id) = found {
                return id;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no pending request: {}",
                page.body
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}
