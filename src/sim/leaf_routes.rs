//! Leaf's own routes as the simulator serves them: `/api/authenticate`, the user-management
//! users and provider credentials (with events and the withdrawn `/status`), and the alerts
//! webhooks. Shapes, statuses, paging headers and problem bodies follow `LEAF-API.md`.
//! Authentication, faults and the request log are the gate's job (`gate.rs`), not these handlers'.

use actix_web::{
    HttpRequest, HttpResponse,
    http::{StatusCode, header},
    web,
};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::alerts::{self, Signing};
use super::json::{Obj, Problem, leaf_json, now_micros};
use super::providers::{CLIENT_ENVIRONMENTS, PROVIDERS, by_segment};
use super::state::{
    SimState, SortDir, User, UserFilter, UserSort, Webhook, credential_conflict, lock, page_events,
};

const USERS_BASE: &str = "/services/usermanagement/api";
const ALERTS_BASE: &str = "/services/alerts/api";
const DEFAULT_PAGE_SIZE: usize = 20;
const MAX_PAGE_SIZE: usize = 100;

type Answer = Result<HttpResponse, Problem>;

/// Registers the Leaf routes (the gate wraps them).
pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/authenticate")
            .route(web::post().to(authenticate))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::scope(USERS_BASE)
            .service(
                web::resource("/users")
                    .route(web::get().to(list_users))
                    .route(web::post().to(create_user))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/users/{user}")
                    .route(web::get().to(get_user))
                    .route(web::delete().to(delete_user))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/users/{user}/{segment}")
                    .route(web::get().to(get_credential))
                    .route(web::post().to(create_credential))
                    .route(web::delete().to(delete_credential))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/users/{user}/{segment}/events")
                    .route(web::get().to(list_events))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/users/{user}/{segment}/status")
                    .route(web::get().to(credential_status))
                    .default_service(web::to(method_not_allowed)),
            )
            .default_service(web::to(not_found)),
    )
    .service(
        web::scope(ALERTS_BASE)
            .service(
                web::resource("/alerts/webhooks")
                    .route(web::get().to(list_webhooks))
                    .route(web::post().to(create_webhook))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/alerts/webhooks/failed-calls")
                    .route(web::get().to(failed_calls))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/alerts/webhooks/{id}")
                    .route(web::get().to(get_webhook))
                    .route(web::delete().to(delete_webhook))
                    .default_service(web::to(method_not_allowed)),
            )
            .default_service(web::to(not_found)),
    );
}

fn finish(req: &HttpRequest, answer: Answer) -> HttpResponse {
    answer.unwrap_or_else(|p| p.render(req.path()))
}

/// 404 for any path Leaf does not have.
pub(crate) async fn not_found(req: HttpRequest) -> HttpResponse {
    Problem::not_found(format!("No endpoint {} {}.", req.method(), req.path())).render(req.path())
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("Request method '{}' is not supported", req.method()),
    )
    .render(req.path())
}

// ---------------------------------------------------------------------------------------
// Request parsing shared by the handlers

/// The JSON object of a request body, refused the way Spring refuses it: 415 for a missing
/// or non-JSON `Content-Type`, 400 for an empty or malformed body.
pub(crate) fn json_object(req: &HttpRequest, body: &[u8]) -> Result<Map<String, Value>, Problem> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" && !mime.ends_with("+json") {
        let shown = if ct.is_empty() {
            "application/octet-stream"
        } else {
            ct
        };
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type '{shown}' is not supported; send application/json."),
        ));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Problem::bad_request("Required request body is missing"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Problem::bad_request(
            "JSON parse error: the request body must be a JSON object",
        )),
        Err(e) => Err(Problem::bad_request(format!("JSON parse error: {e}"))),
    }
}

/// A path's `leafUserId`, which must be a UUID.
pub(crate) fn parse_user_id(raw: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw).map_err(|_| {
        Problem::bad_request(format!(
            "Failed to convert value '{raw}' of leafUserId: not a valid UUID"
        ))
    })
}

/// A path's provider segment; unknown → 404.
pub(crate) fn parse_segment(raw: &str) -> Result<usize, Problem> {
    by_segment(raw).ok_or_else(|| Problem::not_found(format!("No endpoint for '{raw}'.")))
}

