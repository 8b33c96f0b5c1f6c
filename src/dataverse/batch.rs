//! The OData `$batch` multipart format, both directions: the client builds requests and parses responses, the
//! emulator parses requests and builds responses.
//!
//! STUB: the API below is agreed; the bodies are being written.

use std::fmt;

/// Most operations one `$batch` may carry (Dataverse rejects more before running anything).
pub const MAX_OPERATIONS: usize = 1000;

/// One HTTP request inside a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// `GET`, `POST`, `PATCH`, `PUT` or `DELETE`.
    pub method: String,
    /// Relative to the service root (`accounts(accountnumber='A-1')?$select=accountid`), absolute
    /// (`https://host/api/data/v9.2/accounts`), or a Content-ID reference (`$1`, `$1/name`).
    pub url: String,
    /// Headers of the inner request, in order (`Content-Type` is added by [`Operation::json`]).
    pub headers: Vec<(String, String)>,
    /// The body, if any (JSON for Dataverse).
    pub body: Option<String>,
    /// The part's `Content-ID` (inside change sets).
    pub content_id: Option<String>,
}

impl Operation {
    /// An operation without headers or body.
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        let _ = (method.into(), url.into());
        todo!()
    }

    /// Adds a header.
    pub fn header(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let _ = (name.into(), value.into());
        todo!()
    }

    /// Sets a JSON body and `Content-Type: application/json; type=entry`.
    pub fn json(self, body: impl Into<String>) -> Self {
        let _ = body.into();
        todo!()
    }

    /// Sets the `Content-ID`.
    pub fn content_id(self, id: impl Into<String>) -> Self {
        let _ = id.into();
        todo!()
    }

    /// A header's value, by case-insensitive name.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        let _ = name;
        todo!()
    }
}

/// A top-level part of a batch request: one operation, or an atomic change set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// An independent operation.
    Single(Operation),
    /// Operations applied all or nothing.
    ChangeSet(Vec<Operation>),
}

/// A `$batch` request body under construction.
#[derive(Clone, Debug)]
pub struct BatchRequest {
    /// The multipart boundary (`batch_<uuid>` by default).
    pub boundary: String,
    /// The parts, in execution order.
    pub parts: Vec<Part>,
}

impl BatchRequest {
    /// An empty batch with a fresh random boundary.
    pub fn new() -> Self {
        todo!()
    }

    /// Number of operations (change sets count each of their operations).
    pub fn operations(&self) -> usize {
        todo!()
    }

    /// The request's `Content-Type` header: `multipart/mixed; boundary=batch_...`.
    pub fn content_type(&self) -> String {
        todo!()
    }

    /// The body, CRLF line endings. Relative URLs are prefixed with `service_root_path` (for example
    /// `/api/data/v9.2/`); absolute URLs and `$n` references are written as they are.
    pub fn encode(&self, service_root_path: &str) -> Vec<u8> {
        let _ = service_root_path;
        todo!()
    }
}

impl Default for BatchRequest {
    fn default() -> Self {
        Self::new()
    }
}

/// The response to one operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperationResponse {
    /// HTTP status.
    pub status: u16,
    /// Response headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty for 204).
    pub body: Vec<u8>,
    /// The `Content-ID` echoed from the request part, if any.
    pub content_id: Option<String>,
}

impl OperationResponse {
    /// A header's value, by case-insensitive name.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        let _ = name;
        todo!()
    }
}

/// A top-level part of a batch response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponsePart {
    /// The response to an independent operation.
    Single(OperationResponse),
    /// The responses of a change set: one per operation on success, a single error response on failure.
    ChangeSet(Vec<OperationResponse>),
}

/// A malformed batch body, with what was wrong and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchError {
    /// What is wrong, naming the part.
    pub message: String,
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed $batch: {}", self.message)
    }
}

impl std::error::Error for BatchError {}

/// Parses a batch request body (server side). Accepts CRLF or LF, quoted or unquoted boundaries.
pub fn parse_request(content_type: &str, body: &[u8]) -> Result<Vec<Part>, BatchError> {
    let _ = (content_type, body);
    todo!()
}

/// Encodes a batch response (server side): returns the `Content-Type` header value and the CRLF body.
pub fn encode_response(parts: &[ResponsePart]) -> (String, Vec<u8>) {
    let _ = parts;
    todo!()
}

/// Parses a batch response body (client side), taking the boundary from `content_type`.
pub fn parse_response(content_type: &str, body: &[u8]) -> Result<Vec<ResponsePart>, BatchError> {
    let _ = (content_type, body);
    todo!()
}
