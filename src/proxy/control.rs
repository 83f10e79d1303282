//! The control thread: everything that steers the workers rather than
//! relaying. Signals, commands from a [`Handle`], the admin endpoint
//! (`/metrics`, `/status`, `/reload`), the health prober (`checks.rs`),
//! reload (`reload.rs`, whose file reads and parsing happen here, never on
//! a worker), graceful shutdown, and the counters snapshot, which sums the
//! workers' own counters.
//!
//! It runs its own `mio::Poll` with the admin listener, the probes, the
//! signal pipe and a waker; workers reach it through the same channel as
//! a [`Handle`] (host transitions, "stopped"), and so does the resolver
//! thread (`names.rs`) with the answers of the lookups it was handed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::net::TcpListener;
use mio::{Events, Poll, Waker};
use signal_hook::consts::SIGHUP;
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use super::AdjustConfig;
use super::checks::HealthChecks;
use super::names::{Answers, Names};
use super::shared::Shared;
use super::timers::Timers;
use super::token::Registration;
use super::worker::{Order, WorkerStats};
use crate::admin::{self, AdminConn, AdminStep, HostStats, Request, Route, Stats, UpstreamStats};
use crate::config::ClusterSettings;
use crate::error::Error;
use crate::io::net::KeepaliveState;
use crate::logs::Throttle;
use crate::policy::balance::Host;
use crate::upstream::{Counters, Upstream};

/// How long the control thread waits for a worker's counters.
const STATS_WAIT: Duration = Duration::from_secs(5);

/// A request to the control thread, from a [`Handle`] or a worker.
#[derive(Debug)]
pub(super) enum Command {
    Shutdown,
    Stats(Sender<Stats>),
    Reload(Sender<Result<(), String>>),
    /// A worker's real connects took a host up or down.
    HostChanged {
        upstream: usize,
        host: Arc<Host>,
        up: bool,
    },
    /// A worker has stopped accepting, with this many pairs to drain.
    Draining {
        worker: usize,
        pairs: usize,
    },
    /// A worker has drained (or stopped) and exited its loop.
    WorkerStopped(usize),
    /// The resolver thread's answers to a round of lookups.
    Resolved(Answers),
    /// Move every loop's clock ahead; the sender is dropped (by the
    /// control thread and by each worker it is handed to) once a turn runs
    /// on the moved clock.
    AdvanceClock(Duration, Sender<()>),
    /// Read back the keepalive of every pair's sockets.
    Keepalive(Sender<Vec<PairKeepalive>>),
}

/// The TCP keepalive of one pair's two sockets, as the kernel has it
/// (read with `getsockopt` from the sockets themselves, not from the
/// config): what [`Handle::keepalive`] returns, for tests and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairKeepalive {
    /// The client's address.
    pub client_addr: SocketAddr,
    /// The keepalive of tcplb's socket to the client (`None`: off).
    pub client: Option<KeepaliveState>,
    /// The keepalive of tcplb's socket to the host (`None`: off, or no
    /// host socket yet).
    pub host: Option<KeepaliveState>,
}

/// Talks to a running [`Proxy`](super::Proxy) from another thread (tests, embedding).
#[derive(Debug, Clone)]
pub struct Handle {
    commands: Sender<Command>,
    waker: Arc<Waker>,
}

impl Handle {
    pub(super) fn new(commands: Sender<Command>, waker: Arc<Waker>) -> Handle {
        Handle { commands, waker }
    }

    pub(super) fn send(&self, command: Command) -> Option<()> {
        self.commands.send(command).ok()?;
        self.waker.wake().ok()
    }

    /// Starts a graceful shutdown, as SIGTERM does; a second call stops at once.
    pub fn shutdown(&self) {
        let _ = self.send(Command::Shutdown);
    }

