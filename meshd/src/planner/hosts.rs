//! Which host addresses of other nodes pods reach through the mesh.
//!
//! A node's host addresses (`status.addresses[InternalIP]`) are written by
//! its own kubelet, so they are claims like its annotations. One is
//! believed only if it is where the node's authenticated WireGuard packets
//! come from ([`LocalConfig::heard_from`]), lies in the host networks
//! ([`LocalConfig::host_networks`]) and outside the cluster's ranges, and
//! no other node listing it is heard from it too: a compromised node can
//! then neither draw pods' traffic for an off-cluster address (an API
//! server's, a database's) to itself nor take another node's, nor make
//! another node's address nobody's by listing it, short of spoofing that
//! address on the underlay. An address not believed is simply not
//! tunnelled: pods' traffic to it leaves as host traffic does, masqueraded.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use crate::model::{LocalConfig, NodeInfo};

/// Each node's believed host addresses, by node name (nodes with none are
/// absent).
pub fn host_addresses<'a>(
    nodes: &'a [NodeInfo],
    local: &LocalConfig,
) -> HashMap<&'a str, Vec<IpAddr>> {
    let heard = |node: &NodeInfo| local.heard_from.get(&node.name).map(SocketAddr::ip);
    let contenders = contenders(nodes, heard);
    nodes
        .iter()
        .filter_map(|node| {
            let mut ips: Vec<IpAddr> = node
                .internal_ips
                .iter()
                .copied()
                .filter(|ip| believable(*ip, heard(node), &contenders, local))
                .collect();
            ips.sort_unstable();
            ips.dedup();
            (!ips.is_empty()).then_some((node.name.as_str(), ips))
        })
        .collect()
}

/// How many Nodes list each address *and* are heard from it: a Node that
/// lists an address it is not heard from (a kubelet's claim, a copy of
/// another node's) takes nothing from the node that is.
fn contenders(
    nodes: &[NodeInfo],
    heard: impl Fn(&NodeInfo) -> Option<IpAddr>,
) -> HashMap<IpAddr, usize> {
    let mut count: HashMap<IpAddr, usize> = HashMap::new();
    for node in nodes {
        if let Some(ip) = heard(node).filter(|ip| node.internal_ips.contains(ip)) {
            *count.entry(ip).or_default() += 1;
        }
    }
    count
}

/// Whether a node's address `ip` is believed, given where its WireGuard
/// packets come from (`heard`): no other node is heard from it too (two
/// nodes heard from one address: one spoofs it on the underlay, and
/// neither gets it).
fn believable(
    ip: IpAddr,
    heard: Option<IpAddr>,
    contenders: &HashMap<IpAddr, usize>,
    local: &LocalConfig,
) -> bool {
    heard == Some(ip)
        && contenders.get(&ip) == Some(&1)
        && !local.ranges.contains(ip)
        && local.host_networks.iter().any(|n| n.contains(&ip))
}

/// This node's own addresses (its InternalIPs and every address its
/// interfaces hold, [`LocalConfig::own_addresses`]) that its peers do not
/// believe, judged as [`host_addresses`] judges on their side, where this
/// node is heard from its endpoint's address: a VIP, an ExternalIP, a
/// second NIC's, one outside the host networks. Through the mesh, traffic
/// from them would be dropped by the peers' cryptokey routing, so with
/// `WEFT_ENCRYPT_HOST` it takes the underlay ([`crate::host_traffic`]).
/// Its mesh and pod addresses are not host addresses.
pub fn own_unbelieved(
    nodes: &[NodeInfo],
    local: &LocalConfig,
    endpoint: Option<IpAddr>,
) -> Vec<IpAddr> {
    let heard = |node: &NodeInfo| {
        if node.name == local.node_name {
            endpoint
        } else {
            local.heard_from.get(&node.name).map(SocketAddr::ip)
        }
    };
    let contenders = contenders(nodes, heard);
    let mut out: Vec<IpAddr> = nodes
        .iter()
        .filter(|n| n.name == local.node_name)
        .flat_map(|n| n.internal_ips.iter().copied())
        .chain(local.own_addresses.iter().copied())
        .map(|ip| ip.to_canonical())
        .filter(|ip| !local.ranges.contains(*ip) && is_host_address(*ip))
        .filter(|ip| !believable(*ip, endpoint, &contenders, local))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// An address another host could send to: not loopback, link-local,
/// multicast or unspecified.
fn is_host_address(ip: IpAddr) -> bool {
    let local_only = match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.is_unicast_link_local(),
    };
    !(ip.is_loopback() || ip.is_multicast() || ip.is_unspecified() || local_only)
}

