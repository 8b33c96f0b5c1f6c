//! [`DataverseStore`]: a [`RecordStore`] over the Dataverse Web API.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use std::future::Future;

use async_trait::async_trait;
use futures_util::{StreamExt, stream};
use reqwest::Method;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::breaker::CircuitBreaker;
use crate::correlation;
use crate::dataverse::batch::{
    self, BatchRequest, Operation, OperationResponse, Part, ResponsePart,
};
use crate::dataverse::client::{
    Counters, Limiter, Request, Response, Transport, TransportStats, is_absolute,
};
use crate::dataverse::config::{
    API_PATH, BulkKeyColumns, BulkSupport, CreateStrategy, DataverseConfig,
};
use crate::dataverse::odata::{has_forbidden_characters, key_filter};
use crate::dataverse::response::{
    RequestContext, codes, is_missing_row, map_error, parse_error_body, parse_retry_after,
};
use crate::dataverse::tables::{Row, TableInfo, etag};
use crate::error::{Error, Result};
use crate::key::{EntityRef, Key};
use crate::name::TableName;
use crate::record::{HydrationState, Record, StoredRecord};
use crate::store::{
    Change, Delete, DeleteOutcome, DeletePrecondition, Ensured, Precondition, RecordStore, Write,
    WriteOutcome,
};

/// How often a single write re-reads and retries when the row keeps changing under it.
const MAX_CONTENTION_ROUNDS: usize = 5;

/// A [`RecordStore`] over the Dataverse Web API (`/api/data/v9.2`).
///
/// * [`write`](RecordStore::write) is exact: it reads the row's current values and version, then writes with
///   `If-Match` (or `If-None-Match: *` when the row is missing), so it can report [`Change::Unchanged`] without
///   writing and tell the hydrating write apart. Two round trips per write (one when nothing changes).
/// * [`write_batch`](RecordStore::write_batch) and [`ensure_placeholders`](RecordStore::ensure_placeholders) send
///   `$batch` requests of up to 1,000 independent operations (`Prefer: odata.continue-on-error`), in parallel up
///   to the service's `x-ms-dop-hint`. A batched write that changes nothing is reported as
///   [`Change::Updated`] (Dataverse bumps the row version on every update). Hydration is still exact: a write
///   that lands on a placeholder is followed by a conditional update that clears the state column, and only the
///   write that clears it reports the transition.
/// * [`delete`](RecordStore::delete) is one `DELETE` to the record's address (`If-Match: <etag>` for a version
///   condition); the service answers no body, so the outcome names the id only when the delete addressed it by
///   GUID and never the state before.
/// * [`bulk_upsert`](Self::bulk_upsert) uses `UpsertMultiple` for the fastest bulk sync, without per-record
///   outcomes.
///
/// Hydration state lives in a boolean column per table ([`DataverseTable::with_state_column`](super::DataverseTable::with_state_column)).
/// Every request carries `x-ms-client-request-id` and the operation's correlation id
/// ([`correlation`](crate::correlation)), is retried on transient failures with the configured
/// [`RetryPolicy`](crate::RetryPolicy) (requests that may have been applied only if idempotent), and passes a
/// circuit breaker.
#[derive(Clone, Debug)]
pub struct DataverseStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    transport: Transport,
    tables: BTreeMap<TableName, TableInfo>,
    batch_size: usize,
    bulk_chunk: usize,
    tag: Option<String>,
    bulk_probe: tokio::sync::Mutex<BTreeMap<TableName, bool>>,
    bulk_key_columns: BulkKeyColumns,
    max_key_segment: usize,
    max_url_length: usize,
}

/// One page of a table's changes ([`DataverseStore::changes`]).
#[derive(Debug)]
pub struct ChangePage {
    /// The changes, in the service's order (new and updated rows, then deletions).
    pub changes: Vec<RowChange>,
    /// Where to read on: the next page, or (when [`complete`](Self::complete)) the delta link for later changes.
    pub next: String,
    /// Whether this was the last page for now.
    pub complete: bool,
}

/// One change of one row.
#[derive(Debug)]
pub enum RowChange {
    /// The row as it is now (created or updated since the last read).
    Upserted(StoredRecord),
    /// The row was deleted.
    Deleted(EntityRef),
}

/// What one bulk upsert did: one result per record, in input order.
#[derive(Debug)]
pub struct BulkReport {
    /// `Ok(())` when the record was written.
    pub results: Vec<Result<()>>,
    /// HTTP requests sent.
    pub requests: usize,
}

impl BulkReport {
    /// Records written.
    pub fn written(&self) -> usize {
        self.results.iter().filter(|r| r.is_ok()).count()
    }

    /// Failed records with why, by input index.
    pub fn failures(&self) -> impl Iterator<Item = (usize, &Error)> {
        self.results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().err().map(|e| (i, e)))
    }
}

impl DataverseConfig {
    /// Builds the store. Fails with [`Error::InvalidConfig`] naming the first problem (a malformed URL, a
    /// navigation property for an undeclared lookup, an out-of-range setting, unusable credentials).
    pub fn build(self) -> Result<DataverseStore> {
        if let Some(error) = self.error {
            return Err(error);
        }
        self.retry.validate()?;
        let org = normalize_org_url(&self.org_url)?;
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| host_of(&org).to_owned());
        let http = match &self.http {
            Some(client) => client.clone(),
            None => {
                let mut builder = reqwest::Client::builder()
                    .timeout(self.timeout)
                    .user_agent(concat!("eventual-upsert/", env!("CARGO_PKG_VERSION")));
                for pem in &self.root_certificates {
                    let certificate =
                        reqwest::Certificate::from_pem(pem.as_bytes()).map_err(|e| {
                            Error::InvalidConfig {
                                reason: format!("root certificate: {e}"),
                            }
                        })?;
                    builder = builder.add_root_certificate(certificate);
                }
                builder.build().map_err(|e| Error::InvalidConfig {
                    reason: format!("HTTP client: {e}"),
                })?
            }
        };
        let auth = self.token_provider(&http, &org)?;
        let mut tables = BTreeMap::new();
        for schema in self.schema.tables() {
            let info = TableInfo::new(
                schema.clone(),
                self.tables.get(&schema.name),
                self.create_strategy,
            )?;
            tables.insert(schema.name.clone(), info);
        }
        if let Some(unknown) = self.tables.keys().find(|t| !tables.contains_key(*t)) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "Dataverse settings for table '{unknown}', which the schema does not declare"
                ),
            });
        }
        let transport = Transport {
            http,
            root: format!("{org}{API_PATH}"),
            name: name.clone(),
            auth,
            retry: self.retry.clone(),
            breaker: CircuitBreaker::new(name, self.breaker),
            limiter: Limiter::new(self.max_parallel, self.follow_dop_hint),
            bypass_custom_plugins: self.bypass_custom_plugins,
            max_response_bytes: self.max_response_bytes,
            counters: Counters::default(),
        };
        Ok(DataverseStore {
            inner: Arc::new(Inner {
                transport,
                tables,
                batch_size: self.batch_size.get(),
                bulk_chunk: self.bulk_chunk.get(),
                tag: self.tag,
                bulk_probe: tokio::sync::Mutex::new(BTreeMap::new()),
                bulk_key_columns: self.bulk_key_columns,
                max_key_segment: self.max_key_segment,
                max_url_length: self.max_url_length,
            }),
        })
    }

    /// Fills in what the settings leave open (entity set names, lookup navigation properties) from the
    /// service's metadata (`EntityDefinitions`). Explicit settings win.
    ///
    /// Each many-to-one relationship binds its navigation property to the lookup (`ReferencingAttribute`) *and*
    /// the table it points at (`ReferencedEntity`), whatever order the service lists them in: a polymorphic
    /// lookup such as `parentcustomerid` gets `parentcustomerid_account` for accounts and
    /// `parentcustomerid_contact` for contacts, and a relationship to a table the lookup does not declare is
    /// ignored.
    pub async fn load_metadata(mut self) -> Result<Self> {
        let store = self.clone().build()?;
        let names: Vec<TableName> = self.schema.tables().map(|t| t.name.clone()).collect();
        for table in names {
            let path = format!(
                "EntityDefinitions(LogicalName='{table}')?$select=LogicalName,EntitySetName&$expand=ManyToOneRelationships($select=ReferencingAttribute,ReferencingEntityNavigationPropertyName,ReferencedEntity)"
            );
            let response = store
                .inner
                .execute(
                    Request::new(Method::GET, path, "metadata"),
                    &store.inner.context(None, None),
                )
                .await?;
            if response.status != 200 {
                return Err(store
                    .inner
                    .error(&response, &store.inner.context(None, None)));
            }
            let body = response.json(store.backend())?;
            let mut settings = self
                .tables
                .remove(&table)
                .unwrap_or_else(|| super::DataverseTable::new(table.clone()));
            if settings.entity_set.is_none()
                && let Some(set) = body.get("EntitySetName").and_then(Value::as_str)
            {
                settings = settings.with_entity_set(set);
            }
            let schema = self.schema.table(&table)?;
            for relationship in body
                .get("ManyToOneRelationships")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let text = |name: &str| relationship.get(name).and_then(Value::as_str);
                let (Some(attribute), Some(property)) = (
                    text("ReferencingAttribute"),
                    text("ReferencingEntityNavigationPropertyName"),
                ) else {
                    continue;
                };
                let Some((lookup, first)) = schema.lookups.get_key_value(attribute) else {
                    continue;
                };
                if settings.navigation.contains_key(lookup) {
                    continue;
                }
                // Without `ReferencedEntity` (an older service), a relationship can only be taken for a lookup
                // with one target.
                let target = match text("ReferencedEntity") {
                    Some(referenced) => schema
                        .lookup_targets(lookup)
                        .find(|t| t.as_str() == referenced),
                    None if schema.lookup_targets(lookup).nth(1).is_none() => Some(first),
                    None => None,
                };
                if let Some(target) = target
                    && !settings
                        .target_navigation
                        .contains_key(&(lookup.clone(), target.clone()))
                {
                    settings =
                        settings.with_target_navigation(lookup.clone(), target.clone(), property);
                }
            }
            self = self.with_table(settings);
        }
        Ok(self)
    }
}

