//! Who is behind a connection: the one lookup every protocol uses.
//!
//! The kernel reports the uid of the socket (origin record) or of the CLI caller
//! (SO_PEERCRED); that uid is bound to at most one OIDC session, obtained with the device
//! grant (`portcullis login`) or a workload token, or to a service identity (client
//! credentials) by uid or systemd unit. A connection with none of these is refused.
//! Sessions live in `<state_dir>/sessions/<uid>.json`, root-only, and survive restarts.

pub mod jwt;
pub mod oidc;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::config::{parse_algorithm, Config, IdentityConfig, OnSessionEnd};
use jwt::Expectations;
use oidc::{OidcError, Provider};
pub use portcullis_core::identity::{Identity, IdentityKind, Secret};
use portcullis_core::Origin;

/// The Unix account name of a uid, cached for a minute: NSS lookups read files (or ask
/// a directory) and every connection needs one.
fn account_name(uid: u32) -> Option<String> {
    use std::time::Instant;
    const TTL: Duration = Duration::from_secs(60);
    type NameCache = Mutex<HashMap<u32, (Option<String>, Instant)>>;
    static CACHE: std::sync::OnceLock<NameCache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some((name, at)) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&uid) {
        if at.elapsed() < TTL {
            return name.clone();
        }
    }
    // Through NSS (so LDAP/SSSD users resolve too); a failed lookup is no name.
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| user.name);
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if c.len() > 10_000 {
        c.clear();
    }
    c.insert(uid, (name.clone(), Instant::now()));
    name
}

pub use portcullis_core::now_secs;

/// A login bound to a uid.
#[derive(Clone, Serialize, Deserialize)]
struct Session {
    uid: u32,
    kind: IdentityKind,
    subject: String,
    email: Option<String>,
    name: Option<String>,
    groups: Vec<String>,
    issuer: String,
    expires_at: u64,
    logged_in_at: u64,
    refresh_token: Option<Secret>,
    #[serde(default)]
    last_refresh_attempt: u64,
    #[serde(default)]
    refresh_failing: bool,
}

/// What `whoami` and `logins list` show: everything but the tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionView {
    pub uid: u32,
    pub user: Option<String>,
    pub kind: IdentityKind,
    pub subject: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub groups: Vec<String>,
    pub issuer: String,
    pub expires_at: u64,
    pub logged_in_at: u64,
    pub refreshable: bool,
    pub refresh_failing: bool,
}

impl Session {
    fn new(
        uid: u32,
        kind: IdentityKind,
        claims: jwt::VerifiedClaims,
        refresh_token: Option<Secret>,
    ) -> Self {
        let now = now_secs();
        Self {
            uid,
            kind,
            subject: claims.subject,
            email: claims.email,
            name: claims.name,
            groups: claims.groups,
            issuer: claims.issuer,
            expires_at: claims.expires_at,
            logged_in_at: now,
            refresh_token,
            last_refresh_attempt: now,
            refresh_failing: false,
        }
    }

    fn view(&self) -> SessionView {
        SessionView {
            uid: self.uid,
            user: account_name(self.uid),
            kind: self.kind,
            subject: self.subject.clone(),
            email: self.email.clone(),
            name: self.name.clone(),
            groups: self.groups.clone(),
            issuer: self.issuer.clone(),
            expires_at: self.expires_at,
            logged_in_at: self.logged_in_at,
            refreshable: self.refresh_token.is_some(),
            refresh_failing: self.refresh_failing,
        }
    }
}

/// What `portcullis login` shows the user while they finish in a browser.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginStarted {
    pub login_id: u64,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub user_code: String,
    pub expires_in: u64,
}

struct PendingLogin {
    uid: u32,
    result: watch::Receiver<Option<Result<SessionView, LoginError>>>,
    cancel: CancellationToken,
}

struct ServiceState {
    expires_at: u64,
    lifetime: u64,
    last_error: Option<String>,
    last_attempt: u64,
}

struct Service {
    name: String,
    uid: Option<u32>,
    unit: Option<String>,
    client_id: String,
    secret: Secret,
    scopes: String,
    state: Mutex<ServiceState>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Oidc(#[from] OidcError),
    #[error("{0}")]
    Config(String),
}

/// Why a redirected connection has no identity. The text is what the client and the
/// audit trail see, and names what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// A service account's client-credentials token is missing or expired; `last_error` is
    /// why the agent's last fetch failed, if it did.
    #[error("service identity `{service}` has no valid token{}", last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default())]
    ServiceToken {
        service: String,
        last_error: Option<String>,
    },
    /// The uid logged in, but the login has expired.
    #[error("no valid login for {who}: run `portcullis login`")]
    LoginExpired { who: String },
    /// The uid never logged in (or logged out).
    #[error("no valid login for {who}: run `portcullis login`")]
    NoLogin { who: String },
}

