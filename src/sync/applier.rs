//! [`Applier`]: writes change events into a target store, idempotently, in order, hydrating placeholders, and
//! settles every event (applied, skipped with a reason, or dead-lettered).

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashSet};

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;
use uuid::Uuid;

use crate::breaker::{BreakerConfig, CircuitBreaker};
use crate::correlation;
use crate::error::{Error, Result};
use crate::key::{EntityRef, Key};
use crate::name::{ColumnName, IntoName, TableName};
use crate::record::{HydrationState, Record};
use crate::retry::RetryPolicy;
use crate::schema::Schema;
use crate::store::{Change, Delete, DeleteOutcome, Precondition, RecordStore, Write, WriteOutcome};
use crate::sync::{
    AppliedVersion, ChangeEvent, Checkpoint, Counter, DeadLetter, IdMapping, Ledger, LedgerQuery,
    LedgerView, MAX_VERSION, Mapping, OwnWrite, SettledEvent, Settlement, SourceRecord,
    SyncCounters, SyncStats, TaskChange, now_ms,
};
use crate::writer::EnsuringWriter;

/// What became of one event.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Disposition {
    /// Written to the target.
    Applied(WriteOutcome),
    /// A delete event, applied: the record is gone from the target (or was never there).
    Deleted(DeleteOutcome),
    /// Skipped: this event (or this record at this version) was already processed.
    Duplicate,
    /// Skipped: a newer version of the record was already applied.
    Stale {
        /// The version already applied.
        applied: u64,
    },
    /// Skipped: the integration's own write coming back (two-way sync).
    Echo,
    /// Given up on: written to the dead-letter queue with this error.
    DeadLettered(Error),
}

/// What a [`replay`](Applier::replay_dead_letters) did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Letters whose event settled (and that were removed from the queue).
    pub replayed: usize,
    /// Letters that failed again and stay, with the new error.
    pub failed: Vec<(String, Error)>,
}

/// Settings of an [`Applier`], built with [`Applier::builder`].
#[derive(Debug)]
pub struct ApplierBuilder {
    writer: EnsuringWriter,
    ledger: Arc<dyn Ledger>,
    mapping: Mapping,
    identity: String,
    ignored_origins: BTreeSet<String>,
    origin_column: Option<ColumnName>,
    mapped_tables: BTreeSet<TableName>,
    retry: RetryPolicy,
    breaker: BreakerConfig,
    check_target: bool,
    target_instance: Option<String>,
    error: Option<Error>,
}

impl ApplierBuilder {
    /// Field mapping and ownership for this consumer (default: none, events pass through unchanged).
    pub fn mapping(mut self, mapping: Mapping) -> Self {
        self.mapping = mapping;
        self
    }

