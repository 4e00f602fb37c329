//! A pod change, worked out for that pod alone as set and map elements.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::{group_chains, map_entries, Engine};
use crate::compile::{PeerSpec, PodProgram};
use crate::model::PodInfo;
use crate::nft::{Changes, Command, Transaction};
use crate::render::{self, Element, MapName, Ruleset};

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
            return self.recompiled();
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
        let picked = |spec: &PeerSpec, p: Option<&PodInfo>| -> BTreeSet<IpAddr> {
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
