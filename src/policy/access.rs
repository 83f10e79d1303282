//! Who may use which upstream, how often and how much: the `[[client]]`
//! rules applied after a TLS handshake has proved a client's identity.
//! Pure policy (`now` is passed in), unit-testable without sockets.
//!
//! Checks run in the order the design fixes: is the identity known? is it
//! allowed on this upstream? is it within its connection rate and its
//! concurrency cap? A client admitted here counts against its cap for as
//! long as its [`ClientLease`] lives.
//!
//! Each identity's bucket and count are shared by every worker, and kept
//! across reloads while the identity keeps a rule, so a client keeps its
//! bucket when its rule changes and connections admitted under old rules
//! give their place back to the right count.
//!
//! With `[cluster]` the rate and the cap hold for a group of instances:
//! admission spends a token leased from the group's bucket in Redis and
//! takes a place Redis holds for this instance ([`super::share`]). When
//! neither is at hand and no answer says there is none, the connection
//! waits for Redis with a [`Ticket`] (counted in the identity's demand
//! while it lives), and the identity is handed to the cluster thread as
//! an [`Ask`]. While Redis is unreachable, the fallback decides alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::limits::{Bucket, Limit};
use super::share::{self, Answer, Fallback, Mode, Request, Share, Token, split_cap, split_limit};

/// How long a client refused by the fallback `Refuse` is told to wait.
const REFUSE_RETRY: Duration = Duration::from_secs(1);

/// One `[[client]]` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRule {
    /// A DNS name or a full URI, matched against the certificate's SANs.
    pub identity: String,
    /// Names of the upstreams this client may use.
    pub upstreams: Vec<String>,
    /// New connections per second (token bucket refill).
    pub rate: f64,
    /// Bucket size.
    pub burst: u32,
    /// Concurrent connections, if capped.
    pub max_connections: Option<u32>,
}

/// Why a client with a valid certificate is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// Unknown identity (`known: false`), or a known one not allowed on
    /// this upstream. The client is told the same for both; the log says which.
    Unauthorized {
        /// The identity has a rule, for other upstreams.
        known: bool,
    },
    /// Over its connection rate; a token is there after `retry_after`.
    RateLimited {
        /// Time until the next connection would be allowed.
        retry_after: Duration,
    },
    /// At its `max_connections`.
    TooManyConnections,
}

/// How the rules' limits are shared by a group of instances (`[cluster]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sharing {
    /// The group's expected size, for the fallback and the lease size.
    pub instances: u32,
    pub fallback: Fallback,
    /// `lease` of `[cluster]`: tokens asked for at a time.
    pub lease: Option<u32>,
}

/// A rule's limits as the counts need them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    rate: f64,
    burst: u32,
    max: Option<u32>,
    /// Tokens leased at a time, with `[cluster]`.
    lease: u32,
}

impl Limits {
    fn of(rule: &ClientRule, sharing: Option<Sharing>) -> Limits {
        let (instances, configured) = sharing.map_or((1, None), |s| (s.instances, s.lease));
        Limits {
            rate: rule.rate,
            burst: rule.burst,
            max: rule.max_connections,
            lease: share::lease_size(rule.rate, rule.burst, instances, configured),
        }
    }
}

/// What an identity counts, shared by every worker and kept across
/// reloads while the identity keeps a rule (or has open connections).
#[derive(Debug)]
struct Counts {
    /// Its rate limit, for this instance alone (no `[cluster]`, or the
    /// fallback `Local`).
    bucket: Bucket,
    /// Open connections admitted under this identity, here.
    active: u32,
    /// This instance's share of the group's limits (`[cluster]`).
    share: Share,
    limits: Limits,
}

/// An identity's state. Touched once per admitted connection (and once
/// when it ends), and by the cluster thread once per request to Redis;
/// never per byte.
#[derive(Debug)]
pub(crate) struct ClientState {
    identity: String,
    counts: Mutex<Counts>,
}

/// What the cluster thread sends Redis for one identity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Query {
    pub request: Request,
    pub rate: f64,
    pub burst: u32,
    /// `max_connections`, 0 for none.
    pub max: u32,
}

