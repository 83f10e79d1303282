//! Configuration: the TOML schema, its quick-mode equivalent, and validation.
//!
//! The file is read with toml's spanned document parser and walked by hand
//! rather than derived with serde, so that one pass reports *every* problem
//! (unknown key, wrong type, bad address, duplicate name or port, upstream
//! without hosts), each with its line and column. A [`Config`] value that
//! exists is valid: upstream names are unique, listen ports do not collide,
//! every upstream has at least one host, and every address is resolved.

use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::error::{ConfigError, Error, Problem};
use crate::policy::access::ClientRule;
use crate::policy::health::HealthSettings;
use crate::policy::limits::Limit;
use crate::tls::TlsSettings;

/// Loop-wide settings; the `[defaults]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// How long a connect to one host may take before the next host is tried.
    pub connect_timeout: Duration,
    /// A pair with no bytes moving in either direction for this long is closed.
    pub idle_timeout: Duration,
    /// Once one direction has finished (FIN forwarded), the pair is closed
    /// after this long without traffic, so a peer that never finishes its
    /// side cannot hold the pair forever.
    pub half_close_timeout: Duration,
    /// On SIGINT/SIGTERM, how long live pairs may keep going before they are closed.
    pub drain_timeout: Duration,
    /// Pairs (connecting or relaying) allowed at once; the excess is refused
    /// with `ERROR overloaded`.
    pub max_connections: usize,
    /// Bytes buffered per direction of a pair while data is in flight.
    pub buffer_size: usize,
    /// The buffer a direction moves up to once it streams (its reads fill
    /// whole buffers): fewer, larger reads and writes for bulk transfers.
    /// Never less than `buffer_size` (see [`Settings::bulk_buffer`]); equal
    /// to it turns the upgrade off.
    pub bulk_buffer_size: usize,
    /// Accept queue length requested from the kernel for each listener.
    pub backlog: u32,
    /// `SO_RCVBUF` and `SO_SNDBUF` of every relayed socket, client and host
    /// side; `None` leaves them to the kernel's autotuning, which can grow a
    /// stalled connection's kernel buffers to several MiB.
    pub socket_buffer: Option<usize>,
    /// New connections allowed per source address (IPv6: per /64), checked
    /// at accept before any TLS work; `None` for no limit.
    pub source_limit: Option<Limit>,
}

impl Settings {
    /// The bulk buffer size in effect: the most a direction ever buffers.
    pub fn bulk_buffer(&self) -> usize {
        self.bulk_buffer_size.max(self.buffer_size)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            half_close_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            buffer_size: 16 * 1024,
            bulk_buffer_size: 64 * 1024,
            backlog: 1024,
            socket_buffer: None,
            source_limit: None,
        }
    }
}

/// Smallest and largest accepted `buffer_size`.
pub const BUFFER_SIZE_RANGE: (usize, usize) = (1024, 64 * 1024 * 1024);

/// One upstream: a name, the address clients connect to, and the hosts behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub hosts: Vec<SocketAddr>,
    /// Clients must speak mTLS (default: true when `[tls]` exists).
    pub tls: bool,
    pub health: HealthSettings,
}

/// A complete, validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub settings: Settings,
    pub upstreams: Vec<UpstreamConfig>,
    /// The `[tls]` table; TLS files are read when the proxy binds (and by `check`).
    pub tls: Option<TlsSettings>,
    /// The `[[client]]` rules for TLS upstreams.
    pub clients: Vec<ClientRule>,
    /// Where the admin listener (metrics, status, reload) binds.
    pub admin: Option<SocketAddr>,
}

