//! A compromised node can hurt only itself. The attacker is the **oldest**
//! node (the one age favoured when conflicts went to the older claim),
//! writing to the API with its own meshd's token — what a stolen node has —
//! never the lab's admin credentials.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    client, kubeconfig_with, kubelet_token, node, pod_token, signal, wait_for, Lab, FAST,
};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, PatchParams, PostParams};
use kube::Client;
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
    let passes = |on: &str| lab.metric(on, "weft_reconciles_total");
    for (what, annotations, refused) in attacks {
        let before: Vec<f64> = ["node-2", "node-3"].iter().map(|n| passes(n)).collect();
        as_node(&lab, "node-1", &annotations);
        for (on, before) in ["node-2", "node-3"].into_iter().zip(before) {
            // A pass after the change (a watch event), and its verdict.
            wait_for(
                &format!("{on} to judge node-1 copying {what}"),
                Duration::from_secs(10),
                || {
                    passes(on) > before
                        && match refused {
                            Some(reason) => excluded(&lab, on, reason) == 1.0,
                            None => peers(&lab, on).contains_key("node-1"),
                        }
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
        for on in ["node-2", "node-3"] {
            wait_for(
                &format!("{on} to take node-1 back after {what}"),
                Duration::from_secs(10),
                || {
                    peers(&lab, on).contains_key("node-1")
                        && ["bad_key_proof", "bad_mesh_address"]
                            .iter()
                            .all(|r| excluded(&lab, on, r) == 0.0)
                },
            );
        }
    }
}

/// A kube-rs client with `token` (one of `attacker`'s credentials).
fn token_client(lab: &Lab, attacker: &str, token: &str) -> (tokio::runtime::Runtime, Client) {
    let kubeconfig = kubeconfig_with(lab, token, &format!("{attacker}-{}", token.len()));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = runtime.block_on(client(&kubeconfig));
    (runtime, client)
}

/// A block claim as meshd writes one (see meshd's node_blocks).
fn claim(name: &str, node: &str, uid: &str, blocks: &str) -> ConfigMap {
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "namespace": "weft-system",
            "labels": {"weft.dev/block-claim": "true"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}],
        },
        "immutable": true,
        "data": {"node": node, "blocks": blocks},
    }))
    .unwrap()
}

/// node-1 replaces its own claim with one of `blocks` (delete, create:
/// what its token may do).
async fn claim_again(claims: &Api<ConfigMap>, uid: &str, blocks: &str) {
    claims
        .delete("weft-blocks-node-1", &Default::default())
        .await
        .expect("node-1 may delete its own claim");
    claims
        .create(
            &PostParams::default(),
            &claim("weft-blocks-node-1", "node-1", uid, blocks),
        )
        .await
        .expect("node-1 may make its own claim");
}

fn refused<T: std::fmt::Debug>(what: &str, result: kube::Result<T>, says: &str) {
    match result {
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains(says) => {}
        other => panic!("{what}: expected 403 saying {says:?}, got {other:?}"),
    }
}

