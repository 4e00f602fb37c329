//! Weft's userspace data plane on its own, with real packets: two or three
//! network namespaces on a bridge, each running a WireGuard device (`meshd
//! dataplane`, or wireguard-go for interop) configured with Debian's `wg`.
//! Every offload path is crossed with data compared byte for byte; peers are
//! changed under traffic and the packets lost are counted.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{first_datagram, run_bounded, wait_for, MESHLAB};
use meshlab::lab::netns;
use meshlab::lab::preflight::WIREGUARD_GO_867A4C4;
use weft_keys::PrivateKey;

const MTU: usize = 1420;
const PORT: u16 = 51820;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Impl {
    Weft,
    /// `meshd dataplane --offloads off`.
    WeftPlain,
    DebianGo,
    UpstreamGo,
    /// Kernel WireGuard: the other implementation of the same contract,
    /// configured by the same `wg` commands (only where the kernel has it:
    /// these tests run in meshlab's VM, `kernel::the_kernel_path_passes_in_a_vm`).
    Kernel,
}

/// One namespace with its device.
struct Side {
    netns: String,
    iface: String,
    key: PrivateKey,
    underlay: Ipv4Addr,
    /// A second underlay address, for endpoint changes.
    underlay_alt: Ipv4Addr,
    overlay4: Ipv4Addr,
    overlay6: Ipv6Addr,
}

/// Namespaces on a bridge, torn down when dropped (also after a panic);
/// leftovers of a crashed run with the same name are removed first.
struct Net {
    name: String,
    sides: Vec<Side>,
    children: Vec<Child>,
}

