use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::*;
use crate::annotations::fixtures::{self, key};
use crate::annotations::UNREACHABLE;
use crate::model::{ClusterRanges, ClusterSnapshot, Hop, LocalConfig, PeerKind, RouteKind};
use crate::planner::{judge as judge_nodes, plan};

fn object(name: &str, spec: Value) -> WeftPeer {
    WeftPeer {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec,
        status: Value::Null,
    }
}

/// A valid spec: test key `seed`, peer address `.i` in both families.
fn spec(seed: u8, i: u8) -> Value {
    json!({
        "publicKey": key(seed).to_string(),
        "addresses": [format!("100.65.0.{i}"), format!("fd64:77:70::{i}")],
    })
}

fn read(name: &str, spec: Value) -> Result<ExternalPeer, PeerError> {
    parse(&object(name, spec), &ClusterRanges::lab())
}

fn with(mut spec: Value, field: &str, value: Value) -> Value {
    spec[field] = value;
    spec
}

#[test]
fn a_peer_is_read_with_its_defaults() {
    let p = read("laptop", spec(50, 1)).unwrap();
    assert_eq!(p.public_key, key(50));
    assert_eq!(p.addresses.len(), 2);
    assert_eq!(p.endpoint, None);
    assert_eq!(
        p.reach,
        ClusterRanges::lab().pods.iter().collect::<Vec<_>>(),
        "it reaches the pod ranges unless told otherwise"
    );
    assert!(p.gateways.is_empty());
}

#[test]
fn bad_fields_are_rejected_naming_the_field() {
    let cases = [
        (
            with(spec(50, 1), "publicKey", json!("nope")),
            "spec.publicKey",
        ),
        (
            with(spec(50, 1), "endpoint", json!("1.2.3.4")),
            "spec.endpoint",
        ),
        (
            with(spec(50, 1), "endpoint", json!("127.0.0.1:51820")),
            "spec.endpoint",
        ),
        (
            with(spec(50, 1), "endpoint", json!("198.19.1.5:51820")),
            "spec.endpoint",
        ),
        (with(spec(50, 1), "addresses", json!([])), "spec.addresses"),
        (
            with(
                spec(50, 1),
                "addresses",
                json!(["100.65.0.1", "100.65.0.2"]),
            ),
            "spec.addresses",
        ),
        (
            with(spec(50, 1), "addresses", json!(["198.19.1.7"])),
            "spec.addresses 198.19.1.7: outside the peer ranges",
        ),
        (
            with(spec(50, 1), "addresses", json!(["banana"])),
            "spec.addresses",
        ),
        (
            with(spec(50, 1), "reach", json!(["10.0.0.0/8"])),
            "spec.reach",
        ),
        (
            with(spec(50, 1), "reach", json!(["198.19.1.1/24"])),
            "spec.reach",
        ),
        (
            with(spec(50, 1), "gateways", json!(["Node_1"])),
            "spec.gateways",
        ),
        (with(spec(50, 1), "extra", json!(1)), "spec: unknown field"),
        (json!("a string"), "spec:"),
    ];
    for (spec, field) in cases {
        let e = read("p", spec.clone()).expect_err(&spec.to_string());
        assert!(e.to_string().starts_with(field), "{spec}: {e}");
    }
    let ok = with(spec(50, 1), "reach", json!(["198.19.2.0/24"]));
    assert_eq!(
        read("p", ok).unwrap().reach,
        vec!["198.19.2.0/24".parse::<IpNet>().unwrap()]
    );
}

fn three() -> Vec<NodeInfo> {
    (1..=3).map(|i| fixtures::published(i).0).collect()
}

fn snapshot(nodes: Vec<NodeInfo>, peers: &[(&str, Value)]) -> ClusterSnapshot {
    ClusterSnapshot {
        nodes,
        peers: peers
            .iter()
            .map(|(name, spec)| (name.to_string(), read(name, spec.clone())))
            .collect(),
        ..Default::default()
    }
}

