//! The [`Ledger`] contract as reusable async scenarios (feature `conformance`).
//!
//! Every ledger implementation runs them: [`MemoryLedger`](crate::sync::MemoryLedger), `SqliteLedger` and
//! `PostgresLedger` in this crate's tests, other ledgers in theirs.
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
//! sources, keys and task ids, so they can share a ledger that already holds data, one after the other; the
//! dead-letter scenarios count letters, so nothing else should add or remove dead letters while they run, and
//! [`retention_prunes_only_what_it_should`] removes old entries of every scenario (it runs last in [`run_all`]).
//! Not covered by semver: scenarios are added as the contract grows.

use std::fmt::Display;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::key::EntityRef;
use crate::record::Record;
use crate::sync::event::ChangeEvent;
use crate::sync::ledger::{
    AppliedVersion, Checkpoint, DeadLetter, IdMapping, Ledger, LedgerQuery, OwnWrite, Retention,
    SettledEvent, Settlement, SourceRecord,
};
use crate::sync::tasks::{DeferredTask, TaskChange, TaskStatus};

pub use crate::sync::ledger::MAX_VERSION;

/// Runs every scenario, one after the other.
pub async fn run_all(ledger: &dyn Ledger) {
    processed_ids_are_remembered(ledger).await;
    applied_versions_only_go_up(ledger).await;
    tombstones_hold_until_a_newer_version(ledger).await;
    checkpoints_are_per_source(ledger).await;
    dead_letters_merge_by_event_id(ledger).await;
    dead_letters_come_oldest_first_up_to_the_limit(ledger).await;
    resolved_dead_letters_are_removed(ledger).await;
    id_map_is_many_to_one(ledger).await;
    own_writes_are_known_by_instance_record_and_version(ledger).await;
    tasks_are_enqueued_once_and_claimed_when_due(ledger).await;
    task_changes_follow_the_rules(ledger).await;
    totals_add_up(ledger).await;
    concurrent_settlements_lose_nothing(ledger).await;
    a_whole_settlement_reads_back(ledger).await;
    retention_prunes_only_what_it_should(ledger).await;
}

fn fresh(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::new_v4().simple())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn must<T>(result: Result<T>, what: impl Display) -> T {
    result.unwrap_or_else(|err| panic!("{what}: {err}"))
}

fn account(number: &str) -> EntityRef {
    EntityRef::by_key("account", [("accountnumber", number)]).unwrap_or_else(|e| panic!("{e}"))
}

fn by_id(table: &str) -> EntityRef {
    EntityRef::by_id(table, Uuid::new_v4()).unwrap_or_else(|e| panic!("{e}"))
}

fn source_record(source: &str) -> SourceRecord {
    SourceRecord::new(source, account(&fresh("A")))
}

fn settled(event_id: &str, record: &SourceRecord, applied: Option<(u64, bool)>) -> SettledEvent {
    SettledEvent {
        event_id: event_id.to_owned(),
        record: record.clone(),
        applied: applied.map(|(version, deleted)| AppliedVersion { version, deleted }),
    }
}

async fn settle(ledger: &dyn Ledger, settlement: Settlement, what: &str) {
    must(ledger.settle(&settlement).await, what);
}

async fn settle_events(ledger: &dyn Ledger, events: Vec<SettledEvent>) {
    let mut s = Settlement::at(now_ms());
    s.events = events;
    settle(ledger, s, "settling events").await;
}

async fn applied(ledger: &dyn Ledger, record: &SourceRecord) -> Option<AppliedVersion> {
    let query = LedgerQuery {
        records: vec![record.clone()],
        ..LedgerQuery::default()
    };
    must(ledger.lookup(&query).await, "lookup of applied versions")
        .applied
        .get(record)
        .copied()
}

