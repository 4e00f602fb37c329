//! Network namespaces, veths and the bridge, through iproute2's `ip`.
//!
//! The lab is built once per run, so readable `ip` invocations beat netlink
//! code here; meshd's data path uses rtnetlink.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::topology::{
    LabPlan, NodePlan, FABRIC_GATEWAY, FABRIC_GATEWAY6, FABRIC_UNDERLAY6, UNDERLAY6_PREFIX,
};

const NETNS_DIR: &str = "/run/netns";

/// Runs `ip ARGS…`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip -n NETNS ARGS…`
pub fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Creates the fabric namespace and its bridge, holding the gateway
/// addresses, with the plaintext sentinel armed before any node exists,
/// and the outside host behind it. The fabric routes what nodes send to
/// the gateway on to the outside host and nowhere else; with sites, each
/// has its own bridge and the fabric routes between them too
/// ([`super::sites`]).
pub fn create_fabric(plan: &LabPlan) -> Result<()> {
    let ns = plan.fabric_netns.as_str();
    ip(&["netns", "add", ns])?;
    ip_in(ns, &["link", "set", "lo", "up"])?;
    add_bridge(ns, &plan.bridge, 0)?;
    let gw = format!("{FABRIC_GATEWAY}/{}", plan.fabric_cidr.prefix_len());
    ip_in(ns, &["addr", "add", &gw, "dev", &plan.bridge])?;
    let gw6 = format!("{FABRIC_GATEWAY6}/64");
    ip_in(ns, &["addr", "add", &gw6, "dev", &plan.bridge, "nodad"])?;
    let underlay6 = format!("{FABRIC_UNDERLAY6}/{UNDERLAY6_PREFIX}");
    ip_in(
        ns,
        &["addr", "add", &underlay6, "dev", &plan.bridge, "nodad"],
    )?;
    super::sentinel::arm(ns)?;
    ip_in(ns, &["link", "set", &plan.bridge, "up"])?;
    for (i, site) in (1..).zip(&plan.sites) {
        add_bridge(ns, &site.bridge, i)?;
        ip_in(ns, &["link", "set", &site.bridge, "up"])?;
        match &site.router {
            Some(router) => super::sites::create_router(plan, site, router)?,
            None => {
                let gw = format!("{}/{}", site.gateway, site.cidr.prefix_len());
                ip_in(ns, &["addr", "add", &gw, "dev", &site.bridge])?;
                ip_in(ns, &["addr", "add", &gw6, "dev", &site.bridge, "nodad"])?;
            }
        }
    }
    create_outside(plan)?;
    sysctl(ns, "net.ipv4.ip_forward=1")?;
    sysctl(ns, "net.ipv6.conf.all.forwarding=1")
}

