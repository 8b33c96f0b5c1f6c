//! The [`Ledger`] contract as reusable async scenarios (feature `conformance`).
//!
//! Every ledger implementation runs them: [`MemoryLedger`](crate::sync::MemoryLedger) in this crate's tests,
//! durable ledgers in theirs.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use eventual_upsert::sync::{ledger_conformance, MemoryLedger};
//! ledger_conformance::run_all(&MemoryLedger::new()).await;
//! # }
//! ```
//!
//! Scenarios panic (like `assert!`) on the first broken rule, naming it. Each one uses fresh random event ids,
//! sources and keys, so they can share a ledger that already holds data, one after the other; the dead-letter
//! scenarios count letters, so nothing else should add or remove dead letters while they run. Not covered by
//! semver: scenarios are added as the contract grows.

use std::fmt::Display;

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::key::EntityRef;
use crate::record::Record;
use crate::sync::event::ChangeEvent;
use crate::sync::ledger::{DeadLetter, Ledger, SourceRecord};

/// Runs every scenario, one after the other.
pub async fn run_all(ledger: &dyn Ledger) {
    processed_ids_are_remembered(ledger).await;
    applied_versions_only_go_up(ledger).await;
    checkpoints_are_per_source(ledger).await;
    dead_letters_merge_by_event_id(ledger).await;
    dead_letters_come_oldest_first_up_to_the_limit(ledger).await;
    dead_letters_are_removed_by_event_id(ledger).await;
    id_map_answers_both_ways(ledger).await;
    id_map_replacement_keeps_it_one_to_one(ledger).await;
    own_writes_are_known_by_instance_record_and_version(ledger).await;
}

fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

fn must<T>(result: Result<T>, what: impl Display) -> T {
    result.unwrap_or_else(|err| panic!("{what}: {err}"))
}

fn account(number: &str) -> EntityRef {
    EntityRef::by_key("account", [("accountnumber", number)]).unwrap_or_else(|e| panic!("{e}"))
}

fn source_record(source: &str) -> SourceRecord {
    SourceRecord::new(source, account(&fresh("A")))
}

fn letter(event_id: &str, first_failed_ms: u64, attempts: u32, error: &str) -> DeadLetter {
    let mut record = Record::new(account(&fresh("A")));
    record.fields.insert(
        crate::ColumnName::new("name").unwrap_or_else(|e| panic!("{e}")),
        serde_json::json!("Fabrikam, \"Inc.\" ünïcode"),
    );
    let event = ChangeEvent::upsert("us", &record, 7)
        .with_event_id(event_id)
        .with_origin("lob-app");
    let error = Error::Backend {
        backend: "target".into(),
        message: error.into(),
        retryable: false,
        source: None,
    };
    DeadLetter::new(event, &error, attempts, first_failed_ms)
}

async fn our_letters(ledger: &dyn Ledger, ids: &[&str]) -> Vec<DeadLetter> {
    let all = must(
        ledger.dead_letters(usize::MAX).await,
        "listing dead letters",
    );
    all.into_iter()
        .filter(|letter| ids.contains(&letter.event.event_id.as_str()))
        .collect()
}

/// An event id is unknown until recorded, then known for good; recording twice is harmless; recording without a
/// version leaves the record's applied version alone.
pub async fn processed_ids_are_remembered(ledger: &dyn Ledger) {
    let id = fresh("event");
    let other = fresh("event");
    let record = source_record(&fresh("src"));
    assert!(
        !must(ledger.is_processed(&id).await, "is_processed"),
        "a fresh event id is not processed"
    );
    must(
        ledger.record_processed(&id, &record, None).await,
        "record_processed",
    );
    assert!(
        must(ledger.is_processed(&id).await, "is_processed"),
        "a recorded event id is processed"
    );
    must(
        ledger.record_processed(&id, &record, None).await,
        "record_processed again",
    );
    assert!(
        must(ledger.is_processed(&id).await, "is_processed"),
        "recording twice keeps the id processed"
    );
    assert!(
        !must(ledger.is_processed(&other).await, "is_processed"),
        "recording one id does not mark another"
    );
    assert_eq!(
        must(ledger.applied_version(&record).await, "applied_version"),
        None,
        "an event recorded as skipped sets no applied version"
    );
}

