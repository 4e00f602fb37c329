//! The lab's kubelet: each node runs the DaemonSet's pod from `deploy/`
//! ([`manifest`] maps it), one process per container inside the node's
//! namespace, pointed at the node kubeconfig (the same kube-rs path as in
//! production), detached so it outlives `meshlab up`, found again through
//! its pid file. Containers are started and restarted on request (`up`,
//! `start-meshd`, `container restart`), not by a watchdog.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use weft_meshd::cni::CONFLIST;

use super::state::{process_alive, write_atomic, LabDir};
use super::topology::{
    LabPlan, NodeDataplane, NodePlan, Runtime, CLUSTER_V4, CLUSTER_V6, MESH_V4, MESH_V6, PEERS_V4,
    PEERS_V6,
};
use super::{client, manifest, netns};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};

/// Keepalive in the lab: short, so that handshakes happen at once and
/// liveness is observable in tests.
const KEEPALIVE_SECS: &str = "5";
/// Resync more often than in production, so tests see resyncs change nothing.
const RESYNC_SECS: &str = "10";

/// A Weft binary (`meshd`, `weft`) built beside meshlab: `$MESHLAB_<NAME>`,
/// else next to meshlab's own executable.
pub fn sibling(name: &str) -> Result<PathBuf> {
    if let Some(explicit) = std::env::var_os(format!("MESHLAB_{}", name.to_uppercase())) {
        return Ok(explicit.into());
    }
    let exe = std::env::current_exe().context("locating meshlab")?;
    let dir = exe.parent().context("meshlab has no directory")?;
    // Integration tests run from target/<profile>/deps.
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!("{name} not found next to {}: build the workspace (cargo build --workspace) or set MESHLAB_{}", exe.display(), name.to_uppercase())
}

/// The `weft` plugin the lab installs: its static build beside meshlab's
/// (`target/<host triple>/<profile>/weft`, from cni/build-static), as the
/// image has it; `$MESHLAB_WEFT` overrides.
pub fn plugin() -> Result<PathBuf> {
    if let Some(explicit) = std::env::var_os("MESHLAB_WEFT") {
        return Ok(explicit.into());
    }
    let meshd = sibling("meshd")?;
    // Seen from a test binary: target/<profile>/deps/../meshd.
    let meshd = meshd
        .canonicalize()
        .with_context(|| format!("{}", meshd.display()))?;
    let profile_dir = meshd.parent().context("meshd has no directory")?;
    let (Some(target), Some(profile)) = (profile_dir.parent(), profile_dir.file_name()) else {
        bail!("{} is not in a cargo target directory", meshd.display());
    };
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let path = target
        .join(triple)
        .join(profile)
        .join(weft_meshd::cni::PLUGIN);
    ensure!(
        path.is_file(),
        "{} not found: build the static plugin with cni/build-static (the lab installs what the image has) or set MESHLAB_WEFT",
        path.display()
    );
    Ok(path)
}

fn node_dir(dir: &LabDir, node: &NodePlan) -> PathBuf {
    dir.file(&node.name)
}

/// The kubeconfig of the node's pod: the API server's fabric address and a
/// token of the DaemonSet's service account bound to this Node, as the
/// kubelet projects one into the pod. The API server knows from it which
/// node asks (and the admission policy holds each node to its own Node).
pub fn pod_kubeconfig(dir: &LabDir, node: &NodePlan) -> PathBuf {
    node_dir(dir, node).join("kubeconfig")
}

/// How long a pod's token is valid (the lab does not refresh tokens as the
/// kubelet does; a lab lives for hours, not weeks).
const TOKEN_SECONDS: i64 = 7 * 24 * 3600;

/// Asks the API server for the pod's token (a TokenRequest bound to the
/// Node) and writes the pod's kubeconfig with it.
fn issue_credentials(dir: &LabDir, plan: &LabPlan, node: &NodePlan) -> Result<()> {
    let (namespace, account) = manifest::load(&plan.manifests)?.service_account();
    let node_name = node.name.clone();
    let token = client::block_on(dir, |client| async move {
        let api: Api<ServiceAccount> = Api::namespaced(client, &namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(node_name),
                    uid: None,
                }),
                expiration_seconds: Some(TOKEN_SECONDS),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let issued = api
            .create_token_request(&account, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for {namespace}/{account}"))?;
        issued
            .status
            .map(|s| s.token)
            .context("the TokenRequest came back without a token")
    })?;
    write_kubeconfig(dir, &pod_kubeconfig(dir, node), &token)
}

