//! mTLS through the real reactor with real rustls clients and rcgen
//! certificates: relaying and half-close over TLS, certificate failures
//! that never reach a host, authorization, rate and concurrency limits,
//! handshake timeouts and caps, per-source limits, and interoperability
//! with `openssl s_client`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc::TryRecvError;
use std::time::{Duration, Instant};

use common::pki::{self, Pki};
use common::*;
use tcplb::ClientRule;
use tcplb::Limit;
use tcplb::{Config, RefusalMode, Relay, Settings, UpstreamConfig};

fn rule(identity: &str, upstreams: &[&str], rate: f64, burst: u32, max: Option<u32>) -> ClientRule {
    ClientRule {
        identity: identity.to_string(),
        upstreams: upstreams.iter().map(|u| u.to_string()).collect(),
        rate,
        burst,
        max_connections: max,
    }
}

/// A config with a TLS upstream `secure` and a second TLS upstream `other`.
fn tls_config(
    pki: &Pki,
    hosts: &[SocketAddr],
    clients: Vec<ClientRule>,
    crl: Vec<std::path::PathBuf>,
) -> Config {
    let upstream = |name: &str| UpstreamConfig {
        name: name.to_string(),
        listen: localhost(),
        hosts: hosts.iter().map(|&h| h.into()).collect(),
        names: Vec::new(),
        tls: true,
        health: Default::default(),
        refusal: Default::default(),
        queue_timeout: None,
        max_queued: None,
        send_proxy: None,
        accept_proxy: Vec::new(),
    };
    Config {
        settings: Settings::default(),
        upstreams: vec![upstream("secure"), upstream("other")],
        tls: Some(pki.settings(crl, Duration::from_secs(10))),
        clients,
        admin: None,
        cluster: None,
        warnings: Vec::new(),
    }
}

fn alice_rules() -> Vec<ClientRule> {
    vec![
        rule("alice", &["secure"], 100.0, 100, None),
        rule("spiffe://example.org/bob", &["secure"], 100.0, 100, None),
    ]
}

/// Asserts a handshake attempt fails and the host never saw a connection.
fn assert_refused_without_host(
    proxy: &Running,
    host: &TestHost,
    config: std::sync::Arc<rustls::ClientConfig>,
) {
    let outcome = pki::connect(proxy.addr, config).and_then(|mut s| {
        let mut buf = [0u8; 16];
        s.write_all(b"hello")?;
        s.read(&mut buf)
    });
    assert_refused(&outcome, "the handshake");
    proxy.wait_until("counted the failed handshake", |s| s.pairs == 0);
    let refused = &proxy.stats().upstreams[0].refused;
    assert!(
        refused
            .iter()
            .any(|(r, n)| r == "handshake_failed" && *n >= 1),
        "{refused:?}"
    );
    assert_eq!(
        host.accepted.try_recv(),
        Err(TryRecvError::Empty),
        "a host saw a connection"
    );
}

#[test]
fn authorized_client_relays_byte_exact_with_half_close() {
    let pki = Pki::new("relay");
    let host = spawn_host("h", Behavior::Echo);
    // Even where plain pairs would splice everything, a TLS pair's bytes
    // are plaintext in tcplb's buffers: none is spliced.
    let mut config = tls_config(&pki, &[host.addr], alice_rules(), vec![]);
    config.settings.relay = Relay::Splice;
    let proxy = start(config);
    let alice = pki.client("alice");
    let mut s = pki::connect(proxy.addr, pki.client_config(Some(&alice))).unwrap();
    let data = Rng::new(3).bytes(3 << 20);
    let writer_data = data.clone();
    // Write everything, then close_notify + FIN, while reading the echo.
    let mut got = Vec::new();
    let mut sent = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while sent < writer_data.len() {
        let n = (64 * 1024).min(writer_data.len() - sent);
        s.write_all(&writer_data[sent..sent + n]).unwrap();
        sent += n;
        // Keep the echo flowing so neither side's buffers fill up.
        while got.len() + 256 * 1024 < sent {
            let k = s.read(&mut buf).unwrap();
            assert!(k > 0);
            got.extend_from_slice(&buf[..k]);
        }
    }
    pki::close_write(&mut s);
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) => panic!("after {} bytes: {e}", got.len()),
        }
    }
    // Ok(0) above is rustls reporting the proxy's close_notify: a clean
    // TLS end (a bare TCP FIN would have been an UnexpectedEof error).
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
    proxy.wait_until("closed the pair", |st| st.pairs == 0);
    assert_eq!(proxy.host_counts(), [0]);
    let u = &proxy.stats().upstreams[0];
    assert_eq!(
        (u.bytes_up, u.bytes_down),
        (data.len() as u64, data.len() as u64)
    );
    assert_eq!((u.spliced_up, u.spliced_down), (0, 0));
}

#[test]
fn host_answers_after_the_clients_close_notify() {
    let pki = Pki::new("half");
    let host = spawn_answer_after_eof_host();
    let proxy = start(tls_config(&pki, &[host], alice_rules(), vec![]));
    let bob = pki.client("spiffe://example.org/bob");
    let mut s = pki::connect(proxy.addr, pki.client_config(Some(&bob))).unwrap();
    s.write_all(b"half-closed request").unwrap();
    pki::close_write(&mut s);
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "tseuqer desolc-flah");
}

