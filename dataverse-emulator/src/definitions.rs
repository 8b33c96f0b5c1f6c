//! Table definitions and seed rows as JSON: the formats of the command line's `--tables` and `--seed` files,
//! usable from the library too ([`EmulatedTable::list_from_json`], [`EmulatorConfig::seed_json`]).

use serde::Deserialize;
use serde_json::Value;

use super::EmulatorError;
use super::config::{EmulatedTable, EmulatorConfig};

/// One table as written in a definitions file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableSpec {
    logical_name: String,
    entity_set: Option<String>,
    primary_id: Option<String>,
    primary_name: Option<String>,
    #[serde(default)]
    alternate_keys: Vec<Vec<String>>,
    #[serde(default)]
    lookups: Vec<LookupSpec>,
    columns: Option<Vec<String>>,
    bulk_supported: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupSpec {
    navigation_property: String,
    column: String,
    target: String,
}

/// One group of rows as written in a seed file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedSpec {
    table: String,
    rows: Vec<Value>,
}

impl TableSpec {
    fn into_table(self) -> EmulatedTable {
        let logical = &self.logical_name;
        let entity_set = self.entity_set.unwrap_or_else(|| format!("{logical}s"));
        let primary_id = self.primary_id.unwrap_or_else(|| format!("{logical}id"));
        let primary_name = self.primary_name.unwrap_or_else(|| "name".to_owned());
        let mut table = EmulatedTable::new(logical, &entity_set, &primary_id, &primary_name);
        for key in &self.alternate_keys {
            let columns: Vec<&str> = key.iter().map(String::as_str).collect();
            table = table.alternate_key(&columns);
        }
        for lookup in &self.lookups {
            table = table.lookup(&lookup.navigation_property, &lookup.column, &lookup.target);
        }
        if let Some(columns) = &self.columns {
            let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
            table = table.columns(&columns);
        }
        table.bulk_supported(self.bulk_supported.unwrap_or(true))
    }
}

impl EmulatedTable {
    /// Tables from JSON: an array of objects, one per table.
    ///
    /// ```json
    /// [
    ///   {
    ///     "logical_name": "new_order",
    ///     "entity_set": "new_orders",
    ///     "primary_id": "new_orderid",
    ///     "primary_name": "new_name",
    ///     "alternate_keys": [["new_ordernumber"], ["new_region", "new_sequence"]],
    ///     "lookups": [{"navigation_property": "new_customer_account", "column": "new_customer", "target": "account"}],
    ///     "columns": ["new_amount", "new_region", "new_sequence"],
    ///     "bulk_supported": true
    ///   }
    /// ]
    /// ```
    ///
    /// Only `logical_name` is required. `entity_set` defaults to the logical name plus `s`, `primary_id` to the
    /// logical name plus `id`, `primary_name` to `name`; without `columns` any property is stored; `bulk_supported`
    /// defaults to `true`. Each field means what the builder method of the same name means ([`new`](Self::new),
    /// [`alternate_key`](Self::alternate_key), [`lookup`](Self::lookup), [`columns`](Self::columns),
    /// [`bulk_supported`](Self::bulk_supported)). Unknown fields are an error, so a typo is not ignored.
    /// Whether the tables fit together (lookup targets exist, names are unique) is checked when the emulator
    /// starts.
    pub fn list_from_json(json: &str) -> Result<Vec<EmulatedTable>, EmulatorError> {
        let specs: Vec<TableSpec> = serde_json::from_str(json)
            .map_err(|e| EmulatorError::Config(format!("invalid table definitions: {e}")))?;
        Ok(specs.into_iter().map(TableSpec::into_table).collect())
    }
}

impl EmulatorConfig {
    /// Adds seed rows from JSON: an array of groups, each naming a table (logical name or entity set name) and
    /// its rows, created in the file's order when the emulator starts.
    ///
    /// ```json
    /// [
    ///   {"table": "account", "rows": [
    ///     {"accountid": "8f7a4b6e-2f0e-4c55-9a43-0d1f6f0c1a01", "name": "Fabrikam", "accountnumber": "A-1"}
    ///   ]},
    ///   {"table": "contacts", "rows": [
    ///     {"fullname": "Ada Lovelace", "parentcustomerid_account@odata.bind": "/accounts(accountnumber='A-1')"}
    ///   ]}
    /// ]
    /// ```
    ///
    /// Each row is the body of a Web API create (`POST /<entity set>`): columns by name, the primary key column
    /// to choose the GUID (else one is generated), lookups as `<navigation property>@odata.bind`, which may name
    /// rows seeded earlier in the file. See [`seed_row`](Self::seed_row).
    pub fn seed_json(mut self, json: &str) -> Result<Self, EmulatorError> {
        let groups: Vec<SeedSpec> = serde_json::from_str(json)
            .map_err(|e| EmulatorError::Config(format!("invalid seed rows: {e}")))?;
        for group in groups {
            for row in group.rows {
                self = self.seed_row(&group.table, row);
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_with_defaults_and_in_full() {
        let tables = EmulatedTable::list_from_json(
            r#"[{"logical_name": "new_thing"},
                {"logical_name": "new_order", "entity_set": "new_orderz", "primary_id": "new_orderid",
                 "primary_name": "new_name", "alternate_keys": [["new_a"], ["new_b", "new_c"]],
                 "lookups": [{"navigation_property": "new_acc", "column": "new_account", "target": "account"}],
                 "columns": ["new_x"], "bulk_supported": false}]"#,
        )
        .expect("valid");
        assert_eq!(
            tables,
            [
                EmulatedTable::new("new_thing", "new_things", "new_thingid", "name"),
                EmulatedTable::new("new_order", "new_orderz", "new_orderid", "new_name")
                    .alternate_key(&["new_a"])
                    .alternate_key(&["new_b", "new_c"])
                    .lookup("new_acc", "new_account", "account")
                    .columns(&["new_x"])
                    .bulk_supported(false),
            ]
        );
    }

    #[test]
    fn mistakes_are_named() {
        let err = |json| EmulatedTable::list_from_json(json).unwrap_err().to_string();
        assert!(
            err(r#"[{"logical_name": "a", "entityset": "as"}]"#)
                .contains("unknown field `entityset`")
        );
        assert!(err(r#"[{"entity_set": "as"}]"#).contains("missing field `logical_name`"));
        assert!(err("[").contains("line 1"));
        let seed = |json| {
            EmulatorConfig::new()
                .seed_json(json)
                .unwrap_err()
                .to_string()
        };
        assert!(seed(r#"[{"table": "account", "row": []}]"#).contains("unknown field `row`"));
        assert!(seed(r#"{"account": []}"#).contains("invalid seed rows"));
    }
}
