//! The OData `$batch` multipart format as a client speaks it: build requests, parse responses. The server's
//! direction (parse requests, build responses) is compiled for this module's round-trip tests only: the emulator,
//! its own crate, has its own codec so the two cannot share a misunderstanding.
//!
//! The codec is hand-written rather than built on a multipart crate: `$batch` nests `application/http` messages
//! (request and status lines, headers, bodies) inside `multipart/mixed`, which generic form-data parsers do not
//! model, and it must accept bare-LF bodies that strict parsers reject.
//!
//! Encoding always uses CRLF. Parsing accepts CRLF or bare LF, quoted or unquoted `boundary=` parameters, and a
//! boundary-like text anywhere except at the start of a line (a JSON string containing `--batch_x` is fine). The
//! line break before a delimiter belongs to the delimiter (RFC 2046), so a body never gains a trailing newline.

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
    ///
    /// `parse_request` (tests only) returns the URL exactly as written in the request line (typically
    /// `/api/data/v9.2/accounts`); [`relative_url`] strips the service root path.
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
        Operation {
            method: method.into(),
            url: url.into(),
            headers: Vec::new(),
            body: None,
            content_id: None,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets a JSON body and `Content-Type: application/json; type=entry`.
    pub fn json(mut self, body: impl Into<String>) -> Self {
        self.headers
            .retain(|(name, _)| !name.eq_ignore_ascii_case("content-type"));
        self.headers.push((
            "Content-Type".to_owned(),
            "application/json; type=entry".to_owned(),
        ));
        self.body = Some(body.into());
        self
    }

    /// Sets the `Content-ID`.
    pub fn content_id(mut self, id: impl Into<String>) -> Self {
        self.content_id = Some(id.into());
        self
    }

    /// A header's value, by case-insensitive name.
    pub fn header_value(&self, name: &str) -> Option<&str> {
        header_value(&self.headers, name)
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
        BatchRequest {
            boundary: format!("batch_{}", uuid::Uuid::new_v4()),
            parts: Vec::new(),
        }
    }

    /// Number of operations (change sets count each of their operations).
    pub fn operations(&self) -> usize {
        count_operations(&self.parts)
    }

    /// The request's `Content-Type` header: `multipart/mixed; boundary=batch_...`.
    pub fn content_type(&self) -> String {
        format!("multipart/mixed; boundary={}", self.boundary)
    }

    /// The body, CRLF line endings. Relative URLs are prefixed with `service_root_path` (for example
    /// `/api/data/v9.2/`); absolute URLs, absolute paths (starting with `/`) and `$n` references are written as
    /// they are.
    pub fn encode(&self, service_root_path: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 * self.parts.len().max(1));
        for part in &self.parts {
            push_line(&mut out, &format!("--{}", self.boundary));
            match part {
                Part::Single(op) => encode_operation(&mut out, op, service_root_path),
                Part::ChangeSet(ops) => {
                    let boundary = format!("changeset_{}", uuid::Uuid::new_v4());
                    push_line(
                        &mut out,
                        &format!("Content-Type: multipart/mixed; boundary={boundary}"),
                    );
                    push_line(&mut out, "");
                    for op in ops {
                        push_line(&mut out, &format!("--{boundary}"));
                        encode_operation(&mut out, op, service_root_path);
                    }
                    push_line(&mut out, &format!("--{boundary}--"));
                }
            }
        }
        push_line(&mut out, &format!("--{}--", self.boundary));
        out
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
        header_value(&self.headers, name)
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

impl BatchError {
    fn new(message: impl Into<String>) -> Self {
        BatchError {
            message: message.into(),
        }
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed $batch: {}", self.message)
    }
}

impl std::error::Error for BatchError {}

/// Number of operations in parsed or built parts (change sets count each of their operations).
pub fn count_operations(parts: &[Part]) -> usize {
    parts
        .iter()
        .map(|part| match part {
            Part::Single(_) => 1,
            Part::ChangeSet(ops) => ops.len(),
        })
        .sum()
}

/// `url` relative to the service root: strips `service_root_path` (`/api/data/v9.2/`) from an absolute path, or
/// scheme, authority and that path from an absolute URL. Anything else (`$1`, `accounts`) is returned unchanged.
pub fn relative_url<'a>(url: &'a str, service_root_path: &str) -> &'a str {
    let path = match url.find("://") {
        Some(scheme_end) => {
            let after = &url[scheme_end + 3..];
            match after.find('/') {
                Some(slash) => &after[slash..],
                None => "/",
            }
        }
        None => url,
    };
    if path.starts_with('/') {
        path.strip_prefix(service_root_path).unwrap_or(path)
    } else {
        url
    }
}

