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

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgConnection, PgPool, Postgres};
use tokio::sync::oneshot;

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
/// A small pool of its own, in front of the real one: at most `slots` connections (half the
/// pool's) are taken for reads at a time, idle here or in use. A read takes a kept connection,
/// else a free slot (a connection from the pool), else it queues; a read that completes hands
/// its connection to the read that has waited longest, and only keeps it when none waits.
/// First come, first served: when every connection was busy, an earlier version let each
/// completed read's connection go to the next read to arrive while the reads queued at the pool
/// starved (p99 1.4 s against a p50 of 0.12 ms, 2 connections per worker, 32 callers).
///
/// Must never hold a connection whose query did not complete: only [`Stashed::keep`] puts one
/// here, and a [`Stashed`] dropped without it (an error, a request cancelled mid-query) returns
/// its connection to the pool, which pings it and closes it when broken, and frees its slot.
/// A connection idle here for [`PING_IDLE_AFTER`] goes back to the pool (whose restart check and
/// lifetimes then apply), as does one reused [`ConnStash::MAX_REUSE`] times in a row.
pub struct ConnStash {
    pool: PgPool,
    slots: usize,
    state: Mutex<StashState>,
}

#[derive(Default)]
struct StashState {
    /// Kept connections, oldest first. Never non-empty while a read waits.
    idle: Vec<Kept>,
    /// Slots taken: connections idle here or in use, and acquisitions from the pool under way.
    taken: usize,
    /// Reads waiting, longest first (a closed one was cancelled and is skipped).
    waiting: VecDeque<oneshot::Sender<Handoff>>,
}

struct Kept {
    conn: PoolConnection<Postgres>,
    since: Instant,
    uses: u32,
}

/// What a waiting read is handed: a connection, or the slot of one that went back to the pool.
enum Handoff {
    Conn(Kept),
    Slot,
}

impl ConnStash {
    /// Uses before a connection goes back through the pool (and its lifetime checks) once.
    pub const MAX_REUSE: u32 = 1000;

    /// A stash over `pool` taking up to half of its `pool_size` connections (at least one).
    pub fn new(pool: PgPool, pool_size: u32) -> ConnStash {
        ConnStash {
            pool,
            slots: usize::try_from(pool_size / 2).unwrap_or(1).max(1),
            state: Mutex::new(StashState::default()),
        }
    }

    /// [`ConnStash::new`], swept by a task on the current runtime for as long as it lives.
    pub fn spawn(pool: PgPool, pool_size: u32) -> std::sync::Arc<ConnStash> {
        let stash = std::sync::Arc::new(ConnStash::new(pool, pool_size));
        tokio::spawn(ConnStash::sweep_loop(std::sync::Arc::downgrade(&stash)));
        stash
    }

