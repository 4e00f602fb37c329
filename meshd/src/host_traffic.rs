//! Which traffic looks up table 77, the mesh routes to other nodes' host
//! addresses ([`crate::planner::hosts`]): pods' always; with
//! `WEFT_ENCRYPT_HOST`, the node's own too (kubelet, hostNetwork pods,
//! node agents), so node-to-node host traffic crosses WireGuard.
//!
//! Two things must never take those routes, since table 77 holds every
//! peer's *endpoint* address (a host address is believed only where the
//! node's WireGuard packets come from):
//! - the WireGuard datagrams themselves, or they would loop into the
//!   tunnel they carry: every data plane marks its socket with [`FWMARK`]
//!   and the host's rule matches only unmarked packets (wg-quick's way);
//! - the API servers' addresses ([`HostTraffic::Encrypted::exclude`]): a
//!   node that cannot reach the mesh (a key it has not learnt yet, a
//!   broken link) must still reach the API server to mend it, so traffic
//!   to and from them is looked up in the main table first (both ways: a
//!   node holding such an address answers on the underlay what came on
//!   it, whatever a peer's reverse-path filter checks). Whole addresses,
//!   as Cilium leaves control-plane nodes out: a port would not do, since
//!   IPVS re-routes a Service's traffic with a flow that has no ports, and
//!   a control-plane node's etcd peers check each other's node addresses.
//!
//! The API servers' addresses are what the `kubernetes` EndpointSlice in
//! `default` lists (the API servers keep it), besides the address in
//! meshd's kubeconfig (in-cluster, the Service's ClusterIP): read at start
//! from the last reading kept in the state directory, so a restarted meshd
//! excludes them before its first API call, then followed ([`follow`]).
//!
//! The rules are values (pure, tested from tables); `reconcile::netlink`
//! makes the kernel's match.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::reconcile::netlink::Netlink;

/// The mark every data plane's UDP sockets carry (`wg set fwmark`): not
/// one of kube-proxy's bits (0x4000, 0x8000), Weft's table number in the
/// third byte.
pub const FWMARK: u32 = 0x0077_0000;

/// `ip rule` priorities: after the local table's (0), before the main
/// table's (32766).
pub const FROM_PODS_PRIORITY: u32 = 7700;
pub const EXCLUDE_PRIORITY: u32 = 7701;
pub const UNMARKED_PRIORITY: u32 = 7702;

/// What the node's own traffic to other nodes' host addresses does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostTraffic {
    /// Leaves on the underlay as the host routes it (plaintext).
    Plain,
    /// Crosses WireGuard, except what is excluded and what comes from
    /// this node's own addresses that its peers do not believe (they
    /// would drop it).
    Encrypted {
        exclude: Vec<IpNet>,
        untunnelled: Vec<IpAddr>,
    },
}

/// Which way an exclusion rule matches: to the excluded (this node asks),
/// or from it (this node holds it and answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Way {
    To,
    From,
}

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

/// One of Weft's routing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HostRule {
    /// `from <pod range> lookup 77`.
    FromPods(IpNet),
    /// `to <net> lookup main` or `from <net> lookup main`: never tunnelled
    /// as host traffic, and answered the way it came.
    Exclude(IpNet, Way),
    /// `not fwmark FWMARK/FWMARK lookup 77`: everything but WireGuard's
    /// own datagrams.
    Unmarked(Family),
}

impl HostRule {
    pub fn priority(self) -> u32 {
        match self {
            Self::FromPods(_) => FROM_PODS_PRIORITY,
            Self::Exclude(..) => EXCLUDE_PRIORITY,
            Self::Unmarked(_) => UNMARKED_PRIORITY,
        }
    }

    pub fn family(self) -> Family {
        match self {
            Self::FromPods(net) | Self::Exclude(net, _) => family_of(net.addr()),
            Self::Unmarked(f) => f,
        }
    }
}

