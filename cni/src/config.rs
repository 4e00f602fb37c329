//! The `weft` plugin's network configuration, as the runtime passes it on
//! stdin (alone or as one plugin of a conflist).

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;
use weft_ipam::Attachment;

use crate::spec::{check_version, CniError, Code};

/// Where meshd writes the node's state (pod CIDRs, MTU) for the plugin.
pub const DEFAULT_STATE_FILE: &str = "/run/weft/node.json";
/// Where the node's pod address allocations live.
pub const DEFAULT_IPAM_DIR: &str = "/var/lib/weft/ipam";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    #[serde(default = "default_state_file")]
    pub state_file: PathBuf,
    #[serde(default = "default_ipam_dir")]
    pub ipam_dir: PathBuf,
    /// Overrides the MTU meshd computed.
    pub mtu: Option<u32>,
    /// A previous plugin's result (chained) or ours (CHECK, DEL).
    pub prev_result: Option<Value>,
    /// GC: the attachments the runtime still knows.
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl From<&ValidAttachment> for Attachment {
    fn from(v: &ValidAttachment) -> Self {
        Attachment {
            container_id: v.container_id.clone(),
            ifname: v.ifname.clone(),
        }
    }
}

fn default_state_file() -> PathBuf {
    DEFAULT_STATE_FILE.into()
}

fn default_ipam_dir() -> PathBuf {
    DEFAULT_IPAM_DIR.into()
}

/// The version to answer in, even for a configuration that fails to parse.
pub fn answer_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| check_version(v).is_ok())
        .unwrap_or_else(|| "1.0.0".into())
}

/// Parses and checks the configuration, naming the offending field.
pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
    let raw: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            Code::Decode,
            format!("the network configuration on stdin is not valid JSON: {e}"),
        )
    })?;
    let conf: NetConf = serde_path_to_error::deserialize(raw).map_err(|e| {
        let field = e.path().to_string();
        let at = if field == "." {
            String::new()
        } else {
            format!(" at {field:?}")
        };
        CniError::new(
            Code::InvalidConfig,
            format!("network configuration{at}: {}", e.inner()),
        )
    })?;
    check_version(&conf.cni_version)?;
    if conf.name.is_empty() {
        return Err(CniError::new(
            Code::InvalidConfig,
            "network configuration: \"name\" must not be empty",
        ));
    }
    if let Some(mtu) = conf.mtu {
        if !(576..=65535).contains(&mtu) {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("network configuration: \"mtu\" {mtu} is outside 576..65535"),
            ));
        }
    }
    Ok(conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_and_full_configs() {
        let c = parse(br#"{"cniVersion":"1.0.0","name":"weft","type":"weft"}"#).unwrap();
        assert_eq!(c.state_file, PathBuf::from(DEFAULT_STATE_FILE));
        let c = parse(br#"{"cniVersion":"0.4.0","name":"weft","type":"weft","mtu":1400,"capabilities":{"portMappings":true},
            "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#)
        .unwrap();
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "a");
    }

    #[test]
    fn errors_name_the_field_and_use_the_spec_codes() {
        let e = parse(b"{not json").unwrap_err();
        assert_eq!(e.code, Code::Decode);
        let e = parse(br#"{"cniVersion":"1.0.0","type":"weft"}"#).unwrap_err();
        assert_eq!(e.code, Code::InvalidConfig);
        assert!(e.msg.contains("name"), "{e}");
        let e = parse(br#"{"cniVersion":"9.9.9","name":"n","type":"weft"}"#).unwrap_err();
        assert_eq!(e.code, Code::IncompatibleVersion);
        let e =
            parse(br#"{"cniVersion":"1.0.0","name":"n","type":"weft","mtu":70000}"#).unwrap_err();
        assert!(e.msg.contains("\"mtu\""));
        let e =
            parse(br#"{"cniVersion":"1.0.0","name":"n","type":"weft","mtu":"big"}"#).unwrap_err();
        assert!(e.msg.contains("at \"mtu\""), "{e}");
        assert_eq!(answer_version(br#"{"cniVersion":"0.3.1"}"#), "0.3.1");
        assert_eq!(answer_version(b"garbage"), "1.0.0");
    }
}
