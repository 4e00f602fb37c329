//! Address sets as disjoint prefixes: what an nftables interval set holds
//! (it refuses overlapping elements), so an ipBlock's `except` is carved
//! out here rather than matched as a second condition.

use ipnet::IpNet;

/// `net` without every address of `excepts`, as disjoint prefixes.
pub fn subtract(net: IpNet, excepts: &[IpNet]) -> Vec<IpNet> {
    let overlapping: Vec<&IpNet> = excepts
        .iter()
        .filter(|e| e.contains(&net.network()) || net.contains(&e.network()))
        .collect();
    if overlapping.is_empty() {
        return vec![net];
    }
    if overlapping.iter().any(|e| e.contains(&net)) {
        return Vec::new();
    }
    // Every overlapping except lies strictly inside `net`: split it.
    let halves = net
        .subnets(net.prefix_len() + 1)
        .expect("a strictly larger prefix than an except inside it");
    halves.flat_map(|half| subtract(half, excepts)).collect()
}

/// The union of `nets` as sorted, disjoint prefixes: any prefix inside
/// another is dropped (prefixes either nest or are disjoint).
pub fn union(mut nets: Vec<IpNet>) -> Vec<IpNet> {
    nets.iter_mut().for_each(|n| *n = n.trunc());
    nets.sort_by(|a, b| {
        (a.addr().is_ipv6(), a.network(), a.prefix_len()).cmp(&(
            b.addr().is_ipv6(),
            b.network(),
            b.prefix_len(),
        ))
    });
    let mut out: Vec<IpNet> = Vec::with_capacity(nets.len());
    for net in nets {
        // Sorted by start, then widest first: a container is the last kept.
        if out.last().is_some_and(|kept| kept.contains(&net)) {
            continue;
        }
        out.push(net);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn carves_excepts_out() {
        assert_eq!(
            subtract(net("10.0.0.0/30"), &[net("10.0.0.1/32")]),
            vec![net("10.0.0.0/32"), net("10.0.0.2/31")]
        );
        assert_eq!(subtract(net("10.0.0.0/8"), &[net("0.0.0.0/0")]), vec![]);
        assert_eq!(
            subtract(net("10.0.0.0/8"), &[net("11.0.0.0/8")]),
            vec![net("10.0.0.0/8")]
        );
    }

    #[test]
    fn union_drops_nested_prefixes() {
        assert_eq!(
            union(vec![
                net("10.1.2.3/32"),
                net("10.0.0.0/8"),
                net("::/0"),
                net("fd00::1/128")
            ]),
            vec![net("10.0.0.0/8"), net("::/0")]
        );
    }

    fn v4() -> impl Strategy<Value = IpNet> {
        (any::<u32>(), 0u8..=32).prop_map(|(a, len)| {
            IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), len)
                .unwrap()
                .trunc()
        })
    }

    proptest! {
        /// An address is in the result exactly when it is in some block and
        /// in none of that block's excepts, and the result is disjoint.
        #[test]
        fn subtract_and_union_keep_membership(
            blocks in prop::collection::vec((v4(), prop::collection::vec(v4(), 0..4)), 1..4),
            probes in prop::collection::vec(any::<u32>(), 64),
        ) {
            let nets = union(blocks.iter().flat_map(|(b, ex)| subtract(*b, ex)).collect());
            for w in nets.windows(2) {
                prop_assert!(!w[0].contains(&w[1].network()) && !w[1].contains(&w[0].network()));
            }
            let mut addrs: Vec<IpAddr> = probes.into_iter().map(|a| IpAddr::V4(Ipv4Addr::from(a))).collect();
            for (b, ex) in &blocks {
                addrs.push(b.network());
                addrs.extend(ex.iter().map(IpNet::network));
            }
            for a in addrs {
                let want = blocks.iter().any(|(b, ex)| b.contains(&a) && !ex.iter().any(|e| e.contains(&a)));
                prop_assert_eq!(nets.iter().any(|n| n.contains(&a)), want, "{}", a);
            }
        }
    }
}
