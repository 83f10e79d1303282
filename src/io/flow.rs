//! One direction of a pair: bytes from a [`Source`] to a [`Sink`] through
//! a pooled buffer, or through a pooled kernel pipe when both ends are
//! plain sockets and the relay mode splices, with backpressure and
//! half-close. Both ways share this one pump: what differs is only where
//! the bytes wait between the source and the sink ([`Held`]).
//!
//! The pump works on "ready and wanted": it reads only while the buffer
//! (or pipe) has room and writes only while it holds bytes, so a direction
//! paused by backpressure resumes on the sink's next writable edge without
//! waiting for a new readable one. When the source has ended and every
//! byte is delivered (bytes in a pipe are in flight like bytes in a
//! buffer), the sink is finished (FIN, or `close_notify` then FIN over
//! TLS); the direction is then done. A source that fails (a reset) ends
//! the direction the same way, except that the sink is not finished: once
//! every byte read before the failure is delivered, the pair passes the
//! reset on.

use std::io;

use super::Io;
use super::buffer::{Buffer, BufferPool, Size};
use super::endpoint::{Discarded, Endpoint};
use super::pipe::{Pipe, PipePool};

/// Where a direction's bytes come from: a socket, or a TLS session's plaintext.
pub(crate) trait Source {
    /// Whether a read may produce something (bytes or EOF).
    fn can_read(&self) -> bool;
    /// Reads into `buf`, keeping the readiness bookkeeping.
    fn read(&mut self, buf: &mut [u8]) -> Io;

    /// Appends at most `max` bytes of one read to `out`.
    fn read_onto(&mut self, out: &mut Vec<u8>, max: usize) -> Io {
        let start = out.len();
        out.resize(start + max, 0);
        let outcome = self.read(&mut out[start..]);
        let got = if let Io::Done(n) = outcome { n } else { 0 };
        out.truncate(start + got);
        outcome
    }

    /// Reads and drops what the peer sends, as far as it has sent it.
    fn discard(&mut self) -> Discarded {
        let mut scratch = [0u8; 2048];
        let mut total = 0;
        while self.can_read() {
            match self.read(&mut scratch) {
                Io::Done(n) => total += n,
                Io::WouldBlock => break,
                Io::Eof | Io::Failed(_) => return Discarded::End,
            }
        }
        if total > 0 {
            Discarded::Bytes(total)
        } else {
            Discarded::WouldBlock
        }
    }

    /// Whether reads may be spliced into a pipe now (a plain socket's may).
    fn can_splice(&self) -> bool {
        false
    }
    /// Splices into `pipe`, keeping the readiness bookkeeping; called only
    /// while [`can_splice`](Self::can_splice) holds.
    fn splice_in(&mut self, _pipe: &mut Pipe) -> Io {
        Io::Failed(io::ErrorKind::Unsupported.into())
    }
}

/// Where a direction's bytes go.
pub(crate) trait Sink {
    /// The destination's connection is broken: nothing can reach it any more.
    fn is_broken(&self) -> bool;
    fn can_write(&self) -> bool;
    /// Writes a prefix of `data`; `WouldBlock` when nothing fits now.
    fn write(&mut self, data: &[u8]) -> Io;
    /// Ends the stream after the last byte; `Ok(true)` once that is done,
    /// `Ok(false)` while it waits for the socket.
    fn finish(&mut self) -> io::Result<bool>;
    /// Writes `data[*sent..]` while the destination takes it, advancing
    /// `sent`; `Ok(true)` once all of `data` is written.
    fn write_out(&mut self, data: &[u8], sent: &mut usize) -> io::Result<bool> {
        while *sent < data.len() && self.can_write() {
            match self.write(&data[*sent..]) {
                Io::Done(n) => *sent += n,
                Io::WouldBlock => break,
                Io::Eof => return Err(io::ErrorKind::WriteZero.into()),
                Io::Failed(e) => return Err(e),
            }
        }
        Ok(*sent == data.len())
    }
    /// Whether a pipe's bytes may be spliced out to it (a plain socket's may).
    fn can_splice(&self) -> bool {
        false
    }
    /// Splices a prefix of what `pipe` holds out; called only when
    /// [`can_splice`](Self::can_splice) holds.
    fn splice_out(&mut self, _pipe: &mut Pipe) -> Io {
        Io::Failed(io::ErrorKind::Unsupported.into())
    }
}

