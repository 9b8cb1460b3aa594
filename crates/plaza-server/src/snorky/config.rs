//! `[snorky]` in the configuration.

use serde::{Deserialize, Serialize};

/// The services' names, as the clients and the backend address them in the envelope. An empty
/// name turns that service off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceNames {
    pub pubsub: String,
    pub pubsub_backend: String,
    pub datasync: String,
    pub datasync_backend: String,
    pub messaging: String,
    pub chat: String,
    pub cursors: String,
}

impl Default for ServiceNames {
    fn default() -> Self {
        Self {
            pubsub: "pubsub".into(),
            pubsub_backend: "pubsub_backend".into(),
            datasync: "datasync".into(),
            datasync_backend: "datasync_backend".into(),
            messaging: "messaging".into(),
            chat: "chat".into(),
            cursors: "cursors".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnorkyConfig {
    /// The WebSocket path on the public listener (`/ws` serves the old demos unchanged).
    pub path: String,
    /// The backend path on the backend listener, for `X-Backend-Key` requests.
    pub backend_path: String,
    /// Seconds between the server's WebSocket pings (empty payload); 0 turns them off. Missing
    /// pongs are never acted on, as in the reference.
    pub ping_interval_secs: u64,
    /// `Origin`s accepted on the WebSocket; empty accepts any (as the reference does).
    pub allowed_origins: Vec<String>,
    /// Whether clients may `publish` on the pubsub service. `false` is the pubsub_backend demo:
    /// only the backend publishes, clients get `Not authorized`.
    pub client_publish: bool,
    /// Cookie that may carry a connection token (besides `?token=` in the URL).
    pub token_cookie: String,
    pub services: ServiceNames,
}

impl Default for SnorkyConfig {
    fn default() -> Self {
        Self {
            path: "/snorky/ws".into(),
            backend_path: "/backend".into(),
            ping_interval_secs: 90,
            allowed_origins: Vec::new(),
            client_publish: true,
            token_cookie: "plaza_token".into(),
            services: ServiceNames::default(),
        }
    }
}

impl SnorkyConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.path.starts_with('/') {
            return Err(format!("snorky.path '{}' must start with '/'", self.path));
        }
        if self.path.starts_with("/api") {
            return Err("snorky.path may not be under /api".into());
        }
        let b = &self.backend_path;
        if !b.starts_with('/') {
            return Err(format!("snorky.backend_path '{b}' must start with '/'"));
        }
        if b.starts_with("/api") || b == "/metrics" || b == "/healthz" {
            return Err(format!(
                "snorky.backend_path '{b}' is taken by the backend API (/api/..., /metrics, /healthz)"
            ));
        }
        if self.ping_interval_secs > 3600 {
            return Err("snorky.ping_interval_secs must be at most 3600".into());
        }
        if self.allowed_origins.iter().any(|o| o.trim().is_empty()) {
            return Err("snorky.allowed_origins: an origin must not be empty".into());
        }
        if self.token_cookie.is_empty()
            || !self
                .token_cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err("snorky.token_cookie must be a cookie name ([A-Za-z0-9._-])".into());
        }
        let s = &self.services;
        let frontend = [
            ("pubsub", &s.pubsub),
            ("datasync", &s.datasync),
            ("messaging", &s.messaging),
            ("chat", &s.chat),
            ("cursors", &s.cursors),
        ];
        let backend = [
            ("pubsub_backend", &s.pubsub_backend),
            ("datasync_backend", &s.datasync_backend),
        ];
        // The WebSocket and the backend each have their own registry, as in the reference.
        for registry in [&frontend[..], &backend[..]] {
            for (i, (what, name)) in registry.iter().enumerate() {
                if name.is_empty() {
                    continue;
                }
                if let Some((other, _)) = registry[..i].iter().find(|(_, n)| n == name) {
                    return Err(format!(
                        "snorky.services: {what} and {other} are both named '{name}'"
                    ));
                }
            }
        }
        if !s.pubsub_backend.is_empty() && s.pubsub.is_empty() {
            return Err("snorky.services.pubsub_backend publishes through pubsub: name it".into());
        }
        if !s.datasync_backend.is_empty() && s.datasync.is_empty() {
            return Err("snorky.services.datasync_backend feeds datasync: name it as well".into());
        }
        Ok(())
    }

    /// Whether the WebSocket accepts a connection with this `Origin` header (or none).
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        self.allowed_origins.is_empty()
            || origin.is_some_and(|o| self.allowed_origins.iter().any(|a| a == o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_checks() {
        let cfg: SnorkyConfig = toml::from_str("path = \"/ws\"\n[services]\nchat = \"\"").unwrap();
        assert_eq!(cfg.path, "/ws");
        assert_eq!(cfg.backend_path, "/backend");
        assert_eq!(cfg.ping_interval_secs, 90);
        assert!(cfg.client_publish);
        assert_eq!(cfg.services.chat, "");
        assert_eq!(cfg.services.datasync, "datasync");
        assert!(cfg.validate().is_ok());
        assert!(cfg.origin_allowed(None));
        assert!(toml::from_str::<SnorkyConfig>("pth = \"/x\"").is_err());

        let bad = |text: &str| toml::from_str::<SnorkyConfig>(text).unwrap().validate();
        assert!(bad("path = \"ws\"").is_err());
        assert!(bad("backend_path = \"/api/backend\"").is_err());
        assert!(bad("backend_path = \"/metrics\"").is_err());
        assert!(bad("ping_interval_secs = 4000").is_err());
        assert!(bad("token_cookie = \"a b\"").is_err());
        let twice = bad("[services]\nchat = \"pubsub\"").unwrap_err();
        assert!(twice.contains("both named 'pubsub'"), "{twice}");
        // Frontend and backend registries are separate: the same name in each is fine.
        assert!(bad("[services]\npubsub_backend = \"pubsub\"").is_ok());
        assert!(bad("[services]\ndatasync = \"\"").is_err());

        let cfg: SnorkyConfig =
            toml::from_str("allowed_origins = [\"http://localhost:8000\"]").unwrap();
        assert!(cfg.origin_allowed(Some("http://localhost:8000")));
        assert!(!cfg.origin_allowed(Some("http://evil")));
        assert!(!cfg.origin_allowed(None));
    }
}
