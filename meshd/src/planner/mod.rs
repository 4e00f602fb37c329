//! `plan(snapshot, local) -> DesiredNode`: the whole mesh as this node should
//! see it, computed from cluster data alone. Pure: no I/O, no clock, no
//! randomness; the reconcilers make it so.

mod hosts;
mod mesh_address;
pub mod nat;
mod own;
mod paths;
mod verdict;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use weft_keys::PublicKey;

use ipnet::IpNet;

pub use hosts::{heard_from, host_addresses, Baselines, Reported};
pub use mesh_address::{mesh_address_of, smallest_block};
pub use own::{
    own_claim, own_reachability, EndpointAddress, Listening, OwnError, OwnKeys, Reachability,
};
pub(crate) use paths::fnv1a;
pub use paths::{Links, Member};
pub use verdict::{judge, judge_pairwise, judge_parsed, parse_all, ParseMemo, Parsed};

use crate::annotations::Claim;
use crate::model::{
    ClusterRanges, ClusterSnapshot, DesiredNode, Hop, LocalConfig, Peer, PeerKind, Placement,
    Route, RouteKind, Verdict,
};
use crate::peers::{ExternalPeer, PeerVerdict};

/// The unreachable routes that keep every cluster pod and mesh address
/// from leaving the node in plaintext: one per range, below every mesh
/// route (longest prefix wins). meshd installs them before it does
/// anything else, and every plan keeps them.
pub fn backstops(ranges: &ClusterRanges) -> BTreeSet<Route> {
    ranges
        .all()
        .map(|dst| Route {
            dst,
            kind: RouteKind::Unreachable,
        })
        .collect()
}

/// The links between the accepted nodes of `verdicts`: down where either
/// end reports it, or where the pair is behind NATs it cannot meet through
/// ([`nat::relayed_pairs`]).
pub fn links<'a>(
    snapshot: &'a ClusterSnapshot,
    verdicts: &'a BTreeMap<String, Verdict>,
    local: &LocalConfig,
) -> Links<'a> {
    let accepted = accepted(verdicts);
    let sightings = nat::sightings(&accepted);
    let relayed = nat::relayed_pairs(&accepted, &sightings);
    // In the verdicts' order (by name), so the members come sorted.
    let placements: HashMap<&str, &Placement> = snapshot
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), &n.placement))
        .collect();
    let members = verdicts.iter().filter_map(|(name, verdict)| match verdict {
        Verdict::Accepted(claim) => Some(Member {
            name,
            placement: placements.get(name.as_str())?,
            unreachable: &claim.unreachable,
        }),
        _ => None,
    });
    Links::new(members, relayed, local.costs)
}

/// The accepted claims by node name.
pub(crate) fn accepted(verdicts: &BTreeMap<String, Verdict>) -> BTreeMap<&str, &Claim> {
    verdicts
        .iter()
        .filter_map(|(name, v)| match v {
            Verdict::Accepted(c) => Some((name.as_str(), c)),
            Verdict::Pending | Verdict::Rejected(_) => None,
        })
        .collect()
}

/// Plans this node's WireGuard peers, interface addresses and routes.
///
/// Every accepted node is a peer, so WireGuard keeps its session (or keeps
/// trying) whatever the path; its prefixes go on the peer the path names:
/// itself, a relay, or none (unreachable, fail closed). A relay's
/// prefixes are its own plus those of the nodes reached through it.
pub fn plan(snapshot: &ClusterSnapshot, local: &LocalConfig) -> DesiredNode {
    plan_judged(snapshot, local, judge(snapshot, &local.ranges))
}

