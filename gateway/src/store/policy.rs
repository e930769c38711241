//! I/O-free decisions of the log: segment rolling, retention and interval flushing. Every
//! function takes the time as an argument; none reads a clock.

use std::time::{Duration, Instant};

/// Should a batch of `batch_bytes` whose first record has `batch_ts` go to a new segment?
///
/// An empty segment never rolls (so a batch larger than `segment_bytes` still lands in one
/// segment, with one write). Age is measured on record timestamps: the segment rolls once the
/// batch is `segment_age` or more past the segment's first record.
pub(crate) fn should_roll(
    seg_size: u64,
    seg_first_ts: Option<u64>,
    batch_bytes: u64,
    batch_ts: u64,
    segment_bytes: u64,
    segment_age: Option<Duration>,
) -> bool {
    if seg_size == 0 {
        return false;
    }
    if seg_size.saturating_add(batch_bytes) > segment_bytes {
        return true;
    }
    match (segment_age, seg_first_ts) {
        (Some(age), Some(first)) => batch_ts.saturating_sub(first) >= duration_ms(age),
        _ => false,
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What retention needs to know about one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentInfo {
    /// Bytes in the segment.
    pub(crate) size: u64,
    /// Largest record timestamp, `None` for an empty segment.
    pub(crate) max_ts: Option<u64>,
}

/// What retention decided for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RetentionPlan {
    /// Delete this many of the oldest segments.
    pub(crate) delete: usize,
    /// The active (last) segment is among them: roll a fresh one first.
    pub(crate) roll_active: bool,
}

/// Chooses the oldest segments to delete (whole segments only, oldest first, stopping at the
/// first one that is kept).
///
/// - By bytes: a segment goes if the partition still holds at least `retention_bytes` without
///   it. The active segment is never deleted for size.
/// - By age: a non-empty segment goes if its newest record is older than `retention_age` at
///   `now_ms` (ms since the Unix epoch). The active segment may go too: the caller then rolls a
///   fresh empty segment first, so the partition keeps its `next` offset.
pub(crate) fn plan_retention(
    segments: &[SegmentInfo],
    retention_bytes: Option<u64>,
    retention_age: Option<Duration>,
    now_ms: u64,
) -> RetentionPlan {
    let mut total: u64 = segments.iter().map(|s| s.size).sum();
    let mut delete = 0;
    for (i, seg) in segments.iter().enumerate() {
        let active = i + 1 == segments.len();
        let by_bytes = !active && retention_bytes.is_some_and(|limit| total - seg.size >= limit);
        let by_age = match (retention_age, seg.max_ts) {
            (Some(age), Some(ts)) => now_ms.saturating_sub(ts) > duration_ms(age),
            _ => false,
        };
        if !(by_bytes || by_age) {
            break;
        }
        total -= seg.size;
        delete += 1;
    }
    RetentionPlan {
        delete,
        roll_active: delete == segments.len() && delete > 0,
    }
}

/// Flush deadline of one partition under `Durability::Interval`.
///
/// The first write after a flush arms the deadline `interval` later; later writes keep it, so
/// every acknowledged byte is fsynced at most `interval` after it was written (plus the
/// driver's lateness).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FlushClock {
    deadline: Option<Instant>,
}

impl FlushClock {
    /// A write happened at `now`.
    pub(crate) fn on_write(&mut self, now: Instant, interval: Duration) {
        if self.deadline.is_none() {
            self.deadline = Some(now + interval);
        }
    }

    /// When the pending data must be fsynced, if any is pending.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Is an fsync due at `now`?
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now)
    }

    /// Everything written so far is being fsynced: disarm.
    pub(crate) fn on_flush_started(&mut self) {
        self.deadline = None;
    }

    /// The fsync failed at `now`: retry at once.
    pub(crate) fn on_flush_failed(&mut self, now: Instant) {
        self.deadline = Some(self.deadline.map_or(now, |d| d.min(now)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roll_by_size_and_age() {
        let age = Some(Duration::from_secs(10));
        assert!(
            !should_roll(0, None, 10_000, 0, 100, None),
            "empty segment never rolls"
        );
        assert!(!should_roll(50, Some(0), 50, 0, 100, None));
        assert!(should_roll(50, Some(0), 51, 0, 100, None));
        assert!(!should_roll(50, Some(1_000), 10, 10_999, 100, age));
        assert!(should_roll(50, Some(1_000), 10, 11_000, 100, age));
        assert!(
            !should_roll(50, Some(5_000), 10, 1_000, 100, age),
            "timestamps going back"
        );
    }

    fn segs(v: &[(u64, Option<u64>)]) -> Vec<SegmentInfo> {
        v.iter()
            .map(|&(size, max_ts)| SegmentInfo { size, max_ts })
            .collect()
    }

    #[test]
    fn retention_by_bytes_keeps_active() {
        let s = segs(&[
            (100, Some(1)),
            (100, Some(2)),
            (100, Some(3)),
            (40, Some(4)),
        ]);
        assert_eq!(plan_retention(&s, Some(1_000), None, 0).delete, 0);
        assert_eq!(plan_retention(&s, Some(240), None, 0).delete, 1);
        assert_eq!(plan_retention(&s, Some(140), None, 0).delete, 2);
        // Even a limit of 0 keeps the active segment.
        assert_eq!(
            plan_retention(&s, Some(0), None, 0),
            RetentionPlan {
                delete: 3,
                roll_active: false
            }
        );
    }

    #[test]
    fn retention_by_age_may_roll_active() {
        let s = segs(&[(100, Some(1_000)), (100, Some(5_000)), (100, Some(9_000))]);
        let age = Some(Duration::from_secs(2));
        assert_eq!(plan_retention(&s, None, age, 3_000).delete, 0);
        assert_eq!(plan_retention(&s, None, age, 3_001).delete, 1);
        assert_eq!(plan_retention(&s, None, age, 10_000).delete, 2);
        assert_eq!(
            plan_retention(&s, None, age, 20_000),
            RetentionPlan {
                delete: 3,
                roll_active: true
            }
        );
        // Stops at the first kept segment even if a later one is old (timestamps unordered).
        let s = segs(&[(100, Some(9_000)), (100, Some(1_000)), (1, None)]);
        assert_eq!(plan_retention(&s, None, age, 10_000).delete, 0);
        // An empty active segment is never "expired".
        let s = segs(&[(100, Some(1_000)), (0, None)]);
        assert_eq!(
            plan_retention(&s, None, age, 50_000),
            RetentionPlan {
                delete: 1,
                roll_active: false
            }
        );
    }

    #[test]
    fn flush_clock() {
        let t0 = Instant::now();
        let iv = Duration::from_millis(5);
        let mut c = FlushClock::default();
        assert!(!c.due(t0 + Duration::from_secs(1)));
        c.on_write(t0, iv);
        c.on_write(t0 + Duration::from_millis(3), iv);
        assert_eq!(c.deadline(), Some(t0 + iv));
        assert!(!c.due(t0 + Duration::from_millis(4)));
        assert!(c.due(t0 + iv));
        c.on_flush_started();
        assert_eq!(c.deadline(), None);
        c.on_flush_failed(t0 + Duration::from_millis(6));
        assert!(c.due(t0 + Duration::from_millis(6)));
    }
}
