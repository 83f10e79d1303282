//! The life of one connection pair: a client socket (and its TLS session
//! on a TLS upstream), the upstream socket tcplb opened for it, a flow per
//! direction, and the phase it is in.
//!
//! ```text
//!   accept ──> [Handshaking] ──(admitted)──> Connecting ──(connected)──> Relaying ──(both flows done)──> closed
//!                   │   (not admitted)          │  ▲  (connect failed:          │
//!                   │        │                  │  └── next candidate)         (reset, timeout) ──> closed
//!                   │        └──────────────────┴──(no candidate left)──> Refusing ──(line sent, FIN or deadline)──> closed
//!                   └──(TLS failure, timeout)──> closed
//! ```
//!
//! Each direction ([`Flow`]) finishes on its own (source EOF and buffer
//! flushed => the destination is finished); the pair is done when both
//! have. The loop (`proxy.rs`) owns the host and client counters and the
//! close path; this module only reports what happened.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::access::ClientId;
use crate::balance::HostId;
use crate::buffer::BufferPool;
use crate::config::Settings;
use crate::endpoint::Connect;
use crate::endpoint::{Endpoint, READ_ALL, READABLE, WRITABLE};
use crate::flow::{Flow, NotConnected, Pumped, pump};
use crate::net::{self, Io};
use crate::secure::{ClientTls, Discarded, Handshake};
use crate::token::Side;

/// How long a refused client gets to read its error line and close.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Bytes of a refused client's input read and dropped before giving up on a
/// graceful close; reading them keeps the kernel from answering with RST
/// (which could destroy the error line before the client reads it).
const REFUSAL_DISCARD_LIMIT: usize = 64 * 1024;

/// Why a pair ended, as the access log tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished with FIN.
    Closed,
    /// This side reset the connection or failed; the other side was aborted.
    Reset(Side),
    IdleTimeout,
    HalfCloseTimeout,
    /// The client was told why and closed.
    Refused(Refusal),
    /// The TLS handshake failed (bad certificate, protocol error).
    HandshakeFailed,
    /// The TLS handshake did not complete in time.
    HandshakeTimeout,
    /// Its host went down and the upstream has `close_on_down`.
    HostDown,
    /// Its host or upstream was removed by a reload and the drain period ran out.
    Removed,
    /// The drain period after a shutdown signal ran out.
    Shutdown,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            End::Closed => "closed",
            End::Reset(Side::Client) => "client_reset",
            End::Reset(Side::Upstream) => "host_reset",
            End::IdleTimeout => "idle_timeout",
            End::HalfCloseTimeout => "half_close_timeout",
            End::Refused(r) => r.code(),
            End::HandshakeFailed => "handshake_failed",
            End::HandshakeTimeout => "handshake_timeout",
            End::HostDown => "host_down",
            End::Removed => "removed",
            End::Shutdown => "shutdown",
        })
    }
}

/// Why a client is turned away; the code starts its one-line answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UpstreamUnavailable,
    NoHealthyHost,
    Overloaded,
    Unauthorized,
    RateLimited { retry_after_secs: u64 },
    TooManyConnections,
}

