//! Counters and gauges, rendered as Prometheus text on `GET /metrics`.
//!
//! Plain atomics rather than a metrics registry: the hot path (one increment per delivery) costs
//! one relaxed `fetch_add`, with no lookup by name and no histogram upkeep.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use plaza_core::{CloseCode, ErrorCode};

#[derive(Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub subscriptions: AtomicU64,
    pub publications_total: AtomicU64,
    pub deliveries_total: AtomicU64,
    pub frames_received_total: AtomicU64,
    pub bytes_received_total: AtomicU64,
    pub bytes_sent_total: AtomicU64,
    pub slow_consumers_total: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
    disconnects: [AtomicU64; CloseCode::ALL.len()],
    api_requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

impl Metrics {
    pub fn error(&self, code: ErrorCode) {
        self.errors[code.index()].fetch_add(1, Relaxed);
    }

    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.errors[code.index()].load(Relaxed)
    }

    pub fn disconnect(&self, code: CloseCode) {
        if let Some(i) = CloseCode::ALL.iter().position(|c| *c == code) {
            self.disconnects[i].fetch_add(1, Relaxed);
        }
    }

    /// Counts one backend API request. `endpoint` is a route pattern, never raw client input, so
    /// the label set stays bounded.
    pub fn api_request(&self, endpoint: &'static str, status: u16) {
        let mut map = self
            .api_requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry((endpoint, status)).or_default() += 1;
    }

    /// Prometheus text exposition format. `channels` is read from the index and `store` from the
    /// store by the caller.
    pub fn render(&self, node: &str, channels: usize, store: plaza_store::StoreStats) -> String {
        let mut out = String::with_capacity(4096);
        // The node's id, so scrapes of several nodes can be told apart.
        let _ = writeln!(out, "# HELP plaza_node_info This node's id.");
        let _ = writeln!(out, "# TYPE plaza_node_info gauge");
        let _ = writeln!(out, "plaza_node_info{{node=\"{node}\"}} 1");
        let mut one = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP plaza_{name} {help}");
            let _ = writeln!(out, "# TYPE plaza_{name} {kind}");
            let _ = writeln!(out, "plaza_{name} {value}");
        };
        one(
            "connections",
            "gauge",
            "Open WebSocket connections.",
            self.connections.load(Relaxed),
        );
        one(
            "connections_total",
            "counter",
            "WebSocket connections accepted.",
            self.connections_total.load(Relaxed),
        );
        one(
            "subscriptions",
            "gauge",
            "Subscriptions held by open connections.",
            self.subscriptions.load(Relaxed),
        );
        one(
            "channels",
            "gauge",
            "Channels with at least one local subscriber.",
            channels as u64,
        );
        one(
            "publications_total",
            "counter",
            "Publications accepted.",
            self.publications_total.load(Relaxed),
        );
        one(
            "deliveries_total",
            "counter",
            "Publication frames queued to subscribers.",
            self.deliveries_total.load(Relaxed),
        );
        one(
            "frames_received_total",
            "counter",
            "WebSocket messages received.",
            self.frames_received_total.load(Relaxed),
        );
        one(
            "bytes_received_total",
            "counter",
            "Bytes of WebSocket messages received.",
            self.bytes_received_total.load(Relaxed),
        );
        one(
            "bytes_sent_total",
            "counter",
            "Bytes of WebSocket messages written.",
            self.bytes_sent_total.load(Relaxed),
        );
        one(
            "slow_consumers_total",
            "counter",
            "Connections closed because their outgoing queue overflowed.",
            self.slow_consumers_total.load(Relaxed),
        );
        one(
            "store_appends_total",
            "counter",
            "Publications durably appended to history.",
            store.appends,
        );
        one(
            "store_commits_total",
            "counter",
            "Durable store commits (group commit: many appends per commit under load).",
            store.commits,
        );
        out.push_str(
            "# HELP plaza_disconnects_total Connections closed by the server, by close code.\n",
        );
        out.push_str("# TYPE plaza_disconnects_total counter\n");
        for (i, code) in CloseCode::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "plaza_disconnects_total{{code=\"{}\",reason=\"{}\"}} {}",
                code.code(),
                code.reason(),
                self.disconnects[i].load(Relaxed)
            );
        }
        out.push_str("# HELP plaza_errors_total Errors answered or refused requests, by kind.\n");
        out.push_str("# TYPE plaza_errors_total counter\n");
        for code in ErrorCode::ALL {
            let _ = writeln!(
                out,
                "plaza_errors_total{{kind=\"{}\"}} {}",
                code.name(),
                self.errors(code)
            );
        }
        out.push_str(
            "# HELP plaza_api_requests_total Backend API requests, by endpoint and status.\n",
        );
        out.push_str("# TYPE plaza_api_requests_total counter\n");
        let map = self
            .api_requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((endpoint, status), n) in map.iter() {
            let _ = writeln!(
                out,
                "plaza_api_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        out
    }
}
