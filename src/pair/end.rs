//! How a pair ends ([`End`], as the access log names it) and why a client
//! is turned away ([`Refusal`], with the one line it is told).

use super::Side;
use crate::policy::access::Denial;

/// Why a pair ended, as the access log tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Both directions finished with FIN.
    Closed,
    /// This side reset the connection or failed; the other side was aborted.
    Reset(Side),
    /// The TLS client ended its stream with a bare FIN, no `close_notify`
    /// (the stream may have been cut short); the host was reset.
    Truncated,
    IdleTimeout,
    HalfCloseTimeout,
    /// The client was told why and closed.
    Refused(Refusal),
    /// The TLS handshake failed (bad certificate, protocol error).
    HandshakeFailed,
    /// The TLS handshake did not complete in time.
    HandshakeTimeout,
    /// Every handshake slot was taken, its source held the most of them,
    /// and a client from a source below its fair share needed one.
    HandshakeEvicted,
    /// The PROXY header was malformed, too long, or cut short.
    ProxyHeaderInvalid,
    /// The PROXY header did not arrive in time.
    ProxyHeaderTimeout,
    /// Its header named a source that a per-source limit or cap refuses
    /// (the code it would have been refused with at accept).
    TurnedAway(&'static str),
    /// Its host went down and the upstream has `close_on_down`.
    HostDown,
    /// Its host or upstream was removed by a reload and the drain period ran out.
    Removed,
    /// The drain period after a shutdown signal ran out.
    Shutdown,
}

impl End {
    /// The side that broke, for an end that a broken side caused.
    pub(crate) fn broken_side(self) -> Option<Side> {
        match self {
            End::Reset(side) => Some(side),
            End::Truncated => Some(Side::Client),
            _ => None,
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

impl End {
    /// The name the access log and the metrics give it.
    pub(crate) fn code(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Reset(Side::Client) => "client_reset",
            End::Reset(Side::Host) => "host_reset",
            End::Truncated => "client_truncated",
            End::IdleTimeout => "idle_timeout",
            End::HalfCloseTimeout => "half_close_timeout",
            End::Refused(r) => r.code(),
            End::HandshakeFailed => "handshake_failed",
            End::HandshakeTimeout => "handshake_timeout",
            End::HandshakeEvicted => "handshake_evicted",
            End::ProxyHeaderInvalid => "proxy_header_invalid",
            End::ProxyHeaderTimeout => "proxy_header_timeout",
            End::TurnedAway(code) => code,
            End::HostDown => "host_down",
            End::Removed => "removed",
            End::Shutdown => "shutdown",
        }
    }
}

/// Why a client is turned away; the code starts its one-line answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    UpstreamUnavailable,
    NoHealthyHost,
    Overloaded,
    Unauthorized,
    RateLimited { retry_after_secs: u64 },
    TooManyConnections,
}

impl Refusal {
    pub(crate) fn code(self) -> &'static str {
        match self {
            Refusal::UpstreamUnavailable => "upstream_unavailable",
            Refusal::NoHealthyHost => "no_healthy_host",
            Refusal::Overloaded => "overloaded",
            Refusal::Unauthorized => "unauthorized",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::TooManyConnections => "too_many_connections",
        }
    }

    /// The line sent to the client. It never names hosts or addresses, nor
    /// which identities or upstreams exist.
    pub(crate) fn line(self) -> String {
        let message = match self {
            Refusal::UpstreamUnavailable => {
                "no host of this service is reachable, try again later".to_string()
            }
            Refusal::NoHealthyHost => {
                "no host of this service is healthy, try again later".to_string()
            }
            Refusal::Overloaded => "too many connections, try again later".to_string(),
            Refusal::Unauthorized => "this client may not use this service".to_string(),
            Refusal::RateLimited { retry_after_secs } => {
                format!("too many new connections, retry after {retry_after_secs} s")
            }
            Refusal::TooManyConnections => "too many open connections for this client".to_string(),
        };
        format!("ERROR {}: {message}\n", self.code())
    }
}

impl From<Denial> for Refusal {
    fn from(denial: Denial) -> Refusal {
        match denial {
            Denial::Unauthorized { .. } => Refusal::Unauthorized,
            Denial::RateLimited { retry_after } => Refusal::RateLimited {
                retry_after_secs: retry_after.as_secs_f64().ceil().max(1.0) as u64,
            },
            Denial::TooManyConnections => Refusal::TooManyConnections,
        }
    }
}