/// The boundary of a `multipart/mixed` content type: `multipart/mixed; boundary="batch_1"` or unquoted.
pub fn boundary_of(content_type: &str) -> Result<String, BatchError> {
    let mut params = content_type.split(';');
    let media_type = params.next().unwrap_or_default().trim();
    if !media_type.eq_ignore_ascii_case("multipart/mixed") {
        return Err(BatchError::new(format!(
            "Content-Type '{content_type}' is not multipart/mixed"
        )));
    }
    for param in params {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("boundary") {
            continue;
        }
        let value = value.trim();
        let value = match value.strip_prefix('"') {
            Some(rest) => rest.strip_suffix('"').ok_or_else(|| {
                BatchError::new(format!(
                    "the boundary in Content-Type '{content_type}' has no closing quote"
                ))
            })?,
            None => value,
        };
        if value.is_empty() || value.len() > 70 {
            return Err(BatchError::new(format!(
                "the boundary in Content-Type '{content_type}' must have 1 to 70 characters"
            )));
        }
        return Ok(value.to_owned());
    }
    Err(BatchError::new(format!(
        "Content-Type '{content_type}' has no boundary parameter"
    )))
}

#[cfg(test)]
/// Parses a batch request body (server side). Accepts CRLF or LF, quoted or unquoted boundaries.
pub fn parse_request(content_type: &str, body: &[u8]) -> Result<Vec<Part>, BatchError> {
    let names = ("the batch", "part", "operation");
    let parts = walk_parts(content_type, body, names, parse_operation)?;
    Ok(parts
        .into_iter()
        .map(|part| match part {
            Walked::Single(op) => Part::Single(op),
            Walked::ChangeSet(ops) => Part::ChangeSet(ops),
        })
        .collect())
}

#[cfg(test)]
/// Encodes a batch response (server side): returns the `Content-Type` header value and the CRLF body.
pub fn encode_response(parts: &[ResponsePart]) -> (String, Vec<u8>) {
    let boundary = format!("batchresponse_{}", uuid::Uuid::new_v4());
    let mut out = Vec::with_capacity(256 * parts.len().max(1));
    for part in parts {
        push_line(&mut out, &format!("--{boundary}"));
        match part {
            ResponsePart::Single(response) => encode_operation_response(&mut out, response),
            ResponsePart::ChangeSet(responses) => {
                let inner = format!("changesetresponse_{}", uuid::Uuid::new_v4());
                push_line(
                    &mut out,
                    &format!("Content-Type: multipart/mixed; boundary={inner}"),
                );
                push_line(&mut out, "");
                for response in responses {
                    push_line(&mut out, &format!("--{inner}"));
                    encode_operation_response(&mut out, response);
                }
                push_line(&mut out, &format!("--{inner}--"));
            }
        }
    }
    push_line(&mut out, &format!("--{boundary}--"));
    (format!("multipart/mixed; boundary={boundary}"), out)
}

/// Parses a batch response body (client side), taking the boundary from `content_type`.
pub fn parse_response(content_type: &str, body: &[u8]) -> Result<Vec<ResponsePart>, BatchError> {
    let names = ("the batch response", "response part", "response");
    let parts = walk_parts(content_type, body, names, parse_operation_response)?;
    Ok(parts
        .into_iter()
        .map(|part| match part {
            Walked::Single(response) => ResponsePart::Single(response),
            Walked::ChangeSet(responses) => ResponsePart::ChangeSet(responses),
        })
        .collect())
}

/// A top-level part as read: one item, or the items of a change set.
enum Walked<T> {
    Single(T),
    ChangeSet(Vec<T>),
}

/// The multipart structure shared by requests and responses: top-level parts, each an `application/http` item or
/// a change set of them (never nested). `parse_one` reads one item; `names` say what the body, a part and an
/// item are called in error messages.
fn walk_parts<T>(
    content_type: &str,
    body: &[u8],
    (whole, part, item): (&str, &str, &str),
    parse_one: fn(&Headers, &[u8], &str) -> Result<T, BatchError>,
) -> Result<Vec<Walked<T>>, BatchError> {
    let boundary = boundary_of(content_type)?;
    let raw_parts = split_parts(body, &boundary, whole)?;
    let mut parts = Vec::with_capacity(raw_parts.len());
    for (index, raw) in raw_parts.into_iter().enumerate() {
        let location = format!("{part} {}", index + 1);
        let (headers, content) = split_head(raw, &location)?;
        let part_type = content_type_of(&headers, &location)?;
        if !is_multipart(part_type) {
            expect_http(part_type, &location)?;
            parts.push(Walked::Single(parse_one(&headers, content, &location)?));
            continue;
        }
        let inner_boundary = boundary_of(part_type)
            .map_err(|e| BatchError::new(format!("{location}: {}", e.message)))?;
        let inner = split_parts(
            content,
            &inner_boundary,
            &format!("the change set in {location}"),
        )?;
        let mut items = Vec::with_capacity(inner.len());
        for (item_index, raw_item) in inner.into_iter().enumerate() {
            let item_location = format!("{location}, {item} {} of its change set", item_index + 1);
            let (item_headers, item_content) = split_head(raw_item, &item_location)?;
            let item_type = content_type_of(&item_headers, &item_location)?;
            if is_multipart(item_type) {
                return Err(BatchError::new(format!(
                    "{item_location}: a change set cannot contain another change set"
                )));
            }
            expect_http(item_type, &item_location)?;
            items.push(parse_one(&item_headers, item_content, &item_location)?);
        }
        parts.push(Walked::ChangeSet(items));
    }
    Ok(parts)
}

