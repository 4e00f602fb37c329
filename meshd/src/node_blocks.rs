//! This node's pod blocks when the control plane assigns no `spec.podCIDRs`:
//! claimed in a shared record (a ConfigMap) with optimistic concurrency —
//! read, change, replace with the resourceVersion read, retry on 409 — so
//! nodes joining at the same instant never get the same block. The record
//! changes only when a claim or an expiry changes it.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::Client;
use weft_ipam::{BlockPlan, BlockRecord};

const KEY: &str = "blocks.json";
const ATTEMPTS: usize = 20;

/// Where this node's pod CIDRs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PodCidrSource {
    /// `spec.podCIDRs` only (kube-controller-manager --allocate-node-cidrs):
    /// a Node without them waits, never claims a block it would later have
    /// to give up.
    Node,
    /// `spec.podCIDRs` where set, else blocks claimed in the block record.
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
    /// Cluster pod ranges (at most one per family) that node blocks are
    /// carved from when a Node has no spec.podCIDRs.
    #[arg(
        long = "cluster-cidr",
        env = "WEFT_CLUSTER_CIDRS",
        value_delimiter = ','
    )]
    pub cluster_cidrs: Vec<IpNet>,
    #[arg(long, env = "WEFT_NODE_BLOCK_V4", default_value_t = 24)]
    pub node_block_v4: u8,
    #[arg(long, env = "WEFT_NODE_BLOCK_V6", default_value_t = 64)]
    pub node_block_v6: u8,
    /// Seconds a deleted Node's blocks stay reserved before reuse.
    #[arg(long, env = "WEFT_BLOCK_GRACE", default_value_t = 300)]
    pub block_grace: u64,
    /// The shared record: NAMESPACE/NAME of a ConfigMap.
    #[arg(long, default_value = "weft-system/weft-node-blocks")]
    pub block_record: String,
}

impl BlockArgs {
    /// The block plans, one per family, naming the flag on error.
    pub fn plans(&self) -> Result<Vec<BlockPlan>> {
        let mut seen = BTreeSet::new();
        self.cluster_cidrs
            .iter()
            .map(|c| {
                let v4 = c.addr().is_ipv4();
                if !seen.insert(v4) {
                    bail!("--cluster-cidr {c}: at most one range per address family");
                }
                let prefix = if v4 {
                    self.node_block_v4
                } else {
                    self.node_block_v6
                };
                BlockPlan::new(*c, prefix).with_context(|| format!("--cluster-cidr {c}"))
            })
            .collect()
    }

    /// The record's NAMESPACE and NAME.
    pub fn record(&self) -> Result<(&str, &str)> {
        crate::cluster::object_ref("--block-record", &self.block_record)
    }
}

/// The block record a ConfigMap holds (empty if it holds none yet).
pub fn record_of(cm: &ConfigMap) -> Result<BlockRecord> {
    match cm.data.as_ref().and_then(|d| d.get(KEY)) {
        Some(json) => serde_json::from_str(json).with_context(|| {
            format!(
                "ConfigMap {}/{} key {KEY} is corrupt",
                cm.metadata.namespace.as_deref().unwrap_or_default(),
                cm.metadata.name.as_deref().unwrap_or_default()
            )
        }),
        None => Ok(BlockRecord::default()),
    }
}

/// Claims (or confirms) `node`'s blocks, expiring gone nodes on the way.
/// `reserved`: blocks other nodes hold through `spec.podCIDRs`.
pub async fn claim(
    client: &Client,
    args: &BlockArgs,
    node: &str,
    live: &BTreeSet<String>,
    reserved: &[IpNet],
    now: i64,
) -> Result<Vec<IpNet>> {
    let plans = args.plans()?;
    if plans.is_empty() {
        bail!(
            "Node {node} has no spec.podCIDRs and no --cluster-cidr is set to claim a block from"
        );
    }
    let (namespace, name) = args.record()?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    for _ in 0..ATTEMPTS {
        let current = api
            .get_opt(name)
            .await
            .with_context(|| format!("reading ConfigMap {namespace}/{name}"))?;
        let before = match &current {
            Some(cm) => record_of(cm)?,
            None => BlockRecord::default(),
        };
        let mut record = before.clone();
        record.expire(live, now, args.block_grace as i64);
        let mine = record.claim(node, &plans, reserved)?;
        if record == before && current.is_some() {
            return Ok(mine);
        }
        let data = BTreeMap::from([(KEY.to_string(), serde_json::to_string(&record)?)]);
        let written = match current {
            Some(mut cm) => {
                // The resourceVersion read stays in metadata: a concurrent
                // writer makes this a 409 and the loop starts over.
                cm.data = Some(data);
                api.replace(name, &PostParams::default(), &cm)
                    .await
                    .map(drop)
            }
            None => {
                let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": namespace},
                    "data": data,
                }))?;
                api.create(&PostParams::default(), &cm).await.map(drop)
            }
        };
        match written {
            Ok(()) => {
                tracing::info!(node, blocks = ?mine, "claimed node blocks");
                return Ok(mine);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("writing ConfigMap {namespace}/{name}"))
            }
        }
    }
    bail!("could not update ConfigMap {namespace}/{name} after {ATTEMPTS} conflicting attempts")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cidrs: &[&str]) -> BlockArgs {
        BlockArgs {
            pod_cidr_source: PodCidrSource::NodeOrBlocks,
            cluster_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            node_block_v4: 24,
            node_block_v6: 64,
            block_grace: 300,
            block_record: "kube-system/weft-node-blocks".into(),
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
        let mut bad = args(&[]);
        bad.block_record = "nonamespace".into();
        assert!(bad.record().is_err());
    }
}
