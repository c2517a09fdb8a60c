//! Envelope encryption of credential secrets (AES-256-GCM).
//!
//! Owns: the key-encryption keys (`CREDSYNC_ENCRYPTION_KEYS`), per-credential data keys,
//! sealing and opening the secret fields, re-wrapping data keys under another key, and
//! keyed hashes derived from the keys. This is the only module that ever holds plaintext
//! secrets outside `secrecy` types, and only in `Zeroizing` buffers that are wiped on drop.
//! Must never: log, format or return plaintext except as `SecretString`, reuse a nonce on
//! purpose, or accept a ciphertext bound to another user.
//!
//! Stored format (both blobs): `0x01 || nonce (12 bytes) || ciphertext || tag (16 bytes)`.
//! - `wrapped_key`: the 32-byte data key sealed by the key-encryption key `key_id`, with
//!   associated data `credsync/v1/dek|<leafUserId>|<provider>|<key_id>`.
//! - `secrets`: the JSON object of the secret fields sealed by the data key, with associated
//!   data `credsync/v1/secrets|<leafUserId>|<provider>`.
use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use zeroize::Zeroizing;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Why a keyring could not be built or a ciphertext not opened. Never carries key material.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CryptoError {
    #[error("{0}")]
    Config(String),
    #[error("key `{0}` is not configured")]
    UnknownKey(String),
    #[error("key `{0}` is retired (below the minimum decryption key)")]
    RetiredKey(String),
    #[error("the stored envelope is malformed")]
    Malformed,
    #[error(
        "the stored envelope failed authentication (wrong key, tampered, or moved to another row)"
    )]
    Tampered,
}

/// One key-encryption key.
struct Kek {
    id: String,
    cipher: Aes256Gcm,
    /// Keyed-hash key derived from the key (HMAC-SHA256(key, "credsync hash key")).
    hash_key: Zeroizing<[u8; 32]>,
    fingerprint: [u8; 16],
}

/// The configured key-encryption keys and which one wraps new data keys.
pub struct Keyring {
    keys: Vec<Kek>,
    active: usize,
    /// Keys listed before this index may not be used to decrypt (retired).
    min_decrypt: usize,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.keys.iter().map(|k| &k.id).collect::<Vec<_>>())
            .field("active", &self.active_id())
            .finish()
    }
}

/// A sealed credential: what is stored in Postgres.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub wrapped_key: Vec<u8>,
    pub secrets: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Secret fields by name (`clientSecret`, `apiKey`, ...).
#[derive(Default)]
pub struct SecretFields(pub BTreeMap<String, SecretString>);

impl fmt::Debug for SecretFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl SecretFields {
    pub fn get(&self, name: &str) -> Option<&SecretString> {
        self.0.get(name)
    }
    pub fn insert(&mut self, name: &str, value: SecretString) {
        self.0.insert(name.to_owned(), value);
    }
}

/// Whose credential a ciphertext belongs to: bound into the associated data.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub leaf_user_id: &'a uuid::Uuid,
    pub provider: &'a str,
}

fn random_bytes<const N: usize>() -> Zeroizing<[u8; N]> {
    let mut out = Zeroizing::new([0u8; N]);
    rand::rng().fill_bytes(out.as_mut());
    out
}

/// A fresh random 256-bit key, base64 (for `credsync keys generate`).
pub fn generate_key_b64() -> Zeroizing<String> {
    let key = random_bytes::<32>();
    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.as_ref()))
}

fn seal_with(cipher: &Aes256Gcm, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let nonce_bytes = random_bytes::<NONCE_LEN>();
    let nonce = Nonce::from(*nonce_bytes);
    let ct = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Malformed)?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
    out.push(VERSION);
    out.extend_from_slice(nonce_bytes.as_ref());
    out.extend_from_slice(&ct);
    Ok(out)
}

