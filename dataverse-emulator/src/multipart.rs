//! The `$batch` wire format, server side only: reading `multipart/mixed` request bodies and writing response bodies.
//!
//! Written from the Web API documentation ("Execute batch operations using the Web API", summarised in §3 of the
//! project's Dataverse reference), on purpose without the adapter's codec: a shared codec could carry a shared
//! misunderstanding, and the emulator exists to check the adapter.
//!
//! What a request looks like: a `multipart/mixed` body whose parts are either one embedded HTTP request
//! (`Content-Type: application/http`) or a change set (`Content-Type: multipart/mixed` with its own boundary, whose
//! parts are embedded requests, never another change set). Lines end in CRLF or, as several well-known clients
//! send, bare LF. A delimiter is a line beginning with `--` and the boundary; the line break in front of it belongs
//! to it (RFC 2046 §5.1.1), so a part's content never ends with that line break. Responses always use CRLF and a
//! server-chosen boundary (`batchresponse_<guid>`, `changesetresponse_<guid>`).

use std::fmt;

use axum::http::StatusCode;
use uuid::Uuid;

/// Most operations one `$batch` may carry; Dataverse refuses a larger batch before running any of it.
pub(crate) const MAX_OPERATIONS: usize = 1000;

/// One embedded request.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) method: String,
    /// As written in the request line: relative (`accounts`), rooted (`/api/data/v9.2/accounts`), absolute, or a
    /// Content-ID reference (`$1`).
    pub(crate) url: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    /// From the MIME part's headers (or, failing that, the embedded request's).
    pub(crate) content_id: Option<String>,
}

impl Request {
    /// A header of the embedded request, by case-insensitive name.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// A top-level part of a request.
#[derive(Debug)]
pub(crate) enum Part {
    Single(Request),
    ChangeSet(Vec<Request>),
}

/// The response to one embedded request.
#[derive(Debug)]
pub(crate) struct PartResponse {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) content_id: Option<String>,
}

/// A top-level part of a response: one response, or a change set's (all of them, or the one that failed).
#[derive(Debug)]
pub(crate) enum ResponsePart {
    Single(PartResponse),
    ChangeSet(Vec<PartResponse>),
}

/// Why a request body is not a readable batch.
#[derive(Debug)]
pub(crate) struct Malformed(String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "The $batch request is malformed: {}", self.0)
    }
}

fn malformed<T>(message: impl Into<String>) -> Result<T, Malformed> {
    Err(Malformed(message.into()))
}

/// Operations in a parsed request (each operation of a change set counts).
pub(crate) fn operation_count(parts: &[Part]) -> usize {
    parts
        .iter()
        .map(|part| match part {
            Part::Single(_) => 1,
            Part::ChangeSet(requests) => requests.len(),
        })
        .sum()
}

/// Reads a request body sent with `content_type`.
pub(crate) fn parse(content_type: &str, body: &[u8]) -> Result<Vec<Part>, Malformed> {
    let outer = boundary(content_type)?;
    let mut parts = Vec::new();
    for (index, raw) in sections(body, &outer, "the batch")?.into_iter().enumerate() {
        let where_ = format!("part {}", index + 1);
        let (mime, content) = head(raw, &where_)?;
        let kind = find_header(&mime, "content-type").unwrap_or_default();
        if media_type(kind).eq_ignore_ascii_case("multipart/mixed") {
            let inner = boundary(kind)?;
            let mut requests = Vec::new();
            for (n, raw) in sections(content, &inner, &where_)?.into_iter().enumerate() {
                let where_ = format!("{where_}, change set part {}", n + 1);
                let (mime, content) = head(raw, &where_)?;
                requests.push(request(&mime, content, &where_)?);
            }
            parts.push(Part::ChangeSet(requests));
        } else {
            parts.push(Part::Single(request(&mime, content, &where_)?));
        }
    }
    Ok(parts)
}

