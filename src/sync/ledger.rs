//! The pipeline's durable state behind the [`Ledger`] trait, and [`MemoryLedger`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::key::EntityRef;
use crate::sync::event::ChangeEvent;

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
}

/// The sync pipeline's durable state: which events are done, the version applied per record, where each source
/// was read up to, the dead letters, and the external-id map. One async, object-safe interface
/// (`Arc<dyn Ledger>`), storage-agnostic: [`MemoryLedger`] keeps it in memory (tests, simulation, single-process
/// runs); durable implementations (SQL, files) implement the same trait.
///
/// # Contract
///
/// [`ledger_conformance`](crate::sync::ledger_conformance) checks it.
///
/// * Every call either takes full effect or none, and its effect is visible to every later call.
/// * Processed event ids are remembered for good; applied versions per record only go up.
/// * Checkpoints are per source; saving one replaces the previous one.
/// * Dead letters are keyed by event id (see [`add_dead_letter`](Self::add_dead_letter) for the merge).
/// * The external-id map is one-to-one: a source record maps to at most one target and a target to at most one
///   source record.
/// * Failures of the ledger's own storage are errors whose [`Error::is_retryable`] says whether trying again may
///   help.
#[async_trait]
pub trait Ledger: Send + Sync + Debug {
    /// Whether [`record_processed`](Self::record_processed) was called for this event id.
    async fn is_processed(&self, event_id: &str) -> Result<bool>;

    /// The highest source version written for the record, `None` if none was.
    async fn applied_version(&self, record: &SourceRecord) -> Result<Option<u64>>;

    /// Marks an event done (applied or skipped). `applied` = `Some(version)` when it was written: the record's
    /// applied version becomes `max(old, version)`. Idempotent.
    async fn record_processed(
        &self,
        event_id: &str,
        record: &SourceRecord,
        applied: Option<u64>,
    ) -> Result<()>;

    /// Where `source` was last read up to (an opaque token such as a delta link), `None` if never saved.
    async fn checkpoint(&self, source: &str) -> Result<Option<String>>;

    /// Saves where `source` has been read up to, replacing the previous checkpoint.
    async fn save_checkpoint(&self, source: &str, checkpoint: &str) -> Result<()>;

    /// Adds a dead letter; if one exists for the same event id, keeps its `first_failed_ms`, adds the attempts,
    /// and takes the rest from the new one.
    async fn add_dead_letter(&self, letter: DeadLetter) -> Result<()>;

    /// Oldest first (by `first_failed_ms`, then event id), at most `limit`.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>>;

    /// How many dead letters there are.
    async fn dead_letter_count(&self) -> Result<usize>;

    /// Removes the dead letter for `event_id`; `true` if there was one.
    async fn remove_dead_letter(&self, event_id: &str) -> Result<bool>;

    /// External-id map: where a source record lives at the target (for records with no shared GUID or
    /// alternate key).
    async fn target_of(&self, source: &SourceRecord) -> Result<Option<EntityRef>>;

    /// External-id map, reverse: which source record a target record mirrors.
    async fn source_of(&self, target: &EntityRef) -> Result<Option<SourceRecord>>;

    /// Records (or replaces) a mapping in both directions. The map stays one-to-one: replacing removes the old
    /// reverse entry, and mapping a target that another source record held takes it from that record.
    async fn map_record(&self, source: &SourceRecord, target: &EntityRef) -> Result<()>;

    /// Remembers that the integration itself wrote `record` (addressed by id) at row version `version` on the
    /// instance that appears as change source `instance`. When that change comes back from that source it is an
    /// echo (two-way sync). Keyed by version, so a later edit by someone else is never mistaken for an echo.
    async fn record_own_write(
        &self,
        instance: &str,
        record: &EntityRef,
        version: u64,
    ) -> Result<()>;

    /// Whether the change of `record` at `version`, read from source `instance`, is one of the integration's
    /// own writes ([`record_own_write`](Self::record_own_write)).
    async fn is_own_write(&self, instance: &str, record: &EntityRef, version: u64) -> Result<bool>;
}

