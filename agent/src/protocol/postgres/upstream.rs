//! The agent's side of the conversation with the real server: TLS (verify-full unless the
//! target says `insecure-…`), the startup packet for the mapped role, and authentication with
//! the credential from the target's root-only credentials file (SCRAM-SHA-256, with channel
//! binding when the server offers SCRAM-SHA-256-PLUS over TLS; md5; cleartext only over TLS
//! or when the target is explicitly plaintext).
//!
//! Protocol: PostgreSQL docs, "Message Flow" → "Start-up" and "SASL Authentication".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use portcullis_pgwire::{
    encode_password, encode_sasl_initial_response, encode_sasl_response, encode_ssl_request,
    encode_startup, parse_backend, Authentication, BackendMessage, ErrorFields, StartupMessage,
};
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::stream::{read_message, write_out, ReadError, Stream};
use crate::config::{PostgresTargetConfig, UpstreamTls};
use crate::identity::Secret;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot read the credentials file {path}: {message}")]
    Credentials { path: String, message: String },
    #[error("the credentials file has no password for role `{role}`")]
    NoCredential { role: String },
    #[error("upstream I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server does not accept TLS, and the target requires it (tls = \"verify-full\")")]
    TlsRefused,
    #[error("TLS with the server failed: {0}")]
    Tls(String),
    #[error("the server sent a malformed message: {0}")]
    Protocol(String),
    #[error("the server asked for {0}, which the agent does not support")]
    UnsupportedAuth(String),
    #[error("SCRAM with the server failed: {0}")]
    Scram(String),
    /// The server would read string literals differently from the parser that checks each
    /// statement (`standard_conforming_strings` off for this role or database, or not said).
    #[error("the server reports standard_conforming_strings = {0}: with backslashes read as escapes in string literals, statements could run other than as checked, so the session is refused (set it back to on for this role and database)")]
    StringSyntax(String),
    /// The session would start in an encoding whose characters can hide a quote or a
    /// backslash from the parser that checks each statement (a role or database setting).
    #[error("the server reports client_encoding = {0}: in it the server could read a statement other than as the agent checked it, so the session is refused (set the role's or database's client_encoding to UTF8, or connect with client_encoding=UTF8)")]
    Encoding(String),
    /// The server refused the session (bad credential, unknown database, too many clients).
    #[error("the server refused the session: {}", .0.message().unwrap_or("no message"))]
    Refused(ErrorFields),
}

impl From<ReadError> for UpstreamError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(e) => UpstreamError::Io(e),
            ReadError::Decode(e) => UpstreamError::Protocol(e.to_string()),
            ReadError::Closed => UpstreamError::Protocol("the server closed the connection".into()),
        }
    }
}

/// Every server since 8.1 reports `standard_conforming_strings`; the agent's parser reads
/// literals as it does when the setting is on, so anything else ends the start-up.
fn check_string_syntax(parameters: &[(String, String)]) -> Result<(), UpstreamError> {
    match parameters
        .iter()
        .rev()
        .find(|(name, _)| name == "standard_conforming_strings")
    {
        Some((_, value)) if value == "on" => Ok(()),
        Some((_, value)) => Err(UpstreamError::StringSyntax(value.clone())),
        None => Err(UpstreamError::StringSyntax("(not reported)".into())),
    }
}

/// Every server since 7.4 reports `client_encoding`; one the agent's parser cannot read
/// safely (a role's `ALTER ROLE … SET client_encoding = 'SJIS'`) ends the start-up, as the
/// same value sent by the client would have.
fn check_encoding(parameters: &[(String, String)]) -> Result<(), UpstreamError> {
    match parameters
        .iter()
        .rev()
        .find(|(name, _)| name == "client_encoding")
    {
        Some((_, value)) if portcullis_sql::is_ascii_safe_encoding(value) => Ok(()),
        Some((_, value)) => Err(UpstreamError::Encoding(value.clone())),
        None => Err(UpstreamError::Encoding("(not reported)".into())),
    }
}

/// A server session, authenticated and ready for queries.
pub struct Upstream {
    pub stream: Stream,
    /// Bytes already read past the first ReadyForQuery (none in practice).
    pub buf: BytesMut,
    /// ParameterStatus values the server reported during start-up, in order.
    pub parameters: Vec<(String, String)>,
    pub process_id: u32,
    pub secret_key: Bytes,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default)]
    roles: HashMap<String, RoleCredential>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleCredential {
    password: Secret,
}