const TOP_KEYS: &[&str] = &["defaults", "tls", "upstream", "client", "admin"];
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
    "source_rate",
    "source_burst",
];
const UPSTREAM_KEYS: &[&str] = &["name", "listen", "hosts", "tls", "health"];
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
const TLS_KEYS: &[&str] = &[
    "cert",
    "key",
    "client_ca",
    "crl",
    "handshake_timeout",
    "max_handshakes",
    "max_handshakes_per_source",
];
const CLIENT_KEYS: &[&str] = &["identity", "upstreams", "rate", "burst", "max_connections"];

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config =
            Config::parse(&text, &path.display().to_string()).map_err(Error::Config)?;
        if let (Some(tls), Some(dir)) = (config.tls.as_mut(), path.parent()) {
            tls.resolve_paths(dir);
        }
        Ok(config)
    }

    /// Validates configuration text; `origin` names it in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut walker = Walker {
            text,
            problems: Vec::new(),
        };
        let config = walker.document();
        let mut problems = walker.problems;
        problems.sort_by_key(|p| (p.line, p.column));
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigError {
                origin: origin.to_string(),
                problems,
            }),
        }
    }

    /// The configuration of quick mode: one upstream from command-line addresses.
    pub fn quick(
        name: &str,
        listen: &str,
        hosts: &[String],
        settings: Settings,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut complain = |message: String| {
            problems.push(Problem {
                line: 0,
                column: 0,
                message,
            })
        };
        if let Err(why) = check_name(name) {
            complain(format!("--name: {why}"));
        }
        let listen = resolve(listen)
            .map_err(|why| complain(format!("--listen {listen}: {why}")))
            .ok();
        if hosts.is_empty() {
            complain("at least one --host is required".to_string());
        }
        let mut resolved: Vec<SocketAddr> = Vec::new();
        for host in hosts {
            match resolve(host) {
                Ok(addr) if resolved.contains(&addr) => {
                    complain(format!("--host {host}: listed twice"))
                }
                Ok(addr) => resolved.push(addr),
                Err(why) => complain(format!("--host {host}: {why}")),
            }
        }
        match listen {
            Some(listen) if problems.is_empty() => Ok(Config {
                settings,
                upstreams: vec![UpstreamConfig {
                    name: name.to_string(),
                    listen,
                    hosts: resolved,
                    tls: false,
                    health: HealthSettings::default(),
                }],
                tls: None,
                clients: Vec::new(),
                admin: None,
            }),
            _ => Err(ConfigError {
                origin: "command line".to_string(),
                problems,
            }),
        }
    }
}

/// Resolves `host:port` (IPv4, `[IPv6]`, or a name looked up now) to its first address.
pub fn resolve(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("expected host:port, e.g. 127.0.0.1:9001 or [::1]:9001".to_string());
    };
    if host.is_empty() {
        return Err("the host part is empty".to_string());
    }
    if port.parse::<u16>().is_err() {
        return Err(format!("`{port}` is not a port number (0-65535)"));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("`{host}` resolves to no address")),
        Err(e) => Err(format!("cannot resolve `{host}`: {e}")),
    }
}

/// Parses a duration such as `5s`, `250ms`, `1h`, `1m30s` (units ms, s, m, h, d).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration (use e.g. \"250ms\", \"5s\", \"2m\", \"1h\")");
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        let part = value.checked_mul(unit_ms).ok_or_else(bad)?;
        total = total
            .checked_add(Duration::from_millis(part))
            .ok_or_else(bad)?;
    }
    Ok(total)
}

/// Parses a byte size such as `16KiB`, `1MiB`, `64KB` or a plain byte count.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let bad = || format!("`{text}` is not a size (use e.g. \"16KiB\", \"1MiB\" or a byte count)");
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if digits == 0 {
        return Err(bad());
    }
    let value: usize = text[..digits].parse().map_err(|_| bad())?;
    let unit: usize = match text[digits..].trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1024,
        "MB" => 1000 * 1000,
        "MiB" => 1024 * 1024,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1024 * 1024 * 1024,
        _ => return Err(bad()),
    };
    value.checked_mul(unit).ok_or_else(bad)
}

/// Upstream names appear in logs and (later) metric labels, so they are kept plain.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_string());
    }
    if name.len() > 64 {
        return Err("the name is longer than 64 characters".to_string());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "`{name}` may only contain letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// Checks settings given as plain values (e.g. command-line flags).
pub fn check_settings(settings: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    for (name, value) in [
        ("connect_timeout", settings.connect_timeout),
        ("idle_timeout", settings.idle_timeout),
        ("half_close_timeout", settings.half_close_timeout),
    ] {
        if value.is_zero() {
            out.push(format!("{name} must be greater than zero"));
        }
    }
    if settings.max_connections == 0 {
        out.push("max_connections must be at least 1".to_string());
    }
    let (lo, hi) = BUFFER_SIZE_RANGE;
    for (name, value) in [
        ("buffer_size", Some(settings.buffer_size)),
        ("bulk_buffer_size", Some(settings.bulk_buffer_size)),
        ("socket_buffer", settings.socket_buffer),
    ] {
        let Some(value) = value else { continue };
        if !(lo..=hi).contains(&value) {
            out.push(format!(
                "{name} must be between {lo} and {hi} bytes, not {value}"
            ));
        }
    }
    if settings.backlog == 0 || settings.backlog > 65535 {
        out.push("backlog must be between 1 and 65535".to_string());
    }
    out
}

type Value<'i> = Spanned<DeValue<'i>>;

/// Walks the parsed document, collecting problems instead of stopping at the first.
struct Walker<'t> {
    text: &'t str,
    problems: Vec<Problem>,
}

