//! The walk of `[[upstream]]` tables and their `[upstream.health]`, and the
//! checks across upstreams: names are unique and listen addresses do not
//! collide on bind. Each table yields a [`ParsedUpstream`], which keeps the
//! spans of its name and listen address for those checks and for the
//! client rules that name upstreams.

use std::net::SocketAddr;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::problems::Problems;
use super::rules;
use super::tables::{as_table, find, tables, unknown_keys};
use super::values::{Value, Zero, address, boolean, duration, fill, integer, networks, string};
use super::{RefusalMode, UpstreamConfig};
use crate::policy::health::HealthSettings;
use crate::proxy_header::Version;

const UPSTREAM_KEYS: &[&str] = &[
    "name",
    "listen",
    "hosts",
    "tls",
    "refusal",
    "send_proxy",
    "accept_proxy",
    "health",
];
const HEALTH_KEYS: &[&str] = &[
    "interval",
    "timeout",
    "rise",
    "fall",
    "send",
    "expect",
    "close_on_down",
    "slow_start",
];

/// What one `[[upstream]]` table yielded: the name and listen address
/// that were readable, with their spans, and the whole upstream if the
/// table had no problem.
pub(super) struct ParsedUpstream {
    pub(super) name: Option<Spanned<String>>,
    listen: Option<Spanned<SocketAddr>>,
    pub(super) config: Option<UpstreamConfig>,
    /// It sets `accept_proxy` itself (else it takes `[defaults]`'s).
    pub(super) own_accept_proxy: bool,
}

/// Every `[[upstream]]` of the document (at least one is required), checked
/// against each other; `tls_present` says whether `[tls]` exists.
pub(super) fn upstreams(
    p: &mut Problems<'_>,
    root: &DeTable<'_>,
    tls_present: bool,
) -> Vec<ParsedUpstream> {
    if find(root, "upstream").is_none() {
        p.general("no upstream is defined (add an [[upstream]] table)".to_string());
    }
    let parsed: Vec<ParsedUpstream> = tables(p, root, "upstream")
        .into_iter()
        .map(|(table, span)| upstream(p, table, span, tls_present))
        .collect();
    unique_names(p, &parsed);
    distinct_listens(p, &parsed);
    parsed
}

fn upstream(
    p: &mut Problems<'_>,
    table: &DeTable<'_>,
    span: Range<usize>,
    tls_present: bool,
) -> ParsedUpstream {
    unknown_keys(p, table, UPSTREAM_KEYS, "in [[upstream]]");
    let name = match find(table, "name") {
        Some(v) => name(p, v),
        None => {
            p.at(span.clone(), "upstream has no `name`".to_string());
            None
        }
    };
    let label = name.as_ref().map_or_else(
        || "upstream".to_string(),
        |n| format!("upstream `{}`", n.get_ref()),
    );
    let listen = match find(table, "listen") {
        Some(v) => address(p, v, "listen"),
        None => {
            p.at(span.clone(), format!("{label} has no `listen` address"));
            None
        }
    };
    let hosts = match find(table, "hosts") {
        Some(v) => hosts(p, v, &label, listen.as_ref().map(|l| *l.get_ref())),
        None => {
            p.at(span, format!("{label} has no `hosts`"));
            None
        }
    };
    let tls = find(table, "tls").map_or(Some(tls_present), |v| tls(p, v, &label, tls_present));
    let health = find(table, "health").map_or(Some(HealthSettings::default()), |v| {
        let not_a_table = format!("{label}: `health` must be a table ([upstream.health])");
        as_table(p, v, not_a_table).and_then(|t| health(p, t, &label))
    });
    let refusal = find(table, "refusal").map_or(Some(RefusalMode::default()), |v| refusal(p, v));
    let send_proxy = find(table, "send_proxy").map_or(Some(None), |v| send_proxy(p, v).map(Some));
    let own_accept_proxy = find(table, "accept_proxy");
    let accept_proxy =
        own_accept_proxy.map_or(Some(Vec::new()), |v| networks(p, v, "accept_proxy"));
    let proxy = send_proxy.zip(accept_proxy);
    let config = match (&name, &listen, hosts, tls, health, refusal, proxy) {
        (
            Some(name),
            Some(listen),
            Some(hosts),
            Some(tls),
            Some(health),
            Some(refusal),
            Some((send_proxy, accept_proxy)),
        ) => Some(UpstreamConfig {
            name: name.get_ref().clone(),
            listen: *listen.get_ref(),
            hosts,
            tls,
            health,
            refusal,
            send_proxy,
            accept_proxy,
        }),
        _ => None,
    };
    ParsedUpstream {
        name,
        listen,
        config,
        own_accept_proxy: own_accept_proxy.is_some(),
    }
}

