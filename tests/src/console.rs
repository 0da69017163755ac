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
