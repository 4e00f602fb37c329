//! NetworkPolicy semantics compiled into a per-node program (pure).
//!
//! For every pod on the node, each direction is open (no policy selecting
//! the pod has that policy type) or isolated by a set of policies; each
//! such policy is compiled once for the node into rules of plain peer
//! prefixes, port ranges and named ports resolved per destination pod.
//! This is the structure the evaluator reads and the renderer turns into
//! nftables sets and chains: pods map to policies, policies to rules, rules
//! to address and port sets — so a pod change moves set elements and a
//! policy change touches that policy's rules.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::rc::Rc;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::model::{NamespaceInfo, PodInfo, Protocol};
use crate::{prefix, selector};

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

/// The addresses a rule allows as peers, with the identity of the selector
/// they came from (policy namespace and peer list), so rules selecting the
/// same peers share kernel sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peers {
    pub id: String,
    /// Addresses of the pods the selectors pick; `None`: no selector peer.
    /// (Kept apart from `blocks`: pods come and go, and plain address sets
    /// take element changes cheaply where interval sets do not.)
    pub hosts: Option<Vec<IpAddr>>,
    /// ipBlocks as disjoint prefixes (excepts carved out); `None`: no
    /// ipBlock peer.
    pub blocks: Option<Vec<IpNet>>,
}

impl Peers {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.hosts.iter().flatten().any(|h| *h == ip)
            || self.blocks.iter().flatten().any(|n| n.contains(&ip))
    }
}

/// A protocol and an inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortRange {
    pub protocol: Protocol,
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    fn contains(&self, protocol: Protocol, port: u16) -> bool {
        self.protocol == protocol && (self.lo..=self.hi).contains(&port)
    }
}

/// A named port resolved on one destination pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NamedTarget {
    /// The destination pod's address.
    pub address: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// One rule of a policy, resolved to addresses and numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub rule: RuleRef,
    /// `None`: any address.
    pub peers: Option<Peers>,
    /// `None`: every protocol and port. Otherwise the numeric ports.
    pub ports: Option<Vec<PortRange>>,
    /// `Some` when the rule names ports: each resolved per destination pod
    /// (the local pod for ingress, the peer for egress).
    pub named: Option<Vec<NamedTarget>>,
}

