//! meshd collects the pod addresses nobody will release. Runtimes on
//! libcni < 1.2 (containerd 1.6 and 1.7, podman 4) never send CNI GC, so an
//! attachment whose DEL never came — the runtime crashed, the node
//! rebooted, the pod was force-deleted while its sandbox was already gone —
//! would hold its addresses for good and, one by one, exhaust the node's
//! block. meshd watches the Pods bound to its node and releases an
//! allocation once its pod has been gone for the grace period and its veth
//! is gone too (a runtime that still has the sandbox will send DEL; until
//! then the address may still be in use). Allocations the runtime did not
//! name a pod for (no `K8S_POD_NAME` in CNI_ARGS) are never judged.
//!
//! Gather (allocations, the node's Pods, which veths exist), decide
//! ([`step`], pure), apply (release).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use weft_ipam::{Attachment, PodRef, PodStore};

use crate::reconcile::netlink::Netlink;

/// An allocation as the collector sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub attachment: Attachment,
    pub pod: Option<PodRef>,
    /// Whether its node-side veth exists (its sandbox does).
    pub veth: bool,
}

/// What one pass decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Step {
    pub release: Vec<Attachment>,
    /// Since when each allocation still held has lacked its pod.
    pub absent_since: BTreeMap<Attachment, Instant>,
}

/// Which allocations to release: those whose pod (`namespace/name`) has
/// not been among `live` for `grace`, counted from when a pass first found
/// it absent, and whose veth is gone.
pub fn step(
    holders: &[Holder],
    live: &BTreeSet<String>,
    absent_since: &BTreeMap<Attachment, Instant>,
    now: Instant,
    grace: Duration,
) -> Step {
    let mut out = Step::default();
    for h in holders {
        let Some(pod) = &h.pod else { continue };
        if live.contains(&pod.key()) {
            continue;
        }
        let since = absent_since.get(&h.attachment).copied().unwrap_or(now);
        if now.duration_since(since) >= grace && !h.veth {
            out.release.push(h.attachment.clone());
        } else {
            out.absent_since.insert(h.attachment.clone(), since);
        }
    }
    out
}

/// Collects forever, every `grace / 2` (at most a minute apart).
pub async fn run(client: Client, node: String, store: PodStore, grace: Duration) -> Result<()> {
    let pods = crate::cluster::reflect(
        Api::<Pod>::all(client),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
        |_| {},
    );
    pods.wait_until_ready()
        .await
        .context("waiting for the first list of this node's Pods")?;
    let netlink = Netlink::new()?;
    let mut absent_since = BTreeMap::new();
    let mut tick =
        tokio::time::interval((grace / 2).clamp(Duration::from_secs(1), Duration::from_secs(60)));
    loop {
        tick.tick().await;
        // Gather: the allocations first, so a pod attached meanwhile is
        // already in the list of Pods read after them.
        let held = match store.holders() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "reading the pod address store for collection");
                continue;
            }
        };
        let mut holders = Vec::with_capacity(held.len());
        for (attachment, pod) in held {
            let veth = netlink
                .link_index(&attachment.host_veth())
                .await
                .map_or(true, |i| i.is_some());
            holders.push(Holder {
                attachment,
                pod,
                veth,
            });
        }
        let live: BTreeSet<String> = pods
            .state()
            .iter()
            .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
            .collect();
        // Decide.
        let decided = step(&holders, &live, &absent_since, Instant::now(), grace);
        absent_since = decided.absent_since;
        // Apply.
        for attachment in decided.release {
            let pod = holders
                .iter()
                .find(|h| h.attachment == attachment)
                .and_then(|h| h.pod.as_ref())
                .map(PodRef::key);
            match store.release(&attachment) {
                Ok(_) => tracing::info!(
                    pod,
                    container = %attachment.container_id,
                    "released the addresses of a pod gone from this node (no CNI DEL came)"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, pod, "releasing the addresses of a pod gone from this node")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(container: &str, pod: Option<&str>, veth: bool) -> Holder {
        Holder {
            attachment: Attachment {
                container_id: container.into(),
                ifname: "eth0".into(),
            },
            pod: pod.map(|name| PodRef {
                namespace: "default".into(),
                name: name.into(),
            }),
            veth,
        }
    }

    #[test]
    fn allocations_of_pods_gone_for_the_grace_period_without_a_veth_are_released() {
        let grace = Duration::from_secs(300);
        let t0 = Instant::now();
        let live = BTreeSet::from(["default/web".to_string()]);
        let holders = [
            holder("live", Some("web"), true),
            holder("live-no-veth", Some("web"), false),
            holder("gone", Some("old"), false),
            holder("gone-sandbox-up", Some("forced"), true),
            holder("unnamed", None, false),
        ];
        let att = |c: &str| {
            holders
                .iter()
                .find(|h| h.attachment.container_id == c)
                .unwrap()
                .attachment
                .clone()
        };
        // First seen absent: tracked from now, nothing released yet.
        let first = step(&holders, &live, &BTreeMap::new(), t0, grace);
        assert_eq!(first.release, vec![]);
        assert_eq!(
            first.absent_since,
            BTreeMap::from([(att("gone"), t0), (att("gone-sandbox-up"), t0)])
        );
        // Within the grace period: still waiting, from when first seen.
        let t1 = t0 + grace - Duration::from_secs(1);
        let second = step(&holders, &live, &first.absent_since, t1, grace);
        assert_eq!(second.release, vec![]);
        assert_eq!(second.absent_since, first.absent_since);
        // After it: the one without a veth goes; the other waits for DEL.
        let t2 = t0 + grace;
        let third = step(&holders, &live, &second.absent_since, t2, grace);
        assert_eq!(third.release, vec![att("gone")]);
        assert_eq!(
            third.absent_since,
            BTreeMap::from([(att("gone-sandbox-up"), t0)])
        );
        // A pod that comes back is no longer tracked.
        let back = BTreeSet::from(["default/web".to_string(), "default/forced".to_string()]);
        let fourth = step(&holders[3..4], &back, &third.absent_since, t2, grace);
        assert_eq!(fourth, Step::default());
    }

    #[test]
    fn a_zero_grace_releases_at_the_first_pass() {
        let holders = [holder("gone", Some("old"), false)];
        let s = step(
            &holders,
            &BTreeSet::new(),
            &BTreeMap::new(),
            Instant::now(),
            Duration::ZERO,
        );
        assert_eq!(s.release.len(), 1);
    }
}
