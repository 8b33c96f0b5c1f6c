//! Deterministic, seeded fault-injection simulation of the sync pipeline (issue 4, item 7), on the memory, SQLite
//! and PostgreSQL ledgers (issue 9, items 8 and 9).
//!
//! ```sh
//! cargo test --test simulation                                 # memory 0..1000, SQLite 0..50, PostgreSQL 0..20
//! SIM_LEDGER=sqlite SIM_SEED=42 cargo test --test simulation   # one seed on one ledger: replays a failure exactly
//! SIM_LEDGER=postgres SIM_SEEDS=200 cargo test --test simulation           # seeds 0..200 on PostgreSQL only
//! SIM_SEEDS=100000 cargo test --release --test simulation -- --nocapture # the long run, with its summary line
//! ```
//!
//! # Ledgers
//!
//! Three tests play the seeds, each on its own ledger: `simulation` on a [`MemoryLedger`] (seeds `0..SIM_SEEDS`,
//! default 1000), `simulation_sqlite` on a [`SqliteLedger`] in a new file per seed (`0..SIM_SQLITE_SEEDS`,
//! default 50; the files go to `SIM_SQLITE_DIR`, else `/dev/shm` if there is one, else the temporary directory:
//! see [`sqlite_dir`]) and `simulation_postgres` on a [`PostgresLedger`] in a new schema per seed of the database
//! at `DATABASE_URL`, dropped after (`0..SIM_POSTGRES_SEEDS`, default 20; skipped, saying so, when
//! `DATABASE_URL` is unset). `SIM_LEDGER=memory|sqlite|postgres` or `SIM_SEED=n` selects: `simulation` then plays
//! that ledger (default memory) and those seeds (`SIM_SEEDS` defaulting to the ledger's default), and the other
//! two tests skip, saying so. A failing seed prints the command that replays it.
//!
//! Whatever the ledger, the workers reach it through the same wrapper ([`SlowLedger`]: latency, and failures
//! injected there, so every backend sees the same faults), and the end checks read it through the [`Ledger`]
//! trait. A seed on a durable ledger plays the very schedule it plays on the memory ledger (see below), so every
//! durable seed is also played on a [`MemoryLedger`], and the two runs must agree (same counters, crashes, kills,
//! placeholders, aliases and LOB writes): a ledger that answers a call differently from the memory ledger shows up
//! even where the end checks would not notice.
//!
//! # The paused clock and real I/O
//!
//! sqlx does real I/O (SQLite on a worker thread of its own, PostgreSQL over TCP), and a paused Tokio clock
//! auto-advances to the next timer whenever the runtime has nothing to do, which includes waiting for that I/O.
//! It bites at once: with the ledgers used in the simulation's runtime, `SqliteLedger::open` fails on a paused
//! clock (sqlx's 30 s acquire timeout fires as soon as the runtime waits for the SQLite thread); opened before
//! the clock is paused, 8 seeds out of 8 failed (the acquire timeout again, on lazily opened connections, or the
//! clock jumping to the simulated-day bound while a query ran); a PostgreSQL ledger with a ten-year acquire
//! timeout failed 10 seeds out of 10 at the simulated-day bound, the only timer left while a query is in flight.
//! Generous timeouts cannot fix that (the bound, a worker's kill timer or a backoff would still fire during a
//! query, at a point set by the machine's speed), and a real clock with the simulation's time scaled down would
//! make the kills and every interleaving depend on the machine's speed too.
//!
//! So a durable ledger lives on a runtime of its own, with a real clock and IO (sqlx's timeouts are real and
//! generous there), and the simulation calls it through [`RealClock`]: the call runs on that runtime while the
//! simulation's thread blocks until it returns. Blocking a runtime's only thread is what makes this sound here: a
//! blocked thread neither parks nor advances its clock, and nothing else in the simulation runs meanwhile. A ledger
//! call is thus one step taking no simulated time, exactly like a [`MemoryLedger`] call (whose calls never
//! yield); kills, backoffs and the bound fire only at simulated instants, and the schedule is the memory run's.
//! (Waiting in `spawn_blocking` instead also stops the auto-advance, Tokio inhibits it while a blocking task runs,
//! but the wait yields: the LOB's concurrent writes then run during the ledger call, and the schedule, still the
//! same on SQLite and PostgreSQL, differs from the memory run's.) A call that takes more than a minute of real time
//! fails the seed rather than hanging it.
//!
//! # The schedule
//!
//! Each seed plays a random schedule in its own single-threaded Tokio runtime whose clock is paused: outages,
//! backoffs, `Retry-After` waits and breaker pauses cost no real time, and the same seed always makes the same
//! schedule. The world is a source instance ("us", the system of record) and a target instance ("eu"), both
//! [`MemoryStore`]s with one schema, and one sync direction us → eu: a [`QueueSource`] fed by a "network" that
//! duplicates and reorders events, and a [`Pipeline`] whose worker crashes and restarts from its ledger.
//! Meanwhile a line-of-business app (LOB) writes to the target: contacts that reference accounts the sync may not
//! have delivered yet (ensure-then-write creates placeholders) and notes in a target-owned column. The target
//! fails on schedule (outages, transient failures, 429s, latency), and so does the ledger (failures, latency).
//! Polls and dead-letter replays sometimes run concurrently with LOB writes and new faults, and sometimes the
//! worker is killed halfway (its future dropped at an await point after a random simulated time). The ledger's
//! latency is such an await point before every call, so a worker is killed between its write to the target and
//! the ledger's settlement of it, on every backend. A ledger call itself is one step that is never cut (see "The
//! paused clock" above): a kill finds a settlement either committed or not begun, and the restarted worker starts
//! from what the ledger committed.
//!
//! Records are addressed both ways (issue 9). `accountnumber` is account's alternate key at both instances; the
//! sync's events address accounts by source GUID, as a change feed does, and carry the number. The LOB names an
//! account by number or by GUID, as the seeded RNG chooses: when the target has it (the LOB looks it up by
//! number), by number or by the GUID found there; when it does not, the one way the LOB knows it. Half the
//! accounts are "keyed": the LOB knows them by number, so its contact creates the placeholder by key, under a
//! GUID of the target's, and the account's event later hydrates it by source GUID (the writer redirects the write
//! onto the placeholder, the applier records the alias in the ledger's id map, and every later event of the
//! account, and every lookup to it, must land there). The others the LOB knows by source GUID. A record must not
//! be addressed both ways before the sync brings it (two placeholders that nothing can merge: the README's
//! "Address a record one way"), and the sync addresses contacts' lookups by source GUID, so the source gives a
//! keyed account contacts only once the ledger has settled the account's own event.
//!
//! After the schedule everything is restored and drained, dead letters are replayed, and the checks run:
//!
//! 1. every source account has exactly one home at the target, the one record holding its number: under its
//!    source GUID, or under the GUID the ledger's id map aliases it to; no target account is nobody's home (no
//!    duplicate rows), and every alias names a home. The target equals the source on every sync-owned field of
//!    every source record, its lookups pointing at the homes;
//! 2. every write the LOB made is intact (its contacts, pointing at their account's home, and its notes: the sync
//!    never overwrote them);
//! 3. no placeholder is left, each one created is a source account's home and was hydrated exactly once (hook
//!    count);
//! 4. no write ever lowered a record's source version, and no placeholder write ever landed on an existing
//!    record (a recording wrapper around the target checks every write as it happens);
//! 5. every event is accounted for: the statistics of every worker incarnation add up (and equal the ledger's
//!    running totals), every delivered event is in the ledger, the saved checkpoint is the end of the queue, and
//!    the dead letters are exactly the poison events, with their payloads.
//!
//! The checks read the ledger through the [`Ledger`] trait, the same way on every backend.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use uuid::Uuid;

use eventual_upsert::memory::{Fault, MemoryStore};
use eventual_upsert::schema::{ColumnType, Schema, TableSchema};
use eventual_upsert::sync::{
    Applier, ChangeEvent, DeadLetter, DeferredTask, Ledger, LedgerQuery, LedgerView, Mapping,
    MemoryLedger, Pipeline, PostgresLedger, Pruned, QueueSource, Retention, Settlement,
    SourceRecord, SqliteLedger, SyncStats,
};
use eventual_upsert::{
    BreakerConfig, Change, ColumnName, Delete, DeleteOutcome, Ensured, EnsuringWriter, EntityRef,
    Error, HydrationState, Key, KeyKind, Policies, Precondition, Record, RecordStore, Result,
    RetryPolicy, StoredRecord, TableName, TablePolicy, Write, WriteOutcome,
};

const SOURCE: &str = "us";
const IDENTITY: &str = "sync-us-eu";
const ORIGIN_COLUMN: &str = "new_syncorigin";
const MARKER: &str = "new_isplaceholder";
const NOTE: &str = "new_localnote";
/// The alternate key of account, at both instances.
const NUMBER: &str = "accountnumber";
/// Steps of each seed's schedule.
const STEPS: usize = 300;
/// Records at the source, at most (few, so that versions of one record collide often).
const MAX_ACCOUNTS: usize = 8;
const MAX_CONTACTS: usize = 10;
/// The country value map of the mapping; anything else is rejected (the poison events use "XX").
const COUNTRIES: [(&str, &str); 3] = [("US", "USA"), ("DE", "DEU"), ("FR", "FRA")];

/// The selected run: `SIM_LEDGER` (default memory), seeds `0..SIM_SEEDS` or the one `SIM_SEED`.
#[test]
fn simulation() {
    let backend = Backend::selected().unwrap_or(Backend::Memory);
    let seeds = match env_u64("SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("SIM_SEEDS").unwrap_or_else(|| backend.default_seeds())).collect(),
    };
    play(backend, &seeds);
}

/// The crash step against the SQLite ledger: seeds `0..SIM_SQLITE_SEEDS` (default 50), a new file each.
#[test]
fn simulation_sqlite() {
    if let Some(why) = Backend::played_by_selection() {
        eprintln!("skipping simulation_sqlite: {why}");
        return;
    }
    let seeds: Vec<u64> = (0..Backend::Sqlite.default_seeds()).collect();
    play(Backend::Sqlite, &seeds);
}

/// The crash step against the PostgreSQL ledger at `DATABASE_URL`: seeds `0..SIM_POSTGRES_SEEDS` (default 20), a
/// new schema each.
#[test]
fn simulation_postgres() {
    if let Some(why) = Backend::played_by_selection() {
        eprintln!("skipping simulation_postgres: {why}");
        return;
    }
    if database_url().is_none() {
        eprintln!("skipping simulation_postgres: DATABASE_URL is not set");
        return;
    }
    let seeds: Vec<u64> = (0..Backend::Postgres.default_seeds()).collect();
    play(Backend::Postgres, &seeds);
}

