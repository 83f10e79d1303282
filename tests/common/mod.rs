//! Shared pieces of the integration tests: real hosts on 127.0.0.1:0, an
//! in-process proxy run on its own thread, and the real binary as a child
//! process. Everything binds port 0 and passes the real address back.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tcplb::{Config, Handle, Proxy, Relay, Settings, Stats, UpstreamConfig};

/// Upper bound on any single blocking socket operation in tests, so a
/// broken proxy fails the test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// What a test host does with each connection.
#[derive(Clone, Copy, Debug)]
pub enum Behavior {
    /// Echo every byte; on EOF shut down the write side and finish.
    Echo,
    /// Write `name\n`, then echo.
    Named,
    /// Accept and hold the connection open, reading and discarding.
    Hold,
}

/// A test host: a listener on 127.0.0.1:0 served by threads.
pub struct TestHost {
    pub addr: SocketAddr,
    pub name: String,
    /// Receives one message per accepted connection.
    pub accepted: mpsc::Receiver<()>,
}

pub fn spawn_host(name: &str, behavior: Behavior) -> TestHost {
    spawn_host_with(name, behavior, HostSockets::default())
}

/// How a test host sets up its connections.
#[derive(Clone, Copy, Debug)]
pub struct HostSockets {
    /// How long a read may wait (a host's threads end by themselves once a
    /// test leaves them idle).
    pub read_timeout: Duration,
    /// `SO_SNDBUF` and `SO_RCVBUF` of each connection, instead of the
    /// kernel's autotuning.
    pub buffer: Option<usize>,
}

impl Default for HostSockets {
    fn default() -> Self {
        HostSockets {
            read_timeout: IO_TIMEOUT,
            buffer: None,
        }
    }
}

pub fn spawn_host_with(name: &str, behavior: Behavior, sockets: HostSockets) -> TestHost {
    serve_on(
        TcpListener::bind(localhost()).unwrap(),
        name,
        behavior,
        sockets,
    )
}

/// Test hosts on one port of several loopback addresses (127.0.0.2,
/// `::1`, ...), as the addresses of one name are: each `(ip, name)` gets
/// a host on the same port, the first port free on all of them.
pub fn spawn_hosts_on_one_port(hosts: &[(IpAddr, &str)], behavior: Behavior) -> Vec<TestHost> {
    for _ in 0..100 {
        let first = TcpListener::bind(SocketAddr::new(hosts[0].0, 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for (ip, _) in &hosts[1..] {
            match TcpListener::bind(SocketAddr::new(*ip, port)) {
                Ok(l) => listeners.push(l),
                Err(_) => break,
            }
        }
        if listeners.len() == hosts.len() {
            return listeners
                .into_iter()
                .zip(hosts)
                .map(|(l, (_, name))| serve_on(l, name, behavior, HostSockets::default()))
                .collect();
        }
    }
    panic!("no port free on all of {hosts:?}");
}

fn serve_on(
    listener: TcpListener,
    name: &str,
    behavior: Behavior,
    sockets: HostSockets,
) -> TestHost {
    let addr = listener.local_addr().unwrap();
    let (tx, accepted) = mpsc::channel();
    let host_name = name.to_string();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let _ = tx.send(());
            let name = host_name.clone();
            thread::spawn(move || {
                let _ = serve(conn, &name, behavior, sockets);
            });
        }
    });
    TestHost {
        addr,
        name: name.to_string(),
        accepted,
    }
}

fn serve(
    mut conn: TcpStream,
    name: &str,
    behavior: Behavior,
    sockets: HostSockets,
) -> io::Result<()> {
    conn.set_read_timeout(Some(sockets.read_timeout))?;
    if let Some(size) = sockets.buffer {
        let socket = socket2::SockRef::from(&conn);
        socket.set_send_buffer_size(size)?;
        socket.set_recv_buffer_size(size)?;
    }
    if let Behavior::Named = behavior {
        conn.write_all(format!("{name}\n").as_bytes())?;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        if n == 0 {
            return conn.shutdown(Shutdown::Write);
        }
        if !matches!(behavior, Behavior::Hold) {
            conn.write_all(&buf[..n])?;
        }
    }
}

