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

/// Connections at once: `max_connections` of `[defaults]` and of a `[[client]]`.
pub(super) const CONNECTIONS: RangeInclusive<i64> = 1..=u32::MAX as i64;
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
}
