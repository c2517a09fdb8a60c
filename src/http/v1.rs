//! credsync's own API (`/v1`, SPEC §6): cross-user read routes (credentials, summary, status
//! history, cached events, audit trail) and Leaf's signed alerts webhook.
//!
//! Owns: query-parameter validation (every bad value is a 400 naming the parameter), cursors
//! (opaque and tamper-evident, see [`crate::cursor`]), the answer shapes, and the webhook's
//! signature check. Must never: put a caller's value into SQL (the store binds it), accept an
//! unsigned alert, or log a webhook body.
use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::http::header::ContentType;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::AppState;
use super::extract::{Authed, read_body};
use super::json_out::JsonObject;
use crate::crypto::{Keyring, ct_eq, hmac_sha256};
use crate::domain::credential::{REPORTED_STATUSES, UNKNOWN_STATUS};
use crate::domain::{LeafUserId, Scope, SyncState};
use crate::error::ApiError;
use crate::store::credentials::{self as creds, StatusSource};
use crate::store::query::{
    self, AuditFilter, CredentialFilter, EventFilter, EventKey, PageEnd, StatusFilter,
};
use crate::timefmt::Canonical;
use crate::{cursor, timefmt};

/// Default and maximum page sizes of every list route.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;

/// The sync states a caller can see (a pending delete is gone from the caller's point of view).
const VISIBLE_SYNC_STATES: [SyncState; 3] = [
    SyncState::Synced,
    SyncState::PendingUpstream,
    SyncState::Rejected,
];

/// Audit actions `/v1/audit?action=` accepts. `credential.read` appears only with outcome
/// `denied` (a 403 on a credential route).
pub const AUDIT_ACTIONS: &[&str] = &[
    "credential.create",
    "credential.delete",
    "credential.read",
    "credential.reveal",
    "credential.rejected",
    "credential.adopted",
    "credential.vanished",
    "sync.trigger",
    "key.rotate",
];

/// Leaf's one-off registration confirmation.
const CONFIRMATION_MESSAGE: &str = "confirmation of webhook upon registration";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(super::get_only(
        "/v1/credentials",
        web::get().to(list_credentials),
    ))
    .service(super::get_only(
        "/v1/credentials/summary",
        web::get().to(summary),
    ))
    .service(super::get_only(
        "/v1/users/{leafUserId}/status-history",
        web::get().to(status_history),
    ))
    .service(super::get_only("/v1/events", web::get().to(list_events)))
    .service(super::get_only("/v1/audit", web::get().to(list_audit)))
    .service(
        web::resource("/v1/leaf/alerts")
            .route(web::post().to(leaf_alert))
            .default_service(web::to(alerts_other_method)),
    );
}

// ---------------------------------------------------------------------------------------------
// query parameters, pages and cursors

