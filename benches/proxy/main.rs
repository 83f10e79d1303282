//! Benchmark harness: `cargo bench --bench proxy [-- SCENARIO...]`.
//!
//! Starts each contender (no proxy, tcplb's release binary at one and two
//! workers, tokio proxies with 8 KiB and 64 KiB buffers, and HAProxy and
//! nginx at their defaults, tuned, and with two threads or workers, when
//! installed) as its own process in front of the same built-in upstream
//! servers, drives it with built-in load generators, and measures it from
//! the outside (`/proc/<pid>`, summed over its child processes).
//! Contenders alternate within each round; the report gives each figure's
//! median over rounds with its min–max, and each contender's ratio to tcplb
//! taken per round, in `target/bench/results.{md,csv,svg}`, with every
//! contender's exact configuration.
//!
//! Scenarios: `bulk` (one stream, and 8 in parallel), `rr` (50 keep-alive
//! connections ping-ponging 64 bytes), `churn` (a new connection per
//! 64-byte request, 20 at a time), `idle` (5,000 idle pairs: memory per
//! pair), `scale` (8,000 connections trickling 64-byte messages). Only
//! when named, where the tools are installed: `iperf3` (iperf3 -R through
//! the proxy, 1 and 8 streams) and `redis` (redis-benchmark GETs through
//! the proxy to redis-server, 50 keep-alive clients, and 20 with a new
//! connection per request).
//!
//! Environment: `TCPLB_BENCH_ROUNDS` (default 3), `TCPLB_BENCH_SECS`
//! (measured seconds per run, default 3), `TCPLB_BENCH_ONLY` (comma-separated
//! contender names), `TCPLB_BENCH_TCPLB_ARGS` (extra flags for tcplb),
//! `TCPLB_BENCH_BASELINE` (another tcplb binary, run as `tcplb-baseline`),
//! `TCPLB_BENCH_PIN=1` (the proxy on core 1 under `taskset -c 1`, this
//! process and everything it starts on core 0).

mod contenders;
mod external;
mod hosts;
mod load;
mod procfs;
mod report;
mod tokio_proxy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use contenders::{Contender, Pin, Running};
use load::Timing;
use report::{Results, Row};