pub fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// The rules a node wants: pods' always, the host's with encryption.
pub fn rules(pods: &[IpNet], host: &HostTraffic) -> BTreeSet<HostRule> {
    let mut out: BTreeSet<HostRule> = pods.iter().map(|n| HostRule::FromPods(n.trunc())).collect();
    if let HostTraffic::Encrypted {
        exclude,
        untunnelled,
    } = host
    {
        for net in exclude.iter().map(IpNet::trunc) {
            out.extend([
                HostRule::Exclude(net, Way::To),
                HostRule::Exclude(net, Way::From),
            ]);
        }
        out.extend(
            untunnelled
                .iter()
                .map(|ip| HostRule::Exclude(IpNet::from(*ip), Way::From)),
        );
        out.extend([
            HostRule::Unmarked(Family::V4),
            HostRule::Unmarked(Family::V6),
        ]);
    }
    out
}

/// What host traffic is never tunnelled: the addresses listed
/// (`--encrypt-host-exclude`), or else the API servers'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclusion {
    Listed(Vec<IpNet>),
    /// The API server in the kubeconfig (if its URL names an address) and
    /// those the `kubernetes` EndpointSlice lists.
    ApiServers {
        configured: Option<IpAddr>,
    },
}

impl Exclusion {
    /// What is excluded, given the API servers last read.
    pub fn excluded(&self, api_servers: &[IpAddr]) -> Vec<IpNet> {
        let set: BTreeSet<IpNet> = match self {
            Self::Listed(listed) => listed.iter().map(IpNet::trunc).collect(),
            Self::ApiServers { configured } => configured
                .iter()
                .chain(api_servers)
                .map(|ip| IpNet::from(ip.to_canonical()))
                .collect(),
        };
        set.into_iter().collect()
    }
}

/// The `kubernetes` EndpointSlice's name (in `default`).
pub const API_SERVERS_SLICE: &str = "kubernetes";
/// Where the API servers last read are kept, in meshd's state directory.
pub const API_SERVERS_FILE: &str = "api-servers.json";

/// The API servers an EndpointSlice lists (FQDN slices have none), ready
/// or not (an API server not ready yet is still one to reach directly).
pub fn slice_addresses(slice: &EndpointSlice) -> Vec<IpAddr> {
    let set: BTreeSet<IpAddr> = slice
        .endpoints
        .iter()
        .flat_map(|e| &e.addresses)
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .collect();
    set.into_iter().collect()
}

/// The API servers kept by the last reading (none if there is no such
/// file or it cannot be read: the kubeconfig's still is).
pub fn read_kept(path: &Path) -> Vec<IpAddr> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "ignoring the kept API server addresses");
        Vec::new()
    })
}

