//! `Verifier::verify` on arbitrary strings (even first byte) and on edited valid HS256, RS256
//! and ES256 tokens (odd first byte): never a panic, and nothing but the exact valid token is
//! ever accepted.
#![no_main]
use std::sync::LazyLock;

use aws_lc_rs::encoding::AsDer as _;
use base64::Engine as _;
use credsync::auth::Verifier;
use credsync::config::JwtSettings;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

#[path = "mutate.rs"]
mod mutate;

const SECRET: &str = "fuzz-hs256-secret-0123456789";

struct Fixture {
    verifier: Verifier,
    tokens: Vec<String>,
}

fn pem(tag: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {tag}-----\n{}\n-----END {tag}-----\n",
        lines.join("\n")
    )
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der: aws_lc_rs::encoding::Pkcs8V1Der = rsa.as_der().unwrap();
    let rsa = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", der.as_ref()).as_bytes()).unwrap();
    let ec = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    )
    .unwrap();
    let ec =
        EncodingKey::from_ec_pem(pem("PRIVATE KEY", ec.to_pkcs8v1().unwrap().as_ref()).as_bytes())
            .unwrap();
    let jwk = |k: &EncodingKey, alg, kid: &str| {
        let mut j = Jwk::from_encoding_key(k, alg).unwrap();
        j.common.key_id = Some(kid.to_owned());
        j
    };
    let set = JwkSet {
        keys: vec![
            jwk(&rsa, Algorithm::RS256, "r1"),
            jwk(&ec, Algorithm::ES256, "e1"),
        ],
    };
    let path = std::env::temp_dir().join(format!("credsync-fuzz-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&path, serde_json::to_vec(&set).unwrap()).unwrap();
    let verifier = Verifier::new(&JwtSettings {
        hs256_secret: Some(SecretString::from(SECRET)),
        public_keys_file: Some(path.clone()),
        issuer: Some("fuzz-iss".into()),
        audience: "credsync".into(),
        leeway_secs: 30,
    })
    .unwrap();
    let _ = std::fs::remove_file(path);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = serde_json::json!({
        "sub": "fuzz", "scope": "admin", "aud": "credsync", "iss": "fuzz-iss",
        "iat": now, "nbf": now - 60, "exp": now + 10 * 365 * 86400,
    });
    let sign = |alg, kid: Option<&str>, key: &EncodingKey| {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&h, &claims, key).unwrap()
    };
    let tokens = vec![
        sign(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        ),
        sign(Algorithm::RS256, Some("r1"), &rsa),
        sign(Algorithm::ES256, Some("e1"), &ec),
    ];
    for t in &tokens {
        assert!(verifier.verify(t).is_ok(), "fixture token refused");
    }
    Fixture { verifier, tokens }
});

fuzz_target!(|data: &[u8]| {
    let f = &*FIXTURE;
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let s = String::from_utf8_lossy(rest);
        assert!(f.verifier.verify(&s).is_err(), "accepted {s:?}");
    } else {
        let good = &f.tokens[usize::from(mode / 2) % f.tokens.len()];
        let edited = mutate::apply(good.as_bytes(), rest);
        let edited = String::from_utf8_lossy(&edited);
        let out = f.verifier.verify(&edited);
        if edited != good.as_str() {
            assert!(out.is_err(), "accepted an edited token {edited:?}");
        }
    }
});
