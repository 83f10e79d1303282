//! A worker: one thread, one `mio::Poll`, and the pairs it accepted.
//!
//! Each turn reads the clock once, waits for readiness (or the next
//! deadline), hands each event to the pair or listener its token names,
//! drives the pairs whose relay budget ran out last turn, accepts what its
//! listeners have queued (a bounded batch per listener per turn, so
//! relaying is not starved), acts on the deadlines that have passed, and
//! takes a new configuration snapshot if the control thread published one.
//!
//! A worker owns its poller, its pairs and their deadlines, its buffer
//! pool, its listeners (one per upstream, `SO_REUSEPORT`: the kernel
//! spreads connections over the workers) and its counters, which are plain
//! integers the control thread asks for. What it shares with the other
//! workers is in the snapshot ([`super::shared`]): host counts and health,
//! client counts and buckets, the process-wide caps.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Waker};
use slab::Slab;
use socket2::SockRef;

use super::control::{Command, PairKeepalive};
use super::shared::{Shared, Snapshot};
use super::timers::Timers;
use super::token::Registration;
use crate::error::Error;
use crate::io::buffer::BufferPool;
use crate::io::net;
use crate::io::pipe::{self, PipePool};
use crate::io::send_queue::SendQueues;
use crate::logs::Throttle;
use crate::pair::{Census, Context, End, Pair, PairLogs, Side, Step};
use crate::policy::balance::Host;
use crate::upstream::{Counters, Upstream};

/// Free buffers kept for reuse, in bytes.
const POOL_KEEP_BYTES: usize = 4 * 1024 * 1024;

/// A listener of this worker's.
#[derive(Debug)]
pub(super) struct Listener {
    pub socket: TcpListener,
    /// The upstream it serves, as of the snapshot in force.
    pub upstream: Arc<Upstream>,
    /// The listener may have connections queued: set by a readable edge,
    /// cleared only when `accept` says WouldBlock.
    pub pending: bool,
}

/// A request to a worker from the control thread.
#[derive(Debug)]
pub(super) enum Order {
    /// Report counters.
    Stats(Sender<WorkerStats>),
    /// A new snapshot is in force: take it, with these new listeners;
    /// pairs of removed upstreams and hosts get until `drain_by`. The
    /// worker answers on `applied` once it accepts under the new config.
    Reload {
        listeners: Vec<(usize, TcpListener)>,
        drain_by: Instant,
        applied: Sender<()>,
    },
    /// Stop accepting; let pairs finish until `deadline`, then close them.
    Shutdown { deadline: Instant },
    /// Close everything now.
    StopNow,
    /// This host went down and its upstream has `close_on_down`.
    CloseHost(Arc<Host>),
    /// The clock was moved ahead: drop the sender once a turn runs on it.
    ClockMoved(Sender<()>),
    /// Read back the keepalive of every pair's sockets.
    Keepalive(Sender<Vec<PairKeepalive>>),
}

/// What a worker counts, for the control thread to sum.
#[derive(Debug, Clone, Default)]
pub(super) struct WorkerStats {
    pub pairs: usize,
    pub refusing: usize,
    pub buffers_in_use: usize,
    pub pipes_in_use: usize,
    pub pipes_free: usize,
    pub splice_fallbacks: u64,
    /// Per upstream id.
    pub counters: Vec<Counters>,
}

/// A worker's end of its link with the control thread.
#[derive(Debug)]
pub(super) struct Link {
    pub orders: Receiver<Order>,
    /// To the control thread, with its waker.
    pub events: Sender<Command>,
    pub control: Arc<Waker>,
}

/// What a pair borrows from its worker while it moves (see [`Context`]).
#[derive(Debug)]
pub(super) struct PairSupport {
    /// The worker's index (its place in the wait queues' counts).
    pub worker: usize,
    pub pool: BufferPool,
    pub pipes: PipePool,
    pub census: Census,
    pub send_queues: SendQueues,
    pub logs: PairLogs,
    pub host_results: Vec<(Arc<Host>, bool)>,
}

