//! The walk of `[cluster]`: where the Redis that a group of instances
//! shares limits through is (`redis = "redis://..."`, or `rediss://` for
//! TLS, with `tls_ca`, `tls_cert` and `tls_key`), the key prefix, the
//! group's expected size (for the fallback), and the timing of requests
//! and counts. The URL is read here, once: its address resolved at
//! start-up as every address of the file, its password kept out of every
//! message and log line. The TLS files are read where the `[tls]` ones
//! are: when the proxy starts, and by `tcplb check`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rustls_pki_types::ServerName;
use toml::de::{DeTable, DeValue};

use super::problems::Problems;
use super::rules;
use super::tables::{as_table, find, required, unknown_keys};
use super::values::{Value, Zero, address_of, duration, integer, string};
use crate::policy::share::Fallback;
use crate::tls::{RedisTls, RedisTlsPlaces};

const CLUSTER_KEYS: &[&str] = &[
    "redis",
    "key_prefix",
    "instances",
    "timeout",
    "connections_expiry",
    "lease",
    "fallback",
    "tls_ca",
    "tls_cert",
    "tls_key",
];

/// Where Redis is and how to log in: a `redis://` or `rediss://` URL, read.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// `rediss://`: TLS to Redis, its certificate verified against `host`.
    pub tls: bool,
    /// The host as written (a name, or an address), for messages.
    pub host: String,
    /// Its address, resolved at start-up.
    pub addr: SocketAddr,
    /// The database (`SELECT`), 0 unless the URL's path names one.
    pub db: u32,
    /// The ACL user (`AUTH user password`), if the URL names one.
    pub username: Option<String>,
    /// The password (`AUTH`), if the URL has one. Never shown.
    pub password: Option<String>,
}

impl RedisUrl {
    /// The name Redis's certificate is verified against (`rediss://`):
    /// the host, a DNS name or an IP address.
    pub fn server_name(&self) -> Option<ServerName<'static>> {
        ServerName::try_from(self.host.clone()).ok()
    }
}

impl fmt::Display for RedisUrl {
    /// The URL without its password: `redis://user:***@host:port/db`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        write!(f, "{scheme}://")?;
        match (&self.username, &self.password) {
            (Some(user), _) => write!(f, "{user}:***@")?,
            (None, Some(_)) => write!(f, ":***@")?,
            (None, None) => {}
        }
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(f, "{host}:{}/{}", self.addr.port(), self.db)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({self}, {})", self.addr)
    }
}

/// `[cluster]`: client limits shared by a group of instances through Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The Redis the group shares.
    pub redis: RedisUrl,
    /// What every key tcplb writes starts with.
    pub key_prefix: String,
    /// The group's expected size: the fallback `split` divides by it, and
    /// leases are sized so that the group's fit in one burst.
    pub instances: u32,
    /// How long a request to Redis (and a connect) may take before Redis
    /// counts as down; also the longest a connection waits for an answer.
    pub timeout: Duration,
    /// How long an instance's connection counts stay in Redis without a
    /// refresh: a crashed instance's connections stop counting after it.
    pub connections_expiry: Duration,
    /// Tokens asked for at a time; `None`: a tenth of a second of the
    /// rate, at most `burst / instances`.
    pub lease: Option<u32>,
    /// What each instance does alone while Redis is unreachable.
    pub fallback: Fallback,
    /// With a `rediss://` URL: how Redis's certificate is verified, and
    /// the client certificate shown to it.
    pub tls: Option<RedisTls>,
}

impl ClusterSettings {
    /// `timeout` when `[cluster]` leaves it out.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(250);
    /// `connections_expiry` when `[cluster]` leaves it out.
    pub const DEFAULT_CONNECTIONS_EXPIRY: Duration = Duration::from_secs(30);
    /// `key_prefix` when `[cluster]` leaves it out.
    pub const DEFAULT_KEY_PREFIX: &'static str = "tcplb:";
}

