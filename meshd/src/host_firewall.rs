//! Openings in a host firewall's FORWARD drop policy for the cluster's
//! traffic. Docker (and iptables setups like it) sets the `filter` table's
//! FORWARD policy to drop; with nftables every base chain on a hook must
//! accept a packet, so Weft's own tables cannot overrule it, and every pod
//! packet a node forwards would be dropped. Where such a chain drops by
//! policy (`ip filter FORWARD`, `ip6 filter FORWARD`, as iptables-nft makes
//! them), meshd appends accept rules for what comes from or goes to a pod
//! veth or the WireGuard interface, and puts them back when the owner
//! flushes the chain. Appended, so the owner's rules (Docker's isolation
//! and `DOCKER-USER`, kube-proxy's rejects) still run first; by interface,
//! so nothing else gets through: the source guard has already dropped
//! cluster addresses arriving anywhere else (`crate::guard`).
//! NetworkPolicy is untouched: Weft's own chain on the same hook still
//! judges every packet.

use serde_json::{json, Value};
use weft_ipam::POD_VETH_PREFIX;

use crate::nft::{Failures, NftError};

/// What marks Weft's rules in someone else's chain.
const MARK: &str = "weft:";

/// The nft families of the two chains.
const FAMILIES: [&str; 2] = ["ip", "ip6"];
const TABLE: &str = "filter";
const CHAIN: &str = "FORWARD";

/// A rule of a FORWARD chain as found: its handle and comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub handle: u64,
    pub comment: Option<String>,
}

/// One family's FORWARD chain as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Its policy drops what no rule accepts.
    pub drops: bool,
    pub rules: Vec<Found>,
}

/// The openings, each an (interface match, interface) pair and its comment.
fn openings(mesh: &str) -> [(&'static str, String, String); 4] {
    let pods = format!("{POD_VETH_PREFIX}*");
    [
        ("iifname", pods.clone(), format!("{MARK} from pods")),
        ("oifname", pods, format!("{MARK} to pods")),
        ("iifname", mesh.to_string(), format!("{MARK} from the mesh")),
        ("oifname", mesh.to_string(), format!("{MARK} to the mesh")),
    ]
}

/// The commands that make `chains` (ip, ip6; `None`: no such chain) hold
/// exactly Weft's openings where they drop by policy, and none where they
/// do not: append what is missing, delete what is not wanted. Empty when
/// nothing is to change.
pub fn plan(mesh: &str, chains: &[Option<Chain>; 2]) -> Vec<Value> {
    let mut commands = Vec::new();
    for (family, chain) in FAMILIES.iter().zip(chains) {
        let Some(chain) = chain else { continue };
        let wanted: Vec<(&str, String, String)> = match chain.drops {
            true => openings(mesh).into(),
            false => Vec::new(),
        };
        for (key, name, text) in &wanted {
            if chain.rules.iter().any(|r| r.comment.as_ref() == Some(text)) {
                continue;
            }
            commands.push(json!({"add": {"rule": {
                "family": family, "table": TABLE, "chain": CHAIN, "comment": text,
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": name}},
                    {"counter": null},
                    {"accept": null}
                ]
            }}}));
        }
        for r in &chain.rules {
            let ours = r.comment.as_deref().is_some_and(|c| c.starts_with(MARK));
            let current = wanted.iter().any(|(_, _, t)| r.comment.as_ref() == Some(t));
            if ours && !current {
                commands.push(delete(family, r.handle));
            }
        }
    }
    commands
}

/// The commands removing every rule of Weft's from `chains` (uninstall).
pub fn removal(chains: &[Option<Chain>; 2]) -> Vec<Value> {
    FAMILIES
        .iter()
        .zip(chains)
        .flat_map(|(family, chain)| {
            chain
                .iter()
                .flat_map(|c| &c.rules)
                .filter(|r| r.comment.as_deref().is_some_and(|c| c.starts_with(MARK)))
                .map(|r| delete(family, r.handle))
        })
        .collect()
}

fn delete(family: &str, handle: u64) -> Value {
    json!({"delete": {"rule": {"family": family, "table": TABLE, "chain": CHAIN, "handle": handle}}})
}

/// Reads both FORWARD chains (`None` for one that does not exist).
pub fn read() -> Result<[Option<Chain>; 2], NftError> {
    let mut out: [Option<Chain>; 2] = [None, None];
    for (slot, family) in out.iter_mut().zip(FAMILIES) {
        let args = ["list", "chain", family, TABLE, CHAIN];
        let listing =
            match nftables::helper::get_current_ruleset_raw(nftables::helper::DEFAULT_NFT, args) {
                Ok(text) => text,
                // No such table or chain: no firewall of this kind here.
                Err(nftables::helper::NftablesError::NftFailed { stderr, .. })
                    if stderr.contains("No such file or directory") =>
                {
                    continue
                }
                Err(e) => {
                    return Err(NftError::new(
                        format!("listing {family} {TABLE} {CHAIN}"),
                        e,
                    ))
                }
            };
        let parsed: Value = serde_json::from_str(&listing)
            .map_err(|e| NftError::new(format!("reading {family} {TABLE} {CHAIN}"), e))?;
        *slot = Some(chain_of(&parsed));
    }
    Ok(out)
}

