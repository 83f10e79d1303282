//! Reload in place, on the control thread: the config file is read and
//! checked here (never on a worker, so a slow or odd file cannot stall
//! relaying), then a new snapshot is published and every worker told.
//!
//! New upstreams start listening (all binds succeed, or none is kept and
//! the reload is rejected), removed ones stop; added hosts take traffic;
//! removed hosts and upstreams take no new connections and their pairs
//! drain for the drain period, then are closed; client rules, TLS material
//! and settings apply to new connections. Kept hosts keep their records
//! (connection counts, health, counters), kept client identities their
//! buckets. No other established connection is touched. The log says what
//! changed: a line per upstream added, removed or changed, and one summary.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};
use mio::net::TcpListener;

use super::control::Control;
use super::shared::Snapshot;
use super::worker::Order;
use crate::config::{Config, RefusalMode, Settings};
use crate::error::Warning;
use crate::io::net;
use crate::logs::plural;
use crate::policy::access::Access;
use crate::policy::balance::LoadBalancer;
use crate::policy::health::HealthSettings;
use crate::upstream::Upstream;

/// How long a reload waits for the workers to take the new config.
const APPLY_WAIT: Duration = Duration::from_secs(5);

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
    u.balancer.hosts().map(|(_, h)| h.addr).collect()
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

