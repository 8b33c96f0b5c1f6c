//! The sync applier over the in-memory store: idempotency, ordering, echoes, hydration, mapping failures and
//! replay, outages, the external-id map, and statistics that add up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

mod common;

use eventual_upsert::memory::MemoryStore;
use eventual_upsert::sync::{Applier, ChangeEvent, Disposition, Ledger, Mapping, MemoryLedger};
use eventual_upsert::{
    BreakerConfig, EnsuringWriter, EntityRef, HydrationState, Policies, Record, RecordStore,
    RetryPolicy, TableName, TablePolicy,
};

struct Setup {
    store: Arc<MemoryStore>,
    ledger: Arc<MemoryLedger>,
    applier: Applier,
    hydrated: Arc<AtomicUsize>,
}

fn setup(
    configure: impl FnOnce(
        eventual_upsert::sync::ApplierBuilder,
    ) -> eventual_upsert::sync::ApplierBuilder,
) -> Setup {
    let store = Arc::new(MemoryStore::new(common::accounts_and_contacts()).named("eu"));
    let policy = Policies::builder()
        .table("account", TablePolicy::builder().primary_name("name"))
        .build()
        .unwrap();
    let writer = EnsuringWriter::new(store.clone()).with_policy(policy);
    let hydrated = Arc::new(AtomicUsize::new(0));
    let counter = hydrated.clone();
    writer
        .hooks()
        .on_hydrated(&TableName::new("account").unwrap(), move |h| {
            if h.was_placeholder() {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
    let ledger = Arc::new(MemoryLedger::new());
    let builder = Applier::builder(writer, ledger.clone())
        .identity("sync-us-eu")
        .origin_column("new_syncorigin")
        .retry(RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            jitter_seed: Some(1),
            ..RetryPolicy::default()
        });
    let applier = configure(builder).build(None).unwrap();
    Setup {
        store,
        ledger,
        applier,
        hydrated,
    }
}

fn account_by_id(id: u128) -> EntityRef {
    EntityRef::by_id("account", Uuid::from_u128(id)).unwrap()
}

fn account_event(id: u128, version: u64, name: &str) -> ChangeEvent {
    let record = Record::builder(account_by_id(id))
        .field("name", name)
        .field("accountnumber", format!("A-{id}"))
        .build()
        .unwrap();
    ChangeEvent::upsert("us", &record, version)
}

fn contact_event(id: u128, parent: u128, version: u64) -> ChangeEvent {
    let record = Record::builder(EntityRef::by_id("contact", Uuid::from_u128(id)).unwrap())
        .field("fullname", format!("Contact {id}"))
        .lookup("parentcustomerid", account_by_id(parent))
        .build()
        .unwrap();
    ChangeEvent::upsert("us", &record, version)
}

async fn name_of(store: &MemoryStore, reference: &EntityRef) -> Option<serde_json::Value> {
    let stored = store.read(reference).await.unwrap()?;
    stored.record.field("name").cloned()
}

#[tokio::test]
async fn the_same_event_twice_applies_once() {
    let s = setup(|b| b);
    let event = account_event(1, 10, "Fabrikam");
    assert!(matches!(
        s.applier.apply(event.clone()).await.unwrap(),
        Disposition::Applied(_)
    ));
    assert!(matches!(
        s.applier.apply(event).await.unwrap(),
        Disposition::Duplicate
    ));
    // Same record and version under another event id: also a duplicate.
    let again = account_event(1, 10, "Fabrikam").with_event_id("another-id");
    assert!(matches!(
        s.applier.apply(again).await.unwrap(),
        Disposition::Duplicate
    ));
    let stats = s.applier.stats();
    assert_eq!((stats.received, stats.applied, stats.duplicate), (3, 1, 2));
    assert!(stats.is_accounted());
}

#[tokio::test]
async fn an_older_version_after_a_newer_one_is_skipped_not_written() {
    let s = setup(|b| b);
    s.applier.apply(account_event(1, 20, "New")).await.unwrap();
    let stale = s.applier.apply(account_event(1, 10, "Old")).await.unwrap();
    assert!(
        matches!(stale, Disposition::Stale { applied: 20 }),
        "{stale:?}"
    );
    assert_eq!(
        name_of(&s.store, &account_by_id(1)).await,
        Some(json!("New"))
    );
    assert_eq!(s.applier.stats().stale, 1);
}

#[tokio::test]
async fn the_target_version_guards_against_a_ledger_that_lost_the_newer_write() {
    let s = setup(|b| b);
    s.applier.apply(account_event(1, 20, "New")).await.unwrap();
    // A worker that wrote v20 but crashed before the ledger heard of it: a fresh ledger, the same target.
    let fresh = Applier::builder(s.applier.writer().clone(), Arc::new(MemoryLedger::new()))
        .identity("sync-us-eu")
        .build(None)
        .unwrap();
    let stale = fresh.apply(account_event(1, 10, "Old")).await.unwrap();
    assert!(
        matches!(stale, Disposition::Stale { applied: 20 }),
        "{stale:?}"
    );
    assert_eq!(
        name_of(&s.store, &account_by_id(1)).await,
        Some(json!("New"))
    );
}

#[tokio::test]
async fn our_own_writes_coming_back_are_echoes() {
    let s = setup(|b| b.ignore_origin("sync-eu-us"));
    let own = account_event(1, 5, "Echo").with_origin("sync-us-eu");
    let reverse = account_event(2, 5, "Echo").with_origin("sync-eu-us");
    let user = account_event(3, 5, "Real").with_origin("alice@contoso.com");
    assert!(matches!(
        s.applier.apply(own).await.unwrap(),
        Disposition::Echo
    ));
    assert!(matches!(
        s.applier.apply(reverse).await.unwrap(),
        Disposition::Echo
    ));
    assert!(matches!(
        s.applier.apply(user).await.unwrap(),
        Disposition::Applied(_)
    ));
    assert_eq!(s.store.read(&account_by_id(1)).await.unwrap(), None);
    let written = s.store.read(&account_by_id(3)).await.unwrap().unwrap();
    assert_eq!(
        written.record.field("new_syncorigin"),
        Some(&json!("sync-us-eu")),
        "writes are stamped"
    );
}

#[tokio::test]
async fn a_contact_before_its_account_gets_a_placeholder_that_the_account_hydrates_once() {
    let s = setup(|b| b);
    let contact = s.applier.apply(contact_event(100, 1, 1)).await.unwrap();
    assert!(matches!(contact, Disposition::Applied(_)), "{contact:?}");
    let placeholder = s.store.read(&account_by_id(1)).await.unwrap().unwrap();
    assert_eq!(placeholder.record.state, HydrationState::Placeholder);
    s.applier
        .apply(account_event(1, 1, "Fabrikam"))
        .await
        .unwrap();
    s.applier
        .apply(account_event(1, 2, "Fabrikam AG"))
        .await
        .unwrap();
    let account = s.store.read(&account_by_id(1)).await.unwrap().unwrap();
    assert_eq!(account.record.state, HydrationState::Hydrated);
    assert_eq!(s.hydrated.load(Ordering::SeqCst), 1, "the hook fires once");
    let stats = s.applier.stats();
    assert_eq!((stats.placeholders_created, stats.hydrated), (1, 1));
}

#[tokio::test]
async fn an_unmappable_event_is_dead_lettered_and_replayed_after_the_fix() {
    let strict = Mapping::from_json(
        r#"{"tables":{"account":{"values":{"name":{"map":{"Fabrikam":"FABRIKAM"}}}}}}"#,
    )
    .unwrap();
    let s = setup(|b| b.mapping(strict));
    let event = account_event(1, 1, "Contoso");
    let disposition = s.applier.apply(event.clone()).await.unwrap();
    let Disposition::DeadLettered(error) = disposition else {
        panic!("expected a dead letter, got {disposition:?}");
    };
    assert!(error.to_string().contains("Contoso"), "{error}");
    let letters = s.ledger.dead_letters(10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].event, event, "the payload is kept");
    assert_eq!(letters[0].correlation_id, event.correlation_id);
    // Redelivery of a dead-lettered event is a duplicate; the letter holds it.
    assert!(matches!(
        s.applier.apply(event.clone()).await.unwrap(),
        Disposition::Duplicate
    ));

    // The fix: a mapping that accepts the value. Replay with an applier built on the same ledger.
    let fixed = Applier::builder(s.applier.writer().clone(), s.ledger.clone())
        .identity("sync-us-eu")
        .build(None)
        .unwrap();
    let report = fixed.replay_dead_letters(10).await.unwrap();
    assert_eq!(report.replayed, 1);
    assert!(s.ledger.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(
        name_of(&s.store, &account_by_id(1)).await,
        Some(json!("Contoso"))
    );
    assert_eq!(fixed.stats().replayed, 1);
    let first = s.applier.stats();
    assert_eq!(
        (first.received, first.dead_lettered, first.duplicate),
        (2, 1, 1)
    );
    assert!(first.is_accounted() && fixed.stats().is_accounted());
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_and_an_outage_pauses_events_until_the_circuit_closes() {
    let s = setup(|b| {
        b.breaker(BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_secs(30),
        })
    });
    s.store.faults().go_down_for(Duration::from_secs(120));
    let disposition = s
        .applier
        .apply(account_event(1, 1, "Patient"))
        .await
        .unwrap();
    assert!(
        matches!(disposition, Disposition::Applied(_)),
        "{disposition:?}"
    );
    let stats = s.applier.stats();
    assert!(stats.retried > 0);
    assert_eq!(
        stats.dead_lettered, 0,
        "an outage is waited out, not dead-lettered"
    );
    assert!(stats.is_accounted());
}

#[tokio::test(start_paused = true)]
async fn transient_failures_that_persist_past_the_policy_are_dead_lettered_as_retryable() {
    let s = setup(|b| {
        b.retry(RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            jitter: false,
            ..RetryPolicy::default()
        })
        .breaker(BreakerConfig {
            failure_threshold: 100,
            open_for: Duration::from_secs(1),
        })
    });
    s.store.faults().go_down();
    let disposition = s
        .applier
        .apply(account_event(1, 1, "Unlucky"))
        .await
        .unwrap();
    assert!(
        matches!(
            &disposition,
            Disposition::DeadLettered(eventual_upsert::Error::RetriesExhausted { .. })
        ),
        "{disposition:?}"
    );
    let letter = &s.ledger.dead_letters(1).await.unwrap()[0];
    assert!(letter.retryable);
    assert_eq!(letter.attempts, 3);
    s.store.faults().restore();
    assert_eq!(s.applier.replay_dead_letters(10).await.unwrap().replayed, 1);
    assert_eq!(
        name_of(&s.store, &account_by_id(1)).await,
        Some(json!("Unlucky"))
    );
}

#[tokio::test]
async fn mapped_tables_get_target_guids_through_the_external_id_map() {
    let s = setup(|b| b.mapped_table("account"));
    s.applier.apply(contact_event(100, 7, 1)).await.unwrap();
    let source = eventual_upsert::sync::SourceRecord::new("us", account_by_id(7));
    let target = s
        .ledger
        .snapshot()
        .id_map
        .into_iter()
        .find_map(|(from, to)| (from == source).then_some(to))
        .expect("mapped on first sight");
    assert_ne!(target, account_by_id(7), "a target GUID of its own");
    let contact = s
        .store
        .read(&EntityRef::by_id("contact", Uuid::from_u128(100)).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        contact.record.lookups["parentcustomerid"], target,
        "the lookup is translated"
    );
    s.applier
        .apply(account_event(7, 1, "Mapped"))
        .await
        .unwrap();
    let account = s.store.read(&target).await.unwrap().unwrap();
    assert_eq!(
        account.record.state,
        HydrationState::Hydrated,
        "the placeholder under the mapped id is hydrated"
    );
    assert_eq!(
        s.store.read(&account_by_id(7)).await.unwrap(),
        None,
        "nothing under the source GUID"
    );
    let aliases: Vec<_> = s
        .ledger
        .snapshot()
        .id_map
        .into_iter()
        .filter(|(_, to)| *to == target)
        .map(|(from, _)| from)
        .collect();
    assert_eq!(aliases, [source], "one source record for the target");
}

#[tokio::test]
async fn delete_events_delete_and_leave_a_tombstone_that_older_updates_cannot_lift() {
    let s = setup(|b| b);
    s.applier
        .apply(account_event(1, 2, "Doomed"))
        .await
        .unwrap();
    let delete = ChangeEvent::delete("us", &account_by_id(1), 3);
    let disposition = s.applier.apply(delete.clone()).await.unwrap();
    assert!(
        matches!(&disposition, Disposition::Deleted(outcome) if outcome.is_deleted()),
        "{disposition:?}"
    );
    assert_eq!(s.store.read(&account_by_id(1)).await.unwrap(), None);
    // A late update older than the delete: stale, never written, the record stays gone.
    let late = s
        .applier
        .apply(account_event(1, 2, "Resurrected?").with_event_id("late"))
        .await
        .unwrap();
    assert!(
        matches!(late, Disposition::Stale { applied: 3 }),
        "{late:?}"
    );
    assert_eq!(s.store.read(&account_by_id(1)).await.unwrap(), None);
    // The same delete again (a redelivery): a duplicate. A delete of a record never seen: applied, absent.
    assert!(matches!(
        s.applier.apply(delete).await.unwrap(),
        Disposition::Duplicate
    ));
    let absent = s
        .applier
        .apply(ChangeEvent::delete("us", &account_by_id(9), 1))
        .await
        .unwrap();
    assert!(
        matches!(&absent, Disposition::Deleted(outcome) if !outcome.is_deleted()),
        "{absent:?}"
    );
    // A newer update after the delete creates the record again.
    s.applier
        .apply(account_event(1, 4, "Reborn"))
        .await
        .unwrap();
    assert_eq!(
        name_of(&s.store, &account_by_id(1)).await,
        Some(json!("Reborn"))
    );
    let stats = s.applier.stats();
    assert!(stats.is_accounted(), "{stats}");
    assert_eq!((stats.applied, stats.stale, stats.duplicate), (4, 1, 1));
}

#[tokio::test]
async fn a_delete_and_an_older_update_in_one_batch_keep_the_record_deleted() {
    let s = setup(|b| b);
    s.applier
        .apply(account_event(1, 1, "Doomed"))
        .await
        .unwrap();
    let dispositions = s
        .applier
        .apply_batch(vec![
            ChangeEvent::delete("us", &account_by_id(1), 5),
            account_event(1, 4, "Older"),
        ])
        .await
        .unwrap();
    assert!(
        matches!(
            dispositions.as_slice(),
            [Disposition::Deleted(_), Disposition::Stale { applied: 5 }]
        ),
        "{dispositions:?}"
    );
    assert_eq!(s.store.read(&account_by_id(1)).await.unwrap(), None);
}

#[tokio::test]
async fn a_ledger_that_stays_down_stops_the_applier_without_settling() {
    let s = setup(|b| {
        b.retry(RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(1),
            ..RetryPolicy::default()
        })
    });
    s.ledger.fail_next(10);
    assert!(s.applier.apply(account_event(1, 1, "X")).await.is_err());
    let stats = s.applier.stats();
    assert_eq!(
        (stats.received, stats.settled()),
        (0, 0),
        "nothing settled, so nothing counted: it will be redelivered and counted then"
    );
    s.ledger.fail_next(0);
    assert_eq!(
        s.ledger.snapshot(),
        Default::default(),
        "the ledger holds nothing of it"
    );
    let again = s.applier.apply(account_event(1, 1, "X")).await.unwrap();
    assert!(
        matches!(again, Disposition::Applied(_) | Disposition::Duplicate),
        "{again:?}"
    );
    assert_eq!(s.ledger.snapshot().totals.received, 1);
}