fn sh(args: &[&str]) {
    let mut c = Command::new(args[0]);
    c.args(&args[1..]);
    let out = run_bounded(c, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    sh(&all);
}

fn output_in(ns: &str, args: &[&str]) -> String {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    let out = run_bounded(c, Duration::from_secs(60));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn meshd() -> PathBuf {
    Path::new(MESHLAB).with_file_name("meshd")
}

impl Net {
    fn new(name: &str, impls: &[Impl]) -> Net {
        let bridge = format!("{name}-br");
        let names: Vec<String> = (0..impls.len()).map(|i| format!("{name}-{i}")).collect();
        for ns in names.iter().chain([&bridge]) {
            if netns::exists(ns) {
                for pid in netns::pids(ns) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                netns::delete(ns).expect("removing a leftover namespace");
            }
        }
        let mut net = Net {
            name: name.into(),
            sides: Vec::new(),
            children: Vec::new(),
        };
        sh(&["ip", "netns", "add", &bridge]);
        in_ns(&bridge, &["ip", "link", "add", "br0", "type", "bridge"]);
        in_ns(&bridge, &["ip", "link", "set", "br0", "up"]);
        for (i, (ns, imp)) in names.iter().zip(impls).enumerate() {
            let n = i as u8 + 1;
            sh(&["ip", "netns", "add", ns]);
            sh(&[
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                &format!("p{n}"),
                "netns",
                &bridge,
            ]);
            in_ns(
                &bridge,
                &["ip", "link", "set", &format!("p{n}"), "master", "br0", "up"],
            );
            let side = Side {
                netns: ns.clone(),
                iface: format!("{name}{n}"),
                key: PrivateKey::generate(),
                underlay: Ipv4Addr::new(198, 51, 100, n),
                underlay_alt: Ipv4Addr::new(198, 51, 100, 100 + n),
                overlay4: Ipv4Addr::new(10, 200, 0, n),
                overlay6: format!("fd00:200::{n}").parse().unwrap(),
            };
            for a in [side.underlay, side.underlay_alt] {
                in_ns(
                    ns,
                    &["ip", "addr", "add", &format!("{a}/24"), "dev", "eth0"],
                );
            }
            in_ns(ns, &["ip", "link", "set", "eth0", "up"]);
            in_ns(ns, &["ip", "link", "set", "lo", "up"]);
            match start(*imp, &side) {
                Some(child) => {
                    net.children.push(child);
                    wait_for(
                        &format!("{} to answer on its UAPI socket", side.iface),
                        Duration::from_secs(10),
                        || {
                            std::os::unix::net::UnixStream::connect(format!(
                                "/var/run/wireguard/{}.sock",
                                side.iface
                            ))
                            .is_ok()
                        },
                    );
                }
                None => in_ns(ns, &["ip", "link", "add", &side.iface, "type", "wireguard"]),
            }
            in_ns(
                ns,
                &[
                    "ip",
                    "link",
                    "set",
                    &side.iface,
                    "up",
                    "mtu",
                    &MTU.to_string(),
                ],
            );
            in_ns(
                ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", side.overlay4),
                    "dev",
                    &side.iface,
                ],
            );
            in_ns(
                ns,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/64", side.overlay6),
                    "dev",
                    &side.iface,
                    "nodad",
                ],
            );
            net.sides.push(side);
        }
        for i in 0..net.sides.len() {
            let key = format!("/run/{}-{i}.key", net.name);
            std::fs::write(&key, net.sides[i].key.to_base64()).unwrap();
            let mut args = vec![
                "wg".to_string(),
                "set".into(),
                net.sides[i].iface.clone(),
                "private-key".into(),
                key.clone(),
                "listen-port".into(),
                PORT.to_string(),
            ];
            for (j, peer) in net.sides.iter().enumerate() {
                if i != j {
                    args.extend(net.peer_args(j, peer.underlay, &[]));
                }
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            in_ns(&net.sides[i].netns, &refs);
            let _ = std::fs::remove_file(&key);
        }
        net
    }

    /// `peer KEY endpoint … allowed-ips …` for side `j` as seen by others.
    fn peer_args(&self, j: usize, endpoint: Ipv4Addr, extra_ips: &[&str]) -> Vec<String> {
        let p = &self.sides[j];
        let mut ips = vec![format!("{}/32", p.overlay4), format!("{}/128", p.overlay6)];
        ips.extend(extra_ips.iter().map(|s| s.to_string()));
        vec![
            "peer".into(),
            p.key.public_key().to_string(),
            "endpoint".into(),
            format!("{endpoint}:{PORT}"),
            "allowed-ips".into(),
            ips.join(","),
        ]
    }

    fn wg(&self, i: usize, args: &[String]) {
        let mut all = vec!["wg".to_string(), "set".into(), self.sides[i].iface.clone()];
        all.extend_from_slice(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        in_ns(&self.sides[i].netns, &refs);
    }

    /// Pings `to` from side `from` `count` times every 10 ms, running
    /// `during` a second in; returns how many answers came back.
    fn pings_answered(&self, from: usize, to: IpAddr, count: u32, during: impl FnOnce()) -> u32 {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.sides[from].netns,
            "ping",
            "-n",
            "-q",
            "-i",
            "0.01",
            "-W",
            "1",
        ])
        .args(["-c", &count.to_string(), &to.to_string()]);
        let ping = std::thread::spawn(move || run_bounded(c, Duration::from_secs(60)));
        std::thread::sleep(Duration::from_secs(1));
        during();
        let out = ping.join().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split(", ")
            .find_map(|f| f.strip_suffix(" received"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no ping summary: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }

    /// The latest handshake of side `i` with each peer, by public key
    /// (`wg show latest-handshakes`, Unix seconds).
    fn handshakes(&self, i: usize) -> std::collections::BTreeMap<String, u64> {
        output_in(
            &self.sides[i].netns,
            &["wg", "show", &self.sides[i].iface, "latest-handshakes"],
        )
        .lines()
        .filter_map(|l| {
            let (key, at) = l.split_once('\t')?;
            Some((key.to_string(), at.trim().parse().ok()?))
        })
        .collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for s in &self.sides {
            let _ = netns::delete(&s.netns);
        }
        let _ = netns::delete(&format!("{}-br", self.name));
    }
}

/// Starts side's userspace device; `None` for kernel WireGuard, a link
/// rather than a process.
fn start(imp: Impl, side: &Side) -> Option<Child> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &side.netns]);
    // Weft's device even where the kernel has WireGuard (`auto` would
    // leave it to the kernel).
    c.env(weft_meshd::dataplane::MODE_ENV, "userspace");
    match imp {
        Impl::Kernel => return None,
        Impl::Weft => c.arg(meshd()).args(["dataplane", &side.iface]),
        Impl::WeftPlain => c
            .arg(meshd())
            .args(["dataplane", "--offloads", "off", &side.iface]),
        Impl::DebianGo => c.args(["wireguard-go", "-f", &side.iface]),
        Impl::UpstreamGo => {
            assert!(
                Path::new(WIREGUARD_GO_867A4C4).is_file(),
                "{WIREGUARD_GO_867A4C4} is missing: run tests/setup (it builds it from tests/anchors)"
            );
            c.args([WIREGUARD_GO_867A4C4, "-f", &side.iface])
        }
    };
    let log = std::fs::File::create(format!("/tmp/{}.log", side.iface)).unwrap();
    let child = c
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting a data plane");
    Some(child)
}

/// Deterministic bytes that make a reordered or duplicated chunk visible.
fn data(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Options put on a socket before it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IpOptions {
    None,
    /// IPv4 options (three NOPs and an end): a 24-byte IP header.
    V4Nops,
    /// An IPv6 destination-options extension header (PadN).
    V6DestOpts,
}

fn set_ip_options(fd: i32, opts: IpOptions) {
    let (level, name, value): (i32, i32, Vec<u8>) = match opts {
        IpOptions::None => return,
        IpOptions::V4Nops => (libc::IPPROTO_IP, libc::IP_OPTIONS, vec![1, 1, 1, 0]),
        IpOptions::V6DestOpts => (
            libc::IPPROTO_IPV6,
            libc::IPV6_DSTOPTS,
            vec![0, 0, 1, 4, 0, 0, 0, 0],
        ),
    };
    // SAFETY: a byte option passed with its length.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    assert_eq!(
        r,
        0,
        "setsockopt {opts:?}: {}",
        std::io::Error::last_os_error()
    );
}

