//! Reload in place: a valid new config applies without a restart. New
//! upstreams start listening (all binds succeed, or none is kept and the
//! reload is rejected), removed ones stop; added hosts take traffic;
//! removed hosts and upstreams take no new connections and their pairs
//! drain for the drain period, then are closed; client rules, TLS material
//! and settings apply to new connections. No other established connection
//! is touched.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};
use socket2::SockRef;

use super::{Proxy, bind_listener};
use crate::config::{Config, RefusalMode, Settings};
use crate::error::Warning;
use crate::io::net;
use crate::logs::plural;
use crate::policy::health::HealthSettings;
use crate::policy::limits::SourceLimiter;
use crate::tls::TlsSettings;
use crate::upstream::Upstream;

/// A listener bound for a reload: upstream name, listener key, address.
type FreshListener = (String, usize, SocketAddr);

/// What a reload changed, for the log: a line per upstream added, removed
/// or changed (those left as they were are only counted), and one for
/// `[defaults]`.
#[derive(Debug, Default)]
struct Changes {
    /// The new config's warnings, its TLS files' included.
    warnings: Vec<Warning>,
    lines: Vec<String>,
    added: usize,
    removed: usize,
    changed: usize,
    unchanged: usize,
}

impl Changes {
    /// The closing words: "1 upstream added, 0 removed, 2 changed, 1 unchanged".
    fn summary(&self) -> String {
        format!(
            "{} added, {} removed, {} changed, {} unchanged",
            plural(self.added, "upstream"),
            self.removed,
            self.changed,
            self.unchanged
        )
    }
}

/// An upstream as it was before the reload, to tell what changed.
struct Before {
    listen: SocketAddr,
    hosts: Vec<SocketAddr>,
    tls: bool,
    refusal: RefusalMode,
    health: HealthSettings,
}

impl Before {
    fn of(u: &Upstream) -> Before {
        Before {
            listen: u.listen,
            hosts: live_hosts(u),
            tls: u.tls,
            refusal: u.refusal,
            health: u.health.clone(),
        }
    }

    /// What differs in `u` now, in words; empty if nothing does.
    fn differences(
        &self,
        u: &Upstream,
        drained: &[(SocketAddr, u32)],
        drain: Duration,
    ) -> Vec<String> {
        let mut out = Vec::new();
        let now = live_hosts(u);
        let added: Vec<String> = now
            .iter()
            .filter(|h| !self.hosts.contains(h))
            .map(ToString::to_string)
            .collect();
        if !added.is_empty() {
            out.push(format!("hosts added: {}", added.join(", ")));
        }
        if !drained.is_empty() {
            let removed: Vec<String> = drained
                .iter()
                .map(|(addr, active)| format!("{addr}{}", draining_pairs(*active as usize, drain)))
                .collect();
            out.push(format!("hosts removed: {}", removed.join(", ")));
        }
        if u.listen != self.listen {
            out.push(format!("listening on {} (was {})", u.listen, self.listen));
        }
        if u.tls != self.tls {
            out.push(format!("tls = {} (was {})", u.tls, self.tls));
        }
        if u.refusal != self.refusal {
            let (new, old) = (u.refusal.name(), self.refusal.name());
            out.push(format!("refusal = \"{new}\" (was \"{old}\")"));
        }
        if u.health != self.health {
            out.push("health checks changed".to_string());
        }
        out
    }
}

/// The addresses of an upstream's hosts that take new connections.
fn live_hosts(u: &Upstream) -> Vec<SocketAddr> {
    u.balancer
        .hosts()
        .filter(|(_, h)| !h.removed)
        .map(|(_, h)| h.addr)
        .collect()
}

/// " (its 2 connections drain for 10s)", or nothing without connections.
fn draining_pairs(connections: usize, drain: Duration) -> String {
    if connections == 0 {
        return String::new();
    }
    let noun = if connections == 1 {
        "connection"
    } else {
        "connections"
    };
    let verb = if connections == 1 { "drains" } else { "drain" };
    format!(" (its {connections} {noun} {verb} for {drain:?})")
}

/// The `[defaults]` keys whose values differ, by name.
fn changed_settings(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let differs = [
        (
            "connect_timeout",
            old.connect_timeout != new.connect_timeout,
        ),
        ("idle_timeout", old.idle_timeout != new.idle_timeout),
        (
            "half_close_timeout",
            old.half_close_timeout != new.half_close_timeout,
        ),
        ("drain_timeout", old.drain_timeout != new.drain_timeout),
        (
            "max_connections",
            old.max_connections != new.max_connections,
        ),
        ("buffer_size", old.buffer_size != new.buffer_size),
        (
            "bulk_buffer_size",
            old.bulk_buffer_size != new.bulk_buffer_size,
        ),
        ("backlog", old.backlog != new.backlog),
        ("socket_buffer", old.socket_buffer != new.socket_buffer),
        (
            "source_rate/source_burst",
            old.source_limit != new.source_limit,
        ),
    ];
    differs
        .into_iter()
        .filter(|(_, differs)| *differs)
        .map(|(key, _)| key)
        .collect()
}

