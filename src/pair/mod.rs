//! The life of one connection pair, as one state machine whose states own
//! their resources: the socket to a host and its count exist only while
//! connecting or relaying, buffers only while relaying, and so on.
//!
//! ```text
//!   accept ─┬─(accept_proxy, a peer on the list)──> ReadingHeader ──(malformed, timeout)──> closed
//!           │                                             │ (header read)
//!           │                                             ▼
//!           │                                        Identified ──(over a per-source limit or the
//!           │                                             │          handshake caps)──> closed
//!           │                                (TLS upstream)├──────────────┐ (plain upstream)
//!           │                                             ▼              │
//!           ├─(TLS upstream)──────────────────────> Handshaking ──(TLS failure, timeout)──> closed
//!           │                                             │  ├─(denied by the client rules)──> Refusing
//!           │                                             │  └─([cluster]: no local answer)──> Admitting
//!           │                                (verified, admitted)        │
//!           │                                             ▼              ▼
//!           └─(plain upstream)──────────────────────> [place] ◄───────────┘
//!
//!   Admitting ────┬─(Redis answered, or timeout and the fallback: admitted)──> [place]
//!                 └─(denied by the client rules, or by the fallback)──> Refusing
//!   [place] ──────┬─(max_connections; no healthy host)──> Refusing
//!                 ├─(others of its worker waiting, room in the queue)──> Queued
//!                 ├─(a host chosen)──> Connecting
//!                 └─(every host at its cap)──> [the queue]
//!   Queued ───────┬─(a slot freed: a host chosen)──> Connecting
//!                 ├─(queue_timeout; its hosts gone)──> Refusing
//!                 └─(client reset, having sent nothing)──> closed
//!   Connecting ───┬─(connected, no send_proxy)──> Relaying
//!                 ├─(connected, send_proxy)──> SendingHeader
//!                 └─(failed, timed out)──> [next host]
//!   SendingHeader ┬─(header written)──> Relaying
//!                 └─(failed, timed out)──> [next host]
//!   [next host] ──┬─(one left, not at its cap)──> Connecting
//!                 ├─(none left)──> Refusing
//!                 └─(every one left at its cap)──> [the queue]
//!   [the queue] ──┬─(queue_timeout > 0, fewer than max_queued waiting)──> Queued
//!                 └─(otherwise)──> Refusing (overloaded)
//!   Relaying ─────┬─(both directions done; idle or half-close timeout)──> closed
//!                 └─(a side reset, its bytes delivered)──> Resetting
//!   Resetting ────── (receiver acknowledged, or bound)──> closed with RST
//!   Refusing ─────── (line sent, client's FIN, or 2 s)──> closed
//!
//!   [place], [next host] and [the queue] are choices made within one step,
//!   not states. Shutdown, a drain's deadline and close_on_down close a
//!   pair in whatever state it is in; a client that resets having sent
//!   nothing ends at once in every state before Relaying but Admitting,
//!   which lasts at most [cluster]'s timeout.
//! ```
//!
//! The loop hands a pair readiness events and deadlines; the pair decides
//! its next step with a narrow [`Context`] (buffer and pipe pools, registry, its
//! upstream's hosts, the client rules, settings, `now`). Every change of
//! state goes through [`Pair::transition`], which keeps the [`Census`] (how
//! many pairs are in each state) and logs the change; [`Pair::close`] is
//! the one way out, and gives back everything the last state held.
//!
//! A queued pair holds a place in its upstream's wait queue and nothing
//! of a host; its worker keeps it in line and retries it when a slot
//! frees (see [`crate::policy::queue`]).

mod connect;
mod end;
mod refuse;
mod relay;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info};
use mio::{Registry, Token};

pub(crate) use connect::PAIR_INTEREST;
pub(crate) use end::{End, Refusal};
use relay::ResetWait;

use crate::cluster::ClusterLink;
use crate::config::Settings;
use crate::io::buffer::BufferPool;
use crate::io::flow::{Flow, Pools, Source};
use crate::io::pipe::PipePool;
use crate::io::send_queue::SendQueues;
use crate::io::tls_session::{Handshake, TlsSession};
use crate::io::{Endpoint, Io};
use crate::logs::{AccessLine, RefusalLog, Throttle};
use crate::policy::access::{Access, Admission, ClientLease, Ticket};
use crate::policy::balance::{Host, HostLease};
use crate::policy::capacity::{Capacity, ConnectionSlot, HandshakeSlot};
use crate::policy::queue::QueueTicket;
use crate::policy::share::Mode;
use crate::proxy_header::{self, Header, Parse};
use crate::upstream::{Counters, Upstream};

