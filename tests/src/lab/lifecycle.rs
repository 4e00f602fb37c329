//! `up` and `down`. `up` refuses a lab that is running, clears the leftovers
//! of one that crashed, and undoes itself if any step fails; `down` removes
//! every process, namespace and file the lab made, state file or not.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

use super::pods::{self, PodRecord};
use super::state::{is_zombie, process_alive, LabDir, LabState};
use super::topology::{self, LabPlan, LabSpec, NodePlan};
use super::{agents, client, control, manifest, mesh, netns, peers, preflight};

/// How long `up` and `node add` wait for every pair of nodes to handshake.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// What `down` (or `up`'s clean-up of a crashed run) removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub processes: usize,
    pub namespaces: usize,
    pub files: bool,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Brings a lab up and returns its recorded state.
pub fn up(dir: &LabDir, spec: &LabSpec, progress: &mut dyn FnMut(&str)) -> Result<LabState> {
    preflight::require_root()?;
    preflight::require_tools(&[("ip", "iproute2")])?;
    let plan = topology::plan(spec)?;
    let _lock = dir.lock()?;
    if let Some(state) = dir.read_state().ok().flatten() {
        if process_alive(state.api_server.pid, &dir.path()) {
            bail!(
                "lab {:?} is already up (API server pid {}); run `meshlab --name {} down` first, or choose another --name",
                dir.name, state.api_server.pid, dir.name
            );
        }
    }
    let leftovers = teardown(dir)?;
    if !leftovers.is_empty() {
        progress(&format!(
            "cleaned up an earlier run that did not finish: {} processes, {} namespaces",
            leftovers.processes, leftovers.namespaces
        ));
    }
    let built = build(dir, &plan, spec, progress);
    if built.is_err() {
        // Leave nothing half-made behind; the original error is what matters.
        let _ = teardown(dir);
    }
    built
}

fn build(
    dir: &LabDir,
    plan: &LabPlan,
    spec: &LabSpec,
    progress: &mut dyn FnMut(&str),
) -> Result<LabState> {
    fs::create_dir_all(dir.path()).with_context(|| format!("creating {}", dir.path().display()))?;
    let started = Instant::now();
    netns::create_fabric(plan)?;
    progress(&format!(
        "fabric {} with bridge {} on {}",
        plan.fabric_netns, plan.bridge, plan.fabric_cidr
    ));
    for node in &plan.nodes {
        netns::create_node(plan, node)?;
        if !plan.self_allocated {
            netns::create_pod_standin(node)?;
        }
        progress(&format!(
            "node {} in {} at {}",
            node.name, node.netns, node.underlay
        ));
    }
    let (api_netns, api_addr) = plan.api_listener();
    let api_server = control::spawn(dir, api_netns, api_addr, control::Start::Fresh)?;
    progress(&format!(
        "API server at {} (nodes use {})",
        api_server.url, api_server.fabric_url
    ));
    let state = LabState {
        plan: plan.clone(),
        api_server,
        pods: Vec::new(),
        cuts: Default::default(),
        peers: Vec::new(),
    };
    dir.write_state(&state)?;
    super::kube_proxy::spawn(dir)?;
    let installed = install_manifests(dir, plan)?;
    progress(&format!(
        "installed {installed} objects of {}",
        plan.manifests.display()
    ));
    register_nodes(dir, &plan.nodes, plan.self_allocated)?;
    progress(&format!(
        "registered {} Node objects in {:.1} s",
        plan.nodes.len(),
        started.elapsed().as_secs_f64()
    ));
    start_mesh(dir, &plan.nodes, progress)?;
    for node in &plan.nodes {
        let k = node.name.trim_start_matches("node-");
        for i in 1..=spec.pods_per_node {
            let pod = add_pod_unlocked(
                dir,
                &node.name,
                "default",
                &format!("pod-{k}-{i}"),
                &BTreeMap::new(),
                pods::Status::Reported,
            )?;
            progress(&format!(
                "pod {}/{} on {} at {}",
                pod.namespace,
                pod.name,
                pod.node,
                pod.ips.join(", ")
            ));
        }
    }
    dir.running_state()
}

