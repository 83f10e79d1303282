//! The walk of `[[upstream]]` tables and their `[upstream.health]`, and the
//! checks across upstreams: names are unique and listen addresses do not
//! collide on bind. A host is a `"host:port"` string or a table with its
//! `address`, `weight` and `max_connections`; a host given by name (either
//! way) is looked up here (from `[defaults] resolver`, or the system's
//! resolver) and keeps its name, weight and cap, so that it can be looked
//! up again while tcplb runs. Each table yields a [`ParsedUpstream`],
//! which keeps the spans of its name and listen address for those checks
//! and for the client rules that name upstreams.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::problems::Problems;
use super::rules;
use super::tables::{as_table, find, required, tables, unknown_keys};
use super::values::{
    self, Value, Written, Zero, address, boolean, duration, fill, integer, networks, string,
};
use super::{HostConfig, HostName, RefusalMode, Settings, UpstreamConfig};
use crate::dns::Resolver;
use crate::policy::health::HealthSettings;
use crate::policy::trust::SourceNet;
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
    "queue_timeout",
    "max_queued",
];
const HOST_KEYS: &[&str] = &["address", "weight", "max_connections"];
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
    lookups: Lookups,
) -> Vec<ParsedUpstream> {
    if find(root, "upstream").is_none() {
        p.general("no upstream is defined (add an [[upstream]] table)".to_string());
    }
    let parsed: Vec<ParsedUpstream> = tables(p, root, "upstream")
        .into_iter()
        .map(|(table, span)| upstream(p, table, span, tls_present, lookups))
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
    lookups: Lookups,
) -> ParsedUpstream {
    unknown_keys(p, table, UPSTREAM_KEYS, "in [[upstream]]");
    let at = (table, &span);
    let name = required(p, at, "name", || "upstream has no `name`".to_string(), name);
    let label = name.as_ref().map_or_else(
        || "upstream".to_string(),
        |n| format!("upstream `{}`", n.get_ref()),
    );
    let no_listen = || format!("{label} has no `listen` address");
    let listen = required(p, at, "listen", no_listen, |p, v| address(p, v, "listen"));
    let own = listen.as_ref().map(|l| *l.get_ref());
    let no_hosts = || format!("{label} has no `hosts`");
    let hosts = required(p, at, "hosts", no_hosts, |p, v| {
        hosts(p, v, &label, own, lookups)
    });
    let tls = find(table, "tls").map_or(Some(tls_present), |v| tls(p, v, &label, tls_present));
    let health = find(table, "health").map_or(Some(HealthSettings::default()), |v| {
        let not_a_table = format!("{label}: `health` must be a table ([upstream.health])");
        as_table(p, v, not_a_table).and_then(|t| health(p, t, &label))
    });
    let refusal = find(table, "refusal").map_or(Some(RefusalMode::default()), |v| refusal(p, v));
    let queue = queue(p, table);
    let proxy = proxy_protocol(p, table);
    let own_accept_proxy = find(table, "accept_proxy").is_some();
    let config = match (&name, &listen, hosts, tls, health, refusal, queue, proxy) {
        (
            Some(name),
            Some(listen),
            Some((hosts, names)),
            Some(tls),
            Some(health),
            Some(refusal),
            Some((queue_timeout, max_queued)),
            Some((send_proxy, accept_proxy)),
        ) => Some(UpstreamConfig {
            name: name.get_ref().clone(),
            listen: *listen.get_ref(),
            hosts,
            names,
            tls,
            health,
            refusal,
            queue_timeout,
            max_queued,
            send_proxy,
            accept_proxy,
        }),
        _ => None,
    };
    ParsedUpstream {
        name,
        listen,
        config,
        own_accept_proxy,
    }
}

/// An upstream's own `queue_timeout` and `max_queued` (`None` in each:
/// `[defaults]`' applies); `None` if either is wrong.
fn queue(p: &mut Problems<'_>, table: &DeTable<'_>) -> Option<(Option<Duration>, Option<u32>)> {
    let mut queue_timeout = Some(None);
    if let Some(v) = find(table, "queue_timeout") {
        queue_timeout = duration(p, v, "queue_timeout", Zero::Allowed).map(Some);
    }
    let mut max_queued = Some(None);
    if let Some(v) = find(table, "max_queued") {
        max_queued = integer(p, v, "max_queued", rules::QUEUED).map(|n| Some(n as u32));
    }
    queue_timeout.zip(max_queued)
}

