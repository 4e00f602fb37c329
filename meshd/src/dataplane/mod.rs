//! The WireGuard data plane: kernel WireGuard where the module exists,
//! otherwise a userspace device in a process of its own (Weft's, the
//! `weft-dataplane` crate, or any wireguard-go compatible program). Both
//! are configured the same way afterwards — wireguard-control's
//! `DeviceUpdate`, over netlink or the UAPI socket — so the reconcilers
//! have one path. Which of the two serves the node is decided here, for
//! meshd and for `meshd dataplane` alike.

mod kernel;
mod userspace;

pub use userspace::request;

use std::path::PathBuf;

use anyhow::{bail, Result};
use weft_dataplane::{Offloads, Stop};
use wireguard_control::{Backend, InterfaceName};

/// The variables the DaemonSet's two containers (meshd and the data plane)
/// both read, so they cannot disagree on the interface or the mode.
pub const INTERFACE_ENV: &str = "WEFT_INTERFACE";
pub const MODE_ENV: &str = "WEFT_DATAPLANE";
pub const DEFAULT_INTERFACE: &str = "weft0";

/// Which data plane the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Kernel WireGuard if the module is available, else userspace.
    Auto,
    Kernel,
    Userspace,
}

/// What the data plane was resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Kernel,
    Userspace,
}

/// What already holds the interface's name, by link kind (never by name:
/// a userspace data plane's TUN and a kernel link may share it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    Nothing,
    /// A kernel WireGuard link.
    Kernel,
    /// A TUN device: a userspace data plane that outlived a meshd.
    Tun,
    /// Some other kind of link, not ours to take over.
    Other(String),
}

/// The decision, separate from probing so it is testable anywhere. An
/// existing data plane is adopted as what it is; `module` (whether kernel
/// WireGuard can be created) matters only when nothing exists yet.
pub fn resolve(mode: Mode, existing: &Existing, module: bool) -> Result<Resolved> {
    match (mode, existing) {
        (_, Existing::Other(kind)) => bail!("--interface is held by a link of kind {kind:?}, not a WireGuard data plane: rename it or choose another --interface"),
        (Mode::Userspace, Existing::Kernel) => bail!("--dataplane userspace: the interface is a kernel WireGuard link; delete it or use --dataplane auto"),
        (Mode::Kernel, Existing::Tun) => bail!("--dataplane kernel: the interface is a userspace data plane's TUN; stop it or use --dataplane auto"),
        (Mode::Auto | Mode::Kernel, Existing::Kernel) => Ok(Resolved::Kernel),
        (Mode::Auto | Mode::Userspace, Existing::Tun) => Ok(Resolved::Userspace),
        (Mode::Userspace, Existing::Nothing) => Ok(Resolved::Userspace),
        (Mode::Auto | Mode::Kernel, Existing::Nothing) if module => Ok(Resolved::Kernel),
        (Mode::Auto, Existing::Nothing) => Ok(Resolved::Userspace),
        (Mode::Kernel, Existing::Nothing) => bail!("--dataplane kernel: this kernel has no WireGuard module (modprobe wireguard), or use --dataplane auto"),
    }
}

pub fn interface_name(iface: &str) -> Result<InterfaceName> {
    iface
        .parse()
        .map_err(|e| anyhow::anyhow!("--interface {iface:?}: {e}"))
}

/// Looks at this machine and resolves `mode`: what meshd and the data plane
/// container both do, so that they agree.
pub async fn probe(iface: &InterfaceName, mode: Mode) -> Result<Resolved> {
    let existing = kernel::existing(iface).await?;
    let module = mode != Mode::Userspace
        && existing == Existing::Nothing
        && kernel::module_available().await;
    let resolved = resolve(mode, &existing, module)?;
    tracing::info!(interface = %iface, ?mode, ?existing, ?resolved, "data plane selected");
    Ok(resolved)
}

/// `meshd dataplane`: runs Weft's userspace device for `iface`, unless
/// `mode` resolves to kernel WireGuard on this machine (the same decision
/// meshd makes); then it holds nothing and waits to be stopped, so the
/// DaemonSet's data plane container is the same on every node.
pub fn serve(iface: &str, mode: Mode, offloads: Offloads) -> Result<()> {
    // Before any thread starts (the probe's runtime included), so that
    // every thread inherits the mask.
    let stop = Stop::block()?;
    let name = interface_name(iface)?;
    let resolved = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(probe(&name, mode))?;
    match resolved {
        Resolved::Userspace => weft_dataplane::run(iface, offloads, &stop)?,
        Resolved::Kernel => {
            tracing::info!(
                interface = iface,
                "kernel WireGuard serves this node: no userspace data plane to run"
            );
            let signal = stop.wait()?;
            tracing::info!(?signal, "stopping");
        }
    }
    Ok(())
}

/// The userspace implementation to run: Weft's own (in `meshd dataplane`) or any program speaking the wireguard-go command line and
/// UAPI (`PROGRAM -f IFACE`), such as Debian's wireguard-go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserspaceProgram {
    Builtin,
    External(PathBuf),
    /// Something else runs the data plane (in Kubernetes, a container of its
    /// own, so that restarting the meshd container cannot take it down):
    /// meshd only adopts it and waits while it is absent.
    Supervised,
}

