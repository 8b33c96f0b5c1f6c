//! One test per conformance scenario, so that a failure names the broken rule.

/// Expands to one `#[tokio::test]` per `RecordStore` conformance scenario. `$setup` is an async block that
/// evaluates to `(guard, store)`: the guard (an emulator, say) lives as long as the test.
#[macro_export]
macro_rules! conformance_scenarios {
    ($setup:expr) => {
        $crate::conformance_scenarios!(@each $setup;
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
            delete_by_id_then_create_again,
            delete_by_alternate_key,
            delete_of_a_missing_record_is_absent_every_time,
            delete_with_a_stale_version_is_rejected,
            delete_a_placeholder,
        );
    };
    (@each $setup:expr; $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_guard, store) = $setup.await;
            eventual_upsert::conformance::$name(&store).await;
        }
    )*};
}
