use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use weft_keys::PublicKey;

use super::*;
use crate::annotations::fixtures::{self, key};
use crate::annotations::{render, Claim, ENDPOINT, KEY_PROOF, PUBLIC_KEY};
use crate::model::{overlap, ClusterRanges, NodeInfo};

/// Node `i`, created at `created`, holding test key `key_seed` and pod
/// CIDR (a /`len` at block `block`) with its mesh address.
fn node(i: u8, created: i64, key_seed: u8, block: u8, len: u8) -> NodeInfo {
    let pod: IpNet = format!("198.19.{block}.0/{len}")
        .parse::<IpNet>()
        .unwrap()
        .trunc();
    let mut node = NodeInfo {
        created,
        spec_pod_cidrs: vec![pod],
        ..fixtures::bare(i)
    };
    node.annotations = render(&fixtures::claim(&node, key_seed, i, pod));
    node
}

fn simple(i: u8) -> NodeInfo {
    fixtures::published(i).0
}

/// Node `i`'s mesh address (of its block 198.19.`i`.0/24), as a host route.
fn mesh(i: u8) -> IpNet {
    let block = net(&format!("198.19.{i}.0/24"));
    IpNet::from(mesh_address_of(&ClusterRanges::lab(), &block).unwrap())
}

/// `node` announcing test key `seed` as its next key, with its proof.
fn announce(node: &mut NodeInfo, seed: u8) {
    use crate::annotations::{NEXT_KEY_PROOF, NEXT_PUBLIC_KEY};
    let proof = fixtures::proof(node, seed);
    node.annotations
        .insert(NEXT_PUBLIC_KEY.into(), key(seed).to_string());
    node.annotations
        .insert(NEXT_KEY_PROOF.into(), proof.to_string());
}

fn local(name: &str) -> LocalConfig {
    LocalConfig {
        persistent_keepalive: Some(5),
        ..LocalConfig::new(name, ClusterRanges::lab())
    }
}

fn snapshot(nodes: Vec<NodeInfo>) -> ClusterSnapshot {
    ClusterSnapshot {
        nodes,
        blocks: Default::default(),
        ..Default::default()
    }
}

