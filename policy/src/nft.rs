//! Getting a [`Ruleset`] into the kernel: the whole table in one
//! transaction, or only the difference from the last one applied, also in
//! one transaction (libnftables JSON through `nft -j -f -`, never a command
//! per rule).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::net::IpAddr;

use serde::Serialize;
use serde_json::{json, Value};

use crate::compile::Direction;
use crate::netlink::{self, EnforceError};
use crate::render::{
    element_text, family, set_json, Element, Line, MapName, Ruleset, Set, SetKind, OPEN_CHAIN,
    TABLE,
};
use weft_ipam::POD_VETH_PREFIX;

/// The input hook priority of `to_node`: after IPVS's (98, 99) and NAT's
/// (100), so that what IPVS takes is judged where it leaves (output).
const AFTER_IPVS: i32 = 150;

/// What a transaction changes, for logs, metrics and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    pub elements_added: usize,
    pub elements_removed: usize,
    /// Chains created, rewritten or deleted.
    pub chains: usize,
    /// Sets created or deleted.
    pub sets: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl std::ops::Add for Changes {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self {
            elements_added: self.elements_added + o.elements_added,
            elements_removed: self.elements_removed + o.elements_removed,
            chains: self.chains + o.chains,
            sets: self.sets + o.sets,
        }
    }
}

fn obj(kind: &str, mut body: Value) -> Value {
    body["family"] = json!("inet");
    body["table"] = json!(TABLE);
    json!({ kind: body })
}

fn add(kind: &str, body: Value) -> Value {
    json!({"add": obj(kind, body)})
}

fn delete(kind: &str, body: Value) -> Value {
    json!({"delete": obj(kind, body)})
}

/// One step of a transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Creates the table empty, whatever was there.
    ReplaceTable,
    AddCounter(String),
    DeleteCounter(String),
    AddSet {
        name: String,
        set: Set,
    },
    DeleteSet(String),
    Elements {
        add: bool,
        set: String,
        elements: Vec<Element>,
    },
    /// Verdict map entries: local pod address to group chain.
    Jumps {
        add: bool,
        map: MapName,
        entries: Vec<(IpAddr, String)>,
    },
    AddChain(String),
    FlushChain(String),
    DeleteChain(String),
    AddRule {
        chain: String,
        rule: Line,
    },
    /// The base chains and maps.
    Skeleton,
    /// Ends one kernel transaction; what follows is the next.
    Commit,
}

/// Commands the kernel runs as one transaction, all or nothing — or, where
/// a [`Command::Commit`] splits them, as consecutive ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Transaction {
    pub commands: Vec<Command>,
}

/// JSON text written straight out: a full table's tens of thousands of
/// elements as `Value` trees cost more than `nft` takes to load them.
struct Writer {
    out: String,
    first: bool,
}

impl Writer {
    fn next(&mut self) -> &mut String {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        &mut self.out
    }

    fn value(&mut self, v: &impl Serialize) {
        let text = serde_json::to_string(v).unwrap_or_default();
        self.next().push_str(&text);
    }

    /// `{verb: {kind: body}}` with an `elem` list added to `body`.
    fn with_elements(&mut self, verb: &str, kind: &str, body: Value, elements: &str) {
        let body = serde_json::to_string(&body).unwrap_or_default();
        let open = body.strip_suffix('}').unwrap_or(&body);
        let out = self.next();
        let _ = write!(
            out,
            "{{\"{verb}\":{{\"{kind}\":{open},\"elem\":[{elements}]}}}}}}"
        );
    }
}

fn element_list(elements: &[Element]) -> String {
    let mut out = String::new();
    for (i, e) in elements.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        element_text(&mut out, e);
    }
    out
}

impl Transaction {
    /// This transaction followed by `next` (which starts where this ends).
    pub fn then(mut self, next: Transaction) -> Self {
        self.commands.extend(next.commands);
        self
    }

    /// As libnftables JSON text.
    pub fn json(&self) -> String {
        json_text(&self.commands)
    }
}

