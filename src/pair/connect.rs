//! Getting a pair to a host: the least-connections choice, the connect,
//! failover to the next-best host while connects fail, and waiting in
//! the upstream's queue while every host is at its cap.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use log::warn;
use mio::Interest;

use super::Side;
use super::{Context, HostConn, Pair, RELAY_BUDGET, Refusal, State, Step};
use crate::io::flow::{Flow, NotConnected, Sink, pump};
use crate::io::{Connect, Endpoint, net};
use crate::pair::End;
use crate::policy::balance::{Host, HostCounters, HostLease, NoHost};
use crate::proxy_header::{self, Version};

/// Every socket of a pair is registered once, for all it will ever need;
/// PRIORITY reports urgent data, which needs reading past a short read.
pub(crate) const PAIR_INTEREST: Interest = Interest::READABLE
    .add(Interest::WRITABLE)
    .add(Interest::PRIORITY);

impl Pair {
    /// Starts the connect to the best host for a new or just admitted
    /// client, or refuses it when `max_connections` is reached or no host
    /// is there.
    /// `up` holds what the client sent before (after a PROXY header).
    pub(super) fn place(&mut self, ctx: &mut Context<'_>, mut up: Flow) -> Step {
        let max = ctx.settings.max_connections;
        let Some(slot) = ctx.capacity.connection(max) else {
            up.release(&mut ctx.pools());
            if let Some(more) = ctx.logs.overloaded.allow(ctx.now) {
                warn!(
                    "`{}`: max_connections ({max}) reached ({more} more refused since the last report)",
                    self.upstream.name
                );
            }
            return self.refuse_with(ctx, Refusal::Overloaded);
        };
        if self.upstream.balancer.healthy() == 0 {
            up.release(&mut ctx.pools());
            return self.refuse_with(ctx, Refusal::NoHealthyHost);
        }
        self.slot = Some(slot);
        // Clients already waiting in this worker go first: a new one
        // joins the line behind them (the loop retries it in order).
        if self.upstream.balancer.queue().waiting_in(ctx.worker) > 0 {
            match self.enqueue(ctx, Vec::new(), up) {
                Ok(step) => return step,
                Err((_, back)) => up = back,
            }
        }
        self.connect_next(ctx, Vec::new(), up)
    }

    /// Puts the pair in its upstream's queue, if the upstream lets clients
    /// wait (`queue_timeout` above zero) and `max_queued` is not reached;
    /// otherwise gives `tried` and `up` back.
    fn enqueue(
        &mut self,
        ctx: &mut Context<'_>,
        tried: Vec<SocketAddr>,
        up: Flow,
    ) -> Result<Step, (Vec<SocketAddr>, Flow)> {
        let (timeout, max) = self.upstream.queue_limits(ctx.settings);
        if timeout.is_zero() {
            return Err((tried, up));
        }
        let Some(ticket) = self.upstream.balancer.queue().join(ctx.worker, max) else {
            return Err((tried, up));
        };
        let now = ctx.now;
        self.transition(ctx.census, |_| State::Queued {
            _ticket: ticket,
            since: now,
            deadline: now + timeout,
            tried,
            up,
        });
        Ok(Step::Queued)
    }

    /// A slot may have freed: a queued pair takes a lease if one is there
    /// now and connects, or keeps its place (`Step::Continue`). Called by
    /// the loop for the first of its queue, in order.
    pub fn retry_queued(&mut self, ctx: &mut Context<'_>) -> Step {
        let State::Queued { tried, .. } = &self.state else {
            return Step::Continue;
        };
        let lease = match self.upstream.balancer.lease(tried, ctx.now) {
            Err(NoHost::Full) => return Step::Continue,
            Ok(lease) => Some(lease),
            // Its hosts went down or were removed while it waited.
            Err(NoHost::Unavailable) => None,
        };
        let mut queued = None;
        self.transition(ctx.census, |old| {
            queued = Some(old);
            State::Moving
        });
        let Some(State::Queued {
            since, tried, up, ..
        }) = queued
        else {
            unreachable!("checked above");
        };
        ctx.counters
            .queue_waits
            .observe(ctx.now.saturating_duration_since(since));
        let step = match lease {
            Some(lease) => self.connect_to(ctx, lease, tried, up),
            None => {
                let mut up = up;
                up.release(&mut ctx.pools());
                self.slot = None;
                let refusal = if self.upstream.balancer.healthy() == 0 {
                    Refusal::NoHealthyHost
                } else {
                    Refusal::UpstreamUnavailable
                };
                self.refuse_with(ctx, refusal)
            }
        };
        // A connect that failed at once and found every host full again
        // queues anew: it keeps its place at the front of the line.
        if step == Step::Queued {
            Step::Continue
        } else {
            step
        }
    }