/// Cuts (`cut`: true) or restores the underlay link between two nodes.
pub fn set_link(dir: &LabDir, a: &str, b: &str, cut: bool) -> Result<()> {
    preflight::require_root()?;
    let _lock = dir.lock()?;
    let mut state = dir.running_state()?;
    let link = super::links::cut(&state, a, b)?;
    if cut {
        state.cuts.insert(link);
    } else {
        state.cuts.remove(&link);
    }
    super::links::apply(&state)?;
    dir.write_state(&state)
}

/// Moves NAT'd site `site`'s router to its next public address, as an
/// ISP renumbering a NAT would; returns the new address.
pub fn renumber_nat(dir: &LabDir, site: &str) -> Result<std::net::Ipv4Addr> {
    preflight::require_root()?;
    let _lock = dir.lock()?;
    let mut state = dir.running_state()?;
    let lab = state.plan.name.clone();
    let (i, s) = state
        .plan
        .sites
        .iter_mut()
        .enumerate()
        .find(|(_, s)| s.name == site)
        .with_context(|| format!("no site {site:?}"))?;
    let router = s
        .router
        .as_mut()
        .with_context(|| format!("site {site} is not behind NAT"))?;
    *router = router.renumbered(&lab, i);
    let router = router.clone();
    super::sites::address(&state.plan, &router)?;
    dir.write_state(&state)?;
    Ok(router.public)
}

/// Attaches a pod on `node` through the node's CNI plugin.
pub fn add_pod(
    dir: &LabDir,
    node: &str,
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    status: pods::Status,
) -> Result<PodRecord> {
    preflight::require_root()?;
    let _lock = dir.lock()?;
    add_pod_unlocked(dir, node, namespace, name, labels, status)
}

fn add_pod_unlocked(
    dir: &LabDir,
    node: &str,
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    status: pods::Status,
) -> Result<PodRecord> {
    let mut state = dir.running_state()?;
    let plan = &state.plan.nodes[state.node_index(node)?];
    let pod = pods::add(dir, plan, namespace, name, labels, status)?;
    state.pods.push(pod.clone());
    dir.write_state(&state)?;
    Ok(pod)
}

/// Brings external peer `name` up beyond the fabric with `config` (what
/// `meshctl peer config` printed; see [`super::peers`]).
pub fn add_peer(dir: &LabDir, name: &str, config: &str) -> Result<peers::PeerRecord> {
    preflight::require_root()?;
    let _lock = dir.lock()?;
    let mut state = dir.running_state()?;
    ensure!(
        state.peers.iter().all(|p| p.name != name),
        "lab {}: peer {name} is already up",
        dir.name
    );
    let index = (0..=u8::MAX)
        .find(|i| !state.peers.iter().any(|p| p.index == *i))
        .context("no room for another peer")?;
    let record = peers::add(dir, &state.plan.fabric_netns, index, name, config)?;
    state.peers.push(record.clone());
    dir.write_state(&state)?;
    Ok(record)
}

/// Takes external peer `name` down and removes its host.
pub fn remove_peer(dir: &LabDir, name: &str) -> Result<()> {
    preflight::require_root()?;
    let _lock = dir.lock()?;
    let mut state = dir.running_state()?;
    let record = state.peer(name)?.clone();
    state.peers.retain(|p| p.name != name);
    dir.write_state(&state)?;
    peers::remove(&record)
}

/// Detaches and deletes pod `namespace/name`.
pub fn delete_pod(dir: &LabDir, namespace: &str, name: &str) -> Result<()> {
    preflight::require_root()?;
    let _lock = dir.lock()?;
    let mut state = dir.running_state()?;
    let pod = state.pods.remove(state.pod_index(namespace, name)?);
    let node = state
        .plan
        .nodes
        .iter()
        .find(|n| n.name == pod.node)
        .context("the pod's node is gone")?;
    pods::delete(dir, node, &pod)?;
    dir.write_state(&state)
}