/// Why a login did not complete; the text is what `portcullis login` prints.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoginError {
    #[error("no identity provider is configured (identity.issuer)")]
    NoIssuer,
    #[error("{0}: finish or cancel a login first")]
    TooManyPending(crate::limits::Limited),
    /// The issuer could not be reached, refused the grant, or its token did not validate.
    #[error("{0}")]
    Issuer(Arc<OidcError>),
    #[error("the identity provider returned no ID token (is `openid` in the scopes?)")]
    NoIdToken,
    #[error("{0}")]
    Store(Arc<std::io::Error>),
    #[error("no login {0} in progress for this user")]
    NotInProgress(u64),
    #[error("the login ended without a result")]
    EndedWithoutResult,
    #[error("the token is malformed: no readable `iss` claim")]
    MalformedToken,
    #[error("issuer `{0}` is not trusted for workload logins")]
    UntrustedIssuer(String),
}

impl From<OidcError> for LoginError {
    fn from(e: OidcError) -> Self {
        LoginError::Issuer(Arc::new(e))
    }
}

/// Hears that a uid's session ended (logout, revocation, expiry with
/// `on_session_end = "close"`) and ends what belonged to it; answers how many connections
/// that closed, for the event that records the end. Identity announces; it knows nothing of
/// connections (the registry, a layer above, listens).
pub trait SessionEndListener: Send + Sync {
    fn session_ended(&self, uid: u32, reason: &str) -> usize;
}

pub struct IdentityService {
    config: IdentityConfig,
    unix_only: bool,
    provider: Option<Arc<Provider>>,
    trusted: Vec<(crate::config::TrustedIssuerConfig, Arc<Provider>)>,
    algorithms: Vec<jsonwebtoken::Algorithm>,
    sessions_dir: PathBuf,
    sessions: Mutex<HashMap<u32, Session>>,
    services: Vec<Service>,
    cgroup_root: PathBuf,
    pending: Mutex<HashMap<u64, PendingLogin>>,
    next_login: AtomicU64,
    audit: Arc<AuditLog>,
    /// Told when a session ends; closes the uid's connections (the connection registry).
    session_ends: Arc<dyn SessionEndListener>,
    /// Bounds the device flows one uid may have pending (`limits.max_pending_logins_per_uid`).
    limiter: Arc<crate::limits::Limiter>,
    /// The monotonic clock of the limiter's rate buckets (logins use none, but share it).
    epoch: std::time::Instant,
    /// The device-flow pollers: shutdown cancels them (`cancel_pending`) and waits for them
    /// (`wait_for_logins`), so none outlives the runtime mid-write to the sessions directory.
    logins: tokio_util::task::TaskTracker,
    /// Ends the pollers' wait for a late reader of their result.
    stopping: CancellationToken,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> IdentityError {
    let what = what.into();
    move |source| IdentityError::Io { what, source }
}

impl IdentityService {
    pub fn new(
        config: &Config,
        cgroup_root: &Path,
        audit: Arc<AuditLog>,
        session_ends: Arc<dyn SessionEndListener>,
        limiter: Arc<crate::limits::Limiter>,
    ) -> Result<Arc<Self>, IdentityError> {
        let id = config.identity.clone();
        let provider = match &id.issuer {
            Some(issuer) => Some(Arc::new(Provider::new(issuer)?)),
            None => None,
        };
        let trusted = id
            .trusted_issuers
            .iter()
            .map(|t| Ok((t.clone(), Arc::new(Provider::new(&t.issuer)?))))
            .collect::<Result<Vec<_>, IdentityError>>()?;
        let algorithms = id
            .algorithms
            .iter()
            .map(|a| parse_algorithm(a).map_err(IdentityError::Config))
            .collect::<Result<Vec<_>, _>>()?;
        let mut services = Vec::new();
        for s in &id.services {
            let secret = read_secret_file(&s.client_secret_file)?;
            services.push(Service {
                name: s.name.clone(),
                uid: s.uid,
                unit: s.unit.clone(),
                client_id: s.client_id.clone(),
                secret,
                scopes: s.scopes.join(" "),
                state: Mutex::new(ServiceState {
                    expires_at: 0,
                    lifetime: 0,
                    last_error: None,
                    last_attempt: 0,
                }),
            });
        }
        let sessions_dir = config.state_dir.join("sessions");
        create_sessions_dir(&sessions_dir)?;
        let sessions = load_sessions(&sessions_dir);
        if !sessions.is_empty() {
            tracing::info!(
                count = sessions.len(),
                "sessions restored from the state directory"
            );
        }
        Ok(Arc::new(Self {
            config: id,
            unix_only: config.insecure.unix_identity_only,
            provider,
            trusted,
            algorithms,
            sessions_dir,
            sessions: Mutex::new(sessions),
            services,
            cgroup_root: cgroup_root.to_path_buf(),
            pending: Mutex::new(HashMap::new()),
            next_login: AtomicU64::new(1),
            audit,
            session_ends,
            limiter,
            epoch: std::time::Instant::now(),
            logins: tokio_util::task::TaskTracker::new(),
            stopping: CancellationToken::new(),
        }))
    }