/// The applied version is the highest one recorded, per record and per source.
pub async fn applied_versions_only_go_up(ledger: &dyn Ledger) {
    let source = fresh("src");
    let record = source_record(&source);
    let same_key_elsewhere = SourceRecord::new(fresh("src"), record.reference.clone());
    let neighbour = source_record(&source);
    assert_eq!(
        must(ledger.applied_version(&record).await, "applied_version"),
        None,
        "a fresh record has no applied version"
    );
    let steps = [(5, 5), (3, 5), (9, 9), (9, 9), (0, 9)];
    for (recorded, expected) in steps {
        must(
            ledger
                .record_processed(&fresh("event"), &record, Some(recorded))
                .await,
            "record_processed",
        );
        assert_eq!(
            must(ledger.applied_version(&record).await, "applied_version"),
            Some(expected),
            "after recording version {recorded} the applied version is the highest so far"
        );
    }
    must(
        ledger
            .record_processed(&fresh("event"), &record, None)
            .await,
        "record_processed",
    );
    assert_eq!(
        must(ledger.applied_version(&record).await, "applied_version"),
        Some(9),
        "a skipped event leaves the applied version alone"
    );
    must(
        ledger
            .record_processed(&fresh("event"), &neighbour, Some(u64::MAX))
            .await,
        "record_processed",
    );
    assert_eq!(
        must(ledger.applied_version(&neighbour).await, "applied_version"),
        Some(u64::MAX),
        "the full u64 range is kept"
    );
    assert_eq!(
        must(ledger.applied_version(&record).await, "applied_version"),
        Some(9),
        "versions are per record"
    );
    assert_eq!(
        must(
            ledger.applied_version(&same_key_elsewhere).await,
            "applied_version"
        ),
        None,
        "the same key at another source is another record"
    );
}

/// Checkpoints start empty, are replaced by saving, and belong to one source.
pub async fn checkpoints_are_per_source(ledger: &dyn Ledger) {
    let (us, eu) = (fresh("us"), fresh("eu"));
    assert_eq!(
        must(ledger.checkpoint(&us).await, "checkpoint"),
        None,
        "a fresh source has no checkpoint"
    );
    let token = "https://us.example/api/data/v9.2/accounts?$deltatoken=919042%2108%2f22%2f2017";
    must(ledger.save_checkpoint(&us, token).await, "save_checkpoint");
    must(ledger.save_checkpoint(&eu, "eu-1").await, "save_checkpoint");
    assert_eq!(
        must(ledger.checkpoint(&us).await, "checkpoint").as_deref(),
        Some(token),
        "a saved checkpoint reads back exactly"
    );
    must(ledger.save_checkpoint(&us, "us-2").await, "save_checkpoint");
    assert_eq!(
        must(ledger.checkpoint(&us).await, "checkpoint").as_deref(),
        Some("us-2"),
        "saving replaces the checkpoint"
    );
    assert_eq!(
        must(ledger.checkpoint(&eu).await, "checkpoint").as_deref(),
        Some("eu-1"),
        "checkpoints are per source"
    );
}

