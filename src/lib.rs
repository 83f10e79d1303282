//! tcplb: a TCP (layer 4) load balancer built on one thread and one
//! `mio::Poll` loop.
//!
//! A client connects to an upstream's listen address; tcplb picks the host
//! with the fewest active connections ([`LoadBalancer`]), connects to it
//! (moving on to the next-best host when a connect fails), and relays bytes
//! both ways until both directions have finished. Where to look:
//!
//! - [`proxy`]: the event loop, the only owner of all state;
//! - `pair`: the life of one connection pair (connect, relay, half-close, refusal);
//! - [`balance`]: the least-connections policy, free of I/O;
//! - [`config`]: the TOML schema and its validation;
//! - [`buffer`]: relay buffers, pooled so that idle pairs hold none.

pub mod access;
pub mod admin;
pub mod balance;
pub mod buffer;
pub mod certs;
pub mod config;
pub mod demo;
mod endpoint;
pub mod error;
mod flow;
pub mod health;
pub mod limits;
pub mod metrics;
mod net;
mod pair;
mod probe;
pub mod proxy;
mod secure;
mod send_queue;
mod timers;
pub mod tls;
mod token;
mod upstream;

pub use balance::LoadBalancer;
pub use config::{Config, Settings, UpstreamConfig};
pub use error::Error;
pub use metrics::{HostStats, Stats, UpstreamStats};
pub use proxy::{Handle, Proxy};
pub use send_queue::SendQueues;
