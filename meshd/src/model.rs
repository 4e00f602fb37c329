//! The planner's input and output: plain data, no Kubernetes or netlink
//! types, so the planner stays a pure function that is cheap to test.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use weft_keys::PublicKey;

use weft_ipam::BlockRecord;

use crate::annotations::{Claim, Rejection};
use crate::peers::{ExternalPeer, PeerError, PeerVerdict};

/// What the planner needs to know about one Node object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `metadata.uid` (set by the API server): what a key proof is bound to
    /// besides the name, so a proof dies with its Node object.
    pub uid: String,
    /// `metadata.creationTimestamp` in Unix seconds (set by the API server,
    /// so trusted); the older node wins a conflicting claim.
    pub created: i64,
    /// `status.addresses[type=InternalIP]`.
    pub internal_ips: Vec<IpAddr>,
    /// `status.addresses[type=ExternalIP]`: where the node is reached from
    /// outside its own network (a cloud's public address).
    pub external_ips: Vec<IpAddr>,
    /// `spec.podCIDRs`, set by the control plane, not by the node.
    pub spec_pod_cidrs: Vec<IpNet>,
    /// The node's `weft.dev/` annotations, as published: untrusted.
    pub annotations: BTreeMap<String, String>,
    /// Where the node is and whether it may relay, from its labels.
    pub placement: Placement,
}

/// A node's place in the cluster, from its labels: what link costs and
/// relay choice are computed from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// `topology.kubernetes.io/region`.
    pub region: Option<String>,
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// False when an admin labelled the node
    /// `node-restriction.kubernetes.io/weft-relay=false` (a prefix a
    /// kubelet cannot set or remove, so a compromised node cannot undo it).
    pub may_relay: bool,
}

impl Placement {
    /// A node in no region or zone that may relay.
    pub fn anywhere() -> Self {
        Self {
            may_relay: true,
            ..Self::default()
        }
    }
}

/// What a link costs by how far apart its ends are: both in the same zone
/// of the same region, else both in the same region, else anything else
/// (an unlabelled node is in no region). The same on every node (a cluster
/// setting), so every node chooses the same relays. Any positive costs
/// make a direct link cheaper than a path through a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkCosts {
    pub zone: u32,
    pub region: u32,
    pub other: u32,
}

impl Default for LinkCosts {
    fn default() -> Self {
        Self {
            zone: 1,
            region: 2,
            other: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkCostsError {
    #[error("--link-costs {0:?}: expected zone=N,region=N,other=N")]
    Syntax(String),
    #[error("--link-costs: {0} must be a whole number from 1 to 1000000")]
    Value(&'static str),
    #[error("--link-costs: expected zone <= region <= other (a nearer link never costs more)")]
    Order,
}

impl std::str::FromStr for LinkCosts {
    type Err = LinkCostsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut costs = Self::default();
        for part in s.split(',').map(str::trim) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| LinkCostsError::Syntax(s.chars().take(64).collect()))?;
            let field = match key.trim() {
                "zone" => ("zone", &mut costs.zone),
                "region" => ("region", &mut costs.region),
                "other" => ("other", &mut costs.other),
                _ => return Err(LinkCostsError::Syntax(s.chars().take(64).collect())),
            };
            *field.1 = value
                .trim()
                .parse()
                .ok()
                .filter(|v| (1..=1_000_000).contains(v))
                .ok_or(LinkCostsError::Value(field.0))?;
        }
        if !(costs.zone <= costs.region && costs.region <= costs.other) {
            return Err(LinkCostsError::Order);
        }
        Ok(costs)
    }
}

/// Whether traffic between two nodes without a working direct link may
/// go through a third node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Relay {
    /// Only direct links: a pair without one cannot talk.
    Never,
    /// Through the one intermediate node with the cheapest two links.
    #[default]
    OneHop,
}

/// How this node reaches another.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hop {
    Direct,
    /// Through this node, which forwards between its WireGuard peers.
    Via(String),
    /// No working path: its prefixes are unreachable here (fail closed).
    None,
}

