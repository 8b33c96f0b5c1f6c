//! The HTTP layer under [`DataverseStore`](super::DataverseStore): standard headers, authentication, correlation
//! ids, retries, the circuit breaker and the parallelism limit. Every request to the service goes through
//! [`Transport::execute`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use reqwest::header::{HeaderMap, HeaderValue};
use tokio::sync::{Semaphore, SemaphorePermit};
use tracing::Instrument;
use uuid::Uuid;

use crate::breaker::CircuitBreaker;
use crate::correlation;
use crate::dataverse::auth::{Secret, TokenProvider};
use crate::dataverse::config::MAX_PARALLEL_REQUESTS;
use crate::dataverse::response::{RequestContext, map_error, parse_retry_after};
use crate::error::{Error, Result};
use crate::retry::RetryPolicy;

/// The header that carries one id per logical operation (every request of a batch write, every retry).
pub const CORRELATION_HEADER: &str = "x-ms-correlation-request-id";
/// The header that carries one id per HTTP request (Dataverse logs it).
pub const CLIENT_REQUEST_HEADER: &str = "x-ms-client-request-id";

/// One request, relative to the service root.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub method: reqwest::Method,
    /// Path and query after `/api/data/v9.2/`, already encoded.
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<(String, Vec<u8>)>,
    /// Safe to send twice: decides whether a failure that may have reached the service is retried.
    pub idempotent: bool,
    /// For traces: `read`, `write`, `batch`, `bulk`, `metadata`.
    pub kind: &'static str,
}

impl Request {
    pub fn new(method: reqwest::Method, path: String, kind: &'static str) -> Self {
        let idempotent = method != reqwest::Method::POST;
        Self {
            method,
            path,
            headers: Vec::new(),
            body: None,
            idempotent,
            kind,
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn body(mut self, content_type: String, body: Vec<u8>) -> Self {
        self.body = Some((content_type, body));
        self
    }

    pub fn idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = idempotent;
        self
    }
}

/// A response the service answered (any status but 401, 408, 429 and 5xx, which become errors).
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self, backend: &str) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| Error::Backend {
            backend: backend.to_owned(),
            message: format!("HTTP {}: the body is not JSON ({e})", self.status),
            retryable: false,
            source: None,
        })
    }
}

/// Counters for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// HTTP requests sent (each retry counts).
    pub requests: u64,
    /// Requests retried after a transient failure.
    pub retries: u64,
    /// Tokens refreshed after a 401.
    pub token_refreshes: u64,
}

pub(crate) struct Transport {
    pub http: reqwest::Client,
    /// `https://host/api/data/v9.2/`
    pub root: String,
    pub name: String,
    pub auth: Option<Arc<dyn TokenProvider>>,
    pub retry: RetryPolicy,
    pub breaker: CircuitBreaker,
    pub limiter: Limiter,
    pub bypass_custom_plugins: bool,
    /// Largest response body read.
    pub max_response_bytes: u64,
    pub counters: Counters,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    token_refreshes: AtomicU64,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("root", &self.root)
            .field("auth", &self.auth)
            .field("limit", &self.limiter.limit())
            .finish_non_exhaustive()
    }
}

impl Transport {
    pub fn stats(&self) -> TransportStats {
        TransportStats {
            requests: self.counters.requests.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
            token_refreshes: self.counters.token_refreshes.load(Ordering::Relaxed),
        }
    }

    /// Sends `request` with retries (transient failures; ones that may have reached the service only when the
    /// request is idempotent) through the circuit breaker. `context` names the record for error messages.
    pub async fn execute(
        &self,
        request: &Request,
        context: &RequestContext<'_>,
    ) -> Result<Response> {
        let correlation = correlation::current_or_new();
        let span = tracing::debug_span!(
            "dataverse_request",
            backend = %self.name,
            kind = request.kind,
            method = %request.method,
            %correlation,
        );
        let maybe_applied = AtomicBool::new(false);
        let attempts = AtomicUsize::new(0);
        async {
            self.retry
                .run_if(
                    |_| request.idempotent || !maybe_applied.load(Ordering::Relaxed),
                    || async {
                        if attempts.fetch_add(1, Ordering::Relaxed) > 0 {
                            self.counters.retries.fetch_add(1, Ordering::Relaxed);
                        }
                        self.breaker
                            .call(|| self.attempt(request, context, correlation, &maybe_applied))
                            .await
                    },
                )
                .await
        }
        .instrument(span)
        .await
    }

