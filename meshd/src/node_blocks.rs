//! This node's pod blocks when the control plane assigns no `spec.podCIDRs`:
//! each node claims its blocks with an object of its own,
//! `weft-blocks-<node>` in Weft's namespace, which the admission policy
//! lets only that node's meshd create or delete, and nobody change
//! (`immutable`). Who holds a block follows from every claim alone (the
//! earliest holds, see [`BlockRecord::resolve`]), so no node's write can
//! move another's blocks, and a corrupt claim holds nothing but stops no
//! one. A claim is owned by its Node: deleting the Node frees its blocks.

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use weft_ipam::{BlockClaim, BlockPlan, BlockRecord};

use crate::model::NodeInfo;

/// A claim's name: this prefix and the node's.
pub const CLAIM_PREFIX: &str = "weft-blocks-";
/// The label every claim carries (`true`): what meshd watches.
pub const CLAIM_LABEL: &str = "weft.dev/block-claim";
const NODE_KEY: &str = "node";
const BLOCKS_KEY: &str = "blocks";
const ATTEMPTS: usize = 10;
/// Longer than the one-second resolution of creation times.
const CLAIM_SETTLES: std::time::Duration = std::time::Duration::from_millis(1100);

/// Where this node's pod CIDRs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PodCidrSource {
    /// `spec.podCIDRs` only (kube-controller-manager --allocate-node-cidrs):
    /// a Node without them waits, never claims a block it would later have
    /// to give up.
    Node,
    /// `spec.podCIDRs` where set, else blocks this node claims.
    NodeOrBlocks,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BlockArgs {
    #[arg(
        long,
        env = "WEFT_POD_CIDR_SOURCE",
        value_enum,
        default_value = "node-or-blocks"
    )]
    pub pod_cidr_source: PodCidrSource,
    /// Node blocks are carved from these when a Node has no spec.podCIDRs.
    #[command(flatten)]
    pub cluster: crate::model::ClusterCidrs,
    #[arg(long, env = "WEFT_NODE_BLOCK_V4", default_value_t = 24)]
    pub node_block_v4: u8,
    #[arg(long, env = "WEFT_NODE_BLOCK_V6", default_value_t = 64)]
    pub node_block_v6: u8,
    /// The namespace of the nodes' block claims.
    #[arg(long, env = "WEFT_BLOCK_NAMESPACE", default_value = crate::cluster::NAMESPACE)]
    pub block_namespace: String,
}

impl BlockArgs {
    /// The block plans, one per family, naming the flag on error.
    pub fn plans(&self) -> Result<Vec<BlockPlan>> {
        plans(
            &self.cluster.cluster_cidrs,
            self.node_block_v4,
            self.node_block_v6,
        )
        .map_err(|e| anyhow::anyhow!("--cluster-cidr {e}"))
    }
}

/// Node blocks of `v4`/`v6` prefix length carved from `cluster_cidrs` (at
/// most one range per family); an error names the range.
pub fn plans(cluster_cidrs: &[IpNet], v4: u8, v6: u8) -> Result<Vec<BlockPlan>, String> {
    let mut families = Vec::new();
    cluster_cidrs
        .iter()
        .map(|c| {
            let ipv4 = c.addr().is_ipv4();
            if families.contains(&ipv4) {
                return Err(format!("{c}: at most one range per address family"));
            }
            families.push(ipv4);
            BlockPlan::new(*c, if ipv4 { v4 } else { v6 }).map_err(|e| format!("{c}: {e}"))
        })
        .collect()
}

/// The name of `node`'s claim.
pub fn claim_name(node: &str) -> String {
    format!("{CLAIM_PREFIX}{node}")
}