fn name(p: &mut Problems<'_>, v: &Value<'_>) -> Option<Spanned<String>> {
    let name = string(p, v, "name")?;
    match rules::name(name) {
        Ok(()) => Some(Spanned::new(v.span(), name.to_string())),
        Err(why) => {
            p.at(v.span(), format!("upstream name: {why}"));
            None
        }
    }
}

/// `hosts` of an upstream: none twice, none on port 0, none that is the
/// upstream's own `listen` address (tcplb would connect to itself).
fn hosts(
    p: &mut Problems<'_>,
    v: &Value<'_>,
    label: &str,
    listen: Option<SocketAddr>,
) -> Option<Vec<SocketAddr>> {
    let DeValue::Array(items) = v.get_ref() else {
        let message = format!("{label}: `hosts` must be an array of \"host:port\" strings");
        p.at(v.span(), message);
        return None;
    };
    if items.is_empty() {
        p.at(v.span(), format!("{label} has no hosts"));
        return None;
    }
    let mut hosts: Vec<SocketAddr> = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in items.iter() {
        match address(p, item, "hosts") {
            Some(addr) if hosts.contains(addr.get_ref()) => {
                ok = false;
                let message = format!("{label}: host {} is listed twice", addr.get_ref());
                p.at(item.span(), message);
            }
            Some(addr) if addr.get_ref().port() == 0 => {
                ok = false;
                let message = format!(
                    "{label}: host {} has port 0, which nothing can be connected to",
                    addr.get_ref()
                );
                p.at(item.span(), message);
            }
            Some(addr) if listen.is_some_and(|l| loops_back(l, *addr.get_ref())) => {
                ok = false;
                let message = format!(
                    "{label}: host {} is the upstream's own listen address: tcplb would connect to itself, each connection making another",
                    addr.get_ref()
                );
                p.at(item.span(), message);
            }
            Some(addr) => hosts.push(*addr.get_ref()),
            None => ok = false,
        }
    }
    ok.then_some(hosts)
}

/// `tls` of an upstream: true needs a `[tls]` table.
fn tls(p: &mut Problems<'_>, v: &Value<'_>, label: &str, tls_present: bool) -> Option<bool> {
    let tls = boolean(p, v, "tls")?;
    if tls && !tls_present {
        let message = format!("{label} has `tls = true` but there is no [tls] table");
        p.at(v.span(), message);
        return None;
    }
    Some(tls)
}

/// `refusal` of an upstream: how its refused clients are told.
fn refusal(p: &mut Problems<'_>, v: &Value<'_>) -> Option<RefusalMode> {
    let name = string(p, v, "refusal")?;
    let mode = RefusalMode::from_name(name);
    if mode.is_none() {
        let expected = RefusalMode::NAMES.map(|n| format!("\"{n}\"")).join(", ");
        let message = format!("`refusal` must be one of {expected}, not \"{name}\"");
        p.at(v.span(), message);
    }
    mode
}