/// `[cluster]`: `Some(None)` when it is absent.
pub(super) fn cluster(p: &mut Problems<'_>, root: &DeTable<'_>) -> Option<Option<ClusterSettings>> {
    let Some(value) = find(root, "cluster") else {
        return Some(None);
    };
    let table = as_table(
        p,
        value,
        "`cluster` must be a table ([cluster])".to_string(),
    )?;
    unknown_keys(p, table, CLUSTER_KEYS, "in [cluster]");
    let at = (table, &value.span());
    let no_redis =
        || "[cluster] has no `redis` URL (such as \"redis://127.0.0.1:6379/0\")".to_string();
    let redis = required(p, at, "redis", no_redis, redis_url);
    let no_instances = || {
        "[cluster] has no `instances` (the number of tcplb instances sharing the limits, which the fallback divides them by)".to_string()
    };
    let instances = required(p, at, "instances", no_instances, |p, v| {
        integer(p, v, "instances", rules::INSTANCES).map(|n| n as u32)
    });
    let key_prefix = find(table, "key_prefix").map_or(
        Some(ClusterSettings::DEFAULT_KEY_PREFIX.to_string()),
        |v| {
            let text = string(p, v, "key_prefix")?;
            p.check(v.span(), "key_prefix", rules::key_prefix(text))
                .map(str::to_string)
        },
    );
    let timed = |p: &mut Problems<'_>, key: &str, default, rule: fn(Duration) -> _| {
        find(table, key).map_or(Some(default), |v| {
            let d = duration(p, v, key, Zero::Refused)?;
            p.check(v.span(), key, rule(d))
        })
    };
    let timeout = timed(
        p,
        "timeout",
        ClusterSettings::DEFAULT_TIMEOUT,
        rules::redis_timeout,
    );
    let connections_expiry = timed(
        p,
        "connections_expiry",
        ClusterSettings::DEFAULT_CONNECTIONS_EXPIRY,
        rules::connections_expiry,
    );
    let lease = find(table, "lease").map_or(Some(None), |v| {
        integer(p, v, "lease", rules::BURST).map(|n| Some(n as u32))
    });
    let fallback = find(table, "fallback").map_or(Some(Fallback::default()), |v| fallback(p, v));
    let redis_place = find(table, "redis").map(|v| p.place(v.span()));
    let tls = redis_tls(p, table, redis.as_ref(), redis_place);
    Some(Some(ClusterSettings {
        tls: tls?,
        redis: redis?,
        key_prefix: key_prefix?,
        instances: instances?,
        timeout: timeout?,
        connections_expiry: connections_expiry?,
        lease: lease?,
        fallback: fallback?,
    }))
}

/// `fallback` of `[cluster]`: one of `Fallback::NAMES`.
fn fallback(p: &mut Problems<'_>, v: &Value<'_>) -> Option<Fallback> {
    let name = string(p, v, "fallback")?;
    let found = Fallback::from_name(name);
    if found.is_none() {
        let message = format!(
            "`fallback` must be one of \"{}\", not \"{name}\"",
            Fallback::NAMES.join("\", \"")
        );
        p.at(v.span(), message);
    }
    found
}

/// `tls_ca`, `tls_cert` and `tls_key` of `[cluster]`: `Some(None)` for a
/// `redis://` URL, which takes none of them (nor a URL that is wrong).
fn redis_tls(
    p: &mut Problems<'_>,
    table: &DeTable<'_>,
    url: Option<&RedisUrl>,
    redis: Option<String>,
) -> Option<Option<RedisTls>> {
    let mut places = RedisTlsPlaces {
        redis,
        ..RedisTlsPlaces::default()
    };
    let mut ok = true;
    let mut path = |p: &mut Problems<'_>, key: &str, place: &mut Option<String>| {
        let v = find(table, key)?;
        if url.is_some_and(|u| !u.tls) {
            let message = format!(
                "`{key}` is for TLS to Redis, and `redis` is a `redis://` URL (write `rediss://` for TLS)"
            );
            p.at(v.span(), message);
            ok = false;
            return None;
        }
        *place = Some(p.place(v.span()));
        let text = string(p, v, key);
        ok &= text.is_some();
        Some((PathBuf::from(text?), v.span()))
    };
    let ca = path(p, "tls_ca", &mut places.ca);
    let cert = path(p, "tls_cert", &mut places.cert);
    let key = path(p, "tls_key", &mut places.key);
    let client = match (cert, key) {
        (Some((cert, _)), Some((key, _))) => Some((cert, key)),
        (Some((_, span)), None) if ok => {
            let message = "`tls_cert` needs `tls_key` (the client certificate's private key)";
            p.at(span, message.to_string());
            return None;
        }
        (None, Some((_, span))) if ok => {
            let message = "`tls_key` needs `tls_cert` (the client certificate it is the key of)";
            p.at(span, message.to_string());
            return None;
        }
        _ => None,
    };
    if !ok {
        return None;
    }
    match url {
        Some(url) if url.tls => Some(Some(RedisTls {
            ca: ca.map(|(path, _)| path),
            client,
            places,
        })),
        _ => Some(None),
    }
}

