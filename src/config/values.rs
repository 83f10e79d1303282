//! What one value means: the text forms of durations, sizes and addresses
//! (public, for the command line's flags too), and the typed reading of a
//! single TOML value of the file: a string, an integer within bounds, a
//! number, a rate, a duration, a size, an address, a boolean. Each reader
//! reports what is wrong at the value's span and gives `None`; it never
//! stops the walk.

use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::time::Duration;

use toml::Spanned;
use toml::de::DeValue;

use super::problems::Problems;
use super::rules;
use crate::dns::Resolver;
use crate::policy::trust::SourceNet;

/// A value of the parsed document, with its byte span in the text.
pub(super) type Value<'i> = Spanned<DeValue<'i>>;

/// Resolves `host:port` (IPv4, `[IPv6]`, or a name looked up now) to its first address.
///
/// The error is a sentence without the text itself, for the caller to
/// put after the flag or key it came from.
pub fn resolve(text: &str) -> Result<SocketAddr, String> {
    address_of(text, true)
}

/// [`resolve`], or, without `lookups`, only a literal address: a name is
/// then an error, and nothing is asked of the resolver.
pub(super) fn address_of(text: &str, lookups: bool) -> Result<SocketAddr, String> {
    let (host, port) = match written(text)? {
        Written::Literal(addr) => return Ok(addr),
        Written::Name(host, port) => (host, port),
    };
    if !lookups {
        return Err(not_looked_up(host));
    }
    match (host, port).to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("`{host}` resolves to no address")),
        Err(e) => Err(format!("cannot resolve `{host}`: {e}")),
    }
}

/// What a `host:port` text is, before anything is looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Written<'t> {
    /// `IPv4:port` or `[IPv6]:port`.
    Literal(SocketAddr),
    /// `name:port`, the name checked to be one DNS could know.
    Name(&'t str, u16),
}

/// Reads a `host:port` text; the error is a sentence without the text.
pub(super) fn written(text: &str) -> Result<Written<'_>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(Written::Literal(addr));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("expected host:port, e.g. 127.0.0.1:9001 or [::1]:9001".to_string());
    };
    if host.is_empty() {
        return Err("the host part is empty".to_string());
    }
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!("`{port}` is not a port number (0-65535)"));
    };
    rules::host_name(host)?;
    Ok(Written::Name(host, port))
}

/// Every address of `host` with `port`, sorted, from `resolver`; the error
/// says why there is none ("cannot resolve `host`: why").
pub(super) fn look_up(
    resolver: Resolver,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, String> {
    match resolver.lookup(host).addresses() {
        Ok(ips) => Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect()),
        Err(why) => Err(format!("cannot resolve `{host}`: {why}")),
    }
}

/// Why a walk without lookups refuses the name `host`.
pub(super) fn not_looked_up(host: &str) -> String {
    format!("`{host}` is a name, and this reading looks no name up (use an IP address)")
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

/// Stores what an optional key yielded: keeps `slot` (its default) when
/// the key is absent (`None`), sets it when the key's value was good, and
/// returns false when the key was there but wrong (already reported).
pub(super) fn fill<T>(slot: &mut T, found: Option<Option<T>>) -> bool {
    match found {
        None => true,
        Some(Some(value)) => {
            *slot = value;
            true
        }
        Some(None) => false,
    }
}

/// Whether a zero duration means something (no drain, no slow start) or
/// is a mistake (a timeout that would fire at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Zero {
    Allowed,
    Refused,
}

pub(super) fn string<'v>(p: &mut Problems<'_>, v: &'v Value<'_>, key: &str) -> Option<&'v str> {
    match v.get_ref() {
        DeValue::String(s) => Some(s.as_ref()),
        _ => {
            p.at(v.span(), format!("`{key}` must be a string"));
            None
        }
    }
}

pub(super) fn boolean(p: &mut Problems<'_>, v: &Value<'_>, key: &str) -> Option<bool> {
    match v.get_ref() {
        DeValue::Boolean(b) => Some(*b),
        _ => {
            p.at(v.span(), format!("`{key}` must be true or false"));
            None
        }
    }
}

/// An integer within `bounds` (one of the ranges of [`rules`]).
pub(super) fn integer(
    p: &mut Problems<'_>,
    v: &Value<'_>,
    key: &str,
    bounds: RangeInclusive<i64>,
) -> Option<i64> {
    let (min, max) = (*bounds.start(), *bounds.end());
    let out_of_bounds = |p: &mut Problems<'_>, written: &str| {
        let message = format!("`{key}` must be between {min} and {max}, not {written}");
        p.at(v.span(), message);
    };
    let DeValue::Integer(i) = v.get_ref() else {
        p.at(v.span(), format!("`{key}` must be an integer"));
        return None;
    };
    match i64::from_str_radix(i.as_str(), i.radix()) {
        Ok(n) if bounds.contains(&n) => Some(n),
        Ok(n) => {
            out_of_bounds(p, &n.to_string());
            None
        }
        // Too large even for i64: out of bounds all the same, shown as written.
        Err(_) => {
            let written = p.text().get(v.span()).unwrap_or(i.as_str()).to_string();
            out_of_bounds(p, &written);
            None
        }
    }
}

