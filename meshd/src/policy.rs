//! NetworkPolicy enforcement on this node: reflectors on Pods, Namespaces
//! and NetworkPolicies, and the node's pod address store (what the CNI
//! plugin attached, watched with inotify, so a local pod is programmed the
//! moment it is attached) feed the policy [`Engine`] (debounced): a pod or
//! policy change is worked out for that object alone, a namespace change
//! recompiles the node, and only the difference from what the kernel holds
//! is applied (the whole table at start or after a failure). The drop
//! counters become per-policy metrics; a table that vanished is rebuilt.
//!
//! Fail-closed: where enforcement stands ([`Enforcement`]) is published for
//! the CNI plugin, which attaches no pod unless the node's program is
//! loaded and the last apply succeeded. A pod's addresses count only inside
//! its node's pod CIDRs, as the mesh accepted them (handed over by the
//! agent after each sync): a node's kubelet cannot lend its pods' labels to
//! another node's pod.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::ListParams;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use tokio::sync::{watch, Notify};
use weft_ipam::PolicyState;
use weft_policy::cnp::ClusterNetworkPolicy;
use weft_policy::engine::Engine;
use weft_policy::netlink::EnforceError;
use weft_policy::render;
use weft_policy::{nft, NamespaceInfo, NodeInfo, NodePodCidrs, PodInfo, Snapshot};

use crate::annotations::PolicyApplied;
use crate::cluster::Events;
use crate::cluster_policy::Status;
use crate::http::Health;

const DEBOUNCE: Duration = Duration::from_millis(20);

/// What changed since the engine last looked.
#[derive(Default)]
struct Dirty {
    /// A namespace changed, or a watch relisted: recompile.
    everything: bool,
    /// Pods (`namespace/name`) created, changed or deleted.
    pods: BTreeSet<String>,
    /// NetworkPolicies (`namespace/name`) created, changed or deleted.
    policies: BTreeSet<String>,
    /// ClusterNetworkPolicies (by name) created, changed or deleted.
    cluster_policies: BTreeSet<String>,
}

/// Marks what an event of kind `K` makes stale: that pod or policy for a
/// pod's or a policy's event, everything for any other.
fn mark<K: Resource<DynamicType = ()>>(dirty: &Mutex<Dirty>, event: &watcher::Event<K>) {
    let mut dirty = dirty.lock().unwrap_or_else(|e| e.into_inner());
    let (watcher::Event::Apply(o) | watcher::Event::Delete(o)) = event else {
        dirty.everything = true;
        return;
    };
    let meta = o.meta();
    let key = format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    );
    match K::kind(&()).as_ref() {
        "Pod" => dirty.pods.insert(key),
        "NetworkPolicy" => dirty.policies.insert(key),
        "ClusterNetworkPolicy" => dirty
            .cluster_policies
            .insert(meta.name.clone().unwrap_or_default()),
        _ => {
            dirty.everything = true;
            true
        }
    };
}

/// The object `key` (`namespace/name`) in `store`.
fn get<K>(store: &Store<K>, key: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let (namespace, name) = key.split_once('/').unwrap_or_default();
    store.get(&ObjectRef::new(name).within(namespace))
}

/// A reflector for every object of kind `K`, marking what each event makes
/// stale in `dirty`, notifying `changed` and raising `seen` to the newest
/// resourceVersion of any event (deletions included).
fn watch<K: crate::cluster::Watched>(
    client: &Client,
    changed: Arc<Notify>,
    dirty: Arc<Mutex<Dirty>>,
    seen: Arc<AtomicU64>,
) -> Store<K> {
    crate::cluster::reflect(
        Api::<K>::all(client.clone()),
        watcher::Config::default(),
        move |event| {
            mark(&dirty, event);
            if let watcher::Event::Apply(o)
            | watcher::Event::Delete(o)
            | watcher::Event::InitApply(o) = event
            {
                seen.fetch_max(crate::cluster::revision(o.meta()), Ordering::Relaxed);
            }
            changed.notify_one()
        },
    )
}

