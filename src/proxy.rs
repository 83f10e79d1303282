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
//! Health checks live in `proxy/checks.rs`; the admin endpoint, signals,
//! commands, counters snapshot and reload in `proxy/control.rs`.
//!
//! Invariants kept here:
//! - a host's connection count is acquired right before its connect starts
//!   and released exactly once, in [`Proxy::connect_failed`] or
//!   [`Proxy::close`]; likewise a client rule's count (`client_id`);
//! - `refusing` and `handshaking` count pairs in those phases; every other
//!   pair counts against `max_connections`;
//! - upstreams and hosts keep their index for the process's life (a reload
//!   marks them removed), since pairs, probes and timers refer to them;
//! - a socket is registered once, for everything it will need, when it is
//!   created; closing it (dropping its owner) removes it from the poll set.

mod checks;
mod control;

pub use control::Handle;

/// See [`Proxy::set_config_adjust`].
type AdjustConfig = Box<dyn Fn(Config) -> Result<Config, Error> + Send>;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use crate::access::{Access, Denial};
use crate::admin::AdminConn;
use crate::balance::HostId;
use crate::buffer::BufferPool;
use crate::config::{Config, Settings, UpstreamConfig};
use crate::endpoint::{Connect, Endpoint};
use crate::error::Error;
use crate::limits::{SourceLimiter, Verdict, source_key};
use crate::net;
use crate::pair::{End, Pair, Phase, Refusal, Step};
use crate::probe::Probe;
use crate::secure::{ClientTls, Handshake};
use crate::send_queue::SendQueues;
use crate::timers::Timers;
use crate::tls::{self, TlsSettings};
use crate::token::{Side, Source};
use crate::upstream::Upstream;

/// Connections accepted from one listener per loop turn before the loop
/// goes back to relaying; the rest are taken next turn.
const ACCEPT_BATCH: usize = 128;
/// How long accepting pauses when the process runs out of descriptors.
const EXHAUSTION_BACKOFF: Duration = Duration::from_millis(100);
/// Refused clients that may linger (reading their error line) at once;
/// beyond this, refusals are written best-effort and closed at once.
const REFUSING_CAP: usize = 1024;
/// How soon a pair passing a reset on first looks again at what the
/// receiver has not acknowledged, and the longest interval between looks
/// (the interval doubles): an ACK on loopback takes microseconds, a
/// delayed one 40 ms, one across a network a round trip.
const RESET_CHECK_FIRST: Duration = Duration::from_millis(1);
const RESET_CHECK_MAX: Duration = Duration::from_millis(50);
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

#[derive(Debug)]
struct Listener {
    socket: TcpListener,
    upstream: usize,
    /// The listener may have connections queued: set by a readable edge,
    /// cleared only when `accept` says WouldBlock.
    pending: bool,
}

