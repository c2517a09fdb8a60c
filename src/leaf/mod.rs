//! The HTTP client for Leaf's API.
//!
//! Owns: credsync's own Leaf token (authenticate, cache, renew before `exp`, renew once on a
//! 401/403), the per-request timeout, the request-rate ceiling (`LEAF_MAX_RPS`), the circuit
//! breaker, and the classification of every answer into "ok", "Leaf refused" (passed on) or
//! "Leaf unavailable" (SPEC §4). Must never: log a request body, a token or an echoed secret;
//! bodies with secrets are built into `Zeroizing` buffers and dropped right after sending.
mod breaker;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;
use zeroize::Zeroizing;

pub use breaker::Breaker;

use crate::config::{LeafAuth, LeafSettings};
use crate::domain::Provider;
use crate::domain::credential::json_str_len;
use crate::error::ApiError;
use crate::store::events::Event;

/// Why Leaf could not be used for this request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// Connection refused, reset, DNS failure.
    Unreachable,
    Timeout,
    /// A 5xx answer.
    ServerError(u16),
    /// A 429, with its `Retry-After` in seconds when given.
    RateLimited(Option<u64>),
    /// A body that is not what Leaf sends.
    Garbage,
    CircuitOpen,
    /// Leaf refused credsync's own token, even after authenticating again.
    AuthRejected,
}

/// What went wrong talking to Leaf. Its `Debug` leaves out Leaf's text: Leaf may quote the
/// credential it refuses, and only [`LeafError::into_api_error`] masks it.
#[derive(Clone, PartialEq, Eq)]
pub enum LeafError {
    Unavailable(Unavailable),
    /// Leaf answered 400, 404, 409 or 422: passed on to the caller.
    Rejected {
        status: u16,
        detail: String,
    },
    /// Leaf answered another 4xx: a 502 for the caller.
    Unexpected {
        status: u16,
    },
}

impl std::fmt::Debug for LeafError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeafError::Unavailable(u) => f.debug_tuple("Unavailable").field(u).finish(),
            LeafError::Rejected { status, .. } => f
                .debug_struct("Rejected")
                .field("status", status)
                .finish_non_exhaustive(),
            LeafError::Unexpected { status } => f
                .debug_struct("Unexpected")
                .field("status", status)
                .finish(),
        }
    }
}

impl LeafError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, LeafError::Unavailable(_))
    }

    /// Seconds to wait before trying again, when Leaf said so.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            LeafError::Unavailable(Unavailable::RateLimited(r)) => *r,
            _ => None,
        }
    }

    /// The caller's error for a read that has no local copy to fall back on.
    pub fn into_api_error(self, secrets: &[&str]) -> ApiError {
        match self {
            LeafError::Unavailable(u) => match u {
                Unavailable::Timeout => ApiError::UpstreamTimeout,
                Unavailable::ServerError(s) => {
                    ApiError::UpstreamBadGateway(format!("Leaf answered {s}"))
                }
                Unavailable::Garbage => {
                    ApiError::UpstreamBadGateway("Leaf answered with an unreadable body".into())
                }
                Unavailable::AuthRejected => ApiError::UpstreamAuth,
                Unavailable::RateLimited(r) => ApiError::UpstreamUnavailable {
                    retry_after: r.unwrap_or(5).max(1),
                },
                Unavailable::Unreachable | Unavailable::CircuitOpen => {
                    ApiError::UpstreamUnavailable { retry_after: 5 }
                }
            },
            LeafError::Rejected { status, detail } => ApiError::Upstream {
                status,
                detail: crate::domain::credential::mask_secrets(&detail, secrets.iter().copied()),
            },
            LeafError::Unexpected { status } => {
                ApiError::UpstreamBadGateway(format!("Leaf answered an unexpected {status}"))
            }
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            LeafError::Unavailable(Unavailable::Timeout) => "timeout",
            LeafError::Unavailable(Unavailable::Unreachable) => "unreachable",
            LeafError::Unavailable(Unavailable::ServerError(_)) => "server_error",
            LeafError::Unavailable(Unavailable::RateLimited(_)) => "rate_limited",
            LeafError::Unavailable(Unavailable::Garbage) => "garbage",
            LeafError::Unavailable(Unavailable::CircuitOpen) => "circuit_open",
            LeafError::Unavailable(Unavailable::AuthRejected) => "auth_rejected",
            LeafError::Rejected { .. } => "rejected",
            LeafError::Unexpected { .. } => "unexpected",
        }
    }
}

/// Leaf's view of whether credsync's own credentials work, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthHealth {
    Unknown = 0,
    Ok = 1,
    Rejected = 2,
}

/// Whether Leaf answered credsync's last request at all (any HTTP status), for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// No request yet.
    Unknown = 0,
    Answered = 1,
    /// Refused, reset, unresolvable or timed out.
    Unreachable = 2,
}

