//! The plaintext sentinel: nftables counters on the fabric bridge that
//! count every frame carrying a cluster pod or mesh address in its IP
//! header. WireGuard's datagrams carry underlay addresses only, so any such
//! frame is pod or mesh traffic that left a node unencrypted. Armed when
//! the fabric is made, before any node exists; `meshlab status` shows the
//! count and every end-to-end test requires 0 at teardown.

use anyhow::{Context, Result};
use serde::Serialize;

use super::netns::nft;
use super::topology::{CLUSTER_V4, CLUSTER_V6, MESH_V4, MESH_V6};

const TABLE: &str = "weft_sentinel";
const COUNTER: &str = "plaintext";

/// The ruleset, for one `nft -f -` in the fabric namespace.
fn ruleset() -> String {
    // Counted once per frame: the first rule that matches accepts it.
    format!(
        "table bridge {TABLE} {{
  counter {COUNTER} {{ }}
  set cluster4 {{ type ipv4_addr; flags interval; elements = {{ {CLUSTER_V4}, {MESH_V4} }} }}
  set cluster6 {{ type ipv6_addr; flags interval; elements = {{ {CLUSTER_V6}, {MESH_V6} }} }}
  chain watch {{
    type filter hook prerouting priority -300; policy accept;
    ip saddr @cluster4 counter name {COUNTER} accept
    ip daddr @cluster4 counter name {COUNTER} accept
    ip6 saddr @cluster6 counter name {COUNTER} accept
    ip6 daddr @cluster6 counter name {COUNTER} accept
  }}
}}
"
    )
}

/// Arms the sentinel in the fabric namespace.
pub fn arm(fabric_netns: &str) -> Result<()> {
    nft(fabric_netns, &["-f", "-"], Some(&ruleset())).map(drop)
}

/// What the sentinel has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// Reads the counter.
pub fn count(fabric_netns: &str) -> Result<Count> {
    let json = nft(
        fabric_netns,
        &["-j", "list", "counter", "bridge", TABLE, COUNTER],
        None,
    )?;
    parse(&json)
}

/// Zeroes the counter (for a test that leaks on purpose to prove the
/// sentinel sees it).
pub fn reset(fabric_netns: &str) -> Result<()> {
    nft(
        fabric_netns,
        &["reset", "counter", "bridge", TABLE, COUNTER],
        None,
    )
    .map(drop)
}

fn parse(json: &str) -> Result<Count> {
    let v: serde_json::Value = serde_json::from_str(json).context("nft -j output")?;
    let counter = v["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i.get("counter")))
        .context("no counter in nft's output")?;
    Ok(Count {
        packets: counter["packets"].as_u64().context("counter packets")?,
        bytes: counter["bytes"].as_u64().context("counter bytes")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nfts_counter_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "bridge", "name": "plaintext", "table": "weft_sentinel", "handle": 1, "packets": 3, "bytes": 252}}]}"#;
        assert_eq!(
            parse(json).unwrap(),
            Count {
                packets: 3,
                bytes: 252
            }
        );
        assert!(parse(r#"{"nftables": []}"#).is_err());
    }

    #[test]
    fn the_ruleset_names_every_cluster_range() {
        let r = ruleset();
        for range in [CLUSTER_V4, CLUSTER_V6, MESH_V4, MESH_V6] {
            assert!(r.contains(range), "{range}");
        }
    }
}
