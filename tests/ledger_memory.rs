//! The `Ledger` contract, run against the in-memory ledger: one test per scenario so a failure names the broken
//! rule, then all of them on one shared ledger, directly and behind `Arc<dyn Ledger>`.

#[macro_use]
#[path = "common/ledger_scenarios.rs"]
mod ledger_scenarios;

use std::sync::Arc;

use eventual_upsert::sync::{Ledger, MemoryLedger, ledger_conformance};

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            ledger_conformance::$name(&MemoryLedger::new()).await;
        }
    )*};
}

for_each_ledger_scenario!(scenarios);

#[tokio::test]
async fn run_all_on_one_shared_ledger() {
    let ledger = MemoryLedger::new();
    ledger_conformance::run_all(&ledger).await;
    // Twice: the scenarios must not trip over the data they left behind.
    ledger_conformance::run_all(&ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_behind_a_shared_pointer() {
    let ledger: Arc<dyn Ledger> = Arc::new(MemoryLedger::new());
    ledger_conformance::run_all(&ledger).await;
    let boxed: Box<dyn Ledger> = Box::new(ledger.clone());
    ledger_conformance::run_all(&boxed).await;
}

#[tokio::test]
async fn a_ledger_restored_from_its_snapshot_passes_too() {
    let ledger = MemoryLedger::new();
    ledger_conformance::run_all(&ledger).await;
    let restored = MemoryLedger::from_snapshot(ledger.snapshot());
    assert_eq!(restored.snapshot(), ledger.snapshot());
    ledger_conformance::run_all(&restored).await;
}
