//! Creating sockets and setting their options: listeners, connects to
//! hosts (which apply `socket_buffer` before the SYN), and the options of
//! a pair's sockets. Reads and writes are the [`Endpoint`](super::Endpoint)'s.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use log::warn;
use mio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::{Keepalive, Settings};

/// Kernel options of every relayed socket, from the settings: set on
/// the listeners (accepted sockets inherit them, at no cost per
/// connection) and on each socket to a host before its SYN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tuning {
    /// `socket_buffer`: fixed send and receive buffers (`None`: autotuned).
    pub buffer: Option<usize>,
    /// `unsent_limit`: the bytes a socket may hold written but not yet
    /// sent (`TCP_NOTSENT_LOWAT`; `None`: the kernel's default, no limit).
    /// Autotuning grows a socket's send buffer to megabytes; toward a peer
    /// that stops reading, all of that would fill with bytes tcplb took
    /// in, and a few hundred stalled pairs push the machine into TCP
    /// memory pressure, where every connection slows. With a limit a
    /// stalled socket holds that much unsent (plus what is in flight), and
    /// tcplb stops reading from the sender sooner; the price is more
    /// wake-ups per byte for a fast stream (README, Performance).
    pub unsent: Option<usize>,
}

impl Tuning {
    /// The options `settings` ask for.
    pub fn of(settings: &Settings) -> Tuning {
        Tuning {
            buffer: settings.socket_buffer,
            unsent: settings.unsent_limit,
        }
    }
}

/// Sets a socket's `TCP_NOTSENT_LOWAT` (`None`: back to the kernel's
/// default, which 0 selects).
pub fn set_unsent_limit(socket: &Socket, limit: Option<usize>) -> io::Result<()> {
    // The settings cap it at 64 MiB.
    socket.set_tcp_notsent_lowat(limit.map_or(0, |n| n.min(u32::MAX as usize) as u32))
}

/// Starts a non-blocking connect to `addr`, with the socket options of
/// `tuning`; fixed buffers are set before the SYN, so the window offered
/// to the host follows them.
pub fn connect(addr: SocketAddr, tuning: Tuning) -> io::Result<TcpStream> {
    let kind = Type::STREAM.nonblocking();
    let socket = Socket::new(Domain::for_address(addr), kind, Some(Protocol::TCP))?;
    if tuning.unsent.is_some() {
        set_unsent_limit(&socket, tuning.unsent)?;
    }
    if let Some(size) = tuning.buffer {
        set_buffers(&socket, size)?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Fixes a socket's send and receive buffers to `size` bytes each, which
/// turns the kernel's autotuning off for it. Linux doubles the figure for
/// its bookkeeping and caps it at `net.core.wmem_max`/`rmem_max`.
pub fn set_buffers(socket: &Socket, size: usize) -> io::Result<()> {
    socket.set_send_buffer_size(size)?;
    socket.set_recv_buffer_size(size)
}

/// [`set_buffers`] for a listener (whose accepted sockets inherit the
/// sizes), warning when the kernel's caps gave less than asked for.
pub fn set_listener_buffers(socket: &Socket, size: usize, addr: SocketAddr) -> io::Result<()> {
    set_buffers(socket, size)?;
    let (sent, received) = (socket.send_buffer_size()?, socket.recv_buffer_size()?);
    if sent.min(received) < size {
        warn!(
            "{addr}: socket_buffer {size} is capped by the kernel to {} (net.core.wmem_max/rmem_max)",
            sent.min(received) / 2
        );
    }
    Ok(())
}

/// Socket options for both sockets of a pair: no Nagle delay, since tcplb
/// forwards what it has at once, and TCP keepalive when configured (set
/// on each socket, so that a reload applies to new connections; a few
/// syscalls per connection, none without keepalive).
pub fn prepare(stream: &TcpStream, keepalive: Option<&Keepalive>) {
    // Failure only costs latency; the pair still works.
    let _ = stream.set_nodelay(true);
    if let Some(keepalive) = keepalive {
        // The values are checked at config time; a failure here leaves
        // the connection without keepalive, as it would be without tcplb.
        let _ = set_keepalive(stream, keepalive);
    }
}

/// Turns TCP keepalive on (`SO_KEEPALIVE`) with `TCP_KEEPIDLE` and,
/// when configured, `TCP_KEEPINTVL` and `TCP_KEEPCNT`.
pub fn set_keepalive(stream: &TcpStream, keepalive: &Keepalive) -> io::Result<()> {
    let mut params = TcpKeepalive::new().with_time(keepalive.idle);
    if let Some(interval) = keepalive.interval {
        params = params.with_interval(interval);
    }
    if let Some(probes) = keepalive.probes {
        params = params.with_retries(probes);
    }
    SockRef::from(stream).set_tcp_keepalive(&params)
}

/// TCP keepalive as the kernel has it on one socket, read back with
/// `getsockopt`: what [`set_keepalive`] set, and the kernel's defaults
/// for what it did not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveState {
    /// `TCP_KEEPIDLE`.
    pub idle: Duration,
    /// `TCP_KEEPINTVL`.
    pub interval: Duration,
    /// `TCP_KEEPCNT`.
    pub probes: u32,
}

/// The keepalive of `stream` (`None` when `SO_KEEPALIVE` is off).
pub fn keepalive(stream: &TcpStream) -> io::Result<Option<KeepaliveState>> {
    let socket = SockRef::from(stream);
    if !socket.keepalive()? {
        return Ok(None);
    }
    Ok(Some(KeepaliveState {
        idle: socket.tcp_keepalive_time()?,
        interval: socket.tcp_keepalive_interval()?,
        probes: socket.tcp_keepalive_retries()?,
    }))
}

/// Keeps urgent (out-of-band) bytes in the stream, so they are relayed like
/// any other byte instead of dropped. Linux applies the option when a read
/// reaches the urgent mark, so setting it on the first urgent-data event
/// (before reading on) is enough, and saves a syscall on every other socket.
pub fn keep_urgent_inline(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_out_of_band_inline(true);
}

/// Makes the coming close send RST instead of FIN, so a reset (or an
/// abort) is passed on as such and the peer cannot mistake it for a clean end.
pub fn set_abortive_close(stream: &TcpStream) {
    // Failure only means the peer sees FIN; nothing else to do about it.
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Whether an error means the process or system ran out of descriptors or
/// socket memory: a reason to back off, not a fault of any one connection.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// A non-blocking listening socket. Accepted sockets inherit its buffer
/// sizes and unsent limit ([`Tuning`]), so they cost no syscall per connection.
/// With `shared`, the socket is one of several on the same address
/// (`SO_REUSEPORT`, one per worker): the kernel spreads connections over
/// them.
pub fn listen(
    addr: SocketAddr,
    backlog: u32,
    tuning: Tuning,
    shared: bool,
) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    if tuning.unsent.is_some() {
        set_unsent_limit(&socket, tuning.unsent)?;
    }
    if let Some(size) = tuning.buffer {
        set_listener_buffers(&socket, size, addr)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// `n` listeners on `addr` sharing it (`SO_REUSEPORT`), and the address
/// bound (a port 0 is chosen by the first and taken by the others).
pub fn listen_group(
    addr: SocketAddr,
    n: usize,
    backlog: u32,
    tuning: Tuning,
) -> io::Result<(Vec<TcpListener>, SocketAddr)> {
    let first = listen(addr, backlog, tuning, true)?;
    let local = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..n {
        group.push(listen(local, backlog, tuning, true)?);
    }
    Ok((group, local))
}
