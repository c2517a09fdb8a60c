//! `credsync keys rotate`: re-wrap every stored data key under the active key.
//!
//! Batched (keyset over the primary key), each batch one short transaction that locks its rows
//! with `FOR UPDATE`, so it is resumable after a crash and safe while `serve` runs: a row that a
//! replica is writing at that moment is waited for, never skipped (skipping it would leave it
//! under the old key while the rotation reports success). Rows written under another key while a
//! pass runs (a replica still sealing with an older active key) are taken by a further pass over
//! what is left. Rows that stay under another key (not configured, retired, or not openable) are
//! counted and reported, never dropped.
use backon::Retryable as _;
use secrecy::SecretString;
use uuid::Uuid;

use crate::crypto::{Binding, Keyring, Sealed};
use crate::store::audit::{self, Entry, Outcome};

/// (leaf_user_id, provider, key_id, wrapped_key, secrets)
type SealedRow = (Uuid, String, String, Vec<u8>, Vec<u8>);

/// Passes over the rows still under another key, after the first pass over everything.
const MAX_PASSES: usize = 4;

/// Rotation totals.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub rewrapped: u64,
    pub already_active: u64,
    /// Rows left under another key: could not be re-wrapped (in the final totals: every row
    /// still not under the active key when the rotation ends).
    pub unreadable: u64,
}

/// Re-wrap everything; returns the totals.
pub async fn rotate(
    pool: &sqlx::PgPool,
    keyring: &Keyring,
    batch: i64,
    mut progress: impl FnMut(&Totals),
) -> anyhow::Result<Totals> {
    let active = keyring.active_id().to_owned();
    let mut totals = Totals::default();
    for pass in 0..MAX_PASSES {
        // The first pass sees every row (and counts those already under the active key); later
        // passes only the rows still under another key.
        let only_stale = pass > 0;
        totals.unreadable = 0;
        rewrap_pass(pool, keyring, batch, only_stale, &mut totals, &mut progress).await?;
        if left_behind(pool, &active).await? <= totals.unreadable {
            break;
        }
        tracing::info!(
            pass = pass + 1,
            "rows under an older key were written during the rotation; another pass"
        );
    }
    totals.unreadable = left_behind(pool, &active).await?;
    Ok(totals)
}

/// Rows whose data key is wrapped by another key than the active one.
async fn left_behind(pool: &sqlx::PgPool, active: &str) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "select count(*) from credential where key_id is not null and key_id <> $1",
    )
    .bind(active)
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// One keyset pass over the credentials (all, or only those under another key).
async fn rewrap_pass(
    pool: &sqlx::PgPool,
    keyring: &Keyring,
    batch: i64,
    only_stale: bool,
    totals: &mut Totals,
    progress: &mut impl FnMut(&Totals),
) -> anyhow::Result<()> {
    let mut after: (Uuid, String) = (Uuid::nil(), String::new());
    loop {
        // A batch Postgres rolled back (it crossed a replica's write) wrote nothing of it: the
        // same rows are selected again.
        let done = (|| rewrap_batch(pool, keyring, batch, only_stale, &after))
            .retry(
                backon::ExponentialBuilder::default()
                    .with_min_delay(std::time::Duration::from_millis(50))
                    .with_max_times(BATCH_RETRIES),
            )
            .when(is_transient)
            .notify(|e, delay| {
                tracing::info!(error = %e, ?delay, "rotation batch rolled back; retrying it");
            })
            .await?;
        let Some(done) = done else { break };
        after = done.last;
        totals.rewrapped += done.rewrapped;
        totals.already_active += done.already_active;
        totals.unreadable += done.unreadable;
        progress(totals);
    }
    Ok(())
}

/// Times a batch is tried again after a deadlock or a serialization failure.
const BATCH_RETRIES: usize = 5;

/// A deadlock or a serialization failure: the transaction was rolled back and may be retried.
fn is_transient(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}

/// What one committed batch did.
struct Batch {
    last: (Uuid, String),
    rewrapped: u64,
    already_active: u64,
    unreadable: u64,
}

