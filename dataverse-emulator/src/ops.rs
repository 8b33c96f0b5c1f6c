//! Single operations on rows: routing, create, read, update/upsert with conditional headers, delete, lookups.
//! Shared by top-level requests and `$batch` parts; callers hold the data lock.

use std::collections::HashMap;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::Shared;
use super::limits::Kind;
use super::reply::{Reply, codes};
use super::tables::{Data, KeyPart, KeyTuple, Row, TableDef};
use super::url::{self, KeyPredicate, Literal, Prefs, Query, ResourcePath};
use super::{bulk, query};

/// The service root path every Web API URL starts with.
pub(crate) const ROOT_PATH: &str = "/api/data/v9.2/";

pub(crate) type R<T> = Result<T, Reply>;

/// One request, from the top level or a batch part.
#[derive(Debug)]
pub(crate) struct OpRequest<'a> {
    pub(crate) method: &'a str,
    /// Percent-encoded, relative to the service root.
    pub(crate) path: &'a str,
    /// Percent-encoded, without `?`.
    pub(crate) query: Option<&'a str>,
    pub(crate) headers: OpHeaders,
    pub(crate) body: &'a [u8],
}

/// The request headers operations act on.
#[derive(Debug, Default)]
pub(crate) struct OpHeaders {
    pub(crate) if_match: Option<String>,
    /// Without the `null` value clients send to defeat caches.
    pub(crate) if_none_match: Option<String>,
    pub(crate) prefs: Prefs,
}

impl OpHeaders {
    pub(crate) fn new<'a>(
        if_match: Option<&str>,
        if_none_match: Option<&str>,
        prefer: impl IntoIterator<Item = &'a str>,
    ) -> OpHeaders {
        OpHeaders {
            if_match: if_match.map(|v| v.trim().to_owned()),
            if_none_match: if_none_match
                .map(str::trim)
                .filter(|v| !v.eq_ignore_ascii_case("null"))
                .map(str::to_owned),
            prefs: Prefs::parse(prefer),
        }
    }
}

/// Batch context of an operation.
#[derive(Debug, Default)]
pub(crate) struct Ctx<'c> {
    /// Content-ID → (table, id) of the entities created or addressed so far in the current change set.
    pub(crate) content_ids: Option<&'c HashMap<String, (usize, Uuid)>>,
    pub(crate) in_batch: bool,
}

/// What an operation did.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) reply: Reply,
    pub(crate) kind: Kind,
    /// The row written, for Content-ID references.
    pub(crate) entity: Option<(usize, Uuid)>,
}

impl Outcome {
    fn of(kind: Kind, result: R<(Reply, Option<(usize, Uuid)>)>) -> Outcome {
        match result {
            Ok((reply, entity)) => Outcome {
                reply,
                kind,
                entity,
            },
            Err(reply) => Outcome {
                reply,
                kind,
                entity: None,
            },
        }
    }
}

/// Routes and runs one operation.
pub(crate) fn dispatch(
    shared: &Shared,
    data: &mut Data,
    req: &OpRequest<'_>,
    ctx: &Ctx<'_>,
) -> Outcome {
    let rejected = |reply| Outcome::of(Kind::Rejected, Err(reply));
    let path = match url::parse_path(req.path) {
        Ok(path) => path,
        Err(e) => {
            return rejected(Reply::bad_request(format!(
                "Bad Request - Error in query syntax: {e}"
            )));
        }
    };
    let query = match url::parse_query(req.query) {
        Ok(query) => query,
        Err(e) => {
            return rejected(Reply::bad_request(format!(
                "Bad Request - Error in query syntax: {e}"
            )));
        }
    };
    let method = req.method;
    let no_key = path.key.is_none() && path.rest.is_empty();
    match path.segment.as_str() {
        "" if no_key && method == "GET" => {
            Outcome::of(Kind::Metadata, Ok((query::service_document(shared), None)))
        }
        "$metadata" => Outcome::of(Kind::Metadata, Err(Reply::not_implemented("$metadata"))),
        "$batch" => rejected(Reply::bad_request(
            "A batch request cannot contain another batch request.",
        )),
        "WhoAmI" if method == "GET" && path.rest.is_empty() => {
            Outcome::of(Kind::WhoAmI, Ok((query::who_am_i(shared), None)))
        }
        "EntityDefinitions" if method == "GET" => Outcome::of(
            Kind::Metadata,
            query::entity_definitions(shared, &path, &query).map(|r| (r, None)),
        ),
        "sdkmessagefilters" if method == "GET" && no_key => Outcome::of(
            Kind::Metadata,
            query::message_filters(shared, &query).map(|r| (r, None)),
        ),
        "" | "WhoAmI" | "EntityDefinitions" | "sdkmessagefilters" => {
            rejected(method_not_allowed(method))
        }
        set => match shared.schema.by_set(set) {
            Some(table) => table_request(shared, data, table, &path, &query, req, ctx),
            None => rejected(Reply::error(
                404,
                codes::ODATA,
                format!("Resource not found for the segment '{set}'."),
            )),
        },
    }
}