/// With self-allocated blocks, the oldest node, with its own token, can
/// neither write another node's claim nor change or delete one, and a
/// claim of its own naming another node's blocks holds none of them: the
/// victim keeps its blocks and its traffic. A garbage claim of its own
/// holds nothing and stops no one: a revocation is applied everywhere
/// within a second and a new node joins.
#[test]
fn in_block_mode_a_node_takes_no_block_and_stops_no_one() {
    let lab = Lab::up(
        "t-claims",
        &[
            "--nodes",
            "4",
            "--self-allocated-blocks",
            "--pods-per-node",
            "1",
        ],
    );
    let victim_blocks = published(&lab, "node-2")["weft.dev/pod-cidrs"].clone();
    let victim_v4 = victim_blocks.split(',').next().unwrap().to_string();
    let uid = lab
        .kubectl(&["get", "node", "node-1", "-o", "jsonpath={.metadata.uid}"])
        .trim()
        .to_string();
    signal(common::pid_of_meshd(&lab, "node-1"), "-KILL");
    let (runtime, client) = token_client(&lab, "node-1", &pod_token(&lab, "node-1"));
    let claims: Api<ConfigMap> = Api::namespaced(client, "weft-system");
    // Its kubelet's credentials: they may change its Node, but not give it
    // pod ranges (which block claims yield to).
    let (_kubelet_runtime, kubelet) = token_client(&lab, "node-1", &kubelet_token(&lab, "node-1"));
    let as_kubelet: Api<Node> = Api::all(kubelet);
    let spec =
        serde_json::json!({"spec": {"podCIDRs": victim_blocks.split(',').collect::<Vec<_>>()}});
    runtime.block_on(async {
        refused(
            "the kubelet giving its Node node-2's blocks",
            as_kubelet
                .patch(
                    "node-1",
                    &PatchParams::default(),
                    &kube::api::Patch::Merge(&spec),
                )
                .await,
            "assigned by the control plane",
        );
    });
    let victim_uid = lab
        .kubectl(&["get", "node", "node-2", "-o", "jsonpath={.metadata.uid}"])
        .trim()
        .to_string();
    runtime.block_on(async {
        let post = PostParams::default();
        let forged = claim("weft-blocks-node-2", "node-2", &victim_uid, &victim_blocks);
        refused(
            "a claim in node-2's name",
            claims.create(&post, &forged).await,
            "its own block claim",
        );
        refused(
            "deleting node-2's claim",
            claims
                .delete("weft-blocks-node-2", &Default::default())
                .await,
            "its own block claim",
        );
        let mut own = claims
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|c| c.metadata.name.as_deref() == Some("weft-blocks-node-1"))
            .expect("node-1's claim");
        own.data
            .as_mut()
            .unwrap()
            .insert("blocks".into(), victim_blocks.clone());
        // RBAC grants no update; admission would refuse it too.
        refused(
            "rewriting its own claim",
            claims.replace("weft-blocks-node-1", &post, &own).await,
            "update",
        );
        // Its own claim, made anew with node-2's blocks: admitted, and
        // later than node-2's.
        claim_again(&claims, &uid, &victim_blocks).await;
    });
    let mut take = Patch::new();
    take.insert("weft.dev/pod-cidrs".into(), Some(victim_blocks.clone()));
    as_node(&lab, "node-1", &take);
    for on in ["node-2", "node-3"] {
        wait_for(
            &format!("{on} to refuse node-1's claim to node-2's blocks"),
            Duration::from_secs(10),
            || excluded(&lab, on, "pod_cidr_not_assigned") == 1.0,
        );
    }
    let to_victim = peers(&lab, "node-3")
        .remove("node-2")
        .expect("node-2 stays node-3's peer");
    assert!(
        to_victim.contains(&victim_v4),
        "node-2's block left node-2: {to_victim:?}"
    );
    assert!(lab.reaches("node-3", &lab.pod_addresses("node-2")[0]));

    // A garbage claim of its own: it holds nothing, and stops no one.
    runtime.block_on(claim_again(&claims, &uid, "garbage,{}"));
    let old = node(&lab.status(), "node-3")["publicKey"]
        .as_str()
        .unwrap()
        .to_string();
    let observers = ["node-2", "node-4"];
    let has_old = || {
        let status = lab.status();
        observers.iter().any(|n| {
            node(&status, n)["peers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["publicKey"] == old.as_str())
        })
    };
    signal(common::pid_of_meshd(&lab, "node-3"), "-KILL");
    lab.meshctl(&["keys", "revoke", "node-3"]);
    let took = wait_for(
        "node-2 and node-4 to drop node-3's revoked key",
        Duration::from_secs(5),
        || !has_old(),
    );
    assert!(
        took < Duration::from_secs(1),
        "the revoked key stayed {took:?}"
    );
    // A new Node joins (spec.podCIDRs assigned, its key proven): every
    // node still judging peers it at once.
    let held: Vec<String> = ["node-1", "node-2", "node-3", "node-4"]
        .iter()
        .flat_map(|n| published(&lab, n).get("weft.dev/pod-cidrs").cloned())
        .collect();
    let free = (200..=255)
        .map(|b| format!("198.19.{b}.0/24"))
        .find(|c| !held.iter().any(|h| h.contains(c.as_str())))
        .expect("a free block");
    common::Hostile::valid("joiner", &free, "").register(&lab);
    let took = wait_for(
        "node-2 and node-4 to peer with the joiner",
        Duration::from_secs(5),
        || {
            observers
                .iter()
                .all(|n| peers(&lab, n).contains_key("joiner"))
        },
    );
    assert!(took < Duration::from_secs(1), "the join took {took:?}");
}

