//! What the compiler needs to know about pods and namespaces: plain data,
//! built from the API objects (or from a conformance case file).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use serde::{Deserialize, Serialize};

/// A transport protocol NetworkPolicy can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The API's spelling (`TCP`, `UDP`, `SCTP`); absent means TCP.
    pub fn parse(name: Option<&str>) -> Result<Self, UnknownProtocol> {
        match name.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(UnknownProtocol(other.chars().take(32).collect())),
        }
    }
}

/// A protocol NetworkPolicy does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol {0:?} is not TCP, UDP or SCTP")]
pub struct UnknownProtocol(pub String);

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// Whose word a pod's namespace and labels are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Identity {
    /// The API's: someone allowed to create pods in its namespace wrote
    /// its spec, and its node cannot change its labels.
    #[default]
    Api,
    /// Its node's alone: a mirror pod (a static pod's), which a kubelet
    /// may create in any namespace with any labels. Policy applies to it,
    /// but no policy's peers pick it: a compromised node must not borrow
    /// another namespace's identity, and with it that namespace's allows.
    Node,
}

/// The annotation a kubelet puts on the mirror pods it creates.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// A pod as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<NamedPort>,
    #[serde(default)]
    pub identity: Identity,
}

impl PodInfo {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The port number `name` resolves to on this pod for `protocol`.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }

    /// From a Pod object. A pod has addresses here only while they are its
    /// own: not before they are assigned, not once it finished (Succeeded or
    /// Failed: its addresses are released and may already be another
    /// pod's), and never for a hostNetwork pod (its addresses are the
    /// node's). So only such pods are policy peers or programmed.
    pub fn from_pod(pod: &Pod) -> Self {
        Self::from_pod_attached(pod, None)
    }

    /// As [`PodInfo::from_pod`], with the addresses this node's CNI plugin
    /// recorded for the pod when it attached it, used until
    /// `status.podIPs` reports them: a local pod is programmed from the
    /// moment it is attached, not an API round trip later.
    pub fn from_pod_attached(pod: &Pod, attached: Option<&[IpAddr]>) -> Self {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let ports = spec
            .map(|s| {
                s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .filter_map(|p| {
                        let name = p.name.clone()?;
                        let protocol = Protocol::parse(p.protocol.as_deref()).ok()?;
                        Some(NamedPort {
                            name,
                            port: u16::try_from(p.container_port).ok()?,
                            protocol,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let status = pod.status.as_ref();
        let finished = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let reported: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|i| i.ip.parse().ok()).collect())
            .unwrap_or_default();
        let ips = match (finished || host_network, reported.is_empty(), attached) {
            (true, _, _) => Vec::new(),
            (false, true, Some(attached)) => attached.to_vec(),
            (false, _, _) => reported,
        };
        let mirror = meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            ips,
            ports,
            identity: if mirror {
                Identity::Node
            } else {
                Identity::Api
            },
        }
    }
}

/// A Node as ClusterNetworkPolicy `nodes` peers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The IPs in its `status.addresses` (after [`NodeInfo::believed`]:
    /// those it is believed to hold).
    pub addresses: Vec<IpAddr>,
    /// Those it lists but is not believed to hold: an Accept or Pass does
    /// not count them, a Deny does.
    pub doubtful: Vec<IpAddr>,
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> Self {
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            addresses: node
                .status
                .iter()
                .flat_map(|s| s.addresses.iter().flatten())
                .filter_map(|a| a.address.parse().ok())
                .collect(),
            doubtful: Vec::new(),
        }
    }

    /// The Nodes as `nodes` peers may see them. A Node's kubelet writes its
    /// addresses, so a compromised node may list anyone's: an address
    /// inside a node's pod CIDRs (a pod's) is nobody's node address, and
    /// one another Node lists too, or outside the nodes' networks
    /// (`host_networks`: a metadata service, an outside host), is doubtful
    /// — such a node can bring no pod, other node or outside address into
    /// an Accept written for its own labels, nor take another node's
    /// address out of a Deny.
    pub fn believed(
        nodes: &[NodeInfo],
        cidrs: &NodePodCidrs,
        host_networks: &[IpNet],
    ) -> Vec<NodeInfo> {
        // By how many Nodes (a node may list one address twice: an
        // InternalIP that is its ExternalIP too).
        let mut listed: HashMap<IpAddr, usize> = HashMap::new();
        for node in nodes {
            for ip in node.addresses.iter().collect::<BTreeSet<_>>() {
                *listed.entry(*ip).or_default() += 1;
            }
        }
        let in_pods = |ip: &&IpAddr| cidrs.values().flatten().any(|net| net.contains(*ip));
        let believed = |ip: &&IpAddr| {
            listed.get(ip) == Some(&1) && host_networks.iter().any(|net| net.contains(*ip))
        };
        nodes
            .iter()
            .map(|n| {
                let (addresses, doubtful) = n
                    .addresses
                    .iter()
                    .filter(|ip| !in_pods(ip))
                    .partition(believed);
                NodeInfo {
                    addresses,
                    doubtful,
                    ..n.clone()
                }
            })
            .collect()
    }
}