/// `send_proxy` of an upstream: the PROXY protocol version its hosts get.
fn send_proxy(p: &mut Problems<'_>, v: &Value<'_>) -> Option<Version> {
    let name = string(p, v, "send_proxy")?;
    let version = Version::from_name(name);
    if version.is_none() {
        let expected = Version::NAMES.map(|n| format!("\"{n}\"")).join(" or ");
        let message = format!("`send_proxy` must be {expected}, not \"{name}\"");
        p.at(v.span(), message);
    }
    version
}

/// `[upstream.health]`: its presence turns active checks on.
fn health(p: &mut Problems<'_>, table: &DeTable<'_>, label: &str) -> Option<HealthSettings> {
    let place = format!("in the health table of {label}");
    unknown_keys(p, table, HEALTH_KEYS, &place);
    let mut h = HealthSettings {
        active: true,
        ..HealthSettings::default()
    };
    let mut ok = true;
    for (key, slot) in [("interval", &mut h.interval), ("timeout", &mut h.timeout)] {
        ok &= fill(
            slot,
            find(table, key).map(|v| duration(p, v, key, Zero::Refused)),
        );
    }
    for (key, slot) in [("rise", &mut h.rise), ("fall", &mut h.fall)] {
        let streak = |v: &Value<'_>| integer(p, v, key, rules::HEALTH_STREAK).map(|n| n as u32);
        ok &= fill(slot, find(table, key).map(streak));
    }
    for (key, slot) in [("send", &mut h.send), ("expect", &mut h.expect)] {
        let bytes = |v: &Value<'_>| {
            let text = string(p, v, key)?;
            p.check(v.span(), key, rules::probe_bytes(text)).map(Some)
        };
        ok &= fill(slot, find(table, key).map(bytes));
    }
    let close_on_down = find(table, "close_on_down").map(|v| boolean(p, v, "close_on_down"));
    ok &= fill(&mut h.close_on_down, close_on_down);
    let slow_start = find(table, "slow_start").map(|v| {
        duration(p, v, "slow_start", Zero::Allowed).map(|d| Some(d).filter(|d| !d.is_zero()))
    });
    ok &= fill(&mut h.slow_start, slow_start);
    ok.then_some(h)
}

/// A name given to two upstreams is reported at the second.
fn unique_names(p: &mut Problems<'_>, upstreams: &[ParsedUpstream]) {
    for (i, u) in upstreams.iter().enumerate() {
        let Some(name) = &u.name else { continue };
        let taken = upstreams[..i]
            .iter()
            .any(|e| e.name.as_ref().map(|n| n.get_ref()) == Some(name.get_ref()));
        if taken {
            let message = format!("duplicate upstream name `{}`", name.get_ref());
            p.at(name.span(), message);
        }
    }
}

/// A listen address that would collide on bind with an earlier one.
fn distinct_listens(p: &mut Problems<'_>, upstreams: &[ParsedUpstream]) {
    for (i, u) in upstreams.iter().enumerate() {
        let Some(listen) = &u.listen else { continue };
        let clash = upstreams[..i]
            .iter()
            .filter_map(|e| e.listen.as_ref())
            .find(|e| listens_collide(*e.get_ref(), *listen.get_ref()));
        if let Some(other) = clash {
            let message = format!(
                "listen address {} uses the same port as {} of another upstream",
                listen.get_ref(),
                other.get_ref()
            );
            p.at(listen.span(), message);
        }
    }
}

/// Whether connecting to `host` reaches the listener on `listen`: the
/// same address, or a loopback address on the port of a wildcard listener
/// (IPv6 wildcards take IPv4 too). Other local addresses are not known
/// here, so a host on another interface address is not caught.
fn loops_back(listen: SocketAddr, host: SocketAddr) -> bool {
    if listen.port() == 0 || listen.port() != host.port() {
        return false;
    }
    listen.ip() == host.ip()
        || (listen.ip().is_unspecified()
            && (host.ip().is_loopback() || host.ip().is_unspecified())
            && (listen.is_ipv6() || host.is_ipv4()))
}

