//! Hosts given by name follow DNS: a test DNS server on loopback
//! (`common::dns`) answers for the names, the test changes its answers
//! while tcplb runs and moves the clock across `resolve_interval` with
//! `Handle::advance_clock`, and real hosts on 127.0.0.2, 127.0.0.3 and
//! `::1`, all on one port, tell by name which one a client reached.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use common::dns::{Answer, DnsServer};
use common::*;
use tcplb::{Config, Stats};

/// A little more than the default `resolve_interval` (30 s), to cross it.
const CROSS: Duration = Duration::from_secs(31);

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// One upstream `dns` whose `hosts` are `hosts` (TOML items), names looked
/// up from `dns`, with `defaults` added to `[defaults]`.
fn config(dns: &DnsServer, hosts: &str, defaults: &str) -> Config {
    let text = format!(
        "[defaults]\nresolver = \"{}\"\n{defaults}\n\n[[upstream]]\nname = \"dns\"\nlisten = \"127.0.0.1:0\"\nhosts = [{hosts}]\n",
        dns.addr
    );
    Config::parse(&text, "dns.toml").unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The upstream's hosts taking new connections, and the removed ones
/// still draining.
fn hosts(stats: &Stats) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let of = |removed: bool| {
        stats.upstreams[0]
            .hosts
            .iter()
            .filter(|h| h.removed == removed)
            .map(|h| h.addr)
            .collect()
    };
    (of(false), of(true))
}

/// Connects and reads the host's greeting (its name).
fn greeted(lb: &Running) -> (String, std::net::TcpStream) {
    let mut c = lb.connect();
    (read_line(&mut c), c)
}

/// Bytes go through end to end: what `c` sends comes back.
fn echoes(c: &mut std::net::TcpStream, line: &str) {
    c.write_all(format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(read_line(c), line);
}

/// Moves the clock across `resolve_interval` until `dns` has been asked
/// for `name` again (A and AAAA), and returns once it has: the round
/// before has then been applied, as a round is only asked once the last
/// one's answers are in. The clock is moved again if an answer was still
/// on its way when it moved (the next round is due one interval after
/// the answers), at most 40 times (20 minutes: no idle timeout falls due).
fn next_round(lb: &Running, dns: &DnsServer, name: &str) {
    let target = dns.asked(name) + 2;
    for _ in 0..40 {
        lb.handle.advance_clock(CROSS).unwrap();
        let deadline = Instant::now() + Duration::from_millis(500);
        while dns.asked(name) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if dns.asked(name) >= target {
            return;
        }
    }
    panic!("`{name}` was never asked again");
}

/// Log lines of this test binary (tcplb logs through `log`).
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let line = format!("{} {}", record.level(), record.args());
            LINES.lock().unwrap().push(line);
        }
    }
    fn flush(&self) {}
}

/// The lines logged so far that contain `needle`.
fn logged(needle: &str) -> Vec<String> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(log::LevelFilter::Info);
    });
    let lines = LINES.lock().unwrap();
    lines
        .iter()
        .filter(|l| l.contains(needle))
        .cloned()
        .collect()
}

#[test]
fn every_address_of_a_name_is_a_host_and_takes_traffic() {
    let dns = DnsServer::start();
    let on = [(ip("127.0.0.2"), "two"), (ip("127.0.0.3"), "three")];
    let backends = spawn_hosts_on_one_port(&on, Behavior::Named);
    let port = backends[0].addr.port();
    dns.set(
        "pool.test",
        Answer::Records(vec![ip("127.0.0.3"), ip("127.0.0.2")]),
    );
    let lb = start(config(&dns, &format!("\"pool.test:{port}\""), ""));
    assert_eq!(
        hosts(&lb.stats()).0,
        [backends[0].addr, backends[1].addr],
        "two A records, two hosts (sorted)"
    );
    // Two connections held at once: least-connections puts one on each.
    let (first, mut a) = greeted(&lb);
    let (second, mut b) = greeted(&lb);
    let mut reached = [first, second];
    reached.sort();
    assert_eq!(reached, ["three", "two"]);
    echoes(&mut a, "to one");
    echoes(&mut b, "to the other");
}

