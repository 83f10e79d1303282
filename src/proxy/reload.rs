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
//!
//! [`Control::rehost`] and [`Control::put_in_force`] are also how a DNS
//! answer changes hosts (`names.rs`): one path for hosts that join and
//! hosts that drain, whatever changed them.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use mio::net::TcpListener;

use super::control::Control;
use super::shared::{Snapshot, TlsMaterial, load_tls};
use super::worker::Order;
use crate::config::{ClusterSettings, Config, RefusalMode, Settings, UpstreamConfig};
use crate::error::Warning;
use crate::io::net;
use crate::logs::plural;
use crate::policy::access::Access;
use crate::policy::balance::LoadBalancer;
use crate::policy::health::HealthSettings;
use crate::policy::queue::WaitQueue;
use crate::policy::trust::SourceNet;
use crate::proxy_header::Version;
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
    /// Each host's weight and cap, by address.
    limits: Vec<(SocketAddr, u32, Option<u32>)>,
    tls: bool,
    refusal: RefusalMode,
    health: HealthSettings,
    queue: (Option<Duration>, Option<u32>),
    send_proxy: Option<Version>,
    accept_proxy: Vec<SourceNet>,
}

impl Before {
    fn of(u: &Upstream) -> Before {
        Before {
            listen: u.listen,
            hosts: live_hosts(u),
            limits: host_limits(u),
            tls: u.tls,
            refusal: u.refusal,
            health: u.health.clone(),
            queue: (u.queue_timeout, u.max_queued),
            send_proxy: u.send_proxy,
            accept_proxy: u.accept_proxy.clone(),
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
        let changed = host_limits(u)
            .into_iter()
            .filter_map(|(addr, weight, max)| {
                let (_, was_weight, was_max) = *self.limits.iter().find(|l| l.0 == addr)?;
                let mut what = Vec::new();
                if weight != was_weight {
                    what.push(format!("weight {weight} (was {was_weight})"));
                }
                if max != was_max {
                    let cap = |m: Option<u32>| m.map_or("none".to_string(), |m| m.to_string());
                    what.push(format!(
                        "max_connections {} (was {})",
                        cap(max),
                        cap(was_max)
                    ));
                }
                (!what.is_empty()).then(|| format!("host {addr}: {}", what.join(", ")))
            });
        out.extend(changed);
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
        if (u.queue_timeout, u.max_queued) != self.queue {
            out.push("queue_timeout/max_queued changed".to_string());
        }
        if u.send_proxy != self.send_proxy {
            let name = |v: Option<Version>| v.map_or("off", Version::name);
            let (new, old) = (name(u.send_proxy), name(self.send_proxy));
            out.push(format!("send_proxy = {new} (was {old})"));
        }
        if u.accept_proxy != self.accept_proxy {
            out.push("accept_proxy changed (for new connections)".to_string());
        }
        out
    }
}

/// An upstream new in this config, logged with its address and hosts.
fn added_upstream(
    id: usize,
    u: &UpstreamConfig,
    listen: SocketAddr,
    queue: Arc<WaitQueue>,
    changes: &mut Changes,
) -> Upstream {
    let new = Upstream::new(id, u, listen, LoadBalancer::new(&u.addresses(), queue));
    changes.added += 1;
    let hosts: Vec<String> = live_hosts(&new).iter().map(ToString::to_string).collect();
    changes.lines.push(format!(
        "upstream `{}` added, listening on {} -> {}",
        new.name,
        new.listen,
        hosts.join(", ")
    ));
    new
}

/// Changes a reload takes but cannot apply until the next start.
fn warn_of_what_waits_for_a_restart(
    old: &Settings,
    new: &Config,
    admin: Option<SocketAddr>,
    cluster: Option<&ClusterSettings>,
) {
    if new.settings.workers != old.workers {
        warn!("reload: a change of `workers` takes effect at the next start");
    }
    if new.admin != admin {
        warn!("reload: a change of [admin] takes effect at the next start");
    }
    if new.cluster.as_ref() != cluster {
        warn!("reload: a change of [cluster] takes effect at the next start");
    }
    if old.socket_buffer.is_some() && new.settings.socket_buffer.is_none() {
        warn!(
            "reload: listeners kept from before keep their fixed socket buffers until the next start"
        );
    }
}

/// The addresses of an upstream's hosts that take new connections.
fn live_hosts(u: &Upstream) -> Vec<SocketAddr> {
    u.balancer.hosts().map(|(_, h)| h.addr).collect()
}

/// Each host's address, weight and cap.
fn host_limits(u: &Upstream) -> Vec<(SocketAddr, u32, Option<u32>)> {
    u.balancer
        .hosts()
        .map(|(_, h)| (h.addr, h.weight(), h.max_connections()))
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
        ("unsent_limit", old.unsent_limit != new.unsent_limit),
        (
            "source_rate/source_burst",
            old.source_limit != new.source_limit,
        ),
        ("queue_timeout", old.queue_timeout != new.queue_timeout),
        ("max_queued", old.max_queued != new.max_queued),
        ("keepalive", old.keepalive != new.keepalive),
        ("access_log", old.access_log != new.access_log),
        ("accept_proxy", old.accept_proxy != new.accept_proxy),
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
        let (mut config, tls, mut changes) = self.read_config(path)?;
        let unresolved = self.names.carry_over(&mut config);
        let old = self.shared.snapshot();
        let drain = config.settings.drain_timeout;
        let fresh = self.bind_new_listeners(&config, &old)?;
        let settings = changed_settings(&old.settings, &config.settings);
        if !settings.is_empty() {
            changes
                .lines
                .push(format!("[defaults] changed: {}", settings.join(", ")));
        }
        let cluster = self.config_cluster.as_ref();
        warn_of_what_waits_for_a_restart(&old.settings, &config, self.config_admin, cluster);
        let listening = |id: usize, before: Option<&Arc<Upstream>>, configured: SocketAddr| {
            fresh
                .iter()
                .find(|(i, _, _)| *i == id)
                .map_or_else(|| before.map_or(configured, |b| b.listen), |(_, _, l)| *l)
        };
        let mut upstreams = Vec::new();
        for u in &config.upstreams {
            let id = self.upstream_id(&u.name);
            let before = old.upstream(id);
            let listen = listening(id, before, u.listen);
            let new = match before {
                Some(o) => self.keep_upstream(o, u, (listen, drain, now), &mut changes),
                None => added_upstream(id, u, listen, self.shared.bells.queue(), &mut changes),
            };
            upstreams.push(Arc::new(new));
        }
        self.retire_removed(&old, &upstreams, drain, &mut changes);
        let followed = config
            .upstreams
            .iter()
            .filter(|u| !u.names.is_empty())
            .map(|u| (self.upstream_id(&u.name), u.clone()))
            .collect();
        let interval = config.settings.resolve_interval;
        let snapshot = Snapshot {
            settings: config.settings,
            access: Arc::new(Access::reload(&old.access, config.clients)),
            tls,
            upstreams,
        };
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
        self.config_admin = config.admin;
        let fresh = fresh
            .into_iter()
            .map(|(id, group, _)| (id, group))
            .collect();
        self.put_in_force(snapshot, fresh, now + drain, now);
        self.names.follow(followed, unresolved, interval, now);
        for u in &rescheduled {
            self.checks.schedule_upstream(u, now);
        }
        Ok(changes)
    }

