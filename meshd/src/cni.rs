//! What meshd does for the `weft` CNI plugin: `meshd install-cni` (the
//! DaemonSet's init container) installs the binaries and makes the plugin's
//! directories; the agent keeps the node state the plugin reads current,
//! the policy engine the policy state beside it, and the agent writes the
//! conflist only once its first sync has made the mesh: a runtime reports
//! the node's network ready when a conflist appears (kubelet then marks the
//! Node Ready), and runtimes on libcni < 1.2 never ask the plugin's STATUS.
//! The plugin still refuses every ADD until the node state exists and (with
//! NetworkPolicy on) the policy state says the node's program is loaded.
//! Files are replaced atomically and only when their content changes.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use weft_ipam::{NodeState, PolicyState};

use crate::elf::Linking;
use crate::model::{ClusterCidrs, ClusterRanges, MeshCidrs};

/// The plugin's file name (its `type` in the conflist).
pub const PLUGIN: &str = "weft";

/// The conflist's file name. Runtimes use the first configuration by file
/// name: this one sorts before the `10-` of other CNIs' leftovers
/// (`10-calico`, `10-containerd-net`, `10-flannel`).
pub const CONFLIST: &str = "05-weft.conflist";
/// Names earlier versions wrote the conflist under: removed.
pub const OLD_CONFLISTS: [&str; 1] = ["10-weft.conflist"];
/// What libcni reads as network configurations in the conf dir.
const CONF_EXTENSIONS: [&str; 3] = [".conf", ".conflist", ".json"];

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

/// Where the node's container runtime looks for CNI plugins.
#[derive(Debug, Clone, clap::Args)]
pub struct BinDir {
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
}

impl BinDir {
    pub fn plugin(&self) -> PathBuf {
        self.cni_bin_dir.join(PLUGIN)
    }
}

/// Where the node's container runtime looks for network configurations.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfDir {
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
}

impl ConfDir {
    pub fn conflist(&self) -> PathBuf {
        self.cni_conf_dir.join(CONFLIST)
    }
}

