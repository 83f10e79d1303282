//! Reload in place: a valid new config applies without a restart. New
//! upstreams start listening (all binds succeed, or none is kept and the
//! reload is rejected), removed ones stop; added hosts take traffic;
//! removed hosts and upstreams take no new connections and their pairs
//! drain for the drain period, then are closed; client rules, TLS material
//! and settings apply to new connections. No other established connection
//! is touched.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use log::{error, info, warn};
use socket2::SockRef;

use super::{Proxy, bind_listener};
use crate::config::Config;
use crate::io::net;
use crate::policy::limits::SourceLimiter;
use crate::tls::TlsSettings;
use crate::upstream::Upstream;

/// A listener bound for a reload: upstream name, listener key, address.
type FreshListener = (String, usize, std::net::SocketAddr);

impl Proxy {
    /// Re-reads the config file and applies it, or keeps the running config
    /// and says why (the messages of `tcplb check`).
    pub(super) fn reload(&mut self, now: Instant) -> Result<(), String> {
        let result = match self.control.config_path.clone() {
            None => Err("tcplb runs without --config: there is no file to reload".to_string()),
            Some(path) => self.reload_from(&path, now),
        };
        match &result {
            Ok(()) => {
                self.shared.reloads += 1;
                info!("configuration reloaded");
            }
            Err(e) => error!("reload rejected, the running configuration stays in force:\n{e}"),
        }
        result
    }

    fn reload_from(&mut self, path: &Path, now: Instant) -> Result<(), String> {
        if self.control.drain_deadline.is_some() {
            return Err("shutting down".to_string());
        }
        let mut config = Config::load(path).map_err(|e| e.to_string())?;
        if let Some(adjust) = &self.control.adjust_config {
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
        let w = &mut self.worker;
        if let Some(mut listener) = w.listeners.try_remove(key) {
            let _ = w.poll.registry().deregister(&mut listener.socket);
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
        for (_, listener) in &self.worker.listeners {
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
                .shared
                .upstreams
                .iter()
                .position(|o| o.name == u.name && !o.removed);
            let keeps = existing.is_some_and(|i| {
                self.shared.upstreams[i].configured_listen == u.listen
                    && self.shared.upstreams[i].listener.is_some()
            });
            // Another live upstream may hold this address (a rename): it is handed over in `apply`.
            let handed_over = self.shared.upstreams.iter().any(|o| {
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
                &self.worker.poll,
                &mut self.worker.listeners,
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
        tls: Option<(Arc<rustls::ServerConfig>, TlsSettings)>,
        fresh: Vec<FreshListener>,
        now: Instant,
    ) {
        self.worker
            .support
            .pool
            .resize(config.settings.buffer_size, config.settings.bulk_buffer());
        if config.settings.source_limit != self.shared.settings.source_limit {
            self.shared.sources = config.settings.source_limit.map(SourceLimiter::new);
        }
        if config.settings.socket_buffer != self.shared.settings.socket_buffer {
            self.resize_listener_buffers(config.settings.socket_buffer);
        }
        if config.admin != self.control.config_admin {
            warn!("reload: a change of [admin] takes effect at the next start");
        }
        self.shared.settings = config.settings.clone();
        self.shared.tls = tls;
        self.shared.access.reload(config.clients.clone());

        let drain_by = now + self.shared.settings.drain_timeout;
        let mut draining = Vec::new();
        // Upstreams gone from the config: stop listening, drain.
        for (index, u) in self.shared.upstreams.iter_mut().enumerate() {
            if !u.removed && !config.upstreams.iter().any(|n| n.name == u.name) {
                u.removed = true;
                draining.push((index, None));
            }
        }
        for new in &config.upstreams {
            let index = match self
                .shared
                .upstreams
                .iter()
                .position(|o| o.name == new.name)
            {
                Some(index) => index,
                None => {
                    let u = Upstream::new(new, new.listen);
                    self.shared.upstreams.push(u);
                    self.shared.upstreams.len() - 1
                }
            };
            let u = &mut self.shared.upstreams[index];
            let was_removed = std::mem::replace(&mut u.removed, false);
            u.tls = new.tls;
            u.refusal = new.refusal;
            let checks_changed =
                u.health.active != new.health.active || u.health.interval != new.health.interval;
            u.health = new.health.clone();
            // Hosts: add the new ones, remove the ones gone (they drain).
            for &addr in &new.hosts {
                u.balancer.add(addr);
            }
            for host in 0..u.balancer.len() {
                let h = u.balancer.host(host);
                if !h.removed && !new.hosts.contains(&h.addr) {
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
        for index in 0..self.shared.upstreams.len() {
            if self.shared.upstreams[index].removed {
                if let Some(key) = self.shared.upstreams[index].listener.take() {
                    self.close_listener(key);
                }
            }
        }
        // Pairs of removed hosts and upstreams get the drain period.
        let keys: Vec<usize> = self
            .worker
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
            self.worker.pairs[key].drain_by = Some(drain_by);
            self.schedule(key);
        }
        self.control.config_admin = config.admin;
        self.log_listening();
    }

    /// Points upstream `index` at the listener for `listen`: its own if the
    /// address is unchanged, one bound for this reload, or one handed over
    /// from another upstream that had the same address.
    fn relisten(&mut self, index: usize, listen: std::net::SocketAddr, fresh: &[FreshListener]) {
        let name = self.shared.upstreams[index].name.clone();
        let current = self.shared.upstreams[index].listener;
        if current.is_some() && self.shared.upstreams[index].configured_listen == listen {
            return;
        }
        let (key, local) = if let Some((_, key, local)) = fresh.iter().find(|(n, _, _)| *n == name)
        {
            (*key, *local)
        } else if let Some(other) = (0..self.shared.upstreams.len()).find(|&o| {
            o != index
                && self.shared.upstreams[o].configured_listen == listen
                && self.shared.upstreams[o].listener.is_some()
        }) {
            let key = self.shared.upstreams[other]
                .listener
                .take()
                .expect("checked above");
            (key, self.shared.upstreams[other].listen)
        } else {
            return;
        };
        if let Some(old) = current.filter(|&old| old != key) {
            self.close_listener(old);
        }
        self.worker.listeners[key].upstream = index;
        let u = &mut self.shared.upstreams[index];
        u.listener = Some(key);
        u.configured_listen = listen;
        u.listen = local;
    }
}
