//! The sync pipeline: change events from a source instance applied to a target store, idempotently, in order,
//! with nothing lost, across crashes.
//!
//! ```text
//!  source ──events──▶ mapping ──records──▶ applier ──writes──▶ RecordStore (target)
//!                                            │ one lookup + one settle (one transaction) per batch
//!                                            ▼
//!          ledger: settled ids, applied versions + tombstones, checkpoints, dead letters, id map,
//!                  own writes, deferred tasks, running totals
//! ```
//!
//! * A **source** delivers [`ChangeEvent`]s: one change to one record, with its source version (monotonic per
//!   record), its origin (who made it) and a correlation id. Delivery is at least once and in no particular order.
//! * The consumer's [`Mapping`] turns an event into the target's [`Record`](crate::Record): renames, value maps,
//!   defaults, and field ownership (what the sync may write and what belongs to the target's own users).
//! * The **applier** decides what to do with each event, using what the [`Ledger`] knows: skip it as a duplicate
//!   (event id already settled), as stale (older than the applied version or a delete's tombstone) or as an echo
//!   (our own write coming back), or write (or delete) it, ensuring its lookups first so that missing references
//!   become placeholders, and resolving addresses through the ledger's id map. Failures that persist end in the
//!   ledger as [`DeadLetter`]s, replayable after a fix. A batch's outcomes, its checkpoint and its counters are
//!   settled in one transaction: a crash leaves all of a batch or none of it.
//! * Deferred business logic is durable: [`TaskQueue`] puts it in the ledger, a [`TaskRunner`] runs it once its
//!   record's guard answers [`Proceed::Now`](crate::Proceed::Now).
//! * [`SyncWorker`] is the loop a service runs: poll, apply, settle, run tasks, prune, wait, stop cleanly.
//!
//! # The pieces
//!
//! * [`ChangeEvent`]: versioned JSON; [`ChangeSource`] with [`QueueSource`] (in memory), [`JsonLinesSource`] (a
//!   file) and, with the `dataverse` feature, `DataverseChangeSource` (change tracking with delta links).
//! * [`Applier`]: [`apply`](Applier::apply) one event, [`apply_batch`](Applier::apply_batch) many,
//!   [`replay_dead_letters`](Applier::replay_dead_letters) after a fix; [`Pipeline`] polls a source into an
//!   applier, settling each poll with its checkpoint; [`SyncWorker`] runs it for good.
//! * [`Ledger`] with [`MemoryLedger`], `SqliteLedger` (feature `sqlite`) and `PostgresLedger` (feature
//!   `postgres`), and their conformance scenarios (feature `conformance`: `ledger_conformance`).
//! * [`TaskQueue`], [`TaskHandlers`], [`TaskRunner`]: durable deferred work.
//! * [`Mapping`]: per-consumer renames, value maps, defaults and field ownership.
//! * [`SyncCounters`] / [`SyncStats`].
//!
//! The crate's `tests/simulation.rs` plays seeded fault schedules against all of it, `tests/kill9.rs` kills a worker
//! process with SIGKILL again and again; `examples/bidirectional.rs` shows a two-way sync without loops.
//!
//! # Accounting
//!
//! Every received event ends as exactly one of applied, duplicate, stale, echo or dead-lettered; a successful
//! replay of a dead letter settles its event again and counts as replayed. Counters are settled with their batch,
//! so `applied + duplicate + stale + echo + dead_lettered == received + replayed` ([`SyncStats::is_accounted`])
//! holds for every applier and for the ledger's [`totals`](Ledger::totals) over every run.

mod applier;
#[cfg(feature = "dataverse")]
mod dataverse_source;
mod event;
mod ledger;
mod mapping;
mod source;
mod stats;
mod tasks;
mod worker;

#[cfg(feature = "conformance")]
pub mod ledger_conformance;

pub use applier::{Applier, ApplierBuilder, Disposition, ReplayReport};
#[cfg(feature = "dataverse")]
pub use dataverse_source::DataverseChangeSource;
pub use event::{ChangeEvent, ChangeKind, SCHEMA_VERSION};
pub use ledger::{
    AppliedVersion, Checkpoint, DeadLetter, IdMapping, Ledger, LedgerQuery, LedgerSnapshot,
    LedgerView, MAX_VERSION, MemoryLedger, OwnWrite, Pruned, Retention, SettledEvent, Settlement,
    SourceRecord,
};
#[cfg(feature = "postgres")]
pub use ledger::{PostgresLedger, PostgresLedgerBuilder};
#[cfg(feature = "sqlite")]
pub use ledger::{SqliteDurability, SqliteLedger};
pub use mapping::{Mapping, TableMapping, UnknownValue, ValueMap};
pub use source::{ChangeBatch, ChangeSource, JsonLinesSource, Pipeline, QueueSource};
pub use stats::{Counter, SyncCounters, SyncStats};
pub use tasks::{
    DeferredTask, TaskChange, TaskContext, TaskHandler, TaskHandlers, TaskQueue, TaskReport,
    TaskRunner, TaskSettings, TaskStatus,
};
pub use worker::{Stopped, SyncWorker, SyncWorkerBuilder, Turn, WorkerSettings, WorkerStats};

/// The wall clock in Unix milliseconds, as the ledger stamps settlements (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
