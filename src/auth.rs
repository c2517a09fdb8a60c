//! Caller authentication: JWT verification (SPEC §3) and the minting of development tokens.
//!
//! Owns: which algorithms and keys are accepted, the claim checks, and turning claims into a
//! `Caller` (subject + scopes). The algorithm list is fixed here per key type, never taken from
//! the token's header: `alg: none`, HS/RS confusion and unknown `kid`s are refused outright.
//! Must never: log a token or the shared secret.
use std::collections::HashSet;
use std::path::Path;

use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::{ConfigError, JwtSettings};
use crate::domain::Scopes;

/// The largest clock skew accepted for `exp`/`nbf` (`CREDSYNC_JWT_LEEWAY_SECS`).
pub const MAX_LEEWAY_SECS: u64 = 3600;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub sub: String,
    pub scopes: Scopes,
}

struct PublicKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies caller tokens.
pub struct Verifier {
    hs256: Option<DecodingKey>,
    public: Vec<PublicKey>,
    issuer: Option<String>,
    audience: String,
    leeway: u64,
    verified: Verified,
}

/// Tokens verified in the last minute: a caller presenting the same token again skips the
/// signature check and the claims' JSON (an HS256 check is ~5 % of a forwarded read's CPU, an
/// RS256 one several times that). The keys are fixed for the process's life, so a token that
/// verified once verifies again until `exp` (plus the leeway) passes; an entry is trusted until
/// then, and never for more than [`Verified::FOR_SECS`]. Keyed by the whole token: presenting
/// another token (or a forged one) is a miss, and a token that fails is never held.
#[derive(Default)]
struct Verified(std::sync::Mutex<std::collections::HashMap<Box<str>, (Caller, i64)>>);

impl Verified {
    const FOR_SECS: i64 = 60;
    const MAX: usize = 10_000;

    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Box<str>, (Caller, i64)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, token: &str, now: i64) -> Option<Caller> {
        let map = self.map();
        let (caller, until) = map.get(token)?;
        (now < *until).then(|| caller.clone())
    }

    fn put(&self, token: &str, caller: &Caller, now: i64, until: i64) {
        let mut map = self.map();
        if map.len() >= Self::MAX {
            map.retain(|_, (_, t)| now < *t);
            if map.len() >= Self::MAX {
                map.clear();
            }
        }
        map.insert(token.into(), (caller.clone(), until));
    }

    fn len(&self) -> usize {
        self.map().len()
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hs256", &self.hs256.is_some())
            .field("public_keys", &self.public.len())
            .field("audience", &self.audience)
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    scope: Option<serde_json::Value>,
    #[serde(default)]
    scp: Option<serde_json::Value>,
    #[serde(default)]
    scopes: Option<serde_json::Value>,
    /// Required by the validation; read again to know how long the token stays valid.
    #[serde(default)]
    exp: Option<i64>,
    /// Checked by the validation when an issuer is configured, which also takes a list of
    /// issuers; RFC 7519 §4.1.1 makes `iss` one string, so a list is refused here.
    #[serde(default)]
    iss: Option<serde_json::Value>,
}

fn scope_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.extend(s.split_whitespace().map(str::to_owned)),
        serde_json::Value::Array(items) => {
            for item in items {
                if let serde_json::Value::String(s) = item {
                    out.extend(s.split_whitespace().map(str::to_owned));
                }
            }
        }
        _ => {}
    }
}