    /// The integration's identity (default `eventual-upsert`): stamped into the origin column of every write, and
    /// events whose origin is this identity are skipped as echoes.
    pub fn identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = identity.into();
        self
    }

    /// Also skip events made by this identity (the other direction of a two-way sync).
    pub fn ignore_origin(mut self, origin: impl Into<String>) -> Self {
        self.ignored_origins.insert(origin.into());
        self
    }

    /// The target column that records who made a write; the applier sets it to its identity, so that a change
    /// source reading the target can tell the integration's own writes (loop prevention).
    pub fn origin_column(mut self, column: impl IntoName<ColumnName>) -> Self {
        match column.into_name() {
            Ok(c) => self.origin_column = Some(c),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// Records of this (source) table share no key with the target: the applier gives each one a target GUID on
    /// first sight and keeps the pair in the ledger's external-id map, for the record and for lookups to it.
    pub fn mapped_table(mut self, table: impl IntoName<TableName>) -> Self {
        match table.into_name() {
            Ok(t) => {
                self.mapped_tables.insert(t);
            }
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// How transient store failures are retried before an event is dead-lettered.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The circuit breaker in front of the target: while it is open, events wait (they are not dead-lettered).
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// Whether to read the target record before each write and skip the event if the target already holds a
    /// newer source version (default true). This closes the window in which a worker crashed after writing but
    /// before recording the write in the ledger; it costs a read per event. The write is then conditional on the
    /// version read, so a concurrent writer cannot slip in between.
    pub fn check_target_version(mut self, check: bool) -> Self {
        self.check_target = check;
        self
    }

    /// The name under which the target appears as a change source to the other direction of a two-way sync.
    /// Every write is then remembered in the ledger with the row version it produced (an
    /// [`OwnWrite`](crate::sync::OwnWrite) in the settlement), and events are checked against the own writes of
    /// the other direction: one whose source, record and version match is skipped as an echo. Set it on both
    /// directions of a two-way sync (sharing one ledger). Unlike an origin column, this cannot mistake a later edit
    /// by someone else for an echo.
    pub fn target_instance(mut self, name: impl Into<String>) -> Self {
        self.target_instance = Some(name.into());
        self
    }

    /// Validates the settings (and the mapping against the target schema, when given).
    pub fn build(self, target_schema: Option<&Schema>) -> Result<Applier> {
        if let Some(error) = self.error {
            return Err(error);
        }
        self.retry.validate()?;
        if let Some(schema) = target_schema {
            self.mapping.validate(schema)?;
        }
        let mut ignored = self.ignored_origins;
        ignored.insert(self.identity.clone());
        Ok(Applier {
            breaker: Arc::new(CircuitBreaker::new(
                self.writer.store().backend().to_owned(),
                self.breaker,
            )),
            writer: self.writer,
            ledger: self.ledger,
            mapping: Arc::new(self.mapping),
            identity: self.identity,
            ignored_origins: Arc::new(ignored),
            origin_column: self.origin_column,
            mapped_tables: Arc::new(self.mapped_tables),
            retry: self.retry,
            check_target: self.check_target,
            target_instance: self.target_instance,
            counters: Arc::new(SyncCounters::new()),
        })
    }
}

/// Applies change events to a target through an [`EnsuringWriter`], keeping its state in a [`Ledger`].
///
/// For each event, in this order:
///
/// 1. **Echo**: an event made by this integration (or another ignored identity) is skipped.
/// 2. **Duplicate**: an event id already processed, or a record already applied at this version, is skipped.
/// 3. **Stale**: an older version than the one applied is skipped, never written.
/// 4. **Mapping**: renames, value maps, defaults and field ownership; an event that cannot be mapped is
///    dead-lettered with the reason.
/// 5. **Keys**: for [mapped tables](ApplierBuilder::mapped_table), the record and its lookups are translated
///    through the external-id map (new target GUIDs are remembered before anything is written).
/// 6. **Write**: through the writer, so the event's lookups are ensured first (a contact synced before its
///    account gets a placeholder account, hydrated when the account's event arrives; hydration hooks fire once).
///    Transient failures are retried; while the circuit is open the event waits; a failure that persists, or a
///    permanent one, dead-letters the event with its payload.
///
/// Every event settles exactly once and is counted ([`stats`](Self::stats)). The applier processes the events it
/// is given one after the other; run one applier per target (records of one source must not be applied
/// concurrently by two appliers).
#[derive(Clone, Debug)]
pub struct Applier {
    writer: EnsuringWriter,
    ledger: Arc<dyn Ledger>,
    mapping: Arc<Mapping>,
    identity: String,
    ignored_origins: Arc<BTreeSet<String>>,
    origin_column: Option<ColumnName>,
    mapped_tables: Arc<BTreeSet<TableName>>,
    retry: RetryPolicy,
    breaker: Arc<CircuitBreaker>,
    check_target: bool,
    target_instance: Option<String>,
    counters: Arc<SyncCounters>,
}

/// What the write step found.
enum Written {
    Applied(WriteOutcome),
    Deleted(DeleteOutcome),
    /// The target already holds this version or a newer one.
    TargetAhead(u64),
}

/// One event on its way through a batch: its decision so far.
enum Step {
    /// Settled without a write.
    Skip(Counter, Disposition),
    /// To be written.
    Write,
    /// Settled by the write step's result.
    Done(Result<Written>, u32),
}

impl Applier {
    /// Starts configuring an applier that writes through `writer` and keeps its state in `ledger`.
    pub fn builder(writer: EnsuringWriter, ledger: Arc<dyn Ledger>) -> ApplierBuilder {
        ApplierBuilder {
            writer,
            ledger,
            mapping: Mapping::default(),
            identity: "eventual-upsert".into(),
            ignored_origins: BTreeSet::new(),
            origin_column: None,
            mapped_tables: BTreeSet::new(),
            retry: RetryPolicy::default(),
            breaker: BreakerConfig::default(),
            check_target: true,
            target_instance: None,
            error: None,
        }
    }

    /// What this applier settled so far (the ledger's [`totals`](Ledger::totals) add up every applier and every
    /// run that shared it).
    pub fn stats(&self) -> SyncStats {
        self.counters.snapshot()
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The writer (its hooks fire on hydration).
    pub fn writer(&self) -> &EnsuringWriter {
        &self.writer
    }

    /// The circuit breaker in front of the target.
    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.breaker
    }

    /// Applies one event and settles it (a batch of one). `Err` only when the ledger itself failed (after
    /// retries): the event is then not settled, and the caller should stop and let it be redelivered.
    pub async fn apply(&self, event: ChangeEvent) -> Result<Disposition> {
        let correlation_id = event.correlation_id;
        let mut dispositions =
            correlation::scope(correlation_id, self.apply_batch_from(vec![event], None)).await?;
        dispositions
            .pop()
            .ok_or_else(|| self.internal("an event was not settled"))
    }

    /// Applies events one after the other, each settled on its own; stops at the first ledger failure.
    pub async fn apply_all(
        &self,
        events: impl IntoIterator<Item = ChangeEvent>,
    ) -> Result<Vec<Disposition>> {
        let mut out = Vec::new();
        for event in events {
            out.push(self.apply(event).await?);
        }
        Ok(out)
    }

    /// Applies a batch of events with one store batch per round (for Dataverse: placeholders and writes in
    /// `$batch` requests) and settles all of them in one ledger transaction: the throughput path of a sync.
    /// Of several events for one record in the batch only the newest is written (the others settle as stale or
    /// duplicate); retries resend only the writes that failed transiently; a batch whose every write fails
    /// transiently counts as one failure for the circuit breaker. `Err` only when the ledger failed: then nothing
    /// of the batch is settled (writes already made are harmless to repeat: the target's version check or the
    /// write's idempotency catches them when the batch is redelivered).
    pub async fn apply_batch(&self, events: Vec<ChangeEvent>) -> Result<Vec<Disposition>> {
        self.apply_batch_from(events, None).await
    }

    /// [`apply_batch`](Self::apply_batch), saving `checkpoint` (where the batch was read up to) in the same ledger
    /// transaction, so the checkpoint never runs ahead of what was applied.
    pub async fn apply_batch_from(
        &self,
        events: Vec<ChangeEvent>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Vec<Disposition>> {
        let span = tracing::info_span!("sync_batch", events = events.len());
        self.run_batch(events, false, checkpoint)
            .instrument(span)
            .await
    }

    /// Re-applies up to `limit` dead letters, oldest first (after a fix: a mapping corrected, a target back), as
    /// one batch. A letter whose event now settles is removed; one that fails again stays, with its attempts
    /// updated.
    pub async fn replay_dead_letters(&self, limit: usize) -> Result<ReplayReport> {
        let letters = self.ledger_call(|| self.ledger.dead_letters(limit)).await?;
        let ids: Vec<String> = letters.iter().map(|l| l.event.event_id.clone()).collect();
        let events = letters.into_iter().map(|l| l.event).collect();
        let span = tracing::info_span!("replay", letters = ids.len());
        let dispositions = self.run_batch(events, true, None).instrument(span).await?;
        let mut report = ReplayReport::default();
        for (event_id, disposition) in ids.into_iter().zip(dispositions) {
            match disposition {
                Disposition::DeadLettered(error) => report.failed.push((event_id, error)),
                _ => report.replayed += 1,
            }
        }
        Ok(report)
    }

    /// Decides, writes and settles a batch. `replay`: the events come from dead letters (their ids were settled
    /// when they were dead-lettered, so the id check is skipped; success resolves the letter).
    async fn run_batch(
        &self,
        events: Vec<ChangeEvent>,
        replay: bool,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Vec<Disposition>> {
        let sources: Vec<SourceRecord> = events.iter().map(ChangeEvent::source_record).collect();
        let view = self.look_up(&events, &sources, replay).await?;
        let mut settlement = Settlement::at(now_ms());
        settlement.checkpoint = checkpoint;
        let mut steps = self.decide(&events, &sources, &view, replay);
        // Id-map entries this batch adds, by source record (a map: a batch may name one record many times).
        let mut new_ids: HashMap<SourceRecord, EntityRef> = HashMap::new();
        let mut prepared = Vec::new();
        for (i, step) in steps.iter_mut().enumerate() {
            if let Step::Write = step {
                match self.prepare(&events[i], &sources[i], &view, &mut new_ids) {
                    Ok(record) => prepared.push((i, record)),
                    Err(e) => *step = Step::Done(Err(e), 0),
                }
            }
        }
        let (deletes, upserts): (Vec<_>, Vec<_>) = prepared
            .into_iter()
            .partition(|(i, _)| events[*i].is_delete());
        for (i, written, attempts) in self
            .write_rounds(upserts, &sources, &mut settlement.stats)
            .await
        {
            steps[i] = Step::Done(written, attempts);
        }
        for (i, record) in deletes {
            let (deleted, attempts) = self.delete(&record).await;
            steps[i] = Step::Done(deleted, attempts);
        }
        let mut out = Vec::with_capacity(events.len());
        for ((event, source), step) in events.iter().zip(&sources).zip(steps) {
            let known = view.targets.contains_key(source);
            out.push(self.settle_event(
                event,
                source,
                step,
                replay,
                known,
                &mut new_ids,
                &mut settlement,
            )?);
        }
        settlement.id_map.extend(
            new_ids
                .into_iter()
                .map(|(source, target)| IdMapping { source, target }),
        );
        if !replay {
            settlement
                .stats
                .count(Counter::Received, events.len() as u64);
        }
        self.ledger_call(|| self.ledger.settle(&settlement)).await?;
        self.counters.add_stats(&settlement.stats);
        Ok(out)
    }

    /// Everything the batch needs from the ledger, in one call.
    async fn look_up(
        &self,
        events: &[ChangeEvent],
        sources: &[SourceRecord],
        replay: bool,
    ) -> Result<LedgerView> {
        let mut query = LedgerQuery {
            event_ids: match replay {
                true => Vec::new(),
                false => events.iter().map(|e| e.event_id.clone()).collect(),
            },
            records: sources.to_vec(),
            targets: sources.to_vec(),
            own_writes: Vec::new(),
        };
        for event in events {
            // Own writes exist only in a two-way sync, where both directions name their target instance.
            if self.target_instance.is_some() {
                query.own_writes.push(OwnWrite {
                    instance: event.source.clone(),
                    record: event.reference(),
                    version: event.source_version,
                });
            }
            for target in event.lookups.values() {
                query
                    .targets
                    .push(SourceRecord::new(event.source.clone(), target.clone()));
            }
        }
        self.ledger_call(|| self.ledger.lookup(&query)).await
    }

    /// Echo, duplicate and stale checks, and the newest event per record: what to skip and what to write.
    fn decide(
        &self,
        events: &[ChangeEvent],
        sources: &[SourceRecord],
        view: &LedgerView,
        replay: bool,
    ) -> Vec<Step> {
        let mut steps = Vec::with_capacity(events.len());
        let mut newest: HashMap<&SourceRecord, usize> = HashMap::with_capacity(events.len());
        for (i, event) in events.iter().enumerate() {
            let own_write = || {
                view.own_writes.contains(&OwnWrite {
                    instance: event.source.clone(),
                    record: event.reference(),
                    version: event.source_version,
                })
            };
            let step = if event.source_version > MAX_VERSION {
                // A ledger keeps versions as signed 64-bit integers: such an event is refused alone, rather than
                // failing its whole batch's settlement.
                Step::Done(
                    Err(Error::InvalidEvent {
                        event_id: Some(event.event_id.clone()),
                        reason: format!(
                            "source_version {} is above {MAX_VERSION}, the highest a ledger keeps",
                            event.source_version
                        ),
                    }),
                    0,
                )
            } else if event
                .origin
                .as_ref()
                .is_some_and(|o| self.ignored_origins.contains(o))
                || (!view.own_writes.is_empty() && own_write())
            {
                Step::Skip(Counter::Echo, Disposition::Echo)
            } else if !replay && view.processed.contains(&event.event_id) {
                Step::Skip(Counter::Duplicate, Disposition::Duplicate)
            } else if let Some(applied) = view.applied.get(&sources[i])
                && applied.version >= event.source_version
            {
                behind(applied.version, event.source_version)
            } else {
                match newest.entry(&sources[i]) {
                    Entry::Vacant(slot) => {
                        slot.insert(i);
                    }
                    Entry::Occupied(mut slot) => {
                        let j = *slot.get();
                        if event.source_version > events[j].source_version {
                            // The earlier one is superseded by this one.
                            steps[j] = behind(event.source_version, events[j].source_version);
                            slot.insert(i);
                        } else {
                            steps.push(behind(events[j].source_version, event.source_version));
                            continue;
                        }
                    }
                }
                Step::Write
            };
            steps.push(step);
        }
        steps
    }

    /// The target record for an event: mapped, addresses resolved through the id map, origin stamped. New id-map
    /// entries go into `new_ids`.
    fn prepare(
        &self,
        event: &ChangeEvent,
        source: &SourceRecord,
        view: &LedgerView,
        new_ids: &mut HashMap<SourceRecord, EntityRef>,
    ) -> Result<Record> {
        let mut record = self.mapping.apply(event)?;
        if let Some(target) = self.resolve(source, record.table(), view, new_ids) {
            record.reference = target;
        }
        if event.is_delete() {
            // The mapped address alone: `Mapping::apply` gives a delete no fields.
            return Ok(record);
        }
        for target in record.lookups.values_mut() {
            // The event addresses lookup targets with source keys: find the one this lookup came from.
            let Some(source_target) = event
                .lookups
                .values()
                .find(|t| self.mapping.map_reference(t).ok().as_ref() == Some(&*target))
            else {
                continue;
            };
            let source = SourceRecord::new(event.source.clone(), source_target.clone());
            let table = target.table.clone();
            if let Some(resolved) = self.resolve(&source, &table, view, new_ids) {
                *target = resolved;
            }
        }
        if let Some(column) = &self.origin_column {
            record
                .fields
                .insert(column.clone(), self.identity.clone().into());
        }
        record.source_version = Some(event.source_version);
        record.state = HydrationState::Hydrated;
        Ok(record)
    }

    /// Where a source record lives at the target, when the id map says (an alias recorded when the record was
    /// first written, or a placeholder it hydrated) or when its table is mapped. A mapped table's record gets a
    /// GUID derived from its source identity, so a crash before the settlement cannot give one source record two
    /// target records: the retry derives the same GUID.
    fn resolve(
        &self,
        source: &SourceRecord,
        target_table: &TableName,
        view: &LedgerView,
        new_ids: &mut HashMap<SourceRecord, EntityRef>,
    ) -> Option<EntityRef> {
        if let Some(target) = view.targets.get(source).or_else(|| new_ids.get(source)) {
            return Some(target.clone());
        }
        if !self.mapped_tables.contains(&source.reference.table) {
            return None;
        }
        let name = format!(
            "{}\n{}\n{}\n{}",
            self.identity, source.source, source.reference, target_table
        );
        let target = EntityRef {
            table: target_table.clone(),
            key: Key::Id(Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes())),
        };
        new_ids.insert(source.clone(), target.clone());
        Some(target)
    }

    /// Records an event's outcome in the settlement and says what became of it. `known`: the id map already
    /// names the event's record.
    #[allow(clippy::too_many_arguments)]
    fn settle_event(
        &self,
        event: &ChangeEvent,
        source: &SourceRecord,
        step: Step,
        replay: bool,
        known: bool,
        new_ids: &mut HashMap<SourceRecord, EntityRef>,
        settlement: &mut Settlement,
    ) -> Result<Disposition> {
        let span = tracing::debug_span!(
            "sync_event",
            event = %event.event_id,
            table = %event.table,
            version = event.source_version,
            correlation = %event.correlation_id,
        );
        let _entered = span.enter();
        let mark = |applied: Option<u64>| SettledEvent {
            event_id: event.event_id.clone(),
            record: source.clone(),
            applied: applied.map(|version| AppliedVersion {
                version,
                deleted: false,
            }),
        };
        let (counter, disposition) = match step {
            Step::Write => return Err(self.internal("an event was never written")),
            Step::Skip(counter, disposition) => {
                settlement.events.push(mark(None));
                (counter, disposition)
            }
            Step::Done(Ok(Written::Applied(outcome)), _) => {
                let table = self.mapping.target_table(&event.table)?;
                let written = EntityRef {
                    table,
                    key: Key::Id(outcome.id),
                };
                if let Some(instance) = &self.target_instance
                    && outcome.change != Change::Unchanged
                {
                    settlement.own_writes.push(OwnWrite {
                        instance: instance.clone(),
                        record: written.clone(),
                        version: outcome.version.0,
                    });
                }
                // A GUID-addressed event whose record now lives under another id (the writer redirected it onto a
                // placeholder): remember where, so later events find it directly. Events by alternate key need no
                // entry: the target resolves the key itself.
                if !known && source.reference.id().is_some_and(|id| id != outcome.id) {
                    new_ids
                        .entry(source.clone())
                        .or_insert_with(|| written.clone());
                }
                if outcome.became_hydrated() {
                    settlement.tasks.push(TaskChange::Release(written));
                    if outcome.previous_state == Some(HydrationState::Placeholder) {
                        settlement.stats.count(Counter::Hydrated, 1);
                    }
                }
                settlement.events.push(mark(Some(event.source_version)));
                tracing::debug!(event = %event.event_id, change = ?outcome.change, "applied");
                (Counter::Applied, Disposition::Applied(outcome))
            }
            Step::Done(Ok(Written::Deleted(outcome)), _) => {
                // A tombstone: an older update arriving late is stale and never brings the record back.
                settlement.events.push(SettledEvent {
                    applied: Some(AppliedVersion {
                        version: event.source_version,
                        deleted: true,
                    }),
                    ..mark(None)
                });
                tracing::debug!(event = %event.event_id, deleted = outcome.is_deleted(), "delete applied");
                (Counter::Applied, Disposition::Deleted(outcome))
            }
            Step::Done(Ok(Written::TargetAhead(applied)), _) => {
                // The target is ahead of the ledger (a write whose settlement was lost): catch the ledger up.
                settlement.events.push(mark(Some(applied)));
                behind_pair(applied, event.source_version)
            }
            Step::Done(Err(error), attempts) => {
                tracing::warn!(event = %event.event_id, error = %error, attempts, "dead-lettering the event");
                settlement.dead_letters.push(DeadLetter::new(
                    event.clone(),
                    &error,
                    attempts,
                    settlement.at_ms,
                ));
                if replay {
                    // A replay that fails again settles nothing: its letter stays, merged (see SyncStats).
                    return Ok(Disposition::DeadLettered(error));
                }
                settlement.events.push(mark(None));
                (Counter::DeadLettered, Disposition::DeadLettered(error))
            }
        };
        if replay {
            settlement.resolved.push(event.event_id.clone());
            settlement.stats.count(Counter::Replayed, 1);
        }
        settlement.stats.count(counter, 1);
        Ok(disposition)
    }

    /// Deletes the target record of a delete event, conditional on the version read when the target is checked
    /// (skipped when the target already holds this source version or a newer one). Deletes are idempotent, so
    /// transient failures are retried; while the circuit is open the delete waits. Returns the attempts made.
    async fn delete(&self, record: &Record) -> (Result<Written>, u32) {
        let mut attempts = 0u32;
        loop {
            let result = self
                .retry
                .run_if(
                    |e| !matches!(e, Error::CircuitOpen { .. }),
                    || {
                        attempts += 1;
                        self.breaker.call(|| self.delete_once(record))
                    },
                )
                .await;
            match result {
                Err(Error::CircuitOpen { retry_after, .. }) => {
                    tokio::time::sleep(retry_after.max(Duration::from_millis(1))).await;
                }
                other => return (other, attempts),
            }
        }
    }

    async fn delete_once(&self, record: &Record) -> Result<Written> {
        let store = self.writer.store();
        let mut delete = Delete::new(record.reference.clone());
        if self.check_target
            && let Some(current) = store.read(&record.reference).await?
        {
            if let Some(target_version) = current.record.source_version
                && target_version >= record.source_version.unwrap_or(0)
            {
                return Ok(Written::TargetAhead(target_version));
            }
            delete = Delete::if_version(record.reference.clone(), current.version);
        }
        match store.delete(&delete).await {
            Ok(outcome) => Ok(Written::Deleted(outcome)),
            // Changed since the read: a newer write won, or the next attempt reads again.
            Err(e @ Error::VersionMismatch { .. }) => Err(Error::Backend {
                backend: store.backend().to_owned(),
                message: format!("{}: changed while being deleted ({e})", record.reference),
                retryable: true,
                source: None,
            }),
            Err(e) => Err(e),
        }
    }

    /// Writes records in batches until each is written, found behind the target, or failed for good. Transient
    /// failures are resent after the policy's backoff (or the store's `Retry-After`, if longer); while the circuit
    /// is open, the batch waits.
    async fn write_rounds(
        &self,
        mut pending: Vec<(usize, Record)>,
        sources: &[SourceRecord],
        stats: &mut SyncStats,
    ) -> Vec<(usize, Result<Written>, u32)> {
        let waits = self.retry.backoff_waits();
        let max_attempts = self.retry.max_attempts.max(1);
        let mut done = Vec::with_capacity(pending.len());
        let mut attempt = 0u32;
        let mut adopted = HashSet::new();
        let started = tokio::time::Instant::now();
        // A transient failure that outlived the policy says so: a replay may succeed without any fix.
        let give_up = |e: Error, attempt: u32| match e.is_retryable() {
            true => Error::RetriesExhausted {
                attempts: attempt,
                elapsed: started.elapsed(),
                source: Box::new(e),
            },
            false => e,
        };
        while !pending.is_empty() {
            attempt += 1;
            if attempt > 1 {
                stats.count(Counter::Retried, pending.len() as u64);
            }
            let mut writes = Vec::with_capacity(pending.len());
            let mut ready = Vec::with_capacity(pending.len());
            let mut paused = None;
            let mut wait = waits
                .get(attempt.saturating_sub(1) as usize)
                .copied()
                .unwrap_or(self.retry.max_backoff);
            for (i, record) in std::mem::take(&mut pending) {
                // Reads go through the breaker too: a target that is down fails them first.
                match self.breaker.call(|| self.target_check(&record)).await {
                    Ok(Err(ahead)) => done.push((i, Ok(ahead), attempt)),
                    Ok(Ok(write)) => {
                        writes.push(write);
                        ready.push((i, record));
                    }
                    Err(Error::CircuitOpen { retry_after, .. }) => {
                        paused = Some(retry_after);
                        pending.push((i, record));
                    }
                    Err(e) if e.is_retryable() && attempt < max_attempts => {
                        wait = wait.max(e.retry_after().unwrap_or_default());
                        pending.push((i, record))
                    }
                    Err(e) => done.push((i, Err(give_up(e, attempt)), attempt)),
                }
            }
            let mut created = 0;
            let called = self
                .breaker
                .call(|| async {
                    let report = self.writer.write_batch(writes).await;
                    // Placeholders exist once created, whatever became of the writes that needed them.
                    created = report.ensured.created().count() as u64;
                    // A batch whose every write failed transiently is one failure of the target.
                    let all_transient = report
                        .results
                        .iter()
                        .all(|r| matches!(r, Err(e) if e.is_retryable()));
                    match report.results.first() {
                        Some(Err(first)) if all_transient => Err(first.clone()),
                        _ => Ok(report),
                    }
                })
                .await;
            stats.count(Counter::PlaceholdersCreated, created);
            match called {
                Err(Error::CircuitOpen { retry_after, .. }) => {
                    paused = Some(retry_after);
                    pending.extend(ready);
                }
                Err(e) => {
                    wait = wait.max(e.retry_after().unwrap_or_default());
                    for (i, record) in ready {
                        match e.is_retryable() && attempt < max_attempts {
                            true => pending.push((i, record)),
                            false => done.push((i, Err(give_up(e.clone(), attempt)), attempt)),
                        }
                    }
                }
                Ok(report) => {
                    for ((i, record), result) in ready.into_iter().zip(report.results) {
                        match result {
                            Ok(outcome) => done.push((i, Ok(Written::Applied(outcome)), attempt)),
                            // Changed between the check and the write: check again.
                            Err(
                                Error::VersionMismatch { .. }
                                | Error::NotFound { .. }
                                | Error::AlreadyExists { .. },
                            ) if self.check_target && attempt < max_attempts => {
                                pending.push((i, record))
                            }
                            // Not a failure but a redirect: allowed once per record, whatever attempts are left.
                            Err(Error::DuplicateKey { existing, key, .. })
                                if self.check_target && adopted.insert(i) =>
                            {
                                let mut record = record;
                                match self.adopt(&sources[i], &mut record, existing).await {
                                    Ok(true) => pending.push((i, record)),
                                    Ok(false) => done.push((
                                        i,
                                        Err(Error::DuplicateKey {
                                            table: record.table().clone(),
                                            key,
                                            existing,
                                        }),
                                        attempt,
                                    )),
                                    Err(e) => {
                                        wait = wait.max(e.retry_after().unwrap_or_default());
                                        pending.push((i, record));
                                    }
                                }
                            }
                            Err(e) if e.is_retryable() && attempt < max_attempts => {
                                wait = wait.max(e.retry_after().unwrap_or_default());
                                pending.push((i, record));
                            }
                            Err(e) => done.push((i, Err(give_up(e, attempt)), attempt)),
                        }
                    }
                }
            }
            if let Some(retry_after) = paused {
                tracing::info!(
                    wait_ms = retry_after.as_millis() as u64,
                    "circuit open: the batch waits"
                );
                // The events wait for the target rather than fail: their attempts start over once it is back.
                attempt = 0;
                wait = retry_after.max(Duration::from_millis(1));
            }
            if !pending.is_empty() {
                tokio::time::sleep(wait).await;
            }
        }
        done
    }

    /// A create that clashed with the alternate key of record `holder`: if the holder is a placeholder (the LOB
    /// app referenced this record by its key before the sync delivered it), the source record is that record.
    /// The alias goes into the ledger *before* the write that hydrates the placeholder, so a crash in between
    /// cannot leave the hydrated record unknown to the next attempt (which would then see a clash with a real
    /// record, and dead-letter the event). Returns whether `record` now addresses the placeholder.
    async fn adopt(
        &self,
        source: &SourceRecord,
        record: &mut Record,
        holder: Uuid,
    ) -> Result<bool> {
        let holder = EntityRef {
            table: record.table().clone(),
            key: Key::Id(holder),
        };
        let Some(existing) = self.writer.store().read(&holder).await? else {
            return Ok(true); // gone since: the next round creates the record afresh
        };
        if self.writer.policy().state(&existing.record) != HydrationState::Placeholder {
            return Ok(false);
        }
        let mut alias = Settlement::at(now_ms());
        alias.id_map.push(IdMapping {
            source: source.clone(),
            target: holder.clone(),
        });
        self.ledger_call(|| self.ledger.settle(&alias)).await?;
        tracing::info!(record = %record.reference, placeholder = %holder, "hydrating the placeholder that holds this alternate key");
        record.reference = holder;
        Ok(true)
    }

    /// The write for a record, conditional on the target's version when the target is checked; `Err` with the
    /// target's source version when the target is already at this version or newer.
    async fn target_check(&self, record: &Record) -> Result<std::result::Result<Write, Written>> {
        let mut write = Write::upsert(record.clone());
        if !self.check_target {
            return Ok(Ok(write));
        }
        match self.writer.store().read(&write.record.reference).await? {
            Some(current) => {
                if let Some(target_version) = current.record.source_version
                    && target_version >= record.source_version.unwrap_or(0)
                {
                    return Ok(Err(Written::TargetAhead(target_version)));
                }
                write.precondition = Precondition::MatchVersion(current.version);
            }
            // Absent: create it, and nothing else. A clash with a placeholder's alternate key comes back as
            // `DuplicateKey`, which `adopt` resolves durably (the writer's own redirect would not record why).
            None => write.precondition = Precondition::CreateOnly,
        }
        Ok(Ok(write))
    }

    /// Ledger calls are retried like store calls; a ledger that stays down stops the applier.
    async fn ledger_call<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        // The first try goes straight through: setting up the retry machinery for every call would cost more than
        // an in-memory ledger call itself.
        match call().await {
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "ledger call failed; retrying");
                self.retry.run(call).await
            }
            other => other,
        }
    }

    fn internal(&self, message: &str) -> Error {
        Error::Backend {
            backend: self.writer.store().backend().to_owned(),
            message: message.into(),
            retryable: false,
            source: None,
        }
    }
}

/// The skip for an event at `version` when `applied` (≥ it) is already there.
fn behind(applied: u64, version: u64) -> Step {
    let (counter, disposition) = behind_pair(applied, version);
    Step::Skip(counter, disposition)
}

fn behind_pair(applied: u64, version: u64) -> (Counter, Disposition) {
    match applied == version {
        true => (Counter::Duplicate, Disposition::Duplicate),
        false => (Counter::Stale, Disposition::Stale { applied }),
    }
}
