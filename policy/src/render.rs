//! A compiled [`Program`] as the nftables objects that enforce it (pure):
//! what [`crate::nft`] creates, or changes by difference.
//!
//! ```text
//! table inet weft_policy
//!   chain egress   hook forward prio 0;  ct established,related accept
//!                  ip saddr vmap @egress4 ; ip6 saddr vmap @egress6
//!   chain ingress  hook forward prio 10; ct established,related accept
//!                  ip daddr vmap @ingress4; ip6 daddr vmap @ingress6
//!   map ingress4   local pod address : jump gi-<policies>   (isolated pods)
//!   chain gi-<h>   jump pi-<policy> ...; counter di-<h>; [limit; log]; drop
//!   chain pi-<h>   per rule: ip saddr @a-<peers>-4 meta l4proto . th dport @t-<ports> accept
//!   set a-<h>-4    peer prefixes of one selector (interval)
//!   set t-<h>      protocol . port ranges (interval)
//!   set n-<h>-4    destination address . protocol . port (named ports)
//! ```
//!
//! A packet takes one map lookup per direction to the chain of the set of
//! policies isolating its pod, then a few set lookups per rule of those
//! policies: the cluster's other policies and pods never lengthen its path.
//! Pods sharing the same isolating policies share one group chain, so a pod
//! added, deleted or relabelled changes map and set elements only; a policy
//! changed rewrites its own chain (and its sets if its selectors changed).
//! An `accept` in the egress chain ends that base chain only, so the
//! destination's ingress chain, at a later priority, still runs. Traffic
//! from the node to its pods does not cross `forward`: kubelet probes pass,
//! as upstream expects.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Value};

use crate::compile::{
    Action, ClusterProgram, Direction, Gate, NamedPorts, NamedTarget, Peers, PodProgram,
    PolicyProgram, PortRange, Program, Rule, RuleRef, Tier, Tiers,
};
use crate::model::Protocol;

pub const TABLE: &str = "weft_policy";
/// Where the map entries of a programmed pod that no policy isolates (in
/// that direction) point: it accepts. Part of the skeleton.
pub const OPEN_CHAIN: &str = "open";

/// How drops are reported besides their counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Log dropped packets through the kernel log, at most this many per
    /// second per group of isolating policies; `None`: no logging.
    pub log_per_second: Option<u32>,
}

/// What a set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SetKind {
    /// Pod addresses (a plain set: elements change cheaply).
    Hosts {
        v4: bool,
    },
    /// ipBlock prefixes (an interval set; changes only with its policy).
    Blocks {
        v4: bool,
    },
    Ports,
    Named {
        v4: bool,
    },
}

/// One set element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Element {
    Host(IpAddr),
    Net(IpNet),
    Ports(PortRange),
    Named(NamedTarget),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub kind: SetKind,
    pub elements: BTreeSet<Element>,
}

/// The drop counter of a group chain: which direction, which policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropCounter {
    pub direction: Direction,
    pub policies: Vec<String>,
}

/// A verdict map: the four of them send local pod addresses to groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MapName {
    pub direction: Direction,
    pub v4: bool,
}

impl MapName {
    pub const ALL: [MapName; 4] = [
        MapName::new(Direction::Egress, true),
        MapName::new(Direction::Egress, false),
        MapName::new(Direction::Ingress, true),
        MapName::new(Direction::Ingress, false),
    ];

    const fn new(direction: Direction, v4: bool) -> Self {
        Self { direction, v4 }
    }

    pub fn name(&self) -> String {
        let d = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        format!("{d}{}", if self.v4 { 4 } else { 6 })
    }
}

/// Everything in the table but its fixed skeleton (base chains, maps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Regular chains with their rules.
    pub chains: BTreeMap<String, Vec<Line>>,
    pub sets: BTreeMap<String, Set>,
    pub maps: BTreeMap<MapName, BTreeMap<IpAddr, String>>,
    pub counters: BTreeMap<String, DropCounter>,
}

