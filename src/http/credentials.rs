//! Leaf-compatible routes (SPEC §5) under `/services/usermanagement/api`.
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde::Deserialize;
use uuid::Uuid;

use super::AppState;
use super::extract::{Authed, read_json_body};
use super::json_out::JsonObject;
use crate::domain::{CreateBody, LeafUserId, Provider, Scope, provider_by_segment};
use crate::error::{ApiError, PROBLEM_JSON};
use crate::gateway::{Created, Deleted, Source, View, view_scopes};
use crate::store::audit::{self, Entry, Outcome};
use crate::store::idempotency::{self, Begin, Stored};
use crate::timefmt::Canonical;

const BASE: &str = "/services/usermanagement/api/users/{leafUserId}/{segment}";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(BASE)
            .route(web::post().to(create))
            .route(web::get().to(get))
            .route(web::delete().to(delete))
            .default_service(web::to(|path: web::Path<(String, String)>| {
                method_not_allowed(path, "GET, HEAD, POST, DELETE")
            })),
    )
    .service(
        web::resource(format!("{BASE}/status"))
            .route(web::get().to(status))
            .default_service(web::to(|path: web::Path<(String, String)>| {
                method_not_allowed(path, "GET, HEAD")
            })),
    )
    .service(
        web::resource(format!("{BASE}/events"))
            .route(web::get().to(events))
            .default_service(web::to(|path: web::Path<(String, String)>| {
                method_not_allowed(path, "GET, HEAD")
            })),
    );
}

/// 405 with `Allow` on a provider's routes; 404 when the path names no provider.
async fn method_not_allowed(
    path: web::Path<(String, String)>,
    allow: &'static str,
) -> Result<HttpResponse, ApiError> {
    provider(&path.1)?;
    Err(ApiError::MethodNotAllowed(allow))
}

fn provider(segment: &str) -> Result<&'static Provider, ApiError> {
    provider_by_segment(segment).ok_or_else(|| ApiError::NotFound("no such provider route".into()))
}

fn user_id(raw: &str) -> Result<Uuid, ApiError> {
    LeafUserId::parse(raw)
        .map(|u| u.0)
        .map_err(ApiError::Validation)
}

/// The provider and user a credential route is about, once the caller's scope is checked
/// (unknown provider → 404, missing scope → 403 audited as `denied`, bad user id → 400).
async fn target(
    st: &AppState,
    who: &Authed,
    path: web::Path<(String, String)>,
    scope: Scope,
    action: &str,
) -> Result<(&'static Provider, Uuid), ApiError> {
    let (raw_user, segment) = path.into_inner();
    let provider = provider(&segment)?;
    require(st, who, scope, action, &raw_user, provider).await?;
    Ok((provider, user_id(&raw_user)?))
}

/// Check the scope; a refusal on a credential route is audited as `denied`.
async fn require(
    st: &AppState,
    who: &Authed,
    scope: Scope,
    action: &str,
    raw_user: &str,
    provider: &Provider,
) -> Result<(), ApiError> {
    if let Err(e) = who.require(scope) {
        audit::record_logged(
            &st.gateway.db,
            &Entry {
                actor: &who.caller.sub,
                action,
                leaf_user_id: LeafUserId::parse(raw_user).ok().map(|u| u.0),
                provider: Some(provider.name),
                outcome: Outcome::Denied,
                request_id: Some(&who.request_id),
                detail: Some(&format!("missing scope {}", scope.as_str())),
            },
        )
        .await;
        return Err(e);
    }
    Ok(())
}

fn with_source(mut resp: HttpResponse, source: Source) -> HttpResponse {
    resp.headers_mut().insert(
        header::HeaderName::from_static("x-credsync-source"),
        HeaderValue::from_static(source.as_str()),
    );
    resp
}

