//! HTTP-level conformance of the Dataverse emulator: each test sends real requests with reqwest and asserts exact
//! statuses, headers and bodies. Numbers in test names refer to the checklist "What an emulator must reproduce"
//! in the project's Dataverse reference.

use std::time::Duration;

use dataverse_emulator::{EmulatedTable, Emulator, EmulatorConfig, EmulatorError};
use eventual_upsert::EntityRef;
use eventual_upsert::dataverse::batch::{
    self, BatchRequest, Operation, OperationResponse, Part, ResponsePart,
};
use eventual_upsert::dataverse::odata;
use reqwest::header::HeaderMap;
use reqwest::{Client, Method, RequestBuilder};
use serde_json::{Value, json};
use uuid::Uuid;

const ROOT_PATH: &str = "/api/data/v9.2/";
const JSON: &str = "application/json; odata.metadata=minimal";

struct Api {
    emu: Emulator,
    client: Client,
    root: String,
}

impl Api {
    async fn new() -> Api {
        Api::with(EmulatorConfig::default()).await
    }

    async fn with(config: EmulatorConfig) -> Api {
        let emu = Emulator::start(config).await.expect("the emulator starts");
        // No idle-pool timer: tests on a paused clock must not see time jump.
        let client = Client::builder()
            .pool_idle_timeout(None)
            .build()
            .expect("client");
        let root = emu.service_root();
        Api { emu, client, root }
    }

    fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{path}", self.root))
    }

    fn get(&self, path: &str) -> RequestBuilder {
        self.req(Method::GET, path)
    }

    fn post(&self, path: &str, body: Value) -> RequestBuilder {
        self.req(Method::POST, path).json(&body)
    }

    fn patch(&self, path: &str, body: Value) -> RequestBuilder {
        self.req(Method::PATCH, path).json(&body)
    }

    fn delete(&self, path: &str) -> RequestBuilder {
        self.req(Method::DELETE, path)
    }

    /// Creates an account with a chosen id.
    async fn account(&self, id: Uuid, fields: Value) {
        let mut body = fields;
        body["accountid"] = json!(id);
        let r = send(self.post("accounts", body)).await;
        assert_eq!(r.status, 204, "{}", r.text());
    }

    fn entity_url(&self, set: &str, id: Uuid) -> String {
        format!("{}{set}({id})", self.root)
    }
}

struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The id in `OData-EntityId: {root}{set}(<guid>)`.
    fn entity_id(&self) -> Uuid {
        let url = self.header("odata-entityid").expect("OData-EntityId");
        let inside = url
            .rsplit_once('(')
            .and_then(|(_, rest)| rest.strip_suffix(')'))
            .expect("a key segment");
        Uuid::parse_str(inside).expect("a GUID key")
    }
}

async fn send(request: RequestBuilder) -> Resp {
    let response = request.send().await.expect("the request is answered");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("body").to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

/// Status, `OData-Version`, JSON content type and the exact error envelope.
fn assert_error(r: &Resp, status: u16, code: &str, message: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("odata-version"), Some("4.0"));
    assert_eq!(r.header("content-type"), Some(JSON));
    assert_eq!(
        r.json(),
        json!({"error": {"code": code, "message": message}})
    );
}

fn etag(n: u64) -> String {
    format!("W/\"{n}\"")
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

// ---- create / read / update / delete ----

#[tokio::test]
async fn item_01_create_answers_204_with_the_entity_id() {
    let api = Api::new().await;
    let r = send(api.post("accounts", json!({"name": "N"}))).await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    assert_eq!(r.header("odata-version"), Some("4.0"));
    assert_eq!(r.header("x-ms-dop-hint"), Some("4"));
    let new = r.entity_id();
    assert_eq!(
        r.header("odata-entityid"),
        Some(api.entity_url("accounts", new).as_str())
    );
    assert_eq!(
        api.emu.rows("account"),
        vec![json!({"@odata.etag": etag(1), "accountid": new, "name": "N", "versionnumber": 1})]
    );
}

#[tokio::test]
async fn item_02_create_with_representation_answers_201_with_the_row() {
    let api = Api::new().await;
    let r = send(
        api.post("accounts", json!({"name": "N"}))
            .header("Prefer", "return=representation"),
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        r.header("preference-applied"),
        Some("return=representation")
    );
    assert_eq!(r.header("etag"), Some(etag(1).as_str()));
    assert_eq!(r.header("content-type"), Some(JSON));
    let body = r.json();
    let new = body["accountid"].as_str().expect("accountid").to_owned();
    assert_eq!(
        body,
        json!({
            "@odata.context": format!("{}$metadata#accounts/$entity", api.root),
            "@odata.etag": etag(1),
            "accountid": new,
            "name": "N",
            "versionnumber": 1,
        })
    );
    let r = send(
        api.post("accounts?$select=name", json!({"name": "S"}))
            .header("Prefer", "return=representation"),
    )
    .await;
    assert_eq!(r.status, 201);
    let body = r.json();
    assert_eq!(
        body,
        json!({
            "@odata.context": format!("{}$metadata#accounts(name)/$entity", api.root),
            "@odata.etag": etag(2),
            "accountid": body["accountid"],
            "name": "S",
        })
    );
}

#[tokio::test]
async fn item_03_create_with_a_chosen_id_and_a_second_create_is_412() {
    let api = Api::new().await;
    let g = id(0xA1);
    let r = send(api.post("accounts", json!({"accountid": g, "name": "N"}))).await;
    assert_eq!(r.status, 204);
    assert_eq!(r.entity_id(), g);
    let again = send(api.post("accounts", json!({"accountid": g, "name": "N"}))).await;
    assert_error(
        &again,
        412,
        "0x80040237",
        "A record with matching key values already exists.",
    );
    assert_eq!(api.emu.row_count("account"), 1);
}

#[tokio::test]
async fn item_04_read_with_select_has_etag_header_and_primary_key() {
    let api = Api::new().await;
    let g = id(1);
    api.account(g, json!({"name": "N", "accountnumber": "A-1"}))
        .await;
    let r = send(api.get(&format!("accounts({g})?$select=name"))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("etag"), Some(etag(1).as_str()));
    assert_eq!(r.header("preference-applied"), None);
    assert_eq!(
        r.json(),
        json!({
            "@odata.context": format!("{}$metadata#accounts(name)/$entity", api.root),
            "@odata.etag": etag(1),
            "name": "N",
            "accountid": g,
        })
    );
    // Without $select: every stored column; by the named primary key and by alternate key alike.
    for path in [
        format!("accounts(accountid={g})"),
        "accounts(accountnumber='A-1')".to_owned(),
    ] {
        let r = send(api.get(&path)).await;
        assert_eq!(
            r.json(),
            json!({
                "@odata.context": format!("{}$metadata#accounts/$entity", api.root),
                "@odata.etag": etag(1),
                "accountid": g,
                "name": "N",
                "accountnumber": "A-1",
                "versionnumber": 1,
            }),
            "{path}"
        );
    }
    // A selected column the row does not have is null; upper-case GUIDs address the same row.
    let upper = g.to_string().to_uppercase();
    let r = send(api.get(&format!("accounts({upper})?$select=telephone1"))).await;
    assert_eq!(r.json()["telephone1"], Value::Null);
}

#[tokio::test]
async fn item_05_reading_a_missing_row_is_404_object_does_not_exist() {
    let api = Api::new().await;
    let missing = id(0xDEAD);
    let r = send(api.get(&format!("accounts({missing})"))).await;
    assert_error(
        &r,
        404,
        "0x80040217",
        &format!("Entity 'account' With Id = {missing} Does Not Exist"),
    );
    let r = send(api.get("accounts(accountnumber='nope')")).await;
    assert_error(
        &r,
        404,
        "0x80060891",
        "A record with the specified key values does not exist in account entity",
    );
}

#[tokio::test]
async fn items_06_07_update_changes_the_etag_and_can_return_the_row() {
    let api = Api::new().await;
    let g = id(1);
    api.account(g, json!({"name": "N"})).await;
    let r = send(
        api.patch(&format!("accounts({g})"), json!({"name": "M"}))
            .header("If-Match", "*"),
    )
    .await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    let read = send(api.get(&format!("accounts({g})?$select=name"))).await;
    assert_eq!(read.header("etag"), Some(etag(2).as_str()));
    assert_eq!(read.json()["name"], "M");
    // Every write takes a new version, even without a change.
    let r = send(
        api.patch(&format!("accounts({g})?$select=name"), json!({"name": "M"}))
            .header("Prefer", "return=representation"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("etag"), Some(etag(3).as_str()));
    assert_eq!(
        r.json(),
        json!({
            "@odata.context": format!("{}$metadata#accounts(name)/$entity", api.root),
            "@odata.etag": etag(3),
            "name": "M",
            "accountid": g,
        })
    );
}

#[tokio::test]
async fn item_08_delete_then_404() {
    let api = Api::new().await;
    let g = id(1);
    api.account(g, json!({"name": "N"})).await;
    let r = send(api.delete(&format!("accounts({g})"))).await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    let r = send(api.delete(&format!("accounts({g})"))).await;
    assert_error(
        &r,
        404,
        "0x80040217",
        &format!("Entity 'account' With Id = {g} Does Not Exist"),
    );
    assert_eq!(api.emu.row_count("account"), 0);
}

// ---- upsert ----

#[tokio::test]
async fn item_09_upsert_by_guid_creates_the_row_with_that_id() {
    let api = Api::new().await;
    let g = id(9);
    let r = send(api.patch(&format!("accounts({g})"), json!({"name": "U"}))).await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("odata-entityid"),
        Some(api.entity_url("accounts", g).as_str())
    );
    assert_eq!(
        api.emu.rows("account"),
        vec![json!({"@odata.etag": etag(1), "accountid": g, "name": "U", "versionnumber": 1})]
    );
}

#[tokio::test]
async fn items_10_11_upsert_by_alternate_key_creates_then_updates() {
    let api = Api::new().await;
    let r = send(api.patch("accounts(accountnumber='K1')", json!({"name": "U"}))).await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    let entity_id = format!("{}accounts(accountnumber='K1')", api.root);
    assert_eq!(r.header("odata-entityid"), Some(entity_id.as_str()));
    let rows = api.emu.rows("account");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["accountnumber"], "K1");
    assert_eq!(rows[0]["name"], "U");
    let g = rows[0]["accountid"].clone();

    let r = send(api.patch("accounts(accountnumber='K1')", json!({"name": "V"}))).await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("odata-entityid"), Some(entity_id.as_str()));
    assert_eq!(
        api.emu.rows("account"),
        vec![
            json!({"@odata.etag": etag(2), "accountid": g, "accountnumber": "K1", "name": "V", "versionnumber": 2})
        ]
    );
}

