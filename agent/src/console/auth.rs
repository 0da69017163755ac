//! Sign-in and sessions: the authorization code flow with PKCE against the agent's issuer
//! (state, nonce and the ID token checked), roles from the token's groups, server-side
//! sessions behind a random cookie, and a CSRF token per session.
//!
//! A console session is not a `portcullis login`: it names a person (their OIDC subject,
//! email, groups at sign-in) but no Unix account, and ends `session_timeout_secs` after
//! sign-in, when its groups are read again at the next sign-in.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope,
};
use ring::rand::SecureRandom;
use subtle::ConstantTimeEq;

use crate::config::{Config, ConsoleSettings};
use crate::identity::jwt::Expectations;
use crate::identity::oidc::{Metadata, Provider};
use crate::identity::{Identity, IdentityKind, Secret};

use super::ConsoleError;

/// The uid a console identity carries: `(uid_t)-1`, which no account has. The console
/// speaks for a person, not for a process of this host.
pub const NO_UID: u32 = u32::MAX;

/// Sign-ins started and not finished are kept this long (the person is at the issuer's page).
const FLOW_TTL_MS: u64 = 10 * 60 * 1000;
/// Bounds on what unauthenticated visitors (flows) and people (sessions) can make us keep.
const MAX_FLOWS: usize = 1024;
const MAX_SESSIONS: usize = 4096;

/// The cookie of a signed-in session: `__Host-` so it is Secure, host-only and for `/`.
pub const SESSION_COOKIE: &str = "__Host-portcullis-console";
/// The cookie that ties a sign-in's return from the issuer to the browser that started it.
pub const FLOW_COOKIE: &str = "__Host-portcullis-signin";

/// What a person may do in the console, from their groups at sign-in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles {
    /// Reads sessions and their timelines.
    pub auditor: bool,
    /// Sees approvals and grants and decides them (the store says whose decision counts).
    pub approver: bool,
    /// Sees the agent's health.
    pub admin: bool,
}

impl Roles {
    pub fn of(groups: &[String], settings: &ConsoleSettings) -> Self {
        let any = |wanted: &[String]| groups.iter().any(|g| wanted.contains(g));
        Self {
            auditor: any(&settings.auditor_groups),
            approver: any(&settings.approver_groups),
            admin: any(&settings.admin_groups),
        }
    }

    pub fn none(self) -> bool {
        self == Self::default()
    }

    pub fn names(self) -> String {
        let mut out = Vec::new();
        if self.auditor {
            out.push("auditor");
        }
        if self.approver {
            out.push("approver");
        }
        if self.admin {
            out.push("admin");
        }
        out.join(", ")
    }
}

/// One signed-in person.
#[derive(Debug, Clone)]
pub struct SignedIn {
    pub identity: Identity,
    pub roles: Roles,
    /// Sent in every form, compared in constant time on every POST.
    pub csrf: String,
    pub expires_ms: u64,
}

/// A sign-in between the redirect to the issuer and its return.
struct Flow {
    state: String,
    nonce: String,
    verifier: String,
    expires_ms: u64,
}

#[derive(Default)]
struct Book {
    flows: HashMap<String, Flow>,
    sessions: HashMap<String, SignedIn>,
}

/// Why a sign-in did not end in a session.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error(
        "the sign-in was not started in this browser, or took longer than 10 minutes; start again"
    )]
    UnknownFlow,
    #[error("the issuer's answer does not carry this sign-in's state")]
    StateMismatch,
    #[error("the issuer refused the sign-in: {0}")]
    Refused(String),
    #[error("the code could not be exchanged at the issuer: {0}")]
    Exchange(String),
    #[error("the issuer sent no ID token")]
    NoIdToken,
    #[error("the ID token is not acceptable: {0}")]
    Token(String),
    #[error("the ID token does not carry this sign-in's nonce")]
    NonceMismatch,
    #[error("{who} holds no console role (groups: {groups})")]
    NoRole { who: String, groups: String },
    #[error("too many people are signed in; try again later")]
    Full,
}

pub struct Auth {
    provider: Provider,
    http: reqwest::Client,
    client_id: String,
    client_secret: Option<Secret>,
    redirect: RedirectUrl,
    scopes: Vec<String>,
    expect: Expectations,
    timeout_ms: u64,
    settings: ConsoleSettings,
    rng: ring::rand::SystemRandom,
    book: Mutex<Book>,
}