impl Refusal {
    pub fn code(self) -> &'static str {
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
    pub fn line(self) -> String {
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

/// Where a pair is in its life.
#[derive(Debug)]
pub enum Phase {
    /// The TLS handshake of a client of a TLS upstream is in progress.
    Handshaking { deadline: Instant },
    /// A connect to `host` is in flight; `tried` lists hosts that already
    /// failed for this client (the allocation exists only after a failure).
    Connecting {
        host: HostId,
        tried: Vec<HostId>,
        deadline: Instant,
    },
    /// Bytes flow both ways between the client and `host`.
    Relaying { host: HostId },
    /// `reset` reset (or failed), and every byte it sent is in the other
    /// side's kernel. That side gets the reset once its peer acknowledged
    /// those bytes (a close with `SO_LINGER` 0 throws away what is still
    /// queued), or at `until`. The host's count is already released.
    Resetting {
        host: HostId,
        reset: Side,
        /// Bytes the receiver had not acknowledged at the last check.
        unacked: u32,
        /// When to check again, and the interval after that (it doubles).
        check: Instant,
        every: Duration,
        /// When to give up; pushed back while `unacked` falls.
        until: Instant,
    },
    /// Sending the refusal line, then waiting for the client's FIN.
    Refusing {
        refusal: Refusal,
        /// Bytes of the line sent (over TLS: queued into the session).
        written: usize,
        /// The client's write side is shut (after the line, and `close_notify`).
        shut: bool,
        discarded: usize,
        deadline: Instant,
    },
}

impl Phase {
    pub fn refusing(refusal: Refusal, now: Instant) -> Phase {
        Phase::Refusing {
            refusal,
            written: 0,
            shut: false,
            discarded: 0,
            deadline: now + REFUSAL_LINGER,
        }
    }
}

/// What the loop should do with a pair after driving it.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Wait for the next readiness event or deadline.
    Continue,
    /// The relay budget ran out with bytes still movable: drive the pair
    /// again next turn, without waiting for an event (none may come).
    Again,
    Finish(End),
}

/// Bytes one pair may move per loop turn before others get their turn.
pub const RELAY_BUDGET: usize = 256 * 1024;

/// A client connection and its upstream connection.
#[derive(Debug)]
pub struct Pair {
    /// Process-unique number, for logs and to tell timer entries of a
    /// reused slab slot apart.
    pub id: u64,
    /// Index of the upstream in the loop's table.
    pub upstream: usize,
    pub client_addr: SocketAddr,
    pub client: Endpoint,
    /// The client's TLS session, on a TLS upstream.
    pub tls: Option<Box<ClientTls>>,
    /// The `[[client]]` rule this pair counts against, once admitted.
    pub client_id: Option<ClientId>,
    /// The client's identity from its certificate, for logs.
    pub identity: Option<Box<str>>,
    /// The socket to the host; `None` while refusing.
    pub host: Option<Endpoint>,
    pub phase: Phase,
    /// The side whose reset (or failure) was noticed first.
    failed: Option<Side>,
    /// Client to host.
    up: Flow,
    /// Host to client.
    down: Flow,
    pub started: Instant,
    last_active: Instant,
    /// The deadline of this pair's live entry in the timer heap, if any.
    pub scheduled: Option<Instant>,
    /// A reload removed its host or upstream: closed at this instant
    /// unless it finishes first.
    pub drain_by: Option<Instant>,
}

impl Pair {
    pub fn new(
        id: u64,
        upstream: usize,
        client: TcpStream,
        client_addr: SocketAddr,
        phase: Phase,
        now: Instant,
    ) -> Pair {
        Pair {
            id,
            upstream,
            client_addr,
            client: Endpoint::new(client),
            tls: None,
            client_id: None,
            identity: None,
            host: None,
            phase,
            failed: None,
            up: Flow::default(),
            down: Flow::default(),
            started: now,
            last_active: now,
            scheduled: None,
            drain_by: None,
        }
    }

    pub fn endpoint(&mut self, side: Side) -> Option<&mut Endpoint> {
        match side {
            Side::Client => Some(&mut self.client),
            Side::Upstream => self.host.as_mut(),
        }
    }

    /// The host this pair counts against, while connecting or relaying.
    pub fn host_id(&self) -> Option<HostId> {
        match self.phase {
            Phase::Connecting { host, .. } | Phase::Relaying { host } => Some(host),
            Phase::Handshaking { .. } | Phase::Refusing { .. } | Phase::Resetting { .. } => None,
        }
    }

    /// Bytes delivered (client to host, host to client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.up.bytes, self.down.bytes)
    }

    /// While the connect to its host is in flight: a client that reset has
    /// what it sent before read into the buffer, to be delivered once the
    /// host is connected. A client that sent nothing is done with at once.
    pub fn while_connecting(&mut self, pool: &mut BufferPool) -> Step {
        self.client.note_error();
        if !self.client.is_broken() {
            return Step::Continue;
        }
        self.failed.get_or_insert(Side::Client);
        let budget = RELAY_BUDGET.max(2 * pool.bulk_size());
        let _ = match self.tls.as_deref_mut() {
            None => pump(
                &mut self.client,
                &mut NotConnected,
                &mut self.up,
                pool,
                budget,
            ),
            Some(tls) => pump(
                &mut tls.side(&mut self.client),
                &mut NotConnected,
                &mut self.up,
                pool,
                budget,
            ),
        };
        if self.up.delivered() {
            Step::Finish(End::Reset(Side::Client))
        } else {
            Step::Continue
        }
    }

    /// When the loop must look at this pair again if nothing happens.
    pub fn deadline(&self, settings: &Settings) -> Instant {
        let own = self.own_deadline(settings);
        self.drain_by.map_or(own, |d| d.min(own))
    }