struct Token {
    value: SecretString,
    renew_at: Instant,
}

/// The metrics of one (operation, outcome) of Leaf calls.
struct CallMetrics {
    calls: metrics::Counter,
    duration: metrics::Histogram,
}

thread_local! {
    /// Each thread's handles (operations and outcomes are fixed sets of names), so that a call
    /// does not build its labels and look them up in the recorder's registry again.
    static CALL_METRICS: std::cell::RefCell<HashMap<(&'static str, &'static str), CallMetrics>> =
        std::cell::RefCell::new(HashMap::new());
}

fn record_call_metrics(operation: &'static str, outcome: &'static str, elapsed: Duration) {
    CALL_METRICS.with_borrow_mut(|cache| {
        let m = cache
            .entry((operation, outcome))
            .or_insert_with(|| CallMetrics {
                calls: metrics::counter!("credsync_leaf_requests_total", "operation" => operation, "outcome" => outcome),
                duration: metrics::histogram!("credsync_leaf_request_duration_seconds", "operation" => operation),
            });
        m.calls.increment(1);
        m.duration.record(elapsed.as_secs_f64());
    });
}

/// The Leaf client. Cheap to clone: the token, the rate limiter, the breaker and the auth
/// health are shared by every clone; the HTTP connection pool is per clone, so that each actix
/// worker keeps its connections on its own runtime ([`LeafClient::for_worker`]).
#[derive(Clone)]
pub struct LeafClient {
    http: reqwest::Client,
    shared: std::sync::Arc<Shared>,
}

/// What every clone of a [`LeafClient`] shares.
struct Shared {
    /// `LEAF_API_URL`, parsed once: each call only sets its path.
    base: reqwest::Url,
    auth: LeafAuth,
    token: tokio::sync::RwLock<Option<Token>>,
    renewing: tokio::sync::Mutex<()>,
    timeout: Duration,
    limiter: DefaultDirectRateLimiter,
    max_rps: u32,
    breaker: Breaker,
    auth_health: AtomicU8,
    reach: AtomicU8,
}

impl std::fmt::Debug for LeafClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafClient")
            .field("base", &self.shared.base.as_str())
            .finish_non_exhaustive()
    }
}

fn http_client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("credsync/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A raw answer.
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
}

impl LeafClient {
    pub fn new(settings: &LeafSettings) -> anyhow::Result<LeafClient> {
        let rps = NonZeroU32::new(settings.max_rps).unwrap_or(NonZeroU32::MIN);
        Ok(LeafClient {
            http: http_client(settings.timeout)?,
            shared: std::sync::Arc::new(Shared {
                base: reqwest::Url::parse(&settings.api_url)
                    .map_err(|e| anyhow::anyhow!("LEAF_API_URL is not a URL: {e}"))?,
                auth: settings.auth.clone(),
                token: tokio::sync::RwLock::new(None),
                renewing: tokio::sync::Mutex::new(()),
                timeout: settings.timeout,
                limiter: RateLimiter::direct(Quota::per_second(rps).allow_burst(rps)),
                max_rps: rps.get(),
                // High enough that a burst of failing calls from callers does not open it by
                // accident; a real outage (the worker alone makes hundreds of calls) opens it
                // quickly.
                breaker: Breaker::new(25, Duration::from_secs(5)),
                auth_health: AtomicU8::new(AuthHealth::Unknown as u8),
                reach: AtomicU8::new(Reach::Unknown as u8),
            }),
        })
    }

    /// A client for one actix worker: the same token, rate limit and breaker, its own connection
    /// pool (a connection made on another worker's runtime would hop threads on every call).
    pub fn for_worker(&self) -> LeafClient {
        LeafClient {
            http: http_client(self.shared.timeout).unwrap_or_else(|_| self.http.clone()),
            shared: self.shared.clone(),
        }
    }

    /// This process's share of `LEAF_MAX_RPS`.
    pub fn max_rps(&self) -> u32 {
        self.shared.max_rps
    }

    pub fn auth_health(&self) -> AuthHealth {
        match self.shared.auth_health.load(Ordering::Relaxed) {
            1 => AuthHealth::Ok,
            2 => AuthHealth::Rejected,
            _ => AuthHealth::Unknown,
        }
    }

    /// Whether Leaf answered the last request (see [`Reach`]).
    pub fn reach(&self) -> Reach {
        match self.shared.reach.load(Ordering::Relaxed) {
            1 => Reach::Answered,
            2 => Reach::Unreachable,
            _ => Reach::Unknown,
        }
    }

    fn set_reach(&self, r: Reach) {
        // Most calls find it unchanged: a read, not a write to a shared cache line.
        if self.shared.reach.load(Ordering::Relaxed) != r as u8 {
            self.shared.reach.store(r as u8, Ordering::Relaxed);
        }
    }

