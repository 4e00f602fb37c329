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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::compile::{self, compile, Direction, Gate, NamedPorts, PodProgram, Program};
use crate::model::{NamespaceInfo, PodInfo};
use crate::nft::{self, Changes, Command, Transaction};
use crate::render::{self, Element, MapName, Options, Ruleset};

/// The cluster as one node's policy sees it, compiled and rendered.
pub struct Engine {
    node: String,
    options: Options,
    policies: Vec<NetworkPolicy>,
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

/// Verdict-map entries: local pod address to group chain.
type Jumps = Vec<(IpAddr, String)>;

/// Element changes being gathered for one transaction, (added, removed)
/// per set and per map.
#[derive(Default)]
struct Elements {
    sets: BTreeMap<String, (Vec<Element>, Vec<Element>)>,
    maps: BTreeMap<MapName, (Jumps, Jumps)>,
}

impl Engine {
    pub fn new(node: &str, options: Options) -> Self {
        let mut engine = Self {
            node: node.to_string(),
            options,
            policies: Vec::new(),
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

    /// What the kernel should hold.
    pub fn ruleset(&self) -> &Ruleset {
        &self.ruleset
    }

    /// Takes the whole cluster anew and recompiles; returns the
    /// transaction from the previous ruleset (`None`: nothing changed).
    pub fn reset(
        &mut self,
        policies: Vec<NetworkPolicy>,
        namespaces: Vec<NamespaceInfo>,
        pods: Vec<PodInfo>,
    ) -> Option<(Transaction, Changes)> {
        let before = std::mem::take(&mut self.ruleset);
        self.load(policies, namespaces, pods);
        nft::diff(&before, &self.ruleset)
    }

    /// Takes the whole cluster anew and recompiles, for a caller that
    /// replaces the whole table (no difference worked out).
    pub fn load(
        &mut self,
        policies: Vec<NetworkPolicy>,
        namespaces: Vec<NamespaceInfo>,
        pods: Vec<PodInfo>,
    ) {
        self.policies = policies;
        self.index_policies();
        self.namespaces = namespaces
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        self.pods = pods.into_iter().map(|p| (p.key(), p)).collect();
        self.recompile();
    }

    /// Pod `key` created or changed (`Some`) or deleted (`None`); returns
    /// the transaction from the previous ruleset.
    pub fn pod(&mut self, key: &str, pod: Option<PodInfo>) -> Option<(Transaction, Changes)> {
        let old = self.pods.get(key).cloned();
        if old == pod {
            return None;
        }
        if !self.elements_suffice(old.as_ref(), pod.as_ref()) {
            match &pod {
                Some(p) => self.pods.insert(key.to_string(), p.clone()),
                None => self.pods.remove(key),
            };
            let before = std::mem::take(&mut self.ruleset);
            self.recompile();
            return nft::diff(&before, &self.ruleset);
        }
        let mut changes = Elements::default();
        self.move_pod(old.as_ref(), pod.as_ref(), &mut changes);
        self.move_gates(key, old.as_ref(), pod.as_ref(), &mut changes);
        for ip in old.iter().flat_map(|p| &p.ips) {
            if let Some(n) = self.holders.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    self.holders.remove(ip);
                }
            }
        }
        for ip in pod.iter().flat_map(|p| &p.ips) {
            *self.holders.entry(*ip).or_default() += 1;
        }
        match pod {
            Some(p) => self.pods.insert(key.to_string(), p),
            None => self.pods.remove(key),
        };
        changes.transaction(&mut self.ruleset)
    }

