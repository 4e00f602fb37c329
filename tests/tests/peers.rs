//! External peers (`WeftPeer`, `meshctl peer`): a laptop beyond the
//! fabric's router joins with stock `wg-quick` and the configuration
//! `meshctl peer` printed; it reaches pods on every node through its
//! gateway, is reached by them, is judged by NetworkPolicy by its address,
//! follows a failed-over or re-keyed gateway once the admin applies the
//! new configuration, and is cut off everywhere when removed. The
//! sentinel (plaintext 0) holds for all of it at teardown.

mod common;

use std::time::{Duration, Instant};

use common::{dataplane_pid, pid_of_meshd, pod_ips, signal, wait_for, Lab};

const PEER_V4: &str = "100.65.0.1";
const PEER_V6: &str = "fd64:77:70::1";

/// Whether `command` (argv) run in the peer's namespace succeeds.
fn from_peer(lab: &Lab, peer: &str, command: &[&str]) -> bool {
    lab.meshlab(&[&["peer", "exec", peer, "--"], command].concat())
        .status
        .success()
}

/// One ping from the peer answered (a few tries: the first may wait for
/// the handshake).
fn peer_reaches(lab: &Lab, peer: &str, target: &str) -> bool {
    (0..3).any(|_| from_peer(lab, peer, &["ping", "-n", "-c", "1", "-W", "2", target]))
}

fn pod_reaches(lab: &Lab, pod: &str, target: &str) -> bool {
    lab.meshlab(&[
        "pod", "exec", pod, "--", "ping", "-n", "-c", "1", "-W", "2", target,
    ])
    .status
    .success()
}

/// The gateway every node has chosen for `peer` (`meshctl peer list`).
fn gateway(lab: &Lab, peer: &str) -> Option<String> {
    let rows: serde_json::Value =
        serde_json::from_str(&lab.meshctl(&["peer", "list", "-o", "json"])).expect("json");
    let row = rows
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == peer)?;
    assert_eq!(row["state"], "accepted", "{row}");
    row["gateway"].as_str().map(str::to_string)
}

/// `wg show IFACE peers` on `node`'s interface: the keys it holds.
fn device_keys(lab: &Lab, node: &str) -> String {
    let k: usize = node.trim_start_matches("node-").parse().expect("node-K");
    let iface = meshlab::lab::topology::wg_interface(&lab.name, k);
    lab.ok(&["exec", node, "--", "wg", "show", &iface, "peers"])
}

/// The peer's configuration as `meshctl peer config` prints it now, applied
/// to its running interface as an admin would.
fn apply_current_config(lab: &Lab, peer: &str) {
    let path = lab.dir().join(format!("{peer}-new.conf"));
    let path = path.to_string_lossy();
    lab.meshctl(&["peer", "config", peer, "--output-file", &path]);
    lab.ok(&["peer", "apply", peer, "--config", &path]);
}