/// A second dead letter for one event keeps the first failure time, adds the attempts, and takes the rest from
/// the newer letter; the payload survives intact.
pub async fn dead_letters_merge_by_event_id(ledger: &dyn Ledger) {
    let id = fresh("dead");
    let before = must(ledger.dead_letter_count().await, "dead_letter_count");
    let first = letter(&id, 1_000, 3, "first failure");
    must(
        ledger.add_dead_letter(first.clone()).await,
        "add_dead_letter",
    );
    assert_eq!(
        our_letters(ledger, &[&id]).await,
        [first],
        "a dead letter reads back exactly, payload included"
    );
    let mut second = letter(&id, 5_000, 2, "second failure");
    second.retryable = true;
    second.last_failed_ms = 6_000;
    must(
        ledger.add_dead_letter(second.clone()).await,
        "add_dead_letter",
    );
    assert_eq!(
        must(ledger.dead_letter_count().await, "dead_letter_count"),
        before + 1,
        "letters for one event id merge into one"
    );
    let merged = our_letters(ledger, &[&id]).await;
    let expected = DeadLetter {
        first_failed_ms: 1_000,
        attempts: 5,
        ..second
    };
    assert_eq!(
        merged,
        [expected],
        "the merge keeps first_failed_ms, adds attempts, takes the rest from the new letter"
    );
    must(ledger.remove_dead_letter(&id).await, "remove_dead_letter");
}

/// Dead letters list oldest first (ties by event id), and a limit returns a prefix of that order.
pub async fn dead_letters_come_oldest_first_up_to_the_limit(ledger: &dyn Ledger) {
    let prefix = fresh("order");
    let ids: Vec<String> = ["c", "a", "d", "b"]
        .iter()
        .map(|suffix| format!("{prefix}-{suffix}"))
        .collect();
    let times = [30, 10, 10, 20];
    for (id, time) in ids.iter().zip(times) {
        must(
            ledger
                .add_dead_letter(letter(id, time, 1, "poisoned"))
                .await,
            "add_dead_letter",
        );
    }
    let ours: Vec<&str> = ids.iter().map(String::as_str).collect();
    let listed: Vec<String> = our_letters(ledger, &ours)
        .await
        .into_iter()
        .map(|letter| letter.event.event_id)
        .collect();
    let expected = [&ids[1], &ids[2], &ids[3], &ids[0]].map(String::clone);
    assert_eq!(
        listed, expected,
        "oldest first_failed_ms first, ties by event id"
    );

    let all = must(ledger.dead_letters(usize::MAX).await, "dead_letters");
    assert!(
        all.windows(2)
            .all(|w| (w[0].first_failed_ms, &w[0].event.event_id)
                <= (w[1].first_failed_ms, &w[1].event.event_id)),
        "the whole listing is sorted"
    );
    for limit in [0, 1, 2, all.len()] {
        let limited = must(ledger.dead_letters(limit).await, "dead_letters");
        assert_eq!(
            limited,
            all[..limit.min(all.len())],
            "a limit of {limit} returns the first {limit} of the listing"
        );
    }
    for id in &ids {
        must(ledger.remove_dead_letter(id).await, "remove_dead_letter");
    }
}

/// Removing a dead letter says whether there was one, and it is gone afterwards.
pub async fn dead_letters_are_removed_by_event_id(ledger: &dyn Ledger) {
    let (id, kept) = (fresh("remove"), fresh("keep"));
    must(
        ledger.add_dead_letter(letter(&id, 5, 1, "x")).await,
        "add_dead_letter",
    );
    must(
        ledger.add_dead_letter(letter(&kept, 5, 1, "y")).await,
        "add_dead_letter",
    );
    let count = must(ledger.dead_letter_count().await, "dead_letter_count");
    assert!(
        must(ledger.remove_dead_letter(&id).await, "remove_dead_letter"),
        "removing an existing dead letter reports true"
    );
    assert_eq!(
        must(ledger.dead_letter_count().await, "dead_letter_count"),
        count - 1,
        "removing takes one letter away"
    );
    assert!(
        our_letters(ledger, &[&id]).await.is_empty(),
        "a removed letter is not listed"
    );
    assert!(
        !must(ledger.remove_dead_letter(&id).await, "remove_dead_letter"),
        "removing it again reports false"
    );
    assert!(
        !must(
            ledger.remove_dead_letter(&fresh("never")).await,
            "remove_dead_letter"
        ),
        "removing an unknown id reports false"
    );
    assert_eq!(
        our_letters(ledger, &[&kept]).await.len(),
        1,
        "removing one letter leaves the others"
    );
    must(ledger.remove_dead_letter(&kept).await, "remove_dead_letter");
}

