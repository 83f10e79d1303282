//! Start-up errors: everything that can stop tcplb before it serves, each
//! naming the file, field or address at fault. Failures of single
//! connections are never `Error`s; the loop handles them where they happen.
//!
//! This module depends on nothing else in the crate, so that every part
//! that can fail at start-up (config, TLS files, binding) can name these
//! types without an import circle. That is why the configuration's own
//! report, [`ConfigError`] with its [`Problem`]s, lives here too: the
//! config module fills it in, and `Error::Config` carries it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Why tcplb could not start (or reload): the one error type of start-up.
#[derive(Debug)]
pub enum Error {
    /// The configuration file could not be read.
    ReadConfig {
        /// The file as it was given.
        path: PathBuf,
        /// Why reading it failed.
        source: io::Error,
    },
    /// The configuration (file or flags) is invalid; every problem is listed.
    Config(ConfigError),
    /// A listen address could not be bound.
    Bind {
        /// The upstream (or `admin`) the listener is for.
        upstream: String,
        /// The address that could not be bound.
        addr: SocketAddr,
        /// What the kernel said.
        source: io::Error,
    },
    /// A TLS certificate, key, CA or CRL file is missing, unreadable,
    /// malformed, out of its validity dates, or does not fit with the others.
    Tls {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it, in words.
        problem: String,
        /// `origin:line:column` of the key that named the file, when it
        /// came from a config file.
        at: Option<String>,
    },
    /// The system trust store, which verifies a `rediss://` Redis when
    /// `tls_ca` is not set, holds no usable CA certificate.
    TrustStore {
        /// What is wrong, in words.
        problem: String,
        /// `origin:line:column` of the `redis` URL, when it came from a
        /// config file.
        at: Option<String>,
    },
    /// The poller, waker or signal handler could not be set up.
    Setup {
        /// The part that could not be set up, e.g. "the poller".
        what: &'static str,
        /// What the system said.
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
            Error::Tls { path, problem, at } => {
                if let Some(at) = at {
                    write!(f, "{at}: ")?;
                }
                write!(f, "TLS file {}: {problem}", path.display())
            }
            Error::TrustStore { problem, at } => {
                if let Some(at) = at {
                    write!(f, "{at}: ")?;
                }
                write!(f, "the system trust store: {problem}")
            }
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
            Error::Tls { .. } | Error::TrustStore { .. } => None,
        }
    }
}

/// One thing wrong with a configuration, with its place in the source
/// (line 0 when it concerns the whole file or a command-line flag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line of the offending key or value; 0 for no place.
    pub line: usize,
    /// 1-based column (in bytes) on that line; 0 with line 0.
    pub column: usize,
    /// What is wrong, naming the key (e.g. "`idle_timeout` must be ...").
    pub message: String,
}

/// Every problem found in one configuration source, in source order.
///
/// Displayed one problem a line, as `origin:line:column: message`, or
/// `origin: message` for a problem with no place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name, or a description such as "command line".
    pub origin: String,
    /// All of them, never just the first.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.line == 0 {
                write!(f, "{}: {}", self.origin, p.message)?;
            } else {
                write!(f, "{}:{}:{}: {}", self.origin, p.line, p.column, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// What a configuration holds that is valid but will likely not work as
/// meant. `tcplb check` lists it (and fails on it with `--strict`);
/// serving logs it at start and at each reload, and goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// `origin:line:column` of the key at fault, or only the origin (a
    /// file name, "command line") when it has no place; may be empty.
    pub at: String,
    /// What is wrong and what follows from it.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.at.is_empty() {
            write!(f, "{}: ", self.at)?;
        }
        write!(f, "warning: {}", self.message)
    }
}
