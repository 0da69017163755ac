//! The agent's side of OpenID Connect, on the `openidconnect` crate: discovery, the device
//! authorization grant (RFC 8628), refresh, client credentials, the issuer's keys, and
//! revocation (RFC 7009).
//!
//! Every request goes through one reqwest client with the agent's timeouts and no
//! redirects (a redirect could carry a form with a secret to another host).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClient, CoreClientAuthMethod,
    CoreDeviceAuthorizationResponse, CoreGrantType, CoreJsonWebKey, CoreJsonWebKeySet,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreResponseMode,
    CoreResponseType, CoreSubjectIdentifierType, CoreTokenResponse,
};
use openidconnect::{
    AdditionalProviderMetadata, ClientId, ClientSecret, DeviceAuthorizationUrl,
    DeviceCodeErrorResponseType, DiscoveryError, EndpointMaybeSet, EndpointNotSet, EndpointSet,
    ErrorResponse, HttpClientError, IssuerUrl, OAuth2TokenResponse, ProviderMetadata, RefreshToken,
    RequestTokenError, RevocationUrl, Scope, TokenResponse as _,
};
use serde::{Deserialize, Serialize};

use super::jwt::{self, Expectations, KeySet, TokenError, VerifiedClaims};
use super::Secret;

/// Never refetch the key set more often than this because of unknown key ids, so a
/// stream of forged tokens cannot turn the agent into a load generator.
const JWKS_REFETCH_MIN: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("cannot reach the identity provider at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the identity provider refused at {url}: {message}")]
    Refused { url: String, message: String },
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

/// The endpoints of the grants the agent uses beyond OpenID Connect Core's metadata
/// (RFC 8628 section 4, RFC 8414 section 2).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct GrantEndpoints {
    #[serde(default)]
    device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
    #[serde(default)]
    revocation_endpoint: Option<RevocationUrl>,
}

impl AdditionalProviderMetadata for GrantEndpoints {}

/// An issuer's discovery document (with its key set as fetched at discovery).
pub type Metadata = ProviderMetadata<
    GrantEndpoints,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// A client built from discovery: the token endpoint is optional in the metadata, so each
/// grant checks for it when it is used.
type DiscoveredClient = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

type HttpError = HttpClientError<reqwest::Error>;

/// A device login in progress: what the user is shown, and the provider's answer the
/// poller needs (its device code never prints).
#[derive(Debug, Clone)]
pub struct DeviceAuthorization {
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    response: CoreDeviceAuthorizationResponse,
}

#[derive(Debug, Clone)]
pub struct TokenResponse {
    pub id_token: Option<Secret>,
    pub access_token: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub expires_in: Option<u64>,
}

impl From<CoreTokenResponse> for TokenResponse {
    fn from(t: CoreTokenResponse) -> Self {
        Self {
            id_token: t.id_token().map(|id| Secret::new(id.to_string())),
            access_token: Some(Secret::new(t.access_token().secret().clone())),
            refresh_token: t.refresh_token().map(|r| Secret::new(r.secret().clone())),
            expires_in: t.expires_in().map(|d| d.as_secs()),
        }
    }
}

#[derive(Deserialize)]
struct RevocationErrorBody {
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

