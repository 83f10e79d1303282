//! Getting a pair to a host: the least-connections choice, the connect,
//! and failover to the next-best host while connects fail.

use std::io;

use log::warn;
use mio::Interest;

use super::Side;
use super::{Context, HostConn, Pair, RELAY_BUDGET, Refusal, State, Step};
use crate::io::flow::{Flow, NotConnected, pump};
use crate::io::{Connect, Endpoint, net};
use crate::pair::End;
use crate::policy::balance::HostId;

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
        if ctx.census.active() >= ctx.settings.max_connections {
            if let Some(more) = ctx.logs.overloaded.allow(ctx.now) {
                warn!(
                    "`{}`: max_connections ({}) reached ({more} more refused since the last report)",
                    ctx.upstream.name, ctx.settings.max_connections
                );
            }
            return self.refuse_with(ctx, Refusal::Overloaded);
        }
        if ctx.upstream.balancer.healthy() == 0 {
            return self.refuse_with(ctx, Refusal::NoHealthyHost);
        }
        self.connect_next(ctx, Vec::new(), Flow::default())
    }

    /// Connects to the best host not in `tried`, moving down the candidates
    /// while connects fail at once; refuses the client when none is left.
    /// `up` is what the client sent before it reset, if it did.
    fn connect_next(&mut self, ctx: &mut Context<'_>, mut tried: Vec<HostId>, up: Flow) -> Step {
        let refusal = loop {
            let Some(host) = ctx.upstream.balancer.pick(&tried, ctx.now) else {
                break Refusal::UpstreamUnavailable;
            };
            let addr = ctx.upstream.balancer.host(host).addr;
            let lease = ctx.upstream.balancer.acquire(host);
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
                    ctx.upstream.balancer.release(lease);
                    if net::is_resource_exhaustion(&e) {
                        warn!(
                            "`{}`: cannot open a socket to {addr}: {e}",
                            ctx.upstream.name
                        );
                        break Refusal::Overloaded;
                    }
                    connect_failed_log(ctx, addr, &e);
                    self.connect_result(ctx, host, false);
                    tried.push(host);
                }
            }
        };
        let mut up = up;
        up.release(ctx.pool);
        self.refuse_with(ctx, refusal)
    }

    /// Counts a connect's result and notes it for the host's health.
    fn connect_result(&self, ctx: &mut Context<'_>, host: HostId, ok: bool) {
        let counters = &mut ctx.upstream.balancer.host_mut(host).counters;
        if ok {
            counters.connections += 1;
        } else {
            counters.connect_failures += 1;
        }
        ctx.host_results.push((host, ok));
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
                let host_id = host.lease.host();
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
                self.connect_result(ctx, host_id, true);
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
        let _ = match client.tls.as_deref_mut() {
            None => pump(
                &mut client.endpoint,
                &mut NotConnected,
                up,
                ctx.pool,
                budget,
            ),
            Some(tls) => pump(
                &mut tls.side(&mut client.endpoint),
                &mut NotConnected,
                up,
                ctx.pool,
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
        let id = host.lease.host();
        connect_failed_log(ctx, ctx.upstream.balancer.host(id).addr, &e);
        ctx.upstream.balancer.release(host.lease);
        self.connect_result(ctx, id, false);
        tried.push(id);
        self.connect_next(ctx, tried, up)
    }
}

/// A failed connect, logged at most once a second (a dead host fails
/// every connect until health checks take it down).
fn connect_failed_log(ctx: &mut Context<'_>, addr: std::net::SocketAddr, e: &io::Error) {
    if let Some(more) = ctx.logs.connect_failed.allow(ctx.now) {
        warn!(
            "`{}`: connect to {addr} failed: {e} ({more} more failed connects since the last report)",
            ctx.upstream.name
        );
    }
}
