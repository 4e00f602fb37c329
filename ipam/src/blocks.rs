//! A cluster CIDR split into equally sized node blocks, addressed by index.
//!
//! Pure arithmetic: block `i` of `10.0.0.0/16` at `/24` is `10.0.i.0/24`.
//! Whoever hands blocks to nodes (the lab today, meshd's allocator later)
//! decides which indices are taken; this type only guarantees that distinct
//! indices never overlap and that every block lies inside the cluster CIDR.

use std::collections::BTreeSet;

use ipnet::IpNet;

use crate::bits::{address_bits, net_from_bits};

/// Why a block plan cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The cluster CIDR has host bits set (e.g. `10.0.0.1/16`).
    #[error("cluster CIDR {0} has host bits set; did you mean {1}?")]
    NotNetwork(IpNet, IpNet),
    /// The node block prefix is shorter than the cluster prefix or longer than
    /// the address family allows.
    #[error(
        "node block prefix /{block} does not fit cluster CIDR {cluster} (must be /{min}../{max})"
    )]
    BadPrefix {
        cluster: IpNet,
        block: u8,
        min: u8,
        max: u8,
    },
}

/// A cluster CIDR and the prefix length of the blocks carved from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPlan {
    cluster: IpNet,
    block_prefix: u8,
}

impl BlockPlan {
    /// Plans blocks of `/block_prefix` inside `cluster`.
    pub fn new(cluster: IpNet, block_prefix: u8) -> Result<Self, BlockError> {
        if cluster.trunc() != cluster {
            return Err(BlockError::NotNetwork(cluster, cluster.trunc()));
        }
        let (min, max) = (cluster.prefix_len(), cluster.max_prefix_len());
        if block_prefix < min || block_prefix > max {
            return Err(BlockError::BadPrefix {
                cluster,
                block: block_prefix,
                min,
                max,
            });
        }
        Ok(Self {
            cluster,
            block_prefix,
        })
    }

    /// The cluster CIDR the blocks are carved from.
    pub fn cluster(&self) -> IpNet {
        self.cluster
    }

    /// The prefix length of every block.
    pub fn block_prefix(&self) -> u8 {
        self.block_prefix
    }

    /// How many blocks the cluster holds (saturating at `u128::MAX` for a
    /// whole IPv6 space split into /128s).
    pub fn len(&self) -> u128 {
        let bits = u32::from(self.block_prefix - self.cluster.prefix_len());
        1u128.checked_shl(bits).unwrap_or(u128::MAX)
    }

    /// Always false: a plan holds at least one block.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Block number `index`, or `None` past the end.
    pub fn block(&self, index: u128) -> Option<IpNet> {
        if index >= self.len() {
            return None;
        }
        let shift = u32::from(self.cluster.max_prefix_len() - self.block_prefix);
        // A /0 block (the whole IPv6 space) is block 0 and shifts by 128,
        // which `<<` on a u128 cannot: its offset is 0.
        let offset = index.checked_shl(shift).unwrap_or(0);
        let base = address_bits(self.cluster.network()) | offset;
        Some(net_from_bits(self.cluster, base, self.block_prefix))
    }

    /// The index of `block` if it is one of this plan's blocks.
    pub fn index_of(&self, block: &IpNet) -> Option<u128> {
        if block.prefix_len() != self.block_prefix
            || block.trunc() != *block
            || !self.cluster.contains(block)
        {
            return None;
        }
        let shift = u32::from(self.cluster.max_prefix_len() - self.block_prefix);
        let offset = address_bits(block.network()) - address_bits(self.cluster.network());
        Some(offset.checked_shr(shift).unwrap_or(0))
    }

