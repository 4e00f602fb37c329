//! One peer at run time: its WireGuard tunnel (boringtun's `noise::Tunn`:
//! the handshake, sessions, replay windows and protocol timers) and what
//! may change without replacing it — endpoint, keepalive, preshared key.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::Tunn;
use weft_keys::{PresharedKey, PublicKey};

use super::settings::PeerSettings;
use super::Identity;

pub struct Peer {
    pub public_key: PublicKey,
    state: Mutex<PeerState>,
    /// The entry that took this one's sessions over (see [`Peer::succeed`]).
    successor: OnceLock<Arc<Peer>>,
    /// Transport bytes, as the kernel counts them (keepalives included).
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
}

/// A tunnel and the 24-bit index its sessions are known by (data packets
/// name it in their receiver index, shifted left by 8).
pub struct Tunnel {
    pub tunn: Tunn,
    pub index: u32,
    /// The public half of the device key this tunnel speaks for.
    pub identity: [u8; 32],
    /// As a previous tunnel: the current one had a session at the last
    /// tick (see [`PeerState::retire_previous`]).
    retiring: bool,
    /// When an entry took this tunnel over from the one it replaced (see
    /// [`Peer::succeed`]). Its peer static is the node's retired key, so
    /// it only carries the session it came with: its timers never run (no
    /// rekey, no handshake under that key), and it goes
    /// [`INHERITED_LIFETIME`] later whatever happens.
    inherited: Option<Instant>,
}

/// How long a tunnel taken over from a replaced entry lives: WireGuard's
/// REJECT_AFTER_TIME, the most any session may carry traffic. It bridges
/// the round trip until the new entry's own handshake; a node whose next
/// key cannot handshake for this long is not reached under the old one.
pub const INHERITED_LIFETIME: Duration = Duration::from_secs(180);

impl Tunnel {
    fn new(identity: &Identity, key: &PublicKey, psk: Option<&PresharedKey>, index: u32) -> Self {
        Self {
            identity: identity.public.to_bytes(),
            // Persistent keepalive is the device's (so it can change in place).
            tunn: Tunn::new(
                identity.secret.clone(),
                boringtun::x25519::PublicKey::from(*key.as_bytes()),
                psk.map(PresharedKey::to_bytes),
                None,
                index,
                Some(identity.limiter.clone()),
            ),
            index,
            retiring: false,
            inherited: None,
        }
    }

    pub fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }
}

pub struct PeerState {
    /// `None` while the device has no private key.
    pub current: Option<Tunnel>,
    /// The tunnel from before a preshared-key change, or under the device's
    /// previous key while it rotates: it carries traffic (and answers the
    /// peer's handshakes) until `current` has a session, so the change
    /// loses nothing.
    pub previous: Option<Tunnel>,
    pub endpoint: Option<SocketAddr>,
    pub keepalive: u16,
    pub keepalive_sent: Instant,
    preshared_key: Option<PresharedKey>,
}

impl PeerState {
    /// The tunnel to encrypt with: the current one, unless only the
    /// previous has a session yet.
    pub fn sending(&mut self) -> Option<&mut Tunnel> {
        if self.sends_on_previous() {
            self.previous.as_mut()
        } else {
            self.current.as_mut()
        }
    }

    fn sends_on_previous(&self) -> bool {
        !self.current.as_ref().is_some_and(Tunnel::has_session)
            && self.previous.as_ref().is_some_and(Tunnel::has_session)
    }

    /// The tunnels a persistent keepalive goes through: the current one,
    /// and while it has no session also the previous one (a peer not yet
    /// on the device's new key answers only that), unless it was taken
    /// over from a replaced entry.
    pub fn keepalive_tunnels(&mut self) -> impl Iterator<Item = &mut Tunnel> {
        let current_ready = self.current.as_ref().is_some_and(Tunnel::has_session);
        self.current.iter_mut().chain(
            self.previous
                .iter_mut()
                .filter(move |t| !current_ready && t.inherited.is_none()),
        )
    }

    /// The tunnels whose protocol timers run (rekeys, handshake retries,
    /// expiry): all but one taken over from a replaced entry, which would
    /// handshake under the node's retired key.
    pub fn timed_tunnels(&mut self) -> impl Iterator<Item = &mut Tunnel> {
        self.current
            .iter_mut()
            .chain(self.previous.iter_mut().filter(|t| t.inherited.is_none()))
    }

    /// The tunnel speaking for the device key `identity`.
    pub fn by_identity(&mut self, identity: &[u8; 32]) -> Option<&mut Tunnel> {
        self.current
            .iter_mut()
            .chain(self.previous.iter_mut())
            .find(|t| &t.identity == identity)
    }

