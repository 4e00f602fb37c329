//! The plugin's commands.
//!
//! A pod gets a veth pair: `wp<hash>` on the node, `CNI_IFNAME` in the pod.
//! The pod holds its addresses as host routes (/32, /128) and reaches
//! everything through its block's gateway address, which the node side of
//! every pod veth carries; the node routes each pod address to its veth.
//! No bridge, no ARP between pods: every packet passes the node's routing
//! (and, later, its policy).

use std::collections::BTreeSet;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use ipnet::IpNet;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteScope};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};
use serde_json::Value;
use weft_ipam::{
    gateway, AllocError, Attachment, NodeState, PodStore, PolicyState, StoreError, POD_VETH_PREFIX,
};

use crate::config::{parse, NetConf};
use crate::netlink::{index_and_mac, Netlink, NlError, EEXIST};
use crate::spec::{
    version_info, AddResult, CniError, Code, Command, Env, Interface, IpConfig, RouteConfig,
};

fn is_pod_veth(name: &str) -> bool {
    name.strip_prefix(POD_VETH_PREFIX)
        .is_some_and(|hex| hex.len() == 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl From<NlError> for CniError {
    fn from(e: NlError) -> Self {
        CniError::new(Code::Io, e.to_string())
    }
}

impl From<StoreError> for CniError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Alloc(AllocError::Exhausted(_)) => {
                CniError::new(Code::TryAgainLater, e.to_string())
            }
            other => CniError::new(Code::Io, other.to_string()),
        }
    }
}

/// Runs one command; `Ok(Some(json))` is printed on stdout.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    // VERSION's stdin carries only a cniVersion, not a whole configuration.
    let conf = match env.command {
        Command::Version => return Ok(Some(version_info())),
        _ => parse(stdin)?,
    };
    let attachment = Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    match env.command {
        Command::Version => Ok(Some(version_info())),
        Command::Add => {
            let state = ready(&conf, Code::TryAgainLater)?;
            add(env, &conf, &attachment, &state).map(|r| Some(r.to_json(&conf.cni_version)))
        }
        // Teardown never looks at the node's state: a pod must always be
        // removable, whatever meshd or its policy engine are doing.
        Command::Del => del(&conf, &attachment).map(|()| None),
        Command::Check => check(env, &conf, &attachment).map(|()| None),
        Command::Status => ready(&conf, Code::NotAvailable).map(|_| None),
        Command::Gc => gc(&conf).map(|()| None),
    }
}

/// What the plugin sees of the node: the state files meshd publishes, each
/// present, absent (`None`) or unreadable (why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub node: Result<Option<NodeState>, String>,
    pub policy: Result<Option<PolicyState>, String>,
    /// The node state file, to name in messages.
    pub state_file: String,
}

/// The node's state for ADD, or the error `code` (ADD: try again later;
/// STATUS: not available) naming why the node cannot take a pod.
fn ready(conf: &NetConf, code: Code) -> Result<NodeState, CniError> {
    let seen = Observed {
        node: NodeState::read(&conf.state_file).map_err(|e| e.to_string()),
        policy: PolicyState::read(&PolicyState::path_beside(&conf.state_file))
            .map_err(|e| e.to_string()),
        state_file: conf.state_file.display().to_string(),
    };
    readiness(seen).map_err(|why| CniError::new(code, why))
}

/// Whether the node can take a pod now, and if not why: meshd has made the
/// node's mesh (its node state is there) and NetworkPolicy is either off or
/// enforced by a loaded program. Fail-closed: an absent or unreadable
/// policy state is not enforcement.
pub fn readiness(seen: Observed) -> Result<NodeState, String> {
    let node = match seen.node {
        Ok(Some(state)) => state,
        Ok(None) => return Err(format!("meshd has not written {} yet", seen.state_file)),
        Err(e) => return Err(e),
    };
    let not_loaded = "NetworkPolicy enforcement is not loaded on this node yet";
    match seen.policy {
        Ok(Some(PolicyState::Off | PolicyState::Loaded)) => Ok(node),
        Ok(Some(PolicyState::Pending { reason })) => Err(format!("{not_loaded}: {reason}")),
        Ok(Some(PolicyState::Broken { reason })) => Err(format!(
            "NetworkPolicy enforcement is broken on this node: {reason}"
        )),
        Ok(None) => Err(format!(
            "{not_loaded}: meshd has not published its policy state beside {}",
            seen.state_file
        )),
        Err(e) => Err(format!("{not_loaded}: {e}")),
    }
}

