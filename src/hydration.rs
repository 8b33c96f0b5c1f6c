//! [`HydrationPolicy`]: what a placeholder holds, when a record counts as hydrated, and what business logic may do
//! with a placeholder. [`Policies`] is the declarative implementation; most users never implement the trait.

use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::key::{EntityRef, Key};
use crate::name::{ColumnName, IntoName, TableName};
use crate::record::{Fields, HydrationState, Record};

/// What a guarded operation may do with a placeholder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaceholderAction {
    /// Run anyway (the operation only needs the key).
    Allow,
    /// Fail with [`Error::PlaceholderRejected`]: the safe default.
    Reject,
    /// Do not run now; run when the record is hydrated (see [`HydrationHooks::defer`](crate::HydrationHooks::defer)).
    Defer,
}

/// Decides how placeholders look and behave, per table.
pub trait HydrationPolicy: Send + Sync + Debug {
    /// The placeholder to create for a missing `reference`: its key columns, a primary name, optional marker.
    fn placeholder(&self, reference: &EntityRef) -> Result<Record>;

    /// Adjusts a full (hydrating) write before it is sent, e.g. clears the placeholder marker.
    fn prepare_write(&self, record: &mut Record);

    /// Whether a stored record counts as hydrated.
    fn state(&self, record: &Record) -> HydrationState;

    /// What `operation` may do when its record is a placeholder.
    fn on_placeholder(&self, table: &TableName, operation: &str) -> PlaceholderAction;
}

/// How a placeholder's primary name is filled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaceholderLabel {
    /// The key itself: `A-1042`, or `Joe, 7` for a composite key, or the GUID.
    FromKey,
    /// A fixed text, such as `Pending sync`.
    Fixed(String),
}

/// The policy of one table. Build with [`TablePolicy::builder`]; the default is zero-configuration: the
/// placeholder holds only its key, records are hydrated unless written as placeholders, and guarded operations
/// on placeholders are rejected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TablePolicy {
    /// Column that receives the label.
    pub primary_name: Option<ColumnName>,
    /// The label.
    pub label: PlaceholderLabel,
    /// Boolean column set to `true` on placeholders and `false` on full writes, so other systems can see it.
    pub marker: Option<ColumnName>,
    /// Fields a record needs to count as hydrated.
    pub required: Vec<ColumnName>,
    /// Fixed values every placeholder carries (for columns the target requires on create).
    pub placeholder_fields: Fields,
    /// Action for operations without their own entry.
    pub default_action: PlaceholderAction,
    /// Per-operation actions.
    pub actions: BTreeMap<String, PlaceholderAction>,
}

impl Default for TablePolicy {
    fn default() -> Self {
        Self {
            primary_name: None,
            label: PlaceholderLabel::FromKey,
            marker: None,
            required: Vec::new(),
            placeholder_fields: Fields::new(),
            default_action: PlaceholderAction::Reject,
            actions: BTreeMap::new(),
        }
    }
}

impl TablePolicy {
    /// Starts a table policy from the default.
    pub fn builder() -> TablePolicyBuilder {
        TablePolicyBuilder {
            policy: TablePolicy::default(),
            error: None,
        }
    }

    fn label(&self, reference: &EntityRef) -> String {
        match (&self.label, &reference.key) {
            (PlaceholderLabel::Fixed(text), _) => text.clone(),
            (PlaceholderLabel::FromKey, Key::Id(id)) => id.to_string(),
            (PlaceholderLabel::FromKey, Key::Alternate(key)) => {
                // Built in place: one string per placeholder, not one per key part and a joined copy.
                let mut label = String::new();
                for (i, (_, value)) in key.parts().enumerate() {
                    if i > 0 {
                        label.push_str(", ");
                    }
                    match value {
                        crate::key::KeyValue::String(s) => label.push_str(s),
                        other => label.push_str(&other.to_string()),
                    }
                }
                label
            }
        }
    }

    fn placeholder(&self, reference: &EntityRef) -> Record {
        let mut record = Record::new(reference.clone());
        record.state = HydrationState::Placeholder;
        record.fields = self.placeholder_fields.clone();
        if let Key::Alternate(key) = &reference.key {
            for (column, value) in key.parts() {
                record.fields.insert(column.clone(), value.to_json());
            }
        }
        if let Some(name) = &self.primary_name {
            // A key column that doubles as the primary name keeps the key value.
            record
                .fields
                .entry(name.clone())
                .or_insert_with(|| self.label(reference).into());
        }
        if let Some(marker) = &self.marker {
            record.fields.insert(marker.clone(), true.into());
        }
        record
    }

    fn prepare_write(&self, record: &mut Record) {
        if let Some(marker) = &self.marker
            && record.state == HydrationState::Hydrated
        {
            record.fields.insert(marker.clone(), false.into());
        }
    }

