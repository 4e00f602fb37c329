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
/// What the self-allocated-blocks overlay adds to the base (`up
/// --self-allocated-blocks`; its ConfigMap patch is the lab's own setting).
pub const BLOCK_CLAIMS_RBAC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/overlays/self-allocated-blocks/blocks-rbac.yaml"
);
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
    /// The settings the DaemonSet reads, if it reads any (deploy/ has one;
    /// the cleanup DaemonSet in deploy/uninstall none).
    pub config: Option<ConfigMap>,
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
    #[serde(default)]
    images: Vec<ImageOverride>,
}

/// A kustomization's `images` entry: what the DaemonSet's `image: weft`
/// becomes (`localhost/weft:0.1.0`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageOverride {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

impl ImageOverride {
    fn apply(&self, image: &str) -> Option<String> {
        let (name, tag) = match image.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t)),
            _ => (image, None),
        };
        (name == self.name).then(|| {
            let name = self.new_name.as_deref().unwrap_or(name);
            match self.new_tag.as_deref().or(tag) {
                Some(tag) => format!("{name}:{tag}"),
                None => name.to_string(),
            }
        })
    }
}

impl Manifests {
    /// The namespace and service account the DaemonSet's pods run as.
    pub fn service_account(&self) -> (String, String) {
        let namespace = self.daemonset.metadata.namespace.clone();
        let account = self
            .daemonset
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.service_account_name.clone());
        (
            namespace.unwrap_or_else(|| "default".into()),
            account.unwrap_or_else(|| "default".into()),
        )
    }
}

/// Loads `path`: a kustomization directory of plain resources (patches are
/// kubectl's job: render an overlay with `kubectl kustomize DIR > FILE` and
/// pass the file), or a multi-document YAML file.
pub fn load(path: &Path) -> Result<Manifests> {
    let mut objects = Vec::new();
    collect(path, &mut objects)?;
    let find = |kind: &str| -> Result<Option<Value>> {
        let mut found = objects.iter().filter(|o| o["kind"] == kind);
        let first = found.next().cloned();
        ensure!(
            found.next().is_none(),
            "{}: more than one {kind}",
            path.display()
        );
        Ok(first)
    };
    let daemonset =
        find("DaemonSet")?.with_context(|| format!("{}: no DaemonSet", path.display()))?;
    // The cluster settings: the ConfigMap the DaemonSet's containers take
    // their environment from (others, like the revoked keys, are data).
    let referenced: Vec<&str> = daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["envFrom"].as_array().into_iter().flatten())
        .filter_map(|e| e["configMapRef"]["name"].as_str())
        .collect();
    let config = objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && referenced.contains(&o["metadata"]["name"].as_str().unwrap_or_default())
        })
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .context("the ConfigMap")?;
    let daemonset = serde_json::from_value(daemonset).context("the DaemonSet")?;
    Ok(Manifests {
        objects,
        daemonset,
        config,
    })
}

/// The objects of a YAML file or plain kustomization, as they are.
pub fn objects(path: &Path) -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    collect(path, &mut objects)?;
    Ok(objects)
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
    let first = out.len();
    for r in k.bases.iter().chain(&k.resources) {
        collect(&path.join(r), out)?;
    }
    for object in &mut out[first..] {
        let spec = &mut object["spec"]["template"]["spec"];
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array_mut().into_iter().flatten() {
                let image = c["image"].as_str().unwrap_or_default().to_string();
                if let Some(new) = k.images.iter().find_map(|o| o.apply(&image)) {
                    c["image"] = Value::String(new);
                }
            }
        }
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
    /// The pod's kubeconfig on the lab node, mounted at [`POD_KUBECONFIG`].
    pub kubeconfig: PathBuf,
    /// ConfigMap values the lab sets (its cluster ranges, short timers).
    pub config: BTreeMap<String, String>,
    /// Variables the runtime adds: the node's interface name.
    pub injected: Vec<(String, String)>,
    /// Containers whose command the lab replaces (a node running another
    /// WireGuard implementation in the data plane container).
    pub commands: BTreeMap<String, Vec<String>>,
}

/// Where the lab's pods find their kubeconfig (the lab's stand-in for the
/// projected service account token: kube-rs reads `KUBECONFIG` first).
pub const POD_KUBECONFIG: &str = "/var/run/secrets/meshlab/kubeconfig";

