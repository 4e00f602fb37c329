//! `meshlab bench rotate`: what a key rotation costs the traffic through a
//! node. A pod on node-2 probes a pod on node-1 100 times a second (ICMP)
//! and streams TCP to it (iperf3, 100 Mbit/s) while `meshctl keys rotate`
//! rotates node-1, then every node (rolling). Three mechanisms in the same
//! run, each on a fresh lab:
//! - Weft's overlap (the default on Weft's device: both keys answered while
//!   peers move);
//! - the scheduled switch one-key devices use (kernel WireGuard,
//!   wireguard-go: everyone switches at a time announced 5 s ahead);
//! - the naive rotation (a new key at once; peers switch when they see it).
//!
//! Then what post-quantum preshared keys cost (`WEFT_POST_QUANTUM=prefer`,
//! a new key every 10 s): the same traffic for 30 s across node-1 and
//! node-2 on Weft's device and on wireguard-go, each against the same data
//! plane without them in the same run. (`meshlab --vm bench rotate`: the
//! `auto` rows are kernel WireGuard there.)

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::topology::{NodeDataplane, DEBIAN_WIREGUARD_GO};
use super::traffic::{self, Pair};
use super::{agents, mesh, preflight};

const LAB: &str = "bench-rot";
/// How long each measurement runs.
const SECONDS: u32 = 12;

/// One mechanism's cost for one scope of rotation.
pub struct Row {
    pub mechanism: &'static str,
    pub scope: String,
    pub traffic: traffic::Measured,
    /// What happened: how long `meshctl keys rotate` took, or how many
    /// preshared keys node-1 and node-2 went through.
    pub event: String,
}

/// The interval of the preshared-key rows, and how long they measure.
const PSK_INTERVAL: &str = "10s";
const PSK_SECONDS: u32 = 30;

/// The mechanisms compared, with the settings that select them.
fn mechanisms() -> [(&'static str, &'static [(&'static str, &'static str)]); 3] {
    [
        ("Weft overlap", &[]),
        (
            "scheduled switch (5 s lead)",
            &[
                ("WEFT_KEY_OVERLAP", "never"),
                ("WEFT_KEY_SWITCH_LEAD", "5s"),
            ],
        ),
        (
            "naive (switch when seen)",
            &[
                ("WEFT_KEY_OVERLAP", "never"),
                ("WEFT_KEY_SWITCH_LEAD", "0s"),
            ],
        ),
    ]
}

pub fn run(root: &Path, nodes: usize, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    preflight::require_tools(&[("iperf3", "iperf3")])?;
    let meshctl = agents::sibling("meshctl")?;
    let mut rows = Vec::new();
    for (mechanism, config) in mechanisms() {
        progress(&format!("{mechanism}: a {nodes}-node lab"));
        let result = traffic::in_lab(root, LAB, nodes, config, None, |dir, state| {
            let (client, server) = (
                traffic::pod(state, "pod-2-1")?,
                traffic::pod(state, "pod-1-1")?,
            );
            let target = server.ips[0].clone();
            let kubeconfig = dir.kubeconfig();
            let mut out = Vec::new();
            let all_at_once = nodes.to_string();
            for (scope, args) in [
                ("node-1".to_string(), vec!["node-1"]),
                (format!("all {nodes}, rolling"), vec!["--all"]),
                (
                    format!("all {nodes} at once"),
                    vec!["--all", "--parallel", &all_at_once],
                ),
            ] {
                progress(&format!("{mechanism}: rotating {scope}"));
                let pair = Pair {
                    client: &client.netns,
                    server: &server.netns,
                    target: &target,
                };
                let (m, took) = traffic::measure(&pair, SECONDS, || {
                    let started = Instant::now();
                    let mut c = Command::new(&meshctl);
                    c.arg("--kubeconfig")
                        .arg(&kubeconfig)
                        .args(["keys", "rotate"])
                        .args(&args);
                    let out = c.output().context("running meshctl")?;
                    if !out.status.success() {
                        bail!(
                            "meshctl keys rotate: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                    Ok(started.elapsed())
                })?;
                out.push(Row {
                    mechanism,
                    scope,
                    traffic: m,
                    event: format!("rotation took {:.1} s", took.as_secs_f64()),
                });
            }
            Ok(out)
        });
        rows.extend(result.with_context(|| mechanism.to_string())?);
    }
    rows.extend(preshared_keys(root, progress)?);
    Ok(rows)
}

/// Traffic across node-1 and node-2 while their preshared key changes
/// every [`PSK_INTERVAL`], against the same data plane without one.
pub fn preshared_keys(root: &Path, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let data_planes = [
        ("auto", None),
        (
            "wireguard-go",
            Some(NodeDataplane::Program(DEBIAN_WIREGUARD_GO.to_string())),
        ),
    ];
    for (plane, dataplane) in data_planes {
        for (mechanism, config) in [
            ("no preshared key", &[][..]),
            (
                "post-quantum key every 10 s",
                &[
                    ("WEFT_POST_QUANTUM", "prefer"),
                    ("WEFT_POST_QUANTUM_INTERVAL", PSK_INTERVAL),
                ][..],
            ),
        ] {
            progress(&format!("{mechanism} on {plane}: a 2-node lab"));
            let row = traffic::in_lab(root, LAB, 2, config, dataplane.clone(), |_, state| {
                let (client, server) = (
                    traffic::pod(state, "pod-2-1")?,
                    traffic::pod(state, "pod-1-1")?,
                );
                let node = state
                    .plan
                    .nodes
                    .iter()
                    .find(|n| n.name == "node-1")
                    .context("no node-1")?;
                let pair = Pair {
                    client: &client.netns,
                    server: &server.netns,
                    target: &server.ips[0],
                };
                // node-1's key for node-2, read through the window: each
                // change counted.
                let key = || -> Option<String> {
                    mesh::read(node)?
                        .1
                        .into_iter()
                        .find_map(|p| p.preshared_key_fingerprint)
                };
                let (m, keys) = traffic::measure(&pair, PSK_SECONDS, || {
                    let until = Instant::now() + Duration::from_secs(u64::from(PSK_SECONDS) - 4);
                    let mut seen: Vec<String> = Vec::new();
                    while Instant::now() < until {
                        if let Some(k) = key().filter(|k| seen.last() != Some(k)) {
                            seen.push(k);
                        }
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    Ok(seen.len())
                })?;
                Ok(Row {
                    mechanism,
                    scope: plane.to_string(),
                    traffic: m,
                    event: format!("{keys} keys in {} s", PSK_SECONDS - 4),
                })
            })
            .with_context(|| format!("{mechanism} on {plane}"))?;
            rows.push(row);
        }
    }
    Ok(rows)
}

pub fn table(rows: &[Row]) -> String {
    let mut out = vec![[
        "mechanism",
        "rotated / data plane",
        "probes lost",
        "longest gap",
        "TCP retransmits",
        "event",
    ]
    .map(String::from)];
    for r in rows {
        out.push([
            r.mechanism.to_string(),
            r.scope.clone(),
            format!("{} of {}", r.traffic.lost, r.traffic.sent),
            format!("{} ms", r.traffic.longest_gap.as_millis()),
            r.traffic.retransmits.to_string(),
            r.event.clone(),
        ]);
    }
    weft_meshd::table::render(&out)
}