impl Source for Endpoint {
    fn can_read(&self) -> bool {
        Endpoint::can_read(self)
    }

    fn read(&mut self, buf: &mut [u8]) -> Io {
        Endpoint::read(self, buf)
    }

    fn can_splice(&self) -> bool {
        self.can_splice_from()
    }

    fn splice_in(&mut self, pipe: &mut Pipe) -> Io {
        Endpoint::splice_in(self, pipe)
    }
}

impl Sink for Endpoint {
    fn is_broken(&self) -> bool {
        Endpoint::is_broken(self)
    }

    fn can_write(&self) -> bool {
        Endpoint::can_write(self)
    }

    fn write(&mut self, data: &[u8]) -> Io {
        Endpoint::write(self, data)
    }

    fn finish(&mut self) -> io::Result<bool> {
        self.shutdown_write().map(|()| true)
    }

    fn can_splice(&self) -> bool {
        true
    }

    fn splice_out(&mut self, pipe: &mut Pipe) -> Io {
        Endpoint::splice_out(self, pipe)
    }
}

/// Where a direction's bytes wait between its source and its sink.
#[derive(Debug)]
pub(crate) enum Held {
    /// In tcplb's memory, copied in and out.
    Buffer(Buffer),
    /// In a kernel pipe, spliced in and out.
    Pipe(Pipe),
}

impl Held {
    pub fn len(&self) -> usize {
        match self {
            Held::Buffer(buf) => buf.len(),
            Held::Pipe(pipe) => pipe.len(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Held::Buffer(buf) => buf.is_empty(),
            Held::Pipe(pipe) => pipe.is_empty(),
        }
    }

    fn has_room(&self) -> bool {
        match self {
            Held::Buffer(buf) => buf.has_room(),
            Held::Pipe(pipe) => pipe.room() > 0,
        }
    }
}

/// The two pools a direction takes from while bytes are in flight, and
/// the count of bytes spliced through the pipes, for the caller to take
/// (kept here rather than in every pair's [`Flow`]).
#[derive(Debug)]
pub(crate) struct Pools<'a> {
    pub buffers: &'a mut BufferPool,
    pub pipes: &'a mut PipePool,
    /// Bytes spliced out to sinks since the count was last taken.
    pub spliced: u64,
}

impl<'a> Pools<'a> {
    pub fn new(buffers: &'a mut BufferPool, pipes: &'a mut PipePool) -> Self {
        Pools {
            buffers,
            pipes,
            spliced: 0,
        }
    }
}

impl Pools<'_> {
    /// Somewhere for a direction's next bytes: a pipe if both ends splice
    /// and the pipe pool gives one (see [`PipePool::take`]), else a buffer.
    fn take(&mut self, splice: bool, bulk: bool) -> Held {
        if splice {
            if let Some(pipe) = self.pipes.take(bulk) {
                return Held::Pipe(pipe);
            }
        }
        let size = if bulk { Size::Bulk } else { Size::Normal };
        Held::Buffer(self.buffers.take(size))
    }
}

/// One direction's state.
#[derive(Debug, Default)]
pub(crate) struct Flow {
    /// Present only while bytes are in flight.
    held: Option<Held>,
    /// Reads have filled whole buffers: this direction streams, and takes
    /// bulk-size buffers from now on (and, in `relay = "auto"`, pipes).
    bulk: bool,
    /// The source ended (FIN, `close_notify`, or a failure).
    pub eof: bool,
    /// The source ended by failing (a reset, a TLS error): the sink is to
    /// be reset, not finished, once the bytes read before are delivered.
    pub failed: bool,
    /// Everything is delivered and the sink is finished.
    pub done: bool,
    /// Bytes written to the sink.
    pub bytes: u64,
}

impl Flow {
    /// A direction whose source failed and whose bytes are all delivered.
    pub fn failed_and_delivered() -> Flow {
        Flow {
            eof: true,
            failed: true,
            ..Flow::default()
        }
    }

