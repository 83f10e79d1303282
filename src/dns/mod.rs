//! Looking host names up: every A and AAAA address of a name, from the
//! system's resolver (getaddrinfo, as `std::net::ToSocketAddrs` asks it)
//! or, with `resolver` set, from that DNS server over UDP, with TCP for an
//! answer too large for UDP.
//!
//! A lookup blocks its thread, within a bound: the config walk looks names
//! up as it reads them (at start, on `tcplb check`, on reload) and the
//! control thread's resolver thread (`proxy/names.rs`) looks them up
//! again every `resolve_interval`; no worker ever does. Against a server,
//! a lookup takes at most [`TIMEOUT`], its queries sent again once
//! halfway. The system resolver's time is its own (`/etc/resolv.conf`'s
//! `timeout` and `attempts`).
//!
//! The two families are asked apart, and each one's outcome is kept, so
//! that a failed AAAA query does not take the IPv4 addresses away with it
//! ([`Lookup::merged`]).

mod wire;

use std::hash::{BuildHasher, RandomState};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::rr::{Name, RecordType};

use wire::Reply;

/// The longest a lookup from a DNS server takes.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(2);

/// Where names are looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resolver {
    /// The system's resolver (getaddrinfo: `/etc/hosts`, then DNS as
    /// `/etc/resolv.conf` says, with its search domains).
    System,
    /// This DNS server, asked directly (names are absolute).
    Server(SocketAddr),
}

impl Resolver {
    /// The resolver `[defaults] resolver` names (`None`: the system's).
    pub fn of(server: Option<SocketAddr>) -> Resolver {
        server.map_or(Resolver::System, Resolver::Server)
    }

    /// Every address of `name`, per family.
    pub fn lookup(&self, name: &str) -> Lookup {
        match self {
            Resolver::System => system(name),
            Resolver::Server(server) => ask(*server, name, TIMEOUT),
        }
    }
}

/// What one lookup of a name found: each family's addresses (sorted, none
/// twice, at most [`wire::MAX_ADDRESSES`]) or why its query failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Lookup {
    pub v4: Result<Vec<IpAddr>, String>,
    pub v6: Result<Vec<IpAddr>, String>,
}

impl Lookup {
    fn failed(why: String) -> Lookup {
        Lookup {
            v4: Err(why.clone()),
            v6: Err(why),
        }
    }

    /// Every address found, or why there is none: both queries failed, or
    /// neither found an address.
    pub fn addresses(&self) -> Result<Vec<IpAddr>, String> {
        self.merged(&[])
    }

    /// The addresses after this lookup, given the last good ones: a family
    /// whose query failed keeps its last addresses. `Err` (why) when both
    /// failed or nothing is left: the caller keeps the last set as it is.
    pub fn merged(&self, last: &[IpAddr]) -> Result<Vec<IpAddr>, String> {
        if let (Err(a), Err(b)) = (&self.v4, &self.v6) {
            return Err(if a == b {
                a.clone()
            } else {
                format!("A: {a}; AAAA: {b}")
            });
        }
        let family = |found: &Result<Vec<IpAddr>, String>, v4: bool| match found {
            Ok(found) => found.clone(),
            Err(_) => last
                .iter()
                .filter(|ip| ip.is_ipv4() == v4)
                .copied()
                .collect(),
        };
        let mut all = family(&self.v4, true);
        all.extend(family(&self.v6, false));
        all.sort();
        all.dedup();
        if all.is_empty() {
            return Err("no A or AAAA record".to_string());
        }
        Ok(all)
    }
}

/// Sorted, none twice, at most the cap.
fn tidy(mut found: Vec<IpAddr>) -> Vec<IpAddr> {
    found.sort();
    found.dedup();
    found.truncate(wire::MAX_ADDRESSES);
    found
}

