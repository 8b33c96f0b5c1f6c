//! Bearer-token checks on the Web API and an emulated Microsoft identity platform token endpoint
//! (client credentials grant). Secrets and tokens are never logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use serde_json::json;
use tokio::time::Instant;

use super::config::{ClientCredentials, EmulatorConfig};
use super::limits::later;
use super::reply::Reply;

#[derive(Debug)]
pub(crate) struct Auth {
    static_token: Option<String>,
    credentials: Option<ClientCredentials>,
    lifetime: Duration,
    /// Issued token → expiry.
    issued: Mutex<HashMap<String, Instant>>,
}

/// Why a request was not authenticated (the text goes into the 401 body).
pub(crate) enum Denied {
    Missing,
    Invalid,
    Expired,
}

impl Denied {
    pub(crate) fn message(&self) -> &'static str {
        match self {
            Denied::Missing => "The request has no 'Authorization: Bearer <token>' header.",
            Denied::Invalid => "The bearer token is not valid.",
            Denied::Expired => "The bearer token has expired.",
        }
    }
}

impl Auth {
    pub(crate) fn new(config: &EmulatorConfig) -> Auth {
        Auth {
            static_token: config.token.clone(),
            credentials: config.credentials.clone(),
            lifetime: config.token_lifetime,
            issued: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.static_token.is_some() || self.credentials.is_some()
    }

    /// The tenant named in `WWW-Authenticate`.
    pub(crate) fn tenant(&self) -> &str {
        self.credentials
            .as_ref()
            .map_or("common", |c| c.tenant.as_str())
    }

    /// Checks an `Authorization` header value.
    pub(crate) fn check(&self, authorization: Option<&str>) -> Result<(), Denied> {
        if !self.enabled() {
            return Ok(());
        }
        let Some(value) = authorization else {
            return Err(Denied::Missing);
        };
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return Err(Denied::Missing),
        };
        if self.static_token.as_deref() == Some(token) {
            return Ok(());
        }
        let issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        match issued.get(token) {
            Some(&expires) if Instant::now() < expires => Ok(()),
            Some(_) => Err(Denied::Expired),
            None => Err(Denied::Invalid),
        }
    }

    /// `POST /{tenant}/oauth2/v2.0/token` with a form body.
    /// An empty configured scope means `<base_url>/.default`, what a client derives from the emulator's address.
    pub(crate) fn token_endpoint(&self, tenant: &str, body: &[u8], base_url: &str) -> Reply {
        let Some(credentials) = &self.credentials else {
            return oauth_error(
                400,
                "invalid_request",
                90002,
                "The emulator has no client credentials configured.",
            );
        };
        let form = parse_form(body);
        let field = |name: &str| form.get(name).map(String::as_str);
        if tenant != credentials.tenant {
            return oauth_error(
                400,
                "invalid_request",
                90002,
                &format!("Tenant '{tenant}' not found."),
            );
        }
        if field("grant_type") != Some("client_credentials") {
            return oauth_error(
                400,
                "unsupported_grant_type",
                70003,
                "The emulator supports only grant_type=client_credentials.",
            );
        }
        if field("client_id") != Some(credentials.client_id.as_str()) {
            return oauth_error(
                400,
                "unauthorized_client",
                700016,
                "Application not found in the directory.",
            );
        }
        if field("client_secret") != Some(credentials.client_secret.as_str()) {
            return oauth_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided.",
            );
        }
        let expected_scope = match credentials.scope.as_str() {
            "" => format!("{base_url}/.default"),
            scope => scope.to_owned(),
        };
        if field("scope") != Some(expected_scope.as_str()) {
            return oauth_error(
                400,
                "invalid_scope",
                70011,
                "The provided value for the input parameter 'scope' is not valid.",
            );
        }
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let now = Instant::now();
        {
            let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
            issued.retain(|_, &mut expires| expires > now);
            issued.insert(token.clone(), later(now, self.lifetime));
        }
        let secs = self.lifetime.as_secs();
        Reply::json(
            200,
            &json!({
                "token_type": "Bearer",
                "expires_in": secs,
                "ext_expires_in": secs,
                "access_token": token,
            }),
        )
        .with_content_type("application/json; charset=utf-8")
    }
}

fn oauth_error(status: u16, error: &str, code: u32, description: &str) -> Reply {
    Reply::json(
        status,
        &json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {description}"),
            "error_codes": [code],
            "trace_id": uuid::Uuid::new_v4(),
            "correlation_id": uuid::Uuid::new_v4(),
        }),
    )
    .with_content_type("application/json; charset=utf-8")
}

/// `application/x-www-form-urlencoded` fields (`+` is a space).
fn parse_form(body: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(body);
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(name), decode(value))
        })
        .collect()
}

impl Reply {
    fn with_content_type(mut self, content_type: &str) -> Reply {
        self.headers.retain(|(n, _)| *n != "Content-Type");
        self.headers.push(("Content-Type", content_type.to_owned()));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        let form = parse_form(b"scope=https%3A%2F%2Fx%2F.default&client_secret=a+b%2Bc&x");
        assert_eq!(form["scope"], "https://x/.default");
        assert_eq!(form["client_secret"], "a b+c");
        assert_eq!(form["x"], "");
    }
}
