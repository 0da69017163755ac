//! The OpenID Provider harness on its own, no agent: the real `oidc-provider` on loopback
//! does the device flow, refresh, revocation, client credentials, key rotation and short
//! lifetimes the way the agent's tests rely on.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use portcullis_e2e::oidc::{
    craft_jwt, decode_jwt_unverified, oidc_enabled, OidcOptions, OidcProvider, OldKey, Signing,
    Ttls, CLIENT_ID, DEVICE_CODE_GRANT, HUMAN_SCOPE, OTHER_CLIENT_ID, SERVICE_CLIENT_ID,
    SERVICE_CLIENT_SECRET,
};
use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn http() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn post_form(url: &str, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let response = http().post(url).form(form).send().unwrap();
    let status = response.status();
    let text = response.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// RFC 8628 section 3.1, as the agent sends it.
fn device_authorization(p: &OidcProvider, client_id: &str) -> Value {
    let (status, body) = post_form(
        &p.endpoint("/device/auth"),
        &[("client_id", client_id), ("scope", HUMAN_SCOPE)],
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn poll_device_token(p: &OidcProvider, client_id: &str, device_code: &str) -> (StatusCode, Value) {
    post_form(
        &p.endpoint("/token"),
        &[
            ("grant_type", DEVICE_CODE_GRANT),
            ("device_code", device_code),
            ("client_id", client_id),
        ],
    )
}

fn refresh(p: &OidcProvider, refresh_token: &str) -> (StatusCode, Value) {
    post_form(
        &p.endpoint("/token"),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", CLIENT_ID),
        ],
    )
}

/// A full login: device authorization, the browser steps, one poll.
fn log_in(p: &OidcProvider, client_id: &str, user: &str) -> Value {
    let auth = device_authorization(p, client_id);
    p.complete_device_flow(auth["verification_uri_complete"].as_str().unwrap(), user)
        .unwrap();
    let (status, tokens) = poll_device_token(p, client_id, auth["device_code"].as_str().unwrap());
    assert_eq!(status, StatusCode::OK, "{tokens}\n{}", p.log());
    tokens
}

fn jwks(p: &OidcProvider) -> JwkSet {
    http()
        .get(p.endpoint("/jwks"))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn jwks_kids(p: &OidcProvider) -> Vec<String> {
    jwks(p)
        .keys
        .into_iter()
        .filter_map(|k| k.common.key_id)
        .collect()
}

/// Verifies an ID token against the provider's published JWKS, as a relying party would.
fn verify_id_token(p: &OidcProvider, token: &str, audience: &str) -> Value {
    let (header, _) = decode_jwt_unverified(token).unwrap();
    let kid = header["kid"].as_str().unwrap();
    let set = jwks(p);
    let jwk = set
        .find(kid)
        .unwrap_or_else(|| panic!("kid {kid} is not in the JWKS"));
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[p.issuer()]);
    jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
        .unwrap()
        .claims
}

#[test]
fn device_flow_gives_groups_and_a_refresh_token_that_works_until_revoked() {
    if !oidc_enabled() {
        return;
    }
    let p = OidcProvider::start(OidcOptions::default());
    assert!(
        p.issuer().starts_with("http://127.0.0.1:"),
        "{}",
        p.issuer()
    );

    let auth = device_authorization(&p, CLIENT_ID);
    let device_code = auth["device_code"].as_str().unwrap();
    let (status, pending) = poll_device_token(&p, CLIENT_ID, device_code);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(pending["error"], "authorization_pending", "{pending}");

    p.complete_device_flow(auth["verification_uri_complete"].as_str().unwrap(), "alice")
        .unwrap();
    let (status, tokens) = poll_device_token(&p, CLIENT_ID, device_code);
    assert_eq!(status, StatusCode::OK, "{tokens}");
    assert!(tokens["access_token"].is_string(), "{tokens}");
    let id_token = tokens["id_token"].as_str().unwrap();
    let (header, _) = decode_jwt_unverified(id_token).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], p.kid());
    let claims = verify_id_token(&p, id_token, CLIENT_ID);
    assert_eq!(claims["iss"], p.issuer());
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["email"], "alice@example.test");
    assert_eq!(claims["name"], "Alice");
    assert_eq!(claims["groups"], json!(["engineering", "dba"]));

    let first_refresh = tokens["refresh_token"].as_str().unwrap();
    let (status, refreshed) = refresh(&p, first_refresh);
    assert_eq!(status, StatusCode::OK, "{refreshed}");
    let claims = verify_id_token(&p, refreshed["id_token"].as_str().unwrap(), CLIENT_ID);
    assert_eq!(claims["groups"], json!(["engineering", "dba"]));
    // Public clients get a rotated refresh token; the old one is spent.
    let current_refresh = refreshed["refresh_token"].as_str().unwrap();
    assert_ne!(current_refresh, first_refresh);

    // RFC 7009: a public client revokes with its client_id alone.
    let (status, body) = post_form(
        &p.endpoint("/token/revocation"),
        &[
            ("token", current_refresh),
            ("token_type_hint", "refresh_token"),
            ("client_id", CLIENT_ID),
        ],
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, after) = refresh(&p, current_refresh);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(after["error"], "invalid_grant", "{after}");
}

