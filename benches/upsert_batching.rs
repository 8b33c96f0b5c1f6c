//! Ensure-then-write throughput against the in-memory store: what ensuring references costs on top of the
//! writes themselves.
//!
//! # What is measured
//!
//! 10,000 contacts, each with a `parentcustomerid` lookup to one of 1,000 accounts addressed by the alternate
//! key `accountnumber` (contact `i` references account `i % 1000`). Before each run, 0 %, 30 % or 100 % of those
//! accounts are missing from the store. One criterion group per missing percentage, three modes in each:
//!
//! * `raw`: the baseline. The same 10,000 contact writes sent straight to the store with
//!   [`RecordStore::write_batch`] and no ensure, against a store where all 1,000 accounts exist (otherwise
//!   the writes would fail): the cost of the writes themselves. It is the same work in every group, so its
//!   three figures also show the run-to-run noise.
//! * `one_by_one`: [`EnsuringWriter::write`] once per contact.
//! * `batched`: [`EnsuringWriter::write_batch`] once for all 10,000 contacts (default batch size, 1,000).
//!
//! Only the call being compared is timed (`iter_custom`): building and seeding the store, cloning the input
//! writes, checking the results and dropping the store are not. Every mode writes from its own fresh copy of
//! the inputs. The writer takes its input by value, so dropping the 10,000 writes is inside its timed call (as
//! in real use); the raw baseline borrows them and drops them untimed.
//!
//! Every timed iteration is checked afterwards (every write succeeded, exactly one placeholder per missing
//! account), and each configuration is first run once with a deeper check of the store's contents and call
//! counts, so a broken behaviour fails the benchmark loudly instead of producing a fast but meaningless figure.
//!
//! The goal is `batched` within 2× of `raw` at the same missing percentage. After criterion's own report, a
//! summary table prints the median time per iteration of each mode (over every timed iteration, warm-up
//! included) and the `batched / raw` and `one_by_one / raw` ratios.
//!
//! # Running
//!
//! ```text
//! cargo bench --bench upsert_batching
//! cargo bench --bench upsert_batching -- missing_30pct     # one group
//! cargo bench --bench upsert_batching -- 'batched|raw'     # skip the slow one-by-one mode
//! ```
//!
//! The whole run takes about one and a half minutes on two cores. The figures are allocation-bound and move by
//! 10-30 % from run to run with the heap's state, so compare ratios within one run.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use eventual_upsert::memory::MemoryStore;
use eventual_upsert::schema::{Schema, TableSchema};
use eventual_upsert::{
    Change, EnsuringWriter, EntityRef, HydrationState, KeyKind, Policies, Record, RecordStore,
    TableName, TablePolicy, Write,
};
use tokio::runtime::Runtime;
use uuid::Uuid;

/// Contacts written per iteration.
const CONTACTS: usize = 10_000;
/// Distinct accounts the contacts reference.
const ACCOUNTS: usize = 1_000;
/// Share of the accounts missing before the run, in percent (multiples of 10, see [`is_missing`]).
const MISSING_PERCENTS: [usize; 3] = [0, 30, 100];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Raw,
    OneByOne,
    Batched,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Raw, Mode::OneByOne, Mode::Batched];

    fn name(self) -> &'static str {
        match self {
            Mode::Raw => "raw",
            Mode::OneByOne => "one_by_one",
            Mode::Batched => "batched",
        }
    }
}

/// What one timed call produced, checked after the clock has stopped.
struct Outcome {
    /// Writes that succeeded and created their contact.
    created: usize,
    /// Failed or unexpected writes, described.
    problems: Vec<String>,
    /// Placeholders created by the ensure step.
    placeholders: usize,
}

impl Outcome {
    /// Panics unless every contact was created and exactly `missing` placeholders were.
    fn check(&self, mode: Mode, missing: usize) {
        assert!(
            self.problems.is_empty(),
            "{}: {} writes failed or did not create their contact, first: {}",
            mode.name(),
            self.problems.len(),
            self.problems[0]
        );
        assert_eq!(
            self.created,
            CONTACTS,
            "{}: not every contact was created",
            mode.name()
        );
        assert_eq!(
            self.placeholders,
            missing,
            "{}: wrong number of placeholders",
            mode.name()
        );
    }
}

