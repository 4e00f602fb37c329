//! The real `meshd` on every lab node: started inside the node's namespace,
//! pointed at the node kubeconfig (the same kube-rs path as in production),
//! detached so it outlives `meshlab up`, found again through its pid file.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::netns;
use super::state::{process_alive, write_atomic, LabDir};
use super::topology::{NodePlan, CLUSTER_V4, CLUSTER_V6, MESH_V4, MESH_V6};

/// Keepalive in the lab: short, so that handshakes happen at once and
/// liveness is observable in tests.
const KEEPALIVE_SECS: &str = "5";
/// Resync more often than in production, so tests see resyncs change nothing.
const RESYNC_SECS: &str = "10";
/// Deleted nodes' self-allocated blocks are reusable soon (tests watch it).
const BLOCK_GRACE_SECS: &str = "5";

/// A Weft binary (`meshd`, `weft`) built beside meshlab: `$MESHLAB_<NAME>`,
/// else next to meshlab's own executable.
pub fn sibling(name: &str) -> Result<PathBuf> {
    if let Some(explicit) = std::env::var_os(format!("MESHLAB_{}", name.to_uppercase())) {
        return Ok(explicit.into());
    }
    let exe = std::env::current_exe().context("locating meshlab")?;
    let dir = exe.parent().context("meshlab has no directory")?;
    // Integration tests run from target/<profile>/deps.
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!("{name} not found next to {}: build the workspace (cargo build --workspace) or set MESHLAB_{}", exe.display(), name.to_uppercase())
}

fn node_dir(dir: &LabDir, node: &NodePlan) -> PathBuf {
    dir.file(&node.name)
}

/// The node's CNI directories (each lab node is its own machine): `bin/`,
/// `net.d/`, `ipam/` and the `node.json` meshd writes.
pub fn cni_dir(dir: &LabDir, node: &NodePlan) -> PathBuf {
    node_dir(dir, node).join("cni")
}

/// Whether the node's meshd has made it ready for pods: the plugin, its
/// conflist and the node state are in place.
pub fn cni_ready(dir: &LabDir, node: &NodePlan) -> bool {
    let cni = cni_dir(dir, node);
    ["bin/weft", "net.d/10-weft.conflist", "node.json"]
        .iter()
        .all(|f| cni.join(f).is_file())
}

fn pid_file(dir: &LabDir, node: &NodePlan) -> PathBuf {
    node_dir(dir, node).join("meshd.pid")
}

/// The node's running meshd, if any.
pub fn pid(dir: &LabDir, node: &NodePlan) -> Option<i32> {
    let pid: i32 = fs::read_to_string(pid_file(dir, node))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    process_alive(pid, &dir.path()).then_some(pid)
}

/// Where the node's meshd serves /metrics (inside the node's namespace).
pub const METRICS_ADDR: &str = "127.0.0.1:9475";

/// Starts meshd on `node` unless it runs already; returns its pid.
pub fn start(dir: &LabDir, node: &NodePlan) -> Result<i32> {
    if let Some(pid) = pid(dir, node) {
        return Ok(pid);
    }
    let state = node_dir(dir, node);
    fs::create_dir_all(&state)?;
    let log = File::options()
        .create(true)
        .append(true)
        .open(state.join("meshd.log"))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.netns])
        .arg(sibling("meshd")?)
        .args(["--log-format", "json", "run", "--node-name", &node.name])
        .arg("--kubeconfig")
        .arg(dir.node_kubeconfig())
        .arg("--state-dir")
        .arg(&state)
        .args(["--interface", &node.wg_interface])
        .args(["--mesh-cidr", MESH_V4, "--mesh-cidr", MESH_V6])
        .args([
            "--persistent-keepalive",
            KEEPALIVE_SECS,
            "--metrics-addr",
            METRICS_ADDR,
            "--resync",
            RESYNC_SECS,
        ]);
    let cni = cni_dir(dir, node);
    cmd.arg("--cni-state-file").arg(cni.join("node.json"));
    cmd.arg("--cni-ipam-dir").arg(cni.join("ipam"));
    cmd.arg("--cni-bin-dir").arg(cni.join("bin"));
    cmd.arg("--cni-conf-dir").arg(cni.join("net.d"));
    cmd.args(["--cluster-cidr", CLUSTER_V4, "--cluster-cidr", CLUSTER_V6]);
    cmd.args(["--block-grace", BLOCK_GRACE_SECS]);
    if let Some(program) = &node.userspace_program {
        cmd.args(["--userspace-program", program]);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting meshd on {}", node.name))?;
    // `ip netns exec` execs meshd in place, so this is meshd's pid.
    let pid = child.id() as i32;
    write_atomic(&pid_file(dir, node), pid.to_string().as_bytes())?;
    Ok(pid)
}

/// The last `n` warning or error lines of the node's meshd log.
pub fn log_warnings(dir: &LabDir, node: &NodePlan, n: usize) -> String {
    let log = fs::read_to_string(node_dir(dir, node).join("meshd.log")).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("\"level\":\"INFO\""))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The node's meshd metrics (Prometheus text), fetched inside its namespace.
pub fn metrics(node: &NodePlan) -> Result<String> {
    netns::run_in(&node.netns, || {
        let mut conn = std::net::TcpStream::connect(METRICS_ADDR)
            .context("connecting to meshd's metrics (is meshd running?)")?;
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        let (_, body) = response
            .split_once("\r\n\r\n")
            .context("a malformed HTTP response from meshd")?;
        Ok(body.to_string())
    })
}

/// Stops the node's meshd with `signal` (its data plane is left running).
pub fn signal(dir: &LabDir, node: &NodePlan, signal: Signal) -> Result<Option<i32>> {
    let Some(pid) = pid(dir, node) else {
        return Ok(None);
    };
    kill(Pid::from_raw(pid), signal).with_context(|| format!("signalling meshd {pid}"))?;
    Ok(Some(pid))
}
