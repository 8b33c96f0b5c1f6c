//! What the emulator serves: tables, limits, auth, TLS and the error shapes whose real values are unconfirmed.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// Most alternate keys one table may declare (a Dataverse limit).
pub const MAX_ALTERNATE_KEYS: usize = 10;

/// One emulated table: names, keys and lookups. Built in the builder style:
///
/// ```
/// use dataverse_emulator::EmulatedTable;
/// let orders = EmulatedTable::new("new_order", "new_orders", "new_orderid", "new_name")
///     .alternate_key(&["new_ordernumber"])
///     .lookup("new_customer_account", "new_customer", "account");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmulatedTable {
    pub(crate) logical_name: String,
    pub(crate) entity_set: String,
    pub(crate) primary_id: String,
    pub(crate) primary_name: String,
    pub(crate) keys: Vec<Vec<String>>,
    pub(crate) lookups: Vec<LookupConfig>,
    pub(crate) columns: Option<Vec<String>>,
    pub(crate) bulk_supported: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LookupConfig {
    pub(crate) navigation_property: String,
    pub(crate) column: String,
    pub(crate) target: String,
}

impl EmulatedTable {
    /// A table with its logical name (`account`), entity set name (`accounts`), primary key column (`accountid`)
    /// and primary name column (`name`); no alternate keys, no lookups, any columns, bulk messages supported.
    pub fn new(logical_name: &str, entity_set: &str, primary_id: &str, primary_name: &str) -> Self {
        EmulatedTable {
            logical_name: logical_name.to_owned(),
            entity_set: entity_set.to_owned(),
            primary_id: primary_id.to_owned(),
            primary_name: primary_name.to_owned(),
            keys: Vec::new(),
            lookups: Vec::new(),
            columns: None,
            bulk_supported: true,
        }
    }

    /// Declares a unique alternate key of one or more columns (at most [`MAX_ALTERNATE_KEYS`] per table).
    /// Rows with a null in any of the key's columns are not constrained by it.
    pub fn alternate_key(mut self, columns: &[&str]) -> Self {
        self.keys
            .push(columns.iter().map(|c| (*c).to_owned()).collect());
        self
    }

    /// Declares a single-valued lookup: written as `"<navigation_property>@odata.bind": "/<set>(<key>)"`, stored
    /// and read back as `_<column>_value` (the target's GUID). Several navigation properties may share a column
    /// (polymorphic customer lookups).
    pub fn lookup(
        mut self,
        navigation_property: &str,
        column: &str,
        target_logical_name: &str,
    ) -> Self {
        self.lookups.push(LookupConfig {
            navigation_property: navigation_property.to_owned(),
            column: column.to_owned(),
            target: target_logical_name.to_owned(),
        });
        self
    }

    /// Declares the table's columns: a body with any other property is rejected with `400`. The primary key,
    /// primary name and alternate key columns are always allowed. Without this call any property is stored.
    pub fn columns(mut self, columns: &[&str]) -> Self {
        self.columns = Some(columns.iter().map(|c| (*c).to_owned()).collect());
        self
    }

    /// Whether `CreateMultiple`, `UpdateMultiple` and `UpsertMultiple` work on this table (default `true`);
    /// when not, they fail with `400` and the `sdkmessagefilters` probe finds nothing.
    pub fn bulk_supported(mut self, yes: bool) -> Self {
        self.bulk_supported = yes;
        self
    }

    /// `account` / `accounts`, primary key `accountid`, primary name `name`, alternate key `[accountnumber]`.
    pub fn accounts() -> Self {
        EmulatedTable::new("account", "accounts", "accountid", "name")
            .alternate_key(&["accountnumber"])
    }

    /// `contact` / `contacts`, primary key `contactid`, primary name `fullname`, lookup
    /// `parentcustomerid_account` → `account` stored in column `parentcustomerid`.
    pub fn contacts() -> Self {
        EmulatedTable::new("contact", "contacts", "contactid", "fullname").lookup(
            "parentcustomerid_account",
            "parentcustomerid",
            "account",
        )
    }

    /// The logical name.
    pub fn logical_name(&self) -> &str {
        &self.logical_name
    }

    /// The entity set name.
    pub fn entity_set(&self) -> &str {
        &self.entity_set
    }
}

