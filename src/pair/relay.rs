//! Relaying, and what happens around a reset.
//!
//! A side that resets is not passed on at once: the kernel still holds
//! what that side sent before, readable ahead of the error. The direction
//! toward the broken side is over (its bytes cannot arrive; what the other
//! side still sends is read and dropped), the direction from it goes on
//! until everything it sent is handed to the other side, and only then is
//! the reset passed on: once the receiver has acknowledged those bytes
//! ([`State::Resetting`]), since closing with `SO_LINGER` 0 throws away
//! whatever is still in the send queue.

use std::time::{Duration, Instant};

use log::warn;

use super::Side;
use super::{Context, End, Pair, RELAY_BUDGET, State, Step};
use crate::io::Endpoint;
use crate::io::endpoint::Fault;
use crate::io::flow::{Flow, Pools, Pumped, pump};

/// How soon a pair passing a reset on first looks again at what the
/// receiver has not acknowledged, and the longest interval between looks
/// (the interval doubles): an ACK on loopback takes microseconds, a
/// delayed one 40 ms, one across a network a round trip.
const RESET_CHECK_FIRST: Duration = Duration::from_millis(1);
const RESET_CHECK_MAX: Duration = Duration::from_millis(50);

/// A pair waiting for the receiver of a reset to acknowledge its last bytes.
#[derive(Debug)]
pub(super) struct ResetWait {
    /// Bytes the receiver had not acknowledged at the last look.
    pub unacked: u32,
    /// When to look again, and the interval after that.
    check: Instant,
    every: Duration,
    /// When to give up; pushed back while `unacked` falls.
    until: Instant,
    /// What the relay delivered each way, for the access line.
    pub bytes: (u64, u64),
}

impl ResetWait {
    pub fn deadline(&self) -> Instant {
        self.check.min(self.until)
    }
}

impl Pair {
    /// Moves bytes both ways as far as readiness, buffer room and the
    /// per-turn budget allow; passes a reset on once what the reset side
    /// sent is delivered.
    pub(super) fn relay(&mut self, ctx: &mut Context<'_>) -> Step {
        let now = ctx.now;
        let State::Relaying {
            host,
            up,
            down,
            last_active,
            failed,
        } = &mut self.state
        else {
            unreachable!("only relaying pairs relay");
        };
        let client = &mut self.client;
        client.endpoint.note_error();
        host.endpoint.note_error();
        let broken = |c: &Endpoint, h: &Endpoint| (c.is_broken(), h.is_broken());
        let broken_before = broken(&client.endpoint, &host.endpoint);
        let (moved_up, moved_down) = pump_both(client, &mut host.endpoint, up, down, ctx);
        if moved_up.moved || moved_down.moved {
            *last_active = now;
        }
        let now_broken = broken(&client.endpoint, &host.endpoint);
        for (side, is_broken) in [(Side::Client, now_broken.0), (Side::Host, now_broken.1)] {
            if is_broken {
                failed.get_or_insert(side);
            }
        }
        let tls_flushed = client.tls.as_ref().is_none_or(|t| !t.wants_write());
        let finished = match now_broken {
            (false, false) => up.done && down.done,
            (true, true) => true,
            (true, false) => up.delivered(),
            (false, true) => down.delivered() && tls_flushed,
        };
        if finished {
            return match *failed {
                None => Step::Finish(End::Closed),
                Some(side) => {
                    let end = self.failure_end(side);
                    self.pass_reset_on(ctx, end)
                }
            };
        }
        // A failure found by one direction's pump after the other had run:
        // that one must look again, and no event may come for it.
        if moved_up.exhausted || moved_down.exhausted || broken_before != now_broken {
            Step::Again
        } else {
            Step::Continue
        }
    }

    /// A relaying pair's deadline passed: idle, half-closed, or a reset
    /// whose bytes did not all reach the other side in time.
    pub(super) fn relay_expired(&mut self, ctx: &mut Context<'_>) -> Step {
        let State::Relaying {
            host,
            up,
            down,
            failed,
            ..
        } = &mut self.state
        else {
            unreachable!("only relaying pairs expire as such");
        };
        if let Some(side) = *failed {
            let (toward, receiver) = match side {
                Side::Client => (&*up, &host.endpoint),
                Side::Host => (&*down, &self.client.endpoint),
            };
            let queued = if receiver.is_broken() {
                0
            } else {
                receiver.unacked(ctx.send_queues).unwrap_or(0)
            };
            let held = toward.in_flight() as u64;
            ctx.counters.count_undelivered(held + u64::from(queued));
            return Step::Finish(self.failure_end(side));
        }
        Step::Finish(if up.eof || down.eof {
            End::HalfCloseTimeout
        } else {
            End::IdleTimeout
        })
    }

    /// How the pair ends when `side` broke: a reset, or a cut TLS stream.
    fn failure_end(&self, side: Side) -> End {
        match (side, self.client.endpoint.fault()) {
            (Side::Client, Some(Fault::Truncated)) => End::Truncated,
            _ => End::Reset(side),
        }
    }

