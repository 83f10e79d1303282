//! Each upstream's hosts, one [`Host`] record each (address, health, the
//! connections it handles, its counters and check schedule), and the
//! least-connections choice among them. Plain data with no I/O: `now` is
//! passed in.
//!
//! A connection counts against its host from the moment its connect starts
//! until the pair ends or the connect fails: [`LoadBalancer::acquire`]
//! hands out a [`HostLease`], and [`LoadBalancer::release`] consumes it.
//! Only hosts that are up and not removed are picked. Among them the fewest
//! active connections win; a host ramping up after coming back (slow
//! start) counts as if it had more, in proportion to how far into its ramp
//! it is. Ties rotate round-robin, so two idle hosts do not always resolve
//! to the first.
//!
//! Host ids are stable for the balancer's life: hosts removed by a reload
//! keep their record (and their count, while their pairs drain), and a
//! host added again reuses it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::health::Health;

/// Index of a host within its upstream's [`LoadBalancer`].
pub(crate) type HostId = usize;

/// A slow-start weight is in thousandths; a fresh host starts at this share.
const RAMP_FLOOR: u64 = 50;
const FULL_WEIGHT: u64 = 1000;

/// What is counted about a host, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HostCounters {
    /// Connections established to the host.
    pub connections: u64,
    pub connect_failures: u64,
    pub checks_passed: u64,
    pub checks_failed: u64,
    /// Changes between up and down.
    pub transitions: u64,
}

/// Where a host's health checks stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CheckSchedule {
    /// When the next check is due (matches its timer entry), if scheduled.
    pub next: Option<Instant>,
    /// A probe is in flight.
    pub probing: bool,
}

/// Everything about one host of an upstream: the one place for each fact.
#[derive(Debug, Clone)]
pub(crate) struct Host {
    pub addr: SocketAddr,
    /// Removed by a reload: no new connections; its pairs drain.
    pub removed: bool,
    /// Up or down, and the streaks that decide it.
    health: Health,
    /// Came back up at this instant and ramps up over the duration.
    ramp: Option<(Instant, Duration)>,
    /// Connections counted against it (leases out).
    active: u32,
    pub counters: HostCounters,
    pub check: CheckSchedule,
}

impl Host {
    fn new(addr: SocketAddr) -> Host {
        Host {
            addr,
            removed: false,
            health: Health::default(),
            ramp: None,
            active: 0,
            counters: HostCounters::default(),
            check: CheckSchedule::default(),
        }
    }

    /// Connections the host is handling (connecting or relaying).
    pub fn active(&self) -> u32 {
        self.active
    }

    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// Up and not removed: may receive new connections.
    fn eligible(&self) -> bool {
        self.is_up() && !self.removed
    }

    /// Weight in thousandths: full, or the share reached in a slow start.
    fn weight(&self, now: Instant) -> u64 {
        match self.ramp {
            Some((since, over)) => {
                let elapsed = now.saturating_duration_since(since).as_millis() as u64;
                let total = over.as_millis().max(1) as u64;
                (elapsed * FULL_WEIGHT / total).clamp(RAMP_FLOOR, FULL_WEIGHT)
            }
            None => FULL_WEIGHT,
        }
    }
}

/// A connection counted against a host. Cannot be cloned;
/// [`LoadBalancer::release`] consumes it.
#[must_use = "a host lease must be given back with LoadBalancer::release"]
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct HostLease {
    host: HostId,
}

impl HostLease {
    /// The host the connection counts against.
    pub fn host(&self) -> HostId {
        self.host
    }
}

impl Drop for HostLease {
    fn drop(&mut self) {
        super::lease_dropped("host");
    }
}

/// The hosts of one upstream and the least-connections choice among them.
#[derive(Debug, Clone)]
pub(crate) struct LoadBalancer {
    hosts: Vec<Host>,
    /// Where the next scan for a least-loaded host starts: one past the host
    /// chosen last, which makes ties go round-robin.
    cursor: usize,
}

impl LoadBalancer {
    /// All hosts start up.
    pub fn new(hosts: Vec<SocketAddr>) -> Self {
        let mut lb = LoadBalancer {
            hosts: Vec::with_capacity(hosts.len()),
            cursor: 0,
        };
        for addr in hosts {
            lb.add(addr);
        }
        lb
    }

