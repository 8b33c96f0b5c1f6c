//! The `Ledger` contract, run against the in-memory ledger: one test per scenario so a failure names the broken
//! rule, then all of them on one shared ledger, directly and behind `Arc<dyn Ledger>`.

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

scenarios!(
    processed_ids_are_remembered,
    applied_versions_only_go_up,
    tombstones_hold_until_a_newer_version,
    checkpoints_are_per_source,
    dead_letters_merge_by_event_id,
    dead_letters_come_oldest_first_up_to_the_limit,
    resolved_dead_letters_are_removed,
    id_map_is_many_to_one,
    own_writes_are_known_by_instance_record_and_version,
    tasks_are_enqueued_once_and_claimed_when_due,
    task_changes_follow_the_rules,
    totals_add_up,
    concurrent_settlements_lose_nothing,
    a_whole_settlement_reads_back,
    retention_prunes_only_what_it_should,
);

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
