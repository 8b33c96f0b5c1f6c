//! Durable deferred work: business logic that a guard deferred until its record is hydrated
//! ([`Proceed::Deferred`](crate::Proceed::Deferred)), kept in the [`Ledger`](crate::sync::Ledger) as a named
//! handler with a JSON payload, so a restart runs what was pending.
//!
//! A task's life: enqueued *pending* (by [`TaskChange::Enqueue`], in the same settlement as the write that made it
//! necessary, or on its own); claimed by a worker when due; run once its record's guard answers
//! [`Proceed::Now`](crate::Proceed::Now); then *done*, or retried with backoff, or *failed* for good (visible, with
//! its error, like a dead letter). Its id is the idempotency key: enqueuing the same id twice runs it once, and the
//! handler receives it so that its own effect can be made idempotent too.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::guard::{Guarded, Proceed};
use crate::hydration::HydrationPolicy;
use crate::key::EntityRef;
use crate::name::TableName;
use crate::record::StoredRecord;
use crate::store::RecordStore;
use crate::sync::ledger::{Ledger, Settlement};
use crate::sync::now_ms;

/// Where a deferred task stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting for its record to be hydrated, or for its next attempt.
    Pending,
    /// Ran successfully.
    Done,
    /// Gave up (a handler error that persisted, an unknown handler, a payload that no longer reads).
    Failed,
}

impl TaskStatus {
    /// The status as stored (`pending`, `done`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Done => "done",
            TaskStatus::Failed => "failed",
        }
    }

    /// The status stored as `text`, if it is one.
    pub fn parse(text: &str) -> Option<TaskStatus> {
        match text {
            "pending" => Some(TaskStatus::Pending),
            "done" => Some(TaskStatus::Done),
            "failed" => Some(TaskStatus::Failed),
            _ => None,
        }
    }
}

/// Business logic to run once a record is hydrated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeferredTask {
    /// The idempotency key: one task per id, ever (within the ledger's retention of finished tasks).
    pub id: String,
    /// The name of the handler that runs it, registered at start-up.
    pub handler: String,
    /// The record it waits for, at the target.
    pub record: EntityRef,
    /// The handler's input.
    pub payload: serde_json::Value,
    /// Where it stands.
    pub status: TaskStatus,
    /// Runs attempted so far (checks that found the record still a placeholder are not attempts).
    pub attempts: u32,
    /// Not handed to a worker before this time, Unix milliseconds (a backoff, or a claim's lease).
    pub due_ms: u64,
    /// The last failure, as text.
    pub last_error: Option<String>,
    /// When it was enqueued, Unix milliseconds.
    pub created_ms: u64,
    /// When its status last changed, Unix milliseconds.
    pub updated_ms: u64,
}

impl DeferredTask {
    /// A pending task `id` for `handler`, waiting for `record`, with `payload`, enqueued at `now_ms`.
    pub fn new(
        id: impl Into<String>,
        handler: impl Into<String>,
        record: EntityRef,
        payload: serde_json::Value,
        now_ms: u64,
    ) -> Self {
        Self {
            id: id.into(),
            handler: handler.into(),
            record,
            payload,
            status: TaskStatus::Pending,
            attempts: 0,
            due_ms: now_ms,
            last_error: None,
            created_ms: now_ms,
            updated_ms: now_ms,
        }
    }
}

/// A change to the deferred tasks, part of a [`Settlement`](crate::sync::Settlement).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TaskChange {
    /// Adds a task; nothing happens if a task with its id exists (whatever its status).
    Enqueue(DeferredTask),
    /// The record became hydrated: its pending tasks are due now (rather than at their next re-check).
    Release(EntityRef),
    /// The task's record was still a placeholder: check again at `due_ms` (not an attempt).
    Wait {
        /// The task id.
        id: String,
        /// When to check again.
        due_ms: u64,
    },
    /// The task ran successfully.
    Done {
        /// The task id.
        id: String,
    },
    /// The task failed: counts an attempt; pending again at `retry_at_ms`, or failed for good when `None`.
    Failed {
        /// The task id.
        id: String,
        /// The error, as text.
        error: String,
        /// When to try again; `None` gives up.
        retry_at_ms: Option<u64>,
    },
}

/// What a task handler receives: the task (its id is the idempotency key) and its record as the target holds it
/// now, hydrated.
#[derive(Clone, Debug)]
pub struct TaskContext {
    /// The task, with its attempts so far.
    pub task: DeferredTask,
    /// The record, read just before the handler runs.
    pub record: StoredRecord,
}

impl TaskContext {
    /// The idempotency key: pass it to whatever the handler calls, so that a task run again after a crash (between
    /// its effect and its settlement) has its effect once.
    pub fn idempotency_key(&self) -> &str {
        &self.task.id
    }

    /// The payload as `T`; [`Error::InvalidTask`] (permanent) when it no longer reads as one.
    pub fn payload<T: DeserializeOwned>(&self) -> Result<T> {
        T::deserialize(&self.task.payload).map_err(|err| Error::InvalidTask {
            task: self.task.id.clone(),
            reason: format!(
                "handler '{}': the payload does not read: {err}",
                self.task.handler
            ),
        })
    }
}

