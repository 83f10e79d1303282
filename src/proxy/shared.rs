//! What every worker shares: the configuration in force (a [`Snapshot`],
//! replaced whole by a reload) and the process-wide limits.
//!
//! A worker reads the snapshot's generation (one atomic load) once per
//! loop turn and takes the new snapshot only when it changed; the lock
//! behind it is taken then, and by the control thread when it publishes.
//! Host counts, host health and client counts live in the snapshot's
//! records as atomics or small locks touched once per connection; nothing
//! here is touched per byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::cluster::ClusterLink;
use crate::config::Settings;
use crate::policy::access::Access;
use crate::policy::capacity::Capacity;
use crate::policy::limits::SourceLimiter;
use crate::tls::TlsSettings;
use crate::upstream::Upstream;

/// The configuration in force: settings, upstreams (with their hosts'
/// shared records), client rules, TLS.
#[derive(Debug)]
pub(super) struct Snapshot {
    pub settings: Settings,
    pub upstreams: Vec<Arc<Upstream>>,
    pub access: Access,
    /// TLS material, when any upstream speaks TLS.
    pub tls: Option<(Arc<rustls::ServerConfig>, TlsSettings)>,
}

impl Snapshot {
    /// The live upstream of id `id`, if the config still has it.
    pub fn upstream(&self, id: usize) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.id == id)
    }
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
    /// With `[cluster]`: the thread that shares client limits through Redis.
    pub cluster: Option<Arc<ClusterLink>>,
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
    pub fn new(snapshot: Snapshot, cluster: Option<Arc<ClusterLink>>) -> Shared {
        let sources = snapshot.settings.source_limit.map(SourceLimiter::new);
        Shared {
            current: Mutex::new(Arc::new(snapshot)),
            generation: AtomicU64::new(1),
            capacity: Arc::default(),
            sources: Mutex::new(sources),
            clock: Clock::default(),
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
