//! `DataverseStore` against the emulator on loopback: round trips and throughput.
//!
//! `cargo bench --bench dataverse_http` prints:
//!
//! * (a) LOB burst: 10,000 contacts referencing 1,000 accounts, 30 % of them missing, through `EnsuringWriter`.
//!   Goal: at most 12 HTTP round trips (the protocol's floor is ceil(11,000 operations / 1,000) = 11).
//! * (b) Bulk sync of 10,000 accounts with `bulk_upsert` (`UpsertMultiple`), against the same requests sent raw
//!   with reqwest by this program. Goal: the store reaches at least 80 % of the raw throughput.
//!
//! `cargo test --bench dataverse_http` runs a smaller (b) once and checks the results and the round trips, so
//! CI keeps the benchmark honest without timing anything.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use serde_json::{Value, json};

use dataverse_emulator::{EmulatedTable, Emulator, EmulatorConfig};
use eventual_upsert::dataverse::{DataverseConfig, DataverseStore, DataverseTable};
use eventual_upsert::schema::{Schema, TableSchema};
use eventual_upsert::{EnsuringWriter, EntityRef, KeyKind, Policies, Record, TablePolicy};

const CONTACTS: usize = 10_000;
const ACCOUNTS: usize = 1_000;
const MISSING_PERCENT: usize = 30;
const BULK_CHUNK: usize = 500;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> BoxResult<()> {
    let full = std::env::args().any(|a| a == "--bench");
    // Client and server get one core each, as a client and a remote service would: the emulator runs on its own
    // runtime, so the client's work and the server's do not queue behind each other on shared worker threads.
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    SERVER
        .set(server.handle().clone())
        .map_err(|_| "the server runtime was set twice")?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    client.block_on(async {
        let burst = lob_burst().await?;
        println!(
            "(a) LOB burst: {CONTACTS} contacts -> {ACCOUNTS} accounts ({MISSING_PERCENT} % missing): {} round trips \
             (goal <= 12, floor 11), {} placeholders, {:.2} s, {:.0} records/s",
            burst.round_trips,
            burst.placeholders,
            burst.elapsed.as_secs_f64(),
            CONTACTS as f64 / burst.elapsed.as_secs_f64()
        );
        if burst.round_trips > 12 || burst.placeholders != ACCOUNTS * MISSING_PERCENT / 100 {
            return Err("the LOB burst missed its round-trip goal or created the wrong placeholders".into());
        }
        let (records, rounds) = if full { (10_000, 11) } else { (1_000, 1) };
        let bulk = bulk_sync(records, rounds).await?;
        let ratio = median(bulk.ratios.clone());
        let (low, high) = (bulk.ratios[0], bulk.ratios[bulk.ratios.len() - 1]);
        println!(
            "(b) bulk sync of {records} accounts (UpsertMultiple x{BULK_CHUNK}, {rounds} paired rounds): raw {:.0} records/s \
             ({:.1} requests/s), store {:.0} records/s ({:.1} requests/s); store/raw median {:.0} % (rounds {:.0}-{:.0} %; goal >= 80 %)",
            bulk.raw_per_sec,
            bulk.raw_per_sec / BULK_CHUNK as f64,
            bulk.store_per_sec,
            bulk.store_per_sec / BULK_CHUNK as f64,
            ratio * 100.0,
            low * 100.0,
            high * 100.0
        );
        Ok(())
    })
}

fn schema() -> BoxResult<Schema> {
    Ok(Schema::new([
        TableSchema::builder("account")
            .primary_name("name")
            .alternate_key([("accountnumber", KeyKind::String)])
            .build()?,
        TableSchema::builder("contact")
            .primary_name("fullname")
            .alternate_key([("emailaddress1", KeyKind::String)])
            .lookup("parentcustomerid", "account")
            .build()?,
    ])?)
}

static SERVER: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();

/// An emulator serving from the server runtime.
async fn start_emulator() -> BoxResult<Emulator> {
    let server = SERVER.get().ok_or("no server runtime")?;
    Ok(server.spawn(new_emulator()).await??)
}

async fn new_emulator() -> Result<Emulator, dataverse_emulator::EmulatorError> {
    Emulator::start(
        EmulatorConfig::new()
            .table(EmulatedTable::accounts())
            .table(EmulatedTable::contacts().alternate_key(&["emailaddress1"])),
    )
    .await
}

