//! What meshd does for the `weft` CNI plugin: `meshd install-cni` (the
//! DaemonSet's init container) installs the plugin and its conflist; the
//! agent keeps the node state the plugin reads current, and the policy
//! engine the policy state beside it. Until the node state exists, and
//! (with NetworkPolicy on) the policy state says the node's program is
//! loaded, the plugin refuses every ADD, so an installed conflist never lets
//! a pod attach before meshd has made the node's mesh and its policy.
//! Files are replaced atomically and only when their content changes.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use weft_ipam::{NodeState, PolicyState};

use crate::elf::Linking;

/// The plugin's file name (its `type` in the conflist).
pub const PLUGIN: &str = "weft";

/// The conflist's file name: sorts early so runtimes pick it.
pub const CONFLIST: &str = "10-weft.conflist";

/// The files meshd and the plugin share, as host paths (the plugin runs on
/// the host, so the DaemonSet mounts them at the same paths).
#[derive(Debug, Clone, clap::Args)]
pub struct CniPaths {
    /// Where the plugin reads this node's pod blocks and MTU.
    #[arg(long, default_value = "/run/weft/node.json")]
    pub cni_state_file: PathBuf,
    /// The plugin's pod address store.
    #[arg(long, default_value = "/var/lib/weft/ipam")]
    pub cni_ipam_dir: PathBuf,
}

/// Where the node's container runtime looks for CNI plugins and configs.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeDirs {
    /// Where the runtime looks for plugin binaries.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Where the runtime looks for network configurations.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
}

impl RuntimeDirs {
    pub fn plugin(&self) -> PathBuf {
        self.cni_bin_dir.join(PLUGIN)
    }

    pub fn conflist(&self) -> PathBuf {
        self.cni_conf_dir.join(CONFLIST)
    }
}

/// `meshd install-cni`.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub paths: CniPaths,
    #[command(flatten)]
    pub dirs: RuntimeDirs,
    /// The plugin binary to install; default: `weft` next to meshd.
    #[arg(long)]
    pub cni_plugin: Option<PathBuf>,
    /// Where the reference plugins of [`REFERENCE_PLUGINS`] are (the
    /// image's Debian containernetworking-plugins).
    #[arg(long, default_value = "/usr/lib/cni")]
    pub cni_reference_plugins: PathBuf,
}

/// Reference plugins a node needs beside Weft's, installed where the host
/// has none (a host's own are never replaced): `loopback`, which CRI
/// runtimes run for every pod's `lo`, and `portmap`, chained after Weft's
/// for pods' `hostPort`s.
pub const REFERENCE_PLUGINS: [&str; 2] = ["loopback", PORTMAP];
const PORTMAP: &str = "portmap";

/// The conflist runtimes read. `cniVersion` 1.0.0: libcni 1.1.2 (containerd
/// 1.6, CRI-O, podman 4) rejects 1.1.0.
pub fn conflist(paths: &CniPaths) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "weft",
        "plugins": [
            {
                "type": PLUGIN,
                "stateFile": paths.cni_state_file,
                "ipamDir": paths.cni_ipam_dir,
            },
            // The runtime hands it the pod's hostPorts (runtimeConfig
            // portMappings) and Weft's result: DNAT from the node's
            // addresses to the pod.
            {
                "type": PORTMAP,
                "capabilities": {"portMappings": true},
            },
        ],
    })
}

/// Writes `contents` to `path` atomically, with `mode`, unless it already
/// holds them.
fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> Result<bool> {
    if fs::read(path).is_ok_and(|current| current == contents) {
        return Ok(false);
    }
    weft_keys::write_atomic(path, contents, mode)?;
    Ok(true)
}

/// Installs the plugin binary (mode 0755), the reference plugins the host
/// lacks, and the conflist, and makes the directories the plugin uses.
pub fn install(args: &InstallArgs) -> Result<()> {
    let source = match &args.cni_plugin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("weft"),
    };
    let binary = fs::read(&source)
        .with_context(|| format!("reading the CNI plugin {}", source.display()))?;
    check_static(&source, &binary)?;
    let target = args.dirs.plugin();
    if write_if_changed(&target, &binary, 0o755)? {
        tracing::info!(path = %target.display(), "installed the CNI plugin");
    }
    for name in REFERENCE_PLUGINS {
        let target = args.dirs.cni_bin_dir.join(name);
        if fs::symlink_metadata(&target).is_ok() {
            tracing::info!(path = %target.display(), "kept the host's own plugin");
            continue;
        }
        let source = args.cni_reference_plugins.join(name);
        let binary = fs::read(&source)
            .with_context(|| format!("reading {} (--cni-reference-plugins)", source.display()))?;
        weft_keys::write_atomic(&target, &binary, 0o755)?;
        tracing::info!(path = %target.display(), "installed a reference plugin");
    }
    for dir in [
        args.paths.cni_ipam_dir.as_path(),
        args.paths
            .cni_state_file
            .parent()
            .context("--cni-state-file has no directory")?,
    ] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let conf = serde_json::to_vec_pretty(&conflist(&args.paths))?;
    let conf_path = args.dirs.conflist();
    if write_if_changed(&conf_path, &conf, 0o644)? {
        tracing::info!(path = %conf_path.display(), "wrote the CNI configuration");
    }
    Ok(())
}

