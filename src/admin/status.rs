//! The `/status` document: the [`Stats`] snapshot as one JSON object, for
//! people and scripts rather than Prometheus. Its keys are part of the
//! interface (tests and users parse it): `uptime_seconds`, `pairs`,
//! `handshakes`, `reloads`, and per upstream `name`, `listen`, `tls`,
//! `removed`, `active_connections`, `queued` (clients waiting for a host
//! slot), `queue_wait_seconds` (`count` and `sum` of the waits of those
//! that left the queue) and `hosts` (each with `address`, `up`,
//! `removed`, `active_connections`, `weight`, `max_connections` (`null`
//! without a cap), `connections_total`, `connect_failures_total`), and
//! with `[cluster]` a `cluster` object (`redis`, `redis_up`).

use serde_json::{Value, json};

use super::metrics::{HostStats, Stats, UpstreamStats};

/// The `/status` document, keys in the order written here (serde_json's
/// `preserve_order`).
pub(crate) fn status_json(stats: &Stats) -> String {
    let mut doc = json!({
        "uptime_seconds": stats.uptime.as_secs(),
        "pairs": stats.pairs,
        "handshakes": stats.handshakes,
        "reloads": stats.reloads,
        "upstreams": stats.upstreams.iter().map(upstream).collect::<Vec<_>>(),
    });
    if let Some(cluster) = &stats.cluster {
        doc["cluster"] = json!({ "redis": cluster.redis, "redis_up": cluster.up });
    }
    doc.to_string()
}

fn upstream(u: &UpstreamStats) -> Value {
    json!({
        "name": u.name,
        "listen": u.listen.to_string(),
        "tls": u.tls,
        "removed": u.removed,
        "active_connections": u.hosts.iter().map(|h| h.active).sum::<u32>(),
        "queued": u.queued,
        "queue_wait_seconds": {"count": u.queue_waits.count, "sum": u.queue_waits.sum},
        "hosts": u.hosts.iter().map(host).collect::<Vec<_>>(),
    })
}

fn host(h: &HostStats) -> Value {
    json!({
        "address": h.addr.to_string(),
        "up": h.up,
        "removed": h.removed,
        "active_connections": h.active,
        "weight": h.weight,
        "max_connections": h.max_connections,
        "connections_total": h.connections,
        "connect_failures_total": h.connect_failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::metrics::sample;

    #[test]
    fn names_are_escaped() {
        let mut stats = sample();
        let name = "a\"b\\c\n\u{1}d";
        stats.upstreams[0].name = name.to_string();
        let json: Value = serde_json::from_str(&status_json(&stats)).unwrap();
        assert_eq!(json["upstreams"][0]["name"], name);
    }

    #[test]
    fn the_cluster_object_is_there_with_cluster_only() {
        let mut stats = sample();
        let json: Value = serde_json::from_str(&status_json(&stats)).unwrap();
        assert!(json.get("cluster").is_none());
        stats.cluster = Some(crate::admin::ClusterStats {
            redis: "redis://127.0.0.1:6379/0".into(),
            up: false,
            requests: 3,
            failures: 1,
        });
        let json: Value = serde_json::from_str(&status_json(&stats)).unwrap();
        assert_eq!(
            json["cluster"],
            serde_json::json!({"redis": "redis://127.0.0.1:6379/0", "redis_up": false})
        );
    }

    #[test]
    fn status_is_the_golden_document() {
        assert_eq!(status_json(&sample()), include_str!("golden/status.json"));
    }
}
