//! A progress line on stderr, once per interval, for as long as the guard lives.

use std::time::Duration;
use tokio::task::JoinHandle;

/// Stops the progress line when dropped.
pub struct Progress(JoinHandle<()>);

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Prints `[label] <line()>` every `every` (not at all if `every` is zero).
pub fn spawn(
    label: &'static str,
    every: Duration,
    line: impl Fn() -> String + Send + 'static,
) -> Progress {
    Progress(tokio::spawn(async move {
        if every.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            eprintln!("[{label}] {}", line());
        }
    }))
}
