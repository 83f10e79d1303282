//! The PROXY protocol header (HAProxy's `proxy-protocol.txt`, version 1
//! text and version 2 binary): reading one from the first bytes of a
//! connection, and writing the one tcplb sends to a host. No I/O: the
//! pair feeds [`parse`] what it has read so far and is told how much more
//! it may read, so it never reads past a v2 header and at most a few bytes
//! past a v1 line (which it hands on to TLS or the relay).
//!
//! Framing is done here, exactly and with hard caps: a v1 line ends at its
//! CRLF within [`V1_MAX`] bytes, a v2 header is its 16 fixed bytes plus the
//! length they announce, at most [`V2_MAX`] in all. Only a whole header is
//! handed to the `ppp` crate, which decodes its fields (and builds the v2
//! headers tcplb sends).
//!
//! What tcplb sends in v2 from a TLS upstream, beside the addresses:
//!
//! | type | value |
//! |---|---|
//! | `PP2_TYPE_AUTHORITY` (0x02) | the SNI the client sent, if any |
//! | `PP2_TYPE_SSL` (0x20) | client = `PP2_CLIENT_SSL` \| `PP2_CLIENT_CERT_CONN` (0x03), verify = 0 (verified), then the sub-TLV `PP2_SUBTYPE_SSL_VERSION` (0x21): `TLSv1.2` or `TLSv1.3` |
//! | [`PP2_TYPE_TCPLB_IDENTITY`] (0xE0) | the certificate name (URI or DNS SAN) tcplb authorized, UTF-8 |

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

use ppp::v2;

/// The longest v1 header, CRLF included (the specification's bound).
pub const V1_MAX: usize = 107;
/// The longest v2 header tcplb accepts, its 16 fixed bytes included. The
/// specification lets TLVs take up to 64 KiB; this cap leaves room for an
/// IPv6 or UNIX address block and the TLVs load balancers send (SSL,
/// authority, cloud endpoint ids), and keeps what a peer can make tcplb
/// hold small. A longer header is refused as malformed.
pub const V2_MAX: usize = 4096;
/// The 12 bytes a v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part of a v2 header: signature, version and command, family
/// and protocol, length.
const V2_FIXED: usize = 16;
/// How a v1 header starts.
const V1_PREFIX: &[u8] = b"PROXY ";

/// `PP2_TYPE_AUTHORITY`: the host name the client asked for (its SNI).
pub const PP2_TYPE_AUTHORITY: u8 = 0x02;
/// `PP2_TYPE_SSL`: the client connected over TLS; its value is a client
/// flags byte, a 32-bit verify result, then sub-TLVs.
pub const PP2_TYPE_SSL: u8 = 0x20;
/// `PP2_SUBTYPE_SSL_VERSION`: the TLS version, as text (`TLSv1.3`).
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
/// `PP2_CLIENT_SSL`: the client connected over TLS.
pub const PP2_CLIENT_SSL: u8 = 0x01;
/// `PP2_CLIENT_CERT_CONN`: the client presented a certificate on this
/// connection (tcplb never resumes sessions, so it always did).
pub const PP2_CLIENT_CERT_CONN: u8 = 0x02;
/// tcplb's own TLV (in the range `PP2_TYPE_MIN_CUSTOM` 0xE0 to
/// `PP2_TYPE_MAX_CUSTOM` 0xEF that the specification leaves to
/// applications): the client identity tcplb verified and authorized, the
/// URI or DNS SAN of its certificate that a `[[client]]` rule names.
pub const PP2_TYPE_TCPLB_IDENTITY: u8 = 0xE0;

/// A version of the protocol, as `send_proxy` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text line, `PROXY TCP4 ...\r\n`.
    V1,
    /// The binary header, with TLVs.
    V2,
}