/// Every Node in the cluster, in any order, and who holds which block by
/// the claims of nodes without `spec.podCIDRs`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSnapshot {
    pub nodes: Vec<NodeInfo>,
    pub blocks: BlockRecord,
    /// Keys an admin revoked: a node holding one is out, whatever else
    /// it claims.
    pub revoked: Arc<BTreeSet<PublicKey>>,
    /// When the snapshot was taken (Unix seconds): the time a scheduled
    /// key switch ([`crate::annotations::NextPublicKey::at`]) is judged at.
    pub now: u64,
    /// Every WeftPeer as read ([`crate::peers::parse`]), by name.
    pub peers: BTreeMap<String, Result<ExternalPeer, PeerError>>,
}

impl ClusterSnapshot {
    /// The pod ranges the control plane gave `node`: its `spec.podCIDRs`,
    /// else the blocks it holds by its block claim. A node's pod CIDR claim
    /// must lie within them.
    pub fn assigned(&self, node: &NodeInfo) -> Vec<IpNet> {
        self.all_assigned()
            .remove(node.name.as_str())
            .unwrap_or_default()
    }

    /// [`Self::assigned`] for every node. A claimed block that overlaps
    /// any node's `spec.podCIDRs` counts for nobody: what the control
    /// plane assigned is never taken through a claim.
    pub fn all_assigned(&self) -> HashMap<&str, Vec<IpNet>> {
        let spec: Vec<&IpNet> = self.nodes.iter().flat_map(|n| &n.spec_pod_cidrs).collect();
        let mut held: HashMap<&str, Vec<IpNet>> = HashMap::new();
        for (block, holder) in &self.blocks.blocks {
            if !spec.iter().any(|s| overlap(s, block)) {
                held.entry(holder.as_str()).or_default().push(*block);
            }
        }
        self.nodes
            .iter()
            .map(|n| {
                let assigned = if n.spec_pod_cidrs.is_empty() {
                    held.remove(n.name.as_str()).unwrap_or_default()
                } else {
                    n.spec_pod_cidrs.clone()
                };
                (n.name.as_str(), assigned)
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangesError {
    #[error("{flag} {cidr}: host bits set (did you mean {}?)", cidr.trunc())]
    HostBits { flag: &'static str, cidr: IpNet },
    #[error("{flag} {cidr}: give one IPv4 range and at most one IPv6 range")]
    Family { flag: &'static str, cidr: IpNet },
    #[error("{flag}: an IPv4 range is required")]
    NoIpv4 { flag: &'static str },
    #[error("{flag} {cidr} overlaps {other}: each range must be used for one thing only")]
    Overlap {
        flag: &'static str,
        cidr: IpNet,
        other: &'static str,
    },
}

/// A cluster-wide pair of ranges, one per family: IPv4 required, IPv6
/// optional. Every node is configured with the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranges {
    pub v4: Ipv4Net,
    pub v6: Option<Ipv6Net>,
}

impl Ranges {
    /// From a flag's values: exactly one IPv4 range, at most one IPv6
    /// range, no host bits. Errors name `flag`.
    pub fn from_flag(flag: &'static str, cidrs: &[IpNet]) -> Result<Self, RangesError> {
        let mut v4 = None;
        let mut v6 = None;
        for c in cidrs {
            if c.trunc() != *c {
                return Err(RangesError::HostBits { flag, cidr: *c });
            }
            match c {
                IpNet::V4(n) if v4.is_none() => v4 = Some(*n),
                IpNet::V6(n) if v6.is_none() => v6 = Some(*n),
                _ => return Err(RangesError::Family { flag, cidr: *c }),
            }
        }
        let v4 = v4.ok_or(RangesError::NoIpv4 { flag })?;
        Ok(Self { v4, v6 })
    }

    pub fn iter(&self) -> impl Iterator<Item = IpNet> {
        [Some(IpNet::V4(self.v4)), self.v6.map(IpNet::V6)]
            .into_iter()
            .flatten()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.contains(&a),
            IpAddr::V6(a) => self.v6.is_some_and(|r| r.contains(&a)),
        }
    }

    /// Whether `net` shares any address with one of the ranges.
    pub fn overlaps(&self, net: &IpNet) -> bool {
        self.iter().any(|r| overlap(&r, net))
    }

    /// The range of `net`'s family, if there is one.
    pub fn of_family(&self, net: &IpNet) -> Option<IpNet> {
        self.iter()
            .find(|r| r.addr().is_ipv4() == net.addr().is_ipv4())
    }

    /// The range of `net`'s family that holds all of `net`, if any.
    pub fn holding(&self, net: &IpNet) -> Option<IpNet> {
        self.iter().find(|r| r.contains(net))
    }
}

/// `--cluster-cidr`: the cluster's pod ranges (one IPv4, optionally one
/// IPv6), the same on every node; every node's pod ranges (and the blocks
/// nodes claim) lie inside them.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterCidrs {
    #[arg(
        long = "cluster-cidr",
        env = "WEFT_CLUSTER_CIDRS",
        value_delimiter = ','
    )]
    pub cluster_cidrs: Vec<IpNet>,
}

/// The overlay's own ranges, the same on every node: `--mesh-cidr`
/// (WireGuard interfaces) and `--peer-cidr` (external peers), one IPv4
/// and optionally one IPv6 each.
#[derive(Debug, Clone, clap::Args)]
pub struct MeshCidrs {
    #[arg(long = "mesh-cidr", env = "WEFT_MESH_CIDRS", value_delimiter = ',', default_value = DEFAULT_MESH_CIDRS)]
    pub mesh_cidrs: Vec<IpNet>,
    /// Where external peers' (`WeftPeer`) addresses lie; none: external
    /// peers are off (opt-in: a range taken here is refused everywhere
    /// else, which a network already using it would not survive).
    #[arg(long = "peer-cidr", env = "WEFT_PEER_CIDRS", value_delimiter = ',')]
    pub peer_cidrs: Vec<IpNet>,
}

/// `--mesh-cidr`'s default.
pub const DEFAULT_MESH_CIDRS: &str = "100.64.0.0/16,fd64:77:65::/64";

impl ClusterRanges {
    /// From the flags; errors name them.
    pub fn from_flags(cluster: &ClusterCidrs, mesh: &MeshCidrs) -> anyhow::Result<Self> {
        if cluster.cluster_cidrs.is_empty() {
            anyhow::bail!("--cluster-cidr is required: the cluster's pod ranges (one IPv4, optionally one IPv6), the same on every node; every node's pod ranges must lie inside them");
        }
        let ranges = ClusterRanges {
            pods: Ranges::from_flag("--cluster-cidr", &cluster.cluster_cidrs)?,
            mesh: Ranges::from_flag("--mesh-cidr", &mesh.mesh_cidrs)?,
            peers: match mesh.peer_cidrs.is_empty() {
                true => None,
                false => Some(Ranges::from_flag("--peer-cidr", &mesh.peer_cidrs)?),
            },
        };
        ranges.check_apart()?;
        Ok(ranges)
    }

    /// Pods, mesh and peers are three uses of an address: no range may
    /// share one with another.
    pub fn check_apart(&self) -> Result<(), RangesError> {
        let named: Vec<(&'static str, &Ranges)> = [
            ("--cluster-cidr", Some(&self.pods)),
            ("--mesh-cidr", Some(&self.mesh)),
            ("--peer-cidr", self.peers.as_ref()),
        ]
        .into_iter()
        .filter_map(|(flag, r)| Some((flag, r?)))
        .collect();
        for (i, (flag, a)) in named.iter().enumerate() {
            for (other, b) in &named[i + 1..] {
                if let Some(cidr) = a.iter().find(|n| b.overlaps(n)) {
                    return Err(RangesError::Overlap { flag, cidr, other });
                }
            }
        }
        Ok(())
    }

    /// Whether pods or the mesh have IPv6 (the node then forwards IPv6;
    /// a peer's IPv6 address alone reaches no pod).
    pub fn has_v6(&self) -> bool {
        self.pods.v6.is_some() || self.mesh.v6.is_some()
    }
}

/// The cluster's address plan, the same on every node: what pods and
/// WireGuard interfaces are numbered from. Every claim must lie inside it,
/// and all of it is unreachable unless a mesh route says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterRanges {
    /// `--cluster-cidr`: pod addresses.
    pub pods: Ranges,
    /// `--mesh-cidr`: WireGuard interface addresses.
    pub mesh: Ranges,
    /// `--peer-cidr`: external peers' addresses (`crate::peers`); `None`:
    /// external peers are off.
    pub peers: Option<Ranges>,
}

impl ClusterRanges {
    /// The lab's ranges, dual-stack: what the tests plan with.
    #[cfg(test)]
    pub(crate) fn lab() -> Self {
        let (v4, v6) = (
            |s: &str| s.parse().expect("a literal range"),
            |s: &str| s.parse().expect("a literal range"),
        );
        Self {
            pods: Ranges {
                v4: v4("198.19.0.0/16"),
                v6: Some(v6("fd98:19::/48")),
            },
            mesh: Ranges {
                v4: v4("198.18.128.0/17"),
                v6: Some(v6("fd98:18::/64")),
            },
            // What docs/install.md suggests, which the lab sets.
            peers: Some(Ranges {
                v4: v4("100.65.0.0/16"),
                v6: Some(v6("fd64:77:70::/64")),
            }),
        }
    }

