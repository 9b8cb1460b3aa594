//! Who is in a channel: its connections and the users behind them.
//!
//! A user may hold several connections to one channel; they *join* when the first one arrives and
//! *leave* when the last one goes, so join/leave events describe users, not sockets.

use std::collections::HashMap;

use crate::index::ConnId;
use crate::payload::Payload;

/// One connection present in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The authenticated user id; empty for an anonymous connection.
    pub user: String,
    /// The connection's id.
    pub client: ConnId,
    /// What the token or the app attached to this connection, if anything.
    pub info: Option<Payload>,
}

/// A change worth telling the other subscribers about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceEvent {
    Join(ClientInfo),
    Leave(ClientInfo),
}

/// The presence of one channel.
#[derive(Debug, Default)]
pub struct ChannelPresence {
    clients: HashMap<ConnId, ClientInfo>,
    /// Connections per user. Anonymous connections (empty user) are each their own presence.
    users: HashMap<String, usize>,
}

impl ChannelPresence {
    /// Records a connection. Returns the join event when it is its user's first connection here
    /// (every anonymous connection joins on its own); `None` when it was already present.
    pub fn join(&mut self, info: ClientInfo) -> Option<PresenceEvent> {
        if self.clients.contains_key(&info.client) {
            return None;
        }
        let first = if info.user.is_empty() {
            true
        } else {
            let n = self.users.entry(info.user.clone()).or_default();
            *n += 1;
            *n == 1
        };
        self.clients.insert(info.client, info.clone());
        first.then_some(PresenceEvent::Join(info))
    }

    /// Removes a connection. Returns the leave event when it was its user's last connection here.
    pub fn leave(&mut self, client: ConnId) -> Option<PresenceEvent> {
        let info = self.clients.remove(&client)?;
        if info.user.is_empty() {
            return Some(PresenceEvent::Leave(info));
        }
        let last = match self.users.get_mut(&info.user) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                self.users.remove(&info.user);
                true
            }
            None => true,
        };
        last.then_some(PresenceEvent::Leave(info))
    }

    /// Every connection present, ordered by connection id.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut all: Vec<ClientInfo> = self.clients.values().cloned().collect();
        all.sort_unstable_by_key(|c| c.client);
        all
    }

    /// `(connections, distinct users)`; each anonymous connection counts as one user.
    pub fn stats(&self) -> (usize, usize) {
        let anonymous = self.clients.values().filter(|c| c.user.is_empty()).count();
        (self.clients.len(), self.users.len() + anonymous)
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// `(connections, distinct users)` of a list of present connections (each anonymous connection
/// counts as one user), as [`ChannelPresence::stats`] counts them.
pub fn stats_of(clients: &[ClientInfo]) -> (usize, usize) {
    let mut users: Vec<&str> = clients
        .iter()
        .filter(|c| !c.user.is_empty())
        .map(|c| c.user.as_str())
        .collect();
    let anonymous = clients.len() - users.len();
    users.sort_unstable();
    users.dedup();
    (clients.len(), users.len() + anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn client(user: &str, id: ConnId) -> ClientInfo {
        ClientInfo {
            user: user.into(),
            client: id,
            info: None,
        }
    }

    #[test]
    fn a_user_joins_once_and_leaves_with_its_last_connection() {
        let mut p = ChannelPresence::default();
        assert_eq!(
            p.join(client("42", 1)),
            Some(PresenceEvent::Join(client("42", 1)))
        );
        assert_eq!(p.join(client("42", 2)), None);
        assert_eq!(p.join(client("42", 2)), None, "same connection twice");
        assert_eq!(
            p.join(client("7", 3)),
            Some(PresenceEvent::Join(client("7", 3)))
        );
        assert_eq!(p.stats(), (3, 2));
        assert_eq!(p.leave(1), None);
        assert_eq!(p.leave(2), Some(PresenceEvent::Leave(client("42", 2))));
        assert_eq!(p.leave(2), None, "already gone");
        assert_eq!(p.clients(), vec![client("7", 3)]);
        assert_eq!(p.leave(3), Some(PresenceEvent::Leave(client("7", 3))));
        assert!(p.is_empty());
    }

    #[test]
    fn anonymous_connections_are_each_present() {
        let mut p = ChannelPresence::default();
        assert!(p.join(client("", 1)).is_some());
        assert!(p.join(client("", 2)).is_some());
        assert_eq!(p.stats(), (2, 2));
        assert!(p.leave(1).is_some());
    }

    proptest! {
        /// Joins and leaves balance per user, whatever the order.
        #[test]
        fn events_balance(ops in proptest::collection::vec((any::<bool>(), 0u64..6), 0..100)) {
            let mut p = ChannelPresence::default();
            let mut present = std::collections::BTreeMap::<String, i64>::new();
            for (join, id) in ops {
                let user = format!("u{}", id % 3);
                let event = if join { p.join(client(&user, id)) } else { p.leave(id) };
                match event {
                    Some(PresenceEvent::Join(c)) => *present.entry(c.user).or_default() += 1,
                    Some(PresenceEvent::Leave(c)) => *present.entry(c.user).or_default() -= 1,
                    None => {}
                }
            }
            let (_, users) = p.stats();
            let online = present.values().filter(|n| **n == 1).count();
            prop_assert!(present.values().all(|n| *n == 0 || *n == 1));
            prop_assert_eq!(users, online);
        }
    }
}