impl Walker<'_> {
    fn problem(&mut self, span: Range<usize>, message: String) {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        self.problems.push(Problem {
            line,
            column,
            message,
        });
    }

    fn document(&mut self) -> Option<Config> {
        let root = match DeTable::parse(self.text) {
            Ok(root) => root,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let message = format!("invalid TOML: {}", e.message().trim());
                self.problem(span, message);
                return None;
            }
        };
        let root = root.get_ref();
        self.unknown_keys(root, TOP_KEYS, "at the top level");

        let settings = match find(root, "defaults") {
            Some(v) => match v.get_ref() {
                DeValue::Table(t) => self.settings(t),
                _ => {
                    self.problem(v.span(), "`defaults` must be a table".to_string());
                    None
                }
            },
            None => Some(Settings::default()),
        };

        let tls = match find(root, "tls") {
            Some(v) => match v.get_ref() {
                DeValue::Table(t) => self.tls(t, v.span()),
                _ => {
                    self.problem(v.span(), "`tls` must be a table ([tls])".to_string());
                    None
                }
            },
            None => None,
        };
        let tls_present = find(root, "tls").is_some();
        let mut admin_ok = true;
        let admin = match find(root, "admin") {
            Some(v) => match v.get_ref() {
                DeValue::Table(t) => {
                    self.unknown_keys(t, &["listen"], "in [admin]");
                    match find(t, "listen") {
                        Some(l) => {
                            let addr = self.address(l, "listen").map(|a| *a.get_ref());
                            admin_ok = addr.is_some();
                            addr
                        }
                        None => {
                            self.problem(v.span(), "[admin] has no `listen` address".to_string());
                            admin_ok = false;
                            None
                        }
                    }
                }
                _ => {
                    self.problem(v.span(), "`admin` must be a table ([admin])".to_string());
                    admin_ok = false;
                    None
                }
            },
            None => None,
        };

        let mut upstreams = Vec::new();
        if find(root, "upstream").is_none() {
            self.problems.push(Problem {
                line: 0,
                column: 0,
                message: "no upstream is defined (add an [[upstream]] table)".to_string(),
            });
        }
        for (table, span) in self.tables(root, "upstream") {
            upstreams.push(self.upstream(table, span, tls_present));
        }
        self.cross_check(&upstreams);

        let mut clients = Vec::new();
        for (table, span) in self.tables(root, "client") {
            clients.push(self.client(table, span, &upstreams));
        }
        if !clients.is_empty() && !tls_present {
            let span = find(root, "client").map_or(0..0, |v| v.span());
            let message =
                "[[client]] rules need a [tls] table: identities come from client certificates";
            self.problem(span, message.to_string());
        }
        for (i, c) in clients.iter().enumerate() {
            if let Some(identity) = &c.identity {
                let earlier = clients[..i].iter().filter_map(|e| e.identity.as_ref());
                if earlier
                    .into_iter()
                    .any(|e| e.get_ref() == identity.get_ref())
                {
                    let message = format!("duplicate client identity `{}`", identity.get_ref());
                    self.problem(identity.span(), message);
                }
            }
        }

        let settings = settings?;
        let upstreams: Option<Vec<UpstreamConfig>> =
            upstreams.into_iter().map(|u| u.config).collect();
        let clients: Option<Vec<ClientRule>> = clients.into_iter().map(|c| c.rule).collect();
        if (tls_present && tls.is_none()) || !admin_ok {
            return None;
        }
        Some(Config {
            settings,
            upstreams: upstreams?,
            tls,
            clients: clients?,
            admin,
        })
    }

    /// The tables of an array of tables (`[[key]]`), reporting anything else.
    fn tables<'a, 'i>(
        &mut self,
        root: &'a DeTable<'i>,
        key: &str,
    ) -> Vec<(&'a DeTable<'i>, Range<usize>)> {
        let Some(v) = find(root, key) else {
            return Vec::new();
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.problem(
                v.span(),
                format!("`{key}` must be an array of tables ([[{key}]])"),
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.problem(v.span(), format!("`{key}` is empty"));
        }
        let mut tables = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::Table(t) => tables.push((t, item.span())),
                _ => self.problem(
                    item.span(),
                    format!("each {key} must be a table ([[{key}]])"),
                ),
            }
        }
        tables
    }

    fn tls(&mut self, table: &DeTable<'_>, span: Range<usize>) -> Option<TlsSettings> {
        self.unknown_keys(table, TLS_KEYS, "in [tls]");
        let mut path = |key: &str| match find(table, key) {
            Some(v) => self.string(v, key).map(PathBuf::from),
            None => {
                self.problem(span.clone(), format!("[tls] has no `{key}`"));
                None
            }
        };
        let (cert, key, client_ca) = (path("cert"), path("key"), path("client_ca"));
        let mut ok = true;
        let crl = match find(table, "crl") {
            None => Vec::new(),
            Some(v) => match v.get_ref() {
                DeValue::String(s) => vec![PathBuf::from(s.as_ref())],
                DeValue::Array(items) => {
                    let paths: Vec<Option<PathBuf>> = items
                        .iter()
                        .map(|item| self.string(item, "crl").map(PathBuf::from))
                        .collect();
                    ok &= paths.iter().all(Option::is_some);
                    paths.into_iter().flatten().collect()
                }
                _ => {
                    self.problem(
                        v.span(),
                        "`crl` must be a file name or an array of them".into(),
                    );
                    ok = false;
                    Vec::new()
                }
            },
        };
        let handshake_timeout = match find(table, "handshake_timeout") {
            Some(v) => self.duration(v, "handshake_timeout", false),
            None => Some(TlsSettings::DEFAULT_HANDSHAKE_TIMEOUT),
        };
        let max_handshakes = match find(table, "max_handshakes") {
            Some(v) => self
                .integer(v, "max_handshakes", 1, 1_000_000)
                .map(|n| n as usize),
            None => Some(TlsSettings::DEFAULT_MAX_HANDSHAKES),
        };
        let max_handshakes_per_source = match find(table, "max_handshakes_per_source") {
            Some(v) => self
                .integer(v, "max_handshakes_per_source", 1, 1_000_000)
                .map(|n| n as usize),
            None => Some(TlsSettings::DEFAULT_MAX_HANDSHAKES_PER_SOURCE),
        };
        if !ok {
            return None;
        }
        Some(TlsSettings {
            cert: cert?,
            key: key?,
            client_ca: client_ca?,
            crl,
            handshake_timeout: handshake_timeout?,
            max_handshakes: max_handshakes?,
            max_handshakes_per_source: max_handshakes_per_source?,
        })
    }

    fn client(
        &mut self,
        table: &DeTable<'_>,
        span: Range<usize>,
        upstreams: &[Upstream],
    ) -> Client {
        self.unknown_keys(table, CLIENT_KEYS, "in [[client]]");
        let identity = match find(table, "identity") {
            Some(v) => self.string(v, "identity").and_then(|id| {
                if id.is_empty() || id.chars().any(char::is_whitespace) {
                    self.problem(
                        v.span(),
                        "`identity` must be a DNS name or URI without spaces".into(),
                    );
                    None
                } else {
                    Some(Spanned::new(v.span(), id.to_string()))
                }
            }),
            None => {
                self.problem(span.clone(), "client has no `identity`".into());
                None
            }
        };
        let label = identity.as_ref().map_or_else(
            || "client".to_string(),
            |i| format!("client `{}`", i.get_ref()),
        );
        let allowed = match find(table, "upstreams") {
            Some(v) => self.client_upstreams(v, &label, upstreams),
            None => {
                self.problem(span.clone(), format!("{label} has no `upstreams`"));
                None
            }
        };
        let rate = match find(table, "rate") {
            Some(v) => self.number(v, "rate").and_then(|r| {
                if (Limit::MIN_RATE..=1e6).contains(&r) {
                    Some(r)
                } else {
                    let message = format!(
                        "`rate` must be between 1/86400 (one a day) and 1000000 per second, not {r}"
                    );
                    self.problem(v.span(), message);
                    None
                }
            }),
            None => {
                self.problem(
                    span,
                    format!("{label} has no `rate` (new connections per second)"),
                );
                None
            }
        };
        let burst = match find(table, "burst") {
            Some(v) => self
                .integer(v, "burst", 1, 1_000_000)
                .map(|n| Some(n as u32)),
            None => Some(None),
        };
        let max_connections = match find(table, "max_connections") {
            Some(v) => self
                .integer(v, "max_connections", 1, u32::MAX as i64)
                .map(|n| Some(n as u32)),
            None => Some(None),
        };
        let rule = match (&identity, allowed, rate, burst, max_connections) {
            (Some(identity), Some(upstreams), Some(rate), Some(burst), Some(max_connections)) => {
                Some(ClientRule {
                    identity: identity.get_ref().clone(),
                    upstreams,
                    rate,
                    burst: burst.unwrap_or_else(|| Limit::per_second(rate).burst()),
                    max_connections,
                })
            }
            _ => None,
        };
        Client { identity, rule }
    }

    /// Names of existing TLS upstreams.
    fn client_upstreams(
        &mut self,
        v: &Value<'_>,
        label: &str,
        upstreams: &[Upstream],
    ) -> Option<Vec<String>> {
        let DeValue::Array(items) = v.get_ref() else {
            self.problem(
                v.span(),
                format!("{label}: `upstreams` must be an array of upstream names"),
            );
            return None;
        };
        let mut names = Vec::new();
        let mut ok = true;
        for item in items.iter() {
            let Some(name) = self.string(item, "upstreams") else {
                ok = false;
                continue;
            };
            let found = upstreams
                .iter()
                .find(|u| u.name.as_ref().is_some_and(|n| n.get_ref() == name));
            match found {
                None => {
                    self.problem(
                        item.span(),
                        format!("{label}: no upstream is named `{name}`"),
                    );
                    ok = false;
                }
                Some(u) if u.config.as_ref().is_some_and(|c| !c.tls) => {
                    let message = format!(
                        "{label}: upstream `{name}` is plain TCP, where clients have no identity (set `tls = true` on it)"
                    );
                    self.problem(item.span(), message);
                    ok = false;
                }
                Some(_) => names.push(name.to_string()),
            }
        }
        ok.then_some(names)
    }

    /// `[upstream.health]`: its presence turns active checks on.
    fn health(&mut self, table: &DeTable<'_>, label: &str) -> Option<HealthSettings> {
        self.unknown_keys(
            table,
            HEALTH_KEYS,
            &format!("in the health table of {label}"),
        );
        let mut h = HealthSettings {
            active: true,
            ..HealthSettings::default()
        };
        let mut ok = true;
        for (key, slot) in [("interval", &mut h.interval), ("timeout", &mut h.timeout)] {
            if let Some(v) = find(table, key) {
                match self.duration(v, key, false) {
                    Some(d) => *slot = d,
                    None => ok = false,
                }
            }
        }
        for (key, slot) in [("rise", &mut h.rise), ("fall", &mut h.fall)] {
            if let Some(v) = find(table, key) {
                match self.integer(v, key, 1, 1000) {
                    Some(n) => *slot = n as u32,
                    None => ok = false,
                }
            }
        }
        for (key, slot) in [("send", &mut h.send), ("expect", &mut h.expect)] {
            if let Some(v) = find(table, key) {
                match self.string(v, key) {
                    Some("") => {
                        self.problem(v.span(), format!("`{key}` is empty"));
                        ok = false;
                    }
                    Some(text) if text.len() > 4096 => {
                        self.problem(v.span(), format!("`{key}` is longer than 4096 bytes"));
                        ok = false;
                    }
                    Some(text) => *slot = Some(text.as_bytes().to_vec()),
                    None => ok = false,
                }
            }
        }
        if let Some(v) = find(table, "close_on_down") {
            match v.get_ref() {
                DeValue::Boolean(b) => h.close_on_down = *b,
                _ => {
                    self.problem(
                        v.span(),
                        "`close_on_down` must be true or false".to_string(),
                    );
                    ok = false;
                }
            }
        }
        if let Some(v) = find(table, "slow_start") {
            match self.duration(v, "slow_start", true) {
                Some(d) => h.slow_start = Some(d).filter(|d| !d.is_zero()),
                None => ok = false,
            }
        }
        ok.then_some(h)
    }

    /// An integer or a float.
    fn number(&mut self, v: &Value<'_>, key: &str) -> Option<f64> {
        let parsed = match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .map(|n| n as f64),
            DeValue::Float(f) => f.as_str().replace('_', "").parse::<f64>().ok(),
            _ => None,
        };
        match parsed {
            Some(n) if n.is_finite() => Some(n),
            _ => {
                self.problem(v.span(), format!("`{key}` must be a finite number"));
                None
            }
        }
    }

    fn unknown_keys(&mut self, table: &DeTable<'_>, allowed: &[&str], place: &str) {
        for (key, _) in table.iter() {
            if !allowed.contains(&key.get_ref().as_ref()) {
                let message = format!(
                    "unknown key `{}` {place} (expected one of: {})",
                    key.get_ref(),
                    allowed.join(", ")
                );
                self.problem(key.span(), message);
            }
        }
    }

    fn settings(&mut self, table: &DeTable<'_>) -> Option<Settings> {
        self.unknown_keys(table, DEFAULTS_KEYS, "in [defaults]");
        let mut s = Settings::default();
        let mut ok = true;
        let durations = [
            ("connect_timeout", &mut s.connect_timeout, false),
            ("idle_timeout", &mut s.idle_timeout, false),
            ("half_close_timeout", &mut s.half_close_timeout, false),
            ("drain_timeout", &mut s.drain_timeout, true),
        ];
        for (key, slot, zero_ok) in durations {
            if let Some(v) = find(table, key) {
                match self.duration(v, key, zero_ok) {
                    Some(d) => *slot = d,
                    None => ok = false,
                }
            }
        }
        if let Some(v) = find(table, "max_connections") {
            match self.integer(v, "max_connections", 1, u32::MAX as i64) {
                Some(n) => s.max_connections = n as usize,
                None => ok = false,
            }
        }
        if let Some(v) = find(table, "backlog") {
            match self.integer(v, "backlog", 1, 65535) {
                Some(n) => s.backlog = n as u32,
                None => ok = false,
            }
        }
        let source_rate = find(table, "source_rate").map(|v| {
            self.number(v, "source_rate").filter(|r| {
                let fine = (Limit::MIN_RATE..=1e6).contains(r);
                if !fine {
                    let message = format!(
                        "`source_rate` must be between 1/86400 (one a day) and 1000000 per second, not {r}"
                    );
                    self.problem(v.span(), message);
                }
                fine
            })
        });
        let source_burst =
            find(table, "source_burst").map(|v| self.integer(v, "source_burst", 1, 1_000_000));
        match (source_rate, source_burst) {
            (Some(Some(rate)), Some(Some(burst))) => {
                s.source_limit = Some(Limit::new(rate, burst as u32))
            }
            (Some(Some(rate)), None) => s.source_limit = Some(Limit::per_second(rate)),
            (None, Some(Some(_))) => {
                let span = find(table, "source_burst").map_or(0..0, |v| v.span());
                self.problem(span, "`source_burst` needs `source_rate`".to_string());
                ok = false;
            }
            (None, None) => {}
            _ => ok = false,
        }
        for (key, slot) in [
            ("buffer_size", &mut s.buffer_size),
            ("bulk_buffer_size", &mut s.bulk_buffer_size),
        ] {
            if let Some(v) = find(table, key) {
                match self.size(v, key) {
                    Some(n) => *slot = n,
                    None => ok = false,
                }
            }
        }
        if let Some(v) = find(table, "socket_buffer") {
            match self.size(v, "socket_buffer") {
                Some(n) => s.socket_buffer = Some(n),
                None => ok = false,
            }
        }
        ok.then_some(s)
    }

    /// A byte size: a string with a unit, or a plain integer of bytes.
    fn size(&mut self, v: &Value<'_>, key: &str) -> Option<usize> {
        let (lo, hi) = BUFFER_SIZE_RANGE;
        let size = match v.get_ref() {
            DeValue::String(text) => parse_size(text).map_err(|why| format!("`{key}`: {why}")),
            DeValue::Integer(_) => {
                return self
                    .integer(v, key, lo as i64, hi as i64)
                    .map(|n| n as usize);
            }
            _ => Err(format!("`{key}` must be a size such as \"16KiB\"")),
        };
        match size {
            Ok(n) if (lo..=hi).contains(&n) => Some(n),
            Ok(n) => {
                self.problem(
                    v.span(),
                    format!("`{key}` must be between {lo} and {hi} bytes, not {n}"),
                );
                None
            }
            Err(why) => {
                self.problem(v.span(), why);
                None
            }
        }
    }

    fn duration(&mut self, v: &Value<'_>, key: &str, zero_ok: bool) -> Option<Duration> {
        let DeValue::String(text) = v.get_ref() else {
            self.problem(
                v.span(),
                format!("`{key}` must be a string with a unit, such as \"5s\""),
            );
            return None;
        };
        match parse_duration(text) {
            Ok(d) if d.is_zero() && !zero_ok => {
                self.problem(v.span(), format!("`{key}` must be greater than zero"));
                None
            }
            Ok(d) => Some(d),
            Err(why) => {
                self.problem(v.span(), format!("`{key}`: {why}"));
                None
            }
        }
    }

    fn integer(&mut self, v: &Value<'_>, key: &str, min: i64, max: i64) -> Option<i64> {
        let parsed = match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
            _ => None,
        };
        match parsed {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                self.problem(
                    v.span(),
                    format!("`{key}` must be between {min} and {max}, not {n}"),
                );
                None
            }
            None => {
                self.problem(v.span(), format!("`{key}` must be an integer"));
                None
            }
        }
    }

    fn string<'v>(&mut self, v: &'v Value<'_>, key: &str) -> Option<&'v str> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => {
                self.problem(v.span(), format!("`{key}` must be a string"));
                None
            }
        }
    }

    fn address(&mut self, v: &Value<'_>, key: &str) -> Option<Spanned<SocketAddr>> {
        let text = self.string(v, key)?;
        match resolve(text) {
            Ok(addr) => Some(Spanned::new(v.span(), addr)),
            Err(why) => {
                self.problem(v.span(), format!("`{key}` address `{text}`: {why}"));
                None
            }
        }
    }

    fn upstream(&mut self, table: &DeTable<'_>, span: Range<usize>, tls_present: bool) -> Upstream {
        self.unknown_keys(table, UPSTREAM_KEYS, "in [[upstream]]");
        let name = match find(table, "name") {
            Some(v) => self
                .string(v, "name")
                .and_then(|name| match check_name(name) {
                    Ok(()) => Some(Spanned::new(v.span(), name.to_string())),
                    Err(why) => {
                        self.problem(v.span(), format!("upstream name: {why}"));
                        None
                    }
                }),
            None => {
                self.problem(span.clone(), "upstream has no `name`".to_string());
                None
            }
        };
        let label = name.as_ref().map_or_else(
            || "upstream".to_string(),
            |n| format!("upstream `{}`", n.get_ref()),
        );
        let listen = match find(table, "listen") {
            Some(v) => self.address(v, "listen"),
            None => {
                self.problem(span.clone(), format!("{label} has no `listen` address"));
                None
            }
        };
        let hosts = match find(table, "hosts") {
            Some(v) => self.hosts(v, &label),
            None => {
                self.problem(span, format!("{label} has no `hosts`"));
                None
            }
        };
        let tls = match find(table, "tls") {
            None => Some(tls_present),
            Some(v) => match v.get_ref() {
                DeValue::Boolean(true) if !tls_present => {
                    self.problem(
                        v.span(),
                        format!("{label} has `tls = true` but there is no [tls] table"),
                    );
                    None
                }
                DeValue::Boolean(b) => Some(*b),
                _ => {
                    self.problem(v.span(), "`tls` must be true or false".to_string());
                    None
                }
            },
        };
        let health = match find(table, "health") {
            None => Some(HealthSettings::default()),
            Some(v) => match v.get_ref() {
                DeValue::Table(t) => self.health(t, &label),
                _ => {
                    self.problem(
                        v.span(),
                        format!("{label}: `health` must be a table ([upstream.health])"),
                    );
                    None
                }
            },
        };
        let config = match (&name, &listen, hosts, tls, health) {
            (Some(name), Some(listen), Some(hosts), Some(tls), Some(health)) => {
                Some(UpstreamConfig {
                    name: name.get_ref().clone(),
                    listen: *listen.get_ref(),
                    hosts,
                    tls,
                    health,
                })
            }
            _ => None,
        };
        Upstream {
            name,
            listen,
            config,
        }
    }

    fn hosts(&mut self, v: &Value<'_>, label: &str) -> Option<Vec<SocketAddr>> {
        let DeValue::Array(items) = v.get_ref() else {
            self.problem(
                v.span(),
                format!("{label}: `hosts` must be an array of \"host:port\" strings"),
            );
            return None;
        };
        if items.is_empty() {
            self.problem(v.span(), format!("{label} has no hosts"));
            return None;
        }
        let mut hosts: Vec<SocketAddr> = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items.iter() {
            match self.address(item, "hosts") {
                Some(addr) if hosts.contains(addr.get_ref()) => {
                    ok = false;
                    self.problem(
                        item.span(),
                        format!("{label}: host {} is listed twice", addr.get_ref()),
                    );
                }
                Some(addr) => hosts.push(*addr.get_ref()),
                None => ok = false,
            }
        }
        ok.then_some(hosts)
    }

    /// Duplicate names, and listen addresses that would collide on bind.
    fn cross_check(&mut self, upstreams: &[Upstream]) {
        for (i, u) in upstreams.iter().enumerate() {
            let earlier = &upstreams[..i];
            if let Some(name) = &u.name {
                if earlier
                    .iter()
                    .any(|e| e.name.as_ref().map(|n| n.get_ref()) == Some(name.get_ref()))
                {
                    self.problem(
                        name.span(),
                        format!("duplicate upstream name `{}`", name.get_ref()),
                    );
                }
            }
            if let Some(listen) = &u.listen {
                let clash = earlier
                    .iter()
                    .filter_map(|e| e.listen.as_ref())
                    .find(|e| listens_collide(*e.get_ref(), *listen.get_ref()));
                if let Some(other) = clash {
                    let message = format!(
                        "listen address {} uses the same port as {} of another upstream",
                        listen.get_ref(),
                        other.get_ref()
                    );
                    self.problem(listen.span(), message);
                }
            }
        }
    }
}

