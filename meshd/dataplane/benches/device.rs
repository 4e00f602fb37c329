//! Where the userspace data plane's time goes, one 64 KB TCP super-packet
//! (44 segments of 1,400 bytes) at a time: segmentation, encryption and
//! decryption, coalescing, and the UDP system calls — each batched (as the
//! data plane does) and one at a time (as boringtun's device does).
//!
//! `cargo bench -p weft-dataplane --bench device` (as root: the socket rows
//! run in a network namespace of their own, on its loopback).

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use weft_dataplane::device::sys::{Family, Offloads, RecvBatch, Run, SendScratch, Udp};
use weft_dataplane::offload::gro::Coalescer;
use weft_dataplane::offload::gso::Segmenter;
use weft_dataplane::offload::{checksum, GsoType, VnetHdr, F_NEEDS_CSUM};
use weft_keys::PrivateKey;

const SEGMENTS: usize = 44;
const MSS: usize = 1400;
const ROUNDS: u32 = 2000;

fn main() {
    let mut rows: Vec<(&str, Option<Duration>, Duration)> = Vec::new();
    let super_packet = tso_packet();
    let (mut a, mut b) = tunnels();

    // Segmentation: once per super-packet when batched; the one-at-a-time
    // path has no equivalent (the kernel segments, once per packet, before
    // the TUN), so the row shows what the data plane takes on itself.
    let mut seg = Segmenter::default();
    let hdr = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GsoType::TcpV4,
        hdr_len: 40,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: 16,
    };
    let split = time(|| {
        let mut p = super_packet.clone();
        black_box(seg.split(&hdr, &mut p).unwrap());
    });
    let mut p = super_packet.clone();
    seg.split(&hdr, &mut p).unwrap();
    let segments: Vec<Vec<u8>> = seg.segments().map(<[u8]>::to_vec).collect();
    rows.push(("segment 64 KB (+ checksums)", None, split));

    // Encryption: the cipher is the same; what differs is a lock (and a
    // peer lookup) per packet instead of per batch.
    let lock = Mutex::new(());
    let mut out = vec![0u8; (MSS + 200) * SEGMENTS];
    let one_by_one = time(|| {
        for (i, s) in segments.iter().enumerate() {
            let _g = lock.lock().unwrap();
            black_box(encrypt(&mut a, s, &mut out[i * (MSS + 200)..]));
        }
    });
    let batched = time(|| {
        let _g = lock.lock().unwrap();
        for (i, s) in segments.iter().enumerate() {
            black_box(encrypt(&mut a, s, &mut out[i * (MSS + 200)..]));
        }
    });
    rows.push(("encrypt 44 segments", Some(one_by_one), batched));

    // Decryption, measured as encrypt + decrypt less the encryption (a
    // replayed packet would be refused before its decryption).
    let mut plain = vec![0u8; (MSS + 200) * SEGMENTS];
    let round_trip = time(|| {
        let _g = lock.lock().unwrap();
        for (i, s) in segments.iter().enumerate() {
            let at = i * (MSS + 200);
            let n = encrypt(&mut a, s, &mut out[at..]);
            black_box(matches!(
                b.decapsulate(None, &out[at..at + n], &mut plain[at..]),
                TunnResult::WriteToTunnelV4(..)
            ));
        }
    });
    rows.push((
        "decrypt 44 segments",
        None,
        round_trip.saturating_sub(batched),
    ));

    // Coalescing: 44 writes to the TUN become one.
    let mut arena = Vec::new();
    let mut ranges = Vec::new();
    for s in &segments {
        ranges.push(arena.len()..arena.len() + s.len());
        arena.extend_from_slice(s);
    }
    let mut c = Coalescer::default();
    let coalesce = time(|| {
        let mut a2 = arena.clone();
        c.coalesce(&mut a2, &ranges);
        black_box(c.writes());
    });
    rows.push(("coalesce 44 segments (+ checksums)", None, coalesce));
    let sum = time(|| {
        black_box(checksum::checksum(&super_packet, 0));
    });
    rows.push(("checksum 64 KB", None, sum));

    match sockets() {
        Ok((send, recv)) => {
            let to = recv.local_addr().unwrap();
            let datagram = vec![7u8; MSS + 32];
            let one = time(|| {
                for _ in 0..SEGMENTS {
                    send.send_to(&datagram, to).unwrap();
                }
                drain(&recv);
            });
            let udp = Udp::bind(Family::V4, 0, 0, Offloads::Auto).unwrap();
            let buf: Vec<u8> = datagram.repeat(SEGMENTS);
            let run = [Run {
                to,
                start: 0,
                len: buf.len(),
                segment: datagram.len(),
                count: SEGMENTS,
            }];
            let mut scratch = SendScratch::default();
            let gso = time(|| {
                udp.send_runs(&buf, &run, &mut scratch);
                drain(&recv);
            });
            rows.push(("send 44 datagrams (+ drain)", Some(one), gso));
            let receiver = Udp::bind(Family::V4, 0, 0, Offloads::Auto).unwrap();
            let rto = SocketAddr::from((Ipv4Addr::LOCALHOST, receiver.local_port().unwrap()));
            let mut batch = RecvBatch::default();
            let run = [Run { to: rto, ..run[0] }];
            let gro = time(|| {
                udp.send_runs(&buf, &run, &mut scratch);
                let mut got = 0;
                while got < buf.len() {
                    receiver.recv(&mut batch).unwrap();
                    got += (0..batch.received())
                        .filter_map(|i| batch.message(i))
                        .map(|m| m.1.len())
                        .sum::<usize>();
                }
            });
            rows.push(("GSO send + GRO receive 44 datagrams", None, gro));
        }
        Err(e) => eprintln!("socket rows skipped: {e} (run as root)"),
    }

    println!("| step (per 64 KB super-packet) | one at a time | batched | ratio |");
    println!("|---|---|---|---|");
    for (what, one, batched) in rows {
        // `–`: work the one-at-a-time path leaves to the kernel.
        let (one, ratio) = match one {
            Some(o) => (
                us(o),
                format!("{:.2}×", o.as_secs_f64() / batched.as_secs_f64()),
            ),
            None => ("–".into(), "–".into()),
        };
        println!("| {what} | {one} | {} | {ratio} |", us(batched));
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// Median of several rounds' mean time per call.
fn time(mut f: impl FnMut()) -> Duration {
    let mut samples = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..ROUNDS / 5 {
            f();
        }
        samples.push(start.elapsed() / (ROUNDS / 5));
    }
    samples.sort();
    samples[2]
}

