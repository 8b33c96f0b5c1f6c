//! Null-field guards and hydration hooks.
//!
//! A placeholder's non-key fields are unknown, not null. [`Guarded`] makes that visible in the types: reading a
//! field a placeholder does not have yet is an [`Error::NotHydrated`] naming table, key and field, never a silent
//! `None` (the `NullReferenceException` this pattern is known for). [`HydrationHooks`] moves logic meant to run
//! "on create" to the moment a record first holds real data.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::hydration::{HydrationPolicy, PlaceholderAction};
use crate::key::EntityRef;
use crate::name::{ColumnName, TableName};
use crate::record::{HydrationState, Record};
use crate::store::WriteOutcome;

/// Whether guarded business logic may run now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proceed {
    /// Run it.
    Now,
    /// The record is a placeholder and the policy says to wait: run it from a hydration hook instead.
    Deferred,
}

/// A record seen through its table's [`HydrationPolicy`]: typed field access that refuses to make up nulls.
#[derive(Debug, Clone, Copy)]
pub struct Guarded<'a> {
    record: &'a Record,
    state: HydrationState,
    policy: &'a dyn HydrationPolicy,
}

impl<'a> Guarded<'a> {
    /// Wraps `record`, deciding its state with `policy`.
    pub fn new(record: &'a Record, policy: &'a dyn HydrationPolicy) -> Self {
        Self {
            record,
            state: policy.state(record),
            policy,
        }
    }

    /// Placeholder or hydrated, as the policy sees it.
    pub fn state(&self) -> HydrationState {
        self.state
    }

    /// True while the record awaits the sync.
    pub fn is_placeholder(&self) -> bool {
        self.state == HydrationState::Placeholder
    }

    /// The record.
    pub fn record(&self) -> &'a Record {
        self.record
    }

    fn reference(&self) -> Box<EntityRef> {
        Box::new(self.record.reference.clone())
    }

    /// A nullable field. `Ok(None)` means the field is really null (the record is hydrated); on a placeholder a
    /// field it does not hold is [`Error::NotHydrated`]. The fields a placeholder does hold (its key, its label)
    /// are returned as they are.
    pub fn get<T: DeserializeOwned>(&self, field: &str) -> Result<Option<T>> {
        let column = ColumnName::new(field)?;
        match self.record.field(field) {
            Some(value) => T::deserialize(value)
                .map(Some)
                .map_err(|err| Error::FieldType {
                    reference: self.reference(),
                    field: column,
                    reason: err.to_string(),
                }),
            None if self.is_placeholder() => Err(Error::NotHydrated {
                reference: self.reference(),
                field: column,
            }),
            None => Ok(None),
        }
    }

    /// A field that must have a value: [`Error::NotHydrated`] on a placeholder that lacks it,
    /// [`Error::FieldNull`] on a hydrated record where it is null.
    pub fn require<T: DeserializeOwned>(&self, field: &str) -> Result<T> {
        let column = ColumnName::new(field)?;
        self.get(field)?.ok_or_else(|| Error::FieldNull {
            reference: self.reference(),
            field: column,
        })
    }

    /// A lookup, guarded the same way as [`get`](Self::get).
    pub fn lookup(&self, name: &str) -> Result<Option<&'a EntityRef>> {
        let column = ColumnName::new(name)?;
        match self.record.lookups.get(name) {
            Some(target) => Ok(Some(target)),
            None if self.is_placeholder() => Err(Error::NotHydrated {
                reference: self.reference(),
                field: column,
            }),
            None => Ok(None),
        }
    }

    /// Consults the policy before business logic named `operation` runs: [`Proceed::Now`] on hydrated records
    /// and allowed operations, [`Proceed::Deferred`] when the policy defers, [`Error::PlaceholderRejected`]
    /// when it rejects.
    pub fn check(&self, operation: &str) -> Result<Proceed> {
        if !self.is_placeholder() {
            return Ok(Proceed::Now);
        }
        match self.policy.on_placeholder(self.record.table(), operation) {
            PlaceholderAction::Allow => Ok(Proceed::Now),
            PlaceholderAction::Defer => Ok(Proceed::Deferred),
            PlaceholderAction::Reject => Err(Error::PlaceholderRejected {
                reference: self.reference(),
                operation: operation.to_owned(),
            }),
        }
    }
}

