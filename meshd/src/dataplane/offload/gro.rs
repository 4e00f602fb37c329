//! Coalescing (GRO): consecutive TCP segments of one flow, decrypted in one
//! batch, go to the TUN as one super-packet with a virtio-net header, so the
//! receiving stack handles 64 KB at once instead of ~45 packets.
//!
//! Only what Linux's own GRO would merge is merged: same addresses, ports,
//! IP fields, ACK, window and options, the next sequence number, equal
//! segment sizes (a shorter one ends the group), PSH only at the end. Every
//! segment's checksum is verified first: a merged packet gets a fresh
//! checksum, which would otherwise hide a corrupted one. Anything else
//! (IPv4 options, IPv6 extension headers, fragments, non-TCP, bad
//! checksums) is written as it came, and never overtakes its own flow.

use std::ops::Range;

use super::{
    checksum, Family, GsoType, VnetHdr, F_DATA_VALID, F_NEEDS_CSUM, MAX_PACKET, PROTO_TCP,
};

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// Open groups kept per batch; past it the oldest is closed.
const MAX_OPEN: usize = 64;
const END: u32 = u32::MAX;

/// What a TCP segment that may be merged looks like.
#[derive(Debug, Clone, Copy)]
struct Segment {
    family: Family,
    l4: usize,
    tcp_len: usize,
    payload: usize,
    seq: u32,
    psh: bool,
}

#[derive(Debug, Clone)]
struct Group {
    head: u32,
    tail: u32,
    count: u32,
    /// `None` for a packet written as it came.
    tcp: Option<TcpGroup>,
}

#[derive(Debug, Clone, Copy)]
struct TcpGroup {
    seg: Segment,
    next_seq: u32,
    total: usize,
    closed: bool,
    psh: bool,
}

/// Reusable state: groups of the last batch, in the order to write them.
#[derive(Default)]
pub struct Coalescer {
    groups: Vec<Group>,
    next: Vec<u32>,
    open: Vec<usize>,
}

