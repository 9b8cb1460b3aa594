//! One connection's shared handle and its outgoing queue.
//!
//! Publishers and the keep-alive timer reach a connection only through its [`ConnHandle`]: they
//! push frames into an unbounded channel whose size in bytes is capped by hand. Capping bytes
//! rather than messages is what a slow consumer costs in memory. When a push would pass the cap,
//! the connection is closed as a slow consumer instead of slowing the publisher down.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use plaza_core::{CloseCode, ConnId};
use tokio::sync::{Notify, mpsc};

/// `close_code` value of a quiet close (no close frame); not a WebSocket close code.
const QUIET_CLOSE: u16 = 1;

/// What the writer sends on the socket.
#[derive(Debug)]
pub enum Outgoing {
    Text(Utf8Bytes),
    Ping,
    /// Close after everything queued before it (the reply that explains why).
    Close(CloseCode),
}

/// The receiving half, owned by the connection's writer.
pub struct Queue {
    rx: mpsc::UnboundedReceiver<Outgoing>,
}

impl Queue {
    pub async fn recv(&mut self) -> Option<Outgoing> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Outgoing> {
        self.rx.try_recv().ok()
    }
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The connection is closing; the frame was dropped.
    Closing,
    /// The queue would pass its byte limit: the connection is now closing as a slow consumer.
    Overflow,
}

pub struct ConnHandle {
    pub id: ConnId,
    pub created: Instant,
    tx: mpsc::UnboundedSender<Outgoing>,
    queued_bytes: AtomicUsize,
    max_queue_bytes: usize,
    /// 0 while open; otherwise the close code the writer must send.
    close_code: AtomicU16,
    close_requested: Notify,
    /// Set on every frame received; cleared when the keep-alive timer sends a ping.
    alive: AtomicBool,
    /// Whether a ping is out and unanswered.
    ping_outstanding: AtomicBool,
    connected: AtomicBool,
    /// Set by [`ConnHandle::close_after_queue`]: nothing more is queued.
    draining: AtomicBool,
    /// The authenticated user, once connected; empty for an anonymous connection.
    user: std::sync::OnceLock<String>,
}

impl ConnHandle {
    pub fn new(id: ConnId, max_queue_bytes: usize, now: Instant) -> (Self, Queue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = Self {
            id,
            created: now,
            tx,
            queued_bytes: AtomicUsize::new(0),
            max_queue_bytes,
            close_code: AtomicU16::new(0),
            close_requested: Notify::new(),
            alive: AtomicBool::new(true),
            ping_outstanding: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            user: std::sync::OnceLock::new(),
        };
        (handle, Queue { rx })
    }