/// (contender, scenario, metric) -> one value per round (`None` where that
/// round measured nothing).
type Samples = HashMap<(&'static str, &'static str, &'static str), Vec<Option<f64>>>;

#[derive(Clone, Copy)]
struct Metric {
    /// The scenario name on the command line that measures it.
    group: &'static str,
    scenario: &'static str,
    name: &'static str,
    unit: &'static str,
    higher_is_better: bool,
}

const fn metric(
    group: &'static str,
    scenario: &'static str,
    name: &'static str,
    unit: &'static str,
    higher: bool,
) -> Metric {
    Metric {
        group,
        scenario,
        name,
        unit,
        higher_is_better: higher,
    }
}

const METRICS: &[Metric] = &[
    metric("bulk", "bulk-1", "throughput", "GB/s", true),
    metric("bulk", "bulk-1", "proxy CPU", "s/GiB", false),
    metric("bulk", "bulk-8", "throughput", "GB/s", true),
    metric("bulk", "bulk-8", "proxy CPU", "s/GiB", false),
    metric("rr", "rr-50", "requests", "req/s", true),
    metric("rr", "rr-50", "p50", "µs", false),
    metric("rr", "rr-50", "p99", "µs", false),
    metric("rr", "rr-50", "proxy CPU", "µs/req", false),
    metric("churn", "churn-20", "connections", "conn/s", true),
    metric("churn", "churn-20", "p99", "µs", false),
    metric("churn", "churn-20", "proxy CPU", "µs/conn", false),
    metric("idle", "idle-5000", "memory per pair", "B", false),
    metric("scale", "scale-8000", "messages", "msg/s", true),
    metric("scale", "scale-8000", "p99", "µs", false),
    metric("scale", "scale-8000", "proxy CPU", "µs/msg", false),
    metric("iperf3", "iperf3-1", "throughput", "GB/s", true),
    metric("iperf3", "iperf3-1", "proxy CPU", "s/GiB", false),
    metric("iperf3", "iperf3-8", "throughput", "GB/s", true),
    metric("iperf3", "iperf3-8", "proxy CPU", "s/GiB", false),
    metric("redis", "redis-50", "requests", "req/s", true),
    metric("redis", "redis-50", "p50", "µs", false),
    metric("redis", "redis-50", "p99", "µs", false),
    metric("redis", "redis-50", "proxy CPU", "µs/req", false),
    metric("redis", "redis-churn-20", "requests", "req/s", true),
    metric("redis", "redis-churn-20", "p99", "µs", false),
    metric("redis", "redis-churn-20", "proxy CPU", "µs/req", false),
];

/// Run by default, in this order.
const DEFAULT_SCENARIOS: [&str; 5] = ["bulk", "rr", "churn", "idle", "scale"];
/// Run only when named: they need tools the machine may not have.
const OPTIONAL_SCENARIOS: [&str; 2] = ["iperf3", "redis"];

/// redis-benchmark runs a number of requests, not a time: about this many
/// per measured second (tcplb does ~45k keep-alive and ~8k new-connection
/// requests per second on the reference machine).
const REDIS_KEEPALIVE_PER_SEC: u64 = 40_000;
const REDIS_RECONNECT_PER_SEC: u64 = 6_000;

struct Bench {
    timing: Timing,
    rounds: usize,
    /// The round being run, where `record` files its samples.
    round: usize,
    pin: Option<Pin>,
    echo: Vec<SocketAddr>,
    source: Vec<SocketAddr>,
    iperf3: Option<external::Server>,
    redis: Option<external::Server>,
    samples: Samples,
    /// Each contender's configuration, from its first start.
    configs: HashMap<&'static str, String>,
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
        let rounds = self.samples.entry(key).or_default();
        rounds.resize(self.rounds, None);
        rounds[self.round] = Some(value);
    }

    fn start(&mut self, c: Contender, hosts: &[SocketAddr]) -> Running {
        let proxy = c.start(hosts, self.pin);
        self.configs
            .entry(c.name())
            .or_insert_with(|| proxy.config.clone());
        proxy
    }

    fn run(&mut self, scenario: &str, c: Contender) {
        let t = self.timing;
        match scenario {
            "bulk" => {
                for (label, conns) in [("bulk-1", 1), ("bulk-8", 8)] {
                    let source = self.source.clone();
                    let proxy = self.start(c, &source);
                    let r = load::bulk(proxy.addr, conns, t, proxy.pid);
                    eprintln!(
                        "  {label} {:<17} {:.2} GB/s, cpu {:?} s/GiB",
                        c.name(),
                        r.gb_per_sec(),
                        r.cpu_per_gib()
                    );
                    self.record(c, label, "throughput", Some(r.gb_per_sec()));
                    self.record(c, label, "proxy CPU", r.cpu_per_gib());
                }
            }
            "rr" => {
                let echo = self.echo.clone();
                let proxy = self.start(c, &echo);
                let mut r = load::ping_pong(proxy.addr, 50, 64, t, proxy.pid);
                let (p50, p99) = (r.percentile_us(50.0), r.percentile_us(99.0));
                eprintln!(
                    "  rr-50 {:<17} {:.0} req/s p50 {p50:.0} µs p99 {p99:.0} µs cpu {:.1?} µs/req (errors {})",
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
                let echo = self.echo.clone();
                let proxy = self.start(c, &echo);
                let mut r = load::churn(proxy.addr, 20, 64, t, proxy.pid);
                let p99 = r.percentile_us(99.0);
                eprintln!(
                    "  churn-20 {:<17} {:.0} conn/s p99 {p99:.0} µs cpu {:.1?} µs/conn (errors {})",
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
                let echo = self.echo.clone();
                let proxy = self.start(c, &echo);
                let Some(pid) = proxy.pid else { return };
                let per_pair = load::idle_memory(proxy.addr, 5000, pid);
                eprintln!("  idle-5000 {:<17} {per_pair:.0} B/pair", c.name());
                self.record(c, "idle-5000", "memory per pair", Some(per_pair));
            }
            "scale" => {
                let echo = self.echo.clone();
                let proxy = self.start(c, &echo);
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
                    "  scale-8000 {:<17} {:.0} msg/s p99 {p99:.0} µs (errors {})",
                    c.name(),
                    r.per_sec(),
                    r.errors
                );
                self.record(c, "scale-8000", "messages", Some(r.per_sec()));
                self.record(c, "scale-8000", "p99", Some(p99));
                self.record(c, "scale-8000", "proxy CPU", r.cpu_us_each());
            }
            "iperf3" => {
                let Some(server) = self.iperf3.as_ref().map(|s| s.addr) else {
                    return;
                };
                for (label, streams) in [("iperf3-1", 1), ("iperf3-8", 8)] {
                    let proxy = self.start(c, &[server]);
                    let secs = t.window.as_secs();
                    let Some(r) = external::iperf3(proxy.addr, streams, secs, proxy.pid) else {
                        eprintln!("  {label} {:<17} iperf3 failed", c.name());
                        continue;
                    };
                    eprintln!(
                        "  {label} {:<17} {:.2} GB/s, cpu {:?} s/GiB",
                        c.name(),
                        r.gb_per_sec(),
                        r.cpu_per_gib()
                    );
                    self.record(c, label, "throughput", Some(r.gb_per_sec()));
                    self.record(c, label, "proxy CPU", r.cpu_per_gib());
                }
            }
            "redis" => {
                let Some(server) = self.redis.as_ref().map(|s| s.addr) else {
                    return;
                };
                let secs = t.window.as_secs().max(1);
                let runs = [
                    ("redis-50", 50, true, REDIS_KEEPALIVE_PER_SEC * secs),
                    ("redis-churn-20", 20, false, REDIS_RECONNECT_PER_SEC * secs),
                ];
                for (label, conns, keepalive, requests) in runs {
                    let proxy = self.start(c, &[server]);
                    let Some(r) = external::redis_benchmark(
                        proxy.addr, conns, keepalive, requests, proxy.pid,
                    ) else {
                        eprintln!("  {label} {:<17} redis-benchmark failed", c.name());
                        continue;
                    };
                    eprintln!(
                        "  {label} {:<17} {:.0} req/s p50 {:.0} µs p99 {:.0} µs cpu {:.1?} µs/req",
                        c.name(),
                        r.per_sec,
                        r.p50_us,
                        r.p99_us,
                        r.cpu_us_each
                    );
                    self.record(c, label, "requests", Some(r.per_sec));
                    if keepalive {
                        self.record(c, label, "p50", Some(r.p50_us));
                    }
                    self.record(c, label, "p99", Some(r.p99_us));
                    self.record(c, label, "proxy CPU", r.cpu_us_each);
                }
            }
            other => panic!("unknown scenario {other}"),
        }
    }
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

/// Moves this process (every thread) to the load core, so that the load
/// generators, upstream servers and external tools it starts stay off the
/// proxy's core. Uses taskset(1), as the crate forbids `unsafe`.
fn pin_self(pin: Pin) {
    let pid = std::process::id().to_string();
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", pin.load, &pid])
        .stdout(std::process::Stdio::null())
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "TCPLB_BENCH_PIN: `taskset -a -p -c {} {pid}` failed (is util-linux installed?)",
        pin.load
    );
    let cpus = procfs::own_cpus().unwrap_or_default();
    assert_eq!(
        cpus, pin.load,
        "TCPLB_BENCH_PIN: this process runs on CPUs {cpus}, not {}",
        pin.load
    );
    // The proxy's core must exist: taskset -c 1 fails on a 1-core machine.
    let probe = Command::new("taskset")
        .args(["-c", pin.proxy, "true"])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "TCPLB_BENCH_PIN: cannot run on CPU {} (the proxy needs a core of its own)",
        pin.proxy
    );
}

