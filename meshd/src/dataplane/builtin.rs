//! `meshd dataplane IFACE`: Weft's own userspace WireGuard device (see
//! [`super::device`]) in a process of its own, serving the standard UAPI
//! socket until SIGTERM or SIGINT.
//!
//! A data plane that is not working must not look alive: any panic ends the
//! process, and so does a failing worker or a TUN that vanished. Its
//! supervisor (meshd, or the container runtime) starts a new one and meshd
//! configures it from scratch. Clients are served concurrently, each with a
//! bounded idle time, so one stuck client cannot wedge the others.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};

use super::device::sys::Offloads;
use super::device::{Device, EXIT_DEVICE_FAILED};
use super::uapi;
use super::{Mode, Resolved, SOCKET_DIR};

/// How long a client may take to send a request (or sit idle between two).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// `meshd dataplane`: runs the userspace device for `iface`, unless `mode`
/// resolves to kernel WireGuard on this machine (the same decision meshd
/// makes); then it holds nothing and waits to be stopped, so the
/// DaemonSet's data plane container is the same on every node.
pub fn serve(iface: &str, mode: Mode, offloads: Offloads) -> Result<()> {
    // A panic anywhere ends the process: a live process with a dead device
    // would blackhole every pod.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("the userspace data plane panicked: {info}; exiting so that it is restarted");
        std::process::exit(EXIT_DEVICE_FAILED);
    }));
    // Block the stop signals before any thread starts, so every thread
    // inherits the mask and this one alone takes them, in sigwait.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block().context("blocking signals")?;
    let name = super::interface_name(iface)?;
    let resolved = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(super::probe(&name, mode))?;
    match resolved {
        Resolved::Userspace => run(iface, offloads, &stop),
        Resolved::Kernel => {
            tracing::info!(
                interface = iface,
                "kernel WireGuard serves this node: no userspace data plane to run"
            );
            let signal = stop.wait().context("waiting for a signal")?;
            tracing::info!(?signal, "stopping");
            Ok(())
        }
    }
}

fn run(iface: &str, offloads: Offloads, stop: &SigSet) -> Result<()> {
    let _lock = crate::lock::exclusive(
        &PathBuf::from(SOCKET_DIR).join(format!("{iface}.lock")),
        "data plane for this interface",
        crate::lock::WAIT,
    )?;
    let device = Device::open(iface, offloads)
        .with_context(|| format!("creating the WireGuard device {iface}"))?;
    device
        .start()
        .context("starting the data plane's workers")?;

    fs::create_dir_all(SOCKET_DIR)?;
    fs::set_permissions(SOCKET_DIR, fs::Permissions::from_mode(0o755))?;
    let path = PathBuf::from(SOCKET_DIR).join(format!("{iface}.sock"));
    let _ = fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    let d = device.clone();
    std::thread::spawn(move || accept(listener, d));
    let name = iface.to_string();
    std::thread::spawn(move || watch_interface(&name));
    tracing::info!(
        interface = iface,
        tun = ?device.tun.offloads,
        udp_gso = device.sockets.load().v4.gso(),
        udp_gro = device.sockets.load().v4.gro,
        "userspace data plane running"
    );

    let signal = stop.wait().context("waiting for a signal")?;
    tracing::info!(?signal, "stopping the data plane");
    let _ = fs::remove_file(&path);
    // The TUN interface goes with this process.
    Ok(())
}

/// Ends the process when its TUN interface is gone (deleted by hand, or
/// its namespace torn down): a device without an interface carries nothing.
fn watch_interface(iface: &str) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if nix::net::if_::if_nametoindex(iface).is_err() {
            eprintln!("the interface {iface} is gone; exiting so that it is recreated");
            std::process::exit(EXIT_DEVICE_FAILED);
        }
    }
}

fn accept(listener: UnixListener, device: Arc<Device>) {
    for client in listener.incoming().flatten() {
        let device = device.clone();
        std::thread::spawn(move || serve_client(client, &device));
    }
}

/// Serves one client: several requests may come on one connection.
fn serve_client(client: UnixStream, device: &Arc<Device>) {
    let (Ok(()), Ok(()), Ok(read)) = (
        client.set_read_timeout(Some(CLIENT_TIMEOUT)),
        client.set_write_timeout(Some(CLIENT_TIMEOUT)),
        client.try_clone(),
    ) else {
        return;
    };
    let mut reader = BufReader::new(read);
    let mut writer = client;
    while let Some(request) = read_block(&mut reader, uapi::MAX_REQUEST) {
        let reply = device.handle(&request);
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// Reads lines up to and including the empty line that ends a UAPI
/// message; `None` at end of stream, on a timeout, or past `limit` bytes.
fn read_block(reader: &mut impl BufRead, limit: usize) -> Option<String> {
    let mut block = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) if block.len() + line.len() > limit => return None,
            Ok(_) => {
                let end = line == "\n";
                block.push_str(&line);
                if end {
                    return Some(block);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_end_at_the_empty_line() {
        let mut input = BufReader::new("set=1\nprivate_key=aa\n\nget=1\n\n".as_bytes());
        assert_eq!(
            read_block(&mut input, 100).unwrap(),
            "set=1\nprivate_key=aa\n\n"
        );
        assert_eq!(read_block(&mut input, 100).unwrap(), "get=1\n\n");
        assert_eq!(read_block(&mut input, 100), None);
        let mut long = BufReader::new("set=1\nprivate_key=aa\n\n".as_bytes());
        assert_eq!(read_block(&mut long, 10), None, "over the limit");
    }
}
