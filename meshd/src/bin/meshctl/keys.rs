//! `meshctl keys`: rotate, check and revoke node keys, through the API
//! alone. A rotation is an admin's annotation the node's meshd acts on; a
//! revocation is a line in the revoked-keys ConfigMap every meshd reads.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use weft_keys::PublicKey;
use weft_meshd::annotations::{
    parse_time, render_time, KEY_SINCE, NEXT_PUBLIC_KEY, PUBLIC_KEY, ROTATE_REQUESTED,
};
use weft_meshd::graph::{GraphNode, MeshGraph};
use weft_meshd::peers::ExternalPeer;
use weft_meshd::revoked::{self, Revocation};

use super::Output;

#[derive(clap::Subcommand)]
pub enum KeysCmd {
    /// Each node's key: fingerprint, age, rotation state and, while it
    /// rotates, how many peers already use the new key.
    Status {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        source: super::MeshSource,
    },
    /// Rotate nodes' keys without interrupting their connections: the
    /// request is recorded on each Node and its meshd carries it out.
    /// With --peer, replace an external peer's key: a new pair is made
    /// here (or --public-key taken) and its new configuration printed.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["nodes", "all", "peer"])))]
    Rotate {
        /// The nodes to rotate (at once).
        nodes: Vec<String>,
        /// Every node, rolling: at most --parallel at a time, each next one
        /// started when one finishes.
        #[arg(long)]
        all: bool,
        /// With --all: how many nodes rotate at once. Each rotating node
        /// costs its peers one more entry and a handshake, nothing more.
        #[arg(long, default_value = "1", conflicts_with = "nodes", value_parser = clap::value_parser!(u16).range(1..))]
        parallel: u16,
        /// How long to wait for each node to finish.
        #[arg(long, default_value = "5m")]
        timeout: humantime::Duration,
        /// Record the request and return.
        #[arg(long, conflicts_with = "all")]
        no_wait: bool,
        /// The external peer (WeftPeer) whose key to replace.
        #[arg(long, conflicts_with_all = ["nodes", "all", "no_wait"])]
        peer: Option<String>,
        /// With --peer: its new public key, made on the peer.
        #[arg(long, requires = "peer")]
        public_key: Option<String>,
        #[command(flatten)]
        print: super::peer::PrintArgs,
        #[command(flatten)]
        source: super::MeshSource,
    },
    /// Revoke a node's key (and its next key, if it is rotating): every
    /// node drops it at once and refuses it from then on; the node rejoins
    /// only with a new key (its meshd makes one).
    #[command(group(clap::ArgGroup::new("holder").required(true).args(["node", "peer"])))]
    Revoke {
        node: Option<String>,
        /// An external peer (WeftPeer) instead of a node: its key is
        /// refused by every gateway while it is listed.
        #[arg(long)]
        peer: Option<String>,
        /// The revoked-keys ConfigMap (NAMESPACE/NAME).
        #[arg(long, default_value = revoked::DEFAULT_RECORD)]
        revoked_keys: String,
    },
}

pub fn run(kubeconfig: Option<&std::path::Path>, cmd: KeysCmd) -> Result<String> {
    match cmd {
        KeysCmd::Status { output, source } => {
            let g = super::block_on(super::mesh(kubeconfig, &source, super::Policies::Skip))?;
            status(&g, output, weft_keys::unix_now())
        }
        KeysCmd::Rotate {
            peer: Some(peer),
            public_key,
            print,
            source,
            ..
        } => super::peer::rekey(kubeconfig, &peer, public_key, &print, &source),
        KeysCmd::Rotate {
            nodes,
            all,
            parallel,
            timeout,
            no_wait,
            ..
        } => super::block_on(async {
            let api = Api::<Node>::all(super::client(kubeconfig).await?);
            let how = match (all, no_wait) {
                (true, _) => Rollout::Rolling {
                    parallel: usize::from(parallel),
                },
                (false, true) => Rollout::Request,
                (false, false) => Rollout::Together,
            };
            rotate(&api, nodes, how, *timeout).await
        }),
        KeysCmd::Revoke {
            node,
            peer,
            revoked_keys,
        } => {
            // Arguments first: a bad one is named before any cluster is asked.
            let record = weft_meshd::cluster::object_ref("--revoked-keys", &revoked_keys)?;
            super::block_on(async {
                let client = super::client(kubeconfig).await?;
                let holder = match (node, peer) {
                    (_, Some(peer)) => Holder::Peer(peer),
                    (Some(node), None) => Holder::Node(node),
                    (None, None) => bail!("name a node or --peer"),
                };
                revoke(client, &holder, record, &revoked_keys).await
            })
        }
    }
}

/// How old, in the largest unit that fits: `45s`, `12m`, `3h`, `20d`.
pub fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn fingerprint(key: &str) -> String {
    key.chars().take(8).collect()
}

