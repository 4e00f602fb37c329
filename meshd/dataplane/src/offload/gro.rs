//! Coalescing (GRO): consecutive segments of one flow, decrypted in one
//! batch, go to the TUN as one super-packet with a virtio-net header, so the
//! receiving stack handles 64 KB at once instead of ~45 packets. TCP always
//! (where the TUN takes virtio-net headers); UDP where the kernel accepts
//! UDP segmentation offload from the TUN (`TUN_F_USO4/6`, Linux 6.2+).
//!
//! Only what Linux's own GRO would merge is merged: same addresses, ports
//! and IP fields; for TCP the same ACK, window and options, the next
//! sequence number, PSH only at the end; equal segment sizes (a shorter one
//! ends the group). Every segment's checksum is verified first: a merged
//! packet gets a fresh checksum, which would otherwise hide a corrupted
//! one. Anything else (IPv4 options, IPv6 extension headers, fragments,
//! other protocols, bad checksums) is written as it came, and never
//! overtakes its own flow.

use std::ops::Range;

use super::{
    checksum, Family, GsoType, VnetHdr, F_DATA_VALID, F_NEEDS_CSUM, MAX_PACKET, PROTO_TCP,
    PROTO_UDP,
};

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// Open groups kept per batch; past it the oldest is closed.
const MAX_OPEN: usize = 64;
/// Segments in one UDP super-packet (the kernel's `UDP_MAX_SEGMENTS`).
const MAX_UDP_SEGMENTS: u32 = 64;
const END: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp { seq: u32, psh: bool },
    Udp,
}

/// What a segment that may be merged looks like.
#[derive(Debug, Clone, Copy)]
struct Segment {
    family: Family,
    transport: Transport,
    l4: usize,
    /// Where the payload starts (IP and transport headers before it).
    headers: usize,
    payload: usize,
}

impl Segment {
    fn protocol(&self) -> u8 {
        match self.transport {
            Transport::Tcp { .. } => PROTO_TCP,
            Transport::Udp => PROTO_UDP,
        }
    }
}

#[derive(Debug, Clone)]
struct Group {
    head: u32,
    tail: u32,
    count: u32,
    /// `None` for a packet written as it came.
    merge: Option<Merge>,
}

#[derive(Debug, Clone, Copy)]
struct Merge {
    seg: Segment,
    /// TCP: the sequence number the next segment must have.
    next_seq: u32,
    total: usize,
    closed: bool,
    psh: bool,
}

/// Reusable state: groups of the last batch, in the order to write them.
#[derive(Default)]
pub struct Coalescer {
    /// Merge UDP too (the TUN accepts UDP segmentation offload).
    udp: bool,
    groups: Vec<Group>,
    next: Vec<u32>,
    open: Vec<usize>,
}

impl Coalescer {
    /// `udp`: whether UDP datagrams may be merged too (the TUN accepts UDP
    /// segmentation offload); TCP segments always may.
    pub fn new(udp: bool) -> Self {
        Self {
            udp,
            ..Self::default()
        }
    }

    /// Groups `packets` (ranges of `arena`, in arrival order) and rewrites
    /// each group's first packet into the head of its super-packet.
    pub fn coalesce(&mut self, arena: &mut [u8], packets: &[Range<usize>]) {
        self.groups.clear();
        self.open.clear();
        self.next.clear();
        self.next.resize(packets.len(), END);
        for (i, range) in packets.iter().enumerate() {
            let packet = &arena[range.clone()];
            match candidate(packet, self.udp) {
                Some(seg) => self.add_segment(arena, packets, i, seg),
                None => {
                    self.close_flow(arena, packets, packet);
                    self.groups.push(Group {
                        head: i as u32,
                        tail: i as u32,
                        count: 1,
                        merge: None,
                    });
                }
            }
        }
        for g in &self.groups {
            if let (Some(m), true) = (g.merge, g.count > 1) {
                finish_head(&mut arena[packets[g.head as usize].clone()], &m);
            }
        }
    }

    /// How many writes the last batch makes.
    pub fn writes(&self) -> usize {
        self.groups.len()
    }

