//! The `weft` CNI plugin: attaches pods to the node's mesh using the node
//! state meshd writes and the node-local address store of `weft-ipam`.
//!
//! [`spec`] is the CNI protocol (versions, environment, errors, results);
//! [`config`] the plugin's network configuration; [`netlink`] a small
//! synchronous netlink client; [`plugin`] the commands.

pub mod config;
pub mod netlink;
pub mod plugin;
pub mod spec;
