//! [`SqliteLedger`]: the [`Ledger`] in one embedded SQLite file (feature `sqlite`). Its docs say what it stores,
//! how it uses SQLite and when it refuses a file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Row};

use crate::error::{Error, Result};
use crate::key::EntityRef;
use crate::sync::ledger::sql::{
    Classified, RecordKey, RowDecoder, Rows, StoredLetter, StoredTask, TaskStep, clamp_i64,
    map_sqlx, relabel, to_i64, totals_from,
};
use crate::sync::ledger::{
    DeadLetter, Ledger, LedgerQuery, LedgerView, Pruned, Retention, Settlement, sql,
};
use crate::sync::stats::SyncStats;
use crate::sync::tasks::DeferredTask;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// What `ledger_info.application` says in a ledger.
const APPLICATION: &str = "eventual-upsert ledger";

/// How long a writer waits for another process's write lock before `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Read-only connections for lookups and listings.
const READERS: u32 = 4;

/// The [`Ledger`] in one embedded SQLite file (feature `sqlite`): the durable ledger for a single worker, with
/// nothing to run beside it.
///
/// # What it stores
///
/// One table per kind of state: settled event ids (`processed`, with when they settled), the applied version
/// per source record (`applied_versions`, tombstones included), the id map (`id_map`), own-write stamps
/// (`own_writes`), checkpoints per source, dead letters (one row per event id: the event as JSON, the error, the
/// attempts and both failure times), deferred tasks (`tasks`: handler, record, JSON payload, status, attempts,
/// due time) and the running totals (`totals`, one row per counter). A record is stored as its table name and the
/// canonical JSON of its key. A `ledger_info` table marks the file as a ledger.
///
/// # Durability and concurrency
///
/// The file is opened in WAL mode with `synchronous=FULL`: readers never block the writer nor each other, and a
/// settlement that returned is on disk even if the machine loses power the next moment (WAL with `NORMAL` could
/// roll back the last commits then, and the events they settled would be applied again).
/// Every write transaction starts with `BEGIN IMMEDIATE`, taking the write lock up front: a deferred transaction
/// that reads and then writes can fail with `SQLITE_BUSY` at once when another connection committed in between,
/// while an immediate one waits (the busy timeout is 5 s). Writes from this process go through one connection;
/// reads use a small pool of read-only connections. Other processes may open the same file, but SQLite has one
/// writer at a time: for several workers, use the `PostgresLedger` (feature `postgres`).
///
/// # Schema versions
///
/// Opening runs the embedded migrations (`migrations/sqlite`) in the same immediate transaction that checks the
/// file, so two processes opening a new file at once do not race. A file written by a newer build (a schema
/// version this build does not know) is refused with [`Error::LedgerSchemaTooNew`], and a file that is not a
/// ledger (not SQLite at all, or another application's database) with [`Error::NotALedger`]: in both cases
/// nothing in the file is changed.
///
/// ```no_run
/// # async fn demo() -> eventual_upsert::Result<()> {
/// use eventual_upsert::sync::SqliteLedger;
/// let ledger = SqliteLedger::open("sync-ledger.db").await?;
/// # Ok(()) }
/// ```
pub struct SqliteLedger {
    /// One connection: this process's writes queue here, then `BEGIN IMMEDIATE` orders them with other processes.
    writer: SqlitePool,
    /// Read-only connections (the writer itself for an in-memory ledger).
    reader: SqlitePool,
    /// `ledger sqlite:<path>`, for errors.
    backend: Arc<str>,
    path: Option<PathBuf>,
}

impl fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteLedger")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What a database holds, as far as opening a ledger cares.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// Nothing yet (a new file, or one whose first migration never committed).
    Empty,
    /// A ledger at this schema version.
    Ledger(i64),
}

/// How hard a [`SqliteLedger`] pushes each settlement to disk (SQLite's `synchronous` setting, in WAL mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SqliteDurability {
    /// `synchronous=FULL` (the default): the write-ahead log is synced at every commit, so a settled batch survives
    /// a power loss or an OS crash too.
    #[default]
    Full,
    /// `synchronous=NORMAL`: a settled batch survives any crash or kill of the process, but a power loss or an OS
    /// crash may undo the last few settlements (the file stays consistent; the undone batches are read again from
    /// the source's checkpoint, so nothing is lost where the source keeps its changes). Faster: one sync per
    /// checkpoint of the log instead of per commit.
    Normal,
}

