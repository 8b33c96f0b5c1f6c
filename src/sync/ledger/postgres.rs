//! [`PostgresLedger`]: the [`Ledger`] in PostgreSQL (feature `postgres`), shared by several workers. Its docs say
//! what it stores, how workers share it and when it refuses a schema.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};

use crate::error::{Error, Result};
use crate::sync::ledger::sql::{
    Address, Classified, RecordKey, RowDecoder, Rows, StoredLetter, StoredTask, TaskStep,
    clamp_i64, map_sqlx, relabel, to_i64, totals_from,
};
use crate::sync::ledger::{
    AppliedVersion, DeadLetter, Ledger, LedgerQuery, LedgerView, Pruned, Retention, Settlement,
};
use crate::sync::stats::SyncStats;
use crate::sync::tasks::DeferredTask;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// What `ledger_info.application` says in a ledger.
const APPLICATION: &str = "eventual-upsert ledger";

/// The first key of the advisory lock held while a schema is checked and migrated (the second is the schema's
/// hash): "EU" + "LG".
const LOCK_CLASS: i32 = 0x4555_4c47;

fn latest_known() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The [`Ledger`] in PostgreSQL (feature `postgres`), shared by several workers.
///
/// # What it stores
///
/// The same tables as the SQLite ledger, in a schema of its own (`eventual_upsert` unless
/// [`with_schema`](PostgresLedgerBuilder::with_schema) names another, so it never mixes with an application's
/// tables or migration history): settled event ids, applied versions per source record (tombstones included),
/// the id map, own-write stamps, checkpoints, dead letters, deferred tasks and running totals (one row per
/// counter). A record is stored as its table name and the canonical JSON of its key; JSON payloads are stored as
/// text, exactly as written.
///
/// # Sharing it among workers
///
/// Any number of processes may settle into one ledger at once, each through its own pool:
///
/// * a settlement is one transaction of a handful of statements, whatever its size (rows go in as arrays with
///   `unnest`), so it is all-or-nothing;
/// * applied versions only go up: `INSERT ... ON CONFLICT ... DO UPDATE ... WHERE version < EXCLUDED.version`
///   decides under the row lock, so the highest version wins whichever worker commits last;
/// * dead letters merge, task attempts count and totals add up in SQL (`value = value + n`), never as a
///   read-then-write in the worker;
/// * [`claim_tasks`](Ledger::claim_tasks) takes due tasks with `FOR UPDATE SKIP LOCKED`, so two workers never
///   claim one task;
/// * rows are written in one sorted order, so concurrent settlements wait for each other rather than deadlock.
///
/// Failures that another try may cure (a lost connection, a pool timeout, a serialization failure, a deadlock, an
/// administrator shutdown) are retryable errors; a failed settlement changed nothing.
///
/// # Schema versions
///
/// Opening runs the embedded migrations (`migrations/postgres`) under an advisory lock, so workers starting
/// together do not race. A schema written by a newer build is refused with [`Error::LedgerSchemaTooNew`], and a
/// schema holding something else with [`Error::NotALedger`]; both leave it untouched.
///
/// The connection URL's password never appears in errors or in `Debug` output.
///
/// ```no_run
/// # async fn demo() -> eventual_upsert::Result<()> {
/// use eventual_upsert::sync::PostgresLedger;
/// let ledger = PostgresLedger::connect("postgres://sync@db.internal/sync").await?;
/// let eu = PostgresLedger::connect("postgres://sync@db.internal/sync").with_schema("sync_eu").await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresLedger {
    pool: PgPool,
    schema: Arc<str>,
    /// `ledger postgres:<host>:<port>/<database> schema <schema>`, for errors (no user, no password).
    backend: Arc<str>,
    sql: Arc<Statements>,
}

impl fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options = self.pool.connect_options();
        f.debug_struct("PostgresLedger")
            .field("host", &options.get_host())
            .field("port", &options.get_port())
            .field("database", &options.get_database())
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// How to reach the database.
enum Target {
    Url(std::result::Result<Box<PgConnectOptions>, Error>),
    Pool(PgPool),
}

/// Opens a [`PostgresLedger`]: from [`PostgresLedger::connect`] or [`PostgresLedger::from_pool`], then
/// optionally [`with_schema`](Self::with_schema), then `.await` (or [`open`](Self::open)).
pub struct PostgresLedgerBuilder {
    target: Target,
    schema: String,
    max_connections: u32,
    acquire_timeout: Duration,
}

