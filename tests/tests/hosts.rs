//! The installed `weft` plugin on hosts unlike the build machine. The
//! plugin runs on the node, not in Weft's image: here it is installed the
//! way `meshd install-cni` installs it into a node's root, and the runtime's
//! ADD, CHECK and DEL run inside that root (chroot, with a real network
//! namespace and the node state file as meshd writes it):
//! - a Debian 11 root (glibc 2.31; a plugin linked against bookworm's glibc
//!   fails there with "GLIBC_2.34 not found"), built with mmdebstrap from
//!   this machine's own Debian package source and cached under target/;
//! - a root with no libc at all (busybox-static only), standing in for a
//!   musl host (Alpine), where a dynamically linked plugin has no loader.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{run_bounded, run_bounded_with_input};
use serde_json::Value;
use weft_ipam::{NodeState, PodStore, PolicyState};
use weft_meshd::cni::{CniPaths, CniVersion};

/// Where the plugin's files are on the node, as the plugin sees them
/// (inside the root: the DaemonSet mounts them at the same host paths).
const STATE_FILE: &str = "/run/weft/node.json";
const IPAM_DIR: &str = "/var/lib/weft/ipam";
const BIN_DIR: &str = "/opt/cni/bin";
const BLOCKS: [&str; 2] = ["198.19.7.0/24", "fd98:19:0:7::/64"];

/// Network namespaces deleted when dropped, even if the test failed.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn new(names: &[&str]) -> Self {
        let ns = Namespaces(names.iter().map(|n| n.to_string()).collect());
        for n in &ns.0 {
            // Leftovers of an earlier run that died.
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            ip(&["netns", "add", n]);
        }
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