/// An error response whose status, code and message are configurable because the real values are unconfirmed.
/// The message template may contain `{table}` (a logical name), `{id}` (a GUID), `{key}` (a key name) and
/// `{columns}` (comma-separated column names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ErrorTemplate {
    pub(crate) status: u16,
    pub(crate) code: String,
    pub(crate) message: String,
}

impl ErrorTemplate {
    fn new(status: u16, code: &str, message: &str) -> Self {
        ErrorTemplate {
            status,
            code: code.to_owned(),
            message: message.to_owned(),
        }
    }

    pub(crate) fn render(&self, vars: &[(&str, &str)]) -> String {
        let mut message = self.message.clone();
        for (name, value) in vars {
            message = message.replace(&format!("{{{name}}}"), value);
        }
        message
    }
}

/// The emulator's configuration, builder style. [`Default`] serves [`EmulatedTable::accounts`] and
/// [`EmulatedTable::contacts`] on an ephemeral port, without auth, limits or TLS, with `x-ms-dop-hint: 4`.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    pub(crate) tables: Vec<EmulatedTable>,
    pub(crate) host: IpAddr,
    pub(crate) port: u16,
    pub(crate) dop_hint: u32,
    pub(crate) request_limit: Option<(u32, Duration)>,
    pub(crate) concurrency_limit: Option<usize>,
    pub(crate) token: Option<String>,
    pub(crate) credentials: Option<ClientCredentials>,
    pub(crate) token_lifetime: Duration,
    pub(crate) tls: bool,
    pub(crate) request_log: Option<PathBuf>,
    /// (table logical name or entity set, create body), in order.
    pub(crate) seed: Vec<(String, Value)>,
    pub(crate) lookup_missing: ErrorTemplate,
    pub(crate) key_missing: ErrorTemplate,
    pub(crate) duplicate_key: ErrorTemplate,
}

/// The one confidential client the token endpoint knows.
#[derive(Clone)]
pub(crate) struct ClientCredentials {
    pub(crate) tenant: String,
    pub(crate) client_id: String,
    pub(crate) client_secret: String,
    pub(crate) scope: String,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("tenant", &self.tenant)
            .field("client_id", &self.client_id)
            .field("client_secret", &"***")
            .field("scope", &self.scope)
            .finish()
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig::new()
            .table(EmulatedTable::accounts())
            .table(EmulatedTable::contacts())
    }
}

impl EmulatorConfig {
    /// A configuration without tables (add them with [`table`](Self::table)).
    pub fn new() -> Self {
        EmulatorConfig {
            tables: Vec::new(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            dop_hint: 4,
            request_limit: None,
            concurrency_limit: None,
            token: None,
            credentials: None,
            token_lifetime: Duration::from_secs(3599),
            tls: false,
            request_log: None,
            seed: Vec::new(),
            lookup_missing: ErrorTemplate::new(
                404,
                "0x80040217",
                "Entity '{table}' With Id = {id} Does Not Exist",
            ),
            key_missing: ErrorTemplate::new(
                404,
                "0x80060891",
                "A record with the specified key values does not exist in {table} entity",
            ),
            // UNCONFIRMED: status and the text after the first two sentences.
            duplicate_key: ErrorTemplate::new(
                412,
                "0x80060892",
                "Entity Key {key} violated. A record with the same value for {columns} already exists. A duplicate record cannot be created. Try again with a unique value.",
            ),
        }
    }

    /// Adds a table.
    pub fn table(mut self, t: EmulatedTable) -> Self {
        self.tables.push(t);
        self
    }

    /// The address to listen on (default `127.0.0.1`: only this machine can connect). `0.0.0.0` or `::` listen
    /// on every interface; the service root then names the loopback address of that family.
    pub fn host(mut self, host: IpAddr) -> Self {
        self.host = host;
        self
    }

    /// The port (default 0: an ephemeral port, see [`Emulator::base_url`](super::Emulator::base_url)).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Appends one JSON object per line to this file for every HTTP request, when its response is sent:
    /// `time_unix_ms` (arrival), `method`, `target` (path and query), `status`, `duration_ms`,
    /// `service_request_id` (the `x-ms-service-request-id` sent back), and the client's
    /// `client_request_id` / `correlation_request_id` headers when present. The file is created if missing and
    /// never truncated; [`Emulator::start`](super::Emulator::start) fails if it cannot be opened.
    pub fn request_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.request_log = Some(path.into());
        self
    }

