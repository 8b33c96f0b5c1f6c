//! [`EnsureExists`]: make every referenced record exist, creating placeholders for the missing ones and changing
//! nothing at all for the others.

use std::collections::HashSet;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::hydration::HydrationPolicy;
use crate::key::{ByKeyValues, EntityRef};
use crate::store::{Ensured, RecordStore, Write, WriteOutcome};

/// Makes records exist. Every [`RecordStore`] implements it; a store tunes it by overriding
/// [`RecordStore::ensure_placeholders`].
#[async_trait]
pub trait EnsureExists {
    /// Ensures each reference exists. References are de-duplicated (first occurrence kept). Missing records get
    /// the placeholder `policy` describes, created with a create-only write; existing records, hydrated or
    /// placeholder, are left exactly as they were. Concurrent calls for the same key create one record and all
    /// succeed. A failure for one reference does not affect the others.
    async fn ensure_exists(
        &self,
        references: &[EntityRef],
        policy: &dyn HydrationPolicy,
    ) -> EnsureReport;
}

#[async_trait]
impl<S: RecordStore + ?Sized> EnsureExists for S {
    async fn ensure_exists(
        &self,
        references: &[EntityRef],
        policy: &dyn HydrationPolicy,
    ) -> EnsureReport {
        let mut seen = HashSet::with_capacity(references.len());
        let unique: Vec<&EntityRef> = references
            .iter()
            .filter(|r| seen.insert(ByKeyValues(r)))
            .collect();
        ensure_then_write(self, &unique, policy, &[]).await.0
    }
}

/// Ensures `unique` (distinct references: the caller de-duplicates, the writer's plan already has) and applies
/// `writes` in one [`RecordStore::ensure_then_write`] call (one round trip for a store that batches): asks
/// `policy` for each placeholder and reports one item per reference, in order. No store call when there is
/// nothing to ensure or write.
pub(crate) async fn ensure_then_write<S: RecordStore + ?Sized>(
    store: &S,
    unique: &[&EntityRef],
    policy: &dyn HydrationPolicy,
    writes: &[Write],
) -> (EnsureReport, Vec<Result<WriteOutcome>>) {
    let mut results: Vec<Option<Result<Ensured>>> = Vec::with_capacity(unique.len());
    let mut placeholders = Vec::with_capacity(unique.len());
    for reference in unique {
        match policy.placeholder(reference) {
            Ok(placeholder) => {
                placeholders.push(placeholder);
                results.push(None);
            }
            Err(err) => results.push(Some(Err(err))),
        }
    }
    // No store call when there is nothing to do: for an HTTP store that would be a wasted request.
    let (created, written) = if placeholders.is_empty() && writes.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        store.ensure_then_write(placeholders, writes).await
    };
    let lost = |what: &str| Error::Backend {
        backend: store.backend().to_owned(),
        message: format!("ensure_then_write returned fewer results than {what}"),
        retryable: false,
        source: None,
    };
    let mut created = created.into_iter();
    let items: Vec<EnsureItem> = unique
        .iter()
        .zip(results)
        .map(|(&reference, result)| EnsureItem {
            reference: reference.clone(),
            result: result
                .or_else(|| created.next())
                .unwrap_or_else(|| Err(lost("placeholders"))),
        })
        .collect();
    let mut written = written.into_iter();
    let written = writes
        .iter()
        .map(|_| written.next().unwrap_or_else(|| Err(lost("writes"))))
        .collect();
    let report = EnsureReport { items };
    tracing::debug!(
        backend = store.backend(),
        created = report.created().count(),
        existed = report.existed().count(),
        failed = report.failures().count(),
        "ensured references"
    );
    (report, written)
}

/// The outcome of ensuring one reference.
#[derive(Debug)]
pub struct EnsureItem {
    /// The reference.
    pub reference: EntityRef,
    /// Whether it existed, was created, or could not be ensured.
    pub result: Result<Ensured>,
}

/// What [`EnsureExists::ensure_exists`] did, one item per distinct reference, in first-seen order.
#[derive(Debug, Default)]
pub struct EnsureReport {
    /// One entry per distinct reference.
    pub items: Vec<EnsureItem>,
}

impl EnsureReport {
    /// References that got a placeholder.
    pub fn created(&self) -> impl Iterator<Item = &EntityRef> {
        self.items
            .iter()
            .filter(|i| matches!(i.result, Ok(Ensured::Created { .. })))
            .map(|i| &i.reference)
    }

    /// The placeholders created: reference and new id.
    pub fn placeholders(&self) -> impl Iterator<Item = (&EntityRef, uuid::Uuid)> {
        self.items.iter().filter_map(|i| match i.result {
            Ok(Ensured::Created { id }) => Some((&i.reference, id)),
            _ => None,
        })
    }

    /// References that already existed.
    pub fn existed(&self) -> impl Iterator<Item = &EntityRef> {
        self.items
            .iter()
            .filter(|i| matches!(i.result, Ok(Ensured::Existed)))
            .map(|i| &i.reference)
    }

    /// References that could not be ensured, with why.
    pub fn failures(&self) -> impl Iterator<Item = (&EntityRef, &Error)> {
        self.items
            .iter()
            .filter_map(|i| i.result.as_ref().err().map(|e| (&i.reference, e)))
    }

    /// Whether every reference now exists.
    pub fn is_complete(&self) -> bool {
        self.items.iter().all(|i| i.result.is_ok())
    }

    /// `Ok(self)` if every reference exists, else the first failure.
    pub fn into_result(mut self) -> Result<Self> {
        match self.items.iter().position(|i| i.result.is_err()) {
            None => Ok(self),
            Some(first) => match self.items.swap_remove(first).result {
                Err(err) => Err(err),
                Ok(_) => Ok(self),
            },
        }
    }

    /// Appends another report (used when a write re-ensures targets).
    pub fn extend(&mut self, other: EnsureReport) {
        self.items.extend(other.items);
    }
}