/// A record that has just become hydrated, as passed to hooks.
#[derive(Debug, Clone, Copy)]
pub struct HydratedRecord<'a> {
    /// Its primary GUID.
    pub id: Uuid,
    /// The write that hydrated it (only the fields that write carried).
    pub record: &'a Record,
    /// `Some(Placeholder)` when a placeholder was hydrated, `None` when the record was created hydrated.
    pub previous_state: Option<HydrationState>,
}

impl HydratedRecord<'_> {
    /// True when this hydrated a placeholder (rather than creating the record with real data).
    pub fn was_placeholder(&self) -> bool {
        self.previous_state == Some(HydrationState::Placeholder)
    }
}

type Hook = Arc<dyn Fn(&HydratedRecord<'_>) + Send + Sync>;
type OneShot = Box<dyn FnOnce(&HydratedRecord<'_>) + Send>;

/// Callbacks run when a record first holds real data: created hydrated, or a placeholder hydrated.
///
/// The [`EnsuringWriter`](crate::EnsuringWriter) calls [`notify`](Self::notify) for each write whose outcome
/// [`became_hydrated`](crate::WriteOutcome::became_hydrated); the store decides that atomically, so each record
/// triggers its hooks once, however many writers race. Hooks are plain functions: keep them short, or hand the
/// work to a channel or a task. Delivery is in-process: a crash between the write and the hook loses the call
/// (a durable outbox belongs to the sync pipeline's ledger).
#[derive(Default)]
pub struct HydrationHooks {
    inner: Mutex<HooksInner>,
}

#[derive(Default)]
struct HooksInner {
    per_table: HashMap<TableName, Vec<Hook>>,
    deferred: HashMap<(TableName, Uuid), Vec<OneShot>>,
}

impl fmt::Debug for HydrationHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("HydrationHooks")
            .field("tables", &inner.per_table.keys().collect::<Vec<_>>())
            .field("deferred", &inner.deferred.len())
            .finish()
    }
}

