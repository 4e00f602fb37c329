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
//! - the API server's addresses ([`HostTraffic::Encrypted::exclude`]): a
//!   node that cannot reach the mesh (a key it has not learnt yet, a
//!   broken link) must still reach the API server to mend it, so traffic
//!   to and from them is looked up in the main table first (both ways: a
//!   node holding such an address answers on the underlay what came on
//!   it, whatever a peer's reverse-path filter checks).
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
use std::net::{IpAddr, SocketAddr};
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
        exclude: Vec<Excluded>,
        untunnelled: Vec<IpAddr>,
    },
}

/// Traffic never tunnelled as host traffic: to and from an address, or
/// only TCP to and from one port of it (an API server: the rest of its
/// node's traffic is still encrypted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Excluded {
    pub net: IpNet,
    pub tcp_port: Option<u16>,
}

impl Excluded {
    pub fn address(net: IpNet) -> Self {
        Self {
            net: net.trunc(),
            tcp_port: None,
        }
    }

    pub fn service(at: SocketAddr) -> Self {
        Self {
            net: IpNet::from(at.ip().to_canonical()),
            tcp_port: Some(at.port()),
        }
    }
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
    /// `to <net> [ipproto tcp dport P] lookup main`, or `from <net>
    /// [ipproto tcp sport P] lookup main`: never tunnelled as host traffic,
    /// and answered the way it came.
    Exclude(Excluded, Way),
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
            Self::FromPods(net) | Self::Exclude(Excluded { net, .. }, _) => family_of(net.addr()),
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
        for e in exclude {
            out.extend([
                HostRule::Exclude(*e, Way::To),
                HostRule::Exclude(*e, Way::From),
            ]);
        }
        out.extend(
            untunnelled
                .iter()
                .map(|ip| HostRule::Exclude(Excluded::address(IpNet::from(*ip)), Way::From)),
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
        configured: Option<SocketAddr>,
    },
}

impl Exclusion {
    /// What is excluded, given the API servers last read.
    pub fn excluded(&self, api_servers: &[SocketAddr]) -> Vec<Excluded> {
        let set: BTreeSet<Excluded> = match self {
            Self::Listed(listed) => listed.iter().copied().map(Excluded::address).collect(),
            Self::ApiServers { configured } => configured
                .iter()
                .chain(api_servers)
                .copied()
                .map(Excluded::service)
                .collect(),
        };
        set.into_iter().collect()
    }
}

/// The `kubernetes` EndpointSlice's name (in `default`).
pub const API_SERVERS_SLICE: &str = "kubernetes";
/// Where the API servers last read are kept, in meshd's state directory.
pub const API_SERVERS_FILE: &str = "api-servers.json";

/// The API servers an EndpointSlice lists: each address (FQDN slices have
/// none) at each TCP port, ready or not (an API server not ready yet is
/// still one to reach directly).
pub fn slice_addresses(slice: &EndpointSlice) -> Vec<SocketAddr> {
    let ports: Vec<u16> = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| p.port.and_then(|n| u16::try_from(n).ok()))
        .collect();
    let set: BTreeSet<SocketAddr> = slice
        .endpoints
        .iter()
        .flat_map(|e| &e.addresses)
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .flat_map(|ip| ports.iter().map(move |p| SocketAddr::new(ip, *p)))
        .collect();
    set.into_iter().collect()
}

