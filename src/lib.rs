//! # eventual-upsert
//!
//! Ensure-then-write for systems of record kept in sync by a replication job that may be down, slow or behind.
//!
//! A line-of-business app writes to instance B records that *reference* other records (a contact whose parent
//! account is `A-1042`). If the sync has not delivered that account yet, B answers "record does not exist" and
//! the business request fails. This crate makes every referenced record exist first: a **placeholder** holding
//! only its key (and a name) when it is missing, no change at all when it exists. The write then succeeds, and
//! the real sync later **hydrates** the placeholder.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> eventual_upsert::Result<()> {
//! use std::sync::Arc;
//! use eventual_upsert::memory::MemoryStore;
//! use eventual_upsert::schema::{Schema, TableSchema};
//! use eventual_upsert::{EntityRef, EnsuringWriter, Error, KeyKind, Policies, Record, TablePolicy};
//!
//! // Instance B: accounts keyed by account number, contacts pointing at their parent account.
//! let schema = Schema::new([
//!     TableSchema::builder("account").primary_name("name").alternate_key([("accountnumber", KeyKind::String)]).build()?,
//!     TableSchema::builder("contact").primary_name("fullname").lookup("parentcustomerid", "account").build()?,
//! ])?;
//! let store = Arc::new(MemoryStore::new(schema));
//! let policy = Policies::builder().table("account", TablePolicy::builder().primary_name("name")).build()?;
//! let writer = EnsuringWriter::new(store.clone()).with_policy(policy);
//!
//! // The account has not been synced yet, but the contact write succeeds: a placeholder account is created.
//! let account = EntityRef::by_key("account", [("accountnumber", "A-1042")])?;
//! let contact = Record::builder(EntityRef::by_id("contact", uuid::Uuid::new_v4())?)
//!     .field("fullname", "Ada Lovelace")
//!     .lookup("parentcustomerid", account.clone())
//!     .build()?;
//! let written = writer.write(contact).await?;
//! assert_eq!(written.ensured.created().collect::<Vec<_>>(), [&account]);
//!
//! // Business logic sees a typed error, not a surprise null, until the sync hydrates the account.
//! let stored = store.read(&account).await?.expect("the placeholder exists");
//! let err = writer.guard(&stored.record).get::<String>("telephone1").unwrap_err();
//! assert!(matches!(err, Error::NotHydrated { .. }));
//!
//! // The sync arrives: a full write hydrates the placeholder.
//! let synced = Record::builder(account.clone()).field("name", "Fabrikam").field("telephone1", "+1 555 0100").build()?;
//! writer.write(synced).await?;
//! let stored = store.read(&account).await?.expect("still there");
//! assert_eq!(writer.guard(&stored.record).require::<String>("telephone1")?, "+1 555 0100");
//! # use eventual_upsert::RecordStore;
//! # Ok(())
//! # }
//! ```
//!
//! ## The pieces
//!
//! * [`RecordStore`]: the storage contract (read, conditional writes and deletes, batches) that adapters implement.
//! * [`EnsureExists`]: make references exist; every store has it, stores may speed it up.
//! * [`HydrationPolicy`] / [`Policies`]: what a placeholder holds, when a record is hydrated, what business logic
//!   may do with a placeholder (allow, reject, defer).
//! * [`Guarded`]: null-field guards; [`HydrationHooks`]: run "on create" logic when a record is hydrated.
//! * [`EnsuringWriter`]: the orchestrator, one record or batches.
//! * [`RetryPolicy`] and [`CircuitBreaker`]: backoff that honours `Retry-After`, and fail-fast for a store that is
//!   down.
//! * [`sync`]: the sync pipeline: versioned change events, the [`Applier`](sync::Applier) (idempotent, ordered,
//!   hydrating, echo-free), the [`Ledger`](sync::Ledger) of processed events, checkpoints, dead letters and the
//!   external-id map, per-consumer field [`Mapping`](sync::Mapping), change sources, and statistics that add up.
//! * [`correlation`]: one correlation id per logical operation, carried into every request it makes.
//!
//! ## Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `memory` | yes | [`memory::MemoryStore`], a faithful in-memory store with fault injection |
//! | `conformance` | no | [`conformance`], the contract scenarios every adapter must pass |
//! | `dataverse` | no | [`dataverse::DataverseStore`], the Dataverse Web API adapter (reqwest + rustls), with auth, retries, a circuit breaker, `$batch` and `UpsertMultiple` |
//!
//! The Dataverse Web API emulator the tests, examples and benchmarks run against is its own crate,
//! `dataverse-emulator` (a library and a command-line server), sharing no code with the adapter.
//!
//! ## When not to use the pattern
//!
//! Logic that must run exactly when a record is created (it will see a placeholder; move it to a
//! [`HydrationHooks::on_hydrated`] hook), fields that must never be null (a placeholder has them empty), and
//! records addressed by one key in some writes and another in others (see the README).
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs, rustdoc::broken_intra_doc_links)]
#![warn(missing_debug_implementations)]

mod breaker;
pub mod correlation;
mod ensure;
mod error;
mod guard;
mod hydration;
mod key;
mod name;
mod record;
mod retry;
pub mod schema;
mod store;
pub mod sync;
mod writer;

#[cfg(feature = "memory")]
pub mod memory;

#[cfg(feature = "conformance")]
pub mod conformance;

#[cfg(feature = "dataverse")]
pub mod dataverse;

pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker};
pub use ensure::{EnsureExists, EnsureItem, EnsureReport};
pub use error::{Error, NameKind, Result};
pub use guard::{Guarded, HydratedRecord, HydrationHooks, Proceed};
pub use hydration::{
    HydrationPolicy, PlaceholderAction, PlaceholderLabel, Policies, PoliciesBuilder, TablePolicy,
    TablePolicyBuilder,
};
pub use key::{AlternateKey, EntityRef, Key, KeyKind, KeyValue};
pub use name::{ColumnName, IntoName, TableName};
pub use record::{Fields, HydrationState, Lookups, Record, RecordBuilder, StoredRecord, Version};
pub use retry::RetryPolicy;
pub use store::{
    Change, Delete, DeleteOutcome, DeletePrecondition, Ensured, Precondition, RecordStore, Write,
    WriteOutcome,
};
pub use writer::{BatchCounts, BatchReport, DEFAULT_BATCH_SIZE, EnsuringWriter, Written};

// Compiles the README's code samples as doctests, so the tour cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
