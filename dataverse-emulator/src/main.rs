//! `dataverse-emulator`: a Dataverse Web API emulator as a local server, until Ctrl-C, SIGTERM, or a stop condition
//! of its own (`--exit-after`, `--exit-on-stdin-close`).
//!
//! On start it prints the service root (`http://127.0.0.1:<port>/api/data/v9.2/`) as the first line on standard
//! output, then, with `--tls`, `certificate: <path>` and `certificate-subject: <subject>`; everything else goes to
//! standard error. `dataverse-emulator --help` lists the options.

use std::convert::Infallible;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use dataverse_emulator::{EmulatedTable, Emulator, EmulatorConfig, Faults};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A local Dataverse Web API emulator (service root /api/data/v9.2/) for tests, demos and offline development.
///
/// Serves the built-in tables `account` and `contact` (or those of --tables) from memory, with the Web API's
/// create, read, update, upsert, delete, $batch, CreateMultiple/UpdateMultiple/UpsertMultiple, change tracking,
/// service protection limits and error codes. Prints the service root as the first line on standard output.
#[derive(Debug, Parser)]
#[command(name = "dataverse-emulator", version, about, long_about)]
struct Cli {
    /// The IP address to listen on. The default accepts connections from this machine only; 0.0.0.0 or :: listen
    /// on every interface (the printed URL then names the loopback address).
    #[arg(
        long,
        value_name = "IP",
        default_value = "127.0.0.1",
        help_heading = "Network"
    )]
    host: IpAddr,

    /// The port to listen on; 0 picks a free one (read the printed URL to learn which).
    #[arg(
        long,
        value_name = "PORT",
        default_value_t = 8080,
        help_heading = "Network"
    )]
    port: u16,

    /// Serve https with a self-signed certificate generated for this instance (its own subject and serial
    /// number), for 127.0.0.1, localhost and --host. Its PEM file's path is printed (`certificate: <path>`); give
    /// it to clients as a trusted root, e.g. `curl --cacert <path>`.
    #[arg(long, help_heading = "Network")]
    tls: bool,

    /// With --tls: where to write the certificate (PEM), kept on exit. Default: the system's temporary
    /// directory, dataverse-emulator-<instance id>.pem, removed on exit.
    #[arg(long, value_name = "FILE", requires = "tls", help_heading = "Network")]
    cert_out: Option<PathBuf>,

    /// Table definitions (JSON), replacing the built-in account and contact tables. An array of objects:
    /// {"logical_name": "new_order", "entity_set": "new_orders", "primary_id": "new_orderid",
    /// "primary_name": "new_name", "alternate_keys": [["new_number"]], "lookups": [{"navigation_property":
    /// "new_customer_account", "column": "new_customer", "target": "account"}], "columns": ["new_amount"],
    /// "bulk_supported": true}. Only logical_name is required (entity_set defaults to <logical_name>s,
    /// primary_id to <logical_name>id, primary_name to name; without columns any property is stored).
    #[arg(long, value_name = "FILE", help_heading = "Data")]
    tables: Option<PathBuf>,

    /// Rows to create at start (JSON), in file order: [{"table": "account", "rows": [{"name": "Fabrikam",
    /// "accountnumber": "A-1"}]}, {"table": "contacts", "rows": [{"fullname": "Ada",
    /// "parentcustomerid_account@odata.bind": "/accounts(accountnumber='A-1')"}]}]. "table" is a logical name or
    /// an entity set; each row is a Web API create body (set the primary key column to choose the GUID).
    #[arg(long, value_name = "FILE", help_heading = "Data")]
    seed: Option<PathBuf>,

    /// Require `Authorization: Bearer <TOKEN>` on Web API requests (else 401).
    #[arg(long, value_name = "TOKEN", help_heading = "Authentication")]
    token: Option<String>,

    /// Enable the token endpoint POST /<tenant>/oauth2/v2.0/token for this client (client credentials grant)
    /// and require its tokens on Web API requests. Needs --client-secret.
    #[arg(
        long,
        value_name = "ID",
        requires = "client_secret",
        help_heading = "Authentication"
    )]
    client_id: Option<String>,

    /// The secret of --client-id.
    #[arg(
        long,
        value_name = "SECRET",
        requires = "client_id",
        help_heading = "Authentication"
    )]
    client_secret: Option<String>,

    /// The tenant in the token endpoint's path, with --client-id.
    #[arg(
        long,
        value_name = "TENANT",
        default_value = "emulator",
        requires = "client_id",
        help_heading = "Authentication"
    )]
    tenant: String,

    /// The scope the token endpoint accepts, with --client-id. Default: <base URL>/.default, what a client
    /// derives from the emulator's address.
    #[arg(
        long,
        value_name = "SCOPE",
        requires = "client_id",
        help_heading = "Authentication"
    )]
    scope: Option<String>,

    /// Lifetime of issued tokens (expires_in); expired tokens get 401.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 3599,
        help_heading = "Authentication"
    )]
    token_lifetime: u64,

    /// Service protection: at most N requests per --rate-window; more get 429 with code 0x80072322 and a
    /// Retry-After of the seconds until the window frees.
    #[arg(long, value_name = "N", help_heading = "Throttling")]
    rate_limit: Option<u32>,

    /// The sliding window of --rate-limit.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 300,
        requires = "rate_limit",
        help_heading = "Throttling"
    )]
    rate_window: u64,

    /// Service protection: a request arriving while N are being served gets 429 with code 0x80072326.
    #[arg(long, value_name = "N", help_heading = "Throttling")]
    concurrency_limit: Option<usize>,

    /// The Retry-After sent with 429s of the concurrency limit and of injected faults (--fail-status 429).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 1,
        help_heading = "Throttling"
    )]
    retry_after: u64,

    /// The x-ms-dop-hint header sent on every response (the parallelism the service suggests).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 4,
        help_heading = "Throttling"
    )]
    dop_hint: u32,

    /// Add this much latency to every Web API request (the request counts as in flight meanwhile).
    #[arg(long, value_name = "MS", default_value_t = 0, help_heading = "Faults")]
    latency_ms: u64,

    /// Answer this fraction (0 to 1) of Web API requests with --fail-status, drawn from a sequence seeded by
    /// --fail-seed (reproducible for the same request order).
    #[arg(long, value_name = "FRACTION", value_parser = fraction, help_heading = "Faults")]
    fail_rate: Option<f64>,

    /// The seed of --fail-rate.
    #[arg(long, value_name = "N", default_value_t = 0, help_heading = "Faults")]
    fail_seed: u64,

    /// Answer the first N Web API requests with --fail-status.
    #[arg(long, value_name = "N", help_heading = "Faults")]
    fail_first: Option<u32>,

    /// The status of --fail-rate and --fail-first: 503 (unavailable), 429 (throttled, with --retry-after), 500...
    #[arg(long, value_name = "STATUS", default_value_t = 503, value_parser = clap::value_parser!(u16).range(400..600), help_heading = "Faults")]
    fail_status: u16,

    /// An outage window: every Web API request gets 503 from START to START+DURATION seconds after the emulator
    /// starts, e.g. `--outage 10+5`. Repeat for several windows.
    #[arg(long, value_name = "START+DURATION", value_parser = outage, help_heading = "Faults")]
    outage: Vec<(Duration, Duration)>,

    /// The error for a lookup bound by GUID to a missing row, as STATUS:CODE:MESSAGE; the message may use
    /// {table} and {id}. Default 404:0x80040217:Entity '{table}' With Id = {id} Does Not Exist.
    #[arg(long, value_name = "STATUS:CODE:MESSAGE", value_parser = error_shape, help_heading = "Error shapes (unconfirmed on the real service)")]
    lookup_missing_error: Option<ErrorShape>,

    /// The error for a row or lookup addressed by an alternate key that matches nothing, as
    /// STATUS:CODE:MESSAGE ({table}). Default 404:0x80060891:A record with the specified key values does not
    /// exist in {table} entity.
    #[arg(long, value_name = "STATUS:CODE:MESSAGE", value_parser = error_shape, help_heading = "Error shapes (unconfirmed on the real service)")]
    key_missing_error: Option<ErrorShape>,

    /// The error for a write that would duplicate an alternate key, as STATUS:CODE:MESSAGE ({key}, {columns},
    /// {table}). Default 412:0x80060892:Entity Key {key} violated. ...
    #[arg(long, value_name = "STATUS:CODE:MESSAGE", value_parser = error_shape, help_heading = "Error shapes (unconfirmed on the real service)")]
    duplicate_key_error: Option<ErrorShape>,

    /// Append one JSON line per HTTP request to FILE: time_unix_ms, method, target, status, duration_ms,
    /// service_request_id, and the client's client_request_id / correlation_request_id when sent.
    #[arg(long, value_name = "FILE", help_heading = "Logging")]
    request_log: Option<PathBuf>,

    /// Stop after this many seconds (so a server started by a CI job cannot outlive it).
    #[arg(long, value_name = "SECONDS", help_heading = "Lifetime")]
    exit_after: Option<u64>,

    /// Stop when standard input reaches its end (e.g. when the process that started us closes the pipe or dies).
    #[arg(long, help_heading = "Lifetime")]
    exit_on_stdin_close: bool,
}