impl ClientState {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The identity, as Redis keys name it.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The request to send Redis now, if there is one to send.
    pub fn query(&self, now: Instant) -> Option<Query> {
        let mut c = self.lock();
        let (active, limits) = (c.active, c.limits);
        let request = c
            .share
            .request(now, active, limits.max.is_some(), limits.lease)?;
        Some(Query {
            request,
            rate: limits.rate,
            burst: limits.burst,
            max: limits.max.unwrap_or(0),
        })
    }

    /// Takes Redis's answer; true when another request is wanted now.
    pub fn apply(&self, answer: Answer, now: Instant) -> bool {
        self.lock().share.apply(answer, now)
    }

    /// The request in flight is lost.
    pub fn failed(&self) {
        self.lock().share.failed();
    }

    /// Forgets what Redis said, before a new connection to it; true if
    /// the identity has something to ask or to keep counted there.
    pub fn reset(&self) -> bool {
        let mut c = self.lock();
        c.share.reset();
        c.share.busy() || c.active > 0 || c.share.held > 0
    }

    /// Whether connections of this identity wait for an answer.
    pub fn has_waiters(&self) -> bool {
        let c = self.lock();
        c.share.waiting_tokens + c.share.waiting_places > 0
    }

    /// Whether the identity's count in Redis needs refreshing (it has a
    /// cap and holds places, or connections).
    pub fn counted(&self) -> bool {
        let c = self.lock();
        c.limits.max.is_some() && (c.active > 0 || c.share.held > 0)
    }
}

/// An identity that wants Redis's attention: handed to the cluster
/// thread (which sends at most one request per identity at a time).
#[derive(Debug)]
pub(crate) struct Ask(pub(crate) Arc<ClientState>);

/// An admitted client's place in its concurrency count. Cannot be cloned;
/// it is given back once, by [`release`](ClientLease::release) or on drop.
#[must_use = "dropping a client lease gives its place back at once"]
#[derive(Debug)]
pub(crate) struct ClientLease {
    state: Arc<ClientState>,
    released: bool,
}

impl PartialEq for ClientLease {
    fn eq(&self, other: &ClientLease) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }
}

impl ClientLease {
    /// Gives the place back; with `[cluster]`, the identity then asks
    /// Redis to hold one place fewer for this instance.
    pub fn release(mut self) -> Option<Ask> {
        self.released = true;
        let mut c = self.state.lock();
        c.active = c.active.saturating_sub(1);
        let shrink = c.limits.max.is_some() && c.share.held > c.active;
        (shrink && c.share.want()).then(|| Ask(self.state.clone()))
    }
}

impl Drop for ClientLease {
    fn drop(&mut self) {
        if !self.released {
            let mut counts = self.state.lock();
            counts.active = counts.active.saturating_sub(1);
        }
    }
}

/// A connection waiting for Redis's answer (a token, or a place): counted
/// in its identity's demand while it lives.
#[must_use = "dropping a ticket gives up the wait"]
#[derive(Debug)]
pub(crate) struct Ticket {
    state: Arc<ClientState>,
    /// Its token is already spent: it waits for a place.
    paid: bool,
    /// When it began to wait.
    since: Instant,
    live: bool,
}

impl Ticket {
    /// Counts a new waiter in `c`, the locked counts of `state`.
    fn new(state: &Arc<ClientState>, c: &mut Counts, paid: bool, since: Instant) -> Ticket {
        if paid {
            c.share.waiting_places += 1;
        } else {
            c.share.waiting_tokens += 1;
        }
        Ticket {
            state: state.clone(),
            paid,
            since,
            live: true,
        }
    }

    /// Ends the wait: (paid, since).
    fn settle(mut self) -> (bool, Instant) {
        self.uncount();
        (self.paid, self.since)
    }