fn method_not_allowed(method: &str) -> Reply {
    Reply::error(
        405,
        codes::ODATA,
        format!("The requested resource does not support http method '{method}'."),
    )
}

fn table_request(
    shared: &Shared,
    data: &mut Data,
    table: usize,
    path: &ResourcePath,
    query: &Query,
    req: &OpRequest<'_>,
    ctx: &Ctx<'_>,
) -> Outcome {
    let method = req.method;
    let rest: Vec<&str> = path.rest.iter().map(String::as_str).collect();
    match (&path.key, rest.as_slice(), method) {
        (None, [], "GET") => Outcome::of(
            Kind::Query,
            query::collection(shared, data, table, query, &req.headers.prefs, ctx.in_batch)
                .map(|r| (r, None)),
        ),
        (None, [], "POST") => {
            Outcome::of(Kind::Create, create(shared, data, table, query, req, ctx))
        }
        (None, [action], "POST") => Outcome::of(
            Kind::Bulk,
            bulk::execute(shared, data, table, action, req.body, ctx),
        ),
        (Some(key), [], "GET") => Outcome::of(
            Kind::Read,
            read(shared, data, table, key, query, &req.headers),
        ),
        (Some(key), [], "PATCH") => {
            let kind = if req.headers.if_match.is_some() {
                Kind::Update
            } else {
                Kind::Upsert
            };
            Outcome::of(kind, upsert(shared, data, table, key, query, req, ctx))
        }
        (Some(key), [], "DELETE") => {
            Outcome::of(Kind::Delete, delete(shared, data, table, key, &req.headers))
        }
        (Some(key), [property], "GET") if !property.starts_with('$') => Outcome::of(
            Kind::Read,
            read_property(shared, data, table, key, property),
        ),
        (Some(key), [property], "PUT") if !property.starts_with('$') => Outcome::of(
            Kind::Update,
            put_property(shared, data, table, key, property, req.body),
        ),
        (None, [], _) | (Some(_), [], _) | (Some(_), [_], _) | (None, [_], _) => {
            Outcome::of(Kind::Rejected, Err(method_not_allowed(method)))
        }
        _ => Outcome::of(
            Kind::Rejected,
            Err(Reply::not_implemented(&format!("the path '{}'", req.path))),
        ),
    }
}

// ---- addresses ----

/// A resolved row address.
#[derive(Clone, Debug)]
pub(crate) enum Address {
    Id(Uuid),
    Alt {
        key: usize,
        tuple: KeyTuple,
        /// As written in the URL, for `OData-EntityId` and for copying into created rows.
        pairs: Vec<(String, Literal)>,
    },
}

pub(crate) fn invalid_key(def: &TableDef) -> Reply {
    let t = def.type_name();
    Reply::error(
        400,
        codes::ENTITY_KEY_NOT_DEFINED,
        format!(
            "The key in the request URI is not valid for resource '{t}'. Ensure that the names and number of key properties match the declared or alternate key properties for the resource '{t}'."
        ),
    )
}

