//! Hosts given by name follow DNS. Every `resolve_interval` (on the
//! shared clock, so a test moves it with `advance_clock`) the control
//! thread hands a round of lookups, each distinct name once, to the
//! resolver thread, which looks them up (blocking, bounded; see `dns`) and
//! sends the answers back through the control thread's channel and waker.
//! The next round is due one interval after the answers came, so rounds
//! never overlap; no worker ever waits on DNS.
//!
//! An answer changes a name's addresses; every address is a host. The
//! upstreams whose hosts changed are rebuilt as a reload rebuilds them
//! (`Control::rehost`, `Control::put_in_force`): an address that joins is
//! a new host (ramping in when `slow_start` is set, checked when checks
//! are active), one that left is retired and its pairs drain for
//! `drain_timeout`, the others keep their records. A lookup that fails or
//! finds nothing keeps the addresses the name had (per family: a failed
//! AAAA query keeps the IPv6 ones), and is logged once, when the name
//! starts failing, and once more when it resolves again. An address that
//! is the upstream's own listen address is never a host (tcplb would
//! connect to itself), logged once too.
//!
//! A reload reads the names afresh (the config walk looks them up); a name
//! that does not resolve then keeps the addresses it had, and an answer
//! to a round asked before the reload is dropped.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use log::{info, warn};

use super::control::{Command, Control, Handle};
use super::shared::Snapshot;
use crate::config::{Config, UpstreamConfig, loops_back};
use crate::dns::{Lookup, Resolver};
use crate::upstream::Upstream;

/// One round of lookups, for the resolver thread.
#[derive(Debug)]
struct Round {
    generation: u64,
    resolver: Resolver,
    /// Each name once, lowercase.
    names: Vec<String>,
}

/// What a round found, for the control thread.
#[derive(Debug)]
pub(super) struct Answers {
    generation: u64,
    found: Vec<(String, Lookup)>,
}

/// The names the control thread follows, and where their lookups stand.
#[derive(Debug, Default)]
pub(super) struct Names {
    /// Each upstream that has hosts given by name, by id, as configured,
    /// with the addresses its names resolve to now.
    followed: Vec<(usize, UpstreamConfig)>,
    /// Names (lowercase) whose last lookup failed or found nothing: logged
    /// when they started failing, and again once they resolve.
    failing: HashSet<String>,
    /// Addresses left out for being their upstream's own listen address
    /// (logged once).
    looping: HashSet<SocketAddr>,
    /// When the next round is due; `None` while one is out, or when
    /// nothing is followed.
    next: Option<Instant>,
    interval: Duration,
    /// Bumped whenever the followed names are replaced: answers to an
    /// older round are dropped.
    generation: u64,
    /// The resolver thread's queue, once it runs.
    rounds: Option<Sender<Round>>,
}

impl Names {
    /// Follows `followed` (upstream id, config) from `now`, every
    /// `interval` (zero: not at all). The names in `unresolved` did not
    /// resolve as the config was read, and said so in its warnings.
    pub fn follow(
        &mut self,
        followed: Vec<(usize, UpstreamConfig)>,
        unresolved: HashSet<String>,
        interval: Duration,
        now: Instant,
    ) {
        self.followed = followed;
        self.failing = unresolved;
        self.looping.clear();
        self.interval = interval;
        self.generation += 1;
        self.next = (!interval.is_zero() && !self.followed.is_empty()).then(|| now + interval);
    }

    /// The names of `config`'s upstreams that did not resolve as it was
    /// read, each given the addresses it had before in the upstream of the
    /// same name (the last good set); their names, lowercase.
    pub fn carry_over(&self, config: &mut Config) -> HashSet<String> {
        let mut unresolved = HashSet::new();
        for u in &mut config.upstreams {
            let before = self
                .followed
                .iter()
                .find(|(_, f)| f.name == u.name)
                .map(|(_, f)| f);
            for name in u.names.iter_mut().filter(|n| n.addrs.is_empty()) {
                unresolved.insert(name.name.to_ascii_lowercase());
                let had = before
                    .into_iter()
                    .flat_map(|f| &f.names)
                    .find(|n| n.port == name.port && n.name.eq_ignore_ascii_case(&name.name));
                if let Some(had) = had {
                    name.addrs = had.addrs.clone();
                }
            }
        }
        unresolved
    }