/// Which scenarios to run: the named ones, or the default set. An unknown
/// name is an error rather than a silently empty run.
fn scenarios(args: &[String]) -> Vec<&'static str> {
    let wanted: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    let known: Vec<&'static str> = DEFAULT_SCENARIOS
        .into_iter()
        .chain(OPTIONAL_SCENARIOS)
        .collect();
    for w in &wanted {
        assert!(
            known.contains(w),
            "unknown scenario {w:?}; known: {}",
            known.join(" ")
        );
    }
    if wanted.is_empty() {
        return DEFAULT_SCENARIOS.to_vec();
    }
    known.into_iter().filter(|s| wanted.contains(s)).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--tokio-proxy") {
        let hosts = args[4..].iter().map(|h| h.parse().unwrap()).collect();
        tokio_proxy::run(&args[2], &args[3], hosts);
    }
    let scenarios = scenarios(&args[1..]);
    // Before pinning, which narrows what this process sees.
    let machine = machine();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let pin = (std::env::var("TCPLB_BENCH_PIN").as_deref() == Ok("1")).then_some(contenders::PIN);
    if let Some(pin) = pin {
        pin_self(pin);
    }
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
    let rounds = env_number("TCPLB_BENCH_ROUNDS", 3).max(1) as usize;
    let timing = Timing {
        warmup: Duration::from_millis(500),
        window: Duration::from_secs(env_number("TCPLB_BENCH_SECS", 3).max(1)),
    };
    let optional = |name: &str, server: fn() -> Result<external::Server, String>| {
        if !scenarios.contains(&name) {
            return (None, None);
        }
        match server() {
            Ok(s) => (Some(s), None),
            Err(why) => {
                eprintln!("{why}");
                (None, Some(why))
            }
        }
    };
    let (iperf3, iperf3_note) = optional("iperf3", external::iperf3_server);
    let (redis, redis_note) = optional("redis", external::redis_server);
    notes.extend(iperf3_note.into_iter().chain(redis_note));
    let mut bench = Bench {
        timing,
        rounds,
        round: 0,
        pin,
        echo: hosts::spawn(hosts::Kind::Echo, 2),
        source: hosts::spawn(hosts::Kind::Source, 2),
        iperf3,
        redis,
        samples: HashMap::new(),
        configs: HashMap::new(),
    };
    for round in 0..rounds {
        bench.round = round;
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
        .filter(|m| scenarios.contains(&m.group))
        .map(|m| Row {
            scenario: m.scenario.to_string(),
            metric: m.name.to_string(),
            unit: m.unit.to_string(),
            higher_is_better: m.higher_is_better,
            rounds: contenders
                .iter()
                .map(|c| {
                    let key = (c.name(), m.scenario, m.name);
                    bench.samples.get(&key).cloned().unwrap_or_default()
                })
                .collect(),
        })
        .collect();
    notes.push(format!(
        "Each run measures {} s after a {} ms warm-up (scale: 1 s); each contender is a \
         separate process, started afresh for every run.",
        timing.window.as_secs(),
        timing.warmup.as_millis()
    ));
    notes.push(match pin {
        Some(pin) => format!(
            "Pinned (TCPLB_BENCH_PIN=1): each proxy runs under `taskset -c {}`; the benchmark \
             process (load generators, upstream servers, iperf3, redis-server, redis-benchmark) \
             on CPU {}. Contenders with two threads or workers ({}) share their one core, so \
             their scaling figures only mean something unpinned.",
            pin.proxy,
            pin.load,
            contenders
                .iter()
                .filter(|c| c.parallel())
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => format!(
            "Not pinned: the proxy, the load generators and the upstream servers (all in the \
             benchmark process) share the machine's {cores} cores, so a proxy with two workers \
             competes with its own load for them."
        ),
    });
    let uses = |prefix: &str| contenders.iter().any(|c| c.name().starts_with(prefix));
    let versions = [
        (uses("haproxy"), "haproxy", "-v"),
        (uses("nginx"), "nginx", "-v"),
        (bench.iperf3.is_some(), "iperf3", "--version"),
        (bench.redis.is_some(), "redis-server", "--version"),
        (bench.redis.is_some(), "redis-benchmark", "--version"),
    ];
    let versions: Vec<String> = versions
        .into_iter()
        .filter(|(used, _, _)| *used)
        .filter_map(|(_, p, flag)| contenders::version(p, flag))
        .collect();
    if !versions.is_empty() {
        notes.push(format!("Versions: {}.", versions.join("; ")));
    }
    if scenarios.contains(&"redis") {
        notes.push(format!(
            "redis: redis-benchmark -t get -d 64 runs a fixed number of requests \
             ({REDIS_KEEPALIVE_PER_SEC} keep-alive and {REDIS_RECONNECT_PER_SEC} new-connection \
             ones per measured second); proxy CPU is over the whole run, connection set-up included."
        ));
    }
    if scenarios.contains(&"iperf3") {
        notes.push(
            "iperf3: iperf3 -R (the server sends) through the proxy; proxy CPU is over the whole \
             client run."
                .to_string(),
        );
    }
    notes.push(
        "Configurations show the addresses of each contender's first start; every start gets \
         a fresh listening port, and each scenario its own upstream hosts."
            .to_string(),
    );
    let results = Results {
        title: "tcplb benchmark".to_string(),
        date: today(),
        machine,
        rounds,
        contenders: contenders.iter().map(|c| c.name().to_string()).collect(),
        reference: "tcplb".to_string(),
        notes,
        rows,
        configs: contenders
            .iter()
            .filter_map(|c| Some((c.name().to_string(), bench.configs.get(c.name())?.clone())))
            .collect(),
        comparisons: contenders::COMPARISONS
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    };
    drop(bench);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let markdown = report::write_all(&results, &dir).expect("write results");
    println!("{markdown}");
    println!("(saved in {}/results.{{md,csv,svg}})", dir.display());
}
