//! Decisions read off compiled programs — the same structure that is
//! rendered for the kernel, not a second implementation of the semantics.
//! A new connection passes if the source pod's node lets it out (egress)
//! and the destination pod's node lets it in (ingress).

use std::fmt;
use std::net::IpAddr;

use crate::compile::{Gate, Program, RuleRef};
use crate::model::Protocol;

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

fn step(gate: Option<&Gate>, peer: IpAddr, protocol: Protocol, port: u16) -> Step {
    match gate {
        None => Step::NotLocal,
        Some(Gate::Open) => Step::Open,
        Some(Gate::Isolated { by, allows }) => allows
            .iter()
            .find(|a| a.matches(peer, protocol, port))
            .map_or_else(
                || Step::Denied(by.clone()),
                |a| Step::Allowed(a.rule.clone()),
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
        egress: step(source_node.pod(src).map(|p| &p.egress), dst, protocol, port),
        ingress: step(
            destination_node.pod(dst).map(|p| &p.ingress),
            src,
            protocol,
            port,
        ),
    }
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
