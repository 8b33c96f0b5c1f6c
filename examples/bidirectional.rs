//! # Two-way sync without loops
//!
//! Two Dataverse instances (emulators on loopback), US and EU, where users create and edit records on both sides.
//! Two pipelines keep them in sync, each reading one instance's change tracking and writing the other through
//! `DataverseStore`:
//!
//! ```text
//!   US ──change tracking──▶ sync-us-eu ──▶ EU
//!   EU ──change tracking──▶ sync-eu-us ──▶ US
//! ```
//!
//! Every write a pipeline makes shows up in the other instance's change feed. Without loop prevention the other
//! pipeline would write it back, which would show up again, forever. Both pipelines share one ledger: each
//! remembers the row versions its own writes produced (`Applier::target_instance`), and the other skips exactly
//! those changes as echoes. A later edit by a user bumps the version, so it is never mistaken for an echo.
//!
//! The example seeds both sides, syncs until quiet, lets users edit on both sides, syncs again, and checks that
//! the instances hold the same records, that every pipeline write came back exactly once as an echo and was
//! skipped, and that a final round finds nothing to do. Edits in one round touch different records on each side:
//! when both sides edit one record between two rounds, the pipeline that runs first wins (the README's decisions).
//!
//! `cargo run --example bidirectional` exits with status 1 if the instances do not converge or an echo is written.

use std::collections::BTreeMap;
use std::sync::Arc;

use dataverse_emulator::{EmulatedTable, Emulator, EmulatorConfig};
use eventual_upsert::dataverse::{DataverseConfig, DataverseStore, DataverseTable};
use eventual_upsert::schema::{Schema, TableSchema};
use eventual_upsert::sync::{Applier, DataverseChangeSource, MemoryLedger, Pipeline, SyncStats};
use eventual_upsert::{
    EnsuringWriter, EntityRef, KeyKind, Policies, Record, RecordStore, TableName, TablePolicy,
    Write,
};
use uuid::Uuid;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

const SEED: u64 = 0x2_0A7;
const US_ACCOUNTS: usize = 40;
const EU_ACCOUNTS: usize = 15;
const CONTACTS_PER_ACCOUNT: usize = 2;
const EDITS_PER_SIDE: usize = 12;
const MAX_ROUNDS: usize = 6;
const TABLES: [&str; 2] = ["account", "contact"];

