//! Node-to-node host encryption (`WEFT_ENCRYPT_HOST`): the nodes' own
//! traffic to each other's host addresses (kubelet, hostNetwork pods, node
//! agents) crosses WireGuard, except WireGuard's datagrams themselves
//! (marked, so they cannot loop into the tunnel they carry) and the
//! excluded addresses (the API server's, so a node cut off from the mesh
//! still reaches it). The fabric's sentinel counts node-to-node host
//! traffic outside WireGuard; these tests see it stay 0 with encryption
//! and count without.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{node, run_bounded, wait_for, Lab};
use meshlab::lab::topology::wg_interface;

/// Frames of node-to-node host traffic outside WireGuard so far.
fn host_plaintext(lab: &Lab) -> u64 {
    lab.host_plaintext().expect("reading the sentinel")
}

/// Waits until `at` routes `peer`'s host address into the mesh (once it has
/// heard `peer`'s WireGuard packets from there).
fn wait_for_host_route(lab: &Lab, at: &str, address: &str) {
    wait_for(
        &format!("{at} to route {address} into the mesh"),
        Duration::from_secs(30),
        || lab.host_routes(at).contains(&format!("{address} ")),
    );
}

/// `ip ARGS` in a node's namespace; stdout.
fn ip_in(lab: &Lab, at: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &format!("{}-{at}", lab.name), "ip"])
        .args(args);
    let out = run_bounded(cmd, Duration::from_secs(10));
    assert!(out.status.success(), "ip {args:?} in {at}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP stream of `seconds` from `from`'s host to `to`'s (iperf3); whether
/// it completed.
fn tcp_between_hosts(lab: &Lab, from: &str, to: &str, address: &str, seconds: u32) -> bool {
    let limit = Duration::from_secs(u64::from(seconds) + 30);
    let server = lab.command(&["exec", to, "--", "iperf3", "-s", "-1"]);
    let server = std::thread::spawn(move || run_bounded(server, limit));
    std::thread::sleep(meshlab::lab::scaled(Duration::from_millis(500)));
    let t = seconds.to_string();
    let client = run_bounded(
        lab.command(&[
            "exec", from, "--", "iperf3", "-c", address, "-t", &t, "-b", "50M",
        ]),
        limit,
    );
    let _ = server.join();
    client.status.success()
}

fn ping_host<'a>(from: &'a str, target: &'a str) -> [&'a str; 12] {
    [
        "exec", from, "--", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", target,
    ]
}

/// With `WEFT_ENCRYPT_HOST=true`, a node's own ping and TCP to other nodes'
/// host addresses arrive through WireGuard (the echo is seen on node-2's
/// WireGuard interface) and nothing of them crosses the fabric outside
/// WireGuard; WireGuard's own datagrams, to those very addresses, do not
/// loop (they carry the traffic). The rules are what the docs say. Without
/// the setting, the same traffic is counted by the sentinel.
#[test]
fn host_traffic_between_nodes_crosses_wireguard_only_when_encrypted() {
    let lab = Lab::up(
        "t-hostenc",
        &["--nodes", "3", "--config", "WEFT_ENCRYPT_HOST=true"],
    );
    for (peer, address) in [("node-2", "198.18.1.2"), ("node-3", "198.18.1.3")] {
        wait_for_host_route(&lab, "node-1", address);
        wait_for_host_route(&lab, peer, "198.18.1.1");
    }
    let rules = ip_in(&lab, "node-1", &["rule"]);
    for want in [
        "7701:\tfrom all to 198.18.0.1 lookup main",
        "7702:\tnot from all fwmark 0x770000/0x770000 lookup 77",
    ] {
        assert!(rules.contains(want), "no {want:?} in:\n{rules}");
    }
    assert!(
        ip_in(&lab, "node-1", &["-6", "rule"])
            .contains("7702:\tnot from all fwmark 0x770000/0x770000 lookup 77"),
        "no IPv6 host rule"
    );
    let before = host_plaintext(&lab);
    let status = lab.status();
    let mesh1 = node(&status, "node-1")["meshAddresses"][0]
        .as_str()
        .expect("node-1's mesh address")
        .to_string();
    let node2 = format!("{}-node-2", lab.name);
    let (answered, source) = lab.first_echo(
        &node2,
        &wg_interface(&lab.name, 2),
        &ping_host("node-1", "198.18.1.2"),
    );
    assert!(answered, "node-1's ping to node-2's host got no answer");
    assert_eq!(
        mesh1,
        source.split('/').next().unwrap_or_default(),
        "node-2 sees node-1's ping arrive through WireGuard"
    );
    assert!(
        tcp_between_hosts(&lab, "node-3", "node-1", "198.18.1.1", 3),
        "TCP from node-3's host to node-1's failed"
    );
    assert!(lab.reaches("node-2", "198.18.1.3"));
    assert_eq!(
        host_plaintext(&lab),
        before,
        "node-to-node host traffic crossed the fabric outside WireGuard"
    );
    drop(lab);

    // The same traffic without the setting: the sentinel sees it.
    let lab = Lab::up(
        "t-hostplain",
        &["--nodes", "2", "--config", "WEFT_ENCRYPT_HOST=false"],
    );
    wait_for_host_route(&lab, "node-1", "198.18.1.2");
    assert!(
        !ip_in(&lab, "node-1", &["rule"]).contains("fwmark"),
        "a host rule without WEFT_ENCRYPT_HOST"
    );
    assert!(lab.reaches("node-1", "198.18.1.2"));
    assert!(
        host_plaintext(&lab) > 0,
        "the sentinel missed plaintext host traffic"
    );
}

