//! The proxies under comparison, each started as its own process in front
//! of the same upstream hosts, plus `direct` (no proxy at all).
//!
//! Each peer runs twice or three times: with its defaults, tuned as an
//! expert would for throughput (64 KiB buffers, splicing where it has it),
//! and with two threads or workers. Every start returns the exact command
//! line and configuration file it used, for the results file.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::procfs;

/// The buffer size of every tuned contender, in bytes (64 KiB).
pub const TUNED_BUFFER: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Direct,
    /// `baseline`: the binary named by `TCPLB_BENCH_BASELINE` (another
    /// build of tcplb, e.g. an older commit's) instead of this one.
    Tcplb {
        workers: u32,
        baseline: bool,
    },
    /// `buffer: None` is `copy_bidirectional`'s own (8 KiB).
    Tokio {
        multi_thread: bool,
        buffer: Option<usize>,
    },
    Haproxy {
        tuned: bool,
        threads: u32,
    },
    Nginx {
        tuned: bool,
        workers: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contender {
    name: &'static str,
    kind: Kind,
}

const fn contender(name: &'static str, kind: Kind) -> Contender {
    Contender { name, kind }
}

pub const ALL: [Contender; 14] = [
    contender("direct", Kind::Direct),
    contender(
        "tcplb",
        Kind::Tcplb {
            workers: 1,
            baseline: false,
        },
    ),
    contender(
        "tcplb-baseline",
        Kind::Tcplb {
            workers: 1,
            baseline: true,
        },
    ),
    contender(
        "tcplb-w2",
        Kind::Tcplb {
            workers: 2,
            baseline: false,
        },
    ),
    contender(
        "tokio-mt",
        Kind::Tokio {
            multi_thread: true,
            buffer: None,
        },
    ),
    contender(
        "tokio-st",
        Kind::Tokio {
            multi_thread: false,
            buffer: None,
        },
    ),
    contender(
        "tokio-mt-64k",
        Kind::Tokio {
            multi_thread: true,
            buffer: Some(TUNED_BUFFER),
        },
    ),
    contender(
        "tokio-st-64k",
        Kind::Tokio {
            multi_thread: false,
            buffer: Some(TUNED_BUFFER),
        },
    ),
    contender(
        "haproxy",
        Kind::Haproxy {
            tuned: false,
            threads: 1,
        },
    ),
    contender(
        "haproxy-tuned",
        Kind::Haproxy {
            tuned: true,
            threads: 1,
        },
    ),
    contender(
        "haproxy-nbthread2",
        Kind::Haproxy {
            tuned: true,
            threads: 2,
        },
    ),
    contender(
        "nginx",
        Kind::Nginx {
            tuned: false,
            workers: 1,
        },
    ),
    contender(
        "nginx-tuned",
        Kind::Nginx {
            tuned: true,
            workers: 1,
        },
    ),
    contender(
        "nginx-w2",
        Kind::Nginx {
            tuned: true,
            workers: 2,
        },
    ),
];

/// Per-round ratios worth a table of their own, (contender, baseline): what
/// a second thread or worker buys each proxy, and tcplb's two workers
/// against the peers' two.
pub const COMPARISONS: [(&str, &str); 6] = [
    ("tcplb", "tcplb-baseline"),
    ("tcplb-w2", "tcplb"),
    ("haproxy-nbthread2", "haproxy-tuned"),
    ("nginx-w2", "nginx-tuned"),
    ("haproxy-nbthread2", "tcplb-w2"),
    ("nginx-w2", "tcplb-w2"),
];

/// Where processes run when the benchmark is pinned (`TCPLB_BENCH_PIN=1`).
#[derive(Clone, Copy, Debug)]
pub struct Pin {
    /// `taskset -c` list for the proxy under test.
    pub proxy: &'static str,
    /// The benchmark process (load generators, upstream servers, external
    /// tools it starts).
    pub load: &'static str,
}

pub const PIN: Pin = Pin {
    proxy: "1",
    load: "0",
};

/// A started contender: where clients connect, and the process to measure.
pub struct Running {
    pub addr: SocketAddr,
    /// The process that relays (none for `direct`); for a multi-process
    /// proxy, the parent of the processes that relay.
    pub pid: Option<u32>,
    /// The exact command line and configuration file it runs with.
    pub config: String,
    child: Option<Child>,
    /// Stop with SIGTERM first: a master process that must take its
    /// workers down with it.
    graceful: bool,
    dir: Option<PathBuf>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if self.graceful {
                stop_gracefully(child);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// SIGTERM (through kill(1): the crate forbids `unsafe`), then up to 5 s
/// for the process to exit.
fn stop_gracefully(child: &mut Child) {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    if !sent {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Contender {
    pub fn name(self) -> &'static str {
        self.name
    }

    /// Whether it runs more than one thread or process that relays (its
    /// figures under pinning then share one core).
    pub fn parallel(self) -> bool {
        match self.kind {
            Kind::Direct => false,
            Kind::Tcplb { workers, .. } => workers > 1,
            Kind::Tokio { multi_thread, .. } => multi_thread,
            Kind::Haproxy { threads, .. } => threads > 1,
            Kind::Nginx { workers, .. } => workers > 1,
        }
    }

    /// Whether this contender can run here; the reason when it cannot.
    pub fn available(self) -> Result<(), String> {
        let name = self.name;
        match self.kind {
            Kind::Haproxy { .. } if which("haproxy").is_none() => Err(format!(
                "{name}: HAProxy not installed, skipped (apt-get install haproxy)"
            )),
            Kind::Nginx { .. } if which("nginx").is_none() => Err(format!(
                "{name}: nginx not installed, skipped (apt-get install nginx libnginx-mod-stream)"
            )),
            Kind::Tcplb { baseline: true, .. } if baseline_binary().is_none() => Err(format!(
                "{name}: no TCPLB_BENCH_BASELINE (the path of another tcplb build), skipped"
            )),
            Kind::Nginx { .. } if !nginx_has_stream() => Err(format!(
                "{name}: nginx has no stream module, skipped (apt-get install libnginx-mod-stream)"
            )),
            _ => Ok(()),
        }
    }

    /// Starts the contender in front of `hosts` and waits until it accepts.
    /// With `pin`, the proxy runs under `taskset -c <pin.proxy>`, which is
    /// checked.
    pub fn start(self, hosts: &[SocketAddr], pin: Option<Pin>) -> Running {
        let running = self.spawn(hosts, pin);
        if let (Some(pin), Some(pid)) = (pin, running.pid) {
            let cpus = procfs::cpus(pid);
            assert_eq!(
                cpus.as_deref(),
                Some(pin.proxy),
                "{} runs on CPUs {cpus:?}, not the pinned {}",
                self.name,
                pin.proxy
            );
        }
        running
    }

    fn spawn(self, hosts: &[SocketAddr], pin: Option<Pin>) -> Running {
        match self.kind {
            Kind::Direct => Running {
                addr: hosts[0],
                pid: None,
                config: "no proxy: clients connect to the first upstream host".to_string(),
                child: None,
                graceful: false,
                dir: None,
            },
            Kind::Tcplb { workers, baseline } => {
                let binary = match baseline {
                    true => baseline_binary().expect("checked by available()"),
                    false => env!("CARGO_BIN_EXE_tcplb").to_string(),
                };
                let mut cmd = command(&binary, pin);
                cmd.args(["--listen", "127.0.0.1:0", "--max-connections", "20000"]);
                for h in hosts {
                    cmd.args(["--host", &h.to_string()]);
                }
                if workers > 1 {
                    cmd.args(["--workers", &workers.to_string()]);
                }
                // Extra flags for experiments, e.g. "--buffer-size 64KiB".
                if let Ok(extra) = std::env::var("TCPLB_BENCH_TCPLB_ARGS") {
                    cmd.args(extra.split_whitespace());
                }
                cmd.env("RUST_LOG", "warn,tcplb::proxy=info");
                let config = format!(
                    "RUST_LOG=warn,tcplb::proxy=info {}\n\
                     (defaults otherwise: 16 KiB buffers moving up to 64 KiB bulk buffers)",
                    command_line(&cmd)
                );
                spawn_reporting(cmd, Report::Stderr("listening on "), config)
            }
            Kind::Tokio {
                multi_thread,
                buffer,
            } => {
                let mut cmd = command(std::env::current_exe().unwrap().to_str().unwrap(), pin);
                let flavor = if multi_thread { "mt" } else { "st" };
                let size = buffer.map_or("default".to_string(), |b| b.to_string());
                cmd.args(["--tokio-proxy", flavor, &size]);
                cmd.args(hosts.iter().map(|h| h.to_string()));
                let runtime = if multi_thread {
                    "multi-threaded runtime, one worker thread per available core"
                } else {
                    "current-thread runtime"
                };
                let copy = match buffer {
                    Some(b) => format!("copy_bidirectional_with_sizes({b}, {b})"),
                    None => "copy_bidirectional (8 KiB per direction)".to_string(),
                };
                let exe = std::env::current_exe().unwrap();
                let exe = exe.file_name().unwrap().to_string_lossy();
                let config = format!(
                    "{}\n(`proxy` is the benchmark binary, benches/proxy/tokio_proxy.rs; tokio \
                     {runtime}; one task per client; {copy}; TCP_NODELAY; least connections)",
                    command_line(&cmd).replacen(exe.as_ref(), "proxy", 1)
                );
                spawn_reporting(cmd, Report::Stdout("listening "), config)
            }
            Kind::Haproxy { tuned, threads } => {
                let addr = free_port();
                let dir = temp_dir(self.name);
                let config = haproxy_config(addr, hosts, tuned, threads);
                let path = dir.join("haproxy.cfg");
                std::fs::write(&path, &config).unwrap();
                let mut cmd = command("haproxy", pin);
                cmd.arg("-db").arg("-f").arg(&path);
                let shown = format!(
                    "{}\n\n# haproxy.cfg\n{config}",
                    command_line(&cmd).replace(&path.display().to_string(), "haproxy.cfg")
                );
                spawn_listening(cmd, addr, dir, shown, false)
            }
            Kind::Nginx { tuned, workers } => {
                let addr = free_port();
                let dir = temp_dir(self.name);
                // Shown with DIR for the temporary directory it runs in.
                let config = nginx_config(addr, hosts, tuned, workers);
                let path = dir.join("nginx.conf");
                std::fs::write(&path, config.replace("DIR", &dir.display().to_string())).unwrap();
                let mut cmd = command("nginx", pin);
                cmd.arg("-p").arg(&dir).arg("-c").arg(&path);
                let shown = format!(
                    "{}\n\n# nginx.conf\n{config}",
                    command_line(&cmd)
                        .replace(&path.display().to_string(), "nginx.conf")
                        .replace(&dir.display().to_string(), "DIR")
                );
                spawn_listening(cmd, addr, dir, shown, workers > 1)
            }
        }
    }
}

/// `program`, or `taskset -c <cpus> program` when pinned. taskset execs the
/// program, so the child's pid is the proxy's.
fn command(program: &str, pin: Option<Pin>) -> Command {
    match pin {
        Some(pin) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", pin.proxy, program]);
            cmd
        }
        None => Command::new(program),
    }
}

/// The command as a shell line, programs by their file name only.
fn command_line(cmd: &Command) -> String {
    let base = |s: &std::ffi::OsStr| {
        let p = Path::new(s);
        if p.is_absolute() {
            p.file_name().unwrap_or(s).to_string_lossy().into_owned()
        } else {
            s.to_string_lossy().into_owned()
        }
    };
    // Under taskset, the proxy's program path is its third argument.
    let wrapped = cmd.get_program() == "taskset";
    let args = cmd.get_args().enumerate().map(|(k, a)| {
        if wrapped && k == 2 {
            base(a)
        } else {
            a.to_string_lossy().into_owned()
        }
    });
    std::iter::once(base(cmd.get_program()))
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ")
}

/// HAProxy in `mode tcp` with `balance leastconn`. Tuned: 64 KiB buffers
/// (`tune.bufsize`, default 16 KiB) and `option splice-auto` (splice(2)
/// when the kernel and the traffic allow it).
fn haproxy_config(addr: SocketAddr, hosts: &[SocketAddr], tuned: bool, threads: u32) -> String {
    let servers: String = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| format!("    server h{i} {h}\n"))
        .collect();
    // Splicing reserves two descriptors per pipe, maxconn / 4 pipes by
    // default, which would put HAProxy over a 20,000 descriptor limit at
    // maxconn 9000 (the scale scenario's 8,000 connections need it); 512
    // pipes are far more than the bulk runs' 8 streams hold at once.
    let (global, listen) = if tuned {
        (
            format!("    tune.bufsize {TUNED_BUFFER}\n    maxpipes 512\n"),
            "    option splice-auto\n",
        )
    } else {
        (String::new(), "")
    };
    format!(
        "global\n    nbthread {threads}\n    maxconn 9000\n{global}\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\n\
         listen lb\n    bind {addr}\n    balance leastconn\n{listen}{servers}"
    )
}

/// nginx's stream module with `least_conn`. Tuned: `proxy_buffer_size 64k`
/// (default 16k). Two workers need the master process, which the
/// benchmark then stops with SIGTERM so the workers go with it, and a
/// shared `zone` for the upstream, without which each worker would count
/// only its own connections (tcplb's and HAProxy's least connections are
/// global).
fn nginx_config(addr: SocketAddr, hosts: &[SocketAddr], tuned: bool, workers: u32) -> String {
    let servers: String = hosts
        .iter()
        .map(|h| format!("        server {h};\n"))
        .collect();
    let module = nginx_stream_module()
        .map(|m| format!("load_module {};\n", m.display()))
        .unwrap_or_default();
    let (master, zone) = if workers > 1 {
        ("on", "        zone backend 64k;\n")
    } else {
        ("off", "")
    };
    let buffer = if tuned {
        format!("        proxy_buffer_size {}k;\n", TUNED_BUFFER / 1024)
    } else {
        String::new()
    };
    format!(
        "{module}worker_processes {workers};\ndaemon off;\nmaster_process {master};\n\
         error_log stderr warn;\npid DIR/nginx.pid;\nworker_rlimit_nofile 20000;\n\
         events {{ worker_connections 20000; }}\n\
         stream {{\n    upstream backend {{\n{zone}        least_conn;\n{servers}    }}\n\
         \x20   server {{\n        listen {addr};\n        proxy_pass backend;\n        proxy_timeout 1h;\n{buffer}    }}\n}}\n"
    )
}

enum Report {
    Stdout(&'static str),
    Stderr(&'static str),
}

/// Spawns a process that prints its listen address after `marker`.
fn spawn_reporting(mut cmd: Command, report: Report, config: String) -> Running {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start contender");
    let stdout: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
    let stderr: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
    let (watched, other, marker) = match report {
        Report::Stdout(m) => (stdout, stderr, m),
        Report::Stderr(m) => (stderr, stdout, m),
    };
    drain(other);
    let mut reader = BufReader::new(watched);
    let addr = loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "contender exited");
        if let Some(rest) = line.split(marker).nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    drain(Box::new(reader));
    Running {
        addr,
        pid: Some(child.id()),
        config,
        child: Some(child),
        graceful: false,
        dir: None,
    }
}

/// Reads a pipe to its end so the writer never blocks on it.
fn drain(mut pipe: Box<dyn Read + Send>) {
    std::thread::spawn(move || std::io::copy(&mut pipe, &mut std::io::sink()));
}

/// Spawns a process configured to listen on `addr` and waits until it does.
fn spawn_listening(
    mut cmd: Command,
    addr: SocketAddr,
    dir: PathBuf,
    config: String,
    graceful: bool,
) -> Running {
    // Its complaints, for the panic message when it does not start.
    let log = dir.join("stderr.log");
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let child = cmd.spawn().expect("start contender");
    let mut running = Running {
        addr,
        pid: Some(child.id()),
        config,
        child: Some(child),
        graceful,
        dir: Some(dir),
    };
    let what = format!("{}\n{}", command_line(&cmd), running.config);
    wait_listening(running.child.as_mut().unwrap(), addr, &what, Some(&log));
    running
}

/// Polls `addr` until it accepts; panics if `child` exits first (quoting
/// its `log`, if any) or 10 s pass.
pub fn wait_listening(child: &mut Child, addr: SocketAddr, what: &str, log: Option<&Path>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            let said = log
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            panic!("{what}\nexited: {status}\n{said}");
        }
        assert!(Instant::now() < deadline, "{what} never listened on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tcplb-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    dir
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn nginx_stream_module() -> Option<PathBuf> {
    let path = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    path.is_file().then(|| path.to_path_buf())
}

/// Built in, or available as a module to load.
fn nginx_has_stream() -> bool {
    let built_in = Command::new("nginx")
        .arg("-V")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stderr);
            text.contains("--with-stream ") || text.ends_with("--with-stream")
        })
        .unwrap_or(false);
    built_in || nginx_stream_module().is_some()
}

/// The first line of `program`'s version output, for the notes.
pub fn version(program: &str, flag: &str) -> Option<String> {
    let out = Command::new(which(program)?).arg(flag).output().ok()?;
    // nginx prints its version on stderr.
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let text = String::from_utf8_lossy(&text);
    text.lines().next().map(|l| l.trim().to_string())
}

/// The other tcplb build to compare with (`TCPLB_BENCH_BASELINE`), if set.
fn baseline_binary() -> Option<String> {
    std::env::var("TCPLB_BENCH_BASELINE")
        .ok()
        .filter(|path| !path.is_empty())
}
