//! [`RetryPolicy`]: exponential backoff with jitter that honours the store's `Retry-After`, bounded by attempts and
//! by total time.
//!
//! The backoff sequence comes from [`backon`] (seedable jitter, a maintained crate). What backon leaves to us, and
//! this module adds: waiting the *longer* of the backoff and the store's `Retry-After` ([`Error::retry_after`]),
//! a bound on the total elapsed time (attempts and waits included, not only the backoff delays), retrying only
//! [retryable](Error::is_retryable) errors, and a terminal [`Error::RetriesExhausted`] carrying the attempt count
//! and elapsed time. Time is Tokio's clock, so tests pause and advance it; a fixed [`RetryPolicy::jitter_seed`]
//! makes the waits reproducible.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::{Error, Result};

/// How to retry transient failures. Plain data with documented defaults; check custom values with
/// [`validate`](Self::validate).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (default 5). `1` disables retrying.
    pub max_attempts: u32,
    /// Wait before the first retry (default 200 ms).
    pub initial_backoff: Duration,
    /// Longest backoff between two attempts (default 30 s). A longer `Retry-After` is still honoured.
    pub max_backoff: Duration,
    /// Growth factor of the backoff (default 2.0, at least 1.0).
    pub factor: f32,
    /// Randomise each wait within (0, backoff] on top of the backoff, so that many clients throttled together do
    /// not retry in lockstep (default true).
    pub jitter: bool,
    /// Seed for the jitter; `None` draws one at random. Set it in tests for reproducible waits.
    pub jitter_seed: Option<u64>,
    /// Give up when the next wait would end more than this long after the first attempt (default 2 min).
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            factor: 2.0,
            jitter: true,
            jitter_seed: None,
            max_elapsed: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// A policy that makes one attempt and never retries.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Checks the values: at least one attempt, a finite factor of at least 1, initial backoff ≤ max backoff.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: &str| {
            Err(Error::InvalidConfig {
                reason: format!("retry policy: {reason}"),
            })
        };
        if self.max_attempts == 0 {
            return invalid("max_attempts must be at least 1");
        }
        if !self.factor.is_finite() || self.factor < 1.0 {
            return invalid("factor must be a finite number of at least 1.0");
        }
        if self.initial_backoff > self.max_backoff {
            return invalid("initial_backoff must not exceed max_backoff");
        }
        Ok(())
    }

    fn backoff(&self) -> ExponentialBuilder {
        let builder = ExponentialBuilder::new()
            .with_min_delay(self.initial_backoff)
            .with_max_delay(self.max_backoff)
            .with_factor(self.factor)
            .with_max_times(self.max_attempts.saturating_sub(1) as usize);
        match (self.jitter, self.jitter_seed) {
            (false, _) => builder,
            (true, None) => builder.with_jitter(),
            (true, Some(seed)) => builder.with_jitter().with_jitter_seed(seed),
        }
    }

    /// The backoff waits this policy would use if every attempt failed with no `Retry-After` (for logs and tests).
    pub fn backoff_waits(&self) -> Vec<Duration> {
        self.backoff().build().collect()
    }

    /// Runs `operation` until it succeeds, fails with a non-retryable error (returned as is), or the policy gives
    /// up ([`Error::RetriesExhausted`] wrapping the last error). Each retry is logged with the attempt, the error
    /// and the wait, and whether the wait came from the store's `Retry-After`.
    pub async fn run<T, F, Fut>(&self, operation: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.run_if(Error::is_retryable, operation).await
    }

    /// Like [`run`](Self::run), but retries only the retryable errors `retry` accepts: an HTTP client uses it to
    /// resend a request that may already have been applied only when the request is idempotent.
    pub async fn run_if<T, F, Fut>(
        &self,
        retry: impl Fn(&Error) -> bool,
        mut operation: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.validate()?;
        let started = Instant::now();
        let attempts = AtomicU32::new(0);
        let result = (|| {
            attempts.fetch_add(1, Ordering::Relaxed);
            operation()
        })
        .retry(self.backoff())
        .sleep(tokio::time::sleep)
        .when(|err| err.is_retryable() && retry(err))
        .adjust(|err, backoff| {
            // `None` from the backoff means the attempts are used up. A `Retry-After` can be anything up to
            // `u64::MAX` seconds: the sum saturates instead of overflowing, and a wait that would end past the
            // total budget gives up (never retrying before the store said to).
            let wait = backoff?.max(err.retry_after().unwrap_or_default());
            (started.elapsed().saturating_add(wait) <= self.max_elapsed).then_some(wait)
        })
        .notify(|err, wait| {
            tracing::info!(
                attempt = attempts.load(Ordering::Relaxed),
                wait_ms = wait.as_millis() as u64,
                from_retry_after = err.retry_after().is_some_and(|r| r >= wait),
                error = %err,
                "retrying after a transient failure"
            );
        })
        .await;
        result.map_err(|err| {
            // Wrapped only when a retry happened: a policy that never retries returns the error as it is.
            if err.is_retryable() && retry(&err) && attempts.load(Ordering::Relaxed) > 1 {
                Error::RetriesExhausted {
                    attempts: attempts.load(Ordering::Relaxed),
                    elapsed: started.elapsed(),
                    source: Box::new(err),
                }
            } else {
                err
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn unavailable() -> Error {
        Error::Unavailable {
            backend: "test".into(),
            reason: "down".into(),
            retry_after: None,
        }
    }

    fn throttled(secs: u64) -> Error {
        Error::Throttled {
            backend: "test".into(),
            retry_after: Some(Duration::from_secs(secs)),
        }
    }

    fn steady() -> RetryPolicy {
        RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        }
    }

    /// Runs `policy` over scripted results; returns the outcome and when (since start) each attempt began.
    async fn script(
        policy: &RetryPolicy,
        results: Vec<Result<u32>>,
    ) -> (Result<u32>, Vec<Duration>) {
        let started = Instant::now();
        let calls = Mutex::new((results.into_iter(), Vec::new()));
        let outcome = policy
            .run(|| {
                let mut calls = calls.lock().unwrap();
                calls.1.push(started.elapsed());
                let next = calls.0.next().unwrap_or(Ok(0));
                async move { next }
            })
            .await;
        let times = calls.into_inner().unwrap().1;
        (outcome, times)
    }

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|&v| Duration::from_millis(v)).collect()
    }

    /// Tokio's timer may end a sleep up to a millisecond late; allow that per wait.
    #[track_caller]
    fn assert_times(actual: &[Duration], expected_ms: &[u64]) {
        let expected = ms(expected_ms);
        let close = actual.len() == expected.len()
            && actual
                .iter()
                .zip(&expected)
                .enumerate()
                .all(|(i, (a, e))| *a >= *e && *a <= *e + ms(&[i as u64 + 1])[0]);
        assert!(close, "attempt times {actual:?}, expected {expected:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_with_exponential_backoff() {
        let (outcome, times) = script(
            &steady(),
            vec![Err(unavailable()), Err(unavailable()), Ok(7)],
        )
        .await;
        assert_eq!(outcome.unwrap(), 7);
        assert_times(&times, &[0, 200, 600]);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_wins_when_it_is_longer_than_the_backoff() {
        let (outcome, times) = script(&steady(), vec![Err(throttled(5)), Ok(1)]).await;
        assert_eq!(outcome.unwrap(), 1);
        assert_times(&times, &[0, 5000]);
        let short = Error::Throttled {
            backend: "t".into(),
            retry_after: Some(Duration::from_millis(50)),
        };
        let (_, times) = script(&steady(), vec![Err(short), Ok(1)]).await;
        assert_times(&times, &[0, 200]); // the backoff wins when it is longer
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_returned_at_once() {
        let missing = Error::UnknownTable {
            table: crate::TableName::new("nope").unwrap(),
        };
        let (outcome, times) = script(&steady(), vec![Err(missing)]).await;
        assert!(matches!(outcome, Err(Error::UnknownTable { .. })));
        assert_eq!(times.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded_and_the_give_up_says_so() {
        let policy = RetryPolicy {
            max_attempts: 3,
            ..steady()
        };
        let (outcome, times) = script(&policy, (0..5).map(|_| Err(unavailable())).collect()).await;
        assert_times(&times, &[0, 200, 600]);
        match outcome {
            Err(
                err @ Error::RetriesExhausted {
                    attempts: 3,
                    elapsed,
                    ..
                },
            ) => {
                assert_times(&[elapsed], &[600]);
                assert!(
                    !err.is_retryable(),
                    "a spent retry budget is final for this call"
                );
            }
            other => panic!("expected RetriesExhausted, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn total_time_is_bounded_including_retry_after() {
        let policy = RetryPolicy {
            max_elapsed: Duration::from_secs(30),
            ..steady()
        };
        let (outcome, times) =
            script(&policy, vec![Err(throttled(10)), Err(throttled(60)), Ok(1)]).await;
        // A 60 s Retry-After would end past the 30 s budget: no third attempt.
        assert_times(&times, &[0, 10_000]);
        assert!(matches!(
            outcome,
            Err(Error::RetriesExhausted { attempts: 2, .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_near_u64_max_gives_up_instead_of_overflowing() {
        // A slow first attempt (the elapsed time is not zero), then a Retry-After no clock can represent.
        let attempts = AtomicU32::new(0);
        let started = Instant::now();
        let outcome: Result<()> = steady()
            .run(|| {
                attempts.fetch_add(1, Ordering::Relaxed);
                async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Err(Error::Throttled {
                        backend: "test".into(),
                        retry_after: Some(Duration::from_secs(u64::MAX)),
                    })
                }
            })
            .await;
        assert_eq!(
            attempts.load(Ordering::Relaxed),
            1,
            "no retry can fit the budget"
        );
        assert!(
            matches!(outcome, Err(Error::Throttled { .. })),
            "the throttling is reported as it is: {outcome:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "no wait was started"
        );
        // The same with the largest Duration there is, on a first attempt that took no time.
        let outcome = script(
            &steady(),
            vec![Err(Error::Unavailable {
                backend: "test".into(),
                reason: "down".into(),
                retry_after: Some(Duration::MAX),
            })],
        )
        .await;
        assert_eq!(outcome.1.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn seeded_jitter_is_reproducible() {
        let seeded = |seed| RetryPolicy {
            jitter_seed: Some(seed),
            ..RetryPolicy::default()
        };
        let failures = || (0..4).map(|_| Err(unavailable())).collect::<Vec<_>>();
        let (_, first) = script(&seeded(42), failures()).await;
        let (_, again) = script(&seeded(42), failures()).await;
        let (_, other) = script(&seeded(7), failures()).await;
        assert_eq!(first, again);
        assert_ne!(first, other);
        assert_eq!(seeded(42).backoff_waits(), seeded(42).backoff_waits());
        for (wait, base) in seeded(42)
            .backoff_waits()
            .iter()
            .zip(steady().backoff_waits())
        {
            assert!(
                *wait >= base && *wait <= base * 2,
                "jitter adds at most one backoff: {wait:?} vs {base:?}"
            );
        }
    }

    #[test]
    fn bad_values_are_rejected() {
        for policy in [
            RetryPolicy {
                max_attempts: 0,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                factor: 0.5,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                factor: f32::NAN,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                initial_backoff: Duration::from_secs(60),
                ..RetryPolicy::default()
            },
        ] {
            assert!(
                matches!(policy.validate(), Err(Error::InvalidConfig { .. })),
                "{policy:?}"
            );
        }
        assert!(RetryPolicy::default().validate().is_ok());
        assert_eq!(RetryPolicy::never().backoff_waits(), Vec::<Duration>::new());
    }
}
