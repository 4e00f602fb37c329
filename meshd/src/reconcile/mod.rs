//! Makes the node look like the plan, changing only what differs: the
//! WireGuard device (peers, key, port), the interface (up, MTU, addresses)
//! and Weft's routes. A pass that finds nothing to change changes nothing.

pub mod netlink;
pub mod wireguard;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::SystemTime;

use anyhow::{anyhow, Context, Result};
use ipnet::IpNet;
use weft_keys::PublicKey;
use wireguard_control::Backend;

use crate::dataplane::{DataPlane, Ensured};
use crate::model::{DesiredNode, Route};
use crate::rotation::DeviceKeys;
use netlink::{set_diff, Netlink};

/// How long one read or write of the WireGuard device may take. The UAPI
/// socket and netlink both block; a data plane that does not answer must
/// fail this pass, not hang the agent.
const DEVICE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a blocking device call on the blocking pool, bounded by
/// [`DEVICE_TIMEOUT`]. (A call past it is abandoned; its thread ends when
/// the device answers or closes the socket.)
async fn device_call<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::time::timeout(DEVICE_TIMEOUT, tokio::task::spawn_blocking(f)).await {
        Ok(joined) => joined?,
        Err(_) => Err(anyhow!(
            "{what}: the WireGuard device did not answer within {DEVICE_TIMEOUT:?}"
        )),
    }
}

/// What one pass changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub created_device: bool,
    /// Peers configured in this pass that were not there before.
    pub new_peers: Vec<PublicKey>,
    /// Peers whose endpoint this pass wrote.
    pub endpoints_written: Vec<PublicKey>,
    pub wireguard: usize,
    pub link: usize,
    pub addresses: usize,
    pub routes: usize,
}

impl Outcome {
    pub fn total(&self) -> usize {
        self.wireguard + self.link + self.addresses + self.routes
    }
}

/// A peer as the data plane reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Whether the device routes the endpoint's own address to this peer
    /// (a host address a meshd before this one had heard it from).
    pub routes_its_endpoint: bool,
}

impl PeerStats {
    /// The last handshake in Unix seconds; 0 for never.
    pub fn handshake_secs(&self) -> u64 {
        self.last_handshake
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs())
    }
}

pub struct Reconciler {
    pub dataplane: DataPlane,
    netlink: Netlink,
    /// Endpoints last written per peer (see `wireguard::diff`).
    applied_endpoints: BTreeMap<PublicKey, SocketAddr>,
    /// Peers whose endpoints this pass wrote (their baselines are read once
    /// the pass's writes are done).
    written_now: Vec<PublicKey>,
    /// Per peer whose endpoint this reconciler wrote: its received bytes
    /// read right after the last write (see [`Reconciler::endpoint_baseline`]).
    endpoint_baselines: BTreeMap<PublicKey, u64>,
    /// The keys last given to a device that takes a previous key.
    applied_keys: Option<DeviceKeys>,
    /// Whether the device answers two keys while rotating (Weft's own);
    /// `None` until asked.
    overlap: Option<bool>,
}

impl Reconciler {
    pub fn new(dataplane: DataPlane, netlink: Netlink) -> Self {
        let overlap = (dataplane.backend() == Backend::Kernel).then_some(false);
        Self {
            dataplane,
            netlink,
            applied_endpoints: BTreeMap::new(),
            written_now: Vec::new(),
            endpoint_baselines: BTreeMap::new(),
            applied_keys: None,
            overlap,
        }
    }

    /// The received bytes of `key` read right after this reconciler last
    /// wrote its endpoint; `None` if it never did (the device may hold one a
    /// meshd before it wrote). Until the peer sends more than this, the
    /// endpoint the device reports is the one written — what the peer's
    /// annotation claimed; after, it is where that packet came from.
    pub fn endpoint_baseline(&self, key: &PublicKey) -> Option<u64> {
        self.endpoint_baselines.get(key).copied()
    }

