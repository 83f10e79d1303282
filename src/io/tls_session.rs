//! A TLS session driven by the same readiness events as a plain socket:
//! rustls is sans-IO, so the loop moves TLS records between the peer's
//! [`Endpoint`] and the session ([`TlsSession::handshake`],
//! [`TlsSession::flush`]) and reads and writes plaintext through
//! [`TlsSide`], which is a [`Source`] and a [`Sink`] like a plain socket.
//! Records go through the endpoint's own reads and writes, so readiness is
//! kept in one place for plain and TLS alike.
//!
//! The session is generic over rustls' side: the server side (the
//! default type, [`ServerConnection`]) is a client's session, which the
//! relay drives; the client side ([`ClientConnection`]) is the cluster
//! thread's session with a `rediss://` Redis. Both are one pump, compiled
//! for each side (no dispatch on the relay path).
//!
//! Backpressure holds over TLS: records are read from the socket only when
//! the session has no plaintext left for the relay, and the session's
//! outgoing buffer is capped (`set_buffer_limit`), so a slow client stops
//! the relay from taking more from its host. A client's `close_notify` is
//! its FIN; ending the host-to-client direction sends `close_notify`, then
//! FIN. A TCP FIN without `close_notify` may be a truncation, and a
//! protocol error breaks the stream: both mark the endpoint broken, so
//! the relay passes them on as a reset, as it does a socket's reset.

use std::io::{self, Read, Write};
use std::ops::DerefMut;
use std::sync::Arc;

use rustls::client::ClientConfig;
use rustls::server::ServerConfig;
use rustls::{ClientConnection, ConnectionCommon, ServerConnection};
use rustls_pki_types::{CertificateDer, ServerName};

use super::Io;
use super::endpoint::{Discarded, Endpoint};
use super::flow::{Sink, Source};

/// How a handshake step ended.
#[derive(Debug)]
pub(crate) enum Handshake {
    /// Waiting for the peer.
    Pending,
    /// Done: the peer's certificate chain is verified.
    Done,
    /// Refused by TLS (bad certificate, protocol error); the alert is sent.
    /// Put in words by the side that knows who the peer is
    /// ([`crate::tls::handshake_failure`] for clients).
    Failed(rustls::Error),
    /// The peer closed or reset the connection.
    Gone,
}

/// A TLS session with one peer: by default, a server-side session with
/// one client.
#[derive(Debug)]
pub(crate) struct TlsSession<C = ServerConnection> {
    conn: C,
    /// The session holds plaintext (or a pending `close_notify`) for the reader.
    plaintext: bool,
    close_notify_queued: bool,
}

impl TlsSession<ServerConnection> {
    /// A server session whose buffers of outgoing data hold at most `limit` bytes.
    pub fn new(config: Arc<ServerConfig>, limit: usize) -> Result<Box<TlsSession>, rustls::Error> {
        let mut conn = ServerConnection::new(config)?;
        conn.set_buffer_limit(Some(limit));
        Ok(TlsSession::of(conn))
    }

    /// Takes in records that arrived before the session existed (after a
    /// PROXY header, in the same segment); the error is why the handshake
    /// failed, in words.
    pub fn take_in(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        while !bytes.is_empty() {
            match self.conn.read_tls(&mut bytes) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(format!("cannot take the first records in: {e}")),
            }
            let state = self
                .conn
                .process_new_packets()
                .map_err(|e| crate::tls::handshake_failure(&e))?;
            self.plaintext = state.plaintext_bytes_to_read() > 0 || state.peer_has_closed();
        }
        Ok(())
    }

    /// The server name the client asked for (SNI), if it sent one.
    pub fn server_name(&self) -> Option<&str> {
        self.conn.server_name()
    }

    /// The client's verified end-entity certificate.
    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.conn.peer_certificates()?.first()
    }
}

