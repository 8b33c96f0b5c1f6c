//! # Contoso: a line-of-business app that keeps working while the US → EU sync is down
//!
//! Contoso's US Dataverse instance is replicated to a Europe (EU) instance by a sync job. A line-of-business (LOB)
//! app writes to EU records that *reference* US accounts (contacts by the account's GUID, orders by its account
//! number). While the sync is down or behind, EU answers "record does not exist" and the LOB request fails.
//!
//! The story is played twice, in one process, with the same seeded data. Run 1: plain writes. Run 2:
//! ensure-then-write: the LOB app and the sync write through an `EnsuringWriter`, which first makes every
//! referenced record exist (a *placeholder* holding only its key); the sync's full writes later *hydrate* the
//! placeholders, and invoices that need a placeholder's phone number are deferred by a guard, durably, into the
//! ledger, and sent by the sync worker once the customer is hydrated. Each run has four phases: initial load,
//! outage (the sync stops; US keeps changing and the LOB app keeps writing to EU; the worker process restarts),
//! sync resumes (while EU throttles its first calls; the worker restarts once more after its first batch), verify.
//!
//! The sync job is the crate's `sync::SyncWorker`: US publishes its changes as versioned events to a change log
//! (a JSON-lines file), and the worker applies them to EU idempotently and in order, with retries and a dead-letter
//! queue, keeping its checkpoint, dead letters, id map and deferred invoices in a `SqliteLedger` file. A restart
//! rebuilds the worker from that file alone, and the verdict checks that the ledger's totals account for every
//! change exactly once. The ledger lives in a temporary directory; `-- --ledger PATH` keeps run 2's ledger at
//! `PATH` (and its change log beside it). Both instances are Dataverse emulators on loopback, written through
//! `DataverseStore` over HTTP (the whole scenario takes a few seconds); `cargo run --example contoso -- --memory`
//! plays it on in-memory stores instead.
//!
//! `cargo run --example contoso` exits with status 1 if run 2 loses a LOB request or does not converge, or if
//! run 1 loses none (then the scenario did not exercise missing references at all).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use dataverse_emulator::{EmulatedTable, Emulator, EmulatorConfig};
use eventual_upsert::dataverse::{DataverseConfig, DataverseStore, DataverseTable};
use eventual_upsert::memory::{Fault, MemoryStore};
use eventual_upsert::schema::{ColumnType, Schema, TableSchema};
use eventual_upsert::sync::{
    Applier, ChangeEvent, JsonLinesSource, Ledger, SqliteLedger, SyncStats, SyncWorker,
    TaskContext, TaskHandlers, TaskQueue, TaskRunner, TaskStatus, WorkerSettings, WorkerStats,
};
use eventual_upsert::{
    EnsuringWriter, EntityRef, Error, HydratedRecord, Key, KeyKind, PlaceholderAction, Policies,
    Proceed, Record, RecordStore, Result, RetryPolicy, StoredRecord, TableName, TablePolicy, Write,
};
use serde_json::json;
use uuid::Uuid;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const SEED: u64 = 0xC0_7050; // change it to play the story with other data
const INITIAL_ACCOUNTS: usize = 120;
const INITIAL_CONTACTS: usize = 240;
const OUTAGE_ACCOUNTS: usize = 80;
const OUTAGE_CONTACTS: usize = 160;
const LOB_CONTACTS: usize = 150;
const LOB_ORDERS: usize = 100;

const SYNC_CHUNK: usize = 64; // changes the sync writes per batch
const MAX_ATTEMPTS: u32 = 6; // tries per write before a transient error counts as a failure
const BASE_BACKOFF: Duration = Duration::from_millis(10); // if the store does not say; doubled per try
const THROTTLED_CALLS: u32 = 3; // EU throttles the resumed sync's first calls,
const RETRY_AFTER: Duration = Duration::from_millis(20); // asking for this wait

const ACCOUNT: &str = "account";
const ACCOUNT_NUMBER: &str = "accountnumber";
const PHONE: &str = "telephone1";
const PARENT: &str = "parentcustomerid"; // contact → account
const CUSTOMER: &str = "customerid"; // order → account
const SEND_INVOICE: &str = "send_invoice"; // the guarded operation: invoice an order to its customer's phone
const PAD: &str = "                   "; // indents report lines under the phase names

/// The same three tables on both instances. Declaring columns makes a table strict: a misspelt field is an error.
fn contoso_schema() -> Result<Schema> {
    Schema::new([
        TableSchema::builder(ACCOUNT)
            .primary_name("name")
            .alternate_key([(ACCOUNT_NUMBER, KeyKind::String)])
            .column(PHONE, ColumnType::String)
            .column("address1_country", ColumnType::String)
            .column("revenue", ColumnType::Decimal)
            .build()?,
        TableSchema::builder("contact")
            .primary_name("fullname")
            .lookup(PARENT, ACCOUNT)
            .column("emailaddress1", ColumnType::String)
            .column("jobtitle", ColumnType::String)
            .build()?,
        TableSchema::builder("salesorder")
            .primary_name("name")
            .alternate_key([("ordernumber", KeyKind::String)])
            .lookup(CUSTOMER, ACCOUNT)
            .column("totalamount", ColumnType::Decimal)
            .build()?,
    ])
}

