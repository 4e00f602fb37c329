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
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::IpVersion;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use crate::host_traffic::{
    Family, HostRule, Way, EXCLUDE_PRIORITY, FROM_PODS_PRIORITY, FWMARK, UNMARKED_PRIORITY,
};
use crate::model::{Route, RouteKind};

/// The first answer of a netlink request, reading the answer to its end:
/// a stream dropped early (a filtered dump has more parts) leaves the rest
/// undeliverable, and netlink-proto warns about every such message.
pub(crate) async fn first<T, E>(
    answers: impl futures::Stream<Item = Result<T, E>>,
) -> Result<Option<T>, E> {
    Ok(answers.try_collect::<Vec<T>>().await?.into_iter().next())
}

/// `proto 77` in `ip route`: routes Weft owns.
pub const ROUTE_PROTOCOL: u8 = 77;
/// Mesh routes win over the unreachable backstop for the same prefix.
pub const MESH_METRIC: u32 = 100;
pub const UNREACHABLE_METRIC: u32 = 4000;
/// The table of routes to other nodes' host addresses
/// ([`RouteKind::HostMesh`]), consulted only for traffic from the cluster's
/// pod ranges and, with `WEFT_ENCRYPT_HOST`, the host's own
/// ([`crate::host_traffic`]).
pub const HOST_TABLE: u32 = 77;

/// The table a route of this kind lives in.
fn table_of(kind: RouteKind) -> u32 {
    match kind {
        RouteKind::Mesh | RouteKind::Unreachable => u32::from(RouteHeader::RT_TABLE_MAIN),
        RouteKind::HostMesh | RouteKind::HostUnreachable => HOST_TABLE,
    }
}

