//! The walk of the document: which tables exist at the top level, which
//! keys each may hold, and what each table becomes. This file walks the
//! top level, `[defaults]`, `[tls]` and `[admin]`, and gathers the results
//! into a [`Config`]; `upstreams.rs` and `clients.rs` walk their arrays of
//! tables and `cluster.rs` the `[cluster]` table, with the helpers in
//! `tables.rs` for tables and unknown keys.
//!
//! Every table is walked to its end whatever it holds, so that one pass
//! reports every problem. A walker returns `None` when its table had a
//! problem (already reported), and the whole document is then invalid.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;

use toml::de::{DeTable, DeValue};

use super::clients::clients;
use super::cluster::cluster;
use super::problems::Problems;
use super::tables::{as_table, find, unknown_keys};
use super::upstreams::{Lookups, upstreams};
use super::values::{
    Value, Zero, address, duration, fill, integer, networks, parse_size, rate, size, string,
};
use super::{AccessLog, Config, Keepalive, Relay, Settings, rules};
use crate::policy::limits::Limit;
use crate::tls::{TlsPlaces, TlsSettings};

const TOP_KEYS: &[&str] = &["defaults", "tls", "upstream", "client", "admin", "cluster"];
const DEFAULTS_KEYS: &[&str] = &[
    "connect_timeout",
    "idle_timeout",
    "half_close_timeout",
    "drain_timeout",
    "max_connections",
    "buffer_size",
    "bulk_buffer_size",
    "backlog",
    "socket_buffer",
    "unsent_limit",
    "source_rate",
    "source_burst",
    "accept_proxy",
    "workers",
    "resolve_interval",
    "resolver",
    "queue_timeout",
    "max_queued",
    "keepalive",
    "keepalive_interval",
    "keepalive_probes",
    "access_log",
    "relay",
    "max_pipes",
];
const TLS_KEYS: &[&str] = &[
    "cert",
    "key",
    "client_ca",
    "crl",
    "handshake_timeout",
    "max_handshakes",
    "max_handshakes_per_source",
];
const ADMIN_KEYS: &[&str] = &["listen"];

/// The whole document: a valid [`Config`], or `None` with the problems reported.
pub(super) fn document(p: &mut Problems<'_>) -> Option<Config> {
    let root = match DeTable::parse(p.text()) {
        Ok(root) => root,
        Err(e) => {
            let message = format!("invalid TOML: {}", e.message().trim());
            p.at(e.span().unwrap_or(0..0), message);
            return None;
        }
    };
    let root = root.get_ref();
    unknown_keys(p, root, TOP_KEYS, "at the top level");
    let settings = defaults(p, root);
    let tls_present = find(root, "tls").is_some();
    let tls = tls(p, root);
    let admin = admin(p, root);
    let cluster = cluster(p, root);
    let lookups = settings
        .as_ref()
        .map_or_else(|| Lookups::of(&Settings::default()), Lookups::of);
    let upstreams = upstreams(p, root, tls_present, lookups);
    let clients = clients(p, root, &upstreams, tls_present);
    if let (Some(Some(_)), Some(v)) = (&cluster, find(root, "cluster")) {
        if clients.is_empty() {
            let message =
                "[cluster] is set but there is no [[client]] rule: there are no limits to share";
            p.warn(v.span(), message.to_string());
        }
    }

    let settings = settings?;
    // An upstream without its own `accept_proxy` takes [defaults]'s.
    let upstreams: Option<Vec<_>> = upstreams
        .into_iter()
        .map(|u| {
            let mut config = u.config?;
            if !u.own_accept_proxy {
                config.accept_proxy = settings.accept_proxy.clone();
            }
            Some(config)
        })
        .collect();
    let clients: Option<Vec<_>> = clients.into_iter().map(|c| c.rule).collect();
    let (tls, admin, cluster) = (tls?, admin?, cluster?);
    Some(Config {
        settings,
        upstreams: upstreams?,
        tls,
        clients: clients?,
        admin,
        cluster,
        warnings: Vec::new(),
    })
}

