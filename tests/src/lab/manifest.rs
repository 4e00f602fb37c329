//! The DaemonSet in `deploy/` as the lab runs it: each container of its pod
//! becomes a process on the lab node with exactly the manifest's command,
//! args and env (resolved as the kubelet resolves them), and with every
//! volume path mapped into the node's own directory, since every lab node
//! shares one machine. So the manifests and the lab cannot drift: changing a
//! flag in `deploy/` changes what the lab runs.
//!
//! Pure: loading reads files, [`pod`] only computes.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, PodSpec};
use serde::Deserialize;
use serde_json::Value;

/// `deploy/` of this source tree (the default of `meshlab up --manifests`).
pub const DEFAULT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// Where the image installs Weft's binaries (deploy/image/Containerfile);
/// the lab runs the ones built next to meshlab instead.
pub const IMAGE_BIN_DIR: &str = "/usr/local/bin";
/// Host paths every lab node shares with the machine rather than getting
/// its own copy: the TUN device, and the UAPI socket directory that
/// WireGuard tools look for at this fixed path (each lab node's interface
/// has its own name, so their sockets do not collide).
const SHARED_HOST_PATHS: &[&str] = &["/dev/net/tun", "/var/run/wireguard"];

/// What `deploy/` (or a rendered overlay) holds, as the lab uses it.
#[derive(Debug, Clone)]
pub struct Manifests {
    /// Every object, in file order: the lab applies them to its API server.
    pub objects: Vec<Value>,
    pub daemonset: DaemonSet,
    pub config: ConfigMap,
}

#[derive(Deserialize)]
struct Kustomization {
    #[serde(default)]
    bases: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(rename = "patchesStrategicMerge", default)]
    patches_strategic_merge: Vec<Value>,
    #[serde(rename = "patchesJson6902", default)]
    patches_json6902: Vec<Value>,
    #[serde(default)]
    patches: Vec<Value>,
}

/// Loads `path`: a kustomization directory of plain resources (patches are
/// kubectl's job: render an overlay with `kubectl kustomize DIR > FILE` and
/// pass the file), or a multi-document YAML file.
pub fn load(path: &Path) -> Result<Manifests> {
    let mut objects = Vec::new();
    collect(path, &mut objects)?;
    let find = |kind: &str| -> Result<Value> {
        let mut found = objects.iter().filter(|o| o["kind"] == kind);
        let first = found
            .next()
            .with_context(|| format!("{}: no {kind}", path.display()))?;
        ensure!(
            found.next().is_none(),
            "{}: more than one {kind}",
            path.display()
        );
        Ok(first.clone())
    };
    let daemonset = serde_json::from_value(find("DaemonSet")?).context("the DaemonSet")?;
    let config = serde_json::from_value(find("ConfigMap")?).context("the ConfigMap")?;
    Ok(Manifests {
        objects,
        daemonset,
        config,
    })
}

fn collect(path: &Path, out: &mut Vec<Value>) -> Result<()> {
    if path.is_file() {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value =
                Value::deserialize(doc).with_context(|| format!("{}: not YAML", path.display()))?;
            if !value.is_null() {
                out.push(value);
            }
        }
        return Ok(());
    }
    let file = path.join("kustomization.yaml");
    let text = fs::read_to_string(&file).with_context(|| {
        format!(
            "{}: neither a YAML file nor a directory with kustomization.yaml",
            path.display()
        )
    })?;
    let k: Kustomization =
        serde_norway::from_str(&text).with_context(|| format!("{}", file.display()))?;
    if !(k.patches_strategic_merge.is_empty()
        && k.patches_json6902.is_empty()
        && k.patches.is_empty())
    {
        bail!(
            "{}: has patches; render it with `kubectl kustomize {}` into a file and pass that",
            file.display(),
            path.display()
        );
    }
    for r in k.bases.iter().chain(&k.resources) {
        collect(&path.join(r), out)?;
    }
    Ok(())
}

/// What the lab node gives the pod: the kubelet's share of the work.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub host_ip: Ipv4Addr,
    /// The node's own "host filesystem": host path `/x` is `root/x`.
    pub root: PathBuf,
    /// Where the binaries built with meshlab are (the image's
    /// [`IMAGE_BIN_DIR`]).
    pub bin_dir: PathBuf,
    /// ConfigMap values the lab sets (its cluster ranges, short timers).
    pub config: BTreeMap<String, String>,
    /// Variables the runtime adds, as a kubelet adds the service account's
    /// credentials: the node's kubeconfig, its interface name.
    pub injected: Vec<(String, String)>,
    /// Containers whose command the lab replaces (a node running another
    /// WireGuard implementation in the data plane container).
    pub commands: BTreeMap<String, Vec<String>>,
}

/// One container as a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub container: String,
    /// Runs to completion before the containers start.
    pub init: bool,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Host directories to create first (`DirectoryOrCreate` volumes).
    pub dirs: Vec<PathBuf>,
}

