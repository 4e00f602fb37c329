//! A node's compiled program and ruleset kept current as the cluster
//! changes. A namespace change recompiles the node whole and applies the
//! difference. A pod change, the common case at scale, is worked out for
//! that pod alone — the peer lists and named ports it enters or leaves, its
//! own gates — as set and map elements, in time independent of the
//! cluster's size; when it would change structure (a policy starts or stops
//! applying to the node, a group of isolating policies appears or empties,
//! an address is held twice) the node is recompiled instead. A policy
//! change compiles that policy alone, regates the node's pods it selects
//! before or after, and touches only the chains, sets and counters it used
//! or now uses. Either way the result is exactly what compiling everything
//! anew gives, which the property test below checks.

mod pods;
mod policies;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::cnp::{ClusterNetworkPolicy, Parsed};
use crate::compile::{self, compile, Cluster, Direction, PodProgram, Program, Snapshot, Tiers};
use crate::model::{NamespaceInfo, NodeInfo, PodInfo};
use crate::nft::{self, Changes, Transaction};
use crate::render::{self, MapName, Options, Ruleset};

/// The cluster as one node's policy sees it, compiled and rendered.
pub struct Engine {
    node: String,
    options: Options,
    policies: Vec<NetworkPolicy>,
    /// Every ClusterNetworkPolicy, as written, by name.
    cluster_objects: BTreeMap<String, ClusterNetworkPolicy>,
    /// Those that can be enforced, read.
    cluster_policies: Vec<Parsed>,
    nodes: Vec<NodeInfo>,
    /// Indices into `policies` by namespace: a pod meets only its own.
    policies_in: HashMap<String, Vec<usize>>,
    namespaces: BTreeMap<String, NamespaceInfo>,
    pods: BTreeMap<String, PodInfo>,
    /// How many pods hold each address.
    holders: HashMap<IpAddr, usize>,
    /// How many local pods each compiled policy selects.
    selecting: HashMap<String, usize>,
    /// How many local pods each group chain serves.
    group_pods: HashMap<String, usize>,
    program: Program,
    ruleset: Ruleset,
}

impl Engine {
    pub fn new(node: &str, options: Options) -> Self {
        let mut engine = Self {
            node: node.to_string(),
            options,
            policies: Vec::new(),
            cluster_objects: BTreeMap::new(),
            cluster_policies: Vec::new(),
            nodes: Vec::new(),
            policies_in: HashMap::new(),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            holders: HashMap::new(),
            selecting: HashMap::new(),
            group_pods: HashMap::new(),
            program: Program::default(),
            ruleset: Ruleset::default(),
        };
        engine.ruleset = render::render(&engine.program, &options);
        engine
    }

    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The NetworkPolicies compiled into the program.
    pub fn policies(&self) -> &[NetworkPolicy] {
        &self.policies
    }

    /// What the kernel should hold.
    pub fn ruleset(&self) -> &Ruleset {
        &self.ruleset
    }

    /// The ClusterNetworkPolicies the program is of, as written (those
    /// that cannot be enforced included).
    pub fn cluster_policies(&self) -> impl Iterator<Item = &ClusterNetworkPolicy> {
        self.cluster_objects.values()
    }

    /// Takes the whole cluster anew and recompiles; returns the
    /// transaction from the previous ruleset (`None`: nothing changed).
    pub fn reset(&mut self, snapshot: Snapshot) -> Option<(Transaction, Changes)> {
        let before = std::mem::take(&mut self.ruleset);
        self.load(snapshot);
        nft::diff(&before, &self.ruleset)
    }

    /// Takes the whole cluster anew and recompiles, for a caller that
    /// replaces the whole table (no difference worked out).
    pub fn load(&mut self, snapshot: Snapshot) {
        self.cluster_policies = snapshot.parsed();
        self.policies = snapshot.policies;
        self.index_policies();
        self.cluster_objects = snapshot
            .cluster_policies
            .into_iter()
            .map(|p| (p.metadata.name.clone().unwrap_or_default(), p))
            .collect();
        self.nodes = snapshot.nodes;
        self.namespaces = snapshot
            .namespaces
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        self.pods = snapshot.pods.into_iter().map(|p| (p.key(), p)).collect();
        self.recompile();
    }

    /// The Nodes as they are now; returns the transaction from the
    /// previous ruleset. Only `nodes` peers read them: without one, a
    /// Node's change changes nothing.
    pub fn nodes(&mut self, nodes: Vec<NodeInfo>) -> Option<(Transaction, Changes)> {
        if self.nodes == nodes {
            return None;
        }
        self.nodes = nodes;
        let read = self
            .cluster_policies
            .iter()
            .flat_map(|p| p.ingress.iter().chain(&p.egress))
            .any(|r| !r.nodes.is_empty());
        if !read {
            return None;
        }
        self.recompiled()
    }

