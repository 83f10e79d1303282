//! An upstream as the loop serves it: its listener, its hosts (one record
//! each, in the balancer), and the counters metrics report.
//!
//! Upstreams and hosts keep their index for the life of the process, even
//! when a reload removes them (they are marked removed and drain), because
//! pairs, probes and timer entries refer to them by index.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{RefusalMode, UpstreamConfig};
use crate::policy::balance::LoadBalancer;
use crate::policy::health::HealthSettings;

/// Upper bounds (seconds) of the connection-duration histogram buckets.
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0,
];

/// A Prometheus-style histogram: counts per bucket (not cumulative; the
/// last count is for values above every bound), plus sum and count.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; DURATION_BUCKETS.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }
}

impl Histogram {
    pub fn observe(&mut self, value: Duration) {
        let secs = value.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.counts[bucket] += 1;
        self.sum += secs;
        self.count += 1;
    }
}

#[derive(Debug)]
pub(crate) struct Upstream {
    pub name: String,
    /// The address as configured (port 0 stays 0), to tell listen changes on reload.
    pub configured_listen: SocketAddr,
    /// The address actually bound.
    pub listen: SocketAddr,
    /// Key of its listener in the loop's listener slab, while it listens.
    pub listener: Option<usize>,
    /// Its hosts, each with its health, count and counters.
    pub balancer: LoadBalancer,
    /// Clients must complete an mTLS handshake and be admitted by the rules.
    pub tls: bool,
    pub health: HealthSettings,
    /// How its refused clients are told (a line, FIN or RST).
    pub refusal: RefusalMode,
    /// Removed by a reload: no longer listening; its pairs drain.
    pub removed: bool,
    /// Bytes relayed client to host and host to client.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Clients turned away, per reason.
    pub refused: BTreeMap<&'static str, u64>,
    /// Pairs ended, per end reason (the access log's `end`).
    pub ended: BTreeMap<&'static str, u64>,
    /// Durations of connections that reached a host.
    pub durations: Histogram,
    /// Resets passed on at the half-close bound before the receiver had
    /// every byte the reset side sent, and those bytes (tcplb's buffer
    /// and what the receiver had not acknowledged).
    pub undelivered_resets: u64,
    pub undelivered_bytes: u64,
}

impl Upstream {
    /// The upstream `config` describes, bound to `listen` (the address
    /// the kernel gave, when the config says port 0).
    pub fn new(config: &UpstreamConfig, listen: SocketAddr) -> Upstream {
        Upstream {
            name: config.name.clone(),
            configured_listen: config.listen,
            listen,
            listener: None,
            balancer: LoadBalancer::new(config.hosts.clone()),
            tls: config.tls,
            health: config.health.clone(),
            refusal: config.refusal,
            removed: false,
            bytes_up: 0,
            bytes_down: 0,
            refused: BTreeMap::new(),
            ended: BTreeMap::new(),
            durations: Histogram::default(),
            undelivered_resets: 0,
            undelivered_bytes: 0,
        }
    }

    /// A reset passed on with `bytes` of what the reset side sent not delivered.
    pub fn count_undelivered(&mut self, bytes: u64) {
        self.undelivered_resets += 1;
        self.undelivered_bytes += bytes;
    }

    pub fn count_refusal(&mut self, reason: &'static str) {
        *self.refused.entry(reason).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_bounds() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(7));
        h.observe(Duration::from_secs(7200));
        assert_eq!(h.counts[0], 1, "5 ms is in the 0.005 bucket");
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[DURATION_BUCKETS.len()], 1, "above every bound");
        assert_eq!(h.count, 3);
        assert!((h.sum - 7200.012).abs() < 1e-9);
    }
}