    /// The discovery document, fetched once (a failure is not cached: the next login tries
    /// again). openidconnect checks that it names this issuer exactly and fetches the keys.
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
        let issuer = IssuerUrl::new(self.issuer.clone()).map_err(|e| {
            OidcError::Config(format!("issuer `{}` is not a URL: {e}", self.issuer))
        })?;
        let m = Metadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| discovery_error(&url, e))?;
        {
            let mut cache = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            if cache.fetched.is_none() {
                cache.keys = Arc::new(KeySet::from_jwks(m.jwks().clone()));
                cache.fetched = Some(Instant::now());
            }
        }
        let m = Arc::new(m);
        *self.metadata.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&m));
        Ok(m)
    }

    async fn client(
        &self,
        client_id: &str,
        secret: Option<&Secret>,
    ) -> Result<(DiscoveredClient, Arc<Metadata>), OidcError> {
        let meta = self.metadata().await?;
        let client = CoreClient::from_provider_metadata(
            Metadata::clone(&meta),
            ClientId::new(client_id.to_string()),
            secret.map(|s| ClientSecret::new(s.expose().to_string())),
        );
        Ok((client, meta))
    }

    fn token_url(&self, meta: &Metadata) -> String {
        meta.token_endpoint()
            .map_or_else(|| self.issuer.clone(), |u| u.to_string())
    }

    async fn fetch_keys(&self) -> Result<Arc<KeySet>, OidcError> {
        let meta = self.metadata().await?;
        let url = meta.jwks_uri().to_string();
        let set = CoreJsonWebKeySet::fetch_async(meta.jwks_uri(), &self.http)
            .await
            .map_err(|e| discovery_error(&url, e))?;
        let keys = Arc::new(KeySet::from_jwks(set));
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
        let (client, meta) = self.client(client_id, None).await?;
        let url = meta
            .additional_metadata()
            .device_authorization_endpoint
            .clone()
            .ok_or_else(|| {
                OidcError::Config(format!(
                    "{} does not offer the device authorization grant",
                    self.issuer
                ))
            })?;
        let at = url.to_string();
        let response: CoreDeviceAuthorizationResponse = client
            .set_device_authorization_url(url)
            .exchange_device_code()
            .add_scopes(scope_list(scopes))
            .request_async(&self.http)
            .await
            .map_err(|e| request_error(&at, e))?;
        Ok(DeviceAuthorization {
            user_code: response.user_code().secret().clone(),
            verification_uri: response.verification_uri().to_string(),
            verification_uri_complete: response
                .verification_uri_complete()
                .map(|u| u.secret().clone()),
            expires_in: response.expires_in().as_secs(),
            response,
        })
    }

    /// Polls the token endpoint until the user finishes, the code expires, or `cancel` fires.
    /// openidconnect keeps the interval (RFC 8628 section 3.5: `slow_down` adds five
    /// seconds) and rides out a passing outage of the provider with a bounded backoff: only
    /// the code's expiry ends the login.
    pub async fn poll_device(
        &self,
        client_id: &str,
        device: &DeviceAuthorization,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<TokenResponse, OidcError> {
        let (client, meta) = self.client(client_id, None).await?;
        let at = self.token_url(&meta);
        let poll = client
            .exchange_device_access_token(&device.response)
            .map_err(|e| OidcError::Config(format!("{}: {e}", self.issuer)))?
            .request_async(&self.http, tokio::time::sleep, None);
        let outcome = tokio::select! {
            () = cancel.cancelled() => return Err(OidcError::Config("the login was cancelled".into())),
            outcome = poll => outcome,
        };
        match outcome {
            Ok(t) => Ok(t.into()),
            Err(RequestTokenError::ServerResponse(r)) => match r.error() {
                DeviceCodeErrorResponseType::ExpiredToken => Err(OidcError::Expired),
                DeviceCodeErrorResponseType::AccessDenied => Err(OidcError::Denied),
                _ => Err(OidcError::Refused {
                    url: at,
                    message: r.to_string(),
                }),
            },
            Err(e) => Err(request_error(&at, e)),
        }
    }

    pub async fn refresh(
        &self,
        client_id: &str,
        refresh_token: &Secret,
    ) -> Result<TokenResponse, OidcError> {
        let (client, meta) = self.client(client_id, None).await?;
        let at = self.token_url(&meta);
        let token = RefreshToken::new(refresh_token.expose().to_string());
        let tokens = client
            .exchange_refresh_token(&token)
            .map_err(|e| OidcError::Config(format!("{}: {e}", self.issuer)))?
            .request_async(&self.http)
            .await
            .map_err(|e| request_error(&at, e))?;
        Ok(tokens.into())
    }

    /// Revokes a token (RFC 7009). Ok(false) when the issuer offers no revocation endpoint.
    ///
    /// The one request written here rather than with openidconnect: its revocation request
    /// refuses any endpoint that is not https (RFC 7009 section 2), and the configuration
    /// accepts plain http for an issuer on loopback (a provider on the same host).
    pub async fn revoke(
        &self,
        client_id: &str,
        token: &Secret,
        hint: &str,
    ) -> Result<bool, OidcError> {
        let meta = self.metadata().await?;
        let Some(url) = meta.additional_metadata().revocation_endpoint.clone() else {
            return Ok(false);
        };
        let url = url.to_string();
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
            return Ok(true);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<RevocationErrorBody>(&text) {
            Ok(b) => match b.error_description {
                Some(d) => format!("{}: {d}", b.error),
                None => b.error,
            },
            Err(_) => format!("HTTP {status}"),
        };
        Err(OidcError::Refused { url, message })
    }

    pub async fn client_credentials(
        &self,
        client_id: &str,
        secret: &Secret,
        scopes: &str,
    ) -> Result<TokenResponse, OidcError> {
        let (client, meta) = self.client(client_id, Some(secret)).await?;
        let at = self.token_url(&meta);
        let tokens = client
            .exchange_client_credentials()
            .map_err(|e| OidcError::Config(format!("{}: {e}", self.issuer)))?
            .add_scopes(scope_list(scopes))
            .request_async(&self.http)
            .await
            .map_err(|e| request_error(&at, e))?;
        Ok(tokens.into())
    }
}

