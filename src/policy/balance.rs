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
//! Only hosts that are up, not removed and below their `max_connections`
//! are picked. Among them the fewest active connections per unit of
//! weight win: host `a` beats `b` when `(active_a + 1) / weight_a <
//! (active_b + 1) / weight_b`, compared as `(active_a + 1) * weight_b <
//! (active_b + 1) * weight_a` in integers (the `+ 1` is the connection
//! being placed, so an idle weight-3 host takes three before an idle
//! weight-1 host takes its second). A host ramping up after coming back
//! (slow start) has its weight scaled by how far into its ramp it is.
//! Ties rotate round-robin, so two idle hosts do not always resolve to
//! the first.
//!
//! A host's cap is exact across workers: a lease is taken with a
//! compare-exchange on the host's count that fails once the count has
//! reached the cap, so two workers racing for a host's last slot cannot
//! both get it (the loser moves on to the next candidate). Weight and cap
//! live in the shared record, so a reload that changes them changes them
//! for every worker and every pair at once.
//!
//! A lease that ends, and a host that comes up, tell the upstream's
//! [`WaitQueue`], which wakes the workers whose clients wait for a slot.
//!
//! A reload (or a DNS answer) builds a new balancer that keeps the record
//! of every host it keeps (with its count, health and counters, and the
//! weight and cap it is now given); a removed host's record lives on,
//! marked removed, while pairs still hold leases on it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::health::Health;
use super::queue::WaitQueue;
use crate::config::HostConfig;

/// Index of a host within its upstream's [`LoadBalancer`].
pub(crate) type HostId = usize;

/// A slow-start ramp is in thousandths of the host's weight; a fresh host
/// starts at this share.
const RAMP_FLOOR: u64 = 50;
const FULL_RAMP: u64 = 1000;
/// `max` of a host without a cap of its own.
const NO_CAP: u32 = u32::MAX;

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
    /// Connections counted against it (leases out); never above `max`.
    active: AtomicU32,
    /// Its configured weight (1 to 1000) and cap ([`NO_CAP`] for none):
    /// set at start and by reloads, read once per connection.
    weight: AtomicU32,
    max: AtomicU32,
    state: Mutex<HealthState>,
    pub counters: HostCounters,
    pub check: Mutex<CheckSchedule>,
    /// The clients of its upstream waiting for a slot, told when one frees.
    queue: Arc<WaitQueue>,
}

impl Host {
    fn new(config: &HostConfig, queue: Arc<WaitQueue>) -> Host {
        let host = Host {
            addr: config.addr,
            removed: AtomicBool::new(false),
            up: AtomicBool::new(true),
            ramping: AtomicBool::new(false),
            active: AtomicU32::new(0),
            weight: AtomicU32::new(HostConfig::DEFAULT_WEIGHT),
            max: AtomicU32::new(NO_CAP),
            state: Mutex::new(HealthState::default()),
            counters: HostCounters::default(),
            check: Mutex::new(CheckSchedule::default()),
            queue,
        };
        host.configure(config);
        host
    }

    /// Takes the weight and cap of `config` (at start, and on a reload
    /// that keeps the host).
    fn configure(&self, config: &HostConfig) {
        self.weight.store(config.weight.max(1), Ordering::Release);
        let max = config.max_connections.unwrap_or(NO_CAP);
        self.max.store(max, Ordering::Release);
    }

