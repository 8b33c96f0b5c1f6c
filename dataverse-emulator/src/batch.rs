//! Executing `$batch`: parts in order, change sets atomic (one lock for the whole change set, undone on the
//! first failure), Content-ID references scoped to their change set, stop at the first failure unless
//! `Prefer: odata.continue-on-error`.

use std::collections::HashMap;

use uuid::Uuid;

use super::Shared;
use super::limits::Kind;
use super::multipart::{
    self, MAX_OPERATIONS, Part, PartResponse, Request as Operation, ResponsePart,
};
use super::ops::{self, Ctx, OpHeaders, OpRequest, ROOT_PATH};
use super::reply::{Reply, codes};
use super::tables::Data;
use super::url::Prefs;

/// Runs a `$batch` request body.
pub(crate) fn execute(
    shared: &Shared,
    content_type: Option<&str>,
    prefs: &Prefs,
    body: &[u8],
) -> Reply {
    let Some(content_type) = content_type else {
        return Reply::bad_payload(
            "A $batch request needs a 'Content-Type: multipart/mixed; boundary=...' header.",
        );
    };
    let parts = match multipart::parse(content_type, body) {
        Ok(parts) => parts,
        Err(e) => return Reply::bad_payload(e.to_string()),
    };
    let operations = multipart::operation_count(&parts);
    if operations > MAX_OPERATIONS {
        // UNCONFIRMED: the wire shape of this fault.
        return Reply::error(
            400,
            codes::BAD_PAYLOAD,
            format!(
                "The batch contains {operations} requests; at most {MAX_OPERATIONS} are allowed (MaxBatchSize)."
            ),
        );
    }
    shared.counters.batch_operations(operations as u64);

    let mut responses = Vec::with_capacity(parts.len());
    let mut outer_status = 200;
    for part in &parts {
        match part {
            Part::Single(op) => {
                let response = {
                    let mut data = shared.lock();
                    run(shared, &mut data, op, None)
                };
                let failed = response.status >= 400;
                let status = response.status;
                responses.push(ResponsePart::Single(response));
                if failed && !prefs.continue_on_error {
                    outer_status = status;
                    break;
                }
            }
            Part::ChangeSet(ops) => {
                let mut data = shared.lock();
                let savepoint = data.begin();
                let mut ids: HashMap<String, (usize, Uuid)> = HashMap::new();
                let mut done = Vec::with_capacity(ops.len());
                let mut failure = None;
                for op in ops {
                    let response = if op.method.eq_ignore_ascii_case("GET") {
                        shared.counters.kind(Kind::Rejected);
                        // UNCONFIRMED: the exact text.
                        failed_part(
                            Reply::bad_request("GET requests are not allowed inside a change set."),
                            op,
                        )
                    } else {
                        run_with_ids(shared, &mut data, op, &mut ids)
                    };
                    if response.status >= 400 {
                        failure = Some(response);
                        break;
                    }
                    done.push(response);
                }
                match failure {
                    None => {
                        data.commit(savepoint);
                        responses.push(ResponsePart::ChangeSet(done));
                    }
                    Some(failure) => {
                        data.rollback(&shared.schema, savepoint);
                        drop(data);
                        let status = failure.status;
                        responses.push(ResponsePart::ChangeSet(vec![failure]));
                        if !prefs.continue_on_error {
                            outer_status = status;
                            break;
                        }
                    }
                }
            }
        }
    }
    let (content_type, body) = multipart::write(&responses);
    let mut reply = Reply {
        status: outer_status,
        headers: vec![("Content-Type", content_type)],
        body,
    };
    if prefs.continue_on_error {
        reply = reply.header("Preference-Applied", "odata.continue-on-error");
    }
    reply
}

fn run_with_ids(
    shared: &Shared,
    data: &mut Data,
    op: &Operation,
    ids: &mut HashMap<String, (usize, Uuid)>,
) -> PartResponse {
    let (response, entity) = run_op(shared, data, op, Some(ids));
    if let (Some(content_id), Some(entity)) = (&op.content_id, entity)
        && response.status < 400
    {
        ids.insert(content_id.clone(), entity);
    }
    response
}

