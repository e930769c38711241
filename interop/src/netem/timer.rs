//! A pure timer queue: items released at their instant, FIFO among equal instants.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::Instant;

struct Entry<T> {
    at: Instant,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Items waiting for their instant. No I/O, no clock: the caller sleeps until
/// [`poll_timeout`](Self::poll_timeout) and then drains [`pop_expired`](Self::pop_expired).
pub struct TimerQueue<T> {
    heap: BinaryHeap<Reverse<Entry<T>>>,
    next_seq: u64,
}

impl<T> Default for TimerQueue<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            next_seq: 0,
        }
    }
}

impl<T> std::fmt::Debug for TimerQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerQueue")
            .field("len", &self.heap.len())
            .field("next", &self.poll_timeout())
            .finish()
    }
}

impl<T> TimerQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedules `item` for `at`. Items with equal instants come out in push order.
    pub fn push(&mut self, at: Instant, item: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Reverse(Entry { at, seq, item }));
    }

    /// The earliest instant at which an item is due, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(e)| e.at)
    }

    /// The next item due at or before `now`, if any.
    pub fn pop_expired(&mut self, now: Instant) -> Option<T> {
        if self.poll_timeout()? <= now {
            self.heap.pop().map(|Reverse(e)| e.item)
        } else {
            None
        }
    }

    /// Number of waiting items.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn releases_in_time_order_and_fifo_on_ties() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut q = TimerQueue::new();
        q.push(t0 + ms(20), "c");
        q.push(t0 + ms(10), "a");
        q.push(t0 + ms(10), "b");
        assert_eq!(q.poll_timeout(), Some(t0 + ms(10)));
        assert_eq!(q.pop_expired(t0 + ms(9)), None);
        assert_eq!(q.pop_expired(t0 + ms(10)), Some("a"));
        assert_eq!(q.pop_expired(t0 + ms(10)), Some("b"));
        assert_eq!(q.pop_expired(t0 + ms(10)), None);
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop_expired(t0 + ms(30)), Some("c"));
        assert!(q.is_empty());
        assert_eq!(q.poll_timeout(), None);
    }
}
