//! `meshlab bench policy`: the NetworkPolicy engine at scale. A generated
//! cluster (pods spread over nodes, policies over namespaces) is compiled
//! for one node, rendered, and applied whole into a fresh node namespace;
//! then a pod label change, a pod created and a policy update each go
//! through the engine (the pods alone, the policy by recompiling) and are
//! applied as a difference. The peer is the whole-table replace of the same
//! state (what a non-incremental engine does), measured in the same run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use weft_policy::cnp::ClusterNetworkPolicy;
use weft_policy::engine::Engine;
use weft_policy::render;
use weft_policy::{nft, Identity, NamedPort, NamespaceInfo, PodInfo, Protocol};

use super::{netns, preflight};

const NETNS: &str = "meshlab-bench-policy";
const NODE: &str = "node-1";

/// The generated cluster's size.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    pub pods: usize,
    pub policies: usize,
    pub namespaces: usize,
    pub nodes: usize,
    /// ClusterNetworkPolicies per tier.
    pub cluster_policies: usize,
}

pub struct Cluster {
    pub pods: Vec<PodInfo>,
    pub policies: Vec<NetworkPolicy>,
    pub cluster_policies: Vec<ClusterNetworkPolicy>,
    pub namespaces: Vec<NamespaceInfo>,
}

/// A deterministic cluster: namespaces in ten teams; pods with one of ten
/// apps, a tier, and named ports; per namespace, policies selecting an app
/// with ingress from the namespace's web tier on a port, from a team's
/// namespaces on a named port, and (every other policy) egress to another
/// app and to an ipBlock with an except. Per tier, ClusterNetworkPolicies
/// for a team's pods of one zone (see [`cluster_policy`]).
pub fn generate(scale: Scale) -> Cluster {
    let namespaces = (0..scale.namespaces)
        .map(|n| NamespaceInfo {
            name: format!("ns-{n}"),
            labels: BTreeMap::from([
                ("kubernetes.io/metadata.name".into(), format!("ns-{n}")),
                ("team".into(), format!("t{}", n % 10)),
            ]),
        })
        .collect();
    let pods = (0..scale.pods)
        .map(|i| {
            let n = i % scale.namespaces;
            let j = i / scale.namespaces;
            PodInfo {
                identity: Identity::Api,
                namespace: format!("ns-{n}"),
                name: format!("pod-{j}"),
                node: format!("node-{}", i % scale.nodes + 1),
                labels: BTreeMap::from([
                    ("app".into(), format!("a{}", j % 10)),
                    (
                        "tier".into(),
                        if j.is_multiple_of(2) { "web" } else { "db" }.into(),
                    ),
                    ("zone".into(), format!("z{}", j % 4)),
                ]),
                ips: vec![
                    format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256)
                        .parse()
                        .expect("a generated address"),
                    format!("fd00::{i:x}").parse().expect("a generated address"),
                ],
                ports: vec![
                    NamedPort {
                        name: "http".into(),
                        port: 8080 + (j % 3) as u16,
                        protocol: Protocol::Tcp,
                    },
                    NamedPort {
                        name: "metrics".into(),
                        port: 9090,
                        protocol: Protocol::Tcp,
                    },
                ],
            }
        })
        .collect();
    let policies = (0..scale.policies)
        .map(|k| policy(k % scale.namespaces, k / scale.namespaces))
        .collect();
    let cluster_policies = (0..scale.cluster_policies)
        .flat_map(|k| [cluster_policy("Admin", k), cluster_policy("Baseline", k)])
        .collect();
    Cluster {
        pods,
        policies,
        cluster_policies,
        namespaces,
    }
}

