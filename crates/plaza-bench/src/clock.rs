//! One process-wide time base. Publishers stamp payloads with nanoseconds since [`base`], and
//! subscribers (in the same process) subtract that stamp from their own reading of the same clock.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static BASE: OnceLock<Instant> = OnceLock::new();

/// The shared base instant, fixed by the first call.
pub fn base() -> Instant {
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds elapsed since [`base`].
pub fn now_ns() -> u64 {
    u64::try_from(base().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The instant `ns` nanoseconds after [`base`].
pub fn instant_at(ns: u64) -> Instant {
    base() + Duration::from_nanos(ns)
}

/// Seconds between two readings of [`now_ns`] (0 when `end` is before `start`).
pub fn secs_between(start_ns: u64, end_ns: u64) -> f64 {
    end_ns.saturating_sub(start_ns) as f64 / 1e9
}
