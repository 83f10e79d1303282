//! `[cluster]`: client limits shared by several tcplb processes through
//! one real `redis-server` (each test starts its own on a free loopback
//! port, without persistence, and kills it at the end).
//!
//! The instances are the real binary, one process each, as they would be
//! deployed. An mTLS client with `rate = 10`, `burst = 10` connects to all
//! of them at once, as fast as it can: with `[cluster]` the group admits
//! within the documented bound (`burst + rate × T + instances × lease`),
//! without it each instance admits the whole rate. Redis killed and
//! restarted, Redis that never answers, and an instance that crashes
//! holding connections are the other scenarios.
//!
//! `rediss://`: the same sharing through a Redis that speaks TLS (its
//! certificate made here, for 127.0.0.1), a Redis whose certificate
//! `tls_ca` did not issue, a Redis that requires a client certificate,
//! and the system trust store. Such a Redis also listens in plain TCP on
//! another port, for the test's own `PING` and look-ups only: tcplb is
//! given the TLS port.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::pki::{self, Pki};
use common::{Behavior, Binary, IO_TIMEOUT, spawn_host};

/// The scenarios that hammer run one at a time: their figures are
/// admissions per second of real time, on a shared 2-core machine.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The client's rule in every scenario but the crash one.
const RATE: f64 = 10.0;
const BURST: u32 = 10;

/// A `redis-server` of the test's own, killed on drop.
struct Redis {
    /// The plain port (the test's own commands; tcplb's, without TLS).
    port: u16,
    /// The TLS port, when it serves TLS: what tcplb is given then.
    tls_port: Option<u16>,
    child: Child,
}

/// What a Redis serves TLS with.
struct RedisTlsFiles {
    cert: PathBuf,
    key: PathBuf,
    /// The CA that client certificates must chain to.
    ca: PathBuf,
    /// `tls-auth-clients`: a client certificate is required.
    auth_clients: bool,
}

/// Two distinct free loopback ports.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

impl Redis {
    /// Starts one on a free loopback port; `None`, with a note, where
    /// redis-server is not installed (CI installs it, and sets
    /// `TCPLB_REQUIRE_TOOLS`, which makes a missing one a failure).
    fn start() -> Option<Redis> {
        Redis::start_with(None)
    }

    /// Like [`start`](Self::start), serving TLS too, with `files`.
    fn start_tls(files: &RedisTlsFiles) -> Option<Redis> {
        Redis::start_with(Some(files))
    }

