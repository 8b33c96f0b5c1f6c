//! The sync pipeline: change events from a source instance applied to a target store, idempotently, in order,
//! with nothing lost.
//!
//! ```text
//!  source ──events──▶ mapping ──records──▶ applier ──writes──▶ RecordStore (target)
//!                                            │
//!                                            └──▶ ledger: processed ids, applied versions, checkpoints,
//!                                                         dead letters, external-id map
//! ```
//!
//! * A **source** delivers [`ChangeEvent`]s: one change to one record, with its source version (monotonic per
//!   record), its origin (who made it) and a correlation id. Delivery is at least once and in no particular order.
//! * The consumer's [`Mapping`] turns an event into the target's [`Record`](crate::Record): renames, value maps,
//!   defaults, and field ownership (what the sync may write and what belongs to the target's own users).
//! * The **applier** decides what to do with each event, using the [`Ledger`]: skip it as a duplicate (event id
//!   already processed), as stale (an older version than the one applied) or as an echo (our own write coming
//!   back), or write it, ensuring its lookups first so that missing references become placeholders. Failures
//!   that persist end in the ledger as [`DeadLetter`]s, replayable after a fix.
//! * [`SyncCounters`] count every outcome, and the [`SyncStats`] they produce add up: every event received
//!   settles exactly once (see [Accounting](#accounting) below).
//!
//! # The pieces
//!
//! * [`ChangeEvent`]: versioned JSON; [`ChangeSource`] with [`QueueSource`] (in memory) and, with the `dataverse`
//!   feature, `DataverseChangeSource` (change tracking with delta links).
//! * [`Applier`]: [`apply`](Applier::apply) one event, [`apply_batch`](Applier::apply_batch) many,
//!   [`replay_dead_letters`](Applier::replay_dead_letters) after a fix; [`Pipeline`] polls a source into an
//!   applier and checkpoints in the ledger.
//! * [`Ledger`] with [`MemoryLedger`] and its conformance scenarios (feature `conformance`: `ledger_conformance`).
//! * [`Mapping`]: per-consumer renames, value maps, defaults and field ownership.
//! * [`SyncCounters`] / [`SyncStats`].
//!
//! The crate's `tests/simulation.rs` plays seeded fault schedules against all of it; `examples/bidirectional.rs`
//! shows a two-way sync without loops.
//!
//! # Accounting
//!
//! Every received event ends as exactly one of applied, duplicate, stale, echo or dead-lettered; a successful
//! replay of a dead letter settles its event again and counts as replayed. Once a run has drained,
//! `applied + duplicate + stale + echo + dead_lettered == received + replayed` ([`SyncStats::is_accounted`];
//! [`SyncStats`] explains why).

mod applier;
#[cfg(feature = "dataverse")]
mod dataverse_source;
mod event;
mod ledger;
mod mapping;
mod source;
mod stats;
mod tasks;

#[cfg(feature = "conformance")]
pub mod ledger_conformance;

pub use applier::{Applier, ApplierBuilder, Disposition, ReplayReport};
#[cfg(feature = "dataverse")]
pub use dataverse_source::DataverseChangeSource;
pub use event::{ChangeEvent, ChangeKind, SCHEMA_VERSION};
pub use ledger::{
    AppliedVersion, Checkpoint, DeadLetter, IdMapping, Ledger, LedgerQuery, LedgerSnapshot,
    LedgerView, MemoryLedger, OwnWrite, Pruned, Retention, SettledEvent, Settlement, SourceRecord,
};
pub use mapping::{Mapping, TableMapping, UnknownValue, ValueMap};
pub use source::{ChangeBatch, ChangeSource, Pipeline, QueueSource};
pub use stats::{Counter, SyncCounters, SyncStats};
pub use tasks::{DeferredTask, TaskChange, TaskStatus};

#[cfg(feature = "sqlite")]
pub use ledger::SqliteLedger;
#[cfg(feature = "postgres")]
pub use ledger::{PostgresLedger, PostgresLedgerBuilder};