/// Ports held bound (never listening) for the life of the test process.
static DEAD_PORTS: std::sync::Mutex<Vec<socket2::Socket>> = std::sync::Mutex::new(Vec::new());

/// An address on which nothing listens, and nothing will: connects to it
/// are refused. Its port stays bound, without listening, for the rest of
/// the test process: a port that was merely freed can be handed to the
/// next `bind(127.0.0.1:0)` of a test running beside, and the "dead" host
/// would then answer (health checks saw such a host come up).
pub fn dead_addr() -> SocketAddr {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&localhost().into()).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    DEAD_PORTS.lock().unwrap().push(socket);
    addr
}

/// A listener whose accept queue is full, so further SYNs go unanswered:
/// connects to it hang until the connector gives up. Keep it alive while used.
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<TcpStream>,
}

pub fn black_hole() -> BlackHole {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&localhost().into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    // Fill the queue; with backlog 0 Linux queues one connection, then drops SYNs.
    let mut fillers = Vec::new();
    for _ in 0..2 {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        fillers.push(TcpStream::from(s));
    }
    // Wait until the kernel has queued the first one (the handshake is local).
    let probe = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let _ = probe.connect_timeout(&addr.into(), Duration::from_millis(300));
    BlackHole {
        addr,
        _listener: socket,
        _fillers: fillers,
    }
}

pub fn config(hosts: &[SocketAddr], settings: Settings) -> Config {
    Config {
        settings,
        upstreams: vec![UpstreamConfig {
            name: "test".to_string(),
            listen: localhost(),
            hosts: hosts.iter().map(|&h| h.into()).collect(),
            names: Vec::new(),
            tls: false,
            health: Default::default(),
            refusal: Default::default(),
            queue_timeout: None,
            max_queued: None,
            send_proxy: None,
            accept_proxy: Vec::new(),
        }],
        tls: None,
        clients: Vec::new(),
        admin: None,
        cluster: None,
        warnings: Vec::new(),
    }
}

/// A proxy running on its own thread; stopped (and joined) on drop.
pub struct Running {
    pub addr: SocketAddr,
    /// Every upstream's listen address, in config order (`addr` is the first).
    pub addrs: Vec<SocketAddr>,
    pub handle: Handle,
    thread: Option<JoinHandle<Result<(), tcplb::Error>>>,
}

/// The number of workers the in-process tests run with: 1, or
/// `TCPLB_TEST_WORKERS` (CI runs the behaviour tests again with 2).
pub fn test_workers() -> usize {
    std::env::var("TCPLB_TEST_WORKERS")
        .map_or(1, |n| n.parse().expect("TCPLB_TEST_WORKERS is a number"))
}

/// The relay mode the tests run with, if `TCPLB_TEST_RELAY` names one
/// (CI runs the relay, reset, timeout, property, reliability, PROXY
/// protocol and weights tests again with `splice` and with `copy`);
/// without it, the config's.
pub fn test_relay() -> Option<Relay> {
    let name = std::env::var("TCPLB_TEST_RELAY")
        .ok()
        .filter(|n| !n.is_empty())?;
    Some(Relay::from_name(&name).expect("TCPLB_TEST_RELAY is auto, splice or copy"))
}

/// `--relay MODE` for a tcplb binary, when `TCPLB_TEST_RELAY` names one.
pub fn relay_args() -> Vec<String> {
    test_relay().map_or(Vec::new(), |relay| {
        vec!["--relay".to_string(), relay.name().to_string()]
    })
}

/// `config` with the workers and the relay mode the tests run with,
/// unless it set its own.
pub fn with_test_settings(mut config: Config) -> Config {
    if config.settings.workers == 1 {
        config.settings.workers = test_workers();
    }
    if config.settings.relay == Relay::default() {
        config.settings.relay = test_relay().unwrap_or_default();
    }
    config
}

pub fn start(config: Config) -> Running {
    start_as_given(with_test_settings(config))
}