impl Rule {
    /// Whether a new connection with `peer`, to `destination`:`port` over
    /// `protocol`, matches.
    pub fn matches(
        &self,
        peer: IpAddr,
        destination: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> bool {
        let peer_ok = self.peers.as_ref().is_none_or(|p| p.contains(peer));
        let port_ok = match &self.ports {
            None => true,
            Some(ranges) => {
                ranges.iter().any(|r| r.contains(protocol, port))
                    || self.named.iter().flatten().any(|t| {
                        t.address == destination && t.protocol == protocol && t.port == port
                    })
            }
        };
        peer_ok && port_ok
    }
}

/// A policy as one node enforces it: the rules of each direction it has
/// as a policy type (`None`: it does not isolate that direction).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyProgram {
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl PolicyProgram {
    pub fn rules(&self, direction: Direction) -> Option<&[Rule]> {
        match direction {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// How one direction of one pod is treated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Gate {
    /// No policy selecting the pod has this policy type.
    Open,
    /// Only what a rule of one of these policies (`namespace/name`, sorted)
    /// allows passes.
    Isolated { by: Vec<String> },
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

/// Everything the node enforces: its pods' gates and the policies that
/// select them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Program {
    pub pods: Vec<PodProgram>,
    by_ip: BTreeMap<IpAddr, usize>,
    /// Policies selecting a pod of the node, by `namespace/name`.
    pub policies: BTreeMap<String, PolicyProgram>,
    /// Policies or rules that could not be used, with why (they allow
    /// nothing; isolation still applies).
    pub problems: Vec<String>,
}

impl Program {
    /// The program of the local pod holding `ip`.
    pub fn pod(&self, ip: IpAddr) -> Option<&PodProgram> {
        self.by_ip.get(&ip).map(|i| &self.pods[*i])
    }

    /// The first rule of the policies in `by` allowing a connection in
    /// `direction` (peer, destination, protocol, port as in [`Rule::matches`]).
    pub fn allowing(
        &self,
        by: &[String],
        direction: Direction,
        peer: IpAddr,
        destination: IpAddr,
        protocol: Protocol,
        port: u16,
    ) -> Option<&Rule> {
        by.iter()
            .filter_map(|key| self.policies.get(key)?.rules(direction))
            .flatten()
            .find(|r| r.matches(peer, destination, protocol, port))
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

/// What a peer list selects: addresses, and the pods among them (for named
/// ports, which resolve per destination pod), with the problems found.
struct Selected<'a> {
    peers: Option<Peers>,
    pods: Vec<&'a PodInfo>,
    problems: Vec<String>,
}

struct Ctx<'a> {
    pods_by_namespace: BTreeMap<&'a str, Vec<&'a PodInfo>>,
    namespaces: BTreeMap<&'a str, &'a NamespaceInfo>,
    /// Peer lists already resolved, by identity: many rules share one.
    selected: RefCell<HashMap<String, Rc<Selected<'a>>>>,
}

impl<'a> Ctx<'a> {
    fn all_pods(&self) -> impl Iterator<Item = &'a PodInfo> + '_ {
        self.pods_by_namespace.values().flatten().copied()
    }

    fn peers(
        &self,
        policy_ns: &str,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        problems: &mut Vec<String>,
        what: &str,
    ) -> Rc<Selected<'a>> {
        let list = peers.filter(|p| !p.is_empty());
        // The policy's namespace is part of what the peers are only when a
        // peer selects pods without a namespaceSelector.
        let scope = if list
            .iter()
            .flat_map(|l| l.iter())
            .any(|p| p.ip_block.is_none() && p.namespace_selector.is_none())
        {
            policy_ns
        } else {
            ""
        };
        let id = match list {
            None => "*".to_string(),
            Some(list) => format!(
                "{scope}:{}",
                serde_json::to_string(list).unwrap_or_default()
            ),
        };
        let cached = self.selected.borrow().get(&id).cloned();
        let selected = cached.unwrap_or_else(|| {
            let computed = Rc::new(match list {
                None => Selected {
                    peers: None,
                    pods: self.all_pods().collect(),
                    problems: Vec::new(),
                },
                Some(list) => self.resolve(policy_ns, list, id.clone()),
            });
            self.selected.borrow_mut().insert(id, computed.clone());
            computed
        });
        problems.extend(selected.problems.iter().map(|p| format!("{what} {p}")));
        selected
    }

    fn resolve(&self, policy_ns: &str, list: &[NetworkPolicyPeer], id: String) -> Selected<'a> {
        let mut hosts = None::<Vec<IpAddr>>;
        let mut blocks = None::<Vec<IpNet>>;
        let mut pods = Vec::new();
        let mut problems = Vec::new();
        for (i, peer) in list.iter().enumerate() {
            if let Some(block) = &peer.ip_block {
                let blocks = blocks.get_or_insert_with(Vec::new);
                let cidr: Result<IpNet, _> = block.cidr.parse();
                let excepts: Result<Vec<IpNet>, _> =
                    block.except.iter().flatten().map(|e| e.parse()).collect();
                match (cidr, excepts) {
                    (Ok(cidr), Ok(excepts)) => {
                        let allowed = prefix::subtract(cidr.trunc(), &excepts);
                        pods.extend(self.all_pods().filter(|p| {
                            p.ips
                                .iter()
                                .any(|ip| allowed.iter().any(|n| n.contains(ip)))
                        }));
                        blocks.extend(allowed);
                    }
                    _ => problems.push(format!(
                        "peer {i}: ipBlock {:?} is not a valid CIDR list",
                        block
                    )),
                }
                continue;
            }
            let hosts = hosts.get_or_insert_with(Vec::new);
            let candidates: Vec<&'a PodInfo> = match &peer.namespace_selector {
                Some(sel) => self
                    .namespaces
                    .iter()
                    .filter(|(_, ns)| selector::matches(sel, &ns.labels))
                    .flat_map(|(name, _)| self.pods_by_namespace.get(name).into_iter().flatten())
                    .copied()
                    .collect(),
                None => self
                    .pods_by_namespace
                    .get(policy_ns)
                    .cloned()
                    .unwrap_or_default(),
            };
            for pod in candidates {
                if peer
                    .pod_selector
                    .as_ref()
                    .is_none_or(|sel| selector::matches(sel, &pod.labels))
                {
                    hosts.extend(pod.ips.iter().copied());
                    pods.push(pod);
                }
            }
        }
        if let Some(hosts) = hosts.as_mut() {
            hosts.sort();
            hosts.dedup();
        }
        Selected {
            peers: Some(Peers {
                id,
                hosts,
                blocks: blocks.map(prefix::union),
            }),
            pods,
            problems,
        }
    }

    /// One rule of a policy selecting `locals` (the node's pods it selects).
    /// A named port resolves against the destination: each local pod for
    /// ingress, each peer pod for egress.
    fn rule(
        &self,
        locals: &[&PodInfo],
        rule: RuleRef,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        ports: Option<&Vec<NetworkPolicyPort>>,
        problems: &mut Vec<String>,
    ) -> Rule {
        let what = format!(
            "{}/{}: {:?} rule {}",
            rule.namespace, rule.policy, rule.direction, rule.index
        );
        let selected = self.peers(&rule.namespace, peers, problems, &what);
        let Some(entries) = port_entries(ports, problems, &what) else {
            return Rule {
                rule,
                peers: selected.peers.clone(),
                ports: None,
                named: None,
            };
        };
        let mut ranges = Vec::new();
        let mut names = Vec::new();
        for (protocol, spec) in entries {
            match spec {
                PortSpec::Any => ranges.push(PortRange {
                    protocol,
                    lo: 0,
                    hi: u16::MAX,
                }),
                PortSpec::Range(lo, hi) => ranges.push(PortRange { protocol, lo, hi }),
                PortSpec::Named(name) => names.push((protocol, name)),
            }
        }
        let named = (!names.is_empty()).then(|| {
            let destinations: &[&PodInfo] = match rule.direction {
                Direction::Ingress => locals,
                Direction::Egress => &selected.pods,
            };
            let mut targets: Vec<NamedTarget> = destinations
                .iter()
                .flat_map(|pod| {
                    names.iter().filter_map(move |(protocol, name)| {
                        let port = pod.named_port(name, *protocol)?;
                        Some(pod.ips.iter().map(move |address| NamedTarget {
                            address: *address,
                            protocol: *protocol,
                            port,
                        }))
                    })
                })
                .flatten()
                .collect();
            targets.sort();
            targets.dedup();
            targets
        });
        ranges.sort();
        ranges.dedup();
        Rule {
            rule,
            peers: selected.peers.clone(),
            ports: Some(ranges),
            named,
        }
    }
}