#[test]
fn a_changed_answer_drains_the_old_address_and_the_new_one_takes_new_connections() {
    let dns = DnsServer::start();
    let on = [(ip("127.0.0.2"), "old"), (ip("127.0.0.3"), "new")];
    let backends = spawn_hosts_on_one_port(&on, Behavior::Named);
    let (old_addr, new_addr) = (backends[0].addr, backends[1].addr);
    dns.set("moving.test", Answer::Records(vec![ip("127.0.0.2")]));
    let hosts_line = format!("\"moving.test:{}\"", old_addr.port());
    let lb = start(config(&dns, &hosts_line, "drain_timeout = \"10s\""));
    let (name, mut held) = greeted(&lb);
    assert_eq!(name, "old");
    dns.set("moving.test", Answer::Records(vec![ip("127.0.0.3")]));
    lb.handle.advance_clock(CROSS).unwrap();
    lb.wait_until("the new address is a host and the old one drains", |s| {
        hosts(s) == (vec![new_addr], vec![old_addr])
    });
    let (name, mut fresh) = greeted(&lb);
    assert_eq!(name, "new", "a new connection goes to the new address");
    let (name, _) = greeted(&lb);
    assert_eq!(name, "new", "and so does the next: the old takes none");
    echoes(&mut held, "still relayed while it drains");
    // The drain period over, the old host's connection is closed.
    lb.handle.advance_clock(Duration::from_secs(11)).unwrap();
    closed_within(&mut held, IO_TIMEOUT);
    lb.wait_until("the old host is gone", |s| {
        hosts(s) == (vec![new_addr], vec![])
            && s.upstreams[0]
                .ended
                .iter()
                .any(|(e, n)| e == "removed" && *n == 1)
    });
    echoes(&mut fresh, "the new one is untouched");
}

#[test]
fn an_aaaa_answer_becomes_a_host() {
    let dns = DnsServer::start();
    let backends = spawn_hosts_on_one_port(&[(ip("::1"), "six")], Behavior::Named);
    dns.set("six.test", Answer::Records(vec![ip("::1")]));
    let hosts_line = format!("\"six.test:{}\"", backends[0].addr.port());
    let lb = start(config(&dns, &hosts_line, ""));
    assert_eq!(hosts(&lb.stats()).0, [backends[0].addr]);
    let (name, mut c) = greeted(&lb);
    assert_eq!(name, "six");
    echoes(&mut c, "over IPv6");
    // And one that joins later, beside an A record.
    let dual = spawn_hosts_on_one_port(
        &[(ip("127.0.0.2"), "four"), (ip("::1"), "six")],
        Behavior::Named,
    );
    dns.set("dual.test", Answer::Records(vec![ip("127.0.0.2")]));
    let lb = start(config(
        &dns,
        &format!("\"dual.test:{}\"", dual[0].addr.port()),
        "",
    ));
    dns.set(
        "dual.test",
        Answer::Records(vec![ip("127.0.0.2"), ip("::1")]),
    );
    lb.handle.advance_clock(CROSS).unwrap();
    lb.wait_until("the AAAA address joined", |s| {
        hosts(s).0 == [dual[0].addr, dual[1].addr]
    });
}

#[test]
fn a_failed_or_empty_answer_keeps_the_last_hosts_and_is_logged_once() {
    let dns = DnsServer::start();
    let backends = spawn_hosts_on_one_port(&[(ip("127.0.0.2"), "kept")], Behavior::Named);
    dns.set("flaky.test", Answer::Records(vec![ip("127.0.0.2")]));
    let hosts_line = format!("\"flaky.test:{}\"", backends[0].addr.port());
    let lb = start(config(&dns, &hosts_line, ""));
    assert_eq!(logged("`flaky.test`"), Vec::<String>::new());
    let kept = (vec![backends[0].addr], vec![]);
    dns.set("flaky.test", Answer::ServFail);
    for _ in 0..3 {
        next_round(&lb, &dns, "flaky.test");
    }
    // Three rounds asked: the first two were applied.
    assert_eq!(hosts(&lb.stats()), kept);
    assert_eq!(greeted(&lb).0, "kept");
    let failing = logged("`flaky.test` does not resolve");
    assert_eq!(failing.len(), 1, "{failing:#?}");
    assert!(failing[0].starts_with("WARN"), "{failing:?}");
    assert!(failing[0].contains("Server Failure"), "{failing:?}");
    // An empty answer (NOERROR, no record) is no better, and still the
    // same failure: nothing more is logged.
    dns.set("flaky.test", Answer::Records(vec![]));
    for _ in 0..3 {
        next_round(&lb, &dns, "flaky.test");
    }
    assert_eq!(hosts(&lb.stats()), kept);
    assert_eq!(greeted(&lb).0, "kept");
    assert_eq!(logged("`flaky.test` does not resolve").len(), 1);
    // Once it resolves again, that is said once too.
    dns.set("flaky.test", Answer::Records(vec![ip("127.0.0.2")]));
    for _ in 0..3 {
        next_round(&lb, &dns, "flaky.test");
    }
    let back = logged("`flaky.test` resolves again");
    assert_eq!(back.len(), 1, "{back:#?}");
    assert_eq!(hosts(&lb.stats()), kept);
}

#[test]
fn a_name_that_does_not_resolve_yet_joins_when_it_does() {
    let dns = DnsServer::start();
    let backends = spawn_hosts_on_one_port(&[(ip("127.0.0.3"), "late")], Behavior::Named);
    let hosts_line = format!("\"late.test:{}\"", backends[0].addr.port());
    let config = config(&dns, &hosts_line, "");
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    let lb = start(config);
    assert_eq!(hosts(&lb.stats()), (vec![], vec![]));
    let mut c = lb.connect();
    assert!(read_line(&mut c).starts_with("ERROR no_healthy_host"));
    dns.set("late.test", Answer::Records(vec![ip("127.0.0.3")]));
    lb.handle.advance_clock(CROSS).unwrap();
    lb.wait_until("the name joined", |s| hosts(s).0 == [backends[0].addr]);
    assert_eq!(greeted(&lb).0, "late");
}