#[tokio::test]
async fn a_batch_writes_the_newest_version_per_record_and_settles_every_event() {
    let s = setup(|b| b);
    let events = vec![
        account_event(1, 1, "v1"),
        account_event(1, 3, "v3"),
        account_event(1, 2, "v2"),
        account_event(1, 3, "v3").with_event_id("redelivered"),
        contact_event(100, 2, 1), // its account arrives later in the batch
        account_event(2, 1, "Two"),
    ];
    let dispositions = s.applier.apply_batch(events).await.unwrap();
    let kinds: Vec<&str> = dispositions
        .iter()
        .map(|d| match d {
            Disposition::Applied(_) => "applied",
            Disposition::Duplicate => "duplicate",
            Disposition::Stale { .. } => "stale",
            Disposition::Echo => "echo",
            Disposition::DeadLettered(_) => "dead",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "stale",
            "applied",
            "stale",
            "duplicate",
            "applied",
            "applied"
        ]
    );
    assert_eq!(
        name_of(&s.store, &account_by_id(1)).await,
        Some(json!("v3"))
    );
    let account = s.store.read(&account_by_id(2)).await.unwrap().unwrap();
    assert_eq!(account.record.state, HydrationState::Hydrated);
    let stats = s.applier.stats();
    assert!(stats.is_accounted(), "{stats:?}");
    assert_eq!(stats.received, 6);
    // The batch after: an older version is stale, the same event a duplicate.
    let again = s
        .applier
        .apply_batch(vec![
            account_event(1, 2, "v2").with_event_id("late-v2"),
            account_event(1, 3, "v3"),
        ])
        .await
        .unwrap();
    assert!(matches!(again[0], Disposition::Stale { applied: 3 }));
    assert!(matches!(again[1], Disposition::Duplicate));
}

