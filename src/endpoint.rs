//! One socket of a pair and what the kernel last said about it.
//!
//! Readiness is remembered in user space: an event sets bits, and only an
//! operation that shows the socket drained (WouldBlock, or a short read or
//! write) clears them. Sockets are registered once, for everything, so
//! nothing here ever re-registers.

use std::io;

use mio::event::Event;
use mio::net::TcpStream;

use crate::net;

/// Result of checking a connect in progress.
#[derive(Debug)]
pub enum Connect {
    Pending,
    Established,
    Failed(io::Error),
}

pub(crate) const READABLE: u8 = 1;
pub(crate) const WRITABLE: u8 = 2;
/// A short read does not mean the socket is drained: read on until
/// WouldBlock or EOF. Set when the peer's FIN or an error came with the
/// readable edge (EOF is still to be read), and when urgent data arrived
/// (Linux stops a read at the urgent mark even with more bytes queued).
pub(crate) const READ_ALL: u8 = 4;
/// The kernel reported an error condition; `take_error` will say which.
pub(crate) const ERROR: u8 = 8;

#[derive(Debug)]
pub struct Endpoint {
    pub stream: TcpStream,
    ready: u8,
    /// SO_OOBINLINE is set (done on the first urgent-data event).
    urgent_inline: bool,
    /// The connection is broken: the peer reset it, or an operation failed.
    /// Bytes that arrived before a reset stay readable, and are read first;
    /// an end of stream read after this is the reset's, not a FIN.
    broken: bool,
}

impl Endpoint {
    pub fn new(stream: TcpStream) -> Self {
        Endpoint {
            stream,
            ready: 0,
            urgent_inline: false,
            broken: false,
        }
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

    pub(crate) fn is(&self, bits: u8) -> bool {
        self.ready & bits != 0
    }

    pub(crate) fn clear(&mut self, bits: u8) {
        self.ready &= !bits;
    }

    /// Checks a non-blocking connect after an event. It is complete once
    /// the socket is writable with no pending error (`SO_ERROR`).
    pub(crate) fn connect_result(&mut self) -> Connect {
        if !self.is(WRITABLE | ERROR) {
            return Connect::Pending;
        }
        match self.stream.take_error() {
            Ok(Some(e)) | Err(e) => return Connect::Failed(e),
            Ok(None) => {}
        }
        self.clear(ERROR);
        // Linux reports a connecting socket writable only once the
        // handshake is done; an error-only wake-up with no error is spurious.
        if self.is(WRITABLE) {
            Connect::Established
        } else {
            Connect::Pending
        }
    }

    /// Takes note of an error the kernel flagged (`SO_ERROR`) without
    /// acting on it yet: what arrived before a reset is still to be read.
    pub(crate) fn note_error(&mut self) {
        if !self.is(ERROR) {
            return;
        }
        self.clear(ERROR);
        if let Ok(Some(_)) | Err(_) = self.stream.take_error() {
            self.set_broken();
        }
    }

    /// Marks the connection broken. The next read is tried whatever the
    /// readiness bits say: it returns what is left, then the failure.
    pub(crate) fn set_broken(&mut self) {
        self.broken = true;
        self.ready |= READABLE | READ_ALL;
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }
}