    fn state(&self, record: &Record) -> HydrationState {
        let marked = self
            .marker
            .as_ref()
            .is_some_and(|m| record.field(m.as_str()) == Some(&serde_json::Value::Bool(true)));
        let incomplete = self
            .required
            .iter()
            .any(|column| record.field(column.as_str()).is_none());
        if record.state == HydrationState::Placeholder || marked || incomplete {
            HydrationState::Placeholder
        } else {
            HydrationState::Hydrated
        }
    }

    fn action(&self, operation: &str) -> PlaceholderAction {
        self.actions
            .get(operation)
            .copied()
            .unwrap_or(self.default_action)
    }
}

/// Builds a [`TablePolicy`]; setters never fail, [`Policies::builder`]'s `build` reports the first bad name.
#[derive(Debug)]
#[must_use]
pub struct TablePolicyBuilder {
    policy: TablePolicy,
    error: Option<Error>,
}

impl TablePolicyBuilder {
    fn name(&mut self, name: impl IntoName<ColumnName>) -> Option<ColumnName> {
        name.into_name()
            .map_err(|err| self.error.get_or_insert(err))
            .ok()
    }

    /// The column that receives the placeholder's label (for Dataverse: the table's primary name column).
    pub fn primary_name(mut self, column: impl IntoName<ColumnName>) -> Self {
        self.policy.primary_name = self.name(column);
        self
    }

    /// Label placeholders with a fixed text instead of their key.
    pub fn label(mut self, text: impl Into<String>) -> Self {
        self.policy.label = PlaceholderLabel::Fixed(text.into());
        self
    }

    /// A boolean marker column: `true` on placeholders, cleared (`false`) by full writes.
    pub fn marker(mut self, column: impl IntoName<ColumnName>) -> Self {
        self.policy.marker = self.name(column);
        self
    }

    /// A field a record needs to count as hydrated.
    pub fn required(mut self, column: impl IntoName<ColumnName>) -> Self {
        if let Some(column) = self.name(column) {
            self.policy.required.push(column);
        }
        self
    }

    /// A fixed value every placeholder of this table carries.
    pub fn placeholder_field(
        mut self,
        column: impl IntoName<ColumnName>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        if let Some(column) = self.name(column) {
            self.policy.placeholder_fields.insert(column, value.into());
        }
        self
    }

    /// The action for guarded operations that have no entry of their own.
    pub fn default_action(mut self, action: PlaceholderAction) -> Self {
        self.policy.default_action = action;
        self
    }

    /// The action for one named operation.
    pub fn on_placeholder(
        mut self,
        operation: impl Into<String>,
        action: PlaceholderAction,
    ) -> Self {
        self.policy.actions.insert(operation.into(), action);
        self
    }

    fn build(self) -> Result<TablePolicy> {
        match self.error {
            Some(err) => Err(err),
            None => Ok(self.policy),
        }
    }
}

/// The declarative [`HydrationPolicy`]: one [`TablePolicy`] per table and a default for the rest.
///
/// `Policies::default()` works with zero configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Policies {
    default: TablePolicy,
    tables: BTreeMap<TableName, TablePolicy>,
}

impl Policies {
    /// Starts a set of policies.
    pub fn builder() -> PoliciesBuilder {
        PoliciesBuilder {
            default: TablePolicy::builder(),
            tables: Vec::new(),
        }
    }

    /// The policy that applies to `table`.
    pub fn table(&self, table: &TableName) -> &TablePolicy {
        self.tables.get(table).unwrap_or(&self.default)
    }
}

impl HydrationPolicy for Policies {
    fn placeholder(&self, reference: &EntityRef) -> Result<Record> {
        Ok(self.table(&reference.table).placeholder(reference))
    }

    fn prepare_write(&self, record: &mut Record) {
        // Only a marker needs preparing: without one anywhere, skip looking up the record's table (a string
        // comparison per write, on a name that is rarely in cache, to find nothing to do).
        if self.default.marker.is_none() && self.tables.values().all(|t| t.marker.is_none()) {
            return;
        }
        self.table(&record.reference.table).prepare_write(record);
    }

    fn state(&self, record: &Record) -> HydrationState {
        self.table(&record.reference.table).state(record)
    }

    fn on_placeholder(&self, table: &TableName, operation: &str) -> PlaceholderAction {
        self.table(table).action(operation)
    }
}

/// Builds [`Policies`].
#[derive(Debug)]
#[must_use]
pub struct PoliciesBuilder {
    default: TablePolicyBuilder,
    tables: Vec<(Result<TableName>, TablePolicyBuilder)>,
}

impl PoliciesBuilder {
    /// The policy for tables that have none of their own.
    pub fn default_policy(mut self, policy: TablePolicyBuilder) -> Self {
        self.default = policy;
        self
    }

    /// The policy for one table.
    pub fn table(mut self, table: impl IntoName<TableName>, policy: TablePolicyBuilder) -> Self {
        self.tables.push((table.into_name(), policy));
        self
    }

