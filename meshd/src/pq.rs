//! Post-quantum preshared keys for every pair of nodes
//! (`WEFT_POST_QUANTUM`).
//!
//! Each pair runs the exchange of `weft_keys::pq` every interval over UDP
//! between the two nodes' mesh addresses, that is inside the pair's own
//! tunnel: WireGuard's cryptokey routing already proves who sent a datagram
//! from a peer's mesh address, the exchange needs no port on the underlay,
//! and it works wherever the pair's link does (behind NAT, through a
//! relay). The agreed key goes into the pair's WireGuard preshared-key
//! slot, which every data plane keeps sessions across: the next handshake
//! takes it (on Weft's device at once, old sessions carrying traffic until
//! then).
//!
//! [`Link`] is one pair's exchange, a pure state machine driven by time and
//! datagrams; [`shape`] decides what each device entry gets from the keys
//! agreed; [`run`] is the shell: sockets, timers, the table of keys.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::UdpSocket;
use tokio::sync::{watch, Notify};
use weft_keys::pq::{self, Agreed, Initiation, Message, PairKey};
use weft_keys::{PresharedKey, PrivateKey, PublicKey};

use crate::model::{Peer, PeerKind};
use crate::reconcile::PeerStats;

/// The exchange's UDP port on mesh addresses.
pub const PORT: u16 = 51821;
/// How long an unanswered message waits before it is sent again.
const RETRY: Duration = Duration::from_secs(1);
/// How many times a message is sent before the exchange is given up.
const TRIES: u8 = 5;
/// How long a pair may go without a handshake before the key it agreed is
/// assumed to be held by one end only (a confirm or its acknowledgement
/// lost while the link broke): both ends then go back to no preshared key,
/// which lets the tunnel, and so the next exchange, through again.
/// WireGuard rejects a session after 180 s; handshakes come at least every
/// 120 s on a link carrying probes.
pub const STALE: Duration = Duration::from_secs(300);
/// How often [`run`] looks at its timers.
const TICK: Duration = Duration::from_millis(250);

/// `WEFT_POST_QUANTUM`: whether pairs agree post-quantum preshared keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// No exchange: WireGuard's classical handshake alone.
    #[default]
    Off,
    /// Exchange with every peer; a peer that does not answer carries
    /// traffic under the classical handshake (reported).
    Prefer,
    /// A peer carries traffic only once a handshake under a post-quantum
    /// key has happened; until then only the exchange and probes (its
    /// mesh addresses) cross the link.
    Require,
}

/// The flags of `meshd run` for post-quantum keys.
#[derive(Debug, Clone, clap::Args)]
pub struct PqArgs {
    /// off: WireGuard's classical handshake alone; prefer: agree a
    /// post-quantum preshared key with every peer that answers; require: a
    /// peer carries pod and host traffic only under one.
    #[arg(
        long = "post-quantum",
        env = "WEFT_POST_QUANTUM",
        value_enum,
        default_value = "off"
    )]
    pub mode: Mode,
    /// How often each pair agrees a new key (at least 10s).
    #[arg(
        long = "post-quantum-interval",
        env = "WEFT_POST_QUANTUM_INTERVAL",
        default_value = "2m"
    )]
    pub interval: humantime::Duration,
    /// The exchange's UDP port on mesh addresses (inside the tunnel).
    #[arg(long = "post-quantum-port", env = "WEFT_POST_QUANTUM_PORT", default_value_t = PORT)]
    pub port: u16,
}

impl PqArgs {
    /// Refuses an interval too short to finish an exchange in.
    pub fn check(&self) -> Result<(), String> {
        if *self.interval < MIN_INTERVAL {
            return Err(format!(
                "--post-quantum-interval {} is shorter than {}",
                self.interval,
                humantime::format_duration(MIN_INTERVAL)
            ));
        }
        Ok(())
    }
}

