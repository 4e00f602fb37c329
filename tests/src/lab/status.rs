//! `meshlab status`: what the lab is made of, from `lab.json`, with each
//! node's labels and pod CIDRs read live from its Node object. The JSON form
//! is a documented interface (docs/lab.md) for scripts.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::ResourceExt;
use serde::Serialize;

use weft_meshd::annotations::{MESH_ADDRESSES, POD_CIDRS, PUBLIC_KEY};
use weft_meshd::cluster::ZONE_LABEL;

use super::mesh::{self, PeerReport};
use super::pods::PodRecord;
use super::state::{process_alive, LabDir};
use super::{agents, client};

/// `meshlab status --json`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub name: String,
    pub runtime_dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub node_kubeconfig: PathBuf,
    pub api_server: ApiServerReport,
    pub fabric: FabricReport,
    pub nodes: Vec<NodeReport>,
    pub pods: Vec<PodRecord>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiServerReport {
    pub url: String,
    pub fabric_url: String,
    pub pid: i32,
    pub running: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FabricReport {
    pub netns: String,
    pub bridge: String,
    pub cidr: String,
    /// Frames the plaintext sentinel counted: cluster pod or mesh addresses
    /// outside WireGuard on the underlay. Anything but 0 is a leak.
    pub plaintext: Option<super::sentinel::Count>,
    /// Frames between two nodes' host addresses that are not WireGuard's:
    /// host traffic in plaintext (0 expected with `WEFT_ENCRYPT_HOST`).
    pub host_plaintext: Option<super::sentinel::Count>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub name: String,
    pub netns: String,
    pub underlay: Ipv4Addr,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNet>,
    pub labels: BTreeMap<String, String>,
    /// Whether the Node object exists in the API (false if it was deleted,
    /// or the API server is down).
    pub registered: bool,
    pub wg_interface: String,
    /// As the node publishes them (`weft.dev/mesh-addresses`).
    pub mesh_addresses: Vec<String>,
    pub public_key: Option<String>,
    pub meshd: MeshdReport,
    /// Read from the node's data plane (UAPI), not from meshd.
    pub peers: Vec<PeerReport>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshdReport {
    pub pid: Option<i32>,
    pub running: bool,
}

/// Reads the lab's state and the live Node objects.
pub fn collect(dir: &LabDir) -> Result<Report> {
    let state = dir.running_state()?;
    let running = process_alive(state.api_server.pid, &dir.path());
    let live: BTreeMap<String, Node> = if running {
        client::block_on(dir, |client| async move {
            let nodes: Api<Node> = Api::all(client);
            let list = tokio::time::timeout(
                super::scaled(Duration::from_secs(5)),
                nodes.list(&ListParams::default()),
            )
            .await??;
            Ok(list.items.into_iter().map(|n| (n.name_any(), n)).collect())
        })?
    } else {
        BTreeMap::new()
    };
    let keys: BTreeMap<String, String> = live
        .values()
        .filter_map(|n| Some((n.annotations().get(PUBLIC_KEY)?.clone(), n.name_any())))
        .collect();
    let nodes = state
        .plan
        .nodes
        .iter()
        .map(|n| {
            let node = live.get(&n.name);
            let annotation = |key: &str| node.and_then(|o| o.annotations().get(key).cloned());
            let mut peers = mesh::read(n).map(|(_, p)| p).unwrap_or_default();
            for p in &mut peers {
                p.node = keys.get(&p.public_key).cloned();
            }
            let pid = agents::pid(dir, n);
            let spec_cidrs: Vec<IpNet> = node
                .and_then(|o| o.spec.as_ref()?.pod_cidrs.as_ref())
                .map(|c| c.iter().filter_map(|s| s.parse().ok()).collect())
                .unwrap_or_default();
            // Self-allocated blocks are only in the node's annotations.
            let pod_cidrs = match (
                spec_cidrs.is_empty(),
                annotation(POD_CIDRS),
                state.plan.self_allocated,
            ) {
                (false, _, _) => spec_cidrs,
                (true, Some(a), _) => a.split(',').filter_map(|c| c.parse().ok()).collect(),
                (true, None, true) => Vec::new(),
                (true, None, false) => n.pod_cidrs.clone(),
            };
            NodeReport {
                name: n.name.clone(),
                netns: n.netns.clone(),
                underlay: n.underlay,
                pod_cidrs,
                labels: node.map_or_else(|| n.labels.clone(), |o| o.labels().clone()),
                registered: node.is_some(),
                wg_interface: n.wg_interface.clone(),
                mesh_addresses: annotation(MESH_ADDRESSES)
                    .map(|v| v.split(',').map(str::to_string).collect())
                    .unwrap_or_default(),
                public_key: annotation(PUBLIC_KEY),
                meshd: MeshdReport {
                    pid,
                    running: pid.is_some(),
                },
                peers,
            }
        })
        .collect();
    Ok(Report {
        name: dir.name.clone(),
        runtime_dir: dir.path(),
        kubeconfig: dir.kubeconfig(),
        node_kubeconfig: dir.node_kubeconfig(),
        api_server: ApiServerReport {
            url: state.api_server.url,
            fabric_url: state.api_server.fabric_url,
            pid: state.api_server.pid,
            running,
        },
        fabric: FabricReport {
            plaintext: super::sentinel::count(&state.plan.fabric_netns).ok(),
            host_plaintext: super::sentinel::count_host(&state.plan.fabric_netns).ok(),
            netns: state.plan.fabric_netns,
            bridge: state.plan.bridge,
            cidr: state.plan.fabric_cidr.to_string(),
        },
        nodes,
        pods: state.pods,
    })
}

/// The human table.
pub fn table(r: &Report) -> String {
    let mut rows = vec![[
        "NODE".to_string(),
        "NETNS".into(),
        "UNDERLAY".into(),
        "POD CIDRS".into(),
        "ZONE".into(),
        "MESH ADDRESSES".into(),
        "MESHD".into(),
        "PEERS (handshaken/configured)".into(),
    ]];
    for n in &r.nodes {
        let cidrs: Vec<String> = n.pod_cidrs.iter().map(ToString::to_string).collect();
        rows.push([
            n.name.clone(),
            n.netns.clone(),
            n.underlay.to_string(),
            cidrs.join(","),
            n.labels.get(ZONE_LABEL).cloned().unwrap_or_default(),
            n.mesh_addresses.join(","),
            match (n.registered, n.meshd.pid) {
                (false, _) => "unregistered".into(),
                (true, Some(pid)) => format!("pid {pid}"),
                (true, None) => "down".into(),
            },
            format!(
                "{}/{}",
                n.peers
                    .iter()
                    .filter(|p| p.latest_handshake_seconds_ago.is_some())
                    .count(),
                n.peers.len()
            ),
        ]);
    }
    let mut out = format!(
        "lab {}: API server {} ({}), kubeconfig {}\nplaintext on the fabric: {}; node-to-node host traffic outside WireGuard: {}\n",
        r.name,
        r.api_server.url,
        if r.api_server.running {
            "running"
        } else {
            "NOT RUNNING"
        },
        r.kubeconfig.display(),
        match r.fabric.plaintext {
            Some(c) if c.packets == 0 => "0 packets".to_string(),
            Some(c) => format!("{} packets, {} bytes: A LEAK", c.packets, c.bytes),
            None => "unknown (the sentinel cannot be read)".to_string(),
        },
        match r.fabric.host_plaintext {
            Some(c) => format!("{} packets", c.packets),
            None => "unknown".to_string(),
        }
    );
    out.push_str(&weft_meshd::table::render(&rows));
    if !r.pods.is_empty() {
        out.push_str("\nPOD                          NODE     IPS\n");
        for p in &r.pods {
            out.push_str(&format!(
                "{:<28} {:<8} {}\n",
                format!("{}/{}", p.namespace, p.name),
                p.node,
                p.ips.join(",")
            ));
        }
    }
    out
}
