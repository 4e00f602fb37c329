//! What a lab consists of, computed before anything is created: namespace and
//! interface names, underlay addresses, pod CIDRs and node labels.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use weft_ipam::BlockPlan;
use weft_meshd::cluster::{REGION_LABEL, ZONE_LABEL};

/// The underlay every lab node sits on (198.18.0.0/15 is reserved for
/// benchmarking, so it never collides with a real network).
pub const FABRIC_CIDR: &str = "198.18.0.0/17";
/// The WireGuard mesh ranges every lab meshd gets (`--mesh-cidr`).
pub const MESH_V4: &str = "198.18.128.0/17";
pub const MESH_V6: &str = "fd98:18::/64";
/// External peers' ranges (`--peer-cidr`, off unless set; what
/// docs/install.md suggests).
pub const PEERS_V4: &str = "100.65.0.0/16";
pub const PEERS_V6: &str = "fd64:77:70::/64";
/// The fabric bridge's own address, where the API server listens for nodes.
pub const FABRIC_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The fabric bridge's IPv6 link-local address: every node's IPv6 default
/// route points at it, as a real node's points at its router.
pub const FABRIC_GATEWAY6: &str = "fe80::1";
/// The API server's port on the fabric.
pub const FABRIC_API_PORT: u16 = 6443;
/// A host outside the cluster (the internet, an off-cluster database),
/// beyond the fabric's router: an address in no cluster range, a
/// documentation range (TEST-NET-3). It routes back only to the fabric's
/// underlay, so a pod address it is sent from gets no answer.
pub const OUTSIDE_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The fabric's address towards the outside host.
pub const OUTSIDE_GATEWAY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const OUTSIDE_PREFIX: u8 = 24;
/// The outside host's IPv6 address (documentation range) and the fabric's
/// towards it, on a /64.
pub const OUTSIDE_HOST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 0x10);
pub const OUTSIDE_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x113, 0, 0, 0, 0, 1);
/// The flat fabric's IPv6 underlay (/64): node `k` has `2001:db8:18::k`
/// beside its IPv4 underlay, the fabric `2001:db8:18::ffff`, as real
/// dual-stack nodes have global IPv6 addresses to masquerade pods' IPv6
/// to. (Nodes on sites have IPv4 only.)
pub const UNDERLAY6_PREFIX: u8 = 64;
pub const FABRIC_UNDERLAY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 0xffff);
/// Node `k` gets underlay `198.18.1.k` (on a site: `198.18.(16 + site).k`).
pub const MAX_NODES: usize = 250;
/// Site `i`'s subnet is `198.18.(16 + i).0/24`, its gateway `.254`.
const SITE_BASE: u8 = 16;
const SITE_GATEWAY_HOST: u8 = 254;
/// NAT routers' public /31s: 198.18.14.0/24 (and 198.18.13.0/24 after a
/// change of address), inside the fabric range but outside every site's.
const ROUTER_BASE: u8 = 14;
/// Default cluster pod ranges and node block sizes.
pub const CLUSTER_V4: &str = "198.19.0.0/16";
pub const CLUSTER_V6: &str = "fd98:19::/48";
pub const BLOCK_V4: u8 = 24;
pub const BLOCK_V6: u8 = 64;

const DEFAULT_REGION: &str = "lab-1";
const DEFAULT_ZONE: &str = "lab-1a";

/// One node of the lab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePlan {
    pub name: String,
    pub netns: String,
    /// The node's end of its veth, inside its namespace.
    pub interface: String,
    /// The fabric's end, enslaved to the bridge.
    pub fabric_interface: String,
    /// The node's WireGuard interface (meshd's `--interface`).
    pub wg_interface: String,
    /// Its data plane when not what `auto` picks on the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane: Option<NodeDataplane>,
    pub underlay: Ipv4Addr,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNet>,
    pub labels: BTreeMap<String, String>,
    /// What an admin annotated the Node with at registration.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Its site (`up --topology FILE`); `None`: the flat fabric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Its site's NAT (nothing tells meshd: it learns it).
    #[serde(default)]
    pub nat: Nat,
    /// Its address on its site's private network (a `lan` site): its
    /// InternalIP, `underlay` then being its ExternalIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan: Option<Ipv4Addr>,
}