/// (status, code, message template).
#[derive(Clone, Debug)]
struct ErrorShape(u16, String, String);

fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("'{text}' is not a number from 0 to 1")),
    }
}

fn outage(text: &str) -> Result<(Duration, Duration), String> {
    let usage = || format!("'{text}' is not START+DURATION in seconds, e.g. 10+5");
    let (start, length) = text.split_once('+').ok_or_else(usage)?;
    let seconds = |s: &str| {
        s.trim()
            .parse::<f64>()
            .ok()
            .and_then(|f| Duration::try_from_secs_f64(f).ok())
    };
    match (seconds(start), seconds(length)) {
        (Some(start), Some(length)) => Ok((start, length)),
        _ => Err(usage()),
    }
}

fn error_shape(text: &str) -> Result<ErrorShape, String> {
    let mut parts = text.splitn(3, ':');
    let (Some(status), Some(code), Some(message)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("'{text}' is not STATUS:CODE:MESSAGE"));
    };
    match status.parse::<u16>() {
        Ok(status) if (400..600).contains(&status) => {
            Ok(ErrorShape(status, code.to_owned(), message.to_owned()))
        }
        _ => Err(format!("'{status}' is not an error status (400 to 599)")),
    }
}

fn read(path: &Path, option: &str) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the {option} file {}: {e}", path.display()))
}