fn add(
    env: &Env,
    conf: &NetConf,
    attachment: &Attachment,
    state: &NodeState,
) -> Result<AddResult, CniError> {
    let mtu = conf.mtu.unwrap_or(state.mtu);
    let netns = File::open(&env.netns).map_err(|e| {
        CniError::new(
            Code::InvalidEnvironment,
            format!("CNI_NETNS {}: {e}", env.netns),
        )
    })?;
    let store = PodStore::new(&conf.ipam_dir);
    let addresses = store.allocate(attachment, &state.pod_cidrs, env.pod().as_ref())?;
    let wired = wire(env, attachment, &netns, &addresses, mtu);
    if wired.is_err() {
        // Leave nothing behind: no veth, no address held.
        let _ = unwire(attachment);
        let _ = store.release(attachment);
    }
    wired
}

/// Creates and configures the veth pair.
fn wire(
    env: &Env,
    attachment: &Attachment,
    netns: &File,
    addresses: &[IpNet],
    mtu: u32,
) -> Result<AddResult, CniError> {
    let host_name = attachment.host_veth();
    let peer_name = format!("wq{}", &host_name[2..]);
    let mut host = Netlink::open()?;
    // A previous ADD of this attachment that died half-way left this (its
    // pod end goes with it).
    if let Some(l) = host.link(&host_name)? {
        host.del_link(l.header.index)?;
    }
    host.add_veth(&host_name, &peer_name, mtu, netns.as_raw_fd())?;
    let host_link = host
        .link(&host_name)?
        .ok_or_else(|| CniError::new(Code::Io, "the new veth vanished"))?;
    let (host_index, host_mac) = index_and_mac(&host_link);
    host.no_link_local(host_index)?;
    host.set_link(
        "setting the node's veth up",
        LinkUnspec::new_with_index(host_index).up().build(),
    )?;
    for addr in addresses {
        let gw = IpNet::from(gateway(&addr.trunc()));
        match host.add_address(host_index, gw) {
            Err(e) if e.errno() == Some(EEXIST) => {}
            other => other?,
        }
        host.add_route(
            &format!("routing {} to the pod", addr.addr()),
            host_route(addr.addr(), host_index),
        )?;
    }

    let pod_mac = in_netns(netns, || {
        let mut pod = Netlink::open()?;
        let link = pod
            .link(&peer_name)?
            .ok_or_else(|| CniError::new(Code::Io, "the pod's veth did not arrive in CNI_NETNS"))?;
        let (index, mac) = index_and_mac(&link);
        pod.set_link(
            "naming the pod's interface",
            LinkUnspec::new_with_index(index)
                .name(env.ifname.clone())
                .mtu(mtu)
                .build(),
        )?;
        no_dad(&env.ifname)?;
        pod.set_link(
            "setting the pod's interface up",
            LinkUnspec::new_with_index(index).up().build(),
        )?;
        if let Some(lo) = pod.link("lo")? {
            pod.set_link(
                "setting lo up",
                LinkUnspec::new_with_index(lo.header.index).up().build(),
            )?;
        }
        for addr in addresses {
            pod.add_address(index, IpNet::from(addr.addr()))?;
            let gw = gateway(&addr.trunc());
            pod.add_route("routing to the gateway", host_route(gw, index))?;
            pod.add_route("adding the default route", default_route(gw, index))?;
        }
        Ok(mac)
    })?;
    for addr in addresses.iter().filter(|a| a.addr().is_ipv6()) {
        host.add_permanent_neighbour(host_index, addr.addr(), &pod_mac)?;
    }
    Ok(AddResult {
        interfaces: vec![
            Interface {
                name: host_name,
                mac: host_mac.to_string(),
                sandbox: String::new(),
                mtu: Some(mtu),
            },
            Interface {
                name: env.ifname.clone(),
                mac: pod_mac.to_string(),
                sandbox: env.netns.clone(),
                mtu: Some(mtu),
            },
        ],
        ips: addresses
            .iter()
            .map(|a| IpConfig {
                address: *a,
                gateway: gateway(&a.trunc()),
                interface: 1,
            })
            .collect(),
        routes: addresses
            .iter()
            .map(|a| {
                let any = if a.addr().is_ipv4() {
                    "0.0.0.0/0"
                } else {
                    "::/0"
                };
                RouteConfig {
                    dst: any.parse().expect("a literal prefix"),
                    gw: gateway(&a.trunc()),
                }
            })
            .collect(),
    })
}

