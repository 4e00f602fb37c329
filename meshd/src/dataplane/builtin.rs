//! `meshd dataplane IFACE`: Weft's own userspace WireGuard device, boringtun,
//! serving the standard UAPI socket until SIGTERM or SIGINT.
//!
//! boringtun 0.7's UAPI `get` departs from the protocol that `wg`,
//! wireguard-go and wireguard-control speak: it answers `own_public_key`
//! instead of `private_key` (so `wg show` prints `(none)` and a reconciler
//! sees no key and sets it again forever), and it reports the last handshake
//! as time elapsed rather than a Unix timestamp. So this process owns the
//! public socket itself, hands boringtun a private socketpair, and rewrites
//! `get` replies into the standard form.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use boringtun::device::{DeviceConfig, DeviceHandle};
use nix::sys::signal::{SigSet, Signal};

const SOCKET_DIR: &str = "/var/run/wireguard";

pub fn run(iface: &str, threads: usize) -> Result<()> {
    // Block the stop signals before any thread starts, so every thread
    // inherits the mask and this one alone takes them, in sigwait.
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    stop.thread_block().context("blocking signals")?;

    let (ours, theirs) = UnixStream::pair().context("creating the UAPI socketpair")?;
    let config = DeviceConfig {
        n_threads: threads.max(1),
        uapi_fd: theirs.into_raw_fd(),
        ..DeviceConfig::default()
    };
    let handle = DeviceHandle::new(iface, config)
        .map_err(|e| anyhow::anyhow!("creating the WireGuard device {iface}: {e:?}"))?;

    fs::create_dir_all(SOCKET_DIR)?;
    fs::set_permissions(SOCKET_DIR, fs::Permissions::from_mode(0o755))?;
    let path = PathBuf::from(SOCKET_DIR).join(format!("{iface}.sock"));
    let _ = fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    std::thread::spawn(move || serve(listener, ours));
    tracing::info!(interface = iface, threads, "userspace data plane running");

    let signal = stop.wait().context("waiting for a signal")?;
    tracing::info!(?signal, "stopping the data plane");
    let _ = fs::remove_file(&path);
    // Dropping the handle stops the device; the TUN interface goes with
    // this process.
    drop(handle);
    Ok(())
}

/// Serves UAPI clients one at a time (as wireguard-go does), relaying each
/// request to boringtun and fixing up `get` replies.
fn serve(listener: UnixListener, device: UnixStream) {
    let mut private_key: Option<String> = None;
    let mut device_reader = BufReader::new(device.try_clone().expect("cloning a socket fd"));
    let mut device_writer = device;
    for client in listener.incoming().flatten() {
        let mut reader = BufReader::new(match client.try_clone() {
            Ok(c) => c,
            Err(_) => continue,
        });
        let mut writer = client;
        // A client may send several requests on one connection.
        while let Some(request) = read_block(&mut reader) {
            let Ok(()) = device_writer.write_all(request.as_bytes()) else {
                return;
            };
            let Some(reply) = read_block(&mut device_reader) else {
                return;
            };
            let reply = if request.starts_with("get=1") {
                rewrite_get(&reply, private_key.as_deref(), SystemTime::now())
            } else {
                if reply.contains("errno=0") {
                    if let Some(k) = request.lines().find_map(|l| l.strip_prefix("private_key=")) {
                        private_key = Some(k.to_string());
                    }
                }
                reply
            };
            if writer.write_all(reply.as_bytes()).is_err() {
                break;
            }
        }
    }
}

/// Reads lines up to and including the empty line that ends a UAPI
/// message; `None` at end of stream.
fn read_block(reader: &mut impl BufRead) -> Option<String> {
    let mut block = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
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

/// boringtun's `get` reply in the protocol's form: `private_key` instead of
/// `own_public_key`, handshake times as Unix timestamps.
pub fn rewrite_get(reply: &str, private_key: Option<&str>, now: SystemTime) -> String {
    let mut out = String::with_capacity(reply.len() + 64);
    let mut elapsed_sec: Option<u64> = None;
    for line in reply.lines() {
        if line.starts_with("own_public_key=") {
            if let Some(k) = private_key {
                out.push_str(&format!("private_key={k}\n"));
            }
        } else if let Some(s) = line.strip_prefix("last_handshake_time_sec=") {
            elapsed_sec = s.parse().ok();
        } else if let Some(n) = line.strip_prefix("last_handshake_time_nsec=") {
            let elapsed = Duration::new(elapsed_sec.take().unwrap_or(0), n.parse().unwrap_or(0));
            let at = now
                .checked_sub(elapsed)
                .unwrap_or(UNIX_EPOCH)
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            out.push_str(&format!(
                "last_handshake_time_sec={}\nlast_handshake_time_nsec={}\n",
                at.as_secs(),
                at.subsec_nanos()
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_replies_become_standard() {
        let reply = "own_public_key=ab\nlisten_port=51820\npublic_key=cd\nendpoint=198.18.1.2:51820\n\
                     last_handshake_time_sec=15\nlast_handshake_time_nsec=500000000\nrx_bytes=0\ntx_bytes=0\nerrno=0\n\n";
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let fixed = rewrite_get(reply, Some("ef"), now);
        assert_eq!(
            fixed,
            "private_key=ef\nlisten_port=51820\npublic_key=cd\nendpoint=198.18.1.2:51820\n\
             last_handshake_time_sec=984\nlast_handshake_time_nsec=500000000\nrx_bytes=0\ntx_bytes=0\nerrno=0\n\n"
        );
        let unknown_key = rewrite_get("own_public_key=ab\nerrno=0\n\n", None, now);
        assert_eq!(unknown_key, "errno=0\n\n");
    }

    #[test]
    fn blocks_end_at_the_empty_line() {
        let mut input = BufReader::new("set=1\nprivate_key=aa\n\nget=1\n\n".as_bytes());
        assert_eq!(read_block(&mut input).unwrap(), "set=1\nprivate_key=aa\n\n");
        assert_eq!(read_block(&mut input).unwrap(), "get=1\n\n");
        assert_eq!(read_block(&mut input), None);
    }
}