/// What an account placeholder holds (its key and a visible label) and what may be done with one: invoicing
/// needs the real phone number, so it waits for the sync.
fn contoso_policies() -> Result<Policies> {
    let account = TablePolicy::builder()
        .primary_name("name")
        .label("Pending sync")
        .on_placeholder(SEND_INVOICE, PlaceholderAction::Defer);
    Policies::builder().table(ACCOUNT, account).build()
}

/// Command-line options: `--memory` (in-memory stores instead of emulators over HTTP), `--ledger PATH` (keep the
/// ensure-then-write run's ledger file there instead of in a temporary directory).
struct Options {
    http: bool,
    ledger: Option<PathBuf>,
}

fn options() -> BoxResult<Options> {
    let mut options = Options {
        http: true,
        ledger: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--memory" => options.http = false,
            "--ledger" => {
                let path = PathBuf::from(args.next().ok_or("--ledger needs a path")?);
                if path.exists() {
                    return Err(format!(
                        "--ledger {}: the file exists; contoso starts from an empty ledger (remove it or pick another path)",
                        path.display()
                    )
                    .into());
                }
                options.ledger = Some(path);
            }
            other => {
                return Err(format!(
                    "unknown argument '{other}' (usage: contoso [--memory] [--ledger PATH])"
                )
                .into());
            }
        }
    }
    Ok(options)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = options()?;
    let data = Dataset::generate(SEED)?;
    let accounts = INITIAL_ACCOUNTS + OUTAGE_ACCOUNTS;
    let (contacts, requests) = (INITIAL_CONTACTS + OUTAGE_CONTACTS, data.lob.len());
    let over = match options.http {
        true => "Dataverse emulators on loopback, over HTTP",
        false => "in-memory stores",
    };
    println!(
        "Contoso US → EU: {accounts} US accounts, {contacts} US contacts, {requests} LOB requests (seed {SEED:#x}; {over})"
    );
    let dir = std::env::temp_dir().join(format!("contoso-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    println!("\nRun 1: plain writes");
    let (lost, plain_ok) = run(false, &data, options.http, &dir.join("plain")).await?;
    println!("\nRun 2: ensure-then-write");
    let ledger = options
        .ledger
        .clone()
        .unwrap_or_else(|| dir.join("ensure-then-write.ledger"));
    let (_, ensured_ok) = run(true, &data, options.http, &ledger).await?;
    std::fs::remove_dir_all(&dir)?;
    if !(plain_ok && ensured_ok) {
        println!("\nResult: FAILED (see the verdicts above).");
        std::process::exit(1);
    }
    println!(
        "\nResult: OK: ensure-then-write turned {lost} failed LOB requests into 0, and EU converged with US."
    );
    Ok(())
}

/// Plays the whole story once, on fresh US and EU stores and a fresh ledger file at `ledger`, and prints it.
/// Returns how many LOB requests failed, and whether the run did what it must: lose LOB requests with plain
/// writes, lose nothing with ensure-then-write.
async fn run(
    ensure_then_write: bool,
    data: &Dataset,
    http: bool,
    ledger: &Path,
) -> BoxResult<(usize, bool)> {
    let us_instance = Instance::start("us", http).await?;
    let us = Us {
        store: us_instance.store(),
        log: ledger.with_extension("changes.jsonl"),
    };
    let eu_instance = Instance::start("eu", http).await?;
    let eu_store = eu_instance.store();
    let policies = Arc::new(contoso_policies()?);
    let eu = match ensure_then_write {
        false => Eu::Plain(eu_store.clone()),
        true => Eu::Ensuring(
            EnsuringWriter::new(eu_store.clone()).with_policy(Policies::clone(&policies)),
        ),
    };
    // The LOB service and the sync worker share the ledger file, as two processes would: the LOB app defers
    // invoices into it, the worker sends them.
    let lob_ledger = Arc::new(SqliteLedger::open(ledger).await?);
    let mut lob = LobApp::new(&eu, policies.clone(), TaskQueue::new(lob_ledger.clone()))?;
    // With ensure-then-write the sync shares the LOB app's writer (so the LOB's `on_hydrated` hook sees the
    // sync's hydrations); with plain writes it has a writer of its own.
    let sync_writer = match &eu {
        Eu::Ensuring(writer) => writer.clone(),
        Eu::Plain(store) => {
            EnsuringWriter::new(store.clone()).with_policy(Policies::clone(&policies))
        }
    };
    let mut sync = Sync {
        ledger: ledger.to_path_buf(),
        log: us.log.clone(),
        writer: sync_writer,
        invoiced: lob.invoiced_later.clone(),
        worker: None,
    };

    // 1. Initial load: everything US holds reaches EU.
    sync.start().await?;
    let (initial, outage) = data.us.split_at(INITIAL_ACCOUNTS + INITIAL_CONTACTS);
    us.save(initial).await?;
    let load = sync.drain().await?;
    let synced = load.replicated;
    println!("  1 initial load   {synced} changes replicated to EU");

    // 2. Outage: the sync stops. US keeps changing (the changes queue up in its change log) and the LOB app keeps
    //    writing to EU.
    sync.stop();
    us.save(outage).await?;
    let queued = outage.len();
    println!("  2 outage         sync stopped: {queued} US changes queued, not replicated");
    lob.submit_all(&eu, &data.lob).await;
    let (failed, accepted) = (lob.failed.values().sum(), lob.accepted.len());
    let total = failed + accepted;
    println!("{PAD}LOB app: {total} requests, {accepted} succeeded, {failed} failed");
    for (reason, n) in &lob.failed {
        println!("{PAD}! {n} × {reason}");
    }
    let (by_guid, by_number, deferred) = (lob.by_guid, lob.by_number, lob.deferred);
    if ensure_then_write {
        let (placeholders, now) = (by_guid + by_number, lob.invoiced_now);
        println!(
            "{PAD}placeholders created: {placeholders} accounts ({by_guid} by GUID, {by_number} by account number)"
        );
        println!(
            "{PAD}invoices: {now} sent now, {deferred} deferred durably in the ledger (customer still a placeholder)"
        );
    }
    // The worker process restarts while the sync is down (a deploy): everything it needs is in the ledger file.
    sync.start().await?;
    let restarted = sync.state().await?;
    println!(
        "{PAD}worker restarted from {}: checkpoint at byte {} of {}, {} tasks pending, {} dead letters",
        ledger
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("the ledger"),
        restarted.checkpoint,
        restarted.log_bytes,
        restarted.pending_tasks,
        restarted.dead_letters
    );

    // 3. The sync resumes and drains its queue, while EU throttles its first calls; the worker is restarted once
    //    more after its first batch, and carries on from the checkpoint that batch settled.
    eu_instance.throttle_next(THROTTLED_CALLS);
    let first = sync.step().await?;
    sync.stop();
    sync.start().await?;
    let rest = sync.drain().await?;
    let resume = SyncReport {
        replicated: first.replicated + rest.replicated,
        retried: first.retried + rest.retried,
        errors: [first.errors, rest.errors].concat(),
        invoices_sent: first.invoices_sent + rest.invoices_sent,
    };
    let replicated = resume.replicated;
    // Over HTTP the store retries throttled requests itself (honouring Retry-After); in memory the applier does.
    let retried = resume.retried + eu_instance.requests_retried();
    let errors = [load.errors, resume.errors].concat();
    let error_count = errors.len();
    println!(
        "  3 sync resumes   {replicated} changes replicated (worker restarted after its first batch); {retried} re-sent after throttling; {error_count} permanent errors"
    );
    for error in errors.iter().take(2) {
        println!("{PAD}! {error}");
    }
    let (hydrated, sent) = (lob.hydrated.load(Relaxed), lob.invoiced_later.load(Relaxed));
    let pending = sync.state().await?.pending_tasks;
    if ensure_then_write {
        println!(
            "{PAD}{hydrated} placeholders hydrated (on_hydrated hook); {sent} deferred invoices sent by the worker, {pending} pending"
        );
    }
    let totals = sync.state().await?.totals;
    sync.stop();

    // 4. Verify (reading EU as it is, without injected faults), then judge the run.
    eu_instance.restore();
    let differences = verify(&us_instance, &eu_instance, &lob.accepted).await?;
    let placeholders = by_guid + by_number;
    let changes = (INITIAL_ACCOUNTS + INITIAL_CONTACTS + queued) as u64;
    let checks = [
        (failed == 0, "LOB requests failed"),
        (errors.is_empty(), "the sync hit permanent errors"),
        (replicated == queued as u64, "queued changes were lost"),
        (
            totals.received == changes && totals.is_accounted(),
            "the ledger's totals do not account for every change exactly once",
        ),
        (differences == 0, "EU differs from what it should hold"),
        (hydrated == placeholders, "placeholders not hydrated"),
        (sent == deferred && pending == 0, "invoices not sent"),
    ];
    // Run 1 is only reported, but it must lose LOB requests: else the outage exercised nothing.
    let problems: Vec<&str> = match ensure_then_write {
        true => checks.iter().filter(|c| !c.0).map(|c| c.1).collect(),
        false if failed == 0 => vec!["no LOB request failed: no missing reference was hit"],
        false => vec![],
    };
    let verdict = if !problems.is_empty() {
        format!("FAILED: {}", problems.join("; "))
    } else if ensure_then_write {
        format!(
            "OK: every LOB request succeeded, every placeholder was hydrated, EU equals US; the ledger accounts for all {changes} changes once"
        )
    } else {
        format!("{failed} of {total} LOB requests FAILED while the sync was behind")
    };
    println!("  verdict          {verdict}");
    Ok((failed, problems.is_empty()))
}

// --- Seeded data -----------------------------------------------------------------------------------------------
/// splitmix64, a tiny seeded generator. Writing it here keeps the example free of a `rand` dependency, and the
/// fixed seed makes every run generate the same records (GUIDs included) and print the same report.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (the modulo bias is irrelevant at these sizes).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn pick(&mut self, items: &[&'static str]) -> &'static str {
        items[self.below(items.len())]
    }

    fn guid(&mut self) -> Uuid {
        Uuid::from_u128((u128::from(self.next_u64()) << 64) | u128::from(self.next_u64()))
    }
}

