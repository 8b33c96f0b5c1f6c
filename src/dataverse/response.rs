//! What a Dataverse error response means: the OData error envelope, `Retry-After`, and the mapping from
//! (HTTP status, platform code) to the crate's [`Error`].
//!
//! Clients key on the status and the hex `code`, never on message text, which is localised and reworded between
//! service versions. The one exception is telling *which* record is missing on a 404 during a write (the row
//! itself or one of its lookup targets): the service says it only in the message, so the table name or GUID is
//! read from it, and the error falls back to naming the written record when it cannot tell.

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use uuid::Uuid;

use crate::error::Error;
use crate::key::{EntityRef, Key};
use crate::store::{Precondition, Write};

/// Platform error codes the mapping relies on (hex strings as the Web API sends them).
pub mod codes {
    /// ObjectDoesNotExist: a row (or a lookup target addressed by GUID) is missing.
    pub const OBJECT_DOES_NOT_EXIST: &str = "0x80040217";
    /// RecordNotFoundByEntityKey: no row has these alternate key values.
    pub const RECORD_NOT_FOUND_BY_ENTITY_KEY: &str = "0x80060891";
    /// DuplicateRecordEntityKey: another row already holds these alternate key values.
    pub const DUPLICATE_RECORD_ENTITY_KEY: &str = "0x80060892";
    /// DuplicateRecord: the row already exists (412 on create-only).
    pub const DUPLICATE_RECORD: &str = "0x80040237";
    /// ConcurrencyVersionMismatch: the row version does not match `If-Match`.
    pub const CONCURRENCY_VERSION_MISMATCH: &str = "0x80060882";
    /// Service protection: number of requests.
    pub const TOO_MANY_REQUESTS: &str = "0x80072322";
    /// Service protection: combined execution time.
    pub const EXECUTION_TIME_EXCEEDED: &str = "0x80072321";
    /// Service protection: concurrent requests.
    pub const TOO_MANY_CONCURRENT_REQUESTS: &str = "0x80072326";
}

/// The body of an OData error: `{"error":{"code":"0x80040217","message":"..."}}`. Extra annotations are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ODataError {
    /// Hex platform code; sometimes empty.
    #[serde(default)]
    pub code: String,
    /// Human-readable text.
    #[serde(default)]
    pub message: String,
}

#[derive(Deserialize)]
struct Envelope {
    error: ODataError,
}

/// Longest piece of a non-JSON body quoted in an error message.
const MAX_QUOTED_BODY: usize = 300;

/// Reads the error envelope; a body that is not one (a proxy's HTML page, an empty body) becomes a message
/// quoting its start.
pub fn parse_error_body(body: &[u8]) -> ODataError {
    match serde_json::from_slice::<Envelope>(body) {
        Ok(envelope) => envelope.error,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let quoted: String = text.chars().take(MAX_QUOTED_BODY).collect();
            ODataError {
                code: String::new(),
                message: quoted.trim().to_owned(),
            }
        }
    }
}

/// The OData error envelope, when the body is one; `None` for anything else (empty, HTML, other JSON).
pub fn parse_envelope(body: &[u8]) -> Option<ODataError> {
    serde_json::from_slice::<Envelope>(body)
        .ok()
        .map(|envelope| envelope.error)
}

/// Whether a 404 body says that the addressed row does not exist: only the service's OData error envelope with
/// the ObjectDoesNotExist or RecordNotFoundByEntityKey code does (or, as in older captures, an empty code and a
/// "Does Not Exist" message). An empty or HTML body comes from something in front of the service (a proxy, a
/// gateway, a wrong URL) and says nothing about the row.
pub fn is_missing_row(body: &[u8]) -> bool {
    parse_envelope(body).is_some_and(|error| match error.code.as_str() {
        codes::OBJECT_DOES_NOT_EXIST | codes::RECORD_NOT_FOUND_BY_ENTITY_KEY => true,
        "" => error
            .message
            .to_ascii_lowercase()
            .contains("does not exist"),
        _ => false,
    })
}

