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
//! Pure: the rules as values; `reconcile::netlink` makes the kernel's
//! match.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

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
    /// Crosses WireGuard, except to these addresses.
    Encrypted { exclude: Vec<IpNet> },
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
    /// `to <net> lookup main`: never tunnelled as host traffic.
    Exclude(IpNet),
    /// `from <net> lookup main`: what an excluded address of this node's
    /// own sends (its answers) takes the same way back.
    ExcludeFrom(IpNet),
    /// `not fwmark FWMARK/FWMARK lookup 77`: everything but WireGuard's
    /// own datagrams.
    Unmarked(Family),
}

impl HostRule {
    pub fn priority(self) -> u32 {
        match self {
            Self::FromPods(_) => FROM_PODS_PRIORITY,
            Self::Exclude(_) | Self::ExcludeFrom(_) => EXCLUDE_PRIORITY,
            Self::Unmarked(_) => UNMARKED_PRIORITY,
        }
    }

    pub fn family(self) -> Family {
        match self {
            Self::FromPods(net) | Self::Exclude(net) | Self::ExcludeFrom(net) => {
                family_of(net.addr())
            }
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
    if let HostTraffic::Encrypted { exclude } = host {
        for net in exclude.iter().map(IpNet::trunc) {
            out.extend([HostRule::Exclude(net), HostRule::ExcludeFrom(net)]);
        }
        out.extend([
            HostRule::Unmarked(Family::V4),
            HostRule::Unmarked(Family::V6),
        ]);
    }
    out
}

/// The API server's address as the client reaches it, when its URL names
/// an address (a name is not resolved: `WEFT_ENCRYPT_HOST_EXCLUDE` lists
/// what it resolves to).
pub fn api_server_address(url: &hyper::Uri) -> Option<IpNet> {
    let host = url.host()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse::<IpAddr>().ok().map(IpNet::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn the_host_takes_table_77_only_when_encrypted() {
        let pods = [net("10.244.0.0/16"), net("fd00:244::/48")];
        assert_eq!(
            rules(&pods, &HostTraffic::Plain),
            BTreeSet::from([HostRule::FromPods(pods[0]), HostRule::FromPods(pods[1])])
        );
        let encrypted = rules(
            &pods,
            &HostTraffic::Encrypted {
                exclude: vec![net("192.0.2.10/32"), net("2001:db8::1/128")],
            },
        );
        assert_eq!(
            encrypted,
            BTreeSet::from([
                HostRule::FromPods(pods[0]),
                HostRule::FromPods(pods[1]),
                HostRule::Exclude(net("192.0.2.10/32")),
                HostRule::Exclude(net("2001:db8::1/128")),
                HostRule::ExcludeFrom(net("192.0.2.10/32")),
                HostRule::ExcludeFrom(net("2001:db8::1/128")),
                HostRule::Unmarked(Family::V4),
                HostRule::Unmarked(Family::V6),
            ])
        );
        // Exclusions come before the host's rule, after the pods': pods'
        // traffic to the API server's host address still crosses the mesh.
        let order: Vec<u32> = [
            HostRule::FromPods(pods[0]),
            HostRule::Exclude(pods[0]),
            HostRule::Unmarked(Family::V4),
        ]
        .iter()
        .map(|r| r.priority())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    }

    #[test]
    fn prefixes_are_kept_as_networks() {
        let host = HostTraffic::Encrypted {
            exclude: vec![net("192.0.2.77/24")],
        };
        assert!(rules(&[], &host).contains(&HostRule::Exclude(net("192.0.2.0/24"))));
    }

    #[test]
    fn the_api_server_address_comes_from_its_url() {
        let cases = [
            ("https://198.18.0.1:6443", Some("198.18.0.1/32")),
            ("https://[2001:db8::1]:6443", Some("2001:db8::1/128")),
            ("https://10.96.0.1", Some("10.96.0.1/32")),
            ("https://api.example.com:6443", None),
        ];
        for (url, want) in cases {
            let uri: hyper::Uri = url.parse().unwrap();
            assert_eq!(api_server_address(&uri), want.map(net), "{url}");
        }
    }
}
