//! NetworkPolicy semantics compiled into a per-node program (pure).
//!
//! For every pod on the node, each direction is either open (no policy
//! selecting the pod has that policy type) or isolated with a list of allow
//! entries: a peer prefix (minus excepts), a protocol and a port range, each
//! tagged with the policy rule it came from. Selectors, namespaces and
//! named ports are all resolved here, so the program — what the evaluator
//! reads and what is rendered to nftables — is plain prefixes and numbers.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::model::{NamespaceInfo, PodInfo, Protocol};
use crate::selector;

/// Ingress or egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Direction {
    Ingress,
    Egress,
}

/// The policy rule an allow entry came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleRef {
    pub namespace: String,
    pub policy: String,
    pub direction: Direction,
    /// Index into the policy's `ingress` or `egress` list.
    pub index: usize,
}

/// One allowed combination of peer and port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Allow {
    pub peer: IpNet,
    pub except: Vec<IpNet>,
    /// `None`: every protocol (and port).
    pub protocol: Option<Protocol>,
    /// Inclusive; `None`: every port of the protocol.
    pub ports: Option<(u16, u16)>,
    pub rule: RuleRef,
}

impl Allow {
    /// Whether traffic with `peer` address to `protocol`/`port` matches.
    pub fn matches(&self, peer: IpAddr, protocol: Protocol, port: u16) -> bool {
        self.peer.contains(&peer)
            && !self.except.iter().any(|e| e.contains(&peer))
            && self.protocol.is_none_or(|p| p == protocol)
            && self.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&port))
    }
}

/// How one direction of one pod is treated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Gate {
    /// No policy selecting the pod has this policy type.
    Open,
    /// Only what an entry allows passes.
    Isolated {
        /// `namespace/name` of the policies that isolate the pod.
        by: Vec<String>,
        allows: Vec<Allow>,
    },
}

/// One pod's program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodProgram {
    /// `namespace/name`.
    pub pod: String,
    pub ips: Vec<IpAddr>,
    pub ingress: Gate,
    pub egress: Gate,
}

/// Everything the node enforces: its pods' programs, by address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Program {
    pub pods: Vec<PodProgram>,
    by_ip: BTreeMap<IpAddr, usize>,
    /// Policies or rules that could not be used, with why (they allow
    /// nothing; isolation still applies).
    pub problems: Vec<String>,
}

impl Program {
    /// The program of the local pod holding `ip`.
    pub fn pod(&self, ip: IpAddr) -> Option<&PodProgram> {
        self.by_ip.get(&ip).map(|i| &self.pods[*i])
    }
}

/// The policy types of a policy, with the API's defaulting: Ingress always,
/// Egress when there are egress rules.
fn policy_types(policy: &NetworkPolicy) -> (bool, bool) {
    let spec = policy.spec.as_ref();
    match spec.and_then(|s| s.policy_types.as_ref()) {
        Some(types) => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        None => (
            true,
            spec.and_then(|s| s.egress.as_ref())
                .is_some_and(|e| !e.is_empty()),
        ),
    }
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// Everything: 0.0.0.0/0 and ::/0.
fn anywhere() -> [IpNet; 2] {
    [
        "0.0.0.0/0".parse().expect("a literal"),
        "::/0".parse().expect("a literal"),
    ]
}

struct Ctx<'a> {
    pods: &'a [PodInfo],
    namespaces: BTreeMap<&'a str, &'a NamespaceInfo>,
}

/// What a peer list selects: prefixes (with excepts), and the pods among
/// them (for named ports, which resolve per destination pod).
struct Peers<'a> {
    prefixes: Vec<(IpNet, Vec<IpNet>)>,
    pods: Vec<&'a PodInfo>,
}

