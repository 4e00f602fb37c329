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
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::rc::Rc;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

pub use crate::cnp::{Action, Tier};
use crate::cnp::{ClusterNetworkPolicy, Parsed, ParsedRule};
use crate::model::{Identity, NamespaceInfo, NodeInfo, PodInfo, Protocol};
use crate::{prefix, selector};

/// Ingress or egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Direction {
    Ingress,
    Egress,
}

/// A policy: a NetworkPolicy, or a ClusterNetworkPolicy of a tier.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PolicyRef {
    Namespaced { namespace: String, name: String },
    Cluster { tier: Tier, name: String },
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Namespaced { namespace, name } => write!(f, "{namespace}/{name}"),
            Self::Cluster { name, .. } => write!(f, "cnp/{name}"),
        }
    }
}

/// The policy rule an entry came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleRef {
    pub policy: PolicyRef,
    pub direction: Direction,
    /// Index into the policy's `ingress` or `egress` list.
    pub index: usize,
    /// The rule's own name (ClusterNetworkPolicy rules may have one).
    pub name: Option<String>,
    /// What the rule does when it matches (NetworkPolicy rules accept).
    pub action: Action,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let direction = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        write!(f, "{} {direction} rule {}", self.policy, self.index)?;
        if let Some(name) = &self.name {
            write!(f, " {name:?}")?;
        }
        Ok(())
    }
}

/// A peer list as written (`from` or `to`), with the namespace of its
/// policy where that matters (a peer picking pods without a
/// namespaceSelector; otherwise empty): what decides which pods it holds,
/// so one pod can be tested against it alone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerSpec {
    pub namespace: String,
    pub peers: Vec<NetworkPolicyPeer>,
    /// ClusterNetworkPolicy `nodes` peers: every address of the Nodes
    /// they select (no pod's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<LabelSelector>,
    /// Whether `nodes` count doubtful addresses (a Deny's do).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub doubtful: bool,
}

impl PeerSpec {
    /// A NetworkPolicy's peer list (`None`: absent or empty, any address).
    /// The policy's namespace is part of what the peers are only when a
    /// peer selects pods without a namespaceSelector.
    fn of_policy(policy_ns: &str, peers: Option<&Vec<NetworkPolicyPeer>>) -> Option<Self> {
        let list = peers.filter(|p| !p.is_empty())?;
        let scoped = list
            .iter()
            .any(|p| p.ip_block.is_none() && p.namespace_selector.is_none());
        Some(Self {
            namespace: if scoped { policy_ns } else { "" }.to_string(),
            peers: list.clone(),
            nodes: Vec::new(),
            doubtful: false,
        })
    }

    /// The list's identity: equal lists share their kernel sets.
    fn id(&self) -> String {
        let mut id = format!(
            "{}:{}",
            self.namespace,
            serde_json::to_string(&self.peers).unwrap_or_default()
        );
        if !self.nodes.is_empty() {
            // A Deny's node addresses are not an Accept's: never one set.
            id.push_str(if self.doubtful {
                ":nodes+doubtful:"
            } else {
                ":nodes:"
            });
            id.push_str(&serde_json::to_string(&self.nodes).unwrap_or_default());
        }
        id
    }

    /// Whether the pod-selecting peers of the list pick `pod`, whose
    /// namespace has `namespace_labels` (`None`: a namespace not known
    /// yet, whose pods nothing picks). A pod whose identity is its node's
    /// word alone is nobody's peer.
    pub fn selects(
        &self,
        pod: &PodInfo,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> bool {
        let Some(labels) = namespace_labels.filter(|_| pod.identity == Identity::Api) else {
            return false;
        };
        self.peers
            .iter()
            .filter(|p| p.ip_block.is_none())
            .any(|peer| {
                let namespace_ok = match &peer.namespace_selector {
                    Some(sel) => selector::matches(sel, labels),
                    None => pod.namespace == self.namespace,
                };
                namespace_ok
                    && peer
                        .pod_selector
                        .as_ref()
                        .is_none_or(|sel| selector::matches(sel, &pod.labels))
            })
    }
}

/// The addresses a peer list allows, shared by every rule with the same
/// list in the same scope (the policy namespace matters only to peers
/// picking pods without a namespaceSelector): one kernel set each.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Peers {
    pub spec: PeerSpec,
    /// Addresses of the pods the selectors pick; `None`: no selector peer.
    /// (Kept apart from `blocks`: pods come and go, and plain address sets
    /// take element changes cheaply where interval sets do not.)
    pub hosts: Option<BTreeSet<IpAddr>>,
    /// ipBlocks as disjoint prefixes (excepts carved out); `None`: no
    /// ipBlock peer.
    pub blocks: Option<Vec<IpNet>>,
}

