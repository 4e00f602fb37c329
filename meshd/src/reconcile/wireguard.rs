//! WireGuard device reconciliation: read the device, diff it against the
//! plan, send only the difference as one `DeviceUpdate` (netlink for the
//! kernel, UAPI for userspace). Unchanged peers are not touched, so their
//! sessions and counters carry on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use anyhow::{Context, Result};
use ipnet::IpNet;
use weft_keys::{PresharedKey, PrivateKey, PublicKey};
use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use crate::host_traffic::FWMARK;
use crate::model::Peer;

/// The device as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actual {
    pub private_key: Option<[u8; 32]>,
    pub listen_port: Option<u16>,
    /// `None`: no mark (0).
    pub fwmark: Option<u32>,
    pub peers: BTreeMap<PublicKey, ActualPeer>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualPeer {
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<IpNet>,
    pub keepalive: Option<u16>,
    /// `None`: the all-zero key (none).
    pub preshared_key: Option<PresharedKey>,
}

impl Actual {
    pub fn from_device(device: &Device) -> Self {
        let peers = device
            .peers
            .iter()
            .map(|p| {
                let c = &p.config;
                let allowed = c
                    .allowed_ips
                    .iter()
                    .filter_map(|a| IpNet::new(a.address, a.cidr).ok())
                    .collect();
                let keepalive = c.persistent_keepalive_interval.filter(|k| *k > 0);
                let preshared_key = c
                    .preshared_key
                    .as_ref()
                    .filter(|k| k.0 != [0; 32])
                    .map(|k| PresharedKey::from_bytes(k.0));
                (
                    PublicKey::from_bytes(c.public_key.0),
                    ActualPeer {
                        endpoint: c.endpoint,
                        allowed_ips: allowed,
                        keepalive,
                        preshared_key,
                    },
                )
            })
            .collect();
        Self {
            private_key: device.private_key.as_ref().map(|k| k.0),
            listen_port: device.listen_port,
            fwmark: device.fwmark.filter(|m| *m != 0),
            peers,
        }
    }
}

/// One peer's required changes; `None` fields stay as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Option<BTreeSet<IpNet>>,
    /// `Some(0)` turns keepalives off.
    pub keepalive: Option<u16>,
    /// `Some(None)` removes the key (sets the all-zero key).
    pub preshared_key: Option<Option<PresharedKey>>,
    /// The entry is removed and added back (every field then set): its
    /// sessions end.
    pub restart: bool,
}

/// Everything to change on the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub private_key: Option<[u8; 32]>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub upserts: Vec<PeerChange>,
    pub removals: Vec<PublicKey>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// How many things change (for metrics and the no-churn guarantee).
    pub fn count(&self) -> usize {
        usize::from(self.private_key.is_some())
            + usize::from(self.listen_port.is_some())
            + usize::from(self.fwmark.is_some())
            + self.upserts.len()
            + self.removals.len()
    }
}

