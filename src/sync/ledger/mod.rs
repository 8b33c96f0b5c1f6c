//! The sync pipeline's durable state behind the [`Ledger`] trait: what a batch reads in one call
//! ([`LedgerQuery`] → [`LedgerView`]) and what it settles in one transaction ([`Settlement`]).
//!
//! Three implementations pass one conformance suite (`ledger_conformance`, feature `conformance`):
//! [`MemoryLedger`] (tests, simulations), `SqliteLedger` (feature `sqlite`: one embedded file, the default for a
//! single worker) and `PostgresLedger` (feature `postgres`: shared by several workers).

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::key::EntityRef;
use crate::sync::event::ChangeEvent;
use crate::sync::stats::SyncStats;
use crate::sync::tasks::{DeferredTask, TaskChange};

pub use memory::{LedgerSnapshot, MemoryLedger};
#[cfg(feature = "postgres")]
pub use postgres::{PostgresLedger, PostgresLedgerBuilder};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteDurability, SqliteLedger};

/// The highest source version a ledger keeps (SQL ledgers store versions as signed 64-bit integers); the applier
/// dead-letters an event with a higher one.
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// A record at a source instance: the source's name and the record's table and key there.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceRecord {
    /// The source instance, as in [`ChangeEvent::source`].
    pub source: String,
    /// The record's table and key at that source.
    pub reference: EntityRef,
}

impl SourceRecord {
    /// The record `reference` at `source`.
    pub fn new(source: impl Into<String>, reference: EntityRef) -> Self {
        Self {
            source: source.into(),
            reference,
        }
    }
}

/// An event the pipeline gave up on, with why and when. Replaying it after a fix re-applies `event`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The event, as received.
    pub event: ChangeEvent,
    /// The last failure, as text.
    pub error: String,
    /// Whether the last failure was transient (retries exhausted) rather than permanent (a bad payload): a
    /// transient one may succeed on replay without any fix.
    pub retryable: bool,
    /// Attempts made so far, over every time the event failed.
    pub attempts: u32,
    /// The event's correlation id, for finding its traces.
    pub correlation_id: Uuid,
    /// When the event first failed, Unix milliseconds.
    pub first_failed_ms: u64,
    /// When it last failed, Unix milliseconds.
    pub last_failed_ms: u64,
}

impl DeadLetter {
    /// A dead letter for `event`, which failed with `error` after `attempts` attempts at `now_ms`.
    pub fn new(event: ChangeEvent, error: &Error, attempts: u32, now_ms: u64) -> Self {
        Self {
            correlation_id: event.correlation_id,
            event,
            error: error.to_string(),
            // Retries that ran out still mean a transient cause: a replay may succeed without any fix.
            retryable: match error {
                Error::RetriesExhausted { source, .. } => source.is_retryable(),
                other => other.is_retryable(),
            },
            attempts,
            first_failed_ms: now_ms,
            last_failed_ms: now_ms,
        }
    }

    /// Merges a newer failure of the same event into this letter: the first failure time stays, attempts add up,
    /// the rest is taken from `newer`.
    pub fn merge(&mut self, newer: DeadLetter) {
        let first_failed_ms = self.first_failed_ms.min(newer.first_failed_ms);
        let attempts = self.attempts.saturating_add(newer.attempts);
        *self = DeadLetter {
            first_failed_ms,
            attempts,
            ..newer
        };
    }
}

/// The integration's own write of a record at a row version, on the instance that appears to the other direction
/// of a two-way sync as change source `instance`. When that change comes back from that source, it is an echo.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OwnWrite {
    /// The instance, named as the change source that reads it.
    pub instance: String,
    /// The record, addressed by id.
    pub record: EntityRef,
    /// The row version the write produced.
    pub version: u64,
}

/// The newest version of a record the ledger knows as applied, and whether that version deleted it (a tombstone:
/// an older update arriving late must not bring the record back).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedVersion {
    /// The source version.
    pub version: u64,
    /// Whether the change at that version was a delete.
    pub deleted: bool,
}

/// One event as settled: its id (remembered for the dedupe window), its record, and the version it applied, if
/// it applied one. The record's applied version becomes the newer of the old and this one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettledEvent {
    /// The event id.
    pub event_id: String,
    /// The record at its source.
    pub record: SourceRecord,
    /// `Some` when the event's version reached the target (written, deleted, or found there already).
    pub applied: Option<AppliedVersion>,
}

/// A source record known under a target address: the external-id map, and the one home of "these references name
/// the same record". Several source addresses (a GUID, an alternate key) may name one target record.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdMapping {
    /// The record at its source, as events (or the line-of-business app) address it.
    pub source: SourceRecord,
    /// Where it lives at the target, by id.
    pub target: EntityRef,
}

/// Where a source was read up to, saved in the same transaction as the batch read from it, so it never runs ahead
/// of what was applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The source's name ([`ChangeSource::name`](crate::sync::ChangeSource::name)).
    pub source: String,
    /// Where the next read starts (an opaque token such as a delta link).
    pub token: String,
}

