//! Fixtures shared by the integration tests.

use eventual_upsert::KeyKind;
use eventual_upsert::schema::{Schema, TableSchema};

/// `account` (alternate key `accountnumber`, primary name `name`) and `contact` (lookup `parentcustomerid` →
/// `account`), both schemaless otherwise.
pub fn accounts_and_contacts() -> Schema {
    Schema::new([
        TableSchema::builder("account")
            .primary_name("name")
            .alternate_key([("accountnumber", KeyKind::String)])
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
