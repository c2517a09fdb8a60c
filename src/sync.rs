//! The sync worker (SPEC §8): refreshes each credential's status and events every
//! `CREDSYNC_SYNC_INTERVAL_SECS`, drains the outbox, runs on-demand syncs, prunes old events.
//!
//! Owns: leasing work (so replicas split it and never fetch one user twice at once), bounding
//! upstream concurrency (`CREDSYNC_SYNC_CONCURRENCY`; the request rate is bounded by the Leaf
//! client's `LEAF_MAX_RPS` limiter), and per-credential backoff with jitter (honouring
//! `Retry-After`). Must never: drop a queued write, or hold a lease past its expiry on purpose.
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder as _;
use futures_util::StreamExt as _;
use secrecy::ExposeSecret;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::config::SyncSettings;
use crate::crypto::Binding;
use crate::domain::Provider;
use crate::domain::provider::{CLIMATE_FIELD_VIEW, provider_by_name};
use crate::gateway::{Actor, Gateway, LeafCredential};
use crate::leaf::LeafError;
use crate::store::audit::{self, Entry, Outcome};
use crate::store::credentials::{self as creds, StatusSource};
use crate::store::{events, work};

const WORKER_ACTOR: &str = "credsync";
/// The audit trail's actor for what the command line does (SPEC §6: "the CLI's actor is `cli`").
const CLI_ACTOR: &str = "cli";

/// Lanes per slot of `CREDSYNC_SYNC_CONCURRENCY`. Between its upstream calls a lane does
/// database work (claim, compare, store, release) without holding a slot; with one lane per
/// slot that work left the slot idle (sync ran at 0.89–0.94 of `concurrency / latency`). With
/// two, one lane's next call is ready while the other's is in flight; the slots still bound
/// the calls in flight.
const LANES_PER_SLOT: usize = 2;

/// An idle lane's nap, per slot: each lane naps `IDLE_NAP × LANES_PER_SLOT`, so an idle worker
/// asks the database for work (two queries: the outbox, then the due credentials) no more
/// often than one lane per slot napping `IDLE_NAP` did. With the lanes out of step, new work
/// still waits far less than a nap.
const IDLE_NAP: Duration = Duration::from_millis(500);

/// The delay before attempt `failures + 1`: exponential with jitter, 1 s to 5 min, or Leaf's `Retry-After`.
pub fn backoff(failures: u32, retry_after: Option<u64>) -> Duration {
    if let Some(r) = retry_after {
        return Duration::from_secs(r.max(1));
    }
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(300))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(failures.min(30) as usize)
        .unwrap_or(Duration::from_secs(300))
}

/// What went wrong, for the logs and the outbox's `last_error`: never Leaf's own text, which may
/// quote a secret (a rejected create keeps it, masked, in [`Syncer::reject`]).
fn error_text(e: &LeafError) -> String {
    match e {
        LeafError::Unavailable(u) => format!("Leaf unavailable: {u:?}"),
        LeafError::Rejected { status, .. } => format!("Leaf answered {status}"),
        LeafError::Unexpected { status } => format!("Leaf answered an unexpected {status}"),
    }
}

/// The worker's identity (lease owner).
fn owner_id() -> String {
    let host: String = std::env::var("HOSTNAME")
        .unwrap_or_else(|_| "host".into())
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(32)
        .collect();
    format!("{host}-{}-{}", std::process::id(), Uuid::new_v4().simple())
}

/// The sync engine, shared by the background worker, `POST /v1/sync` and `credsync sync --once`.
#[derive(Clone)]
pub struct Syncer {
    pub gateway: Gateway,
    pub settings: SyncSettings,
    pub owner: Arc<str>,
    permits: Arc<Semaphore>,
    /// The worker's own ceiling: three quarters of the Leaf rate, so callers always keep a share.
    pace: Arc<governor::DefaultDirectRateLimiter>,
    /// Leases whose release failed (the database went away, or the pool was busy, mid-sync or
    /// mid-delivery). Released again before the next claim, so a blip does not park a
    /// credential or an outbox entry until its lease expires.
    stranded: Arc<std::sync::Mutex<Vec<Stranded>>>,
}