    fn own_deadline(&self, settings: &Settings) -> Instant {
        match &self.phase {
            Phase::Handshaking { deadline }
            | Phase::Connecting { deadline, .. }
            | Phase::Refusing { deadline, .. } => *deadline,
            Phase::Resetting { check, until, .. } => (*check).min(*until),
            Phase::Relaying { .. } => {
                let mut quiet = settings.idle_timeout;
                if self.up.eof || self.down.eof || self.failed.is_some() {
                    quiet = quiet.min(settings.half_close_timeout);
                }
                self.last_active + quiet
            }
        }
    }

    /// What a deadline that has passed means for a relaying pair.
    pub fn expiry(&self) -> End {
        if let Some(side) = self.failed {
            // Its last bytes could not all be delivered in time.
            End::Reset(side)
        } else if self.up.eof || self.down.eof {
            End::HalfCloseTimeout
        } else {
            End::IdleTimeout
        }
    }

    /// Checks the connect in flight after an event on the host socket.
    pub fn check_connect(&mut self) -> Connect {
        match self.host.as_mut() {
            Some(host) => host.connect_result(),
            None => Connect::Failed(io::ErrorKind::NotConnected.into()),
        }
    }

    /// The connect completed: the idle clock starts now.
    pub fn connected(&mut self, host: HostId, now: Instant) {
        self.phase = Phase::Relaying { host };
        self.last_active = now;
    }

    /// Bytes that the side which failed sent and that still wait in the
    /// pair's buffer for the other side.
    pub fn undelivered(&self) -> u64 {
        let toward_other = match self.failed {
            Some(Side::Client) => &self.up,
            Some(Side::Upstream) => &self.down,
            None => return 0,
        };
        toward_other.buf.as_ref().map_or(0, |b| b.len() as u64)
    }

    /// Whether bytes read from one side wait in a buffer for the other.
    pub fn holds_bytes(&self) -> bool {
        self.up.buf.is_some() || self.down.buf.is_some()
    }

    /// Moves bytes both ways as far as readiness, buffer room and the
    /// per-turn budget allow.
    ///
    /// A side that resets is not passed on at once: the kernel still holds
    /// what that side sent before, readable ahead of the error. The
    /// direction toward the broken side is over (its bytes cannot arrive),
    /// the direction from it goes on until everything it sent is handed to
    /// the other side, and only then does the pair end with the reset.
    pub fn relay(&mut self, pool: &mut BufferPool, now: Instant) -> Step {
        let Some(host) = self.host.as_mut() else {
            return Step::Finish(End::Reset(Side::Upstream));
        };
        self.client.note_error();
        host.note_error();
        let broken_before = (self.client.is_broken(), host.is_broken());
        let (up, down) = self.pump_both(pool);
        if up.moved || down.moved {
            self.last_active = now;
        }
        let broken = (
            self.client.is_broken(),
            self.host.as_ref().is_some_and(Endpoint::is_broken),
        );
        for (side, failed) in [(Side::Client, broken.0), (Side::Upstream, broken.1)] {
            if failed {
                self.failed.get_or_insert(side);
            }
        }
        let tls_flushed = self.tls.as_ref().is_none_or(|t| !t.wants_write());
        let finished = match broken {
            (false, false) => self.up.done && self.down.done,
            (true, true) => true,
            (true, false) => self.up.delivered(),
            (false, true) => self.down.delivered() && tls_flushed,
        };
        if finished {
            Step::Finish(self.failed.map_or(End::Closed, End::Reset))
        } else if up.exhausted
            || down.exhausted
            // A failure found by one direction's pump after the other had
            // run: that one must look again, and no event may come for it.
            || broken_before != broken
        {
            Step::Again
        } else {
            Step::Continue
        }
    }

    /// While the pair waits to pass a reset on ([`Phase::Resetting`]):
    /// drops what the receiver still sends, so that it keeps reading (and
    /// acknowledging) what it was sent.
    pub fn drain_while_resetting(&mut self, pool: &mut BufferPool) -> Step {
        let (up, down) = self.pump_both(pool);
        if up.exhausted || down.exhausted {
            Step::Again
        } else {
            Step::Continue
        }
    }

