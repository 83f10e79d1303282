//! Turning a client away, the way its upstream's `refusal` says: by
//! default one line saying why (over TLS: the line, then `close_notify`),
//! FIN, then reading and dropping what the client still sends until it
//! finishes, so that closing does not turn into a reset that could destroy
//! the line before it is read. `close` does the same without the line;
//! `reset` closes at once with RST. Every refusal is logged and counted
//! by its code whichever way the client is told.

use log::info;

use super::{Context, End, Pair, REFUSAL_LINGER, REFUSING_CAP, Refusal, State, Step};
use crate::config::RefusalMode;
use crate::io::endpoint::Discarded;
use crate::io::flow::{Sink, Source};

/// Bytes of a refused client's input read and dropped before giving up on a
/// graceful close; reading them keeps the kernel from answering with RST
/// (which could destroy the error line before the client reads it).
const DISCARD_LIMIT: usize = 64 * 1024;

/// How far a refusal has got.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// No line: only FIN (over TLS: `close_notify`, then FIN).
    silent: bool,
    /// The line (and over TLS `close_notify`) is queued into the session.
    queued: bool,
    /// Bytes of the line written to a plain socket.
    written: usize,
    /// The client's write side is shut (after the line, and `close_notify`).
    shut: bool,
    /// The client has finished sending: nothing more to read and drop.
    input_done: bool,
    discarded: usize,
}

impl Pair {
    /// Refuses the client: logs and counts it once, gives back its client
    /// count, and tells the client as its upstream's `refusal` says.
    pub(super) fn refuse_with(&mut self, ctx: &mut Context<'_>, refusal: Refusal) -> Step {
        self.unlogged = !ctx.logs.refusals.allow(refusal.code(), ctx.now);
        if !self.unlogged {
            let fingerprint = self
                .client
                .tls
                .as_ref()
                .and_then(|t| t.peer_certificate())
                .map(crate::tls::fingerprint);
            info!(
                "{} `{}` refused: {} identity={} cert_sha256={}",
                self.client_addr,
                self.upstream.name,
                refusal.code(),
                self.identity.as_deref().unwrap_or("-"),
                fingerprint.as_deref().unwrap_or("-"),
            );
        }
        ctx.counters.count_refusal(refusal.code());
        // A refused client holds no place in its rule's count, nor a host.
        self.release_client(ctx);
        self.slot = None;
        let silent = match self.upstream.refusal {
            RefusalMode::Line => false,
            RefusalMode::Close => true,
            RefusalMode::Reset => {
                // Decided here, not at close: a reload may change the mode.
                self.client.endpoint.abort();
                return Step::Finish(End::Refused(refusal));
            }
        };
        let deadline = ctx.now + REFUSAL_LINGER;
        self.transition(ctx.census, |_| State::Refusing {
            refusal,
            progress: Progress {
                silent,
                ..Progress::default()
            },
            deadline,
        });
        // A fresh socket can take a short line: try now rather than a turn later.
        self.client.endpoint.assume_writable();
        let step = self.refuse(ctx);
        if ctx.census.refusing() > REFUSING_CAP {
            // Too many lingering refusals already: said once, and closed.
            return Step::Finish(End::Refused(refusal));
        }
        step
    }

    /// Sends what is left of the line (if it says one), then reads and
    /// drops the client's input until it finishes.
    pub(super) fn refuse(&mut self, _ctx: &mut Context<'_>) -> Step {
        let State::Refusing {
            refusal, progress, ..
        } = &mut self.state
        else {
            unreachable!("only refusing pairs refuse");
        };
        let end = Step::Finish(End::Refused(*refusal));
        let line = if progress.silent {
            String::new()
        } else {
            refusal.line()
        };
        let client = &mut self.client;
        let ep = &mut client.endpoint;
        let sent = match client.tls.as_deref_mut() {
            Some(tls) => {
                if !progress.queued {
                    tls.queue_last_words(line.as_bytes());
                    progress.queued = true;
                }
                tls.flush(ep).map(|_| !tls.wants_write())
            }
            None => ep.write_out(line.as_bytes(), &mut progress.written),
        };
        match sent {
            Err(_) => return end,
            Ok(true) if !progress.shut => {
                progress.shut = true;
                if ep.shutdown_write().is_err() {
                    return end;
                }
            }
            Ok(_) => {}
        }
        while !progress.input_done {
            let got = match client.tls.as_deref_mut() {
                Some(tls) => tls.discard(ep),
                None => ep.discard(),
            };
            match got {
                Discarded::Bytes(n) => {
                    progress.discarded += n;
                    if progress.discarded > DISCARD_LIMIT {
                        return end;
                    }
                }
                Discarded::WouldBlock => return Step::Continue,
                // A client that stopped sending may still be reading the line.
                Discarded::End => progress.input_done = true,
            }
        }
        // Done once the line is out and the client has finished.
        if progress.shut { end } else { Step::Continue }
    }
}
