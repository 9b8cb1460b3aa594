//! One timer for every connection: keep-alive pings and the connect timeout.
//!
//! A task per connection with its own interval would cost a timer entry and a wake-up per
//! connection per period. Instead one task ticks every second and visits one slice of the
//! connections per tick (connection id modulo the ping interval), so pings are spread evenly
//! over the interval and each connection is pinged once per interval. The same visits free the
//! queue buffer a connection kept after a burst of frames, once it has gone quiet.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plaza_core::CloseCode;

use crate::node::Node;

const TICK: Duration = Duration::from_secs(1);
/// Ticks between two visits of a connection to free its idle queue buffer.
const RELEASE_EVERY: u64 = 10;

pub async fn run(node: Arc<Node>) {
    let ping_every = node.settings.ping_interval.as_secs();
    let connect_timeout = node.settings.connect_timeout;
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick: u64 = 0;
    loop {
        ticker.tick().await;
        tick = tick.wrapping_add(1);
        let now = Instant::now();
        node.hub.for_each_connection(|conn| {
            if conn.is_closing() {
                return;
            }
            if !connect_timeout.is_zero()
                && !conn.is_connected()
                && now.duration_since(conn.created) >= connect_timeout
            {
                conn.close(CloseCode::ConnectTimeout);
                return;
            }
            // Each connection once per RELEASE_EVERY ticks: a queue buffer kept after a burst
            // is freed once the connection has gone quiet.
            if conn.id % RELEASE_EVERY == tick % RELEASE_EVERY {
                conn.release_idle_buffer();
            }
            if ping_every > 0 && conn.id % ping_every == tick % ping_every && !conn.keepalive_tick()
            {
                conn.close(CloseCode::NoPong);
            }
        });
    }
}