/// Matches a key predicate against the primary key and the declared alternate keys.
pub(crate) fn address(def: &TableDef, key: &KeyPredicate) -> R<Address> {
    match key {
        KeyPredicate::Bare(Literal::Guid(id)) => Ok(Address::Id(*id)),
        KeyPredicate::Bare(_) => Err(invalid_key(def)),
        KeyPredicate::Named(pairs) => {
            if let [(name, value)] = pairs.as_slice()
                && *name == def.primary_id
            {
                return match value {
                    Literal::Guid(id) => Ok(Address::Id(*id)),
                    _ => Err(invalid_key(def)),
                };
            }
            let (k, key_def) = def
                .keys
                .iter()
                .enumerate()
                .find(|(_, k)| {
                    k.columns.len() == pairs.len()
                        && k.columns.iter().all(|c| pairs.iter().any(|(n, _)| n == c))
                })
                .ok_or_else(|| invalid_key(def))?;
            let tuple = key_def
                .columns
                .iter()
                .map(|c| {
                    pairs
                        .iter()
                        .find(|(n, _)| n == c)
                        .and_then(|(_, v)| KeyPart::of_literal(v))
                })
                .collect::<Option<KeyTuple>>()
                .ok_or_else(|| invalid_key(def))?;
            Ok(Address::Alt {
                key: k,
                tuple,
                pairs: pairs.clone(),
            })
        }
    }
}

pub(crate) fn find(data: &Data, table: usize, address: &Address) -> Option<Uuid> {
    match address {
        Address::Id(id) => data.row(table, id).map(|_| *id),
        Address::Alt { key, tuple, .. } => data.by_key(table, *key, tuple),
    }
}

/// The error for a row addressed by `address` that does not exist.
pub(crate) fn not_found(shared: &Shared, def: &TableDef, address: &Address) -> Reply {
    match address {
        Address::Id(id) => Reply::error(
            404,
            codes::OBJECT_DOES_NOT_EXIST,
            format!("Entity '{}' With Id = {id} Does Not Exist", def.logical),
        ),
        Address::Alt { .. } => {
            let t = &shared.key_missing;
            Reply::error(t.status, &t.code, t.render(&[("table", &def.logical)]))
        }
    }
}

/// `{root}{set}(<key as addressed>)`.
fn entity_id_url(shared: &Shared, def: &TableDef, id: Uuid, address: &Address) -> String {
    match address {
        Address::Alt { pairs, .. } => format!(
            "{}{}{}",
            shared.root,
            def.set,
            KeyPredicate::Named(pairs.clone()).encode()
        ),
        Address::Id(_) => canonical_url(shared, def, id),
    }
}

pub(crate) fn canonical_url(shared: &Shared, def: &TableDef, id: Uuid) -> String {
    format!("{}{}({id})", shared.root, def.set)
}

// ---- bodies ----

/// Column values to write, lookups already resolved to `_<column>_value` GUIDs.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub(crate) fields: Vec<(String, Value)>,
    /// The primary key from the body.
    pub(crate) id: Option<Uuid>,
}

pub(crate) fn parse_body(body: &[u8]) -> R<Map<String, Value>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Reply::bad_payload(
            "The request body is empty; a JSON object is expected.",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Reply::bad_payload("The request body is not a JSON object.")),
        Err(e) => Err(Reply::bad_payload(format!(
            "The request body is not valid JSON: {e}"
        ))),
    }
}

fn undeclared_annotation(name: &str) -> Reply {
    Reply::bad_request(format!(
        "An undeclared property '{name}' which only has property annotations in the payload but no property value was found in the payload. In OData, only declared navigation properties and declared named streams can be represented as properties without values."
    ))
}

fn reference_property(_name: &str) -> Reply {
    Reply::bad_request(
        "CRM do not support direct update of Entity Reference properties, Use Navigation properties instead.",
    )
}

pub(crate) fn invalid_property(def: &TableDef, name: &str) -> Reply {
    Reply::bad_request(format!(
        "Invalid property '{name}' was found in entity '{}'.",
        def.type_name()
    ))
}

