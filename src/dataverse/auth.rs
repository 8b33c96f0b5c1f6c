//! Access tokens for the Dataverse Web API: a fixed token ([`StaticToken`]) or the OAuth2 client-credentials grant
//! against the Microsoft identity platform ([`ClientCredentials`]), cached and renewed before it expires.
//!
//! Secrets and tokens are held in [`Secret`], which `Debug` and `Display` show as `***`; no type or error of this
//! module ever shows them.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::header::{ACCEPT, RETRY_AFTER};
use serde::Deserialize;
use tokio::time::Instant;

use super::response::parse_retry_after;
use crate::error::{Error, Result};

/// A secret string (client secret, access token): never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(Arc::from(secret.into()))
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Shows `***`, never the secret.
impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(secret: String) -> Self {
        Secret::new(secret)
    }
}

impl From<&str> for Secret {
    fn from(secret: &str) -> Self {
        Secret(Arc::from(secret))
    }
}

/// Supplies bearer tokens for requests.
#[async_trait]
pub trait TokenProvider: Send + Sync + fmt::Debug {
    /// A token valid for at least the next few minutes.
    async fn token(&self) -> Result<Secret>;

    /// The service rejected `token` (401): drop it so the next [`token`](Self::token) fetches a new one.
    fn invalidate(&self, token: &Secret) {
        let _ = token;
    }
}

/// A token obtained elsewhere (a developer's `az account get-access-token`, a test): always the same one.
#[derive(Clone, Debug)]
pub struct StaticToken {
    token: Secret,
}

impl StaticToken {
    /// Always supplies `token`.
    pub fn new(token: impl Into<Secret>) -> Self {
        StaticToken {
            token: token.into(),
        }
    }
}

#[async_trait]
impl TokenProvider for StaticToken {
    async fn token(&self) -> Result<Secret> {
        Ok(self.token.clone())
    }
}

/// The Microsoft identity platform, used unless [`ClientCredentialsBuilder::authority`] says otherwise.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";

/// How long before expiry a cached token is renewed, unless [`ClientCredentialsBuilder::refresh_before`] says
/// otherwise.
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);

/// Timeout of a token request made with the built-in HTTP client (a hung endpoint would otherwise hold up every
/// caller waiting for the token).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Lifetime assumed when a token response has no usable `expires_in` ("tokens last about an hour"); a 401 still
/// renews it through [`TokenProvider::invalidate`].
const ASSUMED_LIFETIME: Duration = Duration::from_secs(3600);

/// The `backend` of this module's errors.
const BACKEND: &str = "token endpoint";

/// Longest piece of an endpoint's error description quoted in an error.
const MAX_QUOTED: usize = 300;

const ENV_URL: &str = "DATAVERSE_URL";
const ENV_TENANT: &str = "DATAVERSE_TENANT_ID";
const ENV_CLIENT_ID: &str = "DATAVERSE_CLIENT_ID";
const ENV_CLIENT_SECRET: &str = "DATAVERSE_CLIENT_SECRET";
const ENV_AUTHORITY: &str = "DATAVERSE_AUTHORITY";

/// OAuth2 client credentials (an app registration with a client secret, bound to a Dataverse application user).
///
/// Tokens are cached and renewed when less than [`refresh_before`](ClientCredentialsBuilder::refresh_before)
/// remains. Callers that ask while a token is being fetched wait for that one request and share its outcome, token
/// or error. Expiry is measured on the tokio clock, so a paused test clock controls it.
///
/// Errors: rejected credentials or scope (HTTP 400/401) are [`Error::Unauthorized`]; throttling (429) is
/// [`Error::Throttled`]; timeouts, connection failures, 408 and 5xx are [`Error::Unavailable`] with the endpoint's
/// `Retry-After`; other failures are [`Error::Backend`], not retryable.
pub struct ClientCredentials {
    tenant: String,
    client_id: String,
    client_secret: Secret,
    authority: String,
    scope: String,
    token_url: String,
    refresh_before: Duration,
    http: reqwest::Client,
    state: Mutex<State>,
    // Held across a fetch so that concurrent callers make one request between them.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    token: Option<Cached>,
    /// Completed fetches, successful or not: a caller that waited for a fetch recognises that it happened.
    fetches: u64,
    /// The outcome of the last fetch when it failed, handed to the callers that waited for it.
    last_error: Option<Error>,
}

struct Cached {
    token: Secret,
    renew_at: Instant,
}

impl State {
    fn fresh(&self) -> Option<Secret> {
        self.token
            .as_ref()
            .filter(|cached| Instant::now() < cached.renew_at)
            .map(|cached| cached.token.clone())
    }
}

