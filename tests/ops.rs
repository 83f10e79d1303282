//! Operations through the real reactor: active and passive health checks,
//! `no_healthy_host`, the admin endpoint's metrics and status (parsed, and
//! checked against the traffic sent), and reloads that keep established
//! connections relaying byte-exactly.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use tcplb::HealthSettings;
use tcplb::{Config, Proxy, Settings, UpstreamConfig};

/// A greeting echo host that can be stopped (its port then refuses) and
/// started again on the same port. The port stays reserved while it is
/// stopped (a socket bound with `SO_REUSEPORT` that never listens), so no
/// other test's listener can take it meanwhile.
struct ToggleHost {
    addr: SocketAddr,
    name: String,
    _port: socket2::Socket,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    accepted: Arc<AtomicUsize>,
}

/// A socket for `addr` that shares its port with the other sockets of a
/// [`ToggleHost`].
fn shared_port_socket() -> socket2::Socket {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket
}

impl ToggleHost {
    fn new(name: &str) -> ToggleHost {
        let port = shared_port_socket();
        port.bind(&localhost().into()).unwrap();
        let mut host = ToggleHost {
            addr: port.local_addr().unwrap().as_socket().unwrap(),
            name: name.to_string(),
            _port: port,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            accepted: Arc::new(AtomicUsize::new(0)),
        };
        host.start();
        host
    }

    fn start(&mut self) {
        let socket = shared_port_socket();
        socket.bind(&self.addr.into()).unwrap();
        socket.listen(128).unwrap();
        let listener = TcpListener::from(socket);
        self.stop.store(false, Ordering::SeqCst);
        let (stop, accepted, name) = (self.stop.clone(), self.accepted.clone(), self.name.clone());
        self.thread = Some(thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                let name = name.clone();
                thread::spawn(move || {
                    let _ = conn.write_all(format!("{name}\n").as_bytes());
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        }));
    }

    /// Returns once the port is closed.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for ToggleHost {
    fn drop(&mut self) {
        self.stop();
    }
}

fn upstream(name: &str, hosts: &[SocketAddr], health: HealthSettings) -> UpstreamConfig {
    UpstreamConfig {
        name: name.to_string(),
        listen: localhost(),
        hosts: hosts.iter().map(|&h| h.into()).collect(),
        names: Vec::new(),
        tls: false,
        health,
        refusal: Default::default(),
        queue_timeout: None,
        max_queued: None,
        send_proxy: None,
        accept_proxy: Vec::new(),
    }
}

/// Checks every 100 ms. A probe of a live host on a busy machine may take
/// longer than that, and must not fail for it; a dead host's port
/// refuses at once, whatever the timeout.
fn fast_checks() -> HealthSettings {
    HealthSettings {
        active: true,
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(1),
        rise: 2,
        fall: 3,
        ..HealthSettings::default()
    }
}

/// Like [`Running::wait_until`], and also returns the last snapshot
/// before `done` held (if any was taken) and the first one where it did.
fn watch_until(
    proxy: &Running,
    what: &str,
    done: impl Fn(&tcplb::Stats) -> bool,
) -> (Option<tcplb::Stats>, tcplb::Stats) {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut before = None;
    loop {
        let stats = proxy.stats();
        if done(&stats) {
            return (before, stats);
        }
        assert!(Instant::now() < deadline, "never {what}: {stats:?}");
        before = Some(stats);
        thread::yield_now();
    }
}

fn config_with(upstreams: Vec<UpstreamConfig>) -> Config {
    Config {
        settings: Settings::default(),
        upstreams,
        tls: None,
        clients: Vec::new(),
        admin: Some(localhost()),
        cluster: None,
        warnings: Vec::new(),
    }
}

fn host_up(stats: &tcplb::Stats, addr: SocketAddr) -> bool {
    stats.upstreams[0]
        .hosts
        .iter()
        .any(|h| h.addr == addr && h.up)
}

fn greeting(proxy: &Running) -> (TcpStream, String) {
    let mut c = proxy.connect();
    let name = read_line(&mut c);
    (c, name)
}

