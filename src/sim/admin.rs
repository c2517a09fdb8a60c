//! The simulator's admin routes under `/__sim/` (no authentication, camelCase JSON): reset,
//! faults, the request log, scenario set-up (credentials, events, status flips, token
//! revocation, token lifetime) and forced alert deliveries. Never served to Leaf clients as
//! Leaf routes; the gate does not see them.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, http::StatusCode, web};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use super::alerts::{self, AlertBody, Signing};
use super::json::{Obj, Problem, admin_json, parse_ts};
use super::leaf_routes::{credential_not_found, parse_segment, parse_user_id};
use super::providers::{DEFAULT_SEGMENT, PROVIDERS};
use super::state::{Created, Fault, NewEvent, SimState, lock, random_string};

/// Most events one `generate` call may add.
const MAX_GENERATE: u64 = 1_000_000;

type Answer = Result<HttpResponse, Problem>;

/// Registers the admin routes (mounted under `/__sim`).
pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/reset", web::post().to(reset))
        .route("/faults", web::put().to(put_faults))
        .route("/faults", web::get().to(get_faults))
        .route("/faults", web::delete().to(delete_faults))
        .route("/requests", web::get().to(get_requests))
        .route("/requests", web::delete().to(delete_requests))
        .route("/users/{user}/{segment}/status", web::put().to(put_status))
        .route("/users/{user}/{segment}/events", web::post().to(add_events))
        .route("/credentials", web::post().to(create_credential))
        .route("/tokens/revoke", web::post().to(revoke_tokens))
        .route("/config", web::put().to(put_config))
        .route("/alerts", web::post().to(send_alert))
        .route("/webhooks", web::get().to(get_webhooks))
        .route(
            "/state/users/{user}/{segment}",
            web::get().to(get_stored_credential),
        )
        .default_service(web::to(admin_not_found));
}

fn finish(req: &HttpRequest, answer: Answer) -> HttpResponse {
    answer.unwrap_or_else(|p| p.render(req.path()))
}

fn no_content() -> HttpResponse {
    HttpResponse::NoContent().finish()
}

/// An admin body: empty means all defaults; unknown fields are refused.
fn body<T: DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, Problem> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| Problem::bad_request(format!("Invalid body: {e}")))
}

async fn admin_not_found(req: HttpRequest) -> HttpResponse {
    Problem::not_found(format!("No admin route {} {}", req.method(), req.path())).render(req.path())
}

async fn reset(state: web::Data<SimState>) -> HttpResponse {
    state.reset();
    no_content()
}

async fn put_faults(
    req: HttpRequest,
    state: web::Data<SimState>,
    bytes: web::Bytes,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let fault: Fault = body(&bytes)?;
        fault.validate().map_err(Problem::bad_request)?;
        state.set_fault(fault);
        Ok(no_content())
    })();
    finish(&req, answer)
}

async fn get_faults(state: web::Data<SimState>) -> HttpResponse {
    admin_json(StatusCode::OK, &state.current_fault())
}

async fn delete_faults(state: web::Data<SimState>) -> HttpResponse {
    state.clear_fault();
    no_content()
}

async fn get_requests(state: web::Data<SimState>) -> HttpResponse {
    admin_json(StatusCode::OK, &state.log_snapshot())
}

async fn delete_requests(state: web::Data<SimState>) -> HttpResponse {
    state.clear_log();
    no_content()
}

