//! Sites (`meshlab up --topology FILE`): the fabric namespace routes
//! between the sites' bridges like the internet between clouds. A NAT'd
//! site's nodes reach out through masquerade (their packets leave with the
//! gateway's address of the site they go to) and nothing reaches them
//! unasked: the state of the NAT is the only way in.

use anyhow::Result;

use super::netns::nft;
use super::topology::SitePlan;

const TABLE: &str = "meshlab_sites";

/// The fabric's routing rules for `sites` (pure).
pub fn ruleset(sites: &[SitePlan]) -> String {
    let mut forward = String::new();
    let mut postrouting = String::new();
    for s in sites.iter().filter(|s| s.nat) {
        forward.push_str(&format!(
            "    oifname \"{}\" ip daddr {} ct state new drop\n",
            s.bridge, s.cidr
        ));
        postrouting.push_str(&format!(
            "    ip saddr {} oifname != \"{}\" masquerade\n",
            s.cidr, s.bridge
        ));
    }
    format!(
        "add table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n{forward}  }}\n  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n{postrouting}  }}\n}}\n"
    )
}

/// Makes the fabric route between the sites, with their NATs.
pub fn apply(fabric_netns: &str, sites: &[SitePlan]) -> Result<()> {
    nft(fabric_netns, &["-f", "-"], Some(&ruleset(sites))).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_natd_sites_are_masqueraded_and_closed_to_new_flows() {
        let site = |i: u8, nat: bool| SitePlan {
            name: format!("s{i}"),
            bridge: format!("site{i}"),
            cidr: format!("198.18.{}.0/24", 16 + i).parse().unwrap(),
            gateway: format!("198.18.{}.254", 16 + i).parse().unwrap(),
            nat,
        };
        let rules = ruleset(&[site(0, false), site(1, true)]);
        assert!(rules.contains("oifname \"site1\" ip daddr 198.18.17.0/24 ct state new drop"));
        assert!(rules.contains("ip saddr 198.18.17.0/24 oifname != \"site1\" masquerade"));
        assert!(!rules.contains("198.18.16.0/24"));
    }
}