/// Plays `seeds` on `backend` and prints the summary line; panics, saying how to replay it, at the first seed
/// that fails.
fn play(backend: Backend, seeds: &[u64]) {
    let durable = match backend {
        Backend::Memory => None,
        _ => match Durable::new(backend) {
            Ok(durable) => Some(durable),
            Err(what) => panic!("simulation ({}): {what}", backend.name()),
        },
    };
    let started = Instant::now();
    let mut total = Summary::default();
    for &seed in seeds {
        match run_seed(seed, durable.as_ref()) {
            Ok(summary) => total.add(&summary),
            Err(what) => {
                let ledger = backend.name();
                eprintln!("simulation failed for seed {seed} on the {ledger} ledger: {what}");
                eprintln!(
                    "replay it with: SIM_LEDGER={ledger} SIM_SEED={seed} cargo test --test simulation"
                );
                panic!("simulation failed for seed {seed} on the {ledger} ledger (see above)");
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let s = &total.stats;
    println!(
        "simulation ({} ledger): {} seeds in {secs:.1} s ({:.0} seeds/s); {} events received, {} duplicate, \
         {} stale, {} echo, {} dead-lettered ({} poison), {} replayed, {} retried, {} worker crashes ({} killed \
         mid-poll), {} placeholders hydrated ({} made by account number, hydrated by GUID), {} LOB writes",
        backend.name(),
        seeds.len(),
        seeds.len() as f64 / secs.max(1e-9),
        s.received,
        s.duplicate,
        s.stale,
        s.echo,
        s.dead_lettered,
        total.poison,
        s.replayed,
        s.retried,
        total.crashes,
        total.kills,
        total.hydrated,
        total.aliased,
        total.lob_writes,
    );
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    match text.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={text:?} is not a number"),
    }
}

fn database_url() -> Option<String> {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
}

/// The ledger the workers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// A [`MemoryLedger`], on the simulation's paused clock.
    Memory,
    /// A [`SqliteLedger`] in a new temporary file per seed.
    Sqlite,
    /// A [`PostgresLedger`] in a new schema per seed of the database at `DATABASE_URL`, dropped after.
    Postgres,
}

impl Backend {
    /// `SIM_LEDGER`, if set.
    fn selected() -> Option<Backend> {
        let text = std::env::var("SIM_LEDGER").ok()?;
        Some(match text.trim() {
            "memory" => Backend::Memory,
            "sqlite" => Backend::Sqlite,
            "postgres" => Backend::Postgres,
            other => panic!("SIM_LEDGER={other:?}: expected memory, sqlite or postgres"),
        })
    }

    /// Why the backend tests leave their run to `simulation`: a ledger or a seed was selected.
    fn played_by_selection() -> Option<&'static str> {
        match (Backend::selected(), env_u64("SIM_SEED")) {
            (Some(_), _) => Some("SIM_LEDGER is set; the `simulation` test plays that ledger"),
            (None, Some(_)) => Some("SIM_SEED is set; the `simulation` test replays that seed"),
            (None, None) => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    /// How many seeds a run plays unless told otherwise.
    fn default_seeds(self) -> u64 {
        match self {
            Backend::Memory => 1000,
            Backend::Sqlite => env_u64("SIM_SQLITE_SEEDS").unwrap_or(50),
            Backend::Postgres => env_u64("SIM_POSTGRES_SEEDS").unwrap_or(20),
        }
    }
}

/// Plays one seed in its own runtime, on a fresh ledger of the backend (`durable`, or a [`MemoryLedger`]); a
/// panic inside is reported as that seed's failure. A durable ledger is removed afterwards, whatever happened.
fn run_seed(seed: u64, durable: Option<&Durable>) -> std::result::Result<Summary, String> {
    let Some(durable) = durable else {
        return play_seed(seed, Arc::new(MemoryLedger::new()));
    };
    let ledger = durable.open(seed)?;
    let played = play_seed(
        seed,
        Arc::new(RealClock {
            inner: ledger.ledger(),
            runtime: durable.runtime.handle().clone(),
        }),
    );
    let removed = durable.remove(ledger);
    let summary = played?;
    removed?;
    // A ledger call takes no simulated time on any backend, so the seed plays the very schedule it plays on the
    // memory ledger, and every ledger that keeps the contract answers every call alike: the runs must agree.
    let on_memory = play_seed(seed, Arc::new(MemoryLedger::new()))
        .map_err(|what| format!("passed, but failed on the memory ledger: {what}"))?;
    if summary != on_memory {
        return Err(format!(
            "the seed played differently on the memory ledger (a ledger answered a call differently, or the \
             schedule is not deterministic):\n  {}: {summary:?}\n  memory: {on_memory:?}",
            durable.backend.name()
        ));
    }
    Ok(summary)
}

fn play_seed(seed: u64, ledger: Arc<dyn Ledger>) -> std::result::Result<Summary, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("cannot build a runtime: {e}"))?;
    let played = std::panic::catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(async {
            // A bug that makes the pipeline wait forever shows up as a simulated day going by, not a hung test.
            match tokio::time::timeout(Duration::from_secs(24 * 3600), simulate(seed, ledger)).await
            {
                Ok(result) => result,
                Err(_) => Err("the run did not finish within a simulated day".into()),
            }
        })
    }));
    match played {
        Ok(result) => result,
        Err(panic) => Err(match panic.downcast_ref::<String>() {
            Some(message) => format!("panicked: {message}"),
            None => match panic.downcast_ref::<&str>() {
                Some(message) => format!("panicked: {message}"),
                None => "panicked".into(),
            },
        }),
    }
}

/// The durable ledgers' own runtime, with a real clock and IO, and where their ledgers live (see the header:
/// the paused clock).
struct Durable {
    backend: Backend,
    runtime: tokio::runtime::Runtime,
    /// For PostgreSQL.
    url: Option<String>,
}

/// One seed's durable ledger.
enum DurableLedger {
    Sqlite {
        ledger: Arc<SqliteLedger>,
        path: PathBuf,
    },
    Postgres {
        ledger: Arc<PostgresLedger>,
        schema: String,
    },
}

impl DurableLedger {
    fn ledger(&self) -> Arc<dyn Ledger> {
        match self {
            DurableLedger::Sqlite { ledger, .. } => ledger.clone(),
            DurableLedger::Postgres { ledger, .. } => ledger.clone(),
        }
    }
}

impl Durable {
    fn new(backend: Backend) -> std::result::Result<Durable, String> {
        let url = match backend {
            Backend::Postgres => {
                Some(database_url().ok_or("the PostgreSQL ledger needs DATABASE_URL")?)
            }
            _ => None,
        };
        // One worker thread: the simulation makes one ledger call at a time.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot build the ledger's runtime: {e}"))?;
        Ok(Durable {
            backend,
            runtime,
            url,
        })
    }

    /// A new, empty ledger for `seed`.
    fn open(&self, seed: u64) -> std::result::Result<DurableLedger, String> {
        let unique = Uuid::new_v4().simple();
        match (self.backend, &self.url) {
            (Backend::Postgres, Some(url)) => {
                let schema = format!("sim_{seed}_{unique}");
                let options = PgConnectOptions::from_str(url)
                    .map_err(|e| format!("DATABASE_URL does not parse: {e}"))?
                    // Commits need not wait for the server's disk: the simulation kills workers, not the
                    // database server, and asynchronous commit changes nothing that a session or another
                    // connection sees (atomicity, isolation and order stay as they are).
                    .options([("synchronous_commit", "off")]);
                let pool = {
                    let _entered = self.runtime.enter();
                    PgPoolOptions::new()
                        .max_connections(2)
                        .connect_lazy_with(options)
                };
                let ledger = self
                    .runtime
                    .block_on(PostgresLedger::from_pool(pool).with_schema(&schema).open())
                    .map_err(|e| {
                        format!("cannot open a PostgreSQL ledger in schema {schema}: {e}")
                    })?;
                Ok(DurableLedger::Postgres {
                    ledger: Arc::new(ledger),
                    schema,
                })
            }
            _ => {
                let path = sqlite_dir().join(format!("eventual-upsert-sim-{seed}-{unique}.db"));
                let ledger = self
                    .runtime
                    .block_on(SqliteLedger::open(&path))
                    .map_err(|e| {
                        format!("cannot open a SQLite ledger at {}: {e}", path.display())
                    })?;
                Ok(DurableLedger::Sqlite {
                    ledger: Arc::new(ledger),
                    path,
                })
            }
        }
    }

    /// Closes the ledger and removes it: its file (and the WAL's), or its schema.
    fn remove(&self, ledger: DurableLedger) -> std::result::Result<(), String> {
        // The pools are dropped in the runtime they live in.
        let _entered = self.runtime.enter();
        match ledger {
            DurableLedger::Sqlite { ledger, path } => {
                self.runtime.block_on(ledger.close());
                drop(ledger);
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    match std::fs::remove_file(&file) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
                    }
                }
                Ok(())
            }
            DurableLedger::Postgres { ledger, schema } => self.runtime.block_on(async {
                ledger.pool().close().await;
                drop(ledger);
                let url = self.url.as_deref().unwrap_or_default();
                let mut conn = PgConnection::connect(url)
                    .await
                    .map_err(|e| format!("cannot connect to drop schema {schema}: {e}"))?;
                let dropped = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                )))
                .execute(&mut conn)
                .await;
                let _ = conn.close().await;
                dropped
                    .map(drop)
                    .map_err(|e| format!("cannot drop schema {schema}: {e}"))
            }),
        }
    }
}

/// Where the SQLite ledgers' files go: `SIM_SQLITE_DIR`, else a RAM-backed directory if the machine has one
/// (`/dev/shm`), else the temporary directory. The simulation kills workers, not machines, so the ledger's
/// fsyncs (WAL, `synchronous=FULL`) protect against nothing here, and on a disk they cost the run most of its
/// time.
fn sqlite_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SIM_SQLITE_DIR") {
        return dir.into();
    }
    let shm = Path::new("/dev/shm");
    match shm.is_dir() {
        true => shm.to_owned(),
        false => std::env::temp_dir(),
    }
}

/// A durable ledger as the simulation reaches it: each call runs on the ledger's own runtime (real clock, real
/// IO), and the simulation's thread blocks until it returns (see the header: the paused clock). A call is then
/// one step that takes no simulated time and lets nothing else run meanwhile, exactly like a [`MemoryLedger`]
/// call, so a seed plays the same schedule on every backend. A call that takes more than a minute of real time
/// fails the seed instead of hanging it.
#[derive(Debug)]
struct RealClock {
    inner: Arc<dyn Ledger>,
    runtime: tokio::runtime::Handle,
}

impl RealClock {
    fn call<T, F, Fut>(&self, what: &'static str, call: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<dyn Ledger>) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let call = call(self.inner.clone());
        self.runtime.spawn(async move {
            // The receiver is gone only if the simulation gave up waiting.
            let _ = done.send(call.await);
        });
        match result.recv_timeout(Duration::from_secs(60)) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                panic!("the ledger's {what} took more than a minute of real time")
            }
            Err(RecvTimeoutError::Disconnected) => panic!("the ledger's {what} panicked"),
        }
    }
}

