//! Client limits shared by a group of tcplb instances through Redis
//! (`[cluster]`): the cluster thread, which owns the one connection to
//! Redis, and the [`ClusterLink`] the workers reach it through.
//!
//! ```text
//!   worker ── admit: a leased token / a held place? ──yes──> connect (no round trip)
//!     │                        └─no: wait (Admitting, ≤ timeout) + Ask ─┐
//!     │ <── answers counter bumped, waker ─────────────┐                │ demand queue, waker
//!   cluster thread: poll(Redis socket, waker, deadlines)                ▼
//!     EVALSHA share.lua, pipelined, one per identity at a time ──> Redis (one bucket and
//!     answers applied to the identity's share                         one count table per identity)
//! ```
//!
//! The thread is the only one that waits on Redis, and only in its own
//! `mio::Poll` (one non-blocking socket; for `rediss://` a TLS session on
//! it, whose handshake counts as part of the connect): no worker ever blocks on it, and the control thread's
//! work (stats, reloads) never delays it. Its requests are one Lua script
//! (`share.lua`, loaded with `SCRIPT LOAD` at each connect and run with
//! `EVALSHA`) that atomically takes tokens from the identity's bucket and
//! sets this instance's connection count, each count with an expiry that
//! the thread refreshes every third of `connections_expiry`.
//!
//! Redis counts as down when a connect or a request gets no answer within
//! `timeout`, when the connection breaks, or when it answers with an
//! error; the thread then closes the connection, tells the workers (whose
//! waiting connections go to the fallback at once), logs one line, and
//! reconnects after a back-off (100 ms doubling to 5 s, ±25 %), logging
//! at most one line per [`DOWN_LOG_PERIOD`] while it stays down. The
//! `tcplb_cluster_redis_up` gauge shows which.

mod redis;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::{Events, Poll, Token, Waker};

use crate::admin::ClusterStats;
use crate::config::{ClusterSettings, Fallback};
use crate::policy::access::{Ask, ClientState, Query};
use crate::policy::share::{Answer, Mode};
use redis::{Broken, Connection, Reply, TlsClient};

/// The script every request runs.
const SCRIPT: &str = include_str!("share.lua");
/// The first wait before a reconnect; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// While Redis stays down, at most one log line per period.
pub(crate) const DOWN_LOG_PERIOD: Duration = Duration::from_secs(10);
/// More unsent bytes than this, and Redis is not reading: it counts as down.
const MAX_UNSENT: usize = 4 * 1024 * 1024;

/// What a token of the cluster thread's poller names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The waker: demand from a worker, or a stop.
    Waker,
    /// The connection to Redis.
    Redis,
}

impl Source {
    fn token(self) -> Token {
        Token(self as usize)
    }

    fn of(token: Token) -> Option<Source> {
        [Source::Waker, Source::Redis]
            .into_iter()
            .find(|s| s.token() == token)
    }
}

/// Redis as the workers see it.
const CONNECTING: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// What the workers (and the control thread) share with the cluster
/// thread. Touched once per connection that asks Redis for something, and
/// once per loop turn (one atomic load); never per byte.
#[derive(Debug)]
pub(crate) struct ClusterLink {
    /// The longest a connection waits for Redis's answer.
    pub timeout: Duration,
    /// The URL, without its password, for messages.
    url: String,
    state: AtomicU8,
    /// Bumped when answers came for waiting connections, or Redis changed
    /// state: each worker then looks at its waiting connections again.
    answers: AtomicU64,
    /// Identities that want a request, for the thread.
    demand: Mutex<Vec<Arc<ClientState>>>,
    waker: Waker,
    /// The workers' wakers.
    workers: Mutex<Vec<Arc<Waker>>>,
    stop: AtomicBool,
    requests: AtomicU64,
    failures: AtomicU64,
}

impl ClusterLink {
    /// How admissions decide now: shared while Redis answers (or before
    /// the first connect has failed), the fallback while it is down.
    pub fn mode(&self) -> Mode {
        match self.state.load(Ordering::Acquire) {
            DOWN => Mode::Fallback,
            _ => Mode::Shared,
        }
    }

    /// Hands an identity to the thread.
    pub fn ask(&self, ask: Ask) {
        self.demand
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(ask.0);
        let _ = self.waker.wake();
    }

    /// Changes whenever waiting connections should look again.
    pub fn answers(&self) -> u64 {
        self.answers.load(Ordering::Acquire)
    }

