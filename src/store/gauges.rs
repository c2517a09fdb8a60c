//! Gauges computed from the database at scrape time.
use sqlx::PgPool;

use crate::domain::credential::{REPORTED_STATUSES, UNKNOWN_STATUS};

/// Refresh `credsync_credentials{status}`, `credsync_outbox_pending` and
/// `credsync_sync_lag_seconds`; `interval` is `CREDSYNC_SYNC_INTERVAL_SECS`.
pub async fn refresh(pool: &PgPool, interval: std::time::Duration) -> Result<(), sqlx::Error> {
    // From the summary's trigger-kept count deltas (a handful of rows), not a pass over every
    // credential at each scrape.
    let by_status: Vec<(Option<String>, i64)> = sqlx::query_as(
        "select nullif(status, ''), sum(n)::int8 from credential_count_delta
         group by status having sum(n) <> 0",
    )
    .fetch_all(pool)
    .await?;
    for known in REPORTED_STATUSES {
        metrics::gauge!("credsync_credentials", "status" => known).set(0.0);
    }
    for (status, n) in by_status {
        let label = status.unwrap_or_else(|| UNKNOWN_STATUS.into());
        metrics::gauge!("credsync_credentials", "status" => label).set(n as f64);
    }
    let pending: i64 = sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(pool)
        .await?;
    metrics::gauge!("credsync_outbox_pending").set(pending as f64);
    // How long the most overdue credential has waited past its refresh: due work not picked up
    // yet (the queue's oldest `next_sync_at`), or a credential last refreshed more than an
    // interval ago (its syncs fail and back off, or the interval was shortened). Both are read
    // from an index, not a scan.
    let lag: Option<f64> = sqlx::query_scalar(
        "select greatest(
             (select extract(epoch from now() - min(next_sync_at)) from credential
              where sync_state in ('SYNCED', 'PENDING_UPSTREAM') and next_sync_at < now()),
             (select extract(epoch from now() - min(checked_at)) - $1 from credential
              where sync_state = 'SYNCED'))::float8",
    )
    .bind(interval.as_secs_f64())
    .fetch_one(pool)
    .await?;
    metrics::gauge!("credsync_sync_lag_seconds").set(lag.unwrap_or(0.0).max(0.0));
    check_key_usage(pool).await
}

/// AES-GCM with random 96-bit nonces must stay well below 2^32 encryptions per key.
pub const KEY_ENCRYPTIONS_WARN: i64 = 1 << 30;

/// Export encryptions per key (`credsync_key_encryptions{key_id}`) and warn about keys past
/// 2^30 encryptions (a quarter of AES-GCM's random-nonce limit): time to rotate.
pub async fn check_key_usage(pool: &PgPool) -> Result<(), sqlx::Error> {
    crate::store::credentials::flush_encryption_counts(pool).await?;
    let rows: Vec<(String, i64)> = sqlx::query_as("select key_id, encryptions from encryption_key")
        .fetch_all(pool)
        .await?;
    for (key_id, n) in rows {
        if n >= KEY_ENCRYPTIONS_WARN {
            tracing::warn!(
                key_id,
                encryptions = n,
                "this key has sealed over 2^30 data keys; generate a new key and rotate"
            );
        }
        metrics::gauge!("credsync_key_encryptions", "key_id" => key_id).set(n as f64);
    }
    Ok(())
}
