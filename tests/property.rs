//! Property test of the relay: random client scripts against the real
//! reactor (in-process, real sockets on 127.0.0.1) in front of echo hosts.
//!
//! Each case is one seed. The seed picks the relay buffer sizes and, for
//! each of [`CLIENTS`] concurrent clients, a script: connect (some clients
//! with a small receive buffer and segment size, see [`Narrow`]); a
//! [`Header`] that tells the host who the client is and what to do; writes
//! of random sizes (1 B ..= 64 KiB) of random bytes, with reads of the
//! echo in between (all of it, a little of it, or none, so that echo backs
//! up into the proxy); then one [`Ending`]: graceful (FIN, then read to
//! EOF), reset (`SO_LINGER` 0 and close mid-stream), a plain close with
//! echo possibly unread, or one of two "write, then reset" endings:
//!
//! - the client writes its last bytes, waits until its own kernel's send
//!   queue is acknowledged (else its own kernel would throw them away, with
//!   or without a proxy), then resets;
//! - the host resets after echoing exactly `n` of the client's bytes, once
//!   its own send queue is acknowledged.
//!
//! Every byte a client reads must be the next byte it sent, and a graceful
//! client must get back exactly what it sent. The hosts check every byte
//! they receive against the client's data and report, per client, how many
//! arrived and how the stream ended: a graceful client's host got all of
//! it, then EOF; a client that wrote, then reset, had every byte delivered,
//! then the reset (not EOF); a client whose host reset got exactly the `n`
//! echo bytes, then the reset. Once every client is done, the proxy must
//! end every pair and hold no buffer and no host count.
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

use std::collections::HashMap;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use socket2::{Domain, Socket, Type};
use tcplb::{SendQueues, Settings};

/// Seeds checked by `cargo test` without `TCPLB_PROPERTY_CASES`.
const DEFAULT_CASES: u64 = 40;
/// Concurrent clients per case.
const CLIENTS: usize = 20;
/// Normal echo hosts behind the proxy (plus one narrow echo host).
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
/// How long a side that is about to reset waits for its peer's kernel to
/// acknowledge what it wrote (a local peer does at once, or within its
/// delayed-ACK time).
const ACK_WAIT: Duration = Duration::from_secs(10);
/// How often that wait looks at the send queue.
const ACK_POLL: Duration = Duration::from_millis(1);

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
    /// `shutdown(Write)`, then read to EOF: all the echo must arrive, and
    /// the host must have received everything, then EOF.
    Graceful,
    /// `SO_LINGER` 0 and close: the kernel sends RST.
    Reset,
    /// Close without shutdown, echo possibly unread (RST or FIN).
    Close,
    /// The last step is a write; once the client's kernel has it
    /// acknowledged, `SO_LINGER` 0 and close. The host must receive every
    /// byte, then the reset.
    WriteThenReset,
    /// The host echoes exactly this many bytes, then resets (once its own
    /// kernel has them acknowledged). The client must read exactly those,
    /// then the reset.
    HostReset(usize),
}

/// One client's part of a case, fully determined by the case seed.
#[derive(Clone, Debug)]
struct Script {
    /// Seeds the client's bytes, and names the client to the hosts.
    data_seed: u64,
    narrow: Option<Narrow>,
    steps: Vec<Step>,
    ending: Ending,
}

/// Bytes the writes of `steps` send.
fn written(steps: &[Step]) -> usize {
    steps
        .iter()
        .map(|s| match s {
            Step::Write(n) => *n,
            Step::Read(_) => 0,
        })
        .sum()
}

impl Script {
    fn sent(&self) -> usize {
        written(&self.steps)
    }

