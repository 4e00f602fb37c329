//! Probes through the tunnel: an ICMP echo request to a peer's own mesh
//! address. The peer's kernel answers it through the tunnel, so the answer
//! is authenticated (it moves the peer's received-bytes counter, whichever
//! data plane either end runs) and is read back here, naming the peer that
//! answered. Echo replies are informational: the kernel does not
//! rate-limit them as it does errors (`icmp_ratemask`), so probing a busy
//! link stays answered. A probe also makes a data plane with no session
//! handshake now (Debian's wireguard-go, for one, waits for traffic).
//!
//! Raw ICMP sockets need `CAP_NET_RAW`. Without it, a probe is a UDP
//! datagram to the discard port, which still prompts a handshake but whose
//! answer (an ICMP error) is not read: liveness falls back to silence.

use std::collections::BTreeSet;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use crate::model::Peer;

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
/// What a probe carries, so its reply is told from other pings' replies.
const PAYLOAD: &[u8] = b"weft probe";
/// The discard port (RFC 863): nothing listens, nothing is done.
const DISCARD: u16 = 9;

/// The peer's own mesh address (IPv4 first), if its entry routes it: the
/// node's own traffic to it goes through the tunnel straight to that peer
/// (a relay's entry also holds the addresses of the nodes it carries, and
/// a relayed peer's own address is on its relay's entry).
pub fn target(peer: &Peer) -> Option<IpAddr> {
    let mut own: Vec<IpAddr> = peer
        .mesh_addresses
        .iter()
        .copied()
        .filter(|a| peer.allowed_ips.iter().any(|n| n.contains(a)))
        .collect();
    own.sort_by_key(|a| a.is_ipv6());
    own.first().copied()
}

/// How a probe went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// An echo request, whose reply [`Prober::answers`] reads.
    Echo,
    /// A datagram to the discard port (no `CAP_NET_RAW`): it prompts a
    /// handshake; its answer is not read.
    Datagram,
}

/// One raw ICMP socket per family (`None`: not permitted), kept open so
/// that replies can be read.
pub struct Prober {
    v4: Option<Socket>,
    v6: Option<Socket>,
    id: u16,
    sequence: u16,
}

fn raw(domain: Domain, protocol: Protocol) -> Option<Socket> {
    let socket = Socket::new(domain, Type::RAW, Some(protocol)).ok()?;
    socket.set_nonblocking(true).ok()?;
    Some(socket)
}

impl Prober {
    pub fn new() -> Self {
        Prober {
            v4: raw(Domain::IPV4, Protocol::ICMPV4),
            v6: raw(Domain::IPV6, Protocol::ICMPV6),
            id: std::process::id() as u16,
            sequence: 0,
        }
    }

    /// Whether echoes can be sent (and their replies read).
    pub fn echoes(&self) -> bool {
        self.v4.is_some() || self.v6.is_some()
    }

    pub fn send(&mut self, target: IpAddr) -> io::Result<Sent> {
        let socket = match target {
            IpAddr::V4(_) => self.v4.as_ref(),
            IpAddr::V6(_) => self.v6.as_ref(),
        };
        let Some(socket) = socket else {
            let unspecified: IpAddr = match target {
                IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
            };
            UdpSocket::bind((unspecified, 0))?.send_to(&[], (target, DISCARD))?;
            return Ok(Sent::Datagram);
        };
        self.sequence = self.sequence.wrapping_add(1);
        let packet = echo_request(target.is_ipv6(), self.id, self.sequence);
        socket.send_to(&packet, &SocketAddr::new(target, 0).into())?;
        Ok(Sent::Echo)
    }

    /// The addresses whose replies to this prober's echoes arrived since
    /// the last call.
    pub fn answers(&self) -> BTreeSet<IpAddr> {
        let mut from = BTreeSet::new();
        for (socket, v6) in [(&self.v4, false), (&self.v6, true)] {
            let Some(socket) = socket else { continue };
            let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
            while let Ok((n, addr)) = socket.recv_from(&mut buf) {
                // SAFETY: recv_from initialised the first n bytes.
                let packet = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
                if let Some(source) = addr.as_socket().map(|a| a.ip()) {
                    if is_reply(v6, packet, self.id) {
                        from.insert(source.to_canonical());
                    }
                }
            }
        }
        from
    }
}

impl Default for Prober {
    fn default() -> Self {
        Self::new()
    }
}