#[tokio::test(start_paused = true)]
async fn a_batch_retries_transient_failures_and_dead_letters_only_the_poison() {
    let strict = Mapping::from_json(
        r#"{"tables":{"account":{"values":{"name":{"map":{"Good":"Good"},"on_unknown":"reject"}}}}}"#,
    )
    .unwrap();
    let s = setup(|b| b.mapping(strict));
    s.store
        .faults()
        .fail_next(2, eventual_upsert::memory::Fault::Unavailable);
    let events = vec![
        account_event(1, 1, "Good"),
        account_event(2, 1, "Poison"),
        account_event(3, 1, "Good"),
    ];
    let dispositions = s.applier.apply_batch(events).await.unwrap();
    assert!(matches!(dispositions[0], Disposition::Applied(_)));
    assert!(matches!(dispositions[1], Disposition::DeadLettered(_)));
    assert!(matches!(dispositions[2], Disposition::Applied(_)));
    let stats = s.applier.stats();
    assert!(stats.retried > 0 && stats.is_accounted(), "{stats:?}");
    assert_eq!(s.ledger.dead_letter_count().await.unwrap(), 1);
}

/// The LOB app writes a contact whose parent is account `A-1` by alternate key: a placeholder made by key.
async fn lob_placeholder_by_key(s: &Setup) -> (EntityRef, eventual_upsert::StoredRecord) {
    let by_key = EntityRef::by_key("account", [("accountnumber", "A-1")]).unwrap();
    let contact = Record::builder(EntityRef::by_id("contact", Uuid::from_u128(100)).unwrap())
        .field("fullname", "Ada")
        .lookup("parentcustomerid", by_key.clone())
        .build()
        .unwrap();
    s.applier.writer().write(contact).await.unwrap();
    let placeholder = s.store.read(&by_key).await.unwrap().unwrap();
    (by_key, placeholder)
}

