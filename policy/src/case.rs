//! NetworkPolicy conformance cases in the format of `shared/netpol` (the
//! upstream e2e suite's model: namespaces x/y/z, pods a/b/c, policies,
//! probes with expected reachability matrices), checked through compiled
//! programs.
//!
//! Pods get addresses here (198.19.k.n, spread over three nodes so both
//! same-node and cross-node pairs occur), and `ipBlock` placeholders
//! (`{podIP: "y/b", prefix: 32}`) become literal CIDRs from them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;
use serde_json::Value;

use crate::cnp::{self, ClusterNetworkPolicy};
use crate::compile::{compile, Cluster, Program, Snapshot};
use crate::eval::{decide, Decision};
use crate::model::{Identity, NamedPort, NamespaceInfo, PodInfo, Protocol};

const NODES: usize = 3;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CaseFile {
    id: String,
    #[serde(default)]
    server_ports: Vec<u16>,
    #[serde(default)]
    server_protocols: Vec<Protocol>,
    #[serde(default)]
    ignore_loopback: bool,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pods: Vec<CasePod>,
    #[serde(default)]
    policies: Vec<Value>,
    probes: Vec<Probe>,
}

#[derive(Debug, Clone, Deserialize)]
struct CasePod {
    namespace: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<CasePort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CasePort {
    name: String,
    container_port: u16,
    protocol: Protocol,
}

/// One expected matrix: rows are sources, columns destinations.
#[derive(Debug, Clone, Deserialize)]
pub struct Probe {
    pub port: u16,
    pub protocol: Protocol,
    pub expected: BTreeMap<String, BTreeMap<String, bool>>,
}

/// A case ready to check: pods with addresses, policies with literal CIDRs.
#[derive(Debug, Clone)]
pub struct Case {
    pub id: String,
    pub ignore_loopback: bool,
    /// Every pod serves each of these ports with each protocol.
    pub server_ports: Vec<u16>,
    pub server_protocols: Vec<Protocol>,
    pub namespaces: Vec<NamespaceInfo>,
    pub pods: Vec<PodInfo>,
    pub policies: Vec<NetworkPolicy>,
    pub cluster_policies: Vec<ClusterNetworkPolicy>,
    /// The policies as written, placeholders unresolved (see [`Case::placed`]).
    raw_policies: Vec<Value>,
    pub probes: Vec<Probe>,
}

/// One cell that differs from the expected matrix.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub port: u16,
    pub protocol: Protocol,
    pub from: String,
    pub to: String,
    pub expected: bool,
    /// What happened: connected or not.
    pub got: bool,
    /// Why, in words (the deciding steps of the compiled program).
    pub why: String,
}

/// Why a case cannot be read or used.
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    InFile {
        path: std::path::PathBuf,
        source: Box<CaseError>,
    },
    #[error(transparent)]
    Format(#[from] serde_norway::Error),
    #[error("policies[{index}]: {reason}")]
    Policy { index: usize, reason: String },
    #[error("pod {0} has no place (node and address)")]
    Unplaced(String),
    #[error("{source} in case {case}")]
    Explain {
        case: String,
        source: crate::eval::ExplainError,
    },
}

