//! Kernel pipes for the zero-copy relay, and the pool they come from.
//!
//! A direction of a plain TCP pair can move its bytes socket → pipe →
//! socket with `splice(2)`: they stay in the kernel (the pipe holds
//! references to the pages the source socket received them in) and are
//! never copied through tcplb's memory. A [`Pipe`] is to a spliced
//! direction what a buffer is to a copied one: taken from the
//! [`PipePool`] when bytes are in flight and given back as soon as it is
//! empty, so an idle pair holds none.
//!
//! A pipe costs two descriptors, and up to its size of kernel memory while
//! bytes wait in it. The pool caps the pipes handed out at once (its share
//! of `max_pipes`), and keeps few free ones: at most [`KEEP_FREE`], and
//! never more than its worker has pairs, so a worker without pairs holds
//! no descriptor for a pipe. A direction that wants a pipe and finds none
//! (the cap, or no descriptor left) relays through a buffer instead; the
//! pool counts those fallbacks. Out of descriptors, the worker closes the
//! free pipes, so that connections get their descriptors.
//!
//! A pipe counts the bytes it holds itself: `splice` says how many it
//! moved each way, so the count is exact, and it is what half-close,
//! resets and timeouts take as "in flight".

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use log::debug;
use rustix::pipe::{
    PipeFlags, SpliceFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice,
};

use crate::config::Relay;

/// Free pipes a pool keeps for reuse, at most.
pub const KEEP_FREE: usize = 64;

/// A kernel pipe and the bytes it holds; closing it (dropping it)
/// discards them.
#[derive(Debug)]
pub struct Pipe {
    /// Where bytes leave, spliced to the sink.
    exit: OwnedFd,
    /// Where bytes enter, spliced from the source.
    entry: OwnedFd,
    /// Bytes in the pipe. (The sizes are `u32`, as a buffer's offsets
    /// are, so that a buffer-or-pipe is no bigger than a buffer.)
    len: u32,
    /// The most it is let hold: the size asked for, or less when the
    /// kernel gave less.
    capacity: u32,
    /// The size asked for, which tells a pipe of an older size apart.
    asked: u32,
}