#[test]
fn a_killed_host_goes_down_gets_nothing_and_comes_back() {
    let mut a = ToggleHost::new("a");
    let b = ToggleHost::new("b");
    let proxy = start(config_with(vec![upstream(
        "test",
        &[a.addr, b.addr],
        fast_checks(),
    )]));
    proxy.wait_until("saw both hosts up", |s| {
        host_up(s, a.addr) && host_up(s, b.addr)
    });

    let failed_before = proxy.stats().upstreams[0].hosts[0].checks_failed;
    a.stop();
    let killed = Instant::now();
    let (last_up, down) = watch_until(&proxy, "took the killed host down", |s| !host_up(s, a.addr));
    let took = killed.elapsed();
    // Down at the third failed check (fall 3) since the kill: not before,
    // and (as far as the snapshots show) not after.
    let failed = |s: &tcplb::Stats| s.upstreams[0].hosts[0].checks_failed - failed_before;
    assert!(failed(&down) >= 3, "down after {} failures", failed(&down));
    if let Some(up) = &last_up {
        assert!(failed(up) <= 2, "still up after {} failures", failed(up));
    }
    // Three checks 100 ms (± 10 %) apart, 330 ms at most, and over a
    // second to spare for a busy machine: checks that came at several
    // times their interval would not make it.
    assert!(took < Duration::from_millis(1500), "down after {took:?}");
    let before = a.accepted.load(Ordering::SeqCst);
    for _ in 0..6 {
        let (c, name) = greeting(&proxy);
        assert_eq!(name, "b");
        finish(c);
    }

    let passed_before = proxy.stats().upstreams[0].hosts[0].checks_passed;
    a.start();
    let (last_down, up) = watch_until(&proxy, "brought the host back", |s| host_up(s, a.addr));
    let passed = |s: &tcplb::Stats| s.upstreams[0].hosts[0].checks_passed - passed_before;
    assert!(passed(&up) >= 2, "up after {} passes", passed(&up));
    if let Some(down) = &last_down {
        assert!(
            passed(down) <= 1,
            "still down after {} passes",
            passed(down)
        );
    }
    let names: Vec<String> = (0..4)
        .map(|_| {
            let (c, name) = greeting(&proxy);
            finish(c);
            name
        })
        .collect();
    assert!(names.iter().any(|n| n == "a"), "{names:?}");
    assert!(a.accepted.load(Ordering::SeqCst) > before);
    let stats = proxy.stats();
    let host = &stats.upstreams[0].hosts[0];
    assert!(
        host.checks_failed >= 3 && host.checks_passed >= 2,
        "{host:?}"
    );
    assert_eq!(host.transitions, 2, "down once, up once: {host:?}");
    assert_eq!(stats.upstreams[0].hosts[1].transitions, 0);
}

/// A host that comes back up with `slow_start` counts as busier than it
/// is, less so as its ramp goes on: just back, with no connection, it
/// loses to a host with 15; halfway through the ramp it wins. The ramp
/// runs on the loop's clock, which the test moves on.
#[test]
fn slow_start_ramps_a_returning_host_in() {
    let a = ToggleHost::new("a");
    let mut b = ToggleHost::new("b");
    let ramp = Duration::from_secs(3600);
    let health = HealthSettings {
        slow_start: Some(ramp),
        ..fast_checks()
    };
    let mut config = config_with(vec![upstream("test", &[a.addr, b.addr], health)]);
    config.settings.idle_timeout = Duration::from_secs(86_400);
    let proxy = start(config);
    proxy.wait_until("saw both hosts up", |s| {
        host_up(s, a.addr) && host_up(s, b.addr)
    });
    b.stop();
    proxy.wait_until("took b down", |s| !host_up(s, b.addr));
    let mut held: Vec<TcpStream> = (0..10)
        .map(|_| {
            let (c, name) = greeting(&proxy);
            assert_eq!(name, "a", "b is down");
            c
        })
        .collect();
    b.start();
    proxy.wait_until("brought b back", |s| host_up(s, b.addr));
    // Fresh from its ramp's start, b has 5 % of its weight: its 0
    // connections count as 20, more than a's 10 to 14.
    for _ in 0..5 {
        let (c, name) = greeting(&proxy);
        assert_eq!(name, "a", "b just came back");
        held.push(c);
    }
    // Halfway through, its 0 connections count as 2.
    proxy.handle.advance_clock(ramp / 2).unwrap();
    let (c, name) = greeting(&proxy);
    assert_eq!(name, "b", "halfway through b's ramp");
    held.push(c);
    assert_eq!(proxy.host_counts(), [15, 1]);
    for c in held {
        finish(c);
    }
}

#[test]
fn a_host_failing_one_check_in_three_never_flaps() {
    // Answers +PONG to two probes out of three, -ERR to the third.
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    let probes = Arc::new(AtomicUsize::new(0));
    let seen = probes.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 64];
            let _ = conn.read(&mut buf);
            let answer: &[u8] = if n % 3 == 2 {
                b"-ERR\r\n"
            } else {
                b"+PONG\r\n"
            };
            let _ = conn.write_all(answer);
        }
    });
    let health = HealthSettings {
        send: Some(b"PING\r\n".to_vec()),
        expect: Some(b"+PONG".to_vec()),
        interval: Duration::from_millis(50),
        ..fast_checks()
    };
    let proxy = start(config_with(vec![upstream("test", &[addr], health)]));
    proxy.wait_until("ran 18 checks", |s| {
        let h = &s.upstreams[0].hosts[0];
        h.checks_passed + h.checks_failed >= 18
    });
    let stats = proxy.stats();
    let host = &stats.upstreams[0].hosts[0];
    assert_eq!(host.transitions, 0, "it never changed state: {host:?}");
    assert!(
        host.checks_failed >= 5,
        "the host did fail checks: {host:?}"
    );
}

