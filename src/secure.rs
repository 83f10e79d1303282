//! A client's TLS session, driven by the same readiness events as a plain
//! socket: rustls is sans-IO, so the loop moves TLS records between the
//! socket and the session ([`ClientTls::handshake`], [`ClientTls::flush`])
//! and the relay reads and writes plaintext through [`TlsSide`], which is a
//! [`Source`] and a [`Sink`] like a plain socket.
//!
//! Backpressure holds over TLS: records are read from the socket only when
//! the session has no plaintext left for the relay, and the session's
//! outgoing buffer is capped (`set_buffer_limit`), so a slow client stops
//! the relay from taking more from its host. A client's `close_notify` is
//! its FIN; ending the host-to-client direction sends `close_notify`, then
//! FIN. A TCP FIN without `close_notify` may be a truncation, so it is
//! passed on as a reset. Socket errors mark the endpoint broken, as plain
//! reads and writes do, so the relay sees a reset the same way for both.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use rustls::ServerConnection;
use rustls::server::ServerConfig;
use rustls_pki_types::CertificateDer;

use crate::endpoint::{Endpoint, READ_ALL, READABLE, WRITABLE};
use crate::flow::{Sink, Source};
use crate::net::Io;

/// How a handshake step ended.
#[derive(Debug)]
pub enum Handshake {
    /// Waiting for the client.
    Pending,
    /// Done: the client's certificate chain is verified.
    Done,
    /// Refused by TLS (bad certificate, protocol error); the alert is sent.
    Failed(String),
    /// The client closed or reset the connection.
    Gone,
}

/// What one attempt to read and drop a refused client's input found.
#[derive(Debug, PartialEq, Eq)]
pub enum Discarded {
    Bytes(usize),
    WouldBlock,
    /// The client finished (or broke) its side.
    End,
}

#[derive(Debug)]
pub struct ClientTls {
    conn: ServerConnection,
    /// The session holds plaintext (or a pending `close_notify`) for the relay.
    plaintext: bool,
    close_notify_queued: bool,
}

impl ClientTls {
    /// A server session whose buffers of outgoing data hold at most `limit` bytes.
    pub fn new(config: Arc<ServerConfig>, limit: usize) -> Result<Box<ClientTls>, rustls::Error> {
        let mut conn = ServerConnection::new(config)?;
        conn.set_buffer_limit(Some(limit));
        Ok(Box::new(ClientTls {
            conn,
            plaintext: false,
            close_notify_queued: false,
        }))
    }

    /// Advances the handshake as far as the socket allows.
    pub fn handshake(&mut self, ep: &mut Endpoint) -> Handshake {
        loop {
            // A failed write marks the socket broken, but what the client
            // sent before it reset is still to be read: it may complete the
            // handshake and carry data, which the relay then delivers.
            let _ = self.flush(ep);
            if !self.conn.is_handshaking() {
                return Handshake::Done;
            }
            if !ep.is(READABLE) {
                return Handshake::Pending;
            }
            match self.conn.read_tls(&mut ep.stream) {
                Ok(0) => return Handshake::Gone,
                Ok(_) => {
                    if let Err(e) = self.process() {
                        // rustls queued an alert saying why; send it if we can.
                        let _ = self.flush(ep);
                        return Handshake::Failed(e.to_string());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ep.clear(READABLE | READ_ALL),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Handshake::Gone,
            }
        }
    }

    fn process(&mut self) -> Result<(), rustls::Error> {
        let state = self.conn.process_new_packets()?;
        self.plaintext = state.plaintext_bytes_to_read() > 0 || state.peer_has_closed();
        Ok(())
    }

    /// Writes queued TLS records while the socket takes them; returns
    /// whether anything was written.
    pub fn flush(&mut self, ep: &mut Endpoint) -> io::Result<bool> {
        let mut wrote = false;
        while self.conn.wants_write() && ep.is(WRITABLE) && !ep.is_broken() {
            match self.conn.write_tls(&mut ep.stream) {
                Ok(_) => wrote = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ep.clear(WRITABLE),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    ep.set_broken();
                    return Err(e);
                }
            }
        }
        Ok(wrote)
    }

    /// Whether records wait to be written to the socket.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// The client's verified end-entity certificate.
    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.conn.peer_certificates()?.first()
    }

