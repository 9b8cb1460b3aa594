//! Where a store gets the time it stamps on publications.
//!
//! A publication's age (for [`StreamOptions::ttl`](crate::StreamOptions::ttl)) is counted from the
//! moment it was stored, and [`Store::append`](crate::Store::append) has no time argument: the
//! moment of storing belongs to the store, not to whoever calls it. So the store reads a clock at
//! that one edge, and everything behind it (trimming, the stream rules in `stream.rs`) takes plain
//! millisecond values. Tests hand in a [`ManualClock`] to make ages exact without sleeping.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's wall clock. Wall time rather than `Instant`, because stamps are stored on disk and
/// compared after a restart.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that only moves when told to, for tests.
#[derive(Debug)]
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn new(start: SystemTime) -> Self {
        Self(Mutex::new(start))
    }

    pub fn set(&self, now: SystemTime) {
        // A poisoned lock still holds a valid time: the guarded code cannot panic midway.
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = now;
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Milliseconds since the Unix epoch, the unit stored on disk. Times before 1970 count as 0.
pub(crate) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A duration in milliseconds, saturating (a ttl of centuries is "forever").
pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
