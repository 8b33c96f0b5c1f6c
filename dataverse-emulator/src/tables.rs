//! The in-memory rows: per table a hash map by id plus one hash index per alternate key, a global version
//! counter (the ETag), deletion tombstones for change tracking, and an undo log for atomic change sets and bulk
//! messages.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};
use uuid::Uuid;

use super::config::{EmulatedTable, MAX_ALTERNATE_KEYS};
use super::url::Literal;

/// Entity set names the emulator routes itself; a table may not use them.
const RESERVED_SEGMENTS: &[&str] = &[
    "$batch",
    "$metadata",
    "WhoAmI",
    "EntityDefinitions",
    "sdkmessagefilters",
];

/// A table's immutable definition.
#[derive(Debug)]
pub(crate) struct TableDef {
    pub(crate) logical: String,
    pub(crate) set: String,
    pub(crate) primary_id: String,
    pub(crate) primary_name: String,
    pub(crate) keys: Vec<KeyDef>,
    pub(crate) lookups: Vec<LookupDef>,
    /// Declared columns (plus primary id, primary name, key columns), if declared.
    pub(crate) columns: Option<HashSet<String>>,
    pub(crate) bulk: bool,
}

#[derive(Debug)]
pub(crate) struct KeyDef {
    pub(crate) name: String,
    /// In declaration order; key tuples follow it.
    pub(crate) columns: Vec<String>,
}

#[derive(Debug)]
pub(crate) struct LookupDef {
    pub(crate) navprop: String,
    pub(crate) column: String,
    /// `_<column>_value`.
    pub(crate) value_field: String,
    pub(crate) target: usize,
}

impl TableDef {
    /// The OData type name: `Microsoft.Dynamics.CRM.account`.
    pub(crate) fn type_name(&self) -> String {
        format!("Microsoft.Dynamics.CRM.{}", self.logical)
    }

    pub(crate) fn lookup_by_navprop(&self, navprop: &str) -> Option<&LookupDef> {
        self.lookups.iter().find(|l| l.navprop == navprop)
    }

    /// Whether `column` may be written or selected when columns are declared.
    pub(crate) fn knows_column(&self, column: &str) -> bool {
        match &self.columns {
            None => true,
            Some(columns) => columns.contains(column),
        }
    }
}

/// All table definitions.
#[derive(Debug)]
pub(crate) struct Schema {
    pub(crate) tables: Vec<TableDef>,
    by_set: HashMap<String, usize>,
    by_logical: HashMap<String, usize>,
}

