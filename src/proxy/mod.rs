//! The event loop: one thread, one `mio::Poll`.
//!
//! Each turn reads the clock once, waits for readiness (or the next
//! deadline), hands each event to what its token names (a pair, a
//! listener, a probe, the admin endpoint, signals, commands), drives the
//! pairs whose relay budget ran out last turn, accepts what the listeners
//! have queued (a bounded batch per listener per turn, so relaying is not
//! starved), then acts on the deadlines that have passed.
//!
//! What the loop owns is split by who will own it once there are several
//! loops (the scale-out issue):
//! - [`Worker`]: what one poll loop owns alone: its poller, its pairs and
//!   their deadlines, its buffers, its listeners, its counters of pairs;
//! - [`Shared`]: what is process-wide: settings, upstreams with their
//!   hosts' counts and health, client rules, per-source limits, TLS;
//! - health checking (`checks.rs`, one prober for the process) and control
//!   (`control.rs`: signals, commands, the admin endpoint, shutdown;
//!   `reload.rs`: reload in place).
//!
//! Invariants kept here: upstreams and hosts keep their index for the
//! process's life (a reload marks them removed), since pairs, probes and
//! timers refer to them; a socket is registered once, for everything it
//! will need, when it is created, and closing it (dropping its owner)
//! removes it from the poll set. A pair's counts are its leases, given
//! back by the pair itself when it closes.

mod accept;
mod checks;
mod control;
mod probe;
mod reload;
mod timers;
mod token;

pub use control::Handle;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::admin::AdminConn;
use crate::config::{Config, Settings, UpstreamConfig};
use crate::error::Error;
use crate::io::buffer::BufferPool;
use crate::io::net;
use crate::io::send_queue::SendQueues;
use crate::logs::Throttle;
use crate::pair::{Census, Context, End, Pair, PairLogs, Side, Step};
use crate::policy::access::Access;
use crate::policy::balance::HostId;
use crate::policy::limits::SourceLimiter;
use crate::tls::TlsSettings;
use crate::upstream::Upstream;
use checks::HealthChecks;
use timers::Timers;
use token::Registration;

/// Free buffers kept for reuse, in bytes.
const POOL_KEEP_BYTES: usize = 4 * 1024 * 1024;

/// See [`Proxy::set_config_adjust`].
type AdjustConfig = Box<dyn Fn(Config) -> Result<Config, Error> + Send>;

#[derive(Debug)]
struct Listener {
    socket: TcpListener,
    upstream: usize,
    /// The listener may have connections queued: set by a readable edge,
    /// cleared only when `accept` says WouldBlock.
    pending: bool,
}

/// What a pair borrows from its worker while it moves (see [`Context`]).
#[derive(Debug)]
struct PairSupport {
    pool: BufferPool,
    census: Census,
    send_queues: SendQueues,
    logs: PairLogs,
    host_results: Vec<(HostId, bool)>,
}

/// What one poll loop owns alone.
#[derive(Debug)]
struct Worker {
    poll: Poll,
    pairs: Slab<Pair>,
    timers: Timers,
    support: PairSupport,
    /// Pairs that stopped relaying only because their budget ran out, with
    /// their ids (a slot may be reused before they are driven again).
    runnable: Vec<(usize, u64)>,
    listeners: Slab<Listener>,
    accept_paused_until: Option<Instant>,
    exhaustion_log: Throttle,
    /// Connections closed at accept (source rate, handshake capacity).
    drop_log: Throttle,
    next_id: u64,
}

/// What is process-wide.
#[derive(Debug)]
struct Shared {
    settings: Settings,
    upstreams: Vec<Upstream>,
    access: Access,
    sources: Option<SourceLimiter>,
    /// TLS material, when any upstream speaks TLS.
    tls: Option<(Arc<rustls::ServerConfig>, TlsSettings)>,
    started: Instant,
    reloads: u64,
}

/// The loop's clock: the system's monotonic clock, read once a turn, plus
/// however far [`Handle::advance_clock`] has moved it ahead (zero unless
/// a test did).
#[derive(Debug, Default)]
struct Clock {
    ahead: Duration,
    /// Callers of `advance_clock`, answered once a turn runs on the moved clock.
    waiters: Vec<mpsc::Sender<()>>,
}

impl Clock {
    /// The one reading of the clock a turn.
    fn read(&mut self) -> Instant {
        let now = Instant::now() + self.ahead;
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(());
        }
        now
    }
}

