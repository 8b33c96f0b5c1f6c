//! A response independent of axum, so that top-level requests and `$batch` parts share the handlers.

use serde_json::{Value, json};

pub(crate) const JSON: &str = "application/json; odata.metadata=minimal";

/// Platform codes the emulator sends (hex strings as on the wire).
pub(crate) mod codes {
    pub(crate) const OBJECT_DOES_NOT_EXIST: &str = "0x80040217";
    pub(crate) const DUPLICATE_RECORD: &str = "0x80040237";
    pub(crate) const CONCURRENCY_VERSION_MISMATCH: &str = "0x80060882";
    pub(crate) const ENTITY_KEY_NOT_DEFINED: &str = "0x80060890";
    pub(crate) const TOO_MANY_REQUESTS: &str = "0x80072322";
    pub(crate) const TOO_MANY_CONCURRENT_REQUESTS: &str = "0x80072326";
    /// UNCONFIRMED: used for OData-level errors (unknown segment, unknown property, bad query option).
    pub(crate) const ODATA: &str = "0x80060888";
    /// UNCONFIRMED: "Error identified in Payload provided by the user"; used for malformed bodies.
    pub(crate) const BAD_PAYLOAD: &str = "0x80048d19";
    /// UNCONFIRMED: the generic "unexpected error" code; used for unsupported bulk messages and faults.
    pub(crate) const UNEXPECTED: &str = "0x80040216";
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn empty(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub(crate) fn json(status: u16, body: &Value) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type", JSON.to_owned())],
            body: serde_json::to_vec(body).unwrap_or_default(),
        }
    }

    /// The OData error envelope.
    pub(crate) fn error(status: u16, code: &str, message: impl Into<String>) -> Reply {
        Reply::json(
            status,
            &json!({"error": {"code": code, "message": message.into()}}),
        )
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Reply {
        Reply::error(400, codes::ODATA, message)
    }

    pub(crate) fn bad_payload(message: impl Into<String>) -> Reply {
        Reply::error(400, codes::BAD_PAYLOAD, message)
    }

    pub(crate) fn not_implemented(what: &str) -> Reply {
        Reply::error(501, "", format!("The emulator does not implement {what}."))
    }

    pub(crate) fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    pub(crate) fn is_success(&self) -> bool {
        self.status < 400
    }

    pub(crate) fn header_value(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}