const COMPANIES: [&str; 4] = ["Fabrikam", "Northwind", "Tailspin", "Woodgrove"];
const SUFFIXES: [&str; 5] = ["GmbH", "SARL", "BV", "AB", "Ltd"];
const COUNTRIES: [&str; 5] = ["Germany", "France", "Sweden", "Ireland", "Spain"];
const FIRST_NAMES: [&str; 6] = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald"];
const LAST_NAMES: [&str; 5] = ["Lovelace", "Hopper", "Turing", "Liskov", "Knuth"];
const JOB_TITLES: [&str; 5] = ["Buyer", "CFO", "Engineer", "Office manager", "Sales lead"];

/// A record the LOB app writes to EU, and the number of the account its lookup must resolve to.
#[derive(Clone, Debug)]
struct LobRequest {
    record: Record,
    account: String,
}

/// Everything both runs write, generated once so that both runs see identical data.
struct Dataset {
    /// US records in creation order: the initial accounts, their contacts, then the accounts and contacts created
    /// during the outage.
    us: Vec<Record>,
    /// LOB writes during the outage: contacts (parent by GUID), then orders (customer by account number).
    lob: Vec<LobRequest>,
}

impl Dataset {
    fn generate(seed: u64) -> Result<Self> {
        let mut rng = SplitMix64(seed);
        let mut accounts = Vec::new();
        for i in 0..INITIAL_ACCOUNTS + OUTAGE_ACCOUNTS {
            accounts.push(account(&mut rng, i)?);
        }
        let mut contacts = Vec::new();
        for i in 0..INITIAL_CONTACTS + OUTAGE_CONTACTS {
            let parent = match i < INITIAL_CONTACTS {
                true => rng.below(INITIAL_ACCOUNTS),
                false => INITIAL_ACCOUNTS + rng.below(OUTAGE_ACCOUNTS), // outage contacts, outage accounts
            };
            contacts.push(contact(&mut rng, "us", i, &accounts[parent])?);
        }
        // A missing account must be referenced one way only (see "Address a record one way" in the README), so
        // the LOB app references even-indexed accounts by GUID and odd-indexed ones by account number. Both sets
        // mix accounts synced before the outage with accounts created during it.
        let (pairs, mut lob) = (accounts.len() / 2, Vec::new());
        for i in 0..LOB_CONTACTS {
            let parent = 2 * rng.below(pairs);
            let record = contact(&mut rng, "lob", i, &accounts[parent])?;
            let account = account_number(parent);
            lob.push(LobRequest { record, account });
        }
        for i in 0..LOB_ORDERS {
            let customer = 2 * rng.below(pairs) + 1;
            let (number, account) = (format!("SO-{:05}", 20_001 + i), account_number(customer));
            let order = EntityRef::by_key("salesorder", [("ordernumber", number.as_str())])?;
            let record = Record::builder(order)
                .field("name", format!("Order {number}"))
                .field("totalamount", rng.below(500_000) as f64 / 100.0)
                .lookup(CUSTOMER, account_by_number(&account)?)
                .build()?;
            lob.push(LobRequest { record, account });
        }
        let late_accounts = accounts.split_off(INITIAL_ACCOUNTS);
        let late_contacts = contacts.split_off(INITIAL_CONTACTS);
        let us = [accounts, contacts, late_accounts, late_contacts].concat();
        Ok(Self { us, lob })
    }
}