impl HydrationHooks {
    /// No hooks.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HooksInner> {
        // A panicking hook must not disable hydration notifications for everyone else.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `hook` for every record of `table` that becomes hydrated: the place for "on create" logic that needs
    /// real data.
    pub fn on_hydrated(
        &self,
        table: &TableName,
        hook: impl Fn(&HydratedRecord<'_>) + Send + Sync + 'static,
    ) {
        self.lock()
            .per_table
            .entry(table.clone())
            .or_default()
            .push(Arc::new(hook));
    }

    /// Runs `task` once, when the record `id` of `table` becomes hydrated (for operations a guard
    /// [deferred](Proceed::Deferred)).
    pub fn defer(
        &self,
        table: &TableName,
        id: Uuid,
        task: impl FnOnce(&HydratedRecord<'_>) + Send + 'static,
    ) {
        self.lock()
            .deferred
            .entry((table.clone(), id))
            .or_default()
            .push(Box::new(task));
    }

    /// True when nothing is registered, so writers can skip notifying.
    pub fn is_empty(&self) -> bool {
        let inner = self.lock();
        inner.per_table.is_empty() && inner.deferred.is_empty()
    }

    /// How many deferred tasks are waiting.
    pub fn pending(&self) -> usize {
        self.lock().deferred.values().map(Vec::len).sum()
    }

    /// Runs the hooks for a record that just became hydrated. Called by the writer; call it yourself only for
    /// writes made around it.
    pub fn notify(&self, outcome: &WriteOutcome, record: &Record) {
        let id = outcome.id;
        let (hooks, tasks) = {
            let mut inner = self.lock();
            let hooks = inner
                .per_table
                .get(record.table())
                .cloned()
                .unwrap_or_default();
            let tasks = inner
                .deferred
                .remove(&(record.table().clone(), id))
                .unwrap_or_default();
            (hooks, tasks)
        };
        // Run outside the lock so a hook may register more hooks.
        let event = HydratedRecord {
            id,
            record,
            previous_state: outcome.previous_state,
        };
        for hook in hooks {
            hook(&event);
        }
        for task in tasks {
            task(&event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hydration::{Policies, TablePolicy};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn policy() -> Policies {
        Policies::builder()
            .table(
                "account",
                TablePolicy::builder()
                    .primary_name("name")
                    .on_placeholder("quote", PlaceholderAction::Allow)
                    .on_placeholder("invoice", PlaceholderAction::Defer),
            )
            .build()
            .unwrap()
    }

    fn placeholder(policy: &Policies) -> Record {
        policy
            .placeholder(&EntityRef::by_key("account", [("accountnumber", "A-1")]).unwrap())
            .unwrap()
    }

    #[test]
    fn placeholder_fields_are_not_hydrated_errors() {
        let policy = policy();
        let record = placeholder(&policy);
        let g = Guarded::new(&record, &policy);
        assert!(g.is_placeholder());
        assert_eq!(g.require::<String>("accountnumber").unwrap(), "A-1");
        let err = g.get::<String>("telephone1").unwrap_err();
        assert!(
            matches!(&err, Error::NotHydrated { field, .. } if field.as_str() == "telephone1"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "account(accountnumber='A-1') is a placeholder awaiting sync: field 'telephone1' is not available until it is hydrated"
        );
        assert!(matches!(
            g.lookup("primarycontactid"),
            Err(Error::NotHydrated { .. })
        ));
    }

    #[test]
    fn hydrated_nulls_are_none_or_field_null() {
        let policy = policy();
        let record =
            Record::builder(EntityRef::by_key("account", [("accountnumber", "A-1")]).unwrap())
                .field("name", "Fabrikam")
                .field("revenue", "lots")
                .field("fax", serde_json::Value::Null)
                .build()
                .unwrap();
        let g = Guarded::new(&record, &policy);
        assert_eq!(g.get::<String>("fax").unwrap(), None);
        assert!(matches!(
            g.require::<String>("fax"),
            Err(Error::FieldNull { .. })
        ));
        assert!(matches!(
            g.get::<f64>("revenue"),
            Err(Error::FieldType { .. })
        ));
        assert!(matches!(
            g.get::<String>("bad name"),
            Err(Error::InvalidName { .. })
        ));
        assert_eq!(g.check("anything").unwrap(), Proceed::Now);
    }

    #[test]
    fn checks_follow_the_policy() {
        let policy = policy();
        let record = placeholder(&policy);
        let g = Guarded::new(&record, &policy);
        assert_eq!(g.check("quote").unwrap(), Proceed::Now);
        assert_eq!(g.check("invoice").unwrap(), Proceed::Deferred);
        assert!(
            matches!(g.check("ship"), Err(Error::PlaceholderRejected { operation, .. }) if operation == "ship")
        );
    }

    #[test]
    fn hooks_fire_per_table_and_deferred_tasks_once() {
        let hooks = HydrationHooks::new();
        let account = TableName::new("account").unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let ran = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        hooks.on_hydrated(&account, move |_| {
            s.fetch_add(1, Ordering::SeqCst);
        });
        let id = Uuid::new_v4();
        let r = ran.clone();
        hooks.defer(&account, id, move |h| {
            assert_eq!(h.id, id);
            assert!(h.was_placeholder());
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(hooks.pending(), 1);
        let record = placeholder(&policy());
        let outcome = WriteOutcome {
            id,
            version: crate::Version(2),
            change: crate::Change::Updated,
            previous_state: Some(HydrationState::Placeholder),
            state: HydrationState::Hydrated,
        };
        hooks.notify(&outcome, &record);
        hooks.notify(&outcome, &record);
        assert_eq!(
            seen.load(Ordering::SeqCst),
            2,
            "table hooks run on every notification"
        );
        assert_eq!(ran.load(Ordering::SeqCst), 1, "a deferred task runs once");
        assert_eq!(hooks.pending(), 0);
    }
}
