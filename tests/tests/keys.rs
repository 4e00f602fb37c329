//! Key rotation and revocation with real packets: a node (then every node,
//! rolling) changes its static key while a TCP stream and 20 pings a second
//! cross it both ways; meshd dies on the rotating node and on a peer in the
//! middle of it; a revoked key is refused everywhere within a second and
//! stays refused when its annotation comes back; keys rotate on their own
//! when too old. Every lab asserts at teardown that nothing left a node in
//! plaintext.

mod common;

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use common::{node, pid_of_meshd, signal, wait_for, Lab, Traffic};

/// How long a rotation may take on a loaded CI machine.
const ROTATION: Duration = Duration::from_secs(60);

/// Each node's status entry (`meshlab status`).
fn nodes(lab: &Lab) -> Vec<serde_json::Value> {
    lab.status()["nodes"].as_array().cloned().expect("nodes")
}

/// Every node's current public key, from its device.
fn device_keys(lab: &Lab) -> Vec<String> {
    nodes(lab)
        .iter()
        .map(|n| n["publicKey"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Every key any node's device has configured for a peer.
fn peer_keys(lab: &Lab) -> BTreeSet<String> {
    nodes(lab)
        .iter()
        .flat_map(|n| n["peers"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["publicKey"].as_str().map(String::from))
        .collect()
}

/// `name`'s key file as it is on disk.
fn key_file(lab: &Lab, name: &str) -> String {
    std::fs::read_to_string(lab.dir().join(name).join("root/var/lib/weft/key.json"))
        .expect("the node's key file")
}

/// A Node annotation, as the API has it.
fn annotation(lab: &Lab, name: &str, key: &str) -> Option<String> {
    let node: serde_json::Value =
        serde_json::from_str(&lab.kubectl(&["get", "node", name, "-o", "json"])).expect("json");
    node["metadata"]["annotations"][key]
        .as_str()
        .map(String::from)
}

/// Traffic both ways between pods on node-1 and node-2: (pings lost, pings
/// sent) per direction, and TCP retransmits; panics if a stream reset.
fn both_ways(lab: &Lab, seconds: u32, during: impl FnOnce()) -> [(u32, u32, u64); 2] {
    both_ways_at(lab, seconds, "100M", during)
}

/// One lab at a time: these tests count lost packets and time rotations,
/// and on two cores a neighbouring lab (its iperf3, or just its start)
/// starves a data plane into dropping packets of its own (Debian's
/// wireguard-go most: CI once counted 8 of 500 against a one-key switch
/// that costs 1), which would be counted against the rotation measured.
static ONE_LAB: Mutex<()> = Mutex::new(());

/// Taken first by every test here, dropped after its lab is down. A test
/// that failed poisons the lock; the others still run.
fn alone() -> MutexGuard<'static, ()> {
    ONE_LAB.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`both_ways`] with the TCP streams capped at `rate`.
fn both_ways_at(
    lab: &Lab,
    seconds: u32,
    rate: &str,
    during: impl FnOnce(),
) -> [(u32, u32, u64); 2] {
    let there = Traffic::start_at(lab, "pod-1-1", "pod-2-1", seconds, rate);
    let back = Traffic::start_at(lab, "pod-2-1", "pod-1-1", seconds, rate);
    during();
    let count = seconds * 20;
    let (lost_there, retr_there) = there.finish();
    let (lost_back, retr_back) = back.finish();
    [
        (lost_there, count, retr_there),
        (lost_back, count, retr_back),
    ]
}

fn assert_at_most_one_in_a_hundred(what: &str, results: [(u32, u32, u64); 2]) {
    for (lost, sent, retransmits) in results {
        eprintln!("{what}: {lost} of {sent} pings lost, {retransmits} TCP retransmits");
        assert!(
            lost * 100 <= sent,
            "{what}: {lost} of {sent} pings lost (more than 1 in 100)"
        );
    }
}

/// The old keys are nowhere: not on any device, not in any key file.
fn assert_gone(lab: &Lab, old_public: &[String], old_files: &[(String, String)]) {
    let configured = peer_keys(lab);
    let current = device_keys(lab);
    for key in old_public {
        assert!(
            !configured.contains(key),
            "a device still has {key} as a peer"
        );
        assert!(!current.contains(key), "a device still uses {key}");
    }
    for (name, before) in old_files {
        let private: serde_json::Value = serde_json::from_str(before).expect("json");
        let private = private["current"].as_str().expect("a key");
        assert!(
            !key_file(lab, name).contains(private),
            "{name}'s old private key is still in its key file"
        );
    }
}

#[test]
fn one_node_then_every_node_rotates_under_traffic_without_loss() {
    let _alone = alone();
    let lab = Lab::up("t-rotate", &["--nodes", "3", "--pods-per-node", "1"]);
    let before = device_keys(&lab);
    let files: Vec<(String, String)> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| (n.to_string(), key_file(&lab, n)))
        .collect();

    let results = both_ways(&lab, 20, || {
        std::thread::sleep(Duration::from_secs(3));
        let out = lab.meshctl(&["keys", "rotate", "node-1"]);
        assert!(out.starts_with("node-1: rotated to "), "{out}");
    });
    assert_at_most_one_in_a_hundred("node-1 rotated", results);
    let after = device_keys(&lab);
    assert_ne!(after[0], before[0], "node-1 has a new key");
    assert_eq!(after[1..], before[1..], "the others kept theirs");
    assert_gone(&lab, &before[..1], &files[..1]);

    let results = both_ways(&lab, 25, || {
        std::thread::sleep(Duration::from_secs(3));
        // Two at a time: node-1 and node-2, both ends of the measured
        // traffic, rotate at once (each moves the other's entry while its
        // own device answers two keys), then node-3.
        let out = lab.meshctl(&["keys", "rotate", "--all", "--parallel", "2"]);
        assert_eq!(out.lines().count(), 3, "{out}");
    });
    assert_at_most_one_in_a_hundred("every node rotated, two at a time", results);
    let rotated = device_keys(&lab);
    for (i, key) in rotated.iter().enumerate() {
        assert_ne!(key, &after[i], "node-{} rotated", i + 1);
    }
    assert_gone(&lab, &after, &[]);
    // Every peer is on the new keys: exactly the nodes' current keys.
    assert_eq!(
        peer_keys(&lab),
        rotated.iter().cloned().collect::<BTreeSet<_>>()
    );
    let status = lab.meshctl(&["keys", "status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    for n in status.as_array().expect("rows") {
        assert_eq!(n["rotation"], "-", "{n}");
        assert!(n["ageSeconds"].as_u64().is_some_and(|a| a < 60), "{n}");
    }
}

/// meshd dies on the rotating node before the rotation starts and in the
/// middle of it, and on a peer across the announcement: the rotation
/// waits for the peer, resumes after each restart and completes, and the
/// traffic through the node carries on.
#[test]
fn a_rotation_survives_meshd_restarts_on_both_sides() {
    let _alone = alone();
    let lab = Lab::up("t-rotkill", &["--nodes", "3", "--pods-per-node", "1"]);
    let before = device_keys(&lab);
    let kill = |name: &str| signal(pid_of_meshd(&lab, name), "-9");
    let results = both_ways(&lab, 30, || {
        kill("node-1");
        kill("node-2");
        lab.meshctl(&["keys", "rotate", "node-1", "--no-wait"]);
        lab.ok(&["start-meshd", "node-1"]);
        // node-2's meshd is down: node-2 cannot move, node-3 does.
        let mut pending = None;
        wait_for("node-1 to overlap, waiting for node-2", ROTATION, || {
            pending = annotation(&lab, "node-1", "weft.dev/key-pending");
            pending.as_deref() == Some("node-2")
        });
        kill("node-1");
        std::thread::sleep(Duration::from_secs(1));
        lab.ok(&["start-meshd", "node-1"]);
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            annotation(&lab, "node-1", "weft.dev/next-public-key").is_some(),
            "a restarted rotating node resumes (it still waits for node-2)"
        );
        lab.ok(&["start-meshd", "node-2"]);
        wait_for("node-1's rotation to finish", ROTATION, || {
            annotation(&lab, "node-1", "weft.dev/next-public-key").is_none()
        });
    });
    assert_at_most_one_in_a_hundred("rotation across meshd restarts", results);
    let after = device_keys(&lab);
    assert_ne!(after[0], before[0]);
    assert_gone(&lab, &before[..1], &[]);
    assert!(lab.reaches("node-3", &lab.pod_addresses("node-1")[0]));
}

#[test]
fn a_revoked_key_is_refused_everywhere_at_once_and_for_good() {
    let _alone = alone();
    let lab = Lab::up("t-revoke", &["--nodes", "3", "--pods-per-node", "1"]);
    let status = lab.status();
    let old = node(&status, "node-3")["publicKey"]
        .as_str()
        .expect("a key")
        .to_string();
    let old_annotations: serde_json::Value =
        serde_json::from_str(&lab.kubectl(&["get", "node", "node-3", "-o", "json"])).expect("json");
    let pod1 = lab.pod_addresses("node-1")[0].clone();
    assert!(lab.reaches("node-3", &pod1));
    // node-3's meshd is down, so it cannot replace its key yet.
    signal(pid_of_meshd(&lab, "node-3"), "-9");

    lab.meshctl(&["keys", "revoke", "node-3"]);
    let took = wait_for(
        "every node to drop node-3's key",
        Duration::from_secs(5),
        || !peer_keys(&lab).contains(&old),
    );
    eprintln!("revoked key dropped everywhere in {} ms", took.as_millis());
    assert!(
        took < Duration::from_secs(1),
        "the revoked key stayed for {took:?}"
    );
    assert!(
        !lab.reaches("node-3", &pod1),
        "traffic from the revoked key is dropped"
    );

    // Its old annotations written back (as an attacker with the key would):
    // still refused.
    let annotations = old_annotations["metadata"]["annotations"]
        .as_object()
        .expect("annotations");
    let mut args = vec![
        "annotate".to_string(),
        "--overwrite".into(),
        "node".into(),
        "node-3".into(),
    ];
    for (k, v) in annotations {
        if k.starts_with("weft.dev/") {
            args.push(format!("{k}={}", v.as_str().unwrap_or_default()));
        }
    }
    args.push(format!("weft.dev/key-since={}", "2030-01-01T00:00:00Z"));
    lab.kubectl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !peer_keys(&lab).contains(&old),
        "the re-published key came back"
    );
    let keys = lab.meshctl(&["keys", "status"]);
    assert!(keys.contains("revoked"), "{keys}");

    // Its meshd back: it replaces the key and rejoins.
    lab.ok(&["start-meshd", "node-3"]);
    wait_for("node-3 to rejoin with a new key", ROTATION, || {
        lab.reaches("node-3", &pod1)
    });
    let new = node(&lab.status(), "node-3")["publicKey"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_ne!(new, old);
    assert!(peer_keys(&lab).contains(&new));
}

#[test]
fn keys_older_than_the_maximum_age_rotate_on_their_own() {
    let _alone = alone();
    let lab = Lab::up(
        "t-keyage",
        &[
            "--nodes",
            "2",
            "--pods-per-node",
            "1",
            "--config",
            "WEFT_KEY_MAX_AGE=15s",
        ],
    );
    let before = device_keys(&lab);
    wait_for("both keys to rotate by age", ROTATION, || {
        let now = device_keys(&lab);
        now.iter().zip(&before).all(|(a, b)| a != b)
    });
    let pod2 = lab.pod_addresses("node-2")[0].clone();
    wait_for("the mesh on the new keys", ROTATION, || {
        lab.reaches("node-1", &pod2)
    });
    assert!(
        lab.metric("node-1", "weft_key_events_total{kind=\"finished\"}") >= 1.0,
        "the rotation is counted"
    );
}

/// A node on a one-key data plane (Debian's wireguard-go here, as kernel
/// WireGuard would be): meshd finds the device refuses the overlap, so the
/// node announces a switch time and it and every peer switch then. A Weft
/// node rotating in the same lab has a wireguard-go peer, which replaces
/// its entry. Traffic through the one-key node loses at most 1 probe in 100
/// across each rotation and never resets. Its TCP streams run at 2 Mbit/s
/// each way: with 10, Debian's wireguard-go alone drops 0.6–0.8% of the
/// probes on two cores (measured here with no rotation), too close to the
/// bar to tell anything about the rotation.
#[test]
fn a_one_key_data_plane_switches_at_the_announced_time() {
    let _alone = alone();
    let lab = Lab::up(
        "t-rotswitch",
        &[
            "--nodes",
            "3",
            "--pods-per-node",
            "1",
            "--wireguard-go",
            "node-2",
            "--config",
            "WEFT_KEY_SWITCH_LEAD=3s",
        ],
    );
    let before = device_keys(&lab);
    let results = both_ways_at(&lab, 20, "2M", || {
        std::thread::sleep(Duration::from_secs(3));
        lab.meshctl(&["keys", "rotate", "node-2", "--no-wait"]);
        wait_for("node-2 to announce its switch time", ROTATION, || {
            annotation(&lab, "node-2", "weft.dev/next-key-at").is_some()
        });
        wait_for("node-2 to switch", ROTATION, || {
            annotation(&lab, "node-2", "weft.dev/next-public-key").is_none()
        });
    });
    assert_at_most_one_in_a_hundred("one-key node switched", results);
    let results = both_ways_at(&lab, 20, "2M", || {
        std::thread::sleep(Duration::from_secs(3));
        lab.meshctl(&["keys", "rotate", "node-1"]);
    });
    assert_at_most_one_in_a_hundred("a Weft node with a one-key peer rotated", results);
    let after = device_keys(&lab);
    assert_ne!(after[0], before[0], "node-1 rotated");
    assert_ne!(after[1], before[1], "node-2 rotated");
    assert_eq!(after[2], before[2]);
    assert_gone(&lab, &before[..2], &[]);
    assert_eq!(
        peer_keys(&lab),
        after.iter().cloned().collect::<BTreeSet<_>>()
    );
}
