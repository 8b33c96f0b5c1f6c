//! Reads of many rows (collections with paging, change tracking deltas) and the metadata the client probes:
//! `EntityDefinitions`, `sdkmessagefilters`, `WhoAmI`, the service document.

use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::Shared;
use super::ops::{R, representation, validate_select};
use super::reply::{JSON, Reply};
use super::tables::{Data, KeyPart, Row, TableDef};
use super::url::{self, Condition, Prefs, Query, encode_query_value, split_top_level};

/// Largest page (Dataverse's default and maximum).
pub(crate) const MAX_PAGE_SIZE: usize = 5000;

fn track_changes_rejects(query: &Query) -> Option<Reply> {
    let option = if query.filter.is_some() {
        "$filter"
    } else if query.orderby.is_some() {
        "$orderby"
    } else if query.expand.is_some() {
        "$expand"
    } else if query.top.is_some() {
        "$top"
    } else {
        return None;
    };
    Some(Reply::bad_request(format!(
        "The \"{option}\" query parameter isn't supported when Change Tracking is enabled."
    )))
}

fn conditions(def: &TableDef, query: &Query) -> R<Vec<Condition>> {
    let Some(filter) = &query.filter else {
        return Ok(Vec::new());
    };
    let conditions = url::parse_filter(filter, &query.aliases).map_err(Reply::bad_request)?;
    for c in &conditions {
        if !def.knows_column(&c.column) || c.column.contains('/') {
            return Err(Reply::bad_request(format!(
                "Could not find a property named '{}' on type '{}'.",
                c.column,
                def.type_name()
            )));
        }
    }
    Ok(conditions)
}

fn matches(row: &Row, conditions: &[Condition]) -> bool {
    conditions.iter().all(|c| {
        let value = if c.column == "versionnumber" {
            Value::from(row.version)
        } else {
            row.fields.get(&c.column).cloned().unwrap_or(Value::Null)
        };
        let equal = KeyPart::of_json(&value) == KeyPart::of_literal(&c.value);
        equal != c.negate
    })
}

/// The query string of generated links: `$select`, `$filter`, `$count` and parameter aliases, then `extra`.
fn link(
    shared: &Shared,
    def: &TableDef,
    query: &Query,
    keep_filter: bool,
    extra: &[(&str, String)],
) -> String {
    let mut params: Vec<String> = Vec::new();
    if let Some(select) = &query.select {
        params.push(format!("$select={}", encode_query_value(&select.join(","))));
    }
    if keep_filter {
        if let Some(filter) = &query.filter {
            params.push(format!("$filter={}", encode_query_value(filter)));
        }
        if query.count {
            params.push("$count=true".to_owned());
        }
        let mut aliases: Vec<_> = query.aliases.iter().collect();
        aliases.sort();
        for (name, value) in aliases {
            params.push(format!(
                "{}={}",
                encode_query_value(name),
                encode_query_value(value)
            ));
        }
    }
    for (name, value) in extra {
        params.push(format!("{name}={}", encode_query_value(value)));
    }
    format!("{}{}?{}", shared.root, def.set, params.join("&"))
}

fn collection_context(shared: &Shared, def: &TableDef, query: &Query, suffix: &str) -> String {
    match &query.select {
        Some(columns) => format!(
            "{}$metadata#{}({}){suffix}",
            shared.root,
            def.set,
            columns.join(",")
        ),
        None => format!("{}$metadata#{}{suffix}", shared.root, def.set),
    }
}

fn json_reply(body: Map<String, Value>, in_batch: bool) -> Reply {
    let mut reply = Reply::json(200, &Value::Object(body));
    if in_batch {
        reply.headers.retain(|(n, _)| *n != "Content-Type");
        reply
            .headers
            .push(("Content-Type", format!("{JSON}; odata.streaming=true")));
    }
    reply
}