/// What a batch needs to know before it writes, asked in one [`Ledger::lookup`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerQuery {
    /// Which of these event ids were already settled (within the dedupe window)?
    pub event_ids: Vec<String>,
    /// The applied version of these records.
    pub records: Vec<SourceRecord>,
    /// Where these source records live at the target (the id map).
    pub targets: Vec<SourceRecord>,
    /// Which of these writes are the integration's own (not expired)?
    pub own_writes: Vec<OwnWrite>,
}

/// The answer to a [`LedgerQuery`]: only what the ledger knows; everything asked for and absent is unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerView {
    /// The event ids asked for that were settled.
    pub processed: HashSet<String>,
    /// Applied versions of the records asked for.
    pub applied: HashMap<SourceRecord, AppliedVersion>,
    /// Target addresses of the source records asked for.
    pub targets: HashMap<SourceRecord, EntityRef>,
    /// The own writes asked for that the ledger holds.
    pub own_writes: HashSet<OwnWrite>,
}

/// Everything one batch changes in the ledger, applied by [`Ledger::settle`] in one transaction: all of it or none.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Settlement {
    /// When the batch settled, Unix milliseconds: the age of its event ids and own writes.
    pub at_ms: u64,
    /// Events settled: remembered as processed; their applied versions raise the records' versions.
    pub events: Vec<SettledEvent>,
    /// Id-map entries added (or re-pointed).
    pub id_map: Vec<IdMapping>,
    /// Own writes to recognise as echoes later.
    pub own_writes: Vec<OwnWrite>,
    /// Dead letters added; one for an event that already has a letter merges into it ([`DeadLetter::merge`]).
    pub dead_letters: Vec<DeadLetter>,
    /// Event ids whose dead letters are resolved (replayed) and removed.
    pub resolved: Vec<String>,
    /// Deferred tasks enqueued, released, finished or failed.
    pub tasks: Vec<TaskChange>,
    /// The source position this batch was read up to.
    pub checkpoint: Option<Checkpoint>,
    /// Counters to add to the ledger's running totals ([`Ledger::totals`]): statistics that survive restarts
    /// and add up over every worker and every run.
    pub stats: SyncStats,
}

impl Settlement {
    /// An empty settlement at `at_ms`.
    pub fn at(at_ms: u64) -> Self {
        Self {
            at_ms,
            ..Self::default()
        }
    }

    /// Whether settling it would change nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.id_map.is_empty()
            && self.own_writes.is_empty()
            && self.dead_letters.is_empty()
            && self.resolved.is_empty()
            && self.tasks.is_empty()
            && self.checkpoint.is_none()
            && self.stats == SyncStats::default()
    }
}

/// How long the ledger keeps what only guards against near-term repeats, so that it stays the same size however
/// long it runs. Versions per record are kept for good: they make older duplicates harmless once their event ids
/// have been pruned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// How long settled event ids are remembered (default 7 days). A redelivery older than this is still
    /// recognised by its record's version.
    pub dedupe_window: Duration,
    /// How long own-write stamps are kept (default 1 day): an echo comes back within one change-tracking poll.
    pub own_writes: Duration,
    /// How long finished deferred tasks are kept (default 7 days), so that enqueuing the same idempotency key
    /// again within that time does not run the task twice.
    pub finished_tasks: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: Duration = Duration::from_secs(24 * 60 * 60);
        Self {
            dedupe_window: 7 * DAY,
            own_writes: DAY,
            finished_tasks: 7 * DAY,
        }
    }
}

/// What a [`Ledger::prune`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Event ids older than the dedupe window.
    pub event_ids: u64,
    /// Expired own-write stamps.
    pub own_writes: u64,
    /// Finished (done) tasks past their retention.
    pub tasks: u64,
}

/// The sync pipeline's durable state: which events are settled, the version applied per record (with
/// tombstones), where each source was read up to, the dead letters, the id map, own-write stamps, deferred tasks
/// and running totals. One async, object-safe interface (`Arc<dyn Ledger>`).
///
/// # Contract
///
/// `ledger_conformance` (feature `conformance`) checks it.
///
/// * [`settle`](Self::settle) applies a whole [`Settlement`] in one transaction, or nothing of it; what it wrote is
///   visible to every later call, from any process sharing the ledger.
/// * Settled event ids are remembered at least for the [dedupe window](Retention::dedupe_window); applied
///   versions per record only go up, and a tombstone stays until a newer version replaces it.
/// * Checkpoints are per source; saving one replaces the previous one.
/// * Dead letters are keyed by event id and merge ([`DeadLetter::merge`]).
/// * The id map is many-to-one: each source address maps to one target; adding an entry for a source address
///   re-points it.
/// * Deferred tasks are keyed by their id (the idempotency key): enqueuing an id that exists changes nothing.
/// * Failures of the ledger's own storage are errors whose [`Error::is_retryable`] says whether trying again may
///   help; a failed `settle` changed nothing.
#[async_trait]
pub trait Ledger: Send + Sync + Debug {
    /// What the batch asks for, in one read.
    async fn lookup(&self, query: &LedgerQuery) -> Result<LedgerView>;

