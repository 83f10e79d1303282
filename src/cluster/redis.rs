//! One connection to Redis, non-blocking and pipelined: commands are
//! encoded as RESP arrays of bulk strings onto an output buffer and
//! written as the socket takes them, many in flight at once; replies are
//! decoded from the input as they arrive, in the order of the commands
//! (RESP2, with the `redis-protocol` crate's decoder). Every read and
//! write goes through an [`Endpoint`], which keeps the readiness.
//!
//! For `rediss://` the same socket carries a TLS session, the client side
//! of the [`TlsSession`] that clients' sessions use: the handshake runs
//! after the connect, on the same readiness events, before any command
//! goes out, and commands and replies then go through the session as
//! plaintext. A failed handshake, a certificate refused either way, or a
//! TLS error later is a [`Broken::Tls`] saying why.
//!
//! Nothing here blocks, and nothing Redis (or something posing as Redis)
//! sends can panic the thread or grow memory without bound: a reply that
//! is not RESP, nests deeper than [`MAX_DEPTH`] or is larger than
//! [`MAX_REPLY`] ends the connection with an error.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::encode::encode_borrowed;
use redis_protocol::resp2::types::{BorrowedFrame, OwnedFrame};
use rustls::ClientConnection;
use rustls::client::ClientConfig;
use rustls_pki_types::ServerName;

use crate::io::flow::{Sink, Source};
use crate::io::tls_session::{Handshake, TlsSession};
use crate::io::{Connect, Endpoint, Io};

/// The largest reply (or unfinished part of one) kept: tcplb's replies
/// are a few dozen bytes; an error message a few hundred.
pub(crate) const MAX_REPLY: usize = 16 * 1024;
/// The deepest nesting of arrays read (tcplb's replies nest one deep).
/// Checked before the decoder runs, which recurses once per level.
pub(crate) const MAX_DEPTH: usize = 8;
/// Bytes read per read call.
const READ_CHUNK: usize = 16 * 1024;
/// The most a TLS session holds of records not yet written (commands
/// beyond wait in the connection's own output).
const TLS_BUFFER: usize = 64 * 1024;

/// How tcplb speaks TLS to a `rediss://` Redis: the config rustls
/// connects with, the name Redis's certificate is verified against, and
/// what verifies it, in words for messages.
#[derive(Debug, Clone)]
pub(crate) struct TlsClient {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
    pub trusted: &'static str,
}

/// A reply, as tcplb reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+OK` and other simple strings.
    Status(String),
    /// `-ERR ...`: the command failed.
    Error(String),
    Integer(i64),
    Bulk(Vec<u8>),
    Array(Vec<Reply>),
    Nil,
}

impl Reply {
    fn of(frame: OwnedFrame) -> Reply {
        match frame {
            OwnedFrame::SimpleString(s) => Reply::Status(String::from_utf8_lossy(&s).into_owned()),
            OwnedFrame::Error(e) => Reply::Error(e),
            OwnedFrame::Integer(n) => Reply::Integer(n),
            OwnedFrame::BulkString(b) => Reply::Bulk(b),
            OwnedFrame::Array(items) => Reply::Array(items.into_iter().map(Reply::of).collect()),
            OwnedFrame::Null => Reply::Nil,
        }
    }
}

/// Why the connection cannot go on.
#[derive(Debug)]
pub(crate) enum Broken {
    /// Redis closed it.
    Closed,
    /// A read or write failed.
    Io(io::Error),
    /// Redis sent something that is not a reply tcplb can read.
    Protocol(String),
    /// TLS failed: the handshake, a certificate, or the session later.
    Tls(String),
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Closed => write!(f, "it closed the connection"),
            Broken::Io(e) => write!(f, "{e}"),
            Broken::Protocol(why) => write!(f, "it sent {why}"),
            Broken::Tls(why) => write!(f, "TLS: {why}"),
        }
    }
}