fn json_text(commands: &[Command]) -> String {
    {
        let mut w = Writer {
            out: String::from("{\"nftables\":["),
            first: true,
        };
        for command in commands {
            match command {
                Command::ReplaceTable => {
                    let table = json!({"table": {"family": "inet", "name": TABLE}});
                    w.value(&json!({"add": table}));
                    w.value(&json!({"delete": table}));
                    w.value(&json!({"add": table}));
                }
                Command::AddCounter(name) => w.value(&add("counter", json!({"name": name}))),
                Command::DeleteCounter(name) => w.value(&delete("counter", json!({"name": name}))),
                Command::AddSet { name, set } => {
                    let elements: Vec<Element> = set.elements.iter().copied().collect();
                    let body = set_json(name, set.kind);
                    if elements.is_empty() {
                        w.value(&json!({"add": {"set": body}}));
                    } else {
                        w.with_elements("add", "set", body, &element_list(&elements));
                    }
                }
                Command::DeleteSet(name) => w.value(&delete("set", json!({"name": name}))),
                Command::Elements { add, set, elements } => {
                    let body = json!({"family": "inet", "table": TABLE, "name": set});
                    w.with_elements(verb(*add), "element", body, &element_list(elements));
                }
                Command::Jumps { add, map, entries } => {
                    let mut list = String::new();
                    for (i, (ip, chain)) in entries.iter().enumerate() {
                        let sep = if i > 0 { "," } else { "" };
                        let _ = write!(
                            list,
                            "{sep}[\"{ip}\",{{\"jump\":{{\"target\":\"{chain}\"}}}}]"
                        );
                    }
                    let body = json!({"family": "inet", "table": TABLE, "name": map.name()});
                    w.with_elements(verb(*add), "element", body, &list);
                }
                Command::AddChain(name) => w.value(&add("chain", json!({"name": name}))),
                Command::FlushChain(name) => {
                    w.value(&json!({"flush": obj("chain", json!({"name": name}))}))
                }
                Command::DeleteChain(name) => w.value(&delete("chain", json!({"name": name}))),
                Command::AddRule { chain, rule } => {
                    // Names and comments are JSON strings; the expressions
                    // are JSON text already.
                    let quoted = |t: &str| Value::String(t.to_string()).to_string();
                    let _ = write!(
                        w.next(),
                        "{{\"add\":{{\"rule\":{{\"family\":\"inet\",\"table\":\"{TABLE}\",\"chain\":{},\"expr\":{},\"comment\":{}}}}}}}",
                        quoted(chain),
                        rule.expr,
                        quoted(&rule.comment)
                    );
                }
                Command::Skeleton => {
                    for v in skeleton() {
                        w.value(&v);
                    }
                }
                Command::Commit => {}
            }
        }
        w.out.push_str("]}");
        w.out
    }
}

fn verb(add: bool) -> &'static str {
    if add {
        "add"
    } else {
        "delete"
    }
}

