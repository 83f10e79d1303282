//! Log lines about conditions that anyone on the network can make
//! frequent (failed handshakes, refusals, exhausted descriptors): at most
//! one line per period, saying how often it happened since the last one.

use std::time::{Duration, Instant};

/// At most one log line per period about a recurring condition.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    last: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    const PERIOD: Duration = Duration::from_secs(1);

    /// `Some(times since the last line)` when a line may be logged now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::PERIOD)
        {
            self.unlogged += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_with_the_count_of_the_rest() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.allow(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(t.allow(t0 + Duration::from_millis(100 * i)), None);
        }
        assert_eq!(t.allow(t0 + Duration::from_secs(1)), Some(5));
        assert_eq!(t.allow(t0 + Duration::from_millis(1500)), None);
    }
}