    pub fn breaker(&self) -> &Breaker {
        &self.shared.breaker
    }

    fn set_auth_health(&self, h: AuthHealth) {
        self.shared.auth_health.store(h as u8, Ordering::Relaxed);
    }

    /// `base` + `path` (which starts with `/`).
    fn url(&self, path: &str) -> reqwest::Url {
        let mut url = self.shared.base.clone();
        let full = format!("{}{path}", url.path().trim_end_matches('/'));
        url.set_path(&full);
        url
    }

    fn credential_path(provider: &Provider, user: Uuid) -> String {
        format!(
            "/services/usermanagement/api/users/{}/{}",
            user.hyphenated(),
            provider.segment
        )
    }

    /// GET the credential; `None` when Leaf answers 404.
    pub async fn get_credential(
        &self,
        provider: &Provider,
        user: Uuid,
        request_id: &str,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, LeafError> {
        match self.get_credential_body(provider, user, request_id).await? {
            Some(body) => parse_credential(&body).map(Some),
            None => Ok(None),
        }
    }

    /// GET the credential: Leaf's answer as it came, not parsed yet; `None` on a 404.
    pub async fn get_credential_body(
        &self,
        provider: &Provider,
        user: Uuid,
        request_id: &str,
    ) -> Result<Option<bytes::Bytes>, LeafError> {
        let path = Self::credential_path(provider, user);
        match self
            .call("get_credential", Method::GET, &path, &[], None, request_id)
            .await
        {
            Ok(a) => Ok(Some(a.body)),
            Err(LeafError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// POST a credential with the given JSON body (built by the caller, secret).
    pub async fn create_credential(
        &self,
        provider: &Provider,
        user: Uuid,
        body: Zeroizing<Vec<u8>>,
        request_id: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, LeafError> {
        let body = self
            .create_credential_body(provider, user, body, request_id)
            .await?;
        parse_credential(&body)
    }

    /// POST a credential: Leaf's 2xx answer as it came, not parsed yet (the caller judges
    /// whether it is a credential, as [`LeafClient::create_credential`] does).
    pub async fn create_credential_body(
        &self,
        provider: &Provider,
        user: Uuid,
        body: Zeroizing<Vec<u8>>,
        request_id: &str,
    ) -> Result<bytes::Bytes, LeafError> {
        let path = Self::credential_path(provider, user);
        let a = self
            .call(
                "create_credential",
                Method::POST,
                &path,
                &[],
                Some(body),
                request_id,
            )
            .await?;
        Ok(a.body)
    }

    /// DELETE the credential; `Ok(false)` when Leaf answers 404.
    pub async fn delete_credential(
        &self,
        provider: &Provider,
        user: Uuid,
        request_id: &str,
    ) -> Result<bool, LeafError> {
        let path = Self::credential_path(provider, user);
        match self
            .call(
                "delete_credential",
                Method::DELETE,
                &path,
                &[],
                None,
                request_id,
            )
            .await
        {
            // Leaf answers 204 with an empty body: a body that is not even JSON is not Leaf's
            // answer (a proxy's error page, a broken gateway), so the delete is not known done.
            Ok(a) if !is_empty_or_json(&a.body) => {
                Err(LeafError::Unavailable(Unavailable::Garbage))
            }
            Ok(_) => Ok(true),
            Err(LeafError::Rejected { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One page of a credential's events; `None` when Leaf answers 404.
    pub async fn events(
        &self,
        provider: &Provider,
        user: Uuid,
        page: u32,
        size: u32,
        ascending: bool,
        request_id: &str,
    ) -> Result<Option<(Vec<Event>, Option<i64>)>, LeafError> {
        let path = format!("{}/events", Self::credential_path(provider, user));
        let sort = if ascending {
            "createdDate,asc"
        } else {
            "createdDate,desc"
        };
        let query = [
            ("page", page.to_string()),
            ("size", size.to_string()),
            ("sort", sort.to_owned()),
        ];
        match self
            .call("get_events", Method::GET, &path, &query, None, request_id)
            .await
        {
            Ok(a) => {
                let events = parse_events(&a.body)?;
                let total = total_count(&a.headers);
                Ok(Some((events, total)))
            }
            Err(LeafError::Rejected { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One page of Leaf's users (discovery).
    pub async fn users(
        &self,
        page: u32,
        size: u32,
        request_id: &str,
    ) -> Result<(Vec<serde_json::Value>, Option<i64>), LeafError> {
        let query = [("page", page.to_string()), ("size", size.to_string())];
        let a = self
            .call(
                "list_users",
                Method::GET,
                "/services/usermanagement/api/users",
                &query,
                None,
                request_id,
            )
            .await?;
        let v: serde_json::Value = serde_json::from_slice(&a.body)
            .map_err(|_| LeafError::Unavailable(Unavailable::Garbage))?;
        let serde_json::Value::Array(items) = v else {
            return Err(LeafError::Unavailable(Unavailable::Garbage));
        };
        Ok((items, total_count(&a.headers)))
    }

    /// Whether Leaf answers and accepts credsync's credentials (for `/readyz`).
    pub async fn probe(&self) -> (bool, Option<bool>) {
        match self.current_token(None).await {
            Ok(_) => (true, Some(true)),
            Err(LeafError::Unavailable(Unavailable::AuthRejected)) => (true, Some(false)),
            Err(_) => (false, None),
        }
    }

    async fn call(
        &self,
        operation: &'static str,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Zeroizing<Vec<u8>>>,
        request_id: &str,
    ) -> Result<Answer, LeafError> {
        let started = Instant::now();
        let result = self.call_inner(method, path, query, body, request_id).await;
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => e.outcome(),
        };
        record_call_metrics(operation, outcome, started.elapsed());
        if let Err(e) = &result {
            tracing::debug!(operation, outcome, ?e, "Leaf call failed");
        }
        result
    }

    async fn call_inner(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Zeroizing<Vec<u8>>>,
        request_id: &str,
    ) -> Result<Answer, LeafError> {
        // One buffer for every attempt, zeroized when the last of them lets go of it.
        let body = body.map(Bytes::from_owner);
        let permit = self
            .shared
            .breaker
            .try_acquire()
            .ok_or(LeafError::Unavailable(Unavailable::CircuitOpen))?;
        // The token Leaf refused with a 401, once: the next attempt needs another.
        let mut refused: Option<SecretString> = None;
        loop {
            let token = self
                .current_token(refused.as_ref())
                .await
                .inspect_err(|e| {
                    if matches!(
                        e,
                        LeafError::Unavailable(
                            Unavailable::Unreachable
                                | Unavailable::Timeout
                                | Unavailable::ServerError(_)
                                | Unavailable::Garbage
                        )
                    ) {
                        permit.failure();
                    }
                })?;
            let answer = self
                .send(
                    method.clone(),
                    path,
                    query,
                    body.clone(),
                    token.as_ref(),
                    request_id,
                )
                .await;
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    permit.failure();
                    return Err(e);
                }
            };
            let status = answer.status;
            if (status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN)
                && !matches!(self.shared.auth, LeafAuth::None)
            {
                if refused.is_none() && matches!(self.shared.auth, LeafAuth::Password { .. }) {
                    refused = Some(token.unwrap_or_else(|| SecretString::from("")));
                    continue;
                }
                self.set_auth_health(AuthHealth::Rejected);
                permit.success();
                return Err(LeafError::Unavailable(Unavailable::AuthRejected));
            }
            if status.is_success() {
                permit.success();
                return Ok(answer);
            }
            if status == StatusCode::TOO_MANY_REQUESTS {
                permit.success();
                return Err(LeafError::Unavailable(Unavailable::RateLimited(
                    retry_after(&answer.headers),
                )));
            }
            if status.is_server_error() {
                permit.failure();
                return Err(LeafError::Unavailable(Unavailable::ServerError(
                    status.as_u16(),
                )));
            }
            permit.success();
            let code = status.as_u16();
            return Err(match code {
                400 | 404 | 409 | 422 => LeafError::Rejected {
                    status: code,
                    detail: problem_detail(&answer.body, code),
                },
                _ => {
                    tracing::warn!(status = code, path, "unexpected answer from Leaf");
                    LeafError::Unexpected { status: code }
                }
            });
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Bytes>,
        token: Option<&SecretString>,
        request_id: &str,
    ) -> Result<Answer, LeafError> {
        // A free cell is taken at once; only a wait for one arms a timer.
        if self.shared.limiter.check().is_err()
            && tokio::time::timeout(self.shared.timeout, self.shared.limiter.until_ready())
                .await
                .is_err()
        {
            return Err(LeafError::Unavailable(Unavailable::RateLimited(Some(1))));
        }
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("X-Request-Id", request_id);
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t.expose_secret());
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let unreachable = |e: reqwest::Error| {
            let e = classify(e);
            if matches!(
                e,
                LeafError::Unavailable(Unavailable::Unreachable | Unavailable::Timeout)
            ) {
                self.set_reach(Reach::Unreachable);
            }
            e
        };
        let mut resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let headers = std::mem::take(resp.headers_mut());
        let body = resp.bytes().await.map_err(unreachable)?;
        self.set_reach(Reach::Answered);
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    /// The token to use, authenticating when there is none, it is due for renewal, or it is the
    /// one Leaf just `refused` (requests refused together renew it once: the first to get the
    /// lock authenticates, the others take its new token).
    async fn current_token(
        &self,
        refused: Option<&SecretString>,
    ) -> Result<Option<SecretString>, LeafError> {
        let (username, password) = match &self.shared.auth {
            LeafAuth::None => return Ok(None),
            LeafAuth::Token(t) => return Ok(Some(t.clone())),
            LeafAuth::Password { username, password } => (username, password),
        };
        // A token still fresh and not the refused one.
        let usable = |t: &Token| {
            t.renew_at > Instant::now()
                && refused.is_none_or(|r| r.expose_secret() != t.value.expose_secret())
        };
        let held = || async {
            let token = self.shared.token.read().await;
            token
                .as_ref()
                .filter(|t| usable(t))
                .map(|t| t.value.clone())
        };
        if refused.is_none()
            && let Some(t) = held().await
        {
            return Ok(Some(t));
        }
        let _guard = self.shared.renewing.lock().await;
        // Someone else may have renewed while we waited.
        if let Some(t) = held().await {
            return Ok(Some(t));
        }
        let token = self.authenticate(username, password).await?;
        let value = token.value.clone();
        *self.shared.token.write().await = Some(token);
        Ok(Some(value))
    }

    async fn authenticate(
        &self,
        username: &str,
        password: &SecretString,
    ) -> Result<Token, LeafError> {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Authenticate<'a> {
            username: &'a str,
            password: &'a str,
            remember_me: bool,
        }
        let password = password.expose_secret();
        // Sized up front, so that no copy of the password is left by a growing buffer.
        let size = r#"{"username":,"password":,"rememberMe":true}"#.len()
            + json_str_len(username)
            + json_str_len(password);
        let mut body = Zeroizing::new(Vec::with_capacity(size));
        let _ = serde_json::to_writer(
            &mut *body,
            &Authenticate {
                username,
                password,
                remember_me: true,
            },
        );
        debug_assert_eq!(body.len(), size);
        let started = Instant::now();
        let answer = self
            .send(
                Method::POST,
                "/api/authenticate",
                &[],
                Some(Bytes::from_owner(body)),
                None,
                "credsync-auth",
            )
            .await;
        let outcome;
        let result = match answer {
            Err(e) => {
                outcome = e.outcome();
                Err(e)
            }
            Ok(a)
                if a.status == StatusCode::UNAUTHORIZED
                    || a.status == StatusCode::FORBIDDEN
                    || a.status == StatusCode::BAD_REQUEST =>
            {
                outcome = "auth_rejected";
                self.set_auth_health(AuthHealth::Rejected);
                Err(LeafError::Unavailable(Unavailable::AuthRejected))
            }
            Ok(a) if a.status.is_success() => match parse_id_token(&a.body) {
                Some((value, lifetime)) => {
                    outcome = "success";
                    self.set_auth_health(AuthHealth::Ok);
                    // Renew when 80% of the lifetime has passed (at most one hour before expiry).
                    let ahead = (lifetime / 5).min(Duration::from_secs(3600));
                    Ok(Token {
                        value,
                        renew_at: Instant::now() + lifetime.saturating_sub(ahead),
                    })
                }
                None => {
                    outcome = "garbage";
                    Err(LeafError::Unavailable(Unavailable::Garbage))
                }
            },
            Ok(a) if a.status == StatusCode::TOO_MANY_REQUESTS => {
                outcome = "rate_limited";
                Err(LeafError::Unavailable(Unavailable::RateLimited(
                    retry_after(&a.headers),
                )))
            }
            Ok(a) => {
                outcome = "server_error";
                Err(LeafError::Unavailable(Unavailable::ServerError(
                    a.status.as_u16(),
                )))
            }
        };
        record_call_metrics("authenticate", outcome, started.elapsed());
        result
    }
}

fn classify(e: reqwest::Error) -> LeafError {
    if e.is_timeout() {
        LeafError::Unavailable(Unavailable::Timeout)
    } else if e.is_decode() || e.is_body() {
        LeafError::Unavailable(Unavailable::Garbage)
    } else {
        LeafError::Unavailable(Unavailable::Unreachable)
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    retry_after_secs(value, std::time::SystemTime::now())
}

/// A `Retry-After` value (RFC 9110 §10.2.3) in seconds from `now`: a number of seconds, or an
/// HTTP date (the seconds until it, rounded up; 0 when it has passed). At most an hour; `None`
/// when it is neither.
fn retry_after_secs(value: &str, now: std::time::SystemTime) -> Option<u64> {
    let value = value.trim();
    let secs = match value.parse::<u64>() {
        Ok(secs) => secs,
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(now)
                .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
        }
    };
    Some(secs.min(3600))
}

fn total_count(headers: &reqwest::header::HeaderMap) -> Option<i64> {
    headers
        .get("X-Total-Count")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Whether a body is empty (whitespace only) or one JSON value.
fn is_empty_or_json(body: &[u8]) -> bool {
    body.iter().all(u8::is_ascii_whitespace)
        || serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
}

fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, LeafError> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => Err(LeafError::Unavailable(Unavailable::Garbage)),
    }
}

/// Leaf's answer about a credential (GET, POST): one JSON object that
/// [`is_credential_answer`].
fn parse_credential(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, LeafError> {
    let m = parse_object(body)?;
    if is_credential_answer(m.len(), m.get("status")) {
        Ok(m)
    } else {
        Err(LeafError::Unavailable(Unavailable::Garbage))
    }
}

/// Whether an object of `fields` members whose `status` member is `status` can be Leaf's
/// answer about a credential: at least one member, and a `status` that is a string or null when
/// there is one. `{}` or `"status": 5` is "a body that is not what Leaf sends" (SPEC §4); every
/// other member is taken as data (the two pages of Leaf's docs disagree on the fields).
pub fn is_credential_answer(fields: usize, status: Option<&serde_json::Value>) -> bool {
    fields > 0
        && status
            .is_none_or(|s| matches!(s, serde_json::Value::String(_) | serde_json::Value::Null))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEvent {
    id: serde_json::Value,
    created_date: String,
    status_code: serde_json::Value,
    #[serde(default)]
    headers: Option<serde_json::Value>,
    #[serde(default)]
    body: Option<serde_json::Value>,
}

fn text_of(v: Option<serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s,
        Some(other) => other.to_string(),
    }
}

fn parse_events(body: &[u8]) -> Result<Vec<Event>, LeafError> {
    let garbage = || LeafError::Unavailable(Unavailable::Garbage);
    let raw: Vec<RawEvent> = serde_json::from_slice(body).map_err(|_| garbage())?;
    raw.into_iter()
        .map(|r| {
            let id = match r.id {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                _ => return Err(garbage()),
            };
            let status_code = match r.status_code {
                serde_json::Value::Number(n) => n
                    .as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .ok_or_else(garbage)?,
                serde_json::Value::String(s) => s.trim().parse().map_err(|_| garbage())?,
                _ => return Err(garbage()),
            };
            Ok(Event {
                id,
                created_date: crate::timefmt::parse_lenient(&r.created_date).ok_or_else(garbage)?,
                status_code,
                headers: text_of(r.headers),
                body: text_of(r.body),
            })
        })
        .collect()
}

/// Leaf's `detail` (else `title`) from a problem body.
fn problem_detail(body: &[u8], status: u16) -> String {
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_slice::<serde_json::Value>(body) {
        for key in ["detail", "title", "message"] {
            if let Some(serde_json::Value::String(s)) = m.get(key)
                && !s.is_empty()
            {
                return s.chars().take(1000).collect();
            }
        }
    }
    format!("Leaf answered {status}")
}

/// The `id_token` and its lifetime (from its `exp`; one hour when unreadable).
fn parse_id_token(body: &[u8]) -> Option<(SecretString, Duration)> {
    #[derive(serde::Deserialize)]
    struct Auth {
        id_token: SecretString,
    }
    let auth: Auth = serde_json::from_slice(body).ok()?;
    let lifetime = auth
        .id_token
        .expose_secret()
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.trim_end_matches('='))
                .ok()
        })
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
        .and_then(|c| c.get("exp").and_then(serde_json::Value::as_i64))
        .map(|exp| {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            // Leaf's tokens live 30 days at most; anything longer is not believed.
            Duration::from_secs(
                u64::try_from(exp.saturating_sub(now))
                    .unwrap_or(0)
                    .min(30 * 86_400),
            )
        })
        .unwrap_or(Duration::from_secs(3600));
    Some((auth.id_token, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let date = |offset: Duration, ahead: bool| {
            httpdate::fmt_http_date(if ahead { now + offset } else { now - offset })
        };
        assert_eq!(retry_after_secs("120", now), Some(120));
        assert_eq!(retry_after_secs(" 7 ", now), Some(7));
        assert_eq!(retry_after_secs("0", now), Some(0));
        assert_eq!(retry_after_secs("99999", now), Some(3600));
        assert_eq!(
            retry_after_secs(&date(Duration::from_secs(90), true), now),
            Some(90)
        );
        // HTTP dates have whole seconds: a date within the second ahead is a second away.
        let in_half_a_second = now + Duration::from_millis(500);
        assert_eq!(
            retry_after_secs(
                &httpdate::fmt_http_date(now + Duration::from_secs(1)),
                in_half_a_second
            ),
            Some(1)
        );
        assert_eq!(
            retry_after_secs(&date(Duration::from_secs(30), false), now),
            Some(0)
        );
        assert_eq!(
            retry_after_secs(&date(Duration::from_secs(86_400), true), now),
            Some(3600)
        );
        for junk in ["", "-5", "1.5", "soon", "Sun, 32 Nov 2026 25:00:00 GMT"] {
            assert_eq!(retry_after_secs(junk, now), None, "{junk:?}");
        }
    }

    #[test]
    fn call_urls_are_the_base_followed_by_the_path() {
        for (base, want) in [
            (
                "http://127.0.0.1:9000",
                "http://127.0.0.1:9000/services/x/users/u",
            ),
            (
                "https://leaf.example/prefix",
                "https://leaf.example/prefix/services/x/users/u",
            ),
        ] {
            let client = LeafClient::new(&LeafSettings {
                api_url: base.into(),
                auth: LeafAuth::None,
                timeout: Duration::from_secs(1),
                max_rps: 1,
            })
            .unwrap();
            assert_eq!(client.url("/services/x/users/u").as_str(), want);
        }
    }

    #[test]
    fn events_parse_leniently() {
        let body = br#"[{"id":"e1","createdDate":"2026-01-02T03:04:05.123","statusCode":"401","headers":"h","body":"b"},
                        {"id":2,"createdDate":"2026-01-02T03:04:05.123456Z","statusCode":200}]"#;
        let ev = parse_events(body).unwrap();
        assert_eq!(ev[0].status_code, 401);
        assert_eq!(ev[1].id, "2");
        assert_eq!(ev[1].headers, "");
        assert!(parse_events(b"<html>").is_err());
    }

    #[test]
    fn a_credential_answer_is_an_object_with_members_and_a_text_status() {
        let garbage = Err(LeafError::Unavailable(Unavailable::Garbage));
        for body in [&b"{}"[..], br#"{"status":5}"#, b"[]", b"<html>"] {
            assert_eq!(
                parse_credential(body),
                garbage,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(parse_credential(br#"{"status":null}"#).is_ok());
        assert!(parse_credential(br#"{"id":"i","status":"OK"}"#).is_ok());
    }

    #[test]
    fn leafs_text_stays_out_of_debug_output() {
        let e = LeafError::Rejected {
            status: 422,
            detail: "refused client-secret-xyz".into(),
        };
        let shown = format!("{e:?} {:?}", Some(&e));
        assert!(
            shown.contains("422") && !shown.contains("client-secret-xyz"),
            "{shown}"
        );
    }

    #[test]
    fn a_delete_answer_is_empty_or_json() {
        for ok in [&b""[..], b" \r\n", b"{}", br#"{"deleted":true}"#, b"null"] {
            assert!(is_empty_or_json(ok), "{}", String::from_utf8_lossy(ok));
        }
        for garbage in [&b"<html>oops"[..], b"{", b"ok"] {
            assert!(
                !is_empty_or_json(garbage),
                "{}",
                String::from_utf8_lossy(garbage)
            );
        }
    }

    #[test]
    fn problem_detail_prefers_detail_then_title() {
        assert_eq!(problem_detail(br#"{"title":"T","detail":"D"}"#, 400), "D");
        assert_eq!(problem_detail(br#"{"title":"T"}"#, 400), "T");
        assert_eq!(problem_detail(b"nope", 422), "Leaf answered 422");
    }
}

/// Property tests: what Leaf sends is untrusted bytes too.
#[cfg(test)]
mod props {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::*;

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,16}".prop_map(Value::from),
            "[0-9 ]{0,12}".prop_map(Value::from),
            Just(Value::from("2026-01-02T03:04:05.123")),
        ];
        leaf.prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("id".to_owned()),
                        Just("createdDate".to_owned()),
                        Just("statusCode".to_owned()),
                        Just("headers".to_owned()),
                        Just("body".to_owned()),
                        Just("detail".to_owned()),
                        Just("title".to_owned()),
                        Just("message".to_owned()),
                        Just("id_token".to_owned()),
                        "[a-z]{0,6}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// An event as Leaf might send it, each field maybe of the wrong type.
    fn raw_event() -> impl Strategy<Value = Value> {
        (
            prop_oneof![
                ".{0,10}".prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                arb_json()
            ],
            prop_oneof![
                Just(Value::from("2026-01-02T03:04:05.123")),
                Just(Value::from("2026-01-02T03:04:05.123456Z")),
                ".{0,30}".prop_map(Value::from),
                arb_json(),
            ],
            prop_oneof![
                any::<i64>().prop_map(Value::from),
                any::<i32>().prop_map(|n| Value::from(n.to_string())),
                any::<f64>().prop_map(Value::from),
                arb_json(),
            ],
            prop::option::of(arb_json()),
            prop::option::of(arb_json()),
        )
            .prop_map(|(id, created, status, headers, body)| {
                let mut m = serde_json::Map::new();
                m.insert("id".into(), id);
                m.insert("createdDate".into(), created);
                m.insert("statusCode".into(), status);
                if let Some(h) = headers {
                    m.insert("headers".into(), h);
                }
                if let Some(b) = body {
                    m.insert("body".into(), b);
                }
                Value::Object(m)
            })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_events(&bytes);
            let _ = parse_object(&bytes);
            let d = problem_detail(&bytes, 422);
            prop_assert!(!d.is_empty() && d.chars().count() <= 1000);
            let _ = parse_id_token(&bytes);
        }

        #[test]
        fn arbitrary_json_never_panics(v in arb_json()) {
            let bytes = v.to_string().into_bytes();
            let _ = parse_events(&bytes);
            let d = problem_detail(&bytes, 400);
            prop_assert!(!d.is_empty() && d.chars().count() <= 1000);
            let _ = parse_id_token(&bytes);
        }

        #[test]
        fn events_parse_or_fail_cleanly(events in prop::collection::vec(raw_event(), 0..6)) {
            let bytes = Value::from(events.clone()).to_string().into_bytes();
            if let Ok(parsed) = parse_events(&bytes) {
                prop_assert_eq!(parsed.len(), events.len());
                for (e, raw) in parsed.iter().zip(&events) {
                    match &raw["id"] {
                        Value::String(s) => prop_assert_eq!(&e.id, s),
                        Value::Number(n) => prop_assert_eq!(&e.id, &n.to_string()),
                        other => prop_assert!(false, "id {other} accepted"),
                    }
                    prop_assert_eq!(e.created_date.offset(), time::UtcOffset::UTC);
                }
            } else {
                prop_assert_eq!(parse_events(&bytes).err(), Some(LeafError::Unavailable(Unavailable::Garbage)));
            }
        }

        #[test]
        fn problem_detail_is_bounded_and_prefers_detail(
            detail in prop::option::of(".{0,1200}"),
            title in prop::option::of(".{0,40}"),
            status in 400u16..600,
        ) {
            let mut m = serde_json::Map::new();
            if let Some(d) = &detail { m.insert("detail".into(), json!(d)); }
            if let Some(t) = &title { m.insert("title".into(), json!(t)); }
            let out = problem_detail(Value::Object(m).to_string().as_bytes(), status);
            let expected = [&detail, &title]
                .into_iter()
                .flatten()
                .find(|s| !s.is_empty())
                .map(|s| s.chars().take(1000).collect::<String>())
                .unwrap_or_else(|| format!("Leaf answered {status}"));
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn id_tokens_of_any_shape_get_a_bounded_lifetime(
            token in prop_oneof![
                ".{0,60}",
                (".{0,20}", arb_json(), ".{0,20}").prop_map(|(h, mut c, s)| {
                    // Extreme `exp` values are `an_extreme_exp_does_not_overflow` below.
                    if let Some(m) = c.as_object_mut() { m.remove("exp"); }
                    format!(
                        "{h}.{}.{s}",
                        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c.to_string())
                    )
                }),
                // Anything from long expired to ten years ahead, and non-integer `exp`s.
                prop_oneof![
                    (-2_000_000_000i64..2_100_000_000).prop_map(Value::from),
                    any::<f64>().prop_map(Value::from),
                    ".{0,8}".prop_map(Value::from),
                ]
                .prop_map(|exp| format!(
                    "h.{}.s",
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json!({"exp": exp}).to_string())
                )),
            ],
        ) {
            let body = json!({"id_token": token}).to_string();
            let (value, lifetime) = parse_id_token(body.as_bytes()).ok_or_else(|| TestCaseError::fail("refused"))?;
            prop_assert_eq!(value.expose_secret(), token.as_str());
            // The lifetime feeds `Instant::now() + …`: it must never overflow it.
            prop_assert!(std::time::Instant::now().checked_add(lifetime).is_some(), "{lifetime:?}");
        }
    }

    /// Leaf's `id_token` is not trusted: a far-future (or far-past) `exp` must not overflow
    /// `exp - now` (a panic in debug builds) or `Instant::now() + lifetime` (a panic in every
    /// build) in `authenticate`.
    #[test]
    fn an_extreme_exp_does_not_overflow() {
        for exp in [i64::MIN, i64::MIN + 1, -1, i64::MAX, 1 << 40] {
            let token = format!(
                "h.{}.s",
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(json!({ "exp": exp }).to_string())
            );
            let body = json!({ "id_token": token }).to_string();
            let got = std::panic::catch_unwind(|| parse_id_token(body.as_bytes()));
            let (_, lifetime) = got
                .unwrap_or_else(|_| panic!("exp {exp} panics"))
                .unwrap_or_else(|| panic!("exp {exp} refused"));
            assert!(
                std::time::Instant::now().checked_add(lifetime).is_some(),
                "exp {exp}: lifetime {lifetime:?} overflows an Instant"
            );
        }
    }
}