/// Host traffic between two nodes whose direct link is cut crosses the
/// relay encrypted (the relay forwards it into its own tunnel, as it does
/// pods'); an excluded address (`WEFT_ENCRYPT_HOST_EXCLUDE`) is reached
/// directly on the underlay, in plaintext, and is the only one that is.
#[test]
fn relayed_host_traffic_stays_encrypted_and_excluded_addresses_are_reached_directly() {
    let lab = Lab::up(
        "t-hostrelay",
        &[
            "--nodes",
            "3",
            "--config",
            "WEFT_ENCRYPT_HOST=true",
            "--config",
            "WEFT_ENCRYPT_HOST_EXCLUDE=198.18.1.3/32",
        ],
    );
    wait_for_host_route(&lab, "node-1", "198.18.1.2");
    wait_for_host_route(&lab, "node-1", "198.18.1.3");
    wait_for_host_route(&lab, "node-2", "198.18.1.1");
    wait_for_host_route(&lab, "node-3", "198.18.1.1");
    // node-1 reaches node-3 on the underlay, and node-3 answers there: with
    // a strict reverse-path filter on node-1 (RHEL's default) an answer
    // through WireGuard from an address routed to the underlay is dropped.
    let mut sysctl = Command::new("ip");
    sysctl
        .args(["netns", "exec", &format!("{}-node-1", lab.name)])
        .args(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"]);
    assert!(run_bounded(sysctl, Duration::from_secs(10))
        .status
        .success());
    let before = host_plaintext(&lab);
    assert!(
        lab.reaches("node-1", "198.18.1.3"),
        "node-1's ping to the excluded address got no answer"
    );
    let leaked = host_plaintext(&lab) - before;
    assert!(
        leaked > 0,
        "the excluded address was reached through WireGuard"
    );
    lab.reset_host_plaintext();

    lab.ok(&["link", "cut", "node-1", "node-2"]);
    wait_for(
        "node-1 to reach node-2's pods through node-3",
        Duration::from_secs(90),
        || common::carrier(&lab, "node-1", "node-2").as_deref() == Some("node-3"),
    );
    assert!(
        tcp_between_hosts(&lab, "node-1", "node-2", "198.18.1.2", 3),
        "TCP from node-1's host to node-2's across the relay failed"
    );
    assert!(lab.reaches("node-2", "198.18.1.1"));
    assert_eq!(
        host_plaintext(&lab),
        0,
        "relayed host traffic crossed the fabric outside WireGuard"
    );
}

/// A kubeadm-like cluster: every node reaches the API server at node-1's
/// host address (node-1 forwards it on). That address is excluded from
/// host encryption (the kubeconfig names it; the `kubernetes`
/// EndpointSlice, followed, lists it and any other API server), so when
/// node-1's WireGuard is gone (meshd stopped, data plane killed) node-2
/// still reaches the API server and reports node-1 unreachable there.
/// With the exclusion replaced by an unrelated address, node-2's API
/// traffic is tunnelled towards the dead node-1 and never arrives.
#[test]
fn a_node_cut_off_from_the_mesh_still_reaches_the_api_server_on_a_node() {
    let lab = Lab::up(
        "t-hostcp",
        &[
            "--nodes",
            "3",
            "--control-plane",
            "node-1",
            "--config",
            "WEFT_PERSISTENT_KEEPALIVE=1",
            "--config",
            "WEFT_PEER_TIMEOUT=3",
        ],
    );
    wait_for_host_route(&lab, "node-2", "198.18.1.1");
    let rules = ip_in(&lab, "node-2", &["rule"]);
    assert!(
        rules.contains("7701:\tfrom all to 198.18.1.1 lookup main"),
        "the API server's address is not excluded:\n{rules}"
    );
    // Another API server appears in the EndpointSlice: excluded within a
    // resync, and kept for a restarted meshd.
    lab.kubectl(&[
        "patch",
        "endpointslice",
        "-n",
        "default",
        "kubernetes",
        "--type=json",
        "-p",
        r#"[{"op": "add", "path": "/endpoints/-", "value": {"addresses": ["198.18.1.3"]}}]"#,
    ]);
    wait_for(
        "node-2 to exclude the second API server",
        Duration::from_secs(30),
        || ip_in(&lab, "node-2", &["rule"]).contains("to 198.18.1.3 lookup main"),
    );
    let kept = lab.dir().join("node-2/root/var/lib/weft/api-servers.json");
    let kept = std::fs::read_to_string(&kept).unwrap_or_else(|e| panic!("{}: {e}", kept.display()));
    assert!(kept.contains("198.18.1.3"), "{kept}");

    // node-1's WireGuard goes; the API server on it stays.
    common::stop_meshd(&lab, "node-1");
    common::signal(i64::from(common::dataplane_pid(&lab, "node-1")), "-KILL");
    wait_for(
        "node-2 to report node-1 unreachable through the API server",
        Duration::from_secs(30),
        || common::annotation(&lab, "node-2", "weft.dev/unreachable").contains("node-1"),
    );
}