impl Ruleset {
    /// Number of set and map elements.
    pub fn elements(&self) -> usize {
        self.sets.values().map(|s| s.elements.len()).sum::<usize>()
            + self.maps.values().map(BTreeMap::len).sum::<usize>()
    }

    pub fn rules(&self) -> usize {
        self.chains.values().map(Vec::len).sum()
    }
}

/// A short name part for `value`, so names stay well under nftables'
/// limits whatever the policy names are. Deterministic for one build;
/// names need only agree within one meshd, which replaces the whole table
/// when it starts.
fn digest(value: &impl Hash) -> String {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn letter(direction: Direction) -> char {
    match direction {
        Direction::Ingress => 'i',
        Direction::Egress => 'e',
    }
}

fn words(direction: Direction) -> &'static str {
    match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

pub fn family(v4: bool) -> &'static str {
    if v4 {
        "ip"
    } else {
        "ip6"
    }
}

fn payload(v4: bool, field: &str) -> Value {
    json!({"payload": {"protocol": family(v4), "field": field}})
}

fn in_set(left: Value, set: &str) -> Value {
    json!({"match": {"op": "==", "left": left, "right": format!("@{set}")}})
}

fn l4proto_dport() -> [Value; 2] {
    [
        json!({"meta": {"key": "l4proto"}}),
        json!({"payload": {"protocol": "th", "field": "dport"}}),
    ]
}

/// A rendered rule: its expressions as libnftables JSON text (written
/// once, then only compared and copied into transactions) and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub expr: String,
    pub comment: String,
}

#[cfg(test)]
impl Line {
    /// The expressions parsed back.
    pub fn expressions(&self) -> Value {
        serde_json::from_str(&self.expr).unwrap_or_default()
    }
}

fn rule(expr: Vec<Value>, comment: &str) -> Line {
    Line {
        expr: Value::Array(expr).to_string(),
        comment: bounded(comment, MAX_COMMENT),
    }
}

/// The kernel keeps at most 255 bytes of a rule's comment and nft refuses
/// the whole transaction for a longer one: names (a policy's, a rule's)
/// are the author's to choose, so comments are cut, well inside that.
const MAX_COMMENT: usize = 127;

/// `text` cut to at most `max` bytes on a character boundary, `...` marking
/// a cut.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

pub fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// The port test of a rule: none, numeric ports, or named ports.
enum PortTest<'a> {
    Any,
    Numeric(String),
    Named(&'a NamedPorts),
}

fn suffix(v4: bool) -> char {
    if v4 {
        '4'
    } else {
        '6'
    }
}

/// The set of the pod addresses of peer list `id`, per family.
pub(crate) fn hosts_set(id: &str, v4: bool) -> String {
    format!("a-{}-{}", digest(&id), suffix(v4))
}

fn blocks_set(id: &str, v4: bool) -> String {
    format!("b-{}-{}", digest(&id), suffix(v4))
}

/// The set of the resolved named ports `key`, per family.
pub(crate) fn named_set(key: &NamedPorts, v4: bool) -> String {
    format!("n-{}-{}", digest(key), suffix(v4))
}

/// The chain of the pods treated as `tiers` in `direction`. (Named by the
/// isolating policies alone when only NetworkPolicy has a say.)
pub(crate) fn group_chain_name(direction: Direction, tiers: &Tiers) -> String {
    let name = match (
        tiers.admin.is_empty() && tiers.baseline.is_empty(),
        &tiers.np,
    ) {
        (true, Gate::Isolated { by }) => digest(&by),
        _ => digest(tiers),
    };
    format!("g{}-{name}", letter(direction))
}

/// One tier's policies selecting a group of pods, in the order they are
/// asked, in one direction: the contents of a stage chain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stage {
    pub tier: Tier,
    pub direction: Direction,
    pub names: Vec<String>,
}

