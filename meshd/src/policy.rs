//! NetworkPolicy enforcement on this node: reflectors on Pods, Namespaces
//! and NetworkPolicies; on any change (debounced) the node's program is
//! compiled, rendered, and applied — only if the ruleset differs from what
//! was last applied, so a steady cluster causes no rule churn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde_json::Value;
use tokio::sync::Notify;
use weft_policy::{compile, render, NamespaceInfo, PodInfo};

use crate::http::Health;

const DEBOUNCE: Duration = Duration::from_millis(20);

/// The numeric resourceVersion of an object (0 if it is not a number).
fn revision(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A reflector for every object of kind `K`, notifying `changed` and
/// raising `seen` to the newest resourceVersion of any event (deletions
/// included, which the store alone would not show).
fn watch<K>(client: &Client, changed: Arc<Notify>, seen: Arc<AtomicU64>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let api: Api<K> = Api::all(client.clone());
    tokio::spawn(async move {
        let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if let watcher::Event::Apply(o)
                    | watcher::Event::Delete(o)
                    | watcher::Event::InitApply(o) = &event
                    {
                        seen.fetch_max(revision(o.meta()), Ordering::Relaxed);
                    }
                    changed.notify_one()
                }
                Err(e) => {
                    tracing::warn!(error = %e, kind = %K::kind(&()), "watching for policy (retrying)")
                }
            }
        }
    });
    reader
}

/// Enforces policy for the pods on `node` until the process ends.
pub async fn run(client: Client, node: String, health: Arc<Health>) {
    let changed = Arc::new(Notify::new());
    let seen = Arc::new(AtomicU64::new(0));
    let pods = watch::<Pod>(&client, changed.clone(), seen.clone());
    let namespaces = watch::<Namespace>(&client, changed.clone(), seen.clone());
    let policies = watch::<NetworkPolicy>(&client, changed.clone(), seen.clone());
    for ready in [
        pods.wait_until_ready().await,
        namespaces.wait_until_ready().await,
        policies.wait_until_ready().await,
    ] {
        if let Err(e) = ready {
            tracing::error!(error = %e, "policy watches ended before their first list; policy is not enforced");
            return;
        }
    }
    let mut applied: Option<Value> = None;
    loop {
        let revision = seen.load(Ordering::Relaxed);
        let pod_infos: Vec<PodInfo> = pods.state().iter().map(|p| PodInfo::from_pod(p)).collect();
        let ns_infos: Vec<NamespaceInfo> = namespaces
            .state()
            .iter()
            .map(|n| NamespaceInfo::from_namespace(n))
            .collect();
        let policy_list: Vec<NetworkPolicy> =
            policies.state().iter().map(|p| (**p).clone()).collect();
        let program = compile(&node, &policy_list, &pod_infos, &ns_infos);
        for problem in &program.problems {
            tracing::warn!(%problem, "a NetworkPolicy part is unusable and allows nothing");
        }
        let ruleset = render::render(&program);
        if applied.as_ref() == Some(&ruleset) {
            health.metrics.policy_revision.set(revision as i64);
        } else {
            let to_apply = ruleset.clone();
            match tokio::task::spawn_blocking(move || render::apply(&to_apply)).await {
                Ok(Ok(())) => {
                    health.metrics.count_change("policy", 1);
                    tracing::info!(
                        pods = program.pods.len(),
                        policies = policy_list.len(),
                        "applied the node's NetworkPolicy program"
                    );
                    applied = Some(ruleset);
                    health.metrics.policy_revision.set(revision as i64);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "applying NetworkPolicy failed; retrying on the next change")
                }
                Err(e) => tracing::warn!(error = %e, "applying NetworkPolicy panicked"),
            }
        }
        changed.notified().await;
        tokio::time::sleep(DEBOUNCE).await;
    }
}
