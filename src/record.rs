//! Records: what is written to and read from a [`RecordStore`](crate::RecordStore).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::key::EntityRef;
use crate::name::{ColumnName, IntoName, TableName};

/// Field values by column. JSON values, because that is what Dataverse and most systems of record speak;
/// `Null` in a write clears the column.
pub type Fields = BTreeMap<ColumnName, serde_json::Value>;

/// Lookups by name: each points at another record (a Dataverse single-valued navigation property).
pub type Lookups = BTreeMap<ColumnName, EntityRef>;

/// Whether a record holds real data yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HydrationState {
    /// Created by [`EnsureExists`](crate::EnsureExists) with only its key and a name, awaiting the sync.
    Placeholder,
    /// Holds real data. A hydrated record never goes back to being a placeholder.
    #[default]
    Hydrated,
}

/// A store's row version, bumped on every change (Dataverse's `versionnumber`, shown in ETags as `W/"n"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version(pub u64);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A record to write, or the content of a record read back.
///
/// Build one with [`Record::builder`]; its setters never fail and [`RecordBuilder::build`] reports the first
/// invalid name as a typed error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Which record: table and key. A write creates the record at this address if it is missing.
    pub reference: EntityRef,
    /// Column values. A write changes only the columns it names (PATCH semantics).
    #[serde(default)]
    pub fields: Fields,
    /// References to other records. A write fails with [`Error::MissingReference`] if a target does not exist.
    #[serde(default)]
    pub lookups: Lookups,
    /// The version of this record in the system it came from (e.g. the source's `versionnumber`), if known.
    #[serde(default)]
    pub source_version: Option<u64>,
    /// Placeholder or hydrated. Records you build are hydrated; placeholders come from a
    /// [`HydrationPolicy`](crate::HydrationPolicy).
    #[serde(default)]
    pub state: HydrationState,
}

impl Record {
    /// An empty, hydrated record at `reference`.
    pub fn new(reference: EntityRef) -> Self {
        Self {
            reference,
            fields: Fields::new(),
            lookups: Lookups::new(),
            source_version: None,
            state: HydrationState::Hydrated,
        }
    }

    /// Starts a record at `reference`.
    pub fn builder(reference: EntityRef) -> RecordBuilder {
        RecordBuilder {
            record: Record::new(reference),
            error: None,
        }
    }

    /// The table.
    pub fn table(&self) -> &TableName {
        &self.reference.table
    }

    /// A field's raw value; `None` when absent or null.
    pub fn field(&self, column: &str) -> Option<&serde_json::Value> {
        self.fields.get(column).filter(|v| !v.is_null())
    }

    /// True for placeholders.
    pub fn is_placeholder(&self) -> bool {
        self.state == HydrationState::Placeholder
    }
}

/// Builds a [`Record`]; see [`Record::builder`].
#[derive(Debug)]
#[must_use]
pub struct RecordBuilder {
    record: Record,
    error: Option<Error>,
}

impl RecordBuilder {
    fn keep_first_error<T>(&mut self, result: Result<T>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(err) => {
                self.error.get_or_insert(err);
                None
            }
        }
    }

    /// Sets a column.
    pub fn field(
        mut self,
        column: impl IntoName<ColumnName>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        if let Some(column) = self.keep_first_error(column.into_name()) {
            self.record.fields.insert(column, value.into());
        }
        self
    }

    /// Sets a lookup to another record.
    pub fn lookup(mut self, name: impl IntoName<ColumnName>, target: EntityRef) -> Self {
        if let Some(name) = self.keep_first_error(name.into_name()) {
            self.record.lookups.insert(name, target);
        }
        self
    }

    /// Sets the source version.
    pub fn source_version(mut self, version: u64) -> Self {
        self.record.source_version = Some(version);
        self
    }

    /// The record, or the first invalid name met.
    pub fn build(self) -> Result<Record> {
        match self.error {
            Some(err) => Err(err),
            None => Ok(self.record),
        }
    }
}

/// A record as a store holds it: its id and row version besides its content. The content's reference is
/// by id, and its lookups point at targets by id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// The primary GUID.
    pub id: Uuid,
    /// The row version.
    pub version: Version,
    /// The content.
    pub record: Record,
}
