//! The reliability suite: fault, load and hostile-input scenarios against
//! the real binary, each measured and judged by a number.
//!
//! `cargo test --test reliability` runs the short version of every
//! scenario (what CI runs). The full suite:
//!
//! ```sh
//! cargo test --release --test reliability -- --include-ignored --nocapture --test-threads=1
//! TCPLB_SOAK_SECS=600 cargo test --release --test reliability full_soak -- --ignored --nocapture
//! ```
//!
//! Each scenario prints one line: its name, the figures measured, and
//! PASS or FAIL. File descriptors come from `/proc/<pid>/fd`, memory from
//! `/proc/<pid>/status`, CPU from `/proc/<pid>/stat`, live pairs from the
//! admin `/status` and `/metrics`.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::haproxy;
use common::pki::{self, Pki};
use common::*;
use ring::digest::{Context, SHA256};

/// Scenarios run one at a time, even under `cargo test`'s parallel
/// threads: their figures are timings, CPU shares and memory of a loaded
/// machine, and another scenario's load would be measured with them.
fn alone() -> MutexGuard<'static, ()> {
    static SCENARIO: Mutex<()> = Mutex::new(());
    // A failed scenario poisons the lock; the next one runs all the same.
    SCENARIO
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Prints the scenario's line and fails the test if it did not pass.
fn report(name: &str, figures: String, pass: bool) {
    println!(
        "{name:<26} {figures} ... {}",
        if pass { "PASS" } else { "FAIL" }
    );
    assert!(pass, "{name}: {figures}");
}

/// The binary with a config file, and what it reports about itself.
struct Tcplb {
    bin: Binary,
    dir: PathBuf,
    admin: SocketAddr,
    listen: HashMap<String, SocketAddr>,
}

impl Drop for Tcplb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

impl Tcplb {
    /// Starts `tcplb --config` with `body` (upstreams etc.) plus an admin
    /// listener; `nofile` limits its descriptors.
    fn start(body: &str, nofile: Option<usize>) -> Tcplb {
        let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tcplb-rel-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(
            &path,
            format!("[admin]\nlisten = \"127.0.0.1:0\"\n\n{body}"),
        )
        .unwrap();
        let mut args = vec!["--config".to_string(), path.to_str().unwrap().to_string()];
        args.extend(relay_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let bin = match nofile {
            Some(n) => Binary::start_limited(n, &args),
            None => Binary::start(&args),
        };
        let mut listen = HashMap::new();
        let admin = loop {
            let line = bin.wait_for_log("listening on ");
            let addr = addr_after(&line, "listening on ");
            if line.contains("admin listening") {
                break addr;
            }
            let name = line.split('`').nth(1).unwrap().to_string();
            listen.insert(name, addr);
        };
        Tcplb {
            bin,
            dir,
            admin,
            listen,
        }
    }

    fn addr(&self, upstream: &str) -> SocketAddr {
        self.listen[upstream]
    }

    fn pid(&self) -> u32 {
        self.bin.pid()
    }

    fn metrics(&self) -> HashMap<String, f64> {
        let body = http_get(self.admin, "/metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
            .collect()
    }

    fn refused(&self, reason: &str) -> f64 {
        self.metrics()
            .iter()
            .filter(|(k, _)| {
                k.starts_with("tcplb_refused_total{") && k.contains(&format!("reason=\"{reason}\""))
            })
            .map(|(_, v)| v)
            .sum()
    }

    fn pairs(&self) -> u64 {
        let status: serde_json::Value =
            serde_json::from_str(&http_get(self.admin, "/status")).unwrap();
        status["pairs"].as_u64().unwrap()
    }

    /// Waits (up to `within`) until fds are back to `baseline` and no pair
    /// is left; returns how long it took.
    fn settles(&self, baseline: usize, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        loop {
            // Descriptors first: an admin request holds one until tcplb has
            // seen the client close, a moment after the client has its answer.
            // A pair still open would show up in either count.
            if self.bin.fd_count() <= baseline && self.pairs() == 0 {
                return Some(started.elapsed());
            }
            if started.elapsed() > within {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response.split_once("\r\n\r\n").unwrap().1.to_string()
}

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn upstream(name: &str, hosts: &[SocketAddr]) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "[[upstream]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nhosts = [{}]\n\n",
        hosts.join(", ")
    )
}

// ---------------------------------------------------------------------------
// 1. Integrity under chaos

/// A seeded byte stream produced in chunks, so multi-MiB transfers never
/// sit in memory whole.
struct Stream {
    rng: Rng,
    left: usize,
}

impl Stream {
    fn new(seed: u64, len: usize) -> Stream {
        Stream {
            rng: Rng::new(seed),
            left: len,
        }
    }

    /// The next chunk, of at most `max` bytes; empty at the end.
    fn next(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.left);
        self.left -= n;
        self.rng.bytes(n)
    }

    /// SHA-256 of the whole stream.
    fn digest(seed: u64, len: usize) -> Vec<u8> {
        let mut stream = Stream::new(seed, len);
        let mut ctx = Context::new(&SHA256);
        loop {
            let chunk = stream.next(64 * 1024);
            if chunk.is_empty() {
                return ctx.finish().as_ref().to_vec();
            }
            ctx.update(&chunk);
        }
    }
}

/// Writes a seeded stream in random write sizes (1 B to 64 KiB).
fn send_stream(s: &mut TcpStream, seed: u64, len: usize, rng: &mut Rng) -> std::io::Result<()> {
    let mut stream = Stream::new(seed, len);
    loop {
        let chunk = stream.next(1 + rng.below(64 * 1024));
        if chunk.is_empty() {
            return Ok(());
        }
        s.write_all(&chunk)?;
    }
}

/// SHA-256 of everything read until EOF, and its length.
fn digest_until_eof(s: &mut TcpStream) -> std::io::Result<(Vec<u8>, usize)> {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok((ctx.finish().as_ref().to_vec(), total));
        }
        ctx.update(&buf[..n]);
        total += n;
    }
}

/// What a chaos host received of a transfer whose client reset.
#[derive(Debug)]
struct ResetTransfer {
    seed: u64,
    /// Bytes of the seeded stream that arrived before the stream ended.
    received: u64,
    /// Every one of them was the stream's next byte.
    exact: bool,
    /// The stream ended with ECONNRESET (not EOF, not a timeout).
    reset: bool,
}

