//! Table definitions: the primary id and name columns, alternate keys, lookups and (optionally) typed columns.
//!
//! A store uses the schema to enforce what a real Dataverse enforces: only declared alternate keys address
//! records, key values are unique, lookups point at the right table, and (when columns are declared) values have
//! the declared type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::key::{AlternateKey, Key, KeyKind, KeyValue};
use crate::name::{ColumnName, IntoName, TableName};
use crate::record::Record;

/// The type of a declared column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// JSON string.
    String,
    /// JSON whole number.
    Integer,
    /// JSON number.
    Decimal,
    /// JSON boolean.
    Boolean,
    /// JSON string holding a GUID.
    Guid,
    /// Any JSON value.
    Any,
}

impl ColumnType {
    /// Whether a non-null JSON value fits this type.
    pub fn accepts(self, value: &serde_json::Value) -> bool {
        match self {
            ColumnType::String => value.is_string(),
            ColumnType::Integer => value.is_i64(),
            ColumnType::Decimal => value.is_number(),
            ColumnType::Boolean => value.is_boolean(),
            ColumnType::Guid => value
                .as_str()
                .is_some_and(|s| uuid::Uuid::parse_str(s).is_ok()),
            ColumnType::Any => true,
        }
    }
}

impl From<KeyKind> for ColumnType {
    fn from(kind: KeyKind) -> Self {
        match kind {
            KeyKind::String => ColumnType::String,
            KeyKind::Integer => ColumnType::Integer,
            KeyKind::Guid => ColumnType::Guid,
        }
    }
}

/// One declared alternate key: its columns (sorted) and their types.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlternateKeyDef {
    /// Columns and their types, sorted by column.
    pub columns: Vec<(ColumnName, KeyKind)>,
}

impl AlternateKeyDef {
    /// Whether `key` names exactly these columns.
    pub fn matches(&self, key: &AlternateKey) -> bool {
        key.parts().len() == self.columns.len()
            && key.columns().zip(&self.columns).all(|(a, (b, _))| a == b)
    }
}

/// A table's definition. Build with [`TableSchema::builder`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableSchema {
    /// Logical name, such as `account`.
    pub name: TableName,
    /// Primary id column, such as `accountid`. Set only by addressing a record by id, never as a field.
    pub primary_id: ColumnName,
    /// Primary name column, such as `name`, if the table has one.
    pub primary_name: Option<ColumnName>,
    /// Declared alternate keys.
    pub alternate_keys: Vec<AlternateKeyDef>,
    /// Lookup name → target table (for a polymorphic lookup, its first target).
    pub lookups: BTreeMap<ColumnName, TableName>,
    /// The further target tables of polymorphic lookups (a customer lookup to `account` or `contact`), by lookup;
    /// the first target is in [`lookups`](Self::lookups). A lookup's value says which target it references (the
    /// [`EntityRef`](crate::EntityRef)'s table). Use [`lookup_targets`](Self::lookup_targets) for all of them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub more_lookup_targets: BTreeMap<ColumnName, Vec<TableName>>,
    /// Declared columns and their types. When empty, any column is accepted (schemaless tables); when not,
    /// every field must be declared here, be a key column or the primary name.
    pub columns: BTreeMap<ColumnName, ColumnType>,
}

impl TableSchema {
    /// Starts a table definition. The primary id column defaults to `<name>id`, as in Dataverse.
    pub fn builder(name: impl IntoName<TableName>) -> TableSchemaBuilder {
        TableSchemaBuilder {
            name: name.into_name(),
            primary_id: None,
            primary_name: None,
            alternate_keys: Vec::new(),
            lookups: Vec::new(),
            columns: Vec::new(),
        }
    }