    /// A direction that starts with `bytes` (what came after a PROXY
    /// header) in a buffer, to be written before anything read later.
    /// `bytes` must fit a normal buffer (a few dozen bytes do).
    pub fn holding(bytes: &[u8], pool: &mut BufferPool) -> Flow {
        if bytes.is_empty() {
            return Flow::default();
        }
        let mut buf = pool.take(Size::Normal);
        let n = bytes.len().min(buf.room().len());
        buf.room()[..n].copy_from_slice(&bytes[..n]);
        buf.filled(n);
        Flow {
            held: Some(Held::Buffer(buf)),
            ..Flow::default()
        }
    }

    /// The source has ended and every byte it sent is handed to the sink.
    pub fn delivered(&self) -> bool {
        self.eof && self.held.is_none()
    }

    /// Bytes read and not yet written, in a buffer or a pipe.
    pub fn in_flight(&self) -> usize {
        self.held.as_ref().map_or(0, Held::len)
    }

    /// Gives back the buffer or pipe, discarding what it still holds.
    pub fn release(&mut self, pools: &mut Pools<'_>) {
        match self.held.take() {
            Some(Held::Buffer(buf)) => pools.buffers.give(buf),
            Some(Held::Pipe(pipe)) => pools.pipes.give(pipe),
            None => {}
        }
    }
}

/// The sink failed: the direction's bytes can no longer be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SinkFailed;

/// The sink of a direction whose destination is still connecting: it takes
/// nothing yet, so the source is read only into the buffer.
pub(crate) struct NotConnected;

impl Sink for NotConnected {
    fn is_broken(&self) -> bool {
        false
    }

    fn can_write(&self) -> bool {
        false
    }

    fn write(&mut self, _: &[u8]) -> Io {
        Io::WouldBlock
    }

    fn finish(&mut self) -> io::Result<bool> {
        Ok(false)
    }
}

/// What one call of [`pump`] did.
pub(crate) struct Pumped {
    /// Some byte (or EOF) moved.
    pub moved: bool,
    /// Stopped because the budget ran out, not because nothing could move.
    pub exhausted: bool,
}

impl Pumped {
    /// A direction that could not move (its sink failed).
    pub const NOTHING: Pumped = Pumped {
        moved: false,
        exhausted: false,
    };
}

/// One read (or splice) into what the direction holds: its outcome and
/// the room there was, or `None` when nothing may be read now (a pipe's
/// source can no longer splice: the pipe is emptied first, then a buffer
/// reads on).
fn fill(src: &mut impl Source, held: &mut Held) -> Option<(Io, usize)> {
    match held {
        Held::Buffer(buf) => {
            let room = buf.room();
            let wanted = room.len();
            let outcome = src.read(room);
            if let Io::Done(n) = outcome {
                buf.filled(n);
            }
            Some((outcome, wanted))
        }
        Held::Pipe(pipe) if src.can_splice() => {
            let wanted = pipe.room();
            Some((src.splice_in(pipe), wanted))
        }
        Held::Pipe(_) => None,
    }
}

/// One write (or splice) out of what the direction holds.
fn empty(dst: &mut impl Sink, held: &mut Held) -> Io {
    match held {
        Held::Buffer(buf) => {
            let outcome = dst.write(buf.data());
            if let Io::Done(n) = outcome {
                buf.consumed(n);
            }
            outcome
        }
        Held::Pipe(pipe) => dst.splice_out(pipe),
    }
}

