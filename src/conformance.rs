//! The [`RecordStore`] + [`EnsureExists`] contract as reusable async scenarios.
//!
//! Every adapter runs the same scenarios against a store that holds the tables of [`schema`]: the in-memory
//! store in this crate's tests, the Dataverse adapter against its emulator, and your own adapter in yours:
//!
//! ```
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() {
//! use std::sync::Arc;
//! use eventual_upsert::{conformance, memory::MemoryStore, RecordStore};
//! let store: Arc<dyn RecordStore> = Arc::new(MemoryStore::new(conformance::schema()));
//! conformance::run_all(&store).await;
//! # }
//! ```
//!
//! Scenarios panic (like `assert!`) on the first broken rule, naming it. Each one works on fresh keys with a
//! random prefix, so they can share a store, run concurrently, and run against a live system that cannot be
//! wiped. Not covered by semver: scenarios are added as the contract grows.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::json;
use uuid::Uuid;

use crate::ensure::EnsureExists;
use crate::error::Error;
use crate::hydration::{Policies, TablePolicy};
use crate::key::{EntityRef, KeyKind, KeyValue};
use crate::record::{HydrationState, Record, Version};
use crate::schema::{ColumnType, Schema, TableSchema};
use crate::store::{Change, Delete, DeleteOutcome, Ensured, RecordStore, Write};

/// The tables the scenarios use:
///
/// * `account`: primary name `name`, alternate keys `accountnumber` (string) and `new_sourceid` (GUID), typed
///   columns `telephone1` (string), `revenue` (decimal), `numberofemployees` (integer);
/// * `contact`: primary name `fullname`, composite alternate key (`emailaddress1` string, `new_externalid`
///   integer), lookup `parentcustomerid` → `account`, typed column `jobtitle` (string).
pub fn schema() -> Schema {
    let tables = [
        TableSchema::builder("account")
            .primary_name("name")
            .alternate_key([("accountnumber", KeyKind::String)])
            .alternate_key([("new_sourceid", KeyKind::Guid)])
            .column("telephone1", ColumnType::String)
            .column("revenue", ColumnType::Decimal)
            .column("numberofemployees", ColumnType::Integer)
            .build(),
        TableSchema::builder("contact")
            .primary_name("fullname")
            .alternate_key([
                ("emailaddress1", KeyKind::String),
                ("new_externalid", KeyKind::Integer),
            ])
            .lookup("parentcustomerid", "account")
            .column("jobtitle", ColumnType::String)
            .build(),
    ];
    let tables: Vec<TableSchema> = tables
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}"));
    Schema::new(tables).unwrap_or_else(|e| panic!("{e}"))
}

