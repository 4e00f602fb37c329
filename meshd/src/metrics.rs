//! Prometheus metrics (prometheus-client), documented in docs/operations.md.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use weft_policy::Direction;

use crate::model::Hop;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub node: String,
    pub public_key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub direction: String,
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HopLabels {
    pub hop: String,
}

pub struct Metrics {
    registry: Registry,
    pub peers: Family<StateLabels, Gauge>,
    pub paths: Family<HopLabels, Gauge>,
    pub handshake_age: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    pub rx_bytes: Family<PeerLabels, Gauge>,
    pub tx_bytes: Family<PeerLabels, Gauge>,
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    pub reconcile_seconds: Histogram,
    pub changes: Family<KindLabels, Counter>,
    pub rejected: Family<ReasonLabels, Counter>,
    pub excluded: Family<ReasonLabels, Gauge>,
    pub api_writes: Family<KindLabels, Counter>,
    pub dataplane_starts: Counter,
    pub probes: Family<KindLabels, Counter>,
    pub key_events: Family<KindLabels, Counter>,
    pub policy_revision: Gauge,
    pub policy_drops: Family<PolicyLabels, Counter>,
    pub policy_elements: Gauge,
    pub policy_unbound_addresses: Counter,
    pub pq_links: Family<StateLabels, Gauge>,
    pub pq_failures: Family<PeerNameLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerNameLabels {
    pub node: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weft");
        let m = Self {
            peers: Family::default(),
            paths: Family::default(),
            handshake_age: Family::default(),
            rx_bytes: Family::default(),
            tx_bytes: Family::default(),
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            changes: Family::default(),
            rejected: Family::default(),
            excluded: Family::default(),
            api_writes: Family::default(),
            dataplane_starts: Counter::default(),
            probes: Family::default(),
            key_events: Family::default(),
            policy_revision: Gauge::default(),
            policy_drops: Family::default(),
            policy_elements: Gauge::default(),
            policy_unbound_addresses: Counter::default(),
            pq_links: Family::default(),
            pq_failures: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "peers",
            "WireGuard peers by state (up: heard from recently; down: silent past --peer-timeout)",
            m.peers.clone(),
        );
        registry.register(
            "paths",
            "Other nodes by how this node reaches them: direct, relayed (through a third node), none (no working path)",
            m.paths.clone(),
        );
        registry.register(
            "peer_last_handshake_age_seconds",
            "Seconds since the last completed handshake with a peer (absent: never)",
            m.handshake_age.clone(),
        );
        registry.register(
            "peer_rx_bytes",
            "Bytes received from a peer, as the data plane reports",
            m.rx_bytes.clone(),
        );
        registry.register(
            "peer_tx_bytes",
            "Bytes sent to a peer, as the data plane reports",
            m.tx_bytes.clone(),
        );
        registry.register(
            "key_events",
            "Key rotation steps: started, finished, timed_out (the overlap ran out), replaced_revoked",
            m.key_events.clone(),
        );
        registry.register("reconciles", "Reconcile passes", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconcile passes that failed (retried)",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of a reconcile pass",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "dataplane_changes",
            "Changes made to the node: wireguard, link, address, route",
            m.changes.clone(),
        );
        registry.register(
            "rejected_annotations",
            "Nodes newly excluded for their annotations, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "excluded_nodes",
            "Nodes currently excluded from the mesh, by reason",
            m.excluded.clone(),
        );
        registry.register(
            "api_writes",
            "Writes to the API server: annotations, event",
            m.api_writes.clone(),
        );
        registry.register(
            "dataplane_starts",
            "Times meshd configured a new WireGuard device from scratch: one it created, or one that replaced the device it had configured (a restarted data plane container)",
            m.dataplane_starts.clone(),
        );
        registry.register(
            "probes",
            "Probes sent through the tunnel to peers' own mesh addresses (ICMP echoes; UDP to the discard port without CAP_NET_RAW): kind=liveness to a peer sent traffic and not heard since, kind=echo-check to learn whether a peer answers echoes (until it does, once per --peer-timeout), kind=handshake to a new peer or one whose endpoint or key changed",
            m.probes.clone(),
        );
        registry.register(
            "policy_synced_revision",
            "The newest resourceVersion of a Pod, Namespace or NetworkPolicy event that the applied policy program reflects (numeric resourceVersions; 0 before the first apply)",
            m.policy_revision.clone(),
        );
        registry.register(
            "policy_dropped_packets",
            "Packets NetworkPolicy dropped, by direction and by each policy isolating the pod (a drop under two policies counts for both)",
            m.policy_drops.clone(),
        );
        registry.register(
            "policy_elements",
            "Set and map elements of the applied NetworkPolicy ruleset",
            m.policy_elements.clone(),
        );
        registry.register(
            "policy_unbound_pod_addresses",
            "Pod addresses NetworkPolicy ignored because they lie outside the pod CIDRs of the pod's node (a kubelet reporting another node's address); each pod's set counted when it changes",
            m.policy_unbound_addresses.clone(),
        );
        registry.register(
            "post_quantum_links",
            "Peer nodes by post-quantum state (WEFT_POST_QUANTUM): live (a handshake under an agreed key happened), pending (agreed, not yet handshaken), classical (none agreed)",
            m.pq_links.clone(),
        );
        registry.register(
            "post_quantum_exchange_failures",
            "Post-quantum exchanges given up (no answer) and messages refused (a wrong tag, malformed), by peer node",
            m.pq_failures.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn count_change(&self, kind: &str, n: usize) {
        if n > 0 {
            self.changes
                .get_or_create(&KindLabels { kind: kind.into() })
                .inc_by(n as u64);
        }
    }

    pub fn count_policy_drops(&self, direction: Direction, policies: &[String], packets: u64) {
        let direction = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        for policy in policies {
            self.policy_drops
                .get_or_create(&PolicyLabels {
                    direction: direction.into(),
                    policy: policy.clone(),
                })
                .inc_by(packets);
        }
    }

    /// Sets the path gauges from this node's paths.
    pub fn set_paths(&self, paths: &BTreeMap<String, Hop>) {
        for hop in ["direct", "relayed", "none"] {
            let n = paths.values().filter(|h| hop_label(h) == hop).count();
            self.paths
                .get_or_create(&HopLabels { hop: hop.into() })
                .set(n as i64);
        }
    }

    pub fn count_rotation(&self, event: &crate::rotation::Event) {
        use crate::rotation::Event;
        let kind = match event {
            Event::Started { .. } => "started",
            Event::Finished => "finished",
            Event::TimedOut { .. } => "timed_out",
            Event::Replaced { .. } => "replaced_revoked",
        };
        self.key_events
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn count_pq_failure(&self, node: &str) {
        self.pq_failures
            .get_or_create(&PeerNameLabels { node: node.into() })
            .inc();
    }

    pub fn set_pq_links(&self, states: &std::collections::BTreeMap<String, crate::pq::State>) {
        use crate::pq::State;
        for (state, name) in [
            (State::Live, "live"),
            (State::Pending, "pending"),
            (State::Classical, "classical"),
        ] {
            self.pq_links
                .get_or_create(&StateLabels { state: name.into() })
                .set(states.values().filter(|s| **s == state).count() as i64);
        }
    }

    pub fn count_write(&self, kind: &str) {
        self.api_writes
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }
}

/// The metric label of a path.
pub fn hop_label(hop: &Hop) -> &'static str {
    match hop {
        Hop::Direct => "direct",
        Hop::Via(_) => "relayed",
        Hop::None => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_prefix_and_labels() {
        let m = Metrics::default();
        m.count_change("route", 2);
        m.count_write("annotations");
        m.peers
            .get_or_create(&StateLabels { state: "up".into() })
            .set(3);
        let text = m.encode();
        assert!(
            text.contains("weft_dataplane_changes_total{kind=\"route\"} 2"),
            "{text}"
        );
        assert!(text.contains("weft_api_writes_total{kind=\"annotations\"} 1"));
        assert!(text.contains("weft_peers{state=\"up\"} 3"));
        assert!(text.contains("# TYPE weft_reconcile_duration_seconds histogram"));
    }
}
