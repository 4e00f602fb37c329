//! Node blocks claimed through the API when the control plane assigns no
//! `spec.podCIDRs`. Each node writes one claim of its own — an object only
//! it may create or delete (the admission policy checks the name against
//! the node's token), never changed once written — and a block is held by
//! the earliest claim to it, by the creation time the API server stamped.
//! So nothing a node writes can take a block another node holds: a later
//! claim to it loses, and a node cannot touch another's claim, nor make
//! its own look older (a rewrite is a new object, with a new time).
//!
//! A claim goes with its Node (it is owned by it, and the garbage
//! collector deletes it), which frees its blocks.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::blocks::BlockPlan;

/// One node's claim, as the API server holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockClaim {
    pub node: String,
    /// When the API server created it (Unix seconds): set by the server,
    /// so the claimant cannot choose it.
    pub created: i64,
    /// One block per family at most.
    pub blocks: Vec<IpNet>,
}

/// Who holds each block: the earliest valid claim to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockRecord {
    pub blocks: BTreeMap<IpNet, String>,
}

/// Why no block could be claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("every node block of {0} is taken")]
    Full(IpNet),
}

impl BlockRecord {
    /// The holders of every block `plans` define, from every node's claim:
    /// a block goes to the earliest claim, and to nobody when two claims
    /// are equally early (creation times are whole seconds: a node that
    /// claims in the very second another does, after seeing its claim,
    /// takes nothing — both make new claims). A claimed prefix that is not
    /// exactly one block of a plan (another size, unaligned, outside the
    /// ranges) holds nothing, so a claim can never cover blocks of others.
    pub fn resolve(claims: &[BlockClaim], plans: &[BlockPlan]) -> Self {
        // Per block: the earliest time, and who claimed it then.
        let mut earliest: BTreeMap<IpNet, (i64, Vec<&str>)> = BTreeMap::new();
        for claim in claims {
            for block in &claim.blocks {
                if !plans.iter().any(|p| p.index_of(block).is_some()) {
                    continue;
                }
                let entry = earliest
                    .entry(*block)
                    .or_insert((claim.created, Vec::new()));
                if claim.created < entry.0 {
                    *entry = (claim.created, Vec::new());
                }
                if claim.created == entry.0 && !entry.1.contains(&claim.node.as_str()) {
                    entry.1.push(&claim.node);
                }
            }
        }
        let blocks = earliest
            .into_iter()
            .filter_map(|(block, (_, nodes))| match nodes[..] {
                [only] => Some((block, only.to_string())),
                _ => None,
            })
            .collect();
        Self { blocks }
    }

    /// The blocks `node` holds.
    pub fn held_by(&self, node: &str) -> Vec<IpNet> {
        self.blocks
            .iter()
            .filter(|(_, holder)| *holder == node)
            .map(|(b, _)| *b)
            .collect()
    }

    /// The blocks `node` should claim, one per plan: the one it holds, else
    /// the first block nobody holds from a place its name hashes to (nodes
    /// joining at once then rarely reach for the same block, and the one
    /// that loses tries again); `reserved` are blocks in use elsewhere
    /// (other nodes' `spec.podCIDRs`) that must not be handed out.
    pub fn choose(
        &self,
        node: &str,
        plans: &[BlockPlan],
        reserved: &[IpNet],
    ) -> Result<Vec<IpNet>, ClaimError> {
        let held = self.held_by(node);
        plans
            .iter()
            .map(|plan| {
                if let Some(mine) = held.iter().find(|b| plan.index_of(b).is_some()) {
                    return Ok(*mine);
                }
                let taken = self.blocks.keys().chain(reserved);
                plan.free_from(u128::from(stable_hash(node)), taken)
                    .ok_or(ClaimError::Full(plan.cluster()))
            })
            .collect()
    }
}

