//! Interface state, addresses and routes through rtnetlink. Weft's routes
//! carry their own route protocol number, so meshd diffs and deletes only
//! routes it made and never touches anyone else's.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::model::{Route, RouteKind};

/// `proto 77` in `ip route`: routes Weft owns.
pub const ROUTE_PROTOCOL: u8 = 77;
/// Mesh routes win over the unreachable backstop for the same prefix.
pub const MESH_METRIC: u32 = 100;
pub const UNREACHABLE_METRIC: u32 = 4000;

pub struct Netlink {
    handle: Handle,
}

/// A route of ours as found in the kernel.
#[derive(Debug, Clone)]
pub struct Found {
    pub route: Option<Route>,
    message: RouteMessage,
}

impl Netlink {
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn link_index(&self, name: &str) -> Result<Option<u32>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            Err(rtnetlink::Error::NetlinkError(e))
                if e.raw_code() == -(nix::errno::Errno::ENODEV as i32) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
        }
    }

    pub async fn del_link(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .with_context(|| format!("deleting link {index}"))
    }

    /// The MTU of the link holding `addr` (the underlay interface).
    pub async fn mtu_of_address(&self, addr: IpAddr) -> Result<Option<u32>> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_address_filter(addr)
            .execute();
        let Some(found) = addrs.try_next().await? else {
            return Ok(None);
        };
        let mut links = self
            .handle
            .link()
            .get()
            .match_index(found.header.index)
            .execute();
        Ok(links.try_next().await?.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
        }))
    }

    /// Sets the link up and its MTU, if they are not already so. Returns
    /// whether anything changed.
    pub async fn ensure_link(&self, index: u32, mtu: u32) -> Result<bool> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await?
            .context("the WireGuard link vanished")?;
        let up = link.header.flags.contains(LinkFlags::Up);
        let current = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        });
        if up && current == Some(mtu) {
            return Ok(false);
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().mtu(mtu).build())
            .execute()
            .await
            .context("setting the WireGuard link up")?;
        Ok(true)
    }

    /// Addresses on the link, with the messages needed to delete them.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(IpNet, AddressMessage)>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })?;
                // IPv6 link-local addresses are the kernel's, not ours.
                if let IpAddr::V6(v6) = ip {
                    if v6.segments()[0] & 0xffc0 == 0xfe80 {
                        return None;
                    }
                }
                Some((IpNet::new(ip, m.header.prefix_len).ok()?, m))
            })
            .collect())
    }

    pub async fn add_address(&self, index: u32, net: IpNet) -> Result<()> {
        self.handle
            .address()
            .add(index, net.addr(), net.prefix_len())
            .execute()
            .await
            .with_context(|| format!("adding address {net}"))
    }

    pub async fn del_address(&self, message: AddressMessage) -> Result<()> {
        self.handle
            .address()
            .del(message)
            .execute()
            .await
            .context("deleting an address")
    }

    /// The interfaces holding IPv6 routes learned from router
    /// advertisements (the uplinks that take them), by name.
    pub async fn ra_interfaces(&self) -> Result<Vec<String>> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .context("listing IPv6 routes")?;
        let indexes: BTreeSet<u32> = routes
            .iter()
            .filter(|m| m.header.protocol == RouteProtocol::Ra)
            .flat_map(|m| &m.attributes)
            .filter_map(|a| match a {
                RouteAttribute::Oif(index) => Some(*index),
                _ => None,
            })
            .collect();
        let mut names = Vec::new();
        for index in indexes {
            let mut links = self.handle.link().get().match_index(index).execute();
            if let Some(link) = links.try_next().await.context("looking up a link")? {
                names.extend(link.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) => Some(name.clone()),
                    _ => None,
                }));
            }
        }
        Ok(names)
    }

    /// Every route with Weft's protocol, in the main table, both families.
    pub async fn our_routes(&self, wg_index: Option<u32>) -> Result<Vec<Found>> {
        let mut found = Vec::new();
        for query in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await?;
            for m in msgs
                .into_iter()
                .filter(|m| m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL))
            {
                found.push(Found {
                    route: classify(&m, wg_index),
                    message: m,
                });
            }
        }
        Ok(found)
    }

    pub async fn add_route(&self, route: &Route, wg_index: u32) -> Result<()> {
        let builder = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.dst.addr(), route.dst.prefix_len())
            .map_err(|e| anyhow::anyhow!("route {}: {e}", route.dst))?
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        let message = match route.kind {
            RouteKind::Mesh => builder
                .output_interface(wg_index)
                .priority(MESH_METRIC)
                .scope(RouteScope::Link)
                .build(),
            RouteKind::Unreachable => builder
                .kind(RouteType::Unreachable)
                .priority(UNREACHABLE_METRIC)
                .build(),
        };
        self.handle
            .route()
            .add(message)
            .execute()
            .await
            .with_context(|| format!("adding route {route:?}"))
    }

    /// Adds those of `routes` (unreachable ones: they need no interface)
    /// that are not there yet; returns how many it added.
    pub async fn ensure_unreachable(&self, routes: &BTreeSet<Route>) -> Result<usize> {
        let present: BTreeSet<Route> = self
            .our_routes(None)
            .await?
            .into_iter()
            .filter_map(|f| f.route)
            .collect();
        let mut added = 0;
        for r in routes.difference(&present) {
            anyhow::ensure!(
                r.kind == RouteKind::Unreachable,
                "{r:?} needs the WireGuard interface"
            );
            self.add_route(r, 0).await?;
            added += 1;
        }
        Ok(added)
    }

    pub async fn del_route(&self, found: Found) -> Result<()> {
        self.handle
            .route()
            .del(found.message)
            .execute()
            .await
            .context("deleting a route")
    }
}

