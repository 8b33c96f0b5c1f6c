//! The request log: one JSON object per line and per HTTP request, appended as each response is sent
//! (see [`EmulatorConfig::request_log`](crate::EmulatorConfig::request_log) for the fields).

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One line of the log.
#[derive(Debug, Serialize)]
pub(crate) struct Entry<'a> {
    /// Milliseconds since the Unix epoch when the request arrived.
    pub(crate) time_unix_ms: u128,
    pub(crate) method: &'a str,
    /// Path and query, as received.
    pub(crate) target: &'a str,
    pub(crate) status: u16,
    pub(crate) duration_ms: f64,
    /// The `x-ms-service-request-id` sent back.
    pub(crate) service_request_id: &'a str,
    /// The client's `x-ms-client-request-id`, if it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) client_request_id: Option<&'a str>,
    /// The client's `x-ms-correlation-request-id`, if it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) correlation_request_id: Option<&'a str>,
}

/// An open log file.
#[derive(Debug)]
pub(crate) struct RequestLog {
    path: PathBuf,
    file: Mutex<LineWriter<File>>,
    warned: AtomicBool,
}

impl RequestLog {
    /// Opens `path` for appending (created if missing).
    pub(crate) fn open(path: &Path) -> std::io::Result<RequestLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(RequestLog {
            path: path.to_owned(),
            file: Mutex::new(LineWriter::new(file)),
            warned: AtomicBool::new(false),
        })
    }

    /// Appends one line. A failure is logged once (tracing) and does not affect the response.
    pub(crate) fn write(&self, entry: &Entry<'_>) {
        let result = serde_json::to_vec(entry)
            .map_err(std::io::Error::other)
            .and_then(|mut line| {
                line.push(b'\n');
                let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
                file.write_all(&line)
            });
        if let Err(error) = result
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(path = %self.path.display(), %error, "cannot write the request log");
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis()
}