fn query_pairs(req: &HttpRequest) -> Result<Vec<(String, String)>, Problem> {
    web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| Problem::bad_request(format!("Malformed query string: {e}")))
}

fn first<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `page` and `size` as Spring Data reads them: unparseable → default, negative page → 0,
/// size below 1 → default, above the maximum → the maximum.
fn paging(q: &[(String, String)]) -> (usize, usize) {
    let page = first(q, "page")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map_or(0, |p| usize::try_from(p.max(0)).unwrap_or(0));
    let size = first(q, "size")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map_or(DEFAULT_PAGE_SIZE, |s| {
            if s < 1 {
                DEFAULT_PAGE_SIZE
            } else {
                usize::try_from(s)
                    .unwrap_or(MAX_PAGE_SIZE)
                    .min(MAX_PAGE_SIZE)
            }
        });
    (page, size)
}

fn paged(
    req: &HttpRequest,
    q: &[(String, String)],
    page: usize,
    size: usize,
    total: usize,
    items: &[Obj],
) -> HttpResponse {
    let mut res = leaf_json(StatusCode::OK, items);
    let headers = res.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(&total.to_string()) {
        headers.insert(header::HeaderName::from_static("x-total-count"), v);
    }
    if let Ok(v) = header::HeaderValue::from_str(&crate::paging::link_header_for(
        req,
        q,
        page as u64,
        size as u64,
        total as u64,
    )) {
        headers.insert(header::LINK, v);
    }
    res
}

/// The value of string field `name`: required, a string, not blank.
fn required_string(map: &Map<String, Value>, name: &str) -> Result<String, Problem> {
    match map.get(name) {
        None | Some(Value::Null) => {
            Err(Problem::bad_request(format!("Field '{name}' is required"))
                .with_message("error.validation"))
        }
        Some(Value::String(s)) if s.trim().is_empty() => Err(Problem::bad_request(format!(
            "Field '{name}' must not be empty"
        ))
        .with_message("error.validation")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(
            Problem::bad_request(format!("Field '{name}' must be a string"))
                .with_message("error.validation"),
        ),
    }
}

fn optional_string(map: &Map<String, Value>, name: &str) -> Result<Option<String>, Problem> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Problem::bad_request(format!(
            "Field '{name}' must be a string"
        ))),
    }
}

/// A provider's create fields, validated as Leaf does; unknown fields are refused.
pub(crate) fn credential_fields(
    provider: usize,
    map: &Map<String, Value>,
) -> Result<Vec<(String, String)>, Problem> {
    let p = &PROVIDERS[provider];
    if let Some(unknown) = map.keys().find(|k| !p.fields.contains(&k.as_str())) {
        return Err(Problem::bad_request(format!(
            "Unrecognized field '{unknown}' (known fields: {})",
            p.fields.join(", ")
        )));
    }
    let mut fields = Vec::with_capacity(p.fields.len());
    for name in p.fields {
        let value = required_string(map, name)?;
        if *name == "clientEnvironment" && !CLIENT_ENVIRONMENTS.contains(&value.as_str()) {
            return Err(Problem::bad_request(format!(
                "Field 'clientEnvironment' must be one of {}",
                CLIENT_ENVIRONMENTS.join(", ")
            )));
        }
        fields.push(((*name).to_owned(), value));
    }
    Ok(fields)
}

