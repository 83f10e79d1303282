//! A DNS server for tests, on 127.0.0.1 UDP (and TCP, for answers too
//! large for UDP), whose answers the test sets and changes while tcplb
//! runs. Messages are encoded and decoded by `hickory-proto`, the codec
//! tcplb uses, so the test writes no DNS wire format of its own. Its
//! threads end when it is dropped.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};

use super::IO_TIMEOUT;

/// What the server answers for a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// These addresses: the IPv4 ones to A queries, the IPv6 ones to
    /// AAAA queries (none: NOERROR with an empty answer).
    Records(Vec<IpAddr>),
    /// SERVFAIL.
    ServFail,
    /// NXDOMAIN.
    NoSuchName,
}

#[derive(Default)]
struct Zone {
    answers: HashMap<String, Answer>,
    /// Queries answered, per name, over UDP and TCP.
    asked: HashMap<String, usize>,
    /// Over UDP, answers with more records than this come truncated.
    udp_records: Option<usize>,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    stop: Arc<AtomicBool>,
}

impl DnsServer {
    /// A server that knows no name yet (NXDOMAIN), on 127.0.0.1 UDP and
    /// TCP, the same port.
    pub fn start() -> DnsServer {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()) {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let stop = Arc::new(AtomicBool::new(false));
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (z, s) = (zone.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = udp.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = answer(&z, &buf[..n], true) {
                    let _ = udp.send_to(&reply, from);
                }
            }
        });
        tcp.set_nonblocking(true).unwrap();
        let (z, s) = (zone.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = tcp.accept() else {
                    thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                let mut len = [0u8; 2];
                if conn.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if conn.read_exact(&mut query).is_err() {
                    continue;
                }
                if let Some(reply) = answer(&z, &query, false) {
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    let _ = conn.write_all(&framed);
                }
            }
        });
        DnsServer { addr, zone, stop }
    }

    /// From now on, `name` (without the final dot) gets `answer`.
    pub fn set(&self, name: &str, answer: Answer) {
        let mut zone = self.zone.lock().unwrap();
        zone.answers.insert(name.to_ascii_lowercase(), answer);
    }

    /// Over UDP, answers of more than `records` records come truncated
    /// (the client must ask again over TCP).
    pub fn truncate_above(&self, records: usize) {
        self.zone.lock().unwrap().udp_records = Some(records);
    }

    /// Queries answered for `name` so far (A and AAAA count one each).
    pub fn asked(&self, name: &str) -> usize {
        let zone = self.zone.lock().unwrap();
        zone.asked
            .get(&name.to_ascii_lowercase())
            .copied()
            .unwrap_or(0)
    }

    /// Waits (bounded) until `name` has been asked at least `n` times.
    pub fn wait_asked(&self, name: &str, n: usize) {
        let deadline = Instant::now() + IO_TIMEOUT;
        while self.asked(name) < n {
            assert!(
                Instant::now() < deadline,
                "`{name}` asked {} times, never {n}",
                self.asked(name)
            );
            thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The reply to `query`, or `None` for what is not a query.
fn answer(zone: &Mutex<Zone>, query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let question = query.queries().first()?.clone();
    let name = question.name().to_ascii();
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let mut zone = zone.lock().unwrap();
    *zone.asked.entry(name.clone()).or_default() += 1;
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true);
    reply.add_query(question.clone());
    match zone.answers.get(&name).cloned() {
        None | Some(Answer::NoSuchName) => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
        Some(Answer::ServFail) => {
            reply.set_response_code(ResponseCode::ServFail);
        }
        Some(Answer::Records(ips)) => {
            let records: Vec<Record> = ips
                .iter()
                .filter_map(|ip| match (ip, question.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
                    (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
                    _ => None,
                })
                .map(|data| Record::from_rdata(question.name().clone(), 5, data))
                .collect();
            if udp && zone.udp_records.is_some_and(|max| records.len() > max) {
                reply.set_truncated(true);
            } else {
                for record in records {
                    reply.add_answer(record);
                }
            }
        }
    }
    reply.to_vec().ok()
}