    /// The queued pair's `queue_timeout` ran out: `ERROR overloaded`.
    pub(super) fn queue_timed_out(&mut self, ctx: &mut Context<'_>) -> Step {
        let State::Queued { since, up, .. } = &mut self.state else {
            unreachable!("only queued pairs time out in the queue");
        };
        ctx.counters
            .queue_waits
            .observe(ctx.now.saturating_duration_since(*since));
        up.release(&mut ctx.pools());
        self.slot = None;
        self.refuse_with(ctx, Refusal::Overloaded)
    }

    /// Connects to the best host not in `tried`, moving down the candidates
    /// while connects fail at once; refuses the client when none is left.
    /// `up` is what the client sent before it reset, if it did.
    fn connect_next(
        &mut self,
        ctx: &mut Context<'_>,
        mut tried: Vec<SocketAddr>,
        mut up: Flow,
    ) -> Step {
        let refusal = loop {
            let lease = match self.upstream.balancer.lease(&tried, ctx.now) {
                Ok(lease) => lease,
                Err(NoHost::Unavailable) => break Refusal::UpstreamUnavailable,
                // Every host left is at its `max_connections`: wait for a
                // slot if the upstream lets clients wait.
                Err(NoHost::Full) => match self.enqueue(ctx, tried, up) {
                    Ok(step) => return step,
                    Err((_, back)) => {
                        up = back;
                        break Refusal::Overloaded;
                    }
                },
            };
            match self.start_connect(ctx, lease, &mut tried) {
                Ok(host) => return self.await_connect(ctx, host, tried, up),
                Err(Some(refusal)) => break refusal,
                Err(None) => {}
            }
        };
        up.release(&mut ctx.pools());
        self.slot = None;
        self.refuse_with(ctx, refusal)
    }

    /// [`connect_next`](Self::connect_next), starting with a lease already taken.
    fn connect_to(
        &mut self,
        ctx: &mut Context<'_>,
        lease: HostLease,
        mut tried: Vec<SocketAddr>,
        mut up: Flow,
    ) -> Step {
        match self.start_connect(ctx, lease, &mut tried) {
            Ok(host) => self.await_connect(ctx, host, tried, up),
            Err(None) => self.connect_next(ctx, tried, up),
            Err(Some(refusal)) => {
                up.release(&mut ctx.pools());
                self.slot = None;
                self.refuse_with(ctx, refusal)
            }
        }
    }

    /// Starts the non-blocking connect to the host of `lease`. When it
    /// fails at once, the host is logged, counted, added to `tried` and
    /// its lease given back (`Err(None)`: try the next one), or, when the
    /// process is out of descriptors, the client is to be refused
    /// (`Err(Some(Overloaded))`).
    fn start_connect(
        &mut self,
        ctx: &mut Context<'_>,
        lease: HostLease,
        tried: &mut Vec<SocketAddr>,
    ) -> Result<HostConn, Option<Refusal>> {
        let addr = lease.host().addr;
        let attempt = net::connect(addr, net::Tuning::of(ctx.settings)).and_then(|stream| {
            net::prepare(&stream, ctx.settings.keepalive.as_ref());
            let mut endpoint = Endpoint::new(stream);
            endpoint.register(ctx.registry, ctx.host_token, PAIR_INTEREST)?;
            Ok(endpoint)
        });
        match attempt {
            Ok(endpoint) => Ok(HostConn { endpoint, lease }),
            Err(e) => {
                let record = lease.host().clone();
                drop(lease);
                if net::is_resource_exhaustion(&e) {
                    // Free pipes give their descriptors back.
                    ctx.pipes.trim(0);
                    warn!(
                        "`{}`: cannot open a socket to {addr}: {e}",
                        self.upstream.name
                    );
                    return Err(Some(Refusal::Overloaded));
                }
                connect_failed_log(ctx, &self.upstream.name, addr, &e);
                connect_result(ctx, record, false);
                tried.push(addr);
                Err(None)
            }
        }
    }

