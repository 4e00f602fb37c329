//! The status of ClusterNetworkPolicies: every meshd reads each policy the
//! same way ([`weft_policy::cnp::parse`]) and so computes the same
//! `Accepted` condition; it writes it only where the stored one says
//! otherwise, so nodes racing each other settle after one write, and the
//! writer records a Warning Event when the policy is not enforced as
//! written. Diagnostic only, like `weft.dev/policy-applied`: any node could
//! write it.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};
use weft_policy::cnp::{self, ClusterNetworkPolicy};

use crate::cluster::{self, Events, Warning};

/// Whether `object`'s stored status lacks `condition`: none stored, one
/// for another generation, or another verdict. Not the transition time
/// (every node stamps its own), nor the message alone (meshds of two
/// releases, side by side in a rollout, may word it differently and must
/// not overwrite each other back and forth).
pub fn needs_write(object: &ClusterNetworkPolicy, condition: &Condition) -> bool {
    differs(cnp::stored_condition(object, &condition.type_), condition)
}

/// Whether `stored` says other than `condition`, as [`needs_write`]
/// judges it (also for WeftPeers' status, `crate::peer_status`).
pub fn differs(stored: Option<Condition>, condition: &Condition) -> bool {
    stored.is_none_or(|c| {
        (&c.status, &c.reason, c.observed_generation)
            != (
                &condition.status,
                &condition.reason,
                condition.observed_generation,
            )
    })
}

/// Writes ClusterNetworkPolicies' status, off the enforcement loop.
pub struct Status {
    api: Api<ClusterNetworkPolicy>,
    events: Events,
    /// The watched objects: what is stored when a write is due.
    store: Store<ClusterNetworkPolicy>,
    /// This node's name: where in the spread its writes fall.
    node: String,
}

/// Nodes spread their writes over this long, each looking again before
/// it writes: the first one's write lands and the others find nothing to
/// do, instead of every node of the cluster trying at once.
const SPREAD: Duration = Duration::from_secs(2);

/// Where in [`SPREAD`] `node` writes about `policy`: fixed per pair, so
/// the same node is not always first.
pub(crate) fn delay(node: &str, policy: &str) -> Duration {
    let mut h = DefaultHasher::new();
    (node, policy).hash(&mut h);
    SPREAD.mul_f64((h.finish() % 1000) as f64 / 1000.0)
}

impl Status {
    pub fn new(
        api: Api<ClusterNetworkPolicy>,
        events: Events,
        store: Store<ClusterNetworkPolicy>,
        node: &str,
    ) -> Self {
        Self {
            api,
            events,
            store,
            node: node.to_string(),
        }
    }

    /// Brings the status of `objects` up to date in the background.
    pub fn report(&self, objects: Vec<ClusterNetworkPolicy>) {
        for object in objects.into_iter().filter(|o| due(o).is_some()) {
            let name = object.name_any();
            let (api, events, store) = (self.api.clone(), self.events.clone(), self.store.clone());
            let wait = delay(&self.node, &name);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let Some(now) = store.get(&ObjectRef::new(&name)) else {
                    return;
                };
                let Some(condition) = due(&now) else { return };
                if let Err(e) = write(&api, &events, &now, condition).await {
                    tracing::warn!(policy = %name, error = %format!("{e:#}"), "writing a ClusterNetworkPolicy's status");
                }
            });
        }
    }
}

/// The condition to write on `object`, if its stored one differs.
fn due(object: &ClusterNetworkPolicy) -> Option<Condition> {
    let condition = cnp::condition(
        object,
        &cnp::parse(object),
        k8s_openapi::jiff::Timestamp::now(),
    );
    needs_write(object, &condition).then_some(condition)
}

async fn write(
    api: &Api<ClusterNetworkPolicy>,
    events: &Events,
    object: &ClusterNetworkPolicy,
    condition: Condition,
) -> anyhow::Result<()> {
    let enforced_as_written = condition.status == "True";
    let message = condition.message.clone();
    // Only the node whose write went through records the Event.
    let status = serde_json::json!({"conditions": [condition]});
    if !cluster::patch_status_once(api, object, status).await? || enforced_as_written {
        return Ok(());
    }
    tracing::warn!(policy = %object.name_any(), %message, "a ClusterNetworkPolicy is not enforced as written");
    let regarding = cluster::reference(object);
    let warning = Warning {
        action: "Enforce",
        reason: "WeftPolicyInvalid",
        note: message,
    };
    cluster::warn(events, regarding, warning).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(status: serde_json::Value) -> ClusterNetworkPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "generation": 2},
            "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn writes_are_spread_over_nodes_and_policies() {
        let delays: std::collections::BTreeSet<Duration> =
            (0..50).map(|n| delay(&format!("node-{n}"), "p")).collect();
        assert!(delays.len() > 40, "{delays:?}");
        assert!(delays.iter().all(|d| *d < SPREAD));
        assert_eq!(delay("node-1", "p"), delay("node-1", "p"));
        assert_ne!(delay("node-1", "p"), delay("node-1", "q"));
    }

    #[test]
    fn the_condition_is_written_once_whoever_stamped_it() {
        let fresh = object(json!({"conditions": []}));
        let reading = cnp::parse(&fresh);
        let now = k8s_openapi::jiff::Timestamp::now();
        let condition = cnp::condition(&fresh, &reading, now);
        assert_eq!(condition.status, "True");
        assert!(needs_write(&fresh, &condition));
        // Another node wrote it a second earlier.
        let mut written = condition.clone();
        written.last_transition_time.0 = now - std::time::Duration::from_secs(1);
        let stored = object(json!({"conditions": [written]}));
        assert!(!needs_write(&stored, &condition));
        // Another release's wording is left alone.
        let mut worded = condition.clone();
        worded.message = "enforced".into();
        assert!(!needs_write(
            &object(json!({"conditions": [worded]})),
            &condition
        ));
        // A stored condition that cannot be read is written over.
        let odd = object(
            json!({"conditions": [{"type": "Accepted", "lastTransitionTime": "2026-01-01T00:00:00a1Z"}]}),
        );
        assert!(needs_write(&odd, &condition));
        // A newer generation is written again.
        let mut newer = stored.clone();
        newer.metadata.generation = Some(3);
        let condition = cnp::condition(&newer, &cnp::parse(&newer), now);
        assert!(needs_write(&newer, &condition));
    }
}