/// FNV-1a: a hash that stays the same across releases (the standard
/// library's may change), so a node reaches for the same blocks after an
/// upgrade.
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plans() -> Vec<BlockPlan> {
        vec![
            BlockPlan::new("198.19.0.0/20".parse().unwrap(), 24).unwrap(),
            BlockPlan::new("fd98:19::/60".parse().unwrap(), 64).unwrap(),
        ]
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn claim(node: &str, created: i64, blocks: &[&str]) -> BlockClaim {
        BlockClaim {
            node: node.into(),
            created,
            blocks: blocks.iter().map(|b| net(b)).collect(),
        }
    }

    #[test]
    fn choices_are_stable_and_skip_held_and_reserved() {
        let empty = BlockRecord::default();
        let a = empty.choose("a", &plans(), &[]).unwrap();
        assert_eq!(
            a,
            empty.choose("a", &plans(), &[]).unwrap(),
            "the same every time"
        );
        // What a would take, reserved or held, it does not.
        let moved = empty.choose("a", &plans(), &[a[0]]).unwrap();
        assert_ne!(moved[0], a[0]);
        let r = BlockRecord::resolve(&[claim("b", 1, &[&a[0].to_string()])], &plans());
        assert_ne!(r.choose("a", &plans(), &[]).unwrap()[0], a[0]);
        // Its own claim: kept.
        let blocks: Vec<String> = a.iter().map(ToString::to_string).collect();
        let refs: Vec<&str> = blocks.iter().map(String::as_str).collect();
        let mine = BlockRecord::resolve(&[claim("a", 10, &refs)], &plans());
        assert_eq!(
            mine.choose("a", &plans(), &[]).unwrap(),
            a,
            "a keeps its blocks"
        );
    }

    /// The earliest claim holds a block whoever claims it later, whatever
    /// the later claimant's name; a claim in the same second makes the
    /// block nobody's.
    #[test]
    fn the_earliest_claim_holds_and_a_later_one_takes_nothing() {
        let victim = claim("victim", 100, &["198.19.2.0/24"]);
        let thief = claim("a-thief", 200, &["198.19.2.0/24", "198.19.3.0/24"]);
        let r = BlockRecord::resolve(&[thief.clone(), victim.clone()], &plans());
        assert_eq!(r.held_by("victim"), vec![net("198.19.2.0/24")]);
        assert_eq!(r.held_by("a-thief"), vec![net("198.19.3.0/24")]);
        let tie = BlockRecord::resolve(
            &[
                claim("b", 100, &["198.19.4.0/24"]),
                claim("a", 100, &["198.19.4.0/24"]),
            ],
            &plans(),
        );
        assert!(tie.blocks.is_empty(), "{tie:?}");
    }

    /// A claim to anything but exact blocks of the plans holds nothing: a
    /// larger prefix cannot cover others' blocks.
    #[test]
    fn only_exact_blocks_are_held() {
        let greedy = claim(
            "greedy",
            1,
            &[
                "198.19.0.0/16",
                "198.19.2.128/25",
                "10.0.0.0/24",
                "198.19.5.0/24",
            ],
        );
        let r = BlockRecord::resolve(&[greedy], &plans());
        assert_eq!(r.held_by("greedy"), vec![net("198.19.5.0/24")]);
    }

    #[test]
    fn full_names_the_range() {
        let tiny = vec![BlockPlan::new("198.19.0.0/23".parse().unwrap(), 24).unwrap()];
        let r = BlockRecord::resolve(
            &[
                claim("a", 1, &["198.19.0.0/24"]),
                claim("b", 2, &["198.19.1.0/24"]),
            ],
            &tiny,
        );
        assert_eq!(
            r.choose("c", &tiny, &[]),
            Err(ClaimError::Full("198.19.0.0/23".parse().unwrap()))
        );
    }

    proptest! {
        /// Whatever the claims, no block has two holders, every held block
        /// is one some claim names, and no later claim displaces an
        /// earlier one's block.
        #[test]
        fn a_block_has_one_holder_and_later_claims_never_displace(
            claims in proptest::collection::vec((0u8..6, 0i64..5, proptest::collection::vec(0u8..8, 0..3)), 0..12)
        ) {
            let claims: Vec<BlockClaim> = claims.into_iter().map(|(n, t, bs)| BlockClaim {
                node: format!("n{n}"),
                created: t,
                blocks: bs.into_iter().map(|b| net(&format!("198.19.{b}.0/24"))).collect(),
            }).collect();
            let r = BlockRecord::resolve(&claims, &plans());
            for (block, holder) in &r.blocks {
                let first = claims.iter().filter(|c| c.blocks.contains(block)).map(|c| c.created).min();
                let firsts: std::collections::BTreeSet<&str> = claims.iter()
                    .filter(|c| c.blocks.contains(block) && Some(c.created) == first)
                    .map(|c| c.node.as_str()).collect();
                prop_assert_eq!(firsts.into_iter().collect::<Vec<_>>(), vec![holder.as_str()]);
            }
            let mut later = claims.clone();
            later.push(BlockClaim { node: "n9".into(), created: 99, blocks: r.blocks.keys().copied().collect() });
            prop_assert_eq!(BlockRecord::resolve(&later, &plans()), r);
        }
    }
}
