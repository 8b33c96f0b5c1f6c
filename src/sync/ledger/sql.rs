//! What the SQL ledgers share: a [`Settlement`] flattened into rows, the canonical text of a record address,
//! checked integer conversions, row decoding with errors that name the table and row, and the mapping of sqlx
//! errors onto [`Error`].
//!
//! Rows are deduplicated the way [`MemoryLedger`](super::MemoryLedger) applies a settlement, so one statement per
//! kind gives the same result, and sorted, so concurrent workers lock rows in one order (no deadlocks between
//! settlements).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt::Display;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::key::{EntityRef, Key};
use crate::name::TableName;
use crate::sync::event::ChangeEvent;
use crate::sync::ledger::{DeadLetter, Settlement, SourceRecord};
use crate::sync::stats::{Counter, SyncStats};
use crate::sync::tasks::{DeferredTask, TaskChange, TaskStatus};

/// A record's address as stored: its table name and the canonical JSON of its key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Address {
    pub table: String,
    pub key: String,
}

impl Address {
    pub fn of(reference: &EntityRef) -> Result<Address> {
        // `Key` serializes deterministically (alternate keys are sorted maps), so equal keys are equal text.
        let key = serde_json::to_string(&reference.key).map_err(|err| Error::Backend {
            backend: "ledger".into(),
            message: format!("encoding the key of {reference}: {err}"),
            retryable: false,
            source: None,
        })?;
        Ok(Address {
            table: reference.table.as_str().to_owned(),
            key,
        })
    }
}

/// A source record as stored: (source, table, key).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct SourceAddress {
    pub source: String,
    pub address: Address,
}

impl SourceAddress {
    pub fn of(record: &SourceRecord) -> Result<SourceAddress> {
        Ok(SourceAddress {
            source: record.source.clone(),
            address: Address::of(&record.reference)?,
        })
    }
}

/// An own write as stored: (instance, table, key, version).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct OwnWriteRow {
    pub instance: String,
    pub address: Address,
    pub version: i64,
}

/// A dead letter as stored.
#[derive(Clone, Debug)]
pub(crate) struct LetterRow {
    pub event_id: String,
    pub event: String,
    pub error: String,
    pub retryable: bool,
    pub attempts: i64,
    pub correlation_id: String,
    pub first_failed_ms: i64,
    pub last_failed_ms: i64,
}