    /// A row to create when the emulator starts, before it accepts connections: `row` is the body of a Web API
    /// create on `table` (a logical name or an entity set name), with lookups as `@odata.bind`. Rows are
    /// created in the order added; [`Emulator::start`](super::Emulator::start) fails with
    /// [`EmulatorError::Seed`](super::EmulatorError::Seed) if one is refused. See also
    /// [`seed_json`](Self::seed_json).
    pub fn seed_row(mut self, table: &str, row: Value) -> Self {
        self.seed.push((table.to_owned(), row));
        self
    }

    /// The `x-ms-dop-hint` header sent on every response (default 4).
    pub fn dop_hint(mut self, n: u32) -> Self {
        self.dop_hint = n;
        self
    }

    /// Service protection by request count: more than `max_requests` in any sliding `window` get `429` with
    /// `Retry-After` (whole seconds until the window frees, at least 1) and code `0x80072322`. Responses then carry
    /// `x-ms-ratelimit-burst-remaining-xrm-requests`. Measured on tokio's clock.
    pub fn request_limit(mut self, max_requests: u32, window: Duration) -> Self {
        self.request_limit = Some((max_requests, window));
        self
    }

    /// Service protection by concurrency: a request arriving while `max_in_flight` are being served gets `429`
    /// immediately, code `0x80072326`, with `Retry-After: 1`.
    pub fn concurrency_limit(mut self, max_in_flight: usize) -> Self {
        self.concurrency_limit = Some(max_in_flight);
        self
    }

    /// Web API requests must carry `Authorization: Bearer <token>` (this token, or one issued by the token
    /// endpoint), else `401`.
    pub fn require_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// Enables the token endpoint `POST /{tenant}/oauth2/v2.0/token` for this one client (client credentials
    /// grant) and requires its tokens on the Web API. An empty `scope` stands for `<base_url>/.default`, the
    /// scope a client derives from the emulator's address (which is known only once it runs).
    pub fn client_credentials(
        mut self,
        tenant: &str,
        client_id: &str,
        client_secret: &str,
        scope: &str,
    ) -> Self {
        self.credentials = Some(ClientCredentials {
            tenant: tenant.to_owned(),
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            scope: scope.to_owned(),
        });
        self
    }

    /// Lifetime (`expires_in`) of issued tokens (default 3599 s); expired tokens get `401`. Measured on tokio's
    /// clock, in whole seconds.
    pub fn token_lifetime(mut self, d: Duration) -> Self {
        self.token_lifetime = d;
        self
    }

    /// Serve https with a self-signed certificate generated at start for `127.0.0.1`, `localhost` and the
    /// [`host`](Self::host), with a subject and serial number of its own per instance (see
    /// [`Emulator::certificate_pem`](super::Emulator::certificate_pem) and
    /// [`Emulator::certificate_subject`](super::Emulator::certificate_subject)).
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    /// The error for a lookup bound by GUID to a missing row (UNCONFIRMED; default
    /// `404` / `0x80040217` / `Entity '{table}' With Id = {id} Does Not Exist`, `{table}` being the referenced
    /// table's logical name).
    pub fn lookup_missing_error(mut self, status: u16, code: &str, message_template: &str) -> Self {
        self.lookup_missing = ErrorTemplate::new(status, code, message_template);
        self
    }

    /// The error for a row addressed (or a lookup bound) by alternate key that does not exist (status UNCONFIRMED;
    /// default `404` / `0x80060891` / `A record with the specified key values does not exist in {table} entity`).
    pub fn key_missing_error(mut self, status: u16, code: &str, message_template: &str) -> Self {
        self.key_missing = ErrorTemplate::new(status, code, message_template);
        self
    }

    /// The error for a write that would give two rows the same alternate key values (UNCONFIRMED; default `412` /
    /// `0x80060892` / `Entity Key {key} violated. A record with the same value for {columns} already exists. …`;
    /// `{key}` is the key's name, `{columns}` its columns, `{table}` the logical name).
    pub fn duplicate_key_error(mut self, status: u16, code: &str, message_template: &str) -> Self {
        self.duplicate_key = ErrorTemplate::new(status, code, message_template);
        self
    }
}