impl TlsSession<ClientConnection> {
    /// A client session with the server `name` (the name its certificate
    /// is verified against), whose buffers of outgoing data hold at most
    /// `limit` bytes; its first flight (the ClientHello) is queued.
    pub fn client(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        limit: usize,
    ) -> Result<Box<TlsSession<ClientConnection>>, rustls::Error> {
        let mut conn = ClientConnection::new(config, name)?;
        conn.set_buffer_limit(Some(limit));
        Ok(TlsSession::of(conn))
    }
}

impl<C, D> TlsSession<C>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
{
    fn of(conn: C) -> Box<TlsSession<C>> {
        Box::new(TlsSession {
            conn,
            plaintext: false,
            close_notify_queued: false,
        })
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
            if !ep.can_read() {
                return Handshake::Pending;
            }
            match self.read_records(ep) {
                Ok(Io::Done(_) | Io::WouldBlock) => {}
                Ok(Io::Eof | Io::Failed(_)) => return Handshake::Gone,
                Err(e) => {
                    // rustls queued an alert saying why; send it if we can.
                    let _ = self.flush(ep);
                    return Handshake::Failed(e);
                }
            }
        }
    }

    /// One read of TLS records from the socket, processed at once. A
    /// protocol error is the `Err`; what the socket did is the `Io`.
    fn read_records(&mut self, ep: &mut Endpoint) -> Result<Io, rustls::Error> {
        let outcome = match self.conn.read_tls(ep) {
            Ok(0) => Io::Eof,
            Ok(n) => Io::Done(n),
            // The endpoint kept the bookkeeping; its error is all there is.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Io::WouldBlock,
            Err(e) => Io::Failed(e),
        };
        // EOF is processed too: rustls then tells a clean close from a cut.
        if let Io::Done(_) | Io::Eof = outcome {
            let state = self.conn.process_new_packets()?;
            self.plaintext = state.plaintext_bytes_to_read() > 0 || state.peer_has_closed();
        }
        Ok(outcome)
    }

    /// Writes queued TLS records while the socket takes them; returns
    /// whether anything was written. Nothing is written to a broken socket.
    pub fn flush(&mut self, ep: &mut Endpoint) -> io::Result<bool> {
        let mut wrote = false;
        while self.conn.wants_write() && ep.can_write() && !ep.is_broken() {
            match self.conn.write_tls(ep) {
                Ok(_) => wrote = true,
                // The endpoint cleared its writable bit: the loop ends.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(wrote)
    }

    /// Whether records wait to be written to the socket.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// The TLS version in use, as the PROXY protocol and OpenSSL write it.
    pub fn version_name(&self) -> Option<&'static str> {
        match self.conn.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
            rustls::ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
            _ => None,
        }
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
        self.side(ep).discard()
    }

    /// The session and its socket, as the relay's source or sink.
    pub fn side<'a>(&'a mut self, ep: &'a mut Endpoint) -> TlsSide<'a, C> {
        TlsSide { tls: self, ep }
    }
}

/// A TLS session together with its socket.
pub(crate) struct TlsSide<'a, C = ServerConnection> {
    tls: &'a mut TlsSession<C>,
    ep: &'a mut Endpoint,
}

impl<C, D> Source for TlsSide<'_, C>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
{
    fn can_read(&self) -> bool {
        self.tls.plaintext || self.ep.can_read()
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
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.ep.set_truncated();
                    return Io::Failed(e);
                }
                Err(e) => {
                    self.ep.set_broken();
                    return Io::Failed(e);
                }
            }
            if !self.ep.can_read() {
                return Io::WouldBlock;
            }
            // Only now, with no plaintext left, take more records in.
            match self.tls.read_records(self.ep) {
                Ok(Io::Done(_) | Io::Eof) => {}
                Ok(Io::WouldBlock) => return Io::WouldBlock,
                Ok(Io::Failed(e)) => return Io::Failed(e),
                Err(e) => {
                    // The alert rustls queued is not sent: the client
                    // broke the protocol, and is reset.
                    self.ep.set_broken();
                    return Io::Failed(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
        }
    }
}

impl<C, D> Sink for TlsSide<'_, C>
where
    C: DerefMut<Target = ConnectionCommon<D>>,
{
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
        self.ep.shutdown_write().map(|()| true)
    }
}