/// How long a refused client gets to read its error line and close.
pub(crate) const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Bytes one pair may move per loop turn before others get their turn.
pub(crate) const RELAY_BUDGET: usize = 256 * 1024;
/// Refused clients that may linger (reading their error line) at once;
/// beyond this, refusals are written best-effort and closed at once.
pub(crate) const REFUSING_CAP: usize = 1024;

/// Which socket of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Host,
}

impl Side {
    /// The other socket of the pair.
    pub(crate) fn other(self) -> Side {
        match self {
            Side::Client => Side::Host,
            Side::Host => Side::Client,
        }
    }
}

/// What the loop should do with a pair after it moved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Wait for the next readiness event or deadline.
    Continue,
    /// The relay budget ran out with bytes still movable: drive the pair
    /// again next turn, without waiting for an event (none may come).
    Again,
    /// Done: [`Pair::close`] it with this end.
    Finish(End),
    /// Every host is at its cap and the pair now waits for a slot: the
    /// loop puts it at the back of its upstream's queue, and retries the
    /// queue (with [`Pair::retry_queued`]) when a slot may have freed.
    Queued,
    /// Its PROXY header is read: the loop checks the client's address
    /// against the per-source limits and caps, then calls
    /// [`Pair::start_handshake`] or [`Pair::start_connecting`] (or closes it).
    Identified,
}

/// The client's side of a pair, in every state.
#[derive(Debug)]
struct Client {
    endpoint: Endpoint,
    /// Its TLS session, on a TLS upstream.
    tls: Option<Box<TlsSession>>,
    /// Its place in a `[[client]]` rule's count, once admitted.
    lease: Option<ClientLease>,
}

/// A socket to a host and the count it holds against that host.
#[derive(Debug)]
struct HostConn {
    endpoint: Endpoint,
    lease: HostLease,
}

/// Where a pair is in its life, with what it holds there.
#[derive(Debug)]
enum State {
    /// A client of an `accept_proxy` upstream, from a peer on its list:
    /// its PROXY header is being read (`read` holds what came so far,
    /// never more than the header and a few bytes past a v1 line).
    ReadingHeader { deadline: Instant, read: Vec<u8> },
    /// The header is read and the client's address known. Only for the
    /// instant the loop takes to check that address against the
    /// per-source limits and handshake caps and start the handshake or the
    /// connect; `early` is what came after the header, for TLS or the host.
    Identified { deadline: Instant, early: Vec<u8> },
    /// The TLS handshake of a client of a TLS upstream is in progress.
    Handshaking {
        deadline: Instant,
        /// Its place under the handshake caps, held until the state ends.
        _slot: HandshakeSlot,
    },
    /// The handshake is done and the client's rule waits for Redis (a
    /// token or a place of the group's limits, with `[cluster]`): until
    /// Redis answers, or at `deadline` the fallback decides.
    Admitting {
        deadline: Instant,
        /// Its place among the identity's waiting connections.
        ticket: Ticket,
    },
    /// A connect to a host is in flight; `tried` lists hosts that already
    /// failed for this client (allocated only after a failure).
    Connecting {
        host: HostConn,
        tried: Vec<SocketAddr>,
        deadline: Instant,
        /// Client to host: what came after a PROXY header, and, if the
        /// client reset meanwhile, what it sent before (read, to be
        /// delivered once connected); empty otherwise.
        up: Flow,
    },
    /// Connected; the upstream's PROXY protocol header is being written
    /// to the host, before any byte of the client's. Everything of
    /// `Connecting` is kept: a host that fails now is a failed connect,
    /// and the next candidate is tried.
    SendingHeader {
        host: HostConn,
        tried: Vec<SocketAddr>,
        /// The connect's deadline, which bounds the header too.
        deadline: Instant,
        up: Flow,
        header: Box<[u8]>,
        /// Bytes of `header` written so far.
        sent: usize,
    },
    /// Bytes flow both ways.
    Relaying {
        host: HostConn,
        /// Client to host.
        up: Flow,
        /// Host to client.
        down: Flow,
        last_active: Instant,
        /// The side whose reset (or failure) was noticed first.
        failed: Option<Side>,
    },
    /// One side broke (`end` says which, and how), every byte it sent is
    /// in the other side's kernel, and the pair waits for those bytes to be
    /// acknowledged before it passes the reset on. The host's count is
    /// already given back.
    Resetting {
        host: Endpoint,
        /// The host it was connected to, for the access line.
        host_record: Arc<Host>,
        end: End,
        wait: ResetWait,
    },
    /// Every host is at its cap: waiting for a slot until `deadline`.
    Queued {
        /// Its place in the upstream's queue, held until the state ends.
        _ticket: QueueTicket,
        since: Instant,
        deadline: Instant,
        /// Hosts that already failed for this client.
        tried: Vec<SocketAddr>,
        /// Client to host, as in `Connecting`: kept for the host it gets.
        up: Flow,
    },
    /// Sending the refusal line, then waiting for the client's FIN.
    Refusing {
        refusal: Refusal,
        progress: refuse::Progress,
        deadline: Instant,
    },
    /// Only for the instant a transition moves the resources out.
    Moving,
}