impl fmt::Debug for PostgresLedgerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("PostgresLedgerBuilder");
        match &self.target {
            Target::Url(Ok(options)) => s
                .field("host", &options.get_host())
                .field("database", &options.get_database()),
            Target::Url(Err(_)) => s.field("url", &"<invalid>"),
            Target::Pool(_) => s.field("pool", &"<given>"),
        };
        s.field("schema", &self.schema).finish_non_exhaustive()
    }
}

impl PostgresLedger {
    /// The schema a ledger lives in unless [`with_schema`](PostgresLedgerBuilder::with_schema) names another.
    pub const DEFAULT_SCHEMA: &str = "eventual_upsert";

    /// A ledger in the database at `url` (`postgres://user:password@host:port/database?sslmode=require`), in
    /// its own pool. Nothing happens until the builder is awaited.
    pub fn connect(url: &str) -> PostgresLedgerBuilder {
        let options = PgConnectOptions::from_str(url)
            .map(Box::new)
            .map_err(|err| Error::InvalidConfig {
                reason: format!(
                    "the ledger's PostgreSQL URL does not parse: {}",
                    redact(&err.to_string(), url)
                ),
            });
        PostgresLedgerBuilder {
            target: Target::Url(options),
            schema: Self::DEFAULT_SCHEMA.to_owned(),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(30),
        }
    }

    /// A ledger reached through `pool` (shared with the application, or configured by it).
    pub fn from_pool(pool: PgPool) -> PostgresLedgerBuilder {
        PostgresLedgerBuilder {
            target: Target::Pool(pool),
            schema: Self::DEFAULT_SCHEMA.to_owned(),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(30),
        }
    }

    /// The schema the ledger's tables are in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The highest schema version this build knows.
    pub fn schema_version() -> i64 {
        latest_known()
    }

    /// The pool the ledger uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn db(&self, operation: &str, err: sqlx::Error) -> Error {
        map_sqlx(&self.backend, operation, err, classify)
    }

    fn label(&self, err: Error) -> Error {
        relabel(err, &self.backend)
    }
}

impl PostgresLedgerBuilder {
    /// Keeps the ledger's tables in `schema` (created if missing): 1 to 63 lowercase ASCII letters, digits or
    /// `_`, not starting with a digit. Ledgers in different schemas of one database are independent.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The most connections the ledger's own pool opens (default 8; ignored with [`PostgresLedger::from_pool`]).
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long a call waits for a connection (default 30 s; ignored with [`PostgresLedger::from_pool`]). While
    /// the server refuses connections (starting up), connecting is retried within this time; then the call fails
    /// with a retryable error.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Connects, checks the schema and brings it up to date.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for a URL or schema name that is not valid, [`Error::LedgerSchemaTooNew`] when
    /// a newer build wrote the schema, [`Error::NotALedger`] when the schema holds other tables (both leave it
    /// untouched), and [`Error::Backend`] when the database cannot be reached (retryable) or refuses.
    pub async fn open(self) -> Result<PostgresLedger> {
        validate_schema(&self.schema)?;
        let pool = match self.target {
            Target::Url(options) => {
                let options = options?;
                // Lazy: the first connection is the migration's, and its errors are reported there.
                PgPoolOptions::new()
                    .max_connections(self.max_connections)
                    .acquire_timeout(self.acquire_timeout)
                    .connect_lazy_with(*options)
            }
            Target::Pool(pool) => pool,
        };
        let backend: Arc<str> = label(&pool.connect_options(), &self.schema).into();
        migrate(&pool, &self.schema, &backend).await?;
        tracing::debug!(backend = %backend, "postgres ledger open");
        Ok(PostgresLedger {
            sql: Arc::new(Statements::new(&self.schema)),
            schema: self.schema.into(),
            backend,
            pool,
        })
    }
}

impl IntoFuture for PostgresLedgerBuilder {
    type Output = Result<PostgresLedger>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<PostgresLedger>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.open())
    }
}

fn label(options: &PgConnectOptions, schema: &str) -> String {
    format!(
        "ledger postgres:{}:{}/{} schema {schema}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or_default()
    )
}

fn validate_schema(schema: &str) -> Result<()> {
    let mut chars = schema.chars();
    let valid = matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && schema.len() <= 63
        && !schema.starts_with("pg_");
    match valid {
        true => Ok(()),
        false => Err(Error::InvalidConfig {
            reason: format!(
                "ledger schema {schema:?}: use 1 to 63 lowercase ASCII letters, digits or '_', not starting \
                 with a digit or 'pg_'"
            ),
        }),
    }
}

/// `text` with the password of `url` (if it has one) masked.
fn redact(text: &str, url: &str) -> String {
    let authority = url.split_once("://").map_or(url, |(_, rest)| {
        rest.split(['/', '?']).next().unwrap_or(rest)
    });
    let password = authority
        .rsplit_once('@')
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    match password {
        Some(password) => text.replace(password, "***"),
        None => text.to_owned(),
    }
}