    /// Every table `lookup` may point at: its target, or for a polymorphic lookup each of them, in declaration
    /// order. Empty when the table has no such lookup.
    pub fn lookup_targets<'a>(
        &'a self,
        lookup: &ColumnName,
    ) -> impl Iterator<Item = &'a TableName> {
        self.lookups
            .get(lookup)
            .into_iter()
            .chain(self.more_lookup_targets.get(lookup).into_iter().flatten())
    }

    /// The declared alternate key with exactly `key`'s columns, with its index.
    pub fn alternate_key(&self, key: &AlternateKey) -> Option<(usize, &AlternateKeyDef)> {
        self.alternate_keys
            .iter()
            .enumerate()
            .find(|(_, def)| def.matches(key))
    }

    /// Which declared key `key` is, and its values in that key's column order; checks the value types.
    pub fn key_address(&self, key: &AlternateKey) -> Result<(usize, Vec<KeyValue>)> {
        let Some((index, def)) = self.alternate_key(key) else {
            let columns: Vec<&str> = key.columns().map(ColumnName::as_str).collect();
            return Err(Error::InvalidKey {
                table: self.name.clone(),
                reason: format!("({}) is not a declared alternate key", columns.join(", ")),
            });
        };
        for ((column, value), (_, kind)) in key.parts().zip(&def.columns) {
            if value.kind() != *kind {
                return Err(Error::InvalidKey {
                    table: self.name.clone(),
                    reason: format!("key column '{column}' takes a {kind} value, got {value}"),
                });
            }
        }
        Ok((index, key.parts().map(|(_, v)| v.clone()).collect()))
    }

    /// Checks a write against the table before any store sees it: a declared key of the right types, known
    /// columns of the right types, no primary id or lookup among the fields, fields that agree with the key,
    /// declared lookups to the right tables. Returns the alternate key's address ([`key_address`](Self::key_address))
    /// when the record is addressed by one.
    pub fn check_write(&self, record: &Record) -> Result<Option<(usize, Vec<KeyValue>)>> {
        let invalid = |field: &ColumnName, reason: String| Error::InvalidValue {
            reference: Box::new(record.reference.clone()),
            field: field.clone(),
            reason,
        };
        let (key, address) = match &record.reference.key {
            Key::Id(_) => (None, None),
            Key::Alternate(key) => (Some(key), Some(self.key_address(key)?)),
        };
        for (column, value) in &record.fields {
            if *column == self.primary_id {
                return Err(invalid(
                    column,
                    "the primary id is set by addressing the record by id".into(),
                ));
            }
            if self.lookups.contains_key(column) {
                return Err(invalid(
                    column,
                    "this is a lookup: set it through the record's lookups".into(),
                ));
            }
            let Some(ty) = self.column_type(column) else {
                return Err(Error::UnknownColumn {
                    table: self.name.clone(),
                    column: column.clone(),
                });
            };
            if !value.is_null() && !ty.accepts(value) {
                return Err(invalid(
                    column,
                    format!("expected a {ty:?} value, got {value}"),
                ));
            }
            if let Some(key) = key
                && let Some(key_value) = key.get(column.as_str())
                && !key_value.is_json(value)
            {
                return Err(invalid(
                    column,
                    format!("contradicts the record's key, which has {key_value}"),
                ));
            }
        }
        for (name, target) in &record.lookups {
            let Some(target_table) = self.lookups.get(name) else {
                return Err(Error::UnknownColumn {
                    table: self.name.clone(),
                    column: name.clone(),
                });
            };
            if target.table != *target_table
                && !self.lookup_targets(name).any(|t| *t == target.table)
            {
                let targets: Vec<&str> = self.lookup_targets(name).map(TableName::as_str).collect();
                return Err(invalid(
                    name,
                    format!(
                        "lookup targets table '{}', not '{}'",
                        targets.join("' or '"),
                        target.table
                    ),
                ));
            }
        }
        Ok(address)
    }

    /// The type of a column a field may set, or `None` if the table does not accept it.
    pub fn column_type(&self, column: &ColumnName) -> Option<ColumnType> {
        if let Some(kind) = self
            .alternate_keys
            .iter()
            .flat_map(|def| &def.columns)
            .find_map(|(c, kind)| (c == column).then_some(*kind))
        {
            return Some(kind.into());
        }
        if self.primary_name.as_ref() == Some(column) {
            return Some(ColumnType::String);
        }
        match self.columns.get(column) {
            Some(ty) => Some(*ty),
            None if self.columns.is_empty() => Some(ColumnType::Any),
            None => None,
        }
    }
}

type Deferred<T> = Result<T>;

/// Builds a [`TableSchema`]; setters never fail, [`build`](Self::build) reports the first problem.
#[derive(Debug)]
#[must_use]
pub struct TableSchemaBuilder {
    name: Deferred<TableName>,
    primary_id: Option<Deferred<ColumnName>>,
    primary_name: Option<Deferred<ColumnName>>,
    alternate_keys: Vec<Deferred<Vec<(ColumnName, KeyKind)>>>,
    lookups: Vec<(Deferred<ColumnName>, Deferred<Vec<TableName>>)>,
    columns: Vec<(Deferred<ColumnName>, ColumnType)>,
}