/// `https://org.crm4.dynamics.com/` or `.../api/data/v9.2` → `https://org.crm4.dynamics.com`.
fn normalize_org_url(url: &str) -> Result<String> {
    let trimmed = url.trim().trim_end_matches('/');
    let trimmed = trimmed
        .strip_suffix(API_PATH.trim_end_matches('/'))
        .unwrap_or(trimmed);
    let valid =
        is_absolute(trimmed) && !host_of(trimmed).is_empty() && !trimmed.contains(['?', '#', ' ']);
    if !valid {
        return Err(Error::InvalidConfig {
            reason: format!(
                "the environment URL {url:?} is not an http(s) URL such as https://contoso.crm4.dynamics.com"
            ),
        });
    }
    Ok(trimmed.to_owned())
}

/// The request path for a link the service returned (`@odata.nextLink`, `@odata.deltaLink`): relative to the
/// service root when it starts with it, else the absolute link as it is. Scheme and host compare without regard
/// to case and default ports (the service writes `contoso.crm.dynamics.com` when the configuration says
/// `Contoso.crm.dynamics.com`), and a different path prefix (`/api/data/v9.0/`) is followed verbatim. `None` when
/// the link leads to another origin: the bearer token is never sent there.
fn follow_link(root: &str, link: &str) -> Option<String> {
    let (root_origin, root_path) = split_origin(root)?;
    let (link_origin, link_path) = split_origin(link)?;
    if origin_key(root_origin) != origin_key(link_origin) {
        return None;
    }
    let relative = link_path
        .get(..root_path.len())
        .filter(|prefix| prefix.eq_ignore_ascii_case(root_path))
        .map(|_| &link_path[root_path.len()..]);
    Some(relative.map_or_else(|| link.to_owned(), str::to_owned))
}

/// `https://host:443/api/...` → (`https://host:443`, `/api/...`).
fn split_origin(url: &str) -> Option<(&str, &str)> {
    if !is_absolute(url) {
        return None;
    }
    let start = url.find("://")? + 3;
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    Some((
        &url[..end],
        url.get(end..).filter(|p| !p.is_empty()).unwrap_or("/"),
    ))
}

