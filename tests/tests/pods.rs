//! Pods attached by the real `weft` CNI plugin, talking across the mesh.

mod common;

use std::time::Duration;

use common::{plaintext, Lab};
use serde_json::Value;

/// Pings every pod address from every other pod.
fn assert_all_pairs(lab: &Lab, all: &[(String, String, Vec<String>)]) {
    let mut failures = Vec::new();
    for (from, _, _) in all {
        for (to, _, ips) in all.iter().filter(|(to, _, _)| to != from) {
            for ip in ips {
                let out = lab.meshlab(&[
                    "pod", "exec", from, "--", "ping", "-n", "-c", "1", "-W", "1", ip,
                ]);
                if !out.status.success() {
                    failures.push(format!("{from} -> {to} ({ip})"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "unreachable pairs:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_pod_reaches_every_pod_in_both_families_only_encrypted() {
    let lab = Lab::up("t-pods", &["--nodes", "3", "--pods-per-node", "2"]);
    let all = lab.pods();
    assert_eq!(all.len(), 6);
    for (name, _, ips) in &all {
        assert_eq!(ips.len(), 2, "{name} is not dual-stack: {ips:?}");
    }
    let capture = lab.capture();
    assert_all_pairs(&lab, &all);
    let packets = capture.stop();
    let leaked = plaintext(&packets);
    assert!(
        leaked.is_empty(),
        "plaintext pod traffic on the fabric:\n{}",
        leaked.join("\n")
    );

    // The API has the pods, with their node and both IPs.
    let list: Value = serde_json::from_str(&lab.kubectl(&["get", "pods", "-o", "json"])).unwrap();
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 6);
    for item in items {
        let name = item["metadata"]["name"].as_str().unwrap();
        let (_, node, ips) = all.iter().find(|(n, _, _)| n == name).unwrap();
        assert_eq!(item["spec"]["nodeName"], node.as_str());
        let pod_ips: Vec<&str> = item["status"]["podIPs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["ip"].as_str().unwrap())
            .collect();
        assert_eq!(pod_ips, ips.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

#[test]
fn deleting_a_pod_releases_everything() {
    let lab = Lab::up("t-poddel", &["--nodes", "2"]);
    let ips = lab.ok(&["pod", "add", "node-1", "web", "--label", "app=web"]);
    let v4 = ips.split_whitespace().next().unwrap().to_string();
    assert!(
        lab.reaches("node-2", &v4),
        "node-2 cannot reach the new pod"
    );
    let veths = || {
        lab.ok(&["exec", "node-1", "--", "ip", "-o", "link"])
            .matches(" wp")
            .count()
    };
    assert_eq!(veths(), 1);
    // The node's end has no IPv6 link-local address (the pod's gateway is
    // a global one): a valid link-local makes every DEL wait ~20 ms longer
    // (docs/benchmarks.md).
    let node_end = lab.ok(&[
        "exec", "node-1", "--", "ip", "-6", "-o", "addr", "show", "scope", "link",
    ]);
    assert!(!node_end.contains(" wp"), "{node_end}");
    lab.ok(&["pod", "del", "default/web"]);
    assert_eq!(veths(), 0, "the pod's veth survived");
    let allocations = std::fs::read_to_string(
        lab.dir()
            .join("node-1/root/var/lib/weft/ipam/allocations.json"),
    )
    .unwrap();
    let held: Value = serde_json::from_str(&allocations).unwrap();
    assert!(
        held["held"].as_object().unwrap().is_empty(),
        "address still held: {held}"
    );
    let gone = lab.meshlab(&["kubectl", "--", "get", "pod", "web"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
    assert!(
        !lab.ping("node-2", &v4, 1, 0.2).status.success(),
        "the deleted pod still answers"
    );
    // The name can be used again at once.
    std::thread::sleep(Duration::from_millis(50));
    lab.ok(&["pod", "add", "node-1", "web"]);
}

/// Each node claims its blocks with an object of its own; the blocks are
/// distinct, carry pods, and go with their Node (the claim is owned by it
/// and collected when it is deleted).
#[test]
fn self_allocated_blocks_are_distinct_carry_pods_and_go_with_their_node() {
    let lab = Lab::up(
        "t-blocks",
        &[
            "--nodes",
            "3",
            "--self-allocated-blocks",
            "--pods-per-node",
            "1",
        ],
    );
    // Every claim: node name -> its blocks, sorted.
    let claims = || -> std::collections::BTreeMap<String, Vec<String>> {
        let raw = lab.kubectl(&[
            "get",
            "configmap",
            "-n",
            "weft-system",
            "-l",
            "weft.dev/block-claim=true",
            "-o",
            "json",
        ]);
        let list: Value = serde_json::from_str(&raw).expect("a ConfigMap list");
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|cm| {
                let mut blocks: Vec<String> = cm["data"]["blocks"]
                    .as_str()
                    .unwrap_or_default()
                    .split(',')
                    .map(String::from)
                    .collect();
                blocks.sort();
                (
                    cm["data"]["node"].as_str().unwrap_or_default().to_string(),
                    blocks,
                )
            })
            .collect()
    };
    let distinct = |claims: &std::collections::BTreeMap<String, Vec<String>>| {
        let all: Vec<&String> = claims.values().flatten().collect();
        let set: std::collections::BTreeSet<&&String> = all.iter().collect();
        all.len() == set.len()
    };
    let c = claims();
    assert_eq!(c.len(), 3, "{c:?}");
    assert!(c.values().all(|b| b.len() == 2) && distinct(&c), "{c:?}");
    let status = lab.status();
    for n in ["node-1", "node-2", "node-3"] {
        let node = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap();
        let mut published: Vec<String> = node["podCIDRs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        published.sort();
        assert_eq!(published, c[n], "{n} publishes what it claimed");
    }
    assert_all_pairs(&lab, &lab.pods());

    lab.ok(&["node", "del", "node-2"]);
    common::wait_for(
        "node-2's claim to go with its Node",
        Duration::from_secs(15),
        || !claims().contains_key("node-2"),
    );
    lab.ok(&["node", "add"]);
    let c = claims();
    assert_eq!(c.len(), 3, "{c:?}");
    assert!(c["node-4"].len() == 2 && distinct(&c), "{c:?}");
}

/// The source address the outside host sees on the first ping `ping`
/// makes it answer (tcpdump in its namespace, bounded).
fn seen_by_outside(lab: &Lab, ping: &[&str]) -> (bool, String) {
    let outside = meshlab::lab::topology::outside_netns(&lab.name);
    match ping.last().is_some_and(|target| target.contains(':')) {
        true => lab.first_echo6(&outside, "eth0", ping),
        false => lab.first_echo(&outside, "eth0", ping),
    }
}

/// `pod exec POD -- ping …` of `target`, twice, bounded.
fn ping_from<'a>(pod: &'a str, target: &'a str) -> [&'a str; 11] {
    [
        "pod", "exec", pod, "--", "ping", "-n", "-c", "2", "-W", "2", target,
    ]
}

/// Pods reach a host outside the cluster (which routes back only to the
/// nodes' underlay), in both families: their packets leave masqueraded to
/// their node's address. Without masquerading (`WEFT_MASQUERADE=false`) the same ping
/// leaves with the pod's address, gets no answer, and the sentinel counts
/// a cluster address on the fabric.
#[test]
fn pods_reach_the_world_masqueraded() {
    use meshlab::lab::topology::{OUTSIDE_HOST, OUTSIDE_HOST6};
    let (outside, outside6) = (OUTSIDE_HOST.to_string(), OUTSIDE_HOST6.to_string());
    let lab = Lab::up("t-egress", &["--nodes", "2", "--pods-per-node", "1"]);
    for (target, node1) in [(&outside, "198.18.1.1"), (&outside6, "2001:db8:18::1")] {
        let (answered, source) = seen_by_outside(&lab, &ping_from("pod-1-1", target));
        assert!(answered, "a pod's ping to {target} got no answer");
        assert_eq!(
            source, node1,
            "the outside host saw {source:?}, not node-1's address"
        );
    }
    drop(lab);

    let lab = Lab::up(
        "t-egress-off",
        &[
            "--nodes",
            "2",
            "--pods-per-node",
            "1",
            "--config",
            "WEFT_MASQUERADE=false",
        ],
    );
    let pod = lab
        .pods()
        .into_iter()
        .find(|(name, _, _)| name.ends_with("pod-1-1"))
        .map(|(_, _, ips)| ips)
        .expect("pod-1-1");
    for (target, own) in [(&outside, &pod[0]), (&outside6, &pod[1])] {
        let (answered, source) = seen_by_outside(&lab, &ping_from("pod-1-1", target));
        assert!(
            !answered,
            "answered without masquerading: the test cannot tell"
        );
        assert_eq!(&source, own, "unmasqueraded, the pod's own address arrives");
    }
    assert!(
        lab.plaintext().unwrap_or(0) > 0,
        "the sentinel saw no pod address"
    );
    lab.reset_plaintext();
}

/// Pods reach other nodes' host addresses (kubelets, host-network
/// services) through the mesh both ways: the echo arrives on node-2's
/// WireGuard interface from the pod's own address, node-2 answers it the
/// same way, and nothing of it crosses the fabric in plaintext. An address
/// outside the host networks (`--host-cidr`) is not tunnelled: it leaves
/// masqueraded, as host traffic does.
#[test]
fn pods_reach_other_nodes_hosts_through_the_mesh() {
    use meshlab::lab::topology::wg_interface;
    let ping = |to: &'static str| ping_from("pod-1-1", to);
    let lab = Lab::up("t-hosts", &["--nodes", "3", "--pods-per-node", "1"]);
    let pod = lab
        .pods()
        .into_iter()
        .find(|(name, _, _)| name.ends_with("pod-1-1"))
        .map(|(_, _, ips)| ips[0].clone())
        .expect("pod-1-1");
    // Once node-1 has heard node-2's WireGuard packets from there.
    common::wait_for(
        "node-1 to route node-2's host address into the mesh",
        Duration::from_secs(20),
        || lab.host_routes("node-1").contains("198.18.1.2 "),
    );
    let capture = lab.capture();
    let node2 = format!("{}-node-2", lab.name);
    let (answered, source) =
        lab.first_echo(&node2, &wg_interface(&lab.name, 2), &ping("198.18.1.2"));
    let leaked = common::plaintext(&capture.stop());
    assert!(
        answered,
        "pod-1-1's ping to node-2's host address got no answer"
    );
    assert_eq!(
        source, pod,
        "node-2 sees the pod's own address through the mesh"
    );
    assert!(leaked.is_empty(), "plaintext on the fabric: {leaked:#?}");
    drop(lab);

    // Host networks that leave node-2 out: its address is not believed,
    // and the ping leaves masqueraded (answered, in plaintext).
    let lab = Lab::up(
        "t-hosts-off",
        &[
            "--nodes",
            "2",
            "--pods-per-node",
            "1",
            "--config",
            "WEFT_HOST_CIDRS=192.0.2.0/24",
        ],
    );
    let node2 = format!("{}-node-2", lab.name);
    let (answered, source) = lab.first_echo(&node2, "eth0", &ping("198.18.1.2"));
    assert!(answered, "the masqueraded ping got no answer");
    assert_eq!(source, "198.18.1.1", "masqueraded to node-1's address");
    // Host traffic to an address not believed is plaintext by design, with
    // WEFT_ENCRYPT_HOST too: the sentinel counted it.
    assert!(
        lab.host_plaintext().unwrap_or(0) > 0,
        "{:?}",
        lab.host_plaintext()
    );
    lab.reset_host_plaintext();
}

/// Every lab node has a host firewall whose FORWARD chains drop what no
/// rule accepts (as Docker leaves one): pods reach each other because
/// meshd opens those chains for the cluster's ranges, and when the
/// firewall's owner flushes them (Docker restarting) meshd opens them
/// again within a resync.
#[test]
fn pods_cross_a_host_firewall_that_drops_forwarding() {
    let lab = Lab::up("t-firewall", &["--nodes", "2", "--pods-per-node", "1"]);
    let node1 = format!("{}-node-1", lab.name);
    let nft = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &node1, "nft"])
            .args(args)
            .output()
            .expect("nft");
        assert!(out.status.success(), "nft {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let chain = nft(&["list", "chain", "ip", "filter", "FORWARD"]);
    assert!(
        chain.contains("policy drop") && chain.contains("weft: to pods"),
        "{chain}"
    );
    let ping = [
        "pod",
        "exec",
        "pod-1-1",
        "--",
        "ping",
        "-n",
        "-c",
        "1",
        "-W",
        "1",
        "198.19.2.2",
    ];
    assert!(
        lab.meshlab(&ping).status.success(),
        "pod-1-1 does not reach pod-2-1"
    );

    nft(&["flush", "chain", "ip", "filter", "FORWARD"]);
    assert!(
        !lab.meshlab(&ping).status.success(),
        "the flushed firewall lets pods through: the test cannot tell"
    );
    common::wait_for(
        "meshd to open the firewall again",
        Duration::from_secs(25),
        || lab.meshlab(&ping).status.success(),
    );
}
