//! [`Applier`]: writes change events into a target store, idempotently, in order, hydrating placeholders, and
//! settles every event (applied, skipped with a reason, or dead-lettered).

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
use crate::store::{Precondition, RecordStore, Write, WriteOutcome};
use crate::sync::{
    ChangeEvent, Counter, DeadLetter, Ledger, Mapping, SourceRecord, SyncCounters, SyncStats,
};
use crate::writer::EnsuringWriter;

/// What became of one event.
#[derive(Clone, Debug)]
pub enum Disposition {
    /// Written to the target.
    Applied(WriteOutcome),
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
    /// Every write is then remembered in the ledger with the row version it produced
    /// ([`Ledger::record_own_write`]), and an event from a source whose record and version match one of them is
    /// skipped as an echo. Unlike an origin column, this cannot mistake a later edit by someone else for an echo.
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
    /// The target already holds this version or a newer one.
    TargetAhead(u64),
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

    /// The counters so far.
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

    /// Applies one event and says what became of it. `Err` only when the ledger itself failed (after retries):
    /// the event is then not settled, and the caller should stop and let it be redelivered.
    pub async fn apply(&self, event: ChangeEvent) -> Result<Disposition> {
        self.counters.incr(Counter::Received);
        let span = tracing::info_span!(
            "sync_event",
            event = %event.event_id,
            table = %event.table,
            version = event.source_version,
            correlation = %event.correlation_id,
        );
        let correlation_id = event.correlation_id;
        let disposition =
            correlation::scope(correlation_id, self.settle(event, false).instrument(span)).await?;
        Ok(disposition)
    }

    /// Applies events one after the other; stops at the first ledger failure.
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
    /// `$batch` requests), the throughput path of a sync. The same rules as [`apply`](Self::apply), with these
    /// differences: of several events for one record in the batch only the newest is written (the others settle
    /// as stale or duplicate), retries resend only the writes that failed transiently, and a batch whose every
    /// write fails transiently counts as one failure for the circuit breaker. `Err` only when the ledger failed;
    /// events settled before that stay settled.
    pub async fn apply_batch(&self, events: Vec<ChangeEvent>) -> Result<Vec<Disposition>> {
        let span = tracing::info_span!("sync_batch", events = events.len());
        self.apply_batch_inner(events).instrument(span).await
    }

    async fn apply_batch_inner(&self, events: Vec<ChangeEvent>) -> Result<Vec<Disposition>> {
        self.counters.add(Counter::Received, events.len() as u64);
        let mut out: Vec<Option<Disposition>> = vec![None; events.len()];
        let sources: Vec<SourceRecord> = events.iter().map(ChangeEvent::source_record).collect();
        // The newest event per record in this batch; older ones are superseded.
        let mut newest: HashMap<&SourceRecord, usize> = HashMap::new();
        let mut superseded = Vec::new();
        for (i, event) in events.iter().enumerate() {
            if let Some(skipped) = self.precheck(event, &sources[i], false).await? {
                out[i] = Some(skipped);
                continue;
            }
            let older = match newest.entry(&sources[i]) {
                Entry::Vacant(slot) => {
                    slot.insert(i);
                    continue;
                }
                Entry::Occupied(mut slot) => {
                    let j = *slot.get();
                    if event.source_version > events[j].source_version {
                        slot.insert(i);
                        (j, event.source_version)
                    } else {
                        (i, events[j].source_version)
                    }
                }
            };
            let (k, applied) = older;
            let (counter, disposition) = match events[k].source_version == applied {
                true => (Counter::Duplicate, Disposition::Duplicate),
                false => (Counter::Stale, Disposition::Stale { applied }),
            };
            // Recorded only after the batch's writes: a redelivered event shares its id, and marking that id
            // processed before the newest event is written would make the newest one a "duplicate" if the worker
            // stopped in between.
            superseded.push((k, counter, disposition));
        }
        let mut pending = Vec::new();
        let mut chosen: Vec<usize> = newest.into_values().collect();
        chosen.sort_unstable();
        for i in chosen {
            match self.prepare(&events[i]).await {
                Ok(record) => pending.push((i, record)),
                Err(PrepareError::Ledger(e)) => return Err(e),
                Err(PrepareError::Event(e)) => {
                    out[i] = Some(
                        self.finish(&events[i], &sources[i], Err(e), 0, false)
                            .await?,
                    )
                }
            }
        }
        for (i, written, attempts) in self.write_rounds(pending).await {
            out[i] = Some(
                self.finish(&events[i], &sources[i], written, attempts, false)
                    .await?,
            );
        }
        for (k, counter, disposition) in superseded {
            out[k] = Some(
                self.skip(&events[k], &sources[k], counter, disposition)
                    .await?,
            );
        }

        out.into_iter()
            .map(|d| {
                d.ok_or_else(|| Error::Backend {
                    backend: self.writer.store().backend().to_owned(),
                    message: "an event of the batch was not settled".into(),
                    retryable: false,
                    source: None,
                })
            })
            .collect()
    }

