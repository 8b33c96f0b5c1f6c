//! The change event: one change to one record at a source instance, as the sync pipeline carries it.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::key::{EntityRef, Key};
use crate::name::TableName;
use crate::record::{Fields, HydrationState, Lookups, Record};
use crate::sync::ledger::SourceRecord;

/// The newest event schema this build reads and the one it writes.
pub const SCHEMA_VERSION: u32 = 1;

/// What happened to the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Created or updated: the event carries the record's fields and lookups.
    Upsert,
    /// Deleted at the source. Fields and lookups, if any, carry no meaning.
    Delete,
}

/// One change to one record at a source instance.
///
/// Build one with [`ChangeEvent::upsert`] or [`ChangeEvent::delete`] (plus the `with_*` setters), or read one with
/// [`ChangeEvent::from_json`]. Deserializing checks the schema version first, then the fields: names are validated
/// table and column names, GUID keys are not nil, and the event id is not empty.
///
/// # Schema versions
///
/// Events are JSON on the wire (queues, dead letters, files). Each carries a `schema_version`; this build reads
/// versions `1..=`[`SCHEMA_VERSION`] and rejects anything else, before looking at any other field, with a message
/// naming both versions: a producer that upgraded first cannot have its events half-understood. Fields this build
/// does not know are ignored, so a version can grow additively without a bump.
///
/// # JSON
///
/// `origin` is left out when there is none; `fields`, `lookups` and `origin` may be missing:
///
/// ```json
/// {"schema_version": 1, "event_id": "us/account/accountnumber='A-1'@7", "source": "us", "table": "account",
///  "key": {"alternate": {"accountnumber": {"string": "A-1"}}}, "change": "upsert",
///  "fields": {"name": "Fabrikam"}, "lookups": {}, "source_version": 7, "timestamp_ms": 1700000000000,
///  "correlation_id": "6f1c0f3e-8d2a-4a57-9d1e-2f6c1b0e9a11"}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChangeEvent {
    /// The event schema this event follows; [`SCHEMA_VERSION`] for events built here.
    pub schema_version: u32,
    /// Unique per change at the source; redeliveries of the same change carry the same id.
    pub event_id: String,
    /// The source instance, such as `us`.
    pub source: String,
    /// The record's table at the source.
    pub table: TableName,
    /// The record's key at the source (GUID or alternate key).
    pub key: Key,
    /// Upsert or delete.
    pub change: ChangeKind,
    /// Column values, as at the source.
    pub fields: Fields,
    /// References to other records, addressed with source keys.
    pub lookups: Lookups,
    /// Monotonic per record at the source (Dataverse `versionnumber`): a higher version is a later state.
    pub source_version: u64,
    /// When the change happened at the source, Unix milliseconds.
    pub timestamp_ms: u64,
    /// Who made the change. The integration stamps its own writes with its identity, so their echoes can be
    /// recognised and skipped (loop prevention in two-way sync).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Ties together every log line, store call and dead letter about this change.
    pub correlation_id: Uuid,
}

impl ChangeEvent {
    /// The upsert of `record` at `source`, at `source_version`: its fields and lookups, a deterministic event id
    /// `"{source}/{table}/{key}@{source_version}"` (so a source that re-reads the same change produces the same
    /// id), a new correlation id, and the current time.
    pub fn upsert(source: &str, record: &Record, source_version: u64) -> ChangeEvent {
        let reference = &record.reference;
        ChangeEvent {
            schema_version: SCHEMA_VERSION,
            event_id: format!(
                "{source}/{}/{}@{source_version}",
                reference.table, reference.key
            ),
            source: source.to_owned(),
            table: reference.table.clone(),
            key: reference.key.clone(),
            change: ChangeKind::Upsert,
            fields: record.fields.clone(),
            lookups: record.lookups.clone(),
            source_version,
            timestamp_ms: unix_now_ms(),
            origin: None,
            correlation_id: Uuid::new_v4(),
        }
    }

    /// The deletion of `reference` at `source`, at `source_version`. The event id is
    /// `"{source}/{table}/{key}@{source_version}#delete"`, distinct from an upsert's even if a source reports both
    /// at one version.
    pub fn delete(source: &str, reference: &EntityRef, source_version: u64) -> ChangeEvent {
        ChangeEvent {
            schema_version: SCHEMA_VERSION,
            event_id: format!(
                "{source}/{}/{}@{source_version}#delete",
                reference.table, reference.key
            ),
            source: source.to_owned(),
            table: reference.table.clone(),
            key: reference.key.clone(),
            change: ChangeKind::Delete,
            fields: Fields::new(),
            lookups: Lookups::new(),
            source_version,
            timestamp_ms: unix_now_ms(),
            origin: None,
            correlation_id: Uuid::new_v4(),
        }
    }