    /// The tunnel whose sessions carry `index`.
    pub fn by_index(&mut self, index: u32) -> Option<&mut Tunnel> {
        match (&mut self.current, &mut self.previous) {
            (Some(t), _) if t.index == index => Some(t),
            (_, Some(t)) if t.index == index => Some(t),
            _ => None,
        }
    }

    /// Every tunnel's indices, for the device's index map.
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.current.iter().chain(&self.previous).map(|t| t.index)
    }

    /// Whether persistent keepalive is due now, and if so marks it sent.
    pub fn keepalive_due(&mut self, now: Instant) -> bool {
        let due = self.keepalive > 0
            && now.duration_since(self.keepalive_sent)
                >= Duration::from_secs(self.keepalive.into());
        if due {
            self.keepalive_sent = now;
        }
        due
    }

    /// Drops the previous tunnel one tick after the current one has a
    /// session (at least 250 ms): what the peer sent on the old session
    /// before it saw the new one — in flight, or sent until the first
    /// packet on the new session reached it — is still decrypted. Dropped
    /// at once, that was a window of a round trip of a TCP stream, each
    /// segment of it retransmitted. A tunnel taken over from a replaced
    /// entry goes at `now` if it is [`INHERITED_LIFETIME`] old, session or
    /// not.
    pub fn retire_previous(&mut self, now: Instant) {
        let expired = |t: &Tunnel| {
            t.inherited
                .is_some_and(|at| now.saturating_duration_since(at) >= INHERITED_LIFETIME)
        };
        if self.previous.as_ref().is_some_and(expired) {
            self.previous = None;
        }
        if !self.current.as_ref().is_some_and(Tunnel::has_session) {
            return;
        }
        match &mut self.previous {
            Some(t) if t.retiring => self.previous = None,
            Some(t) => t.retiring = true,
            None => {}
        }
    }
}

impl Peer {
    pub fn new(
        settings: &PeerSettings,
        keys: Keys,
        next_index: &mut dyn FnMut() -> u32,
    ) -> Arc<Self> {
        let now = Instant::now();
        let tunnel = |id: &Identity, index| {
            Tunnel::new(
                id,
                &settings.public_key,
                settings.preshared_key.as_ref(),
                index,
            )
        };
        let current = keys.identity.map(|id| tunnel(id, next_index()));
        let previous = keys
            .previous
            .filter(|_| current.is_some())
            .map(|id| tunnel(id, next_index()));
        Arc::new(Self {
            public_key: settings.public_key,
            state: Mutex::new(PeerState {
                current,
                previous,
                endpoint: settings.endpoint,
                keepalive: settings.keepalive,
                // A keepalive set is due at once (it opens the session).
                keepalive_sent: now - Duration::from_secs(settings.keepalive.into()),
                preshared_key: settings.preshared_key.clone(),
            }),
            successor: OnceLock::new(),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
        })
    }

    /// The peer's state. A poisoned lock means a worker panicked, and the
    /// panic hook is already ending the process; carrying on with the
    /// state as it is beats a second panic.
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies changed settings in place: the tunnel and its sessions stay
    /// unless the identity changed (the kernel drops sessions then too,
    /// unless the old key stays as the device's previous key); a new
    /// preshared key gets a new tunnel while the old one keeps carrying
    /// traffic until the new one has a session.
    pub fn update(
        &self,
        old: &PeerSettings,
        new: &PeerSettings,
        keys: Keys,
        identity_changed: bool,
        next_index: &mut dyn FnMut() -> u32,
    ) {
        let mut s = self.lock();
        if old.endpoint != new.endpoint {
            s.endpoint = new.endpoint;
        }
        if old.keepalive != new.keepalive {
            s.keepalive = new.keepalive;
            s.keepalive_sent = Instant::now() - Duration::from_secs(new.keepalive.into());
        }
        let psk_changed = s.preshared_key != new.preshared_key;
        s.preshared_key = new.preshared_key.clone();
        let Some(id) = keys.identity else {
            s.current = None;
            s.previous = None;
            return;
        };
        let tunnel = |id: &Identity, index| {
            Tunnel::new(id, &new.public_key, new.preshared_key.as_ref(), index)
        };
        if identity_changed || s.current.is_none() {
            let old_tunnel = s.current.replace(tunnel(id, next_index()));
            // Rotating: the old key's tunnel keeps its sessions.
            s.previous = old_tunnel.filter(|t| {
                keys.previous
                    .is_some_and(|p| t.identity == p.public.to_bytes())
            });
        } else if psk_changed {
            let old_tunnel = s.current.replace(tunnel(id, next_index()));
            if old_tunnel.as_ref().is_some_and(Tunnel::has_session) {
                s.previous = old_tunnel;
            }
        }
        let moved = s.current.as_ref().is_some_and(Tunnel::has_session);
        let previous_identity = s.previous.as_ref().map(|t| t.identity);
        match keys.previous {
            // A peer not yet on the new key reaches the previous one.
            Some(p) if !moved && previous_identity != Some(p.public.to_bytes()) => {
                s.previous = Some(tunnel(p, next_index()));
            }
            // The overlap ended: tunnels under a retired key go.
            None if previous_identity.is_some_and(|i| i != id.public.to_bytes()) => {
                s.previous = None;
            }
            _ => {}
        }
    }

