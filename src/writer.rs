//! [`EnsuringWriter`]: the ensure-then-write orchestrator.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::Arc;

use tracing::Instrument;

use crate::ensure::{EnsureExists, EnsureReport, ensure_then_write};
use crate::error::{Error, Result};
use crate::guard::{Guarded, HydrationHooks};
use crate::hydration::{HydrationPolicy, Policies};
use crate::key::{ByKeyValues, EntityRef, Key, KeyKind, KeyValue, same_text};
use crate::name::{ColumnName, TableName};
use crate::record::{HydrationState, Record};
use crate::store::{Change, Precondition, RecordStore, Write, WriteOutcome};

/// The default number of writes sent to the store in one call (the Dataverse `$batch` limit).
pub const DEFAULT_BATCH_SIZE: usize = 1000;

/// Writes records after making sure everything they refer to exists.
///
/// For each write it ensures every lookup target (a placeholder for each missing one, nothing at all for the
/// others), then writes the record. A full write of a placeholder hydrates it; placeholders are only ever created
/// with create-only writes, so they never overwrite real data.
#[derive(Debug, Clone)]
pub struct EnsuringWriter {
    store: Arc<dyn RecordStore>,
    policy: Arc<dyn HydrationPolicy>,
    hooks: Arc<HydrationHooks>,
    batch_size: NonZeroUsize,
}

/// The result of [`EnsuringWriter::write`].
#[derive(Debug)]
pub struct Written {
    /// What the write did.
    pub outcome: WriteOutcome,
    /// What ensuring the record's lookups did.
    pub ensured: EnsureReport,
}

/// The result of [`EnsuringWriter::write_batch`].
#[derive(Debug)]
pub struct BatchReport {
    /// One result per input write, in input order.
    pub results: Vec<Result<WriteOutcome>>,
    /// Every reference ensured along the way (including re-ensures).
    pub ensured: EnsureReport,
}

/// Counts over a [`BatchReport`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchCounts {
    /// Records created.
    pub created: usize,
    /// Records updated.
    pub updated: usize,
    /// Writes that changed nothing.
    pub unchanged: usize,
    /// Writes that failed.
    pub failed: usize,
    /// Placeholders created for missing references.
    pub placeholders: usize,
}

impl BatchReport {
    /// Created / updated / unchanged / failed / placeholder counts.
    pub fn counts(&self) -> BatchCounts {
        let mut counts = BatchCounts {
            placeholders: self.ensured.created().count(),
            ..BatchCounts::default()
        };
        for result in &self.results {
            match result {
                Ok(o) if o.change == Change::Created => counts.created += 1,
                Ok(o) if o.change == Change::Updated => counts.updated += 1,
                Ok(_) => counts.unchanged += 1,
                Err(_) => counts.failed += 1,
            }
        }
        counts
    }

    /// The failed writes: input index and error.
    pub fn failures(&self) -> impl Iterator<Item = (usize, &Error)> {
        self.results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
    }

    /// Whether every write succeeded.
    pub fn is_success(&self) -> bool {
        self.results.iter().all(Result::is_ok)
    }
}

impl EnsuringWriter {
    /// A writer over `store` with the zero-configuration policy ([`Policies::default`]).
    pub fn new(store: Arc<dyn RecordStore>) -> Self {
        Self {
            store,
            policy: Arc::new(Policies::default()),
            hooks: Arc::new(HydrationHooks::new()),
            batch_size: NonZeroUsize::new(DEFAULT_BATCH_SIZE).unwrap_or(NonZeroUsize::MIN),
        }
    }