/// The base chains and maps every ruleset has. Every local pod has an
/// entry in both directions' maps once it is programmed: to its group's
/// chain when isolated, to [`OPEN_CHAIN`] when not. So, on the egress
/// chain, in order:
/// 1. a packet from a pod veth must come from that pod's own address
///    (strict reverse path: the route back to its source is the veth it
///    came in on), before conntrack could take it for an existing flow;
/// 2. established and related traffic passes;
/// 3. the source's map entry decides;
/// 4. a packet from a pod veth that no entry matched comes from a pod not
///    programmed yet (or not known at all): dropped.
///
/// The ingress chain does 2–4 for the destination.
fn skeleton() -> Vec<Value> {
    let mut cmds = Vec::new();
    for map in MapName::ALL {
        let typ = if map.v4 { "ipv4_addr" } else { "ipv6_addr" };
        cmds.push(add(
            "map",
            json!({"name": map.name(), "type": typ, "map": "verdict"}),
        ));
    }
    cmds.push(add("chain", json!({"name": OPEN_CHAIN})));
    cmds.push(add(
        "rule",
        json!({"chain": OPEN_CHAIN, "expr": [{"accept": null}]}),
    ));
    let pod_veth = format!("{POD_VETH_PREFIX}*");
    // `to_node`: what pods send to the node itself (its kubelet, node-local
    // DNS, host-network pods) takes the input hook, not forward; it gets
    // the same egress verdicts. It runs after IPVS's input hooks
    // (priorities 98 and 99, kube-proxy's IPVS mode), which take Service
    // traffic away before it: IPVS sends that on from the node (output)
    // with the pod's address still its source, and `out_egress` and
    // `out_ingress` judge it there, by the pod that sent it and the pod it
    // reaches. What the node sends from its own addresses (kubelet probes)
    // is not policed, as upstream expects.
    for (name, hook, prio, direction) in [
        ("egress", "forward", 0, Direction::Egress),
        ("ingress", "forward", 10, Direction::Ingress),
        ("to_node", "input", AFTER_IPVS, Direction::Egress),
        ("out_egress", "output", 0, Direction::Egress),
        ("out_ingress", "output", 10, Direction::Ingress),
    ] {
        let (field, via) = match direction {
            Direction::Egress => ("saddr", "iifname"),
            Direction::Ingress => ("daddr", "oifname"),
        };
        cmds.push(add(
            "chain",
            json!({"name": name, "type": "filter", "hook": hook, "prio": prio, "policy": "accept"}),
        ));
        let from_pod =
            json!({"match": {"op": "==", "left": {"meta": {"key": via}}, "right": pod_veth}});
        // Sent by the node itself: nothing came in on a pod veth to check.
        let sent_by_node = hook == "output";
        if sent_by_node {
            cmds.push(add(
                "rule",
                json!({"chain": name, "comment": "the node's own traffic", "expr": [
                    {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["saddr"]}}, "right": "local"}},
                    {"accept": null}]}),
            ));
        }
        if direction == Direction::Egress && !sent_by_node {
            cmds.push(add(
                "rule",
                json!({"chain": name, "comment": "a pod sends only from its own addresses", "expr": [
                    from_pod,
                    {"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, "right": false}},
                    {"counter": null},
                    {"drop": null}]}),
            ));
        }
        if hook == "input" {
            // Neighbour discovery with the node (the pod resolving its
            // gateway) is the link working, not traffic any policy governs.
            cmds.push(add(
                "rule",
                json!({"chain": name, "expr": [
                    {"match": {"op": "==", "left": {"payload": {"protocol": "icmpv6", "field": "type"}},
                               "right": {"set": ["nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit"]}}},
                    {"accept": null}]}),
            ));
        }
        cmds.push(add(
            "rule",
            json!({"chain": name, "expr": [
                {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
                {"accept": null}]}),
        ));
        for map in MapName::ALL.iter().filter(|m| m.direction == direction) {
            cmds.push(add(
                "rule",
                json!({"chain": name, "expr": [{"vmap": {
                    "key": {"payload": {"protocol": family(map.v4), "field": field}},
                    "data": format!("@{}", map.name())}}]}),
            ));
        }
        if !(sent_by_node && direction == Direction::Egress) {
            cmds.push(add(
                "rule",
                json!({"chain": name, "comment": "a pod not programmed yet", "expr": [
                    from_pod, {"counter": null}, {"drop": null}]}),
            ));
        }
    }
    cmds
}

/// The whole table, replacing whatever is there: creating then deleting
/// the table in the same transaction clears it atomically.
pub fn full(rs: &Ruleset) -> (Transaction, Changes) {
    let mut commands = vec![Command::ReplaceTable];
    let changes = diff_into(&mut commands, &Ruleset::default(), rs, Some(Load::Atomic));
    (Transaction { commands }, changes)
}

/// Whether a set's elements can go over netlink (not an interval set).
fn plain(kind: SetKind) -> bool {
    matches!(kind, SetKind::Hosts { .. } | SetKind::Named { .. })
}

