//! Connection rate limits as token buckets: per client identity (checked
//! after the TLS handshake) and per source address (checked at accept,
//! before any handshake work). Pure policy: `now` is passed in, no I/O.
//!
//! Each bucket is kept in its GCRA form: one instant, the *theoretical
//! arrival time* (TAT), after which the bucket is full again. A connection
//! at `now` is allowed when `max(TAT, now) + interval - now <= burst ×
//! interval`, and then moves TAT on by one interval. That is the same
//! admission rule as a bucket of `burst` tokens refilled at `rate` per
//! second, in exact integer time, with one instant of state per key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A token-bucket limit: `rate` new connections per second on average, and
/// up to `burst` at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Time to earn one token (1 / rate).
    interval: Duration,
    burst: u32,
}

impl Limit {
    /// Slowest rate a limit can have: one per day.
    pub const MIN_RATE: f64 = 1.0 / 86_400.0;
    /// Largest bucket.
    pub const MAX_BURST: u32 = 1_000_000;

    /// `rate` per second with a bucket of `burst`, both brought into range
    /// ([`MIN_RATE`](Self::MIN_RATE) to a million per second, 1 to
    /// [`MAX_BURST`](Self::MAX_BURST)); config validation rejects values
    /// outside it before they get here.
    pub fn new(rate: f64, burst: u32) -> Limit {
        let rate = if rate.is_finite() {
            rate.clamp(Self::MIN_RATE, 1e6)
        } else {
            1e6
        };
        Limit {
            interval: Duration::from_secs_f64(1.0 / rate),
            burst: burst.clamp(1, Self::MAX_BURST),
        }
    }

    /// `rate` per second with a bucket of the same size (at least 1).
    pub fn per_second(rate: f64) -> Limit {
        Limit::new(rate, rate.ceil().clamp(1.0, Self::MAX_BURST as f64) as u32)
    }

    /// The bucket's size.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Takes a token from the bucket whose state is `tat`; on refusal,
    /// returns how long until a token is available.
    fn take(&self, tat: &mut Instant, now: Instant) -> Result<(), Duration> {
        // In range by construction (a day × a million fits a Duration and
        // an Instant), but a limit must never be able to panic the loop.
        let Some(next) = (*tat).max(now).checked_add(self.interval) else {
            return Err(self.interval);
        };
        let allowance = self.interval.saturating_mul(self.burst);
        let ahead = next.duration_since(now);
        if ahead > allowance {
            return Err(ahead - allowance);
        }
        *tat = next;
        Ok(())
    }
}

/// One token bucket: a [`Limit`] and its state. A client rule holds its
/// own, so the rule and its rate cannot disagree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    limit: Limit,
    /// The theoretical arrival time; `None` while full and untouched.
    tat: Option<Instant>,
}

impl Bucket {
    /// A full bucket.
    pub fn new(limit: Limit) -> Bucket {
        Bucket { limit, tat: None }
    }

    /// Keeps the state (how full the bucket is) under a new limit.
    pub fn set_limit(&mut self, limit: Limit) {
        self.limit = limit;
    }

    /// Takes a token at `now`; on refusal, how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let tat = self.tat.get_or_insert(now);
        self.limit.take(tat, now)
    }
}

/// Token buckets per source address, created on first sight. IPv6 sources
/// are grouped by /64 (one host or site), since a single client can cycle
/// through addresses inside its prefix. Buckets that have filled up again
/// are indistinguishable from new ones and are swept away, and the table
/// never grows past `capacity`.
#[derive(Debug, Clone)]
pub struct SourceLimiter {
    limit: Limit,
    buckets: HashMap<IpAddr, Instant>,
    capacity: usize,
    last_sweep: Option<Instant>,
}

/// Largest number of source buckets kept at once.
pub const SOURCE_CAPACITY: usize = 100_000;

impl SourceLimiter {
    pub fn new(limit: Limit) -> Self {
        SourceLimiter {
            limit,
            buckets: HashMap::new(),
            capacity: SOURCE_CAPACITY,
            last_sweep: None,
        }
    }

    /// Is a new connection from `source` allowed at `now`? Takes a token
    /// if so; otherwise says how long until one is there.
    pub fn check(&mut self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = source_key(source);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.capacity {
            // Sweeping is a pass over the table: at most once a second.
            if self
                .last_sweep
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                self.last_sweep = Some(now);
                self.sweep(now);
            }
            if self.buckets.len() >= self.capacity {
                // More busy sources than the table holds: forget one so a
                // new source is never locked out (a flood that wide is for
                // the handshake caps to absorb).
                if let Some(&victim) = self.buckets.keys().next() {
                    self.buckets.remove(&victim);
                }
            }
        }
        let tat = self.buckets.entry(key).or_insert(now);
        self.limit.take(tat, now)
    }

    /// Drops buckets that are full again (their TAT has passed).
    pub fn sweep(&mut self, now: Instant) {
        self.buckets.retain(|_, tat| *tat > now);
    }

    /// Sources currently tracked.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// The key a source address is limited under: itself for IPv4 (and
