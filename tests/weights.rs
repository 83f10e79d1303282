//! Weighted hosts and per-host caps through the real reactor, at one and
//! several workers: least-connections ranks hosts by active connections
//! per unit of weight, and a host at its `max_connections` is skipped,
//! exactly, however many workers take connections at once.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;

use common::*;
use tcplb::{Config, HostConfig, Settings};

fn workers(n: usize) -> Settings {
    Settings {
        workers: n,
        ..Settings::default()
    }
}

/// One upstream whose hosts have these weights and caps.
fn weighted(hosts: &[(SocketAddr, u32, Option<u32>)], settings: Settings) -> Config {
    let addrs: Vec<SocketAddr> = hosts.iter().map(|h| h.0).collect();
    let mut config = config(&addrs, settings);
    config.upstreams[0].hosts = hosts
        .iter()
        .map(|&(addr, weight, max_connections)| HostConfig {
            addr,
            weight,
            max_connections,
        })
        .collect();
    config
}

/// Opens a client and returns it with the name its host greeted it with.
fn open(proxy: &Running) -> (TcpStream, String) {
    let mut c = proxy.connect();
    let name = read_line(&mut c);
    (c, name)
}

#[test]
fn weights_one_and_three_hold_two_and_six_of_eight() {
    for n in [1, 2, 4] {
        let a = spawn_host("A", Behavior::Named);
        let b = spawn_host("B", Behavior::Named);
        let hosts = [(a.addr, 1, None), (b.addr, 3, None)];
        let proxy = start_as_given(weighted(&hosts, workers(n)));
        let held: Vec<(TcpStream, String)> = (0..8).map(|_| open(&proxy)).collect();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (_, name) in &held {
            *names.entry(name.as_str()).or_default() += 1;
        }
        assert_eq!((names["A"], names["B"]), (2, 6), "workers = {n}: {names:?}");
        assert_eq!(proxy.host_counts(), [2, 6], "workers = {n}");
        let status = proxy.stats().upstreams[0].hosts.clone();
        assert_eq!(
            (status[0].weight, status[1].weight),
            (1, 3),
            "workers = {n}"
        );
        for (c, _) in held {
            finish(c);
        }
        assert_eq!(proxy.host_counts(), [0, 0], "workers = {n}");
    }
}

#[test]
fn a_host_at_its_cap_is_skipped() {
    let a = spawn_host("A", Behavior::Named);
    let b = spawn_host("B", Behavior::Named);
    let proxy = start(weighted(
        &[(a.addr, 1, Some(2)), (b.addr, 1, None)],
        Settings::default(),
    ));
    let held: Vec<(TcpStream, String)> = (0..6).map(|_| open(&proxy)).collect();
    let on_a = held.iter().filter(|(_, name)| name == "A").count();
    assert_eq!(on_a, 2, "A is never given more than its 2");
    assert_eq!(proxy.host_counts(), [2, 4]);
    // A slot of A frees: A is the least loaded again and takes the next.
    let at = held.iter().position(|(_, name)| name == "A").unwrap();
    let mut held = held;
    finish(held.remove(at).0);
    let (c, name) = open(&proxy);
    assert_eq!(name, "A");
    held.push((c, name));
    for (c, _) in held {
        finish(c);
    }
}

#[test]
fn caps_are_exact_across_four_workers_racing() {
    let a = spawn_host("A", Behavior::Named);
    let b = spawn_host("B", Behavior::Named);
    let hosts = [(a.addr, 1, Some(3)), (b.addr, 2, Some(3))];
    let proxy = start_as_given(weighted(&hosts, workers(4)));
    // Sixteen clients at once, from as many threads: six fit, the other
    // ten find every host at its cap and are refused at once (the
    // default `queue_timeout` is 0s).
    let addr = proxy.addr;
    let start = Arc::new(Barrier::new(16));
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                let mut c = TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let line = read_line(&mut c);
                (c, line)
            })
        })
        .collect();
    let answers: Vec<(TcpStream, String)> =
        clients.into_iter().map(|t| t.join().unwrap()).collect();
    let served = answers.iter().filter(|(_, l)| l == "A" || l == "B").count();
    let overloaded = answers
        .iter()
        .filter(|(_, l)| l.starts_with("ERROR overloaded:"))
        .count();
    assert_eq!((served, overloaded), (6, 10), "{answers:?}");
    assert_eq!(proxy.host_counts(), [3, 3]);
    for (c, _) in answers {
        finish(c);
    }
    proxy.wait_until("closed every pair", |s| s.pairs == 0);
    assert_eq!(proxy.host_counts(), [0, 0]);
}
