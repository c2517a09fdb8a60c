//! Caller authentication (SPEC §3): the 401/403 matrix.
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn hs256(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

async fn status_with(app: &TestApp, auth: Option<&str>) -> reqwest::Response {
    let mut req = app
        .client
        .get(app.cred_url(Uuid::new_v4()) + "/status?source=cache");
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn no_authorization_header_is_401_without_an_error_code() {
    let app = spawn_app().await;
    let r = status_with(&app, None).await;
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer realm="credsync""#
    );
    assert_problem(r, 401, "missing-token").await;
}

#[tokio::test]
async fn every_invalid_token_is_401_invalid_token() {
    let app = spawn_app().await;
    let good = json!({"sub": "s", "aud": "credsync", "exp": now() + 600, "scope": "status:read"});
    let mut cases: Vec<(&str, String)> = vec![
        ("other scheme", "Basic dXNlcjpwYXNz".into()),
        ("empty token", "Bearer ".into()),
        ("garbage", "Bearer not.a.jwt".into()),
        (
            "expired",
            format!(
                "Bearer {}",
                hs256(
                    &json!({"sub": "s", "aud": "credsync", "exp": now() - 120, "scope": "status:read"})
                )
            ),
        ),
        (
            "not yet valid",
            format!(
                "Bearer {}",
                hs256(
                    &json!({"sub": "s", "aud": "credsync", "exp": now() + 600, "nbf": now() + 300, "scope": "status:read"})
                )
            ),
        ),
        (
            "wrong audience",
            format!(
                "Bearer {}",
                hs256(
                    &json!({"sub": "s", "aud": "other", "exp": now() + 600, "scope": "status:read"})
                )
            ),
        ),
        (
            "no audience",
            format!(
                "Bearer {}",
                hs256(&json!({"sub": "s", "exp": now() + 600, "scope": "status:read"}))
            ),
        ),
        (
            "missing exp",
            format!(
                "Bearer {}",
                hs256(&json!({"sub": "s", "aud": "credsync", "scope": "status:read"}))
            ),
        ),
        (
            "alg none",
            format!(
                "Bearer {}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT"})),
                b64(&good)
            ),
        ),
        (
            "bad signature",
            format!(
                "Bearer {}",
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &good,
                    &EncodingKey::from_secret(b"another-secret-0123456789").unwrap()
                )
                .unwrap()
            ),
        ),
    ];
    // A tampered payload keeps the header and signature of a valid token.
    let valid = hs256(&good);
    let parts: Vec<&str> = valid.split('.').collect();
    let tampered = json!({"sub": "s", "aud": "credsync", "exp": now() + 600, "scope": "admin"});
    cases.push((
        "tampered payload",
        format!("Bearer {}.{}.{}", parts[0], b64(&tampered), parts[2]),
    ));
    // RS256 header on an HS256 deployment (algorithm confusion).
    cases.push((
        "rs256 header with hs secret",
        format!(
            "Bearer {}.{}.{}",
            b64(&json!({"alg": "RS256", "typ": "JWT"})),
            parts[1],
            parts[2]
        ),
    ));
    for (name, auth) in cases {
        let r = status_with(&app, Some(&auth)).await;
        assert_eq!(r.status(), 401, "{name}");
        assert_eq!(
            r.headers()["www-authenticate"],
            r#"Bearer realm="credsync", error="invalid_token""#,
            "{name}"
        );
        assert_problem(r, 401, "invalid-token").await;
    }
    // The valid token itself passes authentication (then 404: nothing stored).
    let r = status_with(&app, Some(&format!("Bearer {valid}"))).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn scopes_from_scp_and_scopes_arrays_count() {
    let app = spawn_app().await;
    for claims in [
        json!({"sub": "s", "aud": ["x", "credsync"], "exp": now() + 600, "scp": ["status:read"]}),
        json!({"sub": "s", "aud": "credsync", "exp": now() + 600, "scopes": ["status:read"]}),
    ] {
        let r = status_with(&app, Some(&format!("Bearer {}", hs256(&claims)))).await;
        assert_eq!(r.status(), 404, "{claims}");
    }
}

#[tokio::test]
async fn a_missing_scope_is_403_naming_it_and_is_audited_as_denied() {
    let app = spawn_app().await;
    let user = Uuid::new_v4();
    let cases = [
        (
            reqwest::Method::POST,
            "",
            "credentials:read status:read credentials:delete",
            "credentials:write",
        ),
        (
            reqwest::Method::GET,
            "",
            "status:read credentials:write",
            "credentials:read",
        ),
        (
            reqwest::Method::DELETE,
            "",
            "credentials:read credentials:write",
            "credentials:delete",
        ),
        (
            reqwest::Method::GET,
            "/status",
            "credentials:read credentials:reveal",
            "status:read",
        ),
        (
            reqwest::Method::GET,
            "/events",
            "credentials:read",
            "status:read",
        ),
    ];
    for (method, suffix, held, needed) in cases {
        let r = app
            .client
            .request(method.clone(), format!("{}{suffix}", app.cred_url(user)))
            .bearer_auth(token_for("weak", held))
            .json(&body("c", "scope0000000"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{method} {suffix}");
        let www = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert_eq!(
            www,
            format!(r#"Bearer realm="credsync", error="insufficient_scope", scope="{needed}""#)
        );
        assert_problem(r, 403, "insufficient-scope").await;
    }
    assert_eq!(
        app.count("select count(*) from audit where outcome = 'denied' and actor = 'weak'")
            .await,
        5
    );
    assert!(app.sim_requests().await.is_empty(), "nothing forwarded");
    assert_eq!(app.count("select count(*) from credential").await, 0);
}