#[tokio::main]
async fn main() -> BoxResult<()> {
    let us = Instance::start("us").await?;
    let eu = Instance::start("eu").await?;
    let ledger = Arc::new(MemoryLedger::new());
    let us_to_eu = pipeline(&us, &eu, &ledger)?;
    let eu_to_us = pipeline(&eu, &us, &ledger)?;
    let mut rng = SplitMix64(SEED);
    println!("Two-way sync US <-> EU on two Dataverse emulators (seed {SEED:#x})");

    // 1. Both sides have records of their own.
    let us_accounts = seed(&us, &mut rng, US_ACCOUNTS).await?;
    let eu_accounts = seed(&eu, &mut rng, EU_ACCOUNTS).await?;
    let created = (US_ACCOUNTS + EU_ACCOUNTS) * (1 + CONTACTS_PER_ACCOUNT);
    println!(
        "  1 seeded         {created} records: US {US_ACCOUNTS} accounts, EU {EU_ACCOUNTS} accounts, {CONTACTS_PER_ACCOUNT} contacts each"
    );
    let rounds = sync_until_quiet(&us_to_eu, &eu_to_us).await?;
    println!("  2 synced         quiet after {rounds} rounds");

    // 2. Users edit on both sides: US edits US-born accounts, EU edits EU-born ones and some US-born ones.
    for i in 0..EDITS_PER_SIDE {
        let account = &us_accounts[(i * 3) % us_accounts.len()];
        us.edit(account, &format!("US edit {i}")).await?;
        let account = match i % 2 {
            0 => &eu_accounts[i % eu_accounts.len()],
            _ => &us_accounts[(i * 3 + 1) % us_accounts.len()],
        };
        eu.edit(account, &format!("EU edit {i}")).await?;
    }
    println!("  3 edits          {EDITS_PER_SIDE} on each side, on different records");
    let rounds = sync_until_quiet(&us_to_eu, &eu_to_us).await?;
    println!("  4 synced         quiet after {rounds} rounds");

    // 3. One more round must find nothing to write.
    let (before_a, before_b) = (us_to_eu.applier().stats(), eu_to_us.applier().stats());
    us_to_eu.drain(500).await?;
    eu_to_us.drain(500).await?;
    let (a, b) = (us_to_eu.applier().stats(), eu_to_us.applier().stats());
    let idle = a.applied == before_a.applied && b.applied == before_b.applied;

    let differences = compare(&us, &eu).await?;
    report("sync-us-eu", &a);
    report("sync-eu-us", &b);
    let checks = [
        (differences.is_empty(), "US and EU differ"),
        (
            a.echo == b.applied,
            "a US write by sync-eu-us was not skipped as an echo exactly once",
        ),
        (
            b.echo == a.applied,
            "an EU write by sync-us-eu was not skipped as an echo exactly once",
        ),
        (idle, "a final round still wrote something (a loop)"),
        (
            a.is_accounted() && b.is_accounted(),
            "statistics do not add up",
        ),
        (
            a.dead_lettered == 0 && b.dead_lettered == 0,
            "events were dead-lettered",
        ),
    ];
    for difference in differences.iter().take(3) {
        println!("  ! {difference}");
    }
    let failed: Vec<&str> = checks.iter().filter(|c| !c.0).map(|c| c.1).collect();
    if failed.is_empty() {
        println!(
            "\nResult: OK: US and EU hold the same {} records; {} echoes skipped, 0 written back.",
            us.count().await?,
            a.echo + b.echo
        );
        Ok(())
    } else {
        println!("\nResult: FAILED: {}", failed.join("; "));
        std::process::exit(1);
    }
}

fn report(name: &str, stats: &SyncStats) {
    println!(
        "  {name}: received {}, applied {}, echo {}, duplicate {}, stale {}, dead-lettered {}",
        stats.received,
        stats.applied,
        stats.echo,
        stats.duplicate,
        stats.stale,
        stats.dead_lettered
    );
}

/// Runs both directions until a round applies nothing. Returns the rounds it took.
async fn sync_until_quiet(a: &Pipeline, b: &Pipeline) -> BoxResult<usize> {
    for round in 1..=MAX_ROUNDS {
        let applied = a.applier().stats().applied + b.applier().stats().applied;
        a.drain(500).await?;
        b.drain(500).await?;
        if a.applier().stats().applied + b.applier().stats().applied == applied {
            return Ok(round);
        }
    }
    Err(format!("still writing after {MAX_ROUNDS} rounds: the pipelines loop").into())
}

/// The pipeline from `from`'s change feed into `to`.
fn pipeline(from: &Instance, to: &Instance, ledger: &Arc<MemoryLedger>) -> BoxResult<Pipeline> {
    let policy = Policies::builder()
        .table("account", TablePolicy::builder().primary_name("name"))
        .build()?;
    let writer = EnsuringWriter::new(to.store.clone()).with_policy(policy);
    let applier = Applier::builder(writer, ledger.clone())
        .identity(format!("sync-{}-{}", from.name, to.name))
        .target_instance(to.name)
        .build(None)?;
    let tables = TABLES
        .iter()
        .map(TableName::new)
        .collect::<Result<_, _>>()?;
    let source = DataverseChangeSource::new(from.name, DataverseStore::clone(&from.store), tables);
    Ok(Pipeline::new(Arc::new(source), applier))
}

/// One instance: an emulator and the store that writes to it (what its users' apps would use).
struct Instance {
    name: &'static str,
    store: Arc<DataverseStore>,
    // Kept alive: dropping it stops the server.
    _emulator: Emulator,
}

