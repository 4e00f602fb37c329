//! The mesh as a graph, for `meshctl graph` and `meshctl status`: every
//! node with its verdict and link state, the links reported down and the
//! path each such pair takes, computed from the cluster by the same pure
//! functions meshd plans with — so it is what every node agrees on. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::SocketAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::annotations::{parse_time, Claim, PolicyApplied, POLICY_APPLIED, ROTATE_REQUESTED};
use crate::model::{
    ClusterRanges, ClusterSnapshot, Hop, LinkCosts, LocalConfig, Ranges, Relay, Verdict,
};
use crate::planner::nat::{reach, sightings, End, Reach, Sighting};
use crate::planner::{judge, links};
use crate::rotation::request_pending;

/// The cluster settings every meshd shares (the DaemonSet's ConfigMap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSettings {
    pub ranges: ClusterRanges,
    pub costs: LinkCosts,
    pub relay: Relay,
    /// The node blocks claims may hold.
    pub block_plans: Vec<weft_ipam::BlockPlan>,
    /// The cluster's Service ranges (`WEFT_SERVICE_CIDRS`, optional): what
    /// an external peer's configuration routes besides what it may reach.
    pub services: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("{key} is missing")]
    Missing { key: &'static str },
    #[error("{key} {value:?}: {error}")]
    Bad {
        key: &'static str,
        value: String,
        error: String,
    },
}

pub const CLUSTER_CIDRS_KEY: &str = "WEFT_CLUSTER_CIDRS";
pub const MESH_CIDRS_KEY: &str = "WEFT_MESH_CIDRS";
pub const PEER_CIDRS_KEY: &str = "WEFT_PEER_CIDRS";
pub const SERVICE_CIDRS_KEY: &str = "WEFT_SERVICE_CIDRS";
pub const LINK_COSTS_KEY: &str = "WEFT_LINK_COSTS";
pub const RELAY_KEY: &str = "WEFT_RELAY";
pub const NODE_BLOCK_V4_KEY: &str = "WEFT_NODE_BLOCK_V4";
pub const NODE_BLOCK_V6_KEY: &str = "WEFT_NODE_BLOCK_V6";

impl MeshSettings {
    /// From the ConfigMap's data; meshd's defaults where a key is absent
    /// (but the cluster's pod ranges, which have none). Errors name the key.
    pub fn from_config(data: &BTreeMap<String, String>) -> Result<Self, SettingsError> {
        let bad = |key: &'static str, value: &str, error: String| SettingsError::Bad {
            key,
            value: value.chars().take(64).collect(),
            error,
        };
        let ranges = |key: &'static str, default: Option<&str>| -> Result<Ranges, SettingsError> {
            let value = data
                .get(key)
                .map(String::as_str)
                .or(default)
                .ok_or(SettingsError::Missing { key })?;
            let cidrs = value
                .split(',')
                .map(|c| c.trim().parse::<IpNet>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(key, value, e.to_string()))?;
            Ranges::from_flag(key, &cidrs).map_err(|e| bad(key, value, e.to_string()))
        };
        let costs = match data.get(LINK_COSTS_KEY) {
            Some(v) => v
                .parse()
                .map_err(|e: crate::model::LinkCostsError| bad(LINK_COSTS_KEY, v, e.to_string()))?,
            None => LinkCosts::default(),
        };
        let relay = match data.get(RELAY_KEY) {
            Some(v) => <Relay as clap::ValueEnum>::from_str(v.trim(), false)
                .map_err(|e| bad(RELAY_KEY, v, e))?,
            None => Relay::default(),
        };
        let block_len = |key: &'static str, default: u8| -> Result<u8, SettingsError> {
            data.get(key).map_or(Ok(default), |v| {
                v.trim()
                    .parse()
                    .map_err(|e: std::num::ParseIntError| bad(key, v, e.to_string()))
            })
        };
        let pods = ranges(CLUSTER_CIDRS_KEY, None)?;
        let block_plans = crate::node_blocks::plans(
            &pods.iter().collect::<Vec<_>>(),
            block_len(NODE_BLOCK_V4_KEY, 24)?,
            block_len(NODE_BLOCK_V6_KEY, 64)?,
        )
        .map_err(|e| {
            bad(
                CLUSTER_CIDRS_KEY,
                data.get(CLUSTER_CIDRS_KEY).map_or("", String::as_str),
                e,
            )
        })?;
        let ranges = ClusterRanges {
            pods,
            mesh: ranges(MESH_CIDRS_KEY, Some(crate::model::DEFAULT_MESH_CIDRS))?,
            peers: match data.get(PEER_CIDRS_KEY) {
                None => None,
                Some(_) => Some(ranges(PEER_CIDRS_KEY, None)?),
            },
        };
        ranges
            .check_apart()
            .map_err(|e| bad(PEER_CIDRS_KEY, "", e.to_string()))?;
        let services = match data.get(SERVICE_CIDRS_KEY) {
            None => Vec::new(),
            Some(v) => v
                .split(',')
                .map(|c| c.trim().parse::<IpNet>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(SERVICE_CIDRS_KEY, v, e.to_string()))?,
        };
        Ok(Self {
            ranges,
            costs,
            relay,
            block_plans,
            services,
        })
    }
}

