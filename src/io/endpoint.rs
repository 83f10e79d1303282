//! One socket and what the kernel last said about it. Every operation on
//! a socket of tcplb (relaying, TLS records, refusal lines, admin answers,
//! health probes) goes through an [`Endpoint`], which is where readiness is
//! kept: the stream itself is private.
//!
//! Readiness is remembered in user space: an event sets bits, and only an
//! operation that shows the socket drained (WouldBlock, or a short read or
//! write) clears them. Sockets are registered once, for everything, so
//! nothing here ever re-registers.

use std::io::{self, Read, Write};
use std::net::Shutdown;

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::pipe::Pipe;
use super::send_queue::SendQueues;
use super::{Io, net, retrying};

/// Result of checking a connect in progress.
#[derive(Debug)]
pub(crate) enum Connect {
    Pending,
    Established,
    Failed(io::Error),
}

/// How a connection broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Reset by the peer, or an operation on it failed.
    Reset,
    /// The peer ended a TLS stream with a bare FIN, no `close_notify`: it
    /// may have been cut short, so it is passed on as a reset.
    Truncated,
}

/// What one attempt to read and drop a socket's input found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Discarded {
    Bytes(usize),
    WouldBlock,
    /// The peer finished (or broke) its side.
    End,
}

const READABLE: u8 = 1;
const WRITABLE: u8 = 2;
/// A short read does not mean the socket is drained: read on until
/// WouldBlock or EOF. Set when the peer's FIN or an error came with the
/// readable edge (EOF is still to be read), and when urgent data arrived
/// (Linux stops a read at the urgent mark even with more bytes queued).
const READ_ALL: u8 = 4;
/// The kernel reported an error condition; `take_error` will say which.
const ERROR: u8 = 8;

#[derive(Debug)]
pub(crate) struct Endpoint {
    stream: TcpStream,
    ready: u8,
    /// SO_OOBINLINE is set (done on the first urgent-data event).
    urgent_inline: bool,
    /// A splice from the socket returned 0: reads are no longer spliced
    /// (see [`Endpoint::splice_in`]).
    splice_ended: bool,
    /// The connection is broken: the peer reset it, an operation failed,
    /// or a TLS stream was cut. Bytes that arrived before a reset stay
    /// readable, and are read first; an end of stream read after this is
    /// the reset's, not a FIN.
    fault: Option<Fault>,
    /// Our FIN is sent ([`Endpoint::shutdown_write`]).
    write_shut: bool,
}

impl Endpoint {
    pub fn new(stream: TcpStream) -> Self {
        Endpoint {
            stream,
            ready: 0,
            urgent_inline: false,
            splice_ended: false,
            fault: None,
            write_shut: false,
        }
    }