impl SqliteLedger {
    /// Opens the ledger in the SQLite file at `path`, creating the file if it is missing and bringing its schema
    /// up to date.
    ///
    /// # Errors
    ///
    /// [`Error::NotALedger`] when the file is not a SQLite database or holds another application's tables,
    /// [`Error::LedgerSchemaTooNew`] when a newer build wrote it (both leave the file untouched), and
    /// [`Error::Backend`] when it cannot be opened or written.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SqliteDurability::Full).await
    }

    /// [`open`](Self::open) with a choice of how hard each settlement is pushed to disk.
    pub async fn open_with(path: impl AsRef<Path>, durability: SqliteDurability) -> Result<Self> {
        let synchronous = match durability {
            SqliteDurability::Full => SqliteSynchronous::Full,
            SqliteDurability::Normal => SqliteSynchronous::Normal,
        };
        let path = path.as_ref().to_path_buf();
        let backend: Arc<str> = format!("ledger sqlite:{}", path.display()).into();
        let db = |operation: &str, err| map_sqlx(&backend, operation, err, classify);

        if path.exists() {
            // Checked over a read-only connection first: turning on WAL (below) writes to the file's header, and
            // a file that is not ours must be left as it was.
            let options = SqliteConnectOptions::new()
                .filename(&path)
                .read_only(true)
                .busy_timeout(BUSY_TIMEOUT);
            let mut conn = options
                .connect()
                .await
                .map_err(|err| not_a_database(&backend, err))?;
            let found = inspect(&mut conn, &backend).await;
            // Closing a read-only connection changes nothing; its failure does not matter to the caller.
            let _ = conn.close().await;
            found?;
        }

        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(|err| db("opening", err))?;
        migrate(&writer, &backend).await?;
        // Readers do not set the journal mode (the file is in WAL now) and cannot write by accident.
        let reader_options = SqliteConnectOptions::new()
            .filename(&path)
            .read_only(true)
            .synchronous(synchronous)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_lazy_with(reader_options);
        tracing::debug!(path = %path.display(), "sqlite ledger open");
        Ok(Self {
            writer,
            reader,
            backend,
            path: Some(path),
        })
    }

    /// A ledger in memory, gone when the value is dropped: the SQL ledger's behaviour without a file (for tests).
    /// One connection serves reads and writes; it is never closed while the ledger lives.
    pub async fn in_memory() -> Result<Self> {
        let backend: Arc<str> = "ledger sqlite::memory:".into();
        // The default filename is `:memory:`: each connection has its own database, so the pool keeps exactly one.
        let options = SqliteConnectOptions::new().foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(|err| map_sqlx(&backend, "opening", err, classify))?;
        migrate(&pool, &backend).await?;
        Ok(Self {
            writer: pool.clone(),
            reader: pool,
            backend,
            path: None,
        })
    }

    /// The file, `None` for an in-memory ledger.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The highest schema version this build knows.
    pub fn schema_version() -> i64 {
        latest_known()
    }

    /// Closes every connection (waiting for calls in flight), so the file can be moved or deleted. Dropping the
    /// ledger closes them too, in the background.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }

    fn db(&self, operation: &str, err: sqlx::Error) -> Error {
        map_sqlx(&self.backend, operation, err, classify)
    }

    fn label(&self, err: Error) -> Error {
        relabel(err, &self.backend)
    }

    /// A write transaction: `BEGIN IMMEDIATE` takes the write lock before anything is read.
    async fn begin_write(
        &self,
        operation: &str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|err| self.db(operation, err))
    }
}

fn latest_known() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The file could not even be read as a database.
fn not_a_database(backend: &str, err: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &err
        && primary_code(db.as_ref()) == Some(SQLITE_NOTADB)
    {
        return Error::NotALedger {
            ledger: backend.to_owned(),
            reason: "the file is not a SQLite database".into(),
        };
    }
    map_sqlx(backend, "opening", err, classify)
}