/// `start` with exactly the workers and relay mode `config` names,
/// whatever `TCPLB_TEST_WORKERS` and `TCPLB_TEST_RELAY` say.
pub fn start_as_given(config: Config) -> Running {
    let proxy = Proxy::bind(&config).unwrap();
    let addr = proxy.listen_addr(&config.upstreams[0].name).unwrap();
    let addrs = config
        .upstreams
        .iter()
        .map(|u| proxy.listen_addr(&u.name).unwrap())
        .collect();
    let handle = proxy.handle();
    let thread = thread::spawn(move || proxy.run());
    Running {
        addr,
        addrs,
        handle,
        thread: Some(thread),
    }
}

impl Running {
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    }

    pub fn stats(&self) -> Stats {
        self.handle.stats().expect("proxy is running")
    }

    /// Active connection count per host, in config order.
    pub fn host_counts(&self) -> Vec<u32> {
        self.stats().upstreams[0]
            .hosts
            .iter()
            .map(|h| h.active)
            .collect()
    }

    /// Waits (bounded) until the loop's counters satisfy `done`. For events
    /// the test cannot observe itself, such as the loop noticing a reset.
    pub fn wait_until(&self, what: &str, done: impl Fn(&Stats) -> bool) {
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        loop {
            let stats = self.stats();
            if done(&stats) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never {what}: {stats:?}"
            );
            thread::yield_now();
        }
    }

    /// Graceful stop; returns what `run` returned.
    pub fn stop(mut self) -> Result<(), tcplb::Error> {
        self.handle.shutdown();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.handle.shutdown();
            self.handle.shutdown();
            let _ = thread.join();
        }
    }
}

/// Reads one `\n`-terminated line byte by byte (so nothing after it is consumed).
pub fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            // A socket with a read timeout returns EINTR when the process
            // is stopped and continued (a loaded machine, a debugger).
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "reading a line: {e} (got {:?})",
                String::from_utf8_lossy(&line)
            ),
        }
    }
    String::from_utf8(line).unwrap()
}

/// How a connection that its peer closed ends for a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// A FIN: the read returned 0.
    Eof,
    /// A reset.
    Reset,
}

/// Reads from `s` until the peer closes it, waiting at most `within`: a
/// read that times out, or data, fails the test (a connection left open
/// must not pass for one that was closed).
pub fn closed_within(s: &mut TcpStream, within: Duration) -> Closed {
    s.set_read_timeout(Some(within)).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let mut outcome = s.read(&mut buf);
    while matches!(&outcome, Err(e) if e.kind() == io::ErrorKind::Interrupted) {
        let left = within
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        outcome = s.read(&mut buf);
    }
    match outcome {
        Ok(0) => Closed::Eof,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Closed::Reset,
        other => panic!(
            "not closed within {within:?}: {other:?} after {:?}",
            started.elapsed()
        ),
    }
}

/// Asserts that `outcome` is the error of a connection the peer refused
/// or closed (a TLS alert, EOF, a reset), not of one that timed out.
pub fn assert_refused<T>(outcome: &io::Result<T>, what: &str) {
    match outcome {
        Ok(_) => panic!("{what}: not refused"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{what}: timed out instead of being refused: {e}"
        ),
    }
}