    /// Records, including removed hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn host(&self, id: HostId) -> &Host {
        &self.hosts[id]
    }

    pub fn host_mut(&mut self, id: HostId) -> &mut Host {
        &mut self.hosts[id]
    }

    /// Every record with its id, removed hosts included.
    pub fn hosts(&self) -> impl Iterator<Item = (HostId, &Host)> {
        self.hosts.iter().enumerate()
    }

    /// Hosts that may receive new connections.
    pub fn healthy(&self) -> usize {
        self.hosts.iter().filter(|h| h.eligible()).count()
    }

    /// Adds a host (up), or brings a removed one back; returns its id.
    pub fn add(&mut self, addr: SocketAddr) -> HostId {
        if let Some(id) = self.hosts.iter().position(|h| h.addr == addr) {
            self.hosts[id].removed = false;
            return id;
        }
        self.hosts.push(Host::new(addr));
        self.hosts.len() - 1
    }

    /// Stops giving the host new connections; its pairs drain.
    pub fn remove(&mut self, id: HostId) {
        self.hosts[id].removed = true;
    }

    /// Feeds a check or real-connect result into the host's health; returns
    /// the new state when it changed. Coming up with `slow_start` set, the
    /// host ramps up from a small share of connections to its full share.
    pub fn record(
        &mut self,
        id: HostId,
        ok: bool,
        (rise, fall): (u32, u32),
        slow_start: Option<Duration>,
        now: Instant,
    ) -> Option<bool> {
        let host = &mut self.hosts[id];
        let up = host.health.record(ok, rise, fall)?;
        host.counters.transitions += 1;
        host.ramp = if up {
            slow_start.filter(|d| !d.is_zero()).map(|d| (now, d))
        } else {
            None
        };
        Some(up)
    }

    /// The next candidate: among hosts that are up, not removed and not in
    /// `tried`, the one with the fewest active connections (scaled by its
    /// slow-start weight), ties broken round-robin. Call with the hosts
    /// already attempted for this client to walk the fallbacks in order;
    /// `None` once no eligible host is left.
    pub fn pick(&mut self, tried: &[HostId], now: Instant) -> Option<HostId> {
        let n = self.hosts.len();
        let mut best: Option<(HostId, u64)> = None;
        for offset in 0..n {
            let id = (self.cursor + offset) % n;
            let host = &self.hosts[id];
            if !host.eligible() || tried.contains(&id) {
                continue;
            }
            let weight = host.weight(now);
            let load = u64::from(host.active) + 1;
            // load / weight < best_load / best_weight, without division.
            let better = best
                .is_none_or(|(b, bw)| load * bw < (u64::from(self.hosts[b].active) + 1) * weight);
            if better {
                best = Some((id, weight));
            }
        }
        let id = best?.0;
        self.cursor = (id + 1) % n;
        Some(id)
    }

    /// Counts a connection against `host`; call when its connect starts.
    pub fn acquire(&mut self, host: HostId) -> HostLease {
        self.hosts[host].active += 1;
        HostLease { host }
    }

    /// Gives back a connection counted by [`acquire`](Self::acquire).
    pub fn release(&mut self, lease: HostLease) {
        let host = &mut self.hosts[lease.host];
        host.active = host.active.saturating_sub(1);
        std::mem::forget(lease);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(n: u16) -> LoadBalancer {
        LoadBalancer::new(
            (1..=n)
                .map(|p| SocketAddr::from(([127, 0, 0, 1], 9000 + p)))
                .collect(),
        )
    }

    /// Takes a host down (fall 1) or up (rise 1).
    fn set(
        lb: &mut LoadBalancer,
        id: HostId,
        up: bool,
        slow_start: Option<Duration>,
        now: Instant,
    ) {
        lb.record(id, up, (1, 1), slow_start, now);
    }

    #[test]
    fn fewest_active_connections_wins() {
        let now = Instant::now();
        let mut lb = lb(3);
        let held = [lb.acquire(0), lb.acquire(0), lb.acquire(1)];
        assert_eq!(lb.pick(&[], now), Some(2));
        let more = [lb.acquire(2), lb.acquire(2)];
        assert_eq!(lb.pick(&[], now), Some(1));
        for lease in held.into_iter().chain(more) {
            lb.release(lease);
        }
    }

    #[test]
    fn ties_rotate_round_robin() {
        let now = Instant::now();
        let mut lb = lb(3);
        let firsts: Vec<_> = (0..6).map(|_| lb.pick(&[], now).unwrap()).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn two_idle_hosts_alternate_as_connections_come_and_go() {
        let now = Instant::now();
        let mut lb = lb(2);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let h = lb.pick(&[], now).unwrap();
            let lease = lb.acquire(h);
            seen.push(h);
            lb.release(lease);
        }
        assert_eq!(seen, [0, 1, 0, 1]);
    }

    #[test]
    fn counts_follow_leases() {
        let mut lb = lb(2);
        let (a, b) = (lb.acquire(1), lb.acquire(1));
        assert_eq!((lb.host(0).active(), lb.host(1).active()), (0, 2));
        assert_eq!(a.host(), 1);
        lb.release(a);
        assert_eq!((lb.host(0).active(), lb.host(1).active()), (0, 1));
        lb.release(b);
        assert_eq!(lb.host(1).active(), 0);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "dropped, not given back")]
    fn a_lease_dropped_instead_of_released_fails_loudly() {
        let mut lb = lb(1);
        let _ = lb.acquire(0);
    }

    #[test]
    fn fallbacks_come_in_load_order_and_end() {
        let now = Instant::now();
        let mut lb = lb(3);
        let held = [lb.acquire(0), lb.acquire(0), lb.acquire(1)];
        assert_eq!(lb.pick(&[], now), Some(2));
        assert_eq!(lb.pick(&[2], now), Some(1));
        assert_eq!(lb.pick(&[2, 1], now), Some(0));
        assert_eq!(lb.pick(&[2, 1, 0], now), None);
        for lease in held {
            lb.release(lease);
        }
    }

    #[test]
    fn single_host_is_always_chosen() {
        let now = Instant::now();
        let mut lb = lb(1);
        let lease = lb.acquire(0);
        assert_eq!(lb.pick(&[], now), Some(0));
        assert_eq!(lb.pick(&[0], now), None);
        lb.release(lease);
    }

    #[test]
    fn down_and_removed_hosts_get_nothing() {
        let now = Instant::now();
        let mut lb = lb(3);
        set(&mut lb, 0, false, None, now);
        lb.remove(2);
        assert_eq!(lb.healthy(), 1);
        for _ in 0..4 {
            assert_eq!(lb.pick(&[], now), Some(1));
        }
        set(&mut lb, 1, false, None, now);
        assert_eq!(lb.pick(&[], now), None);
        assert_eq!(lb.healthy(), 0);
        assert_eq!(lb.host(0).counters.transitions, 1);
    }

    #[test]
    fn removed_hosts_keep_their_record_and_can_come_back() {
        let now = Instant::now();
        let mut lb = lb(2);
        let lease = lb.acquire(1);
        lb.remove(1);
        assert_eq!(
            lb.host(1).active(),
            1,
            "its pairs still count while they drain"
        );
        let new = lb.add(SocketAddr::from(([127, 0, 0, 1], 9100)));
        assert_eq!(new, 2);
        assert_eq!(lb.add(lb.host(1).addr), 1, "re-added in place");
        assert!(!lb.host(1).removed);
        lb.release(lease);
        assert_eq!(lb.pick(&[], now).map(|h| lb.host(h).active()), Some(0));
    }

    #[test]
    fn slow_start_ramps_a_returning_host_in() {
        let t0 = Instant::now();
        let ramp = Duration::from_secs(30);
        let mut lb = lb(2);
        set(&mut lb, 1, false, Some(ramp), t0);
        let busy: Vec<_> = (0..10).map(|_| lb.acquire(0)).collect();
        set(&mut lb, 1, true, Some(ramp), t0);
        // Fresh: host 1 has 0 connections but only 5% of its weight, so it
        // counts as 20 while host 0 counts as 11.
        assert_eq!(lb.pick(&[], t0), Some(0));
        // Halfway: 0 connections at half weight count as 2, less than 11.
        assert_eq!(lb.pick(&[], t0 + ramp / 2), Some(1));
        // Plain least connections again once the ramp is over.
        let ramped: Vec<_> = (0..10).map(|_| lb.acquire(1)).collect();
        assert_eq!(lb.pick(&[], t0 + ramp), Some(0));
        for lease in busy.into_iter().chain(ramped) {
            lb.release(lease);
        }
    }
}