/// Validates a body and resolves its lookups. Nothing is written.
pub(crate) fn prepare(
    shared: &Shared,
    data: &Data,
    table: usize,
    body: Map<String, Value>,
    ctx: &Ctx<'_>,
) -> R<Changes> {
    let def = &shared.schema.tables[table];
    let mut changes = Changes::default();
    for (name, value) in body {
        if let Some(navprop) = name.strip_suffix("@odata.bind") {
            let Some(lookup) = def.lookup_by_navprop(navprop) else {
                return Err(undeclared_annotation(navprop));
            };
            let target = match &value {
                Value::Null => Value::Null,
                Value::String(url) => {
                    Value::String(resolve_bind(shared, data, lookup.target, url, ctx)?.to_string())
                }
                _ => {
                    return Err(Reply::bad_payload(format!(
                        "The value of '{name}' must be a URL or null."
                    )));
                }
            };
            changes.fields.push((lookup.value_field.clone(), target));
            continue;
        }
        if name.contains('@') {
            continue; // instance and property annotations (`@odata.type`, `name@OData...`)
        }
        if name == def.primary_id {
            let id = value
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(|| {
                    Reply::bad_payload(format!(
                        "Cannot convert the literal '{value}' to the expected type 'Edm.Guid'."
                    ))
                })?;
            changes.id = Some(id);
            continue;
        }
        if name == "versionnumber" {
            continue; // read-only, set by the service
        }
        if def.lookups.iter().any(|l| l.value_field == name) {
            return Err(reference_property(&name));
        }
        let sharing: Vec<&str> = def
            .lookups
            .iter()
            .filter(|l| l.column == name)
            .map(|l| l.value_field.as_str())
            .collect();
        if !sharing.is_empty() {
            if !value.is_null() {
                return Err(reference_property(&name));
            }
            // `{"parentcustomerid": null}` clears the lookup.
            if let Some(field) = sharing.first() {
                changes.fields.push(((*field).to_owned(), Value::Null));
            }
            continue;
        }
        if def.lookup_by_navprop(&name).is_some() {
            return Err(Reply::not_implemented(
                "deep insert (nested records in a body)",
            ));
        }
        if !def.knows_column(&name) {
            return Err(invalid_property(def, &name));
        }
        changes.fields.push((name, value));
    }
    Ok(changes)
}

/// The GUID a bind URL points at (`/accounts(<guid>)`, `accounts(accountnumber='K')`, an absolute URL, `$n`).
fn resolve_bind(shared: &Shared, data: &Data, target: usize, bind: &str, ctx: &Ctx<'_>) -> R<Uuid> {
    let target_def = &shared.schema.tables[target];
    if let Some(content_id) = bind.strip_prefix('$') {
        let Some(&(table, id)) = ctx.content_ids.and_then(|ids| ids.get(content_id)) else {
            return Err(content_id_missing(bind));
        };
        if table != target {
            return Err(Reply::bad_request(format!(
                "The Content-ID reference '{bind}' refers to a '{}' record; the navigation property expects '{}'.",
                shared.schema.tables[table].logical, target_def.logical
            )));
        }
        return Ok(id);
    }
    let relative = crate::multipart::relative_url(bind, ROOT_PATH);
    let relative = relative.strip_prefix('/').unwrap_or(relative);
    let wrong = || {
        Reply::bad_request(format!(
            "The '@odata.bind' value '{bind}' is not the URL of a '{}' record.",
            target_def.set
        ))
    };
    let path = url::parse_path(relative).map_err(|_| wrong())?;
    let (true, Some(key), true) = (
        path.segment == target_def.set,
        &path.key,
        path.rest.is_empty(),
    ) else {
        return Err(wrong());
    };
    let address = address(target_def, key)?;
    match find(data, target, &address) {
        Some(id) => Ok(id),
        None => Err(match address {
            Address::Id(id) => {
                let t = &shared.lookup_missing;
                Reply::error(
                    t.status,
                    &t.code,
                    t.render(&[("table", &target_def.logical), ("id", &id.to_string())]),
                )
            }
            Address::Alt { .. } => {
                let t = &shared.key_missing;
                Reply::error(
                    t.status,
                    &t.code,
                    t.render(&[("table", &target_def.logical)]),
                )
            }
        }),
    }
}

pub(crate) fn content_id_missing(reference: &str) -> Reply {
    let name = reference.split('/').next().unwrap_or(reference);
    Reply::bad_request(format!(
        "Content-ID Reference: '{name}' does not exist in the batch context."
    ))
}

