//! Benchmark harness: `cargo bench --bench proxy [-- SCENARIO...]`.
//!
//! Starts each contender (no proxy, tcplb's release binary, tokio proxies,
//! and HAProxy and nginx when installed) as its own process in front of the
//! same built-in upstream servers, drives it with built-in load generators,
//! and measures it from the outside (`/proc/<pid>`). Contenders alternate
//! within each round; the report gives the median over rounds and each
//! contender's ratio to tcplb, in `target/bench/results.{md,csv,svg}`.
//!
//! Scenarios: `bulk` (one stream, and 8 in parallel), `rr` (50 keep-alive
//! connections ping-ponging 64 bytes), `churn` (a new connection per
//! 64-byte request, 20 at a time), `idle` (5,000 idle pairs: memory per
//! pair), `scale` (8,000 connections trickling 64-byte messages).
//!
//! Environment: `TCPLB_BENCH_ROUNDS` (default 3), `TCPLB_BENCH_SECS`
//! (measured seconds per run, default 3), `TCPLB_BENCH_ONLY` (comma-separated
//! contender names), `TCPLB_BENCH_TCPLB_ARGS` (extra flags for tcplb).

mod contenders;
mod hosts;
mod load;
mod procfs;
mod report;
mod tokio_proxy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use contenders::Contender;
use load::Timing;
use report::{Results, Row};

/// (contender, scenario, metric) -> one value per round.
type Samples = HashMap<(&'static str, &'static str, &'static str), Vec<f64>>;

#[derive(Clone, Copy)]
struct Metric {
    scenario: &'static str,
    name: &'static str,
    unit: &'static str,
    higher_is_better: bool,
}

const fn metric(
    scenario: &'static str,
    name: &'static str,
    unit: &'static str,
    higher: bool,
) -> Metric {
    Metric {
        scenario,
        name,
        unit,
        higher_is_better: higher,
    }
}

const METRICS: &[Metric] = &[
    metric("bulk-1", "throughput", "GB/s", true),
    metric("bulk-1", "proxy CPU", "s/GiB", false),
    metric("bulk-8", "throughput", "GB/s", true),
    metric("bulk-8", "proxy CPU", "s/GiB", false),
    metric("rr-50", "requests", "req/s", true),
    metric("rr-50", "p50", "µs", false),
    metric("rr-50", "p99", "µs", false),
    metric("rr-50", "proxy CPU", "µs/req", false),
    metric("churn-20", "connections", "conn/s", true),
    metric("churn-20", "p99", "µs", false),
    metric("churn-20", "proxy CPU", "µs/conn", false),
    metric("idle-5000", "memory per pair", "B", false),
    metric("scale-8000", "messages", "msg/s", true),
    metric("scale-8000", "p99", "µs", false),
    metric("scale-8000", "proxy CPU", "µs/msg", false),
];

struct Bench {
    timing: Timing,
    echo: Vec<SocketAddr>,
    source: Vec<SocketAddr>,
    samples: Samples,
}

impl Bench {
    fn record(
        &mut self,
        contender: Contender,
        scenario: &'static str,
        name: &'static str,
        value: Option<f64>,
    ) {
        let Some(value) = value.filter(|v| v.is_finite()) else {
            return;
        };
        let key = (contender.name(), scenario, name);
        self.samples.entry(key).or_default().push(value);
    }

    fn run(&mut self, scenario: &str, c: Contender) {
        let t = self.timing;
        match scenario {
            "bulk" => {
                for (label, conns) in [("bulk-1", 1), ("bulk-8", 8)] {
                    let proxy = c.start(&self.source);
                    let r = load::bulk(proxy.addr, conns, t, proxy.pid);
                    eprintln!(
                        "  {label} {:<9} {:.2} GB/s, cpu {:?} s/GiB",
                        c.name(),
                        r.gb_per_sec(),
                        r.cpu_per_gib()
                    );
                    self.record(c, label, "throughput", Some(r.gb_per_sec()));
                    self.record(c, label, "proxy CPU", r.cpu_per_gib());
                }
            }
            "rr" => {
                let proxy = c.start(&self.echo);
                let mut r = load::ping_pong(proxy.addr, 50, 64, t, proxy.pid);
                let (p50, p99) = (r.percentile_us(50.0), r.percentile_us(99.0));
                eprintln!(
                    "  rr-50 {:<9} {:.0} req/s p50 {p50:.0} µs p99 {p99:.0} µs cpu {:.1?} µs/req (errors {})",
                    c.name(),
                    r.per_sec(),
                    r.cpu_us_each(),
                    r.errors
                );
                self.record(c, "rr-50", "requests", Some(r.per_sec()));
                self.record(c, "rr-50", "p50", Some(p50));
                self.record(c, "rr-50", "p99", Some(p99));
                self.record(c, "rr-50", "proxy CPU", r.cpu_us_each());
            }
            "churn" => {
                let proxy = c.start(&self.echo);
                let mut r = load::churn(proxy.addr, 20, 64, t, proxy.pid);
                let p99 = r.percentile_us(99.0);
                eprintln!(
                    "  churn-20 {:<9} {:.0} conn/s p99 {p99:.0} µs cpu {:.1?} µs/conn (errors {})",
                    c.name(),
                    r.per_sec(),
                    r.cpu_us_each(),
                    r.errors
                );
                self.record(c, "churn-20", "connections", Some(r.per_sec()));
                self.record(c, "churn-20", "p99", Some(p99));
                self.record(c, "churn-20", "proxy CPU", r.cpu_us_each());
            }
            "idle" => {
                let proxy = c.start(&self.echo);
                let Some(pid) = proxy.pid else { return };
                let per_pair = load::idle_memory(proxy.addr, 5000, pid);
                eprintln!("  idle-5000 {:<9} {per_pair:.0} B/pair", c.name());
                self.record(c, "idle-5000", "memory per pair", Some(per_pair));
            }
            "scale" => {
                let proxy = c.start(&self.echo);
                let timing = Timing {
                    warmup: Duration::from_secs(1),
                    window: t.window,
                };
                let mut r = load::trickle(
                    proxy.addr,
                    8000,
                    64,
                    Duration::from_millis(500),
                    timing,
                    proxy.pid,
                );
                let p99 = r.percentile_us(99.0);
                eprintln!(
                    "  scale-8000 {:<9} {:.0} msg/s p99 {p99:.0} µs (errors {})",
                    c.name(),
                    r.per_sec(),
                    r.errors
                );
                self.record(c, "scale-8000", "messages", Some(r.per_sec()));
                self.record(c, "scale-8000", "p99", Some(p99));
                self.record(c, "scale-8000", "proxy CPU", r.cpu_us_each());
            }
            other => panic!("unknown scenario {other}"),
        }
    }
}

fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[v.len() / 2])
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), Linux {}", kernel.trim())
}

