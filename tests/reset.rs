//! Bytes sent just before a reset: a side that writes and then resets
//! (`SO_LINGER` 0) must have every byte it wrote delivered to the other
//! side, and only then the reset. Each scenario runs many times, since the
//! loss it guards against depends on how the reset and the bytes fall
//! into the proxy's loop turns; every try must deliver every byte.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use common::pki::{self, Pki};
use common::*;
use tcplb::ClientRule;
use tcplb::{Config, Settings, UpstreamConfig};

/// Tries per scenario.
const TRIES: usize = 1000;
/// Clients running at once where the receiver can tell them apart, so the
/// proxy also sees resets among other traffic.
const PARALLEL: usize = 16;
/// A short error line, as a server answering a bad request writes it.
const SHORT: usize = 45;
/// Bigger than the proxy's first read (16 KiB), so the reset can arrive
/// while the proxy's buffer is only partly written; small enough to fit
/// the receive window the kernel opens at once, so that even a direct
/// connection delivers it before the reset.
const LONG: usize = 40 * 1024;

/// What the receiving side of one try saw: the bytes, then how the stream ended.
#[derive(Debug)]
struct Received {
    bytes: Vec<u8>,
    end: ErrorKind,
}

/// Reads until EOF or an error; EOF is reported as `UnexpectedEof`.
fn receive(s: &mut impl Read) -> Received {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        match s.read(&mut chunk) {
            Ok(0) => break ErrorKind::UnexpectedEof,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) => break e.kind(),
        }
    };
    Received { bytes, end }
}

/// The line of try `i`: distinct per try, so a byte of another try cannot pass.
fn line(i: usize, len: usize) -> Vec<u8> {
    let mut line = Rng::new(i as u64 + 7).bytes(len - 1);
    for b in &mut line {
        *b = b'a' + *b % 26;
    }
    line.push(b'\n');
    line
}

fn reset(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// Runs `tries` tries of `one` on `PARALLEL` threads and asserts that every
/// try delivered its line and then the reset.
fn run(
    what: &str,
    tries: usize,
    parallel: usize,
    one: impl Fn(usize) -> (Vec<u8>, Received) + Send + Sync + 'static,
) {
    let one = Arc::new(one);
    let (tx, rx) = mpsc::channel();
    let workers: Vec<_> = (0..parallel)
        .map(|w| {
            let (one, tx) = (one.clone(), tx.clone());
            thread::spawn(move || {
                for i in (w..tries).step_by(parallel) {
                    let (sent, got) = one(i);
                    tx.send((i, sent, got)).unwrap();
                }
            })
        })
        .collect();
    drop(tx);
    let mut delivered = 0;
    let mut failures = Vec::new();
    for (i, sent, got) in rx {
        if got.bytes == sent && got.end == ErrorKind::ConnectionReset {
            delivered += 1;
        } else if failures.len() < 5 {
            failures.push(format!(
                "try {i}: {} of {} bytes, then {:?}",
                got.bytes.len(),
                sent.len(),
                got.end
            ));
        }
    }
    for w in workers {
        w.join().unwrap();
    }
    println!("{what}: {delivered} of {tries} delivered the line, then the reset");
    assert_eq!(delivered, tries, "{what}: {failures:#?}");
}

/// A host that answers each connection's first bytes with try `i`'s line
/// (the client sends `i` as its request), then resets.
fn spawn_answer_then_reset_host(len: usize) -> SocketAddr {
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut request = [0u8; 8];
                if conn.read_exact(&mut request).is_err() {
                    return;
                }
                let i = u64::from_be_bytes(request) as usize;
                let _ = conn.write_all(&line(i, len));
                reset(&conn);
            });
        }
    });
    addr
}

/// A host that reports what each connection delivered: the try number
/// (its first 8 bytes), the rest, and how the stream ended.
fn spawn_recording_host() -> (SocketAddr, Reports) {
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let mut got = receive(&mut conn);
                let i = got.bytes.get(..8).map_or(usize::MAX, |b| {
                    u64::from_be_bytes(b.try_into().unwrap()) as usize
                });
                got.bytes.drain(..got.bytes.len().min(8));
                let _ = tx.send((i, got));
            });
        }
    });
    (addr, Reports(std::sync::Mutex::new(rx)))
}

/// The recording host's reports. Tries that send to it run one at a time,
/// so the next report belongs to the try that waits for it.
struct Reports(std::sync::Mutex<mpsc::Receiver<(usize, Received)>>);

impl Reports {
    fn of(&self, i: usize) -> Received {
        let (j, got) = self.0.lock().unwrap().recv_timeout(IO_TIMEOUT).unwrap();
        if j == i {
            got
        } else {
            Received {
                bytes: Vec::new(),
                end: ErrorKind::InvalidData,
            }
        }
    }
}

fn host_to_client(proxy: SocketAddr, i: usize, len: usize) -> (Vec<u8>, Received) {
    let mut client = TcpStream::connect(proxy).unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    client.write_all(&(i as u64).to_be_bytes()).unwrap();
    (line(i, len), receive(&mut client))
}