/// Re-wrap the next `batch` rows after `after` in one transaction; `None` when none are left.
async fn rewrap_batch(
    pool: &sqlx::PgPool,
    keyring: &Keyring,
    batch: i64,
    only_stale: bool,
    after: &(Uuid, String),
) -> Result<Option<Batch>, sqlx::Error> {
    let active = keyring.active_id();
    let mut tx = pool.begin().await?;
    let rows: Vec<SealedRow> = sqlx::query_as(
        "select leaf_user_id, provider, key_id, wrapped_key, secrets from credential
         where key_id is not null and (leaf_user_id, provider) > ($1, $2)
           and (not $4 or key_id <> $5)
         order by leaf_user_id, provider limit $3 for update",
    )
    .bind(after.0)
    .bind(&after.1)
    .bind(batch)
    .bind(only_stale)
    .bind(active)
    .fetch_all(&mut *tx)
    .await?;
    let Some(last) = rows.last() else {
        return Ok(None);
    };
    let mut done = Batch {
        last: (last.0, last.1.clone()),
        rewrapped: 0,
        already_active: 0,
        unreadable: 0,
    };
    for (user, provider, key_id, wrapped_key, secrets) in rows {
        let sealed = Sealed {
            key_id,
            wrapped_key,
            secrets,
        };
        match keyring.rewrap(
            Binding {
                leaf_user_id: &user,
                provider: &provider,
            },
            &sealed,
        ) {
            Ok(None) => done.already_active += 1,
            Ok(Some(new)) => {
                sqlx::query(
                    "update credential set key_id = $3, wrapped_key = $4 where leaf_user_id = $1 and provider = $2 and key_id = $5",
                )
                .bind(user)
                .bind(&provider)
                .bind(&new.key_id)
                .bind(&new.wrapped_key)
                .bind(&sealed.key_id)
                .execute(&mut *tx)
                .await?;
                done.rewrapped += 1;
            }
            Err(e) => {
                done.unreadable += 1;
                tracing::error!(leaf_user_id = %user, provider, error = %e, "cannot re-wrap this credential");
            }
        }
    }
    sqlx::query("update encryption_key set encryptions = encryptions + $2 where key_id = $1")
        .bind(active)
        .bind(i64::try_from(done.rewrapped).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(done))
}

/// The CLI command.
pub async fn run(url: &SecretString, keyring: &Keyring, batch: i64) -> anyhow::Result<()> {
    let pool = crate::store::pool(url, 2)?;
    crate::store::migrate(&pool).await?;
    let keys: Vec<(String, [u8; 16])> = keyring
        .key_ids()
        .filter_map(|id| keyring.fingerprint(id).map(|fp| (id.to_owned(), fp)))
        .collect();
    let (_, mismatched) = crate::store::credentials::register_keys(&pool, &keys).await?;
    // As `serve` does: an id whose key material is not the one its data was sealed with would
    // only count every row under it as unreadable. (Data under ids no longer configured is
    // reported by the rotation itself.)
    if let Some(refused) = crate::app::mismatched_keys(&mismatched) {
        return Err(refused.into());
    }
    let totals = rotate(&pool, keyring, batch, |t| {
        eprintln!(
            "rotate: {} re-wrapped, {} already under the active key, {} unreadable",
            t.rewrapped, t.already_active, t.unreadable
        );
    })
    .await?;
    let detail = format!(
        "active key {}: {} re-wrapped, {} already active, {} unreadable",
        keyring.active_id(),
        totals.rewrapped,
        totals.already_active,
        totals.unreadable
    );
    audit::record(
        &pool,
        &Entry {
            actor: "cli",
            action: "key.rotate",
            leaf_user_id: None,
            provider: None,
            outcome: if totals.unreadable == 0 {
                Outcome::Success
            } else {
                Outcome::Failure
            },
            request_id: None,
            detail: Some(&detail),
        },
    )
    .await?;
    println!("{detail}");
    anyhow::ensure!(
        totals.unreadable == 0,
        "{} credential(s) are still under another key than the active one (the key is not \
         configured or retired, or a replica wrote with an older active key): see the log, \
         fix and run again",
        totals.unreadable
    );
    Ok(())
}
