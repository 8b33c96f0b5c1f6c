//! `DataverseStore`'s exact requests on the wire, against a fake HTTP server we did not write (wiremock): keys that
//! cannot go in a URL, the create-only strategies, `UpsertMultiple` bodies, `$batch` answers that do not line up,
//! 404s that are not the service's, body size limits, links to follow and polymorphic lookups. Where the emulator
//! shows the same behaviour, a test against it follows (all emulator use is in `mod emulated`).

use std::num::NonZeroUsize;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::matchers::{method, path, path_regex, query_param};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use eventual_upsert::dataverse::{
    BulkKeyColumns, BulkSupport, CreateStrategy, DataverseConfig, DataverseStore, DataverseTable,
};
use eventual_upsert::schema::{Schema, TableSchema};
use eventual_upsert::{
    BreakerConfig, Change, DeleteOutcome, Ensured, EntityRef, Error, HydrationState, KeyKind,
    Record, RecordStore, RetryPolicy, Write,
};

const ROOT: &str = "/api/data/v9.2/";
const STATE: &str = "new_isplaceholder";

fn schema() -> Schema {
    Schema::new([
        TableSchema::builder("account")
            .primary_name("name")
            .alternate_key([("accountnumber", KeyKind::String)])
            .build()
            .unwrap(),
        TableSchema::builder("contact")
            .primary_name("fullname")
            .alternate_key([("emailaddress1", KeyKind::String)])
            .polymorphic_lookup("parentcustomerid", ["account", "contact"])
            .build()
            .unwrap(),
    ])
    .unwrap()
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        jitter_seed: Some(7),
        ..RetryPolicy::default()
    }
}

fn config(server: &MockServer) -> DataverseConfig {
    DataverseConfig::new(server.uri(), schema())
        .with_name("wire")
        .with_static_token("t0ken")
        .with_retry(quick_retries())
        .with_table(DataverseTable::new("account").with_state_column(STATE))
        .with_table(
            DataverseTable::new("contact")
                .with_target_navigation("parentcustomerid", "account", "parentcustomerid_account")
                .with_target_navigation("parentcustomerid", "contact", "parentcustomerid_contact")
                .with_state_column(STATE),
        )
}

fn store(server: &MockServer) -> DataverseStore {
    config(server).build().unwrap()
}

fn account(number: &str) -> EntityRef {
    EntityRef::by_key("account", [("accountnumber", number)]).unwrap()
}

fn named(reference: &EntityRef, name: &str) -> Record {
    Record::builder(reference.clone())
        .field("name", name)
        .build()
        .unwrap()
}

/// A placeholder as the writer makes it: the key and the placeholder state.
fn placeholder(reference: EntityRef) -> Record {
    let mut record = Record::new(reference);
    record.state = HydrationState::Placeholder;
    record
}

fn guid(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

/// An account row as the service returns it.
fn account_row(id: Uuid, version: u64, extra: Value) -> Value {
    let mut row = json!({
        "@odata.etag": format!("W/\"{version}\""),
        "accountid": id.to_string(),
        STATE: false,
    });
    if let (Value::Object(row), Value::Object(extra)) = (&mut row, extra) {
        row.extend(extra);
    }
    row
}

fn ok_json(body: Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(body)
}

fn odata_error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(json!({"error": {"code": code, "message": message}}))
}

async fn requests(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.unwrap_or_default()
}

/// The decoded value of a query parameter.
fn query(request: &Request, name: &str) -> Option<String> {
    request
        .url
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn header<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request.headers.get(name).and_then(|v| v.to_str().ok())
}

fn body_json(request: &Request) -> Value {
    serde_json::from_slice(&request.body).unwrap_or(Value::Null)
}

/// One answered operation of a hand-written `$batch` response.
struct Part<'a> {
    content_id: Option<&'a str>,
    status: &'a str,
    headers: &'a [(&'a str, &'a str)],
    body: Option<Value>,
}

fn part<'a>(content_id: Option<&'a str>, status: &'a str, body: Option<Value>) -> Part<'a> {
    Part {
        content_id,
        status,
        headers: &[],
        body,
    }
}

fn push_part(out: &mut String, p: &Part<'_>) {
    out.push_str("Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n");
    if let Some(id) = p.content_id {
        out.push_str(&format!("Content-ID: {id}\r\n"));
    }
    out.push_str(&format!(
        "\r\nHTTP/1.1 {}\r\nOData-Version: 4.0\r\n",
        p.status
    ));
    for (name, value) in p.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    match &p.body {
        Some(body) => out.push_str(&format!(
            "Content-Type: application/json; odata.metadata=minimal\r\n\r\n{body}\r\n"
        )),
        None => out.push_str("\r\n\r\n"),
    }
}