    /// The node's netlink handle, for what else the agent asks the kernel.
    pub fn netlink(&self) -> &Netlink {
        &self.netlink
    }

    /// Whether the device can overlap two keys (see [`crate::rotation`]);
    /// `None` before the first pass asked it.
    pub fn overlap(&self) -> Option<bool> {
        self.overlap
    }

    /// Moves each rotating peer from its old entry to its next key's, the
    /// new entry taking the old one's sessions over (Weft's extension), so
    /// the traffic it sends on them is not dropped while the new entry
    /// handshakes. Returns how many moved.
    async fn succeed(
        &mut self,
        desired: &DesiredNode,
        actual: &wireguard::Actual,
    ) -> Result<usize> {
        let mut moved = 0;
        for (key, peer) in &desired.peers {
            let Some(old) = peer.replaces else { continue };
            if actual.peers.contains_key(key) || !actual.peers.contains_key(&old) {
                continue;
            }
            let allowed: Vec<IpNet> = peer.allowed_ips.iter().copied().collect();
            let request = weft_dataplane::uapi::render_successor(
                key,
                &old,
                peer.endpoint,
                peer.persistent_keepalive,
                &allowed,
            );
            let iface = self.dataplane.iface;
            let reply = device_call("moving a peer to its next key", move || {
                crate::dataplane::request(&iface, &request, DEVICE_TIMEOUT)
            })
            .await?;
            anyhow::ensure!(
                weft_dataplane::uapi::reply_errno(&reply) == Some(0),
                "moving {} to its next key: the device answered {reply:?}",
                peer.node
            );
            if let Some(e) = peer.endpoint {
                self.applied_endpoints.insert(*key, e);
                self.written_now.push(*key);
            }
            moved += 1;
        }
        Ok(moved)
    }

    /// Gives a userspace device its key and previous key in one request
    /// (Weft's extension): one step, so the old key's sessions carry on.
    /// A device that refuses the extension (wireguard-go) changed nothing
    /// and gets its key through the standard update instead.
    async fn set_keys(&mut self, keys: &DeviceKeys) -> Result<()> {
        let iface = self.dataplane.iface;
        let request = weft_dataplane::uapi::render_keys(&keys.private, keys.previous.as_ref());
        let reply = device_call("setting the device's keys", move || {
            crate::dataplane::request(&iface, &request, DEVICE_TIMEOUT)
        })
        .await?;
        let errno = weft_dataplane::uapi::reply_errno(&reply);
        self.overlap = Some(errno == Some(0));
        if errno == Some(0) {
            self.applied_keys = Some(keys.clone());
        }
        Ok(())
    }

