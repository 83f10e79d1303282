//! Deadlines owned by the loop: idle pairs and lingering half-closed pairs
//! are closed; pairs with traffic are not.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tcplb::Settings;

#[test]
fn idle_pair_is_closed_at_the_idle_timeout() {
    let host = spawn_host("h", Behavior::Echo);
    let idle = Duration::from_millis(300);
    let settings = Settings {
        idle_timeout: idle,
        ..Settings::default()
    };
    let proxy = start(config(&[host.addr], settings));
    let mut client = proxy.connect();
    // The pair's last activity (relaying the echo) comes after this instant.
    let quiet_since = Instant::now();
    client.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&mut client), "ping");
    // Nothing moves: the proxy closes the pair, the client sees EOF.
    assert_eq!(read_to_end(&mut client).unwrap().len(), 0);
    let waited = quiet_since.elapsed();
    assert!(waited >= idle, "closed after {waited:?}");
    assert!(waited < Duration::from_secs(10), "closed after {waited:?}");
    assert_eq!(proxy.stats().pairs, 0);
    assert_eq!(proxy.host_counts(), [0]);
}

#[test]
fn traffic_keeps_a_pair_past_the_idle_timeout() {
    let host = spawn_host("h", Behavior::Echo);
    let idle = Duration::from_secs(3600);
    let settings = Settings {
        idle_timeout: idle,
        ..Settings::default()
    };
    let proxy = start(config(&[host.addr], settings));
    let mut client = proxy.connect();
    // A byte every three quarters of the idle timeout on the loop's clock
    // (moved on by the test, so no real time is raced), for three idle
    // periods; every one is echoed.
    let mut byte = [0u8; 1];
    for _ in 0..4 {
        client.write_all(b"x").unwrap();
        client.read_exact(&mut byte).unwrap();
        proxy.handle.advance_clock(idle * 3 / 4).unwrap();
    }
    assert_eq!(proxy.stats().pairs, 1);
    // The timeout was armed all along: a whole quiet period closes the pair.
    proxy.handle.advance_clock(idle / 2).unwrap();
    assert_eq!(read_to_end(&mut client).unwrap().len(), 0);
    assert_eq!(proxy.stats().pairs, 0);
}

#[test]
fn half_closed_pair_is_closed_at_its_bound() {
    // A host that takes the client's FIN but never finishes its own side.
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (eof_tx, host_saw_eof) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        conn.read_to_end(&mut sink).unwrap();
        conn.write_all(b"late").unwrap();
        eof_tx.send(()).unwrap();
        // Keeps its side open until the test is over.
        let _ = released.recv_timeout(IO_TIMEOUT);
        drop(conn);
    });
    let bound = Duration::from_millis(300);
    let settings = Settings {
        half_close_timeout: bound,
        ..Settings::default()
    };
    let proxy = start(config(&[addr], settings));
    let mut client = proxy.connect();
    client.write_all(b"request").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    // The pair's last activity (relaying "late") comes after this instant.
    let quiet_since = Instant::now();
    host_saw_eof.recv_timeout(IO_TIMEOUT).unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    let waited = quiet_since.elapsed();
    assert_eq!(got, b"late");
    assert!(waited >= bound, "closed after {waited:?}");
    assert!(waited < Duration::from_secs(10), "closed after {waited:?}");
    assert_eq!(proxy.stats().pairs, 0);
    release.send(()).unwrap();
    assert_eq!(proxy.host_counts(), [0]);
}

#[test]
fn idle_clock_starts_when_the_connect_completes() {
    // The connect takes longer than the idle timeout (a black-holed host,
    // then failover); the pair must still get its full idle period. The
    // loop's clock is moved on by the test, so no real time is raced.
    let hole = black_hole();
    let live = spawn_host("live", Behavior::Named);
    let connect_timeout = Duration::from_secs(1800);
    let idle = Duration::from_secs(1200);
    let settings = Settings {
        connect_timeout,
        idle_timeout: idle,
        ..Settings::default()
    };
    let proxy = start(config(&[hole.addr, live.addr], settings));
    let mut client = proxy.connect();
    // The first pick of a fresh balancer is the first host: the black hole.
    proxy.wait_until("started the connect to the black hole", |s| {
        s.upstreams[0].hosts[0].active == 1
    });
    proxy.handle.advance_clock(connect_timeout).unwrap();
    assert_eq!(read_line(&mut client), "live");
    // Most of an idle period after the connect, and the pair still relays.
    proxy.handle.advance_clock(idle * 3 / 4).unwrap();
    client.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&mut client), "ping");
    assert_eq!(proxy.host_counts(), [0, 1]);
    finish(client);
}
