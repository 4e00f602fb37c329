//! The system calls the data plane makes: the TUN device (virtio-net
//! headers, TSO/USO negotiated per feature), UDP sockets with GSO sends and
//! GRO receives, and the batched `sendmmsg`/`recvmmsg` around them. Every
//! buffer is allocated once, when a worker starts.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, Socket, Type};

use crate::offload::VNET_HDR_LEN;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
const TUN_F_USO4: u32 = 0x20;
const TUN_F_USO6: u32 = 0x40;
const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;

/// The kernel's limit on segments in one UDP GSO send (`UDP_MAX_SEGMENTS`).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// What one GSO send may carry (an IP datagram's length, less headers).
pub const MAX_GSO_BYTES: usize = 65_000;
/// Socket buffers: a burst of 64 KB super-packets must not overflow them.
const SOCKET_BUFFER: usize = 7 << 20;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

/// Whether to use the kernel's offloads at all. `off` runs the plain
/// one-packet-per-call paths every feature falls back to: for a kernel
/// whose offloads misbehave, and for the tests of those paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Offloads {
    Auto,
    Off,
}

/// What the TUN was able to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunOffloads {
    /// Packets carry a virtio-net header (needed for any offload).
    pub vnet: bool,
    /// TCP segmentation (TSO4/6): reads may be 64 KB super-packets and
    /// coalesced writes are accepted.
    pub tso: bool,
    /// UDP segmentation (USO4/6, Linux 6.2+).
    pub uso: bool,
}

pub struct Tun {
    fd: OwnedFd,
    pub offloads: TunOffloads,
}