/// The claim an object is, or why it is none (it then holds nothing).
pub fn claim_of(cm: &ConfigMap) -> Result<BlockClaim, String> {
    let name = cm.name_any();
    let data = cm.data.clone().unwrap_or_default();
    let node = data
        .get(NODE_KEY)
        .ok_or_else(|| format!("block claim {name}: no {NODE_KEY}"))?;
    if name != claim_name(node) {
        return Err(format!(
            "block claim {name}: it names node {:?}, but a node's claim is {}",
            node.chars().take(64).collect::<String>(),
            claim_name("<node>")
        ));
    }
    let created = cm
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .ok_or_else(|| format!("block claim {name}: no creationTimestamp"))?;
    let mut blocks: Vec<IpNet> = Vec::new();
    for b in data
        .get(BLOCKS_KEY)
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
    {
        let block: IpNet = b.trim().parse().map_err(|e| {
            format!(
                "block claim {name}: {BLOCKS_KEY} {:?}: {e}",
                b.chars().take(64).collect::<String>()
            )
        })?;
        if blocks
            .iter()
            .any(|c| c.addr().is_ipv4() == block.addr().is_ipv4())
        {
            return Err(format!("block claim {name}: at most one block per family"));
        }
        blocks.push(block);
    }
    Ok(BlockClaim {
        node: node.clone(),
        created,
        blocks,
    })
}

/// Who holds which block, from every claim object, and why each object
/// that is no claim is ignored.
pub fn record<'a>(
    objects: impl IntoIterator<Item = &'a ConfigMap>,
    plans: &[BlockPlan],
) -> (BlockRecord, Vec<String>) {
    let (claims, errors): (Vec<_>, Vec<_>) =
        objects.into_iter().map(claim_of).partition(Result::is_ok);
    let claims: Vec<BlockClaim> = claims.into_iter().filter_map(Result::ok).collect();
    let errors = errors.into_iter().filter_map(Result::err).collect();
    (BlockRecord::resolve(&claims, plans), errors)
}

/// The claim object `me` writes for `blocks`: immutable, owned by its Node
/// (the garbage collector deletes it with the Node).
fn claim_object(me: &NodeInfo, namespace: &str, blocks: &[IpNet]) -> Result<ConfigMap> {
    let blocks: Vec<String> = blocks.iter().map(ToString::to_string).collect();
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": claim_name(&me.name),
            "namespace": namespace,
            "labels": {CLAIM_LABEL: "true", "app.kubernetes.io/part-of": "weft"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": me.name, "uid": me.uid}],
        },
        "immutable": true,
        "data": {NODE_KEY: me.name, BLOCKS_KEY: blocks.join(",")},
    }))?)
}

/// Makes sure `me` holds one block of each plan, and returns them: its
/// claim if that holds, else a new claim of free blocks, kept only once
/// the API shows it holds after its second has passed (a claim made in the
/// same second leaves the block to nobody, and this one is made again).
/// `reserved`: blocks other nodes hold through `spec.podCIDRs`.
pub async fn claim(
    client: &Client,
    args: &BlockArgs,
    me: &NodeInfo,
    reserved: &[IpNet],
) -> Result<Vec<IpNet>> {
    let plans = args.plans()?;
    if plans.is_empty() {
        bail!(
            "Node {} has no spec.podCIDRs and no --cluster-cidr is set to claim a block from",
            me.name
        );
    }
    let namespace = args.block_namespace.as_str();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let name = claim_name(&me.name);
    for _ in 0..ATTEMPTS {
        let objects = api
            .list(&ListParams::default().labels(&format!("{CLAIM_LABEL}=true")))
            .await
            .with_context(|| format!("listing the block claims in {namespace}"))?;
        let (record, _) = record(&objects.items, &plans);
        let held = record.held_by(&me.name);
        if holds_one_of_each(&held, &plans) {
            return Ok(held);
        }
        if objects.items.iter().any(|cm| cm.name_any() == name) {
            // Its claim lost a block: made again, with what is free now.
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => continue,
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) => return Err(e).with_context(|| format!("deleting {namespace}/{name}")),
            }
        }
        let blocks = record.choose(&me.name, &plans, reserved)?;
        match api
            .create(
                &PostParams::default(),
                &claim_object(me, namespace, &blocks)?,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(node = %me.name, ?blocks, "claimed node blocks");
                // A claim made in the same second makes the block nobody's
                // (see BlockRecord::resolve): the claim is judged once its
                // second has passed, with every claim of that second seen.
                tokio::time::sleep(CLAIM_SETTLES).await;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("creating {namespace}/{name}")),
        }
    }
    bail!("could not claim node blocks in {namespace} after {ATTEMPTS} attempts")
}