/// An upstream's `send_proxy` (`None`: it sends no header) and
/// `accept_proxy` (empty: `[defaults]`' applies, unless it was written);
/// `None` if either is wrong.
fn proxy_protocol(
    p: &mut Problems<'_>,
    table: &DeTable<'_>,
) -> Option<(Option<Version>, Vec<SourceNet>)> {
    let send_proxy = find(table, "send_proxy").map_or(Some(None), |v| send_proxy(p, v).map(Some));
    let accept_proxy =
        find(table, "accept_proxy").map_or(Some(Vec::new()), |v| networks(p, v, "accept_proxy"));
    send_proxy.zip(accept_proxy)
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

/// How the walk takes `name:port` hosts: where it looks names up, and
/// whether a name that does not resolve now may still join later
/// (`resolve_interval` on: a warning) or never will (off: an error).
#[derive(Clone, Copy, Debug)]
pub(super) struct Lookups {
    resolver: Resolver,
    interval: Duration,
}

impl Lookups {
    /// The lookups `[defaults]` asks for.
    pub(super) fn of(settings: &Settings) -> Lookups {
        Lookups {
            resolver: Resolver::of(settings.resolver),
            interval: settings.resolve_interval,
        }
    }
}

/// `hosts` of an upstream, by address and by name: none twice, none on
/// port 0, none that is the upstream's own `listen` address (tcplb would
/// connect to itself). Each is a `"host:port"` string or a table with its
/// `address`, `weight` and `max_connections`. A name is looked up now and
/// each of its addresses is a host, with the weight and cap of its entry.
fn hosts(
    p: &mut Problems<'_>,
    v: &Value<'_>,
    label: &str,
    listen: Option<SocketAddr>,
    lookups: Lookups,
) -> Option<(Vec<HostConfig>, Vec<HostName>)> {
    let DeValue::Array(items) = v.get_ref() else {
        let message = format!(
            "{label}: `hosts` must be an array of \"host:port\" strings or {{ address = \"host:port\", ... }} tables"
        );
        p.at(v.span(), message);
        return None;
    };
    if items.is_empty() {
        p.at(v.span(), format!("{label} has no hosts"));
        return None;
    }
    let mut found = Found {
        literal: Vec::with_capacity(items.len()),
        names: Vec::new(),
    };
    let mut ok = true;
    for value in items.iter() {
        ok &= one_host(p, value, label, listen, lookups, &mut found);
    }
    shared_addresses(p, label, &found.literal, &found.names);
    let names = found.names.into_iter().map(|(n, _)| n).collect();
    ok.then_some((found.literal, names))
}

/// An upstream's hosts read so far: by address, and by name with where
/// each name was written.
struct Found {
    literal: Vec<HostConfig>,
    names: Vec<(HostName, Range<usize>)>,
}

/// Reads one entry of `hosts` into `found`: false if it is wrong (and
/// reported), or listed twice, or the upstream's own address.
fn one_host(
    p: &mut Problems<'_>,
    value: &Value<'_>,
    label: &str,
    listen: Option<SocketAddr>,
    lookups: Lookups,
    found: &mut Found,
) -> bool {
    let Some(item) = host(p, value, label) else {
        return false;
    };
    let written = match values::written(item.text) {
        Ok(written) => written,
        Err(why) => {
            let message = format!("`{}` address `{}`: {why}", item.key, item.text);
            p.at(item.at, message);
            return false;
        }
    };
    let Some((weight, max_connections)) = item.limits else {
        return false;
    };
    match written {
        Written::Literal(addr) => {
            let twice = found.literal.iter().any(|h| h.addr == addr);
            let text = addr.to_string();
            let problem = host_problem(label, &text, addr.port(), twice).or_else(|| {
                let loops = listen.is_some_and(|l| loops_back(l, addr));
                loops.then(|| loop_problem(label, &text))
            });
            if let Some(message) = problem {
                p.at(item.at, message);
                return false;
            }
            found.literal.push(HostConfig {
                addr,
                weight,
                max_connections,
            });
            true
        }
        Written::Name(name, port) => {
            let twice = (found.names.iter())
                .any(|(n, _)| n.port == port && n.name.eq_ignore_ascii_case(name));
            if let Some(message) = host_problem(label, item.text, port, twice) {
                p.at(item.at, message);
                return false;
            }
            let Some(addrs) = named(p, &item, (name, port), label, listen, lookups) else {
                return false;
            };
            let host = HostName {
                name: name.to_string(),
                port,
                weight,
                max_connections,
                addrs,
            };
            found.names.push((host, item.at));
            true
        }
    }
}

/// What is wrong with a host whatever its address: listed twice, or port 0.
fn host_problem(label: &str, host: &str, port: u16, twice: bool) -> Option<String> {
    if twice {
        Some(format!("{label}: host {host} is listed twice"))
    } else if port == 0 {
        Some(format!(
            "{label}: host {host} has port 0, which nothing can be connected to"
        ))
    } else {
        None
    }
}

fn loop_problem(label: &str, host: &str) -> String {
    format!(
        "{label}: host {host} is the upstream's own listen address: tcplb would connect to itself, each connection making another"
    )
}

/// The addresses of a `name:port` host, looked up now. One that does not
/// resolve is an error when `resolve_interval` is off; with it on, a
/// warning (the name may appear later), and the name starts without
/// addresses.
fn named(
    p: &mut Problems<'_>,
    item: &Item<'_>,
    (name, port): (&str, u16),
    label: &str,
    listen: Option<SocketAddr>,
    lookups: Lookups,
) -> Option<Vec<SocketAddr>> {
    let (at, text, key) = (item.at.clone(), item.text, item.key);
    if !p.lookups() {
        let message = format!("`{key}` address `{text}`: {}", values::not_looked_up(name));
        p.at(at, message);
        return None;
    }
    let addrs = match values::look_up(lookups.resolver, name, port) {
        Ok(addrs) => addrs,
        Err(why) if !lookups.interval.is_zero() => {
            let message = format!(
                "`{key}` address `{text}`: {why}; it is looked up again every {:?} (`resolve_interval`), and its addresses join once it resolves",
                lookups.interval
            );
            p.warn(at.clone(), message);
            Vec::new()
        }
        Err(why) => {
            let message = format!(
                "`{key}` address `{text}`: {why} (with `resolve_interval = \"0s\"` names are looked up only as the config is read)"
            );
            p.at(at, message);
            return None;
        }
    };
    if let Some(addr) = addrs
        .iter()
        .find(|a| listen.is_some_and(|l| loops_back(l, **a)))
    {
        let message = loop_problem(label, &format!("{text} ({addr})"));
        p.at(at, message);
        return None;
    }
    Some(addrs)
}

/// A name's address that another host of the upstream also has is one
/// host: valid, but likely not meant, so a warning.
fn shared_addresses(
    p: &mut Problems<'_>,
    label: &str,
    hosts: &[HostConfig],
    names: &[(HostName, Range<usize>)],
) {
    for (i, (name, at)) in names.iter().enumerate() {
        let earlier = names[..i].iter().flat_map(|(n, _)| &n.addrs);
        let taken: Vec<&SocketAddr> = hosts.iter().map(|h| &h.addr).chain(earlier).collect();
        if let Some(addr) = name.addrs.iter().find(|a| taken.contains(a)) {
            let message = format!(
                "{label}: `{name}` resolves to {addr}, which another of its hosts is too: the two are one host, with the other's weight and cap"
            );
            p.warn(at.clone(), message);
        }
    }
}

/// One item of `hosts` as written, before its address is read.
struct Item<'v> {
    /// The address, `"IP:port"` or `"name:port"`.
    text: &'v str,
    /// The key that holds it, for messages: `hosts` for a plain string,
    /// `address` in a table.
    key: &'static str,
    /// Where problems with the address are reported.
    at: Range<usize>,
    /// Its weight and cap; `None` when they had a problem (reported).
    limits: Option<(u32, Option<u32>)>,
}

