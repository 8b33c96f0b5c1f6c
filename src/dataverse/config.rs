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

/// The Dataverse side of one table: names the core schema does not know.
#[derive(Clone, Debug)]
pub struct DataverseTable {
    pub(crate) table: Option<TableName>,
    pub(crate) entity_set: Option<String>,
    pub(crate) navigation: BTreeMap<ColumnName, String>,
    pub(crate) state_column: Option<ColumnName>,
    pub(crate) bulk: BulkSupport,
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
            state_column: None,
            bulk: BulkSupport::Probe,
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
    pub(crate) error: Option<Error>,
}

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