fn verdicts(s: &ClusterSnapshot) -> BTreeMap<String, PeerVerdict> {
    let nodes = judge_nodes(s, &ClusterRanges::lab());
    judge(&s.peers, &s.nodes, &nodes, &s.revoked)
}

fn gateway_of(s: &ClusterSnapshot, name: &str) -> Option<String> {
    match &verdicts(s)[name] {
        PeerVerdict::Accepted { gateway, .. } => gateway.clone(),
        PeerVerdict::Rejected(e) => panic!("{name} rejected: {e}"),
    }
}

fn reports(node: &mut NodeInfo, others: &[&str]) {
    node.annotations
        .insert(UNREACHABLE.into(), others.join(","));
}

#[test]
fn the_older_object_keeps_a_shared_key_or_address() {
    // Created at second 10·i: "a" before "b", "d" before "c".
    let aged = |name: &str, at: i64, spec: Value| -> (String, Result<ExternalPeer, PeerError>) {
        let mut o = object(name, spec);
        o.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(at).unwrap(),
        ));
        (name.to_string(), parse(&o, &ClusterRanges::lab()))
    };
    let s = ClusterSnapshot {
        nodes: three(),
        peers: [
            aged("a", 10, spec(50, 1)),
            aged("b", 20, spec(50, 2)),
            aged("c", 40, spec(51, 3)),
            aged(
                "d",
                30,
                with(spec(52, 9), "addresses", json!(["100.65.0.3"])),
            ),
            aged("e", 50, spec(53, 5)),
            aged("node-key", 60, spec(2, 6)),
        ]
        .into(),
        ..Default::default()
    };
    let v = verdicts(&s);
    let lost = |name: &str, field: &str, to: &str| match &v[name] {
        PeerVerdict::Rejected(PeerError::Conflict {
            field: f, other, ..
        }) => *f == field && other.contains(to),
        other => panic!("{name}: {other:?}"),
    };
    assert!(
        matches!(v["a"], PeerVerdict::Accepted { .. }),
        "the older keeps its key"
    );
    assert!(lost("b", "publicKey", "WeftPeer a"));
    assert!(
        matches!(v["d"], PeerVerdict::Accepted { .. }),
        "the older keeps its address"
    );
    assert!(lost("c", "addresses", "WeftPeer d"));
    assert!(
        lost("node-key", "publicKey", "Node node-2"),
        "a node's key is never a peer's"
    );
    assert!(matches!(v["e"], PeerVerdict::Accepted { .. }));
    let mut revoked = s.clone();
    revoked.revoked = std::sync::Arc::new(BTreeSet::from([key(53)]));
    assert_eq!(
        verdicts(&revoked)["e"],
        PeerVerdict::Rejected(PeerError::Revoked)
    );
}

#[test]
fn gateways_are_chosen_alike_everywhere_and_fail_over_in_order() {
    let s = snapshot(three(), &[("laptop", spec(50, 1))]);
    let first = gateway_of(&s, "laptop").expect("a gateway");
    // Fixed per peer: another peer may land elsewhere, this one does not move.
    assert_eq!(gateway_of(&s, "laptop"), Some(first.clone()));
    // One node's report is not enough to move it (a compromised node
    // cannot take a working gateway away)...
    let others: Vec<String> = (1..=3)
        .map(|i| format!("node-{i}"))
        .filter(|n| *n != first)
        .collect();
    let mut nodes = three();
    let index = |name: &str| (1..=3).position(|i| format!("node-{i}") == name).unwrap();
    reports(&mut nodes[index(&others[0])], &[&first]);
    let one = snapshot(nodes.clone(), &[("laptop", spec(50, 1))]);
    assert_eq!(gateway_of(&one, "laptop"), Some(first.clone()));
    // ...both others' reports are: it moves to the next, the same one on
    // every node (the choice reads only the cluster).
    reports(&mut nodes[index(&others[1])], &[&first]);
    let cut = snapshot(nodes, &[("laptop", spec(50, 1))]);
    let next = gateway_of(&cut, "laptop").expect("a next gateway");
    assert_ne!(next, first);
    // Named gateways go first, in order; one not in the mesh is skipped.
    let named = with(
        spec(50, 1),
        "gateways",
        json!(["node-9", "node-3", "node-1"]),
    );
    let s = snapshot(three(), &[("laptop", named.clone())]);
    assert_eq!(gateway_of(&s, "laptop").as_deref(), Some("node-3"));
    let mut nodes = three();
    reports(&mut nodes[0], &["node-3"]);
    reports(&mut nodes[1], &["node-3"]);
    let s = snapshot(nodes, &[("laptop", named)]);
    assert_eq!(gateway_of(&s, "laptop").as_deref(), Some("node-1"));
    // A node labelled not to relay is never a gateway.
    let mut nodes = three();
    nodes[2].placement.may_relay = false;
    let only3 = with(spec(50, 1), "gateways", json!(["node-3"]));
    assert_eq!(gateway_of(&snapshot(nodes, &[("p", only3)]), "p"), None);
}