/// `meshlab peer add laptop` (meshctl makes the WeftPeer and its key): the
/// laptop reaches a pod on every node and every pod reaches it, in both
/// families, through the one gateway every node chose; NetworkPolicy
/// selects it by its address (allowed into one namespace, not another);
/// removed, its key is off the gateway within a second and it reaches
/// nothing.
#[test]
fn an_external_peer_reaches_pods_everywhere_and_is_judged_and_removed() {
    let lab = Lab::up("t-peer", &["--nodes", "3", "--pods-per-node", "1"]);
    lab.ok(&["peer", "add", "laptop"]);
    let gw = gateway(&lab, "laptop").expect("a gateway");
    // Every node computes the same status; one writes it.
    wait_for("the laptop's status", Duration::from_secs(10), || {
        status(&lab, "laptop") == ("True".into(), "Accepted".into(), gw.clone())
    });
    for pod in ["pod-1-1", "pod-2-1", "pod-3-1"] {
        let (v4, v6) = pod_ips(&lab, pod);
        assert!(peer_reaches(&lab, "laptop", &v4), "laptop -> {pod} {v4}");
        assert!(peer_reaches(&lab, "laptop", &v6), "laptop -> {pod} {v6}");
        assert!(pod_reaches(&lab, pod, PEER_V4), "{pod} -> laptop");
        assert!(pod_reaches(&lab, pod, PEER_V6), "{pod} -> laptop over IPv6");
    }
    // Only the gateway holds the laptop's key.
    let key = peer_key(&lab, "laptop");
    for node in ["node-1", "node-2", "node-3"] {
        assert_eq!(
            device_keys(&lab, node).contains(&key),
            node == gw,
            "{node} (gateway {gw})"
        );
    }

    // Policy identity: team-a admits the laptop's address, team-b only
    // another range.
    let mut web = Vec::new();
    for (ns, node) in [("team-a", "node-1"), ("team-b", "node-3")] {
        lab.kubectl(&["create", "namespace", ns]);
        let ips = lab.ok(&["pod", "add", node, "web", "--namespace", ns]);
        web.push(
            ips.split_whitespace()
                .next()
                .expect("an address")
                .to_string(),
        );
    }
    for ip in &web {
        assert!(peer_reaches(&lab, "laptop", ip), "{ip} before any policy");
    }
    let policy = |ns: &str, cidr: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: from-peers\n  namespace: {ns}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - ipBlock:\n        cidr: {cidr}\n"
        )
    };
    lab.create(
        "team-a.yaml",
        &policy("team-a", &format!("{PEER_V4}/32")),
        "{.metadata.name}",
    );
    lab.create(
        "team-b.yaml",
        &policy("team-b", "100.65.9.0/24"),
        "{.metadata.name}",
    );
    let (a, b) = (&web[0], &web[1]);
    wait_for(
        "team-b to refuse the laptop",
        Duration::from_secs(20),
        || !from_peer(&lab, "laptop", &["ping", "-n", "-c", "1", "-W", "1", b]),
    );
    assert!(peer_reaches(&lab, "laptop", a), "team-a admits the laptop");
    // ClusterNetworkPolicy `networks` select it too: an Admin Deny of its
    // address into team-a overrides the namespace's own admission.
    lab.create(
        "deny-laptop.yaml",
        &format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: no-laptop}}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: team-a}}}}}}\n  ingress:\n  - {{name: laptop, action: Deny, from: [{{networks: [{PEER_V4}/32]}}]}}\n"
        ),
        "{.metadata.name}",
    );
    wait_for(
        "the Admin Deny to shut the laptop out of team-a",
        Duration::from_secs(20),
        || !from_peer(&lab, "laptop", &["ping", "-n", "-c", "1", "-W", "1", a]),
    );

    // Removed: the gateway drops its key at once, and nothing answers.
    let removed = Instant::now();
    lab.meshctl(&["peer", "remove", "laptop"]);
    wait_for(
        "the gateway to drop the laptop's key",
        Duration::from_secs(1),
        || !device_keys(&lab, &gw).contains(&key),
    );
    eprintln!("laptop's key off {gw} after {:?}", removed.elapsed());
    let (v4, _) = pod_ips(&lab, "pod-1-1");
    assert!(
        !from_peer(&lab, "laptop", &["ping", "-n", "-c", "2", "-W", "1", &v4]),
        "a removed peer reaches nothing"
    );
}