/// The shortest interval: an exchange given up takes `TRIES` seconds.
const MIN_INTERVAL: Duration = Duration::from_secs(10);

/// The agent's side: it shapes each plan and tells the exchange whom to
/// talk to.
pub struct Handle {
    mode: Mode,
    roster: watch::Sender<Arc<Roster>>,
    table: watch::Receiver<Arc<Table>>,
    states: BTreeMap<String, State>,
    memory: Memory,
}

impl Handle {
    /// Starts the exchange task (unless `off`); `changed` is woken when a
    /// key is agreed.
    /// Binds the exchange's port (an error stops meshd: it names the
    /// port) and starts the task; unless `off`. The task never ends: if it
    /// does (a panic), meshd exits, so that it is restarted rather than
    /// leave every pair's key to go stale.
    pub async fn start(
        args: &PqArgs,
        changed: Arc<Notify>,
        health: Arc<crate::http::Health>,
    ) -> Result<Self, PqTaskError> {
        let (roster, roster_rx) = watch::channel(Arc::default());
        let (table_tx, table) = watch::channel(Arc::default());
        if args.mode != Mode::Off {
            let sockets = Sockets::bind(args.port).await?;
            let feeds = Feeds {
                roster: roster_rx,
                table: table_tx,
                changed,
                interval: *args.interval,
                port: args.port,
                health,
            };
            let task = tokio::spawn(run(feeds, sockets));
            tokio::spawn(async move {
                // It returns when the agent is gone (meshd stopping).
                if let Err(e) = task.await {
                    tracing::error!(error = %e, "the post-quantum exchange failed; meshd exits to be restarted");
                    std::process::exit(1);
                }
            });
        }
        Ok(Handle {
            mode: args.mode,
            roster,
            table,
            states: BTreeMap::new(),
            memory: Memory::default(),
        })
    }

    /// Shapes a plan's peers (see [`shape`]) and hands the exchange the
    /// peers it names. Returns each node's state. `stats` must be read
    /// after the last [`Handle::applied`] (see [`states`]).
    pub fn plan(
        &mut self,
        name: &str,
        me: &PrivateKey,
        peers: &mut BTreeMap<PublicKey, Peer>,
        stats: &[PeerStats],
        down: &BTreeSet<String>,
    ) -> &BTreeMap<String, State> {
        if self.mode == Mode::Off {
            return &self.states;
        }
        let table = self.table.borrow().clone();
        let handshakes = handshakes(peers, stats);
        self.states = states(
            peers,
            &table,
            &self.memory,
            &handshakes,
            down,
            SystemTime::now(),
        );
        self.memory.drop_down(&table, down);
        let mut roster = Roster {
            name: name.to_string(),
            me: Some(me.clone()),
            peers: BTreeMap::new(),
            classical: self
                .states
                .iter()
                .filter(|(_, s)| **s == State::Classical)
                .map(|(n, _)| n.clone())
                .collect(),
        };
        for (key, peer) in peers.iter().filter(|(_, p)| p.kind == PeerKind::Node) {
            // A rotating node's next key (the entry that replaces another)
            // is the one it exchanges under.
            let entry = roster.peers.entry(peer.node.clone()).or_insert(RosterPeer {
                key: *key,
                mesh_addresses: peer.mesh_addresses.clone(),
            });
            if peer.replaces.is_some() {
                entry.key = *key;
            }
        }
        self.roster.send_if_modified(|held| {
            let changed = **held != roster;
            if changed {
                *held = Arc::new(roster);
            }
            changed
        });
        shape(peers, &table, &self.states, self.mode);
        &self.states
    }