#[async_trait]
impl Ledger for RealClock {
    async fn lookup(&self, query: &LedgerQuery) -> Result<LedgerView> {
        let query = query.clone();
        self.call("lookup", move |l| async move { l.lookup(&query).await })
    }
    async fn settle(&self, settlement: &Settlement) -> Result<()> {
        let settlement = settlement.clone();
        self.call(
            "settle",
            move |l| async move { l.settle(&settlement).await },
        )
    }
    async fn checkpoint(&self, source: &str) -> Result<Option<String>> {
        let source = source.to_owned();
        self.call(
            "checkpoint",
            move |l| async move { l.checkpoint(&source).await },
        )
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.call("dead_letters", move |l| async move {
            l.dead_letters(limit).await
        })
    }
    async fn dead_letter_count(&self) -> Result<usize> {
        self.call("dead_letter_count", |l| async move {
            l.dead_letter_count().await
        })
    }
    async fn claim_tasks(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<DeferredTask>> {
        self.call("claim_tasks", move |l| async move {
            l.claim_tasks(now_ms, lease, limit).await
        })
    }
    async fn tasks(&self, limit: usize) -> Result<Vec<DeferredTask>> {
        self.call("tasks", move |l| async move { l.tasks(limit).await })
    }
    async fn totals(&self) -> Result<SyncStats> {
        self.call("totals", |l| async move { l.totals().await })
    }
    async fn prune(&self, retention: &Retention, now_ms: u64) -> Result<Pruned> {
        let retention = *retention;
        self.call("prune", move |l| async move {
            l.prune(&retention, now_ms).await
        })
    }
}

/// What one seed did, for the summary line.
#[derive(Debug, Default, PartialEq)]
struct Summary {
    stats: SyncStats,
    crashes: u64,
    kills: u64,
    poison: u64,
    hydrated: u64,
    /// Source accounts living at the target under another GUID (a placeholder the LOB made by number).
    aliased: u64,
    lob_writes: u64,
}

impl Summary {
    fn add(&mut self, other: &Summary) {
        self.stats += other.stats;
        self.crashes += other.crashes;
        self.kills += other.kills;
        self.poison += other.poison;
        self.hydrated += other.hydrated;
        self.aliased += other.aliased;
        self.lob_writes += other.lob_writes;
    }
}

/// splitmix64. Hand-written: the crate has no `rand` dependency (and a test is no reason to add one), and a
/// fixed, documented generator keeps every seed's schedule the same on every platform and toolchain, so a
/// failing seed replays exactly.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.index(items.len())])
    }

    fn uuid(&mut self) -> Uuid {
        Uuid::from_u64_pair(self.next(), self.next() | 1)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.index(i + 1);
            items.swap(i, j);
        }
    }
}

fn schema() -> Schema {
    let account = TableSchema::builder("account")
        .primary_name("name")
        .alternate_key([(NUMBER, KeyKind::String)])
        .column("telephone1", ColumnType::String)
        .column("creditlimit", ColumnType::Integer)
        .column("address1_country", ColumnType::String)
        .column(NOTE, ColumnType::String)
        .column(ORIGIN_COLUMN, ColumnType::String)
        .column(MARKER, ColumnType::Boolean)
        .build()
        .unwrap();
    let contact = TableSchema::builder("contact")
        .primary_name("fullname")
        .lookup("parentcustomerid", "account")
        .column("emailaddress1", ColumnType::String)
        .column(ORIGIN_COLUMN, ColumnType::String)
        .build()
        .unwrap();
    Schema::new([account, contact]).unwrap()
}

fn mapping() -> Mapping {
    let countries: serde_json::Map<String, Value> = COUNTRIES
        .iter()
        .map(|(from, to)| ((*from).to_owned(), json!(to)))
        .collect();
    let document = json!({"tables": {"account": {
        "values": {"address1_country": {"map": countries, "on_unknown": "reject"}},
        "target_owned": [NOTE],
    }}});
    Mapping::from_json(&document.to_string()).unwrap()
}

fn account(id: Uuid) -> EntityRef {
    EntityRef::by_id("account", id).unwrap()
}

fn account_by_number(number: &str) -> EntityRef {
    EntityRef::by_key("account", [(NUMBER, number)]).unwrap()
}

fn contact(id: Uuid) -> EntityRef {
    EntityRef::by_id("contact", id).unwrap()
}

fn table(name: &str) -> TableName {
    TableName::new(name).unwrap()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The target, seen through a wrapper that checks every write as it happens (check 4). It forwards every
/// method, so the store's own `ensure_placeholders` and `ensure_then_write` are the ones that run.
///
/// Calls may overlap (the LOB writes while a poll waits on the slow target), so each call is placed on a logical
/// clock: it starts at one tick and finishes at a later one. A record counts as existing (or hydrated) for a call
/// only if a call that finished before this one started made it so; that is what the store's atomic writes
/// guarantee, whatever order overlapping calls are logged in.
#[derive(Debug)]
struct RecordingStore {
    inner: Arc<MemoryStore>,
    log: Mutex<WriteLog>,
}

#[derive(Debug, Default)]
struct WriteLog {
    clock: u64,
    /// Every record known to exist at the target (all writes to it pass through here), with the tick of the
    /// call that created it.
    existing: BTreeMap<Uuid, u64>,
    /// Hydrated records, with the tick of the call that first reported them hydrated.
    hydrated: BTreeMap<Uuid, u64>,
    /// The highest source version written per record.
    source_versions: BTreeMap<Uuid, u64>,
    /// Placeholders created.
    placeholders: BTreeSet<Uuid>,
    violations: Vec<String>,
}

impl WriteLog {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 10 {
            self.violations.push(what);
        }
    }

    /// Whether `id` was known in `map` before the call that started at `started`.
    fn before(map: &BTreeMap<Uuid, u64>, id: Uuid, started: u64) -> bool {
        map.get(&id).is_some_and(|&at| at < started)
    }

    fn written(&mut self, write: &Write, result: &Result<WriteOutcome>, started: u64, now: u64) {
        let Ok(outcome) = result else {
            return;
        };
        let id = outcome.id;
        let what = &write.record.reference;
        if outcome.change == Change::Created && Self::before(&self.existing, id, started) {
            self.violation(format!("{what}: created, but record {id} already existed"));
        }
        if write.record.state == HydrationState::Placeholder {
            if write.precondition != Precondition::CreateOnly || outcome.change != Change::Created {
                self.violation(format!(
                    "{what}: a placeholder write ({:?}) succeeded as {:?}: placeholders must only ever be \
                     created, never written over a record",
                    write.precondition, outcome.change
                ));
            }
            self.placeholders.insert(id);
        }
        if Self::before(&self.hydrated, id, started)
            && (outcome.state != HydrationState::Hydrated
                || outcome.previous_state != Some(HydrationState::Hydrated))
        {
            self.violation(format!(
                "{what}: record {id} was hydrated, and a write reports it {:?} -> {:?}",
                outcome.previous_state, outcome.state
            ));
        }
        self.existing.entry(id).or_insert(now);
        if outcome.state == HydrationState::Hydrated {
            self.hydrated.entry(id).or_insert(now);
        }
        // Sync writes (the only ones carrying a source version) never overlap: one worker at a time.
        if let Some(version) = write.record.source_version {
            if let Some(&previous) = self.source_versions.get(&id)
                && version <= previous
            {
                self.violation(format!(
                    "{what}: a write of source version {version} succeeded ({:?}) after version {previous} \
                     had been written: an older or equal version overwrote newer data",
                    outcome.change
                ));
            }
            let highest = self.source_versions.entry(id).or_insert(version);
            *highest = (*highest).max(version);
        }
    }

    fn ensured(
        &mut self,
        placeholders: &[Record],
        results: &[Result<Ensured>],
        started: u64,
        now: u64,
    ) {
        for (placeholder, result) in placeholders.iter().zip(results) {
            let what = &placeholder.reference;
            if placeholder.state != HydrationState::Placeholder
                || placeholder.source_version.is_some()
            {
                self.violation(format!(
                    "{what}: ensured with a record that is not a bare placeholder: {placeholder:?}"
                ));
            }
            if let Ok(Ensured::Created { id }) = result {
                if Self::before(&self.existing, *id, started) {
                    self.violation(format!(
                        "{what}: a placeholder was created over existing record {id}"
                    ));
                }
                self.existing.entry(*id).or_insert(now);
                self.placeholders.insert(*id);
            }
        }
    }
}

impl RecordingStore {
    fn log(&self) -> MutexGuard<'_, WriteLog> {
        lock(&self.log)
    }

    fn start(&self) -> u64 {
        self.log().tick()
    }
}

#[async_trait]
impl RecordStore for RecordingStore {
    fn backend(&self) -> &str {
        self.inner.backend()
    }

    async fn read(&self, reference: &EntityRef) -> Result<Option<StoredRecord>> {
        self.inner.read(reference).await
    }

    // The simulation never deletes (the applier does not apply delete events); forwarded unlogged.
    async fn delete(&self, delete: &Delete) -> Result<DeleteOutcome> {
        self.inner.delete(delete).await
    }

    async fn write(&self, write: &Write) -> Result<WriteOutcome> {
        let started = self.start();
        let result = self.inner.write(write).await;
        let mut log = self.log();
        let now = log.tick();
        log.written(write, &result, started, now);
        result
    }

    async fn write_batch(&self, writes: &[Write]) -> Vec<Result<WriteOutcome>> {
        let started = self.start();
        let results = self.inner.write_batch(writes).await;
        let mut log = self.log();
        let now = log.tick();
        for (write, result) in writes.iter().zip(&results) {
            log.written(write, result, started, now);
        }
        results
    }

    async fn ensure_placeholders(&self, placeholders: Vec<Record>) -> Vec<Result<Ensured>> {
        let started = self.start();
        let sent = placeholders.clone();
        let results = self.inner.ensure_placeholders(placeholders).await;
        let mut log = self.log();
        let now = log.tick();
        log.ensured(&sent, &results, started, now);
        results
    }

    async fn ensure_then_write(
        &self,
        placeholders: Vec<Record>,
        writes: &[Write],
    ) -> (Vec<Result<Ensured>>, Vec<Result<WriteOutcome>>) {
        let started = self.start();
        let mut pending = Cancelled {
            store: self,
            placeholders: placeholders.clone(),
            started,
        };
        let (ensured, written) = self.inner.ensure_then_write(placeholders, writes).await;
        let sent = std::mem::take(&mut pending.placeholders);
        let mut log = self.log();
        let now = log.tick();
        log.ensured(&sent, &ensured, started, now);
        for (write, result) in writes.iter().zip(&written) {
            log.written(write, result, started, now);
        }
        (ensured, written)
    }
}

/// Watches a forwarded `ensure_then_write`, which is two store steps (placeholders, then writes): a worker killed
/// between them drops the call after its placeholders were created, and before they could be logged. On drop
/// with placeholders still pending, this looks in the store for the ones that now exist and were not known when
/// the call started: nothing but ensures creates accounts at the target, so they were created as placeholders.
/// (A store write is atomic and applies after its injected latency, so a dropped call's writes never happened.)
struct Cancelled<'a> {
    store: &'a RecordingStore,
    placeholders: Vec<Record>,
    started: u64,
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        if self.placeholders.is_empty() {
            return;
        }
        let mut log = self.store.log();
        let now = log.tick();
        for placeholder in &self.placeholders {
            let reference = &placeholder.reference;
            // By GUID (the sync's placeholders) or by alternate key (the LOB's, though the LOB is never killed).
            let held = self
                .store
                .inner
                .records(&reference.table)
                .unwrap_or_default()
                .into_iter()
                .find(|r| addresses(reference, r));
            if let Some(id) = held.map(|r| r.id)
                && !WriteLog::before(&log.existing, id, self.started)
            {
                log.existing.entry(id).or_insert(now);
                log.placeholders.insert(id);
            }
        }
    }
}