    /// When the next round is due, if one is.
    pub fn next_due(&self) -> Option<Instant> {
        self.next
    }

    /// The round due at `now`, if one is; none is due again until its
    /// answers come.
    fn due(&mut self, now: Instant, resolver: Resolver) -> Option<Round> {
        if self.next.is_none_or(|at| at > now) {
            return None;
        }
        self.next = None;
        let mut names: Vec<String> = self
            .followed
            .iter()
            .flat_map(|(_, u)| &u.names)
            .map(|n| n.name.to_ascii_lowercase())
            .collect();
        names.sort();
        names.dedup();
        Some(Round {
            generation: self.generation,
            resolver,
            names,
        })
    }

    /// Takes a round's answers; the followed upstreams whose hosts they
    /// changed. `listen_of` gives an upstream's bound address.
    fn apply(
        &mut self,
        found: &[(String, Lookup)],
        listen_of: impl Fn(usize) -> Option<SocketAddr>,
    ) -> Vec<usize> {
        let mut changed = Vec::new();
        for (name, lookup) in found {
            self.log_outcome(name, lookup);
            for (id, u) in &mut self.followed {
                let listen = listen_of(*id);
                for host in u.names.iter_mut() {
                    if !host.name.eq_ignore_ascii_case(name) {
                        continue;
                    }
                    let last: Vec<IpAddr> = host.addrs.iter().map(SocketAddr::ip).collect();
                    let Ok(ips) = lookup.merged(&last) else {
                        continue;
                    };
                    let mut addrs = Vec::with_capacity(ips.len());
                    for addr in ips.into_iter().map(|ip| SocketAddr::new(ip, host.port)) {
                        if listen.is_some_and(|l| loops_back(l, addr)) {
                            if self.looping.insert(addr) {
                                warn!(
                                    "upstream `{}`: `{host}` resolves to {addr}, its own listen address: not a host (tcplb would connect to itself)",
                                    u.name
                                );
                            }
                            continue;
                        }
                        addrs.push(addr);
                    }
                    if addrs != host.addrs {
                        host.addrs = addrs;
                        if !changed.contains(id) {
                            changed.push(*id);
                        }
                    }
                }
            }
        }
        changed
    }

    /// Logs a name that starts failing, or resolves again, once.
    fn log_outcome(&mut self, name: &str, lookup: &Lookup) {
        let why = match (&lookup.v4, &lookup.v6) {
            (Err(_), Err(_)) => lookup.addresses().err(),
            (Err(a), Ok(_)) => Some(format!("A: {a}")),
            (Ok(_), Err(b)) => Some(format!("AAAA: {b}")),
            (Ok(a), Ok(b)) if a.is_empty() && b.is_empty() => lookup.addresses().err(),
            (Ok(_), Ok(_)) => None,
        };
        match why {
            Some(why) if self.failing.insert(name.to_string()) => warn!(
                "DNS: `{name}` does not resolve ({why}); the addresses it had stay hosts until it does"
            ),
            Some(_) => {}
            None if self.failing.remove(name) => {
                let found = lookup.addresses().unwrap_or_default();
                let found: Vec<String> = found.iter().map(ToString::to_string).collect();
                info!("DNS: `{name}` resolves again: {}", found.join(", "));
            }
            None => {}
        }
    }
}

