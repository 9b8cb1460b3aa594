//! Plaza's pure logic.
//!
//! Nothing in this crate opens a socket, reads a file, spawns a task or reads a clock: callers pass
//! time and data in. That keeps every rule here testable with plain values, and lets every protocol
//! adapter and every storage or broker backend share one definition of a channel, a namespace, a
//! limit or an error code.

pub mod channel;
pub mod chat;
pub mod command;
pub mod error;
pub mod filter;
pub mod index;
pub mod limits;
pub mod live;
pub mod namespace;
pub mod payload;
pub mod presence;
pub mod publication;
pub mod room;

pub use channel::{ChannelName, ChannelNameError};
pub use command::{ChatCommand, Command, ConnectInfo, InboxInfo, Outcome, Position, SubscribeInfo};
pub use error::{CloseCode, ErrorCode, ReplyError};
pub use filter::{FieldPath, Filter, FilterError};
pub use index::{ConnId, SubscriptionIndex};
pub use limits::Limits;
pub use live::{
    Dealer, DealerConfig, DealerError, DealerKind, Delta, DeltaError, LiveError, LiveIndex,
    LiveQuery, OutDelta, SubId,
};
pub use namespace::{AccessPolicy, NamespaceError, NamespaceOptions, Namespaces};
pub use payload::{Payload, PayloadError, json_string};
pub use presence::{ChannelPresence, ClientInfo, PresenceEvent, stats_of as presence_stats_of};
pub use publication::Publication;
pub use room::Room;
