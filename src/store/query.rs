//! Read-only, cross-user queries behind the `/v1` list routes: credentials, the summary, status
//! history, cached events and the audit trail.
//!
//! Every list is keyset-paginated on its sort key (never `OFFSET`): a page starts strictly
//! after the sort key of the previous page's last row, so rows inserted meanwhile never shift
//! the rows that already existed. Each list function fetches `limit + 1` rows to tell whether
//! another page follows. Dynamic `where` clauses are assembled by [`List`] from constant
//! fragments; values are bound, never formatted into the SQL, except two kinds that cannot
//! carry SQL: an integer, and a constant of a closed set (a known status, a sync state).
//!
//! Why those two are written in: a statement whose plan cannot depend on its bound values
//! (only keys remain bound: a user, a cursor) is kept prepared on its connection, so Postgres
//! parses and plans it once per connection instead of on every request (at 10^6 credentials
//! planning a page cost about as much as running it, plus a round trip). A statement with a
//! value the best plan depends on (a time bound, a free-form string) is sent unnamed instead
//! and planned with the actual values each time: e.g. a narrow `changedSince` then uses the
//! `changed_at` index rather than a generic plan that walks the primary key over the table.
use futures_util::TryStreamExt;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, QueryBuilder, Row};

use crate::domain::SyncState;
use crate::domain::credential::LEAF_STATUSES;
use time::OffsetDateTime;
use uuid::Uuid;

/// How a page ended: its last row (whose sort key makes the next page's cursor) and whether
/// more rows follow. The rows themselves went to the caller one by one, as they arrived.
#[derive(Debug)]
pub struct PageEnd<T> {
    pub last: Option<T>,
    pub more: bool,
}

fn fetch_limit(limit: u32) -> i64 {
    i64::from(limit) + 1
}

/// A list statement being assembled (see the module documentation for what is bound).
struct List {
    q: QueryBuilder<Postgres>,
    /// A bound value can change the best plan: send the statement unnamed, planned each time.
    replan: bool,
}

impl List {
    fn new(select: &'static str) -> List {
        List {
            q: QueryBuilder::new(select),
            replan: false,
        }
    }

    fn sql(&mut self, fragment: &'static str) -> &mut List {
        self.q.push(fragment);
        self
    }

    /// A key (a user, a cursor position): bound; the plan does not depend on it.
    fn key<'t, T>(&mut self, value: T) -> &mut List
    where
        T: sqlx::Encode<'t, Postgres> + sqlx::Type<Postgres>,
    {
        self.q.push_bind(value);
        self
    }

    /// A value the best plan depends on (a time bound, a free-form string): bound, and the
    /// statement is planned with it.
    fn value<'t, T>(&mut self, value: T) -> &mut List
    where
        T: sqlx::Encode<'t, Postgres> + sqlx::Type<Postgres>,
    {
        self.replan = true;
        self.q.push_bind(value);
        self
    }

    /// One of credsync's own constants (capitals and underscores), written in as a literal.
    fn constant(&mut self, value: &'static str) -> &mut List {
        assert!(
            value.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
            "not a constant: {value:?}"
        );
        self.q.push("'").push(value).push("'");
        self
    }

