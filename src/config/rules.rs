//! What values are allowed: every bound and check on a configured value,
//! stated once, whether the value comes from the file or from a
//! command-line flag.
//!
//! Integer keys are bounded by the ranges here, which the file walk checks
//! as it reads each integer. The other rules are functions that return the
//! value or the words of what is wrong ("must be greater than zero"); the
//! caller puts the key in front, quoted as `` `key` `` with a line and
//! column for the file, bare for a flag.

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::policy::limits::Limit;
use crate::policy::trust::SourceNet;

/// Connections at once: `max_connections` of `[defaults]`, of a host and of a `[[client]]`.
pub(super) const CONNECTIONS: RangeInclusive<i64> = 1..=u32::MAX as i64;
/// A host's `weight`: its share relative to the other hosts of its upstream.
pub(super) const WEIGHT: RangeInclusive<i64> = 1..=1000;
/// `max_queued`: clients waiting in one upstream's queue.
pub(super) const QUEUED: RangeInclusive<i64> = 1..=1_000_000;
/// `keepalive_probes`: what `TCP_KEEPCNT` takes.
pub(super) const KEEPALIVE_PROBES: RangeInclusive<i64> = 1..=127;
/// `keepalive` and `keepalive_interval`, in seconds: what `TCP_KEEPIDLE`
/// and `TCP_KEEPINTVL` take.
const KEEPALIVE_SECS: RangeInclusive<u64> = 1..=32767;
/// `backlog`: what `listen(2)` takes.
pub(super) const BACKLOG: RangeInclusive<i64> = 1..=65535;
/// Worker threads.
pub(super) const WORKERS: RangeInclusive<i64> = 1..=1024;
/// `max_pipes`: 0 turns splicing off; two descriptors each.
pub(super) const PIPES: RangeInclusive<i64> = 0..=1 << 20;
/// `buffer_size`, `bulk_buffer_size` and `socket_buffer`, in bytes.
pub(super) const BUFFER_SIZE: RangeInclusive<usize> = 1024..=64 * 1024 * 1024;
/// A token bucket's `burst` (of a client rule, or `source_burst`).
pub(super) const BURST: RangeInclusive<i64> = 1..=Limit::MAX_BURST as i64;
/// Handshakes in progress: `max_handshakes` and `max_handshakes_per_source`.
pub(super) const HANDSHAKES: RangeInclusive<i64> = 1..=1_000_000;
/// A health check's `rise` and `fall`, in consecutive results.
pub(super) const HEALTH_STREAK: RangeInclusive<i64> = 1..=1000;
/// `instances` of `[cluster]`.
pub(super) const INSTANCES: RangeInclusive<i64> = 1..=1000;
/// The highest Redis database number a `redis://` URL may name.
pub(super) const REDIS_DB_MAX: u32 = 65535;
/// Longest `key_prefix` of `[cluster]`, in bytes.
const KEY_PREFIX_MAX: usize = 128;
/// `timeout` of `[cluster]`: a connection waits for Redis at most this long.
const REDIS_TIMEOUT: RangeInclusive<Duration> = Duration::from_millis(1)..=Duration::from_secs(10);
/// `connections_expiry` of `[cluster]` (refreshed at a third of it).
const CONNECTIONS_EXPIRY: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(86_400);
/// Longest probe `send` or `expect` text, in bytes.
const PROBE_BYTES_MAX: usize = 4096;
/// Connections per second of a rate limit (`rate`, `source_rate`).
const RATE: RangeInclusive<f64> = Limit::MIN_RATE..=1e6;
/// Longest upstream name.
const NAME_MAX: usize = 64;

/// A timeout that must not be zero (zero would end everything at once).
pub(super) fn positive(duration: Duration) -> Result<Duration, &'static str> {
    if duration.is_zero() {
        return Err("must be greater than zero");
    }
    Ok(duration)
}

/// A keepalive time: whole seconds (the kernel counts in seconds), within
/// [`KEEPALIVE_SECS`].
pub(super) fn keepalive_time(duration: Duration) -> Result<Duration, String> {
    let (lo, hi) = (KEEPALIVE_SECS.start(), KEEPALIVE_SECS.end());
    if duration.subsec_nanos() != 0 || !KEEPALIVE_SECS.contains(&duration.as_secs()) {
        return Err(format!(
            "must be whole seconds from {lo}s to {hi}s, not {}s (leave it out for no keepalive)",
            duration.as_secs_f64()
        ));
    }
    Ok(duration)
}