fn backstopped(d: &DesiredNode) -> bool {
    backstops(&ClusterRanges::lab()).is_subset(&d.routes)
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn three_nodes_form_a_full_mesh_over_the_backstops() {
    let d = plan(
        &snapshot(vec![simple(1), simple(2), simple(3)]),
        &local("node-1"),
    );
    assert_eq!(d.addresses, BTreeSet::from([mesh(1)]));
    let peer_nodes: Vec<&str> = d.peers.values().map(|p| p.node.as_str()).collect();
    assert_eq!(peer_nodes.len(), 2);
    assert!(peer_nodes.contains(&"node-2") && peer_nodes.contains(&"node-3"));
    let p2 = &d.peers[&key(2)];
    assert_eq!(
        p2.allowed_ips,
        BTreeSet::from([mesh(2), net("198.19.2.0/24")])
    );
    assert_eq!(p2.persistent_keepalive, Some(5));
    for dst in [mesh(2), net("198.19.2.0/24"), mesh(3), net("198.19.3.0/24")] {
        assert!(
            d.routes.contains(&Route {
                dst,
                kind: RouteKind::Mesh
            }),
            "{dst}"
        );
    }
    assert!(backstopped(&d));
    let unreachable: Vec<String> = d
        .routes
        .iter()
        .filter(|r| r.kind == RouteKind::Unreachable)
        .map(|r| r.dst.to_string())
        .collect();
    assert_eq!(
        unreachable,
        [
            "100.65.0.0/16",
            "198.18.128.0/17",
            "198.19.0.0/16",
            "fd64:77:70::/64",
            "fd98:18::/64",
            "fd98:19::/48"
        ],
        "one backstop per cluster range, none per node"
    );
    assert!(
        !d.routes.iter().any(|r| r.dst == net("198.19.1.0/24")),
        "no route for our own pods"
    );
}

#[test]
fn hostile_nodes_are_excluded_and_the_victim_is_unaffected() {
    let mut bad_key = simple(4);
    bad_key
        .annotations
        .insert(PUBLIC_KEY.into(), "garbage".into());
    bad_key.spec_pod_cidrs = vec![net("198.19.4.0/24")];
    let mut zero_endpoint = simple(5);
    zero_endpoint
        .annotations
        .insert(ENDPOINT.into(), "0.0.0.0:51820".into());
    // Younger than node-2, claiming an overlapping pod CIDR (a hijack attempt).
    let hijacker = node(6, 100, 6, 2, 23);
    let nodes = vec![simple(1), simple(2), bad_key, zero_endpoint, hijacker];
    let d = plan(&snapshot(nodes), &local("node-1"));
    let reason = |n: &str| match &d.verdicts[n] {
        Verdict::Rejected(r) => r.reason(),
        other => panic!("{n}: {other:?}"),
    };
    assert_eq!(reason("node-4"), "bad_public_key");
    assert_eq!(reason("node-5"), "bad_endpoint");
    assert_eq!(reason("node-6"), "conflict");
    assert_eq!(d.peers.len(), 1);
    assert_eq!(
        d.peers[&key(2)].allowed_ips,
        BTreeSet::from([mesh(2), net("198.19.2.0/24")])
    );
    assert!(d.routes.contains(&Route {
        dst: net("198.19.2.0/24"),
        kind: RouteKind::Mesh
    }));
    // The excluded node's own (spec) pod CIDR is refused, not routed.
    assert!(!d
        .routes
        .iter()
        .any(|r| r.kind == RouteKind::Mesh && overlap(&r.dst, &net("198.19.4.0/24"))));
    assert!(backstopped(&d));
}

/// Two nodes that both prove one key (a cloned machine) collide: the
/// older keeps it, whoever asks.
#[test]
fn the_older_node_wins_a_cloned_key_whoever_asks() {
    let young = node(2, 50, 1, 2, 24); // node-1's key, and its private half
    let nodes = vec![simple(1), young];
    for asker in ["node-1", "node-2"] {
        let d = plan(&snapshot(nodes.clone()), &local(asker));
        assert!(matches!(d.verdicts["node-1"], Verdict::Accepted(_)));
        assert!(matches!(&d.verdicts["node-2"], Verdict::Rejected(r) if r.reason() == "conflict"));
    }
}

/// `node`'s published link state says it cannot reach `others`.
fn reports(node: &mut NodeInfo, others: &[&str]) {
    node.annotations
        .insert(crate::annotations::UNREACHABLE.into(), others.join(","));
}

#[test]
fn an_unreachable_peer_stays_a_peer_but_its_prefixes_go_through_a_relay() {
    let mut n1 = simple(1);
    reports(&mut n1, &["node-2"]);
    let nodes = vec![n1, simple(2), simple(3)];
    let d1 = plan(&snapshot(nodes.clone()), &local("node-1"));
    assert!(
        d1.peers[&key(2)].allowed_ips.is_empty(),
        "still a peer (handshakes go on), but nothing goes to it directly"
    );
    assert_eq!(
        d1.peers[&key(3)].allowed_ips,
        BTreeSet::from([mesh(2), mesh(3), net("198.19.2.0/24"), net("198.19.3.0/24"),])
    );
    assert_eq!(d1.paths["node-2"], Hop::Via("node-3".into()));
    assert!(d1
        .routes
        .iter()
        .any(|r| r.kind == RouteKind::Mesh && r.dst == net("198.19.2.0/24")));
    // node-2 agrees from node-1's report alone, and node-3 relays.
    let d2 = plan(&snapshot(nodes.clone()), &local("node-2"));
    assert!(d2.peers[&key(1)].allowed_ips.is_empty());
    assert!(d2.peers[&key(3)]
        .allowed_ips
        .contains(&net("198.19.1.0/24")));
    let d3 = plan(&snapshot(nodes), &local("node-3"));
    assert_eq!(d3.paths["node-1"], Hop::Direct);
    assert!(d3.peers[&key(1)]
        .allowed_ips
        .contains(&net("198.19.1.0/24")));
    assert!(d3.peers[&key(2)]
        .allowed_ips
        .contains(&net("198.19.2.0/24")));
}

#[test]
fn a_peer_nobody_reaches_loses_its_routes() {
    let mut n1 = simple(1);
    let mut n3 = simple(3);
    reports(&mut n1, &["node-2"]);
    reports(&mut n3, &["node-2"]);
    let d = plan(&snapshot(vec![n1, simple(2), n3]), &local("node-1"));
    assert_eq!(d.paths["node-2"], Hop::None);
    assert!(d.peers[&key(2)].allowed_ips.is_empty());
    assert!(!d
        .routes
        .iter()
        .any(|r| r.kind == RouteKind::Mesh && overlap(&r.dst, &net("198.19.2.0/24"))));
    assert!(backstopped(&d));
}

#[test]
fn claims_outside_what_the_control_plane_assigned_are_refused() {
    // A Node with no spec and no block in the record claims public ranges
    // (the hijack seen: every node routed them into WireGuard).
    let mut evil = simple(7);
    evil.spec_pod_cidrs.clear();
    evil.annotations.insert(
        crate::annotations::POD_CIDRS.into(),
        "8.8.8.0/24,1.0.0.0/8".into(),
    );
    // Another claims the cluster's whole range through a spec saying so.
    let mut greedy = node(8, 8, 8, 0, 16);
    greedy.spec_pod_cidrs = vec![net("198.19.0.0/16")];
    // A third, without a spec, takes a block the record gives node-2.
    let mut squatter = node(9, 9, 9, 2, 24);
    squatter.spec_pod_cidrs.clear();
    let mut snap = snapshot(vec![simple(1), simple(2), evil, greedy, squatter]);
    snap.blocks
        .blocks
        .insert(net("198.19.2.0/24"), "node-2".into());
    for asker in ["node-1", "node-2"] {
        let d = plan(&snap, &local(asker));
        for (n, reason) in [
            ("node-7", "bad_pod_cidr"),
            ("node-8", "bad_pod_cidr"),
            ("node-9", "pod_cidr_not_assigned"),
        ] {
            assert!(
                matches!(&d.verdicts[n], Verdict::Rejected(r) if r.reason() == reason),
                "{n}: {:?}",
                d.verdicts[n]
            );
        }
        assert_eq!(d.peers.len(), 1);
        for r in &d.routes {
            assert!(
                ClusterRanges::lab()
                    .all()
                    .any(|range| range.contains(&r.dst)),
                "{r:?} is outside the cluster's ranges"
            );
        }
    }
}

/// Equal endpoints are no conflict: both nodes are peers, each under its
/// own key (only the real one answers handshakes for it), so an older node
/// copying a younger one's endpoint excludes nobody.
#[test]
fn two_nodes_on_one_endpoint_are_both_peers() {
    let mut copy = simple(1);
    copy.annotations
        .insert(ENDPOINT.into(), "[::ffff:198.18.1.2]:51820".into());
    let d = plan(
        &snapshot(vec![copy, simple(2), simple(3)]),
        &local("node-3"),
    );
    assert!(d
        .verdicts
        .values()
        .all(|v| matches!(v, Verdict::Accepted(_))));
    let ip = |k| d.peers[&key(k)].endpoint.map(|e| e.ip().to_canonical());
    assert_eq!(ip(1), ip(2));
}

/// Nodes behind NAT publish no endpoint: two of them do not conflict, and
/// their peers are configured without one (WireGuard learns it from their
/// handshakes).
#[test]
fn nodes_behind_nat_have_no_endpoint_and_do_not_conflict() {
    let mut nodes = vec![simple(1), simple(2), simple(3)];
    for n in &mut nodes[1..] {
        n.annotations.remove(ENDPOINT);
    }
    let d = plan(&snapshot(nodes), &local("node-1"));
    assert!(d
        .verdicts
        .values()
        .all(|v| matches!(v, Verdict::Accepted(_))));
    assert_eq!(d.peers[&key(2)].endpoint, None);
    assert_eq!(d.peers[&key(3)].endpoint, None);
    assert_eq!(d.paths["node-3"], Hop::Direct);
}

/// A peer's addresses: its endpoint, then its candidates (no region
/// shared); the best not given up, unless one it answered at is still
/// offered, which stays even when a new address ranks above it.
#[test]
fn a_peer_is_sent_to_its_best_address_or_the_one_it_answered_at() {
    use crate::annotations::CANDIDATES;
    let mut two = simple(2);
    two.annotations
        .insert(CANDIDATES.into(), "10.0.0.2:51820".into());
    let nodes = vec![simple(1), two.clone()];
    let endpoint = |nodes: &[NodeInfo], local: &LocalConfig| {
        plan(&snapshot(nodes.to_vec()), local).peers[&key(2)].endpoint
    };
    let addr = |s: &str| -> std::net::SocketAddr { s.parse().unwrap() };
    let mut me = local("node-1");
    assert_eq!(endpoint(&nodes, &me), Some(addr("198.18.1.2:51820")));
    assert_eq!(
        plan(&snapshot(nodes.clone()), &me).peers[&key(2)].offers,
        [addr("198.18.1.2:51820"), addr("10.0.0.2:51820")]
    );
    me.given_up
        .insert("node-2".into(), [addr("198.18.1.2:51820")].into());
    assert_eq!(endpoint(&nodes, &me), Some(addr("10.0.0.2:51820")));
    // It answered there; then it (or a liar, for a NAT'd node's observed
    // addresses) offers a new address above it: kept.
    me.given_up.clear();
    me.confirmed.insert("node-2".into(), addr("10.0.0.2:51820"));
    two.annotations
        .insert(CANDIDATES.into(), "10.0.0.9:51820,10.0.0.2:51820".into());
    let nodes = vec![simple(1), two.clone()];
    assert_eq!(endpoint(&nodes, &me), Some(addr("10.0.0.2:51820")));
    // No longer offered: the best again.
    two.annotations
        .insert(CANDIDATES.into(), "10.0.0.9:51820".into());
    let nodes = vec![simple(1), two];
    assert_eq!(endpoint(&nodes, &me), Some(addr("198.18.1.2:51820")));
}

#[test]
fn the_parse_memo_returns_what_parsing_returns() {
    let r = ClusterRanges::lab();
    let mut memo = ParseMemo::default();
    let mut check = |nodes: &[NodeInfo]| {
        let snap = snapshot(nodes.to_vec());
        let named = |parsed: Vec<Parsed>| -> Vec<(String, Result<Option<Claim>, _>)> {
            parsed
                .into_iter()
                .map(|(n, p)| (n.name.clone(), p))
                .collect()
        };
        assert_eq!(
            named(memo.parse_all(&snap, &r)),
            named(parse_all(&snap, &r))
        );
    };
    let mut nodes = vec![simple(1), simple(2), simple(3)];
    check(&nodes);
    check(&nodes);
    nodes[1]
        .annotations
        .insert(ENDPOINT.into(), "[::]:0".into());
    check(&nodes);
    nodes[0].spec_pod_cidrs = vec![net("198.19.9.0/24")];
    check(&nodes);
    nodes.pop();
    check(&nodes);
    nodes.push(simple(3));
    check(&nodes);
    // Registered again under the same name, with the old annotations: the
    // proof is for the old UID, and the memo does not hide it.
    nodes[2].uid = "node-3-registered-again".into();
    check(&nodes);
    assert!(matches!(
        memo.parse_all(&snapshot(nodes.clone()), &r)[2].1,
        Err(crate::annotations::Rejection::BadKeyProof { .. })
    ));
}

/// Arbitrary clusters where keys (cloned: each proven), pod blocks and
/// ages collide often, and some annotations are garbage.
fn clusters() -> impl Strategy<Value = Vec<NodeInfo>> {
    proptest::collection::vec(
        (
            0i64..4,
            1u8..8,
            0u8..10,
            prop_oneof![Just(24u8), Just(23u8)],
            0u8..10,
        ),
        1..10,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (created, key_seed, block, len, garbage))| {
                let mut n = node(i as u8 + 1, created, key_seed, block, len);
                if garbage == 0 {
                    n.annotations.insert(ENDPOINT.into(), "[::]:0".into());
                }
                n
            })
            .collect()
    })
}

