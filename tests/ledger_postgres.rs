//! The `Ledger` contract against `PostgresLedger`, on the database at `DATABASE_URL` (skipped, saying so, when it
//! is unset): one test per scenario, each in a schema of its own that is dropped at the end; all of them twice on
//! one shared ledger; then schema refusal, atomicity, and several ledgers (pools) sharing one schema.

#[macro_use]
#[path = "common/ledger_scenarios.rs"]
mod ledger_scenarios;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use eventual_upsert::sync::{
    AppliedVersion, ChangeEvent, Checkpoint, DeadLetter, DeferredTask, Ledger, LedgerQuery,
    PostgresLedger, SettledEvent, Settlement, SourceRecord, TaskChange, ledger_conformance,
};
use eventual_upsert::{EntityRef, Error, Record};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

fn database_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipping: DATABASE_URL is not set");
            None
        }
    }
}

fn fresh_schema() -> String {
    format!("t_{}", uuid::Uuid::new_v4().simple())
}

async fn raw(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

async fn drop_schema(url: &str, schema: &str) {
    let mut conn = raw(url).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
}

async fn open(url: &str, schema: &str) -> PostgresLedger {
    PostgresLedger::connect(url)
        .with_schema(schema)
        .max_connections(4)
        .await
        .unwrap()
}

/// Runs `body` with a ledger in a fresh schema, then drops the schema, whether `body` passed or panicked.
async fn in_fresh_schema<F, Fut>(body: F)
where
    F: FnOnce(String, String, PostgresLedger) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(url) = database_url() else {
        return;
    };
    let schema = fresh_schema();
    let ledger = open(&url, &schema).await;
    let outcome = tokio::spawn(body(url.clone(), schema.clone(), ledger.clone())).await;
    ledger.pool().close().await;
    drop_schema(&url, &schema).await;
    if let Err(err) = outcome {
        std::panic::resume_unwind(err.into_panic());
    }
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            in_fresh_schema(|_, _, ledger| async move {
                ledger_conformance::$name(&ledger).await;
            })
            .await;
        }
    )*};
}

for_each_ledger_scenario!(scenarios);

#[tokio::test]
async fn run_all_on_one_shared_ledger() {
    in_fresh_schema(|_, _, ledger| async move {
        ledger_conformance::run_all(&ledger).await;
        // Twice: the scenarios must not trip over the data they left behind.
        ledger_conformance::run_all(&ledger).await;
    })
    .await;
}

fn account(number: &str) -> EntityRef {
    EntityRef::by_key("account", [("accountnumber", number)]).unwrap()
}

fn event(id: &str, record: &SourceRecord, version: u64) -> SettledEvent {
    SettledEvent {
        event_id: id.into(),
        record: record.clone(),
        applied: Some(AppliedVersion {
            version,
            deleted: false,
        }),
    }
}

fn letter(event_id: &str, attempts: u32, at_ms: u64) -> DeadLetter {
    let failed = ChangeEvent::upsert("us", &Record::new(account("A-2")), 3).with_event_id(event_id);
    let error = Error::Backend {
        backend: "eu".into(),
        message: "rejected".into(),
        retryable: false,
        source: None,
    };
    DeadLetter::new(failed, &error, attempts, at_ms)
}

#[tokio::test]
async fn a_newer_schema_is_refused_and_left_untouched() {
    in_fresh_schema(|url, schema, ledger| async move {
        let mut s = Settlement::at(1_000);
        s.checkpoint = Some(Checkpoint {
            source: "us".into(),
            token: "delta-1".into(),
        });
        ledger.settle(&s).await.unwrap();
        let newer = PostgresLedger::schema_version() + 1;
        let mut conn = raw(&url).await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO \"{schema}\"._sqlx_migrations \
             (version, description, success, checksum, execution_time) \
             VALUES ($1, 'from a newer build', TRUE, '\\x00'::bytea, 0)"
        )))
        .bind(newer)
        .execute(&mut conn)
        .await
        .unwrap();
        let history = format!("SELECT count(*) FROM \"{schema}\"._sqlx_migrations");
        let before: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(history.clone()))
            .fetch_one(&mut conn)
            .await
            .unwrap();

        let err = PostgresLedger::connect(&url)
            .with_schema(&schema)
            .await
            .unwrap_err();
        match &err {
            Error::LedgerSchemaTooNew {
                ledger,
                found,
                supported,
            } => {
                assert!(ledger.contains(&schema), "{err}");
                assert_eq!(
                    (*found, *supported),
                    (newer, PostgresLedger::schema_version())
                );
            }
            other => panic!("expected LedgerSchemaTooNew, got {other:?}"),
        }
        assert!(!err.is_retryable());
        let after: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(history))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(after, before, "the migration history is left as it was");
        assert_eq!(
            ledger.checkpoint("us").await.unwrap().as_deref(),
            Some("delta-1"),
            "and the data"
        );
        let _ = conn.close().await;
    })
    .await;
}