/// How often the drop counters are read into metrics (and the table's
/// presence checked).
const COUNTER_PERIOD: Duration = Duration::from_secs(5);

/// Packets each counter gained since the last reading; a counter that
/// went backwards was recreated and counts from zero.
fn drop_deltas(last: &mut HashMap<String, u64>, now: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    last.retain(|name, _| now.contains_key(name));
    now.iter()
        .filter_map(|(name, packets)| {
            let before = last.insert(name.clone(), *packets).unwrap_or(0);
            let delta = if *packets >= before {
                packets - before
            } else {
                *packets
            };
            (delta > 0).then(|| (name.clone(), delta))
        })
        .collect()
}

/// Runs `f` on the nf_tables session off the async runtime, opening the
/// session if there is none (at start, or after a panic lost it).
async fn with_session<T: Send + 'static>(
    session: &mut Option<nft::Session>,
    f: impl FnOnce(&mut nft::Session) -> Result<T, EnforceError> + Send + 'static,
) -> Result<T, EnforceError> {
    let held = session.take();
    let (held, result) = tokio::task::spawn_blocking(move || {
        let mut s = match held.map_or_else(nft::Session::open, Ok) {
            Ok(s) => s,
            Err(e) => return (None, Err(e)),
        };
        let result = f(&mut s);
        (Some(s), result)
    })
    .await
    .map_err(|e| EnforceError::Task(e.to_string()))?;
    *session = held;
    result
}

/// Addresses of the pods the CNI plugin attached on this node, by
/// `namespace/name`, kept current from the address store.
type Attached = Arc<Mutex<BTreeMap<String, Vec<IpAddr>>>>;

/// Watches the pod address store in `dir`: whenever it changes, the pods
/// whose attached addresses changed are marked stale. Returns the current
/// view.
fn watch_attachments(
    dir: PathBuf,
    changed: Arc<Notify>,
    dirty: Arc<Mutex<Dirty>>,
) -> anyhow::Result<Attached> {
    use anyhow::Context;
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).context("inotify")?;
    // The store replaces its file by rename.
    inotify
        .add_watch(
            &dir,
            AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_DELETE,
        )
        .with_context(|| format!("watching {}", dir.display()))?;
    let store = weft_ipam::PodStore::new(dir);
    let read = move || {
        store.attached_pods().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the pod address store");
            BTreeMap::new()
        })
    };
    let attached: Attached = Arc::new(Mutex::new(read()));
    let view = attached.clone();
    std::thread::spawn(move || {
        while inotify.read_events().is_ok() {
            let now = read();
            let mut was = view.lock().unwrap_or_else(|e| e.into_inner());
            let moved: BTreeSet<String> = now
                .iter()
                .filter(|(k, v)| was.get(*k) != Some(v))
                .map(|(k, _)| k.clone())
                .chain(was.keys().filter(|k| !now.contains_key(*k)).cloned())
                .collect();
            *was = now;
            drop(was);
            if !moved.is_empty() {
                dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pods
                    .extend(moved);
                changed.notify_one();
            }
        }
        tracing::error!("the pod address store watch ended; new pods wait for the API");
    });
    Ok(attached)
}

/// Where this node's NetworkPolicy enforcement stands, published for the
/// CNI plugin (beside its node state) and for `/readyz`.
pub struct Enforcement {
    node_state: PathBuf,
    health: Arc<Health>,
    /// What the file says (`None`: not written by this meshd yet, or the
    /// last write failed: written at the next call).
    published: Option<PolicyState>,
}

impl Enforcement {
    pub fn new(node_state: &Path, health: Arc<Health>) -> Self {
        Self {
            node_state: node_state.to_path_buf(),
            health,
            published: None,
        }
    }