/// The outside host ([`super::topology::OUTSIDE_HOST`]): a namespace on a
/// veth from the fabric, routing back to the underlays only.
fn create_outside(plan: &LabPlan) -> Result<()> {
    use super::topology::{
        outside_netns, OUTSIDE_GATEWAY, OUTSIDE_GATEWAY6, OUTSIDE_HOST, OUTSIDE_HOST6,
        OUTSIDE_PREFIX,
    };
    let fabric = plan.fabric_netns.as_str();
    let outside = outside_netns(&plan.name);
    ip(&["netns", "add", &outside])?;
    ip_in(&outside, &["link", "set", "lo", "up"])?;
    ip_in(
        &outside,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "outside", "netns", fabric,
        ],
    )?;
    ip_in(
        fabric,
        &[
            "addr",
            "add",
            &format!("{OUTSIDE_GATEWAY}/{OUTSIDE_PREFIX}"),
            "dev",
            "outside",
        ],
    )?;
    ip_in(
        fabric,
        &[
            "addr",
            "add",
            &format!("{OUTSIDE_GATEWAY6}/64"),
            "dev",
            "outside",
            "nodad",
        ],
    )?;
    ip_in(fabric, &["link", "set", "outside", "up"])?;
    ip_in(
        &outside,
        &[
            "addr",
            "add",
            &format!("{OUTSIDE_HOST}/{OUTSIDE_PREFIX}"),
            "dev",
            "eth0",
        ],
    )?;
    ip_in(
        &outside,
        &[
            "addr",
            "add",
            &format!("{OUTSIDE_HOST6}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    )?;
    ip_in(&outside, &["link", "set", "eth0", "up"])?;
    let underlay6 = ipnet::Ipv6Net::new(FABRIC_UNDERLAY6, UNDERLAY6_PREFIX)?;
    ip_in(
        &outside,
        &[
            "-6",
            "route",
            "add",
            &underlay6.trunc().to_string(),
            "via",
            &OUTSIDE_GATEWAY6.to_string(),
        ],
    )?;
    let gateway = OUTSIDE_GATEWAY.to_string();
    // A NAT'd site's addresses are private: nothing routes to them.
    let public_sites = plan.sites.iter().filter(|s| !s.nat.is_nat());
    let underlays = std::iter::once(plan.fabric_cidr).chain(public_sites.map(|s| s.cidr));
    for underlay in underlays {
        ip_in(
            &outside,
            &["route", "add", &underlay.to_string(), "via", &gateway],
        )?;
    }
    Ok(())
}

/// A fabric bridge with an address of its own (locally administered,
/// `index` tells the bridges of a fabric apart). Without one, Linux gives a
/// bridge the lowest address among its ports, so a node joining or leaving
/// changed the gateway's MAC under every node's ARP entry: each node's
/// traffic to the gateway and the API server went to the old address until
/// its neighbour entry failed and was resolved again, ~13 s (a restarted
/// meshd's first connections to the API server waited that long).
fn add_bridge(netns: &str, name: &str, index: u8) -> Result<()> {
    let mac = format!("02:77:65:66:74:{index:02x}");
    ip_in(
        netns,
        &["link", "add", name, "address", &mac, "type", "bridge"],
    )
}

/// `sysctl -w SETTING` inside `netns`.
pub fn sysctl(netns: &str, setting: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-qw", setting])
        .output()
        .context("running sysctl (install procps)")?;
    if !out.status.success() {
        bail!(
            "sysctl -w {setting} in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Creates a node namespace wired to the fabric bridge by a veth.
pub fn create_node(plan: &LabPlan, node: &NodePlan) -> Result<()> {
    let ns = node.netns.as_str();
    ip(&["netns", "add", ns])?;
    ip_in(ns, &["link", "set", "lo", "up"])?;
    nft(ns, &["-f", "-"], Some(HOST_FIREWALL))?;
    // Both ends are created directly inside their namespaces: nothing of the
    // lab ever appears in the host's namespace.
    ip_in(
        ns,
        &[
            "link",
            "add",
            &node.interface,
            "type",
            "veth",
            "peer",
            "name",
            &node.fabric_interface,
            "netns",
            &plan.fabric_netns,
        ],
    )?;
    let (prefix_len, gateway, bridge) = match plan.site_of(node) {
        Some(site) => (site.cidr.prefix_len(), site.gateway, site.bridge.as_str()),
        None => (
            plan.fabric_cidr.prefix_len(),
            FABRIC_GATEWAY,
            plan.bridge.as_str(),
        ),
    };
    let addr = format!("{}/{prefix_len}", node.underlay);
    ip_in(ns, &["addr", "add", &addr, "dev", &node.interface])?;
    // Added second: the site address stays the source of what leaves
    // the site.
    if let Some(lan) = node.lan {
        let addr = format!("{lan}/{}", super::topology::LAN_PREFIX);
        ip_in(ns, &["addr", "add", &addr, "dev", &node.interface])?;
    }
    if let Some(v6) = super::topology::underlay6(node) {
        let addr = format!("{v6}/{UNDERLAY6_PREFIX}");
        ip_in(ns, &["addr", "add", &addr, "dev", &node.interface, "nodad"])?;
    }
    ip_in(ns, &["link", "set", &node.interface, "up"])?;
    // Default routes, as every real node has: whatever a node does not
    // route itself goes out onto the fabric, where the sentinel sees it.
    let gw = gateway.to_string();
    ip_in(ns, &["route", "add", "default", "via", &gw])?;
    ip_in(
        ns,
        &[
            "-6",
            "route",
            "add",
            "default",
            "via",
            FABRIC_GATEWAY6,
            "dev",
            &node.interface,
        ],
    )?;
    let fabric = plan.fabric_netns.as_str();
    ip_in(
        fabric,
        &["link", "set", &node.fabric_interface, "master", bridge],
    )?;
    ip_in(fabric, &["link", "set", &node.fabric_interface, "up"])
}

/// A stand-in answering for the node's pods without any pod attached: a
/// bridge `pods0` holding each block's gateway address as a host address
/// (the address every pod veth's node side carries too), so no block-wide
/// route competes with the pods' own.
pub fn create_pod_standin(node: &NodePlan) -> Result<()> {
    let ns = node.netns.as_str();
    ip_in(ns, &["link", "add", "pods0", "type", "bridge"])?;
    for cidr in &node.pod_cidrs {
        let addr = format!("{}/{}", weft_ipam::gateway(cidr), cidr.max_prefix_len());
        ip_in(ns, &["addr", "add", &addr, "dev", "pods0", "nodad"])?;
    }
    ip_in(ns, &["link", "set", "pods0", "up"])
}

/// Runs `f` on a thread that has entered the network namespace `netns`.
/// Sockets it creates stay in that namespace after it returns.
pub fn run_in<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let theirs = std::fs::File::open(Path::new(NETNS_DIR).join(netns))
        .with_context(|| format!("network namespace {netns} is missing"))?;
    std::thread::spawn(move || {
        nix::sched::setns(&theirs, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering a network namespace")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("a thread in {netns} panicked"))?
}

/// Every named network namespace on the machine.
pub fn list() -> Vec<String> {
    fs::read_dir(NETNS_DIR)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes whose network namespace is `netns`.
pub fn pids(netns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", netns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes a namespace (its interfaces go with it).
pub fn delete(netns: &str) -> Result<()> {
    ip(&["netns", "del", netns])
}

/// Whether a namespace exists.
pub fn exists(netns: &str) -> bool {
    Path::new(NETNS_DIR).join(netns).exists()
}

/// Every node's host firewall, as Docker leaves one (through iptables-nft):
/// the `filter` tables' FORWARD chains drop what no rule accepts, so a
/// node forwards pods' traffic only if Weft opens them.
const HOST_FIREWALL: &str = "\
table ip filter { chain FORWARD { type filter hook forward priority filter; policy drop; }; }
table ip6 filter { chain FORWARD { type filter hook forward priority filter; policy drop; }; }
";

/// `nft ARGS` inside `netns`, with `stdin` piped in; its stdout.
pub fn nft(fabric_netns: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", fabric_netns, "nft"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (install nftables)")?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft {} in {fabric_netns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