/// The states, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ReadingHeader,
    Identified,
    Handshaking,
    Admitting,
    Queued,
    Connecting,
    SendingHeader,
    Relaying,
    Resetting,
    Refusing,
}

impl Kind {
    /// How many kinds there are (`Refusing` is the last).
    const COUNT: usize = Kind::Refusing as usize + 1;
}

impl State {
    fn kind(&self) -> Option<Kind> {
        Some(match self {
            State::ReadingHeader { .. } => Kind::ReadingHeader,
            State::Identified { .. } => Kind::Identified,
            State::Handshaking { .. } => Kind::Handshaking,
            State::Admitting { .. } => Kind::Admitting,
            State::Queued { .. } => Kind::Queued,
            State::Connecting { .. } => Kind::Connecting,
            State::SendingHeader { .. } => Kind::SendingHeader,
            State::Relaying { .. } => Kind::Relaying,
            State::Resetting { .. } => Kind::Resetting,
            State::Refusing { .. } => Kind::Refusing,
            State::Moving => return None,
        })
    }
}

/// How many of this worker's pairs are in each state: kept by
/// [`Pair::transition`] and [`Pair::close`], so it cannot drift from the
/// states it counts. (The process-wide caps are in [`Capacity`].)
#[derive(Debug, Default)]
pub(crate) struct Census {
    counts: [usize; Kind::COUNT],
}

impl Census {
    fn moved(&mut self, from: Option<Kind>, to: Option<Kind>) {
        if from == to {
            return;
        }
        if let Some(kind) = from {
            self.counts[kind as usize] -= 1;
        }
        if let Some(kind) = to {
            self.counts[kind as usize] += 1;
        }
    }

    pub fn refusing(&self) -> usize {
        self.counts[Kind::Refusing as usize]
    }
}

/// Log lines that anyone could make frequent: at most one a second each.
#[derive(Debug, Default)]
pub(crate) struct PairLogs {
    pub handshake_failed: Throttle,
    pub overloaded: Throttle,
    pub connect_failed: Throttle,
    pub send_queue: Throttle,
    pub proxy_header: Throttle,
    pub refusals: RefusalLog,
}

/// What a pair may use and change while it moves.
pub(crate) struct Context<'a> {
    pub now: Instant,
    pub settings: &'a Settings,
    pub pool: &'a mut BufferPool,
    /// The pipes of spliced directions.
    pub pipes: &'a mut PipePool,
    pub registry: &'a Registry,
    /// The token a host socket of this pair is registered under.
    pub host_token: Token,
    /// This worker's counters of the pair's upstream.
    pub counters: &'a mut Counters,
    pub access: &'a Access,
    /// The index of the worker the pair lives in (its place in queues).
    pub worker: usize,
    /// With `[cluster]`: the thread that shares the client limits.
    pub cluster: Option<&'a ClusterLink>,
    /// The process-wide caps.
    pub capacity: &'a Arc<Capacity>,
    pub census: &'a mut Census,
    pub send_queues: &'a mut SendQueues,
    pub logs: &'a mut PairLogs,
    /// Results of real connects, for passive health checks: the loop
    /// feeds them to the hosts' health after the pair has moved.
    pub host_results: &'a mut Vec<(Arc<Host>, bool)>,
}

impl Context<'_> {
    /// The buffer and pipe pools, for a direction.
    pub fn pools(&mut self) -> Pools<'_> {
        Pools::new(self.pool, self.pipes)
    }
}

