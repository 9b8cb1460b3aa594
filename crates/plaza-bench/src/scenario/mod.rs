//! Scenarios. Each one has its clap arguments and a `run` that returns a serialisable report with
//! a human-readable table.
//!
//! - [`fanout`]: S subscribers on one channel, P publications from the backend; deliveries/s,
//!   latency, loss, server CPU per delivery.
//! - [`publish`]: P publishers pipelining W publish requests each (native WebSocket or backend
//!   API); acknowledged publishes/s, ack latency, offsets checked, server CPU per ack.
//!
//! - [`conns`]: C idle connections, a channel each; connect rate, server RSS and CPU per
//!   connection.
//!
//! - [`chat`]: R rooms of K members each sending at a fixed rate; deliveries/s, latency, loss.
//!
//! - [`dm`]: direct messages through Plaza's chat: accepted (durable) DMs/s, end-to-end latency
//!   at a fixed rate with every message acknowledged.
//!
//! [`target`] says which server (Plaza or a peer) a scenario talks to.

pub mod chat;
pub mod conns;
pub mod dm;
pub mod fanout;
pub mod publish;
pub mod target;

use serde::Serialize;

/// Server process figures around a scenario's phases.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerReport {
    pub pid: u32,
    /// CPU seconds the server spent while the subscribers connected and subscribed.
    pub cpu_secs_connect: f64,
    /// CPU seconds the server spent from the first publication to the last delivery.
    pub cpu_secs_publish: f64,
    /// `cpu_secs_publish` per unique delivery, in microseconds.
    pub cpu_us_per_delivery: f64,
    /// Average cores busy from the first publication to the last delivery.
    pub cores_publish: f64,
    pub rss_kib_start: u64,
    pub rss_kib_subscribed: u64,
    pub rss_kib_end: u64,
    pub hwm_kib: u64,
    /// (RSS after subscribing - RSS before connecting) / connections, in bytes.
    pub rss_bytes_per_connection: f64,
    pub threads: u64,
}

/// The load generator's own cost (it shares the cores with the server).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchReport {
    pub threads: usize,
    pub reader_tasks: usize,
    pub cpu_secs_total: f64,
    pub cpu_secs_publish: f64,
    pub cpu_us_per_delivery: f64,
    pub cores_publish: f64,
    pub rss_kib_end: u64,
}

/// The whole machine while publishing: when `other_cores` is well above zero, something else
/// (a build, another benchmark) competed for the CPUs and the figures are not comparable.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MachineReport {
    pub cpus: u64,
    /// Average cores busy (all processes) from the first publication to the last delivery.
    pub busy_cores_publish: f64,
    /// `busy_cores_publish` minus the server's and the load generator's.
    pub other_cores_publish: f64,
}
