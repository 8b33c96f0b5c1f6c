//! The crate's one error type. Every variant says what was wrong and where (table, key, field), and whether
//! trying again may help ([`Error::is_retryable`], [`Error::retry_after`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::key::{AlternateKey, EntityRef};
use crate::name::{ColumnName, TableName};
use crate::record::Version;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which kind of name failed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    /// A table name.
    Table,
    /// A column or lookup name.
    Column,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Table => "table",
            NameKind::Column => "column",
        })
    }
}

/// Everything that can go wrong. Cloneable, so one failure can be reported on every item it affects.
///
/// Matching code should keep a `_` arm: new variants are not breaking changes.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A table or column name is not valid.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// Table or column.
        kind: NameKind,
        /// The rejected text.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A key is malformed, or is not a key the table declares.
    #[error("invalid key for table '{table}': {reason}")]
    InvalidKey {
        /// The table the key was meant for.
        table: TableName,
        /// What is wrong.
        reason: String,
    },

    /// A field or key value has the wrong type or contradicts the record's address.
    #[error("invalid value for {reference}, field '{field}': {reason}")]
    InvalidValue {
        /// The record being written.
        reference: Box<EntityRef>,
        /// The offending field.
        field: ColumnName,
        /// What is wrong.
        reason: String,
    },

    /// Configuration (schema, policy, writer settings) is inconsistent.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong, naming the table and column where there is one.
        reason: String,
    },

    /// A sync change event is malformed or cannot be applied as it stands: it does not parse, has a schema version
    /// this build does not read, or carries a value the consumer's mapping does not know. Retrying the same event
    /// cannot help; the sync dead-letters it with this reason.
    #[error("invalid change event{}: {reason}", event_id.as_ref().map(|id| format!(" '{id}'")).unwrap_or_default())]
    InvalidEvent {
        /// The event's id, when it could be read.
        event_id: Option<String>,
        /// What is wrong, naming the field where there is one.
        reason: String,
    },

    /// A deferred task cannot run: its handler is not registered, its payload no longer reads, or its record is
    /// gone. Permanent: the task is marked failed with this reason.
    #[error("deferred task '{task}': {reason}")]
    InvalidTask {
        /// The task's id (its idempotency key).
        task: String,
        /// What is wrong, naming the handler.
        reason: String,
    },

    /// The store has no such table.
    #[error("unknown table '{table}'")]
    UnknownTable {
        /// The table asked for.
        table: TableName,
    },

    /// The table has no such column or lookup.
    #[error("table '{table}' has no column or lookup '{column}'")]
    UnknownColumn {
        /// The table.
        table: TableName,
        /// The column asked for.
        column: ColumnName,
    },

    /// The record does not exist (update-only or version-matched write, or a guarded read).
    #[error("{reference} does not exist")]
    NotFound {
        /// The missing record.
        reference: Box<EntityRef>,
    },

    /// A create-only write found the record already there. Nothing was modified.
    #[error("{reference} already exists")]
    AlreadyExists {
        /// The existing record, as addressed by the write.
        reference: Box<EntityRef>,
    },

    /// The write would give a second record the same alternate key value.
    #[error("table '{table}': alternate key {key} is already used by record {existing}")]
    DuplicateKey {
        /// The table.
        table: TableName,
        /// The key values that clash.
        key: AlternateKey,
        /// The record that holds them.
        existing: Uuid,
    },

    /// Optimistic concurrency: the record changed since the version the write was based on.
    #[error("{reference} is no longer at version {expected}{}", actual.map(|v| format!(" (now at {v})")).unwrap_or_default())]
    VersionMismatch {
        /// The record.
        reference: Box<EntityRef>,
        /// The version the write was conditioned on.
        expected: Version,
        /// The version found, when the store says (Dataverse does not).
        actual: Option<Version>,
    },

    /// A lookup points at a record that does not exist. This is the failure the ensure-then-write pattern prevents.
    #[error("{reference}: lookup '{field}' points to {target}, which does not exist")]
    MissingReference {
        /// The record being written.
        reference: Box<EntityRef>,
        /// The lookup column.
        field: ColumnName,
        /// The record that is missing.
        target: Box<EntityRef>,
    },

    /// A lookup target could not be ensured, so the record referring to it was not written.
    #[error("{reference}: lookup '{field}' target {target} could not be ensured: {source}")]
    ReferenceNotEnsured {
        /// The record that was not written.
        reference: Box<EntityRef>,
        /// The lookup column.
        field: ColumnName,
        /// The target that could not be ensured.
        target: Box<EntityRef>,
        /// Why.
        source: Box<Error>,
    },

    /// A guarded read of a field that a placeholder does not have yet.
    #[error(
        "{reference} is a placeholder awaiting sync: field '{field}' is not available until it is hydrated"
    )]
    NotHydrated {
        /// The placeholder.
        reference: Box<EntityRef>,
        /// The field asked for.
        field: ColumnName,
    },

    /// The hydration policy forbids this operation on a placeholder.
    #[error(
        "{reference} is a placeholder awaiting sync: operation '{operation}' is not allowed until it is hydrated"
    )]
    PlaceholderRejected {
        /// The placeholder.
        reference: Box<EntityRef>,
        /// The guarded operation.
        operation: String,
    },

    /// A required field of a hydrated record is null.
    #[error("{reference}: field '{field}' is null")]
    FieldNull {
        /// The record.
        reference: Box<EntityRef>,
        /// The field.
        field: ColumnName,
    },

    /// A field's value does not convert to the type asked for.
    #[error("{reference}: field '{field}' has an unexpected type: {reason}")]
    FieldType {
        /// The record.
        reference: Box<EntityRef>,
        /// The field.
        field: ColumnName,
        /// The conversion error.
        reason: String,
    },

    /// The store cannot be reached or is down. Transient.
    #[error("{backend} is unavailable: {reason}")]
    Unavailable {
        /// Which store.
        backend: String,
        /// What happened.
        reason: String,
        /// When to try again, if the store said.
        retry_after: Option<Duration>,
    },

    /// The store is throttling requests. Transient.
    #[error("{backend} throttled the request{}", fmt_retry_after(*.retry_after))]
    Throttled {
        /// Which store.
        backend: String,
        /// When to try again, if the store said.
        retry_after: Option<Duration>,
    },

    /// The circuit breaker for this store is open: recent calls failed, so this one was not attempted. Transient.
    #[error("{backend}: circuit open after repeated failures, not calling it for {} ms", retry_after.as_millis())]
    CircuitOpen {
        /// Which store.
        backend: String,
        /// When the breaker lets a probe call through.
        retry_after: Duration,
    },

    /// A transient failure persisted through every retry the policy allowed. Not retryable any more: the caller
    /// decides what happens next (for a sync, a dead letter).
    #[error("gave up after {attempts} attempts in {} ms: {source}", elapsed.as_millis())]
    RetriesExhausted {
        /// Attempts made, the first included.
        attempts: u32,
        /// Time from the first attempt to giving up.
        elapsed: Duration,
        /// The last failure.
        source: Box<Error>,
    },

    /// The store rejected the credentials (HTTP 401). The message never contains the token.
    #[error("{backend}: not authenticated: {message}")]
    Unauthorized {
        /// Which store.
        backend: String,
        /// The store's explanation.
        message: String,
    },

    /// The identity lacks a privilege for this operation (HTTP 403).
    #[error("{backend}: not allowed: {message}")]
    Forbidden {
        /// Which store.
        backend: String,
        /// The store's explanation.
        message: String,
    },

    /// The store does not support this operation.
    #[error("{backend} does not support {operation}")]
    Unsupported {
        /// Which store.
        backend: String,
        /// What was asked.
        operation: String,
    },

    /// A durable ledger was written by a newer build of this crate: its schema version is higher than any this
    /// build knows. Nothing in it was changed; run a build at least as new as the one that wrote it.
    #[error(
        "{ledger}: schema version {found} is newer than this build supports (up to {supported}); nothing was \
         changed: run a newer build"
    )]
    LedgerSchemaTooNew {
        /// The ledger, such as `ledger sqlite:/var/lib/sync/ledger.db`.
        ledger: String,
        /// The schema version found in it.
        found: i64,
        /// The highest schema version this build knows.
        supported: i64,
    },

    /// What a durable ledger was given to open is not a ledger: not a database at all, or another application's.
    /// Nothing in it was changed.
    #[error("{ledger} is not an eventual-upsert ledger: {reason}; nothing was changed")]
    NotALedger {
        /// The ledger, such as `ledger sqlite:/var/lib/sync/ledger.db`.
        ledger: String,
        /// What was found instead.
        reason: String,
    },

    /// The store's answer does not follow its protocol: a 404 from something that is not the service (an empty
    /// or HTML body instead of the OData error), a `$batch` response whose parts cannot be matched to the
    /// requests. Whether the write was applied is unknown. Retryable when asking again may get a proper answer.
    #[error("{backend}: unexpected response: {reason}")]
    Protocol {
        /// Which store.
        backend: String,
        /// What was wrong with the response, naming the record or operation where there is one.
        reason: String,
        /// Whether trying again may succeed.
        retryable: bool,
    },

    /// A response body was larger than the configured limit; reading stopped there. Not retryable: the same
    /// request gets the same answer (raise the limit, or ask for less).
    #[error(
        "{backend}: the response to {what} exceeds the limit of {limit} bytes; reading stopped"
    )]
    ResponseTooLarge {
        /// Which store.
        backend: String,
        /// The request, such as `GET accounts`.
        what: String,
        /// The limit, in bytes.
        limit: u64,
    },

    /// Any other store failure.
    #[error("{backend}: {message}")]
    Backend {
        /// Which store.
        backend: String,
        /// What happened (never contains credentials).
        message: String,
        /// Whether trying again may succeed.
        retryable: bool,
        /// The underlying error.
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
}

