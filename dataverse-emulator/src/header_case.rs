//! Response header names in the casing the real service writes (`OData-EntityId`, `ETag`, `Preference-Applied`),
//! not the lowercase hyper writes on HTTP/1 by default.
//!
//! HTTP header names are case-insensitive (RFC 9110 §5.1), but clients and scripts written against the real
//! service sometimes are not, and captured traffic is easier to compare when it looks the same.
//!
//! hyper (1.x) writes a response's header names as spelled in a `HeaderCaseMap` found in the response's
//! extensions, and lowercase without one (`proto/h1/role.rs`, `Server::encode`). That type is private: the only
//! public way to get one is to let hyper parse a message on a connection with `preserve_header_case(true)`, which
//! records the spellings it read in the parsed message's extensions (the documentation of
//! `server::conn::http1::Builder::preserve_header_case` calls this forwarding "in a proxy-like fashion"). So once
//! per process we hand hyper, over an in-memory pipe, a request whose header lines are spelled as the service
//! spells its response headers, keep the extensions it produced, and put a copy on every response. A spelling is
//! used once per value, so each name is listed [`VALUES_PER_NAME`] times; further values of one name, and names not
//! listed, are written lowercase as before. HTTP/2 is unaffected (its header names are lowercase by definition).

use std::convert::Infallible;
use std::sync::Mutex;

use axum::body::Body;
use axum::http::{Extensions, Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OnceCell, oneshot};

/// Response header names as the Web API spells them (documentation captures; `x-ms-*` and `REQ_ID` are written
/// that way by the service too).
const SPELLINGS: &[&str] = &[
    "OData-Version",
    "OData-EntityId",
    "Preference-Applied",
    "ETag",
    "Location",
    "Content-Type",
    "Retry-After",
    "WWW-Authenticate",
    "Cache-Control",
    "Allow",
    "Date",
    "REQ_ID",
    "x-ms-service-request-id",
    "x-ms-dop-hint",
    "x-ms-ratelimit-burst-remaining-xrm-requests",
    "x-ms-ratelimit-time-remaining-xrm-requests",
];

/// Spellings recorded per name: enough for every repeated header the emulator sends.
const VALUES_PER_NAME: usize = 4;

static TEMPLATE: OnceCell<Extensions> = OnceCell::const_new();

/// Extensions to add to every response (empty, with a warning logged, if hyper could not be taught the casing).
pub(crate) async fn extensions() -> Extensions {
    TEMPLATE
        .get_or_init(|| async {
            match learn().await {
                Ok(extensions) => extensions,
                Err(reason) => {
                    tracing::warn!(%reason, "response header names will be lowercase");
                    Extensions::new()
                }
            }
        })
        .await
        .clone()
}

/// Has hyper parse one request with the spellings, and returns the extensions it attached to it.
async fn learn() -> Result<Extensions, String> {
    let mut head = String::from("GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n");
    for name in SPELLINGS {
        for _ in 0..VALUES_PER_NAME {
            head.push_str(name);
            head.push_str(": x\r\n");
        }
    }
    head.push_str("Connection: close\r\n\r\n");

    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let (sender, received) = oneshot::channel();
    let sender = Mutex::new(Some(sender));
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let first = sender.lock().ok().and_then(|mut s| s.take());
        if let Some(sender) = first {
            // Err only if `learn` stopped waiting, which it does not before the connection ends.
            let _ = sender.send(request.extensions().clone());
        }
        async { Ok::<_, Infallible>(Response::new(Body::empty())) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .serve_connection(hyper_util::rt::TokioIo::new(server), service);
    let exchange = async move {
        client.write_all(head.as_bytes()).await?;
        // The response, until hyper closes the connection (`Connection: close`).
        let mut response = Vec::new();
        client.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let (served, exchanged) = tokio::join!(connection, exchange);
    served.map_err(|e| format!("hyper did not read the spelling request: {e}"))?;
    let response = exchanged.map_err(|e| format!("the in-memory exchange failed: {e}"))?;
    if !response.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "hyper answered the spelling request with {:?}",
            String::from_utf8_lossy(&response[..response.len().min(40)])
        ));
    }
    received
        .await
        .map_err(|_| "hyper did not pass the spelling request on".to_owned())
}
