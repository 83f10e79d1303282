//! Everything that steers the loop rather than relaying: signals, commands
//! from a [`Handle`], the admin endpoint (`/metrics`, `/status`,
//! `/reload`), the counters snapshot, graceful shutdown, and reload.
//!
//! A reload applies a valid new config in place: new upstreams start
//! listening (all binds succeed, or none is kept and the reload is
//! rejected), removed ones stop; added hosts take traffic; removed hosts
//! and upstreams take no new connections and their pairs drain for the
//! drain period, then are closed; client rules, TLS material and settings
//! apply to new connections. No other established connection is touched.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{self, Sender};
use std::time::Instant;

use log::{error, info, warn};
use mio::{Interest, Waker};
use signal_hook::consts::SIGHUP;
use socket2::SockRef;

use super::{Proxy, bind_listener};
use crate::admin::{self, AdminConn, AdminStep, Method, Request};
use crate::buffer::BufferPool;
use crate::config::Config;
use crate::limits::SourceLimiter;
use crate::metrics::{self, HostStats, Stats, UpstreamStats};
use crate::net;
use crate::token::Source;
use crate::upstream::Upstream;

/// A listener bound for a reload: upstream name, listener key, address.
type FreshListener = (String, usize, std::net::SocketAddr);

/// A request to the loop from another thread.
#[derive(Debug)]
pub(super) enum Command {
    Shutdown,
    Stats(Sender<Stats>),
    Reload(Sender<Result<(), String>>),
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
}

