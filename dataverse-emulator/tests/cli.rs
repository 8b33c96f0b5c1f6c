//! The `dataverse-emulator` binary, run as a separate process: what it prints, what it serves, how it stops.
//! Synchronisation is by reading its output (the URL line it prints once it listens) and waiting for its exit,
//! never by sleeping.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};

const BINARY: &str = env!("CARGO_BIN_EXE_dataverse-emulator");

/// A running emulator process, killed if the test ends before it does.
struct Server {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// The first line it printed: the service root.
    root: String,
}

impl Server {
    /// Starts the binary with `--port 0 --exit-on-stdin-close` and `args`, and reads the URL it prints.
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(BINARY)
            .args(["--port", "0", "--exit-on-stdin-close"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut root = String::new();
        stdout.read_line(&mut root).expect("reads stdout");
        if root.is_empty() {
            let mut stderr = String::new();
            let _ = child
                .stderr
                .take()
                .map(|mut e| e.read_to_string(&mut stderr));
            panic!("the emulator printed no URL; stderr: {stderr}");
        }
        Server {
            child,
            stdout,
            root: root.trim_end().to_owned(),
        }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("reads stdout");
        line.trim_end().to_owned()
    }

    /// `host:port` of the service root.
    fn authority(&self) -> &str {
        let rest = self.root.split_once("://").map_or("", |(_, rest)| rest);
        rest.split('/').next().unwrap_or_default()
    }

    /// Closes its standard input and waits for it to exit; returns the status and what it wrote on stderr.
    fn stop(mut self) -> (ExitStatus, String) {
        drop(self.child.stdin.take());
        let status = self.child.wait().expect("waits");
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut stderr).expect("reads stderr");
        }
        (status, stderr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request; the response's head and body.
fn http(authority: &str, method: &str, path: &str, body: &str) -> (String, String) {
    let mut stream = TcpStream::connect(authority).expect("connects");
    write!(
        stream,
        "{method} /api/data/v9.2/{path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("sends");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("reads");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    (head.to_owned(), body.to_owned())
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dataverse-emulator-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn run(args: &[&str]) -> (ExitStatus, String, String) {
    let output = Command::new(BINARY).args(args).output().expect("runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn help_explains_every_option() {
    let (status, help, _) = run(&["--help"]);
    assert!(status.success());
    for option in [
        "--host",
        "--port",
        "--tls",
        "--cert-out",
        "--tables",
        "--seed",
        "--token",
        "--client-id",
        "--client-secret",
        "--tenant",
        "--scope",
        "--token-lifetime",
        "--rate-limit",
        "--rate-window",
        "--concurrency-limit",
        "--retry-after",
        "--dop-hint",
        "--latency-ms",
        "--fail-rate",
        "--fail-seed",
        "--fail-first",
        "--fail-status",
        "--outage",
        "--lookup-missing-error",
        "--key-missing-error",
        "--duplicate-key-error",
        "--request-log",
        "--exit-after",
        "--exit-on-stdin-close",
    ] {
        // Each option's line is followed by its explanation on the next line (long help).
        let mut lines = help.lines().skip_while(|l| {
            !l.trim_start()
                .strip_prefix(option)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        });
        assert!(lines.next().is_some(), "{option} is not in --help:\n{help}");
        let explanation = lines.next().unwrap_or_default().trim();
        assert!(
            explanation.len() > 10,
            "{option} has no explanation: {explanation:?}"
        );
    }
}

#[test]
fn serves_on_an_ephemeral_loopback_port_and_stops_when_stdin_closes() {
    let server = Server::start(&[]);
    assert!(
        server.root.starts_with("http://127.0.0.1:") && server.root.ends_with("/api/data/v9.2/"),
        "{}",
        server.root
    );
    let (head, body) = http(server.authority(), "GET", "WhoAmI", "");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("\r\nOData-Version: 4.0"), "{head}");
    assert!(body.contains("\"UserId\""), "{body}");
    let (status, stderr) = server.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains("stopped (the end of standard input)"),
        "{stderr}"
    );
}

#[cfg(unix)]
#[test]
fn stops_cleanly_on_sigterm() {
    let server = Server::start(&[]);
    let pid = server.child.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let (status, stderr) = server.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(stderr.contains("stopped (SIGTERM)"), "{stderr}");
}

#[test]
fn exit_after_stops_it_by_itself() {
    let (status, stdout, stderr) = run(&["--port", "0", "--exit-after", "1"]);
    assert!(status.success(), "{status}: {stderr}");
    assert!(stdout.starts_with("http://127.0.0.1:"), "{stdout}");
    assert!(stderr.contains("stopped (--exit-after)"), "{stderr}");
}

#[test]
fn seeds_tables_logs_requests_and_injects_faults() {
    let dir = temp_dir();
    let tables = dir.join("tables.json");
    std::fs::write(
        &tables,
        r#"[{"logical_name": "account", "entity_set": "accounts", "primary_id": "accountid",
             "alternate_keys": [["accountnumber"]]},
            {"logical_name": "new_order", "alternate_keys": [["new_number"]],
             "lookups": [{"navigation_property": "new_account", "column": "new_accountid", "target": "account"}]}]"#,
    )
    .expect("writes");
    let seed = dir.join("seed.json");
    std::fs::write(
        &seed,
        r#"[{"table": "accounts", "rows": [{"name": "Fabrikam", "accountnumber": "A-1"}]},
            {"table": "new_order", "rows": [{"new_number": "N-1",
                                             "new_account@odata.bind": "accounts(accountnumber='A-1')"}]}]"#,
    )
    .expect("writes");
    let log = dir.join("requests.jsonl");
    let server = Server::start(&[
        "--tables",
        path(&tables),
        "--seed",
        path(&seed),
        "--request-log",
        path(&log),
        "--fail-first",
        "1",
        "--fail-status",
        "429",
        "--retry-after",
        "9",
    ]);
    let (head, _) = http(server.authority(), "GET", "new_orders", "");
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(head.contains("\r\nRetry-After: 9"), "{head}");
    let (head, body) = http(
        server.authority(),
        "GET",
        "new_orders(new_number='N-1')",
        "",
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("\"_new_accountid_value\""), "{body}");
    let (head, _) = http(server.authority(), "GET", "contacts", "");
    assert!(
        head.starts_with("HTTP/1.1 404"),
        "the built-in tables are replaced: {head}"
    );
    let (status, stderr) = server.stop();
    assert!(status.success(), "{stderr}");

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .expect("the log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let statuses: Vec<_> = lines.iter().map(|l| l["status"].as_u64()).collect();
    assert_eq!(statuses, [Some(429), Some(200), Some(404)]);
    assert_eq!(
        lines[1]["target"],
        "/api/data/v9.2/new_orders(new_number='N-1')"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn two_tls_instances_present_distinct_certificates() {
    let mut servers = [Server::start(&["--tls"]), Server::start(&["--tls"])];
    let mut seen = Vec::new();
    for server in &mut servers {
        assert!(
            server.root.starts_with("https://127.0.0.1:"),
            "{}",
            server.root
        );
        let path = server
            .line()
            .strip_prefix("certificate: ")
            .map(PathBuf::from)
            .expect("a path");
        let subject = server.line();
        let subject = subject
            .strip_prefix("certificate-subject: ")
            .expect("a subject")
            .to_owned();
        let der = der_of(&std::fs::read_to_string(&path).expect("the PEM file"));
        // The printed subject is the certificate's: its common name is in the DER.
        let common_name = subject
            .strip_prefix("CN=")
            .and_then(|s| s.split(", ").next())
            .expect("a CN");
        assert!(
            contains(&der, common_name.as_bytes()),
            "{subject} not in the certificate"
        );
        seen.push((path, subject, der));
    }
    assert_ne!(seen[0].1, seen[1].1, "subjects");
    assert_ne!(seen[0].2, seen[1].2, "certificates");
    for (server, (path, _, _)) in servers.into_iter().zip(&seen) {
        let (status, stderr) = server.stop();
        assert!(status.success(), "{stderr}");
        assert!(
            !path.exists(),
            "the temporary certificate is removed on exit"
        );
    }
}

#[test]
fn mistakes_are_clear_messages_not_panics() {
    let (status, _, stderr) = run(&["--port", "0", "--seed", "/no/such/seed.json"]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("cannot read the --seed file /no/such/seed.json"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let (status, _, stderr) = run(&["--port", "seventy"]);
    assert_eq!(status.code(), Some(2), "a usage error");
    assert!(stderr.contains("--port"), "{stderr}");

    let (status, _, stderr) = run(&["--fail-rate", "2"]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("0 to 1"), "{stderr}");

    let dir = temp_dir();
    let tables = dir.join("tables.json");
    std::fs::write(&tables, r#"[{"logical_name": "a", "entityset": "as"}]"#).expect("writes");
    let (status, _, stderr) = run(&["--port", "0", "--tables", path(&tables)]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("unknown field `entityset`"), "{stderr}");
    std::fs::remove_dir_all(&dir).expect("cleanup");

    let server = Server::start(&[]);
    let port = server
        .authority()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let (status, _, stderr) = run(&["--port", &port]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("cannot listen on 127.0.0.1:"), "{stderr}");
    drop(server);
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temp path")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The DER bytes of a one-certificate PEM (standard base64 between the armour lines).
fn der_of(pem: &str) -> Vec<u8> {
    let text: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    let (mut bits, mut count) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        bits = (bits << 6) | u32::from(value(c));
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    out
}
