//! The admin listener's HTTP/1.1, served by the main loop: just enough to
//! answer `GET /metrics`, `GET /status` and `POST /reload`, one request
//! per connection, then close. The parser is a pure function over bytes
//! (fuzzed); requests are bounded in size and time, and connections in number.

use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::io::Io;
use crate::io::endpoint::{Discarded, Endpoint};

/// Largest request head accepted.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Admin connections open at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client gets to send its request and read the answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The path, without any query string.
    pub path: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Incomplete,
    Done(Request),
    /// Not a request we can answer; the reason goes back in a 400.
    Bad(&'static str),
}

/// Parses the head of an HTTP/1.x request (request line and headers).
pub fn parse_request(buf: &[u8]) -> Parse {
    let end = match find(buf, b"\r\n\r\n").or_else(|| find(buf, b"\n\n")) {
        Some(end) => end,
        None if buf.len() > MAX_REQUEST => return Parse::Bad("request too large"),
        None => return Parse::Incomplete,
    };
    if end > MAX_REQUEST {
        return Parse::Bad("request too large");
    }
    let head = &buf[..end];
    if !head.is_ascii() {
        return Parse::Bad("request is not ASCII");
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parse::Bad("malformed request line");
    };
    if !version.starts_with(b"HTTP/1.") {
        return Parse::Bad("unsupported HTTP version");
    }
    if !target.starts_with(b"/") {
        return Parse::Bad("malformed request target");
    }
    let method = match method {
        b"GET" => Method::Get,
        b"HEAD" => Method::Head,
        b"POST" => Method::Post,
        _ => Method::Other,
    };
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    Parse::Done(Request {
        method,
        path: String::from_utf8_lossy(path).into_owned(),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A complete response: status line, headers and body.
pub fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// One admin connection: reading its request, then writing the answer,
/// then waiting briefly for the client to close.
#[derive(Debug)]
pub struct AdminConn {
    /// Tells this connection's timer entry from a later one's in the same slot.
    pub id: u64,
    endpoint: Endpoint,
    input: Vec<u8>,
    output: Option<Vec<u8>>,
    written: usize,
    /// The write side is shut, after the answer.
    shut: bool,
    pub deadline: Instant,
}

/// What the loop should do with an admin connection.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminStep {
    Wait,
    /// A request is in: answer it with [`AdminConn::answer`].
    Request(Request),
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

    /// Queues the answer; the next [`advance`](Self::advance) writes it.
    /// Still waiting for its request (not yet answered).
    pub fn is_idle(&self) -> bool {
        self.output.is_none()
    }

    pub fn answer(&mut self, output: Vec<u8>) {
        self.output = Some(output);
        self.endpoint.assume_writable();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(method: Method, path: &str) -> Parse {
        Parse::Done(Request {
            method,
            path: path.to_string(),
        })
    }

    #[test]
    fn parses_the_requests_it_serves() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            done(Method::Get, "/metrics")
        );
        assert_eq!(
            parse_request(b"POST /reload HTTP/1.0\r\n\r\n"),
            done(Method::Post, "/reload")
        );
        assert_eq!(
            parse_request(b"GET /status?pretty=1 HTTP/1.1\n\n"),
            done(Method::Get, "/status")
        );
        assert_eq!(
            parse_request(b"DELETE / HTTP/1.1\r\n\r\n"),
            done(Method::Other, "/")
        );
    }

    #[test]
    fn waits_for_the_whole_head() {
        assert_eq!(parse_request(b""), Parse::Incomplete);
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost:"),
            Parse::Incomplete
        );
    }

    #[test]
    fn rejects_garbage_and_oversized_requests() {
        assert_eq!(
            parse_request(b"GET\r\n\r\n"),
            Parse::Bad("malformed request line")
        );
        assert_eq!(
            parse_request(b"GET /a b HTTP/1.1\r\n\r\n"),
            Parse::Bad("malformed request line")
        );
        assert_eq!(
            parse_request(b"GET /a SPDY/3\r\n\r\n"),
            Parse::Bad("unsupported HTTP version")
        );
        assert_eq!(
            parse_request(b"GET a HTTP/1.1\r\n\r\n"),
            Parse::Bad("malformed request target")
        );
        assert_eq!(
            parse_request("GET /\u{e9} HTTP/1.1\r\n\r\n".as_bytes()),
            Parse::Bad("request is not ASCII")
        );
        let huge = vec![b'a'; MAX_REQUEST + 1];
        assert_eq!(parse_request(&huge), Parse::Bad("request too large"));
    }

    #[test]
    fn responses_carry_length_and_close() {
        let r = String::from_utf8(response(404, "text/plain", b"no\n", false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(r.contains("Content-Length: 3\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\nno\n"));
        let head = response(200, "text/plain", b"body", true);
        assert!(String::from_utf8(head).unwrap().ends_with("\r\n\r\n"));
    }
}