    /// A worker's waker, woken when its waiting connections should look again.
    pub fn add_worker(&self, waker: Arc<Waker>) {
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(waker);
    }

    /// What `/metrics` and `/status` show.
    pub fn stats(&self) -> ClusterStats {
        ClusterStats {
            redis: self.url.clone(),
            up: self.state.load(Ordering::Acquire) == UP,
            requests: self.requests.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// Ends the thread (once the workers are done).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }

    /// Tells every worker to look at its waiting connections again.
    fn notify_workers(&self) {
        self.answers.fetch_add(1, Ordering::AcqRel);
        for waker in self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = waker.wake();
        }
    }

    fn set_state(&self, state: u8) -> u8 {
        self.state.swap(state, Ordering::AcqRel)
    }
}

/// The identities of the configuration in force, for the thread.
pub(crate) type States = Box<dyn Fn() -> Vec<Arc<ClientState>> + Send>;
/// The loops' clock, for the thread.
pub(crate) type Clock = Box<dyn Fn() -> Instant + Send>;

/// A command waiting for its reply.
#[derive(Debug)]
enum Sent {
    /// `AUTH`, `SELECT`, `CLIENT SETNAME`: `+OK` expected.
    Hello(&'static str),
    /// `SCRIPT LOAD`: the script's SHA1 expected.
    Load,
    /// `EVALSHA` for an identity's share.
    Share(Arc<ClientState>),
}

#[derive(Debug)]
struct Pending {
    sent: Sent,
    deadline: Instant,
}

/// The connection to Redis, or the wait before the next one.
#[derive(Debug)]
enum Link {
    /// Down (or stopped): the next connect at `retry_at`.
    Idle { retry_at: Instant },
    /// Connecting, saying hello, or serving; `deadline` bounds the connect.
    Open { conn: Connection, deadline: Instant },
}

/// The cluster thread: what it owns.
pub(crate) struct Cluster {
    poll: Poll,
    link: Arc<ClusterLink>,
    settings: ClusterSettings,
    /// With `rediss://`: how each connection speaks TLS.
    tls: Option<TlsClient>,
    /// This instance's name in the count tables: unique per process.
    instance: String,
    /// The script's SHA1, once loaded on this connection: Redis is up.
    script: Option<String>,
    conn: Link,
    pending: VecDeque<Pending>,
    backoff: Duration,
    next_refresh: Option<Instant>,
    /// Failed attempts since the last log line while down, and its time.
    down_log: (Option<Instant>, u64),
    rng: u64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &self.link.url)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The thread's poller and the link to it; the thread starts with
    /// [`spawn`](Self::spawn). `tls` is the client config of a `rediss://`
    /// URL (loaded from the files `settings.tls` names).
    pub fn new(
        settings: &ClusterSettings,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> std::io::Result<(Cluster, Arc<ClusterLink>)> {
        let tls = match tls {
            Some(config) => Some(TlsClient {
                config,
                // The config reader checked that the host is a name or an address.
                name: settings.redis.server_name().ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{}: the host is not a server name", settings.redis),
                    )
                })?,
                trusted: settings.tls.as_ref().map_or("", |t| t.trusted()),
            }),
            None => None,
        };
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), Source::Waker.token())?;
        let link = Arc::new(ClusterLink {
            timeout: settings.timeout,
            url: settings.redis.to_string(),
            state: AtomicU8::new(CONNECTING),
            answers: AtomicU64::new(0),
            demand: Mutex::new(Vec::new()),
            waker,
            workers: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        });
        let (instance, seed) = instance_name();
        let cluster = Cluster {
            poll,
            link: link.clone(),
            settings: settings.clone(),
            tls,
            instance,
            script: None,
            conn: Link::Idle {
                retry_at: Instant::now(),
            },
            pending: VecDeque::new(),
            backoff: BACKOFF_START,
            next_refresh: None,
            down_log: (None, 0),
            rng: seed | 1,
        };
        Ok((cluster, link))
    }

    /// Runs the thread until [`ClusterLink::stop`].
    pub fn spawn(self, states: States, clock: Clock) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("tcplb-cluster".to_string())
            .spawn(move || self.run(&states, &clock))
    }

    fn run(mut self, states: &States, clock: &Clock) {
        info!(
            "cluster: sharing client limits through Redis at {} as `{}` ({} instances expected, fallback {})",
            self.link.url,
            self.instance,
            self.settings.instances,
            self.settings.fallback.name()
        );
        let mut events = Events::with_capacity(64);
        let mut now = clock();
        self.connect(now);
        while !self.link.stop.load(Ordering::Acquire) {
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("cluster: polling failed: {e}; client limits fall back for good");
                break;
            }
            now = clock();
            for event in events.iter() {
                if let (Some(Source::Redis), Link::Open { conn, .. }) =
                    (Source::of(event.token()), &mut self.conn)
                {
                    conn.on_event(event);
                }
            }
            self.turn(now, states);
        }
        if let Link::Open { conn, .. } =
            std::mem::replace(&mut self.conn, Link::Idle { retry_at: now })
        {
            conn.close();
        }
        self.link.set_state(DOWN);
        self.link.notify_workers();
    }

    /// What one loop turn does after the events.
    fn turn(&mut self, now: Instant, states: &States) {
        if let Err(why) = self.progress(now, states) {
            self.down(now, &why);
        }
        if matches!(self.conn, Link::Idle { retry_at } if retry_at <= now) {
            self.connect(now);
        }
        let demand: Vec<Arc<ClientState>> = std::mem::take(
            &mut *self
                .link
                .demand
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if self.script.is_some() {
            for state in demand {
                self.send_share(&state, now);
            }
            if self.next_refresh.is_some_and(|t| t <= now) {
                self.next_refresh = Some(now + self.refresh_every());
                for state in states().into_iter().filter(|s| s.counted()) {
                    self.send_share(&state, now);
                }
            }
        }
        if let Err(why) = self.flush() {
            self.down(now, &why);
        }
        if let Some(why) = self.overdue(now) {
            self.down(now, &why);
        }
    }

    /// The next instant the thread must act without an event.
    fn next_deadline(&self) -> Option<Instant> {
        let mut next = self.pending.front().map(|p| p.deadline);
        let mut earliest = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        match &self.conn {
            Link::Idle { retry_at } => earliest(*retry_at),
            Link::Open { deadline, .. } if self.script.is_none() => earliest(*deadline),
            Link::Open { .. } => {}
        }
        if let Some(refresh) = self.next_refresh.filter(|_| self.script.is_some()) {
            earliest(refresh);
        }
        next
    }

    fn refresh_every(&self) -> Duration {
        self.settings.connections_expiry / 3
    }

    /// Why Redis counts as down now, if an answer is overdue.
    fn overdue(&self, now: Instant) -> Option<String> {
        let timeout = self.settings.timeout;
        if self.pending.front().is_some_and(|p| p.deadline <= now) {
            return Some(format!("no answer within {timeout:?}"));
        }
        match &self.conn {
            Link::Open { deadline, .. } if self.script.is_none() && *deadline <= now => {
                Some(format!("not connected within {timeout:?}"))
            }
            _ => None,
        }
    }

    /// Starts a connect and queues the greeting.
    fn connect(&mut self, now: Instant) {
        let registry = self.poll.registry();
        let tls = self.tls.as_ref();
        match Connection::open(
            self.settings.redis.addr,
            tls,
            registry,
            Source::Redis.token(),
        ) {
            Ok(mut conn) => {
                let deadline = now + self.settings.timeout;
                let redis = &self.settings.redis;
                let mut hello = Vec::new();
                if let Some(password) = &redis.password {
                    let mut args: Vec<&[u8]> = vec![b"AUTH"];
                    if let Some(user) = &redis.username {
                        args.push(user.as_bytes());
                    }
                    args.push(password.as_bytes());
                    conn.queue(&args);
                    hello.push(Sent::Hello("AUTH"));
                }
                if redis.db != 0 {
                    conn.queue(&[b"SELECT", redis.db.to_string().as_bytes()]);
                    hello.push(Sent::Hello("SELECT"));
                }
                let name = format!("tcplb-{}", self.instance.replace([' ', '/'], "-"));
                conn.queue(&[b"CLIENT", b"SETNAME", name.as_bytes()]);
                hello.push(Sent::Hello("CLIENT SETNAME"));
                conn.queue(&[b"SCRIPT", b"LOAD", SCRIPT.as_bytes()]);
                hello.push(Sent::Load);
                self.pending
                    .extend(hello.into_iter().map(|sent| Pending { sent, deadline }));
                self.conn = Link::Open { conn, deadline };
            }
            Err(e) => self.down(now, &format!("cannot connect: {e}")),
        }
    }

    /// Reads replies and writes what is queued, as far as readiness allows.
    fn progress(&mut self, now: Instant, states: &States) -> Result<(), String> {
        let replies = {
            let Link::Open { conn, .. } = &mut self.conn else {
                return Ok(());
            };
            if !conn
                .connected()
                .map_err(|e| format!("cannot connect: {e}"))?
            {
                return Ok(());
            }
            conn.receive().map_err(|e| e.to_string())?
        };
        let mut notify = false;
        for reply in replies {
            let Some(pending) = self.pending.pop_front() else {
                return Err(Broken::Protocol("a reply to no command".into()).to_string());
            };
            match (pending.sent, reply) {
                (Sent::Hello(_), Reply::Status(_)) => {}
                (Sent::Hello(what), Reply::Error(e)) => return Err(format!("{what}: {e}")),
                (Sent::Load, Reply::Bulk(sha)) => {
                    self.script = Some(String::from_utf8_lossy(&sha).into_owned());
                    self.up(now, states);
                }
                (Sent::Load, Reply::Error(e)) => return Err(format!("SCRIPT LOAD: {e}")),
                (Sent::Share(state), Reply::Array(items)) => {
                    let Some(answer) = answer_of(&items) else {
                        return Err(format!("the limits script answered {items:?}"));
                    };
                    if state.apply(answer, now) {
                        self.send_share(&state, now);
                    }
                    notify |= state.has_waiters();
                }
                (Sent::Share(_), Reply::Error(e)) => {
                    return Err(format!("the limits script failed: {e}"));
                }
                (sent, reply) => {
                    return Err(format!("an unexpected reply {reply:?} to {sent:?}"));
                }
            }
        }
        if notify {
            self.link.notify_workers();
        }
        Ok(())
    }

    /// Redis answered the greeting: limits are shared from now on.
    fn up(&mut self, now: Instant, states: &States) {
        let was = self.link.set_state(UP);
        self.backoff = BACKOFF_START;
        self.next_refresh = Some(now + self.refresh_every());
        if was == DOWN {
            let (_, failed) = std::mem::take(&mut self.down_log);
            info!(
                "cluster: Redis at {} answers again ({failed} failed attempts): client limits are shared by the group again",
                self.link.url
            );
        } else {
            info!("cluster: connected to Redis at {}", self.link.url);
        }
        // A new connection may be a new Redis: what this instance holds
        // there is set again, and what it wanted is asked for.
        for state in states() {
            if state.reset() {
                self.send_share(&state, now);
            }
        }
        self.link.notify_workers();
    }

    /// Redis is down (or could not be reached): close, fall back, retry later.
    fn down(&mut self, now: Instant, why: &str) {
        if let Link::Open { conn, .. } =
            std::mem::replace(&mut self.conn, Link::Idle { retry_at: now })
        {
            conn.close();
        }
        for pending in self.pending.drain(..) {
            if let Sent::Share(state) = pending.sent {
                state.failed();
            }
        }
        self.script = None;
        self.next_refresh = None;
        self.link.failures.fetch_add(1, Ordering::Relaxed);
        let wait = self.jittered(self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.conn = Link::Idle {
            retry_at: now + wait,
        };
        let was = self.link.set_state(DOWN);
        let fallback = match self.settings.fallback {
            Fallback::Split => format!(
                "each instance enforces 1/{} of every client limit alone",
                self.settings.instances
            ),
            Fallback::Local => "each instance enforces every client limit alone".to_string(),
            Fallback::Refuse => "clients with a rule are refused".to_string(),
        };
        let url = &self.link.url;
        if was != DOWN {
            warn!(
                "cluster: Redis at {url} is unreachable ({why}): {fallback} until it answers again; reconnecting"
            );
            self.down_log = (Some(now), 0);
            self.link.notify_workers();
            return;
        }
        let (last, failed) = &mut self.down_log;
        *failed += 1;
        if last.is_none_or(|t| now.saturating_duration_since(t) >= DOWN_LOG_PERIOD) {
            *last = Some(now);
            warn!(
                "cluster: Redis at {url} still unreachable ({why}; {failed} failed attempts so far): {fallback}; next attempt in {wait:?}"
            );
        }
    }

    /// Sends the identity's request, if it has one to send.
    fn send_share(&mut self, state: &Arc<ClientState>, now: Instant) {
        let (Some(sha), Link::Open { conn, .. }) = (&self.script, &mut self.conn) else {
            return;
        };
        let Some(query) = state.query(now) else {
            return;
        };
        let prefix = &self.settings.key_prefix;
        let identity = state.identity();
        let keys = [
            format!("{prefix}rate:{identity}"),
            format!("{prefix}conns:{identity}"),
        ];
        let args = share_args(&query, &self.instance, self.settings.connections_expiry);
        let mut command: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), b"2"];
        command.extend(keys.iter().map(|k| k.as_bytes()));
        command.extend(args.iter().map(|a| a.as_bytes()));
        conn.queue(&command);
        self.link.requests.fetch_add(1, Ordering::Relaxed);
        self.pending.push_back(Pending {
            sent: Sent::Share(state.clone()),
            deadline: now + self.settings.timeout,
        });
    }

    fn flush(&mut self) -> Result<(), String> {
        let Link::Open { conn, .. } = &mut self.conn else {
            return Ok(());
        };
        conn.flush().map_err(|e| e.to_string())?;
        if conn.unsent() > MAX_UNSENT {
            return Err(format!("it does not read ({} bytes unsent)", conn.unsent()));
        }
        Ok(())
    }

    /// `wait` ±25 %, so that a group's instances do not reconnect in step.
    fn jittered(&mut self, wait: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let factor = 0.75 + (self.rng % 1000) as f64 / 2000.0;
        wait.mul_f64(factor)
    }
}