/// What the database at `conn` holds; refuses what is not a ledger of a schema this build knows.
async fn inspect(conn: &mut SqliteConnection, backend: &str) -> Result<Found> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
         ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|err| not_a_database(backend, err))?;
    let has = |name: &str| tables.iter().any(|t| t == name);
    let refuse = |reason: String| Error::NotALedger {
        ledger: backend.to_owned(),
        reason,
    };
    let db = |err| map_sqlx(backend, "checking the schema", err, classify);

    if !has("ledger_info") {
        let only_history = tables.iter().all(|t| t == "_sqlx_migrations");
        if only_history {
            let applied: i64 = match has("_sqlx_migrations") {
                true => sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(db)?,
                false => 0,
            };
            if applied == 0 {
                return Ok(Found::Empty);
            }
        }
        let listed: Vec<&str> = tables.iter().take(5).map(String::as_str).collect();
        return Err(refuse(format!(
            "it holds other tables ({}{}) and no ledger_info",
            listed.join(", "),
            if tables.len() > listed.len() {
                ", ..."
            } else {
                ""
            }
        )));
    }
    let application: Option<String> =
        sqlx::query_scalar("SELECT application FROM ledger_info WHERE id = 1")
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
    if application.as_deref() != Some(APPLICATION) {
        return Err(refuse(format!(
            "its ledger_info names {:?}, not {APPLICATION:?}",
            application.unwrap_or_default()
        )));
    }
    if !has("_sqlx_migrations") {
        return Err(refuse(
            "it has no migration history (_sqlx_migrations)".into(),
        ));
    }
    let version: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    let version = version.unwrap_or(0);
    if version > latest_known() {
        return Err(Error::LedgerSchemaTooNew {
            ledger: backend.to_owned(),
            found: version,
            supported: latest_known(),
        });
    }
    Ok(Found::Ledger(version))
}

/// Checks the database again and applies pending migrations, all in one immediate transaction.
async fn migrate(writer: &SqlitePool, backend: &str) -> Result<()> {
    let db = |operation: &str, err| map_sqlx(backend, operation, err, classify);
    let mut conn = writer.acquire().await.map_err(|err| db("opening", err))?;
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|err| not_a_database(backend, err))?;
    let found = inspect(&mut tx, backend).await?;
    // Nested in our transaction, each migration is a savepoint: the whole upgrade commits or none of it.
    // `run_direct` is `run` without the `Acquire` bound whose lifetime makes the future not `Send`.
    MIGRATOR
        .run_direct(None, &mut *tx, false)
        .await
        .map_err(|err| migrate_error(backend, err))?;
    tx.commit()
        .await
        .map_err(|err| db("committing the schema", err))?;
    if let Found::Ledger(version) = found
        && version < latest_known()
    {
        tracing::info!(
            backend,
            from = version,
            to = latest_known(),
            "ledger schema upgraded"
        );
    }
    Ok(())
}

fn migrate_error(backend: &str, err: MigrateError) -> Error {
    match err {
        MigrateError::VersionMissing(version) => Error::LedgerSchemaTooNew {
            ledger: backend.to_owned(),
            found: version,
            supported: latest_known(),
        },
        MigrateError::Execute(err) | MigrateError::ExecuteMigration(err, _) => {
            map_sqlx(backend, "migrating the schema", err, classify)
        }
        other => Error::Backend {
            backend: backend.to_owned(),
            message: format!("migrating the schema: {other}"),
            retryable: false,
            source: Some(Arc::new(other)),
        },
    }
}

const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_IOERR: i32 = 10;
const SQLITE_CORRUPT: i32 = 11;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;
const SQLITE_PROTOCOL: i32 = 15;
const SQLITE_CONSTRAINT: i32 = 19;
const SQLITE_READONLY: i32 = 8;
const SQLITE_NOTADB: i32 = 26;

/// The primary result code (the low byte of the extended one sqlx reports).
fn primary_code(db: &dyn sqlx::error::DatabaseError) -> Option<i32> {
    db.code()
        .and_then(|code| code.parse::<i32>().ok())
        .map(|code| code & 0xff)
}

fn classify(db: &dyn sqlx::error::DatabaseError) -> Classified {
    let (retryable, note) = match primary_code(db) {
        Some(SQLITE_BUSY) => (true, Some("busy: another connection holds the write lock")),
        Some(SQLITE_LOCKED) => (true, Some("locked")),
        Some(SQLITE_PROTOCOL) => (true, None),
        Some(SQLITE_FULL) => (false, Some("disk full")),
        Some(SQLITE_IOERR) => (false, Some("disk I/O error")),
        Some(SQLITE_CORRUPT) => (false, Some("the database file is corrupt")),
        Some(SQLITE_NOTADB) => (false, Some("not a SQLite database")),
        Some(SQLITE_CANTOPEN) => (false, Some("cannot open the database file")),
        Some(SQLITE_READONLY) => (false, Some("the database is read-only")),
        Some(SQLITE_CONSTRAINT) => (false, Some("constraint violated")),
        _ => (false, None),
    };
    Classified { retryable, note }
}

fn json<T: serde::Serialize>(rows: &T) -> Result<String> {
    serde_json::to_string(rows).map_err(|err| Error::Backend {
        backend: "ledger".into(),
        message: format!("encoding parameters: {err}"),
        retryable: false,
        source: None,
    })
}

const LOOKUP_PROCESSED: &str =
    "SELECT event_id FROM processed WHERE event_id IN (SELECT value FROM json_each(?1))";
