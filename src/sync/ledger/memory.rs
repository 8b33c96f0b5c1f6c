//! [`MemoryLedger`]: the [`Ledger`] in plain maps, for tests, simulations and single-process runs that may lose
//! their state.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use foldhash::HashMap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::key::EntityRef;
use crate::sync::ledger::{
    AppliedVersion, DeadLetter, Ledger, LedgerQuery, LedgerView, OwnWrite, Pruned, Retention,
    Settlement, SourceRecord,
};
use crate::sync::stats::SyncStats;
use crate::sync::tasks::{DeferredTask, TaskChange, TaskStatus};

/// A [`MemoryLedger`]'s whole state, sorted, so equal states serialize identically. For tests, debugging, and
/// carrying a ledger across a simulated restart.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LedgerSnapshot {
    /// Settled event ids and when they settled, sorted by id.
    pub processed: Vec<(String, u64)>,
    /// The applied version per record, sorted by record.
    pub applied_versions: Vec<(SourceRecord, AppliedVersion)>,
    /// Checkpoint per source.
    pub checkpoints: BTreeMap<String, String>,
    /// Dead letters, oldest first (the order of [`Ledger::dead_letters`]).
    pub dead_letters: Vec<DeadLetter>,
    /// The id map, source to target, sorted by source record.
    pub id_map: Vec<(SourceRecord, EntityRef)>,
    /// The integration's own writes and when they were made, sorted.
    pub own_writes: Vec<(OwnWrite, u64)>,
    /// Deferred tasks, sorted by id.
    pub tasks: Vec<DeferredTask>,
    /// Running totals.
    pub totals: SyncStats,
}

#[derive(Debug, Default)]
struct State {
    processed: HashMap<String, u64>,
    versions: HashMap<SourceRecord, AppliedVersion>,
    checkpoints: HashMap<String, String>,
    dead_letters: HashMap<String, DeadLetter>,
    targets: HashMap<SourceRecord, EntityRef>,
    own_writes: HashMap<OwnWrite, u64>,
    tasks: BTreeMap<String, DeferredTask>,
    totals: SyncStats,
    fail_next: u32,
}

impl State {
    fn sorted_dead_letters(&self) -> Vec<&DeadLetter> {
        let mut letters: Vec<&DeadLetter> = self.dead_letters.values().collect();
        letters.sort_by(|a, b| {
            (a.first_failed_ms, &a.event.event_id).cmp(&(b.first_failed_ms, &b.event.event_id))
        });
        letters
    }

    fn settle(&mut self, s: &Settlement) {
        for event in &s.events {
            self.processed.insert(event.event_id.clone(), s.at_ms);
            if let Some(applied) = event.applied {
                let slot = self.versions.entry(event.record.clone()).or_insert(applied);
                if applied.version > slot.version {
                    *slot = applied;
                }
            }
        }
        for mapping in &s.id_map {
            self.targets
                .insert(mapping.source.clone(), mapping.target.clone());
        }
        for own in &s.own_writes {
            self.own_writes.insert(own.clone(), s.at_ms);
        }
        for letter in &s.dead_letters {
            match self.dead_letters.get_mut(&letter.event.event_id) {
                Some(old) => old.merge(letter.clone()),
                None => {
                    self.dead_letters
                        .insert(letter.event.event_id.clone(), letter.clone());
                }
            }
        }
        for event_id in &s.resolved {
            self.dead_letters.remove(event_id);
        }
        for change in &s.tasks {
            apply_task_change(&mut self.tasks, change, s.at_ms);
        }
        if let Some(checkpoint) = &s.checkpoint {
            self.checkpoints
                .insert(checkpoint.source.clone(), checkpoint.token.clone());
        }
        self.totals += s.stats;
    }
}

