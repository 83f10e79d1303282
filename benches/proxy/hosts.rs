//! Upstream servers for the benchmark: one thread each, one `mio` loop,
//! so thousands of connections cost no threads on the measuring side.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::thread;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);

/// Starts an echo server on 127.0.0.1:0 and returns its address. It runs
/// until the benchmark process exits.
pub fn spawn_echo() -> SocketAddr {
    let mut listener = TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let mut poll = Poll::new().unwrap();
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .unwrap();
        let mut conns: HashMap<usize, TcpStream> = HashMap::new();
        let mut next = 0usize;
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            poll.poll(&mut events, None).unwrap();
            for event in events.iter() {
                if event.token() == LISTENER {
                    while let Ok((mut s, _)) = listener.accept() {
                        let _ = s.set_nodelay(true);
                        poll.registry()
                            .register(&mut s, Token(next), Interest::READABLE)
                            .unwrap();
                        conns.insert(next, s);
                        next += 1;
                    }
                    continue;
                }
                let key = event.token().0;
                let Some(s) = conns.get_mut(&key) else {
                    continue;
                };
                if !echo(s, &mut buf) {
                    conns.remove(&key);
                }
            }
        }
    });
    addr
}

/// Echoes what is readable; false once the connection is over. Writes
/// block (briefly) when the peer is slow, which is fine for a benchmark peer.
fn echo(s: &mut TcpStream, buf: &mut [u8]) -> bool {
    loop {
        match s.read(buf) {
            Ok(0) => return false,
            Ok(n) => {
                let mut at = 0;
                while at < n {
                    match s.write(&buf[at..n]) {
                        Ok(m) => at += m,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => thread::yield_now(),
                        Err(_) => return false,
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}
