//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`,
//! network-policy-api v0.2.0): the object, and what one node can enforce
//! of it, read from the object alone (so every node reads it alike, and
//! the status every node would write is the same).
//!
//! The spec is kept as written and read by [`parse`]: a real API server
//! validates it against the CRD's schema, but an object that slipped past
//! one (an older CRD, a server without schema checks) must not break the
//! watch of every other object, nor be half-read. What cannot be used is
//! handled as the API's documentation says for a peer it does not know:
//! an Accept rule matches nothing by it, a Deny or Pass rule becomes "deny
//! all" — never more open than the author meant.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{IPBlock, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{PodInfo, Protocol};
use crate::selector;

/// The API's `v1alpha2` ClusterNetworkPolicy, cluster-scoped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterNetworkPolicy {
    pub metadata: ObjectMeta,
    /// As written; see [`parse`].
    #[serde(default)]
    pub spec: Value,
    /// As written (by any node, or anyone allowed to): read leniently by
    /// [`stored_condition`], so an odd one cannot break the watch either.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub status: Value,
}

/// The stored condition of type `type_`, if one can be read.
pub fn stored_condition(object: &ClusterNetworkPolicy, type_: &str) -> Option<Condition> {
    object
        .status
        .get("conditions")?
        .as_array()?
        .iter()
        .find_map(|c| {
            let c: Condition = serde_json::from_value(c.clone()).ok()?;
            (c.type_ == type_).then_some(c)
        })
}

/// The API version this module reads.
pub const API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";

impl k8s_openapi::Resource for ClusterNetworkPolicy {
    const API_VERSION: &'static str = API_VERSION;
    const GROUP: &'static str = "policy.networking.k8s.io";
    const KIND: &'static str = "ClusterNetworkPolicy";
    const VERSION: &'static str = "v1alpha2";
    const URL_PATH_SEGMENT: &'static str = "clusternetworkpolicies";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::ListableResource for ClusterNetworkPolicy {
    const LIST_KIND: &'static str = "ClusterNetworkPolicyList";
}