macro_rules! forward_ledger {
    ($($ptr:ty),*) => {$(
        #[async_trait]
        impl<L: Ledger + ?Sized> Ledger for $ptr {
            async fn is_processed(&self, event_id: &str) -> Result<bool> {
                (**self).is_processed(event_id).await
            }
            async fn applied_version(&self, record: &SourceRecord) -> Result<Option<u64>> {
                (**self).applied_version(record).await
            }
            async fn record_processed(
                &self,
                event_id: &str,
                record: &SourceRecord,
                applied: Option<u64>,
            ) -> Result<()> {
                (**self).record_processed(event_id, record, applied).await
            }
            async fn checkpoint(&self, source: &str) -> Result<Option<String>> {
                (**self).checkpoint(source).await
            }
            async fn save_checkpoint(&self, source: &str, checkpoint: &str) -> Result<()> {
                (**self).save_checkpoint(source, checkpoint).await
            }
            async fn add_dead_letter(&self, letter: DeadLetter) -> Result<()> {
                (**self).add_dead_letter(letter).await
            }
            async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
                (**self).dead_letters(limit).await
            }
            async fn dead_letter_count(&self) -> Result<usize> {
                (**self).dead_letter_count().await
            }
            async fn remove_dead_letter(&self, event_id: &str) -> Result<bool> {
                (**self).remove_dead_letter(event_id).await
            }
            async fn target_of(&self, source: &SourceRecord) -> Result<Option<EntityRef>> {
                (**self).target_of(source).await
            }
            async fn source_of(&self, target: &EntityRef) -> Result<Option<SourceRecord>> {
                (**self).source_of(target).await
            }
            async fn map_record(&self, source: &SourceRecord, target: &EntityRef) -> Result<()> {
                (**self).map_record(source, target).await
            }
            async fn record_own_write(&self, instance: &str, record: &EntityRef, version: u64) -> Result<()> {
                (**self).record_own_write(instance, record, version).await
            }
            async fn is_own_write(&self, instance: &str, record: &EntityRef, version: u64) -> Result<bool> {
                (**self).is_own_write(instance, record, version).await
            }
        }
    )*};
}

forward_ledger!(Arc<L>, Box<L>);

/// A [`MemoryLedger`]'s whole state, sorted, so equal states serialize identically. For tests, debugging, and
/// carrying a ledger across a simulated restart.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LedgerSnapshot {
    /// Processed event ids.
    pub processed: BTreeSet<String>,
    /// The applied version per record, sorted by record.
    pub applied_versions: Vec<(SourceRecord, u64)>,
    /// Checkpoint per source.
    pub checkpoints: BTreeMap<String, String>,
    /// Dead letters, oldest first (the order of [`Ledger::dead_letters`]).
    pub dead_letters: Vec<DeadLetter>,
    /// The external-id map, source to target, sorted by source record.
    pub id_map: Vec<(SourceRecord, EntityRef)>,
    /// The integration's own writes: instance, record, row version; sorted.
    #[serde(default)]
    pub own_writes: Vec<(String, EntityRef, u64)>,
}

#[derive(Debug, Default)]
struct State {
    processed: HashSet<String>,
    versions: HashMap<SourceRecord, u64>,
    checkpoints: HashMap<String, String>,
    dead_letters: HashMap<String, DeadLetter>,
    targets: HashMap<SourceRecord, EntityRef>,
    sources: HashMap<EntityRef, SourceRecord>,
    own_writes: HashSet<(String, EntityRef, u64)>,
    fail_next: u32,
}

impl State {
    fn map_record(&mut self, source: &SourceRecord, target: &EntityRef) {
        if let Some(old_target) = self.targets.insert(source.clone(), target.clone()) {
            self.sources.remove(&old_target);
        }
        if let Some(old_source) = self.sources.insert(target.clone(), source.clone())
            && old_source != *source
        {
            self.targets.remove(&old_source);
        }
    }

    fn sorted_dead_letters(&self) -> Vec<&DeadLetter> {
        let mut letters: Vec<&DeadLetter> = self.dead_letters.values().collect();
        letters.sort_by(|a, b| {
            (a.first_failed_ms, &a.event.event_id).cmp(&(b.first_failed_ms, &b.event.event_id))
        });
        letters
    }
}