/// The defect of issue 9: a placeholder created by alternate key (the LOB app), hydrated by a sync event addressed
/// by its source GUID, must take every later update of that GUID too.
#[tokio::test]
async fn a_placeholder_made_by_key_and_hydrated_by_guid_takes_every_later_update() {
    let s = setup(|b| b);
    let (_, placeholder) = lob_placeholder_by_key(&s).await;
    assert_eq!(placeholder.record.state, HydrationState::Placeholder);

    for (version, name) in [(1, "Fabrikam"), (2, "Fabrikam Ltd"), (3, "Fabrikam Group")] {
        let disposition = s
            .applier
            .apply(account_event(1, version, name))
            .await
            .unwrap();
        assert!(
            matches!(&disposition, Disposition::Applied(o) if o.id == placeholder.id),
            "version {version}: {disposition:?}"
        );
    }
    assert_eq!(s.ledger.dead_letter_count().await.unwrap(), 0);
    let accounts = s
        .store
        .records(&TableName::new("account").unwrap())
        .unwrap();
    assert_eq!(accounts.len(), 1, "one record: {accounts:?}");
    assert_eq!(accounts[0].id, placeholder.id);
    assert_eq!(
        accounts[0].record.field("name"),
        Some(&json!("Fabrikam Group"))
    );
    assert_eq!(accounts[0].record.state, HydrationState::Hydrated);
    assert_eq!(
        s.store.read(&account_by_id(1)).await.unwrap(),
        None,
        "nothing under the source GUID"
    );
    let alias = s
        .ledger
        .snapshot()
        .id_map
        .into_iter()
        .find(|(from, _)| from.reference == account_by_id(1));
    assert_eq!(
        alias.map(|(_, to)| to),
        Some(EntityRef::by_id("account", placeholder.id).unwrap()),
        "the ledger's id map names the placeholder as the source GUID's record"
    );
    // A contact synced later whose lookup names the account by its source GUID lands on the same record.
    s.applier.apply(contact_event(101, 1, 1)).await.unwrap();
    let synced = s
        .store
        .read(&EntityRef::by_id("contact", Uuid::from_u128(101)).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        synced.record.lookups["parentcustomerid"],
        EntityRef::by_id("account", placeholder.id).unwrap()
    );
    assert_eq!(
        s.store
            .records(&TableName::new("account").unwrap())
            .unwrap()
            .len(),
        1,
        "no second account"
    );
}