// ---- writes ----

fn check_unique(
    shared: &Shared,
    data: &Data,
    table: usize,
    id: &Uuid,
    fields: &Map<String, Value>,
) -> R<()> {
    let def = &shared.schema.tables[table];
    match data.conflicting_key(def, table, id, fields) {
        None => Ok(()),
        Some(key) => {
            let t = &shared.duplicate_key;
            Err(Reply::error(
                t.status,
                &t.code,
                t.render(&[
                    ("key", &key.name),
                    ("columns", &key.columns.join(", ")),
                    ("table", &def.logical),
                ]),
            ))
        }
    }
}

/// Creates row `id`: `defaults` (key values from the URL) first, the body's values over them.
pub(crate) fn insert_row(
    shared: &Shared,
    data: &mut Data,
    table: usize,
    id: Uuid,
    changes: Changes,
    defaults: &[(String, Literal)],
) -> R<u64> {
    let def = &shared.schema.tables[table];
    if data.row(table, &id).is_some() {
        return Err(duplicate_record());
    }
    let mut fields = Map::new();
    fields.insert(def.primary_id.clone(), Value::String(id.to_string()));
    for (column, literal) in defaults {
        fields.insert(column.clone(), literal.to_json());
    }
    for (column, value) in changes.fields {
        fields.insert(column, value);
    }
    check_unique(shared, data, table, &id, &fields)?;
    let version = data.next_version();
    data.put(def, table, id, Row { fields, version });
    Ok(version)
}

/// Updates row `id` (which exists), ignoring the columns in `strip` (key columns of the URL).
pub(crate) fn update_row(
    shared: &Shared,
    data: &mut Data,
    table: usize,
    id: Uuid,
    changes: Changes,
    strip: &[(String, Literal)],
) -> R<u64> {
    let def = &shared.schema.tables[table];
    let Some(existing) = data.row(table, &id) else {
        return Err(not_found(shared, def, &Address::Id(id)));
    };
    let mut fields = existing.fields.clone();
    for (column, value) in changes.fields {
        if !strip.iter().any(|(c, _)| *c == column) {
            fields.insert(column, value);
        }
    }
    check_unique(shared, data, table, &id, &fields)?;
    let version = data.next_version();
    data.put(def, table, id, Row { fields, version });
    Ok(version)
}

pub(crate) fn duplicate_record() -> Reply {
    Reply::error(
        412,
        codes::DUPLICATE_RECORD,
        "A record with matching key values already exists.",
    )
}

fn version_mismatch() -> Reply {
    Reply::error(
        412,
        codes::CONCURRENCY_VERSION_MISMATCH,
        "The version of the existing record doesn't match the RowVersion property provided.",
    )
}

pub(crate) fn etag(version: u64) -> String {
    format!("W/\"{version}\"")
}

/// Whether an `If-Match` / `If-None-Match` value (`*`, or ETags, comma-separated) matches `version`.
fn etag_matches(header: &str, version: u64) -> bool {
    let wanted = version.to_string();
    header.split(',').any(|tag| {
        let tag = tag.trim();
        tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).trim_matches('"') == wanted
    })
}

// ---- representations ----

pub(crate) fn validate_select(def: &TableDef, select: Option<&[String]>) -> R<()> {
    if let Some(columns) = select
        && let Some(unknown) = columns.iter().find(|c| !def.knows_column(c))
    {
        return Err(Reply::bad_request(format!(
            "Could not find a property named '{unknown}' on type '{}'.",
            def.type_name()
        )));
    }
    Ok(())
}

/// A row as the API returns it: `@odata.etag`, the selected columns (always the primary key), or all columns
/// and `versionnumber`.
pub(crate) fn representation(
    def: &TableDef,
    id: &Uuid,
    row: &Row,
    select: Option<&[String]>,
) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("@odata.etag".to_owned(), Value::String(etag(row.version)));
    match select {
        Some(columns) => {
            for column in columns {
                let value = if column == "versionnumber" {
                    Value::from(row.version)
                } else {
                    row.fields.get(column).cloned().unwrap_or(Value::Null)
                };
                out.insert(column.clone(), value);
            }
            out.insert(def.primary_id.clone(), Value::String(id.to_string()));
        }
        None => {
            for (column, value) in &row.fields {
                out.insert(column.clone(), value.clone());
            }
            out.insert("versionnumber".to_owned(), Value::from(row.version));
        }
    }
    out
}

