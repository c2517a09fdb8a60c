//! Idempotency-Key records: (caller sub, path, key) → the first final answer, for 24 hours.
//! The request body is kept only as a keyed hash.
use sqlx::PgPool;
use sqlx::types::Json;

/// A stored final answer.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Stored {
    pub status: i32,
    pub content_type: Option<String>,
    pub body: Option<Vec<u8>>,
    pub headers: Option<Json<Vec<(String, String)>>>,
}

/// (request_hash, hash_key_id, status, content_type, body, headers)
type StoredRow = (
    Vec<u8>,
    String,
    Option<i32>,
    Option<String>,
    Option<Vec<u8>>,
    Option<Json<Vec<(String, String)>>>,
);

/// What `begin` found.
#[derive(Debug)]
pub enum Begin {
    /// We own the key now: run the request.
    Started,
    /// The same key with the same body finished before: replay this.
    Replay(Stored),
    /// The same key with another body.
    Mismatch,
    /// The first request with this key is still running.
    InProgress,
}

/// Claim the key, or report what it holds. `matches` tells whether a stored hash (under its key
/// id) equals this request's.
pub async fn begin(
    pool: &PgPool,
    subject: &str,
    path: &str,
    key: &str,
    hash_key_id: &str,
    hash: &[u8],
    matches: impl Fn(&str, &[u8]) -> bool,
) -> Result<Begin, sqlx::Error> {
    let inserted = sqlx::query(
        "insert into idempotency (subject, path, key, request_hash, hash_key_id, expires_at)
         values ($1, $2, $3, $4, $5, now() + interval '24 hours')
         on conflict (subject, path, key) do update set
             request_hash = excluded.request_hash, hash_key_id = excluded.hash_key_id, status = null,
             content_type = null, body = null, headers = null, created_at = now(), expires_at = excluded.expires_at
         where idempotency.expires_at < now()
            -- a first request that never finished (its process died) does not block the key forever
            or (idempotency.status is null and idempotency.created_at < now() - interval '2 minutes')",
    )
    .bind(subject)
    .bind(path)
    .bind(key)
    .bind(hash)
    .bind(hash_key_id)
    .execute(pool)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Begin::Started);
    }
    let row: Option<StoredRow> = sqlx::query_as(
        "select request_hash, hash_key_id, status, content_type, body, headers from idempotency
             where subject = $1 and path = $2 and key = $3",
    )
    .bind(subject)
    .bind(path)
    .bind(key)
    .fetch_optional(pool)
    .await?;
    let Some((stored_hash, stored_key_id, status, content_type, body, headers)) = row else {
        // Deleted in between (its first request ended with our own 4xx): try once more.
        return Box::pin(begin(pool, subject, path, key, hash_key_id, hash, matches)).await;
    };
    if !matches(&stored_key_id, &stored_hash) {
        return Ok(Begin::Mismatch);
    }
    Ok(match status {
        None => Begin::InProgress,
        Some(status) => Begin::Replay(Stored {
            status,
            content_type,
            body,
            headers,
        }),
    })
}

/// Store the final answer.
pub async fn complete(
    pool: &PgPool,
    subject: &str,
    path: &str,
    key: &str,
    answer: &Stored,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update idempotency set status = $4, content_type = $5, body = $6, headers = $7
         where subject = $1 and path = $2 and key = $3",
    )
    .bind(subject)
    .bind(path)
    .bind(key)
    .bind(answer.status)
    .bind(&answer.content_type)
    .bind(&answer.body)
    .bind(&answer.headers)
    .execute(pool)
    .await?;
    Ok(())
}

/// Forget the key (credsync's own 4xx are not stored, and a crashed request must not block it).
pub async fn release(
    pool: &PgPool,
    subject: &str,
    path: &str,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "delete from idempotency where subject = $1 and path = $2 and key = $3 and status is null",
    )
    .bind(subject)
    .bind(path)
    .bind(key)
    .execute(pool)
    .await?;
    Ok(())
}

/// Drop expired records (the worker calls it).
pub async fn prune(pool: &PgPool) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("delete from idempotency where expires_at < now()")
            .execute(pool)
            .await?
            .rows_affected(),
    )
}
