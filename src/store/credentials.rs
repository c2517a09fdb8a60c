//! The `credential`, `outbox` and `status_history` tables: local copies, pending upstream work,
//! and status transitions.
use std::sync::Arc;

use sqlx::types::Json;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::crypto::Sealed;
use crate::domain::SyncState;
use crate::store::batch::{BatchOp, Batcher};

/// A stored credential.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CredentialRow {
    pub leaf_user_id: Uuid,
    pub provider: String,
    pub leaf_credential_id: Option<Uuid>,
    pub sync_state: String,
    pub status: Option<String>,
    pub checked_at: Option<OffsetDateTime>,
    pub changed_at: Option<OffsetDateTime>,
    pub created_time: Option<OffsetDateTime>,
    pub public_fields: Json<serde_json::Map<String, serde_json::Value>>,
    pub key_id: Option<String>,
    pub wrapped_key: Option<Vec<u8>>,
    pub secrets: Option<Vec<u8>>,
    pub rejection_status: Option<i32>,
    pub rejection_detail: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

impl CredentialRow {
    pub fn state(&self) -> SyncState {
        SyncState::parse(&self.sync_state).unwrap_or(SyncState::Synced)
    }

    pub fn sealed(&self) -> Option<Sealed> {
        match (&self.key_id, &self.wrapped_key, &self.secrets) {
            (Some(k), Some(w), Some(s)) => Some(Sealed {
                key_id: k.clone(),
                wrapped_key: w.clone(),
                secrets: s.clone(),
            }),
            _ => None,
        }
    }
}

const COLUMNS: &str = "leaf_user_id, provider, leaf_credential_id, sync_state, status, checked_at, changed_at, \
     created_time, public_fields, key_id, wrapped_key, secrets, rejection_status, rejection_detail, created_at, updated_at";

pub async fn get<'e>(
    db: impl sqlx::PgExecutor<'e>,
    user: Uuid,
    provider: &str,
) -> Result<Option<CredentialRow>, sqlx::Error> {
    sqlx::query_as::<_, CredentialRow>(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from credential where leaf_user_id = $1 and provider = $2"
    )))
    .bind(user)
    .bind(provider)
    .fetch_optional(db)
    .await
}

/// What `/status?source=cache` needs of a row, and nothing more.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CachedStatus {
    pub sync_state: String,
    pub status: Option<String>,
    pub checked_at: Option<OffsetDateTime>,
    pub rejection_status: Option<i32>,
    pub rejection_detail: Option<String>,
}

pub async fn cached_status<'e>(
    db: impl sqlx::PgExecutor<'e>,
    user: Uuid,
    provider: &str,
) -> Result<Option<CachedStatus>, sqlx::Error> {
    sqlx::query_as(
        "select sync_state, status, checked_at, rejection_status, rejection_detail
         from credential where leaf_user_id = $1 and provider = $2",
    )
    .bind(user)
    .bind(provider)
    .fetch_optional(db)
    .await
}

pub async fn get_by_leaf_id(
    pool: &PgPool,
    leaf_credential_id: Uuid,
) -> Result<Option<CredentialRow>, sqlx::Error> {
    sqlx::query_as::<_, CredentialRow>(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from credential where leaf_credential_id = $1"
    )))
    .bind(leaf_credential_id)
    .fetch_optional(pool)
    .await
}

/// Why a create could not be stored.
#[derive(Debug)]
pub enum CreateConflict {
    /// A credential exists (SYNCED or PENDING_UPSTREAM).
    Exists,
    /// The previous credential's delete has not reached Leaf yet.
    DeletePending,
}

/// What a create stores before Leaf is called.
pub struct NewCredential {
    pub user: Uuid,
    pub provider: &'static str,
    pub public: serde_json::Map<String, serde_json::Value>,
    pub sealed: Sealed,
    pub actor: String,
    pub request_id: String,
    /// How long the request path owns the outbox entry before the worker may take it.
    pub grace: std::time::Duration,
}

/// Where a create's first write put its two rows: the settle addresses them by tuple id, which
/// stays valid while nothing else writes them (anything that does moves them, and the settle
/// then finds nothing and says so).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Pending {
    row_at: String,
    outbox_at: String,
}

/// Insert the PENDING_UPSTREAM row and its outbox entry in one statement; `None` (nothing
/// written) when a row exists for the user and provider.
async fn insert_fresh<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    new: &NewCredential,
) -> Result<Option<Pending>, sqlx::Error> {
    let pending = sqlx::query_as::<_, Pending>(
        "with ins as (
             insert into credential (leaf_user_id, provider, sync_state, public_fields, key_id, wrapped_key, secrets)
             values ($1, $2, 'PENDING_UPSTREAM', $3, $4, $5, $6) on conflict do nothing
             returning ctid),
         queued as (
             insert into outbox (leaf_user_id, provider, op, next_attempt_at, request_id, actor)
             select $1, $2, 'create', now() + make_interval(secs => $7), $8, $9 from ins
             returning ctid)
         select ins.ctid::text as row_at, queued.ctid::text as outbox_at
         from ins, queued",
    )
    .bind(new.user)
    .bind(new.provider)
    .bind(Json(&new.public))
    .bind(&new.sealed.key_id)
    .bind(&new.sealed.wrapped_key)
    .bind(&new.sealed.secrets)
    .bind(new.grace.as_secs_f64())
    .bind(&new.request_id)
    .bind(&new.actor)
    .fetch_optional(db)
    .await?;
    if pending.is_some() {
        count_encryption(&new.sealed.key_id);
    }
    Ok(pending)
}

