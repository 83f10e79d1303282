//! The `/status` document: the [`Stats`] snapshot as one JSON object, for
//! people and scripts rather than Prometheus. Its keys are part of the
//! interface (tests and users parse it): `uptime_seconds`, `pairs`,
//! `handshakes`, `reloads`, and per upstream `name`, `listen`, `tls`,
//! `removed`, `active_connections` and `hosts` (each with `address`, `up`,
//! `removed`, `active_connections`, `connections_total`,
//! `connect_failures_total`).

use std::fmt::Write as _;

use super::metrics::Stats;

/// The `/status` document.
pub(crate) fn status_json(stats: &Stats) -> String {
    let mut out = String::with_capacity(1024 + stats.upstreams.len() * 512);
    let _ = write!(
        out,
        "{{\"uptime_seconds\":{},\"pairs\":{},\"handshakes\":{},\"reloads\":{},\"upstreams\":[",
        stats.uptime.as_secs(),
        stats.pairs,
        stats.handshakes,
        stats.reloads
    );
    for (i, u) in stats.upstreams.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let active: u32 = u.hosts.iter().map(|h| h.active).sum();
        let _ = write!(
            out,
            "{{\"name\":{},\"listen\":{},\"tls\":{},\"removed\":{},\"active_connections\":{active},\"hosts\":[",
            json(&u.name),
            json(&u.listen.to_string()),
            u.tls,
            u.removed
        );
        for (j, h) in u.hosts.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                "{{\"address\":{},\"up\":{},\"removed\":{},\"active_connections\":{},\"connections_total\":{},\"connect_failures_total\":{}}}",
                json(&h.addr.to_string()),
                h.up,
                h.removed,
                h.active,
                h.connections,
                h.connect_failures
            );
        }
        out.push_str("]}");
    }
    out.push_str("]}");
    out
}

/// A JSON string literal.
fn json(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::metrics::sample;

    #[test]
    fn status_is_escaped_json() {
        let json = status_json(&sample());
        assert!(json.starts_with("{\"uptime_seconds\":5,"));
        assert!(json.contains("\"hosts\":[{\"address\":\"127.0.0.1:9001\",\"up\":true"));
        assert_eq!(super::json("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn status_is_the_golden_document() {
        assert_eq!(status_json(&sample()), include_str!("golden/status.json"));
    }
}
