//! `meshlab bench failover`: how long a pair of pods is cut off when the
//! link between their nodes fails, when it comes back, and when the relay
//! carrying them dies — with the shipped timers and with the lab's fast
//! ones, in the same run. A pod on node-1 probes a pod on node-3 100 times
//! a second and streams TCP to it (iperf3, 100 Mbit/s) through each event
//! on a 4-node lab; "rerouted" is when both ends' devices put the other's
//! pod CIDR on the new carrier, read from the devices every 50 ms.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::state::LabDir;
use super::topology::NodePlan;
use super::traffic::{self, Measured, Pair};
use super::{agents, lifecycle, mesh, netns, preflight};

const LAB: &str = "bench-fail";
/// The measured pair: pod-1-1 on A streams to pod-3-1 on B.
const A: &str = "node-1";
const B: &str = "node-3";

/// One event's cost with one set of timers.
pub struct Row {
    pub timers: &'static str,
    pub event: &'static str,
    /// From the event until both ends carry the pair on the new path.
    pub rerouted: Duration,
    pub traffic: Measured,
}

/// A set of timers compared: its name, the settings that select it, and
/// how long each event may take to be acted on.
struct TimerSet {
    name: &'static str,
    config: &'static [(&'static str, &'static str)],
    limit: Duration,
}

const TIMER_SETS: [TimerSet; 2] = [
    TimerSet {
        name: "shipped (keepalive 10 s, timeout 30 s, probe 1 s)",
        config: &[
            ("WEFT_PERSISTENT_KEEPALIVE", "10"),
            ("WEFT_PEER_TIMEOUT", "30"),
            ("WEFT_PROBE_TIMEOUT", "1s"),
        ],
        limit: Duration::from_secs(60),
    },
    TimerSet {
        name: "lab (keepalive 1 s, timeout 5 s, probe 1 s)",
        config: &[
            ("WEFT_PERSISTENT_KEEPALIVE", "1"),
            ("WEFT_PEER_TIMEOUT", "5"),
            ("WEFT_PROBE_TIMEOUT", "1s"),
        ],
        limit: Duration::from_secs(20),
    },
];

/// Which node's peer holds `target`'s first pod CIDR on `at`'s device.
fn carrier(at: &NodePlan, target: &NodePlan, keys: &BTreeMap<String, String>) -> Option<String> {
    let cidr = target.pod_cidrs.first()?.to_string();
    let (_, peers) = mesh::read(at)?;
    let peer = peers.iter().find(|p| p.allowed_ips.contains(&cidr))?;
    keys.get(&peer.public_key).cloned()
}