    /// Every range, pods, mesh then peers.
    pub fn all(&self) -> impl Iterator<Item = IpNet> {
        self.pods
            .iter()
            .chain(self.mesh.iter())
            .chain(self.peers.into_iter().flat_map(|r| r.iter()))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.pods.contains(ip)
            || self.mesh.contains(ip)
            || self.peers.is_some_and(|r| r.contains(ip))
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
    pub ranges: ClusterRanges,
    /// Sent to every peer; `None` disables keepalives.
    pub persistent_keepalive: Option<u16>,
    /// The nodes this node cannot reach directly (see [`crate::liveness`]):
    /// published as its link state, and no direct link is used to them.
    pub unreachable: BTreeSet<String>,
    /// Cluster settings: every node must have the same.
    pub costs: LinkCosts,
    pub relay: Relay,
    /// Where other nodes' host addresses may lie for pods to reach them
    /// through the mesh (`--host-cidr`, else the subnets of this node's
    /// own addresses): a node's claim to an address outside them is not
    /// believed, so a compromised node cannot draw pods' traffic for an
    /// arbitrary address (an off-cluster database, say) to itself.
    pub host_networks: Vec<IpNet>,
    /// Where each peer's authenticated WireGuard packets come from (its
    /// endpoint as the data plane has it once a handshake completed), by
    /// node name: its address is the only host address of a node pods
    /// reach through the mesh, since no other node can make its own packets
    /// arrive from there without spoofing that address; for a peer behind
    /// NAT, it is what its NAT maps it to (published in
    /// [`crate::annotations::OBSERVED`]).
    pub heard_from: BTreeMap<String, SocketAddr>,
    /// What this node published as observed before it started, kept for
    /// peers not heard yet until a peer timeout has passed: a restarted
    /// meshd does not take its votes on NAT'd nodes away while its data
    /// plane (which outlived it) is heard from again, so they do not flip
    /// to public and back.
    pub observed_before: BTreeMap<String, SocketAddr>,
    /// The peers' candidate addresses this node gave up on (see
    /// [`crate::ladder`]): each is sent to at its best other one.
    pub given_up: crate::annotations::GivenUp,
    /// The address each peer answered at ([`crate::ladder`]): kept while
    /// the peer offers it.
    pub confirmed: BTreeMap<String, SocketAddr>,
    /// Every address this node's interfaces hold (read each pass with
    /// `WEFT_ENCRYPT_HOST`): those its peers do not believe send on the
    /// underlay (`planner::hosts::own_unbelieved`).
    pub own_addresses: Vec<IpAddr>,
}

impl LocalConfig {
    /// `node_name`'s defaults: no keepalives, no unreachable peers.
    pub fn new(node_name: &str, ranges: ClusterRanges) -> Self {
        Self {
            node_name: node_name.to_string(),
            ranges,
            persistent_keepalive: None,
            unreachable: BTreeSet::new(),
            costs: LinkCosts::default(),
            relay: Relay::default(),
            host_networks: Vec::new(),
            heard_from: BTreeMap::new(),
            observed_before: BTreeMap::new(),
            given_up: BTreeMap::new(),
            confirmed: BTreeMap::new(),
            own_addresses: Vec::new(),
        }
    }
}

/// What a WireGuard entry is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PeerKind {
    /// Another node of the mesh.
    #[default]
    Node,
    /// A WeftPeer this node is the gateway of: a stock WireGuard client,
    /// with no liveness, link state or post-quantum exchange of its own.
    External,
}

/// One WireGuard peer as it should be configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The Node this peer is ([`crate::peers::ExternalPeer::entry_name`]
    /// for an external one).
    pub node: String,
    pub kind: PeerKind,
    /// `None`: WireGuard learns it from the peer's handshakes (behind NAT).
    pub endpoint: Option<SocketAddr>,
    /// Every address it may be sent to, best first (`endpoint` is the best
    /// not given up).
    pub offers: Vec<SocketAddr>,
    /// Cryptokey routing: the only source addresses accepted from this peer.
    pub allowed_ips: BTreeSet<IpNet>,
    /// The node's own mesh addresses, where probes of it go (its allowed
    /// IPs may also hold those of nodes it relays).
    pub mesh_addresses: Vec<IpAddr>,
    pub persistent_keepalive: Option<u16>,
    /// The node's current key, when this entry is its next key (it is
    /// rotating): a device that can takes the old entry's sessions over
    /// until the new one has its own.
    pub replaces: Option<PublicKey>,
    /// The pair's post-quantum preshared key (`crate::pq::shape`); `None`:
    /// none (the all-zero key).
    pub preshared_key: Option<weft_keys::PresharedKey>,
    /// Giving the entry its first preshared key ends its sessions (with
    /// `WEFT_POST_QUANTUM=require`: none made without a key may carry on).
    pub key_ends_sessions: bool,
}

