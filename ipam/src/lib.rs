//! Pure address logic for Weft.
//!
//! - [`BlockPlan`]: a cluster CIDR (IPv4 or IPv6) split into node blocks.
//!
//! The per-node pod address store used by the CNI plugin joins this crate in
//! the pod networking issue.

mod blocks;

pub use blocks::{BlockError, BlockPlan};