impl Peers {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.hosts.as_ref().is_some_and(|h| h.contains(&ip))
            || self.blocks.iter().flatten().any(|n| n.contains(&ip))
    }
}

/// The named ports of a rule, by name and protocol. They resolve on every
/// pod a destination can be: the node's pods for ingress (a packet
/// reaching the rule is already bound for a pod its policy selects), every
/// pod for egress (where the rule's peer test picks which) — so rules
/// naming the same ports share one table, whatever their policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NamedPorts {
    pub scope: Direction,
    /// Sorted, without repeats.
    pub names: Vec<(Protocol, String)>,
}

impl NamedPorts {
    /// What `pod` adds to this table (nothing if out of scope for `node`).
    pub fn targets<'a>(
        &'a self,
        pod: &'a PodInfo,
        node: &str,
    ) -> impl Iterator<Item = NamedTarget> + 'a {
        let in_scope = self.scope == Direction::Egress || (pod.node == node && !pod.ips.is_empty());
        self.names
            .iter()
            .filter(move |_| in_scope)
            .filter_map(|(protocol, name)| Some((*protocol, pod.named_port(name, *protocol)?)))
            .flat_map(|(protocol, port)| {
                pod.ips.iter().map(move |address| NamedTarget {
                    address: *address,
                    protocol,
                    port,
                })
            })
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

/// One rule of a policy: what it tests, by reference to the program's
/// peer and named-port tables (which pods change; the rule does not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub rule: RuleRef,
    /// The peer list's identity in [`Program::peers`]; `None`: any address.
    pub peers: Option<String>,
    /// `None`: every protocol and port. Otherwise the numeric ports.
    pub ports: Option<Vec<PortRange>>,
    /// `Some` when the rule names ports (a key of [`Program::named`]).
    pub named: Option<NamedPorts>,
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

/// How NetworkPolicy treats one direction of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Gate {
    /// No policy selecting the pod has this policy type.
    Open,
    /// Only what a rule of one of these policies (`namespace/name`, sorted)
    /// allows passes.
    Isolated { by: Vec<String> },
}

/// How one direction of one pod is treated, tier by tier: the Admin
/// tier's policies, NetworkPolicy, then the Baseline tier's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Tiers {
    /// Admin-tier ClusterNetworkPolicies selecting the pod, by name, in
    /// the order they are asked.
    pub admin: Vec<String>,
    pub np: Gate,
    /// Baseline-tier ClusterNetworkPolicies selecting the pod, likewise.
    pub baseline: Vec<String>,
}

impl Tiers {
    /// Nothing has a say: everything passes.
    pub fn is_open(&self) -> bool {
        self.admin.is_empty() && self.baseline.is_empty() && self.np == Gate::Open
    }
}

/// One pod's program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodProgram {
    /// `namespace/name`.
    pub pod: String,
    pub ips: Vec<IpAddr>,
    pub ingress: Tiers,
    pub egress: Tiers,
}