impl NodePlan {
    /// Its Node's `status.addresses`: the LAN address (if any) is its
    /// InternalIP and the underlay its ExternalIP, as a cloud reports a
    /// node with a private and a public address.
    pub fn status_addresses(&self) -> Vec<(&'static str, String)> {
        match self.lan {
            Some(lan) => vec![
                ("InternalIP", lan.to_string()),
                ("ExternalIP", self.underlay.to_string()),
            ],
            None => vec![("InternalIP", self.underlay.to_string())],
        }
    }
}

/// A node's data plane chosen by the lab instead of `auto`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NodeDataplane {
    /// Weft's own userspace device even where kernel WireGuard exists: a
    /// mixed mesh of kernel and userspace nodes.
    Userspace,
    /// A program speaking wireguard-go's command line and UAPI (such as
    /// Debian's wireguard-go) in the data plane container.
    Program(String),
}

/// A site of a lab built from a topology file: its own bridge and subnet
/// in the fabric namespace, which routes between public sites like the
/// internet between clouds. A NAT'd site is behind a router of its own
/// ([`Router`]): its nodes reach out through the router's NAT and nothing
/// reaches them unasked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SitePlan {
    pub name: String,
    pub bridge: String,
    pub cidr: Ipv4Net,
    /// The site's gateway: the fabric's address on the bridge, or (NAT'd)
    /// the router's inside address.
    pub gateway: Ipv4Addr,
    pub nat: Nat,
    /// The NAT'd site's router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<Router>,
}

/// How a NAT'd site's router maps its nodes' flows to its public address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Nat {
    /// A public site: the fabric routes to it.
    #[default]
    None,
    /// nftables `masquerade`: a flow keeps its source port where it is
    /// free, so one socket is seen at one address:port by everyone
    /// (endpoint-independent mapping, like most home and cloud NATs).
    Masquerade,
    /// `masquerade fully-random`: each flow gets a random port, so each
    /// peer sees the socket at another port (address-and-port-dependent
    /// mapping, "symmetric" NAT).
    Symmetric,
}

impl Nat {
    pub fn is_nat(self) -> bool {
        self != Nat::None
    }
}

/// A topology file's `nat:` — `true` (masquerade), `false`, or a kind.
fn nat_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Nat, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Field {
        Flag(bool),
        Kind(Nat),
    }
    Ok(match Field::deserialize(d)? {
        Field::Flag(true) => Nat::Masquerade,
        Field::Flag(false) => Nat::None,
        Field::Kind(kind) => kind,
    })
}

/// A NAT'd site's router: a namespace of its own between the site's bridge
/// (inside: the site's gateway address) and the fabric (outside: its
/// public address, on a point-to-point link), with its own connection
/// tracking, as a site's NAT box has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Router {
    pub netns: String,
    /// The fabric's end of the outside link.
    pub fabric_interface: String,
    /// The site bridge's port of the inside link (in the fabric namespace).
    pub bridge_port: String,
    /// Its public address and the fabric's end of the /31 between them.
    pub public: Ipv4Addr,
    pub fabric_side: Ipv4Addr,
}

impl Router {
    /// The same router (site `i` of lab `lab`) at its next public address.
    pub fn renumbered(&self, lab: &str, i: usize) -> Router {
        let generation = ROUTER_BASE - self.public.octets()[2];
        Router::new(lab, i, generation + 1)
    }

    /// Router `i` of lab `lab`, numbered `generation` (a NAT that changes
    /// its public address moves to the next generation's).
    pub fn new(lab: &str, i: usize, generation: u8) -> Router {
        let base = 2 * i as u8;
        Router {
            netns: format!("{lab}-nat{i}"),
            fabric_interface: format!("nat{i}"),
            bridge_port: format!("nat{i}in"),
            public: Ipv4Addr::new(198, 18, ROUTER_BASE - generation % 2, base + 1),
            fabric_side: Ipv4Addr::new(198, 18, ROUTER_BASE - generation % 2, base),
        }
    }
}

/// A topology file (`meshlab up --topology FILE`, docs/lab.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyFile {
    pub sites: Vec<SiteSpec>,
}