    /// What this node publishes ([`crate::annotations::POST_QUANTUM`]):
    /// the peers of the last plan not [`State::Live`]; `None` with `off`.
    pub fn report(&self) -> Option<crate::annotations::PostQuantum> {
        (self.mode != Mode::Off).then(|| crate::annotations::PostQuantum {
            mode: self.mode,
            missing: self
                .states
                .iter()
                .filter(|(_, s)| **s != State::Live)
                .map(|(n, _)| n.clone())
                .collect(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.mode != Mode::Off
    }

    /// Notes the keys a plan gave, once the device has them.
    pub fn applied(&mut self, peers: &BTreeMap<PublicKey, Peer>) {
        if self.mode != Mode::Off {
            self.memory.given = given(std::mem::take(&mut self.memory.given), peers);
        }
    }

    /// Whether the states moved since the last plan (a handshake under a
    /// new key happened, or a key went stale): the plan is due again.
    pub fn moved(
        &self,
        peers: &BTreeMap<PublicKey, Peer>,
        stats: &[PeerStats],
        down: &BTreeSet<String>,
    ) -> bool {
        self.mode != Mode::Off
            && states(
                peers,
                &self.table.borrow(),
                &self.memory,
                &handshakes(peers, stats),
                down,
                SystemTime::now(),
            ) != self.states
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Off => "off",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
        })
    }
}

impl serde::Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A pair's key as installed on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub epoch: u64,
    pub psk: PresharedKey,
    pub at: SystemTime,
}

/// The agreed keys by peer node name: a node's next key (while it
/// rotates) shares its current key's preshared key.
pub type Table = BTreeMap<String, Installed>;

/// What a link does next.
#[derive(Debug, Default)]
pub struct Out {
    pub send: Vec<Vec<u8>>,
    pub install: Option<Agreed>,
    pub failed: Option<Failure>,
}

/// Why an exchange stopped or a message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The exchange was given up: the peer did not answer.
    GaveUp(&'static str),
    /// A message from the peer's address was refused (malformed, a wrong
    /// tag): noted, the exchange goes on.
    Refused(String),
}

impl Out {
    fn send(message: Vec<u8>) -> Self {
        Out {
            send: vec![message],
            ..Out::default()
        }
    }

    fn refused(why: String) -> Self {
        Out {
            failed: Some(Failure::Refused(why)),
            ..Out::default()
        }
    }
}

enum Pending {
    Idle,
    /// Initiator: the offer sent.
    Offered {
        init: Initiation,
        offer: Vec<u8>,
        sent: Instant,
        tries: u8,
    },
    /// Initiator: the key agreed, the confirm sent, the acknowledgement
    /// awaited (the key is installed on it).
    Confirming {
        agreed: Agreed,
        sent: Instant,
        tries: u8,
    },
    /// Responder: answered, waiting for the confirm (the key is installed
    /// on it). The offer's MAC and the accept are kept: a repeated offer
    /// gets the same answer.
    Accepted {
        agreed: Agreed,
        offer_mac: [u8; 32],
        accept: Vec<u8>,
        at: Instant,
    },
}

/// One pair's exchange, as seen from this node.
pub struct Link {
    pair: PairKey,
    /// This end starts the exchanges (its node name is the lower); the
    /// other starts one only when none has come for two intervals.
    leads: bool,
    interval: Duration,
    pending: Pending,
    /// The last epoch this end offered (its own count: a peer's epoch is
    /// only a label of its exchange).
    epoch: u64,
    /// The responder's last agreement: a repeated confirm is acknowledged
    /// again (the first acknowledgement may have been lost).
    answered: Option<Agreed>,
    /// When this end last did a responder's work: at most once per
    /// [`ANSWER_EVERY`], whatever the peer sends.
    answered_at: Option<Instant>,
    next_at: Instant,
    failures: u32,
}

/// The least time between two answers to new offers of one peer.
const ANSWER_EVERY: Duration = Duration::from_millis(250);

impl Link {
    pub fn new(pair: PairKey, leads: bool, interval: Duration, now: Instant) -> Self {
        Link {
            pair,
            leads,
            interval,
            pending: Pending::Idle,
            epoch: 0,
            answered: None,
            answered_at: None,
            // The other end gives the leader a moment to start.
            next_at: if leads { now } else { now + RETRY * 3 },
            failures: 0,
        }
    }

