//! Read-only, cross-user queries behind the `/v1` list routes: credentials, the summary, status
//! history, cached events and the audit trail.
//!
//! Every list is keyset-paginated on its sort key (never `OFFSET`): a page starts strictly
//! after the sort key of the previous page's last row, so rows inserted meanwhile never shift
//! the rows that already existed. Each list function fetches `limit + 1` rows to tell whether
//! another page follows. Dynamic `where` clauses are assembled from constant fragments with
//! every value bound (`QueryBuilder::push_bind`), never formatted into the SQL.
//!
//! The list statements are not kept as named prepared statements (`persistent(false)`): an
//! unnamed statement is planned with the actual values, so e.g. a narrow `changedSince` uses
//! the `changed_at` index instead of a generic plan that walks the primary key over the whole
//! table. The shapes vary with the filters anyway, and planning costs well under a millisecond.
use sqlx::{PgPool, Postgres, QueryBuilder};
use time::OffsetDateTime;
use uuid::Uuid;

/// One page of rows and whether more follow.
#[derive(Debug)]
pub struct Page<T> {
    pub rows: Vec<T>,
    pub more: bool,
}

impl<T> Page<T> {
    fn from_rows(mut rows: Vec<T>, limit: u32) -> Page<T> {
        let limit = limit as usize;
        let more = rows.len() > limit;
        rows.truncate(limit);
        Page { rows, more }
    }
}

fn fetch_limit(limit: u32) -> i64 {
    i64::from(limit) + 1
}

/// Run an assembled list query (ending in `limit fetch_limit(limit)`) unnamed, as one page.
async fn fetch_page<T>(
    mut q: QueryBuilder<Postgres>,
    pool: &PgPool,
    limit: u32,
) -> Result<Page<T>, sqlx::Error>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let rows = q
        .build_query_as::<T>()
        .persistent(false)
        .fetch_all(pool)
        .await?;
    Ok(Page::from_rows(rows, limit))
}

// ---------------------------------------------------------------------------------------------
// credentials

/// A tracked credential as `/v1/credentials` lists it (no secret columns are read).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CredentialItem {
    pub leaf_user_id: Uuid,
    pub provider: String,
    pub status: Option<String>,
    pub checked_at: Option<OffsetDateTime>,
    pub changed_at: Option<OffsetDateTime>,
    pub sync_state: String,
    pub rejection_status: Option<i32>,
    pub rejection_detail: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// The `status` filter of `/v1/credentials`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusFilter {
    /// The status equals this value.
    Is(String),
    /// No status is known yet (`status is null`).
    Unknown,
}

/// Filters of `/v1/credentials` (combined with AND). Rows whose delete is pending never match.
#[derive(Debug, Clone, Default)]
pub struct CredentialFilter {
    pub status: Option<StatusFilter>,
    /// One of `SYNCED`, `PENDING_UPSTREAM`, `REJECTED` (validated by the caller).
    pub sync_state: Option<&'static str>,
    /// `changed_at >= changed_since`.
    pub changed_since: Option<OffsetDateTime>,
}

/// Credentials in `(leaf_user_id, provider)` order, after `after`.
#[tracing::instrument(skip(pool, after))]
pub async fn credentials(
    pool: &PgPool,
    filter: &CredentialFilter,
    after: Option<&(Uuid, String)>,
    limit: u32,
) -> Result<Page<CredentialItem>, sqlx::Error> {
    let mut q = QueryBuilder::<Postgres>::new(
        "select leaf_user_id, provider, status, checked_at, changed_at, sync_state, \
         rejection_status, rejection_detail, created_at, updated_at \
         from credential where sync_state <> 'DELETE_PENDING'",
    );
    match &filter.status {
        Some(StatusFilter::Is(s)) => {
            q.push(" and status = ").push_bind(s.as_str());
        }
        Some(StatusFilter::Unknown) => {
            q.push(" and status is null");
        }
        None => {}
    }
    if let Some(s) = filter.sync_state {
        q.push(" and sync_state = ").push_bind(s);
    }
    if let Some(t) = filter.changed_since {
        q.push(" and changed_at >= ").push_bind(t);
    }
    if let Some((user, provider)) = after {
        q.push(" and (leaf_user_id, provider) > (")
            .push_bind(*user)
            .push(", ")
            .push_bind(provider.as_str())
            .push(")");
    }
    q.push(" order by leaf_user_id, provider limit ")
        .push_bind(fetch_limit(limit));
    fetch_page(q, pool, limit).await
}

/// One group of the summary: how many credentials have this status and sync state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SummaryGroup {
    pub status: Option<String>,
    pub sync_state: String,
    pub count: i64,
    pub oldest_check_at: Option<OffsetDateTime>,
}

/// Counts per (status, sync state) over every credential whose delete is not pending, in one
/// statement (one pass over the table; the groups are few).
#[tracing::instrument(skip_all)]
pub async fn summary(pool: &PgPool) -> Result<Vec<SummaryGroup>, sqlx::Error> {
    // The counts come from the trigger-kept deltas (a few rows once compacted), the oldest
    // check from the partial index on checked_at: milliseconds at 10^6 credentials.
    let (groups, deltas): (Vec<SummaryGroup>, i64) = {
        let mut tx = pool.begin().await?;
        let groups = sqlx::query_as::<_, SummaryGroup>(
            "select nullif(status, '') as status, sync_state, sum(n)::int8 as count,
                    (select min(checked_at) from credential where sync_state <> 'DELETE_PENDING') as oldest_check_at
             from credential_count_delta group by status, sync_state having sum(n) <> 0",
        )
        .fetch_all(&mut *tx)
        .await?;
        let deltas: i64 = sqlx::query_scalar("select count(*) from credential_count_delta")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        (groups, deltas)
    };
    if deltas > 10_000 {
        // No worker folded them lately (an API-only deployment): fold them now, off the answer.
        let pool = pool.clone();
        tokio::spawn(async move {
            if let Err(e) = compact_counts(&pool).await {
                tracing::warn!(error = %e, "could not compact credential counts");
            }
        });
    }
    Ok(groups)
}