/// An origin in lower case without its default port.
fn origin_key(origin: &str) -> String {
    let lower = origin.to_ascii_lowercase();
    lower
        .strip_suffix(":443")
        .filter(|_| lower.starts_with("https://"))
        .or_else(|| {
            lower
                .strip_suffix(":80")
                .filter(|_| lower.starts_with("http://"))
        })
        .map_or_else(|| lower.clone(), str::to_owned)
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

impl DataverseStore {
    fn backend_error(&self, message: impl Into<String>) -> Error {
        self.inner.backend_error(message)
    }

    /// Runs one logical operation in a span, with one correlation id for all of its requests: the caller's
    /// ([`correlation::scope`](crate::correlation::scope)) or a new one.
    async fn operation<T>(
        &self,
        name: &'static str,
        records: usize,
        work: impl Future<Output = T>,
    ) -> T {
        let id = correlation::current_or_new();
        let span = tracing::info_span!(
            "dataverse",
            operation = name,
            backend = %self.backend(),
            records,
            correlation = %id,
        );
        correlation::scope(id, work.instrument(span)).await
    }

    /// Request counters (for tests and benchmarks).
    pub fn stats(&self) -> TransportStats {
        self.inner.transport.stats()
    }

    /// How many requests may be in flight now (follows the service's `x-ms-dop-hint`).
    pub fn parallel_limit(&self) -> usize {
        self.inner.transport.limiter.limit()
    }

    /// The service root, `https://host/api/data/v9.2/`.
    pub fn service_root(&self) -> &str {
        &self.inner.transport.root
    }

    /// Upserts many records with `UpsertMultiple` (chunks of [`with_bulk_chunk`](DataverseConfig::with_bulk_chunk)
    /// records, in parallel up to the service's hint), or `$batch` for tables without bulk support. Hydrated
    /// records clear the state column (placeholders become hydrated); placeholders are not accepted here, ensure
    /// them instead. The service reports no per-record outcome for bulk messages: use
    /// [`write_batch`](RecordStore::write_batch) when you need created/updated or the hydration transition. A
    /// failing record fails its whole chunk (standard tables are all or nothing).
    pub async fn bulk_upsert(&self, records: &[Record]) -> BulkReport {
        let work = self.inner.bulk_upsert(records);
        self.operation("bulk_upsert", records.len(), work).await
    }

    /// Every record of a table, following the service's paging (`@odata.nextLink`, 5,000 rows per page). For
    /// verification, tools and small tables; a sync reads changes instead.
    pub async fn records(&self, table: &TableName) -> Result<Vec<StoredRecord>> {
        let inner = &self.inner;
        let info = inner.table(table)?;
        let context = inner.context(None, None);
        let mut path = info.read_path_collection();
        let mut records = Vec::new();
        loop {
            let request =
                Request::new(Method::GET, path, "query").header("Prefer", "odata.maxpagesize=5000");
            let response = inner.execute(request, &context).await?;
            if response.status != 200 {
                return Err(inner.error(&response, &context));
            }
            let mut page = response.json(self.backend())?;
            let rows = match page.get_mut("value").map(Value::take) {
                Some(Value::Array(rows)) => rows,
                _ => {
                    return Err(self.backend_error(format!(
                        "table '{table}': a collection response without a value array"
                    )));
                }
            };
            for row in rows {
                records.push(info.stored(info.row(self.backend(), row)?)?);
            }
            match page.get("@odata.nextLink").and_then(Value::as_str) {
                // The link is absolute; it is followed as given (Microsoft: never edit it).
                Some(next) => match follow_link(&inner.transport.root, next) {
                    Some(relative) => path = relative,
                    None => {
                        return Err(self.backend_error(format!(
                            "a next-page link outside the service root: {next}"
                        )));
                    }
                },
                None => return Ok(records),
            }
        }
    }

    /// Applies up to 1,000 writes all or nothing, in one `$batch` change set: either every write is applied or
    /// none is, and the error is the one of the write that failed (the service rolls the others back). For writes
    /// that must not be seen half done (an order and its lines). Placeholders are never sent this way by the
    /// writer: one conflict would roll back every other placeholder.
    pub async fn write_atomic(&self, writes: &[Write]) -> Result<Vec<WriteOutcome>> {
        self.operation(
            "write_atomic",
            writes.len(),
            self.inner.write_atomic(writes),
        )
        .await
    }

    /// One page of `table`'s changes, by Dataverse change tracking: from the start (`from` = `None`: every row,
    /// then a delta link) or from the `next` link of an earlier page. Rows come back as they are now (by id, with
    /// their row version); deletions as their address. Keep [`ChangePage::next`] to read on from there.
    pub async fn changes(
        &self,
        table: &TableName,
        from: Option<&str>,
        page_size: usize,
    ) -> Result<ChangePage> {
        let inner = &self.inner;
        let info = inner.table(table)?;
        let path = match from {
            Some(link) if is_absolute(link) => follow_link(&inner.transport.root, link)
                .ok_or_else(|| {
                    self.backend_error(format!(
                        "table '{table}': the change link {link} leads to another service"
                    ))
                })?,
            Some(link) => link.to_owned(),
            None => info.read_path_collection(),
        };
        let page_size = page_size.clamp(1, 5000);
        let request = Request::new(Method::GET, path, "changes").header(
            "Prefer",
            format!("odata.track-changes,odata.maxpagesize={page_size}"),
        );
        let context = inner.context(None, None);
        let response = inner.execute(request, &context).await?;
        if response.status != 200 {
            return Err(inner.error(&response, &context));
        }
        let mut body = response.json(self.backend())?;
        let malformed = |what: &str| {
            self.backend_error(format!(
                "table '{table}': a change-tracking response {what}"
            ))
        };
        let Some(Value::Array(rows)) = body.get_mut("value").map(Value::take) else {
            return Err(malformed("without a value array"));
        };
        let mut changes = Vec::with_capacity(rows.len());
        for row in rows {
            let deleted = row
                .get("@odata.context")
                .and_then(Value::as_str)
                .is_some_and(|c| c.ends_with("$deletedEntity"));
            if deleted {
                let id = row
                    .get("id")
                    .and_then(Value::as_str)
                    .and_then(|s| uuid::Uuid::parse_str(s).ok())
                    .ok_or_else(|| malformed("with a deleted row without its id"))?;
                changes.push(RowChange::Deleted(EntityRef::by_id(table.clone(), id)?));
            } else {
                changes.push(RowChange::Upserted(
                    info.stored(info.row(self.backend(), row)?)?,
                ));
            }
        }
        let (link, complete) = match (
            body.get("@odata.nextLink").and_then(Value::as_str),
            body.get("@odata.deltaLink").and_then(Value::as_str),
        ) {
            (Some(next), _) => (next, false),
            (None, Some(delta)) => (delta, true),
            (None, None) => return Err(malformed("with neither a next link nor a delta link")),
        };
        // Links are absolute; they are kept relative to the service root and otherwise as given (never edited).
        let next = follow_link(&inner.transport.root, link)
            .ok_or_else(|| malformed("whose link leads to another service"))?;
        Ok(ChangePage {
            changes,
            next,
            complete,
        })
    }

    /// Deletes a record whatever its version; `Ok(false)` if it did not exist. [`RecordStore::delete`] without a
    /// precondition, for tools and tests that only need to know whether a record went. It shadows the trait
    /// method in method-call syntax: call `RecordStore::delete(&store, &delete)` for a conditional delete.
    pub async fn delete(&self, reference: &EntityRef) -> Result<bool> {
        let outcome = RecordStore::delete(self, &Delete::new(reference.clone())).await?;
        Ok(outcome.is_deleted())
    }

    /// Whether `table` supports the bulk messages (asks the service once, then remembers).
    pub async fn supports_bulk(&self, table: &TableName) -> Result<bool> {
        self.inner.supports_bulk(table).await
    }
}

#[async_trait]
impl RecordStore for DataverseStore {
    fn backend(&self) -> &str {
        &self.inner.transport.name
    }

    async fn read(&self, reference: &EntityRef) -> Result<Option<StoredRecord>> {
        self.operation("read", 1, self.inner.read(reference)).await
    }

    async fn write(&self, write: &Write) -> Result<WriteOutcome> {
        self.operation("write", 1, self.inner.write_exact(write))
            .await
    }

    async fn delete(&self, delete: &Delete) -> Result<DeleteOutcome> {
        self.operation("delete", 1, self.inner.delete(delete)).await
    }

    async fn write_batch(&self, writes: &[Write]) -> Vec<Result<WriteOutcome>> {
        let work = self.inner.write_batch(writes, distinct_addresses(writes));
        self.operation("write_batch", writes.len(), work).await
    }

    async fn ensure_placeholders(&self, placeholders: Vec<Record>) -> Vec<Result<Ensured>> {
        self.ensure_then_write(placeholders, &[]).await.0
    }

    /// Placeholders (create-only) and then the writes, in the same `$batch` requests: the service runs the
    /// operations of a batch in order, so the placeholders exist before the writes that refer to them.
    async fn ensure_then_write(
        &self,
        placeholders: Vec<Record>,
        writes: &[Write],
    ) -> (Vec<Result<Ensured>>, Vec<Result<WriteOutcome>>) {
        let ensures = placeholders.len();
        let mut all: Vec<Write> = placeholders.into_iter().map(Write::create_only).collect();
        all.extend_from_slice(writes);
        // Chunks may only run side by side when no write depends on a placeholder from another chunk.
        let parallel = ensures == 0 && distinct_addresses(writes);
        let work = self.inner.write_batch(&all, parallel);
        let mut results = self.operation("ensure_then_write", all.len(), work).await;
        let written = results.split_off(ensures.min(results.len()));
        let ensured = results
            .into_iter()
            .map(|result| match result {
                Ok(outcome) => Ok(Ensured::Created { id: outcome.id }),
                Err(Error::AlreadyExists { .. }) => Ok(Ensured::Existed),
                Err(err) => Err(err),
            })
            .collect();
        (ensured, written)
    }
}

/// A write applied by the service, as its representation tells.
struct Applied {
    id: uuid::Uuid,
    version: crate::Version,
    created: bool,
    /// The state column was still `true` after the write: the row is a placeholder.
    placeholder: bool,
}

impl Inner {
    fn backend(&self) -> &str {
        &self.transport.name
    }

    /// A permanent error of this store: a response it cannot use.
    fn backend_error(&self, message: impl Into<String>) -> Error {
        Error::Backend {
            backend: self.backend().to_owned(),
            message: message.into(),
            retryable: false,
            source: None,
        }
    }

    /// The table of a record address, after checking that its key is one the table declares.
    fn addressed(&self, reference: &EntityRef) -> Result<&TableInfo> {
        let table = self.table(&reference.table)?;
        if let Key::Alternate(key) = &reference.key {
            table.schema.key_address(key)?;
        }
        Ok(table)
    }

    async fn read(&self, reference: &EntityRef) -> Result<Option<StoredRecord>> {
        let table = self.addressed(reference)?;
        let context = self.context(Some(reference), None);
        if self.by_filter(table, &reference.key) {
            let row = self
                .find_by_filter(table, &reference.key, table.read_select(), &context)
                .await?;
            return row.map(|row| table.stored(row)).transpose();
        }
        let request = Request::new(Method::GET, table.read_path(&reference.key), "read");
        let response = self.execute(request, &context).await?;
        match response.status {
            200 => {
                let row = table.row(self.backend(), response.json(self.backend())?)?;
                Ok(Some(table.stored(row)?))
            }
            404 if is_missing_row(&response.body) => Ok(None),
            _ => Err(self.error(&response, &context)),
        }
    }

    /// One `DELETE` to the record's address. A 404 for the record itself is `Absent` (also after a retry whose
    /// first attempt did delete it), a 412 the version condition failing.
    async fn delete(&self, delete: &Delete) -> Result<DeleteOutcome> {
        let reference = &delete.reference;
        let table = self.addressed(reference)?;
        let context = self.context(Some(reference), None);
        let (key, id) = if self.by_filter(table, &reference.key) {
            let select = table.schema.primary_id.to_string();
            match self
                .find_by_filter(table, &reference.key, Some(&select), &context)
                .await?
            {
                Some(row) => (Key::Id(row.id), Some(row.id)),
                None => return Ok(DeleteOutcome::Absent),
            }
        } else {
            (reference.key.clone(), reference.id())
        };
        let mut request = Request::new(Method::DELETE, self.tagged(table.address(&key)), "delete");
        if let DeletePrecondition::MatchVersion(version) = delete.precondition {
            request = request.header("If-Match", etag(version));
        }
        let response = self.execute(request, &context).await?;
        match (response.status, delete.precondition) {
            (200 | 204, _) => Ok(DeleteOutcome::deleted(id, None)),
            (404, _) if is_missing_row(&response.body) => Ok(DeleteOutcome::Absent),
            (412, DeletePrecondition::MatchVersion(expected)) => Err(Error::VersionMismatch {
                reference: Box::new(reference.clone()),
                expected,
                actual: None,
            }),
            _ => Err(self.error(&response, &context)),
        }
    }

    fn table(&self, name: &TableName) -> Result<&TableInfo> {
        self.tables.get(name).ok_or_else(|| Error::UnknownTable {
            table: name.clone(),
        })
    }

    /// Whether `key` cannot address a row in a URL path and is found by a `$filter` query instead: a value with a
    /// character the documentation says breaks key addressing, or a key segment over the configured length.
    fn by_filter(&self, table: &TableInfo, key: &Key) -> bool {
        matches!(key, Key::Alternate(_))
            && (has_forbidden_characters(key) || table.address(key).len() > self.max_key_segment)
    }

    /// Whether one of the record's lookup targets is addressed by such a key.
    fn lookups_by_filter(&self, record: &Record) -> bool {
        record.lookups.values().any(|target| {
            self.table(&target.table)
                .is_ok_and(|table| self.by_filter(table, &target.key))
        })
    }

    /// The row with these key values, found by `$filter` on the key columns (`$top=2`, to notice a second one).
    /// A query that does not fit the URL limit is an [`Error::InvalidKey`], sent nowhere.
    async fn find_by_filter(
        &self,
        table: &TableInfo,
        key: &Key,
        select: Option<&str>,
        context: &RequestContext<'_>,
    ) -> Result<Option<Row>> {
        let mut path = format!("{}?", table.entity_set);
        if let Some(select) = select {
            path.push_str("$select=");
            path.push_str(select);
            path.push('&');
        }
        path.push_str("$filter=");
        path.push_str(&key_filter(key, table.schema.primary_id.as_str()));
        path.push_str("&$top=2");
        let length = self.transport.root.len() + path.len();
        if length > self.max_url_length {
            let columns: Vec<&str> = match key {
                Key::Alternate(key) => key.columns().map(|c| c.as_str()).collect(),
                Key::Id(_) => Vec::new(),
            };
            return Err(Error::InvalidKey {
                table: table.name().clone(),
                reason: format!(
                    "the value of key ({}) is too long to look up: the query URL would have {length} characters, over the limit of {} (a Dataverse key holds at most 900 bytes)",
                    columns.join(", "),
                    self.max_url_length
                ),
            });
        }
        tracing::debug!(table = %table.name(), "key cannot go in a URL path; finding the row by $filter");
        let response = self
            .execute(Request::new(Method::GET, path, "read"), context)
            .await?;
        if response.status != 200 {
            return Err(self.error(&response, context));
        }
        let mut body = response.json(self.backend())?;
        let Some(Value::Array(rows)) = body.get_mut("value").map(Value::take) else {
            return Err(self.backend_error(format!(
                "table '{}': a key query answered without a value array",
                table.name()
            )));
        };
        let mut rows = rows.into_iter();
        match (rows.next(), rows.next()) {
            (None, _) => Ok(None),
            (Some(row), None) => Ok(Some(table.row(self.backend(), row)?)),
            (Some(_), Some(_)) => Err(self.backend_error(format!(
                "table '{}': several rows hold the key values of {}",
                table.name(),
                context
                    .write
                    .map(|w| &w.record.reference)
                    .or(context.reference)
                    .map_or_else(|| "the record".to_owned(), ToString::to_string)
            ))),
        }
    }

    /// The write with lookup targets that need a `$filter` replaced by their GUIDs; a target that does not exist
    /// is an [`Error::MissingReference`].
    async fn resolve_lookups<'w>(
        &self,
        write: &'w Write,
        context: &RequestContext<'_>,
    ) -> Result<Cow<'w, Write>> {
        let mut resolved: Option<Write> = None;
        for (field, target) in &write.record.lookups {
            let Ok(table) = self.table(&target.table) else {
                continue;
            };
            if !self.by_filter(table, &target.key) {
                continue;
            }
            let select = table.schema.primary_id.to_string();
            let Some(row) = self
                .find_by_filter(table, &target.key, Some(&select), context)
                .await?
            else {
                return Err(Error::MissingReference {
                    reference: Box::new(write.record.reference.clone()),
                    field: field.clone(),
                    target: Box::new(target.clone()),
                });
            };
            resolved
                .get_or_insert_with(|| write.clone())
                .record
                .lookups
                .insert(
                    field.clone(),
                    EntityRef {
                        table: target.table.clone(),
                        key: Key::Id(row.id),
                    },
                );
        }
        Ok(resolved.map_or(Cow::Borrowed(write), Cow::Owned))
    }

    /// Whether a create-only PATCH that answered `status` is the signal [`CreateStrategy::Detect`] waits for (a
    /// 404 that names no lookup target); switches the table to POST creates the first time.
    fn switches_to_post<T>(
        &self,
        table: &TableInfo,
        write: &Write,
        status: u16,
        result: &Result<T>,
    ) -> bool {
        let signal = table.create_strategy == CreateStrategy::Detect
            && status == 404
            && write.precondition == Precondition::CreateOnly
            && matches!(write.record.reference.key, Key::Alternate(_))
            && !matches!(result, Err(Error::MissingReference { .. }));
        if signal && table.switch_to_post() {
            tracing::warn!(
                table = %table.name(),
                "a create-only PATCH by alternate key answered 404: creating this table's rows by POST from now on"
            );
        }
        signal
    }

    fn entity_set_of(&self, table: &TableName) -> Result<String> {
        Ok(self.table(table)?.entity_set.clone())
    }

    fn context<'a>(
        &'a self,
        reference: Option<&'a EntityRef>,
        write: Option<&'a Write>,
    ) -> RequestContext<'a> {
        RequestContext {
            backend: self.backend(),
            reference,
            write,
        }
    }

    async fn execute(&self, request: Request, context: &RequestContext<'_>) -> Result<Response> {
        self.transport.execute(&request, context).await
    }

    fn error(&self, response: &Response, context: &RequestContext<'_>) -> Error {
        let retry_after = response
            .header("retry-after")
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        map_error(response.status, retry_after, &response.body, context)
    }

    /// `?tag=` for writes, when configured.
    fn tagged(&self, path: String) -> String {
        match &self.tag {
            Some(tag) => {
                let tag =
                    percent_encoding::utf8_percent_encode(tag, percent_encoding::NON_ALPHANUMERIC);
                let separator = if path.contains('?') { '&' } else { '?' };
                format!("{path}{separator}tag={tag}")
            }
            None => path,
        }
    }

    /// The write operation sent for `write` (in a batch or alone): a PATCH to its address with its precondition,
    /// asking for the id, version and state back.
    fn write_operation(
        &self,
        table: &TableInfo,
        write: &Write,
        state: Option<HydrationState>,
        key: &Key,
    ) -> Result<Operation> {
        let mut body = table.body(&write.record, state, |t| self.entity_set_of(t))?;
        if let Key::Alternate(alternate) = key
            && write.precondition == Precondition::CreateOnly
            && (table.posts_creates() || self.by_filter(table, key))
        {
            // A create by POST: the key columns go in the body, where the service finds a duplicate.
            for (column, value) in alternate.parts() {
                body.entry(column.to_string())
                    .or_insert_with(|| value.to_json());
            }
            let path = self.tagged(format!(
                "{}?$select={}",
                table.entity_set,
                table.outcome_select()
            ));
            return Ok(Operation::new("POST", path)
                .header("Prefer", "return=representation")
                .json(Value::Object(body).to_string()));
        }
        let path = self.tagged(format!(
            "{}?$select={}",
            table.address(key),
            table.outcome_select()
        ));
        let mut operation = Operation::new("PATCH", path)
            .header("Prefer", "return=representation")
            .json(Value::Object(body).to_string());
        match write.precondition {
            Precondition::None => {}
            Precondition::CreateOnly => operation = operation.header("If-None-Match", "*"),
            Precondition::UpdateOnly => operation = operation.header("If-Match", "*"),
            Precondition::MatchVersion(version) => {
                operation = operation.header("If-Match", etag(version))
            }
        }
        Ok(operation)
    }

    fn applied(&self, table: &TableInfo, status: u16, body: &[u8]) -> Result<Applied> {
        if !matches!(status, 200 | 201) {
            return Err(self.backend_error(format!(
                    "HTTP {status} without the record: the service ignored Prefer: return=representation"
                )));
        }
        let json: Value = serde_json::from_slice(body).map_err(|e| {
            self.backend_error(format!("HTTP {status}: the body is not JSON ({e})"))
        })?;
        let row = table.row(self.backend(), json)?;
        Ok(Applied {
            id: row.id,
            version: row.version,
            created: status == 201,
            placeholder: row.state == HydrationState::Placeholder,
        })
    }

    /// Sends one operation on its own (not in a batch).
    async fn send_operation(
        &self,
        operation: Operation,
        context: &RequestContext<'_>,
    ) -> Result<OperationResponse> {
        let method = Method::from_bytes(operation.method.as_bytes()).unwrap_or(Method::PATCH);
        let idempotent =
            operation.header_value("If-None-Match").is_none() && method != Method::POST;
        let mut request =
            Request::new(method, operation.url.clone(), "write").idempotent(idempotent);
        for (name, value) in &operation.headers {
            if let Some(name) = known_header(name) {
                request = request.header(name, value.clone());
            }
        }
        if let Some(body) = &operation.body {
            request = request.body("application/json".into(), body.clone().into_bytes());
        }
        let response = self.execute(request, context).await?;
        Ok(OperationResponse {
            status: response.status,
            headers: Vec::new(),
            body: response.body,
            content_id: None,
        })
    }

    /// The exact single write: read, compare, write conditionally; repeat if the row changed in between.
    async fn write_exact(&self, write: &Write) -> Result<WriteOutcome> {
        let table = self.table(write.record.table())?;
        table.schema.check_write(&write.record)?;
        let resolved = self
            .resolve_lookups(write, &self.context(None, Some(write)))
            .await?;
        let write = resolved.as_ref();
        let record = &write.record;
        let context = self.context(None, Some(write));
        for _ in 0..MAX_CONTENTION_ROUNDS {
            let current = self
                .fetch_row(
                    table,
                    &record.reference.key,
                    &table.compare_select(record),
                    &context,
                )
                .await?;
            let attempt = match current {
                None => self.create_missing(table, write, &context).await?,
                Some(row) => self.update_existing(table, write, row, &context).await?,
            };
            if let Some(outcome) = attempt {
                return Ok(outcome);
            }
        }
        Err(Error::Backend {
            backend: self.backend().to_owned(),
            message: format!(
                "{}: the record kept changing during {MAX_CONTENTION_ROUNDS} attempts to write it",
                record.reference
            ),
            retryable: true,
            source: None,
        })
    }

    async fn fetch_row(
        &self,
        table: &TableInfo,
        key: &Key,
        select: &str,
        context: &RequestContext<'_>,
    ) -> Result<Option<Row>> {
        if self.by_filter(table, key) {
            return self.find_by_filter(table, key, Some(select), context).await;
        }
        let path = format!("{}?$select={select}", table.address(key));
        let response = self
            .execute(Request::new(Method::GET, path, "read"), context)
            .await?;
        match response.status {
            200 => Ok(Some(
                table.row(self.backend(), response.json(self.backend())?)?,
            )),
            404 if is_missing_row(&response.body) => Ok(None),
            _ => Err(self.error(&response, context)),
        }
    }

    /// `Ok(None)`: someone created the row in between; read again.
    async fn create_missing(
        &self,
        table: &TableInfo,
        write: &Write,
        context: &RequestContext<'_>,
    ) -> Result<Option<WriteOutcome>> {
        let reference = Box::new(write.record.reference.clone());
        if matches!(
            write.precondition,
            Precondition::UpdateOnly | Precondition::MatchVersion(_)
        ) {
            return Err(Error::NotFound { reference });
        }
        let create = Write::create_only(write.record.clone());
        let operation = self.write_operation(
            table,
            &create,
            Some(write.record.state),
            &write.record.reference.key,
        )?;
        let patch = operation.method == "PATCH";
        let response = self.send_operation(operation, context).await?;
        if matches!(response.status, 200 | 201) {
            let applied = self.applied(table, response.status, &response.body)?;
            return Ok(Some(WriteOutcome {
                id: applied.id,
                version: applied.version,
                change: Change::Created,
                previous_state: None,
                state: write.record.state,
            }));
        }
        // Mapped as the create-only write it was: a duplicate (412, or 409 for a POST) means the row exists.
        let error = Err(self.operation_error(table, &create, &response).await);
        if patch && self.switches_to_post(table, &create, response.status, &error) {
            return Ok(None); // read again, then create by POST
        }
        match error {
            Err(Error::AlreadyExists { .. }) if write.precondition == Precondition::CreateOnly => {
                Err(Error::AlreadyExists { reference })
            }
            // Someone created it in between: read again.
            Err(Error::AlreadyExists { .. }) => Ok(None),
            other => other,
        }
    }

    /// `Ok(None)`: the row changed between the read and the write; read again.
    async fn update_existing(
        &self,
        table: &TableInfo,
        write: &Write,
        row: Row,
        context: &RequestContext<'_>,
    ) -> Result<Option<WriteOutcome>> {
        let record = &write.record;
        let reference = Box::new(record.reference.clone());
        match write.precondition {
            Precondition::CreateOnly => return Err(Error::AlreadyExists { reference }),
            Precondition::MatchVersion(expected) if expected != row.version => {
                return Err(Error::VersionMismatch {
                    reference,
                    expected,
                    actual: Some(row.version),
                });
            }
            _ => {}
        }
        // Hydrated never goes back to placeholder.
        let state = match row.state {
            HydrationState::Hydrated => HydrationState::Hydrated,
            HydrationState::Placeholder => record.state,
        };
        let unchanged = state == row.state
            && record.fields.iter().all(|(c, v)| row.values.get(c.as_str()).unwrap_or(&Value::Null) == v)
            && record.lookups.iter().all(|(l, target)| {
                let stored = row.values.get(&format!("_{l}_value")).and_then(Value::as_str);
                matches!((&target.key, stored), (Key::Id(id), Some(s)) if s.eq_ignore_ascii_case(&id.to_string()))
            });
        if unchanged {
            return Ok(Some(WriteOutcome {
                id: row.id,
                version: row.version,
                change: Change::Unchanged,
                previous_state: Some(row.state),
                state,
            }));
        }
        let update = Write::if_version(record.clone(), row.version);
        let send_state = (state != row.state).then_some(state);
        let operation = self.write_operation(table, &update, send_state, &Key::Id(row.id))?;
        let response = self.send_operation(operation, context).await?;
        match response.status {
            200 | 201 => {
                let applied = self.applied(table, response.status, &response.body)?;
                Ok(Some(WriteOutcome {
                    id: applied.id,
                    version: applied.version,
                    change: Change::Updated,
                    previous_state: Some(row.state),
                    state,
                }))
            }
            412 if parse_error_body(&response.body).code == codes::DUPLICATE_RECORD_ENTITY_KEY => {
                Err(self.operation_error(table, write, &response).await)
            }
            412 => match write.precondition {
                Precondition::MatchVersion(expected) => Err(Error::VersionMismatch {
                    reference,
                    expected,
                    actual: None,
                }),
                _ => Ok(None),
            },
            404 if is_missing_row(&response.body) => Ok(None),
            _ => Err(self.operation_error(table, write, &response).await),
        }
    }

    /// Maps a failed operation, looking up the holder of a clashing alternate key (the service does not say).
    async fn operation_error(
        &self,
        table: &TableInfo,
        write: &Write,
        response: &OperationResponse,
    ) -> Error {
        let error = parse_error_body(&response.body);
        if error.code == codes::DUPLICATE_RECORD_ENTITY_KEY
            && let Some(duplicate) = self.find_key_holder(table, write).await
        {
            return duplicate;
        }
        let retry_after = response
            .header_value("retry-after")
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        map_error(
            response.status,
            retry_after,
            &response.body,
            &self.context(None, Some(write)),
        )
    }

    async fn find_key_holder(&self, table: &TableInfo, write: &Write) -> Option<Error> {
        let record = &write.record;
        for def in &table.schema.alternate_keys {
            let values: Option<Vec<(crate::ColumnName, crate::KeyValue)>> = def
                .columns
                .iter()
                .map(|(column, kind)| {
                    let value = record.fields.get(column).cloned().or_else(|| {
                        match &record.reference.key {
                            Key::Alternate(key) => {
                                key.get(column.as_str()).map(crate::KeyValue::to_json)
                            }
                            Key::Id(_) => None,
                        }
                    })?;
                    Some((column.clone(), crate::KeyValue::from_json(*kind, &value)?))
                })
                .collect();
            let Some(values) = values else { continue };
            let Ok(key) = crate::AlternateKey::new(table.name(), values) else {
                continue;
            };
            let own = record.reference.id();
            let select = table.schema.primary_id.to_string();
            let context = self.context(None, Some(write));
            if let Ok(Some(row)) = self
                .fetch_row(table, &Key::Alternate(key.clone()), &select, &context)
                .await
                && Some(row.id) != own
                && Key::Alternate(key.clone()) != record.reference.key
            {
                return Some(Error::DuplicateKey {
                    table: table.name().clone(),
                    key,
                    existing: row.id,
                });
            }
        }
        None
    }

    /// Batched writes: validated locally, then sent as `$batch` chunks of independent operations. Placeholder
    /// upserts that are not create-only take the exact path (they must not mark an existing record).
    async fn write_batch(&self, writes: &[Write], parallel: bool) -> Vec<Result<WriteOutcome>> {
        let mut results: Vec<Option<Result<WriteOutcome>>> =
            (0..writes.len()).map(|_| None).collect();
        let mut batched: Vec<(usize, Operation)> = Vec::with_capacity(writes.len());
        // Writes whose key (or a lookup target's key) cannot go in a URL take the exact path: create-only ones
        // now (before the batches, which may refer to them), the others after the batches (which may create
        // what they refer to).
        let mut after_batches = Vec::new();
        for (i, write) in writes.iter().enumerate() {
            let prepared = self.table(write.record.table()).and_then(|table| {
                table.schema.check_write(&write.record)?;
                Ok(table)
            });
            match prepared {
                Err(e) => results[i] = Some(Err(e)),
                Ok(_)
                    if write.record.state == HydrationState::Placeholder
                        && write.precondition != Precondition::CreateOnly =>
                {
                    results[i] = Some(self.write_exact(write).await);
                }
                Ok(table)
                    if self.by_filter(table, &write.record.reference.key)
                        || self.lookups_by_filter(&write.record) =>
                {
                    if write.precondition == Precondition::CreateOnly {
                        results[i] = Some(self.write_exact(write).await);
                    } else {
                        after_batches.push(i);
                    }
                }
                Ok(table) => match self.batch_operation(table, write) {
                    Ok(op) => batched.push((i, op)),
                    Err(e) => results[i] = Some(Err(e)),
                },
            }
        }
        let mut clears = Vec::new();
        // A second round only for creates that `CreateStrategy::Detect` switched to POST.
        let mut detecting = true;
        while !batched.is_empty() {
            let (indices, operations): (Vec<usize>, Vec<Operation>) = batched.into_iter().unzip();
            let patches: Vec<bool> = operations.iter().map(|op| op.method == "PATCH").collect();
            let responses = self.run_batches(operations, parallel).await;
            let mut again = Vec::new();
            for ((i, patch), response) in indices.into_iter().zip(patches).zip(responses) {
                let write = &writes[i];
                let table = match self.table(write.record.table()) {
                    Ok(table) => table,
                    Err(e) => {
                        results[i] = Some(Err(e));
                        continue;
                    }
                };
                let (status, result) = match response {
                    Err(e) => (0, Err(e)),
                    Ok(response) => (
                        response.status,
                        self.batched_outcome(table, write, &response).await,
                    ),
                };
                if detecting && patch && self.switches_to_post(table, write, status, &result) {
                    match self.batch_operation(table, write) {
                        Ok(op) => again.push((i, op)),
                        Err(e) => results[i] = Some(Err(e)),
                    }
                    continue;
                }
                match result {
                    Ok(Outcome::Done(outcome)) => results[i] = Some(Ok(outcome)),
                    Ok(Outcome::Hydrate(applied)) => clears.push((i, applied)),
                    Err(e) => results[i] = Some(Err(e)),
                }
            }
            detecting = false;
            batched = again;
        }
        if !clears.is_empty() {
            for (i, result) in self.clear_placeholders(writes, clears).await {
                results[i] = Some(result);
            }
        }
        for i in after_batches {
            results[i] = Some(self.write_exact(&writes[i]).await);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(Error::Backend {
                        backend: self.backend().to_owned(),
                        message: "no response for this write".into(),
                        retryable: true,
                        source: None,
                    })
                })
            })
            .collect()
    }

    /// The operation of a batched write: the state column is sent with creates only.
    fn batch_operation(&self, table: &TableInfo, write: &Write) -> Result<Operation> {
        let state = (write.precondition == Precondition::CreateOnly).then_some(write.record.state);
        self.write_operation(table, write, state, &write.record.reference.key)
    }

    async fn batched_outcome(
        &self,
        table: &TableInfo,
        write: &Write,
        response: &OperationResponse,
    ) -> Result<Outcome> {
        if !matches!(response.status, 200 | 201) {
            return Err(self.operation_error(table, write, response).await);
        }
        let applied = self.applied(table, response.status, &response.body)?;
        let state = write.record.state;
        Ok(match (applied.created, applied.placeholder) {
            (true, _) => Outcome::Done(WriteOutcome {
                id: applied.id,
                version: applied.version,
                change: Change::Created,
                previous_state: None,
                state,
            }),
            (false, true) if state == HydrationState::Hydrated => Outcome::Hydrate(applied),
            (false, placeholder) => {
                let previous = if placeholder {
                    HydrationState::Placeholder
                } else {
                    HydrationState::Hydrated
                };
                Outcome::Done(WriteOutcome {
                    id: applied.id,
                    version: applied.version,
                    change: Change::Updated,
                    previous_state: Some(previous),
                    state: previous,
                })
            }
        })
    }

    /// The second step of hydrating in a batch: clear the state column, conditional on the version the data
    /// write produced. Exactly one writer clears it; the others find it cleared and report no transition.
    async fn clear_placeholders(
        &self,
        writes: &[Write],
        clears: Vec<(usize, Applied)>,
    ) -> Vec<(usize, Result<WriteOutcome>)> {
        let mut operations = Vec::with_capacity(clears.len());
        for (i, applied) in &clears {
            let table = match self.table(writes[*i].record.table()) {
                Ok(t) => t,
                Err(_) => continue,
            };
            operations.push(self.clear_operation(table, applied.id, applied.version));
        }
        let responses = self.run_batches(operations, true).await;
        let mut out = Vec::with_capacity(clears.len());
        for ((i, applied), response) in clears.into_iter().zip(responses) {
            let write = &writes[i];
            let result = match (self.table(write.record.table()), response) {
                (Err(e), _) | (_, Err(e)) => Err(e),
                (Ok(table), Ok(response)) if matches!(response.status, 200 | 201) => self
                    .applied(table, response.status, &response.body)
                    .map(|cleared| WriteOutcome {
                        id: cleared.id,
                        version: cleared.version,
                        change: Change::Updated,
                        previous_state: Some(HydrationState::Placeholder),
                        state: HydrationState::Hydrated,
                    }),
                (Ok(table), Ok(response)) if response.status == 412 => {
                    self.clear_contended(table, write, applied.id).await
                }
                (Ok(table), Ok(response)) => {
                    Err(self.operation_error(table, write, &response).await)
                }
            };
            out.push((i, result));
        }
        out
    }

    fn clear_operation(
        &self,
        table: &TableInfo,
        id: uuid::Uuid,
        version: crate::Version,
    ) -> Operation {
        let column = table.state_column.as_ref().map_or("", |c| c.as_str());
        Operation::new(
            "PATCH",
            format!(
                "{}?$select={}",
                table.address(&Key::Id(id)),
                table.outcome_select()
            ),
        )
        .header("Prefer", "return=representation")
        .header("If-Match", etag(version))
        .json(json!({ column: false }).to_string())
    }

    /// The row changed between the data write and the clear: read it and clear again, unless someone else did.
    async fn clear_contended(
        &self,
        table: &TableInfo,
        write: &Write,
        id: uuid::Uuid,
    ) -> Result<WriteOutcome> {
        let context = self.context(None, Some(write));
        for _ in 0..MAX_CONTENTION_ROUNDS {
            let Some(row) = self
                .fetch_row(table, &Key::Id(id), &table.outcome_select(), &context)
                .await?
            else {
                return Err(Error::NotFound {
                    reference: Box::new(write.record.reference.clone()),
                });
            };
            if row.state == HydrationState::Hydrated {
                return Ok(WriteOutcome {
                    id,
                    version: row.version,
                    change: Change::Updated,
                    previous_state: Some(HydrationState::Hydrated),
                    state: HydrationState::Hydrated,
                });
            }
            let response = self
                .send_operation(self.clear_operation(table, id, row.version), &context)
                .await?;
            if matches!(response.status, 200 | 201) {
                let cleared = self.applied(table, response.status, &response.body)?;
                return Ok(WriteOutcome {
                    id,
                    version: cleared.version,
                    change: Change::Updated,
                    previous_state: Some(HydrationState::Placeholder),
                    state: HydrationState::Hydrated,
                });
            }
            if response.status != 412 {
                return Err(self.operation_error(table, write, &response).await);
            }
        }
        Err(Error::Backend {
            backend: self.backend().to_owned(),
            message: format!(
                "{}: the placeholder kept changing while being hydrated",
                write.record.reference
            ),
            retryable: true,
            source: None,
        })
    }

    /// Sends operations as `$batch` requests of up to `batch_size`, independent (continue on error). Chunks run
    /// in parallel (up to the parallelism limit) when `parallel`, else one after the other, in order. One result
    /// per operation: a failed request fails each of its operations.
    async fn run_batches(
        &self,
        operations: Vec<Operation>,
        parallel: bool,
    ) -> Vec<Result<OperationResponse>> {
        let chunks: Vec<Vec<Operation>> = operations
            .chunks(self.batch_size.max(1))
            .map(<[Operation]>::to_vec)
            .collect();
        // No wider than the parallelism limit: a request body is built when its future first runs, and building
        // bodies far ahead of the requests in flight would keep this task from reading the responses that free
        // the next slot.
        let width = if parallel {
            self.transport.limiter.limit()
        } else {
            1
        };
        let sent: Vec<Vec<Result<OperationResponse>>> = stream::iter(chunks)
            .map(|chunk| self.send_batch(chunk))
            .buffered(width)
            .collect()
            .await;
        sent.into_iter().flatten().collect()
    }

    /// Sends one `$batch` of independent operations. Parts answered `429` (service protection inside the
    /// batch) are sent again in a new batch after their `Retry-After`, within the retry policy (attempts and
    /// total time); when the policy gives up, those operations keep their 429, which maps to the retryable
    /// [`Error::Throttled`].
    async fn send_batch(&self, operations: Vec<Operation>) -> Vec<Result<OperationResponse>> {
        let results: std::sync::Mutex<Vec<Option<Result<OperationResponse>>>> =
            std::sync::Mutex::new((0..operations.len()).map(|_| None).collect());
        let lock = || {
            results
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let throttled = |r: &Option<Result<OperationResponse>>| match r {
            None => true,
            Some(Ok(response)) => response.status == 429,
            Some(Err(_)) => false,
        };
        // The outcome is in `results`; the retry loop only decides whether to send the throttled parts again.
        let _ = self
            .transport
            .retry
            .run(|| async {
                let pending: Vec<usize> = lock()
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| throttled(r).then_some(i))
                    .collect();
                let chunk = pending.iter().map(|&i| operations[i].clone()).collect();
                let answered = self.send_batch_once(chunk).await;
                let mut retry_after: Option<Option<std::time::Duration>> = None;
                let mut results = lock();
                for (i, answer) in pending.into_iter().zip(answered) {
                    if let Ok(response) = &answer
                        && response.status == 429
                    {
                        let wait = response
                            .header_value("retry-after")
                            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
                        retry_after = Some(retry_after.flatten().max(wait));
                    }
                    results[i] = Some(answer);
                }
                match retry_after {
                    Some(retry_after) => {
                        tracing::info!("$batch parts were throttled (429); sending them again");
                        Err(Error::Throttled {
                            backend: self.backend().to_owned(),
                            retry_after,
                        })
                    }
                    None => Ok(()),
                }
            })
            .await;
        results
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(self.protocol_error("no response for this operation")))
            })
            .collect()
    }

    async fn send_batch_once(&self, operations: Vec<Operation>) -> Vec<Result<OperationResponse>> {
        let count = operations.len();
        let idempotent = operations
            .iter()
            .all(|op| op.method != "POST" && op.header_value("If-None-Match").is_none());
        let expected: Vec<Option<String>> =
            operations.iter().map(|op| op.content_id.clone()).collect();
        let mut request = BatchRequest::new();
        request.parts = operations.into_iter().map(Part::Single).collect();
        let http = Request::new(Method::POST, "$batch".into(), "batch")
            .header("Prefer", "odata.continue-on-error")
            .body(request.content_type(), request.encode(API_PATH))
            .idempotent(idempotent);
        let context = self.context(None, None);
        let failed = |e: Error| (0..count).map(|_| Err(e.clone())).collect();
        let response = match self.execute(http, &context).await {
            Ok(r) => r,
            Err(e) => return failed(e),
        };
        if response.status != 200 {
            return failed(self.error(&response, &context));
        }
        let content_type = response
            .header("content-type")
            .unwrap_or_default()
            .to_owned();
        let parts = match batch::parse_response(&content_type, &response.body) {
            Ok(parts) => parts,
            Err(e) => {
                return failed(self.backend_error(e.to_string()));
            }
        };
        let responses = parts
            .into_iter()
            .flat_map(|part| match part {
                ResponsePart::Single(r) => vec![r],
                ResponsePart::ChangeSet(rs) => rs,
            })
            .collect();
        match_parts(&expected, responses)
            .into_iter()
            .map(|r| r.map_err(|reason| self.protocol_error(reason)))
            .collect()
    }

    /// A `$batch` answer that cannot be matched to its request: the outcome of the write is unknown, and sending
    /// it again (every batched write is safe to resend) may get a proper answer.
    fn protocol_error(&self, reason: impl Into<String>) -> Error {
        Error::Protocol {
            backend: self.backend().to_owned(),
            reason: reason.into(),
            retryable: true,
        }
    }

    async fn write_atomic(&self, writes: &[Write]) -> Result<Vec<WriteOutcome>> {
        if writes.len() > batch::MAX_OPERATIONS {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "an atomic write takes at most {} writes, got {}",
                    batch::MAX_OPERATIONS,
                    writes.len()
                ),
            });
        }
        let mut operations = Vec::with_capacity(writes.len());
        for (n, write) in writes.iter().enumerate() {
            let table = self.table(write.record.table())?;
            table.schema.check_write(&write.record)?;
            if write.record.state == HydrationState::Placeholder
                && write.precondition != Precondition::CreateOnly
            {
                return Err(Error::InvalidValue {
                    reference: Box::new(write.record.reference.clone()),
                    field: table
                        .state_column
                        .clone()
                        .unwrap_or_else(|| table.schema.primary_id.clone()),
                    reason: "a placeholder goes in an atomic write only as create-only".into(),
                });
            }
            let operation = self.atomic_operation(table, write).await?;
            operations.push(operation.content_id((n + 1).to_string()));
        }
        let idempotent = operations
            .iter()
            .all(|op| op.method != "POST" && op.header_value("If-None-Match").is_none());
        let expected: Vec<Option<String>> =
            operations.iter().map(|op| op.content_id.clone()).collect();
        let mut request = BatchRequest::new();
        request.parts = vec![Part::ChangeSet(operations)];
        let body = request.encode(API_PATH);
        let context = self.context(None, None);
        // A change set throttled inside the batch (429) was rolled back whole: send it again, within the policy.
        let responses = self
            .transport
            .retry
            .run(|| async {
                let http = Request::new(Method::POST, "$batch".into(), "batch")
                    .body(request.content_type(), body.clone())
                    .idempotent(idempotent);
                let responses = self.send_change_set(http, &context).await?;
                match responses.iter().find(|r| r.status == 429) {
                    Some(throttled) => Err(self.part_error(throttled, None)),
                    None => Ok(responses),
                }
            })
            .await?;
        // A failed change set answers with one error part, naming the failing operation by Content-ID when it
        // says; without one (or with an unknown one) the error is mapped from the part alone.
        if let Some(failed) = responses
            .iter()
            .find(|r| !matches!(r.status, 200 | 201 | 204))
        {
            let index = failed
                .content_id
                .as_ref()
                .and_then(|id| expected.iter().position(|e| e.as_ref() == Some(id)))
                .or((writes.len() == 1).then_some(0));
            return Err(match index {
                Some(i) => {
                    let table = self.table(writes[i].record.table())?;
                    self.operation_error(table, &writes[i], failed).await
                }
                None => self.part_error(failed, Some(writes.len())),
            });
        }
        let mut outcomes: Vec<Option<WriteOutcome>> = vec![None; writes.len()];
        let mut clears = Vec::new();
        let matched = match_parts(&expected, responses);
        if let Some(reason) = matched.iter().find_map(|r| r.as_ref().err()) {
            // The change set was applied, but which answer is whose cannot be told.
            return Err(self.protocol_error(format!(
                "the change set of {} writes was applied, but its answer cannot be matched to them: {reason}",
                writes.len()
            )));
        }
        for (i, (write, response)) in writes.iter().zip(matched).enumerate() {
            let response = response.map_err(|reason| self.protocol_error(reason))?;
            let table = self.table(write.record.table())?;
            match self.batched_outcome(table, write, &response).await? {
                Outcome::Done(outcome) => outcomes[i] = Some(outcome),
                Outcome::Hydrate(applied) => clears.push((i, applied)),
            }
        }
        // The data is committed; clearing the placeholder marks of hydrated rows follows, as for batches.
        for (i, result) in self.clear_placeholders(writes, clears).await {
            outcomes[i] = Some(result?);
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.ok_or_else(|| self.backend_error("a write of the change set has no outcome"))
            })
            .collect()
    }

    /// The operation of one write in a change set. A key that cannot go in a URL is looked up first (a change
    /// set cannot query): found, the row is addressed by GUID; missing, an upsert becomes a POST with the key
    /// columns and an update-only write fails as not found.
    async fn atomic_operation(&self, table: &TableInfo, write: &Write) -> Result<Operation> {
        let context = self.context(None, Some(write));
        let resolved = self.resolve_lookups(write, &context).await?;
        let write = resolved.as_ref();
        let key = &write.record.reference.key;
        if !self.by_filter(table, key) || write.precondition == Precondition::CreateOnly {
            return self.batch_operation(table, write);
        }
        let select = table.schema.primary_id.to_string();
        match self
            .find_by_filter(table, key, Some(&select), &context)
            .await?
        {
            Some(row) => self.write_operation(table, write, None, &Key::Id(row.id)),
            None if write.precondition == Precondition::None => {
                self.batch_operation(table, &Write::create_only(write.record.clone()))
            }
            None => Err(Error::NotFound {
                reference: Box::new(write.record.reference.clone()),
            }),
        }
    }

    /// Sends a change-set `$batch` and returns the answers of its operations.
    async fn send_change_set(
        &self,
        http: Request,
        context: &RequestContext<'_>,
    ) -> Result<Vec<OperationResponse>> {
        let response = self.execute(http, context).await?;
        let content_type = response
            .header("content-type")
            .unwrap_or_default()
            .to_owned();
        if !content_type.starts_with("multipart/") {
            return Err(self.error(&response, context));
        }
        let parts = batch::parse_response(&content_type, &response.body)
            .map_err(|e| self.backend_error(e.to_string()))?;
        Ok(parts
            .into_iter()
            .flat_map(|part| match part {
                ResponsePart::Single(r) => vec![r],
                ResponsePart::ChangeSet(rs) => rs,
            })
            .collect())
    }

    /// The error of a failed part that cannot be tied to one write: mapped from its status, code and
    /// `Retry-After` (a 429 stays [`Error::Throttled`], a 5xx [`Error::Unavailable`]), naming the change set.
    fn part_error(&self, part: &OperationResponse, writes: Option<usize>) -> Error {
        let retry_after = part
            .header_value("retry-after")
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        let error = map_error(
            part.status,
            retry_after,
            &part.body,
            &self.context(None, None),
        );
        match (writes, error) {
            (
                Some(n),
                Error::Backend {
                    message,
                    retryable,
                    source,
                    backend,
                },
            ) => Error::Backend {
                backend,
                message: format!(
                    "a change set of {n} writes failed and was rolled back (the service did not say which write): {message}"
                ),
                retryable,
                source,
            },
            (_, error) => error,
        }
    }

    async fn supports_bulk(&self, table: &TableName) -> Result<bool> {
        let info = self.table(table)?;
        match info.bulk {
            BulkSupport::Supported => return Ok(true),
            BulkSupport::Unsupported => return Ok(false),
            BulkSupport::Probe => {}
        }
        let mut cache = self.bulk_probe.lock().await;
        if let Some(known) = cache.get(table) {
            return Ok(*known);
        }
        // UpsertMultiple is available wherever CreateMultiple is; the service lists the latter, not the former.
        let path = format!(
            "sdkmessagefilters?$select=sdkmessagefilterid&$filter=sdkmessageid/name eq @message and primaryobjecttypecode eq @table&@message='CreateMultiple'&@table='{table}'"
        )
        .replace(' ', "%20");
        let context = self.context(None, None);
        let response = self
            .execute(Request::new(Method::GET, path, "metadata"), &context)
            .await?;
        if response.status != 200 {
            return Err(self.error(&response, &context));
        }
        let supported = response
            .json(self.backend())?
            .get("value")
            .and_then(Value::as_array)
            .is_some_and(|v| !v.is_empty());
        cache.insert(table.clone(), supported);
        Ok(supported)
    }

    async fn bulk_upsert(&self, records: &[Record]) -> BulkReport {
        let mut results: Vec<Option<Result<()>>> = (0..records.len()).map(|_| None).collect();
        // Records are validated chunk by chunk as the requests go out (see `send_upsert_multiple`), so the first
        // request leaves without waiting for every record to be checked.
        let mut by_table: BTreeMap<&TableName, Vec<usize>> = BTreeMap::new();
        for (i, record) in records.iter().enumerate() {
            by_table.entry(record.table()).or_default().push(i);
        }
        let before = self.transport.stats().requests;
        for (table_name, indices) in by_table {
            let table = match self.table(table_name) {
                Ok(t) => t,
                Err(e) => {
                    for &i in &indices {
                        results[i] = Some(Err(e.clone()));
                    }
                    continue;
                }
            };
            let bulk = match self.supports_bulk(table_name).await {
                Ok(b) => b,
                Err(e) => {
                    for &i in &indices {
                        results[i] = Some(Err(e.clone()));
                    }
                    continue;
                }
            };
            // Records whose key (or a lookup target's) cannot go in a URL cannot be named by `@odata.id` either:
            // they take the `$batch` path, which finds them by `$filter`.
            let (bulk_indices, batch_indices): (Vec<usize>, Vec<usize>) = if bulk {
                indices.iter().partition(|&&i| {
                    !self.by_filter(table, &records[i].reference.key)
                        && !self.lookups_by_filter(&records[i])
                })
            } else {
                (Vec::new(), indices)
            };
            for (i, result) in self.upsert_multiple(table, records, &bulk_indices).await {
                results[i] = Some(result);
            }
            if !batch_indices.is_empty() {
                let writes: Vec<Write> = batch_indices
                    .iter()
                    .map(|&i| Write::upsert(records[i].clone()))
                    .collect();
                let outcomes = self.write_batch(&writes, distinct_addresses(&writes)).await;
                for (&i, outcome) in batch_indices.iter().zip(outcomes) {
                    results[i] = Some(outcome.map(|_| ()));
                }
            }
        }
        let requests = (self.transport.stats().requests - before) as usize;
        BulkReport {
            results: results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect(),
            requests,
        }
    }

    /// `UpsertMultiple` in chunks, in parallel. A record addressed twice goes to a later round, since the service
    /// rejects duplicate keys within one request.
    async fn upsert_multiple(
        &self,
        table: &TableInfo,
        records: &[Record],
        indices: &[usize],
    ) -> Vec<(usize, Result<()>)> {
        let mut out = Vec::with_capacity(indices.len());
        let mut round = indices.to_vec();
        while !round.is_empty() {
            let mut chunks = RoundChunks {
                records,
                pending: round.into_iter(),
                seen: HashSet::new(),
                deferred: Vec::new(),
                size: self.bulk_chunk.max(1),
            };
            let sent: Vec<Vec<(usize, Result<()>)>> = stream::iter(chunks.by_ref())
                .map(|chunk| self.send_upsert_multiple(table, records, chunk))
                .buffered(self.transport.limiter.limit())
                .collect()
                .await;
            out.extend(sent.into_iter().flatten());
            round = chunks.deferred;
        }
        out
    }

    async fn send_upsert_multiple(
        &self,
        table: &TableInfo,
        records: &[Record],
        chunk: Vec<usize>,
    ) -> Vec<(usize, Result<()>)> {
        let mut out = Vec::with_capacity(chunk.len());
        let mut valid = Vec::with_capacity(chunk.len());
        for i in chunk {
            let record = &records[i];
            match table.schema.check_write(record) {
                Err(e) => out.push((i, Err(e))),
                Ok(_) if record.state == HydrationState::Placeholder => out.push((
                    i,
                    Err(Error::InvalidValue {
                        reference: Box::new(record.reference.clone()),
                        field: table
                            .state_column
                            .clone()
                            .unwrap_or_else(|| table.schema.primary_id.clone()),
                        reason: "bulk upserts write hydrated records; ensure placeholders instead"
                            .into(),
                    }),
                )),
                Ok(_) => valid.push(i),
            }
        }
        if valid.is_empty() {
            return out;
        }
        let chunk = valid;
        let body = match self.upsert_multiple_body(table, records, &chunk) {
            Ok(body) => body,
            Err(e) => {
                out.extend(chunk.iter().map(|&i| (i, Err(e.clone()))));
                return out;
            }
        };
        let path = self.tagged(format!(
            "{}/Microsoft.Dynamics.CRM.UpsertMultiple",
            table.entity_set
        ));
        let request = Request::new(Method::POST, path, "bulk")
            .body("application/json".into(), body)
            .idempotent(true);
        let context = self.context(None, None);
        let result = match self.execute(request, &context).await {
            Ok(response) if matches!(response.status, 200 | 204) => Ok(()),
            Ok(response) => Err(self.error(&response, &context)),
            Err(e) => Err(e),
        };
        out.extend(chunk.into_iter().map(|i| (i, result.clone())));
        out
    }
}

