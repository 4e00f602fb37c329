//! Which nodes are in the mesh. The decision uses only cluster data, never
//! who is asking, so every node reaches the same verdicts from the same
//! snapshot: claims are taken oldest node first (then by name), and a claim
//! that collides with one already taken — a public key, an endpoint, a mesh
//! address, an overlapping pod CIDR — excludes the later node.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use weft_keys::PublicKey;

use crate::annotations::{
    parse, Claim, Rejection, ENDPOINT, MESH_ADDRESSES, NEXT_PUBLIC_KEY, POD_CIDRS, PUBLIC_KEY,
};
use crate::model::{overlap, ClusterRanges, ClusterSnapshot, NodeInfo, Verdict};

/// A node and what its annotations say (`Ok(None)`: nothing yet).
pub type Parsed<'a> = (&'a NodeInfo, Result<Option<Claim>, Rejection>);

/// Every node's annotations, parsed once.
pub fn parse_all<'a>(snapshot: &'a ClusterSnapshot, ranges: &ClusterRanges) -> Vec<Parsed<'a>> {
    ParseMemo::default().parse_all(snapshot, ranges)
}

/// Parse results kept from one decision to the next: a node whose
/// annotations and assigned ranges did not change is not parsed again (on
/// a large cluster, parsing is most of a decision). A memo only: what it
/// returns is what parsing returns.
#[derive(Debug, Default)]
pub struct ParseMemo {
    ranges: Option<ClusterRanges>,
    entries: HashMap<String, Memo>,
}

#[derive(Debug)]
struct Memo {
    annotations: BTreeMap<String, String>,
    assigned: Vec<IpNet>,
    parsed: Result<Option<Claim>, Rejection>,
}

impl ParseMemo {
    /// Every node's annotations, parsed (or remembered).
    pub fn parse_all<'a>(
        &mut self,
        snapshot: &'a ClusterSnapshot,
        ranges: &ClusterRanges,
    ) -> Vec<Parsed<'a>> {
        if self.ranges != Some(*ranges) {
            self.entries.clear();
            self.ranges = Some(*ranges);
        }
        let mut assigned = snapshot.all_assigned();
        let parsed: Vec<Parsed<'a>> = snapshot
            .nodes
            .iter()
            .map(|node| {
                let assigned = assigned.remove(node.name.as_str()).unwrap_or_default();
                let parsed = match self.entries.get(&node.name) {
                    Some(m) if m.annotations == node.annotations && m.assigned == assigned => {
                        m.parsed.clone()
                    }
                    _ => {
                        let parsed = parse(node, ranges, &assigned);
                        self.entries.insert(
                            node.name.clone(),
                            Memo {
                                annotations: node.annotations.clone(),
                                assigned,
                                parsed: parsed.clone(),
                            },
                        );
                        parsed
                    }
                };
                (node, parsed)
            })
            .collect();
        if self.entries.len() > parsed.len() {
            let live: HashSet<&str> = parsed.iter().map(|(n, _)| n.name.as_str()).collect();
            self.entries.retain(|name, _| live.contains(name.as_str()));
        }
        parsed
    }
}

/// Every node's verdict, by name.
pub fn judge(snapshot: &ClusterSnapshot, ranges: &ClusterRanges) -> BTreeMap<String, Verdict> {
    judge_parsed(parse_all(snapshot, ranges), &snapshot.revoked)
}

/// Every node's verdict from its parsed annotations. O(n log n): each
/// claim is checked against indexes of what older nodes hold, not against
/// each of them.
pub fn judge_parsed(
    parsed: Vec<Parsed>,
    revoked: &BTreeSet<PublicKey>,
) -> BTreeMap<String, Verdict> {
    let (mut verdicts, candidates) = candidates(parsed, revoked);
    let mut taken = Taken::default();
    for (node, claim) in candidates {
        match taken.first_holder(&claim) {
            Some((holder, held)) => {
                let rejection = collision(&claim, held, holder)
                    .expect("an indexed holder collides with the claim");
                verdicts.insert(node.name.clone(), Verdict::Rejected(rejection));
            }
            None => taken.insert(&node.name, claim),
        }
    }
    for (holder, claim) in taken.claims {
        verdicts.insert(holder.to_string(), Verdict::Accepted(claim));
    }
    verdicts
}