impl<'a> Ctx<'a> {
    fn peers(
        &self,
        policy_ns: &str,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        problems: &mut Vec<String>,
        what: &str,
    ) -> Peers<'a> {
        let Some(peers) = peers.filter(|p| !p.is_empty()) else {
            return Peers {
                prefixes: anywhere().iter().map(|a| (*a, Vec::new())).collect(),
                pods: self.pods.iter().collect(),
            };
        };
        let mut out = Peers {
            prefixes: Vec::new(),
            pods: Vec::new(),
        };
        for (i, peer) in peers.iter().enumerate() {
            if let Some(block) = &peer.ip_block {
                let cidr: Result<IpNet, _> = block.cidr.parse();
                let excepts: Result<Vec<IpNet>, _> =
                    block.except.iter().flatten().map(|e| e.parse()).collect();
                match (cidr, excepts) {
                    (Ok(cidr), Ok(excepts)) => {
                        out.pods.extend(self.pods.iter().filter(|p| {
                            p.ips.iter().any(|ip| {
                                cidr.contains(ip) && !excepts.iter().any(|e| e.contains(ip))
                            })
                        }));
                        out.prefixes.push((cidr, excepts));
                    }
                    _ => problems.push(format!(
                        "{what} peer {i}: ipBlock {:?} is not a valid CIDR list",
                        block
                    )),
                }
                continue;
            }
            let selected = self.pods.iter().filter(|p| {
                let ns_ok = match &peer.namespace_selector {
                    Some(sel) => self
                        .namespaces
                        .get(p.namespace.as_str())
                        .is_some_and(|ns| selector::matches(sel, &ns.labels)),
                    None => p.namespace == policy_ns,
                };
                ns_ok
                    && peer
                        .pod_selector
                        .as_ref()
                        .is_none_or(|sel| selector::matches(sel, &p.labels))
            });
            for pod in selected {
                out.prefixes
                    .extend(pod.ips.iter().map(|ip| (host_prefix(*ip), Vec::new())));
                out.pods.push(pod);
            }
        }
        out
    }
}

impl<'a> Ctx<'a> {
    /// The allow entries of one rule of a policy selecting `local`. A named
    /// port resolves against the destination: `local` for ingress, each
    /// peer pod for egress.
    fn rule_allows(
        &self,
        local: &PodInfo,
        rule: RuleRef,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        ports: Option<&Vec<NetworkPolicyPort>>,
        problems: &mut Vec<String>,
    ) -> Vec<Allow> {
        let what = format!(
            "{}/{}: {:?} rule {}",
            rule.namespace, rule.policy, rule.direction, rule.index
        );
        let peers = self.peers(&rule.namespace, peers, problems, &what);
        let mut allows = Vec::new();
        for (protocol, spec) in port_entries(ports, problems, &what) {
            let entry = |peer: IpNet, except: Vec<IpNet>, ports| Allow {
                peer,
                except,
                protocol,
                ports,
                rule: rule.clone(),
            };
            match (&spec, rule.direction) {
                (PortSpec::Named(n), Direction::Egress) => {
                    for dst in &peers.pods {
                        if let Some(p) = dst.named_port(n, protocol.unwrap_or(Protocol::Tcp)) {
                            allows.extend(
                                dst.ips
                                    .iter()
                                    .map(|ip| entry(host_prefix(*ip), Vec::new(), Some((p, p)))),
                            );
                        }
                    }
                }
                _ => {
                    let range = match &spec {
                        PortSpec::Any => None,
                        PortSpec::Range(lo, hi) => Some((*lo, *hi)),
                        PortSpec::Named(n) => {
                            match local.named_port(n, protocol.unwrap_or(Protocol::Tcp)) {
                                Some(p) => Some((p, p)),
                                None => continue,
                            }
                        }
                    };
                    allows.extend(
                        peers
                            .prefixes
                            .iter()
                            .map(|(peer, except)| entry(*peer, except.clone(), range)),
                    );
                }
            }
        }
        allows
    }
}

