//! Access tokens for the Dataverse Web API.
//!
//! STUB: the API below is agreed; the bodies are being written.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;

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

// TEMPORARY stubs so the store compiles until the real module lands (replaced on merge).
impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret::new(s)
    }
}
/// Stub.
#[derive(Debug)]
pub struct StaticToken(Secret);
impl StaticToken {
    /// Stub.
    pub fn new(token: impl Into<Secret>) -> Self {
        StaticToken(token.into())
    }
}
#[async_trait]
impl TokenProvider for StaticToken {
    async fn token(&self) -> Result<Secret> {
        Ok(self.0.clone())
    }
}
/// Stub.
#[derive(Debug)]
pub struct ClientCredentials;
/// Stub.
#[derive(Debug)]
pub struct ClientCredentialsBuilder;
impl ClientCredentials {
    /// Stub.
    pub fn builder(
        _tenant: impl Into<String>,
        _client_id: impl Into<String>,
        _secret: impl Into<Secret>,
        _org: impl Into<String>,
    ) -> ClientCredentialsBuilder {
        ClientCredentialsBuilder
    }
}
impl ClientCredentialsBuilder {
    /// Stub.
    pub fn authority(self, _a: impl Into<String>) -> Self {
        self
    }
    /// Stub.
    pub fn http_client(self, _c: reqwest::Client) -> Self {
        self
    }
    /// Stub.
    pub fn build(self) -> Result<ClientCredentials> {
        Ok(ClientCredentials)
    }
}
#[async_trait]
impl TokenProvider for ClientCredentials {
    async fn token(&self) -> Result<Secret> {
        todo!()
    }
}