impl Inner {
    /// `{"Targets":[...]}` for `UpsertMultiple`, written straight into bytes: this is the hot path of a bulk sync,
    /// and building a `serde_json::Value` tree first costs more than sending it. Names are validated identifiers
    /// (letters, digits, `_`), so they need no escaping; values and addresses go through serde_json.
    fn upsert_multiple_body(
        &self,
        table: &TableInfo,
        records: &[Record],
        chunk: &[usize],
    ) -> Result<Vec<u8>> {
        let encode = |e: serde_json::Error| {
            self.backend_error(format!("encoding an UpsertMultiple body: {e}"))
        };
        let mut out = Vec::with_capacity(chunk.len() * 192);
        out.extend_from_slice(b"{\"Targets\":[");
        for (n, &i) in chunk.iter().enumerate() {
            let record = &records[i];
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"@odata.type\":\"Microsoft.Dynamics.CRM.");
            out.extend_from_slice(table.name().as_str().as_bytes());
            out.extend_from_slice(b"\",\"@odata.id\":");
            serde_json::to_writer(&mut out, &table.address(&record.reference.key))
                .map_err(encode)?;
            let member = |name: &str, value: &Value, out: &mut Vec<u8>| {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":");
                serde_json::to_writer(out, value).map_err(encode)
            };
            let key = match &record.reference.key {
                Key::Alternate(key) => Some(key),
                Key::Id(_) => None,
            };
            let is_key_column = |column: &str| key.is_some_and(|key| key.get(column).is_some());
            let repeat_keys = self.bulk_key_columns == BulkKeyColumns::ODataIdAndKeyColumns;
            for (column, value) in &record.fields {
                // The documented body names the row by `@odata.id` only (see `BulkKeyColumns`).
                if repeat_keys || !is_key_column(column.as_str()) {
                    member(column.as_str(), value, &mut out)?;
                }
            }
            if let Some(key) = key.filter(|_| repeat_keys) {
                for (column, value) in key.parts() {
                    if !record.fields.contains_key(column) {
                        member(column.as_str(), &value.to_json(), &mut out)?;
                    }
                }
            }
            for (lookup, target) in &record.lookups {
                let property = table.navigation_property(lookup, &target.table);
                let bind = format!("/{}", self.table(&target.table)?.address(&target.key));
                member(
                    &format!("{property}@odata.bind"),
                    &Value::String(bind),
                    &mut out,
                )?;
            }
            // Bulk upserts write real data: a placeholder they land on becomes hydrated.
            if let Some(state) = &table.state_column {
                member(state.as_str(), &Value::Bool(false), &mut out)?;
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        Ok(out)
    }
}

