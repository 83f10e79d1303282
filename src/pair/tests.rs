//! The pair state machine driven directly: real loopback sockets, a
//! context built by hand, and `now` injected, so deadlines are exact and
//! no test waits on the clock.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use super::*;
use crate::config::{RefusalMode, UpstreamConfig};
use crate::io::Endpoint;
use crate::policy::balance::LoadBalancer;
use crate::policy::health::HealthSettings;

/// Everything a pair's context borrows, owned by the test.
struct World {
    poll: Poll,
    settings: Settings,
    pool: BufferPool,
    pipes: PipePool,
    upstream: Arc<Upstream>,
    counters: Counters,
    access: Access,
    capacity: Arc<Capacity>,
    census: Census,
    send_queues: SendQueues,
    logs: PairLogs,
    host_results: Vec<(Arc<Host>, bool)>,
    t0: Instant,
}

const CLIENT: Token = Token(0);
const HOST: Token = Token(1);

impl World {
    fn new(hosts: Vec<SocketAddr>) -> World {
        World {
            poll: Poll::new().unwrap(),
            settings: Settings::default(),
            pool: BufferPool::new(16 * 1024, 64 * 1024, 1 << 20),
            pipes: PipePool::new(crate::config::Relay::Copy, 64 * 1024, 16),
            upstream: Arc::new(Upstream::new(
                0,
                &UpstreamConfig {
                    name: "test".into(),
                    listen: "127.0.0.1:0".parse().unwrap(),
                    hosts: hosts.iter().map(|&h| h.into()).collect(),
                    names: Vec::new(),
                    tls: false,
                    health: HealthSettings::default(),
                    refusal: RefusalMode::default(),
                    queue_timeout: None,
                    max_queued: None,
                    send_proxy: None,
                    accept_proxy: Vec::new(),
                },
                "127.0.0.1:0".parse().unwrap(),
                LoadBalancer::unqueued(&hosts.iter().map(|&h| h.into()).collect::<Vec<_>>()),
            )),
            counters: Counters::default(),
            access: Access::new(Vec::new(), None),
            capacity: Arc::default(),
            census: Census::default(),
            send_queues: SendQueues::new(),
            logs: PairLogs::default(),
            host_results: Vec::new(),
            t0: Instant::now(),
        }
    }

    /// The context at `t0 + at`.
    fn at(&mut self, at: Duration) -> Context<'_> {
        Context {
            now: self.t0 + at,
            settings: &self.settings,
            pool: &mut self.pool,
            pipes: &mut self.pipes,
            registry: self.poll.registry(),
            host_token: HOST,
            counters: &mut self.counters,
            access: &self.access,
            worker: 0,
            cluster: None,
            capacity: &self.capacity,
            census: &mut self.census,
            send_queues: &mut self.send_queues,
            logs: &mut self.logs,
            host_results: &mut self.host_results,
        }
    }

    /// A client connected to "tcplb": the test's end, and tcplb's endpoint.
    fn client(&self) -> (TcpStream, (Endpoint, SocketAddr)) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let theirs = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, addr) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut endpoint = Endpoint::new(mio::net::TcpStream::from_std(ours));
        endpoint
            .register(self.poll.registry(), CLIENT, PAIR_INTEREST)
            .unwrap();
        (theirs, (endpoint, addr))
    }

    /// Polls once (bounded) and hands the events to the pair, as the loop does.
    fn events(&mut self, pair: &mut Pair) -> bool {
        let mut events = Events::with_capacity(16);
        self.poll
            .poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        for event in &events {
            let side = if event.token() == CLIENT {
                Side::Client
            } else {
                Side::Host
            };
            if let Some(endpoint) = pair.endpoint(side) {
                endpoint.on_event(event);
            }
        }
        !events.is_empty()
    }

    /// Drives the pair on events until `done` holds (bounded by polls).
    fn drive_until(&mut self, pair: &mut Pair, at: Duration, done: impl Fn(&Pair) -> bool) {
        for _ in 0..100 {
            if done(pair) {
                return;
            }
            assert!(self.events(pair), "no event within 5 s");
            let step = pair.advance(&mut self.at(at));
            assert!(!matches!(step, Step::Finish(_)), "finished: {step:?}");
        }
        panic!("never got there");
    }
}

fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

/// The connect results the pair noted, by host address.
fn results(w: &World) -> Vec<(SocketAddr, bool)> {
    w.host_results.iter().map(|(h, ok)| (h.addr, *ok)).collect()
}