/// A buffer size in bytes, within [`BUFFER_SIZE`].
pub(super) fn buffer_size(bytes: usize) -> Result<usize, String> {
    if BUFFER_SIZE.contains(&bytes) {
        return Ok(bytes);
    }
    let (lo, hi) = (BUFFER_SIZE.start(), BUFFER_SIZE.end());
    Err(format!("must be between {lo} and {hi} bytes, not {bytes}"))
}

/// A rate limit's connections per second, within one a day to a million.
pub(super) fn rate(per_second: f64) -> Result<f64, String> {
    if RATE.contains(&per_second) {
        return Ok(per_second);
    }
    Err(format!(
        "must be between 1/86400 (one a day) and 1000000 per second, not {per_second}"
    ))
}

/// `timeout` of `[cluster]`, within [`REDIS_TIMEOUT`].
pub(super) fn redis_timeout(timeout: Duration) -> Result<Duration, &'static str> {
    if REDIS_TIMEOUT.contains(&timeout) {
        return Ok(timeout);
    }
    Err("must be between 1ms and 10s")
}

/// `connections_expiry` of `[cluster]`, within [`CONNECTIONS_EXPIRY`].
pub(super) fn connections_expiry(expiry: Duration) -> Result<Duration, &'static str> {
    if CONNECTIONS_EXPIRY.contains(&expiry) {
        return Ok(expiry);
    }
    Err("must be between 1s and 1d")
}

/// `key_prefix` of `[cluster]`: part of every key, so kept plain.
pub(super) fn key_prefix(prefix: &str) -> Result<&str, String> {
    if prefix.len() > KEY_PREFIX_MAX || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "must be printable, without spaces, at most {KEY_PREFIX_MAX} bytes"
        ));
    }
    Ok(prefix)
}

/// The bytes a health probe sends or expects: not empty, and bounded.
pub(super) fn probe_bytes(text: &str) -> Result<Vec<u8>, String> {
    if text.is_empty() {
        return Err("is empty".to_string());
    }
    if text.len() > PROBE_BYTES_MAX {
        return Err(format!("is longer than {PROBE_BYTES_MAX} bytes"));
    }
    Ok(text.as_bytes().to_vec())
}

/// A client identity as certificates carry it: a URI SAN (`scheme:...`)
/// or a DNS name SAN (`*.` wildcards included), compared as written.
/// Anything else can never match a certificate, so it is refused.
pub(super) fn identity(identity: &str) -> Result<(), &'static str> {
    if identity.is_empty() || identity.chars().any(char::is_whitespace) {
        return Err("must be a DNS name or URI without spaces");
    }
    if identity.parse::<std::net::IpAddr>().is_ok() {
        return Err(
            "is an IP address, which never matches: identities are a certificate's DNS or URI names, never its IP addresses",
        );
    }
    let dns = |name: &str| rustls_pki_types::DnsName::try_from(name).is_ok();
    let wildcard = identity.strip_prefix("*.").is_some_and(dns);
    if is_uri(identity) || dns(identity) || wildcard {
        return Ok(());
    }
    if identity.contains('=') {
        return Err(
            "looks like a subject name (`CN=...`), which is never used: identities are a certificate's DNS or URI names",
        );
    }
    Err("is neither a DNS name nor a URI (`scheme:...`), so no certificate name can match it")
}

