//! `meshlab bench planner`: what one event costs meshd's pure core on a
//! large cluster. A synthetic cluster of N published nodes (dual-stack,
//! distinct keys with their proofs, endpoints, pod blocks and their mesh
//! addresses, in 3 regions of 3 zones) with a fraction of its links reported down, seen from one node:
//! the verdicts (indexed, and the pairwise comparison they replaced), the
//! paths, and the whole `decide` meshd runs on every Node event (own claim,
//! verdicts, paths, peers and routes): from scratch (a full recompute, as
//! on meshd's first sync) and for one node's change with the parse memo of
//! the decision before (an event). Peak memory is the process's high-water
//! mark after each size.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use ipnet::IpNet;
use weft_keys::{PrivateKey, ProofSubject};
use weft_meshd::annotations::{render, Claim, KeyProofs, UNREACHABLE};
use weft_meshd::decide::{decide, Inputs};
use weft_meshd::model::{
    ClusterRanges, ClusterSnapshot, Hop, LocalConfig, NodeInfo, Placement, Ranges,
};
use weft_meshd::planner::{judge, judge_pairwise, links, mesh_address_of, ParseMemo};

/// One cluster size's figures (medians).
pub struct Row {
    pub nodes: usize,
    pub down_links: usize,
    pub relayed: usize,
    pub pairwise: Duration,
    pub indexed: Duration,
    pub paths: Duration,
    pub full: Duration,
    pub event: Duration,
    pub peak_rss_mib: f64,
}

/// Ranges big enough for 65,536 nodes.
fn ranges() -> ClusterRanges {
    let net = |s: &str| s.parse::<IpNet>().expect("a literal range");
    let v4 = |s: &str| match net(s) {
        IpNet::V4(n) => n,
        IpNet::V6(_) => unreachable!("an IPv4 literal"),
    };
    let v6 = |s: &str| match net(s) {
        IpNet::V6(n) => n,
        IpNet::V4(_) => unreachable!("an IPv6 literal"),
    };
    ClusterRanges {
        pods: Ranges {
            v4: v4("10.0.0.0/8"),
            v6: Some(v6("fd00:10::/48")),
        },
        mesh: Ranges {
            v4: v4("100.64.0.0/10"),
            v6: Some(v6("fd64::/64")),
        },
        peers: Some(Ranges {
            v4: v4("172.31.0.0/16"),
            v6: Some(v6("fd65::/64")),
        }),
    }
}

/// splitmix64: a fixed, seedable sequence, so every run builds the same cluster.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn name(i: usize) -> String {
    format!("node-{i}")
}

fn uid(i: usize) -> String {
    format!("uid-{i}")
}

/// Node `i`'s claim, proofs included: everything derived from its index.
fn claim(i: usize, r: &ClusterRanges) -> Claim {
    let (hi, lo) = ((i >> 8) as u8, i as u8);
    // Past byte 0, whose low bits X25519 clears (keys differing only there
    // are one key).
    let mut secret = [0u8; 32];
    secret[1..9].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    let key = PrivateKey::from_bytes(secret);
    let pod_cidrs: Vec<IpNet> = vec![
        format!("10.{hi}.{lo}.0/24").parse().expect("a CIDR"),
        format!("fd00:10:0:{:x}::/64", i).parse().expect("a CIDR"),
    ];
    Claim {
        public_key: key.public_key(),
        proofs: std::sync::Arc::new(KeyProofs {
            key: key.prove(ProofSubject {
                node: &name(i),
                uid: &uid(i),
            }),
            next: None,
        }),
        endpoint: Some(
            format!("192.0.{}.{}:51820", i / 250, i % 250 + 1)
                .parse()
                .expect("an endpoint"),
        ),
        mesh_addresses: pod_cidrs
            .iter()
            .filter_map(|c| mesh_address_of(r, c))
            .collect(),
        pod_cidrs,
        unreachable: Default::default(),
        key_since: None,
        next_key: None,
        observed: Default::default(),
        nat: None,
        candidates: Vec::new(),
        given_up: Default::default(),
    }
}

/// `n` nodes with `down` of their links reported down by one end.
fn cluster(n: usize, down: usize) -> ClusterSnapshot {
    let r = ranges();
    let mut claims: Vec<Claim> = (0..n).map(|i| claim(i, &r)).collect();
    let mut state = 0x5eed;
    let mut cut = BTreeSet::new();
    while cut.len() < down {
        let (a, b) = (next(&mut state) as usize % n, next(&mut state) as usize % n);
        if a != b && cut.insert((a.min(b), a.max(b))) {
            std::sync::Arc::make_mut(&mut claims[a].unreachable).insert(name(b));
        }
    }
    let nodes = claims
        .iter()
        .enumerate()
        .map(|(i, c)| NodeInfo {
            name: name(i),
            uid: uid(i),
            created: i as i64,
            internal_ips: c.endpoint.iter().map(|e| e.ip()).collect(),
            external_ips: vec![],
            spec_pod_cidrs: c.pod_cidrs.clone(),
            annotations: render(c),
            placement: Placement {
                region: Some(format!("region-{}", i % 3)),
                zone: Some(format!("zone-{}", i % 9)),
                may_relay: true,
            },
        })
        .collect();
    ClusterSnapshot {
        nodes,
        blocks: Default::default(),
        ..Default::default()
    }
}

fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut samples: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

/// The process's peak resident memory so far (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Measures each size; `down_percent` of all node pairs have a link
/// reported down. Sizes run smallest first, so each peak includes the ones
/// before (a bound, not a share).
pub fn run(
    sizes: &[usize],
    down_percent: f64,
    runs: usize,
    pairwise_up_to: usize,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Row>> {
    ensure!(
        (0.0..=50.0).contains(&down_percent),
        "--down {down_percent}: a percentage of links from 0 to 50"
    );
    let r = ranges();
    let mut rows = Vec::new();
    let mut sizes = sizes.to_vec();
    sizes.sort_unstable();
    for n in sizes {
        ensure!((2..=65_536).contains(&n), "--nodes {n}: from 2 to 65536");
        progress(&format!("{n} nodes"));
        let pairs = n * (n - 1) / 2;
        let down = ((pairs as f64) * down_percent / 100.0).round() as usize;
        let mut snapshot = cluster(n, down);
        let local = LocalConfig::new(&name(0), r);
        let me = claim(0, &r);
        // meshd keeps its parse memo from one event to the next; a full
        // recompute (meshd's first sync) starts without one.
        let mut memo = ParseMemo::default();
        let decide_with = |snapshot: &ClusterSnapshot, memo: &mut ParseMemo| -> Result<usize> {
            let d = decide(
                &Inputs {
                    snapshot,
                    local: &local,
                    keys: weft_meshd::planner::OwnKeys::steady(me.public_key, 0),
                    proofs: (*me.proofs).clone(),
                    listening: weft_meshd::planner::Listening {
                        endpoint: None,
                        prefer: Default::default(),
                        extra: &[],
                        port: 51820,
                    },
                    pod_cidrs: me.pod_cidrs.clone(),
                    status: Default::default(),
                },
                memo,
            )?;
            Ok(d.desired
                .paths
                .values()
                .filter(|h| matches!(h, Hop::Via(_)))
                .count())
        };
        let relayed = decide_with(&snapshot, &mut memo)?;
        let full = median(runs, || {
            let _ = decide_with(&snapshot, &mut ParseMemo::default());
        });
        let indexed = median(runs, || {
            judge(&snapshot, &r);
        });
        let pairwise = if n <= pairwise_up_to {
            median(runs.min(3), || {
                judge_pairwise(&snapshot, &r);
            })
        } else {
            Duration::ZERO
        };
        let verdicts = judge(&snapshot, &r);
        let paths = median(runs, || {
            links(&snapshot, &verdicts, &local).paths_from(&name(0), local.relay);
        });
        // An event: one node's link state changes, then meshd decides.
        let mut flip = 0usize;
        let event = median(runs, || {
            flip += 1;
            let who = 1 + flip % (n - 1);
            let node = &mut snapshot.nodes[who];
            match node.annotations.remove(UNREACHABLE) {
                Some(_) => {}
                None => {
                    node.annotations
                        .insert(UNREACHABLE.into(), name(if who == 1 { 2 } else { 1 }));
                }
            }
            let _ = decide_with(&snapshot, &mut memo);
        });
        rows.push(Row {
            nodes: n,
            down_links: down,
            relayed,
            pairwise,
            indexed,
            paths,
            full,
            event,
            peak_rss_mib: peak_rss_mib(),
        });
    }
    Ok(rows)
}

fn ms(d: Duration) -> String {
    if d.is_zero() {
        "(skipped)".into()
    } else {
        format!("{:.2}", d.as_secs_f64() * 1000.0)
    }
}

pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| nodes | links down | relayed from node-0 | verdicts, pairwise ms | verdicts, indexed ms | paths ms | full recompute ms | one event ms | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
            r.nodes,
            r.down_links,
            r.relayed,
            ms(r.pairwise),
            ms(r.indexed),
            ms(r.paths),
            ms(r.full),
            ms(r.event),
            r.peak_rss_mib
        ));
    }
    for r in rows.iter().filter(|r| !r.pairwise.is_zero()) {
        out.push_str(&format!(
            "\n{} nodes: indexed verdicts take {:.3} of the pairwise time",
            r.nodes,
            r.indexed.as_secs_f64() / r.pairwise.as_secs_f64()
        ));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_meshd::model::Verdict;

    #[test]
    fn the_synthetic_cluster_is_valid_and_has_its_cuts() {
        let snap = cluster(300, 450);
        let verdicts = judge(&snap, &ranges());
        assert!(verdicts.values().all(|v| matches!(v, Verdict::Accepted(_))));
        let reported: usize = verdicts
            .values()
            .map(|v| match v {
                Verdict::Accepted(c) => c.unreachable.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(reported, 450);
        let rows = run(&[300], 1.0, 1, 300, &mut |_| {}).unwrap();
        assert!(rows[0].relayed > 0 && !rows[0].pairwise.is_zero());
    }
}