fn allowed_overlap(d: &DesiredNode) -> Option<(IpNet, IpNet)> {
    let all: Vec<IpNet> = d
        .peers
        .values()
        .flat_map(|p| p.allowed_ips.iter().copied())
        .collect();
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if overlap(a, b) {
                return Some((*a, *b));
            }
        }
    }
    None
}

proptest! {
    #[test]
    fn independent_of_input_order(nodes in clusters(), seed in any::<u64>()) {
        let asker = nodes[0].name.clone();
        let a = plan(&snapshot(nodes.clone()), &local(&asker));
        let mut shuffled = nodes;
        // A deterministic shuffle from the seed.
        let n = shuffled.len();
        for i in (1..n).rev() {
            shuffled.swap(i, (seed.wrapping_mul(i as u64 + 7) % (i as u64 + 1)) as usize);
        }
        prop_assert_eq!(a, plan(&snapshot(shuffled), &local(&asker)));
    }

    #[test]
    fn no_two_peers_share_an_allowed_ip(nodes in clusters()) {
        let d = plan(&snapshot(nodes.clone()), &local(&nodes[0].name));
        prop_assert_eq!(allowed_overlap(&d), None);
        // And no peer is allowed our own addresses.
        for p in d.peers.values() {
            for own in &d.addresses {
                prop_assert!(!p.allowed_ips.iter().any(|a| overlap(a, own)));
            }
        }
    }

    #[test]
    fn every_valid_node_is_a_peer(n in 1u8..30) {
        let nodes: Vec<NodeInfo> = (1..=n).map(simple).collect();
        let d = plan(&snapshot(nodes), &local("node-1"));
        prop_assert_eq!(d.peers.len(), usize::from(n) - 1);
        prop_assert!(d.verdicts.values().all(|v| matches!(v, Verdict::Accepted(_))));
    }

    /// Fail closed: whatever the cluster says, every cluster range keeps its
    /// backstop and every mesh route lies inside one, to an accepted peer.
    #[test]
    fn every_mesh_route_is_backstopped(mut nodes in clusters(), down in 0u8..10) {
        let l = local(&nodes[0].name);
        let name = format!("node-{down}");
        reports(&mut nodes[0], &[&name]);
        let d = plan(&snapshot(nodes), &l);
        prop_assert!(backstopped(&d));
        for r in d.routes.iter().filter(|r| r.kind == RouteKind::Mesh) {
            prop_assert!(ClusterRanges::lab().all().any(|range| range.contains(&r.dst)));
            prop_assert!(d.peers.values().any(|p| p.allowed_ips.contains(&r.dst)));
        }
    }

    /// The indexed judge reaches exactly the pairwise comparison's verdicts,
    /// rejections (field, value, holder) included.
    #[test]
    fn indexed_verdicts_equal_pairwise_ones(nodes in clusters()) {
        let snap = snapshot(nodes);
        let r = ClusterRanges::lab();
        prop_assert_eq!(judge(&snap, &r), judge_pairwise(&snap, &r));
    }

    #[test]
    fn every_node_reaches_the_same_verdicts(nodes in clusters()) {
        let first = plan(&snapshot(nodes.clone()), &local(&nodes[0].name)).verdicts;
        for n in &nodes {
            prop_assert_eq!(&first, &plan(&snapshot(nodes.clone()), &local(&n.name)).verdicts);
        }
    }

    /// Cryptokey routing holds across the cluster on random link failures:
    /// wherever node S puts T's prefixes (on peer X), a packet S sends T
    /// through X is accepted all the way and the reply comes back the same
    /// way: X = T puts S's prefixes on S; a relay X puts S's on S and T's
    /// on T; and T expects S's from X.
    #[test]
    fn every_node_agrees_on_every_path(n in 2u8..9, cuts in proptest::collection::vec((1u8..9, 1u8..9), 0..12)) {
        let mut nodes: Vec<NodeInfo> = (1..=n).map(simple).collect();
        let mut reported: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (a, b) in cuts {
            if a <= n && b <= n && a != b {
                reported.entry(usize::from(a - 1)).or_default().push(format!("node-{b}"));
            }
        }
        for (i, others) in &mut reported {
            others.sort();
            others.dedup();
            let names: Vec<&str> = others.iter().map(String::as_str).collect();
            reports(&mut nodes[*i], &names);
        }
        let snap = snapshot(nodes);
        let plans: BTreeMap<u8, DesiredNode> =
            (1..=n).map(|i| (i, plan(&snap, &local(&format!("node-{i}"))))).collect();
        let pod = |i: u8| net(&format!("198.19.{i}.0/24"));
        let carrier = |at: u8, of: u8| -> Option<u8> {
            plans[&at].peers.iter().find(|(_, p)| p.allowed_ips.contains(&pod(of))).map(|(k, _)| (1..=n).find(|i| key(*i) == *k).expect("a node's key"))
        };
        for s in 1..=n {
            prop_assert_eq!(allowed_overlap(&plans[&s]), None);
            for t in (1..=n).filter(|t| *t != s) {
                match carrier(s, t) {
                    Some(x) if x == t => prop_assert_eq!(carrier(t, s), Some(s)),
                    Some(r) => {
                        prop_assert_eq!(carrier(r, s), Some(s));
                        prop_assert_eq!(carrier(r, t), Some(t));
                        prop_assert_eq!(carrier(t, s), Some(r));
                    }
                    None => prop_assert_eq!(carrier(t, s), None),
                }
            }
        }
    }
}

