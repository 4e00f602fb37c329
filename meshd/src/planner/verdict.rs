//! Which nodes are in the mesh. The decision uses only cluster data, never
//! who is asking, so every node reaches the same verdicts from the same
//! snapshot.
//!
//! Age never decides who owns what another node relies on: a claim to a
//! key is proven (only the private key's holder can sign for it, see
//! [`crate::annotations::KEY_PROOF`]), pod CIDRs are what the control plane
//! assigned and mesh addresses are derived from them. So two valid claims
//! collide only where the control plane or a key's holder made them do so
//! — a key both prove they hold (a cloned key), pod CIDRs assigned to both
//! — and only then is the later node (by age, then name) excluded. Equal
//! endpoints are no conflict at all: cryptokey routing tells the two apart
//! by key, and the one that does not answer for its key gets no session.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ipnet::IpNet;
use weft_keys::PublicKey;

use crate::annotations::{
    parse, render_time, Claim, Rejection, MAX_KEY_SWITCH_AHEAD, NEXT_KEY_AT, NEXT_PUBLIC_KEY,
    POD_CIDRS, PUBLIC_KEY,
};
use crate::model::{overlap, ClusterRanges, ClusterSnapshot, NodeInfo, Verdict};

/// A node and what its annotations say (`Ok(None)`: nothing yet).
pub type Parsed<'a> = (&'a NodeInfo, Result<Option<Claim>, Rejection>);

/// Every node's annotations, parsed once.
pub fn parse_all<'a>(snapshot: &'a ClusterSnapshot, ranges: &ClusterRanges) -> Vec<Parsed<'a>> {
    ParseMemo::default().parse_all(snapshot, ranges)
}

/// Parse results kept from one decision to the next: a node whose UID,
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
    /// The Node's UID: key proofs are bound to it, so a Node registered
    /// again under the same name is parsed again.
    uid: String,
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
                    Some(m)
                        if m.uid == node.uid
                            && m.annotations == node.annotations
                            && m.assigned == assigned =>
                    {
                        m.parsed.clone()
                    }
                    _ => {
                        let parsed = parse(node, ranges, &assigned);
                        self.entries.insert(
                            node.name.clone(),
                            Memo {
                                uid: node.uid.clone(),
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
    judge_parsed(parse_all(snapshot, ranges), &snapshot.revoked, snapshot.now)
}

/// Every node's verdict from its parsed annotations. O(n log n): each
/// claim is checked against indexes of what older nodes hold, not against
/// each of them.
pub fn judge_parsed(
    parsed: Vec<Parsed>,
    revoked: &BTreeSet<PublicKey>,
    now: u64,
) -> BTreeMap<String, Verdict> {
    let (mut verdicts, candidates) = candidates(parsed, revoked, now);
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
/// else is looked at; so is one scheduling its key switch further ahead
/// than any node's lead allows (at `now`, Unix seconds).
fn candidates<'a>(
    parsed: Vec<Parsed<'a>>,
    revoked: &BTreeSet<PublicKey>,
    now: u64,
) -> (BTreeMap<String, Verdict>, Vec<(&'a NodeInfo, Claim)>) {
    let mut verdicts = BTreeMap::new();
    let mut candidates: Vec<(&NodeInfo, Claim)> = Vec::new();
    for (node, parsed) in parsed {
        match parsed {
            Ok(Some(claim)) => match out_of_bounds(&claim, revoked, now) {
                Some(rejection) => {
                    verdicts.insert(node.name.clone(), Verdict::Rejected(rejection));
                }
                None => candidates.push((node, claim)),
            },
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

/// Why a parsed claim is out whatever other nodes claim: a revoked key, or
/// a key switch scheduled too far ahead.
fn out_of_bounds(claim: &Claim, revoked: &BTreeSet<PublicKey>, now: u64) -> Option<Rejection> {
    if let Some(key) = claim.keys().find(|k| revoked.contains(k)) {
        return Some(Rejection::Revoked(key));
    }
    let at = claim.next_key.as_ref()?.at?;
    (at > now.saturating_add(MAX_KEY_SWITCH_AHEAD)).then(|| Rejection::BadRotation {
        annotation: NEXT_KEY_AT,
        why: format!(
            "{} is more than {MAX_KEY_SWITCH_AHEAD} s ahead (the longest --key-switch-lead plus clock skew)",
            render_time(at)
        ),
    })
}

/// The accepted claims so far, in order, indexed by everything two claims
/// may not share.
#[derive(Default)]
struct Taken<'a> {
    claims: Vec<(&'a str, Claim)>,
    keys: HashMap<PublicKey, usize>,
    /// Pod CIDRs, for exact lookups.
    pods: HashMap<IpNet, usize>,
    /// Pod CIDRs by network address, then length, for range lookups.
    pods_ordered: BTreeMap<IpNet, usize>,
    /// The prefix lengths held, per family (IPv4: true): a covering CIDR
    /// can only have one of these (in practice one or two).
    lengths: BTreeSet<(bool, u8)>,
}

impl<'a> Taken<'a> {
    fn insert(&mut self, holder: &'a str, claim: Claim) {
        let i = self.claims.len();
        for key in claim.keys() {
            self.keys.insert(key, i);
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
    let (mut verdicts, candidates) =
        candidates(parse_all(snapshot, ranges), &snapshot.revoked, snapshot.now);
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
    claim
        .pod_cidrs
        .iter()
        .find(|c| held.pod_cidrs.iter().any(|h| overlap(c, h)))
        .map(|c| conflict(POD_CIDRS, c.to_string()))
}