/// Reads a case file, naming the file and field on error.
pub fn load(path: &Path) -> Result<Case, CaseError> {
    let text = std::fs::read_to_string(path).map_err(|source| CaseError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|e| CaseError::InFile {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// Parses a case and gives its pods addresses.
pub fn parse(text: &str) -> Result<Case, CaseError> {
    let file: CaseFile = serde_norway::from_str(text)?;
    let pods: Vec<PodInfo> = file
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let node = i % NODES + 1;
            PodInfo {
                identity: Identity::Api,
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                node: format!("node-{node}"),
                labels: p.labels.clone(),
                ips: vec![IpAddr::V4(Ipv4Addr::new(198, 19, node as u8, 10 + i as u8))],
                ports: p
                    .ports
                    .iter()
                    .map(|x| NamedPort {
                        name: x.name.clone(),
                        port: x.container_port,
                        protocol: x.protocol,
                    })
                    .collect(),
            }
        })
        .collect();
    let namespaces = file
        .namespaces
        .iter()
        .map(|(name, labels)| NamespaceInfo {
            name: name.clone(),
            labels: labels.clone(),
        })
        .collect();
    let policies = resolve_policies(&file.policies, &pods)?;
    Ok(Case {
        cluster_policies: policies.cluster,
        id: file.id,
        ignore_loopback: file.ignore_loopback,
        server_ports: file.server_ports,
        server_protocols: file.server_protocols,
        namespaces,
        pods,
        policies: policies.namespaced,
        raw_policies: file.policies,
        probes: file.probes,
    })
}

/// The case's policies, NetworkPolicies and ClusterNetworkPolicies, with
/// placeholders resolved.
fn resolve_policies(raw: &[Value], pods: &[PodInfo]) -> Result<Policies, CaseError> {
    let mut out = Policies::default();
    for (index, raw) in raw.iter().enumerate() {
        let mut raw = raw.clone();
        let policy = |reason: String| CaseError::Policy { index, reason };
        resolve_placeholders(&mut raw, pods).map_err(policy)?;
        match raw.get("kind").and_then(Value::as_str) {
            Some("NetworkPolicy") => out
                .namespaced
                .push(serde_json::from_value(raw).map_err(|e| policy(e.to_string()))?),
            Some("ClusterNetworkPolicy") => {
                let object: ClusterNetworkPolicy =
                    serde_json::from_value(raw).map_err(|e| policy(e.to_string()))?;
                if cnp::parse(&object).policy.is_none() {
                    let problems = cnp::parse(&object).problems.join("; ");
                    return Err(policy(format!("cannot be enforced: {problems}")));
                }
                out.cluster.push(object);
            }
            other => {
                return Err(policy(format!(
                    "kind {other:?} is not NetworkPolicy or ClusterNetworkPolicy"
                )))
            }
        }
    }
    Ok(out)
}

/// A case's policies by kind.
#[derive(Debug, Clone, Default)]
struct Policies {
    namespaced: Vec<NetworkPolicy>,
    cluster: Vec<ClusterNetworkPolicy>,
}

impl Case {
    /// The case with its pods where they really are: `place` gives each
    /// pod's node and addresses (e.g. from a lab), and ipBlock placeholders
    /// are resolved again from those addresses.
    pub fn placed(
        &self,
        place: impl Fn(&PodInfo) -> Option<(String, Vec<IpAddr>)>,
    ) -> Result<Case, CaseError> {
        let mut case = self.clone();
        for pod in &mut case.pods {
            let (node, ips) = place(pod)
                .filter(|(_, ips)| !ips.is_empty())
                .ok_or_else(|| CaseError::Unplaced(pod.key()))?;
            pod.node = node;
            pod.ips = ips;
        }
        let policies = resolve_policies(&case.raw_policies, &case.pods)?;
        case.policies = policies.namespaced;
        case.cluster_policies = policies.cluster;
        Ok(case)
    }

    /// Everything the case's compiled programs read.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            policies: self.policies.clone(),
            cluster_policies: self.cluster_policies.clone(),
            namespaces: self.namespaces.clone(),
            pods: self.pods.clone(),
            nodes: Vec::new(),
        }
    }

    /// Every node the case's pods are on, with its compiled program.
    pub fn programs(&self) -> BTreeMap<String, Program> {
        let parsed = self.snapshot().parsed();
        let cluster = Cluster {
            policies: &parsed,
            nodes: &[],
        };
        let nodes: std::collections::BTreeSet<&str> =
            self.pods.iter().map(|p| p.node.as_str()).collect();
        nodes
            .into_iter()
            .map(|node| {
                let program = compile(node, &self.policies, cluster, &self.pods, &self.namespaces);
                (node.to_string(), program)
            })
            .collect()
    }

    /// Every cell the case expects, with the loopback cells left out when
    /// the case ignores them: (probe, from, to, expected).
    pub fn cells(&self) -> Vec<(&Probe, &PodInfo, &PodInfo, bool)> {
        let mut cells = Vec::new();
        for probe in &self.probes {
            for from in &self.pods {
                for to in &self.pods {
                    if self.ignore_loopback && from.key() == to.key() {
                        continue;
                    }
                    if let Some(expected) = probe
                        .expected
                        .get(&from.key())
                        .and_then(|row| row.get(&to.key()))
                    {
                        cells.push((probe, from, to, *expected));
                    }
                }
            }
        }
        cells
    }
}