    /// Takes over `old`'s sessions (the same node under its previous key):
    /// they carry traffic until this peer's own tunnel has a session, and
    /// its roamed endpoint if this peer has none planned. The sessions are
    /// those `old` sends on: its previous-key tunnel's when this device
    /// rotates too and the pair has not handshaken under its next key yet
    /// (two neighbours rotating at once). They are under the node's old
    /// key, so they only carry what they have (see [`Tunnel::inherited`]).
    pub fn succeed(self: &Arc<Self>, old: &Peer, now: Instant) {
        let mut from = old.lock();
        let mut to = self.lock();
        // Workers still routing by the configuration being replaced reach
        // `old`, whose tunnels are gone: they follow this (dropping what
        // they hold was a whole TSO batch of a TCP stream, ~45 segments).
        let _ = old.successor.set(self.clone());
        let sending = if from.sends_on_previous() {
            from.previous.take()
        } else {
            from.current.take()
        };
        if let Some(mut tunnel) = sending.filter(Tunnel::has_session) {
            tunnel.inherited = Some(now);
            to.previous = Some(tunnel);
        }
        if to.endpoint.is_none() {
            to.endpoint = from.endpoint;
        }
    }

    /// Locks the entry holding this one's tunnels now: itself, or the
    /// successor that took them over in a `set` whose configuration the
    /// caller had not loaded yet. [`Peer::succeed`] names the successor
    /// under this entry's lock, so an entry locked with none named still
    /// has its tunnels.
    pub fn lock_holder(self: &Arc<Self>) -> (&Arc<Peer>, MutexGuard<'_, PeerState>) {
        let mut peer = self;
        loop {
            while let Some(next) = peer.successor.get() {
                peer = next;
            }
            let state = peer.lock();
            if peer.successor.get().is_none() {
                return (peer, state);
            }
        }
    }

    /// When the last handshake completed, since the Unix epoch.
    pub fn last_handshake(&self, now: SystemTime) -> Option<Duration> {
        let s = self.lock();
        let age = s.current.as_ref()?.tunn.time_since_last_handshake()?;
        now.checked_sub(age)?.duration_since(UNIX_EPOCH).ok()
    }

