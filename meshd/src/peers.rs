//! External peers: laptops, VMs and sites without Kubernetes that join the
//! mesh through a gateway node (`WeftPeer`, `weft.dev/v1alpha1`,
//! cluster-scoped; deploy/base/crd-weftpeers.yaml).
//!
//! Only admins write WeftPeers (no node's credentials may), but an object
//! is still read as untrusted: the spec is kept as written and parsed here,
//! so one bad object is rejected with an error naming its field and
//! breaks neither the watch nor any other peer. Every node reads every
//! object the same way and chooses the same gateway ([`gateway`]) from
//! data every node holds: the peer's addresses are routed to one node
//! everywhere, as a relay's prefixes are.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use weft_keys::PublicKey;

use crate::model::{ClusterRanges, NodeInfo, Ranges, Verdict};

/// The API's `WeftPeer`, cluster-scoped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WeftPeer {
    pub metadata: ObjectMeta,
    /// As written; see [`parse`].
    #[serde(default)]
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub status: Value,
}

pub const API_VERSION: &str = "weft.dev/v1alpha1";

impl k8s_openapi::Resource for WeftPeer {
    const API_VERSION: &'static str = API_VERSION;
    const GROUP: &'static str = "weft.dev";
    const KIND: &'static str = "WeftPeer";
    const VERSION: &'static str = "v1alpha1";
    const URL_PATH_SEGMENT: &'static str = "weftpeers";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::ListableResource for WeftPeer {
    const LIST_KIND: &'static str = "WeftPeerList";
}

impl k8s_openapi::Metadata for WeftPeer {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The spec as the API carries it (what `meshctl peer add` writes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerSpec {
    /// Its WireGuard public key (base64).
    pub public_key: String,
    /// Where gateways send to before it has sent anything (`ADDRESS:PORT`);
    /// absent: gateways wait for its handshake (a laptop behind NAT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Its addresses: one per family, from the peer ranges.
    pub addresses: Vec<String>,
    /// The cluster ranges it may reach (CIDRs); absent: the pod ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reach: Vec<String>,
    /// The nodes that may be its gateway, first choice first; absent:
    /// every node with a public endpoint, in an order of its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
}

/// A WeftPeer as every node reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalPeer {
    pub name: String,
    /// `metadata.creationTimestamp` (Unix seconds; set by the API server):
    /// the older of two objects keeps what both name.
    pub created: i64,
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    /// One per family at most, inside the peer ranges.
    pub addresses: Vec<IpAddr>,
    /// Inside the cluster's pod and peer ranges.
    pub reach: Vec<IpNet>,
    /// Preferred gateways, in order; empty: the default choice.
    pub gateways: Vec<String>,
}

impl ExternalPeer {
    /// Its addresses as host prefixes (what its gateway's entry allows).
    pub fn prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.addresses.iter().map(|a| IpNet::from(*a))
    }

    /// The identity its WireGuard entry carries in a plan
    /// ([`crate::model::Peer::node`]): no Node name holds a `/`.
    pub fn entry_name(name: &str) -> String {
        format!("{ENTRY_PREFIX}{name}")
    }
}

/// What [`ExternalPeer::entry_name`] starts with.
const ENTRY_PREFIX: &str = "weftpeer/";

/// Why a WeftPeer is not in the mesh. Every message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("spec: {0}")]
    Spec(String),
    #[error("spec.publicKey: {0}")]
    Key(String),
    #[error("spec.endpoint {0:?}: expected ADDRESS:PORT")]
    Endpoint(String),
    #[error("spec.endpoint {0}: not an address a gateway may send to (loopback, unspecified, link-local, multicast, broadcast or inside a cluster range)")]
    EndpointAddress(SocketAddr),
    #[error("spec.addresses: expected one or two addresses (at most one per family)")]
    AddressCount,
    #[error("spec.addresses {0:?}: not an IP address")]
    Address(String),
    #[error("spec.addresses {0}: outside the peer ranges (WEFT_PEER_CIDRS {1})")]
    AddressOutside(IpAddr, String),
    #[error(
        "spec.addresses: this cluster has no peer ranges (WEFT_PEER_CIDRS): external peers are off"
    )]
    Off,
    #[error("spec.reach {0:?}: expected a CIDR inside the cluster's pod or peer ranges")]
    Reach(String),
    #[error("spec.gateways {0:?}: not a node name")]
    Gateway(String),
    #[error("spec.{field}: {value} is {other}'s")]
    Conflict {
        field: &'static str,
        value: String,
        other: String,
    },
    #[error("spec.publicKey is revoked")]
    Revoked,
}