impl k8s_openapi::Metadata for ClusterNetworkPolicy {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Which tier a policy is in: Admin before NetworkPolicy, Baseline after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Tier {
    Admin,
    Baseline,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Action {
    /// Allowed, and no later tier is asked (an egress Accept still meets
    /// the destination's ingress).
    Accept,
    Deny,
    /// The rest of this tier is skipped: the next tier decides.
    Pass,
}

// The spec as the API defines it, read by `parse`. Unknown fields are
// ignored here as structural pruning drops them; a peer or protocol entry
// left with no known field is what the fail-closed rule is about.

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    tier: Tier,
    priority: i32,
    subject: Subject,
    // Read rule by rule: one rule that cannot be read must not take the
    // policy's other rules (its Denies) with it.
    #[serde(default)]
    ingress: Vec<Value>,
    #[serde(default)]
    egress: Vec<Value>,
}

#[derive(Deserialize)]
struct Subject {
    namespaces: Option<LabelSelector>,
    pods: Option<NamespacedPod>,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct NamespacedPod {
    /// Absent: every namespace.
    #[serde(default)]
    namespace_selector: LabelSelector,
    pod_selector: LabelSelector,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecRule {
    name: Option<String>,
    action: Action,
    // `from` for ingress, `to` for egress.
    #[serde(alias = "to")]
    from: Vec<SpecPeer>,
    protocols: Option<Vec<SpecProtocol>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecPeer {
    namespaces: Option<LabelSelector>,
    pods: Option<NamespacedPod>,
    networks: Option<Vec<String>>,
    nodes: Option<LabelSelector>,
    domain_names: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecProtocol {
    tcp: Option<SpecPorts>,
    udp: Option<SpecPorts>,
    sctp: Option<SpecPorts>,
    destination_named_port: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecPorts {
    destination_port: Option<SpecPort>,
}

#[derive(Deserialize)]
struct SpecPort {
    number: Option<i32>,
    range: Option<SpecRange>,
}

#[derive(Deserialize)]
struct SpecRange {
    start: i32,
    end: i32,
}

/// Whom a policy applies to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Selects {
    /// Every pod of the namespaces this selects.
    Namespaces(LabelSelector),
    /// The pods `pod` selects in the namespaces `namespace` selects.
    Pods {
        namespace: LabelSelector,
        pod: LabelSelector,
    },
}

impl Selects {
    /// Whether `pod`, whose namespace has `namespace_labels`, is a subject.
    pub fn selects(
        &self,
        pod: &PodInfo,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> bool {
        let Some(labels) = namespace_labels else {
            return false;
        };
        match self {
            Self::Namespaces(ns) => selector::matches(ns, labels),
            Self::Pods { namespace, pod: p } => {
                selector::matches(namespace, labels) && selector::matches(p, &pod.labels)
            }
        }
    }
}

/// One rule as a node enforces it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRule {
    pub name: Option<String>,
    /// After the fail-closed rule: an unusable Deny or Pass is a Deny.
    pub action: Action,
    /// The peers as NetworkPolicy peers (namespaceSelector always set, so
    /// no policy namespace is implied), `networks` as ipBlocks. Empty with
    /// no `nodes`: the rule matches no address (an Accept whose peers are
    /// all unusable), unless `any_peer`.
    pub peers: Vec<NetworkPolicyPeer>,
    /// `nodes` peers: every address of the Nodes they select.
    pub nodes: Vec<LabelSelector>,
    /// The rule matches every address (an unusable Deny or Pass: "deny all").
    pub any_peer: bool,
    /// `None`: every protocol and port. `Some(empty)`: none.
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

/// A policy as a node enforces it.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub name: String,
    pub tier: Tier,
    pub priority: i32,
    pub subject: Selects,
    pub ingress: Vec<ParsedRule>,
    pub egress: Vec<ParsedRule>,
}

impl Parsed {
    /// The order policies of one tier are asked in: priority, then name
    /// (the API leaves equal priorities to implementations; Weft's choice
    /// is stable and the same on every node).
    pub fn order(&self) -> (i32, &str) {
        (self.priority, &self.name)
    }
}

/// What [`parse`] found: the policy if it can be enforced at all, and
/// every problem, each naming its field.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub policy: Option<Parsed>,
    pub problems: Vec<String>,
}

/// The highest priority the API allows.
pub const MAX_PRIORITY: i32 = 1000;
/// Most rules per direction, peers per rule, protocols per rule.
const MAX_ENTRIES: usize = 25;

/// Reads a policy. Without a usable tier, priority or subject nothing can
/// be enforced (`policy: None`); a rule's unusable parts are handled by the
/// fail-closed rule and reported.
pub fn parse(object: &ClusterNetworkPolicy) -> Reading {
    let name = object.metadata.name.clone().unwrap_or_default();
    let mut problems = Vec::new();
    let spec: Spec = match serde_path_to_error::deserialize(&object.spec) {
        Ok(spec) => spec,
        Err(e) => {
            let field = match e.path().to_string().as_str() {
                "." => "spec".to_string(),
                path => format!("spec.{path}"),
            };
            problems.push(format!("{field}: {}", e.into_inner()));
            return Reading {
                policy: None,
                problems,
            };
        }
    };
    if !(0..=MAX_PRIORITY).contains(&spec.priority) {
        problems.push(format!(
            "spec.priority: {} is not in 0..={MAX_PRIORITY} (taken as {})",
            spec.priority,
            spec.priority.clamp(0, MAX_PRIORITY)
        ));
    }
    let subject = match (spec.subject.namespaces, spec.subject.pods) {
        (Some(ns), None) => checked(&ns, "spec.subject.namespaces", &mut problems)
            .then_some(Selects::Namespaces(ns)),
        (None, Some(p)) => {
            let ok = checked(
                &p.namespace_selector,
                "spec.subject.pods.namespaceSelector",
                &mut problems,
            ) & checked(
                &p.pod_selector,
                "spec.subject.pods.podSelector",
                &mut problems,
            );
            ok.then_some(Selects::Pods {
                namespace: p.namespace_selector,
                pod: p.pod_selector,
            })
        }
        _ => {
            problems.push("spec.subject: needs exactly one of namespaces and pods".into());
            None
        }
    };
    for (field, len) in [
        ("ingress", spec.ingress.len()),
        ("egress", spec.egress.len()),
    ] {
        if len > MAX_ENTRIES {
            problems.push(format!("spec.{field}: {len} rules, at most {MAX_ENTRIES}"));
        }
    }
    let ingress = rules(&spec.ingress, "ingress", &mut problems);
    let egress = rules(&spec.egress, "egress", &mut problems);
    let policy = subject.map(|subject| Parsed {
        name,
        tier: spec.tier,
        priority: spec.priority.clamp(0, MAX_PRIORITY),
        subject,
        ingress,
        egress,
    });
    Reading { policy, problems }
}

/// Whether `sel` is usable, reporting it under `field` if not.
fn checked(sel: &LabelSelector, field: &str, problems: &mut Vec<String>) -> bool {
    match selector::check(sel) {
        Ok(()) => true,
        Err(e) => {
            problems.push(format!("{field}: {e}"));
            false
        }
    }
}

fn rules(list: &[Value], direction: &str, problems: &mut Vec<String>) -> Vec<ParsedRule> {
    list.iter()
        .enumerate()
        .map(|(i, value)| {
            let at = format!("spec.{direction}[{i}]");
            match serde_path_to_error::deserialize::<_, SpecRule>(value) {
                Ok(r) => rule(&r, &at, direction, problems),
                Err(e) => {
                    let path = e.path().to_string();
                    let field = if path == "." {
                        at
                    } else {
                        format!("{at}.{path}")
                    };
                    problems.push(format!("{field}: {}", e.into_inner()));
                    // Whatever it meant, it stops everything.
                    ParsedRule {
                        name: value
                            .get("name")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                        action: Action::Deny,
                        peers: Vec::new(),
                        nodes: Vec::new(),
                        any_peer: true,
                        ports: None,
                    }
                }
            }
        })
        .collect()
}

fn rule(r: &SpecRule, at: &str, direction: &str, problems: &mut Vec<String>) -> ParsedRule {
    let peers_field = if direction == "ingress" { "from" } else { "to" };
    if r.from.is_empty() || r.from.len() > MAX_ENTRIES {
        problems.push(format!(
            "{at}.{peers_field}: {} peers, needs 1 to {MAX_ENTRIES}",
            r.from.len()
        ));
    }
    let mut unusable = r.from.is_empty() || r.from.len() > MAX_ENTRIES;
    let mut peers = Vec::new();
    let mut nodes = Vec::new();
    for (j, p) in r.from.iter().enumerate() {
        let here = format!("{at}.{peers_field}[{j}]");
        match peer(p, &here, direction == "ingress", problems) {
            Some(Peer::Api(mut list)) => peers.append(&mut list),
            Some(Peer::Nodes(sel)) => nodes.push(sel),
            None => unusable = true,
        }
    }
    let named_with_addresses = r
        .protocols
        .iter()
        .flatten()
        .any(|p| p.destination_named_port.is_some())
        && r.from
            .iter()
            .any(|p| p.networks.is_some() || p.nodes.is_some() || p.domain_names.is_some());
    if named_with_addresses {
        problems.push(format!(
            "{at}.protocols: destinationNamedPort cannot be used with networks, nodes or domainNames peers"
        ));
        unusable = true;
    }
    let ports = r.protocols.as_ref().map(|list| {
        if list.is_empty() || list.len() > MAX_ENTRIES {
            problems.push(format!(
                "{at}.protocols: {} entries, needs 1 to {MAX_ENTRIES}",
                list.len()
            ));
            unusable = true;
        }
        let mut ports = Vec::new();
        for (j, p) in list.iter().enumerate() {
            match protocol_ports(p) {
                Ok(mut entries) => ports.append(&mut entries),
                Err(why) => {
                    problems.push(format!("{at}.protocols[{j}]: {why}"));
                    unusable = true;
                }
            }
        }
        ports
    });
    if let Some(name) = r.name.as_deref().filter(|n| n.len() > 100) {
        problems.push(format!("{at}.name: {} characters, at most 100", name.len()));
    }
    match (unusable, r.action) {
        // Deny all: whatever the author meant to stop, stopped.
        (true, Action::Deny | Action::Pass) => ParsedRule {
            name: r.name.clone(),
            action: Action::Deny,
            peers: Vec::new(),
            nodes: Vec::new(),
            any_peer: true,
            ports: None,
        },
        // An Accept opens only by what it could read; with no peer or port
        // left it opens nothing.
        (_, action) => ParsedRule {
            name: r.name.clone(),
            action,
            peers,
            nodes,
            any_peer: false,
            ports,
        },
    }
}

enum Peer {
    /// As NetworkPolicy peers (one per network for `networks`).
    Api(Vec<NetworkPolicyPeer>),
    Nodes(LabelSelector),
}

/// One peer, if usable (exactly one known field, usable values).
fn peer(p: &SpecPeer, at: &str, ingress: bool, problems: &mut Vec<String>) -> Option<Peer> {
    let set = [
        p.namespaces.is_some(),
        p.pods.is_some(),
        p.networks.is_some(),
        p.nodes.is_some(),
        p.domain_names.is_some(),
    ]
    .into_iter()
    .filter(|s| *s)
    .count();
    if set != 1 {
        problems.push(format!(
            "{at}: needs exactly one of namespaces, pods{}",
            if ingress {
                ""
            } else {
                ", networks, nodes and domainNames"
            }
        ));
        return None;
    }
    let from_api = |namespace: &LabelSelector, pod: Option<&LabelSelector>| {
        Peer::Api(vec![NetworkPolicyPeer {
            namespace_selector: Some(namespace.clone()),
            pod_selector: pod.cloned(),
            ip_block: None,
        }])
    };
    if let Some(ns) = &p.namespaces {
        return checked(ns, &format!("{at}.namespaces"), problems).then(|| from_api(ns, None));
    }
    if let Some(pods) = &p.pods {
        let ok = checked(
            &pods.namespace_selector,
            &format!("{at}.pods.namespaceSelector"),
            problems,
        ) & checked(
            &pods.pod_selector,
            &format!("{at}.pods.podSelector"),
            problems,
        );
        return ok.then(|| from_api(&pods.namespace_selector, Some(&pods.pod_selector)));
    }
    if ingress {
        problems.push(format!("{at}: ingress peers are namespaces or pods only"));
        return None;
    }
    if let Some(nodes) = &p.nodes {
        return checked(nodes, &format!("{at}.nodes"), problems)
            .then(|| Peer::Nodes(nodes.clone()));
    }
    if p.domain_names.is_some() {
        problems.push(format!(
            "{at}.domainNames: not supported by Weft (a rule with it matches nothing if it accepts, everything if it denies or passes)"
        ));
        return None;
    }
    let networks = p.networks.as_deref().unwrap_or_default();
    if networks.is_empty() || networks.len() > MAX_ENTRIES {
        problems.push(format!(
            "{at}.networks: {} entries, needs 1 to {MAX_ENTRIES}",
            networks.len()
        ));
        return None;
    }
    // One ipBlock per network; a bad one spoils the peer.
    let mut blocks = Vec::new();
    for (k, cidr) in networks.iter().enumerate() {
        if cidr.parse::<ipnet::IpNet>().is_err() {
            problems.push(format!("{at}.networks[{k}]: {cidr:?} is not a CIDR"));
            return None;
        }
        blocks.push(NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.clone(),
                except: None,
            }),
            namespace_selector: None,
            pod_selector: None,
        });
    }
    Some(Peer::Api(blocks))
}

/// One `protocols` entry as NetworkPolicy ports.
fn protocol_ports(p: &SpecProtocol) -> Result<Vec<NetworkPolicyPort>, Cow<'static, str>> {
    let numbered = [
        (Protocol::Tcp, &p.tcp),
        (Protocol::Udp, &p.udp),
        (Protocol::Sctp, &p.sctp),
    ];
    let set = numbered.iter().filter(|(_, s)| s.is_some()).count()
        + usize::from(p.destination_named_port.is_some());
    if set != 1 {
        return Err("needs exactly one of tcp, udp, sctp and destinationNamedPort".into());
    }
    let port = |protocol: Protocol, port: IntOrString, end: Option<i32>| NetworkPolicyPort {
        protocol: Some(protocol.to_string()),
        port: Some(port),
        end_port: end,
    };
    if let Some(name) = &p.destination_named_port {
        // A port name has a letter (IANA_SVC_NAME); digits alone would be
        // read as a number.
        if !name.chars().any(|c| c.is_ascii_alphabetic()) {
            return Err(format!("destinationNamedPort: {name:?} is not a port name").into());
        }
        // A name carries no protocol: it is the pod's, whichever it is.
        return Ok([Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .map(|proto| port(proto, IntOrString::String(name.clone()), None))
            .to_vec());
    }
    let (protocol, ports) = numbered
        .into_iter()
        .find_map(|(proto, s)| Some((proto, s.as_ref()?)))
        .ok_or("needs a protocol")?;
    let name = crate::render::protocol_name(protocol);
    let valid = |n: i32| (1..=65535).contains(&n);
    match ports
        .destination_port
        .as_ref()
        .map(|d| (d.number, d.range.as_ref()))
    {
        Some((Some(n), None)) if valid(n) => Ok(vec![port(protocol, IntOrString::Int(n), None)]),
        Some((None, Some(r))) if valid(r.start) && valid(r.end) && r.start < r.end => {
            Ok(vec![port(protocol, IntOrString::Int(r.start), Some(r.end))])
        }
        Some((Some(n), None)) => {
            Err(format!("{name}.destinationPort.number: {n} is not in 1..=65535").into())
        }
        Some((None, Some(r))) => Err(format!(
            "{name}.destinationPort.range: {}..{} needs 1 <= start < end <= 65535",
            r.start, r.end
        )
        .into()),
        _ => Err(format!("{name}.destinationPort: needs exactly one of number and range").into()),
    }
}

/// The API server takes condition messages up to 32768 bytes; problems are
/// the author's to multiply.
const MAX_MESSAGE: usize = 4096;

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

/// The condition every node computes for a policy from its reading: the
/// same on every node, so writers racing each other agree after one write.
/// `now` is when it changed, if it did.
pub fn condition(
    object: &ClusterNetworkPolicy,
    reading: &Reading,
    now: k8s_openapi::jiff::Timestamp,
) -> Condition {
    let (status, reason, message) = match (&reading.policy, reading.problems.is_empty()) {
        (Some(_), true) => ("True", "Accepted", "enforced as written".to_string()),
        (Some(_), false) => (
            "False",
            "InvalidRule",
            format!(
                "enforced fail-closed (unusable Accept parts open nothing; unusable Deny or Pass rules deny all): {}",
                reading.problems.join("; ")
            ),
        ),
        (None, _) => (
            "False",
            "Invalid",
            format!("not enforced: {}", reading.problems.join("; ")),
        ),
    };
    Condition {
        type_: "Accepted".into(),
        status: status.into(),
        reason: reason.into(),
        message: bounded(message),
        observed_generation: object.metadata.generation,
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(spec: Value) -> Reading {
        parse(&ClusterNetworkPolicy {
            metadata: ObjectMeta {
                name: Some("p".into()),
                ..ObjectMeta::default()
            },
            spec,
            status: Value::Null,
        })
    }

    fn with_rule(direction: &str, rule: Value) -> Value {
        json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}, direction: [rule]})
    }

    /// Objects nothing can be enforced of, each with the field named.
    #[test]
    fn unusable_objects_are_not_enforced_and_say_why() {
        let cases = [
            (
                json!({"priority": 1, "subject": {"namespaces": {}}}),
                "spec: missing field `tier`",
            ),
            (
                json!({"tier": "Middle", "priority": 1, "subject": {"namespaces": {}}}),
                "spec.tier: unknown variant",
            ),
            (
                json!({"tier": "Admin", "priority": 1, "subject": {}}),
                "spec.subject: needs exactly one",
            ),
            (
                json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {}, "pods": {"podSelector": {}}}}),
                "spec.subject: needs exactly one",
            ),
            (
                json!({"tier": "Admin", "priority": 1, "subject": {"namespaces": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}}),
                "spec.subject.namespaces: matchExpressions \"a\": unknown operator",
            ),
        ];
        for (spec, why) in cases {
            let reading = read(spec.clone());
            assert!(reading.policy.is_none(), "{spec}");
            assert!(
                reading.problems.iter().any(|p| p.starts_with(why)),
                "{spec}: {:?}",
                reading.problems
            );
        }
    }

    /// Rules with an unusable part: an Accept opens only what it could
    /// read; a Deny or Pass denies everything.
    #[test]
    fn unusable_rules_fail_closed() {
        let tcp = |n: i64| json!({"tcp": {"destinationPort": {"number": n}}});
        let cases = [
            // (direction, rule, problem, action, any peer, peers kept, ports)
            ("ingress", json!({"action": "Deny", "from": [{"networks": ["10.0.0.0/8"]}]}),
             "spec.ingress[0].from[0]: ingress peers are namespaces or pods only", Action::Deny, true, 0, None),
            ("ingress", json!({"action": "Pass", "from": [{}]}),
             "spec.ingress[0].from[0]: needs exactly one of namespaces, pods", Action::Deny, true, 0, None),
            ("egress", json!({"action": "Accept", "to": [{"networks": ["10.0.0.0/33"]}, {"namespaces": {}}]}),
             "spec.egress[0].to[0].networks[0]: \"10.0.0.0/33\" is not a CIDR", Action::Accept, false, 1, None),
            ("egress", json!({"action": "Accept", "to": [{"domainNames": ["example.com"]}]}),
             "spec.egress[0].to[0].domainNames: not supported", Action::Accept, false, 0, None),
            ("egress", json!({"action": "Deny", "to": [{"domainNames": ["example.com"]}]}),
             "spec.egress[0].to[0].domainNames: not supported", Action::Deny, true, 0, None),
            ("ingress", json!({"action": "Accept", "from": [{"namespaces": {}}], "protocols": [tcp(0), tcp(80)]}),
             "spec.ingress[0].protocols[0]: tcp.destinationPort.number: 0 is not in 1..=65535", Action::Accept, false, 1, Some(1)),
            ("ingress", json!({"action": "Deny", "from": [{"namespaces": {}}], "protocols": [{"udp": {"destinationPort": {"range": {"start": 9, "end": 9}}}}]}),
             "spec.ingress[0].protocols[0]: udp.destinationPort.range: 9..9", Action::Deny, true, 0, None),
            ("ingress", json!({"action": "Accept", "from": [{"namespaces": {}}], "protocols": [{"tcp": {}, "udp": {}}]}),
             "spec.ingress[0].protocols[0]: needs exactly one of tcp, udp, sctp", Action::Accept, false, 1, Some(0)),
            ("egress", json!({"action": "Accept", "to": [{"nodes": {}}], "protocols": [{"destinationNamedPort": "web"}]}),
             "spec.egress[0].protocols: destinationNamedPort cannot be used with networks, nodes", Action::Accept, false, 0, Some(3)),
            ("ingress", json!({"name": "typo", "action": "deny", "from": [{"namespaces": {}}]}),
             "spec.ingress[0].action: unknown variant `deny`", Action::Deny, true, 0, None),
            ("egress", json!({"action": "Accept", "to": [{"pods": {"podSelector": {}}}], "protocols": [{"destinationNamedPort": "22"}]}),
             "spec.egress[0].protocols[0]: destinationNamedPort: \"22\" is not a port name", Action::Accept, false, 1, Some(0)),
            ("ingress", json!({"action": "Deny", "from": [{"namespaces": {}}], "protocols": []}),
             "spec.ingress[0].protocols: 0 entries, needs 1 to 25", Action::Deny, true, 0, None),
            ("ingress", json!({"action": "Deny", "from": []}),
             "spec.ingress[0].from: 0 peers, needs 1 to 25", Action::Deny, true, 0, None),
        ];
        for (direction, rule, why, action, any_peer, peers, ports) in cases {
            let reading = read(with_rule(direction, rule.clone()));
            let policy = reading.policy.expect("enforced");
            let parsed = if direction == "ingress" {
                &policy.ingress[0]
            } else {
                &policy.egress[0]
            };
            assert!(
                reading.problems.iter().any(|p| p.starts_with(why)),
                "{rule}: {:?}",
                reading.problems
            );
            assert_eq!(
                (
                    parsed.action,
                    parsed.any_peer,
                    parsed.peers.len(),
                    parsed.ports.as_ref().map(Vec::len)
                ),
                (action, any_peer, peers, ports),
                "{rule}"
            );
        }
    }

    #[test]
    fn a_priority_out_of_range_is_clamped_and_reported() {
        for (priority, taken) in [(1001, 1000), (-1, 0)] {
            let reading =
                read(json!({"tier": "Admin", "priority": priority, "subject": {"namespaces": {}}}));
            assert_eq!(reading.policy.map(|p| p.priority), Some(taken));
            assert!(reading.problems[0]
                .starts_with(&format!("spec.priority: {priority} is not in 0..=1000")));
        }
    }

    #[test]
    fn a_well_formed_policy_reads_whole() {
        let reading = read(json!({
            "tier": "Baseline",
            "priority": 1000,
            "subject": {"pods": {"podSelector": {"matchLabels": {"app": "db"}}}},
            "egress": [{
                "name": "dns",
                "action": "Pass",
                "to": [{"networks": ["10.96.0.10/32", "fd00::/64"]}, {"nodes": {}}],
                "protocols": [{"udp": {"destinationPort": {"number": 53}}}, {"sctp": {"destinationPort": {"range": {"start": 1, "end": 9}}}}],
            }],
        }));
        assert_eq!(reading.problems, Vec::<String>::new());
        let policy = reading.policy.unwrap();
        assert_eq!((policy.tier, policy.priority), (Tier::Baseline, 1000));
        let rule = &policy.egress[0];
        assert_eq!(rule.name.as_deref(), Some("dns"));
        assert_eq!(rule.peers.len(), 2, "one ipBlock per network");
        assert_eq!(rule.nodes.len(), 1);
        let ports: Vec<_> = rule
            .ports
            .iter()
            .flatten()
            .map(|p| (p.protocol.clone(), p.port.clone(), p.end_port))
            .collect();
        assert_eq!(
            ports,
            vec![
                (Some("UDP".into()), Some(IntOrString::Int(53)), None),
                (Some("SCTP".into()), Some(IntOrString::Int(1)), Some(9)),
            ]
        );
        // An absent namespaceSelector is every namespace.
        let Selects::Pods { namespace, .. } = policy.subject else {
            panic!()
        };
        assert_eq!(namespace, LabelSelector::default());
    }
}
