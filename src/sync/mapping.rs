//! Per-consumer field mapping and field ownership, declared as data: [`Mapping`].

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::key::{AlternateKey, EntityRef, Key};
use crate::name::{ColumnName, TableName};
use crate::record::{Fields, HydrationState, Lookups, Record};
use crate::schema::{Schema, TableSchema};
use crate::sync::event::ChangeEvent;

/// How one consumer maps a source's tables onto its own. Keyed by source table; tables not listed pass through
/// unchanged (their lookups still follow the renames of the tables they point at).
///
/// Each consumer of a source declares how the source's records become its own: table and field renames, value
/// maps (country codes, option-set codes), defaults, which fields the sync owns and which belong to the target's
/// own users and apps. The [`Mapping`] is read from JSON, [validated](Mapping::validate) against the target
/// [`Schema`] at start-up, and [applied](Mapping::apply) to every event.
///
/// ```
/// # fn main() -> eventual_upsert::Result<()> {
/// use eventual_upsert::schema::{ColumnType, Schema, TableSchema};
/// use eventual_upsert::sync::{ChangeEvent, Mapping};
/// use eventual_upsert::{EntityRef, KeyKind, Record};
/// use serde_json::json;
///
/// // The European instance: country as ISO-3 in its own column, its own customer type codes, a region, and a
/// // credit limit that European users maintain.
/// let eu = Schema::new([TableSchema::builder("account")
///     .primary_name("name")
///     .alternate_key([("accountnumber", KeyKind::String)])
///     .column("new_countrycode", ColumnType::String)
///     .column("customertypecode", ColumnType::Integer)
///     .column("new_region", ColumnType::String)
///     .column("creditlimit", ColumnType::Decimal)
///     .build()?])?;
///
/// let mapping = Mapping::from_json(r#"{"tables": {"account": {
///     "rename": {"address1_country": "new_countrycode"},
///     "values": {
///         "new_countrycode": {"map": {"US": "USA", "DE": "DEU", "FR": "FRA"}},
///         "customertypecode": {"map": {"1": 100000000, "3": 100000001}, "on_unknown": "null"}
///     },
///     "defaults": {"new_region": "unassigned"},
///     "target_owned": ["creditlimit"],
///     "drop": ["new_ussalesterritory"]
/// }}}"#)?;
/// mapping.validate(&eu)?; // at start-up: a typo here is an error now, not a dead letter later
///
/// let us_account = Record::builder(EntityRef::by_key("account", [("accountnumber", "A-1042")])?)
///     .field("name", "Fabrikam")
///     .field("address1_country", "US")
///     .field("customertypecode", 3)
///     .field("creditlimit", 5000) // the US value: never overwrites the European one
///     .field("new_ussalesterritory", "West")
///     .build()?;
/// let record = mapping.apply(&ChangeEvent::upsert("us", &us_account, 7))?;
///
/// assert_eq!(serde_json::to_value(&record.fields).unwrap(), json!({
///     "name": "Fabrikam",
///     "new_countrycode": "USA",
///     "customertypecode": 100000001,
///     "new_region": "unassigned",
/// }));
/// assert_eq!(record.source_version, Some(7));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Per source table.
    #[serde(default)]
    pub tables: BTreeMap<String, TableMapping>,
}

/// How one source table maps onto the target. Every part is optional. Field names in `values`, `defaults`,
/// `sync_owned` and `target_owned` are **target** names (after `rename`); `rename` keys and `drop` are source
/// names.
///
/// The rules apply in this order: `drop`, `rename`, `values`, `defaults`, then ownership.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TableMapping {
    /// The target table's name, when it differs from the source's.
    pub target_table: Option<String>,
    /// Source field → target field, for columns, lookups and the columns of alternate keys alike.
    pub rename: BTreeMap<String, String>,
    /// Value maps, by target field.
    pub values: BTreeMap<String, ValueMap>,
    /// Values for target fields the event lacks or has as null.
    pub defaults: BTreeMap<String, Value>,
    /// When set, the sync writes only these target fields (and the key columns the record is addressed by);
    /// the rest belong to the target.
    pub sync_owned: Option<Vec<String>>,
    /// Target fields the sync never writes: they belong to the target's own users and apps. This wins over
    /// everything else.
    pub target_owned: Vec<String>,
    /// Source fields (columns or lookups) ignored altogether.
    pub drop: Vec<String>,
}