    fn expectations(
        &self,
        issuer: &str,
        audience: &str,
        required: &std::collections::BTreeMap<String, String>,
    ) -> Expectations {
        Expectations {
            issuer: issuer.to_string(),
            audience: audience.to_string(),
            algorithms: self.algorithms.clone(),
            leeway_secs: self.config.leeway_secs,
            required_claims: required.clone(),
            groups_claim: self.config.groups_claim.clone(),
        }
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The identity for a redirected connection, or why there is none (for the user).
    pub fn resolve(&self, origin: &Origin) -> Result<Identity, ResolveError> {
        let unix = |kind| Identity {
            kind,
            uid: origin.uid,
            gid: origin.gid,
            user: account_name(origin.uid),
            subject: None,
            email: None,
            name: None,
            groups: Vec::new(),
            issuer: None,
        };
        let now = now_secs();
        for svc in &self.services {
            let matches = svc.uid == Some(origin.uid)
                || svc
                    .unit
                    .as_deref()
                    .is_some_and(|u| self.unit_cgroup_id(u) == Some(origin.cgroup_id));
            if !matches {
                continue;
            }
            let state = svc.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.expires_at > now {
                let mut id = unix(IdentityKind::Service);
                id.subject = Some(svc.client_id.clone());
                id.name = Some(svc.name.clone());
                id.issuer = self.provider.as_ref().map(|p| p.issuer().to_string());
                return Ok(id);
            }
            return Err(ResolveError::ServiceToken {
                service: svc.name.clone(),
                last_error: state.last_error.clone(),
            });
        }
        let expired = if let Some(s) = self.lock_sessions().get(&origin.uid) {
            if s.expires_at > now {
                let mut id = unix(s.kind);
                id.subject = Some(s.subject.clone());
                id.email = s.email.clone();
                id.name = s.name.clone();
                id.groups = s.groups.clone();
                id.issuer = Some(s.issuer.clone());
                return Ok(id);
            }
            true
        } else {
            false
        };
        if self.unix_only {
            return Ok(unix(IdentityKind::Unix));
        }
        let who = account_name(origin.uid).unwrap_or_else(|| format!("uid {}", origin.uid));
        Err(if expired {
            ResolveError::LoginExpired { who }
        } else {
            ResolveError::NoLogin { who }
        })
    }

    fn unit_cgroup_id(&self, unit: &str) -> Option<u64> {
        let dir = if unit.contains('/') {
            self.cgroup_root.join(unit.trim_start_matches('/'))
        } else {
            self.cgroup_root.join("system.slice").join(unit)
        };
        std::fs::metadata(dir).ok().map(|m| m.ino())
    }

    fn issuer(&self) -> Result<&Arc<Provider>, LoginError> {
        self.provider.as_ref().ok_or(LoginError::NoIssuer)
    }

    /// Starts a device-grant login for `uid`; the agent polls in the background.
    pub async fn login_start(self: &Arc<Self>, uid: u32) -> Result<LoginStarted, LoginError> {
        let provider = Arc::clone(self.issuer()?);
        // Held by the polling task below: each pending flow costs the agent a task and the
        // issuer a poll every few seconds until it expires.
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let permit = self.limiter.begin_login(uid, now).map_err(|limited| {
            let mut ev = AuditEvent::new(EventKind::LoginFailed).reason(limited.to_string());
            ev.identity = Some(unix_identity(uid).into());
            self.audit.record(ev);
            LoginError::TooManyPending(limited)
        })?;
        let device = provider
            .start_device(&self.config.client_id, &self.config.scopes.join(" "))
            .await?;
        let login_id = self.next_login.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let cancel = CancellationToken::new();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                login_id,
                PendingLogin {
                    uid,
                    result: rx,
                    cancel: cancel.clone(),
                },
            );
        let started = LoginStarted {
            login_id,
            verification_uri: device.verification_uri.clone(),
            verification_uri_complete: device.verification_uri_complete.clone(),
            user_code: device.user_code.clone(),
            expires_in: device.expires_in,
        };
        let this = Arc::clone(self);
        self.logins.spawn(async move {
            let outcome = match provider
                .poll_device(&this.config.client_id, &device, &cancel)
                .await
            {
                Ok(tokens) => this.finish_login(uid, &provider, tokens).await,
                Err(e) => Err(e.into()),
            };
            drop(permit);
            if let Err(e) = &outcome {
                let mut ev = AuditEvent::new(EventKind::LoginFailed).reason(e.to_string());
                ev.identity = Some(unix_identity(uid).into());
                this.audit.record(ev);
            }
            let _ = tx.send(Some(outcome));
            // Keep the result for a late waiter for a while, then forget the login.
            tokio::select! {
                () = this.stopping.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            this.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&login_id);
        });
        Ok(started)
    }