/// One peer as its data plane reports it, for [`heard_from`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub node: String,
    pub endpoint: Option<SocketAddr>,
    /// Bytes of authenticated packets received from it since meshd last
    /// wrote its endpoint (see [`Baselines`]).
    pub received_since_written: u64,
}

/// Where each peer's authenticated WireGuard packets come from, by node:
/// its endpoint, once an authenticated packet arrived after meshd last
/// wrote that endpoint. A data plane moves the endpoint to where each
/// authenticated packet comes from (roaming); before one arrives, the
/// endpoint it reports is the one written, which the peer's own annotation
/// chose.
pub fn heard_from(peers: impl IntoIterator<Item = Reported>) -> BTreeMap<String, SocketAddr> {
    peers
        .into_iter()
        .filter(|p| p.received_since_written > 0)
        .filter_map(|p| {
            let at = p.endpoint?;
            Some((p.node, SocketAddr::new(at.ip().to_canonical(), at.port())))
        })
        .collect()
}

/// Per peer this meshd never wrote the endpoint of, the received bytes when
/// it first read the peer: what [`Reported`] counts from for it.
#[derive(Debug)]
pub struct Baselines<K: Ord>(BTreeMap<K, u64>);

impl<K: Ord> Default for Baselines<K> {
    fn default() -> Self {
        Self(BTreeMap::new())
    }
}

impl<K: Ord + Clone> Baselines<K> {
    /// Bytes received from `key` since it was first read (`rx` now). When
    /// `inherited` at that first reading, it counts as heard already: the
    /// device this meshd adopted routes the peer's endpoint address to it,
    /// which only a meshd that had heard the peer there made it do.
    pub fn received_since(&mut self, key: &K, rx: u64, inherited: bool) -> u64 {
        let base =
            *self
                .0
                .entry(key.clone())
                .or_insert(if inherited { rx.saturating_sub(1) } else { rx });
        rx.saturating_sub(base)
    }

    /// Forgets peers no longer reported.
    pub fn retain(&mut self, keep: impl Fn(&K) -> bool) {
        self.0.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClusterRanges, Placement};