/// A JSON answer from bytes already serialized.
fn json_body(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(body)
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> HttpResponse {
    json_body(status, serde_json::to_vec(body).unwrap_or_default())
}

async fn create(
    st: web::Data<AppState>,
    who: Authed,
    path: web::Path<(String, String)>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (provider, user) = target(
        &st,
        &who,
        path,
        Scope::CredentialsWrite,
        "credential.create",
    )
    .await?;
    let bytes = read_json_body(&req, payload, st.max_body_bytes).await?;
    let body = CreateBody::parse(provider, &bytes).map_err(ApiError::Validation)?;
    drop(bytes);
    refuse_nul(provider, &body)?;

    let Some(key) = idempotency_key(&req)? else {
        return create_response(&st, &who, provider, user, &body)
            .await
            .map(|(r, _)| r);
    };
    let keyring = &st.gateway.keyring;
    let material = {
        // Sized up front: `format!` would grow the string and free copies of the secrets.
        let canonical = secrecy::ExposeSecret::expose_secret(&body.canonical);
        let mut m = zeroize::Zeroizing::new(String::with_capacity(12 + canonical.len()));
        m.push_str("idempotency|");
        m.push_str(canonical);
        m
    };
    let (hash_key_id, hash) = keyring.keyed_hash(material.as_bytes());
    let path = req.path().to_owned();
    let begun = idempotency::begin(
        &st.gateway.db,
        &who.caller.sub,
        &path,
        &key,
        &hash_key_id,
        &hash,
        |kid, stored| {
            keyring
                .keyed_hash_with(kid, material.as_bytes())
                .is_some_and(|h| crate::crypto::ct_eq(&h, stored))
        },
    )
    .await?;
    drop(material);
    match begun {
        Begin::Replay(stored) => Ok(replay(stored)),
        Begin::Mismatch => Err(ApiError::IdempotencyMismatch),
        Begin::InProgress => Err(ApiError::IdempotencyInProgress),
        Begin::Started => {
            let result = create_response(&st, &who, provider, user, &body).await;
            match result {
                Ok((resp, body_bytes)) => {
                    let stored = Stored {
                        status: i32::from(resp.status().as_u16()),
                        content_type: Some("application/json".into()),
                        body: Some(body_bytes),
                        headers: None,
                    };
                    idempotency::complete(&st.gateway.db, &who.caller.sub, &path, &key, &stored)
                        .await?;
                    Ok(resp)
                }
                Err(err @ ApiError::Upstream { .. }) => {
                    let resp = err.error_response();
                    let status = resp.status();
                    let bytes = actix_web::body::to_bytes(resp.into_body())
                        .await
                        .unwrap_or_default();
                    let stored = Stored {
                        status: i32::from(status.as_u16()),
                        content_type: Some(PROBLEM_JSON.into()),
                        body: Some(bytes.to_vec()),
                        headers: None,
                    };
                    idempotency::complete(&st.gateway.db, &who.caller.sub, &path, &key, &stored)
                        .await?;
                    Err(err)
                }
                Err(err) => {
                    if let Err(e) =
                        idempotency::release(&st.gateway.db, &who.caller.sub, &path, &key).await
                    {
                        tracing::error!(error = %e, "could not release an idempotency key");
                    }
                    Err(err)
                }
            }
        }
    }
}

/// 400 naming the first field that holds a NUL character: Postgres text and jsonb cannot
/// store one, and no credential contains one.
fn refuse_nul(provider: &Provider, body: &CreateBody) -> Result<(), ApiError> {
    let has_nul = |name: &str| {
        body.public
            .get(name)
            .and_then(serde_json::Value::as_str)
            .is_some_and(|v| v.contains('\0'))
            || body
                .secrets
                .get(name)
                .is_some_and(|v| secrecy::ExposeSecret::expose_secret(v).contains('\0'))
    };
    match provider.create_fields.iter().find(|f| has_nul(f.name)) {
        Some(field) => Err(ApiError::Validation(format!(
            "field `{}` must not contain NUL characters",
            field.name
        ))),
        None => Ok(()),
    }
}

fn idempotency_key(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(v) = req.headers().get("idempotency-key") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| (0x21..0x7f).contains(&b)))
        .ok_or_else(|| {
            ApiError::Validation("Idempotency-Key must be 1-255 visible ASCII characters".into())
        })?;
    Ok(Some(s.to_owned()))
}