// ---- encoding ----

fn push_line(out: &mut Vec<u8>, line: &str) {
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Header text with line breaks replaced, so that no value can start a new header or end the head.
fn header_line(out: &mut Vec<u8>, name: &str, value: &str) {
    let clean = |s: &str| s.replace(['\r', '\n'], " ");
    push_line(out, &format!("{}: {}", clean(name), clean(value)));
}

fn encode_operation(out: &mut Vec<u8>, op: &Operation, service_root_path: &str) {
    push_line(out, "Content-Type: application/http");
    push_line(out, "Content-Transfer-Encoding: binary");
    if let Some(id) = &op.content_id {
        header_line(out, "Content-ID", id);
    }
    push_line(out, "");
    let url = if op.url.starts_with('$') || op.url.starts_with('/') || op.url.contains("://") {
        op.url.clone()
    } else {
        format!("{service_root_path}{}", op.url)
    };
    let url = url.replace(['\r', '\n', ' '], "%20");
    push_line(out, &format!("{} {url} HTTP/1.1", op.method));
    for (name, value) in &op.headers {
        header_line(out, name, value);
    }
    push_line(out, "");
    if let Some(body) = &op.body {
        out.extend_from_slice(body.as_bytes());
    }
    // The line break that belongs to the next delimiter.
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
fn encode_operation_response(out: &mut Vec<u8>, response: &OperationResponse) {
    push_line(out, "Content-Type: application/http");
    push_line(out, "Content-Transfer-Encoding: binary");
    if let Some(id) = &response.content_id {
        header_line(out, "Content-ID", id);
    }
    push_line(out, "");
    push_line(
        out,
        &format!(
            "HTTP/1.1 {} {}",
            response.status,
            reason_phrase(response.status)
        ),
    );
    for (name, value) in &response.headers {
        header_line(out, name, value);
    }
    push_line(out, "");
    out.extend_from_slice(&response.body);
    out.extend_from_slice(b"\r\n");
}

/// The canonical reason phrase of a status, `Unknown` for unregistered ones.
pub fn reason_phrase(status: u16) -> &'static str {
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown")
}

// ---- parsing ----

/// The parts of a multipart body (headers and content of each), without preamble, delimiters and epilogue.
///
/// A delimiter is a line that starts with `--boundary`, optionally followed by `--` (the close delimiter) and
/// whitespace. The line break before a delimiter is part of it, not of the preceding content.
fn split_parts<'a>(
    body: &'a [u8],
    boundary: &str,
    location: &str,
) -> Result<Vec<&'a [u8]>, BatchError> {
    let delimiter = format!("--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut parts = Vec::new();
    // Where the current part's content starts (after its delimiter line), once a delimiter was seen.
    let mut content_start: Option<usize> = None;
    let mut line_start = 0;
    loop {
        if let Some((is_close, line_end)) = delimiter_at(body, line_start, delimiter) {
            if let Some(start) = content_start {
                parts.push(strip_line_break(&body[start..line_start]));
            }
            if is_close {
                return Ok(parts);
            }
            content_start = Some(line_end);
        }
        match body[line_start..].iter().position(|&b| b == b'\n') {
            Some(offset) => line_start += offset + 1,
            None => break,
        }
    }
    Err(BatchError::new(match content_start {
        None => format!("{location} has no part: no line starts with the delimiter '--{boundary}'"),
        Some(_) => {
            format!("{location} is truncated: the closing delimiter '--{boundary}--' is missing")
        }
    }))
}

/// Whether the line at `at` is a delimiter; if so, whether it closes, and where the next line starts.
fn delimiter_at(body: &[u8], at: usize, delimiter: &[u8]) -> Option<(bool, usize)> {
    let rest = body.get(at..)?;
    let after = rest.strip_prefix(delimiter)?;
    let (is_close, after) = match after.strip_prefix(b"--") {
        Some(after) => (true, after),
        None => (false, after),
    };
    let line_len = after
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(after.len());
    let tail = &after[..line_len];
    if !tail.iter().all(|&b| matches!(b, b' ' | b'\t' | b'\r')) {
        return None; // a longer boundary, or text that merely starts like one
    }
    let consumed = rest.len() - after.len() + line_len;
    Some((is_close, (at + consumed + 1).min(body.len())))
}

fn strip_line_break(content: &[u8]) -> &[u8] {
    content
        .strip_suffix(b"\r\n")
        .or_else(|| content.strip_suffix(b"\n"))
        .unwrap_or(content)
}

/// The next line of `bytes` (without its line break) and the rest, or `None` at the end.
fn next_line(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    if bytes.is_empty() {
        return None;
    }
    match bytes.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let line = &bytes[..i];
            Some((line.strip_suffix(b"\r").unwrap_or(line), &bytes[i + 1..]))
        }
        None => Some((bytes.strip_suffix(b"\r").unwrap_or(bytes), &[])),
    }
}