fn kind(pair: &Pair) -> Option<Kind> {
    pair.state.kind()
}

#[test]
fn a_connect_that_times_out_fails_over_then_refuses() {
    let (a, b) = (listener(), listener());
    let mut w = World::new(vec![a.local_addr().unwrap(), b.local_addr().unwrap()]);
    let (_client, accepted) = w.client();
    let (mut pair, step) = {
        let upstream = w.upstream.clone();
        Pair::connecting(1, upstream, accepted, &mut w.at(Duration::ZERO))
    };
    assert_eq!(step, Step::Continue);
    assert_eq!(kind(&pair), Some(Kind::Connecting));
    let first = pair.host().unwrap().clone();
    assert_eq!(first.active(), 1);
    assert!(pair.slot.is_some(), "a place under max_connections");

    // The deadline is exactly the connect timeout; the events of the
    // kernel's completed connect are never looked at.
    let timeout = w.settings.connect_timeout;
    assert_eq!(pair.deadline(&w.settings), w.t0 + timeout);
    let step = pair.expire(&mut w.at(timeout));
    assert_eq!(step, Step::Continue);
    let second = pair.host().unwrap().clone();
    assert_ne!(first.addr, second.addr, "the next-best host");
    assert_eq!(first.active(), 0, "given back");
    assert_eq!(count(&first.counters.connect_failures), 1);
    assert_eq!(results(&w), [(first.addr, false)]);
    assert_eq!(pair.deadline(&w.settings), w.t0 + 2 * timeout);

    let step = pair.expire(&mut w.at(2 * timeout));
    assert_eq!(step, Step::Continue, "refusing: the line is being sent");
    assert_eq!(kind(&pair), Some(Kind::Refusing));
    assert!(pair.slot.is_none(), "a refused client holds no place");
    assert_eq!(w.census.refusing(), 1);
    assert_eq!(w.counters.refused.get("upstream_unavailable"), Some(&1));
    assert_eq!(
        pair.deadline(&w.settings),
        w.t0 + 2 * timeout + REFUSAL_LINGER
    );
    let mut ctx = w.at(2 * timeout + REFUSAL_LINGER);
    let end = pair.expire(&mut ctx);
    assert_eq!(
        end,
        Step::Finish(End::Refused(Refusal::UpstreamUnavailable))
    );
    pair.close(&mut ctx, End::Refused(Refusal::UpstreamUnavailable));
    assert_eq!(w.census.refusing(), 0);
    assert!(w.upstream.balancer.hosts().all(|(_, h)| h.active() == 0));
}

#[test]
fn over_max_connections_is_refused_without_a_host() {
    let host = listener();
    let mut w = World::new(vec![host.local_addr().unwrap()]);
    w.settings.max_connections = 0;
    let (mut client, accepted) = w.client();
    let upstream = w.upstream.clone();
    let mut ctx = w.at(Duration::ZERO);
    let (pair, _) = Pair::connecting(1, upstream, accepted, &mut ctx);
    assert_eq!(kind(&pair), Some(Kind::Refusing));
    assert!(pair.host().is_none());
    pair.close(&mut ctx, End::Refused(Refusal::Overloaded));
    let mut line = String::new();
    client.read_to_string(&mut line).unwrap();
    assert_eq!(line, Refusal::Overloaded.line());
}