/// What should change to take `actual` to the plan. An endpoint is only
/// rewritten when the plan's endpoint itself changed (`applied` holds what
/// was last set), so a peer WireGuard has seen roam — a NAT'd node whose
/// packets come from another address — is not pulled back.
pub fn diff(
    private_key: &PrivateKey,
    listen_port: u16,
    peers: &BTreeMap<PublicKey, Peer>,
    actual: &Actual,
    applied: &BTreeMap<PublicKey, SocketAddr>,
) -> Changes {
    // Devices clamp the key they are given (and report it clamped): the
    // same key either way. Compared raw, a kernel device would be given
    // its key again on every pass, and the kernel expires every session
    // when it is (it compares the clamped key it holds with the raw one).
    let mut changes = Changes {
        private_key: (!holds(actual.private_key, private_key)).then(|| private_key.to_bytes()),
        listen_port: (actual.listen_port != Some(listen_port)).then_some(listen_port),
        // Marked, WireGuard's datagrams skip the host's rule into the mesh
        // (crate::host_traffic), whether or not it is in place.
        fwmark: (actual.fwmark != Some(FWMARK)).then_some(FWMARK),
        ..Changes::default()
    };
    for (pk, want) in peers {
        let have = actual.peers.get(pk);
        // A peer without a planned endpoint keeps whatever WireGuard learnt.
        let endpoint = match (have.and_then(|h| h.endpoint), want.endpoint) {
            (_, None) => None,
            (Some(current), Some(want)) if current == want => None,
            (Some(_), Some(want)) if applied.get(pk) == Some(&want) => None,
            (_, Some(want)) => Some(want),
        };
        let allowed_ips = (have.map(|h| &h.allowed_ips) != Some(&want.allowed_ips))
            .then(|| want.allowed_ips.clone());
        let keepalive = match (have.and_then(|h| h.keepalive), want.persistent_keepalive) {
            (a, b) if a == b && have.is_some() => None,
            (_, wanted) => Some(wanted.unwrap_or(0)),
        };
        // A pair's first preshared key ends the sessions made without one
        // where that is asked for: kernel WireGuard and wireguard-go keep
        // sessions across a key change until their next rekey (two
        // minutes), and with `require` none made without the key may carry
        // on that long.
        if let Some(had) = have.filter(|h| {
            want.key_ends_sessions && h.preshared_key.is_none() && want.preshared_key.is_some()
        }) {
            changes.upserts.push(PeerChange {
                key: *pk,
                endpoint: want.endpoint.or(had.endpoint),
                allowed_ips: Some(want.allowed_ips.clone()),
                keepalive: Some(want.persistent_keepalive.unwrap_or(0)),
                preshared_key: Some(want.preshared_key.clone()),
                restart: true,
            });
            continue;
        }
        let preshared_key = (have.map(|h| &h.preshared_key) != Some(&want.preshared_key))
            .then(|| want.preshared_key.clone());
        if have.is_none()
            || endpoint.is_some()
            || allowed_ips.is_some()
            || keepalive.is_some()
            || preshared_key.is_some()
        {
            changes.upserts.push(PeerChange {
                key: *pk,
                endpoint,
                allowed_ips,
                keepalive,
                preshared_key,
                restart: false,
            });
        }
    }
    // Peers that gain a prefix go first: a prefix given to one peer leaves
    // whichever peer had it in the same step (kernel, wireguard-go and
    // Weft's device alike), so a path moving from a peer to a relay never
    // leaves its prefix on no peer, however the update is applied.
    changes.upserts.sort_by_key(|c| {
        let had = actual.peers.get(&c.key).map(|h| &h.allowed_ips);
        let gains = c
            .allowed_ips
            .as_ref()
            .is_some_and(|want| had.is_none_or(|had| !want.is_subset(had)));
        !gains
    });
    changes.removals = actual
        .peers
        .keys()
        .filter(|k| !peers.contains_key(k))
        .copied()
        .collect();
    changes
}

/// Whether a device reporting `reported` as its private key holds `key`
/// (devices clamp the key they are given).
pub fn holds(reported: Option<[u8; 32]>, key: &PrivateKey) -> bool {
    reported.is_some_and(|k| weft_keys::clamp(k) == key.to_clamped_bytes())
}

fn wg_key(k: &PublicKey) -> Key {
    Key(*k.as_bytes())
}