// `j.key` is the position in the JSON array, so each answer goes back to the record asked for. CROSS JOIN keeps
// SQLite from reordering: walk the asked-for list, probe the primary key.
const LOOKUP_VERSIONS: &str = "SELECT j.key, v.version, v.deleted \
     FROM json_each(?1) AS j CROSS JOIN applied_versions AS v \
     WHERE v.source = j.value ->> 0 AND v.record_table = j.value ->> 1 AND v.record_key = j.value ->> 2";
const LOOKUP_TARGETS: &str = "SELECT j.key, m.target_table, m.target_key \
     FROM json_each(?1) AS j CROSS JOIN id_map AS m \
     WHERE m.source = j.value ->> 0 AND m.source_table = j.value ->> 1 AND m.source_key = j.value ->> 2";
const LOOKUP_OWN_WRITES: &str = "SELECT j.key \
     FROM json_each(?1) AS j CROSS JOIN own_writes AS o \
     WHERE o.instance = j.value ->> 0 AND o.record_table = j.value ->> 1 AND o.record_key = j.value ->> 2 \
     AND o.version = j.value ->> 3";

// `WHERE true` resolves the parsing ambiguity of INSERT ... SELECT ... ON CONFLICT.
const SETTLE_PROCESSED: &str = "INSERT INTO processed (event_id, settled_at_ms) \
     SELECT value, ?2 FROM json_each(?1) WHERE true \
     ON CONFLICT (event_id) DO UPDATE SET settled_at_ms = excluded.settled_at_ms";
const SETTLE_VERSIONS: &str = "INSERT INTO applied_versions (source, record_table, record_key, version, deleted) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4 FROM json_each(?1) WHERE true \
     ON CONFLICT (source, record_table, record_key) DO UPDATE \
     SET version = excluded.version, deleted = excluded.deleted \
     WHERE excluded.version > applied_versions.version";
const SETTLE_ID_MAP: &str = "INSERT INTO id_map (source, source_table, source_key, target_table, target_key) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4 FROM json_each(?1) WHERE true \
     ON CONFLICT (source, source_table, source_key) DO UPDATE \
     SET target_table = excluded.target_table, target_key = excluded.target_key";
const SETTLE_OWN_WRITES: &str = "INSERT INTO own_writes (instance, record_table, record_key, version, at_ms) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, ?2 FROM json_each(?1) WHERE true \
     ON CONFLICT (instance, record_table, record_key, version) DO UPDATE SET at_ms = excluded.at_ms";
// The merge of `DeadLetter::merge`: first failure kept, attempts added (saturating at u32::MAX), the rest newer.
const SETTLE_DEAD_LETTERS: &str = "INSERT INTO dead_letters \
     (event_id, event, error, retryable, attempts, correlation_id, first_failed_ms, last_failed_ms) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, value ->> 7 \
     FROM json_each(?1) WHERE true \
     ON CONFLICT (event_id) DO UPDATE SET event = excluded.event, error = excluded.error, \
     retryable = excluded.retryable, attempts = min(dead_letters.attempts + excluded.attempts, 4294967295), \
     correlation_id = excluded.correlation_id, \
     first_failed_ms = min(dead_letters.first_failed_ms, excluded.first_failed_ms), \
     last_failed_ms = excluded.last_failed_ms";
const SETTLE_RESOLVED: &str =
    "DELETE FROM dead_letters WHERE event_id IN (SELECT value FROM json_each(?1))";
const SETTLE_ENQUEUE: &str = "INSERT INTO tasks \
     (id, handler, record_table, record_key, payload, status, attempts, due_ms, last_error, created_ms, updated_ms) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, \
     value ->> 7, value ->> 8, value ->> 9, value ->> 10 FROM json_each(?1) WHERE true \
     ON CONFLICT (id) DO NOTHING";
const SETTLE_RELEASE: &str = "UPDATE tasks SET due_ms = min(due_ms, ?3) \
     WHERE status = 'pending' AND record_table = ?1 AND record_key = ?2";
const SETTLE_WAIT: &str = "UPDATE tasks SET due_ms = ?2 WHERE id = ?1";
const SETTLE_DONE: &str = "UPDATE tasks SET status = 'done', attempts = min(attempts + 1, 4294967295), \
     last_error = NULL, updated_ms = ?2 WHERE id = ?1";
const SETTLE_FAILED: &str = "UPDATE tasks SET attempts = min(attempts + 1, 4294967295), last_error = ?2, \
     updated_ms = ?3, due_ms = coalesce(?4, due_ms), \
     status = CASE WHEN ?4 IS NULL THEN 'failed' ELSE status END WHERE id = ?1";