/// One site as the file describes it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub name: String,
    pub nodes: usize,
    /// Behind NAT (`true`: masquerade, or `masquerade` / `symmetric`):
    /// its nodes publish no endpoint.
    #[serde(default, deserialize_with = "nat_field")]
    pub nat: Nat,
    /// Its nodes also have an address on a private network of the site's
    /// own (`10.77.SITE.K/24` on the site's bridge, routed nowhere else),
    /// like a cloud's VPC: that is their InternalIP, the site address their
    /// ExternalIP.
    #[serde(default)]
    pub lan: bool,
    /// Node labels; default: the site's name for both.
    pub region: Option<String>,
    pub zone: Option<String>,
}

/// The prefix length of a `lan` site's private network.
pub const LAN_PREFIX: u8 = 24;

/// At most this many sites (each takes a /24 of the fabric range).
pub const MAX_SITES: usize = 16;

/// Reads and checks a topology file.
pub fn load_topology(path: &std::path::Path) -> Result<Vec<SiteSpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--topology {}", path.display()))?;
    let file: TopologyFile =
        serde_norway::from_str(&text).with_context(|| format!("--topology {}", path.display()))?;
    check_sites(&file.sites).with_context(|| format!("--topology {}", path.display()))?;
    Ok(file.sites)
}

fn check_sites(sites: &[SiteSpec]) -> Result<()> {
    ensure!(
        (1..=MAX_SITES).contains(&sites.len()),
        "sites: give 1 to {MAX_SITES}"
    );
    let mut names = std::collections::BTreeSet::new();
    for site in sites {
        check_name(&site.name).with_context(|| format!("site {:?}", site.name))?;
        ensure!(
            names.insert(&site.name),
            "site {:?} is named twice",
            site.name
        );
        ensure!(
            site.nodes >= 1,
            "site {:?}: nodes must be at least 1",
            site.name
        );
        ensure!(
            !(site.lan && site.nat.is_nat()),
            "site {:?}: a NAT'd site's addresses are private already (lan: true is for public sites)",
            site.name
        );
    }
    let total: usize = sites.iter().map(|s| s.nodes).sum();
    ensure!(
        total <= MAX_NODES,
        "sites hold {total} nodes; the lab holds at most {MAX_NODES}"
    );
    Ok(())
}

/// The whole lab: a fabric namespace with a bridge and the nodes on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabPlan {
    pub name: String,
    pub fabric_netns: String,
    pub bridge: String,
    pub fabric_cidr: Ipv4Net,
    pub nodes: Vec<NodePlan>,
    /// Nodes are registered without `spec.podCIDRs`; meshd claims blocks.
    #[serde(default)]
    pub self_allocated: bool,
    /// The manifests each node's pod comes from (`deploy/` or a rendered
    /// overlay).
    pub manifests: PathBuf,
    /// How each node's containers run.
    #[serde(default)]
    pub runtime: Runtime,
    /// Values replacing the lab's in the manifests' ConfigMap (`up --config`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// The sites, when built from a topology file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<SitePlan>,
    /// The node whose host address the API server is reached at, as on a
    /// kubeadm control-plane node (`up --control-plane`); none: the
    /// fabric's own address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<String>,
}

impl LabPlan {
    /// Where the API server listens for nodes: the namespace and address
    /// of the control-plane node, or the fabric's.
    pub fn api_listener(&self) -> (&str, SocketAddr) {
        let node = self
            .control_plane
            .as_ref()
            .and_then(|name| self.nodes.iter().find(|n| &n.name == name));
        match node {
            Some(n) => (&n.netns, SocketAddr::from((n.underlay, FABRIC_API_PORT))),
            None => (
                &self.fabric_netns,
                SocketAddr::from((FABRIC_GATEWAY, FABRIC_API_PORT)),
            ),
        }
    }

    /// `node`'s site, if it has one.
    pub fn site_of(&self, node: &NodePlan) -> Option<&SitePlan> {
        let name = node.site.as_deref()?;
        self.sites.iter().find(|s| s.name == name)
    }
}

/// How the lab's kubelet runs a pod's containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum Runtime {
    /// Each container a process in the node's namespace, with the binaries
    /// built beside meshlab and volume paths mapped into the node's
    /// directory (no image needed).
    #[default]
    Processes,
    /// Each container a podman container of the DaemonSet's image (built by
    /// deploy/image/build), in the node's network namespace, with the
    /// manifest's volumes, devices and capabilities.
    Podman,
}

