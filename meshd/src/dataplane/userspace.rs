//! Userspace WireGuard as a process of its own, so that pod traffic keeps
//! flowing while meshd restarts, crashes or upgrades. meshd adopts a device
//! that answers on its UAPI socket and starts one only when none does.

use std::fs::{self, File};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use wireguard_control::InterfaceName;

use super::{Ensured, UserspaceProgram};
const START_TIMEOUT: Duration = Duration::from_secs(5);

fn socket_path(iface: &InterfaceName) -> PathBuf {
    weft_dataplane::socket_path(&iface.as_str_lossy())
}

/// Sends one raw UAPI request and returns the reply (for Weft's rotation
/// extension, which wireguard-control cannot send). Bounded: a device that
/// does not answer within `timeout` is an error.
pub fn request(iface: &InterfaceName, request: &str, timeout: Duration) -> Result<String> {
    use std::io::{Read, Write};
    let path = socket_path(iface);
    let mut socket =
        UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))?;
    socket.write_all(request.as_bytes())?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 256];
    while !reply.ends_with(b"\n\n") {
        let n = socket
            .read(&mut chunk)
            .with_context(|| format!("reading the reply from {}", path.display()))?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// A device answers if its socket accepts a connection (a dead process
/// leaves a socket file that refuses).
pub fn answering(iface: &InterfaceName) -> bool {
    UnixStream::connect(socket_path(iface)).is_ok()
}

pub async fn ensure(
    iface: &InterfaceName,
    program: &UserspaceProgram,
    log_dir: &Path,
) -> Result<Ensured> {
    if answering(iface) {
        return Ok(Ensured::Existing);
    }
    let Some(cmd) = command(iface, program)? else {
        bail!(
            "waiting for the data plane to answer on {} (it is supervised outside meshd)",
            socket_path(iface).display()
        );
    };
    let _ = fs::remove_file(socket_path(iface));
    let log_path = log_dir.join(format!("dataplane-{}.log", iface.as_str_lossy()));
    let exited = start(cmd, &log_path)?;
    let deadline = Instant::now() + START_TIMEOUT;
    while !answering(iface) {
        let why = if exited.load(Ordering::Relaxed) {
            "exited".to_string()
        } else if Instant::now() > deadline {
            format!(
                "did not answer on {} within {START_TIMEOUT:?}",
                socket_path(iface).display()
            )
        } else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        bail!(
            "the data plane for {iface} {why}; the end of its log ({}):\n{}",
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    tracing::info!(interface = %iface, "started the userspace data plane");
    Ok(Ensured::Created)
}

/// How to run the data plane; `None` when meshd must not start it.
fn command(iface: &InterfaceName, program: &UserspaceProgram) -> Result<Option<Command>> {
    let name = iface.as_str_lossy().into_owned();
    Ok(match program {
        UserspaceProgram::Builtin => {
            let mut c = Command::new(std::env::current_exe().context("locating meshd")?);
            // meshd has resolved the mode already.
            c.args(["dataplane", "--mode", "userspace", &name]);
            Some(c)
        }
        UserspaceProgram::External(path) => {
            let mut c = Command::new(path);
            c.args(["-f", &name]);
            Some(c)
        }
        UserspaceProgram::Supervised => None,
    })
}

/// Starts the data plane; the flag turns true when it exits.
fn start(mut cmd: Command, log_path: &Path) -> Result<Arc<AtomicBool>> {
    if let Some(dir) = log_path.parent() {
        fs::create_dir_all(dir)?;
    }
    let log = File::options().create(true).append(true).open(log_path)?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // A process group of its own: signals meant for meshd (a ^C, a
        // kill of the agent's group) do not reach the data plane.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the data plane {cmd:?}"))?;
    // Reap it if it dies while meshd lives; once meshd is gone, init does.
    let exited = Arc::new(AtomicBool::new(false));
    let flag = exited.clone();
    std::thread::spawn(move || {
        let status = child.wait();
        flag.store(true, Ordering::Relaxed);
        tracing::warn!(?status, "the userspace data plane exited");
    });
    Ok(exited)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_supervised_data_plane_is_waited_for_never_started() {
        let iface: InterfaceName = "wfnosuchdev9".parse().unwrap();
        let dir = std::env::temp_dir();
        let err = ensure(&iface, &UserspaceProgram::Supervised, &dir)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("supervised outside meshd"),
            "{err}"
        );
        assert!(!answering(&iface));
        assert!(
            !dir.join("dataplane-wfnosuchdev9.log").exists(),
            "nothing was started"
        );
    }
}
