//! Authentication: who a connection is and which channels it may join, decided by the app.
//!
//! Plaza never keeps user accounts. The app proves a connection's identity in one of two ways
//! (DESIGN.md §4, "the application stays in charge"):
//!
//! - a token the app signed ([`jwt`]): HS256 with a shared secret, or RS256/ES256 with a public key
//!   so that the signing key never leaves the app;
//! - or Plaza asks the app over HTTP ([`app`]), forwarding the client's cookies and chosen headers,
//!   so that apps with session cookies need no token code at all.
//!
//! Both are configured in the `[auth]` table, [`AuthConfig`].

pub mod app;
pub mod jwt;

use std::path::PathBuf;

use hyper::http::{HeaderName, Uri};
use serde::{Deserialize, Serialize};

/// HS256 secrets shorter than this are refused: RFC 7518 §3.2 requires a key at least as long as
/// the hash output (256 bits), and a short secret can be brute-forced offline from one token.
pub const MIN_HMAC_SECRET_LEN: usize = 32;

/// Upper bound of `leeway_secs`: clock skew is seconds, not minutes; a large leeway silently
/// extends every token's life.
pub const MAX_LEEWAY_SECS: u64 = 300;

/// Upper bound of `app_timeout_ms`: a connection waits this long for its answer, and a stuck app
/// must not pile up waiting connections for minutes.
pub const MAX_APP_TIMEOUT_MS: u64 = 60_000;

/// Headers that describe the request Plaza itself sends to the app (framing, routing, upgrade).
/// Forwarding the client's values would corrupt that request, so they cannot be listed in
/// `forward_headers`.
const UNFORWARDABLE_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "te",
    "trailer",
    "expect",
];

/// The `[auth]` table.
///
/// With nothing configured, every connection is accepted anonymously (the development default).
/// Configuring a key or `connect_url` turns anonymous connections off unless `anonymous = true`
/// says otherwise.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether a connection without a token (and without an allow from the app) is accepted, as
    /// an anonymous user. Unset: see [`AuthConfig::allows_anonymous`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anonymous: Option<bool>,
    /// Shared secret for HS256 tokens (at least 32 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hmac_secret: Option<String>,
    /// PEM public key for RS256 (RSA, at least 2048 bits) or ES256 (EC P-256); the algorithm
    /// follows from the key. Loaded at startup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
    /// When set, tokens must carry this `aud`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// When set, tokens must carry this `iss`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Seconds of clock skew tolerated on `exp` and `nbf` (default 5, at most 300). Small on
    /// purpose: the app and Plaza usually share NTP, and the leeway lengthens every token's life.
    pub leeway_secs: u64,
    /// `http://` URL Plaza POSTs to when a client connects without a token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_url: Option<String>,
    /// `http://` URL Plaza POSTs to when a namespace asks the app about a subscription.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribe_url: Option<String>,
    /// Hard bound on one call to the app, connection included, in milliseconds (default 3000).
    pub app_timeout_ms: u64,
    /// Client request headers copied into the calls to the app (case-insensitive).
    pub forward_headers: Vec<String>,
    /// Query parameters of the client's WebSocket URL copied into the calls' `query` object.
    pub forward_query: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            anonymous: None,
            hmac_secret: None,
            public_key_file: None,
            audience: None,
            issuer: None,
            leeway_secs: 5,
            connect_url: None,
            subscribe_url: None,
            app_timeout_ms: 3000,
            forward_headers: [
                "cookie",
                "authorization",
                "user-agent",
                "x-real-ip",
                "x-forwarded-for",
            ]
            .map(String::from)
            .to_vec(),
            forward_query: Vec::new(),
        }
    }
}

/// Hand-written so that the secret never reaches a log line through `{:?}`.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("anonymous", &self.anonymous)
            .field(
                "hmac_secret",
                &self.hmac_secret.as_ref().map(|_| "<set, not shown>"),
            )
            .field("public_key_file", &self.public_key_file)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("leeway_secs", &self.leeway_secs)
            .field("connect_url", &self.connect_url)
            .field("subscribe_url", &self.subscribe_url)
            .field("app_timeout_ms", &self.app_timeout_ms)
            .field("forward_headers", &self.forward_headers)
            .field("forward_query", &self.forward_query)
            .finish()
    }
}

