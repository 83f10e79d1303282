//! A second opinion from load generators the benchmark did not write:
//! `iperf3` (client → proxy → `iperf3 -s`) for bulk, and `redis-benchmark`
//! (→ proxy → `redis-server`) for request/response and for a new
//! connection per request. Only run when asked for (scenarios `iperf3` and
//! `redis`) and when the tools are installed; the servers are started once
//! per benchmark on free loopback ports and stopped with it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use crate::contenders::{free_port, wait_listening, which};
use crate::load::Throughput;
use crate::procfs;

/// A server process the benchmark started; killed when dropped.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(mut cmd: Command, addr: SocketAddr) -> Server {
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    wait_listening(&mut child, addr, &what, None);
    Server { addr, child }
}

fn missing(tools: &[(&str, &str)]) -> Option<String> {
    let absent: Vec<&str> = tools
        .iter()
        .filter(|(program, _)| which(program).is_none())
        .map(|(_, package)| *package)
        .collect();
    (!absent.is_empty()).then(|| absent.join(" "))
}

/// `iperf3 -s` on a free port, or why not.
pub fn iperf3_server() -> Result<Server, String> {
    if let Some(packages) = missing(&[("iperf3", "iperf3")]) {
        return Err(format!(
            "iperf3: not installed, scenario skipped (apt-get install {packages})"
        ));
    }
    let addr = free_port();
    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-B", "127.0.0.1", "-p", &addr.port().to_string()]);
    Ok(start_server(cmd, addr))
}

/// `iperf3 -R` through the proxy at `addr` (the server sends, as the
/// built-in bulk's source does), `streams` in parallel for `secs`. The
/// proxy's CPU is taken over the whole client run. One retry: the server
/// can still be tearing down the previous test, whose proxy was killed
/// under it, and then drops the next control connection. `None` if both
/// attempts failed.
pub fn iperf3(addr: SocketAddr, streams: usize, secs: u64, pid: Option<u32>) -> Option<Throughput> {
    (0..2).find_map(|_| iperf3_once(addr, streams, secs, pid))
}

fn iperf3_once(
    addr: SocketAddr,
    streams: usize,
    secs: u64,
    pid: Option<u32>,
) -> Option<Throughput> {
    let before = pid.map(procfs::cpu_seconds);
    let out = Command::new("iperf3")
        .args(["-c", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-R", "-J", "-t", &secs.max(1).to_string()])
        .args(["-P", &streams.to_string()])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let cpu = pid.zip(before).map(|(p, b)| procfs::cpu_seconds(p) - b);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    if let Some(error) = report.get("error") {
        eprintln!("  iperf3: {error}");
        return None;
    }
    let received = &report["end"]["sum_received"];
    Some(Throughput {
        bytes: received["bytes"].as_u64()?,
        secs: received["seconds"].as_f64()?,
        cpu,
    })
}

/// `redis-server` without persistence on a free port, with the key the
/// GET runs read (64 bytes) set; or why not.
pub fn redis_server() -> Result<Server, String> {
    if let Some(packages) = missing(&[
        ("redis-server", "redis-server"),
        ("redis-benchmark", "redis-tools"),
    ]) {
        return Err(format!(
            "redis: not installed, scenario skipped (apt-get install {packages})"
        ));
    }
    let addr = free_port();
    let mut cmd = Command::new("redis-server");
    cmd.args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(["--save", "", "--appendonly", "no"]);
    let server = start_server(cmd, addr);
    let set = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-n", "1", "-d", "64", "-t", "set", "--csv"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match set {
        Ok(s) if s.success() => Ok(server),
        other => Err(format!(
            "redis: could not set the benchmark key ({other:?}), scenario skipped"
        )),
    }
}

/// What one redis-benchmark run reports for its GETs.
#[derive(Debug)]
pub struct Redis {
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Proxy CPU microseconds per request, over the whole run.
    pub cpu_us_each: Option<f64>,
}

/// `redis-benchmark -t get` through the proxy at `addr`: `conns` clients,
/// `requests` in all, keep-alive or a new connection per request.
pub fn redis_benchmark(
    addr: SocketAddr,
    conns: usize,
    keepalive: bool,
    requests: u64,
    pid: Option<u32>,
) -> Option<Redis> {
    let before = pid.map(procfs::cpu_seconds);
    let out = Command::new("redis-benchmark")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-c", &conns.to_string(), "-n", &requests.to_string()])
        .args(["-k", if keepalive { "1" } else { "0" }])
        .args(["-d", "64", "-t", "get", "--csv"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let cpu = pid.zip(before).map(|(p, b)| procfs::cpu_seconds(p) - b);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...,"p99_latency_ms",...
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<f64> = text
        .lines()
        .find(|l| l.starts_with("\"GET\""))?
        .split(',')
        .skip(1)
        .map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    Some(Redis {
        per_sec: *fields.first()?,
        p50_us: fields.get(3)? * 1e3,
        p99_us: fields.get(5)? * 1e3,
        cpu_us_each: cpu.map(|c| c * 1e6 / requests as f64),
    })
}