/// The internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request: type, code, checksum, identifier, sequence, payload.
/// The kernel computes an ICMPv6 checksum itself (it covers the IPv6
/// pseudo-header); ICMPv4's is ours.
fn echo_request(v6: bool, id: u16, sequence: u16) -> Vec<u8> {
    let kind = if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 };
    let mut packet = vec![kind, 0, 0, 0];
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&sequence.to_be_bytes());
    packet.extend_from_slice(PAYLOAD);
    if !v6 {
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    packet
}

/// Whether `packet`, as a raw socket of its family reads it (IPv4 with its
/// IP header, ICMPv6 without), is a reply to one of our echoes.
fn is_reply(v6: bool, packet: &[u8], id: u16) -> bool {
    let icmp = match v6 {
        true => packet,
        false => match packet.first() {
            // IPv4, with a header of at least the 20 fixed bytes.
            Some(b) if b >> 4 == 4 && b & 0x0f >= 5 => {
                packet.get(usize::from(b & 0x0f) * 4..).unwrap_or_default()
            }
            _ => return false,
        },
    };
    let reply = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
    icmp.len() >= 8 + PAYLOAD.len()
        && icmp[0] == reply
        && icmp[4..6] == id.to_be_bytes()
        && icmp[8..].starts_with(PAYLOAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_probed_at_its_own_address_only_where_its_entry_routes_it() {
        let peer = |own: &[&str], allowed: &[&str]| Peer {
            node: "r".into(),
            kind: crate::model::PeerKind::Node,
            endpoint: None,
            offers: Vec::new(),
            allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
            mesh_addresses: own.iter().map(|a| a.parse().unwrap()).collect(),
            persistent_keepalive: None,
            replaces: None,
            preshared_key: None,
            key_ends_sessions: false,
        };
        let ip = |a: &str| Some(a.parse::<IpAddr>().unwrap());
        for (own, allowed, want) in [
            // A relay: its entry also holds a relayed node's lower address.
            (
                &["100.64.0.9", "fd64::9"][..],
                &["100.64.0.3/32", "100.64.0.9/32", "fd64::9/128"][..],
                ip("100.64.0.9"),
            ),
            // IPv6 only.
            (&["fd64::9"], &["fd64::9/128"], ip("fd64::9")),
            // Relayed: its own address is on the relay's entry.
            (&["100.64.0.9"], &[], None),
            (&[], &["100.64.0.3/32"], None),
        ] {
            assert_eq!(target(&peer(own, allowed)), want, "{own:?} {allowed:?}");
        }
    }

    #[test]
    fn an_icmpv4_echo_request_checks_out() {
        let packet = echo_request(false, 0x1234, 7);
        assert_eq!(packet[0], ECHO_REQUEST_V4);
        assert_eq!(&packet[4..8], &[0x12, 0x34, 0, 7]);
        // A correct checksum makes the whole message sum to zero.
        assert_eq!(checksum(&packet), 0);
        // RFC 1071's example, odd length padded with zero.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn icmpv6_checksums_are_left_to_the_kernel() {
        let packet = echo_request(true, 1, 1);
        assert_eq!((packet[0], &packet[2..4]), (ECHO_REQUEST_V6, &[0u8, 0][..]));
    }

    #[test]
    fn only_replies_to_our_echoes_are_answers() {
        let reply = |kind: u8, id: u16, payload: &[u8]| {
            let mut p = vec![kind, 0, 0, 0];
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&[0, 1]);
            p.extend_from_slice(payload);
            p
        };
        let v4 = |icmp: Vec<u8>| {
            let mut ip = vec![0x45];
            ip.resize(20, 0);
            ip.extend(icmp);
            ip
        };
        for (v6, packet, answer) in [
            (false, v4(reply(ECHO_REPLY_V4, 7, PAYLOAD)), true),
            (true, reply(ECHO_REPLY_V6, 7, PAYLOAD), true),
            // Another process's ping, a request, another payload.
            (false, v4(reply(ECHO_REPLY_V4, 8, PAYLOAD)), false),
            (false, v4(reply(ECHO_REQUEST_V4, 7, PAYLOAD)), false),
            (true, reply(ECHO_REPLY_V6, 7, b"abcdefghijkl"), false),
            // An ICMPv4 packet read without its IP header, and truncated ones.
            (false, reply(ECHO_REPLY_V4, 7, PAYLOAD), false),
            (true, reply(ECHO_REPLY_V6, 7, b"weft"), false),
            (false, vec![0x4f], false),
            (true, vec![], false),
        ] {
            assert_eq!(is_reply(v6, &packet, 7), answer, "{packet:?}");
        }
    }
}
