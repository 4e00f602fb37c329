//! `plan(snapshot, local) -> DesiredNode`: the whole mesh as this node should
//! see it, computed from cluster data alone. Pure: no I/O, no clock, no
//! randomness; the reconcilers make it so.

mod mesh_address;
mod own;
mod verdict;

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;

pub use mesh_address::choose_mesh_address;
pub use own::{own_claim, own_endpoint};
pub use verdict::judge;

use crate::model::{
    overlap, ClusterSnapshot, DesiredNode, LocalConfig, Peer, Route, RouteKind, Verdict,
};

/// Plans this node's WireGuard peers, interface addresses and routes.
pub fn plan(snapshot: &ClusterSnapshot, local: &LocalConfig) -> DesiredNode {
    let verdicts = judge(snapshot, &local.mesh);
    let mut peers = BTreeMap::new();
    let mut routes = BTreeSet::new();
    let mut addresses = BTreeSet::new();
    let accepted: Vec<IpNet> = verdicts
        .values()
        .filter_map(|v| match v {
            Verdict::Accepted(c) => Some(c.prefixes().collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    for (name, verdict) in &verdicts {
        let is_local = *name == local.node_name;
        match verdict {
            Verdict::Accepted(claim) if is_local => {
                addresses.extend(claim.mesh_addresses.iter().map(|a| IpNet::from(*a)));
            }
            Verdict::Accepted(claim) => {
                let allowed: BTreeSet<IpNet> = claim.prefixes().collect();
                let up = !local.down_peers.contains(&claim.public_key);
                for dst in &allowed {
                    routes.insert(Route {
                        dst: *dst,
                        kind: RouteKind::Unreachable,
                    });
                    if up {
                        routes.insert(Route {
                            dst: *dst,
                            kind: RouteKind::Mesh,
                        });
                    }
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
            // An excluded node's pods are refused, not routed in plaintext —
            // but only where that cannot shadow a prefix someone else holds.
            Verdict::Rejected(_) if !is_local => {
                let spec = snapshot
                    .nodes
                    .iter()
                    .filter(|n| n.name == *name)
                    .flat_map(|n| n.spec_pod_cidrs.iter());
                for cidr in spec.filter(|c| !accepted.iter().any(|a| overlap(a, c))) {
                    routes.insert(Route {
                        dst: *cidr,
                        kind: RouteKind::Unreachable,
                    });
                }
            }
            _ => {}
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
