//! The Weft node agent.
//!
//! Functional core: [`annotations`] (what a node publishes, and the strict
//! parser for what others publish), [`model`] (the planner's plain-data
//! input and output), [`planner`] (`plan(snapshot, local)`, pure) and
//! [`liveness`]. Imperative shell: [`dataplane`] (kernel or userspace
//! WireGuard) and [`reconcile`] (diff-only changes to the device, addresses
//! and routes), [`cluster`] (Kubernetes), [`agent`] (the event loop),
//! [`http`] and [`metrics`].

pub mod agent;
pub mod annotations;
pub mod cluster;
pub mod cluster_policy;
pub mod cni;
pub mod dataplane;
pub mod decide;
pub mod egress;
pub mod elf;
pub mod graph;
pub mod guard;
pub mod host_firewall;
pub mod host_traffic;
pub mod http;
pub mod ladder;
pub mod liveness;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod node_blocks;
pub mod peer_status;
pub mod peers;
pub mod planner;
pub mod pod_gc;
pub mod policy;
pub mod pq;
pub mod probe;
pub mod reconcile;
pub mod report;
pub mod revoked;
pub mod rotation;
pub mod table;
pub mod uninstall;
