//! The worker's queues: leased due credentials, leased outbox entries, sync runs, retention.
//!
//! Leases are rows claimed with `FOR UPDATE SKIP LOCKED` and stamped with an owner and an
//! expiry, so several replicas split the work, never fetch the same user at once, and take
//! over a dead replica's work once its lease has expired.
use std::time::Duration;

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// A claimed outbox entry.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxEntry {
    pub id: i64,
    pub leaf_user_id: Uuid,
    pub provider: String,
    pub op: String,
    pub attempts: i32,
    pub actor: String,
    pub request_id: Option<String>,
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Claim up to `limit` due outbox entries for `owner`.
pub async fn claim_outbox(
    pool: &PgPool,
    owner: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<OutboxEntry>, sqlx::Error> {
    sqlx::query_as::<_, OutboxEntry>(
        "update outbox set lease_owner = $1, lease_until = now() + make_interval(secs => $2), attempts = attempts + 1
         where id in (
             select id from outbox
             where next_attempt_at <= now() and (lease_until is null or lease_until < now())
             order by next_attempt_at, id limit $3 for update skip locked)
         returning id, leaf_user_id, provider, op, attempts, actor, request_id",
    )
    .bind(owner)
    .bind(secs(lease))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Give an outbox entry back for a later attempt.
pub async fn retry_outbox(
    pool: &PgPool,
    id: i64,
    owner: &str,
    delay: Duration,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update outbox set lease_owner = null, lease_until = null, last_error = $3,
             next_attempt_at = now() + make_interval(secs => $4)
         where id = $1 and lease_owner = $2",
    )
    .bind(id)
    .bind(owner)
    .bind(error)
    .bind(secs(delay))
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn delete_outbox(pool: &PgPool, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("delete from outbox where id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Claim up to `limit` credentials due for a sync.
pub async fn claim_due(
    pool: &PgPool,
    owner: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    sqlx::query_as(
        "update credential set lease_owner = $1, lease_until = now() + make_interval(secs => $2)
         where (leaf_user_id, provider) in (
             select leaf_user_id, provider from credential
             where sync_state = 'SYNCED' and next_sync_at <= now() and (lease_until is null or lease_until < now())
             order by next_sync_at limit $3 for update skip locked)
         returning leaf_user_id, provider",
    )
    .bind(owner)
    .bind(secs(lease))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// What an on-demand sync's claim of one credential found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Leased to us.
    Claimed,
    /// Another worker holds its lease.
    Held,
    /// No longer synced: gone (deleted, or vanished from Leaf) or its delete is pending.
    Gone,
}

/// Claim one SYNCED credential for an on-demand sync.
pub async fn claim_one(
    pool: &PgPool,
    owner: &str,
    lease: Duration,
    user: Uuid,
    provider: &str,
) -> Result<Claim, sqlx::Error> {
    let held: Option<bool> = sqlx::query_scalar(
        "with target as (
             select leaf_user_id, provider,
                    lease_until is null or lease_until < now() or lease_owner = $1 as free
             from credential where leaf_user_id = $3 and provider = $4 and sync_state = 'SYNCED'
             for update),
         claimed as (
             update credential c set lease_owner = $1, lease_until = now() + make_interval(secs => $2)
             from target t where t.free and c.leaf_user_id = t.leaf_user_id and c.provider = t.provider
             returning 1)
         select not free from target",
    )
    .bind(owner)
    .bind(secs(lease))
    .bind(user)
    .bind(provider)
    .fetch_optional(pool)
    .await?;
    Ok(match held {
        None => Claim::Gone,
        Some(true) => Claim::Held,
        Some(false) => Claim::Claimed,
    })
}

/// Release a credential after a sync attempt; it is next due after `next_in`. A successful
/// attempt (Leaf answered) also moves `checked_at`.
pub async fn finish_sync(
    pool: &PgPool,
    owner: &str,
    user: Uuid,
    provider: &str,
    next_in: Duration,
    failed: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update credential set lease_owner = null, lease_until = null,
             next_sync_at = now() + make_interval(secs => $4),
             sync_failures = case when $5 then sync_failures + 1 else 0 end,
             checked_at = case when not $5 and sync_state = 'SYNCED' then greatest(checked_at, now()) else checked_at end
         where leaf_user_id = $2 and provider = $3 and lease_owner = $1",
    )
    .bind(owner)
    .bind(user)
    .bind(provider)
    .bind(secs(next_in))
    .bind(failed)
    .execute(pool)
    .await?;
    Ok(())
}

/// Bring forward the credentials scheduled further out than one `interval` (it was shortened
/// since they were scheduled), spread over the next interval; those backing off from failures
/// keep their schedule. Reads the queue's index: rows due within the interval are not touched.
pub async fn reschedule_beyond(pool: &PgPool, interval: Duration) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "update credential set next_sync_at = now() + random() * make_interval(secs => $1)
         where sync_state = 'SYNCED'
           and next_sync_at > now() + make_interval(secs => $1) and sync_failures = 0",
    )
    .bind(secs(interval))
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Extend a sync lease `owner` still holds; `false` when it holds it no more.
pub async fn renew_sync_lease(
    pool: &PgPool,
    owner: &str,
    user: Uuid,
    provider: &str,
    lease: Duration,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "update credential set lease_until = now() + make_interval(secs => $4)
         where leaf_user_id = $2 and provider = $3 and lease_owner = $1",
    )
    .bind(owner)
    .bind(user)
    .bind(provider)
    .bind(secs(lease))
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn sync_failures(pool: &PgPool, user: Uuid, provider: &str) -> Result<i32, sqlx::Error> {
    Ok(sqlx::query_scalar(
        "select sync_failures from credential where leaf_user_id = $1 and provider = $2",
    )
    .bind(user)
    .bind(provider)
    .fetch_optional(pool)
    .await?
    .unwrap_or(0))
}

/// Release every lease `owner` holds (graceful shutdown).
pub async fn release_all(pool: &PgPool, owner: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update credential set lease_owner = null, lease_until = null where lease_owner = $1",
    )
    .bind(owner)
    .execute(pool)
    .await?;
    sqlx::query("update outbox set lease_owner = null, lease_until = null where lease_owner = $1")
        .bind(owner)
        .execute(pool)
        .await?;
    Ok(())
}

