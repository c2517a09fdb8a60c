//! Caller authentication: JWT verification (SPEC §3) and the minting of development tokens.
//!
//! Owns: which algorithms and keys are accepted, the claim checks, and turning claims into a
//! `Caller` (subject + scopes). The algorithm list is fixed here per key type, never taken from
//! the token's header: `alg: none`, HS/RS confusion and unknown `kid`s are refused outright.
//! Must never: log a token or the shared secret.
use std::collections::HashSet;
use std::path::Path;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::{ConfigError, JwtSettings};
use crate::domain::Scopes;

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
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "malformed token or unsupported algorithm")?;
        let claims = match header.alg {
            Algorithm::HS256 => {
                let key = self.hs256.as_ref().ok_or("HS256 tokens are not accepted")?;
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
                    None => self
                        .public
                        .iter()
                        .filter(|k| k.kid.is_none() || self.public.len() == 1)
                        .collect(),
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
        let sub = claims.sub.filter(|s| !s.is_empty()).ok_or("missing sub")?;
        let mut scopes = Vec::new();
        for v in [&claims.scope, &claims.scp, &claims.scopes]
            .into_iter()
            .flatten()
        {
            scope_strings(v, &mut scopes);
        }
        Ok(Caller {
            sub,
            scopes: Scopes::from_strs(scopes.iter().map(String::as_str)),
        })
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
            use jsonwebtoken::jwk::AlgorithmParameters;
            let alg = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(p)
                    if matches!(p.curve, jsonwebtoken::jwk::EllipticCurve::P256) =>
                {
                    Algorithm::ES256
                }
                _ => continue,
            };
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
            if let Ok(key) = DecodingKey::from_rsa_pem(block.as_bytes()) {
                keys.push(PublicKey {
                    kid: None,
                    alg: Algorithm::RS256,
                    key,
                });
            } else if let Ok(key) = DecodingKey::from_ec_pem(block.as_bytes()) {
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
    fn ttl_parsing() {
        assert_eq!(parse_ttl("1h"), Some(3600));
        assert_eq!(parse_ttl("90"), Some(90));
        assert_eq!(parse_ttl("15m"), Some(900));
        assert_eq!(parse_ttl("-1h"), None);
        assert_eq!(parse_ttl("x"), None);
    }
}
