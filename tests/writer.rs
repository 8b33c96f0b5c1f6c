//! `EnsuringWriter` over the in-memory store: hydration, hooks, guards, in-batch references and faults.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

mod common;

use eventual_upsert::memory::{Fault, MemoryStore};
use eventual_upsert::{
    Change, EnsuringWriter, EntityRef, Error, HydrationState, PlaceholderAction, Policies, Proceed,
    Record, RecordStore, TableName, TablePolicy, Write,
};

fn setup() -> (Arc<MemoryStore>, EnsuringWriter) {
    let store = Arc::new(MemoryStore::new(common::accounts_and_contacts()).named("eu"));
    let policy = Policies::builder()
        .table(
            "account",
            TablePolicy::builder()
                .primary_name("name")
                .label("Pending sync")
                .required("telephone1")
                .on_placeholder("send_invoice", PlaceholderAction::Defer),
        )
        .build()
        .unwrap();
    let writer = EnsuringWriter::new(store.clone()).with_policy(policy);
    (store, writer)
}

fn account(number: &str) -> EntityRef {
    EntityRef::by_key("account", [("accountnumber", number)]).unwrap()
}

fn full_account(reference: EntityRef) -> Record {
    Record::builder(reference)
        .field("name", "Fabrikam")
        .field("telephone1", "+1 555 0100")
        .build()
        .unwrap()
}

fn contact(parent: EntityRef) -> Record {
    Record::builder(EntityRef::by_id("contact", Uuid::new_v4()).unwrap())
        .field("fullname", "Ada")
        .lookup("parentcustomerid", parent)
        .build()
        .unwrap()
}

fn table(name: &str) -> TableName {
    TableName::new(name).unwrap()
}

