//! The engine against compiling everything anew.

use super::*;
use crate::cnp::{self, ClusterNetworkPolicy};
use crate::model::{Identity, NamedPort, Protocol};
use crate::netlink;
use crate::nft::Command;
use proptest::prelude::*;
use serde_json::json;

fn namespaces(teams: &[bool]) -> Vec<NamespaceInfo> {
    ["x", "y"]
        .iter()
        .zip(teams)
        .map(|(name, a)| NamespaceInfo {
            name: name.to_string(),
            labels: BTreeMap::from([
                ("kubernetes.io/metadata.name".into(), name.to_string()),
                ("team".into(), if *a { "a" } else { "b" }.into()),
            ]),
        })
        .collect()
}

/// A pod from small numbers: which name, namespace, node, labels,
/// address (shared between pods when `address` repeats) and ports.
fn pod(name: u8, ns: bool, node: bool, app: u8, tier: bool, address: u8, ports: u8) -> PodInfo {
    let mut labels =
        BTreeMap::from([("tier".to_string(), if tier { "w" } else { "d" }.to_string())]);
    if app > 0 {
        labels.insert("app".into(), format!("a{app}"));
    }
    let ips = if address == 0 {
        Vec::new()
    } else {
        vec![
            format!("10.0.0.{address}").parse().unwrap(),
            format!("fd00::{address}").parse().unwrap(),
        ]
    };
    let named = |name: &str, port, protocol| NamedPort {
        name: name.into(),
        port,
        protocol,
    };
    let ports = match ports {
        0 => vec![],
        1 => vec![named("http", 80, Protocol::Tcp)],
        2 => vec![
            named("http", 8080, Protocol::Tcp),
            named("dns", 53, Protocol::Udp),
        ],
        _ => vec![named("dns", 5353, Protocol::Udp)],
    };
    PodInfo {
        identity: Identity::Api,
        namespace: if ns { "x" } else { "y" }.into(),
        name: format!("p{name}"),
        node: if node { "n1" } else { "n2" }.into(),
        labels,
        ips,
        ports,
    }
}