impl Instance {
    async fn start(name: &'static str) -> BoxResult<Self> {
        let emulator = Emulator::start(
            EmulatorConfig::new()
                .table(EmulatedTable::accounts())
                .table(EmulatedTable::contacts()),
        )
        .await?;
        let schema = Schema::new([
            TableSchema::builder("account")
                .primary_name("name")
                .alternate_key([("accountnumber", KeyKind::String)])
                .build()?,
            TableSchema::builder("contact")
                .primary_name("fullname")
                .lookup("parentcustomerid", "account")
                .build()?,
        ])?;
        let store = DataverseConfig::new(emulator.base_url(), schema)
            .with_name(name)
            .with_table(DataverseTable::new("account").with_state_column("new_isplaceholder"))
            .with_table(
                DataverseTable::new("contact")
                    .with_navigation("parentcustomerid", "parentcustomerid_account")
                    .with_state_column("new_isplaceholder"),
            )
            .build()?;
        Ok(Self {
            name,
            store: Arc::new(store),
            _emulator: emulator,
        })
    }

    /// A user renames an account.
    async fn edit(&self, account: &EntityRef, name: &str) -> BoxResult<()> {
        let record = Record::builder(account.clone())
            .field("name", name)
            .build()?;
        self.store.write(&Write::update_only(record)).await?;
        Ok(())
    }

    async fn records(&self) -> BoxResult<BTreeMap<EntityRef, Record>> {
        let mut all = BTreeMap::new();
        for table in TABLES {
            for stored in self.store.records(&TableName::new(table)?).await? {
                all.insert(stored.record.reference.clone(), stored.record);
            }
        }
        Ok(all)
    }

    async fn count(&self) -> BoxResult<usize> {
        Ok(self.records().await?.len())
    }
}

/// Users of `instance` create `accounts` accounts with their contacts; returns the accounts.
async fn seed(
    instance: &Instance,
    rng: &mut SplitMix64,
    accounts: usize,
) -> BoxResult<Vec<EntityRef>> {
    let mut created = Vec::new();
    let mut writes = Vec::new();
    for i in 0..accounts {
        let account = EntityRef::by_id("account", rng.guid())?;
        writes.push(Write::upsert(
            Record::builder(account.clone())
                .field(
                    "name",
                    format!("{} account {i}", instance.name.to_uppercase()),
                )
                .field(
                    "accountnumber",
                    format!("{}-{i:04}", instance.name.to_uppercase()),
                )
                .build()?,
        ));
        for c in 0..CONTACTS_PER_ACCOUNT {
            writes.push(Write::upsert(
                Record::builder(EntityRef::by_id("contact", rng.guid())?)
                    .field("fullname", format!("Contact {c} of {} {i}", instance.name))
                    .lookup("parentcustomerid", account.clone())
                    .build()?,
            ));
        }
        created.push(account);
    }
    for result in instance.store.write_batch(&writes).await {
        result?;
    }
    Ok(created)
}

/// What differs between the instances: missing records, differing fields or lookups.
async fn compare(us: &Instance, eu: &Instance) -> BoxResult<Vec<String>> {
    let (left, right) = (us.records().await?, eu.records().await?);
    let mut differences = Vec::new();
    for (reference, record) in &left {
        match right.get(reference) {
            None => differences.push(format!("{reference} is missing in EU")),
            Some(other) if other.fields != record.fields || other.lookups != record.lookups => {
                differences.push(format!(
                    "{reference} differs: {:?} vs {:?}",
                    record.fields, other.fields
                ))
            }
            Some(_) => {}
        }
    }
    for reference in right.keys().filter(|r| !left.contains_key(*r)) {
        differences.push(format!("{reference} is missing in US"));
    }
    Ok(differences)
}

/// splitmix64: seeded GUIDs without a `rand` dependency, the same on every run.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn guid(&mut self) -> Uuid {
        Uuid::from_u128((u128::from(self.next_u64()) << 64) | u128::from(self.next_u64()))
    }
}
