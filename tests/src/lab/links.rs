//! `meshlab link cut A B` / `link restore A B`: the underlay between two
//! nodes dropped both ways on the fabric bridge, as a firewall between two
//! clouds or a failed link would; every other pair, and ARP, is untouched.
//! One nftables bridge table in the fabric namespace holds every cut; it is
//! replaced whole on each change, from the cuts recorded in the lab state.

use std::collections::BTreeSet;

use anyhow::{ensure, Result};

use super::netns::nft;
use super::state::LabState;
use super::topology::NodePlan;

const TABLE: &str = "meshlab_links";

/// A cut between two nodes, by name, in canonical order.
pub type Cut = (String, String);

/// The cut between `a` and `b`: both must be lab nodes, and different.
pub fn cut(state: &LabState, a: &str, b: &str) -> Result<Cut> {
    for n in [a, b] {
        state.node_index(n)?;
    }
    ensure!(a != b, "a link joins two different nodes (got {a} twice)");
    Ok(if a < b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    })
}

/// The tables for `cuts` (pure): IP between the two nodes' addresses
/// (underlay, and LAN on a `lan` site) dropped both ways, where a bridge
/// forwards it (nodes on one segment) and where the fabric routes it
/// (nodes on two sites).
fn ruleset(nodes: &[NodePlan], cuts: &BTreeSet<Cut>) -> String {
    let addrs = |name: &str| -> Vec<std::net::Ipv4Addr> {
        nodes
            .iter()
            .filter(|n| n.name == name)
            .flat_map(|n| std::iter::once(n.underlay).chain(n.lan))
            .collect()
    };
    let mut rules = String::new();
    for (a, b) in cuts {
        for a in addrs(a) {
            for b in addrs(b) {
                for (from, to) in [(a, b), (b, a)] {
                    rules.push_str(&format!("    ip saddr {from} ip daddr {to} drop\n"));
                }
            }
        }
    }
    // `add` then `delete` then the table: replaced whole in one transaction,
    // whether or not it existed.
    ["bridge", "ip"]
        .map(|family| {
            format!(
                "add table {family} {TABLE}\ndelete table {family} {TABLE}\ntable {family} {TABLE} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n{rules}  }}\n}}\n"
            )
        })
        .concat()
}

/// Makes the fabric drop exactly the lab state's cuts.
pub fn apply(state: &LabState) -> Result<()> {
    let rules = ruleset(&state.plan.nodes, &state.cuts);
    nft(&state.plan.fabric_netns, &["-f", "-"], Some(&rules)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cut_drops_both_directions_and_nothing_else() {
        let node = |k: u8| NodePlan {
            name: format!("node-{k}"),
            netns: String::new(),
            interface: String::new(),
            fabric_interface: String::new(),
            wg_interface: String::new(),
            dataplane: None,
            underlay: std::net::Ipv4Addr::new(198, 18, 1, k),
            pod_cidrs: vec![],
            labels: Default::default(),
            annotations: Default::default(),
            site: None,
            nat: Default::default(),
            lan: (k == 2).then(|| std::net::Ipv4Addr::new(10, 77, 0, 2)),
        };
        let nodes = [node(1), node(2), node(3)];
        let cuts = BTreeSet::from([("node-1".to_string(), "node-3".to_string())]);
        let rules = ruleset(&nodes, &cuts);
        assert!(rules.contains("ip saddr 198.18.1.1 ip daddr 198.18.1.3 drop"));
        assert!(rules.contains("ip saddr 198.18.1.3 ip daddr 198.18.1.1 drop"));
        assert_eq!(rules.matches(" drop").count(), 4, "bridged and routed");
        // A node with a LAN address is cut on it too.
        let cuts = BTreeSet::from([("node-1".to_string(), "node-2".to_string())]);
        let rules = ruleset(&nodes, &cuts);
        assert!(rules.contains("ip saddr 10.77.0.2 ip daddr 198.18.1.1 drop"));
        assert_eq!(rules.matches(" drop").count(), 8);
        assert!(
            rules.contains("table ip meshlab_links")
                && rules.contains("table bridge meshlab_links")
        );
        assert_eq!(
            ruleset(&nodes, &BTreeSet::new()).matches(" drop").count(),
            0
        );
    }
}