impl Version {
    /// The values `send_proxy` takes, in the order of the variants.
    pub const NAMES: [&'static str; 2] = ["v1", "v2"];

    /// The version a `send_proxy` value names.
    pub fn from_name(name: &str) -> Option<Version> {
        match name {
            "v1" => Some(Version::V1),
            "v2" => Some(Version::V2),
            _ => None,
        }
    }

    /// The `send_proxy` value that names it.
    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

/// A header read from a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Which version it was written in.
    pub version: Version,
    /// The client's address and the address it connected to, as the
    /// sender saw them. `None` for a v2 `LOCAL` header (the sender's own
    /// connection, such as a health check), a v1 `UNKNOWN` one, or an
    /// address family tcplb cannot use (UNIX, UDP, unspecified): the
    /// connection's own addresses then stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

/// Why a connection's first bytes are not a header tcplb accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Malformed {
    /// They start like neither a v1 nor a v2 header.
    NotAHeader,
    /// A v1 line with no CRLF within [`V1_MAX`] bytes.
    V1TooLong,
    /// A v2 header announcing more than [`V2_MAX`] bytes in all.
    V2TooLong,
    /// A v1 line that is not `PROXY TCP4|TCP6 src dst sport dport` or `PROXY UNKNOWN`.
    V1Line,
    /// A v2 version other than 2, or a command other than LOCAL or PROXY.
    V2Command,
    /// A v2 address family or protocol that does not exist, or an address
    /// block shorter than its family needs.
    V2Addresses,
    /// v2 TLVs that overrun the header.
    V2Tlvs,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Malformed::NotAHeader => "not a PROXY protocol header",
            Malformed::V1TooLong => "v1 line longer than 107 bytes",
            Malformed::V2TooLong => "v2 header longer than 4096 bytes",
            Malformed::V1Line => "malformed v1 line",
            Malformed::V2Command => "v2 version or command unknown",
            Malformed::V2Addresses => "v2 address family, protocol or addresses malformed",
            Malformed::V2Tlvs => "v2 TLVs malformed",
        })
    }
}

/// What the bytes read so far make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// Not a whole header yet: read at most this many more bytes (for v2
    /// exactly what is missing, for v1 up to the line's bound).
    More(usize),
    /// A whole header of this many bytes; what follows is the client's.
    Done(Header, usize),
    /// Not a header tcplb accepts, whatever may follow.
    Bad(Malformed),
}

/// Reads a header from the first bytes of a connection, `buf` being
/// everything read so far. The verdict for a prefix is `More` until the
/// header is whole or cannot be one, and more bytes never change a `Done`
/// or `Bad`.
pub fn parse(buf: &[u8]) -> Parse {
    if buf.is_empty() {
        return Parse::More(V2_FIXED);
    }
    if starts_like(buf, &V2_SIGNATURE) {
        parse_v2(buf)
    } else if starts_like(buf, V1_PREFIX) {
        parse_v1(buf)
    } else {
        Parse::Bad(Malformed::NotAHeader)
    }
}

/// Whether `buf` is a prefix of `signature` or starts with it.
fn starts_like(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

fn parse_v1(buf: &[u8]) -> Parse {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if buf.len() >= V1_MAX {
            Parse::Bad(Malformed::V1TooLong)
        } else {
            Parse::More(V1_MAX - buf.len())
        };
    };
    match window.get(cr + 1) {
        Some(b'\n') => {}
        Some(_) => return Parse::Bad(Malformed::V1Line),
        // A CR at the very end: the LF may still come, within the bound.
        None if cr + 1 < V1_MAX => return Parse::More(1),
        None => return Parse::Bad(Malformed::V1TooLong),
    }
    let line = &buf[..cr + 2];
    // The specification: after UNKNOWN, the receiver ignores everything
    // up to the CRLF.
    let addresses = match line.strip_prefix(b"PROXY UNKNOWN") {
        Some([b' ' | b'\r', ..]) => None,
        _ => match ppp::v1::Header::try_from(line) {
            Ok(header) => match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some((
                    SocketAddrV4::new(a.source_address, a.source_port).into(),
                    SocketAddrV4::new(a.destination_address, a.destination_port).into(),
                )),
                ppp::v1::Addresses::Tcp6(a) => Some((
                    SocketAddrV6::new(a.source_address, a.source_port, 0, 0).into(),
                    SocketAddrV6::new(a.destination_address, a.destination_port, 0, 0).into(),
                )),
                ppp::v1::Addresses::Unknown => None,
            },
            Err(_) => return Parse::Bad(Malformed::V1Line),
        },
    };
    let header = Header {
        version: Version::V1,
        addresses,
    };
    Parse::Done(header, line.len())
}