fn local(name: &str) -> LocalConfig {
    LocalConfig::new(name, ClusterRanges::lab())
}

#[test]
fn the_gateway_holds_the_peer_and_every_other_node_routes_it_there() {
    let only = with(spec(50, 1), "gateways", json!(["node-2"]));
    let s = snapshot(three(), &[("laptop", only)]);
    let addresses: BTreeSet<IpNet> = ["100.65.0.1/32", "fd64:77:70::1/128"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let g = plan(&s, &local("node-2"));
    let entry = &g.peers[&key(50)];
    assert_eq!(entry.kind, PeerKind::External);
    assert_eq!(entry.node, "weftpeer/laptop");
    assert_eq!(entry.allowed_ips, addresses);
    assert_eq!(entry.persistent_keepalive, None);
    for d in [&g, &plan(&s, &local("node-1")), &plan(&s, &local("node-3"))] {
        for a in &addresses {
            assert!(d.routes.contains(&crate::model::Route {
                dst: *a,
                kind: RouteKind::Mesh
            }));
        }
    }
    let other = plan(&s, &local("node-1"));
    assert!(
        !other.peers.contains_key(&key(50)),
        "only the gateway holds it"
    );
    assert!(other.peers[&key(2)].allowed_ips.is_superset(&addresses));
    // Through a relay when the gateway is cut off from this node.
    let mut nodes = three();
    reports(&mut nodes[0], &["node-2"]);
    let only = with(spec(50, 1), "gateways", json!(["node-2"]));
    let s = snapshot(nodes, &[("laptop", only)]);
    let d = plan(&s, &local("node-1"));
    assert_eq!(d.paths["node-2"], Hop::Via("node-3".into()));
    assert!(d.peers[&key(3)].allowed_ips.is_superset(&addresses));
    assert!(d.peers[&key(2)].allowed_ips.is_empty());
}

#[test]
fn a_peer_without_a_gateway_or_rejected_has_no_route_and_no_entry() {
    let mut nodes = three();
    nodes[1].placement.may_relay = false;
    let only = with(spec(50, 1), "gateways", json!(["node-2"]));
    let bad = with(spec(51, 2), "addresses", json!(["198.19.1.1"]));
    let s = snapshot(nodes, &[("laptop", only), ("bad", bad)]);
    for name in ["node-1", "node-2", "node-3"] {
        let d = plan(&s, &local(name));
        assert!(!d.peers.contains_key(&key(50)) && !d.peers.contains_key(&key(51)));
        let peer_range: Vec<IpNet> = ClusterRanges::lab().peers.unwrap().iter().collect();
        assert!(
            d.routes
                .iter()
                .filter(|r| peer_range.iter().any(|p| p.contains(&r.dst)))
                .all(|r| r.kind == RouteKind::Unreachable),
            "{name}: only the backstop covers the peer range"
        );
        assert!(d.peers.values().all(|p| p
            .allowed_ips
            .iter()
            .all(|a| !peer_range.iter().any(|r| r.contains(a)))));
    }
}

#[test]
fn a_removed_or_revoked_peer_is_pruned() {
    let only = with(spec(50, 1), "gateways", json!(["node-2"]));
    let s = snapshot(three(), &[("laptop", only)]);
    let applied = plan(&s, &local("node-2"));
    let live: BTreeSet<&str> = ["node-1", "node-2", "node-3"].into();
    let pruned = crate::planner::prune(&applied, &live, &BTreeSet::new());
    assert!(!pruned.peers.contains_key(&key(50)), "its object is gone");
    let entry = ExternalPeer::entry_name("laptop");
    let live: BTreeSet<&str> = ["node-1", "node-2", "node-3", entry.as_str()].into();
    let kept = crate::planner::prune(&applied, &live, &BTreeSet::new());
    assert!(kept.peers.contains_key(&key(50)));
    let revoked = crate::planner::prune(&applied, &live, &BTreeSet::from([key(50)]));
    assert!(!revoked.peers.contains_key(&key(50)));
    assert!(!revoked
        .routes
        .iter()
        .any(|r| r.kind == RouteKind::Mesh && r.dst == "100.65.0.1/32".parse().unwrap()));
}

#[test]
fn a_gateway_filters_only_the_peers_it_serves_to_their_reach() {
    let served = with(
        with(spec(50, 1), "gateways", json!(["node-2"])),
        "reach",
        json!(["198.19.1.0/25", "198.19.1.128/25"]),
    );
    let elsewhere = with(spec(51, 2), "gateways", json!(["node-3"]));
    let s = snapshot(three(), &[("kiosk", served), ("laptop", elsewhere)]);
    let external = verdicts(&s);
    let ranges = ClusterRanges::lab().peers;
    let rules = |me: &str| -> Vec<Value> {
        filter(&super::served(&external, me), ranges.as_ref())["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"].get("rule").cloned())
            .collect()
    };
    let comments = |rules: &[Value]| -> Vec<String> {
        rules
            .iter()
            .map(|r| format!("{} {}", r["chain"], r["comment"]))
            .collect()
    };
    // Every node: answers pass, then nothing from a peer range reaches
    // the node itself.
    let everywhere = [
        "\"forward\" \"answers to the cluster's own connections\"",
        "\"input\" \"answers to the cluster's own connections\"",
        "\"input\" \"a peer reaches no node itself\"",
        "\"input\" \"a peer reaches no node itself\"",
    ];
    assert_eq!(comments(&rules("node-1")), everywhere);
    let answers = &rules("node-1")[0]["expr"][0]["match"];
    assert_eq!(
        (&answers["left"]["ct"]["key"], &answers["right"]),
        (&json!("direction"), &json!("reply"))
    );
    // Its gateway: IPv4 to its reach (merged), else dropped; IPv6 (no
    // reach in that family) dropped.
    let mine = rules("node-2");
    assert_eq!(
        comments(&mine[everywhere.len()..]),
        [
            "\"forward\" \"WeftPeer kiosk\"",
            "\"forward\" \"WeftPeer kiosk\"",
            "\"forward\" \"WeftPeer kiosk\"",
        ]
    );
    let accept = &mine[everywhere.len()]["expr"];
    assert_eq!(accept[0]["match"]["right"]["prefix"]["addr"], "100.65.0.1");
    assert_eq!(
        accept[1]["match"]["right"]["set"],
        json!([{"prefix": {"addr": "198.19.1.0", "len": 24}}]),
        "the two halves as one prefix"
    );
    assert!(mine[everywhere.len() + 1..].iter().all(|r| r["expr"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        == &json!({"drop": null})));
    // No peer ranges: no peer rules at all.
    assert_eq!(
        filter(&[], None)["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["add"].get("rule").is_some())
            .count(),
        2
    );
}