/// The node's kubelet credentials (NodeRestriction lets a kubelet change
/// its own Node's annotations) write no Weft annotation: not the admin's
/// force-endpoint or rotate-requested, not meshd's; anything else on its
/// Node they still may.
#[test]
fn the_kubelet_writes_no_weft_annotation() {
    let lab = Lab::up("t-kubelet", &["--nodes", "2"]);
    let (runtime, kubelet) = token_client(&lab, "node-1", &kubelet_token(&lab, "node-1"));
    let nodes: Api<Node> = Api::all(kubelet);
    let patch = |annotations: serde_json::Value| {
        kube::api::Patch::Merge(serde_json::json!({"metadata": {"annotations": annotations}}))
    };
    runtime.block_on(async {
        let pp = PatchParams::default();
        for (key, value) in [
            ("weft.dev/force-endpoint", "none"),
            ("weft.dev/rotate-requested", "2026-12-06T12:00:00Z"),
            ("weft.dev/endpoint", "198.18.1.99:51820"),
        ] {
            refused(
                &format!("the kubelet setting {key}"),
                nodes
                    .patch("node-1", &pp, &patch(serde_json::json!({key: value})))
                    .await,
                "written only by that node's Weft agent and by cluster admins",
            );
        }
        refused(
            "the kubelet removing weft.dev/public-key",
            nodes
                .patch(
                    "node-1",
                    &pp,
                    &patch(serde_json::json!({"weft.dev/public-key": null})),
                )
                .await,
            "written only by that node's Weft agent and by cluster admins",
        );
        nodes
            .patch(
                "node-1",
                &pp,
                &patch(serde_json::json!({"example.com/owner": "me"})),
            )
            .await
            .expect("the kubelet may change its Node's other annotations");
    });
    let annotations = published(&lab, "node-1");
    assert!(!annotations.contains_key("weft.dev/force-endpoint"));
    assert!(annotations.contains_key("weft.dev/public-key"));
}