    /// Writes records in batches until each is written, found behind the target, or failed for good. Transient
    /// failures are resent after the policy's backoff (or the store's `Retry-After`, if longer); while the circuit
    /// is open, the batch waits.
    async fn write_rounds(
        &self,
        mut pending: Vec<(usize, Record)>,
    ) -> Vec<(usize, Result<Written>, u32)> {
        let waits = self.retry.backoff_waits();
        let max_attempts = self.retry.max_attempts.max(1);
        let mut done = Vec::with_capacity(pending.len());
        let mut attempt = 0u32;
        while !pending.is_empty() {
            attempt += 1;
            if attempt > 1 {
                self.counters.add(Counter::Retried, pending.len() as u64);
            }
            let mut writes = Vec::with_capacity(pending.len());
            let mut ready = Vec::with_capacity(pending.len());
            for (i, record) in std::mem::take(&mut pending) {
                match self.target_check(&record).await {
                    Ok(Err(ahead)) => done.push((i, Ok(ahead), attempt)),
                    Ok(Ok(write)) => {
                        writes.push(write);
                        ready.push((i, record));
                    }
                    Err(e) if e.is_retryable() && attempt < max_attempts => {
                        pending.push((i, record))
                    }
                    Err(e) => done.push((i, Err(e), attempt)),
                }
            }
            let called = self
                .breaker
                .call(|| async {
                    let report = self.writer.write_batch(writes).await;
                    // Placeholders exist once created, whatever became of the writes that needed them.
                    let created = report.ensured.created().count() as u64;
                    self.counters.add(Counter::PlaceholdersCreated, created);
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
            let mut wait = waits
                .get(attempt.saturating_sub(1) as usize)
                .copied()
                .unwrap_or(self.retry.max_backoff);
            match called {
                Err(Error::CircuitOpen { retry_after, .. }) => {
                    // Paused, not failed: the attempt does not count.
                    attempt -= 1;
                    pending.extend(ready);
                    wait = retry_after.max(Duration::from_millis(1));
                }
                Err(e) => {
                    wait = wait.max(e.retry_after().unwrap_or_default());
                    for (i, record) in ready {
                        match e.is_retryable() && attempt < max_attempts {
                            true => pending.push((i, record)),
                            false => done.push((i, Err(e.clone()), attempt)),
                        }
                    }
                }
                Ok(report) => {
                    for ((i, record), result) in ready.into_iter().zip(report.results) {
                        match result {
                            Ok(outcome) => {
                                self.count_hydration(&outcome);
                                done.push((i, Ok(Written::Applied(outcome)), attempt));
                            }
                            // Changed between the check and the write: check again.
                            Err(Error::VersionMismatch { .. } | Error::NotFound { .. })
                                if self.check_target && attempt < max_attempts =>
                            {
                                pending.push((i, record))
                            }
                            Err(e) if e.is_retryable() && attempt < max_attempts => {
                                wait = wait.max(e.retry_after().unwrap_or_default());
                                pending.push((i, record));
                            }
                            Err(e) => done.push((i, Err(e), attempt)),
                        }
                    }
                }
            }
            if !pending.is_empty() {
                tokio::time::sleep(wait).await;
            }
        }
        done
    }

    fn count_hydration(&self, outcome: &WriteOutcome) {
        if outcome.became_hydrated() && outcome.previous_state == Some(HydrationState::Placeholder)
        {
            self.counters.incr(Counter::Hydrated);
        }
    }

    /// The write for a record, conditional on the target's version when the target is checked; `Err` with the
    /// target's source version when the target is already at this version or newer.
    async fn target_check(&self, record: &Record) -> Result<std::result::Result<Write, Written>> {
        let mut write = Write::upsert(record.clone());
        if self.check_target
            && let Some(current) = self.writer.store().read(&write.record.reference).await?
        {
            if let Some(target_version) = current.record.source_version
                && target_version >= record.source_version.unwrap_or(0)
            {
                return Ok(Err(Written::TargetAhead(target_version)));
            }
            write.precondition = Precondition::MatchVersion(current.version);
        }
        Ok(Ok(write))
    }

    /// Re-applies up to `limit` dead letters, oldest first (after a fix: a mapping corrected, a target back). A
    /// letter whose event now settles is removed; one that fails again stays, with its attempts updated.
    pub async fn replay_dead_letters(&self, limit: usize) -> Result<ReplayReport> {
        let letters = self.ledger_call(|| self.ledger.dead_letters(limit)).await?;
        let mut report = ReplayReport::default();
        for letter in letters {
            let event_id = letter.event.event_id.clone();
            let correlation_id = letter.event.correlation_id;
            let span =
                tracing::info_span!("replay", event = %event_id, correlation = %correlation_id);
            let disposition = correlation::scope(
                correlation_id,
                self.settle(letter.event, true).instrument(span),
            )
            .await?;
            match disposition {
                Disposition::DeadLettered(error) => report.failed.push((event_id, error)),
                _ => {
                    // Counted with its settlement: if removing the letter fails, the next replay settles and
                    // counts it again, so settlements and replays still match.
                    self.counters.incr(Counter::Replayed);
                    self.ledger_call(|| self.ledger.remove_dead_letter(&event_id))
                        .await?;
                    report.replayed += 1;
                }
            }
        }
        Ok(report)
    }

    async fn settle(&self, event: ChangeEvent, replay: bool) -> Result<Disposition> {
        let source = event.source_record();
        if let Some(skipped) = self.precheck(&event, &source, replay).await? {
            return Ok(skipped);
        }
        let (write, attempts) = match self.prepare(&event).await {
            Ok(record) => self.write(record).await,
            Err(PrepareError::Ledger(e)) => return Err(e),
            Err(PrepareError::Event(e)) => (Err(e), 0),
        };
        self.finish(&event, &source, write, attempts, replay).await
    }

    /// Echo, duplicate and stale checks; `Some` when the event is settled without a write.
    async fn precheck(
        &self,
        event: &ChangeEvent,
        source: &SourceRecord,
        replay: bool,
    ) -> Result<Option<Disposition>> {
        let own_write =
            || (self.ledger).is_own_write(&event.source, &source.reference, event.source_version);
        if event
            .origin
            .as_ref()
            .is_some_and(|o| self.ignored_origins.contains(o))
            || self.ledger_call(own_write).await?
        {
            return self
                .skip(event, source, Counter::Echo, Disposition::Echo)
                .await
                .map(Some);
        }
        if !replay
            && self
                .ledger_call(|| self.ledger.is_processed(&event.event_id))
                .await?
        {
            self.counters.incr(Counter::Duplicate);
            return Ok(Some(Disposition::Duplicate));
        }
        if let Some(applied) = self
            .ledger_call(|| self.ledger.applied_version(source))
            .await?
            && applied >= event.source_version
        {
            let (counter, disposition) = match applied == event.source_version {
                true => (Counter::Duplicate, Disposition::Duplicate),
                false => (Counter::Stale, Disposition::Stale { applied }),
            };
            return self
                .skip(event, source, counter, disposition)
                .await
                .map(Some);
        }
        Ok(None)
    }

    /// Settles an event after its write: records it in the ledger and counts it, or dead-letters it.
    async fn finish(
        &self,
        event: &ChangeEvent,
        source: &SourceRecord,
        write: Result<Written>,
        attempts: u32,
        replay: bool,
    ) -> Result<Disposition> {
        match write {
            Ok(Written::Applied(outcome)) => {
                // The event settles (Applied) only once the ledger has recorded it: a ledger failure below leaves
                // it unsettled, to be redelivered. (Hydrations are work done, counted where the write happens.)
                if let Some(instance) = &self.target_instance
                    && outcome.change != crate::store::Change::Unchanged
                {
                    let written = EntityRef {
                        table: self.mapping.target_table(&event.table)?,
                        key: Key::Id(outcome.id),
                    };
                    let own = || {
                        self.ledger
                            .record_own_write(instance, &written, outcome.version.0)
                    };
                    self.ledger_call(own).await?;
                }
                let version = Some(event.source_version);
                self.ledger_call(|| {
                    self.ledger
                        .record_processed(&event.event_id, source, version)
                })
                .await?;
                self.counters.incr(Counter::Applied);
                tracing::debug!(change = ?outcome.change, "applied");
                Ok(Disposition::Applied(outcome))
            }
            Ok(Written::TargetAhead(applied)) => {
                // The target is ahead of the ledger (a write whose ledger entry was lost): catch the ledger up.
                let version = Some(applied);
                self.ledger_call(|| {
                    self.ledger
                        .record_processed(&event.event_id, source, version)
                })
                .await?;
                let disposition = match applied == event.source_version {
                    true => Disposition::Duplicate,
                    false => Disposition::Stale { applied },
                };
                self.counters.incr(match &disposition {
                    Disposition::Duplicate => Counter::Duplicate,
                    _ => Counter::Stale,
                });
                Ok(disposition)
            }
            Err(error) => {
                tracing::warn!(error = %error, attempts, "dead-lettering the event");
                let letter = DeadLetter::new(event.clone(), &error, attempts, now_ms());
                self.ledger_call(|| self.ledger.add_dead_letter(letter.clone()))
                    .await?;
                if !replay {
                    self.ledger_call(|| {
                        self.ledger.record_processed(&event.event_id, source, None)
                    })
                    .await?;
                    // A replay that fails again settles nothing: its letter stays where it was (see SyncStats).
                    self.counters.incr(Counter::DeadLettered);
                }
                Ok(Disposition::DeadLettered(error))
            }
        }
    }

    async fn skip(
        &self,
        event: &ChangeEvent,
        source: &SourceRecord,
        counter: Counter,
        disposition: Disposition,
    ) -> Result<Disposition> {
        self.ledger_call(|| self.ledger.record_processed(&event.event_id, source, None))
            .await?;
        self.counters.incr(counter);
        tracing::debug!(outcome = counter.name(), "skipped");
        Ok(disposition)
    }

    /// The target record for an event: mapped, keys translated, origin stamped.
    async fn prepare(&self, event: &ChangeEvent) -> std::result::Result<Record, PrepareError> {
        if event.is_delete() {
            return Err(PrepareError::Event(Error::InvalidEvent {
                event_id: Some(event.event_id.clone()),
                reason: "delete events are not applied: RecordStore has no delete; handle them out of band".into(),
            }));
        }
        let mut record = self.mapping.apply(event).map_err(PrepareError::Event)?;
        if self.mapped_tables.contains(&event.table) {
            let source = event.source_record();
            record.reference = self.target_of(&source, record.table()).await?;
        }
        if !self.mapped_tables.is_empty() {
            for target in record.lookups.values_mut() {
                // The event addresses lookup targets with source keys: find the one this lookup came from.
                let Some(source_target) = event
                    .lookups
                    .values()
                    .find(|t| self.mapping.map_reference(t).ok().as_ref() == Some(&*target))
                else {
                    continue;
                };
                if self.mapped_tables.contains(&source_target.table) {
                    let source = SourceRecord::new(event.source.clone(), source_target.clone());
                    *target = self.target_of(&source, &target.table).await?;
                }
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

    /// The target address of a source record of a mapped table; a new GUID is allocated and remembered on first
    /// sight, before anything is written, so a crash cannot leave two target records for one source record.
    async fn target_of(
        &self,
        source: &SourceRecord,
        target_table: &TableName,
    ) -> std::result::Result<EntityRef, PrepareError> {
        if let Some(target) = self
            .ledger_call(|| self.ledger.target_of(source))
            .await
            .map_err(PrepareError::Ledger)?
        {
            return Ok(target);
        }
        let target = EntityRef {
            table: target_table.clone(),
            key: Key::Id(Uuid::new_v4()),
        };
        self.ledger_call(|| self.ledger.map_record(source, &target))
            .await
            .map_err(PrepareError::Ledger)?;
        Ok(target)
    }

    /// Writes with retries (transient errors), waiting while the circuit is open. Returns the attempts made.
    async fn write(&self, record: Record) -> (Result<Written>, u32) {
        let mut attempts = 0u32;
        loop {
            let result = self
                .retry
                .run_if(
                    |e| !matches!(e, Error::CircuitOpen { .. }),
                    || {
                        attempts += 1;
                        if attempts > 1 {
                            self.counters.incr(Counter::Retried);
                        }
                        let record = record.clone();
                        async move { self.breaker.call(|| self.write_once(record)).await }
                    },
                )
                .await;
            match result {
                Err(Error::CircuitOpen { retry_after, .. }) => {
                    // Paused, not failed: wait for the breaker's probe time and try again.
                    tracing::info!(
                        wait_ms = retry_after.as_millis() as u64,
                        "circuit open: event waits"
                    );
                    tokio::time::sleep(retry_after.max(Duration::from_millis(1))).await;
                }
                other => return (other, attempts),
            }
        }
    }

    async fn write_once(&self, record: Record) -> Result<Written> {
        const CONTENDED: usize = 5;
        for _ in 0..CONTENDED {
            let write = match self.target_check(&record).await? {
                Ok(write) => write,
                Err(ahead) => return Ok(ahead),
            };
            // A batch of one rather than `write`: its report says which placeholders were created even when the
            // write itself then fails, and they exist all the same.
            let report = self.writer.write_batch([write]).await;
            let created = report.ensured.created().count() as u64;
            self.counters.add(Counter::PlaceholdersCreated, created);
            match report.results.into_iter().next() {
                Some(Ok(outcome)) => {
                    self.count_hydration(&outcome);
                    return Ok(Written::Applied(outcome));
                }
                // Someone wrote the record between the read and the write: read again.
                Some(Err(Error::VersionMismatch { .. } | Error::NotFound { .. }))
                    if self.check_target => {}
                Some(Err(e)) => return Err(e),
                None => {
                    return Err(Error::Backend {
                        backend: self.writer.store().backend().to_owned(),
                        message: "a batch of one write returned no result".into(),
                        retryable: false,
                        source: None,
                    });
                }
            }
        }
        Err(Error::Backend {
            backend: self.writer.store().backend().to_owned(),
            message: format!(
                "{}: the record kept changing during {CONTENDED} attempts",
                record.reference
            ),
            retryable: true,
            source: None,
        })
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
                self.counters.incr(Counter::Retried);
                self.retry.run(call).await
            }
            other => other,
        }
    }
}

enum PrepareError {
    /// The event cannot be applied (dead-letter it).
    Event(Error),
    /// The ledger failed (stop).
    Ledger(Error),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
