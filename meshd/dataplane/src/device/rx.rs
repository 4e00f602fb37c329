//! A UDP receiver: packets arriving for this node. One `recvmmsg` brings up
//! to 16 messages, each a GRO super-datagram of up to 64 KB; consecutive
//! data messages for one peer are decrypted under one lock; each packet's
//! source must be in the sending peer's allowed IPs (cryptokey routing);
//! what passes is coalesced and written to the TUN, a `writev` per flow.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};

use super::sys::{RecvBatch, Udp};
use super::{fatal, Config, Device, Peer};
use crate::offload::gro::Coalescer;
use crate::offload::MAX_PACKET;

const DATA: u8 = 4;
/// Plaintext arena: everything one receive can hold, decrypted.
const ARENA: usize = (16 << 16) + MAX_PACKET;

/// One datagram of the last receive.
#[derive(Clone, Copy)]
struct Datagram {
    message: usize,
    range: (usize, usize),
    from: SocketAddr,
}

/// Decrypted packets bound for the TUN, back to back.
struct Plain {
    arena: Vec<u8>,
    used: usize,
    packets: Vec<Range<usize>>,
}

impl Plain {
    fn clear(&mut self) {
        self.used = 0;
        self.packets.clear();
    }
}

struct Receiver<'a> {
    device: &'a Arc<Device>,
    plain: Plain,
    control: Vec<u8>,
}

pub fn run(device: &Arc<Device>, socket: &Arc<Udp>) {
    let mut batch = RecvBatch::default();
    let mut datagrams: Vec<Datagram> = Vec::with_capacity(1024);
    let mut coalescer = Coalescer::new(device.tun.offloads.uso);
    let mut parts: Vec<Range<usize>> = Vec::with_capacity(128);
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(128);
    let mut rx = Receiver {
        device,
        plain: Plain {
            arena: vec![0; ARENA],
            used: 0,
            packets: Vec::with_capacity(1024),
        },
        control: vec![0; MAX_PACKET + 64],
    };
    loop {
        if !is_current(device, socket) {
            return;
        }
        match socket.recv(&mut batch) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => fatal("receiving from the UDP socket", &e),
        }
        datagrams.clear();
        for m in 0..batch.received() {
            let Some((from, bytes, segment)) = batch.message(m) else {
                continue;
            };
            let mut start = 0;
            while start < bytes.len() {
                let end = (start + segment).min(bytes.len());
                datagrams.push(Datagram {
                    message: m,
                    range: (start, end),
                    from,
                });
                start = end;
            }
        }
        let config = device.config.load();
        rx.plain.clear();
        let mut i = 0;
        while i < datagrams.len() {
            let d = datagrams[i];
            let bytes = datagram(&batch, &d);
            let Some(index) = data_index(bytes) else {
                rx.control(&config, bytes, d.from);
                i += 1;
                continue;
            };
            // The run of data datagrams for the same tunnel.
            let end = datagrams[i..]
                .iter()
                .position(|n| data_index(datagram(&batch, n)) != Some(index))
                .map_or(datagrams.len(), |p| i + p);
            rx.data(&config, index, &batch, &datagrams[i..end]);
            i = end;
        }
        write_tun(device, &mut rx.plain, &mut coalescer, &mut parts, &mut iov);
    }
}

fn is_current(device: &Device, socket: &Arc<Udp>) -> bool {
    let s = device.sockets.load();
    Arc::ptr_eq(&s.v4, socket) || s.v6.as_ref().is_some_and(|v6| Arc::ptr_eq(v6, socket))
}

fn datagram<'b>(batch: &'b RecvBatch, d: &Datagram) -> &'b [u8] {
    batch
        .bytes(d.message)
        .get(d.range.0..d.range.1)
        .unwrap_or_default()
}

/// The tunnel index a data message is for (its receiver index's top 24 bits).
fn data_index(d: &[u8]) -> Option<u32> {
    if d.len() >= 32 && d[0] == DATA && d[1..4] == [0, 0, 0] {
        Some(u32::from_le_bytes([d[4], d[5], d[6], d[7]]) >> 8)
    } else {
        None
    }
}