/// Refuses a plugin that needs a dynamic loader: it runs on the host, whose
/// libc may be older than the build machine's (Debian 11's glibc 2.31 lacks
/// the 2.34 symbols a bookworm build needs) or not glibc at all.
fn check_static(path: &Path, binary: &[u8]) -> Result<()> {
    match crate::elf::linking(binary).with_context(|| format!("the CNI plugin {}", path.display()))? {
        Linking::Static => Ok(()),
        Linking::Dynamic { interpreter } => anyhow::bail!(
            "the CNI plugin {} is dynamically linked (loader {interpreter}): it runs on the host, whose libc may differ; install the static build (cni/build-static)",
            path.display()
        ),
    }
}

/// Publishes the node state for the plugin if it changed; true if written.
pub fn publish_state(path: &Path, state: &NodeState) -> Result<bool> {
    let bytes = serde_json::to_vec_pretty(state)?;
    write_if_changed(path, &bytes, 0o644)
}

/// Publishes where NetworkPolicy enforcement stands, beside the node state
/// file `node_state`, if it changed; true if written.
pub fn publish_policy(node_state: &Path, state: &PolicyState) -> Result<bool> {
    write_if_changed(
        &PolicyState::path_beside(node_state),
        &state.to_bytes(),
        0o644,
    )
}

/// Pods' traffic crosses the node: it must forward both families. The
/// DaemonSet's init container does this (it is privileged for this one write
/// to /proc/sys); the agent's own container is not, so there it is a check.
pub fn enable_forwarding() -> Result<()> {
    for knob in [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ] {
        if fs::read_to_string(knob)
            .map(|v| v.trim() == "1")
            .unwrap_or(false)
        {
            continue;
        }
        fs::write(knob, "1").with_context(|| format!("enabling {knob}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> InstallArgs {
        InstallArgs {
            paths: CniPaths {
                cni_state_file: dir.join("run/node.json"),
                cni_ipam_dir: dir.join("ipam"),
            },
            dirs: RuntimeDirs {
                cni_bin_dir: dir.join("bin"),
                cni_conf_dir: dir.join("net.d"),
            },
            cni_plugin: Some(dir.join("weft-src")),
            cni_reference_plugins: dir.join("reference"),
        }
    }

    /// An ELF64 header without program headers: no loader, as a static
    /// build has none.
    fn static_elf() -> Vec<u8> {
        let mut elf = b"\x7fELF\x02\x01".to_vec();
        elf.resize(64, 0);
        elf
    }

    #[test]
    fn a_dynamically_linked_plugin_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        // This test binary: linked against the build machine's glibc.
        a.cni_plugin = Some("/proc/self/exe".into());
        let err = format!("{:#}", install(&a).unwrap_err());
        assert!(
            err.contains("is dynamically linked (loader /lib64/ld-linux"),
            "{err}"
        );
        assert!(!a.dirs.plugin().exists(), "installed anyway");
    }

    #[test]
    fn installs_once_and_writes_state_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path());
        fs::write(dir.path().join("weft-src"), static_elf()).unwrap();
        fs::create_dir_all(&a.cni_reference_plugins).unwrap();
        for name in REFERENCE_PLUGINS {
            fs::write(a.cni_reference_plugins.join(name), b"image's").unwrap();
        }
        // The host has its own loopback, not portmap.
        fs::create_dir_all(&a.dirs.cni_bin_dir).unwrap();
        fs::write(a.dirs.cni_bin_dir.join("loopback"), b"host's").unwrap();
        install(&a).unwrap();
        assert_eq!(
            fs::read(a.dirs.cni_bin_dir.join("loopback")).unwrap(),
            b"host's"
        );
        assert_eq!(
            fs::read(a.dirs.cni_bin_dir.join("portmap")).unwrap(),
            b"image's"
        );
        let conf: Value = serde_json::from_slice(&fs::read(a.dirs.conflist()).unwrap()).unwrap();
        assert_eq!(conf["plugins"][0]["type"], "weft");
        assert_eq!(conf["plugins"][1]["type"], "portmap");
        assert_eq!(conf["plugins"][1]["capabilities"]["portMappings"], true);
        assert_eq!(conf["cniVersion"], "1.0.0");
        let installed = a.dirs.plugin();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let state = NodeState::new(vec!["198.19.1.0/24".parse().unwrap()], 1420);
        let state_file = &a.paths.cni_state_file;
        assert!(publish_state(state_file, &state).unwrap());
        assert!(
            !publish_state(state_file, &state).unwrap(),
            "unchanged state is not rewritten"
        );
        assert_eq!(NodeState::read(state_file).unwrap(), Some(state));
        let policy = PolicyState::Broken {
            reason: "nft is missing".into(),
        };
        assert!(publish_policy(state_file, &policy).unwrap());
        assert!(!publish_policy(state_file, &policy).unwrap());
        assert_eq!(
            PolicyState::read(&PolicyState::path_beside(state_file)).unwrap(),
            Some(policy)
        );
    }
}