/// A host that reads until EOF, then answers with what it got, reversed.
fn spawn_answer_after_eof_host() -> SocketAddr {
    let listener = std::net::TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
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
fn no_client_certificate_never_reaches_a_host() {
    let pki = Pki::new("nocert");
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(tls_config(&pki, &[host.addr], alice_rules(), vec![]));
    assert_refused_without_host(&proxy, &host, pki.client_config(None));
}

#[test]
fn certificate_from_an_unknown_ca_never_reaches_a_host() {
    let pki = Pki::new("ca1");
    let stranger = Pki::new("ca2");
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(tls_config(&pki, &[host.addr], alice_rules(), vec![]));
    // Trusts the right server CA, presents a certificate from another CA.
    let mallory = stranger.client("alice");
    let mut config = (*pki.client_config(None)).clone();
    config.client_auth_cert_resolver = stranger
        .client_config(Some(&mallory))
        .client_auth_cert_resolver
        .clone();
    assert_refused_without_host(&proxy, &host, std::sync::Arc::new(config));
}

#[test]
fn expired_certificate_never_reaches_a_host() {
    let pki = Pki::new("expired");
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(tls_config(&pki, &[host.addr], alice_rules(), vec![]));
    let old = pki.client_with("alice", true);
    assert_refused_without_host(&proxy, &host, pki.client_config(Some(&old)));
}

/// The binary serving `pki`'s files on one TLS upstream, `secure`, for
/// `alice`; its config is written into the PKI's folder.
fn tls_binary(pki: &Pki) -> Binary {
    let path = pki.dir.join("lb.toml");
    let text = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\n\
         [[upstream]]\nname = \"secure\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{}\"]\n\n\
         [[client]]\nidentity = \"alice\"\nupstreams = [\"secure\"]\nrate = 100\n",
        pki.server_cert,
        pki.server_key,
        pki.ca_path,
        dead_addr()
    );
    std::fs::write(&path, text).unwrap();
    Binary::start(&["--config", path.to_str().unwrap()])
}

#[test]
fn an_expired_certificate_is_logged_with_rfc3339_times() {
    let pki = Pki::new("expired-log");
    let bin = tls_binary(&pki);
    let old = pki.client_with("alice", true);
    let refused = pki::connect(bin.listen_addr(), pki.client_config(Some(&old)))
        .and_then(|mut s| s.read(&mut [0u8; 16]));
    assert!(refused.is_err(), "{refused:?}");
    let line = bin.wait_for_log("handshake_failed");
    assert!(
        line.contains("(client certificate expired at 2021-01-01T00:00:00Z (it is now 20"),
        "{line}"
    );
    assert!(!line.contains("UNIX"), "{line}");
}

/// A TLS 1.0 ClientHello, as old clients send it: no extensions at all
/// (so no signature_algorithms), one cipher suite, null compression.
fn tls10_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x01];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0x00, 0x02, 0x00, 0x2f, 0x01, 0x00]);
    let mut handshake = vec![0x01, 0, 0, body.len() as u8];
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01, 0, handshake.len() as u8];
    record.extend(handshake);
    record
}

#[test]
fn a_tls_1_0_client_is_logged_as_protocol_version_not_supported() {
    let pki = Pki::new("tls10");
    let bin = tls_binary(&pki);
    let mut s = TcpStream::connect(bin.listen_addr()).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(&tls10_client_hello()).unwrap();
    let mut alert = [0u8; 1];
    s.read_exact(&mut alert).unwrap();
    assert_eq!(alert[0], 0x15, "a TLS alert record");
    let line = bin.wait_for_log("handshake_failed");
    assert!(
        line.contains("handshake_failed (protocol version not supported"),
        "{line}"
    );
}

#[test]
fn revoked_certificate_never_reaches_a_host() {
    let pki = Pki::new("revoked");
    let host = spawn_host("h", Behavior::Echo);
    let revoked = pki.client("alice");
    let good = pki.client("alice");
    let crl = pki.crl(&[revoked.serial]);
    let proxy = start(tls_config(&pki, &[host.addr], alice_rules(), vec![crl]));
    assert_refused_without_host(&proxy, &host, pki.client_config(Some(&revoked)));
    // The same identity with a certificate that is not revoked gets through.
    let mut s = pki::connect(proxy.addr, pki.client_config(Some(&good))).unwrap();
    s.write_all(b"still fine\n").unwrap();
    assert_eq!(pki::read_line(&mut s).unwrap(), "still fine");
}

#[test]
fn a_certificate_not_for_client_authentication_never_reaches_a_host() {
    let pki = Pki::new("eku");
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(tls_config(&pki, &[host.addr], alice_rules(), vec![]));
    // Right CA, dates and identity; its extended key usage is serverAuth.
    let server_only = pki.server_only("alice");
    assert_refused_without_host(&proxy, &host, pki.client_config(Some(&server_only)));
}