/// Starts the resolver thread: it looks up each round it is handed and
/// sends the answers back; it ends once the control thread is gone.
fn spawn(handle: Handle) -> std::io::Result<Sender<Round>> {
    let (rounds, queue) = mpsc::channel::<Round>();
    std::thread::Builder::new()
        .name("tcplb-resolver".to_string())
        .spawn(move || {
            for round in queue {
                let found = round
                    .names
                    .into_iter()
                    .map(|name| {
                        let lookup = round.resolver.lookup(&name);
                        (name, lookup)
                    })
                    .collect();
                let answers = Answers {
                    generation: round.generation,
                    found,
                };
                if handle.send(Command::Resolved(answers)).is_none() {
                    break;
                }
            }
        })?;
    Ok(rounds)
}

impl Control {
    /// Hands the round of lookups that is due, if any, to the resolver
    /// thread (started the first time one is).
    pub(super) fn follow_names(&mut self, now: Instant) {
        if self.draining {
            return;
        }
        let resolver = Resolver::of(self.shared.snapshot().settings.resolver);
        let Some(round) = self.names.due(now, resolver) else {
            return;
        };
        if self.names.rounds.is_none() {
            match spawn(self.handle.clone()) {
                Ok(rounds) => self.names.rounds = Some(rounds),
                Err(e) => warn!("DNS: cannot start the resolver thread: {e}"),
            }
        }
        let sent = self
            .names
            .rounds
            .as_ref()
            .is_some_and(|r| r.send(round).is_ok());
        if !sent {
            // Try again next interval.
            self.names.rounds = None;
            self.names.next = Some(now + self.names.interval);
        }
    }

