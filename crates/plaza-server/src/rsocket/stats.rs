//! `statistics`: the request-channel's periodic `{"user_count", "channel_count"}`, driven by
//! one timer for every statistics channel of the node. The timer sleeps while nobody watches;
//! while someone does it looks every [`TICK`] for watchers whose period is up, counts once for
//! all of them, and hands each its sample through a `watch` channel (latest wins: a stream
//! without REQUEST_N credit holds one sample, never a backlog).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

/// How often the timer looks for due watchers while there are some.
const TICK: Duration = Duration::from_millis(100);
/// Most statistics channels open on the node at once.
const MAX_WATCHERS: usize = 10_000;
/// Longest period a client may ask for.
pub const MAX_PERIOD_SECS: u64 = 3600;
/// Most ids in a request.
const MAX_IDS: usize = 16;

/// What a statistics channel asks for: which counts, how often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub users: bool,
    pub channels: bool,
    pub period_secs: u64,
}

impl Default for Request {
    /// The tutorial server's `ServerStatisticsRequest()`: both counts, every second.
    fn default() -> Self {
        Self {
            users: true,
            channels: true,
            period_secs: 1,
        }
    }
}

impl Request {
    /// Applies a client's `{"ids": [..], "period_seconds": n}`. A missing or null key keeps
    /// its current value (as the tutorial server does for null); unknown ids are ignored.
    pub fn update(self, data: &[u8]) -> Result<Request, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Update {
            #[serde(default)]
            ids: Option<Vec<String>>,
            #[serde(default)]
            period_seconds: Option<u64>,
        }
        let u: Update = serde_json::from_slice(data).map_err(|e| {
            format!(
                "bad statistics request: {e} (expected {{\"ids\": [..], \"period_seconds\": n}})"
            )
        })?;
        let mut next = self;
        if let Some(ids) = u.ids {
            if ids.len() > MAX_IDS {
                return Err(format!("statistics: at most {MAX_IDS} ids"));
            }
            next.users = ids.iter().any(|i| i == "users");
            next.channels = ids.iter().any(|i| i == "channels");
        }
        if let Some(p) = u.period_seconds {
            if p == 0 || p > MAX_PERIOD_SECS {
                return Err(format!(
                    "statistics: period_seconds must be 1 to {MAX_PERIOD_SECS}, not {p}"
                ));
            }
            next.period_secs = p;
        }
        Ok(next)
    }
}

/// The counts of one tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub users: usize,
    pub channels: usize,
}

/// `{"user_count": n, "channel_count": n}` in the tutorial's `json.dumps` layout; a count not
/// asked for is `null`.
pub fn encode(request: Request, counts: Counts) -> Bytes {
    let count = |on: bool, n: usize| {
        if on { n.to_string() } else { "null".to_owned() }
    };
    Bytes::from(format!(
        "{{\"user_count\": {}, \"channel_count\": {}}}",
        count(request.users, counts.users),
        count(request.channels, counts.channels)
    ))
}

struct Watcher {
    request: Request,
    /// When the next sample is due; then one period later.
    due: Instant,
    tx: watch::Sender<Option<Bytes>>,
}

#[derive(Default)]
struct Watchers {
    next_id: u64,
    map: HashMap<u64, Watcher>,
}

/// The node's statistics timer and its watchers.
#[derive(Default)]
pub struct Statistics {
    watchers: Mutex<Watchers>,
    /// Wakes the timer when the first watcher arrives.
    wake: Notify,
}

/// One statistics channel's registration; unregisters when dropped.
pub struct Watch {
    stats: Arc<Statistics>,
    id: u64,
    pub rx: watch::Receiver<Option<Bytes>>,
}

impl Watch {
    /// Changes what is sent; the next sample is one (new) period after the last one.
    pub fn update(&self, request: Request) {
        let mut w = self.stats.lock();
        if let Some(watcher) = w.map.get_mut(&self.id) {
            let old = Duration::from_secs(watcher.request.period_secs);
            let new = Duration::from_secs(request.period_secs);
            watcher.due = watcher
                .due
                .checked_sub(old)
                .map_or_else(|| Instant::now() + new, |last| last + new);
            watcher.request = request;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stats.lock().map.remove(&self.id);
    }
}

impl Statistics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    pub fn watcher_count(&self) -> usize {
        self.lock().map.len()
    }