    pub fn count_rx(&self, bytes: usize) {
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn count_tx(&self, bytes: usize) {
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// The device keys a peer's tunnels speak for.
#[derive(Clone, Copy)]
pub struct Keys<'a> {
    pub identity: Option<&'a Identity>,
    /// The key being rotated away from.
    pub previous: Option<&'a Identity>,
}

/// The rate limiter all tunnels share, keyed to the device's public key.
pub fn limiter(public: &boringtun::x25519::PublicKey) -> Arc<RateLimiter> {
    /// Handshakes per second before cookies are required (boringtun's).
    const HANDSHAKES_PER_SECOND: u64 = 10;
    Arc::new(RateLimiter::new(public, HANDSHAKES_PER_SECOND))
}

#[cfg(test)]
mod tests {
    use boringtun::noise::TunnResult;
    use weft_keys::PrivateKey;

    use super::*;

    /// The peer's end of `tunnel`, handshaken with it in memory (the peer
    /// initiates, as one that just moved its entry does).
    fn far_end(tunnel: &mut Tunnel, peer: &PrivateKey) -> Tunn {
        let here = boringtun::x25519::PublicKey::from(tunnel.identity);
        let mut far = Tunn::new(peer.secret(), here, None, None, 7, None);
        let (mut a, mut b) = ([0u8; 256], [0u8; 256]);
        let TunnResult::WriteToNetwork(init) = far.format_handshake_initiation(&mut a, false)
        else {
            panic!("no initiation")
        };
        let TunnResult::WriteToNetwork(response) = tunnel.tunn.decapsulate(None, init, &mut b)
        else {
            panic!("no response")
        };
        let TunnResult::WriteToNetwork(keepalive) = far.decapsulate(None, response, &mut a) else {
            panic!("no keepalive")
        };
        // The keepalive confirms the session here.
        let _ = tunnel.tunn.decapsulate(None, keepalive, &mut b);
        far
    }

    /// Whether an IPv4 header `far` seals on its current session comes
    /// out of `tunnel`.
    fn delivers(far: &mut Tunn, tunnel: &mut Tunnel) -> bool {
        let ip = [
            0x45, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let (mut sealed, mut opened) = ([0u8; 256], [0u8; 256]);
        let TunnResult::WriteToNetwork(packet) = far.encapsulate(&ip, &mut sealed) else {
            panic!("the far end has no session")
        };
        matches!(
            tunnel.tunn.decapsulate(None, packet, &mut opened),
            TunnResult::WriteToTunnelV4(..)
        )
    }

    /// An entry for a peer's old key, its successor for the peer's next key
    /// (both with `keepalive`), and the peer's end of the old entry's
    /// session.
    fn old_and_next(keepalive: u16) -> (Arc<Peer>, Arc<Peer>, Tunn) {
        let (here, old_key, next_key) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let identity = Identity::of(&here);
        let keys = Keys {
            identity: Some(&identity),
            previous: None,
        };
        let settings = |key: &PrivateKey| PeerSettings {
            public_key: key.public_key(),
            preshared_key: None,
            endpoint: None,
            keepalive,
            allowed_ips: Vec::new(),
        };
        let mut index = 10;
        let mut next_index = || {
            index += 1;
            index
        };
        let old = Peer::new(&settings(&old_key), keys, &mut next_index);
        let far = far_end(old.lock().current.as_mut().expect("a tunnel"), &old_key);
        let next = Peer::new(&settings(&next_key), keys, &mut next_index);
        (old, next, far)
    }

    /// A worker that routed by the configuration a `set` replaces reaches
    /// the entry being removed; the entry succeeding it holds the sessions.
    #[test]
    fn a_succeeded_entry_leads_to_its_successor_and_its_sessions() {
        let (old, next, mut far) = old_and_next(0);
        let session = old.lock().current.as_ref().map(|t| t.index);
        assert!(Arc::ptr_eq(old.lock_holder().0, &old), "not succeeded yet");

        next.succeed(&old, Instant::now());
        let (holder, mut state) = old.lock_holder();
        assert!(Arc::ptr_eq(holder, &next));
        let tunnel = state
            .by_index(session.expect("an index"))
            .expect("the session moved with the entry");
        assert!(delivers(&mut far, tunnel));
    }

    #[test]
    fn the_previous_tunnel_decrypts_for_a_tick_after_the_current_took_over() {
        let (old, next, peer) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let tunnel = |key: &PrivateKey, index| {
            Tunnel::new(&Identity::of(key), &peer.public_key(), None, index)
        };
        let mut previous = tunnel(&old, 1);
        let mut far_old = far_end(&mut previous, &peer);
        let mut state = PeerState {
            current: Some(tunnel(&next, 2)),
            previous: Some(previous),
            endpoint: None,
            keepalive: 0,
            keepalive_sent: Instant::now(),
            preshared_key: None,
        };
        state.retire_previous(Instant::now());
        assert!(
            state.previous.is_some(),
            "kept: the current one has no session"
        );

        let current = state.current.as_mut().expect("a current tunnel");
        far_end(current, &peer);
        state.retire_previous(Instant::now());
        // What the peer sent on the old session before it saw the new one.
        let previous = state.previous.as_mut().expect("kept for a tick");
        assert!(delivers(&mut far_old, previous));
        state.retire_previous(Instant::now());
        assert!(state.previous.is_none(), "retired at the next tick");
    }

    /// A tunnel taken over from a replaced entry speaks for the node's
    /// retired key: it decrypts what the peer sends on its session, but no
    /// timer of it runs (no rekey, no handshake under the old key), no
    /// persistent keepalive goes through it, and it is gone at its bound
    /// even if the new entry never handshakes.
    #[test]
    fn an_inherited_tunnel_only_decrypts_and_is_gone_at_its_bound() {
        let (old, next, mut far) = old_and_next(1);
        let at = Instant::now();
        next.succeed(&old, at);

        let mut state = next.lock();
        let inherited = state.previous.as_ref().map(|t| t.index);
        assert!(inherited.is_some(), "the session moved with the entry");
        let timed: Vec<u32> = state.timed_tunnels().map(|t| t.index).collect();
        assert!(
            !timed.contains(&inherited.unwrap_or_default()),
            "timed: {timed:?}"
        );
        assert_eq!(timed.len(), 1, "the new entry's own tunnel is timed");
        let kept_alive: Vec<u32> = state.keepalive_tunnels().map(|t| t.index).collect();
        assert!(!kept_alive.contains(&inherited.unwrap_or_default()));

        state.retire_previous(at + INHERITED_LIFETIME - Duration::from_secs(1));
        let previous = state.previous.as_mut().expect("kept until its bound");
        assert!(delivers(&mut far, previous), "it still decrypts");
        state.retire_previous(at + INHERITED_LIFETIME);
        assert!(state.previous.is_none(), "gone at its bound");
    }
}
