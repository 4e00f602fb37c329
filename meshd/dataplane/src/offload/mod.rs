//! Segmentation and coalescing offloads for the userspace data plane, pure
//! so they are tested from tables: the kernel hands the TUN reader TCP (and
//! UDP) super-packets of up to 64 KB with a virtio-net header saying how to
//! cut them ([`gso`]), and takes from the TUN writer coalesced super-packets
//! the same way ([`gro`]). One super-packet crosses the kernel's stack once
//! instead of forty times; that, not the crypto, is where userspace
//! WireGuard spends its time.

pub mod checksum;
pub mod gro;
pub mod gso;

/// The length of `struct virtio_net_hdr` (without `num_buffers`), the
/// TUN's default `TUNSETVNETHDRSZ`.
pub const VNET_HDR_LEN: usize = 10;

/// The largest packet the TUN exchanges: an IP datagram's 16-bit length.
pub const MAX_PACKET: usize = 65_535;

/// `VIRTIO_NET_HDR_F_*`.
pub const F_NEEDS_CSUM: u8 = 1;
pub const F_DATA_VALID: u8 = 2;

/// `VIRTIO_NET_HDR_GSO_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoType {
    None,
    TcpV4,
    TcpV6,
    /// UDP segmentation (`UDP_L4`), from kernels with `TUN_F_USO4/6`.
    UdpL4,
}

impl GsoType {
    fn from_wire(t: u8) -> Option<Self> {
        // The ECN bit (0x80) only says the segments carry CWR as TCP does.
        Some(match t & 0x7f {
            0 => Self::None,
            1 => Self::TcpV4,
            4 => Self::TcpV6,
            5 => Self::UdpL4,
            _ => return None,
        })
    }

    fn to_wire(self) -> u8 {
        match self {
            Self::None => 0,
            Self::TcpV4 => 1,
            Self::TcpV6 => 4,
            Self::UdpL4 => 5,
        }
    }
}