/// One node in the graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GraphNode {
    pub name: String,
    /// `accepted`, `pending` or `excluded`.
    pub state: &'static str,
    /// Why it is excluded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Behind NAT: how its NAT maps and where it is seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub may_relay: bool,
    /// The nodes it reports it cannot reach (its link state).
    pub unreachable: Vec<String>,
    /// When its key came into use (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_since: Option<u64>,
    /// A key rotation under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_key: Option<GraphNextKey>,
    /// An admin's rotation request (Unix seconds), if its key is older.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotate_requested: Option<u64>,
    /// The NetworkPolicies it reports it enforces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_applied: Option<PolicyApplied>,
    /// Its enforcement against the cluster's policies, when those are
    /// known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySync>,
    /// Its post-quantum mode and links without a post-quantum session
    /// (absent: off, or a value that does not parse).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_quantum: Option<crate::annotations::PostQuantum>,
}

/// Where a node's NetworkPolicy enforcement stands against the cluster's
/// NetworkPolicies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicySync {
    /// Its kernel enforces the cluster's policies.
    InSync,
    /// It enforces another set: its engine is behind, failing, or stopped.
    Behind,
    /// It reports none: enforcement is off, or has not applied yet.
    Unreported,
    /// What it reports does not parse.
    Invalid,
}

impl PolicySync {
    /// A node's `weft.dev/policy-applied`, parsed, against the cluster's set.
    pub fn of(reported: Option<&Result<PolicyApplied, String>>, cluster: PolicyApplied) -> Self {
        match reported {
            None => Self::Unreported,
            Some(Err(_)) => Self::Invalid,
            Some(Ok(applied)) if *applied == cluster => Self::InSync,
            Some(Ok(_)) => Self::Behind,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InSync => "in sync",
            Self::Behind => "behind",
            Self::Unreported => "unreported",
            Self::Invalid => "invalid",
        }
    }
}

/// A node's next key, as it announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GraphNextKey {
    pub public_key: String,
    /// When peers move to it (Unix seconds); absent: at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
    /// The peers that have not moved yet.
    pub pending: Vec<String>,
}

/// A pair of accepted nodes whose direct link is down, and their path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DownLink {
    pub a: String,
    pub b: String,
    /// The relay their traffic goes through; `None`: they cannot talk.
    pub via: Option<String>,
}

/// The mesh: every other pair of accepted nodes is linked directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshGraph {
    pub nodes: Vec<GraphNode>,
    pub down_links: Vec<DownLink>,
    /// The cluster's NetworkPolicies, when asked for (each node's
    /// [`GraphNode::policy`] is judged against them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policies: Option<PolicyApplied>,
    /// The accepted claims and how NAT'd nodes are seen, for how each
    /// pair reaches each other.
    #[serde(skip)]
    claims: BTreeMap<String, Claim>,
    #[serde(skip)]
    sightings: BTreeMap<String, Sighting>,
}