/// `[defaults]`, or the defaults themselves when it is absent.
fn defaults(p: &mut Problems<'_>, root: &DeTable<'_>) -> Option<Settings> {
    let Some(v) = find(root, "defaults") else {
        return Some(Settings::default());
    };
    let table = as_table(p, v, "`defaults` must be a table".to_string())?;
    unknown_keys(p, table, DEFAULTS_KEYS, "in [defaults]");
    let mut s = Settings::default();
    let mut ok = true;
    let durations = [
        ("connect_timeout", &mut s.connect_timeout, Zero::Refused),
        ("idle_timeout", &mut s.idle_timeout, Zero::Refused),
        (
            "half_close_timeout",
            &mut s.half_close_timeout,
            Zero::Refused,
        ),
        ("drain_timeout", &mut s.drain_timeout, Zero::Allowed),
        ("resolve_interval", &mut s.resolve_interval, Zero::Allowed),
        ("queue_timeout", &mut s.queue_timeout, Zero::Allowed),
    ];
    for (key, slot, zero) in durations {
        ok &= fill(slot, find(table, key).map(|v| duration(p, v, key, zero)));
    }
    ok &= counts(p, table, &mut s);
    ok &= fill(&mut s.source_limit, Some(source_limit(p, table)));
    ok &= fill(&mut s.keepalive, Some(keepalive(p, table)));
    let access_log = find(table, "access_log").map(|v| access_log(p, v));
    ok &= fill(&mut s.access_log, access_log);
    for (key, slot) in [
        ("buffer_size", &mut s.buffer_size),
        ("bulk_buffer_size", &mut s.bulk_buffer_size),
    ] {
        ok &= fill(slot, find(table, key).map(|v| size(p, v, key)));
    }
    let socket_buffer = find(table, "socket_buffer").map(|v| size(p, v, "socket_buffer").map(Some));
    ok &= fill(&mut s.socket_buffer, socket_buffer);
    let unsent_limit = find(table, "unsent_limit").map(|v| unsent_limit(p, v));
    ok &= fill(&mut s.unsent_limit, unsent_limit);
    let workers = find(table, "workers").map(|v| workers(p, v));
    ok &= fill(&mut s.workers, workers);
    let resolver = find(table, "resolver").map(|v| resolver(p, v).map(Some));
    ok &= fill(&mut s.resolver, resolver);
    let accept_proxy = find(table, "accept_proxy").map(|v| networks(p, v, "accept_proxy"));
    ok &= fill(&mut s.accept_proxy, accept_proxy);
    ok &= fill(&mut s.relay, find(table, "relay").map(|v| relay(p, v)));
    if let Some(v) = find(table, "bulk_buffer_size").filter(|_| ok) {
        no_bulk_upgrade(p, v, &s);
    }
    ok.then_some(s)
}

/// `unsent_limit`: a size, or `"off"` (`None`).
fn unsent_limit(p: &mut Problems<'_>, v: &Value<'_>) -> Option<Option<usize>> {
    match v.get_ref() {
        DeValue::String(off) if off.as_ref() == "off" => Some(None),
        DeValue::String(text) if parse_size(text).is_err() => {
            let message = format!(
                "`unsent_limit` must be a size such as \"64KiB\", or \"off\", not \"{text}\""
            );
            p.at(v.span(), message);
            None
        }
        _ => size(p, v, "unsent_limit").map(Some),
    }
}

/// `workers`: a count, or `"auto"` (one per core).
fn workers(p: &mut Problems<'_>, v: &Value<'_>) -> Option<usize> {
    match v.get_ref() {
        DeValue::String(auto) if auto.as_ref() == "auto" => Some(Settings::auto_workers()),
        _ => integer(p, v, "workers", rules::WORKERS).map(|n| n as usize),
    }
}

/// A warning at `bulk_buffer_size` (`v`) when it is below `buffer_size`.
fn no_bulk_upgrade(p: &mut Problems<'_>, v: &Value<'_>, s: &Settings) {
    if s.bulk_buffer_size < s.buffer_size {
        let message = format!(
            "`bulk_buffer_size` ({}) is below `buffer_size` ({}): bulk buffers will be {} bytes, so there is no bulk upgrade",
            s.bulk_buffer_size, s.buffer_size, s.buffer_size
        );
        p.warn(v.span(), message);
    }
}

