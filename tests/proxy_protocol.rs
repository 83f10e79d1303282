//! The PROXY protocol through the real reactor: the header tcplb sends
//! to hosts (`send_proxy`), read back by a test host with the `ppp`
//! crate (a decoder no one here wrote), v1 and v2, IPv4 and IPv6, and
//! over mTLS the TLVs of what tcplb verified; and the header tcplb reads
//! from an outer load balancer (`accept_proxy`), whose address then
//! stands for the client's everywhere.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::haproxy::{Haproxy, free_port, haproxy_binary};
use common::pki::{self, Pki};
use common::*;
use tcplb::proxy_header::Version;
use tcplb::{ClientRule, Config, Settings, UpstreamConfig};

/// What a header host saw on one connection: the header's bytes, and the
/// address the connection came from (tcplb's).
struct Seen {
    header: Vec<u8>,
    peer: SocketAddr,
}

/// A host that reads one PROXY header off each connection (framing it by
/// the specification: a v1 line up to its CRLF, a v2 header by the length
/// it announces), reports it, then echoes everything after it.
fn spawn_header_host() -> (SocketAddr, mpsc::Receiver<Seen>) {
    let listener = TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let peer = conn.peer_addr().unwrap();
                let Ok(header) = read_header(&mut conn) else {
                    return;
                };
                let _ = tx.send(Seen { header, peer });
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return drop(conn.shutdown(Shutdown::Write)),
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// One header off `conn`, nothing past it.
fn read_header(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut header = vec![0u8; 1];
    conn.read_exact(&mut header)?;
    if header[0] == b'P' {
        let mut byte = [0u8; 1];
        while !header.ends_with(b"\r\n") && header.len() < 107 {
            conn.read_exact(&mut byte)?;
            header.push(byte[0]);
        }
    } else {
        header.resize(16, 0);
        conn.read_exact(&mut header[1..])?;
        let len = u16::from_be_bytes([header[14], header[15]]) as usize;
        header.resize(16 + len, 0);
        conn.read_exact(&mut header[16..])?;
    }
    Ok(header)
}

fn upstream(hosts: &[SocketAddr], listen: SocketAddr, tls: bool) -> UpstreamConfig {
    UpstreamConfig {
        name: "pp".to_string(),
        listen,
        hosts: hosts.iter().map(|&h| h.into()).collect(),
        names: Vec::new(),
        tls,
        health: Default::default(),
        refusal: Default::default(),
        queue_timeout: None,
        max_queued: None,
        send_proxy: None,
        accept_proxy: Vec::new(),
    }
}

fn plain(upstream: UpstreamConfig) -> Config {
    Config {
        settings: Settings::default(),
        upstreams: vec![upstream],
        tls: None,
        clients: Vec::new(),
        admin: None,
        cluster: None,
        warnings: Vec::new(),
    }
}

/// A connection to `to` from the loopback address `from`.
fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let domain = if from.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::new(from, 0).into()).unwrap();
    socket.connect(&to.into()).unwrap();
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Sends `data`, half-closes, and returns everything that comes back.
fn exchange(mut s: TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    read_to_end(&mut s).unwrap()
}

fn next(seen: &mpsc::Receiver<Seen>) -> Seen {
    seen.recv_timeout(IO_TIMEOUT)
        .expect("the host got no header")
}