fn replay(stored: Stored) -> HttpResponse {
    let status = u16::try_from(stored.status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut b = HttpResponse::build(status);
    if let Some(ct) = stored.content_type {
        b.insert_header((header::CONTENT_TYPE, ct));
    }
    b.insert_header(("Idempotent-Replayed", "true"));
    b.body(stored.body.unwrap_or_default())
}

async fn create_response(
    st: &AppState,
    who: &Authed,
    provider: &Provider,
    user: Uuid,
    body: &CreateBody,
) -> Result<(HttpResponse, Vec<u8>), ApiError> {
    let (status, view) = match st.gateway.create(provider, user, body, who.actor()).await? {
        Created::Synced(v) => (StatusCode::CREATED, v),
        Created::Pending(v) => (StatusCode::ACCEPTED, v),
    };
    let bytes = view_body(provider, &view).map_err(|e| ApiError::Internal(e.into()))?;
    Ok((json_body(status, bytes.clone()), bytes))
}

async fn get(
    st: web::Data<AppState>,
    who: Authed,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (provider, user) =
        target(&st, &who, path, Scope::CredentialsRead, "credential.read").await?;
    let q: SourceQuery = parse_query(&req)?;
    let cache = cache_only(q.source.as_deref())?;
    let reveal = who.caller.scopes.may_reveal();
    let (view, source) = st
        .gateway
        .get(provider, user, reveal, cache, who.actor())
        .await?;
    let body = view_body(provider, &view).map_err(|e| ApiError::Internal(e.into()))?;
    Ok(with_source(json_body(StatusCode::OK, body), source))
}

/// The credential view written straight into a body, as [`View::to_value`] would serialize.
fn view_body(provider: &Provider, view: &View) -> serde_json::Result<Vec<u8>> {
    let row = &view.row;
    let public = &row.public_fields.0;
    let mut buf = Vec::with_capacity(512);
    let mut o = JsonObject::open(&mut buf);
    match row.leaf_credential_id {
        Some(id) => o.uuid("id", id),
        None => o.null("id"),
    }
    o.opt_text("status", row.status.as_deref());
    o.opt_time("createdTime", row.created_time.map(Canonical));
    for f in provider.create_fields.iter().filter(|f| !f.secret) {
        match public.get(f.name) {
            Some(v) => o.value(f.name, v),
            None => o.null(f.name),
        }
    }
    for name in provider.secret_fields() {
        match view.shown(name) {
            Some(shown) => o.text(name, &shown),
            None => o.null(name),
        }
    }
    let scopes = view_scopes(public);
    let no_scopes = serde_json::Value::Array(Vec::new());
    let scopes = scopes.unwrap_or(&no_scopes);
    o.value("scopes", scopes);
    let mut meta = o.object("tokenMetadata");
    meta.value("scopes", scopes);
    meta.close()?;
    o.text("syncState", &row.sync_state);
    o.time("updatedAt", Canonical(row.updated_at));
    o.close()?;
    Ok(buf)
}

async fn delete(
    st: web::Data<AppState>,
    who: Authed,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (provider, user) = target(
        &st,
        &who,
        path,
        Scope::CredentialsDelete,
        "credential.delete",
    )
    .await?;
    Ok(
        match st.gateway.delete(provider, user, who.actor()).await? {
            Deleted::Done => HttpResponse::NoContent().finish(),
            Deleted::Pending => json_response(
                StatusCode::ACCEPTED,
                &serde_json::json!({"syncState": "DELETE_PENDING"}),
            ),
        },
    )
}

#[derive(Deserialize)]
struct SourceQuery {
    source: Option<String>,
}

fn cache_only(source: Option<&str>) -> Result<bool, ApiError> {
    match source {
        None => Ok(false),
        Some("cache") => Ok(true),
        Some("leaf") => Ok(false),
        Some(_) => Err(ApiError::Validation(
            "source must be `cache` (or `leaf`)".into(),
        )),
    }
}

fn parse_query<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> Result<T, ApiError> {
    serde_urlencoded_from(req.query_string())
}

fn serde_urlencoded_from<T: serde::de::DeserializeOwned>(qs: &str) -> Result<T, ApiError> {
    web::Query::<T>::from_query(qs)
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::Validation(format!("bad query parameter: {e}")))
}