fn parse_v2(buf: &[u8]) -> Parse {
    if buf.len() < V2_FIXED {
        return Parse::More(V2_FIXED - buf.len());
    }
    // Refused at once, before waiting for a body that cannot help.
    let (version_command, family_protocol) = (buf[12], buf[13]);
    if version_command >> 4 != 2 || version_command & 0x0F > 1 {
        return Parse::Bad(Malformed::V2Command);
    }
    if family_protocol >> 4 > 3 || family_protocol & 0x0F > 2 {
        return Parse::Bad(Malformed::V2Addresses);
    }
    let total = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if total > V2_MAX {
        return Parse::Bad(Malformed::V2TooLong);
    }
    if buf.len() < total {
        return Parse::More(total - buf.len());
    }
    let header = match v2::Header::try_from(&buf[..total]) {
        Ok(header) => header,
        Err(v2::ParseError::Version(_) | v2::ParseError::Command(_)) => {
            return Parse::Bad(Malformed::V2Command);
        }
        Err(_) => return Parse::Bad(Malformed::V2Addresses),
    };
    if header.tlvs().any(|tlv| tlv.is_err()) {
        return Parse::Bad(Malformed::V2Tlvs);
    }
    let addresses = match (header.command, header.protocol, header.addresses) {
        (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv4(a)) => Some((
            SocketAddrV4::new(a.source_address, a.source_port).into(),
            SocketAddrV4::new(a.destination_address, a.destination_port).into(),
        )),
        (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv6(a)) => Some((
            SocketAddrV6::new(a.source_address, a.source_port, 0, 0).into(),
            SocketAddrV6::new(a.destination_address, a.destination_port, 0, 0).into(),
        )),
        _ => None,
    };
    let header = Header {
        version: Version::V2,
        addresses,
    };
    Parse::Done(header, total)
}

/// What tcplb verified of a TLS client, for a v2 header's TLVs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tls<'a> {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'a str,
    /// The identity tcplb authorized.
    pub identity: Option<&'a str>,
    /// The server name the client asked for (SNI).
    pub authority: Option<&'a str>,
}

/// The header that tells a host about a client at `source` that connected
/// to `destination` (TCP), with what TLS verified (v2 only; v1 has no
/// room for it). Addresses of two families, which no connection has, make
/// a v1 `UNKNOWN` or a v2 `LOCAL` header.
pub fn encode(
    version: Version,
    source: SocketAddr,
    destination: SocketAddr,
    tls: Option<&Tls<'_>>,
) -> Vec<u8> {
    // An IPv4 client of a dual-stack listener is sent as IPv4, when both
    // addresses are IPv4 underneath; a mapped address beside a true IPv6
    // one stays IPv6, or the pair would be of two families.
    let (source, destination) = match (unmapped(source), unmapped(destination)) {
        (s, d) if s.is_ipv4() == d.is_ipv4() => (s, d),
        _ => (source, destination),
    };
    match version {
        Version::V1 => match (source, destination) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                format!(
                    "PROXY TCP4 {} {} {} {}\r\n",
                    s.ip(),
                    d.ip(),
                    s.port(),
                    d.port()
                )
            }
            (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                format!(
                    "PROXY TCP6 {} {} {} {}\r\n",
                    s.ip(),
                    d.ip(),
                    s.port(),
                    d.port()
                )
            }
            _ => "PROXY UNKNOWN\r\n".to_string(),
        }
        .into_bytes(),
        Version::V2 => {
            if source.is_ipv4() != destination.is_ipv4() {
                return encode_local(Version::V2);
            }
            let addresses = v2::Addresses::from((source, destination));
            let builder = v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                addresses,
            );
            match tls {
                None => builder.build(),
                Some(tls) => with_tls(builder, tls).and_then(v2::Builder::build),
            }
            // Only a TLV over 64 KiB fails, which no SNI or configured
            // identity is; the addresses alone then.
            .unwrap_or_else(|_| {
                v2::Builder::with_addresses(
                    v2::Version::Two | v2::Command::Proxy,
                    v2::Protocol::Stream,
                    addresses,
                )
                .build()
                .unwrap_or_default()
            })
        }
    }
}