/// The pod CIDRs each node may give its pods addresses from, by node name:
/// the mesh's accepted claims, and this node's own blocks.
pub type NodePodCidrs = BTreeMap<String, Vec<IpNet>>;

impl PodInfo {
    /// Keeps only the addresses inside the pod CIDRs of the pod's node
    /// (none for a node not in `cidrs`), and returns those it dropped. A
    /// node's kubelet writes its pods' `status.podIPs`: unbound, a
    /// compromised node could name another node's pod's address and lend
    /// it its own pods' labels, and with them their allows.
    pub fn bind_to_node(&mut self, cidrs: &NodePodCidrs) -> Vec<IpAddr> {
        let blocks = cidrs.get(&self.node).map_or(&[][..], Vec::as_slice);
        let (kept, dropped) = std::mem::take(&mut self.ips)
            .into_iter()
            .partition(|ip| blocks.iter().any(|b| b.contains(ip)));
        self.ips = kept;
        dropped
    }
}

/// A namespace as policy sees it: its labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl NamespaceInfo {
    pub fn from_namespace(ns: &Namespace) -> Self {
        Self {
            name: ns.metadata.name.clone().unwrap_or_default(),
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str, host_network: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "x", "name": "a"},
            "spec": {"nodeName": "n", "hostNetwork": host_network, "containers": []},
            "status": {"phase": phase, "podIPs": [{"ip": "198.19.1.5"}]},
        }))
        .unwrap()
    }

    #[test]
    fn attached_addresses_count_until_the_api_reports_them() {
        let attached: Vec<IpAddr> = vec!["198.19.1.9".parse().unwrap()];
        let mut p = pod("Pending", false);
        p.status.as_mut().unwrap().pod_ips = None;
        assert_eq!(
            PodInfo::from_pod_attached(&p, Some(&attached)).ips,
            attached
        );
        assert!(PodInfo::from_pod(&p).ips.is_empty());
        // The API's word wins once it has one; a finished pod has none.
        let reported = PodInfo::from_pod_attached(&pod("Running", false), Some(&attached));
        assert_eq!(reported.ips, vec!["198.19.1.5".parse::<IpAddr>().unwrap()]);
        assert!(
            PodInfo::from_pod_attached(&pod("Succeeded", false), Some(&attached))
                .ips
                .is_empty()
        );
    }

    #[test]
    fn a_pod_keeps_only_addresses_inside_its_nodes_pod_cidrs() {
        let cidrs: NodePodCidrs = BTreeMap::from([
            (
                "node-2".to_string(),
                vec![
                    "198.19.2.0/24".parse().unwrap(),
                    "fd98:19:0:2::/64".parse().unwrap(),
                ],
            ),
            ("node-3".to_string(), vec!["198.19.3.0/24".parse().unwrap()]),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let on = |node: &str, ips: &[&str]| PodInfo {
            namespace: "x".into(),
            name: "p".into(),
            node: node.into(),
            labels: BTreeMap::new(),
            ips: ips.iter().map(|i| ip(i)).collect(),
            ports: Vec::new(),
            identity: Identity::Api,
        };
        /// A node, the addresses reported, those kept, those dropped.
        type Case<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);
        let cases: [Case; 5] = [
            (
                "node-2",
                &["198.19.2.7", "fd98:19:0:2::7"],
                &["198.19.2.7", "fd98:19:0:2::7"],
                &[],
            ),
            // node-3 names node-2's pod's address: ignored.
            (
                "node-3",
                &["198.19.2.7", "198.19.3.9"],
                &["198.19.3.9"],
                &["198.19.2.7"],
            ),
            // A family node-3 has no block of.
            ("node-3", &["fd98:19:0:3::9"], &[], &["fd98:19:0:3::9"]),
            // A node the mesh has not accepted (or no node at all).
            ("node-9", &["198.19.9.1"], &[], &["198.19.9.1"]),
            ("", &["198.19.2.7"], &[], &["198.19.2.7"]),
        ];
        for (node, reported, kept, dropped) in cases {
            let mut pod = on(node, reported);
            let got = pod.bind_to_node(&cidrs);
            assert_eq!(
                pod.ips,
                kept.iter().map(|i| ip(i)).collect::<Vec<_>>(),
                "{node} {reported:?}"
            );
            assert_eq!(
                got,
                dropped.iter().map(|i| ip(i)).collect::<Vec<_>>(),
                "{node} {reported:?}"
            );
        }
    }

    #[test]
    fn only_running_pod_network_pods_have_addresses() {
        assert_eq!(PodInfo::from_pod(&pod("Running", false)).ips.len(), 1);
        for (phase, host) in [("Succeeded", false), ("Failed", false), ("Running", true)] {
            assert!(
                PodInfo::from_pod(&pod(phase, host)).ips.is_empty(),
                "{phase} hostNetwork={host}"
            );
        }
    }
}