    fn uncount(&mut self) {
        if std::mem::replace(&mut self.live, false) {
            let mut c = self.state.lock();
            let waiting = if self.paid {
                &mut c.share.waiting_places
            } else {
                &mut c.share.waiting_tokens
            };
            *waiting = waiting.saturating_sub(1);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.uncount();
    }
}

/// What an admission that is not refused gives.
#[derive(Debug)]
pub(crate) enum Admission {
    Admitted(ClientLease),
    /// Wait for Redis's answer, then ask again with the ticket.
    Waiting(Ticket),
}

/// The outcome of [`Access::admit`], and an identity to hand to the
/// cluster thread, if it wants Redis's attention.
#[derive(Debug)]
pub(crate) struct Verdict {
    pub result: Result<Admission, Denial>,
    pub ask: Option<Ask>,
}

/// The `[[client]]` rules in force, each with its identity's state.
#[derive(Debug, Default)]
pub struct Access {
    rules: HashMap<String, (ClientRule, Arc<ClientState>)>,
    /// Identities whose rule is gone but whose connections are still
    /// open, so their counts stay visible.
    former: Vec<Weak<ClientState>>,
    /// With `[cluster]`: how the limits are shared.
    sharing: Option<Sharing>,
}

impl Access {
    /// The rules of a config, with fresh state; `sharing` with `[cluster]`.
    pub(crate) fn new(rules: Vec<ClientRule>, sharing: Option<Sharing>) -> Access {
        let none = Access {
            sharing,
            ..Access::default()
        };
        Access::reload(&none, rules)
    }

    /// The rules of a reloaded config: an identity that keeps a rule keeps
    /// its bucket (under the new limit), its count and its share; open
    /// connections keep counting against their identity whatever the new
    /// rules say. How limits are shared stays as it was.
    pub fn reload(old: &Access, rules: Vec<ClientRule>) -> Access {
        let mut access = Access {
            sharing: old.sharing,
            ..Access::default()
        };
        for rule in rules {
            let limit = Limit::new(rule.rate, rule.burst);
            let limits = Limits::of(&rule, old.sharing);
            let instances = old.sharing.map_or(1, |s| s.instances);
            let split = split_limit(rule.rate, rule.burst, instances);
            let state = match old.state_of(&rule.identity) {
                Some(state) => {
                    let mut c = state.lock();
                    c.bucket.set_limit(limit);
                    c.share.fallback.set_limit(split);
                    c.limits = limits;
                    drop(c);
                    state
                }
                None => Arc::new(ClientState {
                    identity: rule.identity.clone(),
                    counts: Mutex::new(Counts {
                        bucket: Bucket::new(limit),
                        active: 0,
                        share: Share::new(split),
                        limits,
                    }),
                }),
            };
            access.rules.insert(rule.identity.clone(), (rule, state));
        }
        let former = old
            .rules
            .values()
            .map(|(_, s)| Arc::downgrade(s))
            .chain(old.former.iter().cloned())
            .filter(|w| {
                w.upgrade()
                    .is_some_and(|s| !access.rules.contains_key(&s.identity) && s.lock().active > 0)
            })
            .collect();
        access.former = former;
        access
    }

    /// Every identity's state: in force, or lingering with connections.
    pub(crate) fn states(&self) -> Vec<Arc<ClientState>> {
        self.rules
            .values()
            .map(|(_, s)| s.clone())
            .chain(self.former.iter().filter_map(Weak::upgrade))
            .collect()
    }

    /// The state of `identity`: in force, or lingering with connections
    /// still open after its rule went away.
    fn state_of(&self, identity: &str) -> Option<Arc<ClientState>> {
        self.rules
            .get(identity)
            .map(|(_, s)| s.clone())
            .or_else(|| {
                self.former
                    .iter()
                    .filter_map(Weak::upgrade)
                    .find(|s| s.identity == identity)
            })
    }

