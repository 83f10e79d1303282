//! Just enough HTTP/1.x for the admin listener: the parser of a request
//! head (a pure function over the bytes received so far, fuzzed by
//! `fuzz/fuzz_targets/admin_request.rs`) and the encoding of a response.
//! A head is at most [`MAX_REQUEST`] bytes; anything after it is ignored,
//! since a connection carries one request and is then closed.

/// Largest request head accepted.
pub const MAX_REQUEST: usize = 8 * 1024;

/// The request method, as far as the admin routes care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `HEAD`: answered like `GET`, without the body.
    Head,
    /// `POST`.
    Post,
    /// Any other method; answered 405 or 404.
    Other,
}

/// A parsed request head: only what routing needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request method.
    pub method: Method,
    /// The path, without any query string.
    pub path: String,
}

/// The outcome of parsing what a client has sent so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Incomplete,
    /// A complete head.
    Done(Request),
    /// Not a request we can answer; the reason goes back in a 400.
    Bad(&'static str),
}

/// Parses the head of an HTTP/1.x request (request line and headers) with
/// `httparse`, from the bytes received so far. Only the first
/// [`MAX_REQUEST`] bytes are looked at: a head that does not end within
/// them (its blank line included) is too large. Headers are checked for
/// syntax and otherwise ignored; any number of them fits within the limit.
/// Bytes after the head do not change the outcome.
pub fn parse_request(buf: &[u8]) -> Parse {
    let window = &buf[..buf.len().min(MAX_REQUEST)];
    // httparse fills a caller's header array and fails when it is full.
    // A head has fewer headers than lines, so this array never is.
    let lines = window.iter().filter(|&&b| b == b'\n').count();
    let mut headers = vec![httparse::EMPTY_HEADER; lines];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST => {
            return Parse::Bad("request too large");
        }
        Ok(httparse::Status::Partial) => return Parse::Incomplete,
        Err(_) if !window.is_ascii() => return Parse::Bad("request is not ASCII"),
        Err(e) => return Parse::Bad(reason(e, window)),
    };
    if !window[..head_len].is_ascii() {
        return Parse::Bad("request is not ASCII");
    }
    // Both are set once the head is complete.
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Parse::Bad("malformed request line");
    };
    if !target.starts_with('/') {
        return Parse::Bad("malformed request target");
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        _ => Method::Other,
    };
    let path = target.split('?').next().unwrap_or_default();
    Parse::Done(Request {
        method,
        path: path.to_string(),
    })
}

/// The 400's reason for an httparse error in `head`.
fn reason(error: httparse::Error, head: &[u8]) -> &'static str {
    match error {
        // httparse reads `GET /a b HTTP/1.1` as the version `b HTTP/1.1`;
        // it is the line, not the version, that is wrong.
        httparse::Error::Version if request_line_parts(head) == 3 => "unsupported HTTP version",
        httparse::Error::Version | httparse::Error::Token | httparse::Error::Status => {
            "malformed request line"
        }
        httparse::Error::NewLine => "malformed line ending",
        httparse::Error::HeaderName => "malformed header name",
        httparse::Error::HeaderValue => "malformed header value",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

/// How many space-separated parts the first line of `head` has.
fn request_line_parts(head: &[u8]) -> usize {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.split(|&b| b == b' ').count()
}

/// A complete response: status line, headers and body (the head alone
/// when `head_only`, with the body's length).
pub(super) fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    encode(status, content_type, None, body, head_only)
}

/// A 405, whose `Allow` header lists the methods the path does take
/// (RFC 9110, section 15.5.6).
pub(super) fn method_not_allowed(allow: &str, head_only: bool) -> Vec<u8> {
    encode(
        405,
        "text/plain",
        Some(allow),
        b"method not allowed\n",
        head_only,
    )
}

fn encode(
    status: u16,
    content_type: &str,
    allow: Option<&str>,
    body: &[u8],
    head_only: bool,
) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let allow = allow.map_or(String::new(), |methods| format!("Allow: {methods}\r\n"));
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
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
    fn checks_header_syntax() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost tcplb\r\n\r\n"),
            Parse::Bad("malformed header name")
        );
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: a\x01b\r\n\r\n"),
            Parse::Bad("malformed header value")
        );
    }

    #[test]
    fn the_limit_is_the_head_blank_line_included() {
        let head = |len: usize| {
            let start = b"GET /metrics HTTP/1.1\r\nX: ";
            let mut head = start.to_vec();
            head.resize(len - 4, b'a');
            head.extend_from_slice(b"\r\n\r\n");
            head
        };
        assert_eq!(
            parse_request(&head(MAX_REQUEST)),
            done(Method::Get, "/metrics")
        );
        assert_eq!(
            parse_request(&head(MAX_REQUEST + 1)),
            Parse::Bad("request too large")
        );
        // An unfinished head is refused once it cannot fit any more.
        assert_eq!(
            parse_request(&head(MAX_REQUEST + 1)[..MAX_REQUEST - 1]),
            Parse::Incomplete
        );
        assert_eq!(
            parse_request(&head(MAX_REQUEST + 1)[..MAX_REQUEST]),
            Parse::Bad("request too large")
        );
    }

    #[test]
    fn any_number_of_headers_fits_within_the_limit() {
        let mut head = b"GET /status HTTP/1.1\r\n".to_vec();
        while head.len() + 4 + 4 <= MAX_REQUEST {
            head.extend_from_slice(b"a:\r\n");
        }
        head.extend_from_slice(b"\r\n");
        assert_eq!(parse_request(&head), done(Method::Get, "/status"));
    }

    #[test]
    fn bytes_after_the_head_do_not_matter() {
        let mut buf = b"POST /reload HTTP/1.1\r\nContent-Length: 9000\r\n\r\n".to_vec();
        buf.extend_from_slice("\u{e9}".as_bytes());
        buf.resize(MAX_REQUEST + 100, b'x');
        assert_eq!(parse_request(&buf), done(Method::Post, "/reload"));
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
