//! Configuration: defaults, then an optional TOML file, then `PLAZA_*` environment variables,
//! then command-line flags. Each layer overrides the one before.
//!
//! The environment and flags are read by clap (each flag declares its `env` name), so one struct
//! carries both and a flag always wins over its variable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use plaza_core::{AccessPolicy, Limits, NamespaceOptions, Namespaces};
use serde::{Deserialize, Serialize};

use crate::auth::AuthConfig;
use crate::bachata::BachataConfig;
use crate::chat::ChatConfig;
use crate::engine::{BrokerKind, NatsConfig, RedisConfig};
use crate::hightemplar::HighTemplarConfig;
use crate::live::LiveConfig;
use crate::node::Settings;
use crate::rsocket::RsocketConfig;
use crate::snorky::SnorkyConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Public listener: the WebSocket endpoints.
    pub listen: SocketAddr,
    /// Backend listener: the HTTP API for the app, `/metrics`, `/healthz`.
    pub backend_listen: SocketAddr,
    /// Where Plaza keeps its files (the generated backend key, the embedded store).
    pub data_dir: PathBuf,
    /// `local` (one node, the embedded store), `redis` or `nats` (many nodes sharing one Redis
    /// or one NATS with JetStream).
    pub broker: BrokerKind,
    /// Redis, for `broker = "redis"`.
    pub redis: RedisConfig,
    /// NATS, for `broker = "nats"`.
    pub nats: NatsConfig,
    /// The backend API key. Generated into `data_dir/backend.key` when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_key: Option<String>,
    /// Path of the native protocol's WebSocket endpoint.
    pub native_path: String,
    /// Seconds between server pings; 0 turns keep-alive off.
    pub ping_interval_secs: u64,
    /// Seconds a new connection has to send `connect`; 0 turns the timeout off.
    pub connect_timeout_secs: u64,
    /// Seconds graceful shutdown waits for connections to close.
    pub shutdown_timeout_secs: u64,
    /// Seconds a publish's `idempotency_key` is remembered.
    pub idempotency_window_secs: u64,
    /// Most bytes read per read call. The native endpoint reads through one scratch buffer per
    /// thread (capped at 64 KiB), so nothing is held per idle connection; the legacy endpoints
    /// (axum/tungstenite) use it as their per-connection read buffer.
    pub ws_read_buffer_size: usize,
    /// Largest text message the native writer joins queued frames into (one JSON object per
    /// line); the legacy endpoints use it as their write buffer.
    pub ws_write_buffer_size: usize,
    /// Kernel send buffer (SO_SNDBUF) of each public connection, in bytes. Unset: the kernel's
    /// autotuning. Setting it bounds kernel memory per connection and makes a stalled client hit
    /// its queue limit sooner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_send_buffer_size: Option<usize>,
    pub limits: Limits,
    /// Who connections are: tokens the app signs, or asking the app.
    pub auth: AuthConfig,
    /// Live views of the app's models: dealers and tokens.
    pub live: LiveConfig,
    /// Chat: inboxes, groups, receipts.
    pub chat: ChatConfig,
    /// Options of channels without a namespace.
    pub default_namespace: NamespaceOptions,
    /// Options per namespace: `[namespaces.chat]` for `chat:...` channels.
    pub namespaces: BTreeMap<String, NamespaceOptions>,
    /// High-templar compatibility (`[hightemplar]`); off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hightemplar: Option<HighTemplarConfig>,
    /// Bachata compatibility (`[bachata]`); off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bachata: Option<BachataConfig>,
    /// RSocket chat compatibility (`[rsocket]`); off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rsocket: Option<RsocketConfig>,
    /// Snorky compatibility (`[snorky]`); off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snorky: Option<SnorkyConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            backend_listen: SocketAddr::from(([127, 0, 0, 1], 7701)),
            data_dir: PathBuf::from("plaza-data"),
            broker: BrokerKind::Local,
            redis: RedisConfig::default(),
            nats: NatsConfig::default(),
            backend_key: None,
            native_path: "/plaza/ws".into(),
            ping_interval_secs: 25,
            connect_timeout_secs: 10,
            shutdown_timeout_secs: 5,
            idempotency_window_secs: 300,
            ws_read_buffer_size: 4096,
            ws_write_buffer_size: 32 * 1024,
            tcp_send_buffer_size: None,
            limits: Limits::default(),
            auth: AuthConfig::default(),
            live: LiveConfig::default(),
            chat: ChatConfig::default(),
            default_namespace: NamespaceOptions::default(),
            namespaces: BTreeMap::new(),
            hightemplar: None,
            bachata: None,
            rsocket: None,
            snorky: None,
        }
    }
}