fn page_size(prefs: &Prefs) -> usize {
    prefs
        .maxpagesize
        .unwrap_or(MAX_PAGE_SIZE)
        .clamp(1, MAX_PAGE_SIZE)
}

/// `GET <set>`: paging by `Prefer: odata.maxpagesize` (rows ordered by primary key, `$skiptoken` = the last id),
/// `$top`, the simple `$filter`, `$count`, and the initial read of change tracking.
pub(crate) fn collection(
    shared: &Shared,
    data: &Data,
    table: usize,
    query: &Query,
    prefs: &Prefs,
    in_batch: bool,
) -> R<Reply> {
    let def = &shared.schema.tables[table];
    if query.skip.is_some() {
        return Err(Reply::bad_request(
            "The query parameter $skip is not supported.",
        ));
    }
    if let Some(option) = query.unsupported.first() {
        return Err(Reply::not_implemented(&format!(
            "the query option '{option}'"
        )));
    }
    if query.deltatoken.is_some() {
        return delta(shared, data, table, query, prefs, in_batch);
    }
    // A continuation of a tracked read carries the snapshot version in its skiptoken: `<last id>.<version>`.
    let (after, snapshot) = match &query.skiptoken {
        None => (None, None),
        Some(token) => {
            let (id, snapshot) = match token.split_once('.') {
                Some((id, version)) => (
                    id,
                    Some(version.parse::<u64>().map_err(|_| bad_skiptoken(token))?),
                ),
                None => (token.as_str(), None),
            };
            (
                Some(Uuid::parse_str(id).map_err(|_| bad_skiptoken(token))?),
                snapshot,
            )
        }
    };
    let tracking = prefs.track_changes || snapshot.is_some();
    if tracking && let Some(reply) = track_changes_rejects(query) {
        return Err(reply);
    }
    if query.orderby.is_some() {
        return Err(Reply::not_implemented("$orderby"));
    }
    if query.expand.is_some() {
        return Err(Reply::not_implemented("$expand on collections"));
    }
    let select = query.select.as_deref();
    validate_select(def, select)?;
    let conditions = conditions(def, query)?;
    let rows = &data.tables[table].rows;
    let mut ids: Vec<Uuid> = rows
        .iter()
        .filter(|(_, row)| matches(row, &conditions))
        .map(|(id, _)| *id)
        .collect();
    ids.sort_unstable();
    let total = ids.len();
    let start = after.map_or(0, |after| ids.partition_point(|id| *id <= after));
    let remaining = &ids[start..];
    let (limit, pageable) = match query.top {
        Some(top) => (top.min(MAX_PAGE_SIZE), false),
        None => (page_size(prefs), true),
    };
    let page = &remaining[..remaining.len().min(limit)];
    let more = pageable && remaining.len() > page.len();

    let mut body = Map::new();
    body.insert(
        "@odata.context".to_owned(),
        Value::String(collection_context(shared, def, query, "")),
    );
    if query.count {
        body.insert(
            "@odata.count".to_owned(),
            Value::from(total.min(MAX_PAGE_SIZE)),
        );
    }
    let value: Vec<Value> = page
        .iter()
        .filter_map(|id| {
            rows.get(id)
                .map(|row| Value::Object(representation(def, id, row, select)))
        })
        .collect();
    body.insert("value".to_owned(), Value::Array(value));
    let snapshot = snapshot.unwrap_or(data.version);
    if more && let Some(last) = page.last() {
        let token = if tracking {
            format!("{last}.{snapshot}")
        } else {
            last.to_string()
        };
        body.insert(
            "@odata.nextLink".to_owned(),
            Value::String(link(shared, def, query, true, &[("$skiptoken", token)])),
        );
    } else if tracking {
        body.insert(
            "@odata.deltaLink".to_owned(),
            Value::String(link(
                shared,
                def,
                query,
                false,
                &[("$deltatoken", snapshot.to_string())],
            )),
        );
    }
    let mut reply = json_reply(body, in_batch);
    let mut applied = Vec::new();
    if prefs.track_changes {
        applied.push("odata.track-changes".to_owned());
    }
    if prefs.maxpagesize.is_some() {
        applied.push(format!("odata.maxpagesize={}", page_size(prefs)));
    }
    if !applied.is_empty() {
        reply = reply.header("Preference-Applied", applied.join(","));
    }
    Ok(reply)
}