/// The TLVs of a TLS client, in type order.
fn with_tls(builder: v2::Builder, tls: &Tls<'_>) -> std::io::Result<v2::Builder> {
    let mut builder = builder;
    if let Some(authority) = tls.authority {
        builder = builder.write_tlv(PP2_TYPE_AUTHORITY, authority.as_bytes())?;
    }
    let version = tls.version.as_bytes();
    let mut ssl = Vec::with_capacity(8 + version.len());
    ssl.push(PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN);
    // verify: 0 means the client's certificate was verified.
    ssl.extend_from_slice(&0u32.to_be_bytes());
    ssl.push(PP2_SUBTYPE_SSL_VERSION);
    ssl.extend_from_slice(&u16::try_from(version.len()).unwrap_or(0).to_be_bytes());
    ssl.extend_from_slice(version);
    builder = builder.write_tlv(PP2_TYPE_SSL, &ssl)?;
    if let Some(identity) = tls.identity {
        builder = builder.write_tlv(PP2_TYPE_TCPLB_IDENTITY, identity.as_bytes())?;
    }
    Ok(builder)
}

/// The header of a connection of tcplb's own (a health probe): v1
/// `UNKNOWN`, v2 `LOCAL`, so that the host uses the connection's addresses.
pub fn encode_local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut header = V2_SIGNATURE.to_vec();
            header.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
            header
        }
    }
}

