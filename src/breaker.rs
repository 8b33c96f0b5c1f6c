//! [`CircuitBreaker`]: stop calling a store that keeps failing, probe it after a pause, resume when it answers.
//!
//! Hand-written on purpose: the maintained breaker crates either wrap `tower` services or classify failures by
//! their own error types. Ours counts exactly the crate's transient errors ([`Error::is_retryable`]): a
//! not-found or an already-exists proves the store is answering, so it counts as a success. The breaker runs on
//! Tokio's clock, so tests pause and advance time instead of sleeping.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::{Error, Result};

/// When a breaker opens and how long it stays open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BreakerConfig {
    /// Consecutive transient failures that open the circuit (default 5).
    pub failure_threshold: u32,
    /// How long the circuit stays open before one probe call is let through (default 30 s).
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(30),
        }
    }
}

/// The state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; this many transient failures in a row so far.
    Closed {
        /// Consecutive transient failures.
        failures: u32,
    },
    /// Calls fail fast with [`Error::CircuitOpen`] until the deadline.
    Open {
        /// When a probe is let through.
        until: Instant,
    },
    /// One probe call is in flight; others fail fast until it answers.
    HalfOpen,
}

/// A circuit breaker for one target (one store, one host). Share it (`Arc`) between the tasks calling that target.
#[derive(Debug)]
pub struct CircuitBreaker {
    target: String,
    config: BreakerConfig,
    state: Mutex<BreakerState>,
}

impl CircuitBreaker {
    /// A closed breaker for `target` (named in [`Error::CircuitOpen`]). A threshold of 0 is treated as 1.
    pub fn new(target: impl Into<String>, config: BreakerConfig) -> Self {
        let config = BreakerConfig {
            failure_threshold: config.failure_threshold.max(1),
            ..config
        };
        Self {
            target: target.into(),
            config,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // The state is a plain value, valid whatever panicked while it was held.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `operation` unless the circuit is open, and records how it went.
    pub async fn call<T, Fut>(&self, operation: impl FnOnce() -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<T>>,
    {
        self.admit()?;
        let result = operation().await;
        self.record(result.as_ref().err());
        result
    }

    /// Lets a call through, or fails fast while the circuit is open (or a probe is already in flight).
    fn admit(&self) -> Result<()> {
        let mut state = self.lock();
        let now = Instant::now();
        match *state {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { until } if now >= until => {
                tracing::info!(target = %self.target, "circuit half-open: letting one probe through");
                *state = BreakerState::HalfOpen;
                Ok(())
            }
            BreakerState::Open { until } => Err(self.open_error(until - now)),
            BreakerState::HalfOpen => Err(self.open_error(Duration::ZERO)),
        }
    }

    fn open_error(&self, retry_after: Duration) -> Error {
        Error::CircuitOpen {
            backend: self.target.clone(),
            retry_after,
        }
    }

    /// Records an outcome: only transient errors count as failures.
    fn record(&self, error: Option<&Error>) {
        let mut state = self.lock();
        let failed = error.is_some_and(Error::is_retryable);
        *state = match (*state, failed) {
            (_, false) => BreakerState::Closed { failures: 0 },
            (BreakerState::Closed { failures }, true)
                if failures + 1 < self.config.failure_threshold =>
            {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            (_, true) => {
                tracing::warn!(
                    target = %self.target,
                    open_for_ms = self.config.open_for.as_millis() as u64,
                    error = ?error.map(ToString::to_string),
                    "circuit open"
                );
                BreakerState::Open {
                    until: Instant::now() + self.config.open_for,
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn down() -> Error {
        Error::Unavailable {
            backend: "eu".into(),
            reason: "down".into(),
            retry_after: None,
        }
    }

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(
            "eu",
            BreakerConfig {
                failure_threshold: 3,
                open_for: Duration::from_secs(10),
            },
        )
    }

    async fn fail(b: &CircuitBreaker) -> Result<()> {
        b.call(|| async { Err::<(), _>(down()) }).await
    }

    /// A breaker opened by three transient failures.
    async fn opened() -> CircuitBreaker {
        let b = breaker();
        for _ in 0..3 {
            let _ = fail(&b).await;
        }
        b
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_fails_fast() {
        let b = breaker();
        for _ in 0..3 {
            assert!(matches!(fail(&b).await, Err(Error::Unavailable { .. })));
        }
        assert!(matches!(b.state(), BreakerState::Open { .. }));
        let calls = AtomicU32::new(0);
        let err = b
            .call(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .await
            .unwrap_err();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "an open circuit does not call the store"
        );
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_probe_closes_it_and_a_failed_one_reopens_it() {
        let b = opened().await;
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            matches!(fail(&b).await, Err(Error::Unavailable { .. })),
            "the probe is let through"
        );
        assert!(
            matches!(b.state(), BreakerState::Open { .. }),
            "a failed probe reopens"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        b.call(|| async { Ok(()) }).await.unwrap();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn only_one_probe_at_a_time() {
        let b = opened().await;
        tokio::time::advance(Duration::from_secs(10)).await;
        let (release, wait) = tokio::sync::oneshot::channel::<()>();
        let probe = b.call(|| async move {
            let _ = wait.await;
            Ok(())
        });
        let second = async {
            tokio::task::yield_now().await;
            let rejected = b.call(|| async { Ok(()) }).await;
            let _ = release.send(());
            rejected
        };
        let (probe, second) = tokio::join!(probe, second);
        probe.unwrap();
        assert!(
            matches!(second, Err(Error::CircuitOpen { .. })),
            "{second:?}"
        );
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn answers_that_are_not_outages_do_not_count() {
        let b = breaker();
        let _ = fail(&b).await;
        let _ = fail(&b).await;
        let not_found = Error::UnknownTable {
            table: crate::TableName::new("x").unwrap(),
        };
        let _ = b.call(|| async { Err::<(), _>(not_found) }).await;
        assert_eq!(
            b.state(),
            BreakerState::Closed { failures: 0 },
            "the store answered, so it is up"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn composes_with_the_retry_policy() {
        // While the circuit is open the retry policy waits for the breaker's retry-after, then the probe succeeds.
        let b = opened().await;
        let started = Instant::now();
        let policy = crate::RetryPolicy {
            jitter: false,
            ..crate::RetryPolicy::default()
        };
        policy.run(|| b.call(|| async { Ok(()) })).await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_millis(10_010),
            "{waited:?}"
        );
    }
}