#[test]
fn identity_not_allowed_on_the_upstream_is_unauthorized() {
    let pki = Pki::new("authz");
    let host = spawn_host("h", Behavior::Echo);
    let config = tls_config(&pki, &[host.addr], alice_rules(), vec![]);
    // Find the `other` upstream's address: alice may only use `secure`.
    let proxy = tcplb::Proxy::bind(&config).unwrap();
    let other = proxy.listen_addr("other").unwrap();
    let handle = proxy.handle();
    let thread = std::thread::spawn(move || proxy.run());
    for (who, addr) in [("alice", other), ("carol", other)] {
        let cert = pki.client(who);
        let mut s = pki::connect(addr, pki.client_config(Some(&cert))).unwrap();
        let line = pki::read_line(&mut s).unwrap();
        assert_eq!(
            line, "ERROR unauthorized: this client may not use this service",
            "{who}"
        );
        // Then close_notify: a clean end.
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    }
    assert_eq!(host.accepted.try_recv(), Err(TryRecvError::Empty));
    let stats = handle.stats().unwrap();
    let refused = &stats.upstreams[1].refused;
    assert_eq!(refused, &[("unauthorized".to_string(), 2)], "{stats:?}");
    handle.shutdown();
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

/// Connects `carol` (no rule: unauthorized) to `secure`, which refuses
/// as `refusal` says; returns the stream after the handshake and the proxy.
fn refused_over_tls(refusal: RefusalMode) -> (pki::TlsStream, Running, Pki, TestHost) {
    let pki = Pki::new(&format!("refusal-{refusal:?}"));
    let host = spawn_host("h", Behavior::Echo);
    let mut config = tls_config(&pki, &[host.addr], alice_rules(), vec![]);
    config.upstreams[0].refusal = refusal;
    let proxy = start(config);
    let carol = pki.client("carol");
    let s = pki::connect(proxy.addr, pki.client_config(Some(&carol))).unwrap();
    (s, proxy, pki, host)
}

/// The refused pair is gone and was counted as `unauthorized`.
fn assert_counted_as_unauthorized(proxy: &Running) {
    proxy.wait_until("closed the refused pair", |s| s.pairs == 0);
    let stats = proxy.stats();
    let code = [("unauthorized".to_string(), 1)];
    assert_eq!(stats.upstreams[0].refused, code);
    assert_eq!(stats.upstreams[0].ended, code);
}

#[test]
fn refusal_close_over_tls_sends_close_notify_then_fin() {
    let (mut s, proxy, _pki, host) = refused_over_tls(RefusalMode::Close);
    // rustls reads 0 only after close_notify (a bare FIN is an error).
    let mut got = Vec::new();
    assert_eq!(s.read_to_end(&mut got).unwrap(), 0, "{got:?}");
    let mut byte = [0u8; 1];
    assert_eq!(s.sock.read(&mut byte).unwrap(), 0, "then FIN");
    pki::close_write(&mut s);
    assert_counted_as_unauthorized(&proxy);
    assert_eq!(host.accepted.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn refusal_reset_over_tls_sends_rst() {
    let (mut s, proxy, _pki, host) = refused_over_tls(RefusalMode::Reset);
    let mut got = Vec::new();
    let end = s.read_to_end(&mut got).map_err(|e| e.kind());
    assert_eq!((end, got), (Err(ErrorKind::ConnectionReset), Vec::new()));
    assert_counted_as_unauthorized(&proxy);
    assert_eq!(host.accepted.try_recv(), Err(TryRecvError::Empty));
}

#[test]
fn over_burst_is_rate_limited_then_admitted_after_refill() {
    let pki = Pki::new("rate");
    let host = spawn_host("h", Behavior::Echo);
    // One new connection per 100 s, two at once: no real time passing
    // during the test refills the bucket; the test moves the loop's
    // clock on instead.
    let rules = vec![rule("alice", &["secure"], 0.01, 2, None)];
    let proxy = start(tls_config(&pki, &[host.addr], rules, vec![]));
    let alice = pki.client("alice");
    let config = pki.client_config(Some(&alice));
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = pki::connect(proxy.addr, config.clone()).unwrap();
        s.write_all(b"in\n").unwrap();
        assert_eq!(pki::read_line(&mut s).unwrap(), "in");
        open.push(s);
    }
    let refused = |config| {
        let mut s = pki::connect(proxy.addr, config).unwrap();
        let line = pki::read_line(&mut s).unwrap();
        assert!(line.starts_with("ERROR rate_limited: "), "{line}");
        line.split("retry after ")
            .nth(1)
            .and_then(|r| r.trim_end_matches(" s").parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no retry-after hint: {line}"))
    };
    let secs = refused(config.clone());
    assert!((99..=100).contains(&secs), "retry after {secs} s");
    // Not refilled two seconds before the hint (the hint rounds the
    // wait up to whole seconds)...
    proxy
        .handle
        .advance_clock(Duration::from_secs(secs - 2))
        .unwrap();
    let again = refused(config.clone());
    assert!((1..=2).contains(&again), "retry after {again} s");
    // ...and refilled at it.
    proxy.handle.advance_clock(Duration::from_secs(2)).unwrap();
    let mut s = pki::connect(proxy.addr, config).unwrap();
    s.write_all(b"again\n").unwrap();
    assert_eq!(pki::read_line(&mut s).unwrap(), "again");
}

#[test]
fn concurrent_connections_are_capped_per_client() {
    let pki = Pki::new("cap");
    let host = spawn_host("h", Behavior::Echo);
    let rules = vec![rule("alice", &["secure"], 100.0, 100, Some(1))];
    let proxy = start(tls_config(&pki, &[host.addr], rules, vec![]));
    let alice = pki.client("alice");
    let config = pki.client_config(Some(&alice));
    let mut first = pki::connect(proxy.addr, config.clone()).unwrap();
    first.write_all(b"one\n").unwrap();
    assert_eq!(pki::read_line(&mut first).unwrap(), "one");
    let mut second = pki::connect(proxy.addr, config.clone()).unwrap();
    let line = pki::read_line(&mut second).unwrap();
    assert_eq!(
        line,
        "ERROR too_many_connections: too many open connections for this client"
    );
    assert_eq!(proxy.stats().clients, [("alice".to_string(), 1)]);
    // The first one leaves: a slot is free again.
    pki::close_write(&mut first);
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).unwrap();
    let mut third = pki::connect(proxy.addr, config).unwrap();
    third.write_all(b"three\n").unwrap();
    assert_eq!(pki::read_line(&mut third).unwrap(), "three");
}

#[test]
fn stalled_handshake_is_closed_at_the_timeout() {
    let pki = Pki::new("stall");
    let host = spawn_host("h", Behavior::Echo);
    let mut config = tls_config(&pki, &[host.addr], alice_rules(), vec![]);
    let timeout = Duration::from_millis(300);
    config.tls.as_mut().unwrap().handshake_timeout = timeout;
    let proxy = start(config);
    let started = Instant::now();
    let mut silent = TcpStream::connect(proxy.addr).unwrap();
    silent.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    // Sends nothing; the proxy gives up and closes.
    let mut buf = [0u8; 64];
    let outcome = silent.read(&mut buf);
    assert!(
        matches!(outcome, Ok(0))
            || matches!(&outcome, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{outcome:?}"
    );
    let waited = started.elapsed();
    assert!(waited >= timeout, "closed after {waited:?}");
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    let stats = proxy.stats();
    assert_eq!(stats.handshakes, 0);
    assert!(
        stats.upstreams[0]
            .refused
            .contains(&("handshake_timeout".to_string(), 1)),
        "{stats:?}"
    );
}

#[test]
fn handshakes_in_progress_are_capped() {
    let pki = Pki::new("hscap");
    let host = spawn_host("h", Behavior::Echo);
    let mut config = tls_config(&pki, &[host.addr], alice_rules(), vec![]);
    config.tls.as_mut().unwrap().max_handshakes = 2;
    let proxy = start(config);
    let stalled: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(proxy.addr).unwrap())
        .collect();
    proxy.wait_until("started two handshakes", |s| s.handshakes == 2);
    let mut third = TcpStream::connect(proxy.addr).unwrap();
    // Closed at accept, so at once: a handshake started instead would
    // keep it open (for the 10 s handshake timeout).
    closed_within(&mut third, Duration::from_secs(5));
    let stats = proxy.stats();
    assert!(
        stats.upstreams[0]
            .refused
            .contains(&("handshake_capacity".to_string(), 1)),
        "{stats:?}"
    );
    drop(stalled);
    // Capacity comes back once those are gone.
    proxy.wait_until("dropped the stalled handshakes", |s| s.handshakes == 0);
    let alice = pki.client("alice");
    let mut s = pki::connect(proxy.addr, pki.client_config(Some(&alice))).unwrap();
    s.write_all(b"ok\n").unwrap();
    assert_eq!(pki::read_line(&mut s).unwrap(), "ok");
}

#[test]
fn sources_over_their_rate_are_closed_before_any_handshake() {
    let pki = Pki::new("source");
    let host = spawn_host("h", Behavior::Echo);
    let mut config = tls_config(&pki, &[host.addr], alice_rules(), vec![]);
    config.settings.source_limit = Some(Limit::new(0.01, 2));
    let proxy = start(config);
    let alice = pki.client("alice");
    for _ in 0..2 {
        let mut s = pki::connect(proxy.addr, pki.client_config(Some(&alice))).unwrap();
        s.write_all(b"x\n").unwrap();
        assert_eq!(pki::read_line(&mut s).unwrap(), "x");
    }
    let outcome = pki::connect(proxy.addr, pki.client_config(Some(&alice)));
    assert_refused(&outcome, "a third connection from this source");
    let stats = proxy.stats();
    assert!(
        stats.upstreams[0]
            .refused
            .contains(&("source_rate_limited".to_string(), 1)),
        "{stats:?}"
    );
    assert_eq!(stats.handshakes, 0);
}

#[test]
fn openssl_s_client_interoperates() {
    let pki = Pki::new("openssl");
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(tls_config(&pki, &[host.addr], alice_rules(), vec![]));
    let alice = pki.client("alice");
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-no_ign_eof", "-connect"])
        .arg(proxy.addr.to_string())
        .arg("-cert")
        .arg(&alice.cert_path)
        .arg("-key")
        .arg(&alice.key_path)
        .arg("-CAfile")
        .arg(&pki.ca_path)
        .args(["-verify_return_error", "-servername", "localhost"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed (.ci/run installs it)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello from openssl\n").unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\n") {
        assert_eq!(
            stdout.read(&mut byte).unwrap(),
            1,
            "openssl output ended: {got:?}"
        );
        got.push(byte[0]);
    }
    assert_eq!(got, b"hello from openssl\n");
    drop(stdin);
    let _ = child.wait();
}

#[test]
fn bad_tls_files_are_start_up_errors_naming_the_file() {
    let pki = Pki::new("files");
    let host = spawn_host("h", Behavior::Echo);
    let bind_error = |mutate: &dyn Fn(&mut tcplb::tls::TlsSettings)| {
        let mut config = tls_config(&pki, &[host.addr], alice_rules(), vec![]);
        mutate(config.tls.as_mut().unwrap());
        tcplb::Proxy::bind(&config).unwrap_err().to_string()
    };
    let missing = pki.dir.join("missing.pem");
    let err = bind_error(&|t| t.cert = missing.clone());
    assert!(
        err.contains("missing.pem") && err.contains("cannot read"),
        "{err}"
    );
    let garbage = pki.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let err = bind_error(&|t| t.client_ca = garbage.clone());
    assert!(
        err.contains("garbage.pem") && err.contains("no certificate"),
        "{err}"
    );
    let err = bind_error(&|t| t.key = garbage.clone());
    assert!(
        err.contains("garbage.pem") && err.contains("no private key"),
        "{err}"
    );
    let other = pki.client("alice");
    let err = bind_error(&|t| t.key = other.key_path.clone());
    assert!(err.contains("does not match the certificate"), "{err}");
    let err = bind_error(&|t| t.crl = vec![garbage.clone()]);
    assert!(
        err.contains("garbage.pem") && err.contains("not a DER CRL"),
        "{err}"
    );
    // A DER CRL with bytes after its end: said in words, not webpki's names.
    use rustls::pki_types::CertificateRevocationListDer;
    use rustls::pki_types::pem::PemObject;
    let mut der = CertificateRevocationListDer::from_pem_file(pki.crl(&[]))
        .unwrap()
        .to_vec();
    der.extend_from_slice(b"junk");
    let trailing = pki.dir.join("trailing.crl");
    std::fs::write(&trailing, der).unwrap();
    // Serving refuses what could not work: an expired server certificate,
    // a client CA that is not a CA.
    let expired = pki.server_valid(
        Some((
            rcgen::date_time_ymd(2020, 1, 1),
            rcgen::date_time_ymd(2021, 1, 1),
        )),
        "expired-server",
    );
    let err = bind_error(&|t| {
        t.cert = expired.cert_path.clone();
        t.key = expired.key_path.clone();
    });
    assert!(
        err.contains("expired-server.pem: the server certificate expired at 2021-01-01T00:00:00Z"),
        "{err}"
    );
    let leaf = pki.client("not-a-ca");
    let err = bind_error(&|t| t.client_ca = leaf.cert_path.clone());
    assert!(err.contains("not a CA certificate"), "{err}");
    let err = bind_error(&|t| t.crl = vec![trailing.clone()]);
    assert!(
        err.contains("trailing.crl: no PEM CRL (\"BEGIN X509 CRL\"), and not a DER CRL: unexpected data after the CRL"),
        "{err}"
    );
}

/// Backpressure over TLS with a client that reads nothing until the
/// stream has stalled: as over plain TCP (see `relay.rs`), tcplb stops
/// reading from the host, and what it holds is its buffer plus the TLS
/// session's queue of records, which tcplb caps at its bulk buffer size
/// (`set_buffer_limit`). The buffers are 16 KiB here, below rustls' own
/// default cap (64 KiB), so the bound holds only if tcplb set its cap.
#[test]
fn backpressure_over_tls_bounds_the_sessions_records_too() {
    const TOTAL: usize = 64 << 20;
    let pki = Pki::new("backpressure");
    let payload = std::sync::Arc::new(Rng::new(21).bytes(TOTAL));
    let host = spawn_streaming_host(payload.clone());
    let mut config = tls_config(&pki, &[host.addr], alice_rules(), vec![]);
    config.settings.buffer_size = 16 << 10;
    config.settings.bulk_buffer_size = 16 << 10;
    let bound = 2 * config.settings.bulk_buffer() as i64;
    let proxy = start(config);
    let alice = pki.client("alice");
    let mut s = pki::connect(proxy.addr, pki.client_config(Some(&alice))).unwrap();
    let ends = (s.sock.local_addr().unwrap(), proxy.addr);
    // What tcplb wrote for the handshake: the stream starts only now.
    let handshake = socket_counts(ends.1, ends.0).written();
    s.write_all(b"g").unwrap();
    let tcplb_end = host.peer.recv_timeout(IO_TIMEOUT).unwrap();
    let stalled = stalled_backlog(&host, tcplb_end, ends);
    // Records carry a little more than their plaintext: if anything, this
    // understates what tcplb holds, by some bytes per 16 KiB record.
    let held = stalled.held_by_tcplb(handshake);
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
    assert_eq!(proxy.stats().buffers_in_use, 1);
    // The reader catches up: the stream resumes, byte-exact.
    let mut got = vec![0u8; TOTAL];
    s.read_exact(&mut got).unwrap();
    assert!(got == *payload, "the stream differs");
    pki::close_write(&mut s);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn host_reset_reaches_a_tls_client_as_reset() {
    let pki = Pki::new("reset");
    let listener = std::net::TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).unwrap();
        socket2::SockRef::from(&conn)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    let proxy = start(tls_config(&pki, &[addr], alice_rules(), vec![]));
    let alice = pki.client("alice");
    let mut s = pki::connect(proxy.addr, pki.client_config(Some(&alice))).unwrap();
    s.write_all(b"x").unwrap();
    let mut buf = [0u8; 16];
    let err = s
        .read(&mut buf)
        .expect_err("a reset, not data or a clean close");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
}

#[test]
fn sessions_are_never_resumed_so_every_connection_is_verified() {
    // A resumed session would skip the certificate checks (an expired or
    // revoked certificate would get back in on an old session).
    let pki = Pki::new("resume");
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(tls_config(&pki, &[host.addr], alice_rules(), vec![]));
    let alice = pki.client("alice");
    let config = pki.client_config(Some(&alice));
    for round in 0..3 {
        let mut s = pki::connect(proxy.addr, config.clone()).unwrap();
        s.write_all(b"x\n").unwrap();
        assert_eq!(pki::read_line(&mut s).unwrap(), "x");
        assert_eq!(
            s.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Full),
            "round {round}"
        );
        pki::close_write(&mut s);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
    }
}

#[test]
fn tls_records_queued_while_reading_are_sent_at_once() {
    // A TLS 1.2 renegotiation request is answered with an alert that
    // rustls queues while reading; it must go out without waiting for
    // the host to send something.
    let pki = Pki::new("reneg");
    let listener = std::net::TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut b = [0u8; 64];
        let _ = conn.read(&mut b);
        conn.write_all(b"hi\n").unwrap();
        // Silent from now on, until the test is over.
        let _ = released.recv_timeout(IO_TIMEOUT);
    });
    let proxy = start(tls_config(&pki, &[addr], alice_rules(), vec![]));
    let alice = pki.client("alice");
    let mut child = Command::new("openssl")
        .args(["s_client", "-tls1_2", "-msg", "-connect"])
        .arg(proxy.addr.to_string())
        .arg("-cert")
        .arg(&alice.cert_path)
        .arg("-key")
        .arg(&alice.key_path)
        .arg("-CAfile")
        .arg(&pki.ca_path)
        .args(["-servername", "localhost"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed (.ci/run installs it)");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    stdin.write_all(b"hello\n").unwrap();
    while lines.recv_timeout(IO_TIMEOUT).unwrap().trim() != "hi" {}
    stdin.write_all(b"R\n").unwrap();
    // The alert arrives while the host stays silent.
    let alert = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(5))
            .expect("no alert from tcplb");
        if line.contains("<<<") && line.contains("Alert") {
            break line;
        }
    };
    assert!(alert.contains("Alert"), "{alert}");
    let _ = child.kill();
    let _ = child.wait();
    release.send(()).unwrap();
}

