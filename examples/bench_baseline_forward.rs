//! Benchmark baseline for `scripts/bench` (not part of the tests): a minimal forwarder of
//! `GET /services/usermanagement/api/users/{user}/{segment}` to a Leaf (the simulator), built
//! the fast way — actix-web with one `reqwest::Client` per worker and one Leaf token fetched at
//! start-up. No JWT, no database, no logging: what any forwarding gateway has to pay.
//!
//! With `DATABASE_URL` set it also reads the credential's row first, as credsync does: through
//! `store::credentials::get` on a connection of credsync's `store::ConnStash`, over one pool per
//! worker (`test_before_acquire` off). That is the read SPEC §5 puts before every forwarded GET
//! (a pending create is answered from the cache, a pending delete or a rejection is a 404), and
//! so the fair yardstick for credsync's forwarded read: forwarding plus the one database round
//! trip it cannot skip, and nothing else.
//!
//! Environment: `LEAF_API_URL` (required), `LEAF_USERNAME` / `LEAF_PASSWORD` (default
//! `bench`), `DATABASE_URL` (optional, above), `BENCH_DB_MAX_CONNECTIONS` (total over all
//! workers, default 16), `BENCH_LISTEN` (default `127.0.0.1:18091`), `BENCH_WORKERS` (default:
//! available parallelism).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};

struct Forwarder {
    client: reqwest::Client,
    base: String,
    bearer: String,
    /// Read the credential's row before forwarding (`DATABASE_URL` set).
    db: Option<std::sync::Arc<credsync::store::ConnStash>>,
}

async fn forward(fwd: web::Data<Forwarder>, req: HttpRequest) -> HttpResponse {
    if let Some(db) = &fwd.db {
        let user = req.match_info().get("user").map(uuid::Uuid::parse_str);
        let Some(Ok(user)) = user else {
            return HttpResponse::BadRequest().finish();
        };
        let Ok(mut read) = db.acquire().await else {
            return HttpResponse::ServiceUnavailable().finish();
        };
        match credsync::store::credentials::get(read.conn(), user, "climate-field-view").await {
            // As credsync: only a SYNCED row (or none) is worth asking Leaf about.
            Ok(Some(row)) if row.sync_state != "SYNCED" => {
                read.keep();
                return HttpResponse::NotFound().finish();
            }
            Ok(_) => read.keep(),
            Err(_) => return HttpResponse::ServiceUnavailable().finish(),
        }
    }
    let url = format!("{}{}", fwd.base, req.path());
    let answer = fwd
        .client
        .get(url)
        .header("authorization", fwd.bearer.as_str())
        .send()
        .await;
    let Ok(answer) = answer else {
        return HttpResponse::BadGateway().finish();
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    match answer.bytes().await {
        Ok(body) => HttpResponse::build(status)
            .content_type("application/json")
            .body(body),
        Err(_) => HttpResponse::BadGateway().finish(),
    }
}

async fn leaf_token(base: &str, user: &str, password: &str) -> anyhow::Result<String> {
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/api/authenticate"))
        .json(&serde_json::json!({"username": user, "password": password}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = answer["id_token"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no id_token in Leaf's answer"))?;
    Ok(format!("Bearer {token}"))
}

fn main() -> anyhow::Result<()> {
    let base = std::env::var("LEAF_API_URL")?
        .trim_end_matches('/')
        .to_owned();
    let user = std::env::var("LEAF_USERNAME").unwrap_or_else(|_| "bench".into());
    let password = std::env::var("LEAF_PASSWORD").unwrap_or_else(|_| "bench".into());
    let listen = std::env::var("BENCH_LISTEN").unwrap_or_else(|_| "127.0.0.1:18091".into());
    let workers = common::workers()?;
    let database_url = std::env::var("DATABASE_URL").ok();
    let per_worker = common::pool_per_worker(workers)?;
    actix_web::rt::System::new().block_on(async move {
        let bearer = leaf_token(&base, &user, &password).await?;
        HttpServer::new(move || {
            // One client per worker, created on that worker's runtime.
            let client = reqwest::Client::builder()
                .build()
                .expect("cannot build an HTTP client");
            let db = database_url.as_deref().map(|url| {
                credsync::store::ConnStash::spawn(common::pool(url, per_worker), per_worker)
            });
            App::new()
                .app_data(web::Data::new(Forwarder {
                    client,
                    base: base.clone(),
                    bearer: bearer.clone(),
                    db,
                }))
                .route(
                    "/services/usermanagement/api/users/{user}/{segment}",
                    web::get().to(forward),
                )
        })
        .workers(workers)
        .bind(&listen)?
        .run()
        .await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}
