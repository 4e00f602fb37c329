//! Segmentation: what the kernel's TSO/USO would have done in hardware. A
//! super-packet read from the TUN (a TCP or UDP header and up to 64 KB of
//! payload, with a virtio-net header naming the segment size) becomes the
//! MTU-sized packets it stands for, each with its own lengths, sequence
//! number, IPv4 id and checksums — ready to encrypt.

use std::ops::Range;

use super::{
    set_transport_checksum, Family, GsoType, OffloadError, VnetHdr, F_NEEDS_CSUM, MAX_PACKET,
    PROTO_TCP, PROTO_UDP,
};

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
/// Offsets of the checksum field in a TCP and a UDP header.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;

/// Reusable output buffers: the segments of the last split, back to back.
pub struct Segmenter {
    out: Vec<u8>,
    segments: Vec<Range<usize>>,
}

impl Default for Segmenter {
    fn default() -> Self {
        Self {
            // A 64 KB payload cut into ~45 segments, each with its headers;
            // grows (once) only for pathologically small segment sizes.
            out: Vec::with_capacity(2 * MAX_PACKET),
            segments: Vec::with_capacity(256),
        }
    }
}

impl Segmenter {
    /// Prepares `packet`, read from the TUN with `hdr`. Returns `false`
    /// when `packet` itself (its checksum completed in place if the kernel
    /// left it partial) is the one packet to send, `true` when it was cut
    /// into [`Self::segments`].
    pub fn split(&mut self, hdr: &VnetHdr, packet: &mut [u8]) -> Result<bool, OffloadError> {
        self.out.clear();
        self.segments.clear();
        match hdr.gso_type {
            GsoType::None => {
                if hdr.flags & F_NEEDS_CSUM != 0 {
                    complete_checksum(hdr, packet)?;
                }
                Ok(false)
            }
            GsoType::TcpV4 | GsoType::TcpV6 => {
                let family = expect_family(hdr.gso_type, packet)?;
                let l4 = transport_start(hdr, family, packet, 20)?;
                let tcp_len = usize::from(packet[l4 + 12] >> 4) * 4;
                if tcp_len < 20 || l4 + tcp_len > packet.len() {
                    return Err(OffloadError::Truncated("TCP header"));
                }
                self.cut(hdr, family, packet, l4 + tcp_len, |seg, i, last, mss| {
                    let seq =
                        u32::from_be_bytes([seg[l4 + 4], seg[l4 + 5], seg[l4 + 6], seg[l4 + 7]])
                            .wrapping_add((i * mss) as u32);
                    seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
                    if !last {
                        seg[l4 + 13] &= !(TCP_FIN | TCP_PSH);
                    }
                    if i > 0 {
                        seg[l4 + 13] &= !TCP_CWR;
                    }
                    set_transport_checksum(family, seg, l4, PROTO_TCP, TCP_CSUM);
                })?;
                Ok(true)
            }
            GsoType::UdpL4 => {
                let family = Family::of(packet).ok_or(OffloadError::Truncated("IP header"))?;
                let l4 = transport_start(hdr, family, packet, 8)?;
                self.cut(hdr, family, packet, l4 + 8, |seg, _, _, _| {
                    let len = (seg.len() - l4) as u16;
                    seg[l4 + 4..l4 + 6].copy_from_slice(&len.to_be_bytes());
                    set_transport_checksum(family, seg, l4, PROTO_UDP, UDP_CSUM);
                })?;
                Ok(true)
            }
        }
    }

    /// The packets of the last split that returned `true`.
    pub fn segments(&self) -> impl Iterator<Item = &[u8]> {
        self.segments.iter().map(|r| &self.out[r.clone()])
    }

