//! Policy: plain data with no I/O that takes `now` as an argument, so each
//! part is unit-tested without sockets or clocks.
//!
//! - [`balance`]: each upstream's hosts, one record per host (address,
//!   health, connection count, counters), and the least-connections choice;
//! - [`health`]: the rise/fall state machine of one host;
//! - [`access`]: `[[client]]` rules, each with its own token bucket and
//!   concurrency count;
//! - [`limits`]: token buckets, per source address too.
//!
//! Counts that must be released exactly once are handed out as leases
//! ([`balance::HostLease`], [`access::ClientLease`]): a lease cannot be
//! cloned, giving it back consumes it, and (in debug builds) dropping one
//! without giving it back panics, so a leak fails the tests.

pub mod access;
pub(crate) mod balance;
pub mod health;
pub mod limits;

/// Panics in debug builds when a lease is dropped instead of given back
/// (unless the thread is already unwinding).
fn lease_dropped(what: &str) {
    debug_assert!(
        std::thread::panicking(),
        "a {what} lease was dropped, not given back"
    );
}