/// A rotating node's peers configure its next key: at once when it
/// overlaps, at the announced time when it switches; the old key is
/// never configured beside it (one entry per node).
#[test]
fn peers_move_to_a_next_key_when_it_says() {
    use crate::annotations::{render_time, NEXT_KEY_AT};
    let mut rotating = simple(2);
    announce(&mut rotating, 9);
    let keys_at = |rotating: &NodeInfo, now: u64| -> Vec<PublicKey> {
        let snap = ClusterSnapshot {
            now,
            ..snapshot(vec![simple(1), rotating.clone()])
        };
        plan(&snap, &local("node-1")).peers.into_keys().collect()
    };
    assert_eq!(keys_at(&rotating, 100), [key(9)]);
    rotating
        .annotations
        .insert(NEXT_KEY_AT.into(), render_time(105));
    assert_eq!(keys_at(&rotating, 104), [key(2)], "not before its time");
    assert_eq!(keys_at(&rotating, 105), [key(9)]);
}

/// A next key is held like a key: a node proving it (a clone of the
/// holder) is the later claim and is out; a revoked key, current or next,
/// puts its holder out before anything else.
#[test]
fn next_keys_conflict_and_revoked_keys_are_out() {
    use crate::annotations::Rejection;
    let mut older = simple(1);
    announce(&mut older, 3);
    let clone = simple(3);
    let verdicts = judge(&snapshot(vec![older.clone(), clone]), &ClusterRanges::lab());
    assert!(
        matches!(&verdicts["node-3"], Verdict::Rejected(Rejection::Conflict { holder, .. }) if holder == "node-1"),
        "{verdicts:?}"
    );
    for revoked in [key(1), key(3)] {
        let snap = ClusterSnapshot {
            revoked: std::sync::Arc::new(BTreeSet::from([revoked])),
            ..snapshot(vec![older.clone(), simple(2)])
        };
        let verdicts = judge(&snap, &ClusterRanges::lab());
        assert_eq!(
            verdicts["node-1"],
            Verdict::Rejected(Rejection::Revoked(revoked))
        );
        assert!(matches!(verdicts["node-2"], Verdict::Accepted(_)));
        let d = plan(&snap, &local("node-2"));
        assert!(d.peers.is_empty(), "no peer entry for a revoked node");
    }
}

