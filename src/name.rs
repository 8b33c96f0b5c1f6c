//! Validated table and column names.
//!
//! Names end up in URLs, OData payloads and error messages, so they are checked once, at the edge, and are cheap
//! to clone afterwards (`Arc<str>`): a batch of 10,000 records repeats the same few names 10,000 times.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, NameKind};

/// Longest accepted name. Dataverse logical names are far shorter; the bound keeps garbage out of URLs.
pub const MAX_NAME_LEN: usize = 128;

fn validate(kind: NameKind, name: &str) -> Result<(), Error> {
    let invalid = |reason: &'static str| Error::InvalidName {
        kind,
        name: name.to_owned(),
        reason,
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(invalid("must not be empty")),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            return Err(invalid("must start with an ASCII letter or '_'"));
        }
        Some(_) => {}
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("is longer than 128 characters"));
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid("may contain only ASCII letters, digits and '_'"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(Arc<str>);

        impl $ty {
            /// Validates `name`: 1 to 128 ASCII letters, digits or `_`, not starting with a digit.
            pub fn new(name: impl AsRef<str>) -> Result<Self, Error> {
                let name = name.as_ref();
                validate($kind, name)?;
                Ok(Self(Arc::from(name)))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = Error;
            fn try_from(name: String) -> Result<Self, Error> {
                Self::new(name)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = Error;
            fn try_from(name: &str) -> Result<Self, Error> {
                Self::new(name)
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                name.0.to_string()
            }
        }
    };
}

name_type!(
    /// A table's logical name, such as `account`.
    TableName,
    NameKind::Table
);
name_type!(
    /// A column (or lookup / navigation property) name, such as `accountnumber` or `parentcustomerid`.
    ColumnName,
    NameKind::Column
);

/// Anything that can be turned into a validated name: `&str`, `String`, or the name type itself.
///
/// Builders accept `impl IntoName<TableName>` so callers can write `"account"` and still get a typed error.
pub trait IntoName<N> {
    /// Validates and converts.
    fn into_name(self) -> Result<N, Error>;
}

macro_rules! into_name {
    ($ty:ident) => {
        impl IntoName<$ty> for $ty {
            fn into_name(self) -> Result<$ty, Error> {
                Ok(self)
            }
        }
        impl IntoName<$ty> for &$ty {
            fn into_name(self) -> Result<$ty, Error> {
                Ok(self.clone())
            }
        }
        impl IntoName<$ty> for &str {
            fn into_name(self) -> Result<$ty, Error> {
                $ty::new(self)
            }
        }
        impl IntoName<$ty> for String {
            fn into_name(self) -> Result<$ty, Error> {
                $ty::new(self)
            }
        }
        impl IntoName<$ty> for &String {
            fn into_name(self) -> Result<$ty, Error> {
                $ty::new(self)
            }
        }
    };
}

into_name!(TableName);
into_name!(ColumnName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dataverse_style_names() {
        for ok in ["account", "new_CustomerId", "_parentcustomerid_value", "a1"] {
            assert_eq!(ColumnName::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_bad_names_with_the_reason() {
        for (bad, reason) in [
            ("", "empty"),
            ("1abc", "start"),
            ("acc ount", "only"),
            ("accounts(x)", "only"),
            ("a'b", "only"),
        ] {
            let err = TableName::new(bad).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidName { kind: NameKind::Table, name, .. } if name == bad),
                "{err:?}"
            );
            assert!(err.to_string().contains(reason), "{err}");
        }
        assert!(TableName::new("a".repeat(129)).is_err());
        assert!(TableName::new("a".repeat(128)).is_ok());
    }

    #[test]
    fn deserializing_validates() {
        let ok: TableName = serde_json::from_str("\"account\"").unwrap();
        assert_eq!(ok.as_str(), "account");
        assert!(serde_json::from_str::<TableName>("\"bad name\"").is_err());
    }
}
