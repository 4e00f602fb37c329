//! Weft's userspace WireGuard device. boringtun's `noise` module keeps the
//! protocol (handshakes, sessions, replay windows, timers); this module owns
//! everything around it: the peer table, cryptokey routing, the UAPI, and
//! batched I/O with TUN and UDP offloads.
//!
//! Shape: the configuration the workers read is an immutable [`Config`]
//! behind an `ArcSwap` — a packet's route lookup takes no lock — rebuilt by
//! each `set` from pure [`settings::Settings`]; peers that stay are the same
//! `Arc<Peer>` (their sessions with them), so an endpoint, keepalive or
//! prefix change loses nothing. A peer's tunnel sits behind its own mutex,
//! taken once per batch of packets, not per packet.
//!
//! Workers: one TUN reader (segment, encrypt, send with UDP GSO), one
//! receiver per UDP socket (GRO receive, decrypt, coalesce to the TUN) and a
//! timer. A failing worker ends the process (its supervisor restarts it):
//! never a live process with a dead device.

mod peer;
mod rx;
pub mod settings;
pub mod sys;
mod timers;
mod tx;

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::x25519;
use ip_network::IpNetwork;
use ip_network_table::IpNetworkTable;
use weft_keys::{PrivateKey, PublicKey};

use crate::uapi::{self, DeviceView, PeerView, SetRequest};
pub use peer::Peer;
use settings::Settings;
use sys::{Family, Offloads, Tun, Udp};

/// The device's key pair and the rate limiter tied to it.
#[derive(Clone)]
pub struct Identity {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    limiter: Arc<RateLimiter>,
}

impl Identity {
    pub fn of(key: &PrivateKey) -> Self {
        let public = x25519::PublicKey::from(*key.public_key().as_bytes());
        Self {
            secret: key.secret(),
            limiter: peer::limiter(&public),
            public,
        }
    }
}

/// What the workers route by; replaced whole by each `set`.
pub struct Config {
    identity: Option<Identity>,
    /// The key being rotated away from: still answered (see `SetRequest`).
    previous: Option<Identity>,
    peers: Vec<Arc<Peer>>,
    by_key: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    /// Cryptokey routing: the peer a destination is sent to, and the only
    /// peer a source is accepted from.
    routes: IpNetworkTable<Arc<Peer>>,
}

impl Config {
    fn empty() -> Self {
        Self {
            identity: None,
            previous: None,
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            routes: IpNetworkTable::new(),
        }
    }

    pub fn route(&self, ip: IpAddr) -> Option<&Arc<Peer>> {
        self.routes.longest_match(ip).map(|(_, p)| p)
    }

    /// Whether `peer` may send from `source` (its allowed IPs hold it).
    pub fn allows(&self, peer: &Arc<Peer>, source: IpAddr) -> bool {
        self.route(source).is_some_and(|p| Arc::ptr_eq(p, peer))
    }
}

/// The device's UDP sockets, one per family, on one port.
pub struct Sockets {
    pub v4: Arc<Udp>,
    pub v6: Option<Arc<Udp>>,
    pub port: u16,
}

impl Sockets {
    fn bind(port: u16, fwmark: u32, offloads: Offloads) -> io::Result<Self> {
        let v4 = Arc::new(Udp::bind(Family::V4, port, fwmark, offloads)?);
        let port = v4.local_port()?;
        // A host without IPv6 still runs an IPv4 mesh.
        let v6 = match Udp::bind(Family::V6, port, fwmark, offloads) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "no IPv6 UDP socket; IPv6 endpoints are unreachable");
                None
            }
        };
        Ok(Self { v4, v6, port })
    }

    pub fn for_family(&self, family: Family) -> Option<&Arc<Udp>> {
        match family {
            Family::V4 => Some(&self.v4),
            Family::V6 => self.v6.as_ref(),
        }
    }

    /// Sends one control datagram (handshake, cookie, keepalive).
    pub fn send_to(&self, packet: &[u8], to: std::net::SocketAddr) {
        let (family, to) = Family::of(&to);
        if let Some(s) = self.for_family(family) {
            if let Err(e) = s.send_to(packet, to) {
                tracing::debug!(error = %e, %to, "could not send a control datagram");
            }
        }
    }
}

pub struct Device {
    pub tun: Tun,
    pub config: ArcSwap<Config>,
    pub sockets: ArcSwap<Sockets>,
    /// Held by `set` (and `get`, for the allowed IPs it reports): one
    /// writer at a time; the workers never take it.
    settings: Mutex<Settings>,
    next_index: AtomicU32,
    offloads: Offloads,
    /// For handshake initiations from keys not yet matched to a peer (the
    /// expensive kind: a Diffie-Hellman each): one per device key, the
    /// current first.
    pub anonymous: ArcSwap<Vec<Arc<RateLimiter>>>,
}