/// [`insert_fresh`] for many creates in one statement: `None` for those whose user already
/// has a row.
async fn insert_fresh_many(
    conn: &mut PgConnection,
    items: &[Arc<NewCredential>],
) -> Result<Vec<Option<Pending>>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Inserted {
        leaf_user_id: Uuid,
        provider: String,
        #[sqlx(flatten)]
        pending: Pending,
    }
    let mut inserted: Vec<Inserted> = sqlx::query_as(
        "with input as (
             select * from unnest($1::uuid[], $2::text[], $3::jsonb[], $4::text[], $5::bytea[], $6::bytea[],
                                  $7::float8[], $8::text[], $9::text[])
                 as t(leaf_user_id, provider, public_fields, key_id, wrapped_key, secrets, grace, request_id, actor)),
         ins as (
             insert into credential (leaf_user_id, provider, sync_state, public_fields, key_id, wrapped_key, secrets)
             select leaf_user_id, provider, 'PENDING_UPSTREAM', public_fields, key_id, wrapped_key, secrets from input
             on conflict do nothing
             returning leaf_user_id, provider, ctid),
         queued as (
             insert into outbox (leaf_user_id, provider, op, next_attempt_at, request_id, actor)
             select leaf_user_id, provider, 'create', now() + make_interval(secs => grace), request_id, actor
             from ins join input using (leaf_user_id, provider)
             returning leaf_user_id, provider, ctid)
         select leaf_user_id, provider, ins.ctid::text as row_at, queued.ctid::text as outbox_at
         from ins join queued using (leaf_user_id, provider)",
    )
    .bind(items.iter().map(|n| n.user).collect::<Vec<_>>())
    .bind(items.iter().map(|n| n.provider).collect::<Vec<_>>())
    .bind(items.iter().map(|n| Json(&n.public)).collect::<Vec<_>>())
    .bind(items.iter().map(|n| n.sealed.key_id.as_str()).collect::<Vec<_>>())
    .bind(items.iter().map(|n| n.sealed.wrapped_key.as_slice()).collect::<Vec<_>>())
    .bind(items.iter().map(|n| n.sealed.secrets.as_slice()).collect::<Vec<_>>())
    .bind(items.iter().map(|n| n.grace.as_secs_f64()).collect::<Vec<_>>())
    .bind(items.iter().map(|n| n.request_id.as_str()).collect::<Vec<_>>())
    .bind(items.iter().map(|n| n.actor.as_str()).collect::<Vec<_>>())
    .fetch_all(conn)
    .await?;
    Ok(items
        .iter()
        .map(|n| {
            let at = inserted
                .iter()
                .position(|i| i.leaf_user_id == n.user && i.provider == n.provider)?;
            count_encryption(&n.sealed.key_id);
            Some(inserted.swap_remove(at).pending)
        })
        .collect())
}

/// A row is there for a new credential's user: find out why, replacing a REJECTED one.
async fn insert_after_conflict(
    pool: &PgPool,
    new: &NewCredential,
) -> Result<Result<Pending, CreateConflict>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let existing: Option<String> = sqlx::query_scalar(
        "select sync_state from credential where leaf_user_id = $1 and provider = $2 for update",
    )
    .bind(new.user)
    .bind(new.provider)
    .fetch_optional(&mut *tx)
    .await?;
    match existing.as_deref() {
        Some("REJECTED") => {
            sqlx::query("delete from credential where leaf_user_id = $1 and provider = $2")
                .bind(new.user)
                .bind(new.provider)
                .execute(&mut *tx)
                .await?;
        }
        Some("DELETE_PENDING") => return Ok(Err(CreateConflict::DeletePending)),
        Some(_) => return Ok(Err(CreateConflict::Exists)),
        None => {}
    }
    let Some(pending) = insert_fresh(&mut *tx, new).await? else {
        return Ok(Err(CreateConflict::Exists));
    };
    tx.commit().await?;
    Ok(Ok(pending))
}

/// The create path's two writes, each shared by the creates that reach it at the same time
/// ([`Batcher`]): the pending row with its outbox entry, and the settle after Leaf's 201.
pub struct CreateWrites {
    pool: PgPool,
    inserts: Batcher<InsertPending>,
    settles: Batcher<SettleCreate>,
}

impl CreateWrites {
    pub fn new(pool: PgPool) -> CreateWrites {
        CreateWrites {
            inserts: Batcher::new(InsertPending, pool.clone()),
            settles: Batcher::new(SettleCreate, pool.clone()),
            pool,
        }
    }

