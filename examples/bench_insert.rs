//! Benchmark baseline for `scripts/bench` (not part of the tests): bare single-row INSERTs into
//! the `credential` table through sqlx, rows of the same size as credsync's creates (public
//! fields as JSON, a data key and the secrets sealed by `credsync::crypto::Keyring`, sealed
//! once). `BENCH_CONCURRENCY` tasks insert for `BENCH_SECS` seconds through a pool of
//! `BENCH_DB_MAX_CONNECTIONS` (credsync's default pool size, 16) with `test_before_acquire` off.
//!
//! `BENCH_STATEMENTS=create` runs credsync's own create statements instead, through its store
//! `CreateWrites`: `insert_pending` (the row and its outbox entry) then `settle_create` (SYNCED
//! with Leaf's answer, resealed secrets, the first status, the audit entry), batched across the
//! tasks as credsync batches concurrent creates, as a POST does once Leaf answered 201, but with
//! no HTTP, JWT, Leaf call or encryption. It is the ceiling of a
//! create on this Postgres: what the SPEC's writes cost, with nothing of credsync's own around
//! them.
//!
//! Prints one line: `{"rows": n, "secs": s, "rowsPerSec": r, "secretsBytes": b, "wrappedKeyBytes": w}`.
//! Point `DATABASE_URL` at a scratch database with credsync's schema: it inserts random users.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use credsync::crypto::{Binding, Sealed};
use credsync::store::credentials as creds;
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Json;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    match std::env::var(name) {
        Ok(v) => Ok(v.parse()?),
        Err(_) => Ok(default),
    }
}

const PROVIDER: &str = "climate-field-view";

/// The statements of a POST that Leaf answered with 201: store the pending row with its outbox
/// entry, then settle it (the request path's fast path in `Gateway::create`), each shared with
/// the other tasks' creates as credsync shares them.
async fn create_statements(
    writes: &creds::CreateWrites,
    user: uuid::Uuid,
    public: &serde_json::Map<String, serde_json::Value>,
    answered: &serde_json::Map<String, serde_json::Value>,
    sealed: &Sealed,
) -> anyhow::Result<()> {
    let stored = writes
        .insert_pending(creds::NewCredential {
            user,
            provider: PROVIDER,
            public: public.clone(),
            sealed: sealed.clone(),
            actor: "bench".into(),
            request_id: "bench-request-id".into(),
            grace: Duration::from_secs(30),
        })
        .await?;
    let Ok(pending) = stored else {
        anyhow::bail!("user {user} already had a credential");
    };
    let settled = writes
        .settle_create(creds::Settle {
            user,
            provider: PROVIDER,
            leaf_credential_id: Some(uuid::Uuid::new_v4()),
            status: Some("OK".into()),
            created_time: Some(time::OffsetDateTime::now_utc()),
            public: answered.clone(),
            sealed: Some(sealed.clone()),
            actor: "bench".into(),
            request_id: "bench-request-id".into(),
            pending,
        })
        .await?;
    anyhow::ensure!(
        settled.is_some(),
        "the pending row of {user} was not settled"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")?;
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 32)?;
    let secs: u64 = env_or("BENCH_SECS", 10)?;
    let max_conn: u32 = env_or("BENCH_DB_MAX_CONNECTIONS", 16)?;
    let create = match std::env::var("BENCH_STATEMENTS").as_deref() {
        Ok("create") => true,
        Ok("insert") | Err(_) => false,
        Ok(other) => anyhow::bail!("BENCH_STATEMENTS must be insert or create, not {other:?}"),
    };
    let pool = PgPoolOptions::new()
        .max_connections(max_conn)
        .test_before_acquire(false)
        .connect(&url)
        .await?;

    // The same fields scripts/bench posts to credsync.
    let keyring = common::keyring()?;
    let secrets = common::secrets();
    let user0 = uuid::Uuid::new_v4();
    let sealed = keyring
        .seal(
            Binding {
                leaf_user_id: &user0,
                provider: PROVIDER,
            },
            &secrets,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut public = serde_json::Map::new();
    public.insert("clientId".into(), "bench-client-id-0123456789".into());
    // What the simulator adds to a create's answer (settle_create merges it in).
    let mut answered = serde_json::Map::new();
    answered.insert("scopes".into(), "all".into());
    let public = Arc::new(public);
    let answered = Arc::new(answered);
    let sealed = Arc::new(sealed);

    let writes = Arc::new(creds::CreateWrites::new(pool.clone()));
    let rows = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (pool, writes, rows, public, answered, sealed) = (
            pool.clone(),
            writes.clone(),
            rows.clone(),
            public.clone(),
            answered.clone(),
            sealed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let user = uuid::Uuid::new_v4();
                if create {
                    create_statements(&writes, user, &public, &answered, &sealed).await?;
                } else {
                    sqlx::query(
                        "insert into credential (leaf_user_id, provider, sync_state, public_fields, key_id, wrapped_key, secrets)
                         values ($1, $2, 'PENDING_UPSTREAM', $3, $4, $5, $6)",
                    )
                    .bind(user)
                    .bind(PROVIDER)
                    .bind(Json(public.as_ref()))
                    .bind(&sealed.key_id)
                    .bind(&sealed.wrapped_key)
                    .bind(&sealed.secrets)
                    .execute(&pool)
                    .await?;
                }
                rows.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = rows.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "rows": n,
            "secs": elapsed,
            "rowsPerSec": n as f64 / elapsed,
            "secretsBytes": sealed.secrets.len(),
            "wrappedKeyBytes": sealed.wrapped_key.len(),
        })
    );
    Ok(())
}
