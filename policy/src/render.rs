//! A compiled [`Program`] as an nftables ruleset (libnftables JSON), applied
//! in one transaction.
//!
//! ```text
//! table inet weft_policy
//!   chain forward    hook forward; ct state established,related accept
//!                    ip saddr vmap @egress4 ; ip6 saddr vmap @egress6
//!                    ip daddr vmap @ingress4; ip6 daddr vmap @ingress6
//!   map egress4      local pod address : jump e<n>   (isolated pods only)
//!   chain e<n>       <allow entries> return ; counter drop
//!   chain i<n>       <allow entries> accept ; counter drop
//! ```
//!
//! A packet reaches at most one pod chain per direction through a map
//! lookup, so the number of policies and pods does not lengthen the path of
//! anyone else's packets. Egress chains `return` on a match so the
//! destination's ingress check still runs (`accept` would end the hook).
//! Traffic from the node itself to its pods does not cross `forward`, so
//! kubelet probes pass, as upstream expects.

use ipnet::IpNet;
use serde_json::{json, Value};

use crate::compile::{Allow, Gate, Program};
use crate::model::Protocol;

pub const TABLE: &str = "weft_policy";

fn payload(family_v4: bool, field: &str) -> Value {
    json!({"payload": {"protocol": if family_v4 { "ip" } else { "ip6" }, "field": field}})
}

fn prefix(net: &IpNet) -> Value {
    json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}})
}

/// One allow entry as a rule body; `peer_field` is `saddr` for ingress
/// (the peer is the source) and `daddr` for egress.
fn allow_rule(allow: &Allow, peer_field: &str, verdict: &str) -> Value {
    let v4 = allow.peer.addr().is_ipv4();
    let mut expr = vec![
        json!({"match": {"op": "==", "left": payload(v4, peer_field), "right": prefix(&allow.peer)}}),
    ];
    if !allow.except.is_empty() {
        let set: Vec<Value> = allow.except.iter().map(prefix).collect();
        expr.push(
            json!({"match": {"op": "!=", "left": payload(v4, peer_field), "right": {"set": set}}}),
        );
    }
    if let Some(protocol) = allow.protocol {
        let name = match protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        };
        expr.push(
            json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": name}}),
        );
        if let Some((lo, hi)) = allow.ports {
            let right = if lo == hi {
                json!(lo)
            } else {
                json!({"range": [lo, hi]})
            };
            expr.push(json!({"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": right}}));
        }
    }
    expr.push(json!({verdict: null}));
    Value::Array(expr)
}

/// The ruleset replacing the table atomically: creating then deleting the
/// table in the same transaction clears whatever was there.
pub fn render(program: &Program) -> Value {
    let mut cmds = vec![
        json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
        json!({"delete": {"table": {"family": "inet", "name": TABLE}}}),
        json!({"add": {"table": {"family": "inet", "name": TABLE}}}),
        json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}}),
    ];
    let rule = |chain: &str, expr: Value| json!({"add": {"rule": {"family": "inet", "table": TABLE, "chain": chain, "expr": expr}}});
    let mut maps: [(&str, bool, &str, Vec<Value>); 4] = [
        ("egress4", true, "saddr", Vec::new()),
        ("egress6", false, "saddr", Vec::new()),
        ("ingress4", true, "daddr", Vec::new()),
        ("ingress6", false, "daddr", Vec::new()),
    ];
    let mut chains = Vec::new();
    for (n, pod) in program.pods.iter().enumerate() {
        for (gate, chain, peer_field, verdict, maps_at) in [
            (&pod.egress, format!("e{n}"), "daddr", "return", 0),
            (&pod.ingress, format!("i{n}"), "saddr", "accept", 2),
        ] {
            let Gate::Isolated { allows, .. } = gate else {
                continue;
            };
            chains
                .push(json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": chain}}}));
            for allow in allows {
                chains.push(rule(&chain, allow_rule(allow, peer_field, verdict)));
            }
            chains.push(rule(&chain, json!([{"counter": null}, {"drop": null}])));
            for ip in &pod.ips {
                let map = if ip.is_ipv4() { maps_at } else { maps_at + 1 };
                maps[map]
                    .3
                    .push(json!([ip.to_string(), {"jump": {"target": chain}}]));
            }
        }
    }
    // Chains first: map elements jump to them.
    cmds.extend(chains);
    for (name, v4, _, elems) in &maps {
        let mut map = json!({"family": "inet", "table": TABLE, "name": name, "type": if *v4 { "ipv4_addr" } else { "ipv6_addr" }, "map": "verdict"});
        if !elems.is_empty() {
            map["elem"] = Value::Array(elems.clone());
        }
        cmds.push(json!({"add": {"map": map}}));
    }
    cmds.push(rule("forward", json!([{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}])));
    for (name, v4, field, _) in &maps {
        cmds.push(rule(
            "forward",
            json!([{"vmap": {"key": payload(*v4, field), "data": format!("@{name}")}}]),
        ));
    }
    json!({"nftables": cmds})
}

/// Applies a rendered ruleset with `nft -j -f -` in the calling process's
/// network namespace (one transaction, never a command per rule).
/// (The crate's typed schema has no verdict maps, so the JSON goes raw.)
pub fn apply(ruleset: &Value) -> Result<(), String> {
    nftables::helper::apply_ruleset_raw(
        &ruleset.to_string(),
        nftables::helper::DEFAULT_NFT,
        nftables::helper::DEFAULT_ARGS,
    )
    .map(drop)
    .map_err(|e| format!("applying the policy ruleset: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Direction, RuleRef};

    #[test]
    fn allow_entries_become_matches() {
        let rule = RuleRef {
            namespace: "x".into(),
            policy: "p".into(),
            direction: Direction::Ingress,
            index: 0,
        };
        let allow = Allow {
            peer: "198.19.0.0/16".parse().unwrap(),
            except: vec!["198.19.2.0/24".parse().unwrap()],
            protocol: Some(Protocol::Tcp),
            ports: Some((80, 81)),
            rule,
        };
        let r = allow_rule(&allow, "saddr", "accept");
        assert_eq!(r[0]["match"]["right"]["prefix"]["len"], 16);
        assert_eq!(r[1]["match"]["op"], "!=");
        assert_eq!(r[2]["match"]["right"], "tcp");
        assert_eq!(r[3]["match"]["right"]["range"], json!([80, 81]));
        assert!(r[4].get("accept").is_some());
    }
}
