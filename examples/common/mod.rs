//! What the benchmark examples share: a throwaway keyring and the secret fields scripts/bench
//! posts to credsync (so sealed rows have the size of real creates).
use credsync::crypto::{Keyring, SecretFields};
use secrecy::SecretString;

/// A keyring with one freshly generated key, id `bench`.
pub fn keyring() -> anyhow::Result<Keyring> {
    Keyring::parse(
        &format!("bench:{}", credsync::crypto::generate_key_b64().as_str()),
        None,
        None,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The three secret fields of a create, as scripts/bench posts them.
pub fn secrets() -> SecretFields {
    let mut secrets = SecretFields::default();
    for (name, value) in [
        ("clientSecret", "bench-client-secret-0123456789abcdef"),
        ("apiKey", "bench-api-key-0123456789abcdef"),
        ("refreshToken", "bench-refresh-token-0123456789abcdef"),
    ] {
        secrets.insert(name, SecretString::from(value));
    }
    secrets
}
