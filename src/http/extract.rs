//! Extractors and request helpers: the authenticated caller, the request id, bounded JSON bodies.
use std::future::{Ready, ready};
use std::num::NonZeroU32;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use futures_util::StreamExt as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use zeroize::Zeroizing;

use super::AppState;
use crate::auth::Caller;
use crate::domain::Scope;
use crate::error::ApiError;
use crate::gateway::Actor;

/// The request id set by the middleware.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl FromRequest for RequestId {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(Ok(req
            .extensions()
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| RequestId(String::new()))))
    }
}

/// Per-caller (`sub`) request-rate limit.
pub struct CallerLimiter {
    limiter: DefaultKeyedRateLimiter<String>,
}

impl CallerLimiter {
    pub fn new(rps: u32) -> Option<CallerLimiter> {
        let n = NonZeroU32::new(rps)?;
        Some(CallerLimiter {
            limiter: RateLimiter::keyed(Quota::per_second(n).allow_burst(n)),
        })
    }

    fn check(&self, sub: &str) -> Result<(), ApiError> {
        if self.limiter.len() > 100_000 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&sub.to_owned())
            .map_err(|_| ApiError::RateLimited(1))
    }
}

fn state(req: &HttpRequest) -> Result<&AppState, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .map(|d| d.get_ref())
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("application state missing")))
}

/// An authenticated caller, with the request id.
#[derive(Debug, Clone)]
pub struct Authed {
    pub caller: Caller,
    pub request_id: String,
}

impl Authed {
    pub fn actor(&self) -> Actor<'_> {
        Actor {
            sub: &self.caller.sub,
            request_id: &self.request_id,
        }
    }

    /// 403 unless the caller holds `scope` (or a scope that implies it).
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.caller.scopes.allows(scope) {
            Ok(())
        } else {
            Err(ApiError::InsufficientScope(scope.as_str().to_owned()))
        }
    }
}

fn authenticate(req: &HttpRequest) -> Result<Authed, ApiError> {
    let st = state(req)?;
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(ApiError::MissingToken);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::InvalidToken("the Authorization header is not text"))?;
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => {
            return Err(ApiError::InvalidToken(
                "the Authorization scheme must be Bearer",
            ));
        }
    };
    let caller = st.verifier.verify(token).map_err(ApiError::InvalidToken)?;
    if let Some(limiter) = &st.caller_limiter {
        limiter.check(&caller.sub)?;
    }
    Ok(Authed { caller, request_id })
}

impl FromRequest for Authed {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

/// Whether the request declares a JSON body.
pub fn is_json(req: &HttpRequest) -> bool {
    let Some(ct) = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Read a JSON request body that may hold secrets (a create) into a buffer zeroized on drop:
/// 415 unless declared `application/json`, 413 past `max` bytes.
pub async fn read_json_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    max: usize,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    if !is_json(req) {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = declared_length(req, max)?;
    let mut body = Zeroizing::new(Vec::with_capacity(declared.unwrap_or(0)));
    read_chunks(&mut payload, max, |chunk| {
        append_zeroizing(&mut body, chunk)
    })
    .await?;
    Ok(body)
}

/// Append to a buffer of secrets. Past its capacity the bytes move to a larger buffer and the
/// old one is zeroized (`Vec`'s own growth would free it as it is).
pub fn append_zeroizing(buf: &mut Zeroizing<Vec<u8>>, bytes: &[u8]) {
    let needed = buf.len() + bytes.len();
    if needed > buf.capacity() {
        let mut grown = Zeroizing::new(Vec::with_capacity(needed.max(2 * buf.capacity())));
        grown.extend_from_slice(buf);
        *buf = grown;
    }
    buf.extend_from_slice(bytes);
}

/// The Content-Length, when there is one (413 past `max`).
fn declared_length(req: &HttpRequest, max: usize) -> Result<Option<usize>, ApiError> {
    let len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match len {
        Some(len) if len > max => Err(ApiError::PayloadTooLarge(max)),
        len => Ok(len),
    }
}

/// Read a request body of at most `max` bytes (413 past it).
pub async fn read_body(
    req: &HttpRequest,
    payload: &mut web::Payload,
    max: usize,
) -> Result<web::Bytes, ApiError> {
    declared_length(req, max)?;
    let mut body = web::BytesMut::new();
    read_chunks(payload, max, |chunk| body.extend_from_slice(chunk)).await?;
    Ok(body.freeze())
}

/// Hand a body's chunks to `append` in order; 413 once they add up past `max` bytes.
async fn read_chunks(
    payload: &mut web::Payload,
    max: usize,
    mut append: impl FnMut(&[u8]),
) -> Result<(), ApiError> {
    let mut read = 0;
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|_| ApiError::Validation("the request body could not be read".into()))?;
        read += chunk.len();
        if read > max {
            return Err(ApiError::PayloadTooLarge(max));
        }
        append(&chunk);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appending_past_the_capacity_keeps_every_byte_in_order() {
        let mut buf = Zeroizing::new(Vec::with_capacity(3));
        let mut expected = Vec::new();
        for chunk in [&b"ab"[..], b"cdef", b"", b"ghijklmnopqrstuvwxyz", b"!"] {
            append_zeroizing(&mut buf, chunk);
            expected.extend_from_slice(chunk);
            assert!(buf.capacity() >= buf.len());
        }
        assert_eq!(buf.as_slice(), expected.as_slice());
    }
}