    /// Write `n`: its virtio-net header, and the ranges of `arena` to write
    /// after it (the head packet whole, then the other segments' payloads).
    pub fn write(
        &self,
        n: usize,
        packets: &[Range<usize>],
        parts: &mut Vec<Range<usize>>,
    ) -> VnetHdr {
        let g = &self.groups[n];
        parts.clear();
        parts.push(packets[g.head as usize].clone());
        let Some(m) = g.merge else {
            return VnetHdr::NONE;
        };
        if g.count == 1 {
            // Verified above: the kernel need not check it again.
            return VnetHdr {
                flags: F_DATA_VALID,
                ..VnetHdr::NONE
            };
        }
        let mut i = self.next[g.head as usize];
        while i != END {
            let r = &packets[i as usize];
            parts.push(r.start + m.seg.headers..r.end);
            i = self.next[i as usize];
        }
        let (gso_type, csum_offset) = match (m.seg.transport, m.seg.family) {
            (Transport::Tcp { .. }, Family::V4) => (GsoType::TcpV4, 16),
            (Transport::Tcp { .. }, Family::V6) => (GsoType::TcpV6, 16),
            (Transport::Udp, _) => (GsoType::UdpL4, 6),
        };
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: m.seg.headers as u16,
            gso_size: m.seg.payload as u16,
            csum_start: m.seg.l4 as u16,
            csum_offset,
        }
    }

    fn add_segment(&mut self, arena: &[u8], packets: &[Range<usize>], i: usize, seg: Segment) {
        let packet = &arena[packets[i].clone()];
        let mut joined = None;
        for (slot, &g) in self.open.iter().enumerate() {
            let group = &self.groups[g];
            let head = &arena[packets[group.head as usize].clone()];
            let Some(m) = group.merge else { continue };
            if !same_flow(head, &m.seg, packet, &seg) {
                continue;
            }
            if can_append(head, &m, group.count, packet, &seg) {
                joined = Some(g);
            } else {
                // The flow's next packet starts a new group after this one.
                self.open.swap_remove(slot);
            }
            break;
        }
        if let Some(g) = joined {
            let group = &mut self.groups[g];
            let Some(m) = group.merge.as_mut() else {
                return;
            };
            self.next[group.tail as usize] = i as u32;
            group.tail = i as u32;
            group.count += 1;
            m.next_seq = m.next_seq.wrapping_add(seg.payload as u32);
            m.total += seg.payload;
            let psh = matches!(seg.transport, Transport::Tcp { psh: true, .. });
            m.psh |= psh;
            m.closed = psh || seg.payload < m.seg.payload;
            if m.closed {
                self.open.retain(|&o| o != g);
            }
            return;
        }
        if self.open.len() >= MAX_OPEN {
            self.open.remove(0);
        }
        let (next_seq, psh) = match seg.transport {
            Transport::Tcp { seq, psh } => (seq.wrapping_add(seg.payload as u32), psh),
            Transport::Udp => (0, false),
        };
        self.groups.push(Group {
            head: i as u32,
            tail: i as u32,
            count: 1,
            merge: Some(Merge {
                seg,
                next_seq,
                total: packet.len(),
                closed: psh,
                psh,
            }),
        });
        if !psh {
            self.open.push(self.groups.len() - 1);
        }
    }

    /// A packet that is not merged closes every open group it might belong
    /// to, so nothing later in its flow is written before it.
    fn close_flow(&mut self, arena: &[u8], packets: &[Range<usize>], packet: &[u8]) {
        let Some(family) = Family::of(packet) else {
            return;
        };
        let ports = ports(packet, family);
        let groups = &self.groups;
        self.open.retain(|&g| {
            let head = &arena[packets[groups[g].head as usize].clone()];
            let Some(m) = groups[g].merge else {
                return true;
            };
            let same_addresses =
                m.seg.family == family && head[family.addresses()] == packet[family.addresses()];
            let same_ports = match ports {
                Some((protocol, p)) => {
                    protocol == m.seg.protocol() && head[m.seg.l4..m.seg.l4 + 4] == packet[p..p + 4]
                }
                None => true,
            };
            !(same_addresses && same_ports)
        });
    }
}

/// The protocol and the offset of the ports of a TCP or UDP packet (IPv4
/// options included), if its outer header says it is one.
fn ports(packet: &[u8], family: Family) -> Option<(u8, usize)> {
    let (protocol, l4) = match family {
        Family::V4 => (packet[9], usize::from(packet[0] & 0x0f) * 4),
        Family::V6 => (packet[6], 40),
    };
    (matches!(protocol, PROTO_TCP | PROTO_UDP) && l4 + 4 <= packet.len()).then_some((protocol, l4))
}