/// Writes a response body: the `Content-Type` header value and the CRLF body.
pub(crate) fn write(parts: &[ResponsePart]) -> (String, Vec<u8>) {
    let boundary = format!("batchresponse_{}", Uuid::new_v4());
    let mut out = Vec::new();
    for part in parts {
        line(&mut out, &format!("--{boundary}"));
        match part {
            ResponsePart::Single(response) => write_response(&mut out, response),
            ResponsePart::ChangeSet(responses) => {
                let inner = format!("changesetresponse_{}", Uuid::new_v4());
                line(
                    &mut out,
                    &format!("Content-Type: multipart/mixed; boundary={inner}"),
                );
                line(&mut out, "");
                for response in responses {
                    line(&mut out, &format!("--{inner}"));
                    write_response(&mut out, response);
                }
                line(&mut out, &format!("--{inner}--"));
            }
        }
    }
    line(&mut out, &format!("--{boundary}--"));
    (format!("multipart/mixed; boundary={boundary}"), out)
}

/// `url` relative to the service root: an absolute URL loses its scheme and authority, then a path under
/// `root_path` (`/api/data/v9.2/`) loses that prefix. A rooted path elsewhere keeps its leading `/`; anything
/// else (`accounts(...)`, `$1`) is returned as it is.
pub(crate) fn relative_url<'a>(url: &'a str, root_path: &str) -> &'a str {
    let path = match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |slash| &rest[slash..]),
        None => url,
    };
    if !path.starts_with('/') {
        return url;
    }
    path.strip_prefix(root_path).unwrap_or(path)
}

// ---- reading ----

fn media_type(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// The `boundary` parameter of a `multipart/mixed` content type, quoted or not.
fn boundary(content_type: &str) -> Result<String, Malformed> {
    if !media_type(content_type).eq_ignore_ascii_case("multipart/mixed") {
        return malformed(format!(
            "the Content-Type '{content_type}' is not multipart/mixed."
        ));
    }
    let value = content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim())
    });
    let Some(value) = value else {
        return malformed(format!(
            "the Content-Type '{content_type}' has no boundary parameter."
        ));
    };
    let value = match value.strip_prefix('"') {
        None => value,
        Some(quoted) => match quoted.strip_suffix('"') {
            Some(inner) => inner,
            None => return malformed(format!("the boundary {value} lacks its closing quote.")),
        },
    };
    // RFC 2046: 1 to 70 characters.
    if value.is_empty() || value.len() > 70 {
        return malformed(format!(
            "the boundary '{value}' is not 1 to 70 characters long."
        ));
    }
    Ok(value.to_owned())
}

/// Lines of `bytes` with the offset each starts at; a line's text excludes its `\n` and a `\r` before it.
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= bytes.len() {
            return None;
        }
        let begin = start;
        let end = bytes[begin..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |i| begin + i);
        start = end + 1;
        let text = &bytes[begin..end];
        Some((begin, text.strip_suffix(b"\r").unwrap_or(text)))
    })
}

/// The contents between the delimiters of `boundary` (preamble and epilogue dropped).
fn sections<'a>(body: &'a [u8], boundary: &str, what: &str) -> Result<Vec<&'a [u8]>, Malformed> {
    let dash = format!("--{boundary}");
    let mut found = Vec::new();
    // Where the current part's content starts, once the first delimiter has been seen.
    let mut open: Option<usize> = None;
    for (at, text) in lines(body) {
        let Some(after) = text.strip_prefix(dash.as_bytes()) else {
            continue;
        };
        let closing = after.starts_with(b"--");
        let rest = if closing { &after[2..] } else { after };
        if !rest.iter().all(u8::is_ascii_whitespace) {
            continue; // `--boundaryX`: another boundary that merely starts with ours.
        }
        if let Some(from) = open {
            // The line break before the delimiter is the delimiter's.
            let mut to = at;
            if to > from && body[to - 1] == b'\n' {
                to -= 1;
                if to > from && body[to - 1] == b'\r' {
                    to -= 1;
                }
            }
            found.push(&body[from..to.max(from)]);
        }
        if closing {
            return Ok(found);
        }
        let next = at + text.len();
        open = Some(match body.get(next..) {
            Some([b'\r', b'\n', ..]) => next + 2,
            Some([b'\n', ..]) => next + 1,
            _ => body.len(),
        });
    }
    match open {
        None => malformed(format!("{what} has no delimiter line '--{boundary}'.")),
        Some(_) => malformed(format!(
            "{what} does not end with the close delimiter '--{boundary}--'."
        )),
    }
}