    fn start_with(tls: Option<&RedisTlsFiles>) -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            let why = "redis-server is not installed (apt-get install redis-server)";
            assert!(std::env::var_os("TCPLB_REQUIRE_TOOLS").is_none(), "{why}");
            eprintln!("skipped: {why}");
            return None;
        }
        for _ in 0..5 {
            let (port, tls_port) = free_ports();
            if let Some(redis) = Redis::launch(port, tls.map(|files| (tls_port, files))) {
                return Some(redis);
            }
        }
        panic!("redis-server did not start (five free ports tried)");
    }

    /// Starts one on `port`; `None` if it could not listen there.
    fn start_on(port: u16) -> Option<Redis> {
        Redis::launch(port, None)
    }

    /// Starts one on `port` (and with `tls`, TLS on its port too); `None`
    /// if it could not listen there.
    fn launch(port: u16, tls: Option<(u16, &RedisTlsFiles)>) -> Option<Redis> {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
        if let Some((tls_port, files)) = tls {
            let auth = if files.auth_clients { "yes" } else { "no" };
            command
                .args(["--tls-port", &tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(&files.cert)
                .arg("--tls-key-file")
                .arg(&files.key)
                .arg("--tls-ca-cert-file")
                .arg(&files.ca)
                .args(["--tls-auth-clients", auth]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install redis-server; .ci/run does)");
        let mut redis = Redis {
            port,
            tls_port: tls.map(|(p, _)| p),
            child,
        };
        let deadline = Instant::now() + IO_TIMEOUT;
        while Instant::now() < deadline {
            if redis.child.try_wait().unwrap().is_some() {
                return None;
            }
            if redis.command("PING").is_ok_and(|r| r == "+PONG") {
                return Some(redis);
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {port} never answered PING");
    }

    /// What tcplb is given: the TLS port when there is one.
    fn url(&self) -> String {
        match self.tls_port {
            Some(port) => format!("rediss://127.0.0.1:{port}/0"),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// One inline command; its reply's first line.
    fn command(&self, command: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("{command}\r\n").as_bytes())?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte)? == 1 && byte[0] != b'\n' {
            reply.push(byte[0]);
        }
        Ok(String::from_utf8_lossy(&reply).trim_end().to_string())
    }

    /// Kills it (SIGKILL: as a crash, nothing flushed or said).
    fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The certificates, the host and the config files of a scenario.
struct Group {
    pki: Pki,
    client: Arc<rustls::ClientConfig>,
    host: SocketAddr,
    /// Whatever `[cluster]` and `[[client]]` say, in TOML.
    cluster: Option<String>,
    rule: String,
    workers: usize,
    /// `NAME=value` set in each instance's environment.
    env: Vec<String>,
    files: Mutex<u32>,
}

impl Group {
    fn new(name: &str, cluster: Option<String>) -> Group {
        let pki = Pki::new(name);
        let alice = pki.client("alice");
        let client = pki.client_config(Some(&alice));
        let host = spawn_host("h", Behavior::Named).addr;
        Group {
            pki,
            client,
            host,
            cluster,
            rule: format!("rate = {RATE}\nburst = {BURST}\n"),
            workers: 1,
            env: Vec::new(),
            files: Mutex::new(0),
        }
    }

    /// Starts one tcplb; waits until it has connected to Redis, when it
    /// shares limits.
    fn instance(&self) -> Instance {
        let instance = self.start();
        if self.cluster.is_some() {
            log_within(&instance.bin, "cluster: connected to Redis", IO_TIMEOUT);
        }
        instance
    }

    /// Starts one tcplb, without waiting for anything.
    fn start(&self) -> Instance {
        let mut n = self.files.lock().unwrap();
        *n += 1;
        let path: PathBuf = self.pki.dir.join(format!("lb{n}.toml"));
        let text = format!(
            "[defaults]\nworkers = {workers}\n\n[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nclient_ca = \"{ca}\"\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n{cluster}\n\
             [[upstream]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{host}\"]\n\n\
             [[client]]\nidentity = \"alice\"\nupstreams = [\"app\"]\n{rule}",
            workers = self.workers,
            cert = self.pki.server_cert.display(),
            key = self.pki.server_key.display(),
            ca = self.pki.ca_path.display(),
            cluster = self.cluster.as_deref().unwrap_or(""),
            host = self.host,
            rule = self.rule,
        );
        std::fs::write(&path, text).unwrap();
        let args = ["--config", path.to_str().unwrap()];
        let bin = if self.env.is_empty() {
            Binary::start(&args)
        } else {
            let wrapper: Vec<&str> = std::iter::once("env")
                .chain(self.env.iter().map(String::as_str))
                .collect();
            Binary::start_wrapped(&wrapper, &args)
        };
        let app = bin.listen_addr_of("app");
        let admin = bin.admin_addr();
        Instance { bin, app, admin }
    }
}

/// The stderr lines of `bin` up to one containing `needle`, which must
/// come within `within` (a deadline for the whole wait, whatever else is
/// logged meanwhile).
fn log_within(bin: &Binary, needle: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match bin.stderr.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                lines.push(line);
                if found {
                    return lines;
                }
            }
            Err(e) => {
                panic!("no log line containing {needle:?} within {within:?} ({e}): {lines:#?}")
            }
        }
    }
}

struct Instance {
    bin: Binary,
    app: SocketAddr,
    admin: SocketAddr,
}

impl Instance {
    fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    }

    /// The value of the `tcplb_cluster_redis_up` gauge.
    fn redis_up(&self) -> Option<u32> {
        self.metric("tcplb_cluster_redis_up").map(|n| n as u32)
    }

    /// The value of the metric `name` (its one labelled line).
    fn metric(&self, name: &str) -> Option<u64> {
        let text = self.metrics();
        let line = text.lines().find(|l| l.starts_with(&format!("{name}{{")))?;
        line.rsplit(' ').next()?.parse().ok()
    }

    /// Waits (bounded) until Redis was found down `n` times.
    fn wait_failures(&self, n: u64) {
        let deadline = Instant::now() + IO_TIMEOUT;
        while self.metric("tcplb_cluster_failures_total").unwrap_or(0) < n {
            assert!(
                Instant::now() < deadline,
                "Redis was never found down {n} times"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) until the gauge reads `up`.
    fn wait_redis_up(&self, up: u32) {
        let deadline = Instant::now() + IO_TIMEOUT;
        while self.redis_up() != Some(up) {
            assert!(
                Instant::now() < deadline,
                "tcplb_cluster_redis_up never became {up}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// How one connection attempt of the client ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Admitted,
    RateLimited,
    TooMany,
    /// Anything else: a failed handshake, a read error.
    Other,
}

/// One mTLS connection: admitted (the host's greeting), or refused (the
/// refusal line). An admitted connection is returned, open.
fn attempt(
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
) -> (Outcome, Option<pki::TlsStream>) {
    let Ok(mut s) = pki::connect(addr, client.clone()) else {
        return (Outcome::Other, None);
    };
    match pki::read_line(&mut s) {
        Ok(line) if line == "h" => (Outcome::Admitted, Some(s)),
        Ok(line) if line.starts_with("ERROR rate_limited") => (Outcome::RateLimited, None),
        Ok(line) if line.starts_with("ERROR too_many_connections") => (Outcome::TooMany, None),
        _ => (Outcome::Other, None),
    }
}

/// What a hammering run counted.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    admitted: u64,
    refused: u64,
    other: u64,
    /// From before the first attempt to after the last.
    seconds: f64,
}

/// Connects to every address at once (a thread each), as fast as each
/// can, for `length`; counts what happened.
fn hammer(addrs: &[SocketAddr], client: &Arc<rustls::ClientConfig>, length: Duration) -> Tally {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let threads: Vec<_> = addrs
        .iter()
        .map(|&addr| {
            let (client, stop) = (client.clone(), stop.clone());
            thread::spawn(move || {
                let mut tally = Tally::default();
                while !stop.load(Ordering::Relaxed) {
                    match attempt(addr, &client).0 {
                        Outcome::Admitted => tally.admitted += 1,
                        Outcome::RateLimited => tally.refused += 1,
                        _ => tally.other += 1,
                    }
                }
                tally
            })
        })
        .collect();
    thread::sleep(length);
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for t in threads {
        let t = t.join().unwrap();
        total.admitted += t.admitted;
        total.refused += t.refused;
        total.other += t.other;
    }
    total.seconds = started.elapsed().as_secs_f64();
    total
}

/// The documented bound on what the group admits over `seconds`:
/// `burst + rate × T + instances × lease` (the lease is 1 for this rule).
fn bound(seconds: f64, instances: usize) -> f64 {
    f64::from(BURST) + RATE * seconds + instances as f64
}

fn cluster_table(redis: &Redis, instances: usize, extra: &str) -> String {
    format!(
        "[cluster]\nredis = \"{}\"\ninstances = {instances}\n{extra}\n",
        redis.url()
    )
}

/// A Redis that serves TLS with a certificate for 127.0.0.1 (an IP SAN)
/// issued by `pki`'s CA, and with `auth_clients` requires a client
/// certificate of that CA; `None` where redis-server is not installed.
fn tls_redis(pki: &Pki, auth_clients: bool) -> Option<Redis> {
    let cert = pki.server_for_ip("127.0.0.1".parse().unwrap(), "redis");
    Redis::start_tls(&RedisTlsFiles {
        cert: cert.cert_path,
        key: cert.key_path,
        ca: pki.ca_path.clone(),
        auth_clients,
    })
}

/// `tls_ca = "..."` of `[cluster]`, trusting `pki`'s CA.
fn tls_ca(pki: &Pki) -> String {
    format!("tls_ca = \"{}\"", pki.ca_path.display())
}

/// How the instances reach Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Plain,
    /// `rediss://`, with `tls_ca`.
    Tls,
}

/// The group shares one bucket: within the bound, and not far below it;
/// the same processes without `[cluster]` admit about `instances` times more.
fn shares_one_bucket(instances: usize, workers: usize, transport: Transport) {
    let _heavy = heavy();
    let redis_pki = (transport == Transport::Tls).then(|| Pki::new("redis"));
    let redis = match &redis_pki {
        Some(pki) => tls_redis(pki, false),
        None => Redis::start(),
    };
    let Some(redis) = redis else {
        return;
    };
    let extra = redis_pki.as_ref().map(tls_ca).unwrap_or_default();
    let mut group = Group::new(
        &format!("share{instances}"),
        Some(cluster_table(&redis, instances, &extra)),
    );
    group.workers = workers;
    let running: Vec<Instance> = (0..instances).map(|_| group.instance()).collect();
    let addrs: Vec<SocketAddr> = running.iter().map(|i| i.app).collect();
    let shared = hammer(&addrs, &group.client, Duration::from_secs(5));
    let limit = bound(shared.seconds, instances);
    println!(
        "{instances} instances sharing Redis ({transport:?}, {}): {} admitted, {} refused, {} other in {:.2} s (bound {limit:.1})",
        redis.url(),
        shared.admitted,
        shared.refused,
        shared.other,
        shared.seconds
    );
    assert!(shared.admitted as f64 <= limit, "{shared:?}: over {limit}");
    assert!(
        shared.admitted as f64 >= limit / 2.0,
        "{shared:?}: the group admits far less than its rate"
    );
    assert!(
        shared.refused > shared.admitted,
        "{shared:?}: the client was not held back"
    );
    for i in &running {
        assert_eq!(i.redis_up(), Some(1));
    }
    drop(running);

    let alone = Group::new(&format!("alone{instances}"), None);
    let running: Vec<Instance> = (0..instances).map(|_| alone.instance()).collect();
    let addrs: Vec<SocketAddr> = running.iter().map(|i| i.app).collect();
    let apart = hammer(&addrs, &alone.client, Duration::from_secs(2));
    let limit = bound(apart.seconds, instances);
    let each = f64::from(BURST) + RATE * apart.seconds;
    println!(
        "{instances} instances without [cluster]: {} admitted in {:.2} s ({:.1}x the group's bound of {limit:.1})",
        apart.admitted,
        apart.seconds,
        apart.admitted as f64 / limit
    );
    assert!(
        apart.admitted as f64 > limit * 1.5,
        "{apart:?}: no over-admission without [cluster]?"
    );
    assert!(apart.admitted as f64 <= each * instances as f64 + instances as f64);
    assert!(
        running[0]
            .metrics()
            .lines()
            .all(|l| !l.starts_with("tcplb_cluster"))
    );
}

#[test]
fn two_instances_share_one_bucket_and_apart_admit_twice_the_rate() {
    shares_one_bucket(2, 1, Transport::Plain);
}

#[test]
fn three_instances_of_two_workers_share_one_bucket_and_apart_admit_thrice() {
    shares_one_bucket(3, 2, Transport::Plain);
}

#[test]
fn two_instances_share_one_bucket_through_a_tls_redis() {
    shares_one_bucket(2, 1, Transport::Tls);
}

/// The log line saying Redis is unreachable, which must come first
/// (nothing may connect meanwhile).
fn unreachable_line(instance: &Instance) -> String {
    let lines = log_within(&instance.bin, "is unreachable", IO_TIMEOUT);
    assert!(
        lines.iter().all(|l| !l.contains("connected to Redis")),
        "{lines:#?}"
    );
    lines.last().unwrap().clone()
}

/// No line since the last one read says Redis was reached.
fn never_connected(instance: &Instance) {
    let later: Vec<String> = instance.bin.stderr.try_iter().collect();
    assert!(
        later.iter().all(|l| !l.contains("connected to Redis")),
        "{later:#?}"
    );
}

#[test]
fn a_redis_whose_certificate_tls_ca_did_not_issue_stays_down_and_the_fallback_admits() {
    let _heavy = heavy();
    let redis_pki = Pki::new("redis");
    let Some(redis) = tls_redis(&redis_pki, false) else {
        return;
    };
    let stranger = Pki::new("stranger");
    let group = Group::new(
        "stranger",
        Some(cluster_table(&redis, 2, &tls_ca(&stranger))),
    );
    let instance = group.start();
    let line = unreachable_line(&instance);
    println!("{line}");
    assert!(line.contains(&redis.url()), "{line}");
    assert!(
        line.contains("(cannot connect: TLS: the handshake failed: its certificate is not issued by a CA of tls_ca)"),
        "{line}"
    );
    // It keeps trying, and fails every time: Redis stays down.
    instance.wait_failures(3);
    assert_eq!(instance.redis_up(), Some(0));
    // The fallback decides, at once.
    let t = Instant::now();
    assert_eq!(attempt(instance.app, &group.client).0, Outcome::Admitted);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(instance.redis_up(), Some(0));
    never_connected(&instance);
}

#[test]
fn a_redis_that_requires_a_client_certificate_takes_tls_cert_and_refuses_tcplb_without() {
    let _heavy = heavy();
    let redis_pki = Pki::new("redis-mtls");
    let Some(redis) = tls_redis(&redis_pki, true) else {
        return;
    };
    // Without a client certificate: refused, and the log says why.
    let without = Group::new(
        "no-client-cert",
        Some(cluster_table(&redis, 2, &tls_ca(&redis_pki))),
    );
    let refused = without.start();
    let line = unreachable_line(&refused);
    println!("{line}");
    assert!(
        line.contains("TLS: it requires a client certificate (set tls_cert and tls_key)"),
        "{line}"
    );
    refused.wait_failures(2);
    assert_eq!(refused.redis_up(), Some(0));
    never_connected(&refused);
    drop(refused);

    // With one of the CA Redis trusts: connected, and limits shared.
    let tcplb = redis_pki.client("tcplb");
    let files = format!(
        "{}\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        tls_ca(&redis_pki),
        tcplb.cert_path.display(),
        tcplb.key_path.display()
    );
    let with = Group::new("client-cert", Some(cluster_table(&redis, 2, &files)));
    let instance = with.instance();
    instance.wait_redis_up(1);
    // The first connection asks Redis (no lease yet), which answers.
    assert_eq!(attempt(instance.app, &with.client).0, Outcome::Admitted);
    assert!(
        instance.metric("tcplb_cluster_requests_total") >= Some(1),
        "{}",
        instance.metrics()
    );
    assert_eq!(instance.metric("tcplb_cluster_failures_total"), Some(0));
    assert_eq!(instance.redis_up(), Some(1));
}

#[test]
fn without_tls_ca_the_system_trust_store_verifies_redis() {
    let _heavy = heavy();
    let redis_pki = Pki::new("redis-system");
    let Some(redis) = tls_redis(&redis_pki, false) else {
        return;
    };
    // The system's store is where SSL_CERT_FILE says, as for OpenSSL.
    let mut group = Group::new("system-store", Some(cluster_table(&redis, 2, "")));
    group.env = vec![format!("SSL_CERT_FILE={}", redis_pki.ca_path.display())];
    let trusting = group.instance();
    trusting.wait_redis_up(1);
    drop(trusting);
    let stranger = Pki::new("system-stranger");
    group.env = vec![format!("SSL_CERT_FILE={}", stranger.ca_path.display())];
    let distrusting = group.start();
    let line = unreachable_line(&distrusting);
    assert!(
        line.contains(
            "its certificate is not issued by a CA of the system trust store (tls_ca is not set)"
        ),
        "{line}"
    );
    assert_eq!(distrusting.redis_up(), Some(0));
}

#[test]
fn check_and_start_read_the_tls_files_of_a_rediss_url_and_name_a_bad_one() {
    let pki = Pki::new("check-rediss");
    let client = pki.client("tcplb");
    let other = pki.client("other");
    let config = |files: &str| {
        let path = pki.dir.join("lb.toml");
        std::fs::write(
            &path,
            format!(
                "[cluster]\nredis = \"rediss://127.0.0.1:6390/0\"\ninstances = 2\n{files}\n\n\
                 [[upstream]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"127.0.0.1:1\"]\n"
            ),
        )
        .unwrap();
        path
    };
    let tcplb = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tcplb"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Relative names are the config file's folder's.
    let good = config(&format!(
        "tls_ca = \"ca.pem\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        client.cert_path.display(),
        client.key_path.display()
    ));
    let good = good.to_str().unwrap();
    assert_eq!(tcplb(&["check", good]).0, Some(0));

    let missing = pki.dir.join("missing.pem");
    let path = config(&format!("tls_ca = \"{}\"", missing.display()));
    let path = path.to_str().unwrap();
    let (code, err) = tcplb(&["check", path]);
    let expected = format!(
        "{path}:4:10: TLS file {}: cannot read: No such file or directory",
        missing.display()
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&expected), "{err}");
    // Start-up reads them too, and stops on the same.
    let (code, err) = tcplb(&["--config", path]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&expected), "{err}");

    let path = config(&format!(
        "tls_ca = \"ca.pem\"\ntls_cert = \"{}\"\ntls_key = \"{}\"",
        client.cert_path.display(),
        other.key_path.display()
    ));
    let path = path.to_str().unwrap();
    let (code, err) = tcplb(&["check", path]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{path}:6:11: TLS file {}: this private key does not match the certificate in {}",
            other.key_path.display(),
            client.cert_path.display()
        )),
        "{err}"
    );
}

