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
                let out = exec(node, &["ip", f, "route", "show", "proto", "77"]);
                String::from_utf8_lossy(&out.stdout).into_owned()
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
        assert!(!weft_routes(node).is_empty(), "{node} has no Weft routes");
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
        assert_eq!(weft_routes(node), "", "{node}: routes are left");
        assert!(
            !exec(node, &["nft", "list", "table", "inet", "weft_policy"])
                .status
                .success(),
            "{node}: the policy table is left"
        );
        for f in files {
            assert!(!root(node).join(f).exists(), "{node}: {f} is left");
        }
        let socket = format!("/var/run/wireguard/{iface}.sock");
        assert!(!std::path::Path::new(&socket).exists(), "{socket} is left");
    }
    // Again: nothing left to remove is not an error.
    lab.ok(&["uninstall"]);
}