/// Header lines, in order, names and values trimmed.
type Headers = Vec<(String, String)>;

/// Header lines up to the first empty line, and what follows it.
fn head<'a>(bytes: &'a [u8], where_: &str) -> Result<(Headers, &'a [u8]), Malformed> {
    let mut headers = Vec::new();
    for (at, text) in lines(bytes) {
        if text.is_empty() {
            let rest = at + 1 + usize::from(bytes.get(at) == Some(&b'\r'));
            return Ok((headers, bytes.get(rest..).unwrap_or_default()));
        }
        let Ok(text) = std::str::from_utf8(text) else {
            return malformed(format!("{where_}: a header line is not UTF-8."));
        };
        let Some((name, value)) = text.split_once(':') else {
            return malformed(format!("{where_}: '{}' is not a header line.", short(text)));
        };
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    Ok((headers, &[]))
}

/// An embedded request: its MIME headers must say `application/http`; then a request line, headers, a body.
fn request(mime: &[(String, String)], content: &[u8], where_: &str) -> Result<Request, Malformed> {
    let kind = find_header(mime, "content-type").unwrap_or_default();
    if media_type(kind).eq_ignore_ascii_case("multipart/mixed") {
        return malformed(format!("{where_}: a change set cannot contain another."));
    }
    if !media_type(kind).eq_ignore_ascii_case("application/http") {
        return malformed(format!(
            "{where_}: the Content-Type is '{kind}', not application/http."
        ));
    }
    // Blank lines before the request line are tolerated.
    let start = lines(content)
        .find(|(_, text)| !text.iter().all(u8::is_ascii_whitespace))
        .map(|(at, _)| at);
    let Some(start) = start else {
        return malformed(format!("{where_}: the part holds no request."));
    };
    let content = &content[start..];
    let (_, first) = lines(content).next().unwrap_or((0, &[]));
    let request_line = String::from_utf8_lossy(first);
    let mut words = request_line.split_whitespace();
    let (Some(method), Some(url)) = (words.next(), words.next()) else {
        return malformed(format!(
            "{where_}: '{}' is not a request line (METHOD URL HTTP/1.1).",
            short(&request_line)
        ));
    };
    let after_line = (first.len() + 1 + usize::from(content.get(first.len()) == Some(&b'\r')))
        .min(content.len());
    let (headers, body) = head(&content[after_line..], where_)?;
    let content_id = find_header(mime, "content-id")
        .or_else(|| find_header(&headers, "content-id"))
        .map(str::to_owned);
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        Vec::new()
    } else {
        body.to_vec()
    };
    Ok(Request {
        method: method.to_owned(),
        url: url.to_owned(),
        headers,
        body,
        content_id,
    })
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// At most 60 characters of `text`, for messages.
fn short(text: &str) -> String {
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

// ---- writing ----

fn line(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn write_response(out: &mut Vec<u8>, response: &PartResponse) {
    line(out, "Content-Type: application/http");
    line(out, "Content-Transfer-Encoding: binary");
    if let Some(id) = &response.content_id {
        line(out, &format!("Content-ID: {}", one_line(id)));
    }
    line(out, "");
    let reason = StatusCode::from_u16(response.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    line(out, &format!("HTTP/1.1 {} {reason}", response.status));
    for (name, value) in &response.headers {
        line(out, &format!("{}: {}", one_line(name), one_line(value)));
    }
    line(out, "");
    out.extend_from_slice(&response.body);
    line(out, "");
}

/// A header text that cannot break out of its line.
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRLF_BODY: &str = "--batch_A1\r\nContent-Type: multipart/mixed; boundary=\"changeset_C1\"\r\n\r\n\
        --changeset_C1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
        POST /api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json; type=entry\r\n\r\n\
        {\"name\":\"--batch_A1 in a string\"}\r\n--changeset_C1--\r\n\r\n\
        --batch_A1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
        GET /api/data/v9.2/accounts?$select=name&$top=1 HTTP/1.1\r\nAccept: application/json\r\n\r\n\r\n\
        --batch_A1--\r\n";

    fn check_doc_example(parts: &[Part]) {
        assert_eq!(operation_count(parts), 2);
        let Part::ChangeSet(set) = &parts[0] else {
            panic!("a change set first: {parts:?}")
        };
        assert_eq!(set[0].method, "POST");
        assert_eq!(set[0].url, "/api/data/v9.2/accounts");
        assert_eq!(set[0].content_id.as_deref(), Some("1"));
        assert_eq!(
            set[0].header("content-type"),
            Some("application/json; type=entry")
        );
        assert_eq!(set[0].body, br#"{"name":"--batch_A1 in a string"}"#);
        let Part::Single(get) = &parts[1] else {
            panic!("then a single request: {parts:?}")
        };
        assert_eq!(get.method, "GET");
        assert_eq!(get.url, "/api/data/v9.2/accounts?$select=name&$top=1");
        assert!(get.body.is_empty());
    }

    #[test]
    fn reads_the_documented_example_with_crlf_and_with_lf() {
        let content_type = "multipart/mixed; boundary=\"batch_A1\"";
        check_doc_example(&parse(content_type, CRLF_BODY.as_bytes()).expect("CRLF"));
        let lf = CRLF_BODY.replace("\r\n", "\n");
        check_doc_example(&parse("multipart/mixed;boundary=batch_A1", lf.as_bytes()).expect("LF"));
    }

    #[test]
    fn refuses_what_is_not_a_batch() {
        let err = |ct: &str, body: &str| parse(ct, body.as_bytes()).unwrap_err().to_string();
        assert!(err("application/json", "{}").contains("not multipart/mixed"));
        assert!(err("multipart/mixed", "").contains("no boundary"));
        assert!(err("multipart/mixed; boundary=b", "no delimiter").contains("no delimiter line"));
        assert!(
            err(
                "multipart/mixed; boundary=b",
                "--b\r\nContent-Type: application/http\r\n\r\nGET x HTTP/1.1\r\n"
            )
            .contains("close delimiter")
        );
        assert!(
            err(
                "multipart/mixed; boundary=b",
                "--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--"
            )
            .contains("not application/http")
        );
        let nested = "--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\nContent-Type: multipart/mixed; boundary=d\r\n\r\n--d--\r\n--c--\r\n--b--";
        assert!(err("multipart/mixed; boundary=b", nested).contains("cannot contain another"));
    }

    #[test]
    fn writes_crlf_responses_with_a_server_chosen_boundary() {
        let response = |status, content_id: Option<&str>| PartResponse {
            status,
            headers: vec![("OData-Version".to_owned(), "4.0".to_owned())],
            body: Vec::new(),
            content_id: content_id.map(str::to_owned),
        };
        let (content_type, body) = write(&[
            ResponsePart::ChangeSet(vec![response(204, Some("1"))]),
            ResponsePart::Single(response(404, None)),
        ]);
        let boundary = content_type
            .strip_prefix("multipart/mixed; boundary=batchresponse_")
            .expect("the documented boundary shape");
        let text = String::from_utf8(body).expect("UTF-8");
        assert!(!text.replace("\r\n", "").contains('\n'), "CRLF only");
        assert!(text.starts_with(&format!("--batchresponse_{boundary}\r\n")));
        assert!(text.ends_with(&format!("--batchresponse_{boundary}--\r\n")));
        assert!(
            text.contains("Content-ID: 1\r\n\r\nHTTP/1.1 204 No Content\r\nOData-Version: 4.0\r\n")
        );
        assert!(text.contains("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("--changesetresponse_"));
    }

    #[test]
    fn relative_urls() {
        let root = "/api/data/v9.2/";
        assert_eq!(
            relative_url("https://x.crm.dynamics.com/api/data/v9.2/accounts(1)", root),
            "accounts(1)"
        );
        assert_eq!(relative_url("/api/data/v9.2/accounts", root), "accounts");
        assert_eq!(
            relative_url("/api/data/v9.0/accounts", root),
            "/api/data/v9.0/accounts"
        );
        assert_eq!(relative_url("http://host", root), "/");
        assert_eq!(
            relative_url("accounts(accountnumber='A')", root),
            "accounts(accountnumber='A')"
        );
        assert_eq!(relative_url("$1/name", root), "$1/name");
    }
}
