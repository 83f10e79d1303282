//! Least-connections host choice for one upstream: a plain data structure
//! with no I/O, unit-testable without sockets (`now` is passed in).
//!
//! Invariants: `active` of a host is the number of pairs whose connect to it
//! has started and which have not yet released it; the loop acquires before
//! the connect syscall and releases exactly once (connect failure or pair
//! end). Only hosts that are up and not removed are picked. Among them the
//! fewest active connections win; a host ramping up after coming back
//! (slow start) counts as if it had more, in proportion to how far into its
//! ramp it is. Ties rotate round-robin, so two idle hosts do not always
//! resolve to the first.
//!
//! Host ids are stable for the balancer's life: hosts removed by a reload
//! keep their slot (and their count, while their pairs drain), and a host
//! added again reuses it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Index of a host within its upstream's [`LoadBalancer`].
pub type HostId = usize;

/// A slow-start weight is in thousandths; a fresh host starts at this share.
const RAMP_FLOOR: u64 = 50;
const FULL_WEIGHT: u64 = 1000;

#[derive(Debug, Clone)]
struct HostSlot {
    addr: SocketAddr,
    active: u32,
    up: bool,
    removed: bool,
    /// Came back up at this instant and ramps up over the duration.
    ramp: Option<(Instant, Duration)>,
}

/// The hosts of one upstream and the connections each is handling.
#[derive(Debug, Clone)]
pub struct LoadBalancer {
    hosts: Vec<HostSlot>,
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