impl Tun {
    /// Creates the TUN `name`, negotiating offloads from the most to the
    /// least capable: each missing kernel feature costs speed, not service.
    pub fn open(name: &str, wanted: Offloads) -> io::Result<Self> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name too long",
            ));
        }
        let path = c"/dev/net/tun";
        // SAFETY: a valid C string; the fd is owned right away.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let vnet = wanted == Offloads::Auto
            && set_iff(&fd, name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR).is_ok();
        if !vnet {
            set_iff(&fd, name, IFF_TUN | IFF_NO_PI)?;
        }
        let mut offloads = TunOffloads {
            vnet,
            tso: false,
            uso: false,
        };
        if vnet {
            let tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
            if set_offload(&fd, tso | TUN_F_USO4 | TUN_F_USO6).is_ok() {
                offloads.tso = true;
                offloads.uso = true;
            } else if set_offload(&fd, tso).is_ok() {
                offloads.tso = true;
            }
        }
        set_nonblocking(fd.as_raw_fd())?;
        Ok(Self { fd, offloads })
    }

    /// One packet (with its virtio-net header when `offloads.vnet`), or
    /// `WouldBlock` when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Waits until a packet can be read.
    pub fn wait_readable(&self) -> io::Result<()> {
        poll_in(self.fd.as_raw_fd(), -1).map(|_| ())
    }

    /// Writes one packet given in parts (header, head, payloads): one
    /// `writev`, no copy into a staging buffer.
    pub fn write(&self, iov: &[libc::iovec]) -> io::Result<()> {
        // SAFETY: every iovec points into a live buffer of the caller.
        let n =
            unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn set_iff(fd: &OwnedFd, name: &str, flags: i16) -> io::Result<()> {
    // SAFETY: all-zero is a valid ifreq.
    let mut req: IfReq = unsafe { zeroed() };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req.flags = flags;
    // SAFETY: TUNSETIFF reads and writes an ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_offload(fd: &OwnedFd, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes the flags by value.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits for input on `fd` up to `timeout_ms` (-1: forever); whether it came.
fn poll_in(fd: RawFd, timeout_ms: libc::c_int) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The address family of a socket and its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The socket an endpoint is reached through (an IPv4-mapped IPv6
    /// endpoint is IPv4).
    pub fn of(endpoint: &SocketAddr) -> (Self, SocketAddr) {
        match endpoint {
            SocketAddr::V4(_) => (Self::V4, *endpoint),
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => (Self::V4, SocketAddr::V4(SocketAddrV4::new(v4, v6.port()))),
                None => (Self::V6, *endpoint),
            },
        }
    }
}

/// One UDP socket of the device (one per family, both on the listen port).
pub struct Udp {
    socket: Socket,
    pub family: Family,
    gso: AtomicBool,
    pub gro: bool,
}

impl Udp {
    pub fn bind(family: Family, port: u16, fwmark: u32, wanted: Offloads) -> io::Result<Self> {
        let (domain, addr) = match family {
            Family::V4 => (
                Domain::IPV4,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            ),
            Family::V6 => (
                Domain::IPV6,
                SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            ),
        };
        let socket = Socket::new(domain, Type::DGRAM.cloexec(), Some(Protocol::UDP))?;
        if family == Family::V6 {
            socket.set_only_v6(true)?;
        }
        // Best effort: root may exceed rmem_max; others get what they get.
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        force_buffers(&socket);
        if fwmark != 0 {
            socket.set_mark(fwmark)?;
        }
        socket.bind(&addr.into())?;
        socket.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
        let fd = socket.as_raw_fd();
        let on = wanted == Offloads::Auto;
        let gso = on && getsockopt_int(fd, SOL_UDP, UDP_SEGMENT).is_ok();
        let gro = on && setsockopt_int(fd, SOL_UDP, UDP_GRO, 1).is_ok();
        Ok(Self {
            socket,
            family,
            gso: AtomicBool::new(gso),
            gro,
        })
    }

    pub fn local_port(&self) -> io::Result<u16> {
        Ok(self
            .socket
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .unwrap_or(0))
    }

    pub fn set_mark(&self, fwmark: u32) -> io::Result<()> {
        self.socket.set_mark(fwmark)
    }

    pub fn gso(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// One datagram, for the control path (handshakes, keepalives).
    pub fn send_to(&self, packet: &[u8], to: SocketAddr) -> io::Result<()> {
        self.socket.send_to(packet, &to.into()).map(|_| ())
    }

    /// Sends `runs` of `buf`: each run is datagrams of `segment` bytes
    /// (the last may be shorter), to one destination, sent as one GSO
    /// message where the kernel allows. A destination the kernel refuses
    /// (no route) loses its run, not the batch.
    pub fn send_runs(&self, buf: &[u8], runs: &[Run], scratch: &mut SendScratch) {
        let mut i = 0;
        while i < runs.len() {
            let gso = self.gso();
            let n = scratch.prepare(buf, &runs[i..], gso);
            // SAFETY: `scratch` holds `n` headers pointing into `buf`, alive
            // for the call.
            let sent = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    scratch.msgs.as_mut_ptr(),
                    n as libc::c_uint,
                    0,
                )
            };
            if sent > 0 {
                i += scratch.runs_covered(sent as usize);
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                // A kernel (or device) that cannot segment UDP: send each
                // datagram on its own from now on.
                Some(libc::EIO) | Some(libc::EINVAL) if gso && runs[i].count > 1 => {
                    tracing::warn!(error = %e, "UDP GSO refused; sending datagrams one by one");
                    self.gso.store(false, Ordering::Relaxed);
                }
                _ => {
                    tracing::debug!(error = %e, to = %runs[i].to, "dropped a run of datagrams");
                    i += scratch.runs_covered(1).max(1);
                }
            }
        }
    }

    /// Receives up to `batch.capacity()` messages, waiting up to a second
    /// for the first. Each message may hold several datagrams (GRO).
    pub fn recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.prepare();
        // SAFETY: the batch's headers point into its own buffers.
        let n = unsafe {
            libc::recvmmsg(
                self.socket.as_raw_fd(),
                batch.msgs.as_mut_ptr(),
                batch.msgs.len() as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        batch.received = n as usize;
        Ok(n as usize)
    }
}

fn force_buffers(socket: &Socket) {
    let fd = socket.as_raw_fd();
    let size = SOCKET_BUFFER as libc::c_int;
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size);
    let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, size);
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: an int option, passed by pointer with its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option, read into a local with its size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Datagrams of one size to one destination, back to back in a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub to: SocketAddr,
    pub start: usize,
    pub len: usize,
    pub segment: usize,
    pub count: usize,
}

impl Run {
    /// Whether a datagram of `len` bytes to `to`, placed right after this
    /// run, may join it: same destination and size (a shorter one may end
    /// it), within the kernel's limits.
    pub fn accepts(&self, to: SocketAddr, len: usize) -> bool {
        let ended = self.count > 0 && self.len != self.count * self.segment;
        self.to == to
            && !ended
            && len <= self.segment
            && self.count < MAX_GSO_SEGMENTS
            && self.len + len <= MAX_GSO_BYTES
    }
}