/// Reads a seeded stream until it ends, checking every byte, and reports it.
fn check_until_reset(conn: &mut TcpStream, seed: u64, resets: &mpsc::Sender<ResetTransfer>) {
    let mut stream = Stream::new(seed, usize::MAX);
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0;
    let mut exact = true;
    let reset = loop {
        match conn.read(&mut buf) {
            Ok(0) => break false,
            Ok(n) => {
                exact &= buf[..n] == stream.next(n)[..];
                received += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break e.kind() == ErrorKind::ConnectionReset,
        }
    };
    let _ = resets.send(ResetTransfer {
        seed,
        received,
        exact,
        reset,
    });
}

/// A host that speaks a one-byte mode first: `E` echoes everything; `H`
/// reads a seed and a length, streams that many seeded bytes, half-closes,
/// then reads the client's seeded stream to EOF and checks it; `R` reads
/// a seed, then checks the client's seeded stream until it ends (the
/// client resets) and reports what arrived to `resets`.
fn spawn_chaos_host(
    ok: Arc<AtomicU64>,
    bad: Arc<AtomicU64>,
    resets: mpsc::Sender<ResetTransfer>,
) -> SocketAddr {
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (ok, bad, resets) = (ok.clone(), bad.clone(), resets.clone());
            thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(300)));
                let mut mode = [0u8; 1];
                if conn.read_exact(&mut mode).is_err() {
                    return;
                }
                if mode[0] == b'R' {
                    let mut seed = [0u8; 8];
                    if conn.read_exact(&mut seed).is_ok() {
                        check_until_reset(&mut conn, u64::from_le_bytes(seed), &resets);
                    }
                    return;
                }
                if mode[0] == b'H' {
                    let mut head = [0u8; 16];
                    if conn.read_exact(&mut head).is_err() {
                        return;
                    }
                    let seed = u64::from_le_bytes(head[..8].try_into().unwrap());
                    let len = u64::from_le_bytes(head[8..].try_into().unwrap()) as usize;
                    let mut rng = Rng::new(seed ^ 0xabcd);
                    if send_stream(&mut conn, seed, len, &mut rng).is_err() {
                        return;
                    }
                    let _ = conn.shutdown(Shutdown::Write);
                    if let Ok((digest, _)) = digest_until_eof(&mut conn) {
                        let counter = if digest == Stream::digest(seed + 1, len) {
                            &ok
                        } else {
                            &bad
                        };
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    return;
                }
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) => {
                            let _ = conn.shutdown(Shutdown::Write);
                            return;
                        }
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
    });
    addr
}

/// How one chaos client's transfer went.
enum Transfer {
    /// Completed, and checked by the client: whether it was correct.
    Checked(bool),
    /// Reset by the client after `acknowledged` bytes of its stream had
    /// been acknowledged by tcplb's kernel; the host checks and reports it.
    Reset { seed: u64, acknowledged: u64 },
}

/// One chaos client.
fn chaos_client(addr: SocketAddr, i: usize, bytes: usize) -> Transfer {
    let mut rng = Rng::new(i as u64 * 7 + 1);
    let seed = i as u64 * 1000;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    match i % 4 {
        // Client half-closes first; the echo must match.
        0 | 1 => {
            let mut writer = s.try_clone().unwrap();
            let send = thread::spawn(move || {
                let mut rng = Rng::new(seed ^ 0x1234);
                writer.write_all(b"E").unwrap();
                send_stream(&mut writer, seed, bytes, &mut rng).unwrap();
                writer.shutdown(Shutdown::Write).unwrap();
            });
            let (digest, len) = digest_until_eof(&mut s).unwrap();
            send.join().unwrap();
            Transfer::Checked(len == bytes && digest == Stream::digest(seed, bytes))
        }
        // Host half-closes first; both directions are checked.
        2 => {
            s.write_all(b"H").unwrap();
            s.write_all(&seed.to_le_bytes()).unwrap();
            s.write_all(&(bytes as u64).to_le_bytes()).unwrap();
            let (digest, len) = digest_until_eof(&mut s).unwrap();
            let down_ok = len == bytes && digest == Stream::digest(seed, bytes);
            send_stream(&mut s, seed + 1, bytes, &mut rng).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            Transfer::Checked(down_ok)
        }
        // Resets in the middle of the transfer, without waiting for its
        // bytes to leave: whatever tcplb's kernel has acknowledged must
        // reach the host (bytes still in this kernel's queue are lost).
        _ => {
            let mut head = vec![b'R'];
            head.extend_from_slice(&seed.to_le_bytes());
            s.write_all(&head).unwrap();
            let len = bytes / 2 + 1;
            send_stream(&mut s, seed, len, &mut rng).unwrap();
            let unacked = tcplb::SendQueues::new()
                .unacked_between(s.local_addr().unwrap(), s.peer_addr().unwrap())
                .unwrap();
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            // The header was written first, so it is acknowledged first.
            let acknowledged = (len as u64).saturating_sub(u64::from(unacked));
            Transfer::Reset { seed, acknowledged }
        }
    }
}

fn integrity(clients: usize, bytes: usize) {
    let _alone = alone();
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let (resets, reset_reports) = mpsc::channel();
    let hosts = [
        spawn_chaos_host(ok.clone(), bad.clone(), resets.clone()),
        spawn_chaos_host(ok.clone(), bad.clone(), resets),
    ];
    let lb = Tcplb::start(&upstream("chaos", &hosts), None);
    let baseline = lb.bin.fd_count();
    let addr = lb.addr("chaos");
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|i| thread::spawn(move || chaos_client(addr, i, bytes)))
        .collect();
    let results: Vec<Transfer> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let took = started.elapsed();
    let checked = results
        .iter()
        .filter(|r| matches!(r, Transfer::Checked(_)))
        .count();
    let wrong = results
        .iter()
        .filter(|r| matches!(r, Transfer::Checked(false)))
        .count();
    let acknowledged: HashMap<u64, u64> = results
        .iter()
        .filter_map(|r| match r {
            Transfer::Reset { seed, acknowledged } => Some((*seed, *acknowledged)),
            Transfer::Checked(_) => None,
        })
        .collect();
    let settled = lb.settles(baseline, Duration::from_secs(2));
    // Host-side checks of the host-half-closes-first clients finish on the
    // hosts' threads, a moment after the clients are done.
    let expected = clients.div_ceil(4) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ok.load(Ordering::SeqCst) + bad.load(Ordering::SeqCst) < expected
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
    let host_checked = ok.load(Ordering::SeqCst);
    let host_wrong = bad.load(Ordering::SeqCst);
    // Each reset transfer's host reports once its stream has ended.
    let mut received = HashMap::new();
    while received.len() < acknowledged.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(transfer) = reset_reports.recv_timeout(left) else {
            break;
        };
        received.insert(transfer.seed, transfer);
    }
    let mut delivered = 0;
    let mut failures = Vec::new();
    for (seed, &acked) in &acknowledged {
        match received.get(seed) {
            Some(t) if t.exact && t.reset && t.received >= acked => delivered += 1,
            Some(t) => failures.push(format!(
                "seed {seed}: {} bytes received{} of {acked} acknowledged, then {}",
                t.received,
                if t.exact { "" } else { " (not the stream)" },
                if t.reset {
                    "the reset"
                } else {
                    "EOF or a timeout"
                }
            )),
            None => failures.push(format!(
                "seed {seed}: no host report (its header never arrived)"
            )),
        }
    }
    failures.sort();
    failures.truncate(3);
    let reset_bytes: u64 = received.values().map(|t| t.received).sum();
    let acked_bytes: u64 = acknowledged.values().sum();
    let resets_ok = delivered == acknowledged.len();
    let pass =
        wrong == 0 && host_wrong == 0 && settled.is_some() && host_checked == expected && resets_ok;
    report(
        "1 integrity under chaos",
        format!(
            "{clients} clients x {} KiB in {:.1?}: {checked}+{host_checked} checked, {} mismatches; {} reset transfers: acknowledged prefix ({acked_bytes} bytes) delivered {delivered}/{}, {reset_bytes} bytes checked{}; fds/pairs back in {:?}",
            bytes / 1024,
            took,
            wrong as u64 + host_wrong,
            acknowledged.len(),
            acknowledged.len(),
            if resets_ok {
                String::new()
            } else {
                format!(" ({})", failures.join("; "))
            },
            settled
        ),
        pass,
    );
}