/// A deferred task as stored.
#[derive(Clone, Debug)]
pub(crate) struct TaskRow {
    pub id: String,
    pub handler: String,
    pub record: Address,
    pub payload: String,
    pub status: &'static str,
    pub attempts: i64,
    pub due_ms: i64,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// One step of a settlement's task changes. Changes apply in order (an enqueue and a `Done` for the same task may
/// share a settlement), so only runs of consecutive enqueues become one statement.
#[derive(Clone, Debug)]
pub(crate) enum TaskStep {
    /// Consecutive enqueues, sorted by id (the first of an id wins, as later ones find it there).
    Enqueue(Vec<TaskRow>),
    Release(Address),
    Wait {
        id: String,
        due_ms: i64,
    },
    Done {
        id: String,
    },
    Failed {
        id: String,
        error: String,
        retry_at_ms: Option<i64>,
    },
}

/// A settlement as rows, ready to bind.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    pub at_ms: i64,
    /// Settled event ids, sorted, each once.
    pub processed: Vec<String>,
    /// Per record, the version to raise it to: the highest settled (the first of equal ones), sorted.
    pub versions: Vec<(SourceAddress, i64, bool)>,
    /// Id-map entries, the last per source record, sorted.
    pub id_map: Vec<(SourceAddress, Address)>,
    /// Own writes, sorted, each once.
    pub own_writes: Vec<OwnWriteRow>,
    /// Dead letters, those for one event merged in order, sorted by event id.
    pub dead_letters: Vec<LetterRow>,
    /// Resolved event ids, sorted, each once.
    pub resolved: Vec<String>,
    pub tasks: Vec<TaskStep>,
    pub checkpoint: Option<(String, String)>,
    /// Non-zero counters to add, in [`Counter::ALL`] order (the order rows are locked in).
    pub totals: Vec<(&'static str, i64)>,
}

impl Rows {
    pub fn of(settlement: &Settlement) -> Result<Rows> {
        let at_ms = to_i64(settlement.at_ms, "the settlement time (at_ms)")?;
        let mut processed = Vec::with_capacity(settlement.events.len());
        let mut versions: BTreeMap<SourceAddress, (i64, bool)> = BTreeMap::new();
        for event in &settlement.events {
            processed.push(event.event_id.clone());
            let Some(applied) = event.applied else {
                continue;
            };
            let version = to_i64(applied.version, || {
                format!("the applied version of {}", event.record.reference)
            })?;
            match versions.entry(SourceAddress::of(&event.record)?) {
                Entry::Vacant(slot) => {
                    slot.insert((version, applied.deleted));
                }
                Entry::Occupied(mut slot) => {
                    if version > slot.get().0 {
                        slot.insert((version, applied.deleted));
                    }
                }
            }
        }
        processed.sort_unstable();
        processed.dedup();

        let mut id_map = BTreeMap::new();
        for mapping in &settlement.id_map {
            id_map.insert(
                SourceAddress::of(&mapping.source)?,
                Address::of(&mapping.target)?,
            );
        }

        let mut own_writes = settlement
            .own_writes
            .iter()
            .map(|own| {
                Ok(OwnWriteRow {
                    instance: own.instance.clone(),
                    address: Address::of(&own.record)?,
                    version: to_i64(own.version, || format!("the own write of {}", own.record))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        own_writes.sort_unstable();
        own_writes.dedup();

        let mut letters: BTreeMap<&str, DeadLetter> = BTreeMap::new();
        for letter in &settlement.dead_letters {
            match letters.entry(letter.event.event_id.as_str()) {
                Entry::Vacant(slot) => {
                    slot.insert(letter.clone());
                }
                Entry::Occupied(mut slot) => slot.get_mut().merge(letter.clone()),
            }
        }
        let dead_letters = letters
            .into_values()
            .map(|letter| letter_row(&letter))
            .collect::<Result<Vec<_>>>()?;

        let mut resolved = settlement.resolved.clone();
        resolved.sort_unstable();
        resolved.dedup();

        let mut tasks: Vec<TaskStep> = Vec::new();
        for change in &settlement.tasks {
            match change {
                TaskChange::Enqueue(task) => {
                    let row = task_row(task)?;
                    match tasks.last_mut() {
                        Some(TaskStep::Enqueue(run)) => run.push(row),
                        _ => tasks.push(TaskStep::Enqueue(vec![row])),
                    }
                }
                TaskChange::Release(record) => tasks.push(TaskStep::Release(Address::of(record)?)),
                TaskChange::Wait { id, due_ms } => tasks.push(TaskStep::Wait {
                    id: id.clone(),
                    due_ms: to_i64(*due_ms, || format!("the due time of task '{id}'"))?,
                }),
                TaskChange::Done { id } => tasks.push(TaskStep::Done { id: id.clone() }),
                TaskChange::Failed {
                    id,
                    error,
                    retry_at_ms,
                } => tasks.push(TaskStep::Failed {
                    id: id.clone(),
                    error: error.clone(),
                    retry_at_ms: retry_at_ms
                        .map(|at| to_i64(at, || format!("the retry time of task '{id}'")))
                        .transpose()?,
                }),
            }
        }

        // Stable: of two enqueues of one id, the first still comes first (and wins).
        for step in &mut tasks {
            if let TaskStep::Enqueue(run) = step {
                run.sort_by(|a, b| a.id.cmp(&b.id));
            }
        }

        Ok(Rows {
            at_ms,
            processed,
            versions: versions
                .into_iter()
                .map(|(record, (version, deleted))| (record, version, deleted))
                .collect(),
            id_map: id_map.into_iter().collect(),
            own_writes,
            dead_letters,
            resolved,
            tasks,
            checkpoint: settlement
                .checkpoint
                .as_ref()
                .map(|c| (c.source.clone(), c.token.clone())),
            totals: counters(&settlement.stats),
        })
    }
}

/// The non-zero counters of `stats`, clamped to what a signed 64-bit column holds.
fn counters(stats: &SyncStats) -> Vec<(&'static str, i64)> {
    Counter::ALL
        .into_iter()
        .filter(|counter| stats.get(*counter) > 0)
        .map(|counter| {
            let value = i64::try_from(stats.get(counter)).unwrap_or(i64::MAX);
            (counter.name(), value)
        })
        .collect()
}

/// Totals read back as (name, value) rows; names this build does not know (written by a newer one) are skipped.
pub(crate) fn totals_from(backend: &str, rows: Vec<(String, i64)>) -> Result<SyncStats> {
    let mut stats = SyncStats::default();
    for (name, value) in rows {
        let Some(counter) = Counter::ALL.into_iter().find(|c| c.name() == name) else {
            continue;
        };
        let value = u64::try_from(value).map_err(|_| {
            bad_row(
                backend,
                "reading totals",
                "totals",
                &name,
                "value",
                format!("is negative ({value})"),
            )
        })?;
        stats.count(counter, value);
    }
    Ok(stats)
}

fn letter_row(letter: &DeadLetter) -> Result<LetterRow> {
    let id = &letter.event.event_id;
    let event = serde_json::to_string(&letter.event).map_err(|err| Error::Backend {
        backend: "ledger".into(),
        message: format!("encoding the event of dead letter '{id}': {err}"),
        retryable: false,
        source: None,
    })?;
    Ok(LetterRow {
        event_id: id.clone(),
        event,
        error: letter.error.clone(),
        retryable: letter.retryable,
        attempts: i64::from(letter.attempts),
        correlation_id: letter.correlation_id.to_string(),
        first_failed_ms: to_i64(letter.first_failed_ms, || {
            format!("the first failure time of dead letter '{id}'")
        })?,
        last_failed_ms: to_i64(letter.last_failed_ms, || {
            format!("the last failure time of dead letter '{id}'")
        })?,
    })
}

fn task_row(task: &DeferredTask) -> Result<TaskRow> {
    let id = &task.id;
    let time = |value: u64, what: &str| to_i64(value, || format!("the {what} of task '{id}'"));
    Ok(TaskRow {
        id: id.clone(),
        handler: task.handler.clone(),
        record: Address::of(&task.record)?,
        payload: serde_json::to_string(&task.payload).map_err(|err| Error::Backend {
            backend: "ledger".into(),
            message: format!("encoding the payload of task '{id}': {err}"),
            retryable: false,
            source: None,
        })?,
        status: task.status.as_str(),
        attempts: i64::from(task.attempts),
        due_ms: time(task.due_ms, "due time")?,
        last_error: task.last_error.clone(),
        created_ms: time(task.created_ms, "creation time")?,
        updated_ms: time(task.updated_ms, "update time")?,
    })
}

/// Something to describe lazily in an error message.
pub(crate) trait Describe {
    fn describe(self) -> String;
}

impl Describe for &str {
    fn describe(self) -> String {
        self.to_owned()
    }
}

impl<F: FnOnce() -> String> Describe for F {
    fn describe(self) -> String {
        self()
    }
}

/// `value` as a signed 64-bit integer (what SQL stores), or an error naming `what`: versions and times above
/// [`i64::MAX`] do not fit ([`MAX_VERSION`](crate::sync::MAX_VERSION)).
pub(crate) fn to_i64(value: u64, what: impl Describe) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::Backend {
        backend: "ledger".into(),
        message: format!(
            "{} is {value}, above {} (the highest a SQL ledger stores)",
            what.describe(),
            i64::MAX
        ),
        retryable: false,
        source: None,
    })
}

/// A lease end or a limit, clamped into a signed 64-bit integer.
pub(crate) fn clamp_i64(value: u128) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Errors from [`to_i64`] and the encoders name no backend; give them the ledger's.
pub(crate) fn relabel(mut err: Error, backend: &str) -> Error {
    if let Error::Backend { backend: b, .. } = &mut err
        && b == "ledger"
    {
        *b = backend.to_owned();
    }
    err
}

/// A row that does not decode: a typed error naming the table, the row's key and the column.
pub(crate) fn bad_row(
    backend: &str,
    operation: &str,
    table: &str,
    key: &str,
    column: &str,
    problem: impl Display,
) -> Error {
    Error::Backend {
        backend: backend.to_owned(),
        message: format!("{operation}: table '{table}', row '{key}': column '{column}' {problem}"),
        retryable: false,
        source: None,
    }
}

/// Decodes stored columns, naming the table and row in every error (the row's key is only formatted then).
pub(crate) struct RowDecoder<'a, K: Display> {
    pub backend: &'a str,
    pub operation: &'a str,
    pub table: &'a str,
    pub key: K,
}

/// A source record as a row key in messages: `source/table(key)`.
pub(crate) struct RecordKey<'a>(pub &'a SourceRecord);

impl Display for RecordKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0.source, self.0.reference)
    }
}