/// IPv4-mapped IPv6), its /64 prefix for IPv6.
pub fn source_key(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V4(_) => source,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limiter(rate: f64, burst: u32) -> Bucket {
        Bucket::new(Limit::new(rate, burst))
    }

    const ALLOWED: Result<(), Duration> = Ok(());

    #[test]
    fn a_full_bucket_allows_a_burst_then_refuses() {
        let t0 = Instant::now();
        let mut rl = limiter(10.0, 3);
        for _ in 0..3 {
            assert_eq!(rl.take(t0), ALLOWED);
        }
        // The fourth at the same instant waits for one token: 100 ms.
        assert_eq!(rl.take(t0), Err(ms(100)));
    }

    #[test]
    fn tokens_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut rl = limiter(10.0, 3);
        for _ in 0..3 {
            assert_eq!(rl.take(t0), ALLOWED);
        }
        // 250 ms later, 2.5 tokens have come back: two connections, not three.
        let t1 = t0 + ms(250);
        assert_eq!(rl.take(t1), ALLOWED);
        assert_eq!(rl.take(t1), ALLOWED);
        assert_eq!(rl.take(t1), Err(ms(50)));
        assert_eq!(rl.take(t1 + ms(50)), ALLOWED);
    }

    #[test]
    fn refill_never_exceeds_the_burst() {
        let t0 = Instant::now();
        let mut rl = limiter(10.0, 2);
        // After an hour of quiet, still only two at once.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(rl.take(later), ALLOWED);
        assert_eq!(rl.take(later), ALLOWED);
        assert!(rl.take(later).is_err());
    }

    #[test]
    fn steady_rate_is_sustained_exactly() {
        let t0 = Instant::now();
        let mut rl = limiter(4.0, 1);
        for i in 0..100 {
            assert_eq!(rl.take(t0 + ms(250 * i)), ALLOWED, "at {i}");
        }
        assert!(rl.take(t0 + ms(250 * 99 + 1)).is_err());
    }

    #[test]
    fn buckets_are_independent_and_keep_their_state_under_a_new_limit() {
        let t0 = Instant::now();
        let (mut alice, mut bob) = (limiter(1.0, 1), limiter(1.0, 1));
        assert_eq!(alice.take(t0), ALLOWED);
        assert!(alice.take(t0).is_err());
        assert_eq!(bob.take(t0), ALLOWED);
        // A reload that raises the burst finds the bucket as it was.
        alice.set_limit(Limit::new(1.0, 2));
        assert_eq!(alice.take(t0), ALLOWED);
        assert!(alice.take(t0).is_err());
    }

    #[test]
    fn per_second_burst_defaults_to_the_rate() {
        assert_eq!(Limit::per_second(20.0).burst(), 20);
        assert_eq!(Limit::per_second(0.5).burst(), 1);
    }

    #[test]
    fn sources_group_ipv6_by_prefix_and_sweep_when_full_again() {
        let t0 = Instant::now();
        let mut sl = SourceLimiter::new(Limit::new(1.0, 1));
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let other: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        assert_eq!(sl.check(a, t0), ALLOWED);
        // Same /64: the same bucket.
        assert!(sl.check(b, t0).is_err());
        assert_eq!(sl.check(other, t0), ALLOWED);
        assert_eq!(sl.len(), 2);
        sl.sweep(t0 + Duration::from_secs(2));
        assert!(sl.is_empty());
    }

    #[test]
    fn source_table_is_bounded_and_never_locks_a_new_source_out() {
        let t0 = Instant::now();
        let mut sl = SourceLimiter::new(Limit::new(1.0, 1));
        sl.capacity = 3;
        for i in 1..=3u8 {
            assert_eq!(sl.check(IpAddr::from([10, 0, 0, i]), t0), ALLOWED);
        }
        // Full of busy sources: one is forgotten, the new one gets a bucket.
        assert_eq!(sl.check(IpAddr::from([10, 0, 0, 9]), t0), ALLOWED);
        assert_eq!(sl.len(), 3);
        // Once they have filled up again they are swept to make room.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(sl.check(IpAddr::from([10, 0, 0, 10]), later), ALLOWED);
        assert_eq!(sl.len(), 1);
    }

    #[test]
    fn extreme_limits_never_panic() {
        let t0 = Instant::now();
        for limit in [
            Limit::new(1e-30, u32::MAX),
            Limit::new(f64::INFINITY, 0),
            Limit::new(f64::NAN, 5),
        ] {
            let mut bucket = Bucket::new(limit);
            for i in 0..3 {
                let _ = bucket.take(t0 + Duration::from_secs(i));
            }
        }
        assert_eq!(Limit::new(1e-30, u32::MAX).burst(), Limit::MAX_BURST);
    }
}
