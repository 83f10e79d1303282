//! Property test of the relay: random client scripts against the real
//! reactor (in-process, real sockets on 127.0.0.1) in front of echo hosts.
//!
//! Each case is one seed. The seed picks the relay buffer sizes and, for
//! each of [`CLIENTS`] concurrent clients, a script: connect (some clients
//! with a small receive buffer and segment size, see [`Narrow`]); writes
//! of random sizes (1 B ..= 64 KiB) of random bytes, with reads of the
//! echo in between (all of it, a little of it, or none, so that echo backs
//! up into the proxy); then one ending: graceful (FIN, then read to EOF),
//! reset (`SO_LINGER` 0 and close mid-stream) or a plain close with echo
//! possibly unread. Every byte a client reads must be the next byte it
//! sent, and a graceful client must get back exactly what it sent. Once
//! every client is done, the proxy must end every pair and hold no buffer
//! and no host count.
//!
//! The default run (`cargo test --test property`) checks [`DEFAULT_CASES`]
//! seeds. Longer runs and replays are set by environment variables:
//!
//! ```text
//! TCPLB_PROPERTY_CASES=2000 cargo test --release --test property   # seeds 1..=2000
//! TCPLB_PROPERTY_SEED=1234  cargo test --test property              # that seed only
//! ```
//!
//! A failure names the seed, the settings and the client's script, so the
//! case replays with `TCPLB_PROPERTY_SEED` (the script is the same; the
//! interleaving of the clients is up to the scheduler).

mod common;

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use socket2::{Domain, Socket, Type};
use tcplb::Settings;

/// Seeds checked by `cargo test` without `TCPLB_PROPERTY_CASES`.
const DEFAULT_CASES: u64 = 40;
/// Concurrent clients per case.
const CLIENTS: usize = 20;
/// `Behavior::Echo` hosts behind the proxy (plus one narrow echo host).
const ECHO_HOSTS: usize = 3;
/// Most writes in an ordinary script.
const MAX_WRITES: usize = 10;
/// Largest single write.
const MAX_WRITE: usize = 64 * 1024;
/// Largest read of a slow reader.
const SLOW_READ: usize = 2048;
/// Bytes a heavy client writes without reading, at least: on loopback it
/// takes megabytes of unread echo before the proxy stops reading the host
/// and its buffer toward the host fills too (measured: about 2.5 MiB).
const HEAVY_BYTES: usize = 4 << 20;

/// Socket options that shrink a connection's capacity. Loopback sockets
/// otherwise buffer megabytes each way (64 KiB segments, autotuned
/// buffers), and the proxy's buffers would never fill: with these, the
/// proxy's writes toward a client that stops reading come up short after
/// some 40 KiB, so backpressure, partial writes and buffer compaction run.
#[derive(Clone, Copy, Debug)]
struct Narrow {
    recv_buffer: usize,
    mss: u32,
}

impl Narrow {
    fn apply(self, socket: &Socket) -> io::Result<()> {
        socket.set_recv_buffer_size(self.recv_buffer)?;
        socket.set_tcp_mss(self.mss)
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    /// Write the next `n` bytes of the client's data.
    Write(usize),
    /// Read exactly `n` bytes of echo (never more than is owed).
    Read(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// `shutdown(Write)`, then read to EOF: all the echo must arrive.
    Graceful,
    /// `SO_LINGER` 0 and close: the kernel sends RST.
    Reset,
    /// Close without shutdown, echo possibly unread (RST or FIN).
    Close,
}

/// One client's part of a case, fully determined by the case seed.
#[derive(Clone, Debug)]
struct Script {
    /// Seeds the client's bytes.
    data_seed: u64,
    narrow: Option<Narrow>,
    steps: Vec<Step>,
    ending: Ending,
}

impl Script {
    fn sent(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Write(n) => *n,
                Step::Read(_) => 0,
            })
            .sum()
    }
}

impl fmt::Display for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.narrow {
            Some(n) => write!(
                f,
                "connect (SO_RCVBUF {}, TCP_MAXSEG {})",
                n.recv_buffer, n.mss
            )?,
            None => write!(f, "connect")?,
        }
        for step in &self.steps {
            match step {
                Step::Write(n) => write!(f, ", write {n}")?,
                Step::Read(n) => write!(f, ", read {n}")?,
            }
        }
        write!(f, ", {:?} ({} bytes sent)", self.ending, self.sent())
    }
}

/// A write size between 1 B and [`MAX_WRITE`]: tiny, small and large
/// writes are equally likely, so both the normal and the bulk buffer paths
/// get their share.
fn write_size(rng: &mut Rng) -> usize {
    let cap = match rng.below(3) {
        0 => 64,
        1 => 4096,
        _ => MAX_WRITE,
    };
    1 + rng.below(cap)
}

