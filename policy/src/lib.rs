//! Kubernetes NetworkPolicy semantics compiled into a per-node rule program,
//! rendered to nftables and evaluated by `meshctl policy`.
//!
//! Filled by the NetworkPolicy issue; nothing here yet.
