//! Which peers may speak for their clients: the networks of `accept_proxy`
//! whose connections begin with a PROXY protocol header. Plain data, no I/O.
//!
//! An IPv4 peer seen through a dual-stack listener (`::ffff:a.b.c.d`) is
//! matched as the IPv4 address it is.

use std::fmt;
use std::net::IpAddr;

/// One network: an address and how many of its leading bits count.
/// The bits past the prefix are zero (the config refuses others).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceNet {
    addr: IpAddr,
    prefix: u8,
}

impl SourceNet {
    /// The network of `addr`'s first `prefix` bits, or `None` when the
    /// prefix is longer than the address (32 bits, or 128 for IPv6).
    /// Bits of `addr` past the prefix are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<SourceNet> {
        let net = SourceNet { addr, prefix };
        if prefix > net.width() {
            return None;
        }
        Some(SourceNet {
            addr: net.masked(addr)?,
            prefix,
        })
    }

    /// The network's address (its bits past the prefix are zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn width(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    /// `ip` with the bits past the prefix cleared, if it is of this family.
    fn masked(&self, ip: IpAddr) -> Option<IpAddr> {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(_), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                Some(IpAddr::V4((u32::from(ip) & mask).into()))
            }
            (IpAddr::V6(_), ip) => {
                // An IPv4 peer against an IPv6 network: as its mapped address.
                let ip = match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                Some(IpAddr::V6((u128::from(ip) & mask).into()))
            }
            (IpAddr::V4(_), IpAddr::V6(_)) => None,
        }
    }

    /// Whether `ip` is in the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.masked(ip) == Some(self.addr)
    }

    /// Whether this is every address of its family (`0.0.0.0/0`, `::/0`).
    pub fn is_everything(&self) -> bool {
        self.prefix == 0
    }
}

impl fmt::Display for SourceNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(addr: &str, prefix: u8) -> SourceNet {
        SourceNet::new(addr.parse().unwrap(), prefix).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_hold_their_addresses_and_no_others() {
        let ten = net("10.0.0.0", 8);
        assert!(ten.contains(ip("10.0.0.0")) && ten.contains(ip("10.255.255.255")));
        assert!(!ten.contains(ip("11.0.0.0")) && !ten.contains(ip("9.255.255.255")));
        let one = net("127.0.0.1", 32);
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6 = net("2001:db8::", 32);
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::")));
        assert!(!v6.contains(ip("10.0.0.1")) && !ten.contains(ip("2001:db8::1")));
        assert!(net("0.0.0.0", 0).contains(ip("203.0.113.9")));
        assert!(net("::", 0).contains(ip("::1")));
        assert!(net("::1", 128).contains(ip("::1")));
    }

    #[test]
    fn a_mapped_ipv4_peer_is_its_ipv4_address() {
        assert!(net("10.0.0.0", 8).contains(ip("::ffff:10.1.2.3")));
        assert!(net("::ffff:10.0.0.0", 104).contains(ip("10.1.2.3")));
        assert!(!net("10.0.0.0", 8).contains(ip("::ffff:11.1.2.3")));
    }

    #[test]
    fn prefixes_are_bounded_and_host_bits_cleared() {
        assert_eq!(SourceNet::new(ip("10.0.0.0"), 33), None);
        assert_eq!(SourceNet::new(ip("::"), 129), None);
        assert_eq!(net("10.1.2.3", 8).to_string(), "10.0.0.0/8");
    }
}
