//! How a node picks its own mesh address in a range: stable across restarts
//! and cluster changes (unlike numbering nodes by sorted position, which
//! renumbers everyone when a node joins), and conflict-free.
//!
//! A node keeps the address it already publishes unless an older node holds
//! it; otherwise it starts at a slot derived from its name and probes upward
//! past every address another node claims.

use std::net::IpAddr;

use ipnet::IpNet;

/// FNV-1a: a stable hash (the standard library's may change between
/// releases, and a node's slot must not move when meshd is upgraded).
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Usable host slots: not the network address, nor the IPv4 broadcast.
/// Capped at 2^64 (more than any cluster will probe).
fn slots(range: &IpNet) -> u128 {
    let host_bits = u32::from(range.max_prefix_len() - range.prefix_len()).min(64);
    let size = 1u128 << host_bits;
    match range {
        IpNet::V4(_) => size.saturating_sub(2),
        IpNet::V6(_) => size - 1,
    }
}

fn slot_address(range: &IpNet, slot: u128) -> IpAddr {
    let b = bits(range.network()) + 1 + slot;
    match range {
        IpNet::V4(_) => IpAddr::from((b as u32).to_be_bytes()),
        IpNet::V6(_) => IpAddr::from(b.to_be_bytes()),
    }
}

/// Picks an address in `range` for `node`, or `None` if the range is full.
/// - `current`: what the node publishes now, kept if still usable.
/// - `held_by_older`: addresses of nodes that win a conflict against it.
/// - `claimed_by_others`: every address any other node claims (avoided when
///   choosing anew, so two young nodes do not chase each other).
pub fn choose_mesh_address(
    node: &str,
    range: IpNet,
    current: Option<IpAddr>,
    held_by_older: &[IpAddr],
    claimed_by_others: &[IpAddr],
) -> Option<IpAddr> {
    let slots = slots(&range);
    let usable = |a: &IpAddr| {
        range.contains(a)
            && *a != range.network()
            && (matches!(range, IpNet::V6(_)) || *a != range.broadcast())
    };
    if let Some(c) = current.filter(|c| usable(c) && !held_by_older.contains(c)) {
        return Some(c);
    }
    if slots == 0 {
        return None;
    }
    let start = u128::from(stable_hash(node)) % slots;
    // After as many steps as there are claims, a free slot has been found
    // or the range is full.
    (0..=claimed_by_others.len() as u128)
        .take(slots as usize)
        .map(|i| slot_address(&range, (start + i) % slots))
        .find(|a| !claimed_by_others.contains(a))
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
    fn keeps_its_address_unless_an_older_node_holds_it() {
        let range = net("198.18.128.0/17");
        let mine = ip("198.18.130.7");
        assert_eq!(
            choose_mesh_address("n1", range, Some(mine), &[], &[mine]),
            Some(mine)
        );
        let moved = choose_mesh_address("n1", range, Some(mine), &[mine], &[mine]).unwrap();
        assert!(moved != mine && range.contains(&moved));
        let outside = ip("10.0.0.1");
        assert_ne!(
            choose_mesh_address("n1", range, Some(outside), &[], &[]),
            Some(outside)
        );
    }

    #[test]
    fn stable_for_a_name_and_never_network_or_broadcast() {
        let range = net("198.18.128.0/17");
        assert_eq!(
            choose_mesh_address("node-1", range, None, &[], &[]),
            choose_mesh_address("node-1", range, None, &[], &[])
        );
        let tiny = net("198.18.128.0/30");
        for name in ["a", "b", "c", "d", "e"] {
            let a = choose_mesh_address(name, tiny, None, &[], &[]).unwrap();
            assert!(a == ip("198.18.128.1") || a == ip("198.18.128.2"), "{a}");
        }
        let full = [ip("198.18.128.1"), ip("198.18.128.2")];
        assert_eq!(choose_mesh_address("x", tiny, None, &[], &full), None);
        let v6 = net("fd98:18::/64");
        let a = choose_mesh_address("node-1", v6, None, &[], &[]).unwrap();
        assert!(v6.contains(&a) && a != v6.network());
    }

    proptest! {
        #[test]
        fn never_picks_what_others_claim(name in "[a-z0-9-]{1,20}", claimed in proptest::collection::vec(0u32..32, 0..40)) {
            let range = net("198.18.128.0/27");
            let claimed: Vec<IpAddr> = claimed.iter().map(|i| IpAddr::from((0xc612_8000u32 + i).to_be_bytes())).collect();
            match choose_mesh_address(&name, range, None, &[], &claimed) {
                Some(a) => {
                    prop_assert!(!claimed.contains(&a));
                    prop_assert!(range.contains(&a) && a != range.network() && a != range.broadcast());
                }
                None => prop_assert!(range.hosts().all(|h| claimed.contains(&h))),
            }
        }
    }
}