async fn status(
    st: web::Data<AppState>,
    who: Authed,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (provider, user) = target(&st, &who, path, Scope::StatusRead, "credential.read").await?;
    let q: SourceQuery = parse_query(&req)?;
    let (body, source) = st
        .gateway
        .status(
            provider,
            user,
            cache_only(q.source.as_deref())?,
            who.actor(),
        )
        .await?;
    Ok(with_source(json_response(StatusCode::OK, &body), source))
}

#[derive(Deserialize)]
struct EventsQuery {
    page: Option<String>,
    size: Option<String>,
    sort: Option<String>,
    source: Option<String>,
}

async fn events(
    st: web::Data<AppState>,
    who: Authed,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let (provider, user) = target(&st, &who, path, Scope::StatusRead, "credential.read").await?;
    let q: EventsQuery = parse_query(&req)?;
    let digits = |v: &str| {
        let v = v.trim();
        (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())).then(|| v.to_owned())
    };
    // `page` is an int32 as Leaf reads it; `size` is any integer from 1, clamped to 100.
    let page = match q.page.as_deref() {
        None => 0,
        Some(p) => digits(p)
            .and_then(|p| p.parse::<i32>().ok())
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| {
                ApiError::Validation("page must be an integer from 0 to 2147483647".into())
            })?,
    };
    let size = match q.size.as_deref() {
        None => 20,
        Some(s) => digits(s)
            .map(|s| s.parse::<u32>().map_or(100, |n| n.min(100)))
            .filter(|s| *s >= 1)
            .ok_or_else(|| ApiError::Validation("size must be an integer of at least 1".into()))?,
    };
    let ascending = match q.sort.as_deref() {
        None | Some("createdDate,desc") => false,
        Some("createdDate,asc") => true,
        Some(_) => {
            return Err(ApiError::Validation(
                "sort must be createdDate,desc or createdDate,asc".into(),
            ));
        }
    };
    let cache = cache_only(q.source.as_deref())?;
    let (list, total, source) = st
        .gateway
        .events(provider, user, page, size, ascending, cache, who.actor())
        .await?;
    let body = serde_json::to_vec(&list).map_err(|e| ApiError::Internal(e.into()))?;
    let mut resp = json_body(StatusCode::OK, body);
    if let Ok(v) = HeaderValue::from_str(&total.to_string()) {
        resp.headers_mut()
            .insert(header::HeaderName::from_static("x-total-count"), v);
    }
    // Leaf's `Link` (next, prev, last, first), pointing at this route.
    let kept: Vec<(String, String)> =
        web::Query::<Vec<(String, String)>>::from_query(req.query_string())
            .map(web::Query::into_inner)
            .unwrap_or_default();
    let total = u64::try_from(total).unwrap_or(0);
    let link = crate::paging::link_header_for(&req, &kept, page.into(), size.into(), total);
    if let Ok(v) = HeaderValue::from_str(&link) {
        resp.headers_mut().insert(header::LINK, v);
    }
    Ok(with_source(resp, source))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use secrecy::SecretString;
    use serde_json::{Value, json};
    use sqlx::types::Json;

    use super::*;
    use crate::crypto::SecretFields;
    use crate::domain::provider::CLIMATE_FIELD_VIEW;
    use crate::gateway::ViewSecrets;
    use crate::http::json_out::strategies::{arb_text, arb_time};
    use crate::rowcache::{Cached, RowCache};
    use crate::store::credentials::CredentialRow;

    fn arb_json() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            arb_text().prop_map(Value::from),
            prop::collection::vec(arb_text().prop_map(Value::from), 0..4).prop_map(Value::Array),
        ]
    }

    /// Leaf's non-secret fields as credsync stores them: any of the places scopes can hide.
    fn arb_public() -> impl Strategy<Value = serde_json::Map<String, Value>> {
        (
            prop::option::of(arb_json()),
            prop::option::of(arb_json()),
            prop::option::of(prop::option::of(arb_json())),
            prop::option::of(arb_json()),
        )
            .prop_map(|(client_id, scopes, meta, other)| {
                let mut m = serde_json::Map::new();
                if let Some(v) = client_id {
                    m.insert("clientId".into(), v);
                }
                if let Some(v) = scopes {
                    m.insert("scopes".into(), v);
                }
                match meta {
                    Some(Some(v)) => {
                        m.insert("tokenMetadata".into(), json!({ "scopes": v }));
                    }
                    Some(None) => {
                        m.insert("tokenMetadata".into(), json!({}));
                    }
                    None => {}
                }
                if let Some(v) = other {
                    m.insert("somethingLeafAdded".into(), v);
                }
                m
            })
    }

    proptest! {
        #[test]
        fn the_written_view_is_the_credential_view(
            id in prop::option::of(any::<u128>()),
            status in prop::option::of(arb_text()),
            created_time in prop::option::of(arb_time()),
            updated_at in arb_time(),
            public in arb_public(),
            secrets in prop::option::of(prop::collection::btree_map(
                prop::sample::select(vec!["clientSecret", "apiKey", "refreshToken", "accessToken"]),
                arb_text(),
                0..4,
            )),
            sync_state in prop::sample::select(vec!["SYNCED", "PENDING_UPSTREAM"]),
            reveal in any::<bool>(),
        ) {
            let view = View {
                row: CredentialRow {
                    leaf_user_id: uuid::Uuid::from_u128(7),
                    provider: CLIMATE_FIELD_VIEW.name.to_owned(),
                    leaf_credential_id: id.map(uuid::Uuid::from_u128),
                    sync_state: sync_state.to_owned(),
                    status,
                    checked_at: None,
                    changed_at: None,
                    created_time,
                    public_fields: Json(public),
                    key_id: None,
                    wrapped_key: None,
                    secrets: None,
                    rejection_status: None,
                    rejection_detail: None,
                    created_at: updated_at,
                    updated_at,
                },
                secrets: ViewSecrets::Opened(secrets.map(|m| {
                    let mut s = SecretFields::default();
                    for (k, v) in m {
                        s.insert(k, SecretString::from(v));
                    }
                    s
                })),
                reveal,
            };
            let written = view_body(&CLIMATE_FIELD_VIEW, &view).unwrap();
            // A view made from a cached row's marks is the same view (never revealing).
            if let (false, ViewSecrets::Opened(opened)) = (reveal, &view.secrets) {
                let marked = View {
                    row: view.row.clone(),
                    secrets: ViewSecrets::Cached(std::sync::Arc::new(Cached {
                        row: view.row.clone(),
                        secrets: opened.as_ref().map(|s| RowCache::new(std::time::Duration::ZERO).marks(s)),
                    })),
                    reveal,
                };
                prop_assert_eq!(view_body(&CLIMATE_FIELD_VIEW, &marked).unwrap(), written.clone());
                prop_assert_eq!(marked.to_value(&CLIMATE_FIELD_VIEW), view.to_value(&CLIMATE_FIELD_VIEW));
            }
            let parsed: Value = serde_json::from_slice(&written).unwrap();
            // Both sides through the same text-to-number parse (serde_json's is not exact).
            let reference = serde_json::to_vec(&view.to_value(&CLIMATE_FIELD_VIEW)).unwrap();
            let reference: Value = serde_json::from_slice(&reference).unwrap();
            prop_assert_eq!(parsed, reference);
            // Every key once: a parse would hide a duplicate.
            let text = String::from_utf8(written).unwrap();
            for key in ["\"id\":", "\"status\":", "\"clientId\":", "\"apiKey\":", "\"syncState\":"] {
                prop_assert_eq!(text.matches(key).count(), 1, "{}", key);
            }
        }
    }
}
