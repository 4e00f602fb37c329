//! What this node claims for itself: its endpoint, mesh addresses and pod
//! CIDRs, published as its annotations.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use weft_keys::PublicKey;

use super::mesh_address_of;
use crate::annotations::{
    endpoint_problem, Claim, KeyProofs, NatMapping, NextPublicKey, FORCE_ENDPOINT, MAX_CANDIDATES,
    MESH_ADDRESSES, NO_ENDPOINT,
};
use crate::model::{ClusterRanges, LocalConfig, NodeInfo};

/// Why this node cannot say what it claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnError {
    #[error("Node {0} is not registered yet")]
    NotRegistered(String),
    #[error("{FORCE_ENDPOINT} {value:?} on this node: {error} (expected IP:port)")]
    BadForcedEndpoint { value: String, error: String },
    #[error("the Node has no InternalIP or ExternalIP address and no --endpoint was given")]
    NoEndpoint,
    #[error("this node's endpoint {endpoint} is not usable: {why}")]
    UnusableEndpoint {
        endpoint: SocketAddr,
        why: &'static str,
    },
    #[error("no pod CIDR of this node has an address in the mesh range {0} (a node's mesh address is its pod block's: it needs an IPv4 block at least as large as --cluster-cidr and --mesh-cidr allow)")]
    NoMeshAddress(IpNet),
    #[error("a key this node announces has no proof of possession (a bug: proofs are made for every announced key)")]
    Unproven,
}

/// How this node can be reached, as it publishes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reachability {
    pub endpoint: Option<SocketAddr>,
    /// Behind NAT: its mapping, as its peers see it.
    pub nat: Option<NatMapping>,
    /// Behind NAT: where it listens in its own networks.
    pub candidates: Vec<SocketAddr>,
    /// Where it hears peers from that publish no such address.
    pub observed: BTreeMap<String, SocketAddr>,
}

/// Which of a Node's addresses is its endpoint when nothing says otherwise
/// (`--endpoint-address`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EndpointAddress {
    /// Its first ExternalIP (else InternalIP): the address a cloud gives
    /// it for the outside, right for clusters that span networks.
    #[default]
    External,
    /// Its first InternalIP (else ExternalIP): for clusters whose nodes
    /// reach each other privately (one VPC, peered or VPN'd networks) and
    /// have no region labels to say so.
    Internal,
}

/// Where this node listens, as configured.
#[derive(Debug, Clone, Copy)]
pub struct Listening<'a> {
    /// `--endpoint`.
    pub endpoint: Option<SocketAddr>,
    /// `--endpoint-address`.
    pub prefer: EndpointAddress,
    /// `--endpoint-candidate`: more addresses it can be reached at (a VPN's,
    /// a port forward's).
    pub extra: &'a [SocketAddr],
    pub port: u16,
}

