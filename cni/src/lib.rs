//! The `weft` CNI plugin: attaches pods to the node's mesh using the node-local
//! address store of `weft-ipam`.
//!
//! Filled by the pod networking issue; nothing here yet.