#[test]
fn replaying_a_used_device_code_fails_and_revokes_that_login() {
    if !oidc_enabled() {
        return;
    }
    let p = OidcProvider::start(OidcOptions::default());
    let auth = device_authorization(&p, CLIENT_ID);
    let device_code = auth["device_code"].as_str().unwrap();
    p.complete_device_flow(auth["verification_uri_complete"].as_str().unwrap(), "alice")
        .unwrap();
    let (status, tokens) = poll_device_token(&p, CLIENT_ID, device_code);
    assert_eq!(status, StatusCode::OK, "{tokens}");

    let (status, reused) = poll_device_token(&p, CLIENT_ID, device_code);
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(reused["error"], "invalid_grant", "{reused}");
    // oidc-provider treats a replayed code as theft (RFC 6749 section 4.1.2) and revokes
    // the grant, so an agent must stop polling after its first success.
    let (status, after) = refresh(&p, tokens["refresh_token"].as_str().unwrap());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(after["error"], "invalid_grant", "{after}");
}

#[test]
fn each_user_gets_their_own_groups_and_each_client_its_own_audience() {
    if !oidc_enabled() {
        return;
    }
    let p = OidcProvider::start(OidcOptions::default());
    let tokens = log_in(&p, OTHER_CLIENT_ID, "bob");
    let id_token = tokens["id_token"].as_str().unwrap();
    let claims = verify_id_token(&p, id_token, OTHER_CLIENT_ID);
    assert_eq!(claims["sub"], "bob");
    assert_eq!(claims["groups"], json!(["analysts"]));
    let (_, claims) = decode_jwt_unverified(id_token).unwrap();
    assert_eq!(claims["aud"], OTHER_CLIENT_ID);
}

#[test]
fn unknown_user_cannot_log_in_and_abort_gives_access_denied() {
    if !oidc_enabled() {
        return;
    }
    let p = OidcProvider::start(OidcOptions::default());

    let auth = device_authorization(&p, CLIENT_ID);
    let uri = auth["verification_uri_complete"].as_str().unwrap();
    let err = p.complete_device_flow(uri, "mallory").unwrap_err();
    eprintln!("expected failure: {err:#}");
    let (status, refused) = poll_device_token(&p, CLIENT_ID, auth["device_code"].as_str().unwrap());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(refused["error"], "access_denied", "{refused}");

    let auth = device_authorization(&p, CLIENT_ID);
    p.deny_device_flow(auth["verification_uri_complete"].as_str().unwrap())
        .unwrap();
    let (status, denied) = poll_device_token(&p, CLIENT_ID, auth["device_code"].as_str().unwrap());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(denied["error"], "access_denied", "{denied}");
}

