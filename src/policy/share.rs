//! One instance's share of a `[[client]]` rule's group-wide limits, when
//! `[cluster]` puts them on Redis: tokens of the group's bucket leased to
//! this instance ahead of need, and the places under the group's
//! `max_connections` that Redis holds for it. Pure policy (`now` is passed
//! in); the Redis side is `proxy/cluster.rs`, and `access.rs` decides with
//! what is here.
//!
//! Tokens. Redis keeps one token bucket per identity for the whole group
//! and hands tokens out atomically (a Lua script). A client's first
//! connection after a quiet spell waits for its own token; while the
//! client keeps coming, its instance holds a *lease* of [`lease_size`]
//! tokens ahead of need and tops it up before the last ones are spent, so
//! a connection normally spends a local token and costs no round trip. Every token spent was granted by the group's bucket, so a
//! lease never lets the group admit more than its bucket gives out; what
//! it can do is move a token in time: one granted a moment ago is spent
//! now. Hence the bound: over any span of T seconds, the group admits at
//! most `burst + rate × T + instances × lease` connections of an
//! identity, and at most `burst + rate × T` in a span that starts with no
//! lease held (after [`LEASE_TTL`] of quiet, since leased tokens expire).
//!
//! Places. With `max_connections`, Redis holds a count per instance (with
//! an expiry the instance refreshes) and grants a place only while the
//! sum stays within the cap, so the cap holds for the group exactly while
//! Redis answers. A place is taken before its connection is admitted: a
//! capped client pays one round trip per connection beyond the places its
//! instance already holds, and a closed connection gives its place back.
//!
//! A connection that finds no local token (or place) and no answer that
//! says "none" waits for Redis's answer, as a pair state of its own
//! (`Admitting`), at most the request timeout; then the [`Fallback`]
//! decides, as it does for every connection while Redis is down.

use std::time::{Duration, Instant};

use super::limits::{Bucket, Limit};

/// How long leased tokens stay spendable: after a quiet second an
/// instance holds none, so the group's next burst is exactly `burst`.
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// The demand a lease covers: a tenth of a second of the full rate.
const LEASE_HORIZON_SECS: f64 = 0.1;

/// What an instance does on its own while Redis is unreachable (or too
/// slow for a waiting connection): `fallback` of `[cluster]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fallback {
    /// Each instance enforces `rate / instances` (bucket `burst /
    /// instances`, rounded up) and `max_connections / instances` (rounded
    /// up): about the rule, for the group as a whole.
    #[default]
    Split,
    /// Each instance enforces the whole rule alone, as without `[cluster]`:
    /// up to `instances` times the rate for the group (fail open).
    Local,
    /// Clients with a rule are refused `rate_limited` (fail closed).
    Refuse,
}

impl Fallback {
    /// The values of the `fallback` key, in the order of the variants.
    pub const NAMES: [&'static str; 3] = ["split", "local", "refuse"];

    /// The `fallback` value that names this one.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The fallback a `fallback` value names.
    pub fn from_name(name: &str) -> Option<Fallback> {
        match name {
            "split" => Some(Fallback::Split),
            "local" => Some(Fallback::Local),
            "refuse" => Some(Fallback::Refuse),
            _ => None,
        }
    }
}

/// How one admission decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// No `[cluster]`: the rule's own bucket and cap, for this instance.
    Alone,
    /// Redis answers: the group's limits, through this instance's share.
    Shared,
    /// `[cluster]`, but Redis is unreachable or did not answer in time.
    Fallback,
}

/// The tokens an instance asks for ahead of need: a tenth of a second of
/// the rate (at least 1), at most `burst / instances` so that the leases
/// of the whole group fit in one burst; none below one connection per
/// second, where a token fetched ahead would expire ([`LEASE_TTL`]) before
/// the rate allows it (every connection then asks Redis, and the bound is
/// exact). `configured` (`lease` of `[cluster]`) replaces all this and is
/// bounded by the burst alone.
pub fn lease_size(rate: f64, burst: u32, instances: u32, configured: Option<u32>) -> u32 {
    if let Some(n) = configured {
        return n.clamp(1, burst.max(1));
    }
    let horizon = (rate * LEASE_HORIZON_SECS)
        .ceil()
        .clamp(1.0, f64::from(u32::MAX)) as u32;
    if f64::from(horizon) > rate * LEASE_TTL.as_secs_f64() {
        return 0;
    }
    horizon.clamp(1, (burst / instances.max(1)).max(1))
}