    /// Queues `line` and `close_notify` (a refusal); [`flush`](Self::flush) sends them.
    pub fn queue_last_words(&mut self, line: &[u8]) {
        let _ = self.conn.writer().write_all(line);
        self.queue_close_notify();
    }

    fn queue_close_notify(&mut self) {
        if !self.close_notify_queued {
            self.conn.send_close_notify();
            self.close_notify_queued = true;
        }
    }

    /// Reads and drops what a refused client still sends.
    pub fn discard(&mut self, ep: &mut Endpoint) -> Discarded {
        let mut scratch = [0u8; 2048];
        let mut total = 0;
        loop {
            match self.conn.reader().read(&mut scratch) {
                Ok(0) => return Discarded::End,
                Ok(n) => {
                    total += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Discarded::End,
            }
            if !ep.is(READABLE) {
                return if total > 0 {
                    Discarded::Bytes(total)
                } else {
                    Discarded::WouldBlock
                };
            }
            match self.conn.read_tls(&mut ep.stream) {
                Ok(0) => return Discarded::End,
                Ok(n) => {
                    total += n;
                    if self.process().is_err() {
                        return Discarded::End;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ep.clear(READABLE | READ_ALL),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Discarded::End,
            }
        }
    }

    /// The session and its socket, as the relay's source or sink.
    pub fn side<'a>(&'a mut self, ep: &'a mut Endpoint) -> TlsSide<'a> {
        TlsSide { tls: self, ep }
    }
}

/// A client's TLS session together with its socket.
pub struct TlsSide<'a> {
    tls: &'a mut ClientTls,
    ep: &'a mut Endpoint,
}

impl Source for TlsSide<'_> {
    fn can_read(&self) -> bool {
        self.tls.plaintext || self.ep.is(READABLE)
    }

    fn read(&mut self, buf: &mut [u8]) -> Io {
        loop {
            match self.tls.conn.reader().read(buf) {
                Ok(0) => return Io::Eof,
                Ok(n) => {
                    self.tls.plaintext = n == buf.len();
                    return Io::Done(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.tls.plaintext = false,
                // TCP FIN without close_notify: the stream may have been cut
                // short, so the host gets a reset, not a clean end.
                Err(e) => {
                    self.ep.set_broken();
                    return Io::Failed(e);
                }
            }
            if !self.ep.is(READABLE) {
                return Io::WouldBlock;
            }
            // Only now, with no plaintext left, take more records in.
            match self.tls.conn.read_tls(&mut self.ep.stream) {
                Ok(_) => {
                    if let Err(e) = self.tls.process() {
                        // The alert rustls queued is not sent: the client
                        // broke the protocol, and is reset.
                        self.ep.set_broken();
                        return Io::Failed(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.ep.clear(READABLE | READ_ALL);
                    return Io::WouldBlock;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.ep.set_broken();
                    return Io::Failed(e);
                }
            }
        }
    }
}

impl Sink for TlsSide<'_> {
    fn is_broken(&self) -> bool {
        self.ep.is_broken()
    }

    fn can_write(&self) -> bool {
        true
    }

    fn write(&mut self, data: &[u8]) -> Io {
        // Make room first: the session's buffer is capped.
        if let Err(e) = self.tls.flush(self.ep) {
            return Io::Failed(e);
        }
        match self.tls.conn.writer().write(data) {
            Ok(0) => Io::WouldBlock,
            Ok(n) => match self.tls.flush(self.ep) {
                Ok(_) => Io::Done(n),
                Err(e) => Io::Failed(e),
            },
            Err(e) => Io::Failed(e),
        }
    }

    fn finish(&mut self) -> io::Result<bool> {
        self.tls.queue_close_notify();
        self.tls.flush(self.ep)?;
        if self.tls.conn.wants_write() {
            return Ok(false);
        }
        if let Err(e) = self.ep.stream.shutdown(Shutdown::Write) {
            self.ep.set_broken();
            return Err(e);
        }
        Ok(true)
    }
}