/// Builds [`ClientCredentials`]; see [`ClientCredentials::builder`].
#[derive(Debug)]
#[must_use]
pub struct ClientCredentialsBuilder {
    tenant: String,
    client_id: String,
    client_secret: Secret,
    org_url: String,
    authority: Option<String>,
    scope: Option<String>,
    refresh_before: Duration,
    http: Option<reqwest::Client>,
}

impl ClientCredentials {
    /// Credentials of app `client_id` in Entra tenant `tenant` (id or domain), for the environment at `org_url`
    /// (`https://contoso.crm.dynamics.com`).
    pub fn builder(
        tenant: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
        org_url: impl Into<String>,
    ) -> ClientCredentialsBuilder {
        ClientCredentialsBuilder {
            tenant: tenant.into(),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            org_url: org_url.into(),
            authority: None,
            scope: None,
            refresh_before: DEFAULT_REFRESH_BEFORE,
            http: None,
        }
    }

    /// Credentials from the process environment; see [`from_lookup`](Self::from_lookup).
    pub fn from_env() -> Result<Option<ClientCredentials>> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Credentials from `DATAVERSE_URL`, `DATAVERSE_TENANT_ID`, `DATAVERSE_CLIENT_ID`, `DATAVERSE_CLIENT_SECRET`
    /// and, optionally, `DATAVERSE_AUTHORITY`, read with `get`. Empty values count as unset.
    ///
    /// `Ok(None)` when none of the four is set; [`Error::InvalidConfig`] naming the missing ones when only some are.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<ClientCredentials>> {
        const REQUIRED: [&str; 4] = [ENV_URL, ENV_TENANT, ENV_CLIENT_ID, ENV_CLIENT_SECRET];
        let read = |name: &str| get(name).filter(|value| !value.trim().is_empty());
        let values = REQUIRED.map(read);
        let missing: Vec<&str> = REQUIRED
            .iter()
            .zip(&values)
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| *name)
            .collect();
        let [Some(url), Some(tenant), Some(client_id), Some(secret)] = values else {
            if missing.len() == REQUIRED.len() {
                return Ok(None);
            }
            return Err(Error::InvalidConfig {
                reason: format!(
                    "Dataverse client credentials: {} not set (set all of {} or none)",
                    missing.join(", "),
                    REQUIRED.join(", ")
                ),
            });
        };
        let mut builder = Self::builder(tenant, client_id, secret, url);
        if let Some(authority) = read(ENV_AUTHORITY) {
            builder = builder.authority(authority);
        }
        builder.build().map(Some).map_err(|err| match err {
            Error::InvalidConfig { reason } => Error::InvalidConfig {
                reason: format!("{reason} (read from the DATAVERSE_* environment variables)"),
            },
            other => other,
        })
    }

    /// The tenant tokens are requested from.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The application (client) id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The scope requested (`<org url>/.default` by default).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Where tokens are requested: `{authority}/{tenant}/oauth2/v2.0/token`.
    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement, so a panic elsewhere leaves nothing half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One token request: the token and its lifetime.
    async fn fetch(&self) -> Result<(Secret, Duration)> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose()),
            ("scope", self.scope.as_str()),
        ];
        let response = self
            .http
            .post(&self.token_url)
            .header(ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|err| self.transport_error(err))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, SystemTime::now()));
        let body = response
            .bytes()
            .await
            .map_err(|err| self.transport_error(err))?;
        if !(200..300).contains(&status) {
            return Err(self.rejected(status, retry_after, &body));
        }
        let (token, lifetime) = parse_token_response(&body)?;
        tracing::debug!(
            tenant = %self.tenant,
            client_id = %self.client_id,
            expires_in = lifetime.as_secs(),
            "fetched an access token"
        );
        Ok((token, lifetime))
    }

    fn transport_error(&self, err: reqwest::Error) -> Error {
        let what = if err.is_timeout() {
            "timed out"
        } else if err.is_connect() {
            "could not connect"
        } else {
            "failed"
        };
        // The URL holds no secret (the secret is in the body), but it is named once, not once per layer.
        let chain = error_chain(&err.without_url());
        Error::Unavailable {
            backend: BACKEND.into(),
            reason: self.redact(format!(
                "token request to {} {what}: {chain}",
                self.token_url
            )),
            retry_after: None,
        }
    }

    /// A non-2xx response. Only the OAuth `error` and the first line of `error_description` are quoted: the rest
    /// of the description is trace ids, and a body that is not an OAuth error is not quoted at all.
    fn rejected(&self, status: u16, retry_after: Option<Duration>, body: &[u8]) -> Error {
        #[derive(Deserialize)]
        struct OAuthError {
            #[serde(default)]
            error: String,
            #[serde(default)]
            error_description: String,
        }
        let detail = match serde_json::from_slice::<OAuthError>(body) {
            Ok(oauth) if !oauth.error.is_empty() => {
                let first_line = oauth.error_description.lines().next().unwrap_or("").trim();
                if first_line.is_empty() {
                    oauth.error
                } else {
                    format!("{}: {}", oauth.error, truncate(first_line))
                }
            }
            _ => "no OAuth error in the response".to_owned(),
        };
        let detail = self.redact(detail);
        let backend = BACKEND.to_owned();
        match status {
            400 | 401 => Error::Unauthorized {
                backend,
                message: format!(
                    "client {} in tenant {} got no token (HTTP {status}): {detail}",
                    self.client_id, self.tenant
                ),
            },
            429 => Error::Throttled {
                backend,
                retry_after,
            },
            408 | 500..=599 => Error::Unavailable {
                backend,
                reason: format!("HTTP {status}: {detail}"),
                retry_after,
            },
            _ => Error::Backend {
                backend,
                message: format!("token request failed with HTTP {status}: {detail}"),
                retryable: false,
                source: None,
            },
        }
    }

    /// Text quoted from a response should never hold the secret; make sure.
    fn redact(&self, text: String) -> String {
        let secret = self.client_secret.expose();
        if secret.is_empty() || !text.contains(secret) {
            text
        } else {
            text.replace(secret, "***")
        }
    }
}