fn client_to_host(
    proxy: SocketAddr,
    reports: &Reports,
    i: usize,
    len: usize,
) -> (Vec<u8>, Received) {
    let mut client = TcpStream::connect(proxy).unwrap();
    let mut message = (i as u64).to_be_bytes().to_vec();
    message.extend_from_slice(&line(i, len));
    client.write_all(&message).unwrap();
    reset(&client);
    drop(client);
    (line(i, len), reports.of(i))
}

fn plain_proxy(host: SocketAddr) -> Running {
    start(config(&[host], Settings::default()))
}

#[test]
fn direct_connections_deliver_bytes_before_a_reset() {
    // The reference the proxy must match: without it, every try delivers.
    for len in [SHORT, LONG] {
        let host = spawn_answer_then_reset_host(len);
        run("direct, host to client", 200, PARALLEL, move |i| {
            host_to_client(host, i, len)
        });
        let (host, reports) = spawn_recording_host();
        let reports = Arc::new(reports);
        run("direct, client to host", 200, 1, move |i| {
            client_to_host(host, &reports, i, len)
        });
    }
}

#[test]
fn host_bytes_before_its_reset_reach_the_client() {
    for len in [SHORT, LONG] {
        let proxy = plain_proxy(spawn_answer_then_reset_host(len));
        let addr = proxy.addr;
        run(
            &format!("plain, host to client, {len} B"),
            TRIES,
            PARALLEL,
            move |i| host_to_client(addr, i, len),
        );
        proxy.wait_until("closed every pair", |s| s.pairs == 0);
        assert_eq!(proxy.host_counts(), [0]);
    }
}

#[test]
fn client_bytes_before_its_reset_reach_the_host() {
    for len in [SHORT, LONG] {
        let (host, reports) = spawn_recording_host();
        let reports = Arc::new(reports);
        let proxy = plain_proxy(host);
        let addr = proxy.addr;
        run(
            &format!("plain, client to host, {len} B"),
            TRIES,
            1,
            move |i| client_to_host(addr, &reports, i, len),
        );
        proxy.wait_until("closed every pair", |s| s.pairs == 0);
        assert_eq!(proxy.host_counts(), [0]);
    }
}

fn tls_proxy(pki: &Pki, host: SocketAddr) -> Running {
    let config = Config {
        settings: Settings::default(),
        upstreams: vec![UpstreamConfig {
            name: "secure".to_string(),
            listen: localhost(),
            hosts: vec![host.into()],
            names: Vec::new(),
            tls: true,
            health: Default::default(),
            refusal: Default::default(),
            queue_timeout: None,
            max_queued: None,
            send_proxy: None,
            accept_proxy: Vec::new(),
        }],
        tls: Some(pki.settings(vec![], Duration::from_secs(10))),
        clients: vec![ClientRule {
            identity: "alice".to_string(),
            upstreams: vec!["secure".to_string()],
            rate: 1e6,
            burst: 1_000_000,
            max_connections: None,
        }],
        admin: None,
        cluster: None,
        warnings: Vec::new(),
    };
    start(config)
}

#[test]
fn host_bytes_before_its_reset_reach_a_tls_client() {
    let pki = Pki::new("reset-down");
    let client_config = pki.client_config(Some(&pki.client("alice")));
    for len in [SHORT, LONG] {
        let proxy = tls_proxy(&pki, spawn_answer_then_reset_host(len));
        let (addr, client_config) = (proxy.addr, client_config.clone());
        run(
            &format!("TLS, host to client, {len} B"),
            TRIES,
            PARALLEL,
            move |i| {
                let mut s = pki::connect(addr, client_config.clone()).unwrap();
                s.write_all(&(i as u64).to_be_bytes()).unwrap();
                s.flush().unwrap();
                (line(i, len), receive(&mut s))
            },
        );
        proxy.wait_until("closed every pair", |s| s.pairs == 0);
        assert_eq!(proxy.host_counts(), [0]);
    }
}

#[test]
fn tls_client_bytes_before_its_reset_reach_the_host() {
    let pki = Pki::new("reset-up");
    let client_config = pki.client_config(Some(&pki.client("alice")));
    for len in [SHORT, LONG] {
        let (host, reports) = spawn_recording_host();
        let reports = Arc::new(reports);
        let proxy = tls_proxy(&pki, host);
        let (addr, client_config) = (proxy.addr, client_config.clone());
        run(
            &format!("TLS, client to host, {len} B"),
            TRIES,
            1,
            move |i| {
                let mut s = pki::connect(addr, client_config.clone()).unwrap();
                // Nagle would hold the data record back while the
                // handshake's last flight is unacknowledged, and the reset
                // would discard it in the client's own kernel.
                s.sock.set_nodelay(true).unwrap();
                let mut message = (i as u64).to_be_bytes().to_vec();
                message.extend_from_slice(&line(i, len));
                s.write_all(&message).unwrap();
                s.flush().unwrap();
                reset(&s.sock);
                drop(s);
                (line(i, len), reports.of(i))
            },
        );
        proxy.wait_until("closed every pair", |s| s.pairs == 0);
        assert_eq!(proxy.host_counts(), [0]);
    }
}