/// Moves one direction's bytes until nothing more can move or `budget`
/// bytes have been written. A failing source ends the direction (see
/// [`Flow::failed`]); only a failing sink is an error. Toward a sink that
/// is already broken, the source is drained instead (see [`drain`]).
pub(crate) fn pump(
    src: &mut impl Source,
    dst: &mut impl Sink,
    flow: &mut Flow,
    pools: &mut Pools<'_>,
    mut budget: usize,
) -> Result<Pumped, SinkFailed> {
    if dst.is_broken() {
        return Ok(drain(src, flow, pools, budget));
    }
    let mut moved = false;
    loop {
        let mut progress = false;
        if !flow.eof && src.can_read() {
            let (splice, bulk) = (src.can_splice() && dst.can_splice(), flow.bulk);
            let held = flow.held.get_or_insert_with(|| pools.take(splice, bulk));
            let read = if held.has_room() {
                fill(src, held)
            } else {
                None
            };
            // A splice that stops splicing (it met the end, which a read
            // is to confirm) leaves the source readable: go on, with a read.
            progress |= splice && !src.can_splice();
            match read {
                Some((Io::Done(n), wanted)) => {
                    progress = true;
                    // More was waiting than fit: the next buffer is a bulk one.
                    flow.bulk |= n == wanted;
                }
                Some((Io::Eof, _)) => {
                    flow.eof = true;
                    progress = true;
                }
                Some((Io::WouldBlock, _)) | None => {}
                Some((Io::Failed(e), _)) => {
                    log::debug!("read failed: {e}");
                    flow.eof = true;
                    flow.failed = true;
                    progress = true;
                }
            }
        }
        if let Some(held) = flow.held.as_mut() {
            if !held.is_empty() && dst.can_write() {
                let spliced = matches!(held, Held::Pipe(_));
                match empty(dst, held) {
                    Io::Done(n) => {
                        flow.bytes += n as u64;
                        if spliced {
                            pools.spliced += n as u64;
                        }
                        budget = budget.saturating_sub(n);
                        progress = true;
                    }
                    Io::WouldBlock => {}
                    Io::Eof | Io::Failed(_) => return Err(SinkFailed),
                }
            }
            if held.is_empty() {
                flow.release(pools);
            }
        }
        if flow.delivered() && !flow.failed && !flow.done {
            flow.done = dst.finish().map_err(|_| SinkFailed)?;
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

/// Reads and drops what `src` sends, for a direction whose destination
/// reset: its bytes can no longer arrive, and a source left unread would
/// stop reading in turn (its writes blocked on a full window) while the
/// other direction still delivers to it. Dropped bytes are not counted
/// as relayed, and they are not progress. What a pipe held is dropped
/// with it, and the source is read through a buffer.
fn drain(src: &mut impl Source, flow: &mut Flow, pools: &mut Pools<'_>, budget: usize) -> Pumped {
    let mut dropped = 0;
    if let Some(Held::Pipe(_)) = flow.held {
        flow.release(pools);
    }
    if !flow.eof && src.can_read() {
        let held = flow
            .held
            .get_or_insert_with(|| Held::Buffer(pools.buffers.take(Size::Normal)));
        let Held::Buffer(buf) = held else {
            unreachable!("a pipe was given back above");
        };
        buf.consumed(buf.len());
        while dropped < budget && src.can_read() {
            match src.read(buf.room()) {
                Io::Done(n) => dropped += n,
                Io::WouldBlock => break,
                Io::Eof | Io::Failed(_) => {
                    flow.eof = true;
                    break;
                }
            }
        }
    }
    flow.release(pools);
    Pumped {
        moved: false,
        exhausted: dropped >= budget,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Relay;
    use std::collections::VecDeque;

    /// The pools a test's direction takes from: small buffers, no pipes.
    struct Pooled {
        buffers: BufferPool,
        pipes: PipePool,
    }

    impl Pooled {
        fn new() -> Pooled {
            Pooled {
                buffers: BufferPool::new(16, 64, 1024),
                pipes: PipePool::new(Relay::Copy, 64 * 1024, 0),
            }
        }

        fn pools(&mut self) -> Pools<'_> {
            Pools::new(&mut self.buffers, &mut self.pipes)
        }
    }

    /// A source that plays back a script of read outcomes, then blocks.
    struct Script(VecDeque<Io>);

    impl Script {
        fn new(steps: impl IntoIterator<Item = Io>) -> Script {
            Script(steps.into_iter().collect())
        }
    }

    impl Source for Script {
        fn can_read(&self) -> bool {
            !self.0.is_empty()
        }

        fn read(&mut self, buf: &mut [u8]) -> Io {
            match self.0.pop_front() {
                Some(Io::Done(n)) => {
                    buf[..n].fill(b'x');
                    Io::Done(n)
                }
                Some(other) => other,
                None => Io::WouldBlock,
            }
        }
    }

    /// A sink that takes at most `room` bytes per write, and records them.
    #[derive(Default)]
    struct Taken {
        bytes: usize,
        room: usize,
        broken: bool,
        finished: bool,
    }

    impl Sink for Taken {
        fn is_broken(&self) -> bool {
            self.broken
        }

        fn can_write(&self) -> bool {
            self.room > 0
        }

        fn write(&mut self, data: &[u8]) -> Io {
            let n = data.len().min(self.room);
            self.bytes += n;
            Io::Done(n)
        }

        fn finish(&mut self) -> io::Result<bool> {
            self.finished = true;
            Ok(true)
        }
    }

    fn reset() -> Io {
        Io::Failed(io::ErrorKind::ConnectionReset.into())
    }

    #[test]
    fn a_flow_takes_no_more_room_in_a_pair_than_with_buffers_alone() {
        // Every pair has two: what 5,000 idle pairs cost depends on it.
        // A buffer-or-pipe fits where a buffer did (32 bytes), and the
        // flags and the byte count add 16.
        assert_eq!(std::mem::size_of::<Option<Held>>(), 32);
        assert_eq!(std::mem::size_of::<Flow>(), 48);
    }

    #[test]
    fn bytes_read_before_a_reset_are_delivered_and_the_sink_is_not_finished() {
        let mut pool = Pooled::new();
        let mut src = Script::new([Io::Done(10), Io::Done(6), reset()]);
        let mut dst = Taken {
            room: 4,
            ..Taken::default()
        };
        let mut flow = Flow::default();
        let pumped = pump(&mut src, &mut dst, &mut flow, &mut pool.pools(), 1 << 20).unwrap();
        assert!(pumped.moved);
        assert_eq!(dst.bytes, 16, "every byte read before the reset");
        assert_eq!(flow.bytes, 16);
        assert!(flow.eof && flow.failed && flow.delivered());
        assert!(!dst.finished, "a reset is passed on as a reset, not as FIN");
        assert!(!flow.done);
        assert_eq!(pool.buffers.in_use(), 0, "the buffer went back once empty");
    }

    #[test]
    fn a_reset_with_bytes_still_buffered_waits_for_the_sink() {
        let mut pool = Pooled::new();
        let mut src = Script::new([Io::Done(16), reset()]);
        let mut dst = Taken::default();
        let mut flow = Flow::default();
        pump(&mut src, &mut dst, &mut flow, &mut pool.pools(), 1 << 20).unwrap();
        // The buffer was full, so the reset is not read yet; then the sink
        // opens and the bytes go out before it.
        assert!(!flow.eof);
        dst.room = 1024;
        pump(&mut src, &mut dst, &mut flow, &mut pool.pools(), 1 << 20).unwrap();
        assert_eq!(dst.bytes, 16);
        assert!(flow.failed && flow.delivered() && !dst.finished);
    }

    #[test]
    fn a_clean_end_finishes_the_sink_after_the_last_byte() {
        let mut pool = Pooled::new();
        let mut src = Script::new([Io::Done(5), Io::Eof]);
        let mut dst = Taken {
            room: 1024,
            ..Taken::default()
        };
        let mut flow = Flow::default();
        pump(&mut src, &mut dst, &mut flow, &mut pool.pools(), 1 << 20).unwrap();
        assert_eq!(dst.bytes, 5);
        assert!(dst.finished && flow.done && !flow.failed);
    }

    #[test]
    fn toward_a_broken_sink_the_source_is_drained_and_nothing_counted() {
        let mut pool = Pooled::new();
        let mut src = Script::new([Io::Done(16), Io::Done(16), Io::Done(3)]);
        let mut dst = Taken {
            room: 1024,
            broken: true,
            ..Taken::default()
        };
        let mut flow = Flow::default();
        let pumped = pump(&mut src, &mut dst, &mut flow, &mut pool.pools(), 1 << 20).unwrap();
        assert!(!src.can_read(), "everything was read");
        assert_eq!(dst.bytes, 0);
        assert_eq!(flow.bytes, 0, "dropped bytes are not relayed bytes");
        assert!(!pumped.moved, "and not progress");
        assert_eq!(pool.buffers.in_use(), 0);
    }

    #[test]
    fn draining_stops_at_the_budget() {
        let mut pool = Pooled::new();
        let mut src = Script::new((0..10).map(|_| Io::Done(16)));
        let mut dst = Taken {
            broken: true,
            ..Taken::default()
        };
        let mut flow = Flow::default();
        let pumped = pump(&mut src, &mut dst, &mut flow, &mut pool.pools(), 32).unwrap();
        assert!(pumped.exhausted, "more is readable: drive it again");
        assert!(src.can_read());
    }
}