/// [`plan`] with the verdicts already reached (from the same snapshot).
pub fn plan_judged(
    snapshot: &ClusterSnapshot,
    local: &LocalConfig,
    verdicts: BTreeMap<String, Verdict>,
) -> DesiredNode {
    let paths = links(snapshot, &verdicts, local).paths_from(&local.node_name, local.relay);
    // Built as vectors and collected once (in bulk, sorted): on a large
    // cluster, element-by-element tree inserts are most of a plan.
    let mut peers: Vec<(PublicKey, Peer)> = Vec::new();
    let mut slot: HashMap<&str, usize> = HashMap::new();
    // Every accepted claim lies inside the ranges (the parser checks), so
    // a node without a path, pending, rejected or deleted falls back to them.
    let mut routes: Vec<Route> = backstops(&local.ranges).into_iter().collect();
    let mut addresses = BTreeSet::new();
    let accepted = accepted(&verdicts);
    let sightings = nat::sightings(&accepted);
    let regions: HashMap<&str, &str> = snapshot
        .nodes
        .iter()
        .filter_map(|n| Some((n.name.as_str(), n.placement.region.as_deref()?)))
        .collect();
    let end = |name: &str| {
        accepted.get(name).map(|claim| nat::End {
            claim,
            seen: sightings.get(name),
            region: regions.get(name).copied(),
        })
    };
    let none = BTreeSet::new();
    let mine = end(&local.node_name);
    for (name, verdict) in &verdicts {
        match verdict {
            Verdict::Accepted(claim) if *name == local.node_name => {
                addresses.extend(claim.mesh_addresses.iter().map(|a| IpNet::from(*a)));
            }
            Verdict::Accepted(claim) => {
                slot.insert(name.as_str(), peers.len());
                let key = claim.key_at(snapshot.now);
                let peer = end(name);
                let given_up = local.given_up.get(name).unwrap_or(&none);
                let offers = peer.map_or_else(Vec::new, |p| nat::offers(mine, p));
                // An address that answers stays while it is offered, even
                // when a new one ranks above it (a peer's, or an observer's
                // claim, which may be a lie): trying that would risk the
                // traffic on it.
                let kept = local
                    .confirmed
                    .get(name.as_str())
                    .filter(|a| offers.contains(a))
                    .copied();
                peers.push((
                    key,
                    Peer {
                        node: name.clone(),
                        kind: PeerKind::Node,
                        endpoint: kept.or_else(|| {
                            peer.map_or(claim.endpoint, |p| {
                                nat::reach(mine, p, given_up).endpoint()
                            })
                        }),
                        offers,
                        allowed_ips: BTreeSet::new(),
                        mesh_addresses: claim.mesh_addresses.clone(),
                        persistent_keepalive: local.persistent_keepalive,
                        replaces: (key != claim.public_key).then_some(claim.public_key),
                        preshared_key: None,
                        key_ends_sessions: false,
                    },
                ));
            }
            Verdict::Pending | Verdict::Rejected(_) => {}
        }
    }
    let hosts = host_addresses(&snapshot.nodes, local);
    for (name, verdict) in &verdicts {
        let Verdict::Accepted(claim) = verdict else {
            continue;
        };
        if *name == local.node_name {
            continue;
        }
        let host_nets = hosts
            .get(name.as_str())
            .into_iter()
            .flatten()
            .map(|ip| IpNet::from(*ip));
        // A believed host address is refused, never sent on the underlay,
        // whenever its mesh route is not there: no path, or the WireGuard
        // interface gone (the kernel takes its routes with it) while no
        // meshd runs — as the cluster ranges' backstops do for pods.
        routes.extend(host_nets.clone().map(|dst| Route {
            dst,
            kind: RouteKind::HostUnreachable,
        }));
        let carrier = match paths.get(name) {
            Some(Hop::Direct) => Some(name.as_str()),
            Some(Hop::Via(relay)) => Some(relay.as_str()),
            Some(Hop::None) | None => None,
        };
        let Some(&i) = carrier.and_then(|c| slot.get(c)) else {
            continue;
        };
        peers[i].1.allowed_ips.extend(claim.prefixes());
        peers[i].1.allowed_ips.extend(host_nets.clone());
        routes.extend(claim.prefixes().map(|dst| Route {
            dst,
            kind: RouteKind::Mesh,
        }));
        routes.extend(host_nets.map(|dst| Route {
            dst,
            kind: RouteKind::HostMesh,
        }));
    }
    let external = crate::peers::judge(
        &snapshot.peers,
        &snapshot.nodes,
        &verdicts,
        &snapshot.revoked,
    );
    for verdict in external.values() {
        let PeerVerdict::Accepted {
            peer,
            gateway: Some(gateway),
        } = verdict
        else {
            continue;
        };
        routes.extend(peer.prefixes().map(|dst| Route {
            dst,
            kind: RouteKind::Mesh,
        }));
        if *gateway == local.node_name {
            peers.push((peer.public_key, gateway_entry(peer)));
            continue;
        }
        // Everywhere else, the peer's addresses go where its gateway's own
        // prefixes go; without a path to the gateway, the peer range's
        // backstop refuses them.
        let carrier = match paths.get(gateway) {
            Some(Hop::Direct) => Some(gateway.as_str()),
            Some(Hop::Via(relay)) => Some(relay.as_str()),
            Some(Hop::None) | None => None,
        };
        match carrier.and_then(|c| slot.get(c)) {
            Some(&i) => peers[i].1.allowed_ips.extend(peer.prefixes()),
            None => routes.retain(|r| !peer.prefixes().any(|p| p == r.dst)),
        }
    }
    let peers: BTreeMap<PublicKey, Peer> = peers.into_iter().collect();
    let routes: BTreeSet<Route> = routes.into_iter().collect();
    let endpoint = match verdicts.get(&local.node_name) {
        Some(Verdict::Accepted(claim)) => claim.endpoint.map(|e| e.ip()),
        _ => None,
    };
    let untunnelled = hosts::own_unbelieved(&snapshot.nodes, local, endpoint)
        .into_iter()
        .collect();
    DesiredNode {
        addresses,
        peers,
        routes,
        verdicts,
        paths,
        untunnelled,
        external,
    }
}