impl Schema {
    pub(crate) fn new(tables: &[EmulatedTable]) -> Result<Schema, String> {
        let mut by_set = HashMap::new();
        let mut by_logical = HashMap::new();
        for (index, t) in tables.iter().enumerate() {
            for (what, name) in [
                ("logical name", &t.logical_name),
                ("entity set name", &t.entity_set),
                ("primary id column", &t.primary_id),
                ("primary name column", &t.primary_name),
            ] {
                if !is_identifier(name) {
                    return Err(format!(
                        "table '{}': {what} '{name}' is not an identifier",
                        t.logical_name
                    ));
                }
            }
            if RESERVED_SEGMENTS.contains(&t.entity_set.as_str()) {
                return Err(format!(
                    "table '{}': entity set name '{}' is reserved",
                    t.logical_name, t.entity_set
                ));
            }
            if by_set.insert(t.entity_set.clone(), index).is_some() {
                return Err(format!(
                    "entity set name '{}' is declared twice",
                    t.entity_set
                ));
            }
            if by_logical.insert(t.logical_name.clone(), index).is_some() {
                return Err(format!("table '{}' is declared twice", t.logical_name));
            }
        }
        let mut defs = Vec::with_capacity(tables.len());
        for t in tables {
            if t.keys.len() > MAX_ALTERNATE_KEYS {
                return Err(format!(
                    "table '{}' declares {} alternate keys; at most {MAX_ALTERNATE_KEYS} are allowed",
                    t.logical_name,
                    t.keys.len()
                ));
            }
            let mut keys = Vec::with_capacity(t.keys.len());
            for columns in &t.keys {
                let distinct: HashSet<&String> = columns.iter().collect();
                if columns.is_empty() || distinct.len() != columns.len() {
                    return Err(format!(
                        "table '{}': alternate key {columns:?} needs one or more distinct columns",
                        t.logical_name
                    ));
                }
                if let Some(bad) = columns.iter().find(|c| !is_identifier(c)) {
                    return Err(format!(
                        "table '{}': key column '{bad}' is not an identifier",
                        t.logical_name
                    ));
                }
                if keys.iter().any(|k: &KeyDef| {
                    k.columns.len() == columns.len()
                        && k.columns.iter().all(|c| distinct.contains(c))
                }) {
                    return Err(format!(
                        "table '{}': alternate key {columns:?} is declared twice",
                        t.logical_name
                    ));
                }
                keys.push(KeyDef {
                    name: format!("{}_{}_key", t.logical_name, columns.join("_")),
                    columns: columns.clone(),
                });
            }
            let mut lookups = Vec::with_capacity(t.lookups.len());
            for l in &t.lookups {
                let Some(&target) = by_logical.get(&l.target) else {
                    return Err(format!(
                        "table '{}': lookup '{}' targets table '{}', which is not declared",
                        t.logical_name, l.navigation_property, l.target
                    ));
                };
                if !is_identifier(&l.navigation_property) || !is_identifier(&l.column) {
                    return Err(format!(
                        "table '{}': lookup '{}' / column '{}' must be identifiers",
                        t.logical_name, l.navigation_property, l.column
                    ));
                }
                if lookups
                    .iter()
                    .any(|x: &LookupDef| x.navprop == l.navigation_property)
                {
                    return Err(format!(
                        "table '{}': navigation property '{}' is declared twice",
                        t.logical_name, l.navigation_property
                    ));
                }
                lookups.push(LookupDef {
                    navprop: l.navigation_property.clone(),
                    column: l.column.clone(),
                    value_field: format!("_{}_value", l.column),
                    target,
                });
            }
            let columns = t.columns.as_ref().map(|declared| {
                let mut set: HashSet<String> = declared.iter().cloned().collect();
                set.insert(t.primary_id.clone());
                set.insert(t.primary_name.clone());
                set.extend(keys.iter().flat_map(|k| k.columns.iter().cloned()));
                set.extend(lookups.iter().map(|l| l.value_field.clone()));
                set.insert("versionnumber".to_owned());
                set
            });
            defs.push(TableDef {
                logical: t.logical_name.clone(),
                set: t.entity_set.clone(),
                primary_id: t.primary_id.clone(),
                primary_name: t.primary_name.clone(),
                keys,
                lookups,
                columns,
                bulk: t.bulk_supported,
            });
        }
        Ok(Schema {
            tables: defs,
            by_set,
            by_logical,
        })
    }

    pub(crate) fn by_set(&self, set: &str) -> Option<usize> {
        self.by_set.get(set).copied()
    }

    pub(crate) fn by_logical(&self, logical: &str) -> Option<usize> {
        self.by_logical.get(logical).copied()
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One alternate key value, normalised so that a URL literal and a stored JSON value compare equal: strings
/// (GUID-shaped ones lowercased), integers, anything else by its JSON text.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum KeyPart {
    Str(String),
    Int(i64),
    Other(String),
}

pub(crate) type KeyTuple = Vec<KeyPart>;

impl KeyPart {
    /// `None` for null (a row with a null key column is not indexed under that key).
    pub(crate) fn of_json(value: &Value) -> Option<KeyPart> {
        match value {
            Value::Null => None,
            Value::String(s) => Some(KeyPart::Str(canonical_string(s))),
            Value::Number(n) => Some(match n.as_i64() {
                Some(i) => KeyPart::Int(i),
                None => KeyPart::Other(n.to_string()),
            }),
            other => Some(KeyPart::Other(other.to_string())),
        }
    }

    pub(crate) fn of_literal(literal: &Literal) -> Option<KeyPart> {
        match literal {
            Literal::Null => None,
            Literal::Str(s) => Some(KeyPart::Str(canonical_string(s))),
            Literal::Int(i) => Some(KeyPart::Int(*i)),
            Literal::Guid(g) => Some(KeyPart::Str(g.to_string())),
            Literal::Other(text) => Some(KeyPart::Other(text.clone())),
        }
    }
}

fn canonical_string(s: &str) -> String {
    if s.len() == 36
        && let Ok(g) = Uuid::parse_str(s)
    {
        return g.to_string();
    }
    s.to_owned()
}

/// One stored row: its columns (primary id and `_<lookup>_value` fields included) and its version.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) fields: Map<String, Value>,
    pub(crate) version: u64,
}