#[test]
fn a_fin_without_close_notify_reaches_the_host_as_a_reset() {
    let pki = Pki::new("truncated");
    let listener = std::net::TcpListener::bind(localhost()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut got = Vec::new();
        let end = conn.read_to_end(&mut got).map_err(|e| e.kind());
        tx.send((got, end)).unwrap();
    });
    let proxy = start(tls_config(&pki, &[addr], alice_rules(), vec![]));
    let alice = pki.client("alice");
    let mut s = pki::connect(proxy.addr, pki.client_config(Some(&alice))).unwrap();
    s.write_all(b"partial").unwrap();
    s.flush().unwrap();
    // TCP FIN with no close_notify: the stream may have been cut short.
    s.sock.shutdown(std::net::Shutdown::Write).unwrap();
    let (got, end) = outcome.recv_timeout(IO_TIMEOUT).unwrap();
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "got {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        got, b"partial",
        "what came before the FIN is delivered first"
    );
    // Named for what happened: the client sent no reset.
    proxy.wait_until("ended the pair", |s| s.pairs == 0);
    let ended = &proxy.stats().upstreams[0].ended;
    assert_eq!(ended, &[("client_truncated".to_string(), 1)]);
}

#[test]
fn one_source_cannot_take_every_handshake_slot() {
    let pki = Pki::new("persource");
    let host = spawn_host("h", Behavior::Echo);
    let mut config = tls_config(&pki, &[host.addr], alice_rules(), vec![]);
    config.tls.as_mut().unwrap().max_handshakes_per_source = 2;
    let proxy = start(config);
    let stalled: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(proxy.addr).unwrap())
        .collect();
    proxy.wait_until("started two handshakes", |s| s.handshakes == 2);
    // A third from the same source is closed at accept.
    let alice = pki.client("alice");
    let outcome = pki::connect(proxy.addr, pki.client_config(Some(&alice)));
    assert_refused(&outcome, "a third handshake from the source");
    // Another source still gets in.
    let other: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut s = pki::connect_from(other, proxy.addr, pki.client_config(Some(&alice))).unwrap();
    s.write_all(b"ok\n").unwrap();
    assert_eq!(pki::read_line(&mut s).unwrap(), "ok");
    let stats = proxy.stats();
    assert!(
        stats.upstreams[0]
            .refused
            .contains(&("source_handshake_capacity".to_string(), 1)),
        "{stats:?}"
    );
    drop(stalled);
}

