//! One table as the adapter sees it: the core schema plus its Dataverse names, and the conversions between a
//! [`Record`] and the Web API's JSON.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::dataverse::config::{BulkSupport, CreateStrategy, DataverseTable};
use crate::dataverse::odata::key_segment;
use crate::error::{Error, Result};
use crate::key::{EntityRef, Key};
use crate::name::{ColumnName, TableName};
use crate::record::{HydrationState, Record, StoredRecord, Version};
use crate::schema::TableSchema;

/// A table's schema and Dataverse names, resolved once when the store is built.
#[derive(Clone, Debug)]
pub(crate) struct TableInfo {
    pub schema: TableSchema,
    pub entity_set: String,
    pub navigation: BTreeMap<ColumnName, String>,
    /// Navigation properties by lookup and target table (polymorphic lookups); win over `navigation`.
    pub target_navigation: BTreeMap<(ColumnName, TableName), String>,
    pub state_column: Option<ColumnName>,
    pub bulk: BulkSupport,
    pub create_strategy: CreateStrategy,
    /// Create-only writes by alternate key go as `POST` (set from the start for `PostWithKeys`, by detection for
    /// `Detect`). Shared by the clones of this value.
    post_creates: Arc<AtomicBool>,
    /// `$select` for reads, when the table declares its columns (else every column comes back).
    read_select: Option<String>,
}

/// A row as the service returned it.
#[derive(Debug)]
pub(crate) struct Row {
    pub id: Uuid,
    pub version: Version,
    pub state: HydrationState,
    pub values: Map<String, Value>,
}

