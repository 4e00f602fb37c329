//! The status of WeftPeers: every meshd reaches the same verdict and
//! gateway for each ([`crate::peers::judge`]), so each computes the same
//! `Accepted` condition and `status.gateway`; it writes them only where the
//! stored ones say otherwise, spread over the nodes as ClusterNetworkPolicy
//! status is ([`crate::cluster_policy`]), and the writer records a Warning
//! Event when the peer is not in the mesh. Diagnostic only: routing never
//! reads it back.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::Api;

use crate::cluster::{self, Events, Warning};
use crate::cluster_policy::{delay, differs};
use crate::peers::{PeerError, PeerVerdict, WeftPeer};

/// What the status of a peer with `verdict` says: the condition and the
/// gateway.
pub fn condition(
    object: &WeftPeer,
    verdict: &PeerVerdict,
    now: k8s_openapi::jiff::Timestamp,
) -> (Condition, Option<String>) {
    let (status, reason, message, gateway) = match verdict {
        PeerVerdict::Accepted {
            gateway: Some(g), ..
        } => (
            "True",
            "Accepted",
            format!("through gateway {g}"),
            Some(g.clone()),
        ),
        PeerVerdict::Accepted { gateway: None, .. } => (
            "False",
            "NoGateway",
            "no candidate gateway is in the mesh and up: its addresses are unreachable".into(),
            None,
        ),
        PeerVerdict::Rejected(e) => {
            let reason = match e {
                PeerError::Conflict { .. } => "Conflict",
                PeerError::Revoked => "Revoked",
                _ => "Invalid",
            };
            ("False", reason, e.to_string(), None)
        }
    };
    let condition = Condition {
        type_: "Accepted".into(),
        status: status.into(),
        reason: reason.into(),
        message: message.chars().take(1024).collect(),
        observed_generation: object.metadata.generation,
        last_transition_time: Time(now),
    };
    (condition, gateway)
}

/// Whether `object`'s stored status says other than `condition` and
/// `gateway`.
pub fn needs_write(object: &WeftPeer, condition: &Condition, gateway: Option<&str>) -> bool {
    let stored = object
        .status
        .get("conditions")
        .and_then(|c| c.as_array())
        .and_then(|all| {
            all.iter().find_map(|c| {
                let c: Condition = serde_json::from_value(c.clone()).ok()?;
                (c.type_ == condition.type_).then_some(c)
            })
        });
    let stored_gateway = object.status.get("gateway").and_then(|g| g.as_str());
    differs(stored, condition) || stored_gateway != gateway
}

/// Writes WeftPeers' status, off the sync.
pub struct Status {
    api: Api<WeftPeer>,
    events: Events,
    store: Store<WeftPeer>,
    node: String,
}

impl Status {
    pub fn new(api: Api<WeftPeer>, events: Events, store: Store<WeftPeer>, node: &str) -> Self {
        Self {
            api,
            events,
            store,
            node: node.to_string(),
        }
    }

    /// Brings each peer's status to `verdicts` in the background.
    pub fn report(&self, verdicts: &BTreeMap<String, PeerVerdict>) {
        let now = k8s_openapi::jiff::Timestamp::now();
        for (name, verdict) in verdicts {
            let Some(object) = self.store.get(&ObjectRef::new(name)) else {
                continue;
            };
            let (condition, gateway) = condition(&object, verdict, now);
            if !needs_write(&object, &condition, gateway.as_deref()) {
                continue;
            }
            let (api, events, store) = (self.api.clone(), self.events.clone(), self.store.clone());
            let (name, wait) = (name.clone(), delay(&self.node, name));
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let Some(now) = store.get(&ObjectRef::new(&name)) else {
                    return;
                };
                if !needs_write(&now, &condition, gateway.as_deref()) {
                    return;
                }
                if let Err(e) = write(&api, &events, &now, condition, gateway).await {
                    tracing::warn!(peer = %name, error = %format!("{e:#}"), "writing a WeftPeer's status");
                }
            });
        }
    }
}

async fn write(
    api: &Api<WeftPeer>,
    events: &Events,
    object: &WeftPeer,
    condition: Condition,
    gateway: Option<String>,
) -> anyhow::Result<()> {
    let in_mesh = condition.status == "True";
    let message = condition.message.clone();
    // Only the node whose write went through records the Event.
    let status = serde_json::json!({"conditions": [condition], "gateway": gateway});
    if !cluster::patch_status_once(api, object, status).await? || in_mesh {
        return Ok(());
    }
    let regarding = cluster::reference(object);
    let warning = Warning {
        action: "Admit",
        reason: "WeftPeerNotInMesh",
        note: message,
    };
    cluster::warn(events, regarding, warning).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(status: serde_json::Value) -> WeftPeer {
        serde_json::from_value(json!({
            "metadata": {"name": "laptop", "generation": 1},
            "spec": {},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn status_is_written_once_and_again_when_the_verdict_or_gateway_moves() {
        let now = k8s_openapi::jiff::Timestamp::now();
        let fresh = object(serde_json::Value::Null);
        let peer = crate::peers::ExternalPeer {
            name: "laptop".into(),
            created: 0,
            public_key: weft_keys::PrivateKey::generate().public_key(),
            endpoint: None,
            addresses: vec!["100.65.0.1".parse().unwrap()],
            reach: Vec::new(),
            gateways: Vec::new(),
        };
        let via = |g: Option<&str>| PeerVerdict::Accepted {
            peer: peer.clone(),
            gateway: g.map(str::to_string),
        };
        let (c, g) = condition(&fresh, &via(Some("node-2")), now);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Accepted"));
        assert!(needs_write(&fresh, &c, g.as_deref()));
        let written = object(json!({"conditions": [c], "gateway": "node-2"}));
        let (again, g) = condition(&written, &via(Some("node-2")), now);
        assert!(!needs_write(&written, &again, g.as_deref()), "settled");
        let (moved, g) = condition(&written, &via(Some("node-3")), now);
        assert!(needs_write(&written, &moved, g.as_deref()), "failed over");
        let (none, g) = condition(&written, &via(None), now);
        assert_eq!(
            (none.status.as_str(), none.reason.as_str()),
            ("False", "NoGateway")
        );
        assert!(needs_write(&written, &none, g.as_deref()));
        let (revoked, _) = condition(&written, &PeerVerdict::Rejected(PeerError::Revoked), now);
        assert_eq!(revoked.reason, "Revoked");
        let (bad, _) = condition(
            &written,
            &PeerVerdict::Rejected(PeerError::Address("x".into())),
            now,
        );
        assert_eq!(bad.reason, "Invalid");
        assert!(bad.message.starts_with("spec.addresses"));
    }
}