    /// Checks the names and returns the policies.
    pub fn build(self) -> Result<Policies> {
        let default = self.default.build()?;
        let mut tables = BTreeMap::new();
        for (table, policy) in self.tables {
            let table = table?;
            let policy = policy.build()?;
            if tables.insert(table.clone(), policy).is_some() {
                return Err(Error::InvalidConfig {
                    reason: format!("table '{table}' has two hydration policies"),
                });
            }
        }
        Ok(Policies { default, tables })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyValue;

    fn account_policy() -> Policies {
        Policies::builder()
            .table(
                "account",
                TablePolicy::builder()
                    .primary_name("name")
                    .marker("eu_isplaceholder")
                    .required("telephone1")
                    .placeholder_field("statecode", 0)
                    .on_placeholder("send_invoice", PlaceholderAction::Defer),
            )
            .build()
            .unwrap()
    }

    #[test]
    fn placeholder_holds_key_label_marker_and_fixed_fields() {
        let policy = account_policy();
        let r = EntityRef::by_key("account", [("accountnumber", "A-1042")]).unwrap();
        let p = policy.placeholder(&r).unwrap();
        assert_eq!(p.state, HydrationState::Placeholder);
        assert_eq!(p.field("accountnumber"), Some(&"A-1042".into()));
        assert_eq!(p.field("name"), Some(&"A-1042".into()));
        assert_eq!(p.field("eu_isplaceholder"), Some(&true.into()));
        assert_eq!(p.field("statecode"), Some(&0.into()));
        assert_eq!(p.fields.len(), 4);
        assert!(p.lookups.is_empty());
    }

    #[test]
    fn composite_and_guid_labels() {
        let policy = Policies::builder()
            .default_policy(TablePolicy::builder().primary_name("fullname"))
            .build()
            .unwrap();
        let r = EntityRef::by_key(
            "contact",
            [
                ("firstname", KeyValue::from("Joe")),
                ("employeeid", 7.into()),
            ],
        )
        .unwrap();
        assert_eq!(
            policy.placeholder(&r).unwrap().field("fullname"),
            Some(&"7, Joe".into())
        );
        let id = uuid::Uuid::new_v4();
        let r = EntityRef::by_id("contact", id).unwrap();
        let p = policy.placeholder(&r).unwrap();
        assert_eq!(p.field("fullname"), Some(&id.to_string().into()));
        assert_eq!(p.fields.len(), 1);
    }

    #[test]
    fn prepare_write_touches_only_tables_with_a_marker() {
        let contact = || {
            Record::builder(EntityRef::by_key("contact", [("emailaddress1", "a@b.c")]).unwrap())
                .field("fullname", "Joe")
                .build()
                .unwrap()
        };
        for policy in [account_policy(), Policies::default()] {
            let mut record = contact();
            policy.prepare_write(&mut record);
            assert_eq!(record, contact(), "{policy:?}");
        }
        let mut account =
            Record::new(EntityRef::by_key("account", [("accountnumber", "A-1")]).unwrap());
        account_policy().prepare_write(&mut account);
        assert_eq!(account.field("eu_isplaceholder"), Some(&false.into()));
    }

    #[test]
    fn hydration_needs_marker_cleared_and_required_fields() {
        let policy = account_policy();
        let r = EntityRef::by_key("account", [("accountnumber", "A-1")]).unwrap();
        let mut full = Record::builder(r.clone())
            .field("name", "Fabrikam")
            .build()
            .unwrap();
        policy.prepare_write(&mut full);
        assert_eq!(full.field("eu_isplaceholder"), Some(&false.into()));
        // A full write without the required field still counts as a placeholder for the guards.
        assert_eq!(policy.state(&full), HydrationState::Placeholder);
        full.fields
            .insert(ColumnName::new("telephone1").unwrap(), "+1 555".into());
        assert_eq!(policy.state(&full), HydrationState::Hydrated);
        full.fields
            .insert(ColumnName::new("eu_isplaceholder").unwrap(), true.into());
        assert_eq!(policy.state(&full), HydrationState::Placeholder);
    }

    #[test]
    fn actions_default_to_reject() {
        let policy = account_policy();
        let account = TableName::new("account").unwrap();
        assert_eq!(
            policy.on_placeholder(&account, "send_invoice"),
            PlaceholderAction::Defer
        );
        assert_eq!(
            policy.on_placeholder(&account, "anything"),
            PlaceholderAction::Reject
        );
        assert_eq!(
            Policies::default().on_placeholder(&account, "x"),
            PlaceholderAction::Reject
        );
    }

    #[test]
    fn bad_names_fail_at_build() {
        let err = Policies::builder()
            .table("account", TablePolicy::builder().marker("bad marker"))
            .build();
        assert!(matches!(err, Err(Error::InvalidName { .. })));
        let err = Policies::builder()
            .table("bad table", TablePolicy::builder())
            .build();
        assert!(matches!(err, Err(Error::InvalidName { .. })));
    }
}