/// The gateway's entry for an external peer: its addresses only, sent to
/// where it says it is until its handshakes show where it really is; no
/// keepalives (a laptop may be away for days: it keeps its own NAT open).
fn gateway_entry(peer: &ExternalPeer) -> Peer {
    Peer {
        node: ExternalPeer::entry_name(&peer.name),
        kind: PeerKind::External,
        endpoint: peer.endpoint,
        offers: peer.endpoint.into_iter().collect(),
        allowed_ips: peer.prefixes().collect(),
        mesh_addresses: Vec::new(),
        persistent_keepalive: None,
        replaces: None,
        preshared_key: None,
        key_ends_sessions: false,
    }
}

/// What must go from `applied` (the node as last reconciled) whatever
/// else fails: peers whose Node is gone (not in `live`) or who hold a
/// revoked key (`key` is the entry's, `replaces` the key it moves from),
/// with the prefixes they carried and the routes to those. Nothing is
/// added or changed, so no input but the Node list and the revoked keys —
/// both read without judging anyone — can stop a removal (the backstops
/// stay, so what is removed falls back to unreachable).
pub fn prune(
    applied: &DesiredNode,
    live: &BTreeSet<&str>,
    revoked: &BTreeSet<PublicKey>,
) -> DesiredNode {
    let mut pruned = applied.clone();
    let gone = |key: &PublicKey, peer: &Peer| {
        !live.contains(peer.node.as_str())
            || revoked.contains(key)
            || peer.replaces.is_some_and(|old| revoked.contains(&old))
    };
    let removed: Vec<PublicKey> = applied
        .peers
        .iter()
        .filter(|(key, peer)| gone(key, peer))
        .map(|(key, _)| *key)
        .collect();
    for key in removed {
        if let Some(peer) = pruned.peers.remove(&key) {
            pruned
                .routes
                .retain(|r| !r.kind.through_peer() || !peer.allowed_ips.contains(&r.dst));
            pruned.paths.remove(&peer.node);
        }
    }
    pruned
}

#[cfg(test)]
mod tests;