/// A lease the worker still holds, with what it meant to set on release.
#[derive(Debug, Clone)]
enum Stranded {
    /// A credential's sync lease and its next schedule.
    Sync {
        user: Uuid,
        provider: &'static str,
        next: Duration,
        failed: bool,
    },
    /// An outbox entry whose attempt failed, to be retried after `delay`.
    Outbox {
        id: i64,
        delay: Duration,
        error: String,
    },
}

/// Result of one user's sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserOutcome {
    Synced,
    Vanished,
    Failed,
}

impl Syncer {
    pub fn new(gateway: Gateway, settings: SyncSettings) -> Syncer {
        let permits = Arc::new(Semaphore::new(settings.concurrency));
        let rps = std::num::NonZeroU32::new(gateway.leaf.max_rps().saturating_mul(3) / 4)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let pace = Arc::new(governor::RateLimiter::direct(
            governor::Quota::per_second(rps).allow_burst(rps),
        ));
        Syncer {
            gateway,
            settings,
            owner: owner_id().into(),
            permits,
            pace,
            stranded: Arc::default(),
        }
    }

    /// A slot for one upstream call: within the concurrency bound and the worker's pace.
    async fn slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let permit = self.permits.acquire().await.ok();
        self.pace.until_ready().await;
        permit
    }

    fn actor(&self) -> Actor<'static> {
        Actor {
            sub: WORKER_ACTOR,
            request_id: "sync",
        }
    }

    /// Fetch one credential's status and every page of its events; store them.
    async fn refresh(&self, provider: &Provider, user: Uuid) -> Result<UserOutcome, LeafError> {
        let gw = &self.gateway;
        let request_id = format!("sync.{}.{}", self.owner, Uuid::now_v7().simple());
        let answer = {
            let _permit = self.slot().await;
            gw.leaf.get_credential(provider, user, &request_id).await?
        };
        let local = creds::get(&gw.db, user, provider.name)
            .await
            .map_err(db_unavailable)?;
        let Some(answer) = answer else {
            if local
                .as_ref()
                .is_some_and(|r| r.state() == crate::domain::SyncState::Synced)
            {
                creds::purge(&gw.db, user, provider.name)
                    .await
                    .map_err(db_unavailable)?;
                audit::record_logged(
                    &gw.db,
                    &Entry {
                        actor: WORKER_ACTOR,
                        action: "credential.vanished",
                        leaf_user_id: Some(user),
                        provider: Some(provider.name),
                        outcome: Outcome::Success,
                        request_id: Some(&request_id),
                        detail: Some("Leaf no longer has this credential"),
                    },
                )
                .await;
            }
            return Ok(UserOutcome::Vanished);
        };
        gw.apply_leaf_answer(
            provider,
            user,
            local.as_ref(),
            answer,
            StatusSource::Sync,
            self.actor(),
        )
        .await
        .map_err(|e| not_stored(user, &e))?;
        let mut page = 0;
        loop {
            let got = {
                let _permit = self.slot().await;
                gw.leaf
                    .events(provider, user, page, 100, false, &request_id)
                    .await?
            };
            let Some((list, total)) = got else { break };
            let n = list.len();
            events::upsert(&gw.db, user, provider.name, &list)
                .await
                .map_err(db_unavailable)?;
            page += 1;
            let seen = i64::from(page) * 100;
            if n < 100 || total.is_some_and(|t| seen >= t) || page >= 1000 {
                break;
            }
        }
        Ok(UserOutcome::Synced)
    }

    /// [`Syncer::refresh`] while renewing the credential's lease every third of it, so that a
    /// sync longer than the lease (many pages of events, a slow Leaf) is not taken over and
    /// fetched twice at once. `None` when the lease was lost anyway (the database was out of
    /// reach for longer than the lease): the sync stops there, the new holder's to do.
    async fn refresh_under_lease(
        &self,
        provider: &Provider,
        user: Uuid,
    ) -> Option<Result<UserOutcome, LeafError>> {
        let lease = self.settings.lease;
        let renew = async {
            loop {
                tokio::time::sleep(lease / 3).await;
                match work::renew_sync_lease(
                    &self.gateway.db,
                    &self.owner,
                    user,
                    provider.name,
                    lease,
                )
                .await
                {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => tracing::warn!(error = %e, "could not renew a sync lease"),
                }
            }
        };
        tokio::select! {
            result = self.refresh(provider, user) => Some(result),
            () = renew => None,
        }
    }

    /// Sync one leased credential and release it with its next due time.
    async fn sync_leased(&self, provider: &Provider, user: Uuid) -> UserOutcome {
        let Some(result) = self.refresh_under_lease(provider, user).await else {
            tracing::warn!(leaf_user_id = %user, "lost a sync lease mid-sync; left to its new holder");
            metrics::counter!("credsync_sync_users_total", "outcome" => "failed").increment(1);
            return UserOutcome::Failed;
        };
        let (outcome, next, failed) = match &result {
            Ok(o) => (*o, self.settings.interval, false),
            Err(e) => {
                tracing::info!(leaf_user_id = %user, error = %error_text(e), "sync failed; backing off");
                let failures = work::sync_failures(&self.gateway.db, user, provider.name)
                    .await
                    .unwrap_or(0);
                (
                    UserOutcome::Failed,
                    backoff(u32::try_from(failures).unwrap_or(0), e.retry_after()),
                    true,
                )
            }
        };
        if outcome != UserOutcome::Vanished {
            self.release_or_keep(Stranded::Sync {
                user,
                provider: provider.name,
                next,
                failed,
            })
            .await;
        }
        metrics::counter!("credsync_sync_users_total", "outcome" => match outcome {
            UserOutcome::Synced => "synced",
            UserOutcome::Vanished => "vanished",
            UserOutcome::Failed => "failed",
        })
        .increment(1);
        outcome
    }

    async fn release(&self, lease: &Stranded) -> Result<(), sqlx::Error> {
        let db = &self.gateway.db;
        match lease {
            Stranded::Sync {
                user,
                provider,
                next,
                failed,
            } => work::finish_sync(db, &self.owner, *user, provider, *next, *failed).await,
            Stranded::Outbox { id, delay, error } => {
                work::retry_outbox(db, *id, &self.owner, *delay, error).await
            }
        }
    }

    /// Release a lease, or keep it for [`Syncer::release_stranded`] when that fails.
    async fn release_or_keep(&self, lease: Stranded) {
        if let Err(e) = self.release(&lease).await {
            tracing::warn!(error = %e, "could not release a lease; will retry");
            self.stranded_leases().push(lease);
        }
    }

    fn stranded_leases(&self) -> std::sync::MutexGuard<'_, Vec<Stranded>> {
        self.stranded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Retry the releases that failed; the ones that fail again stay for the next step.
    async fn release_stranded(&self) {
        let pending = std::mem::take(&mut *self.stranded_leases());
        for lease in pending {
            if self.release(&lease).await.is_err() {
                self.stranded_leases().push(lease);
            }
        }
    }

    /// Deliver one outbox entry (create or delete). Returns whether it is settled.
    pub async fn deliver(&self, entry: &work::OutboxEntry) -> bool {
        let gw = &self.gateway;
        let Some(provider) = provider_by_name(&entry.provider) else {
            let _ = work::delete_outbox(&gw.db, entry.id).await;
            return true;
        };
        let user = entry.leaf_user_id;
        let request_id = entry
            .request_id
            .clone()
            .unwrap_or_else(|| format!("outbox-{}", entry.id));
        let actor = Actor {
            sub: WORKER_ACTOR,
            request_id: &request_id,
        };
        let result = match entry.op.as_str() {
            "create" => self.deliver_create(provider, user, actor).await,
            _ => self.deliver_delete(provider, user, actor).await,
        };
        match result {
            Ok(()) => {
                let _ = work::delete_outbox(&gw.db, entry.id).await;
                true
            }
            Err(e) => {
                let delay = backoff(
                    u32::try_from(entry.attempts.saturating_sub(1)).unwrap_or(0),
                    e.retry_after(),
                );
                self.release_or_keep(Stranded::Outbox {
                    id: entry.id,
                    delay,
                    error: error_text(&e),
                })
                .await;
                false
            }
        }
    }

    async fn deliver_create(
        &self,
        provider: &Provider,
        user: Uuid,
        actor: Actor<'_>,
    ) -> Result<(), LeafError> {
        let gw = &self.gateway;
        let Some(row) = creds::get(&gw.db, user, provider.name)
            .await
            .map_err(db_unavailable)?
        else {
            return Ok(());
        };
        if row.state() != crate::domain::SyncState::PendingUpstream {
            return Ok(());
        }
        let Some(sealed) = row.sealed() else {
            return Ok(());
        };
        let secrets = gw
            .keyring
            .open(Binding { leaf_user_id: &user, provider: provider.name }, &sealed)
            .map_err(|e| {
                tracing::error!(leaf_user_id = %user, error = %e, "cannot open a queued credential");
                LeafError::Unavailable(crate::leaf::Unavailable::Garbage)
            })?;
        let body = crate::gateway::leaf_create_body_from(provider, &row.public_fields.0, &secrets);
        let queued_client_id = row
            .public_fields
            .0
            .get("clientId")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let result = {
            let _permit = self.slot().await;
            gw.leaf
                .create_credential(provider, user, body, actor.request_id)
                .await
        };
        let answer = match result {
            Ok(answer) => answer,
            Err(e) if crate::gateway::is_conflict(&e) => {
                // An earlier attempt may have reached Leaf: it counts if Leaf holds what we queued.
                let existing = gw
                    .leaf
                    .get_credential(provider, user, actor.request_id)
                    .await?;
                match existing {
                    Some(a)
                        if LeafCredential::parse(provider, a.clone())
                            .public
                            .get("clientId")
                            .and_then(|v| v.as_str())
                            == queued_client_id.as_deref() =>
                    {
                        a
                    }
                    _ => return self.reject(provider, user, &secrets, e, actor).await,
                }
            }
            Err(e @ (LeafError::Rejected { .. } | LeafError::Unexpected { .. })) => {
                return self.reject(provider, user, &secrets, e, actor).await;
            }
            Err(e) => {
                // Deleted while the create was on its way: Leaf may have taken it all the same
                // (a timeout), and nothing would retry it.
                let held = creds::get(&gw.db, user, provider.name)
                    .await
                    .map_err(db_unavailable)?;
                if held.is_none_or(|r| r.state() == crate::domain::SyncState::DeletePending) {
                    gw.deleted_while_created(provider, user, actor, true)
                        .await
                        .map_err(db_unavailable)?;
                    return Ok(());
                }
                return Err(e);
            }
        };
        let stored = gw
            .apply_leaf_answer(
                provider,
                user,
                Some(&row),
                answer,
                StatusSource::Sync,
                actor,
            )
            .await
            .map_err(|e| not_stored(user, &e))?;
        if stored.is_none() {
            // Deleted (or its delete begun) while Leaf was creating it.
            gw.deleted_while_created(provider, user, actor, false)
                .await
                .map_err(db_unavailable)?;
            return Ok(());
        }
        audit::record_logged(
            &gw.db,
            &Entry {
                actor: WORKER_ACTOR,
                action: "credential.create",
                leaf_user_id: Some(user),
                provider: Some(provider.name),
                outcome: Outcome::Success,
                request_id: Some(actor.request_id),
                detail: Some("queued create delivered to Leaf"),
            },
        )
        .await;
        Ok(())
    }

    async fn reject(
        &self,
        provider: &Provider,
        user: Uuid,
        secrets: &crate::crypto::SecretFields,
        e: LeafError,
        actor: Actor<'_>,
    ) -> Result<(), LeafError> {
        let (status, detail) = match &e {
            LeafError::Rejected { status, detail } => (*status, detail.clone()),
            LeafError::Unexpected { status } => {
                (*status, format!("Leaf answered an unexpected {status}"))
            }
            LeafError::Unavailable(_) => return Err(e),
        };
        let detail = crate::domain::credential::mask_secrets(
            &detail,
            secrets.0.values().map(|s| s.expose_secret()),
        );
        creds::reject(&self.gateway.db, user, provider.name, status, &detail)
            .await
            .map_err(db_unavailable)?;
        audit::record_logged(
            &self.gateway.db,
            &Entry {
                actor: WORKER_ACTOR,
                action: "credential.rejected",
                leaf_user_id: Some(user),
                provider: Some(provider.name),
                outcome: Outcome::Failure,
                request_id: Some(actor.request_id),
                detail: Some(&format!("Leaf answered {status}: {detail}")),
            },
        )
        .await;
        Ok(())
    }

    async fn deliver_delete(
        &self,
        provider: &Provider,
        user: Uuid,
        actor: Actor<'_>,
    ) -> Result<(), LeafError> {
        let gw = &self.gateway;
        let result = {
            let _permit = self.slot().await;
            gw.leaf
                .delete_credential(provider, user, actor.request_id)
                .await
        };
        let (outcome, detail) = match result {
            Ok(true) => (
                Outcome::Success,
                "queued delete delivered to Leaf".to_owned(),
            ),
            Ok(false) => (
                Outcome::Success,
                "queued delete: Leaf no longer had the credential".to_owned(),
            ),
            Err(e) if e.is_unavailable() => return Err(e),
            Err(e) => {
                tracing::warn!(leaf_user_id = %user, error = %error_text(&e), "Leaf refused a queued delete; dropping it");
                (
                    Outcome::Failure,
                    format!(
                        "Leaf refused the queued delete ({}); the local copy is removed",
                        error_text(&e)
                    ),
                )
            }
        };
        creds::purge(&gw.db, user, provider.name)
            .await
            .map_err(db_unavailable)?;
        // The DELETE was audited when it was answered 202; this is its end.
        audit::record_logged(
            &gw.db,
            &Entry {
                actor: WORKER_ACTOR,
                action: "credential.delete",
                leaf_user_id: Some(user),
                provider: Some(provider.name),
                outcome,
                request_id: Some(actor.request_id),
                detail: Some(&detail),
            },
        )
        .await;
        Ok(())
    }

    /// One unit of background work: deliver one due outbox entry, else sync one due credential.
    /// Returns whether there was any.
    pub async fn step(&self) -> bool {
        let db = &self.gateway.db;
        self.release_stranded().await;
        // While the breaker refuses calls, a claim could only fail and be given back: the lanes
        // nap instead (the first one to step after the cool-down is the breaker's probe).
        if self.gateway.leaf.breaker().is_open() {
            return false;
        }
        match work::claim_outbox(db, &self.owner, self.settings.lease, 1).await {
            Ok(mut entries) => {
                if let Some(e) = entries.pop() {
                    self.deliver(&e).await;
                    return true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the outbox"),
        }
        match work::claim_due(db, &self.owner, self.settings.lease, 1).await {
            Ok(mut due) => {
                if let Some((user, provider)) = due.pop() {
                    if let Some(p) = provider_by_name(&provider) {
                        self.sync_leased(p, user).await;
                    }
                    return true;
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the sync queue"),
        }
        false
    }

    /// A lane of the worker: steps until there is no work, then naps. Lanes run side by side,
    /// [`LANES_PER_SLOT`] per upstream slot, so a slot is refilled the moment its call ends.
    async fn lane(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        while !*stop.borrow() {
            let worked = tokio::select! {
                w = self.step() => w,
                _ = stop.changed() => false,
            };
            if !worked {
                tokio::select! {
                    _ = tokio::time::sleep(IDLE_NAP * LANES_PER_SLOT as u32) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Sync the given credentials now (on-demand run): each is leased, refreshed (or, when its
    /// create is still queued, delivered), and counted in the run.
    pub async fn run(&self, run_id: Option<Uuid>, users: Vec<(Uuid, String)>) -> (usize, usize) {
        let db = self.gateway.db.clone();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicUsize::new(0);
        futures_util::stream::iter(users)
            .for_each_concurrent(self.settings.concurrency, |(user, state)| {
                let db = db.clone();
                let (done, failed) = (&done, &failed);
                async move {
                    let ok = self.sync_one(user, &state).await;
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if !ok {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    if let Some(id) = run_id
                        && let Err(e) = work::run_progress(&db, id, !ok).await
                    {
                        tracing::warn!(error = %e, "cannot record sync progress");
                    }
                }
            })
            .await;
        if let Some(id) = run_id
            && let Err(e) = work::finish_run(&db, id, "DONE").await
        {
            tracing::warn!(error = %e, "cannot finish a sync run");
        }
        (done.into_inner(), failed.into_inner())
    }

    async fn sync_one(&self, user: Uuid, state: &str) -> bool {
        let provider = &CLIMATE_FIELD_VIEW;
        let db = &self.gateway.db;
        if state == "PENDING_UPSTREAM" {
            let entries = work::outbox_of(db, user, provider.name)
                .await
                .unwrap_or_default();
            let mut ok = true;
            for e in entries {
                ok &= self.deliver(&e).await;
            }
            return ok;
        }
        for _ in 0..50 {
            match work::claim_one(db, &self.owner, self.settings.lease, user, provider.name).await {
                Ok(work::Claim::Claimed) => {
                    return self.sync_leased(provider, user).await != UserOutcome::Failed;
                }
                Ok(work::Claim::Held) => tokio::time::sleep(Duration::from_millis(200)).await,
                // Deleted or vanished since the run was asked for (e.g. by the worker that
                // held it): nothing left to sync, and nothing failed.
                Ok(work::Claim::Gone) => return true,
                Err(_) => return false,
            }
        }
        false
    }

    /// Page through Leaf's users and adopt every credential of `provider` Leaf holds (audited
    /// as `credential.adopted` by the CLI: `credsync sync --once --discover`).
    pub async fn discover(
        &self,
        provider: &Provider,
        mut progress: impl FnMut(u64, Option<i64>),
    ) -> anyhow::Result<(u64, u64)> {
        let gw = &self.gateway;
        let (mut seen, mut adopted, mut page) = (0u64, 0u64, 0u32);
        loop {
            let (users, total) = gw
                .leaf
                .users(page, 100, "discover")
                .await
                .map_err(|e| anyhow::anyhow!("listing Leaf users: {}", error_text(&e)))?;
            let n = users.len();
            for u in users {
                seen += 1;
                let Some(id) = u
                    .get("id")
                    .and_then(|v| v.as_str())
                    .and_then(|s| Uuid::try_parse(s).ok())
                else {
                    continue;
                };
                let Some(serde_json::Value::Object(cred)) = u.get(provider.user_field).cloned()
                else {
                    continue;
                };
                let local = creds::get(&gw.db, id, provider.name).await?;
                if local.is_some() {
                    continue;
                }
                let row = gw
                    .apply_leaf_answer(
                        provider,
                        id,
                        None,
                        cred,
                        StatusSource::Sync,
                        Actor {
                            sub: CLI_ACTOR,
                            request_id: "discover",
                        },
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("adopting {id}: {e}"))?;
                if row.is_some() {
                    adopted += 1;
                }
            }
            progress(seen, total);
            page += 1;
            if n < 100 || total.is_some_and(|t| i64::from(page) * 100 >= t) {
                return Ok((seen, adopted));
            }
        }
    }
}

/// Leaf answered, but its answer could not be stored (the stored secrets do not open, the
/// database failed): logged for what it is, then retried like an unreadable answer.
fn not_stored(user: Uuid, e: &crate::error::ApiError) -> LeafError {
    // The cause, as the HTTP layer logs an internal error (its answer says only "internal").
    match e {
        crate::error::ApiError::Internal(cause) => {
            tracing::warn!(leaf_user_id = %user, error = %format!("{cause:#}"), "could not store Leaf's answer");
        }
        other => {
            tracing::warn!(leaf_user_id = %user, error = %other, "could not store Leaf's answer")
        }
    }
    LeafError::Unavailable(crate::leaf::Unavailable::Garbage)
}

fn db_unavailable(e: sqlx::Error) -> LeafError {
    tracing::warn!(error = %e, "database error during sync");
    LeafError::Unavailable(crate::leaf::Unavailable::Unreachable)
}

/// A running background worker.
pub struct WorkerHandle {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl WorkerHandle {
    /// Stop after the current unit of work and release this worker's leases.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Start the background worker on the current runtime, once `ready` is set (the database is
/// migrated and the stored data matches the configured keys).
pub fn spawn(syncer: Syncer, ready: std::sync::Arc<std::sync::atomic::AtomicBool>) -> WorkerHandle {
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        while !ready.load(std::sync::atomic::Ordering::Acquire) {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = rx.changed() => return,
            }
        }
        tracing::info!(owner = %syncer.owner, "sync worker started");
        match work::reschedule_beyond(&syncer.gateway.db, syncer.settings.interval).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                credentials = n,
                "brought forward the credentials scheduled beyond the sync interval"
            ),
            Err(e) => tracing::warn!(error = %e, "could not check the sync schedule"),
        }
        let lanes = futures_util::future::join_all(
            (0..syncer.settings.concurrency * LANES_PER_SLOT).map(|_| syncer.lane(rx.clone())),
        );
        let maintenance = async {
            let mut last_prune = std::time::Instant::now() - Duration::from_secs(3600);
            let mut last_compact = std::time::Instant::now();
            loop {
                if *rx.borrow() {
                    break;
                }
                if last_compact.elapsed() > Duration::from_secs(5) {
                    last_compact = std::time::Instant::now();
                    if let Err(e) = crate::store::query::compact_counts(&syncer.gateway.db).await {
                        tracing::debug!(error = %e, "could not compact credential counts");
                    }
                }
                if last_prune.elapsed() > Duration::from_secs(600) {
                    last_prune = std::time::Instant::now();
                    match work::prune_events(
                        &syncer.gateway.db,
                        syncer.settings.events_retention_days,
                        5000,
                    )
                    .await
                    {
                        Ok(n) if n > 0 => tracing::info!(pruned = n, "old events pruned"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "event pruning failed"),
                    }
                    if let Err(e) = crate::store::gauges::check_key_usage(&syncer.gateway.db).await
                    {
                        tracing::warn!(error = %e, "key usage check failed");
                    }
                    if let Err(e) = crate::store::idempotency::prune(&syncer.gateway.db).await {
                        tracing::warn!(error = %e, "idempotency pruning failed");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = rx.changed() => {}
                }
            }
        };
        futures_util::future::join(lanes, maintenance).await;
        if let Err(e) = work::release_all(&syncer.gateway.db, &syncer.owner).await {
            tracing::warn!(error = %e, "could not release leases at shutdown");
        }
        tracing::info!("sync worker stopped");
    });
    WorkerHandle { stop, task }
}

/// `credsync sync --once`.
pub async fn run_once_cli(
    settings: crate::config::Settings,
    users: Vec<Uuid>,
    discover: bool,
) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let app = crate::app::Application::build_gateway(&settings, true).await?;
    let syncer = Syncer::new(app, settings.sync.clone());
    let provider = &CLIMATE_FIELD_VIEW;
    if discover {
        let tty = std::io::stderr().is_terminal();
        let (seen, adopted) = syncer
            .discover(provider, |seen, total| {
                if tty {
                    eprint!(
                        "\rdiscover: {seen}/{} users",
                        total.map_or("?".into(), |t| t.to_string())
                    );
                } else {
                    eprintln!(
                        "discover: {seen}/{} users",
                        total.map_or("?".into(), |t| t.to_string())
                    );
                }
            })
            .await?;
        if tty {
            eprintln!();
        }
        println!("discover: {seen} Leaf users seen, {adopted} credentials adopted");
    }
    let tracked = work::tracked(&syncer.gateway.db, provider.name, &users).await?;
    if !users.is_empty() {
        let known: std::collections::HashSet<Uuid> = tracked.iter().map(|(u, _)| *u).collect();
        let unknown: Vec<String> = users
            .iter()
            .filter(|u| !known.contains(u))
            .map(Uuid::to_string)
            .collect();
        anyhow::ensure!(unknown.is_empty(), "not tracked: {}", unknown.join(", "));
    }
    let total = tracked.len();
    audit::record_logged(
        &syncer.gateway.db,
        &Entry {
            actor: CLI_ACTOR,
            action: "sync.trigger",
            leaf_user_id: None,
            provider: Some(provider.name),
            outcome: Outcome::Success,
            request_id: None,
            detail: Some(&format!("sync --once: {total} credential(s)")),
        },
    )
    .await;
    let (done, failed) = syncer.run(None, tracked).await;
    println!(
        "sync: {total} credentials, {done} attempted, {} synced, {failed} failed",
        done - failed
    );
    anyhow::ensure!(failed == 0, "{failed} credential(s) failed to sync");
    Ok(())
}
