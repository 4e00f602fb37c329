//! The CNI protocol (spec 1.1.0): commands, environment, errors and results,
//! rendered in whichever version the network configuration asks for —
//! libcni 1.1.2 (containerd 1.6, podman 4, cnitool) rejects a 1.1.0 result to
//! a 1.0.0 configuration.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde_json::{json, Value};

/// Configuration versions this plugin accepts and answers in.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version `VERSION` reports as the plugin's own.
pub const PLUGIN_VERSION: &str = "1.1.0";

/// Error codes from the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    /// Plugin-specific (the spec reserves 100+): CHECK found the
    /// attachment differs from what ADD set up.
    Check = 100,
}

/// A CNI error: printed as JSON on stdout, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code as u32, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.msg, self.code as u32)
    }
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The CNI environment for one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` (`K=V;K=V`), e.g. `K8S_POD_NAME`.
    pub args: BTreeMap<String, String>,
}

fn required(vars: &BTreeMap<String, String>, name: &str) -> Result<String, CniError> {
    vars.get(name)
        .filter(|v| !v.is_empty())
        .cloned()
        .ok_or_else(|| {
            CniError::new(
                Code::InvalidEnvironment,
                format!("required environment variable {name} is missing"),
            )
        })
}

impl Env {
    /// The Kubernetes pod this is, when the runtime says (kubelet's CRI
    /// runtimes pass `K8S_POD_NAMESPACE` and `K8S_POD_NAME` in CNI_ARGS).
    pub fn pod(&self) -> Option<weft_ipam::PodRef> {
        let get = |k: &str| self.args.get(k).filter(|v| !v.is_empty()).cloned();
        Some(weft_ipam::PodRef {
            namespace: get("K8S_POD_NAMESPACE")?,
            name: get("K8S_POD_NAME")?,
        })
    }

    /// Reads the environment variables a command needs, naming any missing one.
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<Self, CniError> {
        let command = match required(vars, "CNI_COMMAND")?.as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    format!(
                        "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"
                    ),
                ))
            }
        };
        let get = |name: &str| vars.get(name).cloned().unwrap_or_default();
        let (container_id, netns, ifname) = match command {
            Command::Add | Command::Check => (
                required(vars, "CNI_CONTAINERID")?,
                required(vars, "CNI_NETNS")?,
                required(vars, "CNI_IFNAME")?,
            ),
            // DEL must work when the namespace is already gone.
            Command::Del => (
                required(vars, "CNI_CONTAINERID")?,
                get("CNI_NETNS"),
                required(vars, "CNI_IFNAME")?,
            ),
            Command::Version | Command::Status | Command::Gc => {
                (String::new(), String::new(), String::new())
            }
        };
        if !container_id.is_empty() && !valid_container_id(&container_id) {
            return Err(CniError::new(Code::InvalidEnvironment, format!("CNI_CONTAINERID {container_id:?} must be letters, digits, '_', '.' and '-', starting with a letter or digit")));
        }
        if !ifname.is_empty() && !valid_ifname(&ifname) {
            return Err(CniError::new(Code::InvalidEnvironment, format!("CNI_IFNAME {ifname:?} is not a valid interface name (1-15 characters, no '/', ':' or whitespace, not . or ..)")));
        }
        let args = get("CNI_ARGS")
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }
}

/// The spec's container ID rule.
fn valid_container_id(id: &str) -> bool {
    id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// The kernel's interface name rule (the spec defers to it).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Checks a configuration's `cniVersion`.
pub fn check_version(version: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "cniVersion {version:?} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ))
    }
}

/// `VERSION`'s answer.
pub fn version_info() -> Value {
    json!({"cniVersion": PLUGIN_VERSION, "supportedVersions": SUPPORTED_VERSIONS})
}

/// An interface in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The netns path for the container's interface; empty on the host.
    pub sandbox: String,
    pub mtu: Option<u32>,
}

/// An address in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNet,
    pub gateway: std::net::IpAddr,
    /// Index into `interfaces`.
    pub interface: usize,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub dst: IpNet,
    pub gw: std::net::IpAddr,
}

/// What ADD returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<RouteConfig>,
}

impl AddResult {
    /// The result in the form of `version`: 0.3.x and 0.4.0 carry an IP
    /// `version` field; 1.1.0 adds interface `mtu`.
    pub fn to_json(&self, version: &str) -> Value {
        let legacy = version.starts_with("0.");
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = json!({"name": i.name, "mac": i.mac});
                if !i.sandbox.is_empty() {
                    v["sandbox"] = json!(i.sandbox);
                }
                if let (Some(mtu), "1.1.0") = (i.mtu, version) {
                    v["mtu"] = json!(mtu);
                }
                v
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!({"address": ip.address.to_string(), "gateway": ip.gateway.to_string(), "interface": ip.interface});
                if legacy {
                    v["version"] = json!(if ip.address.addr().is_ipv4() { "4" } else { "6" });
                }
                v
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| json!({"dst": r.dst.to_string(), "gw": r.gw.to_string()}))
            .collect();
        json!({"cniVersion": version, "interfaces": interfaces, "ips": ips, "routes": routes, "dns": {}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_is_checked_per_command() {
        let add = Env::from_vars(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
        ]))
        .unwrap();
        assert_eq!(add.command, Command::Add);
        assert_eq!(add.args["K8S_POD_NAME"], "web");
        assert_eq!(add.pod(), None, "a name without a namespace names no pod");
        let named = Env::from_vars(&vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=x;K8S_POD_NAME=web"),
        ]))
        .unwrap();
        assert_eq!(named.pod().map(|p| p.key()).as_deref(), Some("x/web"));
        let missing = Env::from_vars(&vars(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc")]))
            .unwrap_err();
        assert_eq!(missing.code, Code::InvalidEnvironment);
        assert!(missing.msg.contains("CNI_NETNS"));
        let del = Env::from_vars(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap();
        assert_eq!(del.netns, "", "DEL works without a namespace");
        assert!(Env::from_vars(&vars(&[("CNI_COMMAND", "VERSION")])).is_ok());
        assert!(Env::from_vars(&vars(&[("CNI_COMMAND", "FROB")]))
            .unwrap_err()
            .msg
            .contains("FROB"));
        assert!(Env::from_vars(&vars(&[]))
            .unwrap_err()
            .msg
            .contains("CNI_COMMAND"));
        let bad_if = Env::from_vars(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "a/b"),
        ]))
        .unwrap_err();
        assert!(bad_if.msg.contains("CNI_IFNAME"));
        let bad_id = Env::from_vars(&vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "-x;y"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap_err();
        assert!(bad_id.msg.contains("CNI_CONTAINERID"));
    }

    #[test]
    fn results_take_the_configs_version() {
        let r = AddResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                sandbox: "/run/netns/x".into(),
                mtu: Some(1420),
            }],
            ips: vec![
                IpConfig {
                    address: "198.19.1.2/24".parse().unwrap(),
                    gateway: "198.19.1.1".parse().unwrap(),
                    interface: 0,
                },
                IpConfig {
                    address: "fd98:19:0:1::2/64".parse().unwrap(),
                    gateway: "fd98:19:0:1::1".parse().unwrap(),
                    interface: 0,
                },
            ],
            routes: vec![RouteConfig {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: "198.19.1.1".parse().unwrap(),
            }],
        };
        let v040 = r.to_json("0.4.0");
        assert_eq!(v040["cniVersion"], "0.4.0");
        assert_eq!(v040["ips"][0]["version"], "4");
        assert_eq!(v040["ips"][1]["version"], "6");
        assert!(v040["interfaces"][0].get("mtu").is_none());
        let v100 = r.to_json("1.0.0");
        assert!(v100["ips"][0].get("version").is_none());
        assert!(
            v100["interfaces"][0].get("mtu").is_none(),
            "libcni 1.1.2 must not see 1.1.0 fields"
        );
        assert_eq!(r.to_json("1.1.0")["interfaces"][0]["mtu"], 1420);
    }

    #[test]
    fn versions_and_errors() {
        assert!(check_version("1.0.0").is_ok());
        let err = check_version("2.0.0").unwrap_err();
        assert_eq!(err.code, Code::IncompatibleVersion);
        assert_eq!(err.to_json("1.0.0")["code"], 1);
        assert_eq!(
            version_info()["supportedVersions"]
                .as_array()
                .unwrap()
                .len(),
            SUPPORTED_VERSIONS.len()
        );
    }
}