/// A problem found while setting authentication up (reading the key file, building the client).
/// Fatal at startup: better to refuse to start than to run with authentication half-configured.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("auth.public_key_file {path}: cannot read: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("auth.public_key_file {path}: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("invalid [auth] configuration: {0}")]
    Invalid(String),
}

impl AuthConfig {
    /// Whether connections that prove nothing are accepted: the explicit `anonymous`, else true
    /// only when no way to authenticate is configured (so turning auth on cannot leave an
    /// anonymous back door open by accident).
    pub fn allows_anonymous(&self) -> bool {
        self.anonymous.unwrap_or(
            self.hmac_secret.is_none()
                && self.public_key_file.is_none()
                && self.connect_url.is_none(),
        )
    }

    /// Whether connect tokens can be verified (a secret or a public key is configured).
    pub fn has_jwt_key(&self) -> bool {
        self.hmac_secret.is_some() || self.public_key_file.is_some()
    }

    /// Checks everything that can be checked without I/O; the key file is read by
    /// [`JwtVerifier::new`].
    pub fn validate(&self) -> Result<(), String> {
        if self.hmac_secret.is_some() && self.public_key_file.is_some() {
            return Err(
                "auth: set either hmac_secret (HS256) or public_key_file (RS256/ES256), \
                        not both: tokens are verified with exactly one algorithm"
                    .into(),
            );
        }
        if let Some(secret) = &self.hmac_secret
            && secret.len() < MIN_HMAC_SECRET_LEN
        {
            return Err(format!(
                "auth.hmac_secret is {} bytes; HS256 needs at least {MIN_HMAC_SECRET_LEN} \
                 (e.g. `openssl rand -hex 32`)",
                secret.len()
            ));
        }
        if self
            .public_key_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("auth.public_key_file is empty; leave it unset or name a PEM file".into());
        }
        for (name, value) in [("audience", &self.audience), ("issuer", &self.issuer)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(format!(
                    "auth.{name} is empty; leave it unset to not check it"
                ));
            }
        }
        if self.leeway_secs > MAX_LEEWAY_SECS {
            return Err(format!(
                "auth.leeway_secs must be at most {MAX_LEEWAY_SECS}"
            ));
        }
        for (name, url) in [
            ("connect_url", &self.connect_url),
            ("subscribe_url", &self.subscribe_url),
        ] {
            if let Some(url) = url {
                parse_app_url(name, url)?;
            }
        }
        if !(1..=MAX_APP_TIMEOUT_MS).contains(&self.app_timeout_ms) {
            return Err(format!(
                "auth.app_timeout_ms must be between 1 and {MAX_APP_TIMEOUT_MS}"
            ));
        }
        for name in &self.forward_headers {
            parse_forward_header(name)?;
        }
        for name in &self.forward_query {
            if name.is_empty() {
                return Err("auth.forward_query contains an empty name".into());
            }
        }
        Ok(())
    }

    /// A copy safe to print (`check-config`): the secret is masked.
    pub fn redacted(&self) -> Self {
        let mut shown = self.clone();
        if shown.hmac_secret.is_some() {
            shown.hmac_secret = Some("<set, not shown>".into());
        }
        shown
    }
}

/// Parses an app URL. Only plain `http://` for now: the HTTP client is built without TLS to keep
/// the dependency tree small, and the app usually runs next to Plaza.
pub(crate) fn parse_app_url(key: &str, url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("auth.{key} '{url}' is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "auth.{key} '{url}': https is not supported yet; use an http:// address \
                 (the app on the same host or network, or a local TLS-terminating proxy)"
            ));
        }
        _ => return Err(format!("auth.{key} '{url}' must start with http://")),
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("auth.{key} '{url}' has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "auth.{key}: credentials in the URL are not supported; forward a header instead"
        ));
    }
    if authority.host().is_empty() {
        return Err(format!("auth.{key} '{url}' has no host"));
    }
    Ok(uri)
}

/// Parses a `forward_headers` entry into its (lowercase) header name.
pub(crate) fn parse_forward_header(name: &str) -> Result<HeaderName, String> {
    let header = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("auth.forward_headers: '{name}' is not a valid header name"))?;
    let lower = header.as_str();
    if UNFORWARDABLE_HEADERS.contains(&lower) || lower.starts_with("sec-websocket-") {
        return Err(format!(
            "auth.forward_headers: '{name}' describes the connection itself and cannot be forwarded"
        ));
    }
    Ok(header)
}