/// Fold the summary's count deltas together (the worker calls it every few seconds).
pub async fn compact_counts(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("select credential_count_compact()")
        .execute(pool)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// status history

/// One status transition.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Transition {
    pub id: i64,
    pub provider: String,
    pub from_status: Option<String>,
    pub to_status: String,
    pub at: OffsetDateTime,
    pub source: String,
}

/// A user's status transitions (every provider), newest first (`at desc, id desc`).
#[tracing::instrument(skip(pool, after))]
pub async fn status_history(
    pool: &PgPool,
    user: Uuid,
    after: Option<(OffsetDateTime, i64)>,
    limit: u32,
) -> Result<Page<Transition>, sqlx::Error> {
    let mut q = QueryBuilder::<Postgres>::new(
        "select id, provider, from_status, to_status, at, source from status_history where leaf_user_id = ",
    );
    q.push_bind(user);
    if let Some((at, id)) = after {
        q.push(" and (at, id) < (")
            .push_bind(at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    q.push(" order by at desc, id desc limit ")
        .push_bind(fetch_limit(limit));
    fetch_page(q, pool, limit).await
}

// ---------------------------------------------------------------------------------------------
// events

/// A cached event with the credential it belongs to.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventItem {
    pub leaf_user_id: Uuid,
    pub provider: String,
    pub id: String,
    pub created_date: OffsetDateTime,
    pub status_code: i32,
    pub headers: String,
    pub body: String,
}

/// Filters of `/v1/events` (combined with AND).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub leaf_user_id: Option<Uuid>,
    /// `created_date >= since`.
    pub since: Option<OffsetDateTime>,
    /// `created_date < until`.
    pub until: Option<OffsetDateTime>,
    pub status_code: Option<i32>,
    pub min_status_code: Option<i32>,
}

/// The sort key of an event: event ids are only unique per credential, so the user and the
/// provider complete it.
pub type EventKey = (OffsetDateTime, String, Uuid, String);

/// Cached events across users, newest first (`created_date desc, id desc`, then user and
/// provider descending as the tie-break).
#[tracing::instrument(skip(pool, after))]
pub async fn events(
    pool: &PgPool,
    filter: &EventFilter,
    after: Option<&EventKey>,
    limit: u32,
) -> Result<Page<EventItem>, sqlx::Error> {
    let mut q = QueryBuilder::<Postgres>::new(
        "select leaf_user_id, provider, id, created_date, status_code, headers, body from event where true",
    );
    if let Some(u) = filter.leaf_user_id {
        q.push(" and leaf_user_id = ").push_bind(u);
    }
    if let Some(t) = filter.since {
        q.push(" and created_date >= ").push_bind(t);
    }
    if let Some(t) = filter.until {
        q.push(" and created_date < ").push_bind(t);
    }
    if let Some(c) = filter.status_code {
        q.push(" and status_code = ").push_bind(c);
    }
    if let Some(c) = filter.min_status_code {
        q.push(" and status_code >= ").push_bind(c);
    }
    if let Some((created, id, user, provider)) = after {
        q.push(" and (created_date, id, leaf_user_id, provider) < (")
            .push_bind(*created)
            .push(", ")
            .push_bind(id.as_str())
            .push(", ")
            .push_bind(*user)
            .push(", ")
            .push_bind(provider.as_str())
            .push(")");
    }
    q.push(" order by created_date desc, id desc, leaf_user_id desc, provider desc limit ")
        .push_bind(fetch_limit(limit));
    fetch_page(q, pool, limit).await
}

// ---------------------------------------------------------------------------------------------
// audit

/// One audit entry (the table never holds a secret).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditItem {
    pub id: i64,
    pub at: OffsetDateTime,
    pub actor: String,
    pub action: String,
    pub leaf_user_id: Option<Uuid>,
    pub provider: Option<String>,
    pub outcome: String,
    pub request_id: Option<String>,
    pub detail: Option<String>,
}

/// Filters of `/v1/audit` (combined with AND).
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub leaf_user_id: Option<Uuid>,
    pub actor: Option<String>,
    pub action: Option<String>,
    /// `at >= since`.
    pub since: Option<OffsetDateTime>,
}

/// Audit entries, newest first (`at desc, id desc`).
#[tracing::instrument(skip(pool, after))]
pub async fn audit(
    pool: &PgPool,
    filter: &AuditFilter,
    after: Option<(OffsetDateTime, i64)>,
    limit: u32,
) -> Result<Page<AuditItem>, sqlx::Error> {
    let mut q = QueryBuilder::<Postgres>::new(
        "select id, at, actor, action, leaf_user_id, provider, outcome, request_id, detail from audit where true",
    );
    if let Some(u) = filter.leaf_user_id {
        q.push(" and leaf_user_id = ").push_bind(u);
    }
    if let Some(a) = &filter.actor {
        q.push(" and actor = ").push_bind(a.as_str());
    }
    if let Some(a) = &filter.action {
        q.push(" and action = ").push_bind(a.as_str());
    }
    if let Some(t) = filter.since {
        q.push(" and at >= ").push_bind(t);
    }
    if let Some((at, id)) = after {
        q.push(" and (at, id) < (")
            .push_bind(at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    q.push(" order by at desc, id desc limit ")
        .push_bind(fetch_limit(limit));
    fetch_page(q, pool, limit).await
}