#[test]
fn a_handshake_flood_from_a_few_addresses_does_not_starve_other_clients() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const FLOODERS: u8 = 20;
    const PER_FLOODER: usize = 10;
    const MAX_HANDSHAKES: usize = 100;
    let pki = Pki::new("flood");
    let host = spawn_host("h", Behavior::Echo);
    let mut config = tls_config(&pki, &[host.addr], alice_rules(), vec![]);
    let tls = config.tls.as_mut().unwrap();
    tls.max_handshakes = MAX_HANDSHAKES;
    tls.max_handshakes_per_source = PER_FLOODER;
    let proxy = start(config);
    // Each flooding connection sends the start of a ClientHello and
    // stalls; when tcplb closes it, it comes straight back.
    let stop = Arc::new(AtomicBool::new(false));
    let addr = proxy.addr;
    let flood: Vec<_> = (0..FLOODERS)
        .flat_map(|a| (0..PER_FLOODER).map(move |_| a))
        .map(|a| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let source = std::net::IpAddr::from([127, 0, 1, 1 + a]);
                while !stop.load(Ordering::SeqCst) {
                    let socket =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                            .unwrap();
                    socket.bind(&SocketAddr::new(source, 0).into()).unwrap();
                    if socket.connect(&addr.into()).is_err() {
                        continue;
                    }
                    let mut s = TcpStream::from(socket);
                    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02]);
                    let mut buf = [0u8; 64];
                    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                }
            })
        })
        .collect();
    // Full: a client that evicted a flood handshake takes its slot
    // whatever the cap, so the count can sit one over it per worker.
    proxy.wait_until("filled every handshake slot", |s| {
        s.handshakes >= MAX_HANDSHAKES
    });
    let alice = pki.client("alice");
    let config = pki.client_config(Some(&alice));
    let other = std::net::IpAddr::from([127, 0, 2, 1]);
    let mut served = 0;
    for i in 0..40 {
        let outcome = pki::connect_from(other, proxy.addr, config.clone()).and_then(|mut s| {
            s.write_all(format!("{i}\n").as_bytes())?;
            pki::read_line(&mut s)
        });
        if outcome.is_ok_and(|line| line == i.to_string()) {
            served += 1;
        }
    }
    let evicted = proxy.stats().upstreams[0]
        .refused
        .iter()
        .find(|(r, _)| r == "handshake_evicted")
        .map_or(0, |(_, n)| *n);
    stop.store(true, Ordering::SeqCst);
    drop(proxy);
    for t in flood {
        t.join().unwrap();
    }
    println!("served {served} of 40 during the flood, {evicted} flood handshakes evicted");
    assert!(served >= 38, "served {served} of 40");
    assert!(
        evicted >= 40,
        "each client took the slot of a flood handshake: {evicted}"
    );
}