/// The oldest node's kubelet lists other addresses as its own (its Node's
/// `status.addresses`, which a kubelet writes): another node's, the API
/// server's and an outside host's. None draws pods' traffic to it: an
/// address counts for a node only where the node is heard from (its
/// authenticated WireGuard packets come from there), and the attacker is
/// heard from its own address only. Nor does the copy take node-2's
/// address from node-2: pods still reach it through the mesh, never in
/// plaintext (with host encryption, its answers too).
#[test]
fn the_oldest_node_listing_others_addresses_draws_no_pod_traffic() {
    use meshlab::lab::topology::{wg_interface, FABRIC_GATEWAY, OUTSIDE_HOST};
    let lab = Lab::up("t-hostaddr", &["--nodes", "3", "--pods-per-node", "1"]);
    let (fabric, outside) = (FABRIC_GATEWAY.to_string(), OUTSIDE_HOST.to_string());
    let stolen = ["198.18.1.2", fabric.as_str(), outside.as_str()];
    let (runtime, kubelet) = token_client(&lab, "node-1", &kubelet_token(&lab, "node-1"));
    let nodes: Api<Node> = Api::all(kubelet);
    let addresses: Vec<Value> = std::iter::once("198.18.1.1")
        .chain(stolen)
        .map(|a| serde_json::json!({"type": "InternalIP", "address": a}))
        .collect();
    runtime
        .block_on(nodes.patch_status(
            "node-1",
            &PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {"addresses": addresses}})),
        ))
        .expect("a kubelet may write its own Node's addresses");
    // node-3 has planned with node-1's new addresses once it synced again.
    let synced = lab.metric("node-3", "weft_reconciles_total");
    wait_for(
        "node-3 to plan with node-1's new addresses",
        Duration::from_secs(30),
        || lab.metric("node-3", "weft_reconciles_total") > synced,
    );
    let routes = lab.host_routes("node-3");
    for address in [fabric.as_str(), outside.as_str()] {
        assert!(
            !routes.contains(&format!("{address} ")),
            "node-3 routes {address} into the mesh:\n{routes}"
        );
    }
    for own in ["198.18.1.1 ", "198.18.1.2 "] {
        assert!(
            routes.contains(own),
            "node-3 no longer tunnels {own}:\n{routes}"
        );
    }
    let attacker = (format!("{}-node-1", lab.name), wg_interface(&lab.name, 1));
    for address in stolen {
        let ping = [
            "pod", "exec", "pod-3-1", "--", "ping", "-n", "-c", "2", "-W", "2", address,
        ];
        let (answered, source) = lab.first_echo(&attacker.0, &attacker.1, &ping);
        assert!(answered, "pod-3-1's ping to {address} got no answer");
        assert_eq!(
            source, "",
            "the attacker received pod-3-1's ping to {address}"
        );
    }
    drop(runtime);
}

/// Sends, from `netns`, one plaintext UDP datagram `src → dst:9` in an
/// Ethernet frame to `mac` on `iface` (AF_PACKET: no route of the sender's
/// is asked), as a forger on the underlay would.
const FORGE_UDP: &str = "import socket,struct,sys
iface,mac,src,dst=sys.argv[1:5]
ip=struct.pack('!BBHHHBBH4s4s',0x45,0,28,0,0,64,17,0,socket.inet_aton(src),socket.inet_aton(dst))
s=sum(struct.unpack('!10H',ip));s=(s>>16)+(s&0xffff);s+=s>>16
ip=ip[:10]+struct.pack('!H',~s&0xffff)+ip[12:]
udp=struct.pack('!HHHH',4242,9,8,0)
r=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)
r.bind((iface,0))
for _ in range(5): r.send(bytes.fromhex(mac.replace(':',''))+b'\\x02\\x00\\x00\\x00\\x00\\x01'+b'\\x08\\x00'+ip+udp)";