type Headers = Vec<(String, String)>;

/// Header lines up to the first blank line (or the end), and the rest.
fn split_head<'a>(bytes: &'a [u8], location: &str) -> Result<(Headers, &'a [u8]), BatchError> {
    let mut headers: Headers = Vec::new();
    let mut rest = bytes;
    while let Some((line, after)) = next_line(rest) {
        rest = after;
        if line.is_empty() {
            return Ok((headers, rest));
        }
        let line = std::str::from_utf8(line)
            .map_err(|_| BatchError::new(format!("{location}: a header line is not UTF-8")))?;
        if line.starts_with([' ', '\t']) {
            // An obsolete folded continuation line.
            match headers.last_mut() {
                Some((_, value)) => {
                    value.push(' ');
                    value.push_str(line.trim());
                    continue;
                }
                None => {
                    return Err(BatchError::new(format!(
                        "{location}: the first header line '{line}' starts with whitespace"
                    )));
                }
            }
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(BatchError::new(format!(
                "{location}: header line '{}' has no ':'",
                shorten(line)
            )));
        };
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(BatchError::new(format!(
                "{location}: header line '{}' has no valid name",
                shorten(line)
            )));
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
    }
    Ok((headers, rest))
}

fn content_type_of<'a>(headers: &'a Headers, location: &str) -> Result<&'a str, BatchError> {
    header_value(headers, "content-type")
        .ok_or_else(|| BatchError::new(format!("{location} has no Content-Type header")))
}

fn is_multipart(content_type: &str) -> bool {
    content_type
        .trim_start()
        .get(..10)
        .is_some_and(|t| t.eq_ignore_ascii_case("multipart/"))
}

fn expect_http(content_type: &str, location: &str) -> Result<(), BatchError> {
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if media.eq_ignore_ascii_case("application/http") {
        Ok(())
    } else {
        Err(BatchError::new(format!(
            "{location} has Content-Type '{content_type}', expected application/http or multipart/mixed"
        )))
    }
}

#[cfg(test)]
fn parse_operation(
    part_headers: &Headers,
    content: &[u8],
    location: &str,
) -> Result<Operation, BatchError> {
    let Some((line, rest)) = next_line(content) else {
        return Err(BatchError::new(format!("{location} has no request line")));
    };
    let line = std::str::from_utf8(line)
        .map_err(|_| BatchError::new(format!("{location}: the request line is not UTF-8")))?;
    let mut words = line.split_whitespace();
    let (Some(method), Some(url), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(BatchError::new(format!(
            "{location}: request line '{}' is not 'METHOD URL HTTP/1.1'",
            shorten(line)
        )));
    };
    if !version.starts_with("HTTP/") || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(BatchError::new(format!(
            "{location}: request line '{}' is not 'METHOD URL HTTP/1.1'",
            shorten(line)
        )));
    }
    let (mut headers, body) = split_head(rest, location)?;
    let mut content_id = header_value(part_headers, "content-id").map(str::to_owned);
    if content_id.is_none()
        && let Some(i) = headers
            .iter()
            .position(|(name, _)| name.eq_ignore_ascii_case("content-id"))
    {
        content_id = Some(headers.remove(i).1);
    }
    let body = if body.is_empty() {
        None
    } else {
        Some(
            String::from_utf8(body.to_vec())
                .map_err(|_| BatchError::new(format!("{location}: the body is not UTF-8")))?,
        )
    };
    Ok(Operation {
        method: method.to_ascii_uppercase(),
        url: url.to_owned(),
        headers,
        body,
        content_id,
    })
}

fn parse_operation_response(
    part_headers: &Headers,
    content: &[u8],
    location: &str,
) -> Result<OperationResponse, BatchError> {
    let Some((line, rest)) = next_line(content) else {
        return Err(BatchError::new(format!("{location} has no status line")));
    };
    let line = std::str::from_utf8(line)
        .map_err(|_| BatchError::new(format!("{location}: the status line is not UTF-8")))?;
    let mut words = line.split_whitespace();
    let status = match (words.next(), words.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => {
            code.parse::<u16>().ok().filter(|s| (100..=599).contains(s))
        }
        _ => None,
    };
    let Some(status) = status else {
        return Err(BatchError::new(format!(
            "{location}: status line '{}' is not 'HTTP/1.1 <code> <reason>'",
            shorten(line)
        )));
    };
    let (headers, body) = split_head(rest, location)?;
    Ok(OperationResponse {
        status,
        headers,
        body: body.to_vec(),
        content_id: header_value(part_headers, "content-id").map(str::to_owned),
    })
}