#[test]
fn redis_killed_mid_run_falls_back_and_sharing_resumes() {
    let _heavy = heavy();
    let Some(redis) = Redis::start() else {
        return;
    };
    let group = Group::new(
        "restart",
        Some(cluster_table(&redis, 2, "timeout = \"200ms\"")),
    );
    let (a, b) = (group.instance(), group.instance());
    let addrs = [a.app, b.app];
    let before = hammer(&addrs, &group.client, Duration::from_millis(1500));
    assert!(
        before.admitted as f64 <= bound(before.seconds, 2),
        "{before:?}"
    );

    let port = redis.kill();
    a.wait_redis_up(0);
    b.wait_redis_up(0);
    let during = hammer(&addrs, &group.client, Duration::from_millis(1500));
    // Each alone: half the rate, half the burst; plus leased tokens left.
    let split = f64::from(BURST) + RATE * during.seconds + 2.0;
    println!(
        "Redis down, each instance alone: {} admitted in {:.2} s (split bound {split:.1})",
        during.admitted, during.seconds
    );
    assert!(during.admitted as f64 <= split, "{during:?}");
    assert!(
        during.admitted >= 2,
        "{during:?}: the fallback admits nobody"
    );
    assert_eq!(during.other, 0, "{during:?}: no client may be stuck or cut");

    let redis = Redis::start_on(port).expect("redis-server restarts on its port");
    for i in [&a, &b] {
        let lines = log_within(&i.bin, "answers again", IO_TIMEOUT);
        let down: Vec<&String> = lines.iter().filter(|l| l.contains("unreachable")).collect();
        assert_eq!(down.len(), 1, "one log line while down: {down:#?}");
        i.wait_redis_up(1);
    }
    let after = hammer(&addrs, &group.client, Duration::from_millis(1500));
    println!(
        "Redis back: {} admitted in {:.2} s (bound {:.1})",
        after.admitted,
        after.seconds,
        bound(after.seconds, 2)
    );
    assert!(
        after.admitted as f64 <= bound(after.seconds, 2),
        "{after:?}"
    );
    assert!(after.admitted >= 5, "{after:?}: sharing did not resume");
    // The group's bucket is in the new Redis.
    assert!(
        redis
            .command("EXISTS tcplb:rate:alice")
            .unwrap()
            .starts_with(':')
    );
}

