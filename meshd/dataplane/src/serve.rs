//! The data plane program: Weft's userspace WireGuard device (see
//! [`crate::device`]) serving the standard UAPI socket until SIGTERM or
//! SIGINT.
//!
//! A data plane that is not working must not look alive: any panic ends the
//! process, and so does a failing worker or a TUN that vanished. Its
//! supervisor (meshd, or the container runtime) starts a new one and meshd
//! configures it from scratch. Clients are served concurrently, each with a
//! bounded idle time, so one stuck client cannot wedge the others.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::{umask, Mode as FileMode};

use crate::device::sys::Offloads;
use crate::device::{Device, EXIT_DEVICE_FAILED};
use crate::lock::LockError;
use crate::{lock, uapi, SOCKET_DIR};

/// How long a client may take to send a request (or sit idle between two).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the data plane could not run; each names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("blocking the stop signals: {0}")]
    BlockSignals(#[source] nix::Error),
    #[error("waiting for a stop signal: {0}")]
    WaitSignal(#[source] nix::Error),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("creating the WireGuard device {iface}: {source}")]
    Device {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("starting the data plane's workers: {0}")]
    Workers(#[source] io::Error),
    #[error("preparing the socket directory {SOCKET_DIR}: {0}")]
    SocketDir(#[source] io::Error),
    #[error("binding {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The signals that stop the data plane (SIGTERM, SIGINT), blocked so that
/// one thread takes them in [`Stop::wait`] instead of their default action
/// ending the process mid-cleanup.
pub struct Stop(SigSet);

impl Stop {
    /// Blocks the stop signals in the calling thread. Call it before any
    /// thread starts: threads inherit the mask, so none of them takes a
    /// signal meant for the waiter.
    pub fn block() -> Result<Self, Error> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.thread_block().map_err(Error::BlockSignals)?;
        Ok(Self(set))
    }

    /// Waits for a stop signal and returns it.
    pub fn wait(&self) -> Result<Signal, Error> {
        self.0.wait().map_err(Error::WaitSignal)
    }
}

/// Runs the userspace device `iface` and serves its UAPI socket until a
/// stop signal; the TUN interface goes with the process. Meant to be the
/// process's whole life: it makes any panic end the process (exit
/// [`EXIT_DEVICE_FAILED`]), as a failing worker does. A second data plane
/// for the same interface waits a moment for the first to go, then
/// refuses to start ([`crate::lock_path`]).
pub fn run(iface: &str, offloads: Offloads, stop: &Stop) -> Result<(), Error> {
    // A panic anywhere ends the process: a live process with a dead device
    // would blackhole every pod.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("the userspace data plane panicked: {info}; exiting so that it is restarted");
        std::process::exit(EXIT_DEVICE_FAILED);
    }));
    let _lock = lock::exclusive(
        &crate::lock_path(iface),
        "data plane for this interface",
        lock::WAIT,
    )?;
    let device = Device::open(iface, offloads).map_err(|source| Error::Device {
        iface: iface.to_string(),
        source,
    })?;
    device.start().map_err(Error::Workers)?;

    fs::create_dir_all(SOCKET_DIR).map_err(Error::SocketDir)?;
    fs::set_permissions(SOCKET_DIR, fs::Permissions::from_mode(0o755)).map_err(Error::SocketDir)?;
    let path = crate::socket_path(iface);
    let _ = fs::remove_file(&path);
    let listener = bind_private(&path).map_err(|source| Error::Bind {
        path: path.clone(),
        source,
    })?;
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

    let signal = stop.wait()?;
    tracing::info!(?signal, "stopping the data plane");
    let _ = fs::remove_file(&path);
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

/// Binds the UAPI socket with mode 0600 from its first moment (it hands out
/// the private key): created under a umask that clears the group's and
/// others' bits, not chmod'ed after a bind that the process's umask
/// decided. No other thread creates files meanwhile (the workers do no
/// file I/O; the lock file exists already).
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let before = umask(FileMode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(before);
    bound
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
/// A line is read only as far as the limit leaves room for: a client that
/// never sends a newline holds at most `limit` bytes of memory.
fn read_block(reader: &mut impl BufRead, limit: usize) -> Option<String> {
    let mut block = String::new();
    loop {
        // One byte past the room left tells an over-long line apart.
        let room = limit.saturating_sub(block.len()) as u64 + 1;
        let mut line = String::new();
        match reader.by_ref().take(room).read_line(&mut line) {
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

    /// A client that never sends a newline is read no further than the
    /// request limit (and a buffer): it cannot grow the data plane's memory.
    #[test]
    fn an_endless_line_is_cut_at_the_limit() {
        /// Counts what was taken from the client.
        struct Counted<R>(R, usize);
        impl<R: Read> Read for Counted<R> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1 += n;
                Ok(n)
            }
        }
        let limit = 1 << 16;
        let endless = std::io::repeat(b'a').take(64 * limit as u64);
        let mut input = BufReader::new(Counted(endless, 0));
        assert_eq!(read_block(&mut input, limit), None);
        let read = input.get_ref().1;
        assert!(
            read <= limit + 1 + input.capacity(),
            "read {read} bytes of one line with a limit of {limit}"
        );
    }

    /// The socket hands out the private key: never readable by others,
    /// not even between its bind and a chmod.
    #[test]
    fn the_uapi_socket_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wg0.sock");
        let _listener = bind_private(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
    }
}
