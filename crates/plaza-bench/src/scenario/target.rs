//! Which server a scenario talks to, and how its publications are sent.

use crate::http::HttpTarget;
use crate::peer::{Kind, native, snorky};
use crate::publisher::http_api::{self, HttpPublish, PublishProgress};
use crate::publisher::ws_pub::{self, NatsPub, SocketIoPub, WsPublish};
use crate::publisher::{Pace, PublishReport, amqp};
use crate::ws::WsTarget;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The server under test (shared by the scenarios).
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// The server's protocol.
    #[arg(long, value_enum, default_value = "plaza")]
    pub peer: Kind,
    /// The subscribers' WebSocket endpoint (for Socket.IO, with
    /// `/socket.io/?EIO=4&transport=websocket`).
    #[arg(long, default_value = "ws://127.0.0.1:7700/plaza/ws")]
    pub ws: String,
    /// The backend API base URL (Plaza: `POST /api/publish`; Snorky: `POST /backend`).
    #[arg(long, default_value = "http://127.0.0.1:7701")]
    pub api: String,
    /// The backend key (Plaza: `X-Plaza-Key`; Snorky: `X-Backend-Key`).
    #[arg(
        long,
        env = "PLAZA_BACKEND_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    pub key: String,
    /// The publisher's WebSocket endpoint for NATS and Socket.IO (default: --ws).
    #[arg(long)]
    pub pub_ws: Option<String>,
    /// RabbitMQ `host:port` for High-templar's publications.
    #[arg(long, default_value = "127.0.0.1:5672")]
    pub amqp: String,
    /// RabbitMQ user and password, as `user:password`.
    #[arg(long, env = "PLAZA_BENCH_AMQP_LOGIN", default_value = "guest:guest")]
    pub amqp_login: String,
}

impl TargetArgs {
    /// Checks that the server answers before connections are opened (Plaza's `/healthz`).
    pub async fn check(&self) -> Result<()> {
        if self.peer == Kind::Plaza {
            let target = HttpTarget::parse(&self.api)?;
            let health =
                crate::http::request(&target, "GET", "/healthz", &[], b"", Duration::from_secs(5))
                    .await
                    .context("GET /healthz on the backend")?;
            if health.status != 200 {
                bail!("GET /healthz answered {}", health.status);
            }
        }
        if self.peer == Kind::Plaza && self.key.is_empty() {
            bail!("Plaza needs the backend key: --key or PLAZA_BACKEND_KEY");
        }
        Ok(())
    }
}

/// One publishing run: `count` publications on `channel`.
pub struct PublishJob<'a> {
    pub target: &'a TargetArgs,
    pub channel: &'a str,
    /// High-templar only: publication `i` goes to room `rooms[i % n]` with sequence number
    /// `i / n` (the `chat` scenario); empty means `[channel]`.
    pub rooms: Vec<String>,
    pub count: u64,
    pub payload_bytes: usize,
    pub pace: Pace,
    pub deadline: Instant,
}

/// Publishes through the peer's publishing path.
pub async fn publish(job: &PublishJob<'_>, progress: &Arc<PublishProgress>) -> PublishReport {
    match publish_inner(job, progress).await {
        Ok(r) => r,
        Err(e) => PublishReport {
            aborted: Some(format!("{e:#}")),
            ..Default::default()
        },
    }
}

