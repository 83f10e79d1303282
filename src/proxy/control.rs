//! Everything that steers the loop rather than relaying: signals, commands
//! from a [`Handle`], the admin endpoint (`/metrics`, `/status`,
//! `/reload`), the counters snapshot, and graceful shutdown. Reload is in
//! `reload.rs`.

use std::sync::Arc;
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::Waker;
use signal_hook::consts::SIGHUP;

use super::Proxy;
use super::token::Registration;
use crate::admin::{self, AdminConn, AdminStep, HostStats, Request, Route, Stats, UpstreamStats};

/// A request to the loop from another thread.
#[derive(Debug)]
pub(super) enum Command {
    Shutdown,
    Stats(Sender<Stats>),
    Reload(Sender<Result<(), String>>),
    /// Move the loop's clock ahead; answered once the loop runs on it.
    AdvanceClock(Duration, Sender<()>),
}

/// Talks to a running [`Proxy`] from another thread (tests, embedding).
#[derive(Debug, Clone)]
pub struct Handle {
    commands: Sender<Command>,
    waker: Arc<Waker>,
}

impl Handle {
    pub(super) fn new(commands: Sender<Command>, waker: Arc<Waker>) -> Handle {
        Handle { commands, waker }
    }

    fn send(&self, command: Command) -> Option<()> {
        self.commands.send(command).ok()?;
        self.waker.wake().ok()
    }

    /// Starts a graceful shutdown, as SIGTERM does; a second call stops at once.
    pub fn shutdown(&self) {
        let _ = self.send(Command::Shutdown);
    }

    /// The loop's counters, or `None` once it has stopped.
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

    /// Moves the loop's clock `by` ahead, as if that much time had passed
    /// at once: what falls due within it (timeouts, drain periods, health
    /// checks, rate refills, slow-start ramps) is acted on at the next
    /// turn. Returns once the loop runs on the moved clock; `None` once it
    /// has stopped. For tests, which can cross an hour-long timeout this
    /// way without waiting for it, and without a race against a real
    /// clock; tcplb itself never calls it.
    pub fn advance_clock(&self, by: Duration) -> Option<()> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::AdvanceClock(by, tx))?;
        rx.recv().ok()
    }
}

impl Proxy {
    pub(super) fn on_signals(&mut self, now: Instant) {
        let Some(signals) = self.control.signals.as_mut() else {
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

    pub(super) fn on_commands(&mut self, now: Instant) {
        while let Ok(command) = self.control.commands.try_recv() {
            match command {
                Command::Shutdown => self.shutdown(now),
                Command::Stats(reply) => {
                    let _ = reply.send(self.stats(now));
                }
                Command::Reload(reply) => {
                    let _ = reply.send(self.reload(now));
                }
                Command::AdvanceClock(by, reply) => {
                    self.control.clock.ahead += by;
                    self.control.clock.waiters.push(reply);
                }
            }
        }
    }

    /// First call: stop accepting and start the drain period. Second call: stop now.
    pub(super) fn shutdown(&mut self, now: Instant) {
        if self.control.drain_deadline.is_some() {
            info!("second shutdown request: stopping now");
            self.control.stop_now = true;
            return;
        }
        let w = &mut self.worker;
        for mut listener in w.listeners.drain() {
            let _ = w.poll.registry().deregister(&mut listener.socket);
        }
        for u in &mut self.shared.upstreams {
            u.listener = None;
        }
        let drain = self.shared.settings.drain_timeout;
        self.control.drain_deadline = Some(now + drain);
        info!(
            "shutting down: no longer accepting; draining {} connections for up to {drain:?}",
            w.pairs.len(),
        );
    }

    pub(super) fn stats(&self, now: Instant) -> Stats {
        let (w, shared) = (&self.worker, &self.shared);
        Stats {
            pairs: w.pairs.len(),
            refusing: w.support.census.refusing(),
            buffers_in_use: w.support.pool.in_use(),
            handshakes: w.support.census.handshakes(),
            uptime: now.saturating_duration_since(shared.started),
            reloads: shared.reloads,
            clients: shared
                .access
                .active()
                .map(|(id, n)| (id.to_string(), n))
                .collect(),
            upstreams: shared
                .upstreams
                .iter()
                .filter(|u| !u.removed || u.balancer.hosts().any(|(_, h)| h.active() > 0))
                .map(|u| UpstreamStats {
                    name: u.name.clone(),
                    listen: u.listen,
                    tls: u.tls,
                    removed: u.removed,
                    refused: u.refused.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
                    ended: u.ended.iter().map(|(e, n)| (e.to_string(), *n)).collect(),
                    bytes_up: u.bytes_up,
                    bytes_down: u.bytes_down,
                    durations: u.durations.clone(),
                    undelivered_resets: u.undelivered_resets,
                    undelivered_bytes: u.undelivered_bytes,
                    hosts: u
                        .balancer
                        .hosts()
                        .map(|(_, h)| HostStats {
                            addr: h.addr,
                            active: h.active(),
                            up: h.is_up(),
                            removed: h.removed,
                            connections: h.counters.connections,
                            connect_failures: h.counters.connect_failures,
                            checks_passed: h.counters.checks_passed,
                            checks_failed: h.counters.checks_failed,
                            transitions: h.counters.transitions,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    pub(super) fn accept_admin(&mut self, now: Instant) {
        let c = &mut self.control;
        let Some(listener) = c.admin.as_ref() else {
            return;
        };
        loop {
            let (stream, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if c.admin_conns.len() >= admin::MAX_CONNECTIONS {
                // Idle connections must not lock a scrape out: the one
                // that has waited longest without a request makes room.
                let oldest = c
                    .admin_conns
                    .iter()
                    .filter(|(_, conn)| conn.is_idle())
                    .min_by_key(|(_, conn)| conn.id)
                    .map(|(key, _)| key);
                let Some(oldest) = oldest else { continue };
                c.admin_conns.remove(oldest).abort();
                if let Some(more) = c.admin_evictions.allow(now) {
                    warn!(
                        "admin: {} connections open, closed the oldest idle one to take a new one ({more} more since the last report)",
                        admin::MAX_CONNECTIONS
                    );
                }
            }
            let entry = c.admin_conns.vacant_entry();
            let key = entry.key();
            let token = Registration::Admin(key).token();
            let id = self.worker.next_id;
            self.worker.next_id += 1;
            let Ok(conn) = AdminConn::new(stream, id, now, self.worker.poll.registry(), token)
            else {
                continue;
            };
            c.admin_timers.push(conn.deadline, key, id);
            entry.insert(conn);
        }
    }

    pub(super) fn on_admin_event(&mut self, key: usize, event: &mio::event::Event, now: Instant) {
        let Some(conn) = self.control.admin_conns.get_mut(key) else {
            return;
        };
        conn.on_event(event);
        loop {
            match self.control.admin_conns[key].advance() {
                AdminStep::Wait => return,
                AdminStep::Close => {
                    self.control.admin_conns.remove(key);
                    return;
                }
                AdminStep::Request(request) => {
                    let answer = self.answer(&request, now);
                    self.control.admin_conns[key].answer(answer);
                }
            }
        }
    }

    pub(super) fn expire_admin(&mut self, now: Instant) {
        let c = &mut self.control;
        while let Some((_, key, id)) = c.admin_timers.pop_due(now) {
            if c.admin_conns.get(key).is_some_and(|conn| conn.id == id) {
                c.admin_conns.remove(key).abort();
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