/// Starts meshd on `nodes` and waits for every pair of the lab's nodes to
/// complete a handshake.
fn start_mesh(dir: &LabDir, nodes: &[NodePlan], progress: &mut dyn FnMut(&str)) -> Result<()> {
    let state = dir.running_state()?;
    for node in nodes {
        agents::start(dir, &state.plan, node)?;
    }
    // A failed up removes the lab, logs included: carry what meshd said.
    let took = mesh::wait_converged(&state.plan.nodes, CONVERGE_TIMEOUT).map_err(|e| {
        let said: Vec<String> = state
            .plan
            .nodes
            .iter()
            .map(|n| format!("{}:\n{}", n.name, agents::log_warnings(dir, n, 5)))
            .collect();
        e.context(format!("meshd's recent warnings:\n{}", said.join("\n")))
    })?;
    progress(&format!(
        "WireGuard mesh of {} nodes converged in {} ms",
        state.plan.nodes.len(),
        took.as_millis()
    ));
    // Pods can attach once meshd has applied a sync and installed the
    // plugin, its conflist and the node state (what a runtime waits for).
    let bound = super::scaled(CONVERGE_TIMEOUT);
    let deadline = Instant::now() + bound;
    for node in nodes {
        while !agents::cni_ready(dir, node) {
            if Instant::now() > deadline {
                bail!(
                    "{} did not become ready for pods within {bound:?}; meshd's recent warnings:\n{}",
                    node.name,
                    agents::log_warnings(dir, node, 5)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    wait_for_host_belief(&state.plan, progress);
    Ok(())
}

/// With host encryption (the lab's default), a node's own traffic to
/// another's host address is tunnelled once each has heard the other from
/// there (a handshake after its endpoint was written): until then it is
/// plaintext, and an answer through the tunnel from an address the asker
/// does not believe yet is dropped. On the flat fabric, with the default
/// host networks, waits (bounded) until every node routes every other's
/// address into the mesh, as an admin's first look would find it.
fn wait_for_host_belief(plan: &LabPlan, progress: &mut dyn FnMut(&str)) {
    let config = agents::lab_config(plan);
    if config.get("WEFT_ENCRYPT_HOST").map(String::as_str) != Some("true")
        || config.contains_key("WEFT_HOST_CIDRS")
        || !plan.sites.is_empty()
    {
        return;
    }
    let believed = |node: &NodePlan| {
        let routes = std::process::Command::new("ip")
            .args(["-n", &node.netns, "route", "show", "table", "77"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        plan.nodes
            .iter()
            .filter(|other| other.name != node.name)
            .all(|other| {
                routes
                    .lines()
                    .any(|l| l.starts_with(&format!("{} dev ", other.underlay)))
            })
    };
    let started = Instant::now();
    let bound = super::scaled(Duration::from_secs(10));
    while !plan.nodes.iter().all(believed) {
        if started.elapsed() > bound {
            progress("nodes' host addresses not all believed yet; going on");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    progress(&format!(
        "host addresses believed everywhere in {} ms",
        started.elapsed().as_millis()
    ));
}

/// Restarts the lab's API server with its objects and credentials: as a
/// restarted kube-apiserver, resourceVersions go on and every watch gets
/// 410 and relists.
pub fn restart_api_server(dir: &LabDir) -> Result<LabState> {
    let _lock = dir.lock()?;
    let mut state = dir.running_state()?;
    if process_alive(state.api_server.pid, &dir.path()) {
        control::stop(state.api_server.pid)?;
    }
    let (api_netns, api_addr) = state.plan.api_listener();
    state.api_server = control::spawn(dir, api_netns, api_addr, control::Start::Restore)?;
    dir.write_state(&state)?;
    Ok(state)
}

/// Adds the next node to a running lab; returns its plan.
pub fn add_node(dir: &LabDir, spec: &LabSpec, progress: &mut dyn FnMut(&str)) -> Result<NodePlan> {
    preflight::require_root()?;
    let _lock = dir.lock()?;
    let mut state = dir.running_state()?;
    let k = state.next_node();
    let node = topology::node_plan(&dir.name, k, spec)?;
    netns::create_node(&state.plan, &node)?;
    if !state.plan.self_allocated {
        netns::create_pod_standin(&node)?;
    }
    state.plan.nodes.push(node.clone());
    dir.write_state(&state)?;
    register_nodes(dir, std::slice::from_ref(&node), state.plan.self_allocated)?;
    progress(&format!(
        "node {} in {} at {}",
        node.name, node.netns, node.underlay
    ));
    start_mesh(dir, std::slice::from_ref(&node), progress)?;
    Ok(node)
}

/// Deletes a node: its Node object, its processes and its namespace.
pub fn delete_node(dir: &LabDir, name: &str) -> Result<()> {
    preflight::require_root()?;
    let _lock = dir.lock()?;
    let mut state = dir.running_state()?;
    let node = state.plan.nodes.remove(state.node_index(name)?);
    let (gone, kept): (Vec<PodRecord>, Vec<PodRecord>) =
        state.pods.drain(..).partition(|p| p.node == node.name);
    state.pods = kept;
    for pod in &gone {
        pods::delete(dir, &node, pod)?;
    }
    client::block_on(dir, |client| async move {
        let nodes: Api<Node> = Api::all(client);
        nodes.delete(name, &Default::default()).await?;
        Ok(())
    })?;
    terminate(&netns::pids(&node.netns).into_iter().collect());
    netns::delete(&node.netns)?;
    dir.write_state(&state)
}

/// Creates the manifests' objects as `kubectl apply -k` would, with the
/// lab's values in the ConfigMap (what the nodes' pods then read).
fn install_manifests(dir: &LabDir, plan: &LabPlan) -> Result<usize> {
    let mut manifests = manifest::load(&plan.manifests)?;
    if plan.self_allocated {
        let named = |o: &serde_json::Value| (o["kind"].clone(), o["metadata"]["name"].clone());
        for extra in manifest::objects(std::path::Path::new(manifest::BLOCK_CLAIMS_RBAC))? {
            if !manifests.objects.iter().any(|o| named(o) == named(&extra)) {
                manifests.objects.push(extra);
            }
        }
    }
    let config = agents::lab_config(plan);
    client::block_on(dir, |client| async move {
        for object in &manifests.objects {
            let mut object = object.clone();
            if object["kind"] == "ConfigMap" {
                for (k, v) in &config {
                    object["data"][k] = json!(v);
                }
            }
            let api_version = object["apiVersion"].as_str().unwrap_or_default();
            let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
            let kind = object["kind"].as_str().unwrap_or_default();
            let served = crate::apiserver::kinds::KINDS
                .iter()
                .find(|k| k.group == group && k.version == version && k.kind == kind)
                .with_context(|| {
                    format!("the lab API server does not serve {api_version} {kind}")
                })?;
            let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
            let resource = kube::api::ApiResource::from_gvk_with_plural(&gvk, served.plural);
            let obj: kube::api::DynamicObject = serde_json::from_value(object.clone())?;
            let api: Api<kube::api::DynamicObject> = match obj.metadata.namespace.as_deref() {
                Some(ns) if served.namespaced => {
                    Api::namespaced_with(client.clone(), ns, &resource)
                }
                _ => Api::all_with(client.clone(), &resource),
            };
            api.create(&PostParams::default(), &obj)
                .await
                .with_context(|| format!("creating {kind} {:?}", obj.metadata.name))?;
        }
        Ok(manifests.objects.len())
    })
}

/// Creates a Node object per lab node, as a kubelet registering itself
/// would, and gives each node its kubelet's credential.
fn register_nodes(dir: &LabDir, plan: &[NodePlan], self_allocated: bool) -> Result<()> {
    client::block_on(dir, |client| async move {
        let nodes: Api<Node> = Api::all(client);
        for n in plan {
            let cidrs: Vec<String> = n.pod_cidrs.iter().map(ToString::to_string).collect();
            let spec = match self_allocated {
                true => json!({}),
                false => json!({"podCIDR": cidrs[0], "podCIDRs": cidrs}),
            };
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": n.name, "labels": n.labels, "annotations": n.annotations},
                "spec": spec,
            }))?;
            nodes.create(&PostParams::default(), &node).await?;
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            let mut addresses: Vec<serde_json::Value> = n
                .status_addresses()
                .into_iter()
                .map(|(kind, address)| json!({"type": kind, "address": address}))
                .collect();
            addresses.push(json!({"type": "Hostname", "address": n.name}));
            let status = json!({"status": {
                "addresses": addresses,
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "LabNodeReady",
                    "message": "meshlab node namespace is up",
                    "lastHeartbeatTime": now, "lastTransitionTime": now,
                }],
            }});
            nodes
                .patch_status(&n.name, &PatchParams::default(), &Patch::Merge(status))
                .await?;
        }
        Ok(())
    })?;
    for n in plan {
        agents::issue_kubelet_credentials(dir, n)?;
    }
    Ok(())
}

/// Removes the lab `dir` names: processes, namespaces, files. Idempotent.
pub fn down(dir: &LabDir) -> Result<Removed> {
    preflight::require_root()?;
    let lock = dir.lock()?;
    let removed = teardown(dir)?;
    // The lock file goes too: nothing of the lab may remain. A command that
    // opened it meanwhile already failed its non-blocking lock.
    dir.remove_lock(lock)?;
    Ok(removed)
}

fn teardown(dir: &LabDir) -> Result<Removed> {
    let containers = remove_podman_containers(dir);
    let namespaces: Vec<String> = netns::list()
        .into_iter()
        .filter(|ns| topology::owns_netns(&dir.name, ns))
        .collect();
    // Rounds until nothing is left: a meshd being stopped may still start a
    // process (a data plane) after the first look.
    let mut stopped = BTreeSet::new();
    for _ in 0..5 {
        let mut pids: BTreeSet<i32> = processes_mentioning(dir);
        for ns in &namespaces {
            pids.extend(netns::pids(ns));
        }
        pids.remove(&(std::process::id() as i32));
        if pids.is_empty() {
            break;
        }
        terminate(&pids);
        stopped.extend(pids);
    }
    for ns in &namespaces {
        netns::delete(ns)?;
    }
    // What runtimes in the lab mounted inside it (containerd's pod network
    // namespaces, sandbox root filesystems), and anything still running in
    // those namespaces.
    let mounts = mounts_under(&dir.path());
    let inside: BTreeSet<i32> = mounts
        .iter()
        .flat_map(|m| processes_in_netns_file(m))
        .collect();
    terminate(&inside);
    stopped.extend(inside);
    for m in mounts.iter().rev() {
        let _ = nix::mount::umount2(m.as_path(), nix::mount::MntFlags::MNT_DETACH);
    }
    let path = dir.path();
    let files = path.exists();
    if files {
        fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(Removed {
        processes: stopped.len() + containers,
        namespaces: namespaces.len(),
        files,
    })
}

/// Removes the lab's podman containers (`--runtime podman`), found by their
/// label even after a crash; returns how many. Bounded: a wedged podman
/// must not hang teardown.
fn remove_podman_containers(dir: &LabDir) -> usize {
    let podman = |args: &[&str]| {
        Command::new("timeout")
            .args(["60", "podman"])
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let label = format!("label={}={}", agents::PODMAN_LABEL, dir.path().display());
    let Some(listed) = podman(&["ps", "--all", "--quiet", "--filter", &label]) else {
        return 0; // No podman: no containers either.
    };
    let ids: Vec<&str> = listed.split_whitespace().collect();
    if !ids.is_empty() {
        podman(&[&["rm", "--force", "--time", "0"], ids.as_slice()].concat());
    }
    ids.len()
}

/// Mount points at or below `dir`, shallowest first.
fn mounts_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<std::path::PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| std::path::PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| p.components().count());
    points.dedup();
    points
}

/// Processes whose network namespace is the one bound at `file` (if it is one).
fn processes_in_netns_file(file: &std::path::Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = fs::metadata(file).map(|m| (m.dev(), m.ino())) else {
        return Vec::new();
    };
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    fs::metadata(format!("/proc/{pid}/ns/net"))
                        .is_ok_and(|m| (m.dev(), m.ino()) == target)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Processes started for this lab: their command line names its directory.
fn processes_mentioning(dir: &LabDir) -> BTreeSet<i32> {
    let path = dir.path();
    fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|pid| process_alive(*pid, &path))
                .collect()
        })
        .unwrap_or_default()
}

/// SIGTERM, a bounded wait, then SIGKILL for whatever is left.
fn terminate(pids: &BTreeSet<i32>) {
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let alive = |pid: &&i32| kill(Pid::from_raw(**pid), None).is_ok() && !is_zombie(**pid);
    while Instant::now() < deadline && pids.iter().any(|p| alive(&p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids.iter().filter(alive) {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
}
