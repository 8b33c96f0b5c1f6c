//! The library API added with the crate: header casing on the wire, seed rows, table definitions from JSON, the
//! request log, per-instance TLS certificates, throttling settings. Requests are written by hand over a plain TCP
//! stream, so what is asserted is exactly what a client receives.

use std::time::Duration;

use dataverse_emulator::{EmulatedTable, Emulator, EmulatorConfig, EmulatorError};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw HTTP/1.1 exchange: the response's head (status line and headers, as bytes on the wire) and body.
async fn exchange(
    emulator: &Emulator,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (String, String) {
    let authority = emulator
        .base_url()
        .strip_prefix("http://")
        .expect("plain http");
    let mut stream = TcpStream::connect(authority).await.expect("connects");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} /api/data/v9.2/{path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nx-ms-client-request-id: client-1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("sends");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("reads");
    let response = String::from_utf8(response).expect("UTF-8");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    (head.to_owned(), body.to_owned())
}

fn header_lines(head: &str) -> Vec<&str> {
    head.lines().skip(1).collect()
}

#[tokio::test]
async fn response_header_names_have_the_services_casing() {
    let emulator = Emulator::start(EmulatorConfig::default())
        .await
        .expect("starts");
    let (head, _) = exchange(
        &emulator,
        "POST",
        "accounts",
        Some(&json!({"name": "Contoso", "accountnumber": "A-1"})),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    let lines = header_lines(&head);
    for name in [
        "OData-EntityId: ",
        "OData-Version: 4.0",
        "x-ms-service-request-id: ",
        "Date: ",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(name)),
            "no line starting with {name:?} in\n{head}"
        );
    }
    assert!(!head.contains("odata-entityid"), "{head}");

    let (head, _) = exchange(
        &emulator,
        "PATCH",
        "accounts(accountnumber='A-1')",
        Some(&json!({"name": "Contoso Ltd"})),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    let (head, body) = exchange(
        &emulator,
        "GET",
        "accounts(accountnumber='A-1')?$select=name",
        None,
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let lines = header_lines(&head);
    assert!(lines.iter().any(|l| l.starts_with("ETag: W/\"")), "{head}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("Content-Type: application/json")),
        "{head}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("Content-Length: ")),
        "{head}"
    );
    assert!(body.contains("Contoso Ltd"), "{body}");
    emulator.shutdown().await;
}

#[tokio::test]
async fn seed_rows_exist_before_the_first_request_and_may_bind_earlier_ones() {
    let account_id = "8f7a4b6e-2f0e-4c55-9a43-0d1f6f0c1a01";
    let seed = json!([
        {"table": "account", "rows": [{"accountid": account_id, "name": "Fabrikam", "accountnumber": "A-1"}]},
        {"table": "contacts", "rows": [
            {"fullname": "Ada Lovelace", "parentcustomerid_account@odata.bind": "/accounts(accountnumber='A-1')"}
        ]}
    ]);
    let config = EmulatorConfig::default()
        .seed_json(&seed.to_string())
        .expect("a valid seed");
    let emulator = Emulator::start(config).await.expect("starts");
    assert_eq!(emulator.row_count("account"), 1);
    let contacts = emulator.rows("contact");
    assert_eq!(contacts.len(), 1);
    assert_eq!(contacts[0]["fullname"], "Ada Lovelace");
    assert_eq!(contacts[0]["_parentcustomerid_value"], account_id);
    assert_eq!(
        emulator.counts().http_requests,
        0,
        "seeding is not a request"
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_refused_seed_row_stops_the_start_naming_the_row() {
    let config = EmulatorConfig::default()
        .seed_row("account", json!({"name": "A", "accountnumber": "A-1"}))
        .seed_row("account", json!({"name": "B", "accountnumber": "A-1"}));
    match Emulator::start(config).await {
        Err(EmulatorError::Seed {
            table,
            row,
            message,
        }) => {
            assert_eq!((table.as_str(), row), ("account", 2));
            assert!(message.contains("Entity Key"), "{message}");
        }
        other => panic!("expected a seed error, got {other:?}"),
    }
    let config = EmulatorConfig::default().seed_row("nope", json!({}));
    let err = Emulator::start(config).await.expect_err("unknown table");
    assert!(err.to_string().contains("no such table"), "{err}");
}

#[tokio::test]
async fn tables_from_json_are_served() {
    let tables = EmulatedTable::list_from_json(
        r#"[{"logical_name": "new_order", "alternate_keys": [["new_number"]], "columns": ["new_amount"]}]"#,
    )
    .expect("valid definitions");
    let config = tables
        .into_iter()
        .fold(EmulatorConfig::new(), EmulatorConfig::table);
    let emulator = Emulator::start(config).await.expect("starts");
    let (head, _) = exchange(
        &emulator,
        "PATCH",
        "new_orders(new_number='N-1')",
        Some(&json!({"new_amount": 5})),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    let (head, body) = exchange(
        &emulator,
        "PATCH",
        "new_orders(new_number='N-1')",
        Some(&json!({"new_colour": "red"})),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(body.contains("new_colour"), "{body}");
    assert_eq!(emulator.rows("new_order")[0]["new_amount"], 5);
    emulator.shutdown().await;
}

#[tokio::test]
async fn the_request_log_has_one_json_line_per_request() {
    let dir = std::env::temp_dir().join(format!("dataverse-emulator-log-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("requests.jsonl");
    let emulator = Emulator::start(EmulatorConfig::default().request_log(&path))
        .await
        .expect("starts");
    let (created, _) = exchange(&emulator, "POST", "accounts", Some(&json!({"name": "A"}))).await;
    exchange(&emulator, "GET", "accounts?$select=name", None).await;
    emulator.shutdown().await;
    let text = std::fs::read_to_string(&path).expect("the log");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["method"], "POST");
    assert_eq!(lines[0]["target"], "/api/data/v9.2/accounts");
    assert_eq!(lines[0]["status"], 204);
    assert_eq!(lines[0]["client_request_id"], "client-1");
    let sent_id = header_lines(&created)
        .into_iter()
        .find_map(|l| l.strip_prefix("x-ms-service-request-id: "))
        .expect("a service request id");
    assert_eq!(lines[0]["service_request_id"], sent_id);
    assert_eq!(lines[1]["method"], "GET");
    assert_eq!(lines[1]["target"], "/api/data/v9.2/accounts?$select=name");
    assert_eq!(lines[1]["status"], 200);
    assert!(
        lines[1]["time_unix_ms"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000)
    );
    assert!(lines[1]["duration_ms"].as_f64().is_some());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn an_unopenable_request_log_is_a_start_error() {
    let path = std::env::temp_dir()
        .join(format!("no-such-dir-{}", uuid::Uuid::new_v4()))
        .join("log.jsonl");
    let err = Emulator::start(EmulatorConfig::default().request_log(&path))
        .await
        .expect_err("no such directory");
    assert!(matches!(err, EmulatorError::RequestLog { .. }), "{err:?}");
}

#[tokio::test]
async fn every_tls_instance_has_its_own_certificate_subject() {
    let a = Emulator::start(EmulatorConfig::default().tls(true))
        .await
        .expect("a");
    let b = Emulator::start(EmulatorConfig::default().tls(true))
        .await
        .expect("b");
    let (subject_a, subject_b) = (
        a.certificate_subject().expect("TLS"),
        b.certificate_subject().expect("TLS"),
    );
    assert_ne!(subject_a, subject_b);
    assert!(
        subject_a.contains(&a.instance_id().to_string()),
        "{subject_a}"
    );
    assert_ne!(a.certificate_pem(), b.certificate_pem());
    assert!(a.base_url().starts_with("https://127.0.0.1:"));
    let plain = Emulator::start(EmulatorConfig::default())
        .await
        .expect("plain");
    assert_eq!(plain.certificate_subject(), None);
}

#[tokio::test]
async fn injected_throttling_uses_the_configured_retry_after() {
    let emulator = Emulator::start(EmulatorConfig::default())
        .await
        .expect("starts");
    emulator.faults().set_retry_after(7);
    emulator.faults().fail_next(1, 429);
    let (head, _) = exchange(&emulator, "GET", "accounts", None).await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(header_lines(&head).contains(&"Retry-After: 7"), "{head}");
    emulator.faults().fail_rate_with(1.0, 3, 429);
    let (head, _) = exchange(&emulator, "GET", "accounts", None).await;
    assert!(header_lines(&head).contains(&"Retry-After: 7"), "{head}");
    emulator.faults().clear();
    emulator.faults().set_latency(Duration::ZERO);
    let (head, _) = exchange(&emulator, "GET", "accounts", None).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    emulator.shutdown().await;
}