impl<K: Display> RowDecoder<'_, K> {
    fn bad(&self, column: &str, problem: impl Display) -> Error {
        bad_row(
            self.backend,
            self.operation,
            self.table,
            &self.key.to_string(),
            column,
            problem,
        )
    }

    pub fn u64(&self, column: &str, value: i64) -> Result<u64> {
        u64::try_from(value).map_err(|_| self.bad(column, format_args!("is negative ({value})")))
    }

    pub fn u32(&self, column: &str, value: i64) -> Result<u32> {
        u32::try_from(value)
            .map_err(|_| self.bad(column, format_args!("is out of range ({value})")))
    }

    pub fn reference(&self, columns: (&str, &str), table: &str, key: &str) -> Result<EntityRef> {
        let table = TableName::new(table)
            .map_err(|err| self.bad(columns.0, format_args!("is not a table name: {err}")))?;
        let key: Key = serde_json::from_str(key)
            .map_err(|err| self.bad(columns.1, format_args!("is not a record key: {err}")))?;
        Ok(EntityRef { table, key })
    }

    pub fn json(&self, column: &str, text: &str) -> Result<serde_json::Value> {
        serde_json::from_str(text)
            .map_err(|err| self.bad(column, format_args!("is not JSON: {err}")))
    }

    pub fn status(&self, column: &str, text: &str) -> Result<TaskStatus> {
        TaskStatus::parse(text)
            .ok_or_else(|| self.bad(column, format_args!("is not a task status ({text:?})")))
    }

    pub fn event(&self, column: &str, text: &str) -> Result<ChangeEvent> {
        ChangeEvent::from_json(text.as_bytes())
            .map_err(|err| self.bad(column, format_args!("is not a change event: {err}")))
    }

    pub fn uuid(&self, column: &str, text: &str) -> Result<uuid::Uuid> {
        uuid::Uuid::parse_str(text)
            .map_err(|err| self.bad(column, format_args!("is not a UUID: {err}")))
    }
}