/// The limits of the fallback `Split`: the rule divided among the instances.
pub fn split_limit(rate: f64, burst: u32, instances: u32) -> Limit {
    let n = instances.max(1);
    Limit::new(rate / f64::from(n), burst.div_ceil(n))
}

/// A rule's cap under the fallback `Split`.
pub fn split_cap(max: u32, instances: u32) -> u32 {
    max.div_ceil(instances.max(1))
}

/// Taking a leased token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    /// Taken; `low` when the lease should be topped up now.
    Taken { low: bool },
    /// The group's bucket was empty at Redis's last answer: the next
    /// token comes after this long.
    Dry(Duration),
    /// None here, and no answer says there is none in the group: ask.
    Unknown,
}

/// What the cluster thread asks Redis for one identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    /// Tokens wanted (0: none).
    pub want: u32,
    /// Of those, the ones ahead of need (beyond the connections waiting).
    pub ahead: u32,
    /// This instance's open connections of the identity.
    pub active: u32,
    /// The rule has `max_connections`: Redis is to hold `desired` places.
    pub capped: bool,
    /// The places it wants held (its connections and those waiting).
    pub desired: u32,
    /// When it was sent.
    pub sent: Instant,
}

/// What Redis answered to a [`Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    /// Tokens granted (at most the ones wanted).
    pub granted: u32,
    /// When fewer were granted: how long until the bucket has a token.
    pub wait: Duration,
    /// Places held for this instance now.
    pub held: u32,
}

/// One instance's share of one identity's group-wide limits.
#[derive(Debug)]
pub(crate) struct Share {
    /// Tokens leased to this instance and not spent, and when the last
    /// lease came (they all expire [`LEASE_TTL`] after it).
    tokens: u32,
    leased_at: Option<Instant>,
    /// Redis found the group's bucket empty: no token before this.
    dry_until: Option<Instant>,
    /// Places Redis holds for this instance (its open connections among
    /// them, once they are admitted under the shared cap).
    pub held: u32,
    /// A request sent at this instant found the group at its cap.
    full_since: Option<Instant>,
    /// Connections waiting for a token, and for a place.
    pub waiting_tokens: u32,
    pub waiting_places: u32,
    /// The tokens held were asked for ahead of need (a lease), not only
    /// for connections that waited: spending them down asks for more.
    leasing: bool,
    /// The lease ran low while spent: the next request tops it up.
    top_up: bool,
    /// A request is wanted: queued for the cluster thread, or to be sent
    /// again once the one in flight is answered.
    wanted: bool,
    /// The request on its way to Redis.
    in_flight: Option<Request>,
    /// The bucket of the fallback `Split`.
    pub fallback: Bucket,
}

impl Share {
    pub fn new(fallback: Limit) -> Share {
        Share {
            tokens: 0,
            leased_at: None,
            dry_until: None,
            held: 0,
            full_since: None,
            waiting_tokens: 0,
            waiting_places: 0,
            leasing: false,
            top_up: false,
            wanted: false,
            in_flight: None,
            fallback: Bucket::new(fallback),
        }
    }

    /// Leased tokens still spendable at `now`.
    pub fn tokens(&self, now: Instant) -> u32 {
        match self.leased_at {
            Some(at) if now.saturating_duration_since(at) < LEASE_TTL => self.tokens,
            _ => 0,
        }
    }

    /// Takes a leased token at `now`, if there is one.
    pub fn take_token(&mut self, now: Instant, lease: u32) -> Token {
        let tokens = self.tokens(now);
        if tokens > 0 {
            self.tokens = tokens - 1;
            let low =
                self.leasing && self.tokens <= lease / 2 && self.dry_until.is_none_or(|d| d <= now);
            self.top_up |= low;
            return Token::Taken { low };
        }
        self.tokens = 0;
        match self.dry_until {
            Some(until) if until > now => Token::Dry(until - now),
            _ => Token::Unknown,
        }
    }

    /// Whether the last answer about places, to a request sent at or
    /// after `since`, found the group at its cap.
    pub fn full_since(&self, since: Instant) -> bool {
        self.full_since.is_some_and(|s| s >= since)
    }