    /// Slots, including removed hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn addr(&self, host: HostId) -> SocketAddr {
        self.hosts[host].addr
    }

    /// Connections the host is handling (connecting or relaying).
    pub fn active(&self, host: HostId) -> u32 {
        self.hosts[host].active
    }

    pub fn is_up(&self, host: HostId) -> bool {
        self.hosts[host].up
    }

    pub fn is_removed(&self, host: HostId) -> bool {
        self.hosts[host].removed
    }

    /// Hosts that may receive new connections.
    pub fn healthy(&self) -> usize {
        self.hosts.iter().filter(|h| h.up && !h.removed).count()
    }

    /// The slot of `addr`, if it has one (removed or not).
    pub fn find(&self, addr: SocketAddr) -> Option<HostId> {
        self.hosts.iter().position(|h| h.addr == addr)
    }

    /// Adds a host (up), or brings a removed one back; returns its id.
    pub fn add(&mut self, addr: SocketAddr) -> HostId {
        if let Some(id) = self.find(addr) {
            self.hosts[id].removed = false;
            return id;
        }
        self.hosts.push(HostSlot {
            addr,
            active: 0,
            up: true,
            removed: false,
            ramp: None,
        });
        self.hosts.len() - 1
    }

    /// Stops giving the host new connections; its pairs drain.
    pub fn remove(&mut self, host: HostId) {
        self.hosts[host].removed = true;
    }

    /// Marks the host up or down. Coming up with `slow_start` set, it ramps
    /// up from a small share of connections to its full share.
    pub fn set_up(&mut self, host: HostId, up: bool, slow_start: Option<Duration>, now: Instant) {
        let slot = &mut self.hosts[host];
        if up && !slot.up {
            slot.ramp = slow_start.filter(|d| !d.is_zero()).map(|d| (now, d));
        }
        slot.up = up;
    }

    /// Weight in thousandths: full, or the share reached in a slow start.
    fn weight(&self, host: HostId, now: Instant) -> u64 {
        match self.hosts[host].ramp {
            Some((since, over)) => {
                let elapsed = now.saturating_duration_since(since).as_millis() as u64;
                let total = over.as_millis().max(1) as u64;
                (elapsed * FULL_WEIGHT / total).clamp(RAMP_FLOOR, FULL_WEIGHT)
            }
            None => FULL_WEIGHT,
        }
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
            let slot = &self.hosts[id];
            if !slot.up || slot.removed || tried.contains(&id) {
                continue;
            }
            let weight = self.weight(id, now);
            let load = u64::from(slot.active) + 1;
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
    pub fn acquire(&mut self, host: HostId) {
        self.hosts[host].active += 1;
    }

    /// Releases a connection counted by [`acquire`](Self::acquire).
    pub fn release(&mut self, host: HostId) {
        let slot = &mut self.hosts[host];
        debug_assert!(slot.active > 0, "release without acquire on {}", slot.addr);
        slot.active = slot.active.saturating_sub(1);
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

    #[test]
    fn fewest_active_connections_wins() {
        let now = Instant::now();
        let mut lb = lb(3);
        lb.acquire(0);
        lb.acquire(0);
        lb.acquire(1);
        assert_eq!(lb.pick(&[], now), Some(2));
        lb.acquire(2);
        lb.acquire(2);
        assert_eq!(lb.pick(&[], now), Some(1));
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
            lb.acquire(h);
            seen.push(h);
            lb.release(h);
        }
        assert_eq!(seen, [0, 1, 0, 1]);
    }

    #[test]
    fn counts_follow_acquire_and_release() {
        let mut lb = lb(2);
        lb.acquire(1);
        lb.acquire(1);
        assert_eq!((lb.active(0), lb.active(1)), (0, 2));
        lb.release(1);
        assert_eq!((lb.active(0), lb.active(1)), (0, 1));
        lb.release(1);
        assert_eq!(lb.active(1), 0);
    }

    #[test]
    fn fallbacks_come_in_load_order_and_end() {
        let now = Instant::now();
        let mut lb = lb(3);
        lb.acquire(0);
        lb.acquire(0);
        lb.acquire(1);
        assert_eq!(lb.pick(&[], now), Some(2));
        assert_eq!(lb.pick(&[2], now), Some(1));
        assert_eq!(lb.pick(&[2, 1], now), Some(0));
        assert_eq!(lb.pick(&[2, 1, 0], now), None);
    }

    #[test]
    fn single_host_is_always_chosen() {
        let now = Instant::now();
        let mut lb = lb(1);
        lb.acquire(0);
        assert_eq!(lb.pick(&[], now), Some(0));
        assert_eq!(lb.pick(&[0], now), None);
    }

    #[test]
    fn down_and_removed_hosts_get_nothing() {
        let now = Instant::now();
        let mut lb = lb(3);
        lb.set_up(0, false, None, now);
        lb.remove(2);
        assert_eq!(lb.healthy(), 1);
        for _ in 0..4 {
            assert_eq!(lb.pick(&[], now), Some(1));
        }
        lb.set_up(1, false, None, now);
        assert_eq!(lb.pick(&[], now), None);
        assert_eq!(lb.healthy(), 0);
    }

    #[test]
    fn removed_hosts_keep_their_slot_and_can_come_back() {
        let now = Instant::now();
        let mut lb = lb(2);
        lb.acquire(1);
        lb.remove(1);
        assert_eq!(lb.active(1), 1, "its pairs still count while they drain");
        let new = lb.add(SocketAddr::from(([127, 0, 0, 1], 9100)));
        assert_eq!(new, 2);
        assert_eq!(lb.add(lb.addr(1)), 1, "re-added in place");
        assert!(!lb.is_removed(1));
        lb.release(1);
        assert_eq!(lb.pick(&[], now).map(|h| lb.active(h)), Some(0));
    }

    #[test]
    fn slow_start_ramps_a_returning_host_in() {
        let t0 = Instant::now();
        let ramp = Duration::from_secs(30);
        let mut lb = lb(2);
        lb.set_up(1, false, Some(ramp), t0);
        for _ in 0..10 {
            lb.acquire(0);
        }
        lb.set_up(1, true, Some(ramp), t0);
        // Fresh: host 1 has 0 connections but only 5% of its weight, so it
        // counts as 20 while host 0 counts as 11.
        assert_eq!(lb.pick(&[], t0), Some(0));
        // Halfway: 0 connections at half weight count as 2, less than 11.
        assert_eq!(lb.pick(&[], t0 + ramp / 2), Some(1));
        // Plain least connections again once the ramp is over.
        for _ in 0..10 {
            lb.acquire(1);
        }
        assert_eq!(lb.pick(&[], t0 + ramp), Some(0));
    }
}