/// The kubeconfig of the node's kubelet: the API server's fabric address
/// (as the pod's) and a credential that authenticates as
/// `system:node:<node>` in `system:nodes`, as a kubelet's client
/// certificate does. What a compromised node holds besides its pod's token.
pub fn kubelet_kubeconfig(dir: &LabDir, node: &NodePlan) -> PathBuf {
    node_dir(dir, node).join("kubelet.kubeconfig")
}

/// Writes the node's kubelet kubeconfig, as a kubelet gets its credential
/// when it joins. Signed with the running API server's key (read from the
/// lab directory), it stays valid across API server restarts and whether
/// or not the Node exists.
pub fn issue_kubelet_credentials(dir: &LabDir, node: &NodePlan) -> Result<()> {
    let token = crate::apiserver::kubelet_token(&dir.path(), &node.name)
        .with_context(|| format!("a kubelet credential for {}", node.name))?;
    write_kubeconfig(dir, &kubelet_kubeconfig(dir, node), &token)
}

/// Writes the node namespaces' kubeconfig with `token` in it to `path`
/// (mode 0600: it is a credential).
fn write_kubeconfig(dir: &LabDir, path: &Path, token: &str) -> Result<()> {
    let base = dir.node_kubeconfig();
    let text = fs::read_to_string(&base).with_context(|| format!("reading {}", base.display()))?;
    let mut kubeconfig: serde_json::Value =
        serde_norway::from_str(&text).with_context(|| format!("{} is not YAML", base.display()))?;
    kubeconfig["users"][0]["user"]["token"] = serde_json::json!(token);
    weft_keys::write_private(path, serde_norway::to_string(&kubeconfig)?.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The node's own host filesystem: host path `/x` of the DaemonSet's
/// volumes is `root/x` (each lab node is its own machine).
pub fn root(dir: &LabDir, node: &NodePlan) -> PathBuf {
    node_dir(dir, node).join("root")
}

/// Where the node's runtime finds CNI plugins and their configurations
/// (the standard `/opt/cni/bin` and `/etc/cni/net.d` of the node).
pub fn cni_bin_dir(dir: &LabDir, node: &NodePlan) -> PathBuf {
    root(dir, node).join("opt/cni/bin")
}

pub fn cni_conf_dir(dir: &LabDir, node: &NodePlan) -> PathBuf {
    root(dir, node).join("etc/cni/net.d")
}

/// The node's conflist, as meshd wrote it after its first sync, with the
/// host paths in it resolved in the node's filesystem as the node's runtime
/// resolves them: a container writes the paths it was given (`/run/weft/…`
/// from the image, `<root>/run/weft/…` as a process), and on the lab
/// machine the node's `/` is `<root>`.
pub fn conflist(dir: &LabDir, node: &NodePlan) -> Result<serde_json::Value> {
    let path = cni_conf_dir(dir, node).join(CONFLIST);
    let bytes = fs::read(&path).with_context(|| {
        format!(
            "{} (meshd writes it after its first successful sync)",
            path.display()
        )
    })?;
    let mut conflist: serde_json::Value = serde_json::from_slice(&bytes)?;
    let lab = dir.path();
    for plugin in conflist["plugins"].as_array_mut().into_iter().flatten() {
        for key in ["stateFile", "ipamDir"] {
            let Some(p) = plugin[key].as_str().map(PathBuf::from) else {
                continue;
            };
            if p.is_absolute() && !p.starts_with(&lab) {
                let on_node = root(dir, node).join(p.strip_prefix("/").unwrap_or(&p));
                plugin[key] = serde_json::json!(on_node);
            }
        }
    }
    Ok(conflist)
}

/// Whether meshd has made the node ready for pods: the plugin and its
/// conflist are installed and the plugin's STATUS says it takes pods (the
/// mesh is made and, with NetworkPolicy on, the policy program loaded), as
/// a runtime asks.
pub fn cni_ready(dir: &LabDir, node: &NodePlan) -> bool {
    cni_bin_dir(dir, node).join("weft").is_file() && super::pods::status(dir, node).is_ok()
}

fn pid_file(dir: &LabDir, node: &NodePlan, container: &str) -> PathBuf {
    node_dir(dir, node).join(format!("{container}.pid"))
}

/// Where the container's output goes.
pub fn log_file(dir: &LabDir, node: &NodePlan, container: &str) -> PathBuf {
    node_dir(dir, node).join(format!("{container}.log"))
}

/// The DaemonSet's container that runs the agent.
pub const MESHD: &str = "meshd";

/// The process of the node's `container`, if it runs.
pub fn container_pid(dir: &LabDir, node: &NodePlan, container: &str) -> Option<i32> {
    let pid: i32 = fs::read_to_string(pid_file(dir, node, container))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    process_alive(pid, &dir.path()).then_some(pid)
}

/// The node's running meshd, if any.
pub fn pid(dir: &LabDir, node: &NodePlan) -> Option<i32> {
    container_pid(dir, node, MESHD)
}

/// Where the node's meshd serves /metrics (inside the node's namespace):
/// the DaemonSet's `--metrics-addr` (a test holds them equal).
pub const METRICS_ADDR: &str = "127.0.0.1:9475";

/// How long an init container may run.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The lab's probe timeout: twice the shipped second, stretched by the
/// time scale, and at most half the lab's peer timeout.
fn probe_timeout(plan: &LabPlan) -> Duration {
    let peer = plan
        .config
        .get("WEFT_PEER_TIMEOUT")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(30);
    super::scaled(Duration::from_secs(2)).min(Duration::from_millis(peer * 500))
}

/// The lab's values in the manifests' ConfigMap: its cluster ranges and
/// short timers, then what `up --config` set.
pub fn lab_config(plan: &LabPlan) -> BTreeMap<String, String> {
    let pod_cidr_source = if plan.self_allocated {
        "node-or-blocks"
    } else {
        "node"
    };
    [
        ("WEFT_CLUSTER_CIDRS", format!("{CLUSTER_V4},{CLUSTER_V6}")),
        ("WEFT_MESH_CIDRS", format!("{MESH_V4},{MESH_V6}")),
        ("WEFT_PEER_CIDRS", format!("{PEERS_V4},{PEERS_V6}")),
        ("WEFT_PERSISTENT_KEEPALIVE", KEEPALIVE_SECS.to_string()),
        // How long a probe's answer may take: twice the shipped second,
        // since the suites run up to eight labs at once on two cores (a
        // data plane starved that long is not a dead link), and longer on
        // slow hardware (a guest without KVM). `bench failover` measures
        // the shipped value.
        // Below the peer timeout, which meshd requires (a lab's fast
        // timers under TCG would otherwise stop every meshd).
        (
            "WEFT_PROBE_TIMEOUT",
            humantime::format_duration(probe_timeout(plan)).to_string(),
        ),
        ("WEFT_RESYNC", RESYNC_SECS.to_string()),
        ("WEFT_POD_CIDR_SOURCE", pod_cidr_source.to_string()),
        // Zero-trust by default: every test also proves that nodes' own
        // traffic to each other crosses WireGuard (the sentinel's host
        // counter stays 0); `--config WEFT_ENCRYPT_HOST=false` for the
        // shipped default.
        ("WEFT_ENCRYPT_HOST", "true".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .chain(plan.config.clone())
    .collect()
}

/// The DaemonSet's pod on `node`, as processes.
pub fn pod(dir: &LabDir, plan: &LabPlan, node: &NodePlan) -> Result<Vec<manifest::Process>> {
    let manifests = manifest::load(&plan.manifests)?;
    pod_of(&manifests, dir, plan, node).with_context(|| {
        format!(
            "the DaemonSet of {} on {}",
            plan.manifests.display(),
            node.name
        )
    })
}

/// A DaemonSet's pod on `node`.
fn pod_of(
    manifests: &manifest::Manifests,
    dir: &LabDir,
    plan: &LabPlan,
    node: &NodePlan,
) -> Result<Vec<manifest::Process>> {
    let commands = match &node.dataplane {
        Some(NodeDataplane::Program(program)) => {
            let argv = vec![program.clone(), "-f".into(), node.wg_interface.clone()];
            BTreeMap::from([(DATAPLANE.to_string(), argv)])
        }
        _ => BTreeMap::new(),
    };
    let mut injected = vec![(
        weft_meshd::dataplane::INTERFACE_ENV.into(),
        node.wg_interface.clone(),
    )];
    if node.dataplane.is_some() {
        // Both containers read it: meshd configures, and the data plane
        // container runs, a userspace device even where the kernel has
        // WireGuard.
        injected.push((weft_meshd::dataplane::MODE_ENV.into(), "userspace".into()));
    }
    let lab_node = manifest::Node {
        name: node.name.clone(),
        host_ip: node.underlay,
        root: root(dir, node),
        kubeconfig: pod_kubeconfig(dir, node),
        config: lab_config(plan),
        injected,
        commands,
    };
    manifest::pod(manifests, &lab_node)
}

/// Uninstalls Weft from `node` as an admin would: Weft's pod goes (`kubectl
/// delete -k deploy/`: every container stopped), then the cleanup
/// DaemonSet's pod runs its init containers to completion (its other
/// containers only show that it finished, so they are not started).
pub fn uninstall(
    dir: &LabDir,
    plan: &LabPlan,
    node: &NodePlan,
    cleanup: &manifest::Manifests,
) -> Result<()> {
    for p in pod(dir, plan, node)?.iter().filter(|p| !p.init) {
        if let Some(pid) = container_pid(dir, node, &p.container) {
            stop(dir, pid, TERM_GRACE);
        }
    }
    for p in pod_of(cleanup, dir, plan, node)?.iter().filter(|p| p.init) {
        run_to_completion(dir, plan, node, p)?;
    }
    Ok(())
}

/// Runs an init container and waits (bounded) for it to succeed.
fn run_to_completion(
    dir: &LabDir,
    plan: &LabPlan,
    node: &NodePlan,
    p: &manifest::Process,
) -> Result<()> {
    for d in &p.dirs {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut child = spawn(dir, plan, node, p)?;
    let bound = super::scaled(INIT_TIMEOUT);
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!(
                "init container {} on {} did not finish within {bound:?}",
                p.container,
                node.name
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if !status.success() {
        let log = fs::read_to_string(log_file(dir, node, &p.container)).unwrap_or_default();
        bail!(
            "init container {} on {} failed ({status}):\n{}",
            p.container,
            node.name,
            log.trim_end()
        );
    }
    Ok(())
}

/// The DaemonSet's container that runs the userspace data plane.
pub const DATAPLANE: &str = "dataplane";

/// Starts the node's pod, as the kubelet would: the init containers to
/// completion (unless a container of the pod runs already: they ran), then
/// every container that is not running. Returns meshd's pid.
pub fn start(dir: &LabDir, plan: &LabPlan, node: &NodePlan) -> Result<i32> {
    let pod = pod(dir, plan, node)?;
    fs::create_dir_all(node_dir(dir, node))?;
    let running = pod
        .iter()
        .any(|p| !p.init && container_pid(dir, node, &p.container).is_some());
    issue_credentials(dir, plan, node)?;
    let mut meshd = None;
    for p in &pod {
        if p.init && running || container_pid(dir, node, &p.container).is_some() {
            continue;
        }
        if p.init {
            run_to_completion(dir, plan, node, p)?;
        } else {
            for d in &p.dirs {
                fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            }
            let child = spawn(dir, plan, node, p)?;
            // `ip netns exec` execs the container's command in place, so
            // this is its pid.
            write_atomic(
                &pid_file(dir, node, &p.container),
                child.id().to_string().as_bytes(),
            )?;
            if p.container == MESHD {
                meshd = Some(child);
            }
        }
    }
    match meshd.as_mut() {
        // Started here: its parent knows for sure whether it runs.
        Some(child) => match child.try_wait()? {
            None => Ok(i32::try_from(child.id())?),
            Some(status) => Err(not_running(dir, node, &status.to_string())),
        },
        // Running already: known by its pid file.
        None => pid(dir, node)
            .ok_or_else(|| not_running(dir, node, "its pid file names no live process")),
    }
}

fn not_running(dir: &LabDir, node: &NodePlan, why: &str) -> anyhow::Error {
    let log = fs::read_to_string(log_file(dir, node, MESHD)).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(5).collect();
    anyhow::anyhow!(
        "meshd on {} is not running ({why}):\n{}",
        node.name,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// Restarts one container of the node's pod (just its process, as the
/// kubelet restarts a container): stops it with SIGTERM, then SIGKILL.
pub fn restart(dir: &LabDir, plan: &LabPlan, node: &NodePlan, container: &str) -> Result<i32> {
    let pod = pod(dir, plan, node)?;
    let p = pod
        .iter()
        .find(|p| !p.init && p.container == container)
        .with_context(|| {
            let names: Vec<&str> = pod
                .iter()
                .filter(|p| !p.init)
                .map(|p| p.container.as_str())
                .collect();
            format!(
                "no container {container:?} in the pod (it has {})",
                names.join(", ")
            )
        })?;
    if let Some(old) = container_pid(dir, node, container) {
        stop(dir, old, TERM_GRACE);
    }
    let child = spawn(dir, plan, node, p)?;
    write_atomic(
        &pid_file(dir, node, container),
        child.id().to_string().as_bytes(),
    )?;
    Ok(child.id() as i32)
}

/// How long a stopped container gets between SIGTERM and SIGKILL (the
/// DaemonSet's grace period is longer; the lab's processes stop at once).
const TERM_GRACE: Duration = Duration::from_secs(5);

fn stop(dir: &LabDir, pid: i32, grace: Duration) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while process_alive(pid, &dir.path()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

fn spawn(
    dir: &LabDir,
    plan: &LabPlan,
    node: &NodePlan,
    p: &manifest::Process,
) -> Result<std::process::Child> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_file(dir, node, &p.container))?;
    let mut cmd = match plan.runtime {
        Runtime::Processes => process_command(node, p)?,
        Runtime::Podman => podman_command(dir, node, p)?,
    };
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    cmd.spawn()
        .with_context(|| format!("starting container {} on {}", p.container, node.name))
}

/// The container as a process in the node's namespace, with the binaries
/// built beside meshlab and paths mapped into the node's directory.
fn process_command(node: &NodePlan, p: &manifest::Process) -> Result<Command> {
    let meshd = sibling("meshd")?;
    let plugin = plugin()?;
    let (argv, env) = p.on_host(manifest::Binaries {
        dir: meshd.parent().context("meshd has no directory")?,
        plugin: &plugin,
    });
    let (program, args) = argv.split_first().context("an empty command")?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.netns])
        .arg(program)
        .args(args)
        // A container sees its own environment, not meshlab's; PATH stays
        // so that the tools the image would carry (nft) are found.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env);
    Ok(cmd)
}

/// Labels every podman container of a lab with the lab's directory, so
/// teardown finds them even after a crash.
pub const PODMAN_LABEL: &str = "dev.weft.meshlab";

/// The container with podman: the DaemonSet's image in the node's network
/// namespace, run by `runc-strict`, with the manifest's volumes, privileges and
/// capabilities, command and environment exactly as written. `nsenter
/// --net`, not `ip netns exec`: the latter's private /sys hides the cgroup
/// mount runc needs. Attached, so the pid file holds podman, which passes
/// signals on to the container (`--sig-proxy`) and removes it when it ends.
fn podman_command(dir: &LabDir, node: &NodePlan, p: &manifest::Process) -> Result<Command> {
    anyhow::ensure!(
        !p.replaced,
        "container {} on {}: the lab runs a program of this machine's there, which the image does not have (use --runtime processes)",
        p.container,
        node.name
    );
    let (program, args) = p.argv.split_first().context("an empty command")?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", node.netns))
        .args(["podman", "run", "--rm", "--network=host", "--pull=never"])
        .arg(format!(
            "--runtime={}",
            super::strict_runtime::install(&dir.path())?.display()
        ))
        .arg(format!("--name={}-{}", node.netns, p.container))
        .arg(format!("--label={PODMAN_LABEL}={}", dir.path().display()));
    // podman's default limits (1048576 open files) exceed what this
    // sandbox lets runc grant without CAP_SYS_RESOURCE, and runc then fails
    // to start the container: open files as many as this process may have;
    // processes 4096 (measured: runc is refused even this process's own
    // hard limit of processes here).
    let (_, files) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    cmd.arg(format!("--ulimit=nofile={files}:{files}"))
        .arg("--ulimit=nproc=4096:4096");
    if p.privileged {
        cmd.arg("--privileged");
    }
    for cap in &p.capabilities {
        cmd.arg(format!("--cap-add={cap}"));
    }
    // Devices too are bind-mounted, as kubelet mounts them; the runtime
    // then grants them as strict runtimes do (see strict_runtime).
    for m in &p.mounts {
        cmd.arg(format!("--volume={}:{}", m.host.display(), m.container));
    }
    for (k, v) in &p.env {
        cmd.arg(format!("--env={k}={v}"));
    }
    cmd.arg(format!("--entrypoint={program}"))
        .arg(&p.image)
        .args(args);
    Ok(cmd)
}

/// The last `n` warning or error lines of the node's meshd log.
pub fn log_warnings(dir: &LabDir, node: &NodePlan, n: usize) -> String {
    let log = fs::read_to_string(log_file(dir, node, MESHD)).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("\"level\":\"INFO\""))
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The node's meshd metrics (Prometheus text), fetched inside its namespace.
pub fn metrics(node: &NodePlan) -> Result<String> {
    netns::run_in(&node.netns, || {
        let mut conn = std::net::TcpStream::connect(METRICS_ADDR)
            .context("connecting to meshd's metrics (is meshd running?)")?;
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        let (_, body) = response
            .split_once("\r\n\r\n")
            .context("a malformed HTTP response from meshd")?;
        Ok(body.to_string())
    })
}

/// Stops the node's meshd with `signal` (its data plane is left running).
pub fn signal(dir: &LabDir, node: &NodePlan, signal: Signal) -> Result<Option<i32>> {
    let Some(pid) = pid(dir, node) else {
        return Ok(None);
    };
    kill(Pid::from_raw(pid), signal).with_context(|| format!("signalling meshd {pid}"))?;
    Ok(Some(pid))
}