/// Tracked credentials (SYNCED or PENDING_UPSTREAM) among `users`, or all when `users` is empty.
pub async fn tracked(
    pool: &PgPool,
    provider: &str,
    users: &[Uuid],
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    if users.is_empty() {
        sqlx::query_as(
            "select leaf_user_id, sync_state from credential where provider = $1 and sync_state in ('SYNCED', 'PENDING_UPSTREAM')
             order by leaf_user_id",
        )
        .bind(provider)
        .fetch_all(pool)
        .await
    } else {
        sqlx::query_as(
            "select leaf_user_id, sync_state from credential where provider = $1 and sync_state in ('SYNCED', 'PENDING_UPSTREAM')
             and leaf_user_id = any($2) order by leaf_user_id",
        )
        .bind(provider)
        .bind(users)
        .fetch_all(pool)
        .await
    }
}

/// Outbox entries of one user (an on-demand sync of a pending create delivers it).
pub async fn outbox_of(
    pool: &PgPool,
    user: Uuid,
    provider: &str,
) -> Result<Vec<OutboxEntry>, sqlx::Error> {
    sqlx::query_as::<_, OutboxEntry>(
        "select id, leaf_user_id, provider, op, attempts, actor, request_id from outbox where leaf_user_id = $1 and provider = $2 order by id",
    )
    .bind(user)
    .bind(provider)
    .fetch_all(pool)
    .await
}

/// A sync run.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SyncRun {
    pub id: Uuid,
    pub state: String,
    pub users_total: i32,
    pub users_done: i32,
    pub users_failed: i32,
    pub started_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
}

pub async fn create_run(
    pool: &PgPool,
    id: Uuid,
    total: i32,
    requested_by: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("insert into sync_run (id, state, users_total, requested_by) values ($1, 'RUNNING', $2, $3)")
        .bind(id)
        .bind(total)
        .bind(requested_by)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn run_progress(pool: &PgPool, id: Uuid, failed: bool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update sync_run set users_done = users_done + 1, users_failed = users_failed + case when $2 then 1 else 0 end,
             heartbeat_at = now() where id = $1",
    )
    .bind(id)
    .bind(failed)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn heartbeat(pool: &PgPool, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("update sync_run set heartbeat_at = now() where id = $1 and state = 'RUNNING'")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn finish_run(pool: &PgPool, id: Uuid, state: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update sync_run set state = $2, finished_at = now() where id = $1 and state = 'RUNNING'",
    )
    .bind(id)
    .bind(state)
    .execute(pool)
    .await?;
    Ok(())
}

/// A run; one whose owner stopped beating for two minutes is reported (and recorded) FAILED.
pub async fn get_run(pool: &PgPool, id: Uuid) -> Result<Option<SyncRun>, sqlx::Error> {
    sqlx::query(
        "update sync_run set state = 'FAILED', finished_at = now()
         where id = $1 and state = 'RUNNING' and heartbeat_at < now() - interval '2 minutes'",
    )
    .bind(id)
    .execute(pool)
    .await?;
    sqlx::query_as::<_, SyncRun>(
        "select id, state, users_total, users_done, users_failed, started_at, finished_at from sync_run where id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Delete events older than the retention, in small batches (no long locks). Returns the count.
pub async fn prune_events(
    pool: &PgPool,
    retention_days: u32,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(
            "delete from event where ctid = any(array(
                 select ctid from event where created_date < now() - make_interval(days => $1) limit $2))",
        )
        .bind(i32::try_from(retention_days).unwrap_or(i32::MAX))
        .bind(batch)
        .execute(pool)
        .await?
        .rows_affected();
        total += n;
        if n < u64::try_from(batch).unwrap_or(0) {
            return Ok(total);
        }
    }
}
