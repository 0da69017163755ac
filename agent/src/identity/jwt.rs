//! Validation of ID tokens and workload tokens (OpenID Connect Core 1.0 §3.1.3.7, RFC 7519)
//! on openidconnect's ID-token verifier.
//!
//! Pure: the caller supplies the issuer's keys and the clock. openidconnect checks the
//! header (`typ`, `crit`, no JWE), the issuer, that the audience includes this client, the
//! signature with an algorithm from the configured list and a key of the issuer, and the
//! expiry. `none` never verifies, and an HMAC token never meets a key (openidconnect takes
//! HMAC keys only from a client secret, and the agent's clients are public).
//!
//! What openidconnect does not check is checked here, on the claims it verified: `azp`
//! when there are several audiences (it leaves `azp` alone), `nbf` (not in its claims),
//! `iat` in the future (its hook would report that as "expired"), a workload's required
//! claims, a non-empty subject. jsonwebtoken is left only for the algorithm names the
//! configuration is written in; no check of a token uses it.

use std::collections::BTreeMap;

use base64::Engine;
use chrono::{DateTime, Utc};
use jsonwebtoken::Algorithm;
use openidconnect::core::{
    CoreIdToken, CoreIdTokenVerifier, CoreJsonWebKeySet, CoreJwsSigningAlgorithm,
};
use openidconnect::{
    ClaimsVerificationError, ClientId, IssuerUrl, JsonWebKey, Nonce, SignatureVerificationError,
};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("algorithm `{0}` is not allowed (allowed: {1})")]
    AlgorithmNotAllowed(String, String),
    #[error("no key with id `{0}` in the issuer's key set")]
    UnknownKey(String),
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the token expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued in the future (iat)")]
    IssuedInFuture,
    #[error("issuer `{got}` is not the expected `{expected}`")]
    WrongIssuer { got: String, expected: String },
    #[error("audience {got:?} does not include `{expected}`")]
    WrongAudience { got: Vec<String>, expected: String },
    #[error("authorized party `{0}` is not this client")]
    WrongAuthorizedParty(String),
    #[error("claim `{0}` is missing")]
    MissingClaim(String),
    #[error("claim `{claim}` is `{got}`, expected `{expected}`")]
    ClaimMismatch {
        claim: String,
        got: String,
        expected: String,
    },
}

/// What a valid token must say.
#[derive(Debug, Clone)]
pub struct Expectations {
    pub issuer: String,
    pub audience: String,
    pub algorithms: Vec<Algorithm>,
    pub leeway_secs: u64,
    /// Extra claims that must equal these strings (workload tokens: repository, …).
    pub required_claims: BTreeMap<String, String>,
    pub groups_claim: String,
}

/// The identity a validated token carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedClaims {
    pub subject: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub groups: Vec<String>,
    pub expires_at: u64,
    pub issuer: String,
    /// The CI run a workload token was issued to ([`pipeline_run`]), if it says.
    pub pipeline_run: Option<String>,
}

/// An issuer's public keys, as its JWKS lists them (keys openidconnect cannot read are
/// left out, keys for encryption never verify a signature).
pub struct KeySet {
    set: CoreJsonWebKeySet,
}

impl Default for KeySet {
    fn default() -> Self {
        Self {
            set: CoreJsonWebKeySet::new(Vec::new()),
        }
    }
}

impl KeySet {
    pub fn from_jwks(set: CoreJsonWebKeySet) -> Self {
        Self { set }
    }

    fn has_key_id(&self, kid: &str) -> bool {
        self.set
            .keys()
            .iter()
            .any(|k| k.key_id().is_some_and(|id| id.as_str() == kid))
    }

