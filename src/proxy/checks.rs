//! Health checks: one prober for the process. Probes are scheduled per
//! host with a little jitter and run as non-blocking connects in the loop;
//! their results, with those of real connects, feed each host's health
//! record, and every up/down transition is logged once.
//!
//! Without `[upstream.health]`, only hosts that real traffic took down are
//! probed, until they come back; with it, every host is probed every interval.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use log::{info, warn};
use slab::Slab;

use super::Proxy;
use super::probe::{Outcome, Probe};
use super::timers::Timers;
use super::token::Registration;
use crate::pair::End;
use crate::policy::balance::HostId;
use crate::upstream::Upstream;

/// The prober's state: checks due, probes in flight, hosts gone down.
#[derive(Debug)]
pub(super) struct HealthChecks {
    /// Health probes in flight, and their deadlines.
    probes: Slab<Probe>,
    probe_timers: Timers,
    /// When each host's next check is due: (when, upstream, host). An entry
    /// is live while it matches the host's `check.next`.
    due: BinaryHeap<Reverse<(Instant, usize, HostId)>>,
    /// Hosts that went down this turn, whose pairs `close_on_down` closes.
    gone_down: Vec<(usize, HostId)>,
    /// State of the jitter generator for check intervals.
    jitter: u64,
    next_id: u64,
}

impl HealthChecks {
    pub fn new() -> HealthChecks {
        HealthChecks {
            probes: Slab::new(),
            probe_timers: Timers::default(),
            due: BinaryHeap::new(),
            gone_down: Vec::new(),
            jitter: jitter_seed(),
            next_id: 1,
        }
    }