    /// Registers the socket, once, for everything it will need.
    pub fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        registry.register(&mut self.stream, token, interest)
    }

    /// Remembers a readiness event. Closed and error conditions count as
    /// readable and writable so that the next operation reports them.
    pub fn on_event(&mut self, event: &Event) {
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.ready |= READABLE;
        }
        if event.is_read_closed() || event.is_error() || event.is_priority() {
            self.ready |= READABLE | READ_ALL;
        }
        if event.is_priority() && !self.urgent_inline {
            net::keep_urgent_inline(&self.stream);
            self.urgent_inline = true;
        }
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            self.ready |= WRITABLE;
        }
        if event.is_error() {
            self.ready |= ERROR;
        }
    }

    /// Lets the first write be tried before any event (a fresh socket has room).
    pub fn assume_writable(&mut self) {
        self.ready |= WRITABLE;
    }

    /// A read may produce something (bytes, EOF or an error).
    pub fn can_read(&self) -> bool {
        self.ready & READABLE != 0
    }

    /// A write may be taken.
    pub fn can_write(&self) -> bool {
        self.ready & WRITABLE != 0
    }

    /// One read into `buf`.
    pub fn read(&mut self, buf: &mut [u8]) -> Io {
        let wanted = buf.len();
        let outcome = match Io::of(retrying(|| self.stream.read(buf)), false) {
            // The reset's error was taken (`SO_ERROR`, or by a write or a
            // splice out): the kernel then ends the stream as if by FIN.
            Io::Eof if self.is_broken() || self.was_reset_unseen() => {
                Io::Failed(io::ErrorKind::ConnectionReset.into())
            }
            outcome => outcome,
        };
        match outcome {
            // A short read drained the socket: epoll reports the next
            // arrival as a new edge, so no WouldBlock probe is needed.
            Io::Done(n) if n < wanted && self.ready & READ_ALL == 0 => self.ready &= !READABLE,
            Io::WouldBlock => self.ready &= !(READABLE | READ_ALL),
            Io::Failed(_) => self.set_broken(),
            _ => {}
        }
        outcome
    }

    /// One write of a prefix of `data`.
    pub fn write(&mut self, data: &[u8]) -> Io {
        let outcome = Io::of(retrying(|| self.stream.write(data)), true);
        match outcome {
            Io::Done(n) if n < data.len() => self.ready &= !WRITABLE,
            Io::WouldBlock => self.ready &= !WRITABLE,
            Io::Eof | Io::Failed(_) => self.set_broken(),
            Io::Done(_) => {}
        }
        outcome
    }

    /// Whether reads may be spliced: not once urgent data has come (Linux
    /// stops a splice at the urgent mark, and one that starts at the mark
    /// moves nothing, so only a read gets past it), nor once a splice has
    /// found the end of the stream (which a read confirms).
    pub fn can_splice_from(&self) -> bool {
        !self.urgent_inline && !self.splice_ended
    }

    /// One read spliced into `pipe` (as much as the socket has, up to the
    /// pipe's room), with the bookkeeping of [`read`](Self::read) but for
    /// two differences. `EAGAIN` means the socket is drained only if the
    /// pipe was empty, since a pipe out of room (bytes, or slots: each
    /// holds one page of a received segment) says `EAGAIN` too, and a
    /// short splice may be the slots running out, so it clears nothing:
    /// once the pipe is emptied, the next splice tells. And the end of the
    /// stream is not taken from a splice, which also returns 0 where urgent
    /// data blocks it after the peer's FIN: it is reported as
    /// `WouldBlock`, and the direction's next read (never a splice again)
    /// finds the end, or the bytes.
    pub fn splice_in(&mut self, pipe: &mut Pipe) -> Io {
        debug_assert!(pipe.room() > 0, "a splice of 0 bytes reads as EOF");
        let was_empty = pipe.is_empty();
        match Io::of(retrying(|| pipe.fill_from(&self.stream)), false) {
            Io::Eof => {
                self.splice_ended = true;
                self.ready |= READABLE | READ_ALL;
                Io::WouldBlock
            }
            Io::WouldBlock if was_empty => {
                self.ready &= !(READABLE | READ_ALL);
                Io::WouldBlock
            }
            Io::Failed(e) => {
                self.set_broken();
                Io::Failed(e)
            }
            outcome => outcome,
        }
    }

    /// One write spliced out of `pipe`, with the bookkeeping of
    /// [`write`](Self::write): a short splice, like a short write, means
    /// the socket is full.
    pub fn splice_out(&mut self, pipe: &mut Pipe) -> Io {
        let len = pipe.len();
        debug_assert!(len > 0, "a splice of 0 bytes says nothing");
        let outcome = Io::of(retrying(|| pipe.drain_into(&self.stream)), true);
        match outcome {
            Io::Done(n) if n < len => self.ready &= !WRITABLE,
            Io::WouldBlock => self.ready &= !WRITABLE,
            Io::Eof | Io::Failed(_) => self.set_broken(),
            Io::Done(_) => {}
        }
        outcome
    }

    /// Ends the write side (FIN after everything written).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        // ENOTCONN here means the peer reset meanwhile: an error.
        let done = self.stream.shutdown(Shutdown::Write);
        if done.is_err() {
            self.set_broken();
        }
        self.write_shut = true;
        done
    }

    /// Whether an end of stream is a reset whose error nobody reported.
    /// Linux hands a reset's error to one call only, and a splice into the
    /// socket can take it yet report the bytes it moved before (it sends
    /// the pipe's pages one send at a time): the next read then finds only
    /// the end. Seen on spliced pairs only (the property test's seed 21,
    /// 5 runs in 30), never with `relay = "copy"`. A FIN
    /// leaves the socket connected (`CLOSE_WAIT`) until we send ours; a
    /// reset leaves it closed, where `getpeername` says `ENOTCONN`. Once
    /// our FIN is out, a closed socket is the clean end of both sides, so
    /// this asks only while our side is open: one syscall per stream end.
    fn was_reset_unseen(&self) -> bool {
        !self.write_shut
            && self
                .stream
                .peer_addr()
                .is_err_and(|e| e.kind() == io::ErrorKind::NotConnected)
    }

    /// Makes the coming close (the endpoint's drop) send RST instead of
    /// FIN, so a reset or an abort is passed on as such.
    pub fn abort(&self) {
        net::set_abortive_close(&self.stream);
    }

    /// Checks a non-blocking connect after an event. It is complete once
    /// the socket is writable with no pending error. A failed connect is
    /// flagged with `EPOLLERR` in the same wake-up that makes it writable,
    /// so `SO_ERROR` is read only when the kernel flagged an error: a
    /// successful connect costs no `getsockopt`.
    pub fn connect_result(&mut self) -> Connect {
        if self.ready & (WRITABLE | ERROR) == 0 {
            return Connect::Pending;
        }
        if self.ready & ERROR == 0 {
            return Connect::Established;
        }
        match self.stream.take_error() {
            Ok(Some(e)) | Err(e) => return Connect::Failed(e),
            Ok(None) => {}
        }
        self.ready &= !ERROR;
        // Linux reports a connecting socket writable only once the
        // handshake is done; an error-only wake-up with no error is spurious.
        if self.can_write() {
            Connect::Established
        } else {
            Connect::Pending
        }
    }

    /// Takes note of an error the kernel flagged (`SO_ERROR`) without
    /// acting on it yet: what arrived before a reset is still to be read.
    pub fn note_error(&mut self) {
        if self.ready & ERROR == 0 {
            return;
        }
        self.ready &= !ERROR;
        if let Ok(Some(_)) | Err(_) = self.stream.take_error() {
            self.set_broken();
        }
    }

    /// Marks the connection broken. The next read is tried whatever the
    /// readiness bits say: it returns what is left, then the failure.
    pub fn set_broken(&mut self) {
        self.fault.get_or_insert(Fault::Reset);
        self.ready |= READABLE | READ_ALL;
    }

    /// Marks a TLS stream cut short (see [`Fault::Truncated`]).
    pub fn set_truncated(&mut self) {
        self.fault.get_or_insert(Fault::Truncated);
        self.ready |= READABLE | READ_ALL;
    }

    pub fn is_broken(&self) -> bool {
        self.fault.is_some()
    }

    /// How the connection broke, if it did.
    pub fn fault(&self) -> Option<Fault> {
        self.fault
    }

    /// Its TCP keepalive, read back from the kernel.
    pub fn keepalive(&self) -> io::Result<Option<net::KeepaliveState>> {
        net::keepalive(&self.stream)
    }

    /// The socket's own address (for a client's socket, the address the
    /// client connected to).
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.stream.local_addr()
    }

    /// Bytes written to the socket that its peer has not acknowledged.
    pub fn unacked(&self, queues: &mut SendQueues) -> io::Result<u32> {
        queues.unacked(&self.stream)
    }
}

