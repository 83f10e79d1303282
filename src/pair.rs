//! The life of one connection pair: a client socket, the upstream socket
//! tcplb opened for it, a flow per direction, and the phase it is in.
//!
//! ```text
//!   accept ──> Connecting ──(connected)──> Relaying ──(both flows done)──> closed
//!                 │  ▲  (connect failed:                │
//!                 │  └── next candidate)               (reset, timeout) ──> closed
//!                 └──(no candidate left)──> Refusing ──(line sent, FIN or deadline)──> closed
//! ```
//!
//! Readiness is remembered per socket ([`Endpoint`]): an event sets bits,
//! and only an operation that shows the socket drained (WouldBlock, or a
//! short read or write) clears them. The relay works on "socket ready and
//! flow wants it": it reads only while the direction's buffer has room and
//! writes only while it holds bytes, so a direction paused by backpressure
//! resumes on the other socket's next writable edge without waiting for a
//! new readable one. Each direction finishes on its own (source EOF and
//! buffer flushed => `shutdown(Write)` of the destination); the pair is
//! done when both have. The loop (`proxy.rs`) owns the host counters and
//! the close path; this module only reports what happened.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;

use crate::balance::HostId;
use crate::buffer::{Buffer, BufferPool, Size};
use crate::config::Settings;
use crate::net::{self, Io};
use crate::token::Side;

const READABLE: u8 = 1;
const WRITABLE: u8 = 2;
/// A short read does not mean the socket is drained: read on until
/// WouldBlock or EOF. Set when the peer's FIN or an error came with the
/// readable edge (EOF is still to be read), and when urgent data arrived
/// (Linux stops a read at the urgent mark even with more bytes queued).
const READ_ALL: u8 = 4;
/// The kernel reported an error condition; `take_error` will say which.
const ERROR: u8 = 8;

/// How long a refused client gets to read its error line and close.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Bytes of a refused client's input read and dropped before giving up on a
/// graceful close; reading them keeps the kernel from answering with RST
/// (which could destroy the error line before the client reads it).
const REFUSAL_DISCARD_LIMIT: usize = 64 * 1024;

/// One socket and what the kernel last said about it.
#[derive(Debug)]
pub struct Endpoint {
    pub stream: TcpStream,
    ready: u8,
    /// SO_OOBINLINE is set (done on the first urgent-data event).
    urgent_inline: bool,
}

impl Endpoint {
    pub fn new(stream: TcpStream) -> Self {
        Endpoint {
            stream,
            ready: 0,
            urgent_inline: false,
        }
    }

    /// Remembers a readiness event. Closed and error conditions count as
    /// readable and writable so that the next operation reports them.
    pub fn on_event(&mut self, event: &Event) {
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.ready |= READABLE;
        }
        if event.is_read_closed() || event.is_error() || event.is_priority() {
            self.ready |= READABLE | READ_ALL;
        }
        if event.is_priority() && !self.urgent_inline {
            net::keep_urgent_inline(&self.stream);
            self.urgent_inline = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            self.ready |= WRITABLE;
        }
        if event.is_error() {
            self.ready |= ERROR;
        }
    }

    /// Lets the first write be tried before any event (a fresh socket has room).
    pub fn assume_writable(&mut self) {
        self.ready |= WRITABLE;
    }

    fn is(&self, bit: u8) -> bool {
        self.ready & bit != 0
    }

    fn clear(&mut self, bits: u8) {
        self.ready &= !bits;
    }

    /// The pending socket error, if the kernel flagged one.
    fn pending_error(&mut self) -> Option<io::Error> {
        if !self.is(ERROR) {
            return None;
        }
        self.clear(ERROR);
        match self.stream.take_error() {
            Ok(None) => None,
            Ok(Some(e)) | Err(e) => Some(e),
        }
    }
}

/// One direction of a pair: bytes from a source socket to a destination.
#[derive(Debug, Default)]
struct Flow {
    /// Present only while bytes are in flight.
    buf: Option<Buffer>,
    /// Reads have filled whole buffers: this direction streams, and takes
    /// bulk-size buffers from now on.
    bulk: bool,
    /// The source sent FIN.
    eof: bool,
    /// Everything is delivered and the destination's write side is shut.
    done: bool,
    /// Bytes written to the destination.
    bytes: u64,
}

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
            End::Shutdown => "shutdown",
        })
    }
}

/// Why a client is turned away; the code starts its one-line answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UpstreamUnavailable,
    Overloaded,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::UpstreamUnavailable => "upstream_unavailable",
            Refusal::Overloaded => "overloaded",
        }
    }

    /// The line sent to the client. It never names hosts or addresses.
    pub fn line(self) -> &'static str {
        match self {
            Refusal::UpstreamUnavailable => {
                "ERROR upstream_unavailable: no host of this service is reachable, try again later\n"
            }
            Refusal::Overloaded => "ERROR overloaded: too many connections, try again later\n",
        }
    }
}