/// A `$batch` response written by hand (not by the crate's encoder): independent parts, or one change set.
fn batch_response(parts: &[Part<'_>], change_set: bool) -> ResponseTemplate {
    let mut out = String::new();
    if change_set {
        out.push_str("--batchresponse_R\r\nContent-Type: multipart/mixed; boundary=changesetresponse_C\r\n\r\n");
        for p in parts {
            out.push_str("--changesetresponse_C\r\n");
            push_part(&mut out, p);
        }
        out.push_str("--changesetresponse_C--\r\n");
    } else {
        for p in parts {
            out.push_str("--batchresponse_R\r\n");
            push_part(&mut out, p);
        }
    }
    out.push_str("--batchresponse_R--\r\n");
    ResponseTemplate::new(200).set_body_raw(out, "multipart/mixed; boundary=batchresponse_R")
}

/// Answers `verb path` with `response`, however often it is asked.
async fn answer(server: &MockServer, verb: &str, url_path: String, response: ResponseTemplate) {
    Mock::given(method(verb))
        .and(path(url_path))
        .respond_with(response)
        .mount(server)
        .await;
}

/// Answers `verb path` with `response`, and checks when the server drops that it was asked exactly once.
async fn answer_once(
    server: &MockServer,
    verb: &str,
    url_path: String,
    response: ResponseTemplate,
) {
    Mock::given(method(verb))
        .and(path(url_path))
        .respond_with(response)
        .expect(1)
        .mount(server)
        .await;
}

/// A `200 OK` part with account `n` at `version`.
fn ok_part(content_id: Option<&str>, n: u128, version: u64) -> Part<'_> {
    part(
        content_id,
        "200 OK",
        Some(account_row(guid(n), version, json!({}))),
    )
}

