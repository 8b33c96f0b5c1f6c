//! The `RecordStore` + `EnsureExists` contract, run against the in-memory adapter: one test per scenario so a
//! failure names the broken rule.

use std::sync::Arc;

use eventual_upsert::memory::{Fault, MemoryStore};
use eventual_upsert::{
    ColumnName, Delete, DeleteOutcome, Ensured, EntityRef, HydrationState, Record, RecordStore,
    Result, StoredRecord, TableName, Write, WriteOutcome, conformance,
};
use serde_json::json;

fn store() -> Arc<dyn RecordStore> {
    Arc::new(MemoryStore::new(conformance::schema()).named("conformance"))
}

#[path = "common/scenarios.rs"]
#[macro_use]
mod scenarios;

conformance_scenarios!(async { ((), store()) });

/// All scenarios on one shared store, as an adapter's suite would run them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_scenarios_share_one_store() {
    conformance::run_all(&store()).await;
}

/// The in-memory store with only the methods a minimal adapter implements, so `ensure_placeholders` is the
/// trait's default (create-only writes in one batch).
#[derive(Debug)]
struct DefaultEnsure(MemoryStore);

#[async_trait::async_trait]
impl RecordStore for DefaultEnsure {
    fn backend(&self) -> &str {
        self.0.backend()
    }
    async fn read(&self, reference: &EntityRef) -> Result<Option<StoredRecord>> {
        self.0.read(reference).await
    }
    async fn write(&self, write: &Write) -> Result<WriteOutcome> {
        self.0.write(write).await
    }
    async fn write_batch(&self, writes: &[Write]) -> Vec<Result<WriteOutcome>> {
        self.0.write_batch(writes).await
    }
    async fn delete(&self, delete: &Delete) -> Result<DeleteOutcome> {
        self.0.delete(delete).await
    }
}

/// What a store holds, without the ids it generated (placeholders created by alternate key get random ones).
fn contents(store: &MemoryStore) -> Vec<String> {
    let mut rows = Vec::new();
    for table in ["account", "contact"] {
        let table = TableName::new(table).unwrap_or_else(|e| panic!("{e}"));
        for stored in store.records(&table).unwrap_or_else(|e| panic!("{e}")) {
            let r = stored.record;
            rows.push(format!(
                "{table} {:?} {:?} {:?}",
                r.fields, r.state, r.source_version
            ));
        }
    }
    rows.sort();
    rows
}