/// A task row as read, before decoding.
pub(crate) struct StoredTask {
    pub id: String,
    pub handler: String,
    pub record_table: String,
    pub record_key: String,
    pub payload: String,
    pub status: String,
    pub attempts: i64,
    pub due_ms: i64,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl StoredTask {
    pub fn decode(self, backend: &str, operation: &str) -> Result<DeferredTask> {
        let d = RowDecoder {
            backend,
            operation,
            table: "tasks",
            key: self.id.as_str(),
        };
        Ok(DeferredTask {
            record: d.reference(
                ("record_table", "record_key"),
                &self.record_table,
                &self.record_key,
            )?,
            payload: d.json("payload", &self.payload)?,
            status: d.status("status", &self.status)?,
            attempts: d.u32("attempts", self.attempts)?,
            due_ms: d.u64("due_ms", self.due_ms)?,
            created_ms: d.u64("created_ms", self.created_ms)?,
            updated_ms: d.u64("updated_ms", self.updated_ms)?,
            last_error: self.last_error,
            handler: self.handler,
            id: self.id,
        })
    }
}

/// A dead-letter row as read, before decoding.
pub(crate) struct StoredLetter {
    pub event_id: String,
    pub event: String,
    pub error: String,
    pub retryable: bool,
    pub attempts: i64,
    pub correlation_id: String,
    pub first_failed_ms: i64,
    pub last_failed_ms: i64,
}

impl StoredLetter {
    pub fn decode(self, backend: &str, operation: &str) -> Result<DeadLetter> {
        let d = RowDecoder {
            backend,
            operation,
            table: "dead_letters",
            key: self.event_id.as_str(),
        };
        Ok(DeadLetter {
            event: d.event("event", &self.event)?,
            error: self.error,
            retryable: self.retryable,
            attempts: d.u32("attempts", self.attempts)?,
            correlation_id: d.uuid("correlation_id", &self.correlation_id)?,
            first_failed_ms: d.u64("first_failed_ms", self.first_failed_ms)?,
            last_failed_ms: d.u64("last_failed_ms", self.last_failed_ms)?,
        })
    }
}

/// How a backend classifies a database error: retryable or not, and a plain-words note (such as "disk full").
pub(crate) struct Classified {
    pub retryable: bool,
    pub note: Option<&'static str>,
}

/// Maps a sqlx error from `operation` to [`Error::Backend`], with the backend's classification of database errors.
pub(crate) fn map_sqlx(
    backend: &str,
    operation: &str,
    err: sqlx::Error,
    classify: fn(&dyn sqlx::error::DatabaseError) -> Classified,
) -> Error {
    let (retryable, detail) = match &err {
        sqlx::Error::Database(db) => {
            let Classified { retryable, note } = classify(db.as_ref());
            let mut detail = String::new();
            if let Some(note) = note {
                detail.push_str(note);
                detail.push_str(": ");
            }
            detail.push_str(db.message());
            if let Some(table) = db.table() {
                detail.push_str(&format!(" (table '{table}')"));
            }
            if let Some(constraint) = db.constraint() {
                detail.push_str(&format!(" (constraint '{constraint}')"));
            }
            (retryable, detail)
        }
        // The connection, or the pool's wait for one: another try may find it back.
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => {
            (true, err.to_string())
        }
        sqlx::Error::Protocol(_) => (true, err.to_string()),
        _ => (false, err.to_string()),
    };
    Error::Backend {
        backend: backend.to_owned(),
        message: format!("{operation}: {detail}"),
        retryable,
        source: Some(Arc::new(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;
    use crate::sync::ledger::{AppliedVersion, IdMapping, SettledEvent};

    fn account(number: &str) -> EntityRef {
        EntityRef::by_key("account", [("accountnumber", number)]).unwrap()
    }

    fn settled(id: &str, record: &SourceRecord, version: u64, deleted: bool) -> SettledEvent {
        SettledEvent {
            event_id: id.into(),
            record: record.clone(),
            applied: Some(AppliedVersion { version, deleted }),
        }
    }

    fn letter(attempts: u32, at: u64, error: &str) -> DeadLetter {
        let event = ChangeEvent::upsert("us", &Record::new(account("A-1")), 1).with_event_id("e");
        let error = Error::Backend {
            backend: "t".into(),
            message: error.into(),
            retryable: false,
            source: None,
        };
        DeadLetter::new(event, &error, attempts, at)
    }

    #[test]
    fn rows_apply_a_settlement_as_the_memory_ledger_does() {
        let a = SourceRecord::new("us", account("A-1"));
        let b = SourceRecord::new("us", account("A-0"));
        let mut s = Settlement::at(10);
        s.events = vec![
            settled("e-2", &a, 5, false),
            settled("e-1", &a, 5, true),
            settled("e-2", &b, 3, false),
            settled("e-3", &a, 4, false),
        ];
        let (t1, t2) = (account("T-1"), account("T-2"));
        s.id_map = vec![
            IdMapping {
                source: a.clone(),
                target: t1,
            },
            IdMapping {
                source: a.clone(),
                target: t2.clone(),
            },
        ];
        s.dead_letters = vec![letter(2, 30, "first"), letter(3, 20, "second")];
        let task = |id: &str, handler: &str| {
            TaskChange::Enqueue(DeferredTask::new(
                id,
                handler,
                account("T-1"),
                serde_json::Value::Null,
                1,
            ))
        };
        s.tasks = vec![
            task("b", "first"),
            task("a", "h"),
            task("b", "second"),
            TaskChange::Done { id: "b".into() },
            task("c", "h"),
        ];
        let rows = Rows::of(&s).unwrap();
        assert_eq!(rows.processed, ["e-1", "e-2", "e-3"]);
        let versions: Vec<(&str, i64, bool)> = rows
            .versions
            .iter()
            .map(|(r, v, d)| (r.address.key.as_str(), *v, *d))
            .collect();
        assert_eq!(
            versions,
            [
                (
                    r#"{"alternate":{"accountnumber":{"string":"A-0"}}}"#,
                    3,
                    false
                ),
                (
                    r#"{"alternate":{"accountnumber":{"string":"A-1"}}}"#,
                    5,
                    false
                ),
            ],
            "the highest version per record, the first of equal ones, sorted"
        );
        assert_eq!(rows.id_map.len(), 1);
        assert_eq!(rows.id_map[0].1, Address::of(&t2).unwrap(), "the last wins");
        assert_eq!(rows.dead_letters.len(), 1);
        let merged = &rows.dead_letters[0];
        assert_eq!(
            (
                merged.attempts,
                merged.first_failed_ms,
                merged.last_failed_ms
            ),
            (5, 20, 20)
        );
        assert!(merged.error.ends_with("second"));
        let runs: Vec<Vec<(&str, &str)>> = rows
            .tasks
            .iter()
            .filter_map(|step| match step {
                TaskStep::Enqueue(run) => Some(
                    run.iter()
                        .map(|t| (t.id.as_str(), t.handler.as_str()))
                        .collect(),
                ),
                _ => None,
            })
            .collect();
        assert_eq!(
            runs,
            [
                vec![("a", "h"), ("b", "first"), ("b", "second")],
                vec![("c", "h")]
            ],
            "runs of enqueues, sorted by id, the first of an id first"
        );
        assert!(matches!(rows.tasks[1], TaskStep::Done { .. }));
    }

    #[test]
    fn values_above_i64_max_are_refused_by_name() {
        let a = SourceRecord::new("us", account("A-1"));
        let mut s = Settlement::at(10);
        s.events = vec![settled("e", &a, u64::MAX, false)];
        let err = Rows::of(&s).unwrap_err();
        assert!(err.to_string().contains("applied version"), "{err}");
        assert!(!err.is_retryable());
        let relabelled = relabel(err, "ledger sqlite:x.db");
        assert!(relabelled.to_string().starts_with("ledger sqlite:x.db:"));
    }

    #[test]
    fn unknown_and_negative_totals() {
        let stats = totals_from(
            "b",
            vec![("applied".into(), 3), ("from_the_future".into(), 9)],
        )
        .unwrap();
        assert_eq!(stats.applied, 3);
        let err = totals_from("b", vec![("applied".into(), -1)]).unwrap_err();
        assert!(err.to_string().contains("'totals'"), "{err}");
    }
}