const SETTLE_CHECKPOINT: &str = "INSERT INTO checkpoints (source, token, updated_ms) VALUES (?1, ?2, ?3) \
     ON CONFLICT (source) DO UPDATE SET token = excluded.token, updated_ms = excluded.updated_ms";
// Saturating at i64::MAX: min(old, MAX - add) + add never overflows (an overflow would turn SQLite's integer
// into a float).
const SETTLE_TOTALS: &str = "INSERT INTO totals (name, value) \
     SELECT value ->> 0, value ->> 1 FROM json_each(?1) WHERE true \
     ON CONFLICT (name) DO UPDATE \
     SET value = min(totals.value, 9223372036854775807 - excluded.value) + excluded.value";

macro_rules! task_columns {
    () => {
        "id, handler, record_table, record_key, payload, status, attempts, due_ms, last_error, created_ms, \
         updated_ms"
    };
}

fn stored_task(row: &sqlx::sqlite::SqliteRow) -> std::result::Result<StoredTask, sqlx::Error> {
    Ok(StoredTask {
        id: row.try_get(0)?,
        handler: row.try_get(1)?,
        record_table: row.try_get(2)?,
        record_key: row.try_get(3)?,
        payload: row.try_get(4)?,
        status: row.try_get(5)?,
        attempts: row.try_get(6)?,
        due_ms: row.try_get(7)?,
        last_error: row.try_get(8)?,
        created_ms: row.try_get(9)?,
        updated_ms: row.try_get(10)?,
    })
}

/// Applies `rows` in `tx`: one statement per kind of change (and per non-enqueue task change).
async fn settle_rows(conn: &mut SqliteConnection, rows: &Rows) -> std::result::Result<(), Step> {
    let at_ms = rows.at_ms;
    if !rows.processed.is_empty() {
        sqlx::query(SETTLE_PROCESSED)
            .bind(json(&rows.processed)?)
            .bind(at_ms)
            .execute(&mut *conn)
            .await
            .map_err(Step::at("processed"))?;
    }
    if !rows.versions.is_empty() {
        let params: Vec<(&str, &str, &str, i64, bool)> = rows
            .versions
            .iter()
            .map(|(r, version, deleted)| {
                (
                    r.source.as_str(),
                    r.address.table.as_str(),
                    r.address.key.as_str(),
                    *version,
                    *deleted,
                )
            })
            .collect();
        sqlx::query(SETTLE_VERSIONS)
            .bind(json(&params)?)
            .execute(&mut *conn)
            .await
            .map_err(Step::at("applied_versions"))?;
    }
    if !rows.id_map.is_empty() {
        let params: Vec<(&str, &str, &str, &str, &str)> = rows
            .id_map
            .iter()
            .map(|(s, t)| {
                (
                    s.source.as_str(),
                    s.address.table.as_str(),
                    s.address.key.as_str(),
                    t.table.as_str(),
                    t.key.as_str(),
                )
            })
            .collect();
        sqlx::query(SETTLE_ID_MAP)
            .bind(json(&params)?)
            .execute(&mut *conn)
            .await
            .map_err(Step::at("id_map"))?;
    }
    if !rows.own_writes.is_empty() {
        let params: Vec<(&str, &str, &str, i64)> = rows
            .own_writes
            .iter()
            .map(|o| {
                (
                    o.instance.as_str(),
                    o.address.table.as_str(),
                    o.address.key.as_str(),
                    o.version,
                )
            })
            .collect();
        sqlx::query(SETTLE_OWN_WRITES)
            .bind(json(&params)?)
            .bind(at_ms)
            .execute(&mut *conn)
            .await
            .map_err(Step::at("own_writes"))?;
    }
    if !rows.dead_letters.is_empty() {
        #[allow(clippy::type_complexity)]
        let params: Vec<(&str, &str, &str, bool, i64, &str, i64, i64)> = rows
            .dead_letters
            .iter()
            .map(|l| {
                (
                    l.event_id.as_str(),
                    l.event.as_str(),
                    l.error.as_str(),
                    l.retryable,
                    l.attempts,
                    l.correlation_id.as_str(),
                    l.first_failed_ms,
                    l.last_failed_ms,
                )
            })
            .collect();
        sqlx::query(SETTLE_DEAD_LETTERS)
            .bind(json(&params)?)
            .execute(&mut *conn)
            .await
            .map_err(Step::at("dead_letters"))?;
    }
    if !rows.resolved.is_empty() {
        sqlx::query(SETTLE_RESOLVED)
            .bind(json(&rows.resolved)?)
            .execute(&mut *conn)
            .await
            .map_err(Step::at("dead_letters"))?;
    }
    for step in &rows.tasks {
        let query = match step {
            TaskStep::Enqueue(tasks) => {
                let params: Vec<serde_json::Value> = tasks
                    .iter()
                    .map(|t| {
                        serde_json::json!([
                            t.id,
                            t.handler,
                            t.record.table,
                            t.record.key,
                            t.payload,
                            t.status,
                            t.attempts,
                            t.due_ms,
                            t.last_error,
                            t.created_ms,
                            t.updated_ms
                        ])
                    })
                    .collect();
                sqlx::query(SETTLE_ENQUEUE).bind(json(&params)?)
            }
            TaskStep::Release(record) => sqlx::query(SETTLE_RELEASE)
                .bind(record.table.clone())
                .bind(record.key.clone())
                .bind(at_ms),
            TaskStep::Wait { id, due_ms } => {
                sqlx::query(SETTLE_WAIT).bind(id.clone()).bind(*due_ms)
            }
            TaskStep::Done { id } => sqlx::query(SETTLE_DONE).bind(id.clone()).bind(at_ms),
            TaskStep::Failed {
                id,
                error,
                retry_at_ms,
            } => sqlx::query(SETTLE_FAILED)
                .bind(id.clone())
                .bind(error.clone())
                .bind(at_ms)
                .bind(*retry_at_ms),
        };
        query.execute(&mut *conn).await.map_err(Step::at("tasks"))?;
    }
    if let Some((source, token)) = &rows.checkpoint {
        sqlx::query(SETTLE_CHECKPOINT)
            .bind(source.clone())
            .bind(token.clone())
            .bind(at_ms)
            .execute(&mut *conn)
            .await
            .map_err(Step::at("checkpoints"))?;
    }
    if !rows.totals.is_empty() {
        sqlx::query(SETTLE_TOTALS)
            .bind(json(&rows.totals)?)
            .execute(&mut *conn)
            .await
            .map_err(Step::at("totals"))?;
    }
    Ok(())
}