/// A client connection and, once it has one, its host connection.
#[derive(Debug)]
pub(crate) struct Pair {
    /// Process-unique number, for logs and to tell timer entries of a
    /// reused slab slot apart.
    pub id: u64,
    /// Its upstream (as configured when the pair began).
    pub upstream: Arc<Upstream>,
    /// The client's address: the peer's, or what its PROXY header said.
    pub client_addr: SocketAddr,
    /// What a PROXY header said about the client, when one named it
    /// (`client_addr` is then the header's source). Boxed: most pairs
    /// have none, and an idle pair should cost 8 bytes for it, not 64.
    proxied: Option<Box<Proxied>>,
    pub started: Instant,
    /// The deadline of this pair's live entry in the timer heap, if any.
    pub scheduled: Option<Instant>,
    /// A reload removed its host or upstream: closed at this instant
    /// unless it finishes first.
    pub drain_by: Option<Instant>,
    /// The client's identity from its certificate, for logs.
    identity: Option<Box<str>>,
    /// Refused beyond the log budget: no access line of its own.
    unlogged: bool,
    /// Its place under `max_connections`, from its first connect on.
    slot: Option<ConnectionSlot>,
    client: Client,
    state: State,
}

/// The addresses a PROXY header gave a pair besides the client's.
#[derive(Debug)]
struct Proxied {
    /// The peer that sent the header (an outer load balancer).
    via: SocketAddr,
    /// The address the client connected to.
    destination: SocketAddr,
}

impl Pair {
    /// The peer that sent a PROXY header naming the client, when one did.
    pub fn via(&self) -> Option<SocketAddr> {
        self.proxied.as_ref().map(|p| p.via)
    }

    /// A new TLS client: its handshake starts.
    pub fn handshaking(
        id: u64,
        upstream: Arc<Upstream>,
        client: (Endpoint, SocketAddr),
        (tls, slot): (Box<TlsSession>, HandshakeSlot),
        deadline: Instant,
        ctx: &mut Context<'_>,
    ) -> Pair {
        let mut pair = Pair::new(id, upstream, client, Some(tls), ctx.now);
        pair.transition(ctx.census, |_| State::Handshaking {
            deadline,
            _slot: slot,
        });
        pair
    }

    /// A new client of an `accept_proxy` upstream, from a peer on its
    /// list: its PROXY header is read first, until `deadline`.
    pub fn reading_header(
        id: u64,
        upstream: Arc<Upstream>,
        client: (Endpoint, SocketAddr),
        deadline: Instant,
        ctx: &mut Context<'_>,
    ) -> Pair {
        let mut pair = Pair::new(id, upstream, client, None, ctx.now);
        pair.transition(ctx.census, |_| State::ReadingHeader {
            deadline,
            read: Vec::new(),
        });
        pair
    }

    /// A new plain client: connected to a host, or refused.
    pub fn connecting(
        id: u64,
        upstream: Arc<Upstream>,
        client: (Endpoint, SocketAddr),
        ctx: &mut Context<'_>,
    ) -> (Pair, Step) {
        let mut pair = Pair::new(id, upstream, client, None, ctx.now);
        let step = pair.place(ctx, Flow::default());
        (pair, step)
    }

    fn new(
        id: u64,
        upstream: Arc<Upstream>,
        (endpoint, client_addr): (Endpoint, SocketAddr),
        tls: Option<Box<TlsSession>>,
        now: Instant,
    ) -> Pair {
        Pair {
            id,
            upstream,
            client_addr,
            proxied: None,
            started: now,
            scheduled: None,
            drain_by: None,
            identity: None,
            unlogged: false,
            slot: None,
            client: Client {
                endpoint,
                tls,
                lease: None,
            },
            state: State::Moving,
        }
    }

    /// The one place a pair changes state: `next` gets the old state (to
    /// move its resources on) and returns the new one.
    fn transition(&mut self, census: &mut Census, next: impl FnOnce(State) -> State) {
        let old = std::mem::replace(&mut self.state, State::Moving);
        let from = old.kind();
        self.state = next(old);
        let to = self.state.kind();
        census.moved(from, to);
        if from != to {
            debug!("pair #{}: {from:?} -> {to:?}", self.id);
        }
    }

    /// The socket of `side`, while the pair has one.
    pub fn endpoint(&mut self, side: Side) -> Option<&mut Endpoint> {
        match (side, &mut self.state) {
            (Side::Client, _) => Some(&mut self.client.endpoint),
            (
                Side::Host,
                State::Connecting { host, .. }
                | State::SendingHeader { host, .. }
                | State::Relaying { host, .. },
            ) => Some(&mut host.endpoint),
            (Side::Host, State::Resetting { host, .. }) => Some(host),
            (Side::Host, _) => None,
        }
    }

