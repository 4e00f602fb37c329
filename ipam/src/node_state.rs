//! The node-local state meshd writes and the CNI plugin reads: the node's
//! pod blocks and the MTU pods should use. Until it exists the plugin
//! answers "try again later" and STATUS reports not ready.

use std::path::Path;

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
        let shown = path.display().to_string();
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(NodeStateError::Io(shown, e)),
        };
        let state: Self = serde_json::from_slice(&bytes)
            .map_err(|e| NodeStateError::Invalid(shown.clone(), e.to_string()))?;
        if state.version != FORMAT_VERSION {
            return Err(NodeStateError::Invalid(
                shown,
                format!("format version {}", state.version),
            ));
        }
        if state.pod_cidrs.is_empty() {
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

#[cfg(test)]
mod tests {
    use super::*;

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