    async fn finish_login(
        &self,
        uid: u32,
        provider: &Provider,
        tokens: oidc::TokenResponse,
    ) -> Result<SessionView, LoginError> {
        let id_token = tokens.id_token.ok_or(LoginError::NoIdToken)?;
        let audience = self
            .config
            .audience
            .clone()
            .unwrap_or_else(|| self.config.client_id.clone());
        let expect = self.expectations(provider.issuer(), &audience, &Default::default());
        let claims = provider.validate(id_token.expose(), &expect).await?;
        self.store(Session::new(
            uid,
            IdentityKind::User,
            claims,
            tokens.refresh_token,
        ))
    }

    fn store(&self, session: Session) -> Result<SessionView, LoginError> {
        save_session(&self.sessions_dir, &session).map_err(|e| LoginError::Store(Arc::new(e)))?;
        let view = session.view();
        let mut ev = AuditEvent::new(EventKind::LoginSucceeded).reason(format!(
            "{:?} login until {}",
            session.kind, session.expires_at
        ));
        ev.identity = Some(session_identity(&session).into());
        self.audit.record(ev);
        tracing::info!(uid = session.uid, subject = %session.subject, "logged in");
        self.lock_sessions().insert(session.uid, session);
        Ok(view)
    }

    /// Waits for a login started by the same uid. Dropping the future (the CLI went away,
    /// Ctrl-C) cancels the login.
    pub async fn login_wait(&self, uid: u32, login_id: u64) -> Result<SessionView, LoginError> {
        let (mut rx, cancel) = {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.get(&login_id) {
                Some(p) if p.uid == uid => (p.result.clone(), p.cancel.clone()),
                _ => return Err(LoginError::NotInProgress(login_id)),
            }
        };
        let guard = cancel.drop_guard();
        let outcome = loop {
            if let Some(r) = rx.borrow().clone() {
                break r;
            }
            if rx.changed().await.is_err() {
                break Err(LoginError::EndedWithoutResult);
            }
        };
        guard.disarm();
        outcome
    }

    /// Logs in with a workload token (a CI pipeline's OIDC JWT) from a trusted issuer.
    pub async fn login_token(&self, uid: u32, token: &str) -> Result<SessionView, LoginError> {
        let issuer = unverified_issuer(token).ok_or(LoginError::MalformedToken)?;
        let Some((trusted, provider)) = self
            .trusted
            .iter()
            .find(|(t, _)| t.issuer.trim_end_matches('/') == issuer.trim_end_matches('/'))
        else {
            let mut ev = AuditEvent::new(EventKind::LoginFailed)
                .reason(format!("untrusted issuer `{issuer}`"));
            ev.identity = Some(unix_identity(uid).into());
            self.audit.record(ev);
            return Err(LoginError::UntrustedIssuer(issuer));
        };
        let expect = self.expectations(
            provider.issuer(),
            &trusted.audience,
            &trusted.required_claims,
        );
        let mut claims = match provider.validate(token, &expect).await {
            Ok(c) => c,
            Err(e) => {
                let mut ev = AuditEvent::new(EventKind::LoginFailed).reason(e.to_string());
                ev.identity = Some(unix_identity(uid).into());
                self.audit.record(ev);
                return Err(e.into());
            }
        };
        // A workload is named by the run it belongs to (its requests say which pipeline run
        // asked), unless its token names it.
        if claims.name.is_none() {
            claims.name = claims.pipeline_run.clone();
        }
        self.store(Session::new(uid, IdentityKind::Workload, claims, None))
    }