/// Answers every `$batch` request with the same hand-written response.
async fn answer_batches(server: &MockServer, parts: &[Part<'_>], change_set: bool) {
    Mock::given(method("POST"))
        .and(path(format!("{ROOT}$batch")))
        .respond_with(batch_response(parts, change_set))
        .mount(server)
        .await;
}

/// Upserts of two accounts by GUID (1 and 2).
fn two_writes_by_id() -> [Write; 2] {
    [
        Write::upsert(named(&EntityRef::by_id("account", guid(1)).unwrap(), "one")),
        Write::upsert(named(&EntityRef::by_id("account", guid(2)).unwrap(), "two")),
    ]
}

/// The inner requests of a `$batch` request body: (request line, Content-ID, body).
fn batch_operations(request: &Request) -> Vec<(String, Option<String>, String)> {
    let text = String::from_utf8_lossy(&request.body).into_owned();
    let mut out = Vec::new();
    for chunk in text.split("Content-Type: application/http").skip(1) {
        let content_id = chunk
            .lines()
            .skip(1)
            .take_while(|l| !l.is_empty())
            .find_map(|l| l.strip_prefix("Content-ID: "))
            .map(str::to_owned);
        let line = chunk
            .lines()
            .find(|l| l.ends_with("HTTP/1.1"))
            .unwrap_or_default()
            .to_owned();
        let body = chunk
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_default()
            .to_owned();
        out.push((line, content_id, body));
    }
    out
}

// ---- 1. keys that cannot go in a URL ----

#[tokio::test]
async fn a_key_with_a_forbidden_character_is_found_by_filter_and_updated_by_guid() {
    let server = MockServer::start().await;
    let id = guid(0xa1);
    Mock::given(method("GET"))
        .and(path(format!("{ROOT}accounts")))
        .and(query_param(
            "$filter",
            "accountnumber eq 'O''Brien & Co/1?'",
        ))
        .and(query_param("$top", "2"))
        .respond_with(ok_json(
            json!({"value": [account_row(id, 5, json!({"name": "Old"}))]}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    answer_once(
        &server,
        "PATCH",
        format!("{ROOT}accounts({id})"),
        ok_json(account_row(id, 6, json!({}))),
    )
    .await;
    let store = store(&server);
    let outcome = store
        .write(&Write::upsert(named(&account("O'Brien & Co/1?"), "New")))
        .await
        .unwrap();
    assert_eq!((outcome.id, outcome.change), (id, Change::Updated));
    let sent = requests(&server).await;
    let raw_query = sent[0].url.query().unwrap_or_default();
    assert!(
        raw_query.contains("O%27%27Brien%20%26%20Co%2F1%3F") && raw_query.split('&').count() == 3,
        "quoted and percent-encoded, no parameter added by the value: {raw_query}"
    );
    assert!(
        sent.iter().all(|r| !r.url.path().contains("accountnumber")),
        "the key never goes in a path"
    );
    assert_eq!(header(&sent[1], "if-match"), Some("W/\"5\""));
    assert_eq!(body_json(&sent[1]), json!({"name": "New"}));
}

#[tokio::test]
async fn a_missing_record_with_such_a_key_is_created_by_post_with_its_key_columns() {
    let server = MockServer::start().await;
    let id = guid(0xa2);
    answer(
        &server,
        "GET",
        format!("{ROOT}accounts"),
        ok_json(json!({"value": []})),
    )
    .await;
    answer_once(
        &server,
        "POST",
        format!("{ROOT}accounts"),
        ResponseTemplate::new(201).set_body_json(account_row(id, 1, json!({}))),
    )
    .await;
    let store = store(&server);
    let outcome = store
        .write(&Write::upsert(named(&account("A:1+2"), "Colon")))
        .await
        .unwrap();
    assert_eq!((outcome.id, outcome.change), (id, Change::Created));
    let post = requests(&server)
        .await
        .into_iter()
        .find(|r| r.method.as_str() == "POST")
        .unwrap();
    assert_eq!(
        body_json(&post),
        json!({"name": "Colon", "accountnumber": "A:1+2", STATE: false})
    );
    assert_eq!(header(&post, "if-none-match"), None);
    assert_eq!(header(&post, "prefer"), Some("return=representation"));
    assert_eq!(
        query(&post, "$select").as_deref(),
        Some("accountid,new_isplaceholder")
    );
}

#[tokio::test]
async fn a_placeholder_with_such_a_key_that_appeared_meanwhile_reads_as_existed() {
    let server = MockServer::start().await;
    answer(
        &server,
        "GET",
        format!("{ROOT}accounts"),
        ok_json(json!({"value": []})),
    )
    .await;
    answer(
        &server,
        "POST",
        format!("{ROOT}accounts"),
        odata_error(
            409,
            "0x80040237",
            "Operation failed due to a SQL integrity violation.",
        ),
    )
    .await;
    let store = store(&server);
    let placeholder = placeholder(account("P/1"));
    let ensured = store.ensure_placeholders(vec![placeholder]).await;
    assert!(matches!(ensured[..], [Ok(Ensured::Existed)]), "{ensured:?}");
}

#[tokio::test]
async fn lookups_and_deletes_by_such_a_key_resolve_the_guid_first() {
    let server = MockServer::start().await;
    let parent = guid(0xb1);
    let contact = guid(0xc1);
    Mock::given(method("GET"))
        .and(path(format!("{ROOT}accounts")))
        .and(query_param("$filter", "accountnumber eq 'P/2'"))
        .respond_with(ok_json(
            json!({"value": [account_row(parent, 3, json!({}))]}),
        ))
        .mount(&server)
        .await;
    answer(
        &server,
        "PATCH",
        format!("{ROOT}contacts({contact})"),
        ok_json(json!({
            "@odata.etag": "W/\"9\"", "contactid": contact.to_string(), STATE: false
        })),
    )
    .await;
    // The write by GUID reads the contact first (an exact write, since its lookup needs a query).
    answer(&server, "GET", format!("{ROOT}contacts({contact})"), ok_json(json!({
            "@odata.etag": "W/\"8\"", "contactid": contact.to_string(), "fullname": "Ada", STATE: false
        }))).await;
    answer_once(
        &server,
        "DELETE",
        format!("{ROOT}accounts({parent})"),
        ResponseTemplate::new(204),
    )
    .await;
    let store = store(&server);
    let write = Write::upsert(
        Record::builder(EntityRef::by_id("contact", contact).unwrap())
            .field("fullname", "Ada")
            .lookup("parentcustomerid", account("P/2"))
            .build()
            .unwrap(),
    );
    let results = store.write_batch(std::slice::from_ref(&write)).await;
    assert!(results[0].is_ok(), "{results:?}");
    let sent = requests(&server).await;
    let patch = sent.iter().find(|r| r.method.as_str() == "PATCH").unwrap();
    assert_eq!(
        body_json(patch),
        json!({"parentcustomerid_account@odata.bind": format!("/accounts({parent})"), "fullname": "Ada"})
    );
    assert_eq!(header(patch, "if-match"), Some("W/\"8\""));
    let outcome = RecordStore::delete(&store, &eventual_upsert::Delete::new(account("P/2")))
        .await
        .unwrap();
    assert!(
        matches!(outcome, DeleteOutcome::Deleted { id: Some(id), .. } if id == parent),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_key_too_long_for_a_path_segment_is_looked_up_by_filter() {
    let server = MockServer::start().await;
    let long = "K".repeat(300);
    Mock::given(method("GET"))
        .and(path(format!("{ROOT}accounts")))
        .and(query_param("$filter", format!("accountnumber eq '{long}'")))
        .respond_with(ok_json(json!({"value": []})))
        .expect(1)
        .mount(&server)
        .await;
    let store = store(&server);
    assert!(store.read(&account(&long)).await.unwrap().is_none());
}

#[tokio::test]
async fn a_key_too_long_for_any_url_is_rejected_unsent_and_not_retried() {
    let server = MockServer::start().await;
    let store = config(&server)
        .with_max_url_length(2_000)
        .with_breaker(BreakerConfig {
            failure_threshold: 1,
            ..BreakerConfig::default()
        })
        .build()
        .unwrap();
    let huge = account(&"x".repeat(3_000));
    for _ in 0..3 {
        let err = store.read(&huge).await.unwrap_err();
        assert!(
            matches!(&err, Error::InvalidKey { reason, .. } if reason.contains("2000")),
            "{err:?}"
        );
        assert!(!err.is_retryable());
    }
    assert_eq!(store.stats().requests, 0, "nothing was sent");
    // The breaker did not open: a normal request still goes out.
    Mock::given(method("GET"))
        .respond_with(odata_error(
            404,
            "0x80060891",
            "A record with the specified key values does not exist in account entity",
        ))
        .mount(&server)
        .await;
    assert!(store.read(&account("A-1")).await.unwrap().is_none());
}

// ---- 2. create-only strategies ----

#[tokio::test]
async fn creates_by_key_default_to_the_documented_patch_with_if_none_match() {
    let server = MockServer::start().await;
    answer_batches(
        &server,
        &[part(
            None,
            "201 Created",
            Some(account_row(guid(1), 1, json!({}))),
        )],
        false,
    )
    .await;
    let store = store(&server);
    let ensured = store
        .ensure_placeholders(vec![placeholder(account("A-1"))])
        .await;
    assert!(
        matches!(ensured[..], [Ok(Ensured::Created { .. })]),
        "{ensured:?}"
    );
    let ops = batch_operations(&requests(&server).await[0]);
    assert!(
        ops[0]
            .0
            .starts_with("PATCH /api/data/v9.2/accounts(accountnumber='A-1')"),
        "{ops:?}"
    );
    let text = String::from_utf8_lossy(&requests(&server).await[0].body).into_owned();
    assert!(text.contains("If-None-Match: *"), "{text}");
}

#[tokio::test]
async fn post_with_keys_creates_by_post_and_reads_a_duplicate_as_existed() {
    let server = MockServer::start().await;
    answer_batches(
        &server,
        &[
                    part(None, "201 Created", Some(account_row(guid(1), 1, json!({})))),
                    part(
                        None,
                        "412 Precondition Failed",
                        Some(json!({"error": {"code": "0x80040237", "message": "Operation failed due to a SQL integrity violation."}})),
                    ),
                    part(
                        None,
                        "409 Conflict",
                        Some(json!({"error": {"code": "0x80060892", "message": "Entity Key violated."}})),
                    ),
                ],
        false,
    )
    .await;
    let store = config(&server)
        .with_create_strategy(CreateStrategy::PostWithKeys)
        .build()
        .unwrap();
    let ensured = store
        .ensure_placeholders(
            ["A-1", "A-2", "A-3"]
                .map(|n| placeholder(account(n)))
                .to_vec(),
        )
        .await;
    assert!(
        matches!(
            ensured[..],
            [
                Ok(Ensured::Created { .. }),
                Ok(Ensured::Existed),
                Ok(Ensured::Existed)
            ]
        ),
        "{ensured:?}"
    );
    let ops = batch_operations(&requests(&server).await[0]);
    assert!(
        ops[0]
            .0
            .starts_with("POST /api/data/v9.2/accounts?$select="),
        "{ops:?}"
    );
    let body: Value = serde_json::from_str(&ops[0].2).unwrap();
    assert_eq!(body["accountnumber"], "A-1");
    assert_eq!(body[STATE], true);
}

#[tokio::test]
async fn detect_switches_a_table_to_post_on_the_reported_404_and_remembers() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("{ROOT}$batch")))
        .respond_with(|request: &Request| {
            let ops = batch_operations(request);
            let answers: Vec<Part<'_>> = ops
                .iter()
                .map(|(line, _, _)| {
                    if line.starts_with("PATCH") {
                        part(
                            None,
                            "404 Not Found",
                            Some(json!({"error": {"code": "0x80060891", "message": "A record with the specified key values does not exist in account entity"}})),
                        )
                    } else {
                        part(None, "201 Created", Some(account_row(guid(7), 1, json!({}))))
                    }
                })
                .collect();
            batch_response(&answers, false)
        })
        .mount(&server)
        .await;
    let store = config(&server)
        .with_table(
            DataverseTable::new("account")
                .with_state_column(STATE)
                .with_create_strategy(CreateStrategy::Detect),
        )
        .build()
        .unwrap();
    let first = store
        .ensure_placeholders(vec![placeholder(account("D-1"))])
        .await;
    assert!(
        matches!(first[..], [Ok(Ensured::Created { .. })]),
        "{first:?}"
    );
    let second = store
        .ensure_placeholders(vec![placeholder(account("D-2"))])
        .await;
    assert!(
        matches!(second[..], [Ok(Ensured::Created { .. })]),
        "{second:?}"
    );
    let lines: Vec<String> = requests(&server)
        .await
        .iter()
        .flat_map(batch_operations)
        .map(|(line, _, _)| line.split(' ').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        lines,
        ["PATCH", "POST", "POST"],
        "tried once, then POST for good"
    );
}

// ---- 3. UpsertMultiple bodies ----

async fn upsert_multiple_body(shape: Option<BulkKeyColumns>) -> Value {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!(
            "{ROOT}accounts/Microsoft.Dynamics.CRM.UpsertMultiple"
        )))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let mut config = config(&server)
        .with_table(
            DataverseTable::new("account")
                .with_state_column(STATE)
                .with_bulk(BulkSupport::Supported),
        )
        .with_bulk_chunk(NonZeroUsize::new(10).unwrap());
    if let Some(shape) = shape {
        config = config.with_bulk_key_columns(shape);
    }
    let store = config.build().unwrap();
    let with_key_field = Record::builder(account("K-2"))
        .field("name", "Two")
        .field("accountnumber", "K-2")
        .build()
        .unwrap();
    let report = store
        .bulk_upsert(&[named(&account("K-1"), "One"), with_key_field])
        .await;
    assert_eq!(report.written(), 2);
    body_json(&requests(&server).await[0])
}

#[tokio::test]
async fn upsert_multiple_targets_default_to_the_documented_odata_id_only() {
    assert_eq!(
        upsert_multiple_body(None).await,
        json!({"Targets": [
            {"@odata.type": "Microsoft.Dynamics.CRM.account", "@odata.id": "accounts(accountnumber='K-1')", "name": "One", STATE: false},
            {"@odata.type": "Microsoft.Dynamics.CRM.account", "@odata.id": "accounts(accountnumber='K-2')", "name": "Two", STATE: false},
        ]})
    );
}

#[tokio::test]
async fn upsert_multiple_targets_can_repeat_the_key_columns() {
    assert_eq!(
        upsert_multiple_body(Some(BulkKeyColumns::ODataIdAndKeyColumns)).await,
        json!({"Targets": [
            {"@odata.type": "Microsoft.Dynamics.CRM.account", "@odata.id": "accounts(accountnumber='K-1')", "name": "One", "accountnumber": "K-1", STATE: false},
            {"@odata.type": "Microsoft.Dynamics.CRM.account", "@odata.id": "accounts(accountnumber='K-2')", "accountnumber": "K-2", "name": "Two", STATE: false},
        ]})
    );
}

// ---- 4. $batch answers ----

#[tokio::test]
async fn a_change_set_answered_in_another_order_keeps_each_write_its_own_id() {
    let server = MockServer::start().await;
    answer_batches(
        &server,
        &[ok_part(Some("2"), 2, 20), ok_part(Some("1"), 1, 10)],
        true,
    )
    .await;
    let store = store(&server);
    let writes = two_writes_by_id();
    let outcomes = store.write_atomic(&writes).await.unwrap();
    assert_eq!(
        outcomes
            .iter()
            .map(|o| (o.id, o.version.0))
            .collect::<Vec<_>>(),
        [(guid(1), 10), (guid(2), 20)]
    );
    let ops = batch_operations(&requests(&server).await[0]);
    assert_eq!(
        ops.iter().map(|o| o.1.as_deref()).collect::<Vec<_>>(),
        [Some("1"), Some("2")]
    );
}

#[tokio::test]
async fn a_missing_part_fails_every_write_it_makes_ambiguous() {
    let server = MockServer::start().await;
    answer_batches(&server, &[ok_part(None, 1, 10)], false).await;
    let store = store(&server);
    let writes = two_writes_by_id();
    let results = store.write_batch(&writes).await;
    for result in &results {
        assert!(
            matches!(result, Err(e @ Error::Protocol { reason, .. }) if e.is_retryable() && reason.contains("1 parts for 2 operations")),
            "{results:?}"
        );
    }
    // Same for an extra part with a Content-ID nobody sent, in a change set.
    server.reset().await;
    answer_batches(
        &server,
        &[ok_part(Some("1"), 1, 10), ok_part(Some("9"), 9, 90)],
        true,
    )
    .await;
    let err = store.write_atomic(&writes).await.unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err:?}");
}

