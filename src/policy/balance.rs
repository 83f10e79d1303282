//! Each upstream's hosts, one [`Host`] record each (address, health, the
//! connections it handles, its counters), and the least-connections choice
//! among them. No I/O: `now` is passed in.
//!
//! The records are shared by every worker (`Arc`): a host's connection
//! count is one atomic that every worker's choice reads, so the fewest
//! connections are the fewest in the whole process, and a connection
//! counts from the moment its connect starts until the pair ends or the
//! connect fails. [`LoadBalancer::acquire`] hands out a [`HostLease`];
//! dropping it gives the connection back, so "released exactly once" is
//! the type's, not the caller's, business. These atomics are touched once
//! per connection, never per byte.
//!
//! Only hosts that are up and not removed are picked. Among them the
//! fewest active connections win; a host ramping up after coming back
//! (slow start) counts as if it had more, in proportion to how far into its
//! ramp it is. Ties rotate round-robin, so two idle hosts do not always
//! resolve to the first.
//!
//! A reload builds a new balancer that keeps the record of every host it
//! keeps (with its count, health and counters); a removed host's record
//! lives on, marked removed, while pairs still hold leases on it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::health::Health;

/// Index of a host within its upstream's [`LoadBalancer`].
pub(crate) type HostId = usize;

/// A slow-start weight is in thousandths; a fresh host starts at this share.
const RAMP_FLOOR: u64 = 50;
const FULL_WEIGHT: u64 = 1000;

/// What is counted about a host, for metrics.
#[derive(Debug, Default)]
pub(crate) struct HostCounters {
    /// Connections established to the host.
    pub connections: AtomicU64,
    pub connect_failures: AtomicU64,
    pub checks_passed: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Changes between up and down.
    pub transitions: AtomicU64,
}

impl HostCounters {
    /// Adds one to `counter`.
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a host's health checks stand (the prober's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CheckSchedule {
    /// When the next check is due (matches its timer entry), if scheduled.
    pub next: Option<Instant>,
    /// A probe is in flight.
    pub probing: bool,
}

/// Health and the slow-start ramp: changed together, under one lock,
/// only when a check or a connect reports a result.
#[derive(Debug, Default)]
struct HealthState {
    health: Health,
    /// Came back up at this instant and ramps up over the duration.
    ramp: Option<(Instant, Duration)>,
}

/// Everything about one host of an upstream: the one place for each fact.
#[derive(Debug)]
pub(crate) struct Host {
    pub addr: SocketAddr,
    /// Removed by a reload or by DNS: no new connections; its pairs drain.
    removed: AtomicBool,
    /// Mirrors `state.health`, for the choice to read without the lock.
    up: AtomicBool,
    /// A slow-start ramp may be in progress (`state.ramp`).
    ramping: AtomicBool,
    /// Connections counted against it (leases out).
    active: AtomicU32,
    state: Mutex<HealthState>,
    pub counters: HostCounters,
    pub check: Mutex<CheckSchedule>,
}

impl Host {
    fn new(addr: SocketAddr) -> Host {
        Host {
            addr,
            removed: AtomicBool::new(false),
            up: AtomicBool::new(true),
            ramping: AtomicBool::new(false),
            active: AtomicU32::new(0),
            state: Mutex::new(HealthState::default()),
            counters: HostCounters::default(),
            check: Mutex::new(CheckSchedule::default()),
        }
    }