/// `{root}$metadata#accounts/$entity` or `{root}$metadata#accounts(a,b)/$entity`.
fn entity_context(shared: &Shared, def: &TableDef, select: Option<&[String]>) -> String {
    match select {
        Some(columns) => format!(
            "{}$metadata#{}({})/$entity",
            shared.root,
            def.set,
            columns.join(",")
        ),
        None => format!("{}$metadata#{}/$entity", shared.root, def.set),
    }
}

/// `200`/`201` with the row, `ETag` and `Preference-Applied`.
fn row_reply(
    shared: &Shared,
    data: &Data,
    table: usize,
    id: Uuid,
    status: u16,
    select: Option<&[String]>,
) -> Reply {
    let def = &shared.schema.tables[table];
    let Some(row) = data.row(table, &id) else {
        return not_found(shared, def, &Address::Id(id));
    };
    let mut body = representation(def, &id, row, select);
    body.insert(
        "@odata.context".to_owned(),
        Value::String(entity_context(shared, def, select)),
    );
    Reply::json(status, &Value::Object(body))
        .header("ETag", etag(row.version))
        .header("Preference-Applied", "return=representation")
}

// ---- operations ----

fn create(
    shared: &Shared,
    data: &mut Data,
    table: usize,
    query: &Query,
    req: &OpRequest<'_>,
    ctx: &Ctx<'_>,
) -> R<(Reply, Option<(usize, Uuid)>)> {
    let def = &shared.schema.tables[table];
    let select = query.select.as_deref();
    validate_select(def, select)?;
    let body = parse_body(req.body)?;
    let changes = prepare(shared, data, table, body, ctx)?;
    let id = changes.id.unwrap_or_else(Uuid::new_v4);
    insert_row(shared, data, table, id, changes, &[])?;
    let reply = if req.headers.prefs.return_representation {
        row_reply(shared, data, table, id, 201, select)
    } else {
        Reply::empty(204).header("OData-EntityId", canonical_url(shared, def, id))
    };
    Ok((reply, Some((table, id))))
}

fn read(
    shared: &Shared,
    data: &Data,
    table: usize,
    key: &KeyPredicate,
    query: &Query,
    headers: &OpHeaders,
) -> R<(Reply, Option<(usize, Uuid)>)> {
    let def = &shared.schema.tables[table];
    let address = address(def, key)?;
    let select = query.select.as_deref();
    validate_select(def, select)?;
    let id = find(data, table, &address).ok_or_else(|| not_found(shared, def, &address))?;
    if let (Some(tag), Some(row)) = (&headers.if_none_match, data.row(table, &id))
        && tag != "*"
        && etag_matches(tag, row.version)
        && query.expand.is_none()
        && !headers.prefs.include_annotations
    {
        return Ok((Reply::empty(304).header("ETag", etag(row.version)), None));
    }
    let mut reply = row_reply(shared, data, table, id, 200, select);
    reply.headers.retain(|(n, _)| *n != "Preference-Applied");
    Ok((reply, Some((table, id))))
}

