//! What a node's container runtime is shown, and what meshd cleans up for
//! it: the conflist appears only once meshd has made the mesh (a runtime
//! reports the network ready, and kubelet the Node, when it does), another
//! CNI's configuration that would win is warned about, and the addresses
//! of pods gone without a CNI DEL are collected (runtimes on libcni < 1.2
//! never send GC).

mod common;

use std::time::Duration;

use common::{pid_of_meshd, stop_meshd, wait_for, Lab};
use serde_json::Value;
use weft_ipam::{Attachment, NodeState, PodRef, PodStore};
use weft_meshd::cni::CONFLIST;

#[test]
fn the_conflist_appears_only_after_meshd_s_first_sync() {
    let lab = Lab::up("t-conf", &["--nodes", "2"]);
    let root = lab.dir().join("node-1/root");
    let conf_dir = root.join("etc/cni/net.d");
    let ours = conf_dir.join(CONFLIST);
    assert!(ours.is_file(), "no conflist after up");

    // The node reboots: meshd is gone, /run is empty, the conf dir keeps
    // Weft's conflist, an earlier version's, and another CNI's leftover.
    stop_meshd(&lab, "node-1");
    std::fs::remove_dir_all(root.join("run/weft")).unwrap();
    std::fs::write(conf_dir.join("10-weft.conflist"), b"{}").unwrap();
    std::fs::write(conf_dir.join("00-other.conflist"), b"{}").unwrap();
    // And the API server cannot be reached from it (refused at once, so
    // that no connection attempt hangs past the unblocking).
    let state: Value =
        serde_json::from_slice(&std::fs::read(lab.dir().join("lab.json")).unwrap()).unwrap();
    let url = state["apiServer"]["fabricUrl"].as_str().unwrap();
    let (host, port) = url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .rsplit_once(':')
        .unwrap();
    let nft = |rules: &str| lab.ok(&["exec", "node-1", "--", "nft", rules]);
    nft(&format!(
        "add table inet t_noapi; add chain inet t_noapi out {{ type filter hook output priority 0; }}; \
         add rule inet t_noapi out ip daddr {host} tcp dport {port} reject with tcp reset"
    ));
    lab.ok(&["start-meshd", "node-1"]);
    // meshd runs, cannot sync: no conflist, whatever was there before.
    wait_for(
        "meshd to remove the stale conflists",
        Duration::from_secs(10),
        || !ours.exists() && !conf_dir.join("10-weft.conflist").exists(),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(!ours.exists(), "a conflist before the first sync");
    pid_of_meshd(&lab, "node-1");

    nft("delete table inet t_noapi");
    wait_for(
        "the conflist after meshd's first sync",
        Duration::from_secs(60),
        || ours.is_file(),
    );
    let conflist: Value = serde_json::from_slice(&std::fs::read(&ours).unwrap()).unwrap();
    assert_eq!(conflist["cniVersion"], "1.0.0");
    assert!(
        conf_dir.join("00-other.conflist").exists(),
        "not Weft's to remove"
    );
    // The leftover that sorts first is named, in the log and an Event.
    wait_for(
        "an Event about the configuration sorting first",
        Duration::from_secs(10),
        || {
            lab.events().iter().any(|e| {
                e["reason"] == "WeftCniConfigShadowed"
                    && e["regarding"]["name"] == "node-1"
                    && e["note"]
                        .as_str()
                        .unwrap_or("")
                        .contains("00-other.conflist")
            })
        },
    );
}

#[test]
fn addresses_of_pods_gone_without_a_del_are_collected() {
    let lab = Lab::up(
        "t-podgc",
        &["--nodes", "2", "--config", "WEFT_POD_GC_GRACE=2s"],
    );
    let root = lab.dir().join("node-1/root");
    let store = PodStore::new(root.join("var/lib/weft/ipam"));
    let held = || store.attached_pods().unwrap();
    // Live: a pod and its sandbox.
    lab.ok(&["pod", "add", "node-1", "web"]);
    // Force-deleted: the Pod is gone, its sandbox (and veth) is not.
    lab.ok(&["pod", "add", "node-1", "forced"]);
    lab.kubectl(&["delete", "pod", "forced"]);
    // Deleted without DEL: no Pod, no sandbox (the runtime crashed).
    lab.ok(&["pod", "add", "node-1", "crashed"]);
    lab.kubectl(&["delete", "pod", "crashed"]);
    let netns = meshlab::lab::pods::netns_name(&lab.name, "default", "crashed");
    assert!(std::process::Command::new("ip")
        .args(["netns", "del", &netns])
        .status()
        .unwrap()
        .success());
    // Never existed: an allocation an ADD made for a pod that never was.
    let blocks = NodeState::read(&root.join("run/weft/node.json"))
        .unwrap()
        .unwrap()
        .pod_cidrs;
    let ghost = Attachment {
        container_id: "ghost".into(),
        ifname: "eth0".into(),
    };
    let pod = PodRef {
        namespace: "default".into(),
        name: "ghost".into(),
    };
    store.allocate(&ghost, &blocks, Some(&pod)).unwrap();
    assert_eq!(held().len(), 4);

    wait_for(
        "the addresses of the crashed and the never-existing pod to be released",
        Duration::from_secs(30),
        || {
            let h = held();
            !h.contains_key("default/crashed") && !h.contains_key("default/ghost")
        },
    );
    // Another two collection periods: the others stay.
    std::thread::sleep(Duration::from_secs(2));
    let h = held();
    assert!(
        h.contains_key("default/web"),
        "a live pod's addresses went: {h:?}"
    );
    assert!(
        h.contains_key("default/forced"),
        "the addresses of a pod whose sandbox still runs went: {h:?}"
    );
}
