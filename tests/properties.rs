//! Property test: random interleavings of ensures, LOB writes, sync writes and attempted placeholder downgrades
//! against the in-memory store. After every step, the pattern's invariants hold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

mod common;

use proptest::prelude::*;
use serde_json::json;
use uuid::Uuid;

use eventual_upsert::memory::MemoryStore;
use eventual_upsert::{
    EnsuringWriter, EntityRef, HydrationState, Policies, Record, RecordStore, TableName,
    TablePolicy, Write,
};

const ACCOUNTS: u8 = 4;

#[derive(Clone, Debug)]
enum Op {
    /// The LOB app ensures an account.
    Ensure(u8),
    /// The LOB app writes a contact referencing an account.
    Lob { account: u8 },
    /// The sync writes an account with real data.
    Sync { account: u8, phone: u16 },
    /// Someone writes a placeholder-state record over an account (must never downgrade real data).
    Downgrade(u8),
    /// A batch mixing all of the above.
    Batch(Vec<(u8, Option<u16>)>),
}

fn op() -> impl Strategy<Value = Op> {
    let account = 0..ACCOUNTS;
    prop_oneof![
        account.clone().prop_map(Op::Ensure),
        account.clone().prop_map(|account| Op::Lob { account }),
        (account.clone(), any::<u16>()).prop_map(|(account, phone)| Op::Sync { account, phone }),
        account.clone().prop_map(Op::Downgrade),
        prop::collection::vec((account, prop::option::of(any::<u16>())), 1..8).prop_map(Op::Batch),
    ]
}

fn account(n: u8) -> EntityRef {
    EntityRef::by_key("account", [("accountnumber", format!("A-{n}"))]).unwrap()
}

fn sync_record(n: u8, phone: u16) -> Record {
    Record::builder(account(n))
        .field("name", format!("Account {n}"))
        .field("telephone1", phone.to_string())
        .build()
        .unwrap()
}

fn lob_record(n: u8) -> Record {
    Record::builder(EntityRef::by_id("contact", Uuid::new_v4()).unwrap())
        .field("fullname", "LOB contact")
        .lookup("parentcustomerid", account(n))
        .build()
        .unwrap()
}

/// What the test knows must be true of the store.
#[derive(Default)]
struct Model {
    /// Last phone the sync wrote per account: real data that nothing may overwrite but the sync.
    phone: HashMap<u8, u16>,
    /// LOB contacts written: contact ref → account number.
    contacts: Vec<(EntityRef, u8)>,
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let schema = common::accounts_and_contacts();
    let store = Arc::new(MemoryStore::new(schema));
    let policy = Policies::builder()
        .table("account", TablePolicy::builder().primary_name("name"))
        .build()
        .unwrap();
    let writer = EnsuringWriter::new(store.clone()).with_policy(policy);
    let hydrations: Arc<Mutex<HashMap<Uuid, usize>>> = Arc::default();
    let seen = hydrations.clone();
    writer
        .hooks()
        .on_hydrated(&TableName::new("account").unwrap(), move |h| {
            *seen.lock().unwrap().entry(h.id).or_default() += 1;
        });
    let mut model = Model::default();

    for op in ops {
        match op {
            Op::Ensure(n) => {
                let before = store.read(&account(n)).await.unwrap();
                writer.ensure(&[account(n)]).await.into_result().unwrap();
                let after = store.read(&account(n)).await.unwrap();
                prop_assert!(after.is_some(), "ensured account exists");
                if let Some(before) = before {
                    prop_assert_eq!(
                        Some(before),
                        after,
                        "ensure left an existing record exactly as it was"
                    );
                }
            }
            Op::Lob { account: n } => {
                let record = lob_record(n);
                let reference = record.reference.clone();
                writer.write(record).await.unwrap();
                model.contacts.push((reference, n));
            }
            Op::Sync { account: n, phone } => {
                writer.write(sync_record(n, phone)).await.unwrap();
                model.phone.insert(n, phone);
            }
            Op::Downgrade(n) => {
                let mut record = Record::builder(account(n)).build().unwrap();
                record.state = HydrationState::Placeholder;
                store.write(&Write::upsert(record)).await.unwrap();
            }
            Op::Batch(items) => {
                let writes: Vec<Write> = items
                    .iter()
                    .map(|&(n, phone)| {
                        Write::upsert(phone.map_or_else(|| lob_record(n), |p| sync_record(n, p)))
                    })
                    .collect();
                let report = writer.write_batch(writes.clone()).await;
                prop_assert!(report.is_success(), "{:?}", report.results);
                for (write, &(n, phone)) in writes.iter().zip(&items) {
                    match phone {
                        Some(p) => {
                            model.phone.insert(n, p);
                        }
                        None => model.contacts.push((write.record.reference.clone(), n)),
                    }
                }
            }
        }
        check(&store, &model, &hydrations).await?;
    }
    Ok(())
}

async fn check(
    store: &MemoryStore,
    model: &Model,
    hydrations: &Mutex<HashMap<Uuid, usize>>,
) -> Result<(), TestCaseError> {
    for n in 0..ACCOUNTS {
        let Some(stored) = store.read(&account(n)).await.unwrap() else {
            prop_assert!(!model.phone.contains_key(&n), "a synced account exists");
            continue;
        };
        let fired = hydrations
            .lock()
            .unwrap()
            .get(&stored.id)
            .copied()
            .unwrap_or(0);
        match model.phone.get(&n) {
            Some(phone) => {
                prop_assert_eq!(stored.record.state, HydrationState::Hydrated);
                prop_assert_eq!(
                    stored.record.field("telephone1"),
                    Some(&json!(phone.to_string())),
                    "real data intact"
                );
                prop_assert_eq!(fired, 1, "the hydration hook fired exactly once");
            }
            None => {
                prop_assert_eq!(
                    stored.record.state,
                    HydrationState::Placeholder,
                    "unsynced accounts are placeholders"
                );
                prop_assert_eq!(fired, 0);
            }
        }
    }
    for (contact, n) in &model.contacts {
        let stored = store.read(contact).await.unwrap();
        let parent = stored
            .as_ref()
            .and_then(|s| s.record.lookups.get("parentcustomerid"))
            .and_then(EntityRef::id);
        let account_id = store.read(&account(*n)).await.unwrap().map(|a| a.id);
        prop_assert!(
            parent.is_some() && parent == account_id,
            "every LOB write is present and points at its account"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn invariants_hold_under_any_interleaving(ops in prop::collection::vec(op(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.block_on(run(ops))?;
    }
}