/// Whether `reference` (by GUID or by alternate key) addresses `stored`.
fn addresses(reference: &EntityRef, stored: &StoredRecord) -> bool {
    match &reference.key {
        Key::Id(id) => stored.id == *id,
        Key::Alternate(key) => key
            .parts()
            .all(|(column, value)| stored.record.field(column.as_str()) == Some(&value.to_json())),
    }
}

/// The ledger as the workers see it: the simulation's ledger (memory, SQLite or PostgreSQL) behind a configurable
/// latency, as a durable ledger would have, and injected failures. Every call then is an await point, where a
/// worker can be killed (say between its write to the target and the ledger's record of it) and where concurrent
/// faults land.
///
/// The failures are injected here rather than in the ledger, so that every backend sees the same schedule: after
/// its latency, a call fails with a retryable [`Error::Unavailable`] while [`fail_next`](Self::fail_next) has
/// calls left, and reaches the ledger otherwise (a failed call changes nothing).
///
/// It also dates dead letters by the simulation's clock: the applier stamps them with the wall clock, and the
/// ledger replays them oldest first, so wall-clock stamps would make the replay order (and a failing seed)
/// depend on how fast the machine ran.
#[derive(Debug)]
struct SlowLedger {
    inner: Arc<dyn Ledger>,
    latency: Mutex<Duration>,
    /// Calls left to fail.
    failing: Mutex<u32>,
    epoch: tokio::time::Instant,
}

impl SlowLedger {
    fn new(inner: Arc<dyn Ledger>) -> Self {
        SlowLedger {
            inner,
            latency: Mutex::new(Duration::ZERO),
            failing: Mutex::new(0),
            epoch: tokio::time::Instant::now(),
        }
    }

    /// Makes the next `calls` calls fail (replacing any earlier count; 0 ends the failures).
    fn fail_next(&self, calls: u32) {
        *lock(&self.failing) = calls;
    }

    /// The latency, then the injected failure if one is due.
    async fn pause(&self) -> Result<()> {
        let latency = *lock(&self.latency);
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut failing = lock(&self.failing);
        if *failing == 0 {
            return Ok(());
        }
        *failing -= 1;
        Err(Error::Unavailable {
            backend: "ledger (simulated)".into(),
            reason: "injected failure".into(),
            retry_after: None,
        })
    }
}

#[async_trait]
impl Ledger for SlowLedger {
    async fn lookup(&self, query: &LedgerQuery) -> Result<LedgerView> {
        self.pause().await?;
        self.inner.lookup(query).await
    }
    async fn settle(&self, settlement: &Settlement) -> Result<()> {
        self.pause().await?;
        let now_ms = 1_700_000_000_000 + self.epoch.elapsed().as_millis() as u64;
        let mut settlement = settlement.clone();
        for letter in &mut settlement.dead_letters {
            (letter.first_failed_ms, letter.last_failed_ms) = (now_ms, now_ms);
        }
        self.inner.settle(&settlement).await
    }
    async fn checkpoint(&self, source: &str) -> Result<Option<String>> {
        self.pause().await?;
        self.inner.checkpoint(source).await
    }
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.pause().await?;
        self.inner.dead_letters(limit).await
    }
    async fn dead_letter_count(&self) -> Result<usize> {
        self.pause().await?;
        self.inner.dead_letter_count().await
    }
    async fn claim_tasks(
        &self,
        now_ms: u64,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<DeferredTask>> {
        self.pause().await?;
        self.inner.claim_tasks(now_ms, lease, limit).await
    }
    async fn tasks(&self, limit: usize) -> Result<Vec<DeferredTask>> {
        self.pause().await?;
        self.inner.tasks(limit).await
    }
    async fn totals(&self) -> Result<SyncStats> {
        self.pause().await?;
        self.inner.totals().await
    }
    async fn prune(&self, retention: &Retention, now_ms: u64) -> Result<Pruned> {
        self.pause().await?;
        self.inner.prune(retention, now_ms).await
    }
}

/// What the hydration hooks reported, per account: how often, and how often for a hydrated placeholder.
type HydrationCounts = Arc<Mutex<BTreeMap<Uuid, Hydrations>>>;

#[derive(Clone, Copy, Debug, Default)]
struct Hydrations {
    /// Every report (a record created with real data, or a placeholder hydrated).
    all: u32,
    /// Reports of a placeholder being hydrated.
    placeholder: u32,
}

/// Everything that survives a worker crash: the stores, the ledger, the queue, the configuration.
struct World {
    /// Whether polls are applied as batches.
    batched: bool,
    schema: Schema,
    source: Arc<MemoryStore>,
    target: Arc<MemoryStore>,
    recorder: Arc<RecordingStore>,
    /// The ledger itself (memory, SQLite or PostgreSQL), for the simulation's own reads: no latency, no faults.
    ledger: Arc<dyn Ledger>,
    /// The same ledger, as the workers reach it.
    slow_ledger: Arc<SlowLedger>,
    queue: Arc<QueueSource>,
    mapping: Mapping,
    policy: Policies,
    retry: RetryPolicy,
    breaker: BreakerConfig,
    hydrations: HydrationCounts,
    /// The LOB app's writer on the target.
    lob_writer: EnsuringWriter,
}

impl World {
    fn new(rng: &mut Rng, ledger: Arc<dyn Ledger>) -> World {
        let schema = schema();
        let source = Arc::new(MemoryStore::new(schema.clone()).named(SOURCE));
        let target = Arc::new(MemoryStore::new(schema.clone()).named("eu"));
        let recorder = Arc::new(RecordingStore {
            inner: target.clone(),
            log: Mutex::new(WriteLog::default()),
        });
        let policy = Policies::builder()
            .table(
                "account",
                TablePolicy::builder()
                    .primary_name("name")
                    .label("Pending sync")
                    .marker(MARKER),
            )
            .build()
            .unwrap();
        // Per seed, so that some seeds exhaust their retries before the breaker opens (transient dead letters,
        // replayed at the end) and others wait every outage out behind the breaker.
        let retry = RetryPolicy {
            max_attempts: rng.range(2, 5) as u32,
            initial_backoff: rng.millis(20, 400),
            max_backoff: Duration::from_secs(10),
            jitter_seed: Some(rng.next()),
            max_elapsed: Duration::from_secs(rng.range(5, 90)),
            ..RetryPolicy::default()
        };
        let breaker = BreakerConfig {
            failure_threshold: rng.range(2, 8) as u32,
            open_for: rng.millis(500, 20_000),
        };
        let hydrations = HydrationCounts::default();
        let lob_writer = EnsuringWriter::new(recorder.clone()).with_policy(policy.clone());
        count_hydrations(&lob_writer, &hydrations);
        // Half the seeds apply each poll as one batch (`Applier::apply_batch`), half one event at a time.
        let batched = rng.percent(50);
        World {
            batched,
            schema,
            source,
            target,
            recorder,
            slow_ledger: Arc::new(SlowLedger::new(ledger.clone())),
            ledger,
            queue: Arc::new(QueueSource::new(SOURCE)),
            mapping: mapping(),
            policy,
            retry,
            breaker,
            hydrations,
            lob_writer,
        }
    }

    /// A fresh worker: new writer (its hooks registered again, as a restarted process would), new applier with
    /// a closed breaker and zeroed counters, on the same ledger, queue and target.
    fn worker(&self) -> (Applier, Pipeline) {
        let writer = EnsuringWriter::new(self.recorder.clone()).with_policy(self.policy.clone());
        count_hydrations(&writer, &self.hydrations);
        let applier = Applier::builder(writer, self.slow_ledger.clone())
            .identity(IDENTITY)
            .origin_column(ORIGIN_COLUMN)
            .mapping(self.mapping.clone())
            .retry(self.retry.clone())
            .breaker(self.breaker.clone())
            .build(Some(&self.schema))
            .unwrap();
        let pipeline = Pipeline::new(self.queue.clone(), applier.clone()).batched(self.batched);
        (applier, pipeline)
    }
}

fn count_hydrations(writer: &EnsuringWriter, counts: &HydrationCounts) {
    let counts = counts.clone();
    writer
        .hooks()
        .on_hydrated(&table("account"), move |hydrated| {
            let mut counts = lock(&counts);
            let entry = counts.entry(hydrated.id).or_default();
            entry.all += 1;
            entry.placeholder += u32::from(hydrated.was_placeholder());
        });
}

/// A LOB contact as accepted by the target.
#[derive(Clone, Debug)]
struct LobContact {
    fullname: String,
    email: String,
    /// The source account it references (the LOB may have named it by account number or by a GUID of the
    /// target's: see [`LobAccount::address`]).
    parent: Uuid,
}

/// A source account as the LOB knows it.
#[derive(Clone, Debug)]
struct LobAccount {
    /// Its source GUID.
    id: Uuid,
    /// Its account number (the alternate key).
    number: String,
    /// Whether the LOB knows it by number (see [`Sim::keyed`]).
    keyed: bool,
}

impl LobAccount {
    /// How the LOB names the account in a write: by account number (`by_key`) or by GUID, as the seeded RNG chose.
    /// Where the target has the account (a lookup by number finds it), either works: the number, or the GUID the
    /// lookup found (the source GUID, or the GUID of a placeholder created by number). Where it does not, the LOB
    /// names it the one way it knows it, so that it is never addressed both ways before the sync brings it: by
    /// number if it is keyed (a placeholder by number, under a GUID of the target's), else by its source GUID.
    /// `None` when the lookup failed (the target misbehaving): the operation is dropped.
    async fn address(
        &self,
        world: &World,
        by_key: bool,
    ) -> std::result::Result<Option<EntityRef>, String> {
        let by_number = account_by_number(&self.number);
        if by_key == self.keyed {
            return Ok(Some(match by_key {
                true => by_number,
                false => account(self.id),
            }));
        }
        match world.recorder.read(&by_number).await {
            Ok(Some(_)) if by_key => Ok(Some(by_number)),
            Ok(Some(found)) => Ok(Some(account(found.id))),
            Ok(None) if self.keyed => Ok(Some(by_number)),
            Ok(None) => Ok(Some(account(self.id))),
            Err(e) => transient("the LOB's lookup of an account by number", e).map(|()| None),
        }
    }
}

/// One LOB operation, drawn in advance so that it can run concurrently with a poll.
#[derive(Debug)]
enum LobOp {
    /// A new contact (its own GUID, not in the source) referencing an account by number or by GUID.
    Contact {
        id: Uuid,
        contact: LobContact,
        parent: LobAccount,
        by_key: bool,
    },
    /// The target-owned note on an account, if the account is hydrated (a guarded operation): the LOB looks the
    /// account up by number and updates it by number or by the GUID found.
    Note {
        account: LobAccount,
        by_key: bool,
        note: String,
    },
    /// Not the LOB's doing, but it happens meanwhile: a fault starts (possibly halfway through a poll's
    /// ensure-then-write, between the placeholders and the write).
    Fault(FaultPlan),
}

/// A fault to inject.
#[derive(Debug)]
enum FaultPlan {
    /// The target is down for this long.
    Outage(Duration),
    /// The target's next calls fail.
    Fail(u32, Fault),
    /// The ledger's next calls fail.
    Ledger(u32),
    /// Every ledger call takes this long.
    LedgerLatency(Duration),
    /// Every target call takes this long: each becomes an await point where a poll and the LOB interleave, and
    /// where a killed worker can stop.
    Latency(Duration),
}

