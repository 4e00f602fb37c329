//! nftables changes made as JSON through the `nft` binary, for the tables
//! and chains meshd keeps besides its NetworkPolicy program (which goes
//! straight over netlink): the source guard, the egress masquerade and the
//! openings in a host firewall. One transaction each: all of it applies,
//! or none.

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

/// Removes table `inet NAME`, if it is there.
pub fn table_removal(name: &str) -> Value {
    let table = serde_json::json!({"family": "inet", "name": name});
    serde_json::json!({"nftables": [{"add": {"table": table}}, {"delete": {"table": table}}]})
}

/// Whether table `inet NAME` is in the kernel (a failure to ask is "no":
/// the caller applies it again).
pub fn table_exists(name: &str) -> bool {
    std::process::Command::new(nftables::helper::DEFAULT_NFT.unwrap_or("nft"))
        .args(["list", "table", "inet", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
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

/// The last failure of a change retried on every pass, so that each cause
/// is logged once, not once a pass.
#[derive(Debug, Default)]
pub struct Failures(Option<String>);

impl Failures {
    /// Logs `e` with `consequence` unless it is the failure last logged.
    pub fn failed(&mut self, e: &NftError, consequence: &str) {
        let e = e.to_string();
        if self.0.as_ref() != Some(&e) {
            tracing::error!(error = %e, "{consequence}; trying again on every pass");
            self.0 = Some(e);
        }
    }

    /// The change went through: the next failure is news again.
    pub fn cleared(&mut self) {
        self.0 = None;
    }
}

/// A ruleset to apply until it is in place: a node without `nft` keeps its
/// mesh, logs why once, and tries again on every pass.
pub struct Pending {
    pending: Option<(Value, &'static str)>,
    consequence: &'static str,
    failures: Failures,
}

impl Pending {
    /// `what` applying `ruleset` is, and `consequence` of it failing.
    pub fn new(ruleset: Value, what: &'static str, consequence: &'static str) -> Self {
        Self {
            pending: Some((ruleset, what)),
            consequence,
            failures: Failures::default(),
        }
    }

    pub fn apply(&mut self) {
        let Some((ruleset, what)) = &self.pending else {
            return;
        };
        match apply(ruleset, what) {
            Ok(()) => {
                tracing::info!("{what}: done");
                self.pending = None;
            }
            Err(e) => self.failures.failed(&e, self.consequence),
        }
    }
}
