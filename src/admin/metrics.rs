//! What the loop reports: a [`Stats`] snapshot of its plain counters, taken
//! between two turns of the loop, and its rendering as Prometheus text
//! (`GET /metrics`, exposition format 0.0.4). Rendering works on the
//! snapshot only, so it is pure and testable; the `/status` JSON of the same
//! snapshot is in `status`. Hosts removed by a reload are shown while they
//! still have connections.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use crate::upstream::{DURATION_BUCKETS, Histogram};

/// A snapshot of the loop's counters (what [`Handle::stats`](crate::Handle::stats)
/// returns and the admin pages render).
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Pairs that exist, in any phase.
    pub pairs: usize,
    /// Pairs refusing a client (not counted against `max_connections`).
    pub refusing: usize,
    /// Relay buffers currently held by pairs.
    pub buffers_in_use: usize,
    /// Kernel pipes currently held by spliced directions of pairs.
    pub pipes_in_use: usize,
    /// Empty pipes kept for reuse (two descriptors each).
    pub pipes_free: usize,
    /// Times a direction that was to be spliced found no pipe (the
    /// `max_pipes` cap, or no descriptor left) and relayed through a
    /// buffer instead.
    pub splice_fallbacks: u64,
    /// TLS handshakes in progress.
    pub handshakes: usize,
    /// Time since the loop started.
    pub uptime: Duration,
    /// Successful reloads since start.
    pub reloads: u64,
    /// Every upstream, including removed ones that still have connections.
    pub upstreams: Vec<UpstreamStats>,
    /// Open connections per `[[client]]` identity.
    pub clients: Vec<(String, u32)>,
    /// Pairs per worker, in worker order.
    pub workers: Vec<usize>,
    /// With `[cluster]`: the Redis the limits are shared through.
    pub cluster: Option<ClusterStats>,
}

/// The `[cluster]` part of a [`Stats`] snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStats {
    /// The Redis URL, without its password.
    pub redis: String,
    /// Redis answers: limits are shared (else each instance falls back).
    pub up: bool,
    /// Requests sent to Redis.
    pub requests: u64,
    /// Times Redis was found down: connects or requests that failed or
    /// got no answer within the timeout.
    pub failures: u64,
}

/// One upstream's part of a [`Stats`] snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamStats {
    /// The upstream's configured name.
    pub name: String,
    /// The address it listens on (the bound one: a configured port 0 is resolved).
    pub listen: SocketAddr,
    /// Clients must pass mTLS.
    pub tls: bool,
    /// Removed by a reload; its connections are draining.
    pub removed: bool,
    /// Its hosts, in configuration order (removed ones included).
    pub hosts: Vec<HostStats>,
    /// Clients turned away, per reason (refusal code, `handshake_failed`,
    /// `handshake_timeout`, `source_rate_limited`, `handshake_capacity`).
    pub refused: Vec<(String, u64)>,
    /// Connections ended, per end reason (the access log's `end`).
    pub ended: Vec<(String, u64)>,
    /// Bytes relayed from clients to hosts.
    pub bytes_up: u64,
    /// Bytes relayed from hosts to clients.
    pub bytes_down: u64,
    /// Of `bytes_up`, those spliced (never copied through tcplb's memory).
    pub spliced_up: u64,
    /// Of `bytes_down`, those spliced.
    pub spliced_down: u64,
    /// Durations of connections that reached a host.
    pub durations: Histogram,
    /// Clients waiting for a host slot now (every host at its cap), in
    /// all workers.
    pub queued: u32,
    /// Time clients spent waiting for a host slot, observed as each left
    /// the queue (admitted, timed out, or gone).
    pub queue_waits: Histogram,
    /// Resets passed on at the half-close bound before the receiver had
    /// acknowledged every byte the reset side sent.
    pub undelivered_resets: u64,
    /// The bytes those resets left undelivered (tcplb's buffer plus what the
    /// receiver had not acknowledged).
    pub undelivered_bytes: u64,
}

/// One host's part of an [`UpstreamStats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStats {
    /// The host's address.
    pub addr: SocketAddr,
    /// Connections counted against the host (connecting or relaying).
    pub active: u32,
    /// Its configured weight.
    pub weight: u32,
    /// Its configured cap (`max_connections`), if it has one.
    pub max_connections: Option<u32>,
    /// Health checks (active or passive) have it up.
    pub up: bool,
    /// Removed by a reload or by DNS; its connections are draining.
    pub removed: bool,
    /// Connections established to the host.
    pub connections: u64,
    /// Connects to the host that failed or timed out.
    pub connect_failures: u64,
    /// Active health checks that passed.
    pub checks_passed: u64,
    /// Active health checks that failed.
    pub checks_failed: u64,
    /// Times health checks (active or passive) changed it between up and down.
    pub transitions: u64,
}

