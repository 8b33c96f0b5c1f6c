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
//! # What exists now
//!
//! The data and state the pipeline is built on: the event model ([`ChangeEvent`], versioned JSON), the
//! [`Ledger`] trait with [`MemoryLedger`] and its conformance scenarios (feature `conformance`:
//! [`ledger_conformance`]), the declarative [`Mapping`], and the counters. The applier, change sources (an
//! in-memory queue, Dataverse change tracking), the fault-injection simulation and the examples come next and
//! build on these APIs.
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

#[cfg(feature = "conformance")]
pub mod ledger_conformance;

pub use applier::{Applier, ApplierBuilder, Disposition, ReplayReport};
#[cfg(feature = "dataverse")]
pub use dataverse_source::DataverseChangeSource;
pub use event::{ChangeEvent, ChangeKind, SCHEMA_VERSION};
pub use ledger::{DeadLetter, Ledger, LedgerSnapshot, MemoryLedger, SourceRecord};
pub use mapping::{Mapping, TableMapping, UnknownValue, ValueMap};
pub use source::{ChangeBatch, ChangeSource, Pipeline, QueueSource};
pub use stats::{Counter, SyncCounters, SyncStats};
