//! `plan(snapshot, local) -> DesiredNode`: the whole mesh as this node should
//! see it, computed from cluster data alone. Pure: no I/O, no clock, no
//! randomness; the reconcilers make it so.

mod mesh_address;
mod own;
mod verdict;

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

pub use mesh_address::choose_mesh_address;
pub use own::{own_claim, own_endpoint, OwnError};
pub use verdict::judge;

use crate::model::{
    ClusterRanges, ClusterSnapshot, DesiredNode, LocalConfig, Peer, Route, RouteKind, Verdict,
};

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

/// Plans this node's WireGuard peers, interface addresses and routes.
pub fn plan(snapshot: &ClusterSnapshot, local: &LocalConfig) -> DesiredNode {
    let verdicts = judge(snapshot, &local.ranges);
    let mut peers = BTreeMap::new();
    // Every accepted claim lies inside the ranges (the parser checks), so
    // a peer that is down, pending, rejected or deleted falls back to them.
    let mut routes = backstops(&local.ranges);
    let mut addresses = BTreeSet::new();
    for (name, verdict) in &verdicts {
        let is_local = *name == local.node_name;
        match verdict {
            Verdict::Accepted(claim) if is_local => {
                addresses.extend(claim.mesh_addresses.iter().map(|a| IpNet::from(*a)));
            }
            Verdict::Accepted(claim) => {
                let allowed: BTreeSet<IpNet> = claim.prefixes().collect();
                if !local.down_peers.contains(&claim.public_key) {
                    routes.extend(allowed.iter().map(|dst| Route {
                        dst: *dst,
                        kind: RouteKind::Mesh,
                    }));
                }
                peers.insert(
                    claim.public_key,
                    Peer {
                        node: name.clone(),
                        endpoint: claim.endpoint,
                        allowed_ips: allowed,
                        persistent_keepalive: local.persistent_keepalive,
                    },
                );
            }
            Verdict::Pending | Verdict::Rejected(_) => {}
        }
    }
    DesiredNode {
        addresses,
        peers,
        routes,
        verdicts,
    }
}

#[cfg(test)]
mod tests;