impl MeshGraph {
    /// With `policies`, the cluster's NetworkPolicies, each node's
    /// enforcement is judged against them.
    pub fn of(
        snapshot: &ClusterSnapshot,
        settings: &MeshSettings,
        policies: Option<PolicyApplied>,
    ) -> Self {
        let verdicts = judge(snapshot, &settings.ranges);
        let local = LocalConfig {
            costs: settings.costs,
            relay: settings.relay,
            ..LocalConfig::new("", settings.ranges)
        };
        let links = links(snapshot, &verdicts, &local);
        let mut nodes: Vec<GraphNode> = snapshot
            .nodes
            .iter()
            .map(|n| {
                let verdict = verdicts.get(&n.name);
                let reported = n
                    .annotations
                    .get(POLICY_APPLIED)
                    .map(|v| v.parse::<PolicyApplied>());
                let claim = match verdict {
                    Some(Verdict::Accepted(c)) => Some(c),
                    _ => None,
                };
                GraphNode {
                    name: n.name.clone(),
                    state: match verdict {
                        Some(Verdict::Accepted(_)) => "accepted",
                        Some(Verdict::Rejected(_)) => "excluded",
                        Some(Verdict::Pending) | None => "pending",
                    },
                    reason: match verdict {
                        Some(Verdict::Rejected(r)) => Some(r.to_string()),
                        _ => None,
                    },
                    public_key: claim.map(|c| c.public_key.to_string()),
                    endpoint: claim.and_then(|c| c.endpoint).map(|e| e.to_string()),
                    nat: claim.and_then(|c| c.nat).map(|m| m.to_string()),
                    region: n.placement.region.clone(),
                    zone: n.placement.zone.clone(),
                    may_relay: n.placement.may_relay,
                    unreachable: claim
                        .map(|c| c.unreachable.iter().cloned().collect())
                        .unwrap_or_default(),
                    key_since: claim.and_then(|c| c.key_since),
                    next_key: claim
                        .and_then(|c| c.next_key.as_ref())
                        .map(|next| GraphNextKey {
                            public_key: next.key.to_string(),
                            at: next.at,
                            pending: next.pending.iter().cloned().collect(),
                        }),
                    rotate_requested: n
                        .annotations
                        .get(ROTATE_REQUESTED)
                        .and_then(|v| parse_time(v).ok())
                        .filter(|r| request_pending(*r, claim.and_then(|c| c.key_since))),
                    policy_applied: reported.clone().and_then(Result::ok),
                    policy: policies.map(|p| PolicySync::of(reported.as_ref(), p)),
                    post_quantum: n
                        .annotations
                        .get(crate::annotations::POST_QUANTUM)
                        .and_then(|v| v.parse().ok()),
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let down_links = links
            .down_links()
            .into_iter()
            .map(|(a, b)| DownLink {
                a: a.to_string(),
                b: b.to_string(),
                via: match links.hop(a, b, settings.relay) {
                    Hop::Via(r) => Some(r),
                    Hop::Direct | Hop::None => None,
                },
            })
            .collect();
        let claims: BTreeMap<String, Claim> = verdicts
            .into_iter()
            .filter_map(|(name, v)| match v {
                Verdict::Accepted(c) => Some((name, c)),
                Verdict::Pending | Verdict::Rejected(_) => None,
            })
            .collect();
        let by_name: BTreeMap<&str, &Claim> = claims.iter().map(|(n, c)| (n.as_str(), c)).collect();
        let sightings = sightings(&by_name)
            .into_iter()
            .map(|(n, m)| (n.to_string(), m))
            .collect();
        Self {
            nodes,
            down_links,
            policies,
            claims,
            sightings,
        }
    }

    /// How `from` sends to `to` directly (both accepted), as `from`'s
    /// meshd plans it: with the candidates it published it gave up on.
    pub fn reach(&self, from: &str, to: &str) -> Option<Reach> {
        let end = |name: &str| {
            self.claims.get(name).map(|claim| End {
                claim,
                seen: self.sightings.get(name),
                // Sorted by name.
                region: self
                    .nodes
                    .binary_search_by(|n| n.name.as_str().cmp(name))
                    .ok()
                    .and_then(|i| self.nodes[i].region.as_deref()),
            })
        };
        Some(reach(end(from), end(to)?, &self.given_up(from, to)))
    }

    /// The addresses of `to` that `from` published it gave up on.
    pub fn given_up(&self, from: &str, to: &str) -> BTreeSet<SocketAddr> {
        self.claims
            .get(from)
            .and_then(|c| c.given_up.get(to))
            .cloned()
            .unwrap_or_default()
    }

    /// How `from` reaches each other accepted node.
    pub fn paths_from(&self, from: &str) -> BTreeMap<String, Hop> {
        let accepted = |n: &&GraphNode| n.state == "accepted" && n.name != from;
        let mut paths: BTreeMap<String, Hop> = self
            .nodes
            .iter()
            .filter(accepted)
            .map(|n| (n.name.clone(), Hop::Direct))
            .collect();
        for d in &self.down_links {
            let other = match (d.a == from, d.b == from) {
                (true, _) => &d.b,
                (_, true) => &d.a,
                _ => continue,
            };
            let hop = d.via.clone().map_or(Hop::None, Hop::Via);
            paths.insert(other.clone(), hop);
        }
        paths
    }

    /// Graphviz: nodes (grey: not accepted), direct links (only up to
    /// `max_direct` nodes: a full mesh drawn larger is a blot), down links
    /// dashed red, relayed paths dotted blue through their relay.
    pub fn dot(&self, max_direct: usize) -> String {
        let mut out =
            String::from("graph weft {\n  layout=circo;\n  node [shape=box, style=rounded];\n");
        let accepted: Vec<&GraphNode> = self
            .nodes
            .iter()
            .filter(|n| n.state == "accepted")
            .collect();
        for n in &self.nodes {
            let place = [n.region.as_deref(), n.zone.as_deref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("/");
            let (note, style) = match n.state {
                "accepted" => ("", ""),
                other => (other, ", color=grey, fontcolor=grey"),
            };
            // Graphviz's own escape for a line break inside a label.
            let nat = n
                .nat
                .as_deref()
                .map(|m| format!("NAT {m}"))
                .unwrap_or_default();
            let label = [n.name.as_str(), &place, &nat, note]
                .into_iter()
                .filter(|s| !s.is_empty())
                .map(quote)
                .collect::<Vec<_>>()
                .join("\\n");
            let _ = writeln!(out, "  \"{}\" [label=\"{label}\"{style}];", quote(&n.name));
        }
        let down: BTreeSet<(&str, &str)> = self
            .down_links
            .iter()
            .map(|d| (d.a.as_str(), d.b.as_str()))
            .collect();
        if accepted.len() <= max_direct {
            for (i, a) in accepted.iter().enumerate() {
                for b in &accepted[i + 1..] {
                    if !down.contains(&(a.name.as_str(), b.name.as_str())) {
                        // Through NATs: how the pair met.
                        let how = match self.reach(&a.name, &b.name) {
                            Some(Reach::HolePunched(_)) => ", label=\"hole-punched\"",
                            Some(Reach::SameSite(_)) => ", label=\"same site\"",
                            Some(Reach::Candidate(_)) => ", label=\"candidate\"",
                            _ => "",
                        };
                        let _ = writeln!(
                            out,
                            "  \"{}\" -- \"{}\" [color=darkgreen{how}];",
                            quote(&a.name),
                            quote(&b.name)
                        );
                    }
                }
            }
        } else {
            let _ = writeln!(out, "  // {} nodes: direct links not drawn", accepted.len());
        }
        for d in &self.down_links {
            let label = match &d.via {
                Some(r) => format!("down, via {r}"),
                None => "down, no path".into(),
            };
            let _ = writeln!(
                out,
                "  \"{}\" -- \"{}\" [style=dashed, color=red, label=\"{}\", constraint=false];",
                quote(&d.a),
                quote(&d.b),
                quote(&label)
            );
        }
        out.push_str("}\n");
        out
    }
}

/// `s` inside a Graphviz double-quoted string (node names and label values
/// cannot hold quotes or backslashes, but a graph must never break).
fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{fixtures, render};
    use crate::model::NodeInfo;
    use std::collections::BTreeSet;

    fn node(i: u8, unreachable: &[&str]) -> NodeInfo {
        let (mut node, mut claim) = fixtures::published(i);
        claim.unreachable = std::sync::Arc::new(
            unreachable
                .iter()
                .map(|s| s.to_string())
                .collect::<BTreeSet<_>>(),
        );
        node.annotations = render(&claim);
        node
    }

    fn settings() -> MeshSettings {
        MeshSettings {
            ranges: ClusterRanges::lab(),
            costs: LinkCosts::default(),
            relay: Relay::OneHop,
            block_plans: Vec::new(),
            services: Vec::new(),
        }
    }

    #[test]
    fn down_links_carry_their_relay_and_pending_nodes_show() {
        let mut pending = node(4, &[]);
        pending.annotations.clear();
        let snap = ClusterSnapshot {
            nodes: vec![node(1, &["node-3"]), node(2, &[]), node(3, &[]), pending],
            blocks: Default::default(),
            ..Default::default()
        };
        let g = MeshGraph::of(&snap, &settings(), None);
        assert_eq!(
            g.down_links,
            vec![DownLink {
                a: "node-1".into(),
                b: "node-3".into(),
                via: Some("node-2".into())
            }]
        );
        assert_eq!(g.nodes[3].state, "pending");
        assert_eq!(g.nodes[0].unreachable, vec!["node-3".to_string()]);
        assert_eq!(g.paths_from("node-3")["node-1"], Hop::Via("node-2".into()));
        assert_eq!(g.paths_from("node-3")["node-2"], Hop::Direct);
        let dot = g.dot(10);
        assert!(dot.contains(
            "\"node-1\" -- \"node-3\" [style=dashed, color=red, label=\"down, via node-2\""
        ));
        assert!(dot.contains("\"node-1\" -- \"node-2\" [color=darkgreen]"));
        assert!(!dot.contains("\"node-1\" -- \"node-3\" [color=darkgreen]"));
        assert!(g.dot(2).contains("direct links not drawn"));
    }

    #[test]
    fn each_node_s_policy_enforcement_is_judged_against_the_cluster_s() {
        let cluster = PolicyApplied {
            policies: 2,
            revision: 90,
        };
        let reporting = |i, value: Option<&str>| {
            let mut n = node(i, &[]);
            if let Some(v) = value {
                n.annotations.insert(POLICY_APPLIED.into(), v.into());
            }
            n
        };
        let snap = ClusterSnapshot {
            nodes: vec![
                reporting(1, Some("policies=2,revision=90")),
                reporting(2, Some("policies=2,revision=85")),
                reporting(3, Some("policies=3,revision=90")),
                reporting(4, None),
                reporting(5, Some("2@90")),
            ],
            ..Default::default()
        };
        let g = MeshGraph::of(&snap, &settings(), Some(cluster));
        let sync: Vec<_> = g.nodes.iter().map(|n| n.policy).collect();
        use PolicySync::*;
        assert_eq!(
            sync,
            [
                Some(InSync),
                Some(Behind),
                Some(Behind),
                Some(Unreported),
                Some(Invalid)
            ]
        );
        assert_eq!(g.nodes[1].policy_applied.map(|p| p.revision), Some(85));
        assert_eq!(g.policies, Some(cluster));
        // Not asked: nothing judged.
        let g = MeshGraph::of(&snap, &settings(), None);
        assert!(g.nodes.iter().all(|n| n.policy.is_none()));
    }

    #[test]
    fn settings_come_from_the_config_map_with_errors_naming_the_key() {
        let mut data =
            BTreeMap::from([(CLUSTER_CIDRS_KEY.to_string(), "198.19.0.0/16".to_string())]);
        let s = MeshSettings::from_config(&data).unwrap();
        assert_eq!(s.relay, Relay::OneHop);
        assert_eq!(s.costs, LinkCosts::default());
        data.insert(RELAY_KEY.into(), "never".into());
        data.insert(LINK_COSTS_KEY.into(), "zone=1,region=3,other=9".into());
        let s = MeshSettings::from_config(&data).unwrap();
        assert_eq!((s.relay, s.costs.region), (Relay::Never, 3));
        for (key, value) in [
            (RELAY_KEY, "sometimes"),
            (LINK_COSTS_KEY, "zone=5,region=1"),
            (CLUSTER_CIDRS_KEY, "198.19.0.1/16"),
            (MESH_CIDRS_KEY, "nonsense"),
        ] {
            let mut d = data.clone();
            d.insert(key.into(), value.into());
            let e = MeshSettings::from_config(&d).unwrap_err().to_string();
            assert!(e.starts_with(key), "{e}");
        }
        assert_eq!(
            MeshSettings::from_config(&BTreeMap::new()),
            Err(SettingsError::Missing {
                key: CLUSTER_CIDRS_KEY
            })
        );
    }
}
