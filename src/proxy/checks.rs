//! Health checks inside the loop: probes scheduled per host with a little
//! jitter, run as non-blocking connects, and their results (with those of
//! real connects) turned into up/down transitions, each logged once.
//!
//! Without `[upstream.health]`, only hosts that real traffic took down are
//! probed, until they come back; with it, every host is probed every interval.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::Proxy;
use crate::pair::End;
use crate::probe::{Outcome, Probe};
use crate::token::Source;

impl Proxy {
    /// Spreads the first checks of an upstream's hosts over one interval.
    pub(super) fn schedule_upstream_checks(&mut self, upstream: usize, now: Instant) {
        let u = &self.upstreams[upstream];
        if !u.health.active || u.removed {
            return;
        }
        let interval = u.health.interval;
        for host in 0..u.hosts.len() {
            if self.upstreams[upstream].balancer.is_removed(host) {
                continue;
            }
            let offset = interval.mul_f64(self.random_fraction());
            self.schedule_check(upstream, host, now + offset);
        }
    }

    /// Makes the host's next check due at `at` (unless one is due sooner).
    pub(super) fn schedule_check(&mut self, upstream: usize, host: usize, at: Instant) {
        let info = &mut self.upstreams[upstream].hosts[host];
        if info.next_check.is_some_and(|due| due <= at) {
            return;
        }
        info.next_check = Some(at);
        self.checks.push(Reverse((at, upstream, host)));
    }

    /// A number in [0, 1) from a xorshift generator (jitter needs no more).
    fn random_fraction(&mut self) -> f64 {
        let mut x = self.jitter;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The interval, 10 % either way, so hosts are not probed in lockstep.
    fn jittered(&mut self, interval: Duration) -> Duration {
        interval.mul_f64(0.9 + 0.2 * self.random_fraction())
    }

    /// Starts the checks that are due and times out probes that are late.
    pub(super) fn run_checks(&mut self, now: Instant) {
        while let Some(&Reverse((due, upstream, host))) = self.checks.peek() {
            if due > now {
                break;
            }
            self.checks.pop();
            let u = &mut self.upstreams[upstream];
            let info = &mut u.hosts[host];
            if info.next_check != Some(due) {
                continue;
            }
            info.next_check = None;
            let wanted = !u.removed
                && !u.balancer.is_removed(host)
                && (u.health.active || !info.health.is_up());
            if wanted && !info.probing {
                self.start_probe(upstream, host, now);
            }
        }
        while let Some((_, key, id)) = self.probe_timers.pop_due(now) {
            if self.probes.get(key).is_some_and(|p| p.id == id) {
                self.finish_probe(key, Outcome::Failed("timed out".into()), now);
            }
        }
        self.close_on_down(now);
    }

    fn start_probe(&mut self, upstream: usize, host: usize, now: Instant) {
        let u = &self.upstreams[upstream];
        let addr = u.balancer.addr(host);
        let deadline = now + u.health.timeout;
        let entry = self.probes.vacant_entry();
        let key = entry.key();
        let id = self.next_id;
        self.next_id += 1;
        let token = Source::Probe(key).token();
        match Probe::start(addr, upstream, host, id, self.poll.registry(), token) {
            Ok(probe) => {
                entry.insert(probe);
                self.upstreams[upstream].hosts[host].probing = true;
                self.probe_timers.push(deadline, key, id);
            }
            Err(e) => self.check_done(upstream, host, false, &format!("connect: {e}"), now),
        }
    }

    pub(super) fn on_probe_event(&mut self, key: usize, event: &mio::event::Event, now: Instant) {
        let Some(probe) = self.probes.get_mut(key) else {
            return;
        };
        probe.on_event(event);
        let health = &self.upstreams[probe.upstream].health;
        let outcome = probe.advance(health.send.as_deref(), health.expect.as_deref());
        if outcome != Outcome::Pending {
            self.finish_probe(key, outcome, now);
        }
    }

    fn finish_probe(&mut self, key: usize, outcome: Outcome, now: Instant) {
        let probe = self.probes.remove(key);
        let (upstream, host) = (probe.upstream, probe.host);
        probe.close();
        self.upstreams[upstream].hosts[host].probing = false;
        match outcome {
            Outcome::Passed => self.check_done(upstream, host, true, "", now),
            Outcome::Failed(why) => self.check_done(upstream, host, false, &why, now),
            Outcome::Pending => {}
        }
    }

    /// Counts a check result, applies it, and schedules the next check.
    fn check_done(&mut self, upstream: usize, host: usize, ok: bool, why: &str, now: Instant) {
        let info = &mut self.upstreams[upstream].hosts[host];
        if ok {
            info.checks_passed += 1;
        } else {
            info.checks_failed += 1;
        }
        self.host_result(upstream, host, ok, why, now);
        let u = &self.upstreams[upstream];
        if !u.removed && (u.health.active || !u.hosts[host].health.is_up()) {
            let at = now + self.jittered(self.upstreams[upstream].health.interval);
            self.schedule_check(upstream, host, at);
        }
    }

    /// Feeds a check or real-connect result into the host's health; on a
    /// transition, tells the balancer, logs it once, and acts on it.
    pub(super) fn host_result(
        &mut self,
        upstream: usize,
        host: usize,
        ok: bool,
        why: &str,
        now: Instant,
    ) {
        let u = &mut self.upstreams[upstream];
        let (rise, fall) = (u.health.rise, u.health.fall);
        let Some(up) = u.hosts[host].health.record(ok, rise, fall) else {
            return;
        };
        u.balancer.set_up(host, up, u.health.slow_start, now);
        let addr = u.balancer.addr(host);
        if up {
            info!("`{}`: host {addr} is up", u.name);
            return;
        }
        warn!("`{}`: host {addr} is down ({why})", u.name);
        if !u.health.active {
            // Only probes can bring it back: no real traffic goes to it now.
            let at = now + self.jittered(self.upstreams[upstream].health.interval);
            self.schedule_check(upstream, host, at);
        }
        if self.upstreams[upstream].health.close_on_down {
            // Closed at the end of the turn, when no pair is mid-transition.
            self.gone_down.push((upstream, host));
        }
    }

    /// Closes the connections of hosts that went down (with `close_on_down`).
    pub(super) fn close_on_down(&mut self, now: Instant) {
        while let Some((upstream, host)) = self.gone_down.pop() {
            if self.upstreams[upstream].balancer.is_up(host) {
                continue;
            }
            let doomed: Vec<usize> = self
                .pairs
                .iter()
                .filter(|(_, p)| p.upstream == upstream && p.host_id() == Some(host))
                .map(|(key, _)| key)
                .collect();
            for key in doomed {
                self.close(key, End::HostDown, now);
            }
        }
    }
}