    /// Sets who made the change.
    #[must_use]
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = Some(origin.into());
        self
    }

    /// Sets the correlation id (for example the one of the source request that made the change).
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: Uuid) -> Self {
        self.correlation_id = correlation_id;
        self
    }

    /// Sets when the change happened, Unix milliseconds.
    #[must_use]
    pub fn with_timestamp_ms(mut self, timestamp_ms: u64) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }

    /// Sets the event id. It must not be empty: an empty id does not deserialize.
    #[must_use]
    pub fn with_event_id(mut self, event_id: impl Into<String>) -> Self {
        self.event_id = event_id.into();
        self
    }

    /// True for deletions.
    pub fn is_delete(&self) -> bool {
        self.change == ChangeKind::Delete
    }

    /// The record at the source: table and source key.
    pub fn reference(&self) -> EntityRef {
        EntityRef {
            table: self.table.clone(),
            key: self.key.clone(),
        }
    }

    /// The record at its source instance, as the [`Ledger`](crate::sync::Ledger) tracks it.
    pub fn source_record(&self) -> SourceRecord {
        SourceRecord {
            source: self.source.clone(),
            reference: self.reference(),
        }
    }

    /// The event's content as a hydrated record at the source address: fields, lookups and the source version.
    /// Mapping to the target's names and keys is [`Mapping::apply`](crate::sync::Mapping::apply)'s job.
    pub fn to_record(&self) -> Record {
        Record {
            reference: self.reference(),
            fields: self.fields.clone(),
            lookups: self.lookups.clone(),
            source_version: Some(self.source_version),
            state: HydrationState::Hydrated,
        }
    }

    /// Reads an event from JSON. Any failure is an [`Error::InvalidEvent`] that names the event id whenever the
    /// payload has one, even if the rest of it is broken, so a dead letter can say which event it was.
    pub fn from_json(bytes: &[u8]) -> Result<ChangeEvent> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|err| Error::InvalidEvent {
                event_id: None,
                reason: format!("not valid JSON: {err}"),
            })?;
        let event_id = value
            .get("event_id")
            .and_then(serde_json::Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_owned);
        Self::from_value(value).map_err(|reason| Error::InvalidEvent { event_id, reason })
    }

    /// The one decoding path: the schema version first (a future version may have changed anything else), then
    /// the fields, then the rules serde cannot express.
    fn from_value(value: serde_json::Value) -> std::result::Result<ChangeEvent, String> {
        // serde would also take an array, positionally; an event is an object.
        if !value.is_object() {
            let kind = match value {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a boolean",
                _ => "null",
            };
            return Err(format!("an event is a JSON object, not {kind}"));
        }
        if let Some(version) = value
            .get("schema_version")
            .and_then(serde_json::Value::as_u64)
        {
            check_schema_version(version)?;
        }
        let raw = RawChangeEvent::deserialize(value).map_err(|err| err.to_string())?;
        raw.try_into()
    }
}

fn check_schema_version(version: u64) -> std::result::Result<(), String> {
    if version == 0 {
        return Err(format!(
            "schema_version 0 is not valid: versions start at 1, and this build reads versions 1 to {SCHEMA_VERSION}"
        ));
    }
    if version > u64::from(SCHEMA_VERSION) {
        return Err(format!(
            "schema_version {version} is newer than this build reads (versions 1 to {SCHEMA_VERSION}): upgrade the consumer"
        ));
    }
    Ok(())
}

/// The wire form, before the checks serde cannot express.
#[derive(Deserialize)]
#[serde(expecting = "a change event (a JSON object)")]
struct RawChangeEvent {
    schema_version: u32,
    event_id: String,
    source: String,
    table: TableName,
    key: Key,
    change: ChangeKind,
    #[serde(default)]
    fields: Fields,
    #[serde(default)]
    lookups: Lookups,
    source_version: u64,
    timestamp_ms: u64,
    #[serde(default)]
    origin: Option<String>,
    correlation_id: Uuid,
}

impl TryFrom<RawChangeEvent> for ChangeEvent {
    type Error = String;

