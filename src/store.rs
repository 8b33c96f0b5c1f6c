//! The storage contract: [`RecordStore`].

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::key::EntityRef;
use crate::record::{HydrationState, Record, StoredRecord, Version};

/// The condition a write must meet to be applied. A write that fails its condition changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Precondition {
    /// Upsert: update if the record exists, create it otherwise.
    #[default]
    None,
    /// Create only: fails with [`Error::AlreadyExists`] if the record exists (Dataverse `If-None-Match: *`).
    CreateOnly,
    /// Update only: fails with [`Error::NotFound`] if the record is missing (Dataverse `If-Match: *`).
    UpdateOnly,
    /// Optimistic concurrency: update only if the record is at this version, else [`Error::VersionMismatch`]
    /// ([`Error::NotFound`] if it is missing).
    MatchVersion(Version),
}

/// One write: a record and the condition it is applied under.
#[derive(Clone, Debug, PartialEq)]
pub struct Write {
    /// What to write.
    pub record: Record,
    /// When to write it.
    pub precondition: Precondition,
}

impl Write {
    /// An upsert.
    pub fn upsert(record: Record) -> Self {
        Self {
            record,
            precondition: Precondition::None,
        }
    }

    /// A create-only write.
    pub fn create_only(record: Record) -> Self {
        Self {
            record,
            precondition: Precondition::CreateOnly,
        }
    }

    /// An update-only write.
    pub fn update_only(record: Record) -> Self {
        Self {
            record,
            precondition: Precondition::UpdateOnly,
        }
    }

    /// A write applied only if the record is at `version`.
    pub fn if_version(record: Record, version: Version) -> Self {
        Self {
            record,
            precondition: Precondition::MatchVersion(version),
        }
    }
}

impl From<Record> for Write {
    fn from(record: Record) -> Self {
        Write::upsert(record)
    }
}

/// What a successful write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// The record did not exist and was created.
    Created,
    /// The record existed and at least one value changed.
    Updated,
    /// The record existed and already held these values: nothing changed, not even its version.
    Unchanged,
}

/// The result of a successful write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOutcome {
    /// The record's primary GUID.
    pub id: Uuid,
    /// Its version after the write.
    pub version: Version,
    /// Created, updated or unchanged.
    pub change: Change,
    /// Its hydration state before the write (`None` if it was created).
    pub previous_state: Option<HydrationState>,
    /// Its hydration state after the write.
    pub state: HydrationState,
}

impl WriteOutcome {
    /// True when this write is the one that made the record hold real data: it created a hydrated record or
    /// turned a placeholder into one. Stores decide this atomically with the write, so for each record exactly
    /// one successful write reports it.
    pub fn became_hydrated(&self) -> bool {
        self.state == HydrationState::Hydrated
            && self.previous_state != Some(HydrationState::Hydrated)
    }
}

/// The condition a delete must meet to be applied. A delete that fails its condition changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub enum DeletePrecondition {
    /// Delete the record whatever its version.
    #[default]
    None,
    /// Optimistic concurrency: delete only if the record is at this version, else [`Error::VersionMismatch`]
    /// (Dataverse `If-Match: <etag>`).
    MatchVersion(Version),
}

/// One delete: the record to delete, by GUID or by alternate key, and the condition it is deleted under.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delete {
    /// What to delete.
    pub reference: EntityRef,
    /// When to delete it.
    pub precondition: DeletePrecondition,
}

impl Delete {
    /// A delete of whatever version the record is at.
    pub fn new(reference: EntityRef) -> Self {
        Self {
            reference,
            precondition: DeletePrecondition::None,
        }
    }

    /// A delete applied only if the record is at `version`.
    pub fn if_version(reference: EntityRef, version: Version) -> Self {
        Self {
            reference,
            precondition: DeletePrecondition::MatchVersion(version),
        }
    }
}

impl From<EntityRef> for Delete {
    fn from(reference: EntityRef) -> Self {
        Delete::new(reference)
    }
}

/// The result of a successful delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DeleteOutcome {
    /// The record existed and was deleted. Build one with [`DeleteOutcome::deleted`].
    #[non_exhaustive]
    Deleted {
        /// Its primary GUID, when known: always when the delete addressed it by GUID; by alternate key, when the
        /// store tells (the in-memory store does, Dataverse does not).
        id: Option<Uuid>,
        /// Its hydration state just before the delete, when the store tells (the in-memory store does, Dataverse
        /// does not).
        previous_state: Option<HydrationState>,
    },
    /// No record was at the address: nothing was deleted, nothing changed.
    Absent,
}