fn scope_list(scopes: &str) -> Vec<Scope> {
    scopes
        .split_whitespace()
        .map(|s| Scope::new(s.to_string()))
        .collect()
}

/// An error and its causes on one line: reqwest's own message is only the outermost.
fn chain(e: &dyn std::error::Error) -> String {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason = format!("{reason}: {s}");
        source = s.source();
    }
    reason
}

fn unreachable(url: &str, e: &reqwest::Error) -> OidcError {
    OidcError::Unreachable {
        url: url.to_string(),
        reason: chain(e),
    }
}

fn http_error(url: &str, e: &HttpError) -> OidcError {
    match e {
        HttpClientError::Reqwest(e) => unreachable(url, e),
        other => OidcError::Unreachable {
            url: url.to_string(),
            reason: chain(other),
        },
    }
}

/// Why an answer could not be read, without quoting it: a token response carries secrets,
/// and serde's messages repeat the offending value.
fn unreadable(path: &dyn std::fmt::Display, inner: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match inner.classify() {
        Category::Syntax | Category::Io => "it is not JSON",
        Category::Eof => "it is cut short",
        Category::Data => "a field is missing or of the wrong type",
    };
    format!("{what} (at `{path}`)")
}

fn request_error<TE>(url: &str, e: RequestTokenError<HttpError, TE>) -> OidcError
where
    TE: ErrorResponse + std::fmt::Display,
{
    match e {
        RequestTokenError::ServerResponse(r) => OidcError::Refused {
            url: url.to_string(),
            message: r.to_string(),
        },
        RequestTokenError::Request(e) => http_error(url, &e),
        RequestTokenError::Parse(e, _body) => OidcError::Protocol {
            url: url.to_string(),
            reason: unreadable(e.path(), e.inner()),
        },
        RequestTokenError::Other(reason) => OidcError::Protocol {
            url: url.to_string(),
            reason,
        },
    }
}

fn discovery_error(url: &str, e: DiscoveryError<HttpError>) -> OidcError {
    match e {
        DiscoveryError::Request(e) => http_error(url, &e),
        DiscoveryError::Response(status, _body, message) => OidcError::Refused {
            url: url.to_string(),
            message: format!("HTTP {}: {message}", status.as_u16()),
        },
        DiscoveryError::Parse(e) => OidcError::Protocol {
            url: url.to_string(),
            reason: unreadable(e.path(), e.inner()),
        },
        DiscoveryError::Validation(reason) | DiscoveryError::Other(reason) => OidcError::Protocol {
            url: url.to_string(),
            reason,
        },
        DiscoveryError::UrlParse(e) => OidcError::Config(format!("{url}: {e}")),
        other => OidcError::Protocol {
            url: url.to_string(),
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A provider on a loopback port: its discovery document, an empty key set, and this
    /// status and body at its token endpoint. It serves until the test ends.
    async fn provider_answering(status: u16, token_body: &'static str) -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let discovery = serde_json::json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/auth"),
            "token_endpoint": format!("{issuer}/token"),
            "jwks_uri": format!("{issuer}/jwks"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
        .to_string();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers and a form body both fit in a few reads; the answer ends the
                // connection, so no request waits on another.
                while !String::from_utf8_lossy(&request).contains("\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&request).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let (code, body) = match path.as_str() {
                    "/.well-known/openid-configuration" => (200, discovery.clone()),
                    "/jwks" => (200, r#"{"keys":[]}"#.to_string()),
                    "/token" => (status, token_body.to_string()),
                    _ => (404, "{}".to_string()),
                };
                let answer = format!(
                    "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.unwrap();
                let _ = socket.shutdown().await;
            }
        });
        Provider::new(&issuer).unwrap()
    }

    #[tokio::test]
    async fn a_refused_grant_reads_as_the_providers_error() {
        let p = provider_answering(
            400,
            r#"{"error":"invalid_grant","error_description":"grant request is invalid"}"#,
        )
        .await;
        let e = p
            .refresh("portcullis", &Secret::new("rt".into()))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the identity provider refused at {}/token: invalid_grant: grant request is invalid",
                p.issuer()
            )
        );
    }

    #[tokio::test]
    async fn a_token_answer_that_cannot_be_read_is_reported_without_its_content() {
        let p = provider_answering(
            200,
            r#"{"access_token":"at-s3cret","token_type":"Bearer","refresh_token":"rt-s3cret","expires_in":"rt-s3cret-too"}"#,
        )
        .await;
        let e = p
            .refresh("portcullis", &Secret::new("rt".into()))
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, OidcError::Protocol { .. }), "{text}");
        assert!(text.contains("expires_in"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