    fn try_from(raw: RawChangeEvent) -> std::result::Result<Self, String> {
        check_schema_version(raw.schema_version.into())?;
        if raw.event_id.is_empty() {
            return Err("event_id must not be empty".into());
        }
        if raw.key == Key::Id(Uuid::nil()) {
            return Err("key: the nil GUID is not a record id".into());
        }
        if let Some((name, _)) = raw
            .lookups
            .iter()
            .find(|(_, target)| target.key == Key::Id(Uuid::nil()))
        {
            return Err(format!("lookup '{name}': the nil GUID is not a record id"));
        }
        Ok(ChangeEvent {
            schema_version: raw.schema_version,
            event_id: raw.event_id,
            source: raw.source,
            table: raw.table,
            key: raw.key,
            change: raw.change,
            fields: raw.fields,
            lookups: raw.lookups,
            source_version: raw.source_version,
            timestamp_ms: raw.timestamp_ms,
            origin: raw.origin,
            correlation_id: raw.correlation_id,
        })
    }
}

/// Buffers the input as JSON so the schema version can be checked before anything else, whatever the field order.
/// Works with any self-describing format; the field values are JSON anyway.
impl<'de> Deserialize<'de> for ChangeEvent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        ChangeEvent::from_value(value).map_err(D::Error::custom)
    }
}

