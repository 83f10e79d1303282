//! Host choice and failure handling through the real reactor:
//! least-connections placement, failover, refusals, and counters.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use tcplb::{RefusalMode, Settings};

/// Connects a client and returns it with the name its host greeted it with.
fn connect_named(proxy: &Running) -> (TcpStream, String) {
    let mut c = proxy.connect();
    let name = read_line(&mut c);
    (c, name)
}

#[test]
fn new_connections_go_to_the_host_with_fewest() {
    let a = spawn_host("A", Behavior::Named);
    let b = spawn_host("B", Behavior::Named);
    let proxy = start(config(&[a.addr, b.addr], Settings::default()));

    // Two idle hosts: the first two clients are spread over both.
    let (c1, n1) = connect_named(&proxy);
    let (c2, n2) = connect_named(&proxy);
    assert_ne!(n1, n2);
    // A tie at 1-1 goes to one host; close the client on the other one, so
    // that one host holds two connections and the other none.
    let (c3, n3) = connect_named(&proxy);
    let (busy, idle) = if n3 == "A" { ("A", "B") } else { ("B", "A") };
    let (keep, close) = if n1 == busy { (c1, c2) } else { (c2, c1) };
    finish(close);
    let counts = proxy.host_counts();
    let busy_index = usize::from(busy == "B");
    assert_eq!(counts[busy_index], 2, "{counts:?}");
    assert_eq!(counts[1 - busy_index], 0, "{counts:?}");

    // The next two connections both go to the idle host.
    let (c4, n4) = connect_named(&proxy);
    let (c5, n5) = connect_named(&proxy);
    assert_eq!((n4.as_str(), n5.as_str()), (idle, idle));
    assert_eq!(proxy.host_counts(), [2, 2]);
    for c in [keep, c3, c4, c5] {
        finish(c);
    }
    assert_eq!(proxy.host_counts(), [0, 0]);
}

#[test]
fn ties_rotate_between_idle_hosts() {
    let hosts: Vec<_> = ["A", "B", "C"]
        .iter()
        .map(|n| spawn_host(n, Behavior::Named))
        .collect();
    let addrs: Vec<_> = hosts.iter().map(|h| h.addr).collect();
    let proxy = start(config(&addrs, Settings::default()));
    // Each client leaves before the next arrives, so every pick is a 0-0-0 tie.
    let names: Vec<String> = (0..6)
        .map(|_| {
            let (c, name) = connect_named(&proxy);
            finish(c);
            name
        })
        .collect();
    assert_eq!(names, ["A", "B", "C", "A", "B", "C"]);
}

#[test]
fn failover_skips_a_dead_host() {
    let dead = dead_addr();
    let live = spawn_host("live", Behavior::Named);
    let proxy = start(config(&[dead, live.addr], Settings::default()));
    for _ in 0..6 {
        let (c, name) = connect_named(&proxy);
        assert_eq!(name, "live");
        finish(c);
    }
    assert_eq!(proxy.host_counts(), [0, 0]);
}

#[test]
fn every_host_down_gives_one_error_line() {
    let dead = [dead_addr(), dead_addr()];
    let proxy = start(config(&dead, Settings::default()));
    let mut client = proxy.connect();
    let reply = String::from_utf8(read_to_end(&mut client).unwrap()).unwrap();
    assert!(
        reply.starts_with("ERROR upstream_unavailable: "),
        "{reply:?}"
    );
    assert_eq!(
        reply.matches('\n').count(),
        1,
        "exactly one line: {reply:?}"
    );
    assert!(reply.ends_with('\n'));
    for addr in dead {
        assert!(
            !reply.contains(&addr.port().to_string()),
            "reveals a host: {reply:?}"
        );
    }
    assert!(
        !reply.contains("127.0.0.1"),
        "reveals an address: {reply:?}"
    );
    // The refused pair waits for the client's FIN, and no host holds it.
    let stats = proxy.stats();
    assert_eq!((stats.pairs, stats.refusing), (1, 1));
    assert_eq!(proxy.host_counts(), [0, 0]);
    drop(client);
    proxy.wait_until("closed the refused pair", |s| {
        s.pairs == 0 && s.refusing == 0
    });
}

#[test]
fn refusal_line_survives_a_client_that_already_sent_data() {
    let proxy = start(config(&[dead_addr()], Settings::default()));
    let mut client = proxy.connect();
    // Unread input at close time would make the kernel send RST, which can
    // destroy the error line; the proxy reads it away first.
    client.write_all(&[b'x'; 10_000]).unwrap();
    let mut line = String::new();
    client.read_to_string(&mut line).unwrap();
    assert!(line.starts_with("ERROR upstream_unavailable:"), "{line:?}");
}

/// A proxy whose only host is dead, so every client is refused
/// (`upstream_unavailable`), told as `refusal` says.
fn refusing(refusal: RefusalMode) -> Running {
    let mut config = config(&[dead_addr()], Settings::default());
    config.upstreams[0].refusal = refusal;
    start(config)
}

/// Waits for the refused pair to close, then checks it was counted by its
/// code, as refused and as ended, whatever the client was told.
fn assert_counted_as_unavailable(proxy: &Running) {
    proxy.wait_until("closed the refused pair", |s| s.pairs == 0);
    let stats = proxy.stats();
    let code = [("upstream_unavailable".to_string(), 1)];
    assert_eq!(stats.upstreams[0].refused, code);
    assert_eq!(stats.upstreams[0].ended, code);
}