    /// Connections the host is handling (connecting or relaying), in all
    /// workers. Sequentially consistent, like every change of the count:
    /// the wait queue relies on it (see [`WaitQueue`]).
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::SeqCst)
    }

    /// Its configured weight.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Acquire)
    }

    /// Its cap, if it has one.
    pub fn max_connections(&self) -> Option<u32> {
        Some(self.max.load(Ordering::Acquire)).filter(|&max| max != NO_CAP)
    }

    /// Up (sequentially consistent, as a waiting client's retry reads it).
    fn up_now(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Counts a connection against the host if its count is still `seen`,
    /// the count the choice was made on (and it is below its cap): one
    /// compare-exchange, so neither the cap nor the choice is undone by
    /// another worker taking a slot in between.
    fn try_lease(self: &Arc<Self>, seen: u32) -> Take {
        let max = self.max.load(Ordering::Acquire);
        if seen >= max {
            return Take::Full;
        }
        match self
            .active
            .compare_exchange(seen, seen + 1, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Take::Taken(HostLease { host: self.clone() }),
            Err(now) if now >= max => Take::Full,
            Err(_) => Take::Moved,
        }
    }

    /// Counts a connection against the host unless it is at its cap,
    /// whatever its count now.
    fn lease_below_cap(self: &Arc<Self>) -> Option<HostLease> {
        let max = self.max.load(Ordering::Acquire);
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(HostLease { host: self.clone() })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Up and not removed: may receive new connections.
    fn eligible(&self) -> bool {
        self.up_now() && !self.is_removed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // A panic elsewhere cannot leave the streaks inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The check schedule, for the prober.
    pub fn schedule(&self) -> std::sync::MutexGuard<'_, CheckSchedule> {
        self.check.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Its weight as the choice uses it: the configured weight times the
    /// share reached in a slow start, in thousandths.
    fn share(&self, now: Instant) -> u64 {
        u64::from(self.weight()) * self.ramp(now)
    }

    /// How far into a slow start it is, in thousandths ([`FULL_RAMP`]
    /// without one).
    fn ramp(&self, now: Instant) -> u64 {
        if !self.ramping.load(Ordering::Acquire) {
            return FULL_RAMP;
        }
        let mut state = self.lock();
        let Some((since, over)) = state.ramp else {
            return FULL_RAMP;
        };
        let elapsed = now.saturating_duration_since(since).as_millis() as u64;
        let total = over.as_millis().max(1) as u64;
        if elapsed >= total {
            state.ramp = None;
            self.ramping.store(false, Ordering::Release);
            return FULL_RAMP;
        }
        (elapsed * FULL_RAMP / total).clamp(RAMP_FLOOR, FULL_RAMP)
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
        self.up.store(up, Ordering::SeqCst);
        drop(state);
        if up {
            // Clients waiting for a slot may take one of this host's.
            self.queue.slot_freed();
        }
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
        self.host.active.fetch_sub(1, Ordering::SeqCst);
        self.host.queue.slot_freed();
    }
}

/// Why no host could be leased for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoHost {
    /// No host is left that is up, not removed and not tried already.
    Unavailable,
    /// Hosts are left, but every one is at its `max_connections`.
    Full,
}

/// The hosts of one upstream and the least-connections choice among them.
#[derive(Debug)]
pub(crate) struct LoadBalancer {
    hosts: Vec<Arc<Host>>,
    /// Where the next scan for a least-loaded host starts: one past the host
    /// chosen last, which makes ties go round-robin.
    cursor: AtomicUsize,
    /// Its clients waiting for a slot (kept across reloads).
    queue: Arc<WaitQueue>,
}

impl LoadBalancer {
    /// Fresh records for `hosts`, all up, whose waiting clients are in `queue`.
    pub fn new(hosts: &[HostConfig], queue: Arc<WaitQueue>) -> Self {
        let empty = LoadBalancer {
            hosts: Vec::new(),
            cursor: AtomicUsize::new(0),
            queue,
        };
        LoadBalancer::reuse(&empty, hosts)
    }

    /// [`new`](Self::new) with a queue of one worker that wakes nobody.
    #[cfg(test)]
    pub fn unqueued(hosts: &[HostConfig]) -> Self {
        let silent = Arc::new(super::queue::Silent);
        LoadBalancer::new(hosts, Arc::new(WaitQueue::new(1, silent)))
    }

    /// The clients waiting for one of its hosts' slots.
    pub fn queue(&self) -> &Arc<WaitQueue> {
        &self.queue
    }

    /// The balancer for `hosts` after a reload: every host `old` already
    /// had keeps its record (count, health, counters) and takes its new
    /// weight and cap; the others get new ones. Hosts of `old` not in
    /// `hosts` are marked removed.
    pub fn reuse(old: &LoadBalancer, hosts: &[HostConfig]) -> Self {
        let records = hosts
            .iter()
            .map(
                |config| match old.hosts.iter().find(|h| h.addr == config.addr) {
                    Some(kept) => {
                        kept.configure(config);
                        kept.removed.store(false, Ordering::Release);
                        kept.clone()
                    }
                    None => Arc::new(Host::new(config, old.queue.clone())),
                },
            )
            .collect();
        for gone in old
            .hosts
            .iter()
            .filter(|h| !hosts.iter().any(|c| c.addr == h.addr))
        {
            gone.removed.store(true, Ordering::Release);
        }
        LoadBalancer {
            hosts: records,
            cursor: AtomicUsize::new(old.cursor.load(Ordering::Relaxed)),
            queue: old.queue.clone(),
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

    /// A lease on the best host for a client that has already tried the
    /// hosts in `tried`: among hosts that are up, not removed, not tried
    /// and below their cap, the one with the fewest active connections per
    /// unit of weight (scaled by its slow-start ramp), ties broken
    /// round-robin. Call again with the failed host added to `tried` to
    /// walk the fallbacks in order.
    pub fn lease(&self, tried: &[SocketAddr], now: Instant) -> Result<HostLease, NoHost> {
        // Hosts whose last slot another worker took between our look at
        // their count and our compare-exchange (rare: allocated only then).
        let mut raced: Vec<HostId> = Vec::new();
        let mut moved = 0;
        loop {
            let (best, full) = self.choose(tried, &raced, now);
            let Some((id, seen)) = best else {
                return Err(if full || !raced.is_empty() {
                    NoHost::Full
                } else {
                    NoHost::Unavailable
                });
            };
            let host = &self.hosts[id];
            // Another worker took a slot of this host since we counted: the
            // choice is made again on the new counts, so two workers picking
            // at once do not both land on the same host. Bounded, so a
            // storm of such races still makes progress.
            let take = match host.try_lease(seen) {
                Take::Moved if moved < MAX_RECHOICES => {
                    moved += 1;
                    continue;
                }
                Take::Moved => host.lease_below_cap().map_or(Take::Full, Take::Taken),
                take => take,
            };
            match take {
                Take::Taken(lease) => {
                    self.cursor
                        .store((id + 1) % self.hosts.len(), Ordering::Relaxed);
                    return Ok(lease);
                }
                Take::Full | Take::Moved => raced.push(id),
            }
        }
    }

    /// The best candidate not in `tried` nor `skip`, and whether a host
    /// was passed over for being at its cap.
    fn choose(
        &self,
        tried: &[SocketAddr],
        skip: &[HostId],
        now: Instant,
    ) -> (Option<(HostId, u32)>, bool) {
        let n = self.hosts.len();
        let cursor = self.cursor.load(Ordering::Relaxed);
        let mut best: Option<(HostId, u64, u64, u32)> = None;
        let mut full = false;
        for offset in 0..n {
            let id = (cursor + offset) % n;
            let host = &self.hosts[id];
            if !host.eligible() || tried.contains(&host.addr) || skip.contains(&id) {
                continue;
            }
            let active = host.active();
            if active >= host.max.load(Ordering::Acquire) {
                full = true;
                continue;
            }
            let share = host.share(now);
            let load = u64::from(active) + 1;
            // load / share < best_load / best_share, without division:
            // at most 2^32 * 10^6 each side, far within u64.
            let better = best.is_none_or(|(_, bl, bs, _)| load * bs < bl * share);
            if better {
                best = Some((id, load, share, active));
            }
        }
        (best.map(|(id, _, _, active)| (id, active)), full)
    }

    /// The next candidate's id, as [`lease`](Self::lease) would choose it,
    /// without taking it.
    #[cfg(test)]
    pub fn pick(&self, tried: &[SocketAddr], now: Instant) -> Option<HostId> {
        let (id, _) = self.choose(tried, &[], now).0?;
        self.cursor
            .store((id + 1) % self.hosts.len(), Ordering::Relaxed);
        Some(id)
    }

    /// Counts a connection against `host` whatever its cap, for tests
    /// that set up a load.
    #[cfg(test)]
    pub fn acquire(&self, host: HostId) -> HostLease {
        let host = self.hosts[host].clone();
        host.active.fetch_add(1, Ordering::SeqCst);
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

/// What an attempt to take a slot of a host found.
enum Take {
    Taken(HostLease),
    /// Its count changed since the choice was made.
    Moved,
    /// At its cap.
    Full,
}

/// How often one lease makes its choice again because another worker took
/// a slot of the chosen host in between, before it takes that host anyway.
const MAX_RECHOICES: u32 = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn host(port: u16) -> HostConfig {
        SocketAddr::from(([127, 0, 0, 1], 9000 + port)).into()
    }

    fn lb(n: u16) -> LoadBalancer {
        LoadBalancer::unqueued(&(1..=n).map(host).collect::<Vec<_>>())
    }

    /// Hosts with these weights and caps.
    fn weighted(hosts: &[(u32, Option<u32>)]) -> LoadBalancer {
        let configs: Vec<HostConfig> = (1..)
            .zip(hosts)
            .map(|(port, &(weight, max_connections))| HostConfig {
                weight,
                max_connections,
                ..host(port)
            })
            .collect();
        LoadBalancer::unqueued(&configs)
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
        let lb = LoadBalancer::reuse(&lb, &[addr(&lb, 0).into(), addr(&lb, 1).into()]);
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
        let new = LoadBalancer::reuse(&old, &[addr(&old, 0).into(), other.into()]);
        assert!(!new.host(0).is_up(), "kept with its health");
        assert!(lease.host().is_removed(), "its pairs drain");
        assert_eq!(lease.host().active(), 1, "and still count");
        let back = LoadBalancer::reuse(&new, &[addr(&old, 0).into(), addr(&old, 1).into()]);
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
        let new = LoadBalancer::reuse(&old, &[addr(&old, 0).into(), other.into()]);
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

    #[test]
    fn weights_share_connections_in_proportion() {
        let now = Instant::now();
        let lb = weighted(&[(1, None), (3, None)]);
        let held: Vec<HostLease> = (0..8).map(|_| lb.lease(&[], now).unwrap()).collect();
        assert_eq!((lb.host(0).active(), lb.host(1).active()), (2, 6));
        // Ranked by active / weight: 2/1 against 6/3 is a tie, which
        // rotates; one more each way keeps the proportion.
        let more: Vec<HostLease> = (0..4).map(|_| lb.lease(&[], now).unwrap()).collect();
        assert_eq!((lb.host(0).active(), lb.host(1).active()), (3, 9));
        drop((held, more));
        assert_eq!((lb.host(0).active(), lb.host(1).active()), (0, 0));
    }

    #[test]
    fn equal_weights_still_rotate_their_ties() {
        let now = Instant::now();
        let lb = weighted(&[(5, None), (5, None), (5, None)]);
        let firsts: Vec<_> = (0..6).map(|_| lb.pick(&[], now).unwrap()).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_host_at_its_cap_is_skipped_and_then_every_host_is_full() {
        let now = Instant::now();
        let lb = weighted(&[(1, Some(1)), (1, Some(2))]);
        let held: Vec<HostLease> = (0..3).map(|_| lb.lease(&[], now).unwrap()).collect();
        assert_eq!((lb.host(0).active(), lb.host(1).active()), (1, 2));
        assert_eq!(lb.lease(&[], now).unwrap_err(), NoHost::Full);
        // A failed host tried already is not full: nothing is left.
        let tried = [addr(&lb, 0), addr(&lb, 1)];
        assert_eq!(lb.lease(&tried, now).unwrap_err(), NoHost::Unavailable);
        drop(held);
        assert!(lb.lease(&[], now).is_ok());
    }

    #[test]
    fn a_cap_holds_when_threads_race_for_the_last_slots() {
        let lb = Arc::new(weighted(&[(1, Some(5)), (1, Some(5))]));
        let start = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (lb, start) = (lb.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    (0..100)
                        .filter_map(|_| lb.lease(&[], Instant::now()).ok())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let leases: Vec<HostLease> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(leases.len(), 10);
        assert_eq!((lb.host(0).active(), lb.host(1).active()), (5, 5));
    }

    #[test]
    fn a_reload_changes_weight_and_cap_in_place() {
        let now = Instant::now();
        let lb = weighted(&[(1, None), (1, Some(1))]);
        let held = lb.lease(&[], now).unwrap();
        let mut changed = host(2);
        changed.weight = 4;
        changed.max_connections = Some(3);
        let new = LoadBalancer::reuse(&lb, &[host(1), changed]);
        assert!(Arc::ptr_eq(new.host(1), lb.host(1)), "the same record");
        assert_eq!(
            (lb.host(1).weight(), lb.host(1).max_connections()),
            (4, Some(3))
        );
        assert_eq!(new.host(0).max_connections(), None);
        drop(held);
    }

    #[test]
    fn a_choice_overtaken_by_another_lease_is_made_again() {
        // The interleaving of two workers, by hand: one chooses a host on
        // its count, another leases that host, then the first tries it.
        let now = Instant::now();
        let lb = lb(2);
        let (chosen, seen) = lb.choose(&[], &[], now).0.unwrap();
        let other = lb.lease(&[], now).unwrap();
        assert_eq!(other.host().addr, lb.host(chosen).addr);
        assert!(matches!(lb.hosts[chosen].try_lease(seen), Take::Moved));
        // Chosen again on the counts as they are: the other host.
        let mine = lb.lease(&[], now).unwrap();
        assert_ne!(mine.host().addr, other.host().addr);
    }

    #[test]
    fn workers_leasing_at_once_stay_within_one_of_each_other() {
        // Four threads take leases at the same time, as four workers
        // would: each choice is checked against the count it was made on,
        // so however they interleave, two hosts never differ by more than
        // one (without that check, two threads that read the same counts
        // both land on one host).
        let now = Instant::now();
        for round in 0..200 {
            let lb = Arc::new(lb(2));
            let start = Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let (lb, start) = (lb.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        (0..25)
                            .map(|_| lb.lease(&[], now).unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            let held: Vec<Vec<HostLease>> =
                threads.into_iter().map(|t| t.join().unwrap()).collect();
            let (a, b) = (lb.host(0).active(), lb.host(1).active());
            assert_eq!(a + b, 100);
            assert!(a.abs_diff(b) <= 1, "round {round}: {a} and {b}");
            drop(held);
        }
    }
}
