//! Relay buffers and the pool they come from.
//!
//! A pair holds a [`Buffer`] for a direction only while bytes of that
//! direction are in flight: it takes one from the [`BufferPool`] to read
//! into and gives it back as soon as it has been written out, so an idle
//! pair owns no buffer memory. Buffers come in two sizes: normal, and bulk
//! for directions that stream (fewer, larger reads and writes). The pool
//! keeps a bounded number of free buffers of each size for reuse; beyond
//! that, returned buffers are freed.

/// A fixed-capacity byte queue: bytes are appended at `end` and consumed
/// from `start`; `start <= end <= capacity`. The offsets are `u32`
/// (buffers are at most 64 MiB, `rules::BUFFER_SIZE`) so that a
/// direction's buffer-or-pipe takes no more room in every pair than a
/// buffer did alone.
#[derive(Debug)]
pub struct Buffer {
    bytes: Box<[u8]>,
    start: u32,
    end: u32,
}

impl Buffer {
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn capacity(&self) -> usize {
        self.bytes.len()
    }

    /// Whether there is room to read more bytes in.
    pub fn has_room(&self) -> bool {
        self.len() < self.bytes.len()
    }

    /// The bytes waiting to be written out.
    pub fn data(&self) -> &[u8] {
        &self.bytes[self.start as usize..self.end as usize]
    }

    /// Free space to read into; moves pending bytes to the front first when
    /// that is the only way to make room.
    pub fn room(&mut self) -> &mut [u8] {
        if self.end as usize == self.bytes.len() && self.start > 0 {
            self.bytes
                .copy_within(self.start as usize..self.end as usize, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.bytes[self.end as usize..]
    }

    /// Records that `n` bytes were read into [`room`](Self::room).
    pub fn filled(&mut self, n: usize) {
        debug_assert!(self.end as usize + n <= self.bytes.len());
        self.end += n as u32;
    }

    /// Records that the first `n` bytes of [`data`](Self::data) were written out.
    pub fn consumed(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n as u32;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

/// Which of the pool's two buffer sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Normal,
    Bulk,
}

/// Free buffers of one size.
#[derive(Debug)]
struct Class {
    size: usize,
    free: Vec<Box<[u8]>>,
    keep: usize,
}

/// Free buffers of both sizes, reused across pairs.
#[derive(Debug)]
pub struct BufferPool {
    normal: Class,
    bulk: Class,
    in_use: usize,
    /// Free bytes kept per size, at most.
    keep_bytes: usize,
}

impl BufferPool {
    /// A pool of `normal`- and `bulk`-byte buffers that keeps at most
    /// `keep_bytes` of free buffers of each size (and at least a few).
    pub fn new(normal: usize, bulk: usize, keep_bytes: usize) -> Self {
        let class = |size: usize| Class {
            size,
            free: Vec::new(),
            keep: (keep_bytes / size).clamp(4, 1024),
        };
        BufferPool {
            normal: class(normal),
            bulk: class(bulk.max(normal)),
            in_use: 0,
            keep_bytes,
        }
    }

    pub fn bulk_size(&self) -> usize {
        self.bulk.size
    }

    /// Free buffers held for reuse.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.normal.free.len() + self.bulk.free.len()
    }

    /// Buffers handed out and not yet given back.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    pub fn take(&mut self, size: Size) -> Buffer {
        self.in_use += 1;
        let class = match size {
            Size::Normal => &mut self.normal,
            Size::Bulk => &mut self.bulk,
        };
        let bytes = class
            .free
            .pop()
            .unwrap_or_else(|| vec![0; class.size].into_boxed_slice());
        Buffer {
            bytes,
            start: 0,
            end: 0,
        }
    }

    /// Takes back a buffer; whatever it still held is discarded. A buffer
    /// of neither size (from before a reload changed them) is freed.
    pub fn give(&mut self, buffer: Buffer) {
        self.in_use = self.in_use.saturating_sub(1);
        let class = match buffer.capacity() {
            size if size == self.bulk.size => &mut self.bulk,
            size if size == self.normal.size => &mut self.normal,
            _ => return,
        };
        if class.free.len() < class.keep {
            class.free.push(buffer.bytes);
        }
    }

    /// Hands out `normal`- and `bulk`-byte buffers from now on (a reload
    /// changed the sizes). Free buffers of the old sizes are dropped; those
    /// in use come back later and, fitting neither size, are freed.
    pub fn resize(&mut self, normal: usize, bulk: usize) {
        if (normal, bulk.max(normal)) == (self.normal.size, self.bulk.size) {
            return;
        }
        let in_use = self.in_use;
        *self = BufferPool::new(normal, bulk, self.keep_bytes);
        self.in_use = in_use;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_out_in_order_across_compaction() {
        let mut pool = BufferPool::new(8, 8, 64);
        let mut b = pool.take(Size::Normal);
        b.room()[..6].copy_from_slice(b"abcdef");
        b.filled(6);
        assert_eq!(b.data(), b"abcdef");
        b.consumed(4);
        assert_eq!(b.data(), b"ef");
        assert_eq!(b.room().len(), 2);
        b.room()[..2].copy_from_slice(b"gh");
        b.filled(2);
        // Full at the end with free space at the front: room() compacts.
        assert_eq!(b.room().len(), 4);
        assert_eq!(b.data(), b"efgh");
        b.consumed(4);
        assert!(b.is_empty());
        assert_eq!(b.room().len(), 8);
    }

    #[test]
    fn pool_reuses_and_bounds_free_buffers() {
        let mut pool = BufferPool::new(16, 64, 64);
        let taken: Vec<Buffer> = (0..6).map(|_| pool.take(Size::Normal)).collect();
        assert_eq!(pool.in_use(), 6);
        for b in taken {
            pool.give(b);
        }
        // 64 bytes of 16-byte buffers, and never fewer than 4.
        assert_eq!(pool.idle(), 4);
        assert_eq!(pool.in_use(), 0);
        let c = pool.take(Size::Normal);
        assert_eq!(pool.idle(), 3);
        assert!(c.is_empty() && c.has_room());
        assert_eq!(c.capacity(), 16);
    }

    #[test]
    fn bulk_buffers_are_their_own_size_class() {
        let mut pool = BufferPool::new(16, 64, 1024);
        let bulk = pool.take(Size::Bulk);
        assert_eq!(bulk.capacity(), pool.bulk_size());
        pool.give(bulk);
        assert_eq!(pool.take(Size::Normal).capacity(), 16);
        assert_eq!(pool.take(Size::Bulk).capacity(), 64);
        // A bulk size below the normal one means no upgrade at all.
        let mut flat = BufferPool::new(32, 16, 1024);
        assert_eq!(flat.take(Size::Bulk).capacity(), 32);
    }
}
