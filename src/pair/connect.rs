//! Getting a pair to a host: the least-connections choice, the connect,
//! and failover to the next-best host while connects fail.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use log::warn;
use mio::Interest;

use super::Side;
use super::{Context, HostConn, Pair, RELAY_BUDGET, Refusal, State, Step};
use crate::io::flow::{Flow, NotConnected, pump};
use crate::io::{Connect, Endpoint, net};
use crate::pair::End;
use crate::policy::balance::{Host, HostCounters};

/// Every socket of a pair is registered once, for all it will ever need;
/// PRIORITY reports urgent data, which needs reading past a short read.
pub(crate) const PAIR_INTEREST: Interest = Interest::READABLE
    .add(Interest::WRITABLE)
    .add(Interest::PRIORITY);

impl Pair {
    /// Starts the connect to the best host for a new or just admitted
    /// client, or refuses it when `max_connections` is reached or no host
    /// is there.
    pub(super) fn place(&mut self, ctx: &mut Context<'_>) -> Step {
        let max = ctx.settings.max_connections;
        let Some(slot) = ctx.capacity.connection(max) else {
            if let Some(more) = ctx.logs.overloaded.allow(ctx.now) {
                warn!(
                    "`{}`: max_connections ({max}) reached ({more} more refused since the last report)",
                    self.upstream.name
                );
            }
            return self.refuse_with(ctx, Refusal::Overloaded);
        };
        if self.upstream.balancer.healthy() == 0 {
            return self.refuse_with(ctx, Refusal::NoHealthyHost);
        }
        self.slot = Some(slot);
        self.connect_next(ctx, Vec::new(), Flow::default())
    }

    /// Connects to the best host not in `tried`, moving down the candidates
    /// while connects fail at once; refuses the client when none is left.
    /// `up` is what the client sent before it reset, if it did.
    fn connect_next(
        &mut self,
        ctx: &mut Context<'_>,
        mut tried: Vec<SocketAddr>,
        up: Flow,
    ) -> Step {
        let upstream = self.upstream.clone();
        let refusal = loop {
            let Some(host) = upstream.balancer.pick(&tried, ctx.now) else {
                break Refusal::UpstreamUnavailable;
            };
            let lease = upstream.balancer.acquire(host);
            let addr = lease.host().addr;
            let attempt = net::connect(addr, ctx.settings.socket_buffer).and_then(|stream| {
                net::prepare(&stream);
                let mut endpoint = Endpoint::new(stream);
                endpoint.register(ctx.registry, ctx.host_token, PAIR_INTEREST)?;
                Ok(endpoint)
            });
            match attempt {
                Ok(endpoint) => {
                    let deadline = ctx.now + ctx.settings.connect_timeout;
                    self.transition(ctx.census, |_| State::Connecting {
                        host: HostConn { endpoint, lease },
                        tried,
                        deadline,
                        up,
                    });
                    return Step::Continue;
                }
                Err(e) => {
                    let record = lease.host().clone();
                    drop(lease);
                    if net::is_resource_exhaustion(&e) {
                        // Free pipes give their descriptors back.
                        ctx.pipes.trim(0);
                        warn!("`{}`: cannot open a socket to {addr}: {e}", upstream.name);
                        break Refusal::Overloaded;
                    }
                    connect_failed_log(ctx, &upstream.name, addr, &e);
                    connect_result(ctx, record, false);
                    tried.push(addr);
                }
            }
        };
        let mut up = up;
        up.release(&mut ctx.pools());
        self.slot = None;
        self.refuse_with(ctx, refusal)
    }

    /// A connecting pair's socket changed: see whether the connect is done.
    pub(super) fn check_connect(&mut self, ctx: &mut Context<'_>) -> Step {
        let State::Connecting { host, .. } = &mut self.state else {
            unreachable!("only connecting pairs check their connect");
        };
        match host.endpoint.connect_result() {
            Connect::Pending => self.while_connecting(ctx),
            Connect::Failed(e) => self.connect_failed(ctx, e),
            Connect::Established => {
                let now = ctx.now;
                let record = host.lease.host().clone();
                self.transition(ctx.census, |old| {
                    let State::Connecting { host, up, .. } = old else {
                        unreachable!("checked above");
                    };
                    State::Relaying {
                        host,
                        up,
                        down: Flow::default(),
                        // The idle clock starts now.
                        last_active: now,
                        failed: None,
                    }
                });
                connect_result(ctx, record, true);
                self.relay(ctx)
            }
        }
    }

    /// While the connect is in flight: a client that reset has what it
    /// sent before read into the buffer, to be delivered once the host is
    /// connected. A client that sent nothing is done with at once.
    fn while_connecting(&mut self, ctx: &mut Context<'_>) -> Step {
        let State::Connecting { up, .. } = &mut self.state else {
            unreachable!("only connecting pairs wait for their connect");
        };
        let client = &mut self.client;
        client.endpoint.note_error();
        if !client.endpoint.is_broken() {
            return Step::Continue;
        }
        let budget = RELAY_BUDGET.max(2 * ctx.pool.bulk_size());
        let pools = &mut ctx.pools();
        let _ = match client.tls.as_deref_mut() {
            None => pump(&mut client.endpoint, &mut NotConnected, up, pools, budget),
            Some(tls) => pump(
                &mut tls.side(&mut client.endpoint),
                &mut NotConnected,
                up,
                pools,
                budget,
            ),
        };
        if up.delivered() {
            Step::Finish(End::Reset(Side::Client))
        } else {
            Step::Continue
        }
    }

    /// The connect in flight failed or timed out: give the host back and
    /// move on to the next candidate, or refuse the client when none is left.
    pub(super) fn connect_failed(&mut self, ctx: &mut Context<'_>, e: io::Error) -> Step {
        let mut failed = None;
        self.transition(ctx.census, |old| {
            failed = Some(old);
            State::Moving
        });
        let Some(State::Connecting {
            host,
            mut tried,
            up,
            ..
        }) = failed
        else {
            unreachable!("only connecting pairs fail to connect");
        };
        let record = host.lease.host().clone();
        connect_failed_log(ctx, &self.upstream.name, record.addr, &e);
        // The lease goes with the failed connect's socket.
        drop(host);
        tried.push(record.addr);
        connect_result(ctx, record, false);
        self.connect_next(ctx, tried, up)
    }
}

/// A failed connect, logged at most once a second (a dead host fails
/// every connect until health checks take it down).
fn connect_failed_log(ctx: &mut Context<'_>, upstream: &str, addr: SocketAddr, e: &io::Error) {
    if let Some(more) = ctx.logs.connect_failed.allow(ctx.now) {
        warn!(
            "`{upstream}`: connect to {addr} failed: {e} ({more} more failed connects since the last report)"
        );
    }
}

/// Counts a connect's result and notes it for the host's health.
fn connect_result(ctx: &mut Context<'_>, host: Arc<Host>, ok: bool) {
    let c = &host.counters;
    HostCounters::count(if ok {
        &c.connections
    } else {
        &c.connect_failures
    });
    ctx.host_results.push((host, ok));
}
