//! How a record is addressed: its primary GUID or one of its alternate keys.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::Error;
use crate::name::{ColumnName, IntoName, TableName};

/// One typed value of an alternate key column.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyValue {
    /// A text column, such as `accountnumber`. Never empty.
    String(String),
    /// A whole-number column.
    Integer(i64),
    /// A GUID column (for example a lookup's id that is part of a key).
    Guid(Uuid),
}

impl KeyValue {
    /// The kind of this value.
    pub fn kind(&self) -> KeyKind {
        match self {
            KeyValue::String(_) => KeyKind::String,
            KeyValue::Integer(_) => KeyKind::Integer,
            KeyValue::Guid(_) => KeyKind::Guid,
        }
    }

    /// The value as it is stored in a record's fields (JSON).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            KeyValue::String(s) => serde_json::Value::String(s.clone()),
            KeyValue::Integer(i) => serde_json::Value::from(*i),
            KeyValue::Guid(g) => serde_json::Value::String(g.to_string()),
        }
    }

    /// Whether `value` equals [`to_json`](Self::to_json), without building a string to compare with.
    pub(crate) fn is_json(&self, value: &serde_json::Value) -> bool {
        match self {
            KeyValue::String(s) => value.as_str() == Some(s.as_str()),
            other => *value == other.to_json(),
        }
    }

    /// Reads a field value as a key value of `kind`; `None` if it has another shape.
    pub fn from_json(kind: KeyKind, value: &serde_json::Value) -> Option<KeyValue> {
        match kind {
            KeyKind::String => value
                .as_str()
                .filter(|s| !s.is_empty())
                .map(|s| KeyValue::String(s.to_owned())),
            KeyKind::Integer => value.as_i64().map(KeyValue::Integer),
            KeyKind::Guid => value
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .map(KeyValue::Guid),
        }
    }
}

impl fmt::Display for KeyValue {
    /// OData literal form: strings single-quoted with `'` doubled, integers and GUIDs bare.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::String(s) => write!(f, "'{}'", s.replace('\'', "''")),
            KeyValue::Integer(i) => write!(f, "{i}"),
            KeyValue::Guid(g) => write!(f, "{g}"),
        }
    }
}

impl fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<&str> for KeyValue {
    fn from(s: &str) -> Self {
        KeyValue::String(s.to_owned())
    }
}
impl From<String> for KeyValue {
    fn from(s: String) -> Self {
        KeyValue::String(s)
    }
}
impl From<i64> for KeyValue {
    fn from(i: i64) -> Self {
        KeyValue::Integer(i)
    }
}
impl From<i32> for KeyValue {
    fn from(i: i32) -> Self {
        KeyValue::Integer(i.into())
    }
}
impl From<Uuid> for KeyValue {
    fn from(g: Uuid) -> Self {
        KeyValue::Guid(g)
    }
}

/// The type of an alternate key column, as a schema declares it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// Text.
    String,
    /// Whole number.
    Integer,
    /// GUID.
    Guid,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::String => "string",
            KeyKind::Integer => "integer",
            KeyKind::Guid => "guid",
        })
    }
}

/// An alternate key: one or more `(column, value)` pairs, kept sorted by column so that the same key written in
/// another order compares, hashes and prints the same.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<ColumnName, KeyValue>",
    into = "BTreeMap<ColumnName, KeyValue>"
)]
pub struct AlternateKey(BTreeMap<ColumnName, KeyValue>);

impl AlternateKey {
    /// Builds a key from `(column, value)` pairs. Fails with [`Error::InvalidKey`] on no pairs, a repeated
    /// column or an empty string value, and with [`Error::InvalidName`] on a bad column name.
    pub fn new<C, V>(
        table: &TableName,
        parts: impl IntoIterator<Item = (C, V)>,
    ) -> Result<Self, Error>
    where
        C: IntoName<ColumnName>,
        V: Into<KeyValue>,
    {
        let mut map = BTreeMap::new();
        for (column, value) in parts {
            let column = column.into_name()?;
            let value = value.into();
            if matches!(&value, KeyValue::String(s) if s.is_empty()) {
                return Err(Error::InvalidKey {
                    table: table.clone(),
                    reason: format!("column '{column}' has an empty value"),
                });
            }
            if map.insert(column.clone(), value).is_some() {
                return Err(Error::InvalidKey {
                    table: table.clone(),
                    reason: format!("column '{column}' appears twice"),
                });
            }
        }
        if map.is_empty() {
            return Err(Error::InvalidKey {
                table: table.clone(),
                reason: "an alternate key needs at least one column".into(),
            });
        }
        Ok(Self(map))
    }

    /// The `(column, value)` pairs, sorted by column.
    pub fn parts(&self) -> impl ExactSizeIterator<Item = (&ColumnName, &KeyValue)> {
        self.0.iter()
    }

    /// The value of one column of the key.
    pub fn get(&self, column: &str) -> Option<&KeyValue> {
        self.0.get(column)
    }

