//! DNS messages as bytes: the query tcplb sends for one name and record
//! type, and what an answer says about it. Encoding and decoding are
//! Hickory DNS's (`hickory-proto`); this file decides which answer belongs
//! to which query and which records count. No I/O.
//!
//! An answer is anything the network sends, so it is read as hostile: a
//! message that does not decode, is not a response, carries another id, or
//! asks another question is not the answer (it is ignored, and the query
//! times out if nothing better comes). Of a matching answer only the A or
//! AAAA records of the name asked, or of a name an in-answer CNAME chain
//! from it leads to, are taken, at most [`MAX_ADDRESSES`].

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

/// The most addresses taken from one answer (a name with more gives its
/// first ones, in the answer's order).
pub(crate) const MAX_ADDRESSES: usize = 64;

/// The UDP payload tcplb announces (EDNS), the size the DNS flag day of
/// 2020 settled on: answers above it come truncated and are asked again
/// over TCP.
pub(crate) const UDP_PAYLOAD: u16 = 1232;

/// What an answer says about the query it answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// The addresses of the name (none: the name exists, with no record of
    /// this type).
    Addresses(Vec<IpAddr>),
    /// NXDOMAIN: no such name.
    NoSuchName,
    /// The answer did not fit in UDP: ask again over TCP.
    Truncated,
    /// The server could not answer (SERVFAIL, REFUSED, ...), in its words.
    Failed(String),
}

/// The name as asked: absolute (no search domains are appended), or why
/// it cannot be asked.
pub(crate) fn name(text: &str) -> Result<Name, String> {
    let mut name = Name::from_ascii(text).map_err(|e| format!("not a DNS name: {e}"))?;
    name.set_fqdn(true);
    Ok(name)
}