/// One worker: what one poll loop owns alone.
#[derive(Debug)]
pub(super) struct Worker {
    pub index: usize,
    /// Workers running (as at start: a reload keeps the number), for this
    /// worker's share of `max_pipes`.
    workers: usize,
    pub poll: Poll,
    pub pairs: Slab<Pair>,
    pub timers: Timers,
    pub support: PairSupport,
    /// Pairs that stopped relaying only because their budget ran out, with
    /// their ids (a slot may be reused before they are driven again).
    pub runnable: Vec<(usize, u64)>,
    pub listeners: Slab<Listener>,
    pub accept_paused_until: Option<Instant>,
    pub exhaustion_log: Throttle,
    /// Connections closed at accept (source rate, handshake capacity).
    pub drop_log: Throttle,
    pub next_id: u64,
    /// This worker's counters, per upstream id.
    pub counters: Vec<Counters>,
    /// Per upstream id, this worker's pairs waiting for a host slot, in
    /// the order they came (key and id; entries of pairs that left the
    /// queue meanwhile are skipped when they reach the front).
    pub queued: Vec<VecDeque<(usize, u64)>>,
    /// The queues are to be retried at the end of this turn: a pair
    /// joined one, or a new snapshot may have raised caps or added hosts.
    retry_queued: bool,
    pub shared: Arc<Shared>,
    /// The snapshot in force here, and its generation.
    pub snapshot: Arc<Snapshot>,
    generation: u64,
    link: Link,
    drain_deadline: Option<Instant>,
    stop_now: bool,
    /// Callers of `advance_clock`, answered (dropped) once a turn runs on
    /// the moved clock.
    clock_waiters: Vec<Sender<()>>,
    /// Pairs waiting for Redis's answer about their client's limits, with
    /// their ids, and the cluster link's answer count they last saw.
    pub admitting: Vec<(usize, u64)>,
    answers_seen: u64,
}

