//! The `RecordStore` + `EnsureExists` contract, run against the in-memory adapter: one test per scenario so a
//! failure names the broken rule.

use std::sync::Arc;

use eventual_upsert::memory::MemoryStore;
use eventual_upsert::{RecordStore, conformance};

fn store() -> Arc<dyn RecordStore> {
    Arc::new(MemoryStore::new(conformance::schema()).named("conformance"))
}

macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            conformance::$name(&store()).await;
        }
    )*};
}

scenarios!(
    create_read_update,
    unchanged_write_keeps_version,
    null_clears_a_field,
    ensure_creates_missing_and_leaves_existing_untouched,
    ensure_deduplicates_references,
    concurrent_ensure_creates_exactly_one,
    create_only_on_existing_leaves_it_untouched,
    update_only_on_missing_fails,
    stale_version_is_rejected,
    missing_lookup_target_is_named,
    lookups_resolve_by_id_and_by_key,
    batch_reports_every_item,
    composite_alternate_keys,
    alternate_keys_are_unique,
    placeholder_never_downgrades_hydrated,
    bad_input_is_a_typed_error,
);

/// All scenarios on one shared store, as an adapter's suite would run them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_scenarios_share_one_store() {
    conformance::run_all(&store()).await;
}
