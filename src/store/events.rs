//! Cached Leaf credential events (Leaf keeps 30 days; we keep CREDSYNC_EVENTS_RETENTION_DAYS).
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// One event as Leaf shapes it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: String,
    #[serde(with = "crate::timefmt::rfc3339")]
    pub created_date: OffsetDateTime,
    pub status_code: i32,
    pub headers: String,
    pub body: String,
}

/// Insert or refresh events (deduplicated by id). Returns how many were new. Only for a
/// credential that is held and not being deleted: a sync that read Leaf's events before a
/// delete began must not bring them back (the row lock waits for the delete's transaction).
pub async fn upsert(
    pool: &PgPool,
    user: Uuid,
    provider: &str,
    events: &[Event],
) -> Result<u64, sqlx::Error> {
    if events.is_empty() {
        return Ok(0);
    }
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let dates: Vec<OffsetDateTime> = events.iter().map(|e| e.created_date).collect();
    let codes: Vec<i32> = events.iter().map(|e| e.status_code).collect();
    let headers: Vec<&str> = events.iter().map(|e| e.headers.as_str()).collect();
    let bodies: Vec<&str> = events.iter().map(|e| e.body.as_str()).collect();
    let res = sqlx::query(
        "insert into event (leaf_user_id, provider, id, created_date, status_code, headers, body)
         select $1, $2, * from unnest($3::text[], $4::timestamptz[], $5::int[], $6::text[], $7::text[])
         where exists (select 1 from credential where leaf_user_id = $1 and provider = $2
                       and sync_state <> 'DELETE_PENDING' for share)
         on conflict (leaf_user_id, provider, id) do nothing",
    )
    .bind(user)
    .bind(provider)
    .bind(&ids)
    .bind(&dates)
    .bind(&codes)
    .bind(&headers)
    .bind(&bodies)
    .execute(pool)
    .await?;
    Ok(res.rows_affected())
}

/// A page of one credential's cached events, Leaf-style (`page` from 0, `size`).
pub async fn page(
    pool: &PgPool,
    user: Uuid,
    provider: &str,
    page: u32,
    size: u32,
    ascending: bool,
) -> Result<(Vec<Event>, i64), sqlx::Error> {
    let sql = if ascending {
        "select id, created_date, status_code, headers, body from event where leaf_user_id = $1 and provider = $2
         order by created_date asc, id asc limit $3 offset $4"
    } else {
        "select id, created_date, status_code, headers, body from event where leaf_user_id = $1 and provider = $2
         order by created_date desc, id desc limit $3 offset $4"
    };
    let rows = sqlx::query_as::<_, Event>(sql)
        .bind(user)
        .bind(provider)
        .bind(i64::from(size))
        .bind(i64::from(page) * i64::from(size))
        .fetch_all(pool)
        .await?;
    let total: i64 =
        sqlx::query_scalar("select count(*) from event where leaf_user_id = $1 and provider = $2")
            .bind(user)
            .bind(provider)
            .fetch_one(pool)
            .await?;
    Ok((rows, total))
}
