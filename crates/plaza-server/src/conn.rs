//! One connection's shared handle and its outgoing queue.
//!
//! Publishers and the keep-alive timer reach a connection only through its [`ConnHandle`]: they
//! push frames into its queue, whose size in bytes is capped. Capping bytes rather than messages
//! is what a slow consumer costs in memory. When a push would pass the cap, the connection is
//! closed as a slow consumer instead of slowing the publisher down.
//!
//! The queue is a `VecDeque` behind a mutex that the writer empties in one swap per drain, so a
//! burst of pushes costs the writer one lock, not one per frame, and an idle connection's queue
//! holds no allocation (the writer drops the buffers when it finds the queue empty).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;
use plaza_core::{CloseCode, ConnId};
use tokio::sync::Notify;

/// `close_code` value of a quiet close (no close frame); not a WebSocket close code.
const QUIET_CLOSE: u16 = 1;

/// What the writer sends on the socket.
#[derive(Debug)]
pub enum Outgoing {
    /// A text frame. On a native connection it may hold several objects, one per line (a batch
    /// of publications queued at once); other protocols queue one message per item.
    Text(Utf8Bytes),
    Ping,
    /// Close after everything queued before it (the reply that explains why).
    Close(CloseCode),
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Outgoing>,
    /// Bytes of the text frames in `items` (and, for [`Queue::recv`] users, of frames taken but
    /// not yet [`ConnHandle::dequeued`]).
    bytes: usize,
}

/// What the handle and the writer's [`Queue`] share.
struct Shared {
    state: Mutex<QueueState>,
    /// The connection's task, woken by a push or a close.
    writer: AtomicWaker,
    /// Counts this connection while its queue is not empty.
    backlog: Backlog,
}

/// How many connections have frames queued that their writer has not taken yet. The hub's
/// fan-out lanes read it to let the writers they woke run before fanning out the next batch: on a
/// busy node that keeps every subscriber one batch behind at most, rather than some many.
#[derive(Debug, Clone, Default)]
pub struct Backlog(Arc<AtomicUsize>);

