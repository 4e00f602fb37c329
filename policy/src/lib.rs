//! Kubernetes NetworkPolicy for Weft.
//!
//! [`compile`] turns policies, pods and namespaces into a per-node
//! [`Program`] (pure): for each local pod and direction, open or isolated
//! with allow entries of plain prefixes, protocols and port ranges.
//! [`eval`] decides connections from programs — the same structure that is
//! rendered for the kernel. [`case`] reads the upstream conformance cases
//! and checks them through compiled programs. [`render`] turns a program
//! into an nftables ruleset applied in one transaction.

pub mod case;
pub mod cnp;
pub mod compile;
pub mod engine;
pub mod eval;
pub mod model;
pub mod netlink;
pub mod nft;
pub mod prefix;
pub mod render;
pub mod selector;

pub use compile::{
    compile, Action, Cluster, Connection, Direction, Gate, NamedTarget, Peers, PodProgram,
    PolicyProgram, PolicyRef, PortRange, Program, Rule, RuleRef, Snapshot, Tier, Tiers,
};
pub use eval::{decide, explain, Decision, Step};
pub use model::{Identity, NamedPort, NamespaceInfo, NodeInfo, NodePodCidrs, PodInfo, Protocol};
