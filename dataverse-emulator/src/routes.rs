//! The HTTP entry point: token endpoint, authentication, service protection, faults, then the Web API.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;

use super::Shared;
use super::limits::{Admission, Kind};
use super::ops::{self, Ctx, OpHeaders, OpRequest, ROOT_PATH};
use super::reply::{Reply, codes};
use super::request_log::{self, Entry};
use uuid::Uuid;

/// Largest request body read (bulk payloads are bounded by the real service at about 117 MB).
const MAX_BODY: usize = 128 * 1024 * 1024;

pub(crate) async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared.counters.request();
    let arrived = (SystemTime::now(), Instant::now());
    // What the request log needs of the request, before `serve` consumes it.
    let logged = shared.request_log.as_ref().map(|_| {
        let client = |name| header(request.headers(), name).map(str::to_owned);
        (
            request.method().to_string(),
            request.uri().path_and_query().map_or_else(
                || request.uri().path().to_owned(),
                |pq| pq.as_str().to_owned(),
            ),
            client("x-ms-client-request-id"),
            client("x-ms-correlation-request-id"),
        )
    });
    let (reply, api) = serve(&shared, request).await;
    let service_request_id = Uuid::new_v4().to_string();
    let status = reply.status;
    let response = into_response(&shared, reply, api, &service_request_id);
    if let (Some(log), Some((method, target, client, correlation))) = (&shared.request_log, &logged)
    {
        log.write(&Entry {
            time_unix_ms: request_log::unix_ms(arrived.0),
            method,
            target,
            status,
            duration_ms: arrived.1.elapsed().as_secs_f64() * 1000.0,
            service_request_id: &service_request_id,
            client_request_id: client.as_deref(),
            correlation_request_id: correlation.as_deref(),
        });
    }
    response
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The reply, and whether it is a Web API response (which carries `OData-Version`).
async fn serve(shared: &Shared, request: Request) -> (Reply, bool) {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    if let Some(tenant) = token_tenant(path) {
        shared.counters.kind(Kind::Token);
        if parts.method != Method::POST {
            return (Reply::empty(405), false);
        }
        return match axum::body::to_bytes(body, 64 * 1024).await {
            Ok(body) => (
                shared.auth.token_endpoint(tenant, &body, &shared.base_url),
                false,
            ),
            Err(_) => (Reply::empty(413), false),
        };
    }
    let rest = if path == ROOT_PATH.trim_end_matches('/') {
        ""
    } else if let Some(rest) = path.strip_prefix(ROOT_PATH) {
        rest
    } else {
        shared.counters.kind(Kind::Rejected);
        return (
            Reply::error(
                404,
                codes::ODATA,
                format!("The path '{path}' is not under the service root {ROOT_PATH}."),
            ),
            false,
        );
    };

    if let Err(denied) = shared.auth.check(header(&parts.headers, "authorization")) {
        shared.counters.kind(Kind::Rejected);
        let challenge = format!(
            "Bearer authorization_uri={}/{}/oauth2/authorize",
            shared.base_url,
            shared.auth.tenant()
        );
        return (
            Reply::error(401, "", denied.message()).header("WWW-Authenticate", challenge),
            true,
        );
    }

    let Some(_in_flight) = shared.in_flight.enter(shared.concurrency_limit) else {
        shared.counters.kind(Kind::Rejected);
        shared.counters.throttled();
        let limit = shared.concurrency_limit.unwrap_or_default();
        return (
            Reply::error(
                429,
                codes::TOO_MANY_CONCURRENT_REQUESTS,
                format!("Number of concurrent requests exceeded the limit of {limit}."),
            )
            .header("Retry-After", shared.faults.retry_after().to_string()),
            true,
        );
    };

    shared.faults.wait_released().await;
    let latency = shared.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let burst_remaining = match &shared.request_limit {
        None => None,
        Some(limit) => match limit.admit() {
            Admission::Admitted(remaining) => Some(remaining),
            Admission::Refused(retry_after) => {
                shared.counters.kind(Kind::Rejected);
                shared.counters.throttled();
                let reply = Reply::error(
                    429,
                    codes::TOO_MANY_REQUESTS,
                    format!(
                        "Number of requests exceeded the limit of {} over time window of {} seconds.",
                        limit.max(),
                        limit.window().as_secs()
                    ),
                )
                .header("Retry-After", retry_after.to_string())
                .header("x-ms-ratelimit-burst-remaining-xrm-requests", "0");
                return (reply, true);
            }
        },
    };

    if let Some(status) = shared.faults.verdict() {
        shared.counters.kind(Kind::Rejected);
        let reply = match status {
            429 => {
                shared.counters.throttled();
                Reply::error(
                    429,
                    codes::TOO_MANY_REQUESTS,
                    "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
                )
                .header("Retry-After", shared.faults.retry_after().to_string())
            }
            503 => Reply::error(
                503,
                codes::UNEXPECTED,
                "The service is unavailable (emulated fault).",
            ),
            _ => Reply::error(
                status,
                codes::UNEXPECTED,
                format!("Emulated fault: HTTP {status}."),
            ),
        };
        return (reply, true);
    }

    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(_) => {
            shared.counters.kind(Kind::Rejected);
            return (
                Reply::error(413, "", "The request body is too large."),
                true,
            );
        }
    };
    if header(&parts.headers, "mscrm.bypasscustompluginexecution")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    {
        shared.counters.kind(Kind::Bypass);
    }
    let prefer = parts
        .headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok());
    let headers = OpHeaders::new(
        header(&parts.headers, "if-match"),
        header(&parts.headers, "if-none-match"),
        prefer,
    );
    let mut reply = if rest == "$batch" {
        shared.counters.kind(Kind::Batch);
        if parts.method == Method::POST {
            super::batch::execute(
                shared,
                header(&parts.headers, "content-type"),
                &headers.prefs,
                &body,
            )
        } else {
            Reply::error(
                405,
                codes::ODATA,
                format!(
                    "The requested resource does not support http method '{}'.",
                    parts.method
                ),
            )
        }
    } else {
        let request = OpRequest {
            method: parts.method.as_str(),
            path: rest,
            query: parts.uri.query(),
            headers,
            body: &body,
        };
        let outcome = {
            let mut data = shared.lock();
            ops::dispatch(shared, &mut data, &request, &Ctx::default())
        };
        shared.counters.kind(outcome.kind);
        outcome.reply
    };
    if let Some(remaining) = burst_remaining {
        reply = reply.header(
            "x-ms-ratelimit-burst-remaining-xrm-requests",
            remaining.to_string(),
        );
    }
    (reply, true)
}

/// `/{tenant}/oauth2/v2.0/token` → the tenant.
fn token_tenant(path: &str) -> Option<&str> {
    let tenant = path.strip_prefix('/')?.strip_suffix("/oauth2/v2.0/token")?;
    (!tenant.is_empty() && !tenant.contains('/')).then_some(tenant)
}

fn into_response(shared: &Shared, reply: Reply, api: bool, service_request_id: &str) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = Response::new(Body::from(reply.body));
    *response.status_mut() = status;
    response.extensions_mut().extend(shared.header_case.clone());
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(service_request_id) {
        headers.insert(HeaderName::from_static("x-ms-service-request-id"), value);
    }
    if api {
        headers.insert(
            HeaderName::from_static("odata-version"),
            HeaderValue::from_static("4.0"),
        );
    }
    if let Ok(value) = HeaderValue::from_str(&shared.dop_hint) {
        headers.insert(HeaderName::from_static("x-ms-dop-hint"), value);
    }
    for (name, value) in reply.headers {
        match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => tracing::warn!(
                header = name,
                "dropped a response header that is not valid HTTP"
            ),
        }
    }
    response
}
