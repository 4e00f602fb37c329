//! `meshlab bench throughput`: iperf3 between two lab nodes, through Weft's
//! userspace data plane, through Debian's wireguard-go configured the same
//! way by meshd, and over the raw underlay veth, all in one run so the
//! numbers compare (absolute figures drift between runs on shared CPUs).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::state::LabDir;
use super::topology::LabSpec;
use super::{lifecycle, preflight};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ThroughputSpec {
    pub runs: usize,
    pub seconds: u32,
    pub streams: Vec<u32>,
}

/// One measured path.
#[derive(Debug, Clone)]
pub struct Row {
    pub path: &'static str,
    pub streams: u32,
    /// Gbit/s of each run, in order.
    pub runs: Vec<f64>,
}

impl Row {
    pub fn median(&self) -> f64 {
        let mut v = self.runs.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

const WEFT: &str = "weft (boringtun)";
const WIREGUARD_GO: &str = "wireguard-go (Debian)";
const UNDERLAY: &str = "raw underlay veth";

/// Runs every measurement; each path gets its own lab, torn down after.
pub fn throughput(
    root: &std::path::Path,
    spec: &ThroughputSpec,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Row>> {
    preflight::require_tools(&[("iperf3", "iperf3")])?;
    let mut rows = Vec::new();
    for (path, lab, wireguard_go) in [
        (WEFT, "bench-weft", false),
        (WIREGUARD_GO, "bench-wggo", true),
    ] {
        let dir = LabDir::new(root, lab);
        let nodes = LabSpec {
            name: lab.into(),
            nodes: 2,
            wireguard_go: if wireguard_go {
                vec!["node-1".into(), "node-2".into()]
            } else {
                vec![]
            },
            ..LabSpec::default()
        };
        let state = lifecycle::up(&dir, &nodes, &mut |_| {})?;
        let result = (|| -> Result<Vec<Row>> {
            let server = &state.plan.nodes[1];
            let target = weft_ipam::gateway(&server.pod_cidrs[0]).to_string();
            let mut measured = measure(
                &state.plan.nodes[0].netns,
                &server.netns,
                &target,
                path,
                spec,
                progress,
            )?;
            if !wireguard_go {
                let underlay = server.underlay.to_string();
                measured.extend(measure(
                    &state.plan.nodes[0].netns,
                    &server.netns,
                    &underlay,
                    UNDERLAY,
                    spec,
                    progress,
                )?);
            }
            Ok(measured)
        })();
        lifecycle::down(&dir)?;
        rows.extend(result?);
    }
    Ok(rows)
}

fn measure(
    client_ns: &str,
    server_ns: &str,
    target: &str,
    path: &'static str,
    spec: &ThroughputSpec,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Row>> {
    let mut server = start_server(server_ns, target)?;
    let result = (|| -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        for &streams in &spec.streams {
            let mut row = Row {
                path,
                streams,
                runs: Vec::new(),
            };
            for run in 1..=spec.runs {
                let gbps = client(client_ns, target, streams, spec.seconds)?;
                progress(&format!(
                    "{path}, {streams} stream(s), run {run}/{}: {gbps:.2} Gbit/s",
                    spec.runs
                ));
                row.runs.push(gbps);
            }
            rows.push(row);
        }
        Ok(rows)
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

fn start_server(netns: &str, bind: &str) -> Result<Child> {
    let child = Command::new("ip")
        .args(["netns", "exec", netns, "iperf3", "-s", "-B", bind])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(child)
}

/// Receiver-side Gbit/s of one iperf3 run.
fn client(netns: &str, target: &str, streams: u32, seconds: u32) -> Result<f64> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "iperf3", "-J", "-c", target])
        .args(["-P", &streams.to_string(), "-t", &seconds.to_string()])
        .output()
        .context("running iperf3 -c")?;
    let report: Value = serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
    if let Some(err) = report["error"].as_str() {
        bail!("iperf3 to {target}: {err}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 reported no throughput")
}

/// The results as a Markdown table, with Weft / wireguard-go per stream count.
pub fn table(rows: &[Row]) -> String {
    let mut out =
        String::from("| path | streams | median Gbit/s | runs (Gbit/s) |\n|---|---|---|---|\n");
    for r in rows {
        let runs: Vec<String> = r.runs.iter().map(|g| format!("{g:.2}")).collect();
        out.push_str(&format!(
            "| {} | {} | {:.2} | {} |\n",
            r.path,
            r.streams,
            r.median(),
            runs.join(", ")
        ));
    }
    out.push('\n');
    let median = |path: &str, streams: u32| {
        rows.iter()
            .find(|r| r.path == path && r.streams == streams)
            .map(Row::median)
    };
    let streams: std::collections::BTreeSet<u32> = rows.iter().map(|r| r.streams).collect();
    for s in streams {
        if let (Some(w), Some(g)) = (median(WEFT, s), median(WIREGUARD_GO, s)) {
            out.push_str(&format!(
                "Weft / wireguard-go, {s} stream(s): {:.2}\n",
                w / g
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_ratio() {
        let rows = vec![
            Row {
                path: WEFT,
                streams: 1,
                runs: vec![1.0, 3.0, 2.0],
            },
            Row {
                path: WIREGUARD_GO,
                streams: 1,
                runs: vec![4.0, 4.0, 1.0],
            },
            Row {
                path: UNDERLAY,
                streams: 1,
                runs: vec![9.0],
            },
        ];
        assert_eq!(rows[0].median(), 2.0);
        let t = table(&rows);
        assert!(
            t.contains("| weft (boringtun) | 1 | 2.00 | 1.00, 3.00, 2.00 |"),
            "{t}"
        );
        assert_eq!(
            t.matches("Weft / wireguard-go, 1 stream(s): 0.50").count(),
            1,
            "{t}"
        );
    }
}
