//! Every refusal code, end to end: the client is told in one line,
//! `ERROR <code>: <message>`, which never names a host, an address, the
//! upstream or an identity, whatever turned it away.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::pki::{self, Pki};
use common::*;
use tcplb::{ClientRule, Config, HealthSettings, Settings, UpstreamConfig};

/// A name no message would contain by chance.
const UPSTREAM: &str = "payroll-db";

fn upstream(hosts: &[SocketAddr], tls: bool, health: HealthSettings) -> UpstreamConfig {
    UpstreamConfig {
        name: UPSTREAM.to_string(),
        listen: localhost(),
        hosts: hosts.iter().map(|&h| h.into()).collect(),
        names: Vec::new(),
        tls,
        health,
        refusal: Default::default(),
        queue_timeout: None,
        max_queued: None,
        send_proxy: None,
        accept_proxy: Vec::new(),
    }
}

fn plain(hosts: &[SocketAddr], settings: Settings, health: HealthSettings) -> Config {
    Config {
        settings,
        upstreams: vec![upstream(hosts, false, health)],
        tls: None,
        clients: Vec::new(),
        admin: None,
        cluster: None,
        warnings: Vec::new(),
    }
}

/// A TLS upstream whose only client is `alice`, with `rule` changing her rule.
fn tls(pki: &Pki, hosts: &[SocketAddr], rule: impl FnOnce(&mut ClientRule)) -> Config {
    let mut alice = ClientRule {
        identity: "alice".to_string(),
        upstreams: vec![UPSTREAM.to_string()],
        rate: 100.0,
        burst: 100,
        max_connections: None,
    };
    rule(&mut alice);
    Config {
        settings: Settings::default(),
        upstreams: vec![upstream(hosts, true, HealthSettings::default())],
        tls: Some(pki.settings(Vec::new(), Duration::from_secs(10))),
        clients: vec![alice],
        admin: None,
        cluster: None,
        warnings: Vec::new(),
    }
}

/// Asserts that `reply` is the one line of refusal `code`, naming none of
/// `hosts` (nor their ports), no address at all, and neither the upstream
/// nor the client's identity.
fn assert_discreet(reply: &str, code: &str, hosts: &[SocketAddr]) {
    assert!(reply.starts_with(&format!("ERROR {code}: ")), "{reply:?}");
    assert!(
        reply.ends_with('\n') && reply.matches('\n').count() == 1,
        "one line: {reply:?}"
    );
    let message = &reply[format!("ERROR {code}: ").len()..];
    let mut secrets: Vec<String> = vec![
        "127.0.0.1".into(),
        "::1".into(),
        "localhost".into(),
        UPSTREAM.into(),
        "alice".into(),
    ];
    for host in hosts {
        secrets.push(host.to_string());
        secrets.push(host.port().to_string());
    }
    for secret in secrets {
        assert!(!message.contains(&secret), "names {secret}: {reply:?}");
    }
}

/// The whole reply of a refused plain client.
fn plain_reply(addr: SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    String::from_utf8(read_to_end(&mut c).unwrap()).unwrap()
}

/// The whole reply of a refused TLS client (its line, then `close_notify`).
fn tls_reply(addr: SocketAddr, pki: &Pki, cert: &pki::ClientCert) -> String {
    let mut s = pki::connect(addr, pki.client_config(Some(cert))).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn upstream_unavailable_names_no_host() {
    let hosts = [dead_addr(), dead_addr()];
    let proxy = start(plain(
        &hosts,
        Settings::default(),
        HealthSettings::default(),
    ));
    assert_discreet(&plain_reply(proxy.addr), "upstream_unavailable", &hosts);
}

#[test]
fn no_healthy_host_names_no_host() {
    let hosts = [dead_addr(), dead_addr()];
    let health = HealthSettings {
        active: true,
        interval: Duration::from_millis(100),
        ..HealthSettings::default()
    };
    let proxy = start(plain(&hosts, Settings::default(), health));
    proxy.wait_until("took every host down", |s| {
        s.upstreams[0].hosts.iter().all(|h| !h.up)
    });
    assert_discreet(&plain_reply(proxy.addr), "no_healthy_host", &hosts);
}

#[test]
fn overloaded_names_no_host() {
    let host = spawn_host("h", Behavior::Named);
    let settings = Settings {
        max_connections: 1,
        ..Settings::default()
    };
    let proxy = start(plain(&[host.addr], settings, HealthSettings::default()));
    let mut held = proxy.connect();
    assert_eq!(read_line(&mut held), "h");
    assert_discreet(&plain_reply(proxy.addr), "overloaded", &[host.addr]);
}

#[test]
fn unauthorized_names_no_host() {
    let pki = Pki::new("discreet-authz");
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(tls(&pki, &[host.addr], |r| r.upstreams.clear()));
    let reply = tls_reply(proxy.addr, &pki, &pki.client("alice"));
    assert_discreet(&reply, "unauthorized", &[host.addr]);
}

#[test]
fn rate_limited_names_no_host() {
    let pki = Pki::new("discreet-rate");
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(tls(&pki, &[host.addr], |r| {
        r.rate = 0.01;
        r.burst = 1;
    }));
    let alice = pki.client("alice");
    let mut first = pki::connect(proxy.addr, pki.client_config(Some(&alice))).unwrap();
    let mut buf = [0u8; 1];
    std::io::Write::write_all(&mut first, b"x").unwrap();
    first.read_exact(&mut buf).unwrap();
    let reply = tls_reply(proxy.addr, &pki, &alice);
    assert_discreet(&reply, "rate_limited", &[host.addr]);
}

#[test]
fn too_many_connections_names_no_host() {
    let pki = Pki::new("discreet-cap");
    let host = spawn_host("h", Behavior::Echo);
    let proxy = start(tls(&pki, &[host.addr], |r| r.max_connections = Some(1)));
    let alice = pki.client("alice");
    let mut first = pki::connect(proxy.addr, pki.client_config(Some(&alice))).unwrap();
    let mut buf = [0u8; 1];
    std::io::Write::write_all(&mut first, b"x").unwrap();
    first.read_exact(&mut buf).unwrap();
    let reply = tls_reply(proxy.addr, &pki, &alice);
    assert_discreet(&reply, "too_many_connections", &[host.addr]);
}
