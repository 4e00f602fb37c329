//! `runc-strict`: the OCI runtime the lab's podman path runs containers
//! with, so that devices are granted as kubelet's strict runtimes grant
//! them. Kubelet bind-mounts a hostPath `CharDevice` volume and adds no
//! device rule; crun and runc 1.2.0–1.2.3 then refuse to open it (EPERM)
//! unless the container is privileged or the device was explicitly granted.
//! Debian's runc 1.1 allows `/dev/net/tun` to every container, which would
//! hide that, so this wrapper runs runc and, after `create`, denies the TUN
//! device in the container's device cgroup when the spec does not grant it.
//!
//! meshlab becomes this program when invoked as [`NAME`] (a link the lab
//! makes); every argument goes to runc unchanged.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The name meshlab answers to as a runtime.
pub const NAME: &str = "runc-strict";
/// The TUN device (`/dev/net/tun`): character device 10:200.
const TUN: (i64, i64) = (10, 200);
/// Where cgroup v1's device controller is mounted.
const DEVICES_CGROUP: &str = "/sys/fs/cgroup/devices";

/// The link to meshlab that podman is given as `--runtime`.
pub fn install(dir: &Path) -> Result<PathBuf> {
    let link = dir.join(NAME);
    let me = std::env::current_exe().context("locating meshlab")?;
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&me, &link)
        .with_context(|| format!("linking {} to {}", link.display(), me.display()))?;
    Ok(link)
}

/// Whether a container spec grants read or write access to `device`
/// (type `c`, major, minor): an allow rule for all devices (privileged), or
/// for that one (a `--device`, a device plugin).
pub fn grants(spec: &Value, (major, minor): (i64, i64)) -> bool {
    let rules = spec["linux"]["resources"]["devices"].as_array();
    rules.into_iter().flatten().any(|r| {
        let matches = |key: &str, want: i64| r[key].is_null() || r[key].as_i64() == Some(want);
        let access = r["access"].as_str().unwrap_or("rwm");
        r["allow"] == Value::Bool(true)
            && matches!(r["type"].as_str().unwrap_or("a"), "a" | "c")
            && matches("major", major)
            && matches("minor", minor)
            && (access.contains('r') || access.contains('w'))
    })
}

/// The bundle directory of a `create` call (`--bundle DIR` or `-b DIR`),
/// if `args` are one.
fn create_bundle(args: &[OsString]) -> Option<PathBuf> {
    let words: Vec<&str> = args.iter().filter_map(|a| a.to_str()).collect();
    let create = words.iter().position(|w| *w == "create")?;
    let rest = &words[create + 1..];
    rest.iter().enumerate().find_map(|(i, w)| {
        if let Some(dir) = w.strip_prefix("--bundle=") {
            return Some(PathBuf::from(dir));
        }
        (*w == "--bundle" || *w == "-b").then(|| rest.get(i + 1).map(PathBuf::from))?
    })
}

/// Runs runc with `args`; after a successful `create`, denies the TUN
/// device to a container whose spec does not grant it. Returns runc's
/// exit code.
pub fn run(args: Vec<OsString>) -> Result<i32> {
    let status = Command::new("runc")
        .args(&args)
        .status()
        .context("running runc (apt-get install runc)")?;
    if !status.success() {
        return Ok(status.code().unwrap_or(1));
    }
    if let Some(bundle) = create_bundle(&args) {
        let path = bundle.join("config.json");
        let spec: Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?;
        if !grants(&spec, TUN) {
            deny_tun(&spec)?;
        }
    }
    Ok(0)
}

fn deny_tun(spec: &Value) -> Result<()> {
    let Some(cgroup) = spec["linux"]["cgroupsPath"].as_str() else {
        bail!("the container has no cgroupsPath: run podman with --cgroup-manager cgroupfs");
    };
    if cgroup.contains(':') {
        bail!("cgroupsPath {cgroup:?} is systemd's: run podman with --cgroup-manager cgroupfs");
    }
    let deny = Path::new(DEVICES_CGROUP)
        .join(cgroup.trim_start_matches('/'))
        .join("devices.deny");
    std::fs::write(&deny, format!("c {}:{} rwm", TUN.0, TUN.1))
        .with_context(|| format!("writing {}", deny.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(rules: Value) -> Value {
        json!({"linux": {"resources": {"devices": rules}}})
    }

    #[test]
    fn only_privileged_or_explicit_grants_count() {
        let deny_all = json!({"allow": false, "access": "rwm"});
        let mknod_any = json!({"allow": true, "type": "c", "access": "m"});
        let cases = [
            (
                spec(json!([deny_all, mknod_any])),
                false,
                "podman's defaults",
            ),
            (
                spec(json!([deny_all, {"allow": true, "access": "rwm"}])),
                true,
                "privileged",
            ),
            (
                spec(
                    json!([deny_all, {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm"}]),
                ),
                true,
                "--device /dev/net/tun",
            ),
            (
                spec(
                    json!([deny_all, {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"}]),
                ),
                false,
                "another device",
            ),
            (json!({}), false, "no rules"),
        ];
        for (spec, granted, what) in cases {
            assert_eq!(grants(&spec, TUN), granted, "{what}");
        }
    }

    #[test]
    fn finds_the_bundle_of_a_create_call() {
        let args = |s: &str| -> Vec<OsString> { s.split(' ').map(OsString::from).collect() };
        assert_eq!(
            create_bundle(&args(
                "--root /run/runc --log x create --bundle /b/1 --pid-file p id"
            )),
            Some(PathBuf::from("/b/1"))
        );
        assert_eq!(
            create_bundle(&args("create --bundle=/b/2 id")),
            Some(PathBuf::from("/b/2"))
        );
        assert_eq!(create_bundle(&args("start id")), None);
    }
}