    /// The identity among a certificate's `names` that a rule knows: the
    /// first name, in certificate order, that names a configured client.
    pub fn identify<'a>(&self, names: &'a [String]) -> Option<&'a str> {
        names
            .iter()
            .find(|n| self.rules.contains_key(n.as_str()))
            .map(String::as_str)
    }

    /// Admits `identity` to `upstream` at `now`, or says why not, or (in
    /// `Mode::Shared`) that it must wait for Redis: then it is asked again
    /// with the ticket once Redis answered, or in `Mode::Fallback` once
    /// the wait is over. Without `[cluster]` the mode is always `Alone`.
    pub(crate) fn admit(
        &self,
        identity: Option<&str>,
        upstream: &str,
        now: Instant,
        mode: Mode,
        ticket: Option<Ticket>,
    ) -> Verdict {
        let (mut paid, since) = ticket.map_or((false, now), Ticket::settle);
        let refused = |denial| Verdict {
            result: Err(denial),
            ask: None,
        };
        let Some((rule, state)) = identity.and_then(|i| self.rules.get(i)) else {
            return refused(Denial::Unauthorized { known: false });
        };
        if !rule.upstreams.iter().any(|u| u == upstream) {
            return refused(Denial::Unauthorized { known: true });
        }
        let rate_limited = |retry_after| Denial::RateLimited { retry_after };
        let mode = self.sharing.map_or(Mode::Alone, |_| mode);
        let mut c = state.lock();
        let mut ask = false;
        let cap = match (mode, self.sharing.map(|s| s.fallback)) {
            (Mode::Shared, _) => {
                if !paid {
                    let lease = c.limits.lease;
                    match c.share.take_token(now, lease) {
                        Token::Taken { low } => {
                            paid = true;
                            ask |= low && c.share.want();
                        }
                        Token::Dry(retry) => return refused(rate_limited(retry)),
                        Token::Unknown => {
                            ask |= c.share.want();
                            let ticket = Ticket::new(state, &mut c, false, since);
                            return verdict(Ok(Admission::Waiting(ticket)), ask, state);
                        }
                    }
                }
                if rule.max_connections.is_some() && c.active >= c.share.held {
                    if c.share.full_since(since) {
                        return verdict(Err(Denial::TooManyConnections), ask, state);
                    }
                    ask |= c.share.want();
                    let ticket = Ticket::new(state, &mut c, paid, since);
                    return verdict(Ok(Admission::Waiting(ticket)), ask, state);
                }
                None
            }
            (Mode::Fallback, Some(Fallback::Refuse)) => {
                return refused(rate_limited(REFUSE_RETRY));
            }
            (Mode::Fallback, Some(Fallback::Split)) => {
                if !paid {
                    if let Err(retry) = c.share.fallback.take(now) {
                        return refused(rate_limited(retry));
                    }
                }
                let instances = self.sharing.map_or(1, |s| s.instances);
                rule.max_connections.map(|max| split_cap(max, instances))
            }
            _ => {
                if !paid {
                    if let Err(retry) = c.bucket.take(now) {
                        return refused(rate_limited(retry));
                    }
                }
                rule.max_connections
            }
        };
        if cap.is_some_and(|max| c.active >= max) {
            return refused(Denial::TooManyConnections);
        }
        c.active += 1;
        drop(c);
        let lease = ClientLease {
            state: state.clone(),
            released: false,
        };
        verdict(Ok(Admission::Admitted(lease)), ask, state)
    }

    /// Connections open per client identity (configured, or still connected).
    pub fn active(&self) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = self
            .rules
            .values()
            .map(|(_, s)| (s.identity.clone(), s.lock().active))
            .chain(
                self.former
                    .iter()
                    .filter_map(Weak::upgrade)
                    .map(|s| (s.identity.clone(), s.lock().active))
                    .filter(|(_, n)| *n > 0),
            )
            .collect();
        out.sort();
        out
    }
}

