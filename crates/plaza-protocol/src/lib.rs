//! Plaza's wire protocols. Each module turns a connection's frames into core
//! [`Command`](plaza_core::Command)s and core outcomes and events into frames, with no socket in
//! sight, so every adapter is tested with plain strings and byte vectors.

pub mod bachata;
pub mod hightemplar;
pub mod native;
pub mod rsocket;
pub mod snorky;
