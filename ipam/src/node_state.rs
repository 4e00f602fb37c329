//! The node-local state meshd writes and the CNI plugin reads: the node's
//! pod blocks and the MTU pods should use ([`NodeState`], written after a
//! mesh sync), and whether the node's NetworkPolicy program is loaded
//! ([`PolicyState`], written by the policy engine, beside it). Until both
//! say the node is ready the plugin answers "try again later" and STATUS
//! reports not ready. Two files, so each has one writer.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub version: u32,
    /// The node's pod blocks (one per family).
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNet>,
    /// Pod interface MTU: the underlay's minus WireGuard's overhead.
    pub mtu: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeStateError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} is not valid node state: {1}")]
    Invalid(String, String),
}

impl NodeState {
    pub fn new(pod_cidrs: Vec<IpNet>, mtu: u32) -> Self {
        Self {
            version: FORMAT_VERSION,
            pod_cidrs,
            mtu,
        }
    }

    /// Reads the state; `Ok(None)` if meshd has not written it yet.
    pub fn read(path: &Path) -> Result<Option<Self>, NodeStateError> {
        let Some(state) = read_versioned(path, |s: &Self| s.version)? else {
            return Ok(None);
        };
        if state.pod_cidrs.is_empty() {
            let shown = path.display().to_string();
            return Err(NodeStateError::Invalid(shown, "no pod CIDRs".into()));
        }
        Ok(Some(state))
    }

    /// Replaces the state atomically.
    pub fn write(&self, path: &Path) -> Result<(), NodeStateError> {
        let bytes = serde_json::to_vec_pretty(self).expect("node state serializes");
        weft_keys::write_private(path, &bytes).map_err(|e| {
            NodeStateError::Io(
                path.display().to_string(),
                std::io::Error::other(e.to_string()),
            )
        })
    }
}

/// The policy state's file name, in the node state's directory: the
/// plugin finds it from `stateFile` alone, so the conflist needs no new
/// field.
pub const POLICY_STATE_FILE: &str = "policy.json";

/// Where NetworkPolicy enforcement stands on this node, as meshd last
/// published it. The plugin attaches pods only when it is `Loaded` or
/// `Off`: a pod attached with no policy program in the kernel would have
/// neither isolation nor anti-spoofing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "enforcement", rename_all = "camelCase")]
pub enum PolicyState {
    /// `--network-policy=false`: nothing to wait for.
    Off,
    /// No program of this node's is loaded yet (meshd started, or the
    /// table is gone): why not.
    Pending { reason: String },
    /// The engine's last apply succeeded: the kernel holds its program.
    Loaded,
    /// The engine's last apply failed, or the engine stopped: why.
    Broken { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PolicyFile {
    version: u32,
    #[serde(flatten)]
    state: PolicyState,
}

impl PolicyState {
    /// The policy state file beside the node state file `node_state`.
    pub fn path_beside(node_state: &Path) -> PathBuf {
        node_state.with_file_name(POLICY_STATE_FILE)
    }

    /// The file's contents.
    pub fn to_bytes(&self) -> Vec<u8> {
        let file = PolicyFile {
            version: FORMAT_VERSION,
            state: self.clone(),
        };
        serde_json::to_vec_pretty(&file).expect("policy state serializes")
    }

    /// Reads the state; `Ok(None)` if meshd has not written it yet.
    pub fn read(path: &Path) -> Result<Option<Self>, NodeStateError> {
        Ok(read_versioned(path, |f: &PolicyFile| f.version)?.map(|f| f.state))
    }
}

/// A state file of this format, `Ok(None)` if meshd has not written it
/// yet; `version` reads the format it says it is.
fn read_versioned<T: serde::de::DeserializeOwned>(
    path: &Path,
    version: impl Fn(&T) -> u32,
) -> Result<Option<T>, NodeStateError> {
    let shown = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(NodeStateError::Io(shown, e)),
    };
    let file: T = serde_json::from_slice(&bytes)
        .map_err(|e| NodeStateError::Invalid(shown.clone(), e.to_string()))?;
    if version(&file) != FORMAT_VERSION {
        return Err(NodeStateError::Invalid(
            shown,
            format!("format version {}", version(&file)),
        ));
    }
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_state_round_trips_beside_the_node_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = PolicyState::path_beside(&dir.path().join("node.json"));
        assert_eq!(path, dir.path().join(POLICY_STATE_FILE));
        assert_eq!(PolicyState::read(&path).unwrap(), None);
        for state in [
            PolicyState::Off,
            PolicyState::Loaded,
            PolicyState::Pending { reason: "r".into() },
            PolicyState::Broken {
                reason: "nft: not found".into(),
            },
        ] {
            std::fs::write(&path, state.to_bytes()).unwrap();
            assert_eq!(PolicyState::read(&path).unwrap(), Some(state));
        }
        std::fs::write(&path, br#"{"version":2,"enforcement":"loaded"}"#).unwrap();
        assert!(PolicyState::read(&path).is_err());
        std::fs::write(&path, br#"{"version":1,"enforcement":"maybe"}"#).unwrap();
        assert!(PolicyState::read(&path).is_err());
    }

    #[test]
    fn round_trip_absent_and_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.json");
        assert_eq!(NodeState::read(&path).unwrap(), None);
        let s = NodeState::new(vec!["198.19.1.0/24".parse().unwrap()], 1420);
        s.write(&path).unwrap();
        assert_eq!(NodeState::read(&path).unwrap(), Some(s));
        std::fs::write(&path, br#"{"version":1,"podCIDRs":[],"mtu":1420}"#).unwrap();
        assert!(NodeState::read(&path)
            .unwrap_err()
            .to_string()
            .contains("no pod CIDRs"));
    }
}