    pub fn whoami(&self, uid: u32) -> Option<SessionView> {
        self.lock_sessions()
            .get(&uid)
            .filter(|s| s.expires_at > now_secs())
            .map(Session::view)
    }

    pub fn list(&self) -> Vec<SessionView> {
        let mut v: Vec<SessionView> = self.lock_sessions().values().map(Session::view).collect();
        v.sort_by_key(|s| s.uid);
        v
    }

    /// Ends a uid's session: revokes the refresh token at the issuer (RFC 7009), deletes
    /// the session and closes the uid's proxied connections. Returns (revoked, closed).
    pub async fn end_session(&self, uid: u32, kind: EventKind, why: &str) -> Option<(bool, usize)> {
        let session = self.lock_sessions().remove(&uid)?;
        let _ = std::fs::remove_file(session_path(&self.sessions_dir, uid));
        let mut revoked = false;
        if let (Some(token), Some(provider)) = (&session.refresh_token, &self.provider) {
            match provider
                .revoke(&self.config.client_id, token, "refresh_token")
                .await
            {
                Ok(r) => revoked = r,
                Err(e) => tracing::warn!(uid, error = %e, "revoking the refresh token failed"),
            }
        }
        let closed = self.session_ends.session_ended(uid, why);
        let mut ev = AuditEvent::new(kind).reason(format!(
            "{why}; refresh token revoked: {revoked}; connections closed: {closed}"
        ));
        ev.identity = Some(session_identity(&session).into());
        self.audit.record(ev);
        Some((revoked, closed))
    }

    /// uids whose session matches a `logins revoke` selector (a uid or a subject).
    pub fn select(&self, selector: &str) -> Vec<u32> {
        let sessions = self.lock_sessions();
        match selector.parse::<u32>() {
            Ok(uid) if sessions.contains_key(&uid) => vec![uid],
            _ => sessions
                .values()
                .filter(|s| s.subject == selector)
                .map(|s| s.uid)
                .collect(),
        }
    }

    /// Refreshes sessions before they expire, ends expired ones, renews service tokens.
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.tick().await;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn tick(&self) {
        let now = now_secs();
        let due: Vec<(u32, Secret)> = self
            .lock_sessions()
            .values()
            .filter(|s| s.expires_at > now)
            .filter(|s| s.expires_at.saturating_sub(self.config.refresh_before_secs) <= now)
            .filter(|s| now.saturating_sub(s.last_refresh_attempt) >= 5)
            .filter_map(|s| s.refresh_token.clone().map(|t| (s.uid, t)))
            .collect();
        for (uid, token) in due {
            self.refresh(uid, &token).await;
        }
        let expired: Vec<u32> = self
            .lock_sessions()
            .values()
            .filter(|s| s.expires_at <= now)
            .map(|s| s.uid)
            .collect();
        for uid in expired {
            let Some(session) = self.lock_sessions().remove(&uid) else {
                continue;
            };
            let _ = std::fs::remove_file(session_path(&self.sessions_dir, uid));
            let closed = match self.config.on_session_end {
                OnSessionEnd::Close => self.session_ends.session_ended(uid, "session expired"),
                OnSessionEnd::Keep => 0,
            };
            let mut ev = AuditEvent::new(EventKind::LoginExpired)
                .reason(format!("session expired; connections closed: {closed}"));
            ev.identity = Some(session_identity(&session).into());
            self.audit.record(ev);
            tracing::info!(uid, closed, "session expired");
        }
        for svc in &self.services {
            let due = {
                let st = svc.state.lock().unwrap_or_else(|p| p.into_inner());
                let renew_at = st.expires_at.saturating_sub(st.lifetime / 5);
                renew_at <= now && now.saturating_sub(st.last_attempt) >= 5
            };
            if due {
                self.renew_service(svc).await;
            }
        }
    }