#[tokio::test]
async fn item_12_upsert_with_representation_is_201_then_200() {
    let api = Api::new().await;
    let path = "accounts(accountnumber='K1')?$select=accountid";
    let first = send(
        api.patch(path, json!({"name": "U"}))
            .header("Prefer", "return=representation"),
    )
    .await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("etag"), Some(etag(1).as_str()));
    assert_eq!(
        first.header("preference-applied"),
        Some("return=representation")
    );
    let g = first.json()["accountid"].clone();
    assert_eq!(
        first.json(),
        json!({
            "@odata.context": format!("{}$metadata#accounts(accountid)/$entity", api.root),
            "@odata.etag": etag(1),
            "accountid": g,
        })
    );
    let second = send(
        api.patch(path, json!({"name": "V"}))
            .header("Prefer", "return=representation"),
    )
    .await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("etag"), Some(etag(2).as_str()));
    assert_eq!(
        second.json(),
        json!({
            "@odata.context": format!("{}$metadata#accounts(accountid)/$entity", api.root),
            "@odata.etag": etag(2),
            "accountid": g,
        })
    );
}

#[tokio::test]
async fn item_13_body_key_wins_on_create_and_is_ignored_on_update() {
    let api = Api::new().await;
    let r = send(api.patch(
        "accounts(accountnumber='URL')",
        json!({"name": "A", "accountnumber": "BODY"}),
    ))
    .await;
    assert_eq!(r.status, 204);
    let rows = api.emu.rows("account");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["accountnumber"], "BODY");

    let r = send(api.patch(
        "accounts(accountnumber='BODY')",
        json!({"name": "B", "accountnumber": "CHANGED"}),
    ))
    .await;
    assert_eq!(r.status, 204);
    let rows = api.emu.rows("account");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["accountnumber"], "BODY");
    assert_eq!(rows[0]["name"], "B");
}

fn composite_config() -> EmulatorConfig {
    EmulatorConfig::new()
        .table(EmulatedTable::accounts())
        .table(
            EmulatedTable::new("contact", "contacts", "contactid", "fullname")
                .alternate_key(&["emailaddress1", "new_externalid"]),
        )
        .table(
            EmulatedTable::new(
                "example_record",
                "example_records",
                "example_recordid",
                "example_name",
            )
            .alternate_key(&["example_key1", "example_key2"]),
        )
}

#[tokio::test]
async fn item_14_composite_keys_upsert_like_single_keys() {
    let api = Api::with(composite_config()).await;
    let path = "example_records(example_key1=2,example_key2=2)";
    let r = send(api.patch(path, json!({"example_name": "first"}))).await;
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("odata-entityid"),
        Some(format!("{}{path}", api.root).as_str())
    );
    // Key order in the URL does not matter.
    let r = send(api.patch(
        "example_records(example_key2=2,example_key1=2)",
        json!({"example_name": "second"}),
    ))
    .await;
    assert_eq!(r.status, 204);
    let rows = api.emu.rows("example_record");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["example_key1"], 2);
    assert_eq!(rows[0]["example_key2"], 2);
    assert_eq!(rows[0]["example_name"], "second");

    // A string and an integer part; the string holds key syntax.
    let contact = "contacts(emailaddress1='a,b=c)%27%27d',new_externalid=7)";
    let r = send(api.patch(contact, json!({"fullname": "C"}))).await;
    assert_eq!(r.status, 204);
    let r = send(api.get(contact)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["emailaddress1"], "a,b=c)'d");
    assert_eq!(r.json()["new_externalid"], 7);
    // A string '7' is not the integer 7.
    let r = send(api.get("contacts(emailaddress1='a,b=c)%27%27d',new_externalid='7')")).await;
    assert_eq!(r.status, 404);
    // Half a composite key is not a key.
    let r = send(api.get("example_records(example_key1=2)")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "0x80060890");
}

#[tokio::test]
async fn item_15_if_match_star_makes_upsert_an_update() {
    let api = Api::new().await;
    let missing = id(0xBAD);
    let r = send(
        api.patch(&format!("accounts({missing})"), json!({"name": "x"}))
            .header("If-Match", "*"),
    )
    .await;
    assert_error(
        &r,
        404,
        "0x80040217",
        &format!("Entity 'account' With Id = {missing} Does Not Exist"),
    );
    let r = send(
        api.patch("accounts(accountnumber='K9')", json!({"name": "x"}))
            .header("If-Match", "*"),
    )
    .await;
    assert_error(
        &r,
        404,
        "0x80060891",
        "A record with the specified key values does not exist in account entity",
    );
    assert_eq!(api.emu.row_count("account"), 0);
    let g = id(1);
    api.account(g, json!({"name": "N"})).await;
    let r = send(
        api.patch(&format!("accounts({g})"), json!({"name": "x"}))
            .header("If-Match", "*"),
    )
    .await;
    assert_eq!(r.status, 204);
}

#[tokio::test]
async fn item_16_if_none_match_star_makes_upsert_a_create() {
    let api = Api::new().await;
    let r = send(
        api.patch("accounts(accountnumber='K1')", json!({"name": "x"}))
            .header("If-None-Match", "*"),
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(api.emu.row_count("account"), 1);
    let r = send(
        api.patch("accounts(accountnumber='K1')", json!({"name": "y"}))
            .header("If-None-Match", "*"),
    )
    .await;
    assert_error(
        &r,
        412,
        "0x80040237",
        "A record with matching key values already exists.",
    );
    assert_eq!(api.emu.rows("account")[0]["name"], "x");
    // `If-None-Match: null` (sent to defeat caches) is no condition.
    let r = send(
        api.patch("accounts(accountnumber='K1')", json!({"name": "z"}))
            .header("If-None-Match", "null"),
    )
    .await;
    assert_eq!(r.status, 204);
}

#[tokio::test]
async fn item_17_stale_if_match_is_412_on_patch_and_delete() {
    let api = Api::new().await;
    let g = id(1);
    api.account(g, json!({"name": "N"})).await;
    send(api.patch(&format!("accounts({g})"), json!({"name": "M"}))).await;
    let stale = etag(1);
    let message =
        "The version of the existing record doesn't match the RowVersion property provided.";
    let r = send(
        api.patch(&format!("accounts({g})"), json!({"name": "x"}))
            .header("If-Match", &stale),
    )
    .await;
    assert_error(&r, 412, "0x80060882", message);
    let r = send(
        api.delete(&format!("accounts({g})"))
            .header("If-Match", &stale),
    )
    .await;
    assert_error(&r, 412, "0x80060882", message);
    assert_eq!(api.emu.rows("account")[0]["name"], "M");
    let r = send(
        api.patch(&format!("accounts({g})"), json!({"name": "x"}))
            .header("If-Match", etag(2)),
    )
    .await;
    assert_eq!(r.status, 204);
    let r = send(
        api.delete(&format!("accounts({g})"))
            .header("If-Match", etag(3)),
    )
    .await;
    assert_eq!(r.status, 204);
}

#[tokio::test]
async fn item_17_delete_by_alternate_key_and_if_match_on_a_missing_row() {
    let api = Api::new().await;
    let g = id(1);
    api.account(g, json!({"name": "N", "accountnumber": "K1"}))
        .await;
    let by_key = "accounts(accountnumber='K1')";
    let r = send(api.delete(by_key).header("If-Match", etag(7))).await;
    assert_error(
        &r,
        412,
        "0x80060882",
        "The version of the existing record doesn't match the RowVersion property provided.",
    );
    assert_eq!(api.emu.row_count("account"), 1);
    let r = send(api.delete(by_key).header("If-Match", etag(1))).await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    assert_eq!(api.emu.row_count("account"), 0);
    // A missing row is 404 whatever the condition, by key and by id.
    let r = send(api.delete(by_key).header("If-Match", etag(1))).await;
    assert_error(
        &r,
        404,
        "0x80060891",
        "A record with the specified key values does not exist in account entity",
    );
    let r = send(
        api.delete(&format!("accounts({g})"))
            .header("If-Match", "*"),
    )
    .await;
    assert_error(
        &r,
        404,
        "0x80040217",
        &format!("Entity 'account' With Id = {g} Does Not Exist"),
    );
    api.account(id(2), json!({"name": "M"})).await;
    let r = send(
        api.delete(&format!("accounts({})", id(2)))
            .header("If-Match", "*"),
    )
    .await;
    assert_eq!(r.status, 204, "If-Match: * deletes an existing row");
}

#[tokio::test]
async fn item_18_conditional_get_is_304_unless_expanded_or_annotated() {
    let api = Api::new().await;
    let g = id(1);
    api.account(g, json!({"name": "N"})).await;
    let path = format!("accounts({g})?$select=name");
    let r = send(api.get(&path).header("If-None-Match", etag(1))).await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag(1).as_str()));
    let r = send(api.get(&path).header("If-None-Match", etag(0))).await;
    assert_eq!(r.status, 200);
    let r = send(
        api.get(&format!("{path}&$expand=primarycontactid"))
            .header("If-None-Match", etag(1)),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        api.get(&path)
            .header("If-None-Match", etag(1))
            .header("Prefer", "odata.include-annotations=\"*\""),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn item_19_a_non_key_column_in_the_key_segment_is_400() {
    let api = Api::new().await;
    let message = "The key in the request URI is not valid for resource 'Microsoft.Dynamics.CRM.account'. Ensure that the names and number of key properties match the declared or alternate key properties for the resource 'Microsoft.Dynamics.CRM.account'.";
    for request in [
        api.get("accounts(name='x')"),
        api.patch("accounts(name='x')", json!({"name": "y"})),
        api.delete("accounts(accountnumber='a',name='x')"),
        api.get("accounts('not-a-guid')"),
    ] {
        let r = send(request).await;
        assert_error(&r, 400, "0x80060890", message);
    }
    assert_eq!(api.emu.row_count("account"), 0);
}

#[tokio::test]
async fn hostile_alternate_key_values_round_trip_through_the_client_encoding() {
    let api = Api::new().await;
    let other = id(0x0B);
    api.account(
        other,
        json!({"name": "Other", "accountnumber": "O'Brien & Co"}),
    )
    .await;
    let before = api.emu.rows("account");

    let value = "O'Brien & Co/1?";
    let key = EntityRef::by_key("account", [("accountnumber", value)])
        .expect("a key")
        .key;
    let segment = odata::key_segment(&key);
    assert_eq!(segment, "(accountnumber='O%27%27Brien%20%26%20Co%2F1%3F')");
    let r = send(api.patch(&format!("accounts{segment}"), json!({"name": "OB"}))).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(
        r.header("odata-entityid"),
        Some(format!("{}accounts{segment}", api.root).as_str())
    );
    let r = send(api.get(&format!("accounts{segment}?$select=accountnumber,name"))).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["accountnumber"], value);
    assert_eq!(body["name"], "OB");
    assert_ne!(body["accountid"], json!(other));

    let rows = api.emu.rows("account");
    assert_eq!(rows.len(), 2);
    assert!(
        rows.contains(&before[0]),
        "the other row is untouched: {rows:?}"
    );
    // The same key again updates the same row.
    let r = send(api.patch(&format!("accounts{segment}"), json!({"name": "OB2"}))).await;
    assert_eq!(r.status, 204);
    assert_eq!(api.emu.row_count("account"), 2);
}

