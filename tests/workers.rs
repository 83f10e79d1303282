//! Several workers: the host choice sees every worker's connections, the
//! process-wide caps hold across workers, every worker carries pairs, and
//! a reload under load at `workers = 4` keeps every connection byte-exact.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::thread;

use common::*;
use tcplb::{Config, Proxy, Settings};

fn workers(n: usize) -> Settings {
    Settings {
        workers: n,
        ..Settings::default()
    }
}

#[test]
fn least_connections_is_exact_across_workers() {
    for n in [1, 2, 4] {
        let a = spawn_host("A", Behavior::Named);
        let b = spawn_host("B", Behavior::Named);
        let proxy = start_as_given(config(&[a.addr, b.addr], workers(n)));
        // One after another, each held: whichever worker takes a
        // connection, it sees the counts of all the others.
        let mut held: Vec<(TcpStream, String)> = Vec::new();
        let open = |held: &mut Vec<(TcpStream, String)>| {
            let mut c = proxy.connect();
            let name = read_line(&mut c);
            held.push((c, name.clone()));
            name
        };
        let mut names: HashMap<String, usize> = HashMap::new();
        for _ in 0..20 {
            *names.entry(open(&mut held)).or_default() += 1;
        }
        assert_eq!(names["A"], 10, "workers = {n}: {names:?}");
        assert_eq!(names["B"], 10, "workers = {n}: {names:?}");
        assert_eq!(proxy.host_counts(), [10, 10], "workers = {n}");
        let stats = proxy.stats();
        assert_eq!(stats.workers.len(), n);
        assert_eq!(stats.workers.iter().sum::<usize>(), 20);
        // Six of A's end (in whatever workers they were): the next six
        // must all go to A, which only a count of every worker's pairs knows.
        for _ in 0..6 {
            let at = held.iter().position(|(_, name)| name == "A").unwrap();
            finish(held.remove(at).0);
        }
        let next: Vec<String> = (0..6).map(|_| open(&mut held)).collect();
        assert!(
            next.iter().all(|name| name == "A"),
            "workers = {n}: {next:?}"
        );
        assert_eq!(proxy.host_counts(), [10, 10], "workers = {n}");
        for (c, _) in held {
            finish(c);
        }
    }
}

#[test]
fn every_worker_carries_pairs() {
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start_as_given(config(&[host.addr], workers(2)));
    let held: Vec<TcpStream> = (0..64)
        .map(|i| {
            let mut c = proxy.connect();
            writeln!(c, "{i}").unwrap();
            assert_eq!(read_line(&mut c), i.to_string());
            c
        })
        .collect();
    let per_worker = proxy.stats().workers;
    // The kernel spreads connections by their addresses: with 64, a worker
    // left without any would mean it does not accept.
    assert!(per_worker.iter().all(|&n| n > 0), "{per_worker:?}");
    assert_eq!(per_worker.iter().sum::<usize>(), 64);
    for c in held {
        finish(c);
    }
}

#[test]
fn max_connections_holds_for_the_whole_process() {
    let host = spawn_host("h", Behavior::Echo);
    let settings = Settings {
        max_connections: 10,
        ..workers(4)
    };
    let proxy = start_as_given(config(&[host.addr], settings));
    let mut relayed = Vec::new();
    let mut overloaded = 0;
    for i in 0..30 {
        let mut c = proxy.connect();
        writeln!(c, "{i}").unwrap();
        let line = read_line(&mut c);
        if line.starts_with("ERROR overloaded:") {
            overloaded += 1;
        } else {
            assert_eq!(line, i.to_string());
            relayed.push(c);
        }
    }
    assert_eq!((relayed.len(), overloaded), (10, 20));
    for c in relayed {
        finish(c);
    }
}

/// A config file the test rewrites.
struct File(PathBuf);

impl File {
    fn write(&self, listen: SocketAddr, hosts: &[SocketAddr], workers: usize) {
        let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
        let text = format!(
            "[defaults]\nworkers = {workers}\n\n[[upstream]]\nname = \"app\"\nlisten = \"{listen}\"\nhosts = [{}]\n",
            hosts.join(", ")
        );
        std::fs::write(&self.0, text).unwrap();
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

#[test]
fn a_reload_under_load_at_four_workers_keeps_every_connection_exact() {
    let dir = std::env::temp_dir().join(format!("tcplb-workers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = File(dir.join("lb.toml"));
    let hosts: Vec<SocketAddr> = (0..3)
        .map(|i| spawn_host(&format!("e{i}"), Behavior::Echo).addr)
        .collect();
    // Bind first on port 0, then keep the port it got across reloads.
    file.write("127.0.0.1:0".parse().unwrap(), &hosts[..1], 4);
    let config = Config::load(&file.0).unwrap();
    let mut proxy = Proxy::bind(&config).unwrap();
    let addr = proxy.listen_addr("app").unwrap();
    file.write(addr, &hosts[..1], 4);
    proxy.set_config_path(file.0.clone());
    let handle = proxy.handle();
    let running = thread::spawn(move || proxy.run());
    // Clients stream echo through it while it reloads.
    let transfers: Vec<_> = (0..16)
        .map(|i| {
            thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let data = Rng::new(i + 1).bytes(2 << 20);
                let mut writer = c.try_clone().unwrap();
                let sent = data.clone();
                let send = thread::spawn(move || {
                    writer.write_all(&sent).unwrap();
                    writer.shutdown(Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                c.read_to_end(&mut back).unwrap();
                send.join().unwrap();
                back == data
            })
        })
        .collect();
    for round in 0..6 {
        // Hosts come and go; the first one stays, so nothing drains.
        let keep = 1 + round % 3;
        file.write(addr, &hosts[..keep], 4);
        handle.reload().unwrap();
    }
    let intact = transfers
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|ok| *ok)
        .count();
    assert_eq!(intact, 16, "every transfer survived the reloads byte-exact");
    let stats = handle.stats().unwrap();
    assert_eq!(stats.reloads, 6);
    assert_eq!(stats.workers.len(), 4, "a reload keeps the workers running");
    // New connections after the last reload reach the hosts it left.
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"after\n").unwrap();
    assert_eq!(read_line(&mut c), "after");
    finish(c);
    handle.shutdown();
    handle.shutdown();
    running.join().unwrap().unwrap();
}
