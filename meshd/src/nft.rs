//! nftables changes made as JSON through the `nft` binary, for the tables
//! and chains meshd keeps besides its NetworkPolicy program (which goes
//! straight over netlink): the egress masquerade and the openings in a
//! host firewall. One transaction each: all of it applies, or none.

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct NftError {
    what: String,
    message: String,
}

impl NftError {
    pub fn new(what: String, e: impl std::fmt::Display) -> Self {
        Self {
            what,
            message: e.to_string(),
        }
    }
}

/// Applies `ruleset` (`{"nftables": [...]}`) with `nft -j -f -`.
pub fn apply(ruleset: &Value, what: &str) -> Result<(), NftError> {
    nftables::helper::apply_ruleset_raw(
        &ruleset.to_string(),
        nftables::helper::DEFAULT_NFT,
        nftables::helper::DEFAULT_ARGS,
    )
    .map(drop)
    .map_err(|e| NftError::new(what.to_string(), e))
}