/// The `i`-th account as US stores it: addressed by its GUID, the account number is a field.
fn account(rng: &mut SplitMix64, i: usize) -> Result<Record> {
    let id = EntityRef::by_id(ACCOUNT, rng.guid())?;
    let name = format!("{} {} {i:03}", rng.pick(&COMPANIES), rng.pick(&SUFFIXES));
    Record::builder(id)
        .field("name", name)
        .field(ACCOUNT_NUMBER, account_number(i))
        .field(PHONE, format!("+1 555 {:04}", rng.below(10_000)))
        .field("address1_country", rng.pick(&COUNTRIES))
        .field("revenue", (rng.below(9_000) + 100) as f64 * 1_000.0)
        .build()
}

/// A contact whose parent account is referenced by GUID.
fn contact(rng: &mut SplitMix64, source: &str, i: usize, parent: &Record) -> Result<Record> {
    let (first, last) = (rng.pick(&FIRST_NAMES), rng.pick(&LAST_NAMES));
    let email = format!("{first}.{last}.{source}{i}@example.com").to_lowercase();
    Record::builder(EntityRef::by_id("contact", rng.guid())?)
        .field("fullname", format!("{first} {last}"))
        .field("emailaddress1", email)
        .field("jobtitle", rng.pick(&JOB_TITLES))
        .lookup(PARENT, parent.reference.clone())
        .build()
}

