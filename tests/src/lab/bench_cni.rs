//! `meshlab bench cni`: ADD and DEL latency of the `weft` plugin against
//! Debian's reference bridge + host-local, both dual-stack, measured in one
//! run from inside the same node namespace, cycle by cycle in turn. Each
//! cycle: a fresh pod namespace (not timed), ADD (timed), DEL (timed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{agents, netns, preflight};

/// Where Debian's containernetworking-plugins are installed.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
const LAB: &str = "bench-cni";

/// One plugin's latencies.
pub struct Latencies {
    pub plugin: &'static str,
    pub add: Vec<Duration>,
    pub del: Vec<Duration>,
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `cycles` ADD/DEL cycles of both plugins.
pub fn run(cycles: usize, progress: &mut dyn FnMut(&str)) -> Result<Vec<Latencies>> {
    preflight::require_root()?;
    if !Path::new(REFERENCE_PLUGINS).join("bridge").is_file() {
        bail!("the reference plugins are missing: apt-get install containernetworking-plugins (or run tests/setup)");
    }
    let node = format!("{LAB}-node-1");
    cleanup();
    netns::ip(&["netns", "add", &node])?;
    let work = tempdir()?;
    let result = (|| -> Result<Vec<Latencies>> {
        std::fs::write(
            work.join("node.json"),
            json!({"version": 1, "podCIDRs": ["198.19.8.0/24", "fd98:19:0:8::/64"], "mtu": 1420})
                .to_string(),
        )?;
        // No meshd here: the plugin alone is measured, with NetworkPolicy
        // enforcement as meshd publishes it once loaded.
        std::fs::write(
            weft_ipam::PolicyState::path_beside(&work.join("node.json")),
            weft_ipam::PolicyState::Loaded.to_bytes(),
        )?;
        let weft_conf = json!({"cniVersion": "1.0.0", "name": "weft", "type": "weft",
                               "stateFile": work.join("node.json"), "ipamDir": work.join("weft-ipam")});
        let reference_conf = json!({"cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "cni0",
                                    "isGateway": true, "ipMasq": false,
                                    "ipam": {"type": "host-local", "dataDir": work.join("host-local"),
                                             "ranges": [[{"subnet": "198.19.9.0/24"}], [{"subnet": "fd98:19:0:9::/64"}]]}});
        let weft = agents::plugin()?;
        let plugins = [
            ("weft", weft, weft_conf),
            (
                "bridge+host-local",
                Path::new(REFERENCE_PLUGINS).join("bridge"),
                reference_conf,
            ),
        ];
        let mut out: Vec<Latencies> = plugins
            .iter()
            .map(|(plugin, _, _)| Latencies {
                plugin,
                add: Vec::new(),
                del: Vec::new(),
            })
            .collect();
        // Interleaved, cycle by cycle: both plugins see the same machine.
        for i in 0..cycles {
            for ((plugin, binary, conf), l) in plugins.iter().zip(&mut out) {
                let pod = format!("{LAB}-pod-{i}");
                netns::ip(&["netns", "add", &pod])?;
                let container = format!(
                    "bench{i}-{}",
                    plugin
                        .split(|c: char| !c.is_ascii_alphanumeric())
                        .next()
                        .unwrap_or("p")
                );
                l.add
                    .push(invoke(&node, binary, "ADD", &container, &pod, conf)?);
                l.del
                    .push(invoke(&node, binary, "DEL", &container, &pod, conf)?);
                netns::delete(&pod)?;
            }
        }
        for l in &out {
            progress(&format!(
                "{}: {cycles} ADD/DEL cycles, ADD median {:.2} ms",
                l.plugin,
                ms(percentile(&l.add, 0.5))
            ));
        }
        Ok(out)
    })();
    cleanup();
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("meshlab-bench-cni-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn cleanup() {
    for ns in netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{LAB}-")))
    {
        let _ = netns::delete(&ns);
    }
}

/// One plugin invocation from inside the node's namespace, timed from spawn
/// to exit (what a runtime waits for).
fn invoke(
    node: &str,
    binary: &Path,
    command: &str,
    container: &str,
    pod: &str,
    conf: &Value,
) -> Result<Duration> {
    let (binary, command, container, pod, conf) = (
        binary.to_path_buf(),
        command.to_string(),
        container.to_string(),
        pod.to_string(),
        conf.to_string(),
    );
    netns::run_in(node, move || {
        let started = Instant::now();
        let mut child = Command::new(&binary)
            .env_clear()
            .env("CNI_COMMAND", &command)
            .env("CNI_CONTAINERID", &container)
            .env("CNI_NETNS", format!("/run/netns/{pod}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", REFERENCE_PLUGINS)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", binary.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(conf.as_bytes())?;
        let out = child.wait_with_output()?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "{} {command} failed: {}",
                binary.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(took)
    })
}

/// A Markdown table with medians, p99 and the ratio weft / reference.
pub fn table(results: &[Latencies]) -> String {
    let mut out = String::from("| plugin | cycles | ADD median ms | ADD p99 ms | DEL median ms | DEL p99 ms |\n|---|---|---|---|---|---|\n");
    for l in results {
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            l.plugin,
            l.add.len(),
            ms(percentile(&l.add, 0.5)),
            ms(percentile(&l.add, 0.99)),
            ms(percentile(&l.del, 0.5)),
            ms(percentile(&l.del, 0.99))
        ));
    }
    if let [weft, reference] = results {
        out.push_str(&format!(
            "\nweft / bridge+host-local: ADD median {:.2}, DEL median {:.2}\n",
            ms(percentile(&weft.add, 0.5)) / ms(percentile(&reference.add, 0.5)),
            ms(percentile(&weft.del, 0.5)) / ms(percentile(&reference.del, 0.5))
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_ratio() {
        let d = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        let weft = Latencies {
            plugin: "weft",
            add: d(&[2, 1, 3]),
            del: d(&[1, 1, 1]),
        };
        let reference = Latencies {
            plugin: "ref",
            add: d(&[8, 4, 6]),
            del: d(&[2, 2, 2]),
        };
        assert_eq!(percentile(&weft.add, 0.5), Duration::from_millis(2));
        assert_eq!(percentile(&reference.add, 0.99), Duration::from_millis(8));
        let t = table(&[weft, reference]);
        assert!(t.contains("ADD median 0.33, DEL median 0.50"), "{t}");
    }
}
