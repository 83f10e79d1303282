//! tcplb: a TCP (layer 4) load balancer built on one thread and one
//! `mio::Poll` loop.
//!
//! A client connects to an upstream's listen address; tcplb picks the host
//! with the fewest active connections, connects to it (moving on to the
//! next-best host when a connect fails), and relays bytes both ways until
//! both directions have finished. Where to look:
//!
//! - `proxy`: the event loop, which dispatches events and deadlines;
//! - `pair`: the life of one connection pair, as a state machine;
//! - `io`: sockets with their readiness, one direction's flow, relay
//!   buffers and kernel pipes for splicing (both pooled so that idle pairs
//!   hold none), TLS sessions;
//! - `policy`: balancing, health, client rules and rate limits, free of I/O;
//! - `cluster`: with `[cluster]`, the thread that shares client limits
//!   with the other instances of a group through Redis;
//! - [`config`]: the TOML schema and its validation;
//! - `dns`: looking host names up (the system's resolver, or a DNS server);
//! - [`proxy_header`]: the PROXY protocol header, read and written.
//!
//! The binary (`src/main.rs`) parses the command line into a [`Config`],
//! [`Proxy::bind`]s it and [`Proxy::run`]s it.

pub mod admin;
pub mod certs;
mod cluster;
pub mod config;
pub mod demo;
mod dns;
pub mod error;
mod io;
mod logs;
mod pair;
mod policy;
mod proxy;
pub mod proxy_header;
pub mod tls;
mod upstream;

pub use admin::{ClusterStats, HostStats, Stats, UpstreamStats};
pub use config::{
    AccessLog, Config, HostConfig, Keepalive, RefusalMode, Relay, Settings, UpstreamConfig,
};
pub use error::Error;
pub use io::net::KeepaliveState;
pub use io::send_queue::SendQueues;
pub use logs::JSON_TARGET as ACCESS_JSON_TARGET;
pub use policy::access::ClientRule;
pub use policy::health::HealthSettings;
pub use policy::limits::Limit;
pub use policy::trust::SourceNet;
pub use proxy::{Handle, PairKeepalive, Proxy};