fn script(rng: &mut Rng, data_seed: u64) -> Script {
    let narrow = (rng.below(3) == 0).then(|| Narrow {
        recv_buffer: 2048 + rng.below(6144),
        mss: 536 + rng.below(1000) as u32,
    });
    // One client in 32 pushes megabytes without reading, through a
    // narrow socket: both of its pair's buffers fill.
    if rng.below(32) == 0 {
        let mut steps = Vec::new();
        let mut sent = 0;
        while sent < HEAVY_BYTES {
            let n = 1 + rng.below(MAX_WRITE);
            steps.push(Step::Write(n));
            sent += n;
        }
        return Script {
            data_seed,
            narrow: Some(Narrow {
                recv_buffer: 2048,
                mss: 536,
            }),
            steps,
            ending: [Ending::Graceful, Ending::Reset, Ending::Close][rng.below(3)],
        };
    }
    // 0: read all echo after each write (ping-pong); 1: read a little
    // (slow reader); 2: read nothing until the ending.
    let style = rng.below(3);
    let writes = rng.below(MAX_WRITES + 1);
    let mut steps = Vec::new();
    let mut unread = 0;
    for _ in 0..writes {
        let n = write_size(rng);
        steps.push(Step::Write(n));
        unread += n;
        let read = match style {
            0 => unread,
            1 if rng.below(4) != 0 => 1 + rng.below(unread.min(SLOW_READ)),
            _ => 0,
        };
        if read > 0 {
            steps.push(Step::Read(read));
            unread -= read;
        }
    }
    Script {
        data_seed,
        narrow,
        steps,
        ending: [Ending::Graceful, Ending::Reset, Ending::Close][rng.below(3)],
    }
}

/// Relay buffer sizes for a case: tiny buffers with and without the bulk
/// upgrade, small ones, and the defaults.
fn settings(rng: &mut Rng) -> Settings {
    let (buffer_size, bulk_buffer_size) = match rng.below(4) {
        0 => (1024, 4096),
        1 => (1024, 1024),
        2 => (4096, 65536),
        _ => {
            let d = Settings::default();
            (d.buffer_size, d.bulk_buffer_size)
        }
    };
    Settings {
        buffer_size,
        bulk_buffer_size,
        ..Settings::default()
    }
}

/// The client's bytes: random, eight at a time (debug builds are slow).
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A client connection and what went through it so far.
struct Client<'a> {
    stream: TcpStream,
    data: &'a [u8],
    sent: usize,
    /// Echo bytes read (and checked).
    read: usize,
    /// Echo bytes read only because a write would have blocked.
    forced: usize,
    buf: Vec<u8>,
    /// When the client connected, so that a failure tells a stall (one
    /// side timing out after [`IO_TIMEOUT`]) from a prompt error.
    connected: Instant,
}

impl Client<'_> {
    /// Sends the next `n` bytes. An echo client that blocks in a write
    /// while not reading can deadlock with a correct proxy (every buffer
    /// on the round trip full), so when a write would block the client
    /// reads echo, which is owed, instead of waiting.
    fn write(&mut self, n: usize) -> Result<(), String> {
        let end = self.sent + n;
        while self.sent < end {
            self.stream.set_nonblocking(true).unwrap();
            let outcome = self.stream.write(&self.data[self.sent..end]);
            self.stream.set_nonblocking(false).unwrap();
            match outcome {
                Ok(0) => return Err(format!("write returned 0 at byte {}", self.sent)),
                Ok(k) => self.sent += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let owed = self.sent - self.read;
                    if owed == 0 {
                        return Err("a write would block with no echo owed".to_string());
                    }
                    self.forced += self.receive(owed.min(self.buf.len()))?;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write at byte {}: {e}", self.sent)),
            }
        }
        Ok(())
    }

    /// One read of at most `max` owed echo bytes, checked against what was sent.
    fn receive(&mut self, max: usize) -> Result<usize, String> {
        let n = match self.stream.read(&mut self.buf[..max]) {
            Ok(0) => return Err(format!("EOF {}", self.progress())),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(0),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("no echo for {IO_TIMEOUT:?} {}", self.progress()));
            }
            Err(e) => return Err(format!("read: {e} {}", self.progress())),
        };
        let sent = &self.data[self.read..self.read + n];
        if let Some(i) = self.buf[..n].iter().zip(sent).position(|(a, b)| a != b) {
            return Err(format!(
                "echo byte {} is {:#04x}, sent {:#04x} ({} bytes sent)",
                self.read + i,
                self.buf[i],
                sent[i],
                self.sent
            ));
        }
        self.read += n;
        Ok(n)
    }

    /// Reads exactly `n` echo bytes.
    fn read_exactly(&mut self, n: usize) -> Result<(), String> {
        let end = self.read + n;
        while self.read < end {
            self.receive((end - self.read).min(self.buf.len()))?;
        }
        Ok(())
    }

    /// FIN, then every owed echo byte, then EOF.
    fn finish(&mut self) -> Result<(), String> {
        self.stream
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown(Write): {e}"))?;
        self.read_exactly(self.sent - self.read)?;
        match self.stream.read(&mut self.buf[..1]) {
            Ok(0) => Ok(()),
            Ok(_) => Err(format!("more echo than was sent {}", self.progress())),
            Err(e) => Err(format!("no EOF: {e} {}", self.progress())),
        }
    }

    fn progress(&self) -> String {
        format!(
            "after {} echo bytes of {} sent ({} read when a write would block), {:?} after connecting",
            self.read,
            self.sent,
            self.forced,
            self.connected.elapsed()
        )
    }
}

