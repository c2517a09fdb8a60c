//! Benchmark baseline for `scripts/bench` (not part of the tests): the cached status read
//! (`GET …/{segment}/status?source=cache`) done the fast way — actix-web, one sqlx pool per
//! worker created on that worker's runtime (no cross-runtime hop), `test_before_acquire` off.
//! It runs the same primary-key lookup as credsync (same columns, same table) and answers the
//! same JSON, but has no JWT, middleware, metrics or logging.
//!
//! Environment: `DATABASE_URL`, `BENCH_LISTEN` (default `127.0.0.1:18090`),
//! `BENCH_DB_MAX_CONNECTIONS` (total over all workers, default 16), `BENCH_WORKERS`
//! (default: available parallelism).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use actix_web::{App, HttpResponse, HttpServer, web};
use sqlx::Row as _;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const COLUMNS: &str = "select leaf_user_id, provider, leaf_credential_id, sync_state, status, checked_at, changed_at, \
     created_time, public_fields, key_id, wrapped_key, secrets, rejection_status, rejection_detail, created_at, updated_at \
     from credential where leaf_user_id = $1 and provider = $2";

async fn status(pool: web::Data<PgPool>, path: web::Path<(String, String)>) -> HttpResponse {
    let (user, _segment) = path.into_inner();
    let Ok(user) = uuid::Uuid::parse_str(&user) else {
        return HttpResponse::BadRequest().finish();
    };
    let row = sqlx::query(COLUMNS)
        .bind(user)
        .bind("climate-field-view")
        .fetch_optional(pool.get_ref())
        .await;
    match row {
        Ok(Some(row)) => {
            let status: Option<String> = row.get("status");
            let checked: Option<OffsetDateTime> = row.get("checked_at");
            let body = serde_json::json!({
                "status": status,
                "checkedAt": checked.and_then(|t| t.format(&Rfc3339).ok()),
            });
            HttpResponse::Ok()
                .content_type("application/json")
                .insert_header(("x-credsync-source", "cache"))
                .body(body.to_string())
        }
        Ok(None) => HttpResponse::NotFound().finish(),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")?;
    let listen = std::env::var("BENCH_LISTEN").unwrap_or_else(|_| "127.0.0.1:18090".into());
    let workers = common::workers()?;
    let per_worker = common::pool_per_worker(workers)?;
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            // Runs on each worker's own runtime: the pool's connections live there.
            let pool = common::pool(&url, per_worker);
            App::new().app_data(web::Data::new(pool)).route(
                "/services/usermanagement/api/users/{user}/{segment}/status",
                web::get().to(status),
            )
        })
        .workers(workers)
        .bind(&listen)?
        .run()
        .await
    })?;
    Ok(())
}