/// One rtnetlink connection; clones share it.
#[derive(Clone)]
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
        let links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match first(links).await {
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

    /// The address entry of a local address.
    async fn address_entry(&self, addr: IpAddr) -> Result<Option<AddressMessage>> {
        let addrs = self
            .handle
            .address()
            .get()
            .set_address_filter(addr)
            .execute();
        Ok(first(addrs).await?)
    }

    /// The subnet a local address is on (its connected prefix), if the
    /// address is this host's.
    pub async fn subnet_of_address(&self, addr: IpAddr) -> Result<Option<IpNet>> {
        Ok(self
            .address_entry(addr)
            .await?
            .and_then(|m| IpNet::new(addr, m.header.prefix_len).ok())
            .map(|n| n.trunc()))
    }

    /// The MTU of the link holding `addr` (the underlay interface).
    pub async fn mtu_of_address(&self, addr: IpAddr) -> Result<Option<u32>> {
        let Some(found) = self.address_entry(addr).await? else {
            return Ok(None);
        };
        let links = self
            .handle
            .link()
            .get()
            .match_index(found.header.index)
            .execute();
        Ok(first(links).await?.and_then(|l| {
            l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
        }))
    }

    /// Sets the link up and its MTU, if they are not already so. Returns
    /// whether anything changed.
    pub async fn ensure_link(&self, index: u32, mtu: u32) -> Result<bool> {
        let links = self.handle.link().get().match_index(index).execute();
        let link = first(links).await?.context("the WireGuard link vanished")?;
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
            let links = self.handle.link().get().match_index(index).execute();
            if let Some(link) = first(links).await.context("looking up a link")? {
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
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .table_id(table_of(route.kind));
        let message = match route.kind {
            RouteKind::Mesh | RouteKind::HostMesh => builder
                .output_interface(wg_index)
                .priority(MESH_METRIC)
                .scope(RouteScope::Link)
                .build(),
            RouteKind::Unreachable | RouteKind::HostUnreachable => builder
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

    /// Weft's routing rules (see [`crate::host_traffic`]), both families,
    /// each with what it is (`None`: one at our priorities that is none of
    /// ours, left from an older meshd, to go).
    async fn host_rules(&self) -> Result<Vec<(Option<HostRule>, RuleMessage)>> {
        let mut found = Vec::new();
        for family in [IpVersion::V4, IpVersion::V6] {
            let rules: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(family)
                .execute()
                .try_collect()
                .await
                .context("listing routing rules")?;
            found.extend(
                rules
                    .into_iter()
                    .filter(is_ours)
                    .map(|r| (classify_rule(&r), r)),
            );
        }
        Ok(found)
    }

    /// Weft's rules as they are now.
    pub async fn present_host_rules(&self) -> Result<BTreeSet<HostRule>> {
        Ok(self
            .host_rules()
            .await?
            .into_iter()
            .filter_map(|(r, _)| r)
            .collect())
    }

    /// Every address this host's interfaces hold.
    pub async fn local_addresses(&self) -> Result<Vec<IpAddr>> {
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .context("listing addresses")?;
        Ok(messages
            .iter()
            .filter_map(|m| {
                let local = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                local.or_else(|| {
                    m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                })
            })
            .collect())
    }

    /// Makes Weft's routing rules exactly `wanted`: adds what is missing,
    /// deletes ours that are anything else. Returns how many it changed.
    pub async fn ensure_host_rules(&self, wanted: &BTreeSet<HostRule>) -> Result<usize> {
        let present = self.host_rules().await?;
        let have: BTreeSet<HostRule> = present.iter().filter_map(|(r, _)| *r).collect();
        let mut changed = 0;
        for rule in wanted.difference(&have) {
            self.add_rule(*rule)
                .await
                .with_context(|| format!("adding the routing rule {rule:?}"))?;
            changed += 1;
        }
        for (rule, message) in present {
            if !rule.is_some_and(|r| wanted.contains(&r)) {
                self.del_rule(message).await?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    async fn add_rule(&self, rule: HostRule) -> Result<()> {
        let mut request = self.handle.rule().add();
        *request.message_mut() = rule_message(rule);
        request.execute().await.map_err(Into::into)
    }

    /// Deletes every rule of Weft's (uninstall); whether there were any.
    pub async fn remove_host_rules(&self) -> Result<bool> {
        let present = self.host_rules().await?;
        let any = !present.is_empty();
        for (_, rule) in present {
            self.del_rule(rule).await?;
        }
        Ok(any)
    }

    async fn del_rule(&self, rule: RuleMessage) -> Result<()> {
        self.handle
            .rule()
            .del(rule)
            .execute()
            .await
            .context("deleting a routing rule")
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
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    let via_wg = oif.is_some() && oif == wg_index;
    let kind = match (m.header.kind, table) {
        (RouteType::Unreachable, t) if t == u32::from(RouteHeader::RT_TABLE_MAIN) => {
            RouteKind::Unreachable
        }
        (RouteType::Unreachable, HOST_TABLE) => RouteKind::HostUnreachable,
        (RouteType::Unicast, t) if via_wg && t == u32::from(RouteHeader::RT_TABLE_MAIN) => {
            RouteKind::Mesh
        }
        (RouteType::Unicast, HOST_TABLE) if via_wg => RouteKind::HostMesh,
        _ => return None,
    };
    Some(Route { dst, kind })
}

fn rule_table(m: &RuleMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// Whether `m` is at one of Weft's rule priorities, looking up one of the
/// tables Weft's rules do.
fn is_ours(m: &RuleMessage) -> bool {
    let priority = m.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(p) => Some(*p),
        _ => None,
    });
    matches!(
        priority,
        Some(FROM_PODS_PRIORITY | EXCLUDE_PRIORITY | UNMARKED_PRIORITY)
    ) && [HOST_TABLE, u32::from(RouteHeader::RT_TABLE_MAIN)].contains(&rule_table(m))
}

/// The kernel's form of one of Weft's rules.
fn rule_message(rule: HostRule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = match rule.family() {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    m.header.action = RuleAction::ToTable;
    m.header.table = match rule {
        HostRule::Exclude(..) => RouteHeader::RT_TABLE_MAIN,
        HostRule::FromPods(_) | HostRule::Unmarked(_) => HOST_TABLE as u8,
    };
    m.attributes.push(RuleAttribute::Priority(rule.priority()));
    let source = |m: &mut RuleMessage, net: IpNet| {
        m.header.src_len = net.prefix_len();
        m.attributes.push(RuleAttribute::Source(net.network()));
    };
    match rule {
        HostRule::FromPods(net) => source(&mut m, net),
        HostRule::Exclude(net, Way::To) => {
            m.header.dst_len = net.prefix_len();
            m.attributes.push(RuleAttribute::Destination(net.network()));
        }
        HostRule::Exclude(net, Way::From) => source(&mut m, net),
        HostRule::Unmarked(_) => {
            m.attributes.push(RuleAttribute::FwMark(FWMARK));
            m.attributes.push(RuleAttribute::FwMask(FWMARK));
            m.header.flags |= RuleFlags::Invert;
        }
    }
    m
}

/// What rule of Weft's `m` is, if it is exactly one.
fn classify_rule(m: &RuleMessage) -> Option<HostRule> {
    if m.header.action != RuleAction::ToTable {
        return None;
    }
    let (mut priority, mut mark, mut mask, mut selects_more) = (None, None, None, false);
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => priority = Some(*p),
            RuleAttribute::FwMark(v) => mark = Some(*v),
            RuleAttribute::FwMask(v) => mask = Some(*v),
            RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_)
            | RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::UidRange(_) => selects_more = true,
            _ => {}
        }
    }
    if selects_more || m.header.tos != 0 {
        return None;
    }
    let inverted = m.header.flags.contains(RuleFlags::Invert);
    let (table, source, destination) = (rule_table(m), rule_source(m), rule_destination(m));
    let main = u32::from(RouteHeader::RT_TABLE_MAIN);
    let plain = !inverted && mark.is_none();
    let rule = match (priority?, source, destination) {
        (FROM_PODS_PRIORITY, Some(net), None) if table == HOST_TABLE && plain => {
            HostRule::FromPods(net)
        }
        (EXCLUDE_PRIORITY, None, Some(net)) if table == main && plain => {
            HostRule::Exclude(net, Way::To)
        }
        (EXCLUDE_PRIORITY, Some(net), None) if table == main && plain => {
            HostRule::Exclude(net, Way::From)
        }
        (UNMARKED_PRIORITY, None, None)
            if table == HOST_TABLE && inverted && mark == Some(FWMARK) && mask == Some(FWMARK) =>
        {
            HostRule::Unmarked(match m.header.family {
                AddressFamily::Inet6 => Family::V6,
                _ => Family::V4,
            })
        }
        _ => return None,
    };
    Some(rule)
}

fn rule_destination(m: &RuleMessage) -> Option<IpNet> {
    let ip = m.attributes.iter().find_map(|a| match a {
        RuleAttribute::Destination(ip) => Some(*ip),
        _ => None,
    })?;
    IpNet::new(ip, m.header.dst_len).ok()
}

/// The source prefix a rule matches, if any.
fn rule_source(m: &RuleMessage) -> Option<IpNet> {
    let ip = m.attributes.iter().find_map(|a| match a {
        RuleAttribute::Source(ip) => Some(*ip),
        _ => None,
    })?;
    IpNet::new(ip, m.header.src_len).ok()
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
        let in_table = |table: u32| {
            RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix("198.18.1.2".parse().unwrap(), 32)
                .unwrap()
                .output_interface(7)
                .table_id(table)
                .build()
        };
        assert_eq!(
            classify(&in_table(HOST_TABLE), Some(7)).map(|r| r.kind),
            Some(RouteKind::HostMesh)
        );
        assert_eq!(classify(&in_table(HOST_TABLE), Some(8)), None);
        assert_eq!(
            classify(&in_table(1000), Some(7)),
            None,
            "ours in a table we do not use: it must go"
        );
        let mut host_unreachable = unreachable.clone();
        host_unreachable.header.table = HOST_TABLE as u8;
        assert_eq!(
            classify(&host_unreachable, None).map(|r| r.kind),
            Some(RouteKind::HostUnreachable)
        );
    }

    /// Every rule Weft makes is read back as itself from the kernel's dump
    /// (which adds attributes of its own), and a rule at Weft's priorities
    /// that is anything else is none of Weft's (so it is deleted).
    #[test]
    fn rules_read_back_as_themselves_and_others_as_none() {
        use crate::host_traffic::Way;
        use rtnetlink::packet_route::rule::RulePortRange;
        use rtnetlink::packet_route::IpProtocol;
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let ours = [
            HostRule::FromPods(net("10.244.0.0/16")),
            HostRule::FromPods(net("fd00:244::/48")),
            HostRule::Exclude(net("198.18.1.1/32"), Way::To),
            HostRule::Exclude(net("198.18.1.1/32"), Way::From),
            HostRule::Exclude(net("2001:db8::/64"), Way::To),
            HostRule::Unmarked(Family::V4),
            HostRule::Unmarked(Family::V6),
        ];
        for rule in ours {
            let mut dumped = rule_message(rule);
            dumped
                .attributes
                .push(RuleAttribute::Protocol(RouteProtocol::Boot));
            assert!(is_ours(&dumped), "{rule:?}");
            assert_eq!(classify_rule(&dumped), Some(rule));
        }
        let with = |rule: HostRule, extra: RuleAttribute| {
            let mut m = rule_message(rule);
            m.attributes.push(extra);
            m
        };
        let api = HostRule::Exclude(net("198.18.1.1/32"), Way::To);
        // An earlier version's port-only exclusion goes (replaced whole).
        let by_port = with(
            api,
            RuleAttribute::DestinationPortRange(RulePortRange {
                start: 6443,
                end: 6443,
            }),
        );
        let by_protocol = with(api, RuleAttribute::IpProtocol(IpProtocol::Tcp));
        let unmarked_other_mask = {
            let mut m = rule_message(HostRule::Unmarked(Family::V4));
            m.attributes
                .retain(|a| !matches!(a, RuleAttribute::FwMask(_)));
            m
        };
        let pods_inverted = {
            let mut m = rule_message(HostRule::FromPods(net("10.244.0.0/16")));
            m.header.flags |= RuleFlags::Invert;
            m
        };
        for other in [by_port, by_protocol, unmarked_other_mask, pods_inverted] {
            assert_eq!(classify_rule(&other), None, "{other:?}");
        }
    }
}
