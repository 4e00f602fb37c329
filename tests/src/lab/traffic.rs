//! What an event costs the traffic between two pods: one pod probes the
//! other 100 times a second (ICMP) and streams TCP to it (iperf3, 100
//! Mbit/s) while the event happens. Used by the benchmarks that break or
//! change the mesh under load (`bench rotate`, `bench failover`).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::lifecycle;
use super::pods::PodRecord;
use super::state::{LabDir, LabState};
use super::topology::{LabSpec, NodeDataplane};

/// Probes a second.
const PROBE_HZ: u32 = 100;
/// How long the traffic runs before the event.
const LEAD: Duration = Duration::from_secs(2);

/// What the traffic saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    pub sent: u32,
    pub lost: u32,
    /// The longest run of lost probes, as time: the outage.
    pub longest_gap: Duration,
    pub retransmits: u64,
}

/// The two pods' network namespaces and the address probed.
pub struct Pair<'a> {
    pub client: &'a str,
    pub server: &'a str,
    pub target: &'a str,
}

/// A lab of its own for one measurement: `nodes` nodes with a pod each,
/// `config` in the manifests' ConfigMap and `dataplane` on every node
/// (`None`: what `auto` picks), brought up, handed to `f`, and removed even
/// when `f` fails.
pub fn in_lab<T>(
    root: &Path,
    name: &str,
    nodes: usize,
    config: &[(&str, &str)],
    dataplane: Option<NodeDataplane>,
    f: impl FnOnce(&LabDir, &LabState) -> Result<T>,
) -> Result<T> {
    let dir = LabDir::new(root, name);
    let spec = LabSpec {
        name: name.into(),
        nodes,
        dataplanes: dataplane
            .map(|d| {
                (1..=nodes)
                    .map(|i| (format!("node-{i}"), d.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        pods_per_node: 1,
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..LabSpec::default()
    };
    let result = lifecycle::up(&dir, &spec, &mut |_| {}).and_then(|state| f(&dir, &state));
    lifecycle::down(&dir)?;
    result
}

/// The lab's pod `name`.
pub fn pod<'a>(state: &'a LabState, name: &str) -> Result<&'a PodRecord> {
    state
        .pods
        .iter()
        .find(|p| p.name == name)
        .with_context(|| format!("no pod {name}"))
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

/// Probes and streams for `seconds`, running `event` two seconds in; fails
/// if the TCP stream did not survive (a reset, or no connection).
pub fn measure<T>(
    pair: &Pair,
    seconds: u32,
    event: impl FnOnce() -> Result<T>,
) -> Result<(Measured, T)> {
    let mut iperf_server = spawn(in_netns(pair.server, &["iperf3", "-s", "-1"]))?;
    std::thread::sleep(super::scaled(Duration::from_millis(300)));
    let sent = seconds * PROBE_HZ;
    let interval = format!("{:.3}", 1.0 / f64::from(PROBE_HZ));
    let ping = spawn(in_netns(
        pair.client,
        &[
            "ping",
            "-n",
            "-c",
            &sent.to_string(),
            "-i",
            &interval,
            "-W",
            "1",
            pair.target,
        ],
    ))?;
    let t = seconds.to_string();
    let stream = spawn(in_netns(
        pair.client,
        &["iperf3", "-J", "-c", pair.target, "-t", &t, "-b", "100M"],
    ))?;
    std::thread::sleep(LEAD);
    let outcome = event();
    let ping = finish(ping)?;
    let stream = finish(stream)?;
    let _ = iperf_server.kill();
    let _ = iperf_server.wait();
    let outcome = outcome?;
    let report: Value = serde_json::from_slice(&stream.stdout).unwrap_or(Value::Null);
    if !report["error"].is_null() || !stream.status.success() {
        bail!("the TCP stream failed (reset?): {}", report["error"]);
    }
    let answered = answered(&String::from_utf8_lossy(&ping.stdout));
    let (lost, longest) = losses(&answered, sent);
    let measured = Measured {
        sent,
        lost,
        longest_gap: Duration::from_secs_f64(f64::from(longest) / f64::from(PROBE_HZ)),
        retransmits: report["end"]["sum_sent"]["retransmits"]
            .as_u64()
            .unwrap_or(0),
    };
    Ok((measured, outcome))
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
