//! A policy change: that policy compiled alone, merged into the program,
//! and only the objects it touches rendered and compared.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::networking::v1::NetworkPolicy;

use super::{groups_of, map_entries, Engine};
use crate::compile::{self, compile, Cluster, Direction, NamedPorts, Program, Tiers};
use crate::nft::{self, Changes, Transaction};
use crate::render::{self, Ruleset};

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

        // The ClusterNetworkPolicies' part stays as it is: a
        // NetworkPolicy changes no pod's tiers around it.
        let one = compile(
            &self.node,
            now,
            Cluster::default(),
            self.pods.values(),
            self.namespaces.values(),
        );
        self.merge(key, one);
        let used_after = Used::of(&self.program);

        // What the kernel holds of what this touches, then what it should.
        let mut before = Ruleset::with_maps();
        let mut after = Ruleset::with_maps();
        let groups = self.regate(&affected, &mut before, &mut after);
        let sets = used_before.sets_differing(&used_after);
        let chains: BTreeSet<String> = render::policy_chains(key)
            .into_iter()
            .chain(groups.keys().cloned())
            .collect();
        before.take_from(&self.ruleset, &chains, &sets);
        if let Some(p) = self.program.policies.get(key) {
            after.add_policy(&self.program, key, p, &self.options);
        }
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

    /// Puts `one` (policy `key` compiled alone) into the program in place
    /// of what `key` was, and drops the peer lists and named ports no
    /// policy uses any more.
    fn merge(&mut self, key: &str, one: Program) {
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
        let used = Used::of(program);
        program.peers.retain(|id, _| used.peers.contains(id));
        program.named.retain(|k, _| used.named.contains(k));
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
