//! Upstream servers for the benchmark. Each kind serves any number of
//! listeners from one thread and one `mio` loop, so thousands of
//! connections cost no threads on the measuring side. They run until the
//! benchmark process exits.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::thread;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Sends back every byte it receives.
    Echo,
    /// Streams bytes to the client as fast as it takes them, ignoring input.
    Source,
}

/// Starts `count` listeners of one kind on 127.0.0.1, served by one thread.
pub fn spawn(kind: Kind, count: usize) -> Vec<SocketAddr> {
    let mut listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0".parse().unwrap()).unwrap())
        .collect();
    let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    thread::spawn(move || serve(kind, &mut listeners));
    addrs
}

fn serve(kind: Kind, listeners: &mut [TcpListener]) {
    let mut poll = Poll::new().unwrap();
    let first_conn = listeners.len();
    for (i, l) in listeners.iter_mut().enumerate() {
        poll.registry()
            .register(l, Token(i), Interest::READABLE)
            .unwrap();
    }
    let mut conns: HashMap<usize, TcpStream> = HashMap::new();
    let mut next = first_conn;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            assert_eq!(e.kind(), ErrorKind::Interrupted, "poll: {e}");
            continue;
        }
        for event in events.iter() {
            let token = event.token().0;
            if token < first_conn {
                while let Ok((mut s, _)) = listeners[token].accept() {
                    let _ = s.set_nodelay(true);
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    poll.registry()
                        .register(&mut s, Token(next), interest)
                        .unwrap();
                    conns.insert(next, s);
                    next += 1;
                }
                continue;
            }
            let Some(s) = conns.get_mut(&token) else {
                continue;
            };
            let alive = match kind {
                Kind::Echo => echo(s, &mut buf),
                Kind::Source => source(s, &buf),
            };
            if !alive {
                conns.remove(&token);
            }
        }
    }
}

/// Echoes what is readable; false once the connection is over. A write
/// that would block is retried at once: echo replies here are small, and a
/// benchmark peer may spin briefly.
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

/// Writes until the socket is full; false once the peer is gone.
fn source(s: &mut TcpStream, buf: &[u8]) -> bool {
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => return false,
        }
    }
    loop {
        match s.write(buf) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}
