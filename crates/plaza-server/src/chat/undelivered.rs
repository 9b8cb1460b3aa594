//! The undelivered-message webhook: when a message is still unacknowledged by its recipient
//! `chat.undelivered_after_secs` after it was accepted, Plaza POSTs it to the app
//! (`chat.undelivered_webhook_url`), retrying with backoff. Bachata's `post_process` hook, for
//! every protocol.
//!
//! One task holds the watched messages in accept order (one fixed delay, so a queue is already
//! sorted by deadline). Watches live in memory: after a restart, messages accepted before it are
//! not watched (documented).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::http::{Request, Uri, header::CONTENT_TYPE};
use plaza_store::Store;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::auth::app::AppHttp;

/// Most messages waiting for their deadline; beyond, new ones are not watched (logged).
const MAX_WATCHED: usize = 100_000;
/// Attempts per message, with 1 s, 2 s, 4 s, ... between them.
const ATTEMPTS: u32 = 5;

/// A message to check at `due`.
#[derive(Debug, Clone)]
pub struct Watched {
    pub due: Instant,
    pub recipient: String,
    pub id: String,
    pub from: String,
    /// `"to"` or `"group"`, and its value, as in the message.
    pub field: &'static str,
    pub name: String,
    pub ts: u64,
}

#[derive(Clone)]
pub struct Webhook {
    tx: mpsc::Sender<Watched>,
    pub after: Duration,
}

impl Webhook {
    /// Starts the watching task.
    pub fn start(url: Uri, after: Duration, timeout: Duration, store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(MAX_WATCHED);
        let http = AppHttp::new(timeout, None);
        tokio::spawn(run(rx, url, http, store));
        Self { tx, after }
    }

    pub fn watch(&self, watched: Watched) {
        if self.tx.try_send(watched).is_err() {
            tracing::warn!(
                "undelivered webhook: {MAX_WATCHED} messages already watched; a new one is not"
            );
        }
    }
}

async fn run(mut rx: mpsc::Receiver<Watched>, url: Uri, http: AppHttp, store: Arc<dyn Store>) {
    let mut queue: VecDeque<Watched> = VecDeque::new();
    loop {
        let next_due = queue.front().map(|w| w.due);
        tokio::select! {
            watched = rx.recv() => match watched {
                Some(w) => queue.push_back(w),
                None => return,
            },
            () = sleep_until(next_due), if next_due.is_some() => {
                let Some(w) = queue.pop_front() else { continue };
                match super::is_acknowledged(store.as_ref(), &w.recipient, &w.id, &w.from).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tokio::spawn(notify(http.clone(), url.clone(), w));
                    }
                    Err(e) => tracing::warn!(id = %w.id, error = %e, "undelivered webhook: cannot check the message"),
                }
            }
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due).await;
    }
}

/// POSTs one undelivered message, retrying with backoff until a 2xx or [`ATTEMPTS`] tries.
async fn notify(http: AppHttp, url: Uri, w: Watched) {
    let body = serde_json::json!({
        "event": "undelivered",
        "id": w.id,
        "from": w.from,
        "recipient": w.recipient,
        w.field: w.name,
        "ts": w.ts,
    })
    .to_string();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
        }
        let request = match Request::post(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.clone())))
        {
            Ok(request) => request,
            Err(e) => {
                tracing::warn!(error = %e, "undelivered webhook: cannot build the request");
                return;
            }
        };
        match http.send(request, 4096).await {
            Ok(response) if response.status.is_success() => return,
            Ok(response) => {
                tracing::warn!(id = %w.id, status = %response.status, attempt, "undelivered webhook refused")
            }
            Err(e) => tracing::warn!(id = %w.id, error = %e, attempt, "undelivered webhook failed"),
        }
    }
    tracing::warn!(id = %w.id, recipient = %w.recipient, "undelivered webhook: gave up");
}