/// The in-memory [`Ledger`]: plain maps behind one mutex (never held across an `.await`). Its state lives as long
/// as the value, so a simulated worker crash that keeps the ledger restarts from it, as it would from a durable one.
///
/// [`fail_next`](Self::fail_next) makes it fail on demand, to test what the pipeline does when its ledger is down.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    state: Mutex<State>,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// A ledger holding `snapshot`'s state. Entries of the id map that contradict earlier ones replace them, as
    /// [`Ledger::map_record`] would.
    pub fn from_snapshot(snapshot: LedgerSnapshot) -> Self {
        let mut state = State {
            processed: snapshot.processed.into_iter().collect(),
            versions: snapshot.applied_versions.into_iter().collect(),
            checkpoints: snapshot.checkpoints.into_iter().collect(),
            dead_letters: snapshot
                .dead_letters
                .into_iter()
                .map(|letter| (letter.event.event_id.clone(), letter))
                .collect(),
            own_writes: snapshot.own_writes.into_iter().collect(),
            ..State::default()
        };
        for (source, target) in &snapshot.id_map {
            state.map_record(source, target);
        }
        Self {
            state: Mutex::new(state),
        }
    }

    /// The whole state (pending injected failures aside), sorted.
    pub fn snapshot(&self) -> LedgerSnapshot {
        let state = self.lock();
        let mut applied_versions: Vec<(SourceRecord, u64)> = state
            .versions
            .iter()
            .map(|(record, version)| (record.clone(), *version))
            .collect();
        applied_versions.sort();
        let mut id_map: Vec<(SourceRecord, EntityRef)> = state
            .targets
            .iter()
            .map(|(source, target)| (source.clone(), target.clone()))
            .collect();
        id_map.sort();
        let mut own_writes: Vec<(String, EntityRef, u64)> =
            state.own_writes.iter().cloned().collect();
        own_writes.sort();
        LedgerSnapshot {
            own_writes,
            processed: state.processed.iter().cloned().collect(),
            applied_versions,
            checkpoints: state
                .checkpoints
                .iter()
                .map(|(source, checkpoint)| (source.clone(), checkpoint.clone()))
                .collect(),
            dead_letters: state.sorted_dead_letters().into_iter().cloned().collect(),
            id_map,
        }
    }

    /// Makes the next `calls` calls fail with a retryable [`Error::Unavailable`] and change nothing (replacing any
    /// earlier count; 0 ends the failures).
    pub fn fail_next(&self, calls: u32) {
        self.lock().fail_next = calls;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No call can panic between its map updates, so the maps behind a poisoned lock are still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state for one call, or the injected failure.
    fn call(&self) -> Result<MutexGuard<'_, State>> {
        let mut state = self.lock();
        if state.fail_next > 0 {
            state.fail_next -= 1;
            return Err(Error::Unavailable {
                backend: "ledger:memory".into(),
                reason: "injected failure".into(),
                retry_after: None,
            });
        }
        Ok(state)
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn is_processed(&self, event_id: &str) -> Result<bool> {
        Ok(self.call()?.processed.contains(event_id))
    }

    async fn applied_version(&self, record: &SourceRecord) -> Result<Option<u64>> {
        Ok(self.call()?.versions.get(record).copied())
    }

    async fn record_processed(
        &self,
        event_id: &str,
        record: &SourceRecord,
        applied: Option<u64>,
    ) -> Result<()> {
        let mut state = self.call()?;
        if !state.processed.contains(event_id) {
            state.processed.insert(event_id.to_owned());
        }
        if let Some(version) = applied {
            let applied = state.versions.entry(record.clone()).or_insert(version);
            *applied = (*applied).max(version);
        }
        Ok(())
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>> {
        Ok(self.call()?.checkpoints.get(source).cloned())
    }

    async fn save_checkpoint(&self, source: &str, checkpoint: &str) -> Result<()> {
        self.call()?
            .checkpoints
            .insert(source.to_owned(), checkpoint.to_owned());
        Ok(())
    }

    async fn add_dead_letter(&self, mut letter: DeadLetter) -> Result<()> {
        let mut state = self.call()?;
        if let Some(old) = state.dead_letters.get(&letter.event.event_id) {
            letter.first_failed_ms = old.first_failed_ms;
            letter.attempts = letter.attempts.saturating_add(old.attempts);
        }
        state
            .dead_letters
            .insert(letter.event.event_id.clone(), letter);
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let state = self.call()?;
        Ok(state
            .sorted_dead_letters()
            .into_iter()
            .take(limit)
            .cloned()
            .collect())
    }

    async fn dead_letter_count(&self) -> Result<usize> {
        Ok(self.call()?.dead_letters.len())
    }

    async fn remove_dead_letter(&self, event_id: &str) -> Result<bool> {
        Ok(self.call()?.dead_letters.remove(event_id).is_some())
    }

    async fn target_of(&self, source: &SourceRecord) -> Result<Option<EntityRef>> {
        Ok(self.call()?.targets.get(source).cloned())
    }

    async fn source_of(&self, target: &EntityRef) -> Result<Option<SourceRecord>> {
        Ok(self.call()?.sources.get(target).cloned())
    }

    async fn map_record(&self, source: &SourceRecord, target: &EntityRef) -> Result<()> {
        self.call()?.map_record(source, target);
        Ok(())
    }

    async fn record_own_write(
        &self,
        instance: &str,
        record: &EntityRef,
        version: u64,
    ) -> Result<()> {
        self.call()?
            .own_writes
            .insert((instance.to_owned(), record.clone(), version));
        Ok(())
    }

    async fn is_own_write(&self, instance: &str, record: &EntityRef, version: u64) -> Result<bool> {
        // A lookup without an owned key would need one; the set is small next to a sync's traffic.
        Ok(self
            .call()?
            .own_writes
            .contains(&(instance.to_owned(), record.clone(), version)))
    }
}

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
    fn futures_are_send(ledger: Arc<dyn Ledger>) {
        // Compile-time only: the applier spawns these on multi-threaded runtimes.
        assert_send(&ledger.is_processed("e"));
        assert_send(&ledger.dead_letters(1));
    }

    fn account(number: &str) -> EntityRef {
        EntityRef::by_key("account", [("accountnumber", number)]).unwrap()
    }

    fn letter(id: &str, first: u64, attempts: u32) -> DeadLetter {
        let event = ChangeEvent::upsert("us", &Record::new(account("A-1")), 1).with_event_id(id);
        let error = Error::Unavailable {
            backend: "eu".into(),
            reason: "down".into(),
            retry_after: None,
        };
        DeadLetter::new(event, &error, attempts, first)
    }

    #[test]
    fn dead_letters_record_the_error_and_the_event() {
        let letter = letter("e-1", 10, 3);
        assert_eq!(letter.correlation_id, letter.event.correlation_id);
        assert!(letter.retryable);
        assert_eq!(letter.error, "eu is unavailable: down");
        assert_eq!((letter.first_failed_ms, letter.last_failed_ms), (10, 10));
    }

    #[tokio::test]
    async fn injected_failures_are_retryable_and_change_nothing() {
        let ledger = MemoryLedger::new();
        let record = SourceRecord::new("us", account("A-1"));
        ledger.fail_next(2);
        let err = ledger
            .record_processed("e-1", &record, Some(3))
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(ledger.map_record(&record, &account("B-1")).await.is_err());
        assert_eq!(ledger.snapshot(), LedgerSnapshot::default());
        ledger
            .record_processed("e-1", &record, Some(3))
            .await
            .unwrap();
        assert_eq!(ledger.applied_version(&record).await.unwrap(), Some(3));
        ledger.fail_next(5);
        ledger.fail_next(0);
        assert!(ledger.is_processed("e-1").await.unwrap());
    }

    #[tokio::test]
    async fn snapshots_round_trip_through_json() {
        let ledger = MemoryLedger::new();
        let us = SourceRecord::new("us", account("A-1"));
        ledger.record_processed("e-1", &us, Some(4)).await.unwrap();
        ledger.record_processed("e-0", &us, None).await.unwrap();
        ledger.save_checkpoint("us", "delta-7").await.unwrap();
        ledger.add_dead_letter(letter("e-2", 20, 1)).await.unwrap();
        ledger.add_dead_letter(letter("e-3", 10, 1)).await.unwrap();
        ledger.map_record(&us, &account("B-1")).await.unwrap();

        let snapshot = ledger.snapshot();
        assert_eq!(
            snapshot.processed.iter().collect::<Vec<_>>(),
            ["e-0", "e-1"]
        );
        let order: Vec<&str> = snapshot
            .dead_letters
            .iter()
            .map(|l| l.event.event_id.as_str())
            .collect();
        assert_eq!(order, ["e-3", "e-2"]);
        let json = serde_json::to_string(&snapshot).unwrap();
        let restored = MemoryLedger::from_snapshot(serde_json::from_str(&json).unwrap());
        assert_eq!(restored.snapshot(), snapshot);
        assert_eq!(
            restored.source_of(&account("B-1")).await.unwrap(),
            Some(us.clone())
        );
        assert_eq!(restored.applied_version(&us).await.unwrap(), Some(4));
        assert_eq!(
            restored.checkpoint("us").await.unwrap().as_deref(),
            Some("delta-7")
        );
    }
}
