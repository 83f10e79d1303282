//! Start-up errors: everything that can stop tcplb before it serves, each
//! naming the file, field or address at fault. Failures of single
//! connections are never `Error`s; the loop handles them where they happen.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::ConfigError;

#[derive(Debug)]
pub enum Error {
    /// The configuration file could not be read.
    ReadConfig { path: PathBuf, source: io::Error },
    /// The configuration (file or flags) is invalid; every problem is listed.
    Config(ConfigError),
    /// A listen address could not be bound.
    Bind {
        upstream: String,
        addr: SocketAddr,
        source: io::Error,
    },
    /// A TLS certificate, key, CA or CRL file is missing, unreadable,
    /// malformed or does not fit with the others.
    Tls { path: PathBuf, problem: String },
    /// The poller, waker or signal handler could not be set up.
    Setup {
        what: &'static str,
        source: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ReadConfig { path, source } => {
                write!(f, "cannot read config file {}: {source}", path.display())
            }
            Error::Config(e) => e.fmt(f),
            Error::Bind {
                upstream,
                addr,
                source,
            } => {
                let hint = match source.kind() {
                    io::ErrorKind::AddrInUse => " (another process is listening there)",
                    io::ErrorKind::AddrNotAvailable => " (no local interface has this address)",
                    io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
                    _ => "",
                };
                write!(
                    f,
                    "upstream `{upstream}`: cannot listen on {addr}: {source}{hint}"
                )
            }
            Error::Tls { path, problem } => write!(f, "TLS file {}: {problem}", path.display()),
            Error::Setup { what, source } => write!(f, "cannot set up {what}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::ReadConfig { source, .. }
            | Error::Bind { source, .. }
            | Error::Setup { source, .. } => Some(source),
            Error::Config(e) => Some(e),
            Error::Tls { .. } => None,
        }
    }
}
