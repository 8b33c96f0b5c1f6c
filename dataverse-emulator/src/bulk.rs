//! `CreateMultiple`, `UpdateMultiple` and `UpsertMultiple`: all targets of one table, all or nothing.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::Shared;
use super::ops::{self, Address, Ctx, R};
use super::reply::{Reply, codes};
use super::tables::{Data, KeyTuple};
use super::url;

const PREFIX: &str = "Microsoft.Dynamics.CRM.";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Message {
    Create,
    Update,
    Upsert,
}

/// Runs one bulk message on `table`; on any failure nothing is written and the failure is returned.
pub(crate) fn execute(
    shared: &Shared,
    data: &mut Data,
    table: usize,
    action: &str,
    body: &[u8],
    ctx: &Ctx<'_>,
) -> R<(Reply, Option<(usize, Uuid)>)> {
    let def = &shared.schema.tables[table];
    let name = action.strip_prefix(PREFIX).unwrap_or(action);
    let message = match name {
        "CreateMultiple" => Message::Create,
        "UpdateMultiple" => Message::Update,
        "UpsertMultiple" => Message::Upsert,
        _ => {
            return Err(Reply::error(
                404,
                codes::ODATA,
                format!("Resource not found for the segment '{action}'."),
            ));
        }
    };
    if !def.bulk {
        // UNCONFIRMED: status and code of a bulk message on a table without support.
        return Err(Reply::error(
            400,
            codes::UNEXPECTED,
            format!(
                "The '{name}' message is not supported for entity '{}'.",
                def.logical
            ),
        ));
    }
    let mut body = ops::parse_body(body)?;
    let Some(Value::Array(targets)) = body.remove("Targets") else {
        return Err(Reply::bad_payload(format!(
            "{name} needs a 'Targets' array."
        )));
    };
    let type_name = def.type_name();
    let mut objects: Vec<Map<String, Value>> = Vec::with_capacity(targets.len());
    for (i, target) in targets.into_iter().enumerate() {
        let Value::Object(object) = target else {
            return Err(Reply::bad_payload(format!(
                "Target {i} of {name} is not an object."
            )));
        };
        // UNCONFIRMED: status and code for a missing or foreign @odata.type.
        match object.get("@odata.type").and_then(Value::as_str) {
            None => {
                return Err(Reply::bad_payload(format!(
                    "Target {i} of {name} has no '@odata.type' annotation; every target needs \"@odata.type\": \"{type_name}\"."
                )));
            }
            Some(t) if t.trim_start_matches('#') != type_name => {
                return Err(Reply::bad_payload(format!(
                    "Target {i} of {name} has '@odata.type' '{t}'; all targets must be '{type_name}'."
                )));
            }
            Some(_) => {}
        }
        objects.push(object);
    }

    let savepoint = data.begin();
    let result = match message {
        Message::Create => create_all(shared, data, table, objects, ctx),
        Message::Update => update_all(shared, data, table, objects, ctx),
        Message::Upsert => upsert_all(shared, data, table, objects, ctx),
    };
    match result {
        Ok(reply) => {
            data.commit(savepoint);
            Ok((reply, None))
        }
        Err(reply) => {
            data.rollback(&shared.schema, savepoint);
            Err(reply)
        }
    }
}

fn create_all(
    shared: &Shared,
    data: &mut Data,
    table: usize,
    objects: Vec<Map<String, Value>>,
    ctx: &Ctx<'_>,
) -> R<Reply> {
    let mut ids = Vec::with_capacity(objects.len());
    for object in objects {
        let changes = ops::prepare(shared, data, table, object, ctx)?;
        let id = changes.id.unwrap_or_else(Uuid::new_v4);
        ops::insert_row(shared, data, table, id, changes, &[])?;
        ids.push(Value::String(id.to_string()));
    }
    Ok(Reply::json(
        200,
        &json!({
            "@odata.context": format!("{}$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse", shared.root),
            "Ids": ids,
        }),
    ))
}