#[test]
fn every_host_down_gives_no_healthy_host_at_once() {
    let proxy = start(config_with(vec![upstream(
        "test",
        &[dead_addr(), dead_addr()],
        fast_checks(),
    )]));
    proxy.wait_until("took both hosts down", |s| {
        s.upstreams[0].hosts.iter().all(|h| !h.up)
    });
    let started = Instant::now();
    let mut c = proxy.connect();
    let reply = String::from_utf8(read_to_end(&mut c).unwrap()).unwrap();
    assert!(reply.starts_with("ERROR no_healthy_host: "), "{reply}");
    // At once: not after trying the hosts for a connect timeout (5 s).
    assert!(
        started.elapsed() < Settings::default().connect_timeout / 2,
        "{:?}",
        started.elapsed()
    );
    let refused = &proxy.stats().upstreams[0].refused;
    assert!(
        refused.contains(&("no_healthy_host".to_string(), 1)),
        "{refused:?}"
    );
}

#[test]
fn passive_failures_take_a_refusing_host_out_before_any_probe() {
    // No active checks: real connects that fail take the host down.
    let dead = dead_addr();
    let live = spawn_host("live", Behavior::Named);
    let proxy = start(config_with(vec![upstream(
        "test",
        &[dead, live.addr],
        HealthSettings::default(),
    )]));
    for _ in 0..4 {
        let (c, name) = greeting(&proxy);
        assert_eq!(name, "live");
        finish(c);
    }
    let stats = proxy.stats();
    let dead_host = &stats.upstreams[0].hosts[0];
    assert!(!dead_host.up, "{dead_host:?}");
    assert_eq!(
        dead_host.connect_failures, 3,
        "fall is 3: no attempts after it went down"
    );
}

/// One HTTP request to the admin listener; (status, body).
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: tcplb\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Prometheus text as `name{labels}` -> value, checking every line's shape.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        if let Some(open) = series.find('{') {
            assert!(series.ends_with('}'), "bad labels in {line:?}");
            assert!(
                series[..open]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line:?}"
            );
        }
        assert!(
            out.insert(series.to_string(), value).is_none(),
            "duplicate series {series}"
        );
    }
    out
}

struct Served {
    proxy: Proxy,
}

fn bind(config: &Config) -> (Served, SocketAddr, SocketAddr) {
    let proxy = Proxy::bind(&with_test_settings(config.clone())).unwrap();
    let addr = proxy.listen_addr(&config.upstreams[0].name).unwrap();
    let admin = proxy.admin_addr().unwrap();
    (Served { proxy }, addr, admin)
}

#[test]
fn metrics_and_status_match_the_traffic() {
    let host = spawn_host("h", Behavior::Echo);
    let config = config_with(vec![upstream(
        "app",
        &[host.addr],
        HealthSettings::default(),
    )]);
    let (served, addr, admin) = bind(&config);
    let handle = served.proxy.handle();
    let thread = thread::spawn(move || served.proxy.run());
    let mut sent = 0;
    for i in 0..5 {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let msg = format!("message number {i}\n");
        c.write_all(msg.as_bytes()).unwrap();
        assert_eq!(read_line(&mut c), msg.trim_end());
        sent += msg.len();
        finish(c);
    }
    let (status, body) = http(admin, "GET", "/metrics");
    assert_eq!(status, 200);
    let m = parse_metrics(&body);
    let host_label = format!("upstream=\"app\",host=\"{}\"", host.addr);
    assert_eq!(m[&format!("tcplb_connections_total{{{host_label}}}")], 5.0);
    assert_eq!(m[&format!("tcplb_connections_active{{{host_label}}}")], 0.0);
    assert_eq!(m[&format!("tcplb_host_up{{{host_label}}}")], 1.0);
    assert_eq!(
        m[&format!("tcplb_host_transitions_total{{{host_label}}}")],
        0.0
    );
    assert_eq!(
        m[&format!("tcplb_connect_failures_total{{{host_label}}}")],
        0.0
    );
    assert_eq!(
        m["tcplb_bytes_total{upstream=\"app\",direction=\"up\"}"],
        sent as f64
    );
    assert_eq!(
        m["tcplb_bytes_total{upstream=\"app\",direction=\"down\"}"],
        sent as f64
    );
    assert_eq!(
        m["tcplb_connection_duration_seconds_count{upstream=\"app\"}"],
        5.0
    );
    assert_eq!(
        m["tcplb_connection_duration_seconds_bucket{upstream=\"app\",le=\"+Inf\"}"],
        5.0
    );

    let (status, body) = http(admin, "GET", "/status");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let up = &json["upstreams"][0];
    assert_eq!(up["name"], "app");
    assert_eq!(up["hosts"][0]["address"], host.addr.to_string());
    assert_eq!(up["hosts"][0]["up"], true);
    assert_eq!(up["hosts"][0]["connections_total"], 5);
    assert!(json["uptime_seconds"].is_u64());

    assert_eq!(http(admin, "GET", "/nope").0, 404);
    assert_eq!(http(admin, "DELETE", "/metrics").0, 405);
    assert_eq!(
        http(admin, "POST", "/reload").0,
        400,
        "no config file to reload"
    );
    handle.shutdown();
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

#[test]
fn a_scrape_of_a_thousand_hosts_parses() {
    let hosts: Vec<SocketAddr> = (0..1000u16)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 20000 + i)))
        .collect();
    let config = config_with(vec![upstream("big", &hosts, HealthSettings::default())]);
    let (served, _addr, admin) = bind(&config);
    let handle = served.proxy.handle();
    let thread = thread::spawn(move || served.proxy.run());
    let (status, body) = http(admin, "GET", "/metrics");
    assert_eq!(status, 200);
    let m = parse_metrics(&body);
    let up = m.keys().filter(|k| k.starts_with("tcplb_host_up{")).count();
    assert_eq!(up, 1000);
    handle.shutdown();
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