/// The query string as name/value pairs. Unknown names are ignored; a known one given twice,
/// given empty, or holding a NUL character, is a 400 naming it.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(req: &HttpRequest) -> Result<Params, ApiError> {
        web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .map(|q| Params(q.into_inner()))
            .map_err(|_| ApiError::Validation("the query string is malformed".into()))
    }

    fn get(&self, name: &str) -> Result<Option<&str>, ApiError> {
        let mut found = self.0.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
        let value = found.next();
        if found.next().is_some() {
            return Err(ApiError::Validation(format!(
                "{name}: given more than once"
            )));
        }
        match value {
            Some(v) if v.is_empty() => {
                Err(ApiError::Validation(format!("{name}: must not be empty")))
            }
            // Postgres text cannot hold NUL, so no stored value can match one.
            Some(v) if v.contains('\0') => Err(ApiError::Validation(format!(
                "{name}: must not contain NUL characters"
            ))),
            Some(v) => Ok(Some(v.as_str())),
            None => Ok(None),
        }
    }

    fn limit(&self) -> Result<u32, ApiError> {
        match self.get("limit")? {
            None => Ok(DEFAULT_LIMIT),
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n) && v.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    ApiError::Validation(format!("limit: must be an integer from 1 to {MAX_LIMIT}"))
                }),
        }
    }

    /// A timestamp parameter: every one is a bound on stored microsecond values
    /// ([`timefmt::bound_to_micros`]).
    fn timestamp(&self, name: &str) -> Result<Option<OffsetDateTime>, ApiError> {
        self.get(name)?
            .map(|v| {
                timefmt::parse_strict(v).map(timefmt::bound_to_micros).ok_or_else(|| {
                    ApiError::Validation(format!(
                        "{name}: must be an RFC 3339 timestamp with an offset, e.g. 2026-01-02T03:04:05Z"
                    ))
                })
            })
            .transpose()
    }

    fn user(&self, name: &str) -> Result<Option<Uuid>, ApiError> {
        self.get(name)?
            .map(|v| {
                LeafUserId::parse(v).map(|u| u.0).map_err(|_| {
                    ApiError::Validation(format!("{name}: must be a UUID (8-4-4-4-12 hex digits)"))
                })
            })
            .transpose()
    }

    fn status_code(&self, name: &str) -> Result<Option<i32>, ApiError> {
        self.get(name)?
            .map(|v| {
                v.parse::<i32>()
                    .ok()
                    .filter(|n| (0..=999).contains(n) && v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| {
                        ApiError::Validation(format!("{name}: must be an integer from 0 to 999"))
                    })
            })
            .transpose()
    }

    /// The verified sort key of the `cursor` parameter, if any.
    fn cursor<K: DeserializeOwned>(
        &self,
        keyring: &Keyring,
        route: &str,
        filters: &str,
    ) -> Result<Option<K>, ApiError> {
        self.get("cursor")?
            .map(|raw| {
                cursor::decode(keyring, route, filters, raw)
                    .map_err(|e| ApiError::Validation(format!("cursor: {e}")))
            })
            .transpose()
    }
}

fn bad_cursor() -> ApiError {
    ApiError::Validation(format!("cursor: {}", cursor::CursorError))
}

/// A timestamp as it travels inside a cursor (the canonical microsecond form, lossless for
/// Postgres values).
fn ts_key(t: OffsetDateTime) -> String {
    timefmt::format(t)
}

fn parse_ts_key(s: &str) -> Result<OffsetDateTime, ApiError> {
    timefmt::parse_strict(s).ok_or_else(bad_cursor)
}

fn opt_ts(t: Option<OffsetDateTime>) -> Option<String> {
    t.map(timefmt::format)
}

/// A page's body, `{"items": [...], "nextCursor": ...}`, written item by item as the rows
/// arrive from Postgres: no list of rows is collected first, and the items borrow from their
/// row instead of copying it.
struct PageBody {
    buf: Vec<u8>,
    items: usize,
    failed: Option<serde_json::Error>,
}

impl PageBody {
    fn new(limit: u32) -> PageBody {
        // Sized for a typical item up front: a page of a hundred would otherwise be copied
        // through a dozen reallocations.
        let mut buf = Vec::with_capacity(256 * limit as usize + 256);
        buf.extend_from_slice(br#"{"items":["#);
        PageBody {
            buf,
            items: 0,
            failed: None,
        }
    }

    fn push(&mut self, item: &impl Serialize) {
        self.push_with(|buf| serde_json::to_writer(buf, item));
    }

    /// Append an item that `write` writes itself.
    fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>) {
        if self.failed.is_some() {
            return;
        }
        if self.items > 0 {
            self.buf.push(b',');
        }
        self.items += 1;
        if let Err(e) = write(&mut self.buf) {
            self.failed = Some(e);
        }
    }

    /// Close the body with the cursor of the next page (when more rows follow `end.last`).
    fn finish<R, K: Serialize>(
        mut self,
        keyring: &Keyring,
        route: &str,
        filters: &str,
        end: PageEnd<R>,
        key: impl Fn(&R) -> K,
    ) -> Result<HttpResponse, ApiError> {
        let next_cursor = match (end.more, &end.last) {
            (true, Some(last)) => Some(cursor::encode(keyring, route, filters, &key(last))),
            _ => None,
        };
        self.buf.extend_from_slice(br#"],"nextCursor":"#);
        let closed = match self.failed.take() {
            Some(e) => Err(e),
            None => serde_json::to_writer(&mut self.buf, &next_cursor),
        };
        closed.map_err(|e| ApiError::Internal(anyhow::anyhow!("cannot serialize a page: {e}")))?;
        self.buf.push(b'}');
        Ok(HttpResponse::Ok()
            .content_type(ContentType::json())
            .body(self.buf))
    }
}

// ---------------------------------------------------------------------------------------------
// GET /v1/credentials

// Written by hand (`write_json`); the derived `Serialize` is the reference it is tested against.
#[cfg_attr(test, derive(Serialize))]
#[cfg_attr(test, serde(rename_all = "camelCase"))]
struct RejectionOut<'a> {
    status: Option<i32>,
    detail: Option<&'a str>,
}

