//! Relaying through the real reactor: byte-exact transfer under
//! concurrency, half-close in both directions, reset propagation,
//! backpressure, and the buffer pool's promise that idle pairs hold no buffers.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::*;
use tcplb::{Relay, Settings};

/// `clients` concurrent clients each push `per_client` random bytes in
/// random chunk sizes through the proxy to echo hosts, while reading the
/// echo back in random sizes; every byte must come back in order.
fn echo_through_proxy(buffer_size: usize, clients: usize, per_client: usize) {
    let hosts: Vec<_> = (0..3)
        .map(|i| spawn_host(&format!("h{i}"), Behavior::Echo))
        .collect();
    let addrs: Vec<_> = hosts.iter().map(|h| h.addr).collect();
    let proxy = start(config(
        &addrs,
        Settings {
            buffer_size,
            ..Settings::default()
        },
    ));

    let workers: Vec<_> = (0..clients)
        .map(|i| {
            let stream = proxy.connect();
            thread::spawn(move || {
                let mut rng = Rng::new(i as u64 + 1);
                let data = rng.bytes(per_client);
                let mut writer = stream.try_clone().unwrap();
                let sent = data.clone();
                let send = thread::spawn(move || {
                    let mut rng = Rng::new(1000 + i as u64);
                    let mut at = 0;
                    while at < sent.len() {
                        let n = (1 + rng.below(64 * 1024)).min(sent.len() - at);
                        writer.write_all(&sent[at..at + n]).unwrap();
                        at += n;
                    }
                    writer.shutdown(Shutdown::Write).unwrap();
                });
                let mut reader = stream;
                let mut got = Vec::with_capacity(per_client);
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let want = 1 + rng.below(chunk.len());
                    let n = reader.read(&mut chunk[..want]).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&chunk[..n]);
                }
                send.join().unwrap();
                assert_eq!(got.len(), data.len(), "client {i}: length");
                assert!(got == data, "client {i}: bytes differ");
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let stats = proxy.stats();
    assert_eq!(stats.pairs, 0);
    assert_eq!(proxy.host_counts(), [0, 0, 0]);
}

#[test]
fn many_clients_relay_mebibytes_byte_exact_both_ways() {
    echo_through_proxy(16 * 1024, 16, 3 << 20);
}

#[test]
fn smallest_buffers_still_relay_byte_exact() {
    echo_through_proxy(1024, 8, 1 << 20);
}

/// A host that reads until the client's FIN, then answers with what it got
/// (reversed, so the answer depends on every byte) and closes.
fn spawn_answer_after_eof_host() -> std::net::SocketAddr {
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                let mut got = Vec::new();
                conn.read_to_end(&mut got).unwrap();
                got.reverse();
                conn.write_all(&got).unwrap();
            });
        }
    });
    addr
}

#[test]
fn client_half_close_host_answers_after_eof() {
    let proxy = start(config(
        &[spawn_answer_after_eof_host()],
        Settings::default(),
    ));
    let mut client = proxy.connect();
    let data = Rng::new(7).bytes(2 << 20);
    client.write_all(&data).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let answer = read_to_end(&mut client).unwrap();
    let mut expected = data;
    expected.reverse();
    assert_eq!(answer.len(), expected.len());
    assert!(answer == expected);
}

#[test]
fn host_half_close_client_keeps_sending() {
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    let greeting = Rng::new(8).bytes(300_000);
    let (tx, received) = mpsc::channel();
    let to_send = greeting.clone();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(&to_send).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        tx.send(got).unwrap();
    });
    let proxy = start(config(&[addr], Settings::default()));
    let mut client = proxy.connect();
    // The host's FIN arrives after its bytes, and the client can still send.
    assert!(read_to_end(&mut client).unwrap() == greeting);
    let data = Rng::new(9).bytes(1 << 20);
    client.write_all(&data).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let got = received.recv_timeout(IO_TIMEOUT).unwrap();
    assert!(got == data);
    // The host saw EOF, so both directions are done and the pair is gone.
    assert_eq!(proxy.stats().pairs, 0);
}

/// Accepts one connection, reads one byte, then reports how the next read ended.
fn spawn_reset_observer() -> (std::net::SocketAddr, mpsc::Receiver<ErrorKind>) {
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).unwrap();
        conn.write_all(b"!").unwrap();
        let kind = match conn.read(&mut byte) {
            Ok(0) => ErrorKind::UnexpectedEof,
            Ok(_) => ErrorKind::InvalidData,
            Err(e) => e.kind(),
        };
        tx.send(kind).unwrap();
    });
    (addr, rx)
}

