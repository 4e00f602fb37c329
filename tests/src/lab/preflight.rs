//! Checks that fail early with an actionable message: root, and the tools
//! the lab runs, each named with the Debian package that provides it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Where `tests/setup` unpacks Debian's `kubernetes-client` (kubectl 1.20):
/// images that ship another kubectl at /usr/bin/kubectl block installing it.
pub const DEBIAN_KUBECTL: &str = "/usr/local/lib/meshlab/kubernetes-client/usr/bin/kubectl";

/// Where `tests/setup` builds wireguard-go 867a4c4 (from `tests/anchors`):
/// the current upstream userspace WireGuard, with offloads.
pub const WIREGUARD_GO_867A4C4: &str = "/usr/local/lib/meshlab/wireguard-go-867a4c4";

pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("meshlab creates network namespaces and must run as root (try: sudo meshlab …)");
    }
    Ok(())
}

/// The first `tool` on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Fails naming the package for the first missing `(tool, package)`.
pub fn require_tools(tools: &[(&str, &str)]) -> Result<()> {
    for (tool, package) in tools {
        if which(tool).is_none() {
            bail!("{tool} is not installed: apt-get install {package} (or run tests/setup)");
        }
    }
    Ok(())
}

/// The kubectl `meshlab kubectl` runs: `$MESHLAB_KUBECTL`, else Debian's
/// unpacked by tests/setup, else whatever `kubectl` is on PATH.
pub fn kubectl() -> Result<PathBuf> {
    if let Some(explicit) = std::env::var_os("MESHLAB_KUBECTL") {
        return Ok(explicit.into());
    }
    if Path::new(DEBIAN_KUBECTL).is_file() {
        return Ok(DEBIAN_KUBECTL.into());
    }
    which("kubectl").ok_or_else(|| {
        anyhow::anyhow!(
            "kubectl is not installed: run tests/setup (it unpacks Debian's kubernetes-client)"
        )
    })
}
