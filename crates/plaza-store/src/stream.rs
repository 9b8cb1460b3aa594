//! The stream rules both stores share: which offsets a read returns, what an append keeps, when a
//! publication has expired, and how epochs are made.
//!
//! Everything here works on plain numbers, so the two implementations cannot drift apart on
//! semantics and the edge cases are tested once, without storage. A stream keeps the offsets
//! `first..=top`; `first == top + 1` when it keeps none (a new stream has `top = 0, first = 1`).

use crate::{Position, StoreError};

/// Which stored offsets answer a read, and whether that answer is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadPlan {
    /// Inclusive offset range to fetch; `None` when nothing is to be returned.
    pub range: Option<(u64, u64)>,
    /// The value of [`ReadResult::complete`](crate::ReadResult::complete), provided every offset
    /// of `range` is found.
    pub complete: bool,
}

impl ReadPlan {
    /// How many publications the plan fetches.
    pub fn len(&self) -> u64 {
        self.range.map_or(0, |(from, to)| to - from + 1)
    }
}

/// Plans a read of the stream `(epoch, first..=top)`.
pub(crate) fn plan_read(
    epoch: &str,
    top: u64,
    first: u64,
    since: Option<&Position>,
    limit: usize,
) -> ReadPlan {
    let limit = u64::try_from(limit).unwrap_or(u64::MAX);
    let end = top.saturating_add(1);
    match since {
        None => {
            // The latest `limit` publications, returned oldest first.
            let kept = end.saturating_sub(first);
            let n = kept.min(limit);
            ReadPlan {
                range: (n > 0).then(|| (end - n, top)),
                complete: n == kept,
            }
        }
        // Offsets of another epoch say nothing about this stream; a position ahead of the stream
        // means the client saw data this store does not have. Either way, start afresh.
        Some(since) if since.epoch != epoch || since.offset > top => ReadPlan {
            range: None,
            complete: false,
        },
        Some(since) => {
            let wanted_from = since.offset.saturating_add(1);
            let trimmed = wanted_from < first;
            let from = wanted_from.max(first);
            let available = end.saturating_sub(from);
            let n = available.min(limit);
            ReadPlan {
                range: (n > 0).then(|| (from, from + n - 1)),
                complete: !trimmed && n == available,
            }
        }
    }
}

/// What one append does to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AppendPlan {
    /// The new publication's offset, and the stream's new `top`.
    pub offset: u64,
    /// The stream's new `first`.
    pub first: u64,
    /// Stored offsets to delete (inclusive), because `max_len` no longer covers them.
    pub drop: Option<(u64, u64)>,
    /// Whether the new publication is stored at all (`false` only with `max_len = 0`).
    pub store: bool,
}

/// Plans an append to the stream `first..=top`, bounded by `max_len`.
pub(crate) fn plan_append(
    top: u64,
    first: u64,
    max_len: Option<u64>,
) -> Result<AppendPlan, StoreError> {
    // Unreachable in practice (2^64 publications), but the values come from disk.
    let offset = top
        .checked_add(1)
        .filter(|o| *o < u64::MAX)
        .ok_or_else(|| StoreError::Corrupt(format!("stream offset {top} cannot grow")))?;
    if first > offset {
        return Err(StoreError::Corrupt(format!(
            "stream keeps offsets from {first} but its top is {top}"
        )));
    }
    let keep_from = match max_len {
        None => first,
        Some(max) => first.max((offset + 1).saturating_sub(max)),
    };
    let drop = (keep_from > first && first <= top).then(|| (first, (keep_from - 1).min(top)));
    Ok(AppendPlan {
        offset,
        first: keep_from,
        drop,
        store: keep_from <= offset,
    })
}

/// Whether a publication stamped `stamp_ms` has outlived `ttl_ms` at `now_ms`.
pub(crate) fn expired(stamp_ms: u64, ttl_ms: u64, now_ms: u64) -> bool {
    stamp_ms.saturating_add(ttl_ms) <= now_ms
}

/// The stamp for a new publication: the clock, but never earlier than the stream's previous
/// stamp. Stamps then never decrease along a stream, so expiry can stop at the first publication
/// that is still young, even if the wall clock stepped back.
pub(crate) fn stamp(now_ms: u64, last_ms: u64) -> u64 {
    now_ms.max(last_ms)
}