/// Cuts records into `UpsertMultiple` chunks lazily (the first request leaves as soon as its chunk is cut). A
/// record addressed a second time in one round is deferred to the next round: the service rejects duplicate keys
/// within a request, and chunks of one round run in parallel, so two writes to one record must not share a round.
struct RoundChunks<'a> {
    records: &'a [Record],
    pending: std::vec::IntoIter<usize>,
    seen: HashSet<&'a Key>,
    deferred: Vec<usize>,
    size: usize,
}

impl Iterator for RoundChunks<'_> {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        let mut chunk = Vec::with_capacity(self.size);
        for i in self.pending.by_ref() {
            if self.seen.insert(&self.records[i].reference.key) {
                chunk.push(i);
                if chunk.len() == self.size {
                    break;
                }
            } else {
                self.deferred.push(i);
            }
        }
        (!chunk.is_empty()).then_some(chunk)
    }
}

enum Outcome {
    Done(WriteOutcome),
    /// Written onto a placeholder; the state column still has to be cleared.
    Hydrate(Applied),
}

/// Matches the parts of a `$batch` answer to the operations sent (`expected`: their Content-IDs). A part that
/// carries a Content-ID answers the operation with that id, wherever it stands; parts without one answer the
/// remaining operations in order (the documented order), but only when there are exactly as many of them as
/// remaining operations. Every operation whose answer cannot be told apart (no part, several parts, a count that
/// does not add up) gets an error naming why, never another operation's answer.
fn match_parts(
    expected: &[Option<String>],
    responses: Vec<OperationResponse>,
) -> Vec<std::result::Result<OperationResponse, String>> {
    let total = responses.len();
    let mut by_id: BTreeMap<String, Vec<OperationResponse>> = BTreeMap::new();
    let mut positional = Vec::new();
    for response in responses {
        match &response.content_id {
            Some(id) => by_id.entry(id.clone()).or_default().push(response),
            None => positional.push(response),
        }
    }
    let mut out: Vec<Option<std::result::Result<OperationResponse, String>>> =
        expected.iter().map(|_| None).collect();
    for (slot, id) in out.iter_mut().zip(expected) {
        let Some(id) = id else { continue };
        *slot = match by_id.remove(id) {
            Some(mut parts) if parts.len() == 1 => parts.pop().map(Ok),
            Some(parts) => Some(Err(format!(
                "{} parts of the $batch response answer Content-ID {id}",
                parts.len()
            ))),
            None => None,
        };
    }
    if !by_id.is_empty() {
        let unknown: Vec<&String> = by_id.keys().collect();
        tracing::warn!(
            ?unknown,
            "$batch response parts with Content-IDs that were not sent"
        );
    }
    let open = out.iter().filter(|slot| slot.is_none()).count();
    let matches = positional.len() == open && by_id.is_empty();
    let mut positional = positional.into_iter();
    for slot in out.iter_mut().filter(|slot| slot.is_none()) {
        *slot = Some(match positional.next().filter(|_| matches) {
            Some(response) => Ok(response),
            None => Err(format!(
                "the $batch response has {total} parts for {} operations: no part can be told to answer this one",
                expected.len()
            )),
        });
    }
    out.into_iter()
        .map(|slot| slot.unwrap_or_else(|| Err("no part answers this operation".into())))
        .collect()
}

