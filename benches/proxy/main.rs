//! Benchmark harness: `cargo bench --bench proxy [-- SCENARIO...]`.
//!
//! Runs the release `tcplb` binary as a child process in front of
//! built-in upstream servers and measures it from the outside.
//!
//! Scenarios:
//! - `idle`: resident memory per idle proxied pair (5,000 pairs).

mod hosts;
mod procfs;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};

/// The tcplb binary under test, started in quick mode.
struct Tcplb {
    child: Child,
    addr: SocketAddr,
}

impl Tcplb {
    fn start(hosts: &[SocketAddr], extra: &[&str]) -> Tcplb {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tcplb"));
        cmd.args(["--listen", "127.0.0.1:0", "--max-connections", "100000"]);
        for h in hosts {
            cmd.args(["--host", &h.to_string()]);
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "warn,tcplb::proxy=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcplb");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let addr = loop {
            let mut line = String::new();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "tcplb exited");
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Tcplb { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Tcplb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Opens `pairs` connections through tcplb, each with one echoed byte so
/// every pair is fully established, and returns the RSS growth per pair.
fn idle_round(pairs: usize) -> f64 {
    let host = hosts::spawn_echo();
    let proxy = Tcplb::start(&[host], &[]);
    // Warm-up: a few connections, so start-up allocations are in the baseline.
    for _ in 0..10 {
        round_trip(&mut TcpStream::connect(proxy.addr).unwrap());
    }
    let before = procfs::rss_bytes(proxy.pid());
    let mut clients = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let mut c = TcpStream::connect(proxy.addr).unwrap();
        round_trip(&mut c);
        clients.push(c);
    }
    let after = procfs::rss_bytes(proxy.pid());
    drop(clients);
    (after.saturating_sub(before)) as f64 / pairs as f64
}

fn round_trip(c: &mut TcpStream) {
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b).unwrap();
}

fn idle() {
    const PAIRS: usize = 5000;
    const ROUNDS: usize = 5;
    let mut per_pair: Vec<f64> = (0..ROUNDS).map(|_| idle_round(PAIRS)).collect();
    let rounds: Vec<String> = per_pair.iter().map(|b| format!("{b:.0}")).collect();
    let median = median(&mut per_pair);
    println!(
        "idle: {PAIRS} idle pairs, resident memory per pair: median {median:.0} B \
         ({:.2} KiB) over {ROUNDS} rounds [{}]",
        median / 1024.0,
        rounds.join(", ")
    );
}

fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let runs = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    if runs("idle") {
        idle();
    }
}