impl Verifier {
    pub fn new(settings: &JwtSettings) -> Result<Verifier, ConfigError> {
        let hs256 = match &settings.hs256_secret {
            Some(secret) => {
                if secret.expose_secret().len() < 16 {
                    return Err(ConfigError::new(
                        "CREDSYNC_JWT_HS256_SECRET",
                        "must be at least 16 bytes",
                    ));
                }
                Some(
                    DecodingKey::from_secret(secret.expose_secret().as_bytes()).map_err(|_| {
                        ConfigError::new("CREDSYNC_JWT_HS256_SECRET", "is unusable")
                    })?,
                )
            }
            None => None,
        };
        // jsonwebtoken computes `now - leeway` and `now + leeway` unchecked: a huge leeway
        // would overflow (a panic per request in debug builds, every token expired in release).
        if settings.leeway_secs > MAX_LEEWAY_SECS {
            return Err(ConfigError::new(
                "CREDSYNC_JWT_LEEWAY_SECS",
                format!("must be at most {MAX_LEEWAY_SECS} seconds"),
            ));
        }
        let public = match &settings.public_keys_file {
            Some(path) => load_public_keys(path)?,
            None => Vec::new(),
        };
        let v = Verifier {
            hs256,
            public,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway: settings.leeway_secs,
            verified: Verified::default(),
        };
        v.self_check()?;
        Ok(v)
    }

    /// jsonwebtoken 12 compiles without a crypto backend and panics at the first use: prove
    /// at start-up that signing and verifying work.
    fn self_check(&self) -> Result<(), ConfigError> {
        let secret = SecretString::from("credsync-self-check-secret");
        let token = mint(
            &secret,
            "self-check",
            "admin",
            &self.audience,
            self.issuer.as_deref(),
            60,
        )
        .map_err(|e| ConfigError::new("jsonwebtoken", format!("crypto backend unusable: {e}")))?;
        let key = DecodingKey::from_secret(secret.expose_secret().as_bytes()).map_err(|e| {
            ConfigError::new("jsonwebtoken", format!("crypto backend unusable: {e}"))
        })?;
        jsonwebtoken::decode::<serde_json::Value>(&token, &key, &self.validation(Algorithm::HS256))
            .map(|_| ())
            .map_err(|e| ConfigError::new("jsonwebtoken", format!("crypto backend unusable: {e}")))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_audience(&[&self.audience]);
        let mut required: Vec<&str> = vec!["exp", "aud"];
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        v
    }

    /// Verify a bearer token. The error is a short reason safe to show the caller.
    pub fn verify(&self, token: &str) -> Result<Caller, &'static str> {
        if token.is_empty() {
            return Err("empty token");
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if let Some(caller) = self.verified.get(token, now) {
            return Ok(caller);
        }
        let (caller, exp) = self.verify_uncached(token)?;
        if let Some(exp) = exp {
            let leeway = i64::try_from(self.leeway).unwrap_or(0);
            // Valid while now <= exp + leeway (jsonwebtoken's rule, in whole seconds).
            let until = exp
                .saturating_add(leeway)
                .saturating_add(1)
                .min(now.saturating_add(Verified::FOR_SECS));
            self.verified.put(token, &caller, now, until);
        }
        Ok(caller)
    }

    /// Tokens held as verified (tests).
    pub fn verified_tokens(&self) -> usize {
        self.verified.len()
    }

