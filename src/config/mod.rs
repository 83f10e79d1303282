//! Configuration: the TOML schema, its quick-mode equivalent, and validation.
//!
//! The file is read with toml's spanned document parser and walked by hand
//! rather than derived with serde, so that one pass reports *every* problem
//! (unknown key, wrong type, bad address, duplicate name or port, upstream
//! without hosts), each with its line and column. A [`Config`] value that
//! exists is valid: upstream names are unique, listen ports do not collide,
//! every upstream has at least one host (none on port 0 or on its own
//! listen address), every name is looked up (a host's name that does not
//! resolve is a warning while `resolve_interval` is on, as it may appear
//! later, and an error otherwise), and every client identity can match a
//! certificate. What is valid but likely wrong (a TLS upstream
//! no rule names, `bulk_buffer_size` below `buffer_size`) is in its
//! `warnings`, each with its place.
//!
//! This file holds the public types and the entry points (a file, a text,
//! quick mode, command-line settings). The parts:
//!
//! - `schema.rs`: the walk of the document's top level, `[defaults]`,
//!   `[tls]` and `[admin]`, with the helpers for tables and unknown keys;
//! - `upstreams.rs`: `[[upstream]]` and `[upstream.health]`, and the
//!   checks across upstreams (unique names, listen addresses);
//! - `clients.rs`: `[[client]]` rules, checked against the upstreams;
//! - `cluster.rs`: `[cluster]`, the Redis a group of instances shares
//!   client limits through, and its `redis://` URL;
//! - `values.rs`: one value at a time (durations, sizes, addresses,
//!   integers, numbers), each reported at its span when wrong;
//! - `rules.rs`: the bounds and checks of values, shared by the file and
//!   the command line;
//! - `problems.rs`: collecting the problems, with line and column.
//!
//! The report itself, [`ConfigError`] with its
//! [`Problem`](crate::error::Problem)s, is defined in [`crate::error`],
//! which the rest of start-up shares.

mod clients;
mod cluster;
mod problems;
mod rules;
mod schema;
mod tables;
mod upstreams;
mod values;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::dns::Resolver;
use crate::error::{ConfigError, Error, Warning};
use crate::logs::plural;
use crate::policy::access::ClientRule;
use crate::policy::health::HealthSettings;
use crate::policy::limits::Limit;
use crate::policy::trust::SourceNet;
use crate::proxy_header::Version;
use crate::tls::TlsSettings;
use problems::Problems;
use values::Written;

pub use crate::policy::share::Fallback;
pub use cluster::{ClusterSettings, RedisUrl};
pub(crate) use upstreams::loops_back;
pub use values::{parse_duration, parse_size, resolve};

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
    /// `TCP_NOTSENT_LOWAT` of every relayed socket: the bytes it may hold
    /// written but not yet sent. `None` ("off") leaves it to the kernel,
    /// which lets a socket toward a reader that stopped queue its whole
    /// send buffer (MiBs, autotuned).
    pub unsent_limit: Option<usize>,
    /// New connections allowed per source address (IPv6: per /64), checked
    /// at accept before any TLS work; `None` for no limit.
    pub source_limit: Option<Limit>,
    /// Peers whose connections begin with a PROXY protocol header
    /// (`accept_proxy`), for the upstreams that set none of their own;
    /// empty: none.
    pub accept_proxy: Vec<SourceNet>,
    /// Worker threads, each with its own poll loop (`"auto"` in the file:
    /// the cores available). Takes effect at start; a reload keeps the
    /// number running.
    pub workers: usize,
    /// How plain TCP pairs move their bytes: through tcplb's buffers, or
    /// spliced through kernel pipes (TLS pairs always use buffers).
    pub relay: Relay,
    /// Pipes the spliced relay may hold at once, over all workers (each
    /// costs two descriptors and up to `bulk_buffer_size` of kernel
    /// memory while bytes wait in it); a direction that finds none left
    /// relays through a buffer. 0 turns splicing off.
    pub max_pipes: usize,
    /// How often the names of hosts given as `name:port` are looked up
    /// again while tcplb runs; zero looks them up only when the config is
    /// read (at start and on reload).
    pub resolve_interval: Duration,
    /// The DNS server names are looked up from; `None` for the system's
    /// resolver (getaddrinfo: `/etc/hosts`, then `/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// How long a client may wait for a slot when every host of its
    /// upstream is at its `max_connections`; zero refuses it at once with
    /// `ERROR overloaded`. An upstream's own `queue_timeout` overrides it.
    pub queue_timeout: Duration,
    /// Clients that may wait in one upstream's queue at once, in all
    /// workers; beyond, they are refused at once. An upstream's own
    /// `max_queued` overrides it.
    pub max_queued: u32,
    /// TCP keepalive on both sockets of every pair (`keepalive`,
    /// `keepalive_interval`, `keepalive_probes`); `None`, the default,
    /// leaves it off.
    pub keepalive: Option<Keepalive>,
    /// How access lines are written: text (the default) or one JSON
    /// object per line.
    pub access_log: AccessLog,
}

