//! One direction of a pair: bytes from a [`Source`] to a [`Sink`] through
//! a pooled buffer, with backpressure and half-close.
//!
//! The pump works on "ready and wanted": it reads only while the buffer
//! has room and writes only while it holds bytes, so a direction paused by
//! backpressure resumes on the sink's next writable edge without waiting
//! for a new readable one. When the source has ended and every byte is
//! delivered, the sink is finished (FIN, or `close_notify` then FIN over
//! TLS); the direction is then done.

use std::io;
use std::net::Shutdown;

use crate::buffer::{Buffer, BufferPool, Size};
use crate::endpoint::{Endpoint, READ_ALL, READABLE, WRITABLE};
use crate::net::{self, Io};

/// Where a direction's bytes come from: a socket, or a TLS session's plaintext.
pub(crate) trait Source {
    /// Whether a read may produce something (bytes or EOF).
    fn can_read(&self) -> bool;
    /// Reads into `buf`, keeping the readiness bookkeeping.
    fn read(&mut self, buf: &mut [u8]) -> Io;
}

/// Where a direction's bytes go.
pub(crate) trait Sink {
    fn can_write(&self) -> bool;
    /// Writes a prefix of `data`; `WouldBlock` when nothing fits now.
    fn write(&mut self, data: &[u8]) -> Io;
    /// Ends the stream after the last byte; `Ok(true)` once that is done,
    /// `Ok(false)` while it waits for the socket.
    fn finish(&mut self) -> io::Result<bool>;
}

impl Source for Endpoint {
    fn can_read(&self) -> bool {
        self.is(READABLE)
    }

    fn read(&mut self, buf: &mut [u8]) -> Io {
        let wanted = buf.len();
        let outcome = net::read(&mut self.stream, buf);
        match outcome {
            // A short read drained the socket: epoll reports the next
            // arrival as a new edge, so no WouldBlock probe is needed.
            Io::Done(n) if n < wanted && !self.is(READ_ALL) => self.clear(READABLE),
            Io::WouldBlock => self.clear(READABLE | READ_ALL),
            _ => {}
        }
        outcome
    }
}

impl Sink for Endpoint {
    fn can_write(&self) -> bool {
        self.is(WRITABLE)
    }

    fn write(&mut self, data: &[u8]) -> Io {
        let outcome = net::write(&mut self.stream, data);
        match outcome {
            Io::Done(n) if n < data.len() => self.clear(WRITABLE),
            Io::WouldBlock => self.clear(WRITABLE),
            _ => {}
        }
        outcome
    }

    fn finish(&mut self) -> io::Result<bool> {
        // ENOTCONN here means the destination was reset meanwhile: an error.
        self.stream.shutdown(Shutdown::Write).map(|()| true)
    }
}

/// One direction's state.
#[derive(Debug, Default)]
pub(crate) struct Flow {
    /// Present only while bytes are in flight.
    pub buf: Option<Buffer>,
    /// Reads have filled whole buffers: this direction streams, and takes
    /// bulk-size buffers from now on.
    bulk: bool,
    /// The source ended (FIN, or `close_notify`).
    pub eof: bool,
    /// Everything is delivered and the sink is finished.
    pub done: bool,
    /// Bytes written to the sink.
    pub bytes: u64,
}

impl Flow {
    pub fn release(&mut self, pool: &mut BufferPool) {
        if let Some(buf) = self.buf.take() {
            pool.give(buf);
        }
    }
}

/// Which end of a pump failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Source,
    Sink,
}

/// What one call of [`pump`] did.
pub(crate) struct Pumped {
    /// Some byte (or EOF) moved.
    pub moved: bool,
    /// Stopped because the budget ran out, not because nothing could move.
    pub exhausted: bool,
}

/// Moves one direction's bytes until nothing more can move or `budget`
/// bytes have been written.
pub(crate) fn pump(
    src: &mut impl Source,
    dst: &mut impl Sink,
    flow: &mut Flow,
    pool: &mut BufferPool,
    mut budget: usize,
) -> Result<Pumped, Fault> {
    let mut moved = false;
    loop {
        let mut progress = false;
        if !flow.eof && src.can_read() {
            let size = if flow.bulk { Size::Bulk } else { Size::Normal };
            let buf = flow.buf.get_or_insert_with(|| pool.take(size));
            if buf.has_room() {
                let room = buf.room();
                let wanted = room.len();
                match src.read(room) {
                    Io::Done(n) => {
                        buf.filled(n);
                        progress = true;
                        // More was waiting than fit: the next buffer is a bulk one.
                        flow.bulk |= n == wanted;
                    }
                    Io::Eof => {
                        flow.eof = true;
                        progress = true;
                    }
                    Io::WouldBlock => {}
                    Io::Failed(e) => {
                        log::debug!("read failed: {e}");
                        return Err(Fault::Source);
                    }
                }
            }
        }
        if let Some(buf) = flow.buf.as_mut() {
            if !buf.is_empty() && dst.can_write() {
                match dst.write(buf.data()) {
                    Io::Done(n) => {
                        buf.consumed(n);
                        flow.bytes += n as u64;
                        budget = budget.saturating_sub(n);
                        progress = true;
                    }
                    Io::WouldBlock => {}
                    Io::Eof | Io::Failed(_) => return Err(Fault::Sink),
                }
            }
            if buf.is_empty() {
                flow.release(pool);
            }
        }
        if flow.eof && flow.buf.is_none() && !flow.done {
            flow.done = dst.finish().map_err(|_| Fault::Sink)?;
            progress |= flow.done;
        }
        moved |= progress;
        if !progress || budget == 0 {
            return Ok(Pumped {
                moved,
                exhausted: progress,
            });
        }
    }
}
