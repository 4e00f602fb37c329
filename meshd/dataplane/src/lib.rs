//! Weft's userspace WireGuard device as a program of its own. Its one face
//! is the cross-platform WireGuard UAPI ([`uapi`]) on the socket
//! [`socket_path`]: the same contract kernel WireGuard serves over netlink.
//! meshd configures either with wireguard-control's `DeviceUpdate` and
//! decides which of the two serves a node; it never reaches inside the
//! device, so each implementation can be tested alone against one suite.
//!
//! [`run`] serves one interface until a [`Stop`] signal (`meshd dataplane`
//! calls it once it has resolved the mode to userspace). The device
//! ([`device`]: peers, cryptokey routing, TUN/UDP workers) and its offloads
//! ([`offload`]) are public for the benchmarks and the fuzz targets only.

pub mod device;
pub mod lock;
pub mod offload;
mod serve;
pub mod uapi;

use std::path::{Path, PathBuf};

pub use device::sys::Offloads;
pub use serve::{run, Error, Stop};

/// Where every UAPI implementation (Weft's, boringtun, wireguard-go, `wg`)
/// puts and looks for control sockets. One directory for the whole
/// machine: every network namespace sees every socket.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// The UAPI socket of the device `iface`.
pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// The lock one data plane per interface holds (see [`lock`]).
pub fn lock_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.lock"))
}