/// The whole table where there is none: its structure (plain sets and
/// maps empty) in one transaction, then every plain-set and map element in
/// a second, straight over netlink. The structure holds the skeleton, so
/// until the second lands (or, if it fails, until a [`full`] load) every
/// new flow from or to a pod veth is dropped as a pod not programmed yet:
/// stricter than both ends, never looser. (Where a table exists, [`full`]
/// replaces it in one transaction: it keeps enforcing until then.)
pub fn fresh(rs: &Ruleset) -> (Transaction, Changes) {
    let mut commands = vec![Command::ReplaceTable];
    let mut changes = diff_into(&mut commands, &Ruleset::default(), rs, Some(Load::Split));
    commands.push(Command::Commit);
    for (name, set) in rs.sets.iter().filter(|(_, s)| plain(s.kind)) {
        if !set.elements.is_empty() {
            changes.elements_added += set.elements.len();
            commands.push(elements(true, name, set.elements.iter().collect()));
        }
    }
    for (map, entries) in &rs.maps {
        if !entries.is_empty() {
            changes.elements_added += entries.len();
            commands.push(jumps(true, *map, entries.iter().collect()));
        }
    }
    (Transaction { commands }, changes)
}

/// The transaction taking the kernel from `old` (what was last applied) to
/// `new`; `None` when nothing differs.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Option<(Transaction, Changes)> {
    let mut commands = Vec::new();
    let changes = diff_into(&mut commands, old, new, None);
    (!changes.is_empty()).then_some((Transaction { commands }, changes))
}

/// The sets of `rs`, those more rules use first: the kernel finds a set by
/// name by walking the table's sets in creation order, once per rule using
/// it, so this keeps loading a large table from going quadratic.
fn creation_order(rs: &Ruleset) -> Vec<(&String, &Set)> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for line in rs.chains.values().flatten() {
        // Set references are the only strings starting with `@`.
        for reference in line.expr.split("\"@").skip(1) {
            let name = reference.split('"').next().unwrap_or_default();
            *uses.entry(name).or_default() += 1;
        }
    }
    let mut sets: Vec<_> = rs.sets.iter().collect();
    sets.sort_by_key(|(name, _)| std::cmp::Reverse(uses.get(name.as_str()).copied().unwrap_or(0)));
    sets
}

fn elements(add: bool, set: &str, elements: Vec<&Element>) -> Command {
    Command::Elements {
        add,
        set: set.to_string(),
        elements: elements.into_iter().copied().collect(),
    }
}

fn jumps(add: bool, map: MapName, entries: Vec<(&IpAddr, &String)>) -> Command {
    Command::Jumps {
        add,
        map,
        entries: entries
            .into_iter()
            .map(|(ip, chain)| (*ip, chain.clone()))
            .collect(),
    }
}

/// How a whole table is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// Everything in one transaction.
    Atomic,
    /// Plain sets created empty and map entries left out (the caller
    /// adds them in a second transaction).
    Split,
}