/// The oldest node, with nothing but what the others publish, copies a
/// younger node's key (with its proof), next key, endpoint and mesh
/// address: it excludes only itself, and the victim stays a peer with all
/// it had, on every node.
#[test]
fn the_oldest_node_copying_a_younger_one_hurts_only_itself() {
    use crate::annotations::{NEXT_KEY_AT, NEXT_KEY_PROOF, NEXT_PUBLIC_KEY};
    let victim = simple(3);
    let copy = |keys: &[&str]| {
        let mut attacker = NodeInfo {
            created: -1_000_000,
            ..simple(1)
        };
        for k in keys {
            attacker
                .annotations
                .insert(k.to_string(), victim.annotations[*k].clone());
        }
        attacker
    };
    let mut rotating_victim = victim.clone();
    announce(&mut rotating_victim, 9);
    let next = |attacker: &mut NodeInfo| {
        attacker.annotations.insert(
            NEXT_PUBLIC_KEY.into(),
            rotating_victim.annotations[NEXT_PUBLIC_KEY].clone(),
        );
        attacker.annotations.insert(
            NEXT_KEY_PROOF.into(),
            rotating_victim.annotations[NEXT_KEY_PROOF].clone(),
        );
        attacker
            .annotations
            .insert(NEXT_KEY_AT.into(), "2999-01-01T00:00:00Z".into());
    };
    let mut next_copied = copy(&[]);
    next(&mut next_copied);
    let cases: Vec<(&str, NodeInfo, NodeInfo, Option<&str>)> = vec![
        (
            "key and proof",
            copy(&[PUBLIC_KEY, KEY_PROOF]),
            victim.clone(),
            Some("bad_key_proof"),
        ),
        (
            "next key and proof, switch in 2999",
            next_copied,
            rotating_victim.clone(),
            Some("bad_key_proof"),
        ),
        (
            "mesh address",
            copy(&[crate::annotations::MESH_ADDRESSES]),
            victim.clone(),
            Some("bad_mesh_address"),
        ),
        ("endpoint", copy(&[ENDPOINT]), victim.clone(), None),
    ];
    for (what, attacker, victim, attacker_verdict) in cases {
        let nodes = vec![attacker, simple(2), victim];
        for asker in ["node-1", "node-2", "node-3"] {
            let d = plan(&snapshot(nodes.clone()), &local(asker));
            assert!(
                matches!(d.verdicts["node-3"], Verdict::Accepted(_)),
                "{what}, asked on {asker}: {:?}",
                d.verdicts["node-3"]
            );
            match (attacker_verdict, &d.verdicts["node-1"]) {
                (Some(want), Verdict::Rejected(r)) => assert_eq!(r.reason(), want, "{what}"),
                (None, Verdict::Accepted(_)) => {}
                (_, other) => panic!("{what}: node-1 is {other:?}"),
            }
            if asker != "node-3" {
                let to_victim = d.peers.values().find(|p| p.node == "node-3").unwrap();
                assert!(to_victim.allowed_ips.contains(&mesh(3)), "{what}");
                assert!(
                    to_victim.allowed_ips.contains(&net("198.19.3.0/24")),
                    "{what}"
                );
            }
        }
    }
}

