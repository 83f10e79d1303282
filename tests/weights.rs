//! Weighted hosts, per-host caps and the wait queue through the real
//! reactor, at one and several workers: least-connections ranks hosts by
//! active connections per unit of weight; a host at its `max_connections`
//! is skipped, exactly, however many workers take connections at once;
//! when every host is full, clients wait up to `queue_timeout` (on the
//! loop's clock, moved by the tests) and are admitted as slots free, in
//! whichever worker.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::Duration;

use common::*;
use tcplb::{Config, HostConfig, Settings};

fn workers(n: usize) -> Settings {
    Settings {
        workers: n,
        // The queue tests run in each relay mode (`TCPLB_TEST_RELAY`).
        relay: test_relay().unwrap_or_default(),
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
    // The client sees the end as tcplb sends it; the slot is free once the
    // pair has closed, which another worker's accept may otherwise beat.
    proxy.wait_until("given A's slot back", |s| {
        s.upstreams[0].hosts.iter().map(|h| h.active).eq([1, 4])
    });
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

/// One host, "A", that takes one connection at a time, with clients
/// allowed to wait `queue_timeout` (and at most `max_queued` of them).
fn one_slot(
    queue_timeout: Duration,
    max_queued: Option<u32>,
    workers: usize,
) -> (TestHost, Running) {
    let a = spawn_host("A", Behavior::Named);
    let mut config = weighted(&[(a.addr, 1, Some(1))], self::workers(workers));
    config.upstreams[0].queue_timeout = Some(queue_timeout);
    config.upstreams[0].max_queued = max_queued;
    (a, start_as_given(config))
}

/// Waits until `n` clients are in the queue.
fn wait_queued(proxy: &Running, n: u32) {
    proxy.wait_until(&format!("{n} queued"), |s| s.upstreams[0].queued == n);
}

#[test]
fn a_queued_client_is_admitted_the_moment_a_slot_frees() {
    let (_a, proxy) = one_slot(Duration::from_secs(30), None, 1);
    let (first, _) = open(&proxy);
    let mut second = proxy.connect();
    wait_queued(&proxy, 1);
    assert_eq!(proxy.host_counts(), [1], "the queued client holds no slot");
    finish(first);
    assert_eq!(read_line(&mut second), "A", "admitted, and relayed");
    let stats = proxy.stats();
    assert_eq!(stats.upstreams[0].queued, 0);
    assert_eq!(stats.upstreams[0].queue_waits.count, 1);
    assert_eq!(proxy.host_counts(), [1]);
    finish(second);
}

#[test]
fn queue_timeout_refuses_a_waiting_client_with_overloaded() {
    let (_a, proxy) = one_slot(Duration::from_secs(30), None, 1);
    let (first, _) = open(&proxy);
    let mut second = proxy.connect();
    wait_queued(&proxy, 1);
    // Not yet: just before the timeout, it still waits.
    proxy.handle.advance_clock(Duration::from_secs(29)).unwrap();
    assert_eq!(proxy.stats().upstreams[0].queued, 1);
    proxy.handle.advance_clock(Duration::from_secs(2)).unwrap();
    let line = read_line(&mut second);
    assert!(line.starts_with("ERROR overloaded: "), "{line:?}");
    let stats = proxy.stats();
    let u = &stats.upstreams[0];
    assert_eq!(u.queued, 0);
    assert_eq!(u.refused, [("overloaded".to_string(), 1)]);
    assert_eq!(u.queue_waits.count, 1);
    assert!(u.queue_waits.sum >= 30.0, "{:?}", u.queue_waits);
    finish(first);
    finish(second);
}

#[test]
fn max_queued_bounds_the_queue() {
    let (_a, proxy) = one_slot(Duration::from_secs(30), Some(2), 1);
    let (first, _) = open(&proxy);
    let waiting: Vec<TcpStream> = (0..2).map(|_| proxy.connect()).collect();
    wait_queued(&proxy, 2);
    // The third finds the queue full: refused at once.
    let mut third = proxy.connect();
    let line = read_line(&mut third);
    assert!(line.starts_with("ERROR overloaded: "), "{line:?}");
    assert_eq!(proxy.stats().upstreams[0].queued, 2);
    // The two waiting are served in turn.
    finish(first);
    let mut waiting = waiting.into_iter();
    let mut next = waiting.next().unwrap();
    assert_eq!(read_line(&mut next), "A");
    finish(next);
    let mut last = waiting.next().unwrap();
    assert_eq!(read_line(&mut last), "A");
    finish(last);
    finish(third);
}

#[test]
fn a_client_that_resets_while_queued_gives_its_place_back() {
    let (_a, proxy) = one_slot(Duration::from_secs(30), None, 1);
    let (first, _) = open(&proxy);
    let leaving = proxy.connect();
    wait_queued(&proxy, 1);
    socket2::SockRef::from(&leaving)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(leaving);
    wait_queued(&proxy, 0);
    proxy.wait_until("closed the reset pair", |s| s.pairs == 1);
    let ended = proxy.stats().upstreams[0].ended.clone();
    assert_eq!(ended, [("client_reset".to_string(), 1)]);
    // The slot goes to the next client, not to the one that left.
    finish(first);
    let (next, name) = open(&proxy);
    assert_eq!(name, "A");
    finish(next);
}

#[test]
fn a_slot_freed_in_any_worker_admits_a_client_queued_in_another() {
    let (_a, proxy) = one_slot(Duration::from_secs(60), None, 4);
    let (first, _) = open(&proxy);
    let holder = proxy.stats().workers.iter().position(|&n| n == 1).unwrap();
    // Clients wait, each on a thread that reads its greeting (once
    // admitted), reports it, and finishes when told to; at least four,
    // and until one of them waits in another worker than the holder's
    // (the kernel spreads connections by their addresses).
    let (admitted_tx, admitted) = mpsc::channel();
    let mut releases = Vec::new();
    let mut threads = Vec::new();
    let mut elsewhere = false;
    while releases.len() < 4 || !elsewhere {
        assert!(
            releases.len() < 40,
            "every client landed in worker {holder}"
        );
        let i = releases.len();
        let mut c = proxy.connect();
        let (release, released) = mpsc::channel::<()>();
        releases.push(release);
        let admitted_tx = admitted_tx.clone();
        threads.push(thread::spawn(move || {
            let name = read_line(&mut c);
            admitted_tx.send((i, name)).unwrap();
            released.recv_timeout(IO_TIMEOUT).unwrap();
            finish(c);
        }));
        wait_queued(&proxy, releases.len() as u32);
        let per_worker = proxy.stats().workers;
        elsewhere = per_worker
            .iter()
            .enumerate()
            .any(|(w, &n)| w != holder && n > 0);
    }
    let waiting = releases.len();
    // Each slot freed, in whichever worker, must reach a queue where a
    // client waits, in whichever worker.
    finish(first);
    for left in (0..waiting).rev() {
        let (i, name) = admitted.recv_timeout(IO_TIMEOUT).unwrap();
        assert_eq!(name, "A");
        assert_eq!(proxy.host_counts(), [1], "never more than the cap");
        wait_queued(&proxy, left as u32);
        releases[i].send(()).unwrap();
    }
    for t in threads {
        t.join().unwrap();
    }
    proxy.wait_until("closed every pair", |s| s.pairs == 0);
    let waits = proxy.stats().upstreams[0].queue_waits.count;
    assert_eq!(waits, waiting as u64);
}

#[test]
fn a_reload_changes_weights_and_caps_in_place() {
    let a = spawn_host("A", Behavior::Named);
    let b = spawn_host("B", Behavior::Named);
    let dir = std::env::temp_dir().join(format!("tcplb-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    let write = |listen: SocketAddr, b_host: &str| {
        let text = format!(
            "[defaults]\nworkers = 2\n\n[[upstream]]\nname = \"app\"\nlisten = \"{listen}\"\nhosts = [\"{}\", {b_host}]\n",
            a.addr
        );
        std::fs::write(&path, text).unwrap();
    };
    write("127.0.0.1:0".parse().unwrap(), &format!("\"{}\"", b.addr));
    let config = Config::load(&path).unwrap();
    let mut proxy = tcplb::Proxy::bind(&config).unwrap();
    let addr = proxy.listen_addr("app").unwrap();
    proxy.set_config_path(path.clone());
    let handle = proxy.handle();
    let running = thread::spawn(move || proxy.run());
    let open = || {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let name = read_line(&mut c);
        (c, name)
    };
    // Equal weights: 2 and 2.
    let held: Vec<(TcpStream, String)> = (0..4).map(|_| open()).collect();
    let counts = |handle: &tcplb::Handle| -> Vec<u32> {
        handle.stats().unwrap().upstreams[0]
            .hosts
            .iter()
            .map(|h| h.active)
            .collect()
    };
    assert_eq!(counts(&handle), [2, 2]);
    // B now weighs 3 and takes at most 6: the next 4 all go to B (2/1
    // against 6/3 after them), the one after that to A, and B is full.
    write(
        addr,
        &format!(
            "{{ address = \"{}\", weight = 3, max_connections = 6 }}",
            b.addr
        ),
    );
    handle.reload().unwrap();
    let more: Vec<(TcpStream, String)> = (0..4).map(|_| open()).collect();
    assert!(more.iter().all(|(_, n)| n == "B"), "{more:?}");
    assert_eq!(counts(&handle), [2, 6], "the connections held were kept");
    let hosts = handle.stats().unwrap().upstreams[0].hosts.clone();
    assert_eq!((hosts[1].weight, hosts[1].max_connections), (3, Some(6)));
    let (last, name) = open();
    assert_eq!(name, "A", "B is at its new cap");
    for (c, _) in held.into_iter().chain(more).chain([(last, name)]) {
        finish(c);
    }
    handle.shutdown();
    handle.shutdown();
    running.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