#[test]
fn client_reset_reaches_host_as_reset() {
    let (addr, outcome) = spawn_reset_observer();
    let proxy = start(config(&[addr], Settings::default()));
    let mut client = proxy.connect();
    client.write_all(b"x").unwrap();
    let mut ack = [0u8; 1];
    client.read_exact(&mut ack).unwrap();
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    assert_eq!(
        outcome.recv_timeout(IO_TIMEOUT).unwrap(),
        ErrorKind::ConnectionReset
    );
}

#[test]
fn host_reset_reaches_client_as_reset() {
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).unwrap();
        socket2::SockRef::from(&conn)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    let proxy = start(config(&[addr], Settings::default()));
    let mut client = proxy.connect();
    client.write_all(b"x").unwrap();
    let mut buf = [0u8; 16];
    let err = client.read(&mut buf).expect_err("a reset, not data or EOF");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    assert_eq!(proxy.stats().pairs, 0);
}

/// A host streams faster than its client reads: the client reads nothing
/// until the stream has stalled. tcplb must then have stopped reading
/// from the host (bytes wait unread in tcplb's kernel and the host's
/// writes no longer progress) while holding at most one bulk buffer of
/// the stream, which is the documented bound, all measured from outside
/// tcplb; and once the client reads, every byte arrives.
#[test]
fn backpressure_stops_reading_the_sender_and_bounds_what_tcplb_holds() {
    // More than the kernels on the way hold, so the host's writes block.
    const TOTAL: usize = 64 << 20;
    let payload = std::sync::Arc::new(Rng::new(11).bytes(TOTAL));
    let host = spawn_streaming_host(payload.clone());
    let settings = Settings::default();
    let bound = settings.bulk_buffer() as i64;
    let proxy = start(config(&[host.addr], settings));
    let mut client = proxy.connect();
    client.write_all(b"g").unwrap();
    let tcplb_end = host.peer.recv_timeout(IO_TIMEOUT).unwrap();
    let ends = (client.local_addr().unwrap(), proxy.addr);
    let stalled = stalled_backlog(&host, tcplb_end, ends);
    let held = stalled.held_by_tcplb(0);
    println!("stalled: {stalled:?}, tcplb holds {held} bytes");
    assert!(
        stalled.written < TOTAL as u64,
        "the host's writes stopped before the end: {stalled:?}"
    );
    assert!(
        stalled.from_host.unread > 0,
        "tcplb leaves the host's bytes unread in its kernel: {stalled:?}"
    );
    assert!(
        held > 0 && held <= bound,
        "tcplb holds {held} bytes (bound {bound}): {stalled:?}"
    );
    // One direction holds bytes: in a bulk buffer when copied, in a pipe
    // (kernel memory, bounded the same) when spliced, as `auto` does once
    // the direction streams.
    let stats = proxy.stats();
    let held_in = (stats.buffers_in_use, stats.pipes_in_use);
    match test_relay().unwrap_or_default() {
        Relay::Copy => assert_eq!(held_in, (1, 0), "{stats:?}"),
        Relay::Splice | Relay::Auto => assert_eq!(held_in, (0, 1), "{stats:?}"),
    }
    // The reader catches up: the stream resumes, byte-exact.
    let mut got = vec![0u8; TOTAL];
    client.read_exact(&mut got).unwrap();
    assert!(got == *payload, "the stream differs");
    finish(client);
    proxy.wait_until("released the buffers and pipes", |s| {
        s.buffers_in_use == 0 && s.pipes_in_use == 0
    });
}

#[test]
fn idle_pairs_hold_no_buffers() {
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(config(&[host.addr], Settings::default()));
    let mut clients: Vec<TcpStream> = (0..50).map(|_| proxy.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let msg = format!("hello {i}\n");
        c.write_all(msg.as_bytes()).unwrap();
        assert_eq!(read_line(c), msg.trim_end());
    }
    let stats = proxy.stats();
    assert_eq!(stats.pairs, 50);
    assert_eq!(stats.buffers_in_use, 0, "{stats:?}");
    for c in clients {
        finish(c);
    }
    assert_eq!(proxy.stats().pairs, 0);
}

