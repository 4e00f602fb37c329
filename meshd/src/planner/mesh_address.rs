//! A node's mesh address is assigned, not claimed: the mesh range holds
//! one address for every pod block the cluster range can hold, and a node's
//! mesh address of a family is the one of a pod block the control plane
//! gave it. Blocks never overlap, so neither do mesh addresses: no node can
//! claim another's address, and none ever gives its own up because another
//! claims it. The address also stays put across restarts and cluster
//! changes (it moves only with the block).
//!
//! The numbering: a block's offset in the cluster range, shifted right
//! until every offset fits in the lower half of the mesh range, past the
//! network address (so never the network or broadcast address). Two blocks
//! of at least 2^shift addresses differ above the shift, so their addresses
//! differ; a smaller block is refused ([`smallest_block`]).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::ClusterRanges;

fn bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn host_bits(net: IpNet) -> u32 {
    u32::from(net.max_prefix_len() - net.prefix_len())
}

/// How far offsets in `pods` are shifted to fit the mesh range's lower half.
fn shift(pods: IpNet, mesh: IpNet) -> u32 {
    (host_bits(pods) + 1).saturating_sub(host_bits(mesh))
}

/// The longest prefix a block in `pods` may have to get a mesh address of
/// its own in `mesh`.
pub fn smallest_block(pods: IpNet, mesh: IpNet) -> u8 {
    let shift = shift(pods, mesh).min(u32::from(pods.max_prefix_len()));
    pods.max_prefix_len() - shift as u8
}

/// The mesh address of `block`: `None` if no cluster or mesh range of its
/// family holds it, or it is smaller than [`smallest_block`].
pub fn mesh_address_of(ranges: &ClusterRanges, block: &IpNet) -> Option<IpAddr> {
    let pods = ranges.pods.holding(block)?;
    let mesh = ranges.mesh.of_family(block)?;
    if block.prefix_len() > smallest_block(pods, mesh) || host_bits(mesh) < 2 {
        return None;
    }
    let offset = bits(block.network()) - bits(pods.network());
    let slot = offset.checked_shr(shift(pods, mesh)).unwrap_or(0);
    let b = bits(mesh.network()) + 1 + slot;
    Some(match mesh {
        IpNet::V4(_) => IpAddr::from((b as u32).to_be_bytes()),
        IpNet::V6(_) => IpAddr::from(b.to_be_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_block_has_its_own_address_in_the_lab_ranges() {
        let r = ClusterRanges::lab();
        let of = |b: &str| mesh_address_of(&r, &net(b));
        // 198.19.0.0/16 into 198.18.128.0/17: offsets shift by 2.
        assert_eq!(of("198.19.0.0/24"), Some(ip("198.18.128.1")));
        assert_eq!(of("198.19.1.0/24"), Some(ip("198.18.128.65")));
        assert_eq!(of("198.19.255.0/24"), Some(ip("198.18.191.193")));
        assert_eq!(of("198.19.0.4/30"), Some(ip("198.18.128.2")));
        // fd98:19::/48 into fd98:18::/64.
        assert_eq!(of("fd98:19:0:1::/64"), Some(ip("fd98:18::8000:0:1")));
        assert_eq!(smallest_block(r.pods.v4.into(), r.mesh.v4.into()), 30);
        assert_eq!(of("198.19.0.0/31"), None, "too small to number");
        assert_eq!(of("10.0.0.0/24"), None, "outside the cluster range");
    }

    #[test]
    fn a_mesh_range_larger_than_the_cluster_range_numbers_every_address() {
        let mut r = ClusterRanges::lab();
        r.pods.v4 = "10.0.0.0/24".parse().unwrap();
        assert_eq!(smallest_block(r.pods.v4.into(), r.mesh.v4.into()), 32);
        assert_eq!(
            mesh_address_of(&r, &net("10.0.0.255/32")),
            Some(ip("198.18.129.0"))
        );
    }

    proptest! {
        /// Blocks that do not overlap get different addresses, each a usable
        /// host of the mesh range: whatever the ranges' sizes.
        #[test]
        fn blocks_that_do_not_overlap_never_share_an_address(
            pods_len in 8u8..=24, mesh_len in 8u8..=30, extra in 0u8..=8,
            a in any::<u32>(), b in any::<u32>(),
        ) {
            let mut r = ClusterRanges::lab();
            r.pods.v4 = format!("10.0.0.0/{pods_len}").parse().unwrap();
            r.mesh.v4 = format!("172.16.0.0/{mesh_len}").parse::<ipnet::Ipv4Net>().unwrap().trunc();
            let len = (smallest_block(r.pods.v4.into(), r.mesh.v4.into()) - extra).max(pods_len + 1);
            prop_assume!(len <= 32);
            let block = |x: u32| IpNet::new(IpAddr::from((0x0a00_0000 | (x >> pods_len)).to_be_bytes()), len).unwrap().trunc();
            let (a, b) = (block(a), block(b));
            let (ma, mb) = (mesh_address_of(&r, &a).unwrap(), mesh_address_of(&r, &b).unwrap());
            let mesh = IpNet::from(r.mesh.v4);
            prop_assert!(mesh.contains(&ma) && ma != mesh.network() && ma != mesh.broadcast());
            prop_assert_eq!(a == b, ma == mb, "{} {} -> {} {}", a, b, ma, mb);
        }
    }
}