/// Reads until EOF.
pub fn read_to_end(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// Closes a client gracefully and waits for the proxy's FIN: once the
/// client sees EOF, the proxy has ended the pair (the pair's end and the
/// FIN happen in the same loop turn), so its counters are already released.
pub fn finish(mut s: TcpStream) {
    s.shutdown(Shutdown::Write).unwrap();
    let mut sink = Vec::new();
    s.read_to_end(&mut sink).unwrap();
}

/// A deterministic pseudo-random byte stream (xorshift), so failures are reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// The tcplb binary as a child process; killed on drop.
pub struct Binary {
    pub child: Child,
    pub stderr: mpsc::Receiver<String>,
}

impl Binary {
    /// Starts `tcplb ARGS` with info logging, stderr lines forwarded to a channel.
    pub fn start(args: &[&str]) -> Binary {
        Binary::spawn(Command::new(env!("CARGO_BIN_EXE_tcplb")).args(args))
    }

    /// Starts `tcplb ARGS` limited to `nofile` open descriptors.
    pub fn start_limited(nofile: usize, args: &[&str]) -> Binary {
        let limit = format!("--nofile={nofile}:{nofile}");
        let mut cmd = Command::new("prlimit");
        cmd.args([limit.as_str(), "--", env!("CARGO_BIN_EXE_tcplb")])
            .args(args);
        Binary::spawn(&mut cmd)
    }

    /// Starts `WRAPPER... tcplb ARGS` (a tool that runs tcplb as its child,
    /// such as strace).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Binary {
        let mut cmd = Command::new(wrapper[0]);
        cmd.args(&wrapper[1..])
            .arg(env!("CARGO_BIN_EXE_tcplb"))
            .args(args);
        Binary::spawn(&mut cmd)
    }

    /// The process ids of the process's children.
    pub fn children(&self) -> Vec<u32> {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    }

    fn spawn(cmd: &mut Command) -> Binary {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, stderr) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Binary { child, stderr }
    }

    /// Waits for a stderr line containing `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str) -> String {
        self.log_until(needle).pop().unwrap()
    }

    /// Waits for a stderr line containing `needle`; returns the lines up to
    /// and including it.
    pub fn log_until(&self, needle: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            match self.stderr.recv_timeout(IO_TIMEOUT) {
                Ok(line) => {
                    let found = line.contains(needle);
                    lines.push(line);
                    if found {
                        return lines;
                    }
                }
                Err(e) => panic!("no log line containing {needle:?}: {e}"),
            }
        }
    }

    /// Waits for the start-up line of the upstream and returns its listen address.
    pub fn listen_addr(&self) -> SocketAddr {
        addr_after(&self.wait_for_log("listening on "), "listening on ")
    }

    /// Waits for the start-up line of upstream `name` and returns its address.
    pub fn listen_addr_of(&self, name: &str) -> SocketAddr {
        let line = self.wait_for_log(&format!("upstream `{name}` listening on "));
        addr_after(&line, "listening on ")
    }

    /// The admin listener's address, once it is logged.
    pub fn admin_addr(&self) -> SocketAddr {
        addr_after(&self.wait_for_log("admin listening on "), "listening on ")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        self.fds().len()
    }

    /// The numbers of the process's open file descriptors.
    pub fn fds(&self) -> Vec<usize> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (bounded) for the process to exit; returns its exit code and
    /// the stderr lines not read yet. The end of stderr marks the exit.
    pub fn wait(&mut self) -> (Option<i32>, Vec<String>) {
        let mut lines = Vec::new();
        loop {
            match self.stderr.recv_timeout(IO_TIMEOUT) {
                Ok(line) => lines.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("tcplb did not exit"),
            }
        }
        (self.child.wait().unwrap().code(), lines)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub mod dns;
pub mod haproxy;
pub mod pki;

/// The address that follows `marker` in a log line.
pub fn addr_after(line: &str, marker: &str) -> SocketAddr {
    let rest = line.split(marker).nth(1).unwrap();
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// The kernel's receive and send buffer sizes (`rb`, `tb` in bytes) of each
/// established TCP socket an `ss` filter matches, e.g. `src 127.0.0.1:8080`.
pub fn kernel_buffers(filter: &str) -> Vec<(u64, u64)> {
    let out = Command::new("ss")
        .args(["-tmnH", "state", "established"])
        .args(filter.split_whitespace())
        .output()
        .expect("`ss` (from iproute2) runs");
    assert!(out.status.success(), "ss {filter}: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.trim().is_empty() || text.contains("skmem:("),
        "ss printed sockets without their memory (is inet_diag missing?):\n{text}"
    );
    text.split("skmem:(")
        .skip(1)
        .map(|rest| {
            let fields = rest.split(')').next().unwrap();
            let field = |name: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(name)?.parse().ok())
                    .unwrap_or_else(|| panic!("no {name} in skmem:({fields})"))
            };
            (field("rb"), field("tb"))
        })
        .collect()
}

/// What the kernel counts of the established TCP socket from `local` to
/// `peer`, as `ss -ti` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketCounts {
    /// Arrived, not read by the socket's owner (`Recv-Q`).
    pub unread: u64,
    /// Written by the owner, not acknowledged by the peer (`Send-Q`).
    pub unacked: u64,
    /// Data received since the connection was set up (`bytes_received`).
    pub received: u64,
    /// Data the peer acknowledged (`bytes_acked`; on an accepted socket
    /// only data, on a connecting one the SYN too).
    pub acked: u64,
}

