//! Log lines about conditions that anyone on the network can make
//! frequent (failed handshakes, refusals, connect failures, exhausted
//! descriptors): at most one line per period, saying how often it
//! happened since the last one.
//!
//! Refused clients get a budget instead: the first
//! [`RefusalLog::LINES_PER_SECOND`] refusals of each second are logged in
//! full (the `refused:` line and the access line, with identity and
//! certificate), the rest are counted per reason and summed up in one
//! access line when the second is over. Every refusal is counted in the
//! metrics either way.
//!
//! Access lines ([`AccessLine`]) and those summaries are written in the
//! format `access_log` chooses: text under the log target
//! `tcplb::access`, or one JSON object per line under
//! `tcplb::access::json` (still below `tcplb::access`, so `RUST_LOG`
//! filters both alike), whose message is the whole line: the binary's
//! logger writes the records of that target bare, without timestamp,
//! level or target, so that every such line of stderr parses as JSON.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::info;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::AccessLog;

/// The log target of JSON access lines (`access_log = "json"`): the
/// message of each record is the whole line, a JSON object, for a logger
/// to write without anything around it.
pub const JSON_TARGET: &str = "tcplb::access::json";

/// The access line of one finished connection (or refused client).
#[derive(Debug)]
pub(crate) struct AccessLine<'a> {
    /// The client's address (from its PROXY protocol header, if it came
    /// with one, else the peer's).
    pub client: SocketAddr,
    /// The peer that sent a PROXY protocol header naming the client (an
    /// outer load balancer), if one did: `via=` in text, `proxy_source`
    /// in JSON.
    pub via: Option<SocketAddr>,
    pub upstream: &'a str,
    /// The host it reached, if any.
    pub host: Option<SocketAddr>,
    /// On a TLS upstream, the client's identity (`None`: it had none);
    /// `None` on a plain upstream, where there is none to have.
    pub identity: Option<&'a str>,
    pub tls: bool,
    /// Bytes delivered client to host, and host to client.
    pub bytes: (u64, u64),
    pub duration: Duration,
    /// Why it ended (the `end` codes of the README).
    pub end: &'static str,
}

impl AccessLine<'_> {
    /// Writes the line in `format`.
    pub fn log(&self, format: AccessLog) {
        match format {
            AccessLog::Text => {
                // Only a TLS client has an identity to log (`-` for one without).
                let (label, identity) = match self.tls {
                    true => (" identity=", self.identity.unwrap_or("-")),
                    false => ("", ""),
                };
                let via = self.via.map_or(String::new(), |v| format!(" via={v}"));
                info!(
                    target: "tcplb::access",
                    "{}{via} `{}`{label}{identity} host={} up={} down={} ms={} end={}",
                    self.client,
                    self.upstream,
                    self.host.map_or("-".to_string(), |a| a.to_string()),
                    self.bytes.0,
                    self.bytes.1,
                    self.duration.as_millis(),
                    self.end
                );
            }
            AccessLog::Json => info!(target: JSON_TARGET, "{}", self.json()),
        }
    }

    /// The JSON object of the line, keys in the documented order.
    fn json(&self) -> String {
        let addr = |a: Option<SocketAddr>| a.map(|a| a.to_string());
        json!({
            "time": wall_time(),
            "client": self.client.to_string(),
            "upstream": self.upstream,
            "host": addr(self.host),
            "identity": self.identity,
            "bytes_up": self.bytes.0,
            "bytes_down": self.bytes.1,
            "duration_ms": self.duration.as_millis() as u64,
            "end": self.end,
            "proxy_source": addr(self.via),
        })
        .to_string()
    }
}

/// Now, on the wall clock, in RFC 3339 (UTC, milliseconds), for JSON lines.
fn wall_time() -> String {
    let now = OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now);
    now.format(&Rfc3339).unwrap_or_default()
}

/// `n` and the noun, in the plural unless `n` is 1: "1 host", "2 hosts".
pub(crate) fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// At most one log line per period about a recurring condition.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    last: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    const PERIOD: Duration = Duration::from_secs(1);

    /// `Some(times since the last line)` when a line may be logged now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::PERIOD)
        {
            self.unlogged += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Full log lines for refusals, within a budget per second.
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    second: Option<Instant>,
    logged: u32,
    /// Refusals of the current second not logged, per reason.
    unlogged: BTreeMap<&'static str, u64>,
    /// The format of the summary (the access lines').
    pub format: AccessLog,
}

impl RefusalLog {
    /// Refusals a second that are logged line by line.
    pub const LINES_PER_SECOND: u32 = 10;

    /// Whether the refusal `code` at `now` gets its own lines; if not, it
    /// is counted for the summary.
    pub fn allow(&mut self, code: &'static str, now: Instant) -> bool {
        self.flush(now);
        let second = *self.second.get_or_insert(now);
        debug_assert!(now.duration_since(second) < Duration::from_secs(1));
        if self.logged < Self::LINES_PER_SECOND {
            self.logged += 1;
            return true;
        }
        *self.unlogged.entry(code).or_default() += 1;
        false
    }

    /// When the summary of unlogged refusals is due, if there is one.
    pub fn due(&self) -> Option<Instant> {
        let second = self.second?;
        (!self.unlogged.is_empty()).then(|| second + Duration::from_secs(1))
    }

    /// Writes the summary once the second is over, and starts afresh.
    pub fn flush(&mut self, now: Instant) {
        let Some(second) = self.second else { return };
        if now.duration_since(second) >= Duration::from_secs(1) {
            self.finish();
        }
    }

    /// Writes the summary of what is counted so far (at shutdown).
    pub fn finish(&mut self) {
        if !self.unlogged.is_empty() {
            let total: u64 = self.unlogged.values().sum();
            match self.format {
                AccessLog::Text => {
                    let by_reason: Vec<String> = self
                        .unlogged
                        .iter()
                        .map(|(code, n)| format!("{code}={n}"))
                        .collect();
                    info!(
                        target: "tcplb::access",
                        "{total} more refused connections in the last second, not logged one by one: {}",
                        by_reason.join(" ")
                    );
                }
                AccessLog::Json => {
                    let line = json!({
                        "time": wall_time(),
                        "unlogged_refusals": total,
                        "by_reason": self.unlogged,
                    });
                    info!(target: JSON_TARGET, "{line}");
                }
            }
        }
        *self = RefusalLog {
            format: self.format,
            ..RefusalLog::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_beyond_the_budget_are_counted_for_one_summary() {
        let t0 = Instant::now();
        let mut log = RefusalLog::default();
        let logged = (0..100)
            .filter(|i| log.allow("overloaded", t0 + Duration::from_millis(*i)))
            .count();
        assert_eq!(logged, RefusalLog::LINES_PER_SECOND as usize);
        assert_eq!(log.unlogged["overloaded"], 90);
        assert_eq!(log.due(), Some(t0 + Duration::from_secs(1)));
        log.flush(t0 + Duration::from_millis(999));
        assert_eq!(
            log.unlogged["overloaded"], 90,
            "not before the second is over"
        );
        log.flush(t0 + Duration::from_secs(1));
        assert!(log.unlogged.is_empty() && log.due().is_none());
        assert!(
            log.allow("unauthorized", t0 + Duration::from_secs(2)),
            "a new budget"
        );
    }

    #[test]
    fn one_line_a_second_with_the_count_of_the_rest() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.allow(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(t.allow(t0 + Duration::from_millis(100 * i)), None);
        }
        assert_eq!(t.allow(t0 + Duration::from_secs(1)), Some(5));
        assert_eq!(t.allow(t0 + Duration::from_millis(1500)), None);
    }
}