#[cfg_attr(test, derive(Serialize))]
#[cfg_attr(test, serde(rename_all = "camelCase"))]
struct CredentialOut<'a> {
    leaf_user_id: Uuid,
    provider: &'a str,
    status: Option<&'a str>,
    checked_at: Option<Canonical>,
    changed_at: Option<Canonical>,
    sync_state: &'a str,
    rejection: Option<RejectionOut<'a>>,
    created_at: Canonical,
    updated_at: Canonical,
}

impl<'a> From<&'a query::CredentialItem> for CredentialOut<'a> {
    fn from(r: &'a query::CredentialItem) -> Self {
        let rejection = (r.sync_state == SyncState::Rejected.as_str()).then_some(RejectionOut {
            status: r.rejection_status,
            detail: r.rejection_detail.as_deref(),
        });
        CredentialOut {
            leaf_user_id: r.leaf_user_id,
            provider: &r.provider,
            status: r.status.as_deref(),
            checked_at: r.checked_at.map(Canonical),
            changed_at: r.changed_at.map(Canonical),
            sync_state: &r.sync_state,
            rejection,
            created_at: Canonical(r.created_at),
            updated_at: Canonical(r.updated_at),
        }
    }
}

impl CredentialOut<'_> {
    /// The item's JSON, as `derive(Serialize)` would write it (see [`JsonObject`]).
    fn write_json(&self, buf: &mut Vec<u8>) -> serde_json::Result<()> {
        let mut o = JsonObject::open(buf);
        o.uuid("leafUserId", self.leaf_user_id);
        o.text("provider", self.provider);
        o.opt_text("status", self.status);
        o.opt_time("checkedAt", self.checked_at);
        o.opt_time("changedAt", self.changed_at);
        o.text("syncState", self.sync_state);
        match &self.rejection {
            Some(r) => {
                let mut rejection = o.object("rejection");
                rejection.opt_int("status", r.status);
                rejection.opt_text("detail", r.detail);
                rejection.close()?;
            }
            None => o.null("rejection"),
        }
        o.time("createdAt", self.created_at);
        o.time("updatedAt", self.updated_at);
        o.close()
    }
}

async fn list_credentials(
    st: web::Data<AppState>,
    who: Authed,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    who.require(Scope::StatusRead)?;
    let p = Params::parse(&req)?;
    let status = p.get("status")?.map(|s| {
        if s == UNKNOWN_STATUS {
            StatusFilter::Unknown
        } else {
            StatusFilter::Is(s.to_owned())
        }
    });
    let sync_state = p
        .get("syncState")?
        .map(|s| {
            VISIBLE_SYNC_STATES
                .iter()
                .find(|v| v.as_str() == s)
                .copied()
                .ok_or_else(|| {
                    ApiError::Validation(
                        "syncState: must be SYNCED, PENDING_UPSTREAM or REJECTED".into(),
                    )
                })
        })
        .transpose()?;
    let changed_since = p.timestamp("changedSince")?;
    let limit = p.limit()?;
    let filter = CredentialFilter {
        status,
        sync_state,
        changed_since,
    };
    let filters = json!([
        p.get("status")?,
        filter.sync_state.map(SyncState::as_str),
        opt_ts(filter.changed_since)
    ])
    .to_string();
    const ROUTE: &str = "v1.credentials";
    let keyring = &st.gateway.keyring;
    let after: Option<(Uuid, String)> = p.cursor(keyring, ROUTE, &filters)?;
    let mut body = PageBody::new(limit);
    let end = query::credentials(&st.gateway.db, &filter, after.as_ref(), limit, |r| {
        body.push_with(|buf| CredentialOut::from(r).write_json(buf))
    })
    .await?;
    body.finish(keyring, ROUTE, &filters, end, |r| {
        (r.leaf_user_id, r.provider.clone())
    })
}

