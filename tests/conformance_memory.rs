//! The `RecordStore` + `EnsureExists` contract, run against the in-memory adapter: one test per scenario so a
//! failure names the broken rule.

use std::sync::Arc;

use eventual_upsert::memory::MemoryStore;
use eventual_upsert::{RecordStore, conformance};

fn store() -> Arc<dyn RecordStore> {
    Arc::new(MemoryStore::new(conformance::schema()).named("conformance"))
}

#[path = "common/scenarios.rs"]
#[macro_use]
mod scenarios;

conformance_scenarios!(async { ((), store()) });

/// All scenarios on one shared store, as an adapter's suite would run them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_scenarios_share_one_store() {
    conformance::run_all(&store()).await;
}
