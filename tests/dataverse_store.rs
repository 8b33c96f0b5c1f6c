//! `DataverseStore` behaviour that only shows over HTTP, against the emulator: URL encoding, round trips per
//! batch, retries, the circuit breaker, tokens, hydration races, bulk upserts, parallelism and TLS.

#[path = "common/dataverse.rs"]
mod dataverse;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use uuid::Uuid;

use dataverse_emulator::{EmulatedTable, Emulator};
use eventual_upsert::dataverse::DataverseConfig;
use eventual_upsert::dataverse::auth::{Secret, TokenProvider};
use eventual_upsert::{
    BreakerConfig, Change, Delete, DeleteOutcome, EnsureExists, EnsuringWriter, EntityRef, Error,
    HydrationState, Record, RecordStore, Result, RetryPolicy, Version, Write, conformance,
};

fn account(number: &str) -> EntityRef {
    EntityRef::by_key("account", [("accountnumber", number)]).unwrap()
}

fn named(reference: &EntityRef, name: &str) -> Record {
    Record::builder(reference.clone())
        .field("name", name)
        .build()
        .unwrap()
}

fn config(emulator: &Emulator) -> DataverseConfig {
    dataverse::conformance_settings(
        DataverseConfig::new(emulator.base_url(), conformance::schema())
            .with_retry(dataverse::quick_retries()),
    )
}

