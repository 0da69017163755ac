//! The agent's side of OpenID Connect: discovery, the device authorization grant
//! (RFC 8628), refresh, revocation (RFC 7009), client credentials, and the issuer's keys.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use serde::Deserialize;

use super::jwt::{self, Expectations, KeySet, TokenError, VerifiedClaims};
use super::Secret;

/// Never refetch the key set more often than this because of unknown key ids, so a
/// stream of forged tokens cannot turn the agent into a load generator.
const JWKS_REFETCH_MIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("cannot reach the identity provider at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the identity provider answered {status} at {url}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("the identity provider's answer at {url} is not valid: {reason}")]
    Protocol { url: String, reason: String },
    #[error("the token is not acceptable: {0}")]
    Token(#[from] TokenError),
    #[error("the login was not completed in time (the code expired)")]
    Expired,
    #[error("the login was denied at the identity provider")]
    Denied,
    #[error("{0}")]
    Config(String),
}

#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    pub issuer: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DeviceAuthorization {
    pub device_code: Secret,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    #[serde(default)]
    pub interval: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    pub id_token: Option<Secret>,
    #[serde(default)]
    pub access_token: Option<Secret>,
    #[serde(default)]
    pub refresh_token: Option<Secret>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

struct KeyCache {
    keys: Arc<KeySet>,
    fetched: Option<Instant>,
}

/// One issuer: its metadata and keys, fetched lazily and cached.
pub struct Provider {
    issuer: String,
    http: reqwest::Client,
    metadata: Mutex<Option<Arc<Metadata>>>,
    keys: Mutex<KeyCache>,
}

impl Provider {
    pub fn new(issuer: &str) -> Result<Self, OidcError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| OidcError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            issuer: issuer.trim_end_matches('/').to_string(),
            http,
            metadata: Mutex::new(None),
            keys: Mutex::new(KeyCache {
                keys: Arc::new(KeySet::default()),
                fetched: None,
            }),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub async fn metadata(&self) -> Result<Arc<Metadata>, OidcError> {
        if let Some(m) = self
            .metadata
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(m);
        }
        let url = format!("{}/.well-known/openid-configuration", self.issuer);
        let m: Metadata = self.get_json(&url).await?;
        if m.issuer.trim_end_matches('/') != self.issuer {
            return Err(OidcError::Protocol {
                url,
                reason: format!("it names issuer `{}`, not `{}`", m.issuer, self.issuer),
            });
        }
        let m = Arc::new(m);
        *self.metadata.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&m));
        Ok(m)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, OidcError> {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| unreachable(url, &e))?;
        decode(url, resp).await
    }

    async fn post_form<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> Result<T, OidcError> {
        let mut req = self.http.post(url).form(form);
        if let Some((user, pass)) = basic {
            req = req.basic_auth(user, Some(pass));
        }
        let resp = req.send().await.map_err(|e| unreachable(url, &e))?;
        decode(url, resp).await
    }

    async fn fetch_keys(&self) -> Result<Arc<KeySet>, OidcError> {
        let meta = self.metadata().await?;
        let set: JwkSet = self.get_json(&meta.jwks_uri).await?;
        let keys = Arc::new(KeySet::from_jwks(&set));
        let mut cache = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        cache.keys = Arc::clone(&keys);
        cache.fetched = Some(Instant::now());
        Ok(keys)
    }

    /// Validates a token against this issuer's keys, refetching them once when the token
    /// names a key we have not seen (key rotation at the provider).
    pub async fn validate(
        &self,
        token: &str,
        expect: &Expectations,
    ) -> Result<VerifiedClaims, OidcError> {
        let (keys, fetched) = {
            let cache = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            (Arc::clone(&cache.keys), cache.fetched)
        };
        let keys = if fetched.is_none() {
            self.fetch_keys().await?
        } else {
            keys
        };
        match jwt::validate(token, &keys, expect, super::now_secs()) {
            Err(TokenError::UnknownKey(kid)) => {
                let recently = self
                    .keys
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .fetched
                    .is_some_and(|t| t.elapsed() < JWKS_REFETCH_MIN);
                if recently && fetched.is_some() {
                    return Err(TokenError::UnknownKey(kid).into());
                }
                tracing::info!(issuer = %self.issuer, %kid, "unknown signing key; refetching the issuer's keys");
                let keys = self.fetch_keys().await?;
                Ok(jwt::validate(token, &keys, expect, super::now_secs())?)
            }
            other => Ok(other?),
        }
    }

    pub async fn start_device(
        &self,
        client_id: &str,
        scopes: &str,
    ) -> Result<DeviceAuthorization, OidcError> {
        let meta = self.metadata().await?;
        let url = meta.device_authorization_endpoint.clone().ok_or_else(|| {
            OidcError::Config(format!(
                "{} does not offer the device authorization grant",
                self.issuer
            ))
        })?;
        self.post_form(&url, &[("client_id", client_id), ("scope", scopes)], None)
            .await
    }

    /// Polls the token endpoint until the user finishes, the code expires, or `cancel` fires.
    pub async fn poll_device(
        &self,
        client_id: &str,
        device: &DeviceAuthorization,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<TokenResponse, OidcError> {
        let meta = self.metadata().await?;
        let deadline = Instant::now() + Duration::from_secs(device.expires_in);
        let mut interval = Duration::from_secs(device.interval.unwrap_or(5).max(1));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Err(OidcError::Config("the login was cancelled".into())),
                () = tokio::time::sleep(interval) => {}
            }
            if Instant::now() >= deadline {
                return Err(OidcError::Expired);
            }
            let form = [
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", device.device_code.expose()),
                ("client_id", client_id),
            ];
            match self
                .post_form::<TokenResponse>(&meta.token_endpoint, &form, None)
                .await
            {
                Ok(t) => return Ok(t),
                Err(OidcError::Refused { message, .. })
                    if message.starts_with("authorization_pending") => {}
                Err(OidcError::Refused { message, .. }) if message.starts_with("slow_down") => {
                    interval += Duration::from_secs(5);
                }
                Err(OidcError::Refused { message, .. }) if message.starts_with("expired_token") => {
                    return Err(OidcError::Expired)
                }
                Err(OidcError::Refused { message, .. }) if message.starts_with("access_denied") => {
                    return Err(OidcError::Denied)
                }
                // A passing outage of the provider does not end the login; the deadline does.
                Err(e @ OidcError::Unreachable { .. }) => {
                    tracing::warn!(error = %e, "polling the token endpoint")
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn refresh(
        &self,
        client_id: &str,
        refresh_token: &Secret,
    ) -> Result<TokenResponse, OidcError> {
        let meta = self.metadata().await?;
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
            ("client_id", client_id),
        ];
        self.post_form(&meta.token_endpoint, &form, None).await
    }

    /// Revokes a token (RFC 7009). Ok(false) when the issuer offers no revocation endpoint.
    pub async fn revoke(
        &self,
        client_id: &str,
        token: &Secret,
        hint: &str,
    ) -> Result<bool, OidcError> {
        let meta = self.metadata().await?;
        let Some(url) = meta.revocation_endpoint.clone() else {
            return Ok(false);
        };
        let form = [
            ("token", token.expose()),
            ("token_type_hint", hint),
            ("client_id", client_id),
        ];
        let resp = self
            .http
            .post(&url)
            .form(&form)
            .send()
            .await
            .map_err(|e| unreachable(&url, &e))?;
        if resp.status().is_success() {
            Ok(true)
        } else {
            Err(error_of(&url, resp).await)
        }
    }

    pub async fn client_credentials(
        &self,
        client_id: &str,
        secret: &Secret,
        scopes: &str,
    ) -> Result<TokenResponse, OidcError> {
        let meta = self.metadata().await?;
        let mut form = vec![("grant_type", "client_credentials")];
        if !scopes.is_empty() {
            form.push(("scope", scopes));
        }
        self.post_form(
            &meta.token_endpoint,
            &form,
            Some((client_id, secret.expose())),
        )
        .await
    }
}

fn unreachable(url: &str, e: &reqwest::Error) -> OidcError {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason = format!("{reason}: {s}");
        source = s.source();
    }
    OidcError::Unreachable {
        url: url.to_string(),
        reason,
    }
}

async fn error_of(url: &str, resp: reqwest::Response) -> OidcError {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let message = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => match b.error_description {
            Some(d) => format!("{}: {d}", b.error),
            None => b.error,
        },
        Err(_) => text.chars().take(200).collect(),
    };
    OidcError::Refused {
        url: url.to_string(),
        status,
        message,
    }
}

async fn decode<T: serde::de::DeserializeOwned>(
    url: &str,
    resp: reqwest::Response,
) -> Result<T, OidcError> {
    if !resp.status().is_success() {
        return Err(error_of(url, resp).await);
    }
    let bytes = resp.bytes().await.map_err(|e| unreachable(url, &e))?;
    serde_json::from_slice(&bytes).map_err(|e| OidcError::Protocol {
        url: url.to_string(),
        reason: e.to_string(),
    })
}