/// A ledger whose settlements of events fail while `failing` is set: a worker that dies between its writes and
/// their settlement.
#[derive(Debug)]
struct LosesSettlements {
    inner: Arc<MemoryLedger>,
    failing: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl eventual_upsert::sync::Ledger for LosesSettlements {
    async fn lookup(
        &self,
        query: &eventual_upsert::sync::LedgerQuery,
    ) -> eventual_upsert::Result<eventual_upsert::sync::LedgerView> {
        self.inner.lookup(query).await
    }
    async fn settle(
        &self,
        settlement: &eventual_upsert::sync::Settlement,
    ) -> eventual_upsert::Result<()> {
        if self.failing.load(Ordering::SeqCst) && !settlement.events.is_empty() {
            return Err(eventual_upsert::Error::Backend {
                backend: "ledger".into(),
                message: "the worker died".into(),
                retryable: false,
                source: None,
            });
        }
        self.inner.settle(settlement).await
    }
    async fn checkpoint(&self, source: &str) -> eventual_upsert::Result<Option<String>> {
        self.inner.checkpoint(source).await
    }
    async fn dead_letters(
        &self,
        limit: usize,
    ) -> eventual_upsert::Result<Vec<eventual_upsert::sync::DeadLetter>> {
        self.inner.dead_letters(limit).await
    }
    async fn dead_letter_count(&self) -> eventual_upsert::Result<usize> {
        self.inner.dead_letter_count().await
    }
    async fn claim_tasks(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> eventual_upsert::Result<Vec<eventual_upsert::sync::DeferredTask>> {
        self.inner.claim_tasks(now_ms, lease, limit).await
    }
    async fn tasks(
        &self,
        limit: usize,
    ) -> eventual_upsert::Result<Vec<eventual_upsert::sync::DeferredTask>> {
        self.inner.tasks(limit).await
    }
    async fn totals(&self) -> eventual_upsert::Result<eventual_upsert::sync::SyncStats> {
        self.inner.totals().await
    }
    async fn prune(
        &self,
        retention: &eventual_upsert::sync::Retention,
        now_ms: u64,
    ) -> eventual_upsert::Result<eventual_upsert::sync::Pruned> {
        self.inner.prune(retention, now_ms).await
    }
}

/// The same defect through a crash: the write that hydrates the key-placeholder happens, its settlement is lost.
/// The alias was recorded before the write, so the redelivered event and the next ones land on that record.
#[tokio::test]
async fn a_crash_between_hydrating_a_key_placeholder_and_settling_loses_no_identity() {
    let s = setup(|b| b);
    let (by_key, placeholder) = lob_placeholder_by_key(&s).await;
    let ledger = Arc::new(LosesSettlements {
        inner: s.ledger.clone(),
        failing: std::sync::atomic::AtomicBool::new(true),
    });
    let applier = Applier::builder(s.applier.writer().clone(), ledger.clone())
        .build(None)
        .unwrap();
    assert!(
        applier
            .apply(account_event(1, 1, "Fabrikam"))
            .await
            .is_err()
    );
    let hydrated = s.store.read(&by_key).await.unwrap().unwrap();
    assert_eq!(
        hydrated.record.state,
        HydrationState::Hydrated,
        "the write happened"
    );
    ledger.failing.store(false, Ordering::SeqCst);
    // The restarted worker gets the same event again, then the next version.
    let again = applier
        .apply(account_event(1, 1, "Fabrikam"))
        .await
        .unwrap();
    assert!(matches!(again, Disposition::Duplicate), "{again:?}");
    let next = applier
        .apply(account_event(1, 2, "Fabrikam Ltd"))
        .await
        .unwrap();
    assert!(
        matches!(&next, Disposition::Applied(o) if o.id == placeholder.id),
        "{next:?}"
    );
    assert_eq!(s.ledger.dead_letter_count().await.unwrap(), 0);
    assert_eq!(
        s.store
            .records(&TableName::new("account").unwrap())
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_version_no_ledger_can_keep_is_dead_lettered_alone() {
    let s = setup(|b| b);
    let dispositions = s
        .applier
        .apply_batch(vec![
            account_event(1, u64::MAX, "Too far"),
            account_event(2, 1, "Fine"),
        ])
        .await
        .unwrap();
    assert!(
        matches!(&dispositions[0], Disposition::DeadLettered(e) if e.to_string().contains("source_version")),
        "{dispositions:?}"
    );
    assert!(
        matches!(dispositions[1], Disposition::Applied(_)),
        "{dispositions:?}"
    );
    assert_eq!(s.store.read(&account_by_id(1)).await.unwrap(), None);
}