/// Turns off IPv6 duplicate address detection on `ifname` (in the calling
/// thread's namespace) before it comes up: the addresses on a pod veth are
/// unique by allocation, and DAD would hold neighbour discovery — and the
/// pod's first IPv6 packets — for about a second.
fn no_dad(ifname: &str) -> Result<(), CniError> {
    let knob = format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad");
    std::fs::write(&knob, "0").map_err(|e| CniError::new(Code::Io, format!("{knob}: {e}")))
}

/// `addr` (host route) out of link `index`.
fn host_route(addr: IpAddr, index: u32) -> RouteMessage {
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(addr, prefix)
        .expect("a host prefix is valid")
        .output_interface(index)
        .scope(RouteScope::Link)
        .build()
}

fn default_route(gw: IpAddr, index: u32) -> RouteMessage {
    let any = if gw.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u8; 16])
    };
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(any, 0)
        .expect("the default prefix is valid")
        .gateway(gw)
        .expect("gateway of the same family")
        .output_interface(index)
        .build()
}

/// Runs `f` with this thread in the network namespace `netns`, and returns.
fn in_netns<T>(netns: &File, f: impl FnOnce() -> Result<T, CniError>) -> Result<T, CniError> {
    use nix::sched::{setns, CloneFlags};
    let home = File::open("/proc/self/ns/net")
        .map_err(|e| CniError::new(Code::Io, format!("opening our namespace: {e}")))?;
    setns(netns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::new(Code::Io, format!("entering CNI_NETNS: {e}")))?;
    let result = f();
    setns(&home, CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::new(Code::Io, format!("leaving CNI_NETNS: {e}")))?;
    result
}

/// Deletes the node-side veth (its pod end goes with it).
fn unwire(attachment: &Attachment) -> Result<(), CniError> {
    let mut host = Netlink::open()?;
    if let Some(l) = host.link(&attachment.host_veth())? {
        host.del_link(l.header.index)?;
    }
    Ok(())
}

/// Idempotent: a missing namespace, veth or allocation is not an error.
fn del(conf: &NetConf, attachment: &Attachment) -> Result<(), CniError> {
    unwire(attachment)?;
    PodStore::new(&conf.ipam_dir).release(attachment)?;
    Ok(())
}

fn check(env: &Env, conf: &NetConf, attachment: &Attachment) -> Result<(), CniError> {
    let mismatch = |what: String| CniError::new(Code::Check, what);
    let held = PodStore::new(&conf.ipam_dir)
        .get(attachment)?
        .ok_or_else(|| {
            mismatch(format!(
                "no addresses are held for {}/{}",
                attachment.container_id, attachment.ifname
            ))
        })?;
    let mut host = Netlink::open()?;
    let host_link = host.link(&attachment.host_veth())?.ok_or_else(|| {
        mismatch(format!(
            "the node-side veth {} is missing",
            attachment.host_veth()
        ))
    })?;
    let routes: Vec<RouteMessage> = [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ]
    .into_iter()
    .map(|q| host.routes(q))
    .collect::<Result<Vec<_>, _>>()?
    .concat();
    for addr in &held {
        let routed = routes.iter().any(|r| {
            r.header.destination_prefix_length == if addr.addr().is_ipv4() { 32 } else { 128 }
                && r.attributes.contains(&RouteAttribute::Oif(host_link.header.index))
                && r.attributes.iter().any(|a| matches!(a, RouteAttribute::Destination(d) if route_address(d) == Some(addr.addr())))
        });
        if !routed {
            return Err(mismatch(format!(
                "the node has no route for {} to {}",
                addr.addr(),
                attachment.host_veth()
            )));
        }
    }
    let netns = File::open(&env.netns).map_err(|e| {
        CniError::new(
            Code::InvalidEnvironment,
            format!("CNI_NETNS {}: {e}", env.netns),
        )
    })?;
    in_netns(&netns, || {
        let mut pod = Netlink::open()?;
        let link = pod
            .link(&env.ifname)?
            .ok_or_else(|| mismatch(format!("{} is missing in the pod", env.ifname)))?;
        let present: BTreeSet<IpAddr> = pod
            .addresses(link.header.index)?
            .iter()
            .map(IpNet::addr)
            .collect();
        for addr in &held {
            if !present.contains(&addr.addr()) {
                return Err(mismatch(format!(
                    "{} lacks its address {}",
                    env.ifname,
                    addr.addr()
                )));
            }
        }
        Ok(())
    })
}

