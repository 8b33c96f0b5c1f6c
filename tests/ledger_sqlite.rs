//! The `Ledger` contract against `SqliteLedger`: one test per scenario (each on a fresh file), all of them twice
//! on one shared file and once in memory; then what only a file-backed ledger has: reopening, refusing a newer
//! schema or a file that is not a ledger, and atomic settlements.

#[macro_use]
#[path = "common/ledger_scenarios.rs"]
mod ledger_scenarios;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use eventual_upsert::sync::ChangeEvent;
use eventual_upsert::sync::{
    AppliedVersion, Checkpoint, DeadLetter, DeferredTask, IdMapping, Ledger, LedgerQuery, OwnWrite,
    SettledEvent, Settlement, SourceRecord, SqliteDurability, SqliteLedger, TaskChange, TaskStatus,
    ledger_conformance,
};
use eventual_upsert::{EntityRef, Error, Record};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "eventual-upsert-sqlite-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let dir = TempDir::new();
            let ledger = SqliteLedger::open(dir.file("ledger.db")).await.unwrap();
            ledger_conformance::$name(&ledger).await;
        }
    )*};
}

for_each_ledger_scenario!(scenarios);

#[tokio::test]
async fn run_all_on_one_shared_ledger() {
    let dir = TempDir::new();
    let ledger = SqliteLedger::open(dir.file("ledger.db")).await.unwrap();
    ledger_conformance::run_all(&ledger).await;
    // Twice: the scenarios must not trip over the data they left behind.
    ledger_conformance::run_all(&ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_behind_a_shared_pointer() {
    let dir = TempDir::new();
    let ledger: Arc<dyn Ledger> =
        Arc::new(SqliteLedger::open(dir.file("ledger.db")).await.unwrap());
    ledger_conformance::run_all(&ledger).await;
}

#[tokio::test]
async fn run_all_with_normal_durability_and_reopen() {
    let dir = TempDir::new();
    let path = dir.file("ledger.db");
    let ledger = SqliteLedger::open_with(&path, SqliteDurability::Normal)
        .await
        .unwrap();
    ledger_conformance::run_all(&ledger).await;
    let totals = ledger.totals().await.unwrap();
    ledger.close().await;
    // A clean close with NORMAL keeps everything, like FULL; the file reopens with either setting.
    let reopened = SqliteLedger::open(&path).await.unwrap();
    assert_eq!(reopened.totals().await.unwrap(), totals);
}

#[tokio::test]
async fn run_all_in_memory() {
    let ledger = SqliteLedger::in_memory().await.unwrap();
    ledger_conformance::run_all(&ledger).await;
    ledger_conformance::run_all(&ledger).await;
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

/// A settlement with one of everything.
fn everything(at_ms: u64) -> (Settlement, SourceRecord, OwnWrite) {
    let record = SourceRecord::new("us", account("A-1"));
    let target = EntityRef::by_id("account", uuid::Uuid::new_v4()).unwrap();
    let own = OwnWrite {
        instance: "eu".into(),
        record: target.clone(),
        version: 9,
    };
    let mut s = Settlement::at(at_ms);
    s.events = vec![event("e-1", &record, 7)];
    s.id_map = vec![IdMapping {
        source: record.clone(),
        target: target.clone(),
    }];
    s.own_writes = vec![own.clone()];
    let failed = ChangeEvent::upsert("us", &Record::new(account("A-2")), 3).with_event_id("e-2");
    let error = Error::Backend {
        backend: "eu".into(),
        message: "rejected".into(),
        retryable: false,
        source: None,
    };
    s.dead_letters = vec![DeadLetter::new(failed, &error, 2, at_ms)];
    s.tasks = vec![TaskChange::Enqueue(DeferredTask::new(
        "t-1",
        "send_invoice",
        target,
        serde_json::json!({"invoice": "INV-1"}),
        at_ms,
    ))];
    s.checkpoint = Some(Checkpoint {
        source: "us".into(),
        token: "delta-1".into(),
    });
    s.stats.received = 2;
    s.stats.applied = 1;
    s.stats.dead_lettered = 1;
    (s, record, own)
}

#[tokio::test]
async fn reopening_the_file_keeps_everything() {
    let dir = TempDir::new();
    let path = dir.file("ledger.db");
    let (settlement, record, own) = everything(1_000);
    {
        let ledger = SqliteLedger::open(&path).await.unwrap();
        ledger.settle(&settlement).await.unwrap();
        ledger.close().await;
    }
    let ledger = SqliteLedger::open(&path).await.unwrap();
    let view = ledger
        .lookup(&LedgerQuery {
            event_ids: vec!["e-1".into()],
            records: vec![record.clone()],
            targets: vec![record.clone()],
            own_writes: vec![own.clone()],
        })
        .await
        .unwrap();
    assert!(view.processed.contains("e-1"));
    assert_eq!(view.applied[&record].version, 7);
    assert_eq!(view.targets[&record], settlement.id_map[0].target);
    assert!(view.own_writes.contains(&own));
    assert_eq!(
        ledger.checkpoint("us").await.unwrap().as_deref(),
        Some("delta-1")
    );
    assert_eq!(
        ledger.dead_letters(10).await.unwrap(),
        settlement.dead_letters
    );
    let tasks = ledger.tasks(10).await.unwrap();
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        (tasks[0].id.as_str(), tasks[0].status),
        ("t-1", TaskStatus::Pending)
    );
    assert_eq!(ledger.totals().await.unwrap(), settlement.stats);
}

async fn raw(path: &Path) -> SqliteConnection {
    SqliteConnectOptions::new()
        .filename(path)
        .connect()
        .await
        .unwrap()
}

use sqlx::ConnectOptions;

#[tokio::test]
async fn a_newer_schema_is_refused_and_left_untouched() {
    let dir = TempDir::new();
    let path = dir.file("ledger.db");
    let ledger = SqliteLedger::open(&path).await.unwrap();
    ledger.settle(&everything(1_000).0).await.unwrap();
    ledger.close().await;
    drop(ledger);
    let newer = SqliteLedger::schema_version() + 1;
    {
        let mut conn = raw(&path).await;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (?1, 'from a newer build', TRUE, x'00', 0)",
        )
        .bind(newer)
        .execute(&mut conn)
        .await
        .unwrap();
        // Back to the rollback journal, so the file alone is the whole database and its bytes can be compared.
        sqlx::query("PRAGMA journal_mode = DELETE")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = SqliteLedger::open(&path).await.unwrap_err();
    match &err {
        Error::LedgerSchemaTooNew {
            ledger,
            found,
            supported,
        } => {
            assert!(ledger.contains(&path.display().to_string()), "{err}");
            assert_eq!(
                (*found, *supported),
                (newer, SqliteLedger::schema_version())
            );
        }
        other => panic!("expected LedgerSchemaTooNew, got {other:?}"),
    }
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(
        message.contains(&newer.to_string()) && message.contains("newer"),
        "{message}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is left as it was"
    );
    assert!(!dir.file("ledger.db-wal").exists(), "not switched to WAL");
}

#[tokio::test]
async fn a_file_of_garbage_is_not_a_ledger() {
    let dir = TempDir::new();
    let path = dir.file("garbage.db");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let err = SqliteLedger::open(&path).await.unwrap_err();
    match &err {
        Error::NotALedger { ledger, reason } => {
            assert!(ledger.contains("garbage.db"), "{err}");
            assert!(reason.contains("not a SQLite database"), "{err}");
        }
        other => panic!("expected NotALedger, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        garbage,
        "the file is left as it was"
    );
}

#[tokio::test]
async fn another_applications_database_is_not_a_ledger() {
    let dir = TempDir::new();
    let path = dir.file("app.db");
    {
        let mut conn = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        sqlx::query("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let err = SqliteLedger::open(&path).await.unwrap_err();
    match &err {
        Error::NotALedger { reason, .. } => assert!(reason.contains("customers"), "{err}"),
        other => panic!("expected NotALedger, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file is left as it was"
    );
}

#[tokio::test]
async fn an_empty_file_becomes_a_ledger() {
    let dir = TempDir::new();
    let path = dir.file("empty.db");
    std::fs::write(&path, b"").unwrap();
    let ledger = SqliteLedger::open(&path).await.unwrap();
    ledger_conformance::processed_ids_are_remembered(&ledger).await;
}

#[tokio::test]
async fn a_settlement_that_fails_midway_leaves_nothing() {
    let dir = TempDir::new();
    let path = dir.file("ledger.db");
    let ledger = SqliteLedger::open(&path).await.unwrap();
    let mut conn = raw(&path).await;
    sqlx::query(
        "CREATE TRIGGER boom BEFORE INSERT ON tasks BEGIN SELECT RAISE(ABORT, 'boom'); END",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let (settlement, record, _) = everything(1_000);
    let err = ledger.settle(&settlement).await.unwrap_err();
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

    sqlx::query("DROP TRIGGER boom")
        .execute(&mut conn)
        .await
        .unwrap();
    ledger.settle(&settlement).await.unwrap();
    assert_eq!(
        ledger.checkpoint("us").await.unwrap().as_deref(),
        Some("delta-1")
    );
}

#[tokio::test]
async fn a_row_that_does_not_decode_is_a_typed_error_naming_it() {
    let dir = TempDir::new();
    let path = dir.file("ledger.db");
    let ledger = SqliteLedger::open(&path).await.unwrap();
    ledger.settle(&everything(1_000).0).await.unwrap();
    let mut conn = raw(&path).await;
    sqlx::query("UPDATE tasks SET payload = 'not json {' WHERE id = 't-1'")
        .execute(&mut conn)
        .await
        .unwrap();
    let err = ledger.tasks(10).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("'tasks'") && message.contains("'t-1'") && message.contains("payload"),
        "{message}"
    );
    assert!(!err.is_retryable());
    sqlx::query("UPDATE tasks SET payload = 'null', status = 'paused' WHERE id = 't-1'")
        .execute(&mut conn)
        .await
        .unwrap();
    let message = ledger.tasks(10).await.unwrap_err().to_string();
    assert!(
        message.contains("status") && message.contains("paused"),
        "{message}"
    );
    sqlx::query("UPDATE dead_letters SET event = '[]'")
        .execute(&mut conn)
        .await
        .unwrap();
    let message = ledger.dead_letters(10).await.unwrap_err().to_string();
    assert!(
        message.contains("'dead_letters'") && message.contains("'e-2'"),
        "{message}"
    );
}

#[tokio::test]
async fn two_ledgers_on_one_file_see_each_others_settlements() {
    let dir = TempDir::new();
    let path = dir.file("ledger.db");
    let (a, b) = (
        SqliteLedger::open(&path).await.unwrap(),
        SqliteLedger::open(&path).await.unwrap(),
    );
    let record = SourceRecord::new("us", account("A-9"));
    let (mut s1, mut s2) = (Settlement::at(1), Settlement::at(2));
    s1.events = vec![event("x-1", &record, 5)];
    s1.stats.received = 1;
    s2.events = vec![event("x-2", &record, 6)];
    s2.stats.received = 1;
    let (r1, r2) = tokio::join!(a.settle(&s1), b.settle(&s2));
    r1.unwrap();
    r2.unwrap();
    let query = LedgerQuery {
        records: vec![record.clone()],
        ..LedgerQuery::default()
    };
    assert_eq!(a.lookup(&query).await.unwrap().applied[&record].version, 6);
    assert_eq!(b.totals().await.unwrap().received, 2);
}

#[tokio::test]
async fn a_big_batch_is_one_lookup_and_one_settlement() {
    let ledger = SqliteLedger::in_memory().await.unwrap();
    let records: Vec<SourceRecord> = (0..1_000)
        .map(|n| SourceRecord::new("us", account(&format!("B-{n}"))))
        .collect();
    let mut s = Settlement::at(5);
    s.events = records
        .iter()
        .enumerate()
        .map(|(n, r)| event(&format!("b-{n}"), r, n as u64 + 1))
        .collect();
    ledger.settle(&s).await.unwrap();
    let query = LedgerQuery {
        event_ids: s.events.iter().map(|e| e.event_id.clone()).collect(),
        records: records.clone(),
        targets: records.clone(),
        own_writes: Vec::new(),
    };
    let view = ledger.lookup(&query).await.unwrap();
    assert_eq!(view.processed.len(), 1_000);
    assert_eq!(view.applied.len(), 1_000);
    assert_eq!(view.applied[&records[999]].version, 1_000);
    assert!(view.targets.is_empty());
}
