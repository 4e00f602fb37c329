//! Pods reach the world: their traffic to anything outside the cluster's
//! pod and mesh ranges (and a configurable list that must see pod
//! addresses, `--non-masquerade-cidr`) leaves masqueraded to the node's
//! address, as with every CNI — else it leaves with a pod address nothing
//! outside routes back. Its own nftables table (`inet weft_egress`), so it
//! holds with NetworkPolicy on or off, replaced whole in one transaction.

use ipnet::IpNet;
use serde_json::{json, Value};

use crate::model::ClusterRanges;
use crate::nft::Pending;

/// The table's name.
pub const TABLE: &str = "weft_egress";

/// The table, replacing any earlier one: a postrouting NAT chain that
/// masquerades what the cluster's pod ranges send to anything but `keep`
/// (the cluster's pod and mesh ranges and `extra`), unless it goes
/// through the WireGuard interface `mesh` (to another node's host address:
/// the node answers the pod's own address back through the mesh).
pub fn ruleset(ranges: &ClusterRanges, extra: &[IpNet], mesh: &str) -> Value {
    let table = json!({"family": "inet", "name": TABLE});
    let mut commands = vec![
        json!({"add": {"table": table}}),
        json!({"delete": {"table": table}}),
        json!({"add": {"table": table}}),
        json!({"add": {"chain": {
            "family": "inet", "table": TABLE, "name": "postrouting",
            "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"
        }}}),
    ];
    for pods in ranges.pods.iter() {
        let (protocol, kind, set) = match pods {
            IpNet::V4(_) => ("ip", "ipv4_addr", "keep4"),
            IpNet::V6(_) => ("ip6", "ipv6_addr", "keep6"),
        };
        let same_family = |n: &&IpNet| n.addr().is_ipv4() == pods.addr().is_ipv4();
        let keep: Vec<Value> = ranges
            .all()
            .chain(extra.iter().copied())
            .filter(|n| same_family(&n))
            .map(|n| prefix(&n))
            .collect();
        commands.push(json!({"add": {"set": {
            "family": "inet", "table": TABLE, "name": set, "type": kind,
            "flags": ["interval"], "auto-merge": true, "elem": keep
        }}}));
        commands.push(json!({"add": {"rule": {
            "family": "inet", "table": TABLE, "chain": "postrouting",
            "comment": "pods to the world: masqueraded",
            "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": protocol, "field": "saddr"}}, "right": prefix(&pods)}},
                {"match": {"op": "!=", "left": {"payload": {"protocol": protocol, "field": "daddr"}}, "right": format!("@{set}")}},
                {"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": mesh}},
                {"masquerade": null}
            ]
        }}}));
    }
    json!({"nftables": commands})
}

/// Removes the table, if it is there (`--masquerade=false`, uninstall).
pub fn removal() -> Value {
    crate::nft::table_removal(TABLE)
}

fn prefix(net: &IpNet) -> Value {
    json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}})
}

/// The change `--masquerade` asks for, applied until it is in place (a
/// node without `nft` keeps its mesh, logs why once, and tries again on
/// every pass).
pub fn pending(masquerade: bool, ranges: &ClusterRanges, extra: &[IpNet], mesh: &str) -> Pending {
    let (ruleset, what) = match masquerade {
        true => (
            ruleset(ranges, extra, mesh),
            "installing the egress masquerade",
        ),
        false => (removal(), "removing the egress masquerade"),
    };
    Pending::new(
        ruleset,
        what,
        "pods cannot reach beyond the cluster (--masquerade=false runs without nft)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(v: &Value) -> Vec<Value> {
        v["nftables"].as_array().unwrap().clone()
    }

    /// One masquerade rule per pod range, sparing every cluster range, the
    /// extra list of its family and the mesh interface; the table replaced
    /// whole.
    #[test]
    fn pods_are_masqueraded_to_anything_but_the_cluster_and_the_list() {
        let extra: Vec<IpNet> = vec!["10.96.0.0/12".parse().unwrap()];
        let r = ruleset(&ClusterRanges::lab(), &extra, "weft0");
        let c = commands(&r);
        assert_eq!(c[0]["add"]["table"]["name"], TABLE);
        assert_eq!(c[1]["delete"]["table"]["name"], TABLE, "replaced whole");
        let sets: Vec<&Value> = c.iter().filter_map(|x| x["add"].get("set")).collect();
        assert_eq!(sets.len(), 2);
        let v4: Vec<String> = sets[0]["elem"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{}/{}",
                    e["prefix"]["addr"].as_str().unwrap(),
                    e["prefix"]["len"]
                )
            })
            .collect();
        assert_eq!(
            v4,
            [
                "198.19.0.0/16",
                "198.18.128.0/17",
                "100.65.0.0/16",
                "10.96.0.0/12"
            ]
        );
        let v6 = sets[1]["elem"].as_array().unwrap();
        assert_eq!(v6.len(), 3, "the IPv4 extra is not an IPv6 element");
        let rules: Vec<&Value> = c.iter().filter_map(|x| x["add"].get("rule")).collect();
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[0]["expr"][0]["match"]["right"]["prefix"]["addr"],
            "198.19.0.0"
        );
        assert_eq!(rules[0]["expr"][1]["match"]["right"], "@keep4");
        assert_eq!(
            rules[0]["expr"][2]["match"]["right"], "weft0",
            "what goes through the mesh keeps the pod's address"
        );
        assert!(rules[0]["expr"][3].get("masquerade").is_some());
        assert_eq!(
            rules[1]["expr"][0]["match"]["left"]["payload"]["protocol"],
            "ip6"
        );
    }

    #[test]
    fn an_ipv4_only_cluster_has_no_ipv6_rule() {
        let mut ranges = ClusterRanges::lab();
        ranges.pods.v6 = None;
        let c = commands(&ruleset(&ranges, &[], "weft0"));
        assert_eq!(
            c.iter().filter(|x| x["add"].get("rule").is_some()).count(),
            1
        );
        assert_eq!(commands(&removal()).len(), 2);
    }
}
