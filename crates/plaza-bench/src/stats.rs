//! Exact latency percentiles and per-subscriber sequence accounting.

use serde::Serialize;

/// The nearest-rank percentile of sorted samples: the smallest sample such that at least `p`
/// percent of the samples are less than or equal to it. `None` for no samples.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    // The epsilon keeps float noise (0.999 * 1000 = 999.0000000000001) from moving up a rank.
    let rank = ((p / 100.0) * n as f64 - 1e-9).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// Latency summary in microseconds, over every sample.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub samples: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl LatencySummary {
    /// Sorts `samples_ns` in place and summarises it.
    pub fn from_ns(samples_ns: &mut [u64]) -> Self {
        samples_ns.sort_unstable();
        let us = |v: Option<u64>| v.map_or(0.0, |ns| ns as f64 / 1e3);
        let n = samples_ns.len();
        let sum: u128 = samples_ns.iter().map(|&v| u128::from(v)).sum();
        Self {
            samples: n as u64,
            min_us: us(samples_ns.first().copied()),
            mean_us: if n == 0 {
                0.0
            } else {
                (sum as f64 / n as f64).round() / 1e3
            },
            p50_us: us(percentile(samples_ns, 50.0)),
            p90_us: us(percentile(samples_ns, 90.0)),
            p99_us: us(percentile(samples_ns, 99.0)),
            p999_us: us(percentile(samples_ns, 99.9)),
            max_us: us(samples_ns.last().copied()),
        }
    }
}

/// What one received sequence number was, for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqEvent {
    /// First time seen, after every sequence number seen before.
    InOrder,
    /// First time seen, but a later sequence number came earlier.
    OutOfOrder,
    /// Seen before.
    Duplicate,
    /// Not a sequence number of this run.
    OutOfRange,
}

/// Which of the `n` sequence numbers one subscriber received (one bit each).
#[derive(Debug, Clone)]
pub struct SeqTracker {
    bits: Vec<u64>,
    n: u64,
    unique: u64,
    highest: Option<u64>,
}

impl SeqTracker {
    pub fn new(n: u64) -> Self {
        Self {
            bits: vec![0; n.div_ceil(64) as usize],
            n,
            unique: 0,
            highest: None,
        }
    }

    pub fn record(&mut self, seq: u64) -> SeqEvent {
        if seq >= self.n {
            return SeqEvent::OutOfRange;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if self.bits[word] & bit != 0 {
            return SeqEvent::Duplicate;
        }
        self.bits[word] |= bit;
        self.unique += 1;
        match self.highest {
            Some(h) if seq < h => SeqEvent::OutOfOrder,
            _ => {
                self.highest = Some(seq);
                SeqEvent::InOrder
            }
        }
    }

    /// Distinct sequence numbers received.
    pub fn unique(&self) -> u64 {
        self.unique
    }

    pub fn complete(&self) -> bool {
        self.unique == self.n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7], 0.0), Some(7));
        assert_eq!(percentile(&[7], 100.0), Some(7));
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 90.0), Some(90));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 99.9), Some(100));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.5), Some(1));
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 99.9), Some(999));
        // Wikipedia's example: 15, 20, 35, 40, 50.
        let w = [15, 20, 35, 40, 50];
        assert_eq!(percentile(&w, 5.0), Some(15));
        assert_eq!(percentile(&w, 30.0), Some(20));
        assert_eq!(percentile(&w, 40.0), Some(20));
        assert_eq!(percentile(&w, 50.0), Some(35));
        assert_eq!(percentile(&w, 100.0), Some(50));
    }

    #[test]
    fn summary_sorts_and_converts() {
        let mut v = vec![3000, 1000, 2000, 4000];
        let s = LatencySummary::from_ns(&mut v);
        assert_eq!(v, [1000, 2000, 3000, 4000]);
        assert_eq!(s.samples, 4);
        assert_eq!(s.min_us, 1.0);
        assert_eq!(s.mean_us, 2.5);
        assert_eq!(s.p50_us, 2.0);
        assert_eq!(s.p90_us, 4.0);
        assert_eq!(s.max_us, 4.0);
        assert_eq!(LatencySummary::from_ns(&mut []), LatencySummary::default());
    }

    #[test]
    fn tracker_counts_order_and_duplicates() {
        let mut t = SeqTracker::new(130);
        assert_eq!(t.record(0), SeqEvent::InOrder);
        assert_eq!(t.record(2), SeqEvent::InOrder);
        assert_eq!(t.record(1), SeqEvent::OutOfOrder);
        assert_eq!(t.record(1), SeqEvent::Duplicate);
        assert_eq!(t.record(129), SeqEvent::InOrder);
        assert_eq!(t.record(130), SeqEvent::OutOfRange);
        assert_eq!(t.record(64), SeqEvent::OutOfOrder);
        assert_eq!(t.unique(), 5);
        assert!(!t.complete());
        let mut t = SeqTracker::new(3);
        for s in 0..3 {
            t.record(s);
        }
        assert!(t.complete());
        assert!(SeqTracker::new(0).complete());
    }
}
