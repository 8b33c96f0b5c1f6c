//! What durability costs: the `SyncWorker` applying change events to an in-memory target with each ledger, and the
//! memory of a long run.
//!
//! `cargo bench --bench sync_ledgers` prints:
//!
//! * **ledgers**: 20,000 events (2,000 accounts × 10 versions, in order) applied by `SyncWorker::run_once` in
//!   batches of 500 to a `MemoryStore`, with `MemoryLedger`, `SqliteLedger` (a file, WAL, `synchronous=FULL`, and
//!   `SqliteDurability::Normal`) and
//!   `PostgresLedger` (at `DATABASE_URL`, in a fresh schema; skipped, saying so, when it is unset): events per
//!   second and the ratio to the memory ledger, all in one run, three rounds each (median);
//! * **soak**: 1,000,000 events (10,000 accounts × 100 versions) through the worker with a `SqliteLedger`, pruned as
//!   it goes (a 10-second dedupe window): the process's resident memory every 100,000 events and its peak, from
//!   `/proc/self/status`.
//!
//! `cargo test --bench sync_ledgers` runs a small version once and checks the results (every event applied, the
//! target holding the last version), without timing anything.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use eventual_upsert::memory::MemoryStore;
use eventual_upsert::schema::{Schema, TableSchema};
use eventual_upsert::sync::{
    Applier, ChangeBatch, ChangeEvent, ChangeSource, Ledger, MemoryLedger, PostgresLedger,
    Retention, SqliteDurability, SqliteLedger, SyncWorker, WorkerSettings,
};
use eventual_upsert::{
    EnsuringWriter, EntityRef, Policies, Record, RecordStore, Result, TablePolicy,
};
use uuid::Uuid;

type BoxResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const BATCH: usize = 500;

fn main() -> BoxResult<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (records, versions, rounds) = if full { (2_000, 10, 3) } else { (50, 3, 1) };
        ledgers(records, versions, rounds).await?;
        let (records, versions) = if full { (10_000, 100) } else { (100, 5) };
        soak(records, versions, full).await
    })
}

/// Events generated on demand (a million of them would not fit a queue in memory): position `p` is account
/// `p % records` at version `p / records + 1`. The checkpoint is the position.
#[derive(Debug)]
struct Generated {
    records: u64,
    total: u64,
}

fn account(i: u64) -> Uuid {
    Uuid::from_u128(0xacc0_0000_0000_0000_0000_0000_0000_0000 + u128::from(i))
}

#[async_trait]
impl ChangeSource for Generated {
    fn name(&self) -> &str {
        "us"
    }

    async fn poll(&self, checkpoint: Option<&str>, max: usize) -> Result<ChangeBatch> {
        let start: u64 = checkpoint.and_then(|c| c.parse().ok()).unwrap_or(0);
        let end = self.total.min(start + max as u64);
        let mut events = Vec::with_capacity((end - start) as usize);
        for p in start..end {
            let (i, version) = (p % self.records, p / self.records + 1);
            let record = Record::builder(EntityRef::by_id("account", account(i))?)
                .field("name", format!("Account {i} v{version}"))
                .field("telephone1", "+1 555 0100")
                .build()?;
            events
                .push(ChangeEvent::upsert("us", &record, version).with_event_id(format!("e-{p}")));
        }
        Ok(ChangeBatch {
            checkpoint: (end > start).then(|| end.to_string()),
            events,
        })
    }
}

fn target() -> BoxResult<Arc<MemoryStore>> {
    let schema = Schema::new([TableSchema::builder("account")
        .primary_name("name")
        .build()?])?;
    Ok(Arc::new(MemoryStore::new(schema)))
}

fn worker(
    store: Arc<MemoryStore>,
    ledger: Arc<dyn Ledger>,
    source: Generated,
    retention: Retention,
) -> BoxResult<SyncWorker> {
    let policy = Policies::builder()
        .table("account", TablePolicy::builder().primary_name("name"))
        .build()?;
    let writer = EnsuringWriter::new(store).with_policy(policy);
    let applier = Applier::builder(writer, ledger).build(None)?;
    Ok(SyncWorker::builder(Arc::new(source), applier)
        .settings(WorkerSettings {
            batch_size: BATCH,
            retention,
            ..WorkerSettings::default()
        })
        .build())
}