    #[cfg(test)]
    pub fn from_rsa_pems(keys: &[(&str, &[u8])]) -> Self {
        use openidconnect::core::CoreJsonWebKey;
        use rsa::pkcs8::DecodePublicKey;
        use rsa::traits::PublicKeyParts;
        let keys = keys
            .iter()
            .filter_map(|(kid, pem)| {
                let pem = std::str::from_utf8(pem).ok()?;
                let key = rsa::RsaPublicKey::from_public_key_pem(pem).ok()?;
                Some(CoreJsonWebKey::new_rsa(
                    key.n().to_bytes_be(),
                    key.e().to_bytes_be(),
                    Some(openidconnect::JsonWebKeyId::new((*kid).to_string())),
                ))
            })
            .collect();
        Self {
            set: CoreJsonWebKeySet::new(keys),
        }
    }
}

/// One base64url segment of a compact JWT, as JSON.
fn segment(token: &str, index: usize) -> Result<Value, TokenError> {
    let part = token
        .split('.')
        .nth(index)
        .ok_or_else(|| TokenError::Malformed("not a compact JWT".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|e| TokenError::Malformed(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| TokenError::Malformed(e.to_string()))
}

/// The configuration's algorithm in openidconnect's vocabulary; both write the JOSE names.
fn jws_algorithm(alg: Algorithm) -> Option<CoreJwsSigningAlgorithm> {
    serde_json::to_value(alg)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
}

fn jws_name(alg: &CoreJwsSigningAlgorithm) -> String {
    match serde_json::to_value(alg) {
        Ok(Value::String(name)) => name,
        _ => format!("{alg:?}"),
    }
}

fn instant(secs: u64) -> DateTime<Utc> {
    i64::try_from(secs)
        .ok()
        .and_then(|s| DateTime::from_timestamp(s, 0))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn audiences(claims: &BTreeMap<String, Value>) -> Option<Vec<String>> {
    match claims.get("aud") {
        Some(Value::String(a)) => Some(vec![a.clone()]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
        ),
        _ => None,
    }
}

pub fn validate(
    token: &str,
    keys: &KeySet,
    expect: &Expectations,
    now: u64,
) -> Result<VerifiedClaims, TokenError> {
    let parsed: CoreIdToken = token
        .parse()
        .map_err(|e: serde_json::Error| TokenError::Malformed(e.to_string()))?;
    // The same bytes openidconnect parsed: read as JSON for the claims it has no field
    // for, and trusted only once it has verified the signature over them.
    let claims: BTreeMap<String, Value> = match segment(token, 1)? {
        Value::Object(map) => map.into_iter().collect(),
        _ => {
            return Err(TokenError::Malformed(
                "the claims are not a JSON object".into(),
            ))
        }
    };
    let kid = segment(token, 0)?
        .get("kid")
        .and_then(Value::as_str)
        .map(str::to_string);
    let alg = match parsed.signing_alg() {
        Ok(alg) => alg.clone(),
        Err(SignatureVerificationError::NoSignature) => {
            return Err(TokenError::Malformed(
                "it is not signed (alg `none`)".into(),
            ))
        }
        Err(e) => return Err(TokenError::Malformed(e.to_string())),
    };
    let allowed: Vec<CoreJwsSigningAlgorithm> = expect
        .algorithms
        .iter()
        .filter_map(|a| jws_algorithm(*a))
        .collect();
    // Refused before anything else, as the configuration words it; openidconnect checks
    // the same list again before it picks a key.
    if !allowed.contains(&alg) {
        let names: Vec<String> = expect.algorithms.iter().map(|a| format!("{a:?}")).collect();
        return Err(TokenError::AlgorithmNotAllowed(
            jws_name(&alg),
            names.join(", "),
        ));
    }
    let wrong_issuer = || match claims.get("iss").and_then(Value::as_str) {
        Some(got) => TokenError::WrongIssuer {
            got: got.to_string(),
            expected: expect.issuer.clone(),
        },
        None => TokenError::MissingClaim("iss".into()),
    };
    let issuer = IssuerUrl::new(expect.issuer.clone()).map_err(|_| wrong_issuer())?;
    // The expiry leeway: openidconnect's "now" is ours minus the leeway.
    let clock = instant(now.saturating_sub(expect.leeway_secs));
    let verifier = CoreIdTokenVerifier::new_public_client(
        ClientId::new(expect.audience.clone()),
        issuer,
        keys.set.clone(),
    )
    .set_allowed_algs(allowed)
    // Other audiences are allowed when `azp` names this client (checked below), as
    // OpenID Connect Core §3.1.3.7 steps 4 and 5 describe.
    .set_other_audience_verifier_fn(|_| true)
    .set_time_fn(move || clock);
    // No nonce: neither the device grant nor a workload token has an authentication
    // request of ours to bind one to.
    let verified = parsed
        .claims(&verifier, |_: Option<&Nonce>| Ok(()))
        .map_err(|e| match e {
            ClaimsVerificationError::InvalidIssuer(_) => wrong_issuer(),
            ClaimsVerificationError::InvalidAudience(_) => match audiences(&claims) {
                Some(got) => TokenError::WrongAudience {
                    got,
                    expected: expect.audience.clone(),
                },
                None => TokenError::MissingClaim("aud".into()),
            },
            ClaimsVerificationError::Expired(_) => TokenError::Expired,
            ClaimsVerificationError::SignatureVerification(e) => match e {
                // A key id the set lacks may be a key the issuer rotated in since the set
                // was fetched: the caller refetches once.
                SignatureVerificationError::NoMatchingKey => match &kid {
                    Some(k) if !keys.has_key_id(k) => TokenError::UnknownKey(k.clone()),
                    None if keys.set.keys().is_empty() => TokenError::UnknownKey(String::new()),
                    _ => TokenError::BadSignature,
                },
                SignatureVerificationError::AmbiguousKeyId(_) => TokenError::Malformed(
                    "no `kid` in its header, and the issuer publishes several keys".into(),
                ),
                SignatureVerificationError::CryptoError(_)
                | SignatureVerificationError::DisallowedAlg(_)
                | SignatureVerificationError::InvalidKey(_) => TokenError::BadSignature,
                other => TokenError::Malformed(other.to_string()),
            },
            other => TokenError::Malformed(other.to_string()),
        })?;
    let audience_count = verified.audiences().len();
    if audience_count > 1 {
        match verified.authorized_party() {
            Some(azp) if azp.as_str() == expect.audience => {}
            Some(azp) => return Err(TokenError::WrongAuthorizedParty(azp.to_string())),
            None => return Err(TokenError::MissingClaim("azp".into())),
        }
    }
    let slack = now.saturating_add(expect.leeway_secs);
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_u64) {
        if nbf > slack {
            return Err(TokenError::NotYetValid);
        }
    }
    if verified.issue_time() > instant(slack) {
        return Err(TokenError::IssuedInFuture);
    }
    for (claim, expected) in &expect.required_claims {
        match claims.get(claim) {
            None => return Err(TokenError::MissingClaim(claim.clone())),
            Some(v) => {
                let got = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                if got != *expected {
                    return Err(TokenError::ClaimMismatch {
                        claim: claim.clone(),
                        got,
                        expected: expected.clone(),
                    });
                }
            }
        }
    }
    let subject = verified.subject().as_str();
    if subject.is_empty() {
        return Err(TokenError::MissingClaim("sub".into()));
    }
    let groups = match claims.get(&expect.groups_claim) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    };
    let string = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_string);
    Ok(VerifiedClaims {
        subject: subject.to_string(),
        email: string("email"),
        name: string("name"),
        groups,
        expires_at: u64::try_from(verified.expiration().timestamp()).unwrap_or(0),
        issuer: verified.issuer().to_string(),
        pipeline_run: pipeline_run(&claims),
    })
}

