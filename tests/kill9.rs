//! Crash tests for real (issue 9, item 8): the sync worker runs as a separate OS process against the Dataverse
//! emulator (also a separate process), keeps its state in a `SqliteLedger` file, and is killed with SIGKILL at
//! seeded random moments (inside a batch, between its writes and their settlement, while deferred tasks run),
//! then restarted, until it has been killed `KILL9_KILLS` times (default 20); a last run drains everything. Then:
//!
//! 1. the target equals the source model on every sync-owned field, one row per source record, deletes gone;
//! 2. every line of the event log is accounted exactly once in the ledger's durable totals (summed over every
//!    run): `received` equals the lines, and applied + duplicate + stale + echo + dead-lettered equals received;
//! 3. every deferred task ran and its effect is visible exactly once (by its idempotency key);
//! 4. the dead letters are exactly the poison events, with their payloads: they survived every restart.
//!
//! ```sh
//! cargo test --test kill9                        # 20 kills (about half a minute)
//! KILL9_KILLS=200 cargo test --test kill9        # 200 kills
//! KILL9_SEED=7 cargo test --test kill9           # another schedule
//! ```
//!
//! One binary plays three roles, chosen by its first argument: the test itself (no argument), `emulator` (serves
//! until its standard input closes, so it never outlives the test) and `worker`. A custom harness
//! (`harness = false`) because the test spawns its own executable.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use uuid::Uuid;

use dataverse_emulator::{EmulatedTable, Emulator, EmulatorConfig};
use eventual_upsert::dataverse::{DataverseConfig, DataverseStore, DataverseTable};
use eventual_upsert::schema::{ColumnType, Schema, TableSchema};
use eventual_upsert::sync::{
    Applier, ChangeEvent, DeadLetter, DeferredTask, JsonLinesSource, Ledger, LedgerQuery,
    LedgerView, Pruned, Retention, Settlement, SqliteLedger, SyncStats, SyncWorker, TaskContext,
    TaskHandlers, TaskQueue, TaskRunner, TaskSettings, TaskStatus, WorkerSettings,
};
use eventual_upsert::{
    EnsuringWriter, EntityRef, KeyKind, PlaceholderAction, Policies, Record, RecordStore,
    RetryPolicy, TableName, TablePolicy,
};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const STATE_COLUMN: &str = "new_isplaceholder";
const ACCOUNTS: usize = 120;
const CONTACTS: usize = 150;
const LOB_ACCOUNTS: usize = 24; // referenced by the LOB app by account number; never referenced by synced contacts
const POISON: usize = 5;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("no runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("emulator") => runtime.block_on(emulator()),
        Some("worker") => runtime.block_on(worker(&args[1..])),
        _ => {
            println!("\nrunning 1 test");
            let result = runtime.block_on(orchestrate());
            match &result {
                Ok(()) => println!("test kill9 ... ok\n\ntest result: ok. 1 passed; 0 failed"),
                Err(e) => println!(
                    "test kill9 ... FAILED\n{e}\n\ntest result: FAILED. 0 passed; 1 failed"
                ),
            }
            result
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

// --- Shared by the roles ----------------------------------------------------------------------------------------

fn schema() -> eventual_upsert::Result<Schema> {
    Schema::new([
        TableSchema::builder("account")
            .primary_name("name")
            .alternate_key([("accountnumber", KeyKind::String)])
            .column("telephone1", ColumnType::String)
            .build()?,
        TableSchema::builder("contact")
            .primary_name("fullname")
            .lookup("parentcustomerid", "account")
            .column("emailaddress1", ColumnType::String)
            .build()?,
    ])
}

fn policies() -> eventual_upsert::Result<Policies> {
    Policies::builder()
        .table(
            "account",
            TablePolicy::builder()
                .primary_name("name")
                .required("telephone1")
                .on_placeholder("send_invoice", PlaceholderAction::Defer),
        )
        .build()
}

fn target(url: &str) -> eventual_upsert::Result<DataverseStore> {
    DataverseConfig::new(url, schema()?)
        .with_name("eu")
        .with_retry(RetryPolicy {
            initial_backoff: Duration::from_millis(5),
            ..RetryPolicy::default()
        })
        .with_table(DataverseTable::new("account").with_state_column(STATE_COLUMN))
        .with_table(
            DataverseTable::new("contact")
                .with_navigation("parentcustomerid", "parentcustomerid_account")
                .with_state_column(STATE_COLUMN),
        )
        .build()
}

/// splitmix64: a tiny seeded generator, so the schedule needs no `rand` and a seed replays it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn guid(&mut self) -> Uuid {
        Uuid::from_u128((u128::from(self.next()) << 64) | u128::from(self.next()))
    }
}