/// The oldest node, forging on the underlay, sends plaintext datagrams to
/// node-3 as if from a pod of node-2's (and from a mesh address): node-3
/// drops them on arrival (the source guard), so no pod's NetworkPolicy
/// ever judges a forged peer, and none arrives. From node-2's pod itself,
/// through the mesh, the same datagram does arrive.
#[test]
fn datagrams_forged_with_cluster_sources_on_the_underlay_are_dropped() {
    let lab = Lab::up("t-forgedsrc", &["--nodes", "3", "--pods-per-node", "1"]);
    let ip_of = |pod: &str| {
        lab.pods()
            .into_iter()
            .find(|(name, _, _)| name.ends_with(pod))
            .map(|(_, _, ips)| ips[0].clone())
            .unwrap_or_else(|| panic!("{pod}"))
    };
    let (victim, posed) = (ip_of("pod-3-1"), ip_of("pod-2-1"));
    let no_ports = || -> u64 {
        let text = lab.ok(&["pod", "exec", "pod-3-1", "--", "cat", "/proc/net/snmp"]);
        let mut rows = text.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
        let i = names
            .split_whitespace()
            .position(|n| n == "NoPorts")
            .unwrap();
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    };
    let node3_mac = {
        let link = lab.ok(&["exec", "node-3", "--", "ip", "-o", "link", "show", "eth0"]);
        link.split("link/ether ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect("node-3's MAC")
            .to_string()
    };
    let before = no_ports();
    for src in [posed.as_str(), "198.18.128.129"] {
        lab.ok(&[
            "exec",
            "node-1",
            "--",
            "/usr/bin/python3",
            "-c",
            FORGE_UDP,
            "eth0",
            &node3_mac,
            src,
            &victim,
        ]);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        no_ports(),
        before,
        "a forged cluster source reached pod-3-1"
    );
    // The forgeries were plaintext on the fabric by design.
    lab.reset_plaintext();
    // The real pod, through the mesh: it arrives (the probe can fail).
    let send = format!("import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.sendto(b'x',('{victim}',9))");
    lab.ok(&[
        "pod",
        "exec",
        "pod-2-1",
        "--",
        "/usr/bin/python3",
        "-c",
        &send,
    ]);
    wait_for("pod-2-1's datagram", Duration::from_secs(5), || {
        no_ports() > before
    });
}

/// The oldest node claims, with its own meshd's token and its kubelet's,
/// that it is at the API server's address (its endpoint annotation and its
/// addresses), and falls silent (its meshd and data plane stopped: no
/// packet of its contradicts the claim). node-3 writes the claimed endpoint
/// into its device, whose endpoint then reads as the claim, yet never
/// routes pods' traffic for that address to node-1: a node is heard from
/// an address only once a packet of its arrived after the write.
#[test]
fn the_oldest_node_claiming_an_endpoint_is_not_believed_there() {
    use meshlab::lab::topology::{wg_interface, FABRIC_GATEWAY};
    let lab = Lab::up("t-claimep", &["--nodes", "3", "--pods-per-node", "1"]);
    let claimed = FABRIC_GATEWAY.to_string();
    wait_for(
        "node-3 to hear node-1 at its own address",
        Duration::from_secs(30),
        || lab.host_routes("node-3").contains("198.18.1.1 "),
    );
    let stopped: Vec<i32> = lab
        .processes("node-1")
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    for pid in &stopped {
        signal(i64::from(*pid), "-STOP");
    }
    as_node(
        &lab,
        "node-1",
        &[(
            "weft.dev/endpoint".to_string(),
            Some(format!("{claimed}:51820")),
        )]
        .into(),
    );
    let (runtime, kubelet) = token_client(&lab, "node-1", &kubelet_token(&lab, "node-1"));
    let addresses = serde_json::json!({"status": {"addresses": [
        {"type": "InternalIP", "address": "198.18.1.1"},
        {"type": "InternalIP", "address": claimed},
    ]}});
    runtime
        .block_on(Api::<Node>::all(kubelet).patch_status(
            "node-1",
            &PatchParams::default(),
            &kube::api::Patch::Merge(addresses),
        ))
        .expect("a kubelet may write its own Node's addresses");
    let iface = wg_interface(&lab.name, 3);
    let written = || {
        lab.ok(&["exec", "node-3", "--", "wg", "show", &iface, "endpoints"])
            .contains(&format!("{claimed}:51820"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let mut seen_written = false;
    while std::time::Instant::now() < deadline {
        let routes = lab.host_routes("node-3");
        assert!(
            !routes.contains(&format!("{claimed} ")),
            "node-3 routes {claimed} to node-1 on its claim alone:\n{routes}"
        );
        seen_written |= written();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen_written,
        "node-3 never wrote the claimed endpoint: the test cannot tell"
    );
    for pid in &stopped {
        signal(i64::from(*pid), "-CONT");
    }
    drop(runtime);
}

/// The oldest node, with its own meshd's token, lies about reaching nodes
/// (docs/routing.md): it says it sees a public node (node-2) behind NAT
/// and the NAT'd nodes (node-4, node-5) at its own address, that it is
/// itself behind NAT at node-2's address, that its own addresses are
/// node-2's, node-3's and the API server's, and that it gave up on node-2's
/// endpoint. One observer is no quorum: node-2 stays public; the NAT'd
/// nodes are sent where the honest public nodes see them, and still meet
/// each other directly through their NATs; node-2 and node-3 still meet on
/// their private network; nobody's traffic, pods' or hosts', goes to the
/// attacker for an address or prefix that is not its own (peers try its
/// false addresses sealed to its key, get no answer there and give them
/// up); and nothing crosses the fabric in plaintext.
#[test]
fn the_oldest_node_lying_about_where_nodes_are_draws_nothing() {
    use common::{carrier, endpoint_of, pod_cidrs_of, pod_ips, reply_ttl, sites_lab};
    let lab = sites_lab(
        "t-liar",
        "sites:
- {name: cloud, nodes: 3, region: eu, lan: true}
- {name: edge-a, nodes: 1, nat: masquerade}
- {name: edge-b, nodes: 1, nat: masquerade}
",
        &FAST,
    );
    let bound = Duration::from_secs(30);
    let nat_of = |n: &str| published(&lab, n).get("weft.dev/nat").cloned();
    for (n, at) in [
        ("node-4", "198.18.14.3:51820"),
        ("node-5", "198.18.14.5:51820"),
    ] {
        wait_for(&format!("{n} to learn its NAT"), bound, || {
            nat_of(n).as_deref() == Some(&format!("eim {at}"))
        });
    }
    let direct = |a: &str, b: &str| {
        let (v4, _) = pod_ips(&lab, &format!("pod-{}-1", &b[5..]));
        carrier(&lab, a, b).as_deref() == Some(b)
            && reply_ttl(&lab, &format!("pod-{}-1", &a[5..]), &v4) == Some(62)
    };
    let pairs = [
        ("node-2", "node-3"),
        ("node-4", "node-5"),
        ("node-2", "node-4"),
        ("node-3", "node-5"),
    ];
    for (a, b) in pairs {
        wait_for(&format!("{a} and {b} to meet directly"), bound, || {
            direct(a, b) && direct(b, a)
        });
    }
    assert_eq!(endpoint_of(&lab, "node-2", "node-3"), "10.77.0.3:51820");

    // The attacker holds node-1: its meshd would undo the edits.
    signal(common::pid_of_meshd(&lab, "node-1"), "-KILL");
    let lies: Patch = [
        (
            "weft.dev/observed",
            "node-2=198.18.14.99:51820,node-4=198.18.16.1:51820,node-5=198.18.16.1:51820",
        ),
        ("weft.dev/nat", "eim 198.18.16.2:51820"),
        (
            "weft.dev/candidates",
            "10.77.0.2:51820,198.18.16.3:51820,198.18.0.1:51820",
        ),
        ("weft.dev/given-up", "node-2=198.18.16.2:51820"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Some(v.to_string())))
    .collect();
    as_node(&lab, "node-1", &lies);

    // What no node may route to node-1: other nodes' pod CIDRs and the
    // addresses it claims.
    let honest = ["node-2", "node-3", "node-4", "node-5"];
    let mut not_its = pod_cidrs_of(&lab, &honest);
    not_its.extend(
        ["10.77.0.2", "198.18.16.2", "198.18.16.3", "198.18.0.1"].map(|a| format!("{a}/32")),
    );
    // Past the peers' trials of the false addresses (a trial lasts 2
    // keepalives + 5 s), checked all along.
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until {
        for n in honest {
            let to_attacker = peers(&lab, n).remove("node-1").unwrap_or_default();
            let drawn: Vec<&String> = to_attacker.iter().filter(|a| not_its.contains(a)).collect();
            assert!(drawn.is_empty(), "{n} routes {drawn:?} to node-1");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // One observer is no quorum: node-2 keeps its endpoint.
    let node2 = published(&lab, "node-2");
    assert_eq!(
        node2.get("weft.dev/endpoint").map(String::as_str),
        Some("198.18.16.2:51820")
    );
    assert_eq!(node2.get("weft.dev/nat"), None, "node-2 taken for NAT'd");
    // The NAT'd nodes are where the honest nodes see them, and meet each
    // other there.
    for (n, at) in [
        ("node-4", "198.18.14.3:51820"),
        ("node-5", "198.18.14.5:51820"),
    ] {
        assert_eq!(nat_of(n).as_deref(), Some(format!("eim {at}").as_str()));
        for from in ["node-2", "node-3"] {
            assert_eq!(endpoint_of(&lab, from, n), at, "{from} sends {n}'s traffic");
        }
    }
    assert_eq!(endpoint_of(&lab, "node-4", "node-5"), "198.18.14.5:51820");
    for (a, b) in pairs {
        assert!(direct(a, b) && direct(b, a), "{a} and {b} no longer direct");
    }
    assert_eq!(endpoint_of(&lab, "node-2", "node-3"), "10.77.0.3:51820");
}

/// With only two public nodes, the oldest is every NAT's second vote.
/// Lying (other ports for the NAT'd nodes, so that their NATs look
/// symmetric) or keeping quiet (no quorum left), it still cannot make the
/// two NAT'd nodes relay — through itself, where it would read their
/// traffic — nor cost them their direct link for a moment: they keep the
/// addresses they answered at, among those the honest public node sees.
#[test]
fn with_two_public_nodes_the_oldest_cannot_make_nat_pairs_relay() {
    use common::{carrier, pod_cidrs_of, pod_ips, reply_ttl, sites_lab};
    let lab = sites_lab(
        "t-veto",
        "sites:
- {name: cloud, nodes: 2}
- {name: edge-a, nodes: 1, nat: masquerade}
- {name: edge-b, nodes: 1, nat: masquerade}
",
        &FAST,
    );
    let bound = Duration::from_secs(30);
    for (n, at) in [
        ("node-3", "198.18.14.3:51820"),
        ("node-4", "198.18.14.5:51820"),
    ] {
        wait_for(&format!("{n} to learn its NAT"), bound, || {
            published(&lab, n).get("weft.dev/nat").map(String::as_str) == Some(&format!("eim {at}"))
        });
    }
    let direct = || {
        carrier(&lab, "node-3", "node-4").as_deref() == Some("node-4")
            && carrier(&lab, "node-4", "node-3").as_deref() == Some("node-3")
    };
    // Settled: neither reports the other down (a pair that met only after
    // its first peer timeout is down until heard for one more).
    let settled = || {
        direct()
            && ["node-3", "node-4"]
                .iter()
                .all(|n| !published(&lab, n).contains_key("weft.dev/unreachable"))
    };
    wait_for("node-3 and node-4 to meet directly", bound, settled);
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < until {
        assert!(direct(), "node-3 and node-4 flap before any lie");
        std::thread::sleep(Duration::from_millis(250));
    }
    let natd_cidrs = pod_cidrs_of(&lab, &["node-3", "node-4"]);

    signal(common::pid_of_meshd(&lab, "node-1"), "-KILL");
    let lie = |v: Option<&str>| -> Patch {
        [("weft.dev/observed".to_string(), v.map(String::from))].into()
    };
    for (what, patch) in [
        (
            "other ports",
            lie(Some("node-3=198.18.14.3:40001,node-4=198.18.14.5:40001")),
        ),
        ("quiet", lie(None)),
    ] {
        as_node(&lab, "node-1", &patch);
        // Past a trial window (7 s) and a peer timeout, checked all along.
        let until = std::time::Instant::now() + Duration::from_secs(12);
        while std::time::Instant::now() < until {
            assert!(
                direct(),
                "{what}: node-3 and node-4 no longer meet directly"
            );
            for n in ["node-2", "node-3", "node-4"] {
                let to_attacker = peers(&lab, n).remove("node-1").unwrap_or_default();
                assert!(
                    !to_attacker.iter().any(|a| natd_cidrs.contains(a)),
                    "{what}: {n} relays a NAT'd node's pods through node-1: {to_attacker:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let (v4, _) = pod_ips(&lab, "pod-4-1");
    assert_eq!(reply_ttl(&lab, "pod-3-1", &v4), Some(62), "direct");
}

/// ClusterNetworkPolicy `nodes` peers against the oldest node's kubelet,
/// which may write its own Node's labels and addresses. It labels itself
/// for an Admin Accept to edge nodes and lists node-3's address as its
/// own: that address, now doubtful, is neither accepted (an Accept counts
/// only addresses one Node alone lists) nor taken out of the Deny that
/// covers node-3 (a Deny counts doubtful ones). Its own address is
/// accepted, as its new label says.
#[test]
fn the_oldest_node_claiming_another_nodes_address_opens_no_cluster_policy() {
    let lab = Lab::up("t-cnpnodes", &["--nodes", "3"]);
    lab.ok(&["pod", "add", "node-2", "a", "--namespace", "x"]);
    let pings = |target: &str| {
        lab.meshlab(&["pod", "exec", "x/a", "--", "ping", "-c1", "-W1", target])
            .status
            .success()
    };
    let outside = meshlab::lab::topology::OUTSIDE_HOST.to_string();
    let (attacker, victim) = ("198.18.1.1", "198.18.1.3");
    for target in [attacker, victim, &outside] {
        wait_for(
            &format!("x/a to reach {target}"),
            Duration::from_secs(10),
            || pings(target),
        );
    }
    lab.kubectl(&["label", "node", "node-1", "node-3", "role=infra"]);
    lab.create(
        "nodes.yaml",
        &"apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: infra}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
  - {name: edge, action: Accept, to: [{nodes: {matchLabels: {edge: 'true'}}}]}
  - {name: infra, action: Deny, to: [{nodes: {matchLabels: {role: infra}}}]}
  - {name: outside, action: Deny, to: [{networks: [OUTSIDE/32]}]}
"
        .replace("OUTSIDE", &outside),
        "{.metadata.name}",
    );
    wait_for(
        "the infra nodes and the outside host to be denied",
        Duration::from_secs(10),
        || !pings(attacker) && !pings(victim) && !pings(&outside),
    );
    let (runtime, kubelet) = token_client(&lab, "node-1", &kubelet_token(&lab, "node-1"));
    let nodes: Api<Node> = Api::all(kubelet);
    let merge = |patch: Value| kube::api::Patch::Merge(patch);
    runtime
        .block_on(nodes.patch(
            "node-1",
            &PatchParams::default(),
            &merge(serde_json::json!({"metadata": {"labels": {"edge": "true"}}})),
        ))
        .expect("a kubelet may label its own Node");
    let addresses = [attacker, victim, outside.as_str()]
        .map(|a| serde_json::json!({"type": "InternalIP", "address": a}));
    runtime
        .block_on(nodes.patch_status(
            "node-1",
            &PatchParams::default(),
            &merge(serde_json::json!({"status": {"addresses": addresses}})),
        ))
        .expect("a kubelet may write its own Node's addresses");
    wait_for(
        "the edge-labelled attacker to be accepted",
        Duration::from_secs(10),
        || pings(attacker),
    );
    for _ in 0..10 {
        assert!(
            !pings(victim),
            "the attacker's claim opened node-3's address to x/a"
        );
        assert!(
            !pings(&outside),
            "the attacker's claim opened {outside} to x/a"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(runtime);
}