impl TableSchemaBuilder {
    /// Sets the primary id column (default `<table>id`).
    pub fn primary_id(mut self, column: impl IntoName<ColumnName>) -> Self {
        self.primary_id = Some(column.into_name());
        self
    }

    /// Sets the primary name column.
    pub fn primary_name(mut self, column: impl IntoName<ColumnName>) -> Self {
        self.primary_name = Some(column.into_name());
        self
    }

    /// Declares an alternate key (one column, or several for a composite key).
    pub fn alternate_key<C: IntoName<ColumnName>>(
        mut self,
        columns: impl IntoIterator<Item = (C, KeyKind)>,
    ) -> Self {
        let columns: Result<Vec<_>> = columns
            .into_iter()
            .map(|(c, k)| Ok((c.into_name()?, k)))
            .collect();
        self.alternate_keys.push(columns);
        self
    }

    /// Declares a lookup to `target`.
    pub fn lookup(
        mut self,
        name: impl IntoName<ColumnName>,
        target: impl IntoName<TableName>,
    ) -> Self {
        self.lookups
            .push((name.into_name(), target.into_name().map(|t| vec![t])));
        self
    }

    /// Declares a polymorphic lookup that may point at any of `targets` (Dataverse's customer and regarding
    /// lookups: `parentcustomerid` to `account` or `contact`). A record's value names the table it references.
    pub fn polymorphic_lookup<T: IntoName<TableName>>(
        mut self,
        name: impl IntoName<ColumnName>,
        targets: impl IntoIterator<Item = T>,
    ) -> Self {
        let targets: Result<Vec<TableName>> =
            targets.into_iter().map(IntoName::into_name).collect();
        self.lookups.push((name.into_name(), targets));
        self
    }

    /// Declares a typed column. Declaring any column makes the table strict.
    pub fn column(mut self, name: impl IntoName<ColumnName>, ty: ColumnType) -> Self {
        self.columns.push((name.into_name(), ty));
        self
    }

    /// Checks and returns the definition.
    pub fn build(self) -> Result<TableSchema> {
        let name = self.name?;
        let invalid = |reason: String| Error::InvalidConfig {
            reason: format!("table '{name}': {reason}"),
        };
        let primary_id = match self.primary_id {
            Some(column) => column?,
            None => ColumnName::new(format!("{name}id"))?,
        };
        let primary_name = self.primary_name.transpose()?;
        let mut alternate_keys = Vec::new();
        for columns in self.alternate_keys {
            let mut columns = columns?;
            columns.sort_by(|a, b| a.0.cmp(&b.0));
            if columns.is_empty() {
                return Err(invalid("an alternate key needs at least one column".into()));
            }
            if columns.windows(2).any(|w| w[0].0 == w[1].0) {
                return Err(invalid("an alternate key repeats a column".into()));
            }
            if columns.iter().any(|(c, _)| *c == primary_id) {
                return Err(invalid(format!(
                    "the primary id '{primary_id}' cannot be part of an alternate key"
                )));
            }
            let def = AlternateKeyDef { columns };
            if alternate_keys.contains(&def) {
                return Err(invalid("the same alternate key is declared twice".into()));
            }
            alternate_keys.push(def);
        }
        let mut lookups = BTreeMap::new();
        let mut more_lookup_targets = BTreeMap::new();
        for (lookup, targets) in self.lookups {
            let lookup = lookup?;
            let mut targets = targets?.into_iter();
            let Some(first) = targets.next() else {
                return Err(invalid(format!("lookup '{lookup}' has no target table")));
            };
            if lookups.insert(lookup.clone(), first.clone()).is_some() {
                return Err(invalid(format!("lookup '{lookup}' is declared twice")));
            }
            let more: Vec<TableName> = targets.collect();
            if more.contains(&first) || (1..more.len()).any(|i| more[i..].contains(&more[i - 1])) {
                return Err(invalid(format!("lookup '{lookup}' repeats a target table")));
            }
            if !more.is_empty() {
                more_lookup_targets.insert(lookup, more);
            }
        }
        let mut columns = BTreeMap::new();
        for (column, ty) in self.columns {
            let column = column?;
            if column == primary_id || lookups.contains_key(&column) {
                return Err(invalid(format!(
                    "column '{column}' is also the primary id or a lookup"
                )));
            }
            columns.insert(column, ty);
        }
        Ok(TableSchema {
            name,
            primary_id,
            primary_name,
            alternate_keys,
            lookups,
            more_lookup_targets,
            columns,
        })
    }
}