/// The query for `name`'s records of type `rtype` (A or AAAA), recursion
/// desired, with an EDNS payload of [`UDP_PAYLOAD`].
pub(crate) fn query(id: u16, name: &Name, rtype: RecordType) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    message.add_query(Query::query(name.clone(), rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(UDP_PAYLOAD);
    message.set_edns(edns);
    // A name that parsed always encodes (at most 255 bytes, one question).
    message.to_vec().unwrap_or_default()
}

/// What `bytes` say in answer to query `id` for `name`'s `rtype` records;
/// `None` when they are not that answer.
pub(crate) fn reply(bytes: &[u8], id: u16, name: &Name, rtype: RecordType) -> Option<Reply> {
    let message = Message::from_vec(bytes).ok()?;
    let asked = message.queries();
    let answers_this = message.id() == id
        && message.message_type() == MessageType::Response
        && message.op_code() == OpCode::Query
        && asked.len() == 1
        && asked[0].name() == name
        && asked[0].query_type() == rtype
        && asked[0].query_class() == DNSClass::IN;
    if !answers_this {
        return None;
    }
    if message.truncated() {
        return Some(Reply::Truncated);
    }
    Some(match message.response_code() {
        ResponseCode::NoError => Reply::Addresses(addresses(&message, name, rtype)),
        ResponseCode::NXDomain => Reply::NoSuchName,
        code => Reply::Failed(code.to_str().to_string()),
    })
}

/// The `rtype` addresses of `name` in an answer: its own records and
/// those of the names its CNAME chain leads to within the answer.
fn addresses(message: &Message, name: &Name, rtype: RecordType) -> Vec<IpAddr> {
    let records: Vec<_> = message
        .answers()
        .iter()
        .filter(|r| r.dns_class() == DNSClass::IN)
        .collect();
    let mut chain = vec![name.clone()];
    // Each pass adds at least one name or ends, so this ends within
    // as many passes as there are records.
    loop {
        let next = records.iter().find_map(|r| match r.data() {
            RData::CNAME(target) if chain.contains(r.name()) && !chain.contains(&target.0) => {
                Some(target.0.clone())
            }
            _ => None,
        });
        match next {
            Some(target) => chain.push(target),
            None => break,
        }
    }
    let mut found = Vec::new();
    for record in records.iter().filter(|r| chain.contains(r.name())) {
        let ip = match (record.data(), rtype) {
            (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
            (RData::AAAA(aaaa), RecordType::AAAA) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        if !found.contains(&ip) && found.len() < MAX_ADDRESSES {
            found.push(ip);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};

    use super::*;

    fn answer(id: u16, question: &Name, rtype: RecordType, records: Vec<Record>) -> Message {
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Response)
            .set_op_code(OpCode::Query);
        m.add_query(Query::query(question.clone(), rtype));
        for r in records {
            m.add_answer(r);
        }
        m
    }

    fn a(name: &Name, ip: [u8; 4]) -> Record {
        Record::from_rdata(name.clone(), 30, RData::A(A(Ipv4Addr::from(ip))))
    }

    #[test]
    fn a_query_asks_one_absolute_question_with_edns() {
        let name = name("Backend.Test").unwrap();
        let q = Message::from_vec(&query(77, &name, RecordType::AAAA)).unwrap();
        assert_eq!(q.id(), 77);
        assert!(q.recursion_desired());
        assert_eq!(q.queries().len(), 1);
        assert_eq!(q.queries()[0].name().to_ascii(), "Backend.Test.");
        assert_eq!(q.queries()[0].query_type(), RecordType::AAAA);
        assert_eq!(q.extensions().as_ref().unwrap().max_payload(), UDP_PAYLOAD);
        assert!(super::name("no spaces allowed.test").is_err());
    }

    #[test]
    fn only_the_answer_to_the_question_asked_counts() {
        let name = name("backend.test").unwrap();
        let other = super::name("other.test").unwrap();
        let good = answer(5, &name, RecordType::A, vec![a(&name, [10, 0, 0, 1])]);
        let bytes = good.to_vec().unwrap();
        assert_eq!(
            reply(&bytes, 5, &name, RecordType::A),
            Some(Reply::Addresses(vec!["10.0.0.1".parse().unwrap()]))
        );
        // The name is compared without regard to case, as DNS does.
        let upper = super::name("BACKEND.test").unwrap();
        assert!(reply(&bytes, 5, &upper, RecordType::A).is_some());
        assert_eq!(reply(&bytes, 6, &name, RecordType::A), None, "another id");
        assert_eq!(reply(&bytes, 5, &other, RecordType::A), None);
        assert_eq!(reply(&bytes, 5, &name, RecordType::AAAA), None);
        let asked = Message::from_vec(&query(5, &name, RecordType::A)).unwrap();
        assert_eq!(
            reply(&asked.to_vec().unwrap(), 5, &name, RecordType::A),
            None,
            "a query is no answer"
        );
        assert_eq!(reply(b"\x00\x05garbage", 5, &name, RecordType::A), None);
        assert_eq!(reply(&[], 5, &name, RecordType::A), None);
    }

    #[test]
    fn cname_chains_are_followed_within_the_answer_and_strays_ignored() {
        let name = name("www.test").unwrap();
        let edge = super::name("edge.cdn.test").unwrap();
        let stray = super::name("elsewhere.test").unwrap();
        let records = vec![
            Record::from_rdata(name.clone(), 30, RData::CNAME(CNAME(edge.clone()))),
            a(&edge, [10, 0, 0, 2]),
            a(&stray, [10, 0, 0, 9]),
            a(&name, [10, 0, 0, 1]),
            a(&edge, [10, 0, 0, 2]),
            Record::from_rdata(name.clone(), 30, RData::AAAA(AAAA(Ipv6Addr::LOCALHOST))),
        ];
        let bytes = answer(1, &name, RecordType::A, records).to_vec().unwrap();
        assert_eq!(
            reply(&bytes, 1, &name, RecordType::A),
            Some(Reply::Addresses(vec![
                "10.0.0.2".parse().unwrap(),
                "10.0.0.1".parse().unwrap()
            ]))
        );
        // A CNAME loop ends.
        let looped = vec![
            Record::from_rdata(name.clone(), 30, RData::CNAME(CNAME(edge.clone()))),
            Record::from_rdata(edge.clone(), 30, RData::CNAME(CNAME(name.clone()))),
        ];
        let bytes = answer(1, &name, RecordType::A, looped).to_vec().unwrap();
        assert_eq!(
            reply(&bytes, 1, &name, RecordType::A),
            Some(Reply::Addresses(vec![]))
        );
    }

    #[test]
    fn codes_truncation_and_the_address_cap() {
        let name = name("backend.test").unwrap();
        let mut m = answer(2, &name, RecordType::A, vec![]);
        m.set_response_code(ResponseCode::ServFail);
        let bytes = m.to_vec().unwrap();
        assert_eq!(
            reply(&bytes, 2, &name, RecordType::A),
            Some(Reply::Failed("Server Failure".to_string()))
        );
        m.set_response_code(ResponseCode::NXDomain);
        let bytes = m.to_vec().unwrap();
        assert_eq!(
            reply(&bytes, 2, &name, RecordType::A),
            Some(Reply::NoSuchName)
        );
        m.set_response_code(ResponseCode::NoError)
            .set_truncated(true);
        let bytes = m.to_vec().unwrap();
        assert_eq!(
            reply(&bytes, 2, &name, RecordType::A),
            Some(Reply::Truncated)
        );
        let many = (0..200u8).map(|i| a(&name, [10, 0, 1, i])).collect();
        let bytes = answer(3, &name, RecordType::A, many).to_vec().unwrap();
        let Some(Reply::Addresses(found)) = reply(&bytes, 3, &name, RecordType::A) else {
            panic!("no addresses");
        };
        assert_eq!(found.len(), MAX_ADDRESSES);
    }
}
