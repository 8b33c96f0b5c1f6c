//! The sync pipeline between Dataverse instances (emulators): change tracking as a source, an applier writing
//! through `DataverseStore`, and checkpoints that resume where the last poll ended.

#[path = "common/dataverse.rs"]
mod dataverse;

use std::sync::Arc;

use serde_json::json;
use uuid::Uuid;

use eventual_upsert::dataverse::DataverseStore;
use eventual_upsert::sync::{
    Applier, ChangeKind, ChangeSource, DataverseChangeSource, MemoryLedger, Pipeline,
};
use eventual_upsert::{
    EnsureExists, EnsuringWriter, EntityRef, HydrationState, Record, RecordStore, TableName, Write,
    conformance,
};

fn tables() -> Vec<TableName> {
    vec![
        TableName::new("account").unwrap(),
        TableName::new("contact").unwrap(),
    ]
}

fn account(id: u128, number: &str, name: &str) -> Record {
    Record::builder(EntityRef::by_id("account", Uuid::from_u128(id)).unwrap())
        .field("name", name)
        .field("accountnumber", number)
        .build()
        .unwrap()
}

async fn write(store: &DataverseStore, record: Record) {
    store.write(&Write::upsert(record)).await.unwrap();
}

#[tokio::test]
async fn change_tracking_yields_rows_once_then_only_what_changed() {
    let emulator = dataverse::conformance_emulator().await;
    let store = dataverse::conformance_store(&emulator);
    write(&store, account(1, "A-1", "One")).await;
    write(&store, account(2, "A-2", "Two")).await;
    let placeholder = EntityRef::by_key("account", [("accountnumber", "A-P")]).unwrap();
    store
        .ensure_exists(&[placeholder], &conformance::policy())
        .await
        .into_result()
        .unwrap();

    let source = DataverseChangeSource::new("us", store.clone(), tables());
    let first = source.poll(None, 100).await.unwrap();
    let ids: Vec<String> = first.events.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(
        first.events.len(),
        2,
        "two rows, the placeholder skipped: {ids:?}"
    );
    assert!(
        first
            .events
            .iter()
            .all(|e| e.source == "us" && e.change == ChangeKind::Upsert)
    );
    let again = source.poll(first.checkpoint.as_deref(), 100).await.unwrap();
    assert!(
        again.events.is_empty(),
        "nothing changed since the checkpoint"
    );

    write(&store, account(2, "A-2", "Two, renamed")).await;
    let changed = source.poll(again.checkpoint.as_deref(), 100).await.unwrap();
    assert_eq!(changed.events.len(), 1);
    let event = &changed.events[0];
    assert_eq!(event.fields.get("name"), Some(&json!("Two, renamed")));
    let before = first
        .events
        .iter()
        .find(|e| e.key == event.key)
        .map(|e| e.source_version);
    assert!(Some(event.source_version) > before, "versions grow");

    assert!(
        store
            .delete(&EntityRef::by_id("account", Uuid::from_u128(1)).unwrap())
            .await
            .unwrap()
    );
    let deleted = source
        .poll(changed.checkpoint.as_deref(), 100)
        .await
        .unwrap();
    assert_eq!(deleted.events.len(), 1);
    assert_eq!(deleted.events[0].change, ChangeKind::Delete);
}

#[tokio::test]
async fn a_pipeline_replicates_one_instance_into_another_and_resumes_from_its_checkpoint() {
    let (us_emulator, eu_emulator) = (
        dataverse::conformance_emulator().await,
        dataverse::conformance_emulator().await,
    );
    let (us, eu) = (
        dataverse::conformance_store(&us_emulator),
        Arc::new(dataverse::conformance_store(&eu_emulator)),
    );
    let ledger = Arc::new(MemoryLedger::new());
    let pipeline = || {
        let writer = EnsuringWriter::new(eu.clone()).with_policy(conformance::policy());
        let applier = Applier::builder(writer, ledger.clone())
            .identity("sync-us-eu")
            .build(None)
            .unwrap();
        Pipeline::new(
            Arc::new(DataverseChangeSource::new("us", us.clone(), tables())),
            applier,
        )
    };
    // A contact first, its account later in the same change feed: the account is a placeholder in between.
    let contact = Record::builder(EntityRef::by_id("contact", Uuid::from_u128(100)).unwrap())
        .field("fullname", "Ada")
        .field("emailaddress1", "ada@example.com")
        .field("new_externalid", 1)
        .lookup(
            "parentcustomerid",
            EntityRef::by_id("account", Uuid::from_u128(1)).unwrap(),
        )
        .build()
        .unwrap();
    write(&us, account(1, "A-1", "Fabrikam")).await;
    write(&us, contact).await;
    let first = pipeline();
    first.drain(1).await.unwrap();
    let stats = first.applier().stats();
    assert_eq!(stats.applied, 2);
    assert!(stats.is_accounted());

    // A new worker (a restart) reads on from the ledger's checkpoint: nothing twice.
    write(&us, account(2, "A-2", "Northwind")).await;
    let second = pipeline();
    second.drain(100).await.unwrap();
    assert_eq!(second.applier().stats().applied, 1, "only the new change");

    for id in [1, 2] {
        let reference = EntityRef::by_id("account", Uuid::from_u128(id)).unwrap();
        let (source, target) = (
            us.read(&reference).await.unwrap().unwrap(),
            eu.read(&reference).await.unwrap().unwrap(),
        );
        assert_eq!(source.record.fields, target.record.fields);
        assert_eq!(target.record.state, HydrationState::Hydrated);
    }
    let contact = eu
        .read(&EntityRef::by_id("contact", Uuid::from_u128(100)).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        contact.record.lookups["parentcustomerid"].id(),
        Some(Uuid::from_u128(1))
    );
}
