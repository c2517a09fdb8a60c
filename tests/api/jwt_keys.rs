//! Caller authentication with public keys (SPEC §3): RS256 and ES256 from a PEM file or a JWKS
//! file (`kid` honoured), and everything that must be refused with them.
//!
//! The key pairs are generated at test time (aws-lc-rs); no key material is committed.
use std::path::PathBuf;
use std::sync::OnceLock;

use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::*;

const ISSUER: &str = "https://idp.example.test/";

/// One generated key pair, as PEM.
struct Pair {
    private_der: Vec<u8>,
    private_pem: String,
    public_pem: String,
}

struct Keys {
    rsa: Pair,
    /// A second RSA key: listed in the JWKS under its own `kid`, absent from the PEM file.
    rsa2: Pair,
    /// An RSA key configured nowhere.
    rogue: Pair,
    ec: Pair,
}

fn pem(tag: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

fn rsa_pair() -> Pair {
    let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let private: aws_lc_rs::encoding::Pkcs8V1Der = kp.as_der().unwrap();
    let public: aws_lc_rs::encoding::PublicKeyX509Der = kp.public_key().as_der().unwrap();
    Pair {
        private_der: private.as_ref().to_vec(),
        private_pem: pem("PRIVATE KEY", private.as_ref()),
        public_pem: pem("PUBLIC KEY", public.as_ref()),
    }
}

/// The `RSAPrivateKey` (PKCS#1) inside a PKCS#8 `PrivateKeyInfo`: its OCTET STRING member.
fn pkcs1_of(pkcs8: &[u8]) -> Vec<u8> {
    // (tag, content start, content end) of the DER element at `at`.
    fn element(der: &[u8], at: usize) -> (u8, usize, usize) {
        let tag = der[at];
        let first = der[at + 1] as usize;
        let (len, start) = if first < 0x80 {
            (first, at + 2)
        } else {
            let n = first & 0x7f;
            let len = der[at + 2..at + 2 + n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize);
            (len, at + 2 + n)
        };
        (tag, start, start + len)
    }
    let (_, mut at, end) = element(pkcs8, 0);
    while at < end {
        let (tag, start, stop) = element(pkcs8, at);
        if tag == 0x04 {
            return pkcs8[start..stop].to_vec();
        }
        at = stop;
    }
    panic!("no OCTET STRING in the PKCS#8 key");
}

fn ec_pair() -> Pair {
    let kp = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    )
    .unwrap();
    let private = kp.to_pkcs8v1().unwrap();
    let public: aws_lc_rs::encoding::PublicKeyX509Der = kp.public_key().as_der().unwrap();
    Pair {
        private_der: private.as_ref().to_vec(),
        private_pem: pem("PRIVATE KEY", private.as_ref()),
        public_pem: pem("PUBLIC KEY", public.as_ref()),
    }
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rsa: rsa_pair(),
        rsa2: rsa_pair(),
        rogue: rsa_pair(),
        ec: ec_pair(),
    })
}

fn rsa_key(p: &Pair) -> EncodingKey {
    EncodingKey::from_rsa_pem(p.private_pem.as_bytes()).unwrap()
}

fn ec_key(p: &Pair) -> EncodingKey {
    EncodingKey::from_ec_pem(p.private_pem.as_bytes()).unwrap()
}

fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