    fn cluster(&self) -> Cluster<'_> {
        Cluster {
            policies: &self.cluster_policies,
            nodes: &self.nodes,
        }
    }

    fn index_policies(&mut self) {
        self.policies_in.clear();
        for (i, policy) in self.policies.iter().enumerate() {
            let ns = policy.metadata.namespace.clone().unwrap_or_default();
            self.policies_in.entry(ns).or_default().push(i);
        }
    }

    /// The keys of the node's pods `policy` selects.
    fn local_selected(&self, policy: &NetworkPolicy) -> BTreeSet<String> {
        self.pods
            .values()
            .filter(|p| self.is_local(p) && compile::selects(policy, p))
            .map(PodInfo::key)
            .collect()
    }

    /// Recompiles the node; returns the transaction from the previous
    /// ruleset.
    fn recompiled(&mut self) -> Option<(Transaction, Changes)> {
        let before = std::mem::take(&mut self.ruleset);
        self.recompile();
        nft::diff(&before, &self.ruleset)
    }

    fn recompile(&mut self) {
        self.program = compile(
            &self.node,
            &self.policies,
            self.cluster(),
            self.pods.values(),
            self.namespaces.values(),
        );
        self.ruleset = render::render(&self.program, &self.options);
        self.holders.clear();
        for ip in self.pods.values().flat_map(|p| &p.ips) {
            *self.holders.entry(*ip).or_default() += 1;
        }
        self.selecting.clear();
        self.group_pods.clear();
        let selecting: Vec<String> = self
            .pods
            .values()
            .flat_map(|p| self.selecting_policies(Some(p)))
            .collect();
        for key in selecting {
            *self.selecting.entry(key).or_default() += 1;
        }
        for pod in self.program.pods.values() {
            for chain in group_chains(pod) {
                *self.group_pods.entry(chain).or_default() += 1;
            }
        }
    }

    fn is_local(&self, pod: &PodInfo) -> bool {
        pod.node == self.node && !pod.ips.is_empty()
    }

    /// The keys of the policies selecting `pod` if it is a local pod,
    /// whatever their types.
    fn selecting_policies(&self, pod: Option<&PodInfo>) -> BTreeSet<String> {
        let Some(pod) = pod.filter(|p| self.is_local(p)) else {
            return BTreeSet::new();
        };
        self.policies_of(pod).map(compile::policy_key).collect()
    }

    /// The policies selecting `pod`.
    fn policies_of<'a>(&'a self, pod: &'a PodInfo) -> impl Iterator<Item = &'a NetworkPolicy> {
        self.policies_in
            .get(&pod.namespace)
            .into_iter()
            .flatten()
            .map(|i| &self.policies[*i])
            .filter(|p| compile::selects(p, pod))
    }

    /// `pod`'s program on this node (`None`: not a local pod).
    fn pod_program(&self, pod: &PodInfo) -> Option<PodProgram> {
        if !self.is_local(pod) {
            return None;
        }
        let (mut ingress, mut egress) = (Vec::new(), Vec::new());
        for policy in self.policies_of(pod) {
            let (isolates_in, isolates_out) = compile::policy_types(policy);
            let key = compile::policy_key(policy);
            if isolates_in {
                ingress.push(key.clone());
            }
            if isolates_out {
                egress.push(key);
            }
        }
        let labels = self.namespaces.get(&pod.namespace).map(|n| &n.labels);
        let tiers = |np| self.cluster().tiers(pod, labels, np);
        Some(PodProgram {
            pod: pod.key(),
            ips: pod.ips.clone(),
            ingress: tiers(compile::gate(ingress)),
            egress: tiers(compile::gate(egress)),
        })
    }
}

/// The groups (direction, tiers) of a pod's directions that some tier has
/// a say in.
fn groups_of(pod: &PodProgram) -> Vec<(Direction, Tiers)> {
    [
        (Direction::Ingress, &pod.ingress),
        (Direction::Egress, &pod.egress),
    ]
    .into_iter()
    .filter(|(_, tiers)| !tiers.is_open())
    .map(|(direction, tiers)| (direction, tiers.clone()))
    .collect()
}

/// The group chains a pod's directions jump to.
fn group_chains(pod: &PodProgram) -> BTreeSet<String> {
    groups_of(pod)
        .iter()
        .map(|(direction, tiers)| render::group_chain_name(*direction, tiers))
        .collect()
}

/// A pod's verdict-map entries, as [`render::render`] makes them.
fn map_entries(pod: &PodProgram) -> Vec<(MapName, IpAddr, String)> {
    [
        (Direction::Ingress, &pod.ingress),
        (Direction::Egress, &pod.egress),
    ]
    .into_iter()
    .map(|(direction, tiers)| match tiers.is_open() {
        true => (direction, render::OPEN_CHAIN.to_string()),
        false => (direction, render::group_chain_name(direction, tiers)),
    })
    .flat_map(|(direction, chain)| {
        pod.ips.iter().map(move |ip| {
            let map = MapName {
                direction,
                v4: ip.is_ipv4(),
            };
            (map, *ip, chain.clone())
        })
    })
    .collect()
}