#[tokio::test]
async fn another_applications_schema_is_not_a_ledger() {
    let Some(url) = database_url() else {
        return;
    };
    let schema = fresh_schema();
    let mut conn = raw(&url).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA \"{schema}\"; CREATE TABLE \"{schema}\".customers (id int PRIMARY KEY)"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let err = PostgresLedger::connect(&url)
        .with_schema(&schema)
        .await
        .unwrap_err();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
    )
    .bind(&schema)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    drop_schema(&url, &schema).await;
    match &err {
        Error::NotALedger { reason, .. } => assert!(reason.contains("customers"), "{err}"),
        other => panic!("expected NotALedger, got {other:?}"),
    }
    assert_eq!(tables, ["customers"], "nothing was added to the schema");
}

#[tokio::test]
async fn a_settlement_that_fails_midway_leaves_nothing() {
    in_fresh_schema(|url, schema, ledger| async move {
        let mut conn = raw(&url).await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE FUNCTION \"{schema}\".boom() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'boom'; END $$; \
             CREATE TRIGGER boom BEFORE INSERT ON \"{schema}\".tasks \
             FOR EACH ROW EXECUTE FUNCTION \"{schema}\".boom();"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        let record = SourceRecord::new("us", account("A-1"));
        let target = EntityRef::by_id("account", uuid::Uuid::new_v4()).unwrap();
        let mut s = Settlement::at(1_000);
        s.events = vec![event("e-1", &record, 7)];
        s.dead_letters = vec![letter("e-2", 1, 1_000)];
        s.tasks = vec![TaskChange::Enqueue(DeferredTask::new(
            "t-1",
            "h",
            target,
            serde_json::Value::Null,
            1_000,
        ))];
        s.checkpoint = Some(Checkpoint {
            source: "us".into(),
            token: "delta-1".into(),
        });
        s.stats.received = 1;
        let err = ledger.settle(&s).await.unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("boom") && message.contains("tasks"),
            "{message}"
        );
        assert!(!err.is_retryable(), "{message}");
        let view = ledger
            .lookup(&LedgerQuery {
                event_ids: vec!["e-1".into()],
                records: vec![record.clone()],
                ..LedgerQuery::default()
            })
            .await
            .unwrap();
        assert!(view.processed.is_empty(), "the events were not recorded");
        assert!(view.applied.is_empty(), "nor their versions");
        assert_eq!(ledger.dead_letter_count().await.unwrap(), 0);
        assert_eq!(ledger.checkpoint("us").await.unwrap(), None);
        assert_eq!(ledger.totals().await.unwrap(), Default::default());

        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP TRIGGER boom ON \"{schema}\".tasks"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        ledger.settle(&s).await.unwrap();
        assert_eq!(
            ledger.checkpoint("us").await.unwrap().as_deref(),
            Some("delta-1")
        );
        let _ = conn.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ledgers_on_one_schema_settling_concurrently_lose_nothing() {
    in_fresh_schema(|url, schema, first| async move {
        let second = open(&url, &schema).await;
        let ledgers = [Arc::new(first), Arc::new(second.clone())];
        let records: Vec<SourceRecord> = (0..5)
            .map(|n| SourceRecord::new("us", account(&format!("C-{n}"))))
            .collect();
        const SETTLEMENTS: u64 = 60;
        let mut handles = Vec::new();
        for i in 0..SETTLEMENTS {
            let ledger = Arc::clone(&ledgers[(i % 2) as usize]);
            let records = records.clone();
            handles.push(tokio::spawn(async move {
                let mut s = Settlement::at(1_000 + i);
                // Every settlement touches every record, in an order of its own.
                s.events = (0..records.len())
                    .map(|k| {
                        let r = &records[(k + i as usize) % records.len()];
                        event(&format!("e-{i}-{k}"), r, (i * 7 + k as u64 * 13) % 97)
                    })
                    .collect();
                s.dead_letters = vec![letter("shared", 1, 1_000 + i)];
                s.tasks = vec![TaskChange::Enqueue(DeferredTask::new(
                    "only-once",
                    format!("h-{i}"),
                    records[0].reference.clone(),
                    serde_json::Value::Null,
                    1_000,
                ))];
                s.stats.received = 1;
                s.stats.applied = 2;
                ledger.settle(&s).await
            }));
        }
        for handle in handles {
            handle.await.unwrap().unwrap();
        }
        let totals = ledgers[0].totals().await.unwrap();
        assert_eq!(
            (totals.received, totals.applied),
            (SETTLEMENTS, 2 * SETTLEMENTS)
        );
        let view = ledgers[1]
            .lookup(&LedgerQuery {
                records: records.clone(),
                ..LedgerQuery::default()
            })
            .await
            .unwrap();
        for (k, record) in records.iter().enumerate() {
            let highest = (0..SETTLEMENTS)
                .map(|i| {
                    // The version settlement i gave record k.
                    let slot = (k + records.len() - (i as usize % records.len())) % records.len();
                    (i * 7 + slot as u64 * 13) % 97
                })
                .max();
            assert_eq!(
                view.applied.get(record).map(|a| a.version),
                highest,
                "{record:?}"
            );
        }
        let letters = ledgers[0].dead_letters(10).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(
            letters[0].attempts as u64, SETTLEMENTS,
            "every failure counted"
        );
        assert_eq!(letters[0].first_failed_ms, 1_000, "the first failure kept");
        assert_eq!(
            ledgers[1].tasks(10).await.unwrap().len(),
            1,
            "one task per id"
        );
        second.pool().close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ledgers_never_claim_one_task_twice() {
    in_fresh_schema(|url, schema, first| async move {
        let second = open(&url, &schema).await;
        let record = account("T-1");
        let mut s = Settlement::at(1_000);
        s.tasks = (0..50)
            .map(|n| {
                TaskChange::Enqueue(DeferredTask::new(
                    format!("task-{n:02}"),
                    "h",
                    record.clone(),
                    serde_json::Value::Null,
                    1_000,
                ))
            })
            .collect();
        first.settle(&s).await.unwrap();
        let claim = |ledger: PostgresLedger| {
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = ledger
                        .claim_tasks(2_000, Duration::from_secs(600), 3)
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        return mine;
                    }
                    mine.extend(batch.into_iter().map(|t| t.id));
                }
            })
        };
        let (a, b) = (claim(first.clone()), claim(second.clone()));
        let mut all = a.await.unwrap();
        all.extend(b.await.unwrap());
        let claimed = all.len();
        all.sort();
        all.dedup();
        assert_eq!(
            (claimed, all.len()),
            (50, 50),
            "each task claimed exactly once"
        );
        second.pool().close().await;
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_server_is_a_retryable_error_without_the_password() {
    let url = "postgres://root:Sup3rSecretPw@127.0.0.1:1/test";
    let builder = PostgresLedger::connect(url).acquire_timeout(Duration::from_millis(300));
    assert!(!format!("{builder:?}").contains("Sup3rSecretPw"));
    let err = builder.await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(!err.to_string().contains("Sup3rSecretPw"), "{err}");
    assert!(!format!("{err:?}").contains("Sup3rSecretPw"), "{err:?}");
}

#[tokio::test]
async fn a_wrong_password_is_permanent_and_not_echoed() {
    let Some(url) = database_url() else {
        return;
    };
    let Some((head, tail)) = url.split_once('@') else {
        eprintln!("skipping: DATABASE_URL has no user");
        return;
    };
    let user = head.rsplit_once(':').map_or(head, |(user, _)| user);
    let wrong = format!("{user}:Wr0ngPassw0rd@{tail}");
    let schema = fresh_schema();
    match PostgresLedger::connect(&wrong).with_schema(&schema).await {
        Ok(ledger) => {
            // A server that trusts local connections lets any password in.
            ledger.pool().close().await;
            drop_schema(&url, &schema).await;
            eprintln!("skipping: the server accepted a wrong password");
        }
        Err(err) => {
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("Wr0ngPassw0rd"), "{shown}");
            assert!(matches!(err, Error::Backend { .. }), "{err:?}");
            assert!(!err.is_retryable(), "{err}");
        }
    }
}

#[tokio::test]
async fn a_schema_name_that_is_not_valid_is_refused_before_connecting() {
    let err = PostgresLedger::connect("postgres://127.0.0.1:1/test")
        .with_schema("Robert'); DROP TABLE x;--")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
}