    /// Store a new credential as PENDING_UPSTREAM together with its outbox entry, in one
    /// statement when the user has no row. A REJECTED predecessor is replaced.
    pub async fn insert_pending(
        &self,
        new: NewCredential,
    ) -> Result<Result<Pending, CreateConflict>, sqlx::Error> {
        let new = Arc::new(new);
        if let Some(pending) = self.inserts.submit(Arc::clone(&new)).await? {
            return Ok(Ok(pending));
        }
        insert_after_conflict(&self.pool, &new).await
    }

    /// Leaf took a create the request path queued: mark the row SYNCED with Leaf's answer (and
    /// the secrets resealed with what Leaf added, when `settle.sealed`), record the first status,
    /// drop the outbox entry and write the audit entry, in one statement. Only a row still
    /// `PENDING_UPSTREAM` without a status (as [`CreateWrites::insert_pending`] writes it) is
    /// settled here, so the history's `from_status` is null; `None` otherwise (the worker
    /// delivered it, a delete came in between): the caller then takes the general path.
    pub async fn settle_create(
        &self,
        settle: Settle,
    ) -> Result<Option<CredentialRow>, sqlx::Error> {
        self.settles.submit(settle).await
    }
}

struct InsertPending;

impl BatchOp for InsertPending {
    const NAME: &'static str = "create_insert";
    type Item = Arc<NewCredential>;
    type Output = Option<Pending>;
    type Key = (Uuid, &'static str);

    fn key(item: &Self::Item) -> Self::Key {
        (item.user, item.provider)
    }

    async fn run_batch(
        &self,
        conn: &mut PgConnection,
        items: &[Self::Item],
    ) -> Result<Vec<Option<Pending>>, sqlx::Error> {
        insert_fresh_many(conn, items).await
    }

    async fn run_one(
        &self,
        conn: &mut PgConnection,
        item: &Self::Item,
    ) -> Result<Option<Pending>, sqlx::Error> {
        insert_fresh(conn, item).await
    }
}

/// Encryptions counted since the last flush, per key id. Counting in memory keeps a hot row
/// out of every write transaction; a crash loses at most one flush interval of counts.
static PENDING_ENCRYPTIONS: std::sync::Mutex<Vec<(String, i64)>> =
    std::sync::Mutex::new(Vec::new());

fn count_encryption(key_id: &str) {
    let mut pending = PENDING_ENCRYPTIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match pending.iter_mut().find(|(k, _)| k == key_id) {
        Some((_, n)) => *n += 1,
        None => pending.push((key_id.to_owned(), 1)),
    }
}

/// Add the encryptions counted in memory to `encryption_key` (every few seconds and at shutdown).
pub async fn flush_encryption_counts(pool: &PgPool) -> Result<(), sqlx::Error> {
    let pending = std::mem::take(
        &mut *PENDING_ENCRYPTIONS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for (i, (key_id, n)) in pending.iter().enumerate() {
        let r = sqlx::query(
            "update encryption_key set encryptions = encryptions + $2 where key_id = $1",
        )
        .bind(key_id)
        .bind(n)
        .execute(pool)
        .await;
        if let Err(e) = r {
            // Put back what was not written.
            let mut back = PENDING_ENCRYPTIONS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (k, m) in &pending[i..] {
                back.push((k.clone(), *m));
            }
            return Err(e);
        }
    }
    Ok(())
}

/// What Leaf said about a credential, ready to store.
#[derive(Debug)]
pub struct LeafState<'a> {
    pub leaf_credential_id: Option<Uuid>,
    pub status: Option<&'a str>,
    pub created_time: Option<OffsetDateTime>,
    pub public: &'a serde_json::Map<String, serde_json::Value>,
    /// New sealed secrets, when Leaf's answer carried secrets that differ from the stored ones.
    pub sealed: Option<&'a Sealed>,
}

/// Where a status change came from.
#[derive(Debug, Clone, Copy)]
pub enum StatusSource {
    Sync,
    Request,
    Alert,
}

impl StatusSource {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusSource::Sync => "sync",
            StatusSource::Request => "request",
            StatusSource::Alert => "alert",
        }
    }
}

/// The result of storing Leaf's view of a credential.
#[derive(Debug)]
pub struct Refreshed {
    pub row: CredentialRow,
    /// The credential was not tracked before (created directly at Leaf).
    pub adopted: bool,
}

