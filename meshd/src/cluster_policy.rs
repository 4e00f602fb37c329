//! The status of ClusterNetworkPolicies: every meshd reads each policy the
//! same way ([`weft_policy::cnp::parse`]) and so computes the same
//! `Accepted` condition; it writes it only where the stored one says
//! otherwise, so nodes racing each other settle after one write, and the
//! writer records a Warning Event when the policy is not enforced as
//! written. Diagnostic only, like `weft.dev/policy-applied`: any node could
//! write it.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use weft_policy::cnp::{self, ClusterNetworkPolicy};

use crate::cluster::{self, Events, Warning};

/// Whether `object`'s stored status lacks `condition` (the transition
/// time aside: every node stamps its own).
pub fn needs_write(object: &ClusterNetworkPolicy, condition: &Condition) -> bool {
    let stored = object
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == condition.type_);
    stored.is_none_or(|c| {
        (&c.status, &c.reason, &c.message, c.observed_generation)
            != (
                &condition.status,
                &condition.reason,
                &condition.message,
                condition.observed_generation,
            )
    })
}

/// Writes ClusterNetworkPolicies' status, off the enforcement loop.
pub struct Status {
    api: Api<ClusterNetworkPolicy>,
    events: Events,
}

impl Status {
    pub fn new(api: Api<ClusterNetworkPolicy>, events: Events) -> Self {
        Self { api, events }
    }

    /// Brings the status of `objects` up to date in the background.
    pub fn report(&self, objects: Vec<ClusterNetworkPolicy>) {
        let (api, events) = (self.api.clone(), self.events.clone());
        let due: Vec<(ClusterNetworkPolicy, Condition)> = objects
            .into_iter()
            .map(|o| {
                let reading = cnp::parse(&o);
                let condition = cnp::condition(&o, &reading, k8s_openapi::jiff::Timestamp::now());
                (o, condition)
            })
            .filter(|(o, c)| needs_write(o, c))
            .collect();
        if due.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for (object, condition) in due {
                let name = object.name_any();
                if let Err(e) = write(&api, &events, &object, condition).await {
                    tracing::warn!(policy = %name, error = %format!("{e:#}"), "writing a ClusterNetworkPolicy's status");
                }
            }
        });
    }
}

async fn write(
    api: &Api<ClusterNetworkPolicy>,
    events: &Events,
    object: &ClusterNetworkPolicy,
    condition: Condition,
) -> anyhow::Result<()> {
    let name = object.name_any();
    let enforced_as_written = condition.status == "True";
    let message = condition.message.clone();
    // The version read is a precondition: of nodes racing to write the
    // same condition one wins, and only it records the Event.
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": object.resource_version()},
        "status": {"conditions": [condition]},
    });
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    if enforced_as_written {
        return Ok(());
    }
    tracing::warn!(policy = %name, %message, "a ClusterNetworkPolicy is not enforced as written");
    let regarding = ObjectReference {
        api_version: Some(cnp::API_VERSION.into()),
        kind: Some("ClusterNetworkPolicy".into()),
        name: Some(name),
        uid: object.uid(),
        ..ObjectReference::default()
    };
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
        // A newer generation is written again.
        let mut newer = stored.clone();
        newer.metadata.generation = Some(3);
        let condition = cnp::condition(&newer, &cnp::parse(&newer), now);
        assert!(needs_write(&newer, &condition));
    }
}
