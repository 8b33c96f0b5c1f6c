//! Request counters, service protection limits and fault injection. Times come from tokio's clock so that tests
//! can pause and advance it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// What a request did, for [`RequestCounts::by_kind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Create,
    Upsert,
    Update,
    Read,
    Query,
    Delete,
    Batch,
    Bulk,
    Metadata,
    WhoAmI,
    Token,
    Rejected,
    Bypass,
    Other,
}

impl Kind {
    const ALL: [Kind; 14] = [
        Kind::Create,
        Kind::Upsert,
        Kind::Update,
        Kind::Read,
        Kind::Query,
        Kind::Delete,
        Kind::Batch,
        Kind::Bulk,
        Kind::Metadata,
        Kind::WhoAmI,
        Kind::Token,
        Kind::Rejected,
        Kind::Bypass,
        Kind::Other,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Create => "create",
            Kind::Upsert => "upsert",
            Kind::Update => "update",
            Kind::Read => "read",
            Kind::Query => "query",
            Kind::Delete => "delete",
            Kind::Batch => "batch",
            Kind::Bulk => "bulk",
            Kind::Metadata => "metadata",
            Kind::WhoAmI => "whoami",
            Kind::Token => "token",
            Kind::Rejected => "rejected",
            Kind::Bypass => "bypass",
            Kind::Other => "other",
        }
    }
}

/// A snapshot of what the emulator received (see [`Emulator::counts`](super::Emulator::counts)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// Every HTTP request received (round trips), including rejected ones and token requests.
    pub http_requests: u64,
    /// Operations inside `$batch` bodies (each operation of a change set counts).
    pub batch_operations: u64,
    /// Requests answered `429` by a service protection limit or an injected fault.
    pub throttled: u64,
    /// Web API requests being served right now (past authentication; includes requests held by
    /// [`Faults::hold`] or delayed by [`Faults::set_latency`]).
    pub in_flight: u64,
    /// Requests by kind; only kinds seen are present. Kinds: `create` (POST), `upsert` (PATCH without
    /// `If-Match`), `update` (PATCH with `If-Match`, PUT of a property), `read` (GET one row), `query` (GET a
    /// collection or delta), `delete`, `batch` (a `$batch` request; its operations also count under their own
    /// kinds), `bulk` (Create/Update/UpsertMultiple), `metadata` (EntityDefinitions, sdkmessagefilters, service
    /// document), `whoami`, `token`, `rejected` (401, 429, injected faults, and errors before routing), `bypass`
    /// (requests or batch operations with `MSCRM.BypassCustomPluginExecution: true`), `other`.
    pub by_kind: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    http: AtomicU64,
    batch_operations: AtomicU64,
    throttled: AtomicU64,
    kinds: [AtomicU64; Kind::ALL.len()],
}