#[tokio::test]
async fn a_failed_change_set_part_without_content_id_is_still_a_typed_error() {
    let server = MockServer::start().await;
    answer_batches(
        &server,
        &[part(
                    None,
                    "412 Precondition Failed",
                    Some(json!({"error": {"code": "0x80040237", "message": "A record with matching key values already exists."}})),
                )],
        true,
    )
    .await;
    let store = store(&server);
    // One write: the error is that write's.
    let one = [Write::create_only(named(&account("C-1"), "one"))];
    let err = store.write_atomic(&one).await.unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyExists { reference } if **reference == account("C-1")),
        "{err:?}"
    );
    // Two writes: the service did not say which; the error is the part's, not the outer 200's.
    let two = [
        Write::create_only(named(&account("C-1"), "one")),
        Write::create_only(named(&account("C-2"), "two")),
    ];
    let err = store.write_atomic(&two).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("change set of 2 writes") && text.contains("HTTP 412 0x80040237"),
        "{text}"
    );
}

#[tokio::test]
async fn a_429_inside_a_batch_is_retried_after_its_retry_after() {
    let server = MockServer::start().await;
    let calls = std::sync::atomic::AtomicUsize::new(0);
    Mock::given(method("POST"))
        .and(path(format!("{ROOT}$batch")))
        .respond_with(move |request: &Request| {
            let ops = batch_operations(request);
            if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                assert_eq!(ops.len(), 2);
                batch_response(
                    &[
                        ok_part(None, 1, 10),
                        Part {
                            content_id: None,
                            status: "429 Too Many Requests",
                            headers: &[("Retry-After", "1")],
                            body: Some(json!({"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit of 6000 over time window of 300 seconds."}})),
                        },
                    ],
                    false,
                )
            } else {
                assert_eq!(ops.len(), 1, "only the throttled operation is sent again");
                assert!(ops[0].0.contains(&guid(2).to_string()), "{ops:?}");
                batch_response(
                    &[ok_part(None, 2, 20)],
                    false,
                )
            }
        })
        .mount(&server)
        .await;
    let store = store(&server);
    let writes = two_writes_by_id();
    let started = std::time::Instant::now();
    let results = store.write_batch(&writes).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(results[1].as_ref().unwrap().id, guid(2));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited the Retry-After"
    );
    assert_eq!(requests(&server).await.len(), 2);
}