    /// The lowest-numbered block that is none of `used`.
    pub fn first_free<'a>(&self, used: impl IntoIterator<Item = &'a IpNet>) -> Option<IpNet> {
        self.free_from(0, used)
    }

    /// The first block numbered `start` (modulo the number of blocks) or
    /// later, wrapping around, that is none of `used`.
    pub fn free_from<'a>(
        &self,
        start: u128,
        used: impl IntoIterator<Item = &'a IpNet>,
    ) -> Option<IpNet> {
        let len = self.len();
        if len == 0 {
            return None;
        }
        let start = start % len;
        let taken: BTreeSet<u128> = used
            .into_iter()
            .filter_map(|net| self.index_of(net))
            .collect();
        let first_gap = |from: u128, range: std::collections::btree_set::Range<u128>| {
            let mut candidate = from;
            for index in range {
                if *index != candidate {
                    break;
                }
                candidate += 1;
            }
            candidate
        };
        let after = first_gap(start, taken.range(start..));
        if after < len {
            return self.block(after);
        }
        let before = first_gap(0, taken.range(..start));
        (before < start).then(|| self.block(before)).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::{Ipv4Net, Ipv6Net};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn splits_v4_and_v6() {
        let v4 = BlockPlan::new(net("198.19.0.0/16"), 24).unwrap();
        assert_eq!(v4.len(), 256);
        assert_eq!(v4.block(0), Some(net("198.19.0.0/24")));
        assert_eq!(v4.block(255), Some(net("198.19.255.0/24")));
        assert_eq!(v4.block(256), None);
        let v6 = BlockPlan::new(net("fd98:19::/48"), 64).unwrap();
        assert_eq!(v6.block(3), Some(net("fd98:19:0:3::/64")));
        assert_eq!(v6.index_of(&net("fd98:19:0:3::/64")), Some(3));
    }

    #[test]
    fn rejects_bad_plans() {
        assert_eq!(
            BlockPlan::new(net("198.19.0.1/16"), 24),
            Err(BlockError::NotNetwork(
                net("198.19.0.1/16"),
                net("198.19.0.0/16")
            ))
        );
        assert!(matches!(
            BlockPlan::new(net("198.19.0.0/16"), 8),
            Err(BlockError::BadPrefix { .. })
        ));
        assert!(matches!(
            BlockPlan::new(net("198.19.0.0/16"), 33),
            Err(BlockError::BadPrefix { .. })
        ));
    }

    #[test]
    fn whole_v6_space_saturates() {
        let plan = BlockPlan::new(net("::/0"), 128).unwrap();
        assert_eq!(plan.len(), u128::MAX);
        assert_eq!(plan.block(1), Some(net("::1/128")));
    }

    #[test]
    fn the_whole_ipv6_space_is_one_block() {
        let plan = BlockPlan::new(net("::/0"), 0).unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan.block(0), Some(net("::/0")));
        assert_eq!(plan.block(1), None);
        assert_eq!(plan.first_free(&[]), Some(net("::/0")));
    }

    #[test]
    fn first_free_skips_used_and_ignores_foreign() {
        let plan = BlockPlan::new(net("198.19.0.0/16"), 24).unwrap();
        let used = [
            net("198.19.0.0/24"),
            net("198.19.1.0/24"),
            net("10.0.0.0/24"),
            net("198.19.3.0/24"),
        ];
        assert_eq!(plan.first_free(&used), Some(net("198.19.2.0/24")));
        let full: Vec<IpNet> = (0..256).filter_map(|i| plan.block(i)).collect();
        assert_eq!(plan.first_free(&full), None);
    }

    fn plans() -> impl Strategy<Value = BlockPlan> {
        prop_oneof![
            (any::<u32>(), 0u8..=32, 0u8..=32).prop_map(|(a, p, extra)| {
                let cluster = Ipv4Net::new(Ipv4Addr::from(a), p).unwrap().trunc();
                BlockPlan::new(IpNet::V4(cluster), p.saturating_add(extra).min(32)).unwrap()
            }),
            (any::<u128>(), 0u8..=128, 0u8..=128).prop_map(|(a, p, extra)| {
                let cluster = Ipv6Net::new(Ipv6Addr::from(a), p).unwrap().trunc();
                BlockPlan::new(IpNet::V6(cluster), p.saturating_add(extra).min(128)).unwrap()
            }),
        ]
    }

    proptest! {
        #[test]
        fn blocks_are_inside_disjoint_and_invertible(plan in plans(), i in any::<u128>(), j in any::<u128>()) {
            let (i, j) = (i % plan.len(), j % plan.len());
            let a = plan.block(i).unwrap();
            let b = plan.block(j).unwrap();
            prop_assert!(plan.cluster().contains(&a));
            prop_assert_eq!(a.prefix_len(), plan.block_prefix());
            prop_assert_eq!(plan.index_of(&a), Some(i));
            prop_assert_eq!(i == j, a.contains(&b.network()) || b.contains(&a.network()));
        }

        #[test]
        fn first_free_is_lowest_unused(plan in plans(), used in proptest::collection::vec(0u128..64, 0..40)) {
            let used: Vec<IpNet> = used.iter().filter_map(|&i| plan.block(i)).collect();
            if let Some(free) = plan.first_free(&used) {
                prop_assert!(!used.contains(&free));
                let index = plan.index_of(&free).unwrap();
                for lower in 0..index {
                    prop_assert!(used.contains(&plan.block(lower).unwrap()));
                }
            } else {
                prop_assert!((0..plan.len().min(64)).all(|i| used.contains(&plan.block(i).unwrap())));
            }
        }
    }
}