/// A value map for one field: source values to target values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMap {
    /// Keyed by the source value rendered as a string: a string as itself (`"US"`), any other value as its JSON
    /// text (`"1"`, `"true"`). Null values are never mapped.
    pub map: BTreeMap<String, Value>,
    /// What to do with a value the map does not list.
    #[serde(default)]
    pub on_unknown: UnknownValue,
}

/// What a [`ValueMap`] does with a value it does not list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownValue {
    /// The event cannot be mapped: [`Error::InvalidEvent`], so it is dead-lettered with the reason.
    #[default]
    Reject,
    /// Write the source value as it is.
    Keep,
    /// Write null.
    Null,
}

impl ValueMap {
    /// The target value for a non-null source value, `None` when the map rejects it.
    fn map_value(&self, value: &Value) -> Option<Value> {
        let rendered: Cow<'_, str> = match value {
            Value::String(s) => Cow::Borrowed(s),
            other => Cow::Owned(other.to_string()),
        };
        match (self.map.get(rendered.as_ref()), self.on_unknown) {
            (Some(mapped), _) => Some(mapped.clone()),
            (None, UnknownValue::Reject) => None,
            (None, UnknownValue::Keep) => Some(value.clone()),
            (None, UnknownValue::Null) => Some(Value::Null),
        }
    }
}

fn config_error(reason: String) -> Error {
    Error::InvalidConfig { reason }
}

/// Deserializes one part of the document, naming where it is: serde_json alone reports only line and column.
fn parse_at<T: DeserializeOwned>(path: &str, value: &Value) -> Result<T> {
    T::deserialize(value).map_err(|err| config_error(format!("mapping at {path}: {err}")))
}

impl TableMapping {
    /// The target name of a source field.
    fn target_field(&self, source: &ColumnName) -> Result<ColumnName> {
        match self.rename.get(source.as_str()) {
            Some(target) => ColumnName::new(target),
            None => Ok(source.clone()),
        }
    }

    fn drops(&self, source: &ColumnName) -> bool {
        self.drop.iter().any(|d| d == source.as_str())
    }

    fn is_target_owned(&self, field: &str) -> bool {
        self.target_owned.iter().any(|f| f == field)
    }

    /// Whether the sync writes this target field at all (ownership only; key columns aside).
    fn sync_writes(&self, field: &str) -> bool {
        !self.is_target_owned(field)
            && self
                .sync_owned
                .as_ref()
                .is_none_or(|owned| owned.iter().any(|f| f == field))
    }

    fn target_table_name(&self, source_table: &TableName) -> Result<TableName> {
        match &self.target_table {
            Some(name) => TableName::new(name),
            None => Ok(source_table.clone()),
        }
    }

    /// Every name in the mapping is a valid table or column name, reported with its path.
    fn check_names(&self, path: &str) -> Result<()> {
        let bad = |at: String, err: Error| config_error(format!("mapping at {path}.{at}: {err}"));
        if let Some(table) = &self.target_table {
            TableName::new(table).map_err(|e| bad("target_table".into(), e))?;
        }
        for (source, target) in &self.rename {
            ColumnName::new(source).map_err(|e| bad(format!("rename.{source}"), e))?;
            ColumnName::new(target).map_err(|e| bad(format!("rename.{source}"), e))?;
        }
        for (part, names) in [
            ("values", self.values.keys().collect::<Vec<_>>()),
            ("defaults", self.defaults.keys().collect()),
        ] {
            for name in names {
                ColumnName::new(name).map_err(|e| bad(format!("{part}.{name}"), e))?;
            }
        }
        let lists = [
            ("sync_owned", self.sync_owned.as_deref().unwrap_or_default()),
            ("target_owned", &self.target_owned),
            ("drop", &self.drop),
        ];
        for (part, names) in lists {
            for (i, name) in names.iter().enumerate() {
                ColumnName::new(name).map_err(|e| bad(format!("{part}[{i}]"), e))?;
            }
        }
        Ok(())
    }