/// The DaemonSet's pod on `node`: init containers, then containers, in order.
pub fn pod(m: &Manifests, node: &Node) -> Result<Vec<Process>> {
    let spec: &PodSpec = m
        .daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("the DaemonSet has no spec.template.spec")?;
    let mut config = m.config.data.clone().unwrap_or_default();
    config.extend(node.config.clone());
    let config_name = m.config.metadata.name.clone().unwrap_or_default();
    let volumes = host_paths(spec, node)?;
    let init = spec.init_containers.iter().flatten().map(|c| (c, true));
    let main = spec.containers.iter().map(|c| (c, false));
    init.chain(main)
        .map(|(c, init)| {
            container(c, init, node, &volumes, &config_name, &config)
                .with_context(|| format!("container {:?}", c.name))
        })
        .collect()
}

/// A hostPath volume: where it is on the lab node, and whether to create it.
struct HostPath {
    path: PathBuf,
    create_dir: bool,
}

fn host_paths(spec: &PodSpec, node: &Node) -> Result<BTreeMap<String, HostPath>> {
    let mut out = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let hp = v
            .host_path
            .as_ref()
            .with_context(|| format!("volume {:?}: the lab maps hostPath volumes only", v.name))?;
        let shared = SHARED_HOST_PATHS.contains(&hp.path.as_str());
        let path = if shared {
            PathBuf::from(&hp.path)
        } else {
            node.root.join(hp.path.trim_start_matches('/'))
        };
        let create_dir = !shared && hp.type_.as_deref() == Some("DirectoryOrCreate");
        out.insert(v.name.clone(), HostPath { path, create_dir });
    }
    Ok(out)
}

fn container(
    c: &Container,
    init: bool,
    node: &Node,
    volumes: &BTreeMap<String, HostPath>,
    config_name: &str,
    config: &BTreeMap<String, String>,
) -> Result<Process> {
    // mountPath -> where it is on the lab node, longest first so that a
    // nested mount wins.
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    let mut dirs = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let v = volumes
            .get(&m.name)
            .with_context(|| format!("volumeMounts: no volume {:?}", m.name))?;
        mounts.push((
            m.mount_path.trim_end_matches('/').to_string(),
            v.path.clone(),
        ));
        if v.create_dir {
            dirs.push(v.path.clone());
        }
    }
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    let map = |s: &str| map_path(s, &mounts, &node.bin_dir);

    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(n, _)| *n != k);
        env.push((k, v));
    };
    for from in c.env_from.iter().flatten() {
        let cm = from
            .config_map_ref
            .as_ref()
            .context("envFrom: the lab resolves configMapRef only")?;
        ensure!(
            cm.name == config_name,
            "envFrom: ConfigMap {:?} is not in the manifests",
            cm.name
        );
        for (k, v) in config {
            let key = format!("{}{k}", from.prefix.as_deref().unwrap_or(""));
            set(&mut env, key, map(v));
        }
    }
    for e in c.env.iter().flatten() {
        let value = env_value(e, node, config_name, config, &env)?;
        set(&mut env, e.name.clone(), map(&value));
    }
    for (k, v) in &node.injected {
        set(&mut env, k.clone(), v.clone());
    }
    let argv: Vec<String> = match node.commands.get(&c.name) {
        Some(replaced) => replaced.clone(),
        None => {
            let command = c.command.as_ref().filter(|c| !c.is_empty()).context(
                "command is required: the lab runs processes, it does not know the image's entrypoint",
            )?;
            command
                .iter()
                .chain(c.args.iter().flatten())
                .map(|a| map(&expand(a, &env)))
                .collect()
        }
    };
    Ok(Process {
        container: c.name.clone(),
        init,
        argv,
        env,
        dirs,
    })
}

fn env_value(
    e: &EnvVar,
    node: &Node,
    config_name: &str,
    config: &BTreeMap<String, String>,
    earlier: &[(String, String)],
) -> Result<String> {
    let Some(from) = &e.value_from else {
        return Ok(expand(e.value.as_deref().unwrap_or(""), earlier));
    };
    if let Some(f) = &from.field_ref {
        return match f.field_path.as_str() {
            "spec.nodeName" => Ok(node.name.clone()),
            "status.hostIP" => Ok(node.host_ip.to_string()),
            other => bail!(
                "env {}: fieldRef {other:?} is not one the lab resolves",
                e.name
            ),
        };
    }
    if let Some(k) = &from.config_map_key_ref {
        ensure!(
            k.name == config_name,
            "env {}: ConfigMap {:?} is not in the manifests",
            e.name,
            k.name
        );
        return config.get(&k.key).cloned().with_context(|| {
            format!(
                "env {}: ConfigMap {} has no key {:?}",
                e.name, k.name, k.key
            )
        });
    }
    bail!(
        "env {}: the lab resolves value, fieldRef and configMapKeyRef",
        e.name
    )
}