/// A peer allowed one node's pods (`--reach`) gets only those, even when
/// it widens its own AllowedIPs and routes (its configuration is its to
/// change; its gateway's filter is not), while the cluster's own
/// connections to it are answered. Its key is replaced through `meshctl
/// keys rotate --peer` and revoked through `meshctl keys revoke --peer`,
/// the nodes' paths. No node itself is reached through an address in its
/// reach (a node's pod-block gateway address).
#[test]
fn a_peer_reaches_only_what_its_spec_allows_whatever_it_configures() {
    let lab = Lab::up("t-peer-reach", &["--nodes", "3", "--pods-per-node", "1"]);
    let config = lab.dir().join("kiosk.conf");
    let config = config.to_string_lossy();
    lab.meshctl(&[
        "peer",
        "add",
        "kiosk",
        "--reach",
        "198.19.1.0/24",
        "--output-file",
        &config,
    ]);
    lab.ok(&["peer", "add", "kiosk", "--config", &config]);
    let (allowed, _) = pod_ips(&lab, "pod-1-1");
    let (other, other6) = pod_ips(&lab, "pod-2-1");
    assert!(peer_reaches(&lab, "kiosk", &allowed));
    // Its reach holds node-1's pod block, and with it the node's own
    // address there (the pods' gateway): the node itself stays out.
    assert!(
        !from_peer(
            &lab,
            "kiosk",
            &["ping", "-n", "-c", "2", "-W", "1", "198.19.1.1"]
        ),
        "the kiosk reached node-1 itself at its pod-block address"
    );
    // The kiosk widens its side to every pod range.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lab.dir().join("lab.json")).expect("lab.json"),
    )
    .expect("lab.json");
    let iface = state["peers"][0]["interface"].as_str().unwrap().to_string();
    let gateway_key = lab.meshctl(&["peer", "config", "kiosk", "-o", "json"]);
    let gateway_key: serde_json::Value = serde_json::from_str(&gateway_key).unwrap();
    let gateway_key = gateway_key["gateway"]["publicKey"].as_str().unwrap();
    for command in [
        vec![
            "wg",
            "set",
            &iface,
            "peer",
            gateway_key,
            "allowed-ips",
            "198.19.0.0/16,fd98:19::/48",
        ],
        vec!["ip", "route", "replace", "198.19.0.0/16", "dev", &iface],
        vec![
            "ip",
            "-6",
            "route",
            "replace",
            "fd98:19::/48",
            "dev",
            &iface,
        ],
    ] {
        assert!(from_peer(&lab, "kiosk", &command), "{command:?}");
    }
    for target in [&other, &other6] {
        assert!(
            !from_peer(&lab, "kiosk", &["ping", "-n", "-c", "2", "-W", "1", target]),
            "the kiosk reached {target}, outside its reach"
        );
    }
    assert!(
        peer_reaches(&lab, "kiosk", &allowed),
        "still reaches its own"
    );
    assert!(
        pod_reaches(&lab, "pod-2-1", PEER_V4),
        "a pod's own connection to it is answered"
    );

    // Its key replaced (`meshctl keys rotate --peer`): the gateway holds
    // only the new one, and with the new configuration it reaches pods.
    let gw = gateway(&lab, "kiosk").expect("a gateway");
    let old_key = peer_key(&lab, "kiosk");
    let fresh = lab.dir().join("kiosk-rotated.conf");
    let fresh = fresh.to_string_lossy();
    lab.meshctl(&["keys", "rotate", "--peer", "kiosk", "--output-file", &fresh]);
    let new_key = peer_key(&lab, "kiosk");
    assert_ne!(new_key, old_key);
    wait_for(
        "the gateway to hold only the new key",
        Duration::from_secs(5),
        || {
            let held = device_keys(&lab, &gw);
            held.contains(&new_key) && !held.contains(&old_key)
        },
    );
    lab.ok(&["peer", "apply", "kiosk", "--config", &fresh]);
    assert!(peer_reaches(&lab, "kiosk", &allowed), "with its new key");

    // Revoked like a node's key: off its gateway within a second, and
    // judged revoked everywhere.
    let revoked = Instant::now();
    lab.meshctl(&["keys", "revoke", "--peer", "kiosk"]);
    wait_for(
        "the gateway to drop the revoked key",
        Duration::from_secs(1),
        || !device_keys(&lab, &gw).contains(&new_key),
    );
    eprintln!("kiosk's key revoked off {gw} after {:?}", revoked.elapsed());
    assert!(!from_peer(
        &lab,
        "kiosk",
        &["ping", "-n", "-c", "2", "-W", "1", &allowed]
    ));
    let list = lab.meshctl(&["peer", "list"]);
    assert!(
        list.contains("rejected: spec.publicKey is revoked"),
        "{list}"
    );
    wait_for(
        "the kiosk's status and Event",
        Duration::from_secs(10),
        || {
            status(&lab, "kiosk") == ("False".into(), "Revoked".into(), String::new())
                && lab.events().iter().any(|e| {
                    e["regarding"]["kind"] == "WeftPeer"
                        && e["regarding"]["name"] == "kiosk"
                        && e["reason"] == "WeftPeerNotInMesh"
                })
        },
    );
}

