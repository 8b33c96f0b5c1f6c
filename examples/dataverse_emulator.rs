//! A standalone Dataverse Web API emulator on 127.0.0.1, serving `accounts` and `contacts` until Ctrl-C.
//!
//! ```text
//! cargo run --example dataverse_emulator --features emulator -- --port 8080 [--tls] [--token <t>] [--dop-hint <n>]
//! ```
//!
//! With `--tls` the self-signed certificate is written next to the system's temp files and its path printed, so
//! a client can trust it (`curl --cacert <path>`). With `--token` requests need `Authorization: Bearer <t>`.

use std::process::ExitCode;

use eventual_upsert::emulator::{Emulator, EmulatorConfig};

const USAGE: &str =
    "usage: dataverse_emulator [--port <port>] [--tls] [--token <token>] [--dop-hint <n>]";

fn parse_args() -> Result<EmulatorConfig, String> {
    let mut config = EmulatorConfig::default().port(8080);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        config = match arg.as_str() {
            "--port" => {
                let port = value("--port")?;
                config.port(
                    port.parse()
                        .map_err(|_| format!("--port: '{port}' is not a port number"))?,
                )
            }
            "--tls" => config.tls(true),
            "--token" => config.require_token(&value("--token")?),
            "--dop-hint" => {
                let n = value("--dop-hint")?;
                config.dop_hint(
                    n.parse()
                        .map_err(|_| format!("--dop-hint: '{n}' is not a number"))?,
                )
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument '{other}'\n{USAGE}")),
        };
    }
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match parse_args() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let emulator = match Emulator::start(config).await {
        Ok(emulator) => emulator,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    println!("Dataverse emulator: {}", emulator.service_root());
    if let Some(pem) = emulator.certificate_pem() {
        let port = emulator.base_url().rsplit(':').next().unwrap_or("0");
        let path = std::env::temp_dir().join(format!("dataverse-emulator-{port}.pem"));
        match std::fs::write(&path, pem) {
            Ok(()) => println!("TLS certificate: {}", path.display()),
            Err(e) => eprintln!("cannot write the certificate to {}: {e}", path.display()),
        }
    }
    println!("Press Ctrl-C to stop.");
    let stopped = tokio::signal::ctrl_c().await;
    emulator.shutdown().await;
    match stopped {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot wait for Ctrl-C: {e}");
            ExitCode::FAILURE
        }
    }
}