fn env_u64(name: &str, default: u64) -> BoxResult<u64> {
    match std::env::var(name) {
        Ok(text) => Ok(text
            .parse()
            .map_err(|_| format!("{name}={text:?} is not a number"))?),
        Err(_) => Ok(default),
    }
}

// --- The emulator role ------------------------------------------------------------------------------------------

async fn emulator() -> BoxResult<()> {
    let emulator = Emulator::start(
        EmulatorConfig::new()
            .table(EmulatedTable::accounts())
            .table(EmulatedTable::contacts()),
    )
    .await?;
    println!("{}", emulator.base_url());
    std::io::stdout().flush()?;
    // Serve until the parent closes our standard input (or dies): the emulator never outlives the test.
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    })
    .await?;
    Ok(())
}

// --- The worker role --------------------------------------------------------------------------------------------

/// A ledger that waits a little before each settlement: the worker's writes are then done and not yet settled
/// for long enough that a SIGKILL often lands in between.
#[derive(Debug)]
struct SlowSettle {
    inner: SqliteLedger,
    pause: Duration,
}

#[async_trait]
impl Ledger for SlowSettle {
    async fn lookup(&self, query: &LedgerQuery) -> eventual_upsert::Result<LedgerView> {
        self.inner.lookup(query).await
    }
    async fn settle(&self, settlement: &Settlement) -> eventual_upsert::Result<()> {
        tokio::time::sleep(self.pause).await;
        self.inner.settle(settlement).await
    }
    async fn checkpoint(&self, source: &str) -> eventual_upsert::Result<Option<String>> {
        self.inner.checkpoint(source).await
    }
    async fn dead_letters(&self, limit: usize) -> eventual_upsert::Result<Vec<DeadLetter>> {
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
    ) -> eventual_upsert::Result<Vec<DeferredTask>> {
        self.inner.claim_tasks(now_ms, lease, limit).await
    }
    async fn tasks(&self, limit: usize) -> eventual_upsert::Result<Vec<DeferredTask>> {
        self.inner.tasks(limit).await
    }
    async fn totals(&self) -> eventual_upsert::Result<SyncStats> {
        self.inner.totals().await
    }
    async fn prune(&self, retention: &Retention, now_ms: u64) -> eventual_upsert::Result<Pruned> {
        self.inner.prune(retention, now_ms).await
    }
}

