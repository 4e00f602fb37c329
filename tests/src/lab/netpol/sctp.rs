//! Just enough SCTP to probe reachability on a kernel without an SCTP
//! stack (this one has none): the client sends an INIT from a raw socket
//! and a raw-socket responder answers with an INIT ACK. That exchange is
//! what conntrack tracks as a new association and its reply, so policy
//! sees exactly what a real SCTP connect would show it.

use std::net::Ipv4Addr;

/// IANA protocol number of SCTP.
pub const PROTOCOL: i32 = 132;

const HEADER: usize = 12;
const INIT: u8 = 1;
const INIT_ACK: u8 = 2;
/// The fixed part of INIT and INIT ACK chunks (RFC 9260 §3.3.2–3).
const INIT_CHUNK: usize = 20;
const STATE_COOKIE: u16 = 7;

/// The parts of a packet the probe looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src_port: u16,
    pub dst_port: u16,
    pub verification_tag: u32,
    pub chunk: u8,
    /// The INIT or INIT ACK's initiate tag.
    pub initiate_tag: u32,
}

impl Packet {
    pub fn is_init(&self) -> bool {
        self.chunk == INIT
    }

    /// Whether this answers `init` (an INIT this side sent).
    pub fn acks(&self, init: &Packet) -> bool {
        self.chunk == INIT_ACK
            && self.src_port == init.dst_port
            && self.dst_port == init.src_port
            && self.verification_tag == init.initiate_tag
    }
}

fn packet(src_port: u16, dst_port: u16, verification_tag: u32, chunk: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + chunk.len());
    out.extend_from_slice(&src_port.to_be_bytes());
    out.extend_from_slice(&dst_port.to_be_bytes());
    out.extend_from_slice(&verification_tag.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(chunk);
    // CRC32c over the packet with a zero checksum, stored little-endian
    // (RFC 9260 appendix A; what Linux writes and verifies).
    let crc = crc32c::crc32c(&out);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

fn init_chunk(kind: u8, initiate_tag: u32, params: &[u8]) -> Vec<u8> {
    let length = (INIT_CHUNK + params.len()) as u16;
    let mut chunk = vec![kind, 0];
    chunk.extend_from_slice(&length.to_be_bytes());
    chunk.extend_from_slice(&initiate_tag.to_be_bytes());
    chunk.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    chunk.extend_from_slice(&1u16.to_be_bytes()); // outbound streams
    chunk.extend_from_slice(&1u16.to_be_bytes()); // inbound streams
    chunk.extend_from_slice(&initiate_tag.to_be_bytes()); // initial TSN
    chunk.extend_from_slice(params);
    chunk
}

/// An INIT from `src_port` to `dst_port`; the reply must carry
/// `initiate_tag` as its verification tag.
pub fn init(src_port: u16, dst_port: u16, initiate_tag: u32) -> Vec<u8> {
    packet(src_port, dst_port, 0, &init_chunk(INIT, initiate_tag, &[]))
}

/// The INIT ACK answering `init`, with a token state cookie.
pub fn init_ack(init: &Packet, initiate_tag: u32) -> Vec<u8> {
    let mut cookie = STATE_COOKIE.to_be_bytes().to_vec();
    cookie.extend_from_slice(&8u16.to_be_bytes());
    cookie.extend_from_slice(&initiate_tag.to_be_bytes());
    packet(
        init.dst_port,
        init.src_port,
        init.initiate_tag,
        &init_chunk(INIT_ACK, initiate_tag, &cookie),
    )
}

/// Parses an SCTP packet whose first chunk is an INIT or INIT ACK with a
/// valid checksum; anything else is `None`.
pub fn parse(bytes: &[u8]) -> Option<Packet> {
    if bytes.len() < HEADER + INIT_CHUNK {
        return None;
    }
    let mut zeroed = bytes.to_vec();
    zeroed[8..12].fill(0);
    if crc32c::crc32c(&zeroed).to_le_bytes() != bytes[8..12] {
        return None;
    }
    let u16_at = |i: usize| u16::from_be_bytes([bytes[i], bytes[i + 1]]);
    let u32_at =
        |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let chunk = bytes[HEADER];
    if chunk != INIT && chunk != INIT_ACK {
        return None;
    }
    Some(Packet {
        src_port: u16_at(0),
        dst_port: u16_at(2),
        verification_tag: u32_at(4),
        chunk,
        initiate_tag: u32_at(HEADER + 4),
    })
}

/// An IPv4 datagram as a raw socket delivers it: its source and payload.
pub fn strip_ipv4(datagram: &[u8]) -> Option<(Ipv4Addr, &[u8])> {
    let header = usize::from(*datagram.first()? & 0x0f) * 4;
    if header < 20 || datagram.len() < header {
        return None;
    }
    let src = Ipv4Addr::new(datagram[12], datagram[13], datagram[14], datagram[15]);
    Some((src, &datagram[header..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_crc32c() {
        // The check value of CRC-32C (Castagnoli).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn init_and_its_ack_round_trip() {
        let sent = init(40000, 80, 0xdead_beef);
        let init = parse(&sent).unwrap();
        assert!(init.is_init());
        assert_eq!(
            (init.src_port, init.dst_port, init.verification_tag),
            (40000, 80, 0)
        );
        let reply = parse(&init_ack(&init, 7)).unwrap();
        assert!(reply.acks(&init));
        assert_eq!(reply.initiate_tag, 7);
        // Not an answer to another INIT.
        let other = parse(&super::init(40001, 80, 0xdead_beef)).unwrap();
        assert!(!reply.acks(&other));
    }

    #[test]
    fn corrupt_or_short_packets_are_rejected() {
        let mut sent = init(40000, 80, 1);
        sent[20] ^= 1;
        assert_eq!(parse(&sent), None);
        assert_eq!(parse(&sent[..10]), None);
    }

    #[test]
    fn ipv4_header_is_stripped_by_its_length() {
        let mut datagram = vec![0x46, 0, 0, 0, 0, 0, 0, 0, 64, 132, 0, 0, 198, 19, 1, 2];
        datagram.extend_from_slice(&[0; 8]); // header with 4 bytes of options
        datagram.extend_from_slice(b"payload");
        let (src, payload) = strip_ipv4(&datagram).unwrap();
        assert_eq!(src, Ipv4Addr::new(198, 19, 1, 2));
        assert_eq!(payload, b"payload");
        assert_eq!(strip_ipv4(&[0x45, 0]), None);
    }
}
