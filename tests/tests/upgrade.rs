//! Upgrades under traffic. Replacing the meshd container node by node (the
//! data plane container kept, as in an in-place container update) must
//! reset no pod connection and lose no packet; replacing one node's data
//! plane container must not reset TCP either, and its packet loss is
//! measured (docs/install.md, Upgrade).

mod common;

use std::time::Duration;

use common::{wait_for, Lab, Traffic};

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

#[test]
fn meshd_replaced_node_by_node_resets_nothing_and_a_data_plane_restart_is_survived() {
    let lab = Lab::up("t-upgrade", &["--nodes", "3", "--pods-per-node", "1"]);

    // meshd rolled over every node, each ready before the next (a
    // DaemonSet's maxUnavailable 1), under traffic through nodes 1 and 2.
    let traffic = Traffic::start(&lab, "pod-1-1", "pod-2-1", 20);
    for node in NODES {
        lab.ok(&["container", "restart", node, "meshd"]);
        wait_for(
            &format!("the new meshd on {node} to sync"),
            Duration::from_secs(15),
            || {
                lab.try_metric(node, "weft_reconciles_total")
                    .is_some_and(|n| n >= 1.0)
            },
        );
        // It adopted the running data plane rather than making a new one.
        assert_eq!(
            lab.metric(node, "weft_dataplane_starts_total"),
            0.0,
            "{node}"
        );
    }
    let (lost, retransmits) = traffic.finish();
    eprintln!("meshd rollout: {lost} pings lost, {retransmits} TCP retransmits");
    assert_eq!(lost, 0, "pings were lost while meshd was replaced");

    // node-1's data plane container replaced: the device goes with its
    // process, the backstops hold the traffic (dropped, never leaked), a new
    // data plane comes up and meshd configures it from scratch.
    let traffic = Traffic::start(&lab, "pod-1-1", "pod-2-1", 20);
    lab.ok(&["container", "restart", "node-1", "dataplane"]);
    wait_for(
        "meshd to configure the new data plane",
        Duration::from_secs(15),
        || lab.metric("node-1", "weft_dataplane_starts_total") >= 1.0,
    );
    let (lost, retransmits) = traffic.finish();
    eprintln!(
        "data plane restart: {lost} of 400 pings lost (50 ms apart), {retransmits} TCP retransmits"
    );
    // Bounded: the restart costs well under two seconds of traffic.
    assert!(lost <= 40, "{lost} pings lost across a data plane restart");
}
