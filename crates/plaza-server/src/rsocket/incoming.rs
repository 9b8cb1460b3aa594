//! `messages.incoming`: the user's chat inbox as a request-stream, pushed by the hub.
//!
//! The stream subscribes the inbox like any hub stream, parked, with its own [`ConnHandle`]
//! (bytes-bounded, never registered as a connection) whose [`EntryEncoder`] turns each entry
//! into the tutorial's message JSON tagged with its seq. It reads the unacknowledged backlog,
//! lets live entries after it into the queue, sends the backlog, then what the queue brings, each
//! element within the stream's REQUEST_N credit, and acknowledges what it sent. If the queue
//! overflows (a client that grants no credit while messages keep coming), the stream attaches
//! again from the inbox: nothing is lost, since only what was sent is acknowledged.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use plaza_core::{ChannelName, Payload as ChatPayload};

use super::session::{Gate, Session};
use crate::conn::{ConnHandle, Outgoing, Queue};
use crate::hub::{EntryEncoder, Subscriber};
use crate::node::Node;

/// Turns inbox entries into `<seq>\n<message JSON>` (empty JSON: nothing to send, only to
/// acknowledge). The queue is private to one stream, so the framing is ours.
struct Frames {
    /// `<channel_namespace>:`, taken off group names.
    prefix: String,
}

impl EntryEncoder for Frames {
    fn encode(&self, offset: Option<u64>, data: &ChatPayload) -> Option<Utf8Bytes> {
        let seq = offset?;
        let json = message_json(&self.prefix, data.as_bytes());
        let json = json.as_deref().unwrap_or_default();
        let text = String::from_utf8_lossy(json);
        Some(Utf8Bytes::from(format!("{seq}\n{text}")))
    }
}

/// An inbox entry as the tutorial's `{"user", "content", "channel"}`; `None` for receipts and
/// other events.
pub(super) fn message_json(prefix: &str, entry: &[u8]) -> Option<Bytes> {
    let v: serde_json::Value = serde_json::from_slice(entry).ok()?;
    if v.get("push")?.as_str()? != "message" {
        return None;
    }
    let from = v.get("from")?.as_str()?;
    let content = match v.get("data") {
        Some(serde_json::Value::String(s)) => serde_json::Value::String(s.clone()),
        Some(other) => serde_json::Value::String(other.to_string()),
        None => serde_json::Value::Null,
    };
    let channel = v
        .get("group")
        .and_then(|g| g.as_str())
        .map(|g| g.strip_prefix(prefix).unwrap_or(g).to_owned());
    let m = serde_json::json!({"user": from, "content": content, "channel": channel});
    Some(Bytes::from(m.to_string()))
}

/// One queued item: its seq and its message, if any.
fn split(text: &str) -> Option<(u64, Option<Bytes>)> {
    let (seq, json) = text.split_once('\n')?;
    let seq = seq.parse().ok()?;
    let json = (!json.is_empty()).then(|| Bytes::copy_from_slice(json.as_bytes()));
    Some((seq, json))
}

/// The inbox subscription of one stream; unsubscribed when dropped (also when the stream's
/// task is aborted by CANCEL).
struct Attached {
    node: Arc<Node>,
    inbox: ChannelName,
    conn: Arc<ConnHandle>,
    subscriber: Arc<Subscriber>,
    queue: Queue,
    detached: bool,
}

impl Attached {
    async fn new(node: &Arc<Node>, user: &str, prefix: &str) -> Result<Self, String> {
        let inbox = plaza_core::chat::inbox(user);
        let (handle, queue) = ConnHandle::new(
            node.next_conn_id(),
            node.settings.limits.max_queue_bytes,
            Instant::now(),
            &node.hub.backlog,
        );
        let conn = Arc::new(handle);
        let frames = Arc::new(Frames {
            prefix: prefix.to_owned(),
        });
        let subscriber = Subscriber::parked_with_encoder(Arc::clone(&conn), frames);
        let key = Arc::clone(inbox.as_arc());
        node.hub.subscribe(&key, Arc::clone(&subscriber));
        let attached = Self {
            node: Arc::clone(node),
            inbox,
            conn,
            subscriber,
            queue,
            detached: false,
        };
        if node.hub.subscriber_count(&key) == 1 {
            node.broker
                .subscribe(key)
                .await
                .map_err(|e| format!("inbox not subscribed: {e}"))?;
        }
        Ok(attached)
    }
}

impl Attached {
    /// Unsubscribes, waiting for the broker, so a following attach cannot be overtaken by this
    /// unsubscribe.
    async fn detach(mut self) {
        self.detached = true;
        let hub = &self.node.hub;
        hub.unsubscribe(self.inbox.as_str(), self.conn.id);
        if hub.subscriber_count(self.inbox.as_str()) == 0
            && let Err(e) = self
                .node
                .broker
                .unsubscribe(Arc::clone(self.inbox.as_arc()))
                .await
        {
            tracing::warn!(error = %e, "broker unsubscribe failed");
        }
    }
}

/// The stream ended without [`Attached::detach`] (CANCEL aborted its task): unsubscribe now,
/// and the broker later if nobody else subscribed meanwhile.
impl Drop for Attached {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        let hub = &self.node.hub;
        hub.unsubscribe(self.inbox.as_str(), self.conn.id);
        if hub.subscriber_count(self.inbox.as_str()) == 0 {
            let node = Arc::clone(&self.node);
            let key = Arc::clone(self.inbox.as_arc());
            tokio::spawn(async move {
                if node.hub.subscriber_count(&key) > 0 {
                    return;
                }
                if let Err(e) = node.broker.unsubscribe(key).await {
                    tracing::warn!(error = %e, "broker unsubscribe failed");
                }
            });
        }
    }
}