fn account_number(i: usize) -> String {
    format!("ACC-{:05}", 10_001 + i)
}

fn account_by_number(number: &str) -> Result<EntityRef> {
    EntityRef::by_key(ACCOUNT, [(ACCOUNT_NUMBER, number)])
}

/// The number an account record holds.
fn number(account: &Record) -> Option<&str> {
    account.field(ACCOUNT_NUMBER)?.as_str()
}

fn not_found(reference: &EntityRef) -> Error {
    let reference = Box::new(reference.clone());
    Error::NotFound { reference }
}

/// The number of the account that `record`'s `lookup` points at in `store` (`None` if it points nowhere).
async fn parent_of(
    store: &dyn RecordStore,
    record: &Record,
    lookup: &str,
) -> Result<Option<String>> {
    let Some(target) = record.lookups.get(lookup) else {
        return Ok(None);
    };
    let account = store.read(target).await?;
    Ok(account.and_then(|a| number(&a.record).map(str::to_owned)))
}

// --- The US instance and the sync job --------------------------------------------------------------------------
/// The US instance: a store whose every write is also published to its change log, a JSON-lines file the sync
/// worker reads with `JsonLinesSource`. The log is durable, so a restarted worker resumes from the checkpoint its
/// ledger settled with the last batch.
struct Us {
    store: Arc<dyn RecordStore>,
    log: PathBuf,
}

impl Us {
    async fn save(&self, records: &[Record]) -> BoxResult<()> {
        let mut lines = String::new();
        for record in records {
            let written = self.store.write(&Write::upsert(record.clone())).await?;
            let event = ChangeEvent::upsert(
                "us",
                &self.eu_record(record.clone()).await?,
                written.version.0,
            );
            lines.push_str(&serde_json::to_string(&event)?);
            lines.push('\n');
        }
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        std::io::Write::write_all(&mut log, lines.as_bytes())?;
        Ok(())
    }

    /// The change as EU should apply it: the same GUID and fields, and the parent lookup addressed by account
    /// number. Why: an account the LOB app referenced by number during the outage got a placeholder under an EU
    /// GUID of its own, which the sync hydrates, so the account keeps that EU GUID; its number is the same on both
    /// instances.
    async fn eu_record(&self, mut record: Record) -> Result<Record> {
        if let Some(parent) = record.lookups.get_mut(PARENT) {
            let account = self.store.read(parent).await?;
            let number = account.as_ref().and_then(|a| number(&a.record));
            *parent = account_by_number(number.ok_or_else(|| not_found(parent))?)?;
        }
        Ok(record)
    }
}

/// What the sync did in a step or a drain.
#[derive(Debug, Default)]
struct SyncReport {
    replicated: u64,
    retried: u64,        // writes sent again after a transient failure
    errors: Vec<String>, // events dead-lettered: reported, never lost
    invoices_sent: u64,
}

/// What the ledger file says, read back.
struct LedgerState {
    checkpoint: u64,
    log_bytes: u64,
    pending_tasks: usize,
    dead_letters: usize,
    totals: SyncStats,
}

/// The US → EU sync worker as a process would run it: the crate's `SyncWorker` (JSON-lines source, applier,
/// deferred-task runner) over the ledger file. `stop` drops it (a process exit); `start` builds it again from the
/// file, as a restarted process does.
struct Sync {
    ledger: PathBuf,
    log: PathBuf,
    writer: EnsuringWriter,
    invoiced: Arc<AtomicUsize>,
    worker: Option<(SyncWorker, Arc<SqliteLedger>)>,
}

