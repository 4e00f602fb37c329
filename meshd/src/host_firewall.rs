//! Openings in a host firewall's FORWARD drop policy for the cluster's
//! traffic. Docker (and iptables setups like it) sets the `filter` table's
//! FORWARD policy to drop; with nftables every base chain on a hook must
//! accept a packet, so Weft's own tables cannot overrule it, and every pod
//! packet a node forwards would be dropped. Like Flannel and Calico, meshd
//! inserts accept rules for the cluster's ranges at the top of those chains
//! (`ip filter FORWARD`, `ip6 filter FORWARD`, where they exist, as
//! iptables-nft makes them) and puts them back when the owner flushes the
//! chain. NetworkPolicy is untouched: it is Weft's own chain on the same
//! hook, which still sees and judges every packet.

use ipnet::IpNet;
use serde_json::{json, Value};

use crate::model::ClusterRanges;
use crate::nft::{Failures, NftError};

/// What marks Weft's rules in someone else's chain.
const MARK: &str = "weft:";

/// The chain of one family: (nft family, address protocol).
const CHAINS: [(&str, &str); 2] = [("ip", "ip"), ("ip6", "ip6")];
const TABLE: &str = "filter";
const CHAIN: &str = "FORWARD";

/// A rule of a FORWARD chain as found: its handle and comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub handle: u64,
    pub comment: Option<String>,
}

/// One family's FORWARD chain: absent (no such firewall), or its rules.
pub type Chain = Option<Vec<Found>>;

/// The comment of the rule accepting traffic `direction` (`from`/`to`) `net`.
fn comment(direction: &str, net: &IpNet) -> String {
    format!("{MARK} cluster traffic {direction} {net}")
}

/// The commands that make `chains` (ip, ip6) hold exactly Weft's openings
/// for `ranges` at their top: insert what is missing, delete Weft's rules
/// for ranges no longer the cluster's. Empty when nothing is to change.
pub fn plan(ranges: &ClusterRanges, chains: &[Chain; 2]) -> Vec<Value> {
    let mut commands = Vec::new();
    for ((family, protocol), chain) in CHAINS.iter().zip(chains) {
        let Some(rules) = chain else { continue };
        let nets: Vec<IpNet> = ranges
            .all()
            .filter(|n| n.addr().is_ipv4() == (*family == "ip"))
            .collect();
        let wanted: Vec<(String, &str, IpNet)> = nets
            .iter()
            .flat_map(|n| [("from", "saddr"), ("to", "daddr")].map(|(d, f)| (comment(d, n), f, *n)))
            .collect();
        for (text, field, net) in &wanted {
            if rules.iter().any(|r| r.comment.as_ref() == Some(text)) {
                continue;
            }
            commands.push(json!({"insert": {"rule": {
                "family": family, "table": TABLE, "chain": CHAIN, "comment": text,
                "expr": [
                    {"match": {"op": "==", "left": {"payload": {"protocol": protocol, "field": field}},
                               "right": {"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}}}},
                    {"counter": null},
                    {"accept": null}
                ]
            }}}));
        }
        for r in rules {
            let ours = r.comment.as_deref().is_some_and(|c| c.starts_with(MARK));
            let current = wanted.iter().any(|(t, _, _)| r.comment.as_ref() == Some(t));
            if ours && !current {
                commands.push(delete(family, r.handle));
            }
        }
    }
    commands
}

/// The commands removing every rule of Weft's from `chains` (uninstall).
pub fn removal(chains: &[Chain; 2]) -> Vec<Value> {
    CHAINS
        .iter()
        .zip(chains)
        .flat_map(|((family, _), chain)| {
            chain
                .iter()
                .flatten()
                .filter(|r| r.comment.as_deref().is_some_and(|c| c.starts_with(MARK)))
                .map(|r| delete(family, r.handle))
        })
        .collect()
}

fn delete(family: &str, handle: u64) -> Value {
    json!({"delete": {"rule": {"family": family, "table": TABLE, "chain": CHAIN, "handle": handle}}})
}

/// Reads both FORWARD chains (`None` for one that does not exist).
pub fn read() -> Result<[Chain; 2], NftError> {
    let mut out: [Chain; 2] = [None, None];
    for (slot, (family, _)) in out.iter_mut().zip(CHAINS) {
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
        *slot = Some(rules_of(&parsed));
    }
    Ok(out)
}

/// The rules in `nft -j list chain` output.
fn rules_of(listing: &Value) -> Vec<Found> {
    listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| {
            let rule = item.get("rule")?;
            Some(Found {
                handle: rule["handle"].as_u64()?,
                comment: rule["comment"].as_str().map(str::to_string),
            })
        })
        .collect()
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
    ranges: ClusterRanges,
    failures: Failures,
}

impl Openings {
    pub fn new(ranges: ClusterRanges) -> Self {
        Self {
            ranges,
            failures: Failures::default(),
        }
    }

    pub fn keep(&mut self) {
        match read().and_then(|chains| apply(plan(&self.ranges, &chains))) {
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

    fn comments(commands: &[Value]) -> Vec<String> {
        commands
            .iter()
            .filter_map(|c| c["insert"]["rule"]["comment"].as_str().map(str::to_string))
            .collect()
    }

    #[test]
    fn openings_go_where_a_forward_chain_is_and_only_once() {
        let ranges = ClusterRanges::lab();
        assert!(
            plan(&ranges, &[None, None]).is_empty(),
            "no firewall, nothing"
        );
        // Docker's IPv4 chain, no IPv6 one.
        let docker = vec![found(4, Some("DOCKER-USER")), found(5, None)];
        let first = plan(&ranges, &[Some(docker.clone()), None]);
        assert_eq!(
            comments(&first),
            [
                "weft: cluster traffic from 198.19.0.0/16",
                "weft: cluster traffic to 198.19.0.0/16",
                "weft: cluster traffic from 198.18.128.0/17",
                "weft: cluster traffic to 198.18.128.0/17",
            ]
        );
        assert_eq!(first[0]["insert"]["rule"]["family"], "ip");
        assert_eq!(
            first[1]["insert"]["rule"]["expr"][0]["match"]["left"]["payload"]["field"],
            "daddr"
        );
        // In place: nothing more; flushed by its owner: all again.
        let mut present = docker.clone();
        present.extend(
            comments(&first)
                .iter()
                .enumerate()
                .map(|(i, c)| found(10 + i as u64, Some(c))),
        );
        assert!(plan(&ranges, &[Some(present.clone()), None]).is_empty());
        assert_eq!(plan(&ranges, &[Some(docker), None]).len(), 4);
        // A stale opening of ours goes; someone else's rule stays.
        present.push(found(99, Some("weft: cluster traffic to 10.0.0.0/8")));
        assert_eq!(
            plan(&ranges, &[Some(present.clone()), None]),
            [
                json!({"delete": {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 99}}})
            ]
        );
        assert_eq!(removal(&[Some(present), None]).len(), 5);
        // IPv6 ranges go to the ip6 chain.
        let v6 = plan(&ranges, &[None, Some(Vec::new())]);
        assert_eq!(v6.len(), 4);
        assert!(v6.iter().all(|c| c["insert"]["rule"]["family"] == "ip6"));
    }

    #[test]
    fn reads_rules_and_comments_from_a_listing() {
        let listing = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1, "policy": "drop"}},
            {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 7, "comment": "weft: x", "expr": []}},
            {"rule": {"family": "ip", "table": "filter", "chain": "FORWARD", "handle": 8, "expr": []}}
        ]});
        assert_eq!(
            rules_of(&listing),
            [found(7, Some("weft: x")), found(8, None)]
        );
    }
}