impl Stage {
    /// The stages a group treated as `tiers` jumps to.
    pub(crate) fn of(direction: Direction, tiers: &Tiers) -> impl Iterator<Item = Stage> + '_ {
        [
            (Tier::Admin, &tiers.admin),
            (Tier::Baseline, &tiers.baseline),
        ]
        .into_iter()
        .filter(|(_, names)| !names.is_empty())
        .map(move |(tier, names)| Stage {
            tier,
            direction,
            names: names.clone(),
        })
    }

    /// Every stage the program's pods jump to.
    pub(crate) fn all(program: &Program) -> BTreeSet<Stage> {
        program
            .pods
            .values()
            .flat_map(|p| {
                [Direction::Ingress, Direction::Egress]
                    .into_iter()
                    .flat_map(|d| Stage::of(d, p.tiers(d)).collect::<Vec<_>>())
            })
            .collect()
    }

    pub(crate) fn chain(&self) -> String {
        stage_chain(self.tier, self.direction, &self.names)
    }

    fn rules<'a>(&'a self, program: &'a Program) -> impl Iterator<Item = &'a Rule> + 'a {
        self.names
            .iter()
            .filter_map(|name| program.cluster.get(name))
            .flat_map(|p| p.rules(self.direction))
    }

    /// The drop counters its Deny lines count in.
    pub(crate) fn counters(&self, program: &Program) -> BTreeSet<String> {
        self.rules(program)
            .filter(|r| r.rule.action == Action::Deny)
            .map(|r| rule_counter(&r.rule))
            .collect()
    }
}

/// The chain of one tier's policies `names`, in that order, in `direction`.
fn stage_chain(tier: Tier, direction: Direction, names: &[String]) -> String {
    let t = match tier {
        Tier::Admin => 'a',
        Tier::Baseline => 'b',
    };
    format!("s{t}{}-{}", letter(direction), digest(&names))
}

fn policy_chain(direction: Direction, key: &str) -> String {
    format!("p{}-{}", letter(direction), digest(&key))
}

/// The counter of group chain `chain` (`None`: not a group chain).
fn counter_of(chain: &str) -> Option<String> {
    let rest = chain.strip_prefix('g')?;
    Some(format!("d{rest}"))
}

/// The elements of a host set.
fn host_elements(hosts: &BTreeSet<IpAddr>, v4: bool) -> BTreeSet<Element> {
    hosts
        .iter()
        .filter(|h| h.is_ipv4() == v4)
        .map(|h| Element::Host(*h))
        .collect()
}

/// The elements of a named-port set.
fn named_elements(targets: &BTreeSet<NamedTarget>, v4: bool) -> BTreeSet<Element> {
    targets
        .iter()
        .filter(|t| t.address.is_ipv4() == v4)
        .map(|t| Element::Named(*t))
        .collect()
}

