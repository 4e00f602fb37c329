//! `meshd dataplane IFACE`: Weft's own userspace WireGuard device, boringtun,
//! serving the standard UAPI socket until SIGTERM or SIGINT.
//!
//! boringtun 0.7 departs from the protocol that `wg`, wireguard-go and
//! wireguard-control speak: its `get` answers `own_public_key` instead of
//! `private_key` and the last handshake as time elapsed rather than a Unix
//! timestamp, and its `set` cannot change a peer it has (see [`uapi`]). So
//! this process owns the public socket itself, hands boringtun a private
//! socketpair, and relays: `get` replies rewritten into the standard form,
//! `set` requests translated into what boringtun carries out correctly.
//!
//! A data plane that is not working must not look alive: any panic ends the
//! process, and so does a device that stops answering its socket. Its
//! supervisor (meshd, or the container runtime) starts a new one and meshd
//! configures it from scratch. Clients are served concurrently, each with a
//! bounded idle time, so one stuck client cannot wedge the others.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use boringtun::device::{DeviceConfig, DeviceHandle};
use nix::sys::signal::{SigSet, Signal};

use super::uapi::{self, EINVAL};
use super::SOCKET_DIR;

/// How long a client may take to send a request (or sit idle between two).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long boringtun may take to answer; past it the device is dead.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);
/// The exit status of a data plane that found its device broken.
const EXIT_DEVICE_FAILED: i32 = 70;

pub fn run(iface: &str, threads: usize) -> Result<()> {
    // A panic anywhere — boringtun's event loop included — ends the process:
    // a live process with a dead device would blackhole every pod.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("the userspace data plane panicked: {info}; exiting so that it is restarted");
        std::process::exit(EXIT_DEVICE_FAILED);
    }));
    let _lock = crate::lock::exclusive(
        &PathBuf::from(SOCKET_DIR).join(format!("{iface}.lock")),
        "data plane for this interface",
        crate::lock::WAIT,
    )?;
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
    ours.set_read_timeout(Some(DEVICE_TIMEOUT))?;
    ours.set_write_timeout(Some(DEVICE_TIMEOUT))?;
    let relay = Arc::new(Mutex::new(Relay {
        reader: BufReader::new(ours.try_clone()?),
        writer: ours,
        private_key: None,
    }));
    std::thread::spawn(move || accept(listener, relay));
    let name = iface.to_string();
    std::thread::spawn(move || watch_interface(&name));
    tracing::info!(interface = iface, threads, "userspace data plane running");

    let signal = stop.wait().context("waiting for a signal")?;
    tracing::info!(?signal, "stopping the data plane");
    let _ = fs::remove_file(&path);
    // Dropping the handle stops the device; the TUN interface goes with
    // this process.
    drop(handle);
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

fn accept(listener: UnixListener, relay: Arc<Mutex<Relay>>) {
    for client in listener.incoming().flatten() {
        let relay = relay.clone();
        std::thread::spawn(move || serve(client, &relay));
    }
}

/// Serves one client: several requests may come on one connection.
fn serve(client: UnixStream, relay: &Mutex<Relay>) {
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
        let reply = match relay.lock() {
            Ok(mut relay) => relay.handle(&request),
            // Another client's thread panicked holding it: the hook is
            // already ending the process.
            Err(_) => return,
        };
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// boringtun's end of the private socketpair.
struct Relay {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// What the last successful `set` gave (hex), for `get` replies.
    private_key: Option<String>,
}

impl Relay {
    fn handle(&mut self, request: &str) -> String {
        if request.starts_with("get=1") {
            let reply = self.device("get=1\n\n");
            return rewrite_get(&reply, self.private_key.as_deref(), SystemTime::now());
        }
        match self.set(request) {
            Ok(()) => "errno=0\n\n".to_string(),
            Err(errno) => format!("errno={errno}\n\n"),
        }
    }

    fn set(&mut self, request: &str) -> Result<(), i32> {
        let peers = uapi::parse_get(&self.device("get=1\n\n"))?;
        let plan = uapi::plan_set(request, peers)?;
        // boringtun panics on a peer added before any private key.
        if plan.private_key.is_none()
            && self.private_key.is_none()
            && plan.requests.iter().any(|r| r.contains("\npublic_key="))
        {
            return Err(EINVAL);
        }
        for r in &plan.requests {
            let reply = self.device(r);
            match reply
                .trim_end()
                .strip_prefix("errno=")
                .map(str::parse::<i32>)
            {
                Some(Ok(0)) => {}
                Some(Ok(errno)) => return Err(errno),
                _ => return Err(uapi::EPROTO),
            }
        }
        if plan.private_key.is_some() {
            self.private_key = plan.private_key;
        }
        Ok(())
    }

    /// One round trip to boringtun. A device that does not answer in time
    /// (or closed its socket) is dead: the process ends.
    fn device(&mut self, request: &str) -> String {
        let reply = self
            .writer
            .write_all(request.as_bytes())
            .ok()
            .and_then(|()| read_block(&mut self.reader, usize::MAX));
        match reply {
            Some(r) => r,
            None => {
                eprintln!("the WireGuard device stopped answering its control socket; exiting so that it is restarted");
                std::process::exit(EXIT_DEVICE_FAILED);
            }
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
