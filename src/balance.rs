//! Least-connections host choice for one upstream: a plain data structure
//! with no I/O, unit-testable without sockets.
//!
//! Invariants: `active` of a host is the number of pairs whose connect to it
//! has started and which have not yet released it; the loop acquires before
//! the connect syscall and releases exactly once (connect failure or pair
//! end). Among hosts with equally few connections, choice rotates
//! round-robin, so two idle hosts do not always resolve to the first.

use std::net::SocketAddr;

/// Index of a host within its upstream's [`LoadBalancer`].
pub type HostId = usize;

#[derive(Debug, Clone)]
struct HostSlot {
    addr: SocketAddr,
    active: u32,
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
    pub fn new(hosts: Vec<SocketAddr>) -> Self {
        LoadBalancer {
            hosts: hosts
                .into_iter()
                .map(|addr| HostSlot { addr, active: 0 })
                .collect(),
            cursor: 0,
        }
    }

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

    /// The next candidate: the host with the fewest active connections among
    /// those not in `tried`, ties broken round-robin. Call with the hosts
    /// already attempted for this client to walk the fallbacks in order;
    /// `None` once every host has been tried.
    pub fn pick(&mut self, tried: &[HostId]) -> Option<HostId> {
        let n = self.hosts.len();
        let mut best: Option<HostId> = None;
        for offset in 0..n {
            let id = (self.cursor + offset) % n;
            if tried.contains(&id) {
                continue;
            }
            if best.is_none_or(|b| self.hosts[id].active < self.hosts[b].active) {
                best = Some(id);
            }
        }
        if let Some(id) = best {
            self.cursor = (id + 1) % n;
        }
        best
    }

    /// Candidates for one new client in the order they would be tried, as
    /// repeated [`pick`](Self::pick)s would yield them if no count changed.
    pub fn candidates(&mut self) -> Vec<HostId> {
        let mut order = Vec::with_capacity(self.hosts.len());
        while let Some(id) = self.pick(&order) {
            order.push(id);
        }
        if let Some(&first) = order.first() {
            self.cursor = (first + 1) % self.hosts.len();
        }
        order
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
        let mut lb = lb(3);
        lb.acquire(0);
        lb.acquire(0);
        lb.acquire(1);
        assert_eq!(lb.pick(&[]), Some(2));
        lb.acquire(2);
        lb.acquire(2);
        assert_eq!(lb.pick(&[]), Some(1));
    }

    #[test]
    fn ties_rotate_round_robin() {
        let mut lb = lb(3);
        let firsts: Vec<_> = (0..6).map(|_| lb.pick(&[]).unwrap()).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn two_idle_hosts_alternate_as_connections_come_and_go() {
        let mut lb = lb(2);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let h = lb.pick(&[]).unwrap();
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
        let mut lb = lb(3);
        lb.acquire(0);
        lb.acquire(0);
        lb.acquire(1);
        assert_eq!(lb.pick(&[]), Some(2));
        assert_eq!(lb.pick(&[2]), Some(1));
        assert_eq!(lb.pick(&[2, 1]), Some(0));
        assert_eq!(lb.pick(&[2, 1, 0]), None);
    }

    #[test]
    fn candidates_list_every_host_once_best_first() {
        let mut lb = lb(4);
        lb.acquire(0);
        lb.acquire(3);
        lb.acquire(3);
        let order = lb.candidates();
        assert_eq!(order.len(), 4);
        assert_eq!(&order[2..], [0, 3]);
        assert!(order[..2].contains(&1) && order[..2].contains(&2));
        // The next client's tie between hosts 1 and 2 goes the other way.
        let next = lb.candidates();
        assert_ne!(order[0], next[0]);
    }

    #[test]
    fn single_host_is_always_chosen() {
        let mut lb = lb(1);
        lb.acquire(0);
        assert_eq!(lb.pick(&[]), Some(0));
        assert_eq!(lb.pick(&[0]), None);
    }
}