/// The `DeviceUpdate` carrying `changes`.
pub fn update(changes: &Changes) -> DeviceUpdate {
    let mut u = DeviceUpdate::new();
    if let Some(k) = changes.private_key {
        u = u.set_private_key(Key(k));
    }
    if let Some(p) = changes.listen_port {
        u = u.set_listen_port(p);
    }
    if let Some(m) = changes.fwmark {
        u = u.set_fwmark(m);
    }
    for c in &changes.upserts {
        if c.restart {
            u = u.remove_peer_by_key(&wg_key(&c.key));
        }
        let mut p = PeerConfigBuilder::new(&wg_key(&c.key));
        if let Some(e) = c.endpoint {
            p = p.set_endpoint(e);
        }
        if let Some(k) = c.keepalive {
            p = p.set_persistent_keepalive_interval(k);
        }
        match &c.preshared_key {
            Some(Some(k)) => p = p.set_preshared_key(Key(k.to_bytes())),
            Some(None) => p = p.unset_preshared_key(),
            None => {}
        }
        if let Some(allowed) = &c.allowed_ips {
            p = p.replace_allowed_ips();
            for net in allowed {
                p = p.add_allowed_ip(net.addr(), net.prefix_len());
            }
        }
        u = u.add_peer(p);
    }
    for k in &changes.removals {
        u = u.remove_peer_by_key(&wg_key(k));
    }
    u
}

/// Reads the device (blocking: netlink or a UAPI round trip).
pub fn read(iface: &InterfaceName, backend: Backend) -> Result<Device> {
    Device::get(iface, backend).with_context(|| format!("reading WireGuard device {iface}"))
}