impl Pipe {
    /// A new pipe of `size` bytes (`F_SETPIPE_SZ`, which rounds up to a
    /// power of two pages). An unprivileged user past
    /// `fs.pipe-user-pages-soft` gets smaller pipes, and past
    /// `fs.pipe-user-pages-hard` cannot resize them: the pipe then keeps
    /// the size it has.
    fn open(size: usize) -> io::Result<Pipe> {
        let (exit, entry) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let given = match fcntl_setpipe_size(&entry, size) {
            Ok(given) => given,
            Err(_) => fcntl_getpipe_size(&entry)?,
        };
        Ok(Pipe {
            exit,
            entry,
            len: 0,
            capacity: given.min(size) as u32,
            asked: size as u32,
        })
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes it may take in now.
    pub fn room(&self) -> usize {
        (self.capacity - self.len) as usize
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Splices what `socket` has, up to the pipe's room, into the pipe.
    /// For the [`Endpoint`](super::Endpoint), which keeps the readiness.
    pub(super) fn fill_from(&mut self, socket: impl AsFd) -> io::Result<usize> {
        let n = splice(
            socket,
            None,
            &self.entry,
            None,
            self.room(),
            SpliceFlags::NONBLOCK,
        )?;
        self.len += n as u32;
        Ok(n)
    }

    /// Splices what the pipe holds, as far as `socket` takes it, out. A
    /// broken connection raises SIGPIPE here (splice has no
    /// `MSG_NOSIGNAL`): Rust programs ignore it, as tcplb's binary does.
    pub(super) fn drain_into(&mut self, socket: impl AsFd) -> io::Result<usize> {
        let n = splice(
            &self.exit,
            None,
            socket,
            None,
            self.len(),
            SpliceFlags::NONBLOCK,
        )?;
        self.len -= n as u32;
        Ok(n)
    }
}

/// Pipes for one worker's spliced directions.
#[derive(Debug)]
pub struct PipePool {
    relay: Relay,
    /// Bytes per pipe (the bulk buffer size).
    size: usize,
    /// Pipes that may be handed out at once.
    cap: usize,
    free: Vec<Pipe>,
    in_use: usize,
    /// Directions that wanted a pipe and relayed through a buffer instead.
    fallbacks: u64,
}

impl PipePool {
    /// A pool of `size`-byte pipes, at most `cap` of them in use at once,
    /// handed out as `relay` says.
    pub fn new(relay: Relay, size: usize, cap: usize) -> Self {
        PipePool {
            relay,
            size,
            cap,
            free: Vec::new(),
            in_use: 0,
            fallbacks: 0,
        }
    }

    /// A pipe for a direction of a plain pair that has bytes to move, if
    /// the relay mode splices it (`streams`: the direction's reads have
    /// filled whole buffers) and one is to be had; otherwise the direction
    /// relays through a buffer.
    pub fn take(&mut self, streams: bool) -> Option<Pipe> {
        let wanted = match self.relay {
            Relay::Splice => true,
            Relay::Auto => streams,
            Relay::Copy => false,
        };
        if !wanted {
            return None;
        }
        if self.in_use >= self.cap {
            self.fallbacks += 1;
            return None;
        }
        let pipe = match self.free.pop() {
            Some(pipe) => pipe,
            None => match Pipe::open(self.size) {
                Ok(pipe) => pipe,
                Err(e) => {
                    // Out of descriptors, most likely: the buffer will do.
                    debug!("cannot open a pipe: {e}");
                    self.fallbacks += 1;
                    return None;
                }
            },
        };
        self.in_use += 1;
        Some(pipe)
    }

    /// Takes back a pipe. One that still holds bytes (its direction was
    /// cut off) or is of an older size is closed, and its bytes with it.
    pub fn give(&mut self, pipe: Pipe) {
        self.in_use = self.in_use.saturating_sub(1);
        if pipe.is_empty() && pipe.asked as usize == self.size && self.free.len() < KEEP_FREE {
            self.free.push(pipe);
        }
    }

    /// Keeps at most `n` free pipes (the worker's pairs, so that a worker
    /// left with few pairs holds few descriptors for pipes).
    pub fn trim(&mut self, n: usize) {
        self.free.truncate(n);
    }

    /// Pipes handed out and not yet given back.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Free pipes held for reuse.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Directions that wanted a pipe and relayed through a buffer instead.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    /// Takes a reload's settings: pipes in use keep their size (and are
    /// closed when they come back if it changed); free ones of an old size,
    /// beyond the new cap, or of a pool that no longer splices are closed
    /// now.
    pub fn reconfigure(&mut self, relay: Relay, size: usize, cap: usize) {
        if size != self.size || relay == Relay::Copy {
            self.free.clear();
        }
        self.free.truncate(cap);
        (self.relay, self.size, self.cap) = (relay, size, cap);
    }
}

/// A worker's share of `max_pipes`: the pipes divided as evenly as they go
/// among `workers`, so that the shares add up to `max_pipes` exactly.
pub fn share(max_pipes: usize, workers: usize, index: usize) -> usize {
    let workers = workers.max(1);
    max_pipes / workers + usize::from(index < max_pipes % workers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_mode_says_which_directions_get_a_pipe() {
        let mut copy = PipePool::new(Relay::Copy, 64 * 1024, 8);
        assert!(copy.take(true).is_none() && copy.take(false).is_none());
        assert_eq!(copy.fallbacks(), 0, "not wanted is not a fallback");
        let mut auto = PipePool::new(Relay::Auto, 64 * 1024, 8);
        assert!(auto.take(false).is_none(), "copied until it streams");
        let pipe = auto.take(true).expect("a streaming direction splices");
        assert_eq!(auto.in_use(), 1);
        auto.give(pipe);
        let mut splice = PipePool::new(Relay::Splice, 64 * 1024, 8);
        assert!(splice.take(false).is_some());
    }

    #[test]
    fn pipes_are_capped_sized_and_reused_only_when_empty() {
        let mut pool = PipePool::new(Relay::Splice, 64 * 1024, 2);
        let a = pool.take(false).unwrap();
        assert_eq!(a.capacity(), 64 * 1024, "F_SETPIPE_SZ gave the size");
        assert_eq!((a.len(), a.room()), (0, 64 * 1024));
        let b = pool.take(false).unwrap();
        assert!(pool.take(false).is_none(), "the cap");
        assert_eq!(pool.fallbacks(), 1);
        pool.give(a);
        pool.give(b);
        assert_eq!((pool.in_use(), pool.free()), (0, 2));

        // A pipe with bytes left in it is closed, never handed to another pair.
        let mut full = pool.take(false).unwrap();
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut tx, b"left over").unwrap();
        assert_eq!(full.fill_from(&rx).unwrap(), 9);
        assert_eq!(full.len(), 9);
        pool.give(full);
        assert_eq!(pool.free(), 1);

        pool.trim(0);
        assert_eq!(pool.free(), 0, "a worker without pairs keeps no pipe");
        pool.reconfigure(Relay::Splice, 128 * 1024, 2);
        assert_eq!(pool.take(false).unwrap().capacity(), 128 * 1024);
    }

    #[test]
    fn shares_of_max_pipes_add_up() {
        assert_eq!((0..3).map(|i| share(1024, 3, i)).sum::<usize>(), 1024);
        assert_eq!([share(1, 2, 0), share(1, 2, 1)], [1, 0]);
        assert_eq!(share(0, 4, 0), 0);
    }
}