/// Milliseconds since the Unix epoch; 0 for a clock set before 1970.
pub(crate) fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn account() -> EntityRef {
        EntityRef::by_key("account", [("accountnumber", "A-1042")]).unwrap()
    }

    fn contact_record() -> Record {
        Record::builder(EntityRef::by_id("contact", Uuid::from_u128(42)).unwrap())
            .field("fullname", "Ada Lovelace")
            .field("jobtitle", serde_json::Value::Null)
            .lookup("parentcustomerid", account())
            .build()
            .unwrap()
    }

    fn event_json() -> serde_json::Value {
        serde_json::to_value(
            ChangeEvent::upsert("us", &contact_record(), 7).with_origin("integration"),
        )
        .unwrap()
    }

    fn parse(value: serde_json::Value) -> Result<ChangeEvent> {
        ChangeEvent::from_json(value.to_string().as_bytes())
    }

    #[test]
    fn upsert_and_delete_events_are_built_from_records() {
        let record = contact_record();
        let event = ChangeEvent::upsert("us", &record, 7);
        assert_eq!(
            event.event_id,
            "us/contact/00000000-0000-0000-0000-00000000002a@7"
        );
        assert_eq!(event.schema_version, SCHEMA_VERSION);
        assert_eq!(event.change, ChangeKind::Upsert);
        assert_eq!(event.reference(), record.reference);
        assert!(event.timestamp_ms > 1_600_000_000_000, "stamped with now");
        let mut expected = record.clone();
        expected.source_version = Some(7);
        assert_eq!(event.to_record(), expected);
        assert_ne!(
            event.correlation_id,
            ChangeEvent::upsert("us", &record, 7).correlation_id
        );

        let delete = ChangeEvent::delete("us", &account(), 9);
        assert_eq!(
            delete.event_id,
            "us/account/accountnumber='A-1042'@9#delete"
        );
        assert!(delete.is_delete() && delete.fields.is_empty() && delete.lookups.is_empty());
        assert_eq!(
            delete.source_record(),
            SourceRecord {
                source: "us".into(),
                reference: account()
            }
        );
    }

    #[test]
    fn setters_replace_what_they_name() {
        let id = Uuid::from_u128(5);
        let event = ChangeEvent::delete("us", &account(), 1)
            .with_origin("sync-eu")
            .with_correlation_id(id)
            .with_timestamp_ms(12)
            .with_event_id("custom");
        assert_eq!(event.origin.as_deref(), Some("sync-eu"));
        assert_eq!(event.correlation_id, id);
        assert_eq!(event.timestamp_ms, 12);
        assert_eq!(event.event_id, "custom");
    }

    #[test]
    fn json_round_trip_keeps_everything() {
        for event in [
            ChangeEvent::upsert("us", &contact_record(), 7).with_origin("integration"),
            ChangeEvent::delete("us", &account(), 3),
        ] {
            let bytes = serde_json::to_vec(&event).unwrap();
            assert_eq!(ChangeEvent::from_json(&bytes).unwrap(), event);
            assert_eq!(
                serde_json::from_slice::<ChangeEvent>(&bytes).unwrap(),
                event
            );
        }
        let value = event_json();
        assert_eq!(value["change"], "upsert");
        assert_eq!(value["schema_version"], 1);
        assert_eq!(value["fields"]["jobtitle"], serde_json::Value::Null);
        let no_origin = serde_json::to_value(ChangeEvent::delete("us", &account(), 3)).unwrap();
        assert!(no_origin.get("origin").is_none(), "{no_origin}");
    }

    #[test]
    fn optional_parts_may_be_missing() {
        let mut value = event_json();
        let object = value.as_object_mut().unwrap();
        object.remove("fields");
        object.remove("lookups");
        object.remove("origin");
        let event = parse(value).unwrap();
        assert!(event.fields.is_empty() && event.lookups.is_empty() && event.origin.is_none());
    }

    #[test]
    fn a_future_schema_version_is_rejected_with_both_versions_named() {
        let mut value = event_json();
        value["schema_version"] = json!(2);
        // A future version may have changed anything; the version is what gets reported.
        value.as_object_mut().unwrap().remove("source_version");
        let err = parse(value.clone()).unwrap_err();
        let Error::InvalidEvent { event_id, reason } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(
            event_id.as_deref(),
            Some("us/contact/00000000-0000-0000-0000-00000000002a@7")
        );
        assert!(reason.contains("schema_version 2"), "{reason}");
        assert!(reason.contains("versions 1 to 1"), "{reason}");
        assert!(!err.is_retryable());
        // Plain serde says the same.
        let err = serde_json::from_value::<ChangeEvent>(value).unwrap_err();
        assert!(
            err.to_string().contains("schema_version 2 is newer"),
            "{err}"
        );
    }

    #[test]
    fn schema_version_zero_and_missing_are_rejected() {
        let mut value = event_json();
        value["schema_version"] = json!(0);
        let err = parse(value.clone()).unwrap_err().to_string();
        assert!(err.contains("schema_version 0 is not valid"), "{err}");
        value.as_object_mut().unwrap().remove("schema_version");
        let err = parse(value).unwrap_err().to_string();
        assert!(err.contains("missing field `schema_version`"), "{err}");
    }

    #[test]
    fn bad_names_and_keys_are_rejected() {
        let cases = [
            (
                "table",
                json!("bad table"),
                "invalid table name \"bad table\"",
            ),
            (
                "key",
                json!({"alternate": {"account number": {"string": "A-1"}}}),
                "invalid column name \"account number\"",
            ),
            (
                "key",
                json!({"alternate": {"accountnumber": {"string": ""}}}),
                "must not be empty",
            ),
            ("key", json!({"id": Uuid::nil()}), "nil GUID"),
            ("key", json!({"id": "not-a-guid"}), "UUID"),
            ("fields", json!({"1st": 1}), "invalid column name \"1st\""),
            (
                "lookups",
                json!({"parentcustomerid": {"table": "account", "key": {"id": Uuid::nil()}}}),
                "lookup 'parentcustomerid': the nil GUID",
            ),
            ("change", json!("merge"), "unknown variant `merge`"),
            ("event_id", json!(""), "event_id must not be empty"),
        ];
        for (field, bad, expected) in cases {
            let mut value = event_json();
            value[field] = bad;
            let err = parse(value).unwrap_err().to_string();
            assert!(err.contains(expected), "{field}: {err}");
        }
    }

    #[test]
    fn from_json_names_the_event_whenever_it_can() {
        let mut value = event_json();
        value.as_object_mut().unwrap().remove("correlation_id");
        let err = parse(value).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid change event 'us/contact/00000000-0000-0000-0000-00000000002a@7': missing field `correlation_id`"
        );

        let err = ChangeEvent::from_json(br#"{"event_id": "e-1", "source": 3}"#).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidEvent { event_id: Some(id), .. } if id == "e-1"),
            "{err:?}"
        );

        let err = ChangeEvent::from_json(b"{not json").unwrap_err();
        assert!(
            matches!(&err, Error::InvalidEvent { event_id: None, reason } if reason.starts_with("not valid JSON")),
            "{err:?}"
        );
        let err = ChangeEvent::from_json(br#""an event""#)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("an event is a JSON object, not a string"),
            "{err}"
        );
        let mut positional =
            serde_json::to_value(ChangeEvent::delete("us", &account(), 1)).unwrap();
        positional =
            serde_json::Value::Array(positional.as_object().unwrap().values().cloned().collect());
        let err = parse(positional).unwrap_err().to_string();
        assert!(
            err.ends_with("an event is a JSON object, not an array"),
            "{err}"
        );
    }
}