impl Counters {
    pub(crate) fn request(&self) {
        self.http.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn batch_operations(&self, n: u64) {
        self.batch_operations.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn throttled(&self) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn kind(&self, kind: Kind) {
        self.kinds[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, in_flight: usize) -> RequestCounts {
        RequestCounts {
            http_requests: self.http.load(Ordering::Relaxed),
            batch_operations: self.batch_operations.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            in_flight: in_flight as u64,
            by_kind: Kind::ALL
                .iter()
                .filter_map(|&k| {
                    let n = self.kinds[k as usize].load(Ordering::Relaxed);
                    (n > 0).then(|| (k.name().to_owned(), n))
                })
                .collect(),
        }
    }

    pub(crate) fn reset(&self) {
        self.http.store(0, Ordering::Relaxed);
        self.batch_operations.store(0, Ordering::Relaxed);
        self.throttled.store(0, Ordering::Relaxed);
        for k in &self.kinds {
            k.store(0, Ordering::Relaxed);
        }
    }
}

/// Live fault switches of a running emulator (see [`Emulator::faults`](super::Emulator::faults)). Thread-safe;
/// changes apply to the next request. Faults apply to Web API requests after authentication and service
/// protection, not to the token endpoint.
#[derive(Debug)]
pub struct Faults {
    state: Mutex<FaultState>,
    held: watch::Sender<bool>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            state: Mutex::default(),
            held: watch::Sender::new(false),
        }
    }
}

#[derive(Debug, Default)]
struct FaultState {
    latency: Duration,
    outage: bool,
    outage_until: Option<Instant>,
    fail_rate: f64,
    /// 0 stands for 503.
    fail_rate_status: u16,
    rng: u64,
    fail_next: u32,
    fail_next_status: u16,
    /// 0 stands for 1 s.
    retry_after_secs: u64,
}

impl Faults {
    fn state(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `d` (tokio time) to every Web API request, after the concurrency check (so slow requests count as
    /// in flight). Zero turns it off.
    pub fn set_latency(&self, d: Duration) {
        self.state().latency = d;
    }

    /// While on, every Web API request gets `503` with an error envelope.
    pub fn outage(&self, on: bool) {
        self.state().outage = on;
    }

    /// `503` for every Web API request until `tokio::time::Instant::now() + d`.
    pub fn outage_for(&self, d: Duration) {
        self.state().outage_until = Some(later(Instant::now(), d));
    }

    /// This fraction (0.0 to 1.0) of Web API requests get `503`, chosen by a pseudo-random sequence seeded with
    /// `seed`, so a run is reproducible for the same request order.
    pub fn fail_rate(&self, rate: f64, seed: u64) {
        self.fail_rate_with(rate, seed, 503);
    }

    /// Like [`fail_rate`](Self::fail_rate), with another status: `429` (throttling, with
    /// [`Retry-After`](Self::set_retry_after) and code `0x80072322`), `500`, `502`, ... A NaN rate counts as 0.
    pub fn fail_rate_with(&self, rate: f64, seed: u64, status: u16) {
        let mut state = self.state();
        state.fail_rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        state.fail_rate_status = status;
        state.rng = seed;
    }

    /// The `Retry-After` (whole seconds, at least 1; default 1) sent with the `429`s of injected faults and of
    /// the concurrency limit. (The request-rate limit computes its own from its window.)
    pub fn set_retry_after(&self, seconds: u64) {
        self.state().retry_after_secs = seconds;
    }

    /// See [`set_retry_after`](Self::set_retry_after).
    pub(crate) fn retry_after(&self) -> u64 {
        self.state().retry_after_secs.max(1)
    }

    /// The next `n` Web API requests get `status`: `429` comes with `Retry-After: 1` and code `0x80072322`, other
    /// statuses with an error envelope.
    pub fn fail_next(&self, n: u32, status: u16) {
        let mut state = self.state();
        state.fail_next = n;
        state.fail_next_status = status;
    }

    /// While on, Web API requests wait after the concurrency check (they count as in flight) until it is turned
    /// off. Deterministic, timer-free way to have requests in flight in tests.
    pub fn hold(&self, on: bool) {
        self.held.send_replace(on);
    }

    /// Turns every fault off (and releases held requests).
    pub fn clear(&self) {
        *self.state() = FaultState::default();
        self.hold(false);
    }

    /// Waits while [`hold`](Self::hold) is on.
    pub(crate) async fn wait_released(&self) {
        if *self.held.borrow() {
            let mut released = self.held.subscribe();
            // Err only if the sender is gone, which cannot happen while `self` lives.
            let _ = released.wait_for(|held| !held).await;
        }
    }

    pub(crate) fn latency(&self) -> Duration {
        self.state().latency
    }

    /// The status an injected fault imposes on this request, if any.
    pub(crate) fn verdict(&self) -> Option<u16> {
        let mut state = self.state();
        if state.outage {
            return Some(503);
        }
        if let Some(until) = state.outage_until {
            if Instant::now() < until {
                return Some(503);
            }
            state.outage_until = None;
        }
        if state.fail_next > 0 {
            state.fail_next -= 1;
            return Some(state.fail_next_status);
        }
        if state.fail_rate > 0.0 {
            let draw = splitmix64(&mut state.rng);
            // 53 random bits as a fraction in [0, 1).
            let unit = (draw >> 11) as f64 / (1u64 << 53) as f64;
            if unit < state.fail_rate {
                return Some(match state.fail_rate_status {
                    0 => 503,
                    status => status,
                });
            }
        }
        None
    }
}

/// `now + d`, saturating at a far future instead of panicking on overflow.
pub(crate) fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(30 * 365 * 86_400)))
        .unwrap_or(now)
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny seeded generator, enough for reproducible fault draws without
/// adding a `rand` dependency.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The request-count limit over a sliding window.
#[derive(Debug)]
pub(crate) struct RequestLimit {
    max: u32,
    window: Duration,
    recent: Mutex<VecDeque<Instant>>,
}

/// The outcome of [`RequestLimit::admit`].
pub(crate) enum Admission {
    /// Admitted; this many requests remain in the window.
    Admitted(u32),
    /// Refused; retry after this many whole seconds (at least 1).
    Refused(u64),
}

impl RequestLimit {
    pub(crate) fn new(max: u32, window: Duration) -> Self {
        RequestLimit {
            max,
            window,
            recent: Mutex::new(VecDeque::new()),
        }
    }

