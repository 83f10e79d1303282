//! Relay buffers and the pool they come from.
//!
//! A pair holds a [`Buffer`] for a direction only while bytes of that
//! direction are in flight: it takes one from the [`BufferPool`] to read
//! into and gives it back as soon as it has been written out, so an idle
//! pair owns no buffer memory. The pool keeps a bounded number of free
//! buffers for reuse; beyond that, returned buffers are freed.

/// A fixed-capacity byte queue: bytes are appended at `end` and consumed
/// from `start`; `start <= end <= capacity`.
#[derive(Debug)]
pub struct Buffer {
    bytes: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buffer {
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether there is room to read more bytes in.
    pub fn has_room(&self) -> bool {
        self.len() < self.bytes.len()
    }

    /// The bytes waiting to be written out.
    pub fn data(&self) -> &[u8] {
        &self.bytes[self.start..self.end]
    }

    /// Free space to read into; moves pending bytes to the front first when
    /// that is the only way to make room.
    pub fn room(&mut self) -> &mut [u8] {
        if self.end == self.bytes.len() && self.start > 0 {
            self.bytes.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.bytes[self.end..]
    }

    /// Records that `n` bytes were read into [`room`](Self::room).
    pub fn filled(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.bytes.len());
        self.end += n;
    }

    /// Records that the first `n` bytes of [`data`](Self::data) were written out.
    pub fn consumed(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

/// Free buffers of one size, reused across pairs.
#[derive(Debug)]
pub struct BufferPool {
    size: usize,
    free: Vec<Box<[u8]>>,
    keep: usize,
    in_use: usize,
}

impl BufferPool {
    /// A pool of `size`-byte buffers that keeps at most `keep` free ones.
    pub fn new(size: usize, keep: usize) -> Self {
        BufferPool {
            size,
            free: Vec::new(),
            keep,
            in_use: 0,
        }
    }

    pub fn buffer_size(&self) -> usize {
        self.size
    }

    /// Free buffers held for reuse.
    pub fn idle(&self) -> usize {
        self.free.len()
    }

    /// Buffers handed out and not yet given back.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    pub fn take(&mut self) -> Buffer {
        self.in_use += 1;
        let bytes = self
            .free
            .pop()
            .unwrap_or_else(|| vec![0; self.size].into_boxed_slice());
        Buffer {
            bytes,
            start: 0,
            end: 0,
        }
    }

    /// Takes back a buffer; whatever it still held is discarded.
    pub fn give(&mut self, buffer: Buffer) {
        self.in_use -= 1;
        if self.free.len() < self.keep {
            self.free.push(buffer.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_out_in_order_across_compaction() {
        let mut pool = BufferPool::new(8, 4);
        let mut b = pool.take();
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
        let mut pool = BufferPool::new(16, 1);
        let a = pool.take();
        let b = pool.take();
        pool.give(a);
        pool.give(b);
        assert_eq!(pool.idle(), 1);
        let c = pool.take();
        assert_eq!(pool.idle(), 0);
        assert!(c.is_empty() && c.has_room());
        assert_eq!(pool.buffer_size(), 16);
    }
}
