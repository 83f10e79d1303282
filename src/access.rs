//! Who may use which upstream, how often and how much: the `[[client]]`
//! rules applied after a TLS handshake has proved a client's identity.
//! Pure policy (`now` is passed in), unit-testable without sockets.
//!
//! Checks run in the order the design fixes: is the identity known? is it
//! allowed on this upstream? is it within its connection rate and its
//! concurrency cap? A client admitted here counts against its cap until
//! [`Access::release`] is called, exactly once, when its pair ends.

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
    rules: Vec<ClientRule>,
    by_identity: HashMap<String, ClientId>,
    active: Vec<u32>,
    limiter: RateLimiter<ClientId>,
}

impl Access {
    pub fn new(rules: Vec<ClientRule>) -> Access {
        let by_identity = rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.identity.clone(), i))
            .collect();
        let limits = rules
            .iter()
            .enumerate()
            .map(|(i, r)| (i, Limit::new(r.rate, r.burst)))
            .collect();
        Access {
            active: vec![0; rules.len()],
            rules,
            by_identity,
            limiter: RateLimiter::new(limits),
        }
    }

    /// The identity among a certificate's `names` that a rule knows: the
    /// first name, in certificate order, that names a configured client.
    pub fn identify<'a>(&self, names: &'a [String]) -> Option<&'a str> {
        names
            .iter()
            .find(|n| self.by_identity.contains_key(n.as_str()))
            .map(String::as_str)
    }

    /// Admits `identity` to `upstream` at `now`, or says why not.
    pub fn admit(
        &mut self,
        identity: Option<&str>,
        upstream: &str,
        now: Instant,
    ) -> Result<ClientId, Denial> {
        let Some(&id) = identity.and_then(|i| self.by_identity.get(i)) else {
            return Err(Denial::Unauthorized { known: false });
        };
        let rule = &self.rules[id];
        if !rule.upstreams.iter().any(|u| u == upstream) {
            return Err(Denial::Unauthorized { known: true });
        }
        match self.limiter.check(&id, now) {
            Verdict::Allowed => {}
            Verdict::Limited { retry_after } => return Err(Denial::RateLimited { retry_after }),
            Verdict::Unknown => return Err(Denial::Unauthorized { known: false }),
        }
        if rule
            .max_connections
            .is_some_and(|max| self.active[id] >= max)
        {
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

    /// Connections open per client identity.
    pub fn active(&self) -> impl Iterator<Item = (&str, u32)> {
        self.rules
            .iter()
            .zip(&self.active)
            .map(|(r, &n)| (r.identity.as_str(), n))
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