impl DeleteOutcome {
    /// A record was deleted.
    pub fn deleted(id: Option<Uuid>, previous_state: Option<HydrationState>) -> Self {
        DeleteOutcome::Deleted { id, previous_state }
    }

    /// True when this delete removed a record, false when there was none.
    pub fn is_deleted(&self) -> bool {
        matches!(self, DeleteOutcome::Deleted { .. })
    }

    /// The deleted record's GUID, when a record was deleted and its GUID is known.
    pub fn id(&self) -> Option<Uuid> {
        match self {
            DeleteOutcome::Deleted { id, .. } => *id,
            DeleteOutcome::Absent => None,
        }
    }

    /// The deleted record's hydration state just before the delete, when a record was deleted and the store
    /// tells.
    pub fn previous_state(&self) -> Option<HydrationState> {
        match self {
            DeleteOutcome::Deleted { previous_state, .. } => *previous_state,
            DeleteOutcome::Absent => None,
        }
    }
}

/// What ensuring one reference found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ensured {
    /// The record was already there (hydrated or placeholder) and was left exactly as it was.
    Existed,
    /// It was missing; a placeholder was created with this id.
    Created {
        /// The placeholder's id.
        id: Uuid,
    },
}

/// A system of record, addressed by table and key.
///
/// # Contract
///
/// Every adapter must behave as follows; [`conformance`](crate::conformance) checks it.
///
/// * A write changes only the fields it names; `null` clears a field. A write that fails changes nothing.
/// * Fields that repeat the address's key columns must agree with it ([`Error::InvalidValue`] otherwise); the
///   primary id column is set only by addressing by id.
/// * Only declared alternate keys address records ([`Error::InvalidKey`]); alternate key values are unique
///   ([`Error::DuplicateKey`]).
/// * Every lookup target must exist, else [`Error::MissingReference`] naming it.
/// * [`Precondition`]s are checked atomically with the write.
/// * A write that changes nothing reports [`Change::Unchanged`] and does not bump the version.
/// * A record's hydration state never goes from hydrated back to placeholder; the write that makes a record
///   hydrated reports it in [`WriteOutcome::previous_state`].
/// * A delete removes the record and frees its alternate key values; the record then reads as missing and can be
///   created again. Deleting a record that is not there succeeds with [`DeleteOutcome::Absent`], also under a
///   version condition (the record is gone either way), so deletes can be repeated. A delete whose version
///   condition fails is [`Error::VersionMismatch`] and changes nothing.
/// * What a delete does to records whose lookups point at the deleted one is the backend's business (Dataverse
///   applies the relationship's cascade settings; the in-memory store leaves those lookups as they are).
/// * Transient failures are reported as errors whose [`Error::is_retryable`] is true.
///
/// # Implementing
///
/// Implement [`read`](Self::read), [`write`](Self::write) and [`delete`](Self::delete). Override [`write_batch`](Self::write_batch) when the
/// backend can do better than one call per write, and [`ensure_placeholders`](Self::ensure_placeholders) when it
/// has a faster way to create-if-missing than create-only writes. [`EnsureExists`](crate::EnsureExists) comes for
/// free.
#[async_trait]
pub trait RecordStore: Send + Sync + Debug {
    /// A short name for errors and traces, such as `memory:eu` or the Dataverse host.
    fn backend(&self) -> &str;

    /// Reads a record. `Ok(None)` if it does not exist.
    async fn read(&self, reference: &EntityRef) -> Result<Option<StoredRecord>>;

    /// Applies one write. Writes are borrowed so that callers can resend them (retries, re-ensure).
    async fn write(&self, write: &Write) -> Result<WriteOutcome>;

    /// Deletes one record, under its [`DeletePrecondition`]. Deleting a record that is not there is not an error:
    /// it reports [`DeleteOutcome::Absent`], so a delete can be retried or redelivered safely. An address the
    /// table does not declare is [`Error::InvalidKey`] (or [`Error::UnknownTable`]).
    async fn delete(&self, delete: &Delete) -> Result<DeleteOutcome>;