fn bad_skiptoken(token: &str) -> Reply {
    Reply::bad_request(format!("The $skiptoken '{token}' is not valid."))
}

fn bad_deltatoken(token: &str) -> Reply {
    Reply::bad_request(format!("The $deltatoken '{token}' is not valid."))
}

/// `GET <set>?$deltatoken=<version>`: rows written after the version (current state, by version), then
/// `$deletedEntity` items for rows deleted after it, then a new deltaLink. Pages with nextLink
/// (`$skiptoken=<upto>.<r|d><cursor version>`); the last page carries the deltaLink.
fn delta(
    shared: &Shared,
    data: &Data,
    table: usize,
    query: &Query,
    prefs: &Prefs,
    in_batch: bool,
) -> R<Reply> {
    let def = &shared.schema.tables[table];
    let token = query.deltatoken.as_deref().unwrap_or_default();
    let from: u64 = token.parse().map_err(|_| bad_deltatoken(token))?;
    if from > data.version {
        return Err(bad_deltatoken(token));
    }
    if let Some(reply) = track_changes_rejects(query) {
        return Err(reply);
    }
    let select = query.select.as_deref();
    validate_select(def, select)?;
    let (upto, mut deletions, mut cursor) = match &query.skiptoken {
        None => (data.version, false, from),
        Some(skip) => {
            let parse = || -> Option<(u64, bool, u64)> {
                let (upto, rest) = skip.split_once('.')?;
                let deletions = rest.starts_with('d');
                let cursor = rest.get(1..)?.parse().ok()?;
                Some((upto.parse().ok()?, deletions, cursor))
            };
            let (upto, deletions, cursor) = parse().ok_or_else(|| bad_skiptoken(skip))?;
            if upto > data.version || cursor > upto || (!deletions && cursor < from) {
                return Err(bad_skiptoken(skip));
            }
            (upto, deletions, cursor)
        }
    };
    let size = page_size(prefs);
    let table_data = &data.tables[table];
    let mut items: Vec<Value> = Vec::new();
    let mut next: Option<String> = None;
    if !deletions {
        let mut changed: Vec<(u64, Uuid)> = table_data
            .rows
            .iter()
            .filter(|(_, row)| row.version > cursor && row.version <= upto)
            .map(|(id, row)| (row.version, *id))
            .collect();
        changed.sort_unstable();
        for (version, id) in changed.iter().take(size) {
            if let Some(row) = table_data.rows.get(id) {
                items.push(Value::Object(representation(def, id, row, select)));
            }
            cursor = *version;
        }
        if changed.len() > size {
            next = Some(format!("{upto}.r{cursor}"));
        } else {
            deletions = true;
            cursor = from;
        }
    }
    if deletions && next.is_none() {
        let tombstones = &table_data.tombstones;
        let start = tombstones.partition_point(|(v, _)| *v <= cursor);
        let deleted_context = format!("{}$metadata#{}/$deletedEntity", shared.root, def.set);
        for (version, id) in tombstones[start..].iter().take_while(|(v, _)| *v <= upto) {
            if items.len() == size {
                next = Some(format!("{upto}.d{cursor}"));
                break;
            }
            cursor = *version;
            // A row deleted and then written again is reported by its current state instead.
            if table_data
                .rows
                .get(id)
                .is_some_and(|row| row.version <= upto)
            {
                continue;
            }
            items.push(json!({"@odata.context": deleted_context, "id": id, "reason": "deleted"}));
        }
    }
    let mut body = Map::new();
    body.insert(
        "@odata.context".to_owned(),
        Value::String(collection_context(shared, def, query, "/$delta")),
    );
    body.insert("value".to_owned(), Value::Array(items));
    match next {
        Some(skip) => body.insert(
            "@odata.nextLink".to_owned(),
            Value::String(link(
                shared,
                def,
                query,
                false,
                &[("$deltatoken", from.to_string()), ("$skiptoken", skip)],
            )),
        ),
        None => body.insert(
            "@odata.deltaLink".to_owned(),
            Value::String(link(
                shared,
                def,
                query,
                false,
                &[("$deltatoken", upto.to_string())],
            )),
        ),
    };
    let mut reply = json_reply(body, in_batch);
    if prefs.maxpagesize.is_some() {
        reply = reply.header("Preference-Applied", format!("odata.maxpagesize={size}"));
    }
    Ok(reply)
}