#[tokio::test]
async fn alternate_keys_are_unique_and_nulls_do_not_participate() {
    let api = Api::new().await;
    let message = "Entity Key account_accountnumber_key violated. A record with the same value for accountnumber already exists. A duplicate record cannot be created. Try again with a unique value.";
    api.account(id(1), json!({"accountnumber": "K1"})).await;
    let r = send(api.post("accounts", json!({"accountnumber": "K1"}))).await;
    assert_error(&r, 412, "0x80060892", message);
    api.account(id(2), json!({"accountnumber": "K2"})).await;
    let r = send(api.patch(
        &format!("accounts({})", id(2)),
        json!({"accountnumber": "K1"}),
    ))
    .await;
    assert_error(&r, 412, "0x80060892", message);
    // Rows without a key value do not collide.
    api.account(id(3), json!({"name": "a"})).await;
    api.account(id(4), json!({"name": "b", "accountnumber": null}))
        .await;
    assert_eq!(api.emu.row_count("account"), 4);
    // A row giving up its key value frees it.
    let r = send(api.patch(
        &format!("accounts({})", id(1)),
        json!({"accountnumber": null}),
    ))
    .await;
    assert_eq!(r.status, 204);
    let r = send(api.patch(
        &format!("accounts({})", id(2)),
        json!({"accountnumber": "K1"}),
    ))
    .await;
    assert_eq!(r.status, 204);
    let r = send(api.get("accounts(accountnumber='K1')?$select=name")).await;
    assert_eq!(r.json()["accountid"], json!(id(2)));
}

#[tokio::test]
async fn the_duplicate_key_error_is_configurable() {
    let api = Api::with(EmulatorConfig::default().duplicate_key_error(
        409,
        "0xDUP",
        "{table}/{key}/{columns}",
    ))
    .await;
    api.account(id(1), json!({"accountnumber": "K1"})).await;
    let r = send(api.post("accounts", json!({"accountnumber": "K1"}))).await;
    assert_error(
        &r,
        409,
        "0xDUP",
        "account/account_accountnumber_key/accountnumber",
    );
}

#[tokio::test]
async fn declared_columns_reject_other_properties() {
    let api =
        Api::with(EmulatorConfig::new().table(EmulatedTable::accounts().columns(&["telephone1"])))
            .await;
    let r = send(api.post(
        "accounts",
        json!({"name": "a", "accountnumber": "K", "telephone1": "1"}),
    ))
    .await;
    assert_eq!(r.status, 204);
    let r = send(api.post("accounts", json!({"name": "a", "fax": "2"}))).await;
    assert_error(
        &r,
        400,
        "0x80060888",
        "Invalid property 'fax' was found in entity 'Microsoft.Dynamics.CRM.account'.",
    );
    let r = send(api.get("accounts?$select=fax")).await;
    assert_error(
        &r,
        400,
        "0x80060888",
        "Could not find a property named 'fax' on type 'Microsoft.Dynamics.CRM.account'.",
    );
    assert_eq!(api.emu.row_count("account"), 1);
}

#[tokio::test]
async fn malformed_bodies_and_urls_are_400_not_panics() {
    let api = Api::new().await;
    let r = send(api.req(Method::POST, "accounts").body("{not json")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "0x80048d19");
    let r = send(api.post("accounts", json!([1, 2]))).await;
    assert_eq!(r.status, 400);
    let r = send(api.post("accounts", json!({"accountid": "nope"}))).await;
    assert_eq!(r.status, 400);
    let r = send(api.get("accounts(accountnumber='unterminated)")).await;
    assert_eq!(r.status, 400);
    let r = send(api.get("accounts(%FF)")).await;
    assert_eq!(r.status, 400);
    let r = send(api.get("nothings")).await;
    assert_error(
        &r,
        404,
        "0x80060888",
        "Resource not found for the segment 'nothings'.",
    );
    let r = send(api.req(Method::PUT, "accounts")).await;
    assert_error(
        &r,
        405,
        "0x80060888",
        "The requested resource does not support http method 'PUT'.",
    );
    let r = send(api.client.get(format!("{}/elsewhere", api.emu.base_url()))).await;
    assert_eq!(r.status, 404);
    assert_eq!(api.emu.row_count("account"), 0);
}

// ---- lookups ----

#[tokio::test]
async fn items_20_21_binds_with_and_without_a_leading_slash() {
    let api = Api::new().await;
    let a = id(0xA);
    api.account(a, json!({"name": "A"})).await;
    for bind in [
        format!("/accounts({a})"),
        format!("accounts({a})"),
        api.entity_url("accounts", a),
    ] {
        let r = send(api.post(
            "contacts",
            json!({"lastname": "S", "parentcustomerid_account@odata.bind": bind}),
        ))
        .await;
        assert_eq!(r.status, 204, "{bind}: {}", r.text());
        let c = r.entity_id();
        let read = send(api.get(&format!("contacts({c})?$select=_parentcustomerid_value"))).await;
        assert_eq!(
            read.json(),
            json!({
                "@odata.context": format!("{}$metadata#contacts(_parentcustomerid_value)/$entity", api.root),
                "@odata.etag": read.json()["@odata.etag"],
                "_parentcustomerid_value": a,
                "contactid": c,
            })
        );
    }
    // null clears the lookup; so does the plain column.
    let c = id(0xC);
    let r = send(api.patch(
        &format!("contacts({c})"),
        json!({"parentcustomerid_account@odata.bind": format!("/accounts({a})")}),
    ))
    .await;
    assert_eq!(r.status, 204);
    for clear in [
        json!({"parentcustomerid_account@odata.bind": null}),
        json!({"parentcustomerid": null}),
    ] {
        send(api.patch(
            &format!("contacts({c})"),
            json!({"parentcustomerid_account@odata.bind": format!("/accounts({a})")}),
        ))
        .await;
        let r = send(api.patch(&format!("contacts({c})"), clear)).await;
        assert_eq!(r.status, 204);
        let read = send(api.get(&format!("contacts({c})?$select=_parentcustomerid_value"))).await;
        assert_eq!(read.json()["_parentcustomerid_value"], Value::Null);
    }
    // The read-only value property cannot be written.
    let r = send(api.patch(
        &format!("contacts({c})"),
        json!({"_parentcustomerid_value": a}),
    ))
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn item_22_bind_to_a_missing_guid_is_404_and_writes_nothing() {
    let api = Api::new().await;
    let missing = id(0x404);
    let r = send(api.post(
        "contacts",
        json!({"lastname": "S", "parentcustomerid_account@odata.bind": format!("/accounts({missing})")}),
    ))
    .await;
    assert_error(
        &r,
        404,
        "0x80040217",
        &format!("Entity 'account' With Id = {missing} Does Not Exist"),
    );
    assert_eq!(api.emu.row_count("contact"), 0);
    // Configurable.
    let api = Api::with(EmulatorConfig::default().lookup_missing_error(
        400,
        "0xLOOK",
        "missing {table} {id}",
    ))
    .await;
    let r = send(api.post(
        "contacts",
        json!({"parentcustomerid_account@odata.bind": format!("/accounts({missing})")}),
    ))
    .await;
    assert_error(&r, 400, "0xLOOK", &format!("missing account {missing}"));
}

#[tokio::test]
async fn item_23_bind_by_alternate_key() {
    let api = Api::new().await;
    let a = id(0xA);
    api.account(a, json!({"accountnumber": "K1"})).await;
    let r = send(api.post(
        "contacts",
        json!({"parentcustomerid_account@odata.bind": "/accounts(accountnumber='K1')"}),
    ))
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        api.emu.rows("contact")[0]["_parentcustomerid_value"],
        json!(a)
    );
    let r = send(api.post(
        "contacts",
        json!({"parentcustomerid_account@odata.bind": "/accounts(accountnumber='K2')"}),
    ))
    .await;
    assert_error(
        &r,
        404,
        "0x80060891",
        "A record with the specified key values does not exist in account entity",
    );
    assert_eq!(api.emu.row_count("contact"), 1);
    // Configurable.
    let api =
        Api::with(EmulatorConfig::default().key_missing_error(412, "0xKEY", "no {table}")).await;
    let r = send(api.post(
        "contacts",
        json!({"parentcustomerid_account@odata.bind": "/accounts(accountnumber='K2')"}),
    ))
    .await;
    assert_error(&r, 412, "0xKEY", "no account");
}

