//! Postgres access: the pool, migrations, and one submodule per table family.
//!
//! Owns: every SQL statement. Must never: see a plaintext secret (it stores only the
//! `crypto::Sealed` blobs), or build SQL from caller input (values are always bound).
pub mod audit;
pub mod credentials;
pub mod events;
pub mod gauges;
pub mod idempotency;
pub mod query;
pub mod work;

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connections idle at least this long are pinged before they are handed out.
const PING_IDLE_AFTER: Duration = Duration::from_millis(100);

/// A pool that connects lazily, so the service starts (and answers 503) while Postgres is down.
///
/// After Postgres restarts, the idle connections the pool still holds were closed by the old
/// server; handing one out would fail a request (503) although Postgres is back. So a connection
/// that sat idle for [`PING_IDLE_AFTER`] (longer than any restart takes) is pinged first, and
/// replaced by a new one when the ping fails; busy connections are reused without a round trip.
pub fn pool(url: &SecretString, max_connections: u32) -> anyhow::Result<PgPool> {
    let opts: PgConnectOptions = url
        .expose_secret()
        .parse()
        .map_err(|_| anyhow::anyhow!("DATABASE_URL is not a valid postgres URL"))?;
    let opts = opts
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    Ok(pool_with(opts, max_connections))
}

/// Another pool to the same database as `pool` (one per actix worker: a connection opened on
/// one runtime and used from another routes every reply through the other runtime's thread).
/// Must be called on the runtime that will use it.
pub fn sibling(pool: &PgPool, max_connections: u32) -> PgPool {
    pool_with((*pool.connect_options()).clone(), max_connections)
}

fn pool_with(opts: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IDLE_AFTER {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .idle_timeout(Duration::from_secs(300))
        .connect_lazy_with(opts)
}

/// Apply pending migrations.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Whether every migration this build knows is applied.
pub async fn migrations_applied(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> =
        sqlx::query_scalar("select max(version) from _sqlx_migrations where success")
            .fetch_one(pool)
            .await
            .or_else(|e| match &e {
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => Ok(None),
                _ => Err(e),
            })?;
    Ok(applied.unwrap_or(0) >= latest)
}

/// Whether a database error means "Postgres is unreachable" (retry later) rather than a bug.
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now, 08xxx connection exceptions
            db.code()
                .is_some_and(|c| c.starts_with("57P") || c.starts_with("08") || c == "53300")
        }
        _ => false,
    }
}