#[test]
fn urgent_bytes_are_relayed_inline_without_stalling() {
    // Linux ends a read at the urgent mark even with more bytes queued; a
    // proxy that takes every short read for "drained" then waits forever.
    let listener = TcpListener::bind(localhost()).unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let mut args = vec!["--listen", "127.0.0.1:0", "--host", &host];
    let relay = relay_args();
    args.extend(relay.iter().map(String::as_str));
    let bin = Binary::start(&args);
    let addr = bin.listen_addr();
    let client = TcpStream::connect(addr).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Stop tcplb so all three writes are queued before it reads any.
    bin.signal("STOP");
    let sock = socket2::SockRef::from(&client);
    (&client).write_all(b"abc").unwrap();
    assert_eq!(sock.send_out_of_band(b"X").unwrap(), 1);
    (&client).write_all(b"def").unwrap();
    bin.signal("CONT");
    let mut got = [0u8; 7];
    conn.read_exact(&mut got)
        .expect("every byte arrives without the client sending more");
    assert_eq!(&got, b"abcXdef");
    // Again while tcplb runs, and toward the client too.
    (&client).write_all(b"ghi").unwrap();
    assert_eq!(sock.send_out_of_band(b"Y").unwrap(), 1);
    (&client).write_all(b"jkl").unwrap();
    conn.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ghiYjkl");
    (&conn).write_all(b"mn").unwrap();
    let host_sock = socket2::SockRef::from(&conn);
    assert_eq!(host_sock.send_out_of_band(b"Z").unwrap(), 1);
    (&conn).write_all(b"op").unwrap();
    let mut back = [0u8; 5];
    let mut client = client;
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"mnZop");
}

#[test]
fn idle_timeout_with_undelivered_bytes_resets_instead_of_faking_eof() {
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, host_outcome) = mpsc::channel();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let chunk = vec![7u8; 1 << 20];
        // Writes until the stalled client makes the proxy time out.
        let outcome = (0..64).try_for_each(|_| conn.write_all(&chunk));
        tx.send(outcome.map_err(|e| e.kind())).unwrap();
    });
    let settings = Settings {
        idle_timeout: Duration::from_millis(300),
        ..Settings::default()
    };
    let proxy = start(config(&[addr], settings));
    let mut client = proxy.connect();
    // The client reads nothing until the host has been cut off.
    let host_result = host_outcome.recv_timeout(IO_TIMEOUT).unwrap();
    assert!(host_result.is_err(), "64 MiB cannot fit in flight");
    let mut sink = vec![0u8; 1 << 16];
    let end = loop {
        match client.read(&mut sink) {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e.kind()),
        }
    };
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "a cut stream must not end in EOF"
    );
}

/// `socket_buffer` fixes the kernel buffers of both of tcplb's sockets of
/// a pair (read back with `ss`; Linux reports twice the figure set), and a
/// MiB still crosses them byte-exactly both ways.
#[test]
fn socket_buffer_fixes_the_kernel_buffers_of_both_sockets() {
    const SIZE: usize = 10_000;
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(config(
        &[host.addr],
        Settings {
            socket_buffer: Some(SIZE),
            ..Settings::default()
        },
    ));
    let mut client = proxy.connect();
    let data = Rng::new(7).bytes(1 << 20);
    let mut writer = client.try_clone().unwrap();
    let sent = data.clone();
    let send = thread::spawn(move || writer.write_all(&sent));
    let mut back = vec![0u8; data.len()];
    client.read_exact(&mut back).unwrap();
    send.join().unwrap().unwrap();
    assert!(back == data, "echo differs");

    let fixed = (2 * SIZE as u64, 2 * SIZE as u64);
    // tcplb's accepted socket (its local port is the listener's) and its
    // socket to the host (the host's port is the remote one).
    let client_side = kernel_buffers(&format!("src {}", proxy.addr));
    let host_side = kernel_buffers(&format!("dst {}", host.addr));
    assert_eq!(client_side, [fixed]);
    assert_eq!(host_side, [fixed]);
    finish(client);
}

