//! The ensure-then-write orchestration checked against a mocked store: which calls are made, in which order,
//! with what, and what the writer makes of each answer.

use std::num::NonZeroUsize;
use std::sync::Arc;

use async_trait::async_trait;
use mockall::{Sequence, mock};
use uuid::Uuid;

use eventual_upsert::{
    Change, Delete, DeleteOutcome, Ensured, EnsuringWriter, EntityRef, Error, HydrationState,
    Policies, Record, RecordStore, Result, StoredRecord, TablePolicy, Version, Write, WriteOutcome,
};

mock! {
    Store {}
    #[async_trait]
    impl RecordStore for Store {
        fn backend(&self) -> &str;
        async fn read(&self, reference: &EntityRef) -> Result<Option<StoredRecord>>;
        async fn write(&self, write: &Write) -> Result<WriteOutcome>;
        async fn delete(&self, delete: &Delete) -> Result<DeleteOutcome>;
        async fn write_batch(&self, writes: &[Write]) -> Vec<Result<WriteOutcome>>;
        async fn ensure_placeholders(&self, placeholders: Vec<Record>) -> Vec<Result<Ensured>>;
    }
}

impl std::fmt::Debug for MockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MockStore")
    }
}

fn account(n: u32) -> EntityRef {
    EntityRef::by_key("account", [("accountnumber", format!("A-{n}"))]).unwrap()
}

fn contact_of(n: u32) -> Write {
    Write::upsert(
        Record::builder(EntityRef::by_id("contact", Uuid::new_v4()).unwrap())
            .field("fullname", format!("Contact {n}"))
            .lookup("parentcustomerid", account(n))
            .build()
            .unwrap(),
    )
}

fn created() -> WriteOutcome {
    WriteOutcome {
        id: Uuid::new_v4(),
        version: Version(1),
        change: Change::Created,
        previous_state: None,
        state: HydrationState::Hydrated,
    }
}

fn missing_reference(write: &Write) -> Error {
    let target = write.record.lookups.values().next().unwrap().clone();
    Error::MissingReference {
        reference: Box::new(write.record.reference.clone()),
        field: "parentcustomerid".try_into().unwrap(),
        target: Box::new(target),
    }
}

fn mock_store() -> MockStore {
    let mut store = MockStore::new();
    store.expect_backend().return_const("mock".to_owned());
    store
}

fn writer(store: MockStore) -> EnsuringWriter {
    let policy = Policies::builder()
        .table(
            "account",
            TablePolicy::builder()
                .primary_name("name")
                .marker("new_isplaceholder"),
        )
        .build()
        .unwrap();
    EnsuringWriter::new(Arc::new(store)).with_policy(policy)
}

#[tokio::test]
async fn ensures_lookup_targets_before_writing() {
    let mut store = mock_store();
    let mut seq = Sequence::new();
    store
        .expect_ensure_placeholders()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|placeholders| {
            assert_eq!(placeholders.len(), 1);
            let p = &placeholders[0];
            assert_eq!(p.reference, account(1));
            assert_eq!(p.state, HydrationState::Placeholder);
            assert_eq!(
                p.field("name"),
                Some(&"A-1".into()),
                "labelled from the key"
            );
            assert_eq!(p.field("new_isplaceholder"), Some(&true.into()), "marked");
            vec![Ok(Ensured::Created { id: Uuid::new_v4() })]
        });
    store
        .expect_write_batch()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|writes| {
            assert_eq!(writes.len(), 1);
            assert_eq!(
                writes[0].record.field("fullname"),
                Some(&"Contact 1".into())
            );
            vec![Ok(created())]
        });
    let written = writer(store).write(contact_of(1)).await.unwrap();
    assert_eq!(written.outcome.change, Change::Created);
    assert_eq!(written.ensured.created().collect::<Vec<_>>(), [&account(1)]);
}

#[tokio::test]
async fn a_target_that_cannot_be_ensured_blocks_only_its_referrers() {
    let mut store = mock_store();
    store
        .expect_ensure_placeholders()
        .times(1)
        .returning(|placeholders| {
            placeholders
                .iter()
                .map(|p| {
                    if p.reference == account(1) {
                        Err(Error::Throttled {
                            backend: "mock".into(),
                            retry_after: Some(std::time::Duration::from_secs(2)),
                        })
                    } else {
                        Ok(Ensured::Existed)
                    }
                })
                .collect()
        });
    // Both go out with the ensure (one round trip); the store refuses the one whose target is missing.
    store.expect_write_batch().times(1).returning(|writes| {
        writes
            .iter()
            .map(|w| {
                let target = &w.record.lookups["parentcustomerid"];
                if *target == account(1) {
                    Err(Error::MissingReference {
                        reference: Box::new(w.record.reference.clone()),
                        field: eventual_upsert::ColumnName::new("parentcustomerid").unwrap(),
                        target: Box::new(target.clone()),
                    })
                } else {
                    Ok(created())
                }
            })
            .collect()
    });
    let report = writer(store)
        .write_batch([contact_of(1), contact_of(2)])
        .await;
    match &report.results[0] {
        Err(err @ Error::ReferenceNotEnsured { target, .. }) => {
            assert_eq!(**target, account(1));
            assert!(
                err.is_retryable(),
                "the cause was transient, so is the failure"
            );
            assert_eq!(err.retry_after(), Some(std::time::Duration::from_secs(2)));
        }
        other => panic!("expected ReferenceNotEnsured, got {other:?}"),
    }
    assert!(report.results[1].is_ok());
}