/// `redis` of `[cluster]`: `redis[s]://[[user]:password@]host[:port][/db]`.
fn redis_url(p: &mut Problems<'_>, v: &Value<'_>) -> Option<RedisUrl> {
    let DeValue::String(text) = v.get_ref() else {
        let message = "`redis` must be a URL such as \"redis://127.0.0.1:6379/0\"";
        p.at(v.span(), message.to_string());
        return None;
    };
    let lookups = p.lookups();
    match parse_redis_url(text, lookups) {
        Ok(url) => Some(url),
        Err(why) => {
            p.at(v.span(), format!("`redis` {why}"));
            None
        }
    }
}

/// Reads a Redis URL; the error is the words after "`redis` ".
fn parse_redis_url(text: &str, lookups: bool) -> Result<RedisUrl, String> {
    let (tls, rest) = scheme(text)?;
    if rest.contains(['?', '#']) {
        return Err(
            "has a query or fragment (`?...`, `#...`), which tcplb does not read".to_string(),
        );
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    let (username, password) = userinfo.map_or(Ok((None, None)), credentials)?;
    let (host, with_port) = host_and_port(hostport)?;
    if tls && ServerName::try_from(host.as_str()).is_err() {
        return Err(format!(
            "host `{host}` is neither a DNS name nor an IP address, which Redis's certificate could be verified against"
        ));
    }
    let addr =
        address_of(&with_port, lookups).map_err(|why| format!("address `{with_port}`: {why}"))?;
    if addr.port() == 0 {
        return Err("has port 0".to_string());
    }
    Ok(RedisUrl {
        tls,
        host,
        addr,
        db: database(path)?,
        username,
        password,
    })
}

/// `redis://` (false) or `rediss://` (true), and what follows it.
fn scheme(text: &str) -> Result<(bool, &str), String> {
    if let Some(rest) = text.strip_prefix("redis://") {
        Ok((false, rest))
    } else if let Some(rest) = text.strip_prefix("rediss://") {
        Ok((true, rest))
    } else {
        Err(format!(
            "must be a URL such as \"redis://127.0.0.1:6379/0\" (or \"rediss://\" for TLS), not `{}`",
            without_password(text)
        ))
    }
}

/// `[user]:password` before the `@`: the user (if named) and the password,
/// %-decoded.
fn credentials(info: &str) -> Result<(Option<String>, Option<String>), String> {
    let (user, password) = info.split_once(':').ok_or(
        "names a user without a password: write `redis://user:password@host` (or `redis://:password@host`)",
    )?;
    let user = percent_decode(user).ok_or("has a bad %-escape in its user name")?;
    let password = percent_decode(password).ok_or("has a bad %-escape in its password")?;
    if password.is_empty() {
        return Err("has an empty password".to_string());
    }
    Ok(((!user.is_empty()).then_some(user), Some(password)))
}

/// `host[:port]` or `[v6][:port]`: the host as written, and the address
/// to resolve (port 6379 unless one is given).
fn host_and_port(hostport: &str) -> Result<(String, String), String> {
    if hostport.is_empty() {
        return Err("has no host".to_string());
    }
    if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or("has an unclosed `[` in its host")?;
        let port = match after {
            "" => "6379",
            _ => after
                .strip_prefix(':')
                .ok_or("has something after `]` that is not `:port`")?,
        };
        return Ok((host.to_string(), format!("[{host}]:{port}")));
    }
    Ok(match hostport.rsplit_once(':') {
        Some((host, port)) => (host.to_string(), format!("{host}:{port}")),
        None => (hostport.to_string(), format!("{hostport}:6379")),
    })
}

/// The path after the host: a database number, 0 when there is none.
fn database(path: &str) -> Result<u32, String> {
    if path.is_empty() {
        return Ok(0);
    }
    path.parse::<u32>()
        .ok()
        .filter(|n| *n <= rules::REDIS_DB_MAX)
        .ok_or_else(|| {
            format!(
                "path `/{path}` is not a database number (0 to {})",
                rules::REDIS_DB_MAX
            )
        })
}