/// A rule's ports as (protocol, port spec); `None`: no ports, meaning every
/// protocol and port. Named ports stay names: they resolve per destination
/// pod. An unusable entry is reported and left out (it allows nothing).
fn port_entries(
    ports: Option<&Vec<NetworkPolicyPort>>,
    problems: &mut Vec<String>,
    what: &str,
) -> Option<Vec<(Protocol, PortSpec)>> {
    let ports = ports.filter(|p| !p.is_empty())?;
    Some(
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
                Some((protocol, spec))
            })
            .collect(),
    )
}

/// A rule as written: its peers (`from` or `to`) and its ports.
type RuleSpec<'p> = (
    Option<&'p Vec<NetworkPolicyPeer>>,
    Option<&'p Vec<NetworkPolicyPort>>,
);

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
    let mut pods_by_namespace: BTreeMap<&str, Vec<&PodInfo>> = BTreeMap::new();
    for pod in pods {
        pods_by_namespace
            .entry(pod.namespace.as_str())
            .or_default()
            .push(pod);
    }
    let ctx = Ctx {
        pods_by_namespace,
        namespaces: namespaces.iter().map(|n| (n.name.as_str(), n)).collect(),
        selected: RefCell::default(),
    };
    let mut program = Program::default();
    let locals: Vec<&PodInfo> = pods
        .iter()
        .filter(|p| p.node == node && !p.ips.is_empty())
        .collect();
    let mut locals_by_namespace: BTreeMap<&str, Vec<&PodInfo>> = BTreeMap::new();
    for pod in &locals {
        locals_by_namespace
            .entry(pod.namespace.as_str())
            .or_default()
            .push(pod);
    }
    let mut gates: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for policy in policies {
        let (Some(spec), Some(ns)) = (policy.spec.as_ref(), policy.metadata.namespace.as_deref())
        else {
            continue;
        };
        let key = policy_key(policy);
        if let Some(sel) = spec.pod_selector.as_ref() {
            if let Err(e) = selector::check(sel) {
                program.problems.push(format!("{key}: podSelector: {e}"));
            }
        }
        // An absent podSelector, like `{}`, selects every pod of the namespace.
        let selected: Vec<&PodInfo> = locals_by_namespace
            .get(ns)
            .into_iter()
            .flatten()
            .copied()
            .filter(|p| {
                spec.pod_selector
                    .as_ref()
                    .is_none_or(|sel| selector::matches(sel, &p.labels))
            })
            .collect();
        if selected.is_empty() {
            continue;
        }
        let (isolates_in, isolates_out) = policy_types(policy);
        let name = policy.metadata.name.clone().unwrap_or_default();
        let mut rules = |direction, list: Vec<RuleSpec>| {
            list.into_iter()
                .enumerate()
                .map(|(index, (peers, ports))| {
                    let rule = RuleRef {
                        namespace: ns.into(),
                        policy: name.clone(),
                        direction,
                        index,
                    };
                    ctx.rule(&selected, rule, peers, ports, &mut program.problems)
                })
                .collect::<Vec<Rule>>()
        };
        let compiled = PolicyProgram {
            ingress: isolates_in.then(|| {
                rules(
                    Direction::Ingress,
                    spec.ingress
                        .iter()
                        .flatten()
                        .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                        .collect(),
                )
            }),
            egress: isolates_out.then(|| {
                rules(
                    Direction::Egress,
                    spec.egress
                        .iter()
                        .flatten()
                        .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                        .collect(),
                )
            }),
        };
        for pod in &selected {
            let (ingress, egress) = gates.entry(pod.key()).or_default();
            if isolates_in {
                ingress.push(key.clone());
            }
            if isolates_out {
                egress.push(key.clone());
            }
        }
        program.policies.insert(key, compiled);
    }
    let gate = |mut by: Vec<String>| {
        if by.is_empty() {
            return Gate::Open;
        }
        by.sort();
        by.dedup();
        Gate::Isolated { by }
    };
    for pod in locals {
        let (ingress, egress) = gates.remove(&pod.key()).unwrap_or_default();
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
