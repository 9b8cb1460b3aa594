//! `messaging`: participants register names and send to each other by name.

use axum::extract::ws::Utf8Bytes;
use dashmap::mapref::entry::Entry;
use plaza_protocol::snorky::{self as proto, Params};

use super::{Client, Reply, Snorky, bind};

impl Snorky {
    pub(super) fn messaging(
        &self,
        client: &mut Client,
        command: Option<&str>,
        params: Option<Params>,
    ) -> Reply {
        let id = client.conn.id;
        match command {
            Some("registerParticipant") => {
                let [name] = bind(params, ["name"])?;
                let name = proto::as_string(&name)
                    .filter(|n| !n.is_empty())
                    .ok_or(proto::NAME_NOT_ALLOWED)?;
                match self.participants.entry(name.clone()) {
                    Entry::Occupied(_) => return Err(proto::NAME_ALREADY_REGISTERED),
                    Entry::Vacant(slot) => {
                        slot.insert(id);
                    }
                }
                client.names.insert(name);
                Ok("null".into())
            }
            Some("unregisterParticipant") => {
                let [name] = bind(params, ["name"])?;
                let name = proto::as_string(&name).ok_or(proto::UNKNOWN_PARTICIPANT)?;
                if !client.names.contains(&name) {
                    return Err(if self.participants.contains_key(&name) {
                        proto::INVALID_PARTICIPANT
                    } else {
                        proto::UNKNOWN_PARTICIPANT
                    });
                }
                client.names.remove(&name);
                self.participants.remove_if(&name, |_, owner| *owner == id);
                Ok("null".into())
            }
            Some("listParticipants") => {
                let [] = bind(params, [])?;
                let mut names: Vec<String> =
                    self.participants.iter().map(|e| e.key().clone()).collect();
                names.sort_unstable();
                Ok(proto::string_list(names.iter().map(String::as_str)))
            }
            Some("send") => {
                let [sender, dest, body] = bind(params, ["sender", "dest", "body"])?;
                let sender = proto::as_string(&sender)
                    .filter(|s| client.names.contains(s))
                    .ok_or(proto::INVALID_SENDER)?;
                let dest = proto::as_string(&dest).ok_or(proto::UNKNOWN_DESTINATION)?;
                let to = self
                    .participants
                    .get(&dest)
                    .map(|e| *e.value())
                    .ok_or(proto::UNKNOWN_DESTINATION)?;
                let frame = proto::messaging_message(
                    &self.config.services.messaging,
                    &sender,
                    &dest,
                    body.get(),
                );
                self.push_to(to, &Utf8Bytes::from(frame));
                Ok("null".into())
            }
            _ => Err(proto::UNKNOWN_COMMAND),
        }
    }
}