    /// Marks a request as wanted; true if it was not already (the caller
    /// then hands the identity to the cluster thread).
    pub fn want(&mut self) -> bool {
        !std::mem::replace(&mut self.wanted, true)
    }

    /// Whether a request is wanted or on its way.
    pub fn busy(&self) -> bool {
        self.wanted || self.in_flight.is_some()
    }

    /// The request to send now for an identity with `active` open
    /// connections here, or `None` (one is already on its way, which will
    /// be followed by another if still wanted; or there is nothing to ask).
    /// `capped` says whether the rule has `max_connections`.
    pub fn request(
        &mut self,
        now: Instant,
        active: u32,
        capped: bool,
        lease: u32,
    ) -> Option<Request> {
        if self.in_flight.is_some() {
            return None;
        }
        self.wanted = false;
        let tokens = self.tokens(now);
        let dry = self.dry_until.is_some_and(|d| d > now);
        // Tokens only for demand: the connections waiting, plus a lease
        // ahead of need while the client keeps coming (a lease granted
        // within the last LEASE_TTL), or a top-up of a lease spent down.
        // A client's first connection after a quiet spell takes just its
        // own token, so a sporadic client strands none. A refresh of the
        // count alone takes none.
        let ahead = lease.saturating_sub(tokens.min(lease));
        let busy = self
            .leased_at
            .is_some_and(|at| now.saturating_duration_since(at) < LEASE_TTL);
        let (want, ahead) = if dry {
            (0, 0)
        } else if self.waiting_tokens > 0 {
            let ahead = if busy { ahead } else { 0 };
            (self.waiting_tokens.saturating_add(ahead), ahead)
        } else if self.top_up {
            (ahead.max(1), ahead.max(1))
        } else {
            (0, 0)
        };
        self.top_up = false;
        let desired = if capped {
            active.saturating_add(self.waiting_places)
        } else {
            0
        };
        if want == 0 && !capped {
            return None;
        }
        let request = Request {
            want,
            ahead,
            active,
            capped,
            desired,
            sent: now,
        };
        self.in_flight = Some(request);
        Some(request)
    }

    /// Takes Redis's answer to the request in flight; true when another
    /// request is wanted now.
    pub fn apply(&mut self, answer: Answer, now: Instant) -> bool {
        let Some(request) = self.in_flight.take() else {
            return false;
        };
        let granted = answer.granted.min(request.want);
        if granted > 0 {
            self.tokens = self.tokens(now).saturating_add(granted);
            self.leased_at = Some(now);
            self.leasing = request.ahead > 0;
        }
        self.dry_until = (granted < request.want).then(|| now + answer.wait);
        if request.capped {
            self.held = answer.held;
            self.full_since = (answer.held < request.desired).then_some(request.sent);
        }
        self.wanted
    }

    /// The request in flight is lost (Redis went away); what it would
    /// have answered is unknown.
    pub fn failed(&mut self) {
        self.in_flight = None;
    }