/// Store Leaf's answer for a credential: adopt it when unknown and `adopt` (the caller held no
/// row for it), mark a pending create SYNCED (dropping its outbox entry), refresh
/// status/secrets, and write a history entry on a status change. Rows whose delete is pending
/// or that were rejected are left alone, and so is a row that is gone when the caller held
/// one (deleted meanwhile: never brought back): `None`.
pub async fn store_leaf_state(
    pool: &PgPool,
    user: Uuid,
    provider: &str,
    leaf: &LeafState<'_>,
    source: StatusSource,
    adopt: bool,
) -> Result<Option<Refreshed>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let existing: Option<(String, Option<String>)> = sqlx::query_as(
        "select sync_state, status from credential where leaf_user_id = $1 and provider = $2 for update",
    )
    .bind(user)
    .bind(provider)
    .fetch_optional(&mut *tx)
    .await?;
    let (adopted, old_status) = match &existing {
        Some((state, _)) if state == "DELETE_PENDING" || state == "REJECTED" => return Ok(None),
        Some((_, status)) => (false, status.clone()),
        None if adopt => (true, None),
        None => return Ok(None),
    };
    if adopted {
        let Some(sealed) = leaf.sealed else {
            // Nothing to keep without secrets; a credential Leaf holds without echoing secrets is
            // still tracked for status and events.
            sqlx::query(
                "insert into credential (leaf_user_id, provider, sync_state, public_fields) values ($1, $2, 'SYNCED', $3)",
            )
            .bind(user)
            .bind(provider)
            .bind(Json(leaf.public))
            .execute(&mut *tx)
            .await?;
            return finish_refresh(tx, user, provider, leaf, old_status, adopted, source).await;
        };
        sqlx::query(
            "insert into credential (leaf_user_id, provider, sync_state, public_fields, key_id, wrapped_key, secrets)
             values ($1, $2, 'SYNCED', $3, $4, $5, $6)",
        )
        .bind(user)
        .bind(provider)
        .bind(Json(leaf.public))
        .bind(&sealed.key_id)
        .bind(&sealed.wrapped_key)
        .bind(&sealed.secrets)
        .execute(&mut *tx)
        .await?;
        count_encryption(&sealed.key_id);
    } else if let Some(sealed) = leaf.sealed {
        sqlx::query(
            "update credential set key_id = $3, wrapped_key = $4, secrets = $5
             where leaf_user_id = $1 and provider = $2",
        )
        .bind(user)
        .bind(provider)
        .bind(&sealed.key_id)
        .bind(&sealed.wrapped_key)
        .bind(&sealed.secrets)
        .execute(&mut *tx)
        .await?;
        count_encryption(&sealed.key_id);
    }
    finish_refresh(tx, user, provider, leaf, old_status, adopted, source).await
}

/// Leaf's answer to a create the request path queued, to settle its pending row with
/// ([`CreateWrites::settle_create`]).
pub struct Settle {
    pub user: Uuid,
    pub provider: &'static str,
    pub leaf_credential_id: Option<Uuid>,
    pub status: Option<String>,
    pub created_time: Option<OffsetDateTime>,
    pub public: serde_json::Map<String, serde_json::Value>,
    /// The secrets resealed with what Leaf added to them, when it added something.
    pub sealed: Option<Sealed>,
    pub actor: String,
    pub request_id: String,
    /// Where [`CreateWrites::insert_pending`] put the rows.
    pub pending: Pending,
}

/// The settle's statement for one create (by key: it needs no [`Pending`]).
async fn settle_one(
    conn: &mut PgConnection,
    settle: &Settle,
) -> Result<Option<CredentialRow>, sqlx::Error> {
    let row = sqlx::query_as::<_, CredentialRow>(sqlx::AssertSqlSafe(format!(
        "with upd as (
             update credential c set
                 sync_state = 'SYNCED',
                 leaf_credential_id = coalesce($3, c.leaf_credential_id),
                 status = $4,
                 checked_at = now(),
                 changed_at = case when $4 is not null then now() else c.changed_at end,
                 created_time = coalesce($5, c.created_time),
                 public_fields = c.public_fields || $6,
                 key_id = coalesce($9, c.key_id),
                 wrapped_key = coalesce($10, c.wrapped_key),
                 secrets = coalesce($11, c.secrets),
                 rejection_status = null,
                 rejection_detail = null
             where c.leaf_user_id = $1 and c.provider = $2
               and c.sync_state = 'PENDING_UPSTREAM' and c.status is null
             returning c.*),
         history as (
             insert into status_history (leaf_user_id, provider, from_status, to_status, source)
             select $1, $2, null, $4, 'request' from upd where $4 is not null),
         outbox_done as (
             delete from outbox where leaf_user_id = $1 and provider = $2 and op = 'create'
             and exists (select 1 from upd)),
         audited as (
             insert into audit (actor, action, leaf_user_id, provider, outcome, request_id)
             select $7, 'credential.create', $1, $2, 'success', $8 from upd)
         select {COLUMNS} from upd"
    )))
    .bind(settle.user)
    .bind(settle.provider)
    .bind(settle.leaf_credential_id)
    .bind(settle.status.as_deref())
    .bind(settle.created_time)
    .bind(Json(&settle.public))
    .bind(&settle.actor)
    .bind(&settle.request_id)
    .bind(settle.sealed.as_ref().map(|s| s.key_id.as_str()))
    .bind(settle.sealed.as_ref().map(|s| s.wrapped_key.as_slice()))
    .bind(settle.sealed.as_ref().map(|s| s.secrets.as_slice()))
    .fetch_optional(conn)
    .await?;
    if let (Some(_), Some(sealed)) = (&row, &settle.sealed) {
        count_encryption(&sealed.key_id);
    }
    Ok(row)
}

/// The planner settings of [`settle_many`]'s transaction (public for the plan test).
#[doc(hidden)]
pub const SETTLE_MANY_SETTINGS: &str = "set local enable_seqscan = off; set local enable_bitmapscan = off; \
     set local enable_indexscan = off";

