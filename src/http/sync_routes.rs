//! `POST /v1/sync` and `GET /v1/sync/runs/{runId}` (SPEC §6): on-demand sync runs.
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use super::extract::{Authed, read_body};
use crate::domain::provider::CLIMATE_FIELD_VIEW;
use crate::domain::{LeafUserId, Scope};
use crate::error::ApiError;
use crate::store::audit::{self, Entry, Outcome};
use crate::store::work;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/sync")
            .route(web::post().to(trigger))
            .default_service(super::method_not_allowed("POST")),
    )
    .service(super::get_only("/v1/sync/runs/{runId}", web::get().to(run)));
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SyncRequest {
    #[serde(default)]
    leaf_user_ids: Option<Vec<String>>,
}

async fn trigger(
    st: web::Data<AppState>,
    who: Authed,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    who.require(Scope::Admin)?;
    let bytes = read_body(&req, &mut payload, st.max_body_bytes).await?;
    let ids = if bytes.iter().all(u8::is_ascii_whitespace) {
        Vec::new()
    } else {
        if !super::extract::is_json(&req) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let shape = |e: &dyn std::fmt::Display| {
            ApiError::Validation(format!(
                "the body must be {{\"leafUserIds\": [UUID, ...]}} ({e})"
            ))
        };
        // A JSON object only: serde would also read a struct from an array (`[]`, `[[…]]`).
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| shape(&e))?;
        if !value.is_object() {
            return Err(shape(&"not a JSON object"));
        }
        let body: SyncRequest = serde_json::from_value(value).map_err(|e| shape(&e))?;
        body.leaf_user_ids.unwrap_or_default()
    };
    let mut users = Vec::with_capacity(ids.len());
    let mut malformed = Vec::new();
    for raw in &ids {
        match LeafUserId::parse(raw) {
            Ok(u) => users.push(u.0),
            Err(_) => malformed.push(raw.chars().take(64).collect::<String>()),
        }
    }
    if !malformed.is_empty() {
        return Err(ApiError::Validation(format!(
            "leafUserIds: not UUIDs: {}",
            malformed.join(", ")
        )));
    }
    users.sort();
    users.dedup();
    let provider = &CLIMATE_FIELD_VIEW;
    let tracked = work::tracked(&st.gateway.db, provider.name, &users).await?;
    if !users.is_empty() {
        let known: std::collections::HashSet<Uuid> = tracked.iter().map(|(u, _)| *u).collect();
        let unknown: Vec<String> = users
            .iter()
            .filter(|u| !known.contains(u))
            .map(Uuid::to_string)
            .collect();
        if !unknown.is_empty() {
            return Err(ApiError::Validation(format!(
                "leafUserIds: not tracked by credsync: {}",
                unknown.join(", ")
            )));
        }
    }
    let run_id = Uuid::now_v7();
    work::create_run(
        &st.gateway.db,
        run_id,
        i32::try_from(tracked.len()).unwrap_or(i32::MAX),
        &who.caller.sub,
    )
    .await?;
    audit::record_logged(
        &st.gateway.db,
        &Entry {
            actor: &who.caller.sub,
            action: "sync.trigger",
            leaf_user_id: None,
            provider: Some(provider.name),
            outcome: Outcome::Success,
            request_id: Some(&who.request_id),
            detail: Some(&format!("run {run_id}: {} credential(s)", tracked.len())),
        },
    )
    .await;
    let syncer = st.syncer.clone();
    tokio::spawn(async move {
        syncer.run(Some(run_id), tracked).await;
    });
    Ok(HttpResponse::Accepted().json(json!({ "runId": run_id })))
}

async fn run(
    st: web::Data<AppState>,
    who: Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    who.require(Scope::Admin)?;
    let not_found = || ApiError::NotFound("no such sync run".into());
    let id = Uuid::try_parse(&path.into_inner()).map_err(|_| not_found())?;
    let run = work::get_run(&st.gateway.db, id)
        .await?
        .ok_or_else(not_found)?;
    Ok(HttpResponse::Ok().json(json!({
        "runId": run.id,
        "state": run.state,
        "usersTotal": run.users_total,
        "usersDone": run.users_done,
        "usersFailed": run.users_failed,
        "startedAt": crate::timefmt::format(run.started_at),
        "finishedAt": run.finished_at.map(crate::timefmt::format),
    })))
}
