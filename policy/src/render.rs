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
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Value};

use crate::compile::{Direction, Gate, NamedTarget, PortRange, Program, Rule};
use crate::model::Protocol;

pub const TABLE: &str = "weft_policy";

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
    /// Regular chains with their rules (`{"expr": [...], "comment": ...}`).
    pub chains: BTreeMap<String, Vec<Value>>,
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

fn rule(expr: Vec<Value>, comment: &str) -> Value {
    json!({"expr": expr, "comment": comment})
}

pub fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// The port test of a rule: none, numeric ports, or named ports.
enum PortTest {
    Any,
    Numeric(String),
    Named(String),
}

struct Builder {
    out: Ruleset,
}

impl Builder {
    /// Declares a set once: set names are derived from what fills them, so
    /// a set already declared holds the same elements.
    fn set(&mut self, name: &str, kind: SetKind, elements: impl IntoIterator<Item = Element>) {
        if !self.out.sets.contains_key(name) {
            let elements = elements.into_iter().collect();
            self.out
                .sets
                .insert(name.to_string(), Set { kind, elements });
        }
    }

    /// The rules of one policy rule in a policy chain.
    fn rule(&mut self, r: &Rule, direction: Direction) -> Vec<Value> {
        let comment = format!(
            "{}/{} {} rule {}",
            r.rule.namespace,
            r.rule.policy,
            words(direction),
            r.rule.index
        );
        let peer_field = match direction {
            Direction::Ingress => "saddr",
            Direction::Egress => "daddr",
        };
        // The sets a peer may be in (hosts, blocks), by name without family.
        let mut peer_sets = Vec::new();
        if let Some(peers) = &r.peers {
            let id = digest(&peers.id);
            for v4 in [true, false] {
                let suffix = if v4 { 4 } else { 6 };
                if let Some(hosts) = &peers.hosts {
                    let here = hosts.iter().filter(|h| h.is_ipv4() == v4);
                    self.set(
                        &format!("a-{id}-{suffix}"),
                        SetKind::Hosts { v4 },
                        here.map(|h| Element::Host(*h)),
                    );
                }
                if let Some(blocks) = &peers.blocks {
                    let here = blocks.iter().filter(|n| n.addr().is_ipv4() == v4);
                    self.set(
                        &format!("b-{id}-{suffix}"),
                        SetKind::Blocks { v4 },
                        here.map(|n| Element::Net(*n)),
                    );
                }
            }
            if peers.hosts.is_some() {
                peer_sets.push(format!("a-{id}"));
            }
            if peers.blocks.is_some() {
                peer_sets.push(format!("b-{id}"));
            }
        }
        let mut tests = Vec::new();
        match &r.ports {
            None => tests.push(PortTest::Any),
            Some(ranges) => {
                if !ranges.is_empty() {
                    let name = format!("t-{}", digest(ranges));
                    self.set(
                        &name,
                        SetKind::Ports,
                        ranges.iter().map(|p| Element::Ports(*p)),
                    );
                    tests.push(PortTest::Numeric(name));
                }
                if let Some(targets) = &r.named {
                    let base = format!("n-{}", digest(&r.rule));
                    for v4 in [true, false] {
                        let here = targets.iter().filter(|t| t.address.is_ipv4() == v4);
                        self.set(
                            &format!("{base}-{}", if v4 { 4 } else { 6 }),
                            SetKind::Named { v4 },
                            here.map(|t| Element::Named(*t)),
                        );
                    }
                    tests.push(PortTest::Named(base));
                }
            }
        }
        let peer_tests: Vec<Option<&String>> = if r.peers.is_some() {
            peer_sets.iter().map(Some).collect()
        } else {
            vec![None]
        };
        let mut rules = Vec::new();
        for peer in &peer_tests {
            for test in &tests {
                // A line per family when it tests an address.
                let families: &[Option<bool>] = match (peer, test) {
                    (None, PortTest::Any | PortTest::Numeric(_)) => &[None],
                    _ => &[Some(true), Some(false)],
                };
                for v4 in families {
                    let mut expr = Vec::new();
                    if let (Some(base), Some(v4)) = (peer, v4) {
                        let set = format!("{base}-{}", if *v4 { 4 } else { 6 });
                        expr.push(in_set(payload(*v4, peer_field), &set));
                    }
                    match (test, v4) {
                        (PortTest::Any, _) => {}
                        (PortTest::Numeric(set), _) => {
                            expr.push(in_set(json!({"concat": l4proto_dport()}), set));
                        }
                        (PortTest::Named(base), Some(v4)) => {
                            let [proto, dport] = l4proto_dport();
                            let set = format!("{base}-{}", if *v4 { 4 } else { 6 });
                            expr.push(in_set(
                                json!({"concat": [payload(*v4, "daddr"), proto, dport]}),
                                &set,
                            ));
                        }
                        (PortTest::Named(_), None) => unreachable!("named ports test per family"),
                    }
                    expr.push(json!({"accept": null}));
                    rules.push(rule(expr, &comment));
                }
            }
        }
        rules
    }
}