/// Waits until both ends carry each other on a node `wanted` accepts;
/// returns the carrier `a` uses.
fn wait_carried(
    nodes: &Nodes,
    limit: Duration,
    what: &str,
    wanted: impl Fn(&str) -> bool,
) -> Result<String> {
    let deadline = Instant::now() + super::scaled(limit);
    loop {
        let there = carrier(&nodes.a, &nodes.b, &nodes.keys);
        let back = carrier(&nodes.b, &nodes.a, &nodes.keys);
        if let (Some(there), Some(back)) = (&there, &back) {
            if wanted(there) && wanted(back) {
                return Ok(there.clone());
            }
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?} ({A} -> {there:?}, {B} -> {back:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The measured pair's nodes, and every node by its public key.
struct Nodes {
    a: NodePlan,
    b: NodePlan,
    all: Vec<NodePlan>,
    keys: BTreeMap<String, String>,
}

/// A node dies as far as the mesh can tell: its meshd and its data plane
/// are killed (a kernel link, which outlives them, is deleted).
fn kill_node(dir: &LabDir, node: &NodePlan) -> Result<()> {
    for container in [agents::MESHD, "dataplane"] {
        if let Some(pid) = agents::container_pid(dir, node, container) {
            kill(Pid::from_raw(pid), Signal::SIGKILL)
                .with_context(|| format!("killing {}'s {container}", node.name))?;
        }
    }
    if mesh::read(node).is_some() {
        let _ = netns::ip(&["-n", &node.netns, "link", "del", &node.wg_interface]);
    }
    Ok(())
}

pub fn run(root: &Path, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    preflight::require_tools(&[("iperf3", "iperf3")])?;
    let mut rows = Vec::new();
    for TimerSet {
        name: timers,
        config,
        limit,
    } in TIMER_SETS
    {
        progress(&format!("{timers}: a 4-node lab"));
        let result = traffic::in_lab(root, LAB, 4, config, |dir, state| {
            let node = |name: &str| {
                state
                    .plan
                    .nodes
                    .iter()
                    .find(|n| n.name == name)
                    .cloned()
                    .with_context(|| format!("no {name}"))
            };
            let keys = state
                .plan
                .nodes
                .iter()
                .filter_map(|n| Some((mesh::read(n)?.0, n.name.clone())))
                .collect();
            let nodes = Nodes {
                a: node(A)?,
                b: node(B)?,
                all: state.plan.nodes.clone(),
                keys,
            };
            let (client, server) = (
                traffic::pod(state, "pod-1-1")?,
                traffic::pod(state, "pod-3-1")?,
            );
            let pair = Pair {
                client: &client.netns,
                server: &server.netns,
                target: &server.ips[0],
            };
            let seconds = limit.as_secs() as u32 / 2 + 5;
            let relayed = |c: &str| c != A && c != B;
            let mut out = Vec::new();
            let mut row = |event, (traffic, rerouted)| {
                out.push(Row {
                    timers,
                    event,
                    rerouted,
                    traffic,
                })
            };

            progress(&format!("{timers}: cutting {A}-{B}"));
            row(
                "link cut -> relayed",
                traffic::measure(&pair, seconds, || {
                    let t = Instant::now();
                    lifecycle::set_link(dir, A, B, true)?;
                    wait_carried(&nodes, limit, "relayed", relayed)?;
                    Ok(t.elapsed())
                })?,
            );
            progress(&format!("{timers}: restoring {A}-{B}"));
            row(
                "link restored -> direct",
                traffic::measure(&pair, seconds + limit.as_secs() as u32, || {
                    let t = Instant::now();
                    lifecycle::set_link(dir, A, B, false)?;
                    wait_carried(&nodes, limit * 2, "direct", |c| !relayed(c))?;
                    Ok(t.elapsed())
                })?,
            );
            lifecycle::set_link(dir, A, B, true)?;
            let relay = wait_carried(&nodes, limit, "relayed", relayed)?;
            let dead = nodes
                .all
                .iter()
                .find(|n| n.name == relay)
                .with_context(|| format!("no {relay}"))?;
            progress(&format!("{timers}: killing the relay {relay}"));
            row(
                "relay killed -> next relay",
                traffic::measure(&pair, seconds, || {
                    let t = Instant::now();
                    kill_node(dir, dead)?;
                    wait_carried(&nodes, limit, "the next relay", |c| {
                        relayed(c) && c != relay
                    })?;
                    Ok(t.elapsed())
                })?,
            );
            Ok(out)
        });
        rows.extend(result.with_context(|| timers.to_string())?);
    }
    Ok(rows)
}

pub fn table(rows: &[Row]) -> String {
    let mut out = vec![[
        "timers",
        "event",
        "rerouted (both ends)",
        "longest gap",
        "probes lost",
        "TCP retransmits",
    ]
    .map(String::from)];
    for r in rows {
        out.push([
            r.timers.to_string(),
            r.event.to_string(),
            format!("{:.2} s", r.rerouted.as_secs_f64()),
            format!("{} ms", r.traffic.longest_gap.as_millis()),
            format!("{} of {}", r.traffic.lost, r.traffic.sent),
            r.traffic.retransmits.to_string(),
        ]);
    }
    weft_meshd::table::render(&out)
}