/// `MemoryStore` overrides `ensure_placeholders` (placeholders move into their rows): every answer, every row and
/// every call count must be the default's.
#[tokio::test]
async fn memory_ensure_placeholders_answers_as_the_default_does() {
    let by_key = |table: &str, column: &str, value: &str| {
        EntityRef::by_key(table, [(column, value)]).unwrap_or_else(|e| panic!("{e}"))
    };
    let account_id =
        EntityRef::by_id("account", uuid::Uuid::from_u128(7)).unwrap_or_else(|e| panic!("{e}"));
    let placeholder = |reference: EntityRef, fields: serde_json::Value| {
        let mut record = Record::new(reference);
        record.state = HydrationState::Placeholder;
        if let serde_json::Value::Object(map) = fields {
            for (column, value) in map {
                let column = ColumnName::new(column).unwrap_or_else(|e| panic!("{e}"));
                record.fields.insert(column, value);
            }
        }
        record
    };
    let seed = [
        Write::upsert(
            Record::builder(account_id.clone())
                .field("accountnumber", "A-EXISTS")
                .field("name", "Fabrikam")
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
        ),
        Write::create_only(placeholder(
            by_key("account", "accountnumber", "A-PLACEHOLDER"),
            json!({}),
        )),
    ];
    let mut with_lookup = placeholder(
        EntityRef::by_id("contact", uuid::Uuid::from_u128(8)).unwrap_or_else(|e| panic!("{e}")),
        json!({"fullname": "Joe"}),
    );
    with_lookup.lookups.insert(
        ColumnName::new("parentcustomerid").unwrap_or_else(|e| panic!("{e}")),
        account_id.clone(),
    );
    let mut dangling = with_lookup.clone();
    dangling.reference =
        EntityRef::by_id("contact", uuid::Uuid::from_u128(9)).unwrap_or_else(|e| panic!("{e}"));
    dangling.lookups.insert(
        ColumnName::new("parentcustomerid").unwrap_or_else(|e| panic!("{e}")),
        by_key("account", "accountnumber", "A-NOWHERE"),
    );
    let placeholders = vec![
        // Missing: created, key column in the fields, a null field dropped.
        placeholder(
            by_key("account", "accountnumber", "A-NEW"),
            json!({"accountnumber": "A-NEW", "name": "A-NEW", "telephone1": null}),
        ),
        // Missing, key column only in the address.
        placeholder(
            by_key("account", "accountnumber", "A-NEW-2"),
            json!({"name": "A-NEW-2"}),
        ),
        // Existing, hydrated and placeholder: left alone.
        placeholder(
            by_key("account", "accountnumber", "A-EXISTS"),
            json!({"name": "A-EXISTS"}),
        ),
        placeholder(account_id.clone(), json!({"name": "changed?"})),
        placeholder(
            by_key("account", "accountnumber", "A-PLACEHOLDER"),
            json!({"name": "A-PLACEHOLDER"}),
        ),
        // Invalid, even where the record exists.
        placeholder(
            by_key("account", "accountnumber", "A-EXISTS"),
            json!({"nosuchcolumn": 1}),
        ),
        placeholder(
            by_key("account", "accountnumber", "A-EXISTS"),
            json!({"accountnumber": "A-OTHER"}),
        ),
        placeholder(by_key("account", "name", "x"), json!({})),
        // A key value held by another record.
        placeholder(
            EntityRef::by_id("account", uuid::Uuid::from_u128(10))
                .unwrap_or_else(|e| panic!("{e}")),
            json!({"accountnumber": "A-EXISTS"}),
        ),
        // Lookups: resolved, and missing.
        with_lookup,
        dangling,
    ];

    let ours = MemoryStore::new(conformance::schema());
    let default = DefaultEnsure(MemoryStore::new(conformance::schema()));
    let shape = |results: Vec<Result<Ensured>>| -> Vec<String> {
        results
            .into_iter()
            .map(|result| match result {
                Ok(Ensured::Created { .. }) => "created".to_owned(),
                Ok(Ensured::Existed) => "existed".to_owned(),
                Err(err) => format!("{err:?}"),
            })
            .collect()
    };
    for store in [&ours as &dyn RecordStore, &default] {
        assert!(
            store.write_batch(&seed).await.iter().all(Result::is_ok),
            "seeding"
        );
    }
    let answers = shape(ours.ensure_placeholders(placeholders.clone()).await);
    assert_eq!(
        answers,
        shape(default.ensure_placeholders(placeholders.clone()).await)
    );
    assert_eq!(
        answers.iter().filter(|a| *a == "created").count(),
        3,
        "{answers:#?}"
    );
    assert_eq!(
        answers.iter().filter(|a| *a == "existed").count(),
        3,
        "{answers:#?}"
    );
    assert_eq!(contents(&ours), contents(&default.0));
    assert_eq!(ours.stats(), default.0.stats());

    // A failed call: every item reports it, nothing is applied, and it counts as one call either way.
    for store in [&ours, &default.0] {
        store.faults().fail_next(1, Fault::Unavailable);
    }
    let answers = shape(ours.ensure_placeholders(placeholders.clone()).await);
    assert_eq!(
        answers,
        shape(default.ensure_placeholders(placeholders).await)
    );
    assert!(
        answers.iter().all(|a| a.starts_with("Unavailable")),
        "{answers:#?}"
    );
    assert_eq!(contents(&ours), contents(&default.0));
    assert_eq!(ours.stats(), default.0.stats());
}
