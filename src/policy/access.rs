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

/// An identity known to the process (configured now or earlier).
type ClientId = usize;

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

/// An admitted client's place in its concurrency count. Cannot be cloned;
/// [`Access::release`] consumes it.
#[must_use = "a client lease must be given back with Access::release"]
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ClientLease {
    id: ClientId,
}

impl Drop for ClientLease {
    fn drop(&mut self) {
        super::lease_dropped("client");
    }
}

/// One identity: the rule in force (if any), its bucket and its count.
#[derive(Debug)]
struct Client {
    identity: String,
    rule: Option<ClientRule>,
    /// Its rate limit: kept across reloads while the identity keeps a rule.
    bucket: Bucket,
    /// Open connections admitted under this identity.
    active: u32,
}

/// The `[[client]]` rules in force, and the state each keeps.
#[derive(Debug)]
pub struct Access {
    /// Every identity ever configured: a [`ClientLease`] of a connection
    /// admitted under an old rule still finds its count after a reload.
    clients: Vec<Client>,
    by_identity: HashMap<String, ClientId>,
}

impl Access {
    /// The rules of a config.
    pub fn new(rules: Vec<ClientRule>) -> Access {
        let mut access = Access {
            clients: Vec::new(),
            by_identity: HashMap::new(),
        };
        access.reload(rules);
        access
    }

    /// Puts `rules` in force for new connections; open connections keep
    /// counting against their identity, and an identity that keeps a rule
    /// keeps its bucket.
    pub fn reload(&mut self, rules: Vec<ClientRule>) {
        let mut kept = vec![false; self.clients.len()];
        for rule in rules {
            let limit = Limit::new(rule.rate, rule.burst);
            match self.by_identity.get(&rule.identity) {
                Some(&id) => {
                    let client = &mut self.clients[id];
                    if client.rule.is_some() {
                        client.bucket.set_limit(limit);
                    } else {
                        client.bucket = Bucket::new(limit);
                    }
                    client.rule = Some(rule);
                    kept[id] = true;
                }
                None => {
                    self.by_identity
                        .insert(rule.identity.clone(), self.clients.len());
                    self.clients.push(Client {
                        identity: rule.identity.clone(),
                        rule: Some(rule),
                        bucket: Bucket::new(limit),
                        active: 0,
                    });
                }
            }
        }
        for (client, kept) in self.clients.iter_mut().zip(kept) {
            if !kept {
                client.rule = None;
            }
        }
    }

    /// The identity among a certificate's `names` that a rule knows: the
    /// first name, in certificate order, that names a configured client.
    pub fn identify<'a>(&self, names: &'a [String]) -> Option<&'a str> {
        names
            .iter()
            .find(|n| self.rule_of(n).is_some())
            .map(String::as_str)
    }

    fn rule_of(&self, identity: &str) -> Option<ClientId> {
        let &id = self.by_identity.get(identity)?;
        self.clients[id].rule.as_ref().map(|_| id)
    }

    /// Admits `identity` to `upstream` at `now`, or says why not.
    pub(crate) fn admit(
        &mut self,
        identity: Option<&str>,
        upstream: &str,
        now: Instant,
    ) -> Result<ClientLease, Denial> {
        let Some(id) = identity.and_then(|i| self.rule_of(i)) else {
            return Err(Denial::Unauthorized { known: false });
        };
        let client = &mut self.clients[id];
        let rule = client.rule.as_ref().expect("rule_of found it");
        if !rule.upstreams.iter().any(|u| u == upstream) {
            return Err(Denial::Unauthorized { known: true });
        }
        let max_connections = rule.max_connections;
        client
            .bucket
            .take(now)
            .map_err(|retry_after| Denial::RateLimited { retry_after })?;
        if max_connections.is_some_and(|max| client.active >= max) {
            return Err(Denial::TooManyConnections);
        }
        client.active += 1;
        Ok(ClientLease { id })
    }

    /// Ends a connection admitted by [`admit`](Self::admit).
    pub(crate) fn release(&mut self, lease: ClientLease) {
        let client = &mut self.clients[lease.id];
        client.active = client.active.saturating_sub(1);
        std::mem::forget(lease);
    }

    /// Connections open per client identity (configured, or still connected).
    pub fn active(&self) -> impl Iterator<Item = (&str, u32)> {
        self.clients
            .iter()
            .filter(|c| c.rule.is_some() || c.active > 0)
            .map(|c| (c.identity.as_str(), c.active))
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
        let lease = a.admit(Some("alice"), "app-a", t0).unwrap();
        // Within rate (burst 2) but over the concurrency cap of 1.
        assert_eq!(
            a.admit(Some("alice"), "app-a", t0),
            Err(Denial::TooManyConnections)
        );
        a.release(lease);
        // The bucket is now empty: rate-limited before concurrency is looked at.
        assert_eq!(
            a.admit(Some("alice"), "app-a", t0),
            Err(Denial::RateLimited {
                retry_after: Duration::from_millis(100)
            })
        );
        let lease = a.admit(Some("alice"), "app-a", t0 + Duration::from_millis(100));
        a.release(lease.unwrap());
    }

    #[test]
    fn reload_keeps_counts_and_applies_new_rules() {
        let t0 = Instant::now();
        let mut a = access();
        let old = a.admit(Some("alice"), "app-a", t0).unwrap();
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
        let alice = a.admit(Some("alice"), "app-b", t0).unwrap();
        let carol = a.admit(Some("carol"), "app-a", t0).unwrap();
        let bob = Some("spiffe://example.org/bob");
        assert_eq!(
            a.admit(bob, "app-a", t0),
            Err(Denial::Unauthorized { known: false })
        );
        // The connection admitted before the reload still counts, and releases.
        let counts: HashMap<&str, u32> = a.active().collect();
        assert_eq!(counts["alice"], 2);
        assert!(!counts.contains_key("spiffe://example.org/bob"));
        a.release(old);
        assert_eq!(a.active().find(|(i, _)| *i == "alice").unwrap().1, 1);
        a.release(alice);
        a.release(carol);
    }

    #[test]
    fn release_frees_a_slot_and_counts_are_visible() {
        let t0 = Instant::now();
        let mut a = access();
        let bob = Some("spiffe://example.org/bob");
        let leases: Vec<_> = (0..3).map(|_| a.admit(bob, "app-b", t0).unwrap()).collect();
        let counts: HashMap<&str, u32> = a.active().collect();
        assert_eq!(counts["spiffe://example.org/bob"], 3);
        for lease in leases {
            a.release(lease);
        }
        assert!(a.active().all(|(_, n)| n == 0));
    }
}