/// A verdict, with `state` to hand to the cluster thread if `ask`.
fn verdict(result: Result<Admission, Denial>, ask: bool, state: &Arc<ClientState>) -> Verdict {
    Verdict {
        result,
        ask: ask.then(|| Ask(state.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Access {
        /// An admission that cannot wait (no `[cluster]`, or its fallback).
        fn admit_now(
            &self,
            identity: Option<&str>,
            upstream: &str,
            now: Instant,
        ) -> Result<ClientLease, Denial> {
            match self
                .admit(identity, upstream, now, Mode::Fallback, None)
                .result
            {
                Ok(Admission::Admitted(lease)) => Ok(lease),
                Ok(Admission::Waiting(_)) => panic!("waits without [cluster]"),
                Err(denial) => Err(denial),
            }
        }
    }

    fn access() -> Access {
        Access::new(
            vec![
                ClientRule {
                    identity: "alice".into(),
                    upstreams: vec!["app-a".into()],
                    rate: 10.0,
                    burst: 2,
                    max_connections: Some(1),
                },
                ClientRule {
                    identity: "spiffe://example.org/bob".into(),
                    upstreams: vec!["app-a".into(), "app-b".into()],
                    rate: 100.0,
                    burst: 100,
                    max_connections: None,
                },
            ],
            None,
        )
    }

    fn shared(fallback: Fallback, max_connections: Option<u32>) -> Access {
        Access::new(
            vec![ClientRule {
                identity: "alice".into(),
                upstreams: vec!["app".into()],
                rate: 100.0,
                burst: 100,
                max_connections,
            }],
            Some(Sharing {
                instances: 2,
                fallback,
                lease: None,
            }),
        )
    }

    /// Redis's answer to the identity's request, as the cluster thread applies it.
    fn answer(a: &Access, granted: u32, wait_ms: u64, held: u32, now: Instant) -> Query {
        let state = a.state_of("alice").unwrap();
        let query = state.query(now).expect("a request to send");
        let wait = Duration::from_millis(wait_ms);
        state.apply(
            Answer {
                granted,
                wait,
                held,
            },
            now,
        );
        query
    }

    fn waiting(verdict: Verdict) -> (Ticket, bool) {
        match verdict.result {
            Ok(Admission::Waiting(ticket)) => (ticket, verdict.ask.is_some()),
            other => panic!("not waiting: {other:?}"),
        }
    }

    fn admitted(verdict: Verdict) -> (ClientLease, bool) {
        match verdict.result {
            Ok(Admission::Admitted(lease)) => (lease, verdict.ask.is_some()),
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[test]
    fn shared_admission_waits_once_then_spends_its_lease_locally() {
        let t0 = Instant::now();
        let a = shared(Fallback::Split, None);
        let alice = Some("alice");
        let (ticket, asked) = waiting(a.admit(alice, "app", t0, Mode::Shared, None));
        assert!(asked, "the first connection asks Redis");
        let query = answer(&a, 1, 0, 0, t0);
        assert_eq!(
            (query.request.want, query.max),
            (1, 0),
            "its own token only"
        );
        let (_first, _) = admitted(a.admit(alice, "app", t0, Mode::Shared, Some(ticket)));
        // It comes again: its token and a lease (a tenth of a second of the rate).
        let (ticket, _) = waiting(a.admit(alice, "app", t0, Mode::Shared, None));
        let query = answer(&a, 11, 0, 0, t0);
        assert_eq!(query.request.want, 11);
        let (_second, _) = admitted(a.admit(alice, "app", t0, Mode::Shared, Some(ticket)));
        let mut asks = 0;
        let mut leases = Vec::new();
        for _ in 0..10 {
            let (lease, asked) = admitted(a.admit(alice, "app", t0, Mode::Shared, None));
            asks += usize::from(asked);
            leases.push(lease);
        }
        assert_eq!(
            asks, 1,
            "one top-up ask as the lease runs low, however many spend"
        );
        // Spent: the next one waits; Redis finds the group's bucket empty.
        let (ticket, _) = waiting(a.admit(alice, "app", t0, Mode::Shared, None));
        answer(&a, 0, 40, 0, t0);
        let refused = a.admit(alice, "app", t0, Mode::Shared, Some(ticket));
        assert_eq!(
            refused.result.unwrap_err(),
            Denial::RateLimited {
                retry_after: Duration::from_millis(40)
            }
        );
        // Known dry: refused at once, without asking.
        let again = a.admit(
            alice,
            "app",
            t0 + Duration::from_millis(10),
            Mode::Shared,
            None,
        );
        assert!(again.ask.is_none());
        assert!(matches!(again.result, Err(Denial::RateLimited { .. })));
    }

    #[test]
    fn shared_caps_take_places_from_redis() {
        let t0 = Instant::now();
        let a = shared(Fallback::Split, Some(1));
        let alice = Some("alice");
        let (ticket, _) = waiting(a.admit(alice, "app", t0, Mode::Shared, None));
        let query = answer(&a, 1, 0, 0, t0);
        assert_eq!(
            (query.request.desired, query.max),
            (0, 1),
            "the token first"
        );
        // Token in hand, it now waits for a place.
        let (ticket, asked) = waiting(a.admit(alice, "app", t0, Mode::Shared, Some(ticket)));
        assert!(asked);
        let query = answer(&a, 0, 0, 1, t0);
        assert_eq!((query.request.want, query.request.desired), (0, 1));
        let (first, _) = admitted(a.admit(alice, "app", t0, Mode::Shared, Some(ticket)));
        // The group is at its cap: the next one waits, and Redis says full.
        let t1 = t0 + Duration::from_millis(1);
        let (ticket, _) = waiting(a.admit(alice, "app", t1, Mode::Shared, None));
        let query = answer(&a, 11, 0, 1, t1);
        assert_eq!((query.request.want, query.request.desired), (11, 1));
        let (ticket, asked) = waiting(a.admit(alice, "app", t1, Mode::Shared, Some(ticket)));
        assert!(asked, "its token in hand, it asks for a place");
        let query = answer(&a, 0, 0, 1, t1);
        assert_eq!((query.request.active, query.request.desired), (1, 2));
        let refused = a.admit(alice, "app", t1, Mode::Shared, Some(ticket));
        assert_eq!(refused.result.unwrap_err(), Denial::TooManyConnections);
        // Closing gives the place back to the group.
        let ask = first.release().expect("asks Redis to hold one place fewer");
        let query = ask.0.query(t1).unwrap();
        assert_eq!((query.request.active, query.request.desired), (0, 0));
    }

    #[test]
    fn the_fallback_splits_refuses_or_goes_alone() {
        let t0 = Instant::now();
        let alice = Some("alice");
        let split = shared(Fallback::Split, Some(3));
        let mut leases = Vec::new();
        // Two instances: half the burst, half the cap (rounded up).
        for _ in 0..2 {
            leases.push(admitted(split.admit(alice, "app", t0, Mode::Fallback, None)).0);
        }
        let third = split.admit(alice, "app", t0, Mode::Fallback, None);
        assert_eq!(third.result.unwrap_err(), Denial::TooManyConnections);
        leases.clear();
        let mut admitted_now = 0;
        while split
            .admit(alice, "app", t0, Mode::Fallback, None)
            .result
            .is_ok()
        {
            admitted_now += 1;
        }
        assert_eq!(
            admitted_now, 47,
            "50 of the burst of 100, three spent above"
        );
        let refuse = shared(Fallback::Refuse, None);
        assert!(matches!(
            refuse.admit(alice, "app", t0, Mode::Fallback, None).result,
            Err(Denial::RateLimited { .. })
        ));
        let local = shared(Fallback::Local, None);
        let mut alone = 0;
        while local
            .admit(alice, "app", t0, Mode::Fallback, None)
            .result
            .is_ok()
        {
            alone += 1;
        }
        assert_eq!(alone, 100, "the whole burst");
    }

    #[test]
    fn a_dropped_ticket_leaves_the_demand() {
        let t0 = Instant::now();
        let a = shared(Fallback::Split, None);
        let (ticket, _) = waiting(a.admit(Some("alice"), "app", t0, Mode::Shared, None));
        let state = a.state_of("alice").unwrap();
        assert!(state.has_waiters());
        drop(ticket);
        assert!(!state.has_waiters());
        // A waiting connection that runs out of patience is decided by the fallback.
        let (ticket, _) = waiting(a.admit(Some("alice"), "app", t0, Mode::Shared, None));
        let (_lease, _) = admitted(a.admit(Some("alice"), "app", t0, Mode::Fallback, Some(ticket)));
        assert!(!state.has_waiters());
    }

    #[test]
    fn identity_is_the_first_known_san() {
        let a = access();
        let names = vec![
            "mallory".to_string(),
            "spiffe://example.org/bob".to_string(),
            "alice".to_string(),
        ];
        assert_eq!(a.identify(&names), Some("spiffe://example.org/bob"));
        assert_eq!(a.identify(&["nobody".to_string()]), None);
    }

    #[test]
    fn checks_run_in_order_identity_upstream_rate_concurrency() {
        let t0 = Instant::now();
        let a = access();
        assert_eq!(
            a.admit_now(None, "app-a", t0),
            Err(Denial::Unauthorized { known: false })
        );
        assert_eq!(
            a.admit_now(Some("mallory"), "app-a", t0),
            Err(Denial::Unauthorized { known: false })
        );
        assert_eq!(
            a.admit_now(Some("alice"), "app-b", t0),
            Err(Denial::Unauthorized { known: true })
        );
        let lease = a.admit_now(Some("alice"), "app-a", t0).unwrap();
        // Within rate (burst 2) but over the concurrency cap of 1.
        assert_eq!(
            a.admit_now(Some("alice"), "app-a", t0),
            Err(Denial::TooManyConnections)
        );
        drop(lease);
        // The bucket is now empty: rate-limited before concurrency is looked at.
        assert_eq!(
            a.admit_now(Some("alice"), "app-a", t0),
            Err(Denial::RateLimited {
                retry_after: Duration::from_millis(100)
            })
        );
        let lease = a.admit_now(Some("alice"), "app-a", t0 + Duration::from_millis(100));
        drop(lease.unwrap());
    }

    #[test]
    fn reload_keeps_counts_and_applies_new_rules() {
        let t0 = Instant::now();
        let a = access();
        let old = a.admit_now(Some("alice"), "app-a", t0).unwrap();
        // alice moves to app-b only, with no cap; carol is new; bob is gone.
        let a = Access::reload(
            &a,
            vec![
                ClientRule {
                    identity: "alice".into(),
                    upstreams: vec!["app-b".into()],
                    rate: 10.0,
                    burst: 5,
                    max_connections: None,
                },
                ClientRule {
                    identity: "carol".into(),
                    upstreams: vec!["app-a".into()],
                    rate: 1.0,
                    burst: 1,
                    max_connections: None,
                },
            ],
        );
        assert_eq!(
            a.admit_now(Some("alice"), "app-a", t0),
            Err(Denial::Unauthorized { known: true })
        );
        let alice = a.admit_now(Some("alice"), "app-b", t0).unwrap();
        let carol = a.admit_now(Some("carol"), "app-a", t0).unwrap();
        let bob = Some("spiffe://example.org/bob");
        assert_eq!(
            a.admit_now(bob, "app-a", t0),
            Err(Denial::Unauthorized { known: false })
        );
        // The connection admitted before the reload still counts, and releases.
        let counts: HashMap<String, u32> = a.active().into_iter().collect();
        assert_eq!(counts["alice"], 2);
        assert!(!counts.contains_key("spiffe://example.org/bob"));
        drop(old);
        assert_eq!(a.active().iter().find(|(i, _)| i == "alice").unwrap().1, 1);
        drop(alice);
        drop(carol);
    }

    #[test]
    fn release_frees_a_slot_and_counts_are_visible() {
        let t0 = Instant::now();
        let a = access();
        let bob = Some("spiffe://example.org/bob");
        let leases: Vec<_> = (0..3)
            .map(|_| a.admit_now(bob, "app-b", t0).unwrap())
            .collect();
        let counts: HashMap<String, u32> = a.active().into_iter().collect();
        assert_eq!(counts["spiffe://example.org/bob"], 3);
        for lease in leases {
            drop(lease);
        }
        assert!(a.active().iter().all(|(_, n)| *n == 0));
    }
}
