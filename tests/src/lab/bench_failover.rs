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
        let result = traffic::in_lab(root, LAB, 4, config, None, |dir, state| {
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

/// One row per timer set and event, in the order first run; each figure
/// the range over the runs (`min–max`, or one value).
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
    let mut events: Vec<(&str, &str)> = Vec::new();
    for r in rows {
        if !events.contains(&(r.timers, r.event)) {
            events.push((r.timers, r.event));
        }
    }
    for (timers, event) in events {
        let runs: Vec<&Row> = rows
            .iter()
            .filter(|r| r.timers == timers && r.event == event)
            .collect();
        let sent = runs.iter().map(|r| r.traffic.sent).max().unwrap_or(0);
        out.push([
            timers.to_string(),
            event.to_string(),
            range(
                &runs,
                |r| r.rerouted.as_secs_f64(),
                |v| format!("{v:.2}"),
                " s",
            ),
            range(
                &runs,
                |r| r.traffic.longest_gap.as_millis() as f64,
                |v| format!("{v:.0}"),
                " ms",
            ),
            format!(
                "{} of {sent}",
                range(
                    &runs,
                    |r| f64::from(r.traffic.lost),
                    |v| format!("{v:.0}"),
                    ""
                )
            ),
            range(
                &runs,
                |r| r.traffic.retransmits as f64,
                |v| format!("{v:.0}"),
                "",
            ),
        ]);
    }
    weft_meshd::table::render(&out)
}

/// `min–max` of `value` over `runs` (one value when they agree), shown
/// with `show` and `unit`.
fn range(
    runs: &[&Row],
    value: impl Fn(&Row) -> f64,
    show: impl Fn(f64) -> String,
    unit: &str,
) -> String {
    let values = runs.iter().map(|r| value(r));
    let min = values.clone().fold(f64::INFINITY, f64::min);
    let max = values.fold(f64::NEG_INFINITY, f64::max);
    match show(min) == show(max) {
        true => format!("{}{unit}", show(min)),
        false => format!("{}–{}{unit}", show(min), show(max)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_shown_as_ranges_per_event() {
        let row = |event, rerouted_ms: u64, lost: u32| Row {
            timers: "shipped",
            event,
            rerouted: Duration::from_millis(rerouted_ms),
            traffic: Measured {
                sent: 3500,
                lost,
                longest_gap: Duration::from_millis(u64::from(lost) * 10),
                retransmits: 100,
            },
        };
        let rows = [
            row("link cut -> relayed", 1750, 103),
            row("relay killed -> next relay", 1740, 102),
            row("link cut -> relayed", 1760, 107),
            row("relay killed -> next relay", 1740, 102),
        ];
        let table = table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[1].contains("link cut -> relayed"), "{table}");
        assert!(lines[1].contains("1.75–1.76 s"), "{table}");
        assert!(lines[1].contains("1030–1070 ms"), "{table}");
        assert!(lines[1].contains("103–107 of 3500"), "{table}");
        assert!(lines[2].contains("1.74 s"), "{table}");
        assert!(lines[2].contains(" 100"), "{table}");
    }
}
