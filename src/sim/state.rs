//! The simulator's shared state: Leaf users with their credentials and events, webhooks and
//! failed deliveries (the [`Store`]), issued tokens, the active fault and the request log.
//! Each part has its own `std::sync::Mutex`; no lock is ever held across an `.await`.
//! Handlers in `leaf_routes` and `admin` are the only callers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::http::StatusCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use super::SimOptions;
use super::json::{Obj, Problem, TsStyle, format_ts, now_micros, truncate};
use super::providers::{PROVIDERS, Provider};

/// Most request-log entries kept.
const LOG_CAPACITY: usize = 100_000;
/// Most failed webhook calls kept.
const FAILED_CALLS_CAPACITY: usize = 10_000;

/// Locks `m`, ignoring poisoning (a panicking handler leaves plain data behind).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A random alphanumeric string of `len` characters.
pub(crate) fn random_string(len: usize) -> String {
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Everything the simulator's handlers share (one per [`super::SimServer`]).
pub(crate) struct SimState {
    pub store: Mutex<Store>,
    fault: Mutex<Option<Fault>>,
    fault_set: AtomicBool,
    log: Mutex<RequestLog>,
    pub tokens: Tokens,
    /// The one HTTP client used for webhook deliveries.
    pub http: reqwest::Client,
    pub opts: SimOptions,
}

impl SimState {
    pub(crate) fn new(opts: SimOptions) -> std::io::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(SimState {
            store: Mutex::new(Store::default()),
            fault: Mutex::new(None),
            fault_set: AtomicBool::new(false),
            log: Mutex::new(RequestLog::default()),
            tokens: Tokens::new(opts.token_ttl)?,
            http,
            opts,
        })
    }

    /// `POST /__sim/reset`: forget everything but the configuration given at start.
    pub(crate) fn reset(&self) {
        *lock(&self.store) = Store::default();
        self.clear_fault();
        lock(&self.log).clear();
        self.tokens.clear_revocations();
        self.tokens.set_ttl(self.opts.token_ttl);
    }

    pub(crate) fn set_fault(&self, fault: Fault) {
        let mut f = lock(&self.fault);
        let active = fault.remaining != Some(0);
        *f = active.then_some(fault);
        self.fault_set.store(active, Ordering::Release);
    }

    pub(crate) fn clear_fault(&self) {
        let mut f = lock(&self.fault);
        *f = None;
        self.fault_set.store(false, Ordering::Release);
    }

    pub(crate) fn current_fault(&self) -> Option<Fault> {
        lock(&self.fault).clone()
    }

    /// Decides what the active fault (if any) does to this request, counting it down.
    pub(crate) fn decide_fault(&self, method: &str, path: &str, is_auth: bool) -> Option<Decision> {
        if !self.fault_set.load(Ordering::Acquire) {
            return None;
        }
        let mut guard = lock(&self.fault);
        let fault = guard.as_mut()?;
        if !fault.matches(method, path, is_auth) {
            return None;
        }
        let decision = fault.decide();
        if let Some(n) = fault.remaining.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                *guard = None;
                self.fault_set.store(false, Ordering::Release);
            }
        }
        Some(decision)
    }

    /// Records a Leaf request on arrival; returns its sequence number.
    pub(crate) fn log_arrival(&self, entry: LogEntry) -> u64 {
        lock(&self.log).push(entry)
    }

    /// Records the status answered to request `seq`.
    pub(crate) fn log_status(&self, seq: u64, status: u16) {
        lock(&self.log).set_status(seq, status);
    }

    /// `{"total", "requests"}` for `GET /__sim/requests`.
    pub(crate) fn log_snapshot(&self) -> Value {
        lock(&self.log).snapshot()
    }

    pub(crate) fn clear_log(&self) {
        lock(&self.log).clear();
    }
}

// ---------------------------------------------------------------------------------------
// Tokens

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    auth: String,
    iat: u64,
    exp: u64,
    /// Issue generation: tokens of a generation below the revocation mark are refused.
    #[serde(rename = "gen")]
    generation: u64,
}