#[tokio::test]
async fn a_key_value_with_url_syntax_addresses_exactly_one_record() {
    let emulator = dataverse::conformance_emulator().await;
    let store = dataverse::conformance_store(&emulator);
    let tricky = "O'Brien & Co/1?";
    let reference = account(tricky);
    let created = store
        .write(&Write::upsert(named(&reference, "O'Brien")))
        .await
        .unwrap();
    assert_eq!(created.change, Change::Created);
    let read = store
        .read(&reference)
        .await
        .unwrap()
        .expect("found by the same key");
    assert_eq!(read.id, created.id);
    assert_eq!(read.record.field("accountnumber"), Some(&json!(tricky)));
    let rows = emulator.rows("account");
    assert_eq!(
        rows.len(),
        1,
        "no other row was created or addressed: {rows:?}"
    );
    assert_eq!(rows[0]["accountnumber"], json!(tricky));
    // A prefix of the value is a different key, not the same record.
    assert!(
        store
            .read(&account("O'Brien & Co"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_batch_of_2500_writes_takes_three_round_trips() {
    let emulator = dataverse::conformance_emulator().await;
    let store = dataverse::conformance_store(&emulator);
    let writes: Vec<Write> = (0..2500)
        .map(|i| Write::upsert(named(&account(&format!("B-{i}")), "Batched")))
        .collect();
    emulator.reset_counts();
    let results = store.write_batch(&writes).await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(o) if o.change == Change::Created))
    );
    assert_eq!(emulator.counts().http_requests, 3);
    assert_eq!(emulator.row_count("account"), 2500);
}

#[tokio::test]
async fn ensure_and_write_of_a_lob_request_is_one_round_trip() {
    let emulator = dataverse::conformance_emulator().await;
    let store = Arc::new(dataverse::conformance_store(&emulator));
    let writer = EnsuringWriter::new(store.clone()).with_policy(conformance::policy());
    let parent = account("LOB-1");
    let contact = Record::builder(
        EntityRef::by_key(
            "contact",
            [
                (
                    "emailaddress1",
                    eventual_upsert::KeyValue::from("ada@example.com"),
                ),
                ("new_externalid", 1.into()),
            ],
        )
        .unwrap(),
    )
    .field("fullname", "Ada")
    .lookup("parentcustomerid", parent.clone())
    .build()
    .unwrap();
    emulator.reset_counts();
    let written = writer.write(contact).await.unwrap();
    assert_eq!(written.ensured.created().collect::<Vec<_>>(), [&parent]);
    assert_eq!(
        emulator.counts().http_requests,
        1,
        "placeholder and write share one $batch"
    );
    let placeholder = store.read(&parent).await.unwrap().unwrap();
    assert_eq!(placeholder.record.state, HydrationState::Placeholder);
    let stored = store
        .read(&EntityRef::by_id("contact", written.outcome.id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.record.lookups["parentcustomerid"].id(),
        Some(placeholder.id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batched_hydrations_report_the_transition_once() {
    let emulator = dataverse::conformance_emulator().await;
    let store = Arc::new(dataverse::conformance_store(&emulator));
    let reference = account("HYD-1");
    let report = store
        .ensure_exists(std::slice::from_ref(&reference), &conformance::policy())
        .await;
    assert_eq!(report.created().count(), 1);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (store, reference) = (store.clone(), reference.clone());
        tasks.spawn(async move {
            let write = Write::upsert(named(&reference, &format!("Real {i}")));
            store
                .write_batch(std::slice::from_ref(&write))
                .await
                .remove(0)
        });
    }
    let mut hydrated = 0;
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.unwrap().unwrap();
        hydrated += usize::from(outcome.became_hydrated());
    }
    assert_eq!(hydrated, 1, "exactly one write reports the hydration");
    let stored = store.read(&reference).await.unwrap().unwrap();
    assert_eq!(stored.record.state, HydrationState::Hydrated);
    assert_eq!(
        emulator.rows("account")[0][dataverse::STATE_COLUMN],
        json!(false)
    );
}

#[tokio::test]
async fn throttling_is_retried_after_the_services_retry_after() {
    let emulator = dataverse::conformance_emulator().await;
    let store = dataverse::conformance_store(&emulator);
    emulator.faults().fail_next(1, 429);
    let started = std::time::Instant::now();
    let written = store
        .write_batch(&[Write::upsert(named(&account("T-1"), "T"))])
        .await;
    assert!(written[0].is_ok(), "{:?}", written[0]);
    assert_eq!(store.stats().retries, 1);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited the Retry-After (1 s), not the 5 ms backoff"
    );
}

#[tokio::test]
async fn an_outage_opens_the_circuit_and_later_calls_fail_fast() {
    let emulator = dataverse::conformance_emulator().await;
    let store = config(&emulator)
        .with_retry(RetryPolicy::never())
        .with_breaker(BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_secs(3600),
        })
        .build()
        .unwrap();
    emulator.faults().outage(true);
    for _ in 0..2 {
        let err = store.read(&account("X")).await.unwrap_err();
        assert!(
            matches!(err, Error::Unavailable { .. }) && err.is_retryable(),
            "{err:?}"
        );
    }
    let before = emulator.counts().http_requests;
    let err = store.read(&account("X")).await.unwrap_err();
    assert!(matches!(err, Error::CircuitOpen { .. }), "{err:?}");
    assert!(
        err.retry_after()
            .is_some_and(|d| d > Duration::from_secs(3000))
    );
    assert_eq!(
        emulator.counts().http_requests,
        before,
        "an open circuit sends nothing"
    );
}

#[tokio::test]
async fn the_circuit_closes_when_the_service_is_back() {
    let emulator = dataverse::conformance_emulator().await;
    let store = config(&emulator)
        .with_retry(RetryPolicy::never())
        .with_breaker(BreakerConfig {
            failure_threshold: 1,
            open_for: Duration::ZERO,
        })
        .build()
        .unwrap();
    emulator.faults().outage(true);
    assert!(store.read(&account("X")).await.is_err());
    emulator.faults().outage(false);
    assert_eq!(
        store.read(&account("X")).await.unwrap(),
        None,
        "the probe goes through and succeeds"
    );
    assert_eq!(store.read(&account("X")).await.unwrap(), None);
}

#[tokio::test]
async fn not_found_and_conflicts_do_not_open_the_circuit() {
    let emulator = dataverse::conformance_emulator().await;
    let store = config(&emulator)
        .with_breaker(BreakerConfig {
            failure_threshold: 1,
            open_for: Duration::from_secs(3600),
        })
        .build()
        .unwrap();
    let existing = account("C-1");
    let version = store
        .write(&Write::upsert(named(&existing, "C")))
        .await
        .unwrap()
        .version;
    for _ in 0..3 {
        assert!(matches!(
            RecordStore::delete(&store, &Delete::new(account("missing"))).await,
            Ok(DeleteOutcome::Absent)
        ));
        assert!(matches!(
            RecordStore::delete(
                &store,
                &Delete::if_version(existing.clone(), Version(version.0 + 1))
            )
            .await,
            Err(Error::VersionMismatch { .. })
        ));
        assert!(matches!(
            store
                .write(&Write::create_only(named(&existing, "again")))
                .await,
            Err(Error::AlreadyExists { .. })
        ));
        assert!(matches!(
            store
                .write(&Write::update_only(named(&account("missing"), "m")))
                .await,
            Err(Error::NotFound { .. })
        ));
    }
    assert!(store.read(&existing).await.is_ok());
}

/// Hands out a stale token until told it was rejected.
#[derive(Debug)]
struct RotatingToken {
    rejected: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl TokenProvider for RotatingToken {
    async fn token(&self) -> Result<Secret> {
        let fresh = self.rejected.load(std::sync::atomic::Ordering::SeqCst);
        Ok(Secret::new(if fresh {
            "good-token"
        } else {
            "stale-token"
        }))
    }

    fn invalidate(&self, _token: &Secret) {
        self.rejected
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_rejected_token_is_refreshed_once() {
    let emulator = Emulator::start(dataverse::conformance_tables().require_token("good-token"))
        .await
        .unwrap();
    let store = config(&emulator)
        .with_token_provider(Arc::new(RotatingToken {
            rejected: Default::default(),
        }))
        .build()
        .unwrap();
    assert_eq!(store.read(&account("A")).await.unwrap(), None);
    assert_eq!(store.stats().token_refreshes, 1);
    let anonymous = config(&emulator).build().unwrap();
    let err = anonymous.read(&account("A")).await.unwrap_err();
    assert!(
        matches!(err, Error::Unauthorized { .. }) && !err.is_retryable(),
        "{err:?}"
    );
}

#[tokio::test]
async fn client_credentials_get_a_token_from_the_identity_endpoint() {
    let secret = "s3cr3t-value";
    // The emulator checks the scope, so it must be its own address; it is known only once it runs.
    let emulator = Emulator::start(dataverse::conformance_tables().client_credentials(
        "contoso-tenant",
        "app-id",
        secret,
        "",
    ))
    .await
    .unwrap();
    let store = config(&emulator)
        .with_client_credentials("contoso-tenant", "app-id", secret)
        .with_authority(emulator.base_url())
        .build()
        .unwrap();
    store
        .write(&Write::upsert(named(&account("CC-1"), "CC")))
        .await
        .unwrap();
    assert!(!format!("{store:?}").contains(secret));
    let wrong = config(&emulator)
        .with_client_credentials("contoso-tenant", "app-id", "wrong")
        .with_authority(emulator.base_url())
        .build()
        .unwrap();
    let err = wrong.read(&account("CC-1")).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    assert!(!err.to_string().contains("wrong") && !format!("{err:?}").contains(secret));
}

#[tokio::test]
async fn bulk_upserts_use_upsert_multiple_in_chunks_or_fall_back_to_batches() {
    let emulator = Emulator::start(
        dataverse::conformance_tables().table(
            EmulatedTable::new("new_legacy", "new_legacies", "new_legacyid", "new_name")
                .alternate_key(&["new_code"])
                .bulk_supported(false),
        ),
    )
    .await
    .unwrap();
    let schema = eventual_upsert::schema::Schema::new(
        conformance::schema().tables().cloned().chain([
            eventual_upsert::schema::TableSchema::builder("new_legacy")
                .primary_name("new_name")
                .alternate_key([("new_code", eventual_upsert::KeyKind::String)])
                .build()
                .unwrap(),
        ]),
    )
    .unwrap();
    let store = dataverse::conformance_settings(DataverseConfig::new(emulator.base_url(), schema))
        .with_bulk_chunk(NonZeroUsize::new(500).unwrap())
        .build()
        .unwrap();
    let accounts: Vec<Record> = (0..1200)
        .map(|i| named(&account(&format!("BU-{i}")), "Bulk"))
        .collect();
    emulator.reset_counts();
    let report = store.bulk_upsert(&accounts).await;
    assert_eq!(report.written(), 1200);
    assert_eq!(
        emulator.counts().by_kind.get("bulk").copied(),
        Some(3),
        "{:?}",
        emulator.counts()
    );
    assert_eq!(emulator.row_count("account"), 1200);

    let legacy: Vec<Record> = (0..10)
        .map(|i| {
            Record::builder(
                EntityRef::by_key("new_legacy", [("new_code", format!("L-{i}"))]).unwrap(),
            )
            .field("new_name", "Legacy")
            .build()
            .unwrap()
        })
        .collect();
    emulator.reset_counts();
    let report = store.bulk_upsert(&legacy).await;
    assert_eq!(
        report.written(),
        10,
        "{:?}",
        report.failures().collect::<Vec<_>>()
    );
    assert_eq!(
        emulator.counts().by_kind.get("bulk").copied().unwrap_or(0),
        0
    );
    assert_eq!(emulator.row_count("new_legacy"), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_batches_follow_the_dop_hint_and_stay_under_the_concurrency_limit() {
    let emulator = Emulator::start(
        dataverse::conformance_tables()
            .dop_hint(2)
            .concurrency_limit(2),
    )
    .await
    .unwrap();
    let store = config(&emulator)
        .with_retry(RetryPolicy::never())
        .with_batch_size(NonZeroUsize::new(100).unwrap())
        .build()
        .unwrap();
    // The first answer carries the hint.
    assert_eq!(store.read(&account("P")).await.unwrap(), None);
    assert_eq!(store.parallel_limit(), 2);
    let writes: Vec<Write> = (0..2000)
        .map(|i| Write::upsert(named(&account(&format!("P-{i}")), "Parallel")))
        .collect();
    let results = store.write_batch(&writes).await;
    let failed: Vec<&Error> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(emulator.counts().throttled, 0);
}

#[tokio::test]
async fn tls_with_the_emulators_certificate() {
    let emulator = Emulator::start(dataverse::conformance_tables().tls(true))
        .await
        .unwrap();
    assert!(emulator.base_url().starts_with("https://"));
    let pem = emulator
        .certificate_pem()
        .expect("a generated certificate")
        .to_owned();
    let store = config(&emulator)
        .with_root_certificate_pem(pem)
        .build()
        .unwrap();
    store
        .write(&Write::upsert(named(&account("TLS-1"), "Secure")))
        .await
        .unwrap();
    let untrusting = config(&emulator)
        .with_retry(RetryPolicy::never())
        .build()
        .unwrap();
    assert!(untrusting.read(&account("TLS-1")).await.is_err());
}

#[tokio::test]
async fn unchanged_writes_do_not_reach_the_service() {
    let emulator = dataverse::conformance_emulator().await;
    let store = dataverse::conformance_store(&emulator);
    let reference = account("U-1");
    let first = store
        .write(&Write::upsert(named(&reference, "Same")))
        .await
        .unwrap();
    emulator.reset_counts();
    let again = store
        .write(&Write::upsert(named(&reference, "Same")))
        .await
        .unwrap();
    assert_eq!(
        (again.change, again.version),
        (Change::Unchanged, first.version)
    );
    assert_eq!(emulator.counts().http_requests, 1, "one read, no write");
}

#[tokio::test]
async fn an_atomic_write_is_all_or_nothing() {
    let emulator = dataverse::conformance_emulator().await;
    let store = dataverse::conformance_store(&emulator);
    let existing = account("AT-0");
    store
        .write(&Write::upsert(named(&existing, "Existing")))
        .await
        .unwrap();
    let ok = [
        Write::upsert(named(&account("AT-1"), "One")),
        Write::upsert(named(&account("AT-2"), "Two")),
    ];
    let outcomes = store.write_atomic(&ok).await.unwrap();
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes.iter().all(|o| o.change == Change::Created));
    let failing = [
        Write::upsert(named(&account("AT-3"), "Three")),
        Write::create_only(named(&existing, "Clash")),
    ];
    let err = store.write_atomic(&failing).await.unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyExists { reference } if **reference == existing),
        "{err:?}"
    );
    assert_eq!(
        store.read(&account("AT-3")).await.unwrap(),
        None,
        "the first write of the failed change set was rolled back"
    );
    assert_eq!(emulator.row_count("account"), 3);
}

#[tokio::test]
async fn a_failure_that_may_have_been_applied_is_retried_only_for_idempotent_requests() {
    let emulator = dataverse::conformance_emulator().await;
    let store = dataverse::conformance_store(&emulator);
    // An upsert may be sent twice: retried after a 500.
    emulator.faults().fail_next(1, 500);
    store
        .write_batch(&[Write::upsert(named(&account("I-1"), "Upsert"))])
        .await
        .remove(0)
        .unwrap();
    assert_eq!(store.stats().retries, 1);
    // A create-only write may not: a second try after a 500 that did create the row would report "exists".
    emulator.faults().fail_next(1, 500);
    let result = store
        .write_batch(&[Write::create_only(named(&account("I-2"), "Create"))])
        .await
        .remove(0);
    let err = result.unwrap_err();
    assert!(
        err.is_retryable(),
        "the caller may still decide to retry: {err:?}"
    );
    assert_eq!(store.stats().retries, 1, "no retry by the store");
    // A 503 is a refusal, safe to resend even for create-only writes.
    emulator.faults().fail_next(1, 503);
    store
        .write_batch(&[Write::create_only(named(&account("I-3"), "Create"))])
        .await
        .remove(0)
        .unwrap();
    assert_eq!(store.stats().retries, 2);
}

#[tokio::test]
async fn a_delete_is_one_request_retried_after_a_transient_failure() {
    let emulator = dataverse::conformance_emulator().await;
    let store = dataverse::conformance_store(&emulator);
    let reference = account("D-1");
    let created = store
        .write(&Write::upsert(named(&reference, "Doomed")))
        .await
        .unwrap();
    emulator.reset_counts();
    // A delete is idempotent: resent after a 500 that may have reached the service.
    emulator.faults().fail_next(1, 500);
    let outcome = RecordStore::delete(&store, &Delete::new(reference.clone()))
        .await
        .unwrap();
    assert!(outcome.is_deleted(), "{outcome:?}");
    assert_eq!(
        outcome.id(),
        None,
        "the service does not say which row a delete by key removed"
    );
    assert_eq!(store.stats().retries, 1);
    let counts = emulator.counts();
    assert_eq!(counts.http_requests, 2, "the failed attempt and the retry");
    assert_eq!(counts.by_kind.get("delete"), Some(&1));
    assert_eq!(emulator.row_count("account"), 0);
    // By GUID the id is known; the inherent delete still says whether a record went.
    let by_id = EntityRef::by_id("account", created.id).unwrap();
    assert_eq!(
        RecordStore::delete(&store, &Delete::new(by_id.clone()))
            .await
            .unwrap(),
        DeleteOutcome::Absent
    );
    store
        .write(&Write::upsert(named(&by_id, "Again")))
        .await
        .unwrap();
    let outcome = RecordStore::delete(&store, &Delete::new(by_id.clone()))
        .await
        .unwrap();
    assert_eq!(outcome, DeleteOutcome::deleted(Some(created.id), None));
    assert!(!store.delete(&by_id).await.unwrap());
}

#[tokio::test]
async fn a_conditional_delete_sends_if_match_and_the_tag() {
    let (url, seen) = recording_service().await;
    let store = dataverse::conformance_settings(DataverseConfig::new(url, conformance::schema()))
        .with_tag("sync")
        .build()
        .unwrap();
    let conditional = Delete::if_version(account("H-1"), Version(42));
    assert_eq!(
        RecordStore::delete(&store, &conditional).await.unwrap(),
        DeleteOutcome::Absent,
        "a 404 for the row itself is absent"
    );
    let id = Uuid::from_u128(0xD1);
    assert!(
        !store
            .delete(&EntityRef::by_id("account", id).unwrap())
            .await
            .unwrap()
    );
    let seen = seen.lock().unwrap().clone();
    let paths: Vec<&str> = seen.iter().map(|(path, _)| path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/data/v9.2/accounts(accountnumber='H-1')?tag=sync".to_owned(),
            format!("/api/data/v9.2/accounts({id})?tag=sync"),
        ]
    );
    let if_match = |i: usize| seen[i].1.get("if-match").and_then(|v| v.to_str().ok());
    assert_eq!(if_match(0), Some("W/\"42\""));
    assert_eq!(if_match(1), None, "no condition, no If-Match");
}

#[tokio::test]
async fn metadata_fills_in_entity_sets_and_navigation_properties() {
    let emulator = Emulator::start(
        dataverse::conformance_tables().table(
            EmulatedTable::new("new_project", "new_projectses", "new_projectid", "new_name")
                .alternate_key(&["new_code"])
                .lookup("new_AccountId", "new_accountid", "account"),
        ),
    )
    .await
    .unwrap();
    let schema = eventual_upsert::schema::Schema::new(
        conformance::schema().tables().cloned().chain([
            eventual_upsert::schema::TableSchema::builder("new_project")
                .primary_name("new_name")
                .alternate_key([("new_code", eventual_upsert::KeyKind::String)])
                .lookup("new_accountid", "account")
                .build()
                .unwrap(),
        ]),
    )
    .unwrap();
    // No Dataverse names given: the irregular entity set and the case-sensitive navigation property come from
    // the service.
    let store = DataverseConfig::new(emulator.base_url(), schema)
        .load_metadata()
        .await
        .unwrap()
        .build()
        .unwrap();
    let parent = account("M-1");
    store
        .write(&Write::upsert(named(&parent, "Parent")))
        .await
        .unwrap();
    let project = Record::builder(EntityRef::by_key("new_project", [("new_code", "P-1")]).unwrap())
        .field("new_name", "Project")
        .lookup("new_accountid", parent.clone())
        .build()
        .unwrap();
    store.write(&Write::upsert(project)).await.unwrap();
    assert_eq!(emulator.row_count("new_project"), 1);
}

/// Every request a fake service received: path and headers.
type Seen = Arc<std::sync::Mutex<Vec<(String, axum::http::HeaderMap)>>>;

/// A fake service that answers 404 to everything and remembers what it was sent.
async fn recording_service() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        record
            .lock()
            .unwrap()
            .push((request.uri().to_string(), request.headers().clone()));
        async {
            (
                axum::http::StatusCode::NOT_FOUND,
                [("content-type", "application/json")],
                r#"{"error":{"code":"0x80060891","message":"A record with the specified key values does not exist in account entity"}}"#,
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    // Stops with the test's runtime.
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), seen)
}

#[tokio::test]
async fn requests_carry_request_ids_one_correlation_id_per_operation_and_the_optional_headers() {
    let (url, seen) = recording_service().await;
    let store = dataverse::conformance_settings(DataverseConfig::new(url, conformance::schema()))
        .with_static_token("t0ken")
        .with_bypass_custom_plugins(true)
        .build()
        .unwrap();
    let id = Uuid::from_u128(0xC0FFEE);
    eventual_upsert::correlation::scope(id, async {
        assert_eq!(store.read(&account("H-1")).await.unwrap(), None);
        assert_eq!(store.read(&account("H-2")).await.unwrap(), None);
    })
    .await;
    assert_eq!(store.read(&account("H-3")).await.unwrap(), None);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    let header = |i: usize, name: &str| {
        seen[i]
            .1
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let correlation = |i| header(i, "x-ms-correlation-request-id");
    assert_eq!(
        correlation(0),
        Some(id.to_string()),
        "the caller's correlation id"
    );
    assert_eq!(correlation(1), Some(id.to_string()));
    assert!(
        correlation(2).is_some_and(|c| c != id.to_string()),
        "a new one outside the scope"
    );
    let request_ids: std::collections::BTreeSet<_> = (0..3)
        .map(|i| header(i, "x-ms-client-request-id"))
        .collect();
    assert_eq!(
        request_ids.len(),
        3,
        "one request id per request: {request_ids:?}"
    );
    assert!(request_ids.iter().all(Option::is_some));
    assert_eq!(
        header(0, "mscrm.bypasscustompluginexecution").as_deref(),
        Some("true")
    );
    assert_eq!(header(0, "authorization").as_deref(), Some("Bearer t0ken"));
    assert_eq!(header(0, "odata-version").as_deref(), Some("4.0"));
    assert!(
        !format!("{store:?}").contains("t0ken"),
        "the token stays out of Debug"
    );
}
