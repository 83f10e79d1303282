//! Taking in new clients: accepting in bounded batches, backing off when
//! the process runs out of descriptors, turning away what the per-source
//! limits and handshake caps refuse before any work is spent on it, and
//! creating the pair of everything else.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::TcpStream;

use super::token::Registration;
use super::{Proxy, context};
use crate::io::tls_session::TlsSession;
use crate::io::{Endpoint, net};
use crate::pair::PAIR_INTEREST;
use crate::pair::{End, Pair, Side, Step};
use crate::policy::limits::source_key;

/// Connections accepted from one listener per loop turn before the loop
/// goes back to relaying; the rest are taken next turn.
const ACCEPT_BATCH: usize = 128;
/// How long accepting pauses when the process runs out of descriptors.
const EXHAUSTION_BACKOFF: Duration = Duration::from_millis(100);

impl Proxy {
    /// Accepts what the listeners have queued.
    pub(super) fn accept(&mut self, now: Instant) {
        let w = &mut self.worker;
        if let Some(resume) = w.accept_paused_until {
            if now < resume {
                return;
            }
            w.accept_paused_until = None;
        }
        let pending: Vec<usize> = w
            .listeners
            .iter()
            .filter(|(_, l)| l.pending)
            .map(|(key, _)| key)
            .collect();
        for index in pending {
            for _ in 0..ACCEPT_BATCH {
                let Some(listener) = self.worker.listeners.get_mut(index) else {
                    break;
                };
                if !listener.pending {
                    break;
                }
                match listener.socket.accept() {
                    Ok((stream, addr)) => {
                        let upstream = listener.upstream;
                        self.admit(upstream, stream, addr, now);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => listener.pending = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if net::is_resource_exhaustion(&e) => {
                        self.pause_accepting(&e, now);
                        return;
                    }
                    // A connection that died in the queue (ECONNABORTED and the like).
                    Err(e) => debug!("accept failed: {e}"),
                }
            }
        }
    }

    /// Stops accepting for a moment instead of spinning on EMFILE/ENFILE;
    /// pairs keep being served and freed descriptors let accepting resume.
    fn pause_accepting(&mut self, e: &io::Error, now: Instant) {
        let w = &mut self.worker;
        w.accept_paused_until = Some(now + EXHAUSTION_BACKOFF);
        if let Some(times) = w.exhaustion_log.allow(now) {
            warn!(
                "out of descriptors or socket memory ({e}); pausing accepts for {:?} \
                 ({times} more times since the last report), {} connections open",
                EXHAUSTION_BACKOFF,
                w.pairs.len()
            );
        }
    }

    /// Takes in a new client: starts its TLS handshake, or connects it to
    /// a host, or refuses it.
    fn admit(&mut self, upstream: usize, stream: TcpStream, addr: SocketAddr, now: Instant) {
        if let Some(why) = self.turn_away(upstream, addr, now) {
            self.shared.upstreams[upstream].count_refusal(why);
            if let Some(times) = self.worker.drop_log.allow(now) {
                let u = &self.shared.upstreams[upstream].name;
                warn!(
                    "closing new connections at accept: {addr} on `{u}`: {why} ({times} more since the last report)"
                );
            }
            return;
        }
        net::prepare(&stream);
        let (w, shared) = (&mut self.worker, &mut self.shared);
        let key = w.pairs.vacant_entry().key();
        let mut endpoint = Endpoint::new(stream);
        let token = Registration::Pair(key, Side::Client).token();
        if let Err(e) = endpoint.register(w.poll.registry(), token, PAIR_INTEREST) {
            return warn!("cannot register client {addr}: {e}");
        }
        let id = w.next_id;
        w.next_id += 1;
        let tls = match (shared.upstreams[upstream].tls, &shared.tls) {
            (true, Some((config, settings))) => {
                match TlsSession::new(config.clone(), shared.settings.bulk_buffer()) {
                    Ok(session) => Some((session, now + settings.handshake_timeout)),
                    Err(e) => return warn!("cannot start a TLS session for {addr}: {e}"),
                }
            }
            _ => None,
        };
        let mut ctx = context(&mut w.support, &w.poll, shared, upstream, key, now);
        let (pair, step) = match tls {
            Some((session, deadline)) => (
                Pair::handshaking(id, upstream, (endpoint, addr), session, deadline, &mut ctx),
                Step::Continue,
            ),
            None => Pair::connecting(id, upstream, (endpoint, addr), &mut ctx),
        };
        w.pairs.insert(pair);
        match step {
            Step::Finish(end) => self.close(key, end, now),
            Step::Continue | Step::Again => self.schedule(key),
        }
        self.host_results(upstream, now);
    }

    /// Every handshake slot is taken: if `client`'s source has fewer than
    /// its fair share of them (an equal share among the sources that
    /// hold any, itself included) while the busiest source has more, that
    /// source's oldest (slowest) handshake makes room. A flood from a few
    /// addresses then cannot keep everyone else from a handshake.
    fn make_handshake_room(&mut self, client: SocketAddr, max: usize, now: Instant) -> bool {
        let census = &self.worker.support.census;
        let Some((busiest, most, sources)) = census.busiest_handshake_source() else {
            return false;
        };
        let mine = census.handshakes_from(client.ip());
        let fair = max / (sources + usize::from(mine == 0)).max(1);
        if mine >= fair || most <= fair || busiest == source_key(client.ip()) {
            return false;
        }
        let victim = self
            .worker
            .pairs
            .iter()
            .filter(|(_, p)| p.is_handshaking() && source_key(p.client_addr.ip()) == busiest)
            .min_by_key(|(_, p)| p.started)
            .map(|(key, p)| (key, p.upstream));
        let Some((key, upstream)) = victim else {
            return false;
        };
        self.worker.pairs[key].count_silent_refusal(
            "handshake_evicted",
            &mut self.shared.upstreams[upstream],
            &mut self.worker.support.logs.refusals,
            now,
        );
        self.close(key, End::HandshakeEvicted, now);
        true
    }

    /// Why a new connection must be closed at once, before any work on it:
    /// its source is over its rate, or too many handshakes are under way.
    fn turn_away(
        &mut self,
        upstream: usize,
        addr: SocketAddr,
        now: Instant,
    ) -> Option<&'static str> {
        if let Some(sources) = self.shared.sources.as_mut() {
            if sources.check(addr.ip(), now).is_err() {
                return Some("source_rate_limited");
            }
        }
        let limits = match (self.shared.upstreams[upstream].tls, &self.shared.tls) {
            (true, Some((_, tls))) => (tls.max_handshakes, tls.max_handshakes_per_source),
            _ => return None,
        };
        let census = &self.worker.support.census;
        if census.handshakes_from(addr.ip()) >= limits.1 {
            return Some("source_handshake_capacity");
        }
        if census.handshakes() >= limits.0 && !self.make_handshake_room(addr, limits.0, now) {
            return Some("handshake_capacity");
        }
        None
    }
}
