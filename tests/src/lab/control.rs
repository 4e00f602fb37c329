//! The lab's API server as a long-lived process of its own (`meshlab
//! apiserver`), started detached by `meshlab up` and stopped by `down`.
//!
//! It listens on two sockets: 127.0.0.1 in the host's namespace (for the
//! admin's kubectl) and the fabric gateway inside the fabric namespace (for
//! node namespaces). The second is bound from a thread inside the fabric
//! namespace, so the lab needs no interface or route in the host's namespace.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::netns;
use super::state::{write_atomic, ApiServerState, LabDir};
use crate::apiserver::{self, Endpoint, Options};

const READY_FILE: &str = "apiserver.ready";
const LOG_FILE: &str = "apiserver.log";
const START_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Ready {
    url: String,
    fabric_url: String,
}

/// The body of `meshlab apiserver`: serves until SIGTERM or SIGINT, for
/// nodes at `fabric_addr` in `fabric_netns` (the fabric's own, or a
/// control-plane node's: `up --control-plane`).
pub fn run(dir: &LabDir, fabric_netns: &str, fabric_addr: SocketAddr) -> Result<()> {
    let fabric = netns::run_in(fabric_netns, move || {
        TcpListener::bind(fabric_addr)
            .with_context(|| format!("binding {fabric_addr} in the fabric"))
    })?;
    let host = TcpListener::bind("127.0.0.1:0")?;
    let ready = Ready {
        url: format!("https://{}", host.local_addr()?),
        fabric_url: format!("https://{fabric_addr}"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let endpoints = vec![
            Endpoint {
                listener: host,
                kubeconfig: dir.kubeconfig(),
                advertise: None,
            },
            Endpoint {
                listener: fabric,
                kubeconfig: dir.node_kubeconfig(),
                advertise: Some(fabric_addr),
            },
        ];
        let options = Options {
            persist: Some(dir.path()),
            ..Options::default()
        };
        let server = apiserver::launch(endpoints, options)?;
        // Atomically: `spawn` polls for this file and parses what it finds.
        write_atomic(&dir.file(READY_FILE), &serde_json::to_vec(&ready)?)?;
        tracing::info!(url = %ready.url, fabric_url = %ready.fabric_url, "API server ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping; saving the objects for a restart");
        server.stop().await
    })
}

/// How a starting API server begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Empty, with new credentials (`meshlab up`).
    Fresh,
    /// With the objects and credentials the last one saved when it
    /// stopped; every watch must relist (`meshlab api restart`).
    Restore,
}

/// Starts `meshlab apiserver` detached from this process and waits until it
/// serves.
pub fn spawn(
    dir: &LabDir,
    fabric_netns: &str,
    fabric_addr: SocketAddr,
    start: Start,
) -> Result<ApiServerState> {
    // A ready file left by an earlier server would be taken for this one's.
    let _ = fs::remove_file(dir.file(READY_FILE));
    if start == Start::Fresh {
        apiserver::forget(&dir.path());
    }
    let log = File::options()
        .create(true)
        .append(true)
        .open(dir.file(LOG_FILE))?;
    let exe = std::env::current_exe().context("locating the meshlab binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root")
        .arg(&dir.root)
        .arg("--name")
        .arg(&dir.name)
        .arg("apiserver")
        .arg("--lab-dir")
        .arg(dir.path())
        .arg("--fabric-netns")
        .arg(fabric_netns)
        .arg("--fabric-listen")
        .arg(fabric_addr.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own session: it outlives `meshlab up` and the caller's terminal.
        .process_group(0);
    let mut child = cmd.spawn().context("starting the API server")?;
    let bound = super::scaled(START_TIMEOUT);
    let deadline = Instant::now() + bound;
    let ready_path = dir.file(READY_FILE);
    loop {
        if let Ok(bytes) = fs::read(&ready_path) {
            let ready: Ready = serde_json::from_slice(&bytes)?;
            return Ok(ApiServerState {
                pid: child.id() as i32,
                url: ready.url,
                fabric_url: ready.fabric_url,
            });
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the API server exited ({status}) during start:\n{}",
                log_tail(&dir.file(LOG_FILE))
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "the API server did not become ready within {bound:?}:\n{}",
                log_tail(&dir.file(LOG_FILE))
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the API server `pid` with SIGTERM (it saves its objects first)
/// and waits, bounded, until it is gone.
pub fn stop(pid: i32) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    kill(Pid::from_raw(pid), Signal::SIGTERM).context("signalling the API server")?;
    let bound = super::scaled(START_TIMEOUT);
    let deadline = Instant::now() + bound;
    while kill(Pid::from_raw(pid), None).is_ok() {
        if Instant::now() > deadline {
            bail!("the API server (pid {pid}) did not stop within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