/// A store where the target exists at ensure time but is gone when the write lands; the retry gets `second`.
fn store_where_the_target_vanishes(second: fn(&[Write]) -> Vec<Result<WriteOutcome>>) -> MockStore {
    let mut store = mock_store();
    let mut seq = Sequence::new();
    store
        .expect_ensure_placeholders()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| vec![Ok(Ensured::Existed)]);
    store
        .expect_write_batch()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|writes| vec![Err(missing_reference(&writes[0]))]);
    store
        .expect_ensure_placeholders()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|placeholders| {
            assert_eq!(
                placeholders[0].reference,
                account(1),
                "the vanished target is ensured again"
            );
            vec![Ok(Ensured::Created { id: Uuid::new_v4() })]
        });
    store
        .expect_write_batch()
        .times(1)
        .in_sequence(&mut seq)
        .returning(second);
    store
}

#[tokio::test]
async fn a_vanished_target_is_ensured_again_once_then_reported() {
    let store = store_where_the_target_vanishes(|writes| vec![Err(missing_reference(&writes[0]))]);
    let err = writer(store).write(contact_of(1)).await.unwrap_err();
    assert!(
        matches!(&err, Error::MissingReference { target, .. } if **target == account(1)),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_retry_that_succeeds_reports_success() {
    let store = store_where_the_target_vanishes(|_| vec![Ok(created())]);
    let written = writer(store).write(contact_of(1)).await.unwrap();
    assert_eq!(
        written.ensured.created().count(),
        1,
        "the re-ensure is part of the report"
    );
}

#[tokio::test]
async fn a_batch_ensures_its_distinct_targets_in_one_call_and_writes_in_chunks() {
    let mut store = mock_store();
    store
        .expect_ensure_placeholders()
        .times(1)
        .returning(|placeholders| {
            let mut refs: Vec<String> = placeholders
                .iter()
                .map(|p| p.reference.to_string())
                .collect();
            refs.sort();
            assert_eq!(
                refs,
                [
                    "account(accountnumber='A-0')",
                    "account(accountnumber='A-1')"
                ],
                "de-duplicated"
            );
            placeholders.iter().map(|_| Ok(Ensured::Existed)).collect()
        });
    let mut sizes = Vec::new();
    let (tx, rx) = std::sync::mpsc::channel();
    store
        .expect_write_batch()
        .times(3)
        .returning(move |writes| {
            tx.send(writes.len()).unwrap();
            writes.iter().map(|_| Ok(created())).collect()
        });
    let writes: Vec<Write> = (0..5).map(|n| contact_of(n % 2)).collect();
    let report = writer(store)
        .with_batch_size(NonZeroUsize::new(2).unwrap())
        .write_batch(writes)
        .await;
    assert!(report.is_success());
    assert_eq!(report.counts().created, 5);
    sizes.extend(rx.try_iter());
    assert_eq!(sizes, [2, 2, 1]);
}

#[tokio::test]
async fn no_lookups_means_no_ensure_call() {
    let mut store = mock_store();
    store.expect_ensure_placeholders().never();
    store
        .expect_write_batch()
        .times(1)
        .returning(|writes| writes.iter().map(|_| Ok(created())).collect());
    let plain = Record::builder(account(9))
        .field("name", "Plain")
        .build()
        .unwrap();
    let written = writer(store).write(plain).await.unwrap();
    assert_eq!(written.ensured.items.len(), 0);
}

#[tokio::test]
async fn a_store_that_loses_results_gets_an_error_not_a_panic() {
    let mut store = mock_store();
    store.expect_ensure_placeholders().returning(|_| Vec::new());
    store.expect_write_batch().returning(|_| Vec::new());
    let writer = writer(store);
    let err = writer.write(contact_of(1)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Backend { message, .. } if message.contains("fewer results")),
        "a lost result is an error: {err:?}"
    );
    let plain = Record::builder(account(9))
        .field("name", "Plain")
        .build()
        .unwrap();
    let err = writer.write(plain).await.unwrap_err();
    assert!(
        matches!(err, Error::Backend { .. }),
        "a lost write result is an error: {err:?}"
    );
}

#[tokio::test]
async fn a_transient_failure_while_checking_a_key_conflict_stays_retryable() {
    let mut store = mock_store();
    store.expect_write_batch().times(1).returning(|writes| {
        vec![Err(Error::DuplicateKey {
            table: "account".try_into().unwrap(),
            key: match &account(3).key {
                eventual_upsert::Key::Alternate(key) => key.clone(),
                eventual_upsert::Key::Id(_) => unreachable!(),
            },
            existing: Uuid::from_u128(writes.len() as u128),
        })]
    });
    store.expect_read().times(1).returning(|_| {
        Err(Error::Unavailable {
            backend: "mock".into(),
            reason: "blip".into(),
            retry_after: None,
        })
    });
    let by_guid = Record::builder(EntityRef::by_id("account", Uuid::new_v4()).unwrap())
        .field("accountnumber", "A-3")
        .field("name", "Fabrikam")
        .build()
        .unwrap();
    let err = writer(store).write(by_guid).await.unwrap_err();
    assert!(
        err.is_retryable(),
        "the write must stay retryable, not become a permanent conflict: {err:?}"
    );
}
