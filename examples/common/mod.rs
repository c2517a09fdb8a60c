//! What the benchmark examples share: a throwaway keyring and the secret fields scripts/bench
//! posts to credsync (so sealed rows have the size of real creates), and the database pools and
//! worker counts of the baseline servers, built the fast way.
// Each example uses a part of this module.
#![allow(dead_code)]
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

/// Actix workers: `BENCH_WORKERS`, default the available parallelism.
pub fn workers() -> anyhow::Result<usize> {
    Ok(match std::env::var("BENCH_WORKERS") {
        Ok(v) => v.parse()?,
        Err(_) => std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
    })
}

/// Each worker's share of `BENCH_DB_MAX_CONNECTIONS` (total over all workers, default 16, as
/// credsync's pool), at least one.
pub fn pool_per_worker(workers: usize) -> anyhow::Result<u32> {
    let total: u32 = match std::env::var("BENCH_DB_MAX_CONNECTIONS") {
        Ok(v) => v.parse()?,
        Err(_) => 16,
    };
    Ok((total / u32::try_from(workers)?).max(1))
}

/// A pool of `max_connections` that connects lazily and skips sqlx's ping before each acquire
/// (`test_before_acquire` off, as credsync's). Made on a worker's runtime, its connections live
/// there.
pub fn pool(url: &str, max_connections: u32) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .connect_lazy(url)
        .expect("DATABASE_URL is not a valid postgres URL")
}