/// The `k`th ClusterNetworkPolicy of `tier`: for zone `z<k%4>` pods of team
/// `t<k%10>`'s namespaces (the second of each tier: for every pod), Admin
/// denies another team SSH, passes the team's own web tier to
/// NetworkPolicy and accepts egress to DNS; Baseline denies ingress from
/// every namespace but the team's on the http port.
fn cluster_policy(tier: &str, k: usize) -> ClusterNetworkPolicy {
    let team = |t: usize| json!({"matchLabels": {"team": format!("t{}", t % 10)}});
    let subject = match k {
        1 => json!({"namespaces": {}}),
        _ => json!({"pods": {
            "namespaceSelector": team(k),
            "podSelector": {"matchLabels": {"zone": format!("z{}", k % 4)}},
        }}),
    };
    let (ingress, egress) = match tier {
        "Admin" => (
            json!([
                {"action": "Deny", "from": [{"namespaces": team(k + 1)}],
                 "protocols": [{"tcp": {"destinationPort": {"number": 22}}}]},
                {"action": "Pass", "from": [{"pods": {"namespaceSelector": team(k),
                                                       "podSelector": {"matchLabels": {"tier": "web"}}}}]},
            ]),
            json!([
                {"action": "Accept", "to": [{"networks": ["10.96.0.10/32", "fd00:96::a/128"]}],
                 "protocols": [{"udp": {"destinationPort": {"number": 53}}}]},
            ]),
        ),
        _ => (
            json!([
                {"action": "Deny", "from": [{"namespaces": {"matchExpressions": [
                    {"key": "team", "operator": "NotIn", "values": [format!("t{}", k % 10)]}]}}],
                 "protocols": [{"destinationNamedPort": "http"}]},
            ]),
            json!([]),
        ),
    };
    serde_json::from_value(json!({
        "metadata": {"name": format!("{}-{k}", tier.to_lowercase())},
        "spec": {"tier": tier, "priority": k % 50, "subject": subject,
                 "ingress": ingress, "egress": egress},
    }))
    .expect("a generated cluster policy")
}

fn policy(n: usize, k: usize) -> NetworkPolicy {
    let mut spec = json!({
        "podSelector": {"matchLabels": {"app": format!("a{}", k % 10)}},
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"tier": "web"}}}], "ports": [{"port": 8080 + k % 3}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 10)}}}],
             "ports": [{"port": "http"}]},
        ],
    });
    if k % 2 == 1 {
        spec["egress"] = json!([
            {"to": [{"podSelector": {"matchLabels": {"app": format!("a{}", (k + 1) % 10)}}}],
             "ports": [{"port": "metrics"}]},
            {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.64.0.0/16"]}}],
             "ports": [{"port": 443, "endPort": 450}]},
        ]);
    }
    serde_json::from_value(json!({
        "metadata": {"name": format!("p-{k}"), "namespace": format!("ns-{n}")},
        "spec": spec,
    }))
    .expect("a generated policy")
}

/// One measured step.
pub struct Step {
    pub what: String,
    /// Working out the change: compiling and rendering, whole or for one
    /// pod (the engine's call).
    pub compute: Duration,
    pub changes: nft::Changes,
    /// Applying it into the kernel.
    pub apply: Duration,
    /// The peer: replacing the whole table with the same state.
    pub replace: Duration,
}

pub struct Report {
    pub scale: Scale,
    pub local_pods: usize,
    pub policies_here: usize,
    pub chains: usize,
    pub rules: usize,
    pub sets: usize,
    pub elements: usize,
    pub json_bytes: usize,
    pub steps: Vec<Step>,
}

/// The node namespace's nf_tables session, as meshd keeps one.
type Session = std::sync::Arc<std::sync::Mutex<nft::Session>>;

fn timed_apply(session: &Session, transaction: &nft::Transaction) -> Result<Duration> {
    let (session, transaction) = (session.clone(), transaction.clone());
    netns::run_in(NETNS, move || {
        let mut session = session
            .lock()
            .map_err(|_| anyhow::anyhow!("the session lock is poisoned"))?;
        let started = Instant::now();
        session.apply(&transaction)?;
        Ok(started.elapsed())
    })
}

/// How many times a change and its reverse are each measured; the table
/// shows medians.
const ROUNDS: usize = 15;

