//! The "async variant" users compare tcplb with: a minimal least-connections
//! TCP proxy on tokio, one task per client, `copy_bidirectional` for the
//! relay (tokio's fixed 8 KiB per direction), or
//! `copy_bidirectional_with_sizes` with a chosen buffer size for the tuned
//! rows. It runs as a child process (the benchmark binary re-executed with
//! `--tokio-proxy`), so its CPU and memory are measured like any proxy's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{copy_bidirectional, copy_bidirectional_with_sizes};
use tokio::net::{TcpListener, TcpStream};

/// Runs the proxy: `flavor` is "mt" (multi-threaded runtime, one worker
/// per core) or "st" (current-thread runtime); `buffer` is "default" or a
/// size in bytes for each direction. Prints `listening ADDR`.
pub fn run(flavor: &str, buffer: &str, hosts: Vec<SocketAddr>) -> ! {
    let buffer = match buffer {
        "default" => None,
        size => Some(size.parse().expect("--tokio-proxy buffer size")),
    };
    let runtime = match flavor {
        "mt" => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        "st" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        other => panic!("unknown tokio flavor {other}"),
    }
    .unwrap();
    runtime.block_on(serve(hosts, buffer));
    std::process::exit(0)
}

async fn serve(hosts: Vec<SocketAddr>, buffer: Option<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    let active: Arc<Vec<AtomicUsize>> =
        Arc::new(hosts.iter().map(|_| AtomicUsize::new(0)).collect());
    let hosts = Arc::new(hosts);
    let mut next = 0usize;
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        // Least connections, ties starting after the last choice.
        let n = hosts.len();
        let host = (0..n)
            .map(|i| (next + i) % n)
            .min_by_key(|&i| active[i].load(Ordering::Relaxed))
            .unwrap();
        next = (host + 1) % n;
        active[host].fetch_add(1, Ordering::Relaxed);
        let (hosts, active) = (hosts.clone(), active.clone());
        tokio::spawn(async move {
            if let Ok(mut upstream) = TcpStream::connect(hosts[host]).await {
                let _ = upstream.set_nodelay(true);
                let _ = match buffer {
                    Some(size) => {
                        copy_bidirectional_with_sizes(&mut client, &mut upstream, size, size).await
                    }
                    None => copy_bidirectional(&mut client, &mut upstream).await,
                };
            }
            active[host].fetch_sub(1, Ordering::Relaxed);
        });
    }
}