/// A receiver that never reads cannot hold a pair forever: the reset
/// reaches it at the half-close bound, and the bytes it never took are
/// counted in the metrics. What it did take is a correct prefix.
#[test]
fn a_receiver_that_never_reads_gets_the_reset_at_the_half_close_bound() {
    const SENT: usize = 48 * 1024;
    let half_close = Duration::from_millis(400);
    let listener = TcpListener::bind(localhost()).unwrap();
    let host = listener.local_addr().unwrap();
    let (reset_at, reset_done) = mpsc::channel();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = [0u8; 8];
        conn.read_exact(&mut request).unwrap();
        conn.write_all(&line(0, SENT)).unwrap();
        // Reset only once tcplb's kernel has everything, as the bytes
        // would otherwise be lost in this host's own kernel.
        let (local, peer) = (conn.local_addr().unwrap(), conn.peer_addr().unwrap());
        let mut queues = tcplb::SendQueues::new();
        while queues.unacked_between(local, peer).unwrap() > 0 {
            thread::yield_now();
        }
        reset(&conn);
        drop(conn);
        reset_at.send(std::time::Instant::now()).unwrap();
    });
    let proxy = start(config(
        &[host],
        Settings {
            half_close_timeout: half_close,
            ..Settings::default()
        },
    ));
    // A small receive window that fills at once, and no reading until the end.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&proxy.addr.into()).unwrap();
    let mut client = TcpStream::from(socket);
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    client.write_all(&0u64.to_be_bytes()).unwrap();
    let reset_at = reset_done.recv_timeout(IO_TIMEOUT).unwrap();
    proxy.wait_until("passed the reset on", |s| s.pairs == 0);
    let waited = reset_at.elapsed();
    assert!(waited >= half_close, "gave up after {waited:?}");
    let u = &proxy.stats().upstreams[0];
    assert_eq!(u.undelivered_resets, 1);
    let got = receive(&mut client);
    assert_eq!(got.end, ErrorKind::ConnectionReset);
    assert!(got.bytes.len() < SENT, "the client read none of it yet");
    assert_eq!(got.bytes, line(0, SENT)[..got.bytes.len()], "a prefix");
    let lost = (SENT - got.bytes.len()) as u64;
    // Counted: what tcplb's kernel still held (the client's kernel may have
    // taken a little more than it acknowledged, and tcplb's buffer).
    assert!(
        u.undelivered_bytes > 0 && u.undelivered_bytes <= lost,
        "{} undelivered counted, {lost} not read",
        u.undelivered_bytes
    );
    assert_eq!(proxy.host_counts(), [0]);
}

/// A host resets while tcplb still holds bytes it sent (in a buffer, or
/// in a pipe when spliced) because the client is not reading: whenever
/// the client reads, it gets every one of them, then the reset.
#[test]
fn host_bytes_tcplb_holds_when_it_resets_reach_a_client_that_reads_later() {
    const LEN: usize = 24 * 1024;
    let listener = TcpListener::bind(localhost()).unwrap();
    let host = listener.local_addr().unwrap();
    // Small windows toward the client, so that tcplb has to keep bytes.
    let settings = Settings {
        socket_buffer: Some(4096),
        ..Settings::default()
    };
    let proxy = start(config(&[host], settings));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&proxy.addr.into()).unwrap();
    let mut client: TcpStream = socket.into();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (mut conn, tcplb_end) = listener.accept().unwrap();
    let data = Rng::new(31).bytes(LEN);
    conn.write_all(&data).unwrap();
    // Every byte has reached tcplb's kernel (it acknowledged them) before
    // the reset, and tcplb holds some it could not pass on yet.
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let ends = (client.local_addr().unwrap(), proxy.addr);
    let held = loop {
        let from_host = socket_counts(host, tcplb_end);
        if from_host.acked == LEN as u64 {
            let tcplb = socket_counts(tcplb_end, host);
            let to_client = socket_counts(ends.1, ends.0);
            break tcplb.read() as i64 - to_client.written() as i64;
        }
        assert!(std::time::Instant::now() < deadline, "{from_host:?}");
        thread::yield_now();
    };
    assert!(held > 0, "tcplb holds none of the bytes: nothing tested");
    println!("tcplb holds {held} bytes at the reset");
    reset(&conn);
    drop(conn);
    // The reset has reached tcplb's socket (the kernel closed it), and
    // two loop turns ran after, so tcplb has acted on it.
    while !kernel_buffers(&format!("src {tcplb_end}")).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the reset never came");
        thread::yield_now();
    }
    proxy.handle.advance_clock(Duration::ZERO).unwrap();
    proxy.handle.advance_clock(Duration::ZERO).unwrap();
    let got = receive(&mut client);
    assert_eq!(
        (got.bytes.len(), got.end),
        (LEN, ErrorKind::ConnectionReset),
        "tcplb held {held} bytes at the reset"
    );
    assert!(got.bytes == data, "the bytes differ");
}