#[test]
fn integrity_under_chaos() {
    integrity(40, 256 * 1024);
}

#[test]
#[ignore]
fn full_integrity_under_chaos() {
    integrity(1000, 16 << 20);
}

// ---------------------------------------------------------------------------
// 2. Backpressure

/// `SO_SNDBUF`/`SO_RCVBUF` of the backpressure scenario's own sockets.
const TEST_SOCKET_BUFFER: usize = 64 * 1024;

/// Bytes of memory all TCP sockets of the machine hold (`/proc/net/sockstat`).
fn tcp_memory() -> u64 {
    let stat = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let pages: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("TCP: "))
        .and_then(|l| l.split(" mem ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    pages * 4096
}

/// Connects with fixed send and receive buffers (set before the SYN, so the
/// advertised window follows them).
fn connect_with_buffers(addr: SocketAddr, size: usize) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_send_buffer_size(size).unwrap();
    socket.set_recv_buffer_size(size).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

fn backpressure(clients: usize, bytes: usize, hold: Duration) {
    let _alone = alone();
    // With the kernel's autotuning, a stalled connection's socket buffers
    // grow to MiBs, and 1,000 x 4 MiB each way is more than the kernel lets
    // TCP hold (`net.ipv4.tcp_mem`, 2.2 GiB on the machine this was written
    // on): it then drops segments and aborts closed sockets that still hold
    // data, so bytes are lost whatever the proxy does. tcplb's
    // `socket_buffer` bounds its share; the test's own sockets get the
    // same fixed size.
    let host = spawn_host_with(
        "echo",
        Behavior::Echo,
        HostSockets {
            read_timeout: hold + IO_TIMEOUT,
            buffer: Some(TEST_SOCKET_BUFFER),
        },
    );
    let body = format!(
        "[defaults]\nsocket_buffer = {TEST_SOCKET_BUFFER}\n\n{}",
        upstream("bp", &[host.addr])
    );
    let lb = Tcplb::start(&body, None);
    let addr = lb.addr("bp");
    let before = rss(lb.pid());
    // Each client pushes its bytes and reads nothing until told to.
    let read_now = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..clients {
        let read_now = read_now.clone();
        workers.push(thread::spawn(move || {
            let mut s = connect_with_buffers(addr, TEST_SOCKET_BUFFER);
            s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
            let seed = i as u64 + 5;
            let mut writer = s.try_clone().unwrap();
            let send = thread::spawn(move || {
                let mut rng = Rng::new(seed);
                send_stream(&mut writer, seed, bytes, &mut rng)?;
                writer.shutdown(Shutdown::Write)
            });
            while !read_now.load(Ordering::SeqCst) {
                thread::park_timeout(Duration::from_millis(50));
            }
            // A reset counts as a lost transfer, like a short or wrong one.
            let received = digest_until_eof(&mut s);
            let sent = send.join().unwrap();
            sent.is_ok()
                && received.is_ok_and(|(digest, len)| {
                    len == bytes && digest == Stream::digest(seed, bytes)
                })
        }));
    }
    // Let the pipes fill (until RSS grows by under 1 % in a second), then
    // watch memory while nobody reads.
    let filling = Instant::now();
    let mut last = rss(lb.pid());
    loop {
        thread::sleep(Duration::from_secs(1));
        let now = rss(lb.pid());
        if now <= last + last / 100 || filling.elapsed() > Duration::from_secs(60) {
            break;
        }
        last = now;
    }
    let filled_in = filling.elapsed();
    let mut samples = Vec::new();
    let mut kernel_peak = 0;
    let watch = Instant::now();
    while watch.elapsed() < hold {
        samples.push(rss(lb.pid()));
        kernel_peak = kernel_peak.max(tcp_memory());
        thread::sleep(Duration::from_millis(250));
    }
    read_now.store(true, Ordering::SeqCst);
    let intact = workers
        .into_iter()
        .map(|w| w.join().unwrap())
        .filter(|ok| *ok)
        .count();
    let peak = *samples.iter().max().unwrap();
    let per_pair = peak.saturating_sub(before) / clients as u64;
    // Each direction holds at most one bulk buffer (64 KiB by default).
    let bound = 2 * 64 * 1024 + 4096;
    let (first, last) = (samples[0], *samples.last().unwrap());
    let flat = last <= first + first / 20;
    let pass = per_pair <= bound && flat && intact == clients;
    report(
        "2 backpressure",
        format!(
            "{clients} clients x {} MiB unread for {hold:?} (filled in {filled_in:.0?}): {} B/pair peak (bound {bound}), RSS {} -> {} KiB, {intact}/{clients} intact, kernel TCP memory peak {} MiB",
            bytes >> 20,
            per_pair,
            first / 1024,
            last / 1024,
            kernel_peak >> 20
        ),
        pass,
    );
}

#[test]
fn backpressure_holds_memory_flat() {
    // Enough pairs that fixed costs (the buffer pool's free list, the
    // allocator) weigh little per pair.
    backpressure(200, 1 << 20, Duration::from_secs(2));
}

#[test]
#[ignore]
fn full_backpressure() {
    backpressure(1000, 4 << 20, Duration::from_secs(60));
}

// ---------------------------------------------------------------------------
// 3. Descriptor exhaustion

fn fd_exhaustion(pairs: usize, offered: usize) {
    let _alone = alone();
    let host = spawn_host("h", Behavior::Named);
    let body = upstream("fd", &[host.addr]);
    // Descriptors in use before any pair, on an unlimited twin.
    let base = {
        let twin = Tcplb::start(&body, None);
        let fds = twin.bin.fds().into_iter().filter(|&fd| fd < 64).count();
        drop(twin);
        fds
    };
    let lb = Tcplb::start(&body, Some(base + 2 * pairs));
    let addr = lb.addr("fd");
    let mut clients: Vec<TcpStream> = Vec::new();
    for _ in 0..offered {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        clients.push(s);
    }
    // The first `pairs` clients are served; the rest wait in the queue.
    let mut served = 0;
    for c in clients.iter_mut().take(pairs) {
        if read_line(c) == "h" {
            served += 1;
        }
    }
    lb.bin.wait_for_log("out of descriptors");
    let (cpu0, t0) = (cpu_seconds(lb.pid()), Instant::now());
    let lines_before = count_lines(&lb.bin, "out of descriptors", Duration::from_secs(2));
    let cpu = (cpu_seconds(lb.pid()) - cpu0) / t0.elapsed().as_secs_f64();
    // Existing pairs still relay.
    let mut relaying = 0;
    for c in clients.iter_mut().take(pairs) {
        c.write_all(b"ping\n").unwrap();
        if read_line(c) == "ping" {
            relaying += 1;
        }
    }
    // Free one pair: the oldest waiting client must be served quickly.
    let waiting_index = pairs;
    let freed = clients.remove(0);
    let freed_at = Instant::now();
    finish(freed);
    let greeting = read_line(&mut clients[waiting_index - 1]);
    let resumed = freed_at.elapsed();
    let pass = served == pairs
        && relaying == pairs
        && cpu < 0.05
        && lines_before <= 3
        && greeting == "h"
        && resumed < Duration::from_millis(200);
    report(
        "3 descriptor exhaustion",
        format!(
            "{pairs} pairs fit, {offered} offered: {relaying} kept relaying, {:.1}% CPU at the limit, {lines_before} log lines in 2 s, accepted again {resumed:.0?} after a pair ended",
            cpu * 100.0
        ),
        pass,
    );
}

/// Counts stderr lines containing `needle` that arrive within `window`.
fn count_lines(bin: &Binary, needle: &str, window: Duration) -> usize {
    let end = Instant::now() + window;
    let mut n = 0;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match bin.stderr.recv_timeout(left) {
            Ok(line) if line.contains(needle) => n += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    n
}

#[test]
fn descriptor_exhaustion_is_survived() {
    fd_exhaustion(20, 100);
}

#[test]
#[ignore]
fn full_descriptor_exhaustion() {
    fd_exhaustion(120, 1000);
}

// ---------------------------------------------------------------------------
// 4. Connection cap

fn connection_cap(cap: usize) {
    let _alone = alone();
    let host = spawn_host("h", Behavior::Named);
    let body = format!(
        "[defaults]\nmax_connections = {cap}\n\n{}",
        upstream("cap", &[host.addr])
    );
    let lb = Tcplb::start(&body, None);
    let addr = lb.addr("cap");
    let offered = cap + cap / 10;
    let mut relayed = Vec::new();
    let mut overloaded = 0;
    for _ in 0..offered {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let line = read_line(&mut c);
        if line == "h" {
            relayed.push(c);
        } else if line.starts_with("ERROR overloaded:") {
            overloaded += 1;
        }
    }
    let counted = lb.refused("overloaded") as usize;
    let pass = relayed.len() == cap && overloaded == offered - cap && counted == overloaded;
    report(
        "4 connection cap",
        format!(
            "max {cap}, offered {offered}: {} relayed, {overloaded} refused overloaded, {counted} counted",
            relayed.len()
        ),
        pass,
    );
}

#[test]
fn connection_cap_is_exact() {
    connection_cap(50);
}

#[test]
#[ignore]
fn full_connection_cap() {
    connection_cap(1000);
}

// ---------------------------------------------------------------------------
// 5. Dead and black-holed hosts

#[test]
fn dead_and_black_holed_hosts() {
    let _alone = alone();
    let live = spawn_host("live", Behavior::Named);
    let dead = dead_addr();
    let hole = black_hole();
    let body = format!(
        "[defaults]\nconnect_timeout = \"1s\"\n\n{}{}",
        upstream("dead", &[dead, live.addr]),
        upstream("hole", &[hole.addr, live.addr])
    );
    let lb = Tcplb::start(&body, None);
    let baseline = lb.bin.fd_count();
    let timed = |addr: SocketAddr| {
        let started = Instant::now();
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let name = read_line(&mut c);
        let took = started.elapsed();
        finish(c);
        (name, took)
    };
    // The refused host is first in line for the first client, and skipped.
    let dead_times: Vec<Duration> = (0..5)
        .map(|_| timed(lb.addr("dead")))
        .map(|(n, t)| if n == "live" { t } else { Duration::MAX })
        .collect();
    let worst_dead = *dead_times.iter().max().unwrap();
    // The black hole costs the first client the connect timeout.
    let (name, hole_time) = timed(lb.addr("hole"));
    let settled = lb.settles(baseline, Duration::from_secs(2));
    let pass = worst_dead < Duration::from_millis(50)
        && name == "live"
        && hole_time >= Duration::from_millis(900)
        && hole_time <= Duration::from_millis(1100)
        && settled.is_some();
    report(
        "5 dead and black-holed",
        format!(
            "refused host skipped in {worst_dead:.1?} at worst, black hole cost {hole_time:.2?} (timeout 1 s), fds back: {}",
            settled.is_some()
        ),
        pass,
    );
}

// ---------------------------------------------------------------------------
// 6. Idle and half-closed reaping

#[test]
fn idle_and_half_closed_pairs_are_reaped_and_trickles_are_not() {
    let _alone = alone();
    let host = spawn_host("h", Behavior::Echo);
    let silent = TcpListener::bind(localhost()).unwrap();
    let silent_addr = silent.local_addr().unwrap();
    // A host that takes the client's FIN and never finishes its own side.
    let (hold_tx, hold_rx) = mpsc::channel::<TcpStream>();
    thread::spawn(move || {
        for conn in silent.incoming().flatten() {
            let _ = hold_tx.send(conn);
        }
    });
    let body = format!(
        "[defaults]\nidle_timeout = \"1500ms\"\nhalf_close_timeout = \"1s\"\n\n{}{}",
        upstream("echo", &[host.addr]),
        upstream("silent", &[silent_addr])
    );
    let lb = Tcplb::start(&body, None);
    // Idle pairs: closed at the idle timeout ± 10 %.
    let idle: Vec<(TcpStream, Instant)> = (0..5)
        .map(|_| {
            let mut c = TcpStream::connect(lb.addr("echo")).unwrap();
            c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            c.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            (c, Instant::now())
        })
        .collect();
    // A trickle: one byte a second for 4 s, past the 1.5 s idle timeout.
    let trickler = thread::spawn({
        let addr = lb.addr("echo");
        move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            for _ in 0..4 {
                c.write_all(b"t").unwrap();
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_err() {
                    return false;
                }
                thread::sleep(Duration::from_secs(1));
            }
            true
        }
    });
    // A half-closed pair whose host never finishes.
    let half = TcpStream::connect(lb.addr("silent")).unwrap();
    half.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    half.shutdown(Shutdown::Write).unwrap();
    let half_since = Instant::now();
    let _held = hold_rx.recv_timeout(IO_TIMEOUT).unwrap();
    // Each connection is watched on its own thread, so every close is
    // timed when it happens.
    let watch = |mut c: TcpStream, since: Instant| {
        thread::spawn(move || {
            let mut rest = Vec::new();
            let _ = c.read_to_end(&mut rest);
            since.elapsed()
        })
    };
    let half_watch = watch(half, half_since);
    let idle_watches: Vec<_> = idle.into_iter().map(|(c, since)| watch(c, since)).collect();
    let idle_closes: Vec<Duration> = idle_watches
        .into_iter()
        .map(|w| w.join().unwrap())
        .collect();
    let half_close = half_watch.join().unwrap();
    let trickle_survived = trickler.join().unwrap();
    let idle_ok = idle_closes
        .iter()
        .all(|t| *t >= Duration::from_millis(1350) && *t <= Duration::from_millis(1650));
    let half_ok =
        half_close >= Duration::from_millis(900) && half_close <= Duration::from_millis(1100);
    report(
        "6 idle and half-closed",
        format!(
            "idle closed after {:?} ms (timeout 1500), half-closed after {} ms (bound 1000), 1 B/s trickle kept: {trickle_survived}",
            idle_closes
                .iter()
                .map(|t| t.as_millis())
                .collect::<Vec<_>>(),
            half_close.as_millis()
        ),
        idle_ok && half_ok && trickle_survived,
    );
}

// ---------------------------------------------------------------------------
// 7. Slow handshakes

fn tls_body(pki: &Pki, host: SocketAddr, extra_tls: &str, extra_defaults: &str) -> String {
    format!(
        "[defaults]\n{extra_defaults}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n{extra_tls}\n\n{}[[client]]\nidentity = \"alice\"\nupstreams = [\"secure\"]\nrate = 1000\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca_path.display(),
        upstream("secure", &[host])
    )
}

/// A real ClientHello, to dribble out one byte at a time.
fn client_hello(pki: &Pki) -> Vec<u8> {
    let mut conn =
        rustls::ClientConnection::new(pki.client_config(None), "localhost".try_into().unwrap())
            .unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

fn slow_handshakes(sockets: usize, timeout_secs: u64) {
    let _alone = alone();
    let pki = Pki::new("slow");
    let host = spawn_host("h", Behavior::Echo);
    let caps = format!(
        "handshake_timeout = \"{timeout_secs}s\"\nmax_handshakes = {}\nmax_handshakes_per_source = {}",
        sockets * 2,
        sockets * 2
    );
    let lb = Tcplb::start(&tls_body(&pki, host.addr, &caps, ""), None);
    let addr = lb.addr("secure");
    let hello = Arc::new(client_hello(&pki));
    let started = Instant::now();
    // Half send nothing, half dribble a ClientHello a byte every 2 s.
    let attackers: Vec<_> = (0..sockets)
        .map(|i| {
            let hello = hello.clone();
            thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let mut sent = 0;
                let mut buf = [0u8; 64];
                loop {
                    if i % 2 == 1 && sent < hello.len() {
                        if s.write_all(&hello[sent..sent + 1]).is_err() {
                            return started.elapsed();
                        }
                        sent += 1;
                    }
                    let wait_until = Instant::now() + Duration::from_secs(2);
                    while Instant::now() < wait_until {
                        match s.read(&mut buf) {
                            Ok(0) => return started.elapsed(),
                            Ok(_) => {}
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) => {}
                            Err(_) => return started.elapsed(),
                        }
                    }
                }
            })
        })
        .collect();
    // Meanwhile a legitimate client keeps connecting.
    let alice = pki.client("alice");
    let config = pki.client_config(Some(&alice));
    let (mut ok, mut failed) = (0, 0);
    while started.elapsed() < Duration::from_secs(timeout_secs) {
        let result =
            pki::connect_from("127.0.0.2".parse::<IpAddr>().unwrap(), addr, config.clone())
                .and_then(|mut s| {
                    s.write_all(b"legit\n")?;
                    pki::read_line(&mut s)
                });
        match result {
            Ok(line) if line == "legit" => ok += 1,
            _ => failed += 1,
        }
        thread::sleep(Duration::from_millis(100));
    }
    let closes: Vec<Duration> = attackers.into_iter().map(|a| a.join().unwrap()).collect();
    let timeout = Duration::from_secs(timeout_secs);
    let (earliest, latest) = (closes.iter().min().unwrap(), closes.iter().max().unwrap());
    let in_window = closes.iter().all(|t| {
        *t + Duration::from_secs(1) >= timeout && *t <= timeout + Duration::from_millis(2500)
    });
    report(
        "7 slow handshakes",
        format!(
            "{sockets} slow sockets closed between {earliest:.1?} and {latest:.1?} (timeout {timeout:?}); legitimate client {ok} ok, {failed} failed"
        ),
        in_window && failed == 0 && ok > 0,
    );
}