impl PodProgram {
    pub fn tiers(&self, direction: Direction) -> &Tiers {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// A new connection as one end's policy sees it: the other end (`peer`),
/// and the address, protocol and port connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    pub peer: IpAddr,
    pub destination: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// Everything the node enforces: its pods' gates, the policies that
/// select them, and the pods their rules pick.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Program {
    /// The node's pods with addresses, by `namespace/name`.
    pub pods: BTreeMap<String, PodProgram>,
    by_ip: BTreeMap<IpAddr, String>,
    /// Policies selecting a pod of the node, by `namespace/name`.
    pub policies: BTreeMap<String, PolicyProgram>,
    /// The peer lists of those policies' rules, by identity.
    pub peers: BTreeMap<String, Peers>,
    /// The named ports of those policies' rules, resolved.
    pub named: BTreeMap<NamedPorts, BTreeSet<NamedTarget>>,
    /// Per policy, its parts that could not be used, with why (they allow
    /// nothing; isolation still applies).
    pub problems: BTreeMap<String, Vec<String>>,
    /// Every ClusterNetworkPolicy that can be enforced, by name (each
    /// node holds them all: admins write few).
    pub cluster: BTreeMap<String, ClusterProgram>,
}

/// A ClusterNetworkPolicy as one node enforces it: its rules in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterProgram {
    pub tier: Tier,
    pub priority: i32,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl ClusterProgram {
    pub fn rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

impl Program {
    /// The program of the local pod holding `ip`.
    pub fn pod(&self, ip: IpAddr) -> Option<&PodProgram> {
        self.pods.get(self.by_ip.get(&ip)?)
    }

    pub(crate) fn insert_pod(&mut self, pod: PodProgram) {
        for ip in &pod.ips {
            self.by_ip.insert(*ip, pod.pod.clone());
        }
        self.pods.insert(pod.pod.clone(), pod);
    }

    pub(crate) fn remove_pod(&mut self, key: &str) -> Option<PodProgram> {
        let pod = self.pods.remove(key)?;
        for ip in &pod.ips {
            self.by_ip.remove(ip);
        }
        Some(pod)
    }

    /// The first rule of the NetworkPolicies in `by` allowing a connection
    /// in `direction` (peer, destination, protocol, port as in
    /// [`Program::matches`]).
    pub fn allowing(&self, by: &[String], direction: Direction, c: &Connection) -> Option<&Rule> {
        by.iter()
            .filter_map(|key| self.policies.get(key)?.rules(direction))
            .flatten()
            .find(|r| self.matches(r, c))
    }

    /// The first rule of the ClusterNetworkPolicies `names`, asked in that
    /// order, matching a connection in `direction`.
    pub fn first_match(
        &self,
        names: &[String],
        direction: Direction,
        c: &Connection,
    ) -> Option<&Rule> {
        names
            .iter()
            .filter_map(|name| self.cluster.get(name))
            .flat_map(|p| p.rules(direction))
            .find(|r| self.matches(r, c))
    }

    /// Every rule of every policy.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> + Clone {
        self.policies
            .values()
            .flat_map(|p| p.ingress.iter().chain(p.egress.iter()).flatten())
            .chain(
                self.cluster
                    .values()
                    .flat_map(|p| p.ingress.iter().chain(&p.egress)),
            )
    }

    /// Whether a new connection matches rule `r`.
    pub fn matches(&self, r: &Rule, c: &Connection) -> bool {
        let Connection {
            peer,
            destination,
            protocol,
            port,
        } = *c;
        let peer_ok = r
            .peers
            .as_ref()
            .is_none_or(|id| self.peers.get(id).is_some_and(|p| p.contains(peer)));
        let port_ok = match &r.ports {
            None => true,
            Some(ranges) => {
                ranges.iter().any(|r| r.contains(protocol, port))
                    || r.named.as_ref().is_some_and(|key| {
                        self.named.get(key).is_some_and(|t| {
                            t.contains(&NamedTarget {
                                address: destination,
                                protocol,
                                port,
                            })
                        })
                    })
            }
        };
        peer_ok && port_ok
    }
}

/// Whether `policy` selects `pod`: same namespace, and an absent
/// podSelector, like `{}`, selects every pod of it.
pub(crate) fn selects(policy: &NetworkPolicy, pod: &PodInfo) -> bool {
    policy.metadata.namespace.as_deref() == Some(pod.namespace.as_str())
        && policy.spec.as_ref().is_some_and(|spec| {
            spec.pod_selector
                .as_ref()
                .is_none_or(|sel| selector::matches(sel, &pod.labels))
        })
}

/// A direction's gate from the policies isolating it.
pub(crate) fn gate(mut by: Vec<String>) -> Gate {
    if by.is_empty() {
        return Gate::Open;
    }
    by.sort();
    by.dedup();
    Gate::Isolated { by }
}

/// The policy types of a policy, with the API's defaulting: Ingress always,
/// Egress when there are egress rules.
pub(crate) fn policy_types(policy: &NetworkPolicy) -> (bool, bool) {
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

/// What a peer list resolves to (`peers` is `None` for an absent or empty
/// list: any address), with the problems found.
struct Selected {
    peers: Option<(String, Peers)>,
    problems: Vec<String>,
}

struct Ctx<'a> {
    pods_by_namespace: BTreeMap<&'a str, Vec<&'a PodInfo>>,
    namespaces: BTreeMap<&'a str, &'a NamespaceInfo>,
    nodes: &'a [NodeInfo],
    /// Peer lists already resolved, by identity: many rules share one.
    selected: RefCell<HashMap<String, Rc<Selected>>>,
}

impl<'a> Ctx<'a> {
    /// What peer list `spec` holds (`None`: any address), resolved once
    /// per identity.
    fn peers(
        &self,
        spec: Option<PeerSpec>,
        problems: &mut Vec<String>,
        what: &str,
    ) -> Rc<Selected> {
        let id = spec.as_ref().map_or_else(|| "*".to_string(), PeerSpec::id);
        let cached = self.selected.borrow().get(&id).cloned();
        let selected = cached.unwrap_or_else(|| {
            let computed = Rc::new(match spec {
                None => Selected {
                    peers: None,
                    problems: Vec::new(),
                },
                Some(spec) => {
                    let (peers, problems) = self.resolve(spec);
                    Selected {
                        peers: Some((id.clone(), peers)),
                        problems,
                    }
                }
            });
            self.selected.borrow_mut().insert(id, computed.clone());
            computed
        });
        problems.extend(selected.problems.iter().map(|p| format!("{what} {p}")));
        selected
    }