/// Applies one task change to tasks keyed by id: the rules every ledger follows (see [`TaskChange`]).
fn apply_task_change(tasks: &mut BTreeMap<String, DeferredTask>, change: &TaskChange, now_ms: u64) {
    match change {
        TaskChange::Enqueue(task) => {
            tasks.entry(task.id.clone()).or_insert_with(|| task.clone());
        }
        TaskChange::Release(record) => {
            for task in tasks.values_mut() {
                if task.status == TaskStatus::Pending && task.record == *record {
                    task.due_ms = task.due_ms.min(now_ms);
                }
            }
        }
        TaskChange::Wait { id, due_ms } => {
            if let Some(task) = tasks.get_mut(id) {
                task.due_ms = *due_ms;
            }
        }
        TaskChange::Done { id } => {
            if let Some(task) = tasks.get_mut(id) {
                task.status = TaskStatus::Done;
                task.attempts = task.attempts.saturating_add(1);
                task.last_error = None;
                task.updated_ms = now_ms;
            }
        }
        TaskChange::Failed {
            id,
            error,
            retry_at_ms,
        } => {
            if let Some(task) = tasks.get_mut(id) {
                task.attempts = task.attempts.saturating_add(1);
                task.last_error = Some(error.clone());
                task.updated_ms = now_ms;
                match retry_at_ms {
                    Some(at) => task.due_ms = *at,
                    None => task.status = TaskStatus::Failed,
                }
            }
        }
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

    /// A ledger holding `snapshot`'s state.
    pub fn from_snapshot(snapshot: LedgerSnapshot) -> Self {
        let state = State {
            processed: snapshot.processed.into_iter().collect(),
            versions: snapshot.applied_versions.into_iter().collect(),
            checkpoints: snapshot.checkpoints.into_iter().collect(),
            dead_letters: snapshot
                .dead_letters
                .into_iter()
                .map(|letter| (letter.event.event_id.clone(), letter))
                .collect(),
            targets: snapshot.id_map.into_iter().collect(),
            own_writes: snapshot.own_writes.into_iter().collect(),
            tasks: snapshot
                .tasks
                .into_iter()
                .map(|task| (task.id.clone(), task))
                .collect(),
            totals: snapshot.totals,
            fail_next: 0,
        };
        Self {
            state: Mutex::new(state),
        }
    }

    /// The whole state (pending injected failures aside), sorted.
    pub fn snapshot(&self) -> LedgerSnapshot {
        fn sorted<K: Clone + Ord, V: Clone>(map: &HashMap<K, V>) -> Vec<(K, V)> {
            let mut entries: Vec<(K, V)> =
                map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            entries
        }
        let state = self.lock();
        LedgerSnapshot {
            processed: sorted(&state.processed),
            applied_versions: sorted(&state.versions),
            checkpoints: state
                .checkpoints
                .iter()
                .map(|(source, checkpoint)| (source.clone(), checkpoint.clone()))
                .collect(),
            dead_letters: state.sorted_dead_letters().into_iter().cloned().collect(),
            id_map: sorted(&state.targets),
            own_writes: sorted(&state.own_writes),
            tasks: state.tasks.values().cloned().collect(),
            totals: state.totals,
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
    async fn lookup(&self, query: &LedgerQuery) -> Result<LedgerView> {
        let state = self.call()?;
        let mut view = LedgerView::default();
        for id in &query.event_ids {
            if state.processed.contains_key(id) {
                view.processed.insert(id.clone());
            }
        }
        for record in &query.records {
            if let Some(applied) = state.versions.get(record) {
                view.applied.insert(record.clone(), *applied);
            }
        }
        for source in &query.targets {
            if let Some(target) = state.targets.get(source) {
                view.targets.insert(source.clone(), target.clone());
            }
        }
        for own in &query.own_writes {
            if state.own_writes.contains_key(own) {
                view.own_writes.insert(own.clone());
            }
        }
        Ok(view)
    }

    async fn settle(&self, settlement: &Settlement) -> Result<()> {
        self.call()?.settle(settlement);
        Ok(())
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>> {
        Ok(self.call()?.checkpoints.get(source).cloned())
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

    async fn claim_tasks(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<DeferredTask>> {
        let mut state = self.call()?;
        let mut due: Vec<&mut DeferredTask> = state
            .tasks
            .values_mut()
            .filter(|t| t.status == TaskStatus::Pending && t.due_ms <= now_ms)
            .collect();
        due.sort_by(|a, b| (a.due_ms, a.created_ms, &a.id).cmp(&(b.due_ms, b.created_ms, &b.id)));
        let until = now_ms.saturating_add(lease.as_millis() as u64);
        Ok(due
            .into_iter()
            .take(limit)
            .map(|task| {
                let claimed = task.clone();
                task.due_ms = until;
                claimed
            })
            .collect())
    }

    async fn tasks(&self, limit: usize) -> Result<Vec<DeferredTask>> {
        let state = self.call()?;
        let mut tasks: Vec<&DeferredTask> = state.tasks.values().collect();
        tasks.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(tasks.into_iter().take(limit).cloned().collect())
    }

    async fn totals(&self) -> Result<SyncStats> {
        Ok(self.call()?.totals)
    }

    async fn prune(&self, retention: &Retention, now_ms: u64) -> Result<Pruned> {
        let mut state = self.call()?;
        let before = |keep: Duration| now_ms.saturating_sub(keep.as_millis() as u64);
        let mut pruned = Pruned::default();
        let cutoff = before(retention.dedupe_window);
        let count = state.processed.len();
        state.processed.retain(|_, at| *at >= cutoff);
        pruned.event_ids = (count - state.processed.len()) as u64;
        let cutoff = before(retention.own_writes);
        let count = state.own_writes.len();
        state.own_writes.retain(|_, at| *at >= cutoff);
        pruned.own_writes = (count - state.own_writes.len()) as u64;
        let cutoff = before(retention.finished_tasks);
        let count = state.tasks.len();
        state
            .tasks
            .retain(|_, t| t.status != TaskStatus::Done || t.updated_ms >= cutoff);
        pruned.tasks = (count - state.tasks.len()) as u64;
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::ledger::{Checkpoint, SettledEvent};

    fn account(number: &str) -> EntityRef {
        EntityRef::by_key("account", [("accountnumber", number)]).unwrap()
    }

    fn settlement(event_id: &str, record: &SourceRecord, version: u64) -> Settlement {
        let mut s = Settlement::at(100);
        s.events.push(SettledEvent {
            event_id: event_id.into(),
            record: record.clone(),
            applied: Some(AppliedVersion {
                version,
                deleted: false,
            }),
        });
        s
    }

    #[tokio::test]
    async fn injected_failures_are_retryable_and_change_nothing() {
        let ledger = MemoryLedger::new();
        let record = SourceRecord::new("us", account("A-1"));
        ledger.fail_next(2);
        let err = ledger
            .settle(&settlement("e-1", &record, 3))
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(ledger.lookup(&LedgerQuery::default()).await.is_err());
        assert_eq!(ledger.snapshot(), LedgerSnapshot::default());
        ledger.settle(&settlement("e-1", &record, 3)).await.unwrap();
        ledger.fail_next(5);
        ledger.fail_next(0);
        assert_eq!(ledger.snapshot().processed, [("e-1".to_owned(), 100)]);
    }

    #[tokio::test]
    async fn snapshots_round_trip_through_json() {
        let ledger = MemoryLedger::new();
        let us = SourceRecord::new("us", account("A-1"));
        let mut s = settlement("e-1", &us, 4);
        s.checkpoint = Some(Checkpoint {
            source: "us".into(),
            token: "delta-7".into(),
        });
        s.stats.received = 1;
        s.stats.applied = 1;
        ledger.settle(&s).await.unwrap();
        let snapshot = ledger.snapshot();
        let json = serde_json::to_string(&snapshot).unwrap();
        let restored = MemoryLedger::from_snapshot(serde_json::from_str(&json).unwrap());
        assert_eq!(restored.snapshot(), snapshot);
        assert_eq!(
            restored.checkpoint("us").await.unwrap().as_deref(),
            Some("delta-7")
        );
        assert_eq!(restored.totals().await.unwrap().applied, 1);
    }
}