fn ip(args: &[&str]) -> String {
    let out = run_bounded(
        {
            let mut c = Command::new("ip");
            c.args(args);
            c
        },
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The first non-security entry of a deb822 sources file with its suites
/// replaced by `suite`: the same mirror (and keyring) for an older release.
fn sources_for(deb822: &str, suite: &str) -> Option<String> {
    deb822
        .split("\n\n")
        .find(|stanza| {
            stanza
                .lines()
                .any(|l| l.starts_with("Suites:") && !l.contains("-security"))
        })
        .map(|stanza| {
            stanza
                .lines()
                .map(|l| {
                    if l.starts_with("Suites:") {
                        format!("Suites: {suite}")
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        })
}

#[test]
fn sources_for_an_older_release_keep_the_mirror() {
    let machine = "Types: deb\n# snapshot\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n";
    assert_eq!(
        sources_for(machine, "bullseye").unwrap(),
        "Types: deb\n# snapshot\nURIs: http://deb.debian.org/debian\nSuites: bullseye\nComponents: main\nSigned-By: /k.gpg\n"
    );
    let security_only = "URIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
    assert_eq!(sources_for(security_only, "bullseye"), None);
}

/// A Debian 11 root (`--variant=essential`: libc, coreutils, no apt),
/// built once from this machine's package source and kept under target/
/// (CI: tests/setup installs mmdebstrap; the registry is all it reaches).
fn debian11_root() -> PathBuf {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("roots");
    fs::create_dir_all(&cache).unwrap();
    let root = cache.join("debian-bullseye");
    // One builder at a time; the others wait and use its root.
    let lock = fs::File::create(cache.join("lock")).unwrap();
    lock.lock().unwrap();
    if !root.join("usr/bin/env").is_file() {
        let machine = "/etc/apt/sources.list.d/debian.sources";
        let sources = fs::read_to_string(machine)
            .ok()
            .and_then(|s| sources_for(&s, "bullseye"))
            .unwrap_or_else(|| panic!("{machine}: no Debian entry to build a bullseye root from"));
        let partial = cache.join("debian-bullseye.partial");
        let _ = fs::remove_dir_all(&partial);
        let _ = fs::remove_dir_all(&root);
        let mut mmdebstrap = Command::new("mmdebstrap");
        mmdebstrap
            .args(["--quiet", "--variant=essential", "bullseye"])
            .arg(&partial)
            .arg("-");
        // Seconds from a nearby mirror; bounded for a slow one.
        let out = run_bounded_with_input(
            mmdebstrap,
            Some(sources.as_bytes()),
            Duration::from_secs(600),
        );
        assert!(
            out.status.success(),
            "mmdebstrap bullseye: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::rename(&partial, &root).unwrap();
    }
    root
}

/// A root with busybox-static and nothing else: no libc, no loader.
fn libc_free_root(dir: &Path) -> PathBuf {
    let root = dir.join("busybox");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static (run tests/setup)");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    root
}

/// `root`'s own view of a path inside it.
fn inside(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Ranges of the families of `cidrs` (`v4`, and `v6` where it has one),
/// apart from them: meshd's mesh and peer ranges may not overlap the pods'.
fn apart(cidrs: &str, v4: &str, v6: &str) -> String {
    match cidrs.contains(':') {
        true => format!("{v4},{v6}"),
        false => v4.to_string(),
    }
}

/// `meshd install-cni` in the node namespace `node`, into `root`'s CNI
/// and Weft directories, for the cluster ranges `cidrs`, after the shell
/// commands `prelude` (in the same mount namespace); its output.
fn install_cni(node: &str, root: &Path, cidrs: &str, prelude: &str) -> Output {
    let plugin = meshlab::lab::agents::plugin().expect("the static plugin (cni/build-static)");
    let meshd = meshlab::lab::agents::sibling("meshd").expect("meshd is built");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node, "sh", "-c"])
        .arg(format!("{prelude} exec \"$0\" \"$@\""))
        .arg(meshd)
        .arg("install-cni")
        .arg(format!("--cluster-cidr={cidrs}"))
        .arg(format!(
            "--mesh-cidr={}",
            apart(cidrs, "198.18.128.0/17", "fd98:18::/64")
        ))
        .arg(format!(
            "--peer-cidr={}",
            apart(cidrs, "100.65.0.0/16", "fd64:77:70::/64")
        ))
        .arg(format!("--cni-plugin={}", plugin.display()))
        .arg(format!("--cni-bin-dir={}", inside(root, BIN_DIR).display()))
        .arg(format!(
            "--cni-state-file={}",
            inside(root, STATE_FILE).display()
        ))
        .arg(format!(
            "--cni-ipam-dir={}",
            inside(root, IPAM_DIR).display()
        ));
    run_bounded(cmd, Duration::from_secs(30))
}

/// Installs the plugin into `root` as the DaemonSet's init container does
/// (`meshd install-cni` in the node namespace), and the node state and
/// policy state as meshd's first sync publishes them; what meshd writes as
/// the conflist's plugin configuration, as the runtime hands it to the
/// plugin.
fn install(node: &str, root: &Path) -> Value {
    for leftover in [BIN_DIR, "/run/weft", "/var/lib/weft"] {
        let _ = fs::remove_dir_all(inside(root, leftover));
    }
    let out = install_cni(node, root, "198.19.0.0/16,fd98:19::/48", "");
    assert!(
        out.status.success(),
        "meshd install-cni: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state_file = inside(root, STATE_FILE);
    let blocks = BLOCKS.iter().map(|b| b.parse().unwrap()).collect();
    weft_meshd::cni::publish_state(&state_file, &NodeState::new(blocks, 1420)).unwrap();
    weft_meshd::cni::publish_policy(&state_file, &PolicyState::Off).unwrap();
    let paths = CniPaths {
        cni_state_file: STATE_FILE.into(),
        cni_ipam_dir: IPAM_DIR.into(),
    };
    let conflist = weft_meshd::cni::conflist(&paths, CniVersion::V1_0_0);
    meshlab::lab::pods::weft_config(&conflist)
}

/// Runs the installed plugin inside `root`, in the node namespace `node`,
/// as a runtime on that host runs it: the namespace's /run/netns and a
/// /proc inside the root (in a mount namespace of its own: `ip netns exec`
/// makes one).
fn plugin(root: &Path, node: &str, command: &str, conf: &Value, pod_netns: &str) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node, "sh", "-c"])
        .arg(
            r#"mkdir -p "$0/proc" "$0/run/netns" && mount -t proc proc "$0/proc" \
               && mount --rbind /run/netns "$0/run/netns" && exec chroot "$0" /opt/cni/bin/weft"#,
        )
        .arg(root)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", format!("/run/netns/{pod_netns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", BIN_DIR)
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
        );
    // Bounded: the plugin answers in milliseconds.
    run_bounded_with_input(
        cmd,
        Some(conf.to_string().as_bytes()),
        Duration::from_secs(30),
    )
}

/// ADD gives the pod its addresses (seen inside the pod's namespace),
/// CHECK agrees, DEL takes the veth and releases the addresses.
fn attach_check_detach(root: &Path, prefix: &str) {
    let (node, pod) = (format!("{prefix}-node"), format!("{prefix}-pod"));
    let _ns = Namespaces::new(&[&node, &pod]);
    let conf = install(&node, root);
    let answer = |out: &Output, what: &str| -> Value {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{what} in {}: {stdout}{}",
            root.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(stdout.trim()).unwrap_or(Value::Null)
    };
    let result = answer(&plugin(root, &node, "ADD", &conf, &pod), "ADD");
    let ips: Vec<String> = result["ips"]
        .as_array()
        .unwrap_or_else(|| panic!("ADD answered {result}"))
        .iter()
        .map(|i| {
            i["address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ips.len(), 2, "one address per block: {result}");
    let in_pod = ip(&["-n", &pod, "-o", "addr", "show", "dev", "eth0"]);
    for (ip, block) in ips.iter().zip(BLOCKS) {
        let block: ipnet::IpNet = block.parse().unwrap();
        assert!(
            block.contains(&ip.parse::<std::net::IpAddr>().unwrap()),
            "{ip} outside {block}"
        );
        assert!(
            in_pod.contains(&format!(" {ip}/")),
            "the pod lacks {ip}: {in_pod}"
        );
    }
    let store = PodStore::new(inside(root, IPAM_DIR));
    assert_eq!(
        store.attached_pods().unwrap().len(),
        1,
        "the allocation is recorded"
    );

    let mut with_result = conf.clone();
    with_result["prevResult"] = result;
    answer(&plugin(root, &node, "CHECK", &with_result, &pod), "CHECK");
    answer(&plugin(root, &node, "DEL", &with_result, &pod), "DEL");
    assert!(
        store.attached_pods().unwrap().is_empty(),
        "DEL left the addresses held"
    );
    let veths = ip(&["-n", &node, "-o", "link"]);
    assert!(!veths.contains(" wp"), "DEL left the veth: {veths}");
}

#[test]
fn the_installed_plugin_runs_on_debian_11() {
    attach_check_detach(&debian11_root(), "t-hosts-deb11");
}

#[test]
fn the_installed_plugin_runs_without_any_libc() {
    let dir = tempfile::tempdir().unwrap();
    attach_check_detach(&libc_free_root(dir.path()), "t-hosts-nolibc");
}

/// `meshd install-cni` lets a node forward only the families its cluster
/// ranges use: on a host without IPv6 (ipv6.disable=1, emulated by hiding
/// /proc/sys/net/ipv6 in the install's mount namespace) the IPv4-only
/// overlay installs, and IPv6 ranges are refused with a clear error. With
/// IPv6, the uplink that takes router advertisements keeps taking them
/// (accept_ra 2: with 1, turning forwarding on makes the kernel ignore
/// them); other interfaces are left as they are.
#[test]
fn install_cni_forwards_what_the_ranges_need() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let node = "t-hosts-fwd";
    let _ns = Namespaces::new(&[node]);
    let sysctl = |knob: &str| {
        ip(&[
            "netns",
            "exec",
            node,
            "cat",
            &format!("/proc/sys/net/{knob}"),
        ])
        .trim()
        .to_string()
    };
    let no_ipv6 = "mount -t tmpfs none /proc/sys/net/ipv6 &&";
    let v4 = "198.19.0.0/16";
    let dual = "198.19.0.0/16,fd98:19::/48";

    let installed = |out: Output, what: &str| {
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    };
    installed(
        install_cni(node, root, v4, no_ipv6),
        "IPv4-only on a host without IPv6",
    );
    assert_eq!(sysctl("ipv4/ip_forward"), "1");
    assert_eq!(
        sysctl("ipv6/conf/all/forwarding"),
        "0",
        "IPv6 forwarding turned on for IPv4-only ranges"
    );
    let out = install_cni(node, root, dual, no_ipv6);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ipv6.disable=1"),
        "{err}"
    );

    // An uplink with a route learned from router advertisements, and an
    // interface that takes them but has none.
    for (link, peer) in [("up0", "up0p"), ("other0", "other0p")] {
        ip(&[
            "-n", node, "link", "add", link, "type", "veth", "peer", "name", peer,
        ]);
        ip(&["-n", node, "link", "set", link, "up"]);
        ip(&["-n", node, "link", "set", peer, "up"]);
        ip(&[
            "netns",
            "exec",
            node,
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{link}.accept_ra=1"),
        ]);
    }
    ip(&[
        "-n", node, "-6", "route", "add", "default", "via", "fe80::1", "dev", "up0", "proto", "ra",
    ]);
    installed(install_cni(node, root, dual, ""), "dual-stack");
    assert_eq!(sysctl("ipv6/conf/all/forwarding"), "1");
    assert_eq!(
        sysctl("ipv6/conf/up0/accept_ra"),
        "2",
        "the uplink stops taking router advertisements"
    );
    assert_eq!(
        sysctl("ipv6/conf/other0/accept_ra"),
        "1",
        "an interface without RA routes was changed"
    );
}