impl TableInfo {
    pub fn new(
        schema: TableSchema,
        config: Option<&DataverseTable>,
        create_strategy: CreateStrategy,
    ) -> Result<Self> {
        let default = DataverseTable::new(schema.name.clone());
        let config = config.unwrap_or(&default);
        for (lookup, target) in config.target_navigation.keys() {
            if !schema.lookup_targets(lookup).any(|t| t == target) {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "table '{}': navigation property given for lookup '{lookup}' to '{target}', which the schema does not declare",
                        schema.name
                    ),
                });
            }
        }
        let create_strategy = config.create_strategy.unwrap_or(create_strategy);
        for lookup in config.navigation.keys() {
            if !schema.lookups.contains_key(lookup) {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "table '{}': navigation property given for '{lookup}', which is not a declared lookup",
                        schema.name
                    ),
                });
            }
        }
        let read_select = (!schema.columns.is_empty()).then(|| {
            let mut columns: Vec<String> = vec![schema.primary_id.to_string()];
            columns.extend(schema.primary_name.iter().map(ToString::to_string));
            for def in &schema.alternate_keys {
                columns.extend(def.columns.iter().map(|(c, _)| c.to_string()));
            }
            columns.extend(schema.columns.keys().map(ToString::to_string));
            columns.extend(schema.lookups.keys().map(|l| format!("_{l}_value")));
            columns.extend(config.state_column.iter().map(ToString::to_string));
            columns.sort();
            columns.dedup();
            columns.join(",")
        });
        Ok(Self {
            entity_set: config.entity_set(),
            navigation: config.navigation.clone(),
            target_navigation: config.target_navigation.clone(),
            state_column: config.state_column.clone(),
            bulk: config.bulk,
            create_strategy,
            post_creates: Arc::new(AtomicBool::new(
                create_strategy == CreateStrategy::PostWithKeys,
            )),
            read_select,
            schema,
        })
    }

    pub fn name(&self) -> &TableName {
        &self.schema.name
    }

    /// Whether create-only writes by alternate key go as `POST` with the key columns in the body.
    pub fn posts_creates(&self) -> bool {
        self.post_creates.load(Ordering::Relaxed)
    }

    /// Switches a [`CreateStrategy::Detect`] table to `POST` creates; true the first time.
    pub fn switch_to_post(&self) -> bool {
        self.create_strategy == CreateStrategy::Detect
            && !self.post_creates.swap(true, Ordering::Relaxed)
    }

    /// The navigation property that binds `lookup` to a row of `target`: the one for that target, else the
    /// lookup's, else the lookup's own name.
    pub fn navigation_property<'a>(
        &'a self,
        lookup: &'a ColumnName,
        target: &TableName,
    ) -> &'a str {
        self.target_navigation
            .get(&(lookup.clone(), target.clone()))
            .or_else(|| self.navigation.get(lookup))
            .map_or(lookup.as_str(), String::as_str)
    }

    /// The `$select` of a full read, when the table declares its columns.
    pub fn read_select(&self) -> Option<&str> {
        self.read_select.as_deref()
    }

    /// `accounts(accountnumber='A-1')`
    pub fn address(&self, key: &Key) -> String {
        entity_path_str(&self.entity_set, key)
    }

    /// The path of a read: the address and, when the table declares its columns, a `$select`.
    pub fn read_path(&self, key: &Key) -> String {
        match &self.read_select {
            Some(select) => format!("{}?$select={select}", self.address(key)),
            None => self.address(key),
        }
    }

    /// The path of a read of the whole table.
    pub fn read_path_collection(&self) -> String {
        match &self.read_select {
            Some(select) => format!("{}?$select={select}", self.entity_set),
            None => self.entity_set.clone(),
        }
    }

    /// `$select` of a write's representation: the id, and the state column when there is one.
    pub fn outcome_select(&self) -> String {
        match &self.state_column {
            Some(state) => format!("{},{state}", self.schema.primary_id),
            None => self.schema.primary_id.to_string(),
        }
    }

    /// `$select` of the values a write touches, to compare against before writing.
    pub fn compare_select(&self, record: &Record) -> String {
        let mut columns = vec![self.schema.primary_id.to_string()];
        columns.extend(record.fields.keys().map(ToString::to_string));
        columns.extend(record.lookups.keys().map(|l| format!("_{l}_value")));
        columns.extend(self.state_column.iter().map(ToString::to_string));
        columns.join(",")
    }

    /// The JSON body of a write: its fields, `@odata.bind` for its lookups, and the state column if `state` is
    /// given. `bind` resolves a lookup target's entity set.
    pub fn body(
        &self,
        record: &Record,
        state: Option<HydrationState>,
        entity_set_of: impl Fn(&TableName) -> Result<String>,
    ) -> Result<Map<String, Value>> {
        let mut body = Map::with_capacity(record.fields.len() + record.lookups.len() + 1);
        for (column, value) in &record.fields {
            body.insert(column.to_string(), value.clone());
        }
        for (lookup, target) in &record.lookups {
            let property = self.navigation_property(lookup, &target.table);
            let set = entity_set_of(&target.table)?;
            body.insert(
                format!("{property}@odata.bind"),
                Value::String(format!("/{}", entity_path_str(&set, &target.key))),
            );
        }
        if let (Some(column), Some(state)) = (&self.state_column, state) {
            body.insert(
                column.to_string(),
                Value::Bool(state == HydrationState::Placeholder),
            );
        }
        Ok(body)
    }

    /// Reads a row from a response body: id, version (from the ETag), hydration state and values.
    pub fn row(&self, backend: &str, json: Value) -> Result<Row> {
        let malformed = |what: &str| Error::Backend {
            backend: backend.to_owned(),
            message: format!(
                "table '{}': the service returned a row {what}",
                self.schema.name
            ),
            retryable: false,
            source: None,
        };
        let Value::Object(values) = json else {
            return Err(malformed("that is not a JSON object"));
        };
        let id = values
            .get(self.schema.primary_id.as_str())
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| malformed(&format!("without its id '{}'", self.schema.primary_id)))?;
        let version = values
            .get("@odata.etag")
            .and_then(Value::as_str)
            .and_then(parse_etag)
            .or_else(|| {
                values
                    .get("versionnumber")
                    .and_then(Value::as_u64)
                    .map(Version)
            })
            .ok_or_else(|| malformed("without a usable @odata.etag"))?;
        let state = match &self.state_column {
            Some(column) if values.get(column.as_str()) == Some(&Value::Bool(true)) => {
                HydrationState::Placeholder
            }
            _ => HydrationState::Hydrated,
        };
        Ok(Row {
            id,
            version,
            state,
            values,
        })
    }

    /// A stored record from a row: annotations, the id, the state column and the row version are not fields;
    /// `_<lookup>_value` becomes a lookup by id; nulls are absent fields.
    pub fn stored(&self, row: Row) -> Result<StoredRecord> {
        let mut record = Record::new(EntityRef {
            table: self.schema.name.clone(),
            key: Key::Id(row.id),
        });
        record.state = row.state;
        let annotations: Map<String, Value> = row
            .values
            .iter()
            .filter(|(name, _)| name.ends_with("@Microsoft.Dynamics.CRM.lookuplogicalname"))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        for (name, value) in row.values {
            if value.is_null()
                || name.contains('@')
                || name == self.schema.primary_id.as_str()
                || name == "versionnumber"
                || self
                    .state_column
                    .as_ref()
                    .is_some_and(|s| s.as_str() == name)
            {
                continue;
            }
            if let Some(lookup) = name
                .strip_prefix('_')
                .and_then(|n| n.strip_suffix("_value"))
            {
                if let Some((lookup, target)) = self.schema.lookups.get_key_value(lookup)
                    && let Some(id) = value.as_str().and_then(|s| Uuid::parse_str(s).ok())
                {
                    // A polymorphic lookup says its target's table in an annotation (when annotations were
                    // asked for); without it, the lookup's first target.
                    let annotated = annotations
                        .get(&format!("{name}@Microsoft.Dynamics.CRM.lookuplogicalname"))
                        .and_then(Value::as_str)
                        .and_then(|t| self.schema.lookup_targets(lookup).find(|d| d.as_str() == t));
                    record.lookups.insert(
                        lookup.clone(),
                        EntityRef {
                            table: annotated.unwrap_or(target).clone(),
                            key: Key::Id(id),
                        },
                    );
                }
                continue;
            }
            // Columns the service has and the schema does not name (system columns) are left out when the
            // schema declares its columns; otherwise everything is a field.
            let Ok(column) = ColumnName::new(&name) else {
                continue;
            };
            if self.schema.columns.is_empty() || self.schema.column_type(&column).is_some() {
                record.fields.insert(column, value);
            }
        }
        Ok(StoredRecord {
            id: row.id,
            version: row.version,
            record,
        })
    }
}