    pub async fn reconcile(
        &mut self,
        desired: &DesiredNode,
        keys: &DeviceKeys,
        listen_port: u16,
        mtu: u32,
    ) -> Result<Outcome> {
        let mut outcome = Outcome::default();
        if self.dataplane.ensure().await? == Ensured::Created {
            outcome.created_device = true;
            self.applied_endpoints.clear();
            self.applied_keys = None;
        }
        let (iface, backend) = (self.dataplane.iface, self.dataplane.backend());
        let read = move || {
            device_call("reading the device", move || {
                wireguard::read(&iface, backend)
            })
        };
        let mut device = read().await?;
        let key_differs =
            !wireguard::holds(device.private_key.as_ref().map(|k| k.0), &keys.private);
        let userspace = backend == Backend::Userspace && self.overlap != Some(false);
        if userspace && (key_differs || self.applied_keys.as_ref() != Some(keys)) {
            self.set_keys(keys).await?;
            outcome.wireguard += usize::from(key_differs);
            device = read().await?;
        }
        let mut actual = wireguard::Actual::from_device(&device);
        if self.overlap == Some(true) {
            let moved = self.succeed(desired, &actual).await?;
            if moved > 0 {
                outcome.wireguard += moved;
                actual = wireguard::Actual::from_device(&read().await?);
            }
        }
        let changes = wireguard::diff(
            &keys.private,
            listen_port,
            &desired.peers,
            &actual,
            &self.applied_endpoints,
        );
        if !changes.is_empty() {
            let to_apply = changes.clone();
            device_call("configuring the device", move || {
                wireguard::apply(&iface, backend, &to_apply)
            })
            .await?;
            for c in &changes.upserts {
                if let Some(e) = c.endpoint {
                    self.applied_endpoints.insert(c.key, e);
                    self.written_now.push(c.key);
                }
            }
            self.applied_endpoints
                .retain(|k, _| desired.peers.contains_key(k));
            self.endpoint_baselines
                .retain(|k, _| desired.peers.contains_key(k));
            outcome.wireguard += changes.count();
            outcome.new_peers = changes
                .upserts
                .iter()
                .filter(|c| c.restart || !actual.peers.contains_key(&c.key))
                .map(|c| c.key)
                .collect();
        }

        if !self.written_now.is_empty() {
            // Read after every write of the pass: what the peers send from
            // here on is what shows where they are.
            let device = read().await?;
            for key in std::mem::take(&mut self.written_now) {
                let rx = device
                    .peers
                    .iter()
                    .find(|p| PublicKey::from_bytes(p.config.public_key.0) == key)
                    .map_or(0, |p| p.stats.rx_bytes);
                self.endpoint_baselines.insert(key, rx);
                outcome.endpoints_written.push(key);
            }
        }

        let name = iface.as_str_lossy().into_owned();
        let index = self
            .netlink
            .link_index(&name)
            .await?
            .with_context(|| format!("interface {name} is gone"))?;
        outcome.link = usize::from(self.netlink.ensure_link(index, mtu).await?);

        let present = self.netlink.addresses(index).await?;
        let actual: BTreeSet<IpNet> = present.iter().map(|(n, _)| *n).collect();
        let (add, del) = set_diff(&desired.addresses, &actual);
        for net in &add {
            self.netlink.add_address(index, *net).await?;
        }
        for (net, msg) in present {
            if del.contains(&net) {
                self.netlink.del_address(msg).await?;
            }
        }
        outcome.addresses = add.len() + del.len();

        let found = self.netlink.our_routes(Some(index)).await?;
        let actual: BTreeSet<Route> = found.iter().filter_map(|f| f.route).collect();
        let (add, del) = set_diff(&desired.routes, &actual);
        // Add first: a mesh route appears before its backstop could matter.
        for r in &add {
            self.netlink.add_route(r, index).await?;
        }
        let mut removed = 0;
        for f in found {
            if f.route.is_none_or(|r| del.contains(&r)) {
                self.netlink.del_route(f).await?;
                removed += 1;
            }
        }
        outcome.routes = add.len() + removed;
        Ok(outcome)
    }

    /// Per-peer counters from the data plane.
    pub async fn peer_stats(&self) -> Result<Vec<PeerStats>> {
        let (iface, backend) = (self.dataplane.iface, self.dataplane.backend());
        let device = device_call("reading peer statistics", move || {
            wireguard::read(&iface, backend)
        })
        .await?;
        Ok(device
            .peers
            .iter()
            .map(|p| PeerStats {
                key: PublicKey::from_bytes(p.config.public_key.0),
                endpoint: p.config.endpoint,
                last_handshake: p.stats.last_handshake_time,
                rx_bytes: p.stats.rx_bytes,
                tx_bytes: p.stats.tx_bytes,
                routes_its_endpoint: p.config.endpoint.is_some_and(|e| {
                    let host = IpNet::from(e.ip().to_canonical());
                    p.config
                        .allowed_ips
                        .iter()
                        .any(|a| IpNet::new(a.address, a.cidr).ok() == Some(host))
                }),
            })
            .collect())
    }
}
