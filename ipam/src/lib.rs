//! Pure address logic for Weft.
//!
//! - [`BlockPlan`]: a cluster CIDR (IPv4 or IPv6) split into node blocks.
//! - [`BlockRecord`]: which node holds which block, from each node's own
//!   [`BlockClaim`], when meshd claims blocks
//!   itself through the API (no `spec.podCIDRs`).
//! - [`Allocations`]: which pod attachment holds which address of a node's
//!   blocks (pure), and [`PodStore`], the same on local disk under a file
//!   lock, used directly by the CNI plugin.
//! - [`NodeState`]: what meshd tells the plugin (pod blocks, MTU), and
//!   [`PolicyState`]: whether the node's NetworkPolicy program is loaded.

mod bits;
mod blocks;
mod cluster;
mod node_state;
mod pool;
mod store;

pub use blocks::{BlockError, BlockPlan};
pub use cluster::{BlockClaim, BlockRecord, ClaimError};
pub use node_state::{NodeState, NodeStateError, PolicyState, POLICY_STATE_FILE};
pub use pool::{gateway, AllocError, Allocations, Attachment, PodRef, POD_VETH_PREFIX};
pub use store::{PodStore, StoreError};
