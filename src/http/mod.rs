//! The HTTP layer: the actix-web application, its routes, middleware and extractors.
//!
//! Owns: request ids, access logs and HTTP metrics, authentication of callers, request-body
//! limits and content types, and turning use-case results into responses.
//! Must never: hold business rules (they live in `gateway`), or log a header or body.
mod credentials;
mod extract;
mod json_out;
mod ops;
mod sync_routes;
pub mod v1;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpMessage, HttpServer, web};
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::SecretString;

pub use extract::{CallerLimiter, RequestId, read_json_body};

use crate::auth::Verifier;
use crate::error::{ApiError, REQUEST_ID};
use crate::gateway::Gateway;

/// The state of the service. Each actix worker holds a copy whose `gateway` has that worker's
/// own connection pools ([`Gateway::for_worker`]); everything else is shared.
#[derive(Clone)]
pub struct AppState {
    pub gateway: Gateway,
    pub syncer: crate::sync::Syncer,
    pub verifier: Arc<Verifier>,
    pub metrics: PrometheusHandle,
    pub max_body_bytes: usize,
    pub webhook_secret: Option<SecretString>,
    pub caller_limiter: Option<Arc<extract::CallerLimiter>>,
    /// Whether the stored data was checked against the configured keys (deferred when Postgres
    /// was down at start-up); not ready until it was.
    pub keys_checked: Arc<std::sync::atomic::AtomicBool>,
}

/// The Prometheus recorder, installed once per process.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // In tests several apps share one process: the first recorder wins, and so does its handle.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

fn valid_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    (!s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    .then(|| s.to_owned())
}

/// A method as a metrics and log label: the standard ones by name, anything else `other` (a
/// caller must not be able to mint new label values).
fn method_label(m: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// The HTTP metrics of one (route, method, status).
struct HttpMetrics {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

type HttpMetricsByRoute = HashMap<String, HashMap<(&'static str, u16), HttpMetrics>>;

thread_local! {
    /// Each worker thread's handles, so that a request does not build the labels and look them
    /// up in the recorder's registry again. Routes are patterns and methods a fixed set, so the
    /// map stays small; it stops growing at `MAX_CACHED_METRICS` all the same.
    static HTTP_METRICS: RefCell<HttpMetricsByRoute> = RefCell::new(HashMap::new());
}
const MAX_CACHED_METRICS: usize = 1024;

fn record_http_metrics(route: String, method: &'static str, status: u16, elapsed: Duration) {
    let register = |route: &str| HttpMetrics {
        requests: metrics::counter!("credsync_http_requests_total", "route" => route.to_owned(), "method" => method, "status" => status.to_string()),
        duration: metrics::histogram!("credsync_http_request_duration_seconds", "route" => route.to_owned(), "method" => method),
    };
    let record = |m: &HttpMetrics| {
        m.requests.increment(1);
        m.duration.record(elapsed.as_secs_f64());
    };
    HTTP_METRICS.with_borrow_mut(|cache| {
        if let Some(m) = cache.get(&route).and_then(|r| r.get(&(method, status))) {
            return record(m);
        }
        let m = register(&route);
        record(&m);
        if cache.values().map(HashMap::len).sum::<usize>() < MAX_CACHED_METRICS {
            cache.entry(route).or_default().insert((method, status), m);
        }
    });
}

/// Request id, access log and HTTP metrics for every request; HEAD served as GET.
async fn request_context(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(valid_request_id)
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = method_label(req.method());
    // HEAD is GET without the body (RFC 9110 §9.3.2): routed as GET, and actix-http leaves the
    // body out of the answer to a HEAD request itself (Content-Length kept).
    if req.method() == actix_web::http::Method::HEAD {
        req.head_mut().method = actix_web::http::Method::GET;
    }
    let started = Instant::now();
    // The route is known once the request was routed (below, without matching the path again).
    // JSON lines logged while the request runs carry its id from the task-local; the pretty
    // format shows it from a span (`telemetry::request_spans`).
    let span = if crate::telemetry::request_spans() {
        tracing::info_span!("request", request_id = %id, method)
    } else {
        tracing::Span::none()
    };
    let result =
        tracing::Instrument::instrument(REQUEST_ID.scope(id.clone(), next.call(req)), span).await;
    let mut res = result?;
    let status = res.status().as_u16();
    let elapsed = started.elapsed();
    let route = res
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    // The access line carries the request's fields itself (the request's scope has ended).
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::warn!(request_id = %id, method, %route, status, elapsed_ms, "request");
    } else {
        tracing::info!(request_id = %id, method, %route, status, elapsed_ms, "request");
    }
    record_http_metrics(route, method, status, elapsed);
    Ok(res)
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}

/// The default service of a known path: 405 with `Allow: <allow>` for every other method.
pub(crate) fn method_not_allowed(allow: &'static str) -> actix_web::Route {
    web::to(
        move || async move { Err::<actix_web::HttpResponse, _>(ApiError::MethodNotAllowed(allow)) },
    )
}

/// A path that answers GET (and HEAD) only (405 with `Allow: GET, HEAD` otherwise).
pub(crate) fn get_only(path: &str, route: actix_web::Route) -> actix_web::Resource {
    web::resource(path)
        .route(route)
        .default_service(method_not_allowed("GET, HEAD"))
}

/// All routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    ops::routes(cfg);
    credentials::routes(cfg);
    sync_routes::routes(cfg);
    v1::routes(cfg);
}

/// Build the HTTP server on `listener` (not started until awaited). Each of the `workers`
/// gets its own database pool of `pool_per_worker` connections.
pub fn server(
    listener: TcpListener,
    state: Arc<AppState>,
    workers: usize,
    pool_per_worker: u32,
) -> std::io::Result<Server> {
    let server = HttpServer::new(move || {
        // Runs on the worker's own thread and runtime, where its pools must live.
        let local = AppState {
            gateway: state.gateway.for_worker(pool_per_worker),
            ..(*state).clone()
        };
        App::new()
            .app_data(web::Data::new(local))
            .wrap(from_fn(request_context))
            .configure(routes)
            .default_service(web::to(not_found))
    })
    .workers(workers.max(1))
    .client_request_timeout(Duration::from_secs(10))
    .client_disconnect_timeout(Duration::from_secs(2))
    .keep_alive(Duration::from_secs(75))
    .shutdown_timeout(15)
    .listen(listener)?
    .run();
    Ok(server)
}