    /// The config file, adjusted by the embedder, with its TLS material
    /// loaded: everything that can fail on the file's account, before
    /// anything changes.
    #[allow(clippy::type_complexity)]
    fn read_config(&self, path: &Path) -> Result<(Config, TlsMaterial, Changes), String> {
        let mut config = Config::load(path).map_err(|e| e.to_string())?;
        if let Some(adjust) = &self.adjust_config {
            config = adjust(config).map_err(|e| e.to_string())?;
        }
        let mut changes = Changes {
            warnings: std::mem::take(&mut config.warnings),
            ..Changes::default()
        };
        let (tls, tls_warnings) = load_tls(&config).map_err(|e| e.to_string())?;
        changes.warnings.extend(tls_warnings);
        Ok((config, tls, changes))
    }

    /// An upstream the old config had too (see [`rehost`](Self::rehost)),
    /// counted and logged among the reload's changes.
    fn keep_upstream(
        &mut self,
        old: &Upstream,
        u: &UpstreamConfig,
        at: (SocketAddr, Duration, Instant),
        changes: &mut Changes,
    ) -> Upstream {
        let (new, differences) = self.rehost(old, u, at);
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
        new
    }

    /// `old` as `u` describes it, listening on `listen`, with what differs,
    /// in words. Its kept hosts keep their records; a host that joins
    /// ramps in over `slow_start` when it is set; removed ones are
    /// retired: no new connections, their pairs drain for `drain`, and
    /// they stay visible while they have connections. Reload and DNS
    /// (`names.rs`) both change hosts this way.
    pub(super) fn rehost(
        &mut self,
        old: &Upstream,
        u: &UpstreamConfig,
        (listen, drain, now): (SocketAddr, Duration, Instant),
    ) -> (Upstream, Vec<String>) {
        // Read before the reuse, which changes kept hosts' weights in place.
        let was = Before::of(old);
        let balancer = LoadBalancer::reuse(&old.balancer, &u.addresses());
        if let Some(ramp) = u.health.slow_start {
            for host in balancer.joined_since(&old.balancer) {
                host.ramp_in(ramp, now);
            }
        }
        let dropped = balancer.dropped_from(&old.balancer);
        let drained: Vec<(SocketAddr, u32)> =
            dropped.iter().map(|h| (h.addr, h.active())).collect();
        self.retired_hosts
            .extend(dropped.into_iter().map(|h| (old.id, h)));
        let new = Upstream::new(old.id, u, listen, balancer);
        let differences = was.differences(&new, &drained, drain);
        (new, differences)
    }