/// How an `ensure` found the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    /// Already there: adopted as is (after a meshd restart, or steady state).
    Existing,
    /// Created now (first start, or after the data plane died): the caller
    /// must configure it from scratch.
    Created,
}

/// One node's WireGuard device.
pub struct DataPlane {
    pub iface: InterfaceName,
    pub resolved: Resolved,
    program: UserspaceProgram,
    log_dir: PathBuf,
    /// The userspace device's TUN last seen: another index is a new device
    /// (one restarted by someone else, such as the kubelet), which must be
    /// configured from scratch like one meshd created.
    tun_index: std::sync::Mutex<Option<u32>>,
}

impl DataPlane {
    /// Resolves `mode` on this machine.
    pub async fn open(
        iface: &str,
        mode: Mode,
        program: UserspaceProgram,
        log_dir: PathBuf,
    ) -> Result<Self> {
        let iface = interface_name(iface)?;
        let resolved = probe(&iface, mode).await?;
        Ok(Self {
            iface,
            resolved,
            program,
            log_dir,
            tun_index: std::sync::Mutex::new(None),
        })
    }

    pub fn backend(&self) -> Backend {
        match self.resolved {
            Resolved::Kernel => Backend::Kernel,
            Resolved::Userspace => Backend::Userspace,
        }
    }

    /// Makes sure the device exists, adopting a running one.
    pub async fn ensure(&self) -> Result<Ensured> {
        match self.resolved {
            Resolved::Kernel => kernel::ensure(&self.iface).await,
            Resolved::Userspace => {
                let ensured = userspace::ensure(&self.iface, &self.program, &self.log_dir).await?;
                // The socket directory is shared by every network namespace
                // on the machine: a device answering there may live elsewhere.
                let index = match kernel::existing(&self.iface).await? {
                    Existing::Tun => kernel::link_index(&self.iface.as_str_lossy()).await?,
                    _ => anyhow::bail!(
                        "a data plane answers on the UAPI socket of {} but its interface is not in this network namespace; another namespace's process holds the name",
                        self.iface
                    ),
                };
                let mut seen = self.tun_index.lock().unwrap_or_else(|e| e.into_inner());
                let replaced = seen.is_some() && *seen != index;
                *seen = index;
                Ok(if replaced { Ensured::Created } else { ensured })
            }
        }
    }

    /// Whether the device meshd configured is still the one there (cheap;
    /// polled every second).
    pub async fn state(&self) -> DeviceState {
        let answering = match self.resolved {
            Resolved::Kernel => {
                matches!(kernel::existing(&self.iface).await, Ok(Existing::Kernel))
            }
            Resolved::Userspace => userspace::answering(&self.iface),
        };
        if !answering {
            return DeviceState::Gone;
        }
        let seen = *self.tun_index.lock().unwrap_or_else(|e| e.into_inner());
        let Some(seen) = seen else {
            return DeviceState::Configured;
        };
        match kernel::link_index(&self.iface.as_str_lossy()).await {
            Ok(Some(index)) if index == seen => DeviceState::Configured,
            Ok(_) => DeviceState::Replaced,
            Err(_) => DeviceState::Gone,
        }
    }
}

/// What holds the interface, compared with what meshd configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// The device meshd configured, answering.
    Configured,
    /// No device answers: meshd (or the data plane container) makes one.
    Gone,
    /// Another device answers under the name: a data plane container
    /// restarted and made a new TUN, empty until meshd configures it. Seen
    /// within a second, rather than at the next resync.
    Replaced,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_adopts_what_exists_and_otherwise_prefers_the_kernel() {
        use Existing as E;
        use Mode as M;
        let other = E::Other("veth".into());
        let table: &[(Mode, &Existing, bool, Result<Resolved, &str>)] = &[
            (M::Auto, &E::Nothing, true, Ok(Resolved::Kernel)),
            (M::Auto, &E::Nothing, false, Ok(Resolved::Userspace)),
            // A restarted meshd finds its userspace data plane's TUN: even
            // where the module exists, it adopts it as userspace.
            (M::Auto, &E::Tun, true, Ok(Resolved::Userspace)),
            (M::Auto, &E::Kernel, false, Ok(Resolved::Kernel)),
            (M::Userspace, &E::Nothing, true, Ok(Resolved::Userspace)),
            (M::Userspace, &E::Tun, false, Ok(Resolved::Userspace)),
            (
                M::Userspace,
                &E::Kernel,
                true,
                Err("is a kernel WireGuard link"),
            ),
            (M::Kernel, &E::Nothing, true, Ok(Resolved::Kernel)),
            (M::Kernel, &E::Kernel, false, Ok(Resolved::Kernel)),
            (M::Kernel, &E::Nothing, false, Err("no WireGuard module")),
            (M::Kernel, &E::Tun, true, Err("userspace data plane's TUN")),
            (M::Auto, &other, true, Err("kind \"veth\"")),
        ];
        for (mode, existing, module, want) in table {
            let got = resolve(*mode, existing, *module);
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, *w, "{mode:?} {existing:?} {module}"),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{e}"),
                (g, w) => panic!("{mode:?} {existing:?} {module}: got {g:?}, want {w:?}"),
            }
        }
    }
}
