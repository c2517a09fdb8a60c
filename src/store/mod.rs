//! Postgres access: the pool, migrations, and one submodule per table family.
//!
//! Owns: every SQL statement. Must never: see a plaintext secret (it stores only the
//! `crypto::Sealed` blobs), or build SQL from caller input (values are always bound).
pub mod audit;
pub mod batch;
pub mod credentials;
pub mod events;
pub mod gauges;
pub mod idempotency;
pub mod query;
pub mod work;

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool, Postgres};

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

/// Connections kept between the request path's primary-key reads, so those reads skip the
/// pool's return trip.
///
/// sqlx 0.9 pings every connection it takes back into a pool (a Sync message, then a wait for
/// ReadyForQuery), and has no option to turn that off: one more socket write and one more
/// Postgres wake-up per query, ~14 % of credsync's CPU on a forwarded read. A read that
/// completed leaves its connection here instead, for the next read on the same worker.
///
/// Must never hold a connection whose query did not complete: only [`Stashed::keep`] puts one
/// here, and a [`Stashed`] dropped without it (an error, a request cancelled mid-query) returns
/// its connection to the pool, which pings it and closes it when broken. Holds at most `max`
/// connections, each idle for less than [`PING_IDLE_AFTER`] (older ones go back to the pool,
/// whose restart check and lifetimes then apply) and reused at most [`ConnStash::MAX_REUSE`]
/// times in a row. What sits here is taken from the pool's connections, so `max` stays well
/// under the pool's size and [`ConnStash::sweep`] hands idle ones back.
pub struct ConnStash {
    pool: PgPool,
    max: usize,
    idle: Mutex<Vec<Kept>>,
}

struct Kept {
    conn: PoolConnection<Postgres>,
    since: Instant,
    uses: u32,
}

impl ConnStash {
    /// Uses before a connection goes back through the pool (and its lifetime checks) once.
    pub const MAX_REUSE: u32 = 1000;

    /// A stash over `pool` keeping up to a quarter of its `pool_size` connections (at least one).
    pub fn new(pool: PgPool, pool_size: u32) -> ConnStash {
        ConnStash {
            pool,
            max: usize::try_from(pool_size / 4).unwrap_or(1).max(1),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// [`ConnStash::new`], swept by a task on the current runtime for as long as it lives.
    pub fn spawn(pool: PgPool, pool_size: u32) -> std::sync::Arc<ConnStash> {
        let stash = std::sync::Arc::new(ConnStash::new(pool, pool_size));
        tokio::spawn(ConnStash::sweep_loop(std::sync::Arc::downgrade(&stash)));
        stash
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Kept>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently kept connection when it is fresh, else one from the pool.
    pub async fn acquire(&self) -> Result<Stashed<'_>, sqlx::Error> {
        let (fresh, stale) = {
            let mut idle = self.idle();
            let stale = drain_stale(&mut idle);
            (idle.pop(), stale)
        };
        drop(stale);
        let (conn, uses) = match fresh {
            Some(k) => (k.conn, k.uses),
            None => (self.pool.acquire().await?, 0),
        };
        Ok(Stashed {
            stash: self,
            conn,
            uses,
        })
    }

    /// Hand connections idle for [`PING_IDLE_AFTER`] back to the pool.
    pub fn sweep(&self) {
        let stale = drain_stale(&mut self.idle());
        drop(stale);
    }

    /// Sweep every [`PING_IDLE_AFTER`] until the last holder of `stash` is gone.
    pub async fn sweep_loop(stash: std::sync::Weak<ConnStash>) {
        tick_while_alive(PING_IDLE_AFTER, stash, |stash| async move { stash.sweep() }).await;
    }

    /// How many connections are kept right now.
    pub fn kept(&self) -> usize {
        self.idle().len()
    }
}

/// Take the connections idle for [`PING_IDLE_AFTER`] out of `idle` (kept in the order they
/// were kept, oldest first), for the caller to drop outside the lock: back to the pool.
fn drain_stale(idle: &mut Vec<Kept>) -> Vec<Kept> {
    let fresh_from = idle
        .iter()
        .position(|k| k.since.elapsed() < PING_IDLE_AFTER)
        .unwrap_or(idle.len());
    idle.drain(..fresh_from).collect()
}

/// Run `tick` every `period` until the last `Arc` of `target` is gone.
pub async fn tick_while_alive<T, F, Fut>(period: Duration, target: std::sync::Weak<T>, mut tick: F)
where
    F: FnMut(std::sync::Arc<T>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(target) = target.upgrade() else {
            return;
        };
        tick(target).await;
    }
}

/// A connection taken from a [`ConnStash`]; dropped, it returns to the pool.
pub struct Stashed<'a> {
    stash: &'a ConnStash,
    conn: PoolConnection<Postgres>,
    uses: u32,
}

impl Stashed<'_> {
    /// The connection: use it for one statement that runs to completion, then [`Stashed::keep`].
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// The statement completed: keep the connection for the next read, unless the stash is
    /// full or the connection was reused long enough (then it returns to the pool, outside the
    /// lock).
    pub fn keep(self) {
        let Stashed { stash, conn, uses } = self;
        let uses = uses + 1;
        if uses >= ConnStash::MAX_REUSE {
            return;
        }
        let mut idle = stash.idle();
        if idle.len() < stash.max {
            idle.push(Kept {
                conn,
                since: Instant::now(),
                uses,
            });
        }
    }
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
