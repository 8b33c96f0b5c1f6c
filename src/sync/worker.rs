//! [`SyncWorker`]: the long-running loop a sync service runs: poll a change source, apply and settle in batches,
//! run due deferred tasks, replay dead letters on request, prune the ledger, sleep with jitter when idle, and stop
//! cleanly on a shutdown signal.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::Result;
use crate::sync::ledger::{Pruned, Retention};
use crate::sync::stats::SyncStats;
use crate::sync::tasks::{TaskReport, TaskRunner};
use crate::sync::{Applier, ChangeSource, Pipeline};

/// How a [`SyncWorker`] paces itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WorkerSettings {
    /// Events per poll, applied and settled as one batch (default 500).
    pub batch_size: usize,
    /// The first wait after a poll that found nothing (default 1 s); doubled while idle, up to `max_idle_wait`,
    /// with ±25 % jitter so that workers started together do not poll together.
    pub idle_wait: Duration,
    /// The longest idle wait (default 30 s).
    pub max_idle_wait: Duration,
    /// The wait after a transient failure of the source, the target or the ledger (default 1 s), doubled while
    /// failures go on, up to `max_idle_wait`.
    pub error_wait: Duration,
    /// How often the ledger is pruned (default every 10 minutes).
    pub prune_every: Duration,
    /// What pruning keeps.
    pub retention: Retention,
    /// After a shutdown signal, how long the in-flight batch may take to finish before it is abandoned
    /// (default 30 s). Abandoning is safe: a batch settles in one transaction, so it is either all settled or
    /// not at all, and an unsettled batch is read again by the next run.
    pub shutdown_grace: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            idle_wait: Duration::from_secs(1),
            max_idle_wait: Duration::from_secs(30),
            error_wait: Duration::from_secs(1),
            prune_every: Duration::from_secs(600),
            retention: Retention::default(),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// What a [`SyncWorker`] has done since it was built; readable while it runs ([`SyncWorker::stats`]). Durable
/// totals over every run and every worker are the ledger's ([`Ledger::totals`](crate::sync::Ledger::totals)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// The applier's counters (settled batches only).
    pub sync: SyncStats,
    /// Deferred tasks.
    pub tasks: TaskReport,
    /// Polls of the source.
    pub polls: u64,
    /// Polls that found nothing.
    pub idle_polls: u64,
    /// Dead-letter replays run on request.
    pub replays: u64,
    /// Failed steps (source, target or ledger), each retried after a wait.
    pub errors: u64,
    /// The last failure, as text.
    pub last_error: Option<String>,
    /// Ledger entries pruned.
    pub pruned: u64,
}

/// Why [`SyncWorker::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown signal came; the in-flight batch finished.
    Shutdown,
    /// The shutdown signal came and the in-flight batch did not finish within the grace period: it was abandoned
    /// unsettled, to be read again by the next run.
    Abandoned,
}

/// The long-running sync loop. Build it from a change source and an [`Applier`] (whose ledger holds the
/// checkpoint, the dead letters and the deferred tasks), optionally with a [`TaskRunner`]; then
/// [`run`](Self::run) it until a shutdown signal.
///
/// Each turn of the loop: replay dead letters if [requested](Self::request_replay); poll up to `batch_size`
/// events and apply them as one batch, settled in one ledger transaction with the checkpoint; run due deferred
/// tasks; prune the ledger when due; when the source had nothing new, wait (jittered, growing while idle) or until
/// [woken](Self::wake). A transient failure anywhere is logged, counted and retried after a growing wait; the
/// applier waits while its circuit breaker is open. A permanent failure (a checkpoint the source rejects, a
/// ledger from a newer version) ends `run` with the error.
///
/// `SyncWorker` is cheap to clone (one shared state): keep a clone to read [`stats`](Self::stats) or request a
/// replay while `run` goes on elsewhere.
#[derive(Clone, Debug)]
pub struct SyncWorker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pipeline: Pipeline,
    tasks: Option<TaskRunner>,
    settings: WorkerSettings,
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct State {
    stats: WorkerStats,
    replay: Option<usize>,
}

/// What one turn of the loop found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Turn {
    /// Events polled (and settled).
    pub events: usize,
    /// Deferred tasks claimed.
    pub tasks: u64,
}

/// Builds a [`SyncWorker`].
#[derive(Debug)]
pub struct SyncWorkerBuilder {
    pipeline: Pipeline,
    tasks: Option<TaskRunner>,
    settings: WorkerSettings,
}

impl SyncWorkerBuilder {
    /// Runs due deferred tasks with `runner` on every turn.
    pub fn tasks(mut self, runner: TaskRunner) -> Self {
        self.tasks = Some(runner);
        self
    }

    /// The pacing settings (default [`WorkerSettings::default`]).
    pub fn settings(mut self, settings: WorkerSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The worker.
    pub fn build(self) -> SyncWorker {
        SyncWorker {
            inner: Arc::new(Inner {
                pipeline: self.pipeline,
                tasks: self.tasks,
                settings: self.settings,
                state: Mutex::new(State::default()),
                wake: Notify::new(),
            }),
        }
    }
}

impl SyncWorker {
    /// Starts building a worker that applies `source`'s events through `applier`, in batches.
    pub fn builder(source: Arc<dyn ChangeSource>, applier: Applier) -> SyncWorkerBuilder {
        SyncWorkerBuilder {
            pipeline: Pipeline::new(source, applier).batched(true),
            tasks: None,
            settings: WorkerSettings::default(),
        }
    }