// ---------------------------------------------------------------------------------------------
// GET /v1/credentials/summary

async fn summary(st: web::Data<AppState>, who: Authed) -> Result<HttpResponse, ApiError> {
    who.require(Scope::StatusRead)?;
    let groups = query::summary(&st.gateway.db).await?;
    let mut by_status: BTreeMap<String, i64> = REPORTED_STATUSES
        .iter()
        .map(|s| ((*s).to_owned(), 0))
        .collect();
    let mut by_sync_state: BTreeMap<&'static str, i64> = VISIBLE_SYNC_STATES
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
    let mut total = 0i64;
    let mut oldest: Option<OffsetDateTime> = None;
    for g in groups {
        total += g.count;
        let status = g.status.unwrap_or_else(|| UNKNOWN_STATUS.to_owned());
        *by_status.entry(status).or_insert(0) += g.count;
        if let Some(state) =
            SyncState::parse(&g.sync_state).filter(|s| VISIBLE_SYNC_STATES.contains(s))
        {
            *by_sync_state.entry(state.as_str()).or_insert(0) += g.count;
        }
        oldest = match (oldest, g.oldest_check_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    Ok(HttpResponse::Ok().json(json!({
        "total": total,
        "byStatus": by_status,
        "bySyncState": by_sync_state,
        "oldestCheckAt": opt_ts(oldest),
    })))
}

// ---------------------------------------------------------------------------------------------
// GET /v1/users/{leafUserId}/status-history

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TransitionOut<'a> {
    from: Option<&'a str>,
    to: &'a str,
    at: Canonical,
    source: &'a str,
}

async fn status_history(
    st: web::Data<AppState>,
    who: Authed,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    who.require(Scope::StatusRead)?;
    let user = LeafUserId::parse(&path.into_inner())
        .map_err(ApiError::Validation)?
        .0;
    let p = Params::parse(&req)?;
    let limit = p.limit()?;
    let filters = json!([user]).to_string();
    const ROUTE: &str = "v1.status-history";
    let keyring = &st.gateway.keyring;
    let after = p
        .cursor::<(String, i64)>(keyring, ROUTE, &filters)?
        .map(|(at, id)| parse_ts_key(&at).map(|at| (at, id)))
        .transpose()?;
    let mut body = PageBody::new(limit);
    let end = query::status_history(&st.gateway.db, user, after, limit, |r| {
        body.push(&TransitionOut {
            from: r.from_status.as_deref(),
            to: &r.to_status,
            at: Canonical(r.at),
            source: &r.source,
        })
    })
    .await?;
    body.finish(keyring, ROUTE, &filters, end, |r| (ts_key(r.at), r.id))
}

// ---------------------------------------------------------------------------------------------
// GET /v1/events

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EventOut<'a> {
    leaf_user_id: Uuid,
    provider: &'a str,
    id: &'a str,
    created_date: Canonical,
    status_code: i32,
    headers: &'a str,
    body: &'a str,
}

