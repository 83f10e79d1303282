//! `tcplb demo`: small built-in hosts so a newcomer can see tcplb work
//! without setting anything up.
//!
//! Each demo host greets a connection with its own name and then echoes
//! what it receives. The hosts are toys on plain threads (one per
//! connection) bound to 127.0.0.1; tcplb itself still runs on its single
//! poll loop in front of them, with a connection cap that bounds the threads.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;

use log::debug;

/// Connections tcplb lets through in demo mode (and so host threads at most).
pub const DEMO_MAX_CONNECTIONS: usize = 256;

/// Starts a greeting echo host on an ephemeral loopback port.
pub fn spawn_host(name: &str) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let name = name.to_string();
    thread::Builder::new().name(name.clone()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let name = name.clone();
            let _ = thread::Builder::new().spawn(move || {
                if let Err(e) = serve(conn, &name) {
                    debug!("demo host {name}: {e}");
                }
            });
        }
    })?;
    Ok(addr)
}

fn serve(mut conn: TcpStream, name: &str) -> io::Result<()> {
    conn.write_all(format!("hello from {name}\n").as_bytes())?;
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            // Half-close: the client is done sending; finish our side too.
            return conn.shutdown(std::net::Shutdown::Write);
        }
        conn.write_all(&buf[..n])?;
    }
}
