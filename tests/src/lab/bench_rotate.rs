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

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::state::LabDir;
use super::topology::LabSpec;
use super::{agents, lifecycle, preflight};

const LAB: &str = "bench-rot";
/// Probes a second, and how long each measurement runs.
const PROBE_HZ: u32 = 100;
const SECONDS: u32 = 12;

/// One mechanism's cost for one scope of rotation.
pub struct Row {
    pub mechanism: &'static str,
    pub scope: String,
    pub sent: u32,
    pub lost: u32,
    /// The longest run of lost probes, as time.
    pub longest_gap: Duration,
    pub retransmits: u64,
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
        let dir = LabDir::new(root, LAB);
        let spec = LabSpec {
            name: LAB.into(),
            nodes,
            pods_per_node: 1,
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..LabSpec::default()
        };
        progress(&format!("{mechanism}: a {nodes}-node lab"));
        let result = (|| -> Result<Vec<Row>> {
            let state = lifecycle::up(&dir, &spec, &mut |_| {})?;
            let pod = |name: &str| {
                state
                    .pods
                    .iter()
                    .find(|p| p.name == name)
                    .with_context(|| format!("no pod {name}"))
            };
            let (client, server) = (pod("pod-2-1")?, pod("pod-1-1")?);
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
                let measured = measure(&client.netns, &server.netns, &target, || {
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
                    ..measured
                });
            }
            Ok(out)
        })();
        lifecycle::down(&dir)?;
        rows.extend(result.with_context(|| mechanism.to_string())?);
    }
    Ok(rows)
}

fn in_netns(netns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns]).args(args);
    c
}

fn spawn(mut c: Command) -> Result<Child> {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting a probe")
}

fn finish(child: Child) -> Result<Output> {
    child.wait_with_output().context("waiting for a probe")
}

/// Probes and streams for [`SECONDS`], rotating two seconds in.
fn measure(
    client: &str,
    server: &str,
    target: &str,
    rotate: impl FnOnce() -> Result<Duration>,
) -> Result<Row> {
    let mut iperf_server = spawn(in_netns(server, &["iperf3", "-s", "-1"]))?;
    std::thread::sleep(Duration::from_millis(300));
    let sent = SECONDS * PROBE_HZ;
    let interval = format!("{:.3}", 1.0 / f64::from(PROBE_HZ));
    let ping = spawn(in_netns(
        client,
        &[
            "ping",
            "-n",
            "-c",
            &sent.to_string(),
            "-i",
            &interval,
            "-W",
            "1",
            target,
        ],
    ))?;
    let t = SECONDS.to_string();
    let stream = spawn(in_netns(
        client,
        &["iperf3", "-J", "-c", target, "-t", &t, "-b", "100M"],
    ))?;
    std::thread::sleep(Duration::from_secs(2));
    let took = rotate();
    let ping = finish(ping)?;
    let stream = finish(stream)?;
    let _ = iperf_server.kill();
    let _ = iperf_server.wait();
    let took = took?;
    let report: Value = serde_json::from_slice(&stream.stdout).unwrap_or(Value::Null);
    if !report["error"].is_null() || !stream.status.success() {
        bail!("the TCP stream failed (reset?): {}", report["error"]);
    }
    let answered = answered(&String::from_utf8_lossy(&ping.stdout));
    let (lost, longest) = losses(&answered, sent);
    Ok(Row {
        mechanism: "",
        scope: String::new(),
        sent,
        lost,
        longest_gap: Duration::from_secs_f64(f64::from(longest) / f64::from(PROBE_HZ)),
        retransmits: report["end"]["sum_sent"]["retransmits"]
            .as_u64()
            .unwrap_or(0),
        took,
    })
}

/// The sequence numbers ping reports replies for.
fn answered(ping_output: &str) -> BTreeSet<u32> {
    ping_output
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("icmp_seq="))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// (probes lost, longest run of consecutive losses) of `sent` probes
/// numbered from 1.
fn losses(answered: &BTreeSet<u32>, sent: u32) -> (u32, u32) {
    let (mut lost, mut run, mut longest) = (0, 0, 0);
    for seq in 1..=sent {
        if answered.contains(&seq) {
            run = 0;
        } else {
            lost += 1;
            run += 1;
            longest = longest.max(run);
        }
    }
    (lost, longest)
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
            format!("{} of {}", r.lost, r.sent),
            format!("{} ms", r.longest_gap.as_millis()),
            r.retransmits.to_string(),
            format!("{:.1} s", r.took.as_secs_f64()),
        ]);
    }
    weft_meshd::table::render(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_count_runs_of_missing_sequence_numbers() {
        let output = "64 bytes from 198.19.1.2: icmp_seq=1 ttl=62\n64 bytes from 198.19.1.2: icmp_seq=4 ttl=62\n64 bytes from 198.19.1.2: icmp_seq=5 ttl=62";
        let got = answered(output);
        assert_eq!(got, BTreeSet::from([1, 4, 5]));
        assert_eq!(losses(&got, 8), (5, 3), "2-3 and 6-8 are lost");
        assert_eq!(losses(&got, 5), (2, 2));
    }
}
