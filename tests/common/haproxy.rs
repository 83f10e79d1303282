//! HAProxy as a peer in tests: run in the foreground from a config
//! written for the test, its log lines read, killed on drop.

use std::io::Read;
use std::net::TcpListener;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use super::{IO_TIMEOUT, localhost};

/// HAProxy, run in the foreground with `config` (in which `{stats}`
/// stands for its stats socket, whose appearance says it is listening);
/// killed on drop. `None` (with a note) where HAProxy is not installed.
pub struct Haproxy {
    pub child: std::process::Child,
    /// Its stdout lines (its log, with `log stdout`).
    pub log: mpsc::Receiver<String>,
    dir: std::path::PathBuf,
}

pub fn haproxy_binary() -> Option<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("haproxy"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/sbin/haproxy")])
        .find(|p| p.is_file())
}

impl Haproxy {
    pub fn start(test: &str, config: &str) -> Option<Haproxy> {
        let Some(binary) = haproxy_binary() else {
            // CI installs it and sets TCPLB_REQUIRE_TOOLS: no silent skip there.
            assert!(
                std::env::var_os("TCPLB_REQUIRE_TOOLS").is_none(),
                "{test}: haproxy is not installed"
            );
            eprintln!("{test}: skipped, haproxy is not installed (apt-get install haproxy)");
            return None;
        };
        let dir = std::env::temp_dir().join(format!("tcplb-haproxy-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stats = dir.join("stats.sock");
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config.replace("{stats}", stats.to_str().unwrap())).unwrap();
        let mut child = std::process::Command::new(binary)
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, log) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut haproxy = Haproxy { child, log, dir };
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        while !stats.exists() {
            if let Ok(Some(status)) = haproxy.child.try_wait() {
                let mut err = String::new();
                let _ = haproxy
                    .child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err);
                panic!("haproxy exited ({status}):\n{err}\n{config}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "haproxy never started"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Some(haproxy)
    }

    /// The next log line starting with `prefix`.
    pub fn log_line(&self, prefix: &str) -> String {
        loop {
            let line = self
                .log
                .recv_timeout(IO_TIMEOUT)
                .unwrap_or_else(|e| panic!("no haproxy log line starting with {prefix:?}: {e}"));
            if let Some(rest) = line.strip_prefix(prefix) {
                return rest.to_string();
            }
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port free right now on 127.0.0.1, for a program that cannot report
/// the one the kernel gave it.
pub fn free_port() -> u16 {
    TcpListener::bind(localhost())
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