    /// The earliest check or probe deadline.
    pub fn next_due(&self) -> Option<Instant> {
        let check = self.due.peek().map(|Reverse((at, _, _))| *at);
        match (check, self.probe_timers.next()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Spreads the first checks of an upstream's hosts over one interval.
    pub fn schedule_upstream(&mut self, u: &mut Upstream, upstream: usize, now: Instant) {
        if !u.health.active || u.removed {
            return;
        }
        let interval = u.health.interval;
        let ids: Vec<HostId> = u
            .balancer
            .hosts()
            .filter(|(_, h)| !h.removed)
            .map(|(id, _)| id)
            .collect();
        for host in ids {
            let offset = interval.mul_f64(self.random_fraction());
            self.schedule(u, upstream, host, now + offset);
        }
    }

    /// Makes the host's next check due at `at` (unless one is due sooner).
    fn schedule(&mut self, u: &mut Upstream, upstream: usize, host: HostId, at: Instant) {
        let check = &mut u.balancer.host_mut(host).check;
        if check.next.is_some_and(|due| due <= at) {
            return;
        }
        check.next = Some(at);
        self.due.push(Reverse((at, upstream, host)));
    }

    /// Schedules the next check after one interval (with jitter), if the
    /// host still needs checks: active checks, or down with passive ones.
    fn schedule_next(&mut self, u: &mut Upstream, upstream: usize, host: HostId, now: Instant) {
        if needs_checks(u, host) {
            let at = now + self.jittered(u.health.interval);
            self.schedule(u, upstream, host, at);
        }
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
}

/// Whether a host is to be checked at all: active checks of a live host,
/// or passive ones of a host that real traffic took down.
fn needs_checks(u: &Upstream, host: HostId) -> bool {
    let h = u.balancer.host(host);
    !u.removed && !h.removed && (u.health.active || !h.is_up())
}

impl Proxy {
    /// Starts the checks that are due and times out probes that are late.
    pub(super) fn run_checks(&mut self, now: Instant) {
        while let Some(&Reverse((due, upstream, host))) = self.checks.due.peek() {
            if due > now {
                break;
            }
            self.checks.due.pop();
            let u = &mut self.shared.upstreams[upstream];
            let check = &mut u.balancer.host_mut(host).check;
            if check.next != Some(due) {
                continue;
            }
            check.next = None;
            if needs_checks(u, host) && !u.balancer.host(host).check.probing {
                self.start_probe(upstream, host, now);
            }
        }
        while let Some((_, key, id)) = self.checks.probe_timers.pop_due(now) {
            if self.checks.probes.get(key).is_some_and(|p| p.id == id) {
                self.finish_probe(key, Outcome::Failed("timed out".into()), now);
            }
        }
        self.close_on_down(now);
    }

    fn start_probe(&mut self, upstream: usize, host: HostId, now: Instant) {
        let u = &self.shared.upstreams[upstream];
        let addr = u.balancer.host(host).addr;
        let deadline = now + u.health.timeout;
        let checks = &mut self.checks;
        let entry = checks.probes.vacant_entry();
        let key = entry.key();
        let id = checks.next_id;
        checks.next_id += 1;
        let token = Registration::Probe(key).token();
        match Probe::start(addr, upstream, host, id, self.worker.poll.registry(), token) {
            Ok(probe) => {
                entry.insert(probe);
                let u = &mut self.shared.upstreams[upstream];
                u.balancer.host_mut(host).check.probing = true;
                checks.probe_timers.push(deadline, key, id);
            }
            Err(e) => self.check_done(upstream, host, false, &format!("connect: {e}"), now),
        }
    }

    pub(super) fn on_probe_event(&mut self, key: usize, event: &mio::event::Event, now: Instant) {
        let Some(probe) = self.checks.probes.get_mut(key) else {
            return;
        };
        probe.on_event(event);
        let health = &self.shared.upstreams[probe.upstream].health;
        let outcome = probe.advance(health.send.as_deref(), health.expect.as_deref());
        if outcome != Outcome::Pending {
            self.finish_probe(key, outcome, now);
        }
    }

    fn finish_probe(&mut self, key: usize, outcome: Outcome, now: Instant) {
        let probe = self.checks.probes.remove(key);
        let (upstream, host) = (probe.upstream, probe.host);
        probe.close();
        let u = &mut self.shared.upstreams[upstream];
        u.balancer.host_mut(host).check.probing = false;
        match outcome {
            Outcome::Passed => self.check_done(upstream, host, true, "", now),
            Outcome::Failed(why) => self.check_done(upstream, host, false, &why, now),
            Outcome::Pending => {}
        }
    }

    /// Counts a check result, applies it, and schedules the next check.
    fn check_done(&mut self, upstream: usize, host: HostId, ok: bool, why: &str, now: Instant) {
        let counters = &mut self.shared.upstreams[upstream]
            .balancer
            .host_mut(host)
            .counters;
        if ok {
            counters.checks_passed += 1;
        } else {
            counters.checks_failed += 1;
        }
        self.host_result(upstream, host, ok, why, now);
        let u = &mut self.shared.upstreams[upstream];
        self.checks.schedule_next(u, upstream, host, now);
    }

    /// Feeds a check or real-connect result into the host's health; on a
    /// transition, logs it once and acts on it.
    pub(super) fn host_result(
        &mut self,
        upstream: usize,
        host: HostId,
        ok: bool,
        why: &str,
        now: Instant,
    ) {
        let u = &mut self.shared.upstreams[upstream];
        let (rise, fall) = (u.health.rise, u.health.fall);
        let Some(up) = u
            .balancer
            .record(host, ok, (rise, fall), u.health.slow_start, now)
        else {
            return;
        };
        let addr = u.balancer.host(host).addr;
        if up {
            info!("`{}`: host {addr} is up", u.name);
            return;
        }
        warn!("`{}`: host {addr} is down ({why})", u.name);
        if !u.health.active {
            // Only probes can bring it back: no real traffic goes to it now.
            self.checks.schedule_next(u, upstream, host, now);
        }
        if u.health.close_on_down {
            // Closed at the end of the turn, when no pair is mid-transition.
            self.checks.gone_down.push((upstream, host));
        }
    }

    /// Closes the connections of hosts that went down (with `close_on_down`).
    fn close_on_down(&mut self, now: Instant) {
        while let Some((upstream, host)) = self.checks.gone_down.pop() {
            if self.shared.upstreams[upstream].balancer.host(host).is_up() {
                continue;
            }
            let doomed: Vec<usize> = self
                .worker
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

    /// Schedules the checks of an upstream (at start, or when a reload
    /// changed them).
    pub(super) fn schedule_upstream_checks(&mut self, upstream: usize, now: Instant) {
        let u = &mut self.shared.upstreams[upstream];
        self.checks.schedule_upstream(u, upstream, now);
    }
}

/// A seed for check-interval jitter; any value that differs between runs will do.
fn jitter_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (u64::from(nanos) << 32 | u64::from(std::process::id())) | 1
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::policy::health::HealthSettings;

    fn checks() -> HealthChecks {
        let mut checks = HealthChecks::new();
        checks.jitter = 0x9E37_79B9_7F4A_7C15;
        checks
    }

    #[test]
    fn check_intervals_vary_by_at_most_ten_percent_either_way() {
        let mut checks = checks();
        let interval = Duration::from_secs(2);
        let gaps: Vec<Duration> = (0..10_000).map(|_| checks.jittered(interval)).collect();
        let (low, high) = (interval.mul_f64(0.9), interval.mul_f64(1.1));
        assert!(gaps.iter().all(|g| (low..=high).contains(g)));
        // And they do vary, over the whole window.
        let (min, max) = (gaps.iter().min().unwrap(), gaps.iter().max().unwrap());
        assert!(*min < interval.mul_f64(0.91) && *max > interval.mul_f64(1.09));
    }

    #[test]
    fn first_checks_are_spread_over_one_interval() {
        let hosts: Vec<SocketAddr> = (0..100u16)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i)))
            .collect();
        let health = HealthSettings {
            active: true,
            ..HealthSettings::default()
        };
        let interval = health.interval;
        let addr = "127.0.0.1:0".parse().unwrap();
        let mut upstream = Upstream::new("u".into(), addr, addr, hosts, false, health);
        let mut checks = checks();
        let t0 = Instant::now();
        checks.schedule_upstream(&mut upstream, 0, t0);
        let due: Vec<Duration> = checks
            .due
            .iter()
            .map(|Reverse((at, _, _))| at.duration_since(t0))
            .collect();
        assert_eq!(due.len(), 100);
        assert!(due.iter().all(|d| *d < interval));
        let (min, max) = (due.iter().min().unwrap(), due.iter().max().unwrap());
        assert!(
            *min < interval / 10 && *max > interval * 9 / 10,
            "{min:?}..{max:?}"
        );
    }
}