    /// Uses `policy` for placeholders and hydration.
    pub fn with_policy(mut self, policy: impl HydrationPolicy + 'static) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// Shares a hook registry (for example with other writers to the same store).
    pub fn with_hooks(mut self, hooks: Arc<HydrationHooks>) -> Self {
        self.hooks = hooks;
        self
    }

    /// Writes at most `size` records per store call (default [`DEFAULT_BATCH_SIZE`]).
    pub fn with_batch_size(mut self, size: NonZeroUsize) -> Self {
        self.batch_size = size;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn RecordStore> {
        &self.store
    }

    /// The policy, shared: clone the `Arc` to use it from a deferred task or a hook.
    pub fn policy(&self) -> &Arc<dyn HydrationPolicy> {
        &self.policy
    }

    /// The hook registry: register "on hydrated" logic and deferred tasks here.
    pub fn hooks(&self) -> &Arc<HydrationHooks> {
        &self.hooks
    }

    /// `record` seen through the policy, for guarded field access.
    pub fn guard<'a>(&'a self, record: &'a Record) -> Guarded<'a> {
        Guarded::new(record, &*self.policy)
    }

    /// Ensures references exist (see [`EnsureExists`]).
    pub async fn ensure(&self, references: &[EntityRef]) -> EnsureReport {
        self.store.ensure_exists(references, &*self.policy).await
    }

    /// Ensures the record's lookup targets, then writes it.
    pub async fn write(&self, write: impl Into<Write>) -> Result<Written> {
        let BatchReport { results, ensured } = self.write_batch([write.into()]).await;
        match results.into_iter().next() {
            Some(Ok(outcome)) => Ok(Written { outcome, ensured }),
            Some(Err(err)) => Err(err),
            None => Err(self.internal("a batch of one write returned no result")),
        }
    }

    /// Writes many records: the lookup targets of the whole batch are de-duplicated and ensured in one call,
    /// then the records are written in store batches. Records that other records of the batch refer to are
    /// written first, so they need no placeholder. One failure never hides the others: the report has one result
    /// per write, in input order.
    ///
    /// A write that still fails because a target vanished in between is retried once after re-ensuring it; if it
    /// fails again, its [`Error::MissingReference`] is returned.
    pub async fn write_batch(&self, writes: impl IntoIterator<Item = Write>) -> BatchReport {
        let mut writes: Vec<Write> = writes.into_iter().collect();
        let span = tracing::info_span!(
            "write_batch",
            backend = self.store.backend(),
            records = writes.len()
        );
        async move {
            for write in &mut writes {
                // The policy decides hydration; the store's state is a cache of that decision. A write that lacks
                // a field the policy requires leaves a placeholder a placeholder (and never turns a hydrated
                // record back), so hooks fire exactly when a guard first answers `Proceed::Now`.
                if write.record.state == HydrationState::Hydrated {
                    match self.policy.state(&write.record) {
                        HydrationState::Hydrated => self.policy.prepare_write(&mut write.record),
                        HydrationState::Placeholder => {
                            write.record.state = HydrationState::Placeholder
                        }
                    }
                }
            }
            let (order, targets) = plan(&writes);
            let mut results: Vec<Option<Result<WriteOutcome>>> = vec![None; writes.len()];
            // The placeholders go out with the first chunk of writes in one store call: one round trip for a
            // store that batches, and the store applies them first.
            let (first, rest) = order.split_at(order.len().min(self.batch_size.get()));
            let (mut ensured, written) = ensure_then_write(
                &*self.store,
                &targets,
                &*self.policy,
                &gather(&writes, first),
            )
            .await;
            let failed: HashMap<&EntityRef, &Error> = ensured.failures().collect();
            let mut retry = Vec::new();
            for (&i, result) in first.iter().zip(written) {
                // Same rules as later chunks: a target that could not be ensured is the reason to report; a
                // vanished target or a placeholder-held key is worth the one retry.
                let result = match result {
                    Err(err @ Error::MissingReference { .. }) => {
                        match unensured(&writes[i].record, &failed) {
                            Some(not_ensured) => Err(not_ensured),
                            None => {
                                retry.push(i);
                                Err(err)
                            }
                        }
                    }
                    Err(err @ Error::DuplicateKey { .. }) => {
                        retry.push(i);
                        Err(err)
                    }
                    other => other,
                };
                results[i] = Some(result);
            }
            let ready = self.skip_unensured(&writes, rest.to_vec(), &ensured, &mut results);
            retry.extend(self.write_in_chunks(&writes, &ready, &mut results).await);
            if !retry.is_empty() {
                self.retry_once(&writes, retry, &mut ensured, &mut results)
                    .await;
            }
            let results: Vec<Result<WriteOutcome>> = results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(self.internal("a write was never attempted"))))
                .collect();
            // Skipped when no hook is registered: a batch of 10,000 new records would otherwise pay 10,000 lock
            // round trips for nothing.
            if !self.hooks.is_empty() {
                for (write, result) in writes.iter().zip(&results) {
                    if let Ok(outcome) = result
                        && outcome.became_hydrated()
                    {
                        self.hooks.notify(outcome, &write.record);
                    }
                }
            }
            let report = BatchReport { results, ensured };
            let counts = report.counts();
            tracing::info!(
                created = counts.created,
                updated = counts.updated,
                unchanged = counts.unchanged,
                failed = counts.failed,
                placeholders = counts.placeholders,
                "batch written"
            );
            report
        }
        .instrument(span)
        .await
    }