/// Parses a `Retry-After` header: delay-seconds (what Dataverse sends) or an HTTP date, relative to `now`.
/// A date in the past means "now" (zero); anything else unparseable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What was asked, so that an error can name the record, the missing target and the failed condition.
#[derive(Clone, Copy, Debug)]
pub struct RequestContext<'a> {
    /// The store's name, for messages.
    pub backend: &'a str,
    /// The record addressed, if the request addressed one.
    pub reference: Option<&'a EntityRef>,
    /// The write, if the request was one.
    pub write: Option<&'a Write>,
}

/// Maps a failed response to the crate's error.
///
/// | status | meaning |
/// |---|---|
/// | 429 | [`Error::Throttled`] with `Retry-After` (service protection) |
/// | 408, 500, 502, 503, 504 | [`Error::Unavailable`], transient |
/// | 401 / 403 | [`Error::Unauthorized`] / [`Error::Forbidden`] |
/// | 404 with ObjectDoesNotExist or RecordNotFoundByEntityKey ([`is_missing_row`]) | [`Error::MissingReference`] when the missing record is one of the write's lookup targets, else [`Error::NotFound`] |
/// | 404 without the OData error body (empty, HTML) | [`Error::Protocol`], retryable: not the service speaking |
/// | 412 | [`Error::AlreadyExists`] for create-only, [`Error::VersionMismatch`] for version-matched writes |
/// | 409 with DuplicateRecord or DuplicateRecordEntityKey | [`Error::AlreadyExists`] for create-only |
/// | anything else | [`Error::Backend`], not retryable, with status, code and message |
pub fn map_error(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    context: &RequestContext<'_>,
) -> Error {
    let error = parse_error_body(body);
    let backend = context.backend.to_owned();
    let described = || match error.code.as_str() {
        "" => format!("HTTP {status}: {}", error.message),
        code => format!("HTTP {status} {code}: {}", error.message),
    };
    match status {
        429 => Error::Throttled {
            backend,
            retry_after,
        },
        408 | 500 | 502 | 503 | 504 => Error::Unavailable {
            backend,
            reason: described(),
            retry_after,
        },
        401 => Error::Unauthorized {
            backend,
            message: error.message,
        },
        403 => Error::Forbidden {
            backend,
            message: error.message,
        },
        404 if parse_envelope(body).is_none() => Error::Protocol {
            backend,
            reason: format!(
                "HTTP 404 without an OData error body{}: not the service's answer (a proxy, a gateway or a wrong URL?)",
                context
                    .write
                    .map(|w| &w.record.reference)
                    .or(context.reference)
                    .map(|r| format!(" for {r}"))
                    .unwrap_or_default()
            ),
            retryable: true,
        },
        404 if is_missing_row(body) => {
            not_found(&error, context).unwrap_or_else(|| backend_error(backend, described()))
        }
        412 => precondition_failed(&error, context)
            .unwrap_or_else(|| backend_error(backend, described())),
        409 if matches!(
            error.code.as_str(),
            codes::DUPLICATE_RECORD | codes::DUPLICATE_RECORD_ENTITY_KEY
        ) && context
            .write
            .is_some_and(|w| w.precondition == Precondition::CreateOnly) =>
        {
            precondition_failed(&error, context)
                .unwrap_or_else(|| backend_error(backend, described()))
        }
        _ => backend_error(backend, described()),
    }
}

fn backend_error(backend: String, message: String) -> Error {
    Error::Backend {
        backend,
        message,
        retryable: false,
        source: None,
    }
}

fn precondition_failed(error: &ODataError, context: &RequestContext<'_>) -> Option<Error> {
    let write = context.write?;
    let reference = Box::new(write.record.reference.clone());
    match write.precondition {
        Precondition::CreateOnly => Some(Error::AlreadyExists { reference }),
        Precondition::MatchVersion(expected) => Some(Error::VersionMismatch {
            reference,
            expected,
            actual: None,
        }),
        _ if error.code == codes::DUPLICATE_RECORD => Some(Error::AlreadyExists { reference }),
        _ => None,
    }
}