/// The chain in `nft -j list chain` output: its policy and rules.
fn chain_of(listing: &Value) -> Chain {
    let items = listing["nftables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    Chain {
        drops: items.iter().any(|i| i["chain"]["policy"] == "drop"),
        rules: items
            .iter()
            .filter_map(|item| {
                let rule = item.get("rule")?;
                Some(Found {
                    handle: rule["handle"].as_u64()?,
                    comment: rule["comment"].as_str().map(str::to_string),
                })
            })
            .collect(),
    }
}

/// Applies `commands` in one transaction (nothing when empty); how many.
pub fn apply(commands: Vec<Value>) -> Result<usize, NftError> {
    if commands.is_empty() {
        return Ok(0);
    }
    let n = commands.len();
    crate::nft::apply(
        &json!({ "nftables": commands }),
        "changing the host firewall's FORWARD chains",
    )?;
    Ok(n)
}

/// Keeps the openings in place, pass after pass (a firewall's owner may
/// flush its chain at any time: Docker does on restart). A failure is
/// logged once per cause and does not stop the pass.
pub struct Openings {
    /// The WireGuard interface.
    mesh: String,
    failures: Failures,
}

impl Openings {
    pub fn new(mesh: &str) -> Self {
        Self {
            mesh: mesh.to_string(),
            failures: Failures::default(),
        }
    }

    pub fn keep(&mut self) {
        match read().and_then(|chains| apply(plan(&self.mesh, &chains))) {
            Ok(changed) => {
                if changed > 0 {
                    tracing::info!(
                        changed,
                        "opened the host firewall's FORWARD drop for the cluster's traffic"
                    );
                }
                self.failures.cleared();
            }
            Err(e) => self
                .failures
                .failed(&e, "a host firewall may drop pods' forwarded traffic"),
        }
    }
}

/// Removes Weft's openings (uninstall); whether there were any.
pub fn remove() -> Result<bool, NftError> {
    Ok(apply(removal(&read()?))? > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(handle: u64, comment: Option<&str>) -> Found {
        Found {
            handle,
            comment: comment.map(str::to_string),
        }
    }

    fn chain(drops: bool, rules: Vec<Found>) -> Option<Chain> {
        Some(Chain { drops, rules })
    }

    fn comments(commands: &[Value]) -> Vec<String> {
        commands
            .iter()
            .filter_map(|c| c["add"]["rule"]["comment"].as_str().map(str::to_string))
            .collect()
    }

    #[test]
    fn openings_are_appended_where_a_chain_drops_and_only_there() {
        assert!(
            plan("weft0", &[None, None]).is_empty(),
            "no firewall, nothing"
        );
        // Docker's IPv4 chain (policy drop), no IPv6 one.
        let docker = vec![found(4, Some("DOCKER-USER")), found(5, None)];
        let first = plan("weft0", &[chain(true, docker.clone()), None]);
        assert_eq!(
            comments(&first),
            [
                "weft: from pods",
                "weft: to pods",
                "weft: from the mesh",
                "weft: to the mesh"
            ]
        );
        assert!(
            first.iter().all(|c| c.get("add").is_some()),
            "appended, not inserted"
        );
        assert_eq!(first[0]["add"]["rule"]["family"], "ip");
        assert_eq!(
            first[1]["add"]["rule"]["expr"][0]["match"]["left"]["meta"]["key"],
            "oifname"
        );
        assert_eq!(first[1]["add"]["rule"]["expr"][0]["match"]["right"], "wp*");
        // In place: nothing more; flushed by its owner: all again.
        let mut present = docker.clone();
        present.extend(
            comments(&first)
                .iter()
                .enumerate()
                .map(|(i, c)| found(10 + i as u64, Some(c))),
        );
        assert!(plan("weft0", &[chain(true, present.clone()), None]).is_empty());
        assert_eq!(plan("weft0", &[chain(true, docker), None]).len(), 4);
        // A chain that accepts by policy (kube-proxy's) gets none, and loses
        // ours; someone else's rule stays.
        let undo = plan("weft0", &[chain(false, present.clone()), None]);
        assert_eq!(undo.len(), 4);
        assert!(undo
            .iter()
            .all(|c| c["delete"]["rule"]["handle"].as_u64() >= Some(10)));
        // A stale opening of ours goes.
        present.push(found(99, Some("weft: cluster traffic to 10.0.0.0/8")));
        assert_eq!(
            plan("weft0", &[chain(true, present.clone()), None]),
            [
                json!({"delete": {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 99}}})
            ]
        );
        assert_eq!(removal(&[chain(true, present), None]).len(), 5);
        assert!(plan("weft0", &[None, chain(true, Vec::new())])
            .iter()
            .all(|c| c["add"]["rule"]["family"] == "ip6"));
    }

    #[test]
    fn reads_the_policy_rules_and_comments_of_a_listing() {
        let listing = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1, "policy": "drop"}},
            {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 7, "comment": "weft: x", "expr": []}},
            {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 8, "expr": []}}
        ]});
        assert_eq!(
            chain_of(&listing),
            Chain {
                drops: true,
                rules: vec![found(7, Some("weft: x")), found(8, None)]
            }
        );
    }
}