/// Batches may run in parallel only when no record is written twice (the order of its writes would be lost).
fn distinct_addresses(writes: &[Write]) -> bool {
    let mut seen = HashSet::with_capacity(writes.len());
    writes.iter().all(|w| seen.insert(&w.record.reference))
}

/// Operation headers that may be sent on a single request.
fn known_header(name: &str) -> Option<&'static str> {
    ["Prefer", "If-Match", "If-None-Match"]
        .into_iter()
        .find(|known| known.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_compare_scheme_and_host_without_case_and_default_ports() {
        let root = "https://Contoso.crm.dynamics.com/api/data/v9.2/";
        let link = "https://contoso.crm.dynamics.com/api/data/v9.2/accounts?$deltatoken=1%212";
        assert_eq!(
            follow_link(root, link).as_deref(),
            Some("accounts?$deltatoken=1%212")
        );
        let with_port = "HTTPS://CONTOSO.crm.dynamics.com:443/API/data/v9.2/accounts?$skiptoken=x";
        assert_eq!(
            follow_link(root, with_port).as_deref(),
            Some("accounts?$skiptoken=x")
        );
        // Another path prefix on the same origin is followed as given.
        let older = "https://contoso.crm.dynamics.com/api/data/v9.0/accounts?$skiptoken=x";
        assert_eq!(follow_link(root, older).as_deref(), Some(older));
        for elsewhere in [
            "https://contoso.crm4.dynamics.com/api/data/v9.2/accounts",
            "http://contoso.crm.dynamics.com/api/data/v9.2/accounts",
            "https://contoso.crm.dynamics.com:8443/api/data/v9.2/accounts",
            "accounts?$skiptoken=x",
        ] {
            assert_eq!(follow_link(root, elsewhere), None, "{elsewhere}");
        }
    }

    fn answer(content_id: Option<&str>, status: u16) -> OperationResponse {
        OperationResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            content_id: content_id.map(str::to_owned),
        }
    }

    #[test]
    fn parts_match_by_content_id_then_by_position_when_the_count_adds_up() {
        let ids = |ids: &[Option<&str>]| -> Vec<Option<String>> {
            ids.iter().map(|id| id.map(str::to_owned)).collect()
        };
        let statuses = |matched: Vec<std::result::Result<OperationResponse, String>>| {
            matched
                .into_iter()
                .map(|r| r.map(|r| r.status).map_err(|_| ()))
                .collect::<Vec<_>>()
        };
        // Reordered by id.
        let matched = match_parts(
            &ids(&[Some("1"), Some("2")]),
            vec![answer(Some("2"), 201), answer(Some("1"), 200)],
        );
        assert_eq!(statuses(matched), [Ok(200), Ok(201)]);
        // Positional when no part carries an id and the count matches.
        let matched = match_parts(
            &ids(&[None, None]),
            vec![answer(None, 204), answer(None, 412)],
        );
        assert_eq!(statuses(matched), [Ok(204), Ok(412)]);
        // A missing part makes every positional operation ambiguous.
        let matched = match_parts(&ids(&[None, None]), vec![answer(None, 204)]);
        assert_eq!(statuses(matched), [Err(()), Err(())]);
        // A duplicate id fails its operation; an unknown id makes the positional rest ambiguous.
        let matched = match_parts(
            &ids(&[Some("1"), Some("2"), None]),
            vec![
                answer(Some("1"), 200),
                answer(Some("1"), 200),
                answer(Some("2"), 200),
                answer(Some("7"), 200),
                answer(None, 200),
            ],
        );
        assert_eq!(statuses(matched), [Err(()), Ok(200), Err(())]);
    }
}
