//! Decisions read off compiled programs — the same structure that is
//! rendered for the kernel, not a second implementation of the semantics.
//! A new connection passes if the source pod's node lets it out (egress)
//! and the destination pod's node lets it in (ingress).

use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::compile::{compile, Direction, Gate, Program, RuleRef};
use crate::model::Protocol;
use crate::model::{NamespaceInfo, PodInfo};

/// One direction's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The address is not a pod of this node's program (e.g. the node
    /// itself, or outside the cluster): nothing to enforce here.
    NotLocal,
    /// No policy isolates the pod in this direction.
    Open,
    /// Isolated, and this rule allows it.
    Allowed(RuleRef),
    /// Isolated by these policies, and no rule of theirs allows it.
    Denied(Vec<String>),
}

impl Step {
    pub fn passes(&self) -> bool {
        !matches!(self, Self::Denied(_))
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

/// One direction at one node: `local` is the pod the program enforces for,
/// `peer` the other end, `destination` the address connected to.
fn step(
    program: &Program,
    direction: Direction,
    local: IpAddr,
    peer: IpAddr,
    destination: IpAddr,
    protocol: Protocol,
    port: u16,
) -> Step {
    let gate = match direction {
        Direction::Ingress => program.pod(local).map(|p| &p.ingress),
        Direction::Egress => program.pod(local).map(|p| &p.egress),
    };
    match gate {
        None => Step::NotLocal,
        Some(Gate::Open) => Step::Open,
        Some(Gate::Isolated { by }) => program
            .allowing(by, direction, peer, destination, protocol, port)
            .map_or_else(
                || Step::Denied(by.clone()),
                |r| Step::Allowed(r.rule.clone()),
            ),
    }
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
            dst,
            dst,
            protocol,
            port,
        ),
        ingress: step(
            destination_node,
            Direction::Ingress,
            dst,
            src,
            dst,
            protocol,
            port,
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
    policies: &[NetworkPolicy],
    pods: &[PodInfo],
    namespaces: &[NamespaceInfo],
    from: &str,
    to: &str,
    protocol: Protocol,
    port: u16,
) -> Result<Decision, ExplainError> {
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
    let source = compile(&from.node, policies, pods, namespaces);
    let destination = if to.node == from.node {
        source.clone()
    } else {
        compile(&to.node, policies, pods, namespaces)
    };
    Ok(decide(&source, &destination, src, dst, protocol, port))
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotLocal => f.write_str("not a pod here"),
            Self::Open => f.write_str("not isolated"),
            Self::Allowed(r) => write!(
                f,
                "allowed by {}/{} {:?} rule {}",
                r.namespace, r.policy, r.direction, r.index
            ),
            Self::Denied(by) => write!(
                f,
                "denied: isolated by {} and no rule allows it",
                by.join(", ")
            ),
        }
    }
}