/// [`settle_many`]'s statement (public for the plan test).
#[doc(hidden)]
pub fn settle_many_sql() -> String {
    format!(
        "with input as (
             select * from unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::timestamptz[], $6::jsonb[],
                                  $7::text[], $8::text[], $9::text[], $10::bytea[], $11::bytea[], $12::text[], $13::text[])
                 as t(leaf_user_id, provider, leaf_credential_id, status, created_time, public_fields,
                      actor, request_id, key_id, wrapped_key, secrets, row_at, outbox_at)),
         upd as (
             update credential c set
                 sync_state = 'SYNCED',
                 leaf_credential_id = coalesce(i.leaf_credential_id, c.leaf_credential_id),
                 status = i.status,
                 checked_at = now(),
                 changed_at = case when i.status is not null then now() else c.changed_at end,
                 created_time = coalesce(i.created_time, c.created_time),
                 public_fields = c.public_fields || i.public_fields,
                 key_id = coalesce(i.key_id, c.key_id),
                 wrapped_key = coalesce(i.wrapped_key, c.wrapped_key),
                 secrets = coalesce(i.secrets, c.secrets),
                 rejection_status = null,
                 rejection_detail = null
             from input i
             where c.ctid = any($12::tid[]) and c.ctid = i.row_at::tid
               and c.leaf_user_id = i.leaf_user_id and c.provider = i.provider
               and c.sync_state = 'PENDING_UPSTREAM' and c.status is null
             returning c.*, i.actor, i.request_id, i.outbox_at),
         history as (
             insert into status_history (leaf_user_id, provider, from_status, to_status, source)
             select leaf_user_id, provider, null, status, 'request' from upd where status is not null),
         outbox_done as (
             delete from outbox o using upd
             where o.ctid = any($13::tid[]) and o.ctid = upd.outbox_at::tid
               and o.leaf_user_id = upd.leaf_user_id and o.provider = upd.provider and o.op = 'create'
             returning o.leaf_user_id, o.provider),
         audited as (
             insert into audit (actor, action, leaf_user_id, provider, outcome, request_id)
             select actor, 'credential.create', leaf_user_id, provider, 'success', request_id from upd)
         select {COLUMNS},
                exists (select 1 from outbox_done d where d.leaf_user_id = upd.leaf_user_id and d.provider = upd.provider)
                    as outbox_done
         from upd"
    )
}

