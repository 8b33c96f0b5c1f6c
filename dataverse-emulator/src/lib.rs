//! A local Dataverse Web API emulator for tests, examples and offline development: a library (this crate) and a
//! command-line server (`dataverse-emulator --help`).
//!
//! It serves `/api/data/v9.2/` (on 127.0.0.1 unless told otherwise) from in-memory tables: create, read, update, upsert (by primary or
//! alternate key, with `If-Match` / `If-None-Match`), delete, lookups via `@odata.bind`, `$batch` with atomic
//! change sets, `CreateMultiple` / `UpdateMultiple` / `UpsertMultiple`, paging, change tracking, the metadata
//! the client probes, service protection limits, bearer tokens with an emulated token endpoint, optional TLS,
//! and fault injection. Where the real service's behaviour is undocumented the emulator's choice is marked
//! UNCONFIRMED and, for the error shapes a client depends on, configurable.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dataverse_emulator::EmulatorError> {
//! use dataverse_emulator::{Emulator, EmulatorConfig};
//! let emulator = Emulator::start(EmulatorConfig::default()).await?;
//! let root = emulator.service_root(); // http://127.0.0.1:<port>/api/data/v9.2/
//! # let _ = root;
//! emulator.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! Tables can also be defined, and rows seeded, from JSON ([`EmulatedTable::list_from_json`],
//! [`EmulatorConfig::seed_json`]); every request can be logged as a JSON line ([`EmulatorConfig::request_log`]).
//! Response header names are written in the service's casing (`OData-EntityId`, `ETag`), see `header_case.rs`.
//!
//! Not emulated: `$metadata` documents, `$expand` (ignored on single reads, `501` on collections), `$orderby`,
//! deep insert, `$ref` association requests, plug-ins and duplicate detection rules, the execution-time limit.

mod auth;
mod batch;
mod bulk;
mod config;
mod definitions;
mod header_case;
mod limits;
mod multipart;
mod ops;
mod query;
mod reply;
mod request_log;
mod routes;
mod tables;
mod tls;
mod url;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::http::Extensions;
use serde_json::Value;
use uuid::Uuid;

pub use config::{EmulatedTable, EmulatorConfig, MAX_ALTERNATE_KEYS};
pub use limits::{Faults, RequestCounts};

use auth::Auth;
use config::ErrorTemplate;
use limits::{Counters, InFlight, RequestLimit};
use ops::{Ctx, OpHeaders, OpRequest};
use request_log::RequestLog;
use tables::{Data, Schema};