async fn publish_inner(
    job: &PublishJob<'_>,
    progress: &Arc<PublishProgress>,
) -> Result<PublishReport> {
    let t = job.target;
    let channel_json = serde_json::to_string(job.channel)?;
    Ok(match t.peer {
        Kind::Plaza | Kind::Snorky => {
            let target = HttpTarget::parse(&t.api)?;
            let (path, header) = if t.peer == Kind::Plaza {
                ("/api/publish", "X-Plaza-Key")
            } else {
                ("/backend", "X-Backend-Key")
            };
            let cj = channel_json.clone();
            let plaza = t.peer == Kind::Plaza;
            let body = move |data: &[u8], out: &mut Vec<u8>| {
                if plaza {
                    native::api_publish_body(&cj, data, out)
                } else {
                    snorky::backend_publish_body(&cj, data, out)
                }
            };
            let headers = [(header, t.key.as_str())];
            let p = HttpPublish {
                target: &target,
                path,
                headers: &headers,
                body: &body,
                count: job.count,
                payload_bytes: job.payload_bytes,
                pace: job.pace,
                deadline: job.deadline,
            };
            http_api::run(&p, progress).await
        }
        Kind::Nats | Kind::Socketio => {
            let nats = NatsPub {
                subject: job.channel.to_string(),
            };
            let sio = SocketIoPub {
                room_json: channel_json.clone(),
            };
            let proto: &dyn ws_pub::WsPubProtocol = if t.peer == Kind::Nats { &nats } else { &sio };
            let target = WsTarget::parse(t.pub_ws.as_deref().unwrap_or(&t.ws))?;
            let p = WsPublish {
                target: &target,
                proto,
                count: job.count,
                payload_bytes: job.payload_bytes,
                pace: job.pace,
                deadline: job.deadline,
                idle: Duration::from_secs(10),
            };
            ws_pub::run(&p, progress).await
        }
        Kind::Hightemplar => {
            let rooms = if job.rooms.is_empty() {
                vec![job.channel.to_string()]
            } else {
                job.rooms.clone()
            };
            let (user, pass) = t
                .amqp_login
                .split_once(':')
                .context("--amqp-login is user:password")?;
            let p = amqp::AmqpPublish {
                addr: &t.amqp,
                user,
                password: pass,
                exchange: "hightemplar",
                routing_key: "*",
                rooms: rooms
                    .iter()
                    .map(|r| crate::peer::hightemplar::room(r))
                    .collect(),
                count: job.count,
                payload_bytes: job.payload_bytes,
                pace: job.pace,
                deadline: job.deadline,
                idle: Duration::from_secs(10),
            };
            amqp::run(&p, progress).await
        }
    })
}

/// Encodes a chat member's message: `(request id, data, out)`.
pub type MemberEncoder = Arc<dyn Fn(u64, &[u8], &mut Vec<u8>) + Send + Sync>;

/// How a chat member publishes `data` (already JSON) on `channel` with its own connection:
/// `encode(request_id, data, out)`. `None` for a server whose clients cannot publish
/// (High-templar: the chat scenario publishes through RabbitMQ for its members).
pub fn member_publish(kind: Kind, channel: &str) -> Option<MemberEncoder> {
    let channel_json = serde_json::to_string(channel).unwrap_or_else(|_| "\"\"".into());
    let channel = channel.to_string();
    Some(match kind {
        Kind::Plaza => Arc::new(move |id, data, out| {
            out.extend_from_slice(b"{\"id\":");
            out.extend_from_slice(id.to_string().as_bytes());
            out.extend_from_slice(b",\"method\":\"publish\",\"params\":{\"channel\":");
            out.extend_from_slice(channel_json.as_bytes());
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(data);
            out.extend_from_slice(b"}}");
        }),
        Kind::Nats => {
            Arc::new(move |_, data, out| crate::peer::nats::pub_message(&channel, data, out))
        }
        Kind::Socketio => Arc::new(move |_, data, out| {
            out.extend_from_slice(b"42[\"publish\",");
            out.extend_from_slice(channel_json.as_bytes());
            out.push(b',');
            out.extend_from_slice(data);
            out.push(b']');
        }),
        Kind::Snorky => Arc::new(move |id, data, out| {
            out.extend_from_slice(b"{\"service\":\"pubsub\",\"message\":{\"command\":\"publish\",\"params\":{\"channel\":");
            out.extend_from_slice(channel_json.as_bytes());
            out.extend_from_slice(b",\"message\":");
            out.extend_from_slice(data);
            out.extend_from_slice(b"},\"callId\":");
            out.extend_from_slice(id.to_string().as_bytes());
            out.extend_from_slice(b"}}");
        }),
        Kind::Hightemplar => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(kind: Kind, id: u64) -> String {
        let f = member_publish(kind, "chat:r1").unwrap();
        let mut out = Vec::new();
        f(id, br#"{"s":1}"#, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn members_publish_in_each_protocol() {
        let v: serde_json::Value = serde_json::from_str(&encode(Kind::Plaza, 7)).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["method"], "publish");
        assert_eq!(v["params"]["channel"], "chat:r1");
        assert_eq!(v["params"]["data"]["s"], 1);
        assert_eq!(encode(Kind::Nats, 7), "PUB chat:r1 7\r\n{\"s\":1}\r\n");
        assert_eq!(
            encode(Kind::Socketio, 7),
            r#"42["publish","chat:r1",{"s":1}]"#
        );
        let v: serde_json::Value = serde_json::from_str(&encode(Kind::Snorky, 7)).unwrap();
        assert_eq!(v["service"], "pubsub");
        assert_eq!(v["message"]["command"], "publish");
        assert_eq!(v["message"]["params"]["message"]["s"], 1);
        assert_eq!(v["message"]["callId"], 7);
        assert!(member_publish(Kind::Hightemplar, "x").is_none());
    }
}