/// A TCP segment with payload and ACK (maybe PSH) only, or (when `udp`) a
/// UDP datagram with a checksum; plain IP header, consistent lengths, a
/// valid checksum.
fn candidate(p: &[u8], udp: bool) -> Option<Segment> {
    let family = Family::of(p)?;
    let (protocol, l4) = match family {
        Family::V4 => {
            let plain = p[0] == 0x45;
            let fragment = u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0;
            let length = usize::from(u16::from_be_bytes([p[2], p[3]])) == p.len();
            if !plain || fragment || !length {
                return None;
            }
            (p[9], 20)
        }
        Family::V6 => {
            let length = usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 == p.len();
            if !length {
                return None;
            }
            (p[6], 40)
        }
    };
    let (transport, headers) = match protocol {
        PROTO_TCP if p.len() >= l4 + 20 => {
            let tcp_len = usize::from(p[l4 + 12] >> 4) * 4;
            let flags = p[l4 + 13];
            if tcp_len < 20 || flags & TCP_ACK == 0 || flags & !(TCP_ACK | TCP_PSH) != 0 {
                return None;
            }
            let seq = u32::from_be_bytes([p[l4 + 4], p[l4 + 5], p[l4 + 6], p[l4 + 7]]);
            (
                Transport::Tcp {
                    seq,
                    psh: flags & TCP_PSH != 0,
                },
                l4 + tcp_len,
            )
        }
        PROTO_UDP if udp && p.len() >= l4 + 8 => {
            let length = usize::from(u16::from_be_bytes([p[l4 + 4], p[l4 + 5]])) == p.len() - l4;
            // A zero checksum (none, IPv4 only) is left alone.
            let summed = p[l4 + 6..l4 + 8] != [0, 0];
            if !length || !summed {
                return None;
            }
            (Transport::Udp, l4 + 8)
        }
        _ => return None,
    };
    if p.len() <= headers {
        return None;
    }
    let seg = Segment {
        family,
        transport,
        l4,
        headers,
        payload: p.len() - headers,
    };
    let sum = checksum::sum(
        &p[l4..],
        family.pseudo_header(p, seg.protocol(), p.len() - l4),
    );
    (checksum::fold(sum) == 0xffff).then_some(seg)
}

fn same_flow(a: &[u8], sa: &Segment, b: &[u8], sb: &Segment) -> bool {
    sa.family == sb.family
        && sa.protocol() == sb.protocol()
        && a[sa.family.addresses()] == b[sb.family.addresses()]
        && a[sa.l4..sa.l4 + 4] == b[sb.l4..sb.l4 + 4]
}

/// Whether `p` continues the group headed by `head`, as Linux's GRO judges.
fn can_append(head: &[u8], m: &Merge, count: u32, p: &[u8], s: &Segment) -> bool {
    let h = &m.seg;
    let ip_same = match h.family {
        // TOS, flags (DF), TTL.
        Family::V4 => head[1] == p[1] && head[6] == p[6] && head[8] == p[8],
        // Version, traffic class, flow label; hop limit.
        Family::V6 => head[..4] == p[..4] && head[7] == p[7],
    };
    let common = ip_same
        && !m.closed
        && s.headers == h.headers
        && s.payload <= h.payload
        && m.total + s.payload <= MAX_PACKET;
    match s.transport {
        Transport::Udp => common && count < MAX_UDP_SEGMENTS,
        Transport::Tcp { seq, .. } => {
            let l4 = h.l4;
            common
                && seq == m.next_seq
                // ACK number, data offset, flags but PSH, window.
                && head[l4 + 8..l4 + 12] == p[l4 + 8..l4 + 12]
                && head[l4 + 12] == p[l4 + 12]
                && (head[l4 + 13] | TCP_PSH) == (p[l4 + 13] | TCP_PSH)
                && head[l4 + 14..l4 + 16] == p[l4 + 14..l4 + 16]
                // Options (timestamps included) byte for byte.
                && head[l4 + 20..h.headers] == p[l4 + 20..h.headers]
        }
    }
}