#[test]
fn v1_tells_the_host_the_client_address_before_its_bytes() {
    let (host, seen) = spawn_header_host();
    let mut up = upstream(&[host], localhost(), false);
    up.send_proxy = Some(Version::V1);
    let proxy = start(plain(up));
    let client = connect_from("127.0.0.2".parse().unwrap(), proxy.addr);
    let from = client.local_addr().unwrap();
    let data = Rng::new(1).bytes(100_000);
    assert_eq!(
        exchange(client, &data),
        data,
        "every byte after the header, both ways"
    );
    let got = next(&seen);
    let expected = format!(
        "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\n",
        from.port(),
        proxy.addr.port()
    );
    assert_eq!(String::from_utf8_lossy(&got.header), expected);
    let parsed = ppp::v1::Header::try_from(got.header.as_slice()).unwrap();
    assert_eq!(
        parsed.addresses,
        ppp::v1::Addresses::new_tcp4(
            [127, 0, 0, 2],
            [127, 0, 0, 1],
            from.port(),
            proxy.addr.port()
        )
    );
    assert_eq!(got.peer.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
}

#[test]
fn v2_carries_an_ipv6_client() {
    let (host, seen) = spawn_header_host();
    let mut up = upstream(&[host], "[::1]:0".parse().unwrap(), false);
    up.send_proxy = Some(Version::V2);
    let proxy = start(plain(up));
    let client = connect_from("::1".parse().unwrap(), proxy.addr);
    let from = client.local_addr().unwrap();
    assert_eq!(exchange(client, b"hello over v6"), b"hello over v6");
    let got = next(&seen);
    let header = ppp::v2::Header::try_from(got.header.as_slice()).unwrap();
    assert_eq!(header.command, ppp::v2::Command::Proxy);
    assert_eq!(header.protocol, ppp::v2::Protocol::Stream);
    let ppp::v2::Addresses::IPv6(a) = header.addresses else {
        panic!("not IPv6: {:?}", header.addresses);
    };
    let (src, dst) = (
        SocketAddr::new(a.source_address.into(), a.source_port),
        SocketAddr::new(a.destination_address.into(), a.destination_port),
    );
    assert_eq!((src, dst), (from, proxy.addr));
    assert_eq!(header.tlvs().count(), 0, "no TLS, no TLVs");
}

/// The TLVs of a v2 header, as (type, value); SSL's sub-TLVs parsed too.
fn tlvs(header: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let header = ppp::v2::Header::try_from(header).unwrap();
    header
        .tlvs()
        .map(|t| {
            let t = t.unwrap();
            (t.kind, t.value.to_vec())
        })
        .collect()
}

/// What PP2_TYPE_SSL holds: client flags, verify, sub-TLVs.
fn ssl_fields(value: &[u8]) -> (u8, u32, Vec<(u8, Vec<u8>)>) {
    let client = value[0];
    let verify = u32::from_be_bytes(value[1..5].try_into().unwrap());
    let mut subs = Vec::new();
    let mut rest = &value[5..];
    while !rest.is_empty() {
        let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        subs.push((rest[0], rest[3..3 + len].to_vec()));
        rest = &rest[3 + len..];
    }
    (client, verify, subs)
}

fn tls_client(
    pki: &Pki,
    name: &str,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let cert = pki.client(name);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![cert.cert.clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(cert.key.clone_key()),
    )
    .unwrap();
    Arc::new(config)
}

#[test]
fn v2_over_mtls_carries_what_tcplb_verified() {
    let pki = Pki::new("pp-tlv");
    let (host, seen) = spawn_header_host();
    let mut up = upstream(&[host], localhost(), true);
    up.send_proxy = Some(Version::V2);
    let identities = ["alice", "spiffe://example.org/bob"];
    let config = Config {
        tls: Some(pki.settings(Vec::new(), Duration::from_secs(10))),
        clients: identities
            .iter()
            .map(|id| ClientRule {
                identity: id.to_string(),
                upstreams: vec!["pp".to_string()],
                rate: 100.0,
                burst: 100,
                max_connections: None,
            })
            .collect(),
        ..plain(up)
    };
    let proxy = start(config);
    for (identity, version, name) in [
        ("alice", &rustls::version::TLS13, "TLSv1.3"),
        (
            "spiffe://example.org/bob",
            &rustls::version::TLS12,
            "TLSv1.2",
        ),
    ] {
        let mut s = pki::connect(proxy.addr, tls_client(&pki, identity, version)).unwrap();
        let from = s.sock.local_addr().unwrap();
        s.write_all(b"ping\n").unwrap();
        assert_eq!(pki::read_line(&mut s).unwrap(), "ping");
        let got = next(&seen);
        let tlvs = tlvs(&got.header);
        let kinds: Vec<u8> = tlvs.iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [0x02, 0x20, 0xE0], "{identity}");
        assert_eq!(tlvs[0].1, b"localhost", "PP2_TYPE_AUTHORITY: the SNI");
        let (client, verify, subs) = ssl_fields(&tlvs[1].1);
        assert_eq!(client & 0x01, 0x01, "PP2_CLIENT_SSL");
        assert_eq!(client & 0x02, 0x02, "PP2_CLIENT_CERT_CONN");
        assert_eq!(verify, 0, "verified");
        assert_eq!(
            subs,
            [(0x21, name.as_bytes().to_vec())],
            "PP2_SUBTYPE_SSL_VERSION"
        );
        assert_eq!(tlvs[2].1, identity.as_bytes(), "the authorized identity");
        let header = ppp::v2::Header::try_from(got.header.as_slice()).unwrap();
        assert_eq!(
            header.addresses,
            ppp::v2::Addresses::from((from, proxy.addr)),
            "{identity}"
        );
    }
}