/// Where a pair is in its life.
#[derive(Debug)]
pub enum Phase {
    /// A connect to `host` is in flight; `tried` lists hosts that already
    /// failed for this client (the allocation exists only after a failure).
    Connecting {
        host: HostId,
        tried: Vec<HostId>,
        deadline: Instant,
    },
    /// Bytes flow both ways between the client and `host`.
    Relaying { host: HostId },
    /// Sending the refusal line, then waiting for the client's FIN.
    Refusing {
        refusal: Refusal,
        written: usize,
        discarded: usize,
        deadline: Instant,
    },
}

impl Phase {
    pub fn refusing(refusal: Refusal, now: Instant) -> Phase {
        Phase::Refusing {
            refusal,
            written: 0,
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

/// Result of checking a connect in progress.
#[derive(Debug)]
pub enum Connect {
    Pending,
    Established,
    Failed(io::Error),
}

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
    /// The socket to the host; `None` while refusing.
    pub host: Option<Endpoint>,
    pub phase: Phase,
    /// Client to host.
    up: Flow,
    /// Host to client.
    down: Flow,
    pub started: Instant,
    last_active: Instant,
    /// The deadline of this pair's live entry in the timer heap, if any.
    pub scheduled: Option<Instant>,
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
            host: None,
            phase,
            up: Flow::default(),
            down: Flow::default(),
            started: now,
            last_active: now,
            scheduled: None,
        }
    }

    pub fn endpoint(&mut self, side: Side) -> Option<&mut Endpoint> {
        match side {
            Side::Client => Some(&mut self.client),
            Side::Upstream => self.host.as_mut(),
        }
    }

    /// Bytes delivered (client to host, host to client).
    pub fn bytes(&self) -> (u64, u64) {
        (self.up.bytes, self.down.bytes)
    }

    /// Whether the client socket reported an error (e.g. it reset while
    /// the connect to its host was still in flight).
    pub fn client_failed(&mut self) -> bool {
        self.client.pending_error().is_some()
    }

    /// When the loop must look at this pair again if nothing happens.
    pub fn deadline(&self, settings: &Settings) -> Instant {
        match &self.phase {
            Phase::Connecting { deadline, .. } | Phase::Refusing { deadline, .. } => *deadline,
            Phase::Relaying { .. } => {
                let mut quiet = settings.idle_timeout;
                if self.up.eof || self.down.eof {
                    quiet = quiet.min(settings.half_close_timeout);
                }
                self.last_active + quiet
            }
        }
    }

    /// What a deadline that has passed means for this pair.
    pub fn expiry(&self) -> End {
        if self.up.eof || self.down.eof {
            End::HalfCloseTimeout
        } else {
            End::IdleTimeout
        }
    }

    /// Checks the connect in flight after an event on the host socket. A
    /// non-blocking connect is complete once the socket is writable with no
    /// pending error (`SO_ERROR`).
    pub fn check_connect(&mut self) -> Connect {
        let Some(host) = self.host.as_mut() else {
            return Connect::Failed(io::ErrorKind::NotConnected.into());
        };
        if !host.is(WRITABLE | ERROR) {
            return Connect::Pending;
        }
        match host.stream.take_error() {
            Ok(Some(e)) | Err(e) => return Connect::Failed(e),
            Ok(None) => {}
        }
        host.clear(ERROR);
        // Linux reports a connecting socket writable only once the
        // handshake is done; an error-only wake-up with no error is spurious.
        if host.is(WRITABLE) {
            Connect::Established
        } else {
            Connect::Pending
        }
    }

    /// The connect completed: the idle clock starts now.
    pub fn connected(&mut self, host: HostId, now: Instant) {
        self.phase = Phase::Relaying { host };
        self.last_active = now;
    }

    /// Whether bytes read from one side wait in a buffer for the other.
    pub fn holds_bytes(&self) -> bool {
        self.up.buf.is_some() || self.down.buf.is_some()
    }