/// Plays one script; an error says which step failed and how.
fn play(addr: SocketAddr, script: &Script, start: &Barrier) -> Result<(), String> {
    let data = data(script.data_seed, script.sent());
    start.wait();
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    if let Some(narrow) = script.narrow {
        narrow.apply(&socket).unwrap();
    }
    socket
        .connect(&addr.into())
        .map_err(|e| format!("connect: {e}"))?;
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut client = Client {
        stream,
        data: &data,
        sent: 0,
        read: 0,
        forced: 0,
        buf: vec![0; MAX_WRITE],
        connected: Instant::now(),
    };
    for (k, step) in script.steps.iter().enumerate() {
        match *step {
            Step::Write(n) => client.write(n),
            Step::Read(n) => client.read_exactly(n.min(client.sent - client.read)),
        }
        .map_err(|e| format!("step {k} ({step:?}): {e}"))?;
    }
    match script.ending {
        Ending::Graceful => client.finish(),
        Ending::Reset => {
            socket2::SockRef::from(&client.stream)
                .set_linger(Some(Duration::ZERO))
                .map_err(|e| format!("SO_LINGER: {e}"))?;
            Ok(())
        }
        Ending::Close => Ok(()),
    }
}

/// An echo host like `Behavior::Echo` whose connections are [`Narrow`]
/// (accepted sockets inherit both options from the listener), so that
/// the proxy's writes toward it come up short early too.
fn spawn_narrow_echo_host() -> SocketAddr {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    Narrow {
        recv_buffer: 4096,
        mss: 536,
    }
    .apply(&socket)
    .unwrap();
    socket.bind(&localhost().into()).unwrap();
    socket.listen(1024).unwrap();
    let listener = TcpListener::from(socket);
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            thread::spawn(move || {
                let _ = echo(conn);
            });
        }
    });
    addr
}

fn echo(mut conn: TcpStream) -> io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return conn.shutdown(Shutdown::Write);
        }
        conn.write_all(&buf[..n])?;
    }
}

/// Plays one seed against `hosts`; panics with the seed and the script of
/// the failing client.
fn run_case(seed: u64, hosts: &[SocketAddr]) {
    let mut rng = Rng::new(seed);
    let settings = settings(&mut rng);
    let scripts: Vec<Script> = (0..CLIENTS)
        .map(|i| script(&mut rng, (seed << 16) | i as u64))
        .collect();
    let describe = format!(
        "seed {seed} (buffer_size {}, bulk_buffer_size {})",
        settings.buffer_size, settings.bulk_buffer_size
    );
    let all_scripts = || {
        scripts
            .iter()
            .enumerate()
            .map(|(i, s)| format!("  client {i}: {s}\n"))
            .collect::<String>()
    };

    let proxy = start(config(hosts, settings));
    let start = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = scripts
        .iter()
        .cloned()
        .map(|script| {
            let start = Arc::clone(&start);
            let addr = proxy.addr;
            thread::spawn(move || play(addr, &script, &start))
        })
        .collect();
    let outcomes: Vec<_> = clients.into_iter().map(|c| c.join()).collect();
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let failure = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => "client thread panicked".to_string(),
        };
        panic!(
            "{describe}, client {i}: {failure}\n  script: {}\n\
             replay: TCPLB_PROPERTY_SEED={seed} cargo test --test property",
            scripts[i]
        );
    }

    proxy.wait_until(
        &format!("ended every pair, {describe}, scripts:\n{}", all_scripts()),
        |s| s.pairs == 0,
    );
    let stats = proxy.stats();
    assert!(
        stats.buffers_in_use == 0,
        "{describe}: buffers held after every pair ended: {stats:?}\nscripts:\n{}",
        all_scripts()
    );
    let counts = proxy.host_counts();
    assert!(
        counts.iter().all(|&c| c == 0),
        "{describe}: host counts {counts:?} after every pair ended\nscripts:\n{}",
        all_scripts()
    );
    if let Err(e) = proxy.stop() {
        panic!("{describe}: the proxy stopped with {e}");
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

#[test]
fn random_scripts_relay_byte_exact_and_release_pairs_buffers_and_hosts() {
    let seeds = match env_u64("TCPLB_PROPERTY_SEED") {
        Some(seed) => seed..=seed,
        None => 1..=env_u64("TCPLB_PROPERTY_CASES").unwrap_or(DEFAULT_CASES),
    };
    let mut hosts: Vec<_> = (0..ECHO_HOSTS)
        .map(|i| spawn_host(&format!("echo{i}"), Behavior::Echo).addr)
        .collect();
    hosts.push(spawn_narrow_echo_host());
    for seed in seeds {
        run_case(seed, &hosts);
    }
}
