//! NetworkPolicy semantics beyond the shared cases, and the shared cases
//! themselves through compiled programs.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use proptest::prelude::*;
use serde_json::json;
use weft_policy::{case, compile, decide, Identity, NamedPort, NamespaceInfo, PodInfo, Protocol};

fn pod(ns: &str, name: &str, node: &str, ip: &str, ports: &[(&str, u16)]) -> PodInfo {
    PodInfo {
        identity: Identity::Api,
        namespace: ns.into(),
        name: name.into(),
        node: node.into(),
        labels: BTreeMap::from([("pod".to_string(), name.to_string())]),
        ips: vec![ip.parse().unwrap()],
        ports: ports
            .iter()
            .map(|(n, p)| NamedPort {
                name: n.to_string(),
                port: *p,
                protocol: Protocol::Tcp,
            })
            .collect(),
    }
}

fn ns(name: &str) -> NamespaceInfo {
    NamespaceInfo {
        name: name.into(),
        labels: BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name.to_string())]),
    }
}

fn policy(v: serde_json::Value) -> NetworkPolicy {
    serde_json::from_value(v).unwrap()
}

/// Whether `from` may open `port`/TCP to `to` under `policy`, all pods on one node.
fn allowed(policy: &NetworkPolicy, pods: &[PodInfo], from: &str, to: &str, port: u16) -> bool {
    let program = compile(
        "n",
        std::slice::from_ref(policy),
        Default::default(),
        pods,
        &[ns("x"), ns("y")],
    );
    let ip = |k: &str| -> IpAddr { pods.iter().find(|p| p.key() == k).unwrap().ips[0] };
    decide(&program, &program, ip(from), ip(to), Protocol::Tcp, port).allowed()
}

fn world() -> Vec<PodInfo> {
    vec![
        pod("x", "a", "n", "198.19.1.10", &[("web", 80)]),
        pod("x", "b", "n", "198.19.1.11", &[("web", 8080)]),
        pod("y", "c", "n", "198.19.1.12", &[]),
    ]
}

#[test]
fn policy_types_default_to_ingress_plus_egress_when_egress_rules_exist() {
    let pods = world();
    let ingress_only = policy(
        json!({"metadata": {"name": "p", "namespace": "x"}, "spec": {"podSelector": {"matchLabels": {"pod": "a"}}}}),
    );
    assert!(
        !allowed(&ingress_only, &pods, "x/b", "x/a", 80),
        "no rules: ingress denied"
    );
    assert!(
        allowed(&ingress_only, &pods, "x/a", "x/b", 80),
        "egress untouched without egress rules"
    );
    let with_egress = policy(json!({"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}}));
    assert!(
        !allowed(&with_egress, &pods, "x/a", "x/b", 80),
        "egress now isolated"
    );
    assert!(
        !allowed(&with_egress, &pods, "x/a", "y/c", 80),
        "a podSelector alone means the policy's namespace"
    );
}

#[test]
fn named_ports_resolve_per_destination_pod() {
    let pods = world();
    let p = policy(json!({"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Egress"],
                 "egress": [{"ports": [{"port": "web"}]}]}}));
    // Same name, different numbers on a and b.
    let pods_y: Vec<PodInfo> = pods
        .iter()
        .cloned()
        .map(|mut p| {
            if p.name == "c" {
                p.namespace = "x".into();
            }
            p
        })
        .collect();
    assert!(allowed(&p, &pods_y, "x/c", "x/a", 80));
    assert!(!allowed(&p, &pods_y, "x/c", "x/a", 8080));
    assert!(allowed(&p, &pods_y, "x/c", "x/b", 8080));
    assert!(!allowed(&p, &pods_y, "x/c", "x/b", 80));
}

#[test]
fn end_port_ranges_ip_blocks_and_empty_versus_absent_rules() {
    let pods = world();
    let range = policy(json!({"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 8000, "endPort": 8010}]}]}}));
    assert!(allowed(&range, &pods, "x/b", "x/a", 8005));
    assert!(!allowed(&range, &pods, "x/b", "x/a", 8011));
    let block = policy(json!({"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                 "ingress": [{"from": [{"ipBlock": {"cidr": "198.19.1.0/24", "except": ["198.19.1.12/32"]}}]}]}}));
    assert!(allowed(&block, &pods, "x/b", "x/a", 80));
    assert!(
        !allowed(&block, &pods, "y/c", "x/a", 80),
        "except carves the pod out"
    );
    let allow_all = policy(
        json!({"metadata": {"name": "p", "namespace": "x"}, "spec": {"podSelector": {}, "ingress": [{}]}}),
    );
    assert!(
        allowed(&allow_all, &pods, "y/c", "x/a", 80),
        "an empty rule allows everything"
    );
    let both = policy(json!({"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}},
                                                             "podSelector": {"matchLabels": {"pod": "a"}}}]}]}}));
    assert!(
        !allowed(&both, &pods, "y/c", "x/a", 80),
        "namespace AND pod selector in one peer"
    );
}

#[test]
fn a_bad_protocol_opens_nothing_and_is_reported() {
    let pods = world();
    let bad = policy(json!({"metadata": {"name": "p", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"protocol": "ICMP", "port": 1}]}]}}));
    let program = compile(
        "n",
        std::slice::from_ref(&bad),
        Default::default(),
        &pods,
        &[ns("x"), ns("y")],
    );
    assert!(
        program
            .problems
            .values()
            .flatten()
            .any(|p| p.contains("ICMP")),
        "{:?}",
        program.problems
    );
    assert!(!allowed(&bad, &pods, "x/b", "x/a", 1));
}

