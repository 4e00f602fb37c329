//! The plaintext sentinel: nftables counters on the fabric bridge that
//! count every frame carrying a cluster pod or mesh address in its IP
//! header. WireGuard's datagrams carry underlay addresses only, so any such
//! frame is pod or mesh traffic that left a node unencrypted. Armed when
//! the fabric is made, before any node exists; `meshlab status` shows the
//! count and every end-to-end test requires 0 at teardown.
//!
//! A second counter, [`HOST`], counts frames between two nodes' host
//! addresses that are not WireGuard's datagrams (UDP port 51820, and ICMP
//! errors quoting one: a node's kernel answers a datagram that came before
//! its WireGuard socket with one, before it has heard the sender) nor the
//! API server's (TCP 6443, TLS: at a control-plane node's address with
//! `up --control-plane`, where `WEFT_ENCRYPT_HOST` leaves it on the
//! underlay on purpose): node-to-node host traffic in plaintext, which
//! `WEFT_ENCRYPT_HOST` ends.

use anyhow::{Context, Result};
use serde::Serialize;

use super::netns::nft;
use super::topology::{
    CLUSTER_V4, CLUSTER_V6, FABRIC_API_PORT, MESH_V4, MESH_V6, PEERS_V4, PEERS_V6,
};

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
  set cluster4 {{ type ipv4_addr; flags interval; elements = {{ {CLUSTER_V4}, {MESH_V4}, {PEERS_V4} }} }}
  set cluster6 {{ type ipv6_addr; flags interval; elements = {{ {CLUSTER_V6}, {MESH_V6}, {PEERS_V6} }} }}
  counter {HOST} {{ }}
  set nodes4 {{ type ipv4_addr; flags interval; elements = {{ {NODES_V4} }} }}
  set nodes6 {{ type ipv6_addr; flags interval; elements = {{ {NODES_V6} }} }}
  set {HOST}_flows4 {{ type ipv4_addr . ipv4_addr . inet_proto; flags dynamic; size 256; }}
  set {HOST}_flows6 {{ type ipv6_addr . ipv6_addr . inet_proto; flags dynamic; size 256; }}
  chain watch {{
    type filter hook prerouting priority -300; policy accept;
    ip saddr @cluster4 counter name {COUNTER} accept
    ip daddr @cluster4 counter name {COUNTER} accept
    ip6 saddr @cluster6 counter name {COUNTER} accept
    ip6 daddr @cluster6 counter name {COUNTER} accept
    ip saddr @nodes4 ip daddr @nodes4 jump hosts4
    ip6 saddr @nodes6 ip6 daddr @nodes6 jump hosts6
  }}
  chain hosts4 {{
    jump wireguard_or_api
    add @{HOST}_flows4 {{ ip saddr . ip daddr . meta l4proto }} counter name {HOST} accept
  }}
  chain hosts6 {{
    jump wireguard_or_api
    add @{HOST}_flows6 {{ ip6 saddr . ip6 daddr . meta l4proto }} counter name {HOST} accept
  }}
  chain wireguard_or_api {{
    udp sport {WIREGUARD_PORT} accept
    udp dport {WIREGUARD_PORT} accept
    tcp sport {FABRIC_API_PORT} accept
    tcp dport {FABRIC_API_PORT} accept
    icmp type {{ destination-unreachable, time-exceeded, parameter-problem }} @th,224,16 {WIREGUARD_PORT} accept
    icmp type {{ destination-unreachable, time-exceeded, parameter-problem }} @th,240,16 {WIREGUARD_PORT} accept
    icmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded, parameter-problem }} @th,384,16 {WIREGUARD_PORT} accept
    icmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded, parameter-problem }} @th,400,16 {WIREGUARD_PORT} accept
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

/// The flows the host counter counted (source . destination . protocol),
/// as `nft` lists them: what a failing test shows.
pub fn host_flows(fabric_netns: &str) -> String {
    ["4", "6"]
        .iter()
        .map(|f| {
            nft(
                fabric_netns,
                &["list", "set", "bridge", TABLE, &format!("{HOST}_flows{f}")],
                None,
            )
            .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("")
}

/// Zeroes both counters (for a test that leaks on purpose to prove the
/// sentinel sees it).
pub fn reset(fabric_netns: &str) -> Result<()> {
    [COUNTER, HOST]
        .iter()
        .try_for_each(|c| reset_counter(fabric_netns, c))
}

/// Zeroes the host counter only: for host traffic plaintext by design (an
/// address nobody's), while pods' and mesh addresses stay watched.
pub fn reset_host(fabric_netns: &str) -> Result<()> {
    reset_counter(fabric_netns, HOST)
}

fn reset_counter(fabric_netns: &str, counter: &str) -> Result<()> {
    nft(
        fabric_netns,
        &["reset", "counter", "bridge", TABLE, counter],
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
