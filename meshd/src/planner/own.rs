//! What this node claims for itself: its endpoint, mesh addresses and pod
//! CIDRs, published as its annotations.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use weft_keys::PublicKey;

use super::{choose_mesh_address, Parsed};
use crate::annotations::{
    endpoint_problem, Claim, NextPublicKey, FORCE_ENDPOINT, MESH_ADDRESSES, NO_ENDPOINT,
};
use crate::model::{ClusterRanges, LocalConfig, NodeInfo};

/// Why this node cannot say what it claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnError {
    #[error("Node {0} is not registered yet")]
    NotRegistered(String),
    #[error("{FORCE_ENDPOINT} {value:?} on this node: {error} (expected IP:port)")]
    BadForcedEndpoint { value: String, error: String },
    #[error("the Node has no InternalIP address and no --endpoint was given")]
    NoEndpoint,
    #[error("this node's endpoint {endpoint} is not usable: {why}")]
    UnusableEndpoint {
        endpoint: SocketAddr,
        why: &'static str,
    },
    #[error("the mesh range {0} has no free address")]
    MeshRangeFull(IpNet),
}

/// The endpoint to publish: the `--endpoint` flag, else an admin's
/// `weft.dev/force-endpoint` annotation (`none`: publish none, the node is
/// behind NAT), else the first InternalIP at the listen port. One every
/// other node would refuse is an error here.
pub fn own_endpoint(
    me: &NodeInfo,
    flag: Option<SocketAddr>,
    listen_port: u16,
    ranges: &ClusterRanges,
) -> Result<Option<SocketAddr>, OwnError> {
    let endpoint = match (flag, me.annotations.get(FORCE_ENDPOINT)) {
        (Some(e), _) => e,
        (None, Some(forced)) if forced.trim() == NO_ENDPOINT => return Ok(None),
        (None, Some(forced)) => forced
            .trim()
            .parse()
            .map_err(|e: std::net::AddrParseError| OwnError::BadForcedEndpoint {
                value: forced.chars().take(64).collect(),
                error: e.to_string(),
            })?,
        (None, None) => me
            .internal_ips
            .first()
            .map(|ip| SocketAddr::new(*ip, listen_port))
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

/// This node's claim, given what every node claims (`parsed`) and its pod
/// CIDRs (`spec.podCIDRs`, or blocks it claimed). Keeps published mesh
/// addresses unless an older node holds them.
pub fn own_claim(
    parsed: &[Parsed],
    local: &LocalConfig,
    keys: &OwnKeys,
    endpoint: Option<SocketAddr>,
    mut pod_cidrs: Vec<IpNet>,
) -> Result<Claim, OwnError> {
    let me = parsed
        .iter()
        .map(|(n, _)| *n)
        .find(|n| n.name == local.node_name)
        .ok_or_else(|| OwnError::NotRegistered(local.node_name.clone()))?;
    let published: Vec<IpAddr> = me
        .annotations
        .get(MESH_ADDRESSES)
        .map(|v| v.split(',').filter_map(|a| a.trim().parse().ok()).collect())
        .unwrap_or_default();
    let mut held_by_older = Vec::new();
    let mut claimed_by_others = Vec::new();
    for (other, claim) in parsed.iter().filter(|(n, _)| n.name != me.name) {
        if let Ok(Some(claim)) = claim {
            if (other.created, &other.name) < (me.created, &me.name) {
                held_by_older.extend(claim.mesh_addresses.iter().copied());
            }
            claimed_by_others.extend(claim.mesh_addresses.iter().copied());
        }
    }
    let mut mesh_addresses = Vec::new();
    for range in local.ranges.mesh.iter() {
        let current = published.iter().copied().find(|a| range.contains(a));
        let chosen =
            choose_mesh_address(&me.name, range, current, &held_by_older, &claimed_by_others)
                .ok_or(OwnError::MeshRangeFull(range))?;
        mesh_addresses.push(chosen);
    }
    pod_cidrs.sort();
    Ok(Claim {
        public_key: keys.public_key,
        endpoint,
        mesh_addresses,
        pod_cidrs,
        unreachable: std::sync::Arc::new(local.unreachable.clone()),
        key_since: Some(keys.since),
        next_key: keys.next.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::render;
    use crate::model::{ClusterSnapshot, Placement};
    use crate::planner::parse_all;

    fn own_claim(
        snap: &ClusterSnapshot,
        local: &LocalConfig,
        key: PublicKey,
        endpoint: Option<SocketAddr>,
        pod_cidrs: Vec<IpNet>,
    ) -> Result<Claim, OwnError> {
        super::own_claim(
            &parse_all(snap, &local.ranges),
            local,
            &super::OwnKeys::steady(key, 0),
            endpoint,
            pod_cidrs,
        )
    }
    use std::collections::BTreeMap;

    fn node(name: &str, created: i64, annotations: BTreeMap<String, String>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            created,
            internal_ips: vec!["198.18.1.1".parse().unwrap()],
            spec_pod_cidrs: vec!["198.19.1.0/24".parse().unwrap()],
            annotations,
            placement: Placement::anywhere(),
        }
    }

    fn cidrs(c: &str) -> Vec<IpNet> {
        vec![c.parse().unwrap()]
    }

    fn local(name: &str) -> LocalConfig {
        LocalConfig::new(name, ClusterRanges::lab())
    }

    #[test]
    fn endpoint_precedence() {
        let r = ClusterRanges::lab();
        let mut me = node("a", 0, BTreeMap::new());
        assert_eq!(
            own_endpoint(&me, None, 51820, &r).unwrap(),
            Some("198.18.1.1:51820".parse().unwrap())
        );
        me.annotations
            .insert(FORCE_ENDPOINT.into(), "203.0.113.5:4500".into());
        assert_eq!(
            own_endpoint(&me, None, 51820, &r).unwrap(),
            Some("203.0.113.5:4500".parse().unwrap())
        );
        let flag = "192.0.2.1:1".parse().unwrap();
        assert_eq!(
            own_endpoint(&me, Some(flag), 51820, &r).unwrap(),
            Some(flag)
        );
        // Behind NAT: no endpoint at all.
        me.annotations
            .insert(FORCE_ENDPOINT.into(), NO_ENDPOINT.into());
        assert_eq!(own_endpoint(&me, None, 51820, &r).unwrap(), None);
        me.annotations
            .insert(FORCE_ENDPOINT.into(), "nonsense".into());
        assert!(own_endpoint(&me, None, 51820, &r)
            .unwrap_err()
            .to_string()
            .contains(FORCE_ENDPOINT));
        // One that every peer would refuse is refused here first.
        me.annotations
            .insert(FORCE_ENDPOINT.into(), "127.0.0.1:51820".into());
        assert!(matches!(
            own_endpoint(&me, None, 51820, &r),
            Err(OwnError::UnusableEndpoint { .. })
        ));
        me.internal_ips.clear();
        me.annotations.clear();
        assert_eq!(
            own_endpoint(&me, None, 51820, &r),
            Err(OwnError::NoEndpoint)
        );
    }

    #[test]
    fn yields_to_an_older_node_and_keeps_otherwise() {
        let key = PublicKey::from_bytes([1; 32]);
        let ep = Some("198.18.1.1:51820".parse().unwrap());
        let a = node("a", 0, BTreeMap::new());
        let snap = ClusterSnapshot {
            nodes: vec![a.clone()],
            blocks: Default::default(),
            ..Default::default()
        };
        let first = own_claim(&snap, &local("a"), key, ep, cidrs("198.19.1.0/24")).unwrap();
        assert_eq!(first.mesh_addresses.len(), 2);
        assert_eq!(
            first.pod_cidrs,
            vec!["198.19.1.0/24".parse::<IpNet>().unwrap()]
        );

        // b is younger and publishes the same addresses as a: b must move.
        let a_published = node("a", 0, render(&first));
        let mut b_claim = first.clone();
        b_claim.public_key = PublicKey::from_bytes([2; 32]);
        let mut b = node("b", 5, render(&b_claim));
        b.spec_pod_cidrs = vec!["198.19.2.0/24".parse().unwrap()];
        let snap = ClusterSnapshot {
            nodes: vec![a_published.clone(), b],
            blocks: Default::default(),
            ..Default::default()
        };
        let b_new = own_claim(
            &snap,
            &local("b"),
            b_claim.public_key,
            ep,
            cidrs("198.19.2.0/24"),
        )
        .unwrap();
        assert!(b_new
            .mesh_addresses
            .iter()
            .all(|m| !first.mesh_addresses.contains(m)));
        // a keeps what it has.
        assert_eq!(
            own_claim(&snap, &local("a"), key, ep, cidrs("198.19.1.0/24"))
                .unwrap()
                .mesh_addresses,
            first.mesh_addresses
        );
    }
}