const CMSG_SPACE_U16: usize = 24;

/// The `sendmmsg` headers, reused for every flush.
pub struct SendScratch {
    msgs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<[u64; CMSG_SPACE_U16 / 8]>,
    /// For each message, how many runs it finishes (0 while a run is cut
    /// into single datagrams).
    finishes: Vec<u8>,
}

/// Messages per `sendmmsg`.
const SEND_BATCH: usize = 256;

impl Default for SendScratch {
    fn default() -> Self {
        // SAFETY: all-zero mmsghdr, iovec and sockaddr_storage are valid.
        unsafe {
            Self {
                msgs: vec![zeroed(); SEND_BATCH],
                iovs: vec![zeroed(); SEND_BATCH],
                addrs: vec![zeroed(); SEND_BATCH],
                cmsgs: vec![[0; CMSG_SPACE_U16 / 8]; SEND_BATCH],
                finishes: vec![0; SEND_BATCH],
            }
        }
    }
}

impl SendScratch {
    /// Fills headers for as many of `runs` as fit; returns the count.
    fn prepare(&mut self, buf: &[u8], runs: &[Run], gso: bool) -> usize {
        let mut n = 0;
        for run in runs {
            let pieces = if gso || run.count == 1 { 1 } else { run.count };
            if n + pieces > SEND_BATCH {
                break;
            }
            for p in 0..pieces {
                let (start, len) = if pieces == 1 {
                    (run.start, run.len)
                } else {
                    let s = run.start + p * run.segment;
                    (s, run.segment.min(run.start + run.len - s))
                };
                self.iovs[n] = libc::iovec {
                    iov_base: buf[start..].as_ptr() as *mut libc::c_void,
                    iov_len: len,
                };
                let addr_len = write_sockaddr(&mut self.addrs[n], run.to);
                // SAFETY: all-zero msghdr is valid; fields set below.
                let mut hdr: libc::msghdr = unsafe { zeroed() };
                hdr.msg_name = (&mut self.addrs[n] as *mut libc::sockaddr_storage).cast();
                hdr.msg_namelen = addr_len;
                hdr.msg_iov = &mut self.iovs[n];
                hdr.msg_iovlen = 1;
                if pieces == 1 && run.count > 1 {
                    set_segment_cmsg(&mut hdr, &mut self.cmsgs[n], run.segment as u16);
                }
                self.msgs[n] = libc::mmsghdr {
                    msg_hdr: hdr,
                    msg_len: 0,
                };
                self.finishes[n] = u8::from(p + 1 == pieces);
                n += 1;
            }
        }
        n
    }

    /// How many runs the first `sent` messages completed.
    fn runs_covered(&self, sent: usize) -> usize {
        self.finishes[..sent].iter().map(|&f| usize::from(f)).sum()
    }
}

fn set_segment_cmsg(hdr: &mut libc::msghdr, space: &mut [u64; CMSG_SPACE_U16 / 8], segment: u16) {
    hdr.msg_control = space.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE of a u16 fits `space` (24 bytes on 64-bit Linux).
    unsafe {
        hdr.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(hdr);
        (*c).cmsg_level = SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
    }
}

fn write_sockaddr(storage: &mut libc::sockaddr_storage, addr: SocketAddr) -> libc::socklen_t {
    let sa: socket2::SockAddr = addr.into();
    let len = sa.len() as usize;
    // SAFETY: `sa` holds `len` valid bytes, which fit a sockaddr_storage.
    unsafe {
        std::ptr::copy_nonoverlapping(
            sa.as_ptr().cast::<u8>(),
            (storage as *mut libc::sockaddr_storage).cast::<u8>(),
            len,
        );
    }
    len as libc::socklen_t
}

fn read_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Messages per `recvmmsg`; each buffer holds a 64 KB GRO super-datagram.
const RECV_BATCH: usize = 16;
const RECV_BUFFER: usize = 65_536;