/// Longest claim value a pipeline run's description takes; longer ones are not a run id.
const MAX_RUN_CLAIM: usize = 200;

/// "acme/infra run 9876 (attempt 2)" (GitHub Actions: `repository`, `run_id`, `run_attempt`)
/// or "group/project pipeline 456 job 789" (GitLab: `project_path`, `pipeline_id`, `job_id`):
/// what a CI workload's requests and events name it by, beside its subject. Only these
/// claims are read, and only as short strings of visible ASCII or numbers (run ids,
/// repository and project paths are), so nothing in them can pass for other text.
pub fn pipeline_run(claims: &BTreeMap<String, Value>) -> Option<String> {
    let text = |name: &str| {
        let v = match claims.get(name)? {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        (!v.is_empty() && v.len() <= MAX_RUN_CLAIM && v.chars().all(|c| c.is_ascii_graphic()))
            .then_some(v)
    };
    if let Some(run) = text("run_id") {
        let mut out = match text("repository") {
            Some(repo) => format!("{repo} run {run}"),
            None => format!("run {run}"),
        };
        if let Some(attempt) = text("run_attempt") {
            out.push_str(&format!(" (attempt {attempt})"));
        }
        return Some(out);
    }
    let pipeline = text("pipeline_id")?;
    let mut out = match text("project_path") {
        Some(project) => format!("{project} pipeline {pipeline}"),
        None => format!("pipeline {pipeline}"),
    };
    if let Some(job) = text("job_id") {
        out.push_str(&format!(" job {job}"));
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;
    use base64::Engine;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const KEY1: &[u8] = include_bytes!("testdata/rsa1.pem");
    const KEY1_PUB: &[u8] = include_bytes!("testdata/rsa1.pub.pem");
    const KEY2: &[u8] = include_bytes!("testdata/rsa2.pem");
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn a_ci_token_names_its_pipeline_run_from_known_claims_only() {
        let claims = |v: Value| -> BTreeMap<String, Value> { serde_json::from_value(v).unwrap() };
        let cases = [
            (
                json!({"repository": "acme/infra", "run_id": "9876", "run_attempt": "2"}),
                Some("acme/infra run 9876 (attempt 2)"),
            ),
            (json!({"run_id": 9876}), Some("run 9876")),
            (
                json!({"project_path": "ops/db", "pipeline_id": 456, "job_id": "789"}),
                Some("ops/db pipeline 456 job 789"),
            ),
            (json!({"pipeline_id": "456"}), Some("pipeline 456")),
            // No run: a human's token, or a workload token that does not say.
            (json!({"repository": "acme/infra"}), None),
            (json!({"jti": "abc", "workflow": "deploy"}), None),
            // Hostile values are not a run.
            (json!({"run_id": "1\nFAKE approved by bob"}), None),
            (json!({"run_id": "1 2"}), None),
            (json!({"run_id": ["1"]}), None),
            (json!({"run_id": "x".repeat(201)}), None),
            (
                json!({"run_id": "7", "repository": "a\u{202e}b"}),
                Some("run 7"),
            ),
        ];
        for (c, want) in cases {
            assert_eq!(pipeline_run(&claims(c.clone())).as_deref(), want, "{c}");
        }
    }

    fn expect() -> Expectations {
        Expectations {
            issuer: "https://idp.example".into(),
            audience: "portcullis".into(),
            algorithms: vec![Algorithm::RS256, Algorithm::ES256],
            leeway_secs: 30,
            required_claims: BTreeMap::new(),
            groups_claim: "groups".into(),
        }
    }

    fn claims() -> Value {
        json!({
            "iss": "https://idp.example", "aud": "portcullis", "sub": "alice-id",
            "email": "alice@example.com", "name": "Alice", "groups": ["eng", "dba"],
            "iat": NOW - 10, "exp": NOW + 600,
        })
    }

    fn sign(claims: &Value, kid: &str, key: &[u8]) -> String {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(kid.into());
        encode(&h, claims, &EncodingKey::from_rsa_pem(key).unwrap()).unwrap()
    }

    fn keys() -> KeySet {
        KeySet::from_rsa_pems(&[("k1", KEY1_PUB)])
    }

    fn b64(v: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    #[test]
    fn a_valid_token_yields_its_identity() {
        let c = validate(&sign(&claims(), "k1", KEY1), &keys(), &expect(), NOW).unwrap();
        assert_eq!(c.subject, "alice-id");
        assert_eq!(c.email.as_deref(), Some("alice@example.com"));
        assert_eq!(c.groups, vec!["eng", "dba"]);
        assert_eq!(c.expires_at, NOW + 600);
    }

    #[test]
    fn each_invalid_token_is_rejected_for_its_own_reason() {
        let table: Vec<(&str, Value, TokenError)> = vec![
            ("expired", json!({"exp": NOW - 31}), TokenError::Expired),
            (
                "not yet valid",
                json!({"nbf": NOW + 100}),
                TokenError::NotYetValid,
            ),
            (
                "issued in the future",
                json!({"iat": NOW + 100}),
                TokenError::IssuedInFuture,
            ),
            (
                "wrong issuer",
                json!({"iss": "https://evil.example"}),
                TokenError::WrongIssuer {
                    got: "https://evil.example".into(),
                    expected: "https://idp.example".into(),
                },
            ),
            (
                "wrong audience",
                json!({"aud": "other-app"}),
                TokenError::WrongAudience {
                    got: vec!["other-app".into()],
                    expected: "portcullis".into(),
                },
            ),
            (
                "several audiences, no azp",
                json!({"aud": ["portcullis", "x"]}),
                TokenError::MissingClaim("azp".into()),
            ),
            (
                "several audiences, foreign azp",
                json!({"aud": ["portcullis", "x"], "azp": "x"}),
                TokenError::WrongAuthorizedParty("x".into()),
            ),
            (
                "no subject",
                json!({"sub": ""}),
                TokenError::MissingClaim("sub".into()),
            ),
        ];
        for (what, overrides, want) in table {
            let mut c = claims();
            for (k, v) in overrides.as_object().unwrap() {
                c[k] = v.clone();
            }
            let got = validate(&sign(&c, "k1", KEY1), &keys(), &expect(), NOW).unwrap_err();
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn a_token_signed_by_another_key_is_rejected() {
        let token = sign(&claims(), "k1", KEY2);
        assert_eq!(
            validate(&token, &keys(), &expect(), NOW).unwrap_err(),
            TokenError::BadSignature
        );
    }

    #[test]
    fn an_unknown_key_id_is_reported_so_the_caller_can_refetch() {
        let token = sign(&claims(), "k9", KEY1);
        assert_eq!(
            validate(&token, &keys(), &expect(), NOW).unwrap_err(),
            TokenError::UnknownKey("k9".into())
        );
    }

    #[test]
    fn alg_none_is_rejected() {
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64(claims().to_string().as_bytes());
        let token = format!("{header}.{body}.");
        assert!(matches!(
            validate(&token, &keys(), &expect(), NOW).unwrap_err(),
            TokenError::Malformed(_)
        ));
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_rejected() {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let token = encode(&h, &claims(), &EncodingKey::from_secret(KEY1_PUB)).unwrap();
        assert!(matches!(
            validate(&token, &keys(), &expect(), NOW).unwrap_err(),
            TokenError::AlgorithmNotAllowed(..)
        ));
        // Even a configuration that listed HS256 would not verify it against an RSA key.
        let mut lax = expect();
        lax.algorithms.push(Algorithm::HS256);
        assert_eq!(
            validate(&token, &keys(), &lax, NOW).unwrap_err(),
            TokenError::BadSignature
        );
    }

    #[test]
    fn required_claims_must_match_exactly() {
        let mut e = expect();
        e.required_claims
            .insert("repository".into(), "acme/infra".into());
        let mut c = claims();
        assert_eq!(
            validate(&sign(&c, "k1", KEY1), &keys(), &e, NOW).unwrap_err(),
            TokenError::MissingClaim("repository".into())
        );
        c["repository"] = json!("acme/other");
        assert!(matches!(
            validate(&sign(&c, "k1", KEY1), &keys(), &e, NOW).unwrap_err(),
            TokenError::ClaimMismatch { .. }
        ));
        c["repository"] = json!("acme/infra");
        assert!(validate(&sign(&c, "k1", KEY1), &keys(), &e, NOW).is_ok());
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for t in [
            "",
            ".",
            "..",
            "a.b.c",
            "eyJhbGciOiJSUzI1NiJ9..",
            "\u{0}\u{1}.x.y",
        ] {
            assert!(validate(t, &keys(), &expect(), NOW).is_err(), "{t:?}");
        }
    }
}