/// Debian's wireguard-go, as meshd's `--userspace-program` finds it.
pub const DEBIAN_WIREGUARD_GO: &str = "wireguard-go";

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct LabSpec {
    pub name: String,
    pub nodes: usize,
    /// `node -> (region, zone)` overrides.
    pub topology: BTreeMap<String, (String, String)>,
    /// `node -> labels` additions.
    pub labels: BTreeMap<String, BTreeMap<String, String>>,
    /// `node -> data plane` where not what `auto` picks.
    pub dataplanes: BTreeMap<String, NodeDataplane>,
    /// Pods attached on every node by `up` (`pod-<k>-<i>` in `default`).
    pub pods_per_node: usize,
    /// Register Nodes without `spec.podCIDRs`, so meshd claims its blocks.
    pub self_allocated: bool,
    /// `deploy/` of this tree unless given.
    pub manifests: Option<PathBuf>,
    pub runtime: Runtime,
    /// Values replacing the lab's in the manifests' ConfigMap.
    pub config: BTreeMap<String, String>,
    /// Sites from a topology file; empty: one flat fabric.
    pub sites: Vec<SiteSpec>,
    /// A node on the flat fabric that serves the API server at its own
    /// address ([`LabPlan::control_plane`]).
    pub control_plane: Option<String>,
}

/// Namespace names the lab `name` owns, so teardown can find leftovers of a
/// crashed run without any state file.
/// The outside host's namespace ([`OUTSIDE_HOST`]).
pub fn outside_netns(lab: &str) -> String {
    format!("{lab}-outside")
}

pub fn owns_netns(lab: &str, netns: &str) -> bool {
    let Some(rest) = netns.strip_prefix(lab).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    rest == "fabric"
        || rest == "outside"
        || rest
            .strip_prefix("nat")
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
        || rest.strip_prefix("pod-").is_some_and(|p| !p.is_empty())
        || rest.strip_prefix("peer-").is_some_and(|p| !p.is_empty())
        || rest
            .strip_prefix("node-")
            .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks a lab name: it prefixes namespace names, so keep it short and plain.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    ensure!(
        ok,
        "lab name {name:?}: use 1-24 characters of a-z, 0-9 and '-', not starting with '-'"
    );
    Ok(())
}

/// Parses `NODE=REGION/ZONE`.
pub fn parse_topology(arg: &str) -> Result<(String, (String, String))> {
    let (node, rz) = arg
        .split_once('=')
        .with_context(|| format!("--topology {arg:?}: expected NODE=REGION/ZONE"))?;
    let (region, zone) = rz
        .split_once('/')
        .with_context(|| format!("--topology {arg:?}: expected NODE=REGION/ZONE"))?;
    ensure!(
        !node.is_empty() && !region.is_empty() && !zone.is_empty(),
        "--topology {arg:?}: node, region and zone must be non-empty"
    );
    Ok((node.into(), (region.into(), zone.into())))
}

/// Parses `KEY=VALUE` (a ConfigMap key: letters, digits, `-`, `_`, `.`).
pub fn parse_config(arg: &str) -> Result<(String, String)> {
    let (k, v) = arg
        .split_once('=')
        .with_context(|| format!("--config {arg:?}: expected KEY=VALUE"))?;
    ensure!(
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
        "--config {arg:?}: the key must be a ConfigMap key (letters, digits, '-', '_', '.')"
    );
    Ok((k.into(), v.into()))
}

/// Parses `NODE:KEY=VALUE`.
pub fn parse_label(arg: &str) -> Result<(String, String, String)> {
    let (node, kv) = arg
        .split_once(':')
        .with_context(|| format!("--label {arg:?}: expected NODE:KEY=VALUE"))?;
    let (k, v) = kv
        .split_once('=')
        .with_context(|| format!("--label {arg:?}: expected NODE:KEY=VALUE"))?;
    ensure!(
        !node.is_empty() && !k.is_empty(),
        "--label {arg:?}: node and key must be non-empty"
    );
    Ok((node.into(), k.into(), v.into()))
}