/// `accounts(...)`. Entity set names are validated identifiers (`DataverseTable::with_entity_set`), so they are
/// written as they are.
fn entity_path_str(entity_set: &str, key: &Key) -> String {
    let mut path = String::with_capacity(entity_set.len() + 48);
    path.push_str(entity_set);
    path.push_str(&key_segment(key));
    path
}

/// `W/"536537"` → 536537. Dataverse's ETag is the row version; Microsoft calls it opaque, so anything else is
/// rejected rather than guessed at.
pub(crate) fn parse_etag(etag: &str) -> Option<Version> {
    let inner = etag.trim().strip_prefix("W/").unwrap_or(etag.trim());
    inner.trim_matches('"').parse().ok().map(Version)
}

/// The `If-Match` value for a version.
pub(crate) fn etag(version: Version) -> String {
    format!("W/\"{}\"", version.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyKind;
    use crate::schema::ColumnType;
    use serde_json::json;

    fn contacts() -> TableInfo {
        let schema = TableSchema::builder("contact")
            .primary_name("fullname")
            .alternate_key([("emailaddress1", KeyKind::String)])
            .lookup("parentcustomerid", "account")
            .column("jobtitle", ColumnType::String)
            .build()
            .unwrap();
        let config = DataverseTable::new("contact")
            .with_navigation("parentcustomerid", "parentcustomerid_account")
            .with_state_column("new_isplaceholder");
        TableInfo::new(schema, Some(&config), CreateStrategy::default()).unwrap()
    }

    #[test]
    fn etags_are_row_versions() {
        assert_eq!(parse_etag("W/\"536537\""), Some(Version(536537)));
        assert_eq!(parse_etag("\"7\""), Some(Version(7)));
        assert_eq!(parse_etag("W/\"abc\""), None);
        assert_eq!(etag(Version(9)), "W/\"9\"");
    }

    #[test]
    fn a_write_body_binds_lookups_through_their_navigation_property() {
        let t = contacts();
        let parent = EntityRef::by_key("account", [("accountnumber", "O'Brien & Co/1?")]).unwrap();
        let record = Record::builder(EntityRef::by_id("contact", Uuid::from_u128(1)).unwrap())
            .field("fullname", "Ada")
            .lookup("parentcustomerid", parent)
            .build()
            .unwrap();
        let body = t
            .body(&record, Some(HydrationState::Hydrated), |_| {
                Ok("accounts".into())
            })
            .unwrap();
        assert_eq!(
            Value::Object(body),
            json!({
                "fullname": "Ada",
                "parentcustomerid_account@odata.bind": "/accounts(accountnumber='O%27%27Brien%20%26%20Co%2F1%3F')",
                "new_isplaceholder": false,
            })
        );
    }

    #[test]
    fn rows_become_records_without_annotations_or_system_columns() {
        let t = contacts();
        let id = Uuid::from_u128(5);
        let parent = Uuid::from_u128(6);
        let row = t
            .row(
                "eu",
                json!({
                    "@odata.etag": "W/\"42\"",
                    "contactid": id.to_string(),
                    "fullname": "Ada",
                    "jobtitle": null,
                    "emailaddress1": "ada@example.com",
                    "_parentcustomerid_value": parent.to_string(),
                    "_parentcustomerid_value@OData.Community.Display.V1.FormattedValue": "Fabrikam",
                    "new_isplaceholder": true,
                    "createdon": "2026-01-01T00:00:00Z",
                }),
            )
            .unwrap();
        assert_eq!(
            (row.id, row.version, row.state),
            (id, Version(42), HydrationState::Placeholder)
        );
        let stored = t.stored(row).unwrap();
        let fields: Vec<&str> = stored
            .record
            .fields
            .keys()
            .map(ColumnName::as_str)
            .collect();
        assert_eq!(fields, ["emailaddress1", "fullname"]);
        assert_eq!(
            stored
                .record
                .lookups
                .values()
                .next()
                .and_then(EntityRef::id),
            Some(parent)
        );
        assert!(t.row("eu", json!({"fullname": "no id"})).is_err());
        assert!(t.row("eu", json!({"contactid": id.to_string()})).is_err());
    }

    #[test]
    fn reads_select_the_declared_columns() {
        assert_eq!(
            contacts().read_path(&Key::Id(Uuid::from_u128(1))),
            "contacts(00000000-0000-0000-0000-000000000001)?$select=_parentcustomerid_value,contactid,emailaddress1,fullname,jobtitle,new_isplaceholder"
        );
    }

    #[test]
    fn navigation_for_an_undeclared_lookup_is_a_config_error() {
        let schema = TableSchema::builder("contact").build().unwrap();
        let config = DataverseTable::new("contact").with_navigation("nosuch", "nosuch_account");
        assert!(matches!(
            TableInfo::new(schema, Some(&config), CreateStrategy::default()),
            Err(Error::InvalidConfig { .. })
        ));
    }
}
