//! Publishers: they send the numbered, time-stamped publications of a scenario, paced or windowed.
//!
//! - [`http_api`]: an HTTP backend API on one pipelined keep-alive connection (Plaza's
//!   `POST /api/publish`, Snorky's `POST /backend`),
//! - [`ws_pub`]: a peer's client protocol on one WebSocket (NATS `PUB`, Socket.IO emits),
//! - [`amqp`]: RabbitMQ publisher confirms (High-templar's trigger path).

pub mod amqp;
pub mod http_api;
pub mod ws_pub;

use serde::Serialize;
use std::collections::BTreeMap;

/// How publications are spaced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// As fast as the server acknowledges, with at most this many unacknowledged.
    Window(usize),
    /// `per_sec` publications per second on a fixed schedule, with at most `max_in_flight`
    /// unacknowledged (the schedule slips when the server is slower).
    Rate { per_sec: f64, max_in_flight: usize },
}

impl Pace {
    pub fn max_in_flight(&self) -> usize {
        match *self {
            Pace::Window(n) => n.max(1),
            Pace::Rate { max_in_flight, .. } => max_in_flight.max(1),
        }
    }
}

/// What a publisher did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PublishReport {
    /// Publications written to the server.
    pub sent: u64,
    /// Publications the server accepted (HTTP 2xx, a NATS `+OK`, a Socket.IO ack, a broker
    /// confirm).
    pub ok: u64,
    /// Publications the server refused.
    pub refused: u64,
    /// Responses by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// The first refusal's body, for the report.
    pub first_refusal: Option<String>,
    /// Why publishing stopped early, if it did (connection lost, deadline).
    pub aborted: Option<String>,
    /// Clock readings ([`crate::clock::now_ns`]).
    pub first_send_ns: u64,
    pub last_send_ns: u64,
    pub last_ack_ns: u64,
}
