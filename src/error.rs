//! The one application error type, rendered as RFC 9457 `application/problem+json`.
//!
//! Owns: the mapping from every failure to a status code, a stable `type` code and a
//! human detail. Must never: put a secret value into a detail (callers mask Leaf's text
//! before it gets here), or leak internal errors (database, I/O) to the caller — those
//! become an opaque 500/503 while the full chain is logged.
use std::fmt;

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

tokio::task_local! {
    /// The current request's id, set by the request-id middleware around every handler.
    pub static REQUEST_ID: String;
}

/// The current request id, if called inside a request.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// What the caller asked for is refused, or what credsync needed failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Validation(String),
    #[error("send the body as application/json")]
    UnsupportedMediaType,
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("a request with this Idempotency-Key is still running")]
    IdempotencyInProgress,
    #[error("this Idempotency-Key was used with a different request body")]
    IdempotencyMismatch,
    #[error("an Authorization header with a bearer token is required")]
    MissingToken,
    #[error("the bearer token is not valid: {0}")]
    InvalidToken(&'static str),
    /// `/v1/leaf/alerts` without a valid `X-Leaf-Signature`.
    #[error("{0}")]
    InvalidSignature(&'static str),
    #[error("this route needs the scope `{0}`")]
    InsufficientScope(String),
    #[error("too many requests; retry after {0} s")]
    RateLimited(u64),
    /// A known path with a method it does not serve; the `Allow` header lists these methods.
    #[error("method not allowed; this route allows {0}")]
    MethodNotAllowed(&'static str),
    /// Leaf refused the request with a status we pass on (400, 404, 409, 422).
    #[error("{detail}")]
    Upstream { status: u16, detail: String },
    /// Leaf answered something we cannot use (another 4xx, a 5xx, garbage).
    #[error("{0}")]
    UpstreamBadGateway(String),
    #[error("Leaf rejected credsync's credentials")]
    UpstreamAuth,
    #[error("Leaf did not answer in time")]
    UpstreamTimeout,
    #[error("Leaf is unavailable; retry later")]
    UpstreamUnavailable { retry_after: u64 },
    #[error("the database is unavailable; retry later")]
    DatabaseUnavailable,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// The stable code carried as `urn:credsync:problem:<code>`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Validation(_) => "validation",
            ApiError::UnsupportedMediaType => "unsupported-media-type",
            ApiError::PayloadTooLarge(_) => "payload-too-large",
            ApiError::NotFound(_) => "not-found",
            ApiError::Conflict(_) => "conflict",
            ApiError::IdempotencyInProgress => "idempotency-in-progress",
            ApiError::IdempotencyMismatch => "idempotency-key-reused",
            ApiError::MissingToken => "missing-token",
            ApiError::InvalidToken(_) => "invalid-token",
            ApiError::InvalidSignature(_) => "invalid-signature",
            ApiError::InsufficientScope(_) => "insufficient-scope",
            ApiError::RateLimited(_) => "rate-limited",
            ApiError::MethodNotAllowed(_) => "method-not-allowed",
            ApiError::Upstream { .. } => "upstream-rejected",
            ApiError::UpstreamBadGateway(_) => "upstream-error",
            ApiError::UpstreamAuth => "upstream-auth",
            ApiError::UpstreamTimeout => "upstream-timeout",
            ApiError::UpstreamUnavailable { .. } => "upstream-unavailable",
            ApiError::DatabaseUnavailable => "database-unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::Validation(_) => "Invalid request",
            ApiError::UnsupportedMediaType => "Unsupported media type",
            ApiError::PayloadTooLarge(_) => "Request body too large",
            ApiError::NotFound(_) => "Not found",
            ApiError::Conflict(_) => "Conflict",
            ApiError::IdempotencyInProgress => "Request in progress",
            ApiError::IdempotencyMismatch => "Idempotency key reused",
            ApiError::MissingToken => "Authentication required",
            ApiError::InvalidToken(_) => "Invalid token",
            ApiError::InvalidSignature(_) => "Invalid signature",
            ApiError::InsufficientScope(_) => "Insufficient scope",
            ApiError::RateLimited(_) => "Too many requests",
            ApiError::MethodNotAllowed(_) => "Method not allowed",
            ApiError::Upstream { .. } => "Leaf refused the request",
            ApiError::UpstreamBadGateway(_) | ApiError::UpstreamAuth => "Bad gateway",
            ApiError::UpstreamTimeout => "Leaf timed out",
            ApiError::UpstreamUnavailable { .. } => "Leaf unavailable",
            ApiError::DatabaseUnavailable => "Database unavailable",
            ApiError::Internal(_) => "Internal error",
        }
    }

    /// Map a database error: connection trouble is 503 (the process recovers by itself),
    /// anything else an opaque 500.
    pub fn from_db(err: sqlx::Error) -> ApiError {
        if crate::store::is_unavailable(&err) || crate::store::is_undefined_table(&err) {
            tracing::warn!(error = %err, "database unavailable");
            ApiError::DatabaseUnavailable
        } else {
            ApiError::Internal(err.into())
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        ApiError::from_db(err)
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        match err.downcast::<sqlx::Error>() {
            Ok(db) => ApiError::from_db(db),
            Err(other) => ApiError::Internal(other),
        }
    }
}

/// The RFC 9457 body.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub request_id: String,
}

