//! Node blocks claimed through the API when the control plane assigns no
//! `spec.podCIDRs`: one shared record of which node holds which block,
//! changed only with optimistic concurrency (the caller replaces it with the
//! resourceVersion it read and retries on conflict), so two nodes joining at
//! the same instant never get the same block.
//!
//! A block whose node is gone is kept for a grace period (its pods may still
//! be draining; the node may be re-registering) and then freed.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::blocks::BlockPlan;

/// One block's holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Holder {
    pub node: String,
    /// Unix seconds since which the node has been gone; `None` while it lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone_since: Option<i64>,
}

/// The shared record (`version` guards the format).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub version: u32,
    pub blocks: BTreeMap<IpNet, Holder>,
}

/// Why no block could be claimed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("every node block of {0} is taken")]
    Full(IpNet),
}

impl BlockRecord {
    /// The blocks `node` holds.
    pub fn held_by(&self, node: &str) -> Vec<IpNet> {
        self.blocks
            .iter()
            .filter(|(_, h)| h.node == node && h.gone_since.is_none())
            .map(|(b, _)| *b)
            .collect()
    }

    /// Marks blocks of nodes not in `live` as gone (or live again, if they
    /// came back) and frees those gone for at least `grace` seconds.
    pub fn expire(&mut self, live: &BTreeSet<String>, now: i64, grace: i64) {
        for holder in self.blocks.values_mut() {
            match (live.contains(&holder.node), holder.gone_since) {
                (true, Some(_)) => holder.gone_since = None,
                (false, None) => holder.gone_since = Some(now),
                _ => {}
            }
        }
        self.blocks
            .retain(|_, h| h.gone_since.is_none_or(|since| now - since < grace));
    }

    /// Makes sure `node` holds one block of each plan, claiming the lowest
    /// free ones; `reserved` are blocks in use elsewhere (other nodes'
    /// `spec.podCIDRs`) that must not be handed out.
    pub fn claim(
        &mut self,
        node: &str,
        plans: &[BlockPlan],
        reserved: &[IpNet],
    ) -> Result<Vec<IpNet>, ClaimError> {
        let mut mine = Vec::new();
        for plan in plans {
            if let Some(held) = self
                .held_by(node)
                .into_iter()
                .find(|b| plan.index_of(b).is_some())
            {
                mine.push(held);
                continue;
            }
            let taken: Vec<IpNet> = self
                .blocks
                .keys()
                .copied()
                .chain(reserved.iter().copied())
                .collect();
            let block = plan
                .first_free(&taken)
                .ok_or(ClaimError::Full(plan.cluster()))?;
            self.blocks.insert(
                block,
                Holder {
                    node: node.to_string(),
                    gone_since: None,
                },
            );
            mine.push(block);
        }
        self.version = 1;
        Ok(mine)
    }
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

    #[test]
    fn claims_are_stable_and_skip_reserved() {
        let mut r = BlockRecord::default();
        let reserved = ["198.19.0.0/24".parse().unwrap()];
        let a = r.claim("a", &plans(), &reserved).unwrap();
        assert_eq!(
            a,
            vec![
                "198.19.1.0/24".parse::<IpNet>().unwrap(),
                "fd98:19::/64".parse().unwrap()
            ]
        );
        assert_eq!(
            r.claim("a", &plans(), &reserved).unwrap(),
            a,
            "a node keeps its blocks"
        );
        let b = r.claim("b", &plans(), &reserved).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn a_gone_node_keeps_its_block_for_the_grace_period() {
        let mut r = BlockRecord::default();
        let a = r.claim("a", &plans(), &[]).unwrap();
        r.expire(&BTreeSet::new(), 1000, 300);
        assert!(r.held_by("a").is_empty());
        let b = r.claim("b", &plans(), &[]).unwrap();
        assert!(
            b.iter().all(|x| !a.contains(x)),
            "a's blocks are not reused within the grace period"
        );
        // a comes back in time: its blocks are its own again.
        r.expire(
            &BTreeSet::from(["a".to_string(), "b".to_string()]),
            1100,
            300,
        );
        assert_eq!(r.held_by("a"), a);
        // Gone for good: freed after the grace period.
        r.expire(&BTreeSet::from(["b".to_string()]), 1200, 300);
        r.expire(&BTreeSet::from(["b".to_string()]), 1500, 300);
        assert!(r.blocks.values().all(|h| h.node == "b"));
        assert_eq!(
            r.claim("c", &plans(), &[]).unwrap(),
            a,
            "the freed blocks are the lowest again"
        );
    }

    #[test]
    fn full_names_the_range() {
        let tiny = vec![BlockPlan::new("198.19.0.0/23".parse().unwrap(), 24).unwrap()];
        let mut r = BlockRecord::default();
        r.claim("a", &tiny, &[]).unwrap();
        r.claim("b", &tiny, &[]).unwrap();
        assert_eq!(
            r.claim("c", &tiny, &[]),
            Err(ClaimError::Full("198.19.0.0/23".parse().unwrap()))
        );
    }

    proptest! {
        /// Whatever order nodes claim, leave and come back in, no block is
        /// held by two live nodes.
        #[test]
        fn no_block_is_ever_shared(steps in proptest::collection::vec((0u8..6, any::<bool>()), 1..60)) {
            let mut r = BlockRecord::default();
            let mut live: BTreeSet<String> = BTreeSet::new();
            for (i, (node, joins)) in steps.into_iter().enumerate() {
                let name = format!("n{node}");
                if joins {
                    live.insert(name.clone());
                    let _ = r.claim(&name, &plans(), &[]);
                } else {
                    live.remove(&name);
                }
                r.expire(&live, i as i64 * 100, 250);
                let mut seen = BTreeSet::new();
                for (block, holder) in &r.blocks {
                    prop_assert!(seen.insert(*block));
                    if holder.gone_since.is_none() {
                        prop_assert!(live.contains(&holder.node));
                    }
                }
            }
        }
    }
}