/// Issues and checks the simulator's HS256 `id_token`s.
pub(crate) struct Tokens {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
    generation: AtomicU64,
    min_valid_generation: AtomicU64,
    ttl_ms: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Tokens {
    fn new(ttl: Duration) -> std::io::Result<Self> {
        let secret: [u8; 32] = rand::random();
        let enc = EncodingKey::from_secret(&secret).map_err(std::io::Error::other)?;
        let dec = DecodingKey::from_secret(&secret).map_err(std::io::Error::other)?;
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` is checked below with millisecond precision.
        validation.validate_exp = false;
        validation.leeway = 0;
        let t = Tokens {
            enc,
            dec,
            validation,
            generation: AtomicU64::new(0),
            min_valid_generation: AtomicU64::new(0),
            ttl_ms: AtomicU64::new(0),
        };
        t.set_ttl(ttl);
        Ok(t)
    }

    pub(crate) fn set_ttl(&self, ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.ttl_ms.store(ms, Ordering::Relaxed);
    }

    /// A new token for `sub`; `exp` is now + ttl, rounded up to whole seconds.
    pub(crate) fn issue(&self, sub: &str) -> Result<String, jsonwebtoken::errors::Error> {
        let now = now_ms();
        let exp_ms = now.saturating_add(self.ttl_ms.load(Ordering::Relaxed));
        let claims = Claims {
            sub: sub.to_owned(),
            auth: "ROLE_USER".to_owned(),
            iat: now / 1000,
            exp: exp_ms.div_ceil(1000),
            generation: self.generation.load(Ordering::Acquire),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc)
    }

    /// Checks an `Authorization` header value; the error is the problem detail.
    pub(crate) fn check_header(&self, header: Option<&str>) -> Result<(), &'static str> {
        let Some(value) = header else {
            return Err("Full authentication is required to access this resource");
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or("Full authentication is required to access this resource")?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.dec, &self.validation)
            .map_err(|_| "Invalid JWT token")?;
        if data.claims.exp.saturating_mul(1000) <= now_ms() {
            return Err("Expired JWT token");
        }
        if data.claims.generation < self.min_valid_generation.load(Ordering::Acquire) {
            return Err("Revoked JWT token");
        }
        Ok(())
    }

    /// Every token issued so far becomes invalid.
    pub(crate) fn revoke_all(&self) {
        let next = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.min_valid_generation.store(next, Ordering::Release);
    }

    /// Tokens revoked earlier are accepted again (if not expired).
    fn clear_revocations(&self) {
        self.min_valid_generation.store(0, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------
// Faults

/// The fault set with `PUT /__sim/faults` (every field optional).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub(crate) struct Fault {
    pub latency_ms: u64,
    pub error_rate: f64,
    pub error_status: u16,
    pub fixed_status: Option<u16>,
    pub retry_after_secs: Option<u64>,
    /// The `detail` of the problem body a faulted status carries (default "Simulated fault"),
    /// e.g. a Leaf refusal that quotes the credential.
    pub detail: Option<String>,
    pub hang: bool,
    pub garbage: bool,
    pub path_contains: Option<String>,
    pub method: Option<String>,
    pub include_auth: bool,
    pub remaining: Option<u64>,
}

impl Default for Fault {
    fn default() -> Self {
        Fault {
            latency_ms: 0,
            error_rate: 0.0,
            error_status: 500,
            fixed_status: None,
            retry_after_secs: None,
            detail: None,
            hang: false,
            garbage: false,
            path_contains: None,
            method: None,
            include_auth: false,
            remaining: None,
        }
    }
}

/// What a fault does to one request.
#[derive(Clone, Debug)]
pub(crate) enum FaultAction {
    Pass,
    Hang,
    /// A status, its `Retry-After` seconds and its problem detail.
    Status(StatusCode, Option<u64>, Option<String>),
    Garbage,
}

#[derive(Clone, Debug)]
pub(crate) struct Decision {
    pub latency: Duration,
    pub action: FaultAction,
}

impl Fault {
    /// Checks the values a client cannot mean; the error is the problem detail.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err("errorRate must be between 0 and 1".into());
        }
        for (name, status) in [
            ("errorStatus", Some(self.error_status)),
            ("fixedStatus", self.fixed_status),
        ] {
            if let Some(s) = status
                && !(100..=599).contains(&s)
            {
                return Err(format!("{name} {s} is not an HTTP status"));
            }
        }
        Ok(())
    }

    fn matches(&self, method: &str, path: &str, is_auth: bool) -> bool {
        if is_auth && !self.include_auth {
            return false;
        }
        if let Some(p) = &self.path_contains
            && !path.contains(p.as_str())
        {
            return false;
        }
        if let Some(m) = &self.method
            && !m.eq_ignore_ascii_case(method)
        {
            return false;
        }
        true
    }

    fn decide(&self) -> Decision {
        let status = |s: u16| StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let action = if self.hang {
            FaultAction::Hang
        } else if let Some(s) = self.fixed_status {
            FaultAction::Status(status(s), self.retry_after_secs, self.detail.clone())
        } else if self.error_rate > 0.0 && rand::random::<f64>() < self.error_rate {
            FaultAction::Status(
                status(self.error_status),
                self.retry_after_secs,
                self.detail.clone(),
            )
        } else if self.garbage {
            FaultAction::Garbage
        } else {
            FaultAction::Pass
        };
        Decision {
            latency: Duration::from_millis(self.latency_ms),
            action,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Request log

/// One Leaf request as `GET /__sim/requests` shows it.
#[derive(Clone, Debug)]
pub(crate) struct LogEntry {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: Option<u16>,
    pub request_id: Option<String>,
    pub at: OffsetDateTime,
}

#[derive(Default)]
struct RequestLog {
    entries: VecDeque<LogEntry>,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    /// Sequence number the next arrival gets.
    next_seq: u64,
    /// Sequence number at the last clear (`total` counts from there).
    cleared_at: u64,
}

impl RequestLog {
    fn push(&mut self, entry: LogEntry) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.entries.len() >= LOG_CAPACITY {
            self.entries.pop_front();
            self.first_seq += 1;
        }
        if self.entries.is_empty() {
            self.first_seq = seq;
        }
        self.entries.push_back(entry);
        seq
    }

    fn set_status(&mut self, seq: u64, status: u16) {
        if seq < self.first_seq {
            return;
        }
        let Ok(idx) = usize::try_from(seq - self.first_seq) else {
            return;
        };
        if let Some(e) = self.entries.get_mut(idx) {
            e.status = Some(status);
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.first_seq = self.next_seq;
        self.cleared_at = self.next_seq;
    }

    fn snapshot(&self) -> Value {
        let requests: Vec<Value> = self
            .entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "method": e.method,
                    "path": e.path,
                    "query": e.query,
                    "status": e.status,
                    "requestId": e.request_id,
                    "at": format_ts(e.at, TsStyle::Micros),
                })
            })
            .collect();
        serde_json::json!({ "total": self.next_seq - self.cleared_at, "requests": requests })
    }
}

// ---------------------------------------------------------------------------------------
// Users, credentials, events, webhooks

/// One event of a credential (an HTTP exchange of Leaf with the provider).
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub id: String,
    /// Sort key: the instant `created_date` denotes.
    pub at: OffsetDateTime,
    /// `createdDate` exactly as answered.
    pub created_date: String,
    pub status_code: u16,
    pub headers: String,
    pub body: String,
}

impl Event {
    fn key(&self) -> (OffsetDateTime, &str) {
        (self.at, self.id.as_str())
    }

    pub(crate) fn to_obj(&self) -> Obj {
        let mut o = Obj::with_capacity(5);
        o.put("id", self.id.as_str())
            .put("createdDate", self.created_date.as_str())
            .put("statusCode", self.status_code)
            .put("headers", self.headers.as_str())
            .put("body", self.body.as_str());
        o
    }
}

/// When a new event happened.
#[derive(Clone, Debug, Default)]
pub(crate) enum Created {
    /// Now, written in the event's style.
    #[default]
    Now,
    /// This instant, written in the event's style.
    At(OffsetDateTime),
    /// This instant, answered as exactly this string.
    Raw(OffsetDateTime, String),
}

/// Fields of an event to add; `None` values are generated.
#[derive(Clone, Debug, Default)]
pub(crate) struct NewEvent {
    pub id: Option<String>,
    pub created: Created,
    pub status_code: u16,
    pub headers: Option<String>,
    pub body: Option<String>,
}

/// One provider credential of a user.
#[derive(Clone, Debug)]
pub(crate) struct Credential {
    pub id: Uuid,
    pub provider: usize,
    /// The create fields, in the provider's order.
    pub fields: Vec<(String, String)>,
    pub access_token: String,
    pub status: String,
    pub created_time: String,
    /// Sorted ascending by (`at`, `id`).
    pub events: Vec<Event>,
    /// How many events were ever added (picks each event's timestamp style).
    events_added: u64,
}

impl Credential {
    pub(crate) fn provider(&self) -> &'static Provider {
        &PROVIDERS[self.provider]
    }

    /// The credential as Leaf answers it, secrets included.
    pub(crate) fn to_obj(&self) -> Obj {
        let p = self.provider();
        let mut o = Obj::with_capacity(6 + self.fields.len());
        o.put("id", self.id.to_string())
            .put("status", self.status.as_str())
            .put("createdTime", self.created_time.as_str())
            .put(
                "tokenMetadata",
                serde_json::json!({ "scopes": p.scopes.to_vec() }),
            );
        for (k, v) in &self.fields {
            o.put(k.as_str(), v.as_str());
        }
        if !p.fields.contains(&"accessToken") {
            o.put("accessToken", self.access_token.as_str());
        }
        o
    }

    /// Adds events, keeping them sorted; returns how many were added.
    pub(crate) fn add_events(&mut self, new: Vec<NewEvent>) -> usize {
        let n = new.len();
        let now = OffsetDateTime::now_utc();
        let single = n == 1;
        for e in new {
            let index = self.events_added;
            self.events_added += 1;
            let style = style_for_index(index);
            let (at, created_date) = match e.created {
                Created::Raw(at, raw) => (at, raw),
                Created::Now => {
                    let at = truncate(now, style);
                    (at, format_ts(at, style))
                }
                Created::At(t) => {
                    let at = truncate(t, style);
                    (at, format_ts(at, style))
                }
            };
            let event = Event {
                id: e.id.unwrap_or_else(|| Uuid::new_v4().to_string()),
                at,
                created_date,
                status_code: e.status_code,
                headers: e
                    .headers
                    .unwrap_or_else(|| r#"{"Content-Type": "application/json"}"#.to_owned()),
                body: e.body.unwrap_or_else(|| default_event_body(e.status_code)),
            };
            if single {
                let pos = self.events.partition_point(|x| x.key() <= event.key());
                self.events.insert(pos, event);
            } else {
                self.events.push(event);
            }
        }
        if !single {
            self.events
                .sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.id.cmp(&b.id)));
        }
        n
    }
}

/// The timestamp style of a credential's `index`-th event: mostly 6 digits with `Z`,
/// sometimes 3 digits, sometimes no zone (as `LEAF-API.md` warns).
pub(crate) fn style_for_index(index: u64) -> TsStyle {
    if index % 5 == 3 {
        TsStyle::Millis
    } else if index % 7 == 5 {
        TsStyle::MicrosNoZone
    } else {
        TsStyle::Micros
    }
}

fn default_event_body(status: u16) -> String {
    if (200..300).contains(&status) {
        r#"{"token_type": "Bearer", "expires_in": 14400, "scope": "offline"}"#.to_owned()
    } else if status == 401 || status == 400 {
        r#"{"error": "invalid_grant", "error_description": "Invalid refresh token"}"#.to_owned()
    } else {
        format!(r#"{{"status": {status}, "error": "provider error"}}"#)
    }
}

/// A Leaf user.
#[derive(Clone, Debug)]
pub(crate) struct User {
    pub id: Uuid,
    pub name: Option<String>,
    pub email: Option<String>,
    pub external_id: Option<String>,
    pub created_time: String,
    /// Credentials by provider index.
    pub credentials: BTreeMap<usize, Credential>,
}

impl User {
    fn new(id: Uuid) -> Self {
        User {
            id,
            name: None,
            email: None,
            external_id: None,
            created_time: now_micros(),
            credentials: BTreeMap::new(),
        }
    }

    /// The user as Leaf answers it, credentials (with secrets) embedded.
    pub(crate) fn to_obj(&self) -> Obj {
        let mut o = Obj::with_capacity(5 + PROVIDERS.len());
        o.put("id", self.id.to_string())
            .put("name", self.name.clone())
            .put("email", self.email.clone())
            .put("externalId", self.external_id.clone())
            .put("createdTime", self.created_time.as_str());
        for (i, p) in PROVIDERS.iter().enumerate() {
            let v = match self.credentials.get(&i) {
                Some(c) => serde_json::to_value(c.to_obj()).unwrap_or(Value::Null),
                None => Value::Null,
            };
            o.put(p.user_key, v);
        }
        o
    }
}

/// A registered alerts webhook.
#[derive(Clone, Debug)]
pub(crate) struct Webhook {
    pub id: Uuid,
    pub name: String,
    pub url: String,
    pub secret: String,
    pub events: Vec<String>,
    pub created_time: String,
}

impl Webhook {
    pub(crate) fn to_obj(&self) -> Obj {
        let mut o = Obj::with_capacity(6);
        o.put("id", self.id.to_string())
            .put("name", self.name.as_str())
            .put("url", self.url.as_str())
            .put("secret", self.secret.as_str())
            .put("events", self.events.clone())
            .put("createdTime", self.created_time.as_str());
        o
    }
}

/// A webhook delivery that did not get a 2xx.
#[derive(Clone, Debug)]
pub(crate) struct FailedCall {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub url: String,
    pub body: String,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub created_time: String,
}

impl FailedCall {
    pub(crate) fn to_obj(&self) -> Obj {
        let mut o = Obj::with_capacity(7);
        o.put("id", self.id.to_string())
            .put("webhookId", self.webhook_id.to_string())
            .put("url", self.url.as_str())
            .put("body", self.body.as_str())
            .put("statusCode", self.status_code)
            .put("error", self.error.clone())
            .put("createdTime", self.created_time.as_str());
        o
    }
}

/// Filters of `GET /users`.
#[derive(Clone, Debug, Default)]
pub(crate) struct UserFilter {
    pub email: Option<String>,
    pub name: Option<String>,
    pub external_id: Option<String>,
    /// `sort=property[,asc|desc]`: the order of the list (creation order without it).
    pub sort: Option<(UserSort, bool)>,
}

/// The user properties the list sorts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UserSort {
    Id,
    Name,
    Email,
    ExternalId,
    CreatedTime,
}

impl UserSort {
    pub(crate) fn parse(property: &str) -> Option<UserSort> {
        Some(match property {
            "id" => UserSort::Id,
            "name" => UserSort::Name,
            "email" => UserSort::Email,
            "externalId" => UserSort::ExternalId,
            "createdTime" => UserSort::CreatedTime,
            _ => return None,
        })
    }
}

/// Leaf's data.
#[derive(Default)]
pub(crate) struct Store {
    users: HashMap<Uuid, User>,
    /// User ids in creation order.
    order: BTreeMap<u64, Uuid>,
    seq_of: HashMap<Uuid, u64>,
    next_seq: u64,
    pub webhooks: Vec<Webhook>,
    failed_calls: VecDeque<FailedCall>,
}

impl Store {
    pub(crate) fn user(&self, id: &Uuid) -> Option<&User> {
        self.users.get(id)
    }

    /// Creates an empty user (Leaf's `POST /users`).
    pub(crate) fn insert_user(&mut self, mut user: User) -> &User {
        let id = user.id;
        if self.users.contains_key(&id) {
            return &self.users[&id];
        }
        if user.created_time.is_empty() {
            user.created_time = now_micros();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, id);
        self.seq_of.insert(id, seq);
        self.users.entry(id).or_insert(user)
    }

    pub(crate) fn new_user(id: Uuid) -> User {
        User::new(id)
    }

    pub(crate) fn delete_user(&mut self, id: &Uuid) -> bool {
        if self.users.remove(id).is_none() {
            return false;
        }
        if let Some(seq) = self.seq_of.remove(id) {
            self.order.remove(&seq);
        }
        true
    }

    /// One page of users matching `filter`, in creation order, and the total.
    pub(crate) fn list_users(
        &self,
        filter: &UserFilter,
        page: usize,
        size: usize,
    ) -> (Vec<Obj>, usize) {
        let eq = |want: &Option<String>, have: &Option<String>| match want {
            None => true,
            Some(w) => have.as_deref() == Some(w.as_str()),
        };
        let mut matching: Vec<&User> = self
            .order
            .values()
            .filter_map(|id| self.users.get(id))
            .filter(|u| {
                eq(&filter.email, &u.email)
                    && eq(&filter.name, &u.name)
                    && eq(&filter.external_id, &u.external_id)
            })
            .collect();
        if let Some((by, descending)) = filter.sort {
            // Stable: equal keys keep creation order. A missing value sorts first.
            matching.sort_by(|a, b| {
                let o = match by {
                    UserSort::Id => a.id.cmp(&b.id),
                    UserSort::Name => a.name.cmp(&b.name),
                    UserSort::Email => a.email.cmp(&b.email),
                    UserSort::ExternalId => a.external_id.cmp(&b.external_id),
                    UserSort::CreatedTime => a.created_time.cmp(&b.created_time),
                };
                if descending { o.reverse() } else { o }
            });
        }
        let total = matching.len();
        let items = matching
            .into_iter()
            .skip(page.saturating_mul(size))
            .take(size)
            .map(User::to_obj)
            .collect();
        (items, total)
    }

    pub(crate) fn credential(&self, user: &Uuid, provider: usize) -> Option<&Credential> {
        self.users.get(user)?.credentials.get(&provider)
    }

    pub(crate) fn credential_mut(
        &mut self,
        user: &Uuid,
        provider: usize,
    ) -> Option<&mut Credential> {
        self.users.get_mut(user)?.credentials.get_mut(&provider)
    }

    /// Finds a credential by its id (alerts know nothing else).
    pub(crate) fn credential_by_id(&self, id: &Uuid) -> Option<(&User, &Credential)> {
        self.users
            .values()
            .find_map(|u| u.credentials.values().find(|c| c.id == *id).map(|c| (u, c)))
    }

    /// Creates a credential (and its user, when new); records the token exchange event.
    pub(crate) fn create_credential(
        &mut self,
        user_id: Uuid,
        provider: usize,
        fields: Vec<(String, String)>,
        status: String,
    ) -> Result<&Credential, Problem> {
        if self.credential(&user_id, provider).is_some() {
            return Err(credential_conflict(provider));
        }
        if !self.users.contains_key(&user_id) {
            self.insert_user(User::new(user_id));
        }
        let access_token = fields
            .iter()
            .find(|(k, _)| k == "accessToken")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| random_string(40));
        let mut cred = Credential {
            id: Uuid::new_v4(),
            provider,
            fields,
            access_token,
            status,
            created_time: now_micros(),
            events: Vec::new(),
            events_added: 0,
        };
        cred.add_events(vec![NewEvent {
            status_code: 200,
            ..NewEvent::default()
        }]);
        let user = self
            .users
            .get_mut(&user_id)
            .ok_or_else(|| Problem::not_found("User not found"))?;
        Ok(user.credentials.entry(provider).or_insert(cred))
    }

    pub(crate) fn delete_credential(&mut self, user: &Uuid, provider: usize) -> bool {
        self.users
            .get_mut(user)
            .and_then(|u| u.credentials.remove(&provider))
            .is_some()
    }

    pub(crate) fn add_failed_call(&mut self, call: FailedCall) {
        if self.failed_calls.len() >= FAILED_CALLS_CAPACITY {
            self.failed_calls.pop_front();
        }
        self.failed_calls.push_back(call);
    }

    pub(crate) fn failed_calls(&self) -> Vec<Obj> {
        self.failed_calls.iter().map(FailedCall::to_obj).collect()
    }
}

/// 409 for a second credential of one provider for one user.
pub(crate) fn credential_conflict(provider: usize) -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        format!(
            "The user already has {}",
            PROVIDERS[provider].segment.replace('-', " ")
        ),
    )
    .with_message("error.credentialsalreadyexist")
}

/// Sort order of an event list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SortDir {
    Asc,
    Desc,
}

/// One page of `events` (sorted ascending) in `dir` order.
pub(crate) fn page_events(events: &[Event], dir: SortDir, page: usize, size: usize) -> Vec<Obj> {
    let n = events.len();
    let start = page.saturating_mul(size).min(n);
    let end = start.saturating_add(size).min(n);
    (start..end)
        .map(|k| match dir {
            SortDir::Asc => events[k].to_obj(),
            SortDir::Desc => events[n - 1 - k].to_obj(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_styles_mix_formats_deterministically() {
        let styles: Vec<TsStyle> = (0..14).map(style_for_index).collect();
        assert_eq!(styles[0], TsStyle::Micros);
        assert_eq!(styles[3], TsStyle::Millis);
        assert_eq!(styles[5], TsStyle::MicrosNoZone);
        assert_eq!(styles[8], TsStyle::Millis);
        assert_eq!(styles[12], TsStyle::MicrosNoZone);
    }

    #[test]
    fn request_log_keeps_arrival_order_and_late_statuses() {
        let mut log = RequestLog::default();
        let entry = |p: &str| LogEntry {
            method: "GET".into(),
            path: p.into(),
            query: String::new(),
            status: None,
            request_id: None,
            at: OffsetDateTime::now_utc(),
        };
        let a = log.push(entry("/a"));
        let b = log.push(entry("/b"));
        log.set_status(b, 200);
        log.set_status(a, 503);
        let snap = log.snapshot();
        assert_eq!(snap["total"], 2);
        assert_eq!(snap["requests"][0]["path"], "/a");
        assert_eq!(snap["requests"][0]["status"], 503);
        assert_eq!(snap["requests"][1]["status"], 200);
        log.clear();
        log.set_status(a, 200);
        let c = log.push(entry("/c"));
        log.set_status(c, 204);
        let snap = log.snapshot();
        assert_eq!(snap["total"], 1);
        assert_eq!(snap["requests"][0]["status"], 204);
    }

    #[test]
    fn fault_counts_down_and_clears_itself() {
        let state = SimState::new(SimOptions::default()).unwrap();
        state.set_fault(Fault {
            fixed_status: Some(503),
            remaining: Some(2),
            path_contains: Some("/users".into()),
            ..Fault::default()
        });
        assert!(state.decide_fault("GET", "/other", false).is_none());
        assert!(state.decide_fault("GET", "/x/users", false).is_some());
        assert!(state.decide_fault("GET", "/x/users", false).is_some());
        assert!(state.decide_fault("GET", "/x/users", false).is_none());
        assert!(state.current_fault().is_none());
    }

    #[test]
    fn revoked_tokens_are_refused_and_new_ones_accepted() {
        let tokens = Tokens::new(Duration::from_secs(60)).unwrap();
        let old = tokens.issue("u").unwrap();
        assert!(tokens.check_header(Some(&format!("Bearer {old}"))).is_ok());
        tokens.revoke_all();
        assert!(tokens.check_header(Some(&format!("Bearer {old}"))).is_err());
        let new = tokens.issue("u").unwrap();
        assert!(tokens.check_header(Some(&format!("Bearer {new}"))).is_ok());
        assert!(tokens.check_header(None).is_err());
        assert!(tokens.check_header(Some("Basic abc")).is_err());
    }
}