impl Proxy {
    /// Re-reads the config file and applies it, or keeps the running config
    /// and says why (the messages of `tcplb check`).
    pub(super) fn reload(&mut self, now: Instant) -> Result<(), String> {
        let result = match self.control.config_path.clone() {
            None => Err("tcplb runs without --config: there is no file to reload".to_string()),
            Some(path) => self.reload_from(&path, now),
        };
        match result {
            Ok(changes) => {
                self.shared.reloads += 1;
                for warning in &changes.warnings {
                    warn!("reload: {warning}");
                }
                for line in &changes.lines {
                    info!("reload: {line}");
                }
                info!("configuration reloaded: {}", changes.summary());
                Ok(())
            }
            Err(e) => {
                // One line, however many problems: a log line per event.
                let why = e.lines().collect::<Vec<_>>().join("; ");
                error!("reload rejected, the running configuration stays in force: {why}");
                Err(e)
            }
        }
    }

    fn reload_from(&mut self, path: &Path, now: Instant) -> Result<Changes, String> {
        if self.control.drain_deadline.is_some() {
            return Err("shutting down".to_string());
        }
        let mut config = Config::load(path).map_err(|e| e.to_string())?;
        if let Some(adjust) = &self.control.adjust_config {
            config = adjust(config).map_err(|e| e.to_string())?;
        }
        let mut warnings = std::mem::take(&mut config.warnings);
        let tls = match &config.tls {
            Some(settings) => {
                let (server, tls_warnings) = settings
                    .load(SystemTime::now())
                    .map_err(|e| e.to_string())?;
                warnings.extend(tls_warnings);
                Some((server, settings.clone()))
            }
            None => None,
        };
        let fresh = self.bind_new_listeners(&config)?;
        let mut changes = self.apply(config, tls, fresh, now);
        changes.warnings = warnings;
        Ok(changes)
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

    /// Puts `config` in force and says what changed.
    fn apply(
        &mut self,
        config: Config,
        tls: Option<(Arc<rustls::ServerConfig>, TlsSettings)>,
        fresh: Vec<FreshListener>,
        now: Instant,
    ) -> Changes {
        let mut changes = Changes::default();
        let settings = changed_settings(&self.shared.settings, &config.settings);
        if !settings.is_empty() {
            changes
                .lines
                .push(format!("[defaults] changed: {}", settings.join(", ")));
        }
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

        let drain = self.shared.settings.drain_timeout;
        let drain_by = now + drain;
        let mut draining = Vec::new();
        // Upstreams gone from the config: stop listening, drain.
        for (index, u) in self.shared.upstreams.iter_mut().enumerate() {
            if !u.removed && !config.upstreams.iter().any(|n| n.name == u.name) {
                u.removed = true;
                draining.push((index, None));
                let pairs = self
                    .worker
                    .pairs
                    .iter()
                    .filter(|(_, p)| p.upstream == index);
                changes.removed += 1;
                changes.lines.push(format!(
                    "upstream `{}` removed, no longer listening on {}{}",
                    u.name,
                    u.listen,
                    draining_pairs(pairs.count(), drain)
                ));
            }
        }
        for new in &config.upstreams {
            let existing = self
                .shared
                .upstreams
                .iter()
                .position(|o| o.name == new.name);
            // A new upstream, or one removed earlier and still draining, is "added".
            let before = existing
                .map(|i| &self.shared.upstreams[i])
                .filter(|u| !u.removed)
                .map(Before::of);
            let index = match existing {
                Some(index) => index,
                None => {
                    let u = Upstream::new(new, new.listen);
                    self.shared.upstreams.push(u);
                    self.shared.upstreams.len() - 1
                }
            };
            let u = &mut self.shared.upstreams[index];
            let mut drained = Vec::new();
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
                    drained.push((h.addr, h.active()));
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
            let u = &self.shared.upstreams[index];
            match before {
                None => {
                    changes.added += 1;
                    let hosts: Vec<String> =
                        live_hosts(u).iter().map(ToString::to_string).collect();
                    changes.lines.push(format!(
                        "upstream `{}` added, listening on {} -> {}",
                        u.name,
                        u.listen,
                        hosts.join(", ")
                    ));
                }
                Some(before) => {
                    let differences = before.differences(u, &drained, drain);
                    if differences.is_empty() {
                        changes.unchanged += 1;
                    } else {
                        changes.changed += 1;
                        changes.lines.push(format!(
                            "upstream `{}` changed: {}",
                            u.name,
                            differences.join("; ")
                        ));
                    }
                }
            }
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
        changes
    }

    /// Points upstream `index` at the listener for `listen`: its own if the
    /// address is unchanged, one bound for this reload, or one handed over
    /// from another upstream that had the same address.
    fn relisten(&mut self, index: usize, listen: SocketAddr, fresh: &[FreshListener]) {
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