/// Appends the commands in an order the kernel accepts within one
/// transaction: what is referenced exists before the reference, and a
/// reference is gone before what it pointed to. `load`: `new` is a whole
/// table, skeleton included.
fn diff_into(cmds: &mut Vec<Command>, old: &Ruleset, new: &Ruleset, load: Option<Load>) -> Changes {
    let mut changes = Changes::default();
    for name in new
        .counters
        .keys()
        .filter(|n| !old.counters.contains_key(*n))
    {
        cmds.push(Command::AddCounter(name.clone()));
    }
    for (name, set) in creation_order(new) {
        match old.sets.get(name) {
            None => {
                changes.sets += 1;
                let set = if load == Some(Load::Split) && plain(set.kind) {
                    Set {
                        kind: set.kind,
                        elements: BTreeSet::new(),
                    }
                } else {
                    set.clone()
                };
                changes.elements_added += set.elements.len();
                cmds.push(Command::AddSet {
                    name: name.clone(),
                    set,
                });
            }
            Some(was) => {
                let added: Vec<&Element> = set.elements.difference(&was.elements).collect();
                if !added.is_empty() {
                    changes.elements_added += added.len();
                    cmds.push(elements(true, name, added));
                }
            }
        }
    }
    let changed: Vec<(&String, &Vec<Line>)> = new
        .chains
        .iter()
        .filter(|(name, rules)| old.chains.get(*name) != Some(rules))
        .collect();
    for (name, _) in &changed {
        cmds.push(if old.chains.contains_key(*name) {
            Command::FlushChain(name.to_string())
        } else {
            Command::AddChain(name.to_string())
        });
    }
    for (name, rules) in &changed {
        changes.chains += 1;
        cmds.extend(rules.iter().map(|rule| Command::AddRule {
            chain: name.to_string(),
            rule: rule.clone(),
        }));
    }
    if load.is_some() {
        cmds.push(Command::Skeleton);
    }
    let empty = BTreeMap::new();
    let maps = new.maps.iter().filter(|_| load != Some(Load::Split));
    for (map, entries) in maps {
        let was = old.maps.get(map).unwrap_or(&empty);
        let gone: Vec<_> = was
            .iter()
            .filter(|(ip, chain)| entries.get(*ip) != Some(*chain))
            .collect();
        if !gone.is_empty() {
            changes.elements_removed += gone.len();
            cmds.push(jumps(false, *map, gone));
        }
        let came: Vec<_> = entries
            .iter()
            .filter(|(ip, chain)| was.get(*ip) != Some(*chain))
            .collect();
        if !came.is_empty() {
            changes.elements_added += came.len();
            cmds.push(jumps(true, *map, came));
        }
    }
    for (name, set) in &new.sets {
        if let Some(was) = old.sets.get(name) {
            let removed: Vec<&Element> = was.elements.difference(&set.elements).collect();
            if !removed.is_empty() {
                changes.elements_removed += removed.len();
                cmds.push(elements(false, name, removed));
            }
        }
    }
    // Chains that go: emptied first (group chains jump to policy chains),
    // then deleted, then the sets and counters their rules used.
    let gone: Vec<&String> = old
        .chains
        .keys()
        .filter(|n| !new.chains.contains_key(*n))
        .collect();
    for name in &gone {
        cmds.push(Command::FlushChain(name.to_string()));
    }
    for name in &gone {
        changes.chains += 1;
        cmds.push(Command::DeleteChain(name.to_string()));
    }
    for name in old.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
        changes.sets += 1;
        changes.elements_removed += old.sets[name].elements.len();
        cmds.push(Command::DeleteSet(name.clone()));
    }
    for name in old
        .counters
        .keys()
        .filter(|n| !new.counters.contains_key(*n))
    {
        cmds.push(Command::DeleteCounter(name.clone()));
    }
    changes
}

/// Where transactions go: nf_tables in the network namespace the session
/// was opened in, which must also be the namespace of the thread applying
/// (`nft` runs there).
pub struct Session {
    netlink: netlink::Socket,
}

impl Session {
    /// Opens a session in the calling thread's network namespace.
    pub fn open() -> Result<Self, EnforceError> {
        Ok(Self {
            netlink: netlink::Socket::open()?,
        })
    }

    /// Runs a transaction (each of them, in order, where it is split): one
    /// that only adds and removes elements of plain sets and maps straight
    /// over netlink (a pod change: no parsing, no reading the table back),
    /// any other with `nft -j -f -`.
    pub fn apply(&mut self, transaction: &Transaction) -> Result<(), EnforceError> {
        for part in transaction.commands.split(|c| *c == Command::Commit) {
            if part.is_empty() {
                continue;
            }
            if let Some(batch) = netlink::Batch::of(part) {
                self.netlink.send(&batch)?;
                continue;
            }
            // (The crate's typed schema has no verdict maps or
            // concatenations, so the JSON goes raw.)
            nft_apply(&json_text(part), "applying the policy ruleset")?;
        }
        Ok(())
    }

    /// Whether the policy table exists.
    pub fn table_exists(&mut self) -> Result<bool, EnforceError> {
        self.netlink.table_exists(TABLE)
    }

    /// Deletes the policy table (uninstall); false if there was none.
    pub fn remove_table(&mut self) -> Result<bool, EnforceError> {
        if !self.table_exists()? {
            return Ok(false);
        }
        let delete = serde_json::json!({"nftables": [
            {"delete": {"table": {"family": "inet", "name": TABLE}}}
        ]});
        nft_apply(&delete.to_string(), "deleting the policy table")?;
        Ok(true)
    }
}