fn all_cases() -> Vec<PathBuf> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    case::conformance_files(&repo).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_conformance_case_passes_through_compiled_programs() {
    let files = all_cases();
    assert!(
        files.len() >= 18 + 12,
        "expected the conformance cases, found {}",
        files.len()
    );
    for path in files {
        let c = case::load(&path).unwrap();
        let mismatches = case::check(&c);
        assert!(mismatches.is_empty(), "{}", case::report(&c, &mismatches));
    }
}

#[test]
fn a_wrong_expectation_is_caught_and_reported() {
    let path = all_cases()
        .into_iter()
        .find(|p| p.to_string_lossy().contains("014-"))
        .unwrap();
    let mut c = case::load(&path).unwrap();
    let cell = c.probes[0]
        .expected
        .get_mut("x/b")
        .unwrap()
        .get_mut("x/a")
        .unwrap();
    *cell = !*cell;
    let mismatches = case::check(&c);
    assert_eq!(mismatches.len(), 1);
    let report = case::report(&c, &mismatches);
    assert!(report.starts_with("FAIL 014-"), "{report}");
    assert!(report.contains("x/b -> x/a 81/TCP"), "{report}");
    assert!(report.contains("denied: isolated by x/"), "{report}");
}

proptest! {
    /// Decisions do not depend on the order policies are listed in.
    #[test]
    fn decisions_are_independent_of_policy_order(seed in any::<u64>(), port in 79u16..82) {
        let path = all_cases().into_iter().find(|p| p.to_string_lossy().contains("015-")).unwrap();
        let c = case::load(&path).unwrap();
        let mut shuffled = c.policies.clone();
        let n = shuffled.len();
        for i in (1..n).rev() {
            shuffled.swap(i, (seed.wrapping_mul(i as u64 + 3) % (i as u64 + 1)) as usize);
        }
        let a = compile("node-1", &c.policies, Default::default(), &c.pods, &c.namespaces);
        let b = compile("node-1", &shuffled, Default::default(), &c.pods, &c.namespaces);
        for from in &c.pods {
            for to in c.pods.iter().filter(|p| p.node == "node-1") {
                let da = decide(&a, &a, from.ips[0], to.ips[0], Protocol::Tcp, port).allowed();
                let db = decide(&b, &b, from.ips[0], to.ips[0], Protocol::Tcp, port).allowed();
                prop_assert_eq!(da, db);
            }
        }
    }
}

#[test]
fn explain_names_the_deciding_rule_or_the_isolating_policy() {
    let path = all_cases()
        .into_iter()
        .find(|p| p.to_string_lossy().contains("014-"))
        .unwrap();
    let c = case::load(&path).unwrap();
    let allowed = case::explain(&c, "y/b", "x/a", Protocol::Tcp, 81).unwrap();
    assert!(allowed.allowed());
    assert_eq!(
        allowed.ingress.to_string(),
        "allowed by x/allow-client-a-via-ns-selector ingress rule 0"
    );
    let denied = case::explain(&c, "x/b", "x/a", Protocol::Tcp, 81).unwrap();
    assert!(!denied.allowed());
    assert!(denied
        .ingress
        .to_string()
        .contains("isolated by x/allow-client-a-via-ns-selector"));
    assert!(case::explain(&c, "x/b", "x/zz", Protocol::Tcp, 81)
        .unwrap_err()
        .to_string()
        .contains("x/zz"));
}

/// A mirror pod's namespace and labels are its kubelet's word alone (a
/// kubelet may create one anywhere, labelled as it likes): no policy's
/// peers pick it, while policy still applies to it.
#[test]
fn a_mirror_pod_is_nobodys_peer() {
    let mut pods = world();
    let mut mirror = pod("x", "b", "n", "198.19.1.20", &[]);
    mirror.name = "b-static".into();
    mirror.identity = Identity::Node;
    pods.push(mirror);
    let from_b = policy(json!({
        "metadata": {"name": "from-b", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]},
    }));
    assert!(allowed(&from_b, &pods, "x/b", "x/a", 80));
    assert!(!allowed(&from_b, &pods, "x/b-static", "x/a", 80));
    // Policy applies to it: a policy selecting pod=b isolates it.
    let into_b = policy(json!({
        "metadata": {"name": "into-b", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": []},
    }));
    assert!(!allowed(&into_b, &pods, "x/a", "x/b-static", 80));
    // What a kubelet writes for one.
    let object: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "etcd-n", "namespace": "x",
                     "annotations": {"kubernetes.io/config.mirror": "abc"}},
        "spec": {"containers": [], "nodeName": "n"},
        "status": {"podIPs": [{"ip": "198.19.1.21"}]},
    }))
    .unwrap();
    assert_eq!(PodInfo::from_pod(&object).identity, Identity::Node);
}