impl Coalescer {
    /// Groups `packets` (ranges of `arena`, in arrival order) and rewrites
    /// each group's first packet into the head of its super-packet.
    pub fn coalesce(&mut self, arena: &mut [u8], packets: &[Range<usize>]) {
        self.groups.clear();
        self.open.clear();
        self.next.clear();
        self.next.resize(packets.len(), END);
        for (i, range) in packets.iter().enumerate() {
            let packet = &arena[range.clone()];
            match candidate(packet) {
                Some(seg) => self.add_segment(arena, packets, i, seg),
                None => {
                    self.close_flow(arena, packets, packet);
                    self.groups.push(Group {
                        head: i as u32,
                        tail: i as u32,
                        count: 1,
                        tcp: None,
                    });
                }
            }
        }
        for g in &self.groups {
            if let (Some(t), true) = (g.tcp, g.count > 1) {
                finish_head(&mut arena[packets[g.head as usize].clone()], &t);
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
        let Some(t) = g.tcp else {
            return VnetHdr::NONE;
        };
        if g.count == 1 {
            // Verified above: the kernel need not check it again.
            return VnetHdr {
                flags: F_DATA_VALID,
                ..VnetHdr::NONE
            };
        }
        let headers = t.seg.l4 + t.seg.tcp_len;
        let mut i = self.next[g.head as usize];
        while i != END {
            let r = &packets[i as usize];
            parts.push(r.start + headers..r.end);
            i = self.next[i as usize];
        }
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: match t.seg.family {
                Family::V4 => GsoType::TcpV4,
                Family::V6 => GsoType::TcpV6,
            },
            hdr_len: headers as u16,
            gso_size: t.seg.payload as u16,
            csum_start: t.seg.l4 as u16,
            csum_offset: 16,
        }
    }

    fn add_segment(&mut self, arena: &[u8], packets: &[Range<usize>], i: usize, seg: Segment) {
        let packet = &arena[packets[i].clone()];
        let mut joined = None;
        for (slot, &g) in self.open.iter().enumerate() {
            let group = &self.groups[g];
            let head = &arena[packets[group.head as usize].clone()];
            let Some(t) = group.tcp else { continue };
            if !same_flow(head, &t.seg, packet, &seg) {
                continue;
            }
            if can_append(head, &t, packet, &seg) {
                joined = Some(g);
            } else {
                // The flow's next packet starts a new group after this one.
                self.open.swap_remove(slot);
            }
            break;
        }
        if let Some(g) = joined {
            let group = &mut self.groups[g];
            let Some(t) = group.tcp.as_mut() else { return };
            self.next[group.tail as usize] = i as u32;
            group.tail = i as u32;
            group.count += 1;
            t.next_seq = t.next_seq.wrapping_add(seg.payload as u32);
            t.total += seg.payload;
            t.psh |= seg.psh;
            t.closed = seg.psh || seg.payload < t.seg.payload;
            if t.closed {
                self.open.retain(|&o| o != g);
            }
            return;
        }
        if self.open.len() >= MAX_OPEN {
            self.open.remove(0);
        }
        self.groups.push(Group {
            head: i as u32,
            tail: i as u32,
            count: 1,
            tcp: Some(TcpGroup {
                seg,
                next_seq: seg.seq.wrapping_add(seg.payload as u32),
                total: packet.len(),
                closed: seg.psh,
                psh: seg.psh,
            }),
        });
        if !seg.psh {
            self.open.push(self.groups.len() - 1);
        }
    }

    /// A packet that is not merged closes every open group it might belong
    /// to, so nothing later in its flow is written before it.
    fn close_flow(&mut self, arena: &[u8], packets: &[Range<usize>], packet: &[u8]) {
        let Some(family) = Family::of(packet) else {
            return;
        };
        let ports = tcp_ports(packet, family);
        let groups = &self.groups;
        self.open.retain(|&g| {
            let head = &arena[packets[groups[g].head as usize].clone()];
            let Some(t) = groups[g].tcp else { return true };
            let same_addresses =
                t.seg.family == family && head[family.addresses()] == packet[family.addresses()];
            let same_ports = match ports {
                Some(p) => head[t.seg.l4..t.seg.l4 + 4] == packet[p..p + 4],
                None => true,
            };
            !(same_addresses && same_ports)
        });
    }
}

/// The offset of the TCP ports of a packet that is TCP in its outer header
/// (IPv4 with options included), if it is.
fn tcp_ports(packet: &[u8], family: Family) -> Option<usize> {
    let l4 = match family {
        Family::V4 if packet[9] == PROTO_TCP => usize::from(packet[0] & 0x0f) * 4,
        Family::V6 if packet[6] == PROTO_TCP => 40,
        _ => return None,
    };
    (l4 + 4 <= packet.len()).then_some(l4)
}

/// A TCP segment with payload, ACK (and maybe PSH) only, plain IP header,
/// lengths consistent, checksum valid.
fn candidate(p: &[u8]) -> Option<Segment> {
    let family = Family::of(p)?;
    let l4 = match family {
        Family::V4 => {
            let plain = p[0] == 0x45 && p[9] == PROTO_TCP;
            let fragment = u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0;
            let length = usize::from(u16::from_be_bytes([p[2], p[3]])) == p.len();
            if !plain || fragment || !length {
                return None;
            }
            20
        }
        Family::V6 => {
            let length = usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 == p.len();
            if p[6] != PROTO_TCP || !length {
                return None;
            }
            40
        }
    };
    if p.len() < l4 + 20 {
        return None;
    }
    let tcp_len = usize::from(p[l4 + 12] >> 4) * 4;
    let flags = p[l4 + 13];
    if tcp_len < 20
        || p.len() <= l4 + tcp_len
        || flags & TCP_ACK == 0
        || flags & !(TCP_ACK | TCP_PSH) != 0
    {
        return None;
    }
    let sum = checksum::sum(&p[l4..], family.pseudo_header(p, PROTO_TCP, p.len() - l4));
    if checksum::fold(sum) != 0xffff {
        return None;
    }
    Some(Segment {
        family,
        l4,
        tcp_len,
        payload: p.len() - l4 - tcp_len,
        seq: u32::from_be_bytes([p[l4 + 4], p[l4 + 5], p[l4 + 6], p[l4 + 7]]),
        psh: flags & TCP_PSH != 0,
    })
}

fn same_flow(a: &[u8], sa: &Segment, b: &[u8], sb: &Segment) -> bool {
    sa.family == sb.family
        && a[sa.family.addresses()] == b[sb.family.addresses()]
        && a[sa.l4..sa.l4 + 4] == b[sb.l4..sb.l4 + 4]
}

/// Whether `p` continues the group headed by `head`, as Linux's GRO judges.
fn can_append(head: &[u8], t: &TcpGroup, p: &[u8], s: &Segment) -> bool {
    let h = &t.seg;
    let ip_same = match h.family {
        // TOS, flags (DF), TTL.
        Family::V4 => head[1] == p[1] && head[6] == p[6] && head[8] == p[8],
        // Version, traffic class, flow label; hop limit.
        Family::V6 => head[..4] == p[..4] && head[7] == p[7],
    };
    let l4 = h.l4;
    ip_same
        && !t.closed
        && s.tcp_len == h.tcp_len
        && s.seq == t.next_seq
        && s.payload <= h.payload
        && t.total + s.payload <= MAX_PACKET
        // ACK number, data offset, flags but PSH, window.
        && head[l4 + 8..l4 + 12] == p[l4 + 8..l4 + 12]
        && head[l4 + 12] == p[l4 + 12]
        && (head[l4 + 13] | TCP_PSH) == (p[l4 + 13] | TCP_PSH)
        && head[l4 + 14..l4 + 16] == p[l4 + 14..l4 + 16]
        // Options (timestamps included) byte for byte.
        && head[l4 + 20..l4 + h.tcp_len] == p[l4 + 20..l4 + h.tcp_len]
}

/// Lengths for the whole group, PSH if any member had it, and the partial
/// checksum `NEEDS_CSUM` asks for (the pseudo-header sum, not inverted).
fn finish_head(head: &mut [u8], t: &TcpGroup) {
    let family = t.seg.family;
    family.set_length(head, t.total);
    let l4 = t.seg.l4;
    if t.psh {
        head[l4 + 13] |= TCP_PSH;
    }
    let pseudo = checksum::fold(family.pseudo_header(head, PROTO_TCP, t.total - l4));
    head[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
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
