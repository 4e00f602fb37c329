//! Upgrades under traffic. Replacing the meshd container node by node (the
//! data plane container kept, as in an in-place container update) must
//! reset no pod connection and lose no packet; replacing one node's data
//! plane container must not reset TCP either, and its packet loss is
//! measured (docs/install.md, Upgrade).

mod common;

use std::process::Output;
use std::thread::JoinHandle;
use std::time::Duration;

use common::{run_bounded, wait_for, Lab};
use serde_json::Value;

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

/// Traffic from pod-1-1 to pod-2-1 while something happens: one TCP stream
/// (iperf3, rate-capped so the two cores are not its) and 20 pings a second.
struct Traffic {
    server: JoinHandle<Output>,
    client: JoinHandle<Output>,
    pings: JoinHandle<Output>,
    count: u32,
}

impl Traffic {
    fn start(lab: &Lab, seconds: u32) -> Traffic {
        let (_, _, ips) = lab
            .pods()
            .into_iter()
            .find(|(name, _, _)| name == "pod-2-1")
            .expect("pod-2-1");
        let (v4, v6) = (ips[0].clone(), ips[1].clone());
        let limit = Duration::from_secs(u64::from(seconds) + 60);
        let server = lab.command(&["pod", "exec", "pod-2-1", "--", "iperf3", "-s", "-1"]);
        let server = std::thread::spawn(move || run_bounded(server, limit));
        std::thread::sleep(Duration::from_millis(500));
        let t = seconds.to_string();
        let client = lab.command(&[
            "pod", "exec", "pod-1-1", "--", "iperf3", "-J", "-c", &v4, "-t", &t, "-b", "100M",
        ]);
        let client = std::thread::spawn(move || run_bounded(client, limit));
        let count = seconds * 20;
        let c = count.to_string();
        let pings = lab.command(&[
            "pod", "exec", "pod-1-1", "--", "ping", "-n", "-c", &c, "-i", "0.05", "-W", "1", &v6,
        ]);
        let pings = std::thread::spawn(move || run_bounded(pings, limit));
        std::thread::sleep(Duration::from_secs(2));
        Traffic {
            server,
            client,
            pings,
            count,
        }
    }

    /// (pings lost, TCP retransmits); panics if the TCP stream failed.
    fn finish(self) -> (u32, u64) {
        let client = self.client.join().unwrap();
        let report: Value = serde_json::from_slice(&client.stdout).unwrap_or(Value::Null);
        assert!(
            client.status.success() && report["error"].is_null(),
            "the TCP stream failed (reset?): {}\n{}",
            report["error"],
            String::from_utf8_lossy(&client.stderr)
        );
        let _ = self.server.join();
        let pings = self.pings.join().unwrap();
        let summary = String::from_utf8_lossy(&pings.stdout);
        let received: u32 = summary
            .split(", ")
            .find_map(|part| part.strip_suffix(" received"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ping summary:\n{summary}"));
        let retransmits = report["end"]["sum_sent"]["retransmits"]
            .as_u64()
            .unwrap_or(0);
        (self.count - received, retransmits)
    }
}

#[test]
fn meshd_replaced_node_by_node_resets_nothing_and_a_data_plane_restart_is_survived() {
    let lab = Lab::up("t-upgrade", &["--nodes", "3", "--pods-per-node", "1"]);

    // meshd rolled over every node, each ready before the next (a
    // DaemonSet's maxUnavailable 1), under traffic through nodes 1 and 2.
    let traffic = Traffic::start(&lab, 20);
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
    let traffic = Traffic::start(&lab, 20);
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