    /// Checks the rules against the target table; errors name the source table and the field.
    fn validate(&self, source_table: &str, target: &TableSchema) -> Result<()> {
        let problem = |field: &str, what: String| {
            config_error(format!(
                "mapping for table '{source_table}': field '{field}' {what}"
            ))
        };
        let is_key_column = |field: &str| {
            target
                .alternate_keys
                .iter()
                .flat_map(|def| &def.columns)
                .any(|(column, _)| column.as_str() == field)
        };

        let mut renamed_from: BTreeMap<&str, &str> = BTreeMap::new();
        for (source, field) in &self.rename {
            if let Some(other) = renamed_from.insert(field, source) {
                return Err(problem(
                    field,
                    format!("is the rename target of both '{other}' and '{source}'"),
                ));
            }
            if self.drop.contains(source) {
                return Err(problem(source, "is both dropped and renamed".into()));
            }
        }

        let named = self
            .rename
            .values()
            .chain(self.values.keys())
            .chain(self.defaults.keys())
            .chain(self.sync_owned.iter().flatten())
            .chain(&self.target_owned);
        for field in named {
            let column = ColumnName::new(field)?;
            if column == target.primary_id {
                return Err(problem(
                    field,
                    format!(
                        "is the primary id of target table '{}', which is set by addressing records by id",
                        target.name
                    ),
                ));
            }
            if !target.lookups.contains_key(&column) && target.column_type(&column).is_none() {
                return Err(problem(
                    field,
                    format!(
                        "is not a column or lookup of target table '{}'",
                        target.name
                    ),
                ));
            }
        }

        let outputs = self
            .values
            .iter()
            .map(|(field, map)| ("value map", field, map.map.values().collect::<Vec<_>>()))
            .chain(
                self.defaults
                    .iter()
                    .map(|(field, value)| ("default", field, vec![value])),
            );
        for (what, field, values) in outputs {
            let column = ColumnName::new(field)?;
            if target.lookups.contains_key(&column) {
                return Err(problem(
                    field,
                    format!("is a lookup: a {what} applies to columns only"),
                ));
            }
            if what == "value map" && is_key_column(field) {
                return Err(problem(
                    field,
                    "is a key column: a value map cannot change the keys records are addressed by"
                        .into(),
                ));
            }
            if !self.sync_writes(field) {
                return Err(problem(
                    field,
                    format!("has a {what}, but the sync does not write it (ownership)"),
                ));
            }
            let Some(ty) = target.column_type(&column) else {
                continue; // reported above
            };
            if let Some(value) = values.into_iter().find(|v| !v.is_null() && !ty.accepts(v)) {
                return Err(problem(
                    field,
                    format!(
                        "has a {what} producing {value}, which is not of the column's type ({ty:?})"
                    ),
                ));
            }
        }

        for field in &self.target_owned {
            if self.sync_owned.iter().flatten().any(|f| f == field) {
                return Err(problem(field, "is both sync-owned and target-owned".into()));
            }
            if is_key_column(field) {
                return Err(problem(
                    field,
                    format!(
                        "is a key column of target table '{}': the sync addresses records by it, so it cannot be target-owned",
                        target.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Mapping {
    /// Reads a mapping from JSON. Unknown settings, wrong types and invalid names are
    /// [`Error::InvalidConfig`] errors naming where they are, such as `tables.account.values.address1_country`.
    pub fn from_json(text: &str) -> Result<Self> {
        let document: Value = serde_json::from_str(text)
            .map_err(|err| config_error(format!("mapping: not valid JSON: {err}")))?;
        // Parse table by table (and value map by value map) first, so a problem is reported with its path.
        if let Some(tables) = document.get("tables").and_then(Value::as_object) {
            for (table, table_mapping) in tables {
                let path = format!("tables.{table}");
                if let Some(values) = table_mapping.get("values").and_then(Value::as_object) {
                    for (field, value_map) in values {
                        parse_at::<ValueMap>(&format!("{path}.values.{field}"), value_map)?;
                    }
                }
                parse_at::<TableMapping>(&path, table_mapping)?;
            }
        }
        let mapping: Mapping = parse_at("the top level", &document)?;
        mapping.check_names()?;
        Ok(mapping)
    }

    fn check_names(&self) -> Result<()> {
        for (table, table_mapping) in &self.tables {
            let path = format!("tables.{table}");
            TableName::new(table)
                .map_err(|err| config_error(format!("mapping at {path}: {err}")))?;
            table_mapping.check_names(&path)?;
        }
        Ok(())
    }

    /// Checks the mapping against the target schema, for start-up: every name is valid, every target table
    /// exists, every target field named anywhere is a column the target table accepts or one of its lookups (and
    /// not its primary id), no two source fields are renamed to one target field, no field is both dropped and
    /// renamed, defaults and value-map outputs have the column's type, value maps and defaults apply to columns the
    /// sync writes (not lookups, not key columns for value maps), and no field is both sync-owned and
    /// target-owned or is a target-owned key column. Errors are [`Error::InvalidConfig`] naming table and field.
    ///
    /// Tables not listed in the mapping cannot be checked here (the source's tables are not known); the store
    /// rejects a write to a table it does not have.
    pub fn validate(&self, target: &Schema) -> Result<()> {
        self.check_names()?;
        for (source_table, table_mapping) in &self.tables {
            let source = TableName::new(source_table)?;
            let target_name = table_mapping.target_table_name(&source)?;
            let target_table = target.table(&target_name).map_err(|_| {
                config_error(format!(
                    "mapping for table '{source_table}': target table '{target_name}' is not in the target schema"
                ))
            })?;
            table_mapping.validate(source_table, target_table)?;
        }
        Ok(())
    }

    /// The target table for a source table.
    pub fn target_table(&self, source_table: &TableName) -> Result<TableName> {
        match self.tables.get(source_table.as_str()) {
            Some(table_mapping) => table_mapping.target_table_name(source_table),
            None => Ok(source_table.clone()),
        }
    }

    /// A source reference as the target addresses it: the table renamed, and the columns of an alternate key
    /// renamed as the table's fields are. GUIDs pass unchanged (translating them, where the two sides use different
    /// ids, is the external-id map's job).
    pub fn map_reference(&self, reference: &EntityRef) -> Result<EntityRef> {
        let Some(table_mapping) = self.tables.get(reference.table.as_str()) else {
            return Ok(reference.clone());
        };
        let table = table_mapping.target_table_name(&reference.table)?;
        let key = match &reference.key {
            Key::Alternate(key) if !table_mapping.rename.is_empty() => {
                let parts: Result<Vec<(ColumnName, _)>> = key
                    .parts()
                    .map(|(column, value)| Ok((table_mapping.target_field(column)?, value.clone())))
                    .collect();
                Key::Alternate(AlternateKey::new(&table, parts?)?)
            }
            key => key.clone(),
        };
        Ok(EntityRef { table, key })
    }

    /// The record to write at the target for `event`: the address mapped ([`map_reference`](Self::map_reference)),
    /// fields dropped, renamed, value-mapped and defaulted, lookups dropped, renamed and their targets mapped, then
    /// ownership applied (target-owned fields removed; with `sync_owned`, only those fields kept, plus the key
    /// columns of the address). The record carries the event's source version and is hydrated.
    ///
    /// A delete event maps to its address only: no fields, lookups or defaults.
    ///
    /// Fails with [`Error::InvalidEvent`] naming the event and the field when a value has no mapping and its map
    /// rejects unknown values, or when two of the event's fields (or lookups) end up with one target name.
    pub fn apply(&self, event: &ChangeEvent) -> Result<Record> {
        let reference = self.map_reference(&event.reference())?;
        let mut record = Record {
            reference,
            fields: Fields::new(),
            lookups: Lookups::new(),
            source_version: Some(event.source_version),
            state: HydrationState::Hydrated,
        };
        if event.is_delete() {
            return Ok(record);
        }
        let unmapped = TableMapping::default();
        let table_mapping = self.tables.get(event.table.as_str()).unwrap_or(&unmapped);
        let invalid = |reason: String| Error::InvalidEvent {
            event_id: Some(event.event_id.clone()),
            reason,
        };
        let described = |source: &ColumnName, target: &ColumnName| {
            if source == target {
                format!("'{source}'")
            } else {
                format!("'{source}' (target '{target}')")
            }
        };

        for (source, value) in &event.fields {
            if table_mapping.drops(source) {
                continue;
            }
            let field = table_mapping.target_field(source)?;
            let value = match table_mapping.values.get(field.as_str()) {
                Some(value_map) if !value.is_null() => {
                    value_map.map_value(value).ok_or_else(|| {
                        invalid(format!(
                            "field {}: no mapping for value {value}",
                            described(source, &field)
                        ))
                    })?
                }
                _ => value.clone(),
            };
            if record.fields.insert(field.clone(), value).is_some() {
                return Err(invalid(format!(
                    "field {} maps to a field another field of the event maps to as well",
                    described(source, &field)
                )));
            }
        }
        for (field, default) in &table_mapping.defaults {
            if record.fields.get(field.as_str()).is_none_or(Value::is_null) {
                record
                    .fields
                    .insert(ColumnName::new(field)?, default.clone());
            }
        }

        for (source, target) in &event.lookups {
            if table_mapping.drops(source) {
                continue;
            }
            let name = table_mapping.target_field(source)?;
            if record
                .lookups
                .insert(name.clone(), self.map_reference(target)?)
                .is_some()
            {
                return Err(invalid(format!(
                    "lookup {} maps to a lookup another lookup of the event maps to as well",
                    described(source, &name)
                )));
            }
        }

        let key_columns: Vec<ColumnName> = match &record.reference.key {
            Key::Alternate(key) => key.columns().cloned().collect(),
            Key::Id(_) => Vec::new(),
        };
        let keep = |field: &ColumnName| {
            !table_mapping.is_target_owned(field.as_str())
                && (table_mapping.sync_writes(field.as_str()) || key_columns.contains(field))
        };
        record.fields.retain(|field, _| keep(field));
        record.lookups.retain(|name, _| keep(name));
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::key::KeyKind;
    use crate::schema::ColumnType;

    fn account_ref(number: &str) -> EntityRef {
        EntityRef::by_key("account", [("accountnumber", number)]).unwrap()
    }

    fn record(reference: EntityRef, fields: Value) -> Record {
        let mut record = Record::new(reference);
        for (name, value) in fields.as_object().unwrap() {
            record
                .fields
                .insert(ColumnName::new(name).unwrap(), value.clone());
        }
        record
    }

    fn event(fields: Value) -> ChangeEvent {
        ChangeEvent::upsert("us", &record(account_ref("A-1"), fields), 3)
    }

    fn mapping(json: Value) -> Mapping {
        Mapping::from_json(&json.to_string()).unwrap()
    }

    fn fields_of(record: &Record) -> Value {
        serde_json::to_value(&record.fields).unwrap()
    }

    fn target_schema() -> Schema {
        Schema::new([
            TableSchema::builder("account")
                .primary_name("name")
                .alternate_key([("accountnumber", KeyKind::String)])
                .column("new_countrycode", ColumnType::String)
                .column("customertypecode", ColumnType::Integer)
                .column("creditlimit", ColumnType::Decimal)
                .column("new_region", ColumnType::String)
                .build()
                .unwrap(),
            TableSchema::builder("contact")
                .primary_name("fullname")
                .lookup("parentcustomerid", "account")
                .build()
                .unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn unlisted_tables_pass_through() {
        let e = event(json!({"name": "Fabrikam", "anything": [1, 2]}));
        assert_eq!(Mapping::default().apply(&e).unwrap(), e.to_record());
        let m = mapping(json!({"tables": {"contact": {"rename": {"a": "b"}}}}));
        assert_eq!(m.apply(&e).unwrap(), e.to_record());
        assert_eq!(
            m.target_table(&TableName::new("account").unwrap())
                .unwrap()
                .as_str(),
            "account"
        );
    }

    #[test]
    fn tables_key_columns_fields_and_lookups_are_renamed() {
        let m = mapping(json!({"tables": {
            "account": {"target_table": "organization", "rename": {"accountnumber": "orgnumber", "name": "title"}},
            "contact": {"rename": {"parentcustomerid": "new_organizationid", "fullname": "name"}}
        }}));
        let mapped = m
            .apply(&event(json!({"accountnumber": "A-1", "name": "Fabrikam"})))
            .unwrap();
        assert_eq!(
            mapped.reference,
            EntityRef::by_key("organization", [("orgnumber", "A-1")]).unwrap()
        );
        assert_eq!(
            fields_of(&mapped),
            json!({"orgnumber": "A-1", "title": "Fabrikam"})
        );
        assert_eq!(
            m.target_table(&TableName::new("account").unwrap())
                .unwrap()
                .as_str(),
            "organization"
        );

        let id = Uuid::from_u128(9);
        let contact = Record::builder(EntityRef::by_id("contact", id).unwrap())
            .field("fullname", "Ada")
            .lookup("parentcustomerid", account_ref("A-1"))
            .build()
            .unwrap();
        let mapped = m.apply(&ChangeEvent::upsert("us", &contact, 4)).unwrap();
        assert_eq!(mapped.reference, EntityRef::by_id("contact", id).unwrap());
        assert_eq!(fields_of(&mapped), json!({"name": "Ada"}));
        let lookups: Vec<_> = mapped.lookups.iter().collect();
        assert_eq!(lookups.len(), 1);
        assert_eq!(lookups[0].0.as_str(), "new_organizationid");
        assert_eq!(
            lookups[0].1,
            &EntityRef::by_key("organization", [("orgnumber", "A-1")]).unwrap(),
            "a lookup's target follows its own table's mapping"
        );
        assert_eq!(mapped.source_version, Some(4));
        assert_eq!(mapped.state, HydrationState::Hydrated);
    }

    #[test]
    fn value_maps_translate_codes() {
        let m = mapping(json!({"tables": {"account": {
            "rename": {"address1_country": "new_countrycode"},
            "values": {
                "new_countrycode": {"map": {"US": "USA", "DE": "DEU"}},
                "customertypecode": {"map": {"1": 100000000, "3": 100000001}, "on_unknown": "keep"},
                "new_flag": {"map": {"true": "yes"}, "on_unknown": "null"}
            }
        }}}));
        let mapped = m
            .apply(&event(
                json!({"address1_country": "DE", "customertypecode": 3, "new_flag": true}),
            ))
            .unwrap();
        assert_eq!(
            fields_of(&mapped),
            json!({"new_countrycode": "DEU", "customertypecode": 100000001, "new_flag": "yes"})
        );
        let mapped = m
            .apply(&event(
                json!({"address1_country": null, "customertypecode": 7, "new_flag": false}),
            ))
            .unwrap();
        assert_eq!(
            fields_of(&mapped),
            json!({"new_countrycode": null, "customertypecode": 7, "new_flag": null}),
            "null is never mapped; unknown values are kept or nulled as configured"
        );
    }

    #[test]
    fn an_unknown_value_is_rejected_naming_event_and_field() {
        let m = mapping(json!({"tables": {"account": {
            "values": {"address1_country": {"map": {"US": "USA"}}},
            "rename": {"country": "new_countrycode"}
        }}}));
        let e = event(json!({"address1_country": "XX"}));
        let err = m.apply(&e).unwrap_err();
        let Error::InvalidEvent { event_id, reason } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(event_id.as_deref(), Some(e.event_id.as_str()));
        assert_eq!(
            reason,
            "field 'address1_country': no mapping for value \"XX\""
        );
        assert!(!err.is_retryable());

        let m = mapping(json!({"tables": {"account": {
            "rename": {"country": "address1_country"},
            "values": {"address1_country": {"map": {}}}
        }}}));
        let err = m
            .apply(&event(json!({"country": 12})))
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("field 'country' (target 'address1_country'): no mapping for value 12"),
            "{err}"
        );
    }

    #[test]
    fn defaults_fill_missing_and_null_fields_only() {
        let m = mapping(
            json!({"tables": {"account": {"defaults": {"new_region": "NA", "telephone1": "n/a"}}}}),
        );
        let mapped = m
            .apply(&event(json!({"new_region": "EMEA", "telephone1": null})))
            .unwrap();
        assert_eq!(
            fields_of(&mapped),
            json!({"new_region": "EMEA", "telephone1": "n/a"})
        );
        let mapped = m.apply(&event(json!({}))).unwrap();
        assert_eq!(
            fields_of(&mapped),
            json!({"new_region": "NA", "telephone1": "n/a"})
        );
    }

    #[test]
    fn dropped_fields_and_lookups_are_ignored() {
        let m =
            mapping(json!({"tables": {"contact": {"drop": ["new_ussecret", "parentcustomerid"]}}}));
        let contact = Record::builder(EntityRef::by_id("contact", Uuid::from_u128(1)).unwrap())
            .field("fullname", "Ada")
            .field("new_ussecret", "x")
            .lookup("parentcustomerid", account_ref("A-1"))
            .build()
            .unwrap();
        let mapped = m.apply(&ChangeEvent::upsert("us", &contact, 1)).unwrap();
        assert_eq!(fields_of(&mapped), json!({"fullname": "Ada"}));
        assert!(mapped.lookups.is_empty());
    }

    #[test]
    fn ownership_filters_fields_and_lookups_but_keeps_key_columns() {
        let m = mapping(
            json!({"tables": {"account": {"target_owned": ["creditlimit", "primarycontactid"]}}}),
        );
        let account = Record::builder(account_ref("A-1"))
            .field("name", "Fabrikam")
            .field("creditlimit", 5000)
            .lookup(
                "primarycontactid",
                EntityRef::by_id("contact", Uuid::from_u128(2)).unwrap(),
            )
            .build()
            .unwrap();
        let mapped = m.apply(&ChangeEvent::upsert("us", &account, 1)).unwrap();
        assert_eq!(fields_of(&mapped), json!({"name": "Fabrikam"}));
        assert!(mapped.lookups.is_empty());

        let m = mapping(json!({"tables": {"account": {
            "sync_owned": ["name", "new_region"],
            "defaults": {"new_region": "NA"}
        }}}));
        let mapped = m
            .apply(&event(
                json!({"accountnumber": "A-1", "name": "Fabrikam", "telephone1": "555"}),
            ))
            .unwrap();
        assert_eq!(
            fields_of(&mapped),
            json!({"accountnumber": "A-1", "name": "Fabrikam", "new_region": "NA"}),
            "only sync-owned fields, plus the key column of the address"
        );
    }

    #[test]
    fn two_fields_mapped_to_one_name_are_rejected() {
        let m = mapping(json!({"tables": {"account": {"rename": {"title": "name"}}}}));
        let err = m
            .apply(&event(json!({"title": "A", "name": "B"})))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidEvent { .. }), "{err:?}");
        assert!(err.to_string().contains("'title' (target 'name')"), "{err}");
    }

    #[test]
    fn a_delete_maps_to_its_address_only() {
        let m = mapping(json!({"tables": {"account": {
            "target_table": "organization",
            "defaults": {"new_region": "NA"}
        }}}));
        let mapped = m
            .apply(&ChangeEvent::delete("us", &account_ref("A-1"), 8))
            .unwrap();
        assert_eq!(mapped.reference.table.as_str(), "organization");
        assert!(mapped.fields.is_empty() && mapped.lookups.is_empty());
        assert_eq!(mapped.source_version, Some(8));
    }

    #[test]
    fn from_json_names_the_path_of_a_problem() {
        let cases = [
            (
                json!({"tabels": {}}),
                "mapping at the top level: unknown field `tabels`",
            ),
            (
                json!({"tables": {"account": {"renmae": {}}}}),
                "mapping at tables.account: unknown field `renmae`",
            ),
            (
                json!({"tables": {"account": {"values": {"address1_country": {"map": {}, "on_unknown": "drop"}}}}}),
                "mapping at tables.account.values.address1_country: unknown variant `drop`",
            ),
            (
                json!({"tables": {"account": {"target_owned": "creditlimit"}}}),
                "mapping at tables.account: invalid type: string \"creditlimit\", expected a sequence",
            ),
            (
                json!({"tables": {"bad table": {}}}),
                "mapping at tables.bad table: invalid table name",
            ),
            (
                json!({"tables": {"account": {"rename": {"country": "country code"}}}}),
                "mapping at tables.account.rename.country: invalid column name \"country code\"",
            ),
            (
                json!({"tables": {"account": {"drop": ["ok", "1bad"]}}}),
                "mapping at tables.account.drop[1]: invalid column name \"1bad\"",
            ),
        ];
        for (document, expected) in cases {
            let err = Mapping::from_json(&document.to_string()).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
            assert!(err.to_string().contains(expected), "{document}: {err}");
        }
        let err = Mapping::from_json("{").unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn a_valid_mapping_validates_and_round_trips() {
        let m = mapping(json!({"tables": {
            "account": {
                "rename": {"address1_country": "new_countrycode"},
                "values": {"new_countrycode": {"map": {"US": "USA"}}, "customertypecode": {"map": {"1": 2}}},
                "defaults": {"new_region": "NA", "name": null},
                "target_owned": ["creditlimit"],
                "drop": ["new_ussecret"]
            },
            "us_contact": {
                "target_table": "contact",
                "rename": {"parentaccountid": "parentcustomerid"},
                "sync_owned": ["fullname", "parentcustomerid"]
            }
        }}));
        m.validate(&target_schema()).unwrap();
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(Mapping::from_json(&text).unwrap(), m);
    }

    #[test]
    fn validation_errors_name_table_and_field() {
        let cases = [
            (
                json!({"target_table": "organization"}),
                "",
                "target table 'organization' is not in the target schema",
            ),
            (
                json!({"rename": {"x": "telephone2"}}),
                "telephone2",
                "is not a column or lookup of target table 'account'",
            ),
            (
                json!({"target_owned": ["accountid"]}),
                "accountid",
                "is the primary id",
            ),
            (
                json!({"rename": {"a": "name", "b": "name"}}),
                "name",
                "is the rename target of both 'a' and 'b'",
            ),
            (
                json!({"rename": {"a": "name"}, "drop": ["a"]}),
                "a",
                "is both dropped and renamed",
            ),
            (
                json!({"defaults": {"customertypecode": "one"}}),
                "customertypecode",
                "producing \"one\", which is not of the column's type (Integer)",
            ),
            (
                json!({"values": {"new_countrycode": {"map": {"US": 840}}}}),
                "new_countrycode",
                "has a value map producing 840",
            ),
            (
                json!({"values": {"accountnumber": {"map": {}}}}),
                "accountnumber",
                "is a key column",
            ),
            (
                json!({"sync_owned": ["name"], "target_owned": ["name"]}),
                "name",
                "is both sync-owned and target-owned",
            ),
            (
                json!({"target_owned": ["accountnumber"]}),
                "accountnumber",
                "cannot be target-owned",
            ),
            (
                json!({"target_owned": ["creditlimit"], "defaults": {"creditlimit": 1}}),
                "creditlimit",
                "the sync does not write it",
            ),
            (
                json!({"sync_owned": ["name"], "values": {"new_region": {"map": {}}}}),
                "new_region",
                "the sync does not write it",
            ),
        ];
        for (table_mapping, field, expected) in cases {
            let m = mapping(json!({"tables": {"account": table_mapping}}));
            let err = m.validate(&target_schema()).unwrap_err();
            assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
            let text = err.to_string();
            assert!(text.contains("mapping for table 'account'"), "{text}");
            assert!(
                text.contains(&format!("field '{field}'")) || field.is_empty(),
                "{text}"
            );
            assert!(text.contains(expected), "{text}");
        }
        let m =
            mapping(json!({"tables": {"contact": {"values": {"parentcustomerid": {"map": {}}}}}}));
        let err = m.validate(&target_schema()).unwrap_err().to_string();
        assert!(
            err.contains("field 'parentcustomerid' is a lookup"),
            "{err}"
        );
    }

    const NAMES: [&str; 6] = ["a", "b", "c", "d", "k", "l"];

    fn name() -> impl Strategy<Value = String> {
        proptest::sample::select(&NAMES[..]).prop_map(str::to_owned)
    }

    fn names() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec(name(), 0..4)
    }

    fn json_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            (0..3i64).prop_map(Value::from),
            proptest::sample::select(&["US", "XX"][..]).prop_map(Value::from),
        ]
    }

    fn table_mapping() -> impl Strategy<Value = TableMapping> {
        let value_map = (
            proptest::collection::btree_map(
                proptest::sample::select(&["US", "1"][..]).prop_map(str::to_owned),
                json_value(),
                0..2,
            ),
            prop_oneof![
                Just(UnknownValue::Reject),
                Just(UnknownValue::Keep),
                Just(UnknownValue::Null)
            ],
        )
            .prop_map(|(map, on_unknown)| ValueMap { map, on_unknown });
        (
            proptest::collection::btree_map(name(), name(), 0..4),
            proptest::collection::btree_map(name(), value_map, 0..3),
            proptest::collection::btree_map(name(), json_value(), 0..3),
            proptest::option::of(names()),
            names(),
            names(),
        )
            .prop_map(
                |(rename, values, defaults, sync_owned, target_owned, drop)| TableMapping {
                    target_table: None,
                    rename,
                    values,
                    defaults,
                    sync_owned,
                    target_owned,
                    drop,
                },
            )
    }

    fn source_event() -> impl Strategy<Value = ChangeEvent> {
        (
            proptest::collection::btree_map(name(), json_value(), 0..6),
            proptest::collection::btree_set(name(), 0..3),
            proptest::option::of(name()),
        )
            .prop_map(|(fields, lookups, key_column)| {
                let reference = match key_column {
                    Some(column) => EntityRef::by_key("account", [(column, "K-1")]).unwrap(),
                    None => EntityRef::by_id("account", Uuid::from_u128(1)).unwrap(),
                };
                let mut record = Record::new(reference);
                for (name, value) in fields {
                    record.fields.insert(ColumnName::new(name).unwrap(), value);
                }
                for name in lookups {
                    record
                        .lookups
                        .insert(ColumnName::new(name).unwrap(), account_ref("A-2"));
                }
                ChangeEvent::upsert("us", &record, 1)
            })
    }

    proptest! {
        #[test]
        fn no_target_owned_field_ever_gets_through(
            table_mapping in table_mapping(),
            event in source_event(),
        ) {
            let m = Mapping { tables: BTreeMap::from([("account".to_owned(), table_mapping.clone())]) };
            if let Ok(record) = m.apply(&event) {
                let key_columns: Vec<&str> = match &record.reference.key {
                    Key::Alternate(key) => key.columns().map(ColumnName::as_str).collect(),
                    Key::Id(_) => Vec::new(),
                };
                for name in record.fields.keys().chain(record.lookups.keys()) {
                    prop_assert!(
                        !table_mapping.target_owned.iter().any(|f| f == name.as_str()),
                        "target-owned '{}' written: {:?}", name, record
                    );
                    if let Some(owned) = &table_mapping.sync_owned {
                        prop_assert!(
                            owned.iter().any(|f| f == name.as_str()) || key_columns.contains(&name.as_str()),
                            "'{}' is neither sync-owned nor a key column: {:?}", name, record
                        );
                    }
                }
            }
        }
    }
}