    fn header(&self) -> Header {
        Header {
            data_seed: self.data_seed,
            len: self.sent(),
            echo_limit: match self.ending {
                Ending::HostReset(n) => Some(n),
                _ => None,
            },
        }
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

/// What a client sends first (and the host does not echo): who it is, how
/// many bytes of [`data`] it will write, and whether the host resets.
#[derive(Clone, Copy, Debug)]
struct Header {
    data_seed: u64,
    len: usize,
    /// `Some(n)`: echo exactly `n` bytes, then reset.
    echo_limit: Option<usize>,
}

impl Header {
    const LEN: usize = 25;

    fn encode(self) -> [u8; Header::LEN] {
        let mut out = [0u8; Header::LEN];
        out[0] = if self.echo_limit.is_some() {
            b'R'
        } else {
            b'E'
        };
        out[1..9].copy_from_slice(&self.data_seed.to_le_bytes());
        out[9..17].copy_from_slice(&(self.len as u64).to_le_bytes());
        out[17..].copy_from_slice(&(self.echo_limit.unwrap_or(0) as u64).to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; Header::LEN]) -> Header {
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        Header {
            data_seed: word(1),
            len: word(9) as usize,
            echo_limit: (bytes[0] == b'R').then(|| word(17) as usize),
        }
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

/// An ending for `steps`; a client that writes, then resets, ends with a
/// write, and a host that resets echoes at most what the client sends.
fn ending(rng: &mut Rng, steps: &mut Vec<Step>) -> Ending {
    match rng.below(5) {
        0 => Ending::Graceful,
        1 => Ending::Reset,
        2 => Ending::Close,
        3 => {
            if !matches!(steps.last(), Some(Step::Write(_))) {
                steps.push(Step::Write(write_size(rng)));
            }
            Ending::WriteThenReset
        }
        _ => Ending::HostReset(rng.below(written(steps) + 1)),
    }
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
        let ending = ending(rng, &mut steps);
        return Script {
            data_seed,
            narrow: Some(Narrow {
                recv_buffer: 2048,
                mss: 536,
            }),
            steps,
            ending,
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
    let ending = ending(rng, &mut steps);
    Script {
        data_seed,
        narrow,
        steps,
        ending,
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

/// Polls `stream`'s send queue (every [`ACK_POLL`], for at most
/// [`ACK_WAIT`]) until its peer has acknowledged every byte written to it;
/// `meanwhile` runs between looks (a client reads owed echo there, so that
/// the round trip keeps moving).
fn until_acknowledged(
    stream: &TcpStream,
    mut meanwhile: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let local = stream
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?;
    let peer = stream.peer_addr().map_err(|e| format!("peer_addr: {e}"))?;
    let mut queues = SendQueues::new();
    let deadline = Instant::now() + ACK_WAIT;
    loop {
        let left = queues
            .unacked_between(local, peer)
            .map_err(|e| format!("sock_diag: {e}"))?;
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{left} bytes unacknowledged after {ACK_WAIT:?}"));
        }
        if !meanwhile()? {
            thread::sleep(ACK_POLL);
        }
    }
}

fn reset_on_close(stream: &TcpStream) -> Result<(), String> {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| format!("SO_LINGER: {e}"))
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
    /// The most echo the host sends: all of `sent`, or `n` for a host that
    /// resets after `n`.
    echo_limit: usize,
    /// A write failed because the host's reset had been passed on: the
    /// kernel has reported the error there, so reads end with EOF.
    write_reset: bool,
    buf: Vec<u8>,
    /// When the client connected, so that a failure tells a stall (one
    /// side timing out after [`IO_TIMEOUT`]) from a prompt error.
    connected: Instant,
}

impl Client<'_> {
    /// Echo bytes the host has yet to send back.
    fn owed(&self) -> usize {
        self.sent.min(self.echo_limit) - self.read
    }

    /// Sends the next `n` bytes. An echo client that blocks in a write
    /// while not reading can deadlock with a correct proxy (every buffer
    /// on the round trip full), so when a write would block the client
    /// reads echo, which is owed, instead of waiting. Past a resetting
    /// host's echo limit nothing is owed: the write then blocks until the
    /// host's reset ends it.
    fn write(&mut self, n: usize) -> Result<(), String> {
        let end = self.sent + n;
        while self.sent < end {
            let wait_for_reset = self.owed() == 0 && self.sent >= self.echo_limit;
            self.stream.set_nonblocking(!wait_for_reset).unwrap();
            let outcome = self.stream.write(&self.data[self.sent..end]);
            self.stream.set_nonblocking(false).unwrap();
            match outcome {
                Ok(0) => return Err(format!("write returned 0 at byte {}", self.sent)),
                Ok(k) => self.sent += k,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if wait_for_reset {
                        return Err(format!(
                            "a write blocked for {IO_TIMEOUT:?} past the host's echo, with no reset {}",
                            self.progress()
                        ));
                    }
                    let owed = self.owed();
                    if owed == 0 {
                        return Err("a write would block with no echo owed".to_string());
                    }
                    self.forced += self.receive(owed.min(self.buf.len()))?;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)
                        && self.sent >= self.echo_limit =>
                {
                    self.write_reset = true;
                    return Ok(());
                }
                Err(e) => return Err(format!("write at byte {}: {e}", self.sent)),
            }
        }
        Ok(())
    }

    /// One read of at most `max` owed echo bytes, checked against what was sent.
    fn receive(&mut self, max: usize) -> Result<usize, String> {
        match self.stream.read(&mut self.buf[..max]) {
            Ok(0) => Err(format!("EOF {}", self.progress())),
            Ok(n) => self.check(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(format!("no echo for {IO_TIMEOUT:?} {}", self.progress()))
            }
            Err(e) => Err(format!("read: {e} {}", self.progress())),
        }
    }

    /// Checks the `n` echo bytes just read into `buf`.
    fn check(&mut self, n: usize) -> Result<usize, String> {
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
        self.read_exactly(self.owed())?;
        match self.stream.read(&mut self.buf[..1]) {
            Ok(0) => Ok(()),
            Ok(_) => Err(format!("more echo than was sent {}", self.progress())),
            Err(e) => Err(format!("no EOF: {e} {}", self.progress())),
        }
    }

    /// Waits until the proxy's kernel has acknowledged every byte written
    /// (reading owed echo meanwhile), then resets.
    fn write_then_reset(&mut self) -> Result<(), String> {
        let stream = self.stream.try_clone().unwrap();
        until_acknowledged(&stream, || {
            let owed = self.owed();
            if owed == 0 {
                return Ok(false);
            }
            self.receive(owed.min(self.buf.len())).map(|_| true)
        })
        .map_err(|e| format!("before the reset: {e} {}", self.progress()))?;
        reset_on_close(&self.stream)
    }

    /// The rest of a resetting host's echo, then its reset: ECONNRESET, or
    /// EOF if a write has already reported the reset.
    fn read_until_reset(&mut self) -> Result<(), String> {
        self.read_exactly(self.owed())?;
        match self.stream.read(&mut self.buf[..1]) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            Ok(0) if self.write_reset => Ok(()),
            Ok(0) => Err(format!("EOF instead of the reset {}", self.progress())),
            Ok(_) => Err(format!(
                "more echo than the host sent before its reset {}",
                self.progress()
            )),
            Err(e) => Err(format!("no reset: {e} {}", self.progress())),
        }
    }

    fn progress(&self) -> String {
        format!(
            "after {} echo bytes of {} sent ({} read when a write would block{}), {:?} after connecting",
            self.read,
            self.sent,
            self.forced,
            if self.write_reset {
                ", a write saw the reset"
            } else {
                ""
            },
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
    let mut stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let header = script.header();
    stream
        .write_all(&header.encode())
        .map_err(|e| format!("header: {e}"))?;
    let mut client = Client {
        stream,
        data: &data,
        sent: 0,
        read: 0,
        forced: 0,
        echo_limit: header.echo_limit.unwrap_or(usize::MAX),
        write_reset: false,
        buf: vec![0; MAX_WRITE],
        connected: Instant::now(),
    };
    for (k, step) in script.steps.iter().enumerate() {
        if client.write_reset {
            break;
        }
        match *step {
            Step::Write(n) => client.write(n),
            Step::Read(n) => client.read_exactly(n.min(client.owed())),
        }
        .map_err(|e| format!("step {k} ({step:?}): {e}"))?;
    }
    match script.ending {
        Ending::Graceful => client.finish(),
        Ending::Reset => reset_on_close(&client.stream),
        Ending::Close => Ok(()),
        Ending::WriteThenReset => client.write_then_reset(),
        Ending::HostReset(_) => client.read_until_reset(),
    }
}

/// How a host's connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum End {
    Eof,
    /// A read failed with ECONNRESET, or a write did and the reads then
    /// ended with EOF.
    Reset,
    /// The host reset, as the header asked, its echo acknowledged.
    ResetSent,
    Failed(String),
}

/// What a host received from one client.
#[derive(Clone, Debug)]
struct Report {
    host: &'static str,
    /// Bytes after the header.
    received: usize,
    /// The first byte that differs from the client's data (or that is
    /// beyond what the client wrote), if any.
    mismatch: Option<usize>,
    end: End,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host {} received {} bytes", self.host, self.received)?;
        if let Some(i) = self.mismatch {
            write!(f, ", wrong from byte {i}")?;
        }
        write!(f, ", then {:?}", self.end)
    }
}

/// The hosts' reports, by the client's data seed.
#[derive(Default)]
struct Reports {
    by_seed: Mutex<HashMap<u64, Report>>,
    added: Condvar,
}

impl Reports {
    fn add(&self, seed: u64, report: Report) {
        self.by_seed.lock().unwrap().insert(seed, report);
        self.added.notify_all();
    }

    /// The report on `seed`, once a host has made it (waiting until `deadline`).
    fn wait_for(&self, seed: u64, deadline: Instant) -> Option<Report> {
        let mut by_seed = self.by_seed.lock().unwrap();
        loop {
            if let Some(report) = by_seed.get(&seed) {
                return Some(report.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            by_seed = self.added.wait_timeout(by_seed, left).unwrap().0;
        }
    }

    fn get(&self, seed: u64) -> Option<Report> {
        self.by_seed.lock().unwrap().get(&seed).cloned()
    }
}

/// An echo host that checks and reports what each client sent (see
/// [`Header`]). A `narrow` host's connections are [`Narrow`] (accepted
/// sockets inherit both options from the listener), so that the proxy's
/// writes toward it come up short early too.
fn spawn_echo_host(
    name: &'static str,
    narrow: Option<Narrow>,
    reports: Arc<Reports>,
) -> SocketAddr {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    if let Some(narrow) = narrow {
        narrow.apply(&socket).unwrap();
    }
    socket.bind(&localhost().into()).unwrap();
    socket.listen(1024).unwrap();
    let listener = TcpListener::from(socket);
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let reports = Arc::clone(&reports);
            thread::spawn(move || serve(conn, name, &reports));
        }
    });
    addr
}

/// Echoes one client's bytes (up to its echo limit), checking each, and
/// reports them: on EOF before the FIN that answers it, so that a graceful
/// client finds the report made.
fn serve(mut conn: TcpStream, host: &'static str, reports: &Reports) {
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    conn.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut head = [0u8; Header::LEN];
    // A client that reset before its header reached the proxy names no one.
    if conn.read_exact(&mut head).is_err() {
        return;
    }
    let header = Header::decode(&head);
    let expected = data(header.data_seed, header.len);
    let limit = header.echo_limit.unwrap_or(usize::MAX);
    let mut received = 0;
    let mut mismatch = None;
    let mut write_error = None;
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        let room = limit - received;
        if room == 0 {
            break match until_acknowledged(&conn, || Ok(false)) {
                Ok(()) => End::ResetSent,
                Err(e) => End::Failed(format!("before the reset: {e}")),
            };
        }
        let cap = room.min(buf.len());
        let n = match conn.read(&mut buf[..cap]) {
            Ok(0)
                if matches!(
                    write_error,
                    Some(ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)
                ) =>
            {
                break End::Reset;
            }
            Ok(0) => break End::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break End::Reset,
            Err(e) => break End::Failed(format!("read: {e}")),
        };
        if mismatch.is_none() {
            // Bytes beyond what the client wrote are wrong too.
            let want = expected
                .get(received..(received + n).min(expected.len()))
                .unwrap_or(&[]);
            mismatch = buf[..n]
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .or((want.len() < n).then_some(want.len()))
                .map(|i| received + i);
        }
        received += n;
        // Once the echo fails (the reset has been passed on), what the
        // client sent before it is still queued: keep reading it.
        if write_error.is_none() {
            if let Err(e) = conn.write_all(&buf[..n]) {
                write_error = Some(e.kind());
            }
        }
    };
    let report = Report {
        host,
        received,
        mismatch,
        end: end.clone(),
    };
    reports.add(header.data_seed, report);
    match end {
        End::Eof => {
            let _ = conn.shutdown(Shutdown::Write);
        }
        End::ResetSent => {
            let _ = reset_on_close(&conn);
        }
        _ => {}
    }
}