/// One connection to Redis.
#[derive(Debug)]
pub(crate) struct Connection {
    endpoint: Endpoint,
    /// With `rediss://`: the session, and what verifies Redis (for messages).
    tls: Option<(Box<TlsSession<ClientConnection>>, &'static str)>,
    /// The TCP connect is done (the TLS handshake may be under way).
    established: bool,
    /// Connected, and (with TLS) the handshake done: commands may go out.
    connected: bool,
    /// Encoded commands; `out[sent..]` is not written yet.
    out: Vec<u8>,
    sent: usize,
    /// Bytes read and not yet decoded into replies.
    input: Vec<u8>,
}

impl Connection {
    /// Starts the connect (and with `tls`, the session, whose handshake
    /// begins once connected), registered under `token` for everything.
    pub fn open(
        addr: SocketAddr,
        tls: Option<&TlsClient>,
        registry: &Registry,
        token: Token,
    ) -> io::Result<Connection> {
        let tls = match tls {
            Some(tls) => {
                let session = TlsSession::client(tls.config.clone(), tls.name.clone(), TLS_BUFFER)
                    .map_err(io::Error::other)?;
                Some((session, tls.trusted))
            }
            None => None,
        };
        let stream = TcpStream::connect(addr)?;
        let _ = stream.set_nodelay(true);
        let mut endpoint = Endpoint::new(stream);
        endpoint.register(registry, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Connection {
            endpoint,
            tls,
            established: false,
            connected: false,
            out: Vec::new(),
            sent: 0,
            input: Vec::new(),
        })
    }

    pub fn on_event(&mut self, event: &mio::event::Event) {
        self.endpoint.on_event(event);
    }

    /// Whether the connect (and the TLS handshake) is done; an error if
    /// it failed.
    pub fn connected(&mut self) -> Result<bool, Broken> {
        if self.connected {
            return Ok(true);
        }
        if !self.established {
            match self.endpoint.connect_result() {
                Connect::Pending => return Ok(false),
                Connect::Failed(e) => return Err(Broken::Io(e)),
                Connect::Established => self.established = true,
            }
        }
        let Some((tls, trusted)) = &mut self.tls else {
            self.connected = true;
            return Ok(true);
        };
        match tls.handshake(&mut self.endpoint) {
            Handshake::Pending => Ok(false),
            Handshake::Done => {
                self.connected = true;
                Ok(true)
            }
            Handshake::Failed(e) => Err(Broken::Tls(format!(
                "the handshake failed: {}",
                crate::tls::server_failure(&e, trusted)
            ))),
            Handshake::Gone => Err(Broken::Tls(
                "it closed the connection during the handshake (does it speak TLS there?)"
                    .to_string(),
            )),
        }
    }

    /// Queues one command (sent by the next [`flush`](Self::flush)).
    pub fn queue(&mut self, args: &[&[u8]]) {
        let frames: Vec<BorrowedFrame<'_>> =
            args.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
        let frame = BorrowedFrame::Array(&frames);
        let start = self.out.len();
        self.out.resize(start + frame.encode_len(false), 0);
        // The buffer was sized for the frame: encoding cannot run short.
        let n = encode_borrowed(&mut self.out[start..], &frame, false).unwrap_or(0);
        self.out.truncate(start + n);
    }