    /// Publishes `state` where it differs from what was published.
    pub fn set(&mut self, state: PolicyState) {
        let enforced = matches!(state, PolicyState::Loaded | PolicyState::Off);
        self.health.policy.store(enforced, Ordering::Relaxed);
        if self.published.as_ref() == Some(&state) {
            return;
        }
        match crate::cni::publish_policy(&self.node_state, &state) {
            Ok(_) => {
                match &state {
                    PolicyState::Pending { reason } | PolicyState::Broken { reason } => {
                        tracing::warn!(%reason, "NetworkPolicy is not enforced: the CNI plugin attaches no pod")
                    }
                    PolicyState::Loaded | PolicyState::Off => {
                        tracing::info!(state = ?state, "the CNI plugin may attach pods (NetworkPolicy)")
                    }
                }
                self.published = Some(state);
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "publishing the NetworkPolicy state for the CNI plugin")
            }
        }
    }
}

/// The enforcement state, shared by the engine and its supervisor.
pub type SharedEnforcement = Arc<Mutex<Enforcement>>;

fn set(enforcement: &SharedEnforcement, state: PolicyState) {
    enforcement
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .set(state);
}

/// Pods whose reported addresses lie outside their node's pod CIDRs, and
/// those addresses: each change is logged and counted once, not at every
/// recompile.
#[derive(Default)]
struct Unbound(HashMap<String, Vec<IpAddr>>);

impl Unbound {
    fn note(&mut self, key: &str, outside: Vec<IpAddr>, health: &Health) {
        if outside.is_empty() {
            self.0.remove(key);
            return;
        }
        if self.0.get(key) == Some(&outside) {
            return;
        }
        tracing::warn!(pod = %key, addresses = ?outside, "ignoring pod addresses outside the pod CIDRs of the pod's node");
        health
            .metrics
            .policy_unbound_addresses
            .inc_by(outside.len() as u64);
        self.0.insert(key.to_string(), outside);
    }
}

/// What a Pod becomes for policy, with what it needs.
struct Pods<'a> {
    attached: &'a Attached,
    cidrs: &'a NodePodCidrs,
    unbound: &'a mut Unbound,
    health: &'a Health,
}

impl Pods<'_> {
    /// A Pod as policy sees it: with the addresses attached on this node,
    /// and only those inside its node's pod CIDRs.
    fn info(&mut self, pod: &Pod) -> PodInfo {
        let key = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default()
        );
        let attached = self.attached.lock().unwrap_or_else(|e| e.into_inner());
        let mut info = PodInfo::from_pod_attached(pod, attached.get(&key).map(Vec::as_slice));
        drop(attached);
        let outside = info.bind_to_node(self.cidrs);
        self.unbound.note(&key, outside, self.health);
        info
    }
}

/// What the policy engine works from.
#[derive(Clone)]
pub struct Feeds {
    pub client: Client,
    /// This node's name.
    pub node: String,
    pub options: render::Options,
    /// The CNI plugin's pod address store.
    pub ipam_dir: PathBuf,
    /// Every accepted node's pod CIDRs, from the agent after each sync.
    pub cidrs: watch::Receiver<Option<Arc<NodePodCidrs>>>,
    /// Every Node's labels and addresses as believed
    /// ([`NodeInfo::believed`]), from the agent after each sync.
    pub nodes: watch::Receiver<Arc<Vec<NodeInfo>>>,
    /// Where Warning Events about ClusterNetworkPolicies go.
    pub events: Events,
}

