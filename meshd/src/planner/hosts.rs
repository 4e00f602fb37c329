//! Which host addresses of other nodes pods reach through the mesh.
//!
//! A node's host addresses (`status.addresses[InternalIP]`) are written by
//! its own kubelet, so they are claims like its annotations. One is
//! believed only if it is where the node's authenticated WireGuard packets
//! come from ([`LocalConfig::heard_from`]), lies in the host networks
//! ([`LocalConfig::host_networks`]) and outside the cluster's ranges, and
//! no other Node lists it: a compromised node can then neither draw pods'
//! traffic for an off-cluster address (an API server's, a database's) to
//! itself nor take another node's, short of spoofing that address on the
//! underlay. An address not believed is simply not tunnelled: pods'
//! traffic to it leaves as host traffic does, masqueraded.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::model::{LocalConfig, NodeInfo};

/// Each node's believed host addresses, by node name (nodes with none are
/// absent).
pub fn host_addresses<'a>(
    nodes: &'a [NodeInfo],
    local: &LocalConfig,
) -> HashMap<&'a str, Vec<IpAddr>> {
    let mut listed: HashMap<IpAddr, usize> = HashMap::new();
    for node in nodes {
        let mut own = node.internal_ips.clone();
        own.sort_unstable();
        own.dedup();
        for ip in own {
            *listed.entry(ip).or_default() += 1;
        }
    }
    let believed = |node: &NodeInfo, ip: &IpAddr| {
        local.heard_from.get(&node.name) == Some(ip)
            && listed.get(ip) == Some(&1)
            && !local.ranges.contains(*ip)
            && local.host_networks.iter().any(|n| n.contains(ip))
    };
    nodes
        .iter()
        .filter_map(|node| {
            let mut ips: Vec<IpAddr> = node
                .internal_ips
                .iter()
                .copied()
                .filter(|ip| believed(node, ip))
                .collect();
            ips.sort_unstable();
            ips.dedup();
            (!ips.is_empty()).then_some((node.name.as_str(), ips))
        })
        .collect()
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
            spec_pod_cidrs: Vec::new(),
            annotations: Default::default(),
            placement: Placement::anywhere(),
        }
    }

    #[test]
    fn believes_unique_addresses_in_the_host_networks_only() {
        let mut local = LocalConfig::new("node-1", ClusterRanges::lab());
        local.host_networks = vec!["10.0.0.0/16".parse().unwrap(), "fd00::/64".parse().unwrap()];
        let nodes = [
            node("node-1", &["10.0.0.1"]),
            node("node-2", &["10.0.0.2", "fd00::2", "10.0.0.2"]),
            // An off-cluster address outside the host networks.
            node("node-3", &["203.0.113.10", "10.0.0.3"]),
            // Another node's address, and one inside the pod range.
            node("node-4", &["10.0.0.2", "198.19.4.1"]),
            node("node-5", &[]),
            // Its own address, and an unlisted one in the host networks (an
            // API server's, say) it is not heard from.
            node("node-6", &["10.0.0.6", "10.0.0.200"]),
            // Not heard from at all (no handshake yet).
            node("node-7", &["10.0.0.7"]),
        ];
        for (name, ip) in [
            ("node-1", "10.0.0.1"),
            ("node-2", "fd00::2"),
            ("node-3", "203.0.113.10"),
            ("node-4", "10.0.0.2"),
            ("node-6", "10.0.0.6"),
        ] {
            local.heard_from.insert(name.into(), ip.parse().unwrap());
        }
        let got = host_addresses(&nodes, &local);
        let ips = |s: &[&str]| -> Vec<IpAddr> { s.iter().map(|s| s.parse().unwrap()).collect() };
        let cases: [(&str, Option<Vec<IpAddr>>); 7] = [
            ("node-1", Some(ips(&["10.0.0.1"]))),
            // Heard from its IPv6 address; 10.0.0.2 is listed twice
            // (node-4 copies it): nobody's.
            ("node-2", Some(ips(&["fd00::2"]))),
            // Heard from where it says, but outside the host networks.
            ("node-3", None),
            ("node-4", None),
            ("node-5", None),
            ("node-6", Some(ips(&["10.0.0.6"]))),
            ("node-7", None),
        ];
        for (name, want) in cases {
            assert_eq!(got.get(name).cloned(), want, "{name}");
        }
    }

    #[test]
    fn no_host_networks_no_tunnelled_hosts() {
        let local = LocalConfig::new("node-1", ClusterRanges::lab());
        assert!(host_addresses(&[node("node-2", &["10.0.0.2"])], &local).is_empty());
    }
}