    /// Whether this link is between `me` and `peer` (keys change when a
    /// node rotates: the link is then made anew).
    pub fn is_between(&self, me: &PublicKey, peer: &PublicKey) -> bool {
        self.pair.me() == me && self.pair.peer() == peer
    }

    /// Starts the next exchange soon (the agent holds no key for the
    /// pair: a link that came back, a key dropped).
    pub fn hurry(&mut self, now: Instant) {
        if matches!(self.pending, Pending::Idle) {
            let soon = if self.leads { now } else { now + RETRY * 3 };
            self.next_at = self.next_at.min(soon);
        }
    }

    /// Exchanges given up in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn after_install(&mut self, now: Instant) {
        self.failures = 0;
        self.next_at = now
            + if self.leads {
                self.interval
            } else {
                self.interval * 2 + RETRY * 10
            };
    }

    fn give_up(&mut self, now: Instant, why: &'static str) -> Out {
        self.pending = Pending::Idle;
        self.failures += 1;
        // 2, 4, 8 … seconds, at most an interval.
        let backoff = RETRY * 2u32.saturating_pow(self.failures.min(16));
        self.next_at = now + backoff.min(self.interval);
        Out {
            failed: Some(Failure::GaveUp(why)),
            ..Out::default()
        }
    }

    /// Retries, gives up, or starts an exchange that is due.
    pub fn tick(&mut self, now: Instant) -> Out {
        match &mut self.pending {
            Pending::Idle if now >= self.next_at => {
                self.epoch = self.epoch.wrapping_add(1);
                let (init, offer) = pq::initiate(&self.pair, self.epoch);
                let offer = offer.encode();
                self.pending = Pending::Offered {
                    init,
                    offer: offer.clone(),
                    sent: now,
                    tries: 1,
                };
                Out::send(offer)
            }
            Pending::Offered {
                offer, sent, tries, ..
            } if now >= *sent + RETRY => {
                if *tries >= TRIES {
                    return self.give_up(now, "no answer to the offer");
                }
                *sent = now;
                *tries += 1;
                Out::send(offer.clone())
            }
            Pending::Confirming {
                agreed,
                sent,
                tries,
            } if now >= *sent + RETRY => {
                if *tries >= TRIES {
                    return self.give_up(now, "the confirm was not acknowledged");
                }
                *sent = now;
                *tries += 1;
                Out::send(agreed.confirm().encode())
            }
            Pending::Accepted { at, .. } if now >= *at + RETRY * u32::from(TRIES) * 2 => {
                self.give_up(now, "no confirm of the accept")
            }
            _ => Out::default(),
        }
    }

    /// Handles a message from the peer (already attributed to it by where
    /// it came from).
    pub fn receive(&mut self, message: Message, now: Instant) -> Out {
        match message {
            Message::Offer { epoch, ek, e, mac } => {
                match &self.pending {
                    // Both ends offered at once: the leader's offer wins.
                    Pending::Offered { .. } if self.leads => return Out::default(),
                    // The peer answered this end's offer: an offer now is
                    // stale (or not the peer's), and taking it would drop
                    // the acknowledgement the peer's install is waiting on.
                    Pending::Confirming { .. } => return Out::default(),
                    Pending::Accepted {
                        offer_mac, accept, ..
                    } if *offer_mac == mac => return Out::send(accept.clone()),
                    _ => {}
                }
                if self.answered_at.is_some_and(|t| now < t + ANSWER_EVERY) {
                    return Out::default();
                }
                match pq::respond(&self.pair, epoch, &ek, &e, &mac) {
                    Ok((accept, agreed)) => {
                        let accept = accept.encode();
                        self.answered_at = Some(now);
                        self.pending = Pending::Accepted {
                            agreed,
                            offer_mac: mac,
                            accept: accept.clone(),
                            at: now,
                        };
                        Out::send(accept)
                    }
                    Err(e) => Out::refused(format!("offer refused: {e}")),
                }
            }
            Message::Accept { epoch, ct, e, tag } => {
                let Pending::Offered { init, .. } = &self.pending else {
                    return Out::default();
                };
                if init.epoch() != epoch {
                    return Out::default();
                }
                // A forged or stale accept leaves the exchange waiting for
                // the real one.
                match init.finish(&self.pair, &ct, &e, &tag) {
                    Ok(agreed) => {
                        let confirm = agreed.confirm().encode();
                        self.pending = Pending::Confirming {
                            agreed,
                            sent: now,
                            tries: 1,
                        };
                        Out::send(confirm)
                    }
                    Err(e) => Out::refused(format!("accept refused: {e}")),
                }
            }
            Message::Confirm { epoch, tag } => {
                if let Pending::Accepted { agreed, .. } = &self.pending {
                    if agreed.epoch == epoch && agreed.confirms(&tag) {
                        let agreed = agreed.clone();
                        self.pending = Pending::Idle;
                        self.answered = Some(agreed.clone());
                        self.after_install(now);
                        return Out {
                            send: vec![agreed.done().encode()],
                            install: Some(agreed),
                            ..Out::default()
                        };
                    }
                }
                match &self.answered {
                    Some(a) if a.epoch == epoch && a.confirms(&tag) => Out::send(a.done().encode()),
                    _ => Out::refused(format!(
                        "confirm of epoch {epoch} refused: no such exchange or a wrong tag"
                    )),
                }
            }
            Message::Done { epoch, tag } => {
                let Pending::Confirming { agreed, .. } = &self.pending else {
                    return Out::default();
                };
                if agreed.epoch != epoch || !agreed.acknowledges(&tag) {
                    return Out::refused(format!("acknowledgement of epoch {epoch} refused"));
                }
                let agreed = agreed.clone();
                self.pending = Pending::Idle;
                self.after_install(now);
                Out {
                    install: Some(agreed),
                    ..Out::default()
                }
            }
        }
    }
}