/// For rustls' `read_tls`: the same read, with the same bookkeeping.
impl Read for Endpoint {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Endpoint::read(self, buf) {
            Io::Done(n) => Ok(n),
            Io::Eof => Ok(0),
            Io::WouldBlock => Err(io::ErrorKind::WouldBlock.into()),
            Io::Failed(e) => Err(e),
        }
    }
}

/// For rustls' `write_tls`: the same write, with the same bookkeeping.
impl Write for Endpoint {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match Endpoint::write(self, data) {
            Io::Done(n) => Ok(n),
            Io::WouldBlock => Err(io::ErrorKind::WouldBlock.into()),
            Io::Eof => Err(io::ErrorKind::WriteZero.into()),
            Io::Failed(e) => Err(e),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::net::{TcpListener, TcpStream as StdStream};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::Relay;
    use crate::io::pipe::PipePool;

    /// tcplb's end of a loopback connection, and the peer's.
    fn connected() -> (Endpoint, StdStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (Endpoint::new(TcpStream::from_std(ours)), peer)
    }

    /// Waits (bounded) until `n` bytes, or the end, have arrived at `ep`.
    fn arrived(ep: &Endpoint, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut peek = vec![0u8; n + 1];
        loop {
            match ep.stream.peek(&mut peek) {
                Ok(got) if got >= n => return,
                Ok(0) => panic!("the end came before {n} bytes"),
                _ => assert!(Instant::now() < deadline, "{n} bytes never arrived"),
            }
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_splice_clears_readable_only_once_it_finds_the_socket_drained() {
        let (mut ep, mut peer) = connected();
        let mut pipes = PipePool::new(Relay::Splice, 64 * 1024, 2);
        let mut pipe = pipes.take(false).unwrap();
        peer.write_all(&[7; 100]).unwrap();
        arrived(&ep, 100);
        ep.ready |= READABLE;
        assert!(matches!(ep.splice_in(&mut pipe), Io::Done(100)));
        assert!(ep.can_read(), "a short splice clears nothing");
        // The socket is drained, but a pipe with bytes in it cannot tell
        // that from being out of room: readable stays.
        assert!(matches!(ep.splice_in(&mut pipe), Io::WouldBlock));
        assert!(ep.can_read());
        // With an empty pipe, EAGAIN is the socket's.
        let mut empty = pipes.take(false).unwrap();
        assert!(matches!(ep.splice_in(&mut empty), Io::WouldBlock));
        assert!(!ep.can_read());
        assert_eq!((pipe.len(), empty.len()), (100, 0));
    }

    #[test]
    fn a_splice_out_moves_the_pipes_bytes_and_a_splice_does_not_take_eof() {
        let (mut from, mut peer) = connected();
        let (mut to, mut reader) = connected();
        let mut pipes = PipePool::new(Relay::Splice, 64 * 1024, 1);
        let mut pipe = pipes.take(false).unwrap();
        peer.write_all(b"spliced").unwrap();
        peer.shutdown(Shutdown::Write).unwrap();
        arrived(&from, 7);
        from.ready |= READABLE;
        assert!(matches!(from.splice_in(&mut pipe), Io::Done(7)));
        to.assume_writable();
        assert!(matches!(to.splice_out(&mut pipe), Io::Done(7)));
        assert!(pipe.is_empty() && to.can_write());
        let mut got = [0u8; 7];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"spliced");
        // The FIN: a splice returns 0, which is not taken for the end
        // (urgent data after a FIN ends a splice the same way); reads
        // take over and find it.
        assert!(matches!(from.splice_in(&mut pipe), Io::WouldBlock));
        assert!(!from.can_splice_from() && from.can_read());
        assert!(matches!(from.read(&mut got), Io::Eof));
    }

    /// Waits (bounded) until `done` holds for `ep`.
    fn until(ep: &Endpoint, what: &str, done: impl Fn(&Endpoint) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(ep) {
            assert!(Instant::now() < deadline, "{what} never came");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_reset_whose_error_something_else_took_still_reads_as_a_reset() {
        let (mut ep, mut peer) = connected();
        peer.write_all(b"bytes").unwrap();
        arrived(&ep, 5);
        socket2::SockRef::from(&peer)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(peer);
        // Take the reset's error behind the endpoint's back, as a splice
        // into the socket can when it reports the pages it sent before.
        until(&ep, "the reset", |ep| {
            matches!(ep.stream.take_error(), Ok(Some(_)))
        });
        ep.ready |= READABLE;
        let mut got = [0u8; 8];
        assert!(matches!(ep.read(&mut got), Io::Done(5)), "the bytes first");
        assert!(
            matches!(ep.read(&mut got), Io::Failed(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "then the reset, not an end"
        );
        assert!(ep.is_broken());
    }

    #[test]
    fn after_our_fin_the_peers_fin_is_the_end_though_the_socket_is_closed() {
        let (mut ep, mut peer) = connected();
        ep.shutdown_write().unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(peer.read(&mut byte).unwrap(), 0, "our FIN");
        peer.shutdown(Shutdown::Write).unwrap();
        // Both FINs are acknowledged: the kernel has closed our socket
        // (its end lives on in TIME_WAIT), as a reset would.
        until(&ep, "the close", |ep| ep.stream.peer_addr().is_err());
        ep.ready |= READABLE;
        assert!(matches!(ep.read(&mut byte), Io::Eof));
        assert!(!ep.is_broken());
    }
}