impl FaultPlan {
    fn apply(&self, world: &World) {
        let faults = world.target.faults();
        match *self {
            FaultPlan::Outage(duration) => faults.go_down_for(duration),
            FaultPlan::Fail(calls, fault) => faults.fail_next(calls, fault),
            FaultPlan::Ledger(calls) => world.slow_ledger.fail_next(calls),
            FaultPlan::LedgerLatency(latency) => *lock(&world.slow_ledger.latency) = latency,
            FaultPlan::Latency(latency) => faults.set_latency(latency),
        }
    }
}

#[derive(Default)]
struct Lob {
    contacts: BTreeMap<Uuid, LobContact>,
    notes: BTreeMap<Uuid, String>,
    placeholders_created: u64,
    accepted: u64,
}

impl Lob {
    async fn run(&mut self, world: &World, ops: Vec<LobOp>) -> std::result::Result<(), String> {
        for op in ops {
            match op {
                LobOp::Contact {
                    id,
                    contact: lob,
                    parent,
                    by_key,
                } => {
                    let Some(parent) = parent.address(world, by_key).await? else {
                        continue;
                    };
                    let record = Record::builder(contact(id))
                        .field("fullname", lob.fullname.clone())
                        .field("emailaddress1", lob.email.clone())
                        .lookup("parentcustomerid", parent)
                        .build()
                        .unwrap();
                    let report = world
                        .lob_writer
                        .write_batch([Write::create_only(record)])
                        .await;
                    self.placeholders_created += report.ensured.created().count() as u64;
                    match report.results.into_iter().next() {
                        Some(Ok(_)) => {
                            self.accepted += 1;
                            self.contacts.insert(id, lob);
                        }
                        Some(Err(e)) => transient("the LOB's contact write", e)?,
                        None => return Err("the LOB's contact write got no result".into()),
                    }
                }
                LobOp::Note {
                    account: lob_account,
                    by_key,
                    note,
                } => {
                    let by_number = account_by_number(&lob_account.number);
                    let stored = match world.recorder.read(&by_number).await {
                        Ok(Some(stored)) => stored,
                        Ok(None) => continue,
                        Err(e) => {
                            transient("the LOB's read", e)?;
                            continue;
                        }
                    };
                    // Business logic on a placeholder is refused by the policy (default: reject).
                    if world
                        .lob_writer
                        .guard(&stored.record)
                        .check("note")
                        .is_err()
                    {
                        continue;
                    }
                    let address = match by_key {
                        true => by_number,
                        false => account(stored.id),
                    };
                    let record = Record::builder(address)
                        .field(NOTE, note.clone())
                        .build()
                        .unwrap();
                    match world.lob_writer.write(Write::update_only(record)).await {
                        Ok(_) => {
                            self.accepted += 1;
                            self.notes.insert(lob_account.id, note);
                        }
                        Err(e) => transient("the LOB's note update", e)?,
                    }
                }
                LobOp::Fault(fault) => fault.apply(world),
            }
        }
        Ok(())
    }
}

/// A failure the LOB may see while the target misbehaves; anything else fails the seed.
fn transient(what: &str, error: Error) -> std::result::Result<(), String> {
    match error.is_retryable() {
        true => Ok(()),
        false => Err(format!("{what} failed with a non-transient error: {error}")),
    }
}

/// How a poll ended.
enum PollEnd {
    Done(usize),
    Failed(Error),
    /// The worker was killed mid-poll (the poll's future dropped at an await point).
    Killed,
}

struct Sim {
    rng: Rng,
    world: World,
    /// Source records, by table.
    accounts: Vec<Uuid>,
    contacts: Vec<Uuid>,
    /// Each source account's number (its alternate key; never changed).
    numbers: BTreeMap<Uuid, String>,
    /// The accounts the LOB knows by number (half of them, drawn when the source creates one): while the target
    /// does not have one, the LOB references it by number, which creates the placeholder by key, under a GUID of
    /// the target's, and the sync later hydrates it with an event addressed by the source GUID (issue 9). A record
    /// must not be addressed both ways before the sync brings it (two placeholders, which nothing can merge: see
    /// the README's "Address a record one way"), and the sync addresses contacts' lookups by source GUID, so the
    /// source gives a keyed account contacts only once its own event has settled (see `referable_accounts`).
    keyed: BTreeSet<Uuid>,
    /// Keyed accounts whose event the ledger has settled (it never unsettles one).
    settled: BTreeSet<Uuid>,
    /// Every event a source change produced.
    events: Vec<ChangeEvent>,
    /// Events sent but not yet delivered to the queue.
    network: Vec<ChangeEvent>,
    /// Ids of every event pushed to the queue.
    delivered: BTreeSet<String>,
    poison: BTreeMap<String, ChangeEvent>,
    /// Ids of the echo events made.
    echoes: BTreeSet<String>,
    lob: Lob,
    /// Every worker incarnation's applier (for its statistics) and the current pipeline.
    appliers: Vec<Applier>,
    pipeline: Pipeline,
    /// Where the queue has been read up to, as the pipeline should have saved it.
    checkpoint: usize,
    /// Events received but never settled: in flight when their worker failed or was killed.
    interrupted: u64,
    /// Polls that failed or were killed: work they did (a hydration, a placeholder) may never be counted,
    /// because the counters are settled with the batch.
    broken_polls: u64,
    crashes: u64,
    kills: u64,
    counter: u64,
}

async fn simulate(seed: u64, ledger: Arc<dyn Ledger>) -> std::result::Result<Summary, String> {
    let mut rng = Rng::new(seed);
    let world = World::new(&mut rng, ledger);
    let (applier, pipeline) = world.worker();
    let mut sim = Sim {
        rng,
        world,
        accounts: Vec::new(),
        contacts: Vec::new(),
        numbers: BTreeMap::new(),
        keyed: BTreeSet::new(),
        settled: BTreeSet::new(),
        events: Vec::new(),
        network: Vec::new(),
        delivered: BTreeSet::new(),
        poison: BTreeMap::new(),
        echoes: BTreeSet::new(),
        lob: Lob::default(),
        appliers: vec![applier],
        pipeline,
        checkpoint: 0,
        interrupted: 0,
        broken_polls: 0,
        crashes: 0,
        kills: 0,
        counter: 0,
    };
    for step in 0..STEPS {
        sim.step()
            .await
            .map_err(|what| format!("at step {step}: {what}"))?;
    }
    sim.drain()
        .await
        .map_err(|what| format!("draining: {what}"))?;
    sim.check().await
}

impl Sim {
    fn applier(&self) -> &Applier {
        self.pipeline.applier()
    }

    fn next_number(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    async fn step(&mut self) -> std::result::Result<(), String> {
        match self.rng.below(100) {
            0..=21 => self.source_change().await,
            22..=41 => {
                self.deliver();
                Ok(())
            }
            42..=53 => {
                let ops = self.lob_ops(1);
                self.lob.run(&self.world, ops).await
            }
            54..=61 => {
                let fault = self.fault();
                fault.apply(&self.world);
                Ok(())
            }
            62..=84 => self.poll().await,
            85..=87 => {
                self.restart();
                Ok(())
            }
            88 => {
                self.poison_event();
                Ok(())
            }
            89..=90 => {
                self.echo_event();
                Ok(())
            }
            91..=94 => self.replay().await,
            _ => {
                // Simulated time passes (outages end, breakers half-open): the paused clock jumps.
                tokio::time::advance(self.rng.millis(100, 20_000)).await;
                Ok(())
            }
        }
    }

    // --- the source ---------------------------------------------------------------------------------------------

    async fn source_change(&mut self) -> std::result::Result<(), String> {
        let create_account = self.accounts.is_empty()
            || (self.accounts.len() < MAX_ACCOUNTS && self.rng.percent(35));
        let record = if create_account {
            self.new_account()
        } else if self.rng.percent(50) {
            self.account_update()
        } else if self.contacts.len() < MAX_CONTACTS && self.rng.percent(40) {
            match self.new_contact().await? {
                Some(record) => record,
                None => self.account_update(),
            }
        } else if let Some(id) = self.rng.pick(&self.contacts) {
            self.contact_update(id).await?
        } else {
            match self.new_contact().await? {
                Some(record) => record,
                None => self.account_update(),
            }
        };
        let reference = record.reference.clone();
        let number = record
            .field(NUMBER)
            .and_then(Value::as_str)
            .map(str::to_owned);
        let outcome = self
            .world
            .source
            .write(&Write::upsert(record))
            .await
            .map_err(|e| format!("the source rejected a change: {e}"))?;
        if outcome.change == Change::Created {
            match reference.table.as_str() {
                "account" => {
                    self.accounts.push(outcome.id);
                    self.numbers
                        .insert(outcome.id, number.ok_or("an account without a number")?);
                    if self.rng.percent(50) {
                        self.keyed.insert(outcome.id);
                    }
                }
                _ => self.contacts.push(outcome.id),
            }
        }
        if outcome.change == Change::Unchanged {
            return Ok(()); // no change, no event
        }
        // The event carries the record as the source stores it, at the version the source gave it.
        let stored = self
            .world
            .source
            .read(&reference)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the source lost a record")?;
        let event = ChangeEvent::upsert(SOURCE, &stored.record, stored.version.0)
            .with_correlation_id(self.rng.uuid());
        self.events.push(event.clone());
        self.network.push(event);
        Ok(())
    }

    fn country(&mut self) -> &'static str {
        COUNTRIES[self.rng.index(COUNTRIES.len())].0
    }

    fn new_account(&mut self) -> Record {
        let n = self.accounts.len();
        let id = self.rng.uuid();
        let country = self.country();
        let mut builder = Record::builder(account(id))
            .field("name", format!("Account {n}"))
            .field(NUMBER, format!("A-{n}"))
            .field("address1_country", country)
            .field("creditlimit", self.rng.range(0, 100) * 1000);
        if self.rng.percent(50) {
            builder = builder.field(
                "telephone1",
                format!("+1 555 {:04}", self.rng.below(10_000)),
            );
        }
        if self.rng.percent(30) {
            // The source has a value in the column the target owns: the sync must never carry it over.
            builder = builder.field(NOTE, format!("us-note-{}", self.next_number()));
        }
        builder.build().unwrap()
    }

    fn account_update(&mut self) -> Record {
        let id = self.accounts[self.rng.index(self.accounts.len())];
        let n = self.next_number();
        let mut builder = Record::builder(account(id));
        let mut changed = false;
        while !changed {
            if self.rng.percent(40) {
                builder = builder.field("name", format!("Account renamed {n}"));
                changed = true;
            }
            if self.rng.percent(30) {
                builder = builder.field("telephone1", format!("+49 30 {n:06}"));
                changed = true;
            }
            if self.rng.percent(30) {
                builder = builder.field("creditlimit", self.rng.range(0, 100) * 1000);
                changed = true;
            }
            if self.rng.percent(25) {
                let country = self.country();
                builder = builder.field("address1_country", country);
                changed = true;
            }
            if self.rng.percent(15) {
                builder = builder.field(NOTE, format!("us-note-{n}"));
                changed = true;
            }
        }
        builder.build().unwrap()
    }