    async fn refresh(&self, uid: u32, token: &Secret) {
        let Some(provider) = self.provider.clone() else {
            return;
        };
        if let Some(s) = self.lock_sessions().get_mut(&uid) {
            s.last_refresh_attempt = now_secs();
        }
        let result = async {
            let tokens = provider.refresh(&self.config.client_id, token).await?;
            let claims = match &tokens.id_token {
                Some(id) => {
                    let audience = self
                        .config
                        .audience
                        .clone()
                        .unwrap_or_else(|| self.config.client_id.clone());
                    let expect =
                        self.expectations(provider.issuer(), &audience, &Default::default());
                    Some(provider.validate(id.expose(), &expect).await?)
                }
                None => None,
            };
            Ok::<_, OidcError>((tokens, claims))
        }
        .await;
        let mut sessions = self.lock_sessions();
        let Some(s) = sessions.get_mut(&uid) else {
            return;
        };
        match result {
            Ok((tokens, claims)) => {
                if let Some(c) = claims {
                    s.expires_at = c.expires_at;
                    s.groups = c.groups;
                    s.email = c.email;
                    s.name = c.name;
                } else if let Some(secs) = tokens.expires_in {
                    s.expires_at = now_secs() + secs;
                }
                if tokens.refresh_token.is_some() {
                    s.refresh_token = tokens.refresh_token;
                }
                s.refresh_failing = false;
                if let Err(e) = save_session(&self.sessions_dir, s) {
                    tracing::warn!(uid, error = %e, "cannot save the refreshed session");
                }
                tracing::debug!(uid, expires_at = s.expires_at, "session refreshed");
            }
            Err(e) => {
                if !s.refresh_failing {
                    s.refresh_failing = true;
                    let mut ev = AuditEvent::new(EventKind::LoginRefreshFailed)
                        .reason(format!("{e}; the session lasts until {}", s.expires_at));
                    ev.identity = Some(session_identity(s).into());
                    self.audit.record(ev);
                }
                tracing::warn!(uid, error = %e, "refreshing the session failed; it lasts until it expires");
            }
        }
    }

    async fn renew_service(&self, svc: &Service) {
        let Some(provider) = self.provider.clone() else {
            return;
        };
        let now = now_secs();
        svc.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_attempt = now;
        let result = provider
            .client_credentials(&svc.client_id, &svc.secret, &svc.scopes)
            .await;
        let mut st = svc.state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(t) if t.access_token.is_some() => {
                let lifetime = t.expires_in.unwrap_or(300).max(10);
                st.expires_at = now + lifetime;
                st.lifetime = lifetime;
                st.last_error = None;
                tracing::debug!(service = %svc.name, lifetime, "service token renewed");
            }
            Ok(_) => st.last_error = Some("the token response carried no access token".into()),
            Err(e) => {
                if st.last_error.is_none() {
                    tracing::warn!(service = %svc.name, error = %e, "service identity token request failed");
                }
                st.last_error = Some(e.to_string());
            }
        }
    }

    /// Cancels one pending login (its client went away before waiting).
    pub fn cancel_login(&self, login_id: u64) {
        if let Some(p) = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&login_id)
        {
            p.cancel.cancel();
        }
    }

    pub fn cancel_pending(&self) {
        for p in self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            p.cancel.cancel();
        }
        self.stopping.cancel();
    }

    /// Waits (up to `limit`) for the device-flow pollers that `cancel_pending` stopped.
    pub async fn wait_for_logins(&self, limit: Duration) {
        self.logins.close();
        if tokio::time::timeout(limit, self.logins.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.logins.len(),
                "device logins still running at shutdown"
            );
        }
    }
}

fn unix_identity(uid: u32) -> Identity {
    Identity {
        kind: IdentityKind::Unix,
        uid,
        gid: 0,
        user: account_name(uid),
        subject: None,
        email: None,
        name: None,
        groups: Vec::new(),
        issuer: None,
    }
}

fn session_identity(s: &Session) -> Identity {
    Identity {
        kind: s.kind,
        uid: s.uid,
        gid: 0,
        user: account_name(s.uid),
        subject: Some(s.subject.clone()),
        email: s.email.clone(),
        name: s.name.clone(),
        groups: s.groups.clone(),
        issuer: Some(s.issuer.clone()),
    }
}

/// The `iss` of a JWT before verification, only to pick which issuer verifies it.
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_string)
}