/// A key switch scheduled further ahead than any lead allows is refused
/// (announcing one costs nothing until it comes).
#[test]
fn a_key_switch_too_far_ahead_is_refused() {
    use crate::annotations::{render_time, MAX_KEY_SWITCH_AHEAD, NEXT_KEY_AT};
    let mut rotating = simple(2);
    announce(&mut rotating, 9);
    let now = 1_800_000_000;
    for (at, ok) in [
        (now + 5, true),
        (now + MAX_KEY_SWITCH_AHEAD, true),
        (now + MAX_KEY_SWITCH_AHEAD + 1, false),
    ] {
        rotating
            .annotations
            .insert(NEXT_KEY_AT.into(), render_time(at));
        let snap = ClusterSnapshot {
            now,
            ..snapshot(vec![simple(1), rotating.clone()])
        };
        let verdict = &judge(&snap, &ClusterRanges::lab())["node-2"];
        match verdict {
            Verdict::Accepted(_) => assert!(ok, "{at}"),
            Verdict::Rejected(r) => {
                assert!(!ok, "{at}: {r}");
                assert!(r.to_string().starts_with(NEXT_KEY_AT), "{r}");
            }
            other => panic!("{other:?}"),
        }
    }
}

/// The removal path: a deleted node's and a revoked key's peers go, with
/// the prefixes they carried (a relay's included) and the routes to them;
/// nothing else changes, and pruning again changes nothing.
#[test]
fn prune_removes_gone_and_revoked_peers_and_only_them() {
    let mut n1 = simple(1);
    reports(&mut n1, &["node-4"]);
    let nodes = vec![n1, simple(2), simple(3), simple(4)];
    let applied = plan(&snapshot(nodes), &local("node-1"));
    // node-4 is relayed: through node-2 (the cheapest, first by name).
    let relay = match &applied.paths["node-4"] {
        Hop::Via(r) => r.clone(),
        other => panic!("{other:?}"),
    };
    let names =
        |live: &[&'static str]| -> BTreeSet<&'static str> { live.iter().copied().collect() };
    let all = names(&["node-1", "node-2", "node-3", "node-4"]);
    let none = BTreeSet::new();
    assert_eq!(
        prune(&applied, &all, &none),
        applied,
        "nothing gone, nothing changes"
    );

    // node-3 deleted: its peer and its prefixes' routes go; the rest stays.
    let without_3 = prune(&applied, &names(&["node-1", "node-2", "node-4"]), &none);
    assert!(!without_3.peers.values().any(|p| p.node == "node-3"));
    for dst in [mesh(3), net("198.19.3.0/24")] {
        assert!(!without_3.routes.iter().any(|r| r.dst == dst), "{dst}");
    }
    assert_eq!(without_3.peers.len(), applied.peers.len() - 1);
    assert!(backstopped(&without_3));
    assert_eq!(prune(&without_3, &all, &none), without_3, "idempotent");

    // The relay's key revoked: it goes with node-4's prefixes it carried.
    let relay_key = *applied
        .peers
        .iter()
        .find(|(_, p)| p.node == relay)
        .unwrap()
        .0;
    let revoked = prune(&applied, &all, &BTreeSet::from([relay_key]));
    assert!(!revoked.peers.contains_key(&relay_key));
    assert!(!revoked
        .routes
        .iter()
        .any(|r| r.kind == RouteKind::Mesh && r.dst == net("198.19.4.0/24")));
    assert!(revoked.routes.iter().any(|r| r.dst == net("198.19.3.0/24")) || relay == "node-3");
    assert!(backstopped(&revoked));
}

/// Node `i`'s host address as a host route.
fn host(i: u8) -> IpNet {
    net(&format!("198.18.1.{i}/32"))
}

/// `name` believing the other nodes' host addresses (in the lab's
/// underlay, each heard from there).
fn with_hosts(name: &str) -> LocalConfig {
    LocalConfig {
        host_networks: vec![net("198.18.0.0/17")],
        heard_from: (1..=4)
            .map(|i| (format!("node-{i}"), SocketAddr::new(host(i).addr(), 51820)))
            .collect(),
        ..local(name)
    }
}

fn host_routes(d: &DesiredNode) -> BTreeSet<(IpNet, RouteKind)> {
    d.routes
        .iter()
        .filter(|r| matches!(r.kind, RouteKind::HostMesh | RouteKind::HostUnreachable))
        .map(|r| (r.dst, r.kind))
        .collect()
}

/// Pods reach other nodes' host addresses through the peer that carries
/// the node's pods (itself or its relay), and nowhere when it has no path:
/// each has an unreachable backstop under its mesh route, which stays when
/// the interface (and with it the mesh route) is gone; the node's own
/// address is never routed; prune takes them with their peer.
#[test]
fn host_addresses_go_where_the_nodes_pods_go() {
    let direct = plan(
        &snapshot(vec![simple(1), simple(2), simple(3)]),
        &with_hosts("node-1"),
    );
    assert!(direct.peers[&key(2)].allowed_ips.contains(&host(2)));
    assert_eq!(
        host_routes(&direct),
        BTreeSet::from([
            (host(2), RouteKind::HostMesh),
            (host(2), RouteKind::HostUnreachable),
            (host(3), RouteKind::HostMesh),
            (host(3), RouteKind::HostUnreachable),
        ])
    );
    assert!(
        host_routes(&plan(
            &snapshot(vec![simple(1), simple(2)]),
            &local("node-1")
        ))
        .is_empty(),
        "no host networks: nothing tunnelled"
    );

    let mut n1 = simple(1);
    reports(&mut n1, &["node-2"]);
    let nodes = vec![n1, simple(2), simple(3)];
    let relayed = plan(&snapshot(nodes.clone()), &with_hosts("node-1"));
    assert!(relayed.peers[&key(3)].allowed_ips.contains(&host(2)));
    assert!(!relayed.peers[&key(2)].allowed_ips.contains(&host(2)));
    assert!(host_routes(&relayed).contains(&(host(2), RouteKind::HostMesh)));
    let relay = plan(&snapshot(nodes), &with_hosts("node-3"));
    assert!(
        relay.peers[&key(2)].allowed_ips.contains(&host(2)),
        "the relay forwards pods' traffic on to the host"
    );

    let mut n1 = simple(1);
    let mut n3 = simple(3);
    reports(&mut n1, &["node-2"]);
    reports(&mut n3, &["node-2"]);
    let cut = plan(&snapshot(vec![n1, simple(2), n3]), &with_hosts("node-1"));
    assert_eq!(cut.paths["node-2"], Hop::None);
    assert!(host_routes(&cut).contains(&(host(2), RouteKind::HostUnreachable)));
    assert!(!host_routes(&cut).contains(&(host(2), RouteKind::HostMesh)));

    let pruned = prune(
        &direct,
        &BTreeSet::from(["node-1", "node-2"]),
        &BTreeSet::new(),
    );
    assert_eq!(
        host_routes(&pruned),
        BTreeSet::from([
            (host(2), RouteKind::HostMesh),
            (host(2), RouteKind::HostUnreachable),
            // A backstop stays until a full pass: refused, never plaintext.
            (host(3), RouteKind::HostUnreachable),
        ])
    );
}