/// Where a settlement failed: the table it was writing, or an error before any SQL.
enum Step {
    Sql(&'static str, sqlx::Error),
    Other(Error),
}

impl Step {
    fn at(table: &'static str) -> impl FnOnce(sqlx::Error) -> Step {
        move |err| Step::Sql(table, err)
    }
}

impl From<Error> for Step {
    fn from(err: Error) -> Step {
        Step::Other(err)
    }
}

#[async_trait]
impl Ledger for SqliteLedger {
    async fn lookup(&self, query: &LedgerQuery) -> Result<LedgerView> {
        let mut view = LedgerView::default();
        if query.event_ids.is_empty()
            && query.records.is_empty()
            && query.targets.is_empty()
            && query.own_writes.is_empty()
        {
            return Ok(view);
        }
        let op = "lookup";
        let (records, targets, own_writes) = lookup_params(query).map_err(|e| self.label(e))?;
        // One read transaction: every answer from the same snapshot.
        let mut tx = self.reader.begin().await.map_err(|e| self.db(op, e))?;
        if !query.event_ids.is_empty() {
            let ids: Vec<String> = sqlx::query_scalar(LOOKUP_PROCESSED)
                .bind(json(&query.event_ids).map_err(|e| self.label(e))?)
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| self.db("lookup of processed event ids", e))?;
            view.processed.extend(ids);
        }
        if let Some(params) = records {
            let rows: Vec<(i64, i64, bool)> = sqlx::query_as(LOOKUP_VERSIONS)
                .bind(params)
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| self.db("lookup of applied versions", e))?;
            for (index, version, deleted) in rows {
                let record = asked(&query.records, index, &self.backend)?;
                let decoder = RowDecoder {
                    backend: &self.backend,
                    operation: op,
                    table: "applied_versions",
                    key: RecordKey(record),
                };
                view.applied.insert(
                    record.clone(),
                    crate::sync::ledger::AppliedVersion {
                        version: decoder.u64("version", version)?,
                        deleted,
                    },
                );
            }
        }
        if let Some(params) = targets {
            let rows: Vec<(i64, String, String)> = sqlx::query_as(LOOKUP_TARGETS)
                .bind(params)
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| self.db("lookup of the id map", e))?;
            for (index, table, key) in rows {
                let source = asked(&query.targets, index, &self.backend)?;
                let decoder = RowDecoder {
                    backend: &self.backend,
                    operation: op,
                    table: "id_map",
                    key: RecordKey(source),
                };
                let target: EntityRef =
                    decoder.reference(("target_table", "target_key"), &table, &key)?;
                view.targets.insert(source.clone(), target);
            }
        }
        if let Some(params) = own_writes {
            let rows: Vec<i64> = sqlx::query_scalar(LOOKUP_OWN_WRITES)
                .bind(params)
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| self.db("lookup of own writes", e))?;
            for index in rows {
                view.own_writes
                    .insert(asked(&query.own_writes, index, &self.backend)?.clone());
            }
        }
        // A read-only transaction: ending it is all a commit does.
        tx.commit().await.map_err(|e| self.db(op, e))?;
        Ok(view)
    }

    async fn settle(&self, settlement: &Settlement) -> Result<()> {
        if settlement.is_empty() {
            return Ok(());
        }
        let rows = Rows::of(settlement).map_err(|e| self.label(e))?;
        let mut tx = self.begin_write("settle").await?;
        match settle_rows(&mut tx, &rows).await {
            Ok(()) => {}
            Err(Step::Sql(table, err)) => {
                return Err(self.db(&format!("settle (writing {table})"), err));
            }
            Err(Step::Other(err)) => return Err(self.label(err)),
        }
        // Dropping the transaction on an error above rolls it back: nothing of the settlement stays.
        tx.commit().await.map_err(|e| self.db("settle (commit)", e))
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>> {
        sqlx::query_scalar("SELECT token FROM checkpoints WHERE source = ?1")
            .bind(source.to_owned())
            .fetch_optional(&self.reader)
            .await
            .map_err(|e| self.db("reading a checkpoint", e))
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let op = "listing dead letters";
        let rows = sqlx::query(
            "SELECT event_id, event, error, retryable, attempts, correlation_id, first_failed_ms, last_failed_ms \
             FROM dead_letters ORDER BY first_failed_ms, event_id LIMIT ?1",
        )
        .bind(clamp_i64(limit as u128))
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.db(op, e))?;
        rows.iter()
            .map(|row| {
                let stored = StoredLetter {
                    event_id: row.try_get(0)?,
                    event: row.try_get(1)?,
                    error: row.try_get(2)?,
                    retryable: row.try_get(3)?,
                    attempts: row.try_get(4)?,
                    correlation_id: row.try_get(5)?,
                    first_failed_ms: row.try_get(6)?,
                    last_failed_ms: row.try_get(7)?,
                };
                Ok(stored)
            })
            .map(|stored: std::result::Result<StoredLetter, sqlx::Error>| {
                stored
                    .map_err(|e| self.db("listing dead letters (table dead_letters)", e))?
                    .decode(&self.backend, op)
            })
            .collect()
    }

    async fn dead_letter_count(&self) -> Result<usize> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
            .fetch_one(&self.reader)
            .await
            .map_err(|e| self.db("counting dead letters", e))?;
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    async fn claim_tasks(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<DeferredTask>> {
        let op = "claiming tasks";
        let now = to_i64(now_ms, "the claim time").map_err(|e| self.label(e))?;
        let until = clamp_i64(u128::from(now_ms).saturating_add(lease.as_millis()));
        let mut tx = self.begin_write(op).await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE status = 'pending' AND due_ms <= ?1 ORDER BY due_ms, created_ms, id LIMIT ?2"
        ))
        .bind(now)
        .bind(clamp_i64(limit as u128))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.db(op, e))?;
        let tasks = rows
            .iter()
            .map(|row| {
                stored_task(row)
                    .map_err(|e| self.db("claiming tasks (table tasks)", e))?
                    .decode(&self.backend, op)
            })
            .collect::<Result<Vec<_>>>()?;
        if !tasks.is_empty() {
            let ids: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
            sqlx::query(
                "UPDATE tasks SET due_ms = ?2 WHERE id IN (SELECT value FROM json_each(?1))",
            )
            .bind(json(&ids).map_err(|e| self.label(e))?)
            .bind(until)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db(op, e))?;
        }
        tx.commit().await.map_err(|e| self.db(op, e))?;
        Ok(tasks)
    }

    async fn tasks(&self, limit: usize) -> Result<Vec<DeferredTask>> {
        let op = "listing tasks";
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks ORDER BY created_ms, id LIMIT ?1"
        ))
        .bind(clamp_i64(limit as u128))
        .fetch_all(&self.reader)
        .await
        .map_err(|e| self.db(op, e))?;
        rows.iter()
            .map(|row| {
                stored_task(row)
                    .map_err(|e| self.db("listing tasks (table tasks)", e))?
                    .decode(&self.backend, op)
            })
            .collect()
    }

    async fn totals(&self) -> Result<SyncStats> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT name, value FROM totals")
            .fetch_all(&self.reader)
            .await
            .map_err(|e| self.db("reading totals", e))?;
        totals_from(&self.backend, rows)
    }

    async fn prune(&self, retention: &Retention, now_ms: u64) -> Result<Pruned> {
        let op = "prune";
        let cutoff =
            |keep: Duration| clamp_i64(u128::from(now_ms).saturating_sub(keep.as_millis()));
        let mut tx = self.begin_write(op).await?;
        let event_ids = sqlx::query("DELETE FROM processed WHERE settled_at_ms < ?1")
            .bind(cutoff(retention.dedupe_window))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db("prune (processed)", e))?
            .rows_affected();
        let own_writes = sqlx::query("DELETE FROM own_writes WHERE at_ms < ?1")
            .bind(cutoff(retention.own_writes))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db("prune (own_writes)", e))?
            .rows_affected();
        let tasks = sqlx::query("DELETE FROM tasks WHERE status = 'done' AND updated_ms < ?1")
            .bind(cutoff(retention.finished_tasks))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db("prune (tasks)", e))?
            .rows_affected();
        tx.commit().await.map_err(|e| self.db(op, e))?;
        Ok(Pruned {
            event_ids,
            own_writes,
            tasks,
        })
    }
}