/// What this node publishes about reaching it and its peers. `seen`:
/// where its peers see it ([`super::nat::observations_of`]); `heard`:
/// where it hears each peer from (`before`: where it heard those not heard
/// yet since it started), and `peers` their claims and Nodes. Its
/// candidates are all its own addresses but the endpoint: InternalIPs,
/// ExternalIPs, then configured ones. Behind NAT — forced by an admin, or
/// learnt because peers see it at an address that is not its own — it
/// publishes no endpoint but its mapping and its own addresses; an
/// `--endpoint` flag or an address an admin forces is published as given
/// (it is in front of any NAT). Once behind NAT, it stays so when the
/// votes vanish (its published mapping stands until a quorum sees it
/// again); only an admin's `weft.dev/force-endpoint` makes it public again.
pub fn own_reachability(
    me: &NodeInfo,
    listening: Listening,
    ranges: &ClusterRanges,
    seen: &[SocketAddr],
    heard: &BTreeMap<String, SocketAddr>,
    before: &BTreeMap<String, SocketAddr>,
    peers: &BTreeMap<&str, super::nat::Listed>,
) -> Result<Reachability, OwnError> {
    let not_heard_yet = before.iter().filter(|(name, _)| !heard.contains_key(*name));
    let observed = heard
        .iter()
        .chain(not_heard_yet)
        .filter(|(name, at)| {
            peers
                .get(name.as_str())
                .is_some_and(|p| super::nat::worth_observing(**at, *p))
        })
        .map(|(name, at)| (name.clone(), *at))
        .collect();
    let endpoint = own_endpoint(me, listening, ranges)?;
    let mut own: Vec<SocketAddr> = Vec::new();
    let listed = me.internal_ips.iter().chain(&me.external_ips);
    for a in listed
        .map(|ip| SocketAddr::new(*ip, listening.port))
        .chain(listening.extra.iter().copied())
    {
        if endpoint_problem(a, ranges).is_none() && !own.contains(&a) {
            own.push(a);
        }
    }
    let own_ips: Vec<IpAddr> = own.iter().map(SocketAddr::ip).collect();
    // Once behind NAT, it stays so while no quorum says otherwise: votes
    // that vanish (an observer restarting, gone, or a compromised one
    // keeping quiet) are no evidence of a public address, and two NAT'd
    // nodes taking themselves for public would count as each other's
    // observers and flip each other back and forth.
    let nat = super::nat::mapping(seen, &own_ips)
        .or_else(|| crate::annotations::nat(me, ranges).ok().flatten());
    let forced_here = listening.endpoint.is_some()
        || me
            .annotations
            .get(FORCE_ENDPOINT)
            .is_some_and(|f| f.trim() != NO_ENDPOINT);
    let public = forced_here || (endpoint.is_some() && nat.is_none());
    if public {
        own.retain(|a| Some(*a) != endpoint);
    }
    own.truncate(MAX_CANDIDATES);
    Ok(match public {
        true => Reachability {
            endpoint,
            candidates: own,
            observed,
            ..Reachability::default()
        },
        false => Reachability {
            endpoint: None,
            nat,
            candidates: own,
            observed,
        },
    })
}

/// The endpoint to publish: the `--endpoint` flag, else an admin's
/// `weft.dev/force-endpoint` annotation (`none`: publish none, the node is
/// behind NAT), else the first address of the kind preferred (ExternalIP,
/// the address meant for the outside, unless told otherwise), else of the
/// other kind, at the listen port. One every other node would refuse is an
/// error here.
fn own_endpoint(
    me: &NodeInfo,
    listening: Listening,
    ranges: &ClusterRanges,
) -> Result<Option<SocketAddr>, OwnError> {
    let (first, then) = match listening.prefer {
        EndpointAddress::External => (&me.external_ips, &me.internal_ips),
        EndpointAddress::Internal => (&me.internal_ips, &me.external_ips),
    };
    let endpoint = match (listening.endpoint, me.annotations.get(FORCE_ENDPOINT)) {
        (Some(e), _) => e,
        (None, Some(forced)) if forced.trim() == NO_ENDPOINT => return Ok(None),
        (None, Some(forced)) => forced
            .trim()
            .parse()
            .map_err(|e: std::net::AddrParseError| OwnError::BadForcedEndpoint {
                value: forced.chars().take(64).collect(),
                error: e.to_string(),
            })?,
        (None, None) => first
            .first()
            .or(then.first())
            .map(|ip| SocketAddr::new(*ip, listening.port))
            .ok_or(OwnError::NoEndpoint)?,
    };
    match endpoint_problem(endpoint, ranges) {
        Some(why) => Err(OwnError::UnusableEndpoint { endpoint, why }),
        None => Ok(Some(endpoint)),
    }
}

/// This node's keys as it announces them (the private halves stay in
/// its key file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnKeys {
    pub public_key: PublicKey,
    /// When `public_key` came into use (Unix seconds).
    pub since: u64,
    pub next: Option<NextPublicKey>,
}

impl OwnKeys {
    /// A key with no rotation under way.
    pub fn steady(public_key: PublicKey, since: u64) -> Self {
        Self {
            public_key,
            since,
            next: None,
        }
    }
}