type Change<'a> = Box<dyn Fn(&mut Engine) -> Option<(nft::Transaction, nft::Changes)> + 'a>;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// A step: `forward` then `back` run on the engine (timed) and their
/// transactions applied (timed), `rounds` times over; then the whole table
/// of the forward state replaced as the peer. Leaves the forward state.
fn step(
    what: &str,
    session: &Session,
    engine: &mut Engine,
    rounds: usize,
    forward: Change,
    back: Change,
) -> Result<Step> {
    let (mut compute, mut apply) = (Vec::new(), Vec::new());
    let mut changes = nft::Changes::default();
    for round in 0..rounds {
        for (i, change) in [&forward, &back].into_iter().enumerate() {
            if round + 1 == rounds && i == 1 {
                break;
            }
            let started = Instant::now();
            let (transaction, c) = change(engine).context("the change changed nothing")?;
            compute.push(started.elapsed());
            apply.push(timed_apply(session, &transaction)?);
            if i == 0 {
                changes = c;
            }
        }
    }
    let replace = timed_apply(session, &nft::full(engine.ruleset()).0)?;
    Ok(Step {
        what: what.into(),
        compute: median(compute),
        changes,
        apply: median(apply),
        replace,
    })
}

pub fn run(scale: Scale, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    preflight::require_root()?;
    let _ = netns::delete(NETNS);
    netns::ip(&["netns", "add", NETNS])?;
    let result = (|| {
        let cluster = generate(scale);
        progress(&format!(
            "{} pods, {} policies, {} cluster policies per tier, {} namespaces over {} nodes; measuring {NODE}",
            scale.pods, scale.policies, scale.cluster_policies, scale.namespaces, scale.nodes
        ));
        let session: Session =
            std::sync::Arc::new(std::sync::Mutex::new(netns::run_in(NETNS, || {
                nft::Session::open().map_err(anyhow::Error::from)
            })?));
        let mut engine = Engine::new(NODE, render::Options::default());
        // The full sync: everything compiled, rendered and loaded at once.
        let started = Instant::now();
        engine.load(weft_policy::Snapshot {
            policies: cluster.policies.clone(),
            cluster_policies: cluster.cluster_policies.clone(),
            namespaces: cluster.namespaces.clone(),
            pods: cluster.pods.clone(),
            nodes: Vec::new(),
        });
        let (transaction, changes) = nft::fresh(engine.ruleset());
        let compute = started.elapsed();
        let apply = timed_apply(&session, &transaction)?;
        let whole = nft::full(engine.ruleset()).0;
        let ruleset = engine.ruleset();
        let mut report = Report {
            scale,
            local_pods: engine.program().pods.len(),
            policies_here: engine.program().policies.len(),
            chains: ruleset.chains.len(),
            rules: ruleset.rules(),
            sets: ruleset.sets.len(),
            elements: ruleset.elements(),
            json_bytes: whole.json().len(),
            steps: Vec::new(),
        };
        let steps = &mut report.steps;
        steps.push(Step {
            what: "full sync (node without a table)".into(),
            compute,
            changes,
            apply,
            replace: timed_apply(&session, &whole)?,
        });
        // (a) a local pod's tier flips: it leaves its namespace's
        // web-tier peer list.
        let local = cluster
            .pods
            .iter()
            .position(|p| p.node == NODE && p.labels["tier"] == "web")
            .context("no local web pod")?;
        let before = cluster.pods[local].clone();
        let mut pod = before.clone();
        pod.labels.insert("tier".into(), "db".into());
        steps.push(step(
            "one pod label change",
            &session,
            &mut engine,
            ROUNDS,
            Box::new(|e| e.pod(&pod.key(), Some(pod.clone()))),
            Box::new(|e| e.pod(&before.key(), Some(before.clone()))),
        )?);
        // (b) a pod is scheduled here, alike to one already running (its
        // verdict-map entries, peer lists and named ports), and deleted.
        let mut new_pod = cluster.pods[local].clone();
        new_pod.name = "scheduled".into();
        new_pod.ips = vec!["10.255.0.1".parse()?, "fd00::ff:1".parse()?];
        steps.push(step(
            "one pod created (and deleted)",
            &session,
            &mut engine,
            ROUNDS,
            Box::new(|e| e.pod(&new_pod.key(), Some(new_pod.clone()))),
            Box::new(|e| e.pod(&new_pod.key(), None)),
        )?);
        // (c) one policy's first ingress rule moves to another port.
        let original = cluster.policies[0].clone();
        let key = format!(
            "{}/{}",
            original.metadata.namespace.as_deref().unwrap_or_default(),
            original.metadata.name.as_deref().unwrap_or_default()
        );
        let mut updated = original.clone();
        let spec = updated.spec.as_mut().context("a policy spec")?;
        spec.ingress.as_mut().context("ingress rules")?[0].ports =
            Some(serde_json::from_value(json!([{"port": 7070}]))?);
        steps.push(step(
            "one policy update",
            &session,
            &mut engine,
            ROUNDS,
            Box::new(|e| e.policy(&key, Some(updated.clone()))),
            Box::new(|e| e.policy(&key, Some(original.clone()))),
        )?);
        if let Some(original) = cluster.cluster_policies.first() {
            // (d) a local pod of the first policy's subject (team t0, zone
            // z0) moves to another zone, out of it.
            let before = cluster
                .pods
                .iter()
                .find(|p| {
                    p.node == NODE
                        && p.labels["zone"] == "z0"
                        && cluster
                            .namespaces
                            .iter()
                            .any(|n| n.name == p.namespace && n.labels["team"] == "t0")
                })
                .context("no local pod in t0/z0")?
                .clone();
            let mut moved = before.clone();
            moved.labels.insert("zone".into(), "z1".into());
            steps.push(step(
                "one pod moved out of a cluster policy's subject",
                &session,
                &mut engine,
                ROUNDS,
                Box::new(|e| e.pod(&moved.key(), Some(moved.clone()))),
                Box::new(|e| e.pod(&before.key(), Some(before.clone()))),
            )?);
            // (e) an Admin policy goes last in its tier (behind the one
            // for every pod), and back.
            let name = original.metadata.name.clone().unwrap_or_default();
            let mut last = original.clone();
            last.spec["priority"] = json!(1000);
            steps.push(step(
                "one ClusterNetworkPolicy priority change",
                &session,
                &mut engine,
                ROUNDS,
                Box::new(|e| e.cluster_policy(&name, Some(last.clone()))),
                Box::new(|e| e.cluster_policy(&name, Some(original.clone()))),
            )?);
        }
        Ok(report)
    })();
    netns::delete(NETNS)?;
    result
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn table(r: &Report) -> String {
    let mut out = format!(
        "{} pods, {} policies, {} cluster policies per tier, {} namespaces, {} nodes; node-1: {} pods, {} policies selecting them\n\
         program: {} chains, {} rules, {} sets, {} elements, {} KiB of nft JSON\n\n\
         | step | changed elements | chains | compute ms | apply ms | total ms | whole-table replace ms | total / replace |\n\
         |---|---|---|---|---|---|---|---|\n",
        r.scale.pods,
        r.scale.policies,
        r.scale.cluster_policies,
        r.scale.namespaces,
        r.scale.nodes,
        r.local_pods,
        r.policies_here,
        r.chains,
        r.rules,
        r.sets,
        r.elements,
        r.json_bytes / 1024
    );
    for s in &r.steps {
        let total = s.compute + s.apply;
        out.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.4} |\n",
            s.what,
            s.changes.elements_added + s.changes.elements_removed,
            s.changes.chains,
            ms(s.compute),
            ms(s.apply),
            ms(total),
            ms(s.replace),
            ms(total) / ms(s.replace)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_policy::compile;

    #[test]
    fn the_generated_cluster_has_the_asked_size_and_isolates_pods() {
        let scale = Scale {
            pods: 400,
            policies: 40,
            namespaces: 4,
            nodes: 2,
            cluster_policies: 3,
        };
        let c = generate(scale);
        assert_eq!(
            (c.pods.len(), c.policies.len(), c.namespaces.len()),
            (400, 40, 4)
        );
        let program = compile(
            NODE,
            &c.policies,
            Default::default(),
            &c.pods,
            &c.namespaces,
        );
        assert_eq!(program.pods.len(), 200);
        assert!(program
            .pods
            .values()
            .all(|p| matches!(p.ingress.np, weft_policy::Gate::Isolated { .. })));
        assert!(program.problems.is_empty(), "{:?}", program.problems);
        assert_eq!(c.cluster_policies.len(), 6);
        for p in &c.cluster_policies {
            let reading = weft_policy::cnp::parse(p);
            assert!(
                reading.policy.is_some() && reading.problems.is_empty(),
                "{:?}",
                reading.problems
            );
        }
    }
}
