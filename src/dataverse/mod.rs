//! The Dataverse Web API adapter (feature `dataverse`): [`DataverseStore`] and the wire format it speaks, public
//! so that other clients and tests can use the same rules.
//!
//! Facts and their sources are collected in the project's Dataverse reference; where the service's behaviour is
//! not documented, the guesses are marked in the code and can be configured.

pub mod auth;
pub mod batch;
pub mod odata;
pub mod response;

mod client;
mod config;
mod store;
mod tables;

pub use client::{CLIENT_REQUEST_HEADER, CORRELATION_HEADER, TransportStats};
pub use config::{
    API_PATH, BulkKeyColumns, BulkSupport, CreateStrategy, DEFAULT_MAX_KEY_SEGMENT,
    DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_MAX_URL_LENGTH, DataverseConfig, DataverseTable,
    MAX_PARALLEL_REQUESTS,
};
pub use store::{BulkReport, ChangePage, DataverseStore, RowChange};