#[tokio::test]
async fn a_write_to_a_missing_reference_creates_a_placeholder_that_the_sync_hydrates() {
    let (store, writer) = setup();
    let written = writer.write(contact(account("A-1"))).await.unwrap();
    assert_eq!(written.ensured.created().count(), 1);
    let placeholder = store.read(&account("A-1")).await.unwrap().unwrap();
    assert_eq!(placeholder.record.state, HydrationState::Placeholder);
    assert_eq!(
        placeholder.record.field("name"),
        Some(&json!("Pending sync"))
    );

    let hydrated = writer
        .write(full_account(account("A-1")))
        .await
        .unwrap()
        .outcome;
    assert_eq!(
        (hydrated.id, hydrated.change),
        (placeholder.id, Change::Updated)
    );
    assert!(hydrated.became_hydrated());
    let stored = store.read(&account("A-1")).await.unwrap().unwrap();
    assert_eq!(
        writer.guard(&stored.record).state(),
        HydrationState::Hydrated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hydration_hook_fires_once_however_many_writers_race() {
    let (_store, writer) = setup();
    let hydrations = Arc::new(AtomicUsize::new(0));
    let counter = hydrations.clone();
    writer.hooks().on_hydrated(&table("account"), move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    writer
        .ensure(&[account("A-7")])
        .await
        .into_result()
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (writer, barrier) = (writer.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            writer
                .write(full_account(account("A-7")))
                .await
                .map(|w| w.outcome.became_hydrated())
        });
    }
    let mut hydrating_writes = 0;
    while let Some(result) = tasks.join_next().await {
        hydrating_writes += usize::from(result.unwrap().unwrap());
    }
    assert_eq!(hydrating_writes, 1, "exactly one write hydrates");
    assert_eq!(
        hydrations.load(Ordering::SeqCst),
        1,
        "the hook fires exactly once"
    );
}

#[tokio::test]
async fn records_created_hydrated_fire_the_hook_too() {
    let (_store, writer) = setup();
    let hydrations = Arc::new(AtomicUsize::new(0));
    let counter = hydrations.clone();
    writer.hooks().on_hydrated(&table("account"), move |h| {
        assert_eq!(h.record.field("name"), Some(&json!("Fabrikam")));
        assert!(!h.was_placeholder(), "created hydrated");
        counter.fetch_add(1, Ordering::SeqCst);
    });
    writer.write(full_account(account("A-2"))).await.unwrap();
    writer.write(full_account(account("A-2"))).await.unwrap();
    assert_eq!(
        hydrations.load(Ordering::SeqCst),
        1,
        "on-create logic runs once, when real data exists"
    );
}

#[tokio::test]
async fn a_deferred_operation_runs_when_its_record_is_hydrated() {
    let (store, writer) = setup();
    writer.write(contact(account("A-3"))).await.unwrap();
    let placeholder = store.read(&account("A-3")).await.unwrap().unwrap();
    let guard = writer.guard(&placeholder.record);
    assert!(matches!(
        guard.get::<String>("telephone1"),
        Err(Error::NotHydrated { .. })
    ));
    assert!(matches!(
        guard.check("delete_account"),
        Err(Error::PlaceholderRejected { .. })
    ));
    assert_eq!(guard.check("send_invoice").unwrap(), Proceed::Deferred);

    let sent_to = Arc::new(std::sync::Mutex::new(None));
    let slot = sent_to.clone();
    writer
        .hooks()
        .defer(&table("account"), placeholder.id, move |h| {
            *slot.lock().unwrap() = h.record.field("telephone1").cloned();
        });
    assert_eq!(writer.hooks().pending(), 1);
    writer.write(full_account(account("A-3"))).await.unwrap();
    assert_eq!(writer.hooks().pending(), 0);
    assert_eq!(*sent_to.lock().unwrap(), Some(json!("+1 555 0100")));
}

#[tokio::test]
async fn a_write_by_guid_hydrates_the_placeholder_that_holds_its_alternate_key() {
    let (store, writer) = setup();
    // The LOB referenced the account by number; the sync later writes it by its (source) GUID.
    writer.write(contact(account("A-4"))).await.unwrap();
    let placeholder = store.read(&account("A-4")).await.unwrap().unwrap();
    let by_guid = Record::builder(EntityRef::by_id("account", Uuid::new_v4()).unwrap())
        .field("accountnumber", "A-4")
        .field("name", "Fabrikam")
        .field("telephone1", "+1 555")
        .build()
        .unwrap();
    let outcome = writer.write(by_guid).await.unwrap().outcome;
    assert_eq!(
        outcome.id, placeholder.id,
        "the placeholder is hydrated instead of a duplicate being rejected"
    );
    assert!(outcome.became_hydrated());
    assert_eq!(store.records(&table("account")).unwrap().len(), 1);

    // Real data is never taken over: a second GUID with the same number is a conflict.
    let intruder = Record::builder(EntityRef::by_id("account", Uuid::new_v4()).unwrap())
        .field("accountnumber", "A-4")
        .field("name", "Intruder")
        .build()
        .unwrap();
    let err = writer.write(intruder).await.unwrap_err();
    assert!(
        matches!(err, Error::DuplicateKey { existing, .. } if existing == placeholder.id),
        "{err:?}"
    );
    let kept = store.read(&account("A-4")).await.unwrap().unwrap();
    assert_eq!(kept.record.field("name"), Some(&json!("Fabrikam")));
}

#[tokio::test]
async fn targets_written_in_the_same_batch_need_no_placeholder() {
    let (store, writer) = setup();
    let report = writer
        .write_batch([
            Write::upsert(contact(account("A-5"))),
            Write::upsert(full_account(account("A-5"))),
        ])
        .await;
    assert!(report.is_success(), "{:?}", report.results);
    assert_eq!(report.counts().placeholders, 0);
    let stored = store.read(&account("A-5")).await.unwrap().unwrap();
    assert_eq!(stored.record.state, HydrationState::Hydrated);
}

#[tokio::test]
async fn a_batch_write_by_guid_counts_as_the_target_of_a_lookup_by_its_key() {
    let (store, writer) = setup();
    let by_guid = Record::builder(EntityRef::by_id("account", Uuid::new_v4()).unwrap())
        .field("accountnumber", "A-10")
        .field("name", "Fabrikam")
        .field("telephone1", "+1 555")
        .build()
        .unwrap();
    let report = writer
        .write_batch([
            Write::upsert(contact(account("A-10"))),
            Write::upsert(by_guid),
        ])
        .await;
    assert!(report.is_success(), "{:?}", report.results);
    assert_eq!(
        report.counts().placeholders,
        0,
        "the account is written first, by GUID"
    );
    assert_eq!(store.records(&table("account")).unwrap().len(), 1);
}

#[tokio::test]
async fn a_batch_reports_each_failure_and_writes_the_rest() {
    let (store, writer) = setup();
    let bad = Record::builder(account("A-6"))
        .field("accountid", "not allowed")
        .build()
        .unwrap();
    let report = writer
        .write_batch([
            Write::upsert(contact(account("A-6"))),
            Write::upsert(bad),
            Write::create_only(contact(account("A-6"))),
            Write::upsert(full_account(account("A-6"))),
        ])
        .await;
    let counts = report.counts();
    // The account is written first (the contacts refer to it), so no placeholder is needed.
    assert_eq!(
        (counts.created, counts.failed, counts.placeholders),
        (3, 1, 0),
        "{:?}",
        report.results
    );
    assert!(
        matches!(&report.results[1], Err(Error::InvalidValue { field, .. }) if field.as_str() == "accountid")
    );
    assert_eq!(store.records(&table("contact")).unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn an_outage_is_a_retryable_error_with_the_time_left() {
    let (store, writer) = setup();
    store.faults().go_down_for(Duration::from_secs(30));
    let err = writer.write(contact(account("A-8"))).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    tokio::time::advance(Duration::from_secs(30)).await;
    writer.write(contact(account("A-8"))).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn injected_throttling_and_latency() {
    let (store, writer) = setup();
    store.faults().fail_next(
        1,
        Fault::Throttled {
            retry_after: Duration::from_secs(5),
        },
    );
    let err = writer
        .write(full_account(account("A-9")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(5))
    );
    writer.write(full_account(account("A-9"))).await.unwrap();

    store.faults().set_latency(Duration::from_millis(250));
    let started = tokio::time::Instant::now();
    store.read(&account("A-9")).await.unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(250),
        "a slow store is slow by the configured latency"
    );

    store.faults().restore();
    store.faults().go_down();
    assert!(matches!(
        store.read(&account("A-9")).await,
        Err(Error::Unavailable {
            retry_after: None,
            ..
        })
    ));
    store.faults().restore();
    assert!(store.read(&account("A-9")).await.unwrap().is_some());
}

/// The defect of issue 9: the policy, not the store, decides when a record is hydrated. A write that lacks a
/// required field neither fires hooks nor runs deferred work; the write that completes the record does, once.
#[tokio::test]
async fn hooks_and_deferred_work_wait_for_the_policy_not_the_store() {
    let (store, writer) = setup();
    let account_table = TableName::new("account").unwrap();
    let hooks = Arc::new(AtomicUsize::new(0));
    let counter = hooks.clone();
    writer.hooks().on_hydrated(&account_table, move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    writer.write(contact(account("A-7"))).await.unwrap();
    let placeholder = store.read(&account("A-7")).await.unwrap().unwrap();
    assert_eq!(
        writer
            .guard(&placeholder.record)
            .check("send_invoice")
            .unwrap(),
        Proceed::Deferred
    );
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    writer
        .hooks()
        .defer(&account_table, placeholder.id, move |_| {
            r.fetch_add(1, Ordering::SeqCst);
        });

    // The sync delivers the account without the field the policy requires: still a placeholder everywhere.
    let partial = Record::builder(account("A-7"))
        .field("name", "Fabrikam")
        .build()
        .unwrap();
    writer.write(partial).await.unwrap();
    let stored = store.read(&account("A-7")).await.unwrap().unwrap();
    assert_eq!(
        stored.record.state,
        HydrationState::Placeholder,
        "the store agrees with the policy"
    );
    assert_eq!(
        writer.guard(&stored.record).check("send_invoice").unwrap(),
        Proceed::Deferred
    );
    assert_eq!(
        hooks.load(Ordering::SeqCst),
        0,
        "no hook before the guard says Now"
    );
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "no deferred task before the guard says Now"
    );

    // The write that completes it: hooks and the deferred task run once, exactly when the guard says Now.
    writer.write(full_account(account("A-7"))).await.unwrap();
    let stored = store.read(&account("A-7")).await.unwrap().unwrap();
    assert_eq!(
        writer.guard(&stored.record).check("send_invoice").unwrap(),
        Proceed::Now
    );
    assert_eq!(stored.record.state, HydrationState::Hydrated);
    writer.write(full_account(account("A-7"))).await.unwrap();
    assert_eq!(hooks.load(Ordering::SeqCst), 1, "hooks once per record");
    assert_eq!(ran.load(Ordering::SeqCst), 1, "the deferred task once");
}
