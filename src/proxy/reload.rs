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
//! buckets. No other established connection is touched.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use log::{error, info, warn};
use mio::net::TcpListener;

use super::control::Control;
use super::shared::Snapshot;
use super::worker::Order;
use crate::config::Config;
use crate::io::net;
use crate::policy::access::Access;
use crate::policy::balance::LoadBalancer;
use crate::upstream::Upstream;

impl Control {
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
        if self.draining {
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
        let old = self.shared.snapshot();
        let workers = self.workers.len();
        // Every new listener first: all binds succeed, or none is kept.
        let mut fresh: Vec<(usize, Vec<TcpListener>)> = Vec::new();
        let mut upstreams = Vec::new();
        for u in &config.upstreams {
            let before = old.upstreams.iter().find(|o| o.name == u.name);
            let id = self.upstream_id(&u.name);
            // The same address as configured, or the one a port 0 got.
            let same = |o: &&Arc<Upstream>| o.configured_listen == u.listen || o.listen == u.listen;
            let listen = match before.filter(same) {
                Some(kept) => kept.listen,
                None => {
                    let s = &config.settings;
                    let (group, local) =
                        net::listen_group(u.listen, workers, s.backlog, s.socket_buffer).map_err(
                            |e| {
                                format!("upstream `{}`: cannot listen on {}: {e}", u.name, u.listen)
                            },
                        )?;
                    fresh.push((id, group));
                    local
                }
            };
            let balancer = match before {
                Some(o) => {
                    let balancer = LoadBalancer::reuse(&o.balancer, &u.hosts);
                    // Removed hosts stay visible while they have connections.
                    let dropped = balancer.dropped_from(&o.balancer);
                    self.retired_hosts
                        .extend(dropped.into_iter().map(|h| (id, h)));
                    balancer
                }
                None => LoadBalancer::new(u.hosts.clone()),
            };
            self.retired_hosts
                .retain(|(i, h)| *i != id || !balancer.hosts().any(|(_, k)| Arc::ptr_eq(k, h)));
            upstreams.push(Arc::new(Upstream {
                id,
                name: u.name.clone(),
                configured_listen: u.listen,
                listen,
                balancer,
                tls: u.tls,
                health: u.health.clone(),
            }));
        }
        if config.admin != self.config_admin {
            warn!("reload: a change of [admin] takes effect at the next start");
        }
        if old.settings.socket_buffer.is_some() && config.settings.socket_buffer.is_none() {
            warn!(
                "reload: listeners kept from before keep their fixed socket buffers until the next start"
            );
        }
        for o in &old.upstreams {
            if !upstreams.iter().any(|u| u.id == o.id) {
                info!(
                    "upstream `{}` removed: no longer listening on {}; its connections drain",
                    o.name, o.listen
                );
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
        let drain_by = now + snapshot.settings.drain_timeout;
        let changed: Vec<Arc<Upstream>> = snapshot
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
        for w in &self.workers {
            let listeners = fresh
                .iter_mut()
                .map(|(id, group)| (*id, group.remove(0)))
                .collect();
            w.send(Order::Reload {
                listeners,
                drain_by,
            });
        }
        for u in &changed {
            self.checks.schedule_upstream(u, now);
        }
        super::log_listening(&self.shared.snapshot());
        Ok(())
    }

    /// The stable id of upstream `name` (a new one for a new name).
    pub(super) fn upstream_id(&mut self, name: &str) -> usize {
        let next = self.upstream_ids.len();
        *self.upstream_ids.entry(name.to_string()).or_insert(next)
    }
}