/// A pair's post-quantum state, as `meshctl status` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// A handshake under the agreed key has happened.
    Live,
    /// A key is agreed; the next handshake takes it.
    Pending,
    /// No key agreed (or a stale one dropped): the classical handshake.
    Classical,
}

/// What the device holds for a node: the key, and whether it replaced
/// another key of this meshd's. A pair's first key restarts its entries
/// (`reconcile::wireguard::diff`), ending every session made without a
/// key, so from then on every handshake the device reports is under a
/// post-quantum key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Given {
    pub psk: PresharedKey,
    /// The entries held a key before this one: their sessions are under
    /// a post-quantum key either way (this one once handshaken, the one
    /// before until then).
    pub after_key: bool,
}

/// What the device holds once `peers` are applied, after `before`.
pub fn given(
    mut before: BTreeMap<String, Given>,
    peers: &BTreeMap<PublicKey, Peer>,
) -> BTreeMap<String, Given> {
    let mut given = BTreeMap::new();
    for peer in peers.values() {
        let Some(psk) = &peer.preshared_key else {
            continue;
        };
        let g = match before.remove(&peer.node) {
            Some(g) if g.psk == *psk => g,
            earlier => Given {
                psk: psk.clone(),
                after_key: earlier.is_some(),
            },
        };
        given.insert(peer.node.clone(), g);
    }
    given
}

/// What the agent's side remembers between plans: the keys the device
/// holds, and those dropped because their link went down (never given
/// again: the next exchange's key is).
#[derive(Debug, Default)]
pub struct Memory {
    pub given: BTreeMap<String, Given>,
    pub dropped: BTreeMap<String, PresharedKey>,
}

