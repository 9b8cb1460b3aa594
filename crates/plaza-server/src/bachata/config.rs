//! `[bachata]` in the configuration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where a data message goes, by its `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// `dest` is a channel (a chat user).
    Direct,
    /// `dest` is a chat group: every member's channel but the sender's.
    Group,
}

/// Reliable (at least once, 200 acknowledges, the sender gets a 300) or simple (delivered once
/// written, no 300).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeConfig {
    Reliable,
    Simple,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BachataConfig {
    /// The WebSocket path.
    pub path: String,
    /// Take the channel from `?channel=` as the reference example does. The client is then
    /// trusted to say who it is: only for demos and closed networks. Otherwise the channel is
    /// the user of a connection token (`?token=`) or the one the app answers (`auth.connect_url`).
    pub allow_query_channel: bool,
    pub mode: ModeConfig,
    /// Route per message `type` (`text = "direct"`, `team = "group"`).
    pub routes: BTreeMap<String, Route>,
    /// Route of a `type` not listed in `routes`.
    pub default_route: Route,
}

impl Default for BachataConfig {
    fn default() -> Self {
        Self {
            path: "/messages".into(),
            allow_query_channel: false,
            mode: ModeConfig::Reliable,
            routes: BTreeMap::new(),
            default_route: Route::Direct,
        }
    }
}

impl BachataConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.path.starts_with('/') {
            return Err(format!("bachata.path '{}' must start with '/'", self.path));
        }
        if self.path.starts_with("/api") {
            return Err("bachata.path may not be under /api".into());
        }
        Ok(())
    }

    pub fn route(&self, kind: &str) -> Route {
        self.routes.get(kind).copied().unwrap_or(self.default_route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_routes_and_defaults() {
        let cfg: BachataConfig =
            toml::from_str("mode = \"simple\"\n[routes]\nteam = \"group\"\ntext = \"direct\"")
                .unwrap();
        assert_eq!(cfg.path, "/messages");
        assert_eq!(cfg.mode, ModeConfig::Simple);
        assert_eq!(cfg.route("team"), Route::Group);
        assert_eq!(cfg.route("other"), Route::Direct);
        assert!(cfg.validate().is_ok());
        assert!(toml::from_str::<BachataConfig>("mode = \"fast\"").is_err());
        assert!(toml::from_str::<BachataConfig>("pth = \"/x\"").is_err());
        let bad = BachataConfig {
            path: "messages".into(),
            ..BachataConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