fn upsert(
    shared: &Shared,
    data: &mut Data,
    table: usize,
    key: &KeyPredicate,
    query: &Query,
    req: &OpRequest<'_>,
    ctx: &Ctx<'_>,
) -> R<(Reply, Option<(usize, Uuid)>)> {
    let def = &shared.schema.tables[table];
    let address = address(def, key)?;
    let select = query.select.as_deref();
    validate_select(def, select)?;
    let headers = &req.headers;
    let existing = find(data, table, &address);
    let url_pairs: &[(String, Literal)] = match &address {
        Address::Alt { pairs, .. } => pairs,
        Address::Id(_) => &[],
    };
    let (id, created) = match existing {
        None => {
            if headers.if_match.is_some() {
                return Err(not_found(shared, def, &address));
            }
            let changes = prepare(shared, data, table, parse_body(req.body)?, ctx)?;
            let id = match (&changes.id, &address) {
                (Some(id), _) => *id,
                (None, Address::Id(id)) => *id,
                (None, Address::Alt { .. }) => Uuid::new_v4(),
            };
            insert_row(shared, data, table, id, changes, url_pairs)?;
            (id, true)
        }
        Some(id) => {
            let version = data.row(table, &id).map_or(0, |r| r.version);
            if let Some(tag) = &headers.if_match
                && !etag_matches(tag, version)
            {
                return Err(version_mismatch());
            }
            if headers.if_none_match.as_deref() == Some("*") {
                return Err(duplicate_record());
            }
            let changes = prepare(shared, data, table, parse_body(req.body)?, ctx)?;
            update_row(shared, data, table, id, changes, url_pairs)?;
            (id, false)
        }
    };
    let reply = if headers.prefs.return_representation {
        row_reply(
            shared,
            data,
            table,
            id,
            if created { 201 } else { 200 },
            select,
        )
    } else {
        Reply::empty(204).header("OData-EntityId", entity_id_url(shared, def, id, &address))
    };
    Ok((reply, Some((table, id))))
}

fn delete(
    shared: &Shared,
    data: &mut Data,
    table: usize,
    key: &KeyPredicate,
    headers: &OpHeaders,
) -> R<(Reply, Option<(usize, Uuid)>)> {
    let def = &shared.schema.tables[table];
    let address = address(def, key)?;
    let id = find(data, table, &address).ok_or_else(|| not_found(shared, def, &address))?;
    if let (Some(tag), Some(row)) = (&headers.if_match, data.row(table, &id))
        && !etag_matches(tag, row.version)
    {
        return Err(version_mismatch());
    }
    data.delete(def, table, id);
    Ok((Reply::empty(204), None))
}

fn read_property(
    shared: &Shared,
    data: &Data,
    table: usize,
    key: &KeyPredicate,
    property: &str,
) -> R<(Reply, Option<(usize, Uuid)>)> {
    let def = &shared.schema.tables[table];
    let address = address(def, key)?;
    let id = find(data, table, &address).ok_or_else(|| not_found(shared, def, &address))?;
    validate_select(def, Some(&[property.to_owned()]))?;
    let Some(row) = data.row(table, &id) else {
        return Err(not_found(shared, def, &address));
    };
    let value = representation(def, &id, row, Some(&[property.to_owned()]))
        .remove(property)
        .unwrap_or(Value::Null);
    let body = serde_json::json!({
        "@odata.context": format!("{}$metadata#{}({id})/{property}", shared.root, def.set),
        "value": value,
    });
    Ok((Reply::json(200, &body), None))
}

/// `PUT <set>(<key>)/<column>` with `{"value": ...}`.
fn put_property(
    shared: &Shared,
    data: &mut Data,
    table: usize,
    key: &KeyPredicate,
    property: &str,
    body: &[u8],
) -> R<(Reply, Option<(usize, Uuid)>)> {
    let def = &shared.schema.tables[table];
    let address = address(def, key)?;
    let id = find(data, table, &address).ok_or_else(|| not_found(shared, def, &address))?;
    let mut body = parse_body(body)?;
    let Some(value) = body.remove("value") else {
        return Err(Reply::bad_payload(
            "The body of a property update must be {\"value\": ...}.",
        ));
    };
    if property == def.primary_id
        || property == "versionnumber"
        || def.lookups.iter().any(|l| l.value_field == property)
    {
        return Err(reference_property(property));
    }
    if !def.knows_column(property) {
        return Err(invalid_property(def, property));
    }
    let changes = Changes {
        fields: vec![(property.to_owned(), value)],
        id: None,
    };
    update_row(shared, data, table, id, changes, &[])?;
    Ok((Reply::empty(204), Some((table, id))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_match_weak_strong_lists_and_star() {
        assert!(etag_matches("W/\"5\"", 5));
        assert!(etag_matches("\"5\"", 5));
        assert!(etag_matches("W/\"4\", W/\"5\"", 5));
        assert!(etag_matches("*", 5));
        assert!(!etag_matches("W/\"4\"", 5));
    }
}
