//! The `[hightemplar]` table: where the app's bootstrap endpoint is, which extra headers it gets,
//! the idle timeout, and the RabbitMQ exchange to consume.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::auth::parse_app_url;

/// Upper bound of `api_timeout_ms`: a connecting client waits this long for its hello.
pub const MAX_API_TIMEOUT_MS: u64 = 60_000;

/// The `[hightemplar]` table. Its presence turns the High-templar endpoint on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HighTemplarConfig {
    /// WebSocket paths on the public listener (High-templar serves `/ws/`, and `/ws` upgrades
    /// too).
    pub paths: Vec<String>,
    /// The app's API base URL, ending in `/`: Plaza calls `GET {api_url}bootstrap/`
    /// (High-templar's `API_URL`). Required.
    pub api_url: String,
    /// A unix socket to reach the app through; the URL still gives the path and `Host`
    /// (High-templar's `API_SOCKET`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Bound on the bootstrap call, connecting included; no answer in time is a refusal.
    pub api_timeout_ms: u64,
    /// Largest bootstrap answer read, in bytes.
    pub max_bootstrap_bytes: usize,
    /// A connection that sends no frame for this long is closed with 1000 (WebSocket pings do
    /// not count). 0 turns it off.
    pub idle_timeout_secs: u64,
    /// Extra headers for the bootstrap call (High-templar's `CONNECTION_HEADERS`); they replace
    /// the default ones of the same name.
    pub headers: Vec<HeaderRule>,
    /// RabbitMQ to consume triggers from, e.g. `amqp://user:pass@127.0.0.1:5672/%2f`. Needs the
    /// `amqp` cargo feature. Unset: only the HTTP trigger.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_url: Option<String>,
    /// The direct exchange triggers are published to (routing key `*`).
    pub exchange: String,
    /// Longest wait between two attempts to reach RabbitMQ (the wait doubles from 0.5 s).
    pub amqp_retry_max_secs: u64,
}

impl Default for HighTemplarConfig {
    fn default() -> Self {
        Self {
            paths: vec!["/ws/".into(), "/ws".into()],
            api_url: String::new(),
            api_socket: None,
            api_timeout_ms: 5000,
            max_bootstrap_bytes: 1024 * 1024,
            idle_timeout_secs: 300,
            headers: Vec::new(),
            amqp_url: None,
            exchange: "hightemplar".into(),
            amqp_retry_max_secs: 10,
        }
    }
}

