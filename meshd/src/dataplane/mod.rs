//! The WireGuard data plane: kernel WireGuard where the module exists,
//! otherwise a userspace device in a process of its own. Both are configured
//! the same way afterwards — wireguard-control's `DeviceUpdate`, over netlink
//! or the UAPI socket — so the reconcilers have one path.

pub mod builtin;
mod kernel;
mod userspace;

use std::path::PathBuf;

use anyhow::{bail, Result};
use wireguard_control::{Backend, InterfaceName};

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

/// The decision, separate from probing so it is testable anywhere.
pub fn resolve(mode: Mode, kernel_available: bool) -> Result<Resolved> {
    match (mode, kernel_available) {
        (Mode::Kernel, false) => bail!("--dataplane kernel: this kernel has no WireGuard module (modprobe wireguard), or use --dataplane auto"),
        (Mode::Kernel, true) | (Mode::Auto, true) => Ok(Resolved::Kernel),
        (Mode::Userspace, _) | (Mode::Auto, false) => Ok(Resolved::Userspace),
    }
}

/// The userspace implementation to run: Weft's own (boringtun, in `meshd
/// dataplane`) or any program speaking the wireguard-go command line and
/// UAPI (`PROGRAM -f IFACE`), such as Debian's wireguard-go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserspaceProgram {
    Builtin {
        threads: usize,
    },
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
}

impl DataPlane {
    /// Resolves `mode` on this machine.
    pub async fn open(
        iface: &str,
        mode: Mode,
        program: UserspaceProgram,
        log_dir: PathBuf,
    ) -> Result<Self> {
        let iface: InterfaceName = iface
            .parse()
            .map_err(|e| anyhow::anyhow!("--interface {iface:?}: {e}"))?;
        let kernel_available = match mode {
            Mode::Userspace => false,
            Mode::Auto | Mode::Kernel => kernel::available(&iface).await,
        };
        let resolved = resolve(mode, kernel_available)?;
        tracing::info!(interface = %iface, ?mode, ?resolved, "data plane selected");
        Ok(Self {
            iface,
            resolved,
            program,
            log_dir,
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
                if !kernel::exists(&self.iface).await {
                    anyhow::bail!(
                        "a data plane answers on the UAPI socket of {} but its interface is not in this network namespace; another namespace's process holds the name",
                        self.iface
                    );
                }
                Ok(ensured)
            }
        }
    }

    /// Whether the device is there and answering (cheap; polled every second).
    pub async fn alive(&self) -> bool {
        match self.resolved {
            Resolved::Kernel => kernel::exists(&self.iface).await,
            Resolved::Userspace => userspace::answering(&self.iface),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_the_kernel_and_falls_back() {
        assert_eq!(resolve(Mode::Auto, true).unwrap(), Resolved::Kernel);
        assert_eq!(resolve(Mode::Auto, false).unwrap(), Resolved::Userspace);
        assert_eq!(resolve(Mode::Userspace, true).unwrap(), Resolved::Userspace);
        assert_eq!(resolve(Mode::Kernel, true).unwrap(), Resolved::Kernel);
        let err = resolve(Mode::Kernel, false).unwrap_err().to_string();
        assert!(err.contains("no WireGuard module"), "{err}");
    }
}