    /// Forgets what Redis said about the group (before a new connection
    /// to Redis, which may be a new Redis): a wanted request stays wanted.
    pub fn reset(&mut self) {
        self.in_flight = None;
        self.dry_until = None;
        self.full_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn share() -> Share {
        Share::new(split_limit(10.0, 10, 2))
    }

    #[test]
    fn lease_sizes_follow_the_rate_within_the_burst() {
        assert_eq!(lease_size(10.0, 10, 2, None), 1);
        assert_eq!(lease_size(1000.0, 1000, 3, None), 100);
        assert_eq!(lease_size(100.0, 5, 2, None), 2);
        assert_eq!(lease_size(1000.0, 1, 5, None), 1);
        assert_eq!(lease_size(1e6, 1_000_000, 1, None), 100_000);
        assert_eq!(lease_size(10.0, 10, 2, Some(50)), 10);
        assert_eq!(lease_size(10.0, 10, 2, Some(0)), 1);
        assert_eq!(lease_size(0.5, 10, 2, None), 0, "no token ahead below 1/s");
        assert_eq!(lease_size(1.0, 10, 2, None), 1);
        assert_eq!(split_limit(10.0, 10, 3), Limit::new(10.0 / 3.0, 4));
        assert_eq!(split_cap(10, 3), 4);
        assert_eq!(split_cap(1, 3), 1);
    }

    #[test]
    fn an_empty_share_asks_and_a_lease_is_spent_locally() {
        let t0 = Instant::now();
        let mut s = share();
        assert_eq!(s.take_token(t0, 4), Token::Unknown);
        s.waiting_tokens = 1;
        assert!(s.want());
        assert!(!s.want(), "a second want is the same request");
        let r = s.request(t0, 0, false, 4).unwrap();
        assert_eq!(
            (r.want, r.desired),
            (1, 0),
            "after quiet: its own token only"
        );
        assert_eq!(s.request(t0, 0, false, 4), None, "one at a time");
        let grant = |s: &mut Share, granted, now| {
            let wait = Duration::ZERO;
            s.apply(
                Answer {
                    granted,
                    wait,
                    held: 0,
                },
                now,
            )
        };
        assert!(!grant(&mut s, 1, t0));
        assert_eq!(
            s.take_token(t0, 4),
            Token::Taken { low: false },
            "no lease was asked for: nothing to top up"
        );
        // The client comes again within the second: a lease ahead of need.
        let t1 = t0 + ms(300);
        assert_eq!(s.take_token(t1, 4), Token::Unknown);
        let r = s.request(t1, 0, false, 4).unwrap();
        assert_eq!(r.want, 5, "its own and a lease of 4");
        grant(&mut s, 5, t1);
        s.waiting_tokens = 0;
        assert_eq!(s.take_token(t1, 4), Token::Taken { low: false });
        assert_eq!(s.take_token(t1, 4), Token::Taken { low: false });
        // Two left of a lease of 4: time to top up.
        assert_eq!(s.take_token(t1, 4), Token::Taken { low: true });
        let r = s.request(t1, 0, false, 4).unwrap();
        assert_eq!(r.want, 2, "tops the lease up to its size");
    }

    #[test]
    fn a_dry_bucket_refuses_without_asking_until_its_next_token() {
        let t0 = Instant::now();
        let mut s = share();
        s.waiting_tokens = 3;
        s.want();
        let _ = s.request(t0, 0, false, 1).unwrap();
        s.apply(
            Answer {
                granted: 1,
                wait: ms(100),
                held: 0,
            },
            t0,
        );
        s.waiting_tokens = 0;
        assert_eq!(s.take_token(t0, 1), Token::Taken { low: false });
        assert_eq!(s.take_token(t0, 1), Token::Dry(ms(100)));
        assert_eq!(s.take_token(t0 + ms(60), 1), Token::Dry(ms(40)));
        assert_eq!(s.request(t0 + ms(60), 0, false, 1), None, "nothing to ask");
        assert_eq!(s.take_token(t0 + ms(100), 1), Token::Unknown);
    }

    #[test]
    fn leased_tokens_expire() {
        let t0 = Instant::now();
        let mut s = share();
        s.waiting_tokens = 3;
        s.want();
        let _ = s.request(t0, 0, false, 3).unwrap();
        s.waiting_tokens = 0;
        s.apply(
            Answer {
                granted: 3,
                wait: Duration::ZERO,
                held: 0,
            },
            t0,
        );
        assert_eq!(s.tokens(t0 + ms(999)), 3);
        assert_eq!(s.tokens(t0 + LEASE_TTL), 0);
        assert_eq!(s.take_token(t0 + LEASE_TTL, 3), Token::Unknown);
    }

    #[test]
    fn places_are_asked_for_and_fullness_dates_from_the_request() {
        let t0 = Instant::now();
        let mut s = share();
        s.waiting_places = 1;
        s.want();
        let r = s.request(t0, 2, true, 1).unwrap();
        assert_eq!((r.want, r.active, r.desired), (0, 2, 3), "no token demand");
        s.apply(
            Answer {
                granted: 0,
                wait: Duration::ZERO,
                held: 2,
            },
            t0 + ms(1),
        );
        assert_eq!(s.held, 2);
        assert!(s.full_since(t0), "a waiter from t0 was in that request");
        assert!(!s.full_since(t0 + ms(1)), "a later one was not");
        // A capped identity is always worth a request: it refreshes the count.
        let r = s.request(t0 + ms(2), 2, true, 1).unwrap();
        assert_eq!((r.want, r.desired), (0, 3));
        s.failed();
        assert!(s.request(t0 + ms(3), 2, true, 1).is_some());
    }
}