    /// Bytes queued and not yet taken by the socket.
    pub fn unsent(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Writes what is queued while the socket takes it.
    pub fn flush(&mut self) -> Result<(), Broken> {
        if !self.connected {
            return Ok(());
        }
        let done = match &mut self.tls {
            None => self
                .endpoint
                .write_out(&self.out, &mut self.sent)
                .map_err(Broken::Io)?,
            Some((tls, _)) => {
                let done = (tls.side(&mut self.endpoint))
                    .write_out(&self.out, &mut self.sent)
                    .map_err(Broken::Io)?;
                // Records of the session's own (a key update, an alert)
                // go out even when no command is queued.
                tls.flush(&mut self.endpoint).map_err(Broken::Io)?;
                done
            }
        };
        if done {
            self.out.clear();
            self.sent = 0;
        }
        Ok(())
    }

    /// Reads what has arrived and decodes every complete reply in it.
    pub fn receive(&mut self) -> Result<Vec<Reply>, Broken> {
        let mut replies = Vec::new();
        if !self.connected {
            return Ok(replies);
        }
        loop {
            let outcome = match &mut self.tls {
                None if self.endpoint.can_read() => {
                    self.endpoint.read_onto(&mut self.input, READ_CHUNK)
                }
                None => break,
                Some((tls, trusted)) => {
                    let mut side = tls.side(&mut self.endpoint);
                    if !side.can_read() {
                        break;
                    }
                    match side.read_onto(&mut self.input, READ_CHUNK) {
                        Io::Failed(e) => return Err(tls_broken(e, trusted)),
                        outcome => outcome,
                    }
                }
            };
            match outcome {
                Io::Done(_) => self.decode(&mut replies)?,
                Io::WouldBlock => break,
                Io::Eof => return Err(Broken::Closed),
                Io::Failed(e) => return Err(Broken::Io(e)),
            }
        }
        Ok(replies)
    }

    /// Moves the complete replies at the front of the input to `replies`.
    fn decode(&mut self, replies: &mut Vec<Reply>) -> Result<(), Broken> {
        let mut at = 0;
        let outcome = loop {
            let rest = &self.input[at..];
            if rest.is_empty() {
                break Ok(());
            }
            if let Err(why) = shallow_enough(rest) {
                break Err(Broken::Protocol(why));
            }
            match decode(rest) {
                Ok(Some((frame, used))) => {
                    replies.push(Reply::of(frame));
                    at += used;
                }
                Ok(None) if rest.len() > MAX_REPLY => {
                    break Err(Broken::Protocol(format!(
                        "a reply larger than {MAX_REPLY} bytes"
                    )));
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    break Err(Broken::Protocol(format!(
                        "something that is not RESP ({e:?})"
                    )));
                }
            }
        };
        self.input.drain(..at);
        outcome
    }

    /// Ends the connection with RST (no TIME_WAIT left on tcplb's side).
    pub fn close(self) {
        self.endpoint.abort();
    }
}

/// A failed read through the TLS session: what TLS said (an alert from
/// Redis, such as its refusal of the client certificate, which TLS 1.3
/// sends after the handshake), or the socket's error.
fn tls_broken(e: io::Error, trusted: &str) -> Broken {
    if let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        return Broken::Tls(crate::tls::server_failure(tls, trusted));
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            Broken::Tls("it closed the connection without close_notify".to_string())
        }
        _ => Broken::Io(e),
    }
}

/// Checks that the reply at the front of `input` nests at most
/// [`MAX_DEPTH`] arrays deep, looking only at its type bytes and lengths,
/// so that the recursive decoder never sees a deeper one. What is not
/// well formed is left for the decoder to reject.
fn shallow_enough(input: &[u8]) -> Result<(), String> {
    // Items still to come at each open level.
    let mut open: Vec<u64> = Vec::new();
    let mut at = 0;
    loop {
        let Some(&kind) = input.get(at) else {
            return Ok(());
        };
        let Some(end) = find_crlf(input, at + 1) else {
            return Ok(());
        };
        let header = &input[at + 1..end];
        at = end + 2;
        match kind {
            b'*' => {
                let n = std::str::from_utf8(header)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(-1);
                if n > 0 {
                    if open.len() >= MAX_DEPTH {
                        return Err(format!("arrays nested deeper than {MAX_DEPTH}"));
                    }
                    open.push(n as u64);
                    continue;
                }
            }
            b'$' => {
                let n = std::str::from_utf8(header)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                    .unwrap_or(-1);
                if n >= 0 {
                    at = at.saturating_add(n as usize + 2);
                }
            }
            b'+' | b'-' | b':' => {}
            _ => return Ok(()),
        }
        // One item done: close the levels it completes.
        loop {
            match open.last_mut() {
                None => return Ok(()),
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    open.pop();
                }
            }
        }
    }
}

