//! The conformance tables on the Dataverse emulator, and a store configured for them.

use std::time::Duration;

use dataverse_emulator::{EmulatedTable, Emulator, EmulatorConfig};
use eventual_upsert::dataverse::{DataverseConfig, DataverseStore, DataverseTable};
use eventual_upsert::{RetryPolicy, conformance};

/// The boolean column that marks placeholders in these tests.
pub const STATE_COLUMN: &str = "new_isplaceholder";

/// `conformance::schema()` as emulated tables.
pub fn conformance_tables() -> EmulatorConfig {
    EmulatorConfig::new()
        .table(
            EmulatedTable::new("account", "accounts", "accountid", "name")
                .alternate_key(&["accountnumber"])
                .alternate_key(&["new_sourceid"]),
        )
        .table(
            EmulatedTable::new("contact", "contacts", "contactid", "fullname")
                .alternate_key(&["emailaddress1", "new_externalid"])
                .lookup("parentcustomerid_account", "parentcustomerid", "account"),
        )
}

/// The Dataverse names of the conformance tables.
pub fn conformance_settings(config: DataverseConfig) -> DataverseConfig {
    config
        .with_table(DataverseTable::new("account").with_state_column(STATE_COLUMN))
        .with_table(
            DataverseTable::new("contact")
                .with_navigation("parentcustomerid", "parentcustomerid_account")
                .with_state_column(STATE_COLUMN),
        )
}

/// Quick retries: tests should not wait seconds for a backoff.
pub fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        jitter_seed: Some(7),
        ..RetryPolicy::default()
    }
}

/// A store for the conformance tables on `emulator`.
pub fn conformance_store(emulator: &Emulator) -> DataverseStore {
    let config = DataverseConfig::new(emulator.base_url(), conformance::schema())
        .with_name("emulator")
        .with_retry(quick_retries());
    conformance_settings(config)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// An emulator with the conformance tables.
pub async fn conformance_emulator() -> Emulator {
    Emulator::start(conformance_tables())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}
