//! Durable deferred work: business logic that a guard deferred until its record is hydrated
//! ([`Proceed::Deferred`](crate::Proceed::Deferred)), kept in the [`Ledger`](crate::sync::Ledger) as a named
//! handler with a JSON payload, so a restart runs what was pending.
//!
//! A task's life: enqueued *pending* (by [`TaskChange::Enqueue`], in the same settlement as the write that made it
//! necessary, or on its own); claimed by a worker when due; run once its record's guard answers
//! [`Proceed::Now`](crate::Proceed::Now); then *done*, or retried with backoff, or *failed* for good (visible, with
//! its error, like a dead letter). Its id is the idempotency key: enqueuing the same id twice runs it once, and the
//! handler receives it so that its own effect can be made idempotent too.

use serde::{Deserialize, Serialize};

use crate::key::EntityRef;

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