    /// The columns, sorted.
    pub fn columns(&self) -> impl ExactSizeIterator<Item = &ColumnName> {
        self.0.keys()
    }
}

// Deserialization has no table to name, so it reports a plain message (serde adds the position).
impl TryFrom<BTreeMap<ColumnName, KeyValue>> for AlternateKey {
    type Error = &'static str;
    fn try_from(map: BTreeMap<ColumnName, KeyValue>) -> Result<Self, Self::Error> {
        if map.is_empty() {
            return Err("an alternate key needs at least one column");
        }
        if map
            .values()
            .any(|v| matches!(v, KeyValue::String(s) if s.is_empty()))
        {
            return Err("an alternate key value must not be empty");
        }
        Ok(Self(map))
    }
}

impl From<AlternateKey> for BTreeMap<ColumnName, KeyValue> {
    fn from(key: AlternateKey) -> Self {
        key.0
    }
}

impl fmt::Display for AlternateKey {
    /// `accountnumber='A-1042'`, or `emailaddress1='a@b.c',employeeid=7` for a composite key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (column, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{column}={value}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for AlternateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How a record is addressed within its table.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Key {
    /// The primary key (GUID).
    Id(Uuid),
    /// An alternate key.
    Alternate(AlternateKey),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Id(id) => write!(f, "{id}"),
            Key::Alternate(key) => write!(f, "{key}"),
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A reference to one record: its table and its key. Prints like an OData address: `account(accountnumber='A-1042')`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EntityRef {
    /// The table.
    pub table: TableName,
    /// The key within the table.
    pub key: Key,
}

impl EntityRef {
    /// A reference by primary GUID. The nil GUID is rejected: no store accepts it as a record id.
    pub fn by_id(table: impl IntoName<TableName>, id: Uuid) -> Result<Self, Error> {
        let table = table.into_name()?;
        if id.is_nil() {
            return Err(Error::InvalidKey {
                table,
                reason: "the nil GUID is not a record id".into(),
            });
        }
        Ok(Self {
            table,
            key: Key::Id(id),
        })
    }

    /// A reference by alternate key, single (`[("accountnumber", "A-1042")]`) or composite.
    pub fn by_key<C, V>(
        table: impl IntoName<TableName>,
        parts: impl IntoIterator<Item = (C, V)>,
    ) -> Result<Self, Error>
    where
        C: IntoName<ColumnName>,
        V: Into<KeyValue>,
    {
        let table = table.into_name()?;
        let key = AlternateKey::new(&table, parts)?;
        Ok(Self {
            table,
            key: Key::Alternate(key),
        })
    }

    /// The GUID, when the reference is by primary key.
    pub fn id(&self) -> Option<Uuid> {
        match self.key {
            Key::Id(id) => Some(id),
            Key::Alternate(_) => None,
        }
    }
}

impl fmt::Display for EntityRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.table, self.key)
    }
}

impl fmt::Debug for EntityRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An [`EntityRef`] as a key of a batch-local hash set or map: hashes only the key values, compares whole.
///
/// The derived hash feeds the table name, every column name, the lengths and the variant tags to SipHash one by
/// one; on a batch of 10,000 writes that was most of the cost of de-duplicating lookup targets. The values alone
/// tell the references of a batch apart; the rare references that differ only in table or column still compare
/// unequal.
#[derive(Clone, Copy)]
pub(crate) struct ByKeyValues<'a>(pub(crate) &'a EntityRef);

impl PartialEq for ByKeyValues<'_> {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (self.0, other.0);
        let same_key = match (&a.key, &b.key) {
            (Key::Id(x), Key::Id(y)) => x == y,
            (Key::Alternate(x), Key::Alternate(y)) => same_parts(x, y),
            _ => false,
        };
        same_key & same_text(a.table.as_str(), b.table.as_str())
    }
}

impl Eq for ByKeyValues<'_> {}

impl Hash for ByKeyValues<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match &self.0.key {
            Key::Id(id) => state.write_u128(id.as_u128()),
            Key::Alternate(key) => {
                for value in key.0.values() {
                    match value {
                        KeyValue::String(s) => state.write(s.as_bytes()),
                        KeyValue::Integer(i) => state.write_i64(*i),
                        KeyValue::Guid(g) => state.write_u128(g.as_u128()),
                    }
                }
            }
        }
    }
}

/// [`AlternateKey`] equality the way [`ByKeyValues`] needs it: see [`same_text`].
fn same_parts(x: &AlternateKey, y: &AlternateKey) -> bool {
    let same_part = |(c1, v1): (&ColumnName, &KeyValue), (c2, v2): (&ColumnName, &KeyValue)| {
        let same_value = match (v1, v2) {
            (KeyValue::String(s1), KeyValue::String(s2)) => same_text(s1, s2),
            (v1, v2) => v1 == v2,
        };
        same_value & same_text(c1.as_str(), c2.as_str())
    };
    match (x.0.len(), y.0.len()) {
        // The usual single-column key, without the map iterators' set-up.
        (1, 1) => match (x.0.first_key_value(), y.0.first_key_value()) {
            (Some(p1), Some(p2)) => same_part(p1, p2),
            _ => false,
        },
        (n1, n2) => n1 == n2 && x.0.iter().zip(&y.0).all(|(p1, p2)| same_part(p1, p2)),
    }
}

