//! `plaza-bench`: a load generator for Plaza and the servers it is compared with.
//!
//! One process, tokio, loopback only. Every phase is bounded in count and by one global deadline.
//! Results go to stdout as one JSON line; a table and progress lines go to stderr.
//!
//! Layout:
//! - [`scenario`]: what is measured (`fanout`, `publish`, `conns`, `chat`) and against which
//!   server (`--peer`: Plaza, NATS WS, Socket.IO, Snorky, High-templar),
//! - [`peer`]: how subscribers talk to each server,
//! - [`publisher`]: how publications are sent (an HTTP backend API, a peer's WebSocket protocol,
//!   RabbitMQ),
//! - [`ws`]: a lean WebSocket client for the subscribers' and publishers' hot path,
//! - [`reply`]: publish replies read without a JSON tree,
//! - [`payload`], [`stats`], [`procfs`], [`http`], [`clock`], [`progress`]: the pieces.

pub mod cli;
pub mod clock;
pub mod http;
pub mod payload;
pub mod peer;
pub mod procfs;
pub mod progress;
pub mod publisher;
pub mod reply;
pub mod scenario;
pub mod stats;
pub mod ws;