/// A hostPath volume as one container mounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is on the lab node.
    pub host: PathBuf,
    /// Where the container sees it. A character device (`/dev/net/tun`)
    /// is bind-mounted like any path, as kubelet does: no device rule
    /// grants it (see `strict_runtime`).
    pub container: String,
}

/// One container of the pod, as the container sees itself: its image,
/// command and environment with container paths, and what is mounted
/// where. [`Process::on_host`] turns it into a process on the lab node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub container: String,
    /// Runs to completion before the containers start.
    pub init: bool,
    pub image: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    /// Host directories to create first (`DirectoryOrCreate` volumes).
    pub dirs: Vec<PathBuf>,
    pub privileged: bool,
    /// Capabilities added to the runtime's defaults.
    pub capabilities: Vec<String>,
    /// The lab replaced the command with a program of the machine's (one
    /// that is not in the image).
    pub replaced: bool,
}

/// What the lab runs for the image's binaries (in [`IMAGE_BIN_DIR`]).
#[derive(Debug, Clone, Copy)]
pub struct Binaries<'a> {
    /// The build's own (`target/<profile>`): meshd, meshctl.
    pub dir: &'a Path,
    /// The CNI plugin as the image has it: its static build
    /// (cni/build-static), since it runs on the host.
    pub plugin: &'a Path,
}

impl Process {
    /// The command and environment as a process on the lab node runs
    /// them: every path inside a mount becomes the mount's source, and the
    /// image's binaries the ones built beside meshlab (`bin`).
    pub fn on_host(&self, bin: Binaries) -> (Vec<String>, Vec<(String, String)>) {
        let plugin = format!("{IMAGE_BIN_DIR}/{}", weft_meshd::cni::PLUGIN);
        // Longest mount first, so that a nested mount wins.
        let mut mounts: Vec<(&str, &Path)> = self
            .mounts
            .iter()
            .map(|m| (m.container.trim_end_matches('/'), m.host.as_path()))
            .chain([(plugin.as_str(), bin.plugin)])
            .collect();
        mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        let map = |s: &String| map_path(s, &mounts, bin.dir);
        let argv = self.argv.iter().map(map).collect();
        let env = self.env.iter().map(|(k, v)| (k.clone(), map(v))).collect();
        (argv, env)
    }
}

/// The DaemonSet's pod on `node`: init containers, then containers, in order.
pub fn pod(m: &Manifests, node: &Node) -> Result<Vec<Process>> {
    let spec: &PodSpec = m
        .daemonset
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("the DaemonSet has no spec.template.spec")?;
    let (mut config, config_name) = match &m.config {
        Some(c) => (
            c.data.clone().unwrap_or_default(),
            c.metadata.name.clone().unwrap_or_default(),
        ),
        None => Default::default(),
    };
    if m.config.is_some() {
        config.extend(node.config.clone());
    }
    let volumes = host_paths(spec, node)?;
    let pod = PodContext {
        namespace: m.service_account().0,
        config_name,
        config,
    };
    let init = spec.init_containers.iter().flatten().map(|c| (c, true));
    let main = spec.containers.iter().map(|c| (c, false));
    init.chain(main)
        .map(|(c, init)| {
            container(c, init, node, &volumes, &pod)
                .with_context(|| format!("container {:?}", c.name))
        })
        .collect()
}

/// What every container of the pod resolves its environment from.
struct PodContext {
    /// The pod's namespace (the DaemonSet's).
    namespace: String,
    /// The ConfigMap of the manifests, and its data with the lab's values.
    config_name: String,
    config: BTreeMap<String, String>,
}

