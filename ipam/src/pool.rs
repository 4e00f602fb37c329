//! Pod addresses within a node's blocks: which attachment holds which
//! address. Pure data and functions; [`crate::PodStore`] keeps it on disk.
//!
//! - An attachment (container ID + interface name) holds one address per
//!   block; asking again returns the same addresses (CNI ADD is retried).
//! - The network address, the gateway (first host, on the node's side) and
//!   the IPv4 broadcast address are never handed out.
//! - Addresses are handed out round-robin from the last one given, so an
//!   address just freed is not reused at once (stale ARP/conntrack entries
//!   of the old pod would otherwise catch the new one).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::bits::{address_bits, address_from_bits};

/// One network attachment of one container.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

impl Attachment {
    fn key(&self) -> String {
        format!("{}/{}", self.container_id, self.ifname)
    }

    /// Its node-side veth (the plugin names it so; meshd looks for it):
    /// stable, unique, within the 15 characters of an interface name.
    pub fn host_veth(&self) -> String {
        // FNV-1a of the key.
        let hash = self.key().bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        format!("{POD_VETH_PREFIX}{:012x}", hash >> 16)
    }
}

/// Why an address could not be handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no free address left in {0} (every usable address is held by an attachment; GC or delete pods)")]
    Exhausted(IpNet),
}

/// The allocations of one node, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    /// Addresses per attachment (`container/ifname`).
    held: BTreeMap<String, Held>,
    /// The last address handed out, per block.
    last: BTreeMap<IpNet, IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Held {
    attachment: Attachment,
    addresses: Vec<IpNet>,
    /// The Kubernetes pod the runtime said this is (CNI_ARGS), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pod: Option<PodRef>,
}

/// A Kubernetes pod by namespace and name (`K8S_POD_NAMESPACE`,
/// `K8S_POD_NAME` in CNI_ARGS): meshd programs NetworkPolicy for a pod
/// from its attachment, before the API reports its addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What every pod veth's node-side name starts with (`wp` + 12 hex
/// digits): NetworkPolicy tells traffic from and to pods by it.
pub const POD_VETH_PREFIX: &str = "wp";

/// The address a block's pods use as their gateway (the node's side).
pub fn gateway(block: &IpNet) -> IpAddr {
    address_from_bits(block, address_bits(block.network()) + 1)
}

/// Host addresses of `block` that may be handed out: all but the network
/// address, the gateway and (IPv4) the broadcast address. At most 2^64.
fn usable(block: &IpNet) -> (u128, u128) {
    let host_bits = u32::from(block.max_prefix_len() - block.prefix_len()).min(64);
    let size = 1u128 << host_bits;
    let first = address_bits(block.network()) + 2;
    let count = match block {
        IpNet::V4(_) => size.saturating_sub(3),
        IpNet::V6(_) => size.saturating_sub(2),
    };
    (first, count)
}

impl Allocations {
    /// The addresses `attachment` holds, if any.
    pub fn get(&self, attachment: &Attachment) -> Option<&[IpNet]> {
        self.held
            .get(&attachment.key())
            .map(|h| h.addresses.as_slice())
    }

    /// Every attachment holding addresses.
    pub fn attachments(&self) -> impl Iterator<Item = &Attachment> {
        self.held.values().map(|h| &h.attachment)
    }

    /// Every attachment with the pod the runtime said it is, if it did.
    pub fn holders(&self) -> impl Iterator<Item = (&Attachment, Option<&PodRef>)> {
        self.held.values().map(|h| (&h.attachment, h.pod.as_ref()))
    }

    /// Every attached pod the runtime named, with its addresses.
    pub fn pods(&self) -> impl Iterator<Item = (&PodRef, &[IpNet])> {
        self.held
            .values()
            .filter_map(|h| Some((h.pod.as_ref()?, h.addresses.as_slice())))
    }

    /// One address per block for `attachment`, or the ones it already holds.
    pub fn allocate(
        &mut self,
        attachment: &Attachment,
        blocks: &[IpNet],
        pod: Option<&PodRef>,
    ) -> Result<Vec<IpNet>, AllocError> {
        if let Some(held) = self.get(attachment) {
            return Ok(held.to_vec());
        }
        let taken: BTreeSet<IpAddr> = self
            .held
            .values()
            .flat_map(|h| h.addresses.iter().map(IpNet::addr))
            .collect();
        let mut addresses = Vec::with_capacity(blocks.len());
        for block in blocks {
            let (first, count) = usable(block);
            let start = self
                .last
                .get(block)
                .map(|a| address_bits(*a))
                .filter(|b| (first..first + count).contains(b))
                .map_or(0, |b| b - first + 1);
            // Within as many steps as there are taken addresses (plus one),
            // a free one turns up — or the block is full.
            let steps = count.min(taken.len() as u128 + 1);
            let found = (0..steps)
                .map(|i| address_from_bits(block, first + (start + i) % count.max(1)))
                .find(|a| !taken.contains(a))
                .ok_or(AllocError::Exhausted(*block))?;
            addresses.push(IpNet::new(found, block.prefix_len()).expect("a block's own prefix"));
        }
        for (block, addr) in blocks.iter().zip(&addresses) {
            self.last.insert(*block, addr.addr());
        }
        self.held.insert(
            attachment.key(),
            Held {
                attachment: attachment.clone(),
                addresses: addresses.clone(),
                pod: pod.cloned(),
            },
        );
        Ok(addresses)
    }

