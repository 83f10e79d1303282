//! The proxies under comparison, each started as its own process in front
//! of the same upstream hosts, plus `direct` (no proxy at all).

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    Direct,
    Tcplb,
    TokioMt,
    TokioSt,
    Haproxy,
    Nginx,
}

pub const ALL: [Contender; 6] = [
    Contender::Direct,
    Contender::Tcplb,
    Contender::TokioMt,
    Contender::TokioSt,
    Contender::Haproxy,
    Contender::Nginx,
];

/// A started contender: where clients connect, and the process to measure.
pub struct Running {
    pub addr: SocketAddr,
    /// The process that relays (none for `direct`).
    pub pid: Option<u32>,
    child: Option<Child>,
    dir: Option<PathBuf>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Tcplb => "tcplb",
            Contender::TokioMt => "tokio-mt",
            Contender::TokioSt => "tokio-st",
            Contender::Haproxy => "haproxy",
            Contender::Nginx => "nginx",
        }
    }

    /// Whether this contender can run here; the reason when it cannot.
    pub fn available(self) -> Result<(), String> {
        match self {
            Contender::Haproxy if which("haproxy").is_none() => {
                Err("haproxy: not installed, skipped (apt-get install haproxy)".into())
            }
            Contender::Nginx if which("nginx").is_none() => Err(
                "nginx: not installed, skipped (apt-get install nginx libnginx-mod-stream)".into(),
            ),
            Contender::Nginx if !nginx_has_stream() => {
                Err("nginx: no stream module, skipped (apt-get install libnginx-mod-stream)".into())
            }
            _ => Ok(()),
        }
    }

    /// Starts the contender in front of `hosts` and waits until it accepts.
    pub fn start(self, hosts: &[SocketAddr]) -> Running {
        match self {
            Contender::Direct => Running {
                addr: hosts[0],
                pid: None,
                child: None,
                dir: None,
            },
            Contender::Tcplb => {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_tcplb"));
                cmd.args(["--listen", "127.0.0.1:0", "--max-connections", "20000"]);
                for h in hosts {
                    cmd.args(["--host", &h.to_string()]);
                }
                // Extra flags for experiments, e.g. "--buffer-size 64KiB".
                if let Ok(extra) = std::env::var("TCPLB_BENCH_TCPLB_ARGS") {
                    cmd.args(extra.split_whitespace());
                }
                cmd.env("RUST_LOG", "warn,tcplb::proxy=info");
                spawn_reporting(cmd, Report::Stderr("listening on "))
            }
            Contender::TokioMt | Contender::TokioSt => {
                let mut cmd = Command::new(std::env::current_exe().unwrap());
                let flavor = if self == Contender::TokioMt {
                    "mt"
                } else {
                    "st"
                };
                cmd.args(["--tokio-proxy", flavor]);
                cmd.args(hosts.iter().map(|h| h.to_string()));
                spawn_reporting(cmd, Report::Stdout("listening "))
            }
            Contender::Haproxy => {
                let addr = free_port();
                let dir = temp_dir("haproxy");
                let servers: String = hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| format!("    server h{i} {h}\n"))
                    .collect();
                let config = format!(
                    "global\n    nbthread 1\n    maxconn 9000\n\n\
                     defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\n\
                     listen lb\n    bind {addr}\n    balance leastconn\n{servers}"
                );
                let path = dir.join("haproxy.cfg");
                std::fs::write(&path, config).unwrap();
                let mut cmd = Command::new("haproxy");
                cmd.arg("-db").arg("-f").arg(&path);
                spawn_listening(cmd, addr, dir)
            }
            Contender::Nginx => {
                let addr = free_port();
                let dir = temp_dir("nginx");
                let servers: String = hosts
                    .iter()
                    .map(|h| format!("        server {h};\n"))
                    .collect();
                let module = nginx_stream_module()
                    .map(|m| format!("load_module {};\n", m.display()))
                    .unwrap_or_default();
                let config = format!(
                    "{module}worker_processes 1;\ndaemon off;\nmaster_process off;\n\
                     error_log stderr warn;\npid {pid};\nworker_rlimit_nofile 20000;\n\
                     events {{ worker_connections 20000; }}\n\
                     stream {{\n    upstream backend {{\n        least_conn;\n{servers}    }}\n\
                     \x20   server {{\n        listen {addr};\n        proxy_pass backend;\n        proxy_timeout 1h;\n    }}\n}}\n",
                    pid = dir.join("nginx.pid").display(),
                );
                let path = dir.join("nginx.conf");
                std::fs::write(&path, config).unwrap();
                let mut cmd = Command::new("nginx");
                cmd.arg("-p").arg(&dir).arg("-c").arg(&path);
                spawn_listening(cmd, addr, dir)
            }
        }
    }
}

enum Report {
    Stdout(&'static str),
    Stderr(&'static str),
}

/// Spawns a process that prints its listen address after `marker`.
fn spawn_reporting(mut cmd: Command, report: Report) -> Running {
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
        child: Some(child),
        dir: None,
    }
}

/// Reads a pipe to its end so the writer never blocks on it.
fn drain(mut pipe: Box<dyn Read + Send>) {
    std::thread::spawn(move || std::io::copy(&mut pipe, &mut std::io::sink()));
}

/// Spawns a process configured to listen on `addr` and waits until it does.
fn spawn_listening(mut cmd: Command, addr: SocketAddr, dir: PathBuf) -> Running {
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start contender");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{cmd:?} exited: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{cmd:?} never listened on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Running {
        addr,
        pid: Some(child.id()),
        child: Some(child),
        dir: Some(dir),
    }
}

fn free_port() -> SocketAddr {
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

fn which(program: &str) -> Option<PathBuf> {
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