fn fmt_retry_after(retry_after: Option<Duration>) -> String {
    retry_after
        .map(|d| format!(" (retry after {} ms)", d.as_millis()))
        .unwrap_or_default()
}

impl Error {
    /// Whether the same request may succeed if tried again later (outages, throttling, transient backend errors).
    /// Validation, not-found and conflict errors are permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Throttled { .. } | Error::CircuitOpen { .. } => true,
            Error::Backend { retryable, .. } | Error::Protocol { retryable, .. } => *retryable,
            Error::ReferenceNotEnsured { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    /// How long the store asked us to wait before trying again, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Unavailable { retry_after, .. } | Error::Throttled { retry_after, .. } => {
                *retry_after
            }
            Error::CircuitOpen { retry_after, .. } => Some(*retry_after),
            Error::ReferenceNotEnsured { source, .. } => source.retry_after(),
            _ => None,
        }
    }

    /// The record the error is about, when it is about one record.
    pub fn reference(&self) -> Option<&EntityRef> {
        match self {
            Error::InvalidValue { reference, .. }
            | Error::NotFound { reference }
            | Error::AlreadyExists { reference }
            | Error::VersionMismatch { reference, .. }
            | Error::MissingReference { reference, .. }
            | Error::ReferenceNotEnsured { reference, .. }
            | Error::NotHydrated { reference, .. }
            | Error::PlaceholderRejected { reference, .. }
            | Error::FieldNull { reference, .. }
            | Error::FieldType { reference, .. } => Some(reference),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_stays_small() {
        // Results are returned per item in batches of thousands; keep the error at most a few words.
        assert!(
            std::mem::size_of::<Error>() <= 72,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn transient_errors_say_so() {
        let throttled = Error::Throttled {
            backend: "eu".into(),
            retry_after: Some(Duration::from_secs(3)),
        };
        assert!(throttled.is_retryable());
        assert_eq!(throttled.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(
            throttled.to_string(),
            "eu throttled the request (retry after 3000 ms)"
        );
        let missing = Error::NotFound {
            reference: Box::new(EntityRef::by_key("account", [("accountnumber", "A-1")]).unwrap()),
        };
        assert!(!missing.is_retryable());
        assert_eq!(
            missing.to_string(),
            "account(accountnumber='A-1') does not exist"
        );
        let wrapped = Error::ReferenceNotEnsured {
            reference: Box::new(
                EntityRef::by_key("contact", [("emailaddress1", "x@y.z")]).unwrap(),
            ),
            field: ColumnName::new("parentcustomerid").unwrap(),
            target: Box::new(EntityRef::by_key("account", [("accountnumber", "A-1")]).unwrap()),
            source: Box::new(throttled),
        };
        assert!(wrapped.is_retryable());
        assert_eq!(wrapped.retry_after(), Some(Duration::from_secs(3)));
    }
}