/// Lays out the lab.
pub fn plan(spec: &LabSpec) -> Result<LabPlan> {
    check_name(&spec.name)?;
    let mut spec = spec.clone();
    if !spec.sites.is_empty() {
        check_sites(&spec.sites)?;
        spec.nodes = spec.sites.iter().map(|s| s.nodes).sum();
    }
    let spec = &spec;
    ensure!(
        (1..=MAX_NODES).contains(&spec.nodes),
        "--nodes {}: the lab holds 1 to {MAX_NODES} nodes",
        spec.nodes
    );
    for named in spec
        .topology
        .keys()
        .chain(spec.labels.keys())
        .chain(spec.dataplanes.keys())
        .chain(&spec.control_plane)
    {
        let known = named
            .strip_prefix("node-")
            .and_then(|k| k.parse::<usize>().ok())
            .is_some_and(|k| (1..=spec.nodes).contains(&k));
        if !known {
            bail!(
                "no node {named:?} in this lab (nodes are node-1 … node-{})",
                spec.nodes
            );
        }
    }
    let nodes = (1..=spec.nodes)
        .map(|k| node_plan(&spec.name, k, spec))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        spec.control_plane.is_none() || spec.sites.is_empty(),
        "--control-plane needs the flat fabric (no sites)"
    );
    Ok(LabPlan {
        name: spec.name.clone(),
        fabric_netns: format!("{}-fabric", spec.name),
        bridge: "br0".into(),
        fabric_cidr: FABRIC_CIDR.parse()?,
        nodes,
        self_allocated: spec.self_allocated,
        manifests: manifests(spec.manifests.as_deref())?,
        runtime: spec.runtime,
        config: spec.config.clone(),
        control_plane: spec.control_plane.clone(),
        sites: spec
            .sites
            .iter()
            .enumerate()
            .map(|(i, s)| SitePlan {
                name: s.name.clone(),
                bridge: format!("site{i}"),
                cidr: Ipv4Net::new(Ipv4Addr::new(198, 18, SITE_BASE + i as u8, 0), 24)
                    .expect("a /24 is valid"),
                gateway: Ipv4Addr::new(198, 18, SITE_BASE + i as u8, SITE_GATEWAY_HOST),
                nat: s.nat,
                router: s.nat.is_nat().then(|| Router::new(&spec.name, i, 0)),
            })
            .collect(),
    })
}

/// The manifests as an absolute path (later commands may run elsewhere).
fn manifests(given: Option<&std::path::Path>) -> Result<PathBuf> {
    let path = given.unwrap_or(std::path::Path::new(super::manifest::DEFAULT_DIR));
    std::fs::canonicalize(path).with_context(|| format!("--manifests {}", path.display()))
}

/// Node `k` of lab `lab` (1-based), with the spec's topology and labels for it.
pub fn node_plan(lab: &str, k: usize, spec: &LabSpec) -> Result<NodePlan> {
    ensure!(
        (1..=MAX_NODES).contains(&k),
        "node-{k}: the lab holds at most {MAX_NODES} nodes"
    );
    let name = format!("node-{k}");
    // Sites take nodes in order: the first site's nodes first.
    let mut first = 1;
    let mut site = None;
    for (i, s) in spec.sites.iter().enumerate() {
        if k < first + s.nodes {
            site = Some((i, s));
            break;
        }
        first += s.nodes;
    }
    let v4 = BlockPlan::new(CLUSTER_V4.parse()?, BLOCK_V4)?;
    let v6 = BlockPlan::new(CLUSTER_V6.parse()?, BLOCK_V6)?;
    let (region, zone) = match (spec.topology.get(&name), site) {
        (Some(rz), _) => rz.clone(),
        (None, Some((_, s))) => (
            s.region.clone().unwrap_or_else(|| s.name.clone()),
            s.zone.clone().unwrap_or_else(|| s.name.clone()),
        ),
        (None, None) => (DEFAULT_REGION.into(), DEFAULT_ZONE.into()),
    };
    let arch = std::env::consts::ARCH
        .replace("x86_64", "amd64")
        .replace("aarch64", "arm64");
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), arch),
        (REGION_LABEL.to_string(), region),
        (ZONE_LABEL.to_string(), zone),
    ]);
    labels.extend(spec.labels.get(&name).cloned().unwrap_or_default());
    let block = |plan: &BlockPlan| plan.block(k as u128).context("cluster range too small");
    Ok(NodePlan {
        netns: format!("{lab}-{name}"),
        interface: "eth0".into(),
        fabric_interface: format!("veth{k}"),
        wg_interface: wg_interface(lab, k),
        dataplane: spec.dataplanes.get(&name).cloned(),
        underlay: match site {
            Some((i, _)) => Ipv4Addr::new(198, 18, SITE_BASE + i as u8, k as u8),
            None => Ipv4Addr::new(198, 18, 1, k as u8),
        },
        pod_cidrs: vec![block(&v4)?, block(&v6)?],
        labels,
        annotations: BTreeMap::new(),
        site: site.map(|(_, s)| s.name.clone()),
        nat: site.map_or(Nat::None, |(_, s)| s.nat),
        lan: site
            .filter(|(_, s)| s.lan)
            .map(|(i, _)| Ipv4Addr::new(10, 77, i as u8, k as u8)),
        name,
    })
}

