//! Per-stream helpers for a server-side session: REQUEST_N credit accounting and stream ids.

use super::frame::{MAX_REQUEST_N, MAX_STREAM_ID};

/// How many PAYLOADs the responder may still send on a stream. Reaching 2^31-1 (by the initial
/// request or by REQUEST_N additions) makes the credit unbounded for good, as the specification
/// says, so a client that requests `2^31-1` and never sends REQUEST_N (rsocket-py) never stalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    remaining: u32,
}

impl Credit {
    /// Credit from a request's initial N (values over 2^31-1 count as unbounded).
    pub fn new(initial_n: u32) -> Self {
        Self {
            remaining: initial_n.min(MAX_REQUEST_N),
        }
    }

    pub fn unbounded() -> Self {
        Self {
            remaining: MAX_REQUEST_N,
        }
    }

    /// Adds a REQUEST_N's count, saturating at unbounded. 0 adds nothing.
    pub fn grant(&mut self, n: u32) {
        self.remaining = self.remaining.saturating_add(n).min(MAX_REQUEST_N);
    }

    pub fn is_unbounded(&self) -> bool {
        self.remaining == MAX_REQUEST_N
    }

    /// Remaining credit (`MAX_REQUEST_N` when unbounded).
    pub fn available(&self) -> u32 {
        self.remaining
    }

    /// Uses one unit for a PAYLOAD about to be sent; false (and nothing used) without credit.
    pub fn take(&mut self) -> bool {
        if self.is_unbounded() {
            true
        } else if self.remaining > 0 {
            self.remaining -= 1;
            true
        } else {
            false
        }
    }
}

/// Whether a stream id was allocated by the client (odd) rather than the server (even).
pub fn is_client_stream_id(stream_id: u32) -> bool {
    stream_id % 2 == 1
}

/// Allocates the server's stream ids for requests it sends to the client: 2, 4, 6, ...
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStreamIds {
    next: u32,
}

impl ServerStreamIds {
    pub fn new() -> Self {
        Self { next: 2 }
    }

    /// The next id, `None` once the 31-bit space is used up (ids are never reused).
    pub fn next_id(&mut self) -> Option<u32> {
        let id = self.next;
        if id > MAX_STREAM_ID {
            return None;
        }
        self.next = id.saturating_add(2);
        Some(id)
    }
}

impl Default for ServerStreamIds {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit() {
        let mut c = Credit::new(2);
        assert!(c.take() && c.take());
        assert!(!c.take());
        c.grant(0);
        assert!(!c.take());
        c.grant(1);
        assert!(c.take());
        c.grant(u32::MAX);
        assert!(c.is_unbounded());
        for _ in 0..10 {
            assert!(c.take());
        }
        assert_eq!(c.available(), MAX_REQUEST_N);
        let mut c = Credit::new(MAX_REQUEST_N - 1);
        c.grant(5);
        assert!(c.is_unbounded());
        assert!(Credit::new(u32::MAX).is_unbounded());
        assert!(Credit::unbounded().is_unbounded());
    }

    #[test]
    fn stream_ids() {
        assert!(is_client_stream_id(1) && !is_client_stream_id(2));
        let mut ids = ServerStreamIds::new();
        assert_eq!((ids.next_id(), ids.next_id()), (Some(2), Some(4)));
        let mut ids = ServerStreamIds {
            next: MAX_STREAM_ID - 1,
        };
        assert_eq!(ids.next_id(), Some(MAX_STREAM_ID - 1));
        assert_eq!(ids.next_id(), None);
        assert_eq!(ids.next_id(), None);
    }
}