/// A mapping answers from both sides; unknown records have none; mapping again is harmless.
pub async fn id_map_answers_both_ways(ledger: &dyn Ledger) {
    let source = source_record(&fresh("src"));
    let target = EntityRef::by_id("account", Uuid::new_v4()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        must(ledger.target_of(&source).await, "target_of"),
        None,
        "an unmapped source record has no target"
    );
    assert_eq!(
        must(ledger.source_of(&target).await, "source_of"),
        None,
        "an unmapped target has no source record"
    );
    for _ in 0..2 {
        must(ledger.map_record(&source, &target).await, "map_record");
        assert_eq!(
            must(ledger.target_of(&source).await, "target_of"),
            Some(target.clone()),
            "target_of answers the mapped target"
        );
        assert_eq!(
            must(ledger.source_of(&target).await, "source_of"),
            Some(source.clone()),
            "source_of answers the mapped source record"
        );
    }
    let same_key_elsewhere = SourceRecord::new(fresh("src"), source.reference.clone());
    assert_eq!(
        must(ledger.target_of(&same_key_elsewhere).await, "target_of"),
        None,
        "the same key at another source is another record"
    );
}

/// Remapping a source record frees its old target; mapping a target another record held takes it from that
/// record.
pub async fn id_map_replacement_keeps_it_one_to_one(ledger: &dyn Ledger) {
    let source = fresh("src");
    let (s1, s2) = (source_record(&source), source_record(&source));
    let (t1, t2) = (account(&fresh("T")), account(&fresh("T")));
    must(ledger.map_record(&s1, &t1).await, "map_record");
    must(ledger.map_record(&s1, &t2).await, "map_record");
    assert_eq!(
        must(ledger.target_of(&s1).await, "target_of"),
        Some(t2.clone()),
        "remapping replaces the target"
    );
    assert_eq!(
        must(ledger.source_of(&t1).await, "source_of"),
        None,
        "remapping removes the old reverse entry"
    );
    assert_eq!(
        must(ledger.source_of(&t2).await, "source_of"),
        Some(s1.clone()),
        "the new reverse entry is there"
    );

    must(ledger.map_record(&s2, &t2).await, "map_record");
    assert_eq!(
        must(ledger.source_of(&t2).await, "source_of"),
        Some(s2.clone()),
        "a target mapped again answers its new source record"
    );
    assert_eq!(
        must(ledger.target_of(&s1).await, "target_of"),
        None,
        "the source record that lost its target has none"
    );
    assert_eq!(
        must(ledger.target_of(&s2).await, "target_of"),
        Some(t2),
        "the new mapping answers forward"
    );
}

/// The integration's own writes are recognised by instance, record and exact version, and nothing else.
pub async fn own_writes_are_known_by_instance_record_and_version(ledger: &dyn Ledger) {
    let instance = fresh("eu");
    let record = EntityRef::by_id("account", Uuid::new_v4()).unwrap_or_else(|e| panic!("{e}"));
    must(
        ledger.record_own_write(&instance, &record, 42).await,
        "recording an own write",
    );
    must(
        ledger.record_own_write(&instance, &record, 42).await,
        "recording it again (idempotent)",
    );
    assert!(
        must(ledger.is_own_write(&instance, &record, 42).await, "asking"),
        "an own write is known"
    );
    assert!(
        !must(ledger.is_own_write(&instance, &record, 43).await, "asking"),
        "a later version (someone else's edit) is not an own write"
    );
    assert!(
        !must(
            ledger.is_own_write(&fresh("us"), &record, 42).await,
            "asking"
        ),
        "own writes are per instance"
    );
}