/// Runs the policy engine, restarting it if it ever ends; the plugin
/// attaches no pod until its first apply, nor after it failed or stopped.
pub async fn supervise(feeds: Feeds, enforcement: SharedEnforcement) {
    // A restarted meshd finds the program of the last in the kernel, which
    // keeps enforcing (and dropping pods it has not programmed) until the
    // first pass replaces it; after a reboot there is none.
    let inherited = tokio::task::spawn_blocking(|| nft::Session::open()?.table_exists())
        .await
        .map_err(|e| EnforceError::Task(e.to_string()))
        .and_then(|r| r);
    set(
        &enforcement,
        match inherited {
            Ok(true) => PolicyState::Loaded,
            Ok(false) => PolicyState::Pending {
                reason: "meshd has not loaded the NetworkPolicy program yet".into(),
            },
            Err(e) => PolicyState::Pending {
                reason: format!("looking for the NetworkPolicy table: {e}"),
            },
        },
    );
    loop {
        let engine = tokio::spawn(run(feeds.clone(), enforcement.clone()));
        let why = match engine.await {
            Ok(Err(e)) => format!("{e:#}"),
            Ok(Ok(never)) => match never {},
            Err(e) => e.to_string(),
        };
        set(
            &enforcement,
            PolicyState::Broken {
                reason: format!("the NetworkPolicy engine stopped: {why}"),
            },
        );
        tracing::error!(error = %why, "the NetworkPolicy engine stopped; restarting it in a second");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Enforces policy for the pods on `node`; returns only why it cannot.
async fn run(
    feeds: Feeds,
    enforcement: SharedEnforcement,
) -> anyhow::Result<std::convert::Infallible> {
    use anyhow::Context;
    let Feeds {
        client,
        node,
        options,
        ipam_dir,
        mut cidrs,
        mut nodes,
        events,
    } = feeds;
    let health = enforcement
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .health
        .clone();
    let changed = Arc::new(Notify::new());
    let dirty = Arc::new(Mutex::new(Dirty::default()));
    let seen = Arc::new(AtomicU64::new(0));
    let attached = watch_attachments(ipam_dir, changed.clone(), dirty.clone())
        .context("watching the pod address store")?;
    let pods = watch::<Pod>(&client, changed.clone(), dirty.clone(), seen.clone());
    let namespaces = watch::<Namespace>(&client, changed.clone(), dirty.clone(), seen.clone());
    let policies = watch::<NetworkPolicy>(&client, changed.clone(), dirty.clone(), seen.clone());
    // Without the CRD (404) there are none yet: its watch lists them once
    // it is installed, and until then NetworkPolicy is enforced alone.
    // Anything else (RBAC not applied yet) stops the engine: fail closed.
    let cluster_api = Api::<ClusterNetworkPolicy>::all(client.clone());
    let served = crate::cluster::list_served(&cluster_api, &ListParams::default().limit(1))
        .await?
        .is_some();
    if !served {
        tracing::warn!("the ClusterNetworkPolicy CRD is not installed: none enforced until it is");
    }
    let cluster_policies =
        watch::<ClusterNetworkPolicy>(&client, changed.clone(), dirty.clone(), seen.clone());
    for ready in [
        pods.wait_until_ready().await,
        namespaces.wait_until_ready().await,
        policies.wait_until_ready().await,
    ] {
        ready.context("the policy watches ended before their first list")?;
    }
    if served {
        cluster_policies
            .wait_until_ready()
            .await
            .context("the ClusterNetworkPolicy watch ended before its first list")?;
    }
    let status = Status::new(cluster_api, events, cluster_policies.clone(), &node);
    // Without the mesh's pod CIDRs no remote pod has an address: wait for
    // the agent's first sync rather than load a program without peers.
    cidrs
        .wait_for(Option::is_some)
        .await
        .context("the agent stopped handing over the nodes' pod CIDRs")?;
    let mut unbound = Unbound::default();
    let mut engine = Engine::new(&node, options);
    // The Node list the engine last had.
    let mut nodes_handed: Arc<Vec<NodeInfo>> = Arc::default();
    // Kept open between transactions (opened again if lost).
    let mut session: Option<nft::Session> = None;
    // Whether the kernel holds the engine's ruleset; not at start, after a
    // failure, or when the table vanished: the next pass replaces it whole.
    let mut in_kernel = false;
    let mut problems = BTreeMap::new();
    let mut counted = HashMap::new();
    let mut tick = tokio::time::interval(COUNTER_PERIOD);
    let mut first = true;
    // Whether the kernel may hold another policy set than last reported.
    let mut unreported = false;
    loop {
        let revision = seen.load(Ordering::Relaxed);
        let stale = std::mem::take(&mut *dirty.lock().unwrap_or_else(|e| e.into_inner()));
        // Until a pass that may have changed the policy set is applied.
        unreported |= stale.everything
            || first
            || !stale.policies.is_empty()
            || !stale.cluster_policies.is_empty();
        let mut update: Option<(nft::Transaction, nft::Changes)> = None;
        let node_cidrs = cidrs.borrow_and_update().clone().unwrap_or_default();
        // (An Arc: the map is shared with the agent, not copied per pass.)
        let mut pod_info = Pods {
            attached: &attached,
            cidrs: &node_cidrs,
            unbound: &mut unbound,
            health: &health,
        };
        let cluster_now = |name: &str| {
            cluster_policies
                .get(&ObjectRef::new(name))
                .map(|p| (*p).clone())
        };
        // Only a new list is handed over: a pod's event does not copy it.
        let nodes_now = nodes.borrow_and_update().clone();
        let nodes_changed = !Arc::ptr_eq(&nodes_now, &nodes_handed);
        nodes_handed = nodes_now.clone();
        let believed = || nodes_now.to_vec();
        // ClusterNetworkPolicies whose status to look at.
        let mut report = Vec::new();
        if stale.everything || first {
            first = false;
            let snapshot = Snapshot {
                policies: policies.state().iter().map(|p| (**p).clone()).collect(),
                cluster_policies: cluster_policies
                    .state()
                    .iter()
                    .map(|p| (**p).clone())
                    .collect(),
                namespaces: namespaces
                    .state()
                    .iter()
                    .map(|n| NamespaceInfo::from_namespace(n))
                    .collect(),
                pods: pods.state().iter().map(|p| pod_info.info(p)).collect(),
                nodes: believed(),
            };
            report.clone_from(&snapshot.cluster_policies);
            if in_kernel {
                update = engine.reset(snapshot);
            } else {
                engine.load(snapshot);
            }
        } else {
            let mut changes = Vec::new();
            for key in &stale.pods {
                let pod = get(&pods, key).map(|p| pod_info.info(&p));
                if pod.is_none() {
                    pod_info.unbound.0.remove(key);
                }
                changes.extend(engine.pod(key, pod));
            }
            for key in &stale.policies {
                let policy = get(&policies, key).map(|p| (*p).clone());
                changes.extend(engine.policy(key, policy));
            }
            for name in &stale.cluster_policies {
                changes.extend(engine.cluster_policy(name, cluster_now(name)));
            }
            if nodes_changed {
                changes.extend(engine.nodes(believed()));
            }
            report.extend(stale.cluster_policies.iter().filter_map(|n| cluster_now(n)));
            for (t, c) in changes {
                update = Some(match update {
                    Some((u, uc)) => (u.then(t), uc + c),
                    None => (t, c),
                });
            }
        }
        let program = engine.program();
        if program.problems != problems {
            for problem in program.problems.values().flatten() {
                tracing::warn!(%problem, "a NetworkPolicy part is unusable and allows nothing");
            }
            problems = program.problems.clone();
        }
        status.report(report);
        if !in_kernel {
            // Where a table is, it keeps enforcing until one transaction
            // replaces it; where none is, the faster two-step load.
            update = match with_session(&mut session, |s| s.table_exists()).await {
                Ok(false) => Some(nft::fresh(engine.ruleset())),
                _ => Some(nft::full(engine.ruleset())),
            };
        }
        match update {
            None => {
                health.metrics.policy_revision.set(revision as i64);
                report_applied(&health, &engine, &mut unreported);
            }
            Some((transaction, changes)) => {
                let started = Instant::now();
                match with_session(&mut session, move |s| s.apply(&transaction)).await {
                    Ok(()) => {
                        let m = &health.metrics;
                        m.count_change(
                            "policy-element",
                            changes.elements_added + changes.elements_removed,
                        );
                        m.count_change("policy-chain", changes.chains);
                        m.policy_elements.set(engine.ruleset().elements() as i64);
                        m.policy_revision.set(revision as i64);
                        tracing::info!(
                            pods = engine.program().pods.len(),
                            policies = engine.program().policies.len(),
                            elements_added = changes.elements_added,
                            elements_removed = changes.elements_removed,
                            chains = changes.chains,
                            sets = changes.sets,
                            full = !in_kernel,
                            ms = started.elapsed().as_secs_f64() * 1e3,
                            "applied the node's NetworkPolicy program"
                        );
                        in_kernel = true;
                        set(&enforcement, PolicyState::Loaded);
                        report_applied(&health, &engine, &mut unreported);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "applying NetworkPolicy failed; replacing the whole table on the next pass");
                        in_kernel = false;
                        set(
                            &enforcement,
                            PolicyState::Broken {
                                reason: format!("applying the NetworkPolicy program failed: {e}"),
                            },
                        );
                    }
                }
            }
        }
        loop {
            tokio::select! {
                _ = changed.notified() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    break;
                }
                // Nodes' labels or addresses (`nodes` peers).
                Ok(()) = nodes.changed() => break,
                // A node's pod CIDRs changed: every pod's addresses may.
                Ok(()) = cidrs.changed() => {
                    dirty.lock().unwrap_or_else(|e| e.into_inner()).everything = true;
                    break;
                }
                _ = tick.tick() => {
                    if !in_kernel {
                        break;
                    }
                    match tokio::task::spawn_blocking(nft::counters).await {
                        Ok(Ok(now)) => {
                            for (name, delta) in drop_deltas(&mut counted, &now) {
                                let Some(counter) = engine.ruleset().counters.get(&name) else { continue };
                                health.metrics.count_policy_drops(counter.direction, &counter.policies, delta);
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "the policy table is unreadable (removed?); replacing it");
                            in_kernel = false;
                            set(&enforcement, PolicyState::Broken {
                                reason: format!("the NetworkPolicy table is unreadable (removed?): {e}"),
                            });
                            break;
                        }
                        Err(e) => tracing::warn!(error = %e, "reading policy counters panicked"),
                    }
                }
            }
        }
    }
}