    /// Whether its TLS handshake is in progress.
    pub fn is_handshaking(&self) -> bool {
        matches!(self.state, State::Handshaking { .. })
    }

    /// Whether it waits in its upstream's queue for a host slot.
    pub fn is_queued(&self) -> bool {
        matches!(self.state, State::Queued { .. })
    }

    /// Whether it waits for Redis's answer about its client's limits.
    pub fn is_admitting(&self) -> bool {
        matches!(self.state, State::Admitting { .. })
    }

    /// The host this pair counts against, while connecting or relaying.
    pub fn host(&self) -> Option<&Arc<Host>> {
        match &self.state {
            State::Connecting { host, .. }
            | State::SendingHeader { host, .. }
            | State::Relaying { host, .. } => Some(host.lease.host()),
            _ => None,
        }
    }

    /// Bytes the relay has delivered each way (client to host, host to client).
    pub fn bytes(&self) -> (u64, u64) {
        match &self.state {
            State::Relaying { up, down, .. } => (up.bytes, down.bytes),
            State::Resetting { wait, .. } => wait.bytes,
            _ => (0, 0),
        }
    }

    /// When the loop must look at this pair again if nothing happens.
    pub fn deadline(&self, settings: &Settings) -> Instant {
        let own = match &self.state {
            State::ReadingHeader { deadline, .. }
            | State::Identified { deadline, .. }
            | State::Handshaking { deadline, .. }
            | State::Admitting { deadline, .. }
            | State::Queued { deadline, .. }
            | State::Connecting { deadline, .. }
            | State::SendingHeader { deadline, .. }
            | State::Refusing { deadline, .. } => *deadline,
            State::Resetting { wait, .. } => wait.deadline(),
            State::Relaying {
                up,
                down,
                last_active,
                failed,
                ..
            } => {
                let mut quiet = settings.idle_timeout;
                if up.eof || down.eof || failed.is_some() {
                    quiet = quiet.min(settings.half_close_timeout);
                }
                *last_active + quiet
            }
            State::Moving => unreachable!("no pair rests while moving"),
        };
        self.drain_by.map_or(own, |d| d.min(own))
    }

    /// Moves the pair on after readiness changed on one of its sockets.
    pub fn advance(&mut self, ctx: &mut Context<'_>) -> Step {
        match self.state {
            State::ReadingHeader { .. } => self.read_header(ctx),
            // The loop moves it on at once; an event meanwhile changes nothing.
            State::Identified { .. } => Step::Identified,
            State::Handshaking { .. } => self.handshake(ctx),
            State::Admitting { .. } => self.readmit(ctx, false),
            State::Queued { .. } => self.while_waiting(ctx),
            State::Connecting { .. } => self.check_connect(ctx),
            State::SendingHeader { .. } => self.send_header(ctx),
            State::Relaying { .. } => self.relay(ctx),
            State::Resetting { .. } => self.drain_while_resetting(ctx),
            State::Refusing { .. } => self.refuse(ctx),
            State::Moving => unreachable!("no pair rests while moving"),
        }
    }