    /// Puts `snapshot` in force: hosts back in a balancer leave the
    /// retired ones (and retired hosts without connections are
    /// forgotten), every worker takes it with `fresh` listeners (pairs of
    /// removed hosts drain until `drain_by`), and hosts that joined an
    /// actively checked upstream get their first checks.
    pub(super) fn put_in_force(
        &mut self,
        snapshot: Snapshot,
        fresh: Vec<(usize, Vec<TcpListener>)>,
        drain_by: Instant,
        now: Instant,
    ) {
        for u in &snapshot.upstreams {
            self.retired_hosts
                .retain(|(i, h)| *i != u.id || !u.balancer.hosts().any(|(_, k)| Arc::ptr_eq(k, h)));
        }
        self.retired_hosts.retain(|(_, h)| h.active() > 0);
        let upstreams = snapshot.upstreams.clone();
        self.shared.publish(snapshot);
        self.hand_to_workers(fresh, drain_by);
        for u in &upstreams {
            self.checks.schedule_joined(u, now);
        }
    }

    /// The old upstreams the new config no longer has: they stop taking
    /// connections and stay visible while their hosts have some.
    fn retire_removed(
        &mut self,
        old: &Snapshot,
        kept: &[Arc<Upstream>],
        drain: Duration,
        changes: &mut Changes,
    ) {
        for o in &old.upstreams {
            if kept.iter().any(|u| u.id == o.id) {
                continue;
            }
            let active: u32 = o.balancer.hosts().map(|(_, h)| h.active()).sum();
            changes.removed += 1;
            changes.lines.push(format!(
                "upstream `{}` removed, no longer listening on {}{}",
                o.name,
                o.listen,
                draining_pairs(active as usize, drain)
            ));
            o.balancer.retire_all();
            self.retired.push(o.clone());
        }
    }

    /// Tells every worker to take the published snapshot, with one of each
    /// new listener group, and waits until each has: a client that
    /// connects after the reload's answer gets the new config (its
    /// listener buffers included). A worker that stopped meanwhile drops
    /// its sender, which ends the wait early.
    fn hand_to_workers(&self, mut fresh: Vec<(usize, Vec<TcpListener>)>, drain_by: Instant) {
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
        drop(applied);
        let deadline = Instant::now() + APPLY_WAIT;
        for _ in 0..told {
            let left = deadline.saturating_duration_since(Instant::now());
            if answers.recv_timeout(left).is_err() {
                warn!("reload: a worker has not taken the new configuration within {APPLY_WAIT:?}");
                break;
            }
        }
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
                net::listen_group(u.listen, self.workers.len(), s.backlog, net::Tuning::of(s))
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