/// A client that stops reading: what tcplb has written toward it but not
/// sent stays bounded in the kernel (`unsent_limit`, 64 KiB by default:
/// `TCP_NOTSENT_LOWAT`), however large autotuning has grown the socket's
/// buffers, so stalled pairs do not push the machine into TCP memory
/// pressure.
#[test]
fn a_stalled_client_holds_little_unsent_data_in_tcplbs_kernel() {
    let most = most_unsent_toward_a_stalled_client(Settings::default(), 50, u64::MAX);
    println!("tcplb's socket toward a stalled client held at most {most} bytes unsent");
    // 64 KiB, plus the one segment a write may add beyond it.
    assert!(most > 0, "the socket never filled");
    assert!(
        most <= (64 + 64) << 10,
        "{most} bytes unsent toward a client that does not read"
    );
}

/// `unsent_limit = "off"` leaves the socket to the kernel, which queues
/// megabytes toward the same stalled client.
#[test]
fn without_an_unsent_limit_a_stalled_client_holds_megabytes() {
    let settings = Settings {
        unsent_limit: None,
        ..Settings::default()
    };
    let most = most_unsent_toward_a_stalled_client(settings, 400, 1 << 20);
    println!("without a limit, the socket held {most} bytes unsent");
    assert!(most > 1 << 20, "only {most} bytes unsent without a limit");
}

/// Streams from a host to a client that reads 64 MiB fast (so autotuning
/// grows every buffer on the way), then stops reading; returns the most
/// bytes tcplb's socket toward it held unsent (`ss`'s notsent) over up to
/// `samples` looks, stopping early once it is over `enough`.
fn most_unsent_toward_a_stalled_client(settings: Settings, samples: usize, enough: u64) -> u64 {
    const STREAM: usize = 256 << 20;
    let listener = TcpListener::bind(localhost()).unwrap();
    let host = listener.local_addr().unwrap();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..STREAM / chunk.len() {
            if conn.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let proxy = start(config(&[host], settings));
    let mut client = proxy.connect();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    while got < 64 << 20 {
        got += client.read(&mut buf).unwrap();
    }
    let filter = format!("src {} dst {}", proxy.addr, client.local_addr().unwrap());
    let mut most = 0;
    for _ in 0..samples {
        let out = std::process::Command::new("ss")
            .args(["-tinH", "state", "established"])
            .args(filter.split(' '))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let unsent = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("notsent:"))
            .map_or(0, |n| n.parse::<u64>().unwrap());
        most = most.max(unsent);
        if most > enough {
            break;
        }
    }
    most
}

/// Echoes `len` random bytes through the proxy on one connection (the
/// client writes, half-closes and reads the echo to its end), then
/// returns the counts once the pair is gone.
fn echo_once(proxy: &Running, len: usize, seed: u64) -> tcplb::UpstreamStats {
    let mut client = proxy.connect();
    let data = Rng::new(seed).bytes(len);
    let mut writer = client.try_clone().unwrap();
    let sent = data.clone();
    let send = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let back = read_to_end(&mut client).unwrap();
    send.join().unwrap();
    assert!(
        back == data,
        "the echo differs ({} of {len} bytes)",
        back.len()
    );
    proxy.wait_until("closed the pair", |s| s.pairs == 0);
    proxy.stats().upstreams[0].clone()
}

/// A config in `relay` mode, with exactly that mode whatever
/// `TCPLB_TEST_RELAY` says (the workers are still the tests').
fn in_mode(host: std::net::SocketAddr, settings: Settings) -> Running {
    start_as_given(config(
        &[host],
        Settings {
            workers: test_workers(),
            ..settings
        },
    ))
}

#[test]
fn splice_mode_moves_every_byte_of_a_plain_pair_through_pipes() {
    const LEN: usize = 4 << 20;
    let host = spawn_host("h", Behavior::Echo);
    let proxy = in_mode(
        host.addr,
        Settings {
            relay: Relay::Splice,
            ..Settings::default()
        },
    );
    let u = echo_once(&proxy, LEN, 3);
    let all = LEN as u64;
    assert_eq!((u.bytes_up, u.bytes_down), (all, all));
    assert_eq!(
        (u.spliced_up, u.spliced_down),
        (all, all),
        "every byte spliced, none copied"
    );
    let stats = proxy.stats();
    assert_eq!(
        (
            stats.pipes_in_use,
            stats.buffers_in_use,
            stats.splice_fallbacks
        ),
        (0, 0, 0)
    );
    assert_eq!(stats.pipes_free, 0, "no pair left, no pipe kept");
}