fn peers(which: u8) -> serde_json::Value {
    match which {
        0 => json!([{"podSelector": {"matchLabels": {"tier": "w"}}}]),
        1 => json!([{"namespaceSelector": {"matchLabels": {"team": "a"}}}]),
        2 => json!([{"namespaceSelector": {"matchLabels": {"team": "b"}},
                     "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}]),
        3 => json!([{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.4/30"]}},
                    {"podSelector": {"matchLabels": {"app": "a1"}}}]),
        _ => json!(null),
    }
}

fn ports(which: u8) -> serde_json::Value {
    match which {
        0 => json!(null),
        1 => json!([{"port": 80}]),
        2 => json!([{"port": "http"}]),
        _ => json!([{"port": 53, "protocol": "UDP"}, {"port": "dns", "protocol": "UDP"}]),
    }
}

fn rule(field: &str, (p, q): (u8, u8)) -> serde_json::Value {
    let mut r = json!({});
    if !peers(p).is_null() {
        r[field] = peers(p);
    }
    if !ports(q).is_null() {
        r["ports"] = ports(q);
    }
    r
}

fn policy(
    i: usize,
    ns: bool,
    selector: u8,
    types: u8,
    ingress: &[(u8, u8)],
    egress: &[(u8, u8)],
) -> NetworkPolicy {
    let pod_selector = match selector {
        0 => json!({}),
        1 => json!({"matchLabels": {"app": "a1"}}),
        _ => json!({"matchLabels": {"tier": "w"}}),
    };
    let mut spec = json!({
        "podSelector": pod_selector,
        "ingress": ingress.iter().map(|r| rule("from", *r)).collect::<Vec<_>>(),
        "egress": egress.iter().map(|r| rule("to", *r)).collect::<Vec<_>>(),
    });
    match types {
        0 => {}
        1 => spec["policyTypes"] = json!(["Ingress"]),
        2 => spec["policyTypes"] = json!(["Egress"]),
        _ => spec["policyTypes"] = json!(["Ingress", "Egress"]),
    }
    serde_json::from_value(json!({
        "metadata": {"name": format!("np{i}"), "namespace": if ns { "x" } else { "y" }},
        "spec": spec,
    }))
    .unwrap()
}

/// A ClusterNetworkPolicy `cnp<i>` from small numbers: tier, priority
/// (few values, so ties fall to names), subject, and per direction rules
/// as (action, peer, ports).
fn cluster_policy(i: usize, shape: &ClusterShape) -> ClusterNetworkPolicy {
    let (baseline, priority, subject, ingress, egress) = shape;
    let subject = match subject {
        0 => json!({"namespaces": {"matchLabels": {"team": "a"}}}),
        1 => {
            json!({"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "w"}}}})
        }
        _ => json!({"namespaces": {}}),
    };
    let rule = |ingress: bool, (action, peer, ports): &(u8, u8, u8)| {
        let peer = match (peer, ingress) {
            (0, _) => json!({"namespaces": {"matchLabels": {"team": "b"}}}),
            (1, _) => {
                json!({"pods": {"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}})
            }
            (_, true) => json!({"namespaces": {}}),
            (_, false) => json!({"networks": ["10.0.0.0/30", "fd00::/126"]}),
        };
        let mut r = json!({
            "action": ACTIONS[usize::from(*action % 3)],
            if ingress { "from" } else { "to" }: [peer],
        });
        match ports {
            0 => {}
            1 => r["protocols"] = json!([{"tcp": {"destinationPort": {"number": 80}}}]),
            _ => {
                r["protocols"] =
                    json!([{"udp": {"destinationPort": {"range": {"start": 50, "end": 60}}}}])
            }
        }
        r
    };
    let object: ClusterNetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": format!("cnp{i}")},
        "spec": {
            "tier": if *baseline { "Baseline" } else { "Admin" },
            "priority": priority,
            "subject": subject,
            "ingress": ingress.iter().map(|r| rule(true, r)).collect::<Vec<_>>(),
            "egress": egress.iter().map(|r| rule(false, r)).collect::<Vec<_>>(),
        },
    }))
    .unwrap();
    let reading = cnp::parse(&object);
    assert!(reading.problems.is_empty(), "{:?}", reading.problems);
    object
}

const ACTIONS: [&str; 3] = ["Accept", "Deny", "Pass"];

/// Baseline?, priority, subject, ingress and egress rules.
type ClusterShape = (bool, u8, u8, Vec<(u8, u8, u8)>, Vec<(u8, u8, u8)>);

fn arb_cluster_policy() -> impl Strategy<Value = ClusterShape> {
    let rules = || prop::collection::vec((0u8..3, 0u8..3, 0u8..3), 0..3);
    (any::<bool>(), 0u8..2, 0u8..3, rules(), rules())
}

fn snapshot(
    policies: &BTreeMap<String, NetworkPolicy>,
    cluster: &BTreeMap<usize, ClusterNetworkPolicy>,
    teams: &[bool],
    pods: Vec<PodInfo>,
) -> Snapshot {
    Snapshot {
        policies: policies.values().cloned().collect(),
        cluster_policies: cluster.values().cloned().collect(),
        namespaces: namespaces(teams),
        pods,
        nodes: Vec::new(),
    }
}

fn arb_pod() -> impl Strategy<Value = PodInfo> {
    (
        0u8..6,
        any::<bool>(),
        any::<bool>(),
        0u8..3,
        any::<bool>(),
        0u8..9,
        0u8..4,
    )
        .prop_map(|(n, ns, node, app, tier, address, ports)| {
            pod(n, ns, node, app, tier, address, ports)
        })
}

/// Namespace x?, pod selector, policy types, ingress and egress rules
/// as (peers, ports).
type PolicyShape = (bool, u8, u8, Vec<(u8, u8)>, Vec<(u8, u8)>);

fn arb_policy() -> impl Strategy<Value = PolicyShape> {
    let rules = || prop::collection::vec((0u8..5, 0u8..4), 0..3);
    (any::<bool>(), 0u8..3, 0u8..4, rules(), rules())
}

#[derive(Debug, Clone)]
enum Change {
    Pod(u8, Option<PodInfo>),
    /// Policy `np<i>` in x (or y): replaced, created or deleted.
    Policy(usize, bool, Option<PolicyShape>),
    /// ClusterNetworkPolicy `cnp<i>`: replaced, created or deleted.
    Cluster(usize, Option<ClusterShape>),
}

fn arb_change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (0u8..6, prop::option::of(arb_pod())).prop_map(|(n, p)| Change::Pod(n, p)),
        (0usize..5, any::<bool>(), prop::option::of(arb_policy()))
            .prop_map(|(i, ns, p)| Change::Policy(i, ns, p)),
        (0usize..3, prop::option::of(arb_cluster_policy()))
            .prop_map(|(i, p)| Change::Cluster(i, p)),
    ]
}

/// Element commands applied to a copy of `rs`; `None` if the
/// transaction has structural commands.
fn with_elements(rs: &Ruleset, t: &Transaction) -> Option<Ruleset> {
    let mut rs = rs.clone();
    for c in &t.commands {
        match c {
            Command::Elements { add, set, elements } => {
                let s = &mut rs.sets.get_mut(set)?.elements;
                for e in elements {
                    assert!(if *add { s.insert(*e) } else { s.remove(e) }, "{c:?}");
                }
            }
            Command::Jumps { add, map, entries } => {
                let m = rs.maps.get_mut(map)?;
                for (ip, chain) in entries {
                    if *add {
                        assert!(m.insert(*ip, chain.clone()).is_none(), "{c:?}");
                    } else {
                        assert_eq!(m.remove(ip).as_ref(), Some(chain), "{c:?}");
                    }
                }
            }
            _ => return None,
        }
    }
    Some(rs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// After any pod and policy changes, the engine holds exactly what
    /// compiling everything anew gives, and each transaction it
    /// returned takes the previous ruleset to the next.
    #[test]
    fn change_by_change_equals_compiling_everything_anew(
        teams in prop::collection::vec(any::<bool>(), 2),
        pods in prop::collection::vec(arb_pod(), 0..6),
        policies in prop::collection::vec(arb_policy(), 0..4),
        cluster in prop::collection::vec(arb_cluster_policy(), 0..3),
        changes in prop::collection::vec(arb_change(), 1..8),
    ) {
        let policies: BTreeMap<String, NetworkPolicy> = policies
            .iter()
            .enumerate()
            .map(|(i, (ns, sel, types, ing, eg))| policy(i, *ns, *sel, *types, ing, eg))
            .map(|p| (compile::policy_key(&p), p))
            .collect();
        let mut policies = policies;
        let mut cluster: BTreeMap<usize, ClusterNetworkPolicy> = cluster
            .iter()
            .enumerate()
            .map(|(i, shape)| (i, cluster_policy(i, shape)))
            .collect();
        let mut engine = Engine::new("n1", Options::default());
        engine.reset(snapshot(&policies, &cluster, &teams, pods.clone()));
        let mut state: BTreeMap<String, PodInfo> = pods.into_iter().map(|p| (p.key(), p)).collect();
        for change in changes {
            let before = engine.ruleset().clone();
            let transaction = match change {
                Change::Pod(name, change) => {
                    let key = format!("{}/p{name}", change.as_ref().map_or("x", |p| p.namespace.as_str()));
                    let change = change.map(|mut p| { p.name = format!("p{name}"); p });
                    let transaction = engine.pod(&key, change.clone());
                    match change {
                        Some(p) => state.insert(key, p),
                        None => state.remove(&key),
                    };
                    transaction
                }
                Change::Policy(i, ns, shape) => {
                    let p = shape.map(|(_, sel, types, ing, eg)| policy(i, ns, sel, types, &ing, &eg));
                    let key = format!("{}/np{i}", if ns { "x" } else { "y" });
                    let transaction = engine.policy(&key, p.clone());
                    match p {
                        Some(p) => policies.insert(key, p),
                        None => policies.remove(&key),
                    };
                    transaction
                }
                Change::Cluster(i, shape) => {
                    let p = shape.map(|shape| cluster_policy(i, &shape));
                    let transaction = engine.cluster_policy(&format!("cnp{i}"), p.clone());
                    match p {
                        Some(p) => cluster.insert(i, p),
                        None => cluster.remove(&i),
                    };
                    transaction
                }
            };
            let mut fresh = Engine::new("n1", Options::default());
            fresh.reset(snapshot(&policies, &cluster, &teams, state.values().cloned().collect()));
            prop_assert_eq!(engine.program(), fresh.program());
            prop_assert_eq!(engine.ruleset(), fresh.ruleset());
            match transaction {
                None => prop_assert_eq!(&before, engine.ruleset()),
                Some((t, _)) => {
                    if let Some(after) = with_elements(&before, &t) {
                        prop_assert_eq!(&after, engine.ruleset());
                    } else {
                        prop_assert_eq!(Some(t), nft::diff(&before, engine.ruleset()).map(|(t, _)| t));
                    }
                }
            }
        }
    }
}

#[test]
fn a_relabel_within_the_same_policies_is_elements_only() {
    let policies = vec![policy(0, true, 1, 3, &[(0, 1)], &[(1, 2)])];
    let pods = vec![
        pod(0, true, true, 1, true, 1, 1),
        pod(1, true, true, 1, false, 2, 1),
        pod(2, true, false, 2, true, 3, 1),
    ];
    let policies = policies
        .into_iter()
        .map(|p| (compile::policy_key(&p), p))
        .collect();
    let mut engine = Engine::new("n1", Options::default());
    engine.reset(snapshot(&policies, &BTreeMap::new(), &[true, false], pods));
    // p1 (local, selected by the policy) goes from tier d to w: it
    // joins the tier=w peer list; its own gates stay.
    let (t, changes) = engine
        .pod("x/p1", Some(pod(1, true, true, 1, true, 2, 1)))
        .expect("a change");
    assert!(netlink::Batch::of(&t.commands).is_some(), "{t:?}");
    assert_eq!((changes.elements_added, changes.elements_removed), (2, 0));
    // A new local pod of the same app: its map entries, its named port.
    let (t, changes) = engine
        .pod("x/p3", Some(pod(3, true, true, 1, false, 4, 2)))
        .expect("a change");
    assert!(netlink::Batch::of(&t.commands).is_some(), "{t:?}");
    assert!(changes.elements_added >= 4, "{changes:?}");
}