impl Sync {
    async fn start(&mut self) -> BoxResult<()> {
        let ledger = Arc::new(SqliteLedger::open(&self.ledger).await?);
        let applier = Applier::builder(self.writer.clone(), ledger.clone())
            .identity("sync-us-eu")
            .retry(RetryPolicy {
                initial_backoff: BASE_BACKOFF,
                max_attempts: MAX_ATTEMPTS,
                jitter_seed: Some(SEED),
                ..RetryPolicy::default()
            })
            .build(None)?;
        // The deferred invoices: the guard already let the task through (the customer is hydrated), so the phone
        // number is there.
        let invoiced = self.invoiced.clone();
        let send = move |task: TaskContext| {
            let invoiced = invoiced.clone();
            async move {
                let phone = task.record.record.field(PHONE).and_then(|p| p.as_str());
                if phone.is_some() {
                    invoiced.fetch_add(1, Relaxed);
                }
                Ok(())
            }
        };
        let tasks = TaskRunner::new(
            ledger.clone(),
            self.writer.store().clone(),
            self.writer.policy().clone(),
            TaskHandlers::new().register(SEND_INVOICE, send),
        );
        let source = Arc::new(JsonLinesSource::new("us", &self.log));
        let worker = SyncWorker::builder(source, applier)
            .tasks(tasks)
            .settings(WorkerSettings {
                batch_size: SYNC_CHUNK,
                ..WorkerSettings::default()
            })
            .build();
        self.worker = Some((worker, ledger));
        Ok(())
    }

    fn stop(&mut self) {
        self.worker = None;
    }

    fn running(&self) -> BoxResult<&(SyncWorker, Arc<SqliteLedger>)> {
        Ok(self
            .worker
            .as_ref()
            .ok_or("the sync worker is not running")?)
    }

    /// One batch (and the tasks it made due).
    async fn step(&self) -> BoxResult<SyncReport> {
        let (worker, _) = self.running()?;
        let before = worker.stats();
        worker.run_once().await?;
        self.report(&before).await
    }

    /// Batches until the change log is drained and no deferred task is due.
    async fn drain(&self) -> BoxResult<SyncReport> {
        let (worker, _) = self.running()?;
        let before = worker.stats();
        loop {
            let turn = worker.run_once().await?;
            if turn.events == 0 && turn.tasks == 0 {
                return self.report(&before).await;
            }
        }
    }

    async fn report(&self, before: &WorkerStats) -> BoxResult<SyncReport> {
        let (worker, ledger) = self.running()?;
        let now = worker.stats();
        let new_letters = (now.sync.dead_lettered - before.sync.dead_lettered) as usize;
        let mut letters = ledger.dead_letters(usize::MAX).await?;
        letters.sort_by_key(|l| std::cmp::Reverse(l.last_failed_ms));
        Ok(SyncReport {
            replicated: now.sync.applied - before.sync.applied,
            retried: now.sync.retried - before.sync.retried,
            errors: letters
                .into_iter()
                .take(new_letters)
                .map(|l| l.error)
                .collect(),
            invoices_sent: now.tasks.done - before.tasks.done,
        })
    }

    async fn state(&self) -> BoxResult<LedgerState> {
        let (_, ledger) = self.running()?;
        let checkpoint = ledger.checkpoint("us").await?.unwrap_or_default();
        let tasks = ledger.tasks(usize::MAX).await?;
        Ok(LedgerState {
            checkpoint: checkpoint.parse().unwrap_or(0),
            log_bytes: std::fs::metadata(&self.log).map_or(0, |m| m.len()),
            pending_tasks: tasks
                .iter()
                .filter(|t| t.status == TaskStatus::Pending)
                .count(),
            dead_letters: ledger.dead_letter_count().await?,
            totals: ledger.totals().await?,
        })
    }
}

/// How EU is written to in a run, by the sync and the LOB app alike.
#[derive(Clone, Debug)]
enum Eu {
    /// Straight to the store: a write whose lookup target is missing fails.
    Plain(Arc<dyn RecordStore>),
    /// Missing lookup targets get a placeholder first. One writer for the sync and the LOB app, because hooks are
    /// in-process: the invoices the LOB app defers must be registered where the sync's hydrating writes go.
    Ensuring(EnsuringWriter),
}

// --- The line-of-business app ----------------------------------------------------------------------------------
/// The LOB app: writes to EU records that reference US accounts, invoices orders, and counts what happens.
#[derive(Debug, Default)]
struct LobApp {
    tasks: Option<TaskQueue>,
    accepted: Vec<LobRequest>,
    failed: BTreeMap<&'static str, usize>, // failed requests by reason
    by_guid: usize,                        // placeholders created for a reference by GUID,
    by_number: usize,                      // and by account number
    invoiced_now: usize,
    deferred: usize,
    hydrated: Arc<AtomicUsize>, // placeholders the sync hydrated, counted by a hook
    invoiced_later: Arc<AtomicUsize>, // deferred invoices sent, counted by the deferred tasks
}

