//! The event loop: one `mio::Poll` that owns every listener, pair, host
//! counter, deadline and buffer of the process.
//!
//! Each turn: wait for readiness (or the next deadline), hand each event to
//! the pair or listener its token names, accept what the listeners have
//! queued (a bounded batch per listener per turn, so relaying is not
//! starved), then act on deadlines that have passed. Everything is plain
//! data reached through `&mut self`; nothing is shared with other threads
//! except the [`Handle`]'s command channel and waker.
//!
//! Invariants kept here:
//! - a host's connection count is acquired right before its connect starts
//!   and released exactly once, in [`Proxy::connect_failed`] or
//!   [`Proxy::close`];
//! - `refusing` counts pairs in [`Phase::Refusing`]; every other pair counts
//!   against `max_connections`;
//! - a socket is registered once, for READABLE | WRITABLE, when it is
//!   created; closing it (dropping the pair) removes it from the poll set.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use crate::access::{Access, Denial};
use crate::balance::{HostId, LoadBalancer};
use crate::buffer::BufferPool;
use crate::config::{Config, Settings};
use crate::endpoint::Endpoint;
use crate::error::Error;
use crate::limits::{SourceLimiter, Verdict};
use crate::net;
use crate::pair::{Connect, End, Pair, Phase, Refusal, Step};
use crate::secure::{ClientTls, Handshake};
use crate::timers::Timers;
use crate::tls::{self, TlsSettings};
use crate::token::{Side, Source};

/// Connections accepted from one listener per loop turn before the loop
/// goes back to relaying; the rest are taken next turn.
const ACCEPT_BATCH: usize = 128;
/// How long accepting pauses when the process runs out of descriptors.
const EXHAUSTION_BACKOFF: Duration = Duration::from_millis(100);
/// Refused clients that may linger (reading their error line) at once;
/// beyond this, refusals are written best-effort and closed at once.
const REFUSING_CAP: usize = 1024;
/// Free buffers kept for reuse, in bytes.
const POOL_KEEP_BYTES: usize = 4 * 1024 * 1024;
/// Every socket of a pair is registered once, for all it will ever need;
/// PRIORITY reports urgent data, which needs reading past a short read.
const PAIR_INTEREST: Interest = Interest::READABLE
    .add(Interest::WRITABLE)
    .add(Interest::PRIORITY);

/// At most one log line per period about a recurring condition, saying
/// how often it happened since the last line.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    unlogged: u64,
}

impl Throttle {
    const PERIOD: Duration = Duration::from_secs(1);