#[cfg(test)]
mod believed_tests {
    use super::*;

    #[test]
    fn node_addresses_in_pod_cidrs_are_dropped_and_those_listed_twice_or_outside_doubtful() {
        let ips = |ips: &[&str]| ips.iter().map(|i| i.parse().unwrap()).collect();
        let node = |name: &str, own: &[&str], doubtful: &[&str]| NodeInfo {
            name: name.into(),
            labels: BTreeMap::new(),
            addresses: ips(own),
            doubtful: ips(doubtful),
        };
        let nodes = vec![
            node("a", &["10.0.0.1", "fd00::1"], &[]),
            // Lists its own address twice (InternalIP and ExternalIP).
            node("c", &["10.0.0.3", "10.0.0.3"], &[]),
            // Claims a's address, a pod's and the metadata service's.
            node(
                "b",
                &["10.0.0.2", "10.0.0.1", "198.19.1.7", "169.254.169.254"],
                &[],
            ),
        ];
        let cidrs = NodePodCidrs::from([("a".to_string(), vec!["198.19.1.0/24".parse().unwrap()])]);
        let hosts: Vec<IpNet> = vec!["10.0.0.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()];
        let believed = NodeInfo::believed(&nodes, &cidrs, &hosts);
        assert_eq!(believed[0], node("a", &["fd00::1"], &["10.0.0.1"]));
        assert_eq!(believed[1], node("c", &["10.0.0.3", "10.0.0.3"], &[]));
        assert_eq!(
            believed[2],
            node("b", &["10.0.0.2"], &["10.0.0.1", "169.254.169.254"])
        );
    }
}
