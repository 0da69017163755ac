//! Validation of ID tokens and workload tokens (RFC 7519, OpenID Connect Core 1.0 §3.1.3.7).
//!
//! Pure: the caller supplies the issuer's keys and the clock. Only asymmetric algorithms
//! from the configured list are accepted; `none` never parses and an HMAC token never
//! meets a key (the public key of an RSA issuer cannot be turned into an HMAC secret).

use std::collections::{BTreeMap, HashSet};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
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
}

/// An issuer's public keys, by key id.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<(Option<String>, DecodingKey)>,
}

impl KeySet {
    pub fn from_jwks(jwks: &JwkSet) -> Self {
        let keys = jwks
            .keys
            .iter()
            .filter_map(|jwk| {
                // Keys meant only for encryption are not signing keys.
                if matches!(
                    jwk.common.public_key_use,
                    Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
                ) {
                    return None;
                }
                DecodingKey::from_jwk(jwk)
                    .ok()
                    .map(|k| (jwk.common.key_id.clone(), k))
            })
            .collect();
        Self { keys }
    }

    #[cfg(test)]
    pub fn from_rsa_pems(keys: &[(&str, &[u8])]) -> Self {
        Self {
            keys: keys
                .iter()
                .filter_map(|(kid, pem)| {
                    DecodingKey::from_rsa_pem(pem)
                        .ok()
                        .map(|k| (Some((*kid).to_string()), k))
                })
                .collect(),
        }
    }
}

#[derive(Deserialize)]
struct Registered {
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    aud: Option<Value>,
}

pub fn validate(
    token: &str,
    keys: &KeySet,
    expect: &Expectations,
    now: u64,
) -> Result<VerifiedClaims, TokenError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
    if !expect.algorithms.contains(&header.alg) {
        let allowed: Vec<String> = expect.algorithms.iter().map(|a| format!("{a:?}")).collect();
        return Err(TokenError::AlgorithmNotAllowed(
            format!("{:?}", header.alg),
            allowed.join(", "),
        ));
    }
    let candidates: Vec<&DecodingKey> = match &header.kid {
        Some(kid) => keys
            .keys
            .iter()
            .filter(|(k, _)| k.as_deref() == Some(kid.as_str()))
            .map(|(_, key)| key)
            .collect(),
        None => keys.keys.iter().map(|(_, key)| key).collect(),
    };
    if candidates.is_empty() {
        return Err(TokenError::UnknownKey(header.kid.unwrap_or_default()));
    }
    let mut validation = Validation::new(header.alg);
    // Time and audience are checked below against our own clock and rules.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims = HashSet::new();
    let mut last = TokenError::BadSignature;
    let mut data = None;
    for key in candidates {
        match jsonwebtoken::decode::<BTreeMap<String, Value>>(token, key, &validation) {
            Ok(d) => {
                data = Some(d.claims);
                break;
            }
            Err(e) => {
                last = match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidSignature
                    | jsonwebtoken::errors::ErrorKind::InvalidAlgorithm
                    | jsonwebtoken::errors::ErrorKind::InvalidKeyFormat => TokenError::BadSignature,
                    _ => TokenError::Malformed(e.to_string()),
                }
            }
        }
    }
    let claims = data.ok_or(last)?;
    check_claims(&claims, expect, now)
}

fn check_claims(
    claims: &BTreeMap<String, Value>,
    expect: &Expectations,
    now: u64,
) -> Result<VerifiedClaims, TokenError> {
    let string = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_string);
    let number = |name: &str| claims.get(name).and_then(Value::as_u64);
    let iss = string("iss").ok_or_else(|| TokenError::MissingClaim("iss".into()))?;
    if iss != expect.issuer {
        return Err(TokenError::WrongIssuer {
            got: iss,
            expected: expect.issuer.clone(),
        });
    }
    let registered: Registered = serde_json::from_value(Value::Object(
        claims.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    ))
    .map_err(|e| TokenError::Malformed(e.to_string()))?;
    let audiences: Vec<String> = match &registered.aud {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => return Err(TokenError::MissingClaim("aud".into())),
    };
    if !audiences.contains(&expect.audience) {
        return Err(TokenError::WrongAudience {
            got: audiences,
            expected: expect.audience.clone(),
        });
    }
    if audiences.len() > 1 {
        match &registered.azp {
            Some(azp) if *azp == expect.audience => {}
            Some(azp) => return Err(TokenError::WrongAuthorizedParty(azp.clone())),
            None => return Err(TokenError::MissingClaim("azp".into())),
        }
    }
    let exp = number("exp").ok_or_else(|| TokenError::MissingClaim("exp".into()))?;
    if exp.saturating_add(expect.leeway_secs) <= now {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = number("nbf") {
        if nbf > now.saturating_add(expect.leeway_secs) {
            return Err(TokenError::NotYetValid);
        }
    }
    if let Some(iat) = registered.iat {
        if iat > i64::try_from(now.saturating_add(expect.leeway_secs)).unwrap_or(i64::MAX) {
            return Err(TokenError::IssuedInFuture);
        }
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
    let subject = string("sub")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TokenError::MissingClaim("sub".into()))?;
    let groups = match claims.get(&expect.groups_claim) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    };
    Ok(VerifiedClaims {
        subject,
        email: string("email"),
        name: string("name"),
        groups,
        expires_at: exp,
        issuer: iss,
    })
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