/// The counts of `[defaults]`: `max_connections`, `backlog`,
/// `max_queued` and `max_pipes`, each within its range; false if one is
/// wrong.
fn counts(p: &mut Problems<'_>, table: &DeTable<'_>, s: &mut Settings) -> bool {
    let mut ok = true;
    let mut read = |key: &'static str, range: RangeInclusive<i64>| {
        find(table, key).map(|v| integer(p, v, key, range))
    };
    let max_connections = read("max_connections", rules::CONNECTIONS);
    let backlog = read("backlog", rules::BACKLOG);
    let max_queued = read("max_queued", rules::QUEUED);
    let max_pipes = read("max_pipes", rules::PIPES);
    ok &= fill(
        &mut s.max_connections,
        max_connections.map(|n| n.map(|n| n as usize)),
    );
    ok &= fill(&mut s.backlog, backlog.map(|n| n.map(|n| n as u32)));
    ok &= fill(&mut s.max_queued, max_queued.map(|n| n.map(|n| n as u32)));
    ok &= fill(&mut s.max_pipes, max_pipes.map(|n| n.map(|n| n as usize)));
    ok
}

/// `access_log` of `[defaults]`: one of the formats' names.
fn access_log(p: &mut Problems<'_>, v: &Value<'_>) -> Option<AccessLog> {
    let name = string(p, v, "access_log")?;
    let format = AccessLog::from_name(name);
    if format.is_none() {
        let expected = AccessLog::NAMES.map(|n| format!("\"{n}\"")).join(" or ");
        let message = format!("`access_log` must be {expected}, not \"{name}\"");
        p.at(v.span(), message);
    }
    format
}

/// `resolver` of `[defaults]`: an IP address, with a port or without
/// (53). Not a name: finding it would need a resolver.
fn resolver(p: &mut Problems<'_>, v: &Value<'_>) -> Option<SocketAddr> {
    let text = string(p, v, "resolver")?;
    let server = text.parse::<SocketAddr>().ok().or_else(|| {
        text.parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53))
    });
    match server {
        Some(server) if server.port() != 0 => Some(server),
        _ => {
            let message = format!(
                "`resolver` must be a DNS server's IP address, with a port or without (53), such as \"127.0.0.1:53\", not \"{text}\""
            );
            p.at(v.span(), message);
            None
        }
    }
}

/// `relay` of `[defaults]`: how plain pairs move their bytes.
fn relay(p: &mut Problems<'_>, v: &Value<'_>) -> Option<Relay> {
    let name = string(p, v, "relay")?;
    let mode = Relay::from_name(name);
    if mode.is_none() {
        let expected = Relay::NAMES.map(|n| format!("\"{n}\"")).join(", ");
        p.at(
            v.span(),
            format!("`relay` must be one of {expected}, not \"{name}\""),
        );
    }
    mode
}

/// `source_rate` and `source_burst` of `[defaults]`: the limit they make,
/// if any (`Some(None)` when neither is set).
fn source_limit(p: &mut Problems<'_>, table: &DeTable<'_>) -> Option<Option<Limit>> {
    let rate = find(table, "source_rate").map(|v| rate(p, v, "source_rate"));
    let burst = find(table, "source_burst")
        .map(|v| integer(p, v, "source_burst", rules::BURST).map(|n| n as u32));
    match (rate, burst) {
        (Some(Some(rate)), Some(Some(burst))) => Some(Some(Limit::new(rate, burst))),
        (Some(Some(rate)), None) => Some(Some(Limit::per_second(rate))),
        (None, Some(Some(_))) => {
            let span = find(table, "source_burst").map_or(0..0, |v| v.span());
            p.at(span, "`source_burst` needs `source_rate`".to_string());
            None
        }
        (None, None) => Some(None),
        _ => None,
    }
}

