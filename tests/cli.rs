//! The real `tcplb` binary: `check`, config and flag errors, quick mode,
//! graceful shutdown on signals, descriptor hygiene, and `demo`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn tcplb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tcplb"))
        .args(args)
        .output()
        .unwrap()
}

/// A config file in a fresh temporary directory (removed on drop).
struct TempConfig {
    dir: PathBuf,
    pub path: PathBuf,
}

impl TempConfig {
    fn new(name: &str, text: &str) -> TempConfig {
        let dir = std::env::temp_dir().join(format!("tcplb-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(&path, text).unwrap();
        TempConfig { dir, path }
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const BAD: &str = r#"[defaults]
connect_timeout = 5
max_conections = 10

[[upstream]]
name = "app"
listen = "127.0.0.1:7777"
hosts = []

[[upstream]]
name = "app"
listen = "127.0.0.1:7777"
hosts = ["127.0.0.1:9001", "not an address"]
"#;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_accepts_a_good_config() {
    let file = TempConfig::new(
        "good",
        "[[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\nhosts = [\"127.0.0.1:9001\", \"[::1]:9002\", \"localhost:9003\"]\n\n[[upstream]]\nname = \"b\"\nlisten = \"127.0.0.1:7001\"\nhosts = [\"127.0.0.1:9004\"]\n",
    );
    let out = tcplb(&["check", file.arg()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok (2 upstreams, 4 hosts)"), "{stdout}");
    let file = TempConfig::new(
        "good-one",
        "[[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\nhosts = [\"127.0.0.1:9001\"]\n",
    );
    let out = tcplb(&["check", file.arg()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok (1 upstream, 1 host)"), "{stdout}");
}

#[test]
fn check_lists_every_problem_with_its_place() {
    let file = TempConfig::new("bad", BAD);
    let out = tcplb(&["check", file.arg()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().collect();
    let at = |line: usize, needle: &str| {
        let place = format!("{}:{line}:", file.arg());
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&place) && l.contains(needle)),
            "no `{needle}` at line {line} in:\n{err}"
        );
    };
    at(2, "`connect_timeout` must be a string with a unit");
    at(3, "unknown key `max_conections`");
    at(8, "has no hosts");
    at(11, "duplicate upstream name `app`");
    at(12, "same port");
    at(13, "`not an address`");
    assert_eq!(lines.len(), 6, "{err}");
}

#[test]
fn serving_a_bad_config_fails_with_the_same_messages() {
    let file = TempConfig::new("bad-serve", BAD);
    let check = stderr(&tcplb(&["check", file.arg()]));
    let out = tcplb(&["--config", file.arg()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(check.trim()), "{}", stderr(&out));
}

#[test]
fn a_missing_config_file_is_named() {
    let out = tcplb(&["--config", "/nonexistent/lb.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read config file /nonexistent/lb.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = TcpListener::bind(localhost()).unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = tcplb(&["--listen", &addr, "--host", "127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn bad_flags_are_named() {
    let out = tcplb(&[
        "--listen",
        "127.0.0.1:0",
        "--host",
        "nohost",
        "--idle-timeout",
        "0s",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("--host nohost"), "{err}");
    let out = tcplb(&[
        "--listen",
        "127.0.0.1:0",
        "--host",
        "127.0.0.1:9",
        "--idle-timeout",
        "0s",
    ]);
    assert!(
        stderr(&out).contains("idle_timeout must be greater than zero"),
        "{}",
        stderr(&out)
    );
    let out = tcplb(&[
        "--listen",
        "127.0.0.1:0",
        "--host",
        "127.0.0.1:9",
        "--buffer-size",
        "lots",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("lots"), "{}", stderr(&out));
    let out = tcplb(&[
        "--listen",
        "127.0.0.1:0",
        "--host",
        "127.0.0.1:9",
        "--socket-buffer",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("socket_buffer must be between 1024 and 67108864 bytes, not 100"),
        "{}",
        stderr(&out)
    );
    for (flag, value, says) in [
        (
            "--relay",
            "zero-copy",
            "`zero-copy` is not a relay mode: auto, splice, copy",
        ),
        (
            "--max-pipes",
            "2000000",
            "max_pipes must be between 0 and 1048576",
        ),
    ] {
        let out = tcplb(&[
            "--listen",
            "127.0.0.1:0",
            "--host",
            "127.0.0.1:9",
            flag,
            value,
        ]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
    }
    let out = tcplb(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("tcplb demo"), "{}", stderr(&out));
}

#[test]
fn help_explains_every_flag() {
    let out = tcplb(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--listen",
        "--host",
        "--name",
        "--connect-timeout",
        "--idle-timeout",
        "--half-close-timeout",
        "--drain-timeout",
        "--max-connections",
        "--buffer-size",
        "--bulk-buffer-size",
        "--socket-buffer",
        "--relay",
        "--max-pipes",
    ] {
        let lines: Vec<&str> = help.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.trim_start().starts_with(flag) || l.contains(&format!(", {flag}")))
            .unwrap_or_else(|| panic!("{flag} missing from:\n{help}"));
        // Long help puts the description on the next line.
        let description = lines.get(at + 1).map_or("", |l| l.trim());
        assert!(description.len() > 10, "{flag} has no description:\n{help}");
    }
    for command in ["check", "demo"] {
        let out = tcplb(&[command, "--help"]);
        assert!(out.status.success());
    }
}

#[test]
fn quick_mode_relays_and_logs_one_access_line() {
    let host = spawn_host("h", Behavior::Echo);
    let hosts = host.addr.to_string();
    let bin = Binary::start(&["--listen", "127.0.0.1:0", "--host", &hosts]);
    let addr = bin.listen_addr();
    let mut client = TcpStream::connect(addr).unwrap();
    client.write_all(b"hello\n").unwrap();
    assert_eq!(read_line(&mut client), "hello");
    finish(client);
    let line = bin.wait_for_log("tcplb::access");
    assert!(line.contains(&format!("host={hosts}")), "{line}");
    assert!(line.contains("up=6 down=6"), "{line}");
    assert!(line.contains("end=closed"), "{line}");
}

/// Counts the lines of a flood of `refused` clients, after the binary
/// exited: (warnings containing `warning`, `refused:` lines, access lines
/// of refused pairs, refusals summed up in summary lines).
fn refusal_lines(lines: &[String], warning: &str, code: &str) -> (usize, usize, usize, usize) {
    let count = |f: &dyn Fn(&String) -> bool| lines.iter().filter(|l| f(l)).count();
    let summed = lines
        .iter()
        .filter(|l| l.contains("more refused connections in the last second"))
        .map(|l| {
            let n = l.split(&format!("{code}=")).nth(1).unwrap_or("0");
            n.split_whitespace()
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    (
        count(&|l| l.contains("WARN") && l.contains(warning)),
        count(&|l| l.contains(&format!("refused: {code}"))),
        count(&|l| l.contains("tcplb::access") && l.contains(&format!("end={code}"))),
        summed,
    )
}

/// Offers `n` clients to `addr` that each read their refusal line.
fn offer_refused(addr: SocketAddr, n: usize, code: &str) {
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        assert!(read_line(&mut s).starts_with(&format!("ERROR {code}:")));
    }
}

#[test]
fn a_flood_of_refusals_logs_a_bounded_number_of_lines() {
    let host = spawn_host("h", Behavior::Echo);
    let hosts = host.addr.to_string();
    let mut bin = Binary::start(&[
        "--listen",
        "127.0.0.1:0",
        "--host",
        &hosts,
        "--max-connections",
        "5",
    ]);
    let addr = bin.listen_addr();
    let held: Vec<TcpStream> = (0..5)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            writeln!(s, "{i}").unwrap();
            assert_eq!(read_line(&mut s), i.to_string());
            s
        })
        .collect();
    let started = std::time::Instant::now();
    offer_refused(addr, 300, "overloaded");
    let seconds = started.elapsed().as_secs() as usize + 2;
    bin.signal("TERM");
    drop(held);
    let (code, lines) = bin.wait();
    assert_eq!(code, Some(0));
    let (warnings, refused, access, summed) =
        refusal_lines(&lines, "max_connections", "overloaded");
    println!(
        "300 refusals in < {seconds} s: {warnings} warnings, {refused}+{access} lines, {summed} summed up"
    );
    assert!(warnings <= seconds, "{warnings} warnings in {seconds} s");
    assert!(
        refused <= 10 * seconds && access == refused,
        "{refused} refusal lines, {access} access lines"
    );
    assert_eq!(refused + summed, 300, "every refusal is logged or counted");
}

#[test]
fn a_dead_host_logs_its_failed_connects_once_a_second() {
    // Health checks that never take it down, so every client tries it.
    let config = TempConfig::new(
        "dead-host",
        &format!(
            "[[upstream]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{}\"]\n\n\
             [upstream.health]\ninterval = \"1h\"\nfall = 1000\n",
            dead_addr()
        ),
    );
    let mut bin = Binary::start(&["--config", config.arg()]);
    let addr = bin.listen_addr();
    let started = std::time::Instant::now();
    offer_refused(addr, 100, "upstream_unavailable");
    let seconds = started.elapsed().as_secs() as usize + 2;
    bin.signal("TERM");
    let (_, lines) = bin.wait();
    let (warnings, refused, _, summed) =
        refusal_lines(&lines, "failed connects", "upstream_unavailable");
    println!("100 failed connects in < {seconds} s: {warnings} warnings");
    assert!(
        (1..=seconds).contains(&warnings),
        "{warnings} connect warnings in {seconds} s"
    );
    assert_eq!(refused + summed, 100);
}

#[test]
fn refusal_close_in_the_file_closes_without_a_line_and_logs_the_code() {
    let config = TempConfig::new(
        "refusal",
        &format!(
            "[[upstream]]\nname = \"app\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{}\"]\nrefusal = \"close\"\n",
            dead_addr()
        ),
    );
    let bin = Binary::start(&["--config", config.arg()]);
    let mut client = TcpStream::connect(bin.listen_addr()).unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let got = read_to_end(&mut client).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), "", "no line");
    finish(client);
    let line = bin.wait_for_log("tcplb::access");
    assert!(line.contains("end=upstream_unavailable"), "{line}");
}

/// The binary in quick mode in front of an echo host, with one live pair
/// that has echoed a line.
fn binary_with_live_pair(drain_timeout: &str) -> (Binary, TcpStream, SocketAddr, TestHost) {
    let host = spawn_host("h", Behavior::Echo);
    let hosts = host.addr.to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--host",
        &hosts,
        "--drain-timeout",
        drain_timeout,
    ];
    let bin = Binary::start(&args);
    let addr = bin.listen_addr();
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    client.write_all(b"before\n").unwrap();
    assert_eq!(read_line(&mut client), "before");
    (bin, client, addr, host)
}

#[test]
fn sigterm_drains_live_pairs_then_exits_zero() {
    let (mut bin, mut client, addr, _host) = binary_with_live_pair("20s");
    bin.signal("TERM");
    bin.wait_for_log("shutting down");
    // No longer accepting, but the live pair keeps relaying.
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting after SIGTERM"
    );
    client.write_all(b"during\n").unwrap();
    assert_eq!(read_line(&mut client), "during");
    finish(client);
    let (code, _) = bin.wait();
    assert_eq!(code, Some(0));
}

/// A stream in flight when SIGTERM comes, spliced through pipes, goes on
/// to its end, byte-exact, within the drain period.
#[test]
fn sigterm_drains_a_spliced_stream_to_its_end() {
    let host = spawn_host("h", Behavior::Echo);
    let hosts = host.addr.to_string();
    let args = ["--listen", "127.0.0.1:0", "--host", &hosts];
    let mut bin =
        Binary::start(&[&args[..], &["--relay", "splice", "--drain-timeout", "20s"]].concat());
    let mut client = TcpStream::connect(bin.listen_addr()).unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let data = Rng::new(21).bytes(8 << 20);
    let mut writer = client.try_clone().unwrap();
    let sent = data.clone();
    let (half, tx) = (data.len() / 2, std::sync::mpsc::channel::<()>());
    let (go, wait) = tx;
    let send = std::thread::spawn(move || {
        writer.write_all(&sent[..half]).unwrap();
        // The rest only once tcplb is draining.
        wait.recv().unwrap();
        writer.write_all(&sent[half..]).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = vec![0u8; data.len()];
    client.read_exact(&mut back[..half]).unwrap();
    bin.signal("TERM");
    bin.wait_for_log("shutting down");
    go.send(()).unwrap();
    client.read_exact(&mut back[half..]).unwrap();
    send.join().unwrap();
    assert!(back == data, "the echo differs");
    assert_eq!(client.read(&mut [0u8; 1]).unwrap(), 0, "then the end");
    let (code, log) = bin.wait();
    assert_eq!(code, Some(0));
    assert!(
        !log.iter().any(|l| l.contains("remaining")),
        "nothing was cut: {log:#?}"
    );
}

#[test]
fn drain_period_end_closes_what_is_left_and_exits_zero() {
    let (mut bin, mut client, _addr, _host) = binary_with_live_pair("200ms");
    bin.signal("TERM");
    let (code, log) = bin.wait();
    assert_eq!(code, Some(0));
    assert!(
        log.iter().any(|l| l.contains("closing 1 remaining")),
        "{log:#?}"
    );
    // The client's connection was cut (reset), not left hanging.
    let mut buf = [0u8; 8];
    let err = std::io::Read::read(&mut client, &mut buf).expect_err("a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn second_signal_stops_at_once() {
    let (mut bin, _client, _addr, _host) = binary_with_live_pair("1h");
    bin.signal("INT");
    bin.wait_for_log("shutting down");
    bin.signal("INT");
    let (code, log) = bin.wait();
    assert_eq!(code, Some(0));
    assert!(log.iter().any(|l| l.contains("stopping now")), "{log:#?}");
}

#[test]
fn no_descriptor_leaks_after_clients_leave() {
    no_descriptor_leaks("auto");
}

/// Pipes are descriptors too: none is left once the pairs are gone.
#[test]
fn no_descriptor_leaks_after_spliced_clients_leave() {
    no_descriptor_leaks("splice");
}

fn no_descriptor_leaks(relay: &str) {
    let hosts: Vec<_> = (0..2)
        .map(|i| spawn_host(&format!("h{i}"), Behavior::Echo))
        .collect();
    let dead = dead_addr();
    let args: Vec<String> = ["--listen", "127.0.0.1:0", "--relay", relay]
        .iter()
        .map(|s| s.to_string())
        .chain(
            hosts
                .iter()
                .flat_map(|h| ["--host".to_string(), h.addr.to_string()]),
        )
        .chain(["--host".to_string(), dead.to_string()])
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bin = Binary::start(&args);
    let addr = bin.listen_addr();
    let baseline = bin.fd_count();
    for round in 0..3 {
        let mut clients: Vec<TcpStream> =
            (0..30).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for (i, c) in clients.iter_mut().enumerate() {
            c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let msg = format!("{round}-{i}\n");
            c.write_all(msg.as_bytes()).unwrap();
            assert_eq!(read_line(c), msg.trim_end());
        }
        assert!(bin.fd_count() >= baseline + 60, "30 pairs hold 60 sockets");
        for c in clients {
            finish(c);
        }
        // The client sees EOF a moment before the loop closes the sockets.
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        while bin.fd_count() != baseline {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: {} fds, not {baseline}",
                bin.fd_count()
            );
            std::thread::yield_now();
        }
    }
}

/// Waits for a client command to end by itself, failing the test if it
/// has not within IO_TIMEOUT.
fn wait_bounded(child: &mut std::process::Child, command: &str) {
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("`{command}` did not end at the end of its input");
        }
        std::thread::yield_now();
    }
}

#[test]
fn demo_serves_greeting_echo_hosts() {
    let mut bin = Binary::start(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
    ]);
    let mut stdout = BufReader::new(bin.child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let addr: SocketAddr = first
        .split("behind tcplb on ")
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected banner: {first}"))
        .trim()
        .parse()
        .unwrap();
    let mut greeted = Vec::new();
    for i in 0..3 {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        greeted.push(read_line(&mut c));
        let msg = format!("line {i}\n");
        c.write_all(msg.as_bytes()).unwrap();
        assert_eq!(read_line(&mut c), msg.trim_end());
        finish(c);
    }
    greeted.sort();
    assert_eq!(
        greeted,
        [
            "hello from host-1",
            "hello from host-2",
            "hello from host-3"
        ]
    );
    // A plain upstream has no client identity to log.
    for _ in 0..3 {
        let access = bin.wait_for_log("tcplb::access");
        assert!(access.contains("`demo` host="), "{access}");
        assert!(!access.contains("identity="), "{access}");
    }
    // The printed commands work as printed.
    let (mut certs_dir, mut nc) = (None, None);
    let command = loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "no openssl command printed"
        );
        if let Some(dir) = line.split("made for this run in ").nth(1) {
            certs_dir = Some(PathBuf::from(dir.trim().trim_end_matches("):")));
        }
        if let Some(command) = line.split("another terminal:").nth(1) {
            nc = Some(command.trim().to_string());
        }
        if line.trim_start().starts_with("openssl s_client") {
            break line;
        }
    };
    // nc: ends by itself at the end of its input, with every answer shown.
    let nc = nc.expect("an nc command is printed");
    let words: Vec<&str> = nc.split_whitespace().collect();
    let mut child = Command::new(words[0])
        .args(&words[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("nc (netcat-openbsd) is installed (.ci/run installs it)");
    child.stdin.take().unwrap().write_all(b"by nc\n").unwrap();
    wait_bounded(&mut child, &nc);
    let mut shown = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut shown).unwrap();
    assert!(
        shown.starts_with("hello from host-") && shown.ends_with("\nby nc\n"),
        "{nc}: {shown:?}"
    );
    let certs_dir = certs_dir.expect("the certificates' directory is printed");
    assert!(certs_dir.join("alice.key").is_file(), "{certs_dir:?}");
    let words: Vec<&str> = command.split_whitespace().collect();
    let mut openssl = Command::new(words[0])
        .args(&words[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed (.ci/run installs it)");
    let mut out = BufReader::new(openssl.stdout.take().unwrap());
    let mut greeting = String::new();
    out.read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("hello from host-"), "{greeting:?}");
    let mut input = openssl.stdin.take().unwrap();
    input.write_all(b"over tls\n").unwrap();
    let mut echo = String::new();
    out.read_line(&mut echo).unwrap();
    assert_eq!(echo, "over tls\n");
    // The end of its input ends the command as printed.
    drop(input);
    wait_bounded(&mut openssl, &command);
    let access = bin.wait_for_log("`demo-mtls`");
    assert!(
        access.contains("`demo-mtls` identity=alice host="),
        "{access}"
    );
    // SIGTERM lets the demo remove its temporary certificates.
    bin.signal("TERM");
    assert_eq!(bin.wait().0, Some(0));
    assert!(!certs_dir.exists(), "{certs_dir:?} left behind");
}

#[test]
fn out_of_descriptors_keeps_serving_and_accepts_again_when_freed() {
    out_of_descriptors("copy");
}

/// The same with pipes: the first greeting leaves a free pipe (two
/// descriptors) behind, which running out of descriptors closes so that
/// the last pair fits; spliced directions that find no descriptor for a
/// pipe relay through buffers.
#[test]
fn out_of_descriptors_closes_free_pipes_and_relays_without_them() {
    out_of_descriptors("splice");
}

fn out_of_descriptors(relay: &str) {
    let host = spawn_host("h", Behavior::Named);
    let hosts = host.addr.to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--host",
        &hosts,
        "--relay",
        relay,
    ];
    // Descriptors tcplb holds before its first pair, measured on a twin.
    // Only low numbers take up room under the limit (descriptors inherited
    // from the test harness, like cargo's jobserver pipe, sit far above it).
    const PAIRS: usize = 3;
    let base = {
        let twin = Binary::start(&args);
        twin.listen_addr();
        twin.fds().into_iter().filter(|&fd| fd < 64).count()
    };
    let bin = Binary::start_limited(base + 2 * PAIRS, &args);
    let addr = bin.listen_addr();
    let mut served: Vec<TcpStream> = (0..PAIRS)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            assert_eq!(read_line(&mut c), "h");
            c
        })
        .collect();
    // Every descriptor is in use: the next client waits in the listen queue.
    let mut waiting = TcpStream::connect(addr).unwrap();
    waiting.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    bin.wait_for_log("out of descriptors");
    // Pairs already open keep relaying meanwhile.
    for (i, c) in served.iter_mut().enumerate() {
        let msg = format!("still {i}\n");
        c.write_all(msg.as_bytes()).unwrap();
        assert_eq!(read_line(c), msg.trim_end());
    }
    // One pair ends: its descriptors let the waiting client in.
    finish(served.pop().unwrap());
    assert_eq!(read_line(&mut waiting), "h");
    waiting.write_all(b"in\n").unwrap();
    assert_eq!(read_line(&mut waiting), "in");
}

/// ENFILE (the system's file table is full) cannot be caused safely for
/// one process: the limit, `fs.file-max`, is machine-wide, so lowering it
/// would fail every other process on the machine too, and root is exempt
/// from it anyway. So strace makes tcplb's first three accepts fail with
/// ENFILE, as the kernel would: tcplb must pause 100 ms each time instead
/// of spinning, say so once, then take the client that waited.
#[test]
fn enfile_pauses_accepting_logs_once_and_recovers() {
    let host = spawn_host("h", Behavior::Named);
    let hosts = host.addr.to_string();
    let trace = std::env::temp_dir().join(format!("tcplb-enfile-{}.strace", std::process::id()));
    let trace_arg = trace.to_str().unwrap();
    let mut bin = Binary::start_wrapped(
        &[
            "strace",
            "-f",
            "-o",
            trace_arg,
            "-e",
            "trace=accept4",
            "-e",
            "inject=accept4:error=ENFILE:when=1..3",
        ],
        &["--listen", "127.0.0.1:0", "--host", &hosts],
    );
    let addr = bin.listen_addr();
    let started = std::time::Instant::now();
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(read_line(&mut client), "h");
    let waited = started.elapsed();
    finish(client);
    let tcplb = bin.children();
    assert_eq!(tcplb.len(), 1, "strace runs tcplb");
    let status = Command::new("kill")
        .args(["-TERM", &tcplb[0].to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (code, log) = bin.wait();
    assert_eq!(code, Some(0), "{log:#?}");
    let calls = std::fs::read_to_string(&trace).unwrap();
    let _ = std::fs::remove_file(&trace);
    let accepts = calls.lines().filter(|l| l.contains("accept4(")).count();
    let injected = calls.matches("ENFILE").count();
    println!("served after {waited:?}; {accepts} accept4 calls, {injected} failed with ENFILE");
    assert_eq!(injected, 3, "{calls}");
    // Three failures, the accept that worked, and one that found no more.
    assert!(accepts <= 5, "accept spins:\n{calls}");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "served after {waited:?}, not after three pauses of 100 ms"
    );
    let warnings: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("out of descriptors"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log:#?}");
    assert!(warnings[0].contains("os error 23"), "{}", warnings[0]);
}

#[test]
fn ipv6_and_host_names_are_accepted_for_listen_and_hosts() {
    let v6 = TcpListener::bind("[::1]:0").unwrap();
    let v6_addr = v6.local_addr().unwrap();
    let (tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in v6.incoming() {
            let mut conn = conn.unwrap();
            conn.write_all(b"v6\n").unwrap();
            tx.send(()).unwrap();
        }
    });
    let named = spawn_host("named", Behavior::Named);
    let by_name = format!("localhost:{}", named.addr.port());
    let v6_host = v6_addr.to_string();
    let bin = Binary::start(&[
        "--listen", "[::1]:0", "--host", &v6_host, "--host", &by_name,
    ]);
    let addr = bin.listen_addr();
    assert!(addr.is_ipv6(), "{addr}");
    let mut greetings = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        greetings.push(read_line(&mut c));
    }
    greetings.sort();
    assert_eq!(greetings, ["named", "v6"]);
    accepted.recv_timeout(IO_TIMEOUT).unwrap();
}

#[test]
fn config_mode_serves_each_upstream_on_its_own_port() {
    let a = spawn_host("a-host", Behavior::Named);
    let b = spawn_host("b-host", Behavior::Named);
    let file = TempConfig::new(
        "two",
        &format!(
            "[defaults]\nidle_timeout = \"10m\"\n\n\
             [[upstream]]\nname = \"alpha\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{}\"]\n\n\
             [[upstream]]\nname = \"beta\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{}\"]\n",
            a.addr, b.addr
        ),
    );
    let bin = Binary::start(&["--config", file.arg()]);
    let alpha = bin.listen_addr_of("alpha");
    let beta = bin.listen_addr_of("beta");
    for (addr, expected) in [(alpha, "a-host"), (beta, "b-host"), (alpha, "a-host")] {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        assert_eq!(read_line(&mut c), expected);
        finish(c);
    }
}

/// `tcplb check` of a config whose `cert` is `cert`; fails the test if
/// it does not exit within IO_TIMEOUT (a blocking read would hang it).
fn check_with_cert(name: &str, cert: &str) -> (Option<i32>, String) {
    let file = TempConfig::new(
        name,
        &format!(
            "[tls]\ncert = \"{cert}\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\n\
             [[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\nhosts = [\"127.0.0.1:9001\"]\n"
        ),
    );
    if cert == "fifo.pem" {
        let fifo = file.path.parent().unwrap().join("fifo.pem");
        assert!(
            Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
    }
    if cert == "big.pem" {
        let big = file.path.parent().unwrap().join("big.pem");
        std::fs::write(big, vec![b'A'; 5 << 20]).unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcplb"))
        .args(["check", file.arg()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("`tcplb check` with cert = {cert} did not finish");
        }
        std::thread::yield_now();
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), stderr(&out))
}

#[test]
fn tls_files_that_are_not_small_regular_files_are_refused_at_once() {
    for (cert, why) in [
        ("fifo.pem", "not a regular file"),
        ("/dev/zero", "not a regular file"),
        ("big.pem", "larger than 4 MiB"),
    ] {
        let (code, err) = check_with_cert(&format!("cert-{}", cert.replace('/', "_")), cert);
        assert_eq!(code, Some(1), "{cert}: {err}");
        assert!(err.contains(why), "{cert}: {err}");
    }
}

#[test]
fn check_reads_the_tls_files_and_names_the_bad_one() {
    let file = TempConfig::new(
        "tls",
        "[tls]\ncert = \"server.pem\"\nkey = \"server.key\"\nclient_ca = \"ca.pem\"\n\n\
         [[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\nhosts = [\"127.0.0.1:9001\"]\n",
    );
    let out = tcplb(&["check", file.arg()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    // Relative to the config file's folder, at the key that named it.
    let expected = file.path.parent().unwrap().join("server.pem");
    assert!(
        err.starts_with(&format!(
            "{}:2:8: TLS file {}: cannot read",
            file.arg(),
            expected.display()
        )),
        "{err}"
    );
    // With real files, the same config checks out.
    let certs = file.path.parent().unwrap();
    let out = tcplb(&[
        "certs",
        "init",
        "--dir",
        certs.to_str().unwrap(),
        "--client",
        "alice",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = tcplb(&["check", file.arg()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // No [[client]] rule: valid, and warned about.
    assert!(
        stderr(&out).contains(&format!(
            "{}:1:1: warning: [tls] has no [[client]] rule",
            file.arg()
        )),
        "{}",
        stderr(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("ok (1 upstream, 1 host, 1 warning)"),
        "{stdout}"
    );
}

/// `tcplb check` (and `--strict`) on a config with one TLS upstream for
/// `alice`, and the server certificate `server`.
fn check_tls(
    name: &str,
    pki: &common::pki::Pki,
    server: &common::pki::ClientCert,
    strict: bool,
) -> std::process::Output {
    let file = TempConfig::new(
        name,
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\n\
             [[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\nhosts = [\"127.0.0.1:9001\"]\n\n\
             [[client]]\nidentity = \"alice\"\nupstreams = [\"a\"]\nrate = 1\n",
            server.cert_path, server.key_path, pki.ca_path
        ),
    );
    let mut args = vec!["check", file.arg()];
    if strict {
        args.push("--strict");
    }
    tcplb(&args)
}

#[test]
fn a_server_certificate_near_its_end_is_a_warning_that_strict_makes_fatal() {
    let pki = common::pki::Pki::new("soon");
    let now = time::OffsetDateTime::now_utc();
    let soon = pki.server_valid(
        Some((
            now - time::Duration::days(80),
            now + time::Duration::days(5),
        )),
        "soon",
    );
    let out = check_tls("soon", &pki, &soon, false);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(":2:8: warning: TLS file "), "{err}");
    assert!(
        err.contains("soon.pem: the server certificate expires at 20"),
        "{err}"
    );
    assert!(
        err.contains(", in 4 days") || err.contains(", in 5 days"),
        "{err}"
    );
    let out = check_tls("soon-strict", &pki, &soon, true);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("failed with --strict (1 upstream, 1 host, 1 warning)"),
        "{}",
        stderr(&out)
    );
    // Without warnings, --strict passes.
    let server = pki.server_valid(None, "fine");
    let out = check_tls("fine", &pki, &server, true);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
}

#[test]
fn serving_logs_the_warnings_at_start() {
    let config = TempConfig::new(
        "warn-serve",
        "[defaults]\nbuffer_size = \"32KiB\"\nbulk_buffer_size = \"16KiB\"\n\n\
         [[upstream]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"127.0.0.1:9001\"]\n",
    );
    let bin = Binary::start(&["--config", config.arg(), "--bulk-buffer-size", "8KiB"]);
    let lines = bin.log_until(" ready: ");
    let warned = |needle: &str| {
        lines
            .iter()
            .any(|l| l.contains(" WARN ") && l.contains(needle))
    };
    assert!(
        warned(":3:20: warning: `bulk_buffer_size` (16384) is below `buffer_size` (32768)"),
        "{lines:#?}"
    );
    assert!(
        warned("command line: warning: --bulk-buffer-size 8192 is below buffer_size (32768)"),
        "{lines:#?}"
    );
    let out = tcplb(&["check", config.arg()]);
    assert!(
        stderr(&out)
            .contains(":3:20: warning: `bulk_buffer_size` (16384) is below `buffer_size` (32768)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_failed_demo_start_leaves_no_key_directory_behind() {
    let taken = TcpListener::bind(localhost()).unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for flag in ["--listen", "--tls-listen"] {
        // The demo's temporary directory goes under TMPDIR.
        let tmp = std::env::temp_dir().join(format!(
            "tcplb-test-{}-demo-fails{flag}",
            std::process::id()
        ));
        std::fs::create_dir_all(&tmp).unwrap();
        let (listen, tls_listen) = match flag {
            "--listen" => (addr.as_str(), "127.0.0.1:0"),
            _ => ("127.0.0.1:0", addr.as_str()),
        };
        let out = Command::new(env!("CARGO_BIN_EXE_tcplb"))
            .env("TMPDIR", &tmp)
            .args(["demo", "--listen", listen, "--tls-listen", tls_listen])
            .output()
            .unwrap();
        let left: Vec<_> = std::fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        // Removed before any assertion, so a failure leaves nothing either.
        std::fs::remove_dir_all(&tmp).unwrap();
        assert_eq!(out.status.code(), Some(1), "{flag}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("cannot listen on {addr}")),
            "{flag}: {}",
            stderr(&out)
        );
        assert!(left.is_empty(), "{flag}: left behind {left:?}");
    }
}

#[test]
fn demo_help_states_the_connection_cap_the_demo_runs_with() {
    let help = String::from_utf8(tcplb(&["demo", "--help"]).stdout).unwrap();
    let line = help
        .lines()
        .find(|l| l.contains("--max-connections"))
        .unwrap_or_else(|| panic!("no --max-connections in:\n{help}"));
    let shown: usize = line
        .split("[default: ")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .unwrap_or_else(|| panic!("no default in {line:?}"))
        .parse()
        .unwrap();
    let mut bin = Binary::start(&[
        "demo",
        "--listen",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
    ]);
    let ready = bin.wait_for_log(" ready: ");
    assert!(
        ready.contains(&format!("max_connections={shown} ")),
        "help says {shown}, the demo runs with: {ready}"
    );
    bin.signal("TERM");
    assert_eq!(bin.wait().0, Some(0));
}

#[test]
fn access_lines_are_filtered_out_by_their_target() {
    // The README's example: RUST_LOG=info,tcplb::access=off.
    let host = spawn_host("h", Behavior::Echo);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tcplb"))
        .args(["--listen", "127.0.0.1:0", "--host", &host.addr.to_string()])
        .env("RUST_LOG", "info,tcplb::access=off")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut lines = Vec::new();
    let addr = loop {
        let line = log.next().expect("a start-up line").unwrap();
        lines.push(line.clone());
        if line.contains("listening on ") {
            break addr_after(&line, "listening on ");
        }
    };
    let mut client = TcpStream::connect(addr).unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    client.write_all(b"hello\n").unwrap();
    assert_eq!(read_line(&mut client), "hello");
    finish(client);
    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    lines.extend(log.map(Result::unwrap));
    assert!(child.wait().unwrap().success());
    assert!(
        lines.iter().any(|l| l.contains("tcplb stopped")),
        "{lines:#?}"
    );
    // No access line, under whatever target it might be logged.
    assert!(
        !lines.iter().any(|l| l.contains(" end=closed")),
        "{lines:#?}"
    );
}