/// How many clients of the first upstream were refused for `reason`.
fn refused(proxy: &Running, reason: &str) -> u64 {
    proxy.stats().upstreams[0]
        .refused
        .iter()
        .find(|(r, _)| r == reason)
        .map_or(0, |(_, n)| *n)
}

/// An upstream that takes headers from 127.0.0.1 and sends v1 on, so the
/// header host shows whom tcplb took the client for.
fn behind_a_balancer(host: SocketAddr, settings: Settings) -> Config {
    let mut up = upstream(&[host], localhost(), false);
    up.send_proxy = Some(Version::V1);
    up.accept_proxy = vec![
        "127.0.0.1"
            .parse::<IpAddr>()
            .map(|ip| tcplb::SourceNet::new(ip, 32).unwrap())
            .unwrap(),
    ];
    Config {
        settings,
        ..plain(up)
    }
}

fn v2_tcp6(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap()
}

#[test]
fn the_header_names_the_client_to_the_host_and_its_bytes_follow() {
    let (host, seen) = spawn_header_host();
    let proxy = start(behind_a_balancer(host, Settings::default()));
    // v1 with the client's first bytes in the same write.
    let s = connect_from("127.0.0.1".parse().unwrap(), proxy.addr);
    let header = b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n";
    assert_eq!(exchange(s, &[&header[..], b"hello"].concat()), b"hello");
    assert_eq!(
        next(&seen).header,
        header,
        "the header's client is the one sent on"
    );
    // v2 with an IPv6 client, in pieces, then 50 kB.
    let mut s = connect_from("127.0.0.1".parse().unwrap(), proxy.addr);
    s.set_nodelay(true).unwrap();
    let v2 = v2_tcp6(
        "[2001:db8::7]:4242".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
    );
    for piece in v2.chunks(7) {
        s.write_all(piece).unwrap();
    }
    let data = Rng::new(2).bytes(50_000);
    assert_eq!(exchange(s, &data), data);
    assert_eq!(
        String::from_utf8_lossy(&next(&seen).header),
        "PROXY TCP6 2001:db8::7 2001:db8::1 4242 443\r\n"
    );
    // LOCAL (the balancer's own check) keeps the connection's addresses.
    let s = connect_from("127.0.0.1".parse().unwrap(), proxy.addr);
    let from = s.local_addr().unwrap();
    let local = tcplb::proxy_header::encode_local(Version::V2);
    assert_eq!(exchange(s, &[&local[..], b"check"].concat()), b"check");
    assert_eq!(
        String::from_utf8_lossy(&next(&seen).header),
        format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
            from.port(),
            proxy.addr.port()
        )
    );
    proxy.wait_until("every pair ended", |s| {
        s.pairs == 0 && s.buffers_in_use == 0
    });
}

