//! A policy change, NetworkPolicy or ClusterNetworkPolicy: that policy
//! compiled alone, merged into the program, and only the objects it
//! touches rendered and compared.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::{groups_of, map_entries, Engine};
use crate::cnp::{self, ClusterNetworkPolicy};
use crate::compile::{self, compile, Cluster, Direction, NamedPorts, Program, Tiers};
use crate::model::PodInfo;
use crate::nft::{self, Changes, Transaction};
use crate::render::{self, Options, Ruleset, Stage};

/// The Deny counters the stage chains `stages` count in.
fn counted(stages: &BTreeSet<Stage>, program: &Program) -> BTreeSet<String> {
    stages.iter().flat_map(|s| s.counters(program)).collect()
}

/// A group of pods: the direction and the tiers treating it.
type Group = (Direction, Tiers);

impl Engine {
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
        if self.shares_an_address(&affected) {
            return self.recompiled();
        }

        // The ClusterNetworkPolicies' part stays as it is: a
        // NetworkPolicy changes no pod's tiers around it.
        let one = compile(
            &self.node,
            now,
            Cluster::default(),
            self.pods.values(),
            self.namespaces.values(),
        );
        self.merge(one, |program| {
            program.policies.remove(key);
            program.problems.remove(key);
        });
        self.apply_part(
            &affected,
            &used_before,
            |program, current, before, after, options| {
                let chains = render::policy_chains(key).into_iter().collect();
                before.take_from(current, &chains, &BTreeSet::new());
                if let Some(p) = program.policies.get(key) {
                    after.add_policy(program, key, p, options);
                }
            },
        )
    }

    /// ClusterNetworkPolicy `name` created or changed (`Some`) or deleted
    /// (`None`); returns the transaction from the previous ruleset. As for
    /// a NetworkPolicy: only this policy is compiled; the node's pods whose
    /// tiers hold it (before or after) get them anew; the stage chains
    /// holding it are rewritten, and the sets and counters it alone used
    /// go, those it newly needs come.
    pub fn cluster_policy(
        &mut self,
        name: &str,
        object: Option<ClusterNetworkPolicy>,
    ) -> Option<(Transaction, Changes)> {
        let policy = object.as_ref().and_then(|o| cnp::parse(o).policy);
        match object {
            Some(o) => self.cluster_objects.insert(name.to_string(), o),
            None => self.cluster_objects.remove(name),
        };
        let at = self.cluster_policies.iter().position(|p| p.name == name);
        // Its status written, say: nothing to enforce differently.
        if at.map(|i| &self.cluster_policies[i]) == policy.as_ref() {
            return None;
        }
        let holds = |tiers: &Tiers| tiers.admin.iter().chain(&tiers.baseline).any(|n| n == name);
        let mut affected: BTreeSet<String> = self
            .program
            .pods
            .values()
            .filter(|p| holds(&p.ingress) || holds(&p.egress))
            .map(|p| p.pod.clone())
            .collect();
        if let Some(p) = &policy {
            affected.extend(
                self.pods
                    .values()
                    .filter(|pod| {
                        let labels = self.namespaces.get(&pod.namespace).map(|n| &n.labels);
                        self.is_local(pod) && p.subject.selects(pod, labels)
                    })
                    .map(PodInfo::key),
            );
        }
        let shared = self.shares_an_address(&affected);
        let used_before = Used::of(&self.program);
        let stages_before = Stage::all(&self.program);
        let counted_before = counted(&stages_before, &self.program);
        if let Some(i) = at {
            self.cluster_policies.remove(i);
        }
        self.cluster_policies.extend(policy.clone());
        if shared {
            return self.recompiled();
        }
        let one = compile(
            &self.node,
            &[],
            Cluster {
                policies: policy.as_slice(),
                nodes: &self.nodes,
            },
            self.pods.values(),
            self.namespaces.values(),
        );
        self.merge(one, |program| {
            program.cluster.remove(name);
        });
        self.apply_part(
            &affected,
            &used_before,
            |program, current, before, after, options| {
                // The pods are regated: their stages now are the new ones.
                let stages_after = Stage::all(program);
                let counted_after = counted(&stages_after, program);
                // Rewritten: the stages holding it; gone or new: those a
                // pod no longer or newly jumps to (its tiers lost or gained it).
                let changed = |stages: &BTreeSet<Stage>, other: &BTreeSet<Stage>| {
                    stages
                        .iter()
                        .filter(|s| s.names.iter().any(|n| n == name) || !other.contains(*s))
                        .cloned()
                        .collect::<Vec<Stage>>()
                };
                let old: BTreeSet<String> = changed(&stages_before, &stages_after)
                    .iter()
                    .map(Stage::chain)
                    .collect();
                before.take_from(current, &old, &BTreeSet::new());
                for stage in changed(&stages_after, &stages_before) {
                    after.add_stage(program, &stage, options);
                }
                if let Some(p) = program.cluster.get(name) {
                    after.add_cluster_sets(program, p);
                }
                // Counters go with the last stage chain counting in them.
                for gone in counted_before.difference(&counted_after) {
                    if let Some(c) = current.counters.get(gone) {
                        before.counters.insert(gone.clone(), c.clone());
                    }
                }
                after.counters.retain(|c, _| !counted_before.contains(c));
            },
        )
    }

    /// Whether one of the `affected` pods holds an address another pod
    /// holds too: which one it stands for is the whole compile's to settle.
    fn shares_an_address(&self, affected: &BTreeSet<String>) -> bool {
        affected
            .iter()
            .filter_map(|k| self.pods.get(k))
            .flat_map(|p| &p.ips)
            .any(|ip| self.holders.get(ip).is_some_and(|n| *n > 1))
    }

    /// Puts `one` (a policy compiled alone) into the program in place of
    /// what `drop` takes out of it, and drops the peer lists and named
    /// ports no policy uses any more.
    fn merge(&mut self, one: Program, drop: impl FnOnce(&mut Program)) {
        let program = &mut self.program;
        drop(program);
        program.policies.extend(one.policies);
        program.problems.extend(one.problems);
        program.cluster.extend(one.cluster);
        for (id, peers) in one.peers {
            program.peers.entry(id).or_insert(peers);
        }
        for (k, targets) in one.named {
            program.named.entry(k).or_insert(targets);
        }
        let used = Used::of(program);
        program.peers.retain(|id, _| used.peers.contains(id));
        program.named.retain(|k, _| used.named.contains(k));
    }

    /// The part of the ruleset a policy change touches, worked out and
    /// applied: the `affected` pods regated, their groups' chains, the sets
    /// one of the programs before (`used_before`) and now uses, and what
    /// `own` takes out as the kernel holds it (`before`, from `current`)
    /// and puts back as it should be (`after`): the policy's own chains.
    fn apply_part(
        &mut self,
        affected: &BTreeSet<String>,
        used_before: &Used,
        own: impl FnOnce(&Program, &Ruleset, &mut Ruleset, &mut Ruleset, &Options),
    ) -> Option<(Transaction, Changes)> {
        let used_after = Used::of(&self.program);
        let mut before = Ruleset::with_maps();
        let mut after = Ruleset::with_maps();
        let groups = self.regate(affected, &mut before, &mut after);
        let sets = used_before.sets_differing(&used_after);
        let chains: BTreeSet<String> = groups.keys().cloned().collect();
        before.take_from(&self.ruleset, &chains, &sets);
        own(
            &self.program,
            &self.ruleset,
            &mut before,
            &mut after,
            &self.options,
        );
        for (chain, (direction, tiers)) in &groups {
            if self.group_pods.get(chain).is_some_and(|n| *n > 0) {
                after.add_group(*direction, tiers, &self.options);
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

    /// Gives the `affected` pods their programs anew: their verdict-map
    /// entries as they were into `before`, as they are into `after`.
    /// Returns the groups they were or are in, by chain.
    fn regate(
        &mut self,
        affected: &BTreeSet<String>,
        before: &mut Ruleset,
        after: &mut Ruleset,
    ) -> BTreeMap<String, Group> {
        let mut groups = BTreeMap::new();
        for pod_key in affected {
            let was = self.program.remove_pod(pod_key);
            let now = self.pods.get(pod_key).and_then(|p| self.pod_program(p));
            for (pod, side, delta) in [(&was, &mut *before, -1), (&now, &mut *after, 1)] {
                let Some(pod) = pod else { continue };
                for (direction, tiers) in groups_of(pod) {
                    let chain = render::group_chain_name(direction, &tiers);
                    let users = self.group_pods.entry(chain.clone()).or_default();
                    *users = users.saturating_add_signed(delta);
                    groups.insert(chain, (direction, tiers));
                }
                for (map, ip, chain) in map_entries(pod) {
                    side.maps.entry(map).or_default().insert(ip, chain);
                }
            }
            if let Some(now) = now {
                self.program.insert_pod(now);
            }
        }
        groups
    }
}

/// What a program's policies refer to: port sets, peer lists, named ports.
struct Used {
    port_sets: BTreeSet<String>,
    peers: BTreeSet<String>,
    named: BTreeSet<NamedPorts>,
}

impl Used {
    fn of(program: &Program) -> Self {
        let rules = program.rules();
        Self {
            port_sets: render::port_sets(rules.clone()).collect(),
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