/// A GUID derived from `text` (FNV-1a), so metadata ids are stable across runs.
pub(crate) fn stable_guid(text: &str) -> Uuid {
    let mut bytes = [0u8; 16];
    for (half, seed) in [
        (0usize, 0xcbf2_9ce4_8422_2325u64),
        (8, 0x8422_2325_cbf2_9ce4),
    ] {
        let mut hash = seed;
        for b in text.bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        bytes[half..half + 8].copy_from_slice(&hash.to_be_bytes());
    }
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// Fixed identity of the emulated caller.
pub(crate) fn who_am_i(shared: &Shared) -> Reply {
    Reply::json(
        200,
        &json!({
            "@odata.context": format!("{}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse", shared.root),
            "BusinessUnitId": "4f5195a4-7a75-e911-a97a-000d3a34a1b0",
            "UserId": "4f5195a4-7a75-e911-a97a-000d3a34a1b1",
            "OrganizationId": "4f5195a4-7a75-e911-a97a-000d3a34a1b2",
        }),
    )
}

pub(crate) fn service_document(shared: &Shared) -> Reply {
    let sets: Vec<Value> = shared
        .schema
        .tables
        .iter()
        .map(|t| json!({"name": t.set, "kind": "EntitySet", "url": t.set}))
        .collect();
    Reply::json(
        200,
        &json!({"@odata.context": format!("{}$metadata", shared.root), "value": sets}),
    )
}

/// Keeps only `select` (plus `always`) of `object`; unknown names are an error.
fn project(
    mut object: Map<String, Value>,
    select: Option<&[String]>,
    always: &[&str],
    type_name: &str,
) -> R<Map<String, Value>> {
    let Some(select) = select else {
        return Ok(object);
    };
    if let Some(unknown) = select.iter().find(|s| !object.contains_key(s.as_str())) {
        return Err(Reply::bad_request(format!(
            "Could not find a property named '{unknown}' on type 'Microsoft.Dynamics.CRM.{type_name}'."
        )));
    }
    object.retain(|k, _| always.contains(&k.as_str()) || select.iter().any(|s| s == k));
    Ok(object)
}

/// `Keys($select=KeyAttributes)` → ("Keys", Some(["KeyAttributes"])).
fn parse_expand(expand: &str) -> R<Vec<(String, Option<Vec<String>>)>> {
    let mut items = Vec::new();
    for item in split_top_level(expand) {
        let (name, options) = match item.split_once('(') {
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix(')')
                    .ok_or_else(|| Reply::bad_request(format!("Bad $expand item '{item}'.")))?;
                (name.trim(), Some(inner))
            }
            None => (item, None),
        };
        let mut select = None;
        for option in options
            .unwrap_or_default()
            .split(';')
            .filter(|o| !o.trim().is_empty())
        {
            match option.split_once('=') {
                Some((n, v)) if n.trim() == "$select" => {
                    select = Some(
                        v.split(',')
                            .map(|s| s.trim().to_owned())
                            .filter(|s| !s.is_empty())
                            .collect(),
                    );
                }
                _ => {
                    return Err(Reply::not_implemented(&format!(
                        "the $expand option '{option}'"
                    )));
                }
            }
        }
        items.push((name.to_owned(), select));
    }
    Ok(items)
}