    fn verify_uncached(&self, token: &str) -> Result<(Caller, Option<i64>), &'static str> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "malformed token or unsupported algorithm")?;
        let claims = match header.alg {
            Algorithm::HS256 => {
                let key = self.hs256.as_ref().ok_or("HS256 tokens are not accepted")?;
                // The shared secret has no key id: a token naming one names a key we do not hold.
                if header.kid.is_some() {
                    return Err("unknown key id");
                }
                self.decode(token, key, Algorithm::HS256)?
            }
            Algorithm::RS256 | Algorithm::ES256 => {
                let candidates: Vec<&PublicKey> = match &header.kid {
                    Some(kid) => {
                        let found: Vec<_> = self
                            .public
                            .iter()
                            .filter(|k| k.kid.as_deref() == Some(kid))
                            .collect();
                        if found.is_empty() {
                            return Err("unknown key id");
                        }
                        found
                    }
                    // No `kid`: every key of the token's algorithm is tried (the signature
                    // still has to verify under one of them).
                    None => self.public.iter().collect(),
                };
                let candidates: Vec<_> = candidates
                    .into_iter()
                    .filter(|k| k.alg == header.alg)
                    .collect();
                if candidates.is_empty() {
                    return Err("no key for this algorithm");
                }
                let mut last = "bad signature";
                let mut ok = None;
                for k in candidates {
                    match self.decode(token, &k.key, header.alg) {
                        Ok(c) => {
                            ok = Some(c);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                ok.ok_or(last)?
            }
            _ => return Err("unsupported algorithm"),
        };
        if self.issuer.is_some() && !matches!(claims.iss, Some(serde_json::Value::String(_))) {
            return Err("wrong issuer");
        }
        let sub = claims
            .sub
            .filter(|s| usable_sub(s))
            .ok_or("missing or unusable sub")?;
        let mut scopes = Vec::new();
        for v in [&claims.scope, &claims.scp, &claims.scopes]
            .into_iter()
            .flatten()
        {
            scope_strings(v, &mut scopes);
        }
        Ok((
            Caller {
                sub,
                scopes: Scopes::from_strs(scopes.iter().map(String::as_str)),
            },
            claims.exp,
        ))
    }

    fn decode(
        &self,
        token: &str,
        key: &DecodingKey,
        alg: Algorithm,
    ) -> Result<Claims, &'static str> {
        use jsonwebtoken::errors::ErrorKind;
        jsonwebtoken::decode::<Claims>(token, key, &self.validation(alg))
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not yet valid",
                ErrorKind::InvalidAudience => "wrong audience",
                ErrorKind::InvalidIssuer => "wrong issuer",
                ErrorKind::MissingRequiredClaim(c) if c == "exp" => "missing exp",
                ErrorKind::MissingRequiredClaim(c) if c == "aud" => "missing aud",
                ErrorKind::MissingRequiredClaim(_) => "missing required claim",
                ErrorKind::InvalidSignature => "bad signature",
                ErrorKind::InvalidAlgorithm => "algorithm does not match the key",
                _ => "malformed token",
            })
    }
}

fn load_public_keys(path: &Path) -> Result<Vec<PublicKey>, ConfigError> {
    const NAME: &str = "CREDSYNC_JWT_PUBLIC_KEYS_FILE";
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(NAME, format!("cannot read: {e}")))?;
    let mut keys = Vec::new();
    if text.trim_start().starts_with('{') {
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|_| ConfigError::new(NAME, "is not a valid JWKS document"))?;
        for jwk in &set.keys {
            use jsonwebtoken::jwk::{AlgorithmParameters, KeyAlgorithm, PublicKeyUse};
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p)
                    if matches!(p.curve, jsonwebtoken::jwk::EllipticCurve::P256) =>
                {
                    Algorithm::ES256
                }
                _ => continue,
            };
            // A key published for encryption, or for another algorithm than the one its type
            // maps to here (e.g. an RSA key marked `RS512` or `RSA-OAEP`), never verifies.
            if matches!(
                jwk.common.public_key_use,
                Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
            ) {
                continue;
            }
            match (jwk.common.key_algorithm, alg) {
                (None, _)
                | (Some(KeyAlgorithm::RS256), Algorithm::RS256)
                | (Some(KeyAlgorithm::ES256), Algorithm::ES256) => {}
                _ => continue,
            }
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|_| ConfigError::new(NAME, "holds an unusable JWK"))?;
            keys.push(PublicKey {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
        }
    } else {
        let mut seen = HashSet::new();
        for block in pem_blocks(&text) {
            if !seen.insert(block.clone()) {
                continue;
            }
            // jsonwebtoken takes an RSA private key as a "public" one (every token would then
            // fail at run time): refuse it here, and keep private keys out of this file.
            if block.lines().next().is_some_and(|l| l.contains("PRIVATE")) {
                return Err(ConfigError::new(
                    NAME,
                    "holds a private key: give only public keys (`openssl pkey -pubout`)",
                ));
            }
            if let Ok(key) = DecodingKey::from_rsa_pem(block.as_bytes()) {
                keys.push(PublicKey {
                    kid: None,
                    alg: Algorithm::RS256,
                    key,
                });
            } else if let Ok(key) = DecodingKey::from_ec_pem(block.as_bytes()) {
                // jsonwebtoken takes any EC curve; only P-256 verifies ES256.
                if !pem_names_p256(&block) {
                    return Err(ConfigError::new(
                        NAME,
                        "holds an EC key on a curve other than P-256 (ES256 needs P-256)",
                    ));
                }
                keys.push(PublicKey {
                    kid: None,
                    alg: Algorithm::ES256,
                    key,
                });
            } else {
                return Err(ConfigError::new(
                    NAME,
                    "holds a PEM block that is not an RSA or P-256 public key",
                ));
            }
        }
    }
    if keys.is_empty() {
        return Err(ConfigError::new(
            NAME,
            "holds no usable RS256 or ES256 public key",
        ));
    }
    Ok(keys)
}