/// The tests of one policy rule: one per peer set and family, each with
/// the rule's port test (an empty test matches everything).
fn rule_tests(program: &Program, r: &Rule, sets: &mut BTreeMap<String, Set>) -> Vec<Vec<Value>> {
    let direction = r.rule.direction;
    let peer_field = match direction {
        Direction::Ingress => "saddr",
        Direction::Egress => "daddr",
    };
    // The address tests: none, or one per peer set and family.
    let peer_tests: Vec<Option<(bool, String)>> = match &r.peers {
        None => vec![None],
        Some(id) => {
            let peers = program.peers.get(id);
            let mut tests = Vec::new();
            for v4 in [true, false] {
                if peers.is_some_and(|p| p.hosts.is_some()) {
                    tests.push(Some((v4, hosts_set(id, v4))));
                }
                if peers.is_some_and(|p| p.blocks.is_some()) {
                    tests.push(Some((v4, blocks_set(id, v4))));
                }
            }
            tests
        }
    };
    let mut port_tests = Vec::new();
    match &r.ports {
        None => port_tests.push(PortTest::Any),
        Some(ranges) => {
            if !ranges.is_empty() {
                let name = ports_set(ranges);
                sets.entry(name.clone()).or_insert_with(|| Set {
                    kind: SetKind::Ports,
                    elements: ranges.iter().map(|p| Element::Ports(*p)).collect(),
                });
                port_tests.push(PortTest::Numeric(name));
            }
            if let Some(key) = &r.named {
                port_tests.push(PortTest::Named(key));
            }
        }
    }
    let mut tests = Vec::new();
    for peer in &peer_tests {
        for test in &port_tests {
            // A named-port test needs the family, so a rule without an
            // address test gets one line per family for it.
            let families: Vec<Option<bool>> = match (peer, test) {
                (Some((v4, _)), _) => vec![Some(*v4)],
                (None, PortTest::Named(_)) => vec![Some(true), Some(false)],
                (None, _) => vec![None],
            };
            for v4 in families {
                let mut expr = Vec::new();
                if let (Some((v4, set)), _) = (peer, test) {
                    expr.push(in_set(payload(*v4, peer_field), set));
                }
                match (test, v4) {
                    (PortTest::Any, _) => {}
                    (PortTest::Numeric(set), _) => {
                        expr.push(in_set(json!({"concat": l4proto_dport()}), set));
                    }
                    (PortTest::Named(key), Some(v4)) => {
                        let [proto, dport] = l4proto_dport();
                        expr.push(in_set(
                            json!({"concat": [payload(v4, "daddr"), proto, dport]}),
                            &named_set(key, v4),
                        ));
                    }
                    (PortTest::Named(_), None) => unreachable!("named ports test per family"),
                }
                tests.push(expr);
            }
        }
    }
    tests
}

/// The lines of one rule, each test with the rule's verdict: `accept`;
/// `return` for a Pass (back to the group chain, which asks the next
/// tier); a counted `drop`, logged if asked, for a Deny.
fn rule_lines(program: &Program, r: &Rule, out: &mut Ruleset, options: &Options) -> Vec<Line> {
    let comment = r.rule.to_string();
    let mut lines = Vec::new();
    for mut expr in rule_tests(program, r, &mut out.sets) {
        match r.rule.action {
            Action::Accept => expr.push(json!({"accept": null})),
            Action::Pass => expr.push(json!({"return": null})),
            Action::Deny => {
                let counter = rule_counter(&r.rule);
                out.counters
                    .entry(counter.clone())
                    .or_insert_with(|| DropCounter {
                        direction: r.rule.direction,
                        policies: vec![r.rule.policy.to_string()],
                    });
                if let Some(log) = log_line(options, &comment) {
                    let mut logged = expr.clone();
                    logged.extend(log);
                    lines.push(rule(logged, &comment));
                }
                expr.extend([json!({"counter": counter}), json!({"drop": null})]);
            }
        }
        lines.push(rule(expr, &comment));
    }
    lines
}

/// The counter of a Deny rule's drops.
fn rule_counter(r: &RuleRef) -> String {
    format!("x{}-{}", letter(r.direction), digest(r))
}

/// The objects enforcing `program`.
pub fn render(program: &Program, options: &Options) -> Ruleset {
    let mut out = Ruleset::default();
    for map in MapName::ALL {
        out.maps.insert(map, BTreeMap::new());
    }
    for (id, peers) in &program.peers {
        out.add_peers(id, peers);
    }
    for (key, targets) in &program.named {
        out.add_named(key, targets);
    }
    for (key, policy) in &program.policies {
        out.add_policy(program, key, policy, options);
    }
    for policy in program.cluster.values() {
        out.add_cluster_sets(program, policy);
    }
    for pod in program.pods.values() {
        for direction in [Direction::Ingress, Direction::Egress] {
            out.add_stages(program, direction, pod.tiers(direction), options);
        }
        out.add_pod(pod, options);
    }
    out
}