/// An integer or a float, finite.
pub(super) fn number(p: &mut Problems<'_>, v: &Value<'_>, key: &str) -> Option<f64> {
    let parsed = match v.get_ref() {
        // Beyond i64 an integer is still a number (a rule then bounds it).
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .map(|n| n as f64)
            .ok()
            .or_else(|| (i.radix() == 10).then(|| i.as_str().parse().ok()).flatten()),
        DeValue::Float(f) => f.as_str().replace('_', "").parse::<f64>().ok(),
        _ => None,
    };
    match parsed {
        Some(n) if n.is_finite() => Some(n),
        _ => {
            p.at(v.span(), format!("`{key}` must be a finite number"));
            None
        }
    }
}

/// New connections per second of a rate limit.
pub(super) fn rate(p: &mut Problems<'_>, v: &Value<'_>, key: &str) -> Option<f64> {
    let rate = number(p, v, key)?;
    p.check(v.span(), key, rules::rate(rate))
}

/// A string with a unit, such as "5s".
pub(super) fn duration(
    p: &mut Problems<'_>,
    v: &Value<'_>,
    key: &str,
    zero: Zero,
) -> Option<Duration> {
    let DeValue::String(text) = v.get_ref() else {
        p.at(
            v.span(),
            format!("`{key}` must be a string with a unit, such as \"5s\""),
        );
        return None;
    };
    let duration = parse_duration(text)
        .map_err(|why| p.at(v.span(), format!("`{key}`: {why}")))
        .ok()?;
    match zero {
        Zero::Allowed => Some(duration),
        Zero::Refused => p.check(v.span(), key, rules::positive(duration)),
    }
}

/// A buffer size: a string with a unit, or a plain integer of bytes.
pub(super) fn size(p: &mut Problems<'_>, v: &Value<'_>, key: &str) -> Option<usize> {
    match v.get_ref() {
        DeValue::String(text) => match parse_size(text) {
            Ok(n) => p.check(v.span(), key, rules::buffer_size(n)),
            Err(why) => {
                p.at(v.span(), format!("`{key}`: {why}"));
                None
            }
        },
        DeValue::Integer(_) => {
            let (lo, hi) = (*rules::BUFFER_SIZE.start(), *rules::BUFFER_SIZE.end());
            integer(p, v, key, lo as i64..=hi as i64).map(|n| n as usize)
        }
        _ => {
            p.at(
                v.span(),
                format!("`{key}` must be a size such as \"16KiB\""),
            );
            None
        }
    }
}

/// A list of networks (`accept_proxy`): an array of `address/prefix` or
/// address strings, possibly empty. One that holds every address is
/// warned about: any peer could then claim any client address.
pub(super) fn networks(p: &mut Problems<'_>, v: &Value<'_>, key: &str) -> Option<Vec<SourceNet>> {
    let DeValue::Array(items) = v.get_ref() else {
        let message = format!("`{key}` must be an array of networks, such as [\"10.0.0.0/8\"]");
        p.at(v.span(), message);
        return None;
    };
    let mut nets = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in items.iter() {
        let Some(text) = string(p, item, key) else {
            ok = false;
            continue;
        };
        match rules::source_net(text) {
            Ok(net) => {
                if net.is_everything() {
                    let message = format!(
                        "`{key}` holds {net}, every address: any peer may then send a header claiming any client address"
                    );
                    p.warn(item.span(), message);
                }
                nets.push(net);
            }
            Err(why) => {
                ok = false;
                p.at(item.span(), format!("`{key}` network `{text}` {why}"));
            }
        }
    }
    ok.then_some(nets)
}

/// A `host:port` string, resolved now (unless the walk looks no name up).
pub(super) fn address(
    p: &mut Problems<'_>,
    v: &Value<'_>,
    key: &str,
) -> Option<Spanned<SocketAddr>> {
    let text = string(p, v, key)?;
    match address_of(text, p.lookups()) {
        Ok(addr) => Some(Spanned::new(v.span(), addr)),
        Err(why) => {
            p.at(v.span(), format!("`{key}` address `{text}`: {why}"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::problems;

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
    fn integers_too_large_for_any_type_are_out_of_bounds() {
        let base = "[[upstream]]\nname=\"x\"\nlisten=\"127.0.0.1:0\"\nhosts=[\"127.0.0.1:1\"]\n";
        let found = problems(&format!(
            "[defaults]\nmax_connections = 99999999999999999999\nbacklog = -99999999999999999999\nsource_rate = 99999999999999999999\nbuffer_size = 0x7fffffffffffffffff\n{base}"
        ));
        assert_eq!(
            found,
            [
                "lb.toml:2:19: `max_connections` must be between 1 and 4294967295, not 99999999999999999999",
                "lb.toml:3:11: `backlog` must be between 1 and 65535, not -99999999999999999999",
                "lb.toml:4:15: `source_rate` must be between 1/86400 (one a day) and 1000000 per second, not 100000000000000000000",
                "lb.toml:5:15: `buffer_size` must be between 1024 and 67108864, not 0x7fffffffffffffffff",
            ]
        );
        let found = problems(&format!("[defaults]\nbacklog = 1.5\n{base}"));
        assert_eq!(found, ["lb.toml:2:11: `backlog` must be an integer"]);
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
}