    pub(crate) fn max(&self) -> u32 {
        self.max
    }

    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    pub(crate) fn admit(&self) -> Admission {
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        while recent
            .front()
            .is_some_and(|&t| later(t, self.window) <= now)
        {
            recent.pop_front();
        }
        if recent.len() >= self.max as usize {
            let frees_at = recent.front().map_or(now, |&t| later(t, self.window));
            let wait = frees_at.saturating_duration_since(now);
            // Whole seconds, rounded up, at least 1.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Admission::Refused(secs.max(1));
        }
        recent.push_back(now);
        Admission::Admitted(self.max - recent.len() as u32)
    }
}

/// Requests in flight, for the concurrency limit.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
}

/// Decrements the in-flight count when the request ends.
#[derive(Debug)]
pub(crate) struct InFlightGuard<'a>(&'a InFlight);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl InFlight {
    pub(crate) fn current(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Enters unless `limit` requests are already in flight (a refused request never counts, not even briefly).
    pub(crate) fn enter(&self, limit: Option<usize>) -> Option<InFlightGuard<'_>> {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match limit {
                Some(limit) if n >= limit => None,
                _ => Some(n + 1),
            })
            .ok()
            .map(|_| InFlightGuard(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_rate_is_deterministic_and_roughly_right() {
        let draws = |seed| {
            let faults = Faults::default();
            faults.fail_rate(0.25, seed);
            (0..4000)
                .map(|_| faults.verdict().is_some())
                .collect::<Vec<_>>()
        };
        let a = draws(7);
        assert_eq!(a, draws(7));
        assert_ne!(a, draws(8));
        let failed = a.iter().filter(|f| **f).count();
        assert!((800..1200).contains(&failed), "{failed}");
    }

    #[test]
    fn in_flight_limit() {
        let in_flight = InFlight::default();
        let a = in_flight.enter(Some(1));
        assert!(a.is_some());
        assert!(in_flight.enter(Some(1)).is_none());
        drop(a);
        assert!(in_flight.enter(Some(1)).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn sliding_window() {
        let limit = RequestLimit::new(2, Duration::from_secs(10));
        assert!(matches!(limit.admit(), Admission::Admitted(1)));
        tokio::time::advance(Duration::from_millis(4500)).await;
        assert!(matches!(limit.admit(), Admission::Admitted(0)));
        assert!(matches!(limit.admit(), Admission::Refused(6)));
        tokio::time::advance(Duration::from_millis(5500)).await;
        assert!(matches!(limit.admit(), Admission::Admitted(0)));
        assert!(matches!(limit.admit(), Admission::Refused(5)));
    }
}