/// Replaces every `{podIP, prefix, prefixIPv6}` mapping (an ipBlock `cidr`
/// or `except` entry) with the literal network of that pod's address.
fn resolve_placeholders(value: &mut Value, pods: &[PodInfo]) -> Result<(), String> {
    match value {
        Value::Object(map) if map.contains_key("podIP") => {
            let key = map["podIP"].as_str().ok_or("podIP must be a string")?;
            let pod = pods
                .iter()
                .find(|p| p.key() == key)
                .ok_or_else(|| format!("podIP {key:?} names no pod"))?;
            let ip = pod.ips[0];
            let field = if ip.is_ipv4() { "prefix" } else { "prefixIPv6" };
            let prefix = map
                .get(field)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("placeholder for {key} lacks {field}"))?;
            let net = IpNet::new(ip, prefix as u8)
                .map_err(|e| format!("{key}/{prefix}: {e}"))?
                .trunc();
            *value = Value::String(net.to_string());
        }
        Value::Object(map) => {
            for v in map.values_mut() {
                resolve_placeholders(v, pods)?;
            }
        }
        Value::Array(items) => {
            for v in items {
                resolve_placeholders(v, pods)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The decision for one connection between two of the case's pods.
pub fn explain(
    case: &Case,
    from: &str,
    to: &str,
    protocol: Protocol,
    port: u16,
) -> Result<Decision, CaseError> {
    crate::eval::explain(&case.snapshot(), from, to, protocol, port).map_err(|source| {
        CaseError::Explain {
            case: case.id.clone(),
            source,
        }
    })
}

/// The compiled programs' steps for one cell, in words.
pub fn why(decision: &Decision) -> String {
    format!("egress: {}; ingress: {}", decision.egress, decision.ingress)
}

/// What the compiled `programs` (from [`Case::programs`]) decide for one
/// probe cell.
pub fn predicted(
    programs: &BTreeMap<String, Program>,
    probe: &Probe,
    from: &PodInfo,
    to: &PodInfo,
) -> Decision {
    decide(
        &programs[&from.node],
        &programs[&to.node],
        from.ips[0],
        to.ips[0],
        probe.protocol,
        probe.port,
    )
}

/// Compiles every node's program and compares each probe with the matrix.
pub fn check(case: &Case) -> Vec<Mismatch> {
    let programs = case.programs();
    compare(case, |probe, from, to| {
        let decision = predicted(&programs, probe, from, to);
        (decision.allowed(), why(&decision))
    })
}

/// The case files (`*.yaml`) in `dir`, sorted by name (the order steps
/// of a multi-step case must run in).
pub fn files_in(dir: &Path) -> Result<Vec<std::path::PathBuf>, CaseError> {
    let io = |source| CaseError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let entries = std::fs::read_dir(dir).map_err(io)?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|x| x == "yaml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Every conformance case of the repository at `repo`: those transcribed
/// from the upstream suite (`tests/netpol/upstream`) then Weft's own
/// (`tests/netpol`: more of the upstream suite, written from the API's
/// semantics).
pub fn conformance_files(repo: &Path) -> Result<Vec<std::path::PathBuf>, CaseError> {
    let mut files = files_in(&repo.join("tests/netpol/upstream"))?;
    files.extend(files_in(&repo.join("tests/netpol"))?);
    files.extend(files_in(&repo.join("tests/netpol/cnp"))?);
    Ok(files)
}

/// The cells where `outcome` (connected?, why) differs from the matrix.
pub fn compare(
    case: &Case,
    mut outcome: impl FnMut(&Probe, &PodInfo, &PodInfo) -> (bool, String),
) -> Vec<Mismatch> {
    case.cells()
        .into_iter()
        .filter_map(|(probe, from, to, expected)| {
            let (got, why) = outcome(probe, from, to);
            (got != expected).then(|| Mismatch {
                port: probe.port,
                protocol: probe.protocol,
                from: from.key(),
                to: to.key(),
                expected,
                got,
                why,
            })
        })
        .collect()
}

/// `PASS <id>`, or `FAIL <id>` with a truth table per probe that differs
/// (`.` connected, `X` blocked, as got; `!` marks a cell that differs) and
/// the reason for each differing cell.
pub fn report(case: &Case, mismatches: &[Mismatch]) -> String {
    if mismatches.is_empty() {
        return format!("PASS {}\n", case.id);
    }
    let mut out = format!("FAIL {}\n", case.id);
    let keys: Vec<String> = case.pods.iter().map(PodInfo::key).collect();
    for probe in &case.probes {
        let here: Vec<&Mismatch> = mismatches
            .iter()
            .filter(|m| m.port == probe.port && m.protocol == probe.protocol)
            .collect();
        if here.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "  port {}/{} (rows=from, cols=to; got, ! = differs from expected):",
            probe.port, probe.protocol
        );
        let _ = writeln!(out, "  -\t{}", keys.join("\t"));
        for from in &keys {
            let cells: Vec<String> = keys
                .iter()
                .map(|to| {
                    let expected = probe.expected.get(from).and_then(|r| r.get(to)).copied();
                    match (
                        expected,
                        here.iter().find(|m| &m.from == from && &m.to == to),
                    ) {
                        (_, Some(m)) => format!("{}!", if m.got { "." } else { "X" }),
                        (Some(true), None) => ".".into(),
                        (Some(false), None) => "X".into(),
                        (None, None) => "-".into(),
                    }
                })
                .collect();
            let _ = writeln!(out, "  {from}\t{}", cells.join("\t"));
        }
        for m in here {
            let _ = writeln!(
                out,
                "  {} -> {} {}/{}: expected {}, got {} ({})",
                m.from,
                m.to,
                m.port,
                m.protocol,
                connected(m.expected),
                connected(m.got),
                m.why
            );
        }
    }
    out
}

/// A cell's outcome in words.
pub fn connected(yes: bool) -> &'static str {
    if yes {
        "connected"
    } else {
        "blocked"
    }
}