// ---- 7. 404s that are not the service's, and body size ----

#[tokio::test]
async fn a_404_with_an_empty_or_html_body_is_not_a_missing_row() {
    for body in ["", "<html><body><h1>404 - Not Found</h1></body></html>"] {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(404).set_body_string(body))
            .mount(&server)
            .await;
        let store = config(&server)
            .with_retry(RetryPolicy::never())
            .build()
            .unwrap();
        let err = store.read(&account("A-1")).await.unwrap_err();
        assert!(
            matches!(&err, Error::Protocol { retryable: true, reason, .. } if reason.contains("HTTP 404")),
            "{body:?}: {err:?}"
        );
        let err = RecordStore::delete(&store, &eventual_upsert::Delete::new(account("A-1")))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err:?}");
    }
}

#[tokio::test]
async fn a_body_over_the_limit_is_not_read_and_the_error_names_the_limit() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ok_json(json!({"value": [], "padding": "x".repeat(10_000)})))
        .mount(&server)
        .await;
    let store = config(&server)
        .with_max_response_bytes(4_096)
        .build()
        .unwrap();
    let err = store
        .records(&eventual_upsert::TableName::new("account").unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::ResponseTooLarge { limit: 4096, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("4096 bytes"), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(store.stats().requests, 1, "not retried");
}

// ---- 5. links ----

#[tokio::test]
async fn next_links_with_other_casing_or_path_prefix_are_followed() {
    let server = MockServer::start().await;
    let base = server.uri(); // http://127.0.0.1:<port>
    let port = server.address().port();
    let configured = format!("HTTP://127.0.0.1:{port}/");
    Mock::given(method("GET"))
        .and(path(format!("{ROOT}accounts")))
        .and(wiremock::matchers::query_param_is_missing("$skiptoken"))
        .respond_with(ok_json(json!({
            "value": [account_row(guid(1), 1, json!({}))],
            "@odata.nextLink": format!("{base}/api/data/v9.2/accounts?$skiptoken=2"),
        })))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("{ROOT}accounts")))
        .and(query_param("$skiptoken", "2"))
        .respond_with(ok_json(json!({
            "value": [account_row(guid(2), 1, json!({}))],
            "@odata.nextLink": format!("http://127.0.0.1:{port}/api/data/v9.0/accounts?$skiptoken=3"),
        })))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/data/v9.0/accounts"))
        .and(query_param("$skiptoken", "3"))
        .respond_with(ok_json(
            json!({"value": [account_row(guid(3), 1, json!({}))]}),
        ))
        .mount(&server)
        .await;
    let store = DataverseConfig::new(configured, schema())
        .with_retry(quick_retries())
        .build()
        .unwrap();
    let table = eventual_upsert::TableName::new("account").unwrap();
    let rows = store.records(&table).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        [guid(1), guid(2), guid(3)]
    );

    // A link to another host is never followed (the token would go there).
    server.reset().await;
    Mock::given(method("GET"))
        .respond_with(ok_json(json!({
            "value": [],
            "@odata.deltaLink": "https://evil.example/api/data/v9.2/accounts?$deltatoken=1",
        })))
        .mount(&server)
        .await;
    let err = store.changes(&table, None, 10).await.unwrap_err();
    assert!(err.to_string().contains("another service"), "{err}");
    assert_eq!(requests(&server).await.len(), 1);
}