/// Business logic run for a deferred task once its record is hydrated. Closures
/// `Fn(TaskContext) -> impl Future<Output = Result<()>>` are handlers.
///
/// A handler runs at least once per task: a crash after its effect and before its settlement runs it again, so
/// make the effect idempotent with [`TaskContext::idempotency_key`]. An error that is
/// [retryable](Error::is_retryable) is retried with backoff; any other error fails the task for good (visible in
/// the ledger with its reason).
#[async_trait]
pub trait TaskHandler: Send + Sync {
    /// Runs the task.
    async fn run(&self, context: TaskContext) -> Result<()>;
}

#[async_trait]
impl<F, Fut> TaskHandler for F
where
    F: Fn(TaskContext) -> Fut + Send + Sync,
    Fut: Future<Output = Result<()>> + Send,
{
    async fn run(&self, context: TaskContext) -> Result<()> {
        self(context).await
    }
}

/// The task handlers, registered by name at start-up.
#[derive(Clone, Default)]
pub struct TaskHandlers {
    handlers: HashMap<String, Arc<dyn TaskHandler>>,
}

impl fmt::Debug for TaskHandlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.handlers.keys().collect();
        names.sort();
        f.debug_struct("TaskHandlers")
            .field("names", &names)
            .finish()
    }
}

impl TaskHandlers {
    /// No handlers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` under `name` (the guarded operation's name, as in
    /// [`TablePolicy::on_placeholder`](crate::TablePolicyBuilder::on_placeholder)), replacing any earlier one.
    pub fn register(
        mut self,
        name: impl Into<String>,
        handler: impl TaskHandler + 'static,
    ) -> Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    fn get(&self, name: &str) -> Option<&Arc<dyn TaskHandler>> {
        self.handlers.get(name)
    }

    fn names(&self) -> String {
        let mut names: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        names.sort_unstable();
        names.join(", ")
    }
}

/// Enqueues durable deferred work in the ledger: what business logic does when a guard answers
/// [`Proceed::Deferred`](crate::Proceed::Deferred). A [`TaskRunner`] (inside a
/// [`SyncWorker`](crate::sync::SyncWorker)) runs it once the record is hydrated, also after a restart.
#[derive(Clone, Debug)]
pub struct TaskQueue {
    ledger: Arc<dyn Ledger>,
}

impl TaskQueue {
    /// A queue in `ledger`.
    pub fn new(ledger: Arc<dyn Ledger>) -> Self {
        Self { ledger }
    }

    /// Defers `handler` for the record `id` of `table` with `payload`, once per handler and record: the
    /// idempotency key is `handler:table:id`, so deferring the same thing again does nothing. Returns the key.
    pub async fn defer(
        &self,
        handler: &str,
        table: &TableName,
        id: Uuid,
        payload: impl Serialize,
    ) -> Result<String> {
        let key = format!("{handler}:{table}:{id}");
        self.defer_with_key(key, handler, table, id, payload).await
    }

    /// [`defer`](Self::defer) with an idempotency key of the caller's (say an order number, for one task per
    /// order rather than per record).
    pub async fn defer_with_key(
        &self,
        key: impl Into<String>,
        handler: &str,
        table: &TableName,
        id: Uuid,
        payload: impl Serialize,
    ) -> Result<String> {
        let key = key.into();
        let payload = serde_json::to_value(payload).map_err(|err| Error::InvalidTask {
            task: key.clone(),
            reason: format!("handler '{handler}': the payload does not serialize: {err}"),
        })?;
        let record = EntityRef::by_id(table.clone(), id)?;
        let now = now_ms();
        let mut settlement = Settlement::at(now);
        settlement.tasks.push(TaskChange::Enqueue(DeferredTask::new(
            key.clone(),
            handler,
            record,
            payload,
            now,
        )));
        self.ledger.settle(&settlement).await?;
        Ok(key)
    }
}

/// How a [`TaskRunner`] paces tasks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskSettings {
    /// Tasks claimed per run (default 100).
    pub batch: usize,
    /// How long a claimed task is not handed to another worker (default 5 minutes): longer than a handler runs.
    pub lease: Duration,
    /// How soon a task whose record is still a placeholder is checked again (default 30 s); a hydrating write
    /// releases it at once.
    pub recheck: Duration,
    /// Runs before a task fails for good (default 5).
    pub max_attempts: u32,
    /// Backoff after the first failed run, doubled after each (default 1 s, at most 5 minutes).
    pub backoff: Duration,
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            batch: 100,
            lease: Duration::from_secs(300),
            recheck: Duration::from_secs(30),
            max_attempts: 5,
            backoff: Duration::from_secs(1),
        }
    }
}