/// [`settle_one`] for many creates in one statement. The two rows of each are addressed by
/// tuple id ([`Pending`]): a queue table such as `outbox` is mostly dead tuples under load, and
/// a join on keys there is planned as a scan of all of them. A row that moved since the insert
/// is not settled here (`None`, as for a row no longer pending); an outbox entry that moved is
/// deleted by key afterwards.
async fn settle_many(
    conn: &mut PgConnection,
    items: &[Settle],
) -> Result<Vec<Option<CredentialRow>>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Settled {
        #[sqlx(flatten)]
        row: CredentialRow,
        outbox_done: bool,
    }
    let sealed = |f: fn(&Sealed) -> &[u8]| -> Vec<Option<&[u8]>> {
        items.iter().map(|s| s.sealed.as_ref().map(f)).collect()
    };
    // A connection plans this statement once and keeps the plan. Planned while the tables are
    // small (a fresh database), a scan of the table or of the `sync_state` and `status` indexes
    // looks cheapest, and it stays the plan as they grow (and fill with dead tuples, the
    // outbox above all): creates/s halved within seconds in the benchmark. Tuple ids are the
    // way in at any size, so the other ways are ruled out for this transaction.
    let mut tx = conn
        .begin_with(sqlx::AssertSqlSafe(format!(
            "begin; {SETTLE_MANY_SETTINGS}"
        )))
        .await?;
    let mut settled = sqlx::query_as::<_, Settled>(sqlx::AssertSqlSafe(settle_many_sql()))
        .bind(items.iter().map(|s| s.user).collect::<Vec<_>>())
        .bind(items.iter().map(|s| s.provider).collect::<Vec<_>>())
        .bind(
            items
                .iter()
                .map(|s| s.leaf_credential_id)
                .collect::<Vec<_>>(),
        )
        .bind(
            items
                .iter()
                .map(|s| s.status.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(items.iter().map(|s| s.created_time).collect::<Vec<_>>())
        .bind(items.iter().map(|s| Json(&s.public)).collect::<Vec<_>>())
        .bind(items.iter().map(|s| s.actor.as_str()).collect::<Vec<_>>())
        .bind(
            items
                .iter()
                .map(|s| s.request_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            items
                .iter()
                .map(|s| s.sealed.as_ref().map(|s| s.key_id.as_str()))
                .collect::<Vec<_>>(),
        )
        .bind(sealed(|s| &s.wrapped_key))
        .bind(sealed(|s| &s.secrets))
        .bind(
            items
                .iter()
                .map(|s| s.pending.row_at.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            items
                .iter()
                .map(|s| s.pending.outbox_at.as_str())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    // Rare (a worker leased the entry meanwhile), and a leftover entry of a SYNCED credential is
    // dropped by the worker anyway: deleted by key after the commit, with the planner's choice.
    for moved in settled.iter().filter(|s| !s.outbox_done) {
        delete_create_entry(&mut *conn, moved.row.leaf_user_id, &moved.row.provider).await?;
    }
    Ok(items
        .iter()
        .map(|s| {
            let at = settled
                .iter()
                .position(|r| r.row.leaf_user_id == s.user && r.row.provider == s.provider)?;
            if let Some(sealed) = &s.sealed {
                count_encryption(&sealed.key_id);
            }
            Some(settled.swap_remove(at).row)
        })
        .collect())
}

/// Drop a user's create entry from the outbox: Leaf has the credential.
async fn delete_create_entry<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    user: Uuid,
    provider: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("delete from outbox where leaf_user_id = $1 and provider = $2 and op = 'create'")
        .bind(user)
        .bind(provider)
        .execute(db)
        .await?;
    Ok(())
}

struct SettleCreate;

impl BatchOp for SettleCreate {
    const NAME: &'static str = "create_settle";
    type Item = Settle;
    type Output = Option<CredentialRow>;
    type Key = (Uuid, &'static str);

    fn key(item: &Settle) -> Self::Key {
        (item.user, item.provider)
    }

    async fn run_batch(
        &self,
        conn: &mut PgConnection,
        items: &[Settle],
    ) -> Result<Vec<Option<CredentialRow>>, sqlx::Error> {
        settle_many(conn, items).await
    }

    async fn run_one(
        &self,
        conn: &mut PgConnection,
        item: &Settle,
    ) -> Result<Option<CredentialRow>, sqlx::Error> {
        settle_one(conn, item).await
    }
}

async fn finish_refresh(
    mut tx: Transaction<'_, Postgres>,
    user: Uuid,
    provider: &str,
    leaf: &LeafState<'_>,
    old_status: Option<String>,
    adopted: bool,
    source: StatusSource,
) -> Result<Option<Refreshed>, sqlx::Error> {
    let changed = leaf.status.is_some() && leaf.status != old_status.as_deref();
    let row = sqlx::query_as::<_, CredentialRow>(sqlx::AssertSqlSafe(format!(
        "update credential set
            sync_state = 'SYNCED',
            leaf_credential_id = coalesce($3, leaf_credential_id),
            status = coalesce($4, status),
            checked_at = now(),
            changed_at = case when $5 then now() else changed_at end,
            created_time = coalesce($6, created_time),
            public_fields = public_fields || $7,
            rejection_status = null,
            rejection_detail = null
         where leaf_user_id = $1 and provider = $2
         returning {COLUMNS}"
    )))
    .bind(user)
    .bind(provider)
    .bind(leaf.leaf_credential_id)
    .bind(leaf.status)
    .bind(changed)
    .bind(leaf.created_time)
    .bind(Json(leaf.public))
    .fetch_one(&mut *tx)
    .await?;
    if let (true, Some(to)) = (changed, leaf.status) {
        insert_history(&mut tx, user, provider, old_status.as_deref(), to, source).await?;
    }
    delete_create_entry(&mut *tx, user, provider).await?;
    tx.commit().await?;
    Ok(Some(Refreshed { row, adopted }))
}

async fn insert_history(
    tx: &mut Transaction<'_, Postgres>,
    user: Uuid,
    provider: &str,
    from: Option<&str>,
    to: &str,
    source: StatusSource,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into status_history (leaf_user_id, provider, from_status, to_status, source) values ($1, $2, $3, $4, $5)",
    )
    .bind(user)
    .bind(provider)
    .bind(from)
    .bind(to)
    .bind(source.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Set `checked_at` of many SYNCED credentials in one statement (the request path's touches,
/// batched). Rows are locked in key order, so two replicas flushing at once cannot deadlock.
pub async fn touch_checked_many(
    pool: &PgPool,
    touches: &[(Uuid, &str, OffsetDateTime)],
) -> Result<(), sqlx::Error> {
    let mut sorted: Vec<_> = touches.iter().collect();
    sorted.sort_unstable_by_key(|(u, p, _)| (*u, *p));
    let users: Vec<Uuid> = sorted.iter().map(|t| t.0).collect();
    let providers: Vec<&str> = sorted.iter().map(|t| t.1).collect();
    let ats: Vec<OffsetDateTime> = sorted.iter().map(|t| t.2).collect();
    // The rows are locked in primary-key order first, as `keys rotate` locks its batches: an
    // update joined in whatever order the planner picks (a hash join over a small table scans
    // it in physical order) could deadlock with a rotation batch.
    sqlx::query(
        "with locked as materialized (
             select c.leaf_user_id, c.provider from credential c
             join unnest($1::uuid[], $2::text[]) as k(u, p) on c.leaf_user_id = k.u and c.provider = k.p
             where c.sync_state = 'SYNCED'
             order by c.leaf_user_id, c.provider
             for update of c)
         update credential c set checked_at = greatest(c.checked_at, t.at)
         from unnest($1::uuid[], $2::text[], $3::timestamptz[]) as t(u, p, at), locked l
         where c.leaf_user_id = t.u and c.provider = t.p
           and l.leaf_user_id = t.u and l.provider = t.p",
    )
    .bind(users)
    .bind(providers)
    .bind(ats)
    .execute(pool)
    .await?;
    Ok(())
}

/// Set a credential's status (alerts): returns whether it changed. Only SYNCED rows change.
pub async fn set_status(
    pool: &PgPool,
    user: Uuid,
    provider: &str,
    status: &str,
    source: StatusSource,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let old: Option<(Option<String>,)> = sqlx::query_as(
        "select status from credential where leaf_user_id = $1 and provider = $2 and sync_state = 'SYNCED' for update",
    )
    .bind(user)
    .bind(provider)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((old,)) = old else { return Ok(false) };
    if old.as_deref() == Some(status) {
        return Ok(false);
    }
    sqlx::query(
        "update credential set status = $3, checked_at = now(), changed_at = now() where leaf_user_id = $1 and provider = $2",
    )
    .bind(user)
    .bind(provider)
    .bind(status)
    .execute(&mut *tx)
    .await?;
    insert_history(&mut tx, user, provider, old.as_deref(), status, source).await?;
    tx.commit().await?;
    Ok(true)
}

/// Remove a credential that Leaf refused to create (synchronous path): the row and its outbox.
pub async fn remove(pool: &PgPool, user: Uuid, provider: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("delete from outbox where leaf_user_id = $1 and provider = $2")
        .bind(user)
        .bind(provider)
        .execute(&mut *tx)
        .await?;
    sqlx::query("delete from credential where leaf_user_id = $1 and provider = $2")
        .bind(user)
        .bind(provider)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Mark a pending create as rejected by Leaf: the secret is destroyed, the reason kept.
pub async fn reject(
    pool: &PgPool,
    user: Uuid,
    provider: &str,
    status: u16,
    detail: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "update credential set sync_state = 'REJECTED', key_id = null, wrapped_key = null, secrets = null,
             rejection_status = $3, rejection_detail = $4
         where leaf_user_id = $1 and provider = $2 and sync_state = 'PENDING_UPSTREAM'",
    )
    .bind(user)
    .bind(provider)
    .bind(i32::from(status))
    .bind(detail)
    .execute(&mut *tx)
    .await?;
    delete_create_entry(&mut *tx, user, provider).await?;
    tx.commit().await
}

/// Start a delete: crypto-shred the local secret at once and queue the upstream delete, in one
/// transaction. Returns the state the credential had (`None` when nothing was stored) and the
/// sealed secrets it held until now (only ever opened to mask them in Leaf's refusal).
pub async fn begin_delete(
    pool: &PgPool,
    user: Uuid,
    provider: &str,
    actor: &str,
    request_id: &str,
    grace: std::time::Duration,
) -> Result<Option<(SyncState, Option<Sealed>)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    #[derive(sqlx::FromRow)]
    struct Held {
        sync_state: String,
        key_id: Option<String>,
        wrapped_key: Option<Vec<u8>>,
        secrets: Option<Vec<u8>>,
    }
    let existing: Option<Held> = sqlx::query_as(
        "select sync_state, key_id, wrapped_key, secrets from credential
         where leaf_user_id = $1 and provider = $2 for update",
    )
    .bind(user)
    .bind(provider)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(held) = existing else {
        return Ok(None);
    };
    let state = SyncState::parse(&held.sync_state).unwrap_or(SyncState::Synced);
    let sealed = match (held.key_id, held.wrapped_key, held.secrets) {
        (Some(key_id), Some(wrapped_key), Some(secrets)) => Some(Sealed {
            key_id,
            wrapped_key,
            secrets,
        }),
        _ => None,
    };
    sqlx::query(
        "update credential set sync_state = 'DELETE_PENDING', key_id = null, wrapped_key = null, secrets = null
         where leaf_user_id = $1 and provider = $2",
    )
    .bind(user)
    .bind(provider)
    .execute(&mut *tx)
    .await?;
    // The cached status history and events go with the secret, whatever Leaf answers next
    // (SPEC §5): a delete still pending at Leaf shows none of them either.
    forget_kept(&mut tx, user, provider).await?;
    sqlx::query(
        "insert into outbox (leaf_user_id, provider, op, next_attempt_at, request_id, actor)
         values ($1, $2, 'delete', now() + make_interval(secs => $3), $4, $5)",
    )
    .bind(user)
    .bind(provider)
    .bind(grace.as_secs_f64())
    .bind(request_id)
    .bind(actor)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some((state, sealed)))
}

/// Leaf created (or may still create) a credential whose record was deleted while the create
/// was on its way (a DELETE answered meanwhile): queue the delete of Leaf's copy, due after
/// `delay`, as a pending delete, unless the user has a record again by now (a pending delete
/// has its own entry; a new create is the new caller's). Returns whether a delete was queued.
pub async fn queue_orphan_delete(
    pool: &PgPool,
    user: Uuid,
    provider: &str,
    actor: &str,
    request_id: &str,
    delay: std::time::Duration,
) -> Result<bool, sqlx::Error> {
    let queued: Option<i32> = sqlx::query_scalar(
        "with held as (
             insert into credential (leaf_user_id, provider, sync_state) values ($1, $2, 'DELETE_PENDING')
             on conflict (leaf_user_id, provider) do nothing returning 1)
         insert into outbox (leaf_user_id, provider, op, next_attempt_at, request_id, actor)
         select $1, $2, 'delete', now() + make_interval(secs => $5), $3, $4 from held returning 1",
    )
    .bind(user)
    .bind(provider)
    .bind(request_id)
    .bind(actor)
    .bind(delay.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(queued.is_some())
}

/// Record a delete Leaf has not taken yet for a credential credsync did not hold (the worker
/// tries it once Leaf's `Retry-After`, if any, has passed).
pub async fn queue_delete(
    pool: &PgPool,
    user: Uuid,
    provider: &str,
    actor: &str,
    request_id: &str,
    retry_after: Option<u64>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "insert into credential (leaf_user_id, provider, sync_state) values ($1, $2, 'DELETE_PENDING')
         on conflict (leaf_user_id, provider) do update set sync_state = 'DELETE_PENDING',
             key_id = null, wrapped_key = null, secrets = null",
    )
    .bind(user)
    .bind(provider)
    .execute(&mut *tx)
    .await?;
    let queued: Option<i64> = sqlx::query_scalar(
        "select id from outbox where leaf_user_id = $1 and provider = $2 and op = 'delete'",
    )
    .bind(user)
    .bind(provider)
    .fetch_optional(&mut *tx)
    .await?;
    if queued.is_none() {
        sqlx::query(
            "insert into outbox (leaf_user_id, provider, op, request_id, actor, next_attempt_at)
             values ($1, $2, 'delete', $3, $4, now() + make_interval(secs => $5))",
        )
        .bind(user)
        .bind(provider)
        .bind(request_id)
        .bind(actor)
        .bind(not_before_secs(retry_after))
        .execute(&mut *tx)
        .await?;
    } else {
        release_outbox_now(&mut tx, user, provider, retry_after).await?;
    }
    tx.commit().await
}

/// Seconds from now to the first attempt the worker may make: Leaf's `Retry-After`, else 0.
fn not_before_secs(retry_after: Option<u64>) -> f64 {
    retry_after.map_or(0.0, |s| s as f64)
}

async fn release_outbox_now(
    tx: &mut Transaction<'_, Postgres>,
    user: Uuid,
    provider: &str,
    retry_after: Option<u64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update outbox set next_attempt_at = now() + make_interval(secs => $3)
         where leaf_user_id = $1 and provider = $2",
    )
    .bind(user)
    .bind(provider)
    .bind(not_before_secs(retry_after))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Hand the user's outbox entries to the worker (the request path gave up on Leaf): at once,
/// or once Leaf's `Retry-After` has passed.
pub async fn release_outbox(
    pool: &PgPool,
    user: Uuid,
    provider: &str,
    retry_after: Option<u64>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    release_outbox_now(&mut tx, user, provider, retry_after).await?;
    tx.commit().await
}

/// Finish a delete: the credential, its cached status history and events, and its outbox go.
/// The audit trail stays.
pub async fn purge(pool: &PgPool, user: Uuid, provider: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    forget_kept(&mut tx, user, provider).await?;
    sqlx::query("delete from credential where leaf_user_id = $1 and provider = $2")
        .bind(user)
        .bind(provider)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Delete what is kept beside a user's credential of `provider`: its outbox entries, its status
/// history and its cached events (for a delete, [`begin_delete`] and [`purge`]).
async fn forget_kept(
    conn: &mut PgConnection,
    user: Uuid,
    provider: &str,
) -> Result<(), sqlx::Error> {
    for sql in [
        "delete from outbox where leaf_user_id = $1 and provider = $2",
        "delete from status_history where leaf_user_id = $1 and provider = $2",
        "delete from event where leaf_user_id = $1 and provider = $2",
    ] {
        sqlx::query(sql)
            .bind(user)
            .bind(provider)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Record the key-encryption keys this process holds: an unknown id gets its fingerprint
/// stored; a known id must have the same fingerprint. Returns the ids referenced by stored
/// credentials that are not configured.
pub async fn register_keys(
    pool: &PgPool,
    keys: &[(String, [u8; 16])],
) -> Result<(Vec<String>, Vec<String>), sqlx::Error> {
    let mut mismatched = Vec::new();
    for (id, fp) in keys {
        let stored: Option<Vec<u8>> = sqlx::query_scalar(
            "insert into encryption_key (key_id, fingerprint) values ($1, $2)
             on conflict (key_id) do update set key_id = excluded.key_id returning fingerprint",
        )
        .bind(id)
        .bind(&fp[..])
        .fetch_optional(pool)
        .await?;
        if stored.is_some_and(|s| !crate::crypto::ct_eq(&s, &fp[..])) {
            mismatched.push(id.clone());
        }
    }
    let configured: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
    let missing: Vec<String> = sqlx::query_scalar(
        "select distinct key_id from credential where key_id is not null and not (key_id = any($1))",
    )
    .bind(&configured)
    .fetch_all(pool)
    .await?;
    Ok((missing, mismatched))
}
