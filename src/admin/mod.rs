//! The admin listener, served by the main loop: just enough HTTP/1.1 to
//! answer `GET /metrics`, `GET /status` and `POST /reload`, one request per
//! connection, then close. This module holds the connection (read the
//! request, write the answer, wait for the client to close) and the routes
//! the loop calls; `http` parses and encodes, `metrics` holds the [`Stats`]
//! snapshot and its Prometheus text, `status` its JSON, and [`client`] is
//! the other end of `POST /reload` (`tcplb reload`). Requests are
//! bounded in size ([`MAX_REQUEST`]) and time ([`TIMEOUT`]), and
//! connections in number ([`MAX_CONNECTIONS`]).
#![warn(missing_docs)]

pub mod client;
mod http;
mod metrics;
mod status;

use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::io::Io;
use crate::io::endpoint::{Discarded, Endpoint};
use crate::io::flow::{Sink, Source};

pub use http::{MAX_REQUEST, Method, Parse, Request, parse_request};
use http::{method_not_allowed, response};
use metrics::prometheus;
pub use metrics::{ClusterStats, HostStats, Stats, UpstreamStats};
use status::status_json;

/// Admin connections open at once; at this many, the oldest one still
/// waiting for its request is closed to take a new one.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client gets to send its request and read the answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// What a request asks of the loop, from [`route`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// A page of a fresh snapshot: [`Page::render`] it.
    Page(Page),
    /// `POST /reload`: the loop reloads, and [`reloaded`] answers.
    Reload,
    /// An answer that needs nothing from the loop (404, 405).
    Answer(Vec<u8>),
}

/// Which page of the counters, and whether only its head is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Page {
    kind: PageKind,
    head_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageKind {
    /// `/metrics`: Prometheus text.
    Metrics,
    /// `/status`: JSON.
    Status,
}

impl Page {
    /// The whole response for `stats`.
    pub fn render(self, stats: &Stats) -> Vec<u8> {
        match self.kind {
            PageKind::Metrics => response(
                200,
                "text/plain; version=0.0.4",
                prometheus(stats).as_bytes(),
                self.head_only,
            ),
            PageKind::Status => response(
                200,
                "application/json",
                status_json(stats).as_bytes(),
                self.head_only,
            ),
        }
    }
}

/// Maps a request to what answers it. `HEAD` is `GET` without the body.
pub(crate) fn route(request: &Request) -> Route {
    let head_only = request.method == Method::Head;
    let read = matches!(request.method, Method::Get | Method::Head);
    let page = |kind| Route::Page(Page { kind, head_only });
    match (request.path.as_str(), request.method) {
        ("/metrics", _) if read => page(PageKind::Metrics),
        ("/status", _) if read => page(PageKind::Status),
        ("/reload", Method::Post) => Route::Reload,
        ("/metrics" | "/status", _) => Route::Answer(method_not_allowed("GET, HEAD", head_only)),
        ("/reload", _) => Route::Answer(method_not_allowed("POST", head_only)),
        _ => Route::Answer(response(
            404,
            "text/plain",
            b"not found: try /metrics, /status, POST /reload\n",
            head_only,
        )),
    }
}

/// The answer to `POST /reload`, given the reload's outcome.
pub(crate) fn reloaded(outcome: Result<(), String>) -> Vec<u8> {
    match outcome {
        Ok(()) => response(200, "text/plain", b"reloaded\n", false),
        Err(e) => response(400, "text/plain", format!("{e}\n").as_bytes(), false),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, path: &str) -> Request {
        Request {
            method,
            path: path.to_string(),
        }
    }

    /// The answer a route gives without the loop, as text.
    fn answer(method: Method, path: &str) -> String {
        match route(&request(method, path)) {
            Route::Answer(bytes) => String::from_utf8(bytes).unwrap(),
            other => panic!("{method:?} {path} is not answered alone: {other:?}"),
        }
    }

    #[test]
    fn routes_pages_and_reload() {
        let page = |kind, head_only| Route::Page(Page { kind, head_only });
        assert_eq!(
            route(&request(Method::Get, "/metrics")),
            page(PageKind::Metrics, false)
        );
        assert_eq!(
            route(&request(Method::Head, "/status")),
            page(PageKind::Status, true)
        );
        assert_eq!(route(&request(Method::Post, "/reload")), Route::Reload);
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        assert!(answer(Method::Get, "/nope").starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(answer(Method::Post, "/nope").starts_with("HTTP/1.1 404 "));
        assert!(answer(Method::Other, "/metrics").starts_with("HTTP/1.1 405 "));
        assert!(answer(Method::Post, "/status").starts_with("HTTP/1.1 405 "));
        assert!(answer(Method::Get, "/reload").starts_with("HTTP/1.1 405 "));
    }

    #[test]
    fn a_405_says_which_methods_are_allowed() {
        for path in ["/metrics", "/status"] {
            let text = answer(Method::Post, path);
            assert!(text.contains("\r\nAllow: GET, HEAD\r\n"), "{text}");
        }
        let text = answer(Method::Get, "/reload");
        assert!(text.contains("\r\nAllow: POST\r\n"), "{text}");
        // HEAD of a 405: the same head, no body.
        let head = answer(Method::Head, "/reload");
        assert!(head.contains("\r\nAllow: POST\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        assert!(!answer(Method::Get, "/nope").contains("Allow:"));
    }

    #[test]
    fn pages_carry_their_type_and_head_drops_the_body() {
        let stats = metrics::sample();
        let get = Page {
            kind: PageKind::Status,
            head_only: false,
        }
        .render(&stats);
        let get = String::from_utf8(get).unwrap();
        assert!(get.contains("Content-Type: application/json\r\n"), "{get}");
        assert!(get.ends_with(&status_json(&stats)));
        let head = Page {
            kind: PageKind::Metrics,
            head_only: true,
        }
        .render(&stats);
        let head = String::from_utf8(head).unwrap();
        assert!(head.contains("Content-Type: text/plain; version=0.0.4\r\n"));
        let length = prometheus(&stats).len();
        assert!(head.contains(&format!("Content-Length: {length}\r\n")));
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }

    #[test]
    fn reload_answers_its_outcome() {
        let ok = String::from_utf8(reloaded(Ok(()))).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nreloaded\n"));
        let bad = String::from_utf8(reloaded(Err("lb.toml:3:1: bad".into()))).unwrap();
        assert!(bad.starts_with("HTTP/1.1 400 ") && bad.ends_with("\r\n\r\nlb.toml:3:1: bad\n"));
    }
}