/// What steers the loop rather than relaying.
struct Control {
    admin: Option<TcpListener>,
    admin_conns: Slab<AdminConn>,
    admin_timers: Timers,
    /// Idle admin connections closed to make room for a new one.
    admin_evictions: Throttle,
    /// The config file, re-read on SIGHUP and `POST /reload`.
    config_path: Option<PathBuf>,
    /// What the embedder changes in every config read from the file (the
    /// binary: its command-line overrides).
    adjust_config: Option<AdjustConfig>,
    /// The admin address in force (changing it needs a restart).
    config_admin: Option<SocketAddr>,
    drain_deadline: Option<Instant>,
    stop_now: bool,
    clock: Clock,
    signals: Option<Signals>,
    commands: Receiver<control::Command>,
    handle: Handle,
}

/// The load balancer: listeners bound, ready to [`run`](Proxy::run).
pub struct Proxy {
    worker: Worker,
    shared: Shared,
    checks: HealthChecks,
    control: Control,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("upstreams", &self.shared.upstreams)
            .field("pairs", &self.worker.pairs.len())
            .field("draining", &self.control.drain_deadline.is_some())
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
        let waker = Waker::new(poll.registry(), Registration::Control.token())
            .map_err(setup("the waker"))?;
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
            Some(addr) => Some(bind_admin(&poll, addr)?),
            None => None,
        };
        let now = Instant::now();
        Ok(Proxy {
            worker: Worker {
                support: PairSupport {
                    pool: BufferPool::new(
                        settings.buffer_size,
                        settings.bulk_buffer(),
                        POOL_KEEP_BYTES,
                    ),
                    census: Census::default(),
                    send_queues: SendQueues::new(),
                    logs: PairLogs::default(),
                    host_results: Vec::new(),
                },
                poll,
                pairs: Slab::new(),
                timers: Timers::default(),
                runnable: Vec::new(),
                listeners,
                accept_paused_until: None,
                exhaustion_log: Throttle::default(),
                drop_log: Throttle::default(),
                next_id: 1,
            },
            shared: Shared {
                access: Access::new(config.clients.clone()),
                sources: settings.source_limit.map(SourceLimiter::new),
                settings,
                upstreams,
                tls,
                started: now,
                reloads: 0,
            },
            checks: HealthChecks::new(),
            control: Control {
                admin,
                admin_conns: Slab::new(),
                admin_timers: Timers::default(),
                admin_evictions: Throttle::default(),
                config_path: None,
                adjust_config: None,
                config_admin: config.admin,
                drain_deadline: None,
                stop_now: false,
                clock: Clock::default(),
                signals: None,
                commands,
                handle: Handle::new(tx, Arc::new(waker)),
            },
        })
    }

    /// The file to re-read on SIGHUP or `POST /reload`.
    pub fn set_config_path(&mut self, path: PathBuf) {
        self.control.config_path = Some(path);
    }

    /// Has every config a reload reads from the file pass through `adjust`
    /// before it is checked and applied, as the one given to [`Proxy::bind`]
    /// did: the binary re-applies its command-line overrides this way. An
    /// error rejects the reload.
    pub fn set_config_adjust(
        &mut self,
        adjust: impl Fn(Config) -> Result<Config, Error> + Send + 'static,
    ) {
        self.control.adjust_config = Some(Box::new(adjust));
    }

    /// The admin listener's address, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.control
            .admin
            .as_ref()
            .and_then(|a| a.local_addr().ok())
    }

    /// The address an upstream actually listens on (useful with port 0).
    pub fn listen_addr(&self, upstream: &str) -> Option<SocketAddr> {
        self.shared
            .upstreams
            .iter()
            .find(|u| u.name == upstream && !u.removed)
            .map(|u| u.listen)
    }

    /// A handle to control the proxy from other threads once it runs.
    pub fn handle(&self) -> Handle {
        self.control.handle.clone()
    }

    /// Makes SIGINT and SIGTERM start a graceful shutdown (a second one
    /// stops at once), and SIGHUP reload the config file.
    pub fn handle_signals(&mut self) -> Result<(), Error> {
        let setup = |source| Error::Setup {
            what: "signal handling",
            source,
        };
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(setup)?;
        self.worker
            .poll
            .registry()
            .register(
                &mut signals,
                Registration::Signals.token(),
                Interest::READABLE,
            )
            .map_err(setup)?;
        self.control.signals = Some(signals);
        Ok(())
    }

    /// Logs each live upstream's listen address and hosts (at start and
    /// after a reload).
    fn log_listening(&self) {
        for u in self.shared.upstreams.iter().filter(|u| !u.removed) {
            let hosts: Vec<String> = u
                .balancer
                .hosts()
                .filter(|(_, h)| !h.removed)
                .map(|(_, h)| h.addr.to_string())
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
        let s = &self.shared.settings;
        info!(
            "tcplb {} ready: max_connections={} buffer_size={} bulk_buffer_size={} connect_timeout={:?} idle_timeout={:?}",
            env!("CARGO_PKG_VERSION"),
            s.max_connections,
            s.buffer_size,
            s.bulk_buffer(),
            s.connect_timeout,
            s.idle_timeout,
        );
        if let Some(addr) = self.admin_addr() {
            info!("admin listening on {addr} (GET /metrics, GET /status, POST /reload)");
        }
        let mut events = Events::with_capacity(1024);
        let mut now = self.control.clock.read();
        for upstream in 0..self.shared.upstreams.len() {
            self.checks
                .schedule_upstream(&mut self.shared.upstreams[upstream], upstream, now);
        }
        loop {
            let timeout = self.poll_timeout(now);
            if let Err(e) = self.worker.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Setup {
                    what: "polling",
                    source: e,
                });
            }
            now = self.control.clock.read();
            for event in events.iter() {
                self.dispatch(event, now);
            }
            self.continue_runnable(now);
            self.accept(now);
            self.expire(now);
            self.run_checks(now);
            self.expire_admin(now);
            self.worker.support.logs.refusals.flush(now);
            let c = &self.control;
            let drained = c
                .drain_deadline
                .is_some_and(|d| self.worker.pairs.is_empty() || now >= d);
            if c.stop_now || drained {
                break;
            }
        }
        let left = self.worker.pairs.len();
        if left > 0 {
            warn!("drain period over: closing {left} remaining connections");
        }
        let keys: Vec<usize> = self.worker.pairs.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(key, End::Shutdown, now);
        }
        self.worker.support.logs.refusals.finish();
        info!("tcplb stopped");
        Ok(())
    }

    /// Hands one readiness event to what its token names.
    fn dispatch(&mut self, event: &mio::event::Event, now: Instant) {
        match Registration::of(event.token()) {
            Some(Registration::Pair(key, side)) => self.on_pair_event(key, side, event, now),
            Some(Registration::Listener(index)) => {
                if let Some(listener) = self.worker.listeners.get_mut(index) {
                    listener.pending = true;
                }
            }
            Some(Registration::Probe(key)) => self.on_probe_event(key, event, now),
            Some(Registration::Admin(key)) => self.on_admin_event(key, event, now),
            Some(Registration::AdminListener) => self.accept_admin(now),
            Some(Registration::Signals) => self.on_signals(now),
            Some(Registration::Control) => self.on_commands(now),
            None => {}
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        let w = &self.worker;
        if !w.runnable.is_empty() || !self.control.clock.waiters.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut next = w.timers.next();
        let mut earliest = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        match w.accept_paused_until {
            Some(resume) => earliest(resume),
            None if w.listeners.iter().any(|(_, l)| l.pending) => return Some(Duration::ZERO),
            None => {}
        }
        if let Some(deadline) = self.control.drain_deadline {
            earliest(deadline);
        }
        let refusals = w.support.logs.refusals.due();
        for due in [
            self.checks.next_due(),
            self.control.admin_timers.next(),
            refusals,
        ]
        .into_iter()
        .flatten()
        {
            earliest(due);
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    fn on_pair_event(&mut self, key: usize, side: Side, event: &mio::event::Event, now: Instant) {
        let Some(endpoint) = self
            .worker
            .pairs
            .get_mut(key)
            .and_then(|p| p.endpoint(side))
        else {
            return;
        };
        endpoint.on_event(event);
        self.drive(key, now, Pair::advance);
    }

    /// Moves pair `key` on with `step` (an event's [`Pair::advance`], or
    /// its deadline's [`Pair::expire`]), then does what it asks for.
    fn drive(&mut self, key: usize, now: Instant, step: fn(&mut Pair, &mut Context<'_>) -> Step) {
        let (w, shared) = (&mut self.worker, &mut self.shared);
        let pair = &mut w.pairs[key];
        let upstream = pair.upstream;
        let before = pair.bytes();
        let mut ctx = context(&mut w.support, &w.poll, shared, upstream, key, now);
        let step = step(pair, &mut ctx);
        let after = pair.bytes();
        let u = &mut shared.upstreams[upstream];
        u.bytes_up += after.0.saturating_sub(before.0);
        u.bytes_down += after.1.saturating_sub(before.1);
        match step {
            Step::Continue => self.schedule(key),
            Step::Again => {
                self.schedule(key);
                let id = self.worker.pairs[key].id;
                self.worker.runnable.push((key, id));
            }
            Step::Finish(end) => self.close(key, end, now),
        }
        self.host_results(upstream, now);
    }

    /// Drives the pairs whose relay budget ran out last turn.
    fn continue_runnable(&mut self, now: Instant) {
        let runnable = std::mem::take(&mut self.worker.runnable);
        for (key, id) in runnable {
            if self.worker.pairs.get(key).is_some_and(|p| p.id == id) {
                self.drive(key, now, Pair::advance);
            }
        }
    }

    /// Makes sure the timer heap holds an entry no later than the pair's deadline.
    fn schedule(&mut self, key: usize) {
        let w = &mut self.worker;
        let pair = &mut w.pairs[key];
        let deadline = pair.deadline(&self.shared.settings);
        if pair.scheduled.is_none_or(|s| deadline < s) {
            pair.scheduled = Some(deadline);
            w.timers.push(deadline, key, pair.id);
        }
    }

    /// Acts on the pairs whose deadlines have passed.
    fn expire(&mut self, now: Instant) {
        while let Some((when, key, id)) = self.worker.timers.pop_due(now) {
            let Some(pair) = self.worker.pairs.get_mut(key) else {
                continue;
            };
            if pair.id != id || pair.scheduled != Some(when) {
                continue;
            }
            pair.scheduled = None;
            if pair.deadline(&self.shared.settings) > now {
                self.schedule(key);
                continue;
            }
            if pair.drain_by.is_some_and(|d| d <= now) {
                let u = &self.shared.upstreams[pair.upstream];
                let removed =
                    u.removed || pair.host_id().is_some_and(|h| u.balancer.host(h).removed);
                pair.drain_by = None;
                if removed {
                    self.close(key, End::Removed, now);
                } else {
                    // Its host or upstream came back in a later reload.
                    self.schedule(key);
                }
                continue;
            }
            self.drive(key, now, Pair::expire);
        }
    }

    /// Ends pair `key`: it gives back what it holds and writes its access line.
    fn close(&mut self, key: usize, end: End, now: Instant) {
        let w = &mut self.worker;
        let pair = w.pairs.remove(key);
        let upstream = pair.upstream;
        let mut ctx = context(
            &mut w.support,
            &w.poll,
            &mut self.shared,
            upstream,
            key,
            now,
        );
        pair.close(&mut ctx, end);
    }

    /// Feeds the connect results a pair noted to its hosts' health.
    fn host_results(&mut self, upstream: usize, now: Instant) {
        while let Some((host, ok)) = self.worker.support.host_results.pop() {
            self.host_result(upstream, host, ok, "connect failed", now);
        }
    }
}

/// The context pair `key` of `upstream` moves in.
fn context<'a>(
    support: &'a mut PairSupport,
    poll: &'a Poll,
    shared: &'a mut Shared,
    upstream: usize,
    key: usize,
    now: Instant,
) -> Context<'a> {
    Context {
        now,
        settings: &shared.settings,
        pool: &mut support.pool,
        registry: poll.registry(),
        host_token: Registration::Pair(key, Side::Host).token(),
        upstream: &mut shared.upstreams[upstream],
        access: &mut shared.access,
        census: &mut support.census,
        send_queues: &mut support.send_queues,
        logs: &mut support.logs,
        host_results: &mut support.host_results,
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
        net::listen(u.listen, settings.backlog, settings.socket_buffer).map_err(bind_error)?;
    let local = socket.local_addr().map_err(bind_error)?;
    let entry = listeners.vacant_entry();
    poll.registry()
        .register(
            &mut socket,
            Registration::Listener(entry.key()).token(),
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

/// Binds and registers the admin listener.
fn bind_admin(poll: &Poll, addr: SocketAddr) -> Result<TcpListener, Error> {
    let mut socket = net::listen(addr, 64, None).map_err(|source| Error::Bind {
        upstream: "admin".to_string(),
        addr,
        source,
    })?;
    poll.registry()
        .register(
            &mut socket,
            Registration::AdminListener.token(),
            Interest::READABLE,
        )
        .map_err(|source| Error::Setup {
            what: "the admin listener",
            source,
        })?;
    if !addr.ip().is_loopback() {
        warn!(
            "the admin listener {addr} is not on loopback: anyone who reaches it can read metrics and reload"
        );
    }
    Ok(socket)
}