    /// The proxy's counters, or `None` once it has stopped.
    pub fn stats(&self) -> Option<Stats> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Stats(tx))?;
        rx.recv().ok()
    }

    /// Re-reads the config file, as SIGHUP does; the error names what is wrong.
    pub fn reload(&self) -> Result<(), String> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Reload(tx))
            .ok_or_else(|| "tcplb is not running".to_string())?;
        rx.recv()
            .unwrap_or_else(|_| Err("tcplb is not running".to_string()))
    }

    /// The TCP keepalive of the sockets of every pair, read back from the
    /// kernel (`getsockopt` on each socket); `None` once tcplb has stopped.
    pub fn keepalive(&self) -> Option<Vec<PairKeepalive>> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Keepalive(tx))?;
        rx.recv().ok()
    }

    /// Moves the clock of every loop (the workers' and the control
    /// thread's) `by` ahead, as if that much time had passed at once: what
    /// falls due within it (timeouts, drain periods, health checks, rate
    /// refills, slow-start ramps) is acted on at the next turn. Returns
    /// once every loop runs on the moved clock; `None` once tcplb has
    /// stopped. For tests, which can cross an hour-long timeout this
    /// way without waiting for it, and without a race against a real
    /// clock; tcplb itself never calls it.
    pub fn advance_clock(&self, by: Duration) -> Option<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::AdvanceClock(by, tx))?;
        // Nothing is ever sent: the call returns when the last holder of
        // `tx` has dropped it.
        let _ = rx.recv();
        Some(())
    }
}

/// The control thread's line to one worker.
#[derive(Debug)]
pub(super) struct WorkerLink {
    pub orders: Sender<Order>,
    pub waker: Arc<Waker>,
    /// It has stopped accepting, with this many pairs to drain.
    pub draining: Option<usize>,
    pub stopped: bool,
}

impl WorkerLink {
    pub fn send(&self, order: Order) {
        if self.orders.send(order).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// What the control thread owns.
pub(super) struct Control {
    pub poll: Poll,
    pub shared: Arc<Shared>,
    pub workers: Vec<WorkerLink>,
    pub checks: HealthChecks,
    pub admin: Option<TcpListener>,
    pub admin_conns: Slab<AdminConn>,
    pub admin_timers: Timers,
    /// Idle admin connections closed to make room for a new one.
    pub admin_evictions: Throttle,
    pub next_admin_id: u64,
    /// The config file, re-read on SIGHUP and `POST /reload`.
    pub config_path: Option<PathBuf>,
    /// What the embedder changes in every config read from the file (the
    /// binary: its command-line overrides).
    pub adjust_config: Option<AdjustConfig>,
    /// The admin address in force (changing it needs a restart).
    pub config_admin: Option<SocketAddr>,
    /// `[cluster]` as started (changing it needs a restart).
    pub config_cluster: Option<ClusterSettings>,
    /// Upstream ids by name, stable for the process's life.
    pub upstream_ids: HashMap<String, usize>,
    /// Upstreams removed by a reload, and hosts removed from live ones,
    /// shown in the counters while they still have connections.
    pub retired: Vec<Arc<Upstream>>,
    pub retired_hosts: Vec<(usize, Arc<Host>)>,
    /// Hosts given by name, and their lookups every `resolve_interval`.
    pub names: Names,
    pub draining: bool,
    pub signals: Option<Signals>,
    pub commands: Receiver<Command>,
    pub handle: Handle,
    pub started: Instant,
    pub reloads: u64,
    /// Callers of `advance_clock`, answered (dropped) once a turn runs on
    /// the moved clock.
    pub clock_waiters: Vec<Sender<()>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("workers", &self.workers.len())
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// Serves until every worker has stopped.
    pub fn run(mut self) -> Result<(), Error> {
        let mut events = Events::with_capacity(256);
        let now = self.shared.clock.now();
        let snapshot = self.shared.snapshot();
        for u in &snapshot.upstreams {
            self.checks.schedule_upstream(u, now);
        }
        while self.workers.iter().any(|w| !w.stopped) {
            let timeout = self.poll_timeout(self.shared.clock.now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::Setup {
                    what: "polling",
                    source: e,
                });
            }
            let now = self.shared.clock.now();
            self.clock_waiters.clear();
            for event in events.iter() {
                match Registration::of(event.token()) {
                    Some(Registration::Probe(key)) => self.on_probe_event(key, event, now),
                    Some(Registration::Admin(key)) => self.on_admin_event(key, event, now),
                    Some(Registration::AdminListener) => self.accept_admin(now),
                    Some(Registration::Signals) => self.on_signals(now),
                    Some(Registration::Control) => self.on_commands(now),
                    _ => {}
                }
            }
            self.run_checks(now);
            self.follow_names(now);
            self.expire_admin(now);
        }
        info!("tcplb stopped");
        Ok(())
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.clock_waiters.is_empty() {
            return Some(Duration::ZERO);
        }
        [
            self.checks.next_due(),
            self.admin_timers.next(),
            self.names.next_due(),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| t.saturating_duration_since(now))
    }

    fn on_signals(&mut self, now: Instant) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let pending: Vec<i32> = signals.pending().collect();
        for signal in pending {
            if signal == SIGHUP {
                let _ = self.reload(now);
            } else {
                self.shutdown(now);
            }
        }
    }