    /// A string compared with the column: written in when it is one of `known`, bound as a
    /// plan-deciding value otherwise.
    fn text(&mut self, value: &str, known: &[&'static str]) -> &mut List {
        match known.iter().find(|k| **k == value) {
            Some(k) => self.constant(k),
            None => self.value(value.to_owned()),
        }
    }

    fn int(&mut self, value: i64) -> &mut List {
        self.q.push(value);
        self
    }

    /// Order newest first by `(at, id)` and, given the previous page's last key, start after it.
    fn newest_first(&mut self, after: Option<(OffsetDateTime, i64)>) -> &mut List {
        if let Some((at, id)) = after {
            self.sql(" and (at, id) < (")
                .key(at)
                .sql(", ")
                .key(id)
                .sql(")");
        }
        self.sql(" order by at desc, id desc")
    }

    /// Run it (with `limit fetch_limit(limit)` appended) as one page, handing each of its
    /// rows to `each` as it arrives: the caller writes a row out while Postgres still sends the
    /// next ones. The extra row only tells that more follow.
    async fn page<T: ListRow>(
        mut self,
        pool: &PgPool,
        limit: u32,
        mut each: impl FnMut(&T),
    ) -> Result<PageEnd<T>, sqlx::Error> {
        self.q.push(" limit ").push(fetch_limit(limit));
        let mut rows = self.q.build().persistent(!self.replan).fetch(pool);
        let mut end = PageEnd {
            last: None,
            more: false,
        };
        let mut n = 0;
        while let Some(row) = rows.try_next().await? {
            if n == limit {
                end.more = true;
                continue;
            }
            if n == 0 {
                T::check_columns(&row)?;
            }
            let row = T::decode(&row)?;
            each(&row);
            end.last = Some(row);
            n += 1;
        }
        Ok(end)
    }
}

/// A row of a list page, read by position.
///
/// `derive(FromRow)` looks every column up by name and checks its type in every row; with the
/// timestamps that was a fifth of a page's CPU. The columns of a result are the same for all of
/// its rows, so [`List::page`] checks their types once, on the first row, and then decodes each
/// row by position without checking again.
trait ListRow: Sized {
    /// Fails unless column `i` has a type field `i` decodes, for every field.
    fn check_columns(r: &PgRow) -> Result<(), sqlx::Error>;
    /// Decode column `i` into field `i` (of a result whose columns passed the check).
    fn decode(r: &PgRow) -> Result<Self, sqlx::Error>;
}

fn check_column<T: sqlx::Type<Postgres>>(r: &PgRow, i: usize) -> Result<(), sqlx::Error> {
    use sqlx::{Column as _, TypeInfo as _};
    let column = r.try_column(i)?;
    if T::compatible(column.type_info()) {
        return Ok(());
    }
    Err(sqlx::Error::ColumnDecode {
        index: format!("{:?}", column.name()),
        source: format!(
            "a column of type {} cannot be read as {}",
            column.type_info().name(),
            std::any::type_name::<T>()
        )
        .into(),
    })
}

/// A list row: the struct, its select list (`Self::SELECT`, the fields' names in their order,
/// then `from` the table) and its [`ListRow`] impl, which reads column `i` into field `i`.
macro_rules! list_row {
    (
        $(#[$meta:meta])*
        pub struct $name:ident from $table:literal {
            pub $first:ident: $first_ty:ty,
            $(pub $field:ident: $ty:ty,)*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $name {
            pub $first: $first_ty,
            $(pub $field: $ty,)*
        }

        impl $name {
            const SELECT: &'static str = concat!(
                "select ", stringify!($first), $(", ", stringify!($field),)* " from ", $table
            );
        }

        impl ListRow for $name {
            #[allow(unused_assignments)]
            fn check_columns(r: &PgRow) -> Result<(), sqlx::Error> {
                let mut i = 0;
                check_column::<$first_ty>(r, i)?;
                $(
                    i += 1;
                    check_column::<$ty>(r, i)?;
                )*
                Ok(())
            }

            #[allow(unused_assignments)]
            fn decode(r: &PgRow) -> Result<Self, sqlx::Error> {
                let mut i = 0;
                let $first = r.try_get_unchecked(i)?;
                $(
                    i += 1;
                    let $field = r.try_get_unchecked(i)?;
                )*
                Ok($name { $first, $($field,)* })
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// credentials

list_row! {
    /// A tracked credential as `/v1/credentials` lists it (no secret columns are read).
    pub struct CredentialItem from "credential" {
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
    pub sync_state: Option<SyncState>,
    /// `changed_at >= changed_since`.
    pub changed_since: Option<OffsetDateTime>,
}

/// Credentials in `(leaf_user_id, provider)` order, after `after`.
#[tracing::instrument(skip(pool, after, each))]
pub async fn credentials(
    pool: &PgPool,
    filter: &CredentialFilter,
    after: Option<&(Uuid, String)>,
    limit: u32,
    each: impl FnMut(&CredentialItem),
) -> Result<PageEnd<CredentialItem>, sqlx::Error> {
    credentials_query(filter, after)
        .page(pool, limit, each)
        .await
}

fn credentials_query(filter: &CredentialFilter, after: Option<&(Uuid, String)>) -> List {
    let mut q = List::new(CredentialItem::SELECT);
    q.sql(" where sync_state <> 'DELETE_PENDING'");
    match &filter.status {
        Some(StatusFilter::Is(s)) => {
            q.sql(" and status = ").text(s, &LEAF_STATUSES);
        }
        Some(StatusFilter::Unknown) => {
            q.sql(" and status is null");
        }
        None => {}
    }
    if let Some(s) = filter.sync_state {
        q.sql(" and sync_state = ").constant(s.as_str());
    }
    if let Some(t) = filter.changed_since {
        q.sql(" and changed_at >= ").value(t);
    }
    if let Some((user, provider)) = after {
        q.sql(" and (leaf_user_id, provider) > (")
            .key(*user)
            .sql(", ")
            .key(provider.as_str())
            .sql(")");
    }
    q.sql(" order by leaf_user_id, provider");
    q
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

list_row! {
    /// One status transition.
    pub struct Transition from "status_history" {
        pub id: i64,
        pub provider: String,
        pub from_status: Option<String>,
        pub to_status: String,
        pub at: OffsetDateTime,
        pub source: String,
    }
}

/// A user's status transitions (every provider), newest first (`at desc, id desc`).
#[tracing::instrument(skip(pool, after, each))]
pub async fn status_history(
    pool: &PgPool,
    user: Uuid,
    after: Option<(OffsetDateTime, i64)>,
    limit: u32,
    each: impl FnMut(&Transition),
) -> Result<PageEnd<Transition>, sqlx::Error> {
    let mut q = List::new(Transition::SELECT);
    q.sql(" where leaf_user_id = ").key(user);
    q.newest_first(after);
    q.page(pool, limit, each).await
}

// ---------------------------------------------------------------------------------------------
// events

list_row! {
    /// A cached event with the credential it belongs to.
    pub struct EventItem from "event" {
        pub leaf_user_id: Uuid,
        pub provider: String,
        pub id: String,
        pub created_date: OffsetDateTime,
        pub status_code: i32,
        pub headers: String,
        pub body: String,
    }
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
#[tracing::instrument(skip(pool, after, each))]
pub async fn events(
    pool: &PgPool,
    filter: &EventFilter,
    after: Option<&EventKey>,
    limit: u32,
    each: impl FnMut(&EventItem),
) -> Result<PageEnd<EventItem>, sqlx::Error> {
    events_query(filter, after).page(pool, limit, each).await
}

fn events_query(filter: &EventFilter, after: Option<&EventKey>) -> List {
    let mut q = List::new(EventItem::SELECT);
    q.sql(" where true");
    if let Some(u) = filter.leaf_user_id {
        q.sql(" and leaf_user_id = ").key(u);
    }
    if let Some(t) = filter.since {
        q.sql(" and created_date >= ").value(t);
    }
    if let Some(t) = filter.until {
        q.sql(" and created_date < ").value(t);
    }
    if let Some(c) = filter.status_code {
        q.sql(" and status_code = ").int(c.into());
    }
    if let Some(c) = filter.min_status_code {
        q.sql(" and status_code >= ").int(c.into());
    }
    if let Some((created, id, user, provider)) = after {
        q.sql(" and (created_date, id, leaf_user_id, provider) < (")
            .key(*created)
            .sql(", ")
            .key(id.as_str())
            .sql(", ")
            .key(*user)
            .sql(", ")
            .key(provider.as_str())
            .sql(")");
    }
    q.sql(" order by created_date desc, id desc, leaf_user_id desc, provider desc");
    q
}

// ---------------------------------------------------------------------------------------------
// audit

list_row! {
    /// One audit entry (the table never holds a secret).
    pub struct AuditItem from "audit" {
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
#[tracing::instrument(skip(pool, after, each))]
pub async fn audit(
    pool: &PgPool,
    filter: &AuditFilter,
    after: Option<(OffsetDateTime, i64)>,
    limit: u32,
    each: impl FnMut(&AuditItem),
) -> Result<PageEnd<AuditItem>, sqlx::Error> {
    let mut q = List::new(AuditItem::SELECT);
    q.sql(" where true");
    if let Some(u) = filter.leaf_user_id {
        q.sql(" and leaf_user_id = ").key(u);
    }
    if let Some(a) = &filter.actor {
        q.sql(" and actor = ").value(a.as_str());
    }
    if let Some(a) = &filter.action {
        q.sql(" and action = ").value(a.as_str());
    }
    if let Some(t) = filter.since {
        q.sql(" and at >= ").value(t);
    }
    q.newest_first(after);
    q.page(pool, limit, each).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(q: &List) -> String {
        q.q.sql().as_str().to_owned()
    }

    #[test]
    fn a_known_status_is_written_in_and_the_statement_is_kept_prepared() {
        let filter = CredentialFilter {
            status: Some(StatusFilter::Is("UNAUTHENTICATED".into())),
            sync_state: Some(SyncState::Synced),
            ..CredentialFilter::default()
        };
        let q = credentials_query(&filter, None);
        assert!(!q.replan);
        assert!(
            sql(&q).contains(" and status = 'UNAUTHENTICATED' and sync_state = 'SYNCED'"),
            "{}",
            sql(&q)
        );
        // A cursor is a key: bound, and the statement stays prepared.
        let q = credentials_query(&filter, Some(&(Uuid::nil(), "climate-field-view".into())));
        assert!(!q.replan);
        assert!(
            sql(&q).contains("(leaf_user_id, provider) > ($1, $2)"),
            "{}",
            sql(&q)
        );
    }

    #[test]
    fn any_other_status_or_a_time_bound_is_bound_and_planned_with_its_value() {
        for status in ["SOMETHING_NEW", "OK'; drop table credential; --", "ok", ""] {
            let filter = CredentialFilter {
                status: Some(StatusFilter::Is(status.into())),
                ..CredentialFilter::default()
            };
            let q = credentials_query(&filter, None);
            assert!(q.replan, "{status:?}");
            assert!(sql(&q).contains(" and status = $1"), "{}", sql(&q));
            assert!(!sql(&q).contains("drop"), "{}", sql(&q));
        }
        let filter = CredentialFilter {
            changed_since: Some(OffsetDateTime::UNIX_EPOCH),
            ..CredentialFilter::default()
        };
        assert!(credentials_query(&filter, None).replan);
    }

    #[test]
    fn status_codes_are_written_in_and_time_bounds_bound() {
        let filter = EventFilter {
            min_status_code: Some(400),
            leaf_user_id: Some(Uuid::nil()),
            ..EventFilter::default()
        };
        let q = events_query(&filter, None);
        assert!(!q.replan);
        assert!(
            sql(&q).contains("leaf_user_id = $1 and status_code >= 400"),
            "{}",
            sql(&q)
        );
        let filter = EventFilter {
            since: Some(OffsetDateTime::UNIX_EPOCH),
            ..EventFilter::default()
        };
        assert!(events_query(&filter, None).replan);
    }

    #[test]
    fn the_select_lists_name_the_fields_in_their_order() {
        assert_eq!(
            CredentialItem::SELECT,
            "select leaf_user_id, provider, status, checked_at, changed_at, sync_state, \
             rejection_status, rejection_detail, created_at, updated_at from credential"
        );
        assert_eq!(
            EventItem::SELECT,
            "select leaf_user_id, provider, id, created_date, status_code, headers, body from event"
        );
    }

    #[test]
    #[should_panic(expected = "not a constant")]
    fn a_constant_with_anything_but_capitals_is_refused() {
        List::new(CredentialItem::SELECT).constant("OK' or '1'='1");
    }
}