/// The conflist the agent writes.
#[derive(Debug, Clone, clap::Args)]
pub struct ConflistArgs {
    #[command(flatten)]
    pub dir: ConfDir,
    /// The conflist's `cniVersion`: 1.0.0, which every runtime on libcni
    /// 1.0 or later reads (libcni 1.1.2 — containerd 1.6 and 1.7, podman 4
    /// — rejects 1.1.0), or 1.1.0 where the runtime has libcni 1.2 or later
    /// (containerd 2).
    #[arg(long, env = "WEFT_CNI_VERSION", value_enum, default_value = "1.0.0")]
    pub cni_version: CniVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CniVersion {
    #[value(name = "1.0.0")]
    V1_0_0,
    #[value(name = "1.1.0")]
    V1_1_0,
}

impl CniVersion {
    fn as_str(self) -> &'static str {
        match self {
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }
}

/// `meshd install-cni`.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub paths: CniPaths,
    #[command(flatten)]
    pub bin: BinDir,
    /// The node forwards the families these use.
    #[command(flatten)]
    pub cluster: ClusterCidrs,
    #[command(flatten)]
    pub mesh: MeshCidrs,
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

/// The conflist runtimes read.
pub fn conflist(paths: &CniPaths, version: CniVersion) -> Value {
    json!({
        "cniVersion": version.as_str(),
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

/// Installs the plugin binary (mode 0755) and the reference plugins the
/// host lacks, and makes the directories the plugin uses. No conflist: the
/// agent writes it once the mesh works. Returns the cluster's ranges (the
/// families to forward).
pub fn install(args: &InstallArgs) -> Result<ClusterRanges> {
    // Checked before anything is written.
    let ranges = ClusterRanges::from_flags(&args.cluster, &args.mesh)?;
    let source = match &args.cni_plugin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("weft"),
    };
    let binary = fs::read(&source)
        .with_context(|| format!("reading the CNI plugin {}", source.display()))?;
    check_static(&source, &binary)?;
    let target = args.bin.plugin();
    if write_if_changed(&target, &binary, 0o755)? {
        tracing::info!(path = %target.display(), "installed the CNI plugin");
    }
    for name in REFERENCE_PLUGINS {
        let target = args.bin.cni_bin_dir.join(name);
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
    Ok(ranges)
}

/// Where the mesh stands, as the conf dir is to show it to the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// This meshd has synced: the conflist is written (and kept current).
    Synced,
    /// Not yet, but the node state exists: a meshd made the mesh earlier
    /// since boot (the state lives in /run) and it still carries traffic,
    /// so a conflist there stays (a restart of meshd is no outage).
    Inherited,
    /// No mesh since boot: no conflist, so the runtime reports no network
    /// (a conflist left from before a reboot would report one).
    NotYet,
}

/// What becomes of Weft's conflist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ours {
    Write,
    Keep,
    Remove,
}

/// What the conf dir needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfDirPlan {
    pub ours: Ours,
    /// Weft's conflists under old names, to remove.
    pub stale: Vec<String>,
    /// Other configurations that sort before Weft's: a runtime uses the
    /// first, so while one is there pods get that network, not Weft's.
    pub ahead: Vec<String>,
}

/// The conf dir holding the files `names`, with the mesh at `readiness`.
pub fn plan_conf_dir(readiness: Readiness, names: &[String]) -> ConfDirPlan {
    // An earlier version's conflist goes with the first sync (once ours is
    // written) or with a reboot; a meshd upgraded within the boot keeps it
    // until then, so the runtime never sees the network vanish.
    let stale = names
        .iter()
        .filter(|n| readiness != Readiness::Inherited && OLD_CONFLISTS.contains(&n.as_str()))
        .cloned()
        .collect();
    let mut ahead: Vec<String> = names
        .iter()
        .filter(|n| CONF_EXTENSIONS.iter().any(|e| n.ends_with(e)))
        .filter(|n| n.as_str() < CONFLIST && !OLD_CONFLISTS.contains(&n.as_str()))
        .cloned()
        .collect();
    ahead.sort();
    let ours = match readiness {
        Readiness::Synced => Ours::Write,
        Readiness::Inherited => Ours::Keep,
        Readiness::NotYet => Ours::Remove,
    };
    ConfDirPlan { ours, stale, ahead }
}

/// The mesh's readiness before this meshd's first sync, from the node state
/// an earlier meshd of this boot left.
pub fn readiness_at_start(paths: &CniPaths) -> Readiness {
    if paths.cni_state_file.exists() {
        Readiness::Inherited
    } else {
        Readiness::NotYet
    }
}

/// Brings the conf dir to what [`plan_conf_dir`] says; returns the plan.
pub fn tend_conf_dir(
    args: &ConflistArgs,
    paths: &CniPaths,
    readiness: Readiness,
) -> Result<ConfDirPlan> {
    let dir = &args.dir.cni_conf_dir;
    let names: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let plan = plan_conf_dir(readiness, &names);
    let ours = args.dir.conflist();
    match plan.ours {
        Ours::Write => {
            let conf = serde_json::to_vec_pretty(&conflist(paths, args.cni_version))?;
            if write_if_changed(&ours, &conf, 0o644)? {
                tracing::info!(path = %ours.display(), "wrote the CNI configuration: the runtime sees the network");
            }
        }
        Ours::Keep => {}
        Ours::Remove => {
            if remove_file(&ours)? {
                tracing::info!(path = %ours.display(), "removed the CNI configuration until the mesh is made");
            }
        }
    }
    for name in &plan.stale {
        if remove_file(&dir.join(name))? {
            tracing::info!(name, "removed Weft's conflist of an earlier version");
        }
    }
    Ok(plan)
}

/// Removes `path`; false if it was not there.
fn remove_file(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
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

const IPV4_FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// An interface's `accept_ra` knob.
fn accept_ra(interface: &str) -> String {
    format!("/proc/sys/net/ipv6/conf/{interface}/accept_ra")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardingError {
    #[error("the cluster's ranges (--cluster-cidr, --mesh-cidr) include IPv6, but this host has IPv6 turned off (ipv6.disable=1): use IPv4-only ranges (deploy/overlays/ipv4-only) or turn IPv6 on")]
    Ipv6Disabled,
}

/// The sysctl writes, in order, that let the node forward pods' traffic of
/// the families the cluster uses (`v6`), given the knobs' `current`
/// values (absent: no such file) and the `uplinks` that hold routes learned
/// from router advertisements. IPv4 always; IPv6 only for IPv6 ranges, so
/// a host without IPv6 runs the IPv4-only overlay. Turning IPv6 forwarding
/// on makes the kernel ignore router advertisements on every interface
/// whose `accept_ra` is 1, and the uplink's default route would expire: 2
/// keeps taking them, set first.
pub fn forwarding_writes(
    v6: bool,
    current: &BTreeMap<String, String>,
    uplinks: &[String],
) -> Result<Vec<(String, &'static str)>, ForwardingError> {
    let is = |knob: &str, value: &str| current.get(knob).map(String::as_str) == Some(value);
    let mut writes = Vec::new();
    if !is(IPV4_FORWARDING, "1") {
        writes.push((IPV4_FORWARDING.to_string(), "1"));
    }
    if !v6 {
        return Ok(writes);
    }
    if !current.contains_key(IPV6_FORWARDING) {
        return Err(ForwardingError::Ipv6Disabled);
    }
    if !is(IPV6_FORWARDING, "1") {
        for uplink in uplinks {
            if is(&accept_ra(uplink), "1") {
                writes.push((accept_ra(uplink), "2"));
            }
        }
        writes.push((IPV6_FORWARDING.to_string(), "1"));
    }
    Ok(writes)
}

/// Pods' traffic crosses the node: it must forward the cluster's families
/// ([`forwarding_writes`]). The DaemonSet's init container does this (it is
/// privileged for these writes to /proc/sys); the agent's own container is
/// not, so there it is a check that fails if anything is left to write.
pub async fn enable_forwarding(ranges: &ClusterRanges) -> Result<()> {
    let v6 = ranges.has_v6();
    let uplinks = if v6 && Path::new(IPV6_FORWARDING).exists() {
        crate::reconcile::netlink::Netlink::new()?
            .ra_interfaces()
            .await?
    } else {
        Vec::new()
    };
    let current: BTreeMap<String, String> =
        [IPV4_FORWARDING.to_string(), IPV6_FORWARDING.to_string()]
            .into_iter()
            .chain(uplinks.iter().map(|u| accept_ra(u)))
            .filter_map(|knob| {
                let value = fs::read_to_string(&knob).ok()?.trim().to_string();
                Some((knob, value))
            })
            .collect();
    for (knob, value) in forwarding_writes(v6, &current, &uplinks)? {
        fs::write(&knob, value).with_context(|| format!("writing {value} to {knob}"))?;
        tracing::info!(knob, value, "set");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> InstallArgs {
        InstallArgs {
            paths: paths(dir),
            bin: BinDir {
                cni_bin_dir: dir.join("bin"),
            },
            cluster: ClusterCidrs {
                cluster_cidrs: vec!["198.19.0.0/16".parse().unwrap()],
            },
            mesh: MeshCidrs {
                mesh_cidrs: vec!["100.64.0.0/16".parse().unwrap()],
                peer_cidrs: vec!["100.65.0.0/16".parse().unwrap()],
            },
            cni_plugin: Some(dir.join("weft-src")),
            cni_reference_plugins: dir.join("reference"),
        }
    }

    fn paths(dir: &Path) -> CniPaths {
        CniPaths {
            cni_state_file: dir.join("run/node.json"),
            cni_ipam_dir: dir.join("ipam"),
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
        assert!(!a.bin.plugin().exists(), "installed anyway");
    }

    #[test]
    fn installs_binaries_once_and_writes_state_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path());
        fs::write(dir.path().join("weft-src"), static_elf()).unwrap();
        fs::create_dir_all(&a.cni_reference_plugins).unwrap();
        for name in REFERENCE_PLUGINS {
            fs::write(a.cni_reference_plugins.join(name), b"image's").unwrap();
        }
        // The host has its own loopback, not portmap.
        fs::create_dir_all(&a.bin.cni_bin_dir).unwrap();
        fs::write(a.bin.cni_bin_dir.join("loopback"), b"host's").unwrap();
        install(&a).unwrap();
        assert_eq!(
            fs::read(a.bin.cni_bin_dir.join("loopback")).unwrap(),
            b"host's"
        );
        assert_eq!(
            fs::read(a.bin.cni_bin_dir.join("portmap")).unwrap(),
            b"image's"
        );
        assert!(a.paths.cni_ipam_dir.is_dir());
        let installed = a.bin.plugin();
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

    #[test]
    fn the_conflist_appears_with_the_mesh_and_others_ahead_are_named() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let dir = names(&[
            "10-weft.conflist",
            "10-flannel.conflist",
            "00-other.conf",
            "05-weft.conflist",
            "01-notes.txt",
            "04-x.json",
            "99-loopback.conf",
        ]);
        for (readiness, ours, stale) in [
            (Readiness::Synced, Ours::Write, &["10-weft.conflist"][..]),
            (Readiness::Inherited, Ours::Keep, &[]),
            (Readiness::NotYet, Ours::Remove, &["10-weft.conflist"]),
        ] {
            assert_eq!(
                plan_conf_dir(readiness, &dir),
                ConfDirPlan {
                    ours,
                    stale: names(stale),
                    ahead: names(&["00-other.conf", "04-x.json"]),
                },
                "{readiness:?}"
            );
        }
        assert_eq!(
            plan_conf_dir(Readiness::Synced, &[]),
            ConfDirPlan {
                ours: Ours::Write,
                stale: vec![],
                ahead: vec![],
            }
        );
    }

    #[test]
    fn tending_the_conf_dir_writes_removes_and_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        let args = ConflistArgs {
            dir: ConfDir {
                cni_conf_dir: dir.path().join("net.d"),
            },
            cni_version: CniVersion::V1_0_0,
        };
        let ours = args.dir.conflist();
        // No conf dir yet, no mesh: nothing to do.
        tend_conf_dir(&args, &paths, Readiness::NotYet).unwrap();
        assert!(!ours.exists());
        let old = args.dir.cni_conf_dir.join("10-weft.conflist");
        fs::create_dir_all(&args.dir.cni_conf_dir).unwrap();
        fs::write(&old, b"{}").unwrap();
        tend_conf_dir(&args, &paths, Readiness::Synced).unwrap();
        assert!(!old.exists(), "the old name stayed");
        let conf: Value = serde_json::from_slice(&fs::read(&ours).unwrap()).unwrap();
        assert_eq!(conf["cniVersion"], "1.0.0");
        assert_eq!(conf["plugins"][0]["type"], "weft");
        assert_eq!(conf["plugins"][0]["stateFile"], json!(paths.cni_state_file));
        assert_eq!(conf["plugins"][1]["type"], "portmap");
        assert_eq!(conf["plugins"][1]["capabilities"]["portMappings"], true);
        tend_conf_dir(&args, &paths, Readiness::Inherited).unwrap();
        assert!(ours.exists(), "a restarted meshd took the network away");
        tend_conf_dir(&args, &paths, Readiness::NotYet).unwrap();
        assert!(!ours.exists(), "a conflist from before the boot stayed");
        let newer = ConflistArgs {
            cni_version: CniVersion::V1_1_0,
            ..args
        };
        tend_conf_dir(&newer, &paths, Readiness::Synced).unwrap();
        let conf: Value = serde_json::from_slice(&fs::read(&ours).unwrap()).unwrap();
        assert_eq!(conf["cniVersion"], "1.1.0");
    }

    #[test]
    fn the_cni_version_is_one_a_runtime_takes() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            conflist: ConflistArgs,
        }
        use clap::Parser;
        let default = Cli::parse_from(["meshd"]).conflist;
        assert_eq!(default.cni_version, CniVersion::V1_0_0);
        let err = Cli::try_parse_from(["meshd", "--cni-version", "1.2.0"])
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("--cni-version") && err.contains("1.1.0"),
            "{err}"
        );
    }

    #[test]
    fn forwarding_what_the_families_need_keeping_router_advertisements() {
        let knobs = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let uplinks = vec!["eth0".to_string(), "eth1".to_string()];
        let ra0 = "/proc/sys/net/ipv6/conf/eth0/accept_ra";
        let ra1 = "/proc/sys/net/ipv6/conf/eth1/accept_ra";
        let w = |v: &[(&str, &'static str)]| -> Vec<(String, &'static str)> {
            v.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        let off = knobs(&[
            (IPV4_FORWARDING, "0"),
            (IPV6_FORWARDING, "0"),
            (ra0, "1"),
            (ra1, "0"),
        ]);
        let on = knobs(&[(IPV4_FORWARDING, "1"), (IPV6_FORWARDING, "1"), (ra0, "1")]);
        let no_ipv6 = knobs(&[(IPV4_FORWARDING, "0")]);
        for (v6, current, want) in [
            // IPv4-only ranges: IPv6 untouched, wherever IPv6 stands.
            (false, &off, Ok(w(&[(IPV4_FORWARDING, "1")]))),
            (false, &no_ipv6, Ok(w(&[(IPV4_FORWARDING, "1")]))),
            // accept_ra 2 on the uplink taking RAs, before forwarding.
            (
                true,
                &off,
                Ok(w(&[
                    (IPV4_FORWARDING, "1"),
                    (ra0, "2"),
                    (IPV6_FORWARDING, "1"),
                ])),
            ),
            (true, &on, Ok(vec![])),
            (true, &no_ipv6, Err(ForwardingError::Ipv6Disabled)),
        ] {
            assert_eq!(
                forwarding_writes(v6, current, &uplinks),
                want,
                "v6 {v6}, {current:?}"
            );
        }
    }
}