/// The load balancer: listeners bound, ready to [`run`](Proxy::run).
pub struct Proxy {
    poll: Poll,
    settings: Settings,
    upstreams: Vec<Upstream>,
    listeners: Slab<Listener>,
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
    /// Pairs in the handshake phase, in all and per source (`source_key`).
    handshaking: usize,
    handshakes_by_source: HashMap<IpAddr, usize>,
    /// Failed handshakes, logged at most once a second.
    handshake_log: Throttle,
    /// Reads what peers have not acknowledged, before a reset is passed on.
    send_queues: SendQueues,
    send_queue_log: Throttle,
    access: Access,
    sources: Option<SourceLimiter>,
    /// Connections closed at accept (source rate, handshake capacity).
    drop_log: Throttle,
    /// Health probes in flight, and their deadlines.
    probes: Slab<Probe>,
    probe_timers: Timers,
    /// Hosts that went down this turn, whose pairs `close_on_down` closes.
    gone_down: Vec<(usize, usize)>,
    /// When each host's next check is due: (when, upstream, host).
    checks: BinaryHeap<Reverse<(Instant, usize, usize)>>,
    /// State of the jitter generator for check intervals.
    jitter: u64,
    admin: Option<TcpListener>,
    admin_conns: Slab<AdminConn>,
    admin_timers: Timers,
    /// The config file, re-read on SIGHUP and `POST /reload`.
    config_path: Option<PathBuf>,
    /// What the embedder changes in every config read from the file (the
    /// binary: its command-line overrides).
    adjust_config: Option<AdjustConfig>,
    /// The admin address in force (changing it needs a restart).
    config_admin: Option<SocketAddr>,
    started: Instant,
    reloads: u64,
    drain_deadline: Option<Instant>,
    stop_now: bool,
    signals: Option<Signals>,
    commands: Receiver<control::Command>,
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
        let mut listeners = Slab::with_capacity(config.upstreams.len());
        for (index, u) in config.upstreams.iter().enumerate() {
            let (listener, local) = bind_listener(&poll, &mut listeners, index, u, &settings)?;
            let mut upstream = Upstream::new(
                u.name.clone(),
                u.listen,
                local,
                u.hosts.clone(),
                u.tls,
                u.health.clone(),
            );
            upstream.listener = Some(listener);
            upstreams.push(upstream);
        }
        let admin = match config.admin {
            Some(addr) => {
                let mut socket = listen(addr, 64, None).map_err(|source| Error::Bind {
                    upstream: "admin".to_string(),
                    addr,
                    source,
                })?;
                poll.registry()
                    .register(
                        &mut socket,
                        Source::AdminListener.token(),
                        Interest::READABLE,
                    )
                    .map_err(setup("the admin listener"))?;
                if !addr.ip().is_loopback() {
                    warn!(
                        "the admin listener {addr} is not on loopback: anyone who reaches it can read metrics and reload"
                    );
                }
                Some(socket)
            }
            None => None,
        };
        let pool = BufferPool::new(
            settings.buffer_size,
            settings.bulk_buffer(),
            POOL_KEEP_BYTES,
        );
        let now = Instant::now();
        Ok(Proxy {
            poll,
            pool,
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
            handshakes_by_source: HashMap::new(),
            handshake_log: Throttle::default(),
            send_queues: SendQueues::new(),
            send_queue_log: Throttle::default(),
            access: Access::new(config.clients.clone()),
            sources: settings.source_limit.map(SourceLimiter::new),
            drop_log: Throttle::default(),
            probes: Slab::new(),
            probe_timers: Timers::default(),
            gone_down: Vec::new(),
            checks: BinaryHeap::new(),
            jitter: jitter_seed(),
            admin,
            admin_conns: Slab::new(),
            admin_timers: Timers::default(),
            config_path: None,
            adjust_config: None,
            config_admin: config.admin,
            started: now,
            reloads: 0,
            settings,
            drain_deadline: None,
            stop_now: false,
            signals: None,
            commands,
            handle: Handle::new(tx, Arc::new(waker)),
        })
    }

    /// The file to re-read on SIGHUP or `POST /reload`.
    pub fn set_config_path(&mut self, path: PathBuf) {
        self.config_path = Some(path);
    }

    /// Has every config a reload reads from the file pass through `adjust`
    /// before it is checked and applied, as the one given to [`Proxy::bind`]
    /// did: the binary re-applies its command-line overrides this way. An
    /// error rejects the reload.
    pub fn set_config_adjust(
        &mut self,
        adjust: impl Fn(Config) -> Result<Config, Error> + Send + 'static,
    ) {
        self.adjust_config = Some(Box::new(adjust));
    }

    /// The admin listener's address, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|a| a.local_addr().ok())
    }

    /// The address an upstream actually listens on (useful with port 0).
    pub fn listen_addr(&self, upstream: &str) -> Option<SocketAddr> {
        self.upstreams
            .iter()
            .find(|u| u.name == upstream && !u.removed)
            .map(|u| u.listen)
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Makes SIGINT and SIGTERM start a graceful shutdown (a second one
    /// stops at once), and SIGHUP reload the config file.
    pub fn handle_signals(&mut self) -> Result<(), Error> {
        let mut signals =
            Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|source| Error::Setup {
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

    /// Logs each live upstream's listen address and hosts (at start and
    /// after a reload).
    fn log_listening(&self) {
        for u in self.upstreams.iter().filter(|u| !u.removed) {
            let hosts: Vec<String> = (0..u.balancer.len())
                .filter(|&h| !u.balancer.is_removed(h))
                .map(|h| u.balancer.addr(h).to_string())
                .collect();
            info!(
                "upstream `{}` listening on {} -> {}",
                u.name,
                u.listen,
                hosts.join(", ")
            );
        }
    }

    /// Serves until a shutdown (signal or [`Handle::shutdown`]) has drained.
    pub fn run(mut self) -> Result<(), Error> {
        self.log_listening();
        info!(
            "tcplb {} ready: max_connections={} buffer_size={} bulk_buffer_size={} connect_timeout={:?} idle_timeout={:?}",
            env!("CARGO_PKG_VERSION"),
            self.settings.max_connections,
            self.settings.buffer_size,
            self.settings.bulk_buffer(),
            self.settings.connect_timeout,
            self.settings.idle_timeout,
        );
        if let Some(addr) = self.admin_addr() {
            info!("admin listening on {addr} (GET /metrics, GET /status, POST /reload)");
        }
        let mut events = Events::with_capacity(1024);
        let mut now = Instant::now();
        for upstream in 0..self.upstreams.len() {
            self.schedule_upstream_checks(upstream, now);
        }
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
                    Some(Source::Probe(key)) => self.on_probe_event(key, event, now),
                    Some(Source::Admin(key)) => self.on_admin_event(key, event, now),
                    Some(Source::AdminListener) => self.accept_admin(now),
                    Some(Source::Signals) => self.on_signals(now),
                    Some(Source::Control) => self.on_commands(now),
                    None => {}
                }
            }
            self.continue_runnable(now);
            self.accept(now);
            self.expire(now);
            self.run_checks(now);
            self.expire_admin(now);
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
            None if self.listeners.iter().any(|(_, l)| l.pending) => return Some(Duration::ZERO),
            None => {}
        }
        if let Some(deadline) = self.drain_deadline {
            earliest(deadline);
        }
        if let Some(Reverse((due, _, _))) = self.checks.peek() {
            earliest(*due);
        }
        for timers in [&self.probe_timers, &self.admin_timers] {
            if let Some(due) = timers.next() {
                earliest(due);
            }
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
        let (up_before, down_before) = pair.bytes();
        let step = match pair.phase {
            Phase::Handshaking { .. } => match pair.handshake() {
                Handshake::Pending => Step::Continue,
                Handshake::Done => return self.handshake_done(key, now),
                Handshake::Failed(reason) => {
                    let u = &mut self.upstreams[pair.upstream];
                    // Anyone can fail a handshake: throttled, not one line each.
                    if let Some(more) = self.handshake_log.allow(now) {
                        info!(
                            "{} `{}` refused: handshake_failed ({reason}) ({more} more since the last report)",
                            pair.client_addr, u.name
                        );
                    }
                    u.count_refusal("handshake_failed");
                    Step::Finish(End::HandshakeFailed)
                }
                Handshake::Gone => Step::Finish(End::Reset(Side::Client)),
            },
            Phase::Connecting { host, .. } => match pair.check_connect() {
                Connect::Pending => pair.while_connecting(&mut self.pool),
                Connect::Failed(e) => return self.connect_failed(key, e, now),
                Connect::Established => {
                    let upstream = pair.upstream;
                    pair.connected(host, now);
                    self.upstreams[upstream].hosts[host].connections += 1;
                    self.host_result(upstream, host, true, "", now);
                    self.pairs[key].relay(&mut self.pool, now)
                }
            },
            Phase::Relaying { .. } => pair.relay(&mut self.pool, now),
            Phase::Refusing { .. } => pair.refuse(),
            // Only its timer moves it on (see `check_reset`).
            Phase::Resetting { .. } => pair.drain_while_resetting(&mut self.pool),
        };
        let pair = &self.pairs[key];
        let (up, down) = pair.bytes();
        let u = &mut self.upstreams[pair.upstream];
        u.bytes_up += up - up_before;
        u.bytes_down += down - down_before;
        match step {
            Step::Continue => self.schedule(key),
            Step::Again => {
                self.schedule(key);
                self.runnable.push((key, self.pairs[key].id));
            }
            Step::Finish(End::Reset(side)) if self.wait_before_reset(key, side, now) => {}
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
            if pair.drain_by.is_some_and(|d| d <= now) {
                let u = &self.upstreams[pair.upstream];
                let removed = u.removed || pair.host_id().is_some_and(|h| u.balancer.is_removed(h));
                pair.drain_by = None;
                if removed {
                    self.close(key, End::Removed, now);
                } else {
                    // Its host or upstream came back in a later reload.
                    self.schedule(key);
                }
                continue;
            }
            match pair.phase {
                Phase::Connecting { .. } => {
                    let e = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    self.connect_failed(key, e, now);
                }
                Phase::Relaying { .. } => {
                    let end = pair.expiry();
                    if let End::Reset(side) = end {
                        // A side reset, and what it sent did not all reach
                        // the other within the half-close timeout.
                        let receiver = pair.endpoint(side.other());
                        let queued = receiver
                            .filter(|r| !r.is_broken())
                            .map_or(0, |r| self.send_queues.unacked(&r.stream).unwrap_or(0));
                        let lost = pair.undelivered() + u64::from(queued);
                        self.upstreams[pair.upstream].count_undelivered(lost);
                    }
                    self.close(key, end, now);
                }
                Phase::Refusing { refusal, .. } => self.close(key, End::Refused(refusal), now),
                Phase::Resetting { reset, .. } => self.check_reset(key, reset, now),
                Phase::Handshaking { .. } => {
                    debug!("{} handshake timed out", pair.client_addr);
                    self.upstreams[pair.upstream].count_refusal("handshake_timeout");
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
        let pending: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.pending)
            .map(|(key, _)| key)
            .collect();
        for index in pending {
            for _ in 0..ACCEPT_BATCH {
                let Some(listener) = self.listeners.get_mut(index) else {
                    break;
                };
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
            self.upstreams[upstream].count_refusal(why);
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
            self.handshake_started(addr);
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
        if let (true, Some((_, tls))) = (self.upstreams[upstream].tls, &self.tls) {
            if self.handshaking >= tls.max_handshakes {
                return Some("handshake_capacity");
            }
            let from_source = self.handshakes_by_source.get(&source_key(addr.ip()));
            if from_source.is_some_and(|&n| n >= tls.max_handshakes_per_source) {
                return Some("source_handshake_capacity");
            }
        }
        None
    }

    fn handshake_started(&mut self, client: SocketAddr) {
        self.handshaking += 1;
        *self
            .handshakes_by_source
            .entry(source_key(client.ip()))
            .or_default() += 1;
    }

    fn handshake_ended(&mut self, client: SocketAddr) {
        self.handshaking -= 1;
        let key = source_key(client.ip());
        if let Some(n) = self.handshakes_by_source.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.handshakes_by_source.remove(&key);
            }
        }
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
        if self.upstreams[upstream].balancer.healthy() == 0 {
            return Err(Refusal::NoHealthyHost);
        }
        self.start_connect(upstream, key, Vec::new(), now)
    }

    /// The TLS handshake of pair `key` is done: identify the client, apply
    /// its rules, then connect it to a host or refuse it.
    fn handshake_done(&mut self, key: usize, now: Instant) {
        self.handshake_ended(self.pairs[key].client_addr);
        let pair = &mut self.pairs[key];
        let upstream = pair.upstream;
        let names = pair
            .tls
            .as_ref()
            .and_then(|t| t.peer_certificate())
            .map(tls::peer_names)
            .unwrap_or_default();
        let known = self.access.identify(&names);
        // An unknown client is logged under its first name.
        let identity = known.or(names.first().map(String::as_str));
        pair.identity = identity.map(Into::into);
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
        while let Some(host) = self.upstreams[upstream].balancer.pick(&tried, now) {
            let u = &mut self.upstreams[upstream];
            let addr = u.balancer.addr(host);
            u.balancer.acquire(host);
            let attempt = net::connect(addr, self.settings.socket_buffer).and_then(|mut stream| {
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
                    let u = &mut self.upstreams[upstream];
                    u.balancer.release(host);
                    if net::is_resource_exhaustion(&e) {
                        warn!("`{}`: cannot open a socket to {addr}: {e}", u.name);
                        return Err(Refusal::Overloaded);
                    }
                    warn!("`{}`: connect to {addr} failed: {e}", u.name);
                    u.hosts[host].connect_failures += 1;
                    tried.push(host);
                    self.host_result(upstream, host, false, "connect failed", now);
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
        let upstream = pair.upstream;
        let u = &mut self.upstreams[upstream];
        u.balancer.release(host);
        u.hosts[host].connect_failures += 1;
        warn!(
            "`{}`: connect to {} failed: {e}",
            u.name,
            u.balancer.addr(host)
        );
        tried.push(host);
        pair.host = None;
        self.host_result(upstream, host, false, "connect failed", now);
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
        self.upstreams[upstream].count_refusal(refusal.code());
        if self.refusing > REFUSING_CAP {
            // Too many lingering refusals already: say it once and close.
            let _ = self.pairs[key].refuse();
            return self.close(key, End::Refused(refusal), now);
        }
        self.drive(key, now);
    }

    /// Before a relaying pair passes `reset`'s reset on: while the other
    /// side's peer has not acknowledged everything written to it, the pair
    /// waits in [`Phase::Resetting`] (returns true) instead of closing,
    /// with its host's count and its buffers already given back.
    fn wait_before_reset(&mut self, key: usize, reset: Side, now: Instant) -> bool {
        let pair = &mut self.pairs[key];
        let Phase::Relaying { host } = pair.phase else {
            return false;
        };
        let Some(receiver) = pair.endpoint(reset.other()).filter(|r| !r.is_broken()) else {
            return false;
        };
        let unacked = match self.send_queues.unacked(&receiver.stream) {
            Ok(n) => n,
            Err(e) => {
                if let Some(more) = self.send_queue_log.allow(now) {
                    warn!(
                        "cannot read a socket's send queue ({e}): resets are passed on at once, \
                         which may cut off bytes in flight ({more} more since the last report)"
                    );
                }
                0
            }
        };
        if unacked == 0 {
            return false;
        }
        let every = RESET_CHECK_FIRST;
        pair.phase = Phase::Resetting {
            host,
            reset,
            unacked,
            check: now + every,
            every,
            until: now + self.settings.half_close_timeout,
        };
        pair.release_buffers(&mut self.pool);
        if let Some(client) = pair.client_id.take() {
            self.access.release(client);
        }
        self.upstreams[pair.upstream].balancer.release(host);
        self.schedule(key);
        true
    }

    /// A pair in [`Phase::Resetting`] is due: pass the reset on once the
    /// receiver has acknowledged everything, or when its time is up.
    fn check_reset(&mut self, key: usize, reset: Side, now: Instant) {
        let pair = &mut self.pairs[key];
        let left = pair
            .endpoint(reset.other())
            .map_or(Ok(0), |r| self.send_queues.unacked(&r.stream));
        let half_close = self.settings.half_close_timeout;
        let Phase::Resetting {
            unacked,
            check,
            every,
            until,
            ..
        } = &mut pair.phase
        else {
            return;
        };
        let left = left.unwrap_or(0);
        if left < *unacked {
            *until = now + half_close;
        }
        *unacked = left;
        if left == 0 || now >= *until {
            return self.close(key, End::Reset(reset), now);
        }
        *every = (*every * 2).min(RESET_CHECK_MAX);
        *check = now + *every;
        self.schedule(key);
    }

    /// Ends a pair: releases its host exactly once, returns its buffers, logs
    /// the access line and closes both sockets (with RST toward the other
    /// side when one side reset).
    fn close(&mut self, key: usize, end: End, now: Instant) {
        let mut pair = self.pairs.remove(key);
        let u = &mut self.upstreams[pair.upstream];
        // However it is cut short, a pair that was passing a reset on ends with it.
        let end = match pair.phase {
            Phase::Resetting { reset, .. } => End::Reset(reset),
            _ => end,
        };
        let host = match pair.phase {
            Phase::Connecting { host, .. } => {
                u.balancer.release(host);
                u.balancer.addr(host).to_string()
            }
            Phase::Relaying { host } => {
                u.balancer.release(host);
                u.durations
                    .observe(now.saturating_duration_since(pair.started));
                u.balancer.addr(host).to_string()
            }
            Phase::Resetting { host, unacked, .. } => {
                if unacked > 0 {
                    u.count_undelivered(u64::from(unacked));
                }
                u.durations
                    .observe(now.saturating_duration_since(pair.started));
                u.balancer.addr(host).to_string()
            }
            Phase::Refusing { .. } => {
                self.refusing -= 1;
                "-".to_string()
            }
            Phase::Handshaking { .. } => "-".to_string(),
        };
        if let Phase::Handshaking { .. } = pair.phase {
            self.handshake_ended(pair.client_addr);
        }
        let u = &self.upstreams[pair.upstream];
        if let Some(client) = pair.client_id.take() {
            self.access.release(client);
        }
        // RST instead of FIN wherever a FIN would pass a cut stream off as
        // complete: toward the other side of a reset, on shutdown, and on a
        // timeout that leaves undelivered bytes behind.
        let abort = match end {
            End::Reset(side) => [side == Side::Upstream, side == Side::Client],
            End::IdleTimeout | End::HalfCloseTimeout => [pair.holds_bytes(); 2],
            End::Shutdown | End::HostDown | End::Removed => [true, true],
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
}

/// Binds upstream `index`'s listen address and registers it in `listeners`;
/// returns the listener's key and the address actually bound.
fn bind_listener(
    poll: &Poll,
    listeners: &mut Slab<Listener>,
    index: usize,
    u: &UpstreamConfig,
    settings: &Settings,
) -> Result<(usize, SocketAddr), Error> {
    let bind_error = |source| Error::Bind {
        upstream: u.name.clone(),
        addr: u.listen,
        source,
    };
    let mut socket =
        listen(u.listen, settings.backlog, settings.socket_buffer).map_err(bind_error)?;
    let local = socket.local_addr().map_err(bind_error)?;
    let entry = listeners.vacant_entry();
    poll.registry()
        .register(
            &mut socket,
            Source::Listener(entry.key()).token(),
            Interest::READABLE,
        )
        .map_err(bind_error)?;
    let key = entry.key();
    entry.insert(Listener {
        socket,
        upstream: index,
        pending: false,
    });
    Ok((key, local))
}

/// A seed for check-interval jitter; any value that differs between runs will do.
fn jitter_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (u64::from(nanos) << 32 | u64::from(std::process::id())) | 1
}

/// A non-blocking listening socket. Accepted sockets inherit its buffer
/// sizes, so `socket_buffer` costs no syscall per client connection.
fn listen(addr: SocketAddr, backlog: u32, buffer: Option<usize>) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    if let Some(size) = buffer {
        net::set_listener_buffers(&socket, size, addr)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(TcpListener::from_std(socket.into()))
}