#[test]
fn copy_mode_splices_nothing() {
    const LEN: usize = 4 << 20;
    let host = spawn_host("h", Behavior::Echo);
    let proxy = in_mode(
        host.addr,
        Settings {
            relay: Relay::Copy,
            ..Settings::default()
        },
    );
    let u = echo_once(&proxy, LEN, 4);
    assert_eq!((u.bytes_up, u.bytes_down), (LEN as u64, LEN as u64));
    assert_eq!((u.spliced_up, u.spliced_down), (0, 0));
    assert_eq!(proxy.stats().pipes_free, 0);
}

#[test]
fn auto_copies_requests_and_answers_and_splices_streams() {
    let host = spawn_host("h", Behavior::Echo);
    let proxy = in_mode(host.addr, Settings::default());
    let mut client = proxy.connect();
    for i in 0..50 {
        let line = format!("request {i}\n");
        client.write_all(line.as_bytes()).unwrap();
        assert_eq!(read_line(&mut client), line.trim_end());
    }
    let u = &proxy.stats().upstreams[0];
    assert!(u.bytes_up > 0 && u.bytes_up == u.bytes_down);
    assert_eq!(
        (u.spliced_up, u.spliced_down),
        (0, 0),
        "small messages are copied"
    );
    finish(client);
    // A stream: its first reads fill whole buffers, and from then on it
    // is spliced (all but the first buffers' worth each way).
    const LEN: usize = 4 << 20;
    let before = proxy.stats().upstreams[0].clone();
    let u = echo_once(&proxy, LEN, 5);
    let spliced = (
        u.spliced_up - before.spliced_up,
        u.spliced_down - before.spliced_down,
    );
    let most = LEN as u64 / 2;
    assert!(
        spliced.0 > most && spliced.1 > most,
        "spliced {spliced:?} of {LEN} each way"
    );
}

/// With the only pipe held by a stalled pair, another pair relays through
/// buffers, byte-exact, and the fallback is counted; the stalled one then
/// delivers its whole stream.
#[test]
fn a_pair_that_finds_no_pipe_left_relays_through_buffers() {
    const TOTAL: usize = 64 << 20;
    let payload = std::sync::Arc::new(Rng::new(12).bytes(TOTAL));
    let streaming = spawn_streaming_host(payload.clone());
    let echo = spawn_host("h", Behavior::Echo);
    let mut config = config(
        &[streaming.addr],
        Settings {
            relay: Relay::Splice,
            max_pipes: 1,
            ..Settings::default()
        },
    );
    let mut second = config.upstreams[0].clone();
    second.name = "echo".to_string();
    second.hosts = vec![echo.addr.into()];
    config.upstreams.push(second);
    let proxy = start_as_given(config);
    let echo_addr = proxy.addrs[1];

    let mut stalled = proxy.connect();
    stalled.write_all(b"g").unwrap();
    let tcplb_end = streaming.peer.recv_timeout(IO_TIMEOUT).unwrap();
    let ends = (stalled.local_addr().unwrap(), proxy.addr);
    let backlog = stalled_backlog(&streaming, tcplb_end, ends);
    let stats = proxy.stats();
    assert_eq!(stats.pipes_in_use, 1, "the stalled pair holds the pipe");
    assert!(backlog.held_by_tcplb(0) > 0, "{backlog:?}");

    let mut client = TcpStream::connect(echo_addr).unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let data = Rng::new(13).bytes(1 << 20);
    let mut writer = client.try_clone().unwrap();
    let sent = data.clone();
    let send = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let back = read_to_end(&mut client).unwrap();
    send.join().unwrap();
    assert!(back == data, "the echo differs");
    let stats = proxy.stats();
    let echoed = stats.upstreams.iter().find(|u| u.name == "echo").unwrap();
    assert_eq!(echoed.bytes_up, data.len() as u64);
    assert_eq!((echoed.spliced_up, echoed.spliced_down), (0, 0));
    assert!(stats.splice_fallbacks > 0, "{stats:?}");

    let mut got = vec![0u8; TOTAL];
    stalled.read_exact(&mut got).unwrap();
    assert!(got == *payload, "the stalled stream differs");
    let streamed = &proxy.stats().upstreams[0];
    assert!(streamed.spliced_down > 0, "the pipe's pair spliced");
    finish(stalled);
}