impl SocketCounts {
    /// What the owner has read so far.
    pub fn read(&self) -> u64 {
        self.received - self.unread
    }

    /// What the owner of an accepted socket has written so far.
    pub fn written(&self) -> u64 {
        self.acked + self.unacked
    }
}

pub fn socket_counts(local: SocketAddr, peer: SocketAddr) -> SocketCounts {
    let out = Command::new("ss")
        .args(["-tinH", "state", "established"])
        .args(["src", &local.to_string(), "dst", &peer.to_string()])
        .output()
        .expect("`ss` (from iproute2) runs");
    assert!(out.status.success(), "ss: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(
        words.len() > 4 && text.matches(&peer.to_string()).count() == 1,
        "one socket {local} -> {peer}: {text:?}"
    );
    // ss leaves out a counter that is zero.
    let counter = |name: &str| {
        words
            .iter()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix(':')?.parse().ok())
            .unwrap_or(0)
    };
    SocketCounts {
        unread: words[0].parse().unwrap(),
        unacked: words[1].parse().unwrap(),
        received: counter("bytes_received"),
        acked: counter("bytes_acked"),
    }
}

/// A host that writes `payload` to its first connection as fast as its
/// kernel takes it, counting what the kernel took; it starts once it has
/// read one byte from the client (so nothing it sends is mistaken for
/// what came before, such as a TLS handshake), and closes once the
/// client has finished.
pub struct StreamingHost {
    pub addr: SocketAddr,
    /// Bytes the host's writes have handed to its kernel so far.
    pub written: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// tcplb's end of the connection, once accepted.
    pub peer: mpsc::Receiver<SocketAddr>,
}

pub fn spawn_streaming_host(payload: std::sync::Arc<Vec<u8>>) -> StreamingHost {
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = written.clone();
    let (tx, peer) = mpsc::channel();
    thread::spawn(move || {
        let (mut conn, from) = listener.accept().unwrap();
        tx.send(from).unwrap();
        let mut go = [0u8; 1];
        if conn.read_exact(&mut go).is_err() {
            return;
        }
        let mut at = 0;
        while at < payload.len() {
            let end = payload.len().min(at + (64 << 10));
            let Ok(n) = conn.write(&payload[at..end]) else {
                return;
            };
            at += n;
            counter.store(at, Ordering::SeqCst);
        }
        // Open until the client finishes, so a stream that did not stall
        // shows as one that reached its end.
        let _ = conn.read(&mut go);
    });
    StreamingHost {
        addr,
        written,
        peer,
    }
}

/// A one-way stream from a host through tcplb to a client that reads
/// nothing, seen from outside tcplb: what the host wrote, and the
/// kernel's counts of tcplb's two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Handed to the host's kernel.
    pub written: u64,
    /// tcplb's socket to the host.
    pub from_host: SocketCounts,
    /// tcplb's socket to the client.
    pub to_client: SocketCounts,
}

impl Backlog {
    /// What tcplb has read from the host and not written to the client:
    /// what it holds in its own memory. Over TLS, what it wrote is
    /// records (a little more than the plaintext they carry), counted
    /// from `written_before` (the handshake's bytes).
    pub fn held_by_tcplb(&self, written_before: u64) -> i64 {
        self.from_host.read() as i64 - (self.to_client.written() - written_before) as i64
    }
}

/// Samples the [`Backlog`] of `host`'s stream to the client at
/// `client` (its local address, tcplb's listen address) until nothing
/// has moved for 300 ms, and returns it: the stream is stalled then, and
/// the figures are one consistent picture.
pub fn stalled_backlog(
    host: &StreamingHost,
    tcplb_end: SocketAddr,
    client: (SocketAddr, SocketAddr),
) -> Backlog {
    let sample = || Backlog {
        written: host.written.load(std::sync::atomic::Ordering::SeqCst) as u64,
        from_host: socket_counts(tcplb_end, host.addr),
        to_client: socket_counts(client.1, client.0),
    };
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let mut last = sample();
    let mut quiet = 0;
    while quiet < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stream never stalled: {last:?}"
        );
        thread::sleep(Duration::from_millis(100));
        let now = sample();
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    last
}
