//! Operational routes: liveness, readiness, Prometheus metrics, the OpenAPI document.
use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;

/// The OpenAPI document, as committed at the repository root.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

pub fn routes(cfg: &mut web::ServiceConfig) {
    for (path, route) in [
        ("/healthz", web::get().to(healthz)),
        ("/readyz", web::get().to(readyz)),
        ("/metrics", web::get().to(metrics)),
        ("/openapi.yaml", web::get().to(openapi)),
    ] {
        cfg.service(super::get_only(path, route));
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn readyz(st: web::Data<AppState>) -> HttpResponse {
    let db = &st.gateway.db;
    let (database, migrations) = match crate::store::migrations_applied(db).await {
        Ok(true) => ("ok", "applied"),
        Ok(false) => ("ok", "pending"),
        Err(_) => ("unavailable", "unknown"),
    };
    let leaf = &st.gateway.leaf;
    let authenticated = match leaf.auth_health() {
        crate::leaf::AuthHealth::Ok => Some(true),
        crate::leaf::AuthHealth::Rejected => Some(false),
        crate::leaf::AuthHealth::Unknown => None,
    };
    let keys_checked = st.keys_checked.load(std::sync::atomic::Ordering::Acquire);
    let ready = database == "ok" && migrations == "applied" && keys_checked;
    let body = json!({
        "status": if ready { "ok" } else { "unavailable" },
        "database": database,
        "migrations": migrations,
        "encryptionKeys": if keys_checked { "checked" } else { "pending" },
        "leaf": {
            // Whether Leaf answered credsync's last request (`null` before the first) and the
            // circuit breaker lets calls through.
            "reachable": match leaf.reach() {
                crate::leaf::Reach::Unknown if !leaf.breaker().is_open() => None,
                crate::leaf::Reach::Answered => Some(!leaf.breaker().is_open()),
                _ => Some(false),
            },
            "authenticated": authenticated,
        },
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "5"))
            .json(body)
    }
}

async fn metrics(st: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = crate::store::gauges::refresh(&st.gateway.db, st.syncer.settings.interval).await
    {
        tracing::warn!(error = %e, "could not refresh gauges");
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(st.metrics.render())
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/yaml")
        .body(OPENAPI_YAML)
}