/// The README's examples, compiled as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulatorError {
    /// The listening socket could not be bound.
    #[error("the Dataverse emulator cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The self-signed certificate or the TLS configuration could not be created.
    #[error("the Dataverse emulator cannot set up TLS on {addr}: {reason}")]
    Tls {
        /// The address being served.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The configuration is inconsistent (duplicate tables, a lookup to an undeclared table, ...) or a JSON
    /// definition could not be read.
    #[error("invalid Dataverse emulator configuration: {0}")]
    Config(String),
    /// A seed row was refused ([`EmulatorConfig::seed_row`]).
    #[error("the Dataverse emulator cannot seed row {row} of '{table}': {message}")]
    Seed {
        /// The table as named in the seed.
        table: String,
        /// The row's position among the seed rows of all tables, from 1.
        row: usize,
        /// Why (the Web API's error message for the create).
        message: String,
    },
    /// The request log could not be opened ([`EmulatorConfig::request_log`]).
    #[error("the Dataverse emulator cannot open its request log {}: {source}", path.display())]
    RequestLog {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for Ctrl-C failed ([`Emulator::serve_forever`]).
    #[error("the Dataverse emulator cannot wait for Ctrl-C: {0}")]
    Signal(#[source] std::io::Error),
}

/// State shared by all requests.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) schema: Schema,
    data: Mutex<Data>,
    pub(crate) counters: Counters,
    pub(crate) faults: Faults,
    pub(crate) in_flight: InFlight,
    pub(crate) concurrency_limit: Option<usize>,
    pub(crate) request_limit: Option<RequestLimit>,
    pub(crate) auth: Auth,
    pub(crate) dop_hint: String,
    /// `http://127.0.0.1:<port>`.
    pub(crate) base_url: String,
    /// `<base_url>/api/data/v9.2/`.
    pub(crate) root: String,
    pub(crate) lookup_missing: ErrorTemplate,
    pub(crate) key_missing: ErrorTemplate,
    pub(crate) duplicate_key: ErrorTemplate,
    /// Added to every response: how hyper should spell header names (see `header_case.rs`).
    pub(crate) header_case: Extensions,
    pub(crate) request_log: Option<RequestLog>,
}

impl Shared {
    /// The table state. Never held across an `.await`.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Data> {
        // A panic while holding the lock cannot leave a half-applied write visible to tests that matter more
        // than continuing; recover the data.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running emulator. Dropping it stops the server (it runs on the tokio runtime that called
/// [`start`](Self::start)).
#[derive(Debug)]
pub struct Emulator {
    shared: Arc<Shared>,
    handle: axum_server::Handle,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    instance: Uuid,
    certificate: Option<(String, String)>,
}

impl Emulator {
    /// Binds the configured address (127.0.0.1 and an ephemeral port by default), creates the seed rows, and starts
    /// serving on the current tokio runtime. Fails if the port is taken, the configuration is inconsistent, a seed
    /// row is refused, the request log cannot be opened, or TLS cannot be set up.
    pub async fn start(config: EmulatorConfig) -> Result<Emulator, EmulatorError> {
        let schema = Schema::new(&config.tables).map_err(EmulatorError::Config)?;
        let requested = SocketAddr::new(config.host, config.port);
        let bind_error = |source| EmulatorError::Bind {
            addr: requested.to_string(),
            source,
        };
        let listener = std::net::TcpListener::bind(requested).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let bound = listener.local_addr().map_err(bind_error)?;
        // An unspecified address (0.0.0.0, ::) listens everywhere; clients reach it on loopback.
        let addr = match bound.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bound.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), bound.port())
            }
            _ => bound,
        };
        let scheme = if config.tls { "https" } else { "http" };
        let base_url = format!("{scheme}://{addr}");
        let instance = Uuid::new_v4();
        let tls = if config.tls {
            let mut names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
            for ip in [addr.ip(), bound.ip()] {
                if !names.contains(&ip.to_string()) {
                    names.push(ip.to_string());
                }
            }
            Some(
                tls::self_signed(names, instance).map_err(|reason| EmulatorError::Tls {
                    addr: addr.to_string(),
                    reason,
                })?,
            )
        } else {
            None
        };
        let request_log = match &config.request_log {
            None => None,
            Some(path) => {
                Some(
                    RequestLog::open(path).map_err(|source| EmulatorError::RequestLog {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
        };
        let data = Data::new(&schema);
        let shared = Arc::new(Shared {
            schema,
            data: Mutex::new(data),
            counters: Counters::default(),
            faults: Faults::default(),
            in_flight: InFlight::default(),
            concurrency_limit: config.concurrency_limit,
            request_limit: config
                .request_limit
                .map(|(max, window)| RequestLimit::new(max, window)),
            auth: Auth::new(&config),
            dop_hint: config.dop_hint.to_string(),
            root: format!("{base_url}{}", ops::ROOT_PATH),
            base_url,
            lookup_missing: config.lookup_missing.clone(),
            key_missing: config.key_missing.clone(),
            duplicate_key: config.duplicate_key.clone(),
            header_case: header_case::extensions().await,
            request_log,
        });
        seed(&shared, &config.seed)?;
        let app = Router::new()
            .fallback(routes::handle)
            .with_state(shared.clone());
        let handle = axum_server::Handle::new();
        let (task, certificate) = match tls {
            Some(generated) => {
                let rustls = axum_server::tls_rustls::RustlsConfig::from_config(generated.config);
                let server = axum_server::from_tcp_rustls(listener, rustls).handle(handle.clone());
                (
                    tokio::spawn(server.serve(app.into_make_service())),
                    Some((generated.pem, generated.subject)),
                )
            }
            None => {
                let server = axum_server::from_tcp(listener).handle(handle.clone());
                (tokio::spawn(server.serve(app.into_make_service())), None)
            }
        };
        tracing::info!(service_root = %shared.root, %instance, "Dataverse emulator listening");
        Ok(Emulator {
            shared,
            handle,
            task: Some(task),
            instance,
            certificate,
        })
    }

    /// `http://127.0.0.1:<port>` (`https` with TLS; another address with [`EmulatorConfig::host`]).
    pub fn base_url(&self) -> &str {
        &self.shared.base_url
    }

    /// The service root: `<base_url>/api/data/v9.2/`.
    pub fn service_root(&self) -> String {
        self.shared.root.clone()
    }

    /// The self-signed certificate (PEM) when serving TLS, to add as a trusted root in clients. Each instance
    /// generates its own.
    pub fn certificate_pem(&self) -> Option<&str> {
        self.certificate.as_ref().map(|(pem, _)| pem.as_str())
    }

    /// The subject of [`certificate_pem`](Self::certificate_pem) (`CN=Dataverse emulator <instance id>,
    /// O=dataverse-emulator`), distinct per instance, as is the certificate's serial number.
    pub fn certificate_subject(&self) -> Option<&str> {
        self.certificate
            .as_ref()
            .map(|(_, subject)| subject.as_str())
    }

    /// This instance's random id (also in its certificate's subject and serial number).
    pub fn instance_id(&self) -> Uuid {
        self.instance
    }

    /// What the emulator received so far.
    pub fn counts(&self) -> RequestCounts {
        self.shared
            .counters
            .snapshot(self.shared.in_flight.current())
    }

    /// Sets every count to zero.
    pub fn reset_counts(&self) {
        self.shared.counters.reset();
    }

    /// The live fault switches.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Stops accepting connections, lets requests in flight finish (up to 5 s), and waits for the server to end.
    pub async fn shutdown(mut self) {
        self.handle.graceful_shutdown(Some(Duration::from_secs(5)));
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the Dataverse emulator stopped with an error")
                }
                Err(e) => tracing::warn!(error = %e, "the Dataverse emulator task failed"),
            }
        }
    }

    /// Starts an emulator and serves until Ctrl-C, then shuts it down.
    pub async fn serve_forever(config: EmulatorConfig) -> Result<(), EmulatorError> {
        let emulator = Emulator::start(config).await?;
        let waited = tokio::signal::ctrl_c().await;
        emulator.shutdown().await;
        waited.map_err(EmulatorError::Signal)
    }

    /// Number of rows in a table (0 for an unknown table).
    pub fn row_count(&self, logical_name: &str) -> usize {
        let Some(table) = self.shared.schema.by_logical(logical_name) else {
            return 0;
        };
        self.shared.lock().tables[table].rows.len()
    }

    /// The rows of a table as the API returns them without `$select` (`@odata.etag`, all stored columns,
    /// `_<lookup>_value` GUIDs, `versionnumber`), ordered by primary key. Empty for an unknown table.
    pub fn rows(&self, logical_name: &str) -> Vec<Value> {
        let Some(table) = self.shared.schema.by_logical(logical_name) else {
            return Vec::new();
        };
        let def = &self.shared.schema.tables[table];
        let data = self.shared.lock();
        let mut ids: Vec<_> = data.tables[table].rows.keys().copied().collect();
        ids.sort_unstable();
        ids.iter()
            .filter_map(|id| {
                let row = data.tables[table].rows.get(id)?;
                Some(Value::Object(ops::representation(def, id, row, None)))
            })
            .collect()
    }
}