/// Reads the password for `role` from the target's credentials file. The file is read per
/// session so a rotated password takes effect without a restart; it must belong to root and
/// be unreadable by others, or it is not used at all.
pub fn credential(path: &Path, role: &str) -> Result<Secret, UpstreamError> {
    let err = |message: String| UpstreamError::Credentials {
        path: path.display().to_string(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(err(format!(
            "owner uid {} mode {:o}: it must belong to root with mode 0600",
            meta.uid(),
            meta.mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let file: CredentialsFile = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| {
                text.get(..s.start)
                    .unwrap_or_default()
                    .lines()
                    .count()
                    .max(1)
            })
            .unwrap_or(1);
        err(format!("line {line}: {}", e.message()))
    })?;
    file.roles
        .get(role)
        .map(|r| r.password.clone())
        .ok_or_else(|| UpstreamError::NoCredential { role: role.into() })
}

/// The rustls configuration for a target, built once at start.
pub fn tls_config(
    target: &PostgresTargetConfig,
    setting: &str,
) -> Result<Option<Arc<rustls::ClientConfig>>, crate::tls::TlsConfigError> {
    match target.tls {
        UpstreamTls::InsecurePlaintext => Ok(None),
        UpstreamTls::VerifyFull => Ok(Some(Arc::new(crate::tls::client_config(
            target.ca_file.as_deref(),
            setting,
        )?))),
        UpstreamTls::InsecureSkipVerify => Ok(Some(Arc::new(
            crate::tls::danger::unverified_client_config()?,
        ))),
    }
}

/// Connects the session: TLS when configured, start-up as `role`, authentication.
pub async fn establish(
    mut tcp: TcpStream,
    addr: SocketAddr,
    target: &PostgresTargetConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
    startup: &StartupMessage,
    password: &Secret,
    max_len: usize,
) -> Result<Upstream, UpstreamError> {
    let mut stream = match tls {
        None => Stream::Plain(tcp),
        Some(config) => {
            let mut out = BytesMut::new();
            encode_ssl_request(&mut out);
            tcp.write_all(&out).await?;
            let answer = tcp.read_u8().await?;
            if answer != b'S' {
                return Err(UpstreamError::TlsRefused);
            }
            let name = match &target.server_name {
                Some(n) => ServerName::try_from(n.clone())
                    .map_err(|e| UpstreamError::Tls(format!("server_name `{n}`: {e}")))?,
                None => ServerName::IpAddress(addr.ip().into()),
            };
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| UpstreamError::Tls(e.to_string()))?;
            Stream::ClientTls(Box::new(tls))
        }
    };
    let mut out = BytesMut::new();
    encode_startup(startup, &mut out);
    write_out(&mut stream, &out).await?;
    let mut buf = BytesMut::new();
    let role = startup.user().unwrap_or_default();
    let auth = authenticate(&mut stream, &mut buf, role, password, max_len).await?;
    tracing::info!(
        auth,
        tls = stream.is_tls(),
        role,
        "logged in to the PostgreSQL server"
    );
    let mut parameters = Vec::new();
    let mut key = None;
    loop {
        let msg = read_message(&mut stream, &mut buf, max_len).await?;
        match parse_backend(&msg).map_err(|e| UpstreamError::Protocol(e.to_string()))? {
            BackendMessage::ParameterStatus { name, value } => parameters.push((name, value)),
            BackendMessage::BackendKeyData {
                process_id,
                secret_key,
            } => key = Some((process_id, secret_key)),
            BackendMessage::ReadyForQuery { .. } => break,
            BackendMessage::ErrorResponse(fields) => return Err(UpstreamError::Refused(fields)),
            BackendMessage::NoticeResponse(_) | BackendMessage::NegotiateProtocolVersion { .. } => {
            }
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected {} during start-up",
                    other.name()
                )))
            }
        }
    }
    let (process_id, secret_key) =
        key.ok_or_else(|| UpstreamError::Protocol("no BackendKeyData during start-up".into()))?;
    check_string_syntax(&parameters)?;
    check_encoding(&parameters)?;
    Ok(Upstream {
        stream,
        buf,
        parameters,
        process_id,
        secret_key,
    })
}