/// `worker <target url> <ledger file> <event log> <effects file> <seed>`: applies the log until it is drained and
/// every deferred task has finished, then exits 0.
async fn worker(args: &[String]) -> BoxResult<()> {
    let [url, ledger, events, effects, seed] = args else {
        return Err("usage: kill9 worker <url> <ledger> <events> <effects> <seed>".into());
    };
    let mut rng = Rng(seed.parse()?);
    let store: Arc<dyn RecordStore> = Arc::new(target(url)?);
    let ledger: Arc<dyn Ledger> = Arc::new(SlowSettle {
        inner: SqliteLedger::open(ledger).await?,
        pause: Duration::from_millis(rng.below(15)),
    });
    let writer = EnsuringWriter::new(store.clone()).with_policy(policies()?);
    let applier = Applier::builder(writer.clone(), ledger.clone())
        .identity("sync-us-eu")
        .build(None)?;
    let effects = PathBuf::from(effects);
    let task_pause = Duration::from_millis(rng.below(10));
    let handlers = TaskHandlers::new().register("send_invoice", move |ctx: TaskContext| {
        let effects = effects.clone();
        async move {
            // The effect, made idempotent by the task's key: a rerun after a crash finds it and adds nothing.
            let key = ctx.idempotency_key().to_owned();
            let done = std::fs::read_to_string(&effects)
                .unwrap_or_default()
                .lines()
                .any(|line| line == key);
            if !done {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&effects)
                    .map_err(|e| eventual_upsert::Error::Unavailable {
                        backend: "effects".into(),
                        reason: e.to_string(),
                        retry_after: None,
                    })?;
                let _ = writeln!(file, "{key}");
            }
            // A crash here: the effect is made, the task not yet settled.
            tokio::time::sleep(task_pause).await;
            Ok(())
        }
    });
    let runner = TaskRunner::new(ledger.clone(), store, writer.policy().clone(), handlers)
        .with_settings(TaskSettings {
            lease: Duration::from_millis(500),
            recheck: Duration::from_millis(50),
            backoff: Duration::from_millis(10),
            ..TaskSettings::default()
        });
    let worker = SyncWorker::builder(Arc::new(JsonLinesSource::new("us", events)), applier)
        .tasks(runner)
        .settings(WorkerSettings {
            batch_size: 5 + rng.below(30) as usize,
            ..WorkerSettings::default()
        })
        .build();
    let started = Instant::now();
    loop {
        let turn = worker.run_once().await?;
        let pending = ledger
            .tasks(usize::MAX)
            .await?
            .iter()
            .any(|t| t.status == TaskStatus::Pending);
        if turn.events == 0 && !pending {
            return Ok(());
        }
        if turn.events == 0 {
            if started.elapsed() > Duration::from_secs(60) {
                return Err("deferred tasks still pending after 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// --- The test ---------------------------------------------------------------------------------------------------

/// Kills its process when dropped: no child outlives a failed test.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The source's history: what the target must end up holding.
#[derive(Default)]
struct Model {
    /// Final fields per source account GUID (`None`: deleted).
    accounts: BTreeMap<Uuid, Option<BTreeMap<String, Value>>>,
    /// Final fields and parent GUID per contact.
    contacts: BTreeMap<Uuid, (BTreeMap<String, Value>, Uuid)>,
    lines: usize,
    poison: BTreeSet<String>,
    tasks: BTreeSet<String>,
}

async fn orchestrate() -> BoxResult<()> {
    let kills = env_u64("KILL9_KILLS", 20)?;
    let seed = env_u64("KILL9_SEED", 9)?;
    let mut rng = Rng(seed);
    let dir = std::env::temp_dir().join(format!("kill9-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let (ledger_path, events_path, effects_path) = (
        dir.join("ledger.db"),
        dir.join("events.jsonl"),
        dir.join("effects.log"),
    );
    let exe = std::env::current_exe()?;

    let mut emulator = Command::new(&exe)
        .arg("emulator")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = emulator.stdout.take().ok_or("no emulator stdout")?;
    let _emulator = Guard(emulator);
    let mut url = String::new();
    BufReader::new(stdout).read_line(&mut url)?;
    let url = url.trim().to_owned();
    if !url.starts_with("http://127.0.0.1:") {
        return Err(format!("the emulator printed {url:?}, not its address").into());
    }
    let store = target(&url)?;
    let ledger = Arc::new(SqliteLedger::open(&ledger_path).await?);

    // The LOB app, before any sync: contacts referencing accounts by number make placeholders, and invoices that
    // need the account's phone are deferred, durably.
    let mut model = generate(&mut rng, &events_path)?;
    let writer = EnsuringWriter::new(Arc::new(target(&url)?)).with_policy(policies()?);
    let queue = TaskQueue::new(ledger.clone());
    for i in 0..LOB_ACCOUNTS {
        let account = EntityRef::by_key("account", [("accountnumber", number(i))])?;
        let contact = Record::builder(EntityRef::by_id("contact", rng.guid())?)
            .field("fullname", format!("LOB contact {i}"))
            .lookup("parentcustomerid", account.clone())
            .build()?;
        writer.write(contact).await?;
        let placeholder = store.read(&account).await?.ok_or("no placeholder")?;
        let key = queue
            .defer(
                "send_invoice",
                &TableName::new("account")?,
                placeholder.id,
                json!({"invoice": format!("INV-{i}")}),
            )
            .await?;
        model.tasks.insert(key);
    }
    drop(ledger);

    println!(
        "kill9: seed {seed}, {} events ({} poison), {} deferred tasks, {kills} kills; files in {}",
        model.lines,
        model.poison.len(),
        model.tasks.len(),
        dir.display()
    );
    let spawn = |rng: &mut Rng| {
        Command::new(&exe)
            .arg("worker")
            .args([
                &url,
                &path(&ledger_path),
                &path(&events_path),
                &path(&effects_path),
            ])
            .arg(rng.next().to_string())
            .stdin(Stdio::null())
            .spawn()
    };
    let started = Instant::now();
    let mut killed = 0;
    let mut completed = 0;
    while killed < kills {
        let mut child = spawn(&mut rng)?;
        let after = Duration::from_millis(30 + rng.below(250));
        let deadline = Instant::now() + after;
        // Poll the child's exit: `try_wait` does not block, so the kill lands at the chosen moment.
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match status {
            None => {
                child.kill()?; // SIGKILL
                child.wait()?;
                killed += 1;
            }
            Some(status) if status.success() => {
                // It finished before the kill: give it more to do.
                completed += 1;
                model.extend(&mut rng, &events_path)?;
            }
            Some(status) => return Err(format!("a worker failed on its own: {status}").into()),
        }
    }
    let status = spawn(&mut rng)?.wait()?;
    if !status.success() {
        return Err(format!("the last worker failed: {status}").into());
    }
    println!(
        "kill9: {killed} workers killed, {completed} ran to the end before their kill, 1 drained the rest, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    check(&model, &store, &ledger_path, &effects_path).await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn number(i: usize) -> String {
    format!("ACC-{:05}", 10_001 + i)
}

fn account_guid(seed_guid: Uuid, i: usize) -> Uuid {
    Uuid::from_u128(seed_guid.as_u128() ^ i as u128)
}

/// Writes the event log: accounts in several versions (some deleted at the end), contacts, poison events and
/// redeliveries, shuffled, so stale and duplicate events occur.
fn generate(rng: &mut Rng, path: &Path) -> BoxResult<Model> {
    let mut model = Model::default();
    model.extend(rng, path)?;
    Ok(model)
}

impl Model {
    /// Appends a round of changes to the log (new versions of every record), updating the model.
    fn extend(&mut self, rng: &mut Rng, path: &Path) -> BoxResult<()> {
        let round = self.lines as u64; // later rounds get higher versions
        let base = Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0000);
        let mut events = Vec::new();
        for i in 0..ACCOUNTS {
            let id = account_guid(base, i);
            let reference = EntityRef::by_id("account", id)?;
            let versions = 1 + rng.below(4);
            let mut fields = None;
            for v in 1..=versions {
                let phone = format!("+1 555 {:04}", rng.below(10_000));
                let record = Record::builder(reference.clone())
                    .field("name", format!("Account {i} v{v}"))
                    .field("accountnumber", number(i))
                    .field("telephone1", phone.clone())
                    .build()?;
                events.push(ChangeEvent::upsert("us", &record, round * 10 + v));
                let mut f = BTreeMap::new();
                f.insert("name".to_owned(), json!(format!("Account {i} v{v}")));
                f.insert("accountnumber".to_owned(), json!(number(i)));
                f.insert("telephone1".to_owned(), json!(phone));
                fields = Some(f);
            }
            // Accounts the LOB app references, and those synced contacts reference, are never deleted.
            if i >= LOB_ACCOUNTS && i % 10 == 7 && rng.below(2) == 0 {
                events.push(ChangeEvent::delete(
                    "us",
                    &reference,
                    round * 10 + versions + 1,
                ));
                fields = None;
            }
            self.accounts.insert(id, fields);
        }
        for i in 0..CONTACTS {
            let id = Uuid::from_u128(0xc0_0000_0000 + i as u128);
            // Synced contacts reference accounts the LOB app does not, and never deleted ones (i % 10 != 7).
            let mut parent = LOB_ACCOUNTS + rng.below((ACCOUNTS - LOB_ACCOUNTS) as u64) as usize;
            if parent % 10 == 7 {
                parent += 1;
            }
            let parent = account_guid(base, parent.min(ACCOUNTS - 1));
            let mut fields = BTreeMap::new();
            fields.insert(
                "fullname".to_owned(),
                json!(format!("Contact {i} r{round}")),
            );
            fields.insert(
                "emailaddress1".to_owned(),
                json!(format!("c{i}@example.com")),
            );
            let record = Record::builder(EntityRef::by_id("contact", id)?)
                .field("fullname", format!("Contact {i} r{round}"))
                .field("emailaddress1", format!("c{i}@example.com"))
                .lookup("parentcustomerid", EntityRef::by_id("account", parent)?)
                .build()?;
            events.push(ChangeEvent::upsert("us", &record, round * 10 + 1));
            self.contacts.insert(id, (fields, parent));
        }
        for _ in 0..POISON {
            // A table the target does not have: dead-lettered, permanently.
            let record = Record::builder(EntityRef::by_id("invoice", rng.guid())?)
                .field("name", "poison")
                .build()?;
            let event = ChangeEvent::upsert("us", &record, 1);
            self.poison.insert(event.event_id.clone());
            events.push(event);
        }
        // Redeliveries: the same event (same id) again, later in the log.
        for _ in 0..events.len() / 20 {
            let again = events[rng.below(events.len() as u64) as usize].clone();
            events.push(again);
        }
        // Shuffle (Fisher-Yates): versions arrive out of order, so some are stale.
        for i in (1..events.len()).rev() {
            events.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        for event in &events {
            writeln!(file, "{}", serde_json::to_string(event)?)?;
        }
        file.sync_all()?;
        self.lines += events.len();
        Ok(())
    }
}

async fn check(
    model: &Model,
    store: &DataverseStore,
    ledger: &Path,
    effects: &Path,
) -> BoxResult<()> {
    let mut problems = Vec::new();
    let ledger = SqliteLedger::open(ledger).await?;

    // 1. The target equals the source on sync-owned fields; one row per source record.
    let accounts = store.records(&TableName::new("account")?).await?;
    let mut by_number: BTreeMap<String, usize> = BTreeMap::new();
    for account in &accounts {
        if let Some(n) = account
            .record
            .field("accountnumber")
            .and_then(Value::as_str)
        {
            *by_number.entry(n.to_owned()).or_default() += 1;
        }
    }
    for (i, (id, fields)) in model.accounts.iter().enumerate() {
        let n = number(i);
        let found = store
            .read(&EntityRef::by_key(
                "account",
                [("accountnumber", n.as_str())],
            )?)
            .await?;
        match (fields, found) {
            (None, Some(_)) => problems.push(format!("account {id} ({n}) was deleted but exists")),
            (Some(_), None) => problems.push(format!("account {id} ({n}) is missing")),
            (Some(fields), Some(row)) => {
                for (field, want) in fields {
                    if row.record.field(field) != Some(want) {
                        problems.push(format!(
                            "account {n}: {field} is {:?}, want {want}",
                            row.record.field(field)
                        ));
                    }
                }
                if row.record.is_placeholder() {
                    problems.push(format!("account {n} is still a placeholder"));
                }
            }
            (None, None) => {}
        }
        if by_number.get(&n).copied().unwrap_or(0) > 1 {
            problems.push(format!("account {n} has {} rows", by_number[&n]));
        }
    }
    for (id, (fields, parent)) in &model.contacts {
        let Some(row) = store.read(&EntityRef::by_id("contact", *id)?).await? else {
            problems.push(format!("contact {id} is missing"));
            continue;
        };
        for (field, want) in fields {
            if row.record.field(field) != Some(want) {
                problems.push(format!(
                    "contact {id}: {field} is {:?}, want {want}",
                    row.record.field(field)
                ));
            }
        }
        let lookup = row.record.lookups.get("parentcustomerid");
        if lookup != Some(&EntityRef::by_id("account", *parent)?) {
            problems.push(format!(
                "contact {id}: parent is {lookup:?}, want account {parent}"
            ));
        }
    }

    // 2. Every line of the log accounted exactly once, over every run.
    let totals = ledger.totals().await?;
    if totals.received != model.lines as u64 || !totals.is_accounted() {
        problems.push(format!(
            "the log has {} lines; the ledger's totals: {totals}",
            model.lines
        ));
    }
    if totals.dead_lettered != model.poison.len() as u64 {
        problems.push(format!(
            "{} poison events, {} dead-lettered (a dead letter counted twice or lost)",
            model.poison.len(),
            totals.dead_lettered
        ));
    }

    // 3. Every deferred task ran, its effect visible exactly once.
    let effects = std::fs::read_to_string(effects).unwrap_or_default();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for line in effects.lines() {
        *seen.entry(line).or_default() += 1;
    }
    for key in &model.tasks {
        if seen.get(key.as_str()) != Some(&1) {
            problems.push(format!(
                "task {key}: its effect is there {:?} times",
                seen.get(key.as_str())
            ));
        }
    }
    for task in ledger.tasks(usize::MAX).await? {
        if task.status != TaskStatus::Done {
            problems.push(format!(
                "task {} is {:?}: {:?}",
                task.id, task.status, task.last_error
            ));
        }
    }

    // 4. The dead letters are the poison events, with their payloads.
    let letters = ledger.dead_letters(usize::MAX).await?;
    let ids: BTreeSet<String> = letters.iter().map(|l| l.event.event_id.clone()).collect();
    if ids != model.poison {
        problems.push(format!(
            "dead letters {ids:?}, poison events {:?}",
            model.poison
        ));
    }
    for letter in &letters {
        if letter.event.table.as_str() != "invoice" || !letter.error.contains("invoice") {
            problems.push(format!(
                "dead letter without its payload or reason: {letter:?}"
            ));
        }
    }
    println!("kill9: totals over every run: {totals}");
    match problems.is_empty() {
        true => Ok(()),
        false => {
            let shown: Vec<&String> = problems.iter().take(20).collect();
            Err(format!(
                "{} problems:\n  {}",
                problems.len(),
                shown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("\n  ")
            )
            .into())
        }
    }
}