async fn list_events(
    st: web::Data<AppState>,
    who: Authed,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    who.require(Scope::StatusRead)?;
    let p = Params::parse(&req)?;
    let filter = EventFilter {
        leaf_user_id: p.user("leafUserId")?,
        since: p.timestamp("since")?,
        until: p.timestamp("until")?,
        status_code: p.status_code("statusCode")?,
        min_status_code: p.status_code("minStatusCode")?,
    };
    let limit = p.limit()?;
    let filters = json!([
        filter.leaf_user_id,
        opt_ts(filter.since),
        opt_ts(filter.until),
        filter.status_code,
        filter.min_status_code
    ])
    .to_string();
    const ROUTE: &str = "v1.events";
    let keyring = &st.gateway.keyring;
    let after: Option<EventKey> = p
        .cursor::<(String, String, Uuid, String)>(keyring, ROUTE, &filters)?
        .map(|(at, id, user, provider)| parse_ts_key(&at).map(|at| (at, id, user, provider)))
        .transpose()?;
    let mut body = PageBody::new(limit);
    let end = query::events(&st.gateway.db, &filter, after.as_ref(), limit, |r| {
        body.push(&EventOut {
            leaf_user_id: r.leaf_user_id,
            provider: &r.provider,
            id: &r.id,
            created_date: Canonical(r.created_date),
            status_code: r.status_code,
            headers: &r.headers,
            body: &r.body,
        })
    })
    .await?;
    body.finish(keyring, ROUTE, &filters, end, |r| {
        (
            ts_key(r.created_date),
            r.id.clone(),
            r.leaf_user_id,
            r.provider.clone(),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// GET /v1/audit

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuditOut<'a> {
    id: String,
    at: Canonical,
    actor: &'a str,
    action: &'a str,
    leaf_user_id: Option<Uuid>,
    outcome: &'a str,
    request_id: Option<&'a str>,
    detail: Option<&'a str>,
}

async fn list_audit(
    st: web::Data<AppState>,
    who: Authed,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    who.require(Scope::Admin)?;
    let p = Params::parse(&req)?;
    let action = p
        .get("action")?
        .map(|a| {
            AUDIT_ACTIONS
                .contains(&a)
                .then(|| a.to_owned())
                .ok_or_else(|| {
                    ApiError::Validation(format!(
                        "action: must be one of {}",
                        AUDIT_ACTIONS.join(", ")
                    ))
                })
        })
        .transpose()?;
    let actor = p.get("actor")?.map(str::to_owned);
    if actor.as_ref().is_some_and(|a| a.len() > 256) {
        return Err(ApiError::Validation("actor: at most 256 bytes".into()));
    }
    let filter = AuditFilter {
        leaf_user_id: p.user("leafUserId")?,
        actor,
        action,
        since: p.timestamp("since")?,
    };
    let limit = p.limit()?;
    let filters = json!([
        filter.leaf_user_id,
        filter.actor,
        filter.action,
        opt_ts(filter.since)
    ])
    .to_string();
    const ROUTE: &str = "v1.audit";
    let keyring = &st.gateway.keyring;
    let after = p
        .cursor::<(String, i64)>(keyring, ROUTE, &filters)?
        .map(|(at, id)| parse_ts_key(&at).map(|at| (at, id)))
        .transpose()?;
    let mut body = PageBody::new(limit);
    let end = query::audit(&st.gateway.db, &filter, after, limit, |r| {
        body.push(&AuditOut {
            id: r.id.to_string(),
            at: Canonical(r.at),
            actor: &r.actor,
            action: &r.action,
            leaf_user_id: r.leaf_user_id,
            outcome: &r.outcome,
            request_id: r.request_id.as_deref(),
            detail: r.detail.as_deref(),
        })
    })
    .await?;
    body.finish(keyring, ROUTE, &filters, end, |r| (ts_key(r.at), r.id))
}

// ---------------------------------------------------------------------------------------------
// POST /v1/leaf/alerts

fn webhook_disabled() -> ApiError {
    ApiError::NotFound(
        "the Leaf alerts webhook is not enabled (LEAF_WEBHOOK_SECRET is not set)".into(),
    )
}

async fn alerts_other_method(st: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if st.webhook_secret.is_none() {
        return Err(webhook_disabled());
    }
    Err(ApiError::MethodNotAllowed("POST"))
}

/// Whether `header` is the standard base64 HMAC-SHA256 of `body` under `secret` (constant time).
fn signature_matches(secret: &str, body: &[u8], header: &[u8]) -> bool {
    let Ok(given) = base64::engine::general_purpose::STANDARD.decode(header.trim_ascii()) else {
        return false;
    };
    ct_eq(&hmac_sha256(secret.as_bytes(), body), &given)
}

fn alert_outcome(outcome: &'static str) {
    metrics::counter!("credsync_alerts_total", "outcome" => outcome).increment(1);
}

fn no_content() -> HttpResponse {
    HttpResponse::build(StatusCode::NO_CONTENT).finish()
}

/// The status an alert type implies.
fn status_for_type(kind: &str) -> Option<&'static str> {
    match kind {
        "credentialsUnauthenticated" => Some("UNAUTHENTICATED"),
        "credentialsLimitedPermission" => Some("MISSING_PERMISSION"),
        _ => None,
    }
}

/// The status an alert sets: its `status` when usable, else the one its `type` implies.
fn alert_status(alert: &serde_json::Map<String, Value>) -> Option<String> {
    let explicit = alert
        .get("status")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic()));
    explicit.map(str::to_owned).or_else(|| {
        alert
            .get("type")
            .and_then(Value::as_str)
            .and_then(status_for_type)
            .map(str::to_owned)
    })
}