    /// Registers a channel; its first sample comes one period from now.
    pub fn watch(self: &Arc<Self>, request: Request) -> Result<Watch, String> {
        let (tx, rx) = watch::channel(None);
        let id = {
            let mut w = self.lock();
            if w.map.len() >= MAX_WATCHERS {
                return Err(format!(
                    "too many statistics channels on this server (at most {MAX_WATCHERS})"
                ));
            }
            let id = w.next_id;
            w.next_id += 1;
            let due = Instant::now() + Duration::from_secs(request.period_secs);
            w.map.insert(id, Watcher { request, due, tx });
            id
        };
        self.wake.notify_one();
        Ok(Watch {
            stats: Arc::clone(self),
            id,
            rx,
        })
    }

    /// The timer: runs for the node's life. `count` is called at most once per tick, and only
    /// when some watcher is due.
    pub async fn run<F, Fut>(self: Arc<Self>, count: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Counts>,
    {
        loop {
            let woken = self.wake.notified();
            if self.lock().map.is_empty() {
                woken.await;
                continue;
            }
            drop(woken);
            tokio::time::sleep(TICK).await;
            if !self.any_due(Instant::now()) {
                continue;
            }
            let counts = count().await;
            self.tick(Instant::now(), counts);
        }
    }

    fn any_due(&self, now: Instant) -> bool {
        self.lock().map.values().any(|w| w.due <= now)
    }

    /// Hands `counts` to every watcher due at `now` and schedules its next sample.
    fn tick(&self, now: Instant, counts: Counts) {
        let mut w = self.lock();
        for watcher in w.map.values_mut().filter(|w| w.due <= now) {
            watcher
                .tx
                .send_replace(Some(encode(watcher.request, counts)));
            let period = Duration::from_secs(watcher.request.period_secs);
            watcher.due += period;
            if watcher.due <= now {
                // Fell behind (a slow count): start the rhythm again from now.
                watcher.due = now + period;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_follow_the_tutorial_request() {
        let r = Request::default();
        let u = r
            .update(br#"{"ids": ["users"], "period_seconds": 1}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            u,
            Request {
                users: true,
                channels: false,
                period_secs: 1
            }
        );
        let u = u
            .update(br#"{"ids": null, "period_seconds": 2}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((u.users, u.channels, u.period_secs), (true, false, 2));
        assert_eq!(u.update(b"{}"), Ok(u));
        for bad in [
            &br#"{"period_seconds": 0}"#[..],
            br#"{"period_seconds": 3601}"#,
            br#"{"period_seconds": -1}"#,
            br#"{"ids": "users"}"#,
            br#"{"other": 1}"#,
            b"not json",
        ] {
            assert!(r.update(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn samples_are_json_dumps_layout_with_nulls() {
        let counts = Counts {
            users: 2,
            channels: 1,
        };
        assert_eq!(
            encode(Request::default(), counts),
            Bytes::from_static(b"{\"user_count\": 2, \"channel_count\": 1}")
        );
        let users_only = Request {
            channels: false,
            ..Request::default()
        };
        assert_eq!(
            encode(users_only, counts),
            Bytes::from_static(b"{\"user_count\": 2, \"channel_count\": null}")
        );
    }

    #[test]
    fn each_watcher_is_served_at_its_period() {
        let stats = Arc::new(Statistics::default());
        let counts = Counts {
            users: 3,
            channels: 4,
        };
        let start = Instant::now();
        let mut fast = stats
            .watch(Request::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut slow = stats
            .watch(Request {
                period_secs: 3,
                ..Request::default()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let mut fast_n = 0;
        let mut slow_n = 0;
        // Ten ticks a second for six seconds, as the timer does.
        for i in 1..=60 {
            let now = start + Duration::from_millis(100 * i) + Duration::from_millis(5);
            if stats.any_due(now) {
                stats.tick(now, counts);
            }
            if fast.rx.has_changed().unwrap_or(false) {
                fast.rx.borrow_and_update();
                fast_n += 1;
            }
            if slow.rx.has_changed().unwrap_or(false) {
                assert_eq!(
                    slow.rx.borrow_and_update().clone(),
                    Some(Bytes::from_static(
                        b"{\"user_count\": 3, \"channel_count\": 4}"
                    ))
                );
                slow_n += 1;
            }
        }
        assert_eq!((fast_n, slow_n), (6, 2));
        // A new period counts from the last sample.
        fast.update(Request {
            users: true,
            channels: false,
            period_secs: 2,
        });
        let now = start + Duration::from_millis(7005);
        assert!(!stats.any_due(now));
        let now = start + Duration::from_millis(8005);
        assert!(stats.any_due(now));
        stats.tick(now, counts);
        assert_eq!(
            fast.rx.borrow_and_update().clone(),
            Some(Bytes::from_static(
                b"{\"user_count\": 3, \"channel_count\": null}"
            ))
        );
        drop(fast);
        drop(slow);
        assert_eq!(stats.watcher_count(), 0);
    }
}
