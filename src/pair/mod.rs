//! The life of one connection pair, as one state machine whose states own
//! their resources: the socket to a host and its count exist only while
//! connecting or relaying, buffers only while relaying, and so on.
//!
//! ```text
//!   accept ─┬─(TLS upstream)──> Handshaking ──(verified, admitted)──┐
//!           │                        │                              │
//!           │                  (TLS failure, timeout) ──> closed    │
//!           └─(plain upstream)───────────────────────────────────── ┴──> Connecting
//!                                                                          │  ▲ (connect failed:
//!   Refusing <──(refused, or no host left)─────────────────────────────────┤  └── next candidate)
//!      │                                                              (connected)
//!      └──(line sent, client's FIN, or deadline)──> closed                 ▼
//!                                                                       Relaying ──(both flows done)──> closed
//!                                                                          │
//!                                              (one side reset, its bytes delivered)
//!                                                                          ▼
//!                                 Resetting ──(receiver acknowledged, or bound)──> closed (RST passed on)
//! ```
//!
//! The loop hands a pair readiness events and deadlines; the pair decides
//! its next step with a narrow [`Context`] (buffer and pipe pools, registry, its
//! upstream's hosts, the client rules, settings, `now`). Every change of
//! state goes through [`Pair::transition`], which keeps the [`Census`] (how
//! many pairs are in each state) and logs the change; [`Pair::close`] is
//! the one way out, and gives back everything the last state held.

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

use crate::config::Settings;
use crate::io::Endpoint;
use crate::io::buffer::BufferPool;
use crate::io::flow::{Flow, Pools};
use crate::io::pipe::PipePool;
use crate::io::send_queue::SendQueues;
use crate::io::tls_session::{Handshake, TlsSession};
use crate::logs::{RefusalLog, Throttle};
use crate::policy::access::{Access, ClientLease};
use crate::policy::balance::{Host, HostLease};
use crate::policy::capacity::{Capacity, ConnectionSlot, HandshakeSlot};
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
    /// The TLS handshake of a client of a TLS upstream is in progress.
    Handshaking {
        deadline: Instant,
        /// Its place under the handshake caps, held until the state ends.
        _slot: HandshakeSlot,
    },
    /// A connect to a host is in flight; `tried` lists hosts that already
    /// failed for this client (allocated only after a failure).
    Connecting {
        host: HostConn,
        tried: Vec<SocketAddr>,
        deadline: Instant,
        /// Client to host: filled only if the client reset meanwhile (what
        /// it sent before is read, to be delivered once connected).
        up: Flow,
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
    Handshaking,
    Connecting,
    Relaying,
    Resetting,
    Refusing,
}

impl State {
    fn kind(&self) -> Option<Kind> {
        Some(match self {
            State::Handshaking { .. } => Kind::Handshaking,
            State::Connecting { .. } => Kind::Connecting,
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
    counts: [usize; 5],
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
    pub client_addr: SocketAddr,
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

impl Pair {
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

    /// A new plain client: connected to a host, or refused.
    pub fn connecting(
        id: u64,
        upstream: Arc<Upstream>,
        client: (Endpoint, SocketAddr),
        ctx: &mut Context<'_>,
    ) -> (Pair, Step) {
        let mut pair = Pair::new(id, upstream, client, None, ctx.now);
        let step = pair.place(ctx);
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
            (Side::Host, State::Connecting { host, .. } | State::Relaying { host, .. }) => {
                Some(&mut host.endpoint)
            }
            (Side::Host, State::Resetting { host, .. }) => Some(host),
            (Side::Host, _) => None,
        }
    }

    /// Whether its TLS handshake is in progress.
    pub fn is_handshaking(&self) -> bool {
        matches!(self.state, State::Handshaking { .. })
    }

    /// The host this pair counts against, while connecting or relaying.
    pub fn host(&self) -> Option<&Arc<Host>> {
        match &self.state {
            State::Connecting { host, .. } | State::Relaying { host, .. } => {
                Some(host.lease.host())
            }
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
            State::Handshaking { deadline, .. }
            | State::Connecting { deadline, .. }
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
            State::Handshaking { .. } => self.handshake(ctx),
            State::Connecting { .. } => self.check_connect(ctx),
            State::Relaying { .. } => self.relay(ctx),
            State::Resetting { .. } => self.drain_while_resetting(ctx),
            State::Refusing { .. } => self.refuse(ctx),
            State::Moving => unreachable!("no pair rests while moving"),
        }
    }

    /// Acts on the pair's own deadline, which has passed.
    pub fn expire(&mut self, ctx: &mut Context<'_>) -> Step {
        match self.state {
            State::Handshaking { .. } => {
                debug!("{} handshake timed out", self.client_addr);
                let refusals = &mut ctx.logs.refusals;
                self.count_silent_refusal("handshake_timeout", ctx.counters, refusals, ctx.now);
                Step::Finish(End::HandshakeTimeout)
            }
            State::Connecting { .. } => {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
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
            Handshake::Failed(reason) => {
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
            Handshake::Gone => Step::Finish(End::Reset(Side::Client)),
        }
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
    /// then connect it to a host or refuse it.
    fn admit(&mut self, ctx: &mut Context<'_>) -> Step {
        let names = self
            .client
            .tls
            .as_ref()
            .and_then(|t| t.peer_certificate())
            .map(crate::tls::peer_names)
            .unwrap_or_default();
        let known = ctx.access.identify(&names);
        // An unknown client is logged under its first name.
        self.identity = known.or(names.first().map(String::as_str)).map(Into::into);
        match ctx.access.admit(known, &self.upstream.name, ctx.now) {
            Ok(lease) => {
                self.client.lease = Some(lease);
                match self.place(ctx) {
                    // Application data may have come with the handshake.
                    Step::Continue => self.advance(ctx),
                    step => step,
                }
            }
            Err(denial) => self.refuse_with(ctx, Refusal::from(denial)),
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
        let u = &mut *ctx.counters;
        let mut pools = Pools::new(ctx.pool, ctx.pipes);
        let duration = ctx.now.saturating_duration_since(self.started);
        let (bytes, host_addr) = match state {
            // The leases and buffers go with the state; the host socket
            // closes as it is dropped.
            State::Connecting { host, mut up, .. } => {
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
            State::Handshaking { .. } | State::Refusing { .. } | State::Moving => ((0, 0), None),
        };
        *u.ended.entry(end.code()).or_default() += 1;
        if self.unlogged {
            return;
        }
        // Only a TLS client has an identity to log (`-` for one without).
        let (label, identity) = match &self.client.tls {
            Some(_) => (" identity=", self.identity.as_deref().unwrap_or("-")),
            None => ("", ""),
        };
        info!(
            target: "tcplb::access",
            "{} `{}`{label}{identity} host={} up={} down={} ms={} end={}",
            self.client_addr,
            self.upstream.name,
            host_addr.map_or("-".to_string(), |a| a.to_string()),
            bytes.0,
            bytes.1,
            duration.as_millis(),
            end
        );
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
        | End::HandshakeEvicted => [false, false],
    }
}
