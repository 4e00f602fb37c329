//! Addresses as integers, for arithmetic on either family.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub fn address_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address `bits` in `family`'s address family.
pub fn address_from_bits(family: &IpNet, bits: u128) -> IpAddr {
    match family {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(bits as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
    }
}

/// The prefix `bits/prefix` in `family`'s address family. The prefix must
/// be valid for the family (callers validate it once, up front).
pub fn net_from_bits(family: IpNet, bits: u128, prefix: u8) -> IpNet {
    match address_from_bits(&family, bits) {
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, prefix).expect("validated IPv4 prefix")),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, prefix).expect("validated IPv6 prefix")),
    }
}