/// Sends `len` bytes over TCP from side `from` to `to`:`port` and checks
/// that exactly they arrived, in order.
fn tcp_transfer(net: &Net, from: usize, to: usize, family: u8, len: usize, opts: IpOptions) {
    let (src, dst): (IpAddr, IpAddr) = if family == 4 {
        (
            net.sides[from].overlay4.into(),
            net.sides[to].overlay4.into(),
        )
    } else {
        (
            net.sides[from].overlay6.into(),
            net.sides[to].overlay6.into(),
        )
    };
    let port = 7000 + u16::from(family) * 10 + from as u16;
    let (ready, listening) = mpsc::channel();
    let server_ns = net.sides[to].netns.clone();
    let server = std::thread::spawn(move || {
        netns::run_in(&server_ns, move || {
            let listener = TcpListener::bind(SocketAddr::new(dst, port))?;
            ready.send(()).ok();
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let mut got = Vec::new();
            s.read_to_end(&mut got)?;
            Ok(got)
        })
    });
    listening
        .recv_timeout(Duration::from_secs(10))
        .expect("the receiver did not listen");
    let sent = data(len);
    let payload = sent.clone();
    netns::run_in(&net.sides[from].netns, move || {
        let domain = if family == 4 {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        set_ip_options(s.as_raw_fd(), opts);
        s.bind(&SocketAddr::new(src, 0).into())?;
        s.connect_timeout(&SocketAddr::new(dst, port).into(), Duration::from_secs(10))?;
        let mut s: TcpStream = s.into();
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        s.write_all(&payload)?;
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("sending over TCP/IPv{family} {opts:?}: {e:#}"));
    let got = server
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("receiving over TCP/IPv{family}: {e:#}"));
    assert_eq!(
        got.len(),
        sent.len(),
        "TCP/IPv{family} {opts:?}: bytes received"
    );
    assert!(got == sent, "TCP/IPv{family} {opts:?}: the bytes differ");
}

/// Sends each of `sizes` as one UDP datagram (or as GSO sends of
/// `segment`-byte datagrams) and checks each arrives whole and in order.
fn udp_datagrams(net: &Net, family: u8, sizes: &[usize], segment: Option<u16>) -> Vec<Vec<u8>> {
    let (src, dst): (IpAddr, IpAddr) = if family == 4 {
        (net.sides[0].overlay4.into(), net.sides[1].overlay4.into())
    } else {
        (net.sides[0].overlay6.into(), net.sides[1].overlay6.into())
    };
    let expected: usize = match segment {
        Some(s) => sizes.iter().map(|&n| n.div_ceil(usize::from(s))).sum(),
        None => sizes.len(),
    };
    let (ready, listening) = mpsc::channel();
    let ns = net.sides[1].netns.clone();
    let receiver = std::thread::spawn(move || {
        netns::run_in(&ns, move || {
            let s = UdpSocket::bind(SocketAddr::new(dst, 9000))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            ready.send(()).ok();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 70_000];
            while got.len() < expected {
                let n = s.recv(&mut buf)?;
                got.push(buf[..n].to_vec());
            }
            Ok(got)
        })
    });
    listening.recv_timeout(Duration::from_secs(10)).unwrap();
    let payloads: Vec<Vec<u8>> = sizes.iter().map(|&n| data(n)).collect();
    let sent = payloads.clone();
    netns::run_in(&net.sides[0].netns, move || {
        let s = UdpSocket::bind(SocketAddr::new(src, 0))?;
        if let Some(seg) = segment {
            let v = libc::c_int::from(seg);
            // SAFETY: an int option.
            let r = unsafe {
                libc::setsockopt(s.as_raw_fd(), 17, 103, (&v as *const libc::c_int).cast(), 4)
            };
            anyhow::ensure!(r == 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        }
        for p in &sent {
            s.send_to(p, SocketAddr::new(dst, 9000))?;
            // Paced: this is about sizes, not about socket buffers.
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })
    .unwrap();
    let got = receiver
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("UDP/IPv{family} {sizes:?}: {e:#}"));
    let want: Vec<Vec<u8>> = match segment {
        Some(s) => payloads
            .iter()
            .flat_map(|p| p.chunks(usize::from(s)).map(<[u8]>::to_vec))
            .collect(),
        None => payloads,
    };
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            g == w,
            "UDP/IPv{family} datagram {i} ({} bytes) arrived changed",
            w.len()
        );
    }
    got
}