/// `{"token_type":"Bearer","expires_in":3599,"access_token":"..."}`. The body is never quoted: it holds the token.
fn parse_token_response(body: &[u8]) -> Result<(Secret, Duration)> {
    // No `Debug`: it would show the token.
    #[derive(Deserialize)]
    struct TokenResponse {
        token_type: Option<String>,
        // A number per the spec; older endpoints sent a string.
        expires_in: Option<serde_json::Value>,
        access_token: Option<String>,
    }
    let invalid = |message: &str| Error::Backend {
        backend: BACKEND.into(),
        message: message.to_owned(),
        retryable: false,
        source: None,
    };
    let response: TokenResponse = serde_json::from_slice(body)
        .map_err(|_| invalid("the token response is not a JSON token object"))?;
    let token = response
        .access_token
        .filter(|token| !token.is_empty())
        .ok_or_else(|| invalid("the token response has no access_token"))?;
    if let Some(kind) = response.token_type
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(invalid(&format!(
            "the token response has token_type {:?}, not Bearer",
            truncate(&kind)
        )));
    }
    let lifetime = response
        .expires_in
        .and_then(|value| match value {
            serde_json::Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
        .map_or(ASSUMED_LIFETIME, Duration::from_secs);
    Ok((Secret::new(token), lifetime))
}

fn truncate(text: &str) -> String {
    text.chars().take(MAX_QUOTED).collect()
}

/// `err` and its sources, for a message (reqwest's own message is just "error sending request").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[async_trait]
impl TokenProvider for ClientCredentials {
    async fn token(&self) -> Result<Secret> {
        let seen = {
            let state = self.state();
            if let Some(token) = state.fresh() {
                return Ok(token);
            }
            state.fetches
        };
        let _fetching = self.fetching.lock().await;
        {
            let state = self.state();
            if let Some(token) = state.fresh() {
                return Ok(token);
            }
            // A fetch finished while we waited and failed: share its error rather than hammer the endpoint.
            if state.fetches != seen
                && let Some(err) = &state.last_error
            {
                return Err(err.clone());
            }
        }
        // The lifetime starts when the endpoint issues the token, somewhere after this.
        let requested = Instant::now();
        let outcome = self.fetch().await;
        let mut state = self.state();
        state.fetches += 1;
        match outcome {
            Ok((token, lifetime)) => {
                // A token shorter-lived than `refresh_before` is still used for half its life.
                let lead = self.refresh_before.min(lifetime / 2);
                state.token = Some(Cached {
                    token: token.clone(),
                    renew_at: requested + (lifetime - lead),
                });
                state.last_error = None;
                Ok(token)
            }
            Err(err) => {
                state.last_error = Some(err.clone());
                Err(err)
            }
        }
    }

    fn invalidate(&self, token: &Secret) {
        let mut state = self.state();
        // Only the token that was rejected: a request that saw a 401 after a renewal must not drop the new one.
        if state
            .token
            .as_ref()
            .is_some_and(|cached| cached.token == *token)
        {
            state.token = None;
            tracing::debug!(
                tenant = %self.tenant,
                client_id = %self.client_id,
                "dropped a rejected access token"
            );
        }
    }
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("tenant", &self.tenant)
            .field("client_id", &self.client_id)
            .field("client_secret", &format_args!("***"))
            .field("authority", &self.authority)
            .field("scope", &self.scope)
            .field("refresh_before", &self.refresh_before)
            .finish_non_exhaustive()
    }
}