    /// Drops from `order` the writes whose lookup targets could not be ensured, recording why.
    fn skip_unensured(
        &self,
        writes: &[Write],
        order: Vec<usize>,
        ensured: &EnsureReport,
        results: &mut [Option<Result<WriteOutcome>>],
    ) -> Vec<usize> {
        let failed: HashMap<&EntityRef, &Error> = ensured.failures().collect();
        if failed.is_empty() {
            return order;
        }
        order
            .into_iter()
            .filter(|&i| match unensured(&writes[i].record, &failed) {
                Some(err) => {
                    results[i] = Some(Err(err));
                    false
                }
                None => true,
            })
            .collect()
    }

    /// Writes `indices` in order, in store batches. Returns the writes worth one more try (a target vanished, or
    /// an alternate key is held by a placeholder under another id) and records every other result.
    async fn write_in_chunks(
        &self,
        writes: &[Write],
        indices: &[usize],
        results: &mut [Option<Result<WriteOutcome>>],
    ) -> Vec<usize> {
        let mut retry = Vec::new();
        for chunk in indices.chunks(self.batch_size.get()) {
            for (&i, result) in chunk
                .iter()
                .zip(self.store.write_batch(&gather(writes, chunk)).await)
            {
                if matches!(
                    result,
                    Err(Error::MissingReference { .. } | Error::DuplicateKey { .. })
                ) {
                    retry.push(i);
                }
                results[i] = Some(result);
            }
        }
        retry
    }

    /// The second and last attempt for writes that failed on a missing target or a placeholder-held key.
    async fn retry_once(
        &self,
        writes: &[Write],
        retry: Vec<usize>,
        ensured: &mut EnsureReport,
        results: &mut [Option<Result<WriteOutcome>>],
    ) {
        let mut vanished = Vec::new();
        let mut again = Vec::new();
        for i in retry {
            match &results[i] {
                Some(Err(Error::MissingReference { target, .. })) => {
                    vanished.push((**target).clone());
                    again.push((i, writes[i].clone()));
                }
                Some(Err(Error::DuplicateKey { existing, key, .. })) => {
                    match self.redirect_to_placeholder(&writes[i], *existing).await {
                        Ok(Some(redirected)) => {
                            tracing::info!(
                                write = %writes[i].record.reference,
                                placeholder = %existing,
                                key = %key,
                                "hydrating the placeholder that holds this alternate key"
                            );
                            again.push((i, redirected));
                        }
                        Ok(None) => {}
                        // Could not tell (the store failed): report that, retryable if it is, not the conflict.
                        Err(err) => results[i] = Some(Err(err)),
                    }
                }
                _ => {}
            }
        }
        if !vanished.is_empty() {
            tracing::warn!(
                targets = vanished.len(),
                "lookup targets vanished before the write; ensuring them again"
            );
            ensured.extend(self.ensure(&vanished).await);
        }
        if again.is_empty() {
            return;
        }
        let batch: Vec<Write> = again.iter().map(|(_, w)| w.clone()).collect();
        for ((i, _), result) in again.iter().zip(self.store.write_batch(&batch).await) {
            results[*i] = Some(result);
        }
    }

