//! Taking in new clients, in a worker: accepting in bounded batches,
//! backing off when the process runs out of descriptors, turning away
//! what the per-source limits and the handshake caps refuse before any work
//! is spent on it, and creating the pair of everything else.

use std::cmp::Reverse;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::net::TcpStream;

use super::token::Registration;
use super::worker::Worker;
use crate::io::tls_session::TlsSession;
use crate::io::{Endpoint, net};
use crate::pair::{End, PAIR_INTEREST, Pair, Side, Step};
use crate::policy::capacity::HandshakeSlot;
use crate::policy::limits::source_key;
use crate::tls::TlsSettings;
use crate::upstream::Upstream;

/// Connections accepted from one listener per loop turn before the loop
/// goes back to relaying; the rest are taken next turn.
const ACCEPT_BATCH: usize = 128;
/// How long accepting pauses when the process runs out of descriptors.
const EXHAUSTION_BACKOFF: Duration = Duration::from_millis(100);

impl Worker {
    /// Accepts what the listeners have queued.
    pub(super) fn accept(&mut self, now: Instant) {
        if let Some(resume) = self.accept_paused_until {
            if now < resume {
                return;
            }
            self.accept_paused_until = None;
        }
        let pending: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.pending)
            .map(|(key, _)| key)
            .collect();
        for index in pending {
            for _ in 0..ACCEPT_BATCH {
                let Some(listener) = self.listeners.get_mut(index) else {
                    break;
                };
                if !listener.pending {
                    break;
                }
                match listener.socket.accept() {
                    Ok((stream, addr)) => {
                        let upstream = listener.upstream.clone();
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
        self.accept_paused_until = Some(now + EXHAUSTION_BACKOFF);
        // Free pipes give their descriptors back to connections.
        self.support.pipes.trim(0);
        if let Some(times) = self.exhaustion_log.allow(now) {
            warn!(
                "out of descriptors or socket memory ({e}); pausing accepts for {:?} \
                 ({times} more times since the last report), {} connections open",
                EXHAUSTION_BACKOFF,
                self.pairs.len()
            );
        }
    }

    /// Takes in a new client: starts its TLS handshake, or connects it to
    /// a host, or refuses it. A client of an `accept_proxy` upstream is
    /// read its PROXY header first (and refused unless its peer is on the
    /// list); the limits below then apply to the address the header names.
    fn admit(
        &mut self,
        upstream: Arc<Upstream>,
        stream: TcpStream,
        addr: SocketAddr,
        now: Instant,
    ) {
        let expects_header = !upstream.accept_proxy.is_empty();
        let slot = if expects_header {
            if upstream.trusts(addr.ip()) {
                None
            } else {
                self.counters(upstream.id).count_refusal("proxy_untrusted");
                return self.dropped(&upstream, addr, None, "proxy_untrusted", now);
            }
        } else {
            match self.turn_away(&upstream, addr, now) {
                Ok(slot) => slot,
                Err(why) => {
                    self.counters(upstream.id).count_refusal(why);
                    return self.dropped(&upstream, addr, None, why, now);
                }
            }
        };
        net::prepare(&stream, self.snapshot.settings.keepalive.as_ref());
        let key = self.pairs.vacant_entry().key();
        let mut endpoint = Endpoint::new(stream);
        let token = Registration::Pair(key, Side::Client).token();
        if let Err(e) = endpoint.register(self.poll.registry(), token, PAIR_INTEREST) {
            return warn!("cannot register client {addr}: {e}");
        }
        let id = self.next_id;
        self.next_id += 1;
        let tls = match slot {
            Some(slot) => match self.tls_session(slot, addr, now) {
                Some(tls) => Some(tls),
                None => return,
            },
            None => None,
        };
        let header_deadline = now + self.handshake_timeout();
        let (mut ctx, pairs) = self.pair_context(upstream.id, key, now);
        let client = (endpoint, addr);
        let (pair, step) = match tls {
            _ if expects_header => (
                Pair::reading_header(id, upstream.clone(), client, header_deadline, &mut ctx),
                Step::Continue,
            ),
            Some((session, deadline)) => (
                Pair::handshaking(id, upstream.clone(), client, session, deadline, &mut ctx),
                Step::Continue,
            ),
            None => Pair::connecting(id, upstream.clone(), client, &mut ctx),
        };
        pairs.insert(pair);
        self.after_step(key, step, now);
        self.host_results(&upstream, now);
    }

    /// Pair `key` has read its PROXY header: what a new connection from
    /// the address it names goes through at accept (per-source rate,
    /// handshake caps), then its handshake or connect.
    pub(super) fn identified(&mut self, key: usize, now: Instant) {
        let (upstream, addr, via) = {
            let pair = &self.pairs[key];
            (pair.upstream.clone(), pair.client_addr, pair.via())
        };
        // What the client goes on to: turned away, a handshake, a connect.
        let next = match self.turn_away(&upstream, addr, now) {
            Err(why) => {
                self.dropped(&upstream, addr, via, why, now);
                Err(why)
            }
            Ok(Some(slot)) => match self.tls_session(slot, addr, now) {
                Some(tls) => Ok(Some(tls)),
                None => return self.close(key, End::HandshakeFailed, now),
            },
            Ok(None) => Ok(None),
        };
        let (mut ctx, pairs) = self.pair_context(upstream.id, key, now);
        let pair = &mut pairs[key];
        let step = match next {
            Err(why) => Step::Finish(pair.turned_away(why, &mut ctx)),
            Ok(Some((session, deadline))) => pair.start_handshake(session, deadline, &mut ctx),
            Ok(None) => pair.start_connecting(&mut ctx),
        };
        self.after_step(key, step, now);
        self.host_results(&upstream, now);
    }

    /// What a new pair's first step asks for (or an identified pair's:
    /// one whose handshake ended at once may wait for Redis already).
    fn after_step(&mut self, key: usize, step: Step, now: Instant) {
        match step {
            Step::Finish(end) => self.close(key, end, now),
            Step::Continue => {
                let pair = &self.pairs[key];
                if pair.is_admitting() {
                    self.admitting.push((key, pair.id));
                }
                self.schedule(key);
            }
            Step::Again => {
                self.schedule(key);
                let id = self.pairs[key].id;
                self.runnable.push((key, id));
            }
            Step::Queued => self.enqueue(key),
            Step::Identified => self.identified(key, now),
        }
    }

    /// A connection closed before any work on it (at accept, or right
    /// after its PROXY header), logged at most once a second.
    fn dropped(
        &mut self,
        upstream: &Upstream,
        addr: SocketAddr,
        via: Option<SocketAddr>,
        why: &'static str,
        now: Instant,
    ) {
        if let Some(times) = self.drop_log.allow(now) {
            let via = via.map_or(String::new(), |v| format!(" (via {v})"));
            warn!(
                "closing new connections at accept: {addr}{via} on `{}`: {why} ({times} more since the last report)",
                upstream.name
            );
        }
    }

    /// A TLS session for a client holding `slot`, with its handshake's
    /// deadline; `None` (logged) if rustls cannot start one.
    fn tls_session(
        &self,
        slot: HandshakeSlot,
        addr: SocketAddr,
        now: Instant,
    ) -> Option<((Box<TlsSession>, HandshakeSlot), Instant)> {
        let (config, settings) = self.snapshot.tls.as_ref()?;
        match TlsSession::new(config.clone(), self.snapshot.settings.bulk_buffer()) {
            Ok(session) => Some(((session, slot), now + settings.handshake_timeout)),
            Err(e) => {
                warn!("cannot start a TLS session for {addr}: {e}");
                None
            }
        }
    }

    /// How long a PROXY header may take: the handshake timeout (`[tls]`'s,
    /// or its default without `[tls]`).
    fn handshake_timeout(&self) -> Duration {
        self.snapshot
            .tls
            .as_ref()
            .map_or(TlsSettings::DEFAULT_HANDSHAKE_TIMEOUT, |(_, t)| {
                t.handshake_timeout
            })
    }

    /// Why a new connection must be closed at once, before any work on it:
    /// its source is over its rate, or too many handshakes are under way.
    /// On a TLS upstream, the handshake slot it gets otherwise.
    fn turn_away(
        &mut self,
        upstream: &Upstream,
        addr: SocketAddr,
        now: Instant,
    ) -> Result<Option<HandshakeSlot>, &'static str> {
        if let Some(sources) = self.shared.sources().as_mut() {
            if sources.check(addr.ip(), now).is_err() {
                return Err("source_rate_limited");
            }
        }
        let (max, per_source) = match (upstream.tls, &self.snapshot.tls) {
            (true, Some((_, tls))) => (tls.max_handshakes, tls.max_handshakes_per_source),
            _ => return Ok(None),
        };
        match self.shared.capacity.handshake(addr.ip(), max, per_source) {
            Ok(slot) => Ok(Some(slot)),
            Err(true) => Err("source_handshake_capacity"),
            Err(false) if self.make_handshake_room(addr, max, now) => self
                .shared
                .capacity
                .handshake_evicting(addr.ip(), per_source)
                .map(Some)
                .map_err(|_| "handshake_capacity"),
            Err(false) => Err("handshake_capacity"),
        }
    }

    /// Every handshake slot is taken: if `client`'s source has fewer than
    /// its fair share of them (an equal share among the sources that
    /// hold any, itself included), the oldest (slowest) handshake in this
    /// worker of the source furthest over its share makes room. A flood
    /// from a few addresses then cannot keep everyone else from a
    /// handshake, whichever worker its handshakes landed on.
    fn make_handshake_room(&mut self, client: SocketAddr, max: usize, now: Instant) -> bool {
        let over = self.shared.capacity.over_fair_share(client.ip(), max);
        if over.is_empty() {
            return false;
        }
        let victim = self
            .pairs
            .iter()
            .filter(|(_, p)| p.is_handshaking())
            .filter_map(|(key, p)| {
                let held = over.get(&source_key(p.client_addr.ip()))?;
                Some((key, p, *held))
            })
            .min_by_key(|(_, p, held)| (Reverse(*held), p.started))
            .map(|(key, p, _)| (key, p.upstream.id));
        let Some((key, upstream)) = victim else {
            return false;
        };
        self.counters(upstream);
        self.pairs[key].count_silent_refusal(
            "handshake_evicted",
            &mut self.counters[upstream],
            &mut self.support.logs.refusals,
            now,
        );
        self.close(key, End::HandshakeEvicted, now);
        true
    }
}