/// The chains of policy `key`, per direction it isolates.
pub(crate) fn policy_chains(key: &str) -> [String; 2] {
    [
        policy_chain(Direction::Ingress, key),
        policy_chain(Direction::Egress, key),
    ]
}

/// The sets of peer list `id`.
pub(crate) fn peer_sets(id: &str) -> [String; 4] {
    [
        hosts_set(id, true),
        hosts_set(id, false),
        blocks_set(id, true),
        blocks_set(id, false),
    ]
}

/// The set of numeric port `ranges`.
fn ports_set(ranges: &[PortRange]) -> String {
    format!("t-{}", digest(&ranges))
}

/// The port sets `rules` use.
pub(crate) fn port_sets<'a>(
    rules: impl Iterator<Item = &'a Rule> + 'a,
) -> impl Iterator<Item = String> + 'a {
    rules
        .filter_map(|r| r.ports.as_deref())
        .filter(|ranges| !ranges.is_empty())
        .map(ports_set)
}

impl Ruleset {
    /// An empty ruleset with the four (empty) verdict maps.
    pub(crate) fn with_maps() -> Self {
        let mut rs = Self::default();
        for map in MapName::ALL {
            rs.maps.insert(map, BTreeMap::new());
        }
        rs
    }

    /// Copies into `self` what `from` holds of `chains` (with their
    /// counters, for group chains) and `sets`.
    pub(crate) fn take_from(
        &mut self,
        from: &Ruleset,
        chains: &BTreeSet<String>,
        sets: &BTreeSet<String>,
    ) {
        for name in chains {
            if let Some(lines) = from.chains.get(name) {
                self.chains.insert(name.clone(), lines.clone());
            }
            if let Some(counter) = counter_of(name).and_then(|c| Some((from.counters.get(&c)?, c)))
            {
                self.counters.insert(counter.1, counter.0.clone());
            }
        }
        for name in sets {
            if let Some(set) = from.sets.get(name) {
                self.sets.insert(name.clone(), set.clone());
            }
        }
    }

    /// Replaces the objects of `old` (a part of `self`) with those of
    /// `new`; map entries are replaced per address.
    pub(crate) fn replace_part(&mut self, old: &Ruleset, new: &Ruleset) {
        for name in old.chains.keys() {
            self.chains.remove(name);
        }
        for name in old.sets.keys() {
            self.sets.remove(name);
        }
        for name in old.counters.keys() {
            self.counters.remove(name);
        }
        for (map, entries) in &old.maps {
            if let Some(m) = self.maps.get_mut(map) {
                for ip in entries.keys() {
                    m.remove(ip);
                }
            }
        }
        self.chains.extend(new.chains.clone());
        self.sets.extend(new.sets.clone());
        self.counters.extend(new.counters.clone());
        for (map, entries) in &new.maps {
            self.maps.entry(*map).or_default().extend(entries.clone());
        }
    }

    /// The sets of peer list `id`.
    pub(crate) fn add_peers(&mut self, id: &str, peers: &Peers) {
        for v4 in [true, false] {
            if let Some(hosts) = &peers.hosts {
                let elements = host_elements(hosts, v4);
                let kind = SetKind::Hosts { v4 };
                self.sets.insert(hosts_set(id, v4), Set { kind, elements });
            }
            if let Some(blocks) = &peers.blocks {
                let elements = blocks
                    .iter()
                    .filter(|n| n.addr().is_ipv4() == v4)
                    .map(|n| Element::Net(*n))
                    .collect();
                let kind = SetKind::Blocks { v4 };
                self.sets.insert(blocks_set(id, v4), Set { kind, elements });
            }
        }
    }

    /// The sets of the named ports `key`.
    pub(crate) fn add_named(&mut self, key: &NamedPorts, targets: &BTreeSet<NamedTarget>) {
        for v4 in [true, false] {
            let elements = named_elements(targets, v4);
            let kind = SetKind::Named { v4 };
            self.sets.insert(named_set(key, v4), Set { kind, elements });
        }
    }