fn open_with(
    cipher: &Aes256Gcm,
    blob: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if blob.len() < 1 + NONCE_LEN + TAG_LEN || blob[0] != VERSION {
        return Err(CryptoError::Malformed);
    }
    let mut nonce_bytes = [0u8; NONCE_LEN];
    nonce_bytes.copy_from_slice(&blob[1..1 + NONCE_LEN]);
    let nonce = Nonce::from(nonce_bytes);
    cipher
        .decrypt(
            &nonce,
            Payload {
                msg: &blob[1 + NONCE_LEN..],
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Tampered)
}

fn dek_aad(b: Binding<'_>, key_id: &str) -> Vec<u8> {
    format!(
        "credsync/v1/dek|{}|{}|{}",
        b.leaf_user_id, b.provider, key_id
    )
    .into_bytes()
}

fn secrets_aad(b: Binding<'_>) -> Vec<u8> {
    format!("credsync/v1/secrets|{}|{}", b.leaf_user_id, b.provider).into_bytes()
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Keyring {
    /// Parse `KEY_ID:BASE64_32_BYTES[,KEY_ID:BASE64...]`; `active` defaults to the first entry.
    /// Errors name the problem but never include key material.
    pub fn parse(
        spec: &str,
        active: Option<&str>,
        min_decrypt: Option<&str>,
    ) -> Result<Keyring, CryptoError> {
        let mut keys: Vec<Kek> = Vec::new();
        for (i, entry) in spec.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let Some((id, b64)) = entry.split_once(':') else {
                return Err(CryptoError::Config(format!(
                    "entry {} is not KEY_ID:BASE64_32_BYTES",
                    i + 1
                )));
            };
            let id = id.trim();
            if !valid_key_id(id) {
                return Err(CryptoError::Config(format!(
                    "entry {}: key id must be 1-64 characters of [A-Za-z0-9._-]",
                    i + 1
                )));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(CryptoError::Config(format!(
                    "key id `{id}` is listed twice"
                )));
            }
            let raw = Zeroizing::new(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(b64.trim()))
                    .map_err(|_| CryptoError::Config(format!("key `{id}` is not valid base64")))?,
            );
            if raw.len() != 32 {
                return Err(CryptoError::Config(format!(
                    "key `{id}` must decode to 32 bytes (got {})",
                    raw.len()
                )));
            }
            let cipher = Aes256Gcm::new_from_slice(&raw)
                .map_err(|_| CryptoError::Config(format!("key `{id}` is unusable")))?;
            let hash_key = Zeroizing::new(hmac_sha256(&raw, b"credsync hash key"));
            let fp = hmac_sha256(&raw, b"credsync key fingerprint");
            let mut fingerprint = [0u8; 16];
            fingerprint.copy_from_slice(&fp[..16]);
            keys.push(Kek {
                id: id.to_owned(),
                cipher,
                hash_key,
                fingerprint,
            });
        }
        if keys.is_empty() {
            return Err(CryptoError::Config("no key configured".into()));
        }
        let active = match active.map(str::trim).filter(|a| !a.is_empty()) {
            None => 0,
            Some(a) => keys.iter().position(|k| k.id == a).ok_or_else(|| {
                CryptoError::Config(format!("active key `{a}` is not among the configured keys"))
            })?,
        };
        let min_decrypt = match min_decrypt.map(str::trim).filter(|a| !a.is_empty()) {
            None => 0,
            Some(m) => keys.iter().position(|k| k.id == m).ok_or_else(|| {
                CryptoError::Config(format!(
                    "minimum decryption key `{m}` is not among the configured keys"
                ))
            })?,
        };
        if active < min_decrypt {
            return Err(CryptoError::Config(
                "the active key is older than the minimum decryption key".into(),
            ));
        }
        Ok(Keyring {
            keys,
            active,
            min_decrypt,
        })
    }

    pub fn active_id(&self) -> &str {
        &self.keys[self.active].id
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    /// The stored fingerprint of a key (HMAC of a fixed label under the key): tells whether the
    /// key configured under an id is the one that wrapped the data, without storing the key.
    pub fn fingerprint(&self, key_id: &str) -> Option<[u8; 16]> {
        self.find(key_id).map(|k| k.fingerprint)
    }

    fn find(&self, key_id: &str) -> Option<&Kek> {
        self.keys.iter().find(|k| k.id == key_id)
    }

    fn decrypting(&self, key_id: &str) -> Result<&Kek, CryptoError> {
        let pos = self
            .keys
            .iter()
            .position(|k| k.id == key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        if pos < self.min_decrypt {
            return Err(CryptoError::RetiredKey(key_id.to_owned()));
        }
        Ok(&self.keys[pos])
    }

    /// Seal the secret fields under a fresh data key wrapped by the active key.
    pub fn seal(&self, binding: Binding<'_>, fields: &SecretFields) -> Result<Sealed, CryptoError> {
        let kek = &self.keys[self.active];
        let dek = random_bytes::<32>();
        let dek_cipher =
            Aes256Gcm::new_from_slice(dek.as_ref()).map_err(|_| CryptoError::Malformed)?;
        let mut plain = Zeroizing::new(Vec::with_capacity(256));
        {
            let exposed: BTreeMap<&str, &str> = fields
                .0
                .iter()
                .map(|(k, v)| (k.as_str(), v.expose_secret()))
                .collect();
            serde_json::to_writer(&mut *plain, &exposed).map_err(|_| CryptoError::Malformed)?;
        }
        let secrets = seal_with(&dek_cipher, &plain, &secrets_aad(binding))?;
        let wrapped_key = seal_with(&kek.cipher, dek.as_ref(), &dek_aad(binding, &kek.id))?;
        Ok(Sealed {
            key_id: kek.id.clone(),
            wrapped_key,
            secrets,
        })
    }

    fn unwrap_dek(&self, binding: Binding<'_>, sealed: &Sealed) -> Result<Aes256Gcm, CryptoError> {
        let kek = self.decrypting(&sealed.key_id)?;
        let dek = open_with(&kek.cipher, &sealed.wrapped_key, &dek_aad(binding, &kek.id))?;
        if dek.len() != 32 {
            return Err(CryptoError::Malformed);
        }
        Aes256Gcm::new_from_slice(&dek).map_err(|_| CryptoError::Malformed)
    }

    /// Open a sealed credential bound to `binding`.
    pub fn open(&self, binding: Binding<'_>, sealed: &Sealed) -> Result<SecretFields, CryptoError> {
        let dek_cipher = self.unwrap_dek(binding, sealed)?;
        let plain = open_with(&dek_cipher, &sealed.secrets, &secrets_aad(binding))?;
        let map: BTreeMap<String, SecretString> =
            serde_json::from_slice(&plain).map_err(|_| CryptoError::Malformed)?;
        Ok(SecretFields(map))
    }

    /// Re-wrap the data key under the active key (the secrets blob is untouched).
    /// Returns `None` when it is already wrapped by the active key.
    pub fn rewrap(
        &self,
        binding: Binding<'_>,
        sealed: &Sealed,
    ) -> Result<Option<Sealed>, CryptoError> {
        let active = &self.keys[self.active];
        if sealed.key_id == active.id {
            return Ok(None);
        }
        let kek = self.decrypting(&sealed.key_id)?;
        let dek = open_with(&kek.cipher, &sealed.wrapped_key, &dek_aad(binding, &kek.id))?;
        let wrapped_key = seal_with(&active.cipher, &dek, &dek_aad(binding, &active.id))?;
        Ok(Some(Sealed {
            key_id: active.id.clone(),
            wrapped_key,
            secrets: sealed.secrets.clone(),
        }))
    }

    /// A keyed hash under the active key; returns the key id used with it.
    pub fn keyed_hash(&self, data: &[u8]) -> (String, [u8; 32]) {
        let kek = &self.keys[self.active];
        (kek.id.clone(), hmac_sha256(kek.hash_key.as_ref(), data))
    }

    /// The keyed hash of `data` under `key_id`, if that key is configured.
    pub fn keyed_hash_with(&self, key_id: &str, data: &[u8]) -> Option<[u8; 32]> {
        self.find(key_id)
            .map(|k| hmac_sha256(k.hash_key.as_ref(), data))
    }
}

/// HMAC-SHA256.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Constant-time equality of two byte strings.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &str) -> Keyring {
        Keyring::parse(spec, None, None).unwrap()
    }

    fn key(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    fn fields() -> SecretFields {
        let mut f = SecretFields::default();
        f.insert("clientSecret", SecretString::from("s3cret-value-1234"));
        f.insert("apiKey", SecretString::from("api-key-abcdef"));
        f
    }

    #[test]
    fn sealed_secrets_open_only_for_their_own_user() {
        let kr = ring(&format!("a:{}", key(1)));
        let alice = uuid::Uuid::new_v4();
        let bob = uuid::Uuid::new_v4();
        let sealed = kr
            .seal(
                Binding {
                    leaf_user_id: &alice,
                    provider: "cfv",
                },
                &fields(),
            )
            .unwrap();
        let opened = kr
            .open(
                Binding {
                    leaf_user_id: &alice,
                    provider: "cfv",
                },
                &sealed,
            )
            .unwrap();
        assert_eq!(
            opened.get("clientSecret").unwrap().expose_secret(),
            "s3cret-value-1234"
        );
        let moved = kr.open(
            Binding {
                leaf_user_id: &bob,
                provider: "cfv",
            },
            &sealed,
        );
        assert_eq!(moved.unwrap_err(), CryptoError::Tampered);
        let other_provider = kr.open(
            Binding {
                leaf_user_id: &alice,
                provider: "jd",
            },
            &sealed,
        );
        assert_eq!(other_provider.unwrap_err(), CryptoError::Tampered);
    }

    #[test]
    fn two_seals_of_the_same_secrets_differ() {
        let kr = ring(&format!("a:{}", key(1)));
        let u = uuid::Uuid::new_v4();
        let b = Binding {
            leaf_user_id: &u,
            provider: "cfv",
        };
        let s1 = kr.seal(b, &fields()).unwrap();
        let s2 = kr.seal(b, &fields()).unwrap();
        assert_ne!(s1.secrets, s2.secrets);
        assert_ne!(s1.wrapped_key, s2.wrapped_key);
    }

    #[test]
    fn a_flipped_bit_fails_authentication() {
        let kr = ring(&format!("a:{}", key(1)));
        let u = uuid::Uuid::new_v4();
        let b = Binding {
            leaf_user_id: &u,
            provider: "cfv",
        };
        let mut s = kr.seal(b, &fields()).unwrap();
        let last = s.secrets.len() - 1;
        s.secrets[last] ^= 1;
        assert_eq!(kr.open(b, &s).unwrap_err(), CryptoError::Tampered);
        s.secrets.truncate(5);
        assert_eq!(kr.open(b, &s).unwrap_err(), CryptoError::Malformed);
    }

    #[test]
    fn rewrap_moves_the_data_key_to_the_active_key() {
        let old = ring(&format!("a:{}", key(1)));
        let u = uuid::Uuid::new_v4();
        let b = Binding {
            leaf_user_id: &u,
            provider: "cfv",
        };
        let s = old.seal(b, &fields()).unwrap();
        let both = Keyring::parse(&format!("a:{},b:{}", key(1), key(2)), Some("b"), None).unwrap();
        let re = both.rewrap(b, &s).unwrap().unwrap();
        assert_eq!(re.key_id, "b");
        assert!(both.rewrap(b, &re).unwrap().is_none());
        let only_b = ring(&format!("b:{}", key(2)));
        assert_eq!(
            only_b
                .open(b, &re)
                .unwrap()
                .get("apiKey")
                .unwrap()
                .expose_secret(),
            "api-key-abcdef"
        );
        assert_eq!(
            only_b.open(b, &s).unwrap_err(),
            CryptoError::UnknownKey("a".into())
        );
        let retired =
            Keyring::parse(&format!("a:{},b:{}", key(1), key(2)), Some("b"), Some("b")).unwrap();
        assert_eq!(
            retired.open(b, &s).unwrap_err(),
            CryptoError::RetiredKey("a".into())
        );
    }

    #[test]
    fn bad_key_specs_are_refused_without_echoing_the_key() {
        for spec in [
            "",
            "nokey",
            "a:notbase64!!",
            "a:AAAA",
            "a b:AAAA",
            &format!("a:{0},a:{0}", key(1)),
        ] {
            let err = Keyring::parse(spec, None, None).unwrap_err().to_string();
            assert!(!err.contains("AAAA"), "{err}");
        }
        let err = Keyring::parse(&format!("a:{}", key(1)), Some("zz"), None).unwrap_err();
        assert!(err.to_string().contains("zz"));
    }
}

/// Property tests: opening stored blobs is total, and any change to a sealed credential fails.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn ring() -> Keyring {
        let key = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
        Keyring::parse(&format!("a:{},b:{}", key(1), key(2)), Some("b"), None)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    const USER: uuid::Uuid = uuid::Uuid::from_u128(0x6f1c3a52_8d5e_4c7b_9d0e_2a1b3c4d5e6f);

    fn binding() -> Binding<'static> {
        Binding {
            leaf_user_id: &USER,
            provider: "climate-field-view",
        }
    }

    fn fields(values: &[String]) -> SecretFields {
        let mut f = SecretFields::default();
        for (name, v) in ["clientSecret", "apiKey", "refreshToken"]
            .iter()
            .zip(values)
        {
            f.insert(name, SecretString::from(v.as_str()));
        }
        f
    }

    fn blob() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..120),
            // Well-formed version byte and length, random content.
            prop::collection::vec(any::<u8>(), 28..120).prop_map(|mut v| {
                v[0] = VERSION;
                v
            }),
        ]
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Flip(prop::sample::Index, u8),
        Truncate(prop::sample::Index),
        Append(Vec<u8>),
        SwapBlobs,
        KeyId(String),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, x)| Edit::Flip(i, x)),
            any::<prop::sample::Index>().prop_map(Edit::Truncate),
            prop::collection::vec(any::<u8>(), 1..20).prop_map(Edit::Append),
            Just(Edit::SwapBlobs),
            prop_oneof![Just("a".to_owned()), Just("zz".to_owned()), ".{0,8}"]
                .prop_map(Edit::KeyId),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_blobs_are_refused_without_panicking(
            key_id in prop_oneof![Just("a".to_owned()), Just("b".to_owned()), ".{0,10}"],
            wrapped_key in blob(),
            secrets in blob(),
        ) {
            let sealed = Sealed { key_id, wrapped_key, secrets };
            prop_assert!(ring().open(binding(), &sealed).is_err());
            let _ = ring().rewrap(binding(), &sealed);
        }

        #[test]
        fn sealed_secrets_round_trip_and_any_edit_fails(
            values in prop::collection::vec(".{0,64}", 3),
            edits in prop::collection::vec((any::<bool>(), edit()), 1..3),
        ) {
            let kr = ring();
            let good = kr.seal(binding(), &fields(&values)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let opened = kr.open(binding(), &good).map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (name, v) in ["clientSecret", "apiKey", "refreshToken"].iter().zip(&values) {
                prop_assert_eq!(opened.get(name).map(ExposeSecret::expose_secret), Some(v.as_str()));
            }
            let mut bad = good.clone();
            for (on_key, e) in &edits {
                let target = if *on_key { &mut bad.wrapped_key } else { &mut bad.secrets };
                match e {
                    Edit::Flip(i, x) if !target.is_empty() => {
                        let i = i.index(target.len());
                        target[i] ^= x;
                    }
                    Edit::Flip(..) => {}
                    Edit::Truncate(i) => {
                        let n = i.index(target.len().max(1));
                        target.truncate(n);
                    }
                    Edit::Append(extra) => target.extend_from_slice(extra),
                    Edit::SwapBlobs => std::mem::swap(&mut bad.wrapped_key, &mut bad.secrets),
                    Edit::KeyId(id) => bad.key_id.clone_from(id),
                }
            }
            if bad != good {
                prop_assert!(kr.open(binding(), &bad).is_err());
            }
            // Another user's binding never opens it.
            let other = uuid::Uuid::from_u128(USER.as_u128() ^ 1);
            let moved = Binding { leaf_user_id: &other, provider: "climate-field-view" };
            prop_assert_eq!(kr.open(moved, &good).err(), Some(CryptoError::Tampered));
        }
    }
}
