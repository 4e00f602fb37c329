//! Faults injected into a running lab, as an operator's mistakes and an
//! attacker's moves would: a killed agent, a peer that vanishes, changes
//! to a peer under traffic, a stuck control socket, a second agent. Every
//! lab's fabric carries the plaintext sentinel and every node a default
//! route, so any leak these provoke fails the test at teardown.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{dataplane_pid, node, pid_of_meshd, signal, stop_meshd, wait_for, Hostile, Lab};
use serde_json::Value;

/// `(node, endpoint, allowed IPs)` of each peer of `name`, from its data plane.
fn peers(lab: &Lab, name: &str) -> Vec<(String, String, Vec<String>)> {
    node(&lab.status(), name)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["node"].as_str().unwrap_or("?").to_string(),
                p["endpoint"].as_str().unwrap_or("").to_string(),
                p["allowedIps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn peer_nodes(lab: &Lab, name: &str) -> Vec<String> {
    let mut nodes: Vec<String> = peers(lab, name).into_iter().map(|p| p.0).collect();
    nodes.sort();
    nodes
}

/// `name`'s published IPv4 mesh address.
fn mesh_v4_of(lab: &Lab, name: &str) -> String {
    node(&lab.status(), name)["meshAddresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .find(|a| !a.contains(':'))
        .expect("an IPv4 mesh address")
        .to_string()
}

/// Sets (or overwrites) one annotation on a Node, as an admin or attacker would.
fn annotate(lab: &Lab, node: &str, key: &str, value: &str) {
    lab.kubectl(&[
        "annotate",
        "node",
        node,
        "--overwrite",
        &format!("{key}={value}"),
    ]);
}

/// A ping from `from`'s pod stand-in address of `target`'s family (the
/// source a pod on that node would have).
fn pod_ping(lab: &Lab, from: &str, target: &str, count: u32) -> std::process::Output {
    let v6 = target.contains(':');
    let source = lab
        .pod_addresses(from)
        .into_iter()
        .find(|a| a.contains(':') == v6)
        .unwrap();
    let c = count.to_string();
    lab.meshlab(&[
        "exec", from, "--", "ping", "-n", "-c", &c, "-i", "0.2", "-W", "1", "-I", &source, target,
    ])
}

#[test]
fn a_restarted_meshd_follows_every_change() {
    let lab = Lab::up("t-restart", &["--nodes", "3"]);
    for kill_dataplane in [false, true] {
        let meshd = pid_of_meshd(&lab, "node-2");
        if kill_dataplane {
            signal(i64::from(dataplane_pid(&lab, "node-2")), "-KILL");
        }
        signal(meshd, "-KILL");
        lab.ok(&["start-meshd", "node-2"]);
        let synced = wait_for(
            "the restarted meshd to apply a sync",
            Duration::from_secs(10),
            || lab.try_metric("node-2", "weft_reconciles_total") >= Some(1.0),
        );
        println!("restart (data plane killed too: {kill_dataplane}): first sync after {synced:?}");
        let errors = lab.metric("node-2", "weft_reconcile_errors_total");

        // A node joins: the restarted node follows.
        let names = |status: &Value| -> Vec<String> {
            status["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["name"].as_str().unwrap().to_string())
                .collect()
        };
        let before = names(&lab.status());
        lab.ok(&["node", "add"]);
        let newest = names(&lab.status())
            .into_iter()
            .find(|n| !before.contains(n))
            .expect("node add added a node");
        let started = Instant::now();
        wait_for(
            &format!("node-2 to peer with {newest}"),
            Duration::from_secs(5),
            || peer_nodes(&lab, "node-2").contains(&newest),
        );
        println!(
            "restart (data plane killed too: {kill_dataplane}): join followed in {} ms",
            started.elapsed().as_millis()
        );

        // An annotation changes (the newcomer's endpoint, its meshd stopped
        // so that it does not put it back, its data plane too so that its
        // packets do not move the endpoint back): the restarted node
        // follows.
        stop_meshd(&lab, &newest);
        signal(i64::from(dataplane_pid(&lab, &newest)), "-KILL");
        let moved = format!(
            "{}:51821",
            node(&lab.status(), &newest)["underlay"].as_str().unwrap()
        );
        annotate(&lab, &newest, "weft.dev/endpoint", &moved);
        wait_for(
            &format!("node-2 to move {newest}'s endpoint to {moved}"),
            Duration::from_secs(5),
            || {
                peers(&lab, "node-2")
                    .iter()
                    .any(|(n, e, _)| *n == newest && *e == moved)
            },
        );

        // The node leaves: the restarted node drops it.
        lab.ok(&["node", "del", &newest]);
        wait_for(
            &format!("node-2 to drop {newest}"),
            Duration::from_secs(5),
            || !peer_nodes(&lab, "node-2").contains(&newest),
        );
        assert_eq!(
            lab.metric("node-2", "weft_reconcile_errors_total"),
            errors,
            "the restarted meshd failed syncs while following changes"
        );
    }
}

#[test]
fn no_plaintext_whatever_happens_to_a_peer() {
    let lab = Lab::up("t-failclosed", &["--nodes", "3"]);
    let to_n3 = lab.pod_addresses("node-3");
    let to_n2 = lab.pod_addresses("node-2");
    for t in &to_n3 {
        assert!(pod_ping(&lab, "node-1", t, 1).status.success(), "{t}");
    }
    let refused = |what: &str| {
        for t in &to_n3 {
            let out = pod_ping(&lab, "node-1", t, 2);
            assert!(!out.status.success(), "{what}: node-1 still reaches {t}");
            let route = lab.meshlab(&["exec", "node-1", "--", "ip", "route", "get", t]);
            assert!(
                String::from_utf8_lossy(&route.stderr).contains("No route to host")
                    || String::from_utf8_lossy(&route.stdout).contains("unreachable"),
                "{what}: node-1 routes {t} somewhere: {}{}",
                String::from_utf8_lossy(&route.stdout),
                String::from_utf8_lossy(&route.stderr)
            );
        }
    };

    // The peer's agent stops and its key annotation goes: pending.
    stop_meshd(&lab, "node-3");
    let saved = lab.kubectl(&["get", "node", "node-3", "-o", "json"]);
    lab.kubectl(&["annotate", "node", "node-3", "weft.dev/public-key-"]);
    wait_for("node-1 to drop node-3", Duration::from_secs(5), || {
        peer_nodes(&lab, "node-1") == ["node-2"]
    });
    refused("node-3 pending");

    // The Node is deleted, then registered again while its pods run.
    lab.kubectl(&["delete", "node", "node-3"]);
    wait_for("node-3 to be gone", Duration::from_secs(5), || {
        node(&lab.status(), "node-3")["registered"] == false
    });
    refused("node-3 deleted");
    let mut again: Value = serde_json::from_str(&saved).unwrap();
    for field in ["resourceVersion", "uid", "creationTimestamp"] {
        again["metadata"].as_object_mut().unwrap().remove(field);
    }
    let path = lab.dir().join("node-3-again.json");
    std::fs::write(&path, again.to_string()).unwrap();
    lab.kubectl(&["create", "-f", path.to_str().unwrap()]);
    // Its old annotations prove nothing for the new Node (a key proof is
    // bound to the Node's UID): it is refused until its meshd proves its
    // key again.
    wait_for(
        "node-1 to refuse node-3's old proof",
        Duration::from_secs(5),
        || lab.metric("node-1", "weft_excluded_nodes{reason=\"bad_key_proof\"}") == 1.0,
    );
    refused("node-3 re-registered");
    lab.ok(&["start-meshd", "node-3"]);
    wait_for(
        "node-1 to reach node-3's pods again, through WireGuard",
        Duration::from_secs(10),
        || {
            to_n3
                .iter()
                .all(|t| pod_ping(&lab, "node-1", t, 1).status.success())
        },
    );
    stop_meshd(&lab, "node-3");

    // The peer's data plane dies too: the userspace device's process, or
    // the kernel link (the data plane container only waits where the
    // kernel serves).
    match common::link_kind(&lab, "node-3").as_str() {
        "wireguard" => {
            let iface = node(&lab.status(), "node-3")["wgInterface"]
                .as_str()
                .expect("a WireGuard interface")
                .to_string();
            lab.ok(&["exec", "node-3", "--", "ip", "link", "del", &iface]);
        }
        _ => signal(i64::from(dataplane_pid(&lab, "node-3")), "-KILL"),
    }
    for t in &to_n3 {
        assert!(
            !pod_ping(&lab, "node-1", t, 2).status.success(),
            "node-3's pods answered with no data plane"
        );
    }

    // A sync error on the sender (a bad admin override): what is installed
    // stays, and still only inside WireGuard.
    let errors = lab.metric("node-1", "weft_reconcile_errors_total");
    annotate(&lab, "node-1", "weft.dev/force-endpoint", "not-an-endpoint");
    wait_for("node-1's syncs to fail", Duration::from_secs(5), || {
        lab.metric("node-1", "weft_reconcile_errors_total") > errors
    });
    for t in &to_n2 {
        assert!(
            pod_ping(&lab, "node-1", t, 1).status.success(),
            "a failed sync broke the installed mesh ({t})"
        );
    }
    assert_eq!(lab.plaintext(), Some(0), "plaintext left a node");
}

/// The sentinel itself can fail: with meshd's routes gone a packet takes
/// the default route, and the fabric counts it.
#[test]
fn the_sentinel_sees_a_leak() {
    let lab = Lab::up("t-sentinel", &["--nodes", "2"]);
    stop_meshd(&lab, "node-1");
    lab.ok(&[
        "exec", "node-1", "--", "ip", "route", "flush", "proto", "77",
    ]);
    lab.ok(&[
        "exec", "node-1", "--", "ip", "-6", "route", "flush", "proto", "77",
    ]);
    // Three per family: the first IPv6 packet may wait for (or be lost in)
    // neighbour discovery of the fabric's router.
    for t in lab.pod_addresses("node-2") {
        let _ = pod_ping(&lab, "node-1", &t, 3);
    }
    let seen = lab.plaintext();
    assert!(
        seen.is_some_and(|n| n >= 2),
        "the sentinel missed a leak in both families: {seen:?}"
    );
    lab.reset_plaintext();
}

#[test]
fn changing_a_peer_keeps_every_data_plane_alive() {
    let lab = Lab::up("t-peerchange", &["--nodes", "3"]);
    let n2 = lab.pod_addresses("node-2")[0].clone();
    // Devices configured from scratch so far: 0 where the data plane
    // container made it, 1 where meshd made a kernel link.
    let starts = |name: &str| lab.metric(name, "weft_dataplane_starts_total");
    let starts_before = ["node-1", "node-2"].map(starts);
    // node-1 → node-2 must not lose a packet while node-3 changes.
    let ping = lab.command(&[
        "exec", "node-1", "--", "ping", "-n", "-c", "100", "-i", "0.05", "-W", "1", &n2,
    ]);
    let pinging = std::thread::spawn(move || common::run_bounded(ping, Duration::from_secs(30)));

    stop_meshd(&lab, "node-3");
    // node-3's device falls silent, as if it were gone: a packet from it
    // would roam its endpoint back at its peers before the test looks.
    let published = lab.kubectl(&[
        "get",
        "node",
        "node-3",
        "-o",
        r"jsonpath={.metadata.annotations.weft\.dev/endpoint}",
    ]);
    let port = published
        .rsplit_once(':')
        .map(|(_, port)| port.trim().to_string())
        .unwrap_or_else(|| panic!("node-3's endpoint: {published:?}"));
    let silent = format!("add table inet t-silent; add chain inet t-silent out {{ type filter hook output priority 0; }}; add rule inet t-silent out udp sport {port} drop");
    lab.ok(&["exec", "node-3", "--", "nft", &silent]);
    let underlay = node(&lab.status(), "node-3")["underlay"]
        .as_str()
        .unwrap()
        .to_string();
    let moved = format!("{underlay}:51821");
    annotate(&lab, "node-3", "weft.dev/endpoint", &moved);
    for name in ["node-1", "node-2"] {
        wait_for(
            &format!("{name} to move node-3's endpoint"),
            Duration::from_secs(5),
            || {
                peers(&lab, name)
                    .iter()
                    .any(|(n, e, _)| n == "node-3" && *e == moved)
            },
        );
    }
    // Its allowed IPs change: it drops its IPv6 mesh address (optional;
    // a mesh address is its block's, so it can only drop or keep one).
    let v4 = mesh_v4_of(&lab, "node-3");
    annotate(&lab, "node-3", "weft.dev/mesh-addresses", &v4);
    for name in ["node-1", "node-2"] {
        wait_for(
            &format!("{name} to drop node-3's IPv6 mesh address"),
            Duration::from_secs(5),
            || {
                peers(&lab, name).iter().any(|(n, _, allowed)| {
                    n == "node-3"
                        && allowed.contains(&format!("{v4}/32"))
                        && !allowed.iter().any(|a| a.starts_with("fd98:18:"))
                })
            },
        );
        let wg = lab.meshlab(&["exec", name, "--", "wg", "show"]);
        assert!(wg.status.success(), "wg show on {name}: {wg:?}");
    }
    let out = pinging.join().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(" 0% packet loss"),
        "node-1 → node-2 lost packets while node-3 changed:\n{summary}"
    );

    // node-3 comes back and republishes: everyone meets it again.
    lab.ok(&["exec", "node-3", "--", "nft", "delete table inet t-silent"]);
    lab.ok(&["start-meshd", "node-3"]);
    let started = Instant::now();
    for from in ["node-1", "node-2"] {
        for t in lab.pod_addresses("node-3") {
            wait_for(
                &format!("{from} to reach {t} again"),
                Duration::from_secs(10),
                || pod_ping(&lab, from, &t, 1).status.success(),
            );
        }
    }
    println!(
        "node-3 back: every pair reached again in {} ms",
        started.elapsed().as_millis()
    );
    for (name, before) in ["node-1", "node-2"].into_iter().zip(starts_before) {
        assert_eq!(
            starts(name),
            before,
            "{name}'s data plane died and was replaced"
        );
    }
}

#[test]
fn the_agent_cannot_be_wedged() {
    let lab = Lab::up("t-wedge", &["--nodes", "2"]);
    let iface = node(&lab.status(), "node-1")["wgInterface"]
        .as_str()
        .unwrap()
        .to_string();
    // A client connects to the control socket and says nothing.
    let idle = std::os::unix::net::UnixStream::connect(format!("/var/run/wireguard/{iface}.sock"))
        .expect("connecting to node-1's UAPI socket");
    lab.ok(&["node", "add"]);
    wait_for(
        "node-1 to peer with node-3 past an idle UAPI client",
        Duration::from_secs(10),
        || peer_nodes(&lab, "node-1").contains(&"node-3".to_string()),
    );
    drop(idle);

    // A second meshd on the node refuses to start, and says why.
    let pid = pid_of_meshd(&lab, "node-1");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let env = environ.split(|b| *b == 0).filter_map(|kv| {
        let kv = String::from_utf8_lossy(kv).into_owned();
        kv.split_once('=')
            .map(|(k, v)| (k.to_string(), v.to_string()))
    });
    let mut second = Command::new("ip");
    second
        .args(["netns", "exec", "t-wedge-node-1"])
        .args(&args)
        .env_clear()
        .envs(env);
    let out = common::run_bounded(second, Duration::from_secs(20));
    assert!(!out.status.success(), "a second meshd started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another meshd"), "{err}");
    assert_eq!(pid_of_meshd(&lab, "node-1"), pid, "the first meshd died");

    // Its TUN deleted under it, the data plane exits; restarted (the
    // kubelet's part: `start-meshd`), it makes a new one that meshd configures.
    let starts = lab.metric("node-1", "weft_dataplane_starts_total");
    lab.ok(&["exec", "node-1", "--", "ip", "link", "del", &iface]);
    wait_for(
        "node-1's data plane to exit without its TUN",
        Duration::from_secs(10),
        || {
            !lab.processes("node-1")
                .iter()
                .any(|(_, cmd)| cmd.contains(" dataplane"))
        },
    );
    lab.ok(&["start-meshd", "node-1"]);
    let n2 = lab.pod_addresses("node-2")[0].clone();
    wait_for(
        "node-1 to reach node-2 through a new data plane",
        Duration::from_secs(15),
        || lab.reaches("node-1", &n2),
    );
    assert_eq!(
        lab.metric("node-1", "weft_dataplane_starts_total"),
        starts + 1.0
    );
}

#[test]
fn a_flapping_hostile_node_cannot_flood_the_api() {
    let lab = Lab::up("t-flap", &["--nodes", "2"]);
    // Its key proven, so its claims are judged past the proof.
    let mut flapper = Hostile::valid("flapper", "8.8.8.0/24", "bad_pod_cidr")
        .with("weft.dev/mesh-addresses", "198.18.250.60");
    flapper.spec = None;
    flapper.register(&lab);
    let nodes = ["node-1", "node-2"];
    for n in nodes {
        wait_for(
            &format!("{n} to exclude flapper"),
            Duration::from_secs(10),
            || lab.metric(n, "weft_excluded_nodes{reason=\"bad_pod_cidr\"}") == 1.0,
        );
    }
    let events = |n: &str| lab.metric(n, "weft_api_writes_total{kind=\"event\"}");
    let before: Vec<f64> = nodes.iter().map(|n| events(n)).collect();
    let started = Instant::now();
    let claims = [
        "1.0.0.0/8",
        "198.19.0.0/16",
        "8.8.8.0/24",
        "198.19.200.0/24",
    ];
    for i in 0..100 {
        annotate(
            &lab,
            "flapper",
            "weft.dev/pod-cidrs",
            claims[i % claims.len()],
        );
    }
    println!("100 claim flips in {} ms", started.elapsed().as_millis());
    std::thread::sleep(Duration::from_secs(1));
    for (n, before) in nodes.iter().zip(before) {
        let written = events(n) - before;
        assert!(
            written <= meshlab_report_burst(),
            "{n} wrote {written} Events about one flapping node"
        );
        assert_eq!(peer_nodes(&lab, n).len(), 1, "{n} peered with flapper");
        let excluded: f64 = ["bad_pod_cidr", "pod_cidr_not_assigned"]
            .iter()
            .map(|r| lab.metric(n, &format!("weft_excluded_nodes{{reason=\"{r}\"}}")))
            .sum();
        assert_eq!(excluded, 1.0, "{n} does not exclude flapper");
    }
}

/// At most this many Events per node and minute (meshd's report budget).
fn meshlab_report_burst() -> f64 {
    weft_meshd::report::BURST as f64
}

#[test]
fn the_mesh_rides_out_a_hung_and_a_restarted_api_server() {
    let lab = Lab::up("t-apiserver", &["--nodes", "2"]);
    let target = lab.pod_addresses("node-2")[0].clone();
    let api = lab.status()["apiServer"]["pid"].as_i64().unwrap();
    let ping = lab.command(&[
        "exec", "node-1", "--", "ping", "-n", "-c", "140", "-i", "0.05", "-W", "1", &target,
    ]);
    let pinging = std::thread::spawn(move || common::run_bounded(ping, Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(500));
    // Hung: every request and watch stalls.
    signal(api, "-STOP");
    std::thread::sleep(Duration::from_secs(3));
    signal(api, "-CONT");
    // Restarted with its objects: every watch gets 410 and relists.
    let restarted = lab.ok(&["api", "restart"]);
    assert!(restarted.contains("API server restarted"), "{restarted}");
    let out = pinging.join().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(" 0% packet loss"),
        "pod traffic was lost while the API server hung and restarted:\n{summary}"
    );
    let after = lab.status();
    assert_ne!(after["apiServer"]["pid"].as_i64().unwrap(), api);
    assert_eq!(
        after["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["registered"] == true)
            .count(),
        2,
        "the restarted API server lost the Nodes"
    );
    // The agents follow the restarted server: a join works.
    lab.ok(&["node", "add"]);
    wait_for(
        "node-1 to peer with node-3",
        Duration::from_secs(15),
        || peer_nodes(&lab, "node-1").contains(&"node-3".to_string()),
    );
    for t in lab.pod_addresses("node-3") {
        wait_for(
            &format!("node-1 to reach {t}"),
            Duration::from_secs(10),
            || pod_ping(&lab, "node-1", &t, 1).status.success(),
        );
    }
}