    /// Connections the host is handling (connecting or relaying), in all workers.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Acquire)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Up and not removed: may receive new connections.
    fn eligible(&self) -> bool {
        self.is_up() && !self.is_removed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // A panic elsewhere cannot leave the streaks inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The check schedule, for the prober.
    pub fn schedule(&self) -> std::sync::MutexGuard<'_, CheckSchedule> {
        self.check.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Weight in thousandths: full, or the share reached in a slow start.
    fn weight(&self, now: Instant) -> u64 {
        if !self.ramping.load(Ordering::Acquire) {
            return FULL_WEIGHT;
        }
        let mut state = self.lock();
        let Some((since, over)) = state.ramp else {
            return FULL_WEIGHT;
        };
        let elapsed = now.saturating_duration_since(since).as_millis() as u64;
        let total = over.as_millis().max(1) as u64;
        if elapsed >= total {
            state.ramp = None;
            self.ramping.store(false, Ordering::Release);
            return FULL_WEIGHT;
        }
        (elapsed * FULL_WEIGHT / total).clamp(RAMP_FLOOR, FULL_WEIGHT)
    }

    /// Feeds a check or real-connect result into the host's health; returns
    /// the new state when it changed. Coming up with `slow_start` set, the
    /// host ramps up from a small share of connections to its full share.
    pub fn record(
        &self,
        ok: bool,
        (rise, fall): (u32, u32),
        slow_start: Option<Duration>,
        now: Instant,
    ) -> Option<bool> {
        let mut state = self.lock();
        let up = state.health.record(ok, rise, fall)?;
        HostCounters::count(&self.counters.transitions);
        state.ramp = if up {
            slow_start.filter(|d| !d.is_zero()).map(|d| (now, d))
        } else {
            None
        };
        self.ramping.store(state.ramp.is_some(), Ordering::Release);
        self.up.store(up, Ordering::Release);
        Some(up)
    }
}

impl Host {
    /// Ramps a host that joins a running upstream (added by a reload or
    /// by DNS) in over `over`, as one that comes back up is: from a small
    /// share of connections to its full share.
    pub fn ramp_in(&self, over: Duration, now: Instant) {
        if over.is_zero() {
            return;
        }
        let mut state = self.lock();
        state.ramp = Some((now, over));
        self.ramping.store(true, Ordering::Release);
    }
}

/// A connection counted against a host. Cannot be cloned; dropping it
/// gives the connection back.
#[must_use = "dropping a host lease gives its connection back at once"]
#[derive(Debug)]
pub(crate) struct HostLease {
    host: Arc<Host>,
}

impl HostLease {
    /// The host the connection counts against.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }
}

impl Drop for HostLease {
    fn drop(&mut self) {
        self.host.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The hosts of one upstream and the least-connections choice among them.
#[derive(Debug, Default)]
pub(crate) struct LoadBalancer {
    hosts: Vec<Arc<Host>>,
    /// Where the next scan for a least-loaded host starts: one past the host
    /// chosen last, which makes ties go round-robin.
    cursor: AtomicUsize,
}

impl LoadBalancer {
    /// Fresh records for `hosts`, all up.
    pub fn new(hosts: Vec<SocketAddr>) -> Self {
        LoadBalancer::reuse(&LoadBalancer::default(), &hosts)
    }

    /// The balancer for `hosts` after a reload: every host `old` already
    /// had keeps its record (count, health, counters); the others get new
    /// ones. Hosts of `old` not in `hosts` are marked removed.
    pub fn reuse(old: &LoadBalancer, hosts: &[SocketAddr]) -> Self {
        let records = hosts
            .iter()
            .map(|addr| match old.hosts.iter().find(|h| h.addr == *addr) {
                Some(kept) => {
                    kept.removed.store(false, Ordering::Release);
                    kept.clone()
                }
                None => Arc::new(Host::new(*addr)),
            })
            .collect();
        for gone in old.hosts.iter().filter(|h| !hosts.contains(&h.addr)) {
            gone.removed.store(true, Ordering::Release);
        }
        LoadBalancer {
            hosts: records,
            cursor: AtomicUsize::new(old.cursor.load(Ordering::Relaxed)),
        }
    }

    /// Marks every host removed (its upstream was): their pairs drain.
    pub fn retire_all(&self) {
        for host in &self.hosts {
            host.removed.store(true, Ordering::Release);
        }
    }

    /// The records of `old` that this balancer no longer has.
    pub fn dropped_from(&self, old: &LoadBalancer) -> Vec<Arc<Host>> {
        other_records(&old.hosts, &self.hosts)
    }

    /// The records of this balancer that `old` did not have: hosts that
    /// joined.
    pub fn joined_since(&self, old: &LoadBalancer) -> Vec<Arc<Host>> {
        other_records(&self.hosts, &old.hosts)
    }

    #[cfg(test)]
    pub fn host(&self, id: HostId) -> &Arc<Host> {
        &self.hosts[id]
    }

    /// Every record with its id.
    pub fn hosts(&self) -> impl Iterator<Item = (HostId, &Arc<Host>)> {
        self.hosts.iter().enumerate()
    }

    /// Hosts that may receive new connections.
    pub fn healthy(&self) -> usize {
        self.hosts.iter().filter(|h| h.eligible()).count()
    }

    /// The next candidate: among hosts that are up, not removed and not in
    /// `tried`, the one with the fewest active connections (scaled by its
    /// slow-start weight), ties broken round-robin. Call with the hosts
    /// already attempted for this client to walk the fallbacks in order;
    /// `None` once no eligible host is left.
    pub fn pick(&self, tried: &[SocketAddr], now: Instant) -> Option<HostId> {
        let n = self.hosts.len();
        let cursor = self.cursor.load(Ordering::Relaxed);
        let mut best: Option<(HostId, u64, u64)> = None;
        for offset in 0..n {
            let id = (cursor + offset) % n;
            let host = &self.hosts[id];
            if !host.eligible() || tried.contains(&host.addr) {
                continue;
            }
            let weight = host.weight(now);
            let load = u64::from(host.active()) + 1;
            // load / weight < best_load / best_weight, without division.
            let better = best.is_none_or(|(_, bl, bw)| load * bw < bl * weight);
            if better {
                best = Some((id, load, weight));
            }
        }
        let id = best?.0;
        self.cursor.store((id + 1) % n, Ordering::Relaxed);
        Some(id)
    }

    /// Counts a connection against `host`; call when its connect starts.
    pub fn acquire(&self, host: HostId) -> HostLease {
        let host = self.hosts[host].clone();
        host.active.fetch_add(1, Ordering::AcqRel);
        HostLease { host }
    }
}

/// The records of `these` that are not in `those`.
fn other_records(these: &[Arc<Host>], those: &[Arc<Host>]) -> Vec<Arc<Host>> {
    these
        .iter()
        .filter(|h| !those.iter().any(|n| Arc::ptr_eq(n, h)))
        .cloned()
        .collect()
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
    fn set(lb: &LoadBalancer, id: HostId, up: bool, slow_start: Option<Duration>, now: Instant) {
        lb.host(id).record(up, (1, 1), slow_start, now);
    }

    fn addr(lb: &LoadBalancer, id: HostId) -> SocketAddr {
        lb.host(id).addr
    }

    #[test]
    fn fewest_active_connections_wins() {
        let now = Instant::now();
        let lb = lb(3);
        let _held = [lb.acquire(0), lb.acquire(0), lb.acquire(1)];
        assert_eq!(lb.pick(&[], now), Some(2));
        let _more = [lb.acquire(2), lb.acquire(2)];
        assert_eq!(lb.pick(&[], now), Some(1));
    }

    #[test]
    fn ties_rotate_round_robin() {
        let now = Instant::now();
        let lb = lb(3);
        let firsts: Vec<_> = (0..6).map(|_| lb.pick(&[], now).unwrap()).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn two_idle_hosts_alternate_as_connections_come_and_go() {
        let now = Instant::now();
        let lb = lb(2);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let h = lb.pick(&[], now).unwrap();
            drop(lb.acquire(h));
            seen.push(h);
        }
        assert_eq!(seen, [0, 1, 0, 1]);
    }

    #[test]
    fn counts_follow_leases() {
        let lb = lb(2);
        let (a, b) = (lb.acquire(1), lb.acquire(1));
        assert_eq!((lb.host(0).active(), lb.host(1).active()), (0, 2));
        assert_eq!(a.host().addr, addr(&lb, 1));
        drop(a);
        assert_eq!((lb.host(0).active(), lb.host(1).active()), (0, 1));
        drop(b);
        assert_eq!(lb.host(1).active(), 0);
    }

    #[test]
    fn counts_are_shared_by_every_thread() {
        let lb = Arc::new(lb(2));
        let leases: Vec<HostLease> = (0..8)
            .map(|_| {
                let lb = lb.clone();
                std::thread::spawn(move || {
                    let h = lb.pick(&[], Instant::now()).unwrap();
                    lb.acquire(h)
                })
                .join()
                .unwrap()
            })
            .collect();
        assert_eq!((lb.host(0).active(), lb.host(1).active()), (4, 4));
        drop(leases);
        assert_eq!((lb.host(0).active(), lb.host(1).active()), (0, 0));
    }

    #[test]
    fn fallbacks_come_in_load_order_and_end() {
        let now = Instant::now();
        let lb = lb(3);
        let _held = [lb.acquire(0), lb.acquire(0), lb.acquire(1)];
        let (a0, a1, a2) = (addr(&lb, 0), addr(&lb, 1), addr(&lb, 2));
        assert_eq!(lb.pick(&[], now), Some(2));
        assert_eq!(lb.pick(&[a2], now), Some(1));
        assert_eq!(lb.pick(&[a2, a1], now), Some(0));
        assert_eq!(lb.pick(&[a2, a1, a0], now), None);
    }

    #[test]
    fn down_and_removed_hosts_get_nothing() {
        let now = Instant::now();
        let lb = lb(3);
        set(&lb, 0, false, None, now);
        let lb = LoadBalancer::reuse(&lb, &[addr(&lb, 0), addr(&lb, 1)]);
        assert_eq!(lb.healthy(), 1);
        for _ in 0..4 {
            assert_eq!(lb.pick(&[], now), Some(1));
        }
        set(&lb, 1, false, None, now);
        assert_eq!(lb.pick(&[], now), None);
        assert_eq!(lb.healthy(), 0);
        assert_eq!(lb.host(0).counters.transitions.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_reload_keeps_the_records_of_kept_hosts_and_marks_the_rest_removed() {
        let old = lb(2);
        let lease = old.acquire(1);
        set(&old, 0, false, None, Instant::now());
        let other = SocketAddr::from(([127, 0, 0, 1], 9100));
        let new = LoadBalancer::reuse(&old, &[addr(&old, 0), other]);
        assert!(!new.host(0).is_up(), "kept with its health");
        assert!(lease.host().is_removed(), "its pairs drain");
        assert_eq!(lease.host().active(), 1, "and still count");
        let back = LoadBalancer::reuse(&new, &[addr(&old, 0), addr(&old, 1)]);
        assert_eq!(back.host(1).active(), 0, "a host added again starts afresh");
        drop(lease);
    }

    #[test]
    fn a_host_that_joins_can_ramp_in() {
        let t0 = Instant::now();
        let ramp = Duration::from_secs(30);
        let old = lb(1);
        let _busy: Vec<_> = (0..10).map(|_| old.acquire(0)).collect();
        let other = SocketAddr::from(([127, 0, 0, 1], 9100));
        let new = LoadBalancer::reuse(&old, &[addr(&old, 0), other]);
        let joined = new.joined_since(&old);
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0].addr, other);
        assert!(old.joined_since(&new).is_empty() && new.dropped_from(&old).is_empty());
        joined[0].ramp_in(ramp, t0);
        // At 5% of its weight its 0 connections count as 20, above 11.
        assert_eq!(new.pick(&[], t0), Some(0));
        assert_eq!(new.pick(&[], t0 + ramp / 2), Some(1));
    }

    #[test]
    fn slow_start_ramps_a_returning_host_in() {
        let t0 = Instant::now();
        let ramp = Duration::from_secs(30);
        let lb = lb(2);
        set(&lb, 1, false, Some(ramp), t0);
        let _busy: Vec<_> = (0..10).map(|_| lb.acquire(0)).collect();
        set(&lb, 1, true, Some(ramp), t0);
        // Fresh: host 1 has 0 connections but only 5% of its weight, so it
        // counts as 20 while host 0 counts as 11.
        assert_eq!(lb.pick(&[], t0), Some(0));
        // Halfway: 0 connections at half weight count as 2, less than 11.
        assert_eq!(lb.pick(&[], t0 + ramp / 2), Some(1));
        // Plain least connections again once the ramp is over.
        let _ramped: Vec<_> = (0..10).map(|_| lb.acquire(1)).collect();
        assert_eq!(lb.pick(&[], t0 + ramp), Some(0));
    }
}