/// What a node's key is doing, in a word or three.
pub fn rotation(n: &GraphNode, now: u64) -> String {
    match (&n.next_key, n.rotate_requested) {
        (Some(next), _) => match next.at {
            None => "overlapping".into(),
            Some(at) if at > now => format!("switching in {}", age(at - now)),
            Some(_) => "switching".into(),
        },
        (None, Some(_)) => "requested".into(),
        (None, None) if n.state == "accepted" => "-".into(),
        (None, None) => n.reason.clone().unwrap_or_else(|| n.state.into()),
    }
}

/// Peers on the next key, of all peers: `3/4`.
fn moved(n: &GraphNode, peers: usize) -> String {
    match &n.next_key {
        Some(next) if next.at.is_none() => {
            format!("{}/{peers}", peers.saturating_sub(next.pending.len()))
        }
        _ => "-".into(),
    }
}

pub fn status(g: &MeshGraph, output: Output, now: u64) -> Result<String> {
    let peers = g
        .nodes
        .iter()
        .filter(|n| n.state == "accepted")
        .count()
        .saturating_sub(1);
    if let Output::Json = output {
        let rows: Vec<serde_json::Value> = g
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "node": n.name,
                    "state": n.state,
                    "reason": n.reason,
                    "publicKey": n.public_key,
                    "keySince": n.key_since.map(render_time),
                    "ageSeconds": n.key_since.map(|s| now.saturating_sub(s)),
                    "rotation": rotation(n, now),
                    "nextKey": n.next_key,
                    "rotateRequested": n.rotate_requested.map(render_time),
                })
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&rows)? + "\n");
    }
    let wide = matches!(output, Output::Wide);
    let mut header = vec!["NODE", "KEY", "AGE", "ROTATION", "PEERS ON NEXT KEY"];
    if wide {
        header.extend(["NEXT KEY", "PENDING"]);
    }
    let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
    for n in &g.nodes {
        let mut row = vec![
            n.name.clone(),
            n.public_key.as_deref().map_or("-".into(), fingerprint),
            n.key_since
                .map_or("-".into(), |s| age(now.saturating_sub(s))),
            rotation(n, now),
            moved(n, peers),
        ];
        if wide {
            let next = n.next_key.as_ref();
            row.push(next.map_or("-".into(), |k| fingerprint(&k.public_key)));
            row.push(
                next.filter(|k| !k.pending.is_empty())
                    .map_or("-".into(), |k| k.pending.join(",")),
            );
        }
        rows.push(row);
    }
    Ok(weft_meshd::table::render(&rows))
}

/// A node's key as its annotations say: the key, its start, a next key.
fn key_of(node: &Node) -> (Option<String>, Option<u64>, bool) {
    let a = node.annotations();
    (
        a.get(PUBLIC_KEY).cloned(),
        a.get(KEY_SINCE).and_then(|v| parse_time(v).ok()),
        a.contains_key(NEXT_PUBLIC_KEY),
    )
}