/// A URL as it may appear in a message: any `user:password@` replaced.
fn without_password(text: &str) -> String {
    match text.split_once('@') {
        Some((before, after)) => match before.rsplit_once("//") {
            Some((scheme, _)) => format!("{scheme}//***@{after}"),
            None => format!("***@{after}"),
        },
        None => text.to_string(),
    }
}

/// `%XX` escapes decoded (a password may hold `@`, `:` or `/`).
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, problems};

    const BASE: &str =
        "[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n";

    fn parse(table: &str) -> Option<ClusterSettings> {
        Config::parse(&format!("{table}\n{BASE}"), "lb.toml")
            .unwrap()
            .cluster
    }

    #[test]
    fn urls_with_users_passwords_ports_and_databases() {
        let url = |text: &str| parse_redis_url(text, false);
        let plain = url("redis://127.0.0.1:6379/0").unwrap();
        assert_eq!(plain.addr, "127.0.0.1:6379".parse().unwrap());
        assert_eq!((plain.db, plain.username, plain.password), (0, None, None));
        let full = url("redis://app:s%40cret%3A1@[::1]:7000/3").unwrap();
        assert_eq!(full.addr, "[::1]:7000".parse().unwrap());
        assert_eq!(full.db, 3);
        assert_eq!(full.username.as_deref(), Some("app"));
        assert_eq!(full.password.as_deref(), Some("s@cret:1"));
        assert_eq!(full.to_string(), "redis://app:***@[::1]:7000/3");
        let password_only = url("redis://:pw@10.0.0.5").unwrap();
        assert_eq!(password_only.addr.port(), 6379);
        assert_eq!(password_only.username, None);
        assert_eq!(password_only.to_string(), "redis://:***@10.0.0.5:6379/0");
        assert!(!format!("{password_only:?}").contains("pw"));
        assert_eq!(url("redis://[::1]").unwrap().addr.port(), 6379);
        assert_eq!(url("redis://127.0.0.1/").unwrap().db, 0);
    }

    #[test]
    fn bad_urls_say_what_is_wrong_without_the_password() {
        let url = |text: &str| parse_redis_url(text, false).unwrap_err();
        assert!(url("rediss://a..b:6379").contains("neither a DNS name nor an IP address"));
        assert!(url("redis:/127.0.0.1").contains("(or \"rediss://\" for TLS)"));
        let http = url("http://u:hunter2@127.0.0.1");
        assert!(http.contains("must be a URL"), "{http}");
        assert!(!http.contains("hunter2"), "{http}");
        assert!(url("redis://alice@127.0.0.1").contains("user without a password"));
        assert!(url("redis://a:@127.0.0.1").contains("empty password"));
        assert!(url("redis://127.0.0.1:6379/x").contains("not a database number"));
        assert!(url("redis://127.0.0.1:6379/99999").contains("not a database number"));
        assert!(url("redis://127.0.0.1?timeout=1").contains("query"));
        assert!(url("redis://").contains("no host"));
        assert!(url("redis://127.0.0.1:0").contains("port 0"));
        assert!(url("redis://[::1").contains("unclosed"));
        assert!(url("redis://:p%zz@127.0.0.1").contains("%-escape"));
        assert!(url("redis://redis.internal:6379").contains("is a name"));
    }

    #[test]
    fn defaults_and_every_key() {
        let s = parse("[cluster]\nredis = \"redis://127.0.0.1:6379/0\"\ninstances = 3\n").unwrap();
        assert_eq!(s.key_prefix, "tcplb:");
        assert_eq!(s.instances, 3);
        assert_eq!(s.timeout, ClusterSettings::DEFAULT_TIMEOUT);
        assert_eq!(
            s.connections_expiry,
            ClusterSettings::DEFAULT_CONNECTIONS_EXPIRY
        );
        assert_eq!((s.lease, s.fallback), (None, Fallback::Split));
        let s = parse(
            "[cluster]\nredis = \"redis://127.0.0.1:7000\"\ninstances = 2\nkey_prefix = \"lb:eu:\"\n\
             timeout = \"100ms\"\nconnections_expiry = \"5s\"\nlease = 7\nfallback = \"local\"\n",
        )
        .unwrap();
        assert_eq!(s.key_prefix, "lb:eu:");
        assert_eq!(s.timeout, Duration::from_millis(100));
        assert_eq!(s.connections_expiry, Duration::from_secs(5));
        assert_eq!((s.lease, s.fallback), (Some(7), Fallback::Local));
        assert_eq!(parse(""), None);
    }

    #[test]
    fn problems_have_their_places() {
        let found = problems(&format!(
            "[cluster]\nredis = 5\ninstances = 0\ntimeout = \"0s\"\nconnections_expiry = \"10ms\"\n\
             fallback = \"open\"\nkey_prefix = \"a b\"\nbogus = 1\n{BASE}"
        ));
        assert_eq!(
            found,
            [
                "lb.toml:2:9: `redis` must be a URL such as \"redis://127.0.0.1:6379/0\"",
                "lb.toml:3:13: `instances` must be between 1 and 1000, not 0",
                "lb.toml:4:11: `timeout` must be greater than zero",
                "lb.toml:5:22: `connections_expiry` must be between 1s and 1d",
                "lb.toml:6:12: `fallback` must be one of \"split\", \"local\", \"refuse\", not \"open\"",
                "lb.toml:7:14: `key_prefix` must be printable, without spaces, at most 128 bytes",
                "lb.toml:8:1: unknown key `bogus` in [cluster] (expected one of: redis, key_prefix, instances, timeout, connections_expiry, lease, fallback, tls_ca, tls_cert, tls_key)",
            ]
        );
        let found = problems(&format!("[cluster]\nkey_prefix = \"x\"\n{BASE}"));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("lb.toml:1:1: [cluster] has no `redis`"));
        assert!(found[1].starts_with("lb.toml:1:1: [cluster] has no `instances`"));
        let found = problems(&format!(
            "[cluster]\nredis = \"rediss://a..b\"\ninstances = 2\ntimeout = \"1m\"\n{BASE}"
        ));
        assert_eq!(
            found,
            [
                "lb.toml:2:9: `redis` host `a..b` is neither a DNS name nor an IP address, which Redis's certificate could be verified against",
                "lb.toml:4:11: `timeout` must be between 1ms and 10s",
            ]
        );
    }

    #[test]
    fn rediss_urls_take_tls_to_the_host() {
        let url = |text: &str| parse_redis_url(text, false).unwrap();
        let tls = url("rediss://app:s%40cret@127.0.0.1/2");
        assert!(tls.tls);
        assert_eq!(tls.addr, "127.0.0.1:6379".parse().unwrap(), "default port");
        assert_eq!((tls.db, tls.password.as_deref()), (2, Some("s@cret")));
        assert_eq!(tls.to_string(), "rediss://app:***@127.0.0.1:6379/2");
        assert!(!format!("{tls:?}").contains("cret"));
        let ip = |s: &str| ServerName::IpAddress(s.parse::<std::net::IpAddr>().unwrap().into());
        assert_eq!(tls.server_name(), Some(ip("127.0.0.1")));
        let v6 = url("rediss://[::1]:7000");
        assert_eq!((v6.addr.port(), v6.server_name()), (7000, Some(ip("::1"))));
        assert_eq!(v6.to_string(), "rediss://[::1]:7000/0");
        let named = parse_redis_url("rediss://localhost:7001", true).unwrap();
        assert_eq!(
            named.server_name(),
            Some(ServerName::try_from("localhost").unwrap())
        );
        let plain = url("redis://127.0.0.1");
        assert!(!plain.tls);
        assert_eq!(plain.to_string(), "redis://127.0.0.1:6379/0");
    }

    #[test]
    fn tls_keys_name_the_files_and_their_places() {
        let s = parse(
            "[cluster]\nredis = \"rediss://127.0.0.1:6380\"\ninstances = 2\ntls_ca = \"ca.pem\"\n\
             tls_cert = \"tcplb.pem\"\ntls_key = \"tcplb.key\"\n",
        )
        .unwrap();
        let tls = s.tls.unwrap();
        assert_eq!(tls.ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(
            tls.client,
            Some((PathBuf::from("tcplb.pem"), PathBuf::from("tcplb.key")))
        );
        assert_eq!(
            tls.places,
            RedisTlsPlaces {
                redis: Some("lb.toml:2:9".into()),
                ca: Some("lb.toml:4:10".into()),
                cert: Some("lb.toml:5:12".into()),
                key: Some("lb.toml:6:11".into()),
            }
        );
        assert_eq!(tls.trusted(), "a CA of tls_ca");
        // Without the keys: the system trust store, no client certificate.
        let s = parse("[cluster]\nredis = \"rediss://127.0.0.1\"\ninstances = 2\n").unwrap();
        let tls = s.tls.unwrap();
        assert!(tls.trusted().contains("system trust store"));
        assert_eq!((tls.ca, tls.client), (None, None));
        let s = parse("[cluster]\nredis = \"redis://127.0.0.1\"\ninstances = 2\n").unwrap();
        assert_eq!(s.tls, None);
    }

    #[test]
    fn tls_key_problems_have_their_places() {
        let found = problems(&format!(
            "[cluster]\nredis = \"redis://127.0.0.1\"\ninstances = 2\ntls_ca = \"ca.pem\"\n\
             tls_key = \"k.pem\"\n{BASE}"
        ));
        let plain =
            "is for TLS to Redis, and `redis` is a `redis://` URL (write `rediss://` for TLS)";
        assert_eq!(
            found,
            [
                format!("lb.toml:4:10: `tls_ca` {plain}"),
                format!("lb.toml:5:11: `tls_key` {plain}"),
            ]
        );
        let found = problems(&format!(
            "[cluster]\nredis = \"rediss://127.0.0.1\"\ninstances = 2\ntls_cert = \"c.pem\"\n{BASE}"
        ));
        assert_eq!(
            found,
            ["lb.toml:4:12: `tls_cert` needs `tls_key` (the client certificate's private key)"]
        );
        let found = problems(&format!(
            "[cluster]\nredis = \"rediss://127.0.0.1\"\ninstances = 2\ntls_key = \"k.pem\"\n{BASE}"
        ));
        assert_eq!(
            found,
            ["lb.toml:4:11: `tls_key` needs `tls_cert` (the client certificate it is the key of)"]
        );
        let found = problems(&format!(
            "[cluster]\nredis = \"rediss://127.0.0.1\"\ninstances = 2\ntls_ca = 5\ntls_cert = [\"c\"]\ntls_key = \"k\"\n{BASE}"
        ));
        assert_eq!(
            found,
            [
                "lb.toml:4:10: `tls_ca` must be a string",
                "lb.toml:5:12: `tls_cert` must be a string",
            ]
        );
    }

    /// A fresh directory for the files of one test, removed on drop.
    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn loading_names_the_missing_or_bad_file_at_its_key() {
        let dir = Dir(std::env::temp_dir().join(format!(
            "tcplb-redis-tls-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )));
        std::fs::create_dir_all(&dir.0).unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca".to_string()]).unwrap();
        let client = rcgen::generate_simple_self_signed(vec!["tcplb".to_string()]).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.0.join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let ca_pem = write("ca.pem", &ca.cert.pem());
        let cert_pem = write("c.pem", &client.cert.pem());
        let key_pem = write("c.key", &client.signing_key.serialize_pem());
        let other_key = write("other.key", &other.serialize_pem());
        let garbage = write("garbage.pem", "not a certificate\n");
        let missing = dir.0.join("missing.pem").display().to_string();
        let load = |ca: &str, cert: &str, key: &str| {
            let text = format!(
                "[cluster]\nredis = \"rediss://127.0.0.1\"\ninstances = 2\ntls_ca = \"{ca}\"\n\
                 tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"
            );
            parse(&text).unwrap().tls.unwrap().client_config()
        };
        assert!(load(&ca_pem, &cert_pem, &key_pem).is_ok());
        let err = load(&missing, &cert_pem, &key_pem).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("lb.toml:4:10: TLS file {missing}: cannot read")),
            "{err}"
        );
        let err = load(&garbage, &cert_pem, &key_pem).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "lb.toml:4:10: TLS file {garbage}: no certificate (expected PEM \"BEGIN CERTIFICATE\")"
            )
        );
        let err = load(&ca_pem, &missing, &key_pem).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("lb.toml:5:12: TLS file {missing}: cannot read")),
            "{err}"
        );
        let err = load(&ca_pem, &cert_pem, &garbage).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("lb.toml:6:11: TLS file {garbage}: no private key")),
            "{err}"
        );
        let err = load(&ca_pem, &cert_pem, &other_key)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "lb.toml:6:11: TLS file {other_key}: this private key does not match the certificate in {cert_pem}"
            )
        );
    }
}