impl Device {
    /// Creates the TUN `iface` and binds a random port until told one.
    pub fn open(iface: &str, offloads: Offloads) -> io::Result<Arc<Self>> {
        let tun = Tun::open(iface, offloads)?;
        let sockets = Sockets::bind(0, 0, offloads)?;
        Ok(Arc::new(Self {
            tun,
            config: ArcSwap::from_pointee(Config::empty()),
            sockets: ArcSwap::from_pointee(sockets),
            settings: Mutex::new(Settings::default()),
            next_index: AtomicU32::new(rand_index()),
            offloads,
            anonymous: ArcSwap::from_pointee(Vec::new()),
        }))
    }

    /// Starts the workers. Each ends the process if it fails.
    pub fn start(self: &Arc<Self>) -> io::Result<()> {
        let d = self.clone();
        spawn("weft-tun", move || tx::run(&d))?;
        self.spawn_receivers()?;
        let d = self.clone();
        spawn("weft-timers", move || timers::run(&d))?;
        Ok(())
    }

    fn spawn_receivers(self: &Arc<Self>) -> io::Result<()> {
        let sockets = self.sockets.load_full();
        for socket in std::iter::once(&sockets.v4).chain(&sockets.v6) {
            let (d, s) = (self.clone(), socket.clone());
            spawn("weft-udp", move || rx::run(&d, &s))?;
        }
        Ok(())
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `get` view: configuration, counters, handshake times.
    pub fn view(&self) -> DeviceView {
        let settings = self.settings();
        let config = self.config.load();
        let now = SystemTime::now();
        let peers = settings
            .peers
            .iter()
            .filter_map(|ps| {
                let peer = config.by_key.get(&ps.public_key)?;
                let endpoint = peer.lock().endpoint;
                Some(PeerView {
                    public_key: ps.public_key,
                    preshared_key: ps.preshared_key.clone(),
                    endpoint,
                    last_handshake: peer.last_handshake(now),
                    rx_bytes: peer.rx_bytes.load(Ordering::Relaxed),
                    tx_bytes: peer.tx_bytes.load(Ordering::Relaxed),
                    keepalive: ps.keepalive,
                    allowed_ips: ps.allowed_ips.clone(),
                })
            })
            .collect();
        DeviceView {
            private_key: settings.private_key.clone(),
            listen_port: self.sockets.load().port,
            fwmark: settings.fwmark,
            peers,
        }
    }

    /// Applies a `set`: all of it or (on a socket error) none of it.
    pub fn set(self: &Arc<Self>, request: &SetRequest) -> io::Result<()> {
        let mut settings = self.settings();
        let next = settings.apply(request);
        let sockets = self.sockets.load_full();
        let rebind = request
            .listen_port
            .is_some_and(|p| p != sockets.port && p != 0);
        if rebind {
            self.sockets.store(Arc::new(Sockets::bind(
                next.listen_port,
                next.fwmark,
                self.offloads,
            )?));
            // The old receivers notice they are stale within a second.
            self.spawn_receivers()?;
        } else if next.fwmark != settings.fwmark {
            sockets.v4.set_mark(next.fwmark)?;
            if let Some(v6) = &sockets.v6 {
                v6.set_mark(next.fwmark)?;
            }
        }
        // Weft's rotation extension: new peers that succeed removed ones.
        let successors: HashMap<PublicKey, PublicKey> = request
            .peers
            .iter()
            .filter(|p| !p.remove)
            .filter_map(|p| Some((p.public_key, p.successor_of?)))
            .collect();
        // A peer removed and added back in one request is a new peer, as
        // the kernel has it: its sessions end.
        let restarted: std::collections::HashSet<PublicKey> = request
            .peers
            .iter()
            .filter(|p| p.remove)
            .map(|p| p.public_key)
            .collect();
        let config = self.build(
            &self.config.load(),
            &settings,
            &next,
            &successors,
            &restarted,
        );
        self.anonymous.store(Arc::new(
            config
                .identity
                .iter()
                .chain(&config.previous)
                .map(|id| peer::limiter(&id.public))
                .collect(),
        ));
        // A keepalive set is due at once (it opens the session): sent now,
        // not at the next tick, so a peer entry moved to a new key
        // handshakes within a round trip. A peer given a new preshared key
        // handshakes at once too: its new tunnel takes over from the old
        // one only once it has a session.
        let before = self.config.load_full();
        let rekeyed = |p: &Peer| {
            let had = settings.peers.iter().find(|o| o.public_key == p.public_key);
            let has = next.peers.iter().find(|n| n.public_key == p.public_key);
            matches!((had, has), (Some(o), Some(n)) if o.preshared_key != n.preshared_key)
        };
        let fresh: Vec<(Arc<Peer>, bool)> = config
            .peers
            .iter()
            .filter_map(|p| {
                let forced = rekeyed(p) || restarted.contains(&p.public_key);
                (forced || !before.by_key.contains_key(&p.public_key)).then(|| (p.clone(), forced))
            })
            .collect();
        self.config.store(Arc::new(config));
        *settings = next;
        let mut buf = vec![0u8; 256];
        for (peer, forced) in fresh {
            let mut state = peer.lock();
            if state.keepalive_due(std::time::Instant::now()) || forced {
                let sent = timers::keepalive_now(&mut state, &self.sockets.load(), &mut buf);
                drop(state);
                peer.count_tx(sent);
            }
        }
        Ok(())
    }

    /// The run-time configuration for `next`, keeping every peer (and its
    /// sessions) that `old` already has.
    fn build(
        &self,
        current: &Config,
        old: &Settings,
        next: &Settings,
        successors: &HashMap<PublicKey, PublicKey>,
        restarted: &std::collections::HashSet<PublicKey>,
    ) -> Config {
        let identity_changed = old.private_key.as_ref().map(PrivateKey::public_key)
            != next.private_key.as_ref().map(PrivateKey::public_key);
        // An identity whose key stays (as the key or as the previous key)
        // keeps its rate limiter.
        let identity_of = |key: &Option<PrivateKey>| -> Option<Identity> {
            let key = key.as_ref()?;
            let public = x25519::PublicKey::from(*key.public_key().as_bytes());
            let known = current
                .identity
                .iter()
                .chain(&current.previous)
                .find(|id| id.public == public);
            Some(known.cloned().unwrap_or_else(|| Identity::of(key)))
        };
        let identity = identity_of(&next.private_key);
        let previous = identity_of(&next.previous_key).filter(|_| identity.is_some());
        let keys = peer::Keys {
            identity: identity.as_ref(),
            previous: previous.as_ref(),
        };
        let old_by_key: HashMap<PublicKey, &settings::PeerSettings> =
            old.peers.iter().map(|p| (p.public_key, p)).collect();
        let mut config = Config {
            identity: None,
            ..Config::empty()
        };
        let mut next_index = || self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        for ps in &next.peers {
            let peer = match (
                current.by_key.get(&ps.public_key),
                old_by_key.get(&ps.public_key),
            ) {
                (Some(peer), Some(old_ps)) if !restarted.contains(&ps.public_key) => {
                    peer.update(old_ps, ps, keys, identity_changed, &mut next_index);
                    peer.clone()
                }
                _ => {
                    let peer = Peer::new(ps, keys, &mut next_index);
                    let gone = |k: &PublicKey| !next.peers.iter().any(|p| p.public_key == *k);
                    if let Some(old) = successors
                        .get(&ps.public_key)
                        .filter(|k| gone(k))
                        .and_then(|k| current.by_key.get(k))
                    {
                        peer.succeed(old, std::time::Instant::now());
                    }
                    peer
                }
            };
            for index in peer.lock().indices() {
                config.by_index.insert(index, peer.clone());
            }
            for ip in &ps.allowed_ips {
                if let Ok(net) = IpNetwork::new(ip.network(), ip.prefix_len()) {
                    config.routes.insert(net, peer.clone());
                }
            }
            config.by_key.insert(ps.public_key, peer.clone());
            config.peers.push(peer);
        }
        config.identity = identity;
        config.previous = previous;
        config
    }

    /// Handles one UAPI request, returning the reply.
    pub fn handle(self: &Arc<Self>, request: &str) -> String {
        if request.starts_with("get=1\n") {
            return uapi::render_get(&self.view());
        }
        match uapi::parse_set(request) {
            Ok(set) => match self.set(&set) {
                Ok(()) => uapi::render_errno(0),
                Err(e) => {
                    tracing::warn!(error = %e, "set failed");
                    uapi::render_errno(e.raw_os_error().unwrap_or(libc::EIO))
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "refused a UAPI request");
                uapi::render_errno(e.errno())
            }
        }
    }
}

fn rand_index() -> u32 {
    let mut b = [0u8; 4];
    // Unpredictable indices make blind injection harder; a fixed start
    // would work too, so a failing getrandom is not fatal.
    let _ = getrandom(&mut b);
    u32::from_ne_bytes(b)
}

fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    // SAFETY: fills `buf` with at most its length.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The exit status of a data plane whose device failed.
pub const EXIT_DEVICE_FAILED: i32 = 70;

/// Ends the process: a worker cannot go on, and a device missing a worker
/// must not look alive.
pub fn fatal(what: &str, error: &dyn std::fmt::Display) -> ! {
    eprintln!("the userspace data plane failed ({what}: {error}); exiting so that it is restarted");
    std::process::exit(EXIT_DEVICE_FAILED);
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
}