    /// Queues a text frame, enforcing the byte limit.
    pub fn push_text(&self, frame: Utf8Bytes) -> Result<(), PushError> {
        if self.is_closing() || self.draining.load(Ordering::Acquire) {
            return Err(PushError::Closing);
        }
        let len = frame.len();
        let before = self.queued_bytes.fetch_add(len, Ordering::AcqRel);
        if before + len > self.max_queue_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.close(CloseCode::SlowConsumer);
            return Err(PushError::Overflow);
        }
        if self.tx.send(Outgoing::Text(frame)).is_err() {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            return Err(PushError::Closing);
        }
        Ok(())
    }

    /// Called by the writer for each frame it takes off the queue.
    pub fn dequeued(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
    }

    /// Asks the writer to close the connection with `code`. The first code wins. Returns whether
    /// this call was the first.
    pub fn close(&self, code: CloseCode) -> bool {
        let first = self
            .close_code
            .compare_exchange(0, code.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            self.close_requested.notify_waiters();
        }
        first
    }

    /// Closes with `code` once the frames already queued are written, so the client reads the
    /// reply that explains the close. Later pushes are refused.
    pub fn close_after_queue(&self, code: CloseCode) {
        if !self.draining.swap(true, Ordering::AcqRel)
            && self.tx.send(Outgoing::Close(code)).is_err()
        {
            self.close(code);
        }
    }

    /// Whether [`ConnHandle::close_after_queue`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Ends the connection without a close code: the peer went away or the socket failed, so
    /// there is nobody to tell.
    pub fn close_quietly(&self) {
        if self
            .close_code
            .compare_exchange(0, QUIET_CLOSE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.close_requested.notify_waiters();
        }
    }

    pub fn is_closing(&self) -> bool {
        self.close_code.load(Ordering::Acquire) != 0
    }

    /// The code passed to the first [`ConnHandle::close`], if any (`None` after a quiet close).
    pub fn close_code(&self) -> Option<CloseCode> {
        let code = self.close_code.load(Ordering::Acquire);
        CloseCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Resolves once [`ConnHandle::close`] or [`ConnHandle::close_quietly`] has been called.
    /// Both the reader and the writer wait on it.
    pub async fn closed(&self) {
        let notified = self.close_requested.notified();
        tokio::pin!(notified);
        // Registered before the check, so a close between the check and the await still wakes us.
        notified.as_mut().enable();
        if self.is_closing() {
            return;
        }
        notified.await;
    }

    /// Records that the peer sent something: it is alive.
    pub fn mark_alive(&self) {
        self.alive.store(true, Ordering::Release);
        self.ping_outstanding.store(false, Ordering::Release);
    }

    /// One keep-alive step: returns `false` when the previous ping went unanswered (the caller
    /// closes the connection), otherwise queues a new ping.
    pub fn keepalive_tick(&self) -> bool {
        let heard = self.alive.swap(false, Ordering::AcqRel);
        if !heard && self.ping_outstanding.load(Ordering::Acquire) {
            return false;
        }
        self.ping_outstanding.store(true, Ordering::Release);
        // A ping costs no queue bytes: it is tiny and must get through even to a busy client.
        let _ = self.tx.send(Outgoing::Ping);
        true
    }

    pub fn set_connected(&self, user: &str) {
        let _ = self.user.set(user.to_owned());
        self.connected.store(true, Ordering::Release);
    }

    /// The connected user (empty if anonymous or not connected yet).
    pub fn user(&self) -> &str {
        self.user.get().map_or("", String::as_str)
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Utf8Bytes {
        Utf8Bytes::from("x".repeat(n))
    }

    #[tokio::test]
    async fn overflow_closes_as_slow_consumer() {
        let (h, mut q) = ConnHandle::new(1, 10, Instant::now());
        assert_eq!(h.push_text(text(6)), Ok(()));
        assert_eq!(h.push_text(text(5)), Err(PushError::Overflow));
        assert_eq!(h.close_code(), Some(CloseCode::SlowConsumer));
        assert_eq!(h.push_text(text(1)), Err(PushError::Closing));
        h.closed().await;
        assert!(matches!(q.recv().await, Some(Outgoing::Text(t)) if t.len() == 6));
    }

    #[test]
    fn dequeue_frees_room() {
        let (h, _q) = ConnHandle::new(1, 10, Instant::now());
        assert_eq!(h.push_text(text(10)), Ok(()));
        h.dequeued(10);
        assert_eq!(h.push_text(text(10)), Ok(()));
    }

    #[test]
    fn first_close_code_wins() {
        let (h, _q) = ConnHandle::new(1, 10, Instant::now());
        assert!(h.close(CloseCode::NoPong));
        assert!(!h.close(CloseCode::Shutdown));
        assert_eq!(h.close_code(), Some(CloseCode::NoPong));
    }

    #[test]
    fn unanswered_ping_fails_the_next_tick() {
        let (h, _q) = ConnHandle::new(1, 10, Instant::now());
        assert!(h.keepalive_tick()); // fresh connection: sends the first ping
        assert!(!h.keepalive_tick()); // nothing heard since: dead
        h.mark_alive();
        assert!(h.keepalive_tick());
        h.mark_alive(); // a pong arrives
        assert!(h.keepalive_tick());
    }
}