    /// NetworkPolicy `key` (`namespace/name`) created or changed (`Some`)
    /// or deleted (`None`); returns the transaction from the previous
    /// ruleset. Only this policy is compiled; the node's pods it selects
    /// (before or after) get their gates anew; the chains, sets and
    /// counters it alone used go, those it newly needs come.
    pub fn policy(
        &mut self,
        key: &str,
        policy: Option<NetworkPolicy>,
    ) -> Option<(Transaction, Changes)> {
        let at = self
            .policies
            .iter()
            .position(|p| compile::policy_key(p) == key);
        if at.map(|i| &self.policies[i]) == policy.as_ref() {
            return None;
        }
        let mut affected: BTreeSet<String> = at
            .map(|i| self.local_selected(&self.policies[i]))
            .unwrap_or_default();
        let used_before = Used::of(&self.program);
        match (at, policy) {
            (Some(i), Some(p)) => self.policies[i] = p,
            (None, Some(p)) => self.policies.push(p),
            (Some(i), None) => {
                self.policies.remove(i);
            }
            (None, None) => return None,
        }
        self.index_policies();
        let now = self.policies.iter().find(|p| compile::policy_key(p) == key);
        let selected_now = now.map(|p| self.local_selected(p)).unwrap_or_default();
        match selected_now.len() {
            0 => self.selecting.remove(key),
            n => self.selecting.insert(key.to_string(), n),
        };
        affected.extend(selected_now);
        // An address two pods hold: which one it stands for is the whole
        // compile's to settle.
        let shared = affected
            .iter()
            .filter_map(|k| self.pods.get(k))
            .flat_map(|p| &p.ips)
            .any(|ip| self.holders.get(ip).is_some_and(|n| *n > 1));
        if shared {
            let before = std::mem::take(&mut self.ruleset);
            self.recompile();
            return nft::diff(&before, &self.ruleset);
        }

        // The program: this policy compiled alone, merged in.
        let one = compile(
            &self.node,
            now,
            self.pods.values(),
            self.namespaces.values(),
        );
        let program = &mut self.program;
        program.policies.remove(key);
        program.problems.remove(key);
        program.policies.extend(one.policies);
        program.problems.extend(one.problems);
        for (id, peers) in one.peers {
            program.peers.entry(id).or_insert(peers);
        }
        for (k, targets) in one.named {
            program.named.entry(k).or_insert(targets);
        }
        let used_after = Used::of(program);
        program.peers.retain(|id, _| used_after.peers.contains(id));
        program.named.retain(|k, _| used_after.named.contains(k));

        // What the kernel holds of what this touches, then what it should.
        let mut before = Ruleset::with_maps();
        let mut after = Ruleset::with_maps();
        let mut groups = BTreeMap::new();
        for pod_key in &affected {
            if let Some(was) = self.program.remove_pod(pod_key) {
                for (direction, by) in groups_of(&was) {
                    *self
                        .group_pods
                        .entry(render::group_chain_name(direction, &by))
                        .or_default() -= 1;
                    groups.insert(render::group_chain_name(direction, &by), (direction, by));
                }
                for (map, ip, chain) in map_entries(&was) {
                    before.maps.entry(map).or_default().insert(ip, chain);
                }
            }
            let Some(now) = self.pods.get(pod_key).and_then(|p| self.pod_program(p)) else {
                continue;
            };
            for (direction, by) in groups_of(&now) {
                *self
                    .group_pods
                    .entry(render::group_chain_name(direction, &by))
                    .or_default() += 1;
                groups.insert(render::group_chain_name(direction, &by), (direction, by));
            }
            for (map, ip, chain) in map_entries(&now) {
                after.maps.entry(map).or_default().insert(ip, chain);
            }
            self.program.insert_pod(now);
        }
        let sets = used_before.sets_differing(&used_after);
        let chains: BTreeSet<String> = render::policy_chains(key)
            .into_iter()
            .chain(groups.keys().cloned())
            .collect();
        before.take_from(&self.ruleset, &chains, &sets);
        if let Some(p) = self.program.policies.get(key) {
            after.add_policy(&self.program, key, p);
        }
        for (chain, (direction, by)) in &groups {
            if self.group_pods.get(chain).is_some_and(|n| *n > 0) {
                after.add_group(*direction, by, &self.options);
            } else {
                self.group_pods.remove(chain);
            }
        }
        for (id, peers) in &self.program.peers {
            if !used_before.peers.contains(id) {
                after.add_peers(id, peers);
            }
        }
        for (k, targets) in &self.program.named {
            if !used_before.named.contains(k) {
                after.add_named(k, targets);
            }
        }
        after.sets.retain(|name, _| sets.contains(name));
        self.ruleset.replace_part(&before, &after);
        nft::diff(&before, &after)
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

    fn recompile(&mut self) {
        self.program = compile(
            &self.node,
            &self.policies,
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
        Some(PodProgram {
            pod: pod.key(),
            ips: pod.ips.clone(),
            ingress: compile::gate(ingress),
            egress: compile::gate(egress),
        })
    }

    /// Whether moving from `old` to `new` changes only elements.
    fn elements_suffice(&self, old: Option<&PodInfo>, new: Option<&PodInfo>) -> bool {
        // An address another pod also holds: which pod it stands for is
        // the whole compile's to settle.
        let own = |ip: &IpAddr| usize::from(old.is_some_and(|o| o.ips.contains(ip)));
        let shared = old
            .into_iter()
            .chain(new)
            .flat_map(|p| &p.ips)
            .any(|ip| self.holders.get(ip).copied().unwrap_or(0) > own(ip));
        if shared {
            return false;
        }
        let (was, now) = (self.selecting_policies(old), self.selecting_policies(new));
        // Every policy now selecting it is compiled already; none loses
        // its last local pod.
        let policies_stay = now.iter().all(|k| self.program.policies.contains_key(k))
            && was
                .difference(&now)
                .all(|k| self.selecting.get(k).copied().unwrap_or(0) > 1);
        if !policies_stay {
            return false;
        }
        // Every group it joins has a chain; none loses its last pod.
        let was_groups: BTreeSet<String> = old
            .and_then(|p| self.program.pods.get(&p.key()))
            .map(group_chains)
            .unwrap_or_default();
        let now_groups: BTreeSet<String> = new
            .and_then(|p| self.pod_program(p))
            .map(|p| group_chains(&p))
            .unwrap_or_default();
        now_groups
            .iter()
            .all(|c| self.ruleset.chains.contains_key(c))
            && was_groups
                .difference(&now_groups)
                .all(|c| self.group_pods.get(c).copied().unwrap_or(0) > 1)
    }

    /// The pod's addresses and named ports in and out of the peer lists
    /// and named-port tables.
    fn move_pod(&mut self, old: Option<&PodInfo>, new: Option<&PodInfo>, changes: &mut Elements) {
        let labels = |p: &PodInfo| self.namespaces.get(&p.namespace).map(|n| &n.labels);
        let picked = |spec: &compile::PeerSpec, p: Option<&PodInfo>| -> BTreeSet<IpAddr> {
            p.filter(|p| spec.selects(p, labels(p)))
                .map(|p| p.ips.iter().copied().collect())
                .unwrap_or_default()
        };
        for (id, peers) in &mut self.program.peers {
            let Some(hosts) = peers.hosts.as_mut() else {
                continue;
            };
            let (was, now) = (picked(&peers.spec, old), picked(&peers.spec, new));
            for ip in was.difference(&now) {
                hosts.remove(ip);
                changes.set(
                    render::hosts_set(id, ip.is_ipv4()),
                    Element::Host(*ip),
                    false,
                );
            }
            for ip in now.difference(&was) {
                hosts.insert(*ip);
                changes.set(
                    render::hosts_set(id, ip.is_ipv4()),
                    Element::Host(*ip),
                    true,
                );
            }
        }
        for (key, targets) in &mut self.program.named {
            let resolved = |p: Option<&PodInfo>| -> BTreeSet<_> {
                p.map(|p| key.targets(p, &self.node).collect())
                    .unwrap_or_default()
            };
            let (was, now) = (resolved(old), resolved(new));
            for t in was.difference(&now) {
                targets.remove(t);
                let set = render::named_set(key, t.address.is_ipv4());
                changes.set(set, Element::Named(*t), false);
            }
            for t in now.difference(&was) {
                targets.insert(*t);
                let set = render::named_set(key, t.address.is_ipv4());
                changes.set(set, Element::Named(*t), true);
            }
        }
    }

    /// The pod's own verdict-map entries, and the counts that tell when
    /// structure would change.
    fn move_gates(
        &mut self,
        key: &str,
        old: Option<&PodInfo>,
        new: Option<&PodInfo>,
        changes: &mut Elements,
    ) {
        let was = self.program.remove_pod(key);
        let now = new.and_then(|p| self.pod_program(p));
        let entries = |p: &Option<PodProgram>| -> BTreeSet<(MapName, IpAddr, String)> {
            p.iter().flat_map(map_entries).collect()
        };
        let (was_entries, now_entries) = (entries(&was), entries(&now));
        for (map, ip, chain) in was_entries.difference(&now_entries) {
            changes.map(*map, *ip, chain, false);
        }
        for (map, ip, chain) in now_entries.difference(&was_entries) {
            changes.map(*map, *ip, chain, true);
        }
        for chain in was.iter().flat_map(group_chains) {
            if let Some(n) = self.group_pods.get_mut(&chain) {
                *n -= 1;
            }
        }
        for chain in now.iter().flat_map(group_chains) {
            *self.group_pods.entry(chain).or_default() += 1;
        }
        for k in self.selecting_policies(old) {
            if let Some(n) = self.selecting.get_mut(&k) {
                *n -= 1;
            }
        }
        for k in self.selecting_policies(new) {
            *self.selecting.entry(k).or_default() += 1;
        }
        if let Some(now) = now {
            self.program.insert_pod(now);
        }
    }
}

/// The groups (direction, isolating policies) of a pod's isolated
/// directions.
fn groups_of(pod: &PodProgram) -> Vec<(Direction, Vec<String>)> {
    [
        (Direction::Ingress, &pod.ingress),
        (Direction::Egress, &pod.egress),
    ]
    .into_iter()
    .filter_map(|(direction, gate)| match gate {
        Gate::Isolated { by } => Some((direction, by.clone())),
        Gate::Open => None,
    })
    .collect()
}

/// The group chains a pod's isolated directions jump to.
fn group_chains(pod: &PodProgram) -> BTreeSet<String> {
    groups_of(pod)
        .iter()
        .map(|(direction, by)| render::group_chain_name(*direction, by))
        .collect()
}

/// What a program's policies refer to: port sets, peer lists, named ports.
struct Used {
    port_sets: BTreeSet<String>,
    peers: BTreeSet<String>,
    named: BTreeSet<NamedPorts>,
}

impl Used {
    fn of(program: &Program) -> Self {
        let rules = program
            .policies
            .values()
            .flat_map(|p| p.ingress.iter().chain(p.egress.iter()).flatten());
        Self {
            port_sets: program
                .policies
                .values()
                .flat_map(render::port_sets)
                .collect(),
            peers: rules.clone().filter_map(|r| r.peers.clone()).collect(),
            named: rules.filter_map(|r| r.named.clone()).collect(),
        }
    }

    /// The names of the sets one of `self` and `other` uses and the other
    /// does not.
    fn sets_differing(&self, other: &Used) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .port_sets
            .symmetric_difference(&other.port_sets)
            .cloned()
            .collect();
        for id in self.peers.symmetric_difference(&other.peers) {
            out.extend(render::peer_sets(id));
        }
        for key in self.named.symmetric_difference(&other.named) {
            out.extend([true, false].map(|v4| render::named_set(key, v4)));
        }
        out
    }
}

/// A pod's verdict-map entries, as [`render::render`] makes them.
fn map_entries(pod: &PodProgram) -> Vec<(MapName, IpAddr, String)> {
    [
        (Direction::Ingress, &pod.ingress),
        (Direction::Egress, &pod.egress),
    ]
    .into_iter()
    .filter_map(|(direction, gate)| match gate {
        Gate::Isolated { by } => Some((direction, render::group_chain_name(direction, by))),
        Gate::Open => None,
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

impl Elements {
    fn set(&mut self, set: String, element: Element, add: bool) {
        let (added, removed) = self.sets.entry(set).or_default();
        if add {
            added.push(element);
        } else {
            removed.push(element);
        }
    }

    fn map(&mut self, map: MapName, ip: IpAddr, chain: &str, add: bool) {
        let (added, removed) = self.maps.entry(map).or_default();
        let entry = (ip, chain.to_string());
        if add {
            added.push(entry);
        } else {
            removed.push(entry);
        }
    }

    /// Applies the changes to `ruleset` and returns them as one
    /// transaction, in the order [`nft::diff`] uses.
    fn transaction(self, ruleset: &mut Ruleset) -> Option<(Transaction, Changes)> {
        let mut commands = Vec::new();
        let mut counts = Changes::default();
        for (set, (added, _)) in &self.sets {
            if let Some(s) = ruleset.sets.get_mut(set) {
                s.elements.extend(added.iter().copied());
            }
            if !added.is_empty() {
                counts.elements_added += added.len();
                commands.push(Command::Elements {
                    add: true,
                    set: set.clone(),
                    elements: added.clone(),
                });
            }
        }
        for (map, (added, removed)) in self.maps {
            let entries = ruleset.maps.entry(map).or_default();
            for (ip, _) in &removed {
                entries.remove(ip);
            }
            for (ip, chain) in &added {
                entries.insert(*ip, chain.clone());
            }
            for (add, list) in [(false, removed), (true, added)] {
                if list.is_empty() {
                    continue;
                }
                if add {
                    counts.elements_added += list.len();
                } else {
                    counts.elements_removed += list.len();
                }
                commands.push(Command::Jumps {
                    add,
                    map,
                    entries: list,
                });
            }
        }
        for (set, (_, removed)) in self.sets {
            if let Some(s) = ruleset.sets.get_mut(&set) {
                for e in &removed {
                    s.elements.remove(e);
                }
            }
            if !removed.is_empty() {
                counts.elements_removed += removed.len();
                commands.push(Command::Elements {
                    add: false,
                    set,
                    elements: removed,
                });
            }
        }
        (!commands.is_empty()).then_some((Transaction { commands }, counts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NamedPort, Protocol};
    use crate::netlink;
    use proptest::prelude::*;
    use serde_json::json;

    fn namespaces(teams: &[bool]) -> Vec<NamespaceInfo> {
        ["x", "y"]
            .iter()
            .zip(teams)
            .map(|(name, a)| NamespaceInfo {
                name: name.to_string(),
                labels: BTreeMap::from([
                    ("kubernetes.io/metadata.name".into(), name.to_string()),
                    ("team".into(), if *a { "a" } else { "b" }.into()),
                ]),
            })
            .collect()
    }

    /// A pod from small numbers: which name, namespace, node, labels,
    /// address (shared between pods when `address` repeats) and ports.
    fn pod(name: u8, ns: bool, node: bool, app: u8, tier: bool, address: u8, ports: u8) -> PodInfo {
        let mut labels =
            BTreeMap::from([("tier".to_string(), if tier { "w" } else { "d" }.to_string())]);
        if app > 0 {
            labels.insert("app".into(), format!("a{app}"));
        }
        let ips = if address == 0 {
            Vec::new()
        } else {
            vec![
                format!("10.0.0.{address}").parse().unwrap(),
                format!("fd00::{address}").parse().unwrap(),
            ]
        };
        let named = |name: &str, port, protocol| NamedPort {
            name: name.into(),
            port,
            protocol,
        };
        let ports = match ports {
            0 => vec![],
            1 => vec![named("http", 80, Protocol::Tcp)],
            2 => vec![
                named("http", 8080, Protocol::Tcp),
                named("dns", 53, Protocol::Udp),
            ],
            _ => vec![named("dns", 5353, Protocol::Udp)],
        };
        PodInfo {
            namespace: if ns { "x" } else { "y" }.into(),
            name: format!("p{name}"),
            node: if node { "n1" } else { "n2" }.into(),
            labels,
            ips,
            ports,
        }
    }

    fn peers(which: u8) -> serde_json::Value {
        match which {
            0 => json!([{"podSelector": {"matchLabels": {"tier": "w"}}}]),
            1 => json!([{"namespaceSelector": {"matchLabels": {"team": "a"}}}]),
            2 => json!([{"namespaceSelector": {"matchLabels": {"team": "b"}},
                         "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}]),
            3 => json!([{"ipBlock": {"cidr": "10.0.0.0/24", "except": ["10.0.0.4/30"]}},
                        {"podSelector": {"matchLabels": {"app": "a1"}}}]),
            _ => json!(null),
        }
    }

    fn ports(which: u8) -> serde_json::Value {
        match which {
            0 => json!(null),
            1 => json!([{"port": 80}]),
            2 => json!([{"port": "http"}]),
            _ => json!([{"port": 53, "protocol": "UDP"}, {"port": "dns", "protocol": "UDP"}]),
        }
    }

    fn rule(field: &str, (p, q): (u8, u8)) -> serde_json::Value {
        let mut r = json!({});
        if !peers(p).is_null() {
            r[field] = peers(p);
        }
        if !ports(q).is_null() {
            r["ports"] = ports(q);
        }
        r
    }

    fn policy(
        i: usize,
        ns: bool,
        selector: u8,
        types: u8,
        ingress: &[(u8, u8)],
        egress: &[(u8, u8)],
    ) -> NetworkPolicy {
        let pod_selector = match selector {
            0 => json!({}),
            1 => json!({"matchLabels": {"app": "a1"}}),
            _ => json!({"matchLabels": {"tier": "w"}}),
        };
        let mut spec = json!({
            "podSelector": pod_selector,
            "ingress": ingress.iter().map(|r| rule("from", *r)).collect::<Vec<_>>(),
            "egress": egress.iter().map(|r| rule("to", *r)).collect::<Vec<_>>(),
        });
        match types {
            0 => {}
            1 => spec["policyTypes"] = json!(["Ingress"]),
            2 => spec["policyTypes"] = json!(["Egress"]),
            _ => spec["policyTypes"] = json!(["Ingress", "Egress"]),
        }
        serde_json::from_value(json!({
            "metadata": {"name": format!("np{i}"), "namespace": if ns { "x" } else { "y" }},
            "spec": spec,
        }))
        .unwrap()
    }

    fn arb_pod() -> impl Strategy<Value = PodInfo> {
        (
            0u8..6,
            any::<bool>(),
            any::<bool>(),
            0u8..3,
            any::<bool>(),
            0u8..9,
            0u8..4,
        )
            .prop_map(|(n, ns, node, app, tier, address, ports)| {
                pod(n, ns, node, app, tier, address, ports)
            })
    }

    /// Namespace x?, pod selector, policy types, ingress and egress rules
    /// as (peers, ports).
    type PolicyShape = (bool, u8, u8, Vec<(u8, u8)>, Vec<(u8, u8)>);

    fn arb_policy() -> impl Strategy<Value = PolicyShape> {
        let rules = || prop::collection::vec((0u8..5, 0u8..4), 0..3);
        (any::<bool>(), 0u8..3, 0u8..4, rules(), rules())
    }

    #[derive(Debug, Clone)]
    enum Change {
        Pod(u8, Option<PodInfo>),
        /// Policy `np<i>` in x (or y): replaced, created or deleted.
        Policy(usize, bool, Option<PolicyShape>),
    }

    fn arb_change() -> impl Strategy<Value = Change> {
        prop_oneof![
            (0u8..6, prop::option::of(arb_pod())).prop_map(|(n, p)| Change::Pod(n, p)),
            (0usize..5, any::<bool>(), prop::option::of(arb_policy()))
                .prop_map(|(i, ns, p)| Change::Policy(i, ns, p)),
        ]
    }

    /// Element commands applied to a copy of `rs`; `None` if the
    /// transaction has structural commands.
    fn with_elements(rs: &Ruleset, t: &Transaction) -> Option<Ruleset> {
        let mut rs = rs.clone();
        for c in &t.commands {
            match c {
                Command::Elements { add, set, elements } => {
                    let s = &mut rs.sets.get_mut(set)?.elements;
                    for e in elements {
                        assert!(if *add { s.insert(*e) } else { s.remove(e) }, "{c:?}");
                    }
                }
                Command::Jumps { add, map, entries } => {
                    let m = rs.maps.get_mut(map)?;
                    for (ip, chain) in entries {
                        if *add {
                            assert!(m.insert(*ip, chain.clone()).is_none(), "{c:?}");
                        } else {
                            assert_eq!(m.remove(ip).as_ref(), Some(chain), "{c:?}");
                        }
                    }
                }
                _ => return None,
            }
        }
        Some(rs)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// After any pod and policy changes, the engine holds exactly what
        /// compiling everything anew gives, and each transaction it
        /// returned takes the previous ruleset to the next.
        #[test]
        fn change_by_change_equals_compiling_everything_anew(
            teams in prop::collection::vec(any::<bool>(), 2),
            pods in prop::collection::vec(arb_pod(), 0..6),
            policies in prop::collection::vec(arb_policy(), 0..4),
            changes in prop::collection::vec(arb_change(), 1..8),
        ) {
            let policies: BTreeMap<String, NetworkPolicy> = policies
                .iter()
                .enumerate()
                .map(|(i, (ns, sel, types, ing, eg))| policy(i, *ns, *sel, *types, ing, eg))
                .map(|p| (compile::policy_key(&p), p))
                .collect();
            let mut policies = policies;
            let mut engine = Engine::new("n1", Options::default());
            engine.reset(policies.values().cloned().collect(), namespaces(&teams), pods.clone());
            let mut state: BTreeMap<String, PodInfo> = pods.into_iter().map(|p| (p.key(), p)).collect();
            for change in changes {
                let before = engine.ruleset().clone();
                let transaction = match change {
                    Change::Pod(name, change) => {
                        let key = format!("{}/p{name}", change.as_ref().map_or("x", |p| p.namespace.as_str()));
                        let change = change.map(|mut p| { p.name = format!("p{name}"); p });
                        let transaction = engine.pod(&key, change.clone());
                        match change {
                            Some(p) => state.insert(key, p),
                            None => state.remove(&key),
                        };
                        transaction
                    }
                    Change::Policy(i, ns, shape) => {
                        let p = shape.map(|(_, sel, types, ing, eg)| policy(i, ns, sel, types, &ing, &eg));
                        let key = format!("{}/np{i}", if ns { "x" } else { "y" });
                        let transaction = engine.policy(&key, p.clone());
                        match p {
                            Some(p) => policies.insert(key, p),
                            None => policies.remove(&key),
                        };
                        transaction
                    }
                };
                let mut fresh = Engine::new("n1", Options::default());
                fresh.reset(policies.values().cloned().collect(), namespaces(&teams), state.values().cloned().collect());
                prop_assert_eq!(engine.program(), fresh.program());
                prop_assert_eq!(engine.ruleset(), fresh.ruleset());
                match transaction {
                    None => prop_assert_eq!(&before, engine.ruleset()),
                    Some((t, _)) => {
                        if let Some(after) = with_elements(&before, &t) {
                            prop_assert_eq!(&after, engine.ruleset());
                        } else {
                            prop_assert_eq!(Some(t), nft::diff(&before, engine.ruleset()).map(|(t, _)| t));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_relabel_within_the_same_policies_is_elements_only() {
        let policies = vec![policy(0, true, 1, 3, &[(0, 1)], &[(1, 2)])];
        let pods = vec![
            pod(0, true, true, 1, true, 1, 1),
            pod(1, true, true, 1, false, 2, 1),
            pod(2, true, false, 2, true, 3, 1),
        ];
        let mut engine = Engine::new("n1", Options::default());
        engine.reset(policies, namespaces(&[true, false]), pods);
        // p1 (local, selected by the policy) goes from tier d to w: it
        // joins the tier=w peer list; its own gates stay.
        let (t, changes) = engine
            .pod("x/p1", Some(pod(1, true, true, 1, true, 2, 1)))
            .expect("a change");
        assert!(netlink::Batch::of(&t.commands).is_some(), "{t:?}");
        assert_eq!((changes.elements_added, changes.elements_removed), (2, 0));
        // A new local pod of the same app: its map entries, its named port.
        let (t, changes) = engine
            .pod("x/p3", Some(pod(3, true, true, 1, false, 4, 2)))
            .expect("a change");
        assert!(netlink::Batch::of(&t.commands).is_some(), "{t:?}");
        assert!(changes.elements_added >= 4, "{changes:?}");
    }
}