/// What a schema holds, as far as opening a ledger cares.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Empty,
    Ledger(i64),
}

async fn inspect(conn: &mut PgConnection, schema: &str, backend: &str) -> Result<Found> {
    let db = |err| map_sqlx(backend, "checking the schema", err, classify);
    let refuse = |reason: String| Error::NotALedger {
        ledger: backend.to_owned(),
        reason,
    };
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f') ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    let has = |name: &str| tables.iter().any(|t| t == name);
    // The schema name is validated (lowercase letters, digits, '_'): safe to quote into SQL.
    let qualified = |table: &str| format!("\"{schema}\".{table}");
    if !has("ledger_info") {
        if tables.iter().all(|t| t == "_sqlx_migrations") {
            let applied: i64 = match has("_sqlx_migrations") {
                true => sqlx::query_scalar(AssertSqlSafe(format!(
                    "SELECT count(*) FROM {}",
                    qualified("_sqlx_migrations")
                )))
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
            "schema {schema:?} holds other tables ({}{}) and no ledger_info",
            listed.join(", "),
            if tables.len() > listed.len() {
                ", ..."
            } else {
                ""
            }
        )));
    }
    let application: Option<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT application FROM {} WHERE id = 1",
        qualified("ledger_info")
    )))
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
    let version: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT max(version) FROM {}",
        qualified("_sqlx_migrations")
    )))
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

/// Checks the schema and applies pending migrations on one connection of `pool`, under an advisory lock. The
/// connection is closed afterwards, never returned to the pool: it holds the lock and a search path of its own
/// until then.
async fn migrate(pool: &PgPool, schema: &str, backend: &str) -> Result<()> {
    let db = |operation: &str, err| map_sqlx(backend, operation, err, classify);
    let mut conn = pool.acquire().await.map_err(|err| db("connecting", err))?;
    conn.close_on_drop();
    sqlx::query("SELECT pg_advisory_lock($1, hashtext($2))")
        .bind(LOCK_CLASS)
        .bind(schema)
        .execute(&mut *conn)
        .await
        .map_err(|err| db("locking the schema", err))?;
    let found = inspect(&mut conn, schema, backend).await?;
    // Created only when missing: `CREATE SCHEMA IF NOT EXISTS` wants the right to create schemas even when the
    // schema is there (made by an administrator for a user without that right).
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut *conn)
            .await
            .map_err(|err| db("checking the schema", err))?;
    if !exists {
        sqlx::query(AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
        )))
        .execute(&mut *conn)
        .await
        .map_err(|err| db("creating the schema", err))?;
    }
    // The migrations name their tables unqualified: they land in the ledger's schema.
    sqlx::query(AssertSqlSafe(format!("SET search_path TO \"{schema}\"")))
        .execute(&mut *conn)
        .await
        .map_err(|err| db("selecting the schema", err))?;
    // `run_direct` is `run` without the `Acquire` bound whose lifetime makes the future not `Send`.
    MIGRATOR
        .run_direct(None, &mut *conn, false)
        .await
        .map_err(|err| migrate_error(backend, err))?;
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
    // Closing ends the session, which releases the advisory lock.
    conn.close()
        .await
        .map_err(|err| db("closing the migration connection", err))
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

fn classify(db: &dyn sqlx::error::DatabaseError) -> Classified {
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    let (retryable, note) = match code.as_str() {
        "40001" => (true, Some("serialization failure")),
        "40P01" => (true, Some("deadlock")),
        "55P03" => (true, Some("lock not available")),
        "57014" => (true, Some("statement cancelled")),
        "57P01" | "57P02" | "57P03" => (true, Some("the server is shutting down or starting")),
        "53300" => (true, Some("too many connections")),
        "53200" => (true, Some("the server is out of memory")),
        "53100" => (false, Some("disk full")),
        "28P01" | "28000" => (false, Some("authentication failed")),
        "42P01" => (
            false,
            Some("a ledger table is missing (was the schema dropped?)"),
        ),
        c if c.starts_with("08") => (true, Some("connection failure")),
        c if c.starts_with("23") => (false, Some("constraint violated")),
        c if c.starts_with("22") => (false, Some("bad data")),
        _ => (false, None),
    };
    Classified { retryable, note }
}