/// What the host of `script` must have reported, if anything is certain:
/// `Err` says what is wrong.
fn check_report(script: &Script, report: Option<Report>) -> Result<(), String> {
    let sent = script.sent();
    let (received, end) = match script.ending {
        Ending::Graceful => (sent, End::Eof),
        Ending::WriteThenReset => (sent, End::Reset),
        Ending::HostReset(n) => (n, End::ResetSent),
        // Cut mid-stream: what arrived must be a prefix.
        Ending::Reset | Ending::Close => {
            return match report {
                Some(r) if r.mismatch.is_some() => Err(format!("{r}")),
                _ => Ok(()),
            };
        }
    };
    match report {
        None => Err(format!(
            "no host reported within {IO_TIMEOUT:?} (a host reports once the header has arrived)"
        )),
        Some(r) if r.received != received || r.mismatch.is_some() || r.end != end => Err(format!(
            "{r}; expected {received} bytes, exact, then {end:?}"
        )),
        Some(_) => Ok(()),
    }
}

/// Plays one seed against `hosts`; panics with the seed and the script of
/// the failing client.
fn run_case(seed: u64, hosts: &[SocketAddr], reports: &Reports) {
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
    let deadline = Instant::now() + IO_TIMEOUT;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let script = &scripts[i];
        let failure = match outcome {
            Ok(Ok(())) => {
                let report = match script.ending {
                    Ending::Reset | Ending::Close => reports.get(script.data_seed),
                    _ => reports.wait_for(script.data_seed, deadline),
                };
                match check_report(script, report) {
                    Ok(()) => continue,
                    Err(e) => e,
                }
            }
            Ok(Err(e)) => e,
            Err(_) => "client thread panicked".to_string(),
        };
        panic!(
            "{describe}, client {i}: {failure}\n  script: {script}\n\
             replay: TCPLB_PROPERTY_SEED={seed} cargo test --test property"
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
    let reports = Arc::new(Reports::default());
    const NAMES: [&str; ECHO_HOSTS] = ["echo0", "echo1", "echo2"];
    let mut hosts: Vec<_> = NAMES
        .iter()
        .map(|name| spawn_echo_host(name, None, Arc::clone(&reports)))
        .collect();
    let narrow = Narrow {
        recv_buffer: 4096,
        mss: 536,
    };
    hosts.push(spawn_echo_host(
        "narrow",
        Some(narrow),
        Arc::clone(&reports),
    ));
    for seed in seeds {
        run_case(seed, &hosts, &reports);
    }
}