impl Proxy {
    pub(super) fn on_signals(&mut self, now: Instant) {
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

    pub(super) fn on_commands(&mut self, now: Instant) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Shutdown => self.shutdown(now),
                Command::Stats(reply) => {
                    let _ = reply.send(self.stats(now));
                }
                Command::Reload(reply) => {
                    let _ = reply.send(self.reload(now));
                }
            }
        }
    }

    /// First call: stop accepting and start the drain period. Second call: stop now.
    pub(super) fn shutdown(&mut self, now: Instant) {
        if self.drain_deadline.is_some() {
            info!("second shutdown request: stopping now");
            self.stop_now = true;
            return;
        }
        for mut listener in self.listeners.drain() {
            let _ = self.poll.registry().deregister(&mut listener.socket);
        }
        for u in &mut self.upstreams {
            u.listener = None;
        }
        self.drain_deadline = Some(now + self.settings.drain_timeout);
        info!(
            "shutting down: no longer accepting; draining {} connections for up to {:?}",
            self.pairs.len(),
            self.settings.drain_timeout
        );
    }

    pub(super) fn stats(&self, now: Instant) -> Stats {
        Stats {
            pairs: self.pairs.len(),
            refusing: self.refusing,
            buffers_in_use: self.pool.in_use(),
            handshakes: self.handshaking,
            uptime: now.saturating_duration_since(self.started),
            reloads: self.reloads,
            clients: self
                .access
                .active()
                .map(|(id, n)| (id.to_string(), n))
                .collect(),
            upstreams: self
                .upstreams
                .iter()
                .filter(|u| {
                    !u.removed
                        || u.hosts
                            .iter()
                            .enumerate()
                            .any(|(h, _)| u.balancer.active(h) > 0)
                })
                .map(|u| UpstreamStats {
                    name: u.name.clone(),
                    listen: u.listen,
                    tls: u.tls,
                    removed: u.removed,
                    refused: u.refused.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
                    bytes_up: u.bytes_up,
                    bytes_down: u.bytes_down,
                    durations: u.durations.clone(),
                    undelivered_resets: u.undelivered_resets,
                    undelivered_bytes: u.undelivered_bytes,
                    hosts: u
                        .hosts
                        .iter()
                        .enumerate()
                        .map(|(h, info)| HostStats {
                            addr: u.balancer.addr(h),
                            active: u.balancer.active(h),
                            up: u.balancer.is_up(h),
                            removed: u.balancer.is_removed(h),
                            connections: info.connections,
                            connect_failures: info.connect_failures,
                            checks_passed: info.checks_passed,
                            checks_failed: info.checks_failed,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    pub(super) fn accept_admin(&mut self, now: Instant) {
        let Some(listener) = self.admin.as_ref() else {
            return;
        };
        loop {
            let (mut stream, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.admin_conns.len() >= admin::MAX_CONNECTIONS {
                continue;
            }
            let entry = self.admin_conns.vacant_entry();
            let key = entry.key();
            let token = Source::Admin(key).token();
            if self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_err()
            {
                continue;
            }
            let conn = AdminConn::new(stream, self.next_id, now);
            self.admin_timers.push(conn.deadline, key, self.next_id);
            self.next_id += 1;
            entry.insert(conn);
        }
    }

    pub(super) fn on_admin_event(&mut self, key: usize, event: &mio::event::Event, now: Instant) {
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

    pub(super) fn expire_admin(&mut self, now: Instant) {
        while let Some((_, key, id)) = self.admin_timers.pop_due(now) {
            if self.admin_conns.get(key).is_some_and(|c| c.id == id) {
                let conn = self.admin_conns.remove(key);
                net::set_abortive_close(conn.stream());
            }
        }
    }

    fn answer(&mut self, request: &Request, now: Instant) -> Vec<u8> {
        let head = request.method == Method::Head;
        let read = matches!(request.method, Method::Get | Method::Head);
        match (request.path.as_str(), request.method) {
            ("/metrics", _) if read => {
                let body = metrics::prometheus(&self.stats(now));
                admin::response(200, "text/plain; version=0.0.4", body.as_bytes(), head)
            }
            ("/status", _) if read => {
                let body = metrics::status_json(&self.stats(now));
                admin::response(200, "application/json", body.as_bytes(), head)
            }
            ("/reload", Method::Post) => match self.reload(now) {
                Ok(()) => admin::response(200, "text/plain", b"reloaded\n", false),
                Err(e) => admin::response(400, "text/plain", format!("{e}\n").as_bytes(), false),
            },
            ("/metrics" | "/status" | "/reload", _) => {
                admin::response(405, "text/plain", b"method not allowed\n", head)
            }
            _ => admin::response(
                404,
                "text/plain",
                b"not found: try /metrics, /status, POST /reload\n",
                head,
            ),
        }
    }

    /// Re-reads the config file and applies it, or keeps the running config
    /// and says why (the messages of `tcplb check`).
    pub(super) fn reload(&mut self, now: Instant) -> Result<(), String> {
        let result = match self.config_path.clone() {
            None => Err("tcplb runs without --config: there is no file to reload".to_string()),
            Some(path) => self.reload_from(&path, now),
        };
        match &result {
            Ok(()) => {
                self.reloads += 1;
                info!("configuration reloaded");
            }
            Err(e) => error!("reload rejected, the running configuration stays in force:\n{e}"),
        }
        result
    }

    fn reload_from(&mut self, path: &Path, now: Instant) -> Result<(), String> {
        if self.drain_deadline.is_some() {
            return Err("shutting down".to_string());
        }
        let mut config = Config::load(path).map_err(|e| e.to_string())?;
        if let Some(adjust) = &self.adjust_config {
            config = adjust(config).map_err(|e| e.to_string())?;
        }
        let tls = match &config.tls {
            Some(settings) => Some((
                settings.server_config().map_err(|e| e.to_string())?,
                settings.clone(),
            )),
            None => None,
        };
        let fresh = self.bind_new_listeners(&config)?;
        self.apply(config, tls, fresh, now);
        Ok(())
    }

    /// Stops listening on listener `key`, if it is still open.
    fn close_listener(&mut self, key: usize) {
        if let Some(mut listener) = self.listeners.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut listener.socket);
        }
    }

    /// Applies a changed `socket_buffer` to the listeners kept across a
    /// reload, so connections they accept from now on get it (connects to
    /// hosts read the setting each time). Handing a fixed buffer back to
    /// autotuning needs `SO_BUF_LOCK` (Linux 5.16), which socket2 does not
    /// offer, so unsetting it waits for a restart.
    fn resize_listener_buffers(&mut self, size: Option<usize>) {
        let Some(size) = size else {
            warn!(
                "reload: listeners kept from before keep their fixed socket buffers until the next start"
            );
            return;
        };
        for (_, listener) in &self.listeners {
            // A bound listener always has its address.
            let Ok(addr) = listener.socket.local_addr() else {
                continue;
            };
            if let Err(e) = net::set_listener_buffers(&SockRef::from(&listener.socket), size, addr)
            {
                warn!("reload: listener {addr}: cannot set its socket buffers: {e}");
            }
        }
    }

    /// Binds the listeners the new config needs that do not exist yet, and
    /// returns them for `apply` to place. All
    /// or nothing: on any failure, the ones just bound are dropped.
    fn bind_new_listeners(&mut self, config: &Config) -> Result<Vec<FreshListener>, String> {
        let mut bound = Vec::new();
        for u in &config.upstreams {
            let existing = self
                .upstreams
                .iter()
                .position(|o| o.name == u.name && !o.removed);
            let keeps = existing.is_some_and(|i| {
                self.upstreams[i].configured_listen == u.listen
                    && self.upstreams[i].listener.is_some()
            });
            // Another live upstream may hold this address (a rename): it is handed over in `apply`.
            let handed_over = self.upstreams.iter().any(|o| {
                !o.removed
                    && o.configured_listen == u.listen
                    && u.listen.port() != 0
                    && o.listener.is_some()
            });
            if keeps || handed_over {
                continue;
            }
            // The listener's upstream index is set when `apply` hands it over.
            match bind_listener(
                &self.poll,
                &mut self.listeners,
                usize::MAX,
                u,
                &config.settings,
            ) {
                Ok((key, local)) => bound.push((u.name.clone(), key, local)),
                Err(e) => {
                    for (_, key, _) in bound {
                        self.close_listener(key);
                    }
                    return Err(e.to_string());
                }
            }
        }
        Ok(bound)
    }

    fn apply(
        &mut self,
        config: Config,
        tls: Option<(Arc<rustls::ServerConfig>, crate::tls::TlsSettings)>,
        fresh: Vec<FreshListener>,
        now: Instant,
    ) {
        if (config.settings.buffer_size, config.settings.bulk_buffer())
            != (self.settings.buffer_size, self.settings.bulk_buffer())
        {
            let in_use = self.pool.in_use();
            self.pool = BufferPool::new(
                config.settings.buffer_size,
                config.settings.bulk_buffer(),
                super::POOL_KEEP_BYTES,
            );
            self.pool.adopt(in_use);
        }
        if config.settings.source_limit != self.settings.source_limit {
            self.sources = config.settings.source_limit.map(SourceLimiter::new);
        }
        if config.settings.socket_buffer != self.settings.socket_buffer {
            self.resize_listener_buffers(config.settings.socket_buffer);
        }
        if config.admin != self.config_admin {
            warn!("reload: a change of [admin] takes effect at the next start");
        }
        self.settings = config.settings.clone();
        self.tls = tls;
        self.access.reload(config.clients.clone());

        let drain_by = now + self.settings.drain_timeout;
        let mut draining = Vec::new();
        // Upstreams gone from the config: stop listening, drain.
        for (index, u) in self.upstreams.iter_mut().enumerate() {
            if !u.removed && !config.upstreams.iter().any(|n| n.name == u.name) {
                u.removed = true;
                draining.push((index, None));
            }
        }
        for new in &config.upstreams {
            let index = match self.upstreams.iter().position(|o| o.name == new.name) {
                Some(index) => index,
                None => {
                    let u = Upstream::new(
                        new.name.clone(),
                        new.listen,
                        new.listen,
                        new.hosts.clone(),
                        new.tls,
                        new.health.clone(),
                    );
                    self.upstreams.push(u);
                    self.upstreams.len() - 1
                }
            };
            let u = &mut self.upstreams[index];
            let was_removed = std::mem::replace(&mut u.removed, false);
            u.tls = new.tls;
            let checks_changed =
                u.health.active != new.health.active || u.health.interval != new.health.interval;
            u.health = new.health.clone();
            // Hosts: add the new ones, remove the ones gone (they drain).
            for &addr in &new.hosts {
                u.add_host(addr);
            }
            for host in 0..u.balancer.len() {
                if !u.balancer.is_removed(host) && !new.hosts.contains(&u.balancer.addr(host)) {
                    u.balancer.remove(host);
                    draining.push((index, Some(host)));
                }
            }
            if was_removed
                || checks_changed
                || u.configured_listen != new.listen
                || u.listener.is_none()
            {
                self.schedule_upstream_checks(index, now);
            }
            self.relisten(index, new.listen, &fresh);
        }
        // Listeners of removed upstreams.
        for index in 0..self.upstreams.len() {
            if self.upstreams[index].removed {
                if let Some(key) = self.upstreams[index].listener.take() {
                    self.close_listener(key);
                }
            }
        }
        // Pairs of removed hosts and upstreams get the drain period.
        let keys: Vec<usize> = self
            .pairs
            .iter()
            .filter(|(_, p)| {
                draining
                    .iter()
                    .any(|&(u, h)| p.upstream == u && (h.is_none() || p.host_id() == h))
            })
            .map(|(key, _)| key)
            .collect();
        for key in keys {
            self.pairs[key].drain_by = Some(drain_by);
            self.schedule(key);
        }
        self.config_admin = config.admin;
        self.log_listening();
    }

    /// Points upstream `index` at the listener for `listen`: its own if the
    /// address is unchanged, one bound for this reload, or one handed over
    /// from another upstream that had the same address.
    fn relisten(&mut self, index: usize, listen: std::net::SocketAddr, fresh: &[FreshListener]) {
        let name = self.upstreams[index].name.clone();
        let current = self.upstreams[index].listener;
        if current.is_some() && self.upstreams[index].configured_listen == listen {
            return;
        }
        let (key, local) = if let Some((_, key, local)) = fresh.iter().find(|(n, _, _)| *n == name)
        {
            (*key, *local)
        } else if let Some(other) = (0..self.upstreams.len()).find(|&o| {
            o != index
                && self.upstreams[o].configured_listen == listen
                && self.upstreams[o].listener.is_some()
        }) {
            let key = self.upstreams[other]
                .listener
                .take()
                .expect("checked above");
            (key, self.upstreams[other].listen)
        } else {
            return;
        };
        if let Some(old) = current.filter(|&old| old != key) {
            self.close_listener(old);
        }
        self.listeners[key].upstream = index;
        let u = &mut self.upstreams[index];
        u.listener = Some(key);
        u.configured_listen = listen;
        u.listen = local;
    }
}
