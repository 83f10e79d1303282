//! The process-wide caps, shared by every worker: pairs that hold a host
//! (`max_connections`), TLS handshakes in progress (`max_handshakes`), and
//! handshakes per source address (`max_handshakes_per_source`). Each slot
//! is a lease that gives itself back when dropped. They are taken once per
//! connection, never per byte.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::limits::source_key;

/// The counts behind the caps.
#[derive(Debug, Default)]
pub(crate) struct Capacity {
    connections: AtomicUsize,
    handshakes: AtomicUsize,
    /// Handshakes in progress per source (address, or IPv6 /64).
    by_source: Mutex<HashMap<IpAddr, usize>>,
}

/// A pair's place under `max_connections`.
#[must_use = "dropping a connection slot gives it back at once"]
#[derive(Debug)]
pub(crate) struct ConnectionSlot(Arc<Capacity>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A handshake's place under both handshake caps.
#[must_use = "dropping a handshake slot gives it back at once"]
#[derive(Debug)]
pub(crate) struct HandshakeSlot {
    capacity: Arc<Capacity>,
    source: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.capacity.handshakes.fetch_sub(1, Ordering::AcqRel);
        let mut by_source = self.capacity.sources();
        if let Some(n) = by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

impl Capacity {
    fn sources(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.by_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot under `max`, unless `max` pairs hold one already.
    pub fn connection(self: &Arc<Self>, max: usize) -> Option<ConnectionSlot> {
        let mut n = self.connections.load(Ordering::Acquire);
        loop {
            if n >= max {
                return None;
            }
            match self
                .connections
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(ConnectionSlot(self.clone())),
                Err(now) => n = now,
            }
        }
    }

    /// A handshake slot for `source`, unless `source` holds
    /// `per_source` already (`Err(true)`) or the process `max` (`Err(false)`).
    pub fn handshake(
        self: &Arc<Self>,
        source: IpAddr,
        max: usize,
        per_source: usize,
    ) -> Result<HandshakeSlot, bool> {
        self.take_handshake(source, Some(max), per_source)
    }

    /// A handshake slot for `source` whatever the process cap, for a
    /// client that just had another handshake evicted to make room (a
    /// worker racing it to the freed slot cannot take it from under it;
    /// the cap is exceeded by at most one per worker meanwhile).
    pub fn handshake_evicting(
        self: &Arc<Self>,
        source: IpAddr,
        per_source: usize,
    ) -> Result<HandshakeSlot, bool> {
        self.take_handshake(source, None, per_source)
    }

    fn take_handshake(
        self: &Arc<Self>,
        source: IpAddr,
        max: Option<usize>,
        per_source: usize,
    ) -> Result<HandshakeSlot, bool> {
        let key = source_key(source);
        let mut by_source = self.sources();
        let mine = by_source.get(&key).copied().unwrap_or(0);
        if mine >= per_source {
            return Err(true);
        }
        // Taken under the sources' lock, so the two caps move together.
        if max.is_some_and(|max| self.handshakes.load(Ordering::Acquire) >= max) {
            return Err(false);
        }
        self.handshakes.fetch_add(1, Ordering::AcqRel);
        *by_source.entry(key).or_default() += 1;
        Ok(HandshakeSlot {
            capacity: self.clone(),
            source: key,
        })
    }

    /// Pairs that hold a connection slot.
    #[cfg(test)]
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Handshakes in progress in the whole process.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Acquire)
    }

    /// Handshakes in progress from `source`'s address (or IPv6 /64).
    #[cfg(test)]
    pub fn handshakes_from(&self, source: IpAddr) -> usize {
        self.sources()
            .get(&source_key(source))
            .copied()
            .unwrap_or(0)
    }

    /// The sources that hold more than their fair share of handshakes,
    /// with how many they hold, when `client`'s source holds less than
    /// its own (empty otherwise). A fair share is an equal part of `max`
    /// among the sources that hold any, the client's included.
    pub fn over_fair_share(&self, client: IpAddr, max: usize) -> HashMap<IpAddr, usize> {
        let by_source = self.sources();
        let client = source_key(client);
        let mine = by_source.get(&client).copied().unwrap_or(0);
        let fair = max / (by_source.len() + usize::from(mine == 0)).max(1);
        if mine >= fair {
            return HashMap::new();
        }
        by_source
            .iter()
            .filter(|(source, n)| **n > fair && **source != client)
            .map(|(source, n)| (*source, *n))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_stop_at_the_cap_and_come_back_when_dropped() {
        let c = Arc::new(Capacity::default());
        let a = c.connection(2).unwrap();
        let b = c.connection(2).unwrap();
        assert!(c.connection(2).is_none());
        drop(a);
        assert_eq!(c.connections(), 1);
        let _c = c.connection(2).unwrap();
        drop(b);
    }

    #[test]
    fn handshake_slots_count_per_source_and_in_all() {
        let c = Arc::new(Capacity::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        let b2: IpAddr = "2001:db8::2".parse().unwrap();
        let s1 = c.handshake(a, 3, 2).unwrap();
        let s2 = c.handshake(a, 3, 2).unwrap();
        assert_eq!(c.handshake(a, 3, 2).err(), Some(true), "per source");
        let s3 = c.handshake(b, 3, 2).unwrap();
        assert_eq!(c.handshakes_from(b2), 1, "one IPv6 /64");
        assert_eq!(c.handshake(b2, 3, 2).err(), Some(false), "in all");
        drop((s1, s2, s3));
        assert_eq!((c.handshakes(), c.handshakes_from(a)), (0, 0));
    }

    #[test]
    fn only_sources_over_a_fair_share_give_way_to_one_under_it() {
        let c = Arc::new(Capacity::default());
        let [a, b, d]: [IpAddr; 3] =
            ["10.0.0.1", "10.0.0.2", "10.0.0.3"].map(|s| s.parse().unwrap());
        let slots: Vec<_> = [a, a, a, a, b, b]
            .into_iter()
            .map(|ip| c.handshake(ip, 6, 6).unwrap())
            .collect();
        // Three sources with d: a fair share is 2; only a holds more.
        assert_eq!(c.over_fair_share(d, 6), HashMap::from([(a, 4)]));
        // Between a and b alone a fair share is 3: b may take one of a's,
        // a (over its share) nobody's.
        assert_eq!(c.over_fair_share(b, 6), HashMap::from([(a, 4)]));
        assert!(c.over_fair_share(a, 6).is_empty());
        drop(slots);
        assert!(c.over_fair_share(d, 6).is_empty());
    }
}
