//! The access log in JSON (`access_log = "json"`, `--access-log json`):
//! the real binary's stderr, where every access line is one JSON object
//! with the documented fields and nothing around it, parsed here
//! (`proxy_source` with a PROXY header from a trusted peer); the other log
//! lines keep their text format.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use common::*;
use serde_json::Value;

/// The keys of a connection's JSON line, in the order written.
const KEYS: [&str; 10] = [
    "time",
    "client",
    "upstream",
    "host",
    "identity",
    "bytes_up",
    "bytes_down",
    "duration_ms",
    "end",
    "proxy_source",
];

/// A config file, removed with its folder on drop.
struct File(PathBuf);

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

fn write_config(name: &str, text: &str) -> File {
    let dir = std::env::temp_dir().join(format!("tcplb-access-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(&path, text).unwrap();
    File(path)
}

/// The lines of `log` that are JSON objects, parsed; any line that starts
/// like one must parse.
fn json_lines(log: &[String]) -> Vec<Value> {
    log.iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The one JSON line of the connection from `client`.
fn line_of(lines: &[Value], client: SocketAddr) -> &Value {
    let mine: Vec<&Value> = lines
        .iter()
        .filter(|l| l["client"] == client.to_string())
        .collect();
    assert_eq!(mine.len(), 1, "one line for {client}: {lines:#?}");
    mine[0]
}

/// `2026-05-01T12:34:56.789Z`: RFC 3339, UTC.
fn assert_rfc3339(time: &Value) {
    let t = time.as_str().unwrap_or_else(|| panic!("time {time}"));
    let b = t.as_bytes();
    let shape = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && t.ends_with('Z')
        && t[..4].parse::<u32>().is_ok_and(|y| y >= 2024);
    assert!(shape, "not RFC 3339 UTC: {t}");
}

#[test]
fn json_access_lines_carry_every_documented_field() {
    let host = spawn_host("h", Behavior::Echo);
    let dead = dead_addr();
    let file = write_config(
        "fields",
        &format!(
            "[defaults]\naccess_log = \"json\"\n\n\
             [[upstream]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{}\"]\n\n\
             [[upstream]]\nname = \"gone\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{dead}\"]\n\n\
             [[upstream]]\nname = \"behind\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{}\"]\n\
             accept_proxy = [\"127.0.0.1\"]\n",
            host.addr, host.addr
        ),
    );
    let mut bin = Binary::start(&["--config", file.0.to_str().unwrap()]);
    let app = bin.listen_addr_of("app");
    let gone = bin.listen_addr_of("gone");
    let behind = bin.listen_addr_of("behind");
    // Served: 5 bytes up, 5 down, closed by the client.
    let mut c = std::net::TcpStream::connect(app).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let served = c.local_addr().unwrap();
    c.write_all(b"ping\n").unwrap();
    assert_eq!(read_line(&mut c), "ping");
    finish(c);
    // Refused: its only host is dead.
    let mut r = std::net::TcpStream::connect(gone).unwrap();
    r.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let refused = r.local_addr().unwrap();
    assert!(read_line(&mut r).starts_with("ERROR upstream_unavailable:"));
    finish(r);
    // Through an outer balancer on accept_proxy's list (127.0.0.1): the
    // header names the client, and the balancer is the proxy_source.
    let mut b = std::net::TcpStream::connect(behind).unwrap();
    b.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let balancer = b.local_addr().unwrap();
    b.write_all(b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\nping\n")
        .unwrap();
    assert_eq!(read_line(&mut b), "ping");
    finish(b);
    // A LOCAL header (the balancer's own check) names no client: the
    // connection is its own, with no proxy_source.
    let mut l = std::net::TcpStream::connect(behind).unwrap();
    l.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let check = l.local_addr().unwrap();
    let local = tcplb::proxy_header::encode_local(tcplb::proxy_header::Version::V2);
    l.write_all(&[&local[..], b"ping\n"].concat()).unwrap();
    assert_eq!(read_line(&mut l), "ping");
    finish(l);
    bin.signal("TERM");
    let (code, log) = bin.wait();
    assert_eq!(code, Some(0), "{log:#?}");
    let lines = json_lines(&log);
    for line in &lines {
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, KEYS, "{line}");
        assert_rfc3339(&line["time"]);
        assert!(line["duration_ms"].is_u64(), "{line}");
    }
    let ok = line_of(&lines, served);
    assert_eq!(ok["upstream"], "app");
    assert_eq!(ok["host"], host.addr.to_string());
    assert_eq!((&ok["bytes_up"], &ok["bytes_down"]), (&5.into(), &5.into()));
    assert_eq!(ok["end"], "closed");
    assert_eq!(ok["identity"], Value::Null, "a plain upstream has none");
    assert_eq!(ok["proxy_source"], Value::Null);
    let no = line_of(&lines, refused);
    assert_eq!(no["upstream"], "gone");
    assert_eq!(no["host"], Value::Null);
    assert_eq!((&no["bytes_up"], &no["bytes_down"]), (&0.into(), &0.into()));
    assert_eq!(no["end"], "upstream_unavailable");
    let via = line_of(&lines, "203.0.113.7:4242".parse().unwrap());
    assert_eq!(via["upstream"], "behind");
    assert_eq!(via["proxy_source"], balancer.to_string());
    assert_eq!(
        (&via["bytes_up"], &via["bytes_down"]),
        (&5.into(), &5.into())
    );
    let own = line_of(&lines, check);
    assert_eq!(own["proxy_source"], Value::Null, "{own}");
    // Nothing else of the access log is left in text, and the rest of
    // the log still is.
    assert!(
        !log.iter().any(|l| l.contains("tcplb::access]")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with('[') && l.contains(" INFO  tcplb::proxy] tcplb ")),
        "{log:#?}"
    );
}

#[test]
fn the_flag_turns_json_on_and_refusals_beyond_the_budget_are_summed_up_in_json() {
    let dead = dead_addr();
    let mut bin = Binary::start(&[
        "--listen",
        "127.0.0.1:0",
        "--host",
        &dead.to_string(),
        "--access-log",
        "json",
    ]);
    let addr = bin.listen_addr();
    let started = std::time::Instant::now();
    // More refusals than the 10 a second logged one by one (the dead
    // host fails its connects, then passive checks take it down:
    // `upstream_unavailable`, then `no_healthy_host`).
    for _ in 0..14 {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let line = read_line(&mut c);
        assert!(line.starts_with("ERROR "), "{line}");
        finish(c);
    }
    let within_a_second = started.elapsed() < std::time::Duration::from_millis(900);
    bin.signal("TERM");
    let (code, log) = bin.wait();
    assert_eq!(code, Some(0), "{log:#?}");
    let lines = json_lines(&log);
    let (summaries, connections): (Vec<&Value>, Vec<&Value>) = lines
        .iter()
        .partition(|l| l.get("unlogged_refusals").is_some());
    let logged = connections.len() as u64;
    let summed: u64 = summaries
        .iter()
        .map(|s| {
            assert_rfc3339(&s["time"]);
            let n = s["unlogged_refusals"].as_u64().unwrap();
            let by_reason = s["by_reason"].as_object().unwrap();
            let sum: u64 = by_reason.values().map(|v| v.as_u64().unwrap()).sum();
            assert_eq!(sum, n, "{s}");
            n
        })
        .sum();
    assert_eq!(logged + summed, 14, "{lines:#?}");
    // All in one second's budget (as on any machine not stalled for
    // most of a second): 10 logged, the other 4 summed up.
    if within_a_second {
        assert_eq!((logged, summed), (10, 4), "{lines:#?}");
    }
}