fn read_secret_file(path: &Path) -> Result<Secret, IdentityError> {
    let meta =
        std::fs::metadata(path).map_err(io(format!("reading client secret {}", path.display())))?;
    if meta.mode() & 0o077 != 0 {
        return Err(IdentityError::Config(format!(
            "client secret {} is readable by others (mode {:o}); make it 0600",
            path.display(),
            meta.mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(io(format!("reading client secret {}", path.display())))?;
    Ok(Secret::new(text.trim().to_string()))
}

/// `<state_dir>/sessions`, 0700 whatever the umask (and so is a missing state directory).
/// One that is not the agent's own is refused: whoever owns it could plant a login for any
/// uid.
fn create_sessions_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    let meta = std::fs::symlink_metadata(dir).map_err(io(format!("reading {}", dir.display())))?;
    let agent = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != agent {
        return Err(IdentityError::Config(format!(
            "{} is not a directory owned by uid {agent} (the agent); it holds every login, so remove it and let the agent create it",
            dir.display()
        )));
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("securing {}", dir.display())))
}

fn session_path(dir: &Path, uid: u32) -> PathBuf {
    dir.join(format!("{uid}.json"))
}

fn save_session(dir: &Path, s: &Session) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{}.json.tmp", s.uid));
    let data = serde_json::to_vec(s).map_err(std::io::Error::other)?;
    // A temporary file left by a crash is replaced, never reused with whatever mode it has.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, session_path(dir, s.uid))
}

fn load_sessions(dir: &Path) -> HashMap<u32, Session> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let now = now_secs();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Session>(&b).ok())
        {
            Some(s) if s.expires_at > now => {
                out.insert(s.uid, s);
            }
            Some(_) => {
                let _ = std::fs::remove_file(&path);
            }
            None => tracing::warn!(path = %path.display(), "ignoring an unreadable session file"),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn uid_0_resolves_to_root_through_nss() {
        assert_eq!(account_name(0).as_deref(), Some("root"));
    }

    /// The client, `portcullis status` and the audit trail show these words; the e2e suites
    /// match them.
    #[test]
    fn identity_and_login_errors_read_as_before() {
        let who = || "alice".to_string();
        assert_eq!(
            ResolveError::NoLogin { who: who() }.to_string(),
            "no valid login for alice: run `portcullis login`"
        );
        assert_eq!(
            ResolveError::LoginExpired { who: who() }.to_string(),
            "no valid login for alice: run `portcullis login`"
        );
        let service = |last_error: Option<&str>| ResolveError::ServiceToken {
            service: "etl".into(),
            last_error: last_error.map(str::to_string),
        };
        assert_eq!(
            service(None).to_string(),
            "service identity `etl` has no valid token"
        );
        assert_eq!(
            service(Some("issuer unreachable")).to_string(),
            "service identity `etl` has no valid token: issuer unreachable"
        );
        assert_eq!(
            LoginError::NoIssuer.to_string(),
            "no identity provider is configured (identity.issuer)"
        );
        assert_eq!(
            LoginError::TooManyPending(crate::limits::Limited::Logins(2)).to_string(),
            format!(
                "{}: finish or cancel a login first",
                crate::limits::Limited::Logins(2)
            )
        );
        assert_eq!(
            LoginError::NotInProgress(7).to_string(),
            "no login 7 in progress for this user"
        );
        assert_eq!(
            LoginError::UntrustedIssuer("https://ci.example".into()).to_string(),
            "issuer `https://ci.example` is not trusted for workload logins"
        );
        assert_eq!(
            LoginError::MalformedToken.to_string(),
            "the token is malformed: no readable `iss` claim"
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("refresh-me".into());
        assert_eq!(format!("{s:?}"), "[redacted]");
    }

    #[test]
    fn unverified_issuer_reads_the_payload_only() {
        use base64::Engine;
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = format!(
            "{}.{}.sig",
            enc(r#"{"alg":"RS256"}"#),
            enc(r#"{"iss":"https://ci.example"}"#)
        );
        assert_eq!(
            unverified_issuer(&token).as_deref(),
            Some("https://ci.example")
        );
        assert_eq!(unverified_issuer("garbage"), None);
    }

    /// Every directory and file of the agent's state gets its mode from the code, not the
    /// umask: under umask 0 nothing becomes readable, or writable, by others.
    #[test]
    fn state_files_and_directories_ignore_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        const NAME: &str = "identity::tests::state_files_and_directories_ignore_the_umask";
        const CHILD: &str = "PORTCULLIS_TEST_UMASK_0";
        if std::env::var_os(CHILD).is_none() {
            // The umask belongs to the whole process: change it in a child that runs this
            // test alone, never beside the others.
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([NAME, "--exact", "--test-threads=1", "--nocapture"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        use nix::sys::stat::{umask, Mode};
        struct Restore(Mode);
        impl Drop for Restore {
            fn drop(&mut self) {
                umask(self.0);
            }
        }
        let _restore = Restore(umask(Mode::empty()));
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();

        // Sessions, in a state directory that does not exist yet.
        let state = root.path().join("state");
        let sessions = state.join("sessions");
        create_sessions_dir(&sessions).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&sessions), 0o700);
        std::fs::write(sessions.join(".1234.json.tmp"), "left by a crash").unwrap();
        std::fs::set_permissions(
            sessions.join(".1234.json.tmp"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let s = Session {
            uid: 1234,
            kind: IdentityKind::User,
            subject: "alice".into(),
            email: None,
            name: None,
            groups: Vec::new(),
            issuer: "https://idp".into(),
            expires_at: now_secs() + 100,
            logged_in_at: now_secs(),
            refresh_token: Some(Secret::new("r".into())),
            last_refresh_attempt: 0,
            refresh_failing: false,
        };
        save_session(&sessions, &s).unwrap();
        assert_eq!(mode(&session_path(&sessions, 1234)), 0o600);

        // A shipper's progress file.
        let progress = state.join("audit-shipped");
        crate::audit::spool::write_progress(&progress, 7).unwrap();
        assert_eq!(mode(&progress), 0o600);

        // The audit store as the agent opens it, in a state directory of its own.
        let state2 = root.path().join("state2");
        let audit_dir = state2.join("audit");
        let (log, _) =
            crate::audit::AuditLog::open(&Default::default(), &audit_dir, Vec::new()).unwrap();
        drop(log);
        assert_eq!(mode(&state2), 0o700);
        assert_eq!(mode(&audit_dir), 0o700);
        // Its segments, seals, anchor (written when retention prunes) and lock file.
        let store_dir = root.path().join("a/b/store");
        let (mut store, _) =
            portcullis_audit_store::Store::open(&store_dir, Default::default()).unwrap();
        store.append(br#"{"n":1}"#).unwrap();
        store.seal_current().unwrap();
        store.append(br#"{"n":2}"#).unwrap();
        let retention = portcullis_audit_store::Retention {
            max_age_ms: None,
            max_total_bytes: Some(0),
        };
        let pruned = store.prune(&retention, u64::MAX, u64::MAX / 2).unwrap();
        assert_eq!(pruned.deleted.len(), 1, "{pruned:?}");
        drop(store);
        assert_eq!(mode(&root.path().join("a")), 0o700);
        let mut files = 0;
        for entry in std::fs::read_dir(&store_dir).unwrap() {
            let path = entry.unwrap().path();
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            files += 1;
        }
        assert!(
            store_dir.join("anchor.jsonl").exists() && files >= 3,
            "lock, anchor and a segment"
        );
    }

    #[test]
    fn a_sessions_directory_someone_else_owns_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let sessions = root.path().join("sessions");
        std::fs::create_dir(&sessions).unwrap();
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&sessions, Some(65534), Some(65534)).unwrap();
            let err = create_sessions_dir(&sessions).unwrap_err().to_string();
            assert!(err.contains("not a directory owned by uid 0"), "{err}");
            std::os::unix::fs::chown(&sessions, Some(0), Some(0)).unwrap();
        }
        create_sessions_dir(&sessions).unwrap();
        std::fs::remove_dir(&sessions).unwrap();
        std::os::unix::fs::symlink(root.path(), &sessions).unwrap();
        let err = create_sessions_dir(&sessions).unwrap_err().to_string();
        assert!(err.contains("not a directory owned by"), "{err}");
    }

    #[test]
    fn sessions_are_saved_root_only_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let s = Session {
            uid: 1234,
            kind: IdentityKind::User,
            subject: "alice".into(),
            email: None,
            name: None,
            groups: vec!["eng".into()],
            issuer: "https://idp".into(),
            expires_at: now_secs() + 100,
            logged_in_at: now_secs(),
            refresh_token: Some(Secret::new("r".into())),
            last_refresh_attempt: 0,
            refresh_failing: false,
        };
        save_session(dir.path(), &s).unwrap();
        let mode = std::fs::metadata(session_path(dir.path(), 1234))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut expired = s.clone();
        expired.uid = 99;
        expired.expires_at = 1;
        save_session(dir.path(), &expired).unwrap();
        let loaded = load_sessions(dir.path());
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded.get(&1234).unwrap().subject, "alice");
        assert!(
            !session_path(dir.path(), 99).exists(),
            "expired sessions are deleted on load"
        );
    }
}
