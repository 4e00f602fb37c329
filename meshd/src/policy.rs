//! NetworkPolicy enforcement on this node: reflectors on Pods, Namespaces
//! and NetworkPolicies; on any change (debounced) the node's program is
//! compiled and rendered, and only its difference from what the kernel
//! holds is applied (the whole table at start or after a failure). The drop
//! counters become per-policy metrics; a table that vanished is rebuilt.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use tokio::sync::Notify;
use weft_policy::render::{self, Ruleset};
use weft_policy::{compile, nft, NamespaceInfo, PodInfo};

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

/// How often the drop counters are read into metrics (and the table's
/// presence checked).
const COUNTER_PERIOD: Duration = Duration::from_secs(5);

/// Packets each counter gained since the last reading; a counter that
/// went backwards was recreated and counts from zero.
fn drop_deltas(last: &mut HashMap<String, u64>, now: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    last.retain(|name, _| now.contains_key(name));
    now.iter()
        .filter_map(|(name, packets)| {
            let before = last.insert(name.clone(), *packets).unwrap_or(0);
            let delta = if *packets >= before {
                packets - before
            } else {
                *packets
            };
            (delta > 0).then(|| (name.clone(), delta))
        })
        .collect()
}

/// Enforces policy for the pods on `node` until the process ends.
pub async fn run(client: Client, node: String, options: render::Options, health: Arc<Health>) {
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
    // What the kernel holds; `None` (at start, after a failure, or when the
    // table vanished): unknown, so the next pass replaces the whole table.
    let mut applied: Option<Ruleset> = None;
    let mut problems = Vec::new();
    let mut counted = HashMap::new();
    let mut tick = tokio::time::interval(COUNTER_PERIOD);
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
        if program.problems != problems {
            for problem in &program.problems {
                tracing::warn!(%problem, "a NetworkPolicy part is unusable and allows nothing");
            }
            problems = program.problems.clone();
        }
        let ruleset = render::render(&program, &options);
        let transaction = match &applied {
            Some(old) => nft::diff(old, &ruleset),
            None => Some(nft::full(&ruleset)),
        };
        match transaction {
            None => {
                health.metrics.policy_revision.set(revision as i64);
            }
            Some((transaction, changes)) => {
                let started = Instant::now();
                match tokio::task::spawn_blocking(move || nft::apply(&transaction)).await {
                    Ok(Ok(())) => {
                        let m = &health.metrics;
                        m.count_change(
                            "policy-element",
                            changes.elements_added + changes.elements_removed,
                        );
                        m.count_change("policy-chain", changes.chains);
                        m.policy_elements.set(ruleset.elements() as i64);
                        m.policy_revision.set(revision as i64);
                        tracing::info!(
                            pods = program.pods.len(),
                            policies = program.policies.len(),
                            elements_added = changes.elements_added,
                            elements_removed = changes.elements_removed,
                            chains = changes.chains,
                            sets = changes.sets,
                            full = applied.is_none(),
                            ms = started.elapsed().as_secs_f64() * 1e3,
                            "applied the node's NetworkPolicy program"
                        );
                        applied = Some(ruleset);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "applying NetworkPolicy failed; replacing the whole table on the next pass");
                        applied = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "applying NetworkPolicy panicked");
                        applied = None;
                    }
                }
            }
        }
        loop {
            tokio::select! {
                _ = changed.notified() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    break;
                }
                _ = tick.tick() => {
                    let Some(current) = &applied else { break };
                    match tokio::task::spawn_blocking(nft::counters).await {
                        Ok(Ok(now)) => {
                            for (name, delta) in drop_deltas(&mut counted, &now) {
                                let Some(counter) = current.counters.get(&name) else { continue };
                                health.metrics.count_policy_drops(counter.direction, &counter.policies, delta);
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "the policy table is unreadable (removed?); replacing it");
                            applied = None;
                            break;
                        }
                        Err(e) => tracing::warn!(error = %e, "reading policy counters panicked"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_deltas_count_growth_and_restart_from_zero_when_recreated() {
        let mut last = HashMap::new();
        let now = BTreeMap::from([("a".to_string(), 5), ("b".to_string(), 0)]);
        assert_eq!(drop_deltas(&mut last, &now), vec![("a".to_string(), 5)]);
        let now = BTreeMap::from([("a".to_string(), 7), ("b".to_string(), 2)]);
        assert_eq!(
            drop_deltas(&mut last, &now),
            vec![("a".to_string(), 2), ("b".to_string(), 2)]
        );
        // a recreated (3 < 7), b gone.
        let now = BTreeMap::from([("a".to_string(), 3)]);
        assert_eq!(drop_deltas(&mut last, &now), vec![("a".to_string(), 3)]);
        assert!(!last.contains_key("b"));
    }
}
