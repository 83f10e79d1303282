//! Everything that touches a socket: one [`Endpoint`] per socket, which
//! keeps the readiness bookkeeping for every operation on it; the
//! [`flow`] of one direction through a pooled [`buffer`], or spliced
//! through a pooled kernel [`pipe`] (plain TCP); a client's TLS
//! session on top of an endpoint; socket options and connects ([`net`]);
//! and what a peer has not acknowledged yet ([`send_queue`]).
//!
//! `io::Error`s of reads and writes are mapped here, once, to [`Io`], for
//! plain sockets and TLS alike; nothing above this module matches on an
//! error kind to decide what a read or a write did.

pub(crate) mod buffer;
pub(crate) mod endpoint;
pub(crate) mod flow;
pub(crate) mod net;
pub(crate) mod pipe;
pub(crate) mod send_queue;
pub(crate) mod tls_session;

use std::io;

pub(crate) use endpoint::{Connect, Endpoint};

/// The outcome of one read or write.
#[derive(Debug)]
pub(crate) enum Io {
    /// Bytes moved (never 0).
    Done(usize),
    /// The socket has nothing more for now.
    WouldBlock,
    /// The peer finished sending (reads only).
    Eof,
    /// The connection is broken: reset, refused, timed out, or another error.
    Failed(io::Error),
}

impl Io {
    /// The one mapping of a read's or a write's result. `Interrupted` is
    /// for the caller to retry; see [`retrying`].
    pub(super) fn of(result: io::Result<usize>, writing: bool) -> Io {
        match result {
            Ok(0) if writing => Io::Failed(io::ErrorKind::WriteZero.into()),
            Ok(0) => Io::Eof,
            Ok(n) => Io::Done(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Io::WouldBlock,
            Err(e) => Io::Failed(e),
        }
    }
}

/// Runs a read or write, retrying it while a signal interrupts it.
fn retrying(mut op: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            result => return result,
        }
    }
}