/// Runs a JSON ruleset through `nft -j -f -`.
fn nft_apply(json: &str, what: &'static str) -> Result<(), EnforceError> {
    nftables::helper::apply_ruleset_raw(
        json,
        nftables::helper::DEFAULT_NFT,
        nftables::helper::DEFAULT_ARGS,
    )
    .map(drop)
    .map_err(|e| EnforceError::Nft {
        what,
        message: e.to_string(),
    })
}

/// The packet counts of the table's named counters.
pub fn counters() -> Result<BTreeMap<String, u64>, EnforceError> {
    let what = "reading the policy counters";
    let raw = nftables::helper::get_current_ruleset_raw(
        nftables::helper::DEFAULT_NFT,
        ["list", "counters", "table", "inet", TABLE],
    )
    .map_err(|e| EnforceError::Nft {
        what,
        message: e.to_string(),
    })?;
    let doc: Value = serde_json::from_str(&raw).map_err(|e| EnforceError::Nft {
        what,
        message: e.to_string(),
    })?;
    Ok(doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| {
            let c = o.get("counter")?;
            Some((c["name"].as_str()?.to_string(), c["packets"].as_u64()?))
        })
        .collect())
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::Set;

    /// A ruleset holding one plain set, `a-1-4`, with [`host_ip`] in it.
    fn with_host_set() -> Ruleset {
        let mut rs = Ruleset::default();
        rs.sets.insert(
            "a-1-4".into(),
            Set {
                kind: SetKind::Hosts { v4: true },
                elements: [Element::Host(host_ip())].into(),
            },
        );
        rs
    }

    fn host_ip() -> IpAddr {
        "198.19.1.5".parse().unwrap()
    }

    #[test]
    fn a_fresh_load_is_structure_then_elements_over_netlink() {
        let mut rs = with_host_set();
        let ports = Element::Ports(crate::compile::PortRange {
            protocol: crate::model::Protocol::Tcp,
            lo: 80,
            hi: 81,
        });
        rs.sets.insert(
            "t-1".into(),
            Set {
                kind: SetKind::Ports,
                elements: [ports].into(),
            },
        );
        let map = MapName::ALL[0];
        rs.maps
            .insert(map, [(host_ip(), "gi-1".to_string())].into());
        let (t, changes) = fresh(&rs);
        let parts: Vec<&[Command]> = t.commands.split(|c| *c == Command::Commit).collect();
        assert_eq!(parts.len(), 2);
        // Interval sets keep their elements in the structure; plain sets
        // and maps are filled by the second, netlink-only transaction.
        let filled: Vec<&Command> = parts[0]
            .iter()
            .filter(|c| matches!(c, Command::AddSet { set, .. } if !set.elements.is_empty()))
            .collect();
        assert!(matches!(filled[..], [Command::AddSet { name, .. }] if name == "t-1"));
        assert!(!parts[0]
            .iter()
            .any(|c| matches!(c, Command::Jumps { .. } | Command::Elements { .. })));
        assert!(netlink::Batch::of(parts[1]).is_some());
        assert_eq!(changes, full(&rs).1);
    }

    #[test]
    fn the_written_json_is_what_libnftables_reads() {
        let mut rs = with_host_set();
        rs.chains.insert(
            "pi-1".into(),
            vec![Line {
                expr: json!([{"accept": null}]).to_string(),
                comment: "x/p ingress rule 0".into(),
            }],
        );
        let text = full(&rs).0.json();
        let parsed: Value = serde_json::from_str(&text).unwrap();
        let cmds = parsed["nftables"].as_array().unwrap();
        let set = cmds.iter().find_map(|c| c["add"].get("set")).unwrap();
        assert_eq!(set["elem"], json!(["198.19.1.5"]));
        assert_eq!(set["name"], "a-1-4");
        let rule = cmds.iter().find_map(|c| c["add"].get("rule")).unwrap();
        assert_eq!(rule["chain"], "pi-1");
        assert_eq!(rule["comment"], "x/p ingress rule 0");
        assert_eq!(rule["expr"], json!([{"accept": null}]));
    }
}
