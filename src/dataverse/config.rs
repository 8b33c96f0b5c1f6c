//! How the adapter is configured: the environment, the tables' Dataverse names, and the client's behaviour.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use crate::breaker::BreakerConfig;
use crate::dataverse::auth::{ClientCredentials, Secret, StaticToken, TokenProvider};
use crate::error::{Error, Result};
use crate::name::{ColumnName, IntoName, TableName};
use crate::retry::RetryPolicy;
use crate::schema::Schema;

/// The Web API version the adapter speaks.
pub const API_PATH: &str = "/api/data/v9.2/";

/// The service's ceiling on concurrent requests per user (service protection); the adapter never exceeds it.
pub const MAX_PARALLEL_REQUESTS: usize = 52;

/// Whether a table accepts the bulk messages (`CreateMultiple`, `UpdateMultiple`, `UpsertMultiple`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BulkSupport {
    /// Ask the service once (the `sdkmessagefilters` probe) and remember the answer.
    #[default]
    Probe,
    /// Use `UpsertMultiple`.
    Supported,
    /// Use `$batch` instead.
    Unsupported,
}

/// How a create-only write by alternate key is sent (placeholders, and the create step of an exact write).
///
/// Microsoft documents `PATCH <entityset>(<key>)` with `If-None-Match: *` (create, or `412` if the row exists),
/// and that is the default. A field report (UNCONFIRMED, no capture) says a live org answered that request with
/// `404`; for such orgs choose [`PostWithKeys`](Self::PostWithKeys), or [`Detect`](Self::Detect) to find out per
/// table. Writes by GUID always use the PATCH.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CreateStrategy {
    /// `PATCH` to the key address with `If-None-Match: *`: what the documentation describes (default).
    #[default]
    PatchIfNoneMatch,
    /// `POST` to the entity set with the key columns in the body. A duplicate key (`0x80040237` DuplicateRecord,
    /// `0x80060892` DuplicateRecordEntityKey, answered `409` or `412`) means the row exists.
    PostWithKeys,
    /// Try the PATCH; when a table answers it with a `404` that names no lookup target, switch that table to
    /// `POST` for the lifetime of the store (the write is sent again as a POST) and log it once.
    Detect,
}

/// What an `UpsertMultiple` target carries to name its row.
///
/// The documented body (UpsertMultiple reference) names the row by `"@odata.id": "accounts(accountnumber='A-1')"`
/// and does not repeat the key columns; that is the default. A field report (UNCONFIRMED) says a real org
/// rejects targets that also carry the key columns with `400`, while older builds of this crate always sent them
/// (in case a created row did not get its key from `@odata.id`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BulkKeyColumns {
    /// `@odata.id` only: key columns are left out of the target, even when the record's fields repeat them
    /// (default; the documented shape).
    #[default]
    ODataIdOnly,
    /// `@odata.id` and the key columns as properties (the body of earlier releases).
    ODataIdAndKeyColumns,
}

/// The Dataverse side of one table: names the core schema does not know.
#[derive(Clone, Debug)]
pub struct DataverseTable {
    pub(crate) table: Option<TableName>,
    pub(crate) entity_set: Option<String>,
    pub(crate) navigation: BTreeMap<ColumnName, String>,
    /// Navigation properties by lookup and target table (polymorphic lookups).
    pub(crate) target_navigation: BTreeMap<(ColumnName, TableName), String>,
    pub(crate) state_column: Option<ColumnName>,
    pub(crate) bulk: BulkSupport,
    pub(crate) create_strategy: Option<CreateStrategy>,
    pub(crate) error: Option<Error>,
}