/// Tells the agent which policies the kernel now enforces (it publishes
/// them on the Node); only a different set wakes it. Computed only after a
/// pass that may have changed the set (`unreported`): a pod's change, the
/// common one, does not walk the policies.
fn report_applied(health: &Health, engine: &Engine, unreported: &mut bool) {
    if !std::mem::take(unreported) {
        return;
    }
    let applied = PolicyApplied::of(
        engine
            .policies()
            .iter()
            .map(|p| &p.metadata)
            .chain(engine.cluster_policies().map(|p| &p.metadata)),
    );
    health
        .policy_applied
        .send_if_modified(|last| last.replace(applied) != Some(applied));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_deltas_count_growth_and_restart_from_zero_when_recreated() {
        let mut last = HashMap::new();
        let now = BTreeMap::from([("a".to_string(), 5), ("b".to_string(), 0)]);
        assert_eq!(drop_deltas(&mut last, &now), vec![("a".to_string(), 5)]);
        let now = BTreeMap::from([("a".to_string(), 7), ("b".to_string(), 2)]);
        assert_eq!(
            drop_deltas(&mut last, &now),
            vec![("a".to_string(), 2), ("b".to_string(), 2)]
        );
        // a recreated (3 < 7), b gone.
        let now = BTreeMap::from([("a".to_string(), 3)]);
        assert_eq!(drop_deltas(&mut last, &now), vec![("a".to_string(), 3)]);
        assert!(!last.contains_key("b"));
    }
}