impl Worker {
    /// A worker with its poller and, registered, its listeners.
    pub fn new(
        index: usize,
        poll: Poll,
        shared: Arc<Shared>,
        listeners: Vec<(usize, TcpListener)>,
        link: Link,
    ) -> Result<Worker, Error> {
        let snapshot = shared.snapshot();
        let settings = &snapshot.settings;
        let workers = settings.workers.max(1);
        let mut worker = Worker {
            index,
            workers,
            support: PairSupport {
                worker: index,
                pool: BufferPool::new(
                    settings.buffer_size,
                    settings.bulk_buffer(),
                    POOL_KEEP_BYTES,
                ),
                pipes: PipePool::new(
                    settings.relay,
                    settings.bulk_buffer(),
                    pipe::share(settings.max_pipes, workers, index),
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
            listeners: Slab::new(),
            accept_paused_until: None,
            exhaustion_log: Throttle::default(),
            drop_log: Throttle::default(),
            // Pair ids stay unique across workers.
            next_id: ((index as u64) << 48) + 1,
            counters: Vec::new(),
            queued: Vec::new(),
            retry_queued: false,
            generation: shared.generation(),
            snapshot,
            shared,
            link,
            drain_deadline: None,
            stop_now: false,
            clock_waiters: Vec::new(),
            admitting: Vec::new(),
            answers_seen: 0,
        };
        worker.support.logs.refusals.format = worker.snapshot.settings.access_log;
        for (upstream, socket) in listeners {
            worker
                .add_listener(upstream, socket)
                .map_err(|source| Error::Setup {
                    what: "a listener",
                    source,
                })?;
        }
        Ok(worker)
    }

    fn add_listener(&mut self, upstream: usize, mut socket: TcpListener) -> std::io::Result<()> {
        let Some(upstream) = self.snapshot.upstream(upstream).cloned() else {
            return Ok(());
        };
        let entry = self.listeners.vacant_entry();
        let token = Registration::Listener(entry.key()).token();
        self.poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)?;
        entry.insert(Listener {
            socket,
            upstream,
            // Connections may have queued before the worker started.
            pending: true,
        });
        Ok(())
    }

    /// This worker's counters of upstream `id`.
    pub fn counters(&mut self, id: usize) -> &mut Counters {
        if self.counters.len() <= id {
            self.counters.resize_with(id + 1, Counters::default);
        }
        &mut self.counters[id]
    }

    /// What a pair of upstream `id` in slot `key` may use while it moves
    /// (see [`Context`]), beside this worker's pairs, which the context
    /// does not borrow.
    pub fn pair_context(
        &mut self,
        id: usize,
        key: usize,
        now: Instant,
    ) -> (Context<'_>, &mut Slab<Pair>) {
        self.counters(id);
        let ctx = context(
            &mut self.support,
            &self.poll,
            &self.snapshot,
            &self.shared,
            &mut self.counters[id],
            key,
            now,
        );
        (ctx, &mut self.pairs)
    }

    /// Serves until a shutdown has drained or a stop.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut now = self.shared.clock.now();
        loop {
            let timeout = self.poll_timeout(now);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("worker {}: polling failed: {e}", self.index);
                break;
            }
            // The one reading of the clock this turn.
            now = self.shared.clock.now();
            self.clock_waiters.clear();
            for event in events.iter() {
                self.dispatch(event, now);
            }
            self.readmit(now);
            self.continue_runnable(now);
            self.accept(now);
            self.expire(now);
            self.take_snapshot();
            self.admit_queued(now);
            self.support.logs.refusals.flush(now);
            let drained = self
                .drain_deadline
                .is_some_and(|d| self.pairs.is_empty() || now >= d);
            if self.stop_now || drained {
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
        self.support.logs.refusals.finish();
        let _ = self.link.events.send(Command::WorkerStopped(self.index));
        let _ = self.link.control.wake();
    }

    fn dispatch(&mut self, event: &mio::event::Event, now: Instant) {
        match Registration::of(event.token()) {
            Some(Registration::Pair(key, side)) => self.on_pair_event(key, side, event, now),
            Some(Registration::Listener(index)) => {
                if let Some(listener) = self.listeners.get_mut(index) {
                    listener.pending = true;
                }
            }
            Some(Registration::Control) => self.on_orders(now),
            _ => {}
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.runnable.is_empty() || !self.clock_waiters.is_empty() {
            return Some(Duration::ZERO);
        }
        let mut next = self.timers.next();
        let mut earliest = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        match self.accept_paused_until {
            Some(resume) => earliest(resume),
            None if self.listeners.iter().any(|(_, l)| l.pending) => return Some(Duration::ZERO),
            None => {}
        }
        for due in [self.drain_deadline, self.support.logs.refusals.due()]
            .into_iter()
            .flatten()
        {
            earliest(due);
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    fn on_orders(&mut self, now: Instant) {
        while let Ok(order) = self.link.orders.try_recv() {
            match order {
                Order::Stats(reply) => {
                    let _ = reply.send(WorkerStats {
                        pairs: self.pairs.len(),
                        refusing: self.support.census.refusing(),
                        buffers_in_use: self.support.pool.in_use(),
                        pipes_in_use: self.support.pipes.in_use(),
                        pipes_free: self.support.pipes.free(),
                        splice_fallbacks: self.support.pipes.fallbacks(),
                        counters: self.counters.clone(),
                    });
                }
                Order::Reload {
                    listeners,
                    drain_by,
                    applied,
                } => {
                    self.reload(listeners, drain_by);
                    let _ = applied.send(());
                }
                Order::Shutdown { deadline } => self.shutdown(deadline),
                Order::StopNow => self.stop_now = true,
                Order::CloseHost(host) => self.close_host(&host, now),
                Order::ClockMoved(waiter) => self.clock_waiters.push(waiter),
                Order::Keepalive(reply) => {
                    let read = |p: &mut Pair, side| {
                        p.endpoint(side).and_then(|e| e.keepalive().ok().flatten())
                    };
                    let report = self
                        .pairs
                        .iter_mut()
                        .map(|(_, p)| PairKeepalive {
                            client_addr: p.client_addr,
                            client: read(p, Side::Client),
                            host: read(p, Side::Host),
                        })
                        .collect();
                    let _ = reply.send(report);
                }
            }
        }
    }

    /// Takes the snapshot in force if it changed since the last turn.
    fn take_snapshot(&mut self) {
        let generation = self.shared.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let before = net::Tuning::of(&self.snapshot.settings);
        self.snapshot = self.shared.snapshot();
        let s = &self.snapshot.settings;
        self.support.pool.resize(s.buffer_size, s.bulk_buffer());
        self.support.logs.refusals.format = s.access_log;
        let pipes = pipe::share(s.max_pipes, self.workers, self.index);
        self.support
            .pipes
            .reconfigure(s.relay, s.bulk_buffer(), pipes);
        let tuning = net::Tuning::of(s);
        if tuning != before {
            self.retune_listeners(tuning, before);
        }
        // New pairs take the new upstreams (and their hosts).
        for (_, listener) in self.listeners.iter_mut() {
            if let Some(u) = self.snapshot.upstream(listener.upstream.id) {
                listener.upstream = u.clone();
            }
        }
        // So do queued pairs, which hold nothing of the old one's hosts: they
        // see hosts added, removed or with new caps when retried.
        for &(key, id) in self.queued.iter().flatten() {
            if let Some(pair) = self
                .pairs
                .get_mut(key)
                .filter(|p| p.id == id && p.is_queued())
            {
                if let Some(u) = self.snapshot.upstream(pair.upstream.id) {
                    pair.upstream = u.clone();
                }
            }
        }
        self.retry_queued = true;
    }

    /// Applies a changed `socket_buffer` or `unsent_limit` to the
    /// listeners kept across a reload, so connections they accept from now
    /// on get it (connects to hosts read the settings each time). Handing a
    /// fixed buffer back to autotuning needs `SO_BUF_LOCK` (Linux 5.16),
    /// which socket2 does not offer, so unsetting `socket_buffer` waits for
    /// a restart.
    fn retune_listeners(&mut self, tuning: net::Tuning, before: net::Tuning) {
        for (_, listener) in &self.listeners {
            // A bound listener always has its address.
            let Ok(addr) = listener.socket.local_addr() else {
                continue;
            };
            let socket = SockRef::from(&listener.socket);
            if let Some(size) = tuning.buffer.filter(|_| tuning.buffer != before.buffer) {
                if let Err(e) = net::set_listener_buffers(&socket, size, addr) {
                    warn!("reload: listener {addr}: cannot set its socket buffers: {e}");
                }
            }
            if tuning.unsent != before.unsent {
                if let Err(e) = net::set_unsent_limit(&socket, tuning.unsent) {
                    warn!("reload: listener {addr}: cannot set its unsent limit: {e}");
                }
            }
        }
    }

    /// The control thread published a new snapshot: listeners of removed or
    /// moved upstreams close, new ones open, and pairs of removed upstreams
    /// and hosts drain.
    fn reload(&mut self, listeners: Vec<(usize, TcpListener)>, drain_by: Instant) {
        self.take_snapshot();
        let replaced: Vec<usize> = listeners.iter().map(|(id, _)| *id).collect();
        let gone: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, l)| {
                replaced.contains(&l.upstream.id) || self.snapshot.upstream(l.upstream.id).is_none()
            })
            .map(|(key, _)| key)
            .collect();
        for key in gone {
            let mut listener = self.listeners.remove(key);
            let _ = self.poll.registry().deregister(&mut listener.socket);
        }
        for (upstream, socket) in listeners {
            if let Err(e) = self.add_listener(upstream, socket) {
                warn!(
                    "worker {}: cannot listen for a reloaded upstream: {e}",
                    self.index
                );
            }
        }
        let keys: Vec<usize> = self
            .pairs
            .iter()
            .filter(|(_, p)| self.drains(p))
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            // A pair already draining keeps its deadline: a later change
            // (another reload, a DNS answer) does not extend it.
            let pair = &mut self.pairs[key];
            pair.drain_by = Some(pair.drain_by.map_or(drain_by, |d| d.min(drain_by)));
            self.schedule(key);
        }
    }

    /// Whether a pair's upstream or host is gone from the snapshot in force.
    fn drains(&self, pair: &Pair) -> bool {
        self.snapshot.upstream(pair.upstream.id).is_none()
            || pair.host().is_some_and(|h| h.is_removed())
    }

    /// Stops accepting and starts the drain period; tells the control
    /// thread, which logs once every worker has stopped accepting.
    fn shutdown(&mut self, deadline: Instant) {
        for mut listener in self.listeners.drain() {
            let _ = self.poll.registry().deregister(&mut listener.socket);
        }
        self.drain_deadline = Some(deadline);
        let _ = self.link.events.send(Command::Draining {
            worker: self.index,
            pairs: self.pairs.len(),
        });
        let _ = self.link.control.wake();
    }

    /// Closes the pairs connected to `host` (it went down, `close_on_down`).
    fn close_host(&mut self, host: &Arc<Host>, now: Instant) {
        let doomed: Vec<usize> = self
            .pairs
            .iter()
            .filter(|(_, p)| p.host().is_some_and(|h| Arc::ptr_eq(h, host)))
            .map(|(key, _)| key)
            .collect();
        for key in doomed {
            self.close(key, End::HostDown, now);
        }
    }

    fn on_pair_event(&mut self, key: usize, side: Side, event: &mio::event::Event, now: Instant) {
        let Some(endpoint) = self.pairs.get_mut(key).and_then(|p| p.endpoint(side)) else {
            return;
        };
        endpoint.on_event(event);
        self.drive(key, now, Pair::advance);
    }

    /// Moves pair `key` on with `step` (an event's [`Pair::advance`], or
    /// its deadline's [`Pair::expire`]), then does what it asks for.
    pub fn drive(
        &mut self,
        key: usize,
        now: Instant,
        step: fn(&mut Pair, &mut Context<'_>) -> Step,
    ) {
        let id = self.pairs[key].upstream.id;
        let (mut ctx, pairs) = self.pair_context(id, key, now);
        let pair = &mut pairs[key];
        let before = pair.bytes();
        let was_admitting = pair.is_admitting();
        let step = step(pair, &mut ctx);
        let after = pair.bytes();
        let upstream = pair.upstream.clone();
        let now_admitting = (!was_admitting && pair.is_admitting()).then_some(pair.id);
        let c = &mut self.counters[id];
        c.bytes_up += after.0.saturating_sub(before.0);
        c.bytes_down += after.1.saturating_sub(before.1);
        if let Some(pair_id) = now_admitting {
            self.admitting.push((key, pair_id));
        }
        match step {
            Step::Continue => self.schedule(key),
            Step::Again => {
                self.schedule(key);
                let id = self.pairs[key].id;
                self.runnable.push((key, id));
            }
            Step::Finish(end) => self.close(key, end, now),
            Step::Queued => self.enqueue(key),
            Step::Identified => self.identified(key, now),
        }
        self.host_results(&upstream, now);
    }

    /// Pair `key` has joined its upstream's queue: it goes to the back of
    /// this worker's line, which is retried at the end of the turn (it
    /// joined after its last look at the hosts, so a slot freed since is
    /// not missed).
    pub fn enqueue(&mut self, key: usize) {
        self.schedule(key);
        let pair = &self.pairs[key];
        let id = pair.upstream.id;
        if self.queued.len() <= id {
            self.queued.resize_with(id + 1, VecDeque::new);
        }
        self.queued[id].push_back((key, pair.id));
        self.retry_queued = true;
    }

    /// Admits queued pairs while their hosts have room, first come first
    /// served per upstream: when a pair joined this turn, when the bell
    /// rang (a lease ended or a host came up, in any worker), or after a
    /// new snapshot. The first pair of a line that still finds every host
    /// full keeps its place, and the line waits for the next ring.
    fn admit_queued(&mut self, now: Instant) {
        // Pairs that left the queue (timed out, gone) leave the line's
        // front without waiting for the next retry.
        for line in &mut self.queued {
            while let Some(&(key, id)) = line.front() {
                if self
                    .pairs
                    .get(key)
                    .is_some_and(|p| p.id == id && p.is_queued())
                {
                    break;
                }
                line.pop_front();
            }
        }
        if self.queued.iter().all(VecDeque::is_empty) {
            self.retry_queued = false;
            return;
        }
        let rung = self.shared.bells.take(self.index);
        if !(rung || std::mem::take(&mut self.retry_queued)) {
            return;
        }
        for upstream in 0..self.queued.len() {
            while let Some(&(key, id)) = self.queued[upstream].front() {
                let waiting = |w: &Worker| {
                    w.pairs
                        .get(key)
                        .is_some_and(|p| p.id == id && p.is_queued())
                };
                if waiting(self) {
                    self.drive(key, now, Pair::retry_queued);
                    if waiting(self) {
                        break;
                    }
                }
                self.queued[upstream].pop_front();
            }
        }
    }

    /// Drives the pairs waiting for Redis again once the cluster thread
    /// says answers came (or Redis changed state); those still waiting
    /// stay listed.
    fn readmit(&mut self, now: Instant) {
        let Some(answers) = self.shared.cluster.as_ref().map(|c| c.answers()) else {
            return;
        };
        if answers == self.answers_seen {
            return;
        }
        self.answers_seen = answers;
        let waiting = std::mem::take(&mut self.admitting);
        for (key, id) in waiting {
            if self
                .pairs
                .get(key)
                .is_some_and(|p| p.id == id && p.is_admitting())
            {
                self.drive(key, now, Pair::advance);
                if self
                    .pairs
                    .get(key)
                    .is_some_and(|p| p.id == id && p.is_admitting())
                    && !self.admitting.contains(&(key, id))
                {
                    self.admitting.push((key, id));
                }
            }
        }
    }

    /// Drives the pairs whose relay budget ran out last turn.
    fn continue_runnable(&mut self, now: Instant) {
        let runnable = std::mem::take(&mut self.runnable);
        for (key, id) in runnable {
            if self.pairs.get(key).is_some_and(|p| p.id == id) {
                self.drive(key, now, Pair::advance);
            }
        }
    }

    /// Makes sure the timer heap holds an entry no later than the pair's deadline.
    pub fn schedule(&mut self, key: usize) {
        let pair = &mut self.pairs[key];
        let deadline = pair.deadline(&self.snapshot.settings);
        if pair.scheduled.is_none_or(|s| deadline < s) {
            pair.scheduled = Some(deadline);
            self.timers.push(deadline, key, pair.id);
        }
    }

    /// Acts on the pairs whose deadlines have passed.
    fn expire(&mut self, now: Instant) {
        while let Some((when, key, id)) = self.timers.pop_due(now) {
            let Some(pair) = self.pairs.get_mut(key) else {
                continue;
            };
            if pair.id != id || pair.scheduled != Some(when) {
                continue;
            }
            pair.scheduled = None;
            if pair.deadline(&self.snapshot.settings) > now {
                self.schedule(key);
                continue;
            }
            if pair.drain_by.is_some_and(|d| d <= now) {
                pair.drain_by = None;
                if self.drains(&self.pairs[key]) {
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
    pub fn close(&mut self, key: usize, end: End, now: Instant) {
        let pair = self.pairs.remove(key);
        let (mut ctx, _) = self.pair_context(pair.upstream.id, key, now);
        pair.close(&mut ctx, end);
        // Free pipes hold descriptors: no more of them than pairs.
        self.support.pipes.trim(self.pairs.len());
    }

    /// Feeds the connect results a pair noted to its hosts' health; a
    /// transition is logged here and told to the control thread (which
    /// probes a host that traffic took down, and has every worker close a
    /// host's pairs with `close_on_down`).
    pub(super) fn host_results(&mut self, upstream: &Upstream, now: Instant) {
        while let Some((host, ok)) = self.support.host_results.pop() {
            let h = &upstream.health;
            let Some(up) = host.record(ok, (h.rise, h.fall), h.slow_start, now) else {
                continue;
            };
            log_transition(upstream, &host, up, "connect failed");
            let _ = self.link.events.send(Command::HostChanged {
                upstream: upstream.id,
                host,
                up,
            });
            let _ = self.link.control.wake();
        }
    }
}

/// Logs a host going up or down, once per transition.
pub(super) fn log_transition(upstream: &Upstream, host: &Host, up: bool, why: &str) {
    if up {
        info!("`{}`: host {} is up", upstream.name, host.addr);
    } else {
        warn!("`{}`: host {} is down ({why})", upstream.name, host.addr);
    }
}

/// The context pair `key` moves in.
fn context<'a>(
    support: &'a mut PairSupport,
    poll: &'a Poll,
    snapshot: &'a Snapshot,
    shared: &'a Shared,
    counters: &'a mut Counters,
    key: usize,
    now: Instant,
) -> Context<'a> {
    Context {
        now,
        settings: &snapshot.settings,
        pool: &mut support.pool,
        pipes: &mut support.pipes,
        registry: poll.registry(),
        host_token: Registration::Pair(key, Side::Host).token(),
        counters,
        access: &snapshot.access,
        worker: support.worker,
        cluster: shared.cluster.as_deref(),
        capacity: &shared.capacity,
        census: &mut support.census,
        send_queues: &mut support.send_queues,
        logs: &mut support.logs,
        host_results: &mut support.host_results,
    }
}