/// With its host at its cap, a client waits in the queue holding nothing
/// of a host; when the slot frees, its connect goes through the header
/// like any other: the host reads the header first (the client named by
/// the outer balancer's header), then the bytes that came with that
/// header and waited in the queue with the client.
#[test]
fn a_queued_client_sends_its_header_once_a_slot_frees() {
    let (host, seen) = spawn_header_host();
    let mut config = behind_a_balancer(host, Settings::default());
    let up = &mut config.upstreams[0];
    up.hosts[0].max_connections = Some(1);
    up.queue_timeout = Some(Duration::from_secs(30));
    let proxy = start(config);
    let lb = || connect_from("127.0.0.1".parse().unwrap(), proxy.addr);
    // The first client takes the host's only slot.
    let first_header = b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n";
    let mut first = lb();
    first
        .write_all(&[&first_header[..], b"first\n"].concat())
        .unwrap();
    assert_eq!(next(&seen).header, first_header);
    assert_eq!(read_line(&mut first), "first");
    // The second waits, its header read and its first bytes held.
    let header = b"PROXY TCP4 203.0.113.8 198.51.100.1 4243 443\r\n";
    let mut second = lb();
    second
        .write_all(&[&header[..], b"second\n"].concat())
        .unwrap();
    proxy.wait_until("the second queued", |s| s.upstreams[0].queued == 1);
    assert_eq!(proxy.host_counts(), [1], "the queued client holds no slot");
    assert!(seen.try_recv().is_err(), "nothing of it reached the host");
    // The slot frees: header first, then the bytes that waited.
    finish(first);
    assert_eq!(
        String::from_utf8_lossy(&next(&seen).header),
        String::from_utf8_lossy(header),
        "the queued client's header, naming it"
    );
    assert_eq!(read_line(&mut second), "second");
    let stats = proxy.stats();
    assert_eq!(stats.upstreams[0].queue_waits.count, 1);
    assert_eq!(stats.upstreams[0].queued, 0);
    finish(second);
    proxy.wait_until("every pair ended", |s| {
        s.pairs == 0 && s.buffers_in_use == 0
    });
}