/// `$(NAME)` replaced by an earlier variable, as the kubelet does; `$$` is
/// a literal `$`; an unknown `$(NAME)` stays as written.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A path in the container (a whole argument, or the value of `--flag=`)
/// as it is on the lab node.
fn map_path(s: &str, mounts: &[(String, PathBuf)], bin_dir: &Path) -> String {
    let (prefix, path) = match s.split_once('=') {
        Some((flag, value)) if flag.starts_with('-') => (format!("{flag}="), value),
        _ => (String::new(), s),
    };
    let within = |p: &str, dir: &str| {
        p.strip_prefix(dir)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
            .map(str::to_string)
    };
    for (mount, host) in mounts {
        if let Some(rest) = within(path, mount) {
            return format!("{prefix}{}{rest}", host.display());
        }
    }
    if let Some(rest) = within(path, IMAGE_BIN_DIR) {
        return format!("{prefix}{}{rest}", bin_dir.display());
    }
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab_node() -> Node {
        Node {
            name: "node-1".into(),
            host_ip: Ipv4Addr::new(198, 18, 1, 1),
            root: "/run/meshlab/t/node-1/root".into(),
            bin_dir: "/src/target/debug".into(),
            config: BTreeMap::from([("WEFT_RESYNC".into(), "10".into())]),
            injected: vec![("WEFT_INTERFACE".into(), "wft1".into())],
            commands: BTreeMap::new(),
        }
    }

    #[test]
    fn the_repository_manifests_map_to_processes() {
        let m = load(Path::new(DEFAULT_DIR)).unwrap();
        let pod = pod(&m, &lab_node()).unwrap();
        let names: Vec<(&str, bool)> = pod.iter().map(|p| (p.container.as_str(), p.init)).collect();
        assert_eq!(
            names,
            [
                ("install-cni", true),
                ("meshd", false),
                ("dataplane", false)
            ]
        );
        let meshd = &pod[1];
        assert_eq!(meshd.argv[0], "/src/target/debug/meshd");
        assert!(meshd
            .argv
            .contains(&"--state-dir=/run/meshlab/t/node-1/root/var/lib/weft".to_string()));
        let env: BTreeMap<_, _> = meshd.env.iter().cloned().collect();
        assert_eq!(env["NODE_NAME"], "node-1");
        assert_eq!(env["WEFT_RESYNC"], "10", "the lab's ConfigMap values win");
        assert_eq!(env["WEFT_DATAPLANE"], "auto");
        assert_eq!(env["WEFT_INTERFACE"], "wft1");
        let install = &pod[0];
        assert!(install
            .argv
            .contains(&"--cni-bin-dir=/run/meshlab/t/node-1/root/opt/cni/bin".to_string()));
        assert!(install
            .argv
            .contains(&"--cni-plugin=/src/target/debug/weft".to_string()));
        // Shared paths stay what they are.
        assert!(!pod[2]
            .dirs
            .iter()
            .any(|d| d.starts_with("/var/run/wireguard")));
    }

    #[test]
    fn paths_map_by_whole_components_longest_mount_first() {
        let mounts = vec![
            ("/var/lib/weft/ipam".to_string(), PathBuf::from("/n/ipam")),
            ("/var/lib/weft".to_string(), PathBuf::from("/n/weft")),
        ];
        let bin = Path::new("/b");
        for (input, want) in [
            ("/var/lib/weft", "/n/weft"),
            ("/var/lib/weft/key.json", "/n/weft/key.json"),
            ("/var/lib/weft/ipam/x", "/n/ipam/x"),
            ("/var/lib/weftx", "/var/lib/weftx"),
            ("--state-dir=/var/lib/weft", "--state-dir=/n/weft"),
            ("/usr/local/bin/meshd", "/b/meshd"),
            ("a=/var/lib/weft", "a=/var/lib/weft"),
            ("run", "run"),
        ] {
            assert_eq!(map_path(input, &mounts, bin), want, "{input}");
        }
    }

    #[test]
    fn variables_expand_like_the_kubelet() {
        let env = vec![("A".to_string(), "1".to_string())];
        for (input, want) in [
            ("$(A)", "1"),
            ("x$(A)y", "x1y"),
            ("$(B)", "$(B)"),
            ("$$(A)", "$(A)"),
            ("$", "$"),
            ("a$b", "a$b"),
        ] {
            assert_eq!(expand(input, &env), want, "{input}");
        }
    }

    #[test]
    fn what_the_lab_cannot_run_is_named() {
        let mut m = load(Path::new(DEFAULT_DIR)).unwrap();
        let spec = m
            .daemonset
            .spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap();
        spec.containers[0].command = None;
        let err = format!("{:#}", pod(&m, &lab_node()).unwrap_err());
        assert!(
            err.contains("container \"meshd\"") && err.contains("command is required"),
            "{err}"
        );
    }
}