/// One item of `hosts`: a `"host:port"` string, or a table with an
/// `address` and optionally `weight` and `max_connections`.
fn host<'v>(p: &mut Problems<'_>, item: &'v Value<'_>, label: &str) -> Option<Item<'v>> {
    let table = match item.get_ref() {
        DeValue::String(_) => {
            return Some(Item {
                text: string(p, item, "hosts")?,
                key: "hosts",
                at: item.span(),
                limits: Some((HostConfig::DEFAULT_WEIGHT, None)),
            });
        }
        DeValue::Table(table) => table,
        _ => {
            let message = format!(
                "{label}: each host must be a \"host:port\" string or a table such as {{ address = \"host:port\", weight = 2 }}"
            );
            p.at(item.span(), message);
            return None;
        }
    };
    unknown_keys(p, table, HOST_KEYS, &format!("in a host of {label}"));
    let address = match find(table, "address") {
        Some(v) => string(p, v, "address").map(|text| (text, v.span())),
        None => {
            let message = format!("{label}: a host table has no `address` (\"host:port\")");
            p.at(item.span(), message);
            None
        }
    };
    let mut weight = Some(HostConfig::DEFAULT_WEIGHT);
    if let Some(v) = find(table, "weight") {
        weight = integer(p, v, "weight", rules::WEIGHT).map(|n| n as u32);
    }
    let mut cap = Some(None);
    if let Some(v) = find(table, "max_connections") {
        cap = integer(p, v, "max_connections", rules::CONNECTIONS).map(|n| Some(n as u32));
    }
    let (text, at) = address?;
    Some(Item {
        text,
        key: "address",
        at,
        limits: weight.zip(cap),
    })
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
pub(crate) fn loops_back(listen: SocketAddr, host: SocketAddr) -> bool {
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
    fn names_are_checked_before_they_are_looked_up() {
        let found = problems(
            r#"[[upstream]]
name = "a"
listen = "127.0.0.1:7000"
hosts = ["bad name:80", "localhost:0", "localhost:9001", "LOCALHOST:9001", "-x-.test:1", "ok.test:port"]
"#,
        );
        assert_eq!(
            found,
            [
                "lb.toml:4:10: `hosts` address `bad name:80`: `bad name` is not a host name (dot-separated labels of letters, digits, '-' and '_', at most 63 each, none starting or ending with '-')",
                "lb.toml:4:25: upstream `a`: host localhost:0 has port 0, which nothing can be connected to",
                "lb.toml:4:58: upstream `a`: host LOCALHOST:9001 is listed twice",
                "lb.toml:4:76: `hosts` address `-x-.test:1`: `-x-.test` is not a host name (dot-separated labels of letters, digits, '-' and '_', at most 63 each, none starting or ending with '-')",
                "lb.toml:4:90: `hosts` address `ok.test:port`: `port` is not a port number (0-65535)",
            ]
        );
    }

    #[test]
    fn a_name_keeps_every_address_and_its_place_apart_from_literal_hosts() {
        let config = Config::parse(
            r#"[[upstream]]
name = "a"
listen = "127.0.0.1:7000"
hosts = ["localhost:9001", "127.0.0.1:9002"]
"#,
            "lb.toml",
        )
        .unwrap();
        let u = &config.upstreams[0];
        let literal: SocketAddr = "127.0.0.1:9002".parse().unwrap();
        assert_eq!(u.hosts, [HostConfig::from(literal)]);
        assert_eq!(u.names.len(), 1);
        assert_eq!(u.names[0].to_string(), "localhost:9001");
        assert!(
            u.names[0]
                .addrs
                .contains(&"127.0.0.1:9001".parse().unwrap())
        );
        assert_eq!(u.addresses()[0], HostConfig::from(literal));
        assert_eq!(u.addresses().len(), 1 + u.names[0].addrs.len());
        // An address a name shares with another host is one host, said so.
        let shared = crate::config::warnings(
            "[[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\nhosts = [\"127.0.0.1:9001\", \"localhost:9001\"]\n",
        );
        assert_eq!(
            shared,
            [
                "lb.toml:4:28: warning: upstream `a`: `localhost:9001` resolves to 127.0.0.1:9001, which another of its hosts is too: the two are one host, with the other's weight and cap"
            ]
        );
        let found = problems(
            "[[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\nhosts = [\"localhost:7000\"]\n",
        );
        assert_eq!(
            found,
            [
                "lb.toml:4:10: upstream `a`: host localhost:7000 (127.0.0.1:7000) is the upstream's own listen address: tcplb would connect to itself, each connection making another"
            ]
        );
    }

    #[test]
    fn a_host_table_may_name_its_address_and_each_address_has_its_weight_and_cap() {
        let config = Config::parse(
            r#"[[upstream]]
name = "a"
listen = "127.0.0.1:7000"
hosts = [{ address = "localhost:9001", weight = 3, max_connections = 7 }, "127.0.0.1:9002"]
"#,
            "lb.toml",
        )
        .unwrap();
        let u = &config.upstreams[0];
        assert_eq!(u.names.len(), 1);
        let name = &u.names[0];
        assert_eq!(name.to_string(), "localhost:9001");
        assert_eq!((name.weight, name.max_connections), (3, Some(7)));
        let all = u.addresses();
        assert_eq!(all.len(), 1 + name.addrs.len());
        assert!(
            all[1..]
                .iter()
                .all(|h| (h.weight, h.max_connections) == (3, Some(7)))
        );
        assert!(
            all.iter()
                .any(|h| h.addr == "127.0.0.1:9001".parse().unwrap() && h.weight == 3)
        );
        // Problems with a named address are the table's `address`'s.
        let found = problems(
            r#"[[upstream]]
name = "a"
listen = "127.0.0.1:7000"
hosts = [{ address = "bad name:1" }, { address = "localhost:0", weight = 2 }, { address = "localhost:9001", weight = 0 }, { address = "LOCALHOST:9001" }, "localhost:9001"]
"#,
        );
        assert_eq!(
            found,
            [
                "lb.toml:4:22: `address` address `bad name:1`: `bad name` is not a host name (dot-separated labels of letters, digits, '-' and '_', at most 63 each, none starting or ending with '-')",
                "lb.toml:4:50: upstream `a`: host localhost:0 has port 0, which nothing can be connected to",
                "lb.toml:4:118: `weight` must be between 1 and 1000, not 0",
                "lb.toml:4:155: upstream `a`: host localhost:9001 is listed twice",
            ]
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

    #[test]
    fn hosts_are_strings_or_tables_with_weight_and_cap() {
        let config = Config::parse(
            r#"[[upstream]]
name = "a"
listen = "127.0.0.1:7000"
hosts = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3, max_connections = 200 }, { address = "[::1]:9003" }]
"#,
            "lb.toml",
        )
        .unwrap();
        let at = |port: u16, weight, max_connections| HostConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            max_connections,
        };
        let hosts = &config.upstreams[0].hosts;
        assert_eq!(hosts[..2], [at(9001, 1, None), at(9002, 3, Some(200))]);
        assert_eq!(hosts[2].addr, "[::1]:9003".parse().unwrap());
        assert_eq!((hosts[2].weight, hosts[2].max_connections), (1, None));
    }

    #[test]
    fn bad_host_tables_are_reported_where_they_are_wrong() {
        let found = problems(
            r#"[[upstream]]
name = "a"
listen = "127.0.0.1:7000"
hosts = [
  { address = "127.0.0.1:9001", weight = 0 },
  { address = "127.0.0.1:9002", max_connections = -5 },
  { address = "127.0.0.1:9003", max_connections = 0 },
  { address = "127.0.0.1:9004", wieght = 2 },
  { address = "nowhere" },
  { weight = 2 },
  { address = "127.0.0.1:9004" },
  7,
  { address = "127.0.0.1:9005", weight = "heavy" },
]
"#,
        );
        assert_eq!(
            found,
            [
                "lb.toml:5:42: `weight` must be between 1 and 1000, not 0",
                "lb.toml:6:51: `max_connections` must be between 1 and 4294967295, not -5",
                "lb.toml:7:51: `max_connections` must be between 1 and 4294967295, not 0",
                "lb.toml:8:33: unknown key `wieght` in a host of upstream `a` (expected one of: address, weight, max_connections)",
                "lb.toml:9:15: `address` address `nowhere`: expected host:port, e.g. 127.0.0.1:9001 or [::1]:9001",
                "lb.toml:10:3: upstream `a`: a host table has no `address` (\"host:port\")",
                "lb.toml:11:15: upstream `a`: host 127.0.0.1:9004 is listed twice",
                "lb.toml:12:3: upstream `a`: each host must be a \"host:port\" string or a table such as { address = \"host:port\", weight = 2 }",
                "lb.toml:13:42: `weight` must be an integer",
            ]
        );
    }

    #[test]
    fn the_queue_is_set_in_defaults_and_per_upstream() {
        let config = Config::parse(
            r#"[defaults]
queue_timeout = "5s"
max_queued = 50

[[upstream]]
name = "a"
listen = "127.0.0.1:7000"
hosts = ["127.0.0.1:9001"]
queue_timeout = "0s"

[[upstream]]
name = "b"
listen = "127.0.0.1:7001"
hosts = ["127.0.0.1:9002"]
max_queued = 7
"#,
            "lb.toml",
        )
        .unwrap();
        let s = &config.settings;
        assert_eq!(
            (s.queue_timeout, s.max_queued),
            (Duration::from_secs(5), 50)
        );
        let [a, b] = &config.upstreams[..] else {
            panic!("two upstreams")
        };
        assert_eq!(
            (a.queue_timeout, a.max_queued),
            (Some(Duration::ZERO), None)
        );
        assert_eq!((b.queue_timeout, b.max_queued), (None, Some(7)));
        let found = problems(
            "[defaults]\nqueue_timeout = 5\nmax_queued = 0\n[[upstream]]\nname=\"a\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\nqueue_timeout = \"soon\"\nmax_queued = -1\n",
        );
        assert_eq!(
            found,
            [
                "lb.toml:2:17: `queue_timeout` must be a string with a unit, such as \"5s\"",
                "lb.toml:3:14: `max_queued` must be between 1 and 1000000, not 0",
                "lb.toml:8:17: `queue_timeout`: `soon` is not a duration (use e.g. \"250ms\", \"5s\", \"2m\", \"1h\")",
                "lb.toml:9:14: `max_queued` must be between 1 and 1000000, not -1",
            ]
        );
    }
}
