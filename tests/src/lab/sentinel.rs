//! The plaintext sentinel: nftables counters on the fabric bridge that
//! count every frame carrying a cluster pod or mesh address in its IP
//! header. WireGuard's datagrams carry underlay addresses only, so any such
//! frame is pod or mesh traffic that left a node unencrypted. Armed when
//! the fabric is made, before any node exists; `meshlab status` shows the
//! count and every end-to-end test requires 0 at teardown.
//!
//! A second counter, [`HOST`], counts frames between two nodes' host
//! addresses that are not WireGuard's datagrams (UDP port 51820): node-to-
//! node host traffic in plaintext, which `WEFT_ENCRYPT_HOST` ends. Lab
//! traffic to the API server (on the fabric's own address) is no node's.

use anyhow::{Context, Result};
use serde::Serialize;

use super::netns::nft;
use super::topology::{CLUSTER_V4, CLUSTER_V6, MESH_V4, MESH_V6};

const TABLE: &str = "weft_sentinel";
const COUNTER: &str = "plaintext";
/// The counter of node-to-node host traffic in plaintext.
pub const HOST: &str = "host_plaintext";
/// Where lab nodes' host addresses lie: the flat underlay (node `k` at
/// `198.18.1.k`, `2001:db8:18::k`) and the sites' subnets (`198.18.16.0`
/// onwards; a site behind NAT shows its router's address instead).
const NODES_V4: &str = "198.18.1.0/24, 198.18.16.0/20";
const NODES_V6: &str = "2001:db8:18::/120";
/// WireGuard's port on every lab node.
const WIREGUARD_PORT: u16 = 51820;

/// The ruleset, for one `nft -f -` in the fabric namespace.
fn ruleset() -> String {
    // Counted once per frame: the first rule that matches accepts it.
    format!(
        "table bridge {TABLE} {{
  counter {COUNTER} {{ }}
  set cluster4 {{ type ipv4_addr; flags interval; elements = {{ {CLUSTER_V4}, {MESH_V4} }} }}
  set cluster6 {{ type ipv6_addr; flags interval; elements = {{ {CLUSTER_V6}, {MESH_V6} }} }}
  counter {HOST} {{ }}
  set nodes4 {{ type ipv4_addr; flags interval; elements = {{ {NODES_V4} }} }}
  set nodes6 {{ type ipv6_addr; flags interval; elements = {{ {NODES_V6} }} }}
  chain watch {{
    type filter hook prerouting priority -300; policy accept;
    ip saddr @cluster4 counter name {COUNTER} accept
    ip daddr @cluster4 counter name {COUNTER} accept
    ip6 saddr @cluster6 counter name {COUNTER} accept
    ip6 daddr @cluster6 counter name {COUNTER} accept
    ip saddr @nodes4 ip daddr @nodes4 jump hosts
    ip6 saddr @nodes6 ip6 daddr @nodes6 jump hosts
  }}
  chain hosts {{
    udp sport {WIREGUARD_PORT} accept
    udp dport {WIREGUARD_PORT} accept
    counter name {HOST} accept
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

/// Reads the counter of cluster addresses.
pub fn count(fabric_netns: &str) -> Result<Count> {
    count_of(fabric_netns, COUNTER)
}

/// Reads the counter of node-to-node host traffic.
pub fn count_host(fabric_netns: &str) -> Result<Count> {
    count_of(fabric_netns, HOST)
}

fn count_of(fabric_netns: &str, counter: &str) -> Result<Count> {
    let json = nft(
        fabric_netns,
        &["-j", "list", "counter", "bridge", TABLE, counter],
        None,
    )?;
    parse(&json)
}

/// Zeroes both counters (for a test that leaks on purpose to prove the
/// sentinel sees it).
pub fn reset(fabric_netns: &str) -> Result<()> {
    for counter in [COUNTER, HOST] {
        nft(
            fabric_netns,
            &["reset", "counter", "bridge", TABLE, counter],
            None,
        )?;
    }
    Ok(())
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