    /// The accounts a source contact may reference: every one the LOB knows by GUID (often one the sync has not
    /// delivered yet), and the keyed ones whose own event the ledger has settled (see [`Sim::keyed`]): the sync
    /// then finds such an account through the id map (an alias, when the account hydrated the LOB's placeholder
    /// made by number) or under its source GUID.
    ///
    /// The simulation asks the ledger itself (no latency, no injected failures: not the workers' view of it), so
    /// the question takes no simulated time and the schedule stays the same on every backend.
    async fn referable_accounts(&mut self) -> std::result::Result<Vec<Uuid>, String> {
        let unsettled: Vec<SourceRecord> = self
            .keyed
            .iter()
            .filter(|id| !self.settled.contains(id))
            .map(|id| SourceRecord::new(SOURCE, account(*id)))
            .collect();
        if !unsettled.is_empty() {
            let query = LedgerQuery {
                records: unsettled,
                ..LedgerQuery::default()
            };
            let view =
                self.world.ledger.lookup(&query).await.map_err(|e| {
                    format!("the simulation's lookup of applied versions failed: {e}")
                })?;
            self.settled
                .extend(view.applied.keys().filter_map(|r| r.reference.id()));
        }
        Ok(self
            .accounts
            .iter()
            .copied()
            .filter(|id| !self.keyed.contains(id) || self.settled.contains(id))
            .collect())
    }

    /// A new contact, or `None` when no account may be referenced yet.
    async fn new_contact(&mut self) -> std::result::Result<Option<Record>, String> {
        let parents = self.referable_accounts().await?;
        let Some(parent) = self.rng.pick(&parents) else {
            return Ok(None);
        };
        let n = self.next_number();
        let id = self.rng.uuid();
        Ok(Some(
            Record::builder(contact(id))
                .field("fullname", format!("Contact {n}"))
                .field("emailaddress1", format!("c{n}@us.example"))
                .lookup("parentcustomerid", account(parent))
                .build()
                .unwrap(),
        ))
    }

    async fn contact_update(&mut self, id: Uuid) -> std::result::Result<Record, String> {
        let n = self.next_number();
        let mut builder = Record::builder(contact(id));
        let mut changed = false;
        while !changed {
            if self.rng.percent(40) {
                builder = builder.field("fullname", format!("Contact renamed {n}"));
                changed = true;
            }
            if self.rng.percent(30) {
                builder = builder.field("emailaddress1", format!("c{n}@us.example"));
                changed = true;
            }
            if self.rng.percent(30) {
                let parents = self.referable_accounts().await?;
                if let Some(parent) = self.rng.pick(&parents) {
                    builder = builder.lookup("parentcustomerid", account(parent));
                    changed = true;
                }
            }
        }
        Ok(builder.build().unwrap())
    }

    /// An event the mapping rejects (a country the value map does not list), for a record that exists only in
    /// the event: it must end dead-lettered with its payload, and stay there through replays.
    fn poison_event(&mut self) {
        let n = self.next_number();
        let record = Record::builder(account(self.rng.uuid()))
            .field("name", format!("Poison {n}"))
            .field(NUMBER, format!("P-{n}"))
            .field("address1_country", "XX")
            .build()
            .unwrap();
        let event = ChangeEvent::upsert(SOURCE, &record, 1).with_correlation_id(self.rng.uuid());
        self.poison.insert(event.event_id.clone(), event.clone());
        self.network.push(event);
    }

    /// The integration's own write coming back (as in two-way sync): what we wrote for a real change (the
    /// mapped country, our origin column), made by our identity, under its own event id. It must be skipped as an
    /// echo: applying it would fail the mapping (an ISO-3 country is not in the value map).
    fn echo_event(&mut self) {
        let Some(i) = (!self.events.is_empty()).then(|| self.rng.index(self.events.len())) else {
            return;
        };
        let mut event = self.events[i].clone();
        event.event_id.push_str("#echo");
        if let Some(country) = event.fields.get_mut("address1_country") {
            *country = json!(iso3(country));
        }
        event
            .fields
            .insert(ColumnName::new(ORIGIN_COLUMN).unwrap(), json!(IDENTITY));
        let event = event
            .with_origin(IDENTITY)
            .with_correlation_id(self.rng.uuid());
        self.echoes.insert(event.event_id.clone());
        self.network.push(event);
    }

    // --- the network --------------------------------------------------------------------------------------------

    /// Delivers a few events: the oldest ones in a shuffled window, or one from anywhere (late delivery of the
    /// others); some twice at once, some again later.
    fn deliver(&mut self) {
        if self.network.is_empty() {
            return;
        }
        let mut batch: Vec<ChangeEvent> = if self.rng.percent(25) {
            let i = self.rng.index(self.network.len());
            vec![self.network.remove(i)]
        } else {
            let window = (self.rng.range(1, 6) as usize).min(self.network.len());
            self.network.drain(..window).collect()
        };
        self.rng.shuffle(&mut batch);
        for event in batch {
            self.push(event.clone());
            if self.rng.percent(12) {
                self.push(event.clone());
            }
            if self.rng.percent(10) {
                self.network.push(event);
            }
        }
    }

    fn push(&mut self, event: ChangeEvent) {
        self.delivered.insert(event.event_id.clone());
        self.world.queue.push(event);
    }

    // --- the LOB app --------------------------------------------------------------------------------------------

    fn lob_ops(&mut self, count: usize) -> Vec<LobOp> {
        let mut ops = Vec::new();
        for _ in 0..count {
            let Some(parent) = self.rng.pick(&self.accounts) else {
                break;
            };
            let parent = LobAccount {
                id: parent,
                number: self.numbers[&parent].clone(),
                keyed: self.keyed.contains(&parent),
            };
            // By number or by GUID (see `LobAccount::address`).
            let by_key = self.rng.percent(50);
            let n = self.next_number();
            if self.rng.percent(65) {
                let id = self.rng.uuid();
                ops.push(LobOp::Contact {
                    id,
                    contact: LobContact {
                        fullname: format!("LOB contact {n}"),
                        email: format!("lob{n}@eu.example"),
                        parent: parent.id,
                    },
                    parent,
                    by_key,
                });
            } else {
                ops.push(LobOp::Note {
                    account: parent,
                    by_key,
                    note: format!("eu-note-{n}"),
                });
            }
        }
        ops
    }

    /// Work that runs while a poll does: LOB writes, and sometimes a fault that starts meanwhile.
    fn concurrent_ops(&mut self) -> Vec<LobOp> {
        let count = self.rng.range(1, 3) as usize;
        let mut ops = self.lob_ops(count);
        if self.rng.percent(40) {
            let at = self.rng.index(ops.len() + 1);
            let fault = self.fault();
            ops.insert(at, LobOp::Fault(fault));
        }
        ops
    }

    // --- faults -------------------------------------------------------------------------------------------------

    fn fault(&mut self) -> FaultPlan {
        match self.rng.below(100) {
            0..=29 => FaultPlan::Outage(self.rng.millis(1_000, 40_000)),
            30..=54 => FaultPlan::Fail(self.rng.range(1, 8) as u32, Fault::Unavailable),
            55..=74 => {
                let retry_after = self.rng.millis(1_000, 8_000);
                FaultPlan::Fail(
                    self.rng.range(1, 6) as u32,
                    Fault::Throttled { retry_after },
                )
            }
            75..=87 => FaultPlan::Ledger(self.rng.range(1, 5) as u32),
            88..=93 => FaultPlan::Latency(match self.rng.percent(50) {
                true => Duration::ZERO,
                false => self.rng.millis(1, 20),
            }),
            _ => FaultPlan::LedgerLatency(match self.rng.percent(50) {
                true => Duration::ZERO,
                false => self.rng.millis(1, 10),
            }),
        }
    }

    // --- the worker ---------------------------------------------------------------------------------------------

    /// A worker crash: the pipeline and applier are dropped and a new one starts from the ledger.
    /// What an interrupted poll may have settled. An event counts (received and settled) only once the ledger
    /// settled it, so nothing is ever left half-counted. One event at a time: any prefix of the poll settled. As
    /// a batch: all of it (with its checkpoint, in one transaction) or none.
    fn interruption_is_consistent(&self, received: u64, unsettled: u64, batch: u64) -> bool {
        if unsettled != 0 {
            return false;
        }
        match self.world.batched {
            true => received == 0 || received == batch,
            false => received <= batch,
        }
    }

    fn restart(&mut self) {
        self.crashes += 1;
        let (applier, pipeline) = self.world.worker();
        self.appliers.push(applier);
        self.pipeline = pipeline;
    }

    /// One poll of a few events; sometimes the worker is killed after a random (simulated) time, sometimes the
    /// LOB writes concurrently. The poll's own accounting is checked against the queue and the counters.
    async fn poll(&mut self) -> std::result::Result<(), String> {
        let max = self.rng.range(1, 4) as usize;
        let kill_after = self.rng.percent(15).then(|| self.rng.millis(1, 3_000));
        let lob_ops = match self.rng.percent(25) {
            true => self.concurrent_ops(),
            false => Vec::new(),
        };
        let (end, before) = self.run_poll(max, kill_after, lob_ops).await?;
        self.settle_poll(max, end, before)
    }

    async fn run_poll(
        &mut self,
        max: usize,
        kill_after: Option<Duration>,
        lob_ops: Vec<LobOp>,
    ) -> std::result::Result<(PollEnd, SyncStats), String> {
        let before = self.applier().stats();
        let pipeline = self.pipeline.clone();
        let poll = async move {
            let run = pipeline.run_once(max);
            let result = match kill_after {
                Some(after) => match tokio::time::timeout(after, run).await {
                    Ok(result) => result,
                    Err(_) => return PollEnd::Killed,
                },
                None => run.await,
            };
            match result {
                Ok(count) => PollEnd::Done(count),
                Err(error) => PollEnd::Failed(error),
            }
        };
        let (end, lob) = tokio::join!(poll, self.lob.run(&self.world, lob_ops));
        lob?;
        Ok((end, before))
    }

    fn settle_poll(
        &mut self,
        max: usize,
        end: PollEnd,
        before: SyncStats,
    ) -> std::result::Result<(), String> {
        let after = self.applier().stats();
        let received = after.received - before.received;
        let settled = after.settled() - before.settled();
        let replayed = after.replayed - before.replayed;
        let batch = max.min(self.world.queue.len() - self.checkpoint) as u64;
        let counts = format!(
            "batch of {batch}: received {received}, settled {settled}, replayed {replayed}"
        );
        if replayed != 0 || settled > received {
            return Err(format!("a poll settled more than it received ({counts})"));
        }
        let unsettled = received - settled;
        match end {
            PollEnd::Done(count) => {
                if count as u64 != batch || received != batch || unsettled != 0 {
                    return Err(format!(
                        "a poll returned {count} without error, but {counts}: \
                         every event of a completed poll settles once"
                    ));
                }
                self.checkpoint += count;
                if self.rng.percent(4) {
                    self.restart();
                }
            }
            PollEnd::Failed(error) => {
                // An error from `apply` leaves its event unsettled; one from the checkpoint read or save leaves
                // none (the batch either did not start or settled completely).
                let consistent = self.interruption_is_consistent(received, unsettled, batch);
                if !consistent {
                    return Err(format!("a poll failed ({error}) with {counts}"));
                }
                let cause = match &error {
                    Error::RetriesExhausted { source, .. } => source,
                    other => other,
                };
                if !matches!(cause, Error::Unavailable { backend, .. } if backend.starts_with("ledger"))
                {
                    return Err(format!(
                        "a poll failed with {error:?}: only the ledger was down ({counts})"
                    ));
                }
                self.interrupted += unsettled;
                self.broken_polls += 1;
                self.restart();
            }
            PollEnd::Killed => {
                // Killed inside `apply`: one event in flight; killed reading or saving the checkpoint: none.
                let consistent = self.interruption_is_consistent(received, unsettled, batch);
                if !consistent {
                    return Err(format!(
                        "a worker killed mid-poll left {unsettled} events unsettled ({counts})"
                    ));
                }
                self.interrupted += unsettled;
                self.kills += 1;
                self.broken_polls += 1;
                self.restart();
            }
        }
        Ok(())
    }