impl Backlog {
    pub fn connections(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn remove(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Frames left behind by a closed connection are no one's backlog any more.
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if !state.items.is_empty() {
            self.backlog.remove();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The receiving half, owned by the connection's writer.
pub struct Queue {
    shared: Arc<Shared>,
}

impl Queue {
    /// Moves everything queued into `into` (which must be empty) and returns `Ready` once there
    /// was something, freeing the queue's byte count; registers the task's waker otherwise.
    /// When the queue is found empty, its buffer is freed if `release` (the caller frees
    /// `into`), so an idle connection holds none; otherwise the larger of the two buffers is
    /// left to the queue, so a busy connection's pushes do not allocate.
    pub fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        into: &mut VecDeque<Outgoing>,
        release: bool,
    ) -> Poll<()> {
        debug_assert!(into.is_empty());
        let mut queue = self.shared.lock();
        if queue.items.is_empty() {
            // Registered under the lock: a push after this point sees the new waker.
            self.shared.writer.register(cx.waker());
            if release {
                if queue.items.capacity() > 0 {
                    queue.items = VecDeque::new();
                }
            } else if queue.items.capacity() < into.capacity() {
                std::mem::swap(&mut queue.items, into);
            }
            return Poll::Pending;
        }
        std::mem::swap(&mut queue.items, into);
        queue.bytes = 0;
        self.shared.backlog.remove();
        Poll::Ready(())
    }

    /// Registers the task to be woken by the next push or close.
    pub fn register(&self, cx: &mut Context<'_>) {
        self.shared.writer.register(cx.waker());
    }

    /// The next frame, one at a time (the caller reports its bytes with
    /// [`ConnHandle::dequeued`]).
    pub async fn recv(&mut self) -> Option<Outgoing> {
        std::future::poll_fn(|cx| {
            let mut queue = self.shared.lock();
            match queue.items.pop_front() {
                Some(item) => {
                    if queue.items.is_empty() {
                        self.shared.backlog.remove();
                    }
                    Poll::Ready(Some(item))
                }
                None => {
                    self.shared.writer.register(cx.waker());
                    Poll::Pending
                }
            }
        })
        .await
    }

    pub fn try_recv(&mut self) -> Option<Outgoing> {
        let mut queue = self.shared.lock();
        let item = queue.items.pop_front();
        if item.is_some() && queue.items.is_empty() {
            self.shared.backlog.remove();
        }
        item
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
    queue: Arc<Shared>,
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
    /// A connection counted in `backlog` (the hub's) while it has frames queued.
    pub fn new(
        id: ConnId,
        max_queue_bytes: usize,
        now: Instant,
        backlog: &Backlog,
    ) -> (Self, Queue) {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            writer: AtomicWaker::new(),
            backlog: backlog.clone(),
        });
        let handle = Self {
            id,
            created: now,
            queue: Arc::clone(&shared),
            max_queue_bytes,
            close_code: AtomicU16::new(0),
            close_requested: Notify::new(),
            alive: AtomicBool::new(true),
            ping_outstanding: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            user: std::sync::OnceLock::new(),
        };
        (handle, Queue { shared })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.queue.lock()
    }

    /// Wakes the task of the connection's writer (something other than the queue needs it).
    pub fn wake_writer(&self) {
        self.queue.writer.wake();
    }

    /// Queues a text frame, enforcing the byte limit.
    pub fn push_text(&self, frame: Utf8Bytes) -> Result<(), PushError> {
        if self.is_closing() || self.draining.load(Ordering::Acquire) {
            return Err(PushError::Closing);
        }
        let len = frame.len();
        {
            let mut queue = self.lock();
            if queue.bytes + len > self.max_queue_bytes {
                drop(queue);
                self.close(CloseCode::SlowConsumer);
                return Err(PushError::Overflow);
            }
            queue.bytes += len;
            if queue.items.is_empty() {
                self.queue.backlog.add();
            }
            queue.items.push_back(Outgoing::Text(frame));
        }
        self.wake_writer();
        Ok(())
    }

    /// Queues a frame that costs no queue bytes (pings, the close marker).
    fn push_control(&self, item: Outgoing) {
        let mut queue = self.lock();
        if queue.items.is_empty() {
            self.queue.backlog.add();
        }
        queue.items.push_back(item);
        drop(queue);
        self.wake_writer();
    }

    /// Frees the queue's buffer if nothing is queued (the keep-alive timer calls it now and
    /// then, for connections that went quiet right after a burst).
    pub fn release_idle_buffer(&self) {
        let mut queue = self.lock();
        if queue.items.is_empty() && queue.items.capacity() > 0 {
            queue.items = VecDeque::new();
        }
    }

    /// For writers that take frames one at a time with [`Queue::recv`]: frees `len` bytes of
    /// the queue's limit. ([`Queue::poll_take`] frees them itself.)
    pub fn dequeued(&self, len: usize) {
        let mut queue = self.lock();
        queue.bytes = queue.bytes.saturating_sub(len);
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
            self.wake_writer();
        }
        first
    }

    /// Closes with `code` once the frames already queued are written, so the client reads the
    /// reply that explains the close. Later pushes are refused.
    pub fn close_after_queue(&self, code: CloseCode) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            self.push_control(Outgoing::Close(code));
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
            self.wake_writer();
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
        self.push_control(Outgoing::Ping);
        true
    }