#[test]
fn idle_connections_never_lock_a_scrape_out_of_the_admin_listener() {
    let host = spawn_host("h", Behavior::Echo);
    let config = config_with(vec![upstream(
        "app",
        &[host.addr],
        HealthSettings::default(),
    )]);
    let (served, _addr, admin) = bind(&config);
    let handle = served.proxy.handle();
    let thread = thread::spawn(move || served.proxy.run());
    // More idle connections than the admin listener keeps (64), each
    // surely accepted before the next one: a scrape must still get in.
    let mut idle = Vec::new();
    for _ in 0..70 {
        idle.push(TcpStream::connect(admin).unwrap());
        let (status, _) = http(admin, "GET", "/status");
        assert_eq!(status, 200, "with {} idle connections", idle.len());
    }
    // The ones that made room were the oldest: they were closed.
    let mut first = idle.remove(0);
    first.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut byte = [0u8; 1];
    let closed = first.read(&mut byte).map_err(|e| e.kind());
    assert_eq!(
        closed,
        Err(std::io::ErrorKind::ConnectionReset),
        "the oldest was reset"
    );
    handle.shutdown();
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

/// A config file in a temporary directory, rewritten by the test.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("tcplb-ops-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        ConfigFile(dir.join("lb.toml"))
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).unwrap();
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

/// Runs the reactor on `file`'s config, reloadable from the file; returns
/// the address of its upstream `app`, its handle and its thread.
fn run_reloadable(
    file: &ConfigFile,
) -> (
    SocketAddr,
    tcplb::Handle,
    thread::JoinHandle<Result<(), tcplb::Error>>,
) {
    let config = Config::load(&file.0).unwrap();
    let mut proxy = Proxy::bind(&config).unwrap();
    proxy.set_config_path(file.0.clone());
    let app = proxy.listen_addr("app").unwrap();
    let handle = proxy.handle();
    (app, handle, thread::spawn(move || proxy.run()))
}

fn upstream_toml(name: &str, hosts: &[SocketAddr]) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "[[upstream]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nhosts = [{}]\n\n",
        hosts.join(", ")
    )
}

/// Streams `rounds` random messages through `c` and checks each echo.
fn echo_rounds(c: &mut TcpStream, rng: &mut Rng, rounds: usize) {
    for _ in 0..rounds {
        let len = 1 + rng.below(32 * 1024);
        let data = rng.bytes(len);
        c.write_all(&data).unwrap();
        let mut back = vec![0u8; len];
        c.read_exact(&mut back).unwrap();
        assert!(back == data, "echo differs");
    }
}