async fn leaf_alert(
    st: web::Data<AppState>,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let Some(secret) = &st.webhook_secret else {
        return Err(webhook_disabled());
    };
    let body = read_body(&req, &mut payload, st.max_body_bytes).await?;
    let signed = match req.headers().get("x-leaf-signature") {
        None => false,
        Some(sig) => {
            let secret = secrecy::ExposeSecret::expose_secret(secret);
            if !signature_matches(secret, &body, sig.as_bytes()) {
                alert_outcome("invalid_signature");
                tracing::warn!("Leaf alert with a wrong X-Leaf-Signature refused");
                return Err(ApiError::InvalidSignature(
                    "X-Leaf-Signature does not match the body",
                ));
            }
            true
        }
    };
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    if parsed.as_ref() == Some(&json!({ "message": CONFIRMATION_MESSAGE })) {
        alert_outcome("confirmation");
        tracing::info!(signed, "Leaf confirmed the alerts webhook registration");
        return Ok(no_content());
    }
    if !signed {
        alert_outcome("unsigned");
        tracing::warn!("unsigned Leaf alert refused");
        return Err(ApiError::InvalidSignature(
            "X-Leaf-Signature is required (standard base64 of HMAC-SHA256 over the raw body)",
        ));
    }
    let Some(Value::Object(alert)) = parsed else {
        alert_outcome("malformed");
        tracing::warn!("signed Leaf alert whose body is not a JSON object");
        return Err(ApiError::Validation("body: must be a JSON object".into()));
    };
    let kind = alert.get("type").and_then(Value::as_str).unwrap_or("");
    let Some(raw_id) = alert.get("credentialId").and_then(Value::as_str) else {
        alert_outcome("unusable");
        tracing::warn!(alert_type = %kind, "Leaf alert without a credentialId ignored");
        return Ok(no_content());
    };
    let row = match Uuid::try_parse(raw_id) {
        Ok(id) => creds::get_by_leaf_id(&st.gateway.db, id).await?,
        Err(_) => None,
    };
    let Some(row) = row else {
        alert_outcome("unknown_credential");
        metrics::counter!("credsync_alerts_unknown_credential_total").increment(1);
        tracing::warn!(credential_id = %raw_id.chars().take(64).collect::<String>(), alert_type = %kind,
            "Leaf alert for a credential credsync does not track ignored");
        return Ok(no_content());
    };
    let Some(status) = alert_status(&alert) else {
        alert_outcome("unusable");
        tracing::warn!(leaf_user_id = %row.leaf_user_id, provider = %row.provider, alert_type = %kind,
            "Leaf alert without a usable status or type ignored");
        return Ok(no_content());
    };
    let changed = creds::set_status(
        &st.gateway.db,
        row.leaf_user_id,
        &row.provider,
        &status,
        StatusSource::Alert,
    )
    .await?;
    alert_outcome(if changed { "applied" } else { "unchanged" });
    tracing::info!(leaf_user_id = %row.leaf_user_id, provider = %row.provider, %status, changed,
        "Leaf alert received");
    Ok(no_content())
}