/// The objects enforcing `program`.
pub fn render(program: &Program, options: &Options) -> Ruleset {
    let mut b = Builder {
        out: Ruleset::default(),
    };
    for map in MapName::ALL {
        b.out.maps.insert(map, BTreeMap::new());
    }
    for (key, policy) in &program.policies {
        for direction in [Direction::Ingress, Direction::Egress] {
            let Some(rules) = policy.rules(direction) else {
                continue;
            };
            let chain = format!("p{}-{}", letter(direction), digest(key));
            let body: Vec<Value> = rules.iter().flat_map(|r| b.rule(r, direction)).collect();
            b.out.chains.insert(chain, body);
        }
    }
    for pod in &program.pods {
        for (direction, gate) in [
            (Direction::Egress, &pod.egress),
            (Direction::Ingress, &pod.ingress),
        ] {
            let Gate::Isolated { by } = gate else {
                continue;
            };
            let group = digest(by);
            let chain = format!("g{}-{group}", letter(direction));
            if !b.out.chains.contains_key(&chain) {
                let counter = format!("d{}-{group}", letter(direction));
                b.out
                    .chains
                    .insert(chain.clone(), group_chain(direction, by, &counter, options));
                b.out.counters.insert(
                    counter,
                    DropCounter {
                        direction,
                        policies: by.clone(),
                    },
                );
            }
            for ip in &pod.ips {
                let map = MapName::new(direction, ip.is_ipv4());
                b.out
                    .maps
                    .entry(map)
                    .or_default()
                    .insert(*ip, chain.clone());
            }
        }
    }
    b.out
}

/// The chain of the pods isolated by the policies `by`: each policy's
/// chain accepts what it allows; what none allows is counted and dropped.
fn group_chain(
    direction: Direction,
    by: &[String],
    counter: &str,
    options: &Options,
) -> Vec<Value> {
    let mut rules: Vec<Value> = by
        .iter()
        .map(|key| {
            let target = format!("p{}-{}", letter(direction), digest(key));
            rule(vec![json!({"jump": {"target": target}})], key)
        })
        .collect();
    let why = format!("{} isolated by {}", words(direction), by.join(", "));
    if let Some(rate) = options.log_per_second {
        // The kernel caps log prefixes at 127 bytes.
        let mut prefix = format!("weft drop {why}: ");
        if prefix.len() > 127 {
            let mut end = 120;
            while !prefix.is_char_boundary(end) {
                end -= 1;
            }
            prefix.truncate(end);
            prefix.push_str("...: ");
        }
        rules.push(rule(
            vec![
                json!({"limit": {"rate": rate, "per": "second", "burst": rate.max(1)}}),
                json!({"log": {"prefix": prefix}}),
            ],
            &why,
        ));
    }
    rules.push(rule(
        vec![json!({"counter": counter}), json!({"drop": null})],
        &why,
    ));
    rules
}

/// An element as libnftables JSON.
pub fn element_json(element: &Element) -> Value {
    let addr = |ip: &IpAddr| Value::String(ip.to_string());
    match element {
        Element::Host(ip) => addr(ip),
        Element::Net(net) if net.prefix_len() == net.max_prefix_len() => addr(&net.addr()),
        Element::Net(net) => {
            json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}})
        }
        Element::Ports(p) => {
            let port = if p.lo == p.hi {
                json!(p.lo)
            } else {
                json!({"range": [p.lo, p.hi]})
            };
            json!({"concat": [protocol_name(p.protocol), port]})
        }
        Element::Named(t) => {
            json!({"concat": [t.address.to_string(), protocol_name(t.protocol), t.port]})
        }
    }
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
    use crate::compile::{Peers, PolicyProgram, RuleRef};

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
            namespace: "x".into(),
            policy: "p".into(),
            direction: Direction::Ingress,
            index: 0,
        }
    }

    #[test]
    fn a_rule_with_peers_and_ports_tests_both_per_family() {
        let r = Rule {
            rule: rule_ref(),
            peers: Some(Peers {
                id: "x:[]".into(),
                hosts: None,
                blocks: Some(vec!["198.19.0.0/16".parse().unwrap()]),
            }),
            ports: Some(vec![PortRange {
                protocol: Protocol::Tcp,
                lo: 80,
                hi: 81,
            }]),
            named: None,
        };
        let rs = render(&program_with(r), &Options::default());
        let chain = &rs.chains[&format!("pi-{}", digest(&"x/p"))];
        assert_eq!(chain.len(), 2, "{chain:?}");
        let expr = &chain[0]["expr"];
        assert_eq!(expr[0]["match"]["left"]["payload"]["field"], "saddr");
        assert!(expr[1]["match"]["right"]
            .as_str()
            .unwrap()
            .starts_with("@t-"));
        assert_eq!(chain[0]["comment"], "x/p ingress rule 0");
        let peers4 = rs
            .sets
            .values()
            .find(|s| s.kind == SetKind::Blocks { v4: true })
            .unwrap();
        assert_eq!(peers4.elements.len(), 1);
        let ports = rs.sets.values().find(|s| s.kind == SetKind::Ports).unwrap();
        assert_eq!(
            element_json(ports.elements.iter().next().unwrap()),
            json!({"concat": ["tcp", {"range": [80, 81]}]})
        );
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
    fn drop_logging_is_rate_limited_and_prefix_bounded() {
        let by = vec!["x/".to_string() + &"long".repeat(60)];
        let rules = group_chain(
            Direction::Ingress,
            &by,
            "di-0",
            &Options {
                log_per_second: Some(5),
            },
        );
        let log = &rules[1]["expr"];
        assert_eq!(log[0]["limit"]["rate"], 5);
        assert!(log[1]["log"]["prefix"].as_str().unwrap().len() <= 127);
        assert_eq!(rules[2]["expr"][0]["counter"], "di-0");
    }
}