/// A set of tables.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    tables: BTreeMap<TableName, TableSchema>,
}

impl Schema {
    /// Builds a schema from table definitions, checking names are unique and lookups point at known tables.
    pub fn new(tables: impl IntoIterator<Item = TableSchema>) -> Result<Self> {
        let mut map = BTreeMap::new();
        for table in tables {
            let name = table.name.clone();
            if map.insert(name.clone(), table).is_some() {
                return Err(Error::InvalidConfig {
                    reason: format!("table '{name}' is declared twice"),
                });
            }
        }
        for table in map.values() {
            let targets = table
                .lookups
                .keys()
                .flat_map(|lookup| table.lookup_targets(lookup).map(move |t| (lookup, t)));
            for (lookup, target) in targets {
                if !map.contains_key(target) {
                    return Err(Error::InvalidConfig {
                        reason: format!(
                            "table '{}': lookup '{lookup}' targets unknown table '{target}'",
                            table.name
                        ),
                    });
                }
            }
        }
        Ok(Self { tables: map })
    }

    /// One table's definition.
    pub fn table(&self, name: &TableName) -> Result<&TableSchema> {
        self.tables.get(name).ok_or_else(|| Error::UnknownTable {
            table: name.clone(),
        })
    }

    /// All tables.
    pub fn tables(&self) -> impl Iterator<Item = &TableSchema> {
        self.tables.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_reports_the_first_problem() {
        assert!(matches!(
            TableSchema::builder("bad name").build(),
            Err(Error::InvalidName { .. })
        ));
        let dup = TableSchema::builder("account")
            .alternate_key([("accountnumber", KeyKind::String)])
            .alternate_key([("accountnumber", KeyKind::String)])
            .build();
        assert!(matches!(dup, Err(Error::InvalidConfig { reason }) if reason.contains("twice")));
        let t = TableSchema::builder("account").build().unwrap();
        assert_eq!(t.primary_id.as_str(), "accountid");
    }

    #[test]
    fn a_polymorphic_lookup_takes_any_of_its_targets_and_no_other() {
        use crate::key::EntityRef;
        let contact = TableSchema::builder("contact")
            .polymorphic_lookup("parentcustomerid", ["account", "contact"])
            .build()
            .unwrap();
        let targets: Vec<&str> = contact
            .lookup_targets(&ColumnName::new("parentcustomerid").unwrap())
            .map(TableName::as_str)
            .collect();
        assert_eq!(targets, ["account", "contact"]);
        let write = |target: &str| {
            Record::builder(EntityRef::by_id("contact", uuid::Uuid::from_u128(1)).unwrap())
                .lookup(
                    "parentcustomerid",
                    EntityRef::by_id(target, uuid::Uuid::from_u128(2)).unwrap(),
                )
                .build()
                .unwrap()
        };
        assert!(contact.check_write(&write("account")).is_ok());
        assert!(contact.check_write(&write("contact")).is_ok());
        let err = contact.check_write(&write("lead")).unwrap_err();
        assert!(
            err.to_string()
                .contains("'account' or 'contact', not 'lead'"),
            "{err}"
        );
        let err = Schema::new([contact.clone()]).unwrap_err();
        assert!(err.to_string().contains("unknown table 'account'"), "{err}");
        let account = TableSchema::builder("account").build().unwrap();
        assert!(Schema::new([account, contact]).is_ok());
        assert!(
            TableSchema::builder("contact")
                .polymorphic_lookup("parentcustomerid", ["account", "account"])
                .build()
                .is_err()
        );
        assert!(
            TableSchema::builder("contact")
                .polymorphic_lookup("parentcustomerid", Vec::<&str>::new())
                .build()
                .is_err()
        );
    }

    #[test]
    fn schema_checks_lookup_targets() {
        let contact = TableSchema::builder("contact")
            .lookup("parentcustomerid", "account")
            .build()
            .unwrap();
        let err = Schema::new([contact]).unwrap_err();
        assert!(err.to_string().contains("unknown table 'account'"), "{err}");
    }
}
