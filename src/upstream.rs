//! An upstream as served: its name, address and hosts (one shared record
//! each, in the balancer), and what each worker counts about it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::config::{RefusalMode, Settings, UpstreamConfig};
use crate::policy::balance::LoadBalancer;
use crate::policy::health::HealthSettings;
use crate::policy::trust::SourceNet;
use crate::proxy_header::{self, Version};

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
    /// Adds another histogram's counts.
    pub fn add(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.sum += other.sum;
        self.count += other.count;
    }

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

/// An upstream as configured and served: shared by every worker, and
/// replaced, not changed, by a reload (which keeps its hosts' records).
#[derive(Debug)]
pub(crate) struct Upstream {
    /// Stable for the process's life, by name: where workers keep its counters.
    pub id: usize,
    pub name: String,
    /// The address as configured (port 0 stays 0), to tell listen changes on reload.
    pub configured_listen: SocketAddr,
    /// The address actually bound.
    pub listen: SocketAddr,
    /// Its hosts, each with its health, count and counters.
    pub balancer: LoadBalancer,
    /// Clients must complete an mTLS handshake and be admitted by the rules.
    pub tls: bool,
    pub health: HealthSettings,
    /// How its refused clients are told (a line, FIN or RST).
    pub refusal: RefusalMode,
    /// Its own `queue_timeout` and `max_queued`, if it sets them.
    pub queue_timeout: Option<Duration>,
    pub max_queued: Option<u32>,
    /// The PROXY protocol header its hosts get first, if any.
    pub send_proxy: Option<Version>,
    /// Peers whose connections begin with a PROXY protocol header; empty:
    /// clients connect directly, and none may send one.
    pub accept_proxy: Vec<SourceNet>,
    /// What an active check sends (`health.send`), after a `LOCAL` PROXY
    /// header when the hosts get one: a host that requires the header
    /// takes the check for its own and still answers it.
    pub probe_send: Option<Vec<u8>>,
}

impl Upstream {
    /// The upstream `config` describes, with id `id`, bound to `listen`
    /// (the address the kernel gave when the config says port 0), with
    /// `balancer`'s hosts.
    pub fn new(
        id: usize,
        config: &UpstreamConfig,
        listen: SocketAddr,
        balancer: LoadBalancer,
    ) -> Upstream {
        Upstream {
            id,
            name: config.name.clone(),
            configured_listen: config.listen,
            listen,
            balancer,
            tls: config.tls,
            health: config.health.clone(),
            refusal: config.refusal,
            queue_timeout: config.queue_timeout,
            max_queued: config.max_queued,
            send_proxy: config.send_proxy,
            accept_proxy: config.accept_proxy.clone(),
            probe_send: config
                .health
                .send
                .as_ref()
                .map(|send| match config.send_proxy {
                    Some(version) => [proxy_header::encode_local(version), send.clone()].concat(),
                    None => send.clone(),
                }),
        }
    }

    /// How long its clients may wait for a host slot, and how many at
    /// once: its own settings, or `settings`' (`[defaults]`).
    pub fn queue_limits(&self, settings: &Settings) -> (Duration, u32) {
        (
            self.queue_timeout.unwrap_or(settings.queue_timeout),
            self.max_queued.unwrap_or(settings.max_queued),
        )
    }

    /// Whether `ip` is a peer on `accept_proxy`, whose connections begin
    /// with a PROXY header.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.accept_proxy.iter().any(|net| net.contains(ip))
    }
}

/// What one worker counts for one upstream: plain integers, summed over
/// the workers when a snapshot is taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Counters {
    /// Bytes relayed client to host and host to client.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Of those, bytes spliced through kernel pipes, each way.
    pub spliced_up: u64,
    pub spliced_down: u64,
    /// Clients turned away, per reason.
    pub refused: BTreeMap<&'static str, u64>,
    /// Pairs ended, per end reason (the access log's `end`).
    pub ended: BTreeMap<&'static str, u64>,
    /// Durations of connections that reached a host.
    pub durations: Histogram,
    /// Time clients spent waiting for a host slot, observed as each
    /// leaves the queue (admitted, timed out, or gone).
    pub queue_waits: Histogram,
    /// Resets passed on at the half-close bound before the receiver had
    /// every byte the reset side sent, and those bytes (tcplb's buffer
    /// and what the receiver had not acknowledged).
    pub undelivered_resets: u64,
    pub undelivered_bytes: u64,
}

impl Counters {
    /// A reset passed on with `bytes` of what the reset side sent not delivered.
    pub fn count_undelivered(&mut self, bytes: u64) {
        self.undelivered_resets += 1;
        self.undelivered_bytes += bytes;
    }

    pub fn count_refusal(&mut self, reason: &'static str) {
        *self.refused.entry(reason).or_default() += 1;
    }

    /// Adds another worker's counts.
    pub fn add(&mut self, other: &Counters) {
        self.bytes_up += other.bytes_up;
        self.bytes_down += other.bytes_down;
        self.spliced_up += other.spliced_up;
        self.spliced_down += other.spliced_down;
        for (mine, theirs) in [
            (&mut self.refused, &other.refused),
            (&mut self.ended, &other.ended),
        ] {
            for (k, n) in theirs {
                *mine.entry(k).or_default() += n;
            }
        }
        self.durations.add(&other.durations);
        self.queue_waits.add(&other.queue_waits);
        self.undelivered_resets += other.undelivered_resets;
        self.undelivered_bytes += other.undelivered_bytes;
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