impl DataverseTable {
    /// Settings for the table with this logical name (`account`).
    pub fn new(table: impl IntoName<TableName>) -> Self {
        let (table, error) = match table.into_name() {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e)),
        };
        Self {
            table,
            entity_set: None,
            navigation: BTreeMap::new(),
            target_navigation: BTreeMap::new(),
            state_column: None,
            bulk: BulkSupport::Probe,
            create_strategy: None,
            error,
        }
    }

    /// The entity set name used in URLs (`accounts`). Default: the logical name in the plural by English rules
    /// (`account` → `accounts`, `opportunity` → `opportunities`), or what [`DataverseConfig::load_metadata`]
    /// reads from the service.
    pub fn with_entity_set(mut self, entity_set: &str) -> Self {
        if !is_identifier(entity_set) {
            self.error.get_or_insert(Error::InvalidConfig {
                reason: format!(
                    "table '{}': entity set {entity_set:?} is not an identifier",
                    self.name()
                ),
            });
        }
        self.entity_set = Some(entity_set.to_owned());
        self
    }

    /// The navigation property that sets a lookup (`parentcustomerid` → `parentcustomerid_account`). Case
    /// matters to the service. Default: the lookup's own name.
    pub fn with_navigation(mut self, lookup: impl IntoName<ColumnName>, property: &str) -> Self {
        match lookup.into_name() {
            Ok(lookup) if is_identifier(property) => {
                self.navigation.insert(lookup, property.to_owned());
            }
            Ok(lookup) => {
                self.error.get_or_insert(Error::InvalidConfig {
                    reason: format!(
                        "table '{}', lookup '{lookup}': navigation property {property:?} is not an identifier",
                        self.name()
                    ),
                });
            }
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// The navigation property that sets a lookup when it points at `target` (`parentcustomerid` to an
    /// `account` → `parentcustomerid_account`, to a `contact` → `parentcustomerid_contact`). Needed for
    /// polymorphic lookups (customer, regarding); it wins over [`with_navigation`](Self::with_navigation) for that
    /// target. [`DataverseConfig::load_metadata`] fills these in from the relationships' `ReferencedEntity`.
    pub fn with_target_navigation(
        mut self,
        lookup: impl IntoName<ColumnName>,
        target: impl IntoName<TableName>,
        property: &str,
    ) -> Self {
        match (lookup.into_name(), target.into_name()) {
            (Ok(lookup), Ok(target)) if is_identifier(property) => {
                self.target_navigation
                    .insert((lookup, target), property.to_owned());
            }
            (Ok(lookup), Ok(target)) => {
                self.error.get_or_insert(Error::InvalidConfig {
                    reason: format!(
                        "table '{}', lookup '{lookup}' to '{target}': navigation property {property:?} is not an identifier",
                        self.name()
                    ),
                });
            }
            (Err(e), _) | (_, Err(e)) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// How create-only writes by alternate key are sent to this table (default: the store's
    /// [`DataverseConfig::with_create_strategy`]).
    pub fn with_create_strategy(mut self, strategy: CreateStrategy) -> Self {
        self.create_strategy = Some(strategy);
        self
    }

    /// A boolean column that records the hydration state in Dataverse: `true` on placeholders. Without one,
    /// every record reads as hydrated (ensure still works; guards and hydration hooks need the column).
    pub fn with_state_column(mut self, column: impl IntoName<ColumnName>) -> Self {
        match column.into_name() {
            Ok(c) => self.state_column = Some(c),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// Whether [`DataverseStore::bulk_upsert`](super::DataverseStore::bulk_upsert) may use `UpsertMultiple`.
    pub fn with_bulk(mut self, bulk: BulkSupport) -> Self {
        self.bulk = bulk;
        self
    }

    fn name(&self) -> &str {
        self.table.as_ref().map_or("?", TableName::as_str)
    }

    pub(crate) fn entity_set(&self) -> String {
        self.entity_set
            .clone()
            .unwrap_or_else(|| plural(self.name()))
    }
}

/// `account` → `accounts`, `opportunity` → `opportunities`, `address` → `addresses`.
fn plural(name: &str) -> String {
    let consonant_y = name.len() > 1
        && name.ends_with('y')
        && !name[..name.len() - 1].ends_with(['a', 'e', 'i', 'o', 'u']);
    if consonant_y {
        format!("{}ies", &name[..name.len() - 1])
    } else if name.ends_with(['s', 'x']) || name.ends_with("ch") || name.ends_with("sh") {
        format!("{name}es")
    } else {
        format!("{name}s")
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// Everything needed to build a [`DataverseStore`](super::DataverseStore).
///
/// ```no_run
/// # async fn demo(schema: eventual_upsert::schema::Schema) -> eventual_upsert::Result<()> {
/// use eventual_upsert::dataverse::{DataverseConfig, DataverseTable};
/// let store = DataverseConfig::new("https://contoso.crm4.dynamics.com", schema)
///     .with_client_credentials("tenant-id", "client-id", "client-secret")
///     .with_table(DataverseTable::new("contact").with_navigation("parentcustomerid", "parentcustomerid_account"))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DataverseConfig {
    pub(crate) org_url: String,
    pub(crate) schema: Schema,
    pub(crate) tables: BTreeMap<TableName, DataverseTable>,
    pub(crate) name: Option<String>,
    pub(crate) auth: Auth,
    pub(crate) retry: RetryPolicy,
    pub(crate) breaker: BreakerConfig,
    pub(crate) max_parallel: usize,
    pub(crate) follow_dop_hint: bool,
    pub(crate) bulk_chunk: NonZeroUsize,
    pub(crate) batch_size: NonZeroUsize,
    pub(crate) timeout: Duration,
    pub(crate) bypass_custom_plugins: bool,
    pub(crate) tag: Option<String>,
    pub(crate) root_certificates: Vec<String>,
    pub(crate) http: Option<reqwest::Client>,
    pub(crate) create_strategy: CreateStrategy,
    pub(crate) bulk_key_columns: BulkKeyColumns,
    pub(crate) max_key_segment: usize,
    pub(crate) max_url_length: usize,
    pub(crate) max_response_bytes: u64,
    pub(crate) error: Option<Error>,
}

/// Default for [`DataverseConfig::with_max_key_segment`]: 260 characters, the default `UrlSegmentMaxLength` of
/// Windows' HTTP.sys, in front of which Dataverse runs (a sensible guess; the Dataverse docs state no segment
/// limit).
pub const DEFAULT_MAX_KEY_SEGMENT: usize = 260;

/// Default for [`DataverseConfig::with_max_url_length`]: 32,768 characters, the documented limit of a request URL
/// (compose-http-requests).
pub const DEFAULT_MAX_URL_LENGTH: usize = 32_768;

/// Default for [`DataverseConfig::with_max_response_bytes`]: 64 MiB, room for the largest page (5,000 rows) of
/// wide rows.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Clone)]
pub(crate) enum Auth {
    None,
    Provider(Arc<dyn TokenProvider>),
    ClientCredentials {
        tenant: String,
        client_id: String,
        secret: Secret,
        authority: Option<String>,
    },
}

impl fmt::Debug for DataverseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets live only in `auth`, whose provider types redact themselves; say which kind it is.
        let auth = match &self.auth {
            Auth::None => "none".to_owned(),
            Auth::Provider(p) => format!("{p:?}"),
            Auth::ClientCredentials {
                tenant, client_id, ..
            } => format!("client credentials (tenant {tenant}, client {client_id}, secret ***)"),
        };
        f.debug_struct("DataverseConfig")
            .field("org_url", &self.org_url)
            .field("tables", &self.tables)
            .field("auth", &auth)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker)
            .field("max_parallel", &self.max_parallel)
            .field("follow_dop_hint", &self.follow_dop_hint)
            .field("bulk_chunk", &self.bulk_chunk)
            .field("timeout", &self.timeout)
            .field("bypass_custom_plugins", &self.bypass_custom_plugins)
            .field("tag", &self.tag)
            .field("create_strategy", &self.create_strategy)
            .field("bulk_key_columns", &self.bulk_key_columns)
            .field("max_key_segment", &self.max_key_segment)
            .field("max_url_length", &self.max_url_length)
            .field("max_response_bytes", &self.max_response_bytes)
            .finish_non_exhaustive()
    }
}

impl DataverseConfig {
    /// An environment (`https://contoso.crm4.dynamics.com`, with or without the `/api/data/v9.2/` path) and the
    /// tables the store may touch. Defaults: no authentication (set one with a `with_*` method), the default
    /// [`RetryPolicy`] and [`BreakerConfig`], up to 52 parallel requests following the service's
    /// `x-ms-dop-hint`, `UpsertMultiple` chunks of 500, `$batch` chunks of 1,000, a 120 s request timeout.
    pub fn new(org_url: impl Into<String>, schema: Schema) -> Self {
        Self {
            org_url: org_url.into(),
            schema,
            tables: BTreeMap::new(),
            name: None,
            auth: Auth::None,
            retry: RetryPolicy::default(),
            breaker: BreakerConfig::default(),
            max_parallel: MAX_PARALLEL_REQUESTS,
            follow_dop_hint: true,
            bulk_chunk: NonZeroUsize::new(500).unwrap_or(NonZeroUsize::MIN),
            batch_size: NonZeroUsize::new(crate::dataverse::batch::MAX_OPERATIONS)
                .unwrap_or(NonZeroUsize::MIN),
            timeout: Duration::from_secs(120),
            bypass_custom_plugins: false,
            tag: None,
            root_certificates: Vec::new(),
            http: None,
            create_strategy: CreateStrategy::default(),
            bulk_key_columns: BulkKeyColumns::default(),
            max_key_segment: DEFAULT_MAX_KEY_SEGMENT,
            max_url_length: DEFAULT_MAX_URL_LENGTH,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            error: None,
        }
    }

    /// Reads the environment and OAuth client credentials from `DATAVERSE_URL`, `DATAVERSE_TENANT_ID`,
    /// `DATAVERSE_CLIENT_ID`, `DATAVERSE_CLIENT_SECRET` (and optional `DATAVERSE_AUTHORITY`). `Ok(None)` when
    /// none of them is set; an error naming the missing ones when only some are.
    pub fn from_env(schema: Schema) -> Result<Option<Self>> {
        Self::from_lookup(schema, |name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any variable source (tests, configuration files).
    pub fn from_lookup(
        schema: Schema,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>> {
        // The credentials check the variables (all or none, valid URLs) and name what is missing.
        let Some(credentials) = ClientCredentials::from_lookup(&get)? else {
            return Ok(None);
        };
        let url = get("DATAVERSE_URL").unwrap_or_default();
        Ok(Some(
            Self::new(url, schema).with_token_provider(Arc::new(credentials)),
        ))
    }

    /// Names the store in errors and traces (default: the environment's host).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Dataverse names for one table (tables without settings use the defaults of [`DataverseTable`]).
    pub fn with_table(mut self, table: DataverseTable) -> Self {
        match (&table.error, &table.table) {
            (Some(e), _) => {
                self.error.get_or_insert(e.clone());
            }
            (None, Some(name)) => {
                self.tables.insert(name.clone(), table);
            }
            (None, None) => {}
        }
        self
    }

    /// Sends this bearer token with every request.
    pub fn with_static_token(mut self, token: impl Into<String>) -> Self {
        self.auth = Auth::Provider(Arc::new(StaticToken::new(Secret::new(token.into()))));
        self
    }

    /// Gets tokens from `provider`.
    pub fn with_token_provider(mut self, provider: Arc<dyn TokenProvider>) -> Self {
        self.auth = Auth::Provider(provider);
        self
    }

    /// OAuth2 client credentials (an application user) against the Microsoft identity platform; the scope is
    /// `<environment>/.default`. Tokens are cached and renewed shortly before they expire.
    pub fn with_client_credentials(
        mut self,
        tenant: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> Self {
        self.auth = Auth::ClientCredentials {
            tenant: tenant.into(),
            client_id: client_id.into(),
            secret: Secret::new(client_secret.into()),
            authority: None,
        };
        self
    }

    /// The identity platform to get tokens from (default `https://login.microsoftonline.com`; sovereign clouds
    /// and the emulator use another).
    pub fn with_authority(mut self, authority: impl Into<String>) -> Self {
        if let Auth::ClientCredentials { authority: a, .. } = &mut self.auth {
            *a = Some(authority.into());
        } else {
            self.error.get_or_insert(Error::InvalidConfig {
                reason: "with_authority needs with_client_credentials first".into(),
            });
        }
        self
    }

    /// How transient failures (429, 5xx, timeouts) are retried.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// When the circuit breaker opens and for how long.
    pub fn with_breaker(mut self, breaker: BreakerConfig) -> Self {
        self.breaker = breaker;
        self
    }

    /// At most this many requests in flight (1 to 52; default 52, lowered to the service's `x-ms-dop-hint`).
    pub fn with_max_parallel(mut self, requests: usize) -> Self {
        if !(1..=MAX_PARALLEL_REQUESTS).contains(&requests) {
            self.error.get_or_insert(Error::InvalidConfig {
                reason: format!(
                    "max_parallel must be between 1 and {MAX_PARALLEL_REQUESTS}, got {requests}"
                ),
            });
        }
        self.max_parallel = requests.clamp(1, MAX_PARALLEL_REQUESTS);
        self
    }

    /// Whether to follow the service's `x-ms-dop-hint` (default true): the hint lowers the parallelism limit,
    /// never raises it above [`with_max_parallel`](Self::with_max_parallel).
    pub fn with_dop_hint(mut self, follow: bool) -> Self {
        self.follow_dop_hint = follow;
        self
    }

    /// Records per `UpsertMultiple` request (default 500; Microsoft suggests starting between 100 and 1,000).
    pub fn with_bulk_chunk(mut self, records: NonZeroUsize) -> Self {
        self.bulk_chunk = records;
        self
    }

    /// Operations per `$batch` request (default and maximum 1,000).
    pub fn with_batch_size(mut self, operations: NonZeroUsize) -> Self {
        if operations.get() > crate::dataverse::batch::MAX_OPERATIONS {
            self.error.get_or_insert(Error::InvalidConfig {
                reason: format!("batch size {operations} exceeds the $batch limit of 1000"),
            });
        }
        self.batch_size = operations;
        self
    }

    /// Timeout of one HTTP request (default 120 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `MSCRM.BypassCustomPluginExecution: true` (needs the `prvBypassCustomPlugins` privilege). Note that
    /// it also skips a custom plug-in that creates placeholders server-side.
    pub fn with_bypass_custom_plugins(mut self, bypass: bool) -> Self {
        self.bypass_custom_plugins = bypass;
        self
    }

    /// Adds `tag=<tag>` to every write, which plug-ins see as `SharedVariables["tag"]` (loop prevention in
    /// server-side logic).
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Trusts this PEM certificate in addition to the system roots (a test emulator's self-signed certificate).
    pub fn with_root_certificate_pem(mut self, pem: impl Into<String>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// Uses this HTTP client (its timeout and certificates replace the ones set here).
    pub fn with_http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// How create-only writes by alternate key are sent, for tables that do not say
    /// ([`DataverseTable::with_create_strategy`]). Default [`CreateStrategy::PatchIfNoneMatch`], as documented.
    pub fn with_create_strategy(mut self, strategy: CreateStrategy) -> Self {
        self.create_strategy = strategy;
        self
    }

    /// Whether `UpsertMultiple` targets repeat their key columns next to `@odata.id` (default
    /// [`BulkKeyColumns::ODataIdOnly`], the documented body).
    pub fn with_bulk_key_columns(mut self, shape: BulkKeyColumns) -> Self {
        self.bulk_key_columns = shape;
        self
    }

    /// Longest alternate-key path segment (`accounts(accountnumber='...')`, percent-encoded) put in a URL
    /// (default [`DEFAULT_MAX_KEY_SEGMENT`]). A longer key, like one holding a character the documentation says
    /// breaks key addressing (`/ < > * % & : \ ? +`), is found by a `$filter` query on its columns and then
    /// addressed by GUID, and created by a `POST` with the key columns in the body. Such a key is never retried
    /// as an outage and never counts against the circuit breaker.
    pub fn with_max_key_segment(mut self, characters: usize) -> Self {
        self.max_key_segment = characters.max(1);
        self
    }

    /// Longest request URL sent (default [`DEFAULT_MAX_URL_LENGTH`], the documented limit). A key whose `$filter`
    /// query would be longer is rejected with [`Error::InvalidKey`] before anything is sent (Dataverse keys hold
    /// at most 900 bytes, so such a key cannot exist there).
    pub fn with_max_url_length(mut self, characters: usize) -> Self {
        self.max_url_length = characters.max(1);
        self
    }

    /// Largest response body read (default [`DEFAULT_MAX_RESPONSE_BYTES`]). Reading stops at the limit and the
    /// request fails with [`Error::ResponseTooLarge`] naming it; a `Content-Length` over the limit fails before
    /// reading.
    pub fn with_max_response_bytes(mut self, bytes: u64) -> Self {
        self.max_response_bytes = bytes.max(1);
        self
    }

    pub(crate) fn token_provider(
        &self,
        http: &reqwest::Client,
        org: &str,
    ) -> Result<Option<Arc<dyn TokenProvider>>> {
        Ok(match &self.auth {
            Auth::None => None,
            Auth::Provider(p) => Some(p.clone()),
            Auth::ClientCredentials {
                tenant,
                client_id,
                secret,
                authority,
            } => {
                let mut builder = ClientCredentials::builder(
                    tenant.as_str(),
                    client_id.as_str(),
                    secret.clone(),
                    org,
                )
                .http_client(http.clone());
                if let Some(authority) = authority {
                    builder = builder.authority(authority.as_str());
                }
                Some(Arc::new(builder.build()?))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_sets_default_to_english_plurals() {
        assert_eq!(plural("account"), "accounts");
        assert_eq!(plural("opportunity"), "opportunities");
        assert_eq!(plural("address"), "addresses");
        assert_eq!(plural("survey"), "surveys");
        assert_eq!(DataverseTable::new("contact").entity_set(), "contacts");
        assert_eq!(
            DataverseTable::new("new_thing")
                .with_entity_set("new_thingies")
                .entity_set(),
            "new_thingies"
        );
    }

    #[test]
    fn bad_names_are_reported_not_used() {
        assert!(
            DataverseTable::new("account")
                .with_entity_set("accounts?$x=1")
                .error
                .is_some()
        );
        assert!(
            DataverseTable::new("contact")
                .with_navigation("parentcustomerid", "a/b")
                .error
                .is_some()
        );
        assert!(DataverseTable::new("bad name").error.is_some());
    }

    #[test]
    fn env_needs_all_or_nothing_and_never_echoes_the_secret() {
        let schema = || Schema::new([]).unwrap();
        assert!(
            DataverseConfig::from_lookup(schema(), |_| None)
                .unwrap()
                .is_none()
        );
        let err = DataverseConfig::from_lookup(schema(), |n| {
            (n == "DATAVERSE_CLIENT_SECRET").then(|| "s3cret".to_owned())
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("DATAVERSE_URL") && text.contains("DATAVERSE_TENANT_ID"),
            "{text}"
        );
        assert!(!text.contains("s3cret"));
        let config = DataverseConfig::from_lookup(schema(), |n| match n {
            "DATAVERSE_URL" => Some("https://contoso.crm4.dynamics.com".into()),
            "DATAVERSE_AUTHORITY" => None,
            _ => Some(format!("{n}-value")),
        })
        .unwrap()
        .unwrap();
        assert_eq!(config.org_url, "https://contoso.crm4.dynamics.com");
        let debug = format!("{config:?}");
        assert!(!debug.contains("DATAVERSE_CLIENT_SECRET-value"), "{debug}");
    }
}