/// Lengths for the whole group, PSH if any member had it, and the partial
/// checksum `NEEDS_CSUM` asks for (the pseudo-header sum, not inverted).
fn finish_head(head: &mut [u8], m: &Merge) {
    let family = m.seg.family;
    family.set_length(head, m.total);
    let l4 = m.seg.l4;
    let csum_at = match m.seg.transport {
        Transport::Tcp { .. } => {
            if m.psh {
                head[l4 + 13] |= TCP_PSH;
            }
            l4 + 16
        }
        Transport::Udp => {
            head[l4 + 4..l4 + 6].copy_from_slice(&((m.total - l4) as u16).to_be_bytes());
            l4 + 6
        }
    };
    let pseudo = checksum::fold(family.pseudo_header(head, m.seg.protocol(), m.total - l4));
    head[csum_at..csum_at + 2].copy_from_slice(&pseudo.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::super::gso::Segmenter;
    use super::super::testing::*;
    use super::*;

    /// Lays packets out in an arena as the receive path does.
    fn arena(packets: &[Vec<u8>]) -> (Vec<u8>, Vec<Range<usize>>) {
        let mut arena = Vec::new();
        let mut ranges = Vec::new();
        for p in packets {
            ranges.push(arena.len()..arena.len() + p.len());
            arena.extend_from_slice(p);
        }
        (arena, ranges)
    }

    /// What the kernel would see: each write as one buffer, with its header.
    fn writes(packets: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
        let (mut arena, ranges) = arena(packets);
        let mut c = Coalescer::default();
        c.coalesce(&mut arena, &ranges);
        let mut parts = Vec::new();
        (0..c.writes())
            .map(|n| {
                let hdr = c.write(n, &ranges, &mut parts);
                let bytes = parts
                    .iter()
                    .flat_map(|r| arena[r.clone()].to_vec())
                    .collect();
                (hdr, bytes)
            })
            .collect()
    }

    /// A segment as a sender's stack makes them: the IPv4 id counts up.
    fn seg(family: Family, seq: u32, payload: &[u8]) -> Vec<u8> {
        Tcp {
            family,
            seq,
            payload,
            id: (seq / 1000) as u16,
            ..Tcp::default()
        }
        .build()
    }

    /// Cutting a coalesced write again (what the kernel does on forward)
    /// must give back exactly the segments that went in.
    fn resegment(hdr: &VnetHdr, mut bytes: Vec<u8>) -> Vec<Vec<u8>> {
        let mut s = Segmenter::default();
        if s.split(hdr, &mut bytes).unwrap() {
            s.segments().map(<[u8]>::to_vec).collect()
        } else {
            vec![bytes]
        }
    }

    #[test]
    fn consecutive_segments_become_one_super_packet() {
        for family in [Family::V4, Family::V6] {
            let l4 = if family == Family::V4 { 20 } else { 40 };
            let data = payload(1000 * 5 + 300, 9);
            let segs: Vec<Vec<u8>> = data
                .chunks(1000)
                .enumerate()
                .map(|(i, c)| seg(family, 1000 + 1000 * i as u32, c))
                .collect();
            let out = writes(&segs);
            assert_eq!(out.len(), 1, "{family:?}: one write");
            let (hdr, bytes) = &out[0];
            assert_eq!(hdr.gso_size, 1000);
            assert_eq!(hdr.flags, F_NEEDS_CSUM);
            assert_eq!(usize::from(hdr.csum_start), l4);
            assert_eq!(&bytes[l4 + 20..], &data[..], "payload in order");
            assert_eq!(resegment(hdr, bytes.clone()), segs, "{family:?}: lossless");
        }
    }

    #[test]
    fn what_linux_would_not_merge_is_not_merged() {
        let d = payload(1000, 1);
        let base = Tcp {
            payload: &d,
            ..Tcp::default()
        };
        let next = |t: Tcp| Tcp { seq: 2000, ..t }.build();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("sequence gap", Tcp { seq: 2001, ..base }.build()),
            ("other ack", next(Tcp { ack: 78, ..base })),
            (
                "other window",
                next(Tcp {
                    window: 501,
                    ..base
                }),
            ),
            ("other ttl", next(Tcp { ttl: 63, ..base })),
            (
                "other options",
                next(Tcp {
                    options: &[1, 1, 1, 1],
                    ..base
                }),
            ),
            (
                "a FIN",
                next(Tcp {
                    flags: ACK | FIN,
                    ..base
                }),
            ),
            (
                "larger",
                Tcp {
                    seq: 2000,
                    payload: &payload(1001, 1),
                    ..base
                }
                .build(),
            ),
            (
                "v6 after v4",
                next(Tcp {
                    family: Family::V6,
                    ..base
                }),
            ),
        ];
        for (why, second) in cases {
            let out = writes(&[base.build(), second]);
            assert_eq!(out.len(), 2, "{why}");
            assert!(
                out.iter().all(|(h, _)| h.gso_type == GsoType::None),
                "{why}"
            );
        }
    }

    #[test]
    fn a_corrupted_segment_is_never_merged_or_vouched_for() {
        let d = payload(1000, 1);
        let first = seg(Family::V4, 1000, &d);
        let mut bad = seg(Family::V4, 2000, &d);
        bad[100] ^= 0xff;
        let third = seg(Family::V4, 3000, &d);
        let out = writes(&[first, bad.clone(), third]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].0, VnetHdr::NONE, "the kernel checks (and drops) it");
        assert_eq!(out[1].1, bad, "passed on untouched");
        assert_eq!(out[0].0.flags, F_DATA_VALID);
    }

    #[test]
    fn short_and_psh_segments_end_a_group_and_order_is_kept() {
        let d = payload(1000, 1);
        let short = payload(10, 2);
        let a = seg(Family::V4, 1000, &d);
        let b = seg(Family::V4, 2000, &short);
        let c = seg(Family::V4, 2010, &d);
        let p = Tcp {
            seq: 3010,
            flags: ACK | PSH,
            payload: &d,
            id: 3,
            ..Tcp::default()
        }
        .build();
        let e = seg(Family::V4, 4010, &d);
        let out = writes(&[a.clone(), b.clone(), c.clone(), p.clone(), e.clone()]);
        // a+b (short ends it), c+p (PSH ends it, and is kept), e.
        assert_eq!(out.len(), 3);
        assert_eq!(resegment(&out[0].0, out[0].1.clone()), vec![a, b]);
        let cp = resegment(&out[1].0, out[1].1.clone());
        assert_eq!(cp, vec![c, p]);
        assert_eq!(out[2].1, e);
    }

    #[test]
    fn other_packets_keep_their_place_in_their_flow() {
        let d = payload(1000, 1);
        let a = seg(Family::V4, 1000, &d);
        let fin = Tcp {
            seq: 2000,
            flags: ACK | FIN,
            ..Tcp::default()
        }
        .build();
        let b = seg(Family::V4, 2000, &d);
        let other = udp(Family::V4, &d);
        let out = writes(&[a.clone(), other.clone(), fin.clone(), b.clone()]);
        let order: Vec<Vec<u8>> = out.into_iter().map(|(_, b)| b).collect();
        assert_eq!(order, vec![a, other, fin, b], "b never overtakes the FIN");
    }

    #[test]
    fn udp_datagrams_merge_only_where_the_tun_takes_uso() {
        for family in [Family::V4, Family::V6] {
            let l4 = if family == Family::V4 { 20 } else { 40 };
            let data = payload(1000 * 3 + 10, 4);
            // As a sender's stack makes them: the IPv4 id counts up.
            let grams: Vec<Vec<u8>> = data
                .chunks(1000)
                .enumerate()
                .map(|(i, c)| {
                    let mut g = udp(family, c);
                    if family == Family::V4 {
                        g[4..6].copy_from_slice(&(0x1234 + i as u16).to_be_bytes());
                        super::super::set_ipv4_checksum(&mut g);
                    }
                    g
                })
                .collect();
            assert_eq!(writes(&grams).len(), 4, "{family:?}: not without USO");
            let (mut arena, ranges) = arena(&grams);
            let mut c = Coalescer::new(true);
            c.coalesce(&mut arena, &ranges);
            assert_eq!(c.writes(), 1, "{family:?}");
            let mut parts = Vec::new();
            let hdr = c.write(0, &ranges, &mut parts);
            assert_eq!(
                (hdr.gso_type, hdr.gso_size, hdr.csum_offset),
                (GsoType::UdpL4, 1000, 6)
            );
            let bytes: Vec<u8> = parts
                .iter()
                .flat_map(|r| arena[r.clone()].to_vec())
                .collect();
            assert_eq!(&bytes[l4 + 8..], &data[..]);
            assert_eq!(resegment(&hdr, bytes), grams, "{family:?}: lossless");
        }
    }

    #[test]
    fn interleaved_flows_coalesce_separately() {
        let d = payload(1000, 1);
        let f1 = |seq| seg(Family::V4, seq, &d);
        let f2 = |seq| {
            Tcp {
                family: Family::V6,
                seq,
                payload: &d,
                ..Tcp::default()
            }
            .build()
        };
        let out = writes(&[f1(1000), f2(50), f1(2000), f2(1050), f1(3000)]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.len(), 40 + 3000);
        assert_eq!(out[1].1.len(), 60 + 2000);
    }
}