/// `struct virtio_net_hdr`, in the host's byte order (a TUN without
/// `TUNSETVNETBE`/`LE` uses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: GsoType,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// A plain packet: nothing to segment, checksum complete.
    pub const NONE: Self = Self {
        flags: 0,
        gso_type: GsoType::None,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    pub fn decode(b: &[u8; VNET_HDR_LEN]) -> Result<Self, OffloadError> {
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Ok(Self {
            flags: b[0],
            gso_type: GsoType::from_wire(b[1]).ok_or(OffloadError::GsoType(b[1]))?,
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type.to_wire();
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Why a packet from the TUN could not be processed (it is dropped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("unknown virtio-net GSO type {0}")]
    GsoType(u8),
    #[error("packet too short for its {0}")]
    Truncated(&'static str),
    #[error("virtio-net header: {0} out of range")]
    Header(&'static str),
    #[error("GSO type {0:?} on a packet that is not one")]
    Mismatch(GsoType),
}

/// IP version and the offsets of a packet's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(packet: &[u8]) -> Option<Self> {
        match packet.first()? >> 4 {
            4 if packet.len() >= 20 => Some(Self::V4),
            6 if packet.len() >= 40 => Some(Self::V6),
            _ => None,
        }
    }

    /// The source and destination addresses, back to back.
    pub fn addresses(self) -> std::ops::Range<usize> {
        match self {
            Self::V4 => 12..20,
            Self::V6 => 8..40,
        }
    }

    fn address_len(self) -> usize {
        match self {
            Self::V4 => 4,
            Self::V6 => 16,
        }
    }

    /// Sets the IP length field for a packet of `total` bytes whose
    /// transport header starts at `l4`, and the IPv4 header checksum.
    fn set_length(self, packet: &mut [u8], total: usize) {
        match self {
            Self::V4 => {
                packet[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                set_ipv4_checksum(packet);
            }
            Self::V6 => packet[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes()),
        }
    }

    /// The pseudo-header sum of `packet` for a transport of `length` bytes.
    fn pseudo_header(self, packet: &[u8], protocol: u8, length: usize) -> u64 {
        let a = self.addresses();
        let n = self.address_len();
        checksum::pseudo_header(
            &packet[a.start..a.start + n],
            &packet[a.start + n..a.end],
            protocol,
            length,
        )
    }
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

fn set_ipv4_checksum(packet: &mut [u8]) {
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    packet[10..12].copy_from_slice(&[0, 0]);
    let c = checksum::checksum(&packet[..ihl], 0);
    packet[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Writes the transport checksum of `packet[l4..]` at `l4 + offset`.
fn set_transport_checksum(
    family: Family,
    packet: &mut [u8],
    l4: usize,
    protocol: u8,
    offset: usize,
) {
    let len = packet.len() - l4;
    packet[l4 + offset..l4 + offset + 2].copy_from_slice(&[0, 0]);
    let mut c = checksum::checksum(&packet[l4..], family.pseudo_header(packet, protocol, len));
    if protocol == PROTO_UDP && c == 0 {
        // A computed zero is sent as all ones: zero means "no checksum".
        c = 0xffff;
    }
    packet[l4 + offset..l4 + offset + 2].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
pub(crate) mod testing {
    //! Packets built field by field, for the offload tables.
    use super::*;

    pub struct Tcp<'a> {
        pub family: Family,
        pub seq: u32,
        pub ack: u32,
        pub flags: u8,
        pub window: u16,
        pub options: &'a [u8],
        pub payload: &'a [u8],
        pub ttl: u8,
        pub id: u16,
    }

    pub const ACK: u8 = 0x10;
    pub const PSH: u8 = 0x08;
    pub const FIN: u8 = 0x01;
    pub const CWR: u8 = 0x80;

    impl Default for Tcp<'_> {
        fn default() -> Self {
            Self {
                family: Family::V4,
                seq: 1000,
                ack: 77,
                flags: ACK,
                window: 500,
                options: &[],
                payload: &[],
                ttl: 64,
                id: 0x1234,
            }
        }
    }

    pub fn ip_header(family: Family, protocol: u8, l4_len: usize, ttl: u8, id: u16) -> Vec<u8> {
        match family {
            Family::V4 => {
                let [i0, i1] = id.to_be_bytes();
                let mut h = vec![0x45, 0, 0, 0, i0, i1, 0x40, 0, ttl, protocol, 0, 0];
                h.extend_from_slice(&[10, 1, 0, 5, 10, 2, 0, 9]);
                let total = h.len() + l4_len;
                h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                set_ipv4_checksum(&mut h);
                h
            }
            Family::V6 => {
                let mut h = vec![0x60, 0, 0, 0];
                h.extend_from_slice(&(l4_len as u16).to_be_bytes());
                h.extend_from_slice(&[protocol, ttl]);
                h.extend_from_slice(&[0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
                h.extend_from_slice(&[0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
                h
            }
        }
    }

    impl Tcp<'_> {
        pub fn build(&self) -> Vec<u8> {
            let tcp_len = 20 + self.options.len() + self.payload.len();
            let mut p = ip_header(self.family, PROTO_TCP, tcp_len, self.ttl, self.id);
            let l4 = p.len();
            p.extend_from_slice(&40000u16.to_be_bytes());
            p.extend_from_slice(&5201u16.to_be_bytes());
            p.extend_from_slice(&self.seq.to_be_bytes());
            p.extend_from_slice(&self.ack.to_be_bytes());
            p.push(((20 + self.options.len()) / 4 * 16) as u8);
            p.push(self.flags);
            p.extend_from_slice(&self.window.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 0]);
            p.extend_from_slice(self.options);
            p.extend_from_slice(self.payload);
            set_transport_checksum(self.family, &mut p, l4, PROTO_TCP, 16);
            p
        }
    }

    pub fn udp(family: Family, payload: &[u8]) -> Vec<u8> {
        let mut p = ip_header(family, PROTO_UDP, 8 + payload.len(), 64, 0x1234);
        let l4 = p.len();
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&5201u16.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        set_transport_checksum(family, &mut p, l4, PROTO_UDP, 6);
        p
    }

    /// Whether the transport checksum of `packet` (transport at `l4`) holds.
    pub fn transport_valid(packet: &[u8], l4: usize, protocol: u8) -> bool {
        let family = Family::of(packet).unwrap();
        let len = packet.len() - l4;
        checksum::fold(checksum::sum(
            &packet[l4..],
            family.pseudo_header(packet, protocol, len),
        )) == 0xffff
    }

    pub fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_headers_round_trip_and_unknown_types_are_refused() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GsoType::TcpV6,
            hdr_len: 72,
            gso_size: 1380,
            csum_start: 40,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::decode(&h.encode()), Ok(h));
        let mut ecn = h.encode();
        ecn[1] |= 0x80;
        assert_eq!(VnetHdr::decode(&ecn).unwrap().gso_type, GsoType::TcpV6);
        let mut ufo = h.encode();
        ufo[1] = 3;
        assert_eq!(VnetHdr::decode(&ufo), Err(OffloadError::GsoType(3)));
    }
}