/// A rule's ports as (protocol, port spec); no ports means every protocol
/// and port. Named ports stay names: they resolve per destination pod.
fn port_entries(
    ports: Option<&Vec<NetworkPolicyPort>>,
    problems: &mut Vec<String>,
    what: &str,
) -> Vec<(Option<Protocol>, PortSpec)> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return vec![(None, PortSpec::Any)];
    };
    ports
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let protocol = match Protocol::parse(p.protocol.as_deref()) {
                Ok(proto) => proto,
                Err(e) => {
                    problems.push(format!("{what} port {i}: {e}"));
                    return None;
                }
            };
            let spec = match &p.port {
                None => PortSpec::Any,
                Some(IntOrString::Int(n)) => {
                    match (u16::try_from(*n), p.end_port.map(u16::try_from).transpose()) {
                        (Ok(lo), Ok(hi)) => PortSpec::Range(lo, hi.unwrap_or(lo).max(lo)),
                        _ => {
                            problems.push(format!("{what} port {i}: {n} is not a port number"));
                            return None;
                        }
                    }
                }
                Some(IntOrString::String(name)) => match name.parse::<u16>() {
                    Ok(n) => PortSpec::Range(n, n),
                    Err(_) => PortSpec::Named(name.clone()),
                },
            };
            Some((Some(protocol), spec))
        })
        .collect()
}

#[derive(Debug, Clone)]
enum PortSpec {
    Any,
    Range(u16, u16),
    Named(String),
}

/// Compiles the program of the pods on `node`.
pub fn compile(
    node: &str,
    policies: &[NetworkPolicy],
    pods: &[PodInfo],
    namespaces: &[NamespaceInfo],
) -> Program {
    let ctx = Ctx {
        pods,
        namespaces: namespaces.iter().map(|n| (n.name.as_str(), n)).collect(),
    };
    let mut program = Program::default();
    for policy in policies {
        if let Some(sel) = policy.spec.as_ref().and_then(|s| s.pod_selector.as_ref()) {
            if let Err(e) = selector::check(sel) {
                program
                    .problems
                    .push(format!("{}: podSelector: {e}", policy_key(policy)));
            }
        }
    }
    for pod in pods.iter().filter(|p| p.node == node && !p.ips.is_empty()) {
        let mut ingress: Option<(Vec<String>, Vec<Allow>)> = None;
        let mut egress: Option<(Vec<String>, Vec<Allow>)> = None;
        for policy in policies {
            let (Some(spec), Some(ns)) =
                (policy.spec.as_ref(), policy.metadata.namespace.as_deref())
            else {
                continue;
            };
            // An absent podSelector, like `{}`, selects every pod of the namespace.
            let selects = spec
                .pod_selector
                .as_ref()
                .is_none_or(|sel| selector::matches(sel, &pod.labels));
            if ns != pod.namespace || !selects {
                continue;
            }
            let (isolates_in, isolates_out) = policy_types(policy);
            let rules_in = spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()));
            let rules_out = spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()));
            let directions: [(bool, Direction, &mut Option<_>, Vec<_>); 2] = [
                (
                    isolates_in,
                    Direction::Ingress,
                    &mut ingress,
                    rules_in.collect(),
                ),
                (
                    isolates_out,
                    Direction::Egress,
                    &mut egress,
                    rules_out.collect(),
                ),
            ];
            for (isolates, direction, gate, rules) in directions {
                if !isolates {
                    continue;
                }
                let (by, allows) = gate.get_or_insert_with(Default::default);
                by.push(policy_key(policy));
                for (index, (peers, ports)) in rules.into_iter().enumerate() {
                    let rule = RuleRef {
                        namespace: ns.into(),
                        policy: policy.metadata.name.clone().unwrap_or_default(),
                        direction,
                        index,
                    };
                    allows.extend(ctx.rule_allows(pod, rule, peers, ports, &mut program.problems));
                }
            }
        }
        let gate = |g: Option<(Vec<String>, Vec<Allow>)>| match g {
            None => Gate::Open,
            Some((by, allows)) => Gate::Isolated { by, allows },
        };
        let index = program.pods.len();
        for ip in &pod.ips {
            program.by_ip.insert(*ip, index);
        }
        program.pods.push(PodProgram {
            pod: pod.key(),
            ips: pod.ips.clone(),
            ingress: gate(ingress),
            egress: gate(egress),
        });
    }
    program
}

fn policy_key(policy: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        policy.metadata.namespace.as_deref().unwrap_or_default(),
        policy.metadata.name.as_deref().unwrap_or_default()
    )
}