/// ARGV of the script for `query` (see `share.lua`).
fn share_args(query: &Query, instance: &str, expiry: Duration) -> [String; 8] {
    let r = &query.request;
    [
        query.rate.to_string(),
        query.burst.to_string(),
        r.want.to_string(),
        instance.to_string(),
        r.active.to_string(),
        r.desired.to_string(),
        query.max.to_string(),
        expiry.as_millis().to_string(),
    ]
}

/// The script's `{granted, wait_ms, held}`.
fn answer_of(items: &[Reply]) -> Option<Answer> {
    let number = |i: usize| match items.get(i) {
        Some(Reply::Integer(n)) => u64::try_from(*n).ok(),
        _ => None,
    };
    if items.len() != 3 {
        return None;
    }
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    Some(Answer {
        granted: clamp(number(0)?),
        wait: Duration::from_millis(number(1)?),
        held: clamp(number(2)?),
    })
}

/// A name for this process in Redis's count tables, and a seed: the host
/// name, the process id and 32 random bits (two processes of one host
/// never share a name, nor a restarted one its predecessor's).
fn instance_name() -> (String, u64) {
    use ring::rand::SecureRandom;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tcplb".to_string());
    let mut random = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut random).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        random = nanos.to_le_bytes();
    }
    let seed = u64::from_le_bytes(random);
    (
        format!("{host}/{}/{:08x}", std::process::id(), seed as u32),
        seed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::share::Request;

    #[test]
    fn tokens_decode() {
        for source in [Source::Waker, Source::Redis] {
            assert_eq!(Source::of(source.token()), Some(source));
        }
        assert_eq!(Source::of(Token(7)), None);
    }

    #[test]
    fn answers_and_arguments() {
        let answer = answer_of(&[Reply::Integer(3), Reply::Integer(40), Reply::Integer(2)]);
        assert_eq!(
            answer,
            Some(Answer {
                granted: 3,
                wait: Duration::from_millis(40),
                held: 2
            })
        );
        assert_eq!(
            answer_of(&[Reply::Integer(-1), Reply::Integer(0), Reply::Integer(0)]),
            None
        );
        assert_eq!(answer_of(&[Reply::Integer(1)]), None);
        assert_eq!(
            answer_of(&[Reply::Nil, Reply::Integer(0), Reply::Integer(0)]),
            None
        );
        let query = Query {
            request: Request {
                want: 2,
                ahead: 1,
                active: 1,
                capped: true,
                desired: 3,
                sent: Instant::now(),
            },
            rate: 0.5,
            burst: 20,
            max: 100,
        };
        assert_eq!(
            share_args(&query, "h/1/ab", Duration::from_secs(30)),
            ["0.5", "20", "2", "h/1/ab", "1", "3", "100", "30000"]
        );
        let (a, _) = instance_name();
        let (b, _) = instance_name();
        assert_ne!(a, b);
        assert!(a.contains(&format!("/{}/", std::process::id())), "{a}");
    }
}