/// What one [`TaskRunner::run_due`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReport {
    /// Tasks claimed.
    pub claimed: u64,
    /// Ran successfully.
    pub done: u64,
    /// Their record is still a placeholder (or unreadable now): checked again later.
    pub waiting: u64,
    /// Failed and will be retried.
    pub retried: u64,
    /// Failed for good.
    pub failed: u64,
}

impl std::ops::AddAssign for TaskReport {
    fn add_assign(&mut self, other: TaskReport) {
        self.claimed += other.claimed;
        self.done += other.done;
        self.waiting += other.waiting;
        self.retried += other.retried;
        self.failed += other.failed;
    }
}

/// Runs due deferred tasks: claims them from the ledger, runs each whose record's guard answers
/// [`Proceed::Now`](crate::Proceed::Now) (the policy decides, as everywhere), and settles what became of them.
#[derive(Clone, Debug)]
pub struct TaskRunner {
    ledger: Arc<dyn Ledger>,
    store: Arc<dyn RecordStore>,
    policy: Arc<dyn HydrationPolicy>,
    handlers: TaskHandlers,
    settings: TaskSettings,
}

impl TaskRunner {
    /// A runner over `ledger`, reading records from `store` and deciding hydration with `policy`.
    pub fn new(
        ledger: Arc<dyn Ledger>,
        store: Arc<dyn RecordStore>,
        policy: Arc<dyn HydrationPolicy>,
        handlers: TaskHandlers,
    ) -> Self {
        Self {
            ledger,
            store,
            policy,
            handlers,
            settings: TaskSettings::default(),
        }
    }

    /// Replaces the pacing settings.
    pub fn with_settings(mut self, settings: TaskSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Claims the due tasks, runs those whose record is hydrated, and settles the outcome in one transaction.
    /// `Err` only when the ledger failed: tasks claimed then are handed out again when their lease ends.
    pub async fn run_due(&self) -> Result<TaskReport> {
        let now = now_ms();
        let tasks = self
            .ledger
            .claim_tasks(now, self.settings.lease, self.settings.batch)
            .await?;
        let mut report = TaskReport {
            claimed: tasks.len() as u64,
            ..TaskReport::default()
        };
        if tasks.is_empty() {
            return Ok(report);
        }
        let mut settlement = Settlement::at(now);
        for task in tasks {
            let span =
                tracing::info_span!("deferred_task", task = %task.id, handler = %task.handler);
            let change = self.run_one(task, &mut report).instrument(span).await;
            settlement.tasks.push(change);
        }
        settlement.at_ms = now_ms();
        self.ledger.settle(&settlement).await?;
        Ok(report)
    }

    async fn run_one(&self, task: DeferredTask, report: &mut TaskReport) -> TaskChange {
        let now = now_ms();
        let later = |wait: Duration| now.saturating_add(wait.as_millis() as u64);
        let id = task.id.clone();
        let fail = |report: &mut TaskReport, error: Error| {
            tracing::warn!(error = %error, "deferred task failed for good");
            report.failed += 1;
            TaskChange::Failed {
                id: id.clone(),
                error: error.to_string(),
                retry_at_ms: None,
            }
        };
        let Some(handler) = self.handlers.get(&task.handler).cloned() else {
            let reason = format!(
                "no handler is registered under this name (registered: {})",
                self.handlers.names()
            );
            return fail(report, self.invalid(&task, reason));
        };
        let record = match self.store.read(&task.record).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                let reason = format!("its record {} no longer exists", task.record);
                return fail(report, self.invalid(&task, reason));
            }
            Err(e) if e.is_retryable() => {
                report.waiting += 1;
                return TaskChange::Wait {
                    id,
                    due_ms: later(self.settings.recheck),
                };
            }
            Err(e) => return fail(report, e),
        };
        // Deferred or rejected on a placeholder alike: the task was deferred to run on the hydrated record.
        if !matches!(
            Guarded::new(&record.record, &*self.policy).check(&task.handler),
            Ok(Proceed::Now)
        ) {
            report.waiting += 1;
            return TaskChange::Wait {
                id,
                due_ms: later(self.settings.recheck),
            };
        }
        let attempt = task.attempts.saturating_add(1);
        match handler.run(TaskContext { task, record }).await {
            Ok(()) => {
                report.done += 1;
                tracing::info!("deferred task done");
                TaskChange::Done { id }
            }
            Err(e) if e.is_retryable() && attempt < self.settings.max_attempts => {
                let factor = 2u32.saturating_pow(attempt - 1);
                let wait = self
                    .settings
                    .backoff
                    .saturating_mul(factor)
                    .min(Duration::from_secs(300))
                    .max(e.retry_after().unwrap_or_default());
                tracing::info!(error = %e, attempt, "deferred task failed; retrying");
                report.retried += 1;
                TaskChange::Failed {
                    id,
                    error: e.to_string(),
                    retry_at_ms: Some(later(wait)),
                }
            }
            Err(e) => fail(report, e),
        }
    }

    fn invalid(&self, task: &DeferredTask, reason: String) -> Error {
        Error::InvalidTask {
            task: task.id.clone(),
            reason: format!("handler '{}': {reason}", task.handler),
        }
    }
}
