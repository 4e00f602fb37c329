//! Uninstall as docs/install.md says: Weft's pods go, then the cleanup
//! DaemonSet (deploy/uninstall) removes everything Weft made on each node.

mod common;

use common::Lab;

#[test]
fn the_cleanup_daemonset_leaves_nothing_of_weft_on_any_node() {
    let lab = Lab::up("t-uninstall", &["--nodes", "2", "--pods-per-node", "1"]);
    let status = lab.status();
    let nodes: Vec<(String, String)> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["wgInterface"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let exec = |node: &str, cmd: &[&str]| lab.meshlab(&[&["exec", node, "--"], cmd].concat());
    let weft_routes = |node: &str| {
        ["-4", "-6"]
            .iter()
            .map(|f| {
                let routes = exec(
                    node,
                    &["ip", f, "route", "show", "table", "all", "proto", "77"],
                );
                let rules = exec(node, &["ip", f, "rule", "show", "table", "77"]);
                [routes, rules]
                    .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                    .concat()
            })
            .collect::<String>()
    };
    let root = |node: &str| lab.dir().join(node).join("root");
    let files = [
        "opt/cni/bin/weft",
        "etc/cni/net.d/05-weft.conflist",
        "run/weft",
        "var/lib/weft",
    ];
    // Before: all of it is there.
    for (node, iface) in &nodes {
        assert!(exec(node, &["ip", "link", "show", iface]).status.success());
        let before = weft_routes(node);
        assert!(
            before.contains("unreachable") && before.contains("lookup 77"),
            "{node} has no Weft routes and rules:\n{before}"
        );
        assert!(exec(node, &["nft", "list", "table", "inet", "weft_policy"])
            .status
            .success());
        for f in files {
            assert!(root(node).join(f).exists(), "{node}: no {f} before");
        }
    }

    lab.ok(&["uninstall"]);
    for (node, iface) in &nodes {
        assert!(
            lab.processes(node)
                .iter()
                .all(|(_, cmd)| !cmd.contains("meshd")),
            "{node}: meshd still runs"
        );
        assert!(
            !exec(node, &["ip", "link", "show", iface]).status.success(),
            "{node}: {iface} is left"
        );
        assert_eq!(weft_routes(node), "", "{node}: routes or rules are left");
        let firewall = exec(node, &["nft", "list", "chain", "ip", "filter", "FORWARD"]);
        let firewall = String::from_utf8_lossy(&firewall.stdout);
        assert!(
            firewall.contains("policy drop") && !firewall.contains("weft:"),
            "{node}: openings left in the host firewall (or it is gone):\n{firewall}"
        );
        for table in ["weft_policy", "weft_guard", "weft_egress"] {
            assert!(
                !exec(node, &["nft", "list", "table", "inet", table])
                    .status
                    .success(),
                "{node}: table {table} is left"
            );
        }
        for f in files {
            assert!(!root(node).join(f).exists(), "{node}: {f} is left");
        }
        let socket = format!("/var/run/wireguard/{iface}.sock");
        assert!(!std::path::Path::new(&socket).exists(), "{socket} is left");
    }
    // Again: nothing left to remove is not an error.
    lab.ok(&["uninstall"]);
}