fn store(emulator: &Emulator) -> BoxResult<DataverseStore> {
    Ok(DataverseConfig::new(emulator.base_url(), schema()?)
        .with_table(DataverseTable::new("account").with_state_column("new_isplaceholder"))
        .with_table(
            DataverseTable::new("contact")
                .with_navigation("parentcustomerid", "parentcustomerid_account")
                .with_state_column("new_isplaceholder"),
        )
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

struct Burst {
    round_trips: u64,
    placeholders: usize,
    elapsed: Duration,
}

async fn lob_burst() -> BoxResult<Burst> {
    let emulator = start_emulator().await?;
    let store = Arc::new(store(&emulator)?);
    let existing: Vec<Record> = (0..ACCOUNTS * (100 - MISSING_PERCENT) / 100)
        .map(account)
        .collect::<BoxResult<_>>()?;
    let seeded = store.bulk_upsert(&existing).await;
    if seeded.written() != existing.len() {
        return Err(format!("seeding failed: {:?}", seeded.failures().next()).into());
    }
    let contacts: Vec<Record> = (0..CONTACTS)
        .map(|i| {
            let parent = EntityRef::by_key(
                "account",
                [("accountnumber", format!("A-{:05}", i % ACCOUNTS))],
            )?;
            Ok(Record::builder(EntityRef::by_key(
                "contact",
                [("emailaddress1", format!("c{i}@example.com"))],
            )?)
            .field("fullname", format!("Contact {i}"))
            .lookup("parentcustomerid", parent)
            .build()?)
        })
        .collect::<BoxResult<_>>()?;
    let policy = Policies::builder()
        .table("account", TablePolicy::builder().primary_name("name"))
        .build()?;
    let writer = EnsuringWriter::new(store).with_policy(policy);
    emulator.reset_counts();
    let started = Instant::now();
    let report = writer
        .write_batch(contacts.into_iter().map(Into::into))
        .await;
    let elapsed = started.elapsed();
    if let Some((i, err)) = report.failures().next() {
        return Err(format!("contact {i} failed: {err}").into());
    }
    Ok(Burst {
        round_trips: emulator.counts().http_requests,
        placeholders: report.counts().placeholders,
        elapsed,
    })
}

struct Bulk {
    raw_per_sec: f64,
    store_per_sec: f64,
    /// Store / raw per round, sorted: rounds are paired so that drift of the machine cancels out.
    ratios: Vec<f64>,
}

/// Raw and store rounds, paired and alternating which goes first, each on a fresh emulator (the same table size
/// at the start of each); medians of throughput and of the per-round ratio.
async fn bulk_sync(records: usize, rounds: usize) -> BoxResult<Bulk> {
    let accounts: Vec<Record> = (0..records).map(account).collect::<BoxResult<_>>()?;
    let (mut raw, mut ours, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (r, o) = if round % 2 == 0 {
            let r = raw_round(records).await?;
            (r, store_round(&accounts).await?)
        } else {
            let o = store_round(&accounts).await?;
            (raw_round(records).await?, o)
        };
        raw.push(r);
        ours.push(o);
        ratios.push(o / r);
    }
    ratios.sort_by(f64::total_cmp);
    Ok(Bulk {
        raw_per_sec: median(raw),
        store_per_sec: median(ours),
        ratios,
    })
}

async fn raw_round(records: usize) -> BoxResult<f64> {
    let emulator = start_emulator().await?;
    Ok(records as f64 / send_raw(&emulator, records).await?.as_secs_f64())
}

async fn store_round(accounts: &[Record]) -> BoxResult<f64> {
    let emulator = start_emulator().await?;
    let store = store(&emulator)?;
    // The probe for bulk support happens once per store; warm it up outside the measurement, as raw needs none.
    store
        .supports_bulk(&eventual_upsert::TableName::new("account")?)
        .await?;
    let started = Instant::now();
    let report = store.bulk_upsert(accounts).await;
    let elapsed = started.elapsed();
    if report.written() != accounts.len() || emulator.row_count("account") != accounts.len() {
        return Err(format!(
            "bulk upsert wrote {} of {}",
            report.written(),
            accounts.len()
        )
        .into());
    }
    Ok(accounts.len() as f64 / elapsed.as_secs_f64())
}

/// The same `UpsertMultiple` requests the store sends (the same members, key column included), built and sent
/// directly: the emulator's own ceiling for
/// this work at the same parallelism (its `x-ms-dop-hint`, 4).
async fn send_raw(emulator: &Emulator, records: usize) -> BoxResult<Duration> {
    let client = reqwest::Client::new();
    let url = format!(
        "{}accounts/Microsoft.Dynamics.CRM.UpsertMultiple",
        emulator.service_root()
    );
    let bodies: Vec<String> = (0..records)
        .collect::<Vec<_>>()
        .chunks(BULK_CHUNK)
        .map(|chunk| {
            let targets: Vec<Value> = chunk
                .iter()
                .map(|i| {
                    json!({
                        "@odata.type": "Microsoft.Dynamics.CRM.account",
                        "@odata.id": format!("accounts(accountnumber='A-{i:05}')"),
                        "name": format!("Account {i}"),
                        "telephone1": "+1 555 0100",
                        "accountnumber": format!("A-{i:05}"),
                        "new_isplaceholder": false,
                    })
                })
                .collect();
            json!({ "Targets": targets }).to_string()
        })
        .collect();
    let started = Instant::now();
    let statuses: Vec<Result<u16, reqwest::Error>> = stream::iter(bodies)
        .map(|body| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let response = client
                    .post(url)
                    .header("Content-Type", "application/json")
                    .header("OData-Version", "4.0")
                    .body(body)
                    .send()
                    .await?;
                let status = response.status().as_u16();
                response.bytes().await?;
                Ok(status)
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let elapsed = started.elapsed();
    for status in statuses {
        let status = status?;
        if status != 204 && status != 200 {
            return Err(format!("raw UpsertMultiple answered {status}").into());
        }
    }
    if emulator.row_count("account") != records {
        return Err("raw requests did not write every record".into());
    }
    Ok(elapsed)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}