/// An IPv4 address seen through a dual-stack socket (`::ffff:a.b.c.d`) as
/// the IPv4 address it is, so that a v1 line says TCP4 for an IPv4 client.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(bytes: &[u8]) -> (Header, usize) {
        match parse(bytes) {
            Parse::Done(header, len) => (header, len),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn addrs(src: &str, dst: &str) -> Option<(SocketAddr, SocketAddr)> {
        Some((src.parse().unwrap(), dst.parse().unwrap()))
    }

    /// Feeds `bytes` as `parse` asks for them, one read of at most what it
    /// says at a time, each read cut to `chunk`: the verdict, and what was
    /// read (the header, and whatever the last read brought past it).
    fn feed(bytes: &[u8], chunk: usize) -> (Parse, usize) {
        let mut have = 0;
        loop {
            match parse(&bytes[..have]) {
                Parse::More(n) if have < bytes.len() => {
                    have += n.min(chunk).min(bytes.len() - have);
                }
                verdict => return (verdict, have),
            }
        }
    }

    // The examples of the specification's section 2.1.
    #[test]
    fn v1_lines_of_the_specification() {
        let tcp4 = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
        assert_eq!(
            done(tcp4),
            (
                Header {
                    version: Version::V1,
                    addresses: addrs("255.255.255.255:65535", "255.255.255.255:65535"),
                },
                56
            )
        );
        let tcp6 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        let all = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        assert_eq!(
            done(tcp6),
            (
                Header {
                    version: Version::V1,
                    addresses: addrs(all, all)
                },
                104
            )
        );
        let unknown = b"PROXY UNKNOWN\r\n";
        assert_eq!(done(unknown).0.addresses, None);
        assert_eq!(done(unknown).1, 15);
        // The worst case, 107 bytes: UNKNOWN with the longest addresses.
        let longest = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(longest.len(), V1_MAX);
        assert_eq!(
            done(longest),
            (
                Header {
                    version: Version::V1,
                    addresses: None
                },
                107
            )
        );
        // The example of section 2.1, with the client's data after it.
        let with_data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n";
        let (header, len) = done(with_data);
        assert_eq!(
            header.addresses,
            addrs("192.168.0.1:56324", "192.168.0.11:443")
        );
        assert_eq!(&with_data[len..], b"GET / HTTP/1.1\r\n");
        // After UNKNOWN anything may follow, up to the CRLF.
        assert_eq!(done(b"PROXY UNKNOWN a b c d e f\r\n").0.addresses, None);
    }

    #[test]
    fn v1_lines_that_are_wrong() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\rX"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 9\r\n",
            b"PROXY TCP4 ::1 ::1 80 443\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 80 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 65536\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 080 443\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 80 443\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 80 443\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\n",
            b"PROXY \r\n",
            b"PROXY UNKNOWNX\r\n",
        ] {
            let text = String::from_utf8_lossy(bad);
            match parse(bad) {
                Parse::Bad(Malformed::V1Line) => {}
                // A line with no CR yet is still waiting for one.
                Parse::More(_) if !bad.contains(&b'\r') => {}
                other => panic!("{text:?}: {other:?}"),
            }
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 100]].concat();
        assert_eq!(parse(&long), Parse::Bad(Malformed::V1TooLong));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n"),
            Parse::Bad(Malformed::NotAHeader)
        );
        assert_eq!(parse(b"\x16\x03\x01"), Parse::Bad(Malformed::NotAHeader));
        assert_eq!(parse(b"PROXX"), Parse::Bad(Malformed::NotAHeader));
    }

    /// The v2 header of the specification's section 2.2 for a TCP over
    /// IPv4 client 192.168.0.1:56324 that connected to 192.168.0.11:443,
    /// written out field by field.
    const V2_TCP4: [u8; 28] = [
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
        0x21, // version 2, command PROXY
        0x11, // AF_INET, STREAM
        0x00, 0x0C, // 12 bytes of addresses
        192, 168, 0, 1, // source address
        192, 168, 0, 11, // destination address
        0xDC, 0x04, // source port 56324
        0x01, 0xBB, // destination port 443
    ];

    #[test]
    fn a_v2_header_of_the_specification() {
        assert_eq!(
            done(&V2_TCP4),
            (
                Header {
                    version: Version::V2,
                    addresses: addrs("192.168.0.1:56324", "192.168.0.11:443"),
                },
                28
            )
        );
        // IPv6 (0x21), with a NOOP TLV (type 4) and the client's data after.
        let mut tcp6 = V2_SIGNATURE.to_vec();
        tcp6.extend_from_slice(&[0x21, 0x21, 0x00, 36 + 5]);
        tcp6.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        tcp6.extend_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        tcp6.extend_from_slice(&[0x30, 0x39, 0x00, 0x50, 0x04, 0x00, 0x02, 0xAA, 0xBB]);
        let len = tcp6.len();
        tcp6.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(
            done(&tcp6),
            (
                Header {
                    version: Version::V2,
                    addresses: addrs("[2001:db8::1]:12345", "[2001:db8::2]:80"),
                },
                len
            )
        );
        // LOCAL (a health check of the sender's own): no addresses.
        let local = encode_local(Version::V2);
        assert_eq!(
            local,
            [&V2_SIGNATURE[..], &[0x20, 0x00, 0x00, 0x00]].concat()
        );
        assert_eq!(
            done(&local),
            (
                Header {
                    version: Version::V2,
                    addresses: None
                },
                16
            )
        );
        // AF_UNIX (0x31): valid, but no address tcplb can use.
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 216]);
        unix.extend_from_slice(&[0; 216]);
        assert_eq!(done(&unix).0.addresses, None);
    }

    #[test]
    fn v2_headers_that_are_wrong() {
        let with = |at: usize, byte: u8| {
            let mut h = V2_TCP4.to_vec();
            h[at] = byte;
            h
        };
        assert_eq!(
            parse(&with(12, 0x11)),
            Parse::Bad(Malformed::V2Command),
            "version 1"
        );
        assert_eq!(
            parse(&with(12, 0x22)),
            Parse::Bad(Malformed::V2Command),
            "command 2"
        );
        assert_eq!(
            parse(&with(13, 0x41)),
            Parse::Bad(Malformed::V2Addresses),
            "family 4"
        );
        assert_eq!(
            parse(&with(13, 0x13)),
            Parse::Bad(Malformed::V2Addresses),
            "protocol 3"
        );
        // Announcing fewer bytes than IPv4 addresses take.
        let short = with(15, 4);
        assert_eq!(parse(&short[..20]), Parse::Bad(Malformed::V2Addresses));
        // A TLV overrunning the header.
        let mut tlv = with(15, 12 + 3);
        tlv.extend_from_slice(&[0x04, 0x00, 0x09]);
        assert_eq!(parse(&tlv), Parse::Bad(Malformed::V2Tlvs));
        // Announcing more than the cap: refused before the body arrives.
        let mut huge = V2_TCP4[..16].to_vec();
        huge[14..16].copy_from_slice(&((V2_MAX - 16 + 1) as u16).to_be_bytes());
        assert_eq!(parse(&huge), Parse::Bad(Malformed::V2TooLong));
        huge[14..16].copy_from_slice(&((V2_MAX - 16) as u16).to_be_bytes());
        assert_eq!(parse(&huge), Parse::More(V2_MAX - 16));
        // The signature, broken anywhere.
        assert_eq!(
            parse(&with(5, 0x0A)[..7]),
            Parse::Bad(Malformed::NotAHeader)
        );
    }

    #[test]
    fn a_header_arriving_in_pieces_is_read_to_its_end_and_no_further() {
        let v1 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
        let mut v2 = V2_TCP4.to_vec();
        v2.extend_from_slice(&[0x04, 0x00, 0x01, 0x00]);
        v2[15] += 4;
        for header in [&v1[..], &v2] {
            let mut stream = header.to_vec();
            stream.extend_from_slice(&[0x16; 300]);
            for chunk in [1, 2, 3, 7, 16, 1000] {
                let (verdict, read) = feed(&stream, chunk);
                assert_eq!(verdict, parse(header), "in chunks of {chunk}");
                let Parse::Done(_, len) = verdict else {
                    unreachable!()
                };
                assert_eq!(len, header.len());
                if header[0] == b'\r' {
                    assert_eq!(read, header.len(), "nothing past a v2 header is read");
                } else {
                    assert!(read - len < V1_MAX - V2_FIXED, "{read} read for {len}");
                }
            }
        }
        // Every prefix of a header is just incomplete.
        for n in 0..v1.len() {
            assert!(matches!(parse(&v1[..n]), Parse::More(_)), "{n}");
        }
        for n in 0..v2.len() {
            assert_eq!(
                parse(&v2[..n]),
                Parse::More(if n < 16 { 16 - n } else { v2.len() - n })
            );
        }
    }

    #[test]
    fn what_is_sent_reads_back_the_same() {
        let cases = [
            ("10.1.2.3:40000", "10.0.0.1:443"),
            ("[2001:db8::7]:40000", "[2001:db8::1]:443"),
            ("[::ffff:10.1.2.3]:40000", "[::ffff:10.0.0.1]:443"),
        ];
        for (src, dst) in cases {
            let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            for version in [Version::V1, Version::V2] {
                let bytes = encode(version, s, d, None);
                let expected = Header {
                    version,
                    addresses: Some((unmapped(s), unmapped(d))),
                };
                assert_eq!(done(&bytes), (expected, bytes.len()), "{src} {version:?}");
            }
        }
        let v1 = encode(
            Version::V1,
            "192.168.0.1:56324".parse().unwrap(),
            "192.168.0.11:443".parse().unwrap(),
            None,
        );
        assert_eq!(v1, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let v2 = encode(
            Version::V2,
            "192.168.0.1:56324".parse().unwrap(),
            "192.168.0.11:443".parse().unwrap(),
            None,
        );
        assert_eq!(v2, V2_TCP4);
        // A mapped address beside a true IPv6 one: both stay IPv6 (found
        // by the fuzz target, which had encode make a LOCAL header of it).
        let (s, d): (SocketAddr, SocketAddr) = (
            "[::1]:1".parse().unwrap(),
            "[::ffff:255.48.0.2]:2".parse().unwrap(),
        );
        for version in [Version::V1, Version::V2] {
            assert_eq!(done(&encode(version, s, d, None)).0.addresses, Some((s, d)));
        }
        let mixed = encode(
            Version::V1,
            "1.2.3.4:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
            None,
        );
        assert_eq!(mixed, b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn tls_facts_travel_in_tlvs() {
        let tls = Tls {
            version: "TLSv1.3",
            identity: Some("spiffe://example.org/bob"),
            authority: Some("app.example.org"),
        };
        let bytes = encode(
            Version::V2,
            "192.168.0.1:56324".parse().unwrap(),
            "192.168.0.11:443".parse().unwrap(),
            Some(&tls),
        );
        let header = v2::Header::try_from(bytes.as_slice()).unwrap();
        let tlvs: Vec<(u8, Vec<u8>)> = header
            .tlvs()
            .map(|t| {
                let t = t.unwrap();
                (t.kind, t.value.to_vec())
            })
            .collect();
        let mut ssl = vec![0x03, 0, 0, 0, 0, 0x21, 0x00, 0x07];
        ssl.extend_from_slice(b"TLSv1.3");
        assert_eq!(
            tlvs,
            [
                (0x02, b"app.example.org".to_vec()),
                (0x20, ssl),
                (0xE0, b"spiffe://example.org/bob".to_vec()),
            ]
        );
        assert_eq!(done(&bytes).1, bytes.len());
        // v1 has no room for them.
        let v1 = encode(
            Version::V1,
            "1.2.3.4:1".parse().unwrap(),
            "5.6.7.8:2".parse().unwrap(),
            Some(&tls),
        );
        assert_eq!(v1, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n");
    }
}