    /// The chains of policy `key` and the port sets its rules use.
    pub(crate) fn add_policy(
        &mut self,
        program: &Program,
        key: &str,
        policy: &PolicyProgram,
        options: &Options,
    ) {
        for direction in [Direction::Ingress, Direction::Egress] {
            let Some(rules) = policy.rules(direction) else {
                continue;
            };
            let body = rules
                .iter()
                .flat_map(|r| rule_lines(program, r, self, options))
                .collect();
            self.chains.insert(policy_chain(direction, key), body);
        }
    }

    /// The stage chains `tiers` jump to, if not there yet.
    pub(crate) fn add_stages(
        &mut self,
        program: &Program,
        direction: Direction,
        tiers: &Tiers,
        options: &Options,
    ) {
        for stage in Stage::of(direction, tiers) {
            if !self.chains.contains_key(&stage.chain()) {
                self.add_stage(program, &stage, options);
            }
        }
    }

    /// A stage chain: the rules of its policies in the order they are
    /// asked, inline — so a Pass can `return` past the rest of its tier.
    pub(crate) fn add_stage(&mut self, program: &Program, stage: &Stage, options: &Options) {
        let body = stage
            .rules(program)
            .flat_map(|r| rule_lines(program, r, self, options))
            .collect();
        self.chains.insert(stage.chain(), body);
    }

    /// The port sets of a ClusterNetworkPolicy's rules. Every one's are
    /// there whether or not a pod here is its subject, like its peer sets:
    /// what the kernel holds does not hang on which stage chains exist.
    pub(crate) fn add_cluster_sets(&mut self, program: &Program, policy: &ClusterProgram) {
        for r in policy.ingress.iter().chain(&policy.egress) {
            rule_tests(program, r, &mut self.sets);
        }
    }

    /// A local pod's verdict-map entries, and the chains and counters of
    /// its groups if they are new.
    pub(crate) fn add_pod(&mut self, pod: &PodProgram, options: &Options) {
        for (direction, tiers) in [
            (Direction::Egress, &pod.egress),
            (Direction::Ingress, &pod.ingress),
        ] {
            let chain = match tiers.is_open() {
                true => OPEN_CHAIN.to_string(),
                false => self.add_group(direction, tiers, options),
            };
            for ip in &pod.ips {
                let map = MapName::new(direction, ip.is_ipv4());
                self.maps.entry(map).or_default().insert(*ip, chain.clone());
            }
        }
    }

    /// The chain (and drop counter, if NetworkPolicy isolates) of the
    /// group of pods treated as `tiers` in `direction`, if not there yet;
    /// returns the chain's name. The stage chains it jumps to are
    /// [`Ruleset::add_stages`]'s.
    pub(crate) fn add_group(
        &mut self,
        direction: Direction,
        tiers: &Tiers,
        options: &Options,
    ) -> String {
        let chain = group_chain_name(direction, tiers);
        if !self.chains.contains_key(&chain) {
            let counter = counter_of(&chain).unwrap_or_default();
            self.chains.insert(
                chain.clone(),
                group_chain(direction, tiers, &counter, options),
            );
            if let Gate::Isolated { by } = &tiers.np {
                self.counters.insert(
                    counter,
                    DropCounter {
                        direction,
                        policies: by.clone(),
                    },
                );
            }
        }
        chain
    }
}