    /// Frees what `attachment` holds; false if it held nothing.
    pub fn release(&mut self, attachment: &Attachment) -> bool {
        self.held.remove(&attachment.key()).is_some()
    }

    /// Frees every attachment not in `live`; returns the freed ones.
    pub fn gc(&mut self, live: &BTreeSet<Attachment>) -> Vec<Attachment> {
        let dead: Vec<Attachment> = self
            .attachments()
            .filter(|a| !live.contains(a))
            .cloned()
            .collect();
        for a in &dead {
            self.release(a);
        }
        dead
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn att(i: u32) -> Attachment {
        Attachment {
            container_id: format!("c{i}"),
            ifname: "eth0".into(),
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn host_veth_names_are_short_stable_and_distinct() {
        let b = Attachment {
            ifname: "net1".into(),
            ..att(1)
        };
        assert_eq!(att(1).host_veth(), att(1).clone().host_veth());
        assert_ne!(att(1).host_veth(), b.host_veth());
        assert!(att(1).host_veth().starts_with(POD_VETH_PREFIX));
        assert_eq!(att(1).host_veth().len(), 14);
    }

    #[test]
    fn dual_stack_idempotent_and_reserved() {
        let blocks = [net("198.19.1.0/24"), net("fd98:19:0:1::/64")];
        let mut a = Allocations::default();
        let first = a.allocate(&att(1), &blocks, None).unwrap();
        assert_eq!(first, vec![net("198.19.1.2/24"), net("fd98:19:0:1::2/64")]);
        assert_eq!(
            a.allocate(&att(1), &blocks, None).unwrap(),
            first,
            "ADD is idempotent"
        );
        assert_eq!(gateway(&blocks[0]).to_string(), "198.19.1.1");
        assert_eq!(
            a.allocate(&att(2), &blocks, None).unwrap()[0],
            net("198.19.1.3/24")
        );
    }

    #[test]
    fn exhaustion_names_the_block_and_round_robin_skips_freed() {
        let block = [net("198.19.1.0/29")]; // .2 .. .6 usable
        let mut a = Allocations::default();
        for i in 0..5 {
            a.allocate(&att(i), &block, None).unwrap();
        }
        let err = a.allocate(&att(9), &block, None).unwrap_err();
        assert_eq!(err, AllocError::Exhausted(block[0]));
        assert!(err.to_string().contains("198.19.1.0/29"));
        assert!(a.release(&att(1)));
        assert!(!a.release(&att(1)));
        // The only free address is the one just freed: it is used (not skipped forever).
        assert_eq!(
            a.allocate(&att(9), &block, None).unwrap(),
            vec![net("198.19.1.3/29")]
        );
        a.release(&att(9));
        a.release(&att(4));
        // With a choice, the next after the last handed out comes first.
        assert_eq!(
            a.allocate(&att(10), &block, None).unwrap(),
            vec![net("198.19.1.6/29")]
        );
    }

    #[test]
    fn gc_frees_all_but_the_live() {
        let block = [net("198.19.1.0/24")];
        let mut a = Allocations::default();
        for i in 0..4 {
            a.allocate(&att(i), &block, None).unwrap();
        }
        let live = BTreeSet::from([att(1), att(3)]);
        assert_eq!(a.gc(&live), vec![att(0), att(2)]);
        assert_eq!(a.attachments().cloned().collect::<BTreeSet<_>>(), live);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(u32),
        Release(u32),
        Gc(Vec<u32>),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(
            prop_oneof![
                4 => (0u32..20).prop_map(Op::Allocate),
                2 => (0u32..20).prop_map(Op::Release),
                1 => proptest::collection::vec(0u32..20, 0..10).prop_map(Op::Gc),
            ],
            0..120,
        )
    }

    proptest! {
        #[test]
        fn no_address_is_ever_held_twice(ops in ops()) {
            let blocks = [net("198.19.7.0/28"), net("fd98:19:0:7::/124")]; // 13 and 14 usable
            let mut a = Allocations::default();
            for op in ops {
                match op {
                    Op::Allocate(i) => {
                        let before = a.get(&att(i)).map(<[IpNet]>::to_vec);
                        match a.allocate(&att(i), &blocks, None) {
                            Ok(got) => {
                                if let Some(b) = before { prop_assert_eq!(got.clone(), b); }
                                for (addr, block) in got.iter().zip(&blocks) {
                                    prop_assert!(block.contains(&addr.addr()));
                                    prop_assert!(addr.addr() != block.network() && addr.addr() != gateway(block));
                                    prop_assert!(matches!(block, IpNet::V6(_)) || addr.addr() != block.broadcast());
                                }
                            }
                            Err(AllocError::Exhausted(b)) => {
                                let held = a.attachments().count() as u128;
                                prop_assert!(held >= usable(&b).1, "exhausted with only {} held", held);
                            }
                        }
                    }
                    Op::Release(i) => { a.release(&att(i)); }
                    Op::Gc(live) => { a.gc(&live.into_iter().map(att).collect()); }
                }
                let all: Vec<IpAddr> = a.held.values().flat_map(|h| h.addresses.iter().map(IpNet::addr)).collect();
                let distinct: BTreeSet<&IpAddr> = all.iter().collect();
                prop_assert_eq!(all.len(), distinct.len(), "an address is held twice");
            }
        }
    }
}