// ---- 8. polymorphic lookups ----

#[tokio::test]
async fn metadata_in_any_order_binds_each_target_of_a_polymorphic_lookup() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path_regex(r"EntityDefinitions\(LogicalName='account'\)$"))
        .respond_with(ok_json(json!({"LogicalName": "account", "EntitySetName": "accounts", "ManyToOneRelationships": []})))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path_regex(r"EntityDefinitions\(LogicalName='contact'\)$"))
        .respond_with(ok_json(json!({
            "LogicalName": "contact",
            "EntitySetName": "contacts",
            "ManyToOneRelationships": [
                // The "wrong" order: the contact target first.
                {"ReferencingAttribute": "parentcustomerid", "ReferencedEntity": "contact", "ReferencingEntityNavigationPropertyName": "parentcustomerid_contact"},
                {"ReferencingAttribute": "parentcustomerid", "ReferencedEntity": "account", "ReferencingEntityNavigationPropertyName": "parentcustomerid_account"},
                {"ReferencingAttribute": "parentcustomerid", "ReferencedEntity": "lead", "ReferencingEntityNavigationPropertyName": "parentcustomerid_lead"},
            ],
        })))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("{ROOT}$batch")))
        .respond_with(|request: &Request| {
            let answers: Vec<Part<'_>> = batch_operations(request)
                .iter()
                .map(|_| {
                    part(
                        None,
                        "200 OK",
                        Some(json!({"@odata.etag": "W/\"2\"", "contactid": guid(0xc).to_string()})),
                    )
                })
                .collect();
            batch_response(&answers, false)
        })
        .mount(&server)
        .await;
    let store = DataverseConfig::new(server.uri(), schema())
        .with_retry(quick_retries())
        .load_metadata()
        .await
        .unwrap()
        .build()
        .unwrap();
    let metadata = requests(&server).await;
    assert!(
        query(&metadata[1], "$expand").is_some_and(|e| e.contains("ReferencedEntity")),
        "{:?}",
        metadata[1].url
    );
    let write = |target: EntityRef| {
        Write::upsert(
            Record::builder(EntityRef::by_id("contact", guid(0xc)).unwrap())
                .lookup("parentcustomerid", target)
                .build()
                .unwrap(),
        )
    };
    let results = store
        .write_batch(&[
            write(EntityRef::by_id("account", guid(0xa)).unwrap()),
            write(EntityRef::by_id("contact", guid(0xb)).unwrap()),
        ])
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let ops = batch_operations(requests(&server).await.last().unwrap());
    let bodies: Vec<Value> = ops
        .iter()
        .map(|o| serde_json::from_str(&o.2).unwrap())
        .collect();
    assert_eq!(
        bodies,
        [
            json!({"parentcustomerid_account@odata.bind": format!("/accounts({})", guid(0xa))}),
            json!({"parentcustomerid_contact@odata.bind": format!("/contacts({})", guid(0xb))}),
        ]
    );
}