    fn state(&self) -> std::sync::MutexGuard<'_, StashState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently kept connection when it is fresh, else one from the pool when a slot
    /// is free, else the first connection or slot a completing read hands over (to the waiting
    /// reads in arrival order).
    pub async fn acquire(&self) -> Result<Stashed<'_>, sqlx::Error> {
        let (start, stale) = {
            let mut state = self.state();
            let stale = drain_stale(&mut state.idle);
            state.taken -= stale.len();
            let start = if let Some(kept) = state.idle.pop() {
                Start::Kept(kept)
            } else if state.taken < self.slots {
                state.taken += 1;
                Start::Slot
            } else {
                state.waiting.retain(|w| !w.is_closed());
                let (tx, rx) = oneshot::channel();
                state.waiting.push_back(tx);
                Start::Queued(rx)
            };
            (start, stale)
        };
        drop(stale);
        let kept = match start {
            Start::Kept(kept) => kept,
            Start::Slot => self.take_from_pool(SlotGuard(Some(self))).await?,
            Start::Queued(rx) => {
                let queued = async {
                    let mut queued = Queued { stash: self, rx };
                    match (&mut queued.rx).await {
                        Ok(Handoff::Conn(kept)) => Ok(kept),
                        Ok(Handoff::Slot) => self.take_from_pool(SlotGuard(Some(self))).await,
                        // Only `put` and `free_slot` take a waiter out, and they send.
                        Err(_) => Err(sqlx::Error::PoolClosed),
                    }
                };
                // As long as the pool would have let it wait: while Postgres is unreachable,
                // each slot's attempt takes that long, and the queue must not add them up.
                tokio::time::timeout(self.pool.options().get_acquire_timeout(), queued)
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??
            }
        };
        Ok(Stashed {
            stash: self,
            conn: kept.conn,
            uses: kept.uses,
            slot: SlotGuard(Some(self)),
        })
    }

    /// A connection from the pool for a slot taken; the slot is freed when that fails or is
    /// cancelled.
    async fn take_from_pool(&self, slot: SlotGuard<'_>) -> Result<Kept, sqlx::Error> {
        let conn = self.pool.acquire().await?;
        slot.hold();
        Ok(Kept {
            conn,
            since: Instant::now(),
            uses: 0,
        })
    }

    /// Hand a connection whose query completed to the longest-waiting read, or keep it.
    fn put(&self, mut kept: Kept) {
        let mut state = self.state();
        while let Some(waiter) = state.waiting.pop_front() {
            match waiter.send(Handoff::Conn(kept)) {
                // That read was cancelled: the next one.
                Err(Handoff::Conn(back)) => kept = back,
                _ => return,
            }
        }
        state.idle.push(kept);
    }

    /// A connection of this stash went back to the pool: its slot goes to the longest-waiting
    /// read, or is free.
    fn free_slot(&self) {
        let mut state = self.state();
        while let Some(waiter) = state.waiting.pop_front() {
            if waiter.send(Handoff::Slot).is_ok() {
                return;
            }
        }
        state.taken -= 1;
    }

    /// Hand connections idle for [`PING_IDLE_AFTER`] back to the pool.
    pub fn sweep(&self) {
        let stale = {
            let mut state = self.state();
            let stale = drain_stale(&mut state.idle);
            state.taken -= stale.len();
            stale
        };
        drop(stale);
    }

    /// Sweep every [`PING_IDLE_AFTER`] until the last holder of `stash` is gone.
    pub async fn sweep_loop(stash: std::sync::Weak<ConnStash>) {
        tick_while_alive(PING_IDLE_AFTER, stash, |stash| async move { stash.sweep() }).await;
    }

    /// How many connections are kept right now.
    pub fn kept(&self) -> usize {
        self.state().idle.len()
    }
}

/// How a [`ConnStash::acquire`] starts.
enum Start {
    Kept(Kept),
    Slot,
    Queued(oneshot::Receiver<Handoff>),
}

/// A slot taken for a connection not yet had from the pool: freed unless [`SlotGuard::hold`].
struct SlotGuard<'a>(Option<&'a ConnStash>);

impl SlotGuard<'_> {
    fn hold(mut self) {
        self.0 = None;
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if let Some(stash) = self.0 {
            stash.free_slot();
        }
    }
}

/// A read in the queue. Cancelled, it passes on whatever was handed to it meanwhile.
struct Queued<'a> {
    stash: &'a ConnStash,
    rx: oneshot::Receiver<Handoff>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Handoff::Conn(kept)) => self.stash.put(kept),
            Ok(Handoff::Slot) => self.stash.free_slot(),
            Err(_) => {}
        }
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

/// A connection taken from a [`ConnStash`]; dropped, it returns to the pool (its slot goes to
/// the next read).
pub struct Stashed<'a> {
    stash: &'a ConnStash,
    conn: PoolConnection<Postgres>,
    uses: u32,
    /// Dropped after `conn` (fields drop in order): the slot is freed once it is back.
    slot: SlotGuard<'a>,
}

impl Stashed<'_> {
    /// The connection: use it for one statement that runs to completion, then [`Stashed::keep`].
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// The statement completed: hand the connection to the read waiting longest, or keep it
    /// for the next read, unless it was reused long enough (then it returns to the pool).
    pub fn keep(self) {
        let uses = self.uses + 1;
        if uses >= ConnStash::MAX_REUSE {
            return;
        }
        let Stashed {
            stash, conn, slot, ..
        } = self;
        slot.hold();
        stash.put(Kept {
            conn,
            since: Instant::now(),
            uses,
        });
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
/// A table the query needs does not exist: the schema is not migrated yet (`serve
/// --no-migrate` before `credsync migrate`, or migrations deferred while Postgres was out of
/// reach). Answered as Postgres unavailable (503): `/readyz` reports it until it is migrated.
pub fn is_undefined_table(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01"))
}

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
