//! Cluster addresses come in only from where they can come from. A packet
//! with a source in the cluster's pod or mesh ranges is accepted only from
//! the WireGuard interface (decrypted: cryptokey routing checked its
//! source) or from a pod veth whose route back to that source is that veth
//! (the pod's own address), and this is checked first (prerouting,
//! priority -300: before conntrack, IPVS and every filter). Otherwise a
//! host on the underlay could send plaintext packets as another node's
//! pods, past NetworkPolicy's peer checks and a host firewall's openings,
//! and a pod could pose as a neighbour, or as the node, to IPVS's Services.
//! Its own table, installed at start after the backstops and kept with
//! NetworkPolicy on or off.

use ipnet::IpNet;
use serde_json::{json, Value};
use weft_ipam::POD_VETH_PREFIX;

use crate::model::ClusterRanges;

/// The table's name.
pub const TABLE: &str = "weft_guard";

/// The table, replacing any earlier one; `mesh` is the WireGuard interface.
pub fn ruleset(ranges: &ClusterRanges, mesh: &str) -> Value {
    let table = json!({"family": "inet", "name": TABLE});
    let rule = |comment: &str, expr: Vec<Value>| json!({"add": {"rule": {"family": "inet", "table": TABLE, "chain": "prerouting", "comment": comment, "expr": expr}}});
    let iifname = |name: &str| json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": name}});
    let pod_veth = format!("{POD_VETH_PREFIX}*");
    let mut commands = vec![
        json!({"add": {"table": table}}),
        json!({"delete": {"table": table}}),
        json!({"add": {"table": table}}),
        json!({"add": {"chain": {
            "family": "inet", "table": TABLE, "name": "prerouting",
            "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"
        }}}),
        // Neighbour discovery on the link (link-local sources the node end,
        // which has no link-local address, has no route back to).
        rule(
            "neighbour discovery",
            vec![
                iifname(&pod_veth),
                json!({"match": {"op": "==", "left": {"payload": {"protocol": "icmpv6", "field": "type"}},
                             "right": {"set": ["nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit"]}}}),
                json!({"accept": null}),
            ],
        ),
        rule(
            "a pod sends only from its own addresses",
            vec![
                iifname(&pod_veth),
                json!({"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, "right": false}}),
                json!({"counter": null}),
                json!({"drop": null}),
            ],
        ),
        rule(
            "from a pod",
            vec![iifname(&pod_veth), json!({"accept": null})],
        ),
        rule("decrypted", vec![iifname(mesh), json!({"accept": null})]),
        rule(
            "the node's own",
            vec![iifname("lo"), json!({"accept": null})],
        ),
    ];
    for net in ranges.all() {
        let protocol = match net {
            IpNet::V4(_) => "ip",
            IpNet::V6(_) => "ip6",
        };
        commands.push(rule(
            "a cluster address from anywhere else: forged",
            vec![
                json!({"match": {"op": "==", "left": {"payload": {"protocol": protocol, "field": "saddr"}},
                                 "right": {"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}}}}),
                json!({"counter": null}),
                json!({"drop": null}),
            ],
        ));
    }
    json!({"nftables": commands})
}

/// Removes the table, if it is there (uninstall).
pub fn removal() -> Value {
    crate::nft::table_removal(TABLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order is the guarantee: pods' spoofing dropped before pods are
    /// let through, then the mesh and the node, and every cluster range
    /// from anywhere else dropped.
    #[test]
    fn cluster_sources_only_from_pods_and_the_mesh() {
        let r = ruleset(&ClusterRanges::lab(), "weft0");
        let comments: Vec<&str> = r["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"]["rule"]["comment"].as_str())
            .collect();
        assert_eq!(
            comments,
            [
                "neighbour discovery",
                "a pod sends only from its own addresses",
                "from a pod",
                "decrypted",
                "the node's own",
                "a cluster address from anywhere else: forged",
                "a cluster address from anywhere else: forged",
                "a cluster address from anywhere else: forged",
                "a cluster address from anywhere else: forged",
                "a cluster address from anywhere else: forged",
                "a cluster address from anywhere else: forged",
            ]
        );
        let chain = &r["nftables"][3]["add"]["chain"];
        assert_eq!(
            (chain["hook"].as_str(), chain["prio"].as_i64()),
            (Some("prerouting"), Some(-300))
        );
    }
}