impl Cli {
    fn config(&self) -> Result<EmulatorConfig, String> {
        let mut config = match &self.tables {
            Some(path) => EmulatedTable::list_from_json(&read(path, "--tables")?)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .into_iter()
                .fold(EmulatorConfig::new(), EmulatorConfig::table),
            None => EmulatorConfig::default(),
        }
        .host(self.host)
        .port(self.port)
        .tls(self.tls)
        .dop_hint(self.dop_hint)
        .token_lifetime(Duration::from_secs(self.token_lifetime));
        if let Some(path) = &self.seed {
            config = config
                .seed_json(&read(path, "--seed")?)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        if let Some(token) = &self.token {
            config = config.require_token(token);
        }
        if let (Some(id), Some(secret)) = (&self.client_id, &self.client_secret) {
            let scope = self.scope.as_deref().unwrap_or_default();
            config = config.client_credentials(&self.tenant, id, secret, scope);
        }
        if let Some(max) = self.rate_limit {
            config = config.request_limit(max, Duration::from_secs(self.rate_window));
        }
        if let Some(max) = self.concurrency_limit {
            config = config.concurrency_limit(max);
        }
        if let Some(ErrorShape(status, code, message)) = &self.lookup_missing_error {
            config = config.lookup_missing_error(*status, code, message);
        }
        if let Some(ErrorShape(status, code, message)) = &self.key_missing_error {
            config = config.key_missing_error(*status, code, message);
        }
        if let Some(ErrorShape(status, code, message)) = &self.duplicate_key_error {
            config = config.duplicate_key_error(*status, code, message);
        }
        if let Some(path) = &self.request_log {
            config = config.request_log(path);
        }
        Ok(config)
    }

    /// The faults that apply from the start.
    fn arm(&self, faults: &Faults) {
        faults.set_retry_after(self.retry_after);
        faults.set_latency(Duration::from_millis(self.latency_ms));
        if let Some(rate) = self.fail_rate {
            faults.fail_rate_with(rate, self.fail_seed, self.fail_status);
        }
        if let Some(n) = self.fail_first {
            faults.fail_next(n, self.fail_status);
        }
    }
}

/// Outage windows merged where they overlap, in order.
fn merged(windows: &[(Duration, Duration)]) -> Vec<(Duration, Duration)> {
    let mut spans: Vec<(Duration, Duration)> = windows
        .iter()
        .map(|&(start, length)| (start, start.saturating_add(length)))
        .collect();
    spans.sort();
    let mut out: Vec<(Duration, Duration)> = Vec::new();
    for (start, end) in spans {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// Ctrl-C and SIGTERM, listened for from creation on: the handlers are installed before the URL is printed, so a
/// signal sent by whoever read it cannot find the process without them.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn install() -> Result<Signals, String> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen =
            |kind, name| signal(kind).map_err(|e| format!("cannot listen for {name}: {e}"));
        Ok(Signals {
            interrupt: listen(SignalKind::interrupt(), "Ctrl-C")?,
            terminate: listen(SignalKind::terminate(), "SIGTERM")?,
        })
    }

    #[cfg(not(unix))]
    fn install() -> Result<Signals, String> {
        Ok(Signals {})
    }

    /// The first signal to arrive.
    #[cfg(unix)]
    async fn received(&mut self) -> Result<&'static str, String> {
        tokio::select! {
            _ = self.interrupt.recv() => Ok("Ctrl-C"),
            _ = self.terminate.recv() => Ok("SIGTERM"),
        }
    }