/// Creates the seed rows, each as a Web API create would.
fn seed(shared: &Shared, rows: &[(String, Value)]) -> Result<(), EmulatorError> {
    let mut data = shared.lock();
    for (index, (table, row)) in rows.iter().enumerate() {
        let refused = |message: String| EmulatorError::Seed {
            table: table.clone(),
            row: index + 1,
            message,
        };
        let schema = &shared.schema;
        let set = schema
            .by_logical(table)
            .or_else(|| schema.by_set(table))
            .map(|t| schema.tables[t].set.as_str())
            .ok_or_else(|| {
                refused("no such table (neither a logical name nor an entity set)".to_owned())
            })?;
        if !row.is_object() {
            return Err(refused("a row must be a JSON object".to_owned()));
        }
        let body = serde_json::to_vec(row).map_err(|e| refused(e.to_string()))?;
        let request = OpRequest {
            method: "POST",
            path: set,
            query: None,
            headers: OpHeaders::default(),
            body: &body,
        };
        let outcome = ops::dispatch(shared, &mut data, &request, &Ctx::default());
        if !outcome.reply.is_success() {
            let message = serde_json::from_slice::<Value>(&outcome.reply.body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("HTTP {}", outcome.reply.status));
            return Err(refused(message));
        }
    }
    Ok(())
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
