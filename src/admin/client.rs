//! The other end of `POST /reload`: `tcplb reload` asks a running tcplb,
//! over its admin listener, to reload its config file, and waits for the
//! outcome. A signal cannot tell its sender whether the new config was
//! taken, so `systemctl reload` with `kill -HUP` reports success for a
//! rejected config; this answer can.
//!
//! One blocking request on the caller's thread, bounded by a deadline
//! (connect, write and every read count against it), and an answer of at
//! most [`MAX_ANSWER`] bytes read.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The most of an answer read: a rejected reload's reason lists every
/// problem of the config, a few KiB at most in practice.
pub const MAX_ANSWER: u64 = 1 << 20;

/// Why a reload did not happen.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReloadError {
    /// tcplb answered that it kept the running config, and why (every
    /// problem of the new one, as `tcplb check` lists them).
    Rejected {
        /// The reason tcplb gave.
        reason: String,
    },
    /// No answer: nothing listens there, or the deadline passed.
    Unreachable {
        /// The admin address asked.
        addr: SocketAddr,
        /// What the socket said.
        source: io::Error,
    },
    /// Something answered, but not as tcplb's admin listener does.
    Unexpected {
        /// The admin address asked.
        addr: SocketAddr,
        /// What came back, in words.
        answer: String,
    },
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::Rejected { reason } => write!(
                f,
                "reload rejected, the running configuration stays in force:\n{reason}"
            ),
            ReloadError::Unreachable { addr, source } => {
                write!(f, "cannot ask the admin listener on {addr}: {source}")
            }
            ReloadError::Unexpected { addr, answer } => {
                write!(f, "the admin listener on {addr} answered {answer}")
            }
        }
    }
}

impl std::error::Error for ReloadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReloadError::Unreachable { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Sends `POST /reload` to the admin listener on `addr` and waits, at most
/// `timeout`, for the outcome: the answer's text when the new config is in
/// force.
pub fn reload(addr: SocketAddr, timeout: Duration) -> Result<String, ReloadError> {
    let unreachable = |source| ReloadError::Unreachable { addr, source };
    let answer = exchange(addr, timeout).map_err(unreachable)?;
    let unexpected = |answer: String| ReloadError::Unexpected { addr, answer };
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(&answer) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => {
            return Err(unexpected(format!(
                "an incomplete HTTP response ({} bytes)",
                answer.len()
            )));
        }
        Err(e) => return Err(unexpected(format!("something not HTTP ({e})"))),
    };
    let body = String::from_utf8_lossy(&answer[head..])
        .trim_end()
        .to_string();
    match response.code {
        Some(200) => Ok(body),
        Some(400) => Err(ReloadError::Rejected { reason: body }),
        code => Err(unexpected(format!(
            "{} {}: {body}",
            code.unwrap_or(0),
            response.reason.unwrap_or("")
        ))),
    }
}

/// Writes the request and reads the answer to its end (the admin listener
/// closes after one answer), everything within `timeout`.
fn exchange(addr: SocketAddr, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))
    };
    let mut stream = TcpStream::connect_timeout(&addr, left()?)?;
    stream.set_write_timeout(Some(left()?))?;
    write!(
        stream,
        "POST /reload HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(left()?))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(answer),
            Ok(n) if answer.len() as u64 + n as u64 > MAX_ANSWER => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("an answer over {} KiB", MAX_ANSWER >> 10),
                ));
            }
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time"));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// A one-shot server that reads the request head and answers `answer`.
    fn answering(answer: &'static str) -> (SocketAddr, thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(conn.read(&mut byte).unwrap(), 1);
                head.push(byte[0]);
            }
            conn.write_all(answer.as_bytes()).unwrap();
            String::from_utf8(head).unwrap()
        });
        (addr, server)
    }

    const SECOND: Duration = Duration::from_secs(10);

    #[test]
    fn a_reload_taken_is_ok_with_its_text() {
        let (addr, server) = answering(
            "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nreloaded\n",
        );
        assert_eq!(reload(addr, SECOND).unwrap(), "reloaded");
        let head = server.join().unwrap();
        assert!(head.starts_with("POST /reload HTTP/1.1\r\n"), "{head}");
    }

    #[test]
    fn a_rejected_reload_carries_the_reason() {
        let (addr, _server) = answering(
            "HTTP/1.1 400 Bad Request\r\nContent-Length: 21\r\n\r\nlb.toml:3:1: bad key\n",
        );
        match reload(addr, SECOND) {
            Err(ReloadError::Rejected { reason }) => assert_eq!(reason, "lb.toml:3:1: bad key"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_answers_and_silence_are_errors() {
        let (addr, _server) = answering("HTTP/1.1 404 Not Found\r\n\r\nnot found\n");
        let err = reload(addr, SECOND).unwrap_err();
        assert!(
            matches!(&err, ReloadError::Unexpected { answer, .. } if answer.starts_with("404 Not Found")),
            "{err}"
        );
        let (addr, _server) = answering("SSH-2.0-OpenSSH\r\n");
        assert!(matches!(
            reload(addr, SECOND),
            Err(ReloadError::Unexpected { .. })
        ));
        // A listener that never answers: the deadline ends the wait.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = reload(silent.local_addr().unwrap(), Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(&err, ReloadError::Unreachable { source, .. } if source.kind() == io::ErrorKind::TimedOut),
            "{err}"
        );
    }
}
