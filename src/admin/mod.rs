//! The admin listener, served by the main loop: just enough HTTP/1.1 to
//! answer `GET /metrics`, `GET /status` and `POST /reload`, one request per
//! connection, then close. This module holds the connection (read the
//! request, write the answer, wait for the client to close) and what the
//! loop calls; `http` parses and encodes, `metrics` holds the [`Stats`]
//! snapshot and its Prometheus text, `status` its JSON. Requests are
//! bounded in size ([`MAX_REQUEST`]) and time ([`TIMEOUT`]), and
//! connections in number ([`MAX_CONNECTIONS`]).
#![warn(missing_docs)]

mod http;
mod metrics;
mod status;

use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::io::Io;
use crate::io::endpoint::{Discarded, Endpoint};

pub(crate) use http::response;
pub use http::{MAX_REQUEST, Method, Parse, Request, parse_request};
pub(crate) use metrics::prometheus;
pub use metrics::{HostStats, Stats, UpstreamStats};
pub(crate) use status::status_json;

/// Admin connections open at once; at this many, the oldest one still
/// waiting for its request is closed to take a new one.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client gets to send its request and read the answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// One admin connection: reading its request, then writing the answer,
/// then waiting briefly for the client to close.
#[derive(Debug)]
pub(crate) struct AdminConn {
    /// Tells this connection's timer entry from a later one's in the same slot.
    pub id: u64,
    endpoint: Endpoint,
    input: Vec<u8>,
    output: Option<Vec<u8>>,
    written: usize,
    /// The write side is shut, after the answer.
    shut: bool,
    /// When the connection is cut, answered or not.
    pub deadline: Instant,
}

/// What the loop should do with an admin connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AdminStep {
    /// Nothing to do until the next readiness event.
    Wait,
    /// A request is in: answer it with [`AdminConn::answer`].
    Request(Request),
    /// Done, or the client went away: drop the connection.
    Close,
}

impl AdminConn {
    /// A connection just accepted, registered under `token`.
    pub fn new(
        stream: TcpStream,
        id: u64,
        now: Instant,
        registry: &Registry,
        token: Token,
    ) -> std::io::Result<AdminConn> {
        let mut endpoint = Endpoint::new(stream);
        endpoint.register(registry, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(AdminConn {
            id,
            endpoint,
            input: Vec::new(),
            output: None,
            written: 0,
            shut: false,
            deadline: now + TIMEOUT,
        })
    }

    /// Makes the coming close send RST (a connection that overstayed).
    pub fn abort(&self) {
        self.endpoint.abort();
    }

    /// Remembers the readiness an event reports.
    pub fn on_event(&mut self, event: &Event) {
        self.endpoint.on_event(event);
    }

    /// Reads the request, or writes the answer, as far as readiness allows.
    pub fn advance(&mut self) -> AdminStep {
        let ep = &mut self.endpoint;
        if let Some(output) = &self.output {
            match ep.write_out(output, &mut self.written) {
                Ok(true) => {}
                Ok(false) => return AdminStep::Wait,
                Err(_) => return AdminStep::Close,
            }
            if !self.shut {
                self.shut = true;
                let _ = ep.shutdown_write();
            }
            // Drop what the client still sends until it closes, so the
            // answer is not destroyed by a reset.
            return match ep.discard() {
                Discarded::End => AdminStep::Close,
                Discarded::Bytes(_) | Discarded::WouldBlock => AdminStep::Wait,
            };
        }
        let mut bad = None;
        while ep.can_read() && bad.is_none() {
            match ep.read_onto(&mut self.input, 1024) {
                Io::Done(_) => match parse_request(&self.input) {
                    Parse::Incomplete => {}
                    Parse::Done(request) => return AdminStep::Request(request),
                    Parse::Bad(why) => bad = Some(why),
                },
                Io::WouldBlock => {}
                Io::Eof | Io::Failed(_) => return AdminStep::Close,
            }
        }
        match bad {
            Some(why) => {
                self.answer(response(
                    400,
                    "text/plain",
                    format!("{why}\n").as_bytes(),
                    false,
                ));
                self.advance()
            }
            None => AdminStep::Wait,
        }
    }

    /// Still waiting for its request (not yet answered).
    pub fn is_idle(&self) -> bool {
        self.output.is_none()
    }

    /// Queues the answer; the next [`advance`](Self::advance) writes it.
    pub fn answer(&mut self, output: Vec<u8>) {
        self.output = Some(output);
        self.endpoint.assume_writable();
    }
}