    async fn attempt(
        &self,
        request: &Request,
        context: &RequestContext<'_>,
        correlation: Uuid,
        maybe_applied: &AtomicBool,
    ) -> Result<Response> {
        let _permit = self.limiter.acquire().await;
        let mut refreshed = false;
        loop {
            let token = match &self.auth {
                Some(provider) => Some(provider.token().await?),
                None => None,
            };
            let response = self
                .send_once(request, token.as_ref(), correlation, maybe_applied)
                .await?;
            if response.status == 401
                && !refreshed
                && let (Some(provider), Some(token)) = (&self.auth, &token)
            {
                // An expired or revoked token: fetch a new one once, then report a second 401 as it is.
                provider.invalidate(token);
                refreshed = true;
                self.counters
                    .token_refreshes
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!("token rejected (401); refreshing it once");
                continue;
            }
            return match response.status {
                401 | 408 | 429 | 500..=599 => {
                    // 429 and 503 are refusals; other 5xx (and 408) may come after the write was applied.
                    maybe_applied.store(
                        !matches!(response.status, 429 | 503 | 401),
                        Ordering::Relaxed,
                    );
                    let retry_after = response
                        .header("retry-after")
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    Err(map_error(
                        response.status,
                        retry_after,
                        &response.body,
                        context,
                    ))
                }
                _ => Ok(response),
            };
        }
    }

    async fn send_once(
        &self,
        request: &Request,
        token: Option<&Secret>,
        correlation: Uuid,
        maybe_applied: &AtomicBool,
    ) -> Result<Response> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        // Links the service returned (next pages, delta links) are followed as given, once checked to lead to
        // this service (`store::follow_link`); everything else is relative to the root.
        let url = if is_absolute(&request.path) {
            request.path.clone()
        } else {
            format!("{}{}", self.root, request.path)
        };
        let mut builder = self
            .http
            .request(request.method.clone(), &url)
            .header("Accept", "application/json")
            .header("OData-MaxVersion", "4.0")
            .header("OData-Version", "4.0")
            .header(CLIENT_REQUEST_HEADER, Uuid::new_v4().to_string())
            .header(CORRELATION_HEADER, correlation.to_string());
        if let Some(token) = token {
            let mut value =
                HeaderValue::from_str(&format!("Bearer {}", token.expose())).map_err(|_| {
                    Error::Unauthorized {
                        backend: self.name.clone(),
                        message: "the access token contains characters not allowed in a header"
                            .into(),
                    }
                })?;
            value.set_sensitive(true);
            builder = builder.header("Authorization", value);
        }
        if self.bypass_custom_plugins {
            builder = builder.header("MSCRM.BypassCustomPluginExecution", "true");
        }
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        if let Some((content_type, body)) = &request.body {
            builder = builder
                .header("Content-Type", content_type)
                .body(body.clone());
        }
        let response = builder.send().await.map_err(|e| {
            maybe_applied.store(!e.is_connect(), Ordering::Relaxed);
            self.transport_error(&e)
        })?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        self.limiter.follow(&headers);
        let body = self
            .read_body(response, request)
            .await
            .inspect_err(|_| maybe_applied.store(true, Ordering::Relaxed))?;
        tracing::trace!(status, path = %request.path, "response");
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// Reads a body up to [`max_response_bytes`](Self::max_response_bytes): a larger `Content-Length` fails
    /// before reading, a longer body as soon as it passes the limit.
    async fn read_body(
        &self,
        mut response: reqwest::Response,
        request: &Request,
    ) -> Result<Vec<u8>> {
        let limit = self.max_response_bytes;
        let too_large = || {
            tracing::warn!(limit, path = %request.path, "response body over the limit; reading stopped");
            Error::ResponseTooLarge {
                backend: self.name.clone(),
                what: format!("{} {}", request.method, request.path),
                limit,
            }
        };
        let expected = response.content_length();
        if expected.is_some_and(|length| length > limit) {
            return Err(too_large());
        }
        let capacity = expected.unwrap_or(0).min(limit).min(1 << 20);
        let mut body = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.transport_error(&e))?
        {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn transport_error(&self, e: &reqwest::Error) -> Error {
        // reqwest's Display includes the URL; ours never carries secrets (tokens travel in a header).
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "could not connect"
        } else {
            "connection failed"
        };
        Error::Unavailable {
            backend: self.name.clone(),
            reason: format!("{what}: {e}"),
            retry_after: None,
        }
    }
}