/// WeftPeer `name`'s Accepted condition (status, reason) and gateway, as
/// stored.
fn status(lab: &Lab, name: &str) -> (String, String, String) {
    let out = lab.kubectl(&[
        "get",
        "weftpeer",
        name,
        "-o",
        "jsonpath={.status.conditions[0].status} {.status.conditions[0].reason} {.status.gateway}",
    ]);
    let mut fields = out.split_whitespace().map(str::to_string);
    (
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
        fields.next().unwrap_or_default(),
    )
}

/// WeftPeer `name`'s public key (`meshctl peer list -o json`).
fn peer_key(lab: &Lab, name: &str) -> String {
    let rows: serde_json::Value =
        serde_json::from_str(&lab.meshctl(&["peer", "list", "-o", "json"])).expect("json");
    rows.as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .and_then(|r| r["publicKey"].as_str())
        .unwrap_or_else(|| panic!("no key for {name}: {rows}"))
        .to_string()
}

/// The laptop's gateway dies (meshd and data plane killed): every node
/// moves the laptop's addresses to the next gateway, `meshctl peer config`
/// names it, and once the admin applies that the laptop reaches pods
/// again. That gateway then rotates its key: `meshctl peer config` gives
/// the new one, and applied, the laptop's traffic carries on.
#[test]
fn a_dead_gateway_fails_over_and_a_rotated_one_is_followed() {
    let lab = Lab::up("t-peer-gw", &["--nodes", "3", "--pods-per-node", "1"]);
    lab.ok(&["peer", "add", "laptop"]);
    let first = gateway(&lab, "laptop").expect("a gateway");
    let survivors: Vec<String> = ["node-1", "node-2", "node-3"]
        .iter()
        .map(|n| n.to_string())
        .filter(|n| *n != first)
        .collect();
    let pod_on = |node: &str| format!("pod-{}-1", node.trim_start_matches("node-"));
    let (target, _) = pod_ips(&lab, &pod_on(&survivors[0]));
    assert!(peer_reaches(&lab, "laptop", &target));

    let data_plane = dataplane_pid(&lab, &first);
    signal(pid_of_meshd(&lab, &first), "-KILL");
    signal(i64::from(data_plane), "-KILL");
    let took = wait_for("the laptop's next gateway", Duration::from_secs(60), || {
        gateway(&lab, "laptop").is_some_and(|g| g != first)
    });
    let next = gateway(&lab, "laptop").unwrap();
    eprintln!("{first} killed: gateway {next} after {took:?}");
    assert!(survivors.contains(&next));
    apply_current_config(&lab, "laptop");
    for node in &survivors {
        let (v4, v6) = pod_ips(&lab, &pod_on(node));
        assert!(
            peer_reaches(&lab, "laptop", &v4),
            "laptop -> {node} via {next}"
        );
        assert!(
            peer_reaches(&lab, "laptop", &v6),
            "laptop -> {node} via {next}"
        );
    }

    let out = lab.meshctl(&["keys", "rotate", &next]);
    assert!(out.starts_with(&format!("{next}: rotated to ")), "{out}");
    apply_current_config(&lab, "laptop");
    for node in &survivors {
        let (v4, _) = pod_ips(&lab, &pod_on(node));
        assert!(
            peer_reaches(&lab, "laptop", &v4),
            "laptop -> {node} after {next} rotated"
        );
    }
}