    fn node(name: &str, ips: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            uid: format!("uid-{name}"),
            created: 0,
            internal_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            external_ips: vec![],
            spec_pod_cidrs: Vec::new(),
            annotations: Default::default(),
            placement: Placement::anywhere(),
        }
    }

    /// What this node's peers would not believe of its own addresses, so
    /// that host traffic from them stays off the mesh: an address outside
    /// the host networks, one it is not heard from (not its endpoint's),
    /// one another node is heard from too, and any other address its
    /// interfaces hold; not loopback or link-local ones.
    #[test]
    fn own_addresses_peers_do_not_believe_stay_off_the_mesh() {
        let mut local = LocalConfig::new("node-1", ClusterRanges::lab());
        local.host_networks = vec!["10.0.0.0/16".parse().unwrap()];
        let ips = |s: &[&str]| -> Vec<IpAddr> { s.iter().map(|s| s.parse().unwrap()).collect() };
        let me = node("node-1", &["10.0.0.1", "10.0.0.9", "192.0.2.1"]);
        let endpoint = Some("10.0.0.1".parse().unwrap());
        let nodes = [me.clone(), node("node-2", &["10.0.0.2"])];
        assert_eq!(
            own_unbelieved(&nodes, &local, endpoint),
            ips(&["10.0.0.9", "192.0.2.1"])
        );
        assert_eq!(
            own_unbelieved(&nodes, &local, None),
            ips(&["10.0.0.1", "10.0.0.9", "192.0.2.1"]),
            "without an endpoint nobody is heard from this node"
        );
        // Another kubelet listing this node's address takes nothing; a node
        // heard from it too (spoofing) makes it nobody's.
        let copied = [me.clone(), node("node-2", &["10.0.0.2", "10.0.0.1"])];
        assert_eq!(
            own_unbelieved(&copied, &local, endpoint),
            ips(&["10.0.0.9", "192.0.2.1"])
        );
        local
            .heard_from
            .insert("node-2".into(), "10.0.0.1:51820".parse().unwrap());
        assert_eq!(
            own_unbelieved(&copied, &local, endpoint),
            ips(&["10.0.0.1", "10.0.0.9", "192.0.2.1"])
        );
        // Every address the interfaces hold counts: a VIP, say.
        local.heard_from.clear();
        local.own_addresses = ips(&["10.0.0.1", "10.0.0.100", "127.0.0.1", "fe80::1"]);
        assert_eq!(
            own_unbelieved(&nodes, &local, endpoint),
            ips(&["10.0.0.9", "10.0.0.100", "192.0.2.1"])
        );
    }

    #[test]
    fn believes_addresses_heard_from_one_node_in_the_host_networks_only() {
        let mut local = LocalConfig::new("node-1", ClusterRanges::lab());
        local.host_networks = vec!["10.0.0.0/16".parse().unwrap(), "fd00::/64".parse().unwrap()];
        let nodes = [
            node("node-1", &["10.0.0.1"]),
            node("node-2", &["10.0.0.2", "fd00::2", "10.0.0.2"]),
            // An off-cluster address outside the host networks.
            node("node-3", &["203.0.113.10", "10.0.0.3"]),
            // node-2's IPv4 address (which node-2 is not heard from), and
            // one inside the pod range.
            node("node-4", &["10.0.0.2", "198.19.4.1"]),
            node("node-5", &[]),
            // Its own address, and an unlisted one in the host networks (an
            // API server's, say) it is not heard from.
            node("node-6", &["10.0.0.6", "10.0.0.200"]),
            // Not heard from at all (no handshake yet).
            node("node-7", &["10.0.0.7"]),
            // Two nodes heard from one address (one spoofs it): neither's.
            node("node-8", &["10.0.0.8"]),
            node("node-9", &["10.0.0.8"]),
            // A kubelet listing node-6's address, not heard from there:
            // takes nothing from node-6 (no downgrade to plaintext).
            node("node-10", &["10.0.0.6", "10.0.0.10"]),
        ];
        for (name, ip) in [
            ("node-1", "10.0.0.1"),
            ("node-2", "fd00::2"),
            ("node-3", "203.0.113.10"),
            ("node-4", "10.0.0.2"),
            ("node-6", "10.0.0.6"),
            ("node-8", "10.0.0.8"),
            ("node-9", "10.0.0.8"),
            ("node-10", "10.0.0.10"),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            local
                .heard_from
                .insert(name.into(), SocketAddr::new(ip, 51820));
        }
        let got = host_addresses(&nodes, &local);
        let ips = |s: &[&str]| -> Vec<IpAddr> { s.iter().map(|s| s.parse().unwrap()).collect() };
        let cases: [(&str, Option<Vec<IpAddr>>); 10] = [
            ("node-1", Some(ips(&["10.0.0.1"]))),
            // Heard from its IPv6 address only.
            ("node-2", Some(ips(&["fd00::2"]))),
            // Heard from where it says, but outside the host networks.
            ("node-3", None),
            // Heard from 10.0.0.2, which node-2 is not.
            ("node-4", Some(ips(&["10.0.0.2"]))),
            ("node-5", None),
            ("node-6", Some(ips(&["10.0.0.6"]))),
            ("node-7", None),
            ("node-8", None),
            ("node-9", None),
            ("node-10", Some(ips(&["10.0.0.10"]))),
        ];
        for (name, want) in cases {
            assert_eq!(got.get(name).cloned(), want, "{name}");
        }
    }

    #[test]
    fn a_peer_is_heard_only_once_it_sent_after_its_endpoint_was_written() {
        let mut b = Baselines::default();
        // Adopted from a meshd before this one: heard if that one routed
        // the peer's endpoint to it, else from the next packet on.
        assert_eq!(b.received_since(&"b", 700, true), 1);
        assert_eq!(b.received_since(&"c", 700, false), 0);
        assert_eq!(b.received_since(&"c", 764, false), 64);
        assert_eq!(
            b.received_since(&"c", 800, true),
            100,
            "only the first reading decides"
        );
        let peer = |node: &str, endpoint: &str, since: u64| Reported {
            node: node.into(),
            endpoint: endpoint.parse().ok(),
            received_since_written: since,
        };
        let heard = heard_from([
            peer("sent", "10.0.0.2:51820", 32),
            // Its annotation moved the endpoint; nothing came since: a claim.
            peer("claimed", "10.0.0.200:51820", 0),
            peer("nat", "", 32),
            peer("mapped", "[::ffff:10.0.0.5]:40000", 32),
        ]);
        let want: BTreeMap<String, SocketAddr> =
            [("sent", "10.0.0.2:51820"), ("mapped", "10.0.0.5:40000")]
                .into_iter()
                .map(|(n, at)| (n.to_string(), at.parse().unwrap()))
                .collect();
        assert_eq!(heard, want);
    }

    #[test]
    fn no_host_networks_no_tunnelled_hosts() {
        let local = LocalConfig::new("node-1", ClusterRanges::lab());
        assert!(host_addresses(&[node("node-2", &["10.0.0.2"])], &local).is_empty());
    }
}