/// What a kernel route of ours is in plan terms; `None` for one that fits
/// no plan (e.g. left pointing at an old interface) and must go.
fn classify(m: &RouteMessage, wg_index: Option<u32>) -> Option<Route> {
    let dst = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })?;
    let dst = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
    let oif = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    match m.header.kind {
        RouteType::Unreachable => Some(Route {
            dst,
            kind: RouteKind::Unreachable,
        }),
        RouteType::Unicast if oif.is_some() && oif == wg_index => Some(Route {
            dst,
            kind: RouteKind::Mesh,
        }),
        _ => None,
    }
}

/// The set difference both ways: what to add, and what is there but unwanted.
pub fn set_diff<T: Ord + Clone>(desired: &BTreeSet<T>, actual: &BTreeSet<T>) -> (Vec<T>, Vec<T>) {
    (
        desired.difference(actual).cloned().collect(),
        actual.difference(desired).cloned().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_diff_both_ways() {
        let d: BTreeSet<u8> = [1, 2, 3].into();
        let a: BTreeSet<u8> = [2, 3, 4].into();
        assert_eq!(set_diff(&d, &a), (vec![1], vec![4]));
        assert_eq!(set_diff(&d, &d), (vec![], vec![]));
    }

    #[test]
    fn classifies_our_routes() {
        let mesh = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix("198.19.2.0".parse().unwrap(), 24)
            .unwrap()
            .output_interface(7)
            .build();
        let dst: IpNet = "198.19.2.0/24".parse().unwrap();
        assert_eq!(
            classify(&mesh, Some(7)),
            Some(Route {
                dst,
                kind: RouteKind::Mesh
            })
        );
        assert_eq!(
            classify(&mesh, Some(8)),
            None,
            "a route to an old interface must go"
        );
        let unreachable = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix("fd98:19:0:2::".parse().unwrap(), 64)
            .unwrap()
            .kind(RouteType::Unreachable)
            .build();
        assert_eq!(
            classify(&unreachable, None).map(|r| r.kind),
            Some(RouteKind::Unreachable)
        );
    }
}