/// Leaf refuses refresh tokens the provider rejects; here, those starting with `invalid`.
pub(crate) fn check_refresh_token(fields: &[(String, String)]) -> Result<(), Problem> {
    let bad = fields
        .iter()
        .any(|(k, v)| k == "refreshToken" && v.starts_with("invalid"));
    if bad {
        Err(Problem::bad_request("Invalid refresh token").with_message("error.invalidRefreshToken"))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Authentication

async fn authenticate(
    req: HttpRequest,
    state: web::Data<SimState>,
    body: web::Bytes,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let map = json_object(&req, &body)?;
        let username = required_string(&map, "username")?;
        let password = required_string(&map, "password")?;
        match map.get("rememberMe") {
            None | Some(Value::Null | Value::Bool(_)) => {}
            Some(Value::String(s)) if s == "true" || s == "false" => {}
            Some(_) => {
                return Err(Problem::bad_request("Field 'rememberMe' must be a boolean"));
            }
        }
        let user_ok = state.opts.username.as_ref().is_none_or(|u| *u == username);
        let pass_ok = state.opts.password.as_ref().is_none_or(|p| *p == password);
        if !(user_ok && pass_ok) {
            return Err(Problem::new(StatusCode::UNAUTHORIZED, "Bad credentials"));
        }
        let token = state
            .tokens
            .issue(&username)
            .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let mut res = leaf_json(StatusCode::OK, &serde_json::json!({ "id_token": token }));
        if let Ok(v) = header::HeaderValue::from_str(&format!("Bearer {token}")) {
            res.headers_mut().insert(header::AUTHORIZATION, v);
        }
        Ok(res)
    })();
    finish(&req, answer)
}

// ---------------------------------------------------------------------------------------
// Users

async fn list_users(req: HttpRequest, state: web::Data<SimState>) -> HttpResponse {
    let answer = (|| -> Answer {
        let q = query_pairs(&req)?;
        let (page, size) = paging(&q);
        let filter = UserFilter {
            email: first(&q, "email").map(str::to_owned),
            name: first(&q, "name").map(str::to_owned),
            external_id: first(&q, "externalId").map(str::to_owned),
            sort: user_sort(&q)?,
        };
        let (items, total) = lock(&state.store).list_users(&filter, page, size);
        Ok(paged(&req, &q, page, size, total, &items))
    })();
    finish(&req, answer)
}

async fn create_user(
    req: HttpRequest,
    state: web::Data<SimState>,
    body: web::Bytes,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let map = json_object(&req, &body)?;
        if map.get("id").is_some_and(|v| !v.is_null()) {
            return Err(Problem::bad_request("A new user cannot already have an ID")
                .with_message("error.idexists"));
        }
        let mut user = super::state::Store::new_user(Uuid::new_v4());
        user.name = optional_string(&map, "name")?;
        user.email = optional_string(&map, "email")?;
        user.external_id = optional_string(&map, "externalId")?;
        let obj = lock(&state.store).insert_user(user).to_obj();
        let location = format!("{USERS_BASE}/users/{}", id_of(&obj));
        let mut res = leaf_json(StatusCode::CREATED, &obj);
        if let Ok(v) = header::HeaderValue::from_str(&location) {
            res.headers_mut().insert(header::LOCATION, v);
        }
        Ok(res)
    })();
    finish(&req, answer)
}

fn id_of(obj: &Obj) -> String {
    obj.0
        .iter()
        .find(|(k, _)| k == "id")
        .and_then(|(_, v)| v.as_str())
        .unwrap_or_default()
        .to_owned()
}

fn user_not_found(id: &Uuid) -> Problem {
    Problem::not_found(format!("User {id} not found"))
}

async fn get_user(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<String>,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let id = parse_user_id(&path)?;
        let obj = lock(&state.store)
            .user(&id)
            .map(User::to_obj)
            .ok_or_else(|| user_not_found(&id))?;
        Ok(leaf_json(StatusCode::OK, &obj))
    })();
    finish(&req, answer)
}

async fn delete_user(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<String>,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let id = parse_user_id(&path)?;
        if lock(&state.store).delete_user(&id) {
            Ok(HttpResponse::NoContent().finish())
        } else {
            Err(user_not_found(&id))
        }
    })();
    finish(&req, answer)
}

// ---------------------------------------------------------------------------------------
// Credentials

/// 404 for a user without a credential of this provider.
pub(crate) fn credential_not_found(user: &Uuid, provider: usize) -> Problem {
    Problem::not_found(format!(
        "User {user} has no {}",
        PROVIDERS[provider].segment.replace('-', " ")
    ))
}

fn user_and_provider(path: &(String, String)) -> Result<(Uuid, usize), Problem> {
    let provider = parse_segment(&path.1)?;
    let user = parse_user_id(&path.0)?;
    Ok((user, provider))
}