#[derive(Debug, Default)]
pub(crate) struct TableData {
    pub(crate) rows: HashMap<Uuid, Row>,
    keys: Vec<HashMap<KeyTuple, Uuid>>,
    /// (version of the delete, id), ascending by version.
    pub(crate) tombstones: Vec<(u64, Uuid)>,
}

#[derive(Debug)]
enum Undo {
    Row {
        table: usize,
        id: Uuid,
        previous: Option<Row>,
    },
    Tombstone {
        table: usize,
    },
}

/// A point to roll back to (see [`Data::begin`]).
#[derive(Debug)]
pub(crate) struct Savepoint {
    undo_len: usize,
    version: u64,
    outermost: bool,
}

/// The mutable state behind the emulator's one lock.
#[derive(Debug)]
pub(crate) struct Data {
    pub(crate) tables: Vec<TableData>,
    /// The last version handed out; every write of any row takes the next one.
    pub(crate) version: u64,
    undo: Option<Vec<Undo>>,
}

/// The values of `key`'s columns in `fields`, if none is null or missing.
pub(crate) fn key_tuple(key: &KeyDef, fields: &Map<String, Value>) -> Option<KeyTuple> {
    key.columns
        .iter()
        .map(|c| fields.get(c).and_then(KeyPart::of_json))
        .collect()
}

impl Data {
    pub(crate) fn new(schema: &Schema) -> Data {
        Data {
            tables: schema
                .tables
                .iter()
                .map(|t| TableData {
                    rows: HashMap::new(),
                    keys: vec![HashMap::new(); t.keys.len()],
                    tombstones: Vec::new(),
                })
                .collect(),
            version: 0,
            undo: None,
        }
    }

    pub(crate) fn row(&self, table: usize, id: &Uuid) -> Option<&Row> {
        self.tables.get(table)?.rows.get(id)
    }

    pub(crate) fn by_key(&self, table: usize, key: usize, tuple: &KeyTuple) -> Option<Uuid> {
        self.tables.get(table)?.keys.get(key)?.get(tuple).copied()
    }

