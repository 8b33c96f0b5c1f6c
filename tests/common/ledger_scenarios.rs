//! The ledger conformance scenarios, listed once for every ledger's test file: `for_each_ledger_scenario!(m)` calls
//! `m!(name, ...)` with every scenario of `eventual_upsert::sync::ledger_conformance`.

macro_rules! for_each_ledger_scenario {
    ($each:ident) => {
        $each!(
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
    };
}
