//! How many bytes of a socket's send queue its peer has not acknowledged
//! yet (what `SIOCOUTQ` reports), read through the kernel's sock_diag
//! netlink interface, the one `ss` uses, so that no unsafe code is needed.
//!
//! Passing a reset on means closing with `SO_LINGER` 0, which throws the
//! socket's send queue away, bytes already acknowledged excepted. The loop
//! asks this count before such a close and waits while it is not zero.
//!
//! A query is one `sendmsg` and one `recvmsg` on a netlink socket opened
//! with the loop (one descriptor for the process's life, reopened on the
//! next query if opening failed): the kernel answers a single-socket query
//! before `sendmsg` returns, so the answer is read without waiting.

use std::io;
use std::net::SocketAddr;

use mio::net::TcpStream;
use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

/// A sock_diag socket for send-queue queries (the loop keeps one; tests
/// use one to reset only once their own bytes have left).
#[derive(Debug)]
pub struct SendQueues {
    socket: Option<Socket>,
    sequence: u32,
}

impl Default for SendQueues {
    fn default() -> Self {
        SendQueues::new()
    }
}

impl SendQueues {
    /// Opens the netlink socket now (a failure is reported by the first query).
    pub fn new() -> SendQueues {
        SendQueues {
            socket: open().ok(),
            sequence: 0,
        }
    }

    /// Bytes written to `stream` that its peer has not acknowledged. A
    /// socket the kernel no longer knows (it was reset too) holds none.
    pub(crate) fn unacked(&mut self, stream: &TcpStream) -> io::Result<u32> {
        self.unacked_between(stream.local_addr()?, stream.peer_addr()?)
    }

    /// [`unacked`](Self::unacked) for the TCP socket from `local` to `peer`.
    pub fn unacked_between(&mut self, local: SocketAddr, peer: SocketAddr) -> io::Result<u32> {
        if self.socket.is_none() {
            self.socket = Some(open()?);
        }
        let socket = self.socket.as_ref().expect("opened above");
        self.sequence = self.sequence.wrapping_add(1);
        socket.send(&request(local, peer, self.sequence), 0)?;
        let mut answer = [0u8; 1024];
        // A stale answer (of a query whose reading failed) is skipped.
        loop {
            let n = socket.recv(&mut &mut answer[..], libc::MSG_DONTWAIT)?;
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&answer[..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if message.header.sequence_number != self.sequence {
                continue;
            }
            return match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    Ok(r.header.send_queue)
                }
                NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => Ok(0),
                NetlinkPayload::Error(e) => Err(e.to_io()),
                other => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected sock_diag answer: {other:?}"),
                )),
            };
        }
    }
}

fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// A query for the one TCP socket from `local` to `peer`.
fn request(local: SocketAddr, peer: SocketAddr, sequence: u32) -> Vec<u8> {
    let (family, mut id) = match local {
        SocketAddr::V4(_) => (AF_INET, SocketId::new_v4()),
        SocketAddr::V6(_) => (AF_INET6, SocketId::new_v6()),
    };
    id.source_port = local.port();
    id.destination_port = peer.port();
    id.source_address = local.ip();
    id.destination_address = peer.ip();
    // INET_DIAG_NOCOOKIE: match on the addresses alone.
    id.cookie = [0xff; 8];
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id,
        })
        .into(),
    );
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A connected pair on loopback: (tcplb's side, the peer's side).
    fn pair() -> (TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (TcpStream::from_std(ours), theirs)
    }

    #[test]
    fn counts_bytes_the_peer_has_not_acknowledged() {
        let mut queues = SendQueues::new();
        let (mut ours, mut theirs) = pair();
        assert_eq!(queues.unacked(&ours).unwrap(), 0, "nothing written yet");
        // Fill until the kernel takes no more: the peer reads nothing, so
        // its receive window closes and bytes stay queued on our side.
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0usize;
        loop {
            match ours.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let queued = queues.unacked(&ours).unwrap() as usize;
        assert!(queued > 0 && queued <= written, "{queued} of {written}");
        // Once the peer has read everything, its kernel has acknowledged it.
        theirs.set_nonblocking(false).unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 256 * 1024];
        while got < written {
            got += theirs.read(&mut buf).unwrap();
        }
        // The acknowledgement of the last read may still be on its way
        // (delayed ACK): bounded, and only a count that never drops fails.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut left = queues.unacked(&ours).unwrap();
        while left != 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            left = queues.unacked(&ours).unwrap();
        }
        assert_eq!(left, 0);
    }
}