/// Flags (and their environment variables) that override the file.
#[derive(Debug, Clone, Default, Args)]
pub struct Overrides {
    /// TOML configuration file.
    #[arg(long, env = "PLAZA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Public listener address (WebSocket endpoints). Port 0 picks a free port.
    #[arg(long, env = "PLAZA_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Backend listener address (HTTP API, metrics). Port 0 picks a free port.
    #[arg(long, env = "PLAZA_BACKEND_LISTEN", value_name = "ADDR")]
    pub backend_listen: Option<SocketAddr>,
    /// Data directory.
    #[arg(long, env = "PLAZA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Broker: local (one node), redis or nats (many nodes).
    #[arg(long, env = "PLAZA_BROKER", value_name = "KIND")]
    pub broker: Option<BrokerKind>,
    /// Redis URL, for the redis broker.
    #[arg(
        long,
        env = "PLAZA_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// NATS URL, for the nats broker.
    #[arg(
        long,
        env = "PLAZA_NATS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub nats_url: Option<String>,
    /// Backend API key.
    #[arg(
        long,
        env = "PLAZA_BACKEND_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub backend_key: Option<String>,
    /// Path of the native WebSocket endpoint.
    #[arg(long, env = "PLAZA_NATIVE_PATH", value_name = "PATH")]
    pub native_path: Option<String>,
    /// Seconds between keep-alive pings (0 = off).
    #[arg(long, env = "PLAZA_PING_INTERVAL", value_name = "SECS")]
    pub ping_interval: Option<u64>,
    /// Seconds a connection has to send `connect` (0 = no limit).
    #[arg(long, env = "PLAZA_CONNECT_TIMEOUT", value_name = "SECS")]
    pub connect_timeout: Option<u64>,
    /// Bytes a connection may have queued before it is closed as a slow consumer.
    #[arg(long, env = "PLAZA_MAX_QUEUE_BYTES", value_name = "BYTES")]
    pub max_queue_bytes: Option<usize>,
    /// Largest message a client may send, in bytes.
    #[arg(long, env = "PLAZA_MAX_FRAME_SIZE", value_name = "BYTES")]
    pub max_frame_size: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Defaults, then `file` (if any), then `overrides`; validated.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match file.or(overrides.config.as_deref()) {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.listen {
            self.listen = v;
        }
        if let Some(v) = o.backend_listen {
            self.backend_listen = v;
        }
        if let Some(v) = &o.data_dir {
            self.data_dir = v.clone();
        }
        if let Some(v) = &o.backend_key {
            self.backend_key = Some(v.clone());
        }
        if let Some(v) = o.broker {
            self.broker = v;
        }
        if let Some(v) = &o.redis_url {
            self.redis.url = v.clone();
        }
        if let Some(v) = &o.nats_url {
            self.nats.url = v.clone();
        }
        if let Some(v) = &o.native_path {
            self.native_path = v.clone();
        }
        if let Some(v) = o.ping_interval {
            self.ping_interval_secs = v;
        }
        if let Some(v) = o.connect_timeout {
            self.connect_timeout_secs = v;
        }
        if let Some(v) = o.max_queue_bytes {
            self.limits.max_queue_bytes = v;
        }
        if let Some(v) = o.max_frame_size {
            self.limits.max_frame_size = v;
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        self.limits.validate().map_err(ConfigError::Invalid)?;
        crate::engine::validate(self.broker, &self.redis, &self.nats)
            .map_err(ConfigError::Invalid)?;
        self.namespaces()
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !self.native_path.starts_with('/') {
            return invalid(format!(
                "native_path '{}' must start with '/'",
                self.native_path
            ));
        }
        if self.native_path.starts_with("/api") {
            return invalid("native_path may not be under /api".into());
        }
        if self
            .backend_key
            .as_deref()
            .is_some_and(|k| k.trim().is_empty())
        {
            return invalid("backend_key is empty; leave it unset to generate one".into());
        }
        if self.listen.port() != 0 && self.listen == self.backend_listen {
            return invalid(format!(
                "listen and backend_listen are both {}; use two addresses",
                self.listen
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.ws_read_buffer_size) {
            return invalid("ws_read_buffer_size must be between 1024 and 16777216".into());
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.ws_write_buffer_size) {
            return invalid("ws_write_buffer_size must be between 1024 and 16777216".into());
        }
        if self
            .tcp_send_buffer_size
            .is_some_and(|n| !(2048..=64 * 1024 * 1024).contains(&n))
        {
            return invalid("tcp_send_buffer_size must be between 2048 and 67108864".into());
        }
        self.auth
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("auth: {e}")))?;
        self.live
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("live: {e}")))?;
        self.chat.validate().map_err(ConfigError::Invalid)?;
        let namespaces = std::iter::once(("default_namespace".to_owned(), &self.default_namespace))
            .chain(
                self.namespaces
                    .iter()
                    .map(|(n, o)| (format!("namespaces.{n}"), o)),
            );
        for (name, options) in namespaces {
            for (what, policy) in [
                ("subscribe", options.subscribe),
                ("publish", options.publish),
            ] {
                if policy == AccessPolicy::Token && !self.auth.has_jwt_key() {
                    return invalid(format!(
                        "{name}.{what} = \"token\" needs auth.hmac_secret or auth.public_key_file"
                    ));
                }
                if policy == AccessPolicy::App && self.auth.subscribe_url.is_none() {
                    return invalid(format!("{name}.{what} = \"app\" needs auth.subscribe_url"));
                }
            }
            if options.join_leave && !options.presence {
                return invalid(format!("{name}.join_leave needs {name}.presence = true"));
            }
        }
        // [hightemplar]
        if let Some(ht) = &self.hightemplar {
            ht.validate().map_err(ConfigError::Invalid)?;
            if ht.paths.contains(&self.native_path) {
                return invalid(format!(
                    "native_path '{}' is also in hightemplar.paths",
                    self.native_path
                ));
            }
        }
        // [rsocket]
        if let Some(r) = &self.rsocket {
            r.validate().map_err(ConfigError::Invalid)?;
        }
        // [bachata]
        if let Some(b) = &self.bachata {
            b.validate().map_err(ConfigError::Invalid)?;
            let taken = std::iter::once(&self.native_path)
                .chain(self.hightemplar.iter().flat_map(|h| h.paths.iter()));
            if let Some(path) = taken.into_iter().find(|p| **p == b.path) {
                return invalid(format!(
                    "bachata.path '{path}' is already used by another endpoint"
                ));
            }
            if !self.chat.enabled {
                return invalid("[bachata] needs chat.enabled = true".into());
            }
        }
        // [snorky]
        if let Some(s) = &self.snorky {
            s.validate().map_err(ConfigError::Invalid)?;
        }
        // Each public WebSocket path is one endpoint's (the router refuses a second at startup).
        let mut paths: Vec<(&str, &str)> = vec![("native_path", self.native_path.as_str())];
        if let Some(ht) = &self.hightemplar {
            paths.extend(ht.paths.iter().map(|p| ("hightemplar.paths", p.as_str())));
        }
        if let Some(b) = &self.bachata {
            paths.push(("bachata.path", b.path.as_str()));
        }
        if let Some(p) = self.rsocket.as_ref().and_then(|r| r.ws_path.as_deref()) {
            paths.push(("rsocket.ws_path", p));
        }
        if let Some(s) = &self.snorky {
            paths.push(("snorky.path", s.path.as_str()));
        }
        for (i, (name, path)) in paths.iter().enumerate() {
            if let Some((other, _)) = paths[..i].iter().find(|(_, p)| p == path) {
                return invalid(format!(
                    "{name} '{path}' is already used by {other}: give each endpoint its own path"
                ));
            }
        }
        if self.ping_interval_secs > 3600 || self.connect_timeout_secs > 3600 {
            return invalid(
                "ping_interval_secs and connect_timeout_secs must be at most 3600".into(),
            );
        }
        Ok(())
    }

    pub fn namespaces(&self) -> Namespaces {
        Namespaces {
            default: self.default_namespace.clone(),
            named: self.namespaces.clone(),
        }
    }

    pub fn settings(&self) -> Settings {
        Settings {
            limits: self.limits.clone(),
            namespaces: self.namespaces(),
            ping_interval: Duration::from_secs(self.ping_interval_secs),
            connect_timeout: Duration::from_secs(self.connect_timeout_secs),
            ws_read_buffer_size: self.ws_read_buffer_size,
            ws_write_buffer_size: self.ws_write_buffer_size,
            idempotency_window: Duration::from_secs(self.idempotency_window_secs),
        }
    }

    /// The effective configuration as TOML, with the backend key masked.
    pub fn to_toml_redacted(&self) -> String {
        let mut shown = self.clone();
        if shown.backend_key.is_some() {
            shown.backend_key = Some("<set, not shown>".into());
        }
        shown.auth = shown.auth.redacted();
        shown.hightemplar = shown.hightemplar.map(|h| h.redacted());
        shown.redis.url = crate::engine::redacted(&shown.redis.url);
        shown.nats.url = crate::engine::redacted(&shown.nats.url);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_overrides() {
        let cfg = Config::from_toml(
            r#"
listen = "0.0.0.0:9000"
[limits]
max_queue_bytes = 2048
[namespaces.chat]
client_publish = true
"#,
        )
        .unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(cfg.limits.max_queue_bytes, 2048);
        assert_eq!(cfg.limits.max_frame_size, 65536);
        assert!(cfg.namespaces["chat"].client_publish);

        let mut cfg = cfg;
        cfg.apply(&Overrides {
            listen: Some("127.0.0.1:1".parse().unwrap()),
            ..Default::default()
        });
        assert_eq!(cfg.listen, "127.0.0.1:1".parse().unwrap());
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn typos_and_bad_values_are_refused() {
        assert!(
            Config::from_toml("lisen = \"1.2.3.4:5\"")
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(
            Config::from_toml("[namespaces.chat]\nclient_publsh = true")
                .unwrap_err()
                .contains("unknown field")
        );
        let cfg = Config::from_toml("[limits]\nmax_frame_size = 0").unwrap();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("max_frame_size")
        );
        let cfg = Config::from_toml("native_path = \"ws\"").unwrap();
        assert!(cfg.validate().is_err());
        let cfg = Config::from_toml("[namespaces.\"a b\"]").unwrap();
        assert!(cfg.validate().is_err());
        let cfg = Config::from_toml(
            "[namespaces.rsocket]\nclient_join = true\n[rsocket]\nws_path = \"/plaza/ws\"",
        )
        .unwrap();
        let error = cfg.validate().unwrap_err().to_string();
        assert!(error.contains("already used by native_path"), "{error}");
        let cfg = Config::from_toml("[snorky]\npath = \"/plaza/ws\"").unwrap();
        let error = cfg.validate().unwrap_err().to_string();
        assert!(
            error.contains("snorky.path '/plaza/ws' is already used"),
            "{error}"
        );
        let cfg = Config::from_toml("[snorky]\npath = \"/ws\"").unwrap();
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn redacts_the_key() {
        let cfg = Config {
            backend_key: Some("secret".into()),
            ..Config::default()
        };
        let text = cfg.to_toml_redacted();
        assert!(!text.contains("secret"));
        assert!(text.contains("backend_key"));
    }
}