#[test]
fn reload_adds_and_removes_without_dropping_connections() {
    let h1 = spawn_host("h1", Behavior::Echo);
    let h2 = spawn_host("h2", Behavior::Echo);
    let h3 = spawn_host("h3", Behavior::Named);
    let file = ConfigFile::new("reload");
    file.write(&format!(
        "[defaults]\ndrain_timeout = \"1h\"\n\n{}",
        upstream_toml("app", &[h1.addr, h2.addr])
    ));
    let (app, handle, thread) = run_reloadable(&file);

    // Established connections on both hosts, relaying.
    let mut rng = Rng::new(99);
    let mut conns: Vec<TcpStream> = (0..4)
        .map(|_| {
            let c = TcpStream::connect(app).unwrap();
            c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            c
        })
        .collect();
    for c in &mut conns {
        echo_rounds(c, &mut rng, 3);
    }
    let counts = |s: &tcplb::Stats| {
        s.upstreams[0]
            .hosts
            .iter()
            .map(|h| h.active)
            .collect::<Vec<_>>()
    };
    assert_eq!(counts(&handle.stats().unwrap()), [2, 2]);

    // Remove h2, add h3, add an upstream.
    let h4 = spawn_host("h4", Behavior::Named);
    file.write(&format!(
        "[defaults]\ndrain_timeout = \"1h\"\n\n{}{}",
        upstream_toml("app", &[h1.addr, h3.addr]),
        upstream_toml("extra", &[h4.addr])
    ));
    handle.reload().unwrap();
    let stats = handle.stats().unwrap();
    assert_eq!(stats.reloads, 1);
    let extra = stats
        .upstreams
        .iter()
        .find(|u| u.name == "extra")
        .unwrap()
        .listen;

    // Every established connection still relays byte-exactly, the one on
    // the removed host included (it drains).
    for c in &mut conns {
        echo_rounds(c, &mut rng, 3);
    }
    // New connections: never h2; h3 gets them (fewest connections).
    for _ in 0..2 {
        let mut c = TcpStream::connect(app).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        assert_eq!(read_line(&mut c), "h3");
    }
    let mut c = TcpStream::connect(extra).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(read_line(&mut c), "h4");
    let stats = handle.stats().unwrap();
    let h2_stats = stats.upstreams[0]
        .hosts
        .iter()
        .find(|h| h.addr == h2.addr)
        .unwrap();
    assert!(h2_stats.removed && h2_stats.active == 2, "{h2_stats:?}");

    for c in conns {
        finish(c);
    }
    handle.shutdown();
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

#[test]
fn connections_of_a_removed_host_close_when_the_drain_period_ends() {
    let drain = Duration::from_millis(300);
    // Room for a busy machine, and far below IO_TIMEOUT: a pair left open
    // fails the test instead of passing as a read that timed out.
    let margin = Duration::from_secs(3);
    let h1 = spawn_host("h1", Behavior::Named);
    let h2 = spawn_host("h2", Behavior::Named);
    let file = ConfigFile::new("drain");
    let header = "[defaults]\ndrain_timeout = \"300ms\"\n\n";
    file.write(&format!(
        "{header}{}",
        upstream_toml("app", &[h1.addr, h2.addr])
    ));
    let (app, handle, thread) = run_reloadable(&file);
    let mut on: HashMap<String, TcpStream> = HashMap::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(app).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        on.insert(read_line(&mut c), c);
    }
    file.write(&format!("{header}{}", upstream_toml("app", &[h1.addr])));
    let reloaded = Instant::now();
    handle.reload().unwrap();
    let mut removed = on.remove("h2").unwrap();
    removed.set_read_timeout(Some(drain + margin)).unwrap();
    let mut buf = [0u8; 8];
    let end = removed.read(&mut buf).map_err(|e| e.kind());
    let waited = reloaded.elapsed();
    // Cut short, so reset, not ended with a FIN.
    assert_eq!(
        end,
        Err(std::io::ErrorKind::ConnectionReset),
        "after {waited:?}"
    );
    assert!(
        waited >= drain && waited < drain + margin,
        "closed {waited:?} after the reload, drain period {drain:?}"
    );
    let ended = &handle.stats().unwrap().upstreams[0].ended;
    assert!(ended.contains(&("removed".to_string(), 1)), "{ended:?}");
    // The connection on the host that stayed is untouched.
    let mut kept = on.remove("h1").unwrap();
    kept.write_all(b"still here\n").unwrap();
    assert_eq!(read_line(&mut kept), "still here");
    handle.shutdown();
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

/// A reload that removes an upstream closes its listener at once; its
/// established connections keep relaying for the drain period, then are
/// closed. The loop's clock is moved on by the test, so the drain period
/// is an hour that no real time races.
#[test]
fn a_reload_that_removes_an_upstream_stops_listening_and_drains_its_pairs() {
    let drain = Duration::from_secs(3600);
    let h1 = spawn_host("h1", Behavior::Named);
    let h2 = spawn_host("h2", Behavior::Echo);
    let file = ConfigFile::new("remove-upstream");
    let header = "[defaults]\ndrain_timeout = \"1h\"\nidle_timeout = \"1d\"\n\n";
    // The removed upstream listens on an address no other test binds, so
    // that its freed port cannot be handed to a test running beside this
    // one and pass for a listener left open.
    let extra_toml = upstream_toml("extra", &[h2.addr]).replace("127.0.0.1:0", "127.0.0.9:0");
    file.write(&format!(
        "{header}{}{extra_toml}",
        upstream_toml("app", &[h1.addr]),
    ));
    let (app, handle, thread) = run_reloadable(&file);
    let extra_of =
        |stats: &tcplb::Stats| stats.upstreams.iter().find(|u| u.name == "extra").cloned();
    let extra = extra_of(&handle.stats().unwrap()).unwrap().listen;
    let mut rng = Rng::new(17);
    let mut c = TcpStream::connect(extra).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    echo_rounds(&mut c, &mut rng, 2);

    file.write(&format!("{header}{}", upstream_toml("app", &[h1.addr])));
    handle.reload().unwrap();
    let refused = TcpStream::connect(extra).map_err(|e| e.kind());
    assert_eq!(
        refused.err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "still listening on {extra}"
    );
    // Through most of the drain period, the connection relays.
    echo_rounds(&mut c, &mut rng, 2);
    handle.advance_clock(drain * 3 / 4).unwrap();
    echo_rounds(&mut c, &mut rng, 2);
    let stats = handle.stats().unwrap();
    let removed = extra_of(&stats).expect("listed while its pairs drain");
    assert!(
        removed.removed && removed.hosts[0].active == 1,
        "{removed:?}"
    );
    // Then it is cut.
    handle.advance_clock(drain / 2).unwrap();
    assert_eq!(closed_within(&mut c, Duration::from_secs(5)), Closed::Reset);
    proxy_settles(&handle);
    let stats = handle.stats().unwrap();
    assert!(extra_of(&stats).is_none(), "{stats:?}");
    // The upstream that stayed serves as before.
    let mut c = TcpStream::connect(app).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(read_line(&mut c), "h1");
    handle.shutdown();
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

/// Waits (bounded) until the loop holds no pair.
fn proxy_settles(handle: &tcplb::Handle) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while handle.stats().unwrap().pairs > 0 {
        assert!(Instant::now() < deadline, "pairs left");
        thread::yield_now();
    }
}

#[test]
fn an_invalid_reload_keeps_the_running_config() {
    let h1 = spawn_host("h1", Behavior::Named);
    let file = ConfigFile::new("invalid");
    file.write(&upstream_toml("app", &[h1.addr]));
    let (app, handle, thread) = run_reloadable(&file);
    file.write("[[upstream]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nhosts = []\nbogus = 1\n");
    let err = handle.reload().unwrap_err();
    assert!(
        err.contains("lb.toml:4:9: upstream `app` has no hosts"),
        "{err}"
    );
    assert!(err.contains("lb.toml:5:1: unknown key `bogus`"), "{err}");
    // A port already in use is rejected as a whole, too.
    let taken = TcpListener::bind(localhost()).unwrap();
    let busy = taken.local_addr().unwrap();
    file.write(&format!(
        "{}[[upstream]]\nname = \"two\"\nlisten = \"{busy}\"\nhosts = [\"{}\"]\n",
        upstream_toml("app", &[h1.addr]),
        h1.addr
    ));
    let err = handle.reload().unwrap_err();
    assert!(err.contains(&format!("cannot listen on {busy}")), "{err}");
    let stats = handle.stats().unwrap();
    assert_eq!(stats.reloads, 0);
    assert_eq!(stats.upstreams.len(), 1);
    let mut c = TcpStream::connect(app).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(read_line(&mut c), "h1");
    handle.shutdown();
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

#[test]
fn a_reload_changes_how_clients_are_refused() {
    let file = ConfigFile::new("refusal");
    let dead = upstream_toml("app", &[dead_addr()]);
    file.write(&dead);
    let (app, handle, thread) = run_reloadable(&file);
    let mut c = TcpStream::connect(app).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert!(read_line(&mut c).starts_with("ERROR upstream_unavailable:"));
    file.write(&format!("{}\nrefusal = \"reset\"\n", dead.trim_end()));
    handle.reload().unwrap();
    let mut c = TcpStream::connect(app).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let end = c.read(&mut [0u8; 64]).map_err(|e| e.kind());
    assert_eq!(end, Err(std::io::ErrorKind::ConnectionReset));
    handle.shutdown();
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

/// A reload that changes `relay` applies to established pairs from their
/// next bytes on: copied before, spliced after, copied again, every echo
/// byte-exact; a pool that no longer splices keeps no pipe.
#[test]
fn a_reload_changes_the_relay_of_established_pairs() {
    let h1 = spawn_host("h1", Behavior::Echo);
    let file = ConfigFile::new("relay");
    let body = upstream_toml("app", &[h1.addr]);
    let copy = format!("[defaults]\nrelay = \"copy\"\n\n{body}");
    file.write(&copy);
    let (app, handle, thread) = run_reloadable(&file);
    let counts = || {
        let u = &handle.stats().unwrap().upstreams[0];
        (u.bytes_up, u.spliced_up, u.spliced_down)
    };
    let mut rng = Rng::new(8);
    let mut c = TcpStream::connect(app).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    echo_rounds(&mut c, &mut rng, 8);
    let (copied, up, down) = counts();
    assert!(copied > 0);
    assert_eq!((up, down), (0, 0));

    // Splice, with pipes of a new size.
    file.write(&format!(
        "[defaults]\nrelay = \"splice\"\nbulk_buffer_size = \"128KiB\"\n\n{body}"
    ));
    handle.reload().unwrap();
    echo_rounds(&mut c, &mut rng, 8);
    let (relayed, up, down) = counts();
    assert_eq!((up, down), (relayed - copied, relayed - copied));
    assert!(handle.stats().unwrap().pipes_free > 0);

    // Back to copying, with pipes of the same size: none is kept.
    file.write(&format!(
        "[defaults]\nrelay = \"copy\"\nbulk_buffer_size = \"128KiB\"\n\n{body}"
    ));
    handle.reload().unwrap();
    assert_eq!(handle.stats().unwrap().pipes_free, 0);
    echo_rounds(&mut c, &mut rng, 8);
    let (after, up_after, down_after) = counts();
    assert!(after > relayed);
    assert_eq!((up_after, down_after), (up, down), "copied again");
    finish(c);
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

/// A reload that sets `socket_buffer` applies it to the listener kept from
/// before and to new connects to hosts; established pairs keep relaying.
#[test]
fn a_reload_applies_socket_buffer_to_kept_listeners() {
    let h1 = spawn_host("h1", Behavior::Echo);
    let file = ConfigFile::new("sockbuf");
    file.write(&upstream_toml("app", &[h1.addr]));
    let (app, handle, thread) = run_reloadable(&file);
    let mut rng = Rng::new(5);
    let mut before = TcpStream::connect(app).unwrap();
    before.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    echo_rounds(&mut before, &mut rng, 2);

    file.write(&format!(
        "[defaults]\nsocket_buffer = 12000\n\n{}",
        upstream_toml("app", &[h1.addr])
    ));
    handle.reload().unwrap();
    let mut after = TcpStream::connect(app).unwrap();
    after.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    echo_rounds(&mut after, &mut rng, 2);
    echo_rounds(&mut before, &mut rng, 2);

    let port = |s: &TcpStream| s.local_addr().unwrap().port();
    let fixed = [(24_000, 24_000)];
    // tcplb's accepted socket of the new client; of its two sockets to the
    // host, exactly one (the new pair's) is fixed.
    let accepted = kernel_buffers(&format!("src {app} and dport = :{}", port(&after)));
    assert_eq!(accepted, fixed);
    let to_host = kernel_buffers(&format!("dst {}", h1.addr));
    assert_eq!(to_host.len(), 2);
    let fixed_to_host = to_host.iter().filter(|b| **b == fixed[0]).count();
    assert_eq!(fixed_to_host, 1, "{to_host:?}");
    let old = kernel_buffers(&format!("src {app} and dport = :{}", port(&before)));
    assert_eq!(old.len(), 1);
    assert_ne!(old, fixed, "established pairs keep their buffers");
    finish(before);
    finish(after);
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

/// Command-line flags override the file at every reload, not only at start.
#[test]
fn flags_still_override_the_file_after_a_reload() {
    let h1 = spawn_host("h1", Behavior::Named);
    let file = ConfigFile::new("flags");
    file.write(&upstream_toml("app", &[h1.addr]));
    let bin = Binary::start(&[
        "--config",
        file.0.to_str().unwrap(),
        "--idle-timeout",
        "300ms",
        "--admin",
        "127.0.0.1:0",
    ]);
    let app = bin.listen_addr_of("app");
    let admin = bin.admin_addr();
    let (status, body) = http(admin, "POST", "/reload");
    assert_eq!((status, body.as_str()), (200, "reloaded\n"));
    // The file says nothing of [admin]; the flag's admin listener stays,
    // which is no change, so there is nothing to restart for.
    let reload_log = bin.log_until("configuration reloaded");
    assert!(
        !reload_log.iter().any(|l| l.contains("[admin]")),
        "{reload_log:#?}"
    );
    let mut c = TcpStream::connect(app).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(read_line(&mut c), "h1");
    let idle = Instant::now();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    let closed_after = idle.elapsed();
    // Closed for being idle, at the flag's 300 ms (the file's default is
    // an hour): the access line says why, and how long the pair lived by
    // tcplb's clock, which cannot be shorter than its idle timeout.
    assert!(
        closed_after < Duration::from_secs(5),
        "closed after {closed_after:?}, not at the flag's 300 ms idle timeout"
    );
    let access = bin.wait_for_log("tcplb::access");
    assert!(access.contains("end=idle_timeout"), "{access}");
    let ms: u64 = access
        .split(" ms=")
        .nth(1)
        .and_then(|m| m.split(' ').next()?.parse().ok())
        .unwrap();
    assert!((300..5000).contains(&ms), "{access}");
}

#[test]
fn sighup_and_post_reload_reload_the_binary() {
    let h1 = spawn_host("h1", Behavior::Named);
    let h2 = spawn_host("h2", Behavior::Named);
    let file = ConfigFile::new("sighup");
    file.write(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        upstream_toml("app", &[h1.addr])
    ));
    let bin = Binary::start(&["--config", file.0.to_str().unwrap()]);
    let app = bin.listen_addr_of("app");
    let admin = bin.admin_addr();
    file.write(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        upstream_toml("app", &[h2.addr])
    ));
    bin.signal("HUP");
    bin.wait_for_log("configuration reloaded");
    let mut c = TcpStream::connect(app).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(read_line(&mut c), "h2");
    file.write(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        upstream_toml("app", &[h1.addr])
    ));
    let (status, body) = http(admin, "POST", "/reload");
    assert_eq!((status, body.as_str()), (200, "reloaded\n"));
    let mut c = TcpStream::connect(app).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(read_line(&mut c), "h1");
}

#[test]
fn a_reload_logs_what_it_changed_and_a_rejection_in_one_line() {
    let (a, b) = (dead_addr(), dead_addr());
    let file = ConfigFile::new("reload-log");
    file.write(&format!(
        "{}{}{}",
        upstream_toml("keep", &[a]),
        upstream_toml("change", &[a]),
        upstream_toml("gone", &[a])
    ));
    let bin = Binary::start(&["--config", file.0.to_str().unwrap()]);
    bin.wait_for_log(" ready: ");
    file.write(&format!(
        "[defaults]\nbuffer_size = 4096\nbulk_buffer_size = 2048\n\n{}{}{}",
        upstream_toml("keep", &[a]),
        upstream_toml("change", &[b]),
        upstream_toml("new", &[a])
    ));
    bin.signal("HUP");
    let lines = bin.log_until("configuration reloaded");
    let logged = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(
        logged("reload: upstream `gone` removed, no longer listening on 127.0.0.1:"),
        "{lines:#?}"
    );
    assert!(
        logged("reload: upstream `new` added, listening on 127.0.0.1:"),
        "{lines:#?}"
    );
    assert!(
        logged(&format!(
            "reload: upstream `change` changed: hosts added: {b}; hosts removed: {a}"
        )),
        "{lines:#?}"
    );
    assert!(
        !logged("`keep`"),
        "an unchanged upstream is not logged: {lines:#?}"
    );
    assert!(
        logged("reload: [defaults] changed: buffer_size, bulk_buffer_size"),
        "{lines:#?}"
    );
    assert!(
        logged("lb.toml:3:20: warning: `bulk_buffer_size` (2048) is below"),
        "the new config's warnings: {lines:#?}"
    );
    assert!(
        logged("configuration reloaded: 1 upstream added, 1 removed, 1 changed, 1 unchanged"),
        "{lines:#?}"
    );
    file.write("[[upstream]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nhosts = []\nbogus = 1\n");
    bin.signal("HUP");
    let line = bin.wait_for_log("reload rejected");
    assert!(
        line.contains("the running configuration stays in force: "),
        "{line}"
    );
    assert!(
        line.contains("lb.toml:4:9: upstream `app` has no hosts; "),
        "{line}"
    );
    assert!(line.contains("lb.toml:5:1: unknown key `bogus`"), "{line}");
}

#[test]
fn close_on_down_closes_the_connections_of_a_down_host() {
    let mut a = ToggleHost::new("a");
    let health = HealthSettings {
        close_on_down: true,
        ..fast_checks()
    };
    let proxy = start(config_with(vec![upstream("test", &[a.addr], health)]));
    let (mut c, name) = greeting(&proxy);
    assert_eq!(name, "a");
    a.stop();
    // The established connection (whose host thread still serves it) is
    // cut when the checks take the host down: fall × interval, and room
    // for a busy machine.
    assert_eq!(closed_within(&mut c, Duration::from_secs(5)), Closed::Reset);
    let stats = proxy.stats();
    assert!(!stats.upstreams[0].hosts[0].up);
    assert_eq!(stats.pairs, 0);
}

/// `tcplb reload` with `args`: (exit code, stdout, stderr).
fn reload_command(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tcplb"))
        .arg("reload")
        .args(args)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn the_reload_command_waits_for_the_outcome_and_fails_on_rejection() {
    let h1 = spawn_host("h1", Behavior::Named);
    let h2 = spawn_host("h2", Behavior::Named);
    let file = ConfigFile::new("reload-command");
    let path = file.0.to_str().unwrap();
    file.write(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        upstream_toml("app", &[h1.addr])
    ));
    let bin = Binary::start(&["--config", path]);
    let app = bin.listen_addr_of("app");
    let admin = bin.admin_addr().to_string();
    // The file now names the address the running tcplb listens on, as a
    // deployed config does (a change of [admin] waits for a restart).
    let with_admin = |hosts: &[SocketAddr]| {
        format!(
            "[admin]\nlisten = \"{admin}\"\n\n{}",
            upstream_toml("app", hosts)
        )
    };
    file.write(&with_admin(&[h2.addr]));
    let (code, out, err) = reload_command(&["--config", path]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), format!("tcplb on {admin}: reloaded"));
    // It returned after the reload: the new host takes the next client.
    let mut c = TcpStream::connect(app).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(read_line(&mut c), "h2");

    // A config the running tcplb rejects: non-zero, with the reason, and
    // the running config stays in force.
    file.write(&format!(
        "{}[defaults]\nidle_timeout = 5\n",
        with_admin(&[h1.addr])
    ));
    let (code, _, err) = reload_command(&["--admin", &admin]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("reload rejected"), "{err}");
    assert!(
        err.contains(&format!("{path}:10:16: `idle_timeout` must be a string")),
        "{err}"
    );
    let mut c = TcpStream::connect(app).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(read_line(&mut c), "h2");

    // Nothing listens there: non-zero, naming the address.
    let dead = dead_addr().to_string();
    let (code, _, err) = reload_command(&["--admin", &dead]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot ask the admin listener on {dead}")),
        "{err}"
    );
    // A file without [admin]: nothing to ask.
    file.write(&upstream_toml("app", &[h1.addr]));
    let (code, _, err) = reload_command(&["--config", path]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("has no [admin] listen address"), "{err}");
}