/// A hostPath volume: where it is on the lab node, whether to create it.
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
    pod: &PodContext,
) -> Result<Process> {
    let mut mounts = vec![Mount {
        host: node.kubeconfig.clone(),
        container: POD_KUBECONFIG.into(),
    }];
    let mut dirs = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let v = volumes
            .get(&m.name)
            .with_context(|| format!("volumeMounts: no volume {:?}", m.name))?;
        mounts.push(Mount {
            host: v.path.clone(),
            container: m.mount_path.clone(),
        });
        if v.create_dir {
            dirs.push(v.path.clone());
        }
    }

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
            cm.name == pod.config_name,
            "envFrom: ConfigMap {:?} is not in the manifests",
            cm.name
        );
        for (k, v) in &pod.config {
            let key = format!("{}{k}", from.prefix.as_deref().unwrap_or(""));
            set(&mut env, key, v.clone());
        }
    }
    for e in c.env.iter().flatten() {
        let value = env_value(e, node, pod, &env)?;
        set(&mut env, e.name.clone(), value);
    }
    set(&mut env, "KUBECONFIG".into(), POD_KUBECONFIG.into());
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
                .map(|a| expand(a, &env))
                .collect()
        }
    };
    let security = c.security_context.as_ref();
    Ok(Process {
        container: c.name.clone(),
        init,
        image: c.image.clone().unwrap_or_default(),
        argv,
        env,
        mounts,
        dirs,
        privileged: security.and_then(|s| s.privileged).unwrap_or(false),
        capabilities: security
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.clone())
            .unwrap_or_default(),
        replaced: node.commands.contains_key(&c.name),
    })
}

fn env_value(
    e: &EnvVar,
    node: &Node,
    pod: &PodContext,
    earlier: &[(String, String)],
) -> Result<String> {
    let Some(from) = &e.value_from else {
        return Ok(expand(e.value.as_deref().unwrap_or(""), earlier));
    };
    if let Some(f) = &from.field_ref {
        return match f.field_path.as_str() {
            "spec.nodeName" => Ok(node.name.clone()),
            "metadata.namespace" => Ok(pod.namespace.clone()),
            "status.hostIP" => Ok(node.host_ip.to_string()),
            other => bail!(
                "env {}: fieldRef {other:?} is not one the lab resolves",
                e.name
            ),
        };
    }
    if let Some(k) = &from.config_map_key_ref {
        ensure!(
            k.name == pod.config_name,
            "env {}: ConfigMap {:?} is not in the manifests",
            e.name,
            k.name
        );
        return pod.config.get(&k.key).cloned().with_context(|| {
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
fn map_path(s: &str, mounts: &[(&str, &Path)], bin_dir: &Path) -> String {
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
            kubeconfig: "/run/meshlab/t/node-1/kubeconfig".into(),
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
        // As the container sees itself: the image, its paths.
        assert_eq!(
            meshd.image, "localhost/weft:0.1.0",
            "kustomize's images applied"
        );
        assert_eq!(meshd.argv[0], "/usr/local/bin/meshd");
        assert!(meshd
            .argv
            .contains(&"--state-dir=/var/lib/weft".to_string()));
        assert_eq!(meshd.capabilities, ["NET_ADMIN", "NET_RAW"]);
        assert!(!meshd.privileged && pod[0].privileged);
        assert!(pod[2].mounts.iter().any(|m| m.container == "/dev/net/tun"));
        assert!(
            pod[2].privileged,
            "the data plane opens /dev/net/tun, which kubelet only bind-mounts"
        );
        // As a process on the lab node: the node's paths, the build's binaries.
        let bin = Binaries {
            dir: Path::new("/src/target/debug"),
            plugin: Path::new("/src/target/x86_64-unknown-linux-gnu/debug/weft"),
        };
        let (argv, env) = meshd.on_host(bin);
        assert_eq!(argv[0], "/src/target/debug/meshd");
        assert!(argv.contains(&"--state-dir=/run/meshlab/t/node-1/root/var/lib/weft".to_string()));
        let env: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(env["NODE_NAME"], "node-1");
        assert_eq!(env["WEFT_RESYNC"], "10", "the lab's ConfigMap values win");
        assert_eq!(env["WEFT_DATAPLANE"], "auto");
        assert_eq!(env["WEFT_INTERFACE"], "wft1");
        assert_eq!(env["KUBECONFIG"], "/run/meshlab/t/node-1/kubeconfig");
        let (install, _) = pod[0].on_host(bin);
        assert!(
            install.contains(&"--cni-bin-dir=/run/meshlab/t/node-1/root/opt/cni/bin".to_string())
        );
        assert!(install
            .contains(&"--cni-plugin=/src/target/x86_64-unknown-linux-gnu/debug/weft".to_string()));
        // Shared paths stay what they are.
        assert!(!pod[2]
            .dirs
            .iter()
            .any(|d| d.starts_with("/var/run/wireguard")));
    }

    #[test]
    fn paths_map_by_whole_components_longest_mount_first() {
        let mounts = vec![
            ("/var/lib/weft/ipam", Path::new("/n/ipam")),
            ("/var/lib/weft", Path::new("/n/weft")),
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