/// The node's WireGuard interface name. UAPI sockets live in one directory
/// (/var/run/wireguard) for the whole machine, so names must differ across
/// labs as well as nodes: a short hash of the lab name, then the node number.
/// A node's IPv6 underlay address: on the flat fabric only.
pub fn underlay6(node: &NodePlan) -> Option<Ipv6Addr> {
    let [.., k] = node.underlay.octets();
    node.site
        .is_none()
        .then(|| Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, u16::from(k)))
}

pub fn wg_interface(lab: &str, k: usize) -> String {
    let hash = lab.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("wf{:04x}n{k}", hash & 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: usize) -> LabSpec {
        LabSpec {
            name: "weft".into(),
            nodes: n,
            ..LabSpec::default()
        }
    }

    #[test]
    fn lays_out_nodes() {
        let mut s = spec(3);
        s.topology
            .insert("node-2".into(), ("eu".into(), "eu-b".into()));
        s.labels.insert(
            "node-3".into(),
            BTreeMap::from([("role".into(), "edge".into())]),
        );
        let p = plan(&s).unwrap();
        assert_eq!(p.fabric_netns, "weft-fabric");
        let n2 = &p.nodes[1];
        assert_eq!(
            (n2.name.as_str(), n2.netns.as_str()),
            ("node-2", "weft-node-2")
        );
        assert_eq!(n2.underlay, Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(
            n2.pod_cidrs,
            vec![
                "198.19.2.0/24".parse::<IpNet>().unwrap(),
                "fd98:19:0:2::/64".parse().unwrap()
            ]
        );
        assert_eq!(n2.labels["topology.kubernetes.io/zone"], "eu-b");
        assert_eq!(p.nodes[0].labels["topology.kubernetes.io/region"], "lab-1");
        assert_eq!(p.nodes[2].labels["role"], "edge");
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(plan(&spec(0)).is_err());
        assert!(plan(&spec(MAX_NODES + 1)).is_err());
        let mut s = spec(2);
        s.topology.insert("node-9".into(), ("r".into(), "z".into()));
        assert!(plan(&s)
            .unwrap_err()
            .to_string()
            .contains("no node \"node-9\""));
        assert!(check_name("Weft").is_err());
        assert!(parse_topology("node-1=eu").is_err());
        assert_eq!(
            parse_label("node-1:a/b=c").unwrap(),
            ("node-1".into(), "a/b".into(), "c".into())
        );
    }

    #[test]
    fn wireguard_names_fit_and_differ_across_labs() {
        let a = wg_interface("weft", 250);
        assert!(a.len() <= 15, "{a}");
        assert_ne!(wg_interface("weft", 1), wg_interface("t-life", 1));
        assert_ne!(wg_interface("weft", 1), wg_interface("weft", 2));
    }

    #[test]
    fn netns_ownership_is_exact() {
        assert!(owns_netns("weft", "weft-fabric"));
        assert!(owns_netns("weft", "weft-nat3"));
        assert!(!owns_netns("weft", "weft-nat"));
        assert!(!owns_netns("weft", "weft-natx"));
        assert!(owns_netns("weft", "weft-node-12"));
        assert!(owns_netns("weft", "weft-pod-default-web"));
        assert!(!owns_netns("weft", "weft-pod-"));
        assert!(!owns_netns("weft", "weft-x-fabric"));
        assert!(!owns_netns("weft", "weft-node-"));
        assert!(!owns_netns("weft", "weftnode-1"));
        assert!(!owns_netns("weft-x", "weft-fabric"));
    }

    #[test]
    fn sites_number_their_nodes_in_order_and_mark_the_natd_ones() {
        let mut sp = spec(1);
        sp.sites = vec![
            SiteSpec {
                name: "cloud".into(),
                nodes: 2,
                region: Some("eu".into()),
                ..SiteSpec::default()
            },
            SiteSpec {
                name: "edge".into(),
                nodes: 1,
                nat: Nat::Masquerade,
                ..SiteSpec::default()
            },
        ];
        let p = plan(&sp).unwrap();
        assert_eq!(p.nodes.len(), 3, "the sites set the node count");
        assert_eq!(p.sites[1].cidr.to_string(), "198.18.17.0/24");
        assert_eq!(p.sites[1].gateway.to_string(), "198.18.17.254");
        let n3 = &p.nodes[2];
        assert_eq!(n3.underlay.to_string(), "198.18.17.3");
        assert_eq!(p.site_of(n3).map(|s| s.nat), Some(Nat::Masquerade));
        let router = p.sites[1].router.as_ref().expect("a router");
        assert_eq!(
            (router.netns.as_str(), router.public.to_string()),
            ("weft-nat1", "198.18.14.3".to_string())
        );
        assert!(p.sites[0].router.is_none(), "a public site has none");
        let moved = router.renumbered("weft", 1);
        assert_eq!(moved.public.to_string(), "198.18.13.3");
        assert_eq!(moved.renumbered("weft", 1), *router, "and back");
        assert_eq!(n3.nat, Nat::Masquerade);
        assert!(n3.annotations.is_empty(), "meshd learns its NAT by itself");
        assert_eq!(n3.labels["topology.kubernetes.io/zone"], "edge");
        assert!(p.nodes[0].annotations.is_empty());
        assert_eq!(p.nodes[1].labels["topology.kubernetes.io/region"], "eu");
        assert_eq!(
            n3.status_addresses(),
            [("InternalIP", "198.18.17.3".into())]
        );
        // A lan site: a private InternalIP, the site address external.
        sp.sites[0].lan = true;
        let p = plan(&sp).unwrap();
        assert_eq!(
            p.nodes[1].status_addresses(),
            [
                ("InternalIP", "10.77.0.2".into()),
                ("ExternalIP", "198.18.16.2".into())
            ]
        );
        assert_eq!(p.nodes[2].lan, None);
        sp.sites[1].lan = true;
        assert!(plan(&sp).unwrap_err().to_string().contains("lan: true"));
        sp.sites[1].lan = false;
        sp.sites[1].name = "cloud".into();
        assert!(plan(&sp).unwrap_err().to_string().contains("named twice"));
    }

    #[test]
    fn a_topology_file_is_checked() {
        let dir = tempfile_dir();
        let path = dir.join("t.yaml");
        for (nat, kind) in [
            ("true", Nat::Masquerade),
            ("false", Nat::None),
            ("masquerade", Nat::Masquerade),
            ("symmetric", Nat::Symmetric),
        ] {
            std::fs::write(
                &path,
                format!("sites:\n- {{name: a, nodes: 2, nat: {nat}}}\n"),
            )
            .unwrap();
            let site = &load_topology(&path).unwrap()[0];
            assert_eq!((site.nodes, site.nat), (2, kind), "nat: {nat}");
        }
        std::fs::write(&path, "sites:\n- {name: a, nodes: 2, nat: full-cone}\n").unwrap();
        assert!(load_topology(&path).is_err());
        std::fs::write(&path, "sites:\n- {name: a, nodes: 2}\n").unwrap();
        assert_eq!(load_topology(&path).unwrap()[0].nat, Nat::None);
        std::fs::write(&path, "sites:\n- {name: a, nodes: 2, natt: true}\n").unwrap();
        assert!(format!("{:#}", load_topology(&path).unwrap_err()).contains("natt"));
        std::fs::write(&path, "sites: []\n").unwrap();
        assert!(format!("{:#}", load_topology(&path).unwrap_err()).contains("give 1 to"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshlab-topology-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