impl Memory {
    /// Notes the keys of links `down` as dropped; forgets dropped keys the
    /// table has replaced.
    pub fn drop_down(&mut self, table: &Table, down: &BTreeSet<String>) {
        for (node, k) in table {
            if down.contains(node) {
                self.dropped.insert(node.clone(), k.psk.clone());
            }
        }
        self.dropped
            .retain(|n, psk| table.get(n).is_some_and(|k| k.psk == *psk));
    }
}

/// The latest handshake of any of each node's entries.
pub fn handshakes(
    peers: &BTreeMap<PublicKey, Peer>,
    stats: &[PeerStats],
) -> BTreeMap<String, SystemTime> {
    let mut latest: BTreeMap<String, SystemTime> = BTreeMap::new();
    for s in stats {
        if let (Some(peer), Some(at)) = (peers.get(&s.key), s.last_handshake) {
            let e = latest.entry(peer.node.clone()).or_insert(at);
            *e = (*e).max(at);
        }
    }
    latest
}

/// Each directly linked node's state: [`State::Classical`] without a key, with its
/// link reported down, or with a key but no handshake for [`STALE`] (see
/// there; without keepalives links are not judged); [`State::Live`] once
/// the device holds a key and has a session (see [`Given`]): only a
/// pair's first key, or the first after a stale one, waits for a
/// handshake. `handshakes` must be read after the device was last given
/// keys, or a session the restart ended would be counted.
pub fn states(
    peers: &BTreeMap<PublicKey, Peer>,
    table: &Table,
    memory: &Memory,
    handshakes: &BTreeMap<String, SystemTime>,
    down: &BTreeSet<String>,
    now: SystemTime,
) -> BTreeMap<String, State> {
    peers
        .values()
        // A relayed node's entry carries nothing (its traffic crosses the
        // relay's links, each with its own key) and never handshakes.
        .filter(|peer| crate::probe::target(peer).is_some())
        .map(|peer| {
            let handshake = handshakes.get(&peer.node).copied();
            let state = match table.get(&peer.node) {
                None => State::Classical,
                // A link reported down (liveness: silent past
                // --peer-timeout, both ends alike) may be down because the
                // two ends hold different keys (one rebooted, or lost an
                // acknowledgement): the handshake then fails for good, and
                // the exchange cannot cross. Both go back to none.
                Some(k)
                    if down.contains(&peer.node)
                        || memory.dropped.get(&peer.node) == Some(&k.psk) =>
                {
                    State::Classical
                }
                Some(k)
                    if older_than(k.at, now) && handshake.is_none_or(|h| older_than(h, now)) =>
                {
                    State::Classical
                }
                Some(_) => match memory.given.get(&peer.node) {
                    Some(g) if g.after_key || handshake.is_some() => State::Live,
                    _ => State::Pending,
                },
            };
            (peer.node.clone(), state)
        })
        .collect()
}

/// What the device's entries get: a node's agreed key unless its state is
/// [`State::Classical`]; with [`Mode::Require`] an entry whose node is not
/// [`State::Live`] keeps only that node's own mesh addresses of its allowed
/// IPs, so that the exchange and probes cross and nothing else (a relay's
/// entry loses the nodes it carries; an entry without its own node's
/// address, a relayed node's, keeps nothing).
pub fn shape(
    peers: &mut BTreeMap<PublicKey, Peer>,
    table: &Table,
    states: &BTreeMap<String, State>,
    mode: Mode,
) {
    if mode == Mode::Off {
        return;
    }
    // External peers are stock WireGuard clients: no exchange, no key.
    for peer in peers.values_mut().filter(|p| p.kind == PeerKind::Node) {
        let state = states.get(&peer.node).copied().unwrap_or(State::Classical);
        peer.preshared_key = match state {
            State::Classical => None,
            _ => table.get(&peer.node).map(|k| k.psk.clone()),
        };
        peer.key_ends_sessions = mode == Mode::Require;
        if mode == Mode::Require && state != State::Live {
            let own = &peer.mesh_addresses;
            peer.allowed_ips.retain(|net| {
                net.prefix_len() == net.max_prefix_len() && own.contains(&net.addr())
            });
        }
    }
}