    /// The connect to `host` is under way.
    fn await_connect(
        &mut self,
        ctx: &mut Context<'_>,
        host: HostConn,
        tried: Vec<SocketAddr>,
        up: Flow,
    ) -> Step {
        let deadline = ctx.now + ctx.settings.connect_timeout;
        self.transition(ctx.census, |_| State::Connecting {
            host,
            tried,
            deadline,
            up,
        });
        Step::Continue
    }

    /// A connecting pair's socket changed: see whether the connect is done.
    pub(super) fn check_connect(&mut self, ctx: &mut Context<'_>) -> Step {
        let State::Connecting { host, .. } = &mut self.state else {
            unreachable!("only connecting pairs check their connect");
        };
        match host.endpoint.connect_result() {
            Connect::Pending => self.while_waiting(ctx),
            Connect::Failed(e) => self.connect_failed(ctx, e),
            Connect::Established => match self.upstream.send_proxy {
                None => self.start_relaying(ctx),
                Some(version) => {
                    let header = self.proxy_header(version);
                    self.transition(ctx.census, |old| {
                        let State::Connecting {
                            host,
                            tried,
                            deadline,
                            up,
                        } = old
                        else {
                            unreachable!("checked above");
                        };
                        State::SendingHeader {
                            host,
                            tried,
                            deadline,
                            up,
                            header,
                            sent: 0,
                        }
                    });
                    self.send_header(ctx)
                }
            },
        }
    }

    /// Writes what is left of the PROXY header to the host; once it is
    /// all out, the relay starts. A host that fails to take it is a failed
    /// connect: nothing of the client's has gone to it yet.
    pub(super) fn send_header(&mut self, ctx: &mut Context<'_>) -> Step {
        let State::SendingHeader {
            host, header, sent, ..
        } = &mut self.state
        else {
            unreachable!("only pairs sending a header send one");
        };
        host.endpoint.note_error();
        match host.endpoint.write_out(header, sent) {
            Ok(true) => self.start_relaying(ctx),
            Ok(false) => self.while_waiting(ctx),
            Err(e) => self.connect_failed(ctx, e),
        }
    }

    /// The host is ready for the client's bytes: relay, counting the
    /// connect as a success for the host's health.
    fn start_relaying(&mut self, ctx: &mut Context<'_>) -> Step {
        let now = ctx.now;
        let mut record = None;
        self.transition(ctx.census, |old| {
            let (State::Connecting { host, up, .. } | State::SendingHeader { host, up, .. }) = old
            else {
                unreachable!("only a connected pair starts relaying");
            };
            record = Some(host.lease.host().clone());
            State::Relaying {
                host,
                up,
                down: Flow::default(),
                // The idle clock starts now.
                last_active: now,
                failed: None,
            }
        });
        if let Some(record) = record {
            connect_result(ctx, record, true);
        }
        self.relay(ctx)
    }

    /// The PROXY header that tells the host about this client: its address
    /// and the one it connected to, and over TLS what was verified (v2).
    fn proxy_header(&self, version: Version) -> Box<[u8]> {
        let destination = self
            .proxied
            .as_ref()
            .map(|p| p.destination)
            .or_else(|| self.client.endpoint.local_addr().ok())
            .unwrap_or_else(|| {
                let any = match self.client_addr {
                    SocketAddr::V4(_) => IpAddr::from(Ipv4Addr::UNSPECIFIED),
                    SocketAddr::V6(_) => IpAddr::from(Ipv6Addr::UNSPECIFIED),
                };
                SocketAddr::new(any, 0)
            });
        let tls = self.client.tls.as_deref().map(|session| proxy_header::Tls {
            version: session.version_name().unwrap_or("TLS"),
            identity: self.identity.as_deref(),
            authority: session.server_name(),
        });
        proxy_header::encode(version, self.client_addr, destination, tls.as_ref()).into()
    }

    /// While the connect is in flight (or its PROXY header being
    /// written), or the pair waits in the queue: a client that reset has
    /// what it sent before read into the buffer, to be delivered once the
    /// host is connected. A client that sent nothing is done with at once.
    pub(super) fn while_waiting(&mut self, ctx: &mut Context<'_>) -> Step {
        let (State::Connecting { up, .. }
        | State::SendingHeader { up, .. }
        | State::Queued { up, .. }) = &mut self.state
        else {
            unreachable!("only connecting, header-sending and queued pairs wait without a relay");
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
        let Some(
            State::Connecting {
                host,
                mut tried,
                up,
                ..
            }
            | State::SendingHeader {
                host,
                mut tried,
                up,
                ..
            },
        ) = failed
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
