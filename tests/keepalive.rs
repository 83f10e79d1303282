//! TCP keepalive on both legs of a pair, read back from the kernel: the
//! options of tcplb's own two sockets through `getsockopt`
//! ([`Handle::keepalive`](tcplb::Handle::keepalive)), and the keepalive
//! timer the kernel has armed on them, as `ss -o` shows it from outside
//! the process. Off by default.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use tcplb::{Keepalive, KeepaliveState, PairKeepalive, Settings};

/// The `timer:(...)` of the one established socket `ss` finds from
/// `local` to `peer`, if it has one.
fn ss_timer(local: SocketAddr, peer: SocketAddr) -> Option<String> {
    let out = Command::new("ss")
        .args(["-tonH", "state", "established"])
        .args(["src", &local.to_string(), "dst", &peer.to_string()])
        .output()
        .expect("`ss` (from iproute2) runs");
    assert!(out.status.success(), "ss: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.lines().count(),
        1,
        "one socket {local} -> {peer}: {text:?}"
    );
    let timer = text.split("timer:(").nth(1)?;
    Some(timer.split(')').next().unwrap().to_string())
}

/// A client relayed through `proxy` to the echo host (one line there and
/// back, so both sockets exist), and tcplb's socket to the host: its
/// local address, from the host's side of the connection.
fn relayed(proxy: &Running, host: &TestHost) -> TcpStream {
    let mut c = proxy.connect();
    c.write_all(b"hello\n").unwrap();
    assert_eq!(read_line(&mut c), "hello");
    host.accepted.recv_timeout(IO_TIMEOUT).unwrap();
    c
}

/// tcplb's socket to the host: the one established socket to `host`
/// whose local address is not the host's (the host's own accepted socket
/// has the host's address as its local one).
fn tcplb_to_host(host: SocketAddr) -> SocketAddr {
    let out = Command::new("ss")
        .args(["-tnH", "state", "established", "dst", &host.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut locals: Vec<SocketAddr> = text
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(locals.len(), 1, "one socket to {host}: {text:?}");
    locals.pop().unwrap()
}

/// A kernel default, from /proc/sys/net/ipv4.
fn sysctl(name: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The seconds of a keepalive timer as `ss` prints it: `keepalive,59sec,0`.
fn timer_secs(timer: &str) -> u64 {
    let (kind, rest) = timer.split_once(',').unwrap();
    assert_eq!(kind, "keepalive", "{timer}");
    let left = rest.split(',').next().unwrap();
    // Under a second left prints as milliseconds ("999ms"), else "59sec"
    // or minutes ("1min59sec").
    let secs = |t: &str| t.strip_suffix("sec").map(|s| s.parse::<u64>().unwrap());
    match left.split_once("min") {
        Some((min, sec)) => min.parse::<u64>().unwrap() * 60 + secs(sec).unwrap_or(0),
        None => secs(left).unwrap_or(0),
    }
}

#[test]
fn keepalive_is_set_on_both_legs_and_the_kernel_has_it() {
    let host = spawn_host("h", Behavior::Echo);
    let keepalive = Keepalive {
        idle: Duration::from_secs(600),
        interval: Some(Duration::from_secs(7)),
        probes: Some(4),
    };
    let settings = Settings {
        keepalive: Some(keepalive),
        ..Settings::default()
    };
    let proxy = start(config(&[host.addr], settings));
    let client = relayed(&proxy, &host);
    let expected = KeepaliveState {
        idle: Duration::from_secs(600),
        interval: Duration::from_secs(7),
        probes: 4,
    };
    let pairs = proxy.handle.keepalive().unwrap();
    assert_eq!(
        pairs,
        [PairKeepalive {
            client_addr: client.local_addr().unwrap(),
            client: Some(expected),
            host: Some(expected),
        }]
    );
    // From outside: the kernel runs a keepalive timer on both of tcplb's
    // sockets, at most the idle time away.
    let to_client = ss_timer(proxy.addr, client.local_addr().unwrap()).expect("a timer");
    let to_host = ss_timer(tcplb_to_host(host.addr), host.addr).expect("a timer");
    for timer in [to_client, to_host] {
        let secs = timer_secs(&timer);
        assert!((590..=600).contains(&secs), "{timer}");
    }
    finish(client);
}

#[test]
fn an_idle_time_alone_keeps_the_kernel_interval_and_probes() {
    let host = spawn_host("h", Behavior::Echo);
    let settings = Settings {
        keepalive: Some(Keepalive {
            idle: Duration::from_secs(30),
            interval: None,
            probes: None,
        }),
        ..Settings::default()
    };
    let proxy = start(config(&[host.addr], settings));
    let client = relayed(&proxy, &host);
    let expected = KeepaliveState {
        idle: Duration::from_secs(30),
        interval: Duration::from_secs(sysctl("tcp_keepalive_intvl")),
        probes: sysctl("tcp_keepalive_probes") as u32,
    };
    let pairs = proxy.handle.keepalive().unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!(
        (pairs[0].client, pairs[0].host),
        (Some(expected), Some(expected))
    );
    finish(client);
}

#[test]
fn keepalive_is_off_by_default() {
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(config(&[host.addr], Settings::default()));
    let client = relayed(&proxy, &host);
    let pairs = proxy.handle.keepalive().unwrap();
    assert_eq!(pairs.len(), 1);
    assert_eq!((pairs[0].client, pairs[0].host), (None, None));
    assert_eq!(ss_timer(proxy.addr, client.local_addr().unwrap()), None);
    assert_eq!(ss_timer(tcplb_to_host(host.addr), host.addr), None);
    finish(client);
}