    /// Acts on the pair's own deadline, which has passed.
    pub fn expire(&mut self, ctx: &mut Context<'_>) -> Step {
        match self.state {
            State::ReadingHeader { .. } | State::Identified { .. } => {
                self.bad_header(ctx, "proxy_header_timeout", "not complete in time")
            }
            State::Handshaking { .. } => {
                debug!("{} handshake timed out", self.client_addr);
                let refusals = &mut ctx.logs.refusals;
                self.count_silent_refusal("handshake_timeout", ctx.counters, refusals, ctx.now);
                Step::Finish(End::HandshakeTimeout)
            }
            State::Admitting { .. } => self.readmit(ctx, true),
            State::Queued { .. } => self.queue_timed_out(ctx),
            State::Connecting { .. } => {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
                self.connect_failed(ctx, e)
            }
            State::SendingHeader { .. } => {
                let why = "connected, but the PROXY header was not taken in time";
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, why);
                self.connect_failed(ctx, e)
            }
            State::Relaying { .. } => self.relay_expired(ctx),
            State::Resetting { .. } => self.check_reset(ctx),
            State::Refusing { refusal, .. } => Step::Finish(End::Refused(refusal)),
            State::Moving => unreachable!("no pair rests while moving"),
        }
    }

    fn handshake(&mut self, ctx: &mut Context<'_>) -> Step {
        let tls = self
            .client
            .tls
            .as_deref_mut()
            .expect("handshaking pairs are TLS pairs");
        match tls.handshake(&mut self.client.endpoint) {
            Handshake::Pending => Step::Continue,
            Handshake::Done => self.admit(ctx),
            Handshake::Failed(e) => self.handshake_failed(ctx, &crate::tls::handshake_failure(&e)),
            Handshake::Gone => Step::Finish(End::Reset(Side::Client)),
        }
    }

    fn handshake_failed(&mut self, ctx: &mut Context<'_>, reason: &str) -> Step {
        // Anyone can fail a handshake: throttled, not one line each.
        if let Some(more) = ctx.logs.handshake_failed.allow(ctx.now) {
            info!(
                "{} `{}` refused: handshake_failed ({reason}) ({more} more since the last report)",
                self.client_addr, self.upstream.name
            );
        }
        let refusals = &mut ctx.logs.refusals;
        self.count_silent_refusal("handshake_failed", ctx.counters, refusals, ctx.now);
        Step::Finish(End::HandshakeFailed)
    }

    /// Reads the client's PROXY header as far as the socket allows, never
    /// more than [`proxy_header::parse`] asks for.
    fn read_header(&mut self, ctx: &mut Context<'_>) -> Step {
        let State::ReadingHeader { read, .. } = &mut self.state else {
            unreachable!("only pairs reading a header read one");
        };
        let ep = &mut self.client.endpoint;
        ep.note_error();
        loop {
            let want = match proxy_header::parse(read) {
                Parse::More(n) => n,
                Parse::Done(header, len) => return self.identified(ctx, header, len),
                Parse::Bad(why) => {
                    return self.bad_header(ctx, "proxy_header_invalid", &why.to_string());
                }
            };
            if !ep.can_read() {
                return Step::Continue;
            }
            match ep.read_onto(read, want) {
                Io::Done(_) => {}
                Io::WouldBlock => return Step::Continue,
                // Connected and left without a word (a port check).
                Io::Eof if read.is_empty() => return Step::Finish(End::Closed),
                Io::Eof => {
                    let why = "the connection ended inside the header";
                    return self.bad_header(ctx, "proxy_header_invalid", why);
                }
                Io::Failed(_) => return Step::Finish(End::Reset(Side::Client)),
            }
        }
    }

    /// The header is whole: its addresses become the client's (a LOCAL or
    /// UNKNOWN header keeps the connection's), and what followed it is
    /// kept for the handshake or the host.
    fn identified(&mut self, ctx: &mut Context<'_>, header: Header, len: usize) -> Step {
        if let Some((source, destination)) = header.addresses {
            debug!(
                "pair #{}: {} speaks for {source} (PROXY {})",
                self.id,
                self.client_addr,
                header.version.name()
            );
            self.proxied = Some(Box::new(Proxied {
                via: self.client_addr,
                destination,
            }));
            self.client_addr = source;
        }
        self.transition(ctx.census, |old| {
            let State::ReadingHeader { deadline, mut read } = old else {
                unreachable!("only pairs reading a header are identified");
            };
            let early = read.split_off(len);
            State::Identified { deadline, early }
        });
        Step::Identified
    }

    /// A header that is malformed, too long or too slow: the connection is
    /// closed, counted under `code`, and logged at most once a second.
    fn bad_header(&mut self, ctx: &mut Context<'_>, code: &'static str, why: &str) -> Step {
        if let Some(more) = ctx.logs.proxy_header.allow(ctx.now) {
            info!(
                "{} `{}` refused: {code} ({why}) ({more} more since the last report)",
                self.client_addr, self.upstream.name
            );
        }
        let refusals = &mut ctx.logs.refusals;
        self.count_silent_refusal(code, ctx.counters, refusals, ctx.now);
        Step::Finish(if code == "proxy_header_timeout" {
            End::ProxyHeaderTimeout
        } else {
            End::ProxyHeaderInvalid
        })
    }

    /// What came after the header, taken out of the `Identified` state.
    fn take_early(&mut self) -> Vec<u8> {
        match &mut self.state {
            State::Identified { early, .. } => std::mem::take(early),
            _ => Vec::new(),
        }
    }

    /// An identified client of a TLS upstream, admitted under the
    /// handshake caps: its handshake starts with what came after the header.
    pub fn start_handshake(
        &mut self,
        (tls, slot): (Box<TlsSession>, HandshakeSlot),
        deadline: Instant,
        ctx: &mut Context<'_>,
    ) -> Step {
        let early = self.take_early();
        let tls = self.client.tls.insert(tls);
        let taken = tls.take_in(&early);
        self.transition(ctx.census, |_| State::Handshaking {
            deadline,
            _slot: slot,
        });
        match taken {
            Ok(()) => self.handshake(ctx),
            Err(reason) => self.handshake_failed(ctx, &reason),
        }
    }

    /// An identified client of a plain upstream: connected to a host, with
    /// what came after the header to go first, or refused.
    pub fn start_connecting(&mut self, ctx: &mut Context<'_>) -> Step {
        let early = self.take_early();
        let up = Flow::holding(&early, ctx.pool);
        self.place(ctx, up)
    }

    /// Turned away after its header by a per-source limit or cap (`code`),
    /// as a connection from that address would be at accept.
    pub fn turned_away(&mut self, code: &'static str, ctx: &mut Context<'_>) -> End {
        let refusals = &mut ctx.logs.refusals;
        self.count_silent_refusal(code, ctx.counters, refusals, ctx.now);
        End::TurnedAway(code)
    }

    /// Counts a refusal that sends the client no line (a failed, timed-out
    /// or evicted handshake). Anyone can cause these as fast as refusals,
    /// so their access lines share the refusals' log budget: beyond it,
    /// they are summed up instead of logged one by one.
    pub fn count_silent_refusal(
        &mut self,
        code: &'static str,
        counters: &mut Counters,
        refusals: &mut RefusalLog,
        now: Instant,
    ) {
        counters.count_refusal(code);
        self.unlogged = !refusals.allow(code, now);
    }

    /// The TLS handshake is done: identify the client, apply its rules,
    /// then connect it to a host or refuse it (or, with `[cluster]`, wait
    /// for Redis's answer first).
    fn admit(&mut self, ctx: &mut Context<'_>) -> Step {
        let names = self
            .client
            .tls
            .as_ref()
            .and_then(|t| t.peer_certificate())
            .map(crate::tls::peer_names)
            .unwrap_or_default();
        let known = ctx.access.identify(&names).map(Box::<str>::from);
        // An unknown client is logged under its first name.
        self.identity = known.clone().or(names.first().map(|n| n.as_str().into()));
        self.decide(ctx, known.as_deref(), None, None)
    }

    /// Redis answered (or Redis changed state), or the wait is over
    /// (`patience_over`): the waiting client's rules are applied again.
    fn readmit(&mut self, ctx: &mut Context<'_>, patience_over: bool) -> Step {
        let mut waited = None;
        self.transition(ctx.census, |old| {
            let State::Admitting { deadline, ticket } = old else {
                unreachable!("only admitting pairs are admitted again");
            };
            waited = Some((deadline, ticket));
            State::Moving
        });
        let Some((deadline, ticket)) = waited else {
            unreachable!("taken above");
        };
        // Only a known identity waits; it is the one logged.
        let identity = self.identity.clone();
        let patience_over = patience_over || deadline <= ctx.now;
        let deadline = (!patience_over).then_some(deadline);
        self.decide(ctx, identity.as_deref(), Some(ticket), deadline)
    }

    /// Applies the client's rules; `deadline` is that of a wait already
    /// begun (`None` and a ticket: the wait is over, the fallback decides).
    fn decide(
        &mut self,
        ctx: &mut Context<'_>,
        identity: Option<&str>,
        ticket: Option<Ticket>,
        deadline: Option<Instant>,
    ) -> Step {
        let mode = match ctx.cluster {
            None => Mode::Alone,
            Some(_) if ticket.is_some() && deadline.is_none() => Mode::Fallback,
            Some(link) => link.mode(),
        };
        let verdict = ctx
            .access
            .admit(identity, &self.upstream.name, ctx.now, mode, ticket);
        if let (Some(ask), Some(link)) = (verdict.ask, ctx.cluster) {
            link.ask(ask);
        }
        match verdict.result {
            Ok(Admission::Admitted(lease)) => {
                self.client.lease = Some(lease);
                match self.place(ctx, Flow::default()) {
                    // Application data may have come with the handshake.
                    Step::Continue => self.advance(ctx),
                    step => step,
                }
            }
            Ok(Admission::Waiting(ticket)) => {
                let timeout = ctx.cluster.map_or(Duration::ZERO, |l| l.timeout);
                let deadline = deadline.unwrap_or(ctx.now + timeout);
                self.transition(ctx.census, |_| State::Admitting { deadline, ticket });
                Step::Continue
            }
            Err(denial) => self.refuse_with(ctx, Refusal::from(denial)),
        }
    }

    /// Gives the client's place in its rule's count back, once; with
    /// `[cluster]`, Redis is then asked to hold one place fewer.
    pub(super) fn release_client(&mut self, ctx: &mut Context<'_>) {
        let ask = self.client.lease.take().and_then(ClientLease::release);
        if let (Some(ask), Some(link)) = (ask, ctx.cluster) {
            link.ask(ask);
        }
    }

    /// Ends the pair: gives back what its state held (host count, client
    /// count, buffers), closes both sockets (with RST toward the other side
    /// of a reset, and wherever a FIN would pass a cut stream off as
    /// complete), and writes the access line.
    pub fn close(mut self, ctx: &mut Context<'_>, end: End) {
        let mut state = State::Moving;
        self.transition(ctx.census, |old| {
            state = old;
            State::Moving
        });
        // A pair passing a reset on ends with it, however it is cut short.
        let end = match &state {
            State::Resetting { end, .. } => *end,
            _ => end,
        };
        let [client_rst, host_rst] = abortive(end, &state);
        if client_rst {
            self.client.endpoint.abort();
        }
        self.release_client(ctx);
        let u = &mut *ctx.counters;
        let mut pools = Pools::new(ctx.pool, ctx.pipes);
        let duration = ctx.now.saturating_duration_since(self.started);
        let (bytes, host_addr) = match state {
            // The leases and buffers go with the state; the host socket
            // closes as it is dropped.
            State::Queued { since, mut up, .. } => {
                up.release(&mut pools);
                u.queue_waits
                    .observe(ctx.now.saturating_duration_since(since));
                ((0, 0), None)
            }
            State::Connecting { host, mut up, .. } | State::SendingHeader { host, mut up, .. } => {
                up.release(&mut pools);
                if host_rst {
                    host.endpoint.abort();
                }
                ((0, 0), Some(host.lease.host().addr))
            }
            State::Relaying {
                host,
                mut up,
                mut down,
                ..
            } => {
                up.release(&mut pools);
                down.release(&mut pools);
                u.durations.observe(duration);
                if host_rst {
                    host.endpoint.abort();
                }
                ((up.bytes, down.bytes), Some(host.lease.host().addr))
            }
            State::Resetting {
                host,
                host_record,
                wait,
                ..
            } => {
                if wait.unacked > 0 {
                    u.count_undelivered(u64::from(wait.unacked));
                }
                u.durations.observe(duration);
                if host_rst {
                    host.abort();
                }
                (wait.bytes, Some(host_record.addr))
            }
            State::ReadingHeader { .. }
            | State::Identified { .. }
            | State::Handshaking { .. }
            | State::Admitting { .. }
            | State::Refusing { .. }
            | State::Moving => ((0, 0), None),
        };
        *u.ended.entry(end.code()).or_default() += 1;
        if self.unlogged {
            return;
        }
        AccessLine {
            client: self.client_addr,
            via: self.via(),
            upstream: &self.upstream.name,
            host: host_addr,
            identity: self.identity.as_deref(),
            tls: self.client.tls.is_some(),
            bytes,
            duration,
            end: end.code(),
        }
        .log(ctx.settings.access_log);
    }
}

/// Which sockets close with RST (client, host): toward the other side of
/// a reset, on shutdown and removal, and wherever a FIN would pass a cut
/// stream off as complete.
fn abortive(end: End, state: &State) -> [bool; 2] {
    match end {
        End::Reset(side) => [side == Side::Host, side == Side::Client],
        End::Truncated => [false, true],
        End::Shutdown | End::HostDown | End::Removed => [true, true],
        End::IdleTimeout | End::HalfCloseTimeout => {
            let holds = matches!(state, State::Relaying { up, down, .. }
                if up.in_flight() > 0 || down.in_flight() > 0);
            [holds; 2]
        }
        End::Closed
        | End::Refused(_)
        | End::HandshakeFailed
        | End::HandshakeTimeout
        | End::HandshakeEvicted
        | End::ProxyHeaderInvalid
        | End::ProxyHeaderTimeout
        | End::TurnedAway(_) => [false, false],
    }
}