/// `keepalive`, `keepalive_interval` and `keepalive_probes` of
/// `[defaults]`: the keepalive they make, if any (`Some(None)` without
/// `keepalive`).
fn keepalive(p: &mut Problems<'_>, table: &DeTable<'_>) -> Option<Option<Keepalive>> {
    let time = |p: &mut Problems<'_>, key: &str| {
        find(table, key).map(|v| {
            duration(p, v, key, Zero::Allowed)
                .and_then(|d| p.check(v.span(), key, rules::keepalive_time(d)))
        })
    };
    let idle = time(p, "keepalive");
    let interval = time(p, "keepalive_interval");
    let probes = find(table, "keepalive_probes")
        .map(|v| integer(p, v, "keepalive_probes", rules::KEEPALIVE_PROBES).map(|n| n as u32));
    let Some(idle) = idle else {
        for key in ["keepalive_interval", "keepalive_probes"] {
            if let Some(v) = find(table, key) {
                let message = format!("`{key}` needs `keepalive` (the idle time before probes)");
                p.at(v.span(), message);
            }
        }
        return (interval.is_none() && probes.is_none()).then_some(None);
    };
    Some(Some(Keepalive {
        idle: idle?,
        interval: interval.map_or(Some(None), |i| i.map(Some))?,
        probes: probes.map_or(Some(None), |n| n.map(Some))?,
    }))
}

/// `[tls]`: `Some(None)` when it is absent.
fn tls(p: &mut Problems<'_>, root: &DeTable<'_>) -> Option<Option<TlsSettings>> {
    let Some(value) = find(root, "tls") else {
        return Some(None);
    };
    let table = as_table(p, value, "`tls` must be a table ([tls])".to_string())?;
    unknown_keys(p, table, TLS_KEYS, "in [tls]");
    let mut places = TlsPlaces::default();
    let mut path = |key: &str, place: &mut Option<String>| match find(table, key) {
        Some(v) => {
            *place = Some(p.place(v.span()));
            string(p, v, key).map(PathBuf::from)
        }
        None => {
            p.at(value.span(), format!("[tls] has no `{key}`"));
            None
        }
    };
    let cert = path("cert", &mut places.cert);
    let key = path("key", &mut places.key);
    let client_ca = path("client_ca", &mut places.client_ca);
    let crl = crl(p, table, &mut places.crl);
    let handshake_timeout = find(table, "handshake_timeout")
        .map_or(Some(TlsSettings::DEFAULT_HANDSHAKE_TIMEOUT), |v| {
            duration(p, v, "handshake_timeout", Zero::Refused)
        });
    let mut handshakes = |key: &str, default: usize| {
        find(table, key).map_or(Some(default), |v| {
            integer(p, v, key, rules::HANDSHAKES).map(|n| n as usize)
        })
    };
    let max_handshakes = handshakes("max_handshakes", TlsSettings::DEFAULT_MAX_HANDSHAKES);
    let max_handshakes_per_source = handshakes(
        "max_handshakes_per_source",
        TlsSettings::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
    );
    Some(Some(TlsSettings {
        cert: cert?,
        key: key?,
        client_ca: client_ca?,
        crl: crl?,
        handshake_timeout: handshake_timeout?,
        max_handshakes: max_handshakes?,
        max_handshakes_per_source: max_handshakes_per_source?,
        places,
    }))
}

/// `crl` of `[tls]`: one file name or an array of them; `places` gets
/// where each is named.
fn crl(
    p: &mut Problems<'_>,
    table: &DeTable<'_>,
    places: &mut Vec<String>,
) -> Option<Vec<PathBuf>> {
    let Some(v) = find(table, "crl") else {
        return Some(Vec::new());
    };
    match v.get_ref() {
        DeValue::String(s) => {
            places.push(p.place(v.span()));
            Some(vec![PathBuf::from(s.as_ref())])
        }
        DeValue::Array(items) => {
            let paths: Vec<Option<PathBuf>> = items
                .iter()
                .map(|item| {
                    places.push(p.place(item.span()));
                    string(p, item, "crl").map(PathBuf::from)
                })
                .collect();
            paths.into_iter().collect()
        }
        _ => {
            let message = "`crl` must be a file name or an array of them".to_string();
            p.at(v.span(), message);
            None
        }
    }
}

