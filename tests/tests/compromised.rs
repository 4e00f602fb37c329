//! A compromised node can hurt only itself. The attacker is the **oldest**
//! node (the one age favoured when conflicts went to the older claim),
//! writing to the API with its own meshd's token — what a stolen node has —
//! never the lab's admin credentials.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{client, kubeconfig_with, node, pod_token, signal, wait_for, Lab};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PatchParams};
use serde_json::Value;

/// Annotations to set (a value) or remove (`None`).
type Patch = BTreeMap<String, Option<String>>;

/// Sets (a value) or removes (`None`) annotations on `attacker`'s own Node
/// with its own meshd's token: a merge patch, as meshd writes (kubectl
/// would GET first, which the token may not).
fn as_node(lab: &Lab, attacker: &str, annotations: &Patch) {
    let kubeconfig = kubeconfig_with(lab, &pod_token(lab, attacker), attacker);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let nodes: Api<Node> = Api::all(client(&kubeconfig).await);
        let patch = serde_json::json!({"metadata": {"annotations": annotations}});
        nodes
            .patch(
                attacker,
                &PatchParams::default(),
                &kube::api::Patch::Merge(patch),
            )
            .await
            .unwrap_or_else(|e| panic!("{attacker}'s token could not patch its own Node: {e}"));
    });
}

/// A Node's `weft.dev/` annotations, as anyone may read them.
fn published(lab: &Lab, name: &str) -> BTreeMap<String, String> {
    let node: Value =
        serde_json::from_str(&lab.kubectl(&["get", "node", name, "-o", "json"])).unwrap();
    node["metadata"]["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("weft.dev/"))
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

/// The nodes `name` has as peers, and each one's allowed IPs.
fn peers(lab: &Lab, name: &str) -> BTreeMap<String, Vec<String>> {
    node(&lab.status(), name)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let allowed = p["allowedIps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            (p["node"].as_str().unwrap_or("?").to_string(), allowed)
        })
        .collect()
}

fn excluded(lab: &Lab, on: &str, reason: &str) -> f64 {
    lab.metric(on, &format!("weft_excluded_nodes{{reason=\"{reason}\"}}"))
}

/// The oldest node copies, one at a time, what a younger node (node-3)
/// publishes: its next key with that key's proof and a switch in 2999 (the
/// attack that excluded its victim forever), its key with its proof, its
/// mesh address, its endpoint. Each time the attacker is the one refused
/// (or, for the endpoint, nobody is), and the victim keeps its peers, its
/// prefixes and its mesh address on every node: its pods and its
/// host-network traffic from its mesh address still get through.
#[test]
fn the_oldest_node_copying_a_younger_one_hurts_only_itself() {
    let lab = Lab::up("t-oldest", &["--nodes", "3"]);
    let created = |n: &str| {
        lab.kubectl(&[
            "get",
            "node",
            n,
            "-o",
            "jsonpath={.metadata.creationTimestamp}",
        ])
    };
    assert!(
        created("node-1") <= created("node-3"),
        "node-1 is not the oldest"
    );
    let victim = published(&lab, "node-3");
    let own = published(&lab, "node-1");
    let victim_mesh = victim["weft.dev/mesh-addresses"].clone();
    let victim_v4 = victim_mesh.split(',').next().unwrap().to_string();
    let target = lab.pod_addresses("node-2")[0].clone();
    let victim_pod = lab.pod_addresses("node-3")[0].clone();
    // The attacker holds node-1: its meshd would undo the edits.
    signal(common::pid_of_meshd(&lab, "node-1"), "-KILL");

    let copy = |keys: &[(&str, &str)]| -> Patch {
        keys.iter()
            .map(|(to, from)| (to.to_string(), Some(victim[*from].clone())))
            .collect()
    };
    let mut next_key = copy(&[
        ("weft.dev/next-public-key", "weft.dev/public-key"),
        ("weft.dev/next-key-proof", "weft.dev/key-proof"),
    ]);
    next_key.insert(
        "weft.dev/next-key-at".into(),
        Some("2999-01-01T00:00:00Z".into()),
    );
    let same =
        |keys: &[&'static str]| -> Vec<(&str, &str)> { keys.iter().map(|k| (*k, *k)).collect() };
    let attacks: Vec<(&str, Patch, Option<&str>)> = vec![
        ("its next key", next_key, Some("bad_key_proof")),
        (
            "its key",
            copy(&same(&["weft.dev/public-key", "weft.dev/key-proof"])),
            Some("bad_key_proof"),
        ),
        (
            "its mesh address",
            copy(&same(&["weft.dev/mesh-addresses"])),
            Some("bad_mesh_address"),
        ),
        ("its endpoint", copy(&same(&["weft.dev/endpoint"])), None),
    ];
    for (what, annotations, refused) in attacks {
        as_node(&lab, "node-1", &annotations);
        for on in ["node-2", "node-3"] {
            wait_for(
                &format!("{on} to judge node-1 copying {what}"),
                Duration::from_secs(10),
                || match refused {
                    Some(reason) => excluded(&lab, on, reason) == 1.0,
                    None => peers(&lab, on).contains_key("node-1"),
                },
            );
        }
        // The victim, seen from node-2: a peer with all its prefixes.
        let to_victim = peers(&lab, "node-2")
            .remove("node-3")
            .unwrap_or_else(|| panic!("copying {what}: node-2 dropped node-3"));
        assert!(
            to_victim.contains(&format!("{victim_v4}/32")),
            "copying {what}: node-3's mesh address is not node-3's on node-2: {to_victim:?}"
        );
        assert!(
            lab.reaches("node-2", &victim_pod),
            "copying {what}: node-2 lost node-3's pods"
        );
        // Host-network traffic from the victim's mesh address still gets
        // its replies (they went to the attacker when it could take it).
        let ping = lab.meshlab(&[
            "exec", "node-3", "--", "ping", "-n", "-c", "2", "-W", "2", "-I", &victim_v4, &target,
        ]);
        assert!(
            ping.status.success(),
            "copying {what}: node-3 from its mesh address gets no replies: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
        // And it keeps its address: nothing another node claims moves it.
        assert_eq!(
            published(&lab, "node-3")["weft.dev/mesh-addresses"],
            victim_mesh,
            "copying {what}: node-3 gave its mesh address up"
        );
        // The attacker takes its own annotations back.
        let mut restore: Patch = published(&lab, "node-1")
            .into_keys()
            .map(|k| (k, None))
            .collect();
        restore.extend(own.iter().map(|(k, v)| (k.clone(), Some(v.clone()))));
        as_node(&lab, "node-1", &restore);
        wait_for(
            &format!("node-2 to take node-1 back after {what}"),
            Duration::from_secs(10),
            || peers(&lab, "node-2").contains_key("node-1"),
        );
    }
}