/// The placeholder policy the scenarios ensure with: labels in the primary name columns.
pub fn policy() -> Policies {
    Policies::builder()
        .table("account", TablePolicy::builder().primary_name("name"))
        .table("contact", TablePolicy::builder().primary_name("fullname"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs every scenario, one after the other.
pub async fn run_all(store: &Arc<dyn RecordStore>) {
    create_read_update(store).await;
    unchanged_write_keeps_version(store).await;
    null_clears_a_field(store).await;
    ensure_creates_missing_and_leaves_existing_untouched(store).await;
    ensure_deduplicates_references(store).await;
    concurrent_ensure_creates_exactly_one(store).await;
    create_only_on_existing_leaves_it_untouched(store).await;
    update_only_on_missing_fails(store).await;
    stale_version_is_rejected(store).await;
    missing_lookup_target_is_named(store).await;
    lookups_resolve_by_id_and_by_key(store).await;
    batch_reports_every_item(store).await;
    composite_alternate_keys(store).await;
    alternate_keys_are_unique(store).await;
    placeholder_never_downgrades_hydrated(store).await;
    bad_input_is_a_typed_error(store).await;
    delete_by_id_then_create_again(store).await;
    delete_by_alternate_key(store).await;
    delete_of_a_missing_record_is_absent_every_time(store).await;
    delete_with_a_stale_version_is_rejected(store).await;
    delete_a_placeholder(store).await;
}

fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

fn account(number: &str) -> EntityRef {
    EntityRef::by_key("account", [("accountnumber", number)]).unwrap_or_else(|e| panic!("{e}"))
}

fn contact(email: &str, external_id: i64) -> EntityRef {
    EntityRef::by_key(
        "contact",
        [
            ("emailaddress1", KeyValue::from(email)),
            ("new_externalid", external_id.into()),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn record(reference: &EntityRef, fields: serde_json::Value) -> Record {
    let mut record = Record::new(reference.clone());
    if let serde_json::Value::Object(map) = fields {
        for (column, value) in map {
            let column = crate::ColumnName::new(column).unwrap_or_else(|e| panic!("{e}"));
            record.fields.insert(column, value);
        }
    }
    record
}

async fn must_read(store: &Arc<dyn RecordStore>, reference: &EntityRef) -> crate::StoredRecord {
    match store.read(reference).await {
        Ok(Some(found)) => found,
        other => panic!("reading {reference}: expected a record, got {other:?}"),
    }
}

async fn must_be_absent(store: &Arc<dyn RecordStore>, reference: &EntityRef, why: &str) {
    match store.read(reference).await {
        Ok(None) => {}
        other => panic!("{why}: {reference} should not exist, read gave {other:?}"),
    }
}

async fn must_write(store: &Arc<dyn RecordStore>, write: Write) -> crate::WriteOutcome {
    let reference = write.record.reference.clone();
    store
        .write(&write)
        .await
        .unwrap_or_else(|e| panic!("writing {reference}: {e}"))
}

async fn must_delete(store: &Arc<dyn RecordStore>, delete: Delete) -> DeleteOutcome {
    store
        .delete(&delete)
        .await
        .unwrap_or_else(|e| panic!("deleting {}: {e}", delete.reference))
}

fn by_id(id: Uuid) -> EntityRef {
    EntityRef::by_id("account", id).unwrap_or_else(|e| panic!("{e}"))
}

/// Create by alternate key, read back by key and by id, update, and see versions grow.
pub async fn create_read_update(store: &Arc<dyn RecordStore>) {
    let number = fresh("crud");
    let r = account(&number);
    let created = must_write(
        store,
        Write::upsert(record(&r, json!({"name": "Fabrikam", "revenue": 1.5}))),
    )
    .await;
    assert_eq!(
        created.change,
        Change::Created,
        "an upsert of a missing record creates it"
    );
    assert_eq!(created.previous_state, None);
    let read = must_read(store, &r).await;
    assert_eq!(read.id, created.id, "read by key finds the created id");
    assert_eq!(read.version, created.version);
    assert_eq!(read.record.field("name"), Some(&json!("Fabrikam")));
    assert_eq!(
        read.record.field("accountnumber"),
        Some(&json!(number)),
        "the key values are stored as fields"
    );
    let by_id = must_read(
        store,
        &EntityRef::by_id("account", created.id).unwrap_or_else(|e| panic!("{e}")),
    )
    .await;
    assert_eq!(
        by_id.record.fields, read.record.fields,
        "read by id and by key see the same record"
    );

    let updated = must_write(
        store,
        Write::upsert(record(&r, json!({"telephone1": "+1 555"}))),
    )
    .await;
    assert_eq!(updated.change, Change::Updated);
    assert_eq!(updated.id, created.id);
    assert!(
        updated.version > created.version,
        "an update bumps the version"
    );
    let read = must_read(store, &r).await;
    assert_eq!(
        read.record.field("name"),
        Some(&json!("Fabrikam")),
        "fields a write does not name are kept"
    );
    assert_eq!(read.record.field("telephone1"), Some(&json!("+1 555")));
}

/// Writing the values a record already holds changes nothing, not even the version.
pub async fn unchanged_write_keeps_version(store: &Arc<dyn RecordStore>) {
    let r = account(&fresh("same"));
    let first = must_write(store, Write::upsert(record(&r, json!({"name": "Same"})))).await;
    let again = must_write(store, Write::upsert(record(&r, json!({"name": "Same"})))).await;
    assert_eq!(again.change, Change::Unchanged);
    assert_eq!(
        again.version, first.version,
        "an unchanged write keeps the version"
    );
    assert_eq!(must_read(store, &r).await.version, first.version);
}

/// `null` in a write clears the field.
pub async fn null_clears_a_field(store: &Arc<dyn RecordStore>) {
    let r = account(&fresh("null"));
    must_write(
        store,
        Write::upsert(record(&r, json!({"name": "N", "telephone1": "1"}))),
    )
    .await;
    let cleared = must_write(
        store,
        Write::upsert(record(&r, json!({"telephone1": null}))),
    )
    .await;
    assert_eq!(cleared.change, Change::Updated);
    assert_eq!(must_read(store, &r).await.record.field("telephone1"), None);
}

/// Missing → placeholder; existing (hydrated or placeholder) → exactly as it was.
pub async fn ensure_creates_missing_and_leaves_existing_untouched(store: &Arc<dyn RecordStore>) {
    let policy = policy();
    let hydrated = account(&fresh("hyd"));
    let before = must_write(
        store,
        Write::upsert(record(
            &hydrated,
            json!({"name": "Real", "telephone1": "1"}),
        )),
    )
    .await;
    let missing = account(&fresh("miss"));
    let guid = EntityRef::by_id("account", Uuid::new_v4()).unwrap_or_else(|e| panic!("{e}"));

    let report = store
        .ensure_exists(&[hydrated.clone(), missing.clone(), guid.clone()], &policy)
        .await;
    assert!(report.is_complete(), "ensure failed: {report:?}");
    assert_eq!(report.existed().collect::<Vec<_>>(), [&hydrated]);
    assert_eq!(report.created().collect::<Vec<_>>(), [&missing, &guid]);

    let after = must_read(store, &hydrated).await;
    assert_eq!(
        after.version, before.version,
        "ensure must not touch an existing record, not even its version"
    );
    assert_eq!(after.record.field("name"), Some(&json!("Real")));
    assert_eq!(after.record.state, HydrationState::Hydrated);

    let placeholder = must_read(store, &missing).await;
    assert_eq!(placeholder.record.state, HydrationState::Placeholder);
    let number = match &missing.key {
        crate::Key::Alternate(key) => key.get("accountnumber").map(KeyValue::to_json),
        crate::Key::Id(_) => None,
    };
    assert_eq!(
        placeholder.record.field("accountnumber"),
        number.as_ref(),
        "a placeholder holds its key"
    );
    assert!(
        placeholder.record.field("telephone1").is_none(),
        "a placeholder holds only its key and label"
    );
    let by_guid = must_read(store, &guid).await;
    assert_eq!(
        Some(by_guid.id),
        guid.id(),
        "a placeholder for a GUID reference gets that GUID"
    );

    let again = store
        .ensure_exists(std::slice::from_ref(&missing), &policy)
        .await;
    assert_eq!(
        again.existed().count(),
        1,
        "a placeholder counts as existing"
    );
    assert_eq!(
        must_read(store, &missing).await.version,
        placeholder.version,
        "ensuring a placeholder leaves it"
    );
}

/// The same reference twice in one call is ensured once.
pub async fn ensure_deduplicates_references(store: &Arc<dyn RecordStore>) {
    let r = account(&fresh("dedup"));
    let report = store
        .ensure_exists(&[r.clone(), r.clone(), r.clone()], &policy())
        .await;
    assert_eq!(
        report.items.len(),
        1,
        "references are de-duplicated within a call"
    );
    assert_eq!(report.created().count(), 1);
}

/// Many tasks ensuring one key at the same moment: one creates, all succeed.
pub async fn concurrent_ensure_creates_exactly_one(store: &Arc<dyn RecordStore>) {
    const TASKS: usize = 32;
    for reference in [
        account(&fresh("race")),
        EntityRef::by_id("account", Uuid::new_v4()).unwrap_or_else(|e| panic!("{e}")),
    ] {
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..TASKS {
            let (store, reference, barrier) = (store.clone(), reference.clone(), barrier.clone());
            tasks.spawn(async move {
                barrier.wait().await;
                store
                    .ensure_exists(std::slice::from_ref(&reference), &policy())
                    .await
            });
        }
        let mut created = BTreeSet::new();
        let mut existed = 0;
        while let Some(joined) = tasks.join_next().await {
            let report = joined.unwrap_or_else(|e| panic!("ensure task panicked: {e}"));
            for item in report.items {
                match item.result {
                    Ok(Ensured::Created { id }) => {
                        created.insert(id);
                    }
                    Ok(Ensured::Existed) => existed += 1,
                    Err(e) => panic!("concurrent ensure of {reference} failed: {e}"),
                }
            }
        }
        assert_eq!(created.len(), 1, "exactly one task creates {reference}");
        assert_eq!(existed, TASKS - 1, "every other task sees it existing");
        assert_eq!(
            created.first().copied(),
            Some(must_read(store, &reference).await.id)
        );
    }
}

/// Create-only on an existing record fails and changes nothing.
pub async fn create_only_on_existing_leaves_it_untouched(store: &Arc<dyn RecordStore>) {
    let r = account(&fresh("co"));
    let before = must_write(
        store,
        Write::upsert(record(&r, json!({"name": "Original"}))),
    )
    .await;
    let result = store
        .write(&Write::create_only(record(
            &r,
            json!({"name": "Intruder", "telephone1": "9"}),
        )))
        .await;
    assert!(
        matches!(&result, Err(Error::AlreadyExists { reference }) if **reference == r),
        "got {result:?}"
    );
    let after = must_read(store, &r).await;
    assert_eq!(after.version, before.version);
    assert_eq!(after.record.field("name"), Some(&json!("Original")));
    assert_eq!(after.record.field("telephone1"), None);
}

/// Update-only on a missing record fails and creates nothing.
pub async fn update_only_on_missing_fails(store: &Arc<dyn RecordStore>) {
    let r = account(&fresh("uo"));
    let result = store
        .write(&Write::update_only(record(&r, json!({"name": "Ghost"}))))
        .await;
    assert!(
        matches!(&result, Err(Error::NotFound { reference }) if **reference == r),
        "got {result:?}"
    );
    must_be_absent(store, &r, "update-only must not create").await;
    let existing = must_write(store, Write::upsert(record(&r, json!({"name": "Now"})))).await;
    let updated = must_write(
        store,
        Write::update_only(record(&r, json!({"name": "Later"}))),
    )
    .await;
    assert_eq!((updated.id, updated.change), (existing.id, Change::Updated));
}

/// Optimistic concurrency: a write based on a stale version is rejected and changes nothing.
pub async fn stale_version_is_rejected(store: &Arc<dyn RecordStore>) {
    let r = account(&fresh("occ"));
    let v1 = must_write(store, Write::upsert(record(&r, json!({"name": "v1"}))))
        .await
        .version;
    let v2 = must_write(
        store,
        Write::if_version(record(&r, json!({"name": "v2"})), v1),
    )
    .await
    .version;
    assert!(v2 > v1);
    let stale = store
        .write(&Write::if_version(record(&r, json!({"name": "stale"})), v1))
        .await;
    assert!(
        matches!(&stale, Err(Error::VersionMismatch { expected, actual, .. }) if *expected == v1 && actual.is_none_or(|a| a == v2)),
        "got {stale:?}"
    );
    assert_eq!(
        must_read(store, &r).await.record.field("name"),
        Some(&json!("v2"))
    );
    let missing = store
        .write(&Write::if_version(
            record(&account(&fresh("occ")), json!({})),
            Version(1),
        ))
        .await;
    assert!(
        matches!(missing, Err(Error::NotFound { .. })),
        "got {missing:?}"
    );
}

/// A write whose lookup target is missing fails with an error naming the target, and writes nothing.
pub async fn missing_lookup_target_is_named(store: &Arc<dyn RecordStore>) {
    let target = account(&fresh("gone"));
    let c = contact(&format!("{}@example.com", fresh("mr")), 1);
    let mut write = record(&c, json!({"fullname": "Orphan"}));
    write.lookups.insert(
        crate::ColumnName::new("parentcustomerid").unwrap_or_else(|e| panic!("{e}")),
        target.clone(),
    );
    let result = store.write(&Write::upsert(write)).await;
    match &result {
        Err(Error::MissingReference {
            reference,
            field,
            target: missing,
        }) => {
            assert_eq!(**reference, c);
            assert_eq!(field.as_str(), "parentcustomerid");
            assert_eq!(**missing, target, "the error names the missing target");
        }
        other => panic!("expected MissingReference, got {other:?}"),
    }
    must_be_absent(
        store,
        &c,
        "a write with a missing lookup target must not be applied",
    )
    .await;
}

/// Lookups accept the target by key or by id and read back by id.
pub async fn lookups_resolve_by_id_and_by_key(store: &Arc<dyn RecordStore>) {
    let parent = account(&fresh("parent"));
    let parent_id = must_write(store, Write::upsert(record(&parent, json!({"name": "P"}))))
        .await
        .id;
    for (n, target) in [
        parent.clone(),
        EntityRef::by_id("account", parent_id).unwrap_or_else(|e| panic!("{e}")),
    ]
    .into_iter()
    .enumerate()
    {
        let c = contact(&format!("{}@example.com", fresh("lk")), n as i64);
        let mut write = record(&c, json!({"fullname": "Child"}));
        write.lookups.insert(
            crate::ColumnName::new("parentcustomerid").unwrap_or_else(|e| panic!("{e}")),
            target,
        );
        must_write(store, Write::upsert(write)).await;
        let read = must_read(store, &c).await;
        assert_eq!(
            read.record
                .lookups
                .get("parentcustomerid")
                .and_then(EntityRef::id),
            Some(parent_id)
        );
    }
}

/// A batch returns one result per item, in order; failing items change nothing and hide nothing.
pub async fn batch_reports_every_item(store: &Arc<dyn RecordStore>) {
    let existing = account(&fresh("b-exist"));
    must_write(
        store,
        Write::upsert(record(&existing, json!({"name": "Keep"}))),
    )
    .await;
    let ok1 = account(&fresh("b-ok"));
    let ok2 = account(&fresh("b-ok"));
    let orphan = contact(&format!("{}@example.com", fresh("b")), 7);
    let mut orphan_record = record(&orphan, json!({"fullname": "Orphan"}));
    orphan_record.lookups.insert(
        crate::ColumnName::new("parentcustomerid").unwrap_or_else(|e| panic!("{e}")),
        account(&fresh("b-missing")),
    );
    let writes = [
        Write::upsert(record(&ok1, json!({"name": "One"}))),
        Write::upsert(orphan_record),
        Write::create_only(record(&existing, json!({"name": "Overwrite"}))),
        Write::upsert(record(&ok2, json!({"revenue": "not a number"}))),
        Write::upsert(record(&ok2, json!({"name": "Two"}))),
    ];
    let results = store.write_batch(&writes).await;
    assert_eq!(results.len(), writes.len(), "one result per write");
    assert!(matches!(results[0], Ok(ref o) if o.change == Change::Created));
    assert!(
        matches!(results[1], Err(Error::MissingReference { .. })),
        "got {:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(Error::AlreadyExists { .. })),
        "got {:?}",
        results[2]
    );
    assert!(
        matches!(results[3], Err(Error::InvalidValue { .. })),
        "got {:?}",
        results[3]
    );
    assert!(
        matches!(results[4], Ok(ref o) if o.change == Change::Created),
        "a failed item must not block later ones"
    );
    must_be_absent(store, &orphan, "the failed batch item").await;
    assert_eq!(
        must_read(store, &existing).await.record.field("name"),
        Some(&json!("Keep"))
    );
    assert_eq!(
        must_read(store, &ok2).await.record.field("revenue"),
        None,
        "the invalid item left no trace"
    );
}

/// Composite alternate keys address records whatever the order of their parts.
pub async fn composite_alternate_keys(store: &Arc<dyn RecordStore>) {
    let email = format!("{}@example.com", fresh("ck"));
    let c = contact(&email, 42);
    let created = must_write(
        store,
        Write::upsert(record(&c, json!({"fullname": "Composite"}))),
    )
    .await;
    let reordered = EntityRef::by_key(
        "contact",
        [
            ("new_externalid", KeyValue::from(42)),
            ("emailaddress1", email.as_str().into()),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(must_read(store, &reordered).await.id, created.id);
    must_be_absent(
        store,
        &contact(&email, 43),
        "a different composite key value",
    )
    .await;
    let report = store.ensure_exists(&[contact(&email, 43)], &policy()).await;
    assert_eq!(
        report.created().count(),
        1,
        "ensure works with composite keys"
    );
    let placeholder = must_read(store, &contact(&email, 43)).await;
    assert_eq!(placeholder.record.field("new_externalid"), Some(&json!(43)));
    assert_eq!(
        placeholder.record.field("emailaddress1"),
        Some(&json!(email))
    );
}

/// Two records cannot hold the same alternate key value.
pub async fn alternate_keys_are_unique(store: &Arc<dyn RecordStore>) {
    let number = fresh("uniq");
    let holder = must_write(
        store,
        Write::upsert(record(&account(&number), json!({"name": "Holder"}))),
    )
    .await;
    let other = EntityRef::by_id("account", Uuid::new_v4()).unwrap_or_else(|e| panic!("{e}"));
    let result = store
        .write(&Write::upsert(record(
            &other,
            json!({"name": "Clash", "accountnumber": number}),
        )))
        .await;
    assert!(
        matches!(&result, Err(Error::DuplicateKey { existing, .. }) if *existing == holder.id),
        "got {result:?}"
    );
    must_be_absent(store, &other, "the clashing record").await;
    // Moving a key to a value another record holds fails too.
    let second = account(&fresh("uniq2"));
    must_write(
        store,
        Write::upsert(record(&second, json!({"name": "Second"}))),
    )
    .await;
    let sid = must_read(store, &second).await.id;
    let by_id = EntityRef::by_id("account", sid).unwrap_or_else(|e| panic!("{e}"));
    let moved = store
        .write(&Write::upsert(record(
            &by_id,
            json!({"accountnumber": number}),
        )))
        .await;
    assert!(
        matches!(moved, Err(Error::DuplicateKey { .. })),
        "got {moved:?}"
    );
    assert!(
        must_read(store, &second)
            .await
            .record
            .field("accountnumber")
            .is_some()
    );
}

/// A hydrated record never goes back to placeholder; the hydrating write says so once.
pub async fn placeholder_never_downgrades_hydrated(store: &Arc<dyn RecordStore>) {
    let r = account(&fresh("down"));
    let report = store
        .ensure_exists(std::slice::from_ref(&r), &policy())
        .await;
    assert_eq!(report.created().count(), 1);
    let hydrate = must_write(
        store,
        Write::upsert(record(&r, json!({"name": "Real", "telephone1": "1"}))),
    )
    .await;
    assert_eq!(hydrate.previous_state, Some(HydrationState::Placeholder));
    assert!(
        hydrate.became_hydrated(),
        "the full write of a placeholder hydrates it"
    );
    let again = must_write(store, Write::upsert(record(&r, json!({"telephone1": "2"})))).await;
    assert!(!again.became_hydrated(), "only one write hydrates a record");
    let mut downgrade = record(&r, json!({"name": "Placeholder label"}));
    downgrade.state = HydrationState::Placeholder;
    let outcome = must_write(store, Write::upsert(downgrade)).await;
    assert_eq!(
        outcome.state,
        HydrationState::Hydrated,
        "a placeholder write must not downgrade a hydrated record"
    );
    assert_eq!(
        must_read(store, &r).await.record.state,
        HydrationState::Hydrated
    );
}

/// Bad input gets a typed error that says what and where, and changes nothing.
pub async fn bad_input_is_a_typed_error(store: &Arc<dyn RecordStore>) {
    let number = fresh("bad");
    let r = account(&number);
    type Case = (&'static str, Write, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        (
            "undeclared alternate key",
            Write::upsert(Record::new(
                EntityRef::by_key("account", [("name", "x")]).unwrap_or_else(|e| panic!("{e}")),
            )),
            |e| matches!(e, Error::InvalidKey { table, .. } if table.as_str() == "account"),
        ),
        (
            "wrong key value type",
            Write::upsert(Record::new(
                EntityRef::by_key("account", [("accountnumber", 5)])
                    .unwrap_or_else(|e| panic!("{e}")),
            )),
            |e| matches!(e, Error::InvalidKey { .. }),
        ),
        (
            "wrong field type",
            Write::upsert(record(&r, json!({"numberofemployees": "many"}))),
            |e| matches!(e, Error::InvalidValue { field, .. } if field.as_str() == "numberofemployees"),
        ),
        (
            "unknown column",
            Write::upsert(record(&r, json!({"nosuchcolumn": 1}))),
            |e| matches!(e, Error::UnknownColumn { column, .. } if column.as_str() == "nosuchcolumn"),
        ),
        (
            "unknown table",
            Write::upsert(Record::new(
                EntityRef::by_key("nosuchtable", [("k", "v")]).unwrap_or_else(|e| panic!("{e}")),
            )),
            |e| matches!(e, Error::UnknownTable { .. }),
        ),
        (
            "field contradicting the key",
            Write::upsert(record(&r, json!({"accountnumber": "something-else"}))),
            |e| matches!(e, Error::InvalidValue { field, .. } if field.as_str() == "accountnumber"),
        ),
        (
            "primary id as a field",
            Write::upsert(record(&r, json!({"accountid": Uuid::new_v4().to_string()}))),
            |e| matches!(e, Error::InvalidValue { field, .. } if field.as_str() == "accountid"),
        ),
        (
            "lookup to the wrong table",
            {
                let mut w = record(&contact(&format!("{number}@example.com"), 1), json!({}));
                w.lookups.insert(
                    crate::ColumnName::new("parentcustomerid").unwrap_or_else(|e| panic!("{e}")),
                    contact("x@example.com", 1),
                );
                Write::upsert(w)
            },
            |e| matches!(e, Error::InvalidValue { field, .. } if field.as_str() == "parentcustomerid"),
        ),
        (
            "undeclared lookup",
            {
                let mut w = record(&r, json!({}));
                w.lookups.insert(
                    crate::ColumnName::new("nosuchlookup").unwrap_or_else(|e| panic!("{e}")),
                    account("x"),
                );
                Write::upsert(w)
            },
            |e| matches!(e, Error::UnknownColumn { .. }),
        ),
    ];
    for (what, write, expected) in cases {
        let result = store.write(&write).await;
        match &result {
            Err(e) if expected(e) => {
                assert!(!e.is_retryable(), "{what}: bad input is not retryable")
            }
            other => panic!("{what}: expected a typed error, got {other:?}"),
        }
    }
    must_be_absent(store, &r, "no bad write may create the record").await;
    let read = store
        .read(&EntityRef::by_key("account", [("name", "x")]).unwrap_or_else(|e| panic!("{e}")))
        .await;
    assert!(
        matches!(read, Err(Error::InvalidKey { .. })),
        "reads validate keys too: {read:?}"
    );
    let delete = store
        .delete(&Delete::new(
            EntityRef::by_key("account", [("name", "x")]).unwrap_or_else(|e| panic!("{e}")),
        ))
        .await;
    assert!(
        matches!(&delete, Err(Error::InvalidKey { table, .. }) if table.as_str() == "account"),
        "deletes validate keys too: {delete:?}"
    );
    let delete = store
        .delete(&Delete::new(
            EntityRef::by_key("nosuchtable", [("k", "v")]).unwrap_or_else(|e| panic!("{e}")),
        ))
        .await;
    assert!(
        matches!(delete, Err(Error::UnknownTable { .. })),
        "a delete on an unknown table: {delete:?}"
    );
}

/// Delete by GUID: the record and its alternate key are gone, and the same GUID and key can be created again as
/// a new record that the deleted one's version does not match.
pub async fn delete_by_id_then_create_again(store: &Arc<dyn RecordStore>) {
    let id = Uuid::new_v4();
    let r = by_id(id);
    let number = fresh("del-id");
    let first = must_write(
        store,
        Write::create_only(record(
            &r,
            json!({"name": "First", "accountnumber": number}),
        )),
    )
    .await;
    let outcome = must_delete(store, Delete::new(r.clone())).await;
    assert!(outcome.is_deleted(), "got {outcome:?}");
    assert_eq!(outcome.id(), Some(id), "a delete by GUID reports that GUID");
    assert!(
        outcome
            .previous_state()
            .is_none_or(|s| s == HydrationState::Hydrated),
        "got {outcome:?}"
    );
    must_be_absent(store, &r, "a deleted record").await;
    must_be_absent(store, &account(&number), "a deleted record's alternate key").await;

    let again = must_write(
        store,
        Write::create_only(record(
            &r,
            json!({"name": "Again", "accountnumber": number}),
        )),
    )
    .await;
    assert_eq!(
        (again.id, again.change, again.previous_state),
        (id, Change::Created, None),
        "a deleted record can be created again, with the same GUID"
    );
    let read = must_read(store, &account(&number)).await;
    assert_eq!(read.id, id, "the deleted record's key value is free again");
    assert_eq!(read.record.field("name"), Some(&json!("Again")));
    let stale = store
        .delete(&Delete::if_version(r.clone(), first.version))
        .await;
    assert!(
        matches!(&stale, Err(Error::VersionMismatch { expected, .. }) if *expected == first.version),
        "the deleted record's version does not match the new record: {stale:?}"
    );
    must_read(store, &r).await;
}

/// Delete by alternate key, single and composite (in any part order).
pub async fn delete_by_alternate_key(store: &Arc<dyn RecordStore>) {
    let r = account(&fresh("del-key"));
    let created = must_write(store, Write::upsert(record(&r, json!({"name": "Keyed"})))).await;
    let outcome = must_delete(store, Delete::new(r.clone())).await;
    assert!(outcome.is_deleted(), "got {outcome:?}");
    assert!(
        outcome.id().is_none_or(|id| id == created.id),
        "a reported id is the deleted record's: {outcome:?}"
    );
    must_be_absent(store, &r, "a record deleted by key").await;
    must_be_absent(
        store,
        &by_id(created.id),
        "a record deleted by key, by GUID",
    )
    .await;

    let email = format!("{}@example.com", fresh("del-ck"));
    let c = contact(&email, 5);
    let other = contact(&email, 6);
    must_write(
        store,
        Write::upsert(record(&c, json!({"fullname": "Five"}))),
    )
    .await;
    must_write(
        store,
        Write::upsert(record(&other, json!({"fullname": "Six"}))),
    )
    .await;
    let reordered = EntityRef::by_key(
        "contact",
        [
            ("new_externalid", KeyValue::from(5)),
            ("emailaddress1", email.as_str().into()),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let outcome = must_delete(store, Delete::new(reordered)).await;
    assert!(outcome.is_deleted(), "got {outcome:?}");
    must_be_absent(store, &c, "a record deleted by composite key").await;
    assert_eq!(
        must_read(store, &other).await.record.field("fullname"),
        Some(&json!("Six")),
        "a delete removes only the record it addresses"
    );
}

/// Deleting a record that is not there succeeds and says so, as often as it is asked, and creates nothing.
pub async fn delete_of_a_missing_record_is_absent_every_time(store: &Arc<dyn RecordStore>) {
    let deleted = account(&fresh("del-twice"));
    let version = must_write(
        store,
        Write::upsert(record(&deleted, json!({"name": "Once"}))),
    )
    .await
    .version;
    assert!(
        must_delete(store, Delete::new(deleted.clone()))
            .await
            .is_deleted()
    );
    let missing = [
        deleted.clone(),
        account(&fresh("del-none")),
        by_id(Uuid::new_v4()),
        contact(&format!("{}@example.com", fresh("del-none")), 1),
    ];
    for r in &missing {
        for attempt in 1..=2 {
            let outcome = store.delete(&Delete::new(r.clone())).await;
            assert!(
                matches!(outcome, Ok(DeleteOutcome::Absent)),
                "delete #{attempt} of missing {r}: got {outcome:?}"
            );
        }
        must_be_absent(store, r, "deleting a missing record must not create it").await;
    }
    let conditional = store.delete(&Delete::if_version(deleted, version)).await;
    assert!(
        matches!(conditional, Ok(DeleteOutcome::Absent)),
        "a version-conditioned delete of a missing record finds it gone: {conditional:?}"
    );
}

/// Optimistic concurrency: a delete based on a stale version is rejected and leaves the record; one at the current
/// version deletes it.
pub async fn delete_with_a_stale_version_is_rejected(store: &Arc<dyn RecordStore>) {
    let r = account(&fresh("del-occ"));
    let v1 = must_write(store, Write::upsert(record(&r, json!({"name": "v1"}))))
        .await
        .version;
    let v2 = must_write(store, Write::upsert(record(&r, json!({"name": "v2"}))))
        .await
        .version;
    assert!(v2 > v1);
    let stale = store.delete(&Delete::if_version(r.clone(), v1)).await;
    match &stale {
        Err(
            e @ Error::VersionMismatch {
                reference,
                expected,
                actual,
            },
        ) => {
            assert_eq!(**reference, r, "the error names the record");
            assert_eq!(*expected, v1);
            assert!(actual.is_none_or(|a| a == v2), "got {stale:?}");
            assert!(!e.is_retryable(), "a version mismatch is permanent");
        }
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
    let kept = must_read(store, &r).await;
    assert_eq!(
        (kept.version, kept.record.field("name")),
        (v2, Some(&json!("v2"))),
        "a rejected delete changes nothing"
    );
    let outcome = must_delete(store, Delete::if_version(r.clone(), v2)).await;
    assert!(outcome.is_deleted(), "got {outcome:?}");
    must_be_absent(store, &r, "a delete at the current version").await;
}

/// A placeholder is deleted like any record; ensuring it again creates a new one.
pub async fn delete_a_placeholder(store: &Arc<dyn RecordStore>) {
    let policy = policy();
    let r = account(&fresh("del-ph"));
    let report = store.ensure_exists(std::slice::from_ref(&r), &policy).await;
    assert_eq!(report.created().count(), 1, "ensure failed: {report:?}");
    let placeholder = must_read(store, &r).await;
    assert_eq!(placeholder.record.state, HydrationState::Placeholder);
    let outcome = must_delete(store, Delete::new(r.clone())).await;
    assert!(outcome.is_deleted(), "got {outcome:?}");
    assert!(
        outcome
            .previous_state()
            .is_none_or(|s| s == HydrationState::Placeholder),
        "a reported state before the delete is the placeholder's: {outcome:?}"
    );
    must_be_absent(store, &r, "a deleted placeholder").await;
    let again = store.ensure_exists(std::slice::from_ref(&r), &policy).await;
    assert_eq!(
        again.created().count(),
        1,
        "a deleted placeholder is missing again, so ensure creates one: {again:?}"
    );
    assert_ne!(
        must_read(store, &r).await.id,
        placeholder.id,
        "a new placeholder, not the deleted one"
    );
}
