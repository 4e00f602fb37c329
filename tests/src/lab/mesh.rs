//! The mesh as the data planes see it: each node's WireGuard peers with
//! handshake age and transfer counters, read over the UAPI socket (the same
//! numbers `wg show` prints) or netlink, and the wait for a converged mesh.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Result};
use serde::Serialize;
use wireguard_control::{Backend, Device, InterfaceName};

use super::netns;
use super::topology::NodePlan;

/// One peer of one node.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerReport {
    pub public_key: String,
    /// The Node this key belongs to (from the nodes' published keys).
    pub node: Option<String>,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the last handshake; `None`: never.
    pub latest_handshake_seconds_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// A fingerprint of the preshared key (the first 8 bytes of its
    /// BLAKE2s hash, hex), so that both ends can be compared without the
    /// key being shown; `None`: none (the all-zero key).
    pub preshared_key_fingerprint: Option<String>,
}

/// A node's device: its public key and peers, or `None` if it has none yet.
/// A userspace device answers on its UAPI socket (one directory for the
/// machine); a kernel link over netlink in the node's namespace.
pub fn read(node: &NodePlan) -> Option<(String, Vec<PeerReport>)> {
    let iface: InterfaceName = node.wg_interface.parse().ok()?;
    let device = Device::get(&iface, Backend::Userspace).ok().or_else(|| {
        netns::run_in(&node.netns, move || {
            Ok(Device::get(&iface, Backend::Kernel)?)
        })
        .ok()
    })?;
    let now = SystemTime::now();
    let peers = device
        .peers
        .iter()
        .map(|p| PeerReport {
            public_key: p.config.public_key.to_base64(),
            node: None,
            endpoint: p.config.endpoint.map(|e| e.to_string()),
            allowed_ips: p
                .config
                .allowed_ips
                .iter()
                .map(|a| format!("{}/{}", a.address, a.cidr))
                .collect(),
            latest_handshake_seconds_ago: p
                .stats
                .last_handshake_time
                .and_then(|t| now.duration_since(t).ok())
                .map(|d| d.as_secs()),
            rx_bytes: p.stats.rx_bytes,
            tx_bytes: p.stats.tx_bytes,
            preshared_key_fingerprint: p
                .config
                .preshared_key
                .as_ref()
                .filter(|k| k.0 != [0; 32])
                .map(|k| fingerprint(&k.0)),
        })
        .collect();
    Some((
        device.public_key.map(|k| k.to_base64()).unwrap_or_default(),
        peers,
    ))
}

fn fingerprint(key: &[u8; 32]) -> String {
    use blake2::Digest;
    blake2::Blake2s256::digest(key)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `node` is behind NAT (on a NAT'd site).
fn behind_nat(node: &NodePlan) -> bool {
    node.nat.is_nat()
}

/// Waits until every node in `nodes` has a completed handshake with every
/// other it can reach without NAT traversal (two nodes behind NAT meet only
/// once they learnt their NATs, or never); returns how long that took.
pub fn wait_converged(nodes: &[NodePlan], timeout: Duration) -> Result<Duration> {
    let timeout = super::scaled(timeout);
    let started = Instant::now();
    let natd = nodes.iter().filter(|n| behind_nat(n)).count();
    loop {
        let lagging: Vec<String> = nodes
            .iter()
            .filter(|n| {
                let handshaken = read(n).map_or(0, |(_, peers)| {
                    peers
                        .iter()
                        .filter(|p| p.latest_handshake_seconds_ago.is_some())
                        .count()
                });
                let unreachable = if behind_nat(n) { natd - 1 } else { 0 };
                handshaken < nodes.len() - 1 - unreachable
            })
            .map(|n| n.name.clone())
            .collect();
        if lagging.is_empty() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!(
                "the mesh did not converge within {timeout:?}: {} lack handshakes with every peer they can reach",
                lagging.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