#[tokio::test]
async fn item_24_wrong_case_navigation_property_is_400() {
    let api = Api::new().await;
    let a = id(0xA);
    api.account(a, json!({})).await;
    let r = send(api.post(
        "contacts",
        json!({"Parentcustomerid_account@odata.bind": format!("/accounts({a})")}),
    ))
    .await;
    assert_error(
        &r,
        400,
        "0x80060888",
        "An undeclared property 'Parentcustomerid_account' which only has property annotations in the payload but no property value was found in the payload. In OData, only declared navigation properties and declared named streams can be represented as properties without values.",
    );
    // A bind to the wrong table.
    let r = send(api.post(
        "contacts",
        json!({"parentcustomerid_account@odata.bind": format!("/contacts({a})")}),
    ))
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(api.emu.row_count("contact"), 0);
}

// ---- $batch ----

async fn post_batch(
    api: &Api,
    batch: &BatchRequest,
    prefer: Option<&str>,
) -> (Resp, Vec<ResponsePart>) {
    let mut request = api
        .req(Method::POST, "$batch")
        .header("Content-Type", batch.content_type())
        .body(batch.encode(ROOT_PATH));
    if let Some(prefer) = prefer {
        request = request.header("Prefer", prefer);
    }
    let r = send(request).await;
    let content_type = r.header("content-type").expect("Content-Type").to_owned();
    assert!(
        content_type.starts_with("multipart/mixed; boundary=batchresponse_"),
        "{content_type}"
    );
    assert!(
        !r.text().replace("\r\n", "").contains('\n'),
        "CRLF line breaks only"
    );
    let parts = batch::parse_response(&content_type, &r.body).expect("a well-formed response");
    (r, parts)
}

fn single(part: &ResponsePart) -> &OperationResponse {
    match part {
        ResponsePart::Single(r) => r,
        other => panic!("expected a single response, got {other:?}"),
    }
}

fn change_set(part: &ResponsePart) -> &[OperationResponse] {
    match part {
        ResponsePart::ChangeSet(r) => r,
        other => panic!("expected a change set, got {other:?}"),
    }
}

fn part_json(response: &OperationResponse) -> Value {
    serde_json::from_slice(&response.body).expect("JSON part body")
}

fn assert_created_part(api: &Api, response: &OperationResponse, set: &str) -> Uuid {
    assert_eq!(response.status, 204);
    assert!(response.body.is_empty());
    assert_eq!(response.header_value("OData-Version"), Some("4.0"));
    let location = response.header_value("Location").expect("Location");
    assert_eq!(response.header_value("OData-EntityId"), Some(location));
    let prefix = format!("{}{set}(", api.root);
    let inside = location
        .strip_prefix(&prefix)
        .and_then(|s| s.strip_suffix(')'))
        .expect("a canonical URL");
    Uuid::parse_str(inside).expect("GUID")
}

fn assert_failed_part(response: &OperationResponse, status: u16, code: &str, message: &str) {
    assert_eq!(response.status, status);
    let req_id = response.header_value("REQ_ID").expect("REQ_ID");
    assert!(Uuid::parse_str(req_id).is_ok(), "{req_id}");
    assert_eq!(response.header_value("Content-Type"), Some(JSON));
    assert_eq!(
        part_json(response),
        json!({"error": {"code": code, "message": message}})
    );
}

#[tokio::test]
async fn item_26_independent_posts() {
    let api = Api::new().await;
    let mut batch = BatchRequest::new();
    for name in ["a", "b", "c"] {
        batch.parts.push(Part::Single(
            Operation::new("POST", "accounts").json(json!({"name": name}).to_string()),
        ));
    }
    let (r, parts) = post_batch(&api, &batch, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("odata-version"), Some("4.0"));
    assert_eq!(r.header("preference-applied"), None);
    assert_eq!(parts.len(), 3);
    for (part, name) in parts.iter().zip(["a", "b", "c"]) {
        let created = assert_created_part(&api, single(part), "accounts");
        let read = send(api.get(&format!("accounts({created})?$select=name"))).await;
        assert_eq!(read.json()["name"], name);
    }
    let counts = api.emu.counts();
    assert_eq!(counts.batch_operations, 3);
    assert_eq!(counts.by_kind["batch"], 1);
    assert_eq!(counts.by_kind["create"], 3);
}

