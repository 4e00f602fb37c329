//! meshlab: Weft's lab. A multi-node "cluster" in network namespaces on one
//! Linux machine, with an embedded Kubernetes-API-compatible control plane.
//!
//! - [`apiserver`]: the embedded API server (REST + watch, TLS, kubeconfig).
//! - [`lab`]: the topology (fabric, nodes), its runtime state and lifecycle.

pub mod apiserver;
pub mod lab;