impl Receiver<'_> {
    /// Decrypts a run of data messages for one tunnel, under one lock.
    fn data(&mut self, config: &Config, index: u32, batch: &RecvBatch, run: &[Datagram]) {
        let Some(routed) = config.by_index.get(&index) else {
            return;
        };
        // The sources allowed are the routed entry's in this configuration;
        // the tunnel may have moved to its successor since.
        let (peer, mut state) = routed.lock_holder();
        let Some(tunnel) = state.by_index(index) else {
            return;
        };
        let mut heard_from = None;
        let mut bytes = 0;
        for d in run {
            let msg = datagram(batch, d);
            let plain = &mut self.plain;
            if plain.arena.len() - plain.used < msg.len() {
                break;
            }
            let slot = &mut plain.arena[plain.used..plain.used + msg.len()];
            // Only what decrypted counts, as in the kernel and wireguard-go:
            // a datagram with a guessed index is no sign of the peer.
            let (authentic, packet) = match tunnel.tunn.decapsulate(Some(d.from.ip()), msg, slot) {
                TunnResult::WriteToTunnelV4(p, src) => (true, Some((p.len(), IpAddr::V4(src)))),
                TunnResult::WriteToTunnelV6(p, src) => (true, Some((p.len(), IpAddr::V6(src)))),
                // A keepalive: authentic, carries nothing.
                TunnResult::Done => (true, None),
                TunnResult::WriteToNetwork(p) => {
                    self.device.sockets.load().send_to(p, d.from);
                    (false, None)
                }
                // Undecryptable or replayed.
                TunnResult::Err(_) => (false, None),
            };
            // Cryptokey routing: a source the peer may not use is dropped.
            if let Some((len, _)) = packet.filter(|(_, src)| config.allows(routed, *src)) {
                plain.packets.push(plain.used..plain.used + len);
                plain.used += len;
            }
            if authentic {
                bytes += msg.len();
                heard_from = Some(d.from);
            }
        }
        // Roaming, as WireGuard does: an authenticated packet from a new
        // address moves the peer's endpoint there.
        if let Some(from) = heard_from {
            if state.endpoint != Some(from) {
                state.endpoint = Some(from);
            }
        }
        drop(state);
        peer.count_rx(bytes);
    }

    /// A handshake initiation, response or cookie reply.
    fn control(&mut self, config: &Config, msg: &[u8], from: SocketAddr) {
        let Some((peer, identity)) = self.peer_for(config, msg, from) else {
            return;
        };
        let sockets = self.device.sockets.load();
        let (peer, mut state) = peer.lock_holder();
        let index = match Tunn::parse_incoming_packet(msg) {
            Ok(Packet::HandshakeResponse(r)) => Some(r.receiver_idx >> 8),
            Ok(Packet::PacketCookieReply(c)) => Some(c.receiver_idx >> 8),
            _ => None,
        };
        let tunnel = match (index, identity) {
            (Some(i), _) => state.by_index(i),
            (None, Some(id)) => state.by_identity(&id),
            (None, None) => None,
        };
        let Some(tunnel) = tunnel else { return };
        let mut result = tunnel
            .tunn
            .decapsulate(Some(from.ip()), msg, &mut self.control);
        let authentic =
            matches!(&result, TunnResult::WriteToNetwork(reply) if completes_handshake(msg, reply));
        let mut sent = 0;
        // Answer, then flush what waited for the session.
        while let TunnResult::WriteToNetwork(p) = result {
            sent += p.len();
            sockets.send_to(p, from);
            result = tunnel.tunn.decapsulate(None, &[], &mut self.control);
        }
        // Roaming and liveness move only on a handshake step that proved
        // the sender; a cookie reply proves nothing (see
        // `completes_handshake`).
        if authentic {
            state.endpoint = Some(from);
        }
        drop(state);
        if authentic {
            peer.count_rx(msg.len());
        }
        peer.count_tx(sent);
    }

    /// The peer a control message is from, and for an initiation the
    /// device key it was made for (during a rotation there are two).
    fn peer_for(
        &mut self,
        config: &Config,
        msg: &[u8],
        from: SocketAddr,
    ) -> Option<(Arc<Peer>, Option<[u8; 32]>)> {
        match Tunn::parse_incoming_packet(msg).ok()? {
            Packet::HandshakeInit(_) => {
                let limiters = self.device.anonymous.load_full();
                let identities = config.identity.iter().chain(&config.previous);
                for (id, limiter) in identities.zip(limiters.iter()) {
                    // Under load, a cookie first: no Diffie-Hellman for a
                    // flood. mac1 names the key the initiation is for.
                    let packet =
                        match limiter.verify_packet(Some(from.ip()), msg, &mut self.control) {
                            Ok(p) => p,
                            Err(TunnResult::Err(WireGuardError::InvalidMac)) => continue,
                            Err(TunnResult::WriteToNetwork(cookie)) => {
                                self.device.sockets.load().send_to(cookie, from);
                                return None;
                            }
                            Err(_) => return None,
                        };
                    let Packet::HandshakeInit(init) = packet else {
                        return None;
                    };
                    let half = parse_handshake_anon(&id.secret, &id.public, &init).ok()?;
                    let key = weft_keys::PublicKey::from_bytes(half.peer_static_public);
                    let peer = config.by_key.get(&key).cloned()?;
                    return Some((peer, Some(id.public.to_bytes())));
                }
                None
            }
            Packet::HandshakeResponse(r) => config
                .by_index
                .get(&(r.receiver_idx >> 8))
                .map(|p| (p.clone(), None)),
            Packet::PacketCookieReply(c) => config
                .by_index
                .get(&(c.receiver_idx >> 8))
                .map(|p| (p.clone(), None)),
            Packet::PacketData(_) => None,
        }
    }
}