/// One account's address, by alternate key.
fn account_ref(i: usize) -> EntityRef {
    EntityRef::by_key("account", [("accountnumber", format!("A-{i:04}"))])
        .expect("a valid account key")
}

/// Whether account `i` is missing before a run with `missing_pct` % missing: spread evenly over the accounts.
fn is_missing(i: usize, missing_pct: usize) -> bool {
    i % 10 < missing_pct / 10
}

fn missing_count(missing_pct: usize) -> usize {
    (0..ACCOUNTS)
        .filter(|&i| is_missing(i, missing_pct))
        .count()
}

/// Instance B's tables: accounts keyed by account number, contacts pointing at their parent account.
fn schema() -> Schema {
    Schema::new([
        TableSchema::builder("account")
            .primary_name("name")
            .alternate_key([("accountnumber", KeyKind::String)])
            .build()
            .expect("a valid account table"),
        TableSchema::builder("contact")
            .primary_name("fullname")
            .lookup("parentcustomerid", "account")
            .build()
            .expect("a valid contact table"),
    ])
    .expect("a valid schema")
}

fn policy() -> Policies {
    Policies::builder()
        .table("account", TablePolicy::builder().primary_name("name"))
        .build()
        .expect("a valid policy")
}

/// The 10,000 contact upserts, by fixed id so every iteration writes the same records.
fn contact_writes() -> Vec<Write> {
    (0..CONTACTS)
        .map(|i| {
            let id = Uuid::from_u128(i as u128 + 1);
            let record = Record::builder(EntityRef::by_id("contact", id).expect("a non-nil id"))
                .field("fullname", format!("Contact {i}"))
                .field("emailaddress1", format!("contact{i}@example.com"))
                .lookup("parentcustomerid", account_ref(i % ACCOUNTS))
                .build()
                .expect("a valid contact");
            Write::upsert(record)
        })
        .collect()
}

/// The full (hydrated) account writes that seed a store.
fn account_writes() -> Vec<Write> {
    (0..ACCOUNTS)
        .map(|i| {
            let record = Record::builder(account_ref(i))
                .field("name", format!("Account {i}"))
                .build()
                .expect("a valid account");
            Write::upsert(record)
        })
        .collect()
}