    /// One pump each way, within the per-turn budget. A failing sink marks
    /// its endpoint broken, which the caller reads.
    fn pump_both(&mut self, pool: &mut BufferPool) -> (Pumped, Pumped) {
        let Some(host) = self.host.as_mut() else {
            return (Pumped::NOTHING, Pumped::NOTHING);
        };
        let budget = RELAY_BUDGET.max(2 * pool.bulk_size());
        let client = &mut self.client;
        let (up, down) = match self.tls.as_deref_mut() {
            None => (
                pump(client, host, &mut self.up, pool, budget),
                pump(host, client, &mut self.down, pool, budget),
            ),
            Some(tls) => {
                // Records may wait regardless of the flows (handshake tail,
                // alerts, a close_notify whose FIN is still to come). A
                // failure marks the client broken, which the flows see.
                let _ = tls.flush(client);
                let up = pump(&mut tls.side(client), host, &mut self.up, pool, budget);
                let down = pump(host, &mut tls.side(client), &mut self.down, pool, budget);
                // Reading may have queued records of its own (alerts, key
                // updates) that no later event would send.
                let _ = tls.flush(client);
                (up, down)
            }
        };
        (
            up.unwrap_or(Pumped::NOTHING),
            down.unwrap_or(Pumped::NOTHING),
        )
    }

    /// Advances the TLS handshake (TLS pairs in [`Phase::Handshaking`]).
    pub fn handshake(&mut self) -> Handshake {
        match self.tls.as_deref_mut() {
            Some(tls) => tls.handshake(&mut self.client),
            None => Handshake::Done,
        }
    }

    /// Sends the refusal line (over TLS: the line, then `close_notify`),
    /// shuts the write side, and reads (and drops) whatever the client still
    /// sends until it finishes, so that closing does not turn into a reset
    /// that could destroy the line before it is read.
    pub fn refuse(&mut self) -> Step {
        let Phase::Refusing {
            refusal,
            written,
            shut,
            discarded,
            ..
        } = &mut self.phase
        else {
            return Step::Continue;
        };
        let refusal = *refusal;
        let end = Step::Finish(End::Refused(refusal));
        let client = &mut self.client;
        let line = refusal.line();
        match self.tls.as_deref_mut() {
            Some(tls) => {
                if *written == 0 {
                    tls.queue_last_words(line.as_bytes());
                    *written = line.len();
                }
                if tls.flush(client).is_err() {
                    return end;
                }
                if !*shut && !tls.wants_write() {
                    *shut = true;
                    if client.stream.shutdown(Shutdown::Write).is_err() {
                        return end;
                    }
                }
            }
            None => {
                while *written < line.len() && client.is(WRITABLE) {
                    match net::write(&mut client.stream, &line.as_bytes()[*written..]) {
                        Io::Done(n) => *written += n,
                        Io::WouldBlock => client.clear(WRITABLE),
                        Io::Eof | Io::Failed(_) => return end,
                    }
                }
                if !*shut && *written == line.len() {
                    *shut = true;
                    if client.stream.shutdown(Shutdown::Write).is_err() {
                        return end;
                    }
                }
            }
        }
        loop {
            let got = match self.tls.as_deref_mut() {
                Some(tls) => tls.discard(client),
                None => discard_plain(client),
            };
            match got {
                Discarded::Bytes(n) => {
                    *discarded += n;
                    if *discarded > REFUSAL_DISCARD_LIMIT {
                        return end;
                    }
                }
                Discarded::WouldBlock => return Step::Continue,
                // Done once the line is out; a client that stopped sending
                // earlier may still be reading it.
                Discarded::End if *shut => return end,
                Discarded::End => {
                    client.clear(READABLE | READ_ALL);
                    return Step::Continue;
                }
            }
        }
    }

    /// Gives the pair's buffers back to the pool (before it is dropped).
    pub fn release_buffers(&mut self, pool: &mut BufferPool) {
        self.up.release(pool);
        self.down.release(pool);
    }
}

/// Reads and drops what a refused plain client still sends.
fn discard_plain(client: &mut Endpoint) -> Discarded {
    if !client.is(READABLE) {
        return Discarded::WouldBlock;
    }
    let mut scratch = [0u8; 2048];
    match net::read(&mut client.stream, &mut scratch) {
        Io::Done(n) => Discarded::Bytes(n),
        Io::WouldBlock => {
            client.clear(READABLE | READ_ALL);
            Discarded::WouldBlock
        }
        Io::Eof | Io::Failed(_) => Discarded::End,
    }
}
