//! Leaf-compatible routes (SPEC §5) under `/services/usermanagement/api`.
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde::Deserialize;
use uuid::Uuid;

use super::AppState;
use super::extract::{Authed, read_json_body};
use crate::domain::{CreateBody, LeafUserId, Provider, Scope, provider_by_segment};
use crate::error::{ApiError, PROBLEM_JSON};
use crate::gateway::{Created, Deleted, Source};
use crate::store::audit::{self, Entry, Outcome};
use crate::store::idempotency::{self, Begin, Stored};

const BASE: &str = "/services/usermanagement/api/users/{leafUserId}/{segment}";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(BASE)
            .route(web::post().to(create))
            .route(web::get().to(get))
            .route(web::delete().to(delete))
            .default_service(web::to(|path: web::Path<(String, String)>| {
                method_not_allowed(path, "GET, POST, DELETE")
            })),
    )
    .service(
        web::resource(format!("{BASE}/status"))
            .route(web::get().to(status))
            .default_service(web::to(|path: web::Path<(String, String)>| {
                method_not_allowed(path, "GET")
            })),
    )
    .service(
        web::resource(format!("{BASE}/events"))
            .route(web::get().to(events))
            .default_service(web::to(|path: web::Path<(String, String)>| {
                method_not_allowed(path, "GET")
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

fn json_response(status: StatusCode, body: &serde_json::Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(body.to_string())
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
    let material = format!(
        "idempotency|{}",
        secrecy::ExposeSecret::expose_secret(&body.canonical)
    );
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
    let bytes = serde_json::to_vec(&view).unwrap_or_default();
    let resp = HttpResponse::build(status)
        .content_type("application/json")
        .body(bytes.clone());
    Ok((resp, bytes))
}

async fn get(
    st: web::Data<AppState>,
    who: Authed,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (provider, user) =
        target(&st, &who, path, Scope::CredentialsRead, "credential.read").await?;
    let reveal = who.caller.scopes.may_reveal();
    let (view, source) = st.gateway.get(provider, user, reveal, who.actor()).await?;
    Ok(with_source(json_response(StatusCode::OK, &view), source))
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
        None | Some("createdDate,desc") | Some("createdDate") => false,
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
    let mut resp = json_response(
        StatusCode::OK,
        &serde_json::to_value(&list).unwrap_or_default(),
    );
    if let Ok(v) = HeaderValue::from_str(&total.to_string()) {
        resp.headers_mut()
            .insert(header::HeaderName::from_static("x-total-count"), v);
    }
    Ok(with_source(resp, source))
}
