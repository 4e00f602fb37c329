//! The Weft node agent: watches the cluster, plans the node's WireGuard mesh
//! (a pure function of the cluster snapshot), and reconciles the data plane.
//!
//! Filled by the mesh issue; nothing here yet.