/// The JSON parameters of a lookup's record, id-map and own-write parts (`None` when not asked).
#[allow(clippy::type_complexity)]
fn lookup_params(query: &LedgerQuery) -> Result<(Option<String>, Option<String>, Option<String>)> {
    let triples = |records: &[crate::sync::ledger::SourceRecord]| -> Result<Option<String>> {
        if records.is_empty() {
            return Ok(None);
        }
        let rows = records
            .iter()
            .map(|r| {
                let a = sql::Address::of(&r.reference)?;
                Ok((r.source.clone(), a.table, a.key))
            })
            .collect::<Result<Vec<_>>>()?;
        json(&rows).map(Some)
    };
    let own = if query.own_writes.is_empty() {
        None
    } else {
        let rows = query
            .own_writes
            .iter()
            .map(|o| {
                let a = sql::Address::of(&o.record)?;
                let version = to_i64(o.version, || format!("the own write of {}", o.record));
                // A version no SQL ledger stores was never written: ask for one that cannot match.
                Ok((o.instance.clone(), a.table, a.key, version.unwrap_or(-1)))
            })
            .collect::<Result<Vec<_>>>()?;
        Some(json(&rows)?)
    };
    Ok((triples(&query.records)?, triples(&query.targets)?, own))
}

/// The item at a JSON array position the database returned.
fn asked<'a, T>(items: &'a [T], index: i64, backend: &str) -> Result<&'a T> {
    usize::try_from(index)
        .ok()
        .and_then(|i| items.get(i))
        .ok_or_else(|| Error::Backend {
            backend: backend.to_owned(),
            message: format!(
                "lookup: the database answered for position {index}, which was not asked"
            ),
            retryable: false,
            source: None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::ledger::{AppliedVersion, SettledEvent, SourceRecord};

    fn record(n: usize) -> SourceRecord {
        let reference =
            EntityRef::by_key("account", [("accountnumber", format!("A-{n}"))]).unwrap();
        SourceRecord::new("us", reference)
    }

    fn assert_send<T: Send>(_: T) {}

    #[test]
    fn opening_can_be_spawned() {
        assert_send(SqliteLedger::open("never-opened.db"));
        assert_send(SqliteLedger::in_memory());
    }

    #[tokio::test]
    async fn a_full_disk_is_a_permanent_error_that_says_so() {
        let ledger = SqliteLedger::in_memory().await.unwrap();
        // The one connection keeps the limit: no page may be added beyond what is there now.
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&ledger.writer)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA max_page_count = {pages}"
        )))
        .execute(&ledger.writer)
        .await
        .unwrap();
        let mut s = Settlement::at(1);
        for n in 0..2_000 {
            s.events.push(SettledEvent {
                event_id: format!("event-{n}-{}", "x".repeat(100)),
                record: record(n),
                applied: Some(AppliedVersion {
                    version: 1,
                    deleted: false,
                }),
            });
        }
        let err = ledger.settle(&s).await.unwrap_err();
        assert!(!err.is_retryable(), "{err}");
        assert!(err.to_string().contains("disk full"), "{err}");
        let query = LedgerQuery {
            event_ids: vec![s.events[0].event_id.clone()],
            ..LedgerQuery::default()
        };
        assert!(ledger.lookup(&query).await.unwrap().processed.is_empty());
    }
}