/// Two listen addresses collide when they share a port and either the same IP
/// or a wildcard of the same family. Port 0 (kernel-chosen) never collides.
fn listens_collide(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    a.ip() == b.ip()
        || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{Config, problems};

    #[test]
    fn health_tables_turn_active_checks_on() {
        let config = Config::parse(
            r#"
[admin]
listen = "127.0.0.1:9900"

[[upstream]]
name = "redis"
listen = "127.0.0.1:7000"
hosts = ["127.0.0.1:6379"]

[upstream.health]
interval = "500ms"
timeout = "200ms"
rise = 1
fall = 2
send = "PING\r\n"
expect = "+PONG"
close_on_down = true
slow_start = "30s"

[[upstream]]
name = "plain"
listen = "127.0.0.1:7001"
hosts = ["127.0.0.1:6380"]
"#,
            "lb.toml",
        )
        .unwrap();
        assert_eq!(config.admin, Some("127.0.0.1:9900".parse().unwrap()));
        let h = &config.upstreams[0].health;
        assert!(h.active && h.close_on_down);
        assert_eq!(
            (h.interval, h.timeout, h.rise, h.fall),
            (Duration::from_millis(500), Duration::from_millis(200), 1, 2)
        );
        assert_eq!(h.send.as_deref(), Some(&b"PING\r\n"[..]));
        assert_eq!(h.slow_start, Some(Duration::from_secs(30)));
        assert!(!config.upstreams[1].health.active);
        let found = problems(
            "[[upstream]]\nname=\"a\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n[upstream.health]\nrise = 0\nsend = \"\"\nwhatever = 1\n",
        );
        let text = found.join("\n");
        assert!(
            text.contains("6:8: `rise` must be between 1 and 1000, not 0"),
            "{text}"
        );
        assert!(text.contains("7:8: `send` is empty"), "{text}");
        assert!(
            text.contains("8:1: unknown key `whatever` in the health table of upstream `a`"),
            "{text}"
        );
    }

    #[test]
    fn refusal_says_how_clients_are_turned_away() {
        let upstream = |refusal: &str| {
            format!(
                "[[upstream]]\nname=\"a\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n{refusal}"
            )
        };
        let mode =
            |text: &str| Config::parse(&upstream(text), "lb.toml").unwrap().upstreams[0].refusal;
        assert_eq!(mode(""), RefusalMode::Line);
        assert_eq!(mode("refusal = \"line\""), RefusalMode::Line);
        assert_eq!(mode("refusal = \"close\""), RefusalMode::Close);
        assert_eq!(mode("refusal = \"reset\""), RefusalMode::Reset);
        assert_eq!(
            problems(&upstream("refusal = \"drop\"")),
            ["lb.toml:5:11: `refusal` must be one of \"line\", \"close\", \"reset\", not \"drop\""]
        );
        assert_eq!(
            problems(&upstream("refusal = true")),
            ["lb.toml:5:11: `refusal` must be a string"]
        );
    }

    #[test]
    fn proxy_protocol_keys_are_read_and_checked() {
        let text = r#"[defaults]
accept_proxy = ["10.0.0.0/8", "127.0.0.1"]

[[upstream]]
name = "inherits"
listen = "127.0.0.1:7000"
hosts = ["127.0.0.1:9001"]
send_proxy = "v2"

[[upstream]]
name = "own"
listen = "127.0.0.1:7001"
hosts = ["127.0.0.1:9001"]
send_proxy = "v1"
accept_proxy = ["::1"]

[[upstream]]
name = "direct"
listen = "127.0.0.1:7002"
hosts = ["127.0.0.1:9001"]
accept_proxy = []
"#;
        let config = Config::parse(text, "lb.toml").unwrap();
        let shown = |u: &UpstreamConfig| {
            let nets: Vec<String> = u.accept_proxy.iter().map(ToString::to_string).collect();
            (u.send_proxy.map(Version::name), nets.join(" "))
        };
        let got: Vec<_> = config.upstreams.iter().map(shown).collect();
        assert_eq!(
            got,
            [
                (Some("v2"), "10.0.0.0/8 127.0.0.1/32".to_string()),
                (Some("v1"), "::1/128".to_string()),
                (None, String::new()),
            ]
        );
        assert_eq!(config.settings.accept_proxy.len(), 2);
        let found = problems(
            r#"[defaults]
accept_proxy = "10.0.0.0/8"

[[upstream]]
name = "a"
listen = "127.0.0.1:7000"
hosts = ["127.0.0.1:9001"]
send_proxy = "v3"
accept_proxy = ["10.0.0.0/33", "10.1.0.0/8", "lan", 10]

[[upstream]]
name = "b"
listen = "127.0.0.1:7001"
hosts = ["127.0.0.1:9001"]
send_proxy = 2
"#,
        );
        assert_eq!(
            found,
            [
                "lb.toml:2:16: `accept_proxy` must be an array of networks, such as [\"10.0.0.0/8\"]",
                "lb.toml:8:14: `send_proxy` must be \"v1\" or \"v2\", not \"v3\"",
                "lb.toml:9:17: `accept_proxy` network `10.0.0.0/33` has a prefix longer than /32, the most an IPv4 network has",
                "lb.toml:9:32: `accept_proxy` network `10.1.0.0/8` has bits set past its /8 prefix (the network is 10.0.0.0/8)",
                "lb.toml:9:46: `accept_proxy` network `lan` is neither a network such as 10.0.0.0/8 nor an address such as 127.0.0.1",
                "lb.toml:9:53: `accept_proxy` must be a string",
                "lb.toml:15:14: `send_proxy` must be a string",
            ]
        );
        let everyone = "[[upstream]]\nname=\"a\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\naccept_proxy = [\"0.0.0.0/0\"]\n";
        assert_eq!(
            crate::config::warnings(everyone),
            [
                "lb.toml:5:17: warning: `accept_proxy` holds 0.0.0.0/0, every address: any peer may then send a header claiming any client address"
            ]
        );
    }

    #[test]
    fn hosts_that_cannot_work_are_errors() {
        let found = problems(
            r#"[[upstream]]
name = "a"
listen = "127.0.0.1:7000"
hosts = ["127.0.0.1:0", "127.0.0.1:7000", "127.0.0.1:7001"]

[[upstream]]
name = "b"
listen = "0.0.0.0:7002"
hosts = ["127.0.0.1:7002", "[::1]:7002", "10.0.0.1:7002"]
"#,
        );
        assert_eq!(
            found,
            [
                "lb.toml:4:10: upstream `a`: host 127.0.0.1:0 has port 0, which nothing can be connected to",
                "lb.toml:4:25: upstream `a`: host 127.0.0.1:7000 is the upstream's own listen address: tcplb would connect to itself, each connection making another",
                "lb.toml:9:10: upstream `b`: host 127.0.0.1:7002 is the upstream's own listen address: tcplb would connect to itself, each connection making another",
            ]
        );
        let any: SocketAddr = "[::]:80".parse().unwrap();
        assert!(loops_back(any, "127.0.0.1:80".parse().unwrap()));
        assert!(loops_back(any, "[::1]:80".parse().unwrap()));
        assert!(!loops_back(any, "127.0.0.1:81".parse().unwrap()));
        let zero: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(
            !loops_back(zero, zero),
            "port 0 listens on a port of its own"
        );
    }

    #[test]
    fn wildcard_listen_collides_with_specific_address_on_same_port() {
        let a: SocketAddr = "0.0.0.0:80".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let c: SocketAddr = "[::1]:80".parse().unwrap();
        let zero: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(listens_collide(a, b));
        assert!(!listens_collide(a, c));
        assert!(!listens_collide(zero, zero));
    }
}