async fn get_credential(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let (user, provider) = user_and_provider(&path)?;
        let obj = lock(&state.store)
            .credential(&user, provider)
            .map(|c| c.to_obj())
            .ok_or_else(|| credential_not_found(&user, provider))?;
        Ok(leaf_json(StatusCode::OK, &obj))
    })();
    finish(&req, answer)
}

async fn create_credential(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let (user, provider) = user_and_provider(&path)?;
        let map = json_object(&req, &body)?;
        let fields = credential_fields(provider, &map)?;
        let mut store = lock(&state.store);
        if store.credential(&user, provider).is_some() {
            // Leaf checks for an existing credential before talking to the provider.
            return Err(credential_conflict(provider));
        }
        check_refresh_token(&fields)?;
        let obj = store
            .create_credential(user, provider, fields, "OK".into())?
            .to_obj();
        drop(store);
        Ok(leaf_json(StatusCode::CREATED, &obj))
    })();
    finish(&req, answer)
}

async fn delete_credential(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let (user, provider) = user_and_provider(&path)?;
        if lock(&state.store).delete_credential(&user, provider) {
            Ok(HttpResponse::NoContent().finish())
        } else {
            Err(credential_not_found(&user, provider))
        }
    })();
    finish(&req, answer)
}

async fn credential_status(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let (user, provider) = user_and_provider(&path)?;
        let status = lock(&state.store)
            .credential(&user, provider)
            .map(|c| c.status.clone())
            .ok_or_else(|| credential_not_found(&user, provider))?;
        Ok(leaf_json(
            StatusCode::OK,
            &serde_json::json!({ "status": status }),
        ))
    })();
    finish(&req, answer)
}

/// The users list's `sort=property[,asc|desc]` (ascending by default, as Spring reads it).
fn user_sort(q: &[(String, String)]) -> Result<Option<(UserSort, bool)>, Problem> {
    let Some(raw) = first(q, "sort") else {
        return Ok(None);
    };
    let mut parts = raw.split(',').map(str::trim);
    let property = parts.next().unwrap_or("");
    let by = UserSort::parse(property).ok_or_else(|| {
        Problem::bad_request(format!(
            "No property '{property}' found for type 'LeafUser'"
        ))
    })?;
    let descending = match parts.next().map(str::to_ascii_lowercase).as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(other) => {
            return Err(Problem::bad_request(format!(
                "Invalid sort direction '{other}'"
            )));
        }
    };
    Ok(Some((by, descending)))
}

fn sort_dir(q: &[(String, String)]) -> Result<SortDir, Problem> {
    let Some(raw) = first(q, "sort") else {
        return Ok(SortDir::Desc);
    };
    let mut parts = raw.split(',').map(str::trim);
    let property = parts.next().unwrap_or("");
    if property != "createdDate" {
        return Err(Problem::bad_request(format!(
            "No property '{property}' found for type 'CredentialEvent'"
        )));
    }
    match parts.next().map(str::to_ascii_lowercase).as_deref() {
        None | Some("asc") => Ok(SortDir::Asc),
        Some("desc") => Ok(SortDir::Desc),
        Some(other) => Err(Problem::bad_request(format!(
            "Invalid sort direction '{other}'"
        ))),
    }
}

async fn list_events(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let (user, provider) = user_and_provider(&path)?;
        let q = query_pairs(&req)?;
        let (page, size) = paging(&q);
        let dir = sort_dir(&q)?;
        let (items, total) = {
            let store = lock(&state.store);
            let cred = store
                .credential(&user, provider)
                .ok_or_else(|| credential_not_found(&user, provider))?;
            (
                page_events(&cred.events, dir, page, size),
                cred.events.len(),
            )
        };
        Ok(paged(&req, &q, page, size, total, &items))
    })();
    finish(&req, answer)
}

// ---------------------------------------------------------------------------------------
// Alerts webhooks

fn webhook_not_found(id: &str) -> Problem {
    Problem::not_found(format!("Webhook {id} not found"))
}