    #[cfg(not(unix))]
    async fn received(&mut self) -> Result<&'static str, String> {
        tokio::signal::ctrl_c()
            .await
            .map_err(|e| format!("cannot wait for Ctrl-C: {e}"))?;
        Ok("Ctrl-C")
    }
}

/// Waits for whichever stop condition comes first, and says which.
async fn stopped(cli: &Cli, signals: &mut Signals) -> Result<&'static str, String> {
    let exit_after = async {
        match cli.exit_after {
            Some(seconds) => tokio::time::sleep(Duration::from_secs(seconds)).await,
            None => std::future::pending().await,
        }
    };
    let stdin_closed = async {
        if !cli.exit_on_stdin_close {
            return std::future::pending().await;
        }
        // A plain thread: a blocking read cannot be cancelled, and this thread must not keep the process alive
        // (tokio's stdin would make runtime shutdown wait for it).
        let (closed, on_close) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buffer = [0u8; 4096];
            while let Ok(n) = std::io::stdin().read(&mut buffer) {
                if n == 0 {
                    break;
                }
            }
            let _ = closed.send(());
        });
        let _ = on_close.await;
    };
    tokio::select! {
        signal = signals.received() => signal,
        () = exit_after => Ok("--exit-after"),
        () = stdin_closed => Ok("the end of standard input"),
    }
}

/// Writes the certificate where asked, or in the temporary directory.
fn write_certificate(cli: &Cli, emulator: &Emulator, pem: &str) -> Result<PathBuf, String> {
    let path = cli.cert_out.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("dataverse-emulator-{}.pem", emulator.instance_id()))
    });
    std::fs::write(&path, pem)
        .map_err(|e| format!("cannot write the certificate to {}: {e}", path.display()))?;
    Ok(path)
}

async fn run(cli: Cli) -> Result<(), String> {
    let config = cli.config()?;
    let mut signals = Signals::install()?;
    let emulator = Emulator::start(config).await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    cli.arm(emulator.faults());
    println!("{}", emulator.service_root());
    // A certificate written to the temporary directory is removed on exit; one written to --cert-out is kept.
    let mut temporary_certificate = None;
    if let Some(pem) = emulator.certificate_pem() {
        let path = match write_certificate(&cli, &emulator, pem) {
            Ok(path) => path,
            Err(e) => {
                emulator.shutdown().await;
                return Err(e);
            }
        };
        if cli.cert_out.is_none() {
            temporary_certificate = Some(path.clone());
        }
        println!("certificate: {}", path.display());
        println!(
            "certificate-subject: {}",
            emulator.certificate_subject().unwrap_or_default()
        );
    }
    eprintln!("Dataverse emulator serving; Ctrl-C or SIGTERM stops it.");

    let outages = merged(&cli.outage);
    let windows = async {
        for (start, end) in outages {
            // A start too far in the future to represent never comes.
            let Some(at) = started.checked_add(start) else {
                break;
            };
            tokio::time::sleep_until(at).await;
            emulator.faults().outage_for(end - start);
        }
        std::future::pending::<Infallible>().await
    };
    let reason = tokio::select! {
        reason = stopped(&cli, &mut signals) => reason,
        never = windows => match never {},
    };
    emulator.shutdown().await;
    if let Some(path) = temporary_certificate
        && let Err(e) = std::fs::remove_file(&path)
    {
        eprintln!("cannot remove the certificate {}: {e}", path.display());
    }
    let reason = reason?;
    eprintln!("Dataverse emulator stopped ({reason}).");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("dataverse-emulator: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn outage_windows_merge_where_they_overlap() {
        let s = Duration::from_secs;
        assert_eq!(
            merged(&[(s(10), s(5)), (s(0), s(2)), (s(12), s(10)), (s(30), s(1))]),
            [(s(0), s(2)), (s(10), s(22)), (s(30), s(31))]
        );
        assert_eq!(outage("10+5"), Ok((s(10), s(5))));
        assert!(outage("10").is_err());
        assert!(outage("-1+5").is_err());
    }

    #[test]
    fn value_parsers_say_what_is_wrong() {
        assert!(fraction("1.5").unwrap_err().contains("0 to 1"));
        assert_eq!(fraction("0.25"), Ok(0.25));
        let shape = error_shape("404:0x1:No {table}: here").expect("valid");
        assert_eq!(
            (shape.0, shape.1.as_str(), shape.2.as_str()),
            (404, "0x1", "No {table}: here")
        );
        assert!(error_shape("200:x:y").unwrap_err().contains("error status"));
        assert!(error_shape("404:x").is_err());
    }
}