pub const PROBLEM_JSON: &str = "application/problem+json";

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        let code = match self {
            ApiError::Validation(_) => 400,
            ApiError::UnsupportedMediaType => 415,
            ApiError::PayloadTooLarge(_) => 413,
            ApiError::NotFound(_) => 404,
            ApiError::Conflict(_) | ApiError::IdempotencyInProgress => 409,
            ApiError::IdempotencyMismatch => 422,
            ApiError::MissingToken | ApiError::InvalidToken(_) | ApiError::InvalidSignature(_) => {
                401
            }
            ApiError::InsufficientScope(_) => 403,
            ApiError::RateLimited(_) => 429,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::Upstream { status, .. } => *status,
            ApiError::UpstreamBadGateway(_) | ApiError::UpstreamAuth => 502,
            ApiError::UpstreamTimeout => 504,
            ApiError::UpstreamUnavailable { .. } | ApiError::DatabaseUnavailable => 503,
            ApiError::Internal(_) => 500,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY)
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if let ApiError::Internal(err) = self {
            tracing::error!(error = ?err, "internal error");
        }
        let problem = Problem {
            kind: format!("urn:credsync:problem:{}", self.code()),
            title: self.title().to_owned(),
            status: status.as_u16(),
            detail: self.to_string(),
            request_id: current_request_id().unwrap_or_default(),
        };
        let mut builder = HttpResponse::build(status);
        builder.insert_header((header::CONTENT_TYPE, PROBLEM_JSON));
        match self {
            ApiError::MissingToken => {
                builder.insert_header((header::WWW_AUTHENTICATE, r#"Bearer realm="credsync""#));
            }
            ApiError::InvalidToken(_) => {
                builder.insert_header((
                    header::WWW_AUTHENTICATE,
                    r#"Bearer realm="credsync", error="invalid_token""#,
                ));
            }
            ApiError::InsufficientScope(scope) => {
                let value = format!(
                    r#"Bearer realm="credsync", error="insufficient_scope", scope="{scope}""#
                );
                if let Ok(v) = HeaderValue::from_str(&value) {
                    builder.insert_header((header::WWW_AUTHENTICATE, v));
                }
            }
            ApiError::UpstreamUnavailable { retry_after } | ApiError::RateLimited(retry_after) => {
                builder.insert_header((header::RETRY_AFTER, retry_after.to_string()));
            }
            ApiError::DatabaseUnavailable => {
                builder.insert_header((header::RETRY_AFTER, "5"));
            }
            ApiError::IdempotencyInProgress => {
                builder.insert_header((header::RETRY_AFTER, "1"));
            }
            ApiError::MethodNotAllowed(allow) => {
                builder.insert_header((header::ALLOW, *allow));
            }
            _ => {}
        }
        builder.body(serde_json::to_vec(&problem).unwrap_or_default())
    }
}

/// Display helper used in logs: the error code and detail, never more.
pub struct Brief<'a>(pub &'a ApiError);

impl fmt::Display for Brief<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.0.code(), self.0)
    }
}