#[tokio::test]
async fn item_27_content_id_binds_inside_a_change_set() {
    let api = Api::new().await;
    let mut batch = BatchRequest::new();
    batch.parts.push(Part::ChangeSet(vec![
        Operation::new("POST", "accounts")
            .json(r#"{"name":"Parent placeholder"}"#)
            .content_id("1"),
        Operation::new("POST", "contacts")
            .json(r#"{"lastname":"Smith","parentcustomerid_account@odata.bind":"$1"}"#)
            .content_id("2"),
    ]));
    let (r, parts) = post_batch(&api, &batch, None).await;
    assert_eq!(r.status, 200);
    let responses = change_set(&parts[0]);
    assert_eq!(responses.len(), 2);
    assert_eq!(responses[0].content_id.as_deref(), Some("1"));
    assert_eq!(responses[1].content_id.as_deref(), Some("2"));
    let account = assert_created_part(&api, &responses[0], "accounts");
    let contact = assert_created_part(&api, &responses[1], "contacts");
    let read = send(api.get(&format!(
        "contacts({contact})?$select=_parentcustomerid_value"
    )))
    .await;
    assert_eq!(read.json()["_parentcustomerid_value"], json!(account));
}

#[tokio::test]
async fn item_28_content_id_urls_resolve_to_the_created_entity() {
    let api = Api::new().await;
    let mut batch = BatchRequest::new();
    batch.parts.push(Part::ChangeSet(vec![
        Operation::new("POST", "accounts")
            .json(r#"{"name":"A"}"#)
            .content_id("1"),
        Operation::new("PATCH", "$1")
            .json(r#"{"accountnumber":"B-1"}"#)
            .content_id("2"),
        Operation::new("PUT", "$1/name")
            .json(r#"{"value":"Renamed"}"#)
            .content_id("3"),
    ]));
    let (r, parts) = post_batch(&api, &batch, None).await;
    assert_eq!(r.status, 200);
    let responses = change_set(&parts[0]);
    let created = assert_created_part(&api, &responses[0], "accounts");
    assert_eq!(
        assert_created_part(&api, &responses[1], "accounts"),
        created
    );
    assert_eq!(responses[2].status, 204);
    assert_eq!(responses[2].header_value("Location"), None);
    assert_eq!(
        api.emu.rows("account"),
        vec![
            json!({"@odata.etag": etag(3), "accountid": created, "accountnumber": "B-1", "name": "Renamed", "versionnumber": 3})
        ]
    );
}

#[tokio::test]
async fn item_29_an_undeclared_content_id_is_400() {
    let api = Api::new().await;
    let mut batch = BatchRequest::new();
    batch.parts.push(Part::ChangeSet(vec![
        Operation::new("POST", "contacts")
            .json(r#"{"parentcustomerid_account@odata.bind":"$1"}"#)
            .content_id("2"),
        Operation::new("POST", "accounts")
            .json("{}")
            .content_id("1"),
    ]));
    let (r, parts) = post_batch(&api, &batch, None).await;
    assert_eq!(r.status, 400);
    let responses = change_set(&parts[0]);
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0].content_id.as_deref(), Some("2"));
    assert_failed_part(
        &responses[0],
        400,
        "0x80060888",
        "Content-ID Reference: '$1' does not exist in the batch context.",
    );
    let mut batch = BatchRequest::new();
    batch.parts.push(Part::ChangeSet(vec![
        Operation::new("PATCH", "$5/name")
            .json("{}")
            .content_id("1"),
    ]));
    let (_, parts) = post_batch(&api, &batch, None).await;
    assert_failed_part(
        &change_set(&parts[0])[0],
        400,
        "0x80060888",
        "Content-ID Reference: '$5' does not exist in the batch context.",
    );
    assert_eq!(
        api.emu.row_count("account") + api.emu.row_count("contact"),
        0
    );
}

#[tokio::test]
async fn item_30_a_failed_change_set_rolls_back_and_answers_one_error_part() {
    let api = Api::new().await;
    let existing = id(0xE);
    api.account(existing, json!({"name": "before"})).await;
    let missing = id(0x404);
    let mut batch = BatchRequest::new();
    batch.parts.push(Part::ChangeSet(vec![
        Operation::new("POST", "accounts")
            .json(r#"{"name":"new"}"#)
            .content_id("1"),
        Operation::new("PATCH", format!("accounts({existing})"))
            .json(r#"{"name":"after"}"#)
            .content_id("2"),
        Operation::new("DELETE", format!("accounts({existing})")).content_id("3"),
        Operation::new("POST", "contacts")
            .json(
                json!({"parentcustomerid_account@odata.bind": format!("/accounts({missing})")})
                    .to_string(),
            )
            .content_id("4"),
    ]));
    let (r, parts) = post_batch(&api, &batch, None).await;
    assert_eq!(r.status, 404);
    assert_eq!(parts.len(), 1);
    let responses = change_set(&parts[0]);
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0].content_id.as_deref(), Some("4"));
    assert_failed_part(
        &responses[0],
        404,
        "0x80040217",
        &format!("Entity 'account' With Id = {missing} Does Not Exist"),
    );
    assert_eq!(
        api.emu.rows("account"),
        vec![
            json!({"@odata.etag": etag(1), "accountid": existing, "name": "before", "versionnumber": 1})
        ]
    );
    assert_eq!(api.emu.row_count("contact"), 0);
    // The version counter was rolled back too: the next write is version 2.
    let r = send(api.patch(&format!("accounts({existing})"), json!({"name": "x"}))).await;
    assert_eq!(r.status, 204);
    assert_eq!(api.emu.rows("account")[0]["@odata.etag"], etag(2));
}

fn failing_batch(existing_missing: Uuid) -> BatchRequest {
    let mut batch = BatchRequest::new();
    batch.parts.push(Part::Single(
        Operation::new("POST", "accounts").json(r#"{"name":"one"}"#),
    ));
    batch.parts.push(Part::Single(
        Operation::new("PATCH", format!("accounts({existing_missing})"))
            .header("If-Match", "*")
            .json(r#"{"name":"two"}"#),
    ));
    batch.parts.push(Part::Single(
        Operation::new("POST", "accounts").json(r#"{"name":"three"}"#),
    ));
    batch
}

#[tokio::test]
async fn item_31_without_continue_on_error_processing_stops_at_the_first_failure() {
    let api = Api::new().await;
    let missing = id(0x404);
    let (r, parts) = post_batch(&api, &failing_batch(missing), None).await;
    assert_eq!(r.status, 404);
    assert_eq!(parts.len(), 2, "the earlier success, then the failure");
    assert_created_part(&api, single(&parts[0]), "accounts");
    assert_failed_part(
        single(&parts[1]),
        404,
        "0x80040217",
        &format!("Entity 'account' With Id = {missing} Does Not Exist"),
    );
    assert_eq!(api.emu.row_count("account"), 1, "part 3 did not run");

    // The first part failing: only it is returned.
    let mut batch = BatchRequest::new();
    batch
        .parts
        .push(Part::Single(Operation::new("POST", "accounts").json("[]")));
    batch
        .parts
        .push(Part::Single(Operation::new("POST", "accounts").json("{}")));
    let (r, parts) = post_batch(&api, &batch, None).await;
    assert_eq!(r.status, 400);
    assert_eq!(parts.len(), 1);
    assert_eq!(single(&parts[0]).status, 400);
    assert_eq!(api.emu.row_count("account"), 1);
}

#[tokio::test]
async fn item_32_continue_on_error_runs_every_part() {
    let api = Api::new().await;
    let missing = id(0x404);
    let (r, parts) = post_batch(
        &api,
        &failing_batch(missing),
        Some("odata.continue-on-error"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("preference-applied"),
        Some("odata.continue-on-error")
    );
    assert_eq!(parts.len(), 3);
    assert_created_part(&api, single(&parts[0]), "accounts");
    assert_failed_part(
        single(&parts[1]),
        404,
        "0x80040217",
        &format!("Entity 'account' With Id = {missing} Does Not Exist"),
    );
    assert_created_part(&api, single(&parts[2]), "accounts");
    assert_eq!(api.emu.row_count("account"), 2);
}

#[tokio::test]
async fn item_33_get_inside_a_change_set_is_400() {
    let api = Api::new().await;
    let mut batch = BatchRequest::new();
    batch.parts.push(Part::ChangeSet(vec![
        Operation::new("POST", "accounts")
            .json("{}")
            .content_id("1"),
        Operation::new("GET", "accounts").content_id("2"),
    ]));
    let (r, parts) = post_batch(&api, &batch, None).await;
    assert_eq!(r.status, 400);
    let responses = change_set(&parts[0]);
    assert_eq!(responses.len(), 1);
    assert_failed_part(
        &responses[0],
        400,
        "0x80060888",
        "GET requests are not allowed inside a change set.",
    );
    assert_eq!(api.emu.row_count("account"), 0);
}

#[tokio::test]
async fn item_34_more_than_1000_operations_are_rejected_before_running_any() {
    let api = Api::new().await;
    let mut batch = BatchRequest::new();
    batch.parts.push(Part::ChangeSet(
        (0..500)
            .map(|_| Operation::new("POST", "accounts").json("{}"))
            .collect(),
    ));
    for _ in 0..501 {
        batch
            .parts
            .push(Part::Single(Operation::new("POST", "accounts").json("{}")));
    }
    assert_eq!(batch.operations(), 1001);
    let r = send(
        api.req(Method::POST, "$batch")
            .header("Content-Type", batch.content_type())
            .body(batch.encode(ROOT_PATH)),
    )
    .await;
    assert_error(
        &r,
        400,
        "0x80048d19",
        "The batch contains 1001 requests; at most 1000 are allowed (MaxBatchSize).",
    );
    assert_eq!(api.emu.row_count("account"), 0);
    assert_eq!(api.emu.counts().batch_operations, 0);
}

#[tokio::test]
async fn item_35_lf_bodies_quoted_boundaries_and_any_url_form() {
    let api = Api::new().await;
    let absolute = format!("{}accounts", api.root);
    let body = format!(
        "--b_1\n\
Content-Type: multipart/mixed; boundary=c_1\n\
\n\
--c_1\n\
Content-Type: application/http\n\
Content-Transfer-Encoding: binary\n\
Content-ID: 1\n\
\n\
POST {absolute} HTTP/1.1\n\
Content-Type: application/json\n\
\n\
{{\"name\":\"--b_1 inside a string\"}}\n\
--c_1--\n\
--b_1\n\
Content-Type: application/http\n\
\n\
POST /api/data/v9.2/accounts HTTP/1.1\n\
Content-Type: application/json\n\
\n\
{{\"name\":\"rooted\"}}\n\
--b_1\n\
Content-Type: application/http\n\
\n\
POST accounts HTTP/1.1\n\
Content-Type: application/json\n\
\n\
{{\"name\":\"relative\"}}\n\
--b_1--\n"
    );
    for content_type in [
        "multipart/mixed; boundary=\"b_1\"",
        "multipart/mixed;boundary=b_1",
    ] {
        let r = send(
            api.req(Method::POST, "$batch")
                .header("Content-Type", content_type)
                .body(body.clone()),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let text = r.text();
        assert!(
            !text.replace("\r\n", "").contains('\n'),
            "answers with CRLF"
        );
        let parts = batch::parse_response(r.header("content-type").unwrap(), &r.body).unwrap();
        assert_eq!(parts.len(), 3);
        assert_created_part(&api, &change_set(&parts[0])[0], "accounts");
        assert_created_part(&api, single(&parts[1]), "accounts");
        assert_created_part(&api, single(&parts[2]), "accounts");
    }
    let mut names: Vec<String> = api
        .emu
        .rows("account")
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "--b_1 inside a string",
            "--b_1 inside a string",
            "relative",
            "relative",
            "rooted",
            "rooted"
        ]
    );
}

#[tokio::test]
async fn item_36_collection_parts_are_streaming_json() {
    let api = Api::new().await;
    let a = id(1);
    api.account(a, json!({"name": "Parent placeholder"})).await;
    let mut batch = BatchRequest::new();
    batch.parts.push(Part::Single(
        Operation::new("GET", "accounts?$select=name&$top=1").header("Accept", "application/json"),
    ));
    batch.parts.push(Part::Single(Operation::new(
        "GET",
        format!("accounts({a})?$select=name"),
    )));
    let (r, parts) = post_batch(&api, &batch, None).await;
    assert_eq!(r.status, 200);
    let list = single(&parts[0]);
    assert_eq!(list.status, 200);
    assert_eq!(
        list.header_value("Content-Type"),
        Some("application/json; odata.metadata=minimal; odata.streaming=true")
    );
    assert_eq!(
        part_json(list),
        json!({
            "@odata.context": format!("{}$metadata#accounts(name)", api.root),
            "value": [{"@odata.etag": etag(1), "name": "Parent placeholder", "accountid": a}],
        })
    );
    let one = single(&parts[1]);
    assert_eq!(one.header_value("Content-Type"), Some(JSON));
    assert_eq!(one.header_value("ETag"), Some(etag(1).as_str()));
}

#[tokio::test]
async fn batch_parts_honour_their_own_headers() {
    let api = Api::new().await;
    let mut batch = BatchRequest::new();
    let upsert = || {
        Operation::new("PATCH", "accounts(accountnumber='K1')?$select=accountid")
            .header("Prefer", "return=representation")
            .header("MSCRM.BypassCustomPluginExecution", "true")
            .json(r#"{"name":"x"}"#)
    };
    batch.parts.push(Part::Single(upsert()));
    batch.parts.push(Part::Single(upsert()));
    batch.parts.push(Part::Single(
        Operation::new("PATCH", "accounts(accountnumber='K1')")
            .header("If-Match", etag(1))
            .json(r#"{"name":"stale"}"#),
    ));
    batch.parts.push(Part::Single(
        Operation::new("PATCH", "accounts(accountnumber='K1')")
            .header("If-None-Match", "*")
            .json(r#"{"name":"create only"}"#),
    ));
    let (r, parts) = post_batch(&api, &batch, Some("odata.continue-on-error")).await;
    assert_eq!(r.status, 200);
    let first = single(&parts[0]);
    assert_eq!(first.status, 201);
    assert_eq!(first.header_value("ETag"), Some(etag(1).as_str()));
    assert_eq!(
        first.header_value("Preference-Applied"),
        Some("return=representation")
    );
    let g = part_json(first)["accountid"].clone();
    assert_eq!(
        part_json(first),
        json!({
            "@odata.context": format!("{}$metadata#accounts(accountid)/$entity", api.root),
            "@odata.etag": etag(1),
            "accountid": g,
        })
    );
    let second = single(&parts[1]);
    assert_eq!(second.status, 200);
    assert_eq!(second.header_value("ETag"), Some(etag(2).as_str()));
    assert_failed_part(
        single(&parts[2]),
        412,
        "0x80060882",
        "The version of the existing record doesn't match the RowVersion property provided.",
    );
    assert_failed_part(
        single(&parts[3]),
        412,
        "0x80040237",
        "A record with matching key values already exists.",
    );
    assert_eq!(api.emu.counts().by_kind["bypass"], 2);
}

#[tokio::test]
async fn a_malformed_batch_is_a_plain_json_400() {
    let api = Api::new().await;
    let r = send(
        api.req(Method::POST, "$batch")
            .header("Content-Type", "multipart/mixed; boundary=b")
            .body("--b\r\nContent-Type: application/http\r\n\r\nGET\r\n--b--\r\n"),
    )
    .await;
    assert_error(
        &r,
        400,
        "0x80048d19",
        "The $batch request is malformed: part 1: 'GET' is not a request line (METHOD URL HTTP/1.1).",
    );
    let r = send(api.req(Method::POST, "$batch").body("x")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("content-type"), Some(JSON));
    let r = send(
        api.req(Method::POST, "$batch")
            .header("Content-Type", "application/json")
            .body("{}"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("content-type"), Some(JSON));
}

// ---- bulk ----

#[tokio::test]
async fn item_37_create_multiple_returns_ids_in_target_order() {
    let api = Api::new().await;
    let a = id(0xA);
    api.account(a, json!({})).await;
    let chosen = id(0xC0);
    let r = send(api.post(
        "contacts/Microsoft.Dynamics.CRM.CreateMultiple",
        json!({"Targets": [
            {"@odata.type": "Microsoft.Dynamics.CRM.contact", "fullname": "one", "contactid": chosen},
            {"@odata.type": "Microsoft.Dynamics.CRM.contact", "fullname": "two", "parentcustomerid_account@odata.bind": format!("/accounts({a})")},
        ]}),
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let ids = body["Ids"].as_array().expect("Ids").clone();
    assert_eq!(
        body,
        json!({
            "@odata.context": format!("{}$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse", api.root),
            "Ids": ids,
        })
    );
    assert_eq!(ids[0], json!(chosen));
    let second = ids[1].as_str().unwrap();
    let read = send(api.get(&format!(
        "contacts({second})?$select=fullname,_parentcustomerid_value"
    )))
    .await;
    assert_eq!(read.json()["fullname"], "two");
    assert_eq!(read.json()["_parentcustomerid_value"], json!(a));
    assert_eq!(api.emu.counts().by_kind["bulk"], 1);
}

#[tokio::test]
async fn item_38_targets_need_odata_type() {
    let api = Api::new().await;
    let r = send(api.post(
        "accounts/Microsoft.Dynamics.CRM.CreateMultiple",
        json!({"Targets": [
            {"@odata.type": "Microsoft.Dynamics.CRM.account", "name": "ok"},
            {"name": "untyped"},
        ]}),
    ))
    .await;
    assert_error(
        &r,
        400,
        "0x80048d19",
        "Target 1 of CreateMultiple has no '@odata.type' annotation; every target needs \"@odata.type\": \"Microsoft.Dynamics.CRM.account\".",
    );
    let r = send(api.post(
        "accounts/Microsoft.Dynamics.CRM.CreateMultiple",
        json!({"Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.contact"}]}),
    ))
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(api.emu.row_count("account"), 0);
}

#[tokio::test]
async fn item_39_update_multiple_applies_the_first_of_duplicate_keys() {
    let api = Api::new().await;
    let (a, b) = (id(1), id(2));
    api.account(a, json!({"name": "a"})).await;
    api.account(b, json!({"name": "b"})).await;
    let t = "Microsoft.Dynamics.CRM.account";
    let r = send(api.post(
        "accounts/Microsoft.Dynamics.CRM.UpdateMultiple",
        json!({"Targets": [
            {"@odata.type": t, "accountid": a, "name": "a2"},
            {"@odata.type": t, "accountid": b, "name": "b2"},
            {"@odata.type": t, "accountid": a, "name": "ignored"},
        ]}),
    ))
    .await;
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    let rows = api.emu.rows("account");
    assert_eq!(rows[0]["name"], "a2");
    assert_eq!(rows[1]["name"], "b2");
    // A target without the primary key is an error.
    let r = send(api.post(
        "accounts/Microsoft.Dynamics.CRM.UpdateMultiple",
        json!({"Targets": [{"@odata.type": t, "name": "x"}]}),
    ))
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn item_40_upsert_multiple_by_odata_id_or_primary_key() {
    let api = Api::new().await;
    let existing = id(1);
    api.account(existing, json!({"name": "old", "accountnumber": "K1"}))
        .await;
    let by_id = id(7);
    let t = "Microsoft.Dynamics.CRM.account";
    let r = send(api.post(
        "accounts/Microsoft.Dynamics.CRM.UpsertMultiple",
        json!({"Targets": [
            {"@odata.type": t, "@odata.id": "accounts(accountnumber='K1')", "name": "updated"},
            {"@odata.type": t, "@odata.id": "accounts(accountnumber='K2')", "name": "created"},
            {"@odata.type": t, "@odata.id": format!("{}accounts({by_id})", api.root), "name": "by url"},
            {"@odata.type": t, "accountid": id(8), "name": "by column"},
            {"@odata.type": t, "name": "no key"},
        ]}),
    ))
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    assert_eq!(api.emu.row_count("account"), 5);
    let k1 = send(api.get("accounts(accountnumber='K1')?$select=name"))
        .await
        .json();
    assert_eq!(
        (k1["accountid"].clone(), k1["name"].clone()),
        (json!(existing), json!("updated"))
    );
    let k2 = send(api.get("accounts(accountnumber='K2')?$select=name"))
        .await
        .json();
    assert_eq!(k2["name"], "created");
    let r = send(api.get(&format!("accounts({by_id})?$select=name"))).await;
    assert_eq!(r.json()["name"], "by url");
    let r = send(api.get(&format!("accounts({})?$select=name", id(8)))).await;
    assert_eq!(r.json()["name"], "by column");

    let r = send(api.post(
        "accounts/Microsoft.Dynamics.CRM.UpsertMultiple",
        json!({"Targets": [
            {"@odata.type": t, "@odata.id": "accounts(accountnumber='K3')"},
            {"@odata.type": t, "@odata.id": "/accounts(accountnumber='K3')"},
        ]}),
    ))
    .await;
    assert_error(
        &r,
        400,
        "0x80048d19",
        "Targets 0 and 1 of UpsertMultiple have the same key; each row may appear once.",
    );
    assert_eq!(api.emu.row_count("account"), 5);
}

#[tokio::test]
async fn item_41_any_failing_target_fails_the_whole_request() {
    let api = Api::new().await;
    let existing = id(1);
    api.account(existing, json!({"name": "old", "accountnumber": "K1"}))
        .await;
    let before = api.emu.rows("account");
    let t = "Microsoft.Dynamics.CRM.account";
    let r = send(api.post(
        "accounts/Microsoft.Dynamics.CRM.CreateMultiple",
        json!({"Targets": [
            {"@odata.type": t, "accountnumber": "N1"},
            {"@odata.type": t, "accountnumber": "K1"},
        ]}),
    ))
    .await;
    assert_eq!(r.status, 412);
    assert_eq!(r.json()["error"]["code"], "0x80060892");
    let r = send(api.post(
        "accounts/Microsoft.Dynamics.CRM.UpsertMultiple",
        json!({"Targets": [
            {"@odata.type": t, "@odata.id": "accounts(accountnumber='K1')", "name": "changed"},
            {"@odata.type": t, "@odata.id": "accounts(accountnumber='K5')", "bad@odata.bind": "/accounts(1)"},
        ]}),
    ))
    .await;
    assert_eq!(r.status, 400);
    let r = send(api.post(
        "accounts/Microsoft.Dynamics.CRM.UpdateMultiple",
        json!({"Targets": [
            {"@odata.type": t, "accountid": existing, "name": "changed"},
            {"@odata.type": t, "accountid": id(99), "name": "missing"},
        ]}),
    ))
    .await;
    assert_error(
        &r,
        404,
        "0x80040217",
        &format!("Entity 'account' With Id = {} Does Not Exist", id(99)),
    );
    assert_eq!(api.emu.rows("account"), before, "nothing was written");
}

#[tokio::test]
async fn item_42_tables_without_bulk_support_and_the_probe() {
    let api = Api::with(
        EmulatorConfig::new()
            .table(EmulatedTable::accounts())
            .table(
                EmulatedTable::new("task", "tasks", "activityid", "subject").bulk_supported(false),
            ),
    )
    .await;
    let r = send(api.post(
        "tasks/Microsoft.Dynamics.CRM.CreateMultiple",
        json!({"Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.task"}]}),
    ))
    .await;
    assert_error(
        &r,
        400,
        "0x80040216",
        "The 'CreateMultiple' message is not supported for entity 'task'.",
    );
    assert_eq!(api.emu.row_count("task"), 0);
    let probe = |message: &str, table: &str| {
        format!(
            "sdkmessagefilters?$select=sdkmessagefilterid&$filter=sdkmessageid/name eq @message and primaryobjecttypecode eq @table&@message='{message}'&@table='{table}'"
        )
    };
    let context = format!(
        "{}$metadata#sdkmessagefilters(sdkmessagefilterid)",
        api.root
    );
    for (message, table) in [
        ("CreateMultiple", "task"),
        ("UpsertMultiple", "account"),
        ("CreateMultiple", "nothing"),
    ] {
        let r = send(api.get(&probe(message, table))).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json(),
            json!({"@odata.context": context, "value": []}),
            "{message} {table}"
        );
    }
    for message in ["CreateMultiple", "UpdateMultiple"] {
        let r = send(api.get(&probe(message, "account"))).await;
        let body = r.json();
        let value = body["value"].as_array().expect("value");
        assert_eq!(value.len(), 1, "{message}");
        assert!(Uuid::parse_str(value[0]["sdkmessagefilterid"].as_str().unwrap()).is_ok());
    }
    assert_eq!(api.emu.counts().by_kind["metadata"], 5);
}

// ---- service protection and headers ----

#[tokio::test(start_paused = true)]
async fn item_43_request_limit_answers_429_with_retry_after_until_the_window_frees() {
    let api = Api::with(EmulatorConfig::default().request_limit(3, Duration::from_secs(300))).await;
    for remaining in ["2", "1", "0"] {
        let r = send(api.get("WhoAmI")).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-ms-ratelimit-burst-remaining-xrm-requests"),
            Some(remaining)
        );
    }
    let r = send(api.get("WhoAmI")).await;
    assert_error(
        &r,
        429,
        "0x80072322",
        "Number of requests exceeded the limit of 3 over time window of 300 seconds.",
    );
    assert_eq!(r.header("retry-after"), Some("300"));
    tokio::time::advance(Duration::from_millis(299_500)).await;
    let r = send(api.get("WhoAmI")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"), "rounded up, at least 1");
    tokio::time::advance(Duration::from_millis(500)).await;
    let r = send(api.get("WhoAmI")).await;
    assert_eq!(r.status, 200);
    let counts = api.emu.counts();
    assert_eq!(counts.throttled, 2);
    assert_eq!(counts.by_kind["rejected"], 2);
    assert_eq!(counts.http_requests, 6);
}

#[tokio::test]
async fn item_43_concurrency_limit_answers_429_immediately() {
    let api = Api::with(EmulatorConfig::default().concurrency_limit(2)).await;
    api.emu.faults().hold(true);
    let mut held = Vec::new();
    for n in 0..2 {
        let request = api.post("accounts", json!({"name": format!("held {n}")}));
        held.push(tokio::spawn(send(request)));
    }
    while api.emu.counts().in_flight < 2 {
        tokio::task::yield_now().await;
    }
    let r = send(api.get("WhoAmI")).await;
    assert_error(
        &r,
        429,
        "0x80072326",
        "Number of concurrent requests exceeded the limit of 2.",
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    api.emu.faults().hold(false);
    for request in held {
        assert_eq!(request.await.expect("joined").status, 204);
    }
    assert_eq!(api.emu.row_count("account"), 2);
    assert_eq!(api.emu.counts().in_flight, 0);
    let r = send(api.get("WhoAmI")).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn item_44_every_response_carries_the_dop_hint() {
    let api = Api::with(EmulatorConfig::default().dop_hint(7).require_token("t")).await;
    let r = send(api.get("WhoAmI")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-ms-dop-hint"), Some("7"));
    for request in [
        api.get("WhoAmI"),
        api.get("accounts(00000000-0000-0000-0000-000000000001)"),
        api.post("accounts", json!({})),
    ] {
        let r = send(request.bearer_auth("t")).await;
        assert_eq!(r.header("x-ms-dop-hint"), Some("7"));
        assert_eq!(r.header("odata-version"), Some("4.0"));
        assert_eq!(
            r.header("x-ms-ratelimit-burst-remaining-xrm-requests"),
            None
        );
    }
}

#[tokio::test]
async fn item_45_who_am_i() {
    let api = Api::new().await;
    let r = send(api.get("WhoAmI")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(JSON));
    assert_eq!(
        r.json(),
        json!({
            "@odata.context": format!("{}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse", api.root),
            "BusinessUnitId": "4f5195a4-7a75-e911-a97a-000d3a34a1b0",
            "UserId": "4f5195a4-7a75-e911-a97a-000d3a34a1b1",
            "OrganizationId": "4f5195a4-7a75-e911-a97a-000d3a34a1b2",
        })
    );
    assert_eq!(api.emu.counts().by_kind["whoami"], 1);
}

// ---- paging, change tracking ----

async fn five_accounts(api: &Api) {
    for n in 1..=5 {
        api.account(
            id(n),
            json!({"name": format!("n{n}"), "accountnumber": format!("K{n}")}),
        )
        .await;
    }
}

fn names(body: &Value) -> Vec<String> {
    body["value"]
        .as_array()
        .expect("value")
        .iter()
        .map(|r| r["name"].as_str().unwrap_or("-").to_owned())
        .collect()
}

#[tokio::test]
async fn item_46_paging_with_maxpagesize_and_next_links() {
    let api = Api::new().await;
    five_accounts(&api).await;
    let first = send(
        api.get("accounts?$select=name")
            .header("Prefer", "odata.maxpagesize=2"),
    )
    .await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.header("preference-applied"),
        Some("odata.maxpagesize=2")
    );
    let body = first.json();
    assert_eq!(
        body["value"],
        json!([
            {"@odata.etag": etag(1), "name": "n1", "accountid": id(1)},
            {"@odata.etag": etag(2), "name": "n2", "accountid": id(2)},
        ])
    );
    assert_eq!(
        body["@odata.context"],
        format!("{}$metadata#accounts(name)", api.root)
    );
    let next = body["@odata.nextLink"]
        .as_str()
        .expect("nextLink")
        .to_owned();
    assert!(
        next.starts_with(&format!("{}accounts?$select=name&$skiptoken=", api.root)),
        "{next}"
    );
    let second = send(
        api.client
            .get(&next)
            .header("Prefer", "odata.maxpagesize=2"),
    )
    .await
    .json();
    assert_eq!(names(&second), ["n3", "n4"]);
    let next = second["@odata.nextLink"]
        .as_str()
        .expect("nextLink")
        .to_owned();
    let third = send(
        api.client
            .get(&next)
            .header("Prefer", "odata.maxpagesize=2"),
    )
    .await
    .json();
    assert_eq!(names(&third), ["n5"]);
    assert!(third.get("@odata.nextLink").is_none());

    let r = send(
        api.get("accounts")
            .header("Prefer", "odata.maxpagesize=10000"),
    )
    .await;
    assert_eq!(
        r.header("preference-applied"),
        Some("odata.maxpagesize=5000")
    );
    assert_eq!(names(&r.json()).len(), 5);
    let r = send(api.get("accounts?$select=name&$top=2")).await.json();
    assert_eq!(names(&r), ["n1", "n2"]);
    assert!(r.get("@odata.nextLink").is_none());
    let r =
        send(api.get("accounts?$select=name&$filter=accountnumber eq 'K4' or name eq 'x'")).await;
    assert_eq!(r.status, 400);
    let r = send(api.get("accounts?$select=name&$filter=accountnumber eq 'K4'"))
        .await
        .json();
    assert_eq!(names(&r), ["n4"]);
    let r = send(
        api.get("accounts?$select=name&$filter=name ne 'n1' and accountnumber ne 'K2'&$count=true"),
    )
    .await
    .json();
    assert_eq!(names(&r), ["n3", "n4", "n5"]);
    assert_eq!(r["@odata.count"], 3);
}

#[tokio::test]
async fn item_47_skip_is_rejected() {
    let api = Api::new().await;
    let r = send(api.get("accounts?$skip=2")).await;
    assert_error(
        &r,
        400,
        "0x80060888",
        "The query parameter $skip is not supported.",
    );
}

#[tokio::test]
async fn item_48_change_tracking_reports_changes_and_deletions() {
    let api = Api::new().await;
    five_accounts(&api).await;
    let initial = send(
        api.get("accounts?$select=name,accountnumber")
            .header("Prefer", "odata.track-changes"),
    )
    .await;
    assert_eq!(initial.status, 200);
    assert_eq!(
        initial.header("preference-applied"),
        Some("odata.track-changes")
    );
    let body = initial.json();
    assert_eq!(names(&body).len(), 5);
    let delta_link = body["@odata.deltaLink"]
        .as_str()
        .expect("deltaLink")
        .to_owned();
    assert_eq!(
        delta_link,
        format!(
            "{}accounts?$select=name,accountnumber&$deltatoken=5",
            api.root
        )
    );

    // No change: an empty delta with the same token.
    let r = send(api.client.get(&delta_link)).await.json();
    assert_eq!(r["value"], json!([]));
    assert_eq!(r["@odata.deltaLink"], delta_link);

    let created = id(6);
    api.account(created, json!({"name": "n6"})).await; // v6
    send(api.patch(&format!("accounts({})", id(2)), json!({"name": "n2b"}))).await; // v7
    send(api.delete(&format!("accounts({})", id(3)))).await; // v8
    let transient = id(9);
    api.account(transient, json!({"name": "gone"})).await; // v9
    send(api.delete(&format!("accounts({transient})"))).await; // v10

    let r = send(api.client.get(&delta_link)).await;
    assert_eq!(r.status, 200);
    let deleted = |g: Uuid| json!({"@odata.context": format!("{}$metadata#accounts/$deletedEntity", api.root), "id": g, "reason": "deleted"});
    assert_eq!(
        r.json(),
        json!({
            "@odata.context": format!("{}$metadata#accounts(name,accountnumber)/$delta", api.root),
            "value": [
                {"@odata.etag": etag(6), "name": "n6", "accountnumber": null, "accountid": created},
                {"@odata.etag": etag(7), "name": "n2b", "accountnumber": "K2", "accountid": id(2)},
                deleted(id(3)),
                deleted(transient),
            ],
            "@odata.deltaLink": format!("{}accounts?$select=name,accountnumber&$deltatoken=10", api.root),
        })
    );

    let message = |option: &str| {
        format!("The \"{option}\" query parameter isn't supported when Change Tracking is enabled.")
    };
    let r = send(
        api.get("accounts?$filter=name eq 'x'")
            .header("Prefer", "odata.track-changes"),
    )
    .await;
    assert_error(&r, 400, "0x80060888", &message("$filter"));
    let r = send(
        api.get("accounts?$top=1")
            .header("Prefer", "odata.track-changes"),
    )
    .await;
    assert_error(&r, 400, "0x80060888", &message("$top"));
    let r = send(api.get("accounts?$deltatoken=99")).await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn item_48_large_deltas_are_paged_and_the_last_page_has_the_delta_link() {
    let api = Api::new().await;
    five_accounts(&api).await; // v1..v5
    let delta_link = format!("{}accounts?$select=name&$deltatoken=0", api.root);
    send(api.delete(&format!("accounts({})", id(1)))).await; // v6
    send(api.delete(&format!("accounts({})", id(2)))).await; // v7
    let prefer = "odata.maxpagesize=2";
    let mut pages = Vec::new();
    let mut link = delta_link;
    loop {
        let r = send(api.client.get(&link).header("Prefer", prefer)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        let items: Vec<String> = body["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                v.get("name")
                    .or(v.get("id"))
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        pages.push(items);
        match body.get("@odata.nextLink") {
            Some(next) => {
                assert!(body.get("@odata.deltaLink").is_none());
                link = next.as_str().unwrap().to_owned();
            }
            None => {
                assert_eq!(
                    body["@odata.deltaLink"],
                    format!("{}accounts?$select=name&$deltatoken=7", api.root)
                );
                break;
            }
        }
    }
    assert_eq!(
        pages,
        vec![
            vec!["n3".to_owned(), "n4".to_owned()],
            vec!["n5".to_owned(), id(1).to_string()],
            vec![id(2).to_string()],
        ]
    );
    // Initial tracked reads page too, and end with a deltaLink.
    let r = send(
        api.get("accounts?$select=name")
            .header("Prefer", "odata.track-changes,odata.maxpagesize=2"),
    )
    .await;
    assert_eq!(
        r.header("preference-applied"),
        Some("odata.track-changes,odata.maxpagesize=2")
    );
    let body = r.json();
    assert_eq!(names(&body), ["n3", "n4"]);
    assert!(body.get("@odata.deltaLink").is_none());
    let next = body["@odata.nextLink"].as_str().unwrap().to_owned();
    let body = send(api.client.get(&next).header("Prefer", prefer))
        .await
        .json();
    assert_eq!(names(&body), ["n5"]);
    assert_eq!(
        body["@odata.deltaLink"],
        format!("{}accounts?$select=name&$deltatoken=7", api.root)
    );
}

// ---- metadata ----

#[tokio::test]
async fn entity_definitions_with_keys_and_relationships() {
    let api = Api::new().await;
    let r = send(api.get(
        "EntityDefinitions(LogicalName='account')?$select=LogicalName,EntitySetName,PrimaryIdAttribute,PrimaryNameAttribute&$expand=Keys($select=KeyAttributes)",
    ))
    .await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(
        body,
        json!({
            "@odata.context": format!("{}$metadata#EntityDefinitions(LogicalName,EntitySetName,PrimaryIdAttribute,PrimaryNameAttribute)/$entity", api.root),
            "MetadataId": body["MetadataId"],
            "LogicalName": "account",
            "EntitySetName": "accounts",
            "PrimaryIdAttribute": "accountid",
            "PrimaryNameAttribute": "name",
            "Keys": [{"KeyAttributes": ["accountnumber"]}],
        })
    );
    let r = send(api.get(
        "EntityDefinitions(LogicalName='contact')?$select=LogicalName&$expand=ManyToOneRelationships($select=ReferencingAttribute,ReferencingEntityNavigationPropertyName,ReferencedEntity),Keys",
    ))
    .await;
    let body = r.json();
    assert_eq!(
        body["ManyToOneRelationships"],
        json!([{"ReferencingAttribute": "parentcustomerid", "ReferencingEntityNavigationPropertyName": "parentcustomerid_account", "ReferencedEntity": "account"}])
    );
    assert_eq!(body["Keys"], json!([]));
    let r = send(api.get(
        "EntityDefinitions?$select=LogicalName,EntitySetName&$filter=LogicalName eq 'account'",
    ))
    .await;
    let body = r.json();
    assert_eq!(
        body,
        json!({
            "@odata.context": format!("{}$metadata#EntityDefinitions(LogicalName,EntitySetName)", api.root),
            "value": [{"MetadataId": body["value"][0]["MetadataId"], "LogicalName": "account", "EntitySetName": "accounts"}],
        })
    );
    let r = send(api.get("EntityDefinitions(LogicalName='nothing')")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "0x80040217");
    let r = send(api.get("EntityDefinitions(LogicalName='account')?$select=Nope")).await;
    assert_eq!(r.status, 400);
}

// ---- auth ----

#[tokio::test]
async fn item_52_a_static_token_is_required() {
    let api = Api::with(EmulatorConfig::default().require_token("secret-token")).await;
    for request in [api.get("WhoAmI"), api.get("WhoAmI").bearer_auth("wrong")] {
        let r = send(request).await;
        assert_eq!(r.status, 401);
        assert_eq!(
            r.header("www-authenticate"),
            Some(
                format!(
                    "Bearer authorization_uri={}/common/oauth2/authorize",
                    api.emu.base_url()
                )
                .as_str()
            )
        );
        assert_eq!(r.header("content-type"), Some(JSON));
        assert_eq!(r.json()["error"]["code"], "");
    }
    let r = send(api.get("WhoAmI").bearer_auth("secret-token")).await;
    assert_eq!(r.status, 200);
    assert_eq!(api.emu.counts().by_kind["rejected"], 2);
}

#[tokio::test(start_paused = true)]
async fn item_52_client_credentials_tokens_and_their_expiry() {
    let scope = "https://contoso.crm.dynamics.com/.default";
    let api = Api::with(
        EmulatorConfig::default()
            .client_credentials("tenant-1", "app", "s3cret+/=", scope)
            .token_lifetime(Duration::from_secs(60)),
    )
    .await;
    let endpoint = format!("{}/tenant-1/oauth2/v2.0/token", api.emu.base_url());
    let form = |secret: &str, scope: &str| {
        let enc = |s: &str| {
            s.replace('%', "%25")
                .replace('+', "%2B")
                .replace('/', "%2F")
                .replace('=', "%3D")
                .replace(':', "%3A")
        };
        format!(
            "grant_type=client_credentials&client_id=app&client_secret={}&scope={}",
            enc(secret),
            enc(scope)
        )
    };
    let token_request = |body: String| {
        api.client
            .post(&endpoint)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
    };
    let r = send(token_request(form("s3cret+/=", scope))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let token = body["access_token"].as_str().expect("token").to_owned();
    assert_eq!(
        body,
        json!({"token_type": "Bearer", "expires_in": 60, "ext_expires_in": 60, "access_token": token})
    );
    assert!(token.len() >= 32);

    let r = send(token_request(form("wrong", scope))).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "invalid_client");
    let r = send(token_request(form("s3cret+/=", "https://other/.default"))).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "invalid_scope");

    let r = send(api.get("WhoAmI")).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some(
            format!(
                "Bearer authorization_uri={}/tenant-1/oauth2/authorize",
                api.emu.base_url()
            )
            .as_str()
        )
    );
    let r = send(api.get("WhoAmI").bearer_auth(&token)).await;
    assert_eq!(r.status, 200);
    tokio::time::advance(Duration::from_secs(60)).await;
    let r = send(api.get("WhoAmI").bearer_auth(&token)).await;
    assert_error(&r, 401, "", "The bearer token has expired.");
    assert_eq!(api.emu.counts().by_kind["token"], 3);
}

// ---- TLS ----

#[tokio::test]
async fn tls_serves_https_with_the_generated_certificate() {
    let emu = Emulator::start(EmulatorConfig::default().tls(true))
        .await
        .expect("TLS emulator");
    assert!(emu.base_url().starts_with("https://127.0.0.1:"));
    let pem = emu.certificate_pem().expect("a certificate");
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let trusted = Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).expect("PEM"))
        .build()
        .expect("client");
    let r = send(trusted.get(format!("{}WhoAmI", emu.service_root()))).await;
    assert_eq!(r.status, 200);
    let localhost = emu.service_root().replace("127.0.0.1", "localhost");
    let r = send(trusted.get(format!("{localhost}WhoAmI"))).await;
    assert_eq!(r.status, 200);
    let untrusted = Client::new();
    assert!(
        untrusted
            .get(format!("{}WhoAmI", emu.service_root()))
            .send()
            .await
            .is_err()
    );
    emu.shutdown().await;
}

// ---- faults, counts, lifecycle ----

#[tokio::test(start_paused = true)]
async fn faults_outages_failures_and_latency() {
    let api = Api::new().await;
    let faults = api.emu.faults();
    faults.outage(true);
    let r = send(api.get("WhoAmI")).await;
    assert_error(
        &r,
        503,
        "0x80040216",
        "The service is unavailable (emulated fault).",
    );
    faults.outage(false);
    assert_eq!(send(api.get("WhoAmI")).await.status, 200);

    faults.outage_for(Duration::from_secs(10));
    assert_eq!(send(api.get("WhoAmI")).await.status, 503);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(send(api.get("WhoAmI")).await.status, 200);

    faults.fail_next(2, 429);
    let r = send(api.get("WhoAmI")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "0x80072322");
    assert_eq!(send(api.get("WhoAmI")).await.status, 429);
    assert_eq!(send(api.get("WhoAmI")).await.status, 200);
    faults.fail_next(1, 500);
    assert_eq!(send(api.get("WhoAmI")).await.status, 500);

    async fn statuses(api: &Api, seed: u64) -> Vec<u16> {
        api.emu.faults().fail_rate(0.5, seed);
        let mut out = Vec::new();
        for _ in 0..20 {
            out.push(send(api.get("WhoAmI")).await.status);
        }
        out
    }
    let a = statuses(&api, 42).await;
    let b = statuses(&api, 42).await;
    assert_eq!(a, b, "the same seed fails the same requests");
    assert!(a.contains(&503) && a.contains(&200), "{a:?}");
    faults.clear();

    faults.set_latency(Duration::from_secs(3));
    let started = tokio::time::Instant::now();
    assert_eq!(send(api.get("WhoAmI")).await.status, 200);
    assert!(started.elapsed() >= Duration::from_secs(3));
    faults.clear();
    let counts = api.emu.counts();
    assert_eq!(counts.throttled, 2);
}

#[tokio::test]
async fn counts_by_kind_and_reset() {
    let api = Api::new().await;
    let g = id(1);
    api.account(g, json!({})).await;
    send(
        api.patch(&format!("accounts({g})"), json!({}))
            .header("MSCRM.BypassCustomPluginExecution", "true"),
    )
    .await;
    send(
        api.patch(&format!("accounts({g})?tag=sync"), json!({}))
            .header("If-Match", "*"),
    )
    .await;
    send(api.get(&format!("accounts({g})"))).await;
    send(api.get("accounts")).await;
    send(api.delete(&format!("accounts({g})"))).await;
    send(api.get("EntityDefinitions(LogicalName='account')")).await;
    let counts = api.emu.counts();
    assert_eq!(counts.http_requests, 7);
    assert_eq!(counts.batch_operations, 0);
    let expected: Vec<(&str, u64)> = vec![
        ("bypass", 1),
        ("create", 1),
        ("delete", 1),
        ("metadata", 1),
        ("query", 1),
        ("read", 1),
        ("update", 1),
        ("upsert", 1),
    ];
    assert_eq!(
        counts.by_kind,
        expected
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    );
    api.emu.reset_counts();
    assert_eq!(api.emu.counts(), Default::default());
}

#[tokio::test]
async fn shutdown_and_drop_stop_the_server() {
    let api = Api::new().await;
    let url = format!("{}WhoAmI", api.root);
    assert_eq!(send(api.client.get(&url)).await.status, 200);
    api.emu.shutdown().await;
    assert!(Client::new().get(&url).send().await.is_err());

    let emu = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let url = format!("{}WhoAmI", emu.service_root());
    drop(emu);
    tokio::task::yield_now().await;
    assert!(Client::new().get(&url).send().await.is_err());
}

#[tokio::test]
async fn start_errors_say_what_and_where() {
    let first = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let port: u16 = first
        .base_url()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let err = Emulator::start(EmulatorConfig::default().port(port))
        .await
        .unwrap_err();
    assert!(matches!(err, EmulatorError::Bind { .. }));
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    let err = Emulator::start(EmulatorConfig::new().table(EmulatedTable::contacts()))
        .await
        .unwrap_err();
    assert!(matches!(err, EmulatorError::Config(_)));
    assert!(
        err.to_string().contains("'account', which is not declared"),
        "{err}"
    );
}