fn entity_metadata(shared: &Shared, def: &TableDef, query: &Query) -> R<Map<String, Value>> {
    let Value::Object(full) = json!({
        "MetadataId": stable_guid(&format!("entity:{}", def.logical)),
        "LogicalName": def.logical,
        "SchemaName": def.logical,
        "EntitySetName": def.set,
        "PrimaryIdAttribute": def.primary_id,
        "PrimaryNameAttribute": def.primary_name,
        "ChangeTrackingEnabled": true,
        "IsOptimisticConcurrencyEnabled": true,
    }) else {
        return Err(Reply::bad_request("unreachable"));
    };
    let mut entity = project(
        full,
        query.select.as_deref(),
        &["MetadataId"],
        "EntityMetadata",
    )?;
    if let Some(expand) = &query.expand {
        for (name, select) in parse_expand(expand)? {
            let items: Vec<Map<String, Value>> = match name.as_str() {
                "Keys" => def
                    .keys
                    .iter()
                    .map(|k| {
                        let Value::Object(o) = json!({
                            "MetadataId": stable_guid(&format!("key:{}", k.name)),
                            "LogicalName": k.name,
                            "SchemaName": k.name,
                            "EntityLogicalName": def.logical,
                            "KeyAttributes": k.columns,
                            "EntityKeyIndexStatus": "Active",
                        }) else {
                            return Map::new();
                        };
                        o
                    })
                    .collect(),
                "ManyToOneRelationships" => def
                    .lookups
                    .iter()
                    .map(|l| {
                        let target = &shared.schema.tables[l.target];
                        let schema_name =
                            format!("{}_{}_{}", target.logical, def.logical, l.navprop);
                        let Value::Object(o) = json!({
                            "MetadataId": stable_guid(&format!("relationship:{schema_name}")),
                            "SchemaName": schema_name,
                            "ReferencedEntity": target.logical,
                            "ReferencedAttribute": target.primary_id,
                            "ReferencingEntity": def.logical,
                            "ReferencingAttribute": l.column,
                            "ReferencingEntityNavigationPropertyName": l.navprop,
                        }) else {
                            return Map::new();
                        };
                        o
                    })
                    .collect(),
                other => {
                    return Err(Reply::not_implemented(&format!(
                        "$expand={other} on EntityDefinitions"
                    )));
                }
            };
            let type_name = if name == "Keys" {
                "EntityKeyMetadata"
            } else {
                "OneToManyRelationshipMetadata"
            };
            let projected = items
                .into_iter()
                .map(|item| project(item, select.as_deref(), &[], type_name).map(Value::Object))
                .collect::<R<Vec<Value>>>()?;
            entity.insert(name, Value::Array(projected));
        }
    }
    Ok(entity)
}