fn older_than(at: SystemTime, now: SystemTime) -> bool {
    now.duration_since(at).is_ok_and(|age| age > STALE)
}

/// Who this node exchanges with: its key and each peer node's current
/// key and mesh addresses (from the agent's last plan).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Roster {
    pub name: String,
    pub me: Option<PrivateKey>,
    pub peers: BTreeMap<String, RosterPeer>,
    /// The peers with no key in use: their exchange is due now.
    pub classical: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterPeer {
    pub key: PublicKey,
    pub mesh_addresses: Vec<IpAddr>,
}

impl Roster {
    /// The peer node a datagram from `from` came from: the one whose own
    /// mesh address it is (the tunnel proved that node sent it).
    fn node_of(&self, from: IpAddr) -> Option<&str> {
        self.peers
            .iter()
            .find(|(_, p)| p.mesh_addresses.contains(&from))
            .map(|(n, _)| n.as_str())
    }
}

/// Errors that stop the exchange task.
#[derive(Debug, thiserror::Error)]
pub enum PqTaskError {
    #[error("binding the post-quantum exchange's UDP port {port}: {source}")]
    Bind { port: u16, source: std::io::Error },
}

/// The sockets: one per family, on every address (only datagrams from a
/// planned peer's mesh address are read, and the source guard drops mesh
/// sources arriving anywhere but the WireGuard interface).
struct Sockets {
    v4: UdpSocket,
    v6: Option<UdpSocket>,
}

impl Sockets {
    async fn bind(port: u16) -> Result<Self, PqTaskError> {
        let v4 = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
            .await
            .map_err(|source| PqTaskError::Bind { port, source })?;
        // IPv6 only where the host has it; its own socket (v6only).
        let v6 = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)
            .and_then(|s| {
                s.set_only_v6(true)?;
                s.set_nonblocking(true)?;
                s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
                UdpSocket::from_std(s.into())
            })
            .ok();
        Ok(Sockets { v4, v6 })
    }

    async fn send(&self, to: IpAddr, port: u16, bytes: &[u8]) {
        let socket = match to {
            IpAddr::V4(_) => Some(&self.v4),
            IpAddr::V6(_) => self.v6.as_ref(),
        };
        if let Some(s) = socket {
            if let Err(e) = s.send_to(bytes, (to, port)).await {
                tracing::debug!(%to, error = %e, "sending a post-quantum exchange message");
            }
        }
    }
}

/// What [`run`] shares with the agent.
struct Feeds {
    roster: watch::Receiver<Arc<Roster>>,
    table: watch::Sender<Arc<Table>>,
    /// Woken when a key is installed (the agent syncs the device).
    changed: Arc<Notify>,
    interval: Duration,
    port: u16,
    health: Arc<crate::http::Health>,
}