#[test]
fn an_answer_too_large_for_udp_is_read_over_tcp() {
    let dns = DnsServer::start();
    let on = [(ip("127.0.0.2"), "two"), (ip("127.0.0.3"), "three")];
    let backends = spawn_hosts_on_one_port(&on, Behavior::Named);
    dns.truncate_above(1);
    dns.set(
        "big.test",
        Answer::Records(vec![ip("127.0.0.2"), ip("127.0.0.3")]),
    );
    let lb = start(config(
        &dns,
        &format!("\"big.test:{}\"", backends[0].addr.port()),
        "",
    ));
    assert_eq!(hosts(&lb.stats()).0, [backends[0].addr, backends[1].addr]);
}

/// `tcplb check FILE [--strict]` on a config whose only host is a name the
/// test server does not know: its exit code and stderr.
fn check(dns: &DnsServer, defaults: &str, strict: bool) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!(
        "tcplb-dns-check-{}-{}",
        std::process::id(),
        defaults.len() + usize::from(strict)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    let text = format!(
        "[defaults]\nresolver = \"{}\"\n{defaults}\n\n[[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\nhosts = [\"missing.test:80\"]\n",
        dns.addr
    );
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tcplb"));
    cmd.arg("check").arg(&path);
    if strict {
        cmd.arg("--strict");
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_reports_a_name_that_does_not_resolve_as_a_warning_or_an_error() {
    let dns = DnsServer::start();
    // resolve_interval on (the default): a warning, the name may appear.
    let (code, err) = check(&dns, "", false);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains(":8:10: warning: `hosts` address `missing.test:80`: cannot resolve `missing.test`: no A or AAAA record; it is looked up again every 30s"),
        "{err}"
    );
    let (code, err) = check(&dns, "", true);
    assert_eq!(code, Some(1), "--strict fails on it: {err}");
    // Off: an error, as the name would never be looked up again.
    let (code, err) = check(&dns, "resolve_interval = \"0s\"", false);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(":8:10: `hosts` address `missing.test:80`: cannot resolve `missing.test`: no A or AAAA record (with `resolve_interval = \"0s\"` names are looked up only as the config is read)"),
        "{err}"
    );
    assert!(!err.contains("warning"), "{err}");
    assert!(
        dns.asked("missing.test") >= 6,
        "each check asked the server"
    );
}

#[test]
fn a_host_table_given_by_name_gives_its_weight_and_cap_to_every_address_even_those_that_join() {
    let dns = DnsServer::start();
    let on = [(ip("127.0.0.2"), "two"), (ip("127.0.0.3"), "three")];
    let backends = spawn_hosts_on_one_port(&on, Behavior::Named);
    let (two, three) = (backends[0].addr, backends[1].addr);
    let one = spawn_host("one", Behavior::Named);
    dns.set("weighted.test", Answer::Records(vec![ip("127.0.0.2")]));
    let hosts_line = format!(
        "{{ address = \"weighted.test:{}\", weight = 3, max_connections = 3 }}, \"{}\"",
        two.port(),
        one.addr
    );
    let lb = start(config(&dns, &hosts_line, ""));
    let limits = |s: &Stats| -> Vec<(SocketAddr, u32, Option<u32>)> {
        let live = s.upstreams[0].hosts.iter().filter(|h| !h.removed);
        live.map(|h| (h.addr, h.weight, h.max_connections))
            .collect()
    };
    assert_eq!(
        limits(&lb.stats()),
        [(one.addr, 1, None), (two, 3, Some(3))],
        "the name's address has the table's weight and cap"
    );
    dns.set(
        "weighted.test",
        Answer::Records(vec![ip("127.0.0.2"), ip("127.0.0.3")]),
    );
    lb.handle.advance_clock(CROSS).unwrap();
    lb.wait_until("the joined address has the table's weight and cap", |s| {
        limits(s) == [(one.addr, 1, None), (two, 3, Some(3)), (three, 3, Some(3))]
    });
    // Seven held: weights 3, 3 and 1 take 3, 3 and 1, whatever the ties.
    let held: Vec<(String, std::net::TcpStream)> = (0..7).map(|_| greeted(&lb)).collect();
    let count = |name: &str| held.iter().filter(|(n, _)| n == name).count();
    assert_eq!(
        (count("two"), count("three"), count("one")),
        (3, 3, 1),
        "{:?}",
        held.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    // Each of the name's addresses is at its own cap of 3: the next
    // client goes to `one`, though by weight it would not.
    let (name, mut c) = greeted(&lb);
    assert_eq!(name, "one");
    echoes(&mut c, "past the caps");
    for (_, mut c) in held {
        echoes(&mut c, "still relayed");
    }
}
