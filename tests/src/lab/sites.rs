//! Sites (`meshlab up --topology FILE`): the fabric namespace routes
//! between the public sites' bridges like the internet between clouds. A
//! NAT'd site sits behind a router namespace of its own (its bridge has no
//! address in the fabric, so the fabric cannot route into it): the router
//! masquerades what its nodes send out to its public address and lets no
//! new flow in (dropped before its connection is confirmed, as a NAT box's
//! firewall does: a confirmed inbound entry would take the public
//! address:port its node's own flow to that peer needs, and masquerade
//! would move that flow to another port), with connection tracking of its
//! own — so two NAT'd sites
//! are two NATs, and their nodes can meet only as real NATs allow
//! (`masquerade` keeps ports: one socket, one public address:port for
//! everyone; `fully-random` picks a port per flow).

use anyhow::Result;

use super::netns::{ip, ip_in, nft, sysctl};
use super::topology::{LabPlan, Nat, Router, SitePlan};

const TABLE: &str = "meshlab_nat";

/// The router's ruleset (pure).
pub fn ruleset(nat: Nat) -> String {
    let random = match nat {
        Nat::Symmetric => " fully-random",
        Nat::None | Nat::Masquerade => "",
    };
    format!(
        "add table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    iifname \"outside\" ct state new drop\n  }}\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    iifname \"outside\" ct state new drop\n  }}\n  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    oifname \"outside\" masquerade{random}\n  }}\n}}\n"
    )
}

/// Creates a NAT'd site's router: inside on the site's bridge, outside on
/// a /31 to the fabric.
pub fn create_router(plan: &LabPlan, site: &SitePlan, router: &Router) -> Result<()> {
    let (ns, fabric) = (router.netns.as_str(), plan.fabric_netns.as_str());
    ip(&["netns", "add", ns])?;
    ip_in(ns, &["link", "set", "lo", "up"])?;
    for (inside, peer) in [
        ("inside", router.bridge_port.as_str()),
        ("outside", router.fabric_interface.as_str()),
    ] {
        ip_in(
            ns,
            &[
                "link", "add", inside, "type", "veth", "peer", "name", peer, "netns", fabric,
            ],
        )?;
    }
    ip_in(
        fabric,
        &["link", "set", &router.bridge_port, "master", &site.bridge],
    )?;
    ip_in(fabric, &["link", "set", &router.bridge_port, "up"])?;
    let gateway = format!("{}/{}", site.gateway, site.cidr.prefix_len());
    ip_in(ns, &["addr", "add", &gateway, "dev", "inside"])?;
    ip_in(ns, &["link", "set", "inside", "up"])?;
    address(plan, router)?;
    nft(ns, &["-f", "-"], Some(&ruleset(site.nat))).map(drop)?;
    sysctl(ns, "net.ipv4.ip_forward=1")
}

/// Puts the router's public address (and the fabric's end) on the outside
/// link, with the router's default route through the fabric.
pub fn address(plan: &LabPlan, router: &Router) -> Result<()> {
    let (ns, fabric) = (router.netns.as_str(), plan.fabric_netns.as_str());
    let ends = [
        (ns, router.public, "outside"),
        (fabric, router.fabric_side, router.fabric_interface.as_str()),
    ];
    for (netns, address, dev) in ends {
        ip_in(netns, &["addr", "flush", "dev", dev])?;
        ip_in(
            netns,
            &["addr", "add", &format!("{address}/31"), "dev", dev],
        )?;
        ip_in(netns, &["link", "set", dev, "up"])?;
    }
    ip_in(
        ns,
        &[
            "route",
            "replace",
            "default",
            "via",
            &router.fabric_side.to_string(),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routers_masquerade_outwards_and_let_no_new_flow_in() {
        let keeps = ruleset(Nat::Masquerade);
        assert!(keeps.contains("oifname \"outside\" masquerade\n"));
        assert_eq!(
            keeps
                .matches("iifname \"outside\" ct state new drop")
                .count(),
            2,
            "neither forwarded nor delivered to the router"
        );
        let random = ruleset(Nat::Symmetric);
        assert!(random.contains("oifname \"outside\" masquerade fully-random\n"));
    }
}
