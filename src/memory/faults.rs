//! Fault injection for the in-memory store: outages, latency and transient failures on demand.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::Error;

/// The transient error an injected failure produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// [`Error::Unavailable`].
    Unavailable,
    /// [`Error::Throttled`] with this `Retry-After`.
    Throttled {
        /// The wait the store asks for.
        retry_after: Duration,
    },
}

#[derive(Debug, Default)]
struct State {
    latency: Duration,
    down: bool,
    down_until: Option<Instant>,
    fail_next: u32,
    fault: Option<Fault>,
}

/// Switches for making a store misbehave. Every store call (a read, a write, a whole batch) passes through
/// the injector once. Time-based outages use Tokio's clock, so tests can pause and advance it instead
/// of sleeping.
#[derive(Debug, Default)]
pub struct FaultInjector {
    state: Mutex<State>,
}

impl FaultInjector {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `latency` to every call (slow store).
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Takes the store down until [`restore`](Self::restore).
    pub fn go_down(&self) {
        self.lock().down = true;
    }

    /// Takes the store down for `duration` from now; calls meanwhile fail with a `retry_after` of the time left.
    pub fn go_down_for(&self, duration: Duration) {
        self.lock().down_until = Some(Instant::now() + duration);
    }

    /// Ends any outage and clears pending failures and latency.
    pub fn restore(&self) {
        *self.lock() = State::default();
    }

    /// Fails the next `calls` calls with `fault`.
    pub fn fail_next(&self, calls: u32, fault: Fault) {
        let mut state = self.lock();
        state.fail_next = calls;
        state.fault = Some(fault);
    }

    /// Applies the configured faults to one call: waits out the latency, then says whether the call fails.
    pub(crate) async fn check(&self) -> Result<(), Injected> {
        let latency = self.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut state = self.lock();
        let remaining = state
            .down_until
            .and_then(|until| until.checked_duration_since(Instant::now()))
            .filter(|d| !d.is_zero());
        if state.down || remaining.is_some() {
            return Err(Injected::Outage {
                retry_after: remaining,
            });
        }
        if state.fail_next > 0 {
            state.fail_next -= 1;
            return Err(Injected::Failure(state.fault.unwrap_or(Fault::Unavailable)));
        }
        Ok(())
    }
}

/// A failure [`FaultInjector::check`] decided on; turned into an error once per affected item.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Injected {
    Outage { retry_after: Option<Duration> },
    Failure(Fault),
}

impl Injected {
    pub(crate) fn error(self, backend: &str) -> Error {
        let backend = backend.to_owned();
        match self {
            Injected::Outage { retry_after } => Error::Unavailable {
                backend,
                reason: "injected outage".into(),
                retry_after,
            },
            Injected::Failure(Fault::Unavailable) => Error::Unavailable {
                backend,
                reason: "injected transient failure".into(),
                retry_after: None,
            },
            Injected::Failure(Fault::Throttled { retry_after }) => Error::Throttled {
                backend,
                retry_after: Some(retry_after),
            },
        }
    }
}