/// Receive buffers and headers, reused for every call.
pub struct RecvBatch {
    bufs: Vec<u8>,
    msgs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    cmsgs: Vec<[u64; 8]>,
    received: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        // SAFETY: all-zero headers are valid; they are filled in `prepare`.
        unsafe {
            Self {
                bufs: vec![0; RECV_BATCH * RECV_BUFFER],
                msgs: vec![zeroed(); RECV_BATCH],
                iovs: vec![zeroed(); RECV_BATCH],
                addrs: vec![zeroed(); RECV_BATCH],
                cmsgs: vec![[0; 8]; RECV_BATCH],
                received: 0,
            }
        }
    }
}

impl RecvBatch {
    fn prepare(&mut self) {
        for i in 0..RECV_BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i * RECV_BUFFER..].as_mut_ptr().cast(),
                iov_len: RECV_BUFFER,
            };
            // SAFETY: all-zero msghdr is valid; fields set below.
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            hdr.msg_controllen = size_of::<[u64; 8]>() as _;
            self.msgs[i] = libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            };
        }
    }

    /// Message `i` of the last receive: its sender, its bytes, and the size
    /// of the datagrams they hold (GRO), all but the last exactly so.
    pub fn message(&self, i: usize) -> Option<(SocketAddr, &[u8], usize)> {
        if i >= self.received {
            return None;
        }
        let m = &self.msgs[i];
        let len = m.msg_len as usize;
        if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len == 0 {
            return None;
        }
        let from = read_sockaddr(&self.addrs[i])?;
        let mut segment = len;
        // SAFETY: the kernel filled `msg_controllen` bytes of our buffer.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
            while !c.is_null() {
                if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                    let s = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    if s > 0 {
                        segment = s as usize;
                    }
                }
                c = libc::CMSG_NXTHDR(&m.msg_hdr, c);
            }
        }
        Some((
            from,
            &self.bufs[i * RECV_BUFFER..i * RECV_BUFFER + len],
            segment,
        ))
    }

    pub fn received(&self) -> usize {
        self.received
    }

    /// The bytes of message `i` alone (no address, no control data): for
    /// the per-datagram path, once [`Self::message`] has been read.
    pub fn bytes(&self, i: usize) -> &[u8] {
        let len = if i < self.received {
            self.msgs[i].msg_len as usize
        } else {
            0
        };
        &self.bufs[i * RECV_BUFFER..i * RECV_BUFFER + len]
    }
}

/// The virtio-net header of a TUN read, if the TUN has them.
pub fn split_vnet(
    offloads: TunOffloads,
    buf: &mut [u8],
) -> (Option<[u8; VNET_HDR_LEN]>, &mut [u8]) {
    if offloads.vnet && buf.len() >= VNET_HDR_LEN {
        let (h, rest) = buf.split_at_mut(VNET_HDR_LEN);
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr.copy_from_slice(h);
        (Some(hdr), rest)
    } else {
        (None, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(to: &str, count: usize, segment: usize, len: usize) -> Run {
        Run {
            to: to.parse().unwrap(),
            start: 0,
            len,
            segment,
            count,
        }
    }

    #[test]
    fn runs_take_equal_datagrams_and_one_shorter_last() {
        let a = "198.18.0.2:51820";
        let r = run(a, 2, 1452, 2904);
        assert!(r.accepts(a.parse().unwrap(), 1452));
        assert!(
            r.accepts(a.parse().unwrap(), 100),
            "a shorter one may end it"
        );
        assert!(!r.accepts(a.parse().unwrap(), 1453), "never a longer one");
        assert!(!r.accepts("198.18.0.3:51820".parse().unwrap(), 1452));
        let ended = run(a, 3, 1452, 2904 + 100);
        assert!(
            !ended.accepts(a.parse().unwrap(), 100),
            "nothing after the shorter one"
        );
        let full = run(a, MAX_GSO_SEGMENTS, 100, 6400);
        assert!(!full.accepts(a.parse().unwrap(), 100));
        let big = run(a, 44, 1452, 44 * 1452);
        assert!(!big.accepts(a.parse().unwrap(), 1452), "within 64 KB");
    }

    #[test]
    fn mapped_endpoints_use_the_ipv4_socket() {
        let (f, a) = Family::of(&"[::ffff:198.18.0.2]:51820".parse().unwrap());
        assert_eq!((f, a), (Family::V4, "198.18.0.2:51820".parse().unwrap()));
        assert_eq!(Family::of(&"[fd00::2]:1".parse().unwrap()).0, Family::V6);
    }
}