impl ClientCredentialsBuilder {
    /// The identity provider's base URL (default [`DEFAULT_AUTHORITY`]; national clouds and emulators differ).
    pub fn authority(mut self, url: impl Into<String>) -> Self {
        self.authority = Some(url.into());
        self
    }

    /// The scope to request (default `<org url>/.default`).
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Renew a cached token when less than this remains of its life (default [`DEFAULT_REFRESH_BEFORE`]). A token
    /// living less than twice this is renewed at half its life.
    pub fn refresh_before(mut self, lead: Duration) -> Self {
        self.refresh_before = lead;
        self
    }

    /// The HTTP client for token requests. The default one times out after [`DEFAULT_REQUEST_TIMEOUT`] and does not
    /// follow redirects (which could re-send the secret elsewhere); a client given here is used as it is.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// Checks the settings: tenant, client id and secret are not empty, authority and org URL are http(s) URLs.
    /// Errors are [`Error::InvalidConfig`] naming the setting.
    pub fn build(self) -> Result<ClientCredentials> {
        let tenant = self.tenant.trim();
        if tenant.is_empty() {
            return Err(invalid_config("tenant is empty"));
        }
        if !tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(invalid_config(&format!(
                "tenant {tenant:?} is not a tenant id or domain"
            )));
        }
        let client_id = self.client_id.trim();
        if client_id.is_empty() {
            return Err(invalid_config("client_id is empty"));
        }
        if self.client_secret.expose().is_empty() {
            return Err(invalid_config("client_secret is empty"));
        }
        let org_url = http_url("org_url", &self.org_url)?;
        let authority = http_url(
            "authority",
            self.authority.as_deref().unwrap_or(DEFAULT_AUTHORITY),
        )?;
        let scope = match &self.scope {
            Some(scope) if scope.trim().is_empty() => {
                return Err(invalid_config("scope is empty"));
            }
            Some(scope) => scope.trim().to_owned(),
            None => format!("{org_url}/.default"),
        };
        let http = match self.http {
            Some(client) => client,
            None => reqwest::Client::builder()
                .timeout(DEFAULT_REQUEST_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|err| {
                    invalid_config(&format!(
                        "cannot create the HTTP client: {}",
                        error_chain(&err)
                    ))
                })?,
        };
        Ok(ClientCredentials {
            token_url: format!("{authority}/{tenant}/oauth2/v2.0/token"),
            tenant: tenant.to_owned(),
            client_id: client_id.to_owned(),
            client_secret: self.client_secret,
            authority,
            scope,
            refresh_before: self.refresh_before,
            http,
            state: Mutex::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }
}

fn invalid_config(what: &str) -> Error {
    Error::InvalidConfig {
        reason: format!("client credentials: {what}"),
    }
}

/// `value` as an http(s) URL without trailing slash, query, fragment or user info.
fn http_url(field: &str, value: &str) -> Result<String> {
    let trimmed = value.trim().trim_end_matches('/');
    let valid = reqwest::Url::parse(trimmed).is_ok_and(|url| {
        matches!(url.scheme(), "http" | "https")
            && url.host_str().is_some_and(|host| !host.is_empty())
            && url.username().is_empty()
            && url.password().is_none()
            && url.query().is_none()
            && url.fragment().is_none()
    });
    if valid {
        return Ok(trimmed.to_owned());
    }
    // User info could be a password: do not quote such a value.
    let shown = if trimmed.contains('@') {
        "(a URL with user info)".to_owned()
    } else {
        format!("{trimmed:?}")
    };
    Err(invalid_config(&format!(
        "{field} must be an http(s) URL without query or fragment, got {shown}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::{JoinHandle, JoinSet};

    const TENANT: &str = "contoso.onmicrosoft.com";
    const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
    // Characters that must be escaped in a form body.
    const SECRET: &str = "s3cr&t=+/ %é~x";
    const ORG: &str = "https://contoso.crm.dynamics.com/";

    /// A request as the test server received it.
    #[derive(Clone, Debug)]
    struct Received {
        request_line: String,
        head: String,
        body: String,
    }

    impl Received {
        fn header(&self, name: &str) -> Option<&str> {
            self.head.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case(name)
                    .then_some(value.trim())
            })
        }

        /// The form body decoded: (name, value) pairs in order.
        fn form(&self) -> Vec<(String, String)> {
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(&text.replace('+', " "))
                    .decode_utf8()
                    .unwrap()
                    .into_owned()
            };
            self.body
                .split('&')
                .map(|pair| {
                    let (name, value) = pair.split_once('=').unwrap();
                    (decode(name), decode(value))
                })
                .collect()
        }
    }

    struct Reply {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    }

    fn token_reply(n: usize, expires_in: u64) -> Reply {
        Reply {
            status: 200,
            headers: vec![],
            body: format!(
                r#"{{"token_type":"Bearer","expires_in":{expires_in},"ext_expires_in":{expires_in},"access_token":"token-{n}"}}"#
            ),
        }
    }

    /// A loopback HTTP/1.1 server answering request `n` (from 1) with `respond(n)`, one request per connection.
    /// Dropping it stops the accept loop and every connection task.
    struct TokenServer {
        url: String,
        requests: Arc<Mutex<Vec<Received>>>,
        task: JoinHandle<()>,
    }

    impl Drop for TokenServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TokenServer {
        async fn start(respond: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let requests = Arc::new(Mutex::new(Vec::new()));
            let respond = Arc::new(respond);
            let log = requests.clone();
            let task = tokio::spawn(async move {
                // Owned by this task: aborting it aborts the connections too.
                let mut connections = JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let (log, respond) = (log.clone(), respond.clone());
                    connections.spawn(async move {
                        let _ = serve(stream, &log, &*respond).await;
                    });
                }
            });
            TokenServer {
                url,
                requests,
                task,
            }
        }

        fn count(&self) -> usize {
            self.requests.lock().unwrap().len()
        }

        fn request(&self, index: usize) -> Received {
            self.requests.lock().unwrap()[index].clone()
        }
    }