/// This node's claim: its keys with their `proofs` (made where the private
/// keys are), its endpoint, its pod CIDRs (`spec.podCIDRs`, or blocks it
/// claimed) and the mesh address of one of them per family. A published
/// mesh address is kept while it is still one of its blocks'; nothing
/// another node claims can move it.
pub fn own_claim(
    me: &NodeInfo,
    local: &LocalConfig,
    keys: &OwnKeys,
    proofs: KeyProofs,
    reachability: Reachability,
    mut pod_cidrs: Vec<IpNet>,
) -> Result<Claim, OwnError> {
    if proofs.next.is_some() != keys.next.is_some() {
        return Err(OwnError::Unproven);
    }
    pod_cidrs.sort();
    let published: Vec<IpAddr> = me
        .annotations
        .get(MESH_ADDRESSES)
        .map(|v| v.split(',').filter_map(|a| a.trim().parse().ok()).collect())
        .unwrap_or_default();
    let mut mesh_addresses = Vec::new();
    for range in local.ranges.mesh.iter() {
        let mine: Vec<IpAddr> = pod_cidrs
            .iter()
            .filter(|c| c.addr().is_ipv4() == range.addr().is_ipv4())
            .filter_map(|c| mesh_address_of(&local.ranges, c))
            .collect();
        match published.iter().find(|a| mine.contains(a)).or(mine.first()) {
            Some(a) => mesh_addresses.push(*a),
            // The IPv4 address is required; without an IPv6 block a node
            // has no IPv6 mesh address.
            None if range.addr().is_ipv4() => return Err(OwnError::NoMeshAddress(range)),
            None => {}
        }
    }
    Ok(Claim {
        public_key: keys.public_key,
        proofs: std::sync::Arc::new(proofs),
        endpoint: reachability.endpoint,
        mesh_addresses,
        pod_cidrs,
        unreachable: std::sync::Arc::new(local.unreachable.clone()),
        key_since: Some(keys.since),
        next_key: keys.next.clone(),
        observed: std::sync::Arc::new(reachability.observed),
        nat: reachability.nat,
        candidates: reachability.candidates,
        // Not for peers that are down: while nothing answers, the ladder
        // cycles through their addresses, which is no news to publish.
        given_up: std::sync::Arc::new(
            local
                .given_up
                .iter()
                .filter(|(peer, _)| !local.unreachable.contains(*peer))
                .map(|(peer, addrs)| (peer.clone(), addrs.clone()))
                .collect(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::annotations::{fixtures, subject};
    use crate::model::Placement;

    fn node(name: &str, annotations: BTreeMap<String, String>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            uid: format!("{name}-uid"),
            created: 0,
            internal_ips: vec!["198.18.1.1".parse().unwrap()],
            external_ips: vec![],
            spec_pod_cidrs: vec!["198.19.1.0/24".parse().unwrap()],
            annotations,
            placement: Placement::anywhere(),
        }
    }

    fn cidrs(c: &[&str]) -> Vec<IpNet> {
        c.iter().map(|c| c.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn claim(me: &NodeInfo, pod_cidrs: &[&str]) -> Result<Claim, OwnError> {
        let key = fixtures::private(1);
        own_claim(
            me,
            &LocalConfig::new(&me.name, ClusterRanges::lab()),
            &OwnKeys::steady(key.public_key(), 0),
            KeyProofs {
                key: key.prove(subject(me)),
                next: None,
            },
            Reachability::default(),
            cidrs(pod_cidrs),
        )
    }

    fn listening(endpoint: Option<SocketAddr>) -> Listening<'static> {
        Listening {
            endpoint,
            prefer: EndpointAddress::External,
            extra: &[],
            port: 51820,
        }
    }

    #[test]
    fn endpoint_precedence() {
        let r = ClusterRanges::lab();
        let mut me = node("a", BTreeMap::new());
        // ExternalIP first, unless InternalIPs are preferred.
        let mut cloud = me.clone();
        cloud.external_ips = vec![ip("192.0.2.1")];
        assert_eq!(
            own_endpoint(&cloud, listening(None), &r).unwrap(),
            Some("192.0.2.1:51820".parse().unwrap())
        );
        let internal = Listening {
            prefer: EndpointAddress::Internal,
            ..listening(None)
        };
        assert_eq!(
            own_endpoint(&cloud, internal, &r).unwrap(),
            Some("198.18.1.1:51820".parse().unwrap())
        );
        cloud.internal_ips.clear();
        assert_eq!(
            own_endpoint(&cloud, internal, &r).unwrap(),
            Some("192.0.2.1:51820".parse().unwrap()),
            "the other kind when there is none of the preferred"
        );
        assert_eq!(
            own_endpoint(&me, listening(None), &r).unwrap(),
            Some("198.18.1.1:51820".parse().unwrap())
        );
        me.annotations
            .insert(FORCE_ENDPOINT.into(), "203.0.113.5:4500".into());
        assert_eq!(
            own_endpoint(&me, listening(None), &r).unwrap(),
            Some("203.0.113.5:4500".parse().unwrap())
        );
        let flag = "192.0.2.1:1".parse().unwrap();
        assert_eq!(
            own_endpoint(&me, listening(Some(flag)), &r).unwrap(),
            Some(flag)
        );
        // Behind NAT: no endpoint at all.
        me.annotations
            .insert(FORCE_ENDPOINT.into(), NO_ENDPOINT.into());
        assert_eq!(own_endpoint(&me, listening(None), &r).unwrap(), None);
        me.annotations
            .insert(FORCE_ENDPOINT.into(), "nonsense".into());
        assert!(own_endpoint(&me, listening(None), &r)
            .unwrap_err()
            .to_string()
            .contains(FORCE_ENDPOINT));
        // One that every peer would refuse is refused here first.
        me.annotations
            .insert(FORCE_ENDPOINT.into(), "127.0.0.1:51820".into());
        assert!(matches!(
            own_endpoint(&me, listening(None), &r),
            Err(OwnError::UnusableEndpoint { .. })
        ));
        me.internal_ips.clear();
        me.annotations.clear();
        assert_eq!(
            own_endpoint(&me, listening(None), &r),
            Err(OwnError::NoEndpoint)
        );
    }

    /// Behind NAT by what a quorum of peers sees, or by an admin's `none`:
    /// no endpoint,
    /// its mapping and own addresses; an address given by flag or admin is
    /// published as given; peers are observed only where they are heard
    /// away from what they publish.
    #[test]
    fn a_node_seen_elsewhere_than_it_is_publishes_its_nat_instead_of_an_endpoint() {
        use crate::annotations::NatKind;
        let r = ClusterRanges::lab();
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let (peer_node, _) = fixtures::published(2);
        let mut peer = fixtures::claim(&peer_node, 2, 2, "198.19.2.0/24".parse().unwrap());
        peer.endpoint = None;
        peer.candidates = vec![addr("10.0.0.2:51820")];
        let listed = crate::planner::nat::Listed {
            claim: &peer,
            node: &peer_node,
        };
        let peers = BTreeMap::from([("node-2", listed)]);
        let heard = |at: &str| BTreeMap::from([("node-2".to_string(), addr(at))]);
        let reach = |me: &NodeInfo, flag: Option<&str>, seen: &[&str], heard_at: &str| {
            let seen: Vec<SocketAddr> = seen.iter().map(|a| addr(a)).collect();
            let listening = listening(flag.map(addr));
            own_reachability(
                me,
                listening,
                &r,
                &seen,
                &heard(heard_at),
                &BTreeMap::new(),
                &peers,
            )
            .unwrap()
        };
        let me = node("a", BTreeMap::new());
        // Seen at its own address (or not at all): public.
        let public = reach(&me, None, &["198.18.1.1:51820"], "10.0.0.2:51820");
        assert_eq!(public.endpoint, Some(addr("198.18.1.1:51820")));
        assert_eq!((public.nat, public.candidates.len()), (None, 0));
        assert!(
            public.observed.is_empty(),
            "node-2 heard at its own address"
        );
        // Seen elsewhere by one observer (perhaps lying): still public.
        let lied = reach(&me, None, &["203.0.113.9:40000"], "10.0.0.2:51820");
        assert_eq!(
            (lied.endpoint, lied.nat),
            (Some(addr("198.18.1.1:51820")), None)
        );
        // Seen elsewhere by a quorum: behind NAT.
        let twice = ["203.0.113.9:40000", "203.0.113.9:40000"];
        let natd = reach(&me, None, &twice, "203.0.113.2:4444");
        assert_eq!(natd.endpoint, None);
        assert_eq!(
            natd.nat,
            Some(NatMapping {
                kind: NatKind::Eim,
                reflexive: addr("203.0.113.9:40000")
            })
        );
        assert_eq!(natd.candidates, vec![addr("198.18.1.1:51820")]);
        assert_eq!(natd.observed, heard("203.0.113.2:4444"));
        // An address given by flag or admin stands, whatever peers see.
        let flagged = reach(
            &me,
            Some("192.0.2.1:1"),
            &["203.0.113.9:40000"],
            "10.0.0.2:51820",
        );
        assert_eq!(
            (flagged.endpoint, flagged.nat),
            (Some(addr("192.0.2.1:1")), None)
        );
        let mut forced = node("a", BTreeMap::new());
        forced
            .annotations
            .insert(FORCE_ENDPOINT.into(), "203.0.113.5:4500".into());
        let forced = reach(&forced, None, &twice, "10.0.0.2:51820");
        assert_eq!(
            (forced.endpoint, forced.nat),
            (Some(addr("203.0.113.5:4500")), None)
        );
        // `none`: behind NAT from the start, its mapping once it is seen.
        let mut none = node("a", BTreeMap::new());
        none.annotations
            .insert(FORCE_ENDPOINT.into(), NO_ENDPOINT.into());
        let unseen = reach(&none, None, &[], "10.0.0.2:51820");
        assert_eq!((unseen.endpoint, unseen.nat), (None, None));
        assert_eq!(unseen.candidates, vec![addr("198.18.1.1:51820")]);
        // Learnt behind NAT, then the votes vanish: still behind NAT, at
        // the mapping it published.
        let mut learnt = node("a", BTreeMap::new());
        learnt.annotations.insert(
            crate::annotations::NAT.into(),
            "eim 203.0.113.9:40000".into(),
        );
        let alone = reach(&learnt, None, &["203.0.113.9:40000"], "10.0.0.2:51820");
        assert_eq!(alone.endpoint, None, "one vote left: still behind NAT");
        assert_eq!(alone.nat, natd.nat);
        // A quorum elsewhere: the new mapping.
        let moved = reach(
            &learnt,
            None,
            &["203.0.113.7:1", "203.0.113.7:1"],
            "10.0.0.2:51820",
        );
        assert_eq!(moved.nat.map(|m| m.reflexive), Some(addr("203.0.113.7:1")));
    }

    /// A restarted node keeps observing where it heard NAT'd peers before,
    /// until it hears them again.
    #[test]
    fn a_restarted_node_keeps_its_observations_until_it_hears_anew() {
        let r = ClusterRanges::lab();
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let (peer_node, _) = fixtures::published(2);
        let mut peer = fixtures::claim(&peer_node, 2, 2, "198.19.2.0/24".parse().unwrap());
        peer.endpoint = None;
        let listed = crate::planner::nat::Listed {
            claim: &peer,
            node: &peer_node,
        };
        let peers = BTreeMap::from([("node-2", listed)]);
        let before = BTreeMap::from([("node-2".to_string(), addr("203.0.113.2:4444"))]);
        let listening = listening(None);
        let me = node("a", BTreeMap::new());
        let observed = |heard: &BTreeMap<String, SocketAddr>| {
            own_reachability(&me, listening, &r, &[], heard, &before, &peers)
                .unwrap()
                .observed
        };
        assert_eq!(observed(&BTreeMap::new()), before, "not heard yet");
        let anew = BTreeMap::from([("node-2".to_string(), addr("203.0.113.2:5555"))]);
        assert_eq!(observed(&anew), anew, "heard: where it is now");
    }

    /// A cloud node: its ExternalIP is its endpoint, its InternalIP and
    /// configured addresses its candidates; seen at its ExternalIP it is not
    /// behind NAT (a 1:1 NAT forwards everything to it).
    #[test]
    fn a_node_offers_every_address_it_has_and_its_external_ip_first() {
        let r = ClusterRanges::lab();
        let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let mut me = node("a", BTreeMap::new());
        me.internal_ips = vec![ip("10.0.0.1"), ip("127.0.0.1")];
        me.external_ips = vec![ip("198.51.100.1")];
        let extra = [addr("192.0.2.7:4500"), addr("10.0.0.1:51820")];
        let listening = Listening {
            extra: &extra,
            ..listening(None)
        };
        let seen = [addr("198.51.100.1:51820"), addr("198.51.100.1:51820")];
        let got = own_reachability(
            &me,
            listening,
            &r,
            &seen,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(got.endpoint, Some(addr("198.51.100.1:51820")));
        assert_eq!(got.nat, None);
        assert_eq!(
            got.candidates,
            [addr("10.0.0.1:51820"), addr("192.0.2.7:4500")],
            "unusable addresses left out, each once"
        );
        // Seen by a quorum at another address: behind NAT, every own
        // address a candidate.
        let elsewhere = [addr("203.0.113.9:1"), addr("203.0.113.9:1")];
        let natd = own_reachability(
            &me,
            listening,
            &r,
            &elsewhere,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(natd.endpoint, None);
        assert_eq!(
            natd.candidates,
            [
                addr("10.0.0.1:51820"),
                addr("198.51.100.1:51820"),
                addr("192.0.2.7:4500")
            ]
        );
    }

    /// A node's mesh addresses are its blocks': the first block's, or the
    /// one it publishes while that block is still its own.
    #[test]
    fn the_mesh_address_is_a_block_s_own_and_stays_with_it() {
        let me = node("a", BTreeMap::new());
        let two = ["198.19.1.0/24", "198.19.7.0/24", "fd98:19:0:1::/64"];
        let first = claim(&me, &two).unwrap();
        assert_eq!(
            first.mesh_addresses,
            vec![ip("198.18.128.65"), ip("fd98:18::8000:0:1")]
        );
        // Publishing the second block's address: kept.
        let mut published = me.clone();
        published.annotations.insert(
            MESH_ADDRESSES.into(),
            "198.18.129.193,fd98:18::8000:0:1".into(),
        );
        assert_eq!(
            claim(&published, &two).unwrap().mesh_addresses[0],
            ip("198.18.129.193")
        );
        // That block gone: back to a block it holds.
        assert_eq!(
            claim(&published, &two[..1]).unwrap().mesh_addresses,
            vec![ip("198.18.128.65")]
        );
        // Any other published address (another node's, say) is not kept.
        published
            .annotations
            .insert(MESH_ADDRESSES.into(), "198.18.128.2".into());
        assert_eq!(
            claim(&published, &two).unwrap().mesh_addresses[0],
            ip("198.18.128.65")
        );
        // No IPv4 block: no mesh address to publish.
        assert_eq!(
            claim(&me, &["fd98:19:0:1::/64"]),
            Err(OwnError::NoMeshAddress("198.18.128.0/17".parse().unwrap()))
        );
    }

    #[test]
    fn every_announced_key_needs_its_proof() {
        let me = node("a", BTreeMap::new());
        let key = fixtures::private(1);
        let mut keys = OwnKeys::steady(key.public_key(), 0);
        keys.next = Some(NextPublicKey {
            key: fixtures::key(2),
            at: None,
            pending: Default::default(),
        });
        let unproven = own_claim(
            &me,
            &LocalConfig::new("a", ClusterRanges::lab()),
            &keys,
            KeyProofs {
                key: key.prove(subject(&me)),
                next: None,
            },
            Reachability::default(),
            cidrs(&["198.19.1.0/24"]),
        );
        assert_eq!(unproven, Err(OwnError::Unproven));
    }
}
