//! Who may use which upstream, how often and how much: the `[[client]]`
//! rules applied after a TLS handshake has proved a client's identity.
//! Pure policy (`now` is passed in), unit-testable without sockets.
//!
//! Checks run in the order the design fixes: is the identity known? is it
//! allowed on this upstream? is it within its connection rate and its
//! concurrency cap? A client admitted here counts against its cap until
//! [`Access::release`] is called, exactly once, when its pair ends.
//!
//! A [`ClientId`] names an identity for the life of the process, across
//! reloads, so pairs admitted under old rules release the right count and
//! a client keeps its bucket when its rule changes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::limits::{Limit, RateLimiter, Verdict};

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

/// Index of an admitted client's rule, to release it later.
pub type ClientId = usize;

/// Why a client with a valid certificate is turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// Unknown identity, or not allowed on this upstream (told apart only in logs).
    Unauthorized {
        known: bool,
    },
    RateLimited {
        retry_after: Duration,
    },
    TooManyConnections,
}

#[derive(Debug)]
pub struct Access {
    /// Every identity ever configured; a `ClientId` indexes this.
    identities: Vec<String>,
    by_identity: HashMap<String, ClientId>,
    /// The rule in force per identity (`None`: no longer configured).
    rules: Vec<Option<ClientRule>>,
    active: Vec<u32>,
    limiter: RateLimiter<ClientId>,
}

impl Access {
    pub fn new(rules: Vec<ClientRule>) -> Access {
        let mut access = Access {
            identities: Vec::new(),
            by_identity: HashMap::new(),
            rules: Vec::new(),
            active: Vec::new(),
            limiter: RateLimiter::new(HashMap::new()),
        };
        access.reload(rules);
        access
    }

    /// Puts `rules` in force for new connections; open connections keep
    /// counting against their identity.
    pub fn reload(&mut self, rules: Vec<ClientRule>) {
        for rule in &mut self.rules {
            *rule = None;
        }
        let mut limits = HashMap::new();
        for rule in rules {
            let id = match self.by_identity.get(&rule.identity) {
                Some(&id) => id,
                None => {
                    self.identities.push(rule.identity.clone());
                    self.rules.push(None);
                    self.active.push(0);
                    let id = self.identities.len() - 1;
                    self.by_identity.insert(rule.identity.clone(), id);
                    id
                }
            };
            limits.insert(id, Limit::new(rule.rate, rule.burst));
            self.rules[id] = Some(rule);
        }
        self.limiter.set_limits(limits);
    }

    /// The identity among a certificate's `names` that a rule knows: the
    /// first name, in certificate order, that names a configured client.
    pub fn identify<'a>(&self, names: &'a [String]) -> Option<&'a str> {
        names
            .iter()
            .find(|n| self.rule_of(n).is_some())
            .map(String::as_str)
    }

    fn rule_of(&self, identity: &str) -> Option<(ClientId, &ClientRule)> {
        let &id = self.by_identity.get(identity)?;
        Some((id, self.rules[id].as_ref()?))
    }

    /// Admits `identity` to `upstream` at `now`, or says why not.
    pub fn admit(
        &mut self,
        identity: Option<&str>,
        upstream: &str,
        now: Instant,
    ) -> Result<ClientId, Denial> {
        let Some((id, rule)) = identity.and_then(|i| self.rule_of(i)) else {
            return Err(Denial::Unauthorized { known: false });
        };
        if !rule.upstreams.iter().any(|u| u == upstream) {
            return Err(Denial::Unauthorized { known: true });
        }
        let max_connections = rule.max_connections;
        match self.limiter.check(&id, now) {
            Verdict::Allowed => {}
            Verdict::Limited { retry_after } => return Err(Denial::RateLimited { retry_after }),
            Verdict::Unknown => return Err(Denial::Unauthorized { known: false }),
        }
        if max_connections.is_some_and(|max| self.active[id] >= max) {
            return Err(Denial::TooManyConnections);
        }
        self.active[id] += 1;
        Ok(id)
    }

    /// Ends a connection admitted by [`admit`](Self::admit).
    pub fn release(&mut self, id: ClientId) {
        debug_assert!(self.active[id] > 0);
        self.active[id] = self.active[id].saturating_sub(1);
    }

    /// Connections open per client identity (configured, or still connected).
    pub fn active(&self) -> impl Iterator<Item = (&str, u32)> {
        self.identities
            .iter()
            .zip(&self.rules)
            .zip(&self.active)
            .filter(|((_, rule), n)| rule.is_some() || **n > 0)
            .map(|((identity, _), &n)| (identity.as_str(), n))
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
        let mut a = access();
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
        let id = a.admit(Some("alice"), "app-a", t0).unwrap();
        // Within rate (burst 2) but over the concurrency cap of 1.
        assert_eq!(
            a.admit(Some("alice"), "app-a", t0),
            Err(Denial::TooManyConnections)
        );
        a.release(id);
        // The bucket is now empty: rate-limited before concurrency is looked at.
        assert_eq!(
            a.admit(Some("alice"), "app-a", t0),
            Err(Denial::RateLimited {
                retry_after: Duration::from_millis(100)
            })
        );
        assert!(
            a.admit(Some("alice"), "app-a", t0 + Duration::from_millis(100))
                .is_ok()
        );
    }

    #[test]
    fn reload_keeps_counts_and_applies_new_rules() {
        let t0 = Instant::now();
        let mut a = access();
        let id = a.admit(Some("alice"), "app-a", t0).unwrap();
        // alice moves to app-b only, with no cap; carol is new; bob is gone.
        a.reload(vec![
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
        ]);
        assert_eq!(
            a.admit(Some("alice"), "app-a", t0),
            Err(Denial::Unauthorized { known: true })
        );
        assert!(a.admit(Some("alice"), "app-b", t0).is_ok());
        assert!(a.admit(Some("carol"), "app-a", t0).is_ok());
        let bob = Some("spiffe://example.org/bob");
        assert_eq!(
            a.admit(bob, "app-a", t0),
            Err(Denial::Unauthorized { known: false })
        );
        // The connection admitted before the reload still counts, and releases.
        let counts: HashMap<&str, u32> = a.active().collect();
        assert_eq!(counts["alice"], 2);
        assert!(!counts.contains_key("spiffe://example.org/bob"));
        a.release(id);
        assert_eq!(a.active().find(|(i, _)| *i == "alice").unwrap().1, 1);
    }

    #[test]
    fn release_frees_a_slot_and_counts_are_visible() {
        let t0 = Instant::now();
        let mut a = access();
        let bob = Some("spiffe://example.org/bob");
        let ids: Vec<_> = (0..3).map(|_| a.admit(bob, "app-b", t0).unwrap()).collect();
        let counts: HashMap<&str, u32> = a.active().collect();
        assert_eq!(counts["spiffe://example.org/bob"], 3);
        for id in ids {
            a.release(id);
        }
        assert!(a.active().all(|(_, n)| n == 0));
    }
}