/// Property tests: the alerts webhook's signature check and body handling on hostile input.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;
    use crate::http::json_out::strategies::{self, arb_text};

    const SECRET: &str = "webhook-props-secret";

    fn sign(body: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(hmac_sha256(SECRET.as_bytes(), body))
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,80}".prop_map(Value::from),
            Just(Value::from("credentialsUnauthenticated")),
            Just(Value::from("credentialsLimitedPermission")),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("type".to_owned()),
                        Just("status".to_owned()),
                        Just("credentialId".to_owned()),
                        "[a-z]{0,6}",
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn arb_time() -> impl Strategy<Value = Canonical> {
        strategies::arb_time().prop_map(Canonical)
    }

    proptest! {
        #[test]
        fn a_credential_item_is_written_as_serde_writes_it(
            id in any::<u128>(),
            provider in arb_text(),
            status in prop::option::of(arb_text()),
            checked_at in prop::option::of(arb_time()),
            changed_at in prop::option::of(arb_time()),
            sync_state in arb_text(),
            rejection in prop::option::of((prop::option::of(any::<i32>()), prop::option::of(arb_text()))),
            created_at in arb_time(),
            updated_at in arb_time(),
        ) {
            let item = CredentialOut {
                leaf_user_id: Uuid::from_u128(id),
                provider: &provider,
                status: status.as_deref(),
                checked_at,
                changed_at,
                sync_state: &sync_state,
                rejection: rejection.as_ref().map(|(status, detail)| RejectionOut {
                    status: *status,
                    detail: detail.as_deref(),
                }),
                created_at,
                updated_at,
            };
            let mut written = Vec::new();
            item.write_json(&mut written).unwrap();
            prop_assert_eq!(
                String::from_utf8(written).unwrap(),
                serde_json::to_string(&item).unwrap()
            );
        }

        #[test]
        fn arbitrary_signature_headers_never_panic_or_match(
            body in prop::collection::vec(any::<u8>(), 0..300),
            header in prop::collection::vec(any::<u8>(), 0..80),
        ) {
            prop_assert!(!signature_matches(SECRET, &body, &header) || header.trim_ascii() == sign(&body).as_bytes());
        }

        #[test]
        fn the_right_signature_matches_and_any_change_does_not(
            body in prop::collection::vec(any::<u8>(), 0..300),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
            pad in prop_oneof![Just(""), Just(" "), Just("\t"), Just(" \r\n")],
        ) {
            let good = sign(&body);
            prop_assert!(signature_matches(SECRET, &body, good.as_bytes()));
            // Surrounding whitespace is tolerated (header values are trimmed).
            let padded = format!("{pad}{good}{pad}");
            prop_assert!(signature_matches(SECRET, &body, padded.as_bytes()));
            // Another body.
            if !body.is_empty() {
                let mut other = body.clone();
                let i = flip.index(other.len());
                other[i] ^= 1 << bit;
                prop_assert!(!signature_matches(SECRET, &other, good.as_bytes()));
            }
            // Another secret, URL-safe alphabet, hex, a truncated or an empty signature.
            let other_secret = base64::engine::general_purpose::STANDARD
                .encode(hmac_sha256(b"another-secret", &body));
            prop_assert!(!signature_matches(SECRET, &body, other_secret.as_bytes()));
            let hex: String = hmac_sha256(SECRET.as_bytes(), &body).iter().map(|b| format!("{b:02x}")).collect();
            prop_assert!(!signature_matches(SECRET, &body, hex.as_bytes()));
            prop_assert!(!signature_matches(SECRET, &body, &good.as_bytes()[..good.len() - 4]));
            prop_assert!(!signature_matches(SECRET, &body, b""));
        }

        #[test]
        fn alert_status_is_bounded_printable_and_never_panics(v in arb_json()) {
            if let Value::Object(alert) = &v
                && let Some(status) = alert_status(alert)
            {
                prop_assert!(!status.is_empty() && status.len() <= 64);
                prop_assert!(status.bytes().all(|b| b.is_ascii_graphic()), "{status:?}");
                let explicit = alert.get("status").and_then(Value::as_str).map(str::trim);
                let implied = alert.get("type").and_then(Value::as_str).and_then(status_for_type);
                prop_assert!(Some(status.as_str()) == explicit || Some(status.as_str()) == implied);
            }
            // The handler's own first steps: parse, then the confirmation check.
            let bytes = v.to_string().into_bytes();
            let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
            prop_assert!(parsed.is_some());
        }

        #[test]
        fn arbitrary_body_bytes_parse_or_fail_cleanly(body in prop::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(Value::Object(alert)) = serde_json::from_slice::<Value>(&body) {
                let _ = alert_status(&alert);
            }
            prop_assert!(signature_matches(SECRET, &body, sign(&body).as_bytes()));
        }
    }
}