#[test]
fn relaying_pairs_expire_idle_then_half_closed_at_their_own_timeouts() {
    let host = listener();
    let mut w = World::new(vec![host.local_addr().unwrap()]);
    w.settings.idle_timeout = Duration::from_secs(100);
    w.settings.half_close_timeout = Duration::from_secs(10);
    let (mut client, accepted) = w.client();
    let (mut pair, _) = {
        let upstream = w.upstream.clone();
        Pair::connecting(1, upstream, accepted, &mut w.at(Duration::ZERO))
    };
    let (mut upstream_end, _) = host.accept().unwrap();
    let at = Duration::from_secs(1);
    w.drive_until(&mut pair, at, |p| kind(p) == Some(Kind::Relaying));
    let host = w.upstream.balancer.host(0).clone();
    assert_eq!(results(&w), [(host.addr, true)]);
    assert_eq!(count(&host.counters.connections), 1);
    // Idle from the moment it connected.
    assert_eq!(
        pair.deadline(&w.settings),
        w.t0 + at + Duration::from_secs(100)
    );

    // A byte each way moves the idle clock to when it moved.
    client.write_all(b"x").unwrap();
    let at = Duration::from_secs(50);
    w.drive_until(&mut pair, at, |p| p.bytes().0 == 1);
    let mut byte = [0u8; 1];
    upstream_end.read_exact(&mut byte).unwrap();
    assert_eq!(
        pair.deadline(&w.settings),
        w.t0 + at + Duration::from_secs(100)
    );

    // The client half-closes: the shorter timeout applies from then on.
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let at = Duration::from_secs(60);
    w.drive_until(
        &mut pair,
        at,
        |p| matches!(&p.state, State::Relaying { up, .. } if up.done),
    );
    assert_eq!(upstream_end.read(&mut byte).unwrap(), 0, "FIN passed on");
    assert_eq!(
        pair.deadline(&w.settings),
        w.t0 + at + Duration::from_secs(10)
    );
    let mut ctx = w.at(at + Duration::from_secs(10));
    assert_eq!(pair.expire(&mut ctx), Step::Finish(End::HalfCloseTimeout));
    pair.close(&mut ctx, End::HalfCloseTimeout);
    assert_eq!(host.active(), 0);
    assert_eq!(w.capacity.connections(), 0);
    assert_eq!(w.pool.in_use(), 0);
}

#[test]
fn a_handshake_that_does_not_finish_times_out_and_is_counted() {
    let mut w = World::new(vec![listener().local_addr().unwrap()]);
    let (_client, accepted) = w.client();
    let config = crate::tls::tests_support::server_config();
    let session = TlsSession::new(config, 64 * 1024).unwrap();
    let deadline = w.t0 + Duration::from_secs(10);
    let slot = w.capacity.handshake(accepted.1.ip(), 10, 10).unwrap();
    let upstream = w.upstream.clone();
    let mut pair = Pair::handshaking(
        1,
        upstream,
        accepted,
        (session, slot),
        deadline,
        &mut w.at(Duration::ZERO),
    );
    assert_eq!(w.capacity.handshakes(), 1);
    assert_eq!(w.capacity.handshakes_from("127.0.0.1".parse().unwrap()), 1);
    assert_eq!(pair.deadline(&w.settings), deadline);
    let mut ctx = w.at(Duration::from_secs(10));
    assert_eq!(pair.expire(&mut ctx), Step::Finish(End::HandshakeTimeout));
    pair.close(&mut ctx, End::HandshakeTimeout);
    assert_eq!(w.capacity.handshakes(), 0);
    assert_eq!(w.capacity.handshakes_from("127.0.0.1".parse().unwrap()), 0);
    assert_eq!(w.counters.refused.get("handshake_timeout"), Some(&1));
}