/// Every statement, with the schema's name in its table names (so any pool works, whatever its search path).
struct Statements {
    lookup_processed: Arc<str>,
    lookup_versions: Arc<str>,
    lookup_targets: Arc<str>,
    lookup_own_writes: Arc<str>,
    settle_processed: Arc<str>,
    settle_versions: Arc<str>,
    settle_id_map: Arc<str>,
    settle_own_writes: Arc<str>,
    settle_dead_letters: Arc<str>,
    settle_resolved: Arc<str>,
    settle_enqueue: Arc<str>,
    settle_release: Arc<str>,
    settle_wait: Arc<str>,
    settle_done: Arc<str>,
    settle_failed: Arc<str>,
    settle_checkpoint: Arc<str>,
    settle_totals: Arc<str>,
    checkpoint: Arc<str>,
    dead_letters: Arc<str>,
    dead_letter_count: Arc<str>,
    claim_tasks: Arc<str>,
    tasks: Arc<str>,
    totals: Arc<str>,
    prune_processed: Arc<str>,
    prune_own_writes: Arc<str>,
    prune_tasks: Arc<str>,
}

macro_rules! task_columns {
    ($t:literal) => {
        concat!(
            $t,
            "id, ",
            $t,
            "handler, ",
            $t,
            "record_table, ",
            $t,
            "record_key, ",
            $t,
            "payload, ",
            $t,
            "status, ",
            $t,
            "attempts, ",
            $t,
            "due_ms, ",
            $t,
            "last_error, ",
            $t,
            "created_ms, ",
            $t,
            "updated_ms"
        )
    };
}