#[test]
fn client_credentials_for_the_service_client_need_its_secret() {
    if !oidc_enabled() {
        return;
    }
    let p = OidcProvider::start(OidcOptions::default());
    let token = |secret: &str| {
        let response = http()
            .post(p.endpoint("/token"))
            .basic_auth(SERVICE_CLIENT_ID, Some(secret))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .unwrap();
        (response.status(), response.json::<Value>().unwrap())
    };
    let (status, body) = token(SERVICE_CLIENT_SECRET);
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["access_token"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 600);

    let (status, body) = token("not-the-secret");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client");

    // The human login client cannot mint service tokens.
    let (status, body) = post_form(
        &p.endpoint("/token"),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
        ],
    );
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[test]
fn key_rotation_signs_new_tokens_with_the_new_kid_and_sessions_survive_restarts() {
    if !oidc_enabled() {
        return;
    }
    let mut p = OidcProvider::start(OidcOptions {
        rotate_refresh_tokens: Some(false),
        ..OidcOptions::default()
    });
    let issuer = p.issuer().to_string();
    let first_kid = p.kid().to_string();
    assert_eq!(jwks_kids(&p), std::slice::from_ref(&first_kid));
    let tokens = log_in(&p, CLIENT_ID, "alice");
    let old_id_token = tokens["id_token"].as_str().unwrap().to_string();
    let refresh_token = tokens["refresh_token"].as_str().unwrap().to_string();

    p.restart();
    assert_eq!(p.issuer(), issuer);
    assert_eq!(jwks_kids(&p), std::slice::from_ref(&first_kid));
    let (status, body) = refresh(&p, &refresh_token);
    assert_eq!(status, StatusCode::OK, "refresh after restart: {body}");

    p.rotate_keys(OldKey::StillPublished);
    let second_kid = p.kid().to_string();
    assert_ne!(second_kid, first_kid);
    assert_eq!(jwks_kids(&p), [second_kid.clone(), first_kid.clone()]);
    verify_id_token(&p, &old_id_token, CLIENT_ID);
    let (status, body) = refresh(&p, &refresh_token);
    assert_eq!(status, StatusCode::OK, "{body}");
    let new_id_token = body["id_token"].as_str().unwrap();
    let (header, _) = decode_jwt_unverified(new_id_token).unwrap();
    assert_eq!(header["kid"], second_kid);
    verify_id_token(&p, new_id_token, CLIENT_ID);
    // The harness's PEM is the key the provider signs with.
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[CLIENT_ID]);
    jsonwebtoken::decode::<Value>(
        new_id_token,
        &DecodingKey::from_rsa_pem(p.public_key_pem().as_bytes()).unwrap(),
        &validation,
    )
    .unwrap();

    p.rotate_keys(OldKey::Withdrawn);
    let third_kid = p.kid().to_string();
    assert_eq!(jwks_kids(&p), [third_kid]);
    assert!(jwks(&p).find(&first_kid).is_none());
}

#[test]
fn short_lifetimes_take_effect() {
    if !oidc_enabled() {
        return;
    }
    let p = OidcProvider::start(OidcOptions {
        ttl: Ttls {
            access_token: Duration::from_secs(7),
            id_token: Duration::from_secs(9),
            refresh_token: Duration::from_secs(3),
            device_code: Duration::from_secs(2),
            client_credentials: Duration::from_secs(11),
        },
        ..OidcOptions::default()
    });
    let tokens = log_in(&p, CLIENT_ID, "alice");
    assert_eq!(tokens["expires_in"], 7, "{tokens}");
    let (_, claims) = decode_jwt_unverified(tokens["id_token"].as_str().unwrap()).unwrap();
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        9
    );

    let auth = device_authorization(&p, CLIENT_ID);
    assert_eq!(auth["expires_in"], 2, "{auth}");

    let response = http()
        .post(p.endpoint("/token"))
        .basic_auth(SERVICE_CLIENT_ID, Some(SERVICE_CLIENT_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .unwrap();
    assert_eq!(response.json::<Value>().unwrap()["expires_in"], 11);

    std::thread::sleep(Duration::from_millis(3500));
    let (status, expired) = refresh(&p, tokens["refresh_token"].as_str().unwrap());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(expired["error"], "invalid_grant", "{expired}");
    let (status, expired) = poll_device_token(&p, CLIENT_ID, auth["device_code"].as_str().unwrap());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        matches!(
            expired["error"].as_str(),
            Some("expired_token" | "invalid_grant")
        ),
        "{expired}"
    );
}

#[test]
fn crafted_tokens_are_signed_with_the_published_key_or_as_asked() {
    if !oidc_enabled() {
        return;
    }
    let p = OidcProvider::start(OidcOptions::default());
    let claims =
        json!({ "iss": p.issuer(), "aud": CLIENT_ID, "sub": "alice", "exp": 4_000_000_000_u64 });

    let rs = craft_jwt(
        &json!({ "alg": "RS256", "typ": "JWT", "kid": p.kid() }),
        &claims,
        Signing::Rs256 {
            private_pem: p.signing_key_pem(),
        },
    );
    let forged = verify_id_token(&p, &rs, CLIENT_ID);
    assert_eq!(forged["sub"], "alice");

    let secret = p.public_key_pem().as_bytes();
    let hs = craft_jwt(
        &json!({ "alg": "HS256", "kid": p.kid() }),
        &claims,
        Signing::Hs256 { secret },
    );
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&[CLIENT_ID]);
    jsonwebtoken::decode::<Value>(&hs, &DecodingKey::from_secret(secret), &validation).unwrap();

    let none = craft_jwt(&json!({ "alg": "none" }), &claims, Signing::Unsigned);
    assert!(none.ends_with('.'), "{none}");
    assert_eq!(none.matches('.').count(), 2);
    let (header, decoded) = decode_jwt_unverified(&none).unwrap();
    assert_eq!(header["alg"], "none");
    assert_eq!(decoded, claims);
}