    /// The bytes of the side that broke (`end` says which) are all handed
    /// to the other side: pass the reset on now if the receiver has
    /// acknowledged them, or wait until it has.
    fn pass_reset_on(&mut self, ctx: &mut Context<'_>, end: End) -> Step {
        let reset = end.broken_side().expect("a broken side's end");
        let unacked = match self.endpoint(reset.other()).filter(|r| !r.is_broken()) {
            None => 0,
            Some(receiver) => match receiver.unacked(ctx.send_queues) {
                Ok(n) => n,
                Err(e) => {
                    if let Some(more) = ctx.logs.send_queue.allow(ctx.now) {
                        warn!(
                            "cannot read a socket's send queue ({e}): resets are passed on at once, \
                             which may cut off bytes in flight ({more} more since the last report)"
                        );
                    }
                    0
                }
            },
        };
        if unacked == 0 {
            return Step::Finish(end);
        }
        let (now, until) = (ctx.now, ctx.now + ctx.settings.half_close_timeout);
        let mut pools = Pools::new(ctx.pool, ctx.pipes);
        self.transition(ctx.census, |old| {
            let State::Relaying {
                host,
                mut up,
                mut down,
                ..
            } = old
            else {
                unreachable!("only relaying pairs pass a reset on");
            };
            let bytes = (up.bytes, down.bytes);
            up.release(&mut pools);
            down.release(&mut pools);
            // The host's count is given back now: its connection is over.
            let host_record = host.lease.host().clone();
            State::Resetting {
                host: host.endpoint,
                host_record,
                end,
                wait: ResetWait {
                    unacked,
                    check: now + RESET_CHECK_FIRST,
                    every: RESET_CHECK_FIRST,
                    until,
                    bytes,
                },
            }
        });
        // A pair passing a reset on counts against its client rule no more.
        self.client.lease = None;
        Step::Continue
    }

    /// While waiting to pass a reset on: drops what the receiver still
    /// sends, so that it keeps reading (and acknowledging) what it was sent.
    pub(super) fn drain_while_resetting(&mut self, ctx: &mut Context<'_>) -> Step {
        let State::Resetting { host, end, .. } = &mut self.state else {
            unreachable!("only resetting pairs drain");
        };
        let reset = end.broken_side().expect("a broken side's end");
        // The flows are over: what the reset side sent is delivered, and
        // what the receiver sends is drained toward the broken side.
        let (mut up, mut down) = match reset {
            Side::Client => (Flow::failed_and_delivered(), Flow::default()),
            Side::Host => (Flow::default(), Flow::failed_and_delivered()),
        };
        let (a, b) = pump_both(&mut self.client, host, &mut up, &mut down, ctx);
        if a.exhausted || b.exhausted {
            Step::Again
        } else {
            Step::Continue
        }
    }

    /// A resetting pair is due: pass the reset on once the receiver has
    /// acknowledged everything, or when its time is up.
    pub(super) fn check_reset(&mut self, ctx: &mut Context<'_>) -> Step {
        let State::Resetting {
            host, end, wait, ..
        } = &mut self.state
        else {
            unreachable!("only resetting pairs check the receiver");
        };
        let receiver = match end.broken_side().expect("a broken side's end") {
            Side::Client => &*host,
            Side::Host => &self.client.endpoint,
        };
        let left = receiver.unacked(ctx.send_queues).unwrap_or(0);
        if left < wait.unacked {
            wait.until = ctx.now + ctx.settings.half_close_timeout;
        }
        wait.unacked = left;
        if left == 0 || ctx.now >= wait.until {
            return Step::Finish(*end);
        }
        wait.every = (wait.every * 2).min(RESET_CHECK_MAX);
        wait.check = ctx.now + wait.every;
        Step::Continue
    }
}

/// One pump each way, within the per-turn budget. A failing sink marks
/// its endpoint broken, which the caller reads; toward a broken side the
/// pump only drains. Spliced bytes are counted here, as they move.
fn pump_both(
    client: &mut super::Client,
    host: &mut Endpoint,
    up: &mut Flow,
    down: &mut Flow,
    ctx: &mut Context<'_>,
) -> (Pumped, Pumped) {
    let budget = RELAY_BUDGET.max(2 * ctx.pool.bulk_size());
    let pools = &mut Pools::new(ctx.pool, ctx.pipes);
    let ep = &mut client.endpoint;
    let (a, b, spliced) = match client.tls.as_deref_mut() {
        None => {
            let a = pump(ep, host, up, pools, budget);
            let spliced_up = std::mem::take(&mut pools.spliced);
            let b = pump(host, ep, down, pools, budget);
            (a, b, (spliced_up, pools.spliced))
        }
        Some(tls) => {
            // Records may wait regardless of the flows (handshake tail,
            // alerts, a close_notify whose FIN is still to come). A
            // failure marks the client broken, which the flows see.
            let _ = tls.flush(ep);
            let a = pump(&mut tls.side(ep), host, up, pools, budget);
            let b = pump(host, &mut tls.side(ep), down, pools, budget);
            // Reading may have queued records of its own (alerts, key
            // updates) that no later event would send.
            let _ = tls.flush(ep);
            // Plaintext is never spliced.
            (a, b, (0, 0))
        }
    };
    ctx.counters.spliced_up += spliced.0;
    ctx.counters.spliced_down += spliced.1;
    (a.unwrap_or(Pumped::NOTHING), b.unwrap_or(Pumped::NOTHING))
}
