//! RSocket over WebSocket (`ws_path`, `/chat` in the tutorial): one binary message per frame,
//! no length prefix; text messages are ignored.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt as _, StreamExt as _};

use super::Rsocket;
use super::session::{Flow, Inbound};

pub async fn upgrade(State(rs): State<Arc<Rsocket>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| run(socket, rs))
}

async fn run(socket: WebSocket, rs: Arc<Rsocket>) {
    let (mut sink, mut stream) = socket.split();
    let (mut inbound, mut rx) = Inbound::new(rs);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            let bytes = match frame.to_bytes() {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "rsocket frame not encodable");
                    continue;
                }
            };
            if sink.send(Message::Binary(bytes)).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    loop {
        let next = tokio::select! {
            biased;
            () = inbound.closing() => break,
            next = tokio::time::timeout_at(inbound.deadline(), stream.next()) => next,
        };
        let message = match next {
            Err(_elapsed) => {
                inbound.timed_out();
                break;
            }
            Ok(Some(Ok(message))) => message,
            Ok(_) => break,
        };
        match message {
            Message::Binary(bytes) => {
                let flow = inbound.feed(bytes);
                if flow == Flow::Close {
                    break;
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    inbound.finish();
    // A client that does not read would hold the writer (and the socket) forever.
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .is_err()
    {
        abort.abort();
    }
}