impl LobApp {
    fn new(eu: &Eu, _policies: Arc<Policies>, tasks: TaskQueue) -> Result<Self> {
        let app = Self {
            tasks: Some(tasks),
            ..Self::default()
        };
        if let Eu::Ensuring(writer) = eu {
            // "On create" logic belongs in this hook: it runs when an account first holds real data (created by
            // the sync, or a placeholder the sync hydrated). Here it counts the hydrated placeholders.
            let hydrated = app.hydrated.clone();
            let count = move |account: &HydratedRecord<'_>| {
                if account.was_placeholder() {
                    hydrated.fetch_add(1, Relaxed);
                }
            };
            writer.hooks().on_hydrated(&TableName::new(ACCOUNT)?, count);
        }
        Ok(app)
    }

    async fn submit_all(&mut self, eu: &Eu, requests: &[LobRequest]) {
        for request in requests {
            let record = request.record.clone();
            let result = match eu {
                // One upsert, which EU refuses while the referenced account has not been synced.
                Eu::Plain(store) => store.write(&Write::upsert(record)).await.map(drop),
                Eu::Ensuring(writer) => self.ensure_then_write(writer, record).await,
            };
            match result {
                Ok(()) => self.accepted.push(request.clone()),
                Err(err) => *self.failed.entry(failure_reason(&err)).or_default() += 1,
            }
        }
    }

    /// Ensures the referenced account exists (a placeholder if it is missing), writes, and invoices orders.
    async fn ensure_then_write(&mut self, writer: &EnsuringWriter, record: Record) -> Result<()> {
        let written = writer.write(record.clone()).await?;
        for (reference, _id) in written.ensured.placeholders() {
            match reference.key {
                Key::Id(_) => self.by_guid += 1,
                Key::Alternate(_) => self.by_number += 1,
            }
        }
        match record.lookups.get(CUSTOMER) {
            Some(customer) => self.send_invoice(writer, &record.reference, customer).await,
            None => Ok(()),
        }
    }

    /// Business logic that needs the customer's real data: invoice the order to the account's phone. The guard
    /// decides: a hydrated account is invoiced now; for a placeholder (no phone yet) the account policy says to
    /// defer, so the invoice is sent when the sync hydrates the account.
    async fn send_invoice(
        &mut self,
        writer: &EnsuringWriter,
        order: &EntityRef,
        customer: &EntityRef,
    ) -> Result<()> {
        let account = writer.store().read(customer).await?;
        let account = account.ok_or_else(|| not_found(customer))?;
        let guard = writer.guard(&account.record);
        match guard.check(SEND_INVOICE)? {
            Proceed::Now => {
                guard.require::<String>(PHONE)?;
                self.invoiced_now += 1;
            }
            Proceed::Deferred => {
                // Durable: the invoice waits in the ledger, not in this process's memory; the sync worker sends
                // it once the customer is hydrated, also if either process restarts in between.
                let tasks = self.tasks.as_ref().ok_or_else(|| not_found(customer))?;
                // One invoice per order: the order is the idempotency key.
                tasks
                    .defer_with_key(
                        format!("{SEND_INVOICE}:{order}"),
                        SEND_INVOICE,
                        account.record.table(),
                        account.id,
                        json!({"order": order.to_string()}),
                    )
                    .await?;
                self.deferred += 1;
            }
        }
        Ok(())
    }
}

/// A short name for why a LOB request failed.
fn failure_reason(err: &Error) -> &'static str {
    match err {
        Error::MissingReference { .. } => "MissingReference (\"record does not exist\")",
        err if err.is_retryable() => "transient",
        _ => "other",
    }
}