    /// Applies writes in order and returns one result per write, in the same order. One failure does not stop
    /// or hide the others, and a failed item changes nothing.
    async fn write_batch(&self, writes: &[Write]) -> Vec<Result<WriteOutcome>> {
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            results.push(self.write(write).await);
        }
        results
    }

    /// Creates each placeholder unless a record already exists at its address, leaving existing records
    /// untouched. One result per placeholder, in order.
    ///
    /// The default sends the placeholders as create-only writes in one [`write_batch`](Self::write_batch) and
    /// reads [`Error::AlreadyExists`] as [`Ensured::Existed`]; this is race-free because the store checks
    /// create-only atomically.
    async fn ensure_placeholders(&self, placeholders: Vec<Record>) -> Vec<Result<Ensured>> {
        let writes: Vec<Write> = placeholders.into_iter().map(Write::create_only).collect();
        self.write_batch(&writes)
            .await
            .into_iter()
            .map(|result| match result {
                Ok(outcome) => Ok(Ensured::Created { id: outcome.id }),
                Err(Error::AlreadyExists { .. }) => Ok(Ensured::Existed),
                Err(err) => Err(err),
            })
            .collect()
    }

    /// Ensures placeholders (as [`ensure_placeholders`](Self::ensure_placeholders)), then applies writes that
    /// may refer to them (as [`write_batch`](Self::write_batch)). A store that can send both in one request
    /// overrides it: the Dataverse adapter puts them in one `$batch`, placeholders first, so ensure-then-write
    /// costs one round trip. Either part may be empty; an empty part makes no store call.
    async fn ensure_then_write(
        &self,
        placeholders: Vec<Record>,
        writes: &[Write],
    ) -> (Vec<Result<Ensured>>, Vec<Result<WriteOutcome>>) {
        let ensured = if placeholders.is_empty() {
            Vec::new()
        } else {
            self.ensure_placeholders(placeholders).await
        };
        let written = if writes.is_empty() {
            Vec::new()
        } else {
            self.write_batch(writes).await
        };
        (ensured, written)
    }
}

macro_rules! forward_record_store {
    ($($ptr:ty),*) => {$(
        #[async_trait]
        impl<S: RecordStore + ?Sized> RecordStore for $ptr {
            fn backend(&self) -> &str {
                (**self).backend()
            }
            async fn read(&self, reference: &EntityRef) -> Result<Option<StoredRecord>> {
                (**self).read(reference).await
            }
            async fn write(&self, write: &Write) -> Result<WriteOutcome> {
                (**self).write(write).await
            }
            async fn delete(&self, delete: &Delete) -> Result<DeleteOutcome> {
                (**self).delete(delete).await
            }
            async fn write_batch(&self, writes: &[Write]) -> Vec<Result<WriteOutcome>> {
                (**self).write_batch(writes).await
            }
            async fn ensure_placeholders(&self, placeholders: Vec<Record>) -> Vec<Result<Ensured>> {
                (**self).ensure_placeholders(placeholders).await
            }
            async fn ensure_then_write(
                &self,
                placeholders: Vec<Record>,
                writes: &[Write],
            ) -> (Vec<Result<Ensured>>, Vec<Result<WriteOutcome>>) {
                (**self).ensure_then_write(placeholders, writes).await
            }
        }
    )*};
}

// Wrappers forward every method, so a store's faster overrides survive being put behind a pointer.
forward_record_store!(Arc<S>, Box<S>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ensure::EnsureExists;

    fn assert_store<S: RecordStore + EnsureExists + 'static>() {}
    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn trait_objects_and_pointers_are_stores() {
        assert_store::<Arc<dyn RecordStore>>();
        assert_store::<Box<dyn RecordStore>>();
        assert_store::<Arc<Box<dyn RecordStore>>>();
    }

    #[allow(dead_code)]
    fn ensure_futures_are_send(store: Arc<dyn RecordStore>, policy: &crate::Policies) {
        // Compile-time only: callers spawn these futures on multi-threaded runtimes.
        assert_send(&store.ensure_exists(&[], policy));
        let reference = EntityRef::by_id("t", Uuid::from_u128(1)).unwrap();
        assert_send(&store.read(&reference));
        let delete = Delete::new(reference);
        assert_send(&store.delete(&delete));
    }

    #[test]
    fn delete_outcomes_say_what_was_deleted() {
        let id = Uuid::from_u128(7);
        let deleted = DeleteOutcome::deleted(Some(id), Some(HydrationState::Placeholder));
        assert!(deleted.is_deleted());
        assert_eq!(deleted.id(), Some(id));
        assert_eq!(deleted.previous_state(), Some(HydrationState::Placeholder));
        let absent = DeleteOutcome::Absent;
        assert!(!absent.is_deleted());
        assert_eq!((absent.id(), absent.previous_state()), (None, None));
        assert_eq!(serde_json::to_value(absent).unwrap(), "absent");
        let round_trip: DeleteOutcome =
            serde_json::from_value(serde_json::to_value(deleted).unwrap()).unwrap();
        assert_eq!(round_trip, deleted);
    }
}
