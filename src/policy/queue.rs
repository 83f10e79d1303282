//! The clients of one upstream waiting for a host slot: counts only, shared
//! by every worker, and the signal that a slot may have freed.
//!
//! When every host of an upstream is at its `max_connections`, a client
//! may wait (up to `queue_timeout`) instead of being refused. Each worker
//! keeps its own waiting clients in order (a worker's queue is its own
//! data, first come first served); what is shared is here: how many wait
//! in all (bounded by `max_queued`, taken with a compare-exchange) and in
//! each worker, and a [`Bell`] that wakes the workers with waiters when a
//! slot frees, wherever it freed. A place in the queue is a
//! [`QueueTicket`], given back when dropped, like every other count.
//!
//! No wakeup is lost: a worker that joins the queue counts itself first
//! and only then tries its leases again, and a lease that ends gives its
//! count back first and only then looks for waiters, all in sequentially
//! consistent order. So either the retry sees the freed slot, or the one
//! freeing it sees the waiter and rings. These atomics are touched when a
//! client joins or leaves the queue and when a lease ends while clients
//! wait: once per connection, never per byte.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Wakes a worker whose clients wait: the proxy's waker of that worker.
/// Kept behind a trait so that this module stays free of I/O.
pub(crate) trait Bell: Send + Sync + fmt::Debug {
    /// Tells worker `worker` that a slot may have freed.
    fn ring(&self, worker: usize);
}

/// The shared counts of one upstream's waiting clients.
#[derive(Debug)]
pub(crate) struct WaitQueue {
    /// Clients waiting, in every worker.
    total: AtomicU32,
    /// Clients waiting, per worker index.
    per_worker: Box<[AtomicU32]>,
    bell: Arc<dyn Bell>,
}

impl WaitQueue {
    /// An empty queue for `workers` workers, rung through `bell`.
    pub fn new(workers: usize, bell: Arc<dyn Bell>) -> WaitQueue {
        WaitQueue {
            total: AtomicU32::new(0),
            per_worker: (0..workers.max(1)).map(|_| AtomicU32::new(0)).collect(),
            bell,
        }
    }

    /// A place for a client of worker `worker`, unless `max` clients wait
    /// already (in all workers).
    pub fn join(self: &Arc<Self>, worker: usize, max: u32) -> Option<QueueTicket> {
        let worker = worker.min(self.per_worker.len() - 1);
        self.total
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.per_worker[worker].fetch_add(1, Ordering::SeqCst);
        Some(QueueTicket {
            queue: self.clone(),
            worker,
        })
    }

    /// Clients waiting, in every worker.
    pub fn len(&self) -> u32 {
        self.total.load(Ordering::SeqCst)
    }

    /// Clients of worker `worker` waiting.
    pub fn waiting_in(&self, worker: usize) -> u32 {
        self.per_worker
            .get(worker)
            .map_or(0, |n| n.load(Ordering::SeqCst))
    }

    /// A slot may have freed (a lease ended, a host came up): rings every
    /// worker that has clients waiting. One load when nobody waits.
    pub fn slot_freed(&self) {
        if self.total.load(Ordering::SeqCst) == 0 {
            return;
        }
        for (worker, waiting) in self.per_worker.iter().enumerate() {
            if waiting.load(Ordering::SeqCst) > 0 {
                self.bell.ring(worker);
            }
        }
    }
}

/// A client's place in a [`WaitQueue`]. Cannot be cloned; dropping it
/// gives the place back.
#[must_use = "dropping a queue ticket gives the place back at once"]
#[derive(Debug)]
pub(crate) struct QueueTicket {
    queue: Arc<WaitQueue>,
    worker: usize,
}

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.queue.per_worker[self.worker].fetch_sub(1, Ordering::SeqCst);
        self.queue.total.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A bell that rings nobody: for a balancer no worker waits on (tests).
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Silent;

#[cfg(test)]
impl Bell for Silent {
    fn ring(&self, _worker: usize) {}
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Remembers which workers were rung.
    #[derive(Debug, Default)]
    struct Rung(Mutex<Vec<usize>>);

    impl Bell for Rung {
        fn ring(&self, worker: usize) {
            self.0.lock().unwrap().push(worker);
        }
    }

    #[test]
    fn places_are_bounded_and_given_back() {
        let queue = Arc::new(WaitQueue::new(2, Arc::new(Silent)));
        let a = queue.join(0, 2).unwrap();
        let b = queue.join(1, 2).unwrap();
        assert!(queue.join(0, 2).is_none(), "the bound holds");
        assert_eq!(
            (queue.len(), queue.waiting_in(0), queue.waiting_in(1)),
            (2, 1, 1)
        );
        drop(a);
        assert_eq!((queue.len(), queue.waiting_in(0)), (1, 0));
        drop(b);
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn a_freed_slot_rings_only_the_workers_with_waiters() {
        let rung = Arc::new(Rung::default());
        let queue = Arc::new(WaitQueue::new(3, rung.clone()));
        queue.slot_freed();
        assert!(rung.0.lock().unwrap().is_empty(), "nobody waits");
        let _waiting = [queue.join(2, 10).unwrap(), queue.join(0, 10).unwrap()];
        queue.slot_freed();
        assert_eq!(*rung.0.lock().unwrap(), [0, 2]);
    }
}
