//! A small synchronous rtnetlink client: the plugin runs for milliseconds
//! and needs no async runtime. Messages are built with rtnetlink's builders
//! and sent over a plain netlink socket, bound to whichever network
//! namespace the calling thread is in when it is opened.

use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;

use ipnet::IpNet;
use rtnetlink::packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoVeth, LinkAttribute, LinkInfo,
    LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteMessage, RouteType};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use rtnetlink::{LinkUnspec, LinkVeth};

pub struct Netlink {
    socket: Socket,
    seq: u32,
}

/// A kernel error, with the errno kept for callers that expect some.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct NlError {
    pub what: String,
    #[source]
    pub source: io::Error,
}

impl NlError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

type Result<T> = std::result::Result<T, NlError>;

fn err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NlError {
    let what = what.into();
    move |source| NlError { what, source }
}

pub const ENODEV: i32 = 19;
pub const EEXIST: i32 = 17;

impl Netlink {
    /// A socket in the calling thread's current network namespace.
    pub fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(err("opening a netlink socket"))?;
        socket
            .bind_auto()
            .map_err(err("binding a netlink socket"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(err("connecting a netlink socket"))?;
        Ok(Self { socket, seq: 0 })
    }

    fn request(
        &mut self,
        what: &str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(err(what))?;
        let mut replies = Vec::new();
        loop {
            let (data, _) = self.socket.recv_from_full().map_err(err(what))?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| NlError {
                        what: what.into(),
                        source: io::Error::other(e.to_string()),
                    })?;
                offset += reply.header.length as usize;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(replies),
                            Some(code) => Err(NlError {
                                what: what.into(),
                                source: io::Error::from_raw_os_error(-code.get()),
                            }),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    _ => {}
                }
                if reply.header.length == 0 {
                    break;
                }
            }
        }
    }

    /// The link called `name`, if there is one.
    pub fn link(&mut self, name: &str) -> Result<Option<LinkMessage>> {
        let query = LinkUnspec::new_with_name(name).build();
        match self.request(
            &format!("looking up {name}"),
            RouteNetlinkMessage::GetLink(query),
            0,
        ) {
            Ok(mut links) => Ok(links.pop().and_then(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })),
            Err(e) if e.errno() == Some(ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `(name, index)` of every link.
    pub fn links(&mut self) -> Result<Vec<(String, u32)>> {
        let replies = self.request(
            "listing links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some((n.clone(), l.header.index)),
                    _ => None,
                }),
                _ => None,
            })
            .collect())
    }

    /// Creates a veth pair `name` / `peer` with `mtu`, the peer created
    /// directly in the namespace `peer_netns`: moving an existing device
    /// between namespaces re-registers it, which costs milliseconds.
    pub fn add_veth(&mut self, name: &str, peer: &str, mtu: u32, peer_netns: RawFd) -> Result<()> {
        let mut message = LinkVeth::new(name, peer).mtu(mtu).build();
        for attribute in &mut message.attributes {
            if let LinkAttribute::LinkInfo(infos) = attribute {
                for info in infos {
                    if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))) = info {
                        peer.attributes.push(LinkAttribute::Mtu(mtu));
                        peer.attributes.push(LinkAttribute::NetNsFd(peer_netns));
                    }
                }
            }
        }
        self.request(
            &format!("creating veth {name}"),
            RouteNetlinkMessage::NewLink(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Gives link `index` no IPv6 link-local address (addr_gen_mode none,
    /// set while it is down). The node's end of a pod veth needs none: the
    /// pod's gateway is a global address on it. And once a link-local
    /// address is valid the node multicasts from it (MLD), which leaves
    /// routes holding the device, so deleting the veth waits for a second
    /// RCU grace period: ~20 ms of every DEL (seen with `perf record -e
    /// sched:sched_switch -g`: netdev_run_todo's second rcu_barrier).
    pub fn no_link_local(&mut self, index: u32) -> Result<()> {
        let mut message = LinkUnspec::new_with_index(index).build();
        message
            .attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]));
        self.set_link(
            "turning off the node side's IPv6 link-local address",
            message,
        )
    }

    /// Tells the node `ip` is at `mac` on link `index`, for good (a
    /// permanent neighbour entry, gone with the link). The node end of a
    /// pod veth has no IPv6 link-local address (see [`Self::no_link_local`]),
    /// and the kernel solicits an IPv6 neighbour only from one: without
    /// this, traffic forwarded to the pod's IPv6 address never leaves.
    pub fn add_permanent_neighbour(&mut self, index: u32, ip: IpAddr, mac: &Mac) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.header.kind = RouteType::Unicast;
        m.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.clone()));
        self.request(
            &format!("telling the node where {ip} is"),
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Applies a link change (up, MTU, rename, namespace).
    pub fn set_link(&mut self, what: &str, message: LinkMessage) -> Result<()> {
        self.request(what, RouteNetlinkMessage::SetLink(message), 0)
            .map(drop)
    }

    pub fn del_link(&mut self, index: u32) -> Result<()> {
        self.request(
            "deleting a link",
            RouteNetlinkMessage::DelLink(LinkUnspec::new_with_index(index).build()),
            0,
        )
        .map(drop)
    }

    /// Adds `net` to link `index`, without duplicate address detection
    /// (the addresses are ours alone; DAD would delay IPv6 by seconds).
    pub fn add_address(&mut self, index: u32, net: IpNet) -> Result<()> {
        let mut m = AddressMessage::default();
        m.header.family = if net.addr().is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        m.header.prefix_len = net.prefix_len();
        m.header.index = index;
        if net.addr().is_ipv4() {
            m.attributes.push(AddressAttribute::Local(net.addr()));
        }
        m.attributes.push(AddressAttribute::Address(net.addr()));
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        self.request(
            &format!("adding address {net}"),
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// The addresses on link `index`.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>> {
        let mut query = AddressMessage::default();
        query.header.index = index;
        let replies = self.request(
            "listing addresses",
            RouteNetlinkMessage::GetAddress(query),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    let ip = a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })?;
                    IpNet::new(ip, a.header.prefix_len).ok()
                }
                _ => None,
            })
            .collect())
    }

    pub fn add_route(&mut self, what: &str, route: RouteMessage) -> Result<()> {
        self.request(
            what,
            RouteNetlinkMessage::NewRoute(route),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Every route of one family in the main table.
    pub fn routes(&mut self, query: RouteMessage) -> Result<Vec<RouteMessage>> {
        let replies = self.request(
            "listing routes",
            RouteNetlinkMessage::GetRoute(query),
            NLM_F_DUMP,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .collect())
    }
}

/// A link's index and MAC address (`aa:bb:…`).
pub fn index_and_mac(link: &LinkMessage) -> (u32, Mac) {
    let mac = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(bytes) => Some(Mac(bytes.clone())),
            _ => None,
        })
        .unwrap_or_default();
    (link.header.index, mac)
}

/// A link-layer address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mac(pub Vec<u8>);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex: Vec<String> = self.0.iter().map(|b| format!("{b:02x}")).collect();
        f.write_str(&hex.join(":"))
    }
}