/// The format of access lines (`access_log`, `--access-log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessLog {
    /// `127.0.0.1:40910 `app` host=127.0.0.1:9001 up=7 down=25 ms=3 end=closed`,
    /// after the logger's timestamp, level and target.
    #[default]
    Text,
    /// One JSON object per line, nothing around it (see the README for
    /// its fields).
    Json,
}

impl AccessLog {
    /// The values of `access_log`, in the order of the variants.
    pub const NAMES: [&'static str; 2] = ["text", "json"];

    /// The `access_log` value that names this format.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The format an `access_log` value names.
    pub fn from_name(name: &str) -> Option<AccessLog> {
        match name {
            "text" => Some(AccessLog::Text),
            "json" => Some(AccessLog::Json),
            _ => None,
        }
    }
}

/// TCP keepalive as configured: probes start after `idle` seconds without
/// traffic, every `interval`, and the connection is dropped after
/// `probes` unanswered ones. What is not given stays the kernel's
/// (`net.ipv4.tcp_keepalive_intvl`, 75 s, and `tcp_keepalive_probes`, 9,
/// on a stock Linux).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// `TCP_KEEPIDLE`: whole seconds, 1 to 32767.
    pub idle: Duration,
    /// `TCP_KEEPINTVL`: whole seconds, 1 to 32767.
    pub interval: Option<Duration>,
    /// `TCP_KEEPCNT`: 1 to 127.
    pub probes: Option<u32>,
}

impl Settings {
    /// The number of workers `"auto"` means: the cores this process may use.
    pub fn auto_workers() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

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
            unsent_limit: Some(64 * 1024),
            source_limit: None,
            accept_proxy: Vec::new(),
            workers: 1,
            resolve_interval: Duration::from_secs(30),
            resolver: None,
            queue_timeout: Duration::ZERO,
            max_queued: 1024,
            keepalive: None,
            access_log: AccessLog::Text,
            relay: Relay::Auto,
            max_pipes: 1024,
        }
    }
}

/// How plain TCP pairs relay (the `relay` key of `[defaults]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Relay {
    /// Each direction is copied through a buffer until it streams (a read
    /// fills a whole buffer, the same test that moves it up to a bulk
    /// buffer), and spliced from then on: request/response traffic keeps
    /// the buffers' fewer syscalls, bulk traffic skips the copies.
    #[default]
    Auto,
    /// Every direction of a plain pair is spliced, socket to pipe to
    /// socket, without a copy through user space.
    Splice,
    /// Every direction is copied through tcplb's buffers.
    Copy,
}