fn today() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--tokio-proxy") {
        let hosts = args[3..].iter().map(|h| h.parse().unwrap()).collect();
        tokio_proxy::run(&args[2], hosts);
    }
    let all_scenarios = ["bulk", "rr", "churn", "idle", "scale"];
    let wanted: Vec<&str> = args[1..]
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let scenarios: Vec<&str> = all_scenarios
        .iter()
        .copied()
        .filter(|s| wanted.is_empty() || wanted.contains(s))
        .collect();
    let only = std::env::var("TCPLB_BENCH_ONLY").ok();
    let mut notes = Vec::new();
    let contenders: Vec<Contender> = contenders::ALL
        .into_iter()
        .filter(|c| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == c.name()))
        })
        .filter(|c| match c.available() {
            Ok(()) => true,
            Err(why) => {
                eprintln!("{why}");
                notes.push(why);
                false
            }
        })
        .collect();
    let rounds = env_number("TCPLB_BENCH_ROUNDS", 3) as usize;
    let timing = Timing {
        warmup: Duration::from_millis(500),
        window: Duration::from_secs(env_number("TCPLB_BENCH_SECS", 3)),
    };
    let mut bench = Bench {
        timing,
        echo: hosts::spawn(hosts::Kind::Echo, 2),
        source: hosts::spawn(hosts::Kind::Source, 2),
        samples: HashMap::new(),
    };
    for round in 0..rounds {
        for scenario in &scenarios {
            eprintln!("round {}/{rounds}: {scenario}", round + 1);
            // Alternate who goes first, so no contender always meets a
            // cold (or a warm) machine.
            let mut order = contenders.clone();
            let shift = round % order.len().max(1);
            order.rotate_left(shift);
            for c in order {
                bench.run(scenario, c);
            }
        }
    }

    let rows: Vec<Row> = METRICS
        .iter()
        .filter(|m| scenarios.iter().any(|s| m.scenario.starts_with(s)))
        .map(|m| Row {
            scenario: m.scenario.to_string(),
            metric: m.name.to_string(),
            unit: m.unit.to_string(),
            higher_is_better: m.higher_is_better,
            values: contenders
                .iter()
                .map(|c| {
                    let key = (c.name(), m.scenario, m.name);
                    bench.samples.get(&key).and_then(|v| median(v))
                })
                .collect(),
        })
        .collect();
    notes.push(format!(
        "{} measured seconds per run after {} ms warm-up; each contender is a separate process; \
         load generators and upstream servers run in the benchmark process on the same machine.",
        timing.window.as_secs(),
        timing.warmup.as_millis()
    ));
    let results = Results {
        title: "tcplb benchmark".to_string(),
        date: today(),
        machine: machine(),
        rounds,
        contenders: contenders.iter().map(|c| c.name().to_string()).collect(),
        reference: "tcplb".to_string(),
        notes,
        rows,
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let markdown = report::write_all(&results, &dir).expect("write results");
    println!("{markdown}");
    println!("(saved in {}/results.{{md,csv,svg}})", dir.display());
}
