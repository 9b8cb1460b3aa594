//! `cursors`: clients that joined a document see each other's cursors. Documents live on this
//! node.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use axum::extract::ws::Utf8Bytes;
use plaza_core::ConnId;
use plaza_protocol::snorky::{self as proto, Cursor, Params};

use super::{Client, Reply, Snorky, bind};

#[derive(Default)]
struct Document {
    members: BTreeSet<ConnId>,
    cursors: BTreeMap<u16, Cursor>,
}

/// Every document with a member, and the public handles in use.
#[derive(Default)]
pub(super) struct Documents {
    docs: HashMap<String, Document>,
    handles: HashSet<u16>,
}

impl Documents {
    /// A random public handle not in use.
    fn new_handle(&mut self) -> Option<u16> {
        for _ in 0..64 {
            let mut random = [0u8; 2];
            getrandom::fill(&mut random).ok()?;
            let handle = u16::from_le_bytes(random);
            if self.handles.insert(handle) {
                return Some(handle);
            }
        }
        None
    }
}

impl Snorky {
    pub(super) fn cursor_call(
        &self,
        client: &mut Client,
        command: Option<&str>,
        params: Option<Params>,
    ) -> Reply {
        let id = client.conn.id;
        let service = &self.config.services.cursors;
        match command {
            Some("join") => {
                let [document] = bind(params, ["document"])?;
                if client.identity.is_none() {
                    return Err(proto::NOT_AUTHENTICATED);
                }
                let key = proto::canonical_key(&document);
                if client.docs.contains(&key) {
                    return Err(proto::ALREADY_JOINED);
                }
                let list = {
                    let mut all = self.cursors();
                    let doc = all.docs.entry(key.clone()).or_default();
                    doc.members.insert(id);
                    doc.cursors
                        .values()
                        .map(Cursor::to_json)
                        .collect::<Vec<_>>()
                };
                client.docs.insert(key);
                Ok(format!("{{\"cursors\": [{}]}}", list.join(", ")))
            }
            Some("leave") => {
                let [document] = bind(params, ["document"])?;
                let key = proto::canonical_key(&document);
                if !client.docs.contains(&key) {
                    return Err(proto::NOT_JOINED);
                }
                self.leave_document(client, &key);
                Ok("null".into())
            }
            Some("createCursor") => {
                let [private, document, position, status] =
                    bind(params, ["privateHandle", "document", "position", "status"])?;
                let key = proto::canonical_key(&document);
                if !client.docs.contains(&key) {
                    return Err(proto::NOT_JOINED);
                }
                let private = proto::canonical_key(&private);
                if client.cursors.contains_key(&private) {
                    return Err(proto::REUSED_HANDLE);
                }
                if client.cursors.len() >= proto::MAX_CURSORS {
                    return Err(proto::TOO_MANY_CURSORS);
                }
                let owner = client.identity.clone().unwrap_or_default();
                let (handle, frame, others) = {
                    let mut all = self.cursors();
                    let handle = all.new_handle().ok_or(proto::INTERNAL_ERROR)?;
                    let cursor = Cursor {
                        public_handle: handle,
                        document: document.get().to_owned(),
                        position: position.get().to_owned(),
                        status: status.get().to_owned(),
                        owner,
                    };
                    let frame = proto::cursor_changed(service, true, &cursor);
                    let Some(doc) = all.docs.get_mut(&key) else {
                        all.handles.remove(&handle);
                        return Err(proto::NOT_JOINED);
                    };
                    doc.cursors.insert(handle, cursor);
                    (handle, frame, others(doc, id))
                };
                client.cursors.insert(private, (handle, key));
                self.notify(&others, frame);
                Ok(handle.to_string())
            }
            Some("updateCursor") => {
                let [private, new_data] = bind(params, ["privateHandle", "newData"])?;
                let (handle, key) = client
                    .cursors
                    .get(&proto::canonical_key(&private))
                    .cloned()
                    .ok_or(proto::NO_SUCH_CURSOR)?;
                // Only `position` and `status` change, each kept as the client wrote it.
                let raw: HashMap<String, Box<serde_json::value::RawValue>> =
                    serde_json::from_str(new_data.get()).map_err(|_| proto::INVALID_PARAMS)?;
                let (frame, others) = {
                    let mut all = self.cursors();
                    let doc = all.docs.get_mut(&key).ok_or(proto::NO_SUCH_CURSOR)?;
                    let cursor = doc.cursors.get_mut(&handle).ok_or(proto::NO_SUCH_CURSOR)?;
                    if let Some(p) = raw.get("position") {
                        cursor.position = p.get().to_owned();
                    }
                    if let Some(s) = raw.get("status") {
                        cursor.status = s.get().to_owned();
                    }
                    let frame = proto::cursor_changed(service, false, cursor);
                    (frame, others(doc, id))
                };
                self.notify(&others, frame);
                Ok("null".into())
            }
            Some("removeCursor") => {
                let [private] = bind(params, ["privateHandle"])?;
                let (handle, key) = client
                    .cursors
                    .remove(&proto::canonical_key(&private))
                    .ok_or(proto::NO_SUCH_CURSOR)?;
                self.remove_cursor(id, handle, &key);
                Ok("null".into())
            }
            _ => Err(proto::UNKNOWN_COMMAND),
        }
    }

    /// Removes one cursor and tells the document's other members.
    fn remove_cursor(&self, id: ConnId, handle: u16, key: &str) {
        let removed = {
            let mut all = self.cursors();
            all.handles.remove(&handle);
            all.docs.get_mut(key).and_then(|doc| {
                let cursor = doc.cursors.remove(&handle)?;
                Some((cursor.document, others(doc, id)))
            })
        };
        if let Some((document, others)) = removed {
            let frame = proto::cursor_removed(&self.config.services.cursors, handle, &document);
            self.notify(&others, frame);
        }
    }

    /// Leaves a document: the client's cursors there are removed (the others are told).
    pub(super) fn leave_document(&self, client: &mut Client, key: &str) {
        let id = client.conn.id;
        let mine: Vec<(String, u16)> = client
            .cursors
            .iter()
            .filter(|(_, (_, doc))| doc == key)
            .map(|(private, (handle, _))| (private.clone(), *handle))
            .collect();
        for (private, handle) in mine {
            client.cursors.remove(&private);
            self.remove_cursor(id, handle, key);
        }
        client.docs.remove(key);
        let mut all = self.cursors();
        if let Some(doc) = all.docs.get_mut(key) {
            doc.members.remove(&id);
            if doc.members.is_empty() {
                let handles: Vec<u16> = doc.cursors.keys().copied().collect();
                all.docs.remove(key);
                for h in handles {
                    all.handles.remove(&h);
                }
            }
        }
    }

    fn notify(&self, to: &[ConnId], frame: String) {
        let frame = Utf8Bytes::from(frame);
        for id in to {
            self.push_to(*id, &frame);
        }
    }
}

/// The document's members but `me`.
fn others(doc: &Document, me: ConnId) -> Vec<ConnId> {
    doc.members.iter().copied().filter(|m| *m != me).collect()
}