fn route_address(a: &rtnetlink::packet_route::route::RouteAddress) -> Option<IpAddr> {
    use rtnetlink::packet_route::route::RouteAddress;
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Frees every attachment the runtime no longer lists, and removes pod
/// veths that belong to none of the valid ones.
fn gc(conf: &NetConf) -> Result<(), CniError> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "network configuration: GC needs \"cni.dev/valid-attachments\"",
        )
    })?;
    let live: BTreeSet<Attachment> = valid.iter().map(Attachment::from).collect();
    PodStore::new(&conf.ipam_dir).gc(&live)?;
    let keep: BTreeSet<String> = live.iter().map(Attachment::host_veth).collect();
    let mut host = Netlink::open()?;
    for (name, index) in host.links()? {
        if is_pod_veth(&name) && !keep.contains(&name) {
            host.del_link(index)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every state the node can be in, and what ADD/STATUS answer: a pod
    /// attaches only once the mesh is made and policy is loaded (or off).
    #[test]
    fn a_pod_attaches_only_where_policy_is_loaded_or_off() {
        let node = NodeState::new(vec!["198.19.1.0/24".parse().unwrap()], 1420);
        let pending = PolicyState::Pending {
            reason: "listing Pods".into(),
        };
        let broken = PolicyState::Broken {
            reason: "nft: No such file".into(),
        };
        let ready = Ok(node.clone());
        let cases: Vec<(&str, _, _, Result<NodeState, &str>)> = vec![
            ("ready", Ok(Some(node.clone())), Ok(Some(PolicyState::Loaded)), ready.clone()),
            ("policy off", Ok(Some(node.clone())), Ok(Some(PolicyState::Off)), ready),
            ("policy not loaded", Ok(Some(node.clone())), Ok(Some(pending)),
                Err("NetworkPolicy enforcement is not loaded on this node yet: listing Pods")),
            ("policy broken", Ok(Some(node.clone())), Ok(Some(broken)),
                Err("NetworkPolicy enforcement is broken on this node: nft: No such file")),
            ("policy state absent", Ok(Some(node.clone())), Ok(None),
                Err("NetworkPolicy enforcement is not loaded on this node yet: meshd has not published its policy state beside /run/weft/node.json")),
            ("policy state unreadable", Ok(Some(node.clone())), Err("garbled".to_string()),
                Err("NetworkPolicy enforcement is not loaded on this node yet: garbled")),
            ("mesh not made", Ok(None), Ok(Some(PolicyState::Loaded)),
                Err("meshd has not written /run/weft/node.json yet")),
        ];
        for (case, node, policy, want) in cases {
            let seen = Observed {
                node,
                policy,
                state_file: "/run/weft/node.json".into(),
            };
            assert_eq!(readiness(seen), want.map_err(str::to_string), "{case}");
        }
    }

    /// ADD is told to try again later, STATUS reports the plugin not
    /// available, and DEL goes ahead, on a node whose policy is broken.
    #[test]
    fn del_goes_ahead_whatever_the_policy_state() {
        let dir = tempfile::tempdir().unwrap();
        let state_file = dir.path().join("node.json");
        NodeState::new(vec!["198.19.1.0/24".parse().unwrap()], 1420)
            .write(&state_file)
            .unwrap();
        let broken = PolicyState::Broken {
            reason: "the engine stopped".into(),
        };
        std::fs::write(PolicyState::path_beside(&state_file), broken.to_bytes()).unwrap();
        let conf = serde_json::json!({
            "cniVersion": "1.0.0", "name": "weft", "type": "weft",
            "stateFile": state_file, "ipamDir": dir.path().join("ipam"),
        })
        .to_string();
        let env = |command: &str| {
            let vars: std::collections::BTreeMap<String, String> = [
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/nonexistent"),
                ("CNI_IFNAME", "eth0"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            Env::from_vars(&vars).unwrap()
        };
        let add = run(&env("ADD"), conf.as_bytes()).unwrap_err();
        assert_eq!(add.code, Code::TryAgainLater);
        assert!(
            add.msg.contains("broken on this node: the engine stopped"),
            "{add}"
        );
        let status = run(&env("STATUS"), conf.as_bytes()).unwrap_err();
        assert_eq!(status.code, Code::NotAvailable);
        assert_eq!(run(&env("DEL"), conf.as_bytes()), Ok(None));
    }

    #[test]
    fn pod_veths_are_told_by_name() {
        let a = Attachment {
            container_id: "abc".into(),
            ifname: "eth0".into(),
        };
        assert!(is_pod_veth(&a.host_veth()));
        assert!(!is_pod_veth("eth0") && !is_pod_veth("wpz00000000000"));
    }
}