    /// `Some(times since the last line)` when a line may be logged now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
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

/// An upstream as the loop serves it.
#[derive(Debug)]
struct Upstream {
    name: String,
    listen: SocketAddr,
    balancer: LoadBalancer,
    /// Clients must complete an mTLS handshake and be admitted by `Access`.
    tls: bool,
}

#[derive(Debug)]
struct Listener {
    socket: TcpListener,
    upstream: usize,
    /// The listener may have connections queued: set by a readable edge,
    /// cleared only when `accept` says WouldBlock.
    pending: bool,
}

/// A request to the loop from another thread.
#[derive(Debug)]
enum Command {
    Shutdown,
    Stats(Sender<Stats>),
}

/// A snapshot of the loop's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Pairs that exist, in any phase.
    pub pairs: usize,
    /// Pairs refusing a client (not counted against `max_connections`).
    pub refusing: usize,
    /// Relay buffers currently held by pairs.
    pub buffers_in_use: usize,
    /// TLS handshakes in progress.
    pub handshakes: usize,
    pub upstreams: Vec<UpstreamStats>,
    /// Open connections per `[[client]]` identity.
    pub clients: Vec<(String, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamStats {
    pub name: String,
    pub listen: SocketAddr,
    pub hosts: Vec<HostStats>,
    /// Clients turned away, per reason (refusal code, `handshake_failed`,
    /// `handshake_timeout`, `source_rate_limited`, `handshake_capacity`).
    pub refused: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStats {
    pub addr: SocketAddr,
    /// Connections counted against the host (connecting or relaying).
    pub active: u32,
}

/// Talks to a running [`Proxy`] from another thread (tests, embedding).
#[derive(Debug, Clone)]
pub struct Handle {
    commands: Sender<Command>,
    waker: Arc<Waker>,
}

impl Handle {
    /// Starts a graceful shutdown, as SIGTERM does; a second call stops at once.
    pub fn shutdown(&self) {
        if self.commands.send(Command::Shutdown).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// The loop's counters, or `None` once it has stopped.
    pub fn stats(&self) -> Option<Stats> {
        let (tx, rx) = mpsc::channel();
        self.commands.send(Command::Stats(tx)).ok()?;
        self.waker.wake().ok()?;
        rx.recv().ok()
    }
}

/// The load balancer: listeners bound, ready to [`run`](Proxy::run).
pub struct Proxy {
    poll: Poll,
    settings: Settings,
    upstreams: Vec<Upstream>,
    listeners: Vec<Listener>,
    pairs: Slab<Pair>,
    timers: Timers,
    pool: BufferPool,
    next_id: u64,
    refusing: usize,
    /// Pairs that stopped relaying only because their budget ran out, with
    /// their ids (a slot may be reused before they are driven again).
    runnable: Vec<(usize, u64)>,
    accept_paused_until: Option<Instant>,
    exhaustion_log: Throttle,
    /// TLS material, when any upstream speaks TLS.
    tls: Option<(Arc<rustls::ServerConfig>, TlsSettings)>,
    /// Pairs in the handshake phase.
    handshaking: usize,
    access: Access,
    sources: Option<SourceLimiter>,
    /// Connections closed at accept (source rate, handshake capacity).
    drop_log: Throttle,
    /// Refusals and failed handshakes, per (upstream, reason).
    refused: BTreeMap<(usize, &'static str), u64>,
    drain_deadline: Option<Instant>,
    stop_now: bool,
    signals: Option<Signals>,
    commands: Receiver<Command>,
    handle: Handle,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstreams", &self.upstreams)
            .field("pairs", &self.pairs.len())
            .field("refusing", &self.refusing)
            .field("draining", &self.drain_deadline.is_some())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Binds every upstream's listen address. Nothing is accepted until [`run`](Proxy::run).
    pub fn bind(config: &Config) -> Result<Proxy, Error> {
        let setup = |what| move |source| Error::Setup { what, source };
        let tls = match &config.tls {
            Some(settings) => Some((settings.server_config()?, settings.clone())),
            None => None,
        };
        let poll = Poll::new().map_err(setup("the poller"))?;
        let waker =
            Waker::new(poll.registry(), Source::Control.token()).map_err(setup("the waker"))?;
        let (tx, commands) = mpsc::channel();
        let settings = config.settings.clone();
        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        let mut listeners = Vec::with_capacity(config.upstreams.len());
        for (index, u) in config.upstreams.iter().enumerate() {
            let bind_error = |source| Error::Bind {
                upstream: u.name.clone(),
                addr: u.listen,
                source,
            };
            let mut socket = listen(u.listen, settings.backlog).map_err(bind_error)?;
            let local = socket.local_addr().map_err(bind_error)?;
            poll.registry()
                .register(
                    &mut socket,
                    Source::Listener(index).token(),
                    Interest::READABLE,
                )
                .map_err(bind_error)?;
            listeners.push(Listener {
                socket,
                upstream: index,
                pending: false,
            });
            upstreams.push(Upstream {
                name: u.name.clone(),
                listen: local,
                balancer: LoadBalancer::new(u.hosts.clone()),
                tls: u.tls,
            });
        }
        let pool = BufferPool::new(
            settings.buffer_size,
            settings.bulk_buffer(),
            POOL_KEEP_BYTES,
        );
        Ok(Proxy {
            poll,
            pool,
            settings,
            upstreams,
            listeners,
            pairs: Slab::new(),
            timers: Timers::default(),
            next_id: 1,
            refusing: 0,
            runnable: Vec::new(),
            accept_paused_until: None,
            exhaustion_log: Throttle::default(),
            tls,
            handshaking: 0,
            access: Access::new(config.clients.clone()),
            sources: config.settings.source_limit.map(SourceLimiter::new),
            drop_log: Throttle::default(),
            refused: BTreeMap::new(),
            drain_deadline: None,
            stop_now: false,
            signals: None,
            commands,
            handle: Handle {
                commands: tx,
                waker: Arc::new(waker),
            },
        })
    }

    /// The address an upstream actually listens on (useful with port 0).
    pub fn listen_addr(&self, upstream: &str) -> Option<SocketAddr> {
        self.upstreams
            .iter()
            .find(|u| u.name == upstream)
            .map(|u| u.listen)
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Makes SIGINT and SIGTERM start a graceful shutdown (a second one stops at once).
    pub fn handle_signals(&mut self) -> Result<(), Error> {
        let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(|source| Error::Setup {
            what: "signal handling",
            source,
        })?;
        self.poll
            .registry()
            .register(&mut signals, Source::Signals.token(), Interest::READABLE)
            .map_err(|source| Error::Setup {
                what: "signal handling",
                source,
            })?;
        self.signals = Some(signals);
        Ok(())
    }

    /// Serves until a shutdown (signal or [`Handle::shutdown`]) has drained.
    pub fn run(mut self) -> Result<(), Error> {
        for u in &self.upstreams {
            let hosts: Vec<String> = (0..u.balancer.len())
                .map(|h| u.balancer.addr(h).to_string())
                .collect();
            info!(
                "upstream `{}` listening on {} -> {}",
                u.name,
                u.listen,
                hosts.join(", ")
            );
        }
        info!(
            "tcplb {} ready: max_connections={} buffer_size={} bulk_buffer_size={} connect_timeout={:?} idle_timeout={:?}",
            env!("CARGO_PKG_VERSION"),
            self.settings.max_connections,
            self.settings.buffer_size,
            self.settings.bulk_buffer(),
            self.settings.connect_timeout,
            self.settings.idle_timeout,
        );
        let mut events = Events::with_capacity(1024);
        let mut now = Instant::now();
        loop {
            let timeout = self.poll_timeout(now);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Setup {
                    what: "polling",
                    source: e,
                });
            }
            now = Instant::now();
            for event in events.iter() {
                match Source::of(event.token()) {
                    Some(Source::Pair(key, side)) => self.on_pair_event(key, side, event, now),
                    Some(Source::Listener(index)) => {
                        if let Some(listener) = self.listeners.get_mut(index) {
                            listener.pending = true;
                        }
                    }
                    Some(Source::Signals) => self.on_signals(now),
                    Some(Source::Control) => self.on_commands(now),
                    None => {}
                }
            }
            self.continue_runnable(now);
            self.accept(now);
            self.expire(now);
            if self.stop_now
                || self
                    .drain_deadline
                    .is_some_and(|d| self.pairs.is_empty() || now >= d)
            {
                break;
            }
        }
        let left = self.pairs.len();
        if left > 0 {
            warn!("drain period over: closing {left} remaining connections");
        }
        let keys: Vec<usize> = self.pairs.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(key, End::Shutdown, now);
        }
        info!("tcplb stopped");
        Ok(())
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.runnable.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut next = self.timers.next();
        let mut earliest = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        match self.accept_paused_until {
            Some(resume) => earliest(resume),
            None if self.listeners.iter().any(|l| l.pending) => return Some(Duration::ZERO),
            None => {}
        }
        if let Some(deadline) = self.drain_deadline {
            earliest(deadline);
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    fn on_pair_event(&mut self, key: usize, side: Side, event: &mio::event::Event, now: Instant) {
        let Some(endpoint) = self.pairs.get_mut(key).and_then(|p| p.endpoint(side)) else {
            return;
        };
        endpoint.on_event(event);
        self.drive(key, now);
    }

    /// Advances a pair after its sockets' readiness changed.
    fn drive(&mut self, key: usize, now: Instant) {
        let pair = &mut self.pairs[key];
        let connecting = matches!(pair.phase, Phase::Connecting { .. });
        if connecting && pair.client_failed() {
            return self.close(key, End::Reset(Side::Client), now);
        }
        let step = match pair.phase {
            Phase::Handshaking { .. } => match pair.handshake() {
                Handshake::Pending => Step::Continue,
                Handshake::Done => return self.handshake_done(key, now),
                Handshake::Failed(reason) => {
                    let u = &self.upstreams[pair.upstream].name;
                    info!(
                        "{} `{u}` refused: handshake_failed ({reason})",
                        pair.client_addr
                    );
                    *self
                        .refused
                        .entry((pair.upstream, "handshake_failed"))
                        .or_default() += 1;
                    Step::Finish(End::HandshakeFailed)
                }
                Handshake::Gone => Step::Finish(End::Reset(Side::Client)),
            },
            Phase::Connecting { host, .. } => match pair.check_connect() {
                Connect::Pending => Step::Continue,
                Connect::Failed(e) => return self.connect_failed(key, e, now),
                Connect::Established => {
                    let u = &self.upstreams[pair.upstream];
                    debug!(
                        "pair #{}: connected to {} ({})",
                        pair.id,
                        u.balancer.addr(host),
                        u.name
                    );
                    pair.connected(host, now);
                    pair.relay(&mut self.pool, now)
                }
            },
            Phase::Relaying { .. } => pair.relay(&mut self.pool, now),
            Phase::Refusing { .. } => pair.refuse(),
        };
        match step {
            Step::Continue => self.schedule(key),
            Step::Again => {
                self.schedule(key);
                self.runnable.push((key, self.pairs[key].id));
            }
            Step::Finish(end) => self.close(key, end, now),
        }
    }

    /// Drives the pairs whose relay budget ran out last turn.
    fn continue_runnable(&mut self, now: Instant) {
        let runnable = std::mem::take(&mut self.runnable);
        for (key, id) in runnable {
            if self.pairs.get(key).is_some_and(|p| p.id == id) {
                self.drive(key, now);
            }
        }
    }

    /// Makes sure the timer heap holds an entry no later than the pair's deadline.
    fn schedule(&mut self, key: usize) {
        let pair = &mut self.pairs[key];
        let deadline = pair.deadline(&self.settings);
        if pair.scheduled.is_none_or(|s| deadline < s) {
            pair.scheduled = Some(deadline);
            self.timers.push(deadline, key, pair.id);
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((when, key, id)) = self.timers.pop_due(now) {
            let Some(pair) = self.pairs.get_mut(key) else {
                continue;
            };
            if pair.id != id || pair.scheduled != Some(when) {
                continue;
            }
            pair.scheduled = None;
            if pair.deadline(&self.settings) > now {
                self.schedule(key);
                continue;
            }
            match pair.phase {
                Phase::Connecting { .. } => {
                    let e = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    self.connect_failed(key, e, now);
                }
                Phase::Relaying { .. } => {
                    let end = pair.expiry();
                    self.close(key, end, now);
                }
                Phase::Refusing { refusal, .. } => self.close(key, End::Refused(refusal), now),
                Phase::Handshaking { .. } => {
                    let upstream = pair.upstream;
                    debug!("{} handshake timed out", pair.client_addr);
                    self.count_refusal(upstream, "handshake_timeout");
                    self.close(key, End::HandshakeTimeout, now);
                }
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        if let Some(resume) = self.accept_paused_until {
            if now < resume {
                return;
            }
            self.accept_paused_until = None;
        }
        for index in 0..self.listeners.len() {
            for _ in 0..ACCEPT_BATCH {
                let listener = &mut self.listeners[index];
                if !listener.pending {
                    break;
                }
                match listener.socket.accept() {
                    Ok((stream, addr)) => {
                        let upstream = listener.upstream;
                        self.admit(upstream, stream, addr, now);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => listener.pending = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if net::is_resource_exhaustion(&e) => {
                        self.pause_accepting(&e, now);
                        return;
                    }
                    // A connection that died in the queue (ECONNABORTED and the like).
                    Err(e) => debug!("accept failed: {e}"),
                }
            }
        }
    }

    /// Stops accepting for a moment instead of spinning on EMFILE/ENFILE;
    /// pairs keep being served and freed descriptors let accepting resume.
    fn pause_accepting(&mut self, e: &io::Error, now: Instant) {
        self.accept_paused_until = Some(now + EXHAUSTION_BACKOFF);
        if let Some(times) = self.exhaustion_log.allow(now) {
            warn!(
                "out of descriptors or socket memory ({e}); pausing accepts for {:?} \
                 ({times} more times since the last report), {} connections open",
                EXHAUSTION_BACKOFF,
                self.pairs.len()
            );
        }
    }

    /// Takes in a new client: starts its TLS handshake, or connects it to
    /// a host, or refuses it.
    fn admit(&mut self, upstream: usize, mut stream: TcpStream, addr: SocketAddr, now: Instant) {
        if let Some(why) = self.turn_away(upstream, addr, now) {
            self.count_refusal(upstream, why);
            if let Some(times) = self.drop_log.allow(now) {
                let u = &self.upstreams[upstream].name;
                warn!(
                    "closing new connections at accept: {addr} on `{u}`: {why} ({times} more since the last report)"
                );
            }
            return;
        }
        net::prepare(&stream);
        let key = self.pairs.vacant_entry().key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Source::Pair(key, Side::Client).token(),
            PAIR_INTEREST,
        ) {
            warn!("cannot register client {addr}: {e}");
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        if let (true, Some((config, settings))) = (self.upstreams[upstream].tls, &self.tls) {
            let session = match ClientTls::new(config.clone(), self.settings.bulk_buffer()) {
                Ok(session) => session,
                Err(e) => return warn!("cannot start a TLS session for {addr}: {e}"),
            };
            let phase = Phase::Handshaking {
                deadline: now + settings.handshake_timeout,
            };
            let mut pair = Pair::new(id, upstream, stream, addr, phase, now);
            pair.tls = Some(session);
            self.pairs.insert(pair);
            self.handshaking += 1;
            return self.schedule(key);
        }
        match self.place(upstream, key, now) {
            Ok((host, phase)) => {
                let mut pair = Pair::new(id, upstream, stream, addr, phase, now);
                pair.host = Some(host);
                self.pairs.insert(pair);
                self.schedule(key);
            }
            Err(refusal) => {
                let phase = Phase::refusing(refusal, now);
                self.pairs
                    .insert(Pair::new(id, upstream, stream, addr, phase, now));
                self.refused(key, now);
            }
        }
    }

    /// Why a new connection must be closed at once, before any work on it:
    /// its source is over its rate, or too many handshakes are under way.
    fn turn_away(
        &mut self,
        upstream: usize,
        addr: SocketAddr,
        now: Instant,
    ) -> Option<&'static str> {
        if let Some(sources) = self.sources.as_mut() {
            if let Verdict::Limited { .. } = sources.check(addr.ip(), now) {
                return Some("source_rate_limited");
            }
        }
        let max_handshakes = self
            .tls
            .as_ref()
            .map_or(usize::MAX, |(_, s)| s.max_handshakes);
        if self.upstreams[upstream].tls && self.handshaking >= max_handshakes {
            return Some("handshake_capacity");
        }
        None
    }

    /// Pairs that count against `max_connections`: connecting or relaying.
    fn active(&self) -> usize {
        self.pairs.len() - self.refusing - self.handshaking
    }

    /// A host connect for a new pair, unless `max_connections` is reached.
    fn place(
        &mut self,
        upstream: usize,
        key: usize,
        now: Instant,
    ) -> Result<(Endpoint, Phase), Refusal> {
        if self.active() >= self.settings.max_connections {
            let u = &self.upstreams[upstream].name;
            warn!(
                "`{u}`: max_connections ({}) reached",
                self.settings.max_connections
            );
            return Err(Refusal::Overloaded);
        }
        self.start_connect(upstream, key, Vec::new(), now)
    }

    /// The TLS handshake of pair `key` is done: identify the client, apply
    /// its rules, then connect it to a host or refuse it.
    fn handshake_done(&mut self, key: usize, now: Instant) {
        self.handshaking -= 1;
        let pair = &mut self.pairs[key];
        let upstream = pair.upstream;
        let names = pair
            .tls
            .as_ref()
            .and_then(|t| t.peer_certificate())
            .map(tls::peer_names)
            .unwrap_or_default();
        let identity = self
            .access
            .identify(&names)
            .or(names.first().map(String::as_str));
        pair.identity = identity.map(Into::into);
        let known = self.access.identify(&names);
        let verdict = self
            .access
            .admit(known, &self.upstreams[upstream].name, now);
        let placed = match verdict {
            Ok(client) => {
                self.pairs[key].client_id = Some(client);
                self.place(upstream, key, now)
            }
            Err(Denial::Unauthorized { .. }) => Err(Refusal::Unauthorized),
            Err(Denial::RateLimited { retry_after }) => Err(Refusal::RateLimited {
                retry_after_secs: retry_after.as_secs_f64().ceil().max(1.0) as u64,
            }),
            Err(Denial::TooManyConnections) => Err(Refusal::TooManyConnections),
        };
        let pair = &mut self.pairs[key];
        match placed {
            Ok((host, phase)) => {
                pair.host = Some(host);
                pair.phase = phase;
                // Application data may have come with the handshake.
                self.drive(key, now);
            }
            Err(refusal) => {
                pair.phase = Phase::refusing(refusal, now);
                self.refused(key, now);
            }
        }
    }

    fn count_refusal(&mut self, upstream: usize, reason: &'static str) {
        *self.refused.entry((upstream, reason)).or_default() += 1;
    }

    /// Connects to the best host not in `tried`, moving down the candidates
    /// while connects fail at once. Returns the socket and the phase, or the
    /// refusal to give the client when no host is left.
    fn start_connect(
        &mut self,
        upstream: usize,
        key: usize,
        mut tried: Vec<HostId>,
        now: Instant,
    ) -> Result<(Endpoint, Phase), Refusal> {
        let u = &mut self.upstreams[upstream];
        while let Some(host) = u.balancer.pick(&tried, now) {
            let addr = u.balancer.addr(host);
            u.balancer.acquire(host);
            let attempt = TcpStream::connect(addr).and_then(|mut stream| {
                net::prepare(&stream);
                self.poll.registry().register(
                    &mut stream,
                    Source::Pair(key, Side::Upstream).token(),
                    PAIR_INTEREST,
                )?;
                Ok(stream)
            });
            match attempt {
                Ok(stream) => {
                    let deadline = now + self.settings.connect_timeout;
                    return Ok((
                        Endpoint::new(stream),
                        Phase::Connecting {
                            host,
                            tried,
                            deadline,
                        },
                    ));
                }
                Err(e) => {
                    u.balancer.release(host);
                    if net::is_resource_exhaustion(&e) {
                        warn!("`{}`: cannot open a socket to {addr}: {e}", u.name);
                        return Err(Refusal::Overloaded);
                    }
                    warn!("`{}`: connect to {addr} failed: {e}", u.name);
                    tried.push(host);
                }
            }
        }
        Err(Refusal::UpstreamUnavailable)
    }

    /// A connect in flight failed or timed out: release the host and move
    /// on to the next candidate, or refuse the client when none is left.
    fn connect_failed(&mut self, key: usize, e: io::Error, now: Instant) {
        let pair = &mut self.pairs[key];
        let Phase::Connecting { host, tried, .. } = &mut pair.phase else {
            return;
        };
        let (host, mut tried) = (*host, std::mem::take(tried));
        let u = &mut self.upstreams[pair.upstream];
        u.balancer.release(host);
        warn!(
            "`{}`: connect to {} failed: {e}",
            u.name,
            u.balancer.addr(host)
        );
        tried.push(host);
        pair.host = None;
        let upstream = pair.upstream;
        let next = self.start_connect(upstream, key, tried, now);
        let pair = &mut self.pairs[key];
        match next {
            Ok((endpoint, phase)) => {
                pair.host = Some(endpoint);
                pair.phase = phase;
                self.schedule(key);
            }
            Err(refusal) => {
                pair.phase = Phase::refusing(refusal, now);
                self.refused(key, now);
            }
        }
    }

    /// A pair has just entered the refusing phase: log it once, count it,
    /// and send the line.
    fn refused(&mut self, key: usize, now: Instant) {
        let pair = &mut self.pairs[key];
        let Phase::Refusing { refusal, .. } = pair.phase else {
            return;
        };
        let upstream = pair.upstream;
        let u = &self.upstreams[upstream].name;
        let fingerprint = pair
            .tls
            .as_ref()
            .and_then(|t| t.peer_certificate())
            .map(tls::fingerprint);
        info!(
            "{} `{u}` refused: {} identity={} cert_sha256={}",
            pair.client_addr,
            refusal.code(),
            pair.identity.as_deref().unwrap_or("-"),
            fingerprint.as_deref().unwrap_or("-"),
        );
        // A fresh socket can take a short line: try now rather than a turn later.
        pair.client.assume_writable();
        self.refusing += 1;
        self.count_refusal(upstream, refusal.code());
        if self.refusing > REFUSING_CAP {
            // Too many lingering refusals already: say it once and close.
            let _ = self.pairs[key].refuse();
            return self.close(key, End::Refused(refusal), now);
        }
        self.drive(key, now);
    }

    /// Ends a pair: releases its host exactly once, returns its buffers, logs
    /// the access line and closes both sockets (with RST toward the other
    /// side when one side reset).
    fn close(&mut self, key: usize, end: End, now: Instant) {
        let mut pair = self.pairs.remove(key);
        let u = &mut self.upstreams[pair.upstream];
        let host = match pair.phase {
            Phase::Connecting { host, .. } | Phase::Relaying { host } => {
                u.balancer.release(host);
                u.balancer.addr(host).to_string()
            }
            Phase::Refusing { .. } => {
                self.refusing -= 1;
                "-".to_string()
            }
            Phase::Handshaking { .. } => {
                self.handshaking -= 1;
                "-".to_string()
            }
        };
        if let Some(client) = pair.client_id.take() {
            self.access.release(client);
        }
        // RST instead of FIN wherever a FIN would pass a cut stream off as
        // complete: toward the other side of a reset, on shutdown, and on a
        // timeout that leaves undelivered bytes behind.
        let abort = match end {
            End::Reset(side) => [side == Side::Upstream, side == Side::Client],
            End::IdleTimeout | End::HalfCloseTimeout => [pair.holds_bytes(); 2],
            End::Shutdown => [true, true],
            End::Closed | End::Refused(_) | End::HandshakeFailed | End::HandshakeTimeout => {
                [false, false]
            }
        };
        for (side, abort) in [Side::Client, Side::Upstream].into_iter().zip(abort) {
            if let Some(endpoint) = pair.endpoint(side).filter(|_| abort) {
                net::set_abortive_close(&endpoint.stream);
            }
        }
        pair.release_buffers(&mut self.pool);
        let (up, down) = pair.bytes();
        info!(
            target: "tcplb::access",
            "{} `{}` identity={} host={} up={} down={} ms={} end={}",
            pair.client_addr,
            u.name,
            pair.identity.as_deref().unwrap_or("-"),
            host,
            up,
            down,
            now.saturating_duration_since(pair.started).as_millis(),
            end
        );
    }

    fn on_signals(&mut self, now: Instant) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let count = signals.pending().count();
        for _ in 0..count {
            self.shutdown(now);
        }
    }

    fn on_commands(&mut self, now: Instant) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Shutdown => self.shutdown(now),
                Command::Stats(reply) => {
                    let _ = reply.send(self.stats());
                }
            }
        }
    }

    /// First call: stop accepting and start the drain period. Second call: stop now.
    fn shutdown(&mut self, now: Instant) {
        if self.drain_deadline.is_some() {
            info!("second shutdown request: stopping now");
            self.stop_now = true;
            return;
        }
        for mut listener in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut listener.socket);
        }
        self.drain_deadline = Some(now + self.settings.drain_timeout);
        info!(
            "shutting down: no longer accepting; draining {} connections for up to {:?}",
            self.pairs.len(),
            self.settings.drain_timeout
        );
    }

    fn stats(&self) -> Stats {
        Stats {
            pairs: self.pairs.len(),
            refusing: self.refusing,
            buffers_in_use: self.pool.in_use(),
            handshakes: self.handshaking,
            clients: self
                .access
                .active()
                .map(|(id, n)| (id.to_string(), n))
                .collect(),
            upstreams: self
                .upstreams
                .iter()
                .enumerate()
                .map(|(index, u)| UpstreamStats {
                    name: u.name.clone(),
                    listen: u.listen,
                    refused: self
                        .refused
                        .range((index, "")..)
                        .take_while(|((i, _), _)| *i == index)
                        .map(|((_, reason), n)| (reason.to_string(), *n))
                        .collect(),
                    hosts: (0..u.balancer.len())
                        .map(|h| HostStats {
                            addr: u.balancer.addr(h),
                            active: u.balancer.active(h),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// A non-blocking listening socket with the configured backlog.
fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(TcpListener::from_std(socket.into()))
}