/// A config file for the binary in `pki`'s folder: see [`tls_config_text`].
fn tls_config_file(pki: &Pki, host: SocketAddr, clients: &str) -> String {
    let path = pki.dir.join("lb.toml");
    std::fs::write(&path, tls_config_text(pki, host, clients)).unwrap();
    path.to_str().unwrap().to_string()
}

/// A config with `pki`'s `[tls]`, a TLS upstream `secure` and a TLS
/// upstream `other` in front of `host`, and `clients` (`[[client]]` tables).
fn tls_config_text(pki: &Pki, host: SocketAddr, clients: &str) -> String {
    let upstream = |name: &str| {
        format!(
            "[[upstream]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nhosts = [\"{host}\"]\n\n"
        )
    };
    format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\n{}{}{clients}",
        pki.server_cert,
        pki.server_key,
        pki.ca_path,
        upstream("secure"),
        upstream("other"),
    )
}

/// One `[[client]]` rule for `identity` on `secure`.
fn client_toml(identity: &str) -> String {
    format!("[[client]]\nidentity = \"{identity}\"\nupstreams = [\"secure\"]\nrate = 100\n\n")
}

/// Writes a line over `s` and reads its echo.
fn echo_line(s: &mut pki::TlsStream, line: &str) {
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(pki::read_line(s).unwrap(), line);
}

