//! The planner's input and output: plain data, no Kubernetes or netlink
//! types, so the planner stays a pure function that is cheap to test.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weft_keys::PublicKey;

use crate::annotations::{Claim, Rejection};

/// What the planner needs to know about one Node object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `metadata.creationTimestamp` in Unix seconds (set by the API server,
    /// so trusted); the older node wins a conflicting claim.
    pub created: i64,
    /// `status.addresses[type=InternalIP]`.
    pub internal_ips: Vec<IpAddr>,
    /// `spec.podCIDRs`, set by the control plane, not by the node.
    pub spec_pod_cidrs: Vec<IpNet>,
    /// The node's `weft.dev/` annotations, as published: untrusted.
    pub annotations: BTreeMap<String, String>,
}

/// Every Node in the cluster, in any order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSnapshot {
    pub nodes: Vec<NodeInfo>,
}

/// The cluster-wide ranges WireGuard interface addresses come from. Every
/// node must be configured with the same ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshRanges {
    pub v4: Ipv4Net,
    pub v6: Option<Ipv6Net>,
}

impl MeshRanges {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.contains(&a),
            IpAddr::V6(a) => self.v6.is_some_and(|r| r.contains(&a)),
        }
    }

    /// Whether `net` shares any address with a mesh range.
    pub fn overlaps(&self, net: &IpNet) -> bool {
        let v4 = IpNet::V4(self.v4);
        let v6 = self.v6.map(IpNet::V6);
        [Some(v4), v6]
            .into_iter()
            .flatten()
            .any(|r| overlap(&r, net))
    }
}

/// Whether two prefixes share any address.
pub fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// This node's own settings and observations (the planner's non-cluster input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfig {
    pub node_name: String,
    pub mesh: MeshRanges,
    /// Sent to every peer; `None` disables keepalives.
    pub persistent_keepalive: Option<u16>,
    /// Peers the data plane has not heard from recently: their routes become
    /// unreachable until they are heard again (fail closed).
    pub down_peers: BTreeSet<PublicKey>,
}

/// One WireGuard peer as it should be configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The Node this peer is.
    pub node: String,
    pub endpoint: SocketAddr,
    /// Cryptokey routing: the only source addresses accepted from this peer.
    pub allowed_ips: BTreeSet<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

/// Where traffic for a prefix goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// Through the WireGuard interface.
    Mesh,
    /// Rejected with ICMP unreachable. Every remote prefix has one at a
    /// higher metric than its mesh route, so that if the mesh route goes
    /// (interface gone, peer down or excluded) traffic is refused rather
    /// than leaking onto the default route in plaintext.
    Unreachable,
}

/// A route the node should have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub dst: IpNet,
    pub kind: RouteKind,
}

/// The planner's judgement of one Node's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A valid peer (or this node itself).
    Accepted(Claim),
    /// No Weft annotations yet (meshd has not started there).
    Pending,
    /// Excluded from the mesh.
    Rejected(Rejection),
}

/// Everything the node should look like, derived from one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredNode {
    /// Addresses for the WireGuard interface (this node's mesh addresses).
    pub addresses: BTreeSet<IpNet>,
    pub peers: BTreeMap<PublicKey, Peer>,
    pub routes: BTreeSet<Route>,
    /// Every node's verdict, this node's included, by node name.
    pub verdicts: BTreeMap<String, Verdict>,
}