    /// The applier.
    pub fn applier(&self) -> &Applier {
        self.inner.pipeline.applier()
    }

    /// What the worker has done so far.
    pub fn stats(&self) -> WorkerStats {
        let mut stats = self.lock().stats.clone();
        stats.sync = self.applier().stats();
        stats
    }

    /// Asks the running loop to replay up to `limit` dead letters before its next poll (after a fix: a mapping
    /// corrected, a target back), and wakes it.
    pub fn request_replay(&self, limit: usize) {
        self.lock().replay = Some(limit);
        self.wake();
    }

    /// Ends an idle wait now (say a webhook announced new changes).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain counters: consistent even if a panic poisoned the lock.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// One turn of the loop without waiting: a requested replay, one poll applied and settled, due tasks. `Err`
    /// when a step failed (nothing half-settled: the batch is read again next time).
    pub async fn run_once(&self) -> Result<Turn> {
        let replay = self.lock().replay.take();
        if let Some(limit) = replay {
            let report = self.applier().replay_dead_letters(limit).await?;
            tracing::info!(
                replayed = report.replayed,
                failed = report.failed.len(),
                "dead letters replayed"
            );
            self.lock().stats.replays += 1;
        }
        let events = self
            .inner
            .pipeline
            .run_once(self.inner.settings.batch_size.max(1))
            .await?;
        {
            let mut state = self.lock();
            state.stats.polls += 1;
            if events == 0 {
                state.stats.idle_polls += 1;
            }
        }
        let mut turn = Turn { events, tasks: 0 };
        if let Some(runner) = &self.inner.tasks {
            let report = runner.run_due().await?;
            turn.tasks = report.claimed;
            self.lock().stats.tasks += report;
        }
        Ok(turn)
    }

    /// Runs the loop until `shutdown` completes (for example `tokio::signal::ctrl_c()`, or a SIGTERM listener).
    /// The in-flight batch gets [`shutdown_grace`](WorkerSettings::shutdown_grace) to finish; it is never
    /// half-settled. `Err` on a permanent failure.
    pub async fn run(&self, shutdown: impl Future<Output = ()> + Send) -> Result<Stopped> {
        let settings = self.inner.settings;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut idle = settings.idle_wait;
        let mut failing = settings.error_wait;
        let mut last_prune = Instant::now();
        loop {
            let turn = self.run_once();
            let mut turn = std::pin::pin!(turn);
            let result = tokio::select! {
                result = &mut turn => result,
                () = &mut shutdown => {
                    tracing::info!("shutdown requested: finishing the in-flight batch");
                    return match tokio::time::timeout(settings.shutdown_grace, turn).await {
                        Ok(Ok(_)) => Ok(Stopped::Shutdown),
                        Ok(Err(e)) => {
                            self.record_error(&e);
                            Ok(Stopped::Shutdown)
                        }
                        Err(_) => {
                            tracing::warn!("the in-flight batch did not finish in time: abandoned, unsettled");
                            Ok(Stopped::Abandoned)
                        }
                    };
                }
            };
            let wait = match result {
                Ok(turn) if turn.events > 0 => {
                    idle = settings.idle_wait;
                    failing = settings.error_wait;
                    None
                }
                Ok(_) => {
                    failing = settings.error_wait;
                    let wait = jitter(idle);
                    idle = (idle * 2).min(settings.max_idle_wait);
                    Some(wait)
                }
                Err(e) if e.is_retryable() => {
                    self.record_error(&e);
                    let wait = jitter(failing.max(e.retry_after().unwrap_or_default()));
                    failing = (failing * 2).min(settings.max_idle_wait);
                    Some(wait)
                }
                Err(e) => {
                    self.record_error(&e);
                    tracing::error!(error = %e, "permanent failure: the worker stops");
                    return Err(e);
                }
            };
            if last_prune.elapsed() >= settings.prune_every {
                last_prune = Instant::now();
                self.prune().await;
            }
            if let Some(wait) = wait {
                tokio::select! {
                    () = &mut shutdown => return Ok(Stopped::Shutdown),
                    () = tokio::time::sleep(wait) => {}
                    () = self.inner.wake.notified() => {}
                }
            }
        }
    }

    async fn prune(&self) {
        let ledger = self.applier().ledger();
        let now = crate::sync::now_ms();
        match ledger.prune(&self.inner.settings.retention, now).await {
            Ok(Pruned {
                event_ids,
                own_writes,
                tasks,
            }) => {
                let pruned = event_ids + own_writes + tasks;
                tracing::debug!(event_ids, own_writes, tasks, "ledger pruned");
                self.lock().stats.pruned += pruned;
            }
            Err(e) => self.record_error(&e),
        }
    }

    fn record_error(&self, error: &crate::Error) {
        tracing::warn!(error = %error, retryable = error.is_retryable(), "worker step failed");
        let mut state = self.lock();
        state.stats.errors += 1;
        state.stats.last_error = Some(error.to_string());
    }
}

/// `wait` ± 25 %. Hand-written: the spread only has to differ between processes, and a v4 UUID is random enough
/// without another dependency.
fn jitter(wait: Duration) -> Duration {
    let unit = (uuid::Uuid::new_v4().as_u128() % 1_000) as f64 / 1_000.0; // [0, 1)
    wait.mul_f64(0.75 + unit * 0.5)
}