    fn on_commands(&mut self, now: Instant) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Shutdown => self.shutdown(now),
                Command::Stats(reply) => {
                    let _ = reply.send(self.stats(now));
                }
                Command::Reload(reply) => {
                    let _ = reply.send(self.reload(now));
                }
                Command::HostChanged { upstream, host, up } => {
                    self.host_changed(upstream, &host, up, now);
                }
                Command::Draining { worker, pairs } => {
                    self.workers[worker].draining = Some(pairs);
                    if self
                        .workers
                        .iter()
                        .all(|w| w.draining.is_some() || w.stopped)
                    {
                        let pairs: usize = self.workers.iter().filter_map(|w| w.draining).sum();
                        let drain = self.shared.snapshot().settings.drain_timeout;
                        info!(
                            "shutting down: no longer accepting; draining {pairs} connections for up to {drain:?}"
                        );
                    }
                }
                Command::WorkerStopped(index) => self.workers[index].stopped = true,
                Command::Resolved(answers) => self.resolved(answers, now),
                Command::Keepalive(reply) => {
                    let mut all = Vec::new();
                    for w in self.workers.iter().filter(|w| !w.stopped) {
                        let (tx, rx) = mpsc::channel();
                        w.send(Order::Keepalive(tx));
                        all.extend(rx.recv_timeout(STATS_WAIT).unwrap_or_default());
                    }
                    let _ = reply.send(all);
                }
                Command::AdvanceClock(by, reply) => {
                    self.shared.clock.advance(by);
                    for worker in self.workers.iter().filter(|w| !w.stopped) {
                        worker.send(Order::ClockMoved(reply.clone()));
                    }
                    self.clock_waiters.push(reply);
                }
            }
        }
    }

    /// First call: stop accepting and start the drain period. Second call: stop now.
    pub fn shutdown(&mut self, now: Instant) {
        if self.draining {
            info!("second shutdown request: stopping now");
            for w in &self.workers {
                w.send(Order::StopNow);
            }
            return;
        }
        self.draining = true;
        let drain = self.shared.snapshot().settings.drain_timeout;
        for w in &self.workers {
            w.send(Order::Shutdown {
                deadline: now + drain,
            });
        }
    }

    /// The counters of every worker, summed, with the shared state.
    pub fn stats(&self, now: Instant) -> Stats {
        let mut total = WorkerStats::default();
        let mut per_worker = Vec::new();
        for w in self.workers.iter().filter(|w| !w.stopped) {
            let (tx, rx) = mpsc::channel();
            w.send(Order::Stats(tx));
            let Ok(stats) = rx.recv_timeout(STATS_WAIT) else {
                continue;
            };
            per_worker.push(stats.pairs);
            total.pairs += stats.pairs;
            total.refusing += stats.refusing;
            total.buffers_in_use += stats.buffers_in_use;
            total.pipes_in_use += stats.pipes_in_use;
            total.pipes_free += stats.pipes_free;
            total.splice_fallbacks += stats.splice_fallbacks;
            if total.counters.len() < stats.counters.len() {
                total
                    .counters
                    .resize_with(stats.counters.len(), Counters::default);
            }
            for (sum, c) in total.counters.iter_mut().zip(&stats.counters) {
                sum.add(c);
            }
        }
        let snapshot = self.shared.snapshot();
        let none = Counters::default();
        let busy = |u: &Upstream| u.balancer.hosts().any(|(_, h)| h.active() > 0);
        let live = snapshot.upstreams.iter().map(|u| (u, false));
        let retired = self.retired.iter().filter(|u| busy(u)).map(|u| (u, true));
        let upstreams = live
            .chain(retired)
            .map(|(u, removed)| {
                let c = total.counters.get(u.id).unwrap_or(&none);
                let gone = self
                    .retired_hosts
                    .iter()
                    .filter(|(id, h)| *id == u.id && h.active() > 0)
                    .map(|(_, h)| h);
                UpstreamStats {
                    name: u.name.clone(),
                    listen: u.listen,
                    tls: u.tls,
                    removed,
                    refused: c.refused.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
                    ended: c.ended.iter().map(|(e, n)| (e.to_string(), *n)).collect(),
                    bytes_up: c.bytes_up,
                    bytes_down: c.bytes_down,
                    spliced_up: c.spliced_up,
                    spliced_down: c.spliced_down,
                    durations: c.durations.clone(),
                    queued: u.balancer.queue().len(),
                    queue_waits: c.queue_waits.clone(),
                    undelivered_resets: c.undelivered_resets,
                    undelivered_bytes: c.undelivered_bytes,
                    hosts: u
                        .balancer
                        .hosts()
                        .map(|(_, h)| h)
                        .chain(gone)
                        .map(|h| host_stats(h))
                        .collect(),
                }
            })
            .collect();
        Stats {
            pairs: total.pairs,
            refusing: total.refusing,
            buffers_in_use: total.buffers_in_use,
            pipes_in_use: total.pipes_in_use,
            pipes_free: total.pipes_free,
            splice_fallbacks: total.splice_fallbacks,
            handshakes: self.shared.capacity.handshakes(),
            uptime: now.saturating_duration_since(self.started),
            reloads: self.reloads,
            clients: snapshot.access.active(),
            upstreams,
            workers: per_worker,
            cluster: self.shared.cluster.as_ref().map(|c| c.stats()),
        }
    }

    fn accept_admin(&mut self, now: Instant) {
        let Some(listener) = self.admin.as_ref() else {
            return;
        };
        loop {
            let (stream, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.admin_conns.len() >= admin::MAX_CONNECTIONS {
                // Idle connections must not lock a scrape out: the one
                // that has waited longest without a request makes room.
                let oldest = self
                    .admin_conns
                    .iter()
                    .filter(|(_, conn)| conn.is_idle())
                    .min_by_key(|(_, conn)| conn.id)
                    .map(|(key, _)| key);
                let Some(oldest) = oldest else { continue };
                self.admin_conns.remove(oldest).abort();
                if let Some(more) = self.admin_evictions.allow(now) {
                    warn!(
                        "admin: {} connections open, closed the oldest idle one to take a new one ({more} more since the last report)",
                        admin::MAX_CONNECTIONS
                    );
                }
            }
            let entry = self.admin_conns.vacant_entry();
            let key = entry.key();
            let token = Registration::Admin(key).token();
            let id = self.next_admin_id;
            self.next_admin_id += 1;
            let Ok(conn) = AdminConn::new(stream, id, now, self.poll.registry(), token) else {
                continue;
            };
            self.admin_timers.push(conn.deadline, key, id);
            entry.insert(conn);
        }
    }

    fn on_admin_event(&mut self, key: usize, event: &mio::event::Event, now: Instant) {
        let Some(conn) = self.admin_conns.get_mut(key) else {
            return;
        };
        conn.on_event(event);
        loop {
            match self.admin_conns[key].advance() {
                AdminStep::Wait => return,
                AdminStep::Close => {
                    self.admin_conns.remove(key);
                    return;
                }
                AdminStep::Request(request) => {
                    let answer = self.answer(&request, now);
                    self.admin_conns[key].answer(answer);
                }
            }
        }
    }

    fn expire_admin(&mut self, now: Instant) {
        while let Some((_, key, id)) = self.admin_timers.pop_due(now) {
            if self.admin_conns.get(key).is_some_and(|conn| conn.id == id) {
                self.admin_conns.remove(key).abort();
            }
        }
    }

    fn answer(&mut self, request: &Request, now: Instant) -> Vec<u8> {
        match admin::route(request) {
            Route::Page(page) => page.render(&self.stats(now)),
            Route::Reload => admin::reloaded(self.reload(now)),
            Route::Answer(answer) => answer,
        }
    }
}

fn host_stats(h: &Host) -> HostStats {
    let c = &h.counters;
    let n =
        |counter: &std::sync::atomic::AtomicU64| counter.load(std::sync::atomic::Ordering::Relaxed);
    HostStats {
        addr: h.addr,
        active: h.active(),
        weight: h.weight(),
        max_connections: h.max_connections(),
        up: h.is_up(),
        removed: h.is_removed(),
        connections: n(&c.connections),
        connect_failures: n(&c.connect_failures),
        checks_passed: n(&c.checks_passed),
        checks_failed: n(&c.checks_failed),
        transitions: n(&c.transitions),
    }
}