/// A 404: the written record itself, or one of its lookup targets? The message names the table (and, for GUIDs,
/// the id) of the missing record; match it against the lookups.
fn not_found(error: &ODataError, context: &RequestContext<'_>) -> Option<Error> {
    let written = context
        .write
        .map(|w| &w.record.reference)
        .or(context.reference)?;
    if let Some(write) = context.write {
        let message = error.message.to_ascii_lowercase();
        let id = guid_in(&error.message);
        let missing = write.record.lookups.iter().find(|(_, target)| {
            match (&target.key, error.code.as_str()) {
                (Key::Id(target_id), _) => id == Some(*target_id) && *target != written,
                (Key::Alternate(_), codes::RECORD_NOT_FOUND_BY_ENTITY_KEY) => {
                    message.contains(&format!(" in {} entity", target.table))
                        && target.table != written.table
                }
                _ => false,
            }
        });
        if let Some((field, target)) = missing {
            return Some(Error::MissingReference {
                reference: Box::new(written.clone()),
                field: field.clone(),
                target: Box::new(target.clone()),
            });
        }
    }
    Some(Error::NotFound {
        reference: Box::new(written.clone()),
    })
}

/// The first GUID in `text`.
fn guid_in(text: &str) -> Option<Uuid> {
    text.split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .find_map(|word| Uuid::parse_str(word).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Record, Version};

    const NOW: u64 = 1_800_000_000;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn contact_write(precondition: Precondition, parent: EntityRef) -> Write {
        let record = Record::builder(EntityRef::by_id("contact", Uuid::from_u128(9)).unwrap())
            .field("fullname", "Ada")
            .lookup("parentcustomerid", parent)
            .build()
            .unwrap();
        Write {
            record,
            precondition,
        }
    }

    fn map(status: u16, body: &str, write: &Write) -> Error {
        let context = RequestContext {
            backend: "eu",
            reference: None,
            write: Some(write),
        };
        map_error(status, None, body.as_bytes(), &context)
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        assert_eq!(parse_retry_after("7", now()), Some(Duration::from_secs(7)));
        let in_a_minute = httpdate::fmt_http_date(now() + Duration::from_secs(60));
        assert_eq!(
            parse_retry_after(&in_a_minute, now()),
            Some(Duration::from_secs(60))
        );
        let past = httpdate::fmt_http_date(now() - Duration::from_secs(60));
        assert_eq!(parse_retry_after(&past, now()), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now()), None);
        assert_eq!(parse_retry_after("-1", now()), None);
    }

    #[test]
    fn service_protection_and_outages_are_transient() {
        let write = contact_write(
            Precondition::None,
            EntityRef::by_id("account", Uuid::from_u128(1)).unwrap(),
        );
        let body = r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}"#;
        let context = RequestContext {
            backend: "eu",
            reference: None,
            write: Some(&write),
        };
        let err = map_error(
            429,
            Some(Duration::from_secs(12)),
            body.as_bytes(),
            &context,
        );
        assert!(
            matches!(err, Error::Throttled { retry_after: Some(d), .. } if d == Duration::from_secs(12))
        );
        for status in [408, 500, 502, 503, 504] {
            let err = map(status, "<html>Service Unavailable</html>", &write);
            assert!(err.is_retryable(), "{status}: {err}");
            assert!(
                err.to_string()
                    .contains(&format!("HTTP {status}: <html>Service Unavailable")),
                "{err}"
            );
        }
        assert!(
            !map(
                400,
                r#"{"error":{"code":"0x80044331","message":"too long"}}"#,
                &write
            )
            .is_retryable()
        );
        assert!(matches!(
            map(401, r#"{"error":{"code":"","message":"expired"}}"#, &write),
            Error::Unauthorized { .. }
        ));
        assert!(matches!(
            map(403, r#"{"error":{"code":"","message":"no"}}"#, &write),
            Error::Forbidden { .. }
        ));
    }

    #[test]
    fn a_missing_lookup_target_by_guid_is_named() {
        let parent = EntityRef::by_id("account", Uuid::from_u128(0x5b4c)).unwrap();
        let write = contact_write(Precondition::None, parent.clone());
        let body = format!(
            r#"{{"error":{{"code":"0x80040217","message":"Entity 'account' With Id = {} Does Not Exist"}}}}"#,
            Uuid::from_u128(0x5b4c)
        );
        match map(404, &body, &write) {
            Error::MissingReference { target, field, .. } => {
                assert_eq!(*target, parent);
                assert_eq!(field.as_str(), "parentcustomerid");
            }
            other => panic!("expected MissingReference, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_lookup_target_by_alternate_key_is_named() {
        let parent = EntityRef::by_key("account", [("accountnumber", "A-1")]).unwrap();
        let write = contact_write(Precondition::None, parent.clone());
        let body = r#"{"error":{"code":"0x80060891","message":"A record with the specified key values does not exist in account entity"}}"#;
        assert!(
            matches!(map(404, body, &write), Error::MissingReference { target, .. } if *target == parent)
        );
    }

    #[test]
    fn a_missing_row_is_not_found() {
        let write = contact_write(
            Precondition::UpdateOnly,
            EntityRef::by_id("account", Uuid::from_u128(1)).unwrap(),
        );
        let body = format!(
            r#"{{"error":{{"code":"","message":"contact With Id = {} Does Not Exist"}}}}"#,
            Uuid::from_u128(9)
        );
        assert!(
            matches!(map(404, &body, &write), Error::NotFound { reference } if *reference == write.record.reference)
        );
    }

    #[test]
    fn a_404_that_is_not_the_services_error_body_is_not_a_missing_row() {
        let write = contact_write(
            Precondition::UpdateOnly,
            EntityRef::by_id("account", Uuid::from_u128(1)).unwrap(),
        );
        for body in [
            "",
            "<html><body>404 Not Found</body></html>",
            "{\"value\":[]}",
        ] {
            assert!(!is_missing_row(body.as_bytes()), "{body:?}");
            let err = map(404, body, &write);
            assert!(
                matches!(&err, Error::Protocol { retryable: true, reason, .. } if reason.contains("contact(")),
                "{body:?}: {err:?}"
            );
        }
        // The service's envelope with another code (an unknown entity set) is not a missing row either.
        let unknown = r#"{"error":{"code":"0x8006088a","message":"Resource not found for the segment 'acounts'."}}"#;
        assert!(!is_missing_row(unknown.as_bytes()));
        assert!(matches!(
            map(404, unknown, &write),
            Error::Backend {
                retryable: false,
                ..
            }
        ));
        assert!(is_missing_row(
            br#"{"error":{"code":"0x80060891","message":"A record with the specified key values does not exist in account entity"}}"#
        ));
    }

    #[test]
    fn a_409_duplicate_on_a_create_only_write_means_it_exists() {
        let parent = EntityRef::by_id("account", Uuid::from_u128(1)).unwrap();
        for code in [codes::DUPLICATE_RECORD, codes::DUPLICATE_RECORD_ENTITY_KEY] {
            let body = format!(r#"{{"error":{{"code":"{code}","message":"duplicate"}}}}"#);
            assert!(matches!(
                map(
                    409,
                    &body,
                    &contact_write(Precondition::CreateOnly, parent.clone())
                ),
                Error::AlreadyExists { .. }
            ));
            assert!(matches!(
                map(
                    409,
                    &body,
                    &contact_write(Precondition::None, parent.clone())
                ),
                Error::Backend { .. }
            ));
        }
    }

    #[test]
    fn precondition_failures_follow_the_precondition() {
        let parent = EntityRef::by_id("account", Uuid::from_u128(1)).unwrap();
        let exists = r#"{"error":{"code":"","message":"A record with matching key values already exists."}}"#;
        assert!(matches!(
            map(
                412,
                exists,
                &contact_write(Precondition::CreateOnly, parent.clone())
            ),
            Error::AlreadyExists { .. }
        ));
        let stale = r#"{"error":{"code":"0x80060882","message":"The version of the existing record doesn't match the RowVersion property provided."}}"#;
        let err = map(
            412,
            stale,
            &contact_write(Precondition::MatchVersion(Version(3)), parent),
        );
        assert!(
            matches!(
                err,
                Error::VersionMismatch {
                    expected: Version(3),
                    actual: None,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn bodies_that_are_not_envelopes_are_quoted_not_trusted() {
        let huge = "x".repeat(10_000);
        let parsed = parse_error_body(huge.as_bytes());
        assert_eq!(parsed.message.len(), MAX_QUOTED_BODY);
        assert_eq!(parse_error_body(b"").message, "");
        let with_annotations = br#"{"error":{"code":"0x80040217","message":"m","@Microsoft.PowerApps.CDS.HelpLink":"x"}}"#;
        assert_eq!(
            parse_error_body(with_annotations).code,
            codes::OBJECT_DOES_NOT_EXIST
        );
    }
}
