//! Load generators: each drives its connections from one thread and one
//! `mio` loop, measures during a window that starts after a warm-up, and
//! samples the proxy process's CPU time at both ends of the window.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::procfs;

/// How long a run lasts: an unmeasured warm-up, then the measured window.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: Duration,
    pub window: Duration,
}

/// The proxy's CPU time over the measured window (`None` for `direct`).
struct CpuWindow {
    pid: Option<u32>,
    start: Option<f64>,
    started: bool,
}

impl CpuWindow {
    fn new(pid: Option<u32>) -> Self {
        CpuWindow {
            pid,
            start: None,
            started: false,
        }
    }

    /// Call every loop turn: reads the clock once the window has begun.
    fn tick(&mut self, now: Instant, window_start: Instant) {
        if !self.started && now >= window_start {
            self.started = true;
            self.start = self.pid.map(procfs::cpu_seconds);
        }
    }

    fn seconds(&self) -> Option<f64> {
        Some(procfs::cpu_seconds(self.pid?) - self.start?)
    }
}

#[derive(Debug)]
pub struct Throughput {
    pub bytes: u64,
    pub secs: f64,
    pub cpu: Option<f64>,
}

impl Throughput {
    pub fn gb_per_sec(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e9
    }

    /// Proxy CPU seconds per GiB relayed.
    pub fn cpu_per_gib(&self) -> Option<f64> {
        self.cpu
            .map(|c| c / (self.bytes as f64 / (1u64 << 30) as f64))
    }
}

#[derive(Debug)]
pub struct Latency {
    /// Round trips completed in the window, one sample each (nanoseconds).
    pub samples: Vec<u64>,
    pub secs: f64,
    pub errors: u64,
    /// CPU seconds the proxy used during the window.
    pub cpu: Option<f64>,
}

impl Latency {
    pub fn per_sec(&self) -> f64 {
        self.samples.len() as f64 / self.secs
    }

    /// Proxy CPU microseconds per completed round trip.
    pub fn cpu_us_each(&self) -> Option<f64> {
        self.cpu.map(|c| c * 1e6 / self.samples.len() as f64)
    }

    /// The `p`-th percentile in microseconds.
    pub fn percentile_us(&mut self, p: f64) -> f64 {
        if self.samples.is_empty() {
            return f64::NAN;
        }
        self.samples.sort_unstable();
        let rank = ((p / 100.0) * (self.samples.len() - 1) as f64).round() as usize;
        self.samples[rank] as f64 / 1e3
    }
}

/// Opens `n` connections; with `echo`, each makes one round trip first so
/// that it is known to be relayed end to end before measuring starts.
fn open(addr: SocketAddr, n: usize, echo: bool) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.set_nodelay(true).unwrap();
            if echo {
                s.write_all(b"!").unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).unwrap();
            }
            s.set_nonblocking(true).unwrap();
            TcpStream::from_std(s)
        })
        .collect()
}

/// Waits for events; an interrupted wait just returns none.
fn poll_events(poll: &mut Poll, events: &mut Events, timeout: Option<Duration>) {
    if let Err(e) = poll.poll(events, timeout) {
        assert_eq!(e.kind(), ErrorKind::Interrupted, "poll: {e}");
        events.clear();
    }
}

fn register(poll: &Poll, conns: &mut [TcpStream], interest: Interest) {
    for (i, s) in conns.iter_mut().enumerate() {
        poll.registry().register(s, Token(i), interest).unwrap();
    }
}