/// Runs every pair's exchange until the process ends.
/// Runs every pair's exchange until the process ends.
async fn run(mut feeds: Feeds, sockets: Sockets) {
    let mut links: BTreeMap<String, Link> = BTreeMap::new();
    let mut ticker = tokio::time::interval(TICK);
    let mut buf4 = vec![0u8; pq::MAX_MESSAGE + 1];
    let mut buf6 = vec![0u8; pq::MAX_MESSAGE + 1];
    loop {
        let roster = feeds.roster.borrow().clone();
        let mut outs: Vec<(String, Out)> = Vec::new();
        tokio::select! {
            r = feeds.roster.changed() => {
                if r.is_err() {
                    return;
                }
                let roster = feeds.roster.borrow().clone();
                relink(&mut links, &roster, feeds.interval, Instant::now());
                let gone: BTreeSet<String> = feeds
                    .table
                    .borrow()
                    .keys()
                    .filter(|n| !roster.peers.contains_key(*n))
                    .cloned()
                    .collect();
                if !gone.is_empty() {
                    feeds.table.send_modify(|t| {
                        let mut next = (**t).clone();
                        next.retain(|n, _| !gone.contains(n));
                        *t = Arc::new(next);
                    });
                }
                continue;
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                for (name, link) in &mut links {
                    outs.push((name.clone(), link.tick(now)));
                }
            }
            Ok((n, from)) = sockets.v4.recv_from(&mut buf4) => {
                outs.extend(received(&roster, &mut links, &buf4[..n], from.ip()));
            }
            Ok((n, from)) = recv6(&sockets.v6, &mut buf6) => {
                outs.extend(received(&roster, &mut links, &buf6[..n], from.ip()));
            }
        }
        for (name, out) in outs {
            let Some(peer) = roster.peers.get(&name) else {
                continue;
            };
            match &out.failed {
                Some(Failure::GaveUp(why)) => {
                    tracing::info!(peer = %name, reason = %why, "post-quantum exchange given up; tried again later");
                    feeds.health.metrics.count_pq_failure(&name);
                }
                // Per datagram: counted, logged only at debug.
                Some(Failure::Refused(why)) => {
                    tracing::debug!(peer = %name, reason = %why, "post-quantum message refused");
                    feeds.health.metrics.count_pq_failure(&name);
                }
                None => {}
            }
            if let Some(to) = target(peer) {
                for bytes in &out.send {
                    sockets.send(to, feeds.port, bytes).await;
                }
            }
            if let Some(agreed) = out.install {
                tracing::debug!(peer = %name, epoch = agreed.epoch, "post-quantum preshared key agreed");
                let installed = Installed {
                    epoch: agreed.epoch,
                    psk: agreed.psk.clone(),
                    at: SystemTime::now(),
                };
                feeds.table.send_modify(|t| {
                    let mut next = (**t).clone();
                    next.insert(name.clone(), installed);
                    *t = Arc::new(next);
                });
                feeds.changed.notify_one();
            }
        }
    }
}

/// Keeps a link per planned peer, made anew when either key changed.
fn relink(links: &mut BTreeMap<String, Link>, roster: &Roster, interval: Duration, now: Instant) {
    let Some(me) = &roster.me else {
        links.clear();
        return;
    };
    let my_key = me.public_key();
    links.retain(|n, l| {
        roster
            .peers
            .get(n)
            .is_some_and(|p| l.is_between(&my_key, &p.key))
    });
    for (name, peer) in &roster.peers {
        if let Some(link) = links.get_mut(name) {
            if roster.classical.contains(name) {
                link.hurry(now);
            }
            continue;
        }
        match PairKey::new(me, &peer.key) {
            Ok(pair) => {
                links.insert(
                    name.clone(),
                    Link::new(pair, roster.name < *name, interval, now),
                );
            }
            Err(e) => {
                tracing::warn!(peer = %name, error = %e, "no post-quantum exchange with this key")
            }
        }
    }
}

async fn recv6(socket: &Option<UdpSocket>, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match socket {
        Some(s) => s.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// A datagram's effect: nothing unless it comes from a planned peer's own
/// mesh address and parses.
fn received(
    roster: &Roster,
    links: &mut BTreeMap<String, Link>,
    bytes: &[u8],
    from: IpAddr,
) -> Option<(String, Out)> {
    let name = roster.node_of(canonical(from))?;
    let link = links.get_mut(name)?;
    let out = match Message::decode(bytes) {
        Ok(m) => link.receive(m, Instant::now()),
        Err(e) => Out::refused(format!("a malformed message: {e}")),
    };
    Some((name.to_string(), out))
}

fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// Where a peer's messages go: its own mesh address, IPv4 first.
fn target(peer: &RosterPeer) -> Option<IpAddr> {
    let mut own = peer.mesh_addresses.clone();
    own.sort_by_key(|a| a.is_ipv6());
    own.first().copied()
}

#[cfg(test)]
mod tests;