fn find_crlf(input: &[u8], from: usize) -> Option<usize> {
    input
        .get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|i| from + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain connection to a loopback listener that never answers (kept
    /// open, with the poller, by the caller).
    fn plain_connection() -> (std::net::TcpListener, mio::Poll, Connection) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let poll = mio::Poll::new().unwrap();
        let addr = listener.local_addr().unwrap();
        let conn = Connection::open(addr, None, poll.registry(), Token(1)).unwrap();
        (listener, poll, conn)
    }

    /// Decodes `bytes` as the connection does, fed in `chunk`-sized reads.
    fn decode_in_chunks(bytes: &[u8], chunk: usize) -> Result<Vec<Reply>, String> {
        let (_listener, _poll, mut conn) = plain_connection();
        let mut replies = Vec::new();
        for part in bytes.chunks(chunk.max(1)) {
            conn.input.extend_from_slice(part);
            conn.decode(&mut replies).map_err(|e| e.to_string())?;
        }
        Ok(replies)
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let (_listener, _poll, mut conn) = plain_connection();
        conn.queue(&[b"EVALSHA", b"ab", b"2", b"k\r\n1", b""]);
        assert_eq!(
            conn.out,
            b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$4\r\nk\r\n1\r\n$0\r\n\r\n"
        );
        assert_eq!(conn.unsent(), conn.out.len());
    }

    #[test]
    fn replies_decode_whatever_the_reads_split() {
        let bytes = b"+OK\r\n$40\r\n0123456789012345678901234567890123456789\r\n*3\r\n:2\r\n:0\r\n:7\r\n-NOSCRIPT No matching script\r\n$-1\r\n*0\r\n";
        let expected = vec![
            Reply::Status("OK".into()),
            Reply::Bulk(b"0123456789012345678901234567890123456789".to_vec()),
            Reply::Array(vec![
                Reply::Integer(2),
                Reply::Integer(0),
                Reply::Integer(7),
            ]),
            Reply::Error("NOSCRIPT No matching script".into()),
            Reply::Nil,
            Reply::Array(vec![]),
        ];
        for chunk in [1, 2, 3, 7, 64, bytes.len()] {
            assert_eq!(
                decode_in_chunks(bytes, chunk).unwrap(),
                expected,
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn hostile_replies_are_errors_not_panics() {
        // Deep nesting (the decoder recurses per level), huge lengths,
        // garbage, and an endless unfinished reply.
        let deep = "*1\r\n".repeat(100_000);
        let err = decode_in_chunks(deep.as_bytes(), 4096).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
        assert!(
            decode_in_chunks(b"*8\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", 3).is_ok()
        );
        let err = decode_in_chunks(b"?what\r\n", 64).unwrap_err();
        assert!(err.contains("not RESP"), "{err}");
        let huge = b"$99999999999\r\nabc";
        assert!(
            decode_in_chunks(huge, 64).unwrap().is_empty(),
            "waits for more"
        );
        let endless: Vec<u8> = b"+"
            .iter()
            .copied()
            .chain(std::iter::repeat_n(b'a', MAX_REPLY + 10))
            .collect();
        let err = decode_in_chunks(&endless, 4096).unwrap_err();
        assert!(err.contains("larger than"), "{err}");
        let err = decode_in_chunks(b"*99999999999999\r\n:1\r\n", 64);
        assert!(matches!(err, Ok(ref r) if r.is_empty()), "{err:?}");
        let err = decode_in_chunks(b":12x\r\n", 64).unwrap_err();
        assert!(err.contains("not RESP"), "{err}");
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        // A fuzz-style sweep: random prefixes of valid replies, random
        // bytes, and random mutations, in random read sizes.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid: &[u8] =
            b"*3\r\n:1\r\n:250\r\n:4\r\n+OK\r\n$3\r\nabc\r\n-ERR x\r\n*2\r\n*1\r\n$-1\r\n:5\r\n";
        let alphabet = b"*$:+-\r\n0123456789-ab";
        for _ in 0..3000 {
            let mut bytes = valid.to_vec();
            for _ in 0..(next() % 6) {
                let i = (next() as usize) % bytes.len();
                bytes[i] = alphabet[(next() as usize) % alphabet.len()];
            }
            if next() % 4 == 0 {
                let len = (next() as usize) % 64;
                bytes = (0..len)
                    .map(|_| alphabet[(next() as usize) % alphabet.len()])
                    .collect();
            }
            let cut = (next() as usize) % (bytes.len() + 1);
            let _ = decode_in_chunks(&bytes[..cut], 1 + (next() as usize) % 9);
        }
    }
}
