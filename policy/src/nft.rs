//! Getting a [`Ruleset`] into the kernel: the whole table in one
//! transaction, or only the difference from the last one applied, also in
//! one transaction (libnftables JSON through `nft -j -f -`, never a command
//! per rule).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::render::{element_json, family, set_json, Element, MapName, Ruleset, TABLE};

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

fn rule_cmd(chain: &str, rule: &Value) -> Value {
    let mut body = json!({"chain": chain, "expr": rule["expr"]});
    if let Some(c) = rule.get("comment") {
        body["comment"] = c.clone();
    }
    add("rule", body)
}

fn map_elements<'a>(
    map: &MapName,
    elements: impl Iterator<Item = (&'a std::net::IpAddr, &'a String)>,
) -> Value {
    let elem: Vec<Value> = elements
        .map(|(ip, chain)| json!([ip.to_string(), {"jump": {"target": chain}}]))
        .collect();
    json!({"name": map.name(), "elem": elem})
}

fn set_elements<'a>(name: &str, elements: impl Iterator<Item = &'a Element>) -> Value {
    json!({"name": name, "elem": elements.map(element_json).collect::<Vec<_>>()})
}

/// The base chains and maps every ruleset has.
fn skeleton() -> Vec<Value> {
    let mut cmds = Vec::new();
    for map in MapName::ALL {
        let typ = if map.v4 { "ipv4_addr" } else { "ipv6_addr" };
        cmds.push(add(
            "map",
            json!({"name": map.name(), "type": typ, "map": "verdict"}),
        ));
    }
    for (name, prio, field) in [("egress", 0, "saddr"), ("ingress", 10, "daddr")] {
        cmds.push(add(
            "chain",
            json!({"name": name, "type": "filter", "hook": "forward", "prio": prio, "policy": "accept"}),
        ));
        cmds.push(add(
            "rule",
            json!({"chain": name, "expr": [
                {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}},
                {"accept": null}]}),
        ));
        for map in MapName::ALL.iter().filter(|m| m.name().starts_with(name)) {
            cmds.push(add(
                "rule",
                json!({"chain": name, "expr": [{"vmap": {
                    "key": {"payload": {"protocol": family(map.v4), "field": field}},
                    "data": format!("@{}", map.name())}}]}),
            ));
        }
    }
    cmds
}

/// The whole table, replacing whatever is there: creating then deleting
/// the table in the same transaction clears it atomically.
pub fn full(rs: &Ruleset) -> (Value, Changes) {
    let table = json!({"table": {"family": "inet", "name": TABLE}});
    let mut cmds = vec![
        json!({"add": table}),
        json!({"delete": table}),
        json!({"add": table}),
    ];
    let changes = diff_into(&mut cmds, &Ruleset::default(), rs, true);
    (json!({"nftables": cmds}), changes)
}

/// The transaction taking the kernel from `old` (what was last applied) to
/// `new`; `None` when nothing differs.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Option<(Value, Changes)> {
    let mut cmds = Vec::new();
    let changes = diff_into(&mut cmds, old, new, false);
    (!changes.is_empty()).then(|| (json!({"nftables": cmds}), changes))
}

/// Appends the commands in an order the kernel accepts within one
/// transaction: what is referenced exists before the reference, and a
/// reference is gone before what it pointed to.
fn diff_into(cmds: &mut Vec<Value>, old: &Ruleset, new: &Ruleset, with_skeleton: bool) -> Changes {
    let mut changes = Changes::default();
    for (name, _) in new
        .counters
        .iter()
        .filter(|(n, _)| !old.counters.contains_key(*n))
    {
        cmds.push(add("counter", json!({"name": name})));
    }
    for (name, set) in &new.sets {
        match old.sets.get(name) {
            None => {
                changes.sets += 1;
                changes.elements_added += set.elements.len();
                let mut body = set_json(name, set.kind);
                if !set.elements.is_empty() {
                    body["elem"] = json!(set.elements.iter().map(element_json).collect::<Vec<_>>());
                }
                cmds.push(json!({"add": {"set": body}}));
            }
            Some(was) => {
                let added: Vec<&Element> = set.elements.difference(&was.elements).collect();
                if !added.is_empty() {
                    changes.elements_added += added.len();
                    cmds.push(add("element", set_elements(name, added.into_iter())));
                }
            }
        }
    }
    let changed: Vec<(&String, &Vec<Value>)> = new
        .chains
        .iter()
        .filter(|(name, rules)| old.chains.get(*name) != Some(rules))
        .collect();
    for (name, _) in &changed {
        if old.chains.contains_key(*name) {
            cmds.push(json!({"flush": obj("chain", json!({"name": name}))}));
        } else {
            cmds.push(add("chain", json!({"name": name})));
        }
    }
    for (name, rules) in &changed {
        changes.chains += 1;
        cmds.extend(rules.iter().map(|r| rule_cmd(name, r)));
    }
    if with_skeleton {
        cmds.extend(skeleton());
    }
    let empty = BTreeMap::new();
    for (map, entries) in &new.maps {
        let was = old.maps.get(map).unwrap_or(&empty);
        let gone = was
            .iter()
            .filter(|(ip, chain)| entries.get(*ip) != Some(*chain));
        let gone: Vec<_> = gone.collect();
        if !gone.is_empty() {
            changes.elements_removed += gone.len();
            cmds.push(delete("element", map_elements(map, gone.into_iter())));
        }
        let came: Vec<_> = entries
            .iter()
            .filter(|(ip, chain)| was.get(*ip) != Some(*chain))
            .collect();
        if !came.is_empty() {
            changes.elements_added += came.len();
            cmds.push(add("element", map_elements(map, came.into_iter())));
        }
    }
    for (name, set) in &new.sets {
        if let Some(was) = old.sets.get(name) {
            let removed: Vec<&Element> = was.elements.difference(&set.elements).collect();
            if !removed.is_empty() {
                changes.elements_removed += removed.len();
                cmds.push(delete("element", set_elements(name, removed.into_iter())));
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
        cmds.push(json!({"flush": obj("chain", json!({"name": name}))}));
    }
    for name in &gone {
        changes.chains += 1;
        cmds.push(delete("chain", json!({"name": name})));
    }
    for name in old.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
        changes.sets += 1;
        changes.elements_removed += old.sets[name].elements.len();
        cmds.push(delete("set", json!({"name": name})));
    }
    for name in old
        .counters
        .keys()
        .filter(|n| !new.counters.contains_key(*n))
    {
        cmds.push(delete("counter", json!({"name": name})));
    }
    changes
}

/// Runs one transaction with `nft -j -f -` in the calling thread's network
/// namespace. (The crate's typed schema has no verdict maps or
/// concatenations, so the JSON goes raw.)
pub fn apply(transaction: &Value) -> Result<(), String> {
    nftables::helper::apply_ruleset_raw(
        &transaction.to_string(),
        nftables::helper::DEFAULT_NFT,
        nftables::helper::DEFAULT_ARGS,
    )
    .map(drop)
    .map_err(|e| format!("applying the policy ruleset: {e}"))
}

/// The packet counts of the table's named counters.
pub fn counters() -> Result<BTreeMap<String, u64>, String> {
    let raw = nftables::helper::get_current_ruleset_raw(
        nftables::helper::DEFAULT_NFT,
        ["list", "counters", "table", "inet", TABLE],
    )
    .map_err(|e| format!("reading the policy counters: {e}"))?;
    let doc: Value = serde_json::from_str(&raw).map_err(|e| format!("nft's counters: {e}"))?;
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