/// A "Redis" that accepts connections and never reads or answers.
fn silent_redis() -> (SocketAddr, Arc<Mutex<Vec<TcpStream>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            keep.lock().unwrap().push(conn);
        }
    });
    (addr, held)
}

#[test]
fn a_redis_that_never_answers_slows_no_relay_and_the_fallback_applies_within_its_timeout() {
    let _heavy = heavy();
    let (silent, held) = silent_redis();
    let timeout = Duration::from_secs(2);
    let cluster = format!(
        "[cluster]\nredis = \"redis://{silent}\"\ninstances = 2\ntimeout = \"2s\"\n\n\
         [[upstream]]\nname = \"plain\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{echo}\"]\ntls = false\n",
        echo = spawn_host("echo", Behavior::Echo).addr
    );
    let group = Group::new("silent", Some(cluster));
    // Not `instance()`: it would wait for a connection that never comes.
    let path = group.pki.dir.join("silent.toml");
    std::fs::write(
        &path,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{}\n\
             [[upstream]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{}\"]\n\n\
             [[client]]\nidentity = \"alice\"\nupstreams = [\"app\"]\n{}",
            group.pki.server_cert.display(),
            group.pki.server_key.display(),
            group.pki.ca_path.display(),
            group.cluster.as_deref().unwrap(),
            group.host,
            group.rule
        ),
    )
    .unwrap();
    let bin = Binary::start(&["--config", path.to_str().unwrap()]);
    // In the file's order.
    let plain = bin.listen_addr_of("plain");
    let app = bin.listen_addr_of("app");
    let admin = bin.admin_addr();
    let instance = Instance { bin, app, admin };

    // Round trips through the plain upstream for the whole scenario.
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut s = TcpStream::connect(plain).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let (mut worst, mut trips) = (Duration::ZERO, 0u64);
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                s.write_all(&[trips as u8; 64]).unwrap();
                s.read_exact(&mut buf).unwrap();
                assert_eq!(buf, [trips as u8; 64], "bytes relayed end to end");
                worst = worst.max(t.elapsed());
                trips += 1;
                thread::sleep(Duration::from_millis(2));
            }
            (worst, trips)
        })
    };

    // The first client waits at most the timeout for Redis, then the
    // fallback admits it.
    let t = Instant::now();
    let (outcome, _conn) = attempt(app, &group.client);
    let waited = t.elapsed();
    println!("first admission with a silent Redis took {waited:?} (timeout {timeout:?})");
    assert_eq!(outcome, Outcome::Admitted);
    assert!(waited < timeout + Duration::from_secs(1), "{waited:?}");
    instance.wait_redis_up(0);
    // From then on the fallback decides at once: half the rate, half the burst.
    let during = hammer(&[app], &group.client, Duration::from_secs(1));
    let split = f64::from(BURST) / 2.0 + RATE / 2.0 * during.seconds + 1.0;
    assert!(
        during.admitted >= 1 && during.admitted as f64 <= split,
        "{during:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let (worst, trips) = pinger.join().unwrap();
    println!("plain relay beside it: {trips} round trips, the slowest {worst:?}");
    assert!(trips > 100, "{trips}");
    // A loop that waited on Redis would stall for the whole timeout.
    assert!(worst < timeout / 2, "a round trip took {worst:?}");
    assert!(
        !held.lock().unwrap().is_empty(),
        "tcplb never reached the silent Redis"
    );
    let metrics = instance.metrics();
    assert!(
        metrics.contains("tcplb_cluster_failures_total{"),
        "{metrics}"
    );
}