/// Applies `changes` (blocking).
pub fn apply(iface: &InterfaceName, backend: Backend, changes: &Changes) -> Result<()> {
    update(changes)
        .apply(iface, backend)
        .with_context(|| format!("configuring WireGuard device {iface}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> PublicKey {
        PublicKey::from_bytes([seed; 32])
    }

    fn peer(ep: &str, allowed: &[&str], keepalive: Option<u16>) -> Peer {
        Peer {
            node: "n".into(),
            kind: crate::model::PeerKind::Node,
            endpoint: Some(ep.parse().unwrap()),
            offers: vec![ep.parse().unwrap()],
            allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
            mesh_addresses: Vec::new(),
            persistent_keepalive: keepalive,
            replaces: None,
            preshared_key: None,
            key_ends_sessions: false,
        }
    }

    fn actual_of(pk: &PrivateKey, peers: &BTreeMap<PublicKey, Peer>) -> Actual {
        Actual {
            private_key: Some(pk.to_bytes()),
            listen_port: Some(51820),
            fwmark: Some(FWMARK),
            peers: peers
                .iter()
                .map(|(k, p)| {
                    (
                        *k,
                        ActualPeer {
                            endpoint: p.endpoint,
                            allowed_ips: p.allowed_ips.clone(),
                            keepalive: p.persistent_keepalive,
                            preshared_key: p.preshared_key.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn empty_device_gets_everything_and_a_converged_one_nothing() {
        let pk = PrivateKey::generate();
        let peers = BTreeMap::from([(
            key(1),
            peer("198.18.1.1:51820", &["198.19.1.0/24"], Some(5)),
        )]);
        let c = diff(&pk, 51820, &peers, &Actual::default(), &BTreeMap::new());
        assert_eq!(c.count(), 4);
        assert_eq!(c.upserts[0].keepalive, Some(5));
        assert_eq!(c.fwmark, Some(FWMARK));
        let converged = actual_of(&pk, &peers);
        assert!(diff(&pk, 51820, &peers, &converged, &BTreeMap::new()).is_empty());
    }

    /// A device whose mark was changed (by hand, by an older meshd) gets
    /// Weft's back: unmarked, its datagrams would take the host's rule into
    /// the tunnel they carry.
    #[test]
    fn the_device_keeps_weft_s_mark() {
        let pk = PrivateKey::generate();
        let peers = BTreeMap::new();
        let mut actual = actual_of(&pk, &peers);
        for other in [None, Some(FWMARK ^ 1)] {
            actual.fwmark = other;
            let c = diff(&pk, 51820, &peers, &actual, &BTreeMap::new());
            assert_eq!((c.fwmark, c.count()), (Some(FWMARK), 1), "{other:?}");
        }
    }

    /// The kernel's boundary: kernel WireGuard and wireguard-go report the
    /// private key clamped. That is the same key: never given again (the
    /// kernel would expire every session if it were).
    #[test]
    fn a_device_reporting_the_clamped_key_has_the_key() {
        let pk = PrivateKey::from_bytes([0xff; 32]);
        assert_ne!(pk.to_bytes(), pk.to_clamped_bytes());
        let mut device = actual_of(&pk, &BTreeMap::new());
        device.private_key = Some(pk.to_clamped_bytes());
        assert!(diff(&pk, 51820, &BTreeMap::new(), &device, &BTreeMap::new()).is_empty());
        device.private_key = Some(PrivateKey::from_bytes([0x11; 32]).to_clamped_bytes());
        let other = diff(&pk, 51820, &BTreeMap::new(), &device, &BTreeMap::new());
        assert_eq!(other.private_key, Some(pk.to_bytes()));
    }

    #[test]
    fn only_the_changed_peer_is_touched() {
        let pk = PrivateKey::generate();
        let mut peers = BTreeMap::from([
            (key(1), peer("198.18.1.1:51820", &["198.19.1.0/24"], None)),
            (key(2), peer("198.18.1.2:51820", &["198.19.2.0/24"], None)),
            (key(3), peer("198.18.1.3:51820", &["198.19.3.0/24"], None)),
        ]);
        let actual = actual_of(&pk, &peers);
        peers
            .get_mut(&key(2))
            .unwrap()
            .allowed_ips
            .insert("198.18.128.2/32".parse().unwrap());
        peers.remove(&key(3));
        let c = diff(&pk, 51820, &peers, &actual, &BTreeMap::new());
        assert_eq!(c.upserts.len(), 1);
        assert_eq!(c.upserts[0].key, key(2));
        assert_eq!(c.upserts[0].endpoint, None);
        assert_eq!(c.removals, vec![key(3)]);
    }

    #[test]
    fn a_roamed_endpoint_is_left_alone_unless_the_plan_moved() {
        let pk = PrivateKey::generate();
        let peers = BTreeMap::from([(key(1), peer("198.18.1.1:51820", &["198.19.1.0/24"], None))]);
        let mut actual = actual_of(&pk, &peers);
        actual.peers.get_mut(&key(1)).unwrap().endpoint =
            Some("203.0.113.9:40000".parse().unwrap());
        let applied = BTreeMap::from([(key(1), "198.18.1.1:51820".parse().unwrap())]);
        assert!(diff(&pk, 51820, &peers, &actual, &applied).is_empty());
        // A fresh meshd (nothing applied yet) sets what the plan says.
        let c = diff(&pk, 51820, &peers, &actual, &BTreeMap::new());
        assert_eq!(
            c.upserts[0].endpoint,
            Some("198.18.1.1:51820".parse().unwrap())
        );
    }

    /// A peer behind NAT has no planned endpoint: none is set, and the one
    /// WireGuard learnt from its handshakes stays.
    #[test]
    fn a_peer_behind_nat_keeps_the_endpoint_wireguard_learnt() {
        let pk = PrivateKey::generate();
        let mut peers =
            BTreeMap::from([(key(1), peer("198.18.1.1:51820", &["198.19.1.0/24"], None))]);
        peers.get_mut(&key(1)).unwrap().endpoint = None;
        let fresh = diff(&pk, 51820, &peers, &Actual::default(), &BTreeMap::new());
        assert_eq!(fresh.upserts[0].endpoint, None);
        let mut actual = actual_of(&pk, &peers);
        actual.peers.get_mut(&key(1)).unwrap().endpoint =
            Some("203.0.113.9:40000".parse().unwrap());
        assert!(diff(&pk, 51820, &peers, &actual, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn keepalive_off_is_sent_as_zero() {
        let pk = PrivateKey::generate();
        let peers = BTreeMap::from([(key(1), peer("198.18.1.1:51820", &["198.19.1.0/24"], None))]);
        let mut actual = actual_of(&pk, &peers);
        actual.peers.get_mut(&key(1)).unwrap().keepalive = Some(25);
        let c = diff(&pk, 51820, &peers, &actual, &BTreeMap::new());
        assert_eq!(c.upserts[0].keepalive, Some(0));
    }

    /// With `require`, a pair's first preshared key restarts its entry (no
    /// session made without the key carries on), keeping a roamed
    /// endpoint; a key replaced by another is set in place (sessions carry
    /// on), and so is any key without `require`.
    #[test]
    fn a_first_preshared_key_restarts_the_entry_and_a_new_one_is_set_in_place() {
        let pk = PrivateKey::generate();
        let mut peers = BTreeMap::from([(
            key(1),
            peer("198.18.1.1:51820", &["198.19.1.0/24"], Some(10)),
        )]);
        peers.get_mut(&key(1)).unwrap().endpoint = None;
        let mut actual = actual_of(&pk, &peers);
        actual.peers.get_mut(&key(1)).unwrap().endpoint =
            Some("203.0.113.9:40000".parse().unwrap());
        let first = PresharedKey::from_bytes([7; 32]);
        peers.get_mut(&key(1)).unwrap().preshared_key = Some(first.clone());
        // Without `require`, set in place like any key.
        let c = diff(&pk, 51820, &peers, &actual, &BTreeMap::new());
        assert!(!c.upserts[0].restart);
        assert_eq!(c.upserts[0].endpoint, None);
        peers.get_mut(&key(1)).unwrap().key_ends_sessions = true;
        let c = diff(&pk, 51820, &peers, &actual, &BTreeMap::new());
        assert_eq!(c.upserts.len(), 1);
        let u = &c.upserts[0];
        assert!(u.restart);
        assert_eq!(u.endpoint, Some("203.0.113.9:40000".parse().unwrap()));
        assert_eq!(u.allowed_ips.as_ref(), Some(&peers[&key(1)].allowed_ips));
        assert_eq!(u.keepalive, Some(10));
        assert_eq!(u.preshared_key, Some(Some(first.clone())));
        actual.peers.get_mut(&key(1)).unwrap().preshared_key = Some(first);
        assert!(diff(&pk, 51820, &peers, &actual, &BTreeMap::new()).is_empty());
        let next = PresharedKey::from_bytes([8; 32]);
        peers.get_mut(&key(1)).unwrap().preshared_key = Some(next.clone());
        let c = diff(&pk, 51820, &peers, &actual, &BTreeMap::new());
        assert!(!c.upserts[0].restart);
        assert_eq!(c.upserts[0].preshared_key, Some(Some(next)));
        assert_eq!(c.upserts[0].endpoint, None);
    }

    #[test]
    fn a_prefix_moving_to_a_relay_is_given_before_it_is_taken() {
        let pk = PrivateKey::generate();
        let before = BTreeMap::from([
            (key(1), peer("198.18.1.1:51820", &["198.19.9.0/24"], None)),
            (key(2), peer("198.18.1.2:51820", &["198.19.2.0/24"], None)),
        ]);
        let actual = actual_of(&pk, &before);
        // node 9's prefix moves from peer 1 (the lower key) to relay 2.
        let after = BTreeMap::from([
            (key(1), peer("198.18.1.1:51820", &[], None)),
            (
                key(2),
                peer(
                    "198.18.1.2:51820",
                    &["198.19.2.0/24", "198.19.9.0/24"],
                    None,
                ),
            ),
        ]);
        let c = diff(&pk, 51820, &after, &actual, &BTreeMap::new());
        let order: Vec<PublicKey> = c.upserts.iter().map(|u| u.key).collect();
        assert_eq!(order, vec![key(2), key(1)]);
    }
}