impl Auth {
    pub fn new(
        config: &Config,
        settings: &ConsoleSettings,
        client_secret: Option<Secret>,
    ) -> Result<Self, ConsoleError> {
        let issuer = config
            .identity
            .issuer
            .clone()
            .ok_or_else(|| ConsoleError::Identity("identity.issuer is not set".into()))?;
        let provider = Provider::new(&issuer).map_err(|e| ConsoleError::Identity(e.to_string()))?;
        let algorithms = config
            .identity
            .algorithms
            .iter()
            .map(|a| crate::config::parse_algorithm(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ConsoleError::Identity)?;
        // No redirects: the token endpoint's answer carries secrets, and a redirect could
        // take the code or the client secret elsewhere.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConsoleError::Identity(format!("HTTP client: {e}")))?;
        let redirect = RedirectUrl::new(format!("{}/auth/callback", settings.url))
            .map_err(|e| ConsoleError::Identity(format!("console.url: {e}")))?;
        // The device grant's `offline_access` is no use here: the console refreshes nothing.
        let scopes = config
            .identity
            .scopes
            .iter()
            .filter(|s| *s != "openid" && *s != "offline_access")
            .cloned()
            .collect();
        Ok(Self {
            expect: Expectations {
                issuer: provider.issuer().to_string(),
                audience: settings.client_id.clone(),
                algorithms,
                leeway_secs: config.identity.leeway_secs,
                required_claims: Default::default(),
                groups_claim: config.identity.groups_claim.clone(),
            },
            provider,
            http,
            client_id: settings.client_id.clone(),
            client_secret,
            redirect,
            scopes,
            timeout_ms: settings.session_timeout_secs.saturating_mul(1000),
            settings: settings.clone(),
            rng: ring::rand::SystemRandom::new(),
            book: Mutex::new(Book::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// 32 random bytes, URL-safe.
    fn random(&self) -> Option<String> {
        let mut bytes = [0u8; 32];
        self.rng.fill(&mut bytes).ok()?;
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    fn client(&self, meta: &Metadata) -> Result<OidcClient, SignInError> {
        Ok(CoreClient::from_provider_metadata(
            Metadata::clone(meta),
            ClientId::new(self.client_id.clone()),
            self.client_secret
                .as_ref()
                .map(|s| ClientSecret::new(s.expose().to_string())),
        )
        .set_redirect_uri(self.redirect.clone()))
    }

    /// Starts a sign-in: the issuer's authorization URL to send the browser to, and the
    /// flow cookie's value that must come back with the answer.
    pub async fn start(&self, now_ms: u64) -> Result<(String, String), SignInError> {
        let meta = self
            .provider
            .metadata()
            .await
            .map_err(|e| SignInError::Exchange(e.to_string()))?;
        let client = self.client(&meta)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for scope in &self.scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state, nonce) = request.url();
        let id = self.random().ok_or(SignInError::Full)?;
        let mut book = self.lock();
        book.flows.retain(|_, f| f.expires_ms > now_ms);
        if book.flows.len() >= MAX_FLOWS {
            // The oldest sign-in in progress gives way: a flood of starts cannot lock
            // people out for longer than it lasts.
            if let Some(oldest) = book
                .flows
                .iter()
                .min_by_key(|(_, f)| f.expires_ms)
                .map(|(k, _)| k.clone())
            {
                book.flows.remove(&oldest);
            }
        }
        book.flows.insert(
            id.clone(),
            Flow {
                state: state.secret().clone(),
                nonce: nonce.secret().clone(),
                verifier: verifier.secret().clone(),
                expires_ms: now_ms.saturating_add(FLOW_TTL_MS),
            },
        );
        Ok((url.to_string(), id))
    }

    /// Finishes a sign-in from the issuer's answer: the flow (by its cookie, used once),
    /// the state, the code exchanged with the PKCE verifier, the ID token verified and its
    /// nonce, then the roles. Returns the session cookie's value and the session.
    pub async fn finish(
        &self,
        flow_id: Option<&str>,
        answer: &Callback,
        now_ms: u64,
    ) -> Result<(String, SignedIn), (SignInError, Option<Identity>)> {
        let flow = flow_id
            .and_then(|id| self.lock().flows.remove(id))
            .filter(|f| f.expires_ms > now_ms)
            .ok_or((SignInError::UnknownFlow, None))?;
        if let Some(error) = &answer.error {
            let text = match &answer.error_description {
                Some(d) => format!("{error}: {d}"),
                None => error.clone(),
            };
            return Err((SignInError::Refused(text), None));
        }
        let state = answer.state.as_deref().unwrap_or("");
        if !equal(state, &flow.state) {
            return Err((SignInError::StateMismatch, None));
        }
        let code = answer
            .code
            .clone()
            .ok_or((SignInError::Refused("no code".into()), None))?;
        let meta = self
            .provider
            .metadata()
            .await
            .map_err(|e| (SignInError::Exchange(e.to_string()), None))?;
        let client = self.client(&meta).map_err(|e| (e, None))?;
        let tokens = client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|e| (SignInError::Exchange(e.to_string()), None))?
            .set_pkce_verifier(PkceCodeVerifier::new(flow.verifier))
            .request_async(&self.http)
            .await
            .map_err(|e| (SignInError::Exchange(exchange_error(&e)), None))?;
        let id_token = openidconnect::TokenResponse::id_token(&tokens)
            .map(ToString::to_string)
            .ok_or((SignInError::NoIdToken, None))?;
        let claims = self
            .provider
            .validate(&id_token, &self.expect)
            .await
            .map_err(|e| (SignInError::Token(e.to_string()), None))?;
        // Read from the bytes whose signature was just verified.
        if !token_nonce(&id_token).is_some_and(|n| equal(&n, &flow.nonce)) {
            return Err((SignInError::NonceMismatch, None));
        }
        let identity = Identity {
            kind: IdentityKind::User,
            uid: NO_UID,
            gid: NO_UID,
            user: None,
            subject: Some(claims.subject.clone()),
            email: claims.email.clone(),
            name: claims.name.clone(),
            groups: claims.groups.clone(),
            issuer: Some(claims.issuer.clone()),
        };
        let roles = Roles::of(&identity.groups, &self.settings);
        if roles.none() {
            return Err((
                SignInError::NoRole {
                    who: crate::approvals::who(&identity),
                    groups: if identity.groups.is_empty() {
                        "none".into()
                    } else {
                        identity.groups.join(", ")
                    },
                },
                Some(identity),
            ));
        }
        let (Some(id), Some(csrf)) = (self.random(), self.random()) else {
            return Err((SignInError::Full, Some(identity)));
        };
        let session = SignedIn {
            identity,
            roles,
            csrf,
            expires_ms: now_ms.saturating_add(self.timeout_ms),
        };
        let mut book = self.lock();
        book.sessions.retain(|_, s| s.expires_ms > now_ms);
        if book.sessions.len() >= MAX_SESSIONS {
            return Err((SignInError::Full, Some(session.identity)));
        }
        book.sessions.insert(id.clone(), session.clone());
        Ok((id, session))
    }

    /// The session a cookie names, if it is still valid.
    pub fn session(&self, cookie: Option<&str>, now_ms: u64) -> Option<SignedIn> {
        let id = cookie?;
        let mut book = self.lock();
        match book.sessions.get(id) {
            Some(s) if s.expires_ms > now_ms => Some(s.clone()),
            Some(_) => {
                book.sessions.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn sign_out(&self, cookie: Option<&str>) {
        if let Some(id) = cookie {
            self.lock().sessions.remove(id);
        }
    }

    /// Drops ended sessions and abandoned sign-ins.
    pub fn sweep(&self) {
        let now = crate::audit::now_ms();
        let mut book = self.lock();
        book.sessions.retain(|_, s| s.expires_ms > now);
        book.flows.retain(|_, f| f.expires_ms > now);
    }

    pub fn signed_in(&self) -> usize {
        self.lock().sessions.len()
    }

    #[cfg(test)]
    pub fn insert_for_test(&self, id: &str, session: SignedIn) {
        self.lock().sessions.insert(id.to_string(), session);
    }

    /// A sign-in in progress, as `start` leaves it, without asking the issuer.
    #[cfg(test)]
    pub fn insert_flow_for_test(&self, id: &str, state: &str) {
        self.lock().flows.insert(
            id.to_string(),
            Flow {
                state: state.into(),
                nonce: "nonce".into(),
                verifier: "verifier".into(),
                expires_ms: crate::audit::now_ms() + FLOW_TTL_MS,
            },
        );
    }
}

type OidcClient = CoreClient<
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

/// The issuer's answer at `/auth/callback` (RFC 6749 section 4.1.2).
#[derive(Debug, Default, serde::Deserialize)]
pub struct Callback {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// Constant-time equality of two secrets (CSRF tokens, state, nonce).
pub fn equal(a: &str, b: &str) -> bool {
    !a.is_empty() && a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The `nonce` claim of a JWT whose signature was already verified.
fn token_nonce(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("nonce")?.as_str().map(str::to_string)
}

/// Why the token endpoint refused, without quoting its body (it may carry tokens).
fn exchange_error<RE: std::error::Error + 'static, T: openidconnect::ErrorResponse>(
    e: &openidconnect::RequestTokenError<RE, T>,
) -> String {
    match e {
        openidconnect::RequestTokenError::ServerResponse(r) => serde_json::to_value(r)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| "refused".into()),
        openidconnect::RequestTokenError::Request(e) => format!("cannot reach the issuer: {e}"),
        openidconnect::RequestTokenError::Parse(e, _) => {
            format!("its answer cannot be read at `{}`", e.path())
        }
        openidconnect::RequestTokenError::Other(m) => m.clone(),
    }
}

/// The host (and port) of `https://host[:port]`.
pub fn url_host(url: &str) -> &str {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    match rest.rfind(':') {
        // `[::1]:9443` or `host:9443`; a bare `[::1]` has its colons inside brackets.
        Some(at) if !rest.ends_with(']') => rest.get(..at).unwrap_or(rest),
        _ => rest,
    }
}