impl Relay {
    /// The values of the `relay` key, in the order of the variants.
    pub const NAMES: [&'static str; 3] = ["auto", "splice", "copy"];

    /// The `relay` value that names this mode.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The mode a `relay` value names.
    pub fn from_name(name: &str) -> Option<Relay> {
        match name {
            "auto" => Some(Relay::Auto),
            "splice" => Some(Relay::Splice),
            "copy" => Some(Relay::Copy),
            _ => None,
        }
    }
}

/// One upstream: a name, the address clients connect to, and the hosts behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Unique among the upstreams; names the upstream in logs, metrics and
    /// client rules (letters, digits, '-', '_' and '.', at most 64).
    pub name: String,
    /// The address clients connect to; unique among the upstreams (port 0
    /// lets the kernel choose).
    pub listen: SocketAddr,
    /// The hosts given by address, none listed twice (those given by name
    /// are in `names`; [`addresses`](Self::addresses) has them all).
    pub hosts: Vec<HostConfig>,
    /// The hosts given by name (`name:port`), each with the addresses it
    /// resolves to: every one of them is a host, with the entry's weight
    /// and cap.
    pub names: Vec<HostName>,
    /// Clients must speak mTLS (default: true when `[tls]` exists).
    pub tls: bool,
    /// `[upstream.health]`; without it, checks are passive only.
    pub health: HealthSettings,
    /// What a refused client of this upstream gets (`refusal`).
    pub refusal: RefusalMode,
    /// Its own `queue_timeout`, instead of `[defaults]`'.
    pub queue_timeout: Option<Duration>,
    /// Its own `max_queued`, instead of `[defaults]`'.
    pub max_queued: Option<u32>,
    /// The PROXY protocol header sent to its hosts before any byte of a
    /// client (`send_proxy`); `None`: none.
    pub send_proxy: Option<Version>,
    /// Peers whose connections begin with a PROXY protocol header, whose
    /// address then stands for theirs (`accept_proxy`); empty: none. In a
    /// file, `[defaults]`'s list unless the upstream has its own.
    pub accept_proxy: Vec<SourceNet>,
}

/// One host of an upstream: a plain `"host:port"` in the file's `hosts`,
/// or a table `{ address = "host:port", weight = 3, max_connections = 200 }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// The TCP address of the host.
    pub addr: SocketAddr,
    /// Its share of the upstream's connections relative to the other
    /// hosts: least-connections ranks hosts by active connections divided
    /// by weight (1 to 1000; 1 by default).
    pub weight: u32,
    /// The most connections it handles at once; a host at its cap is
    /// skipped (`None`: no cap of its own).
    pub max_connections: Option<u32>,
}

impl HostConfig {
    /// The weight of a host that names none.
    pub const DEFAULT_WEIGHT: u32 = 1;
}

impl From<SocketAddr> for HostConfig {
    /// A host with the default weight and no cap, as a plain string gives.
    fn from(addr: SocketAddr) -> HostConfig {
        HostConfig {
            addr,
            weight: HostConfig::DEFAULT_WEIGHT,
            max_connections: None,
        }
    }
}

impl UpstreamConfig {
    /// Every host: those given by address, then each address of each
    /// name (with that name's weight and cap), in file order, none twice
    /// (an address two entries give is one host, the first one's).
    pub fn addresses(&self) -> Vec<HostConfig> {
        let mut all = self.hosts.clone();
        for host in self.names.iter().flat_map(HostName::hosts) {
            if !all.iter().any(|h| h.addr == host.addr) {
                all.push(host);
            }
        }
        all
    }
}

/// A host given by name, `name:port` (a plain string of `hosts`, or the
/// `address` of a host table): looked up when the config is read, and
/// again every `resolve_interval` while tcplb runs. Each of its
/// addresses, A and AAAA, is a host of the upstream, with the weight and
/// cap of its entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostName {
    /// The name, as written (without the port).
    pub name: String,
    /// The port every address of the name is given.
    pub port: u16,
    /// The weight each of its addresses has (see [`HostConfig::weight`]).
    pub weight: u32,
    /// The cap each of its addresses has, each its own (see
    /// [`HostConfig::max_connections`]).
    pub max_connections: Option<u32>,
    /// Its addresses with the port, sorted: what it resolved to when the
    /// config was read (none if it did not resolve, which
    /// `resolve_interval` allows), later what it resolves to now.
    pub addrs: Vec<SocketAddr>,
}

impl HostName {
    /// Its addresses as hosts, each with its weight and cap.
    pub fn hosts(&self) -> impl Iterator<Item = HostConfig> + '_ {
        self.addrs.iter().map(|&addr| HostConfig {
            addr,
            weight: self.weight,
            max_connections: self.max_connections,
        })
    }
}

