//! Health checks: one prober for the process, on the control thread.
//! Probes are scheduled per host with a little jitter and run as
//! non-blocking connects; their results, like those of the workers' real
//! connects, feed each host's shared health record, and every up/down
//! transition is logged once.
//!
//! Without `[upstream.health]`, only hosts that real traffic took down are
//! probed, until they come back; with it, every host is probed every interval.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::control::Control;
use super::probe::{Outcome, Probe};
use super::timers::Timers;
use super::token::Registration;
use super::worker::{Order, log_transition};
use crate::policy::balance::{Host, HostCounters};
use crate::upstream::Upstream;

/// A check that is due: when, and the host with its upstream.
#[derive(Debug)]
struct Due {
    at: Instant,
    upstream: Arc<Upstream>,
    host: Arc<Host>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Due) -> bool {
        self.at == other.at
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Due) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Due) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

/// The prober's state: checks due, probes in flight.
#[derive(Debug)]
pub(super) struct HealthChecks {
    /// Health probes in flight, and their deadlines.
    probes: Slab<(Probe, Arc<Upstream>, Arc<Host>)>,
    probe_timers: Timers,
    /// When each host's next check is due. An entry is live while it
    /// matches the host's schedule.
    due: BinaryHeap<Reverse<Due>>,
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
            jitter: jitter_seed(),
            next_id: 1,
        }
    }

    /// The earliest check or probe deadline.
    pub fn next_due(&self) -> Option<Instant> {
        let check = self.due.peek().map(|Reverse(d)| d.at);
        match (check, self.probe_timers.next()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Spreads the first checks of an upstream's hosts over one interval.
    pub fn schedule_upstream(&mut self, u: &Arc<Upstream>, now: Instant) {
        if !u.health.active {
            return;
        }
        for (_, host) in u.balancer.hosts() {
            let offset = u.health.interval.mul_f64(self.random_fraction());
            self.schedule(u, host, now + offset);
        }
    }

    /// Spreads the first checks of the hosts of `u` that have none (they
    /// joined it by a reload or by DNS) over one interval.
    pub fn schedule_joined(&mut self, u: &Arc<Upstream>, now: Instant) {
        if !u.health.active {
            return;
        }
        for (_, host) in u.balancer.hosts() {
            let unscheduled = {
                let check = host.schedule();
                check.next.is_none() && !check.probing
            };
            if unscheduled {
                let offset = u.health.interval.mul_f64(self.random_fraction());
                self.schedule(u, host, now + offset);
            }
        }
    }

    /// Makes the host's next check due at `at` (unless one is due sooner).
    fn schedule(&mut self, u: &Arc<Upstream>, host: &Arc<Host>, at: Instant) {
        let mut check = host.schedule();
        if check.next.is_some_and(|due| due <= at) {
            return;
        }
        check.next = Some(at);
        self.due.push(Reverse(Due {
            at,
            upstream: u.clone(),
            host: host.clone(),
        }));
    }

    /// Schedules the next check after one interval (with jitter), if the
    /// host still needs checks.
    fn schedule_next(&mut self, u: &Arc<Upstream>, host: &Arc<Host>, now: Instant) {
        if needs_checks(u, host) {
            let at = now + self.jittered(u.health.interval);
            self.schedule(u, host, at);
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
fn needs_checks(u: &Upstream, host: &Host) -> bool {
    !host.is_removed() && (u.health.active || !host.is_up())
}

impl Control {
    /// Starts the checks that are due and times out probes that are late.
    pub(super) fn run_checks(&mut self, now: Instant) {
        while self.checks.due.peek().is_some_and(|Reverse(d)| d.at <= now) {
            let Some(Reverse(due)) = self.checks.due.pop() else {
                break;
            };
            {
                let mut check = due.host.schedule();
                if check.next != Some(due.at) {
                    continue;
                }
                check.next = None;
                if !needs_checks(&due.upstream, &due.host) || check.probing {
                    continue;
                }
            }
            self.start_probe(due.upstream, due.host, now);
        }
        while let Some((_, key, id)) = self.checks.probe_timers.pop_due(now) {
            if self
                .checks
                .probes
                .get(key)
                .is_some_and(|(p, _, _)| p.id == id)
            {
                self.finish_probe(key, Outcome::Failed("timed out".into()), now);
            }
        }
    }

    fn start_probe(&mut self, upstream: Arc<Upstream>, host: Arc<Host>, now: Instant) {
        let deadline = now + upstream.health.timeout;
        let checks = &mut self.checks;
        let entry = checks.probes.vacant_entry();
        let key = entry.key();
        let id = checks.next_id;
        checks.next_id += 1;
        let token = Registration::Probe(key).token();
        match Probe::start(host.addr, id, self.poll.registry(), token) {
            Ok(probe) => {
                host.schedule().probing = true;
                entry.insert((probe, upstream, host));
                checks.probe_timers.push(deadline, key, id);
            }
            Err(e) => self.check_done(&upstream, &host, false, &format!("connect: {e}"), now),
        }
    }

    pub(super) fn on_probe_event(&mut self, key: usize, event: &mio::event::Event, now: Instant) {
        let Some((probe, upstream, _)) = self.checks.probes.get_mut(key) else {
            return;
        };
        probe.on_event(event);
        let health = &upstream.health;
        let outcome = probe.advance(upstream.probe_send.as_deref(), health.expect.as_deref());
        if outcome != Outcome::Pending {
            self.finish_probe(key, outcome, now);
        }
    }

    fn finish_probe(&mut self, key: usize, outcome: Outcome, now: Instant) {
        let (probe, upstream, host) = self.checks.probes.remove(key);
        probe.close();
        host.schedule().probing = false;
        match outcome {
            Outcome::Passed => self.check_done(&upstream, &host, true, "", now),
            Outcome::Failed(why) => self.check_done(&upstream, &host, false, &why, now),
            Outcome::Pending => {}
        }
    }

    /// Counts a check result, applies it, and schedules the next check.
    fn check_done(
        &mut self,
        u: &Arc<Upstream>,
        host: &Arc<Host>,
        ok: bool,
        why: &str,
        now: Instant,
    ) {
        let c = &host.counters;
        HostCounters::count(if ok {
            &c.checks_passed
        } else {
            &c.checks_failed
        });
        let h = &u.health;
        if let Some(up) = host.record(ok, (h.rise, h.fall), h.slow_start, now) {
            log_transition(u, host, up, why);
            self.transitioned(u, host, up, now);
        }
        self.checks.schedule_next(u, host, now);
    }

    /// A worker's real connects took a host up or down.
    pub(super) fn host_changed(
        &mut self,
        upstream: usize,
        host: &Arc<Host>,
        up: bool,
        now: Instant,
    ) {
        let snapshot = self.shared.snapshot();
        if let Some(u) = snapshot.upstream(upstream).cloned() {
            self.transitioned(&u, host, up, now);
        }
    }

    /// Acts on a transition: a host down without active checks gets probed
    /// (no real traffic goes to it now); with `close_on_down`, every worker
    /// closes its connections.
    fn transitioned(&mut self, u: &Arc<Upstream>, host: &Arc<Host>, up: bool, now: Instant) {
        if up {
            return;
        }
        if !u.health.active {
            self.checks.schedule_next(u, host, now);
        }
        if u.health.close_on_down {
            for w in &self.workers {
                w.send(Order::CloseHost(host.clone()));
            }
        }
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
    use crate::config::{RefusalMode, UpstreamConfig};
    use crate::policy::balance::LoadBalancer;
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
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let config = UpstreamConfig {
            name: "u".into(),
            listen: addr,
            hosts: hosts.iter().map(|&h| h.into()).collect(),
            names: Vec::new(),
            tls: false,
            health,
            refusal: RefusalMode::default(),
            queue_timeout: None,
            max_queued: None,
            send_proxy: None,
            accept_proxy: Vec::new(),
        };
        let upstream = Arc::new(Upstream::new(
            0,
            &config,
            addr,
            LoadBalancer::unqueued(&config.hosts),
        ));
        let mut checks = checks();
        let t0 = Instant::now();
        checks.schedule_upstream(&upstream, t0);
        let due: Vec<Duration> = checks
            .due
            .iter()
            .map(|Reverse(due)| due.at.duration_since(t0))
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