    /// An operator replays the dead letters while everything runs (the target or the ledger may be failing, and
    /// the worker may be killed halfway). Whatever happens, every settlement of a replay counts as replayed.
    async fn replay(&mut self) -> std::result::Result<(), String> {
        let kill_after = self.rng.percent(30).then(|| self.rng.millis(1, 400));
        let limit = self.rng.range(1, 4) as usize;
        let meanwhile = match self.rng.percent(40) {
            true => self.concurrent_ops(),
            false => Vec::new(),
        };
        let applier = self.applier().clone();
        let before = applier.stats();
        let replay = async {
            let replay = applier.replay_dead_letters(limit);
            match kill_after {
                Some(after) => tokio::time::timeout(after, replay).await.ok(),
                None => Some(replay.await),
            }
        };
        let (result, lob) = tokio::join!(replay, self.lob.run(&self.world, meanwhile));
        lob?;
        let after = applier.stats();
        let settled = after.settled() - before.settled();
        let replayed = after.replayed - before.replayed;
        let counts = format!(
            "{} received, {settled} settled, {replayed} replayed",
            after.received - before.received
        );
        if after.received != before.received || settled != replayed {
            return Err(format!(
                "a replay ({}) counted {counts}: every settlement of a replay is a replay",
                match &result {
                    None => "killed".to_owned(),
                    Some(Ok(report)) => format!(
                        "{} replayed, {} failed",
                        report.replayed,
                        report.failed.len()
                    ),
                    Some(Err(e)) => format!("failed: {e}"),
                }
            ));
        }
        match result {
            Some(Ok(report)) => {
                if report.replayed as u64 != replayed {
                    return Err(format!(
                        "a replay reported {} replayed, but {counts}",
                        report.replayed
                    ));
                }
                for (id, error) in &report.failed {
                    let transient = match error {
                        Error::RetriesExhausted { source, .. } => source.is_retryable(),
                        other => other.is_retryable(),
                    };
                    if !self.poison.contains_key(id) && !transient {
                        return Err(format!(
                            "the replay of {id}, which is not poison, failed with a permanent error: {error}"
                        ));
                    }
                }
            }
            Some(Err(_)) => self.restart(),
            None => {
                self.kills += 1;
                self.restart();
            }
        }
        Ok(())
    }

    // --- the end ------------------------------------------------------------------------------------------------

    /// Restores everything, delivers what is left, drains, replays dead letters, drains again.
    async fn drain(&mut self) -> std::result::Result<(), String> {
        self.world.target.faults().restore();
        self.world.slow_ledger.fail_next(0);
        FaultPlan::LedgerLatency(Duration::ZERO).apply(&self.world);
        let mut rest = std::mem::take(&mut self.network);
        self.rng.shuffle(&mut rest);
        for event in rest {
            self.push(event);
        }
        self.drain_queue().await?;
        let letters = self
            .world
            .ledger
            .dead_letter_count()
            .await
            .map_err(|e| e.to_string())?;
        let before = self.applier().stats();
        let report = self
            .applier()
            .replay_dead_letters(usize::MAX)
            .await
            .map_err(|e| format!("replaying dead letters failed: {e}"))?;
        let after = self.applier().stats();
        let failed: BTreeSet<&str> = report.failed.iter().map(|(id, _)| id.as_str()).collect();
        let poison: BTreeSet<&str> = self.poison.keys().map(String::as_str).collect();
        if failed != poison {
            let errors: Vec<String> = report
                .failed
                .iter()
                .filter(|(id, _)| !self.poison.contains_key(id))
                .map(|(id, error)| format!("{id}: {error}"))
                .collect();
            return Err(format!(
                "replay failed for {failed:?}; exactly the poison events {poison:?} should fail (the others \
                 failed with: {})",
                errors.join("; ")
            ));
        }
        if report.replayed + report.failed.len() != letters
            || after.replayed - before.replayed != report.replayed as u64
            || after.settled() - before.settled() != report.replayed as u64
        {
            return Err(format!(
                "replaying {letters} letters: {} replayed, {} failed, counters {before} -> {after}",
                report.replayed,
                report.failed.len()
            ));
        }
        self.drain_queue().await?;
        if self.checkpoint != self.world.queue.len() {
            return Err("events were delivered after the drain".into());
        }
        Ok(())
    }

    async fn drain_queue(&mut self) -> std::result::Result<(), String> {
        while self.checkpoint < self.world.queue.len() {
            let (end, before) = self.run_poll(16, None, Vec::new()).await?;
            if let PollEnd::Failed(error) = &end {
                return Err(format!("a poll failed with nothing failing: {error}"));
            }
            self.settle_poll(16, end, before)?;
        }
        Ok(())
    }

    async fn check(&self) -> std::result::Result<Summary, String> {
        let mut problems = Vec::new();
        let homes = self.check_identities(&mut problems).await?;
        self.check_target(&homes, &mut problems);
        self.check_placeholders(&homes, &mut problems);
        self.check_writes(&homes, &mut problems);
        let stats = self.check_accounting(&mut problems).await?;
        if !problems.is_empty() {
            let mut message = String::new();
            for problem in problems.iter().take(8) {
                let _ = write!(message, "\n  - {problem}");
            }
            if problems.len() > 8 {
                let _ = write!(message, "\n  ... and {} more", problems.len() - 8);
            }
            return Err(message);
        }
        Ok(Summary {
            stats,
            crashes: self.crashes,
            kills: self.kills,
            poison: self.poison.len() as u64,
            hydrated: self.world.recorder.log().placeholders.len() as u64,
            aliased: homes.iter().filter(|(source, home)| source != home).count() as u64,
            lob_writes: self.lob.accepted,
        })
    }

    /// Check 1, identity: where each source account lives at the target, as the ledger's id map says (an alias: the
    /// account hydrated a placeholder the LOB made by number, under a GUID of the target's) or else under its
    /// source GUID; and that this is the one target account with its number, and no target account stands for
    /// no source account (a duplicate row). Returns the homes found, source GUID to target GUID.
    ///
    /// The id map is read through [`Ledger::lookup`], for every source record an event named (each one the
    /// applier may have aliased), so that the check reads every backend the same way.
    async fn check_identities(
        &self,
        problems: &mut Vec<String>,
    ) -> std::result::Result<BTreeMap<Uuid, Uuid>, String> {
        let source_accounts = self.world.source.records(&table("account")).unwrap();
        let target_accounts = self.world.target.records(&table("account")).unwrap();
        let named: BTreeSet<SourceRecord> = self
            .events
            .iter()
            .chain(self.poison.values())
            .map(ChangeEvent::source_record)
            .collect();
        let query = LedgerQuery {
            targets: named.into_iter().collect(),
            ..LedgerQuery::default()
        };
        let aliases: BTreeMap<SourceRecord, EntityRef> = self
            .world
            .ledger
            .lookup(&query)
            .await
            .map_err(|e| format!("reading the id map failed: {e}"))?
            .targets
            .into_iter()
            .collect();
        let mut homes = BTreeMap::new();
        for source in &source_accounts {
            let number = source.record.field(NUMBER).cloned().unwrap_or(Value::Null);
            let alias = aliases.get(&SourceRecord::new(SOURCE, account(source.id)));
            let home = alias.and_then(EntityRef::id).unwrap_or(source.id);
            let holders: Vec<Uuid> = target_accounts
                .iter()
                .filter(|t| t.record.field(NUMBER) == Some(&number))
                .map(|t| t.id)
                .collect();
            if holders != [home] {
                let whence = match alias {
                    Some(alias) => format!("at {alias}, as the ledger's id map says"),
                    None => "under its source GUID (the id map has no alias for it)".to_owned(),
                };
                problems.push(format!(
                    "check 1: source account {} (number {number}, keyed by the LOB: {}) should be at the target \
                     {whence}, and be the one target account with its number; the target accounts with its \
                     number are {holders:?}",
                    source.id,
                    self.keyed.contains(&source.id)
                ));
            }
            if target_accounts.iter().any(|t| t.id == home) {
                homes.insert(source.id, home);
            }
        }
        let homed: BTreeSet<Uuid> = homes.values().copied().collect();
        for extra in target_accounts.iter().filter(|t| !homed.contains(&t.id)) {
            problems.push(format!(
                "check 1: target account {} is no source account's home (a duplicate row?): {:?}",
                extra.id, extra.record
            ));
        }
        for (alias, target) in &aliases {
            let aliased = alias.reference.id().and_then(|id| homes.get(&id));
            if alias.reference.table.as_str() != "account" || aliased != target.id().as_ref() {
                problems.push(format!(
                    "check 1: the id map aliases {alias:?} to {target}, which is not that source record's home"
                ));
            }
        }
        Ok(homes)
    }

    /// Checks 1 and 2: the target mirrors the source on sync-owned fields, and holds the LOB's writes intact.
    fn check_target(&self, homes: &BTreeMap<Uuid, Uuid>, problems: &mut Vec<String>) {
        let source_accounts = self.world.source.records(&table("account")).unwrap();
        let source_contacts = self.world.source.records(&table("contact")).unwrap();
        let target_accounts = self.world.target.records(&table("account")).unwrap();
        let target_contacts = self.world.target.records(&table("contact")).unwrap();
        let ids = |records: &[StoredRecord]| records.iter().map(|r| r.id).collect::<BTreeSet<_>>();
        let mut expected_contacts = ids(&source_contacts);
        expected_contacts.extend(self.lob.contacts.keys());
        if ids(&target_contacts) != expected_contacts {
            problems.push(format!(
                "check 1/2: the target's contacts {:?} are not the source's plus the LOB's {:?}",
                ids(&target_contacts),
                expected_contacts
            ));
        }
        let target: BTreeMap<Uuid, &StoredRecord> = target_accounts
            .iter()
            .chain(&target_contacts)
            .map(|r| (r.id, r))
            .collect();
        let home = |id: &Uuid| homes.get(id).copied();
        for source in &source_accounts {
            let Some(mirror) = home(&source.id).and_then(|id| target.get(&id)) else {
                continue; // reported by check_identities
            };
            compare(
                source,
                mirror,
                self.lob.notes.get(&source.id),
                homes,
                problems,
            );
        }
        for source in &source_contacts {
            let Some(mirror) = target.get(&source.id) else {
                continue; // reported above
            };
            compare(source, mirror, None, homes, problems);
        }
        for (id, lob) in &self.lob.contacts {
            let Some(stored) = target.get(id) else {
                continue;
            };
            let mut expected = BTreeMap::new();
            expected.insert("fullname".to_owned(), json!(lob.fullname));
            expected.insert("emailaddress1".to_owned(), json!(lob.email));
            let fields: BTreeMap<String, Value> = stored
                .record
                .fields
                .iter()
                .map(|(c, v)| (c.to_string(), v.clone()))
                .collect();
            let parent = home(&lob.parent).map(account);
            if fields != expected
                || stored.record.lookups.get("parentcustomerid") != parent.as_ref()
                || stored.record.source_version.is_some()
            {
                problems.push(format!(
                    "check 2: LOB contact {id} was {lob:?} (its account at the target: {parent:?}), the target \
                     holds {:?}",
                    stored.record
                ));
            }
        }
    }