/// The system resolver's answer, split by family.
fn system(name: &str) -> Lookup {
    match (name, 0).to_socket_addrs() {
        Ok(found) => {
            let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) =
                found.map(|a| a.ip()).partition(IpAddr::is_ipv4);
            Lookup {
                v4: Ok(tidy(v4)),
                v6: Ok(tidy(v6)),
            }
        }
        Err(e) => Lookup::failed(e.to_string()),
    }
}

/// One of a lookup's two queries, and its outcome once known.
struct Pending {
    rtype: RecordType,
    id: u16,
    bytes: Vec<u8>,
    outcome: Option<Result<Vec<IpAddr>, String>>,
    /// Its answer came truncated: it goes to TCP.
    truncated: bool,
}

/// Asks `server` for the A and AAAA records of `name`, within `timeout`.
fn ask(server: SocketAddr, name: &str, timeout: Duration) -> Lookup {
    let qname = match wire::name(name) {
        Ok(qname) => qname,
        Err(why) => return Lookup::failed(why),
    };
    let deadline = Instant::now() + timeout;
    let mut queries = [RecordType::A, RecordType::AAAA].map(|rtype| {
        let id = query_id();
        Pending {
            rtype,
            id,
            bytes: wire::query(id, &qname, rtype),
            outcome: None,
            truncated: false,
        }
    });
    if let Err(e) = over_udp(server, &qname, &mut queries, deadline) {
        let why = format!("{server}: {e}");
        for q in queries.iter_mut().filter(|q| q.outcome.is_none()) {
            q.outcome = Some(Err(why.clone()));
        }
    }
    for q in queries.iter_mut().filter(|q| q.truncated) {
        q.outcome = Some(over_tcp(server, &qname, q, deadline));
    }
    let [a, aaaa] = queries.map(|q| {
        q.outcome
            .unwrap_or_else(|| Err(format!("{server} did not answer within {timeout:?}")))
            .map(tidy)
    });
    Lookup { v4: a, v6: aaaa }
}

/// Sends the queries and reads answers until each has one or the
/// deadline passes; unanswered queries are sent again once, halfway.
fn over_udp(
    server: SocketAddr,
    qname: &Name,
    queries: &mut [Pending; 2],
    deadline: Instant,
) -> io::Result<()> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // Connected: the kernel drops datagrams from anyone but the server.
    let socket = UdpSocket::bind(local)?;
    socket.connect(server)?;
    for q in queries.iter() {
        socket.send(&q.bytes)?;
    }
    let mut resend_at =
        Some(Instant::now() + deadline.saturating_duration_since(Instant::now()) / 2);
    let mut buf = [0u8; 65_535];
    while queries.iter().any(|q| q.outcome.is_none() && !q.truncated) {
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        if resend_at.is_some_and(|at| now >= at) {
            resend_at = None;
            for q in queries
                .iter()
                .filter(|q| q.outcome.is_none() && !q.truncated)
            {
                socket.send(&q.bytes)?;
            }
        }
        let wait = resend_at.unwrap_or(deadline).saturating_duration_since(now);
        socket.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for q in queries.iter_mut().filter(|q| q.outcome.is_none()) {
            match wire::reply(&buf[..n], q.id, qname, q.rtype) {
                Some(Reply::Truncated) => q.truncated = true,
                Some(reply) => q.outcome = Some(outcome(reply)),
                None => {}
            }
        }
    }
    Ok(())
}