fn encrypt(t: &mut Tunn, packet: &[u8], out: &mut [u8]) -> usize {
    match t.encapsulate(packet, out) {
        TunnResult::WriteToNetwork(p) => p.len(),
        _ => 0,
    }
}

/// Two tunnels with a session between them.
fn tunnels() -> (Tunn, Tunn) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let public = |k: &PrivateKey| boringtun::x25519::PublicKey::from(*k.public_key().as_bytes());
    let mut a = Tunn::new(ka.secret(), public(&kb), None, None, 1, None);
    let b = Tunn::new(kb.secret(), public(&ka), None, None, 2, None);
    let b = handshake(&mut a, b);
    (a, b)
}

fn handshake(a: &mut Tunn, mut b: Tunn) -> Tunn {
    let (mut x, mut y, mut z) = (vec![0u8; 2048], vec![0u8; 2048], vec![0u8; 2048]);
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut x, false) else {
        panic!("no initiation")
    };
    let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, init, &mut y) else {
        panic!("no response")
    };
    let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(None, resp, &mut z) else {
        panic!("no keepalive")
    };
    let _ = b.decapsulate(None, keepalive, &mut x);
    b
}

fn tso_packet() -> Vec<u8> {
    let payload = SEGMENTS * MSS;
    let mut p = vec![
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 1, 0, 5, 10, 2, 0, 9,
    ];
    let total = 40 + payload;
    p[2..4].copy_from_slice(&(total.min(65_535) as u16).to_be_bytes());
    p.extend_from_slice(&[
        0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 1, 0, 0, 0, 0, 0,
    ]);
    p.extend((0..payload).map(|i| i as u8));
    p
}

/// A sending and a receiving socket on the loopback of a network namespace
/// of this process's own.
fn sockets() -> std::io::Result<(UdpSocket, UdpSocket)> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    if !up.success() {
        return Err(std::io::Error::other("ip link set lo up failed"));
    }
    let send = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let recv = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    recv.set_nonblocking(true)?;
    Ok((send, recv))
}

fn drain(s: &UdpSocket) {
    let mut buf = [0u8; 65_536];
    let mut got = 0;
    while got < SEGMENTS {
        match s.recv(&mut buf) {
            Ok(_) => got += 1,
            Err(_) => std::thread::yield_now(),
        }
    }
}
