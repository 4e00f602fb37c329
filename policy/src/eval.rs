//! Decisions read off compiled programs — the same structure that is
//! rendered for the kernel, not a second implementation of the semantics.
//! A new connection passes if the source pod's node lets it out (egress)
//! and the destination pod's node lets it in (ingress).

use std::fmt;
use std::net::IpAddr;

use crate::compile::{
    compile, Action, Cluster, Connection, Direction, Gate, Program, RuleRef, Snapshot,
};
use crate::model::Protocol;

/// One direction's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The address is not a pod of this node's program (e.g. the node
    /// itself, or outside the cluster): nothing to enforce here.
    NotLocal,
    /// No tier has a say, or none that has matches: allowed.
    Open,
    /// This rule accepts it: a NetworkPolicy rule, a ClusterNetworkPolicy
    /// Accept, or a Baseline Pass (there is no tier after Baseline).
    Allowed(RuleRef),
    /// Isolated by these NetworkPolicies, and no rule of theirs allows it.
    Isolated(Vec<String>),
    /// This ClusterNetworkPolicy rule denies it.
    Denied(RuleRef),
}

/// One direction's outcome, and the Admin Pass that handed it over to
/// the tiers after Admin, if one did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub passed: Option<RuleRef>,
    pub outcome: Outcome,
}

impl Step {
    pub fn passes(&self) -> bool {
        !matches!(self.outcome, Outcome::Isolated(_) | Outcome::Denied(_))
    }
}

/// A connection's verdict with both steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub egress: Step,
    pub ingress: Step,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.egress.passes() && self.ingress.passes()
    }
}

/// One direction at one node for the pod holding `local`, tier by tier,
/// as the group chain of [`crate::render`] asks them.
fn step(program: &Program, direction: Direction, local: IpAddr, c: &Connection) -> Step {
    let Some(tiers) = program.pod(local).map(|p| p.tiers(direction)) else {
        return Step {
            passed: None,
            outcome: Outcome::NotLocal,
        };
    };
    let decided = |passed, outcome| Step { passed, outcome };
    let mut passed = None;
    if let Some(r) = program.first_match(&tiers.admin, direction, c) {
        match r.rule.action {
            Action::Accept => return decided(None, Outcome::Allowed(r.rule.clone())),
            Action::Deny => return decided(None, Outcome::Denied(r.rule.clone())),
            Action::Pass => passed = Some(r.rule.clone()),
        }
    }
    if let Gate::Isolated { by } = &tiers.np {
        let outcome = program.allowing(by, direction, c).map_or_else(
            || Outcome::Isolated(by.clone()),
            |r| Outcome::Allowed(r.rule.clone()),
        );
        return decided(passed, outcome);
    }
    let outcome = match program.first_match(&tiers.baseline, direction, c) {
        Some(r) if r.rule.action == Action::Deny => Outcome::Denied(r.rule.clone()),
        Some(r) => Outcome::Allowed(r.rule.clone()),
        None => Outcome::Open,
    };
    decided(passed, outcome)
}

/// Decides a new connection from `src` to `dst`:`port`/`protocol`, with the
/// programs of the source's node and of the destination's node.
pub fn decide(
    source_node: &Program,
    destination_node: &Program,
    src: IpAddr,
    dst: IpAddr,
    protocol: Protocol,
    port: u16,
) -> Decision {
    Decision {
        egress: step(
            source_node,
            Direction::Egress,
            src,
            &Connection {
                peer: dst,
                destination: dst,
                protocol,
                port,
            },
        ),
        ingress: step(
            destination_node,
            Direction::Ingress,
            dst,
            &Connection {
                peer: src,
                destination: dst,
                protocol,
                port,
            },
        ),
    }
}

/// Why a connection cannot be explained.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("no pod {0:?}")]
    NoPod(String),
    #[error("pod {0:?} has no address yet")]
    NoAddress(String),
}

/// The decision for a connection between two pods of a cluster
/// (`namespace/name` keys), compiled for the nodes the two pods are on.
pub fn explain(
    cluster: &Snapshot,
    from: &str,
    to: &str,
    protocol: Protocol,
    port: u16,
) -> Result<Decision, ExplainError> {
    let pods = &cluster.pods;
    let pod = |key: &str| {
        pods.iter()
            .find(|p| p.key() == key)
            .ok_or_else(|| ExplainError::NoPod(key.to_string()))
            .and_then(|p| match p.ips.first() {
                Some(ip) => Ok((p, *ip)),
                None => Err(ExplainError::NoAddress(key.to_string())),
            })
    };
    let ((from, src), (to, dst)) = (pod(from)?, pod(to)?);
    let parsed = cluster.parsed();
    let compiled = |node: &str| {
        let admin = Cluster {
            policies: &parsed,
            nodes: &cluster.nodes,
        };
        compile(node, &cluster.policies, admin, pods, &cluster.namespaces)
    };
    let source = compiled(&from.node);
    let destination = if to.node == from.node {
        source.clone()
    } else {
        compiled(&to.node)
    };
    Ok(decide(&source, &destination, src, dst, protocol, port))
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotLocal => f.write_str("not a pod here"),
            Self::Open => f.write_str("no tier denies it"),
            Self::Allowed(r) => write!(f, "{} by {r}", verb(r)),
            Self::Isolated(by) => write!(
                f,
                "denied: isolated by {} and no rule allows it",
                by.join(", ")
            ),
            Self::Denied(r) => write!(f, "denied by {r}"),
        }
    }
}

/// How an allowing rule allowed.
fn verb(r: &RuleRef) -> &'static str {
    match r.action {
        Action::Pass => "passed (nothing after Baseline)",
        Action::Accept | Action::Deny => match r.policy {
            crate::compile::PolicyRef::Namespaced { .. } => "allowed",
            crate::compile::PolicyRef::Cluster { .. } => "accepted",
        },
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(r) = &self.passed {
            write!(f, "passed by {r}, then ")?;
        }
        self.outcome.fmt(f)
    }
}