    /// A full write addressed to a record that does not exist, whose alternate key is held by a placeholder
    /// created under another address (say the LOB referenced the account by alternate key, and the sync now
    /// writes it by GUID): returns the write re-addressed to that placeholder, so the placeholder is hydrated
    /// instead of the write failing. Real (hydrated) records are never taken over.
    async fn redirect_to_placeholder(
        &self,
        write: &Write,
        holder: uuid::Uuid,
    ) -> Result<Option<Write>> {
        if write.precondition != Precondition::None
            || write.record.state != HydrationState::Hydrated
        {
            return Ok(None);
        }
        if self.store.read(&write.record.reference).await?.is_some() {
            return Ok(None);
        }
        let holder_ref = EntityRef {
            table: write.record.table().clone(),
            key: Key::Id(holder),
        };
        let Some(existing) = self.store.read(&holder_ref).await? else {
            return Ok(None);
        };
        if self.policy.state(&existing.record) != HydrationState::Placeholder {
            return Ok(None);
        }
        let mut record = write.record.clone();
        record.reference = holder_ref;
        // Only if it is still the same placeholder: a concurrent hydration wins and this write reports the race.
        Ok(Some(Write::if_version(record, existing.version)))
    }

    fn internal(&self, message: &str) -> Error {
        Error::Backend {
            backend: self.store.backend().to_owned(),
            message: message.into(),
            retryable: false,
            source: None,
        }
    }
}

/// The writes at `indices`: borrowed when they are a contiguous run of the input (the common in-order case),
/// gathered into a new vector when the batch was reordered.
fn gather<'a>(writes: &'a [Write], indices: &[usize]) -> Cow<'a, [Write]> {
    let contiguous = indices.windows(2).all(|w| w[1] == w[0] + 1);
    match (indices.first(), indices.last()) {
        (Some(&first), Some(&last)) if contiguous => Cow::Borrowed(&writes[first..=last]),
        _ => Cow::Owned(indices.iter().map(|&i| writes[i].clone()).collect()),
    }
}

/// [`Error::ReferenceNotEnsured`] for a record with a lookup target that could not be ensured.
fn unensured(record: &Record, failed: &HashMap<&EntityRef, &Error>) -> Option<Error> {
    if failed.is_empty() {
        return None;
    }
    let (field, target, err) = record
        .lookups
        .iter()
        .find_map(|(f, t)| failed.get(t).map(|e| (f, t, *e)))?;
    Some(Error::ReferenceNotEnsured {
        reference: Box::new(record.reference.clone()),
        field: field.clone(),
        target: Box::new(target.clone()),
        source: Box::new(err.clone()),
    })
}

