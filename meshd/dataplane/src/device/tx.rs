//! The TUN reader: packets leaving this node. Reads while the TUN has
//! packets (64 KB super-packets where TSO is on), cuts them into segments,
//! encrypts each peer's segments under one lock, and sends what piled up
//! as GSO runs — one system call for dozens of datagrams — when the TUN
//! runs dry or the batch is full.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use boringtun::noise::TunnResult;

use super::sys::{self, Family, Run, SendScratch};
use super::{fatal, Device, Peer};
use crate::offload::gso::Segmenter;
use crate::offload::{VnetHdr, MAX_PACKET, VNET_HDR_LEN};

/// WireGuard's data message overhead: header (16) and tag (16).
const OVERHEAD: usize = 32;
/// boringtun wants room for a handshake initiation in any output slot.
const MIN_SLOT: usize = 148;
/// The send buffer; flushed when less than a worst-case super-packet's
/// worth of room is left.
const BATCH_BYTES: usize = 1 << 20;
const FLUSH_BELOW: usize = 256 << 10;

/// Encrypted datagrams waiting to be sent, grouped into runs.
pub struct TxBatch {
    buf: Vec<u8>,
    used: usize,
    runs: Vec<Run>,
}

impl Default for TxBatch {
    fn default() -> Self {
        Self {
            buf: vec![0; BATCH_BYTES],
            used: 0,
            runs: Vec::with_capacity(1024),
        }
    }
}

impl TxBatch {
    fn room(&self) -> usize {
        self.buf.len() - self.used
    }

    /// Encrypts `packet` for `tunnel` into the batch, to `to`.
    fn encapsulate(
        &mut self,
        tunn: &mut boringtun::noise::Tunn,
        packet: &[u8],
        to: SocketAddr,
    ) -> usize {
        let need = (packet.len() + OVERHEAD).max(MIN_SLOT);
        if need > self.room() {
            return 0;
        }
        let slot = &mut self.buf[self.used..self.used + need];
        match tunn.encapsulate(packet, slot) {
            TunnResult::WriteToNetwork(out) => {
                let len = out.len();
                self.push(to, len);
                len
            }
            // Queued inside the tunnel until its handshake completes.
            _ => 0,
        }
    }

    fn push(&mut self, to: SocketAddr, len: usize) {
        match self.runs.last_mut() {
            Some(run) if run.start + run.len == self.used && run.accepts(to, len) => {
                run.len += len;
                run.count += 1;
            }
            _ => self.runs.push(Run {
                to,
                start: self.used,
                len,
                segment: len,
                count: 1,
            }),
        }
        self.used += len;
    }

    /// Sends every run through the socket of its family.
    fn flush(&mut self, device: &Device, scratch: &mut SendScratch) {
        if self.runs.is_empty() {
            return;
        }
        let sockets = device.sockets.load();
        // Consecutive runs of one family go out in one call; order within a
        // family is kept, which is all a flow sees.
        let mut start = 0;
        while start < self.runs.len() {
            let family = Family::of(&self.runs[start].to).0;
            let end = self.runs[start..]
                .iter()
                .position(|r| Family::of(&r.to).0 != family)
                .map_or(self.runs.len(), |p| start + p);
            if let Some(socket) = sockets.for_family(family) {
                socket.send_runs(&self.buf, &self.runs[start..end], scratch);
            }
            start = end;
        }
        self.runs.clear();
        self.used = 0;
    }
}

pub fn run(device: &Arc<Device>) {
    let offloads = device.tun.offloads;
    let mut read_buf = vec![0u8; VNET_HDR_LEN + MAX_PACKET];
    let mut segmenter = Segmenter::default();
    let mut batch = TxBatch::default();
    let mut scratch = SendScratch::default();
    loop {
        let n = match device.tun.read(&mut read_buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                batch.flush(device, &mut scratch);
                if let Err(e) = device.tun.wait_readable() {
                    fatal("waiting on the TUN", &e);
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => fatal("reading the TUN", &e),
        };
        let (hdr, packet) = sys::split_vnet(offloads, &mut read_buf[..n]);
        let hdr = match hdr.map(|h| VnetHdr::decode(&h)).transpose() {
            Ok(h) => h.unwrap_or(VnetHdr::NONE),
            Err(e) => {
                tracing::debug!(error = %e, "dropped a packet from the TUN");
                continue;
            }
        };
        let Some(dst) = destination(packet) else {
            continue;
        };
        let config = device.config.load();
        let Some(peer) = config.route(dst) else {
            // No peer has the destination: dropped, like the kernel's device.
            continue;
        };
        match segmenter.split(&hdr, packet) {
            Ok(false) => send(peer, std::iter::once(&*packet), &mut batch),
            Ok(true) => send(peer, segmenter.segments(), &mut batch),
            Err(e) => tracing::debug!(error = %e, "dropped a packet from the TUN"),
        }
        if batch.room() < FLUSH_BELOW {
            batch.flush(device, &mut scratch);
        }
    }
}

/// Encrypts `packets` for `peer`, one lock for all of them.
fn send<'a>(peer: &Arc<Peer>, packets: impl Iterator<Item = &'a [u8]>, batch: &mut TxBatch) {
    let (peer, mut state) = peer.lock_holder();
    let Some(to) = state.endpoint.map(|e| Family::of(&e).1) else {
        // A peer without an endpoint is reached once it reaches us.
        return;
    };
    let Some(tunnel) = state.sending() else {
        return;
    };
    let mut bytes = 0;
    for p in packets {
        bytes += batch.encapsulate(&mut tunnel.tunn, p, to);
    }
    drop(state);
    peer.count_tx(bytes);
}

fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let b: [u8; 4] = packet[16..20].try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 if packet.len() >= 40 => {
            let b: [u8; 16] = packet[24..40].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}
