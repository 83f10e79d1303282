//! Deadlines owned by the loop: a min-heap of (when, pair key, pair id).
//!
//! A pair has at most one *live* entry: the one whose `when` equals the
//! pair's `scheduled` field. Activity only pushes a pair's deadline later, so
//! it costs nothing here; when the entry comes due the loop compares it with
//! the pair's current deadline and either acts or pushes a fresh entry.
//! Entries whose pair is gone (or whose slot now holds another pair, told
//! apart by id) or that were superseded by an earlier deadline are skipped.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
}

impl Timers {
    pub fn push(&mut self, when: Instant, key: usize, id: u64) {
        self.heap.push(Reverse((when, key, id)));
    }

    /// The earliest deadline, live or stale.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((when, _, _))| *when)
    }

    /// Removes and returns an entry that is due at `now`, earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize, u64)> {
        match self.heap.peek() {
            Some(Reverse((when, _, _))) if *when <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn due_entries_come_out_earliest_first_and_only_when_due() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.push(t0 + Duration::from_secs(3), 1, 10);
        timers.push(t0 + Duration::from_secs(1), 2, 20);
        timers.push(t0 + Duration::from_secs(2), 3, 30);
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(timers.pop_due(t0), None);
        let now = t0 + Duration::from_secs(2);
        assert_eq!(timers.pop_due(now).map(|e| e.1), Some(2));
        assert_eq!(timers.pop_due(now).map(|e| e.1), Some(3));
        assert_eq!(timers.pop_due(now), None);
        assert_eq!(
            timers.pop_due(t0 + Duration::from_secs(3)).map(|e| e.1),
            Some(1)
        );
    }
}