/// Whether a request path is an absolute URL (a link the service returned) rather than relative to the root.
pub(crate) fn is_absolute(path: &str) -> bool {
    let lower = path.get(..8).unwrap_or(path).to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

/// The parallel-request limit: at most `max` (≤ 52) requests in flight, lowered (or raised back, up to `max`) to
/// the service's `x-ms-dop-hint`.
///
/// Hand-written because tokio's semaphore has no "resize": shrinking forgets free permits, and permits that are
/// busy at that moment are forgotten when they are released (`debt`).
/// The parallelism before the first `x-ms-dop-hint` arrives.
const INITIAL_PARALLEL: usize = 4;

pub(crate) struct Limiter {
    semaphore: Semaphore,
    max: usize,
    follow_hint: bool,
    state: Mutex<LimitState>,
}

#[derive(Debug)]
struct LimitState {
    limit: usize,
    debt: usize,
}

pub(crate) struct Permit<'a> {
    permit: Option<SemaphorePermit<'a>>,
    limiter: &'a Limiter,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut state = self.limiter.lock();
        if let Some(permit) = self.permit.take()
            && state.debt > 0
        {
            state.debt -= 1;
            permit.forget();
        }
    }
}

impl Limiter {
    pub fn new(max: usize, follow_hint: bool) -> Self {
        let max = max.clamp(1, MAX_PARALLEL_REQUESTS);
        // Until the service states its hint, start where Microsoft's samples see it (4) rather than at the ceiling,
        // so that a first burst cannot trip the concurrency limit.
        let start = if follow_hint {
            max.min(INITIAL_PARALLEL)
        } else {
            max
        };
        Self {
            semaphore: Semaphore::new(start),
            max,
            follow_hint,
            state: Mutex::new(LimitState {
                limit: start,
                debt: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LimitState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    pub async fn acquire(&self) -> Permit<'_> {
        // The semaphore is never closed, so acquire only fails if it were; then run unlimited rather than fail.
        let permit = self.semaphore.acquire().await.ok();
        Permit {
            permit,
            limiter: self,
        }
    }

    fn follow(&self, headers: &HeaderMap) {
        if !self.follow_hint {
            return;
        }
        let Some(hint) = headers
            .get("x-ms-dop-hint")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
        else {
            return;
        };
        self.set_limit(hint);
    }

    pub fn set_limit(&self, limit: usize) {
        let limit = limit.clamp(1, self.max);
        let mut state = self.lock();
        if limit < state.limit {
            let shrink = state.limit - limit;
            let forgotten = self.semaphore.forget_permits(shrink);
            state.debt += shrink - forgotten;
        } else if limit > state.limit {
            let grow = limit - state.limit;
            let repaid = grow.min(state.debt);
            state.debt -= repaid;
            self.semaphore.add_permits(grow - repaid);
        }
        if limit != state.limit {
            tracing::debug!(
                from = state.limit,
                to = limit,
                "parallel request limit follows x-ms-dop-hint"
            );
            state.limit = limit;
        }
    }

    #[cfg(test)]
    fn available(&self) -> usize {
        self.semaphore.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hint(n: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-ms-dop-hint", HeaderValue::from_str(n).unwrap());
        h
    }

    #[tokio::test]
    async fn the_limit_follows_the_hint_and_never_exceeds_52() {
        let limiter = Limiter::new(100, true);
        assert_eq!(
            limiter.limit(),
            4,
            "a cautious start until the service states its hint"
        );
        limiter.follow(&hint("1000"));
        assert_eq!(
            limiter.limit(),
            52,
            "never above the service's concurrency ceiling"
        );
        limiter.follow(&hint("4"));
        assert_eq!((limiter.limit(), limiter.available()), (4, 4));
        limiter.follow(&hint("1000"));
        assert_eq!((limiter.limit(), limiter.available()), (52, 52));
        limiter.follow(&hint("not a number"));
        assert_eq!(limiter.limit(), 52);
        let fixed = Limiter::new(8, false);
        fixed.follow(&hint("2"));
        assert_eq!(fixed.limit(), 8);
    }

    #[tokio::test]
    async fn shrinking_while_busy_takes_effect_as_permits_come_back() {
        let limiter = Limiter::new(4, false);
        let held: Vec<Permit<'_>> = vec![
            limiter.acquire().await,
            limiter.acquire().await,
            limiter.acquire().await,
        ];
        limiter.set_limit(1);
        // One free permit was forgotten at once; two are owed by the busy ones.
        assert_eq!(limiter.available(), 0);
        drop(held);
        assert_eq!(
            limiter.available(),
            1,
            "in flight never exceeds the new limit"
        );
        limiter.set_limit(3);
        assert_eq!(limiter.available(), 3);
    }
}
