//! Policy: plain data with no I/O that takes `now` as an argument, so each
//! part is unit-tested without sockets or clocks.
//!
//! - [`balance`]: each upstream's hosts, one record per host (address,
//!   health, connection count, counters), and the least-connections choice;
//! - [`health`]: the rise/fall state machine of one host;
//! - [`access`]: `[[client]]` rules, each with its own token bucket and
//!   concurrency count;
//! - [`limits`]: token buckets, per source address too;
//! - [`share`]: with `[cluster]`, an instance's share of the group-wide
//!   limits kept on Redis (leased tokens, places held) and the fallback;
//! - [`trust`]: the networks whose connections begin with a PROXY header.
//!
//! Counts that must be given back exactly once are handed out as leases
//! ([`balance::HostLease`], [`access::ClientLease`], the slots of
//! [`capacity`]): a lease cannot be cloned, and dropping it gives the count
//! back, so "exactly once" is a property of the types. The counts are
//! shared by every worker; they are touched once per connection, never
//! per byte.
//!
//! - [`capacity`]: the process-wide caps (`max_connections`, handshakes);
//! - [`queue`]: an upstream's clients waiting for a host slot ([`queue::QueueTicket`]
//!   is a lease too).

pub mod access;
pub(crate) mod balance;
pub(crate) mod capacity;
pub mod health;
pub mod limits;
pub(crate) mod queue;
pub mod share;
pub mod trust;