/// The chain of a group of pods, tier by tier. The Admin stage's
/// `accept` and `drop` end the base chain; its `return` (a Pass, or no
/// match) comes back here. NetworkPolicy isolating the pod is final: each
/// policy's chain accepts what it allows, what none allows is counted and
/// dropped. Otherwise the Baseline stage decides, and what it lets by is
/// accepted.
fn group_chain(direction: Direction, tiers: &Tiers, counter: &str, options: &Options) -> Vec<Line> {
    let jump =
        |target: String, comment: &str| rule(vec![json!({"jump": {"target": target}})], comment);
    let mut rules = Vec::new();
    if !tiers.admin.is_empty() {
        let chain = stage_chain(Tier::Admin, direction, &tiers.admin);
        rules.push(jump(chain, "admin tier"));
    }
    match &tiers.np {
        Gate::Isolated { by } => {
            rules.extend(by.iter().map(|key| jump(policy_chain(direction, key), key)));
            let why = format!("{} isolated by {}", words(direction), by.join(", "));
            rules.extend(log_line(options, &why).map(|log| rule(log.to_vec(), &why)));
            rules.push(rule(
                vec![json!({"counter": counter}), json!({"drop": null})],
                &why,
            ));
        }
        Gate::Open => {
            if !tiers.baseline.is_empty() {
                let chain = stage_chain(Tier::Baseline, direction, &tiers.baseline);
                rules.push(jump(chain, "baseline tier"));
            }
            rules.push(rule(vec![json!({"accept": null})], "no tier denies"));
        }
    }
    rules
}

/// The rate-limited log expressions of a drop for `why`, if asked.
fn log_line(options: &Options, why: &str) -> Option<[Value; 2]> {
    let rate = options.log_per_second?;
    // The kernel caps log prefixes at 127 bytes.
    let prefix = format!("{}: ", bounded(&format!("weft drop {why}"), 125));
    Some([
        json!({"limit": {"rate": rate, "per": "second", "burst": rate.max(1)}}),
        json!({"log": {"prefix": prefix}}),
    ])
}

/// An element as libnftables JSON, appended to `out`.
pub fn element_text(out: &mut String, element: &Element) {
    let _ = match element {
        Element::Host(ip) => write!(out, "\"{ip}\""),
        Element::Net(net) if net.prefix_len() == net.max_prefix_len() => {
            write!(out, "\"{}\"", net.addr())
        }
        Element::Net(net) => write!(
            out,
            "{{\"prefix\":{{\"addr\":\"{}\",\"len\":{}}}}}",
            net.network(),
            net.prefix_len()
        ),
        Element::Ports(p) if p.lo == p.hi => write!(
            out,
            "{{\"concat\":[\"{}\",{}]}}",
            protocol_name(p.protocol),
            p.lo
        ),
        Element::Ports(p) => write!(
            out,
            "{{\"concat\":[\"{}\",{{\"range\":[{},{}]}}]}}",
            protocol_name(p.protocol),
            p.lo,
            p.hi
        ),
        Element::Named(t) => write!(
            out,
            "{{\"concat\":[\"{}\",\"{}\",{}]}}",
            t.address,
            protocol_name(t.protocol),
            t.port
        ),
    };
}