/// A file in a fresh temporary directory, removed by the OS's temp cleanup.
fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("credsync-jwt-keys-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// The PEM file: the first RSA key and the EC key (no `kid`s).
fn pem_file() -> PathBuf {
    let k = keys();
    temp_file(
        "keys.pem",
        &format!("{}{}", k.rsa.public_pem, k.ec.public_pem),
    )
}

/// The JWKS file: `rsa-1`, `rsa-2` and `ec-1`.
fn jwks_file() -> PathBuf {
    let k = keys();
    let set = JwkSet {
        keys: vec![
            jwk(&rsa_key(&k.rsa), Algorithm::RS256, "rsa-1"),
            jwk(&rsa_key(&k.rsa2), Algorithm::RS256, "rsa-2"),
            jwk(&ec_key(&k.ec), Algorithm::ES256, "ec-1"),
        ],
    };
    temp_file("jwks.json", &serde_json::to_string_pretty(&set).unwrap())
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn claims() -> Value {
    json!({"sub": "svc-pk", "aud": "credsync", "exp": now() + 600, "scope": "status:read"})
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rs256(kid: Option<&str>, claims: &Value) -> String {
    sign(Algorithm::RS256, kid, claims, &rsa_key(&keys().rsa))
}

fn es256(kid: Option<&str>, claims: &Value) -> String {
    sign(Algorithm::ES256, kid, claims, &ec_key(&keys().ec))
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// A valid token's header and signature around another payload.
fn tampered(token: &str, payload: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", parts[0], b64(payload), parts[2])
}

/// An HS256 token whose HMAC key is the RSA public key PEM (the classic key-confusion attack).
fn hs_with_public_pem(kid: Option<&str>) -> String {
    sign(
        Algorithm::HS256,
        kid,
        &claims(),
        &EncodingKey::from_secret(keys().rsa.public_pem.as_bytes()).unwrap(),
    )
}

fn alg_none(kid: Option<&str>) -> String {
    let mut header = json!({"alg": "none", "typ": "JWT"});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    format!("{}.{}.", b64(&header), b64(&claims()))
}

async fn status_with(app: &TestApp, token: &str) -> reqwest::Response {
    app.client
        .get(app.cred_url(Uuid::new_v4()) + "/status?source=cache")
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// Authentication passes (then 404: nothing stored for that user).
async fn assert_accepted(app: &TestApp, name: &str, token: &str) {
    let r = status_with(app, token).await;
    assert_eq!(r.status(), 404, "{name} should be accepted");
}

async fn assert_refused(app: &TestApp, name: &str, token: &str) {
    let r = status_with(app, token).await;
    assert_eq!(r.status(), 401, "{name} should be refused");
    assert_eq!(
        r.headers()["www-authenticate"],
        r#"Bearer realm="credsync", error="invalid_token""#,
        "{name}"
    );
    let body = assert_problem(r, 401, "invalid-token").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(!detail.contains(token), "{name}: the token is echoed");
}

/// The claim checks, for one signing function: each must be refused.
fn claim_cases(signer: &dyn Fn(&Value) -> String) -> Vec<(String, String)> {
    let valid = signer(&claims());
    vec![
        (
            "expired".into(),
            signer(&with(claims(), json!({"exp": now() - 120}))),
        ),
        (
            "nbf in the future".into(),
            signer(&with(claims(), json!({"nbf": now() + 300}))),
        ),
        (
            "missing exp".into(),
            signer(&with(claims(), json!({"exp": null}))),
        ),
        (
            "exp not a number".into(),
            signer(&with(claims(), json!({"exp": "tomorrow"}))),
        ),
        (
            "wrong audience".into(),
            signer(&with(claims(), json!({"aud": "someone-else"}))),
        ),
        (
            "missing audience".into(),
            signer(&with(claims(), json!({"aud": null}))),
        ),
        (
            "missing sub".into(),
            signer(&with(claims(), json!({"sub": null}))),
        ),
        (
            "tampered payload".into(),
            tampered(&valid, &with(claims(), json!({"scope": "admin"}))),
        ),
        (
            "truncated signature".into(),
            valid[..valid.len() - 4].to_owned(),
        ),
        ("no signature".into(), {
            let cut = valid.rfind('.').unwrap();
            valid[..=cut].to_owned()
        }),
    ]
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_against_a_pem_file() {
    let k = keys();
    let app = spawn_app_with(AppOptions::default().env(
        "CREDSYNC_JWT_PUBLIC_KEYS_FILE",
        pem_file().to_string_lossy(),
    ))
    .await;
    assert_accepted(&app, "RS256", &rs256(None, &claims())).await;
    assert_accepted(&app, "ES256", &es256(None, &claims())).await;
    // The shared secret still works alongside the public keys.
    assert_accepted(&app, "HS256", &token("status:read")).await;
    // nbf in the past and exp within the leeway are fine.
    assert_accepted(
        &app,
        "RS256 with nbf in the past",
        &rs256(None, &with(claims(), json!({"nbf": now() - 60}))),
    )
    .await;
    assert_accepted(
        &app,
        "ES256 expired within the leeway",
        &es256(None, &with(claims(), json!({"exp": now() - 5}))),
    )
    .await;

    let mut cases: Vec<(String, String)> = vec![
        // PEM keys carry no `kid`: any `kid` is unknown.
        ("RS256 with a kid".into(), rs256(Some("rsa-1"), &claims())),
        (
            "RS256 signed by an unconfigured key".into(),
            sign(Algorithm::RS256, None, &claims(), &rsa_key(&k.rogue)),
        ),
        (
            "RS256 signed by a key only the JWKS lists".into(),
            sign(Algorithm::RS256, None, &claims(), &rsa_key(&k.rsa2)),
        ),
        (
            "HS256 keyed with the RSA public key PEM".into(),
            hs_with_public_pem(None),
        ),
        ("alg none".into(), alg_none(None)),
        ("alg none with a kid".into(), alg_none(Some("rsa-1"))),
        ("RS256 header on an ES256 signature".into(), {
            let t = es256(None, &claims());
            let parts: Vec<&str> = t.split('.').collect();
            format!(
                "{}.{}.{}",
                b64(&json!({"alg": "RS256", "typ": "JWT"})),
                parts[1],
                parts[2]
            )
        }),
        ("ES256 header on an RS256 signature".into(), {
            let t = rs256(None, &claims());
            let parts: Vec<&str> = t.split('.').collect();
            format!(
                "{}.{}.{}",
                b64(&json!({"alg": "ES256", "typ": "JWT"})),
                parts[1],
                parts[2]
            )
        }),
        (
            "RS384 (not accepted) with the configured key".into(),
            sign(Algorithm::RS384, None, &claims(), &rsa_key(&k.rsa)),
        ),
        (
            "PS256 (not accepted) with the configured key".into(),
            sign(Algorithm::PS256, None, &claims(), &rsa_key(&k.rsa)),
        ),
    ];
    for (name, t) in claim_cases(&|c| rs256(None, c)) {
        cases.push((format!("RS256 {name}"), t));
    }
    for (name, t) in claim_cases(&|c| es256(None, c)) {
        cases.push((format!("ES256 {name}"), t));
    }
    for (name, t) in &cases {
        assert_refused(&app, name, t).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_jwks_file_honours_kids_and_refuses_unknown_ones() {
    let k = keys();
    let app = spawn_app_with(
        AppOptions::default()
            .env(
                "CREDSYNC_JWT_PUBLIC_KEYS_FILE",
                jwks_file().to_string_lossy(),
            )
            // Public keys only: the shared secret is not configured.
            .env("CREDSYNC_JWT_HS256_SECRET", ""),
    )
    .await;
    assert_accepted(&app, "RS256 kid rsa-1", &rs256(Some("rsa-1"), &claims())).await;
    assert_accepted(
        &app,
        "RS256 kid rsa-2",
        &sign(
            Algorithm::RS256,
            Some("rsa-2"),
            &claims(),
            &rsa_key(&k.rsa2),
        ),
    )
    .await;
    assert_accepted(&app, "ES256 kid ec-1", &es256(Some("ec-1"), &claims())).await;
    // No `kid`: each key of the token's algorithm is tried.
    assert_accepted(&app, "RS256 without a kid", &rs256(None, &claims())).await;
    assert_accepted(
        &app,
        "RS256 without a kid, the second RSA key",
        &sign(Algorithm::RS256, None, &claims(), &rsa_key(&k.rsa2)),
    )
    .await;
    assert_accepted(&app, "ES256 without a kid", &es256(None, &claims())).await;

    let mut cases: Vec<(String, String)> = vec![
        ("unknown kid".into(), rs256(Some("rsa-9"), &claims())),
        ("empty kid".into(), rs256(Some(""), &claims())),
        (
            "kid of another RSA key".into(),
            rs256(Some("rsa-2"), &claims()),
        ),
        (
            "RS256 under the kid of the EC key".into(),
            rs256(Some("ec-1"), &claims()),
        ),
        (
            "ES256 under the kid of an RSA key".into(),
            es256(Some("rsa-1"), &claims()),
        ),
        (
            "signed by an unconfigured key under a known kid".into(),
            sign(
                Algorithm::RS256,
                Some("rsa-1"),
                &claims(),
                &rsa_key(&k.rogue),
            ),
        ),
        (
            "no kid, signed by an unconfigured key".into(),
            sign(Algorithm::RS256, None, &claims(), &rsa_key(&k.rogue)),
        ),
        (
            "HS256 when no shared secret is configured".into(),
            token("status:read"),
        ),
        (
            "HS256 keyed with the RSA public key PEM".into(),
            hs_with_public_pem(Some("rsa-1")),
        ),
        (
            "HS256 keyed with the JWK's modulus".into(),
            sign(
                Algorithm::HS256,
                Some("rsa-1"),
                &claims(),
                &EncodingKey::from_secret(
                    match &jwk(&rsa_key(&k.rsa), Algorithm::RS256, "rsa-1").algorithm {
                        jsonwebtoken::jwk::AlgorithmParameters::RSA(p) => p.n.as_bytes(),
                        _ => unreachable!(),
                    },
                )
                .unwrap(),
            ),
        ),
        ("alg none".into(), alg_none(Some("rsa-1"))),
    ];
    for (name, t) in claim_cases(&|c| rs256(Some("rsa-1"), c)) {
        cases.push((format!("RS256 {name}"), t));
    }
    for (name, t) in claim_cases(&|c| es256(Some("ec-1"), c)) {
        cases.push((format!("ES256 {name}"), t));
    }
    for (name, t) in &cases {
        assert_refused(&app, name, t).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn the_issuer_is_required_and_checked_when_configured() {
    let app = spawn_app_with(
        AppOptions::default()
            .env(
                "CREDSYNC_JWT_PUBLIC_KEYS_FILE",
                pem_file().to_string_lossy(),
            )
            .env("CREDSYNC_JWT_ISSUER", ISSUER),
    )
    .await;
    let good = with(claims(), json!({"iss": ISSUER}));
    assert_accepted(&app, "RS256 right iss", &rs256(None, &good)).await;
    assert_accepted(&app, "ES256 right iss", &es256(None, &good)).await;
    let hs = |c: &Value| {
        sign(
            Algorithm::HS256,
            None,
            c,
            &EncodingKey::from_secret(JWT_SECRET.as_bytes()).unwrap(),
        )
    };
    assert_accepted(&app, "HS256 right iss", &hs(&good)).await;
    type Signer<'a> = &'a dyn Fn(&Value) -> String;
    let signers: [(&str, Signer); 3] = [
        ("RS256", &|c| rs256(None, c)),
        ("ES256", &|c| es256(None, c)),
        ("HS256", &hs),
    ];
    for (alg, signer) in signers {
        for (name, c) in [
            ("missing iss", claims()),
            (
                "wrong iss",
                with(claims(), json!({"iss": "https://evil.example.test/"})),
            ),
            (
                "iss differing by a trailing slash",
                with(claims(), json!({"iss": ISSUER.trim_end_matches('/')})),
            ),
            ("iss not a string", with(claims(), json!({"iss": 42}))),
        ] {
            assert_refused(&app, &format!("{alg} {name}"), &signer(&c)).await;
        }
    }
    app.stop().await;
}

#[test]
fn a_public_keys_file_without_a_usable_key_is_refused_at_start_up() {
    use credsync::auth::Verifier;
    use credsync::config::JwtSettings;
    let settings = |path: PathBuf| JwtSettings {
        hs256_secret: None,
        public_keys_file: Some(path),
        issuer: None,
        audience: "credsync".into(),
        leeway_secs: 30,
    };
    let k = keys();
    for (name, contents) in [
        ("empty", String::new()),
        ("garbage", "not a key at all".into()),
        ("empty JWKS", r#"{"keys": []}"#.into()),
        ("broken JWKS", r#"{"keys": [{"kty": "RSA"}]}"#.into()),
        (
            "only a symmetric JWK",
            r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ", "kid": "h"}]}"#.into(),
        ),
        ("a PKCS#8 private key", k.rsa.private_pem.clone()),
        // jsonwebtoken takes this one as an RSA "public" key that then verifies nothing.
        (
            "a PKCS#1 RSA private key",
            pem("RSA PRIVATE KEY", &pkcs1_of(&k.rsa.private_der)),
        ),
        (
            "a PKCS#1 RSA private key after a public key",
            format!(
                "{}{}",
                k.ec.public_pem,
                pem("RSA PRIVATE KEY", &pkcs1_of(&k.rsa.private_der))
            ),
        ),
        ("a broken PEM block", k.rsa.public_pem.replace('M', "!")),
    ] {
        let path = temp_file("keys", &contents);
        let err = Verifier::new(&settings(path)).unwrap_err();
        assert_eq!(err.setting, "CREDSYNC_JWT_PUBLIC_KEYS_FILE", "{name}");
    }
    // Why the PKCS#1 case needs its own check: jsonwebtoken loads it as a verifying key.
    let pkcs1 = pem("RSA PRIVATE KEY", &pkcs1_of(&k.rsa.private_der));
    assert!(jsonwebtoken::DecodingKey::from_rsa_pem(pkcs1.as_bytes()).is_ok());
    // An EC key on another curve than P-256 (jsonwebtoken takes it as an ES256 key).
    let p384 = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
    )
    .unwrap();
    let p384: aws_lc_rs::encoding::PublicKeyX509Der = p384.public_key().as_der().unwrap();
    let p384 = pem("PUBLIC KEY", p384.as_ref());
    assert!(jsonwebtoken::DecodingKey::from_ec_pem(p384.as_bytes()).is_ok());
    let err = Verifier::new(&settings(temp_file("keys", &p384))).unwrap_err();
    assert!(err.message.contains("P-256"), "{err}");
    // JWKs published for encryption or another algorithm are skipped.
    for (name, patch) in [
        ("use enc", json!({"use": "enc"})),
        ("alg RS512", json!({"alg": "RS512"})),
        ("alg RSA-OAEP", json!({"alg": "RSA-OAEP"})),
    ] {
        let mut j = serde_json::to_value(jwk(&rsa_key(&k.rsa), Algorithm::RS256, "x")).unwrap();
        for (key, v) in patch.as_object().unwrap() {
            j[key] = v.clone();
        }
        let path = temp_file("jwks.json", &json!({"keys": [j]}).to_string());
        let err = Verifier::new(&settings(path)).unwrap_err();
        assert_eq!(err.setting, "CREDSYNC_JWT_PUBLIC_KEYS_FILE", "{name}");
    }
    // A private key next to a public one is refused too: the file must not hold secrets.
    let path = temp_file("keys", &format!("{}{}", k.rsa.public_pem, k.ec.private_pem));
    assert!(Verifier::new(&settings(path)).is_err());
    // The PEM and JWKS files used above load.
    assert!(Verifier::new(&settings(pem_file())).is_ok());
    assert!(Verifier::new(&settings(jwks_file())).is_ok());
}