/// What the node uses to decide who a connection is: built once from [`AuthConfig`] at startup.
pub struct Auth {
    pub jwt: Option<jwt::JwtVerifier>,
    pub app: Option<app::AppClient>,
    pub anonymous: bool,
}

impl Auth {
    pub fn from_config(config: &AuthConfig) -> Result<Self, AuthSetupError> {
        Ok(Self {
            jwt: jwt::JwtVerifier::new(config)?,
            app: app::AppClient::new(config)?,
            anonymous: config.allows_anonymous(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AuthConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid_and_anonymous() {
        let cfg = AuthConfig::default();
        assert!(cfg.validate().is_ok());
        assert!(cfg.allows_anonymous());
        assert_eq!(cfg.leeway_secs, 5);
        assert_eq!(cfg.app_timeout_ms, 3000);
        assert_eq!(
            cfg.forward_headers,
            [
                "cookie",
                "authorization",
                "user-agent",
                "x-real-ip",
                "x-forwarded-for"
            ]
        );
        assert!(cfg.forward_query.is_empty());
        assert_eq!(parse("").unwrap(), cfg);
    }

    #[test]
    fn configuring_auth_turns_anonymous_off_unless_explicit() {
        let secret = "s".repeat(32);
        let cfg = parse(&format!("hmac_secret = \"{secret}\"")).unwrap();
        assert!(!cfg.allows_anonymous());
        let cfg = parse(&format!("hmac_secret = \"{secret}\"\nanonymous = true")).unwrap();
        assert!(cfg.allows_anonymous());
        let cfg = parse("connect_url = \"http://127.0.0.1:8000/connect\"").unwrap();
        assert!(!cfg.allows_anonymous());
        let cfg = parse("public_key_file = \"k.pem\"").unwrap();
        assert!(!cfg.allows_anonymous());
        // subscribe_url alone says nothing about connecting.
        let cfg = parse("subscribe_url = \"http://127.0.0.1:8000/sub\"").unwrap();
        assert!(cfg.allows_anonymous());
        let cfg = parse("anonymous = false").unwrap();
        assert!(!cfg.allows_anonymous());
    }

    #[test]
    fn refuses_typos_and_bad_values() {
        assert!(
            parse("hmac_secrt = \"x\"")
                .unwrap_err()
                .contains("unknown field")
        );
        let bad = [
            ("hmac_secret = \"short\"", "at least 32"),
            (
                "hmac_secret = \"ssssssssssssssssssssssssssssssssss\"\npublic_key_file = \"k.pem\"",
                "not both",
            ),
            (
                "connect_url = \"https://app/connect\"",
                "https is not supported",
            ),
            (
                "subscribe_url = \"ftp://app/sub\"",
                "must start with http://",
            ),
            ("connect_url = \"/connect\"", "must start with http://"),
            ("connect_url = \"http://u:p@app/c\"", "credentials"),
            ("connect_url = \"not a url\"", "not a URL"),
            ("app_timeout_ms = 0", "app_timeout_ms"),
            ("app_timeout_ms = 600000", "app_timeout_ms"),
            ("leeway_secs = 3600", "leeway_secs"),
            (
                "forward_headers = [\"content-length\"]",
                "cannot be forwarded",
            ),
            ("forward_headers = [\"Host\"]", "cannot be forwarded"),
            (
                "forward_headers = [\"sec-websocket-key\"]",
                "cannot be forwarded",
            ),
            (
                "forward_headers = [\"bad header\"]",
                "not a valid header name",
            ),
            ("forward_query = [\"\"]", "empty name"),
            ("audience = \" \"", "audience is empty"),
            ("public_key_file = \"\"", "public_key_file is empty"),
        ];
        for (text, expected) in bad {
            let err = parse(text).unwrap().validate().unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
        let ok = parse(
            "connect_url = \"http://127.0.0.1:8000/plaza/connect?x=1\"\n\
             forward_headers = [\"Cookie\", \"X-Custom\"]\nforward_query = [\"token\"]",
        )
        .unwrap();
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn never_shows_the_secret() {
        let cfg = AuthConfig {
            hmac_secret: Some("a-very-secret-value-that-is-long-enough".into()),
            ..AuthConfig::default()
        };
        assert!(!format!("{cfg:?}").contains("a-very-secret"));
        let shown = toml::to_string(&cfg.redacted()).unwrap();
        assert!(!shown.contains("a-very-secret"));
        assert!(shown.contains("hmac_secret"));
    }
}