/// Runs `messages.incoming` until CANCEL (which aborts the task) or an error.
pub(super) async fn run(session: &Session, stream_id: u32, gate: &Gate) -> Result<(), String> {
    let user = session.user()?;
    let node = Arc::clone(session.node());
    let prefix = session.group("");
    let chat = &node.chat;
    let budget = (node.settings.limits.max_queue_bytes / 2).max(64 * 1024);
    let _listening = session.listening();
    // The highest seq sent (or skipped) so far: entries met twice across the backlog, the
    // queue and a re-attach are sent once.
    let mut last = 0u64;
    loop {
        let mut attached = Attached::new(&node, &user, &prefix).await?;
        let mut backlog = chat.backlog(&user, budget).await.map_err(|e| e.message)?;
        // Live entries after what the backlog reads now go to the bounded queue.
        attached
            .subscriber
            .unpark(std::iter::empty(), backlog.top.offset);
        loop {
            let mut seqs = Vec::new();
            for (seq, entry) in &backlog.entries {
                if *seq <= last {
                    continue;
                }
                if let Some(m) = message_json(&prefix, entry.as_bytes()) {
                    session.emit(stream_id, gate, m).await;
                }
                last = *seq;
                seqs.push(*seq);
            }
            if !seqs.is_empty() {
                chat.ack_seqs(&user, &seqs).await.map_err(|e| e.message)?;
            }
            if !backlog.more {
                break;
            }
            backlog = chat
                .backlog_after(&user, &backlog.top.epoch, backlog.last(), budget)
                .await
                .map_err(|e| e.message)?;
        }
        live(session, stream_id, gate, &mut attached, &mut last).await?;
        attached.detach().await;
        tracing::debug!(
            stream_id,
            "messages.incoming: queue overflowed while waiting for credit; attaching again"
        );
    }
}

/// A queued item as `(seq, message)`, its bytes given back to the queue's limit.
fn item(conn: &ConnHandle, item: Outgoing) -> Option<(u64, Option<Bytes>)> {
    let Outgoing::Text(text) = item else {
        return None;
    };
    conn.dequeued(text.len());
    split(text.as_str())
}

/// Sends what the queue and the user's own channel messages bring, until the queue overflows.
/// Each wake-up drains what is queued (as far as the credit goes) and acknowledges it at once.
async fn live(
    session: &Session,
    stream_id: u32,
    gate: &Gate,
    attached: &mut Attached,
    last: &mut u64,
) -> Result<(), String> {
    let user = session.user()?;
    let chat = &session.node().chat;
    // An entry taken from the queue that waits for credit.
    let mut pending: Option<(u64, Option<Bytes>)> = None;
    loop {
        let first = match pending.take() {
            Some(p) => p,
            None => {
                let own_ready = session.own_ready();
                if let Some(m) = session.take_own() {
                    gate.take().await;
                    session.send_next(stream_id, m);
                    continue;
                }
                let next = tokio::select! {
                    biased;
                    () = attached.conn.closed() => return Ok(()),
                    next = attached.queue.recv() => next,
                    () = own_ready => continue,
                };
                let Some(next) = next else { return Ok(()) };
                match item(&attached.conn, next) {
                    Some(p) => p,
                    None => continue,
                }
            }
        };
        let mut seqs = Vec::new();
        let mut current = Some(first);
        while let Some((seq, json)) = current.take() {
            if seq > *last {
                if let Some(m) = json {
                    if !gate.try_take() {
                        if !seqs.is_empty() {
                            // Acknowledge what went out before waiting for credit.
                            pending = Some((seq, Some(m)));
                            break;
                        }
                        gate.take().await;
                    }
                    session.send_next(stream_id, m);
                }
                *last = seq;
                seqs.push(seq);
            }
            current = attached
                .queue
                .try_recv()
                .and_then(|next| item(&attached.conn, next));
        }
        if !seqs.is_empty() {
            chat.ack_seqs(&user, &seqs).await.map_err(|e| e.message)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_become_tutorial_messages() {
        let dm = br#"{"push":"message","from":"u1","data":"hi","id":"x"}"#;
        assert_eq!(
            message_json("rsocket:", dm),
            Some(Bytes::from_static(
                br#"{"channel":null,"content":"hi","user":"u1"}"#
            ))
        );
        let group = br#"{"push":"message","from":"u1","group":"rsocket:c1","data":"x"}"#;
        let m = message_json("rsocket:", group).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap_or_default();
        assert_eq!(v["channel"], "c1");
        assert_eq!(message_json("rsocket:", br#"{"push":"delivered"}"#), None);
    }

    #[test]
    fn queued_items_carry_their_seq() {
        let f = Frames {
            prefix: "rsocket:".into(),
        };
        let entry = ChatPayload::from_trusted(r#"{"push":"message","from":"a","data":"b"}"#.into());
        let item = f.encode(Some(7), &entry).unwrap_or_default();
        let (seq, json) = split(item.as_str()).unwrap_or_default();
        assert_eq!(seq, 7);
        assert!(json.is_some());
        let receipt = ChatPayload::from_trusted(r#"{"push":"read"}"#.into());
        let item = f.encode(Some(8), &receipt).unwrap_or_default();
        assert_eq!(split(item.as_str()), Some((8, None)));
        assert_eq!(f.encode(None, &entry), None);
    }
}