    /// Check 3: no placeholder left; each one created was hydrated exactly once, and every other account was
    /// reported once too, when it was created with real data. By target GUID: a placeholder made by number is
    /// its source account's home under a GUID of the target's.
    fn check_placeholders(&self, homes: &BTreeMap<Uuid, Uuid>, problems: &mut Vec<String>) {
        let created = self.world.recorder.log().placeholders.clone();
        let hydrations = lock(&self.world.hydrations).clone();
        // Target GUID to source GUID.
        let sources: BTreeMap<Uuid, Uuid> = homes.iter().map(|(s, t)| (*t, *s)).collect();
        for id in &created {
            if !sources.contains_key(id) {
                problems.push(format!(
                    "check 3: a placeholder {id} was created, and it is no source account's home at the target"
                ));
            }
        }
        let mut accounts: BTreeSet<Uuid> = sources.keys().copied().collect();
        accounts.extend(hydrations.keys());
        for id in &accounts {
            let seen = hydrations.get(id).copied().unwrap_or_default();
            let placeholder = u32::from(created.contains(id));
            if seen.all != 1 || seen.placeholder != placeholder {
                let of = match sources.get(id) {
                    Some(source) if source != id => {
                        format!(" (the home of source account {source})")
                    }
                    Some(_) => String::new(),
                    None => " (no source account's home)".to_owned(),
                };
                problems.push(format!(
                    "check 3: the hooks reported account {id}{of} hydrated {} times ({} as a placeholder); \
                     expected once ({placeholder} as a placeholder)",
                    seen.all, seen.placeholder
                ));
            }
        }
        for table_name in ["account", "contact"] {
            for stored in self.world.target.records(&table(table_name)).unwrap() {
                if stored.record.state == HydrationState::Placeholder
                    || stored.record.field(MARKER) == Some(&json!(true))
                {
                    problems.push(format!(
                        "check 3: {table_name} {} is still a placeholder: {:?}",
                        stored.id, stored.record
                    ));
                }
            }
        }
        let total = self.total();
        let hydrated_ok = match self.broken_polls {
            0 => total.hydrated == created.len() as u64,
            _ => total.hydrated <= created.len() as u64,
        };
        if !hydrated_ok {
            problems.push(format!(
                "check 3: {} placeholders were created and hydrated, the counters say {} hydrated",
                created.len(),
                total.hydrated
            ));
        }
        let counted = total.placeholders_created + self.lob.placeholders_created;
        // A worker killed (or whose ledger failed) between ensuring a placeholder and settling cannot count it.
        if counted > created.len() as u64
            || (self.broken_polls == 0 && counted != created.len() as u64)
        {
            problems.push(format!(
                "check 3: {} placeholders were created, the counters say {} (sync) + {} (LOB)",
                created.len(),
                total.placeholders_created,
                self.lob.placeholders_created
            ));
        }
    }

    /// Check 4: what the recording store saw.
    fn check_writes(&self, homes: &BTreeMap<Uuid, Uuid>, problems: &mut Vec<String>) {
        let log = self.world.recorder.log();
        for violation in &log.violations {
            problems.push(format!("check 4: {violation}"));
        }
        // The highest source version ever written to a record is the version the source is at.
        for table_name in ["account", "contact"] {
            for source in self.world.source.records(&table(table_name)).unwrap() {
                let home = homes.get(&source.id).copied().unwrap_or(source.id);
                let written = log.source_versions.get(&home).copied();
                if written != Some(source.version.0) {
                    problems.push(format!(
                        "check 4: {table_name} {} (at the target {home}): highest source version written \
                         {written:?}, the source is at {}",
                        source.id, source.version.0
                    ));
                }
            }
        }
    }

    /// The statistics of every worker incarnation, summed (`appliers` holds every one, the current included).
    fn total(&self) -> SyncStats {
        self.appliers
            .iter()
            .fold(SyncStats::default(), |sum, a| sum + a.stats())
    }

    /// Check 5: every event accounted for. The ledger is read through the [`Ledger`] trait (settled event ids,
    /// checkpoint, dead letters, totals), the same way on every backend.
    async fn check_accounting(
        &self,
        problems: &mut Vec<String>,
    ) -> std::result::Result<SyncStats, String> {
        let ledger = &self.world.ledger;
        let read = |what: &str, e: Error| format!("reading the ledger's {what} failed: {e}");
        let total = self.total();
        if total.settled() + self.interrupted != total.received + total.replayed {
            problems.push(format!(
                "check 5: applied + duplicate + stale + echo + dead_lettered = {} but received + replayed - \
                 interrupted = {} + {} - {} ({total})",
                total.settled(),
                total.received,
                total.replayed,
                self.interrupted
            ));
        }
        // Each echo was received at least once, and every receipt of one is an echo.
        if total.echo < self.echoes.len() as u64 {
            problems.push(format!(
                "check 5: {} echo events were delivered, {} were skipped as echoes",
                self.echoes.len(),
                total.echo
            ));
        }
        let query = LedgerQuery {
            event_ids: self.delivered.iter().cloned().collect(),
            ..LedgerQuery::default()
        };
        let processed = ledger
            .lookup(&query)
            .await
            .map_err(|e| read("settled event ids", e))?
            .processed;
        let lost: Vec<&String> = self
            .delivered
            .iter()
            .filter(|id| !processed.contains(*id))
            .collect();
        if !lost.is_empty() {
            problems.push(format!(
                "check 5: delivered events never settled in the ledger: {lost:?}"
            ));
        }
        let saved = ledger
            .checkpoint(SOURCE)
            .await
            .map_err(|e| read("checkpoint", e))?;
        if saved != Some(self.world.queue.len().to_string()) && !self.world.queue.is_empty() {
            problems.push(format!(
                "check 5: the saved checkpoint is {saved:?}, the queue holds {}",
                self.world.queue.len()
            ));
        }
        let dead_letters = ledger
            .dead_letters(usize::MAX)
            .await
            .map_err(|e| read("dead letters", e))?;
        let letters: BTreeMap<String, _> = dead_letters
            .iter()
            .map(|l| (l.event.event_id.clone(), l))
            .collect();
        if letters.keys().collect::<Vec<_>>() != self.poison.keys().collect::<Vec<_>>() {
            problems.push(format!(
                "check 5: the dead letters are {:?}, the poison events {:?}",
                letters.keys().collect::<Vec<_>>(),
                self.poison.keys().collect::<Vec<_>>()
            ));
        }
        for (id, event) in &self.poison {
            let Some(letter) = letters.get(id) else {
                continue;
            };
            if letter.event != *event
                || letter.retryable
                || !letter.error.contains("address1_country")
                || letter.correlation_id != event.correlation_id
            {
                problems.push(format!(
                    "check 5: the dead letter of poison event {id} does not hold its payload and reason: \
                     {letter:?}"
                ));
            }
        }
        if let Some(id) = self.poison.values().find_map(|e| {
            let reference = e.reference();
            let held = self
                .world
                .target
                .records(&reference.table)
                .unwrap()
                .into_iter()
                .any(|r| Some(r.id) == reference.id());
            held.then(|| e.event_id.clone())
        }) {
            problems.push(format!("check 5: poison event {id} was written"));
        }
        // The counters are settled with their batch, and an applier adds a batch's counters only once its
        // settlement returned: the ledger's running totals are the sum of every incarnation's statistics.
        let totals = ledger.totals().await.map_err(|e| read("totals", e))?;
        if totals != total {
            problems.push(format!(
                "check 5: the ledger's totals are {totals}, the workers counted {total}"
            ));
        }
        Ok(total)
    }
}

/// The target's value for a source country: the mapping's value map, written out independently of `Mapping`.
fn iso3(country: &Value) -> Option<&'static str> {
    COUNTRIES
        .iter()
        .find(|(from, _)| Some(*from) == country.as_str())
        .map(|(_, to)| *to)
}

/// Check 1 (and 2 for notes) for one source record and its mirror at the target (`homes`: where each source
/// account lives at the target, for lookups).
fn compare(
    source: &StoredRecord,
    mirror: &StoredRecord,
    lob_note: Option<&String>,
    homes: &BTreeMap<Uuid, Uuid>,
    problems: &mut Vec<String>,
) {
    let what = match mirror.id == source.id {
        true => source.record.reference.to_string(),
        false => format!("{} (at the target {})", source.record.reference, mirror.id),
    };
    let is_account = source.record.table().as_str() == "account";
    // The mapping, written out independently of `Mapping`: the note is the target's, countries become ISO-3.
    let mut expected: BTreeMap<String, Value> = BTreeMap::new();
    for (column, value) in &source.record.fields {
        let value = match column.as_str() {
            NOTE if is_account => continue,
            "address1_country" => json!(iso3(value)),
            _ => value.clone(),
        };
        expected.insert(column.to_string(), value);
    }
    expected.insert(ORIGIN_COLUMN.into(), json!(IDENTITY));
    if is_account {
        expected.insert(MARKER.into(), json!(false));
        if let Some(note) = lob_note {
            expected.insert(NOTE.into(), json!(note));
        }
    }
    let actual: BTreeMap<String, Value> = mirror
        .record
        .fields
        .iter()
        .map(|(c, v)| (c.to_string(), v.clone()))
        .collect();
    if actual != expected {
        let differing: Vec<String> = expected
            .keys()
            .chain(actual.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|k| expected.get(*k) != actual.get(*k))
            .map(|k| {
                format!(
                    "{k}: expected {:?}, target has {:?}",
                    expected.get(k),
                    actual.get(k)
                )
            })
            .collect();
        let check = match differing.iter().any(|d| d.starts_with(NOTE)) {
            true => "check 2",
            false => "check 1",
        };
        problems.push(format!(
            "{check}: {what} differs at the target: {}",
            differing.join("; ")
        ));
    }
    // A lookup to a source account points at that account's one home at the target.
    let mut lookups = source.record.lookups.clone();
    for target in lookups.values_mut() {
        if let Some(home) = target.id().and_then(|id| homes.get(&id)) {
            *target = EntityRef::by_id(target.table.clone(), *home).unwrap();
        }
    }
    if mirror.record.lookups != lookups {
        problems.push(format!(
            "check 1: {what}: lookups {:?} at the source (at the target: {lookups:?}), {:?} at the target",
            source.record.lookups, mirror.record.lookups
        ));
    }
    if mirror.record.source_version != Some(source.version.0) {
        problems.push(format!(
            "check 1: {what}: the target holds source version {:?}, the source is at {}",
            mirror.record.source_version, source.version.0
        ));
    }
}