/// The same fixes, observed on the emulator (the only place these tests name it).
mod emulated {
    use super::*;
    use dataverse_emulator::{EmulatedTable, Emulator, EmulatorConfig};

    async fn emulator() -> Emulator {
        Emulator::start(
            EmulatorConfig::new()
                .table(
                    EmulatedTable::new("account", "accounts", "accountid", "name")
                        .alternate_key(&["accountnumber"]),
                )
                .table(
                    EmulatedTable::new("contact", "contacts", "contactid", "fullname")
                        .alternate_key(&["emailaddress1"])
                        .lookup("parentcustomerid_account", "parentcustomerid", "account")
                        .lookup("parentcustomerid_contact", "parentcustomerid", "contact"),
                ),
        )
        .await
        .unwrap()
    }

    fn store_on(emulator: &Emulator, base: &str, strategy: CreateStrategy) -> DataverseStore {
        DataverseConfig::new(base, schema())
            .with_retry(quick_retries())
            .with_create_strategy(strategy)
            .with_table(
                DataverseTable::new("contact")
                    .with_target_navigation(
                        "parentcustomerid",
                        "account",
                        "parentcustomerid_account",
                    )
                    .with_target_navigation(
                        "parentcustomerid",
                        "contact",
                        "parentcustomerid_contact",
                    ),
            )
            .build()
            .unwrap_or_else(|e| panic!("{} {e}", emulator.base_url()))
    }