/// Where traffic for a prefix goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    /// Through the WireGuard interface.
    Mesh,
    /// Rejected with ICMP unreachable. Every cluster pod and mesh range has
    /// one (the backstops), installed before anything else and never
    /// removed, so that wherever no mesh route is more specific (interface
    /// gone, peer down, pending, rejected or deleted, meshd never synced)
    /// traffic is refused rather than leaking onto the default route in
    /// plaintext.
    Unreachable,
    /// To another node's host address, through the WireGuard interface,
    /// in a table only pods' traffic consults (see
    /// `reconcile::netlink::HOST_TABLE`): pods reach
    /// other nodes' kubelets and host-network services encrypted, and the
    /// replies (to pod addresses) come back the same way. The node's own
    /// traffic, WireGuard's datagrams among it, keeps the main table.
    HostMesh,
    /// To the host address of a node in the mesh that has no path: refused
    /// like its pods, not sent in plaintext.
    HostUnreachable,
}

impl RouteKind {
    /// Whether the route's destination is carried by a peer (in its
    /// allowed IPs), so the route goes with the peer.
    pub fn through_peer(self) -> bool {
        matches!(self, Self::Mesh | Self::HostMesh)
    }
}

/// A route the node should have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub dst: IpNet,
    pub kind: RouteKind,
}

/// The planner's judgement of one Node's annotations.
// Nearly every verdict is `Accepted`: boxing the claim would only add an
// allocation per node per decision.
#[allow(clippy::large_enum_variant)]
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
    /// How this node reaches each other accepted node, by name.
    pub paths: BTreeMap<String, Hop>,
    /// This node's own host addresses its peers do not believe: with
    /// `WEFT_ENCRYPT_HOST`, traffic from them stays on the underlay
    /// (`planner::hosts::own_unbelieved`).
    pub untunnelled: BTreeSet<IpAddr>,
    /// Every WeftPeer's verdict and gateway, by name.
    pub external: BTreeMap<String, PeerVerdict>,
}