/// Decides the write order and which lookup targets need ensuring.
///
/// A write that another write of the batch refers to goes first, so the target needs no placeholder; writes to
/// the same record keep their relative order. A write answers to its own address and to the alternate keys its
/// fields carry (see [`key_aliases`]). Only targets not written earlier in the batch are ensured (in a reference
/// cycle, the back edge gets a placeholder that the later write hydrates).
fn plan(writes: &[Write]) -> (Vec<usize>, Vec<&EntityRef>) {
    // Distinct targets in first-seen order: a batch of 10,000 contacts usually points at far fewer accounts.
    let mut distinct: HashSet<ByKeyValues> = HashSet::new();
    let targets: Vec<&EntityRef> = writes
        .iter()
        .flat_map(|w| w.record.lookups.values())
        .filter(|t| distinct.insert(ByKeyValues(t)))
        .collect();
    // Only a write to a table that something points at can be a target. The usual batch has none (contacts
    // pointing at accounts), and then neither aliases nor addresses need working out.
    let mut target_tables: Vec<&TableName> = Vec::new();
    for target in &targets {
        if !target_tables.contains(&&target.table) {
            target_tables.push(&target.table);
        }
    }
    let maybe_target = |w: &Write| {
        target_tables
            .iter()
            .any(|t| same_text(t.as_str(), w.record.table().as_str()))
    };
    if !writes.iter().any(maybe_target) {
        return ((0..writes.len()).collect(), targets);
    }
    let aliases = key_aliases(writes, &targets);
    let identities = |i: usize| {
        std::iter::once(&writes[i].record.reference).chain(aliases.get(i).into_iter().flatten())
    };
    let internal = (0..writes.len()).any(|i| {
        maybe_target(&writes[i])
            && identities(i).any(|address| distinct.contains(&ByKeyValues(address)))
    });
    if !internal {
        // The common case: nothing in the batch is a target of anything else in it.
        return ((0..writes.len()).collect(), targets);
    }

    // Indices are pushed in increasing order, so each list is in input order.
    let mut by_address: HashMap<ByKeyValues, Vec<usize>> = HashMap::with_capacity(writes.len());
    for i in 0..writes.len() {
        for address in identities(i) {
            by_address.entry(ByKeyValues(address)).or_default().push(i);
        }
    }
    let order = topological_order(writes, &by_address);
    let mut written: HashSet<ByKeyValues> = HashSet::with_capacity(writes.len());
    let mut queued: HashSet<ByKeyValues> = HashSet::new();
    let mut targets = Vec::new();
    for &i in &order {
        for target in writes[i].record.lookups.values() {
            if !written.contains(&ByKeyValues(target)) && queued.insert(ByKeyValues(target)) {
                targets.push(target);
            }
        }
        written.extend(identities(i).map(ByKeyValues));
    }
    (order, targets)
}

/// For each write, the other addresses it answers to: for every alternate key that a lookup in this batch uses on
/// the write's table, the key values the write carries (in its fields or its own address). So a write of an
/// account by GUID that sets `accountnumber` is recognised as the target of `account(accountnumber='…')`.
fn key_aliases(writes: &[Write], targets: &[&EntityRef]) -> Vec<Vec<EntityRef>> {
    // Few tables and key shapes per batch: linear scans, and a shape is allocated only the first time it is met.
    type Shape<'a> = Vec<(&'a ColumnName, KeyKind)>;
    let mut shapes: Vec<(&TableName, Vec<Shape>)> = Vec::new();
    for target in targets {
        let Key::Alternate(key) = &target.key else {
            continue;
        };
        let index = match shapes.iter().position(|(t, _)| *t == &target.table) {
            Some(index) => index,
            None => {
                shapes.push((&target.table, Vec::new()));
                shapes.len() - 1
            }
        };
        let shape = || key.parts().map(|(c, v)| (c, v.kind()));
        let table_shapes = &mut shapes[index].1;
        if !table_shapes.iter().any(|s| s.iter().copied().eq(shape())) {
            table_shapes.push(shape().collect());
        }
    }
    if shapes.is_empty() {
        return Vec::new();
    }
    let alias = |record: &Record, shape: &[(&ColumnName, KeyKind)]| -> Option<EntityRef> {
        let own_key = match &record.reference.key {
            Key::Alternate(key) => Some(key),
            Key::Id(_) => None,
        };
        let parts: Option<Vec<(ColumnName, KeyValue)>> = shape
            .iter()
            .map(|(column, kind)| {
                let value = own_key
                    .and_then(|k| k.get(column.as_str()).cloned())
                    .or_else(|| {
                        record
                            .field(column.as_str())
                            .and_then(|v| KeyValue::from_json(*kind, v))
                    })?;
                Some(((*column).clone(), value))
            })
            .collect();
        let alias = EntityRef::by_key(record.table(), parts?).ok()?;
        (alias != record.reference).then_some(alias)
    };
    writes
        .iter()
        .map(
            |w| match shapes.iter().find(|(t, _)| *t == w.record.table()) {
                Some((_, table_shapes)) => table_shapes
                    .iter()
                    .filter_map(|shape| alias(&w.record, shape))
                    .collect(),
                None => Vec::new(),
            },
        )
        .collect()
}

