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

use crate::compile::{compile, Program};
use crate::eval::{decide, Decision};
use crate::model::{NamedPort, NamespaceInfo, PodInfo, Protocol};

const NODES: usize = 3;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CaseFile {
    id: String,
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
    pub namespaces: Vec<NamespaceInfo>,
    pub pods: Vec<PodInfo>,
    pub policies: Vec<NetworkPolicy>,
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
    pub decision: Decision,
}

/// Reads a case file, naming the file and field on error.
pub fn load(path: &Path) -> Result<Case, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a case and gives its pods addresses.
pub fn parse(text: &str) -> Result<Case, String> {
    let file: CaseFile = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    let pods: Vec<PodInfo> = file
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let node = i % NODES + 1;
            PodInfo {
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
    let policies = file
        .policies
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let mut raw = raw.clone();
            resolve_placeholders(&mut raw, &pods).map_err(|e| format!("policies[{i}]: {e}"))?;
            serde_json::from_value(raw).map_err(|e| format!("policies[{i}]: {e}"))
        })
        .collect::<Result<Vec<NetworkPolicy>, String>>()?;
    Ok(Case {
        id: file.id,
        ignore_loopback: file.ignore_loopback,
        namespaces,
        pods,
        policies,
        probes: file.probes,
    })
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

/// Every node's compiled program.
fn programs(case: &Case) -> BTreeMap<String, Program> {
    (1..=NODES)
        .map(|k| {
            let node = format!("node-{k}");
            let program = compile(&node, &case.policies, &case.pods, &case.namespaces);
            (node, program)
        })
        .collect()
}

/// The decision for one connection between two of the case's pods.
pub fn explain(
    case: &Case,
    from: &str,
    to: &str,
    protocol: Protocol,
    port: u16,
) -> Result<Decision, String> {
    let pod = |key: &str| {
        case.pods
            .iter()
            .find(|p| p.key() == key)
            .ok_or_else(|| format!("no pod {key:?} in case {}", case.id))
    };
    let (from, to) = (pod(from)?, pod(to)?);
    let programs = programs(case);
    Ok(decide(
        &programs[&from.node],
        &programs[&to.node],
        from.ips[0],
        to.ips[0],
        protocol,
        port,
    ))
}

/// Compiles every node's program and compares each probe with the matrix.
pub fn check(case: &Case) -> Vec<Mismatch> {
    let programs = programs(case);
    let mut mismatches = Vec::new();
    for probe in &case.probes {
        for from in &case.pods {
            for to in &case.pods {
                if case.ignore_loopback && from.key() == to.key() {
                    continue;
                }
                let Some(expected) = probe
                    .expected
                    .get(&from.key())
                    .and_then(|row| row.get(&to.key()))
                else {
                    continue;
                };
                let decision = decide(
                    &programs[&from.node],
                    &programs[&to.node],
                    from.ips[0],
                    to.ips[0],
                    probe.protocol,
                    probe.port,
                );
                if decision.allowed() != *expected {
                    mismatches.push(Mismatch {
                        port: probe.port,
                        protocol: probe.protocol,
                        from: from.key(),
                        to: to.key(),
                        expected: *expected,
                        decision,
                    });
                }
            }
        }
    }
    mismatches
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
                        (_, Some(m)) => {
                            format!("{}!", if m.decision.allowed() { "." } else { "X" })
                        }
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
                "  {} -> {} {}/{}: expected {}, got {} (egress: {}; ingress: {})",
                m.from,
                m.to,
                m.port,
                m.protocol,
                if m.expected { "connected" } else { "blocked" },
                if m.decision.allowed() {
                    "connected"
                } else {
                    "blocked"
                },
                m.decision.egress,
                m.decision.ingress
            );
        }
    }
    out
}
