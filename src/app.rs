//! Assembling the service: pool, migrations, key checks, Leaf client, HTTP server, sync worker.
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use anyhow::Context as _;

use crate::auth::Verifier;
use crate::config::Settings;
use crate::crypto::Keyring;
use crate::gateway::Gateway;
use crate::http::{self, AppState};
use crate::leaf::LeafClient;
use crate::store;

/// What `serve` runs.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub http: bool,
    pub sync: bool,
    pub migrate: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            http: true,
            sync: true,
            migrate: true,
        }
    }
}

/// A start-up failure that is the operator's to fix (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartupError(pub String);

/// A built, not yet running, service.
pub struct Application {
    port: u16,
    server: Option<Server>,
    state: Arc<AppState>,
    worker: Option<crate::sync::WorkerHandle>,
    /// Set when the migrations or the key check could not run at start-up (Postgres
    /// unreachable): they run once Postgres answers, and a failure arrives here and stops the
    /// service (a [`StartupError`], exit code 2, for a refused key check).
    key_failure: Option<tokio::sync::oneshot::Receiver<anyhow::Error>>,
}

impl Application {
    /// Build everything; binds `settings.listen` when it serves HTTP (use port 0 in tests).
    pub async fn build(settings: Settings, opts: RunOptions) -> anyhow::Result<Application> {
        let listener = if opts.http {
            Some(TcpListener::bind(&settings.listen).map_err(|e| {
                StartupError(format!(
                    "CREDSYNC_LISTEN: cannot listen on {}: {e}",
                    settings.listen
                ))
            })?)
        } else {
            None
        };
        Self::build_on(settings, opts, listener).await
    }

    /// Build everything, serving HTTP on `listener`.
    pub async fn build_with_listener(
        settings: Settings,
        opts: RunOptions,
        listener: TcpListener,
    ) -> anyhow::Result<Application> {
        Self::build_on(settings, opts, Some(listener)).await
    }