impl std::fmt::Display for HostName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.port)
    }
}

/// How an upstream turns a client away (its `refusal` key): the reason is
/// logged and counted by its code whichever way the client is told.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RefusalMode {
    /// One line, `ERROR code: why` (over TLS: then `close_notify`), then FIN.
    #[default]
    Line,
    /// FIN without a line (over TLS: `close_notify`, then FIN), for
    /// protocols whose clients would take a line for an answer.
    Close,
    /// RST at once, over TLS too: no line, no `close_notify`.
    Reset,
}

impl RefusalMode {
    /// The values of the `refusal` key, in the order of the variants.
    pub const NAMES: [&'static str; 3] = ["line", "close", "reset"];

    /// The `refusal` value that names this mode.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The mode a `refusal` value names.
    pub fn from_name(name: &str) -> Option<RefusalMode> {
        match name {
            "line" => Some(RefusalMode::Line),
            "close" => Some(RefusalMode::Close),
            "reset" => Some(RefusalMode::Reset),
            _ => None,
        }
    }
}

/// A complete, validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The `[defaults]` table (or the defaults, without it).
    pub settings: Settings,
    /// The `[[upstream]]` tables, in file order; at least one.
    pub upstreams: Vec<UpstreamConfig>,
    /// The `[tls]` table; TLS files are read when the proxy binds (and by `check`).
    pub tls: Option<TlsSettings>,
    /// The `[[client]]` rules for TLS upstreams.
    pub clients: Vec<ClientRule>,
    /// Where the admin listener (metrics, status, reload) binds.
    pub admin: Option<SocketAddr>,
    /// `[cluster]`: client limits shared through Redis by a group of instances.
    pub cluster: Option<ClusterSettings>,
    /// What the source holds that is valid but likely wrong, with its
    /// place (see [`Warning`]); logged when the config is put in force.
    pub warnings: Vec<Warning>,
}

impl Config {
    /// Reads and validates a configuration file; relative TLS file names
    /// (of `[tls]` and `[cluster]`) are taken relative to the file's folder.
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
        let redis_tls = config.cluster.as_mut().and_then(|c| c.tls.as_mut());
        if let (Some(tls), Some(dir)) = (redis_tls, path.parent()) {
            tls.resolve_paths(dir);
        }
        Ok(config)
    }

    /// How much it holds, in words: "2 upstreams, 3 hosts" (and ", 1
    /// warning" when there are warnings).
    pub fn summary(&self) -> String {
        let hosts = self.upstreams.iter().map(|u| u.addresses().len()).sum();
        let mut summary = format!(
            "{}, {}",
            plural(self.upstreams.len(), "upstream"),
            plural(hosts, "host")
        );
        if !self.warnings.is_empty() {
            summary = format!("{summary}, {}", plural(self.warnings.len(), "warning"));
        }
        summary
    }

    /// The `[admin] listen` address of a config file (`None` without
    /// `[admin]`), read without checking the rest of the file: the running
    /// tcplb that `tcplb reload` asks is listening there whatever the new
    /// file's other problems are.
    pub fn admin_address(path: &Path) -> Result<Option<SocketAddr>, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_path_buf(),
            source,
        })?;
        admin_in(&text, &path.display().to_string()).map_err(Error::Config)
    }

    /// Validates configuration text; `origin` names it in messages. What
    /// is valid but likely wrong is in the config's `warnings`.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::walk(Problems::new(text, origin))
    }

    /// Like [`parse`](Self::parse), but never asks the resolver: every
    /// address must be literal (`IPv4:port` or `[IPv6]:port`), and a
    /// `name:port` is reported as a problem. For readers that must not
    /// touch the network or depend on what it answers, such as the fuzz
    /// target.
    pub fn parse_without_lookups(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::walk(Problems::without_lookups(text, origin))
    }

    fn walk(mut problems: Problems<'_>) -> Result<Config, ConfigError> {
        let config = schema::document(&mut problems);
        let (mut config, warnings) = problems.finish(config)?;
        config.warnings = warnings;
        Ok(config)
    }

    /// The configuration of quick mode: one upstream from command-line
    /// addresses, with `settings` as they are (see [`check_settings`]).
    /// A `--host` name is every address it resolves to; one that does not
    /// resolve is an error here, as there is no `check` step to warn.
    pub fn quick(
        name: &str,
        listen: &str,
        hosts: &[String],
        settings: Settings,
    ) -> Result<Config, ConfigError> {
        let mut problems = Problems::new("", "command line");
        if let Err(why) = rules::name(name) {
            problems.general(format!("--name: {why}"));
        }
        let listen = resolve(listen)
            .map_err(|why| problems.general(format!("--listen {listen}: {why}")))
            .ok();
        if hosts.is_empty() {
            problems.general("at least one --host is required".to_string());
        }
        let (literal, names) = quick_hosts(&mut problems, hosts, Resolver::of(settings.resolver));
        let config = listen.map(|listen| Config {
            settings,
            upstreams: vec![UpstreamConfig {
                name: name.to_string(),
                listen,
                hosts: literal,
                names,
                tls: false,
                health: HealthSettings::default(),
                refusal: RefusalMode::default(),
                queue_timeout: None,
                max_queued: None,
                send_proxy: None,
                accept_proxy: Vec::new(),
            }],
            tls: None,
            clients: Vec::new(),
            admin: None,
            cluster: None,
            warnings: Vec::new(),
        });
        problems.finish(config).map(|(config, _)| config)
    }
}

