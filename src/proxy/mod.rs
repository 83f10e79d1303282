//! The proxy: `workers` worker threads, each one `mio::Poll` loop that
//! accepts and relays its own pairs, and one control thread that steers
//! them.
//!
//! ```text
//!   control thread (the one that calls `run`)          worker threads
//!   ┌────────────────────────────────────┐   orders    ┌─────────────────────┐
//!   │ signals, Handle commands, admin    │ ──────────> │ poll: listeners     │ × workers
//!   │ health probes, reload, drain,      │ <────────── │ (SO_REUSEPORT),     │
//!   │ counters snapshot (sums workers)   │   events    │ pairs, deadlines,   │
//!   └────────────────────────────────────┘             │ buffers, counters   │
//!                 │ publishes                          └─────────────────────┘
//!                 ▼                                              │ reads
//!   Shared: snapshot (settings, upstreams with their hosts' records, client
//!   rules, TLS) + process-wide caps (max_connections, handshakes, sources)
//! ```
//!
//! A connection reaches a worker through its own listener on the
//! upstream's address (`SO_REUSEPORT`: the kernel spreads connections, no
//! thread hands sockets over). The host choice sees every worker's
//! connections, because a host's count is one shared atomic; what else
//! must be global (caps, client buckets and counts, health) is shared the
//! same way, touched once per connection and never per byte. Everything a
//! worker relays with is its own.
//!
//! Invariants kept here: a socket is registered once, for everything it
//! will need, in the poller of the thread that owns it, and closing it
//! (dropping its owner) removes it from that poll set; a pair's counts are
//! leases, given back when the pair (or the state holding them) goes.

mod accept;
mod checks;
mod control;
mod names;
mod probe;
mod reload;
mod shared;
mod timers;
mod token;
mod worker;

pub use control::{Handle, PairKeepalive};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;