/// What a `[[client]]` table yielded, kept with spans for cross-checks.
struct Client {
    identity: Option<Spanned<String>>,
    rule: Option<ClientRule>,
}

/// What an `[[upstream]]` table yielded, kept with spans for cross-checks.
struct Upstream {
    name: Option<Spanned<String>>,
    listen: Option<Spanned<SocketAddr>>,
    config: Option<UpstreamConfig>,
}

fn find<'a, 'i>(table: &'a DeTable<'i>, key: &str) -> Option<&'a Value<'i>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == key)
        .map(|(_, v)| v)
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
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        Config::parse(text, "lb.toml")
            .unwrap_err()
            .to_string()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn parses_the_documented_example() {
        let config = Config::parse(
            r#"
[defaults]
connect_timeout = "5s"
idle_timeout = "1h"
max_connections = 10000
buffer_size = "16KiB"

[[upstream]]
name = "app-a"
listen = "127.0.0.1:7777"
hosts = ["127.0.0.1:9001", "127.0.0.1:9002", "[::1]:9003"]
"#,
            "lb.toml",
        )
        .unwrap();
        assert_eq!(config.settings.idle_timeout, Duration::from_secs(3600));
        assert_eq!(config.settings.buffer_size, 16384);
        assert_eq!(config.upstreams.len(), 1);
        assert_eq!(config.upstreams[0].hosts[2], "[::1]:9003".parse().unwrap());
    }

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
    fn rates_must_be_finite_numbers() {
        let base = "[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n";
        for value in ["inf", "nan", "\"fast\""] {
            let found = problems(&format!("[defaults]\nsource_rate = {value}\n{base}"));
            assert_eq!(
                found,
                ["lb.toml:2:15: `source_rate` must be a finite number"],
                "{value}"
            );
        }
    }

    #[test]
    fn socket_buffer_is_optional_and_checked() {
        let base = "[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n";
        assert_eq!(
            Config::parse(base, "x").unwrap().settings.socket_buffer,
            None
        );
        let text = format!("[defaults]\nsocket_buffer = \"64KiB\"\n{base}");
        let config = Config::parse(&text, "x").unwrap();
        assert_eq!(config.settings.socket_buffer, Some(64 * 1024));
        let found = problems(&format!("[defaults]\nsocket_buffer = 100\n{base}"));
        assert_eq!(
            found,
            ["lb.toml:2:17: `socket_buffer` must be between 1024 and 67108864, not 100"]
        );
        let flags = Settings {
            socket_buffer: Some(1 << 30),
            ..Settings::default()
        };
        assert_eq!(
            check_settings(&flags),
            ["socket_buffer must be between 1024 and 67108864 bytes, not 1073741824"]
        );
    }

    #[test]
    fn bulk_buffer_is_never_smaller_than_the_normal_one() {
        let base = "[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n";
        let text =
            format!("[defaults]\nbuffer_size = \"128KiB\"\nbulk_buffer_size = 16384\n{base}");
        let config = Config::parse(&text, "x").unwrap();
        assert_eq!(config.settings.bulk_buffer(), 128 * 1024);
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
    fn client_rules_are_checked_against_upstreams() {
        let found = problems(
            r#"[tls]
cert = "s.pem"
client_ca = "ca.pem"

[[upstream]]
name = "a"
listen = "127.0.0.1:0"
hosts = ["127.0.0.1:1"]

[[upstream]]
name = "p"
listen = "127.0.0.1:0"
hosts = ["127.0.0.1:1"]
tls = false

[[client]]
identity = "alice"
upstreams = ["a", "nope", "p"]
rate = 0

[[client]]
identity = "alice"
upstreams = ["a"]
rate = 1
"#,
        );
        let text = found.join("\n");
        assert!(text.contains("lb.toml:1:1: [tls] has no `key`"), "{text}");
        assert!(text.contains("no upstream is named `nope`"), "{text}");
        assert!(text.contains("upstream `p` is plain TCP"), "{text}");
        assert!(text.contains("`rate` must be between 1/86400"), "{text}");
        assert!(
            text.contains("22:12: duplicate client identity `alice`"),
            "{text}"
        );
        let found = problems(
            "[[upstream]]\nname=\"a\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\ntls=true\n[[client]]\nidentity=\"x\"\nupstreams=[\"a\"]\nrate=1\n",
        );
        let text = found.join("\n");
        assert!(
            text.contains("`tls = true` but there is no [tls] table"),
            "{text}"
        );
        assert!(
            text.contains("[[client]] rules need a [tls] table"),
            "{text}"
        );
    }

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
    fn invalid_toml_names_the_place() {
        let found = problems("[[upstream]\n");
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("lb.toml:1:"), "{found:?}");
        assert!(found[0].contains("invalid TOML"), "{found:?}");
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
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 s").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(parse_size("16KiB"), Ok(16384));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("64KB"), Ok(64_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("1TiB").is_err());
    }

    #[test]
    fn addresses_accept_ipv6_and_reject_garbage() {
        assert_eq!(resolve("[::1]:9001"), Ok("[::1]:9001".parse().unwrap()));
        assert_eq!(resolve("localhost:9001").map(|a| a.port()), Ok(9001));
        assert!(resolve("127.0.0.1").unwrap_err().contains("host:port"));
        assert!(resolve("127.0.0.1:99999").unwrap_err().contains("port"));
        assert!(resolve(":80").unwrap_err().contains("empty"));
    }

    #[test]
    fn quick_mode_checks_flags() {
        let err = Config::quick("x y", "nowhere", &[], Settings::default()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--name"), "{text}");
        assert!(text.contains("--listen nowhere"), "{text}");
        assert!(text.contains("at least one --host"), "{text}");
        let ok = Config::quick(
            "app",
            "127.0.0.1:0",
            &["127.0.0.1:1".to_string()],
            Settings::default(),
        )
        .unwrap();
        assert_eq!(ok.upstreams[0].hosts.len(), 1);
    }
}