/// Quick mode's `--host` addresses: literal ones, and names with what
/// they resolve to now; each problem (written twice, unresolvable, not an
/// address) reported.
fn quick_hosts(
    problems: &mut Problems<'_>,
    hosts: &[String],
    resolver: Resolver,
) -> (Vec<HostConfig>, Vec<HostName>) {
    let (mut literal, mut names): (Vec<HostConfig>, Vec<HostName>) = (Vec::new(), Vec::new());
    for host in hosts {
        let twice = || format!("--host {host}: listed twice");
        match values::written(host) {
            Ok(Written::Literal(addr)) if literal.iter().any(|h| h.addr == addr) => {
                problems.general(twice())
            }
            Ok(Written::Literal(addr)) => literal.push(addr.into()),
            Ok(Written::Name(name, port))
                if names
                    .iter()
                    .any(|n| n.port == port && n.name.eq_ignore_ascii_case(name)) =>
            {
                problems.general(twice())
            }
            Ok(Written::Name(name, port)) => match values::look_up(resolver, name, port) {
                Ok(addrs) => names.push(HostName {
                    name: name.to_string(),
                    port,
                    weight: HostConfig::DEFAULT_WEIGHT,
                    max_connections: None,
                    addrs,
                }),
                Err(why) => problems.general(format!("--host {host}: {why}")),
            },
            Err(why) => problems.general(format!("--host {host}: {why}")),
        }
    }
    (literal, names)
}

/// The `[admin] listen` address of configuration text, the rest unchecked.
fn admin_in(text: &str, origin: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let mut problems = Problems::new(text, origin);
    let admin = schema::admin_only(&mut problems);
    problems.finish(admin).map(|(admin, _)| admin)
}

/// Checks settings given as plain values (command-line flags applied over
/// the file's or the default settings) against the rules the file's
/// `[defaults]` obeys; one message per broken rule, naming the setting.
pub fn check_settings(settings: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    for (name, value) in [
        ("connect_timeout", settings.connect_timeout),
        ("idle_timeout", settings.idle_timeout),
        ("half_close_timeout", settings.half_close_timeout),
    ] {
        if let Err(why) = rules::positive(value) {
            out.push(format!("{name} {why}"));
        }
    }
    // Only the lower bound, as the flag (a usize) has always been
    // checked; the file's integer is also capped, at u32::MAX.
    let least = *rules::CONNECTIONS.start();
    if (settings.max_connections as u64) < least as u64 {
        out.push(format!("max_connections must be at least {least}"));
    }
    for (name, value) in [
        ("buffer_size", Some(settings.buffer_size)),
        ("bulk_buffer_size", Some(settings.bulk_buffer_size)),
        ("socket_buffer", settings.socket_buffer),
        ("unsent_limit", settings.unsent_limit),
    ] {
        if let Some(Err(why)) = value.map(rules::buffer_size) {
            out.push(format!("{name} {why}"));
        }
    }
    if !rules::PIPES.contains(&(settings.max_pipes as i64)) {
        let (lo, hi) = (rules::PIPES.start(), rules::PIPES.end());
        out.push(format!("max_pipes must be between {lo} and {hi}"));
    }
    if !rules::BACKLOG.contains(&i64::from(settings.backlog)) {
        let (lo, hi) = (rules::BACKLOG.start(), rules::BACKLOG.end());
        out.push(format!("backlog must be between {lo} and {hi}"));
    }
    out
}