    /// Moves bytes both ways as far as readiness, buffer room and the
    /// per-turn budget allow.
    pub fn relay(&mut self, pool: &mut BufferPool, now: Instant) -> Step {
        let Some(host) = self.host.as_mut() else {
            return Step::Finish(End::Reset(Side::Upstream));
        };
        for (side, endpoint) in [
            (Side::Client, &mut self.client),
            (Side::Upstream, &mut *host),
        ] {
            if let Some(e) = endpoint.pending_error() {
                log::debug!("pair #{}: {side:?} socket error: {e}", self.id);
                return Step::Finish(End::Reset(side));
            }
        }
        let budget = RELAY_BUDGET.max(2 * pool.bulk_size());
        let up = pump(&mut self.client, host, &mut self.up, pool, budget);
        let down = pump(host, &mut self.client, &mut self.down, pool, budget);
        let (up, down) = match (up, down) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(fault), _) => return Step::Finish(End::Reset(fault.side(Side::Client))),
            (_, Err(fault)) => return Step::Finish(End::Reset(fault.side(Side::Upstream))),
        };
        if up.moved || down.moved {
            self.last_active = now;
        }
        if self.up.done && self.down.done {
            Step::Finish(End::Closed)
        } else if up.exhausted || down.exhausted {
            Step::Again
        } else {
            Step::Continue
        }
    }

    /// Sends the refusal line, shuts the write side, and reads (and drops)
    /// whatever the client still sends until its FIN, so that closing does
    /// not turn into a reset that could destroy the line before it is read.
    pub fn refuse(&mut self) -> Step {
        let Phase::Refusing {
            refusal,
            written,
            discarded,
            ..
        } = &mut self.phase
        else {
            return Step::Continue;
        };
        let client = &mut self.client;
        let line = refusal.line().as_bytes();
        while *written < line.len() && client.is(WRITABLE) {
            match net::write(&mut client.stream, &line[*written..]) {
                Io::Done(n) => *written += n,
                Io::WouldBlock => client.clear(WRITABLE),
                Io::Eof | Io::Failed(_) => return Step::Finish(End::Refused(*refusal)),
            }
            if *written == line.len() && client.stream.shutdown(Shutdown::Write).is_err() {
                return Step::Finish(End::Refused(*refusal));
            }
        }
        let mut scratch = [0u8; 2048];
        while client.is(READABLE) {
            match net::read(&mut client.stream, &mut scratch) {
                Io::Done(n) => {
                    *discarded += n;
                    if *discarded > REFUSAL_DISCARD_LIMIT {
                        return Step::Finish(End::Refused(*refusal));
                    }
                }
                Io::WouldBlock => client.clear(READABLE | READ_ALL),
                Io::Eof | Io::Failed(_) => {
                    if *written == line.len() {
                        return Step::Finish(End::Refused(*refusal));
                    }
                    // The client is gone or half-closed before the line was out.
                    client.clear(READABLE | READ_ALL);
                }
            }
        }
        Step::Continue
    }

    /// Gives the pair's buffers back to the pool (before it is dropped).
    pub fn release_buffers(&mut self, pool: &mut BufferPool) {
        for flow in [&mut self.up, &mut self.down] {
            if let Some(buf) = flow.buf.take() {
                pool.give(buf);
            }
        }
    }
}

/// Which socket of a pump failed.
enum Fault {
    Source,
    Destination,
}

impl Fault {
    fn side(&self, source: Side) -> Side {
        match self {
            Fault::Source => source,
            Fault::Destination => source.other(),
        }
    }
}

/// What one call of [`pump`] did.
struct Pumped {
    /// Some byte (or EOF) moved.
    moved: bool,
    /// Stopped because the budget ran out, not because nothing could move.
    exhausted: bool,
}

/// Moves one direction's bytes until nothing more can move or `budget`
/// bytes have been written.
fn pump(
    src: &mut Endpoint,
    dst: &mut Endpoint,
    flow: &mut Flow,
    pool: &mut BufferPool,
    mut budget: usize,
) -> Result<Pumped, Fault> {
    let mut moved = false;
    loop {
        let mut progress = false;
        if !flow.eof && src.is(READABLE) {
            let size = if flow.bulk { Size::Bulk } else { Size::Normal };
            let buf = flow.buf.get_or_insert_with(|| pool.take(size));
            if buf.has_room() {
                let room = buf.room();
                let wanted = room.len();
                match net::read(&mut src.stream, room) {
                    Io::Done(n) => {
                        buf.filled(n);
                        progress = true;
                        // More was waiting than fit: the next buffer is a bulk one.
                        flow.bulk |= n == wanted;
                        // A short read drained the socket: epoll reports the
                        // next arrival as a new edge, so no WouldBlock probe.
                        if n < wanted && !src.is(READ_ALL) {
                            src.clear(READABLE);
                        }
                    }
                    Io::Eof => {
                        flow.eof = true;
                        progress = true;
                    }
                    Io::WouldBlock => src.clear(READABLE | READ_ALL),
                    Io::Failed(e) => {
                        log::debug!("read failed: {e}");
                        return Err(Fault::Source);
                    }
                }
            }
        }
        if let Some(buf) = flow.buf.as_mut() {
            if !buf.is_empty() && dst.is(WRITABLE) {
                let wanted = buf.len();
                match net::write(&mut dst.stream, buf.data()) {
                    Io::Done(n) => {
                        buf.consumed(n);
                        flow.bytes += n as u64;
                        budget = budget.saturating_sub(n);
                        progress = true;
                        if n < wanted {
                            dst.clear(WRITABLE);
                        }
                    }
                    Io::WouldBlock => dst.clear(WRITABLE),
                    Io::Eof | Io::Failed(_) => return Err(Fault::Destination),
                }
            }
            if buf.is_empty() {
                if let Some(buf) = flow.buf.take() {
                    pool.give(buf);
                }
            }
        }
        if flow.eof && flow.buf.is_none() && !flow.done {
            // ENOTCONN here means the destination was reset meanwhile.
            if dst.stream.shutdown(Shutdown::Write).is_err() {
                return Err(Fault::Destination);
            }
            flow.done = true;
        }
        moved |= progress;
        if !progress || budget == 0 {
            return Ok(Pumped {
                moved,
                exhausted: progress,
            });
        }
    }
}