    #[tokio::test]
    async fn keys_with_forbidden_characters_round_trip() {
        let emulator = emulator().await;
        let store = store_on(&emulator, emulator.base_url(), CreateStrategy::default());
        let key = account("A/1:2*3+4");
        let created = store
            .write(&Write::upsert(named(&key, "Slash")))
            .await
            .unwrap();
        assert_eq!(created.change, Change::Created);
        let updated = store
            .write(&Write::upsert(named(&key, "Slash 2")))
            .await
            .unwrap();
        assert_eq!((updated.id, updated.change), (created.id, Change::Updated));
        let ensured = store
            .ensure_placeholders(vec![placeholder(key.clone())])
            .await;
        assert!(matches!(ensured[..], [Ok(Ensured::Existed)]), "{ensured:?}");
        let read = store.read(&key).await.unwrap().unwrap();
        assert_eq!(read.id, created.id);
        let rows = emulator.rows("account");
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["accountnumber"], json!("A/1:2*3+4"));
        assert!(store.delete(&key).await.unwrap());
        assert_eq!(emulator.row_count("account"), 0);
    }

    #[tokio::test]
    async fn post_with_keys_creates_and_finds_duplicates() {
        let emulator = emulator().await;
        let store = store_on(&emulator, emulator.base_url(), CreateStrategy::PostWithKeys);
        let placeholders = || vec![placeholder(account("E-1")), placeholder(account("E-2"))];
        let first = store.ensure_placeholders(placeholders()).await;
        assert!(
            first
                .iter()
                .all(|r| matches!(r, Ok(Ensured::Created { .. }))),
            "{first:?}"
        );
        let again = store.ensure_placeholders(placeholders()).await;
        assert!(
            again.iter().all(|r| matches!(r, Ok(Ensured::Existed))),
            "{again:?}"
        );
        assert_eq!(emulator.row_count("account"), 2);
    }

    #[tokio::test]
    async fn change_links_are_followed_when_the_configured_url_differs_in_case() {
        let emulator = emulator().await;
        let shouted = emulator.base_url().replacen("http://", "HTTP://", 1);
        let store = store_on(&emulator, &shouted, CreateStrategy::default());
        let table = eventual_upsert::TableName::new("account").unwrap();
        for n in 0..3 {
            store
                .write(&Write::upsert(named(&account(&format!("L-{n}")), "L")))
                .await
                .unwrap();
        }
        let mut page = store.changes(&table, None, 2).await.unwrap();
        let mut seen = page.changes.len();
        while !page.complete {
            page = store.changes(&table, Some(&page.next), 2).await.unwrap();
            seen += page.changes.len();
        }
        assert_eq!(seen, 3);
        assert_eq!(store.records(&table).await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_polymorphic_lookup_binds_each_target() {
        let emulator = emulator().await;
        let store = store_on(&emulator, emulator.base_url(), CreateStrategy::default());
        let parent_account = store
            .write(&Write::upsert(named(&account("P-1"), "Parent")))
            .await
            .unwrap();
        let parent_contact = store
            .write(&Write::upsert(
                Record::builder(
                    EntityRef::by_key("contact", [("emailaddress1", "boss@example.com")]).unwrap(),
                )
                .field("fullname", "Boss")
                .build()
                .unwrap(),
            ))
            .await
            .unwrap();
        for (email, target) in [
            (
                "a@example.com",
                EntityRef::by_id("account", parent_account.id).unwrap(),
            ),
            (
                "c@example.com",
                EntityRef::by_id("contact", parent_contact.id).unwrap(),
            ),
        ] {
            let written = store
                .write(&Write::upsert(
                    Record::builder(
                        EntityRef::by_key("contact", [("emailaddress1", email)]).unwrap(),
                    )
                    .field("fullname", email)
                    .lookup("parentcustomerid", target.clone())
                    .build()
                    .unwrap(),
                ))
                .await;
            assert!(written.is_ok(), "{email}: {written:?}");
        }
        let rows = emulator.rows("contact");
        let parent_of = |email: &str| {
            rows.iter()
                .find(|r| r["emailaddress1"] == json!(email))
                .map(|r| r["_parentcustomerid_value"].clone())
        };
        assert_eq!(
            parent_of("a@example.com"),
            Some(json!(parent_account.id.to_string()))
        );
        assert_eq!(
            parent_of("c@example.com"),
            Some(json!(parent_contact.id.to_string()))
        );
    }
}