/// `EntityDefinitions(LogicalName='account')` and `EntityDefinitions?$filter=LogicalName eq 'account'`.
pub(crate) fn entity_definitions(
    shared: &Shared,
    path: &url::ResourcePath,
    query: &Query,
) -> R<Reply> {
    if !path.rest.is_empty() {
        return Err(Reply::not_implemented(&format!(
            "EntityDefinitions/{}",
            path.rest.join("/")
        )));
    }
    let select_context = query
        .select
        .as_ref()
        .map(|s| format!("({})", s.join(",")))
        .unwrap_or_default();
    match &path.key {
        Some(url::KeyPredicate::Named(pairs)) => {
            let [(name, url::Literal::Str(logical))] = pairs.as_slice() else {
                return Err(Reply::bad_request(
                    "EntityDefinitions is addressed by (LogicalName='<name>').",
                ));
            };
            if name != "LogicalName" {
                return Err(Reply::bad_request(
                    "EntityDefinitions is addressed by (LogicalName='<name>').",
                ));
            }
            let def = shared
                .schema
                .by_logical(logical)
                .map(|t| &shared.schema.tables[t])
                .ok_or_else(|| {
                    Reply::error(
                        404,
                        super::reply::codes::OBJECT_DOES_NOT_EXIST,
                        format!("Could not find entity with logical name '{logical}'."),
                    )
                })?;
            let mut body = entity_metadata(shared, def, query)?;
            body.insert(
                "@odata.context".to_owned(),
                Value::String(format!(
                    "{}$metadata#EntityDefinitions{select_context}/$entity",
                    shared.root
                )),
            );
            Ok(Reply::json(200, &Value::Object(body)))
        }
        Some(_) => Err(Reply::bad_request(
            "EntityDefinitions is addressed by (LogicalName='<name>').",
        )),
        None => {
            let conditions = match &query.filter {
                Some(filter) => {
                    url::parse_filter(filter, &query.aliases).map_err(Reply::bad_request)?
                }
                None => Vec::new(),
            };
            let mut value = Vec::new();
            for def in &shared.schema.tables {
                let Value::Object(fields) = json!({"LogicalName": def.logical, "EntitySetName": def.set, "SchemaName": def.logical})
                else {
                    continue;
                };
                let row = Row { fields, version: 0 };
                let known = conditions.iter().all(|c| {
                    matches!(
                        c.column.as_str(),
                        "LogicalName" | "EntitySetName" | "SchemaName"
                    )
                });
                if !known {
                    return Err(Reply::not_implemented("this $filter on EntityDefinitions"));
                }
                if matches(&row, &conditions) {
                    value.push(Value::Object(entity_metadata(shared, def, query)?));
                }
            }
            Ok(Reply::json(
                200,
                &json!({
                    "@odata.context": format!("{}$metadata#EntityDefinitions{select_context}", shared.root),
                    "value": value,
                }),
            ))
        }
    }
}

/// The bulk-support probe: `sdkmessagefilters?$filter=sdkmessageid/name eq @message and primaryobjecttypecode eq
/// @table&@message='CreateMultiple'&@table='account'`. Finds a filter for `CreateMultiple` and `UpdateMultiple`
/// on tables with bulk support, nothing otherwise (as for `UpsertMultiple` on the real service).
pub(crate) fn message_filters(shared: &Shared, query: &Query) -> R<Reply> {
    let conditions = match &query.filter {
        Some(filter) => url::parse_filter(filter, &query.aliases).map_err(Reply::bad_request)?,
        None => Vec::new(),
    };
    let text = |column: &str| {
        conditions
            .iter()
            .find_map(|c| match (&c.value, c.column == column && !c.negate) {
                (url::Literal::Str(s), true) => Some(s.clone()),
                _ => None,
            })
    };
    let message = text("sdkmessageid/name");
    let table = text("primaryobjecttypecode");
    let supported = match (&message, &table) {
        (Some(message), Some(table)) => {
            matches!(message.as_str(), "CreateMultiple" | "UpdateMultiple")
                && shared
                    .schema
                    .by_logical(table)
                    .is_some_and(|t| shared.schema.tables[t].bulk)
        }
        _ => false,
    };
    let value: Vec<Value> = if supported {
        let id = stable_guid(&format!(
            "filter:{}:{}",
            message.unwrap_or_default(),
            table.unwrap_or_default()
        ));
        vec![json!({"@odata.etag": "W/\"1\"", "sdkmessagefilterid": id})]
    } else {
        Vec::new()
    };
    Ok(Reply::json(
        200,
        &json!({
            "@odata.context": format!("{}$metadata#sdkmessagefilters(sdkmessagefilterid)", shared.root),
            "value": value,
        }),
    ))
}