#[test]
fn a_crashed_instances_connections_stop_counting_after_the_expiry() {
    let _heavy = heavy();
    let Some(redis) = Redis::start() else {
        return;
    };
    let expiry = Duration::from_secs(2);
    let mut group = Group::new(
        "crash",
        Some(cluster_table(&redis, 2, "connections_expiry = \"2s\"")),
    );
    group.rule = "rate = 1000\nburst = 1000\nmax_connections = 2\n".to_string();
    let (a, b) = (group.instance(), group.instance());
    let mut held: Vec<_> = (0..2)
        .map(|_| match attempt(a.app, &group.client) {
            (Outcome::Admitted, Some(s)) => s,
            other => panic!("{:?}", other.0),
        })
        .collect();
    // The cap is the group's: none left at the other instance.
    assert_eq!(attempt(b.app, &group.client).0, Outcome::TooMany);
    // A connection closed at one instance frees a place at the other.
    pki::close_write(&mut held[0]);
    let mut rest = Vec::new();
    let _ = held[0].read_to_end(&mut rest);
    held.remove(0);
    let at_b = wait_admitted(b.app, &group.client, IO_TIMEOUT);
    assert_eq!(attempt(b.app, &group.client).0, Outcome::TooMany);

    // a crashes with its connection open: its count stays in Redis until
    // the expiry, then stops counting.
    let mut a = a;
    let _ = a.bin.child.kill();
    let _ = a.bin.child.wait();
    let crashed = Instant::now();
    let again = wait_admitted(b.app, &group.client, expiry + IO_TIMEOUT);
    let took = crashed.elapsed();
    println!("a crashed instance's connection stopped counting after {took:?} (expiry {expiry:?})");
    assert!(took <= expiry + Duration::from_secs(2), "{took:?}");
    drop((at_b, again, held));
}

/// Connects until admitted (refused: too many) within `within`; the
/// admitted connection, open.
fn wait_admitted(
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    within: Duration,
) -> pki::TlsStream {
    let deadline = Instant::now() + within;
    loop {
        match attempt(addr, client) {
            (Outcome::Admitted, Some(s)) => return s,
            (Outcome::TooMany, _) => {}
            (other, _) => panic!("{other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "never admitted within {within:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}