/// A reload applies new TLS material (server certificate, client CA)
/// and new client rules to new connections, and leaves an established
/// one alone.
#[test]
fn a_reload_applies_new_certificates_and_client_rules() {
    let old = Pki::new("reload-old");
    let new = Pki::new("reload-new");
    let host = spawn_host("h", Behavior::Echo);
    let file = tls_config_file(&old, host.addr, &client_toml("alice"));
    let config = Config::load(std::path::Path::new(&file)).unwrap();
    let mut proxy = tcplb::Proxy::bind(&config).unwrap();
    proxy.set_config_path(file.clone().into());
    let secure = proxy.listen_addr("secure").unwrap();
    let handle = proxy.handle();
    let thread = std::thread::spawn(move || proxy.run());
    let alice_old = old.client("alice");
    let mut before = pki::connect(secure, old.client_config(Some(&alice_old))).unwrap();
    echo_line(&mut before, "before");

    // Another CA, another server certificate, and bob instead of alice.
    std::fs::write(&file, tls_config_text(&new, host.addr, &client_toml("bob"))).unwrap();
    handle.reload().unwrap();
    // The server presents the new certificate: a client that trusts only
    // the old CA turns it down.
    let outcome = pki::connect(secure, old.client_config(Some(&alice_old)));
    match &outcome {
        Err(e) => assert!(e.to_string().contains("UnknownIssuer"), "{e}"),
        Ok(_) => panic!("the old server certificate is still served"),
    }
    // Client certificates must chain to the new CA...
    let bob_old = old.client("bob");
    let mut config = (*new.client_config(None)).clone();
    config.client_auth_cert_resolver = old
        .client_config(Some(&bob_old))
        .client_auth_cert_resolver
        .clone();
    let outcome = pki::connect(secure, std::sync::Arc::new(config)).and_then(|mut s| {
        s.write_all(b"x\n")?;
        pki::read_line(&mut s)
    });
    assert_refused(&outcome, "a client certificate of the old CA");
    // ...and the new rules decide: bob is in, alice is not.
    let bob = new.client("bob");
    let mut s = pki::connect(secure, new.client_config(Some(&bob))).unwrap();
    echo_line(&mut s, "bob");
    let alice = new.client("alice");
    let mut s = pki::connect(secure, new.client_config(Some(&alice))).unwrap();
    let line = pki::read_line(&mut s).unwrap();
    assert!(line.starts_with("ERROR unauthorized: "), "{line}");
    // The connection made before the reload relays as before.
    echo_line(&mut before, "after");
    handle.shutdown();
    handle.shutdown();
    thread.join().unwrap().unwrap();
}

/// SHA-256 of a certificate, in lowercase hex.
fn sha256_hex(cert: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, cert)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The binary's log of a TLS upstream: each refusal is logged once with
/// the client's address, identity, certificate fingerprint, upstream and
/// reason, and every access line carries the identity, refused or not.
#[test]
fn refusals_and_access_lines_name_the_identity_and_certificate() {
    let pki = Pki::new("logs");
    let host = spawn_host("h", Behavior::Echo);
    let file = tls_config_file(&pki, host.addr, &client_toml("alice"));
    let mut bin = Binary::start(&["--config", &file]);
    let secure = bin.listen_addr_of("secure");
    let other = bin.listen_addr_of("other");
    let alice = pki.client("alice");
    let carol = pki.client("spiffe://example.org/carol");
    // Served: alice on `secure`.
    let mut s = pki::connect(secure, pki.client_config(Some(&alice))).unwrap();
    let served = s.sock.local_addr().unwrap();
    s.write_all(b"hi\n").unwrap();
    assert_eq!(pki::read_line(&mut s).unwrap(), "hi");
    pki::close_write(&mut s);
    s.read_to_end(&mut Vec::new()).unwrap();
    // Refused: alice on `other` (not allowed there), carol anywhere (unknown).
    let mut refused = Vec::new();
    for (cert, addr) in [(&alice, other), (&carol, secure)] {
        let mut s = pki::connect(addr, pki.client_config(Some(cert))).unwrap();
        let line = pki::read_line(&mut s).unwrap();
        assert!(line.starts_with("ERROR unauthorized: "), "{line}");
        refused.push(s.sock.local_addr().unwrap());
    }
    bin.signal("TERM");
    let (code, log) = bin.wait();
    assert_eq!(code, Some(0));
    let lines_of = |addr: SocketAddr, needle: &str| -> Vec<&String> {
        log.iter()
            .filter(|l| l.contains(&format!("{addr} ")) && l.contains(needle))
            .collect()
    };
    let cases = [
        (refused[0], "other", "alice", &alice),
        (refused[1], "secure", "spiffe://example.org/carol", &carol),
    ];
    for (addr, upstream, identity, cert) in cases {
        let refusal = lines_of(addr, "refused:");
        let fields = format!(
            "{addr} `{upstream}` refused: unauthorized identity={identity} cert_sha256={}",
            sha256_hex(cert.cert.as_ref())
        );
        assert_eq!(refusal.len(), 1, "one refusal line for {addr}: {log:#?}");
        assert!(refusal[0].contains(&fields), "{fields}\nin {}", refusal[0]);
        let access = lines_of(addr, "tcplb::access");
        assert_eq!(access.len(), 1, "{log:#?}");
        assert!(
            access[0].contains(&format!("identity={identity} host=- "))
                && access[0].contains("end=unauthorized"),
            "{}",
            access[0]
        );
    }
    let access = lines_of(served, "tcplb::access");
    assert_eq!(access.len(), 1, "{log:#?}");
    let expected = format!("{served} `secure` identity=alice host={} ", host.addr);
    assert!(
        access[0].contains(&expected) && access[0].contains("end=closed"),
        "{expected}\nin {}",
        access[0]
    );
    assert!(lines_of(served, "refused:").is_empty(), "{log:#?}");
}

