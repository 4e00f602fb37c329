//! `meshlab bench policy`: the NetworkPolicy engine at scale. A generated
//! cluster (pods spread over nodes, policies over namespaces) is compiled
//! for one node, rendered, and applied whole into a fresh node namespace;
//! then one pod label change and one policy update are each compiled again
//! and applied as a difference. The peer is the whole-table replace of the
//! same change (what a non-incremental engine does), measured in the same
//! run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use weft_policy::render::{self, Ruleset};
use weft_policy::{compile, nft, NamedPort, NamespaceInfo, PodInfo, Protocol};

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
}

pub struct Cluster {
    pub pods: Vec<PodInfo>,
    pub policies: Vec<NetworkPolicy>,
    pub namespaces: Vec<NamespaceInfo>,
}

/// A deterministic cluster: namespaces in ten teams; pods with one of ten
/// apps, a tier, and named ports; per namespace, policies selecting an app
/// with ingress from the namespace's web tier on a port, from a team's
/// namespaces on a named port, and (every other policy) egress to another
/// app and to an ipBlock with an except.
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
                namespace: format!("ns-{n}"),
                name: format!("pod-{j}"),
                node: format!("node-{}", i % scale.nodes + 1),
                labels: BTreeMap::from([
                    ("app".into(), format!("a{}", j % 10)),
                    (
                        "tier".into(),
                        if j.is_multiple_of(2) { "web" } else { "db" }.into(),
                    ),
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
    Cluster {
        pods,
        policies,
        namespaces,
    }
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
    pub compile: Duration,
    pub render: Duration,
    /// Changes and time of the difference (`None` for the full sync).
    pub diff: Option<(nft::Changes, Duration)>,
    /// Whole-table replace of the same state.
    pub full: Duration,
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

fn compiled(cluster: &Cluster) -> (Ruleset, Duration, Duration, usize) {
    let started = Instant::now();
    let program = compile(NODE, &cluster.policies, &cluster.pods, &cluster.namespaces);
    let compile_time = started.elapsed();
    let started = Instant::now();
    let ruleset = render::render(&program, &render::Options::default());
    (
        ruleset,
        compile_time,
        started.elapsed(),
        program.policies.len(),
    )
}

fn timed_apply(transaction: &serde_json::Value) -> Result<Duration> {
    let transaction = transaction.clone();
    netns::run_in(NETNS, move || {
        let started = Instant::now();
        nft::apply(&transaction).map_err(anyhow::Error::msg)?;
        Ok(started.elapsed())
    })
}

/// A change after the full sync: diff applied, then the whole table of the
/// same state replaced for comparison, then the diff's state restored.
fn change(what: &str, before: &Ruleset, cluster: &Cluster) -> Result<(Step, Ruleset)> {
    let (after, compile_time, render_time, _) = compiled(cluster);
    let started = Instant::now();
    let (transaction, changes) = nft::diff(before, &after).context("the change changed nothing")?;
    let diff_time = started.elapsed();
    let applied = timed_apply(&transaction)?;
    let full = timed_apply(&nft::full(&after).0)?;
    Ok((
        Step {
            what: what.into(),
            compile: compile_time,
            render: render_time,
            diff: Some((changes, diff_time + applied)),
            full,
        },
        after,
    ))
}

pub fn run(scale: Scale, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    preflight::require_root()?;
    let _ = netns::delete(NETNS);
    netns::ip(&["netns", "add", NETNS])?;
    let result = (|| {
        let mut cluster = generate(scale);
        progress(&format!(
            "{} pods, {} policies, {} namespaces over {} nodes; measuring {NODE}",
            scale.pods, scale.policies, scale.namespaces, scale.nodes
        ));
        let (ruleset, compile_time, render_time, policies_here) = compiled(&cluster);
        let (transaction, _) = nft::full(&ruleset);
        let json_bytes = transaction.to_string().len();
        let full = timed_apply(&transaction)?;
        let mut steps = vec![Step {
            what: "full sync".into(),
            compile: compile_time,
            render: render_time,
            diff: None,
            full,
        }];
        // (a) a local pod's tier flips: it leaves one peer set and its
        // namespace's web-tier set changes.
        let local = cluster
            .pods
            .iter()
            .position(|p| p.node == NODE && p.labels["tier"] == "web")
            .context("no local web pod")?;
        cluster.pods[local]
            .labels
            .insert("tier".into(), "db".into());
        let (step, after) = change("one pod label change", &ruleset, &cluster)?;
        steps.push(step);
        // (b) one policy's first ingress rule moves to another port.
        let spec = cluster.policies[0].spec.as_mut().context("a policy spec")?;
        spec.ingress.as_mut().context("ingress rules")?[0].ports =
            Some(serde_json::from_value(json!([{"port": 7070}]))?);
        let (step, _) = change("one policy update", &after, &cluster)?;
        steps.push(step);
        Ok(Report {
            scale,
            local_pods: cluster.pods.iter().filter(|p| p.node == NODE).count(),
            policies_here,
            chains: ruleset.chains.len(),
            rules: ruleset.rules(),
            sets: ruleset.sets.len(),
            elements: ruleset.elements(),
            json_bytes,
            steps,
        })
    })();
    netns::delete(NETNS)?;
    result
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn table(r: &Report) -> String {
    let mut out = format!(
        "{} pods, {} policies, {} namespaces, {} nodes; node-1: {} pods, {} policies selecting them\n\
         program: {} chains, {} rules, {} sets, {} elements, {} KiB of nft JSON\n\n\
         | step | compile ms | render ms | changed elements | chains | diff+apply ms | whole-table replace ms | ratio |\n\
         |---|---|---|---|---|---|---|---|\n",
        r.scale.pods,
        r.scale.policies,
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
        let (elements, chains, applied, ratio) = match &s.diff {
            Some((c, t)) => (
                (c.elements_added + c.elements_removed).to_string(),
                c.chains.to_string(),
                format!("{:.2}", ms(*t)),
                format!("{:.3}", ms(*t) / ms(s.full)),
            ),
            None => (
                r.elements.to_string(),
                r.chains.to_string(),
                "-".into(),
                "-".into(),
            ),
        };
        out.push_str(&format!(
            "| {} | {:.1} | {:.1} | {elements} | {chains} | {applied} | {:.1} | {ratio} |\n",
            s.what,
            ms(s.compile),
            ms(s.render),
            ms(s.full)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_cluster_has_the_asked_size_and_isolates_pods() {
        let scale = Scale {
            pods: 400,
            policies: 40,
            namespaces: 4,
            nodes: 2,
        };
        let c = generate(scale);
        assert_eq!(
            (c.pods.len(), c.policies.len(), c.namespaces.len()),
            (400, 40, 4)
        );
        let program = compile(NODE, &c.policies, &c.pods, &c.namespaces);
        assert_eq!(program.pods.len(), 200);
        assert!(program
            .pods
            .iter()
            .all(|p| matches!(p.ingress, weft_policy::Gate::Isolated { .. })));
        assert!(program.problems.is_empty(), "{:?}", program.problems);
    }
}