fn header_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// At most 80 characters of `text`, for error messages.
fn shorten(text: &str) -> String {
    const MAX: usize = 80;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(MAX).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "/api/data/v9.2/";

    /// The §3.2 request example of the reference, CRLF.
    const REQUEST_EXAMPLE: &str = "--batch_A1\r\n\
Content-Type: multipart/mixed; boundary=\"changeset_C1\"\r\n\
\r\n\
--changeset_C1\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
Content-ID: 1\r\n\
\r\n\
POST /api/data/v9.2/accounts HTTP/1.1\r\n\
Content-Type: application/json; type=entry\r\n\
\r\n\
{\"name\":\"Parent placeholder\"}\r\n\
--changeset_C1\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
Content-ID: 2\r\n\
\r\n\
POST /api/data/v9.2/contacts HTTP/1.1\r\n\
Content-Type: application/json; type=entry\r\n\
\r\n\
{\"lastname\":\"Smith\",\"parentcustomerid_account@odata.bind\":\"$1\"}\r\n\
--changeset_C1--\r\n\
\r\n\
--batch_A1\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
\r\n\
GET /api/data/v9.2/accounts?$select=name&$top=1 HTTP/1.1\r\n\
Accept: application/json\r\n\
\r\n\
\r\n\
--batch_A1--\r\n";

    /// The §3.3 response example.
    const RESPONSE_EXAMPLE: &str = "--batchresponse_R1\r\n\
Content-Type: multipart/mixed; boundary=changesetresponse_S1\r\n\
\r\n\
--changesetresponse_S1\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
Content-ID: 1\r\n\
\r\n\
HTTP/1.1 204 No Content\r\n\
OData-Version: 4.0\r\n\
Location: https://contoso.crm.dynamics.com/api/data/v9.2/accounts(4f5195a4-7a75-e911-a97a-000d3a34a1bd)\r\n\
OData-EntityId: https://contoso.crm.dynamics.com/api/data/v9.2/accounts(4f5195a4-7a75-e911-a97a-000d3a34a1bd)\r\n\
\r\n\
\r\n\
--changesetresponse_S1\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
Content-ID: 2\r\n\
\r\n\
HTTP/1.1 204 No Content\r\n\
OData-Version: 4.0\r\n\
Location: https://contoso.crm.dynamics.com/api/data/v9.2/contacts(495195a4-7a75-e911-a97a-000d3a34a1bd)\r\n\
OData-EntityId: https://contoso.crm.dynamics.com/api/data/v9.2/contacts(495195a4-7a75-e911-a97a-000d3a34a1bd)\r\n\
\r\n\
\r\n\
--changesetresponse_S1--\r\n\
--batchresponse_R1\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
\r\n\
HTTP/1.1 200 OK\r\n\
Content-Type: application/json; odata.metadata=minimal; odata.streaming=true\r\n\
OData-Version: 4.0\r\n\
\r\n\
{\"@odata.context\":\"https://contoso.crm.dynamics.com/api/data/v9.2/$metadata#accounts(name)\",\"value\":[{\"@odata.etag\":\"W/\\\"77181173\\\"\",\"name\":\"Parent placeholder\",\"accountid\":\"4f5195a4-7a75-e911-a97a-000d3a34a1bd\"}]}\r\n\
--batchresponse_R1--\r\n";

    /// The §3.4 error example (outer status 400).
    const ERROR_EXAMPLE: &str = "--batchresponse_156da4b8-cd2c-4862-a911-4aaab97c001a\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
\r\n\
HTTP/1.1 400 Bad Request\r\n\
REQ_ID: 5ecd1cb3-1730-4ffc-909c-d44c22270026\r\n\
Content-Type: application/json; odata.metadata=minimal\r\n\
OData-Version: 4.0\r\n\
\r\n\
{\"error\":{\"code\":\"0x80044331\",\"message\":\"A validation error occurred.  The length of the 'subject' attribute of the 'task' entity exceeded the maximum allowed length of '200'.\"}}\r\n\
--batchresponse_156da4b8-cd2c-4862-a911-4aaab97c001a--\r\n";

    fn lf_only(text: &str) -> Vec<u8> {
        text.replace("\r\n", "\n").into_bytes()
    }

    #[test]
    fn builders_set_fields() {
        let op = Operation::new("PATCH", "accounts(1)")
            .header("If-Match", "*")
            .json("{}")
            .content_id("3");
        assert_eq!(op.method, "PATCH");
        assert_eq!(op.header_value("if-match"), Some("*"));
        assert_eq!(
            op.header_value("CONTENT-TYPE"),
            Some("application/json; type=entry")
        );
        assert_eq!(op.body.as_deref(), Some("{}"));
        assert_eq!(op.content_id.as_deref(), Some("3"));
        assert_eq!(op.header_value("Prefer"), None);
        let batch = BatchRequest::new();
        assert!(batch.boundary.starts_with("batch_"));
        assert_eq!(
            batch.content_type(),
            format!("multipart/mixed; boundary={}", batch.boundary)
        );
        assert_ne!(batch.boundary, BatchRequest::default().boundary);
    }

    #[test]
    fn the_reference_request_example_parses() {
        for body in [
            REQUEST_EXAMPLE.as_bytes().to_vec(),
            lf_only(REQUEST_EXAMPLE),
        ] {
            let parts = parse_request("multipart/mixed; boundary=\"batch_A1\"", &body).unwrap();
            assert_eq!(parts.len(), 2);
            let Part::ChangeSet(ops) = &parts[0] else {
                panic!("first part is a change set: {parts:?}")
            };
            assert_eq!(ops.len(), 2);
            assert_eq!(ops[0].method, "POST");
            assert_eq!(ops[0].url, "/api/data/v9.2/accounts");
            assert_eq!(ops[0].content_id.as_deref(), Some("1"));
            assert_eq!(
                ops[0].header_value("content-type"),
                Some("application/json; type=entry")
            );
            assert_eq!(
                ops[0].body.as_deref(),
                Some(r#"{"name":"Parent placeholder"}"#)
            );
            assert_eq!(ops[1].content_id.as_deref(), Some("2"));
            assert_eq!(
                ops[1].body.as_deref(),
                Some(r#"{"lastname":"Smith","parentcustomerid_account@odata.bind":"$1"}"#)
            );
            let Part::Single(get) = &parts[1] else {
                panic!("second part is an operation")
            };
            assert_eq!(get.method, "GET");
            assert_eq!(get.url, "/api/data/v9.2/accounts?$select=name&$top=1");
            assert_eq!(
                get.headers,
                vec![("Accept".into(), "application/json".into())]
            );
            assert_eq!(get.body, None);
            assert_eq!(get.content_id, None);
        }
    }

    #[test]
    fn the_reference_response_example_parses() {
        for body in [
            RESPONSE_EXAMPLE.as_bytes().to_vec(),
            lf_only(RESPONSE_EXAMPLE),
        ] {
            let parts =
                parse_response("multipart/mixed; boundary=batchresponse_R1", &body).unwrap();
            assert_eq!(parts.len(), 2);
            let ResponsePart::ChangeSet(responses) = &parts[0] else {
                panic!("change set first")
            };
            assert_eq!(responses.len(), 2);
            assert_eq!(responses[0].status, 204);
            assert_eq!(responses[0].content_id.as_deref(), Some("1"));
            assert_eq!(
                responses[0].header_value("odata-entityid"),
                Some(
                    "https://contoso.crm.dynamics.com/api/data/v9.2/accounts(4f5195a4-7a75-e911-a97a-000d3a34a1bd)"
                )
            );
            assert!(responses[0].body.is_empty(), "{:?}", responses[0].body);
            assert_eq!(responses[1].content_id.as_deref(), Some("2"));
            let ResponsePart::Single(get) = &parts[1] else {
                panic!("then the GET")
            };
            assert_eq!(get.status, 200);
            assert_eq!(get.content_id, None);
            let json: serde_json::Value = serde_json::from_slice(&get.body).unwrap();
            assert_eq!(json["value"][0]["name"], "Parent placeholder");
            assert_eq!(json["value"][0]["@odata.etag"], "W/\"77181173\"");
        }
    }

    #[test]
    fn the_reference_error_example_parses() {
        let parts = parse_response(
            "multipart/mixed; boundary=batchresponse_156da4b8-cd2c-4862-a911-4aaab97c001a",
            ERROR_EXAMPLE.as_bytes(),
        )
        .unwrap();
        let [ResponsePart::Single(error)] = parts.as_slice() else {
            panic!("one part: {parts:?}")
        };
        assert_eq!(error.status, 400);
        assert_eq!(
            error.header_value("req_id"),
            Some("5ecd1cb3-1730-4ffc-909c-d44c22270026")
        );
        let json: serde_json::Value = serde_json::from_slice(&error.body).unwrap();
        assert_eq!(json["error"]["code"], "0x80044331");
    }

    #[test]
    fn client_encoding_round_trips_through_the_server_parser() {
        let mut batch = BatchRequest::new();
        batch.parts.push(Part::ChangeSet(vec![
            Operation::new("POST", "accounts")
                .json(r#"{"name":"--batch_x at the start of a JSON string"}"#)
                .content_id("1"),
            Operation::new("PATCH", "$1")
                .header("If-Match", "*")
                .json("{\"description\":\"line one\\n--changeset_y\"}")
                .content_id("2"),
        ]));
        batch.parts.push(Part::Single(
            Operation::new("GET", "accounts(accountnumber='A%2C1')?$select=name")
                .header("Accept", "application/json"),
        ));
        batch.parts.push(Part::Single(Operation::new(
            "DELETE",
            "https://org.example/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)",
        )));
        batch
            .parts
            .push(Part::Single(Operation::new("POST", "contacts").json("")));
        let body = batch.encode(ROOT);
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(text.contains("POST /api/data/v9.2/accounts HTTP/1.1\r\n"));
        assert!(text.contains("PATCH $1 HTTP/1.1\r\n"));
        assert!(text.contains("\r\nContent-ID: 1\r\n"));
        assert!(text.contains(
            "DELETE https://org.example/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001) HTTP/1.1\r\n"
        ));
        assert!(text.ends_with(&format!("--{}--\r\n", batch.boundary)));
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "only CRLF line breaks"
        );
        assert_eq!(batch.operations(), 5);

        let parsed = parse_request(&batch.content_type(), &body).unwrap();
        let mut expected = batch.parts.clone();
        for part in &mut expected {
            let ops: Vec<&mut Operation> = match part {
                Part::Single(op) => vec![op],
                Part::ChangeSet(ops) => ops.iter_mut().collect(),
            };
            for op in ops {
                if !op.url.starts_with('$') && !op.url.contains("://") {
                    op.url = format!("{ROOT}{}", op.url);
                }
                if op.body.as_deref() == Some("") {
                    op.body = None;
                }
            }
        }
        assert_eq!(parsed, expected);
        for part in &parsed {
            if let Part::Single(op) = part {
                let relative = relative_url(&op.url, ROOT);
                assert!(
                    relative.starts_with("accounts") || relative.starts_with("contacts"),
                    "{relative}"
                );
            }
        }
    }

    #[test]
    fn server_encoding_round_trips_through_the_client_parser() {
        let created = OperationResponse {
            status: 204,
            headers: vec![
                ("OData-Version".into(), "4.0".into()),
                (
                    "Location".into(),
                    "https://h/api/data/v9.2/accounts(1)".into(),
                ),
            ],
            body: Vec::new(),
            content_id: Some("1".into()),
        };
        let failed = OperationResponse {
            status: 412,
            headers: vec![
                ("REQ_ID".into(), "abc".into()),
                (
                    "Content-Type".into(),
                    "application/json; odata.metadata=minimal".into(),
                ),
            ],
            body: br#"{"error":{"code":"0x80040237","message":"--batchresponse_x"}}"#.to_vec(),
            content_id: None,
        };
        let read = OperationResponse {
            status: 200,
            headers: vec![],
            body: b"{\"value\":[]}\r\n".to_vec(),
            content_id: None,
        };
        let parts = vec![
            ResponsePart::ChangeSet(vec![created.clone(), created.clone()]),
            ResponsePart::Single(failed),
            ResponsePart::Single(read),
            ResponsePart::ChangeSet(vec![]),
        ];
        let (content_type, body) = encode_response(&parts);
        assert!(content_type.starts_with("multipart/mixed; boundary=batchresponse_"));
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(text.contains("HTTP/1.1 412 Precondition Failed\r\n"));
        assert!(text.contains("HTTP/1.1 204 No Content\r\n"));
        assert_eq!(parse_response(&content_type, &body).unwrap(), parts);
        assert_eq!(
            parse_response(&content_type, &lf_only(&text)).unwrap()[1],
            parts[1]
        );
    }

    #[test]
    fn boundaries_quoted_or_not_and_longer_lookalikes() {
        assert_eq!(
            boundary_of("multipart/mixed; boundary=\"b_1\"").unwrap(),
            "b_1"
        );
        assert_eq!(
            boundary_of("Multipart/Mixed;charset=x;BOUNDARY=b_1").unwrap(),
            "b_1"
        );
        assert!(boundary_of("application/json").is_err());
        assert!(boundary_of("multipart/mixed").is_err());
        assert!(boundary_of("multipart/mixed; boundary=\"b").is_err());
        assert!(boundary_of("multipart/mixed; boundary=").is_err());
        // "--b_10" is not a delimiter for boundary "b_1".
        let body =
            "--b_1\nContent-Type: application/http\n\nPOST accounts HTTP/1.1\n\n--b_10\n--b_1--";
        let parts = parse_request("multipart/mixed; boundary=b_1", body.as_bytes()).unwrap();
        let [Part::Single(op)] = parts.as_slice() else {
            panic!("{parts:?}")
        };
        assert_eq!(op.body.as_deref(), Some("--b_10"));
    }

    #[test]
    fn relative_url_strips_the_service_root() {
        assert_eq!(
            relative_url("/api/data/v9.2/accounts?$top=1", ROOT),
            "accounts?$top=1"
        );
        assert_eq!(
            relative_url("https://h.example:8443/api/data/v9.2/accounts(1)", ROOT),
            "accounts(1)"
        );
        assert_eq!(relative_url("$1/name", ROOT), "$1/name");
        assert_eq!(relative_url("accounts", ROOT), "accounts");
        assert_eq!(relative_url("/other/x", ROOT), "/other/x");
        assert_eq!(relative_url("https://h.example", ROOT), "/");
    }

    #[test]
    fn content_id_in_the_inner_headers_is_accepted() {
        let body = "--b\r\nContent-Type: application/http\r\n\r\nPOST accounts HTTP/1.1\r\nContent-ID: 7\r\nContent-Type: application/json\r\n\r\n{}\r\n--b--\r\n";
        let parts = parse_request("multipart/mixed; boundary=b", body.as_bytes()).unwrap();
        let [Part::Single(op)] = parts.as_slice() else {
            panic!()
        };
        assert_eq!(op.content_id.as_deref(), Some("7"));
        assert_eq!(op.headers.len(), 1);
    }

    #[test]
    fn malformed_bodies_are_errors_naming_the_problem() {
        let ct = "multipart/mixed; boundary=b";
        let cases: &[(&str, &str)] = &[
            ("", "no part"),
            ("hello", "no part"),
            (
                "--b\r\nContent-Type: application/http\r\n\r\nGET x HTTP/1.1\r\n",
                "closing delimiter",
            ),
            (
                "--b\r\n\r\nGET x HTTP/1.1\r\n--b--",
                "part 1 has no Content-Type",
            ),
            (
                "--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--",
                "expected application/http",
            ),
            (
                "--b\r\nContent-Type: application/http\r\n\r\n\r\n--b--",
                "part 1 has no request line",
            ),
            (
                "--b\r\nContent-Type: application/http\r\n\r\nGET\r\n--b--",
                "is not 'METHOD URL HTTP/1.1'",
            ),
            (
                "--b\r\nContent-Type: application/http\r\n\r\nGET x y z HTTP/1.1\r\n--b--",
                "is not 'METHOD URL",
            ),
            (
                "--b\r\nContent-Type: application/http\r\n\r\nGET x FTP/1\r\n--b--",
                "is not 'METHOD URL",
            ),
            (
                "--b\r\nContent-Type: application/http\r\nbroken\r\n\r\nGET x HTTP/1.1\r\n--b--",
                "header line 'broken' has no ':'",
            ),
            (
                "--b\r\nContent-Type: application/http\r\n\r\nGET x HTTP/1.1\r\nA B: c\r\n--b--",
                "no valid name",
            ),
            ("--b\r\n folded\r\n\r\n--b--", "starts with whitespace"),
            (
                "--b\r\nContent-Type: multipart/mixed\r\n\r\n--b--",
                "part 1: Content-Type 'multipart/mixed' has no boundary",
            ),
            (
                "--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\nContent-Type: application/http\r\n\r\nGET x HTTP/1.1\r\n--b--",
                "change set in part 1 is truncated",
            ),
            (
                "--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\nContent-Type: multipart/mixed; boundary=d\r\n\r\n--d--\r\n--c--\r\n--b--",
                "cannot contain another change set",
            ),
            (
                "--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\nContent-Type: application/http\r\n\r\nbad\r\n--c--\r\n--b--",
                "part 1, operation 1 of its change set: request line 'bad'",
            ),
        ];
        for (body, expected) in cases {
            let err = parse_request(ct, body.as_bytes()).unwrap_err();
            assert!(
                err.message.contains(expected),
                "{body:?}: expected '{expected}' in '{err}'"
            );
            assert!(err.to_string().starts_with("malformed $batch: "));
        }
        let not_utf8 = b"--b\r\nContent-Type: application/http\r\n\r\nPOST x HTTP/1.1\r\n\r\n\xff\xfe\r\n--b--";
        assert!(
            parse_request(ct, not_utf8)
                .unwrap_err()
                .message
                .contains("not UTF-8")
        );
        assert!(parse_request("text/plain", b"--b--").is_err());

        let responses: &[(&str, &str)] = &[
            (
                "--b\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 abc OK\r\n--b--",
                "status line 'HTTP/1.1 abc OK'",
            ),
            (
                "--b\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 999 X\r\n--b--",
                "is not 'HTTP/1.1 <code>",
            ),
            (
                "--b\r\nContent-Type: application/http\r\n\r\n\r\n--b--",
                "has no status line",
            ),
            (
                "--b\r\nContent-Type: application/http\r\n\r\n200 OK\r\n--b--",
                "is not 'HTTP/1.1",
            ),
        ];
        for (body, expected) in responses {
            let err = parse_response(ct, body.as_bytes()).unwrap_err();
            assert!(err.message.contains(expected), "{body:?}: '{err}'");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix and a few mutations of the examples.
        let ct = "multipart/mixed; boundary=batch_A1";
        let samples = [
            REQUEST_EXAMPLE.as_bytes().to_vec(),
            lf_only(REQUEST_EXAMPLE),
        ];
        for sample in &samples {
            for end in 0..sample.len() {
                let _ = parse_request(ct, &sample[..end]);
                let _ = parse_response(ct, &sample[..end]);
            }
            for i in (0..sample.len()).step_by(7) {
                let mut mutated = sample.clone();
                mutated[i] = b'\n';
                let _ = parse_request(ct, &mutated);
                mutated[i] = 0xff;
                let _ = parse_request(ct, &mutated);
            }
        }
    }

    #[test]
    fn header_values_cannot_inject_lines() {
        let mut batch = BatchRequest::new();
        batch.parts.push(Part::Single(
            Operation::new("GET", "accounts").header("X", "a\r\nInjected: 1"),
        ));
        let parsed = parse_request(&batch.content_type(), &batch.encode(ROOT)).unwrap();
        let [Part::Single(op)] = parsed.as_slice() else {
            panic!()
        };
        assert_eq!(op.headers.len(), 1);
        assert_eq!(op.header_value("Injected"), None);
    }

    #[test]
    fn reason_phrases() {
        assert_eq!(reason_phrase(204), "No Content");
        assert_eq!(reason_phrase(429), "Too Many Requests");
        assert_eq!(reason_phrase(599), "Unknown");
    }
}