impl Statements {
    fn new(schema: &str) -> Self {
        let prefix = format!("\"{schema}\".");
        let s = |template: &str| -> Arc<str> { template.replace("{s}.", &prefix).into() };
        Statements {
            // `WITH ORDINALITY` numbers the asked-for rows (from 1), so each answer goes back to its question.
            lookup_processed: s("SELECT p.event_id FROM unnest($1::text[]) AS q(event_id) \
                 JOIN {s}.processed AS p ON p.event_id = q.event_id"),
            lookup_versions: s("SELECT q.i, v.version, v.deleted \
                 FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS q(source, record_table, record_key, i) \
                 JOIN {s}.applied_versions AS v \
                 ON v.source = q.source AND v.record_table = q.record_table AND v.record_key = q.record_key"),
            lookup_targets: s("SELECT q.i, m.target_table, m.target_key \
                 FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS q(source, source_table, source_key, i) \
                 JOIN {s}.id_map AS m \
                 ON m.source = q.source AND m.source_table = q.source_table AND m.source_key = q.source_key"),
            lookup_own_writes: s("SELECT q.i \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) WITH ORDINALITY \
                 AS q(instance, record_table, record_key, version, i) \
                 JOIN {s}.own_writes AS o ON o.instance = q.instance AND o.record_table = q.record_table \
                 AND o.record_key = q.record_key AND o.version = q.version"),
            settle_processed: s("INSERT INTO {s}.processed (event_id, settled_at_ms) \
                 SELECT e, $2 FROM unnest($1::text[]) AS e \
                 ON CONFLICT (event_id) DO UPDATE SET settled_at_ms = EXCLUDED.settled_at_ms"),
            settle_versions: s(
                "INSERT INTO {s}.applied_versions AS v (source, record_table, record_key, version, deleted) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::bool[]) \
                 ON CONFLICT (source, record_table, record_key) DO UPDATE \
                 SET version = EXCLUDED.version, deleted = EXCLUDED.deleted WHERE v.version < EXCLUDED.version",
            ),
            settle_id_map: s(
                "INSERT INTO {s}.id_map (source, source_table, source_key, target_table, target_key) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                 ON CONFLICT (source, source_table, source_key) DO UPDATE \
                 SET target_table = EXCLUDED.target_table, target_key = EXCLUDED.target_key",
            ),
            settle_own_writes: s(
                "INSERT INTO {s}.own_writes (instance, record_table, record_key, version, at_ms) \
                 SELECT q.*, $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) AS q \
                 ON CONFLICT (instance, record_table, record_key, version) DO UPDATE SET at_ms = EXCLUDED.at_ms",
            ),
            // The merge of `DeadLetter::merge`, under the row lock: first failure kept, attempts added
            // (saturating at u32::MAX), the rest from the newer letter.
            settle_dead_letters: s("INSERT INTO {s}.dead_letters AS d \
                 (event_id, event, error, retryable, attempts, correlation_id, first_failed_ms, last_failed_ms) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::int8[], $6::text[], \
                 $7::int8[], $8::int8[]) \
                 ON CONFLICT (event_id) DO UPDATE SET event = EXCLUDED.event, error = EXCLUDED.error, \
                 retryable = EXCLUDED.retryable, attempts = LEAST(d.attempts + EXCLUDED.attempts, 4294967295), \
                 correlation_id = EXCLUDED.correlation_id, \
                 first_failed_ms = LEAST(d.first_failed_ms, EXCLUDED.first_failed_ms), \
                 last_failed_ms = EXCLUDED.last_failed_ms"),
            settle_resolved: s("DELETE FROM {s}.dead_letters WHERE event_id = ANY($1::text[])"),
            settle_enqueue: s("INSERT INTO {s}.tasks \
                 (id, handler, record_table, record_key, payload, status, attempts, due_ms, last_error, \
                 created_ms, updated_ms) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                 $7::int8[], $8::int8[], $9::text[], $10::int8[], $11::int8[]) \
                 ON CONFLICT (id) DO NOTHING"),
            settle_release: s("UPDATE {s}.tasks SET due_ms = LEAST(due_ms, $3) \
                 WHERE status = 'pending' AND record_table = $1 AND record_key = $2"),
            settle_wait: s("UPDATE {s}.tasks SET due_ms = $2 WHERE id = $1"),
            settle_done: s(
                "UPDATE {s}.tasks SET status = 'done', attempts = LEAST(attempts + 1, 4294967295), \
                 last_error = NULL, updated_ms = $2 WHERE id = $1",
            ),
            settle_failed: s(
                "UPDATE {s}.tasks SET attempts = LEAST(attempts + 1, 4294967295), last_error = $2, \
                 updated_ms = $3, due_ms = COALESCE($4::int8, due_ms), \
                 status = CASE WHEN $4::int8 IS NULL THEN 'failed' ELSE status END WHERE id = $1",
            ),
            settle_checkpoint: s(
                "INSERT INTO {s}.checkpoints (source, token, updated_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (source) DO UPDATE SET token = EXCLUDED.token, updated_ms = EXCLUDED.updated_ms",
            ),
            // Saturating at i64::MAX (an overflow would be an error).
            settle_totals: s("INSERT INTO {s}.totals AS t (name, value) \
                 SELECT * FROM unnest($1::text[], $2::int8[]) \
                 ON CONFLICT (name) DO UPDATE \
                 SET value = LEAST(t.value, 9223372036854775807 - EXCLUDED.value) + EXCLUDED.value"),
            checkpoint: s("SELECT token FROM {s}.checkpoints WHERE source = $1"),
            dead_letters: s(
                "SELECT event_id, event, error, retryable, attempts, correlation_id, \
                 first_failed_ms, last_failed_ms FROM {s}.dead_letters \
                 ORDER BY first_failed_ms, event_id LIMIT $1",
            ),
            dead_letter_count: s("SELECT count(*) FROM {s}.dead_letters"),
            // Returns the task as it was before the claim (its old due time), as every ledger does.
            claim_tasks: s(concat!(
                "WITH due AS (SELECT id, due_ms FROM {s}.tasks WHERE status = 'pending' AND due_ms <= $1 \
                 ORDER BY due_ms, created_ms, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 UPDATE {s}.tasks AS t SET due_ms = $3 FROM due WHERE t.id = due.id RETURNING ",
                "t.id, t.handler, t.record_table, t.record_key, t.payload, t.status, t.attempts, due.due_ms, \
                 t.last_error, t.created_ms, t.updated_ms"
            )),
            tasks: s(concat!(
                "SELECT ",
                task_columns!(""),
                " FROM {s}.tasks ORDER BY created_ms, id LIMIT $1"
            )),
            totals: s("SELECT name, value FROM {s}.totals"),
            prune_processed: s("DELETE FROM {s}.processed WHERE settled_at_ms < $1"),
            prune_own_writes: s("DELETE FROM {s}.own_writes WHERE at_ms < $1"),
            prune_tasks: s("DELETE FROM {s}.tasks WHERE status = 'done' AND updated_ms < $1"),
        }
    }
}

fn query(
    sql: &Arc<str>,
) -> sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(AssertSqlSafe(Arc::clone(sql)))
}

