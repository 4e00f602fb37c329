//! The WireGuard mesh end to end, with real meshd processes, real data
//! planes and real packets in a lab.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{node, pid_of_meshd, plaintext, signal, wait_for, Hostile, Lab};
use serde_json::Value;

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

fn mesh_v4(status: &Value, name: &str) -> String {
    node(status, name)["meshAddresses"][0]
        .as_str()
        .expect("a published mesh address")
        .to_string()
}

/// rx and tx bytes per peer (by node name) of one node.
fn transfer(status: &Value, name: &str) -> std::collections::BTreeMap<String, (u64, u64)> {
    node(status, name)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let bytes = (
                p["rxBytes"].as_u64().unwrap(),
                p["txBytes"].as_u64().unwrap(),
            );
            (p["node"].as_str().unwrap_or("?").to_string(), bytes)
        })
        .collect()
}

#[test]
fn full_mesh_carries_pod_traffic_only_encrypted() {
    let lab = Lab::up("t-mesh", &["--nodes", "3"]);
    let before = lab.status();
    let capture = lab.capture();
    for from in NODES {
        for to in NODES.iter().filter(|n| **n != from) {
            let mut targets = lab.pod_addresses(to);
            targets.push(mesh_v4(&before, to));
            for target in targets {
                let out = lab.ping(from, &target, 2, 0.1);
                assert!(
                    out.status.success(),
                    "{from} cannot reach {to} at {target}: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
        // TCP too: a connection attempt to a closed port on a remote pod address.
        let remote =
            lab.pod_addresses(if from == "node-1" { "node-2" } else { "node-1" })[0].clone();
        let _ = lab.meshlab(&[
            "exec",
            from,
            "--",
            "timeout",
            "2",
            "bash",
            "-c",
            &format!("echo > /dev/tcp/{remote}/8080"),
        ]);
    }
    let packets = capture.stop();
    assert!(
        packets.len() >= 36,
        "the capture saw only {} packets; WireGuard traffic expected",
        packets.len()
    );
    let leaked = plaintext(&packets);
    assert!(
        leaked.is_empty(),
        "plaintext on the fabric:\n{}",
        leaked.join("\n")
    );

    let after = lab.status();
    for name in NODES {
        let n = node(&after, name);
        let peers = n["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 2, "{name}: {peers:?}");
        for p in peers {
            let age = p["latestHandshakeSecondsAgo"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: no handshake with {}", p["node"]));
            // Fresh: within the test's minute, stretched on a slow machine
            // up to WireGuard's REJECT_AFTER_TIME (no session older than
            // that carries anything; a slow run outlasts the 120 s rekey).
            let fresh = meshlab::lab::scaled(Duration::from_secs(60)).min(Duration::from_secs(180));
            assert!(
                age < fresh.as_secs(),
                "{name}: stale handshake with {}",
                p["node"]
            );
        }
        let (was, now) = (transfer(&before, name), transfer(&after, name));
        for (peer, (rx, tx)) in &now {
            let (rx0, tx0) = was.get(peer).copied().unwrap_or_default();
            assert!(
                *rx > rx0 && *tx > tx0,
                "{name}: transfer with {peer} did not grow both ways ({rx0}/{tx0} -> {rx}/{tx})"
            );
        }
        // In the node's namespace: a kernel link answers only there.
        let wg = lab.meshlab(&[
            "exec",
            name,
            "--",
            "wg",
            "show",
            n["wgInterface"].as_str().unwrap(),
        ]);
        let text = String::from_utf8_lossy(&wg.stdout);
        assert!(
            wg.status.success() && text.contains("latest handshake") && text.contains("transfer"),
            "wg show: {text}"
        );
    }
}

#[test]
fn a_node_joins_and_one_leaves_without_restarts() {
    let lab = Lab::up("t-join", &["--nodes", "3"]);
    let pids: Vec<Value> = NODES
        .iter()
        .map(|n| node(&lab.status(), n)["meshd"]["pid"].clone())
        .collect();

    // Join: time from node-4's annotations landing to all-pairs reachability.
    let add = lab.command(&["node", "add"]);
    let adding = std::thread::spawn(move || common::run_bounded(add, Duration::from_secs(60)));
    let kubeconfig = lab.kubeconfig();
    let kubectl = meshlab::lab::preflight::kubectl().unwrap();
    wait_for(
        "node-4's public key annotation",
        Duration::from_secs(30),
        || {
            let out = Command::new(&kubectl)
                .args([
                    "--kubeconfig",
                    &kubeconfig,
                    "get",
                    "node",
                    "node-4",
                    "-o",
                    "jsonpath={.metadata.annotations.weft\\.dev/public-key}",
                ])
                .output()
                .unwrap();
            !out.stdout.is_empty()
        },
    );
    let landed = Instant::now();
    let mut pending: BTreeSet<(String, String)> = BTreeSet::new();
    for other in NODES {
        for target in lab.pod_addresses(other) {
            pending.insert(("node-4".into(), target));
        }
    }
    for target in lab.pod_addresses("node-4") {
        for other in NODES {
            pending.insert((other.into(), target.clone()));
        }
    }
    wait_for(
        "all-pairs reachability with node-4",
        Duration::from_secs(20),
        || {
            pending.retain(|(from, to)| !lab.reaches(from, to));
            pending.is_empty()
        },
    );
    let join = landed.elapsed();
    let added = adding.join().unwrap();
    assert!(
        added.status.success(),
        "node add: {}",
        String::from_utf8_lossy(&added.stderr)
    );
    println!("join: annotations landed -> all {} pairs reachable in {} ms (includes one ping round per pair)", 12, join.as_millis());

    // Leave: node-2 is deleted; the others drop its peer and routes.
    let cidr = node(&lab.status(), "node-2")["podCIDRs"][0]
        .as_str()
        .unwrap()
        .to_string();
    let started = Instant::now();
    lab.ok(&["node", "del", "node-2"]);
    for name in ["node-1", "node-3", "node-4"] {
        wait_for(
            &format!("{name} to drop node-2"),
            Duration::from_secs(5),
            || {
                let routes = lab.ok(&["exec", name, "--", "ip", "route", "show", "proto", "77"]);
                let status = lab.status();
                node(&status, name)["peers"].as_array().unwrap().len() == 2
                    && !routes.contains(&cidr)
            },
        );
    }
    println!(
        "leave: node-2 deleted -> peer and routes gone everywhere in {} ms",
        started.elapsed().as_millis()
    );
    let status = lab.status();
    for (name, pid) in ["node-1", "node-3"].iter().zip([&pids[0], &pids[2]]) {
        assert_eq!(
            &node(&status, name)["meshd"]["pid"],
            pid,
            "{name}'s meshd restarted"
        );
    }

    // The gateway (and API server) keeps its MAC as ports come and go: a
    // port with the lowest possible address joins the fabric's bridge (a
    // bridge without an address of its own would take it, and every node's
    // ARP entry for the gateway would point nowhere for ~13 s).
    let fabric = format!("{}-fabric", lab.name);
    let bridge_mac = || {
        let out = Command::new("ip")
            .args(["-n", &fabric, "-j", "link", "show", "br0"])
            .output()
            .unwrap();
        let links: Value = serde_json::from_slice(&out.stdout).expect("ip -j link");
        links[0]["address"].as_str().unwrap().to_string()
    };
    let before = bridge_mac();
    let ip = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["-n", &fabric])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(&[
        "link",
        "add",
        "lowmac",
        "address",
        "00:00:00:00:00:01",
        "type",
        "veth",
        "peer",
        "lowmac-p",
    ]);
    ip(&["link", "set", "lowmac", "master", "br0", "up"]);
    let after = bridge_mac();
    ip(&["link", "del", "lowmac"]);
    assert_eq!(
        after, before,
        "the fabric's bridge changed its MAC when a port joined"
    );
    let neighbour = lab.ok(&["exec", "node-1", "--", "ip", "neigh", "show", "198.18.0.1"]);
    assert!(
        neighbour.contains(&before),
        "node-1's ARP entry for the gateway is not the bridge's {before}: {neighbour}"
    );
}

#[test]
fn kill_9_of_meshd_loses_no_pings_and_the_data_plane_is_adopted() {
    let lab = Lab::up("t-kill", &["--nodes", "2"]);
    let target = lab.pod_addresses("node-2")[0].clone();
    let ifindex = || {
        lab.ok(&[
            "exec",
            "node-1",
            "--",
            "cat",
            &format!(
                "/sys/class/net/{}/ifindex",
                node(&lab.status(), "node-1")["wgInterface"]
                    .as_str()
                    .unwrap()
            ),
        ])
    };
    let index_before = ifindex();
    // meshd adopted the device the data plane container made; a kernel
    // link it makes itself.
    let made_by_meshd = match common::link_kind(&lab, "node-1").as_str() {
        "wireguard" => 1.0,
        _ => 0.0,
    };
    assert_eq!(
        lab.metric("node-1", "weft_dataplane_starts_total"),
        made_by_meshd
    );

    // 20 pings a second for 6 s; meshd on the sender dies at 1.5 s and comes back at 3 s.
    let ping = lab.command(&[
        "exec", "node-1", "--", "ping", "-n", "-c", "120", "-i", "0.05", "-W", "1", &target,
    ]);
    let pinging = std::thread::spawn(move || common::run_bounded(ping, Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(1500));
    signal(pid_of_meshd(&lab, "node-1"), "-9");
    std::thread::sleep(Duration::from_millis(1500));
    lab.ok(&["start-meshd", "node-1"]);
    let out = pinging.join().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("120 received") && summary.contains(" 0% packet loss"),
        "pings were lost across the meshd restart:\n{summary}"
    );

    // It may not serve metrics yet (try_metric: not answering is waiting).
    wait_for("the new meshd to sync", Duration::from_secs(10), || {
        lab.try_metric("node-1", "weft_reconciles_total")
            .is_some_and(|n| n >= 1.0)
    });
    assert_eq!(
        ifindex(),
        index_before,
        "the WireGuard interface was recreated"
    );
    assert_eq!(
        lab.metric("node-1", "weft_dataplane_starts_total"),
        0.0,
        "the restarted meshd created a new data plane instead of adopting"
    );
    assert_eq!(
        lab.metric("node-1", "weft_dataplane_changes_total{kind=\"wireguard\"}"),
        0.0,
        "the adopted device was reconfigured (re-handshakes)"
    );
    assert_eq!(
        lab.metric("node-1", "weft_dataplane_changes_total{kind=\"route\"}"),
        0.0
    );
}

#[test]
fn a_stopped_data_plane_fails_closed() {
    let lab = Lab::up("t-closed", &["--nodes", "2"]);
    let n1_pod = lab.pod_addresses("node-1")[0].clone();
    let n2_pod = lab.pod_addresses("node-2")[0].clone();
    assert!(lab.reaches("node-2", &n1_pod));
    // node-2's agent is stopped cleanly (it leaves the data plane), then its
    // data plane dies.
    let meshd = node(&lab.status(), "node-2")["meshd"]["pid"]
        .as_i64()
        .unwrap();
    assert!(Command::new("kill")
        .args(["-TERM", &meshd.to_string()])
        .status()
        .unwrap()
        .success());
    wait_for("node-2's meshd to exit", Duration::from_secs(5), || {
        node(&lab.status(), "node-2")["meshd"]["running"] == false
    });
    let dataplane: Vec<i32> = lab
        .processes("node-2")
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(" dataplane "))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(
        dataplane.len(),
        1,
        "node-2's data plane should have outlived its meshd"
    );
    assert!(Command::new("kill")
        .args(["-KILL", &dataplane[0].to_string()])
        .status()
        .unwrap()
        .success());
    let iface = node(&lab.status(), "node-2")["wgInterface"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(
        "node-2's WireGuard interface to vanish",
        Duration::from_secs(5),
        || {
            !lab.meshlab(&["exec", "node-2", "--", "ip", "link", "show", &iface])
                .status
                .success()
        },
    );

    let capture = lab.capture();
    // The sender whose data plane is gone refuses: the unreachable backstop, not the default route.
    let route = lab.meshlab(&["exec", "node-2", "--", "ip", "route", "get", &n1_pod]);
    assert!(
        !route.status.success()
            && String::from_utf8_lossy(&route.stderr).contains("No route to host"),
        "node-2 still routes {n1_pod}: {}",
        String::from_utf8_lossy(&route.stdout)
    );
    let from_n2 = lab.meshlab(&[
        "exec", "node-2", "--", "ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", "-I", &n2_pod,
        &n1_pod,
    ]);
    assert!(!from_n2.status.success());
    // Towards it, traffic still leaves node-1 only inside WireGuard, and is not delivered.
    let to_n2 = lab.ping("node-1", &n2_pod, 3, 0.2);
    assert!(
        !to_n2.status.success(),
        "node-2's pods answered without a data plane"
    );
    let packets = capture.stop();
    let leaked = plaintext(&packets);
    assert!(
        leaked.is_empty(),
        "plaintext on the fabric:\n{}",
        leaked.join("\n")
    );
    assert!(
        packets
            .iter()
            .any(|p| p.contains("198.18.1.1.51820 > 198.18.1.2.51820")),
        "node-1 sent nothing through WireGuard: {packets:?}"
    );

    // meshd comes back, recreates the data plane, and traffic flows again.
    lab.ok(&["start-meshd", "node-2"]);
    wait_for(
        "node-2 to reach node-1 again",
        Duration::from_secs(15),
        || lab.reaches("node-2", &n1_pod),
    );
}

#[test]
fn hostile_nodes_are_excluded_on_every_node() {
    let lab = Lab::up("t-hostile", &["--nodes", "3"]);
    let status = lab.status();
    let n1 = node(&status, "node-1");
    let n1_cidr = n1["podCIDRs"][0].as_str().unwrap().to_string();
    let n1_key = n1["publicKey"].as_str().unwrap().to_string();
    let n1_proof = lab.kubectl(&[
        "get",
        "node",
        "node-1",
        "-o",
        "jsonpath={.metadata.annotations.weft\\.dev/key-proof}",
    ]);
    let mut key_thief = Hostile::valid("key-thief", "198.19.53.0/24", "bad_key_proof")
        .with("weft.dev/public-key", &n1_key)
        .with("weft.dev/key-proof", n1_proof.trim());
    key_thief.key = None;
    let mut bad_key = Hostile::valid("bad-key", "198.19.50.0/24", "bad_public_key")
        .with("weft.dev/public-key", "this-is-not-a-key");
    bad_key.key = None;
    let mut evil = Hostile::valid("evil", "8.8.8.0/24", "bad_pod_cidr")
        .with("weft.dev/pod-cidrs", "8.8.8.0/24,1.0.0.0/8")
        .with("weft.dev/mesh-addresses", "198.18.250.8");
    // No spec and no block: public ranges (the hijack seen).
    evil.spec = None;
    let hostile = [
        bad_key,
        Hostile::valid("zero-endpoint", "198.19.51.0/24", "bad_endpoint")
            .with("weft.dev/endpoint", "0.0.0.0:51820"),
        // Younger than node-1, assigned an overlapping pod CIDR.
        Hostile::valid("hijacker", &n1_cidr, "conflict"),
        // node-1's key with node-1's proof: bound to node-1, not to it.
        key_thief,
        Hostile::valid("loopback", "198.19.55.0/24", "bad_endpoint")
            .with("weft.dev/endpoint", "127.0.0.1:51820"),
        // The whole cluster range, through a spec saying so.
        Hostile::valid("greedy", "198.19.0.0/16", "bad_pod_cidr"),
        Hostile::valid("oversized", "198.19.58.0/24", "oversized")
            .with("weft.dev/endpoint", &"9".repeat(10_000)),
        evil,
    ];
    // creationTimestamp has one-second resolution and, at equal age, the
    // name that sorts first wins a conflict: the intruders must be younger.
    std::thread::sleep(Duration::from_millis(1100));
    for h in &hostile {
        h.register(&lab);
    }
    for name in NODES {
        wait_for(
            &format!("{name} to exclude all eight"),
            Duration::from_secs(10),
            || {
                [
                    ("bad_public_key", 1.0),
                    ("bad_key_proof", 1.0),
                    ("bad_endpoint", 2.0),
                    ("conflict", 1.0),
                    ("bad_pod_cidr", 2.0),
                    ("oversized", 1.0),
                ]
                .iter()
                .all(|(r, n)| {
                    lab.metric(name, &format!("weft_excluded_nodes{{reason=\"{r}\"}}")) == *n
                })
            },
        );
        // Nothing of the claimed public ranges was routed into the mesh.
        let route = lab.ok(&["exec", name, "--", "ip", "route", "get", "8.8.8.8"]);
        assert!(
            route.contains("via 198.18.0.1") && !route.contains(" dev wf"),
            "{name} routes 8.8.8.8 into the mesh: {route}"
        );
        let status = lab.status();
        let peers: Vec<&str> = node(&status, name)["peers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["node"].as_str().unwrap_or("?"))
            .collect();
        assert_eq!(
            peers.len(),
            2,
            "{name} peers with a hostile node: {peers:?}"
        );
    }
    // The victim's traffic is unaffected, from every node.
    for from in ["node-2", "node-3"] {
        assert!(
            lab.reaches(from, &lab.pod_addresses("node-1")[0]),
            "{from} lost node-1"
        );
    }
    let routes = lab.ok(&["exec", "node-2", "--", "ip", "route", "show", &n1_cidr]);
    assert!(
        routes.contains(&format!("{n1_cidr} dev wf")),
        "node-1's pods are no longer routed through the mesh on node-2: {routes}"
    );
    // Each exclusion is an Event on the offending Node.
    let events = lab.events();
    for Hostile { name, reason, .. } in &hostile {
        let about: Vec<&Value> = events
            .iter()
            .filter(|e| e["regarding"]["name"] == *name)
            .collect();
        assert!(!about.is_empty(), "no Event about {name}");
        assert!(about
            .iter()
            .all(|e| e["reason"] == "WeftAnnotationsRejected" && e["type"] == "Warning"));
        assert!(
            lab.metric(
                "node-1",
                &format!("weft_rejected_annotations_total{{reason=\"{reason}\"}}")
            ) >= 1.0
        );
    }
}

#[test]
fn interoperates_with_debian_wireguard_go() {
    let lab = Lab::up("t-wggo", &["--nodes", "3", "--wireguard-go", "node-3"]);
    let processes = lab.processes("node-3");
    assert!(
        processes
            .iter()
            .any(|(_, cmd)| cmd.starts_with("wireguard-go -f")),
        "node-3 does not run wireguard-go: {processes:?}"
    );
    assert!(
        !processes.iter().any(|(_, cmd)| cmd.contains(" dataplane ")),
        "node-3 runs boringtun too"
    );
    for from in NODES {
        for to in NODES.iter().filter(|n| **n != from) {
            for target in lab.pod_addresses(to) {
                assert!(
                    lab.reaches(from, &target),
                    "{from} cannot reach {to} at {target}"
                );
            }
        }
    }
}

#[test]
fn an_idle_mesh_writes_nothing_and_changes_nothing() {
    let lab = Lab::up("t-idle", &["--nodes", "3"]);
    // Let the first syncs and handshakes settle.
    std::thread::sleep(Duration::from_secs(2));
    let counters = |lab: &Lab| -> Vec<f64> {
        NODES
            .iter()
            .flat_map(|n| {
                [
                    "weft_api_writes_total{kind=\"annotations\"}",
                    "weft_api_writes_total{kind=\"event\"}",
                    "weft_dataplane_changes_total{kind=\"wireguard\"}",
                    "weft_dataplane_changes_total{kind=\"route\"}",
                    "weft_dataplane_changes_total{kind=\"address\"}",
                    "weft_dataplane_changes_total{kind=\"link\"}",
                ]
                .iter()
                .map(|m| lab.metric(n, m))
                .collect::<Vec<_>>()
            })
            .collect()
    };
    let resource_version = |lab: &Lab| -> String {
        let list: Value =
            serde_json::from_str(&lab.ok(&["kubectl", "--", "get", "--raw", "/api/v1/nodes"]))
                .unwrap();
        list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (before, rv_before) = (counters(&lab), resource_version(&lab));
    let resyncs_before = lab.metric("node-1", "weft_reconciles_total");
    // Independent evidence: the kernel's own change notifications.
    let monitors: Vec<_> = NODES
        .iter()
        .map(|n| {
            Command::new("timeout")
                .args([
                    "30",
                    "ip",
                    "-n",
                    &format!("t-idle-{n}"),
                    "monitor",
                    "route",
                    "address",
                    "link",
                ])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<String> = monitors
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.wait_with_output().unwrap().stdout).into_owned())
        .collect();
    let (after, rv_after) = (counters(&lab), resource_version(&lab));
    assert_eq!(
        rv_before, rv_after,
        "something wrote to the API server while the mesh was idle"
    );
    assert_eq!(before, after, "meshd changed something while idle");
    for (n, out) in NODES.iter().zip(&outputs) {
        assert!(
            out.trim().is_empty(),
            "{n}: the kernel saw changes while idle:\n{out}"
        );
    }
    // The lab resyncs every 10 s: passes ran and found nothing to change.
    assert!(
        lab.metric("node-1", "weft_reconciles_total") >= resyncs_before + 2.0,
        "no resync ran while idle"
    );
}

/// The data plane container dies; the kubelet restarts it (in the lab,
/// `start-meshd` starts the pod's containers that are not running) and
/// meshd configures the new device from scratch.
#[test]
fn meshd_configures_a_restarted_data_plane() {
    let lab = Lab::up("t-revive", &["--nodes", "2"]);
    let n2_pod = lab.pod_addresses("node-2")[0].clone();
    let dataplane = |lab: &Lab| -> Vec<i32> {
        lab.processes("node-1")
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(" dataplane "))
            .map(|(pid, _)| pid)
            .collect()
    };
    let first = dataplane(&lab);
    assert_eq!(first.len(), 1);
    assert!(Command::new("kill")
        .args(["-KILL", &first[0].to_string()])
        .status()
        .unwrap()
        .success());
    wait_for(
        "node-1's pod traffic to stop with its data plane",
        Duration::from_secs(5),
        || !lab.reaches("node-1", &n2_pod),
    );
    lab.ok(&["start-meshd", "node-1"]);
    let took = wait_for(
        "node-1 to reach node-2 again",
        Duration::from_secs(15),
        || lab.reaches("node-1", &n2_pod),
    );
    println!(
        "data plane container restarted -> traffic flows again in {} ms",
        took.as_millis()
    );
    let second = dataplane(&lab);
    assert_eq!(second.len(), 1);
    assert_ne!(second, first, "the same process?");
    assert_eq!(lab.metric("node-1", "weft_dataplane_starts_total"), 1.0);
    // Reconfigured from scratch: the peer is back with its allowed IPs.
    let status = lab.status();
    let peers = node(&status, "node-1")["peers"].as_array().unwrap().clone();
    assert_eq!(peers.len(), 1);
    // Its pod CIDRs and mesh addresses, and its host address once heard
    // from there again (pods', and with host encryption the host's,
    // traffic to it).
    let allowed: Vec<&str> = peers[0]["allowedIps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .filter(|a| *a != "198.18.1.2/32")
        .collect();
    assert_eq!(allowed.len(), 4, "{allowed:?}");
}

/// A node on the next annotation format (a later meshd in a rolling
/// upgrade: a higher `weft.dev/version` and an annotation this meshd does
/// not know) stays a peer of this one, and traffic to it keeps flowing; when
/// it goes back to this format, nothing changes either. Node-2's meshd is
/// stopped while its Node carries the next format's annotations (its data
/// plane keeps serving), as if a later build had written them.
#[test]
fn a_node_on_the_next_annotation_format_stays_a_peer() {
    let lab = Lab::up("t-format", &["--nodes", "2"]);
    let target = lab.pod_addresses("node-2")[0].clone();
    // The peer gauge is refreshed once a second, after the first sync.
    let up = || lab.metric("node-1", "weft_peers{state=\"up\"}");
    wait_for("node-1 to count node-2 up", Duration::from_secs(10), || {
        up() == 1.0
    });
    signal(pid_of_meshd(&lab, "node-2"), "-9");
    let next_format = [
        "annotate",
        "node",
        "node-2",
        "--overwrite",
        "weft.dev/version=3",
        "weft.dev/a-later-field=anything",
    ];
    let passes = lab.metric("node-1", "weft_reconciles_total");
    lab.kubectl(&next_format);
    let rejected = || {
        lab.metric(
            "node-1",
            "weft_excluded_nodes{reason=\"unsupported_version\"}",
        )
    };
    // node-1 judges the change at once (a watch event).
    wait_for(
        "node-1 to judge the change",
        Duration::from_secs(15),
        || lab.metric("node-1", "weft_reconciles_total") > passes,
    );
    assert_eq!(rejected(), 0.0, "node-1 refused the next format");
    assert_eq!(up(), 1.0, "node-1 dropped node-2");
    assert!(lab.reaches("node-1", &target), "node-2 is unreachable");

    // Back to this format (the upgrade rolled back): node-2's meshd writes
    // version 2 again and leaves the admin's key alone.
    lab.ok(&["start-meshd", "node-2"]);
    wait_for(
        "node-2 to publish format 2 again",
        Duration::from_secs(15),
        || {
            let out = lab.ok(&[
                "kubectl",
                "--",
                "get",
                "node",
                "node-2",
                "-o",
                "jsonpath={.metadata.annotations.weft\\.dev/version}",
            ]);
            out.trim() == "2"
        },
    );
    assert_eq!(rejected(), 0.0);
    assert!(lab.reaches("node-1", &target));
}