    async fn serve(
        stream: TcpStream,
        log: &Mutex<Vec<Received>>,
        respond: &(dyn Fn(usize) -> Reply + Send + Sync),
    ) -> io::Result<()> {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if read_some(&stream, &mut buf).await? == 0 {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let (request_line, head) = head.split_once("\r\n").unwrap();
        let received = Received {
            request_line: request_line.to_owned(),
            head: head.to_owned(),
            body: String::new(),
        };
        let length: usize = received
            .header("content-length")
            .map_or(0, |v| v.parse().unwrap());
        while buf.len() < head_end + length {
            if read_some(&stream, &mut buf).await? == 0 {
                return Ok(());
            }
        }
        let received = Received {
            body: String::from_utf8(buf[head_end..head_end + length].to_vec()).unwrap(),
            ..received
        };
        let n = {
            let mut log = log.lock().unwrap();
            log.push(received);
            log.len()
        };
        let reply = respond(n);
        let mut response = format!(
            "HTTP/1.1 {} Test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            reply.status,
            reply.body.len()
        );
        for (name, value) in &reply.headers {
            response.push_str(&format!("{name}: {value}\r\n"));
        }
        response.push_str("\r\n");
        response.push_str(&reply.body);
        write_all(&stream, response.as_bytes()).await
    }

    // `readable`/`try_read` need only tokio's `net` feature, not `io-util`.
    async fn read_some(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
        let mut chunk = [0u8; 4096];
        loop {
            stream.readable().await?;
            match stream.try_read(&mut chunk) {
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
        }
    }

    async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            stream.writable().await?;
            match stream.try_write(data) {
                Ok(n) => data = &data[n..],
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    fn builder(authority: &str) -> ClientCredentialsBuilder {
        // No pooled connections (their idle timers would move a paused clock) and no proxy from the environment.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .no_proxy()
            .build()
            .unwrap();
        ClientCredentials::builder(TENANT, CLIENT_ID, SECRET, ORG)
            .authority(authority)
            .http_client(http)
    }

    fn credentials(server: &TokenServer) -> ClientCredentials {
        builder(&server.url).build().unwrap()
    }

    fn assert_hides_secret(err: &Error) {
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(SECRET), "{shown}");
            assert!(!shown.contains("s3cr"), "{shown}");
        }
    }

    #[test]
    fn secrets_are_never_shown() {
        let secret = Secret::from(SECRET);
        assert_eq!(secret.to_string(), "***");
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert_eq!(Secret::from(SECRET.to_owned()).expose(), SECRET);
        assert_eq!(secret, Secret::new(SECRET));

        let fixed = format!("{:?}", StaticToken::new("eyJ0eXAi.token"));
        assert!(!fixed.contains("eyJ0eXAi"), "{fixed}");

        let builder = ClientCredentials::builder(TENANT, CLIENT_ID, SECRET, ORG);
        let shown = format!("{builder:?}");
        assert!(!shown.contains("s3cr"), "{shown}");

        let credentials = builder.build().unwrap();
        let shown = format!("{credentials:?}");
        assert!(!shown.contains("s3cr"), "{shown}");
        for expected in [
            TENANT,
            CLIENT_ID,
            "client_secret: ***",
            "authority: \"https://login.microsoftonline.com\"",
            "scope: \"https://contoso.crm.dynamics.com/.default\"",
        ] {
            assert!(shown.contains(expected), "{expected} not in {shown}");
        }
        assert_eq!(
            credentials.token_url(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
    }

    #[tokio::test]
    async fn static_token_is_always_the_same() {
        let provider = StaticToken::new("fixed");
        assert_eq!(provider.token().await.unwrap().expose(), "fixed");
        provider.invalidate(&Secret::from("fixed"));
        assert_eq!(provider.token().await.unwrap().expose(), "fixed");
    }

    #[tokio::test]
    async fn sends_the_client_credentials_form() {
        let server = TokenServer::start(|n| token_reply(n, 3599)).await;
        let token = credentials(&server).token().await.unwrap();
        assert_eq!(token.expose(), "token-1");

        let request = server.request(0);
        assert_eq!(
            request.request_line,
            "POST /contoso.onmicrosoft.com/oauth2/v2.0/token HTTP/1.1"
        );
        assert_eq!(
            request.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        // The secret's `&`, `=`, `+`, `/`, space and `%` are escaped, or the body would not split into four pairs.
        assert!(!request.body.contains("s3cr&"), "{}", request.body);
        let form = request.form();
        let expected = [
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", SECRET),
            ("scope", "https://contoso.crm.dynamics.com/.default"),
        ];
        assert_eq!(form.len(), expected.len(), "{form:?}");
        for (name, value) in expected {
            assert!(
                form.contains(&(name.to_owned(), value.to_owned())),
                "{name}={value} not in {form:?}"
            );
        }
    }

    #[tokio::test]
    async fn explicit_scope_is_sent() {
        let server = TokenServer::start(|n| token_reply(n, 3599)).await;
        let provider = builder(&server.url)
            .scope("https://other.crm4.dynamics.com/user_impersonation")
            .build()
            .unwrap();
        provider.token().await.unwrap();
        assert!(server.request(0).form().contains(&(
            "scope".to_owned(),
            "https://other.crm4.dynamics.com/user_impersonation".to_owned()
        )));
    }

    #[tokio::test]
    async fn caches_the_token() {
        let server = TokenServer::start(|n| token_reply(n, 3599)).await;
        let provider = credentials(&server);
        let first = provider.token().await.unwrap();
        let second = provider.token().await.unwrap();
        assert_eq!(first, second);
        assert_eq!(server.count(), 1);
    }

    #[tokio::test]
    async fn short_lived_tokens_are_still_cached() {
        // 60 s is less than the 5 min `refresh_before`: renewed at half its life, not on every call.
        let server = TokenServer::start(|n| token_reply(n, 60)).await;
        let provider = credentials(&server);
        provider.token().await.unwrap();
        provider.token().await.unwrap();
        assert_eq!(server.count(), 1);
    }

    /// Moves the tokio clock forward with no socket in use (a paused clock would also time out pending IO).
    async fn advance(by: Duration) {
        tokio::time::pause();
        tokio::time::advance(by).await;
        tokio::time::resume();
    }

    #[tokio::test]
    async fn renews_before_expiry() {
        let server = TokenServer::start(|n| token_reply(n, 3600)).await;
        let provider = credentials(&server);
        assert_eq!(provider.token().await.unwrap().expose(), "token-1");

        // Renewal is due at 3600 - 300 s.
        advance(Duration::from_secs(3290)).await;
        assert_eq!(provider.token().await.unwrap().expose(), "token-1");
        assert_eq!(server.count(), 1);

        advance(Duration::from_secs(20)).await;
        assert_eq!(provider.token().await.unwrap().expose(), "token-2");
        assert_eq!(server.count(), 2);
    }

    #[tokio::test]
    async fn refresh_before_is_configurable() {
        let server = TokenServer::start(|n| token_reply(n, 3600)).await;
        let provider = builder(&server.url)
            .refresh_before(Duration::from_secs(600))
            .build()
            .unwrap();
        provider.token().await.unwrap();
        advance(Duration::from_secs(3010)).await;
        assert_eq!(provider.token().await.unwrap().expose(), "token-2");
    }

    #[tokio::test]
    async fn invalidating_the_current_token_refetches_once() {
        let server = TokenServer::start(|n| token_reply(n, 3599)).await;
        let provider = credentials(&server);
        let rejected = provider.token().await.unwrap();

        // Several requests saw the 401 with the same token.
        provider.invalidate(&rejected);
        provider.invalidate(&rejected);
        assert_eq!(provider.token().await.unwrap().expose(), "token-2");
        assert_eq!(provider.token().await.unwrap().expose(), "token-2");
        assert_eq!(server.count(), 2);

        // A late 401 for the old token does not drop the new one.
        provider.invalidate(&rejected);
        assert_eq!(provider.token().await.unwrap().expose(), "token-2");
        assert_eq!(server.count(), 2);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let server = TokenServer::start(|n| token_reply(n, 3599)).await;
        let provider = credentials(&server);
        // All 20 find the cache empty on their first poll, before the first response can arrive.
        let tokens = futures_util::future::join_all((0..20).map(|_| provider.token())).await;
        for token in tokens {
            assert_eq!(token.unwrap().expose(), "token-1");
        }
        assert_eq!(server.count(), 1);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_failure() {
        let server = TokenServer::start(|_| Reply {
            status: 503,
            headers: vec![],
            body: String::new(),
        })
        .await;
        let provider = credentials(&server);
        let outcomes = futures_util::future::join_all((0..20).map(|_| provider.token())).await;
        for outcome in outcomes {
            assert!(outcome.unwrap_err().is_retryable());
        }
        assert_eq!(server.count(), 1);

        // The failure is not cached for later callers.
        assert!(provider.token().await.is_err());
        assert_eq!(server.count(), 2);
    }

    #[tokio::test]
    async fn rejected_scope_is_unauthorized_and_hides_the_secret() {
        let server = TokenServer::start(|_| Reply {
            status: 400,
            headers: vec![],
            body: format!(
                r#"{{"error":"invalid_scope","error_description":"AADSTS70011: The provided value for scope is not valid (got {SECRET}).\r\nTrace ID: 0000\r\nCorrelation ID: 1111","error_codes":[70011]}}"#
            ),
        })
        .await;
        let provider = credentials(&server);
        let err = provider.token().await.unwrap_err();
        assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
        assert!(!err.is_retryable());
        let message = err.to_string();
        for expected in ["invalid_scope", "AADSTS70011", "HTTP 400", CLIENT_ID] {
            assert!(message.contains(expected), "{expected} not in {message}");
        }
        assert!(!message.contains("Trace ID"), "{message}");
        assert_hides_secret(&err);

        // Errors are not cached: the next call asks again.
        provider.token().await.unwrap_err();
        assert_eq!(server.count(), 2);
    }

    #[tokio::test]
    async fn rejected_client_is_unauthorized() {
        let server = TokenServer::start(|_| Reply {
            status: 401,
            headers: vec![],
            body: r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 0000"}"#.into(),
        })
        .await;
        let err = credentials(&server).token().await.unwrap_err();
        assert!(
            matches!(&err, Error::Unauthorized { message, .. }
                if message.ends_with("invalid_client: AADSTS7000215: Invalid client secret provided.")),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        assert_hides_secret(&err);
    }

    #[tokio::test]
    async fn outage_is_retryable_with_retry_after() {
        let server = TokenServer::start(|_| Reply {
            status: 503,
            headers: vec![("Retry-After", "7".into())],
            body: "<html>Service Unavailable</html>".into(),
        })
        .await;
        let err = credentials(&server).token().await.unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
        assert!(err.to_string().contains("HTTP 503"), "{err}");
        assert_hides_secret(&err);
    }

    #[tokio::test]
    async fn throttling_is_retryable_with_retry_after() {
        let server = TokenServer::start(|_| Reply {
            status: 429,
            headers: vec![("Retry-After", "12".into())],
            body: String::new(),
        })
        .await;
        let err = credentials(&server).token().await.unwrap_err();
        assert!(matches!(err, Error::Throttled { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(12)));
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_retryable() {
        // A port nobody listens on any more.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let err = builder(&url).build().unwrap().token().await.unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert!(err.to_string().contains("could not connect"), "{err}");
        assert_hides_secret(&err);
    }

    #[tokio::test]
    async fn response_without_access_token_is_permanent() {
        let server = TokenServer::start(|_| Reply {
            status: 200,
            headers: vec![],
            body: r#"{"token_type":"Bearer","expires_in":3599}"#.into(),
        })
        .await;
        let err = credentials(&server).token().await.unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("no access_token"), "{err}");
    }

    #[tokio::test]
    async fn other_statuses_are_permanent_backend_errors() {
        let redirected = Arc::new(AtomicBool::new(false));
        let seen = redirected.clone();
        let server = TokenServer::start(move |_| {
            seen.store(true, Ordering::SeqCst);
            Reply {
                status: 307,
                headers: vec![("Location", "http://127.0.0.1:1/elsewhere".into())],
                body: String::new(),
            }
        })
        .await;
        // The default client: a redirect must not be followed with the secret in the body.
        let provider = ClientCredentials::builder(TENANT, CLIENT_ID, SECRET, ORG)
            .authority(&server.url)
            .build()
            .unwrap();
        let err = provider.token().await.unwrap_err();
        assert!(redirected.load(Ordering::SeqCst));
        assert!(
            matches!(&err, Error::Backend { retryable: false, message, .. } if message.contains("HTTP 307")),
            "{err:?}"
        );
        assert_eq!(server.count(), 1);
    }

    fn config_error(builder: ClientCredentialsBuilder) -> String {
        match builder.build() {
            Err(Error::InvalidConfig { reason }) => reason,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn builder_validates_settings() {
        let b = |tenant: &str, client_id: &str, secret: &str, org: &str| {
            ClientCredentials::builder(tenant, client_id, secret, org)
        };
        assert!(config_error(b(" ", CLIENT_ID, SECRET, ORG)).contains("tenant is empty"));
        assert!(config_error(b("a/b", CLIENT_ID, SECRET, ORG)).contains("tenant"));
        assert!(config_error(b(TENANT, "", SECRET, ORG)).contains("client_id is empty"));
        assert!(config_error(b(TENANT, CLIENT_ID, "", ORG)).contains("client_secret is empty"));
        for org in [
            "contoso.crm.dynamics.com",
            "ftp://contoso",
            "https://x.com/?a=b",
            "",
        ] {
            assert!(
                config_error(b(TENANT, CLIENT_ID, SECRET, org)).contains("org_url"),
                "{org}"
            );
        }
        let reason = config_error(b(TENANT, CLIENT_ID, SECRET, "https://user:pw@x.com"));
        assert!(!reason.contains("pw"), "{reason}");
        let reason =
            config_error(b(TENANT, CLIENT_ID, SECRET, ORG).authority("login.microsoftonline.com"));
        assert!(reason.contains("authority"), "{reason}");
        assert!(config_error(b(TENANT, CLIENT_ID, SECRET, ORG).scope(" ")).contains("scope"));

        // Trailing slashes do not end up doubled in URLs.
        let ok = b(TENANT, CLIENT_ID, SECRET, "http://localhost:8080//")
            .authority("http://127.0.0.1:9000/")
            .build()
            .unwrap();
        assert_eq!(ok.scope(), "http://localhost:8080/.default");
        assert_eq!(
            ok.token_url(),
            "http://127.0.0.1:9000/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
    }

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn from_lookup_reads_all_or_nothing() {
        assert!(
            ClientCredentials::from_lookup(lookup(&[]))
                .unwrap()
                .is_none()
        );
        // Empty values count as unset; the authority alone is not a configuration.
        assert!(
            ClientCredentials::from_lookup(lookup(&[
                ("DATAVERSE_URL", ""),
                ("DATAVERSE_AUTHORITY", "https://login.example")
            ]))
            .unwrap()
            .is_none()
        );

        let all = [
            ("DATAVERSE_URL", "https://contoso.crm.dynamics.com"),
            ("DATAVERSE_TENANT_ID", TENANT),
            ("DATAVERSE_CLIENT_ID", CLIENT_ID),
            ("DATAVERSE_CLIENT_SECRET", SECRET),
        ];
        let credentials = ClientCredentials::from_lookup(lookup(&all))
            .unwrap()
            .unwrap();
        assert_eq!(credentials.tenant(), TENANT);
        assert_eq!(credentials.client_id(), CLIENT_ID);
        assert_eq!(credentials.client_secret.expose(), SECRET);
        assert_eq!(
            credentials.scope(),
            "https://contoso.crm.dynamics.com/.default"
        );
        assert!(
            credentials
                .token_url()
                .starts_with("https://login.microsoftonline.com/")
        );

        let mut with_authority = all.to_vec();
        with_authority.push(("DATAVERSE_AUTHORITY", "https://login.microsoftonline.us"));
        let credentials = ClientCredentials::from_lookup(lookup(&with_authority))
            .unwrap()
            .unwrap();
        assert!(
            credentials
                .token_url()
                .starts_with("https://login.microsoftonline.us/")
        );

        let partial = [
            all[0],
            ("DATAVERSE_CLIENT_ID", CLIENT_ID),
            ("DATAVERSE_CLIENT_SECRET", ""),
        ];
        let Err(Error::InvalidConfig { reason }) = ClientCredentials::from_lookup(lookup(&partial))
        else {
            panic!("partial configuration accepted");
        };
        assert!(
            reason.contains("DATAVERSE_TENANT_ID, DATAVERSE_CLIENT_SECRET not set"),
            "{reason}"
        );

        let mut bad_url = all.to_vec();
        bad_url[0] = ("DATAVERSE_URL", "contoso");
        let Err(Error::InvalidConfig { reason }) = ClientCredentials::from_lookup(lookup(&bad_url))
        else {
            panic!("bad URL accepted");
        };
        assert!(
            reason.contains("org_url") && reason.contains("DATAVERSE_"),
            "{reason}"
        );
        assert!(!reason.contains("s3cr"), "{reason}");
    }
}