/// One extra bootstrap header and where its value comes from: exactly one of a header of the
/// WebSocket request, a query parameter, a cookie, or a constant. An empty value sends no header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRule {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl HighTemplarConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.api_url.is_empty() {
            return Err(
                "hightemplar.api_url is required (e.g. \"http://127.0.0.1:8000/api/\")".into(),
            );
        }
        parse_app_url("hightemplar.api_url", &self.api_url)
            .map_err(|e| e.replacen("auth.hightemplar.api_url", "hightemplar.api_url", 1))?;
        if !self.api_url.ends_with('/') {
            return Err(format!(
                "hightemplar.api_url '{}' must end with '/': `bootstrap/` is appended to it",
                self.api_url
            ));
        }
        if self
            .api_socket
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("hightemplar.api_socket is empty; leave it unset to use TCP".into());
        }
        if !(1..=MAX_API_TIMEOUT_MS).contains(&self.api_timeout_ms) {
            return Err(format!(
                "hightemplar.api_timeout_ms must be between 1 and {MAX_API_TIMEOUT_MS}"
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.max_bootstrap_bytes) {
            return Err("hightemplar.max_bootstrap_bytes must be between 1024 and 67108864".into());
        }
        if self.idle_timeout_secs > 86_400 {
            return Err("hightemplar.idle_timeout_secs must be at most 86400".into());
        }
        if self.paths.is_empty() {
            return Err("hightemplar.paths is empty".into());
        }
        for path in &self.paths {
            if !path.starts_with('/') || path.starts_with("/api") || path.contains(['{', '}', '*'])
            {
                return Err(format!(
                    "hightemplar.paths: '{path}' must start with '/', not be under /api, and \
                     hold no '{{', '}}' or '*'"
                ));
            }
        }
        for rule in &self.headers {
            hyper::http::HeaderName::from_bytes(rule.name.as_bytes()).map_err(|_| {
                format!("hightemplar.headers: '{}' is not a header name", rule.name)
            })?;
            let sources = [&rule.header, &rule.query, &rule.cookie, &rule.value]
                .iter()
                .filter(|s| s.is_some())
                .count();
            if sources != 1 {
                return Err(format!(
                    "hightemplar.headers '{}': set exactly one of header, query, cookie, value",
                    rule.name
                ));
            }
            if let Some(value) = &rule.value
                && hyper::http::HeaderValue::from_str(value).is_err()
            {
                return Err(format!(
                    "hightemplar.headers '{}': the value is not a valid header value",
                    rule.name
                ));
            }
        }
        if self.exchange.is_empty() || self.exchange.len() > 255 {
            return Err("hightemplar.exchange must be 1 to 255 bytes".into());
        }
        if let Some(url) = &self.amqp_url {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err("hightemplar.amqp_url must start with amqp://".into());
            }
            if !cfg!(feature = "amqp") {
                return Err(
                    "hightemplar.amqp_url is set, but this plaza was built without the `amqp` \
                     feature (cargo build --features amqp)"
                        .into(),
                );
            }
        }
        if !(1..=3600).contains(&self.amqp_retry_max_secs) {
            return Err("hightemplar.amqp_retry_max_secs must be between 1 and 3600".into());
        }
        Ok(())
    }

    /// A copy safe to print: the password in `amqp_url` is masked.
    pub fn redacted(&self) -> Self {
        let mut shown = self.clone();
        if let Some(url) = &mut shown.amqp_url
            && let Some((scheme, rest)) = url.split_once("://")
            && let Some((userinfo, host)) = rest.rsplit_once('@')
        {
            let user = userinfo.split(':').next().unwrap_or("");
            *url = format!("{scheme}://{user}:<not shown>@{host}");
        }
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> HighTemplarConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_and_errors() {
        let ok = parse("api_url = \"http://127.0.0.1:8000/api/\"");
        assert_eq!(ok.paths, ["/ws/", "/ws"]);
        assert_eq!(ok.idle_timeout_secs, 300);
        assert_eq!(ok.exchange, "hightemplar");
        assert!(ok.validate().is_ok());
        let bad = [
            ("", "api_url is required"),
            (
                "api_url = \"http://127.0.0.1:8000/api\"",
                "must end with '/'",
            ),
            ("api_url = \"https://x/api/\"", "https is not supported"),
            (
                "api_url = \"http://x/\"\napi_timeout_ms = 0",
                "api_timeout_ms",
            ),
            (
                "api_url = \"http://x/\"\npaths = [\"ws\"]",
                "must start with '/'",
            ),
            (
                "api_url = \"http://x/\"\npaths = [\"/api/ws\"]",
                "not be under /api",
            ),
            (
                "api_url = \"http://x/\"\n[[headers]]\nname = \"X-A\"",
                "exactly one of",
            ),
            (
                "api_url = \"http://x/\"\n[[headers]]\nname = \"X-A\"\nquery = \"a\"\ncookie = \"b\"",
                "exactly one of",
            ),
            (
                "api_url = \"http://x/\"\n[[headers]]\nname = \"bad name\"\nquery = \"a\"",
                "not a header name",
            ),
            (
                "api_url = \"http://x/\"\namqp_url = \"http://x\"",
                "amqp://",
            ),
            ("api_url = \"http://x/\"\nexchange = \"\"", "exchange"),
        ];
        for (text, expected) in bad {
            let err = parse(text).validate().unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
        assert!(toml::from_str::<HighTemplarConfig>("api_ur = \"x\"").is_err());
    }

    #[test]
    fn hides_the_broker_password() {
        let cfg = HighTemplarConfig {
            amqp_url: Some("amqp://rabbit:s3cret@127.0.0.1:5672/%2f".into()),
            ..HighTemplarConfig::default()
        };
        let shown = cfg.redacted().amqp_url.unwrap();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("rabbit") && shown.contains("127.0.0.1:5672"),
            "{shown}"
        );
    }
}