/// Whether two names or key values are equal, comparing every byte without branching on any.
///
/// De-duplicating a batch compares each reference with an earlier one whose names and values are rarely in
/// cache; with `==` (a `memcmp` call and a branch on its result per string) that took twice as long.
pub(crate) fn same_text(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(true, |same, (x, y)| same & (x == y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_keys_are_order_independent() {
        let a = EntityRef::by_key(
            "contact",
            [
                ("firstname", KeyValue::from("Joe")),
                ("employeeid", 7.into()),
            ],
        )
        .unwrap();
        let b = EntityRef::by_key(
            "contact",
            [
                ("employeeid", KeyValue::from(7)),
                ("firstname", "Joe".into()),
            ],
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "contact(employeeid=7,firstname='Joe')");
    }

    #[test]
    fn by_key_values_keys_tell_apart_what_the_values_alone_do_not() {
        use std::collections::HashSet;
        let id = Uuid::from_u128(1);
        let refs = [
            EntityRef::by_key("account", [("accountnumber", "A-1")]).unwrap(),
            EntityRef::by_key("contact", [("accountnumber", "A-1")]).unwrap(),
            EntityRef::by_key("account", [("name", "A-1")]).unwrap(),
            EntityRef::by_key("account", [("a", "x"), ("b", "yz")]).unwrap(),
            EntityRef::by_key("account", [("a", "xy"), ("b", "z")]).unwrap(),
            EntityRef::by_key("account", [("a", KeyValue::Integer(1)), ("b", 2.into())]).unwrap(),
            EntityRef::by_id("account", id).unwrap(),
            EntityRef::by_id("contact", id).unwrap(),
        ];
        let again = [
            EntityRef::by_key("account", [("accountnumber", "A-1")]).unwrap(),
            EntityRef::by_key("account", [("b", "z"), ("a", "xy")]).unwrap(),
            EntityRef::by_id("contact", id).unwrap(),
        ];
        let distinct: HashSet<ByKeyValues> = refs.iter().chain(&again).map(ByKeyValues).collect();
        assert_eq!(distinct.len(), refs.len());
        for r in &refs {
            assert!(distinct.contains(&ByKeyValues(r)), "{r}");
        }
    }

    #[test]
    fn same_text_is_string_equality() {
        for (a, b) in [
            ("", ""),
            ("", "a"),
            ("account", "account"),
            ("account", "accounts"),
        ] {
            assert_eq!(same_text(a, b), a == b, "{a:?} {b:?}");
        }
        assert!(!same_text("A-0001", "A-0002"));
        assert!(!same_text("é", "e\u{301}"));
    }

    #[test]
    fn display_doubles_single_quotes() {
        let r = EntityRef::by_key("account", [("accountnumber", "O'Brien & Co/1?")]).unwrap();
        assert_eq!(r.to_string(), "account(accountnumber='O''Brien & Co/1?')");
    }

    #[test]
    fn bad_keys_are_typed_errors() {
        let empty: [(&str, &str); 0] = [];
        assert!(matches!(
            EntityRef::by_key("account", empty),
            Err(Error::InvalidKey { .. })
        ));
        assert!(matches!(
            EntityRef::by_key("account", [("accountnumber", "")]),
            Err(Error::InvalidKey { .. })
        ));
        assert!(matches!(
            EntityRef::by_key("account", [("accountnumber", "a"), ("accountnumber", "b")]),
            Err(Error::InvalidKey { .. })
        ));
        assert!(matches!(
            EntityRef::by_key("account", [("bad col", "a")]),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            EntityRef::by_id("account", Uuid::nil()),
            Err(Error::InvalidKey { .. })
        ));
        assert!(matches!(
            EntityRef::by_id("bad table", Uuid::new_v4()),
            Err(Error::InvalidName { .. })
        ));
    }

    #[test]
    fn serde_round_trip_and_validation() {
        let r = EntityRef::by_key(
            "contact",
            [
                ("emailaddress1", KeyValue::from("a@b.c")),
                ("employeeid", 7.into()),
            ],
        )
        .unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            r#"{"table":"contact","key":{"alternate":{"emailaddress1":{"string":"a@b.c"},"employeeid":{"integer":7}}}}"#
        );
        assert_eq!(serde_json::from_str::<EntityRef>(&json).unwrap(), r);
        let empty = r#"{"table":"contact","key":{"alternate":{}}}"#;
        assert!(serde_json::from_str::<EntityRef>(empty).is_err());
        let blank = r#"{"table":"contact","key":{"alternate":{"x":{"string":""}}}}"#;
        assert!(serde_json::from_str::<EntityRef>(blank).is_err());
    }
}
