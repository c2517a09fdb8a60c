//! The middleware in front of every Leaf route (never the `/__sim/` admin routes): logs the
//! request, applies the active fault (latency, fixed or random status, hang, garbage),
//! checks the bearer token (all but `/api/authenticate`) and echoes `X-Request-Id`.

use std::time::Duration;

use actix_web::{
    Error, HttpResponse,
    body::{BoxBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    http::{
        StatusCode,
        header::{AUTHORIZATION, HeaderName},
    },
    middleware::Next,
    web,
};
use time::OffsetDateTime;

use super::json::Problem;
use super::state::{FaultAction, LogEntry, SimState};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Path of Leaf's authentication route (faults skip it unless `includeAuth`).
pub(crate) const AUTH_PATH: &str = "/api/authenticate";

/// How long a "hanging" answer takes.
const HANG: Duration = Duration::from_secs(3600);

pub(crate) async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let Some(state) = req.app_data::<web::Data<SimState>>().cloned() else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    let path = req.path().to_owned();
    let method = req.method().as_str().to_owned();
    let request_id = req.headers().get(REQUEST_ID).cloned();
    let seq = state.log_arrival(LogEntry {
        method: method.clone(),
        path: path.clone(),
        query: req.query_string().to_owned(),
        status: None,
        request_id: request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        at: OffsetDateTime::now_utc(),
    });
    let is_auth = path == AUTH_PATH;

    let action = match state.decide_fault(&method, &path, is_auth) {
        Some(decision) => {
            if !decision.latency.is_zero() {
                tokio::time::sleep(decision.latency).await;
            }
            decision.action
        }
        None => FaultAction::Pass,
    };

    let result = match action {
        FaultAction::Pass => {
            let auth = if is_auth {
                Ok(())
            } else {
                let header = req
                    .headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok());
                state.tokens.check_header(header)
            };
            match auth {
                Ok(()) => next
                    .call(req)
                    .await
                    .map(ServiceResponse::map_into_boxed_body),
                Err(detail) => {
                    let res = Problem::new(StatusCode::UNAUTHORIZED, detail).render(&path);
                    Ok(req.into_response(res))
                }
            }
        }
        FaultAction::Hang => {
            tokio::time::sleep(HANG).await;
            let res = Problem::new(StatusCode::GATEWAY_TIMEOUT, "Simulated hang").render(&path);
            Ok(req.into_response(res))
        }
        FaultAction::Status(status, retry_after, detail) => {
            let mut p = Problem::new(status, detail.unwrap_or_else(|| "Simulated fault".into()));
            p.retry_after = retry_after;
            Ok(req.into_response(p.render(&path)))
        }
        FaultAction::Garbage => {
            let res = HttpResponse::Ok()
                .content_type("application/json")
                .body("<html>oops, this is not JSON");
            Ok(req.into_response(res))
        }
    };

    match result {
        Ok(mut res) => {
            state.log_status(seq, res.status().as_u16());
            if let Some(id) = request_id {
                res.headers_mut().insert(REQUEST_ID, id);
            }
            Ok(res)
        }
        Err(e) => {
            state.log_status(seq, e.as_response_error().status_code().as_u16());
            Err(e)
        }
    }
}