    /// `listener` is `None` for a worker replica (`serve --sync-only`), which serves no HTTP.
    async fn build_on(
        settings: Settings,
        opts: RunOptions,
        listener: Option<TcpListener>,
    ) -> anyhow::Result<Application> {
        let verifier = Verifier::new(&settings.jwt).map_err(|e| StartupError(e.to_string()))?;
        let workers = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        let pools = PoolSplit::new(settings.db_max_connections, opts.http.then_some(workers));
        // A serving process starts without Postgres: it answers 503 until the deferred
        // migrations and key check have run.
        let (gateway, keys) =
            Self::build_gateway_checked(&settings, opts.migrate, true, pools.background).await?;
        if opts.http && gateway.rows.enabled() {
            // One connection of its own, on top of CREDSYNC_DB_MAX_CONNECTIONS: it is held for
            // good, and the background pool may be a single connection.
            tokio::spawn(crate::rowcache::RowCache::listen(
                Arc::downgrade(&gateway.rows),
                store::sibling(&gateway.db, 1),
            ));
        }
        let keys_checked = Arc::new(AtomicBool::new(keys == KeyCheck::Passed));
        let key_failure = match keys {
            KeyCheck::Passed => None,
            KeyCheck::Deferred { migrate } => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(deferred_start(
                    gateway.db.clone(),
                    gateway.keyring.clone(),
                    migrate,
                    keys_checked.clone(),
                    tx,
                ));
                Some(rx)
            }
        };
        let syncer = crate::sync::Syncer::new(gateway.clone(), settings.sync.clone());
        let state = Arc::new(AppState {
            gateway,
            syncer: syncer.clone(),
            verifier: Arc::new(verifier),
            metrics: http::metrics_handle(),
            max_body_bytes: settings.max_body_bytes,
            webhook_secret: settings.webhook_secret.clone(),
            caller_limiter: http::CallerLimiter::new(settings.caller_rps).map(Arc::new),
            keys_checked,
        });
        let (port, server) = match listener {
            Some(listener) if opts.http => (
                listener.local_addr()?.port(),
                Some(http::server(
                    listener,
                    state.clone(),
                    workers,
                    pools.per_worker,
                )?),
            ),
            _ => (0, None),
        };
        let worker = opts
            .sync
            .then(|| crate::sync::spawn(syncer, state.keys_checked.clone()));
        // Encryption counts are kept in memory on the write path and flushed here.
        let db = state.gateway.db.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                if let Err(e) = store::credentials::flush_encryption_counts(&db).await {
                    tracing::debug!(error = %e, "could not flush encryption counts");
                }
            }
        });
        Ok(Application {
            port,
            server,
            state,
            worker,
            key_failure,
        })
    }

    /// The pool (migrated when `migrate`), the key check and the Leaf client.
    pub async fn build_gateway(settings: &Settings, migrate: bool) -> anyhow::Result<Gateway> {
        Ok(
            Self::build_gateway_checked(settings, migrate, false, settings.db_max_connections)
                .await?
                .0,
        )
    }

    /// With `defer`, migrations that cannot run because Postgres is out of reach are left to
    /// [`deferred_start`] (a serving process); without, they are retried for about a minute
    /// (the CLI's commands).
    async fn build_gateway_checked(
        settings: &Settings,
        migrate: bool,
        defer: bool,
        pool_size: u32,
    ) -> anyhow::Result<(Gateway, KeyCheck)> {
        let db = store::pool(&settings.database_url, pool_size)?;
        let mut migrate_later = false;
        if migrate && defer {
            match store::migrate(&db).await {
                Ok(()) => {}
                Err(e) if migration_unreachable(&e) => migrate_later = true,
                Err(e) => return Err(e).context("applying migrations"),
            }
        } else if migrate {
            migrate_with_retry(&db).await?;
        }
        let keys = if migrate_later {
            KeyCheck::Deferred { migrate: true }
        } else {
            check_keys(&db, &settings.keyring).await?
        };
        if let KeyCheck::Deferred { migrate } = keys {
            tracing::warn!(
                migrate,
                "database unreachable or not migrated at start-up: serving 503 until it answers, then {}the key check run",
                if migrate { "the migrations and " } else { "" }
            );
        }
        let leaf = Arc::new(LeafClient::new(&settings.leaf)?);
        let touches = Arc::new(crate::gateway::Touches::default());
        tokio::spawn(crate::gateway::Touches::flush_loop(
            db.clone(),
            Arc::downgrade(&touches),
        ));
        let gateway = Gateway {
            reads: store::ConnStash::spawn(db.clone(), pool_size),
            creates: Arc::new(store::credentials::CreateWrites::new(db.clone())),
            // Serves nothing until `listen_for_changes` subscribes it (serving processes only).
            rows: Arc::new(crate::rowcache::RowCache::new(settings.row_cache_ttl)),
            db,
            keyring: settings.keyring.clone(),
            leaf,
            outbox_grace: settings.leaf.timeout + Duration::from_secs(30),
            touches,
        };
        Ok((gateway, keys))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// A handle to stop the HTTP server gracefully.
    pub fn handle(&self) -> Option<ServerHandle> {
        self.server.as_ref().map(Server::handle)
    }

    /// Run until the server stops (SIGTERM / Ctrl-C drain in-flight requests), then stop the
    /// worker, which releases its leases. Deferred start-up work that fails (a key check that
    /// refuses the configured keys: a [`StartupError`]; a migration) stops the service the same
    /// way and is returned.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Application {
            server,
            worker,
            key_failure,
            state,
            ..
        } = self;
        let key_failure = async move {
            match key_failure {
                Some(rx) => match rx.await {
                    Ok(refused) => refused,
                    // The check passed (or was abandoned): nothing will arrive.
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        tokio::pin!(key_failure);
        let mut refused = None;
        match server {
            Some(server) => {
                let handle = server.handle();
                tokio::pin!(server);
                tokio::select! {
                    r = &mut server => r?,
                    e = &mut key_failure => {
                        refused = Some(e);
                        let (r, ()) = tokio::join!(server, handle.stop(true));
                        r?;
                    }
                }
            }
            None => {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    r = tokio::signal::ctrl_c() => r?,
                    _ = term.recv() => {}
                    e = &mut key_failure => refused = Some(e),
                }
            }
        }
        if let Some(worker) = worker {
            worker.stop().await;
        }
        if let Err(e) = state.gateway.touches.flush(&state.gateway.db).await {
            tracing::warn!(error = %e, "could not write the last checkedAt refreshes at shutdown");
        }
        if let Err(e) = store::credentials::flush_encryption_counts(&state.gateway.db).await {
            tracing::warn!(error = %e, "could not flush encryption counts at shutdown");
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// How `CREDSYNC_DB_MAX_CONNECTIONS` is divided: a pool per actix worker (each on its worker's
/// runtime) and one for the background work (sync worker, maintenance, start-up checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PoolSplit {
    background: u32,
    per_worker: u32,
}

impl PoolSplit {
    /// `http_workers` is `None` when the process serves no HTTP. Every pool gets at least one
    /// connection, so a total below `workers + 1` is exceeded by that much.
    fn new(total: u32, http_workers: Option<usize>) -> PoolSplit {
        let Some(workers) = http_workers else {
            return PoolSplit {
                background: total,
                per_worker: 0,
            };
        };
        let workers = u32::try_from(workers.max(1)).unwrap_or(u32::MAX);
        let background = (total / 4).max(1);
        PoolSplit {
            background,
            per_worker: (total.saturating_sub(background) / workers).max(1),
        }
    }
}

/// Whether migrations failed only because Postgres is out of reach.
fn migration_unreachable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<sqlx::migrate::MigrateError>().is_some_and(|m| {
        matches!(m, sqlx::migrate::MigrateError::Execute(inner) if store::is_unavailable(inner))
    }) || e.downcast_ref::<sqlx::Error>().is_some_and(store::is_unavailable)
}

/// Migrations at start-up, waiting a little for a Postgres that is still starting.
async fn migrate_with_retry(db: &sqlx::PgPool) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    for attempt in 0.. {
        match store::migrate(db).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 20 && migration_unreachable(&e) => {
                tracing::warn!(error = %e, "database not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(3));
            }
            Err(e) => return Err(e).context("applying migrations"),
        }
    }
    Ok(())
}

