//! A local Dataverse Web API emulator for tests, examples and offline development: a library (this crate) and a
//! command-line server (`dataverse-emulator --help`).
//!
//! It serves `/api/data/v9.2/` on 127.0.0.1 from in-memory tables: create, read, update, upsert (by primary or
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
//! Not emulated: `$metadata` documents, `$expand` (ignored on single reads, `501` on collections), `$orderby`,
//! deep insert, `$ref` association requests, plug-ins and duplicate detection rules, the execution-time limit.

mod auth;
mod batch;
mod bulk;
mod config;
mod limits;
mod multipart;
mod ops;
mod query;
mod reply;
mod routes;
mod tables;
mod tls;
mod url;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use serde_json::Value;

pub use config::{EmulatedTable, EmulatorConfig, MAX_ALTERNATE_KEYS};
pub use limits::{Faults, RequestCounts};

use auth::Auth;
use config::ErrorTemplate;
use limits::{Counters, InFlight, RequestLimit};
use tables::{Data, Schema};

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
    /// The configuration is inconsistent (duplicate tables, a lookup to an undeclared table, ...).
    #[error("invalid Dataverse emulator configuration: {0}")]
    Config(String),
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
    certificate_pem: Option<String>,
}

impl Emulator {
    /// Binds 127.0.0.1 (the configured port, or an ephemeral one) and starts serving on the current tokio
    /// runtime. Fails if the port is taken, the configuration is inconsistent, or TLS cannot be set up.
    pub async fn start(config: EmulatorConfig) -> Result<Emulator, EmulatorError> {
        let schema = Schema::new(&config.tables).map_err(EmulatorError::Config)?;
        let requested = SocketAddr::from(([127, 0, 0, 1], config.port));
        let bind_error = |source| EmulatorError::Bind {
            addr: requested.to_string(),
            source,
        };
        let listener = std::net::TcpListener::bind(requested).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let scheme = if config.tls { "https" } else { "http" };
        let base_url = format!("{scheme}://{addr}");
        let tls = if config.tls {
            Some(tls::self_signed().map_err(|reason| EmulatorError::Tls {
                addr: addr.to_string(),
                reason,
            })?)
        } else {
            None
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
        });
        let app = Router::new()
            .fallback(routes::handle)
            .with_state(shared.clone());
        let handle = axum_server::Handle::new();
        let (task, certificate_pem) = match tls {
            Some((pem, server_config)) => {
                let rustls = axum_server::tls_rustls::RustlsConfig::from_config(server_config);
                let server = axum_server::from_tcp_rustls(listener, rustls).handle(handle.clone());
                (
                    tokio::spawn(server.serve(app.into_make_service())),
                    Some(pem),
                )
            }
            None => {
                let server = axum_server::from_tcp(listener).handle(handle.clone());
                (tokio::spawn(server.serve(app.into_make_service())), None)
            }
        };
        tracing::info!(service_root = %shared.root, "Dataverse emulator listening");
        Ok(Emulator {
            shared,
            handle,
            task: Some(task),
            certificate_pem,
        })
    }

    /// `http://127.0.0.1:<port>` (`https` with TLS).
    pub fn base_url(&self) -> &str {
        &self.shared.base_url
    }

    /// The service root: `<base_url>/api/data/v9.2/`.
    pub fn service_root(&self) -> String {
        self.shared.root.clone()
    }

    /// The self-signed certificate (PEM) when serving TLS, to add as a trusted root in clients.
    pub fn certificate_pem(&self) -> Option<&str> {
        self.certificate_pem.as_deref()
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

impl Drop for Emulator {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