#[test]
fn refusal_close_ends_with_fin_and_no_line() {
    let proxy = refusing(RefusalMode::Close);
    let mut client = proxy.connect();
    // A request unread at refusal time must not turn the FIN into a RST.
    client.write_all(b"PING\r\n").unwrap();
    let got = read_to_end(&mut client).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), "", "FIN, no line");
    finish(client);
    assert_counted_as_unavailable(&proxy);
}

#[test]
fn refusal_reset_ends_with_rst_and_no_line() {
    let proxy = refusing(RefusalMode::Reset);
    let mut client = proxy.connect();
    let mut got = Vec::new();
    let end = client.read_to_end(&mut got).map_err(|e| e.kind());
    assert_eq!((end, got), (Err(ErrorKind::ConnectionReset), Vec::new()));
    assert_counted_as_unavailable(&proxy);
}

#[test]
fn refusal_line_is_the_default() {
    let proxy = refusing(RefusalMode::default());
    let mut client = proxy.connect();
    let reply = String::from_utf8(read_to_end(&mut client).unwrap()).unwrap();
    assert!(reply.starts_with("ERROR upstream_unavailable: "), "{reply}");
    drop(client);
    assert_counted_as_unavailable(&proxy);
}

#[test]
fn connect_timeout_moves_on_to_the_next_host() {
    let hole = black_hole();
    let live = spawn_host("live", Behavior::Named);
    let timeout = Duration::from_millis(300);
    let settings = Settings {
        connect_timeout: timeout,
        ..Settings::default()
    };
    let proxy = start(config(&[hole.addr, live.addr], settings));
    // The first client's tie goes to the black hole (first host) and must
    // wait out the connect timeout before failing over.
    let started = Instant::now();
    let (c, name) = connect_named(&proxy);
    let waited = started.elapsed();
    assert_eq!(name, "live");
    assert!(
        waited >= timeout,
        "failed over after {waited:?}, before the timeout"
    );
    assert!(
        waited < Duration::from_secs(5),
        "the default timeout was used: {waited:?}"
    );
    finish(c);
    assert_eq!(proxy.host_counts(), [0, 0]);
}

#[test]
fn connect_timeout_on_every_host_refuses() {
    let hole = black_hole();
    let settings = Settings {
        connect_timeout: Duration::from_millis(200),
        ..Settings::default()
    };
    let proxy = start(config(&[hole.addr], settings));
    let started = Instant::now();
    let mut client = proxy.connect();
    let reply = String::from_utf8(read_to_end(&mut client).unwrap()).unwrap();
    assert!(
        reply.starts_with("ERROR upstream_unavailable:"),
        "{reply:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(proxy.host_counts(), [0]);
}

#[test]
fn over_max_connections_is_refused_as_overloaded() {
    let host = spawn_host("h", Behavior::Named);
    let settings = Settings {
        max_connections: 2,
        ..Settings::default()
    };
    let proxy = start(config(&[host.addr], settings));
    let (c1, _) = connect_named(&proxy);
    let (c2, _) = connect_named(&proxy);
    let mut c3 = proxy.connect();
    let reply = String::from_utf8(read_to_end(&mut c3).unwrap()).unwrap();
    assert!(reply.starts_with("ERROR overloaded: "), "{reply:?}");
    assert_eq!(reply.matches('\n').count(), 1);
    // A slot frees up: the next client is served again. The client sees
    // its end a moment before its pair has given the slot back, and with
    // two workers the next connection may be taken by the other one in
    // that moment: wait for the slot itself.
    finish(c1);
    proxy.wait_until("given c1's slot back", |s| s.pairs - s.refusing <= 1);
    let (c4, name) = connect_named(&proxy);
    assert_eq!(name, "h");
    for c in [c2, c4] {
        finish(c);
    }
    drop(c3);
    proxy.wait_until("closed every pair", |s| s.pairs == 0);
}

#[test]
fn counters_return_to_zero_after_mixed_endings() {
    let hosts: Vec<_> = (0..3)
        .map(|i| spawn_host(&format!("h{i}"), Behavior::Echo))
        .collect();
    let mut addrs: Vec<_> = hosts.iter().map(|h| h.addr).collect();
    addrs.push(dead_addr());
    let proxy = start(config(&addrs, Settings::default()));
    let mut clients: Vec<TcpStream> = (0..40).map(|_| proxy.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(format!("{i}\n").as_bytes()).unwrap();
        assert_eq!(read_line(c), i.to_string());
    }
    let counts = proxy.host_counts();
    assert_eq!(counts.iter().sum::<u32>(), 40, "{counts:?}");
    assert_eq!(counts[3], 0, "the dead host holds nothing: {counts:?}");
    // Spread evenly: least connections never lets one host get 2 ahead.
    let (min, max) = (counts[..3].iter().min(), counts[..3].iter().max());
    assert!(max.unwrap() - min.unwrap() <= 1, "{counts:?}");
    // Half leave gracefully, half reset.
    for (i, c) in clients.into_iter().enumerate() {
        if i % 2 == 0 {
            finish(c);
        } else {
            socket2::SockRef::from(&c)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
    }
    // Nothing tells the test when the loop has seen a reset.
    proxy.wait_until("saw every reset", |s| s.pairs == 0);
    assert_eq!(proxy.host_counts(), [0, 0, 0, 0]);
}
