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
    /// Set when the key check could not run at start-up (Postgres unreachable): it runs once
    /// Postgres answers, and a refusal arrives here and stops the service (exit code 2).
    key_failure: Option<tokio::sync::oneshot::Receiver<StartupError>>,
}

impl Application {
    /// Build everything; binds `settings.listen` (use port 0 in tests).
    pub async fn build(settings: Settings, opts: RunOptions) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(&settings.listen).map_err(|e| {
            StartupError(format!(
                "CREDSYNC_LISTEN: cannot listen on {}: {e}",
                settings.listen
            ))
        })?;
        Self::build_with_listener(settings, opts, listener).await
    }

    pub async fn build_with_listener(
        settings: Settings,
        opts: RunOptions,
        listener: TcpListener,
    ) -> anyhow::Result<Application> {
        let verifier = Verifier::new(&settings.jwt).map_err(|e| StartupError(e.to_string()))?;
        let workers = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        let pools = PoolSplit::new(settings.db_max_connections, opts.http.then_some(workers));
        let (gateway, keys) =
            Self::build_gateway_checked(&settings, opts.migrate, pools.background).await?;
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
            KeyCheck::Deferred => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(deferred_key_check(
                    gateway.db.clone(),
                    gateway.keyring.clone(),
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
        let port = listener.local_addr()?.port();
        let server = if opts.http {
            Some(http::server(
                listener,
                state.clone(),
                workers,
                pools.per_worker,
            )?)
        } else {
            drop(listener);
            None
        };
        let worker = opts.sync.then(|| crate::sync::spawn(syncer));
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
            Self::build_gateway_checked(settings, migrate, settings.db_max_connections)
                .await?
                .0,
        )
    }

    async fn build_gateway_checked(
        settings: &Settings,
        migrate: bool,
        pool_size: u32,
    ) -> anyhow::Result<(Gateway, KeyCheck)> {
        let db = store::pool(&settings.database_url, pool_size)?;
        if migrate {
            migrate_with_retry(&db).await?;
        }
        let keys = check_keys(&db, &settings.keyring).await?;
        if keys == KeyCheck::Deferred {
            tracing::warn!(
                "database unreachable or not migrated at start-up: the key check runs once it answers with the schema"
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
    /// worker, which releases its leases. A key check deferred at start-up that refuses the
    /// configured keys stops the service the same way and is returned as a [`StartupError`].
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
            Some(e) => Err(e.into()),
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

/// Migrations at start-up, waiting a little for a Postgres that is still starting.
async fn migrate_with_retry(db: &sqlx::PgPool) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    for attempt in 0.. {
        match store::migrate(db).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < 20 && e.downcast_ref::<sqlx::migrate::MigrateError>().is_some_and(|m| {
                matches!(m, sqlx::migrate::MigrateError::Execute(inner) if store::is_unavailable(inner))
            }) =>
            {
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
    /// Postgres did not answer, or has no schema yet: the check is still to be done.
    Deferred,
}

/// A table the query needs does not exist: the schema is not migrated yet (`serve --no-migrate`
/// before `credsync migrate`), which `/readyz` reports until it is.
fn is_undefined_table(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01"))
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
        Err(e) if store::is_unavailable(&e) || is_undefined_table(&e) => {
            return Ok(KeyCheck::Deferred);
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

/// The key check of a start-up that found Postgres unreachable: retried until Postgres answers.
/// A pass sets `passed` (`/readyz` waits for it); a refusal is sent to `refused` (which stops
/// the service); other errors (e.g. migrations not applied yet) are logged and retried. Ends
/// when the application is gone.
async fn deferred_key_check(
    db: sqlx::PgPool,
    keyring: Arc<Keyring>,
    passed: Arc<AtomicBool>,
    refused: tokio::sync::oneshot::Sender<StartupError>,
) {
    let mut delay = Duration::from_millis(250);
    while !refused.is_closed() {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
        match check_keys(&db, &keyring).await {
            Ok(KeyCheck::Passed) => {
                tracing::info!("database reachable: the configured encryption keys match");
                passed.store(true, Ordering::Release);
                return;
            }
            Ok(KeyCheck::Deferred) => {}
            Err(e) => match e.downcast::<StartupError>() {
                Ok(e) => {
                    tracing::error!(error = %e, "stored data does not match the configured encryption keys; stopping");
                    let _ = refused.send(e);
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