async fn authenticate(
    stream: &mut Stream,
    buf: &mut BytesMut,
    role: &str,
    password: &Secret,
    max_len: usize,
) -> Result<&'static str, UpstreamError> {
    let mut scram: Option<ScramSha256> = None;
    // How the agent proved the credential: what `Ok` reports.
    let mut method = "trust";
    loop {
        let msg = read_message(stream, buf, max_len).await?;
        let auth = match parse_backend(&msg).map_err(|e| UpstreamError::Protocol(e.to_string()))? {
            BackendMessage::Authentication(a) => a,
            BackendMessage::ErrorResponse(fields) => return Err(UpstreamError::Refused(fields)),
            BackendMessage::NoticeResponse(_) | BackendMessage::NegotiateProtocolVersion { .. } => {
                continue
            }
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected {} during authentication",
                    other.name()
                )))
            }
        };
        let mut out = BytesMut::new();
        match auth {
            Authentication::Ok => {
                if scram.is_some() {
                    return Err(UpstreamError::Scram(
                        "the server accepted the session before proving it knows the password"
                            .into(),
                    ));
                }
                return Ok(method);
            }
            Authentication::CleartextPassword => {
                // Without TLS here the operator chose `tls = "insecure-plaintext"`, and with
                // it a channel where the password crosses in clear.
                encode_password(password.expose().as_bytes(), &mut out);
                method = "password";
            }
            Authentication::Md5Password { salt } => {
                let hash = postgres_protocol::authentication::md5_hash(
                    role.as_bytes(),
                    password.expose().as_bytes(),
                    salt,
                );
                encode_password(hash.as_bytes(), &mut out);
                method = "md5";
            }
            Authentication::Sasl { mechanisms } => {
                let plus = mechanisms.iter().any(|m| m == SCRAM_SHA_256_PLUS);
                let binding = match (&*stream, plus) {
                    (Stream::ClientTls(tls), true) => tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| end_point_hash(c.as_ref()))
                        .map(ChannelBinding::tls_server_end_point),
                    _ => None,
                };
                let (mechanism, binding) = match binding {
                    Some(b) => (SCRAM_SHA_256_PLUS, b),
                    None if mechanisms.iter().any(|m| m == SCRAM_SHA_256) => (
                        SCRAM_SHA_256,
                        if stream.is_tls() {
                            ChannelBinding::unrequested()
                        } else {
                            ChannelBinding::unsupported()
                        },
                    ),
                    None => {
                        return Err(UpstreamError::UnsupportedAuth(format!(
                            "SASL mechanisms {}",
                            mechanisms.join(", ")
                        )))
                    }
                };
                let s = ScramSha256::new(password.expose().as_bytes(), binding);
                encode_sasl_initial_response(mechanism, s.message(), &mut out);
                scram = Some(s);
                method = mechanism;
            }
            Authentication::SaslContinue(data) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| UpstreamError::Protocol("SASLContinue without SASL".into()))?;
                s.update(&data)
                    .map_err(|e| UpstreamError::Scram(e.to_string()))?;
                encode_sasl_response(s.message(), &mut out);
            }
            Authentication::SaslFinal(data) => {
                let mut s = scram
                    .take()
                    .ok_or_else(|| UpstreamError::Protocol("SASLFinal without SASL".into()))?;
                s.finish(&data).map_err(|e| {
                    UpstreamError::Scram(format!("the server's proof is wrong: {e}"))
                })?;
                continue;
            }
            Authentication::Unsupported(code) => {
                return Err(UpstreamError::UnsupportedAuth(format!(
                    "authentication method {code} (Kerberos, GSSAPI or SSPI)"
                )))
            }
        }
        write_out(stream, &out).await?;
    }
}

/// RFC 5929 tls-server-end-point: the certificate's hash with its signature's digest
/// (SHA-256 for MD5 and SHA-1 signatures).
fn end_point_hash(der: &[u8]) -> Option<Vec<u8>> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    let oid = cert.signature_algorithm.oid.to_string();
    let algorithm = match oid.as_str() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => &ring::digest::SHA384,
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => &ring::digest::SHA512,
        // Ed25519 has no separate digest; PostgreSQL refuses channel binding for it.
        "1.3.101.112" => return None,
        _ => &ring::digest::SHA256,
    };
    Some(ring::digest::digest(algorithm, der).as_ref().to_vec())
}