/// Only `[admin]` of the document, whatever else it holds: the address
/// `tcplb reload` asks, even when the rest of the file is what a reload
/// would reject.
pub(super) fn admin_only(p: &mut Problems<'_>) -> Option<Option<SocketAddr>> {
    match DeTable::parse(p.text()) {
        Ok(root) => admin(p, root.get_ref()),
        Err(e) => {
            let message = format!("invalid TOML: {}", e.message().trim());
            p.at(e.span().unwrap_or(0..0), message);
            None
        }
    }
}

/// `[admin]`: `Some(None)` when it is absent.
fn admin(p: &mut Problems<'_>, root: &DeTable<'_>) -> Option<Option<SocketAddr>> {
    let Some(value) = find(root, "admin") else {
        return Some(None);
    };
    let table = as_table(p, value, "`admin` must be a table ([admin])".to_string())?;
    unknown_keys(p, table, ADMIN_KEYS, "in [admin]");
    match find(table, "listen") {
        Some(listen) => address(p, listen, "listen").map(|a| Some(*a.get_ref())),
        None => {
            p.at(value.span(), "[admin] has no `listen` address".to_string());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use crate::config::{Config, Relay, problems, warnings};
    use crate::policy::limits::Limit;

    #[test]
    fn reports_every_problem_with_its_line() {
        let found = problems(
            r#"[defaults]
idle_timeout = "soon"
bogus = 1

[[upstream]]
name = "a"
listen = "127.0.0.1:7000"
hosts = []

[[upstream]]
name = "a"
listen = "127.0.0.1:7000"
hosts = ["127.0.0.1:1", "nope"]
"#,
        );
        assert_eq!(found.len(), 6, "{found:#?}");
        assert!(
            found[0].starts_with("lb.toml:2:16: `idle_timeout`"),
            "{found:#?}"
        );
        assert!(
            found[1].starts_with("lb.toml:3:1: unknown key `bogus`"),
            "{found:#?}"
        );
        assert!(
            found[2].starts_with("lb.toml:8:9: upstream `a` has no hosts"),
            "{found:#?}"
        );
        assert!(
            found[3].contains("11:8: duplicate upstream name `a`"),
            "{found:#?}"
        );
        assert!(
            found[4].contains("12:10: listen address 127.0.0.1:7000 uses the same port"),
            "{found:#?}"
        );
        assert!(
            found[5].contains("13:25: `hosts` address `nope`"),
            "{found:#?}"
        );
    }

    #[test]
    fn rejects_missing_upstreams_and_bad_types() {
        assert_eq!(
            problems("")[0],
            "lb.toml: no upstream is defined (add an [[upstream]] table)"
        );
        let found = problems("[[upstream]]\nname = 5\nhosts = \"127.0.0.1:1\"\n");
        assert!(
            found.iter().any(|p| p.contains("`name` must be a string")),
            "{found:#?}"
        );
        assert!(
            found.iter().any(|p| p.contains("has no `listen`")),
            "{found:#?}"
        );
        assert!(
            found.iter().any(|p| p.contains("`hosts` must be an array")),
            "{found:#?}"
        );
        let found = problems(
            "[defaults]\nmax_connections = 0\n[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]",
        );
        assert_eq!(
            found,
            ["lb.toml:2:19: `max_connections` must be between 1 and 4294967295, not 0"]
        );
    }

    #[test]
    fn bulk_buffer_is_never_smaller_than_the_normal_one() {
        let base = "[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n";
        let text =
            format!("[defaults]\nbuffer_size = \"128KiB\"\nbulk_buffer_size = 16384\n{base}");
        let config = Config::parse(&text, "x").unwrap();
        assert_eq!(config.settings.bulk_buffer(), 128 * 1024);
        // Raised, and said so.
        assert_eq!(
            warnings(&text),
            [
                "lb.toml:3:20: warning: `bulk_buffer_size` (16384) is below `buffer_size` (131072): bulk buffers will be 131072 bytes, so there is no bulk upgrade"
            ]
        );
        let equal = format!("[defaults]\nbuffer_size = 4096\nbulk_buffer_size = 4096\n{base}");
        assert_eq!(
            warnings(&equal),
            Vec::<String>::new(),
            "equal turns the upgrade off"
        );
        let unset = format!("[defaults]\nbuffer_size = \"128KiB\"\n{base}");
        assert_eq!(
            warnings(&unset),
            Vec::<String>::new(),
            "the default follows"
        );
        let found = problems(&format!("[defaults]\nbuffer_size = 512\n{base}"));
        assert_eq!(
            found,
            ["lb.toml:2:15: `buffer_size` must be between 1024 and 67108864, not 512"]
        );
        let found = problems(&format!("[defaults]\nbulk_buffer_size = \"lots\"\n{base}"));
        assert!(
            found[0].starts_with("lb.toml:2:20: `bulk_buffer_size`: `lots` is not a size"),
            "{found:?}"
        );
    }

    #[test]
    fn relay_mode_and_pipe_cap() {
        let base = "[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n";
        let settings = |defaults: &str| {
            Config::parse(&format!("[defaults]\n{defaults}\n{base}"), "x")
                .unwrap()
                .settings
        };
        assert_eq!(settings("").relay, Relay::Auto);
        assert_eq!(settings("").max_pipes, 1024);
        for (name, mode) in [
            ("auto", Relay::Auto),
            ("splice", Relay::Splice),
            ("copy", Relay::Copy),
        ] {
            assert_eq!(settings(&format!("relay = \"{name}\"")).relay, mode);
            assert_eq!(mode.name(), name);
        }
        assert_eq!(settings("max_pipes = 0").max_pipes, 0);
        assert_eq!(
            problems(&format!("[defaults]\nrelay = \"zero-copy\"\n{base}")),
            [
                "lb.toml:2:9: `relay` must be one of \"auto\", \"splice\", \"copy\", not \"zero-copy\""
            ]
        );
        assert_eq!(
            problems(&format!("[defaults]\nrelay = 1\nmax_pipes = -1\n{base}")),
            [
                "lb.toml:2:9: `relay` must be a string",
                "lb.toml:3:13: `max_pipes` must be between 0 and 1048576, not -1"
            ]
        );
    }

    #[test]
    fn tls_clients_and_source_limits() {
        let config = Config::parse(
            r#"
[defaults]
source_rate = 50
source_burst = 100

[tls]
cert = "certs/server.pem"
key = "certs/server.key"
client_ca = "certs/ca.pem"
crl = ["certs/ca.crl"]
handshake_timeout = "3s"

[[upstream]]
name = "app-a"
listen = "127.0.0.1:7777"
hosts = ["127.0.0.1:9001"]

[[upstream]]
name = "plain"
listen = "127.0.0.1:7778"
hosts = ["127.0.0.1:9002"]
tls = false

[[client]]
identity = "spiffe://example.org/alice"
upstreams = ["app-a"]
rate = 0.5

[[client]]
identity = "bob"
upstreams = ["app-a"]
rate = 10
burst = 20
max_connections = 100
"#,
            "lb.toml",
        )
        .unwrap();
        let tls = config.tls.as_ref().unwrap();
        assert_eq!(tls.handshake_timeout, Duration::from_secs(3));
        assert_eq!(tls.max_handshakes, 1000);
        assert_eq!(tls.crl, [PathBuf::from("certs/ca.crl")]);
        assert_eq!(
            [config.upstreams[0].tls, config.upstreams[1].tls],
            [true, false]
        );
        assert_eq!(config.clients[0].burst, 1);
        assert_eq!(config.clients[1].burst, 20);
        assert_eq!(config.clients[1].max_connections, Some(100));
        assert_eq!(config.settings.source_limit, Some(Limit::new(50.0, 100)));
    }

    #[test]
    fn resolve_interval_and_resolver() {
        let base = "[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n";
        let defaults = Config::parse(base, "x").unwrap().settings;
        assert_eq!(
            (defaults.resolve_interval, defaults.resolver),
            (Duration::from_secs(30), None)
        );
        let text =
            format!("[defaults]\nresolve_interval = \"0s\"\nresolver = \"[::1]:5353\"\n{base}");
        let s = Config::parse(&text, "x").unwrap().settings;
        assert_eq!(s.resolve_interval, Duration::ZERO, "0s turns it off");
        assert_eq!(s.resolver, Some("[::1]:5353".parse().unwrap()));
        let text = format!("[defaults]\nresolver = \"127.0.0.53\"\n{base}");
        let s = Config::parse(&text, "x").unwrap().settings;
        assert_eq!(
            s.resolver,
            Some("127.0.0.53:53".parse().unwrap()),
            "port 53 by default"
        );
        for bad in ["dns.example.org:53", "127.0.0.1:0", "127.0.0.1:99999"] {
            let found = problems(&format!("[defaults]\nresolver = \"{bad}\"\n{base}"));
            assert_eq!(
                found,
                [format!(
                    "lb.toml:2:12: `resolver` must be a DNS server's IP address, with a port or without (53), such as \"127.0.0.1:53\", not \"{bad}\""
                )]
            );
        }
        let found = problems(&format!("[defaults]\nresolve_interval = 30\n{base}"));
        assert_eq!(
            found,
            ["lb.toml:2:20: `resolve_interval` must be a string with a unit, such as \"5s\""]
        );
    }

    #[test]
    fn invalid_toml_names_the_place() {
        let found = problems("[[upstream]\n");
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("lb.toml:1:"), "{found:?}");
        assert!(found[0].contains("invalid TOML"), "{found:?}");
    }

    #[test]
    fn keepalive_is_off_unless_set_and_checked_when_set() {
        let base = "[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n";
        assert_eq!(Config::parse(base, "x").unwrap().settings.keepalive, None);
        let text = format!(
            "[defaults]\nkeepalive = \"1m\"\nkeepalive_interval = \"10s\"\nkeepalive_probes = 5\n{base}"
        );
        let keepalive = Config::parse(&text, "x").unwrap().settings.keepalive;
        assert_eq!(
            keepalive,
            Some(crate::config::Keepalive {
                idle: Duration::from_secs(60),
                interval: Some(Duration::from_secs(10)),
                probes: Some(5),
            })
        );
        let idle_only = format!("[defaults]\nkeepalive = \"30s\"\n{base}");
        let keepalive = Config::parse(&idle_only, "x")
            .unwrap()
            .settings
            .keepalive
            .unwrap();
        assert_eq!((keepalive.interval, keepalive.probes), (None, None));
        let found = problems(&format!(
            "[defaults]\nkeepalive = \"1500ms\"\nkeepalive_interval = \"0s\"\nkeepalive_probes = 200\n{base}"
        ));
        assert_eq!(
            found,
            [
                "lb.toml:2:13: `keepalive` must be whole seconds from 1s to 32767s, not 1.5s (leave it out for no keepalive)",
                "lb.toml:3:22: `keepalive_interval` must be whole seconds from 1s to 32767s, not 0s (leave it out for no keepalive)",
                "lb.toml:4:20: `keepalive_probes` must be between 1 and 127, not 200",
            ]
        );
        let found = problems(&format!(
            "[defaults]\nkeepalive_interval = \"10s\"\nkeepalive_probes = 3\n{base}"
        ));
        assert_eq!(
            found,
            [
                "lb.toml:2:22: `keepalive_interval` needs `keepalive` (the idle time before probes)",
                "lb.toml:3:20: `keepalive_probes` needs `keepalive` (the idle time before probes)",
            ]
        );
    }

    #[test]
    fn access_log_is_text_or_json() {
        use crate::config::AccessLog;
        let base = "[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n";
        let format = |value: &str| {
            let text = format!("[defaults]\naccess_log = {value}\n{base}");
            Config::parse(&text, "x").map(|c| c.settings.access_log)
        };
        assert_eq!(
            Config::parse(base, "x").unwrap().settings.access_log,
            AccessLog::Text
        );
        assert_eq!(format("\"text\""), Ok(AccessLog::Text));
        assert_eq!(format("\"json\""), Ok(AccessLog::Json));
        let found = problems(&format!("[defaults]\naccess_log = \"yaml\"\n{base}"));
        assert_eq!(
            found,
            ["lb.toml:2:14: `access_log` must be \"text\" or \"json\", not \"yaml\""]
        );
        let found = problems(&format!("[defaults]\naccess_log = true\n{base}"));
        assert_eq!(found, ["lb.toml:2:14: `access_log` must be a string"]);
    }
}