/// A new random epoch: 16 hex digits (64 bits), so a recreated stream practically never reuses
/// the epoch of the stream it replaces.
pub fn new_epoch() -> Result<String, StoreError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(epoch: &str, offset: u64) -> Position {
        Position {
            epoch: epoch.into(),
            offset,
        }
    }

    #[test]
    fn read_without_since_returns_the_latest() {
        // Stream keeps 4..=10.
        let p = plan_read("e", 10, 4, None, 100);
        assert_eq!(p.range, Some((4, 10)));
        assert!(p.complete);
        let p = plan_read("e", 10, 4, None, 3);
        assert_eq!(p.range, Some((8, 10)));
        assert!(!p.complete);
        let p = plan_read("e", 0, 1, None, 10);
        assert_eq!((p.range, p.complete), (None, true));
        let p = plan_read("e", 10, 4, None, 0);
        assert_eq!((p.range, p.complete), (None, false));
    }

    #[test]
    fn read_since_covers_gaps_epochs_and_limits() {
        // Middle, top, limit.
        assert_eq!(
            plan_read("e", 10, 4, Some(&pos("e", 6)), 100),
            ReadPlan {
                range: Some((7, 10)),
                complete: true
            }
        );
        assert_eq!(
            plan_read("e", 10, 4, Some(&pos("e", 10)), 100),
            ReadPlan {
                range: None,
                complete: true
            }
        );
        assert_eq!(
            plan_read("e", 10, 4, Some(&pos("e", 6)), 2),
            ReadPlan {
                range: Some((7, 8)),
                complete: false
            }
        );
        // Exactly at the edge of what is kept: no gap.
        assert!(plan_read("e", 10, 4, Some(&pos("e", 3)), 100).complete);
        // One publication trimmed away: what is left, but incomplete.
        assert_eq!(
            plan_read("e", 10, 4, Some(&pos("e", 2)), 100),
            ReadPlan {
                range: Some((4, 10)),
                complete: false
            }
        );
        // Everything trimmed (ttl emptied the stream) and the client missed some.
        assert_eq!(
            plan_read("e", 10, 11, Some(&pos("e", 8)), 100),
            ReadPlan {
                range: None,
                complete: false
            }
        );
        assert!(plan_read("e", 10, 11, Some(&pos("e", 10)), 100).complete);
        // Other epoch, or a position from the future.
        assert!(!plan_read("e", 10, 4, Some(&pos("x", 6)), 100).complete);
        assert_eq!(plan_read("e", 10, 4, Some(&pos("x", 6)), 100).range, None);
        assert!(!plan_read("e", 10, 4, Some(&pos("e", 11)), 100).complete);
        // Since 0 on a new stream.
        assert!(plan_read("e", 0, 1, Some(&pos("e", 0)), 100).complete);
    }

    #[test]
    fn append_trims_to_max_len() {
        let p = plan_append(0, 1, None).unwrap();
        assert_eq!((p.offset, p.first, p.drop, p.store), (1, 1, None, true));
        // Keeps 1..=3 with max 3: appending 4 drops 1.
        let p = plan_append(3, 1, Some(3)).unwrap();
        assert_eq!(
            (p.offset, p.first, p.drop, p.store),
            (4, 2, Some((1, 1)), true)
        );
        // Max lowered from large to 2: drops the excess in one go.
        let p = plan_append(10, 1, Some(2)).unwrap();
        assert_eq!((p.offset, p.first, p.drop), (11, 10, Some((1, 9))));
        // Max 0 keeps nothing, not even the new one.
        let p = plan_append(5, 4, Some(0)).unwrap();
        assert_eq!(
            (p.offset, p.first, p.drop, p.store),
            (6, 7, Some((4, 5)), false)
        );
        // Empty stream (all expired) stays consistent.
        let p = plan_append(5, 6, Some(3)).unwrap();
        assert_eq!((p.offset, p.first, p.drop, p.store), (6, 6, None, true));
        // Impossible values from disk are errors, not panics.
        assert!(plan_append(u64::MAX, 1, None).is_err());
        assert!(plan_append(3, 9, None).is_err());
    }

    #[test]
    fn expiry_and_stamps() {
        assert!(expired(1_000, 500, 1_500));
        assert!(!expired(1_000, 500, 1_499));
        assert!(!expired(u64::MAX - 1, 500, u64::MAX - 1));
        assert_eq!(stamp(100, 200), 200);
        assert_eq!(stamp(300, 200), 300);
    }

    #[test]
    fn epochs_are_random_hex() {
        let a = new_epoch().unwrap();
        let b = new_epoch().unwrap();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