/// A data plane's log, without the terminal colours tracing puts in.
fn log_of(net: &Net, side: usize) -> String {
    let log =
        std::fs::read_to_string(format!("/tmp/{}.log", net.sides[side].iface)).unwrap_or_default();
    let mut plain = String::with_capacity(log.len());
    let mut escape = false;
    for c in log.chars() {
        match (escape, c) {
            (false, '\u{1b}') => escape = true,
            (true, 'm') => escape = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    plain
}

#[test]
fn every_offload_path_delivers_the_bytes_unchanged() {
    let net = Net::new("wdpoff", &[Impl::Weft, Impl::Weft]);
    let log = log_of(&net, 0);
    assert!(
        log.contains("tso: true") && log.contains("udp_gso=true") && log.contains("udp_gro=true"),
        "this kernel should give the TUN TSO and the sockets GSO/GRO: {log}"
    );
    exercise(&net);
}

/// The paths every missing kernel feature falls back to (no virtio-net
/// header, no GSO, no GRO), against a device that uses them all.
#[test]
fn without_offloads_the_same_bytes_arrive() {
    let net = Net::new("wdpplain", &[Impl::Weft, Impl::WeftPlain]);
    let log = log_of(&net, 1);
    assert!(
        log.contains("vnet: false")
            && log.contains("udp_gso=false")
            && log.contains("udp_gro=false"),
        "--offloads off: {log}"
    );
    exercise(&net);
}

/// Everything that crosses a data plane's offload paths, both ways.
fn exercise(net: &Net) {
    // TCP in both families and directions: TSO super-packets split and
    // encrypted, GRO'd datagrams decrypted and coalesced back.
    for family in [4, 6] {
        tcp_transfer(net, 0, 1, family, 16 << 20, IpOptions::None);
        tcp_transfer(net, 1, 0, family, 4 << 20, IpOptions::None);
    }
    // IPv4 options and IPv6 extension headers pass through (never merged).
    tcp_transfer(net, 0, 1, 4, 4 << 20, IpOptions::V4Nops);
    tcp_transfer(net, 0, 1, 6, 4 << 20, IpOptions::V6DestOpts);

    // UDP around the MTU (and past it: IP fragments) and tiny.
    let v4_max = MTU - 28;
    let v6_max = MTU - 48;
    udp_datagrams(
        net,
        4,
        &[1, 64, 1000, v4_max - 1, v4_max, v4_max + 1, 3000, 9000],
        None,
    );
    udp_datagrams(
        net,
        6,
        &[1, 64, 1000, v6_max - 1, v6_max, v6_max + 1, 3000],
        None,
    );
    // UDP GSO from the application: USO super-packets through the TUN.
    udp_datagrams(net, 4, &[10_500, 1000, 64_000], Some(1000));
    udp_datagrams(net, 6, &[10_500, 1200], Some(1200));

    // Lost datagrams on the underlay (every 25th WireGuard datagram into
    // side 1): TCP's retransmissions still deliver exactly the bytes.
    in_ns(&net.sides[1].netns, &["nft", &format!(
        "add table inet wdploss; add chain inet wdploss in {{ type filter hook input priority 0; }}; \
         add rule inet wdploss in udp dport {PORT} numgen inc mod 25 == 0 counter drop"
    )]);
    tcp_transfer(net, 0, 1, 4, 8 << 20, IpOptions::None);
    tcp_transfer(net, 0, 1, 6, 8 << 20, IpOptions::None);
    let rules = output_in(
        &net.sides[1].netns,
        &["nft", "list", "table", "inet", "wdploss"],
    );
    assert!(
        !rules.contains("counter packets 0 "),
        "the drop rule dropped something: {rules}"
    );
    in_ns(&net.sides[1].netns, &["nft", "delete table inet wdploss"]);

    // Reordered datagrams (no netem here): every other WireGuard datagram
    // side 0 sends is classed (by its skb priority, which htb reads) behind
    // a 100 Mbit/s shaper, so later ones overtake it. Nothing out of sequence may be merged; TCP reassembles.
    let ns = &net.sides[0].netns;
    in_ns(
        ns,
        &[
            "tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1",
        ],
    );
    in_ns(
        ns,
        &[
            "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb", "rate",
            "10gbit",
        ],
    );
    in_ns(
        ns,
        &[
            "tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:2", "htb", "rate",
            "100mbit",
        ],
    );
    in_ns(ns, &["nft", &format!(
        "add table inet wdpreorder; add chain inet wdpreorder out {{ type filter hook output priority 0; }}; \
         add rule inet wdpreorder out udp dport {PORT} meta priority set numgen inc mod 2 map {{ 0 : 1:1, 1 : 1:2 }}"
    )]);
    tcp_transfer(net, 0, 1, 4, 8 << 20, IpOptions::None);
    tcp_transfer(net, 0, 1, 6, 8 << 20, IpOptions::None);
    let classes = output_in(ns, &["tc", "-s", "class", "show", "dev", "eth0"]);
    let slow = classes.split("class htb 1:2").nth(1).unwrap_or_default();
    assert!(
        !slow.trim_start().is_empty() && !slow.contains("Sent 0 bytes"),
        "the slow class carried nothing: {classes}"
    );
    in_ns(ns, &["nft", "delete table inet wdpreorder"]);
    in_ns(ns, &["tc", "qdisc", "del", "dev", "eth0", "root"]);
}

#[test]
fn a_corrupted_checksum_is_dropped_not_delivered() {
    let net = Net::new("wdpsum", &[Impl::Weft, Impl::Weft]);
    let (src, dst) = (net.sides[0].overlay4, net.sides[1].overlay4);
    let (ready, listening) = mpsc::channel();
    let ns = net.sides[1].netns.clone();
    let receiver = std::thread::spawn(move || {
        netns::run_in(&ns, move || {
            let errors = || -> u64 {
                let snmp =
                    std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
                let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
                let (names, values) = (udp[0].split_whitespace(), udp[1].split_whitespace());
                names
                    .zip(values)
                    .find(|(n, _)| *n == "InCsumErrors")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0)
            };
            let before = errors();
            let s = UdpSocket::bind(SocketAddr::new(dst.into(), 9100))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            ready.send(()).ok();
            let mut buf = [0u8; 2048];
            let n = s.recv(&mut buf)?;
            Ok((buf[..n].to_vec(), errors() - before))
        })
    });
    listening.recv_timeout(Duration::from_secs(10)).unwrap();
    netns::run_in(&net.sides[0].netns, move || {
        // A UDP header written by hand with a wrong checksum, through a raw
        // socket: the kernel sends it as it is, into the tunnel.
        // SAFETY: plain socket calls on a descriptor owned below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP) };
        anyhow::ensure!(raw >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let payload = b"corrupt";
        let mut udp = Vec::new();
        udp.extend_from_slice(&40000u16.to_be_bytes());
        udp.extend_from_slice(&9100u16.to_be_bytes());
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&0x1234u16.to_be_bytes());
        udp.extend_from_slice(payload);
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sends `udp` to a valid sockaddr_in.
        let n = unsafe {
            libc::sendto(
                raw,
                udp.as_ptr().cast(),
                udp.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(raw) };
        anyhow::ensure!(n > 0, "raw send: {}", std::io::Error::last_os_error());
        std::thread::sleep(Duration::from_millis(200));
        let s = UdpSocket::bind(SocketAddr::new(src.into(), 0))?;
        s.send_to(b"good", SocketAddr::new(dst.into(), 9100))?;
        Ok(())
    })
    .unwrap();
    let (got, errors) = receiver.join().unwrap().unwrap();
    assert_eq!(
        got, b"good",
        "the corrupted datagram must never be delivered"
    );
    assert!(
        errors >= 1,
        "the receiving kernel saw (and counted) the bad checksum"
    );
}

#[test]
fn interoperates_with_both_wireguard_go_builds() {
    for (name, peer) in [("wdpgo1", Impl::DebianGo), ("wdpgo2", Impl::UpstreamGo)] {
        let net = Net::new(name, &[Impl::Weft, peer]);
        for family in [4, 6] {
            tcp_transfer(&net, 0, 1, family, 8 << 20, IpOptions::None);
            tcp_transfer(&net, 1, 0, family, 8 << 20, IpOptions::None);
        }
        udp_datagrams(&net, 4, &[1, 1000, MTU - 28], None);
    }
}

#[test]
fn peers_change_in_place_under_traffic_without_loss() {
    peers_change_in_place(
        &Net::new("wdpchg", &[Impl::Weft; 3]),
        ReplacedPeers::KeepSessions,
    );
}

/// The same changes to kernel WireGuard: the contract Weft's device keeps
/// is the kernel's, and the suite holds both to it.
#[test]
#[ignore = "needs kernel WireGuard: runs in the VM (kernel::the_kernel_path_passes_in_a_vm)"]
fn kernel_peers_change_in_place_under_traffic_without_loss() {
    peers_change_in_place(
        &Net::new("wdpkchg", &[Impl::Kernel; 3]),
        ReplacedPeers::Renegotiate,
    );
}

/// What a device does with the sessions of peers that stay when the whole
/// peer set is replaced (`wg setconf`, `replace_peers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplacedPeers {
    /// Weft's device: a peer that stays keeps its sessions.
    KeepSessions,
    /// The kernel removes every peer and adds them anew, so each one
    /// handshakes again (meshd never replaces the peer set; it changes
    /// peers one by one).
    Renegotiate,
}

/// Weft's device and kernel WireGuard exchange every kind of packet the
/// offload paths make, both ways, through loss and reordering.
#[test]
#[ignore = "needs kernel WireGuard: runs in the VM (kernel::the_kernel_path_passes_in_a_vm)"]
fn every_offload_path_crosses_to_kernel_wireguard_unchanged() {
    exercise(&Net::new("wdpkoff", &[Impl::Weft, Impl::Kernel]));
}

/// Endpoint, keepalive, a prefix moved between live peers, the whole peer
/// set replaced: nothing is lost, and side 0's sessions carry on (across
/// the replacement only where the device keeps them).
fn peers_change_in_place(net: &Net, replaced_peers: ReplacedPeers) {
    let b4: IpAddr = net.sides[1].overlay4.into();
    // Sessions up first; a change must not need a new handshake.
    assert_eq!(net.pings_answered(0, b4, 20, || {}), 20);
    assert_eq!(
        net.pings_answered(0, net.sides[2].overlay4.into(), 20, || {}),
        20
    );
    let handshakes = net.handshakes(0);

    // Endpoint and keepalive of side 1, changed while pinging it.
    let answered = net.pings_answered(0, b4, 300, || {
        net.wg(0, &net.peer_args(1, net.sides[1].underlay_alt, &[]));
        net.wg(
            0,
            &[
                "peer".into(),
                net.sides[1].key.public_key().to_string(),
                "persistent-keepalive".into(),
                "7".into(),
            ],
        );
    });
    assert_eq!(
        answered, 300,
        "an endpoint or keepalive change lost packets"
    );

    // A prefix moved between two live peers in one `set`: the service
    // address answered by side 1, then by side 2.
    let service = "10.254.0.1";
    for s in &net.sides[1..] {
        in_ns(
            &s.netns,
            &["ip", "addr", "add", &format!("{service}/32"), "dev", "lo"],
        );
    }
    in_ns(
        &net.sides[0].netns,
        &["ip", "route", "add", service, "dev", &net.sides[0].iface],
    );
    net.wg(
        0,
        &net.peer_args(1, net.sides[1].underlay_alt, &[&format!("{service}/32")]),
    );
    let moved = net.pings_answered(0, service.parse().unwrap(), 300, || {
        net.wg(
            0,
            &net.peer_args(2, net.sides[2].underlay, &[&format!("{service}/32")]),
        );
    });
    // A reply in flight at the instant of the move comes from a peer that
    // no longer holds the prefix, and is dropped (as the kernel does).
    assert!(moved >= 299, "a prefix move lost {} of 300", 300 - moved);
    let ips = output_in(
        &net.sides[0].netns,
        &["wg", "show", &net.sides[0].iface, "allowed-ips"],
    );
    let holders: Vec<&str> = ips.lines().filter(|l| l.contains(service)).collect();
    assert_eq!(holders.len(), 1, "one peer holds the prefix: {ips}");
    assert!(
        holders[0].starts_with(&net.sides[2].key.public_key().to_string()),
        "{ips}"
    );

    // No change so far renegotiated a session.
    let unchanged = |before: &std::collections::BTreeMap<String, u64>, what: &str| {
        let after = net.handshakes(0);
        for (key, at) in before {
            let now = after.get(key).copied().unwrap_or(0);
            // Reported in whole seconds from a monotonic age: ±1 is rounding.
            assert!(
                now.abs_diff(*at) <= 1,
                "{what}: {key} handshook again: {at} then {now}"
            );
        }
        after
    };
    let handshakes = unchanged(&handshakes, "changed in place");

    // The whole peer set replaced (`wg setconf`: replace_peers) with the
    // same peers: nothing lost (and, where the device keeps them, no
    // session renegotiated).
    let conf = format!(
        "[Interface]\nListenPort = {PORT}\nPrivateKey = {}\n\n[Peer]\nPublicKey = {}\nEndpoint = {}:{PORT}\nAllowedIPs = {}/32, {}/128\n\n[Peer]\nPublicKey = {}\nEndpoint = {}:{PORT}\nAllowedIPs = {}/32, {}/128, {service}/32\n",
        net.sides[0].key.to_base64(),
        net.sides[1].key.public_key(),
        net.sides[1].underlay,
        net.sides[1].overlay4,
        net.sides[1].overlay6,
        net.sides[2].key.public_key(),
        net.sides[2].underlay,
        net.sides[2].overlay4,
        net.sides[2].overlay6,
    );
    let path = format!("/run/{}-0.conf", net.name);
    std::fs::write(&path, conf).unwrap();
    let replaced = net.pings_answered(0, b4, 300, || {
        in_ns(
            &net.sides[0].netns,
            &["wg", "setconf", &net.sides[0].iface, &path],
        )
    });
    let _ = std::fs::remove_file(&path);
    match replaced_peers {
        ReplacedPeers::KeepSessions => {
            assert_eq!(replaced, 300, "replacing the peer set lost packets");
            unchanged(&handshakes, "the peer set replaced");
        }
        ReplacedPeers::Renegotiate => {
            // A reply already on its way under the old session finds none.
            assert!(
                replaced >= 297,
                "replacing the peer set lost {} of 300",
                300 - replaced
            );
            // Every session went with its peer: a peer with traffic has
            // handshaken anew, one without has none (0).
            let after = net.handshakes(0);
            for (key, at) in &handshakes {
                let now = after.get(key).copied().unwrap_or(0);
                assert!(
                    now.abs_diff(*at) > 1,
                    "{key} kept its session: {at} then {now}"
                );
            }
        }
    }
}

/// Sends one raw UAPI request to side `i`'s device and returns the reply.
fn uapi(net: &Net, i: usize, request: &str) -> String {
    let path = format!("/var/run/wireguard/{}.sock", net.sides[i].iface);
    let mut socket = std::os::unix::net::UnixStream::connect(&path).unwrap();
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    socket.write_all(request.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\n\n") && socket.read(&mut byte).unwrap() == 1 {
        reply.push(byte[0]);
    }
    String::from_utf8(reply).unwrap()
}

fn hex(key: &PrivateKey) -> String {
    key.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// Weft's rotation overlap at the device: with the next key set and the
/// old one kept as `weft_previous_private_key`, sessions carry on, a peer
/// that swapped its entry to the next key handshakes with it, a peer that
/// did not (wireguard-go here) still handshakes with the old key, and `wg
/// show` tells the two apart (a handshake under the next key is the only
/// one reported). Ending the overlap leaves the old key answered nowhere.
#[test]
fn a_rotating_device_answers_both_keys_and_loses_nothing() {
    let net = Net::new("wdprot", &[Impl::Weft, Impl::Weft, Impl::DebianGo]);
    let (b4, c4): (IpAddr, IpAddr) = (net.sides[1].overlay4.into(), net.sides[2].overlay4.into());
    assert_eq!(net.pings_answered(0, b4, 20, || {}), 20);
    assert_eq!(net.pings_answered(0, c4, 20, || {}), 20);

    let old = net.sides[0].key.clone();
    let next = PrivateKey::generate();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let answered = net.pings_answered(0, b4, 300, || {
        let reply = uapi(
            &net,
            0,
            &format!(
                "set=1\nprivate_key={}\nweft_previous_private_key={}\n\n",
                hex(&next),
                hex(&old)
            ),
        );
        assert_eq!(reply, "errno=0\n\n");
    });
    assert_eq!(answered, 300, "starting the overlap lost packets");
    assert!(
        output_in(&net.sides[0].netns, &["wg", "show", &net.sides[0].iface])
            .contains(&next.public_key().to_string()),
        "wg show reads the rotating device"
    );

    // Side 1 moves to the next key: one `wg set` removes the old entry and
    // adds the next one with the same prefixes.
    let swap = |j: usize| {
        let mut args = vec![
            "peer".to_string(),
            old.public_key().to_string(),
            "remove".into(),
        ];
        args.extend(vec![
            "peer".to_string(),
            next.public_key().to_string(),
            "endpoint".into(),
            format!("{}:{PORT}", net.sides[0].underlay),
            "persistent-keepalive".into(),
            "1".into(),
            "allowed-ips".into(),
            format!("{}/32,{}/128", net.sides[0].overlay4, net.sides[0].overlay6),
        ]);
        net.wg(j, &args);
    };
    let answered = net.pings_answered(0, b4, 300, || swap(1));
    assert!(answered >= 299, "the swap lost {} of 300", 300 - answered);

    // Side 2 has not moved: its sessions carry on, and a fresh handshake
    // of its own (its entry re-added) still reaches the old key.
    assert_eq!(net.pings_answered(0, c4, 100, || {}), 100);
    let readd: Vec<String> = ["peer", &old.public_key().to_string(), "remove"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    net.wg(2, &readd);
    net.wg(2, &net.peer_args(0, net.sides[0].underlay, &[]));
    let answered = net.pings_answered(2, net.sides[0].overlay4.into(), 50, || {});
    assert!(
        answered >= 49,
        "a peer still on the old key cannot handshake ({answered} of 50)"
    );

    // Who moved, as meshd reads it: a handshake under the next key.
    let handshakes = net.handshakes(0);
    let moved = |j: usize| {
        handshakes
            .get(&net.sides[j].key.public_key().to_string())
            .is_some_and(|at| *at >= started)
    };
    assert!(moved(1), "side 1 moved: {handshakes:?}");
    assert!(!moved(2), "side 2 did not: {handshakes:?}");

    // The overlap ends: the old key is answered nowhere, side 2 is cut off
    // until it moves too.
    assert_eq!(
        uapi(
            &net,
            0,
            &format!("set=1\nweft_previous_private_key={}\n\n", "0".repeat(64))
        ),
        "errno=0\n\n"
    );
    assert_eq!(net.pings_answered(0, b4, 50, || {}), 50);
    assert_eq!(
        net.pings_answered(2, net.sides[0].overlay4.into(), 20, || {}),
        0,
        "the retired key still carries traffic"
    );
    swap(2);
    assert_eq!(net.pings_answered(0, c4, 50, || {}), 50);
}

/// Two neighbours rotating at once (`meshctl keys rotate node-1 node-2`):
/// each device answers its previous and next key, and each moves the
/// other's entry to its next key with `weft_successor_of` (what meshd
/// sends). The sessions the pair already has were made under both previous
/// keys, so they sit in the old entry's previous-key tunnel; the new entry
/// must take them from there. With every handshake dropped on the wire,
/// only those sessions can carry the pings.
#[test]
fn neighbours_rotating_at_once_keep_their_sessions() {
    let net = Net::new("wdprot2", &[Impl::Weft, Impl::Weft]);
    let overlay = |i: usize| -> IpAddr { net.sides[i].overlay4.into() };
    assert_eq!(net.pings_answered(0, overlay(1), 20, || {}), 20);

    // Nothing but data packets (type 4) crosses from here on.
    for side in &net.sides {
        in_ns(&side.netns, &["nft", &format!(
            "add table inet wdpnohs; add chain inet wdpnohs in {{ type filter hook input priority 0; }}; \
             add rule inet wdpnohs in udp dport {PORT} @th,64,8 != 4 counter drop"
        )]);
    }
    let next = [PrivateKey::generate(), PrivateKey::generate()];
    for (i, side) in net.sides.iter().enumerate() {
        let reply = uapi(
            &net,
            i,
            &format!(
                "set=1\nprivate_key={}\nweft_previous_private_key={}\n\n",
                hex(&next[i]),
                hex(&side.key)
            ),
        );
        assert_eq!(reply, "errno=0\n\n");
    }
    for (i, j) in [(0, 1), (1, 0)] {
        let peer = &net.sides[j];
        let allowed = [
            ipnet::IpNet::from(IpAddr::from(peer.overlay4)),
            ipnet::IpNet::from(IpAddr::from(peer.overlay6)),
        ];
        let request = weft_dataplane::uapi::render_successor(
            &next[j].public_key(),
            &peer.key.public_key(),
            Some(SocketAddr::from((peer.underlay, PORT))),
            // A keepalive each second: each new entry keeps trying to
            // handshake under the next keys (and is dropped).
            Some(1),
            &allowed,
        );
        assert_eq!(uapi(&net, i, &request), "errno=0\n\n");
    }
    assert_eq!(
        net.pings_answered(0, overlay(1), 50, || {}),
        50,
        "the moved entries lost the sessions both previous keys made"
    );
    assert_eq!(net.pings_answered(1, overlay(0), 50, || {}), 50);
    let dropped = output_in(
        &net.sides[0].netns,
        &["nft", "list", "table", "inet", "wdpnohs"],
    );
    assert!(
        !dropped.contains("counter packets 0 "),
        "no handshake was tried (and dropped): {dropped}"
    );
}

/// One `wg show IFACE WHAT` column for side `i`'s peer `j`.
fn wg_show(net: &Net, i: usize, what: &str, j: usize) -> String {
    let key = net.sides[j].key.public_key().to_string();
    output_in(
        &net.sides[i].netns,
        &["wg", "show", &net.sides[i].iface, what],
    )
    .lines()
    .find_map(|l| l.strip_prefix(&key).map(|rest| rest.trim().to_string()))
    .unwrap_or_else(|| panic!("no {what} for side {j} on side {i}"))
}

/// Sends `args`' forgeries (`meshlab forge`) to side `i` from side `from`'s
/// namespace.
fn forge(net: &Net, from: usize, i: usize, args: &[String]) {
    let to = format!("{}:{PORT}", net.sides[i].underlay);
    let device = net.sides[i].key.public_key().to_string();
    let mut all = vec![MESHLAB, "forge", &to, "--device", &device];
    all.extend(args.iter().map(String::as_str));
    in_ns(&net.sides[from].netns, &all);
}

/// Only authenticated packets count (docs/security.md): initiations
/// claiming a peer's key (made from public data: they decrypt up to the
/// peer lookup) and data messages with the receiver index the device
/// really gave the peer but noise for ciphertext move neither the peer's
/// received bytes (what meshd's liveness reads) nor its endpoint.
#[test]
fn forged_initiations_and_guessed_indices_are_not_heard() {
    let net = Net::new("wdpforge", &[Impl::Weft, Impl::Weft]);
    let b4: IpAddr = net.sides[1].overlay4.into();
    // Side 0's index for side 1: in every data message side 1 sends it.
    let data = first_datagram(
        &net.sides[0].netns,
        "eth0",
        &format!(
            "dst host {} and udp dst port {PORT} and udp[8] = 4",
            net.sides[0].underlay
        ),
        || assert_eq!(net.pings_answered(0, b4, 20, || {}), 20),
    );
    let index = u32::from_le_bytes(data[4..8].try_into().unwrap());
    let rx = || -> u64 {
        let transfer = wg_show(&net, 0, "transfer", 1);
        transfer.split_whitespace().next().unwrap().parse().unwrap()
    };
    let endpoint = wg_show(&net, 0, "endpoints", 1);
    let claim = net.sides[1].key.public_key().to_string();
    for (what, args) in [
        (
            "initiations claiming side 1",
            vec!["--claim".to_string(), claim],
        ),
        (
            "data messages with side 1's index",
            vec!["--index".into(), index.to_string()],
        ),
    ] {
        let before = rx();
        let mut args = args;
        args.extend([
            "--duration".into(),
            "2s".into(),
            "--every".into(),
            "10ms".into(),
        ]);
        forge(&net, 1, 0, &args);
        // About 200 forgeries of 32 or 148 bytes; a keepalive is 32.
        let moved = rx() - before;
        assert!(moved < 1000, "{what} counted as {moved} bytes received");
    }
    assert_eq!(wg_show(&net, 0, "endpoints", 1), endpoint);
    assert_eq!(
        net.pings_answered(0, b4, 20, || {}),
        20,
        "the session is intact"
    );
}

/// A cookie reply proves nothing about its sender (its key derives from
/// the peer's public key, its AAD is the mac1 the device last sent, seen
/// on the wire): one forged from another address does not move the
/// peer's endpoint, as `wg show` reports it.
#[test]
fn a_forged_cookie_reply_moves_no_endpoint() {
    let net = Net::new("wdpcookie", &[Impl::Weft, Impl::Weft]);
    let b4: IpAddr = net.sides[1].overlay4.into();
    // Side 0 initiates: its initiation's sender index and mac1.
    let init = first_datagram(
        &net.sides[0].netns,
        "eth0",
        &format!(
            "src host {} and udp src port {PORT} and udp[8] = 1",
            net.sides[0].underlay
        ),
        || assert_eq!(net.pings_answered(0, b4, 20, || {}), 20),
    );
    let sender = u32::from_le_bytes(init[4..8].try_into().unwrap());
    let mac1: String = init[meshlab::forge::INITIATION_MAC1..][..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let endpoint = wg_show(&net, 0, "endpoints", 1);
    assert_eq!(endpoint, format!("{}:{PORT}", net.sides[1].underlay));
    forge(
        &net,
        1,
        0,
        &[
            "--claim".into(),
            net.sides[1].key.public_key().to_string(),
            "--cookie-reply".into(),
            format!("{sender}:{mac1}"),
            "--duration".into(),
            "1s".into(),
        ],
    );
    assert_eq!(
        wg_show(&net, 0, "endpoints", 1),
        endpoint,
        "a forged cookie reply moved the endpoint"
    );
}