/// Whether `text` starts with a URI scheme and a colon (RFC 3986:
/// a letter, then letters, digits, '+', '-' or '.').
fn is_uri(text: &str) -> bool {
    let Some((scheme, _)) = text.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The name part of a `name:port` address: one that DNS (or
/// `/etc/hosts`) could know, so that a typo is an error at once rather
/// than a name looked up forever. Dot-separated labels of letters, digits,
/// '-' and '_', each 1 to 63 long and neither starting nor ending with
/// '-', at most 253 in all (a final dot allowed).
pub(super) fn host_name(name: &str) -> Result<(), String> {
    let labels = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    };
    if labels.len() > 253 || !labels.split('.').all(label_ok) {
        return Err(format!(
            "`{name}` is not a host name (dot-separated labels of letters, digits, '-' and '_', at most 63 each, none starting or ending with '-')"
        ));
    }
    Ok(())
}

/// A network of `accept_proxy`: `address/prefix`, or a bare address (that
/// one address). Bits past the prefix must be zero, so that the network
/// is the one written.
pub(super) fn source_net(text: &str) -> Result<SourceNet, String> {
    let bad =
        || "is neither a network such as 10.0.0.0/8 nor an address such as 127.0.0.1".to_string();
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
    let width = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => width,
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse::<u8>().unwrap_or(u8::MAX)
        }
        Some(_) => return Err(bad()),
    };
    let Some(net) = SourceNet::new(addr, prefix).filter(|_| prefix <= width) else {
        let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
        return Err(format!(
            "has a prefix longer than /{width}, the most an {family} network has"
        ));
    };
    if net.addr() != addr {
        return Err(format!(
            "has bits set past its /{prefix} prefix (the network is {net})"
        ));
    }
    Ok(net)
}

/// Upstream names appear in logs and metric labels, so they are kept plain.
pub(super) fn name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_string());
    }
    if name.len() > NAME_MAX {
        return Err(format!("the name is longer than {NAME_MAX} characters"));
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

#[cfg(test)]
mod tests {
    use crate::config::{Config, Settings, check_settings, problems};

    #[test]
    fn networks_are_written_as_they_are_meant() {
        let net = |t: &str| super::source_net(t).map(|n| n.to_string());
        assert_eq!(net("10.0.0.0/8"), Ok("10.0.0.0/8".to_string()));
        assert_eq!(net("127.0.0.1"), Ok("127.0.0.1/32".to_string()));
        assert_eq!(net("::1"), Ok("::1/128".to_string()));
        assert_eq!(net("2001:db8::/32"), Ok("2001:db8::/32".to_string()));
        assert_eq!(net("0.0.0.0/0"), Ok("0.0.0.0/0".to_string()));
        let not = Err(
            "is neither a network such as 10.0.0.0/8 nor an address such as 127.0.0.1".to_string(),
        );
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0/8",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "lan",
            "10.0.0.0 /8",
        ] {
            assert_eq!(net(bad), not, "{bad:?}");
        }
        assert_eq!(
            net("10.0.0.0/33"),
            Err("has a prefix longer than /32, the most an IPv4 network has".to_string())
        );
        assert_eq!(
            net("::/200"),
            Err("has a prefix longer than /128, the most an IPv6 network has".to_string())
        );
        assert_eq!(
            net("10.0.0.0/999"),
            Err("has a prefix longer than /32, the most an IPv4 network has".to_string())
        );
        assert_eq!(
            net("10.1.0.0/8"),
            Err("has bits set past its /8 prefix (the network is 10.0.0.0/8)".to_string())
        );
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
    fn unsent_limit_is_a_size_or_off() {
        let base = "[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n";
        let read = |line: &str| {
            let text = format!("[defaults]\n{line}\n{base}");
            Config::parse(&text, "x").unwrap().settings.unsent_limit
        };
        assert_eq!(
            Config::parse(base, "x").unwrap().settings.unsent_limit,
            Some(64 * 1024)
        );
        assert_eq!(read("unsent_limit = \"256KiB\""), Some(256 * 1024));
        assert_eq!(read("unsent_limit = 16384"), Some(16384));
        assert_eq!(read("unsent_limit = \"off\""), None);
        let found = problems(&format!("[defaults]\nunsent_limit = \"none\"\n{base}"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("lb.toml:2:16: `unsent_limit`"),
            "{found:?}"
        );
        let found = problems(&format!("[defaults]\nunsent_limit = 10\n{base}"));
        assert_eq!(
            found,
            ["lb.toml:2:16: `unsent_limit` must be between 1024 and 67108864, not 10"]
        );
        let flags = Settings {
            unsent_limit: Some(1 << 30),
            ..Settings::default()
        };
        assert_eq!(
            check_settings(&flags),
            ["unsent_limit must be between 1024 and 67108864 bytes, not 1073741824"]
        );
    }
}