    /// Applies everything in `settlement` in one transaction.
    async fn settle(&self, settlement: &Settlement) -> Result<()>;

    /// Where `source` was last read up to, `None` if never saved.
    async fn checkpoint(&self, source: &str) -> Result<Option<String>>;

    /// Oldest first (by `first_failed_ms`, then event id), at most `limit`.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>>;

    /// How many dead letters there are.
    async fn dead_letter_count(&self) -> Result<usize>;

    /// Deferred tasks that are pending and due at `now_ms` (oldest due first, at most `limit`), claimed: none of
    /// them is handed out again before `now_ms + lease` unless a settlement changes it.
    async fn claim_tasks(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<DeferredTask>>;

    /// Every deferred task in the ledger (pending, done or failed), for operators and tests; at most `limit`,
    /// oldest first.
    async fn tasks(&self, limit: usize) -> Result<Vec<DeferredTask>>;

    /// The running totals of every settlement's [`Settlement::stats`].
    async fn totals(&self) -> Result<SyncStats>;

    /// Removes what `retention` no longer keeps, as of `now_ms`.
    async fn prune(&self, retention: &Retention, now_ms: u64) -> Result<Pruned>;
}

macro_rules! forward_ledger {
    ($($ptr:ty),*) => {$(
        #[async_trait]
        impl<L: Ledger + ?Sized> Ledger for $ptr {
            async fn lookup(&self, query: &LedgerQuery) -> Result<LedgerView> {
                (**self).lookup(query).await
            }
            async fn settle(&self, settlement: &Settlement) -> Result<()> {
                (**self).settle(settlement).await
            }
            async fn checkpoint(&self, source: &str) -> Result<Option<String>> {
                (**self).checkpoint(source).await
            }
            async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
                (**self).dead_letters(limit).await
            }
            async fn dead_letter_count(&self) -> Result<usize> {
                (**self).dead_letter_count().await
            }
            async fn claim_tasks(&self, now_ms: u64, lease: Duration, limit: usize) -> Result<Vec<DeferredTask>> {
                (**self).claim_tasks(now_ms, lease, limit).await
            }
            async fn tasks(&self, limit: usize) -> Result<Vec<DeferredTask>> {
                (**self).tasks(limit).await
            }
            async fn totals(&self) -> Result<SyncStats> {
                (**self).totals().await
            }
            async fn prune(&self, retention: &Retention, now_ms: u64) -> Result<Pruned> {
                (**self).prune(retention, now_ms).await
            }
        }
    )*};
}

forward_ledger!(Arc<L>, Box<L>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;

    fn assert_ledger<L: Ledger + 'static>() {}
    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn trait_objects_and_pointers_are_ledgers() {
        assert_ledger::<Arc<dyn Ledger>>();
        assert_ledger::<Box<dyn Ledger>>();
        assert_ledger::<Arc<MemoryLedger>>();
    }

    #[allow(dead_code)]
    fn futures_are_send(ledger: Arc<dyn Ledger>, settlement: Settlement) {
        // Compile-time only: workers spawn these on multi-threaded runtimes.
        assert_send(&ledger.lookup(&LedgerQuery::default()));
        assert_send(&ledger.settle(&settlement));
    }

    fn letter(first: u64, attempts: u32) -> DeadLetter {
        let account = EntityRef::by_key("account", [("accountnumber", "A-1")]).unwrap();
        let event = ChangeEvent::upsert("us", &Record::new(account), 1).with_event_id("e-1");
        let error = Error::Unavailable {
            backend: "eu".into(),
            reason: "down".into(),
            retry_after: None,
        };
        DeadLetter::new(event, &error, attempts, first)
    }

    #[test]
    fn dead_letters_record_the_error_and_the_event() {
        let letter = letter(10, 3);
        assert_eq!(letter.correlation_id, letter.event.correlation_id);
        assert!(letter.retryable);
        assert_eq!(letter.error, "eu is unavailable: down");
        assert_eq!((letter.first_failed_ms, letter.last_failed_ms), (10, 10));
    }

    #[test]
    fn merging_keeps_the_first_failure_and_adds_attempts() {
        let mut old = letter(10, 3);
        let mut newer = letter(20, 2);
        newer.error = "later".into();
        old.merge(newer);
        assert_eq!(
            (old.first_failed_ms, old.last_failed_ms, old.attempts),
            (10, 20, 5)
        );
        assert_eq!(old.error, "later");
    }

    #[test]
    fn an_empty_settlement_is_empty() {
        assert!(Settlement::at(5).is_empty());
        let mut s = Settlement::at(5);
        s.stats.received = 1;
        assert!(!s.is_empty());
    }
}