/// Whether `held` has exactly one block of each plan.
pub fn holds_one_of_each(held: &[IpNet], plans: &[BlockPlan]) -> bool {
    held.len() == plans.len()
        && plans
            .iter()
            .all(|p| held.iter().filter(|b| p.index_of(b).is_some()).count() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn args(cidrs: &[&str]) -> BlockArgs {
        BlockArgs {
            pod_cidr_source: PodCidrSource::NodeOrBlocks,
            cluster: crate::model::ClusterCidrs {
                cluster_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            },
            node_block_v4: 24,
            node_block_v6: 64,
            block_namespace: "weft-system".into(),
        }
    }

    #[test]
    fn plans_from_flags() {
        assert_eq!(
            args(&["198.19.0.0/16", "fd98:19::/48"])
                .plans()
                .unwrap()
                .len(),
            2
        );
        assert!(args(&["198.19.0.0/16", "10.0.0.0/8"])
            .plans()
            .unwrap_err()
            .to_string()
            .contains("one range per address family"));
        assert!(args(&["198.19.0.0/25"])
            .plans()
            .unwrap_err()
            .to_string()
            .contains("--cluster-cidr 198.19.0.0/25"));
    }

    fn object(name: &str, data: &[(&str, &str)]) -> ConfigMap {
        let mut cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "weft-system"},
            "data": data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
        }))
        .unwrap();
        cm.metadata.creation_timestamp = Some(Time("2026-12-06T12:00:00Z".parse().unwrap()));
        cm
    }

    /// A claim is read as written by its node: its own name, one block per
    /// family; anything else is no claim, and says why.
    #[test]
    fn a_claim_is_its_node_s_and_anything_else_holds_nothing() {
        let me = NodeInfo {
            uid: "u-1".into(),
            ..crate::annotations::fixtures::bare(1)
        };
        let written = claim_object(
            &me,
            "weft-system",
            &[
                "198.19.1.0/24".parse().unwrap(),
                "fd98:19:0:1::/64".parse().unwrap(),
            ],
        )
        .unwrap();
        assert_eq!(written.immutable, Some(true));
        let owner = &written.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Node", "node-1", "u-1")
        );
        let mut read = written.clone();
        read.metadata.creation_timestamp = object("x", &[]).metadata.creation_timestamp;
        let claim = claim_of(&read).unwrap();
        assert_eq!(claim.node, "node-1");
        assert_eq!(claim.blocks.len(), 2);
        for (name, data, why) in [
            (
                "weft-blocks-node-2",
                vec![("node", "node-1"), ("blocks", "198.19.2.0/24")],
                "names node",
            ),
            (
                "weft-blocks-node-1",
                vec![("blocks", "198.19.2.0/24")],
                "no node",
            ),
            (
                "weft-blocks-node-1",
                vec![
                    ("node", "node-1"),
                    ("blocks", "198.19.2.0/24,198.19.3.0/24"),
                ],
                "one block per family",
            ),
            (
                "weft-blocks-node-1",
                vec![("node", "node-1"), ("blocks", "garbage")],
                "blocks",
            ),
        ] {
            let err = claim_of(&object(name, &data)).unwrap_err();
            assert!(err.contains(why) && err.contains(name), "{err}");
        }
        let plans = args(&["198.19.0.0/16"]).plans().unwrap();
        let objects = [
            object(
                "weft-blocks-node-1",
                &[("node", "node-1"), ("blocks", "198.19.1.0/24")],
            ),
            object("weft-blocks-x", &[("node", "y")]),
        ];
        let (record, errors) = record(&objects, &plans);
        assert_eq!(
            record.held_by("node-1"),
            vec!["198.19.1.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(errors.len(), 1);
        assert!(holds_one_of_each(&record.held_by("node-1"), &plans));
        assert!(!holds_one_of_each(&[], &plans));
    }
}