#[test]
fn a_header_from_a_peer_off_the_list_is_refused() {
    let (host, seen) = spawn_header_host();
    let proxy = start(behind_a_balancer(host, Settings::default()));
    let mut s = connect_from("127.0.0.2".parse().unwrap(), proxy.addr);
    let _ = s.write_all(b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\nhello");
    closed_within(&mut s, IO_TIMEOUT);
    proxy.wait_until("counted", |_| refused(&proxy, "proxy_untrusted") == 1);
    assert!(seen.try_recv().is_err(), "the host never saw it");
}

#[test]
fn malformed_oversized_and_slow_headers_are_closed_and_counted() {
    let (host, seen) = spawn_header_host();
    let proxy = start(behind_a_balancer(host, Settings::default()));
    let lb = || connect_from("127.0.0.1".parse().unwrap(), proxy.addr);
    // Not a header at all.
    let mut s = lb();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    closed_within(&mut s, IO_TIMEOUT);
    // A v1 line with a bad address.
    let mut s = lb();
    s.write_all(b"PROXY TCP4 203.0.113.999 198.51.100.1 4242 443\r\n")
        .unwrap();
    closed_within(&mut s, IO_TIMEOUT);
    // A v2 header announcing 5000 bytes: closed without waiting for them.
    let mut s = lb();
    let mut big = v2_tcp6("[::1]:1".parse().unwrap(), "[::1]:2".parse().unwrap());
    big[14..16].copy_from_slice(&5000u16.to_be_bytes());
    s.write_all(&big[..16]).unwrap();
    closed_within(&mut s, IO_TIMEOUT);
    // A v1 line with no CRLF in 107 bytes.
    let mut s = lb();
    s.write_all(&[b"PROXY UNKNOWN ".as_slice(), &[b'x'; 120]].concat())
        .unwrap();
    closed_within(&mut s, IO_TIMEOUT);
    proxy.wait_until("counted", |_| refused(&proxy, "proxy_header_invalid") == 4);
    // Half a header, then nothing: closed at the handshake timeout.
    let mut slow = lb();
    slow.write_all(b"PROXY TCP4 203.0.113.7 ").unwrap();
    proxy.wait_until("the slow one is read", |s| s.pairs == 1);
    proxy.handle.advance_clock(Duration::from_secs(9)).unwrap();
    assert_eq!(proxy.stats().pairs, 1, "still within the timeout");
    proxy.handle.advance_clock(Duration::from_secs(2)).unwrap();
    closed_within(&mut slow, IO_TIMEOUT);
    proxy.wait_until("counted", |_| refused(&proxy, "proxy_header_timeout") == 1);
    let ended = &proxy.stats().upstreams[0].ended;
    assert!(
        ended.contains(&("proxy_header_invalid".to_string(), 4))
            && ended.contains(&("proxy_header_timeout".to_string(), 1)),
        "{ended:?}"
    );
    assert!(seen.try_recv().is_err(), "no host saw any of them");
}

#[test]
fn per_source_limits_apply_to_the_address_in_the_header() {
    let (host, seen) = spawn_header_host();
    // One new connection a day per source.
    let settings = Settings {
        source_limit: Some(tcplb::Limit::new(1.0 / 86_400.0, 1)),
        ..Settings::default()
    };
    let proxy = start(behind_a_balancer(host, settings));
    let from = |client: &str| {
        let s = connect_from("127.0.0.1".parse().unwrap(), proxy.addr);
        let header = format!("PROXY TCP4 {client} 198.51.100.1 4242 443\r\n");
        (s, header)
    };
    let (s, header) = from("203.0.113.7");
    assert_eq!(exchange(s, &[header.as_bytes(), b"one"].concat()), b"one");
    next(&seen);
    // The same client again, through the same balancer: over its rate.
    let (mut s, header) = from("203.0.113.7");
    s.write_all(header.as_bytes()).unwrap();
    closed_within(&mut s, IO_TIMEOUT);
    proxy.wait_until("counted", |_| refused(&proxy, "source_rate_limited") == 1);
    // Another client through the same balancer: its own bucket.
    let (s, header) = from("203.0.113.8");
    assert_eq!(exchange(s, &[header.as_bytes(), b"two"].concat()), b"two");
    assert_eq!(next(&seen).header, header.as_bytes());
    assert!(seen.try_recv().is_err());
}

/// A TLS upstream behind a balancer on 127.0.0.1 that sends v2 on, and
/// admits alice; at most `per_source` handshakes at once from one source.
fn tls_behind_a_balancer(pki: &Pki, host: SocketAddr, per_source: usize) -> Config {
    let mut config = behind_a_balancer(host, Settings::default());
    config.upstreams[0].tls = true;
    config.upstreams[0].send_proxy = Some(Version::V2);
    let mut tls = pki.settings(Vec::new(), Duration::from_secs(10));
    tls.max_handshakes_per_source = per_source;
    config.tls = Some(tls);
    config.clients = vec![ClientRule {
        identity: "alice".to_string(),
        upstreams: vec!["pp".to_string()],
        rate: 100.0,
        burst: 100,
        max_connections: None,
    }];
    config
}

/// Over `tcp`, a PROXY `header` and the ClientHello in one write (one
/// segment, as a balancer that forwards at once sends them), then the rest
/// of the handshake.
fn tls_after_header(
    tcp: TcpStream,
    header: &[u8],
    config: Arc<rustls::ClientConfig>,
) -> pki::TlsStream {
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut first = header.to_vec();
    conn.write_tls(&mut first).unwrap();
    let mut tcp = tcp;
    tcp.write_all(&first).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}

#[test]
fn over_tls_the_client_hello_may_come_with_the_header() {
    let pki = Pki::new("pp-accept-tls");
    let (host, seen) = spawn_header_host();
    let proxy = start(tls_behind_a_balancer(&pki, host, 100));
    for header in [
        b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n".to_vec(),
        v2_tcp6(
            "[2001:db8::7]:4242".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
        ),
    ] {
        let tcp = connect_from("127.0.0.1".parse().unwrap(), proxy.addr);
        let config = tls_client(&pki, "alice", &rustls::version::TLS13);
        let mut s = tls_after_header(tcp, &header, config);
        s.write_all(b"ping\n").unwrap();
        assert_eq!(pki::read_line(&mut s).unwrap(), "ping");
        let got = next(&seen);
        let sent = ppp::v2::Header::try_from(got.header.as_slice()).unwrap();
        let expected: (SocketAddr, SocketAddr) = if header[0] == b'P' {
            (
                "203.0.113.7:4242".parse().unwrap(),
                "198.51.100.1:443".parse().unwrap(),
            )
        } else {
            (
                "[2001:db8::7]:4242".parse().unwrap(),
                "[2001:db8::1]:443".parse().unwrap(),
            )
        };
        assert_eq!(sent.addresses, ppp::v2::Addresses::from(expected));
        let identity = tlvs(&got.header).into_iter().find(|(k, _)| *k == 0xE0);
        assert_eq!(identity, Some((0xE0, b"alice".to_vec())));
    }
}

#[test]
fn handshake_caps_count_the_source_in_the_header() {
    let pki = Pki::new("pp-caps");
    let (host, seen) = spawn_header_host();
    let proxy = start(tls_behind_a_balancer(&pki, host, 1));
    let header = |client: &str| format!("PROXY TCP4 {client} 198.51.100.1 4242 443\r\n");
    // A's handshake stalls, holding A's one slot.
    let mut stalled = connect_from("127.0.0.1".parse().unwrap(), proxy.addr);
    stalled.write_all(header("203.0.113.7").as_bytes()).unwrap();
    proxy.wait_until("A handshakes", |s| s.handshakes == 1);
    // A second handshake from A, through the same balancer: closed.
    let mut second = connect_from("127.0.0.1".parse().unwrap(), proxy.addr);
    second.write_all(header("203.0.113.7").as_bytes()).unwrap();
    closed_within(&mut second, IO_TIMEOUT);
    proxy.wait_until("counted", |_| {
        refused(&proxy, "source_handshake_capacity") == 1
    });
    // B, through the same balancer, has a slot of its own.
    let tcp = connect_from("127.0.0.1".parse().unwrap(), proxy.addr);
    let config = tls_client(&pki, "alice", &rustls::version::TLS13);
    let mut s = tls_after_header(tcp, header("203.0.113.8").as_bytes(), config);
    s.write_all(b"B\n").unwrap();
    assert_eq!(pki::read_line(&mut s).unwrap(), "B");
    assert!(next(&seen).header.len() > 16);
    drop(stalled);
}

const HAPROXY_GLOBAL: &str = "global
    log stdout format raw local0 info
    stats socket {stats}
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 20s
    timeout server 20s
";

#[test]
fn haproxy_as_the_host_reads_the_header_tcplb_sends() {
    let echo = spawn_host("echo", Behavior::Echo);
    let port = free_port();
    let config = format!(
        "{HAPROXY_GLOBAL}frontend fe
    bind 127.0.0.1:{port} accept-proxy
    log-format \"PP %ci %cp %fi %fp %[fc_pp_authority]\"
    default_backend be
backend be
    server echo {}
",
        echo.addr
    );
    let Some(haproxy) = Haproxy::start("host", &config) else {
        return;
    };
    let haproxy_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // v1, then v2 with an IPv6 client: HAProxy's client is tcplb's.
    for (version, listen, from) in [
        (Version::V1, "127.0.0.1:0", "127.0.0.2"),
        (Version::V2, "[::1]:0", "::1"),
    ] {
        let mut up = upstream(&[haproxy_addr], listen.parse().unwrap(), false);
        up.send_proxy = Some(version);
        let proxy = start(plain(up));
        let client = connect_from(from.parse().unwrap(), proxy.addr);
        let me = client.local_addr().unwrap();
        assert_eq!(exchange(client, b"through haproxy"), b"through haproxy");
        let line = haproxy.log_line("PP ");
        assert_eq!(
            line,
            format!(
                "{} {} {} {} -",
                me.ip(),
                me.port(),
                proxy.addr.ip(),
                proxy.addr.port()
            ),
            "{version:?}"
        );
    }
    // v2 over mTLS: HAProxy reads the authority TLV.
    let pki = Pki::new("pp-haproxy-host");
    let mut up = upstream(&[haproxy_addr], localhost(), true);
    up.send_proxy = Some(Version::V2);
    let config = Config {
        tls: Some(pki.settings(Vec::new(), Duration::from_secs(10))),
        clients: vec![ClientRule {
            identity: "alice".to_string(),
            upstreams: vec!["pp".to_string()],
            rate: 100.0,
            burst: 100,
            max_connections: None,
        }],
        ..plain(up)
    };
    let proxy = start(config);
    let mut s = pki::connect_from(
        "127.0.0.3".parse().unwrap(),
        proxy.addr,
        tls_client(&pki, "alice", &rustls::version::TLS13),
    )
    .unwrap();
    let me = s.sock.local_addr().unwrap();
    s.write_all(b"ping\n").unwrap();
    assert_eq!(pki::read_line(&mut s).unwrap(), "ping");
    pki::close_write(&mut s);
    let line = haproxy.log_line("PP ");
    assert_eq!(
        line,
        format!(
            "127.0.0.3 {} 127.0.0.1 {} localhost",
            me.port(),
            proxy.addr.port()
        )
    );
}

#[test]
fn behind_haproxy_tcplb_sees_the_original_client() {
    if haproxy_binary().is_none() {
        assert!(
            std::env::var_os("TCPLB_REQUIRE_TOOLS").is_none(),
            "haproxy is not installed"
        );
        return eprintln!("behind_haproxy: skipped, haproxy is not installed");
    }
    // Plain, one new connection a day per source.
    let (host, seen) = spawn_header_host();
    let limited = Settings {
        source_limit: Some(tcplb::Limit::new(1.0 / 86_400.0, 1)),
        ..Settings::default()
    };
    let plain_lb = start(behind_a_balancer(host, limited));
    // mTLS, sending v2 on.
    let pki = Pki::new("pp-behind-haproxy");
    let (tls_host, tls_seen) = spawn_header_host();
    let tls_lb = start(tls_behind_a_balancer(&pki, tls_host, 100));
    // The real binary, for its access line.
    let echo = spawn_host("echo", Behavior::Echo);
    let dir = std::env::temp_dir().join(format!("tcplb-pp-binary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("lb.toml");
    std::fs::write(
        &toml,
        format!(
            "[defaults]\naccept_proxy = [\"127.0.0.1/32\"]\n\n[[upstream]]\nname = \"pp\"\n\
             listen = \"127.0.0.1:0\"\nhosts = [\"{}\"]\n",
            echo.addr
        ),
    )
    .unwrap();
    let binary = Binary::start(&["--config", toml.to_str().unwrap()]);
    let binary_addr = binary.listen_addr();

    let ports = [free_port(), free_port(), free_port()];
    let mut config = HAPROXY_GLOBAL.to_string();
    for (i, (port, lb)) in ports
        .iter()
        .zip([plain_lb.addr, tls_lb.addr, binary_addr])
        .enumerate()
    {
        config.push_str(&format!(
            "frontend fe{i}\n    bind 127.0.0.1:{port}\n    default_backend be{i}\n\
             backend be{i}\n    server lb {lb} send-proxy-v2\n"
        ));
    }
    let Some(_haproxy) = Haproxy::start("outer", &config) else {
        return;
    };
    let front = |i: usize| -> SocketAddr { format!("127.0.0.1:{}", ports[i]).parse().unwrap() };

    // The host learns the client HAProxy had, not HAProxy.
    let client = connect_from("127.0.0.2".parse().unwrap(), front(0));
    let me = client.local_addr().unwrap();
    assert_eq!(exchange(client, b"first"), b"first");
    assert_eq!(
        String::from_utf8_lossy(&next(&seen).header),
        format!(
            "PROXY TCP4 127.0.0.2 127.0.0.1 {} {}\r\n",
            me.port(),
            ports[0]
        )
    );
    // Its source rate is its own: the same client again is over it...
    let mut again = connect_from("127.0.0.2".parse().unwrap(), front(0));
    again.write_all(b"second").unwrap();
    // HAProxy passes tcplb's close on with FIN or RST; either way, no echo.
    closed_within(&mut again, IO_TIMEOUT);
    plain_lb.wait_until("counted", |_| {
        refused(&plain_lb, "source_rate_limited") == 1
    });
    // ...and another client behind the same HAProxy is not.
    let other = connect_from("127.0.0.3".parse().unwrap(), front(0));
    assert_eq!(exchange(other, b"third"), b"third");
    assert!(String::from_utf8_lossy(&next(&seen).header).starts_with("PROXY TCP4 127.0.0.3 "));

    // mTLS through HAProxy: the header, then the client's ClientHello.
    let mut s = pki::connect_from(
        "127.0.0.4".parse().unwrap(),
        front(1),
        tls_client(&pki, "alice", &rustls::version::TLS13),
    )
    .unwrap();
    let me = s.sock.local_addr().unwrap();
    s.write_all(b"ping\n").unwrap();
    assert_eq!(pki::read_line(&mut s).unwrap(), "ping");
    let got = next(&tls_seen);
    let sent = ppp::v2::Header::try_from(got.header.as_slice()).unwrap();
    assert_eq!(sent.addresses, ppp::v2::Addresses::from((me, front(1))));
    let identity = tlvs(&got.header).into_iter().find(|(k, _)| *k == 0xE0);
    assert_eq!(identity, Some((0xE0, b"alice".to_vec())));

    // The access line names the client, and HAProxy as via.
    let client = connect_from("127.0.0.5".parse().unwrap(), front(2));
    let me = client.local_addr().unwrap();
    assert_eq!(exchange(client, b"logged"), b"logged");
    let line = binary.wait_for_log("`pp`");
    assert!(
        line.contains(&format!("tcplb::access] {me} via=127.0.0.1:"))
            && line.contains("end=closed"),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn health_checks_of_a_send_proxy_upstream_begin_with_a_local_header() {
    for version in [Version::V1, Version::V2] {
        let (host, seen) = spawn_header_host();
        let mut up = upstream(&[host], localhost(), false);
        up.send_proxy = Some(version);
        up.health = tcplb::HealthSettings {
            active: true,
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(5),
            rise: 1,
            fall: 1,
            send: Some(b"PING\n".to_vec()),
            expect: Some(b"PING".to_vec()),
            ..Default::default()
        };
        let proxy = start(plain(up));
        let got = next(&seen);
        assert_eq!(got.header, tcplb::proxy_header::encode_local(version));
        proxy.wait_until("a check passed", |s| {
            s.upstreams[0].hosts[0].checks_passed > 0
        });
        let host = &proxy.stats().upstreams[0].hosts[0];
        assert!(host.up && host.checks_failed == 0, "{version:?}: {host:?}");
    }
}