/// The lines of the report on `text`, which must be invalid.
#[cfg(test)]
fn problems(text: &str) -> Vec<String> {
    Config::parse(text, "lb.toml")
        .unwrap_err()
        .to_string()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The warnings of `text`, which must be valid, one line each.
#[cfg(test)]
fn warnings(text: &str) -> Vec<String> {
    Config::parse(text, "lb.toml")
        .unwrap()
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            config.upstreams[0].hosts[2],
            HostConfig::from("[::1]:9003".parse::<SocketAddr>().unwrap())
        );
    }

    #[test]
    fn the_summary_counts_in_words() {
        let one = Config::quick(
            "app",
            "127.0.0.1:0",
            &["127.0.0.1:1".to_string()],
            Settings::default(),
        )
        .unwrap();
        assert_eq!(one.summary(), "1 upstream, 1 host");
        let mut two = one.clone();
        two.upstreams.push(one.upstreams[0].clone());
        let other: SocketAddr = "127.0.0.1:2".parse().unwrap();
        two.upstreams[1].hosts.push(other.into());
        assert_eq!(two.summary(), "2 upstreams, 3 hosts");
        assert_eq!(RefusalMode::Reset.name(), "reset");
    }

    #[test]
    fn the_admin_address_is_read_whatever_else_is_wrong() {
        let broken_elsewhere =
            "[defaults]\nidle_timeout = 5\n\n[admin]\nlisten = \"127.0.0.1:9900\"\n";
        assert!(Config::parse(broken_elsewhere, "lb.toml").is_err());
        assert_eq!(
            admin_in(broken_elsewhere, "lb.toml"),
            Ok(Some("127.0.0.1:9900".parse().unwrap()))
        );
        assert_eq!(admin_in("[[upstream]]\nname = 1\n", "lb.toml"), Ok(None));
        let bad = admin_in("[admin]\nlisten = \"nowhere\"\n", "lb.toml").unwrap_err();
        assert!(bad.to_string().starts_with("lb.toml:2:10: "), "{bad}");
        assert!(admin_in("[admin\n", "lb.toml").is_err());
    }

    #[test]
    fn a_reading_without_lookups_takes_literal_addresses_and_reports_names() {
        let text = |host: &str| {
            format!(
                "[admin]\nlisten = \"[::1]:9900\"\n\n[[upstream]]\nname = \"a\"\n\
                 listen = \"127.0.0.1:7000\"\nhosts = [\"127.0.0.1:9001\", \"{host}\"]\n"
            )
        };
        let literal = text("[::1]:9002");
        assert_eq!(
            Config::parse_without_lookups(&literal, "lb.toml").unwrap(),
            Config::parse(&literal, "lb.toml").unwrap()
        );
        // A name the resolver answers at once (from /etc/hosts) with lookups...
        let named = text("localhost:9002");
        assert!(Config::parse(&named, "lb.toml").is_ok());
        // ...and one it cannot (a DNS query) are the same problem without.
        for name in ["localhost", "backend.invalid"] {
            let err = Config::parse_without_lookups(&text(&format!("{name}:9002")), "lb.toml")
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                format!(
                    "lb.toml:7:28: `hosts` address `{name}:9002`: `{name}` is a name, and this \
                     reading looks no name up (use an IP address)"
                ),
            );
        }
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
