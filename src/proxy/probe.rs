//! One active health check of one host: a non-blocking connect, then
//! optionally `send` and wait for an answer containing `expect`, all within
//! the check timeout (the loop owns the deadline). Driven by the same
//! readiness events as pairs.

use std::io;
use std::net::SocketAddr;

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::io::flow::{Sink, Source};
use crate::io::{Connect, Endpoint, Io};

/// Bytes of a host's answer kept while looking for `expect`.
const ANSWER_LIMIT: usize = 8 * 1024;

/// What a probe step found.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    Passed,
    Failed(String),
}

#[derive(Debug)]
pub struct Probe {
    /// Tells this probe's timer entry from a later probe's in the same slot.
    pub id: u64,
    endpoint: Endpoint,
    connected: bool,
    sent: usize,
    answer: Vec<u8>,
}

impl Probe {
    /// Starts the connect and registers the socket under `token`.
    pub fn start(
        addr: SocketAddr,
        id: u64,
        registry: &Registry,
        token: Token,
    ) -> io::Result<Probe> {
        let mut endpoint = Endpoint::new(TcpStream::connect(addr)?);
        endpoint.register(registry, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(Probe {
            id,
            endpoint,
            connected: false,
            sent: 0,
            answer: Vec::new(),
        })
    }

    pub fn on_event(&mut self, event: &Event) {
        self.endpoint.on_event(event);
    }

    /// Moves the check on as far as readiness allows.
    pub fn advance(&mut self, send: Option<&[u8]>, expect: Option<&[u8]>) -> Outcome {
        let ep = &mut self.endpoint;
        if !self.connected {
            match ep.connect_result() {
                Connect::Pending => return Outcome::Pending,
                Connect::Failed(e) => return Outcome::Failed(format!("connect: {e}")),
                Connect::Established => self.connected = true,
            }
        }
        if let Some(send) = send {
            match ep.write_out(send, &mut self.sent) {
                Ok(true) => {}
                Ok(false) => return Outcome::Pending,
                Err(_) => return Outcome::Failed("send failed".into()),
            }
        }
        let Some(expect) = expect else {
            return Outcome::Passed;
        };
        while ep.can_read() {
            match ep.read_onto(&mut self.answer, 1024) {
                Io::Done(_) => {
                    if contains(&self.answer, expect) {
                        return Outcome::Passed;
                    }
                    if self.answer.len() > ANSWER_LIMIT {
                        return Outcome::Failed("answer does not match".into());
                    }
                }
                Io::WouldBlock => {}
                Io::Eof => return Outcome::Failed("closed before the expected answer".into()),
                Io::Failed(e) => return Outcome::Failed(format!("read: {e}")),
            }
        }
        Outcome::Pending
    }

    /// Closes with RST: a check leaves no TIME_WAIT behind on either side.
    pub fn close(self) {
        self.endpoint.abort();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::contains;

    #[test]
    fn answer_matching() {
        assert!(contains(b"+PONG\r\n", b"+PONG"));
        assert!(contains(b"xx+PONG", b"+PONG"));
        assert!(!contains(b"-ERR", b"+PONG"));
        assert!(!contains(b"+PON", b"+PONG"));
    }
}