    /// A round's answers: the upstreams whose hosts changed are rebuilt
    /// and put in force as a reload does it, each change logged.
    pub(super) fn resolved(&mut self, answers: Answers, now: Instant) {
        if answers.generation != self.names.generation {
            return;
        }
        self.names.next = (!self.names.interval.is_zero()).then(|| now + self.names.interval);
        let old = self.shared.snapshot();
        let listen_of = |id: usize| old.upstream(id).map(|u| u.listen);
        let changed = self.names.apply(&answers.found, listen_of);
        if changed.is_empty() || self.draining {
            return;
        }
        let drain = old.settings.drain_timeout;
        let mut upstreams: Vec<Arc<Upstream>> = Vec::with_capacity(old.upstreams.len());
        for u in &old.upstreams {
            let config = self
                .names
                .followed
                .iter()
                .find(|(id, _)| *id == u.id && changed.contains(id))
                .map(|(_, c)| c.clone());
            let Some(config) = config else {
                upstreams.push(u.clone());
                continue;
            };
            let (new, differences) = self.rehost(u, &config, (u.listen, drain, now));
            if !differences.is_empty() {
                info!(
                    "upstream `{}` follows DNS: {}",
                    u.name,
                    differences.join("; ")
                );
            }
            upstreams.push(Arc::new(new));
        }
        let snapshot = Snapshot {
            settings: old.settings.clone(),
            access: old.access.clone(),
            tls: old.tls.clone(),
            upstreams,
        };
        self.put_in_force(snapshot, Vec::new(), now + drain, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HostConfig, HostName};

    fn upstream(names: &[(&str, u16, &[&str])]) -> UpstreamConfig {
        let mut u = Config::quick(
            "u",
            "127.0.0.1:7000",
            &["127.0.0.1:1".into()],
            Default::default(),
        )
        .unwrap()
        .upstreams
        .remove(0);
        u.names = names
            .iter()
            .map(|(name, port, addrs)| HostName {
                name: name.to_string(),
                port: *port,
                weight: HostConfig::DEFAULT_WEIGHT,
                max_connections: None,
                addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            })
            .collect();
        u
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn found(v4: &[&str], v6: Result<&[&str], &str>) -> Lookup {
        Lookup {
            v4: Ok(ips(v4)),
            v6: v6.map(ips).map_err(str::to_string),
        }
    }

    #[test]
    fn rounds_come_one_interval_after_the_last_answers_each_name_once() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(30);
        let mut names = Names::default();
        let a = upstream(&[("Db.test", 5432, &[]), ("cache.test", 6379, &[])]);
        let b = upstream(&[("db.test", 5433, &[])]);
        names.follow(vec![(0, a), (1, b)], HashSet::new(), interval, t0);
        assert_eq!(names.next_due(), Some(t0 + interval));
        assert!(names.due(t0, Resolver::System).is_none());
        let round = names.due(t0 + interval, Resolver::System).unwrap();
        assert_eq!(round.names, ["cache.test", "db.test"]);
        assert_eq!(names.next_due(), None, "none while a round is out");
        names.follow(Vec::new(), HashSet::new(), interval, t0);
        assert_eq!(names.next_due(), None, "nothing to follow");
        names.follow(
            vec![(0, upstream(&[("x.test", 1, &[])]))],
            HashSet::new(),
            Duration::ZERO,
            t0,
        );
        assert_eq!(names.next_due(), None, "resolve_interval 0s");
    }

    #[test]
    fn answers_change_addresses_keep_them_on_failure_and_skip_the_listen_address() {
        let t0 = Instant::now();
        let mut names = Names::default();
        let u = upstream(&[("db.test", 7000, &["127.0.0.2:7000"])]);
        names.follow(vec![(3, u)], HashSet::new(), Duration::from_secs(30), t0);
        let listen = |_| Some("127.0.0.1:7000".parse().unwrap());
        let addrs = |names: &Names| names.followed[0].1.names[0].addrs.clone();
        let two = found(&["127.0.0.2", "127.0.0.3"], Ok(&["::1"]));
        assert_eq!(names.apply(&[("db.test".into(), two.clone())], listen), [3]);
        assert_eq!(
            addrs(&names),
            ["127.0.0.2:7000", "127.0.0.3:7000", "[::1]:7000"]
                .map(|a| a.parse::<SocketAddr>().unwrap())
        );
        assert!(
            names.apply(&[("db.test".into(), two)], listen).is_empty(),
            "no change"
        );
        // SERVFAIL for AAAA: the IPv6 address stays; A moved.
        let partial = found(&["127.0.0.4"], Err("Server Failure"));
        assert_eq!(names.apply(&[("db.test".into(), partial)], listen), [3]);
        assert_eq!(
            addrs(&names),
            ["127.0.0.4:7000", "[::1]:7000"].map(|a| a.parse::<SocketAddr>().unwrap())
        );
        assert!(names.failing.contains("db.test"));
        let empty = found(&[], Ok(&[]));
        assert!(names.apply(&[("db.test".into(), empty)], listen).is_empty());
        assert_eq!(addrs(&names).len(), 2, "an empty answer keeps the last set");
        // The listen address itself is left out.
        let looping = found(&["127.0.0.1", "127.0.0.5"], Ok(&[]));
        assert_eq!(names.apply(&[("db.test".into(), looping)], listen), [3]);
        assert_eq!(
            addrs(&names),
            ["127.0.0.5:7000".parse::<SocketAddr>().unwrap()]
        );
        assert!(!names.failing.contains("db.test"), "it resolves again");
    }

    #[test]
    fn a_reload_that_cannot_resolve_a_name_keeps_its_last_addresses() {
        let t0 = Instant::now();
        let mut names = Names::default();
        let had = upstream(&[("db.test", 5432, &["10.0.0.1:5432"])]);
        names.follow(vec![(0, had)], HashSet::new(), Duration::from_secs(30), t0);
        let mut config = Config::quick(
            "u",
            "127.0.0.1:7000",
            &["127.0.0.1:1".into()],
            Default::default(),
        )
        .unwrap();
        config.upstreams[0] = upstream(&[("DB.test", 5432, &[]), ("new.test", 1, &[])]);
        let unresolved = names.carry_over(&mut config);
        assert_eq!(
            config.upstreams[0].names[0].addrs,
            ["10.0.0.1:5432".parse().unwrap()]
        );
        assert!(config.upstreams[0].names[1].addrs.is_empty());
        assert_eq!(
            unresolved,
            HashSet::from(["db.test".to_string(), "new.test".to_string()])
        );
    }
}