/// With `--access-log json`, each access line of a TLS upstream is a JSON
/// object whose `identity` is the one the certificate gave, served or
/// refused.
#[test]
fn json_access_lines_carry_the_identity() {
    let pki = Pki::new("json-logs");
    let host = spawn_host("h", Behavior::Echo);
    let file = tls_config_file(&pki, host.addr, &client_toml("alice"));
    let mut bin = Binary::start(&["--config", &file, "--access-log", "json"]);
    let secure = bin.listen_addr_of("secure");
    let alice = pki.client("alice");
    let carol = pki.client("spiffe://example.org/carol");
    let mut s = pki::connect(secure, pki.client_config(Some(&alice))).unwrap();
    let served = s.sock.local_addr().unwrap();
    echo_line(&mut s, "hi");
    pki::close_write(&mut s);
    s.read_to_end(&mut Vec::new()).unwrap();
    let mut r = pki::connect(secure, pki.client_config(Some(&carol))).unwrap();
    let refused = r.sock.local_addr().unwrap();
    assert!(
        pki::read_line(&mut r)
            .unwrap()
            .starts_with("ERROR unauthorized: ")
    );
    bin.signal("TERM");
    let (code, log) = bin.wait();
    assert_eq!(code, Some(0));
    let json: Vec<serde_json::Value> = log
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |addr: SocketAddr| {
        let mine: Vec<&serde_json::Value> = json
            .iter()
            .filter(|l| l["client"] == addr.to_string())
            .collect();
        assert_eq!(mine.len(), 1, "{log:#?}");
        mine[0].clone()
    };
    let ok = of(served);
    assert_eq!(
        (&ok["identity"], &ok["end"], &ok["upstream"]),
        (&"alice".into(), &"closed".into(), &"secure".into())
    );
    assert_eq!((&ok["bytes_up"], &ok["bytes_down"]), (&3.into(), &3.into()));
    assert_eq!(ok["host"], host.addr.to_string());
    let no = of(refused);
    assert_eq!(
        (&no["identity"], &no["end"], &no["host"]),
        (
            &"spiffe://example.org/carol".into(),
            &"unauthorized".into(),
            &serde_json::Value::Null
        )
    );
}

/// Failed handshakes (here: clients without a certificate) are logged at
/// most once a second, each line with the count of those not logged, and
/// a flood of them cannot fill the log with access lines either.
#[test]
fn failed_handshakes_are_logged_at_most_once_a_second() {
    let pki = Pki::new("hslog");
    let host = spawn_host("h", Behavior::Echo);
    let file = tls_config_file(&pki, host.addr, "");
    let mut bin = Binary::start(&["--config", &file]);
    let addr = bin.listen_addr_of("secure");
    let started = Instant::now();
    let fail = || {
        let outcome =
            pki::connect(addr, pki.client_config(None)).and_then(|mut s| s.read(&mut [0u8; 8]));
        assert_refused(&outcome, "a handshake without a certificate");
    };
    // A burst, then more until one starts over a second after the burst
    // ended: that one is surely logged again.
    let mut failed = 0;
    for _ in 0..20 {
        fail();
        failed += 1;
    }
    let burst_done = Instant::now();
    loop {
        let at = Instant::now();
        fail();
        failed += 1;
        if at >= burst_done + Duration::from_secs(1) {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    bin.signal("TERM");
    let (_, log) = bin.wait();
    let lines: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("refused: handshake_failed"))
        .collect();
    // Each line says how many went unlogged since the one before.
    let reported: u64 = lines
        .iter()
        .map(|l| {
            let count = l.rsplit_once(" more since the last report").unwrap().0;
            1 + count.rsplit_once('(').unwrap().1.parse::<u64>().unwrap()
        })
        .sum();
    println!(
        "{failed} failed handshakes in {seconds:.2} s: {} lines, reporting {reported}",
        lines.len()
    );
    assert!(
        lines.len() >= 2 && lines.len() as f64 <= seconds.floor() + 1.0,
        "{} lines in {seconds:.2} s: {lines:#?}",
        lines.len()
    );
    assert!(reported <= failed, "{reported} reported of {failed}");
    assert!(
        reported > 20,
        "the second line counts the burst: {lines:#?}"
    );
    // Their access lines share the refusals' budget (10 a second), and
    // the rest are summed up: every one is logged or counted.
    let access = log
        .iter()
        .filter(|l| l.contains("tcplb::access") && l.contains("end=handshake_failed"))
        .count();
    let summed: u64 = log
        .iter()
        .filter_map(|l| l.split("handshake_failed=").nth(1))
        .map(|n| n.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum();
    println!("{access} access lines, {summed} summed up");
    assert!(
        access as f64 <= 10.0 * (seconds.floor() + 1.0),
        "{access} access lines in {seconds:.2} s"
    );
    assert_eq!(access as u64 + summed, failed);
}