    fn resolve(&self, spec: PeerSpec) -> (Peers, Vec<String>) {
        let mut blocks = None::<Vec<IpNet>>;
        let mut problems = Vec::new();
        for (i, block) in spec
            .peers
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some((i, p.ip_block.as_ref()?)))
        {
            let blocks = blocks.get_or_insert_with(Vec::new);
            let cidr: Result<IpNet, _> = block.cidr.parse();
            let excepts: Result<Vec<IpNet>, _> =
                block.except.iter().flatten().map(|e| e.parse()).collect();
            match (cidr, excepts) {
                (Ok(cidr), Ok(excepts)) => blocks.extend(prefix::subtract(cidr.trunc(), &excepts)),
                _ => problems.push(format!(
                    "peer {i}: ipBlock {:?} is not a valid CIDR list",
                    block
                )),
            }
        }
        if !spec.nodes.is_empty() {
            let picked = self
                .nodes
                .iter()
                .filter(|n| {
                    spec.nodes
                        .iter()
                        .any(|sel| selector::matches(sel, &n.labels))
                })
                .flat_map(|n| {
                    let doubtful = n.doubtful.iter().filter(|_| spec.doubtful);
                    n.addresses.iter().chain(doubtful)
                })
                .map(|ip| IpNet::from(*ip));
            blocks.get_or_insert_with(Vec::new).extend(picked);
        }
        let pod_peers: Vec<&NetworkPolicyPeer> =
            spec.peers.iter().filter(|p| p.ip_block.is_none()).collect();
        let hosts = (!pod_peers.is_empty()).then(|| {
            // Only the namespaces a peer can reach are searched; which pods
            // in them are picked is [`PeerSpec::selects`], as for one pod.
            let reachable = |name: &str, labels: &BTreeMap<String, String>| {
                pod_peers.iter().any(|p| match &p.namespace_selector {
                    Some(sel) => selector::matches(sel, labels),
                    None => name == spec.namespace,
                })
            };
            self.namespaces
                .iter()
                .filter(|(name, ns)| reachable(name, &ns.labels))
                .flat_map(|(name, ns)| {
                    let labels = &ns.labels;
                    let spec = &spec;
                    self.pods_by_namespace
                        .get(name)
                        .into_iter()
                        .flatten()
                        .filter(move |pod| spec.selects(pod, Some(labels)))
                })
                .flat_map(|pod| pod.ips.iter().copied())
                .collect()
        });
        let peers = Peers {
            spec,
            hosts,
            blocks: blocks.map(prefix::union),
        };
        (peers, problems)
    }