async fn request(api: &Api<Node>, name: &str, at: u64) -> Result<()> {
    let patch =
        serde_json::json!({"metadata": {"annotations": {ROTATE_REQUESTED: render_time(at)}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("node {name}: recording the rotation request"))?;
    Ok(())
}

/// Waits until `name` has a key newer than `at` and no rotation under way.
async fn finished(api: &Api<Node>, name: &str, at: u64, timeout: Duration) -> Result<String> {
    let started = Instant::now();
    loop {
        let node = api
            .get(name)
            .await
            .with_context(|| format!("node {name}: reading its annotations"))?;
        if let (Some(key), Some(since), false) = key_of(&node) {
            if since >= at {
                return Ok(format!(
                    "{name}: rotated to {} in {:.1}s\n",
                    fingerprint(&key),
                    started.elapsed().as_secs_f64()
                ));
            }
        }
        if started.elapsed() > timeout {
            bail!(
                "node {name}: the rotation did not finish within {} (see `meshctl keys status -o wide` for the peers it waits for, and the node's meshd log)",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How the nodes of one `keys rotate` go.
enum Rollout {
    /// Every node's request recorded, nothing waited for (`--no-wait`).
    Request,
    /// The named nodes at once, waiting for all of them.
    Together,
    /// Every node (`--all`), at most `parallel` at a time: the next starts
    /// when one finishes, and none starts after one failed.
    Rolling { parallel: usize },
}

async fn rotate(
    api: &Api<Node>,
    mut nodes: Vec<String>,
    how: Rollout,
    timeout: Duration,
) -> Result<String> {
    if let Rollout::Rolling { .. } = how {
        let list = api
            .list(&Default::default())
            .await
            .context("listing nodes")?;
        nodes = list
            .items
            .iter()
            .filter(|n| key_of(n).0.is_some())
            .map(ResourceExt::name_any)
            .collect();
        nodes.sort();
    }
    for name in &nodes {
        api.get(name)
            .await
            .with_context(|| format!("node {name:?}"))?;
    }
    let lines: Vec<String> = match how {
        Rollout::Request | Rollout::Together => {
            let at = weft_keys::unix_now();
            for name in &nodes {
                request(api, name, at).await?;
            }
            if let Rollout::Request = how {
                return Ok(format!("rotation requested for {}\n", nodes.join(", ")));
            }
            futures::future::try_join_all(nodes.iter().map(|name| finished(api, name, at, timeout)))
                .await?
        }
        Rollout::Rolling { parallel } => {
            // In the nodes' order, so the output reads the same however
            // many ran at once; the first failure stops the stream, and with
            // it every node not yet started.
            futures::stream::iter(&nodes)
                .map(|name| async move {
                    let at = weft_keys::unix_now();
                    request(api, name, at).await?;
                    finished(api, name, at, timeout).await
                })
                .buffered(parallel)
                .try_collect()
                .await?
        }
    };
    Ok(lines.concat())
}

/// Whose key a revocation is for.
enum Holder {
    Node(String),
    Peer(String),
}

impl Holder {
    /// Its keys as the cluster has them now, and how the record names it.
    async fn keys(&self, client: &kube::Client) -> Result<(Vec<PublicKey>, String)> {
        match self {
            Holder::Node(name) => {
                let node = Api::<Node>::all(client.clone())
                    .get(name)
                    .await
                    .with_context(|| format!("node {name:?}"))?;
                let a = node.annotations();
                let mut keys = Vec::new();
                for annotation in [PUBLIC_KEY, NEXT_PUBLIC_KEY] {
                    if let Some(v) = a.get(annotation) {
                        let key = v
                            .trim()
                            .parse()
                            .with_context(|| format!("node {name}: {annotation}"))?;
                        keys.push(key);
                    }
                }
                if keys.is_empty() {
                    bail!("node {name} has no {PUBLIC_KEY}: nothing to revoke");
                }
                Ok((keys, name.clone()))
            }
            Holder::Peer(name) => {
                let key = super::peer::public_key(client, name).await?;
                Ok((vec![key], ExternalPeer::entry_name(name)))
            }
        }
    }

    fn done(&self, keys: &[PublicKey]) -> String {
        let keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
        match self {
            Holder::Node(name) => format!(
                "revoked {} of node {name}; every node refuses it from now on, and {name} rejoins with a new key\n",
                keys.join(" and ")
            ),
            Holder::Peer(name) => format!(
                "revoked {} of WeftPeer {name}; every gateway refuses it from now on (meshctl keys rotate --peer {name} gives it a new one)\n",
                keys.join(" and ")
            ),
        }
    }
}

async fn revoke(
    client: kube::Client,
    holder: &Holder,
    (ns, cm_name): (&str, &str),
    record: &str,
) -> Result<String> {
    let (keys, name) = holder.keys(&client).await?;
    let api = Api::<ConfigMap>::namespaced(client, ns);
    // Read, add, replace: a concurrent revocation makes this retry, never
    // lose the other.
    for _ in 0..5 {
        let current = api
            .get_opt(cm_name)
            .await
            .with_context(|| format!("reading ConfigMap {record}"))?;
        let text = current
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get(revoked::DATA_KEY))
            .cloned()
            .unwrap_or_default();
        let (mut list, _) = revoked::parse(&text);
        let at = weft_keys::unix_now();
        for key in &keys {
            if !list.iter().any(|r| r.key == *key) {
                list.push(Revocation {
                    key: *key,
                    node: name.clone(),
                    at,
                });
            }
        }
        // Lines meshd could not read are kept as they were.
        let kept: String = text
            .lines()
            .filter(|l| !l.trim().is_empty() && revoked::parse(l).0.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        let data = format!("{kept}{}", revoked::render(&list));
        let result = match current {
            Some(mut cm) => {
                cm.data
                    .get_or_insert_with(Default::default)
                    .insert(revoked::DATA_KEY.into(), data);
                api.replace(cm_name, &PostParams::default(), &cm).await
            }
            None => {
                let cm = ConfigMap {
                    metadata: kube::api::ObjectMeta {
                        name: Some(cm_name.into()),
                        namespace: Some(ns.into()),
                        ..Default::default()
                    },
                    data: Some([(revoked::DATA_KEY.to_string(), data)].into()),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &cm).await
            }
        };
        match result {
            Ok(_) => return Ok(holder.done(&keys)),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e).with_context(|| format!("writing ConfigMap {record}")),
        }
    }
    bail!("ConfigMap {record} kept changing under this revocation; try again")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_like_kubectl() {
        for (s, want) in [
            (5, "5s"),
            (119, "119s"),
            (600, "10m"),
            (7200, "2h"),
            (3 * 86_400, "3d"),
        ] {
            assert_eq!(age(s), want);
        }
    }
}
