//! How fast the sync applier settles change events.
//!
//! `cargo bench --bench sync_apply` prints, for 10,000 account events:
//!
//! * in memory: raw `MemoryStore::write_batch` of the same records (the floor), the applier one event at a time
//!   (`Applier::apply`), and batched (`Applier::apply_batch`, 1,000 per batch), with their ratio to raw, all in the
//!   same run;
//! * over HTTP: `apply_batch` through `DataverseStore` into a Dataverse emulator where every event hydrates a
//!   placeholder (the "sync catches up after an outage" case): events per second and round trips.
//!
//! `cargo test --bench sync_apply` runs a small version once and checks the results, without timing anything.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dataverse_emulator::{EmulatedTable, Emulator, EmulatorConfig};
use eventual_upsert::dataverse::{DataverseConfig, DataverseTable};
use eventual_upsert::memory::MemoryStore;
use eventual_upsert::schema::{Schema, TableSchema};
use eventual_upsert::sync::{Applier, ChangeEvent, MemoryLedger};
use eventual_upsert::{
    EnsureExists, EnsuringWriter, EntityRef, KeyKind, Policies, Record, RecordStore, TablePolicy,
    Write,
};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const BATCH: usize = 1_000;

fn main() -> BoxResult<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (events, rounds) = if full { (10_000, 5) } else { (1_000, 1) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let records: Vec<Record> = (0..events).map(account).collect::<BoxResult<_>>()?;
        let (mut raw, mut single, mut batched) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            raw.push(memory_raw(&records).await?);
            single.push(memory_applier(&records, false).await?);
            batched.push(memory_applier(&records, true).await?);
        }
        let (raw, single, batched) = (median(raw), median(single), median(batched));
        let rate = |d: Duration| events as f64 / d.as_secs_f64();
        println!(
            "in memory, {events} events (median of {rounds}): raw writes {:.0}/s; applier one by one {:.0}/s ({:.1}x raw time); batched {:.0}/s ({:.1}x raw time)",
            rate(raw),
            rate(single),
            single.as_secs_f64() / raw.as_secs_f64(),
            rate(batched),
            batched.as_secs_f64() / raw.as_secs_f64(),
        );
        let (elapsed, requests, hydrated) = http_hydration(&records).await?;
        println!(
            "over HTTP (DataverseStore + emulator), {events} events hydrating placeholders, batches of {BATCH}: {:.0} events/s, {requests} round trips, {hydrated} hydrated",
            rate(elapsed)
        );
        Ok(())
    })
}

fn schema() -> BoxResult<Schema> {
    Ok(Schema::new([TableSchema::builder("account")
        .primary_name("name")
        .alternate_key([("accountnumber", KeyKind::String)])
        .build()?])?)
}

fn policy() -> BoxResult<Policies> {
    Ok(Policies::builder()
        .table("account", TablePolicy::builder().primary_name("name"))
        .build()?)
}

fn account(i: usize) -> BoxResult<Record> {
    Ok(Record::builder(EntityRef::by_key(
        "account",
        [("accountnumber", format!("A-{i:05}"))],
    )?)
    .field("name", format!("Account {i}"))
    .field("telephone1", "+1 555 0100")
    .build()?)
}

fn events(records: &[Record]) -> Vec<ChangeEvent> {
    records
        .iter()
        .map(|r| ChangeEvent::upsert("us", r, 1))
        .collect()
}

async fn memory_raw(records: &[Record]) -> BoxResult<Duration> {
    let store = MemoryStore::new(schema()?);
    let writes: Vec<Write> = records.iter().cloned().map(Write::upsert).collect();
    let started = Instant::now();
    for chunk in writes.chunks(BATCH) {
        for result in store.write_batch(chunk).await {
            result?;
        }
    }
    Ok(started.elapsed())
}

async fn memory_applier(records: &[Record], batched: bool) -> BoxResult<Duration> {
    let store = Arc::new(MemoryStore::new(schema()?));
    let writer = EnsuringWriter::new(store).with_policy(policy()?);
    let applier = Applier::builder(writer, Arc::new(MemoryLedger::new())).build(None)?;
    let events = events(records);
    let started = Instant::now();
    if batched {
        let mut events = events.into_iter().peekable();
        while events.peek().is_some() {
            applier
                .apply_batch(events.by_ref().take(BATCH).collect())
                .await?;
        }
    } else {
        for event in events {
            applier.apply(event).await?;
        }
    }
    let elapsed = started.elapsed();
    let stats = applier.stats();
    if stats.applied != records.len() as u64 || !stats.is_accounted() {
        return Err(format!("the applier did not apply every event: {stats}").into());
    }
    Ok(elapsed)
}

/// Placeholders for every account first (the LOB referenced them during an outage), then the sync's events.
async fn http_hydration(records: &[Record]) -> BoxResult<(Duration, u64, u64)> {
    let emulator = Emulator::start(EmulatorConfig::new().table(EmulatedTable::accounts())).await?;
    let store = Arc::new(
        DataverseConfig::new(emulator.base_url(), schema()?)
            .with_table(DataverseTable::new("account").with_state_column("new_isplaceholder"))
            .build()?,
    );
    let references: Vec<EntityRef> = records.iter().map(|r| r.reference.clone()).collect();
    store
        .ensure_exists(&references, &policy()?)
        .await
        .into_result()?;
    let writer = EnsuringWriter::new(store.clone()).with_policy(policy()?);
    // Reading each target first would cost a round trip per event; over HTTP the ledger alone orders events.
    let applier = Applier::builder(writer, Arc::new(MemoryLedger::new()))
        .check_target_version(false)
        .build(None)?;
    let mut events = events(records).into_iter().peekable();
    emulator.reset_counts();
    let started = Instant::now();
    while events.peek().is_some() {
        applier
            .apply_batch(events.by_ref().take(BATCH).collect())
            .await?;
    }
    let elapsed = started.elapsed();
    let stats = applier.stats();
    if stats.applied != records.len() as u64 || stats.hydrated != records.len() as u64 {
        return Err(format!("not every placeholder was hydrated: {stats}").into());
    }
    Ok((elapsed, emulator.counts().http_requests, stats.hydrated))
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}