/// Valid claims, oldest node first (then by name), and the verdicts of
/// nodes without one. A claim holding a revoked key is out before anything
/// else is looked at.
fn candidates<'a>(
    parsed: Vec<Parsed<'a>>,
    revoked: &BTreeSet<PublicKey>,
) -> (BTreeMap<String, Verdict>, Vec<(&'a NodeInfo, Claim)>) {
    let mut verdicts = BTreeMap::new();
    let mut candidates: Vec<(&NodeInfo, Claim)> = Vec::new();
    for (node, parsed) in parsed {
        match parsed {
            Ok(Some(claim)) => {
                let revoked_key = claim.keys().find(|k| revoked.contains(k));
                match revoked_key {
                    Some(key) => {
                        verdicts.insert(
                            node.name.clone(),
                            Verdict::Rejected(Rejection::Revoked(key)),
                        );
                    }
                    None => candidates.push((node, claim)),
                }
            }
            Ok(None) => {
                verdicts.insert(node.name.clone(), Verdict::Pending);
            }
            Err(r) => {
                verdicts.insert(node.name.clone(), Verdict::Rejected(r));
            }
        }
    }
    candidates.sort_by(|(a, _), (b, _)| (a.created, &a.name).cmp(&(b.created, &b.name)));
    (verdicts, candidates)
}

/// The accepted claims so far, in order, indexed by everything two claims
/// may not share.
#[derive(Default)]
struct Taken<'a> {
    claims: Vec<(&'a str, Claim)>,
    keys: HashMap<PublicKey, usize>,
    endpoints: HashMap<(IpAddr, u16), usize>,
    mesh: HashMap<IpAddr, usize>,
    /// Pod CIDRs, for exact lookups.
    pods: HashMap<IpNet, usize>,
    /// Pod CIDRs by network address, then length, for range lookups.
    pods_ordered: BTreeMap<IpNet, usize>,
    /// The prefix lengths held, per family (IPv4: true): a covering CIDR
    /// can only have one of these (in practice one or two).
    lengths: BTreeSet<(bool, u8)>,
}

/// Compared as the addresses they are: [::ffff:a.b.c.d]:p is a.b.c.d:p.
fn canonical(e: SocketAddr) -> (IpAddr, u16) {
    (e.ip().to_canonical(), e.port())
}

impl<'a> Taken<'a> {
    fn insert(&mut self, holder: &'a str, claim: Claim) {
        let i = self.claims.len();
        for key in claim.keys() {
            self.keys.insert(key, i);
        }
        if let Some(e) = claim.endpoint {
            self.endpoints.insert(canonical(e), i);
        }
        for a in &claim.mesh_addresses {
            self.mesh.insert(*a, i);
        }
        for c in &claim.pod_cidrs {
            self.pods.insert(*c, i);
            self.pods_ordered.insert(*c, i);
            self.lengths.insert((c.addr().is_ipv4(), c.prefix_len()));
        }
        self.claims.push((holder, claim));
    }

    /// The earliest accepted claim `claim` collides with: what comparing
    /// it with each accepted claim in order would find first.
    fn first_holder(&self, claim: &Claim) -> Option<(&str, &Claim)> {
        let mut hits: Vec<&usize> = Vec::new();
        hits.extend(claim.keys().filter_map(|k| self.keys.get(&k)));
        hits.extend(
            claim
                .endpoint
                .and_then(|e| self.endpoints.get(&canonical(e))),
        );
        hits.extend(claim.mesh_addresses.iter().filter_map(|a| self.mesh.get(a)));
        for c in &claim.pod_cidrs {
            // Held CIDRs containing c: one exact lookup per held length
            // not longer than c's.
            let family = c.addr().is_ipv4();
            hits.extend(
                self.lengths
                    .range((family, 0)..=(family, c.prefix_len()))
                    .filter_map(|&(_, len)| IpNet::new(c.addr(), len).ok())
                    .filter_map(|n| self.pods.get(&n.trunc())),
            );
            // Held CIDRs inside c: those whose network address lies in it.
            let (first, last) = (
                IpNet::new(c.network(), 0),
                IpNet::new(c.broadcast(), c.max_prefix_len()),
            );
            if let (Ok(first), Ok(last)) = (first, last) {
                hits.extend(self.pods_ordered.range(first..=last).map(|(_, i)| i));
            }
        }
        let i = *hits.into_iter().min()?;
        let (holder, held) = &self.claims[i];
        Some((holder, held))
    }
}

/// The verdicts [`judge`] reaches, by comparing each claim with every
/// accepted one (quadratic): the oracle its tests hold it to, and the
/// baseline `meshlab bench planner` measures it against.
pub fn judge_pairwise(
    snapshot: &ClusterSnapshot,
    ranges: &ClusterRanges,
) -> BTreeMap<String, Verdict> {
    let (mut verdicts, candidates) = candidates(parse_all(snapshot, ranges), &snapshot.revoked);
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
    if let Some(key) = claim.keys().find(|k| held.keys().any(|h| h == *k)) {
        let field = if key == claim.public_key {
            PUBLIC_KEY
        } else {
            NEXT_PUBLIC_KEY
        };
        return Some(conflict(field, key.to_string()));
    }
    if let (Some(e), Some(h)) = (claim.endpoint, held.endpoint) {
        if canonical(e) == canonical(h) {
            return Some(conflict(ENDPOINT, e.to_string()));
        }
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
