//! meshlab: Weft's lab. A multi-node "cluster" in network namespaces on one
//! Linux machine, with an embedded Kubernetes-API-compatible control plane.
//!
//! - [`apiserver`]: the embedded API server (REST + watch, TLS, kubeconfig).
//! - [`lab`]: the topology (fabric, nodes), its runtime state and lifecycle.
//! - [`forge`]: WireGuard datagrams forged from public data, for attack tests.
//! - [`vm`]: the lab inside a QEMU guest on the distribution's kernel.

pub mod apiserver;
pub mod forge;
pub mod lab;
pub mod vm;