/// Follows the API servers the `kubernetes` EndpointSlice lists: read
/// every `interval` (they rarely change); a new, non-empty list is kept at
/// `kept`, sent, and a sync asked for (which applies it: [`Keeper`]). A
/// failed reading changes nothing.
pub async fn follow(
    client: kube::Client,
    kept: PathBuf,
    interval: Duration,
    found: tokio::sync::watch::Sender<Vec<IpAddr>>,
    changed: std::sync::Arc<tokio::sync::Notify>,
) {
    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client, "default");
    loop {
        match api.get_opt(API_SERVERS_SLICE).await {
            Ok(Some(slice)) => {
                let listed = slice_addresses(&slice);
                if !listed.is_empty() && *found.borrow() != listed {
                    tracing::info!(api_servers = ?listed, "the API servers moved");
                    if let Err(e) = keep(&kept, &listed) {
                        tracing::warn!(path = %kept.display(), error = %e, "keeping the API server addresses");
                    }
                    found.send_replace(listed);
                    changed.notify_one();
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading the API servers' addresses (EndpointSlice default/kubernetes)")
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Writes the reading where [`read_kept`] finds it: whole or not at all.
fn keep(path: &Path, api_servers: &[IpAddr]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(api_servers).map_err(std::io::Error::other)?;
    let next = path.with_extension("json.next");
    std::fs::write(&next, bytes)?;
    std::fs::rename(&next, path)
}

/// This node's rules kept as they should be: the pods' ranges and the
/// setting from the start, the API servers as [`follow`] finds them, this
/// node's unbelieved addresses as each plan finds them; the kernel's are
/// touched only when what is wanted changes.
pub struct Keeper {
    netlink: Netlink,
    pods: Vec<IpNet>,
    /// `None`: host traffic is plain.
    exclusion: Option<Exclusion>,
    api_servers: tokio::sync::watch::Receiver<Vec<IpAddr>>,
    /// Whether the rules were made once (see [`at_start`]).
    started: bool,
}

impl Keeper {
    pub fn new(
        netlink: Netlink,
        pods: Vec<IpNet>,
        exclusion: Option<Exclusion>,
        api_servers: tokio::sync::watch::Receiver<Vec<IpAddr>>,
    ) -> Self {
        Self {
            netlink,
            pods,
            exclusion,
            api_servers,
            started: false,
        }
    }

    /// The addresses this node's interfaces hold, when they matter (host
    /// traffic encrypted).
    pub async fn own_addresses(&self) -> anyhow::Result<Vec<IpAddr>> {
        match self.exclusion {
            None => Ok(Vec::new()),
            Some(_) => self.netlink.local_addresses().await,
        }
    }

    pub fn traffic(&self, untunnelled: &BTreeSet<IpAddr>) -> HostTraffic {
        match &self.exclusion {
            None => HostTraffic::Plain,
            Some(e) => HostTraffic::Encrypted {
                exclude: e.excluded(&self.api_servers.borrow()),
                untunnelled: untunnelled.iter().copied().collect(),
            },
        }
    }

    /// Makes the kernel's rules what they should be, read back every
    /// time (another agent, or systemd-networkd, may delete rules it does
    /// not own); how many changed.
    pub async fn ensure(&mut self, untunnelled: &BTreeSet<IpAddr>) -> anyhow::Result<usize> {
        let mut wanted = rules(&self.pods, &self.traffic(untunnelled));
        if !self.started {
            let present = self.netlink.present_host_rules().await?;
            wanted = at_start(wanted, &present);
        }
        let changed = self.netlink.ensure_host_rules(&wanted).await?;
        self.started = true;
        Ok(changed)
    }
}

/// The rules to make at start, before the device is configured: what is
/// wanted without the host's rule, plus the host's rule and the `from`
/// exclusions a previous meshd left. Its device may lack the mark until
/// the first pass sets it (the host's rule would loop its datagrams), and
/// this node's unbelieved addresses are known after the first plan. A node
/// that turned the setting off loses them at the first pass.
fn at_start(wanted: BTreeSet<HostRule>, present: &BTreeSet<HostRule>) -> BTreeSet<HostRule> {
    let left = |r: &&HostRule| matches!(r, HostRule::Unmarked(_) | HostRule::Exclude(_, Way::From));
    wanted
        .into_iter()
        .filter(|r| !matches!(r, HostRule::Unmarked(_)))
        .chain(present.iter().filter(left).copied())
        .collect()
}

/// The API server as the client reaches it, when its URL names an address
/// (a name is not resolved: the EndpointSlice, or
/// `WEFT_ENCRYPT_HOST_EXCLUDE`, says where it is).
pub fn api_server_address(url: &hyper::Uri) -> Option<IpAddr> {
    let host = url.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_host_takes_table_77_only_when_encrypted() {
        let pods = [net("10.244.0.0/16"), net("fd00:244::/48")];
        assert_eq!(
            rules(&pods, &HostTraffic::Plain),
            BTreeSet::from([HostRule::FromPods(pods[0]), HostRule::FromPods(pods[1])])
        );
        let (api, listed) = (net("192.0.2.10/32"), net("2001:db8::/64"));
        let encrypted = rules(
            &pods,
            &HostTraffic::Encrypted {
                exclude: vec![api, listed],
                untunnelled: vec![ip("198.18.1.7")],
            },
        );
        assert_eq!(
            encrypted,
            BTreeSet::from([
                HostRule::FromPods(pods[0]),
                HostRule::FromPods(pods[1]),
                HostRule::Exclude(api, Way::To),
                HostRule::Exclude(api, Way::From),
                HostRule::Exclude(listed, Way::To),
                HostRule::Exclude(listed, Way::From),
                HostRule::Exclude(net("198.18.1.7/32"), Way::From),
                HostRule::Unmarked(Family::V4),
                HostRule::Unmarked(Family::V6),
            ])
        );
        // Exclusions come before the host's rule, after the pods': pods'
        // traffic to the API server's host address still crosses the mesh.
        let order: Vec<u32> = [
            HostRule::FromPods(pods[0]),
            HostRule::Exclude(api, Way::To),
            HostRule::Unmarked(Family::V4),
        ]
        .iter()
        .map(|r| r.priority())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    }

    /// At start the host's rule is neither added (the device may lack the
    /// mark) nor taken away (a restart opens no plaintext window), and a
    /// previous run's `from` exclusions stay until the first plan.
    #[test]
    fn a_start_keeps_the_host_rule_as_it_finds_it() {
        let pods = [net("10.244.0.0/16")];
        let wanted = rules(
            &pods,
            &HostTraffic::Encrypted {
                exclude: vec![net("192.0.2.10/32")],
                untunnelled: vec![],
            },
        );
        let fresh = at_start(wanted.clone(), &BTreeSet::new());
        assert!(!fresh.iter().any(|r| matches!(r, HostRule::Unmarked(_))));
        let old_from = HostRule::Exclude(net("198.18.1.7/32"), Way::From);
        let stale_to = HostRule::Exclude(net("192.0.2.99/32"), Way::To);
        let present = BTreeSet::from([HostRule::Unmarked(Family::V4), old_from, stale_to]);
        let restarted = at_start(wanted.clone(), &present);
        assert!(restarted.contains(&HostRule::Unmarked(Family::V4)));
        assert!(restarted.contains(&old_from));
        assert!(!restarted.contains(&stale_to));
        assert!(wanted
            .iter()
            .filter(|r| !matches!(r, HostRule::Unmarked(_)))
            .all(|r| restarted.contains(r)));
    }

    #[test]
    fn listed_addresses_replace_the_api_servers() {
        let found = [ip("198.18.1.1"), ip("198.18.1.9")];
        let api = Exclusion::ApiServers {
            configured: Some(ip("10.96.0.1")),
        };
        assert_eq!(
            api.excluded(&found),
            vec![
                net("10.96.0.1/32"),
                net("198.18.1.1/32"),
                net("198.18.1.9/32")
            ]
        );
        assert_eq!(api.excluded(&[]), vec![net("10.96.0.1/32")]);
        let listed = Exclusion::Listed(vec![net("192.0.2.7/24")]);
        assert_eq!(listed.excluded(&found), vec![net("192.0.2.0/24")]);
    }

    #[test]
    fn a_slice_lists_its_addresses_ready_or_not() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["198.18.1.1"], "conditions": {"ready": true}},
                {"addresses": ["198.18.1.2"], "conditions": {"ready": false}},
                {"addresses": ["api.example.com"]},
            ],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
        }))
        .unwrap();
        assert_eq!(
            slice_addresses(&slice),
            vec![ip("198.18.1.1"), ip("198.18.1.2")]
        );
    }

    #[test]
    fn kept_addresses_survive_a_restart_and_garbage_is_none() {
        let dir = std::env::temp_dir().join(format!("weft-kept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(API_SERVERS_FILE);
        assert!(read_kept(&path).is_empty());
        keep(&path, &[ip("198.18.1.1")]).unwrap();
        assert_eq!(read_kept(&path), vec![ip("198.18.1.1")]);
        std::fs::write(&path, b"{").unwrap();
        assert!(read_kept(&path).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_api_server_address_comes_from_its_url() {
        let cases = [
            ("https://198.18.0.1:6443", Some("198.18.0.1")),
            ("https://[2001:db8::1]:6443", Some("2001:db8::1")),
            ("https://10.96.0.1", Some("10.96.0.1")),
            ("https://api.example.com:6443", None),
        ];
        for (url, want) in cases {
            let uri: hyper::Uri = url.parse().unwrap();
            assert_eq!(api_server_address(&uri), want.map(ip), "{url}");
        }
    }
}