fn stored_task(row: &PgRow) -> std::result::Result<StoredTask, sqlx::Error> {
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

/// Where a settlement failed: the table it was writing.
struct Failed(&'static str, sqlx::Error);

fn at(table: &'static str) -> impl FnOnce(sqlx::Error) -> Failed {
    move |err| Failed(table, err)
}

async fn settle_rows(
    conn: &mut PgConnection,
    sql: &Statements,
    rows: &Rows,
) -> std::result::Result<(), Failed> {
    let at_ms = rows.at_ms;
    if !rows.processed.is_empty() {
        query(&sql.settle_processed)
            .bind(&rows.processed)
            .bind(at_ms)
            .execute(&mut *conn)
            .await
            .map_err(at("processed"))?;
    }
    if !rows.versions.is_empty() {
        let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (record, version, deleted) in &rows.versions {
            cols.0.push(record.source.as_str());
            cols.1.push(record.address.table.as_str());
            cols.2.push(record.address.key.as_str());
            cols.3.push(*version);
            cols.4.push(*deleted);
        }
        query(&sql.settle_versions)
            .bind(cols.0)
            .bind(cols.1)
            .bind(cols.2)
            .bind(cols.3)
            .bind(cols.4)
            .execute(&mut *conn)
            .await
            .map_err(at("applied_versions"))?;
    }
    if !rows.id_map.is_empty() {
        let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (source, target) in &rows.id_map {
            cols.0.push(source.source.as_str());
            cols.1.push(source.address.table.as_str());
            cols.2.push(source.address.key.as_str());
            cols.3.push(target.table.as_str());
            cols.4.push(target.key.as_str());
        }
        query(&sql.settle_id_map)
            .bind(cols.0)
            .bind(cols.1)
            .bind(cols.2)
            .bind(cols.3)
            .bind(cols.4)
            .execute(&mut *conn)
            .await
            .map_err(at("id_map"))?;
    }
    if !rows.own_writes.is_empty() {
        let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for own in &rows.own_writes {
            cols.0.push(own.instance.as_str());
            cols.1.push(own.address.table.as_str());
            cols.2.push(own.address.key.as_str());
            cols.3.push(own.version);
        }
        query(&sql.settle_own_writes)
            .bind(cols.0)
            .bind(cols.1)
            .bind(cols.2)
            .bind(cols.3)
            .bind(at_ms)
            .execute(&mut *conn)
            .await
            .map_err(at("own_writes"))?;
    }
    if !rows.dead_letters.is_empty() {
        let letters = &rows.dead_letters;
        query(&sql.settle_dead_letters)
            .bind(
                letters
                    .iter()
                    .map(|l| l.event_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(letters.iter().map(|l| l.event.as_str()).collect::<Vec<_>>())
            .bind(letters.iter().map(|l| l.error.as_str()).collect::<Vec<_>>())
            .bind(letters.iter().map(|l| l.retryable).collect::<Vec<_>>())
            .bind(letters.iter().map(|l| l.attempts).collect::<Vec<_>>())
            .bind(
                letters
                    .iter()
                    .map(|l| l.correlation_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                letters
                    .iter()
                    .map(|l| l.first_failed_ms)
                    .collect::<Vec<_>>(),
            )
            .bind(letters.iter().map(|l| l.last_failed_ms).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await
            .map_err(at("dead_letters"))?;
    }
    if !rows.resolved.is_empty() {
        query(&sql.settle_resolved)
            .bind(&rows.resolved)
            .execute(&mut *conn)
            .await
            .map_err(at("dead_letters"))?;
    }
    for step in &rows.tasks {
        let statement = match step {
            TaskStep::Enqueue(tasks) => query(&sql.settle_enqueue)
                .bind(tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>())
                .bind(tasks.iter().map(|t| t.handler.as_str()).collect::<Vec<_>>())
                .bind(
                    tasks
                        .iter()
                        .map(|t| t.record.table.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    tasks
                        .iter()
                        .map(|t| t.record.key.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(tasks.iter().map(|t| t.payload.as_str()).collect::<Vec<_>>())
                .bind(tasks.iter().map(|t| t.status).collect::<Vec<_>>())
                .bind(tasks.iter().map(|t| t.attempts).collect::<Vec<_>>())
                .bind(tasks.iter().map(|t| t.due_ms).collect::<Vec<_>>())
                .bind(
                    tasks
                        .iter()
                        .map(|t| t.last_error.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(tasks.iter().map(|t| t.created_ms).collect::<Vec<_>>())
                .bind(tasks.iter().map(|t| t.updated_ms).collect::<Vec<_>>()),
            TaskStep::Release(record) => query(&sql.settle_release)
                .bind(record.table.as_str())
                .bind(record.key.as_str())
                .bind(at_ms),
            TaskStep::Wait { id, due_ms } => {
                query(&sql.settle_wait).bind(id.as_str()).bind(*due_ms)
            }
            TaskStep::Done { id } => query(&sql.settle_done).bind(id.as_str()).bind(at_ms),
            TaskStep::Failed {
                id,
                error,
                retry_at_ms,
            } => query(&sql.settle_failed)
                .bind(id.as_str())
                .bind(error.as_str())
                .bind(at_ms)
                .bind(*retry_at_ms),
        };
        statement.execute(&mut *conn).await.map_err(at("tasks"))?;
    }
    if let Some((source, token)) = &rows.checkpoint {
        query(&sql.settle_checkpoint)
            .bind(source.as_str())
            .bind(token.as_str())
            .bind(at_ms)
            .execute(&mut *conn)
            .await
            .map_err(at("checkpoints"))?;
    }
    if !rows.totals.is_empty() {
        query(&sql.settle_totals)
            .bind(
                rows.totals
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>(),
            )
            .bind(
                rows.totals
                    .iter()
                    .map(|(_, value)| *value)
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *conn)
            .await
            .map_err(at("totals"))?;
    }
    Ok(())
}

/// Source, table and key columns of `records`.
fn triples(
    records: &[crate::sync::ledger::SourceRecord],
) -> Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let mut cols = (
        Vec::with_capacity(records.len()),
        Vec::with_capacity(records.len()),
        Vec::with_capacity(records.len()),
    );
    for record in records {
        let address = Address::of(&record.reference)?;
        cols.0.push(record.source.clone());
        cols.1.push(address.table);
        cols.2.push(address.key);
    }
    Ok(cols)
}

/// The item at a 1-based ordinal the database returned.
fn asked<'a, T>(items: &'a [T], ordinal: i64, backend: &str) -> Result<&'a T> {
    usize::try_from(ordinal)
        .ok()
        .and_then(|i| i.checked_sub(1))
        .and_then(|i| items.get(i))
        .ok_or_else(|| Error::Backend {
            backend: backend.to_owned(),
            message: format!(
                "lookup: the database answered for position {ordinal}, which was not asked"
            ),
            retryable: false,
            source: None,
        })
}

#[async_trait]
impl Ledger for PostgresLedger {
    async fn lookup(&self, query_: &LedgerQuery) -> Result<LedgerView> {
        let mut view = LedgerView::default();
        let q = query_;
        if q.event_ids.is_empty()
            && q.records.is_empty()
            && q.targets.is_empty()
            && q.own_writes.is_empty()
        {
            return Ok(view);
        }
        let op = "lookup";
        let records = triples(&q.records).map_err(|e| self.label(e))?;
        let targets = triples(&q.targets).map_err(|e| self.label(e))?;
        // One snapshot for every part of the answer.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| self.db(op, e))?;
        if !q.event_ids.is_empty() {
            let ids: Vec<String> =
                sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.lookup_processed)))
                    .bind(&q.event_ids)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| self.db("lookup of processed event ids", e))?;
            view.processed.extend(ids);
        }
        if !q.records.is_empty() {
            let rows: Vec<(i64, i64, bool)> =
                sqlx::query_as(AssertSqlSafe(Arc::clone(&self.sql.lookup_versions)))
                    .bind(records.0)
                    .bind(records.1)
                    .bind(records.2)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| self.db("lookup of applied versions", e))?;
            for (ordinal, version, deleted) in rows {
                let record = asked(&q.records, ordinal, &self.backend)?;
                let decoder = RowDecoder {
                    backend: &self.backend,
                    operation: op,
                    table: "applied_versions",
                    key: RecordKey(record),
                };
                view.applied.insert(
                    record.clone(),
                    AppliedVersion {
                        version: decoder.u64("version", version)?,
                        deleted,
                    },
                );
            }
        }
        if !q.targets.is_empty() {
            let rows: Vec<(i64, String, String)> =
                sqlx::query_as(AssertSqlSafe(Arc::clone(&self.sql.lookup_targets)))
                    .bind(targets.0)
                    .bind(targets.1)
                    .bind(targets.2)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| self.db("lookup of the id map", e))?;
            for (ordinal, table, key) in rows {
                let source = asked(&q.targets, ordinal, &self.backend)?;
                let decoder = RowDecoder {
                    backend: &self.backend,
                    operation: op,
                    table: "id_map",
                    key: RecordKey(source),
                };
                let target = decoder.reference(("target_table", "target_key"), &table, &key)?;
                view.targets.insert(source.clone(), target);
            }
        }
        if !q.own_writes.is_empty() {
            let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for own in &q.own_writes {
                let address = Address::of(&own.record).map_err(|e| self.label(e))?;
                cols.0.push(own.instance.clone());
                cols.1.push(address.table);
                cols.2.push(address.key);
                // A version no SQL ledger stores was never written: ask for one that cannot match.
                cols.3.push(i64::try_from(own.version).unwrap_or(-1));
            }
            let ordinals: Vec<i64> =
                sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.lookup_own_writes)))
                    .bind(cols.0)
                    .bind(cols.1)
                    .bind(cols.2)
                    .bind(cols.3)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| self.db("lookup of own writes", e))?;
            for ordinal in ordinals {
                view.own_writes
                    .insert(asked(&q.own_writes, ordinal, &self.backend)?.clone());
            }
        }
        tx.commit().await.map_err(|e| self.db(op, e))?;
        Ok(view)
    }

    async fn settle(&self, settlement: &Settlement) -> Result<()> {
        if settlement.is_empty() {
            return Ok(());
        }
        let rows = Rows::of(settlement).map_err(|e| self.label(e))?;
        let mut tx = self.pool.begin().await.map_err(|e| self.db("settle", e))?;
        if let Err(Failed(table, err)) = settle_rows(&mut tx, &self.sql, &rows).await {
            // Dropping the transaction rolls it back: nothing of the settlement stays.
            return Err(self.db(&format!("settle (writing {table})"), err));
        }
        tx.commit().await.map_err(|e| self.db("settle (commit)", e))
    }

    async fn checkpoint(&self, source: &str) -> Result<Option<String>> {
        sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.checkpoint)))
            .bind(source)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.db("reading a checkpoint", e))
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        let op = "listing dead letters";
        let rows = query(&self.sql.dead_letters)
            .bind(clamp_i64(limit as u128))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db(op, e))?;
        rows.iter()
            .map(|row| {
                let stored = (|| {
                    Ok::<_, sqlx::Error>(StoredLetter {
                        event_id: row.try_get(0)?,
                        event: row.try_get(1)?,
                        error: row.try_get(2)?,
                        retryable: row.try_get(3)?,
                        attempts: row.try_get(4)?,
                        correlation_id: row.try_get(5)?,
                        first_failed_ms: row.try_get(6)?,
                        last_failed_ms: row.try_get(7)?,
                    })
                })()
                .map_err(|e| self.db("listing dead letters (table dead_letters)", e))?;
                stored.decode(&self.backend, op)
            })
            .collect()
    }

    async fn dead_letter_count(&self) -> Result<usize> {
        let count: i64 = sqlx::query_scalar(AssertSqlSafe(Arc::clone(&self.sql.dead_letter_count)))
            .fetch_one(&self.pool)
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
        // One statement: it locks, skips what other workers hold, and updates, atomically.
        let rows = query(&self.sql.claim_tasks)
            .bind(now)
            .bind(clamp_i64(limit as u128))
            .bind(until)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db(op, e))?;
        let mut tasks = rows
            .iter()
            .map(|row| {
                stored_task(row)
                    .map_err(|e| self.db("claiming tasks (table tasks)", e))?
                    .decode(&self.backend, op)
            })
            .collect::<Result<Vec<_>>>()?;
        // RETURNING has no order.
        tasks.sort_by(|a, b| (a.due_ms, a.created_ms, &a.id).cmp(&(b.due_ms, b.created_ms, &b.id)));
        Ok(tasks)
    }

    async fn tasks(&self, limit: usize) -> Result<Vec<DeferredTask>> {
        let op = "listing tasks";
        let rows = query(&self.sql.tasks)
            .bind(clamp_i64(limit as u128))
            .fetch_all(&self.pool)
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
        let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(Arc::clone(&self.sql.totals)))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.db("reading totals", e))?;
        totals_from(&self.backend, rows)
    }

    async fn prune(&self, retention: &Retention, now_ms: u64) -> Result<Pruned> {
        let op = "prune";
        let cutoff =
            |keep: Duration| clamp_i64(u128::from(now_ms).saturating_sub(keep.as_millis()));
        let mut tx = self.pool.begin().await.map_err(|e| self.db(op, e))?;
        let event_ids = query(&self.sql.prune_processed)
            .bind(cutoff(retention.dedupe_window))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db("prune (processed)", e))?
            .rows_affected();
        let own_writes = query(&self.sql.prune_own_writes)
            .bind(cutoff(retention.own_writes))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.db("prune (own_writes)", e))?
            .rows_affected();
        let tasks = query(&self.sql.prune_tasks)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        let url = "postgres://root:s3cret@db.internal:5432/sync";
        assert_eq!(redact("bad s3cret here", url), "bad *** here");
        assert_eq!(redact("nothing", "postgres://db/sync"), "nothing");
        let builder = PostgresLedger::connect(url);
        let debug = format!("{builder:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("db.internal"), "{debug}");
    }

    #[test]
    fn schema_names_are_checked() {
        assert!(validate_schema("sync_eu").is_ok());
        assert!(validate_schema("_t1").is_ok());
        for bad in ["", "1a", "Sync", "a-b", "a\"b", "pg_x", &"a".repeat(64)] {
            assert!(validate_schema(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn statements_name_the_schema() {
        let sql = Statements::new("sync_eu");
        assert!(sql.settle_versions.contains("\"sync_eu\".applied_versions"));
        assert!(!sql.claim_tasks.contains("{s}"));
    }
}