#[test]
fn slow_handshakes_are_cut_at_the_timeout() {
    slow_handshakes(100, 3);
}

#[test]
#[ignore]
fn full_slow_handshakes() {
    slow_handshakes(2000, 10);
}

// ---------------------------------------------------------------------------
// 8. Handshake and rate floods

fn floods(seconds: u64, rate: u32) {
    let _alone = alone();
    let pki = Pki::new("flood");
    let host = spawn_host("h", Behavior::Echo);
    let defaults = format!("source_rate = {rate}\nsource_burst = {rate}");
    let lb = Tcplb::start(&tls_body(&pki, host.addr, "", &defaults), None);
    let addr = lb.addr("secure");
    let hello = client_hello(&pki);
    let stop = Arc::new(AtomicBool::new(false));
    let cpu0 = cpu_seconds(lb.pid());
    let started = Instant::now();
    // The flooder: 1,000 connections a second from 127.0.0.3, each a ClientHello.
    let flooder = thread::spawn({
        let stop = stop.clone();
        move || {
            let mut opened = 0u64;
            let source: IpAddr = "127.0.0.3".parse().unwrap();
            while !stop.load(Ordering::SeqCst) {
                let tick = Instant::now();
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .unwrap();
                socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
                if socket.connect(&addr.into()).is_ok() {
                    let mut s: TcpStream = socket.into();
                    let _ = s.write_all(&hello);
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    opened += 1;
                }
                if let Some(rest) = Duration::from_millis(1).checked_sub(tick.elapsed()) {
                    thread::sleep(rest);
                }
            }
            opened
        }
    });
    // A normal client from another source, every 100 ms.
    let alice = pki.client("alice");
    let config = pki.client_config(Some(&alice));
    let (mut ok, mut failed) = (0, 0);
    while started.elapsed() < Duration::from_secs(seconds) {
        let result = pki::connect_from("127.0.0.2".parse().unwrap(), addr, config.clone())
            .and_then(|mut s| {
                s.write_all(b"normal\n")?;
                pki::read_line(&mut s)
            });
        match result {
            Ok(line) if line == "normal" => ok += 1,
            _ => failed += 1,
        }
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    let opened = flooder.join().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(lb.pid()) - cpu0) / elapsed;
    let limited = lb.refused("source_rate_limited");
    let admitted = opened as f64 - limited;
    let allowed = f64::from(rate) * elapsed + f64::from(rate) + 2.0;
    report(
        "8 handshake and rate flood",
        format!(
            "flooder opened {opened} in {elapsed:.1} s, {admitted:.0} admitted (allowed {allowed:.0}); normal client {ok} ok, {failed} failed; tcplb CPU {:.0}%",
            cpu * 100.0
        ),
        admitted <= allowed && failed == 0 && ok > 0 && cpu < 0.8,
    );
}