/// Whether a PEM block's DER names the P-256 curve (OID 1.2.840.10045.3.1.7).
fn pem_names_p256(block: &str) -> bool {
    const P256_OID: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let b64: String = block
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.contains(':'))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .is_ok_and(|der| der.windows(P256_OID.len()).any(|w| w == P256_OID))
}

fn pem_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with("-----BEGIN ") {
            cur = Some(String::new());
        }
        if let Some(c) = cur.as_mut() {
            c.push_str(l);
            c.push('\n');
        }
        if l.starts_with("-----END ")
            && let Some(c) = cur.take()
        {
            out.push(c);
        }
    }
    out
}

/// Whether a JWT `sub` is accepted. The subject is stored (audit, idempotency): printable
/// text of 1 to 256 bytes only.
pub fn usable_sub(sub: &str) -> bool {
    !sub.is_empty() && sub.len() <= 256 && !sub.chars().any(char::is_control)
}

/// Mint an HS256 caller token (`credsync token mint`, tests).
pub fn mint(
    secret: &SecretString,
    sub: &str,
    scope: &str,
    audience: &str,
    issuer: Option<&str>,
    ttl_secs: i64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut claims = serde_json::json!({
        "sub": sub,
        "scope": scope,
        "aud": audience,
        "iat": now,
        "exp": now + ttl_secs,
    });
    if let Some(iss) = issuer {
        claims["iss"] = serde_json::Value::String(iss.to_owned());
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes())?,
    )
}

/// Parse a TTL such as `90s`, `15m`, `1h`, `7d` (or plain seconds).
pub fn parse_ttl(s: &str) -> Option<i64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 's') => (&s[..i], 1),
        (i, 'm') => (&s[..i], 60),
        (i, 'h') => (&s[..i], 3600),
        (i, 'd') => (&s[..i], 86400),
        _ => (s, 1),
    };
    let n: i64 = num.parse().ok()?;
    (n > 0).then_some(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> Verifier {
        Verifier::new(&JwtSettings {
            hs256_secret: Some(SecretString::from("0123456789abcdef0123")),
            public_keys_file: None,
            issuer: None,
            audience: "credsync".into(),
            leeway_secs: 0,
        })
        .unwrap()
    }

    #[test]
    fn a_minted_token_verifies_with_its_scopes() {
        let secret = SecretString::from("0123456789abcdef0123");
        let t = mint(
            &secret,
            "svc-a",
            "credentials:read status:read",
            "credsync",
            None,
            60,
        )
        .unwrap();
        let c = verifier().verify(&t).unwrap();
        assert_eq!(c.sub, "svc-a");
        assert!(c.scopes.allows(crate::domain::Scope::StatusRead));
    }

    #[test]
    fn a_verified_token_is_held_until_it_expires_and_a_refused_one_never() {
        let secret = SecretString::from("0123456789abcdef0123");
        let v = verifier();
        let t = mint(&secret, "svc-a", "credentials:read", "credsync", None, 2).unwrap();
        assert_eq!(v.verify(&t).unwrap().sub, "svc-a");
        assert_eq!(v.verified_tokens(), 1);
        assert_eq!(v.verify(&t).unwrap().sub, "svc-a");
        // Another signature over the same claims is another token: checked, refused, not held.
        let i = t.len() - 10;
        let other = if &t[i..=i] == "A" { "B" } else { "A" };
        let forged = format!("{}{other}{}", &t[..i], &t[i + 1..]);
        assert!(v.verify(&forged).is_err());
        assert_eq!(v.verified_tokens(), 1);
        // Held no longer than exp (leeway 0 here): then refused as expired.
        std::thread::sleep(std::time::Duration::from_millis(3100));
        assert_eq!(v.verify(&t).unwrap_err(), "expired");
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("1h"), Some(3600));
        assert_eq!(parse_ttl("90"), Some(90));
        assert_eq!(parse_ttl("15m"), Some(900));
        assert_eq!(parse_ttl("-1h"), None);
        assert_eq!(parse_ttl("x"), None);
    }
}

