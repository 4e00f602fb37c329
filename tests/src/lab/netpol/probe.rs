//! Real connections between lab pods: servers bound inside each pod's
//! network namespace and one-shot clients, for TCP, UDP and SCTP.
//!
//! Sockets are created by a thread that entered the pod's namespace
//! ([`netns::run_in`]) and stay there; the servers then run on plain
//! threads until the process ends, so nothing outlives `meshlab netpol`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::ErrorKind;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand_core::{OsRng, RngCore};
use socket2::{Domain, Socket, Type};
use weft_policy::Protocol;

use super::sctp;
use crate::lab::netns;

/// How often a datagram probe is re-sent within its timeout (loss).
const RESEND: Duration = Duration::from_millis(250);
const PAYLOAD: &[u8] = b"weft-probe";

/// How SCTP is exercised: real associations where the kernel has SCTP
/// sockets (Debian's, in meshlab's VM), else INIT and INIT ACK on raw
/// sockets, which is all a policy's first packet needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SctpProbe {
    Kernel,
    Raw,
}

impl SctpProbe {
    /// What this machine's kernel offers (its SCTP module loaded on demand).
    pub fn detect() -> SctpProbe {
        static PROBE: std::sync::OnceLock<SctpProbe> = std::sync::OnceLock::new();
        *PROBE.get_or_init(|| match kernel_sctp() {
            Ok(_) => SctpProbe::Kernel,
            Err(_) => SctpProbe::Raw,
        })
    }
}

fn sctp_socket(kind: Type) -> Result<Socket> {
    Socket::new(
        Domain::IPV4,
        kind,
        Some(socket2::Protocol::from(sctp::PROTOCOL)),
    )
    .with_context(|| format!("opening an SCTP socket ({kind:?})"))
}

fn kernel_sctp() -> Result<Socket> {
    sctp_socket(Type::STREAM)
}

fn raw_sctp() -> Result<Socket> {
    sctp_socket(Type::RAW)
}

/// Receives one datagram, `None` on timeout.
fn recv(socket: &Socket, buf: &mut [MaybeUninit<u8>]) -> Result<Option<usize>> {
    match socket.recv(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn filled(buf: &[MaybeUninit<u8>], n: usize) -> Vec<u8> {
    // SAFETY: recv initialised the first n bytes.
    buf[..n]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect()
}

/// The servers running in pods, so each is started once.
#[derive(Default)]
pub struct Servers {
    started: HashSet<(String, u16, Protocol)>,
    /// The SCTP ports each pod's responder answers on.
    sctp: HashMap<String, Arc<Mutex<BTreeSet<u16>>>>,
}

impl Servers {
    /// Serves `port`/`protocol` in the pod whose namespace is `pod_netns`.
    pub fn ensure(&mut self, pod_netns: &str, port: u16, protocol: Protocol) -> Result<()> {
        if !self.started.insert((pod_netns.to_string(), port, protocol)) {
            return Ok(());
        }
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let what = || format!("serving {port}/{protocol} in {pod_netns}");
        match protocol {
            Protocol::Tcp => {
                let listener = netns::run_in(pod_netns, move || Ok(TcpListener::bind(any)?))
                    .with_context(what)?;
                std::thread::spawn(move || {
                    for conn in listener.incoming() {
                        drop(conn);
                    }
                });
            }
            Protocol::Udp => {
                let socket = netns::run_in(pod_netns, move || Ok(UdpSocket::bind(any)?))
                    .with_context(what)?;
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1500];
                    while let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                });
            }
            Protocol::Sctp if SctpProbe::detect() == SctpProbe::Kernel => {
                let listener = netns::run_in(pod_netns, move || {
                    let socket = kernel_sctp()?;
                    socket.set_reuse_address(true)?;
                    socket.bind(&any.into())?;
                    socket.listen(128)?;
                    Ok(socket)
                })
                .with_context(what)?;
                std::thread::spawn(move || {
                    while let Ok((conn, _)) = listener.accept() {
                        drop(conn);
                    }
                });
            }
            Protocol::Sctp => match self.sctp.get(pod_netns) {
                Some(ports) => {
                    ports.lock().expect("not poisoned").insert(port);
                }
                None => {
                    let socket = netns::run_in(pod_netns, raw_sctp).with_context(what)?;
                    let ports = Arc::new(Mutex::new(BTreeSet::from([port])));
                    self.sctp.insert(pod_netns.to_string(), ports.clone());
                    std::thread::spawn(move || sctp_responder(&socket, &ports));
                }
            },
        }
        Ok(())
    }
}

/// Answers every INIT to a served port with an INIT ACK.
fn sctp_responder(socket: &Socket, ports: &Mutex<BTreeSet<u16>>) {
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    while let Ok(n) = socket.recv(&mut buf) {
        let datagram = filled(&buf, n);
        let Some((from, payload)) = sctp::strip_ipv4(&datagram) else {
            continue;
        };
        let Some(init) = sctp::parse(payload).filter(sctp::Packet::is_init) else {
            continue;
        };
        if ports.lock().expect("not poisoned").contains(&init.dst_port) {
            let reply = sctp::init_ack(&init, OsRng.next_u32());
            let _ = socket.send_to(&reply, &SocketAddrV4::new(from, 0).into());
        }
    }
}

/// Whether a connection from the pod in `from_netns` to `to`:`port` over
/// `protocol` completes within `timeout`.
pub fn connects(
    from_netns: &str,
    to: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    timeout: Duration,
) -> Result<bool> {
    let target = SocketAddr::from((to, port));
    netns::run_in(from_netns, move || match protocol {
        Protocol::Tcp => Ok(TcpStream::connect_timeout(&target, timeout).is_ok()),
        Protocol::Udp => udp_echoes(target, timeout),
        Protocol::Sctp => match SctpProbe::detect() {
            SctpProbe::Kernel => Ok(kernel_sctp()?
                .connect_timeout(&target.into(), timeout)
                .is_ok()),
            SctpProbe::Raw => sctp_acks(to, port, timeout),
        },
    })
}

fn udp_echoes(target: SocketAddr, timeout: Duration) -> Result<bool> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(target)?;
    socket.set_read_timeout(Some(RESEND))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        // Refused (ICMP port unreachable) is an answer of a kind, but not a
        // connection: keep trying until the deadline like a lost datagram.
        let _ = socket.send(PAYLOAD);
        if let Ok(n) = socket.recv(&mut buf) {
            if &buf[..n] == PAYLOAD {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn sctp_acks(to: Ipv4Addr, port: u16, timeout: Duration) -> Result<bool> {
    let socket = raw_sctp()?;
    socket.set_read_timeout(Some(RESEND))?;
    let src_port = 32768 + (OsRng.next_u32() % 28000) as u16;
    let sent = sctp::init(src_port, port, OsRng.next_u32() | 1);
    let init = sctp::parse(&sent).context("an INIT we built does not parse")?;
    let target = SocketAddrV4::new(to, 0).into();
    let deadline = Instant::now() + timeout;
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    while Instant::now() < deadline {
        socket.send_to(&sent, &target)?;
        let resent_at = Instant::now() + RESEND;
        while Instant::now() < resent_at.min(deadline) {
            let Some(n) = recv(&socket, &mut buf)? else {
                break;
            };
            let datagram = filled(&buf, n);
            let answered = sctp::strip_ipv4(&datagram)
                .filter(|(from, _)| *from == to)
                .and_then(|(_, payload)| sctp::parse(payload))
                .is_some_and(|reply| reply.acks(&init));
            if answered {
                return Ok(true);
            }
        }
    }
    Ok(false)
}