// --- Verification ----------------------------------------------------------------------------------------------
/// Checks that EU holds (a) no placeholder, (b) every US record with the same data, (c) every LOB write that
/// succeeded, intact. Prints what it checked and the first differences; returns how many it found.
async fn verify(us: &Instance, eu: &Instance, accepted: &[LobRequest]) -> BoxResult<usize> {
    let (us_store, eu_store) = (us.store(), eu.store());
    let mut found = Vec::new();
    let mut left = 0;
    for table in [ACCOUNT, "contact", "salesorder"] {
        let records = eu.records(table).await?;
        left += records.iter().filter(|r| r.record.is_placeholder()).count();
    }
    if left > 0 {
        found.push(format!("{left} placeholders are left in EU"));
    }
    // Each record EU must hold, with the number of the account its lookup (if any) must point at. Accounts are
    // found by number: those the LOB app referenced that way kept the EU GUID of their placeholder.
    let mut expected = Vec::new();
    for account in us.records(ACCOUNT).await? {
        let mut record = account.record;
        let number = number(&record).ok_or("a US account has no number")?;
        record.reference = account_by_number(number)?;
        expected.push((record, None));
    }
    for contact in us.records("contact").await? {
        let parent = parent_of(&*us_store, &contact.record, PARENT).await?;
        expected.push((contact.record, parent));
    }
    let us_checked = expected.len();
    for request in accepted {
        expected.push((request.record.clone(), Some(request.account.clone())));
    }
    for (record, parent) in &expected {
        let address = &record.reference;
        let Some(actual) = eu_store.read(address).await? else {
            found.push(format!("{address} is missing in EU"));
            continue;
        };
        for (field, want) in &record.fields {
            let got = actual.record.fields.get(field);
            if got != Some(want) {
                found.push(format!("{address}: {field} is {got:?}, expected {want}"));
            }
        }
        for lookup in record.lookups.keys() {
            let got = parent_of(&*eu_store, &actual.record, lookup.as_str()).await?;
            if got != *parent {
                found.push(format!(
                    "{address}: {lookup} is {got:?}, expected {parent:?}"
                ));
            }
        }
    }
    let (lob_checked, differences) = (accepted.len(), found.len());
    println!(
        "  4 verify         {left} placeholders left; {us_checked} US records and {lob_checked} accepted LOB writes checked: {differences} differences"
    );
    for difference in found.iter().take(3) {
        println!("{PAD}! {difference}");
    }
    Ok(differences)
}

// --- The instances ---------------------------------------------------------------------------------------------
/// One Contoso instance: a Dataverse emulator on loopback written through `DataverseStore` (the default), or an
/// in-memory store (`--memory`). The scenario only sees a `RecordStore`; these methods are its test harness.
enum Instance {
    Http {
        store: Arc<DataverseStore>,
        // Kept alive for the run: dropping it stops the server.
        emulator: Emulator,
    },
    Memory(Arc<MemoryStore>),
}

/// The boolean column that records, in Dataverse, whether a row is a placeholder.
const STATE_COLUMN: &str = "new_isplaceholder";

impl Instance {
    async fn start(name: &str, http: bool) -> BoxResult<Self> {
        let schema = contoso_schema()?;
        if !http {
            return Ok(Self::Memory(Arc::new(MemoryStore::new(schema).named(name))));
        }
        let emulator = Emulator::start(
            EmulatorConfig::new()
                .table(EmulatedTable::accounts())
                .table(EmulatedTable::contacts())
                .table(
                    EmulatedTable::new("salesorder", "salesorders", "salesorderid", "name")
                        .alternate_key(&["ordernumber"])
                        .lookup("customerid_account", CUSTOMER, ACCOUNT),
                ),
        )
        .await?;
        let store = DataverseConfig::new(emulator.base_url(), schema)
            .with_name(name)
            .with_retry(RetryPolicy {
                initial_backoff: BASE_BACKOFF,
                ..RetryPolicy::default()
            })
            .with_table(DataverseTable::new(ACCOUNT).with_state_column(STATE_COLUMN))
            .with_table(
                DataverseTable::new("contact")
                    .with_navigation(PARENT, "parentcustomerid_account")
                    .with_state_column(STATE_COLUMN),
            )
            .with_table(
                DataverseTable::new("salesorder")
                    .with_navigation(CUSTOMER, "customerid_account")
                    .with_state_column(STATE_COLUMN),
            )
            .build()?;
        Ok(Self::Http {
            store: Arc::new(store),
            emulator,
        })
    }

    fn store(&self) -> Arc<dyn RecordStore> {
        match self {
            Self::Http { store, .. } => store.clone(),
            Self::Memory(store) => store.clone(),
        }
    }

    async fn records(&self, table: &str) -> BoxResult<Vec<StoredRecord>> {
        let table = TableName::new(table)?;
        Ok(match self {
            Self::Http { store, .. } => store.records(&table).await?,
            Self::Memory(store) => store.records(&table)?,
        })
    }

    /// The instance throttles its next `calls` calls (HTTP: 429 with `Retry-After`).
    fn throttle_next(&self, calls: u32) {
        match self {
            Self::Http { emulator, .. } => emulator.faults().fail_next(calls, 429),
            Self::Memory(store) => store.faults().fail_next(
                calls,
                Fault::Throttled {
                    retry_after: RETRY_AFTER,
                },
            ),
        }
    }

    fn restore(&self) {
        match self {
            Self::Http { emulator, .. } => emulator.faults().clear(),
            Self::Memory(store) => store.faults().restore(),
        }
    }

    /// Requests the store itself sent again after a transient failure.
    fn requests_retried(&self) -> u64 {
        match self {
            Self::Http { store, .. } => store.stats().retries,
            Self::Memory(_) => 0,
        }
    }
}