/// Property tests: `verify` never panics on hostile input, and never accepts a token that is not
/// byte-for-byte one a configured key signed.
#[cfg(test)]
mod props {
    use std::sync::OnceLock;

    use aws_lc_rs::encoding::AsDer as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use proptest::prelude::*;

    use super::*;

    const SECRET: &str = "props-hs256-secret-0123456789";

    fn pem(tag: &str, der: &[u8]) -> String {
        let b64 = STANDARD.encode(der);
        let body: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap_or_default())
            .collect();
        format!(
            "-----BEGIN {tag}-----\n{}\n-----END {tag}-----\n",
            body.join("\n")
        )
    }

    struct Fixture {
        verifier: Verifier,
        rsa: EncodingKey,
        ec: EncodingKey,
    }

    /// A verifier with the shared secret, an RSA key (`kid` r1) and a P-256 key (`kid` e1).
    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .expect("RSA key generation");
            let rsa_der: aws_lc_rs::encoding::Pkcs8V1Der = rsa.as_der().expect("RSA PKCS#8");
            let rsa = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", rsa_der.as_ref()).as_bytes())
                .expect("RSA encoding key");
            let ec = aws_lc_rs::signature::EcdsaKeyPair::generate(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            )
            .expect("EC key generation");
            let ec_der = ec.to_pkcs8v1().expect("EC PKCS#8");
            let ec = EncodingKey::from_ec_pem(pem("PRIVATE KEY", ec_der.as_ref()).as_bytes())
                .expect("EC encoding key");
            let jwk = |k: &EncodingKey, alg, kid: &str| {
                let mut j = Jwk::from_encoding_key(k, alg).expect("JWK");
                j.common.key_id = Some(kid.to_owned());
                j
            };
            let set = JwkSet {
                keys: vec![
                    jwk(&rsa, Algorithm::RS256, "r1"),
                    jwk(&ec, Algorithm::ES256, "e1"),
                ],
            };
            let path =
                std::env::temp_dir().join(format!("credsync-props-{}.json", uuid::Uuid::new_v4()));
            std::fs::write(&path, serde_json::to_vec(&set).expect("JWKS")).expect("write JWKS");
            let verifier = Verifier::new(&JwtSettings {
                hs256_secret: Some(SecretString::from(SECRET)),
                public_keys_file: Some(path.clone()),
                issuer: Some("iss-1".into()),
                audience: "credsync".into(),
                leeway_secs: 0,
            })
            .expect("verifier");
            let _ = std::fs::remove_file(path);
            Fixture { verifier, rsa, ec }
        })
    }

    fn claims(sub: &str, scope: &str) -> serde_json::Value {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        serde_json::json!({"sub": sub, "scope": scope, "aud": "credsync", "iss": "iss-1", "exp": now + 600})
    }

    /// A valid token of one of the three kinds.
    fn valid_token(kind: u8, sub: &str, scope: &str) -> String {
        let f = fixture();
        let (alg, kid, key) = match kind % 3 {
            0 => (
                Algorithm::HS256,
                None,
                EncodingKey::from_secret(SECRET.as_bytes()).expect("hs"),
            ),
            1 => (Algorithm::RS256, Some("r1"), f.rsa.clone()),
            _ => (Algorithm::ES256, Some("e1"), f.ec.clone()),
        };
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&h, &claims(sub, scope), &key).expect("sign")
    }

    fn b64json(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap_or_default())
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z]{0,6}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A JWT-looking string with a chosen header, an arbitrary payload and signature.
    fn crafted() -> impl Strategy<Value = String> {
        let alg = prop_oneof![
            Just("none"),
            Just("None"),
            Just("HS256"),
            Just("HS512"),
            Just("RS256"),
            Just("ES256"),
            Just("PS256"),
            Just("EdDSA"),
            Just(""),
        ];
        let kid = prop::option::of(prop_oneof![
            Just("r1".to_owned()),
            Just("e1".to_owned()),
            ".{0,8}"
        ]);
        (
            alg,
            kid,
            arb_json(),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(alg, kid, payload, sig)| {
                let mut h = serde_json::json!({"alg": alg, "typ": "JWT"});
                if let Some(k) = kid {
                    h["kid"] = serde_json::Value::String(k);
                }
                format!(
                    "{}.{}.{}",
                    b64json(&h),
                    b64json(&payload),
                    URL_SAFE_NO_PAD.encode(sig)
                )
            })
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Replace(usize, char),
        Delete(usize, usize),
        Insert(usize, char),
        Truncate(usize),
        SwapSegments,
        DropSignature,
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let ch = prop_oneof![
            prop::char::range('A', 'Z'),
            prop::char::range('a', 'z'),
            prop::char::range('0', '9'),
            Just('-'),
            Just('_'),
            Just('.'),
            Just('='),
            Just('+'),
            Just('/'),
            any::<char>(),
        ];
        prop_oneof![
            (any::<usize>(), ch.clone()).prop_map(|(i, c)| Mutation::Replace(i, c)),
            (any::<usize>(), 1usize..8).prop_map(|(i, n)| Mutation::Delete(i, n)),
            (any::<usize>(), ch).prop_map(|(i, c)| Mutation::Insert(i, c)),
            any::<usize>().prop_map(Mutation::Truncate),
            Just(Mutation::SwapSegments),
            Just(Mutation::DropSignature),
        ]
    }

    fn apply(token: &str, m: &Mutation) -> String {
        let mut chars: Vec<char> = token.chars().collect();
        let n = chars.len();
        match *m {
            Mutation::Replace(i, c) if n > 0 => chars[i % n] = c,
            Mutation::Replace(..) => {}
            Mutation::Delete(i, k) => {
                let start = i % n.max(1);
                chars.drain(start.min(n)..(start + k).min(n));
            }
            Mutation::Insert(i, c) => chars.insert(i % (n + 1), c),
            Mutation::Truncate(i) => chars.truncate(i % n.max(1)),
            Mutation::SwapSegments => {
                let mut parts: Vec<&str> = token.split('.').collect();
                parts.rotate_left(1);
                return parts.join(".");
            }
            Mutation::DropSignature => {
                return token
                    .rfind('.')
                    .map_or_else(String::new, |cut| token[..=cut].to_owned());
            }
        }
        chars.into_iter().collect()
    }

    proptest! {
        #[test]
        fn arbitrary_strings_are_refused_without_panicking(s in ".{0,400}") {
            prop_assert!(fixture().verifier.verify(&s).is_err());
        }

        #[test]
        fn jwt_shaped_noise_is_refused(s in "[A-Za-z0-9_=-]{0,120}\\.[A-Za-z0-9_=-]{0,200}\\.[A-Za-z0-9_=-]{0,120}") {
            prop_assert!(fixture().verifier.verify(&s).is_err());
        }

        #[test]
        fn crafted_headers_and_forged_signatures_are_refused(t in crafted()) {
            prop_assert!(fixture().verifier.verify(&t).is_err());
        }

        #[test]
        fn a_mutated_valid_token_is_refused(
            kind in any::<u8>(),
            sub in "[a-z0-9-]{1,20}",
            muts in prop::collection::vec(mutation(), 1..4),
        ) {
            let good = valid_token(kind, &sub, "status:read");
            let caller = fixture().verifier.verify(&good);
            prop_assert!(caller.as_ref().is_ok_and(|c| c.sub == sub), "{:?}", caller.err());
            let mut bad = good.clone();
            for m in &muts {
                bad = apply(&bad, m);
            }
            let out = fixture().verifier.verify(&bad);
            if bad != good {
                prop_assert!(out.is_err(), "accepted a mutated token {bad:?}");
            }
        }

        #[test]
        fn a_resigned_payload_under_another_key_or_algorithm_is_refused(
            kind in any::<u8>(),
            claims_v in arb_json(),
        ) {
            // Arbitrary claims signed with an unconfigured HS256 secret or RSA public PEM bytes.
            let key = if kind % 2 == 0 {
                EncodingKey::from_secret(b"not-the-configured-secret-000")
            } else {
                EncodingKey::from_secret(pem("PUBLIC KEY", b"any public key bytes").as_bytes())
            };
            let key = key.expect("hmac key");
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("r1".into());
            let t = jsonwebtoken::encode(&h, &claims_v, &key).expect("sign");
            prop_assert!(fixture().verifier.verify(&t).is_err());
        }
    }

    #[test]
    fn an_hs256_token_naming_a_key_id_is_refused() {
        let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("hs");
        let sign = |kid: Option<&str>| {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = kid.map(str::to_owned);
            jsonwebtoken::encode(&h, &claims("svc", "status:read"), &key).expect("sign")
        };
        let v = &fixture().verifier;
        assert_eq!(v.verify(&sign(None)).expect("no kid").sub, "svc");
        // An id nobody configured, and the id of the RSA key (the shared secret has none).
        assert_eq!(v.verify(&sign(Some("zzz"))).unwrap_err(), "unknown key id");
        assert_eq!(v.verify(&sign(Some("r1"))).unwrap_err(), "unknown key id");
    }

    #[test]
    fn an_issuer_given_as_a_list_is_refused() {
        let key = EncodingKey::from_secret(SECRET.as_bytes()).expect("hs");
        let v = &fixture().verifier;
        let with_iss = |iss: serde_json::Value| {
            let mut c = claims("svc", "status:read");
            c["iss"] = iss;
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &c, &key).expect("sign")
        };
        assert!(v.verify(&with_iss(serde_json::json!("iss-1"))).is_ok());
        for iss in [
            serde_json::json!(["iss-1"]),
            serde_json::json!(["iss-1", "other"]),
        ] {
            assert_eq!(v.verify(&with_iss(iss)).unwrap_err(), "wrong issuer");
        }
    }

    #[test]
    fn a_huge_leeway_is_refused_at_start_up() {
        for leeway in [MAX_LEEWAY_SECS + 1, u64::MAX] {
            let err = Verifier::new(&JwtSettings {
                hs256_secret: Some(SecretString::from(SECRET)),
                public_keys_file: None,
                issuer: None,
                audience: "credsync".into(),
                leeway_secs: leeway,
            })
            .expect_err("a leeway past the maximum");
            assert_eq!(err.setting, "CREDSYNC_JWT_LEEWAY_SECS");
        }
    }
}