/// Inputs built once and shared by every iteration, and the medians collected for the summary.
struct Fixture {
    rt: Runtime,
    schema: Schema,
    policy: Policies,
    contacts: Vec<Write>,
    accounts: Vec<Write>,
    timings: RefCell<BTreeMap<(usize, Mode), Vec<Duration>>>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a Tokio runtime"),
            schema: schema(),
            policy: policy(),
            contacts: contact_writes(),
            accounts: account_writes(),
            timings: RefCell::new(BTreeMap::new()),
        }
    }

    /// A fresh store holding every account except those missing at `missing_pct` %.
    fn seeded_store(&self, missing_pct: usize) -> Arc<MemoryStore> {
        let store = Arc::new(MemoryStore::new(self.schema.clone()));
        let seed: Vec<Write> = self
            .accounts
            .iter()
            .enumerate()
            .filter(|&(i, _)| !is_missing(i, missing_pct))
            .map(|(_, w)| w.clone())
            .collect();
        let results = self.rt.block_on(store.write_batch(&seed));
        assert!(
            results.iter().all(Result::is_ok),
            "seeding the accounts failed"
        );
        store
    }

    /// Runs `mode` once on a fresh store and returns the time of the measured call alone, with the store it ran
    /// on. Panics if any write failed or the placeholder count is wrong.
    fn run_once(&self, mode: Mode, missing_pct: usize) -> (Duration, Arc<MemoryStore>) {
        // The raw baseline cannot ensure anything, so every account exists for it.
        let store = self.seeded_store(if mode == Mode::Raw { 0 } else { missing_pct });
        let expected_placeholders = if mode == Mode::Raw {
            0
        } else {
            missing_count(missing_pct)
        };
        let (elapsed, outcome) = match mode {
            Mode::Raw => {
                // A fresh copy, like the other modes get: writing from the long-lived shared inputs instead
                // measured 20-30 % faster (allocator locality), which would flatter the baseline.
                let writes = self.contacts.clone();
                let start = Instant::now();
                let results = self.rt.block_on(store.write_batch(black_box(&writes)));
                let elapsed = start.elapsed();
                let mut outcome = Outcome {
                    created: 0,
                    problems: Vec::new(),
                    placeholders: 0,
                };
                assert_eq!(results.len(), CONTACTS, "raw: one result per write");
                for (i, result) in results.iter().enumerate() {
                    match result {
                        Ok(o) if o.change == Change::Created => outcome.created += 1,
                        Ok(o) => outcome.problems.push(format!("write {i}: {:?}", o.change)),
                        Err(err) => outcome.problems.push(format!("write {i}: {err}")),
                    }
                }
                (elapsed, outcome)
            }
            Mode::OneByOne => {
                let writer = EnsuringWriter::new(store.clone()).with_policy(self.policy.clone());
                let writes = self.contacts.clone();
                let start = Instant::now();
                let outcome = self.rt.block_on(async {
                    let mut outcome = Outcome {
                        created: 0,
                        problems: Vec::new(),
                        placeholders: 0,
                    };
                    for write in writes {
                        match writer.write(write).await {
                            Ok(written) => {
                                outcome.placeholders += written.ensured.created().count();
                                if written.outcome.change == Change::Created {
                                    outcome.created += 1;
                                } else {
                                    outcome
                                        .problems
                                        .push(format!("{:?}", written.outcome.change));
                                }
                            }
                            Err(err) => outcome.problems.push(err.to_string()),
                        }
                    }
                    outcome
                });
                (start.elapsed(), outcome)
            }
            Mode::Batched => {
                let writer = EnsuringWriter::new(store.clone()).with_policy(self.policy.clone());
                let writes = self.contacts.clone();
                let start = Instant::now();
                let report = self.rt.block_on(writer.write_batch(writes));
                let elapsed = start.elapsed();
                let counts = report.counts();
                let outcome = Outcome {
                    created: counts.created,
                    problems: report
                        .failures()
                        .map(|(i, err)| format!("write {i}: {err}"))
                        .chain(
                            (counts.updated + counts.unchanged > 0).then(|| format!("{counts:?}")),
                        )
                        .collect(),
                    placeholders: counts.placeholders,
                };
                assert_eq!(
                    report.results.len(),
                    CONTACTS,
                    "batched: one result per write"
                );
                (elapsed, outcome)
            }
        };
        outcome.check(mode, expected_placeholders);
        self.timings
            .borrow_mut()
            .entry((missing_pct, mode))
            .or_default()
            .push(elapsed);
        (elapsed, store)
    }

    /// One untimed run with a deeper check of what the store holds afterwards; prints the store calls made.
    fn verify(&self, mode: Mode, missing_pct: usize) {
        let (_, store) = self.run_once(mode, missing_pct);
        let account = TableName::new("account").expect("a valid table name");
        let contact = TableName::new("contact").expect("a valid table name");
        let accounts = store.records(&account).expect("the account table exists");
        let contacts = store.records(&contact).expect("the contact table exists");
        assert_eq!(accounts.len(), ACCOUNTS, "{}: account count", mode.name());
        assert_eq!(contacts.len(), CONTACTS, "{}: contact count", mode.name());
        let placeholders = accounts
            .iter()
            .filter(|a| a.record.state == HydrationState::Placeholder)
            .count();
        let expected = if mode == Mode::Raw {
            0
        } else {
            missing_count(missing_pct)
        };
        assert_eq!(
            placeholders,
            expected,
            "{}: placeholder accounts",
            mode.name()
        );
        assert!(
            contacts
                .iter()
                .all(|c| c.record.lookups.len() == 1 && c.record.fields.len() == 2),
            "{}: every contact holds its name, e-mail and parent account",
            mode.name()
        );
        let stats = store.stats();
        // The seeding is one call of the present accounts.
        let seeded = ACCOUNTS
            - if mode == Mode::Raw {
                0
            } else {
                missing_count(missing_pct)
            };
        eprintln!(
            "verified {:>10} at {:>3} % missing: {} placeholders, {} store write calls carrying {} writes \
             (seeding excluded)",
            mode.name(),
            missing_pct,
            placeholders,
            stats.write_calls - 1,
            stats.writes - seeded as u64,
        );
        // The verification run is not part of the timings.
        if let Some(samples) = self.timings.borrow_mut().get_mut(&(missing_pct, mode)) {
            samples.pop();
        }
    }

    /// Median per-iteration time of every mode and the ratios to the raw baseline.
    fn print_summary(&self) {
        let timings = self.timings.borrow();
        let median = |pct: usize, mode: Mode| -> Option<Duration> {
            let mut samples = timings.get(&(pct, mode))?.clone();
            if samples.is_empty() {
                return None;
            }
            samples.sort_unstable();
            Some(samples[samples.len() / 2])
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let per_sec = |d: Duration| CONTACTS as f64 / d.as_secs_f64();
        println!();
        println!(
            "Summary: median time per iteration of {CONTACTS} contact writes (every timed iteration, warm-up \
             included)"
        );
        println!(
            "{:>9} | {:>10} | {:>11} | {:>12} | {:>13} | {:>16}",
            "missing", "mode", "ms/iter", "records/s", "ratio to raw", "iterations timed"
        );
        println!("{}", "-".repeat(86));
        for pct in MISSING_PERCENTS {
            let raw = median(pct, Mode::Raw);
            for mode in Mode::ALL {
                let Some(d) = median(pct, mode) else {
                    continue;
                };
                let ratio = raw.map_or_else(
                    || "-".to_owned(),
                    |r| format!("{:.2}x", d.as_secs_f64() / r.as_secs_f64()),
                );
                println!(
                    "{:>7} % | {:>10} | {:>11.3} | {:>12.0} | {:>13} | {:>16}",
                    pct,
                    mode.name(),
                    ms(d),
                    per_sec(d),
                    ratio,
                    timings.get(&(pct, mode)).map_or(0, Vec::len)
                );
            }
            if let (Some(raw), Some(batched)) = (raw, median(pct, Mode::Batched)) {
                let ratio = batched.as_secs_f64() / raw.as_secs_f64();
                println!(
                    "{:>9}   goal batched <= 2x raw: {} ({ratio:.2}x)",
                    "",
                    if ratio <= 2.0 { "met" } else { "NOT met" }
                );
            }
        }
    }
}

fn benches(c: &mut Criterion, fixture: &Fixture) {
    for pct in MISSING_PERCENTS {
        for mode in Mode::ALL {
            fixture.verify(mode, pct);
        }
        let mut group = c.benchmark_group(format!("missing_{pct}pct"));
        group
            .throughput(Throughput::Elements(CONTACTS as u64))
            .sampling_mode(SamplingMode::Flat);
        for mode in Mode::ALL {
            group.bench_function(mode.name(), |b| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            let (elapsed, store) = fixture.run_once(mode, pct);
                            // Dropping 11,000 records is not part of the measured call.
                            drop(store);
                            elapsed
                        })
                        .sum()
                });
            });
        }
        group.finish();
    }
}

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(15)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    let fixture = Fixture::new();
    benches(&mut criterion, &fixture);
    criterion.final_summary();
    // `cargo bench` passes --bench; without it criterion runs each benchmark once as a test (debug build, one
    // iteration), where a figures table would only mislead.
    if std::env::args().any(|arg| arg == "--bench") {
        fixture.print_summary();
    }
}