fn parse_webhook(map: &Map<String, Value>) -> Result<Webhook, Problem> {
    let name = required_string(map, "name")?;
    let secret = required_string(map, "secret")?;
    let url = required_string(map, "url")?;
    let parsed = reqwest::Url::parse(&url)
        .map_err(|_| Problem::bad_request(format!("Field 'url' is not a valid URL: {url}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Problem::bad_request("Field 'url' must be an http(s) URL"));
    }
    let events = match map.get("events") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| match v {
                Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
                _ => Err(Problem::bad_request("Field 'events' must hold event names")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => {
            return Err(Problem::bad_request(
                "Field 'events' must be a non-empty array",
            ));
        }
    };
    Ok(Webhook {
        id: Uuid::new_v4(),
        name,
        url,
        secret,
        events,
        created_time: now_micros(),
    })
}

async fn create_webhook(
    req: HttpRequest,
    state: web::Data<SimState>,
    body: web::Bytes,
) -> HttpResponse {
    let hook = (|| -> Result<Webhook, Problem> {
        let map = json_object(&req, &body)?;
        let hook = parse_webhook(&map)?;
        let mut store = lock(&state.store);
        let taken = hook
            .events
            .iter()
            .find(|e| store.webhooks.iter().any(|w| w.events.contains(e)));
        if let Some(e) = taken {
            return Err(Problem::bad_request(format!(
                "Event {e} is already registered in another webhook"
            ))
            .with_message("eventRegisteredTwice"));
        }
        store.webhooks.push(hook.clone());
        Ok(hook)
    })();
    let hook = match hook {
        Ok(h) => h,
        Err(p) => return p.render(req.path()),
    };
    // Leaf confirms a registration with one signed message before answering here.
    alerts::deliver(&state, &hook, &alerts::confirmation_bytes(), Signing::Valid).await;
    let mut res = leaf_json(StatusCode::CREATED, &hook.to_obj());
    let location = format!("{ALERTS_BASE}/alerts/webhooks/{}", hook.id);
    if let Ok(v) = header::HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

async fn list_webhooks(state: web::Data<SimState>) -> HttpResponse {
    let items: Vec<Obj> = lock(&state.store)
        .webhooks
        .iter()
        .map(Webhook::to_obj)
        .collect();
    leaf_json(StatusCode::OK, &items)
}

async fn get_webhook(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<String>,
) -> HttpResponse {
    let found = lock(&state.store)
        .webhooks
        .iter()
        .find(|w| w.id.to_string() == *path)
        .map(Webhook::to_obj);
    match found {
        Some(obj) => leaf_json(StatusCode::OK, &obj),
        None => webhook_not_found(&path).render(req.path()),
    }
}

async fn delete_webhook(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<String>,
) -> HttpResponse {
    let mut store = lock(&state.store);
    let before = store.webhooks.len();
    store.webhooks.retain(|w| w.id.to_string() != *path);
    let removed = store.webhooks.len() < before;
    drop(store);
    if removed {
        HttpResponse::NoContent().finish()
    } else {
        webhook_not_found(&path).render(req.path())
    }
}

async fn failed_calls(state: web::Data<SimState>) -> HttpResponse {
    let items = lock(&state.store).failed_calls();
    leaf_json(StatusCode::OK, &serde_json::json!({ "items": items }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn paging_defaults_and_clamps_like_spring() {
        assert_eq!(paging(&q(&[])), (0, 20));
        assert_eq!(paging(&q(&[("page", "2"), ("size", "500")])), (2, 100));
        assert_eq!(paging(&q(&[("page", "-1"), ("size", "0")])), (0, 20));
        assert_eq!(paging(&q(&[("page", "x"), ("size", "y")])), (0, 20));
    }

    #[test]
    fn sort_accepts_created_date_in_both_directions() {
        assert_eq!(sort_dir(&q(&[])).unwrap(), SortDir::Desc);
        assert_eq!(
            sort_dir(&q(&[("sort", "createdDate,asc")])).unwrap(),
            SortDir::Asc
        );
        assert_eq!(
            sort_dir(&q(&[("sort", "createdDate,DESC")])).unwrap(),
            SortDir::Desc
        );
        assert!(sort_dir(&q(&[("sort", "statusCode,desc")])).is_err());
    }
}