/// Asks one query again over TCP (RFC 7766: a two-byte length, then the
/// message), within what is left of the deadline.
fn over_tcp(
    server: SocketAddr,
    qname: &Name,
    q: &Pending,
    deadline: Instant,
) -> Result<Vec<IpAddr>, String> {
    let failed = |e: io::Error| format!("{server} over TCP (the UDP answer was truncated): {e}");
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::from(io::ErrorKind::TimedOut))
        } else {
            Ok(left)
        }
    };
    let mut stream =
        TcpStream::connect_timeout(&server, left().map_err(failed)?).map_err(failed)?;
    let exchange = |stream: &mut TcpStream| -> io::Result<Vec<u8>> {
        stream.set_write_timeout(Some(left()?))?;
        let len = u16::try_from(q.bytes.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&q.bytes);
        stream.write_all(&framed)?;
        stream.set_read_timeout(Some(left()?))?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.set_read_timeout(Some(left()?))?;
        stream.read_exact(&mut answer)?;
        Ok(answer)
    };
    let answer = exchange(&mut stream).map_err(failed)?;
    match wire::reply(&answer, q.id, qname, q.rtype) {
        Some(Reply::Truncated) | None => Err(format!(
            "{server} over TCP (the UDP answer was truncated): not an answer to the query"
        )),
        Some(reply) => outcome(reply),
    }
}

/// A reply as a family's outcome: NXDOMAIN is a name without addresses.
fn outcome(reply: Reply) -> Result<Vec<IpAddr>, String> {
    match reply {
        Reply::Addresses(found) => Ok(found),
        Reply::NoSuchName => Ok(Vec::new()),
        Reply::Failed(why) => Err(why),
        Reply::Truncated => Err("truncated".to_string()),
    }
}

/// A query id nobody off the path can guess: std's hasher keys are
/// random per process (and per thread); the clock makes each id differ.
fn query_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    RandomState::new().hash_one(nanos) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn a_failed_family_keeps_its_last_addresses() {
        let last = ips(&["10.0.0.1", "::1"]);
        let both = Lookup {
            v4: Ok(ips(&["10.0.0.2"])),
            v6: Ok(ips(&[])),
        };
        assert_eq!(both.merged(&last), Ok(ips(&["10.0.0.2"])));
        let v6_failed = Lookup {
            v4: Ok(ips(&["10.0.0.2"])),
            v6: Err("Server Failure".into()),
        };
        assert_eq!(v6_failed.merged(&last), Ok(ips(&["10.0.0.2", "::1"])));
        let failed = Lookup::failed("timed out".into());
        assert_eq!(failed.merged(&last), Err("timed out".to_string()));
        let differently = Lookup {
            v4: Err("Refused".into()),
            v6: Err("Server Failure".into()),
        };
        assert_eq!(
            differently.merged(&last),
            Err("A: Refused; AAAA: Server Failure".to_string())
        );
        let empty = Lookup {
            v4: Ok(vec![]),
            v6: Ok(vec![]),
        };
        assert_eq!(empty.merged(&last), Err("no A or AAAA record".to_string()));
        assert_eq!(
            empty.addresses(),
            Err("no A or AAAA record".to_string()),
            "nothing to keep either"
        );
    }

    #[test]
    fn a_server_that_is_not_there_fails_within_the_timeout() {
        // A bound UDP port that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let started = Instant::now();
        let timeout = Duration::from_millis(200);
        let found = ask(silent.local_addr().unwrap(), "backend.test", timeout);
        let elapsed = started.elapsed();
        assert!(elapsed >= timeout && elapsed < timeout * 5, "{elapsed:?}");
        assert!(
            matches!(&found.v4, Err(why) if why.contains("did not answer")),
            "{found:?}"
        );
        // Both queries went out, and again at the half.
        let mut buf = [0u8; 512];
        silent.set_nonblocking(true).unwrap();
        let mut sent = 0;
        while silent.recv(&mut buf).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, 4);
        // No socket: the port is closed, the kernel says so at once.
        let closed = silent.local_addr().unwrap();
        drop(silent);
        let found = ask(closed, "backend.test", Duration::from_secs(5));
        assert!(found.v4.is_err() && found.v6.is_err(), "{found:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn the_system_resolver_reads_etc_hosts() {
        let found = Resolver::System.lookup("localhost");
        let all = found.addresses().unwrap();
        assert!(all.iter().all(IpAddr::is_loopback), "{all:?}");
        assert!(all.contains(&IpAddr::from(Ipv4Addr::LOCALHOST)), "{all:?}");
    }
}