/// Targets name their row by primary key; a repeated key is ignored after its first target.
fn update_all(
    shared: &Shared,
    data: &mut Data,
    table: usize,
    objects: Vec<Map<String, Value>>,
    ctx: &Ctx<'_>,
) -> R<Reply> {
    let def = &shared.schema.tables[table];
    let mut seen = HashSet::new();
    for (i, object) in objects.into_iter().enumerate() {
        let changes = ops::prepare(shared, data, table, object, ctx)?;
        let Some(id) = changes.id else {
            return Err(Reply::bad_payload(format!(
                "Target {i} of UpdateMultiple has no '{}'; UpdateMultiple identifies rows by primary key.",
                def.primary_id
            )));
        };
        if !seen.insert(id) {
            continue;
        }
        if data.row(table, &id).is_none() {
            return Err(ops::not_found(shared, def, &Address::Id(id)));
        }
        ops::update_row(shared, data, table, id, changes, &[])?;
    }
    Ok(Reply::empty(204))
}

#[derive(PartialEq, Eq, Hash)]
enum Identity {
    Id(Uuid),
    Alt(usize, KeyTuple),
}

/// Targets name their row by `@odata.id` (alternate or primary key) or by primary key column; without either
/// the target is created. Two targets with the same key fail the request.
fn upsert_all(
    shared: &Shared,
    data: &mut Data,
    table: usize,
    objects: Vec<Map<String, Value>>,
    ctx: &Ctx<'_>,
) -> R<Reply> {
    let def = &shared.schema.tables[table];
    let mut addressed: Vec<(Option<Address>, Map<String, Value>)> =
        Vec::with_capacity(objects.len());
    let mut seen: HashMap<Identity, usize> = HashMap::new();
    for (i, object) in objects.into_iter().enumerate() {
        let address = match object.get("@odata.id") {
            Some(Value::String(id_url)) => {
                let relative = crate::multipart::relative_url(id_url, ops::ROOT_PATH);
                let relative = relative.strip_prefix('/').unwrap_or(relative);
                let path = url::parse_path(relative)
                    .map_err(|e| Reply::bad_payload(format!("Target {i}: '@odata.id' {e}")))?;
                let (true, Some(key), true) =
                    (path.segment == def.set, &path.key, path.rest.is_empty())
                else {
                    return Err(Reply::bad_payload(format!(
                        "Target {i}: '@odata.id' '{id_url}' is not the URL of a '{}' record.",
                        def.set
                    )));
                };
                Some(ops::address(def, key)?)
            }
            Some(_) => {
                return Err(Reply::bad_payload(format!(
                    "Target {i}: '@odata.id' must be a string."
                )));
            }
            None => match object
                .get(&def.primary_id)
                .and_then(Value::as_str)
                .map(Uuid::parse_str)
            {
                Some(Ok(id)) => Some(Address::Id(id)),
                Some(Err(_)) => {
                    return Err(Reply::bad_payload(format!(
                        "Target {i}: '{}' is not a GUID.",
                        def.primary_id
                    )));
                }
                None => None,
            },
        };
        if let Some(address) = &address {
            let identity = match address {
                Address::Id(id) => Identity::Id(*id),
                Address::Alt { key, tuple, .. } => Identity::Alt(*key, tuple.clone()),
            };
            if let Some(first) = seen.insert(identity, i) {
                // UNCONFIRMED: status and code for duplicate keys in UpsertMultiple.
                return Err(Reply::bad_payload(format!(
                    "Targets {first} and {i} of UpsertMultiple have the same key; each row may appear once."
                )));
            }
        }
        addressed.push((address, object));
    }
    for (address, object) in addressed {
        let existing = address.as_ref().and_then(|a| ops::find(data, table, a));
        let changes = ops::prepare(shared, data, table, object, ctx)?;
        let pairs: &[(String, url::Literal)] = match &address {
            Some(Address::Alt { pairs, .. }) => pairs,
            _ => &[],
        };
        match existing {
            Some(id) => {
                ops::update_row(shared, data, table, id, changes, pairs)?;
            }
            None => {
                let id = match (&changes.id, &address) {
                    (Some(id), _) => *id,
                    (None, Some(Address::Id(id))) => *id,
                    _ => Uuid::new_v4(),
                };
                ops::insert_row(shared, data, table, id, changes, pairs)?;
            }
        }
    }
    Ok(Reply::empty(204))
}