impl Control {
    /// Re-reads the config file and applies it, or keeps the running config
    /// and says why (the messages of `tcplb check`).
    pub(super) fn reload(&mut self, now: Instant) -> Result<(), String> {
        let result = match self.config_path.clone() {
            None => Err("tcplb runs without --config: there is no file to reload".to_string()),
            Some(path) => self.reload_from(&path, now),
        };
        match result {
            Ok(changes) => {
                self.reloads += 1;
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
        if self.draining {
            return Err("shutting down".to_string());
        }
        let mut config = Config::load(path).map_err(|e| e.to_string())?;
        if let Some(adjust) = &self.adjust_config {
            config = adjust(config).map_err(|e| e.to_string())?;
        }
        let mut changes = Changes {
            warnings: std::mem::take(&mut config.warnings),
            ..Changes::default()
        };
        let tls = match &config.tls {
            Some(settings) => {
                let (server, tls_warnings) = settings
                    .load(SystemTime::now())
                    .map_err(|e| e.to_string())?;
                changes.warnings.extend(tls_warnings);
                Some((server, settings.clone()))
            }
            None => None,
        };
        let old = self.shared.snapshot();
        let drain = config.settings.drain_timeout;
        let fresh = self.bind_new_listeners(&config, &old)?;
        let settings = changed_settings(&old.settings, &config.settings);
        if !settings.is_empty() {
            changes
                .lines
                .push(format!("[defaults] changed: {}", settings.join(", ")));
        }
        if config.settings.workers != old.settings.workers {
            warn!("reload: a change of `workers` takes effect at the next start");
        }
        let mut upstreams = Vec::new();
        for u in &config.upstreams {
            let id = self.upstream_id(&u.name);
            let before = old.upstream(id);
            let listen = fresh.iter().find(|(i, _, _)| *i == id).map_or_else(
                || before.map_or(u.listen, |b| b.listen),
                |(_, _, local)| *local,
            );
            let balancer = match before {
                Some(o) => {
                    let balancer = LoadBalancer::reuse(&o.balancer, &u.hosts);
                    // Removed hosts stay visible while they have connections.
                    let dropped = balancer.dropped_from(&o.balancer);
                    let drained: Vec<(SocketAddr, u32)> =
                        dropped.iter().map(|h| (h.addr, h.active())).collect();
                    self.retired_hosts
                        .extend(dropped.into_iter().map(|h| (id, h)));
                    let new = Upstream::new(id, u, listen, balancer);
                    let differences = Before::of(o).differences(&new, &drained, drain);
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
                    upstreams.push(Arc::new(new));
                    continue;
                }
                None => LoadBalancer::new(u.hosts.clone()),
            };
            let new = Upstream::new(id, u, listen, balancer);
            changes.added += 1;
            let hosts: Vec<String> = live_hosts(&new).iter().map(ToString::to_string).collect();
            changes.lines.push(format!(
                "upstream `{}` added, listening on {} -> {}",
                new.name,
                new.listen,
                hosts.join(", ")
            ));
            upstreams.push(Arc::new(new));
        }
        for u in &upstreams {
            self.retired_hosts
                .retain(|(i, h)| *i != u.id || !u.balancer.hosts().any(|(_, k)| Arc::ptr_eq(k, h)));
        }
        if config.admin != self.config_admin {
            warn!("reload: a change of [admin] takes effect at the next start");
        }
        if config.cluster != self.config_cluster {
            warn!("reload: a change of [cluster] takes effect at the next start");
        }
        if old.settings.socket_buffer.is_some() && config.settings.socket_buffer.is_none() {
            warn!(
                "reload: listeners kept from before keep their fixed socket buffers until the next start"
            );
        }
        for o in &old.upstreams {
            if !upstreams.iter().any(|u| u.id == o.id) {
                let active: u32 = o.balancer.hosts().map(|(_, h)| h.active()).sum();
                changes.removed += 1;
                changes.lines.push(format!(
                    "upstream `{}` removed, no longer listening on {}{}",
                    o.name,
                    o.listen,
                    draining_pairs(active as usize, drain)
                ));
                // It stays visible while its hosts have connections.
                o.balancer.retire_all();
                self.retired.push(o.clone());
            }
        }
        let snapshot = Snapshot {
            settings: config.settings,
            access: Access::reload(&old.access, config.clients),
            tls,
            upstreams,
        };
        let drain_by = now + drain;
        let rescheduled: Vec<Arc<Upstream>> = snapshot
            .upstreams
            .iter()
            .filter(|u| {
                old.upstream(u.id).is_none_or(|o| {
                    o.health.active != u.health.active
                        || o.health.interval != u.health.interval
                        || o.listen != u.listen
                })
            })
            .cloned()
            .collect();
        self.shared.publish(snapshot);
        self.config_admin = config.admin;
        let mut fresh: Vec<(usize, Vec<TcpListener>)> = fresh
            .into_iter()
            .map(|(id, group, _)| (id, group))
            .collect();
        let (applied, answers) = mpsc::channel();
        let mut told = 0;
        for w in &self.workers {
            let listeners = fresh
                .iter_mut()
                .map(|(id, group)| (*id, group.remove(0)))
                .collect();
            w.send(Order::Reload {
                listeners,
                drain_by,
                applied: applied.clone(),
            });
            told += usize::from(!w.stopped);
        }
        // The reload is done when every worker accepts under it: a client
        // that connects after the answer gets the new config (its listener
        // buffers included). A worker that stopped meanwhile drops its
        // sender, which ends the wait early.
        drop(applied);
        let deadline = Instant::now() + APPLY_WAIT;
        for _ in 0..told {
            let left = deadline.saturating_duration_since(Instant::now());
            if answers.recv_timeout(left).is_err() {
                warn!("reload: a worker has not taken the new configuration within {APPLY_WAIT:?}");
                break;
            }
        }
        for u in &rescheduled {
            self.checks.schedule_upstream(u, now);
        }
        Ok(changes)
    }

    /// Binds, once per worker, each address the new config listens on that
    /// no kept upstream has: all or nothing (on a failure the ones just
    /// bound are dropped). Returns (upstream id, sockets, bound address).
    fn bind_new_listeners(
        &mut self,
        config: &Config,
        old: &Snapshot,
    ) -> Result<Vec<(usize, Vec<TcpListener>, SocketAddr)>, String> {
        let s = &config.settings;
        let mut fresh = Vec::new();
        for u in &config.upstreams {
            let id = self.upstream_id(&u.name);
            // The same address as configured, or the one a port 0 got.
            let kept = old
                .upstream(id)
                .is_some_and(|o| o.configured_listen == u.listen || o.listen == u.listen);
            if kept {
                continue;
            }
            let (group, local) =
                net::listen_group(u.listen, self.workers.len(), s.backlog, s.socket_buffer)
                    .map_err(|e| {
                        format!("upstream `{}`: cannot listen on {}: {e}", u.name, u.listen)
                    })?;
            fresh.push((id, group, local));
        }
        Ok(fresh)
    }

    /// The stable id of upstream `name` (a new one for a new name).
    pub(super) fn upstream_id(&mut self, name: &str) -> usize {
        let next = self.upstream_ids.len();
        *self.upstream_ids.entry(name.to_string()).or_insert(next)
    }
}