/// Whether decapsulating the control message `msg` completed a handshake
/// step, judged by the first reply it produced: a valid initiation (static
/// key, timestamp and replay checked) is answered with a response, a valid
/// response opens a session and is answered with the keepalive confirming
/// it. Nothing else proves who sent it: a cookie reply is sealed with a key
/// derived from a public key and the last mac1 this device sent, and a
/// cookie asked of a flood says only that mac1 was right (public data).
fn completes_handshake(msg: &[u8], reply: &[u8]) -> bool {
    const INITIATION: u8 = 1;
    const RESPONSE: u8 = 2;
    matches!(
        (msg.first(), reply.first()),
        (Some(&INITIATION), Some(&RESPONSE)) | (Some(&RESPONSE), Some(&DATA))
    )
}

/// Writes the decrypted packets: coalesced where the TUN takes virtio-net
/// headers, one by one otherwise.
fn write_tun(
    device: &Device,
    plain: &mut Plain,
    coalescer: &mut Coalescer,
    parts: &mut Vec<Range<usize>>,
    iov: &mut Vec<libc::iovec>,
) {
    if plain.packets.is_empty() {
        return;
    }
    let offloads = device.tun.offloads;
    if offloads.vnet {
        coalescer.coalesce(&mut plain.arena, &plain.packets);
        for n in 0..coalescer.writes() {
            let hdr = coalescer.write(n, &plain.packets, parts).encode();
            iov.clear();
            iov.push(libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            });
            for r in parts.iter() {
                iov.push(libc::iovec {
                    iov_base: plain.arena[r.start..].as_ptr() as *mut libc::c_void,
                    iov_len: r.len(),
                });
            }
            if let Err(e) = device.tun.write(iov) {
                tracing::debug!(error = %e, "the TUN refused a packet");
            }
        }
    } else {
        for r in &plain.packets {
            let one = [libc::iovec {
                iov_base: plain.arena[r.start..].as_ptr() as *mut libc::c_void,
                iov_len: r.len(),
            }];
            if let Err(e) = device.tun.write(&one) {
                tracing::debug!(error = %e, "the TUN refused a packet");
            }
        }
    }
}