/// Runs the worker until the source is drained; returns the time and checks the outcome.
async fn drain(records: u64, versions: u64, ledger: Arc<dyn Ledger>) -> BoxResult<Duration> {
    let store = target()?;
    let total = records * versions;
    let worker = worker(
        store.clone(),
        ledger.clone(),
        Generated { records, total },
        Retention::default(),
    )?;
    let started = Instant::now();
    while worker.run_once().await?.events > 0 {}
    let elapsed = started.elapsed();
    let totals = ledger.totals().await?;
    // Older versions of a record in the same batch are superseded (stale) by its newest one.
    if totals.applied + totals.stale != total || totals.received != total || !totals.is_accounted()
    {
        return Err(format!("not every event was settled: {totals}").into());
    }
    let last = store
        .read(&EntityRef::by_id("account", account(records - 1))?)
        .await?
        .ok_or("the last account is missing")?;
    if last.record.source_version != Some(versions) {
        return Err(format!("the last account is at {:?}", last.record.source_version).into());
    }
    Ok(elapsed)
}

async fn ledgers(records: u64, versions: u64, rounds: usize) -> BoxResult<()> {
    let events = records * versions;
    let dir = std::env::temp_dir().join(format!("sync-ledgers-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let url = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty());
    let (mut memory, mut sqlite, mut normal, mut postgres) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        memory.push(drain(records, versions, Arc::new(MemoryLedger::new())).await?);
        let path = dir.join(format!("ledger-{round}.db"));
        let ledger = SqliteLedger::open(&path).await?;
        sqlite.push(drain(records, versions, Arc::new(ledger)).await?);
        let path = dir.join(format!("ledger-{round}-normal.db"));
        let ledger = SqliteLedger::open_with(&path, SqliteDurability::Normal).await?;
        normal.push(drain(records, versions, Arc::new(ledger)).await?);
        if let Some(url) = &url {
            let schema = format!("bench_{}", Uuid::new_v4().simple());
            let ledger = PostgresLedger::connect(url).with_schema(&schema).await?;
            let elapsed = drain(records, versions, Arc::new(ledger.clone())).await;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA \"{schema}\" CASCADE"
            )))
            .execute(ledger.pool())
            .await?;
            postgres.push(elapsed?);
        }
    }
    std::fs::remove_dir_all(&dir)?;
    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    let memory = median(memory);
    let line = |name: &str, d: Duration| {
        format!(
            "{name} {:.0} events/s ({:.2}x the memory ledger)",
            rate(d),
            memory.as_secs_f64() / d.as_secs_f64()
        )
    };
    let postgres = match postgres.is_empty() {
        true => "PostgresLedger skipped: DATABASE_URL is not set".to_owned(),
        false => line("PostgresLedger", median(postgres)),
    };
    println!(
        "ledgers, {events} events in batches of {BATCH} (median of {rounds}): MemoryLedger {:.0} events/s; {}; {}; {postgres}",
        rate(memory),
        line("SqliteLedger (FULL)", median(sqlite)),
        line("SqliteLedger (NORMAL)", median(normal)),
    );
    Ok(())
}

async fn soak(records: u64, versions: u64, full: bool) -> BoxResult<()> {
    let total = records * versions;
    let dir = std::env::temp_dir().join(format!("sync-soak-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let ledger: Arc<dyn Ledger> = Arc::new(SqliteLedger::open(dir.join("ledger.db")).await?);
    let store = target()?;
    let retention = Retention {
        dedupe_window: Duration::from_secs(10),
        ..Retention::default()
    };
    let worker = worker(
        store.clone(),
        ledger.clone(),
        Generated { records, total },
        retention,
    )?;
    let step = (total / 10).max(1);
    let (mut next, mut samples) = (step, Vec::new());
    let started = Instant::now();
    let mut applied = 0;
    loop {
        let events = worker.run_once().await?.events as u64;
        if events == 0 {
            break;
        }
        applied += events;
        if applied >= next {
            next += step;
            // Prune as the worker does on its timer (every 10 minutes by default): here every tenth of the run.
            ledger.prune(&retention, now_ms() + 60_000).await?;
            samples.push(rss_mb());
        }
    }
    let elapsed = started.elapsed();
    let totals = ledger.totals().await?;
    if totals.applied + totals.stale != total || totals.received != total {
        return Err(format!("the soak settled {totals} of {total}").into());
    }
    let peak = peak_rss_mb();
    let db = std::fs::metadata(dir.join("ledger.db")).map_or(0, |m| m.len()) / 1_000_000;
    std::fs::remove_dir_all(&dir)?;
    if full {
        let samples: Vec<String> = samples.iter().map(|mb| format!("{mb:.0}")).collect();
        println!(
            "soak, {total} events with SqliteLedger ({:.0} events/s): resident MB every {step} events: {}; peak {peak:.0} MB; ledger file {db} MB",
            total as f64 / elapsed.as_secs_f64(),
            samples.join(" ")
        );
    }
    Ok(())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A line of `/proc/self/status` in MB (0 where there is no procfs).
fn proc_status_mb(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn rss_mb() -> f64 {
    proc_status_mb("VmRSS:")
}

fn peak_rss_mb() -> f64 {
    proc_status_mb("VmHWM:")
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}