    /// The first alternate key whose values in `fields` already belong to a row other than `id`.
    pub(crate) fn conflicting_key<'d>(
        &self,
        def: &'d TableDef,
        table: usize,
        id: &Uuid,
        fields: &Map<String, Value>,
    ) -> Option<&'d KeyDef> {
        def.keys.iter().enumerate().find_map(|(k, key)| {
            let tuple = key_tuple(key, fields)?;
            match self.by_key(table, k, &tuple) {
                Some(other) if other != *id => Some(key),
                _ => None,
            }
        })
    }

    pub(crate) fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Stores `row` under `id`, keeping the key indexes right; the caller has checked uniqueness.
    pub(crate) fn put(&mut self, def: &TableDef, table: usize, id: Uuid, row: Row) {
        let previous = self.put_raw(def, table, id, Some(row));
        if let Some(undo) = &mut self.undo {
            undo.push(Undo::Row {
                table,
                id,
                previous,
            });
        }
    }

    /// Deletes the row and records a tombstone at a new version.
    pub(crate) fn delete(&mut self, def: &TableDef, table: usize, id: Uuid) -> bool {
        let Some(previous) = self.put_raw(def, table, id, None) else {
            return false;
        };
        let version = self.next_version();
        self.tables[table].tombstones.push((version, id));
        if let Some(undo) = &mut self.undo {
            undo.push(Undo::Row {
                table,
                id,
                previous: Some(previous),
            });
            undo.push(Undo::Tombstone { table });
        }
        true
    }

    fn put_raw(&mut self, def: &TableDef, table: usize, id: Uuid, row: Option<Row>) -> Option<Row> {
        let data = &mut self.tables[table];
        let previous = match row {
            Some(row) => data.rows.insert(id, row),
            None => data.rows.remove(&id),
        };
        for (k, key) in def.keys.iter().enumerate() {
            let old = previous.as_ref().and_then(|r| key_tuple(key, &r.fields));
            let new = data.rows.get(&id).and_then(|r| key_tuple(key, &r.fields));
            if old == new {
                continue;
            }
            if let Some(old) = old
                && data.keys[k].get(&old) == Some(&id)
            {
                data.keys[k].remove(&old);
            }
            if let Some(new) = new {
                data.keys[k].insert(new, id);
            }
        }
        previous
    }

    /// Starts recording writes so that [`rollback`](Self::rollback) can undo them; nests.
    pub(crate) fn begin(&mut self) -> Savepoint {
        let outermost = self.undo.is_none();
        let undo = self.undo.get_or_insert_with(Vec::new);
        Savepoint {
            undo_len: undo.len(),
            version: self.version,
            outermost,
        }
    }

    /// Keeps the writes since `savepoint`.
    pub(crate) fn commit(&mut self, savepoint: Savepoint) {
        if savepoint.outermost {
            self.undo = None;
        }
    }

    /// Undoes the writes since `savepoint`, newest first.
    pub(crate) fn rollback(&mut self, schema: &Schema, savepoint: Savepoint) {
        let entries = match &mut self.undo {
            Some(undo) if undo.len() > savepoint.undo_len => undo.split_off(savepoint.undo_len),
            _ => Vec::new(),
        };
        for entry in entries.into_iter().rev() {
            match entry {
                Undo::Row {
                    table,
                    id,
                    previous,
                } => {
                    self.put_raw(&schema.tables[table], table, id, previous);
                }
                Undo::Tombstone { table } => {
                    self.tables[table].tombstones.pop();
                }
            }
        }
        self.version = savepoint.version;
        if savepoint.outermost {
            self.undo = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::new(&[EmulatedTable::accounts(), EmulatedTable::contacts()]).unwrap()
    }

    fn row(number: &str, version: u64) -> Row {
        let Value::Object(fields) = json!({"accountnumber": number}) else {
            unreachable!()
        };
        Row { fields, version }
    }

    #[test]
    fn rollback_restores_rows_indexes_tombstones_and_version() {
        let schema = schema();
        let def = &schema.tables[0];
        let mut data = Data::new(&schema);
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let v = data.next_version();
        data.put(def, 0, a, row("K1", v));
        let k1 = vec![KeyPart::Str("K1".into())];
        let k2 = vec![KeyPart::Str("K2".into())];

        let sp = data.begin();
        let v = data.next_version();
        data.put(def, 0, a, row("K2", v));
        let inner = data.begin();
        let v = data.next_version();
        data.put(def, 0, b, row("K1", v));
        assert!(data.delete(def, 0, b));
        data.rollback(&schema, inner);
        assert!(data.row(0, &b).is_none());
        assert_eq!(data.by_key(0, 0, &k2), Some(a));
        assert_eq!(data.version, 2);
        data.rollback(&schema, sp);

        assert_eq!(data.version, 1);
        assert_eq!(data.by_key(0, 0, &k1), Some(a));
        assert_eq!(data.by_key(0, 0, &k2), None);
        assert!(data.tables[0].tombstones.is_empty());
        assert!(data.undo.is_none());
    }

    #[test]
    fn schema_validation() {
        let dup = EmulatedTable::accounts().alternate_key(&["accountnumber"]);
        assert!(Schema::new(&[dup]).unwrap_err().contains("declared twice"));
        let many = (0..11).fold(EmulatedTable::accounts(), |t, i| {
            let c = format!("c{i}");
            t.alternate_key(&[c.as_str()])
        });
        assert!(Schema::new(&[many]).unwrap_err().contains("at most 10"));
        assert!(
            Schema::new(&[EmulatedTable::contacts()])
                .unwrap_err()
                .contains("not declared")
        );
        let reserved = EmulatedTable::new("x", "WhoAmI", "xid", "name");
        assert!(Schema::new(&[reserved]).unwrap_err().contains("reserved"));
    }

    #[test]
    fn key_parts_compare_literals_and_json() {
        let g = Uuid::from_u128(0xabc);
        assert_eq!(
            KeyPart::of_json(&json!(g.to_string().to_uppercase())),
            KeyPart::of_literal(&Literal::Guid(g))
        );
        assert_eq!(
            KeyPart::of_json(&json!(7)),
            KeyPart::of_literal(&Literal::Int(7))
        );
        assert_ne!(
            KeyPart::of_json(&json!("7")),
            KeyPart::of_literal(&Literal::Int(7))
        );
        assert_eq!(KeyPart::of_json(&Value::Null), None);
    }
}