    /// Queues a ping outside the keep-alive bookkeeping, for endpoints that ping on their own
    /// schedule and never act on a missing pong (Snorky).
    pub fn push_ping(&self) {
        self.push_control(Outgoing::Ping);
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
    use futures_util::task::noop_waker_ref;

    fn text(n: usize) -> Utf8Bytes {
        Utf8Bytes::from("x".repeat(n))
    }

    fn take(q: &mut Queue) -> Vec<Outgoing> {
        let mut into = VecDeque::new();
        let mut cx = Context::from_waker(noop_waker_ref());
        match q.poll_take(&mut cx, &mut into, true) {
            Poll::Ready(()) => into.into_iter().collect(),
            Poll::Pending => Vec::new(),
        }
    }

    #[tokio::test]
    async fn overflow_closes_as_slow_consumer() {
        let (h, mut q) = ConnHandle::new(1, 10, Instant::now(), &Backlog::default());
        assert_eq!(h.push_text(text(6)), Ok(()));
        assert_eq!(h.push_text(text(5)), Err(PushError::Overflow));
        assert_eq!(h.close_code(), Some(CloseCode::SlowConsumer));
        assert_eq!(h.push_text(text(1)), Err(PushError::Closing));
        h.closed().await;
        assert!(matches!(&take(&mut q)[..], [Outgoing::Text(t)] if t.len() == 6));
    }

    #[test]
    fn taking_frees_room_and_the_buffer() {
        let (h, mut q) = ConnHandle::new(1, 10, Instant::now(), &Backlog::default());
        assert_eq!(h.push_text(text(10)), Ok(()));
        assert_eq!(take(&mut q).len(), 1);
        assert_eq!(h.push_text(text(4)), Ok(()));
        assert_eq!(h.push_text(text(6)), Ok(()));
        assert_eq!(take(&mut q).len(), 2);
        // Found empty: the queue's buffer is released.
        assert!(take(&mut q).is_empty());
        assert_eq!(h.lock().items.capacity(), 0);
        // Unless the writer keeps buffers: then the queue gets the larger one.
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut spare = VecDeque::with_capacity(16);
        assert!(q.poll_take(&mut cx, &mut spare, false).is_pending());
        assert!(h.lock().items.capacity() >= 16);
        assert_eq!(spare.capacity(), 0);
        h.release_idle_buffer();
        assert_eq!(h.lock().items.capacity(), 0);
    }

    #[test]
    fn a_push_or_a_close_wakes_the_writer() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(Arc::clone(&count));
        let (h, mut q) = ConnHandle::new(1, 100, Instant::now(), &Backlog::default());
        let mut into = VecDeque::new();
        let mut cx = Context::from_waker(&waker);
        assert!(q.poll_take(&mut cx, &mut into, true).is_pending());
        h.push_text(text(1)).unwrap();
        h.push_text(text(1)).unwrap(); // already woken: no second wake-up
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(q.poll_take(&mut cx, &mut into, true).is_ready());
        into.clear();
        assert!(q.poll_take(&mut cx, &mut into, true).is_pending());
        h.close(CloseCode::Shutdown);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_backlog_counts_connections_with_frames_not_taken() {
        let backlog = Backlog::default();
        let (a, mut qa) = ConnHandle::new(1, 100, Instant::now(), &backlog);
        let (b, mut qb) = ConnHandle::new(2, 100, Instant::now(), &backlog);
        a.push_text(text(1)).unwrap();
        a.push_text(text(1)).unwrap();
        assert_eq!(backlog.connections(), 1);
        b.push_ping();
        assert_eq!(backlog.connections(), 2);
        // Taken whole by the native writer, or one by one by the others.
        assert_eq!(take(&mut qa).len(), 2);
        assert_eq!(backlog.connections(), 1);
        assert!(qb.try_recv().is_some());
        assert_eq!(backlog.connections(), 0);
        // A connection that ends with frames still queued leaves the count.
        b.push_text(text(1)).unwrap();
        assert_eq!(backlog.connections(), 1);
        drop((b, qb));
        assert_eq!(backlog.connections(), 0);
    }

    #[test]
    fn close_after_queue_comes_after_the_queued_frames() {
        let (h, mut q) = ConnHandle::new(1, 100, Instant::now(), &Backlog::default());
        h.push_text(text(3)).unwrap();
        h.close_after_queue(CloseCode::Unauthorized);
        assert!(h.is_draining());
        assert_eq!(h.push_text(text(1)), Err(PushError::Closing));
        assert!(matches!(
            &take(&mut q)[..],
            [Outgoing::Text(_), Outgoing::Close(CloseCode::Unauthorized)]
        ));
    }

    #[test]
    fn first_close_code_wins() {
        let (h, _q) = ConnHandle::new(1, 10, Instant::now(), &Backlog::default());
        assert!(h.close(CloseCode::NoPong));
        assert!(!h.close(CloseCode::Shutdown));
        assert_eq!(h.close_code(), Some(CloseCode::NoPong));
    }

    #[test]
    fn unanswered_ping_fails_the_next_tick() {
        let (h, _q) = ConnHandle::new(1, 10, Instant::now(), &Backlog::default());
        assert!(h.keepalive_tick()); // fresh connection: sends the first ping
        assert!(!h.keepalive_tick()); // nothing heard since: dead
        h.mark_alive();
        assert!(h.keepalive_tick());
        h.mark_alive(); // a pong arrives
        assert!(h.keepalive_tick());
    }
}
