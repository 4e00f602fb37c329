//! Which nodes are in the mesh. The decision uses only cluster data, never
//! who is asking, so every node reaches the same verdicts from the same
//! snapshot: claims are taken oldest node first (then by name), and a claim
//! that collides with one already taken — a public key, an endpoint, a mesh
//! address, an overlapping pod CIDR — excludes the later node.

use std::collections::BTreeMap;

use crate::annotations::{
    parse, Claim, Rejection, ENDPOINT, MESH_ADDRESSES, POD_CIDRS, PUBLIC_KEY,
};
use crate::model::{overlap, ClusterRanges, ClusterSnapshot, NodeInfo, Verdict};

/// Every node's verdict, by name.
pub fn judge(snapshot: &ClusterSnapshot, ranges: &ClusterRanges) -> BTreeMap<String, Verdict> {
    let mut verdicts = BTreeMap::new();
    let mut candidates: Vec<(&NodeInfo, Claim)> = Vec::new();
    for node in &snapshot.nodes {
        match parse(node, ranges, &snapshot.assigned(node)) {
            Ok(Some(claim)) => candidates.push((node, claim)),
            Ok(None) => {
                verdicts.insert(node.name.clone(), Verdict::Pending);
            }
            Err(r) => {
                verdicts.insert(node.name.clone(), Verdict::Rejected(r));
            }
        }
    }
    candidates.sort_by(|(a, _), (b, _)| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut taken: Vec<(&str, Claim)> = Vec::new();
    for (node, claim) in candidates {
        match taken
            .iter()
            .find_map(|(holder, held)| collision(&claim, held, holder))
        {
            Some(rejection) => {
                verdicts.insert(node.name.clone(), Verdict::Rejected(rejection));
            }
            None => {
                verdicts.insert(node.name.clone(), Verdict::Accepted(claim.clone()));
                taken.push((&node.name, claim));
            }
        }
    }
    verdicts
}

fn collision(claim: &Claim, held: &Claim, holder: &str) -> Option<Rejection> {
    let conflict = |field, value: String| Rejection::Conflict {
        field,
        value,
        holder: holder.to_string(),
    };
    if claim.public_key == held.public_key {
        return Some(conflict(PUBLIC_KEY, claim.public_key.to_string()));
    }
    // Compared as the addresses they are: [::ffff:a.b.c.d]:p is a.b.c.d:p.
    let canonical = |e: std::net::SocketAddr| (e.ip().to_canonical(), e.port());
    if canonical(claim.endpoint) == canonical(held.endpoint) {
        return Some(conflict(ENDPOINT, claim.endpoint.to_string()));
    }
    if let Some(a) = claim
        .mesh_addresses
        .iter()
        .find(|a| held.mesh_addresses.contains(a))
    {
        return Some(conflict(MESH_ADDRESSES, a.to_string()));
    }
    claim
        .pod_cidrs
        .iter()
        .find(|c| held.pod_cidrs.iter().any(|h| overlap(c, h)))
        .map(|c| conflict(POD_CIDRS, c.to_string()))
}