#[test]
fn a_full_upstream_queues_then_admits_or_times_out_on_the_given_clock() {
    let host = listener();
    let mut w = World::new(vec![host.local_addr().unwrap()]);
    let config = UpstreamConfig {
        name: "test".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        hosts: vec![crate::config::HostConfig {
            max_connections: Some(1),
            ..host.local_addr().unwrap().into()
        }],
        names: Vec::new(),
        tls: false,
        health: HealthSettings::default(),
        refusal: RefusalMode::default(),
        queue_timeout: Some(Duration::from_secs(10)),
        max_queued: None,
        send_proxy: None,
        accept_proxy: Vec::new(),
    };
    let balancer = LoadBalancer::unqueued(&config.hosts);
    w.upstream = Arc::new(Upstream::new(0, &config, config.listen, balancer));
    let queue = w.upstream.balancer.queue().clone();
    let secs = Duration::from_secs;
    let open = |w: &mut World, at: Duration| {
        let (client, accepted) = w.client();
        let upstream = w.upstream.clone();
        let (pair, step) = Pair::connecting(1, upstream, accepted, &mut w.at(at));
        (client, pair, step)
    };
    let (_c1, first, step) = open(&mut w, Duration::ZERO);
    assert_eq!(
        (step, kind(&first)),
        (Step::Continue, Some(Kind::Connecting))
    );
    // The only host is at its cap: the next client waits, holding no host.
    let (_c2, mut second, step) = open(&mut w, Duration::ZERO);
    assert_eq!((step, kind(&second)), (Step::Queued, Some(Kind::Queued)));
    assert!(second.host().is_none() && second.slot.is_some());
    assert_eq!(
        (queue.len(), w.census.counts[Kind::Queued as usize]),
        (1, 1)
    );
    assert_eq!(second.deadline(&w.settings), w.t0 + secs(10));
    assert_eq!(second.retry_queued(&mut w.at(secs(1))), Step::Continue);
    assert_eq!(
        kind(&second),
        Some(Kind::Queued),
        "still full: still waiting"
    );
    // The first ends: the second, retried, takes its slot.
    first.close(&mut w.at(secs(2)), End::Closed);
    assert_eq!(second.retry_queued(&mut w.at(secs(3))), Step::Continue);
    assert_eq!(kind(&second), Some(Kind::Connecting));
    assert_eq!(queue.len(), 0);
    assert_eq!(
        (w.counters.queue_waits.count, w.counters.queue_waits.sum),
        (1, 3.0)
    );
    // A third waits out its queue_timeout, exactly, then is refused.
    let (_c3, mut third, step) = open(&mut w, secs(3));
    assert_eq!(step, Step::Queued);
    assert_eq!(third.deadline(&w.settings), w.t0 + secs(13));
    let mut ctx = w.at(secs(13));
    assert_eq!(
        third.expire(&mut ctx),
        Step::Continue,
        "the line is being sent"
    );
    assert_eq!(kind(&third), Some(Kind::Refusing));
    assert!(third.slot.is_none());
    assert_eq!(queue.len(), 0);
    assert_eq!(w.counters.refused.get("overloaded"), Some(&1));
    assert_eq!(w.counters.queue_waits.count, 2);
    let mut ctx = w.at(secs(14));
    third.close(&mut ctx, End::Refused(Refusal::Overloaded));
    second.close(&mut ctx, End::Closed);
    assert_eq!(w.upstream.balancer.host(0).active(), 0);
    assert_eq!(w.capacity.connections(), 0);
}

#[test]
fn a_proxy_header_that_does_not_fit_at_once_is_finished_before_any_client_byte() {
    let host = listener();
    let mut w = World::new(vec![host.local_addr().unwrap()]);
    let (mut client, accepted) = w.client();
    let (mut pair, _) = {
        let upstream = w.upstream.clone();
        Pair::connecting(1, upstream, accepted, &mut w.at(Duration::ZERO))
    };
    let (mut upstream_end, _) = host.accept().unwrap();
    // A header far larger than the host's socket takes before it reads,
    // so that it goes out in many writes.
    let header: Vec<u8> = (0..(4 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let len = header.len();
    let sending = header.clone().into_boxed_slice();
    pair.transition(&mut w.census, |old| {
        let State::Connecting {
            host,
            tried,
            deadline,
            up,
        } = old
        else {
            unreachable!("connecting");
        };
        State::SendingHeader {
            host,
            tried,
            deadline,
            up,
            header: sending,
            sent: 0,
        }
    });
    client.write_all(b"client bytes").unwrap();
    let at = Duration::from_millis(1);
    w.drive_until(
        &mut pair,
        at,
        |p| matches!(&p.state, State::SendingHeader { sent, .. } if *sent > 0),
    );
    let State::SendingHeader { sent, .. } = &pair.state else {
        unreachable!("checked");
    };
    assert!(*sent < len, "all {len} bytes went at once");
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; len + 12];
        upstream_end.read_exact(&mut got).unwrap();
        got
    });
    w.drive_until(&mut pair, at, |p| p.bytes().0 == 12);
    let got = reader.join().unwrap();
    assert!(got[..len] == header[..], "the header, whole and first");
    assert_eq!(&got[len..], b"client bytes");
    assert_eq!(results(&w), [(w.upstream.balancer.host(0).addr, true)]);
    let mut ctx = w.at(at);
    pair.close(&mut ctx, End::Closed);
    assert_eq!(w.pool.in_use(), 0);
}

/// An idle pair costs its slab entry (and one timer entry): what a PROXY
/// header said is boxed, so a pair without one does not carry 64 bytes of
/// addresses. The benchmark's idle scenario measures the whole cost.
#[test]
fn an_idle_pair_stays_small() {
    assert_eq!(std::mem::size_of::<Option<Box<Proxied>>>(), 8);
    assert!(
        std::mem::size_of::<Pair>() <= 336,
        "Pair is {} bytes",
        std::mem::size_of::<Pair>()
    );
}
