//! One sync's decision, pure: from what meshd gathered (the Nodes and block
//! record it watches, its key, its pod ranges, its settings and what it
//! observed of its peers) to what it must do — the annotations to publish,
//! the node as it should be, every node's verdict. The agent gathers the
//! inputs and applies the decision; nothing here does I/O.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::annotations::{self, Claim, KeyProofs, PolicyApplied, POLICY_APPLIED};
use crate::model::{ClusterSnapshot, DesiredNode, LocalConfig};
use crate::planner::{
    judge_parsed, nat, own_claim, own_reachability, plan_judged, Listening, OwnError, OwnKeys,
    ParseMemo,
};

/// Everything a sync decides from.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub snapshot: &'a ClusterSnapshot,
    pub local: &'a LocalConfig,
    pub keys: OwnKeys,
    /// Proofs of `keys` (made where the private keys are).
    pub proofs: KeyProofs,
    pub listening: Listening<'a>,
    /// This node's pod ranges: its `spec.podCIDRs`, or the blocks it
    /// claimed in the record (claiming is I/O, so it is gathered).
    pub pod_cidrs: Vec<IpNet>,
    /// What this node reports beside its claim, to publish.
    pub status: Status,
}

/// What a node reports on its Node beside its claim: status for meshctl,
/// which peers do not read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The NetworkPolicies this node enforces.
    pub policy_applied: Option<PolicyApplied>,
    /// Its post-quantum links.
    pub post_quantum: Option<annotations::PostQuantum>,
}

impl Status {
    fn render(&self, into: &mut BTreeMap<String, String>) {
        if let Some(applied) = self.policy_applied {
            into.insert(POLICY_APPLIED.to_string(), applied.to_string());
        }
        if let Some(pq) = &self.post_quantum {
            into.insert(annotations::POST_QUANTUM.to_string(), pq.to_string());
        }
    }
}

/// What a sync must do.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The merge patch for this node's annotations, when they must change.
    pub patch: Option<serde_json::Value>,
    /// What this node claims (and publishes).
    pub claim: Claim,
    /// The node as it should be, planned with the claim as published.
    pub desired: DesiredNode,
}