fn run(
    shared: &Shared,
    data: &mut Data,
    op: &Operation,
    ids: Option<&HashMap<String, (usize, Uuid)>>,
) -> PartResponse {
    run_op(shared, data, op, ids).0
}

/// Runs one part: resolves its URL (`$n`, absolute, rooted or relative), then dispatches it like a top-level
/// request with the part's own headers.
fn run_op(
    shared: &Shared,
    data: &mut Data,
    op: &Operation,
    ids: Option<&HashMap<String, (usize, Uuid)>>,
) -> (PartResponse, Option<(usize, Uuid)>) {
    if op
        .header("MSCRM.BypassCustomPluginExecution")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    {
        shared.counters.kind(Kind::Bypass);
    }
    let resolved = match resolve_url(shared, &op.url, ids) {
        Ok(url) => url,
        Err(reply) => {
            shared.counters.kind(Kind::Rejected);
            return (failed_part(reply, op), None);
        }
    };
    let (path, query) = match resolved.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (resolved.as_str(), None),
    };
    let headers = OpHeaders::new(
        op.header("If-Match"),
        op.header("If-None-Match"),
        op.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("prefer"))
            .map(|(_, v)| v.as_str()),
    );
    let request = OpRequest {
        method: &op.method,
        path,
        query,
        headers,
        body: &op.body,
    };
    let ctx = Ctx {
        content_ids: ids,
        in_batch: true,
    };
    let outcome = ops::dispatch(shared, data, &request, &ctx);
    shared.counters.kind(outcome.kind);
    let entity = outcome.entity;
    let response = if outcome.reply.is_success() {
        part_response(outcome.reply, op)
    } else {
        failed_part(outcome.reply, op)
    };
    (response, entity)
}

/// `$1/name` → `accounts(<guid>)/name`; absolute URLs and rooted paths lose the service root.
fn resolve_url(
    shared: &Shared,
    url: &str,
    ids: Option<&HashMap<String, (usize, Uuid)>>,
) -> Result<String, Reply> {
    if let Some(reference) = url.strip_prefix('$')
        && !url.starts_with("$batch")
        && !url.starts_with("$metadata")
    {
        let end = reference.find(['/', '?']).unwrap_or(reference.len());
        let Some(&(table, id)) = ids.and_then(|ids| ids.get(&reference[..end])) else {
            return Err(ops::content_id_missing(url));
        };
        return Ok(format!(
            "{}({id}){}",
            shared.schema.tables[table].set,
            &reference[end..]
        ));
    }
    let relative = multipart::relative_url(url, ROOT_PATH);
    if let Some(rooted) = relative.strip_prefix('/') {
        // Another API version (`/api/data/v9.0/...`) is served the same way.
        if let Some(after) = rooted.strip_prefix("api/data/v")
            && let Some(slash) = after.find('/')
        {
            return Ok(after[slash + 1..].to_owned());
        }
        return Err(Reply::error(
            404,
            codes::ODATA,
            format!("The URL '{url}' is not under the service root {ROOT_PATH}."),
        ));
    }
    Ok(relative.to_owned())
}

fn part_response(reply: Reply, op: &Operation) -> PartResponse {
    let mut headers: Vec<(String, String)> = Vec::with_capacity(reply.headers.len() + 2);
    headers.push(("OData-Version".to_owned(), "4.0".to_owned()));
    if let Some(entity_id) = reply.header_value("OData-EntityId") {
        headers.push(("Location".to_owned(), entity_id.to_owned()));
    }
    headers.extend(reply.headers.into_iter().map(|(n, v)| (n.to_owned(), v)));
    PartResponse {
        status: reply.status,
        headers,
        body: reply.body,
        content_id: op.content_id.clone(),
    }
}

/// A failed part carries `REQ_ID`.
fn failed_part(reply: Reply, op: &Operation) -> PartResponse {
    let mut response = part_response(reply, op);
    response
        .headers
        .insert(0, ("REQ_ID".to_owned(), Uuid::new_v4().to_string()));
    response
}
