//! Command line.

use crate::scenario::chat::ChatArgs;
use crate::scenario::conns::ConnsArgs;
use crate::scenario::dm::DmArgs;
use crate::scenario::fanout::FanoutArgs;
use crate::scenario::publish::PublishArgs;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "plaza-bench",
    version,
    about = "Load generator for Plaza: one JSON line of results on stdout, a table on stderr",
    after_help = "Exit status: 0 for a clean run, 2 when the run finished with problems (listed in \
                  the JSON's `problems`: loss, refusals, errors, dropped connections, deadline), 1 when it \
                  could not run."
)]
pub struct Cli {
    /// Tokio worker threads of the load generator (it shares the cores with the server).
    #[arg(long, global = true, default_value_t = 2)]
    pub threads: usize,
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// S subscribers on one channel, P publications through the server's publishing path
    /// (`--peer`: Plaza, NATS, Socket.IO, Snorky, High-templar): deliveries/s,
    /// latency percentiles, loss, server CPU per delivery.
    Fanout(FanoutArgs),
    /// P publishers keeping W publish requests in flight each, N publications: acknowledged
    /// publishes/s, ack latency, offsets checked, server CPU per ack.
    Publish(PublishArgs),
    /// C idle connections, each subscribed to its own channel: connect rate, server RSS and CPU
    /// per connection.
    Conns(ConnsArgs),
    /// R rooms of K members, each member sending at a fixed rate to its room: deliveries/s,
    /// latency, loss, server CPU.
    Chat(ChatArgs),
    /// P sender/receiver pairs of direct messages through Plaza's chat (native only): accepted
    /// DMs/s with W sends in flight, then latency at a fixed rate, every message acknowledged.
    Dm(DmArgs),
}