/// `memo` keeps parse results between decisions (see [`ParseMemo`]).
pub fn decide(inputs: &Inputs, memo: &mut ParseMemo) -> Result<Decision, OwnError> {
    let Inputs {
        snapshot,
        local,
        keys,
        proofs,
        listening,
        pod_cidrs,
        status,
    } = inputs;
    let me = snapshot
        .nodes
        .iter()
        .find(|n| n.name == local.node_name)
        .ok_or_else(|| OwnError::NotRegistered(local.node_name.clone()))?;
    // Every node's annotations are parsed once.
    let mut parsed = memo.parse_all(snapshot, &local.ranges);
    // Other nodes' valid claims (a revoked key's holder observes nothing).
    let peers: BTreeMap<&str, nat::Listed> = parsed
        .iter()
        .filter(|(n, _)| n.name != local.node_name)
        .filter_map(|(node, c)| {
            let claim: &Claim = c.as_ref().ok()?.as_ref()?;
            Some((node.name.as_str(), nat::Listed { claim, node }))
        })
        .filter(|(_, p)| !snapshot.revoked.contains(&p.claim.public_key))
        .collect();
    let seen = nat::observations_of(&local.node_name, peers.values().map(|p| p.claim));
    let reachability = own_reachability(
        me,
        *listening,
        &local.ranges,
        &seen,
        &local.heard_from,
        &local.observed_before,
        &peers,
    )?;
    let claim = own_claim(
        me,
        local,
        keys,
        proofs.clone(),
        reachability,
        pod_cidrs.clone(),
    )?;
    let mut published = annotations::render(&claim);
    status.render(&mut published);
    let patch = annotations::patch(&me.annotations, &published);
    // Plan with what is being published rather than wait for its echo.
    // (Owned annotations no longer published are gone from it too.)
    let mut mine = me.clone();
    mine.annotations
        .retain(|k, _| !annotations::OWNED.contains(&k.as_str()));
    mine.annotations.extend(published);
    let own = annotations::parse(&mine, &local.ranges, &snapshot.assigned(me));
    if let Some(entry) = parsed.iter_mut().find(|(n, _)| n.name == local.node_name) {
        entry.1 = own;
    }
    let verdicts = judge_parsed(parsed, &snapshot.revoked, snapshot.now);
    Ok(Decision {
        patch,
        desired: plan_judged(snapshot, local, verdicts),
        claim,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::annotations::{fixtures, render, FORCE_ENDPOINT, POD_CIDRS};
    use crate::model::{ClusterRanges, NodeInfo, Placement, Verdict};

    fn node(k: u8, annotations: BTreeMap<String, String>) -> NodeInfo {
        NodeInfo {
            name: format!("node-{k}"),
            uid: format!("node-{k}-uid"),
            created: i64::from(k),
            internal_ips: vec![format!("198.18.1.{k}").parse().unwrap()],
            external_ips: vec![],
            spec_pod_cidrs: vec![
                format!("198.19.{k}.0/24").parse().unwrap(),
                format!("fd98:19:0:{k}::/64").parse().unwrap(),
            ],
            annotations,
            placement: Placement::anywhere(),
        }
    }

    use fixtures::key;

    fn local() -> LocalConfig {
        LocalConfig::new("node-1", ClusterRanges::lab())
    }

    fn inputs<'a>(snapshot: &'a ClusterSnapshot, local: &'a LocalConfig) -> Inputs<'a> {
        Inputs {
            snapshot,
            local,
            keys: crate::planner::OwnKeys::steady(key(1), 0),
            proofs: fixtures::proofs(&node(1, BTreeMap::new()), 1, None),
            listening: Listening {
                endpoint: None,
                prefer: Default::default(),
                extra: &[],
                port: 51820,
            },
            pod_cidrs: node(1, BTreeMap::new()).spec_pod_cidrs,
            status: Status::default(),
        }
    }

    /// A published node-2, as its own meshd would have rendered it.
    fn peer() -> NodeInfo {
        let claim = Claim {
            public_key: key(2),
            proofs: std::sync::Arc::new(fixtures::proofs(&node(2, BTreeMap::new()), 2, None)),
            endpoint: Some("198.18.1.2:51820".parse().unwrap()),
            mesh_addresses: vec!["198.18.128.129".parse().unwrap()],
            pod_cidrs: vec!["198.19.2.0/24".parse().unwrap()],
            unreachable: Default::default(),
            key_since: None,
            next_key: None,
            observed: Default::default(),
            nat: None,
            candidates: Vec::new(),
            given_up: Default::default(),
        };
        node(2, render(&claim))
    }

    #[test]
    fn a_fresh_node_publishes_and_plans_with_what_it_publishes() {
        let snap = ClusterSnapshot {
            nodes: vec![node(1, BTreeMap::new()), peer()],
            blocks: Default::default(),
            ..Default::default()
        };
        let l = local();
        let d = decide(&inputs(&snap, &l), &mut ParseMemo::default()).unwrap();
        let patch = d.patch.expect("a fresh node publishes");
        assert_eq!(
            patch["metadata"]["annotations"][POD_CIDRS],
            "198.19.1.0/24,fd98:19:0:1::/64"
        );
        // Its own verdict is already Accepted: it planned with the claim.
        assert!(matches!(d.desired.verdicts["node-1"], Verdict::Accepted(_)));
        assert_eq!(d.desired.peers.len(), 1);
        assert_eq!(d.desired.addresses.len(), 2, "a mesh address per family");
    }

    #[test]
    fn a_converged_node_writes_nothing() {
        let l = local();
        let first = {
            let snap = ClusterSnapshot {
                nodes: vec![node(1, BTreeMap::new()), peer()],
                blocks: Default::default(),
                ..Default::default()
            };
            decide(&inputs(&snap, &l), &mut ParseMemo::default()).unwrap()
        };
        let snap = ClusterSnapshot {
            nodes: vec![node(1, render(&first.claim)), peer()],
            blocks: Default::default(),
            ..Default::default()
        };
        let again = decide(&inputs(&snap, &l), &mut ParseMemo::default()).unwrap();
        assert_eq!(again.patch, None);
        assert_eq!(again.desired, first.desired);
    }

    /// The policy status rides along with the claim: a new set is one
    /// patch of that key alone, the same set none, enforcement turned off
    /// removes it; it never changes the plan.
    #[test]
    fn the_policy_status_is_published_alone_and_plans_nothing() {
        let l = local();
        let snap = ClusterSnapshot {
            nodes: vec![node(1, BTreeMap::new()), peer()],
            ..Default::default()
        };
        let plain = decide(&inputs(&snap, &l), &mut ParseMemo::default()).unwrap();
        let converged = ClusterSnapshot {
            nodes: vec![node(1, render(&plain.claim)), peer()],
            ..Default::default()
        };
        let applied = PolicyApplied {
            policies: 3,
            revision: 4711,
        };
        let with = |snapshot, policy_applied| {
            let inputs = Inputs {
                status: Status {
                    policy_applied,
                    post_quantum: None,
                },
                ..inputs(snapshot, &l)
            };
            decide(&inputs, &mut ParseMemo::default()).unwrap()
        };
        let d = with(&converged, Some(applied));
        assert_eq!(
            d.patch,
            Some(serde_json::json!({"metadata": {"annotations": {
                POLICY_APPLIED: "policies=3,revision=4711"
            }}}))
        );
        assert_eq!(d.desired, plain.desired);
        let mut published = render(&plain.claim);
        published.insert(POLICY_APPLIED.into(), applied.to_string());
        let current = ClusterSnapshot {
            nodes: vec![node(1, published), peer()],
            ..Default::default()
        };
        assert_eq!(with(&current, Some(applied)).patch, None);
        let off = with(&current, None).patch.expect("the status is removed");
        assert_eq!(
            off["metadata"]["annotations"][POLICY_APPLIED],
            serde_json::Value::Null
        );
        assert_eq!(with(&current, None).desired, plain.desired);
    }

    /// A rotation finishing: the Node still carries the next key (now the
    /// key) in `next-public-key`; the node plans with what it publishes,
    /// which drops it, so its own claim stays valid throughout.
    #[test]
    fn a_finished_rotation_plans_without_the_stale_next_key() {
        use crate::annotations::NextPublicKey;
        let l = local();
        let empty = ClusterSnapshot::default();
        let rotating = Inputs {
            keys: crate::planner::OwnKeys {
                next: Some(NextPublicKey {
                    key: key(7),
                    at: None,
                    pending: Default::default(),
                }),
                ..crate::planner::OwnKeys::steady(key(1), 0)
            },
            proofs: fixtures::proofs(&node(1, BTreeMap::new()), 1, Some(7)),
            ..inputs(&empty, &l)
        };
        let snap = ClusterSnapshot {
            nodes: vec![node(1, BTreeMap::new()), peer()],
            ..Default::default()
        };
        let during = decide(
            &Inputs {
                snapshot: &snap,
                ..rotating
            },
            &mut ParseMemo::default(),
        )
        .unwrap();
        let snap = ClusterSnapshot {
            nodes: vec![node(1, render(&during.claim)), peer()],
            ..Default::default()
        };
        let finished = Inputs {
            snapshot: &snap,
            keys: crate::planner::OwnKeys::steady(key(7), 5),
            proofs: fixtures::proofs(&node(1, BTreeMap::new()), 7, None),
            ..inputs(&snap, &l)
        };
        let d = decide(&finished, &mut ParseMemo::default()).unwrap();
        assert!(
            matches!(d.desired.verdicts["node-1"], Verdict::Accepted(_)),
            "{:?}",
            d.desired.verdicts["node-1"]
        );
        assert_eq!(d.desired.addresses.len(), 2);
        let patch = d.patch.expect("the rotation's end is published");
        assert!(patch["metadata"]["annotations"][crate::annotations::NEXT_PUBLIC_KEY].is_null());
    }

    #[test]
    fn what_cannot_be_published_is_an_error_not_a_guess() {
        let l = local();
        let table: Vec<(Vec<NodeInfo>, &str)> = vec![
            (vec![peer()], "not registered"),
            (
                vec![node(
                    1,
                    BTreeMap::from([(FORCE_ENDPOINT.to_string(), "nowhere".to_string())]),
                )],
                FORCE_ENDPOINT,
            ),
            (
                vec![node(
                    1,
                    BTreeMap::from([(FORCE_ENDPOINT.to_string(), "198.19.9.9:1".to_string())]),
                )],
                "not usable",
            ),
        ];
        for (nodes, want) in table {
            let snap = ClusterSnapshot {
                nodes,
                blocks: Default::default(),
                ..Default::default()
            };
            let err = decide(&inputs(&snap, &l), &mut ParseMemo::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err} should say {want}");
        }
    }
}