async fn revoke_tokens(state: web::Data<SimState>) -> HttpResponse {
    state.tokens.revoke_all();
    no_content()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigBody {
    token_ttl_secs: Option<u64>,
    token_ttl_ms: Option<u64>,
}

async fn put_config(
    req: HttpRequest,
    state: web::Data<SimState>,
    bytes: web::Bytes,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let cfg: ConfigBody = body(&bytes)?;
        let ttl = match (cfg.token_ttl_ms, cfg.token_ttl_secs) {
            (Some(ms), _) => Some(Duration::from_millis(ms)),
            (None, Some(s)) => Some(Duration::from_secs(s)),
            (None, None) => None,
        };
        if let Some(ttl) = ttl {
            state.tokens.set_ttl(ttl);
        }
        Ok(no_content())
    })();
    finish(&req, answer)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StatusBody {
    status: Option<String>,
    #[serde(default)]
    alert: bool,
    /// Alert type to send instead of the one the status implies.
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn put_status(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<(String, String)>,
    bytes: web::Bytes,
) -> HttpResponse {
    let prepared = (|| -> Result<Option<(AlertBody, String)>, Problem> {
        let provider = parse_segment(&path.1)?;
        let user = parse_user_id(&path.0)?;
        let b: StatusBody = body(&bytes)?;
        let status = b
            .status
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| Problem::bad_request("Field 'status' is required"))?;
        let mut store = lock(&state.store);
        let cred = store
            .credential_mut(&user, provider)
            .ok_or_else(|| credential_not_found(&user, provider))?;
        cred.status = status.clone();
        let cred_id = cred.id.to_string();
        drop(store);
        if !b.alert {
            return Ok(None);
        }
        let kind = b
            .kind
            .or_else(|| alerts::type_for_status(&status).map(str::to_owned));
        Ok(kind.map(|k| {
            let alert = AlertBody::new(PROVIDERS[provider].name, &cred_id, &status, &k);
            (alert, k)
        }))
    })();
    match prepared {
        Err(p) => p.render(req.path()),
        Ok(None) => no_content(),
        Ok(Some((alert, kind))) => {
            let hooks = alerts::hooks_for(&state, &kind);
            alerts::deliver_all(&state, &hooks, &alert.to_bytes(), Signing::Valid).await;
            no_content()
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EventIn {
    id: Option<String>,
    created_date: Option<String>,
    status_code: Option<u16>,
    headers: Option<String>,
    body: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EventsBody {
    events: Option<Vec<EventIn>>,
    generate: Option<u64>,
    status_code: Option<u16>,
    start: Option<String>,
    step_secs: Option<i64>,
    headers: Option<String>,
    body: Option<String>,
}

fn events_to_add(b: EventsBody) -> Result<Vec<NewEvent>, Problem> {
    match (b.events, b.generate) {
        (Some(_), Some(_)) => Err(Problem::bad_request(
            "Send either 'events' or 'generate', not both",
        )),
        (None, None) => Err(Problem::bad_request("Send 'events' or 'generate'")),
        (Some(events), None) => events
            .into_iter()
            .map(|e| {
                let created = match e.created_date {
                    None => Created::Now,
                    Some(raw) => {
                        let at = parse_ts(&raw).ok_or_else(|| {
                            Problem::bad_request(format!("Invalid createdDate '{raw}'"))
                        })?;
                        Created::Raw(at, raw)
                    }
                };
                Ok(NewEvent {
                    id: e.id,
                    created,
                    status_code: e.status_code.unwrap_or(200),
                    headers: e.headers,
                    body: e.body,
                })
            })
            .collect(),
        (None, Some(n)) => {
            if n > MAX_GENERATE {
                return Err(Problem::bad_request(format!(
                    "'generate' is at most {MAX_GENERATE}"
                )));
            }
            let step = time::Duration::seconds(b.step_secs.unwrap_or(60));
            let count = i32::try_from(n).unwrap_or(i32::MAX);
            let out_of_range =
                || Problem::bad_request("'start' and 'stepSecs' give dates out of range");
            let start = match b.start {
                Some(raw) => parse_ts(&raw)
                    .ok_or_else(|| Problem::bad_request(format!("Invalid start '{raw}'")))?,
                None => step
                    .checked_mul(count)
                    .and_then(|span| OffsetDateTime::now_utc().checked_sub(span))
                    .ok_or_else(out_of_range)?,
            };
            let status_code = b.status_code.unwrap_or(200);
            (0..count)
                .map(|i| {
                    let at = step
                        .checked_mul(i)
                        .and_then(|offset| start.checked_add(offset))
                        .ok_or_else(out_of_range)?;
                    Ok(NewEvent {
                        id: None,
                        created: Created::At(at),
                        status_code,
                        headers: b.headers.clone(),
                        body: b.body.clone(),
                    })
                })
                .collect()
        }
    }
}

async fn add_events(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<(String, String)>,
    bytes: web::Bytes,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let provider = parse_segment(&path.1)?;
        let user = parse_user_id(&path.0)?;
        let new = events_to_add(body(&bytes)?)?;
        let added = lock(&state.store)
            .credential_mut(&user, provider)
            .ok_or_else(|| credential_not_found(&user, provider))?
            .add_events(new);
        Ok(admin_json(
            StatusCode::CREATED,
            &serde_json::json!({ "added": added }),
        ))
    })();
    finish(&req, answer)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CredentialBody {
    leaf_user_id: Option<String>,
    segment: Option<String>,
    fields: Option<Map<String, Value>>,
    status: Option<String>,
}

/// A stored credential with its user id in front.
fn with_user(user: &Uuid, cred: Obj) -> Obj {
    let mut o = Obj::with_capacity(cred.0.len() + 1);
    o.put("leafUserId", user.to_string());
    o.0.extend(cred.0);
    o
}

async fn create_credential(
    req: HttpRequest,
    state: web::Data<SimState>,
    bytes: web::Bytes,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let b: CredentialBody = body(&bytes)?;
        let provider = parse_segment(b.segment.as_deref().unwrap_or(DEFAULT_SEGMENT))?;
        let user = match &b.leaf_user_id {
            Some(raw) => parse_user_id(raw)?,
            None => Uuid::new_v4(),
        };
        let given = b.fields.unwrap_or_default();
        let p = &PROVIDERS[provider];
        if let Some(unknown) = given.keys().find(|k| !p.fields.contains(&k.as_str())) {
            return Err(Problem::bad_request(format!(
                "Unrecognized field '{unknown}' for {}",
                p.segment
            )));
        }
        let mut fields = Vec::with_capacity(p.fields.len());
        for name in p.fields {
            let value = match given.get(*name) {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) if *name == "clientEnvironment" => "PRODUCTION".to_owned(),
                None | Some(Value::Null) => format!("sim-{name}-{}", random_string(12)),
                Some(_) => {
                    return Err(Problem::bad_request(format!(
                        "Field '{name}' must be a string"
                    )));
                }
            };
            fields.push(((*name).to_owned(), value));
        }
        let status = b.status.unwrap_or_else(|| "OK".to_owned());
        let obj = lock(&state.store)
            .create_credential(user, provider, fields, status)?
            .to_obj();
        Ok(admin_json(StatusCode::CREATED, &with_user(&user, obj)))
    })();
    finish(&req, answer)
}