#[test]
fn floods_are_held_to_their_rate() {
    floods(3, 20);
}

#[test]
#[ignore]
fn full_floods() {
    floods(20, 50);
}

// ---------------------------------------------------------------------------
// 9. Soak

/// Sockets of `pid` in CLOSE_WAIT (peer closed, tcplb has not).
fn close_wait(pid: u32) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().to_string();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    let mut n = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 9 && fields[3] == "08" && inodes.iter().any(|i| i == fields[9]) {
                n += 1;
            }
        }
    }
    n
}

fn soak(seconds: u64) {
    let _alone = alone();
    let hosts = [
        spawn_host("a", Behavior::Echo),
        spawn_host("b", Behavior::Echo),
    ];
    let addrs: Vec<SocketAddr> = hosts.iter().map(|h| h.addr).collect();
    let lb = Tcplb::start(&upstream("soak", &addrs), None);
    let addr = lb.addr("soak");
    let baseline = lb.bin.fd_count();
    let stop = Arc::new(AtomicBool::new(false));
    let transfers = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    // Churn: a new connection per request.
    for i in 0..8 {
        let (stop, done) = (stop.clone(), transfers.clone());
        workers.push(thread::spawn(move || {
            let mut rng = Rng::new(i + 100);
            while !stop.load(Ordering::SeqCst) {
                let mut c = TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let len = 1 + rng.below(512);
                let data = rng.bytes(len);
                c.write_all(&data).unwrap();
                let mut back = vec![0u8; data.len()];
                c.read_exact(&mut back).unwrap();
                assert!(back == data);
                finish(c);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Long transfers: 4 MiB streams, back to back.
    for i in 0..4 {
        let (stop, done) = (stop.clone(), transfers.clone());
        workers.push(thread::spawn(move || {
            let mut rng = Rng::new(i + 200);
            while !stop.load(Ordering::SeqCst) {
                let mut c = TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let data = rng.bytes(4 << 20);
                let mut writer = c.try_clone().unwrap();
                let sent = data.clone();
                let send = thread::spawn(move || {
                    writer.write_all(&sent).unwrap();
                    writer.shutdown(Shutdown::Write).unwrap();
                });
                let mut back = Vec::with_capacity(data.len());
                c.read_to_end(&mut back).unwrap();
                send.join().unwrap();
                assert!(back == data);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let total = Duration::from_secs(seconds);
    thread::sleep(total / 4);
    let warm = rss(lb.pid());
    thread::sleep(total - total / 4);
    let end = rss(lb.pid());
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    // CLOSE_WAIT first, on its own clock: a socket tcplb never closes
    // after its peer's FIN fails here even if descriptors would settle.
    let stopped = Instant::now();
    let mut waiting = close_wait(lb.pid());
    while waiting > 0 && stopped.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(20));
        waiting = close_wait(lb.pid());
    }
    let settled = lb.settles(baseline, Duration::from_secs(5));
    let growth = end as f64 / warm as f64 - 1.0;
    report(
        "9 soak",
        format!(
            "{seconds} s, {} transfers: RSS {} KiB after warm-up, {} KiB at the end ({:+.1}%), fds/pairs back in {settled:?}, {waiting} CLOSE_WAIT 5 s after the load stopped",
            transfers.load(Ordering::Relaxed),
            warm / 1024,
            end / 1024,
            growth * 100.0
        ),
        growth <= 0.05 && settled.is_some() && waiting == 0,
    );
}

#[test]
fn soak_short() {
    soak(20);
}

#[test]
#[ignore]
fn full_soak() {
    let seconds = std::env::var("TCPLB_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    soak(seconds);
}

// ---------------------------------------------------------------------------
// 11. Drain after heavy backpressure

/// The kernel's TCP counters that tell a run under memory pressure:
/// entries into pressure, segments dropped for want of memory (receive
/// queue full, out-of-order queue, pruned queues) and zero-window probes.
#[derive(Clone, Copy, Default)]
struct KernelTcp {
    pressures: u64,
    drops: u64,
    prunes: u64,
    window_probes: u64,
    /// Segments outside the receiver's window whose duplicate ACK the
    /// kernel skipped (rate limited): a lower bound of segments, window
    /// updates among them, that a receiver threw away unread.
    out_of_window: u64,
}

impl KernelTcp {
    fn now() -> KernelTcp {
        let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap();
        let lines: Vec<&str> = netstat
            .lines()
            .filter(|l| l.starts_with("TcpExt:"))
            .collect();
        let (names, values) = (lines[0], lines[1]);
        let counter = |name: &str| {
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, v)| v.parse::<u64>().unwrap())
        };
        KernelTcp {
            pressures: counter("TCPMemoryPressures"),
            drops: counter("TCPRcvQDrop") + counter("TCPOFODrop"),
            prunes: counter("PruneCalled"),
            window_probes: counter("TCPWinProbe"),
            out_of_window: counter("TCPACKSkippedSeq"),
        }
    }

    fn since(self, before: KernelTcp) -> KernelTcp {
        KernelTcp {
            pressures: self.pressures - before.pressures,
            drops: self.drops - before.drops,
            prunes: self.prunes - before.prunes,
            window_probes: self.window_probes - before.window_probes,
            out_of_window: self.out_of_window - before.out_of_window,
        }
    }
}

/// What one client of the drain scenario saw.
struct Drained {
    sent: u64,
    intact: bool,
    /// From the first read to the last byte.
    took: Duration,
    /// The longest wait between two reads that returned bytes.
    longest_wait: Duration,
    /// Why the read-back stopped short, with how far it got.
    failure: Option<String>,
}

/// The read-back of one drain client: every byte checked against the
/// pushed stream, and the longest wait between two receipts.
struct Receipts<'a> {
    chunk: &'a [u8],
    got: u64,
    intact: bool,
    started: Instant,
    last: Instant,
    longest_wait: Duration,
}

impl<'a> Receipts<'a> {
    fn new(chunk: &'a [u8]) -> Receipts<'a> {
        let now = Instant::now();
        Receipts {
            chunk,
            got: 0,
            intact: true,
            started: now,
            last: now,
            longest_wait: Duration::ZERO,
        }
    }

    fn take(&mut self, bytes: &[u8]) {
        for (k, b) in bytes.iter().enumerate() {
            self.intact &= *b == self.chunk[(self.got as usize + k) % self.chunk.len()];
        }
        self.got += bytes.len() as u64;
        self.longest_wait = self.longest_wait.max(self.last.elapsed());
        self.last = Instant::now();
    }

    /// Why the read-back stopped: `what`, how far it got and how long
    /// after the last receipt.
    fn stopped(&self, what: impl std::fmt::Display, sent: u64) -> Option<String> {
        let (got, waited) = (self.got, self.last.elapsed());
        Some(format!(
            "{what} after {got} of {sent} B, {waited:.1?} after the last"
        ))
    }

    fn end(self, sent: u64, failure: Option<String>) -> Drained {
        Drained {
            sent,
            intact: self.intact && failure.is_none(),
            took: self.last - self.started,
            longest_wait: self.longest_wait,
            failure,
        }
    }
}

/// How one drain client pushes and reads back.
struct DrainPace {
    push: Duration,
    pause: Duration,
    patience: Duration,
}

/// Pushes a seeded stream without reading for `push`, waits `pause`, then
/// reads the echo back, checking every byte.
fn drain_client(addr: SocketAddr, seed: u64, pace: &DrainPace) -> Drained {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nonblocking(true).unwrap();
    let chunk = Rng::new(seed).bytes(64 * 1024);
    let (mut sent, mut at) = (0u64, 0usize);
    let end = Instant::now() + pace.push;
    while Instant::now() < end {
        match s.write(&chunk[at..]) {
            Ok(n) => {
                sent += n as u64;
                at = (at + n) % chunk.len();
            }
            // The load's own pacing: nothing waits on it.
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("push: {e}"),
        }
    }
    thread::sleep(pace.pause);
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(pace.patience)).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut receipts = Receipts::new(&chunk);
    let mut failure = None;
    while receipts.got < sent {
        match s.read(&mut buf) {
            Ok(0) => failure = receipts.stopped("EOF", sent),
            Err(e) => failure = receipts.stopped(e, sent),
            Ok(n) => receipts.take(&buf[..n]),
        }
        if failure.is_some() {
            break;
        }
    }
    // The port finds the stalled pair in `ss` output taken beside the run.
    let port = s.local_addr().map_or(0, |a| a.port());
    receipts.end(sent, failure.map(|f| format!("{f}, client port {port}")))
}

/// Writes out what rustls holds: false if the socket filled first.
fn flush_tls(
    conn: &mut rustls::ClientConnection,
    sock: &mut mio::net::TcpStream,
) -> std::io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads what the socket has, until it would block, handing the plaintext
/// to `receipts`: true at the end of the stream.
fn read_tls(
    conn: &mut rustls::ClientConnection,
    sock: &mut mio::net::TcpStream,
    buf: &mut [u8],
    receipts: &mut Receipts<'_>,
) -> std::io::Result<bool> {
    loop {
        match conn.read_tls(sock) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
        conn.process_new_packets().map_err(std::io::Error::other)?;
        loop {
            match conn.reader().read(buf) {
                Ok(0) => return Ok(true),
                Ok(n) => receipts.take(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// [`drain_client`] over TLS (mTLS to tcplb or HAProxy): the handshake
/// first, then the same push and read-back through rustls, the socket
/// non-blocking throughout so that a full send side never keeps the
/// client from reading. Clients come from four loopback sources, 127.0.0.10
/// to .13, so that 200 of them stay within tcplb's default
/// `max_handshakes_per_source` (100) as clients of a real fleet would.
fn drain_tls_client(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    seed: u64,
    pace: &DrainPace,
) -> Drained {
    let source = IpAddr::from([127, 0, 0, 10 + (seed % 4) as u8]);
    let rustls::StreamOwned { mut conn, sock } = pki::connect_from(source, addr, config).unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut sock = mio::net::TcpStream::from_std(sock);
    let chunk = Rng::new(seed).bytes(64 * 1024);
    let (mut sent, mut at) = (0u64, 0usize);
    let end = Instant::now() + pace.push;
    while Instant::now() < end {
        match flush_tls(&mut conn, &mut sock) {
            Ok(true) => {
                let n = conn.writer().write(&chunk[at..]).unwrap();
                sent += n as u64;
                at = (at + n) % chunk.len();
            }
            Ok(false) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("push: {e}"),
        }
    }
    thread::sleep(pace.pause);
    let mut poll = mio::Poll::new().unwrap();
    let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
    poll.registry()
        .register(&mut sock, mio::Token(0), interest)
        .unwrap();
    let mut events = mio::Events::with_capacity(4);
    let mut buf = vec![0u8; 1 << 20];
    let mut receipts = Receipts::new(&chunk);
    let failure = loop {
        // Edge-triggered: write and read until each would block, then wait.
        let step = flush_tls(&mut conn, &mut sock)
            .and_then(|_| read_tls(&mut conn, &mut sock, &mut buf, &mut receipts));
        match step {
            _ if receipts.got >= sent => break None,
            Ok(true) => break receipts.stopped("EOF", sent),
            Err(e) => break receipts.stopped(e, sent),
            Ok(false) if receipts.last.elapsed() > pace.patience => {
                break receipts.stopped("no byte for the patience", sent);
            }
            Ok(false) => {}
        }
        poll.poll(&mut events, Some(Duration::from_millis(500)))
            .unwrap();
    };
    receipts.end(sent, failure)
}

/// The proxy the drain scenario goes through.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Through {
    Tcplb,
    /// HAProxy at its defaults with one thread (`nbthread 1`); with
    /// `socket_buffer`, its `tune.{snd,rcv}buf.{client,server}` set alike.
    Haproxy,
}

/// One drain scenario: how many clients push for how long, through what.
#[derive(Clone, Copy)]
struct Drain {
    clients: usize,
    push: Duration,
    socket_buffer: Option<usize>,
    /// `unsent_limit = "off"` for tcplb (HAProxy has no such limit).
    unsent_off: bool,
    tls: bool,
}

/// What one run of the scenario measured.
struct DrainRun {
    intake_mib: u64,
    intact: usize,
    took: Duration,
    longest: Duration,
    kernel: KernelTcp,
    failures: Vec<String>,
}

impl DrainRun {
    fn figures(&self, setup: &Drain) -> String {
        let first = self.failures.first().map_or(String::new(), |f| {
            format!("; {} stopped short, the first: {f}", self.failures.len())
        });
        format!(
            "{} clients pushed {} MiB unread for {:?}: {}/{} intact, drained in {:.1?}, longest wait {:.1?}; kernel: {} entries into memory pressure, {} segments dropped, {} queues pruned, {} zero-window probes, at least {} segments outside the window{first}",
            setup.clients,
            self.intake_mib,
            setup.push,
            self.intact,
            setup.clients,
            self.took,
            self.longest,
            self.kernel.pressures,
            self.kernel.drops,
            self.kernel.prunes,
            self.kernel.window_probes,
            self.kernel.out_of_window,
        )
    }

    /// Every byte back, no wait over 5 s, drained within `within`.
    fn holds(&self, setup: &Drain, within: Duration) -> bool {
        self.intact == setup.clients && self.longest <= DRAIN_WAIT_BOUND && self.took <= within
    }
}

/// The longest a drain client may wait between two receipts.
const DRAIN_WAIT_BOUND: Duration = Duration::from_secs(5);

/// The drain may take 10 s, or twice HAProxy's time in the same run.
const DRAIN_BOUND: Duration = Duration::from_secs(10);

/// Whichever proxy `through` names, started in front of `host`: its
/// listening address, and what keeps it running.
fn drain_proxy(
    setup: &Drain,
    through: Through,
    host: SocketAddr,
    pki: Option<&Pki>,
) -> Option<(SocketAddr, Box<dyn std::any::Any>)> {
    match through {
        Through::Tcplb => {
            let mut defaults = setup
                .socket_buffer
                .map_or(String::new(), |b| format!("socket_buffer = {b}\n"));
            if setup.unsent_off {
                defaults += "unsent_limit = \"off\"\n";
            }
            let body = match pki {
                Some(pki) => tls_body(pki, host, "", &defaults),
                None => format!("[defaults]\n{defaults}\n{}", upstream("drain", &[host])),
            };
            let lb = Tcplb::start(&body, None);
            let addr = lb.addr(if pki.is_some() { "secure" } else { "drain" });
            Some((addr, Box::new(lb)))
        }
        Through::Haproxy => {
            let port = haproxy::free_port();
            let tune = setup.socket_buffer.map_or(String::new(), |b| {
                format!("    tune.sndbuf.client {b}\n    tune.sndbuf.server {b}\n    tune.rcvbuf.client {b}\n    tune.rcvbuf.server {b}\n")
            });
            let ssl = match pki {
                Some(pki) => {
                    let pem = pki.dir.join("haproxy.pem");
                    let cert = std::fs::read_to_string(&pki.server_cert).unwrap();
                    let key = std::fs::read_to_string(&pki.server_key).unwrap();
                    std::fs::write(&pem, format!("{cert}{key}")).unwrap();
                    format!(
                        " ssl crt {} ca-file {} verify required",
                        pem.display(),
                        pki.ca_path.display()
                    )
                }
                None => String::new(),
            };
            let config = format!(
                "global\n    nbthread 1\n    stats socket {{stats}}\n{tune}defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 300s\n    timeout server 300s\nlisten drain\n    bind 127.0.0.1:{port}{ssl}\n    server h {host}\n"
            );
            let haproxy = haproxy::Haproxy::start("drain", &config)?;
            Some((SocketAddr::from(([127, 0, 0, 1], port)), Box::new(haproxy)))
        }
    }
}

/// Many clients push without reading, then all read back at once; `None`
/// where the proxy is not installed.
fn drain_run(setup: &Drain, through: Through) -> Option<DrainRun> {
    let host = spawn_host_with(
        "echo",
        Behavior::Echo,
        HostSockets {
            read_timeout: Duration::from_secs(300),
            // The experiment of docs/bench/drain-stall-trace.md: the echo
            // host's sockets held under the kernel's per-socket share.
            buffer: std::env::var("TCPLB_DRAIN_HOST_BUFFER").ok().map(|b| {
                b.parse()
                    .expect("TCPLB_DRAIN_HOST_BUFFER is a size in bytes")
            }),
        },
    );
    let pki = setup.tls.then(|| Pki::new("drain"));
    let (addr, _proxy) = drain_proxy(setup, through, host.addr, pki.as_ref())?;
    let tls = pki
        .as_ref()
        .map(|pki| pki.client_config(Some(&pki.client("alice"))));
    let kernel = KernelTcp::now();
    let pace = Arc::new(DrainPace {
        push: setup.push,
        pause: Duration::from_secs(2),
        patience: Duration::from_secs(60),
    });
    let workers: Vec<_> = (0..setup.clients as u64)
        .map(|i| {
            let (pace, tls) = (pace.clone(), tls.clone());
            thread::spawn(move || match tls {
                Some(config) => drain_tls_client(addr, config, i + 1, &pace),
                None => drain_client(addr, i + 1, &pace),
            })
        })
        .collect();
    let results: Vec<Drained> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    Some(DrainRun {
        intake_mib: results.iter().map(|r| r.sent).sum::<u64>() >> 20,
        intact: results.iter().filter(|r| r.intact).count(),
        took: results.iter().map(|r| r.took).max().unwrap(),
        longest: results.iter().map(|r| r.longest_wait).max().unwrap(),
        kernel: KernelTcp::now().since(kernel),
        failures: results.into_iter().filter_map(|r| r.failure).collect(),
    })
}

/// The scenario's name in the report: `11 drain`, with what is set.
fn drain_name(setup: &Drain, through: Through) -> String {
    let mut name = "11 drain".to_string();
    if through == Through::Haproxy {
        name += " haproxy";
    }
    if setup.tls {
        name += " tls";
    }
    if let Some(b) = setup.socket_buffer {
        name += &format!(" socket_buffer={b}");
    }
    if setup.unsent_off && through == Through::Tcplb {
        name += " unsent_limit=off";
    }
    name
}

/// The scenario through tcplb alone: every byte back, no wait over 5 s,
/// drained within 10 s.
fn drain_after_backpressure(setup: Drain) {
    let _alone = alone();
    let run = drain_run(&setup, Through::Tcplb).unwrap();
    report(
        &drain_name(&setup, Through::Tcplb),
        run.figures(&setup),
        run.holds(&setup, DRAIN_BOUND),
    );
}

/// The scenario through tcplb and HAProxy in turn, `rounds` times each:
/// tcplb must deliver every byte with no wait over 5 s, and its median
/// drain must stay within twice HAProxy's median (or 10 s, if more).
/// HAProxy's own figures are reported, not judged.
fn drain_beside_haproxy(setup: Drain, rounds: usize) {
    let _alone = alone();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let run = drain_run(&setup, Through::Tcplb).unwrap();
        println!(
            "{:<26} {}",
            drain_name(&setup, Through::Tcplb),
            run.figures(&setup)
        );
        ours.push(run);
        let Some(run) = drain_run(&setup, Through::Haproxy) else {
            return;
        };
        println!(
            "{:<26} {}",
            drain_name(&setup, Through::Haproxy),
            run.figures(&setup)
        );
        theirs.push(run);
    }
    let median = |runs: &[DrainRun]| {
        let mut took: Vec<Duration> = runs.iter().map(|r| r.took).collect();
        took.sort();
        took[took.len() / 2]
    };
    let (ours_took, theirs_took) = (median(&ours), median(&theirs));
    let within = DRAIN_BOUND.max(theirs_took * 2);
    let intact = ours.iter().all(|r| r.intact == setup.clients);
    let longest = ours.iter().map(|r| r.longest).max().unwrap();
    let theirs_longest = theirs.iter().map(|r| r.longest).max().unwrap();
    report(
        &format!("{} beside haproxy", drain_name(&setup, Through::Tcplb)),
        format!(
            "{rounds} rounds each: tcplb median {ours_took:.1?} (bound {within:.1?}), longest wait {longest:.1?}, all intact: {intact}; haproxy median {theirs_took:.1?}, longest wait {theirs_longest:.1?}, intact {}",
            theirs
                .iter()
                .map(|r| r.intact.to_string())
                .collect::<Vec<_>>()
                .join("/")
        ),
        intact && longest <= DRAIN_WAIT_BOUND && ours_took <= within,
    );
}

/// The full scenario of issue 16: 200 clients pushing for 4 s.
const FULL_DRAIN: Drain = Drain {
    clients: 200,
    push: Duration::from_secs(4),
    socket_buffer: None,
    unsent_off: false,
    tls: false,
};

/// The short one in `cargo test`: 40 clients pushing for 1 s.
const SHORT_DRAIN: Drain = Drain {
    clients: 40,
    push: Duration::from_secs(1),
    socket_buffer: None,
    unsent_off: false,
    tls: false,
};

#[test]
fn drain_after_backpressure_short() {
    drain_after_backpressure(SHORT_DRAIN);
}

#[test]
fn drain_after_backpressure_short_tls() {
    drain_after_backpressure(Drain {
        tls: true,
        ..SHORT_DRAIN
    });
}

#[test]
#[ignore]
fn full_drain_after_backpressure() {
    drain_after_backpressure(FULL_DRAIN);
}

#[test]
#[ignore]
fn full_drain_after_backpressure_with_socket_buffer() {
    drain_after_backpressure(Drain {
        socket_buffer: Some(64 * 1024),
        ..FULL_DRAIN
    });
}

#[test]
#[ignore]
fn full_drain_after_backpressure_tls() {
    drain_after_backpressure(Drain {
        tls: true,
        ..FULL_DRAIN
    });
}

#[test]
#[ignore]
fn full_drain_after_backpressure_without_unsent_limit() {
    drain_after_backpressure(Drain {
        unsent_off: true,
        ..FULL_DRAIN
    });
}

#[test]
#[ignore]
fn full_drain_beside_haproxy() {
    drain_beside_haproxy(FULL_DRAIN, 3);
}

#[test]
#[ignore]
fn full_drain_beside_haproxy_with_socket_buffer() {
    drain_beside_haproxy(
        Drain {
            socket_buffer: Some(64 * 1024),
            ..FULL_DRAIN
        },
        3,
    );
}

#[test]
#[ignore]
fn full_drain_beside_haproxy_tls() {
    drain_beside_haproxy(
        Drain {
            tls: true,
            ..FULL_DRAIN
        },
        3,
    );
}