/// Writes a small message that a socket with an empty send buffer takes whole.
fn send(s: &mut TcpStream, msg: &[u8]) -> bool {
    let mut at = 0;
    while at < msg.len() {
        match s.write(&msg[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(_) => return false,
        }
    }
    true
}

/// Reads what is there; returns bytes read, or `None` when the connection ended.
fn drain(s: &mut TcpStream, buf: &mut [u8]) -> Option<usize> {
    let mut total = 0;
    loop {
        match s.read(buf) {
            Ok(0) => return None,
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(total),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Bulk download: `conns` connections each read a source host's endless
/// stream as fast as they can.
pub fn bulk(addr: SocketAddr, conns: usize, timing: Timing, pid: Option<u32>) -> Throughput {
    let mut poll = Poll::new().unwrap();
    let mut streams = open(addr, conns, false);
    register(&poll, &mut streams, Interest::READABLE);
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let window_start = start + timing.warmup;
    let end = window_start + timing.window;
    let mut bytes = 0u64;
    let mut cpu = CpuWindow::new(pid);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        cpu.tick(now, window_start);
        let wait = if now >= window_start {
            end - now
        } else {
            window_start - now
        };
        poll_events(&mut poll, &mut events, Some(wait));
        for event in events.iter() {
            let n = drain(&mut streams[event.token().0], &mut buf).expect("bulk stream ended");
            if now >= window_start {
                bytes += n as u64;
            }
        }
    }
    let secs = timing.window.as_secs_f64();
    Throughput {
        bytes,
        secs,
        cpu: cpu.seconds(),
    }
}

/// Keep-alive request/response: each connection sends `size` bytes and
/// waits for the echo before sending again.
pub fn ping_pong(
    addr: SocketAddr,
    conns: usize,
    size: usize,
    timing: Timing,
    pid: Option<u32>,
) -> Latency {
    let mut poll = Poll::new().unwrap();
    let mut streams = open(addr, conns, true);
    register(&poll, &mut streams, Interest::READABLE);
    let msg = vec![b'p'; size];
    let mut got = vec![0usize; conns];
    let mut sent_at = vec![Instant::now(); conns];
    for (i, s) in streams.iter_mut().enumerate() {
        assert!(send(s, &msg));
        sent_at[i] = Instant::now();
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let window_start = Instant::now() + timing.warmup;
    let end = window_start + timing.window;
    let mut samples = Vec::with_capacity(1 << 20);
    let mut errors = 0;
    let mut cpu = CpuWindow::new(pid);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        cpu.tick(now, window_start);
        poll_events(&mut poll, &mut events, Some(end - now));
        for event in events.iter() {
            let i = event.token().0;
            let Some(n) = drain(&mut streams[i], &mut buf) else {
                errors += 1;
                continue;
            };
            got[i] += n;
            if got[i] >= size {
                got[i] -= size;
                let now = Instant::now();
                if now >= window_start {
                    samples.push((now - sent_at[i]).as_nanos() as u64);
                }
                sent_at[i] = now;
                if !send(&mut streams[i], &msg) {
                    errors += 1;
                }
            }
        }
    }
    Latency {
        samples,
        secs: timing.window.as_secs_f64(),
        errors,
        cpu: cpu.seconds(),
    }
}

/// One request per connection: `concurrency` slots each connect, send
/// `size` bytes, wait for the echo, close, and start over. The sample is
/// the time from connect to the complete answer.
pub fn churn(
    addr: SocketAddr,
    concurrency: usize,
    size: usize,
    timing: Timing,
    pid: Option<u32>,
) -> Latency {
    struct Slot {
        stream: TcpStream,
        generation: usize,
        started: Instant,
        written: bool,
        got: usize,
    }
    const SLOT_BITS: u32 = 16;
    let mut poll = Poll::new().unwrap();
    let connect = |poll: &Poll, slot: usize, generation: usize| -> Slot {
        let mut stream = TcpStream::connect(addr).expect("socket");
        let token = Token(generation << SLOT_BITS | slot);
        let interest = Interest::READABLE | Interest::WRITABLE;
        poll.registry()
            .register(&mut stream, token, interest)
            .unwrap();
        Slot {
            stream,
            generation,
            started: Instant::now(),
            written: false,
            got: 0,
        }
    };
    let mut slots: Vec<Slot> = (0..concurrency).map(|i| connect(&poll, i, 0)).collect();
    let msg = vec![b'c'; size];
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let window_start = Instant::now() + timing.warmup;
    let end = window_start + timing.window;
    let mut samples = Vec::with_capacity(1 << 20);
    let mut errors = 0;
    let mut cpu = CpuWindow::new(pid);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        cpu.tick(now, window_start);
        poll_events(&mut poll, &mut events, Some(end - now));
        for event in events.iter() {
            let i = event.token().0 & ((1 << SLOT_BITS) - 1);
            let slot = &mut slots[i];
            if event.token().0 >> SLOT_BITS != slot.generation {
                continue;
            }
            let mut failed = event.is_error();
            if !failed && !slot.written && event.is_writable() {
                match slot.stream.write(&msg) {
                    Ok(n) if n == msg.len() => slot.written = true,
                    Ok(_) => failed = true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => failed = true,
                }
            }
            if !failed && slot.written {
                match drain(&mut slot.stream, &mut buf) {
                    Some(n) => slot.got += n,
                    None => failed = true,
                }
            }
            let done = slot.got >= size;
            if done {
                let now = Instant::now();
                if now >= window_start {
                    samples.push((now - slot.started).as_nanos() as u64);
                }
            }
            if failed {
                errors += 1;
            }
            if done || failed {
                let generation = (slot.generation + 1) % (1 << 20);
                slots[i] = connect(&poll, i, generation);
            }
        }
    }
    Latency {
        samples,
        secs: timing.window.as_secs_f64(),
        errors,
        cpu: cpu.seconds(),
    }
}

/// Many mostly idle connections: each sends `size` bytes every `period`
/// (evenly staggered) and waits for the echo.
pub fn trickle(
    addr: SocketAddr,
    conns: usize,
    size: usize,
    period: Duration,
    timing: Timing,
    pid: Option<u32>,
) -> Latency {
    let mut poll = Poll::new().unwrap();
    let mut streams = open(addr, conns, true);
    register(&poll, &mut streams, Interest::READABLE);
    let msg = vec![b't'; size];
    let mut got = vec![0usize; conns];
    let mut sent_at = vec![Instant::now(); conns];
    let t0 = Instant::now();
    let mut due: BinaryHeap<Reverse<(Instant, usize)>> = (0..conns)
        .map(|i| Reverse((t0 + period.mul_f64(i as f64 / conns as f64), i)))
        .collect();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let window_start = t0 + timing.warmup;
    let end = window_start + timing.window;
    let mut samples = Vec::with_capacity(1 << 20);
    let mut errors = 0;
    let mut cpu = CpuWindow::new(pid);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        cpu.tick(now, window_start);
        while let Some(Reverse((when, i))) = due.peek().copied() {
            if when > now {
                break;
            }
            due.pop();
            sent_at[i] = Instant::now();
            if !send(&mut streams[i], &msg) {
                errors += 1;
            }
        }
        let next = due
            .peek()
            .map_or(end, |Reverse((when, _))| (*when).min(end));
        poll_events(
            &mut poll,
            &mut events,
            Some(next.saturating_duration_since(now)),
        );
        for event in events.iter() {
            let i = event.token().0;
            let Some(n) = drain(&mut streams[i], &mut buf) else {
                errors += 1;
                continue;
            };
            got[i] += n;
            if got[i] >= size {
                got[i] -= size;
                let now = Instant::now();
                if now >= window_start {
                    samples.push((now - sent_at[i]).as_nanos() as u64);
                }
                due.push(Reverse(((sent_at[i] + period).max(now), i)));
            }
        }
    }
    Latency {
        samples,
        secs: timing.window.as_secs_f64(),
        errors,
        cpu: cpu.seconds(),
    }
}

/// Resident memory the proxy process gains per idle pair, in bytes: `pairs`
/// connections, each having echoed one byte, then left idle.
pub fn idle_memory(addr: SocketAddr, pairs: usize, pid: u32) -> f64 {
    // Warm-up, so start-up allocations are in the baseline.
    drop(open(addr, 10, true));
    let before = procfs::rss_bytes(pid);
    let conns = open(addr, pairs, true);
    let after = procfs::rss_bytes(pid);
    drop(conns);
    after.saturating_sub(before) as f64 / pairs as f64
}