async fn get_stored_credential(
    req: HttpRequest,
    state: web::Data<SimState>,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let answer = (|| -> Answer {
        let provider = parse_segment(&path.1)?;
        let user = parse_user_id(&path.0)?;
        let store = lock(&state.store);
        let cred = store
            .credential(&user, provider)
            .ok_or_else(|| credential_not_found(&user, provider))?;
        let mut obj = with_user(&user, cred.to_obj());
        obj.put("eventCount", cred.events.len());
        drop(store);
        Ok(admin_json(StatusCode::OK, &obj))
    })();
    finish(&req, answer)
}

async fn get_webhooks(state: web::Data<SimState>) -> HttpResponse {
    let items: Vec<Obj> = lock(&state.store)
        .webhooks
        .iter()
        .map(|w| w.to_obj())
        .collect();
    admin_json(StatusCode::OK, &items)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AlertRequest {
    credential_id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    status: Option<String>,
    signature: Option<String>,
    raw_body: Option<String>,
}

async fn send_alert(
    req: HttpRequest,
    state: web::Data<SimState>,
    bytes: web::Bytes,
) -> HttpResponse {
    // The alert, its signing, and its type (`None` for a raw body, sent to every webhook).
    let prepared = (|| -> Result<(Vec<u8>, Signing, Option<String>), Problem> {
        let b: AlertRequest = body(&bytes)?;
        let signing = match b.signature.as_deref().unwrap_or("valid") {
            "valid" => Signing::Valid,
            "invalid" => Signing::Invalid,
            "none" => Signing::None,
            other => {
                return Err(Problem::bad_request(format!(
                    "signature must be valid, invalid or none, not '{other}'"
                )));
            }
        };
        if let Some(raw) = b.raw_body {
            return Ok((raw.into_bytes(), signing, None));
        }
        let credential_id = b.credential_id.ok_or_else(|| {
            Problem::bad_request("Field 'credentialId' is required (or send 'rawBody')")
        })?;
        let provider_name = Uuid::parse_str(&credential_id)
            .ok()
            .and_then(|id| {
                lock(&state.store)
                    .credential_by_id(&id)
                    .map(|(_, c)| c.provider().name)
            })
            .unwrap_or(PROVIDERS[0].name);
        let status = b
            .status
            .or_else(|| {
                b.kind
                    .as_deref()
                    .and_then(alerts::status_for_type)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "UNAUTHENTICATED".to_owned());
        let kind = b
            .kind
            .or_else(|| alerts::type_for_status(&status).map(str::to_owned))
            .unwrap_or_else(|| alerts::UNAUTHENTICATED_TYPE.to_owned());
        let alert = AlertBody::new(provider_name, &credential_id, &status, &kind);
        Ok((alert.to_bytes(), signing, Some(kind)))
    })();
    let (payload, signing, kind) = match prepared {
        Ok(p) => p,
        Err(p) => return p.render(req.path()),
    };
    // As Leaf: an alert goes to the webhooks registered for its type.
    let hooks = match &kind {
        Some(kind) => alerts::hooks_for(&state, kind),
        None => lock(&state.store).webhooks.clone(),
    };
    let deliveries = alerts::deliver_all(&state, &hooks, &payload, signing).await;
    admin_json(
        StatusCode::OK,
        &serde_json::json!({ "deliveries": deliveries }),
    )
}