/// The Prometheus text exposition format (version 0.0.4): host families,
/// then upstream families, then the process's.
pub(crate) fn prometheus(stats: &Stats) -> String {
    let mut out = Exposition(String::with_capacity(4096 + stats.upstreams.len() * 1024));
    host_families(&mut out, stats);
    upstream_families(&mut out, stats);
    process_families(&mut out, stats);
    cluster_families(&mut out, stats);
    out.0
}

/// Text being written in the exposition format.
struct Exposition(String);

impl Exposition {
    /// A family's `# HELP` and `# TYPE` lines.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample: `name{labels} value`, the label values escaped.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                let comma = if i == 0 { "" } else { "," };
                let _ = write!(self.0, "{comma}{key}=\"{}\"", label(value));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A metric family with one value per item: name, type, help, the value.
type Family<T, V> = (&'static str, &'static str, &'static str, fn(&T) -> V);

/// One of an upstream's histograms.
type UpstreamHistogram = fn(&UpstreamStats) -> &Histogram;

/// An upstream's counts by reason (of ending, or of refusal).
type ReasonCounts = fn(&UpstreamStats) -> &[(String, u64)];

/// Per host: every host of every upstream, removed ones while they still
/// have connections.
fn host_families(out: &mut Exposition, stats: &Stats) {
    let hosts: Vec<(&str, String, &HostStats)> = stats
        .upstreams
        .iter()
        .flat_map(|u| {
            u.hosts
                .iter()
                .filter(|h| !h.removed || h.active > 0)
                .map(move |h| (u.name.as_str(), h.addr.to_string(), h))
        })
        .collect();
    let per_host: [Family<HostStats, u64>; 5] = [
        (
            "tcplb_connections_active",
            "gauge",
            "Connections a host is handling (connecting or relaying).",
            |h| u64::from(h.active),
        ),
        (
            "tcplb_connections_total",
            "counter",
            "Connections established to a host.",
            |h| h.connections,
        ),
        (
            "tcplb_connect_failures_total",
            "counter",
            "Connects to a host that failed or timed out.",
            |h| h.connect_failures,
        ),
        (
            "tcplb_host_up",
            "gauge",
            "1 when a host is up, 0 when health checks took it down.",
            |h| u64::from(h.up),
        ),
        (
            "tcplb_host_transitions_total",
            "counter",
            "Times health checks changed a host between up and down.",
            |h| h.transitions,
        ),
    ];
    for (name, kind, help, value) in per_host {
        out.family(name, kind, help);
        for (u, h, host) in &hosts {
            out.sample(name, &[("upstream", u), ("host", h)], value(host));
        }
    }
    let name = "tcplb_health_checks_total";
    out.family(name, "counter", "Active health checks, by result.");
    for (u, h, host) in &hosts {
        let labels = |result| [("upstream", *u), ("host", h.as_str()), ("result", result)];
        out.sample(name, &labels("passed"), host.checks_passed);
        out.sample(name, &labels("failed"), host.checks_failed);
    }
}

/// Per upstream: bytes, undelivered resets, ends, refusals, durations.
fn upstream_families(out: &mut Exposition, stats: &Stats) {
    let name = "tcplb_bytes_total";
    let help = "Bytes relayed, by direction (up: client to host).";
    out.family(name, "counter", help);
    for up in &stats.upstreams {
        out.sample(
            name,
            &[("upstream", &up.name), ("direction", "up")],
            up.bytes_up,
        );
        out.sample(
            name,
            &[("upstream", &up.name), ("direction", "down")],
            up.bytes_down,
        );
    }
    let name = "tcplb_spliced_bytes_total";
    let help = "Of the bytes relayed, those spliced through kernel pipes, by direction.";
    out.family(name, "counter", help);
    for up in &stats.upstreams {
        out.sample(
            name,
            &[("upstream", &up.name), ("direction", "up")],
            up.spliced_up,
        );
        out.sample(
            name,
            &[("upstream", &up.name), ("direction", "down")],
            up.spliced_down,
        );
    }
    let undelivered: [Family<UpstreamStats, u64>; 2] = [
        (
            "tcplb_undelivered_resets_total",
            "counter",
            "Resets passed on before the receiver had every byte the reset side sent (it did not read within half_close_timeout).",
            |u| u.undelivered_resets,
        ),
        (
            "tcplb_undelivered_bytes_total",
            "counter",
            "Bytes the receiver had not acknowledged when such a reset was passed on.",
            |u| u.undelivered_bytes,
        ),
    ];
    for (name, kind, help, value) in undelivered {
        out.family(name, kind, help);
        for up in &stats.upstreams {
            out.sample(name, &[("upstream", &up.name)], value(up));
        }
    }
    let by_reason: [(&str, &str, &str, ReasonCounts); 2] = [
        (
            "tcplb_connections_ended_total",
            "end",
            "Client connections ended, by end reason (the access log's end=).",
            |u| &u.ended,
        ),
        (
            "tcplb_refused_total",
            "reason",
            "Clients turned away, by reason.",
            |u| &u.refused,
        ),
    ];
    for (name, key, help, counts) in by_reason {
        out.family(name, "counter", help);
        for up in &stats.upstreams {
            for (reason, n) in counts(up) {
                out.sample(name, &[("upstream", &up.name), (key, reason)], n);
            }
        }
    }
    durations(out, stats);
}

/// The histograms of each upstream (connection durations, queue waits)
/// and the queue's length now.
fn durations(out: &mut Exposition, stats: &Stats) {
    let histograms: [(&str, &str, UpstreamHistogram); 2] = [
        (
            "tcplb_connection_duration_seconds",
            "Durations of connections that reached a host.",
            |u| &u.durations,
        ),
        (
            "tcplb_queue_wait_seconds",
            "Time clients waited for a host slot (every host at its max_connections), as each left the queue.",
            |u| &u.queue_waits,
        ),
    ];
    for (name, help, histogram) in histograms {
        out.family(name, "histogram", help);
        for up in &stats.upstreams {
            let (u, h) = (up.name.as_str(), histogram(up));
            let mut cumulative = 0;
            for (i, count) in h.counts.iter().enumerate() {
                cumulative += count;
                let le = DURATION_BUCKETS
                    .get(i)
                    .map_or("+Inf".to_string(), |b| b.to_string());
                let bucket = format!("{name}_bucket");
                out.sample(&bucket, &[("upstream", u), ("le", &le)], cumulative);
            }
            out.sample(&format!("{name}_sum"), &[("upstream", u)], h.sum);
            out.sample(&format!("{name}_count"), &[("upstream", u)], h.count);
        }
    }
    let name = "tcplb_queue_length";
    out.family(
        name,
        "gauge",
        "Clients waiting for a host slot now, in all workers.",
    );
    for up in &stats.upstreams {
        out.sample(name, &[("upstream", &up.name)], up.queued);
    }
}

/// Per client identity, the process's gauges, and per worker.
fn process_families(out: &mut Exposition, stats: &Stats) {
    let name = "tcplb_client_connections_active";
    out.family(name, "gauge", "Open connections per mTLS client identity.");
    for (identity, n) in &stats.clients {
        out.sample(name, &[("identity", identity)], n);
    }
    let process: [Family<Stats, f64>; 8] = [
        (
            "tcplb_pairs",
            "gauge",
            "Connection pairs in any phase.",
            |s| s.pairs as f64,
        ),
        (
            "tcplb_tls_handshakes_active",
            "gauge",
            "TLS handshakes in progress.",
            |s| s.handshakes as f64,
        ),
        (
            "tcplb_buffers_in_use",
            "gauge",
            "Relay buffers held by pairs.",
            |s| s.buffers_in_use as f64,
        ),
        (
            "tcplb_pipes_in_use",
            "gauge",
            "Kernel pipes held by spliced directions of pairs.",
            |s| s.pipes_in_use as f64,
        ),
        (
            "tcplb_pipes_free",
            "gauge",
            "Empty kernel pipes kept for reuse (two descriptors each).",
            |s| s.pipes_free as f64,
        ),
        (
            "tcplb_splice_fallbacks_total",
            "counter",
            "Times a direction to be spliced found no pipe (max_pipes, or no descriptor) and used a buffer.",
            |s| s.splice_fallbacks as f64,
        ),
        (
            "tcplb_reloads_total",
            "counter",
            "Successful configuration reloads.",
            |s| s.reloads as f64,
        ),
        (
            "tcplb_uptime_seconds",
            "gauge",
            "Seconds since start.",
            |s| s.uptime.as_secs_f64(),
        ),
    ];
    for (name, kind, help, value) in process {
        out.family(name, kind, help);
        out.sample(name, &[], value(stats));
    }
    let name = "tcplb_worker_pairs";
    out.family(name, "gauge", "Connection pairs a worker holds.");
    for (worker, pairs) in stats.workers.iter().enumerate() {
        out.sample(name, &[("worker", &worker.to_string())], pairs);
    }
}

/// With `[cluster]`: whether Redis answers, requests, failures.
fn cluster_families(out: &mut Exposition, stats: &Stats) {
    let Some(cluster) = &stats.cluster else {
        return;
    };
    let families: [Family<ClusterStats, u64>; 3] = [
        (
            "tcplb_cluster_redis_up",
            "gauge",
            "1 while Redis answers and client limits are shared by the group, 0 while each instance falls back.",
            |c| u64::from(c.up),
        ),
        (
            "tcplb_cluster_requests_total",
            "counter",
            "Requests sent to Redis for client limits.",
            |c| c.requests,
        ),
        (
            "tcplb_cluster_failures_total",
            "counter",
            "Times Redis was found down (a connect or request failed, or got no answer within the timeout).",
            |c| c.failures,
        ),
    ];
    for (name, kind, help, value) in families {
        out.family(name, kind, help);
        out.sample(name, &[("redis", &cluster.redis)], value(cluster));
    }
}

/// Escapes a label value (backslash, quote, newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A snapshot with one of everything, for the rendering tests.
#[cfg(test)]
pub(super) fn sample() -> Stats {
    let mut durations = Histogram::default();
    durations.observe(Duration::from_millis(20));
    let mut queue_waits = Histogram::default();
    queue_waits.observe(Duration::from_millis(300));
    Stats {
        pairs: 1,
        refusing: 0,
        buffers_in_use: 0,
        pipes_in_use: 1,
        pipes_free: 2,
        splice_fallbacks: 3,
        handshakes: 0,
        uptime: Duration::from_secs(5),
        reloads: 0,
        clients: vec![("spiffe://x/\"q\"".into(), 1)],
        workers: vec![1, 0],
        cluster: None,
        upstreams: vec![UpstreamStats {
            name: "app".into(),
            listen: "127.0.0.1:7000".parse().unwrap(),
            tls: false,
            removed: false,
            hosts: vec![HostStats {
                addr: "127.0.0.1:9001".parse().unwrap(),
                active: 1,
                weight: 2,
                max_connections: Some(100),
                up: true,
                removed: false,
                connections: 3,
                connect_failures: 1,
                checks_passed: 7,
                checks_failed: 0,
                transitions: 2,
            }],
            refused: vec![("overloaded".into(), 2)],
            ended: vec![("client_truncated".into(), 3)],
            bytes_up: 10,
            bytes_down: 20,
            spliced_up: 4,
            spliced_down: 16,
            durations,
            queued: 2,
            queue_waits,
            undelivered_resets: 1,
            undelivered_bytes: 4096,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_lines_and_escaping() {
        let text = prometheus(&sample());
        assert!(
            text.contains("tcplb_connections_active{upstream=\"app\",host=\"127.0.0.1:9001\"} 1\n")
        );
        assert!(text.contains("tcplb_refused_total{upstream=\"app\",reason=\"overloaded\"} 2\n"));
        assert!(text.contains(
            "tcplb_connections_ended_total{upstream=\"app\",end=\"client_truncated\"} 3\n"
        ));
        assert!(text.contains("tcplb_undelivered_resets_total{upstream=\"app\"} 1\n"));
        assert!(text.contains("tcplb_undelivered_bytes_total{upstream=\"app\"} 4096\n"));
        assert!(text.contains(
            "tcplb_connection_duration_seconds_bucket{upstream=\"app\",le=\"0.05\"} 1\n"
        ));
        assert!(text.contains(
            "tcplb_connection_duration_seconds_bucket{upstream=\"app\",le=\"0.01\"} 0\n"
        ));
        assert!(text.contains(
            "tcplb_connection_duration_seconds_bucket{upstream=\"app\",le=\"+Inf\"} 1\n"
        ));
        assert!(text.contains("identity=\"spiffe://x/\\\"q\\\"\"} 1"));
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn the_cluster_families_are_there_with_cluster_only() {
        let mut stats = sample();
        assert!(!prometheus(&stats).contains("tcplb_cluster"));
        stats.cluster = Some(ClusterStats {
            redis: "redis://127.0.0.1:6379/0".into(),
            up: true,
            requests: 12,
            failures: 1,
        });
        let text = prometheus(&stats);
        assert!(text.contains(
            "# TYPE tcplb_cluster_redis_up gauge\ntcplb_cluster_redis_up{redis=\"redis://127.0.0.1:6379/0\"} 1\n"
        ));
        assert!(
            text.contains("tcplb_cluster_requests_total{redis=\"redis://127.0.0.1:6379/0\"} 12\n")
        );
        assert!(
            text.contains("tcplb_cluster_failures_total{redis=\"redis://127.0.0.1:6379/0\"} 1\n")
        );
    }

    #[test]
    fn prometheus_text_is_the_golden_one() {
        // The whole exposition, byte for byte: a change of a family, a help
        // text or the order shows up as a diff of golden/metrics.prom.
        assert_eq!(prometheus(&sample()), include_str!("golden/metrics.prom"));
    }
}
