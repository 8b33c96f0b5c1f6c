//! OData URL encoding for record addresses: `accounts(accountnumber='A-1042')`.
//!
//! Key values are the one part of a Dataverse URL that comes from data, so they are encoded so that no value can
//! change what the URL means: single quotes are doubled (OData string literal rules), then every byte outside
//! RFC 3986's unreserved set is percent-encoded. A value such as `O'Brien & Co/1?` can therefore not end the path
//! segment (`/`), start a query (`?`) or add a parameter (`&`). GUIDs and integers are written bare. Table and
//! column names are validated identifiers and need no encoding.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::key::{Key, KeyValue};
use crate::name::TableName;

/// Bytes kept as they are inside a string literal: RFC 3986 unreserved. Everything else is percent-encoded,
/// including the doubled quotes (the server decodes before parsing the literal).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One key value as an OData literal ready for a URL path: `'O%27%27Brien%20%26%20Co%2F1%3F'`, `42`, or a bare
/// GUID.
pub fn literal(value: &KeyValue) -> String {
    match value {
        KeyValue::String(s) => format!(
            "'{}'",
            utf8_percent_encode(&s.replace('\'', "''"), UNRESERVED)
        ),
        KeyValue::Integer(i) => i.to_string(),
        KeyValue::Guid(g) => g.to_string(),
    }
}

/// The key segment of a record's address, parentheses included: `(<guid>)`, `(accountnumber='A-1')` or
/// `(emailaddress1='a%40b.c',new_externalid=7)`.
pub fn key_segment(key: &Key) -> String {
    match key {
        Key::Id(id) => format!("({id})"),
        Key::Alternate(key) => {
            let parts: Vec<String> = key
                .parts()
                .map(|(column, value)| format!("{column}={}", literal(value)))
                .collect();
            format!("({})", parts.join(","))
        }
    }
}

/// Characters that Microsoft documents as breaking a GET or PATCH by alternate key when they occur in a key value,
/// however they are encoded (define-alternate-keys). A key holding one is found with [`key_filter`] instead.
pub const FORBIDDEN_KEY_CHARACTERS: &[char] = &['/', '<', '>', '*', '%', '&', ':', '\\', '?', '+'];

/// Whether a key value holds a [forbidden character](FORBIDDEN_KEY_CHARACTERS), so that the key cannot address
/// a record in a URL path. GUID keys never do.
pub fn has_forbidden_characters(key: &Key) -> bool {
    match key {
        Key::Id(_) => false,
        Key::Alternate(key) => key.parts().any(
            |(_, value)| matches!(value, KeyValue::String(s) if s.contains(FORBIDDEN_KEY_CHARACTERS)),
        ),
    }
}

/// A `$filter` expression matching an alternate key's values, encoded for a query string:
/// `accountnumber%20eq%20'O%27%27Brien%2F1'`, parts joined with `%20and%20`. String values follow the OData
/// literal rules of [`literal`] (quotes doubled, then percent-encoded), so no value can end the expression or the
/// parameter. A GUID key becomes `<primary id> eq <guid>`.
pub fn key_filter(key: &Key, primary_id: &str) -> String {
    match key {
        Key::Id(id) => format!("{primary_id}%20eq%20{id}"),
        Key::Alternate(key) => {
            let parts: Vec<String> = key
                .parts()
                .map(|(column, value)| format!("{column}%20eq%20{}", literal(value)))
                .collect();
            parts.join("%20and%20")
        }
    }
}

/// A record's path relative to the service root: `accounts(accountnumber='A-1')`. Also the value of a lookup's
/// `<navigation>@odata.bind`, with a leading `/`.
pub fn entity_path(entity_set: &TableName, key: &Key) -> String {
    format!("{entity_set}{}", key_segment(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::EntityRef;
    use percent_encoding::percent_decode_str;

    fn key(parts: &[(&str, KeyValue)]) -> Key {
        EntityRef::by_key("account", parts.iter().cloned())
            .unwrap()
            .key
    }

    #[test]
    fn hostile_values_cannot_change_what_the_url_means() {
        let segment = key_segment(&key(&[("accountnumber", "O'Brien & Co/1?#x=%2F".into())]));
        assert_eq!(
            segment,
            "(accountnumber='O%27%27Brien%20%26%20Co%2F1%3F%23x%3D%252F')"
        );
        let inside = &segment["(accountnumber='".len()..segment.len() - 2];
        assert!(
            inside
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~%".contains(c)),
            "only unreserved characters and escapes inside the literal: {segment}"
        );
        let decoded = percent_decode_str(&segment).decode_utf8().unwrap();
        assert_eq!(
            decoded, "(accountnumber='O''Brien & Co/1?#x=%2F')",
            "decodes to the OData literal"
        );
    }

    #[test]
    fn forbidden_characters_and_filters() {
        for c in FORBIDDEN_KEY_CHARACTERS {
            assert!(
                has_forbidden_characters(&key(&[("accountnumber", format!("A{c}1").into())])),
                "{c}"
            );
        }
        assert!(!has_forbidden_characters(&key(&[(
            "accountnumber",
            "O'Brien-1 x".into()
        )])));
        assert!(!has_forbidden_characters(&key(&[(
            "new_externalid",
            7.into()
        )])));
        assert!(!has_forbidden_characters(&Key::Id(uuid::Uuid::from_u128(
            1
        ))));
        let composite = key(&[
            ("emailaddress1", "o'b/1@x".into()),
            ("new_externalid", 7.into()),
        ]);
        let filter = key_filter(&composite, "contactid");
        assert_eq!(
            filter,
            "emailaddress1%20eq%20'o%27%27b%2F1%40x'%20and%20new_externalid%20eq%207"
        );
        assert_eq!(
            percent_decode_str(&filter).decode_utf8().unwrap(),
            "emailaddress1 eq 'o''b/1@x' and new_externalid eq 7"
        );
        assert_eq!(
            key_filter(&Key::Id(uuid::Uuid::from_u128(1)), "accountid"),
            "accountid%20eq%2000000000-0000-0000-0000-000000000001"
        );
    }

    #[test]
    fn non_ascii_is_utf8_encoded() {
        assert_eq!(literal(&"Zürich".into()), "'Z%C3%BCrich'");
    }

    #[test]
    fn guids_and_integers_are_bare_and_composite_keys_are_sorted() {
        let id = uuid::Uuid::from_u128(1);
        assert_eq!(
            key_segment(&Key::Id(id)),
            "(00000000-0000-0000-0000-000000000001)"
        );
        let composite = key(&[
            ("new_externalid", 7.into()),
            ("emailaddress1", "a@b.c".into()),
        ]);
        assert_eq!(
            key_segment(&composite),
            "(emailaddress1='a%40b.c',new_externalid=7)"
        );
        assert_eq!(literal(&KeyValue::Integer(-3)), "-3");
        let set = TableName::new("accounts").unwrap();
        assert_eq!(
            entity_path(&set, &Key::Id(id)),
            "accounts(00000000-0000-0000-0000-000000000001)"
        );
    }
}
