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
    /// Health checks (active or passive) have it up.
    pub up: bool,
    /// Removed by a reload; its connections are draining.
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

/// A per-host metric family: name, type, help, and the host's value.
type HostFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&HostStats) -> u64,
);

/// The Prometheus text exposition format (version 0.0.4).
pub(crate) fn prometheus(stats: &Stats) -> String {
    let mut out = String::with_capacity(4096 + stats.upstreams.len() * 1024);
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    let hosts = || {
        stats.upstreams.iter().flat_map(|u| {
            u.hosts
                .iter()
                .filter(|h| !h.removed || h.active > 0)
                .map(move |h| (label(&u.name), label(&h.addr.to_string()), h))
        })
    };

    let per_host: [HostFamily; 5] = [
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
        family(&mut out, name, kind, help);
        for (u, h, host) in hosts() {
            let _ = writeln!(
                out,
                "{name}{{upstream=\"{u}\",host=\"{h}\"}} {}",
                value(host)
            );
        }
    }
    family(
        &mut out,
        "tcplb_health_checks_total",
        "counter",
        "Active health checks, by result.",
    );
    for (u, h, host) in hosts() {
        for (result, n) in [
            ("passed", host.checks_passed),
            ("failed", host.checks_failed),
        ] {
            let _ = writeln!(
                out,
                "tcplb_health_checks_total{{upstream=\"{u}\",host=\"{h}\",result=\"{result}\"}} {n}"
            );
        }
    }
    family(
        &mut out,
        "tcplb_bytes_total",
        "counter",
        "Bytes relayed, by direction (up: client to host).",
    );
    for up in &stats.upstreams {
        let u = label(&up.name);
        for (direction, n) in [("up", up.bytes_up), ("down", up.bytes_down)] {
            let _ = writeln!(
                out,
                "tcplb_bytes_total{{upstream=\"{u}\",direction=\"{direction}\"}} {n}"
            );
        }
    }
    family(
        &mut out,
        "tcplb_spliced_bytes_total",
        "counter",
        "Of the bytes relayed, those spliced through kernel pipes, by direction.",
    );
    for up in &stats.upstreams {
        let u = label(&up.name);
        for (direction, n) in [("up", up.spliced_up), ("down", up.spliced_down)] {
            let _ = writeln!(
                out,
                "tcplb_spliced_bytes_total{{upstream=\"{u}\",direction=\"{direction}\"}} {n}"
            );
        }
    }
    for (name, help, value) in [
        (
            "tcplb_undelivered_resets_total",
            "Resets passed on before the receiver had every byte the reset side sent (it did not read within half_close_timeout).",
            (|u| u.undelivered_resets) as fn(&UpstreamStats) -> u64,
        ),
        (
            "tcplb_undelivered_bytes_total",
            "Bytes the receiver had not acknowledged when such a reset was passed on.",
            |u| u.undelivered_bytes,
        ),
    ] {
        family(&mut out, name, "counter", help);
        for up in &stats.upstreams {
            let _ = writeln!(
                out,
                "{name}{{upstream=\"{}\"}} {}",
                label(&up.name),
                value(up)
            );
        }
    }
    family(
        &mut out,
        "tcplb_connections_ended_total",
        "counter",
        "Client connections ended, by end reason (the access log's end=).",
    );
    for up in &stats.upstreams {
        let u = label(&up.name);
        for (end, n) in &up.ended {
            let _ = writeln!(
                out,
                "tcplb_connections_ended_total{{upstream=\"{u}\",end=\"{}\"}} {n}",
                label(end)
            );
        }
    }
    family(
        &mut out,
        "tcplb_refused_total",
        "counter",
        "Clients turned away, by reason.",
    );
    for up in &stats.upstreams {
        let u = label(&up.name);
        for (reason, n) in &up.refused {
            let _ = writeln!(
                out,
                "tcplb_refused_total{{upstream=\"{u}\",reason=\"{}\"}} {n}",
                label(reason)
            );
        }
    }
    family(
        &mut out,
        "tcplb_connection_duration_seconds",
        "histogram",
        "Durations of connections that reached a host.",
    );
    for up in &stats.upstreams {
        let u = label(&up.name);
        let mut cumulative = 0;
        for (i, count) in up.durations.counts.iter().enumerate() {
            cumulative += count;
            let le = DURATION_BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "tcplb_connection_duration_seconds_bucket{{upstream=\"{u}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "tcplb_connection_duration_seconds_sum{{upstream=\"{u}\"}} {}",
            up.durations.sum
        );
        let _ = writeln!(
            out,
            "tcplb_connection_duration_seconds_count{{upstream=\"{u}\"}} {}",
            up.durations.count
        );
    }
    family(
        &mut out,
        "tcplb_client_connections_active",
        "gauge",
        "Open connections per mTLS client identity.",
    );
    for (identity, n) in &stats.clients {
        let _ = writeln!(
            out,
            "tcplb_client_connections_active{{identity=\"{}\"}} {n}",
            label(identity)
        );
    }
    for (name, kind, help, value) in [
        (
            "tcplb_pairs",
            "gauge",
            "Connection pairs in any phase.",
            stats.pairs as f64,
        ),
        (
            "tcplb_tls_handshakes_active",
            "gauge",
            "TLS handshakes in progress.",
            stats.handshakes as f64,
        ),
        (
            "tcplb_buffers_in_use",
            "gauge",
            "Relay buffers held by pairs.",
            stats.buffers_in_use as f64,
        ),
        (
            "tcplb_pipes_in_use",
            "gauge",
            "Kernel pipes held by spliced directions of pairs.",
            stats.pipes_in_use as f64,
        ),
        (
            "tcplb_pipes_free",
            "gauge",
            "Empty kernel pipes kept for reuse (two descriptors each).",
            stats.pipes_free as f64,
        ),
        (
            "tcplb_splice_fallbacks_total",
            "counter",
            "Times a direction to be spliced found no pipe (max_pipes, or no descriptor) and used a buffer.",
            stats.splice_fallbacks as f64,
        ),
        (
            "tcplb_reloads_total",
            "counter",
            "Successful configuration reloads.",
            stats.reloads as f64,
        ),
        (
            "tcplb_uptime_seconds",
            "gauge",
            "Seconds since start.",
            stats.uptime.as_secs_f64(),
        ),
    ] {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        &mut out,
        "tcplb_worker_pairs",
        "gauge",
        "Connection pairs a worker holds.",
    );
    for (worker, pairs) in stats.workers.iter().enumerate() {
        let _ = writeln!(out, "tcplb_worker_pairs{{worker=\"{worker}\"}} {pairs}");
    }
    out
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
        upstreams: vec![UpstreamStats {
            name: "app".into(),
            listen: "127.0.0.1:7000".parse().unwrap(),
            tls: false,
            removed: false,
            hosts: vec![HostStats {
                addr: "127.0.0.1:9001".parse().unwrap(),
                active: 1,
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
    fn prometheus_text_is_the_golden_one() {
        // The whole exposition, byte for byte: a change of a family, a help
        // text or the order shows up as a diff of golden/metrics.prom.
        assert_eq!(prometheus(&sample()), include_str!("golden/metrics.prom"));
    }
}
