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
pub(crate) fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
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