/// Kahn's algorithm, taking the lowest ready index first so the input order is kept wherever it can be.
fn topological_order(
    writes: &[Write],
    by_address: &HashMap<ByKeyValues, Vec<usize>>,
) -> Vec<usize> {
    let n = writes.len();
    let mut successors: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut indegree = vec![0usize; n];
    let mut edge = |from: usize, to: usize, successors: &mut Vec<Vec<usize>>| {
        successors[from].push(to);
        indegree[to] += 1;
    };
    for same_record in by_address.values() {
        for pair in same_record.windows(2) {
            edge(pair[0], pair[1], &mut successors);
        }
    }
    for (i, write) in writes.iter().enumerate() {
        for target in write.record.lookups.values() {
            // After the last write to the target (writes to one record are chained), so the referrer sees it whole.
            if let Some(&last) = by_address
                .get(&ByKeyValues(target))
                .and_then(|js| js.last())
                && last != i
            {
                edge(last, i, &mut successors);
            }
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| indegree[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    let mut placed = vec![false; n];
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        placed[i] = true;
        for &j in &successors[i] {
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.push(Reverse(j));
            }
        }
    }
    // Cycles: the rest keep input order; their back references are ensured as placeholders.
    order.extend((0..n).filter(|&i| !placed[i]));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(key: &str, lookups: &[&str]) -> Write {
        let mut b = Record::builder(EntityRef::by_key("t", [("k", key)]).unwrap());
        for (n, l) in lookups.iter().enumerate() {
            b = b.lookup(
                format!("l{n}"),
                EntityRef::by_key("t", [("k", *l)]).unwrap(),
            );
        }
        Write::upsert(b.build().unwrap())
    }

    fn keys(targets: &[&EntityRef]) -> Vec<String> {
        targets.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn targets_written_in_the_batch_go_first_and_need_no_placeholder() {
        let writes = vec![w("c", &["b"]), w("b", &["a"]), w("a", &["x"])];
        let (order, targets) = plan(&writes);
        assert_eq!(order, vec![2, 1, 0]);
        assert_eq!(keys(&targets), vec!["t(k='x')"]);
    }

    #[test]
    fn writes_to_one_record_keep_their_order() {
        let writes = vec![w("a", &["b"]), w("a", &[]), w("b", &[]), w("c", &["a"])];
        let (order, _) = plan(&writes);
        assert_eq!(order, vec![2, 0, 1, 3], "c waits for both writes to a");
    }

    #[test]
    fn a_write_by_guid_answers_to_the_alternate_key_its_fields_carry() {
        let by_guid = Write::upsert(
            Record::builder(EntityRef::by_id("t", uuid::Uuid::from_u128(7)).unwrap())
                .field("k", "a")
                .build()
                .unwrap(),
        );
        let writes = vec![w("c", &["a"]), by_guid];
        let (order, targets) = plan(&writes);
        assert_eq!(order, vec![1, 0]);
        assert!(targets.is_empty(), "{targets:?}");
    }

    #[test]
    fn cycles_fall_back_to_placeholders() {
        let writes = vec![w("a", &["b"]), w("b", &["a"])];
        let (order, targets) = plan(&writes);
        assert_eq!(order, vec![0, 1]);
        assert_eq!(keys(&targets), vec!["t(k='b')"]);
    }

    #[test]
    fn input_order_is_kept_where_it_already_works_and_targets_are_distinct() {
        let writes = vec![w("a", &["x"]), w("b", &["x"]), w("c", &["a"])];
        let (order, targets) = plan(&writes);
        assert_eq!(order, vec![0, 1, 2]);
        assert_eq!(keys(&targets), vec!["t(k='x')"]);
        let (order, targets) = plan(&writes[..2]);
        assert_eq!(
            (order, keys(&targets)),
            (vec![0, 1], vec!["t(k='x')".to_owned()])
        );
    }
}