/// A set's declaration (type and flags) as libnftables JSON, without elements.
pub fn set_json(name: &str, kind: SetKind) -> Value {
    let (typ, interval) = match kind {
        SetKind::Hosts { v4 } => (json!(if v4 { "ipv4_addr" } else { "ipv6_addr" }), false),
        SetKind::Blocks { v4 } => (json!(if v4 { "ipv4_addr" } else { "ipv6_addr" }), true),
        SetKind::Ports => (json!(["inet_proto", "inet_service"]), true),
        SetKind::Named { v4 } => (
            json!([
                if v4 { "ipv4_addr" } else { "ipv6_addr" },
                "inet_proto",
                "inet_service"
            ]),
            false,
        ),
    };
    let mut set = json!({"family": "inet", "table": TABLE, "name": name, "type": typ});
    if interval {
        set["flags"] = json!(["interval"]);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{PeerSpec, Peers, PolicyProgram, PolicyRef, RuleRef};

    fn program_with(rule: Rule) -> Program {
        let mut p = Program::default();
        p.policies.insert(
            "x/p".into(),
            PolicyProgram {
                ingress: Some(vec![rule]),
                egress: None,
            },
        );
        p
    }

    fn rule_ref() -> RuleRef {
        RuleRef {
            policy: PolicyRef::Namespaced {
                namespace: "x".into(),
                name: "p".into(),
            },
            direction: Direction::Ingress,
            index: 0,
            name: None,
            action: Action::Accept,
        }
    }

    #[test]
    fn a_rule_with_peers_and_ports_tests_both_per_family() {
        let r = Rule {
            rule: rule_ref(),
            peers: Some("x:[]".into()),
            ports: Some(vec![PortRange {
                protocol: Protocol::Tcp,
                lo: 80,
                hi: 81,
            }]),
            named: None,
        };
        let mut program = program_with(r);
        program.peers.insert(
            "x:[]".into(),
            Peers {
                spec: PeerSpec {
                    namespace: "x".into(),
                    peers: Vec::new(),
                    nodes: Vec::new(),
                    doubtful: false,
                },
                hosts: None,
                blocks: Some(vec!["198.19.0.0/16".parse().unwrap()]),
            },
        );
        let rs = render(&program, &Options::default());
        let chain = &rs.chains[&format!("pi-{}", digest(&"x/p"))];
        assert_eq!(chain.len(), 2, "{chain:?}");
        let expr = &chain[0].expressions();
        assert_eq!(expr[0]["match"]["left"]["payload"]["field"], "saddr");
        assert!(expr[1]["match"]["right"]
            .as_str()
            .unwrap()
            .starts_with("@t-"));
        assert_eq!(chain[0].comment, "x/p ingress rule 0");
        let peers4 = rs
            .sets
            .values()
            .find(|s| s.kind == SetKind::Blocks { v4: true })
            .unwrap();
        assert_eq!(peers4.elements.len(), 1);
        let ports = rs.sets.values().find(|s| s.kind == SetKind::Ports).unwrap();
        let mut text = String::new();
        element_text(&mut text, ports.elements.iter().next().unwrap());
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed, json!({"concat": ["tcp", {"range": [80, 81]}]}));
    }

    #[test]
    fn an_empty_rule_accepts_everything_in_one_line() {
        let r = Rule {
            rule: rule_ref(),
            peers: None,
            ports: None,
            named: None,
        };
        let rs = render(&program_with(r), &Options::default());
        let chain = rs.chains.values().next().unwrap();
        assert_eq!(
            chain,
            &vec![rule(vec![json!({"accept": null})], "x/p ingress rule 0")]
        );
        assert!(rs.sets.is_empty());
    }

    #[test]
    fn comments_are_bounded_whatever_the_names() {
        let long = "ü".repeat(200);
        let r = Rule {
            rule: RuleRef {
                name: Some(long.clone()),
                ..rule_ref()
            },
            peers: None,
            ports: None,
            named: None,
        };
        let rs = render(&program_with(r), &Options::default());
        let line = &rs.chains.values().next().unwrap()[0];
        assert!(line.comment.len() <= 127, "{}", line.comment.len());
        assert!(line.comment.ends_with("..."));
        assert_eq!(bounded("short", 127), "short");
    }

    #[test]
    fn drop_logging_is_rate_limited_and_prefix_bounded() {
        let by = vec!["x/".to_string() + &"long".repeat(60)];
        let rules = group_chain(
            Direction::Ingress,
            &Tiers {
                admin: Vec::new(),
                np: Gate::Isolated { by },
                baseline: Vec::new(),
            },
            "di-0",
            &Options {
                log_per_second: Some(5),
            },
        );
        let log = &rules[1].expressions();
        assert_eq!(log[0]["limit"]["rate"], 5);
        assert!(log[1]["log"]["prefix"].as_str().unwrap().len() <= 127);
        assert_eq!(rules[2].expressions()[0]["counter"], "di-0");
    }
}
