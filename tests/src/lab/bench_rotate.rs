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

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::traffic::{self, Pair};
use super::{agents, preflight};

const LAB: &str = "bench-rot";
/// How long each measurement runs.
const SECONDS: u32 = 12;

/// One mechanism's cost for one scope of rotation.
pub struct Row {
    pub mechanism: &'static str,
    pub scope: String,
    pub traffic: traffic::Measured,
    /// How long `meshctl keys rotate` took.
    pub took: Duration,
}

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
        let result = traffic::in_lab(root, LAB, nodes, config, |dir, state| {
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
                    took,
                });
            }
            Ok(out)
        });
        rows.extend(result.with_context(|| mechanism.to_string())?);
    }
    Ok(rows)
}

pub fn table(rows: &[Row]) -> String {
    let mut out = vec![[
        "mechanism",
        "rotated",
        "probes lost",
        "longest gap",
        "TCP retransmits",
        "rotation took",
    ]
    .map(String::from)];
    for r in rows {
        out.push([
            r.mechanism.to_string(),
            r.scope.clone(),
            format!("{} of {}", r.traffic.lost, r.traffic.sent),
            format!("{} ms", r.traffic.longest_gap.as_millis()),
            r.traffic.retransmits.to_string(),
            format!("{:.1} s", r.took.as_secs_f64()),
        ]);
    }
    weft_meshd::table::render(&out)
}