    /// One rule of a policy.
    fn rule(
        &self,
        rule: RuleRef,
        peers: Option<PeerSpec>,
        ports: Option<&Vec<NetworkPolicyPort>>,
        problems: &mut Vec<String>,
    ) -> Rule {
        let what = format!("{}: {:?} rule {}", rule.policy, rule.direction, rule.index);
        let selected = self.peers(peers, problems, &what);
        let peers = selected.peers.as_ref().map(|(id, _)| id.clone());
        let Some(entries) = port_entries(ports, problems, &what) else {
            return Rule {
                rule,
                peers,
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
        ranges.sort();
        ranges.dedup();
        names.sort();
        names.dedup();
        let direction = rule.direction;
        Rule {
            rule,
            peers,
            ports: Some(ranges),
            named: (!names.is_empty()).then_some(NamedPorts {
                scope: direction,
                names,
            }),
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
pub fn compile<'a>(
    node: &str,
    policies: impl IntoIterator<Item = &'a NetworkPolicy>,
    cluster: Cluster<'a>,
    pods: impl IntoIterator<Item = &'a PodInfo> + Clone,
    namespaces: impl IntoIterator<Item = &'a NamespaceInfo>,
) -> Program {
    let mut pods_by_namespace: BTreeMap<&str, Vec<&PodInfo>> = BTreeMap::new();
    for pod in pods.clone() {
        pods_by_namespace
            .entry(pod.namespace.as_str())
            .or_default()
            .push(pod);
    }
    let ctx = Ctx {
        pods_by_namespace,
        namespaces: namespaces
            .into_iter()
            .map(|n| (n.name.as_str(), n))
            .collect(),
        nodes: cluster.nodes,
        selected: RefCell::default(),
    };
    let mut program = Program::default();
    let locals: Vec<&PodInfo> = pods
        .clone()
        .into_iter()
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
        let mut problems = Vec::new();
        if let Some(sel) = spec.pod_selector.as_ref() {
            if let Err(e) = selector::check(sel) {
                problems.push(format!("{key}: podSelector: {e}"));
            }
        }
        let selected: Vec<&PodInfo> = locals_by_namespace
            .get(ns)
            .into_iter()
            .flatten()
            .copied()
            .filter(|p| selects(policy, p))
            .collect();
        if selected.is_empty() {
            if !problems.is_empty() {
                program.problems.insert(key, problems);
            }
            continue;
        }
        let (isolates_in, isolates_out) = policy_types(policy);
        let name = policy.metadata.name.clone().unwrap_or_default();
        let mut rules = |direction, list: Vec<RuleSpec>| {
            list.into_iter()
                .enumerate()
                .map(|(index, (peers, ports))| {
                    let rule = RuleRef {
                        policy: PolicyRef::Namespaced {
                            namespace: ns.into(),
                            name: name.clone(),
                        },
                        direction,
                        index,
                        name: None,
                        action: Action::Accept,
                    };
                    ctx.rule(rule, PeerSpec::of_policy(ns, peers), ports, &mut problems)
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
        if !problems.is_empty() {
            program.problems.insert(key.clone(), problems);
        }
        program.policies.insert(key, compiled);
    }
    for policy in cluster.policies {
        program
            .cluster
            .insert(policy.name.clone(), ctx.cluster_program(policy));
    }
    program.peers = ctx
        .selected
        .into_inner()
        .into_values()
        .filter_map(|s| Rc::try_unwrap(s).ok()?.peers)
        .collect();
    let named: BTreeSet<&NamedPorts> = program.rules().filter_map(|r| r.named.as_ref()).collect();
    program.named = named
        .into_iter()
        .map(|key| {
            let targets = pods
                .clone()
                .into_iter()
                .flat_map(|pod| key.targets(pod, node))
                .collect();
            (key.clone(), targets)
        })
        .collect();
    for pod in locals {
        let (ingress, egress) = gates.remove(&pod.key()).unwrap_or_default();
        let labels = ctx
            .namespaces
            .get(pod.namespace.as_str())
            .map(|n| &n.labels);
        let tiers = |np| cluster.tiers(pod, labels, np);
        program.insert_pod(PodProgram {
            pod: pod.key(),
            ips: pod.ips.clone(),
            ingress: tiers(gate(ingress)),
            egress: tiers(gate(egress)),
        });
    }
    program
}

/// Everything policy reads about the cluster at once.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub policies: Vec<NetworkPolicy>,
    pub cluster_policies: Vec<ClusterNetworkPolicy>,
    pub namespaces: Vec<NamespaceInfo>,
    pub pods: Vec<PodInfo>,
    pub nodes: Vec<NodeInfo>,
}

impl Snapshot {
    /// The ClusterNetworkPolicies that can be enforced, read.
    pub fn parsed(&self) -> Vec<Parsed> {
        self.cluster_policies
            .iter()
            .filter_map(|p| crate::cnp::parse(p).policy)
            .collect()
    }
}

/// The ClusterNetworkPolicies a node enforces (every one that can be),
/// and the Nodes their `nodes` peers pick from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cluster<'a> {
    pub policies: &'a [Parsed],
    pub nodes: &'a [NodeInfo],
}

impl Cluster<'_> {
    /// A pod's tiers around its NetworkPolicy gate `np`.
    pub fn tiers(
        &self,
        pod: &PodInfo,
        namespace_labels: Option<&BTreeMap<String, String>>,
        np: Gate,
    ) -> Tiers {
        let of = |tier: Tier| {
            let mut picked: Vec<&Parsed> = self
                .policies
                .iter()
                .filter(|p| p.tier == tier && p.subject.selects(pod, namespace_labels))
                .collect();
            picked.sort_by(|a, b| a.order().cmp(&b.order()));
            picked.into_iter().map(|p| p.name.clone()).collect()
        };
        Tiers {
            admin: of(Tier::Admin),
            np,
            baseline: of(Tier::Baseline),
        }
    }
}

impl Ctx<'_> {
    fn cluster_program(&self, policy: &Parsed) -> ClusterProgram {
        // Values were checked when the policy was parsed; what would be a
        // problem here was reported there.
        let mut ignored = Vec::new();
        let mut rules = |direction, list: &[ParsedRule]| -> Vec<Rule> {
            list.iter()
                .enumerate()
                .filter_map(|(index, r)| {
                    let peers = (!r.any_peer).then(|| PeerSpec {
                        namespace: String::new(),
                        peers: r.peers.clone(),
                        nodes: r.nodes.clone(),
                        doubtful: r.action == Action::Deny && !r.nodes.is_empty(),
                    });
                    // An Accept left with no usable peer or port opens
                    // nothing.
                    let no_peer = peers
                        .as_ref()
                        .is_some_and(|p| p.peers.is_empty() && p.nodes.is_empty());
                    if no_peer || r.ports.as_ref().is_some_and(Vec::is_empty) {
                        return None;
                    }
                    let rule = RuleRef {
                        policy: PolicyRef::Cluster {
                            tier: policy.tier,
                            name: policy.name.clone(),
                        },
                        direction,
                        index,
                        name: r.name.clone(),
                        action: r.action,
                    };
                    Some(self.rule(rule, peers, r.ports.as_ref(), &mut ignored))
                })
                .collect()
        };
        ClusterProgram {
            tier: policy.tier,
            priority: policy.priority,
            ingress: rules(Direction::Ingress, &policy.ingress),
            egress: rules(Direction::Egress, &policy.egress),
        }
    }
}

pub(crate) fn policy_key(policy: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        policy.metadata.namespace.as_deref().unwrap_or_default(),
        policy.metadata.name.as_deref().unwrap_or_default()
    )
}