/// The API servers kept by the last reading (none if there is no such
/// file or it cannot be read: the kubeconfig's still is).
pub fn read_kept(path: &Path) -> Vec<SocketAddr> {
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
    found: tokio::sync::watch::Sender<Vec<SocketAddr>>,
    changed: std::sync::Arc<tokio::sync::Notify>,
) {
    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client, "default");
    loop {
        match api.get_opt(API_SERVERS_SLICE).await {
            Ok(Some(slice)) => {
                let listed = slice_addresses(&slice);
                if !listed.is_empty() && *found.borrow() != listed {
                    tracing::info!(api_servers = ?listed, "the API servers moved");
                    if let Err(e) = serde_json::to_vec(&listed)
                        .map_err(std::io::Error::other)
                        .and_then(|b| std::fs::write(&kept, b))
                    {
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

/// This node's rules kept as they should be: the pods' ranges and the
/// setting from the start, the API servers as [`follow`] finds them, this
/// node's unbelieved addresses as each plan finds them; the kernel's are
/// touched only when what is wanted changes.
pub struct Keeper {
    netlink: Netlink,
    pods: Vec<IpNet>,
    /// `None`: host traffic is plain.
    exclusion: Option<Exclusion>,
    api_servers: tokio::sync::watch::Receiver<Vec<SocketAddr>>,
    applied: Option<BTreeSet<HostRule>>,
}

impl Keeper {
    pub fn new(
        netlink: Netlink,
        pods: Vec<IpNet>,
        exclusion: Option<Exclusion>,
        api_servers: tokio::sync::watch::Receiver<Vec<SocketAddr>>,
    ) -> Self {
        Self {
            netlink,
            pods,
            exclusion,
            api_servers,
            applied: None,
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

    /// Makes the kernel's rules what they should be; how many changed.
    pub async fn ensure(&mut self, untunnelled: &BTreeSet<IpAddr>) -> anyhow::Result<usize> {
        let wanted = rules(&self.pods, &self.traffic(untunnelled));
        if self.applied.as_ref() == Some(&wanted) {
            return Ok(0);
        }
        let changed = self.netlink.ensure_host_rules(&wanted).await?;
        self.applied = Some(wanted);
        Ok(changed)
    }
}

/// The API server as the client reaches it, when its URL names an address
/// (a name is not resolved: the EndpointSlice, or
/// `WEFT_ENCRYPT_HOST_EXCLUDE`, says where it is).
pub fn api_server_address(url: &hyper::Uri) -> Option<SocketAddr> {
    let host = url.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = url
        .port_u16()
        .unwrap_or(if url.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    host.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_host_takes_table_77_only_when_encrypted() {
        let pods = [net("10.244.0.0/16"), net("fd00:244::/48")];
        assert_eq!(
            rules(&pods, &HostTraffic::Plain),
            BTreeSet::from([HostRule::FromPods(pods[0]), HostRule::FromPods(pods[1])])
        );
        let api = Excluded::service(at("192.0.2.10:6443"));
        let listed = Excluded::address(net("2001:db8::/64"));
        let encrypted = rules(
            &pods,
            &HostTraffic::Encrypted {
                exclude: vec![api, listed],
                untunnelled: vec!["198.18.1.7".parse().unwrap()],
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
                HostRule::Exclude(Excluded::address(net("198.18.1.7/32")), Way::From),
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

    #[test]
    fn listed_addresses_replace_the_api_servers() {
        let found = [at("198.18.1.1:6443"), at("198.18.1.9:6443")];
        let api = Exclusion::ApiServers {
            configured: Some(at("10.96.0.1:443")),
        };
        assert_eq!(
            api.excluded(&found),
            vec![
                Excluded::service(at("10.96.0.1:443")),
                Excluded::service(found[0]),
                Excluded::service(found[1]),
            ]
        );
        assert_eq!(
            api.excluded(&[]),
            vec![Excluded::service(at("10.96.0.1:443"))]
        );
        let listed = Exclusion::Listed(vec![net("192.0.2.7/24")]);
        assert_eq!(
            listed.excluded(&found),
            vec![Excluded {
                net: net("192.0.2.0/24"),
                tcp_port: None
            }]
        );
    }

    #[test]
    fn a_slice_lists_its_addresses_at_its_tcp_ports_ready_or_not() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["198.18.1.1"], "conditions": {"ready": true}},
                {"addresses": ["198.18.1.2"], "conditions": {"ready": false}},
                {"addresses": ["api.example.com"]},
            ],
            "ports": [
                {"name": "https", "port": 6443, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ],
        }))
        .unwrap();
        assert_eq!(
            slice_addresses(&slice),
            vec![at("198.18.1.1:6443"), at("198.18.1.2:6443")]
        );
    }

    #[test]
    fn kept_addresses_survive_a_restart_and_garbage_is_none() {
        let dir = std::env::temp_dir().join(format!("weft-kept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(API_SERVERS_FILE);
        assert!(read_kept(&path).is_empty());
        std::fs::write(&path, br#"["198.18.1.1:6443"]"#).unwrap();
        assert_eq!(read_kept(&path), vec![at("198.18.1.1:6443")]);
        std::fs::write(&path, b"{").unwrap();
        assert!(read_kept(&path).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_api_server_address_comes_from_its_url() {
        let cases = [
            ("https://198.18.0.1:6443", Some("198.18.0.1:6443")),
            ("https://[2001:db8::1]:6443", Some("[2001:db8::1]:6443")),
            ("https://10.96.0.1", Some("10.96.0.1:443")),
            ("https://api.example.com:6443", None),
        ];
        for (url, want) in cases {
            let uri: hyper::Uri = url.parse().unwrap();
            assert_eq!(api_server_address(&uri), want.map(at), "{url}");
        }
    }
}
