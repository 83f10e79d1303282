//! Host health: the settings of `[upstream.health]` and the up/down state
//! machine every host runs. Pure policy, unit-testable without sockets; the
//! loop runs the probes (`probe.rs`) and feeds results in, along with
//! passive results from real connects.
//!
//! A host goes down after `fall` consecutive failures and comes back after
//! `rise` consecutive successes; any other result only resets the opposite
//! streak, so a host failing one check in three with rise 2 / fall 3 never
//! changes state.

use std::time::Duration;

/// Health settings of one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// Active probes of every host (`[upstream.health]` present). Without
    /// them, only hosts taken down by failed real connects are probed, to
    /// bring them back.
    pub active: bool,
    /// Time between two checks of a host.
    pub interval: Duration,
    /// A check not passed by then has failed.
    pub timeout: Duration,
    /// Consecutive passed checks that bring a down host back up.
    pub rise: u32,
    /// Consecutive failures (checks or real connects) that take a host down.
    pub fall: u32,
    /// Bytes a probe sends once connected.
    pub send: Option<Vec<u8>>,
    /// Bytes the answer must contain for the probe to pass.
    pub expect: Option<Vec<u8>>,
    /// Close a host's connections when it goes down.
    pub close_on_down: bool,
    /// Ramp a host back in over this long after it comes up.
    pub slow_start: Option<Duration>,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            active: false,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            send: None,
            expect: None,
            close_on_down: false,
            slow_start: None,
        }
    }
}

/// One host's health state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    up: bool,
    successes: u32,
    failures: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: true,
            successes: 0,
            failures: 0,
        }
    }
}

impl Health {
    #[cfg(test)]
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records a check (or a real connect) result; returns the new state
    /// when it changed.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= rise.max(1) {
                self.up = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= fall.max(1) {
                self.up = false;
                return Some(false);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(h: &mut Health, results: &[bool]) -> Vec<Option<bool>> {
        results.iter().map(|&ok| h.record(ok, 2, 3)).collect()
    }

    #[test]
    fn down_after_fall_failures_up_after_rise_successes() {
        let mut h = Health::default();
        assert_eq!(run(&mut h, &[false, false]), [None, None]);
        assert!(h.is_up());
        assert_eq!(h.record(false, 2, 3), Some(false));
        assert_eq!(run(&mut h, &[false, true]), [None, None]);
        assert!(!h.is_up());
        assert_eq!(h.record(true, 2, 3), Some(true));
        assert!(h.is_up());
    }

    #[test]
    fn a_host_failing_one_check_in_three_never_flaps() {
        let mut h = Health::default();
        let pattern: Vec<bool> = (0..300).map(|i| i % 3 != 2).collect();
        assert!(run(&mut h, &pattern).iter().all(Option::is_none));
        assert!(h.is_up());
        // Same from the down state: two successes in a row bring it up, so
        // start from "down" with a pattern that never has two in a row.
        let mut h = Health::default();
        for _ in 0..3 {
            h.record(false, 2, 3);
        }
        let pattern: Vec<bool> = (0..300).map(|i| i % 2 == 0).collect();
        assert!(run(&mut h, &pattern).iter().all(Option::is_none));
        assert!(!h.is_up());
    }

    #[test]
    fn streaks_reset_on_the_other_result() {
        let mut h = Health::default();
        assert_eq!(run(&mut h, &[false, false, true, false, false]), [None; 5]);
        assert!(h.is_up());
    }
}