async fn is_processed(ledger: &dyn Ledger, event_id: &str) -> bool {
    let query = LedgerQuery {
        event_ids: vec![event_id.to_owned()],
        ..LedgerQuery::default()
    };
    must(ledger.lookup(&query).await, "lookup of event ids")
        .processed
        .contains(event_id)
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

async fn add_letters(ledger: &dyn Ledger, letters: Vec<DeadLetter>) {
    let mut s = Settlement::at(now_ms());
    s.dead_letters = letters;
    settle(ledger, s, "settling dead letters").await;
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

async fn our_tasks(ledger: &dyn Ledger, ids: &[&str]) -> Vec<DeferredTask> {
    must(ledger.tasks(usize::MAX).await, "listing tasks")
        .into_iter()
        .filter(|task| ids.contains(&task.id.as_str()))
        .collect()
}

async fn claim_ours(ledger: &dyn Ledger, now: u64, lease_ms: u64, ids: &[&str]) -> Vec<String> {
    let claimed = must(
        ledger
            .claim_tasks(now, Duration::from_millis(lease_ms), usize::MAX)
            .await,
        "claiming tasks",
    );
    claimed
        .into_iter()
        .map(|task| task.id)
        .filter(|id| ids.contains(&id.as_str()))
        .collect()
}

async fn change_tasks(ledger: &dyn Ledger, at_ms: u64, changes: Vec<TaskChange>) {
    let mut s = Settlement::at(at_ms);
    s.tasks = changes;
    settle(ledger, s, "settling task changes").await;
}

/// An event id is unknown until settled, then known; settling twice is harmless; an event settled without a
/// version leaves the record's applied version alone.
pub async fn processed_ids_are_remembered(ledger: &dyn Ledger) {
    let id = fresh("event");
    let other = fresh("event");
    let record = source_record(&fresh("src"));
    assert!(
        !is_processed(ledger, &id).await,
        "a fresh event id is not processed"
    );
    settle_events(ledger, vec![settled(&id, &record, None)]).await;
    assert!(
        is_processed(ledger, &id).await,
        "a settled event id is processed"
    );
    settle_events(ledger, vec![settled(&id, &record, None)]).await;
    assert!(
        is_processed(ledger, &id).await,
        "settling twice keeps the id processed"
    );
    assert!(
        !is_processed(ledger, &other).await,
        "settling one id does not mark another"
    );
    assert_eq!(
        applied(ledger, &record).await,
        None,
        "an event settled as skipped sets no applied version"
    );
    let query = LedgerQuery {
        event_ids: vec![id.clone(), other.clone(), id.clone()],
        ..LedgerQuery::default()
    };
    let view = must(ledger.lookup(&query).await, "lookup");
    assert!(
        view.processed.contains(&id) && !view.processed.contains(&other),
        "a lookup of several ids (one repeated) answers each"
    );
}

/// The applied version is the highest one settled, per record and per source, up to [`MAX_VERSION`].
pub async fn applied_versions_only_go_up(ledger: &dyn Ledger) {
    let source = fresh("src");
    let record = source_record(&source);
    let same_key_elsewhere = SourceRecord::new(fresh("src"), record.reference.clone());
    let neighbour = source_record(&source);
    assert_eq!(
        applied(ledger, &record).await,
        None,
        "a fresh record has no applied version"
    );
    for (settled_version, expected) in [(5, 5), (3, 5), (9, 9), (9, 9), (0, 9)] {
        settle_events(
            ledger,
            vec![settled(
                &fresh("event"),
                &record,
                Some((settled_version, false)),
            )],
        )
        .await;
        assert_eq!(
            applied(ledger, &record).await.map(|a| a.version),
            Some(expected),
            "after settling version {settled_version} the applied version is the highest so far"
        );
    }
    // Two versions of one record in one settlement: the higher wins, whatever the order.
    settle_events(
        ledger,
        vec![
            settled(&fresh("event"), &record, Some((12, false))),
            settled(&fresh("event"), &record, Some((11, false))),
        ],
    )
    .await;
    assert_eq!(
        applied(ledger, &record).await.map(|a| a.version),
        Some(12),
        "within one settlement the higher version wins"
    );
    settle_events(
        ledger,
        vec![settled(
            &fresh("event"),
            &neighbour,
            Some((MAX_VERSION, false)),
        )],
    )
    .await;
    assert_eq!(
        applied(ledger, &neighbour).await.map(|a| a.version),
        Some(MAX_VERSION),
        "versions up to MAX_VERSION are kept exactly"
    );
    assert_eq!(
        applied(ledger, &record).await.map(|a| a.version),
        Some(12),
        "versions are per record"
    );
    assert_eq!(
        applied(ledger, &same_key_elsewhere).await,
        None,
        "the same key at another source is another record"
    );
}

/// A delete's version is a tombstone: older versions do not replace it, a newer one does.
pub async fn tombstones_hold_until_a_newer_version(ledger: &dyn Ledger) {
    let record = source_record(&fresh("src"));
    settle_events(
        ledger,
        vec![settled(&fresh("event"), &record, Some((5, true)))],
    )
    .await;
    let tombstone = AppliedVersion {
        version: 5,
        deleted: true,
    };
    assert_eq!(
        applied(ledger, &record).await,
        Some(tombstone),
        "a delete is remembered"
    );
    settle_events(
        ledger,
        vec![settled(&fresh("event"), &record, Some((4, false)))],
    )
    .await;
    assert_eq!(
        applied(ledger, &record).await,
        Some(tombstone),
        "an older update does not lift the tombstone"
    );
    settle_events(
        ledger,
        vec![settled(&fresh("event"), &record, Some((6, false)))],
    )
    .await;
    assert_eq!(
        applied(ledger, &record).await,
        Some(AppliedVersion {
            version: 6,
            deleted: false
        }),
        "a newer version replaces the tombstone"
    );
}

/// Checkpoints start empty, are replaced by settling, and belong to one source.
pub async fn checkpoints_are_per_source(ledger: &dyn Ledger) {
    let (us, eu) = (fresh("us"), fresh("eu"));
    assert_eq!(
        must(ledger.checkpoint(&us).await, "checkpoint"),
        None,
        "a fresh source has no checkpoint"
    );
    let token = "https://us.example/api/data/v9.2/accounts?$deltatoken=919042%2108%2f22%2f2017";
    for (source, token) in [(&us, token), (&eu, "eu-1")] {
        let mut s = Settlement::at(now_ms());
        s.checkpoint = Some(Checkpoint {
            source: source.clone(),
            token: token.to_owned(),
        });
        settle(ledger, s, "settling a checkpoint").await;
    }
    assert_eq!(
        must(ledger.checkpoint(&us).await, "checkpoint").as_deref(),
        Some(token),
        "a saved checkpoint reads back exactly"
    );
    let mut s = Settlement::at(now_ms());
    s.checkpoint = Some(Checkpoint {
        source: us.clone(),
        token: "us-2".into(),
    });
    settle(ledger, s, "settling a checkpoint").await;
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

/// A second letter for the same event merges: first failure time kept, attempts added, the rest from the newer.
pub async fn dead_letters_merge_by_event_id(ledger: &dyn Ledger) {
    let id = fresh("event");
    let first = letter(&id, 1_000, 3, "first failure");
    add_letters(ledger, vec![first.clone()]).await;
    let mut second = letter(&id, 2_000, 2, "second failure");
    second.last_failed_ms = 2_500;
    add_letters(ledger, vec![second.clone()]).await;
    let ours = our_letters(ledger, &[&id]).await;
    assert_eq!(ours.len(), 1, "one letter per event id");
    let merged = &ours[0];
    assert_eq!(merged.first_failed_ms, 1_000, "first failure time is kept");
    assert_eq!(
        merged.last_failed_ms, 2_500,
        "last failure time is the newer"
    );
    assert_eq!(merged.attempts, 5, "attempts add up");
    assert_eq!(merged.error, second.error, "the error is the newer");
    assert_eq!(
        merged.event, second.event,
        "the event payload reads back exactly"
    );
}

/// Letters list oldest first (then by event id), at most `limit`, and are counted.
pub async fn dead_letters_come_oldest_first_up_to_the_limit(ledger: &dyn Ledger) {
    let before = must(ledger.dead_letter_count().await, "dead_letter_count");
    let ids: Vec<String> = (0..3).map(|_| fresh("event")).collect();
    add_letters(
        ledger,
        vec![
            letter(&ids[0], 30, 1, "c"),
            letter(&ids[1], 10, 1, "a"),
            letter(&ids[2], 20, 1, "b"),
        ],
    )
    .await;
    assert_eq!(
        must(ledger.dead_letter_count().await, "dead_letter_count"),
        before + 3,
        "each new letter counts"
    );
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let order: Vec<String> = our_letters(ledger, &refs)
        .await
        .into_iter()
        .map(|l| l.event.event_id)
        .collect();
    assert_eq!(
        order,
        [ids[1].clone(), ids[2].clone(), ids[0].clone()],
        "oldest first"
    );
    let limited = must(ledger.dead_letters(1).await, "dead_letters");
    assert_eq!(limited.len(), 1, "the limit is honoured");
}

/// Resolving removes a letter; resolving an unknown id changes nothing.
pub async fn resolved_dead_letters_are_removed(ledger: &dyn Ledger) {
    let (id, other) = (fresh("event"), fresh("event"));
    add_letters(
        ledger,
        vec![letter(&id, 5, 1, "x"), letter(&other, 6, 1, "y")],
    )
    .await;
    let before = must(ledger.dead_letter_count().await, "dead_letter_count");
    let mut s = Settlement::at(now_ms());
    s.resolved = vec![id.clone(), fresh("unknown")];
    settle(ledger, s, "resolving").await;
    assert!(
        our_letters(ledger, &[&id]).await.is_empty(),
        "a resolved letter is gone"
    );
    assert_eq!(
        our_letters(ledger, &[&other]).await.len(),
        1,
        "other letters stay"
    );
    assert_eq!(
        must(ledger.dead_letter_count().await, "dead_letter_count"),
        before - 1,
        "the count drops by one"
    );
}

/// Several source addresses may name one target; an entry is re-pointed by settling it again.
pub async fn id_map_is_many_to_one(ledger: &dyn Ledger) {
    let source = fresh("src");
    let by_guid = SourceRecord::new(&source, by_id("account"));
    let by_key = source_record(&source);
    let unknown = source_record(&source);
    let target = by_id("account");
    let mut s = Settlement::at(now_ms());
    s.id_map = vec![
        IdMapping {
            source: by_guid.clone(),
            target: target.clone(),
        },
        IdMapping {
            source: by_key.clone(),
            target: target.clone(),
        },
    ];
    settle(ledger, s, "settling id map entries").await;
    let query = LedgerQuery {
        targets: vec![by_guid.clone(), by_key.clone(), unknown.clone()],
        ..LedgerQuery::default()
    };
    let view = must(ledger.lookup(&query).await, "lookup of targets");
    assert_eq!(view.targets.get(&by_guid), Some(&target), "by GUID");
    assert_eq!(
        view.targets.get(&by_key),
        Some(&target),
        "by alternate key, the same target"
    );
    assert!(
        !view.targets.contains_key(&unknown),
        "an unmapped record has no target"
    );
    let moved = by_id("account");
    let mut s = Settlement::at(now_ms());
    s.id_map = vec![IdMapping {
        source: by_key.clone(),
        target: moved.clone(),
    }];
    settle(ledger, s, "re-pointing").await;
    let view = must(ledger.lookup(&query).await, "lookup of targets");
    assert_eq!(view.targets.get(&by_key), Some(&moved), "re-pointed");
    assert_eq!(
        view.targets.get(&by_guid),
        Some(&target),
        "other aliases stay"
    );
}

/// An own write is known by instance, record and version, and nothing else.
pub async fn own_writes_are_known_by_instance_record_and_version(ledger: &dyn Ledger) {
    let instance = fresh("eu");
    let record = by_id("account");
    let own = OwnWrite {
        instance: instance.clone(),
        record: record.clone(),
        version: 42,
    };
    let mut s = Settlement::at(now_ms());
    s.own_writes = vec![own.clone()];
    settle(ledger, s, "settling an own write").await;
    let others = [
        OwnWrite {
            version: 43,
            ..own.clone()
        },
        OwnWrite {
            instance: fresh("us"),
            ..own.clone()
        },
        OwnWrite {
            record: by_id("account"),
            ..own.clone()
        },
    ];
    let mut asked = vec![own.clone()];
    asked.extend(others.iter().cloned());
    let query = LedgerQuery {
        own_writes: asked,
        ..LedgerQuery::default()
    };
    let view = must(ledger.lookup(&query).await, "lookup of own writes");
    assert!(view.own_writes.contains(&own), "the own write is known");
    for other in &others {
        assert!(
            !view.own_writes.contains(other),
            "{other:?} differs in one part and is not an own write"
        );
    }
}

/// A task is enqueued once per id, claimed when due, not handed out again within its lease, and again after.
pub async fn tasks_are_enqueued_once_and_claimed_when_due(ledger: &dyn Ledger) {
    let now = now_ms();
    let (id, later) = (fresh("task"), fresh("task"));
    let record = by_id("account");
    let payload =
        serde_json::json!({"invoice": "INV-1", "amount": 12.5, "note": "ünïcode \"quoted\""});
    let task = DeferredTask::new(&id, "send_invoice", record.clone(), payload.clone(), now);
    let mut not_yet = DeferredTask::new(&later, "send_invoice", record.clone(), payload, now);
    not_yet.due_ms = now + 60_000;
    change_tasks(
        ledger,
        now,
        vec![
            TaskChange::Enqueue(task.clone()),
            TaskChange::Enqueue(not_yet),
        ],
    )
    .await;
    let mut again = task.clone();
    again.handler = "other".into();
    change_tasks(ledger, now, vec![TaskChange::Enqueue(again)]).await;
    let stored = our_tasks(ledger, &[&id]).await;
    assert_eq!(
        stored,
        std::slice::from_ref(&task),
        "a task reads back exactly, and enqueuing its id again changes nothing"
    );
    let claimed = claim_ours(ledger, now, 1_000, &[&id, &later]).await;
    assert_eq!(
        claimed,
        std::slice::from_ref(&id),
        "only the due task is claimed"
    );
    assert!(
        claim_ours(ledger, now + 500, 1_000, &[&id])
            .await
            .is_empty(),
        "a claimed task is not handed out again within its lease"
    );
    assert_eq!(
        claim_ours(ledger, now + 1_001, 1_000, &[&id]).await,
        std::slice::from_ref(&id),
        "after the lease it is handed out again"
    );
}

/// Release, wait, done and failed change tasks as [`TaskChange`] says.
pub async fn task_changes_follow_the_rules(ledger: &dyn Ledger) {
    let now = now_ms();
    let record = by_id("account");
    let ids: Vec<String> = (0..4).map(|_| fresh("task")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut enqueue = Vec::new();
    for id in &ids {
        let mut task = DeferredTask::new(id, "h", record.clone(), serde_json::Value::Null, now);
        task.due_ms = now + 3_600_000;
        enqueue.push(TaskChange::Enqueue(task));
    }
    change_tasks(ledger, now, enqueue).await;
    assert!(
        claim_ours(ledger, now, 10, &refs).await.is_empty(),
        "nothing is due yet"
    );
    change_tasks(ledger, now, vec![TaskChange::Release(record.clone())]).await;
    let mut claimed = claim_ours(ledger, now, 10, &refs).await;
    claimed.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(
        claimed, expected,
        "releasing the record makes its pending tasks due"
    );
    let later = now + 100;
    change_tasks(
        ledger,
        later,
        vec![
            TaskChange::Done { id: ids[0].clone() },
            TaskChange::Failed {
                id: ids[1].clone(),
                error: "smtp down".into(),
                retry_at_ms: Some(later + 50),
            },
            TaskChange::Failed {
                id: ids[2].clone(),
                error: "bad payload".into(),
                retry_at_ms: None,
            },
            TaskChange::Wait {
                id: ids[3].clone(),
                due_ms: later + 70,
            },
        ],
    )
    .await;
    let tasks = our_tasks(ledger, &refs).await;
    let find = |id: &str| {
        tasks
            .iter()
            .find(|t| t.id == id)
            .unwrap_or_else(|| panic!("task {id} is listed"))
    };
    let done = find(&ids[0]);
    assert_eq!((done.status, done.attempts), (TaskStatus::Done, 1), "done");
    let retry = find(&ids[1]);
    assert_eq!(
        (
            retry.status,
            retry.attempts,
            retry.due_ms,
            retry.last_error.as_deref()
        ),
        (TaskStatus::Pending, 1, later + 50, Some("smtp down")),
        "a failure with a retry time stays pending, counts an attempt and keeps the error"
    );
    let failed = find(&ids[2]);
    assert_eq!(
        (failed.status, failed.attempts),
        (TaskStatus::Failed, 1),
        "a failure without a retry time gives up"
    );
    let waiting = find(&ids[3]);
    assert_eq!(
        (waiting.status, waiting.attempts, waiting.due_ms),
        (TaskStatus::Pending, 0, later + 70),
        "a wait is not an attempt"
    );
    let mut due = claim_ours(ledger, later + 100, 10, &refs).await;
    due.sort();
    let mut expected = vec![ids[1].clone(), ids[3].clone()];
    expected.sort();
    assert_eq!(due, expected, "done and failed tasks are never claimed");
}

/// Totals are the sum of every settlement's counters.
pub async fn totals_add_up(ledger: &dyn Ledger) {
    let before = must(ledger.totals().await, "totals");
    let mut s = Settlement::at(now_ms());
    s.stats.received = 3;
    s.stats.applied = 2;
    s.stats.duplicate = 1;
    s.stats.hydrated = 1;
    settle(ledger, s.clone(), "settling counters").await;
    settle(ledger, s, "settling counters").await;
    let after = must(ledger.totals().await, "totals");
    assert_eq!(after.received - before.received, 6, "received adds up");
    assert_eq!(after.applied - before.applied, 4, "applied adds up");
    assert_eq!(after.duplicate - before.duplicate, 2, "duplicate adds up");
    assert_eq!(after.hydrated - before.hydrated, 2, "hydrated adds up");
}

/// Settlements made at the same time from several tasks all take effect.
pub async fn concurrent_settlements_lose_nothing(ledger: &dyn Ledger) {
    let before = must(ledger.totals().await, "totals");
    let record = source_record(&fresh("src"));
    let settlements: Vec<Settlement> = (1..=8)
        .map(|i| {
            let mut s = Settlement::at(now_ms());
            s.events = vec![settled(&fresh("event"), &record, Some((i, false)))];
            s.stats.received = 1;
            s
        })
        .collect();
    let results = futures_join_all(ledger, &settlements).await;
    for result in results {
        must(result, "a concurrent settlement");
    }
    let after = must(ledger.totals().await, "totals");
    assert_eq!(
        after.received - before.received,
        8,
        "every concurrent settlement counted"
    );
    assert_eq!(
        applied(ledger, &record).await.map(|a| a.version),
        Some(8),
        "the highest concurrent version wins"
    );
}

/// Runs the settlements concurrently on the calling task (borrowed futures cannot be spawned): each is polled in
/// turn until all are done, so a SQL ledger sees them on several pool connections at once.
async fn futures_join_all(ledger: &dyn Ledger, settlements: &[Settlement]) -> Vec<Result<()>> {
    let mut pending: Vec<_> = settlements
        .iter()
        .map(|s| Some(Box::pin(ledger.settle(s))))
        .collect();
    let mut results: Vec<Option<Result<()>>> = settlements.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (slot, result) in pending.iter_mut().zip(results.iter_mut()) {
            if let Some(future) = slot
                && let std::task::Poll::Ready(done) = future.as_mut().poll(cx)
            {
                *result = Some(done);
                *slot = None;
            }
        }
        match pending.iter().all(Option::is_none) {
            true => std::task::Poll::Ready(()),
            false => std::task::Poll::Pending,
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// One settlement carrying every kind of change reads back whole.
pub async fn a_whole_settlement_reads_back(ledger: &dyn Ledger) {
    let now = now_ms();
    let source = fresh("src");
    let record = source_record(&source);
    let event_id = fresh("event");
    let letter_id = fresh("event");
    let task_id = fresh("task");
    let target = by_id("account");
    let own = OwnWrite {
        instance: fresh("eu"),
        record: target.clone(),
        version: 3,
    };
    let mut s = Settlement::at(now);
    s.events = vec![settled(&event_id, &record, Some((3, false)))];
    s.id_map = vec![IdMapping {
        source: record.clone(),
        target: target.clone(),
    }];
    s.own_writes = vec![own.clone()];
    s.dead_letters = vec![letter(&letter_id, now, 1, "bad")];
    s.tasks = vec![TaskChange::Enqueue(DeferredTask::new(
        &task_id,
        "h",
        target.clone(),
        serde_json::json!([1, 2]),
        now,
    ))];
    s.checkpoint = Some(Checkpoint {
        source: source.clone(),
        token: "t-1".into(),
    });
    settle(ledger, s, "a settlement of every kind").await;
    let view = must(
        ledger
            .lookup(&LedgerQuery {
                event_ids: vec![event_id.clone()],
                records: vec![record.clone()],
                targets: vec![record.clone()],
                own_writes: vec![own.clone()],
            })
            .await,
        "lookup",
    );
    assert!(view.processed.contains(&event_id), "event settled");
    assert_eq!(
        view.applied.get(&record).map(|a| a.version),
        Some(3),
        "version"
    );
    assert_eq!(view.targets.get(&record), Some(&target), "id map");
    assert!(view.own_writes.contains(&own), "own write");
    assert_eq!(
        our_letters(ledger, &[&letter_id]).await.len(),
        1,
        "dead letter"
    );
    assert_eq!(our_tasks(ledger, &[&task_id]).await.len(), 1, "task");
    assert_eq!(
        must(ledger.checkpoint(&source).await, "checkpoint").as_deref(),
        Some("t-1"),
        "checkpoint"
    );
}

/// Pruning drops event ids and own writes older than their retention and done tasks past theirs; versions,
/// pending tasks, dead letters and checkpoints stay.
pub async fn retention_prunes_only_what_it_should(ledger: &dyn Ledger) {
    let retention = Retention {
        dedupe_window: Duration::from_secs(60),
        own_writes: Duration::from_secs(30),
        finished_tasks: Duration::from_secs(60),
    };
    let t0 = now_ms();
    let record = source_record(&fresh("src"));
    let (old, young) = (fresh("event"), fresh("event"));
    let own = OwnWrite {
        instance: fresh("eu"),
        record: by_id("account"),
        version: 1,
    };
    let (done, pending) = (fresh("task"), fresh("task"));
    let letter_id = fresh("event");
    let mut s = Settlement::at(t0);
    s.events = vec![settled(&old, &record, Some((4, false)))];
    s.own_writes = vec![own.clone()];
    s.dead_letters = vec![letter(&letter_id, t0, 1, "kept")];
    for id in [&done, &pending] {
        let mut task = DeferredTask::new(id, "h", by_id("account"), serde_json::Value::Null, t0);
        task.due_ms = t0 + 3_600_000;
        s.tasks.push(TaskChange::Enqueue(task));
    }
    s.tasks.push(TaskChange::Done { id: done.clone() });
    settle(ledger, s, "settling old entries").await;
    let mut s = Settlement::at(t0 + 50_000);
    s.events = vec![settled(&young, &record, None)];
    settle(ledger, s, "settling a younger entry").await;

    let pruned = must(ledger.prune(&retention, t0 + 61_000).await, "prune");
    assert!(
        pruned.event_ids >= 1 && pruned.own_writes >= 1 && pruned.tasks >= 1,
        "something of each kind was pruned: {pruned:?}"
    );
    assert!(
        !is_processed(ledger, &old).await,
        "an event id past the window is forgotten"
    );
    assert!(
        is_processed(ledger, &young).await,
        "an event id within the window is kept"
    );
    assert_eq!(
        applied(ledger, &record).await.map(|a| a.version),
        Some(4),
        "versions are kept for good"
    );
    let query = LedgerQuery {
        own_writes: vec![own.clone()],
        ..LedgerQuery::default()
    };
    assert!(
        !must(ledger.lookup(&query).await, "lookup")
            .own_writes
            .contains(&own),
        "an expired own write is forgotten"
    );
    let tasks = our_tasks(ledger, &[&done, &pending]).await;
    assert_eq!(
        tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        [pending.as_str()],
        "a finished task past its retention is pruned, a pending one stays"
    );
    assert_eq!(
        our_letters(ledger, &[&letter_id]).await.len(),
        1,
        "dead letters are never pruned"
    );
}