/// Whether the key check ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyCheck {
    Passed,
    /// Postgres did not answer, or has no schema yet: the check is still to be done, after the
    /// migrations when `migrate`.
    Deferred {
        migrate: bool,
    },
}

/// The refusal of configured key ids whose material is not the one their stored data was
/// sealed with (`serve` and `keys rotate` both refuse to start on it); `None` when there are none.
pub(crate) fn mismatched_keys(ids: &[String]) -> Option<crate::config::ConfigError> {
    (!ids.is_empty()).then(|| {
        crate::config::ConfigError::new(
            "CREDSYNC_ENCRYPTION_KEYS",
            format!(
                "key id(s) {} do not match the key material stored data was encrypted with",
                ids.join(", ")
            ),
        )
    })
}

/// Every key id referenced by stored data must be configured, with the same key material.
async fn check_keys(db: &sqlx::PgPool, keyring: &Keyring) -> anyhow::Result<KeyCheck> {
    let keys: Vec<(String, [u8; 16])> = keyring
        .key_ids()
        .filter_map(|id| keyring.fingerprint(id).map(|fp| (id.to_owned(), fp)))
        .collect();
    let (missing, mismatched) = match store::credentials::register_keys(db, &keys).await {
        Ok(r) => r,
        Err(e) if store::is_unavailable(&e) || store::is_undefined_table(&e) => {
            return Ok(KeyCheck::Deferred { migrate: false });
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(refused) = mismatched_keys(&mismatched) {
        return Err(StartupError(refused.to_string()).into());
    }
    if !missing.is_empty() {
        return Err(StartupError(format!(
            "CREDSYNC_ENCRYPTION_KEYS: stored credentials are encrypted under key id(s) {} which are not configured",
            missing.join(", ")
        ))
        .into());
    }
    Ok(KeyCheck::Passed)
}

/// The start-up work that found Postgres unreachable (or without its schema): the migrations
/// when `migrate`, then the key check, retried until Postgres answers. A passed check sets
/// `passed` (`/readyz` and the sync worker wait for it); a failure is sent to `failed`, which
/// stops the service: a refused key check as a [`StartupError`] (exit code 2), a migration that
/// fails for another reason than an unreachable Postgres as itself (exit code 1). Other errors
/// (e.g. migrations not applied yet under `--no-migrate`) are logged and retried. Ends when
/// the application is gone.
async fn deferred_start(
    db: sqlx::PgPool,
    keyring: Arc<Keyring>,
    mut migrate: bool,
    passed: Arc<AtomicBool>,
    failed: tokio::sync::oneshot::Sender<anyhow::Error>,
) {
    let mut delay = Duration::from_millis(250);
    while !failed.is_closed() {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
        if migrate {
            match store::migrate(&db).await {
                Ok(()) => {
                    tracing::info!("database reachable: migrations applied");
                    migrate = false;
                }
                Err(e) if migration_unreachable(&e) => continue,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "applying migrations failed; stopping");
                    let _ = failed.send(e.context("applying migrations"));
                    return;
                }
            }
        }
        match check_keys(&db, &keyring).await {
            Ok(KeyCheck::Passed) => {
                tracing::info!("database reachable: the configured encryption keys match");
                passed.store(true, Ordering::Release);
                return;
            }
            Ok(KeyCheck::Deferred { .. }) => {}
            Err(e) => match e.downcast::<StartupError>() {
                Ok(e) => {
                    tracing::error!(error = %e, "stored data does not match the configured encryption keys; stopping");
                    let _ = failed.send(e.into());
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "the key check failed; retrying"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PoolSplit;

    #[test]
    fn the_connection_budget_is_split_between_workers_and_background_work() {
        let split = PoolSplit::new(16, Some(2));
        assert_eq!((split.background, split.per_worker), (4, 6));
        assert!(split.background + 2 * split.per_worker <= 16);
        let split = PoolSplit::new(16, None);
        assert_eq!(split.background, 16);
        // Tiny budgets still give every pool a connection.
        let split = PoolSplit::new(1, Some(4));
        assert_eq!((split.background, split.per_worker), (1, 1));
        let split = PoolSplit::new(64, Some(8));
        assert_eq!((split.background, split.per_worker), (16, 6));
    }
}