/// Reads `object` against the cluster's ranges.
pub fn parse(object: &WeftPeer, ranges: &ClusterRanges) -> Result<ExternalPeer, PeerError> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let spec: PeerSpec =
        serde_json::from_value(object.spec.clone()).map_err(|e| PeerError::Spec(e.to_string()))?;
    let public_key: PublicKey = spec
        .public_key
        .trim()
        .parse()
        .map_err(|e: weft_keys::KeyParseError| PeerError::Key(e.to_string()))?;
    let endpoint = spec
        .endpoint
        .as_deref()
        .map(|e| {
            let at: SocketAddr = e
                .trim()
                .parse()
                .map_err(|_| PeerError::Endpoint(e.chars().take(64).collect()))?;
            let ip = at.ip().to_canonical();
            let link_local = match ip {
                IpAddr::V4(a) => a.is_link_local() || a.is_broadcast(),
                IpAddr::V6(a) => a.is_unicast_link_local(),
            };
            if ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || link_local
                || ranges.contains(ip)
                || at.port() == 0
            {
                return Err(PeerError::EndpointAddress(at));
            }
            Ok(at)
        })
        .transpose()?;
    let addresses = spec
        .addresses
        .iter()
        .map(|a| {
            let ip: IpAddr = a
                .trim()
                .parse()
                .map_err(|_| PeerError::Address(a.chars().take(64).collect()))?;
            let peers = ranges.peers.as_ref().ok_or(PeerError::Off)?;
            if !peers.contains(ip) {
                let within: Vec<String> = peers.iter().map(|r| r.to_string()).collect();
                return Err(PeerError::AddressOutside(ip, within.join(",")));
            }
            Ok(ip)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let families: BTreeSet<bool> = addresses.iter().map(IpAddr::is_ipv4).collect();
    if addresses.is_empty() || families.len() != addresses.len() {
        return Err(PeerError::AddressCount);
    }
    let reach = match spec.reach.is_empty() {
        true => ranges.pods.iter().collect(),
        false => spec
            .reach
            .iter()
            .map(|r| {
                r.trim()
                    .parse::<IpNet>()
                    .ok()
                    .filter(|n| n.trunc() == *n)
                    .filter(|n| {
                        ranges.pods.holding(n).is_some()
                            || ranges.peers.is_some_and(|p| p.holding(n).is_some())
                    })
                    .ok_or_else(|| PeerError::Reach(r.chars().take(64).collect()))
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let gateways = spec
        .gateways
        .iter()
        .map(|g| match is_node_name(g) {
            true => Ok(g.clone()),
            false => Err(PeerError::Gateway(g.chars().take(64).collect())),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ExternalPeer {
        name,
        created: object
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
        public_key,
        endpoint,
        addresses,
        reach,
        gateways,
    })
}

/// A DNS subdomain, as Node names are.
fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// What a node decided about one WeftPeer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerVerdict {
    /// In the mesh through `gateway`; `None`: no candidate is up (its
    /// addresses are unreachable everywhere).
    Accepted {
        peer: ExternalPeer,
        gateway: Option<String>,
    },
    Rejected(PeerError),
}

/// Judges every WeftPeer (parsed) against each other, the nodes' keys and
/// the revoked keys, and chooses each accepted one's gateway. The same on
/// every node: a key or an address two WeftPeers hold stays with the
/// older object (the API server's `creationTimestamp`, then the name), so
/// a later object — a copy-paste, two admins adding at once — takes nothing
/// from a peer in use; a node's key is never a peer's.
pub fn judge(
    parsed: &BTreeMap<String, Result<ExternalPeer, PeerError>>,
    nodes: &[NodeInfo],
    verdicts: &BTreeMap<String, Verdict>,
    revoked: &BTreeSet<PublicKey>,
) -> BTreeMap<String, PeerVerdict> {
    // Every plan judges: a cluster without peers pays nothing per node.
    if parsed.is_empty() {
        return BTreeMap::new();
    }
    // A rotating node's next key is its too.
    let node_keys: BTreeMap<PublicKey, &str> = crate::planner::accepted(verdicts)
        .into_iter()
        .flat_map(|(name, c)| {
            let next = c.next_key.as_ref().map(|n| (n.key, name));
            std::iter::once((c.public_key, name)).chain(next)
        })
        .collect();
    let mut holders: BTreeMap<(&'static str, String), Vec<(i64, &str)>> = BTreeMap::new();
    for (name, peer) in parsed {
        let Ok(peer) = peer else { continue };
        holders
            .entry(("publicKey", peer.public_key.to_string()))
            .or_default()
            .push((peer.created, name));
        for a in &peer.addresses {
            holders
                .entry(("addresses", a.to_string()))
                .or_default()
                .push((peer.created, name));
        }
    }
    parsed
        .iter()
        .map(|(name, peer)| {
            let verdict = match peer {
                Err(e) => PeerVerdict::Rejected(e.clone()),
                Ok(peer) => match refusal(name, peer, &holders, &node_keys, revoked) {
                    Some(e) => PeerVerdict::Rejected(e),
                    None => PeerVerdict::Accepted {
                        gateway: gateway(peer, nodes, verdicts).map(str::to_string),
                        peer: peer.clone(),
                    },
                },
            };
            (name.clone(), verdict)
        })
        .collect()
}

fn refusal(
    name: &str,
    peer: &ExternalPeer,
    holders: &BTreeMap<(&'static str, String), Vec<(i64, &str)>>,
    node_keys: &BTreeMap<PublicKey, &str>,
    revoked: &BTreeSet<PublicKey>,
) -> Option<PeerError> {
    if revoked.contains(&peer.public_key) {
        return Some(PeerError::Revoked);
    }
    if let Some(node) = node_keys.get(&peer.public_key) {
        return Some(PeerError::Conflict {
            field: "publicKey",
            value: peer.public_key.to_string(),
            other: format!("Node {node}"),
        });
    }
    let own = std::iter::once(("publicKey", peer.public_key.to_string()))
        .chain(peer.addresses.iter().map(|a| ("addresses", a.to_string())));
    own.into_iter().find_map(|(field, value)| {
        let (_, first) = holders.get(&(field, value.clone()))?.iter().min()?;
        (*first != name).then(|| PeerError::Conflict {
            field,
            value,
            other: format!("WeftPeer {first} (older)"),
        })
    })
}

/// `peer`'s gateway: the first of its candidates that is accepted, may
/// relay, and is not cut off — more than half of the other accepted nodes
/// report it unreachable (a node's report takes away only its own links,
/// so one compromised node cannot move a peer off a working gateway in a
/// cluster of three or more). Candidates: `spec.gateways` in order, else
/// every accepted node with an endpoint of its own (not behind NAT) in an
/// order fixed per peer (a hash of the two names), so peers spread over
/// the gateways and each fails over to the same next one everywhere.
pub fn gateway<'a>(
    peer: &ExternalPeer,
    nodes: &'a [NodeInfo],
    verdicts: &BTreeMap<String, Verdict>,
) -> Option<&'a str> {
    let accepted = crate::planner::accepted(verdicts);
    let may_relay: BTreeMap<&str, bool> = nodes
        .iter()
        .map(|n| (n.name.as_str(), n.placement.may_relay))
        .collect();
    let others = accepted.len().saturating_sub(1);
    let up = |name: &str| {
        accepted.contains_key(name)
            && may_relay.get(name).copied().unwrap_or(false)
            && 2 * accepted
                .iter()
                .filter(|(n, c)| **n != name && c.unreachable.contains(name))
                .count()
                <= others
    };
    let named = |name: &str| {
        nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.name.as_str())
    };
    if !peer.gateways.is_empty() {
        return peer.gateways.iter().find(|g| up(g)).and_then(|g| named(g));
    }
    let mut public: Vec<(u64, &str)> = accepted
        .iter()
        .filter(|(_, c)| c.endpoint.is_some() && c.nat.is_none())
        .map(|(name, _)| (crate::planner::fnv1a(&[&peer.name, name]), *name))
        .collect();
    public.sort();
    public
        .into_iter()
        .map(|(_, name)| name)
        .find(|name| up(name))
        .and_then(named)
}

/// The nftables table that holds external peers to what they may reach.
pub const FILTER_TABLE: &str = "weft_peers";

/// The accepted peers whose gateway is `me`.
pub fn served<'a>(external: &'a BTreeMap<String, PeerVerdict>, me: &str) -> Vec<&'a ExternalPeer> {
    external
        .values()
        .filter_map(|v| match v {
            PeerVerdict::Accepted {
                peer,
                gateway: Some(g),
            } if g == me => Some(peer),
            _ => None,
        })
        .collect()
}

/// The table every node keeps, replacing any earlier one. On every node,
/// nothing from the peer ranges reaches the node itself unless it answers
/// the node's own connection: a peer's `reach` holds pod addresses, and
/// each node's pod-block gateway address is one of them. On the gateway
/// of the peers `served`, a packet from a peer's address is forwarded
/// only to its `spec.reach` or as an answer to a connection the cluster
/// made. What other nodes forward from a peer has passed its gateway.
pub fn filter(served: &[&ExternalPeer], peer_ranges: Option<&Ranges>) -> Value {
    use serde_json::json;
    let table = json!({"family": "inet", "name": FILTER_TABLE});
    let mut commands = vec![
        json!({"add": {"table": table}}),
        json!({"delete": {"table": table}}),
        json!({"add": {"table": table}}),
    ];
    let rule = |chain: &str, comment: &str, expr: Value| {
        json!({"add": {"rule": {
            "family": "inet", "table": FILTER_TABLE, "chain": chain, "comment": comment, "expr": expr
        }}})
    };
    let saddr = |address: IpNet| {
        let protocol = if address.addr().is_ipv4() {
            "ip"
        } else {
            "ip6"
        };
        json!({"match": {"op": "==", "left": {"payload": {"protocol": protocol, "field": "saddr"}}, "right": prefix(&address)}})
    };
    for hook in ["forward", "input"] {
        commands.push(json!({"add": {"chain": {
            "family": "inet", "table": FILTER_TABLE, "name": hook,
            "type": "filter", "hook": hook, "prio": -10, "policy": "accept"
        }}}));
        commands.push(rule(
            hook,
            "answers to the cluster's own connections",
            json!([
                {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}},
                {"accept": null}
            ]),
        ));
    }
    for range in peer_ranges.iter().flat_map(|r| r.iter()) {
        commands.push(rule(
            "input",
            "a peer reaches no node itself",
            json!([saddr(range), {"counter": null}, {"drop": null}]),
        ));
    }
    for peer in served {
        // Bounded: nft keeps a rule's comment in 256 bytes.
        let comment: String = format!("WeftPeer {}", peer.name)
            .chars()
            .take(128)
            .collect();
        for address in peer.prefixes() {
            let protocol = if address.addr().is_ipv4() {
                "ip"
            } else {
                "ip6"
            };
            let reach: Vec<Value> = IpNet::aggregate(
                &peer
                    .reach
                    .iter()
                    .filter(|n| n.addr().is_ipv4() == address.addr().is_ipv4())
                    .copied()
                    .collect(),
            )
            .iter()
            .map(prefix)
            .collect();
            if !reach.is_empty() {
                commands.push(rule(
                    "forward",
                    &comment,
                    json!([
                        saddr(address),
                        {"match": {"op": "==", "left": {"payload": {"protocol": protocol, "field": "daddr"}}, "right": {"set": reach}}},
                        {"accept": null}
                    ]),
                ));
            }
            commands.push(rule(
                "forward",
                &comment,
                json!([saddr(address), {"counter": null}, {"drop": null}]),
            ));
        }
    }
    json!({"nftables": commands})
}

fn prefix(net: &IpNet) -> Value {
    serde_json::json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}})
}

#[cfg(test)]
mod tests;
