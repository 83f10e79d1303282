//! What every worker shares: the configuration in force (a [`Snapshot`],
//! replaced whole by a reload) and the process-wide limits.
//!
//! A worker reads the snapshot's generation (one atomic load) once per
//! loop turn and takes the new snapshot only when it changed; the lock
//! behind it is taken then, and by the control thread when it publishes.
//! Host counts, host health and client counts live in the snapshot's
//! records as atomics or small locks touched once per connection; nothing
//! here is touched per byte.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use mio::Waker;

use crate::cluster::ClusterLink;
use crate::config::{Config, Settings};
use crate::error::{Error, Warning};
use crate::policy::access::Access;
use crate::policy::capacity::Capacity;
use crate::policy::limits::SourceLimiter;
use crate::policy::queue::{Bell, WaitQueue};
use crate::tls::TlsSettings;
use crate::upstream::Upstream;

/// The configuration in force: settings, upstreams (with their hosts'
/// shared records), client rules, TLS.
#[derive(Debug)]
pub(super) struct Snapshot {
    pub settings: Settings,
    pub upstreams: Vec<Arc<Upstream>>,
    /// Shared as is by a snapshot that only changes hosts (DNS).
    pub access: Arc<Access>,
    /// TLS material, when any upstream speaks TLS.
    pub tls: TlsMaterial,
}

impl Snapshot {
    /// The live upstream of id `id`, if the config still has it.
    pub fn upstream(&self, id: usize) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.id == id)
    }
}

/// A config's TLS server setup and the settings it came from, if it has `[tls]`.
pub(super) type TlsMaterial = Option<(Arc<rustls::ServerConfig>, TlsSettings)>;

/// Loads the TLS material `config` names (none without `[tls]`), with the
/// warnings about it (a certificate close to its end, ...).
pub(super) fn load_tls(config: &Config) -> Result<(TlsMaterial, Vec<Warning>), Error> {
    let Some(settings) = &config.tls else {
        return Ok((None, Vec::new()));
    };
    let (server, warnings) = settings.load(SystemTime::now())?;
    Ok((Some((server, settings.clone())), warnings))
}

/// Shared by the control thread and every worker.
#[derive(Debug)]
pub(super) struct Shared {
    current: Mutex<Arc<Snapshot>>,
    generation: AtomicU64,
    /// `max_connections` and the handshake caps, for the whole process.
    pub capacity: Arc<Capacity>,
    /// Per-source connection rates (`source_rate`), taken at accept.
    sources: Mutex<Option<SourceLimiter>>,
    /// The clock every loop reads once a turn.
    pub clock: Clock,
    /// What wakes a worker whose clients wait for a host slot.
    pub bells: Arc<Bells>,
    /// With `[cluster]`: the thread that shares client limits through Redis.
    pub cluster: Option<Arc<ClusterLink>>,
}

/// One bell per worker: a flag saying a slot may have freed, and the
/// worker's waker. Rung by whichever thread ends a lease (or takes a host
/// up) while that worker has clients queued; the worker clears the flag
/// and retries its queues.
#[derive(Debug)]
pub(super) struct Bells {
    workers: Vec<(AtomicBool, Arc<Waker>)>,
}

impl Bells {
    /// The bells of the workers whose wakers these are, in worker order.
    pub fn new(wakers: Vec<Arc<Waker>>) -> Bells {
        Bells {
            workers: wakers
                .into_iter()
                .map(|w| (AtomicBool::new(false), w))
                .collect(),
        }
    }

    /// Whether worker `worker`'s bell rang since it last looked (and
    /// clears it). A plain load when it did not ring, so that a worker
    /// with clients waiting does no read-modify-write per loop turn.
    pub fn take(&self, worker: usize) -> bool {
        self.workers.get(worker).is_some_and(|(rung, _)| {
            rung.load(Ordering::SeqCst) && rung.swap(false, Ordering::SeqCst)
        })
    }

    /// A wait queue for an upstream, rung through these bells.
    pub fn queue(self: &Arc<Self>) -> Arc<WaitQueue> {
        Arc::new(WaitQueue::new(self.workers.len(), self.clone()))
    }
}

impl Bell for Bells {
    fn ring(&self, worker: usize) {
        if let Some((rung, waker)) = self.workers.get(worker) {
            // Already rung and not yet seen: the worker will look anyway.
            if !rung.swap(true, Ordering::SeqCst) {
                let _ = waker.wake();
            }
        }
    }
}

/// The process's clock: the system's monotonic clock plus however far
/// [`Handle::advance_clock`](super::Handle::advance_clock) has moved it
/// ahead (zero unless a test did). One atomic load a loop turn.
#[derive(Debug, Default)]
pub(super) struct Clock {
    ahead_nanos: AtomicU64,
}

impl Clock {
    /// Now, on this clock.
    pub fn now(&self) -> Instant {
        Instant::now() + Duration::from_nanos(self.ahead_nanos.load(Ordering::Relaxed))
    }

    /// Moves it `by` ahead, for every loop at once.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.ahead_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl Shared {
    pub fn new(snapshot: Snapshot, bells: Arc<Bells>, cluster: Option<Arc<ClusterLink>>) -> Shared {
        let sources = snapshot.settings.source_limit.map(SourceLimiter::new);
        Shared {
            current: Mutex::new(Arc::new(snapshot)),
            generation: AtomicU64::new(1),
            capacity: Arc::default(),
            sources: Mutex::new(sources),
            clock: Clock::default(),
            bells,
            cluster,
        }
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Changes whenever a new snapshot is published.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `snapshot` in force; workers take it on their next turn.
    pub fn publish(&self, snapshot: Snapshot) {
        let limit = snapshot.settings.source_limit;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.settings.source_limit != limit {
            *self.sources() = limit.map(SourceLimiter::new);
        }
        *current = Arc::new(snapshot);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The per-source limiter, if `source_rate` is set.
    pub fn sources(&self) -> MutexGuard<'_, Option<SourceLimiter>> {
        self.sources.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