    /// Copies the headers (`..headers`) and each `gso_size` slice of the
    /// payload into a segment, fixes the IP layer, then lets `transport`
    /// fix the rest: `(segment, index, is_last, gso_size)`.
    fn cut(
        &mut self,
        hdr: &VnetHdr,
        family: Family,
        packet: &[u8],
        headers: usize,
        mut transport: impl FnMut(&mut [u8], usize, bool, usize),
    ) -> Result<(), OffloadError> {
        let mss = usize::from(hdr.gso_size);
        if mss == 0 {
            return Err(OffloadError::Header("gso_size"));
        }
        let payload = &packet[headers..];
        let count = payload.len().div_ceil(mss).max(1);
        let id = u16::from_be_bytes([packet[4], packet[5]]);
        for i in 0..count {
            let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
            let start = self.out.len();
            self.out.extend_from_slice(&packet[..headers]);
            self.out.extend_from_slice(chunk);
            let seg = &mut self.out[start..];
            if family == Family::V4 {
                seg[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            }
            let total = seg.len();
            family.set_length(seg, total);
            transport(seg, i, i + 1 == count, mss);
            self.segments.push(start..start + total);
        }
        Ok(())
    }
}

fn expect_family(gso: GsoType, packet: &[u8]) -> Result<Family, OffloadError> {
    let family = Family::of(packet).ok_or(OffloadError::Truncated("IP header"))?;
    match (gso, family) {
        (GsoType::TcpV4, Family::V4) | (GsoType::TcpV6, Family::V6) => Ok(family),
        _ => Err(OffloadError::Mismatch(gso)),
    }
}

/// Where the transport header starts: the kernel's `csum_start`, checked
/// against the IP header (IPv6 extension headers sit before it).
fn transport_start(
    hdr: &VnetHdr,
    family: Family,
    packet: &[u8],
    min_header: usize,
) -> Result<usize, OffloadError> {
    let l4 = usize::from(hdr.csum_start);
    let ip_len = match family {
        Family::V4 => usize::from(packet[0] & 0x0f) * 4,
        Family::V6 => 40,
    };
    if l4 < ip_len {
        return Err(OffloadError::Header("csum_start"));
    }
    if l4 + min_header > packet.len() {
        return Err(OffloadError::Truncated("transport header"));
    }
    Ok(l4)
}

/// A packet the kernel left with a partial checksum (`NEEDS_CSUM`): the
/// field holds the pseudo-header sum; the sum from `csum_start` completes it.
fn complete_checksum(hdr: &VnetHdr, packet: &mut [u8]) -> Result<(), OffloadError> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > packet.len() {
        return Err(OffloadError::Header("csum_start + csum_offset"));
    }
    let mut c = super::checksum::checksum(&packet[start..], 0);
    if hdr.csum_offset as usize == UDP_CSUM && c == 0 {
        c = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{checksum, Family};
    use super::*;

    fn tso(family: Family, l4: usize, mss: u16) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if family == Family::V4 {
                GsoType::TcpV4
            } else {
                GsoType::TcpV6
            },
            hdr_len: 0,
            gso_size: mss,
            csum_start: l4 as u16,
            csum_offset: 16,
        }
    }

    /// Leaves the TCP checksum partial, as the kernel hands it over.
    fn partial(mut p: Vec<u8>, family: Family, l4: usize) -> Vec<u8> {
        let len = p.len() - l4;
        let pseudo = checksum::fold(family.pseudo_header(&p, PROTO_TCP, len));
        p[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
        p
    }

    #[test]
    fn tcp_super_packets_become_valid_segments() {
        for (family, l4) in [(Family::V4, 20), (Family::V6, 40)] {
            for (len, mss) in [
                (4000, 1400),
                (2800, 1400),
                (1, 1400),
                (1400, 1400),
                (65_000, 1448),
            ] {
                let data = payload(len, 7);
                let options = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
                let p = Tcp {
                    family,
                    flags: ACK | PSH | FIN | CWR,
                    options: &options,
                    payload: &data,
                    seq: u32::MAX - 100,
                    ..Tcp::default()
                }
                .build();
                let mut p = partial(p, family, l4);
                let mut s = Segmenter::default();
                assert!(s.split(&tso(family, l4, mss), &mut p).unwrap());
                let segs: Vec<&[u8]> = s.segments().collect();
                assert_eq!(
                    segs.len(),
                    len.div_ceil(usize::from(mss)),
                    "{family:?} {len}"
                );
                let mut joined = Vec::new();
                for (i, seg) in segs.iter().enumerate() {
                    let last = i + 1 == segs.len();
                    assert!(transport_valid(seg, l4, PROTO_TCP), "{family:?} seg {i}");
                    let h = l4 + 32;
                    assert!(seg.len() - h <= usize::from(mss));
                    if family == Family::V4 {
                        assert_eq!(usize::from(u16::from_be_bytes([seg[2], seg[3]])), seg.len());
                        assert_eq!(checksum::fold(checksum::sum(&seg[..20], 0)), 0xffff);
                        assert_eq!(u16::from_be_bytes([seg[4], seg[5]]), 0x1234 + i as u16);
                    } else {
                        assert_eq!(
                            usize::from(u16::from_be_bytes([seg[4], seg[5]])),
                            seg.len() - 40
                        );
                    }
                    let seq = u32::from_be_bytes(seg[l4 + 4..l4 + 8].try_into().unwrap());
                    assert_eq!(
                        seq,
                        (u32::MAX - 100).wrapping_add((i * usize::from(mss)) as u32)
                    );
                    let flags = seg[l4 + 13];
                    assert_eq!(flags & (PSH | FIN) != 0, last, "PSH/FIN only on the last");
                    assert_eq!(flags & CWR != 0, i == 0, "CWR only on the first");
                    assert_eq!(&seg[l4 + 20..h], &options, "options copied");
                    joined.extend_from_slice(&seg[h..]);
                }
                assert_eq!(joined, data, "the payload survives, in order");
            }
        }
    }

    #[test]
    fn udp_super_packets_become_datagrams() {
        for family in [Family::V4, Family::V6] {
            let data = payload(3000, 3);
            let mut p = udp(family, &data);
            let l4 = if family == Family::V4 { 20 } else { 40 };
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GsoType::UdpL4,
                hdr_len: 0,
                gso_size: 1200,
                csum_start: l4 as u16,
                csum_offset: 6,
            };
            let mut s = Segmenter::default();
            assert!(s.split(&hdr, &mut p).unwrap());
            let segs: Vec<&[u8]> = s.segments().collect();
            assert_eq!(
                segs.iter().map(|s| s.len() - l4 - 8).collect::<Vec<_>>(),
                [1200, 1200, 600]
            );
            for seg in &segs {
                assert!(transport_valid(seg, l4, PROTO_UDP));
                assert_eq!(
                    usize::from(u16::from_be_bytes([seg[l4 + 4], seg[l4 + 5]])),
                    seg.len() - l4
                );
            }
        }
    }

    #[test]
    fn partial_checksums_are_completed_in_place() {
        for family in [Family::V4, Family::V6] {
            let l4 = if family == Family::V4 { 20 } else { 40 };
            let data = payload(333, 1);
            let good = Tcp {
                family,
                payload: &data,
                ..Tcp::default()
            }
            .build();
            let mut p = partial(good.clone(), family, l4);
            assert_ne!(p, good);
            let hdr = VnetHdr {
                gso_type: GsoType::None,
                ..tso(family, l4, 0)
            };
            assert!(!Segmenter::default().split(&hdr, &mut p).unwrap());
            assert_eq!(p, good);
        }
    }

    #[test]
    fn lying_headers_are_refused_not_trusted() {
        let data = payload(3000, 1);
        let v4 = Tcp {
            payload: &data,
            ..Tcp::default()
        }
        .build();
        let mut s = Segmenter::default();
        let table: &[(VnetHdr, OffloadError)] = &[
            (tso(Family::V4, 20, 0), OffloadError::Header("gso_size")),
            (
                tso(Family::V4, 10, 1000),
                OffloadError::Header("csum_start"),
            ),
            (
                tso(Family::V4, 9000, 1000),
                OffloadError::Truncated("transport header"),
            ),
            (
                tso(Family::V6, 40, 1000),
                OffloadError::Mismatch(GsoType::TcpV6),
            ),
            (
                VnetHdr {
                    csum_offset: 60_000,
                    ..tso(Family::V4, 20, 0)
                }
                .with_type(GsoType::None),
                OffloadError::Header("csum_start + csum_offset"),
            ),
        ];
        for (hdr, want) in table {
            let mut p = v4.clone();
            assert_eq!(s.split(hdr, &mut p), Err(want.clone()), "{hdr:?}");
        }
        let mut short = vec![0x45; 10];
        assert_eq!(
            s.split(&tso(Family::V4, 20, 100), &mut short),
            Err(OffloadError::Truncated("IP header"))
        );
    }

    impl VnetHdr {
        fn with_type(self, gso_type: GsoType) -> Self {
            Self { gso_type, ..self }
        }
    }
}
