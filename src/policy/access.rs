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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use super::limits::{Bucket, Limit};

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

/// What an identity counts, shared by every worker and kept across
/// reloads while the identity keeps a rule (or has open connections).
#[derive(Debug)]
struct Counts {
    /// Its rate limit.
    bucket: Bucket,
    /// Open connections admitted under this identity.
    active: u32,
}

/// An identity's state. Touched once per admitted connection (and once
/// when it ends), never per byte.
#[derive(Debug)]
struct ClientState {
    identity: String,
    counts: Mutex<Counts>,
}

impl ClientState {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An admitted client's place in its concurrency count. Cannot be cloned;
/// dropping it gives the place back.
#[must_use = "dropping a client lease gives its place back at once"]
#[derive(Debug)]
pub(crate) struct ClientLease {
    state: Arc<ClientState>,
}

impl PartialEq for ClientLease {
    fn eq(&self, other: &ClientLease) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }
}

impl Drop for ClientLease {
    fn drop(&mut self) {
        let mut counts = self.state.lock();
        counts.active = counts.active.saturating_sub(1);
    }
}

/// The `[[client]]` rules in force, each with its identity's state.
#[derive(Debug, Default)]
pub struct Access {
    rules: HashMap<String, (ClientRule, Arc<ClientState>)>,
    /// Identities whose rule is gone but whose connections are still
    /// open, so their counts stay visible.
    former: Vec<Weak<ClientState>>,
}

impl Access {
    /// The rules of a config, with fresh state.
    pub fn new(rules: Vec<ClientRule>) -> Access {
        Access::reload(&Access::default(), rules)
    }

    /// The rules of a reloaded config: an identity that keeps a rule keeps
    /// its bucket (under the new limit) and its count; open connections
    /// keep counting against their identity whatever the new rules say.
    pub fn reload(old: &Access, rules: Vec<ClientRule>) -> Access {
        let mut access = Access::default();
        for rule in rules {
            let limit = Limit::new(rule.rate, rule.burst);
            let state = match old.state_of(&rule.identity) {
                Some(state) => {
                    state.lock().bucket.set_limit(limit);
                    state
                }
                None => Arc::new(ClientState {
                    identity: rule.identity.clone(),
                    counts: Mutex::new(Counts {
                        bucket: Bucket::new(limit),
                        active: 0,
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

    /// Admits `identity` to `upstream` at `now`, or says why not.
    pub(crate) fn admit(
        &self,
        identity: Option<&str>,
        upstream: &str,
        now: Instant,
    ) -> Result<ClientLease, Denial> {
        let Some((rule, state)) = identity.and_then(|i| self.rules.get(i)) else {
            return Err(Denial::Unauthorized { known: false });
        };
        if !rule.upstreams.iter().any(|u| u == upstream) {
            return Err(Denial::Unauthorized { known: true });
        }
        let mut counts = state.lock();
        counts
            .bucket
            .take(now)
            .map_err(|retry_after| Denial::RateLimited { retry_after })?;
        if rule.max_connections.is_some_and(|max| counts.active >= max) {
            return Err(Denial::TooManyConnections);
        }
        counts.active += 1;
        drop(counts);
        Ok(ClientLease {
            state: state.clone(),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access::new(vec![
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
        ])
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
            a.admit(None, "app-a", t0),
            Err(Denial::Unauthorized { known: false })
        );
        assert_eq!(
            a.admit(Some("mallory"), "app-a", t0),
            Err(Denial::Unauthorized { known: false })
        );
        assert_eq!(
            a.admit(Some("alice"), "app-b", t0),
            Err(Denial::Unauthorized { known: true })
        );
        let lease = a.admit(Some("alice"), "app-a", t0).unwrap();
        // Within rate (burst 2) but over the concurrency cap of 1.
        assert_eq!(
            a.admit(Some("alice"), "app-a", t0),
            Err(Denial::TooManyConnections)
        );
        drop(lease);
        // The bucket is now empty: rate-limited before concurrency is looked at.
        assert_eq!(
            a.admit(Some("alice"), "app-a", t0),
            Err(Denial::RateLimited {
                retry_after: Duration::from_millis(100)
            })
        );
        let lease = a.admit(Some("alice"), "app-a", t0 + Duration::from_millis(100));
        drop(lease.unwrap());
    }

    #[test]
    fn reload_keeps_counts_and_applies_new_rules() {
        let t0 = Instant::now();
        let a = access();
        let old = a.admit(Some("alice"), "app-a", t0).unwrap();
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
            a.admit(Some("alice"), "app-a", t0),
            Err(Denial::Unauthorized { known: true })
        );
        let alice = a.admit(Some("alice"), "app-b", t0).unwrap();
        let carol = a.admit(Some("carol"), "app-a", t0).unwrap();
        let bob = Some("spiffe://example.org/bob");
        assert_eq!(
            a.admit(bob, "app-a", t0),
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
        let leases: Vec<_> = (0..3).map(|_| a.admit(bob, "app-b", t0).unwrap()).collect();
        let counts: HashMap<String, u32> = a.active().into_iter().collect();
        assert_eq!(counts["spiffe://example.org/bob"], 3);
        for lease in leases {
            drop(lease);
        }
        assert!(a.active().iter().all(|(_, n)| *n == 0));
    }
}