use log::{info, warn};
use mio::net::TcpListener;
use mio::{Interest, Poll, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::cluster::{Cluster, ClusterLink};
use crate::config::Config;
use crate::error::Error;
use crate::io::net;
use crate::logs::Throttle;
use crate::policy::access::{Access, Sharing};
use crate::policy::balance::LoadBalancer;
use crate::upstream::Upstream;
use checks::HealthChecks;
use control::{Command, Control, WorkerLink};
use names::Names;
use shared::{Bells, Shared, Snapshot};
use timers::Timers;
use token::Registration;
use worker::{Link, Worker};

/// See [`Proxy::set_config_adjust`].
type AdjustConfig = Box<dyn Fn(Config) -> Result<Config, Error> + Send>;

/// The load balancer: listeners bound, ready to [`run`](Proxy::run).
pub struct Proxy {
    control: Control,
    workers: Vec<Worker>,
    /// With `[cluster]`: the thread that shares client limits, to start.
    cluster: Option<Cluster>,
}

/// A poller and its waker for each of `n` workers.
fn worker_polls(n: usize) -> Result<Vec<(Poll, Arc<Waker>)>, Error> {
    let setup = |what| move |source| Error::Setup { what, source };
    (0..n)
        .map(|_| {
            let poll = Poll::new().map_err(setup("a worker's poller"))?;
            let waker = Waker::new(poll.registry(), Registration::Control.token())
                .map_err(setup("a worker's waker"))?;
            Ok((poll, Arc::new(waker)))
        })
        .collect()
}

/// Listening sockets of every upstream, `n` each (one per worker, on one
/// port through `SO_REUSEPORT`), with the upstreams they serve.
#[allow(clippy::type_complexity)]
fn bind_upstreams(
    config: &Config,
    n: usize,
    bells: &Arc<Bells>,
) -> Result<(Vec<Arc<Upstream>>, Vec<(usize, Vec<TcpListener>)>), Error> {
    let s = &config.settings;
    let mut upstreams = Vec::with_capacity(config.upstreams.len());
    let mut groups = Vec::with_capacity(config.upstreams.len());
    for (id, u) in config.upstreams.iter().enumerate() {
        let (group, local) = net::listen_group(u.listen, n, s.backlog, net::Tuning::of(s))
            .map_err(|source| Error::Bind {
                upstream: u.name.clone(),
                addr: u.listen,
                source,
            })?;
        groups.push((id, group));
        let balancer = LoadBalancer::new(&u.addresses(), bells.queue());
        upstreams.push(Arc::new(Upstream::new(id, u, local, balancer)));
    }
    Ok((upstreams, groups))
}

/// One worker on each poller, with its share of the listening sockets
/// (one of each upstream's group), and the control thread's link to it.
fn start_workers(
    polls: Vec<(Poll, Arc<Waker>)>,
    shared: &Arc<Shared>,
    mut groups: Vec<(usize, Vec<TcpListener>)>,
    cluster: Option<&ClusterLink>,
    (events, control): (&mpsc::Sender<Command>, &Arc<Waker>),
) -> Result<(Vec<Worker>, Vec<WorkerLink>), Error> {
    let mut workers = Vec::with_capacity(polls.len());
    let mut links = Vec::with_capacity(polls.len());
    for (index, (poll, waker)) in polls.into_iter().enumerate() {
        if let Some(cluster) = cluster {
            cluster.add_worker(waker.clone());
        }
        let (orders_tx, orders) = mpsc::channel();
        let listeners = (groups.iter_mut())
            .map(|(id, group)| (*id, group.remove(0)))
            .collect();
        let link = Link {
            orders,
            events: events.clone(),
            control: control.clone(),
        };
        workers.push(Worker::new(index, poll, shared.clone(), listeners, link)?);
        links.push(WorkerLink {
            orders: orders_tx,
            waker,
            draining: None,
            stopped: false,
        });
    }
    Ok((workers, links))
}

/// The host names the control thread follows (re-resolving each
/// `resolve_interval`), and those that did not resolve at start.
fn followed_names(config: &Config, now: Instant) -> Names {
    let mut names = Names::default();
    let followed = (config.upstreams.iter().enumerate())
        .filter(|(_, u)| !u.names.is_empty())
        .map(|(id, u)| (id, u.clone()))
        .collect();
    let unresolved = (config.upstreams.iter())
        .flat_map(|u| &u.names)
        .filter(|n| n.addrs.is_empty())
        .map(|n| n.name.to_ascii_lowercase())
        .collect();
    names.follow(followed, unresolved, config.settings.resolve_interval, now);
    names
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Binds every upstream's listen address (once per worker). Nothing is
    /// accepted until [`run`](Proxy::run).
    pub fn bind(config: &Config) -> Result<Proxy, Error> {
        let setup = |what| move |source| Error::Setup { what, source };
        let (tls, tls_warnings) = shared::load_tls(config)?;
        for warning in config.warnings.iter().chain(&tls_warnings) {
            warn!("{warning}");
        }
        let n = config.settings.workers.max(1);
        // Each worker's poller and waker first: the upstreams' wait queues
        // ring the wakers.
        let polls = worker_polls(n)?;
        let bells = Arc::new(Bells::new(polls.iter().map(|(_, w)| w.clone()).collect()));
        let (upstreams, groups) = bind_upstreams(config, n, &bells)?;
        let sharing = config.cluster.as_ref().map(|c| Sharing {
            instances: c.instances,
            fallback: c.fallback,
            lease: c.lease,
        });
        let (cluster, link) = match &config.cluster {
            Some(settings) => {
                // The files of a `rediss://` Redis are read once, here.
                let tls = match &settings.tls {
                    Some(tls) => Some(tls.client_config()?),
                    None => None,
                };
                let (cluster, link) =
                    Cluster::new(settings, tls).map_err(setup("the cluster thread's poller"))?;
                (Some(cluster), Some(link))
            }
            None => (None, None),
        };
        let shared = Arc::new(Shared::new(
            Snapshot {
                settings: config.settings.clone(),
                access: Arc::new(Access::new(config.clients.clone(), sharing)),
                tls,
                upstreams,
            },
            bells,
            link.clone(),
        ));
        let poll = Poll::new().map_err(setup("the poller"))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), Registration::Control.token())
                .map_err(setup("the waker"))?,
        );
        let (tx, commands) = mpsc::channel();
        let (workers, links) =
            start_workers(polls, &shared, groups, link.as_deref(), (&tx, &waker))?;
        let admin = match config.admin {
            Some(addr) => Some(bind_admin(&poll, addr)?),
            None => None,
        };
        let names = followed_names(config, shared.clock.now());
        let upstream_ids = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(id, u)| (u.name.clone(), id))
            .collect::<HashMap<_, _>>();
        Ok(Proxy {
            control: Control {
                poll,
                shared,
                workers: links,
                checks: HealthChecks::new(),
                admin,
                admin_conns: Slab::new(),
                admin_timers: Timers::default(),
                admin_evictions: Throttle::default(),
                next_admin_id: 1,
                config_path: None,
                adjust_config: None,
                config_admin: config.admin,
                config_cluster: config.cluster.clone(),
                upstream_ids,
                retired: Vec::new(),
                retired_hosts: Vec::new(),
                names,
                draining: false,
                signals: None,
                commands,
                handle: Handle::new(tx, waker),
                started: Instant::now(),
                reloads: 0,
                clock_waiters: Vec::new(),
            },
            workers,
            cluster,
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
        let snapshot = self.control.shared.snapshot();
        snapshot
            .upstreams
            .iter()
            .find(|u| u.name == upstream)
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
        self.control
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

    /// Serves until a shutdown (signal or [`Handle::shutdown`]) has drained.
    ///
    /// Spliced relaying (`relay`) raises SIGPIPE on a broken connection:
    /// the process must ignore it, as every Rust program does unless it
    /// says otherwise.
    pub fn run(self) -> Result<(), Error> {
        let snapshot = self.control.shared.snapshot();
        log_listening(&snapshot);
        let s = &snapshot.settings;
        info!(
            "tcplb {} ready: workers={} max_connections={} buffer_size={} bulk_buffer_size={} connect_timeout={:?} idle_timeout={:?}",
            env!("CARGO_PKG_VERSION"),
            self.workers.len(),
            s.max_connections,
            s.buffer_size,
            s.bulk_buffer(),
            s.connect_timeout,
            s.idle_timeout,
        );
        if let Some(addr) = self.admin_addr() {
            info!("admin listening on {addr} (GET /metrics, GET /status, POST /reload)");
        }
        let shared = self.control.shared.clone();
        let cluster = match self.cluster {
            Some(cluster) => {
                let (states, clock) = (shared.clone(), shared.clone());
                let thread = cluster
                    .spawn(
                        Box::new(move || states.snapshot().access.states()),
                        Box::new(move || clock.clock.now()),
                    )
                    .map_err(|source| Error::Setup {
                        what: "the cluster thread",
                        source,
                    })?;
                Some(thread)
            }
            None => None,
        };
        let mut threads = Vec::with_capacity(self.workers.len());
        for worker in self.workers {
            let name = format!("tcplb-worker-{}", worker.index);
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || worker.run())
                .map_err(|source| Error::Setup {
                    what: "a worker thread",
                    source,
                })?;
            threads.push(thread);
        }
        let outcome = self.control.run();
        for thread in threads {
            let _ = thread.join();
        }
        // Last: connections closing while draining gave their places back.
        if let (Some(thread), Some(link)) = (cluster, &shared.cluster) {
            link.stop();
            let _ = thread.join();
        }
        outcome
    }
}

/// Logs each upstream's listen address and hosts (at start and after a reload).
fn log_listening(snapshot: &Snapshot) {
    for u in &snapshot.upstreams {
        let hosts: Vec<String> = u
            .balancer
            .hosts()
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

/// Binds and registers the admin listener.
fn bind_admin(poll: &Poll, addr: SocketAddr) -> Result<TcpListener, Error> {
    let mut socket =
        net::listen(addr, 64, net::Tuning::default(), false).map_err(|source| Error::Bind {
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
