//! `meshd run`: the node agent's event loop.
//!
//! Before anything else meshd makes the node fail closed: unreachable
//! backstops for every cluster pod and mesh range, so that no state of the
//! agent or the cluster can send pod traffic out in plaintext. Then Node and
//! block-record watch events (debounced) and a one-second look at the data
//! plane (is it alive, which peers are heard from) trigger a sync: gather
//! the inputs, [`decide`](crate::decide) (pure), apply the decision —
//! annotations, Events, the data plane and routes — and only then tell the
//! CNI plugin it may attach pods. A periodic resync is only a safety net.
//! When meshd stops, the data plane and routes stay: traffic keeps flowing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;
use weft_ipam::PolicyState;
use weft_keys::{KeyProof, KeyState, KeyStore, PublicKey, SealingKey};
use weft_policy::NodePodCidrs;

use crate::annotations::{
    self, parse_time, KeyProofs, PolicyApplied, KEY_PROOF, NEXT_KEY_PROOF, NEXT_PUBLIC_KEY,
    POLICY_APPLIED, ROTATE_REQUESTED,
};
use crate::cluster::{self, node_info};
use crate::dataplane::{DataPlane, DeviceState, Mode, UserspaceProgram};
use crate::decide::{decide, Inputs};
use crate::host_traffic::{Exclusion, Keeper};
use crate::http::{self, Health};
use crate::ladder::{trial_window, Ladder, Planned, Seen};
use crate::liveness::{Liveness, Reading, Timers};
use crate::metrics::{KindLabels, PeerLabels, ReasonLabels, StateLabels};
use crate::model::NodeInfo;
use crate::model::{
    ClusterRanges, ClusterSnapshot, DesiredNode, LinkCosts, LocalConfig, PeerKind, Relay, Verdict,
};
use crate::node_blocks::{PodCidrSource, CLAIM_LABEL};
use crate::peers::{ExternalPeer, PeerError, PeerVerdict, WeftPeer};
use crate::planner::{backstops, prune, Listening, OwnKeys, ParseMemo};
use crate::policy::Enforcement;
use crate::probe;
use crate::reconcile::netlink::Netlink;
use crate::reconcile::PeerStats;
use crate::reconcile::Reconciler;
use crate::report::Reports;
use crate::rotation::{self, DeviceKeys, Mechanism, PeerProgress, Step};

/// WireGuard's per-packet overhead on an IPv6 underlay (the larger case).
const WIREGUARD_OVERHEAD: u32 = 80;
const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// Watch events closer together than this are applied as one.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// A sync that takes longer fails (and is retried): every API, netlink and
/// UAPI call in it is bounded by this at the latest.
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// A node writes its policy status at most this often: a burst of
/// NetworkPolicy changes costs each node one Node write, not one per
/// change (for scale: kubelet renews every node's Lease every 10 s).
const POLICY_STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// How long a starting meshd waits for the first list of WeftPeers.
const PEERS_LIST_WAIT: Duration = Duration::from_secs(5);
/// The least time between two changes of the published link state.
const LINK_STATE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// This node's name (the Node object meshd publishes on).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Kubeconfig to use; default: $KUBECONFIG, then in-cluster.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace meshd's Events go to (its own: its role allows
    /// creating Events there only).
    #[arg(long, env = "WEFT_EVENT_NAMESPACE", default_value = cluster::NAMESPACE)]
    pub event_namespace: String,
    /// Where the key and data plane logs live.
    #[arg(long, default_value = "/var/lib/weft")]
    pub state_dir: PathBuf,
    /// The WireGuard interface.
    #[arg(long, env = crate::dataplane::INTERFACE_ENV, default_value = crate::dataplane::DEFAULT_INTERFACE)]
    pub interface: String,
    #[arg(long, env = "WEFT_LISTEN_PORT", default_value_t = 51820)]
    pub listen_port: u16,
    /// Publish this endpoint instead of ExternalIP:listen-port (or
    /// InternalIP:listen-port where the Node has no ExternalIP).
    #[arg(long)]
    pub endpoint: Option<SocketAddr>,
    /// Which of the Node's addresses is its endpoint: its ExternalIP (else
    /// InternalIP), or its InternalIP (else ExternalIP).
    #[arg(long, env = "WEFT_ENDPOINT_ADDRESS", value_enum, default_value_t)]
    pub endpoint_address: crate::planner::EndpointAddress,
    /// More addresses this node can be reached at (a VPN's, a port
    /// forward's), published with its InternalIPs and ExternalIPs as
    /// candidates its peers try when its endpoint does not answer.
    #[arg(
        long = "endpoint-candidate",
        env = "WEFT_ENDPOINT_CANDIDATES",
        value_delimiter = ','
    )]
    pub endpoint_candidates: Vec<SocketAddr>,
    #[command(flatten)]
    pub mesh: crate::model::MeshCidrs,
    /// Seconds between keepalives to each peer; 0 turns them (and peer liveness) off.
    #[arg(long, env = "WEFT_PERSISTENT_KEEPALIVE", default_value_t = 10)]
    pub persistent_keepalive: u16,
    /// A peer not heard from for this many seconds (no bytes, no new
    /// handshake) is unreachable: this node reports it in its link state and
    /// traffic to it goes through a relay. Heard again for as long, it is
    /// reachable again. Must exceed the keepalive interval.
    #[arg(long, env = "WEFT_PEER_TIMEOUT", default_value_t = 30)]
    pub peer_timeout: u64,
    /// A peer this node sends traffic to and hears nothing back from is
    /// probed at once (an ICMP echo through the tunnel); unanswered for
    /// this long, it is unreachable as after a silence. Idle links are
    /// judged by `--peer-timeout` alone.
    #[arg(long, env = "WEFT_PROBE_TIMEOUT", default_value = "1s")]
    pub probe_timeout: humantime::Duration,
    /// What a link costs by how far apart its ends are (node labels
    /// topology.kubernetes.io/region and /zone): relays are chosen by the
    /// least total cost. The same on every node.
    #[arg(
        long,
        env = "WEFT_LINK_COSTS",
        default_value = "zone=1,region=2,other=4"
    )]
    pub link_costs: LinkCosts,
    /// Whether two nodes without a working direct link talk through a
    /// third (`one-hop`) or not at all (`never`). The same on every node.
    #[arg(long, env = "WEFT_RELAY", value_enum, default_value = "one-hop")]
    pub relay: Relay,
    #[arg(long, env = crate::dataplane::MODE_ENV, value_enum, default_value = "auto")]
    pub dataplane: Mode,
    /// `builtin` (Weft's own device in `meshd dataplane`, started and adopted by meshd),
    /// a wireguard-go compatible program, or `none` (another process — a
    /// separate container — runs `meshd dataplane`; meshd only adopts it).
    #[arg(long, default_value = "builtin")]
    pub userspace_program: String,
    /// MTU of the WireGuard interface; default: the underlay's minus 80.
    #[arg(long, env = "WEFT_MTU")]
    pub mtu: Option<u32>,
    /// Encrypt the key file at rest with this 32-byte base64 key.
    #[arg(long)]
    pub sealing_key_file: Option<PathBuf>,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, default_value = "127.0.0.1:9475")]
    pub metrics_addr: SocketAddr,
    /// Seconds between full resyncs (a safety net; changes are event-driven).
    #[arg(long, env = "WEFT_RESYNC", default_value_t = 60)]
    pub resync: u64,
    #[command(flatten)]
    pub cni: crate::cni::CniPaths,
    #[command(flatten)]
    pub conflist: crate::cni::ConflistArgs,
    /// A pod address allocation whose Pod has left this node for this long
    /// (and whose veth is gone) is released: runtimes on libcni < 1.2 never
    /// send CNI GC for attachments whose DEL never came.
    #[arg(long, env = "WEFT_POD_GC_GRACE", default_value = "5m")]
    pub pod_gc_grace: humantime::Duration,
    #[command(flatten)]
    pub blocks: crate::node_blocks::BlockArgs,
    /// Enforce Kubernetes NetworkPolicy for this node's pods (needs `nft`).
    #[arg(long, env = "WEFT_NETWORK_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    pub network_policy: bool,
    /// Masquerade pods' traffic to anything outside the cluster's pod and
    /// mesh ranges and `--non-masquerade-cidr` to the node's address
    /// (needs `nft`).
    #[arg(long, env = "WEFT_MASQUERADE", default_value_t = true, action = clap::ArgAction::Set)]
    pub masquerade: bool,
    /// Destinations that see pods' own addresses (not masqueraded), beside
    /// the cluster's ranges: e.g. a VPC that routes the pod ranges.
    #[arg(
        long = "non-masquerade-cidr",
        env = "WEFT_NON_MASQUERADE_CIDRS",
        value_delimiter = ','
    )]
    pub non_masquerade_cidrs: Vec<IpNet>,
    /// Where nodes' host addresses (their InternalIPs) may lie for pods to
    /// reach them through the mesh; default: the subnets of this node's own
    /// InternalIPs. Another node's address outside these is not believed
    /// (a node's kubelet writes it) and pods reach it masqueraded, in
    /// plaintext like any host traffic.
    #[arg(long = "host-cidr", env = "WEFT_HOST_CIDRS", value_delimiter = ',')]
    pub host_cidrs: Vec<IpNet>,
    /// Log packets NetworkPolicy drops to the kernel log (prefix "weft
    /// drop"), at most this many per second per group of isolating
    /// policies; 0: count them only.
    #[arg(long, default_value_t = 0)]
    pub log_policy_drops: u32,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub pq: crate::pq::PqArgs,
    #[command(flatten)]
    pub host: HostArgs,
}

/// Node-to-node host traffic through WireGuard.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArgs {
    /// Send this node's own traffic to other nodes' host addresses
    /// (kubelet, hostNetwork pods, node agents) through WireGuard too, as
    /// pods' traffic to them already is. The same on every node.
    #[arg(long, env = "WEFT_ENCRYPT_HOST", default_value_t = false, action = clap::ArgAction::Set)]
    pub encrypt_host: bool,
    /// Addresses (CIDRs) whose host traffic, to and from them, is never
    /// tunnelled, so that a node cut off from the mesh still reaches them;
    /// default: the API servers (the address in meshd's kubeconfig and
    /// those the `kubernetes` EndpointSlice lists, followed). Replaces the
    /// default.
    #[arg(
        long = "encrypt-host-exclude",
        env = "WEFT_ENCRYPT_HOST_EXCLUDE",
        value_delimiter = ','
    )]
    pub encrypt_host_exclude: Option<Vec<IpNet>>,
}

/// Key rotation and revocation (docs/operations.md, "Keys").
#[derive(Debug, Clone, clap::Args)]
pub struct KeyArgs {
    /// Rotate the key once it is this old (e.g. `30d`); default: only when
    /// an admin asks (`meshctl keys rotate`).
    #[arg(long, env = "WEFT_KEY_MAX_AGE")]
    pub key_max_age: Option<humantime::Duration>,
    /// How long the old key is still answered, at most, while peers move to
    /// the next one (a peer that is up moves within seconds; one that is
    /// down does not hold the rotation up).
    #[arg(long, env = "WEFT_KEY_OVERLAP_MAX", default_value = "5m")]
    pub key_overlap_max: humantime::Duration,
    /// On a device that answers only one key (kernel WireGuard,
    /// wireguard-go): how far ahead the switch is announced. It must exceed
    /// how long a Node change takes to reach every node.
    #[arg(long, env = "WEFT_KEY_SWITCH_LEAD", default_value = "5s")]
    pub key_switch_lead: humantime::Duration,
    /// `auto`: overlap the keys where the device can (Weft's own);
    /// `never`: always switch as a one-key device must (for comparison).
    #[arg(long, env = "WEFT_KEY_OVERLAP", value_enum, default_value = "auto")]
    pub key_overlap: KeyOverlap,
    /// NAMESPACE/NAME of the ConfigMap listing revoked keys.
    #[arg(long, env = "WEFT_REVOKED_KEYS", default_value = crate::revoked::DEFAULT_RECORD)]
    pub revoked_keys: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyOverlap {
    Auto,
    Never,
}

impl KeyArgs {
    /// The mechanism for a device that can (or cannot) overlap two keys.
    fn mechanism(&self, device_overlaps: bool) -> Mechanism {
        if device_overlaps && self.key_overlap == KeyOverlap::Auto {
            Mechanism::Overlap {
                max_overlap: self.key_overlap_max.as_secs(),
            }
        } else {
            Mechanism::Switch {
                lead: self.key_switch_lead.as_secs(),
            }
        }
    }

    fn revoked_record(&self) -> Result<(&str, &str)> {
        cluster::object_ref("--revoked-keys", &self.revoked_keys)
    }
}

/// A peer is judged by what it sends: keepalives must come more often than
/// the silence that makes it unreachable.
fn check_timers(args: &RunArgs) -> Result<()> {
    args.pq.check().map_err(anyhow::Error::msg)?;
    let keepalive = u64::from(args.persistent_keepalive);
    if keepalive > 0 && args.peer_timeout <= keepalive {
        anyhow::bail!(
            "--peer-timeout {} must exceed --persistent-keepalive {keepalive} (a silence of one keepalive interval is normal)",
            args.peer_timeout
        );
    }
    let probe = *args.probe_timeout;
    if probe.is_zero() || probe >= Duration::from_secs(args.peer_timeout) {
        anyhow::bail!(
            "--probe-timeout {} must be above zero and below --peer-timeout {}s (a busy link is judged sooner than an idle one)",
            args.probe_timeout,
            args.peer_timeout
        );
    }
    // Peers refuse a switch scheduled further ahead (see
    // annotations::MAX_KEY_SWITCH_AHEAD).
    if *args.keys.key_switch_lead > crate::annotations::MAX_KEY_SWITCH_LEAD {
        anyhow::bail!(
            "--key-switch-lead {} must be at most {} (peers refuse a key switch announced further ahead)",
            args.keys.key_switch_lead,
            humantime::format_duration(crate::annotations::MAX_KEY_SWITCH_LEAD)
        );
    }
    Ok(())
}

/// `--endpoint-candidate`s every peer would send to, and few enough to be
/// published with the node's own addresses.
fn check_candidates(args: &RunArgs, ranges: &ClusterRanges) -> Result<()> {
    for candidate in &args.endpoint_candidates {
        if let Some(why) = crate::annotations::endpoint_problem(*candidate, ranges) {
            anyhow::bail!("--endpoint-candidate {candidate} is not usable: {why}");
        }
    }
    let most = crate::annotations::MAX_CANDIDATES;
    if args.endpoint_candidates.len() > most {
        anyhow::bail!(
            "--endpoint-candidate is given {} times: at most {most} addresses are published, the node's own first",
            args.endpoint_candidates.len()
        );
    }
    Ok(())
}

/// Proofs that this node holds the keys it announces: the ones it
/// publishes while they hold (`annotations::published_proof`), else new
/// ones, signed with the private keys only the shell holds.
fn own_proofs(me: &NodeInfo, keys: &OwnKeys, state: &KeyState) -> Result<KeyProofs> {
    let prove = |key: &PublicKey, annotation: &str| -> Result<KeyProof> {
        if let Some(kept) = annotations::published_proof(me, annotation, key) {
            return Ok(kept);
        }
        let private = std::iter::once(&state.current)
            .chain(state.next.as_ref().map(|n| &n.key))
            .find(|k| k.public_key() == *key)
            .with_context(|| format!("no private key for the announced key {key}"))?;
        Ok(private.prove(annotations::subject(me)))
    };
    Ok(KeyProofs {
        key: prove(&keys.public_key, KEY_PROOF)?,
        next: keys
            .next
            .as_ref()
            .map(|n| prove(&n.key, NEXT_KEY_PROOF))
            .transpose()?,
    })
}

/// The cluster's ranges from `--cluster-cidr` and `--mesh-cidr`.
pub fn cluster_ranges(args: &RunArgs) -> Result<ClusterRanges> {
    ClusterRanges::from_flags(&args.blocks.cluster, &args.mesh)
}

/// The API client's configuration (read from files; nothing is contacted).
async fn kube_config(kubeconfig: Option<&PathBuf>) -> Result<kube::Config> {
    Ok(match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig: set --kubeconfig or KUBECONFIG, or run in a cluster")?,
    })
}

/// What host traffic is never tunnelled (`--encrypt-host-exclude`, else
/// the API servers'), given the API server's URL in the kubeconfig.
fn exclusion(args: &HostArgs, api_server: &hyper::Uri) -> Exclusion {
    match &args.encrypt_host_exclude {
        Some(listed) => Exclusion::Listed(listed.clone()),
        None => Exclusion::ApiServers {
            configured: crate::host_traffic::api_server_address(api_server),
        },
    }
}

struct Agent {
    args: RunArgs,
    /// Which traffic takes table 77 (`host_traffic`).
    host_rules: Keeper,
    client: Client,
    key_store: KeyStore,
    keys: KeyState,
    /// The device keys the last successful pass applied.
    applied_keys: Option<DeviceKeys>,
    /// The source guard and the egress masquerade, until in place.
    guard: crate::nft::Pending,
    egress: crate::nft::Pending,
    /// Openings in a host firewall's FORWARD drop policy.
    host_firewall: crate::host_firewall::Openings,
    /// The block plans of `--cluster-cidr` (what claims may hold).
    block_plans: Vec<weft_ipam::BlockPlan>,
    /// Objects last found to be no block claim (logged on change).
    claim_errors: Vec<String>,
    /// The node as the last successful pass reconciled it, and its MTU:
    /// what the removal path prunes when a pass fails.
    applied: Option<(DesiredNode, u32)>,
    /// When a rotation step is due by time alone (Unix seconds).
    wake_at: Option<u64>,
    /// What the data plane last reported, per peer.
    stats: Vec<PeerStats>,
    /// Received bytes per peer when its endpoint was last written.
    rx_baselines: crate::planner::Baselines<PublicKey>,
    /// Problems in the revoked-keys record last seen (logged on change).
    revoked_errors: Vec<String>,
    local: LocalConfig,
    reconciler: Reconciler,
    health: Arc<Health>,
    events: cluster::Events,
    /// By peer node name.
    liveness: Liveness<String>,
    /// Which of each peer's addresses it is sent to.
    ladder: Ladder,
    prober: probe::Prober,
    /// Some peer was sent traffic at the last look at the data plane.
    busy: bool,
    /// The link state (down peers, addresses given up) changes at most once
    /// per [`LINK_STATE_INTERVAL`].
    link_state: Throttle,
    /// When `local.observed_before` is let go of.
    observed_before_until: Instant,
    parse_memo: ParseMemo,
    reports: Reports,
    mtu: Option<u32>,
    peer_names: BTreeMap<PublicKey, String>,
    /// The WeftPeers' verdicts last logged.
    external: BTreeMap<String, PeerVerdict>,
    /// What this node enforces for the external peers it is the gateway of.
    peer_filter: PeerFilter,
    /// Writes WeftPeers' status.
    peer_status: crate::peer_status::Status,
    /// Whether `peer_names` holds a plan of this meshd's.
    planned: bool,
    needs_sync: bool,
    /// Every accepted node's pod CIDRs, for the policy engine (which binds
    /// pods' reported addresses to their node's).
    pod_cidrs: tokio::sync::watch::Sender<Option<Arc<NodePodCidrs>>>,
    /// Every Node's labels and addresses as believed, for
    /// ClusterNetworkPolicy's `nodes` peers.
    policy_nodes: tokio::sync::watch::Sender<Arc<Vec<weft_policy::NodeInfo>>>,
    policy: PolicyStatus,
    /// Other CNI configurations last found sorting before Weft's (warned
    /// about on change).
    conf_ahead: Vec<String>,
    pq: crate::pq::Handle,
}

/// Lets a change through at most once per interval.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
}

impl Throttle {
    /// Whether a change may go out at `now` (if so, it counts as the last).
    fn admit(&mut self, interval: Duration, now: Instant) -> bool {
        if self.last.is_some_and(|t| now.duration_since(t) < interval) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// The NetworkPolicies this node publishes it enforces: the engine's
/// reports, taken at most once per [`POLICY_STATUS_INTERVAL`].
struct PolicyStatus {
    reports: tokio::sync::watch::Receiver<Option<PolicyApplied>>,
    published: Option<PolicyApplied>,
    /// When a report was last taken.
    taken: Option<Instant>,
    /// When the report waiting is to be taken.
    due: Option<Instant>,
}

impl PolicyStatus {
    /// A report arrived: due at once, or once the interval since the last
    /// one taken has passed.
    fn reported(&mut self, now: Instant) {
        let earliest = self
            .taken
            .map_or(now, |t| (t + POLICY_STATUS_INTERVAL).max(now));
        self.due.get_or_insert(earliest);
    }

    /// Takes the latest report; true if it changes what is published.
    fn take(&mut self, now: Instant) -> bool {
        self.due = None;
        self.taken = Some(now);
        let latest = *self.reports.borrow_and_update();
        std::mem::replace(&mut self.published, latest) != latest
    }
}

pub async fn run(args: RunArgs) -> Result<()> {
    cluster::check_namespace(std::env::var("POD_NAMESPACE").ok().as_deref())?;
    let ranges = cluster_ranges(&args)?;
    check_timers(&args)?;
    check_candidates(&args, &ranges)?;
    // Fail closed first, before any key, API or data plane: from here on no
    // cluster address can leave this node except through WireGuard.
    let netlink = Netlink::new()?;
    let added = netlink.ensure_unreachable(&backstops(&ranges)).await?;
    tracing::info!(added, ranges = ?ranges.all().collect::<Vec<_>>(), "unreachable backstops in place");
    // Pods' traffic to other nodes' host addresses takes the table of mesh
    // routes to them (empty until the first sync: until then it leaves as
    // host traffic does, masqueraded); with --encrypt-host the host's own
    // does too.
    let config = kube_config(args.kubeconfig.as_ref()).await?;
    let exclusion = args
        .host
        .encrypt_host
        .then(|| exclusion(&args.host, &config.cluster_url));
    let kept = args.state_dir.join(crate::host_traffic::API_SERVERS_FILE);
    let (found_api_servers, api_servers) =
        tokio::sync::watch::channel(crate::host_traffic::read_kept(&kept));
    let mut host_rules = Keeper::new(
        netlink.clone(),
        ranges.pods.iter().collect(),
        exclusion.clone(),
        api_servers,
    );
    let rules_changed = host_rules.ensure(&BTreeSet::new()).await?;
    tracing::info!(
        host = ?host_rules.traffic(&BTreeSet::new()),
        changed = rules_changed,
        "host traffic rules in place"
    );
    // Cluster addresses come in only through WireGuard or from their own
    // pods; and pods reach the world from their first packet (masquerading
    // touches nothing that stays in the cluster). Neither is fatal without
    // nft: the backstops hold, and each pass tries again.
    let mut guard = crate::nft::Pending::new(
        crate::guard::ruleset(&ranges, &args.interface),
        "installing the source guard",
        "packets forged with cluster sources are not dropped on arrival",
    );
    guard.apply();
    let mut egress = crate::egress::pending(
        args.masquerade,
        &ranges,
        &args.non_masquerade_cidrs,
        &args.interface,
    );
    egress.apply();
    let host_firewall = crate::host_firewall::Openings::new(&args.interface);
    let _lock = weft_dataplane::lock::exclusive(
        &args.state_dir.join("meshd.lock"),
        "meshd on this node",
        weft_dataplane::lock::WAIT,
    )?;
    // Until this meshd's first sync the runtime sees Weft's network only if
    // a meshd made it since boot (and it still carries traffic).
    crate::cni::tend_conf_dir(
        &args.conflist,
        &args.cni,
        crate::cni::readiness_at_start(&args.cni),
    )?;
    let sealing = args
        .sealing_key_file
        .as_deref()
        .map(SealingKey::from_file)
        .transpose()?;
    let key_store = KeyStore::new(args.state_dir.join(weft_keys::KEY_FILE), sealing);
    let keys = key_store.load_or_create()?;
    tracing::info!(
        node = %args.node_name,
        public_key = %keys.current.public_key(),
        rotating_to = ?keys.next.as_ref().map(|n| n.key.public_key()),
        "starting"
    );
    let client = cluster::keepalive_client(config)?;
    crate::cni::enable_forwarding(&ranges).await?;
    let gc = crate::pod_gc::run(
        client.clone(),
        args.node_name.clone(),
        weft_ipam::PodStore::new(&args.cni.cni_ipam_dir),
        *args.pod_gc_grace,
    );
    tokio::spawn(async move {
        if let Err(e) = gc.await {
            tracing::error!(error = %format!("{e:#}"), "pod address collection stopped");
        }
    });
    let health = Arc::new(Health::new(args.network_policy));
    http::serve(args.metrics_addr, health.clone()).await?;
    // Before the first sync can publish the node state: the plugin then
    // knows whether to wait for a policy program.
    let mut enforcement = Enforcement::new(&args.cni.cni_state_file, health.clone());
    let events = cluster::Events::new(client.clone(), &args.event_namespace, &args.node_name);
    let (pod_cidrs, cidrs_for_policy) = tokio::sync::watch::channel(None);
    let (policy_nodes, nodes_for_policy) = tokio::sync::watch::channel(Arc::default());
    if args.network_policy {
        let feeds = crate::policy::Feeds {
            client: client.clone(),
            node: args.node_name.clone(),
            options: weft_policy::render::Options {
                log_per_second: (args.log_policy_drops > 0).then_some(args.log_policy_drops),
            },
            ipam_dir: args.cni.cni_ipam_dir.clone(),
            cidrs: cidrs_for_policy,
            nodes: nodes_for_policy,
            events: events.clone(),
        };
        tokio::spawn(crate::policy::supervise(
            feeds,
            Arc::new(std::sync::Mutex::new(enforcement)),
        ));
    } else {
        enforcement.set(PolicyState::Off);
    }

    let program = match args.userspace_program.as_str() {
        "builtin" => UserspaceProgram::Builtin,
        "none" => UserspaceProgram::Supervised,
        path => UserspaceProgram::External(path.into()),
    };
    let dataplane = DataPlane::open(
        &args.interface,
        args.dataplane,
        program,
        args.state_dir.clone(),
    )
    .await?;
    let reconciler = Reconciler::new(dataplane, netlink);

    let changed = Arc::new(Notify::new());
    if let Some(exclusion @ Exclusion::ApiServers { .. }) = &exclusion {
        tracing::debug!(?exclusion, "following the API servers");
        tokio::spawn(crate::host_traffic::follow(
            client.clone(),
            kept,
            Duration::from_secs(args.resync.max(1)),
            found_api_servers,
            changed.clone(),
        ));
    }
    let nodes = cluster::reflect(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        notifier(&changed),
    );
    // Nodes' block claims: read only where nodes may claim blocks.
    let block_plans = args.blocks.plans()?;
    let record = match args.blocks.pod_cidr_source {
        PodCidrSource::NodeOrBlocks => Some(cluster::reflect(
            Api::<ConfigMap>::namespaced(client.clone(), &args.blocks.block_namespace),
            watcher::Config::default().labels(&format!("{CLAIM_LABEL}=true")),
            notifier(&changed),
        )),
        PodCidrSource::Node => None,
    };
    let (namespace, name) = args.keys.revoked_record()?;
    let revoked = cluster::reflect(
        Api::<ConfigMap>::namespaced(client.clone(), namespace),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
        notifier(&changed),
    );
    let peers = cluster::reflect(
        Api::<WeftPeer>::all(client.clone()),
        watcher::Config::default(),
        notifier(&changed),
    );
    let peer_status = crate::peer_status::Status::new(
        Api::all(client.clone()),
        events.clone(),
        peers.clone(),
        &args.node_name,
    );
    if let Some(record) = &record {
        record
            .wait_until_ready()
            .await
            .context("waiting for the first list of the block claims")?;
    }
    // A gateway's first pass must not drop its external peers' entries for
    // want of a list; a cluster without the CRD (an older install) has no
    // peers and must not stop meshd.
    if tokio::time::timeout(PEERS_LIST_WAIT, peers.wait_until_ready())
        .await
        .is_err()
    {
        tracing::warn!(
            "no list of WeftPeers yet (is deploy/base/crd-weftpeers.yaml installed?); going on without external peers"
        );
    }
    for (what, store) in [
        ("Nodes", nodes.wait_until_ready().await),
        ("the revoked keys", revoked.wait_until_ready().await),
    ] {
        store.with_context(|| format!("waiting for the first list of {what}"))?;
    }

    // A restarted meshd keeps the link state it had published until it
    // hears those peers again, rather than bringing their links back.
    let me = nodes
        .state()
        .iter()
        .find(|n| n.name_any() == args.node_name)
        .map(|n| node_info(n));
    let published = me
        .as_ref()
        .and_then(|n| crate::annotations::unreachable(n).ok())
        .unwrap_or_default();
    // And where it heard NAT'd peers: its votes on their NATs stand while
    // its data plane is heard from again.
    let observed_before = me
        .as_ref()
        .and_then(|n| crate::annotations::observed(n, &ranges).ok())
        .unwrap_or_default();
    let grace_until = Instant::now() + Duration::from_secs(args.peer_timeout);
    // Likewise the policy set it published: the kernel keeps enforcing it
    // until the engine's first pass replaces it.
    let policy_published = me
        .as_ref()
        .filter(|_| args.network_policy)
        .and_then(|n| n.annotations.get(POLICY_APPLIED)?.parse().ok());
    let policy_reports = health.policy_applied.subscribe();
    let prober = probe::Prober::new();
    if !prober.echoes() {
        tracing::warn!("no CAP_NET_RAW: peers are not probed with echoes, busy links are judged by --peer-timeout alone");
    }
    let pq = crate::pq::Handle::start(&args.pq, changed.clone(), health.clone()).await?;
    let mut agent = Agent {
        host_rules,
        pq,
        local: LocalConfig {
            persistent_keepalive: (args.persistent_keepalive > 0)
                .then_some(args.persistent_keepalive),
            costs: args.link_costs,
            relay: args.relay,
            unreachable: published.clone(),
            host_networks: args.host_cidrs.clone(),
            observed_before,
            ..LocalConfig::new(&args.node_name, ranges)
        },
        events: events.clone(),
        args,
        client,
        key_store,
        keys,
        applied_keys: None,
        applied: None,
        block_plans,
        claim_errors: Vec::new(),
        guard,
        egress,
        host_firewall,
        wake_at: None,
        stats: Vec::new(),
        rx_baselines: Default::default(),
        revoked_errors: Vec::new(),
        reconciler,
        health,
        liveness: Liveness::new(published),
        ladder: Ladder::default(),
        prober,
        busy: false,
        link_state: Throttle::default(),
        observed_before_until: grace_until,
        parse_memo: ParseMemo::default(),
        reports: Reports::default(),
        mtu: None,
        peer_names: BTreeMap::new(),
        external: BTreeMap::new(),
        peer_filter: PeerFilter::default(),
        peer_status,
        planned: false,
        needs_sync: true,
        pod_cidrs,
        policy_nodes,
        conf_ahead: Vec::new(),
        policy: PolicyStatus {
            reports: policy_reports,
            published: policy_published,
            taken: None,
            due: None,
        },
    };
    let mut observe_at = tokio::time::Instant::now();
    let mut resync = tokio::time::interval(Duration::from_secs(agent.args.resync.max(1)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let sources = Sources {
        nodes,
        record,
        revoked,
        peers,
    };
    loop {
        let wake = until(agent.wake_at);
        let policy_due = agent.policy.due;
        tokio::select! {
            // Stop signals first: a meshd being stopped must not start
            // anything new (a data plane it recreated would outlive it).
            biased;
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = changed.notified() => tokio::time::sleep(DEBOUNCE).await,
            _ = tokio::time::sleep(wake) => {}
            Ok(()) = agent.policy.reports.changed() => {
                agent.policy.reported(Instant::now());
                continue;
            }
            _ = sleep_until(policy_due) => {
                if !agent.policy.take(Instant::now()) {
                    continue;
                }
            }
            _ = tokio::time::sleep_until(observe_at) => {
                let changed = agent.observe().await;
                observe_at = tokio::time::Instant::now() + agent.observe_period();
                if !changed && !agent.needs_sync {
                    continue;
                }
            }
            _ = resync.tick() => {}
        }
        agent.sync(&sources).await;
    }
    tracing::info!("stopping; the data plane and routes stay in place");
    Ok(())
}

/// The external peers' filter ([`crate::peers::filter`]) as applied.
#[derive(Default)]
struct PeerFilter {
    applied: Option<serde_json::Value>,
    /// The peers this node served as of the last reconcile that went
    /// through: its device may hold their entries, so their rules stay
    /// until a reconcile without them has gone through.
    held: Vec<ExternalPeer>,
    failures: crate::nft::Failures,
}

impl PeerFilter {
    /// Before a reconcile: rules for `serving` and for whoever the device
    /// may still hold; whether they are in place.
    fn hold(&mut self, serving: &[&ExternalPeer], ranges: Option<&crate::model::Ranges>) -> bool {
        let held = std::mem::take(&mut self.held);
        let mut all = serving.to_vec();
        all.extend(held.iter().filter(|h| !serving.contains(h)));
        let ok = self.ensure(&all, ranges);
        self.held = held;
        ok
    }

    /// After a reconcile went through: rules for `serving` only.
    fn settle(&mut self, serving: &[&ExternalPeer], ranges: Option<&crate::model::Ranges>) {
        self.held = serving.iter().map(|p| (*p).clone()).collect();
        self.ensure(serving, ranges);
    }

    /// Brings the table to `peers`' rules, re-applied also when something
    /// (an `nft flush ruleset`) removed it; whether it is in place.
    fn ensure(&mut self, peers: &[&ExternalPeer], ranges: Option<&crate::model::Ranges>) -> bool {
        let wanted = crate::peers::filter(peers, ranges);
        if self.applied.as_ref() == Some(&wanted)
            && crate::nft::table_exists(crate::peers::FILTER_TABLE)
        {
            return true;
        }
        match crate::nft::apply(&wanted, "holding external peers to their reach") {
            Ok(()) => {
                self.failures.cleared();
                self.applied = Some(wanted);
                true
            }
            Err(e) => {
                self.applied = None;
                self.failures
                    .failed(&e, "external peers are not served until it is in place");
                false
            }
        }
    }
}

/// What meshd watches.
struct Sources {
    nodes: Store<Node>,
    /// With `--pod-cidr-source node-or-blocks` only.
    record: Option<Store<ConfigMap>>,
    revoked: Store<ConfigMap>,
    peers: Store<WeftPeer>,
}

impl Sources {
    /// The live Nodes' names and the live WeftPeers' entry names: what
    /// [`prune`] keeps.
    fn live(&self) -> Vec<String> {
        let nodes = self
            .nodes
            .state()
            .iter()
            .map(|n| n.name_any())
            .collect::<Vec<_>>();
        let peers = self
            .peers
            .state()
            .iter()
            .map(|p| ExternalPeer::entry_name(&p.name_any()))
            .collect::<Vec<_>>();
        nodes.into_iter().chain(peers).collect()
    }

    /// Every WeftPeer as read against `ranges`, by name.
    fn external_peers(
        &self,
        ranges: &ClusterRanges,
    ) -> BTreeMap<String, Result<ExternalPeer, PeerError>> {
        self.peers
            .state()
            .iter()
            .map(|p| (p.name_any(), crate::peers::parse(p, ranges)))
            .collect()
    }
}

/// How long until `at` (Unix seconds); a long time for `None`.
fn until(at: Option<u64>) -> Duration {
    let Some(at) = at else {
        return Duration::from_secs(3600);
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(at).saturating_sub(now)
}

/// Sleeps until `at`; forever for `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// What liveness and the ladder read of a peer.
fn reading(s: &PeerStats) -> Reading {
    Reading {
        rx: s.rx_bytes,
        tx: s.tx_bytes,
        handshake: s.handshake_secs(),
    }
}

/// A watch event handler that wakes the sync loop.
fn notifier<T>(changed: &Arc<Notify>) -> impl FnMut(&T) + Send + 'static {
    let changed = changed.clone();
    move |_| changed.notify_one()
}

/// The pod CIDRs of every node the mesh accepted, and this node's own
/// blocks (`own`): where each node's pods' addresses may lie.
fn node_pod_cidrs(verdicts: &BTreeMap<String, Verdict>, me: &str, own: &[IpNet]) -> NodePodCidrs {
    verdicts
        .iter()
        .filter(|(name, _)| *name != me)
        .filter_map(|(name, verdict)| match verdict {
            Verdict::Accepted(claim) => Some((name.clone(), claim.pod_cidrs.clone())),
            Verdict::Pending | Verdict::Rejected(_) => None,
        })
        .chain([(me.to_string(), own.to_vec())])
        .collect()
}

impl Agent {
    /// Looks at the data plane; true if the plan or the device needs a sync.
    async fn observe(&mut self) -> bool {
        let iface = &self.reconciler.dataplane.iface;
        match self.reconciler.dataplane.state().await {
            DeviceState::Configured => {}
            DeviceState::Gone => {
                tracing::warn!(interface = %iface, "the data plane is gone; recreating it");
                return true;
            }
            DeviceState::Replaced => {
                tracing::warn!(interface = %iface, "a new data plane holds the interface; configuring it");
                return true;
            }
        }
        let stats = match self.reconciler.peer_stats().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading peer statistics");
                return true;
            }
        };
        // While rotating, a peer that moved is news (its annotation and,
        // once all have, the end of the overlap).
        let rotation_moved = match self.keys.next {
            Some(_) => {
                let before = self.progress();
                self.stats = stats.clone();
                self.progress() != before
            }
            None => {
                self.stats = stats.clone();
                false
            }
        };
        let m = &self.health.metrics;
        for family in [&m.rx_bytes, &m.tx_bytes] {
            family.clear();
        }
        m.handshake_age.clear();
        let now = SystemTime::now();
        for s in &stats {
            let labels = PeerLabels {
                node: self.peer_names.get(&s.key).cloned().unwrap_or_default(),
                public_key: s.key.to_string(),
            };
            m.rx_bytes.get_or_create(&labels).set(s.rx_bytes as i64);
            m.tx_bytes.get_or_create(&labels).set(s.tx_bytes as i64);
            if let Some(age) = s.last_handshake.and_then(|t| now.duration_since(t).ok()) {
                m.handshake_age
                    .get_or_create(&labels)
                    .set(age.as_secs_f64());
            }
        }
        let down = match self.local.persistent_keepalive {
            Some(keepalive) => {
                // Peers not yet planned (no name) are judged from the next sync.
                let readings: Vec<_> = stats
                    .iter()
                    .filter_map(|s| Some((self.peer_names.get(&s.key)?.clone(), reading(s))))
                    .collect();
                let timers = Timers {
                    silence: Duration::from_secs(self.args.peer_timeout),
                    unanswered: *self.args.probe_timeout,
                };
                let now = Instant::now();
                let echoed = self.echoed();
                let judged = self.liveness.observe(&readings, &echoed, now, timers);
                let mut sent = self.probe(&judged.probe, "liveness");
                sent.extend(self.probe(&judged.ask, "echo-check"));
                self.liveness.sent(&sent, now);
                self.busy = judged.busy;
                let window = trial_window(Duration::from_secs(keepalive.into()));
                self.judge_addresses(&judged.down, now, window);
                judged.down
            }
            None => BTreeSet::new(),
        };
        let m = &self.health.metrics;
        m.peers
            .get_or_create(&StateLabels {
                state: "down".into(),
            })
            .set(down.len() as i64);
        m.peers
            .get_or_create(&StateLabels { state: "up".into() })
            .set((stats.len() - down.len()) as i64);
        let heard_changed = self.note_heard(&stats, None);
        // Published as this node's link state: at most one change a second
        // (this runs up to four times a second; a change waits for the
        // next look after that), and per peer at most one per timeout.
        let given_up = self.ladder.given_up();
        let confirmed = self.ladder.confirmed();
        let addresses_moved = given_up != self.local.given_up || confirmed != self.local.confirmed;
        if (down != self.local.unreachable || addresses_moved)
            && self.link_state.admit(LINK_STATE_INTERVAL, Instant::now())
        {
            if down != self.local.unreachable {
                tracing::info!(unreachable = ?down, "link state changed");
            }
            if given_up != self.local.given_up {
                tracing::info!(?given_up, "peers' addresses given up");
            }
            self.local.unreachable = down;
            self.local.given_up = given_up;
            self.local.confirmed = confirmed;
            return true;
        }
        let grace_over =
            !self.local.observed_before.is_empty() && Instant::now() >= self.observed_before_until;
        if grace_over {
            self.local.observed_before.clear();
        }
        // A handshake under a newly agreed key opens a peer (`require`).
        let pq_moved = self.applied.as_ref().is_some_and(|(desired, _)| {
            self.pq
                .moved(&desired.peers, &stats, &self.local.unreachable)
        });
        rotation_moved || heard_changed || grace_over || pq_moved
    }

    /// Puts each planned peer's address on trial (see crate::ladder).
    fn judge_addresses(&mut self, down: &BTreeSet<String>, now: Instant, window: Duration) {
        let Some((desired, _)) = &self.applied else {
            return;
        };
        let planned: BTreeMap<&str, Planned> = desired
            .peers
            .values()
            .filter(|p| p.kind == PeerKind::Node)
            .map(|p| {
                let planned = Planned {
                    offers: &p.offers,
                    endpoint: p.endpoint,
                };
                (p.node.as_str(), planned)
            })
            .collect();
        let seen: BTreeMap<&str, Seen> = self
            .stats
            .iter()
            .filter_map(|s| {
                let name = self.peer_names.get(&s.key)?;
                let seen = Seen {
                    reading: reading(s),
                    endpoint: s.endpoint,
                };
                Some((name.as_str(), seen))
            })
            .collect();
        self.ladder.observe(&planned, &seen, down, now, window);
    }

    /// The peers whose own mesh addresses answered this meshd's echoes
    /// since the last look.
    fn echoed(&self) -> BTreeSet<String> {
        let answers = self.prober.answers();
        let Some((desired, _)) = &self.applied else {
            return BTreeSet::new();
        };
        desired
            .peers
            .values()
            .filter(|p| p.mesh_addresses.iter().any(|a| answers.contains(a)))
            .map(|p| p.node.clone())
            .collect()
    }

    /// Probes each named peer's own mesh address; returns those whose echo
    /// went out (only those are waited for).
    fn probe(&mut self, names: &BTreeSet<String>, kind: &str) -> BTreeSet<String> {
        let Some((desired, _)) = &self.applied else {
            return BTreeSet::new();
        };
        let targets: Vec<(String, IpAddr)> = desired
            .peers
            .values()
            .filter(|p| names.contains(&p.node))
            .filter_map(|p| Some((p.node.clone(), probe::target(p)?)))
            .collect();
        targets
            .into_iter()
            .filter(|(_, target)| self.send_probe(*target, kind) == Some(probe::Sent::Echo))
            .map(|(name, _)| name)
            .collect()
    }

    /// Sends a probe (see crate::probe) and counts it.
    fn send_probe(&mut self, target: IpAddr, kind: &str) -> Option<probe::Sent> {
        match self.prober.send(target) {
            Ok(sent) => {
                self.count_probe(kind);
                Some(sent)
            }
            Err(e) => {
                tracing::debug!(%target, error = %e, "could not probe a peer");
                None
            }
        }
    }

    fn count_probe(&self, kind: &str) {
        let labels = KindLabels { kind: kind.into() };
        self.health.metrics.probes.get_or_create(&labels).inc();
    }

    /// How long until the data plane is looked at again: sooner while
    /// traffic flows (a failure is caught within a quarter of the probe
    /// timeout) or a probe waits for its answer.
    fn observe_period(&self) -> Duration {
        match self.busy || self.liveness.probing() {
            true => (*self.args.probe_timeout / 4).max(Duration::from_millis(50)),
            false => Duration::from_secs(1),
        }
    }

    /// Where each peer's authenticated packets come from: the one host
    /// address of it pods may reach through the mesh (see
    /// planner::host_addresses and planner::heard_from). `names` maps keys
    /// to nodes where the last plan's peers do not yet (the first pass).
    /// True if that changed.
    fn note_heard(
        &mut self,
        stats: &[PeerStats],
        names: Option<&BTreeMap<PublicKey, String>>,
    ) -> bool {
        self.rx_baselines
            .retain(|k| stats.iter().any(|s| s.key == *k));
        let names = names.unwrap_or(&self.peer_names);
        let mut reported = Vec::new();
        for s in stats {
            let received = match self.reconciler.endpoint_baseline(&s.key) {
                Some(base) => s.rx_bytes.saturating_sub(base),
                None => self
                    .rx_baselines
                    .received_since(&s.key, s.rx_bytes, s.routes_its_endpoint),
            };
            if let Some(node) = names.get(&s.key) {
                reported.push(crate::planner::Reported {
                    node: node.clone(),
                    endpoint: s.endpoint,
                    received_since_written: received,
                });
            }
        }
        let heard = crate::planner::heard_from(reported);
        let changed = heard != self.local.heard_from;
        if changed {
            tracing::info!(?heard, "peers heard from new addresses");
            self.local.heard_from = heard;
        }
        changed
    }

    /// Each peer's progress towards this node's next key: moved once it
    /// completed a handshake with it (the device reports handshakes under
    /// its own key only, and the next key is its key while overlapping).
    fn progress(&self) -> BTreeMap<String, PeerProgress> {
        let started = self.keys.next.as_ref().map_or(u64::MAX, |n| n.started);
        let handshakes: BTreeMap<&PublicKey, u64> = self
            .stats
            .iter()
            .map(|s| (&s.key, s.handshake_secs()))
            .collect();
        self.peer_names
            .iter()
            .map(|(key, name)| {
                let progress = PeerProgress {
                    moved: handshakes.get(key).is_some_and(|at| *at >= started),
                    up: !self.local.unreachable.contains(name),
                };
                (name.clone(), progress)
            })
            .collect()
    }

    /// The rotation step for this sync, its new key state saved before
    /// anything is published or configured.
    fn rotate(&mut self, me: &NodeInfo, revoked: &BTreeSet<PublicKey>, now: u64) -> Result<Step> {
        let requested = me.annotations.get(ROTATE_REQUESTED).and_then(|v| {
            parse_time(v)
                .map_err(|e| tracing::warn!(error = %e, "ignoring {ROTATE_REQUESTED}"))
                .ok()
        });
        let next_public = self
            .keys
            .next
            .as_ref()
            .map(|n| n.key.public_key().to_string());
        let announced =
            next_public.is_some() && me.annotations.get(NEXT_PUBLIC_KEY) == next_public.as_ref();
        let progress = self.progress();
        let step = rotation::step(&rotation::Inputs {
            state: &self.keys,
            now,
            mechanism: self
                .reconciler
                .overlap()
                .map(|o| self.args.keys.mechanism(o)),
            requested,
            max_age: self.args.keys.key_max_age.map(|d| d.as_secs()),
            revoked,
            device_ready: self.applied_keys.as_ref() == Some(&rotation::device_keys(&self.keys)),
            announced,
            // Known once this meshd has planned (the first sync after a
            // restart has not).
            peers: self.planned.then_some(&progress),
        });
        if step.state != self.keys {
            self.key_store.save(&step.state)?;
            tracing::info!(
                event = ?step.event,
                public_key = %step.state.current.public_key(),
                next = ?step.state.next.as_ref().map(|n| n.key.public_key()),
                "key state changed"
            );
            if let Some(event) = &step.event {
                self.health.metrics.count_rotation(event);
            }
            self.keys = step.state.clone();
        }
        self.wake_at = step.wake_at;
        Ok(step)
    }

    async fn sync(&mut self, sources: &Sources) {
        let started = Instant::now();
        self.guard.apply();
        self.egress.apply();
        self.host_firewall.keep();
        // A pass that changed the device's keys is followed by one that
        // announces them (peers may move only to a key the device answers);
        // one whose post-quantum states moved, by one that reports them.
        let mut result = Ok(true);
        for _ in 0..2 {
            result = match tokio::time::timeout(SYNC_TIMEOUT, self.try_sync(sources)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!(
                    "the sync took longer than {SYNC_TIMEOUT:?}"
                )),
            };
            if !matches!(result, Ok(true)) {
                break;
            }
        }
        let result = result.map(|_| ());
        let m = &self.health.metrics;
        self.needs_sync = result.is_err();
        self.health.mesh.store(result.is_ok(), Ordering::Relaxed);
        if let Err(e) = result {
            m.reconcile_errors.inc();
            tracing::warn!(error = %format!("{e:#}"), "sync failed; retrying in a second");
            if let Err(e) = self.remove_what_must_go(sources).await {
                tracing::warn!(error = %format!("{e:#}"), "could not remove deleted or revoked peers");
            }
        }
        let m = &self.health.metrics;
        m.reconciles.inc();
        m.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    }

    /// Logs WeftPeers' verdicts and gateways when they change.
    fn report_external(&mut self, external: &BTreeMap<String, PeerVerdict>) {
        if *external == self.external {
            return;
        }
        for (name, verdict) in external {
            if self.external.get(name) == Some(verdict) {
                continue;
            }
            match verdict {
                PeerVerdict::Accepted { gateway, .. } => {
                    tracing::info!(peer = %name, gateway = ?gateway, "external peer accepted")
                }
                PeerVerdict::Rejected(e) => {
                    tracing::warn!(peer = %name, error = %e, "external peer rejected")
                }
            }
        }
        self.external = external.clone();
    }

    /// Who holds which block, from the nodes' claims (none unless
    /// `node-or-blocks`). A claim that is no claim (corrupt, or written for
    /// another node) holds nothing and is reported once; it stops no pass.
    fn block_record(&mut self, sources: &Sources) -> weft_ipam::BlockRecord {
        let Some(claims) = &sources.record else {
            return Default::default();
        };
        let objects = claims.state();
        let (record, errors) =
            crate::node_blocks::record(objects.iter().map(|c| &**c), &self.block_plans);
        if errors != self.claim_errors {
            for e in &errors {
                tracing::warn!(error = %e, "ignoring a block claim");
            }
            self.claim_errors = errors;
        }
        record
    }

    /// The removal path, taken when a pass fails: peers whose Node is gone
    /// or whose key is revoked leave the device anyway (see
    /// [`crate::planner::prune`]); it reads only the Node list and the
    /// revoked keys, so nothing a pass can fail on stops it.
    async fn remove_what_must_go(&mut self, sources: &Sources) -> Result<()> {
        let (Some((applied, mtu)), Some(keys)) = (&self.applied, &self.applied_keys) else {
            return Ok(());
        };
        let names = sources.live();
        let live: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        let (revoked, _) = crate::revoked::of(sources.revoked.state().first().map(|c| &**c));
        let pruned = prune(applied, &live, &revoked);
        if pruned == *applied {
            return Ok(());
        }
        let removed: Vec<&str> = applied
            .peers
            .values()
            .filter(|p| !pruned.peers.values().any(|q| q.node == p.node))
            .map(|p| p.node.as_str())
            .collect();
        tracing::warn!(
            ?removed,
            "a pass failed: removed deleted and revoked peers anyway"
        );
        let mtu = *mtu;
        self.reconciler
            .reconcile(&pruned, keys, self.args.listen_port, mtu)
            .await?;
        self.applied = Some((pruned, mtu));
        Ok(())
    }

    /// Gather, decide, apply. True when another pass is due at once.
    async fn try_sync(&mut self, sources: &Sources) -> Result<bool> {
        // Whether the device has said if it overlaps two keys (see below).
        let probed = self.reconciler.overlap().is_some();
        // Gather.
        let objects = sources.nodes.state();
        let blocks = self.block_record(sources);
        let (revoked, errors) = crate::revoked::of(sources.revoked.state().first().map(|c| &**c));
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        if errors != self.revoked_errors {
            for e in &errors {
                tracing::warn!(record = %self.args.keys.revoked_keys, error = %e, "skipping a line of the revoked keys");
            }
            self.revoked_errors = errors;
        }
        let snapshot = ClusterSnapshot {
            nodes: objects.iter().map(|n| node_info(n)).collect(),
            blocks,
            revoked: Arc::new(revoked),
            now: weft_keys::unix_now(),
            peers: sources.external_peers(&self.local.ranges),
        };
        let name = self.local.node_name.clone();
        let me = snapshot
            .nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("Node {name} is not registered yet"))?;
        let internal_ip = me.internal_ips.first().copied();
        if self.peer_names.is_empty() {
            // The first pass: hear the peers of a device adopted from a
            // meshd before this one before planning, so its host routes
            // are kept, not removed and added back.
            if let Ok(stats) = self.reconciler.peer_stats().await {
                let names = keys_by_node(&snapshot.nodes);
                self.note_heard(&stats, Some(&names));
            }
        }
        if self.local.host_networks.is_empty() {
            self.local.host_networks = self.own_subnets(&me.internal_ips).await;
        }
        let pod_cidrs = match (me.spec_pod_cidrs.is_empty(), self.args.blocks.pod_cidr_source) {
            (false, _) => me.spec_pod_cidrs.clone(),
            (true, PodCidrSource::NodeOrBlocks) => self.claimed_blocks(&snapshot, me).await?,
            (true, PodCidrSource::Node) => anyhow::bail!(
                "Node {name} has no spec.podCIDRs yet: waiting for kube-controller-manager to assign them (--pod-cidr-source node; node-or-blocks claims blocks instead)"
            ),
        };
        self.local.own_addresses = self.host_rules.own_addresses().await?;
        // Decide.
        let step = self.rotate(me, &snapshot.revoked, snapshot.now)?;
        let proofs = own_proofs(me, &step.keys, &step.state)?;
        let reported = self.pq.report();
        let mut decision = decide(
            &Inputs {
                snapshot: &snapshot,
                local: &self.local,
                keys: step.keys.clone(),
                proofs,
                listening: Listening {
                    endpoint: self.args.endpoint,
                    prefer: self.args.endpoint_address,
                    extra: &self.args.endpoint_candidates,
                    port: self.args.listen_port,
                },
                pod_cidrs,
                status: crate::decide::Status {
                    policy_applied: self.policy.published,
                    post_quantum: reported.clone(),
                },
            },
            &mut self.parse_memo,
        )?;
        let stats = match self.pq.enabled() {
            true => self.reconciler.peer_stats().await.unwrap_or_default(),
            false => Vec::new(),
        };
        let pq_states = self.pq.plan(
            &name,
            &step.device.private,
            &mut decision.desired.peers,
            &stats,
            &self.local.unreachable,
        );
        self.health.metrics.set_pq_links(pq_states);
        // Published by a second pass (this one published the last plan's).
        let republish = self.pq.report() != reported;
        // Fail closed: a gateway holds an external peer only once that
        // peer is held to what it may reach.
        let serving = crate::peers::served(&decision.desired.external, &name);
        let peer_ranges = self.local.ranges.peers;
        if !self.peer_filter.hold(&serving, peer_ranges.as_ref()) {
            decision
                .desired
                .peers
                .retain(|_, p| p.kind != PeerKind::External);
        }
        let desired = &decision.desired;
        let cidrs = node_pod_cidrs(&desired.verdicts, &name, &decision.claim.pod_cidrs);
        let listed: Vec<weft_policy::NodeInfo> = objects
            .iter()
            .map(|n| weft_policy::NodeInfo::from_node(n))
            .collect();
        let policy_nodes =
            weft_policy::NodeInfo::believed(&listed, &cidrs, &self.local.host_networks);
        self.policy_nodes.send_if_modified(|held| {
            let changed = **held != policy_nodes;
            if changed {
                *held = Arc::new(policy_nodes);
            }
            changed
        });
        self.pod_cidrs.send_if_modified(|held| {
            let changed = held.as_deref() != Some(&cidrs);
            if changed {
                *held = Some(Arc::new(cidrs));
            }
            changed
        });
        // Apply.
        if let Some(patch) = &decision.patch {
            cluster::patch_node(&self.client, &name, patch).await?;
            self.health.metrics.count_write("annotations");
            tracing::info!(?patch, "published this node's annotations");
        }
        // Nodes only: liveness, link state and the address ladder are
        // about nodes; an external peer's entry is its own client's affair.
        self.peer_names = desired
            .peers
            .iter()
            .filter(|(_, p)| p.kind == PeerKind::Node)
            .map(|(k, p)| (*k, p.node.clone()))
            .collect();
        self.report_external(&desired.external);
        self.peer_status.report(&desired.external);
        self.planned = true;
        self.report(&desired.verdicts, &objects).await;

        let mtu = self.mtu(decision.claim.endpoint, internal_ip).await;
        let outcome = self
            .reconciler
            .reconcile(desired, &step.device, self.args.listen_port, mtu)
            .await?;
        self.pq.applied(&desired.peers);
        self.peer_filter.settle(
            &crate::peers::served(&desired.external, &name),
            peer_ranges.as_ref(),
        );
        let rules = self.host_rules.ensure(&desired.untunnelled).await?;
        if rules > 0 {
            tracing::info!(rules, untunnelled = ?desired.untunnelled, "host traffic rules changed");
        }
        let keys_changed = self.applied_keys.as_ref() != Some(&step.device);
        self.applied_keys = Some(step.device.clone());
        self.applied = Some((desired.clone(), mtu));
        let m = &self.health.metrics;
        m.set_paths(&desired.paths);
        m.count_change("wireguard", outcome.wireguard);
        m.count_change("link", outcome.link);
        m.count_change("address", outcome.addresses);
        m.count_change("route", outcome.routes);
        if outcome.created_device {
            m.dataplane_starts.inc();
        }
        if outcome.total() > 0 {
            tracing::info!(
                ?outcome,
                peers = desired.peers.len(),
                routes = desired.routes.len(),
                "applied changes"
            );
        }
        // New peers, and every peer once this node's key changed (a device
        // with one key has just dropped its sessions): handshake now, not
        // when traffic or a keepalive happens to ask.
        // A peer whose endpoint was just written is asked for a packet too:
        // its answer shows where it really is (see note_heard).
        // Both sides do this when they add each other; whichever is
        // second finds the other ready.
        for (key, peer) in &desired.peers {
            if keys_changed
                || outcome.new_peers.contains(key)
                || outcome.endpoints_written.contains(key)
            {
                if let Some(target) = probe::target(peer) {
                    self.send_probe(target, "handshake");
                }
            }
        }
        // Only now may pods attach: the node state is what the CNI plugin
        // waits for, and the mesh their traffic needs is in place.
        self.publish_for_cni(&decision.claim.pod_cidrs, mtu, me)
            .await?;
        // Decided on what this pass changed: keys the device now holds may
        // be announced, and a mechanism learnt from the device may start
        // a requested rotation.
        Ok(keys_changed || republish || (!probed && self.reconciler.overlap().is_some()))
    }

    /// Publishes the node state the CNI plugin reads (the plugin attaches
    /// nothing until it exists), then the conflist (the runtime sees the
    /// network from then on); warns when another configuration would win.
    async fn publish_for_cni(
        &mut self,
        pod_cidrs: &[IpNet],
        mtu: u32,
        me: &NodeInfo,
    ) -> Result<()> {
        let node_state = weft_ipam::NodeState::new(pod_cidrs.to_vec(), mtu);
        if crate::cni::publish_state(&self.args.cni.cni_state_file, &node_state)? {
            tracing::info!(path = %self.args.cni.cni_state_file.display(), "published the node state for the CNI plugin");
        }
        let plan = crate::cni::tend_conf_dir(
            &self.args.conflist,
            &self.args.cni,
            crate::cni::Readiness::Synced,
        )?;
        if plan.ahead != self.conf_ahead && !plan.ahead.is_empty() {
            let note = format!(
                "{} in {} sort before Weft's {}: runtimes use the first CNI configuration by name, so pods on this node get that network; remove them",
                plan.ahead.join(", "),
                self.args.conflist.dir.cni_conf_dir.display(),
                crate::cni::CONFLIST
            );
            tracing::warn!(ahead = ?plan.ahead, "{note}");
            let warning = cluster::Warning {
                action: "WriteCniConfig",
                reason: "WeftCniConfigShadowed",
                note,
            };
            let uid = (!me.uid.is_empty()).then(|| me.uid.clone());
            match cluster::warn(&self.events, cluster::node_ref(&me.name, uid), warning).await {
                Ok(()) => self.health.metrics.count_write("event"),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "could not record an Event"),
            }
        }
        self.conf_ahead = plan.ahead;
        Ok(())
    }

    /// The blocks this node holds by its claim (no `spec.podCIDRs`): asks
    /// the API only when the claims watched do not show it holding one
    /// block of each plan.
    async fn claimed_blocks(
        &self,
        snapshot: &ClusterSnapshot,
        me: &NodeInfo,
    ) -> Result<Vec<IpNet>> {
        let held = snapshot.blocks.held_by(&me.name);
        if crate::node_blocks::holds_one_of_each(&held, &self.block_plans) {
            return Ok(held);
        }
        let reserved: Vec<IpNet> = snapshot
            .nodes
            .iter()
            .filter(|n| n.name != me.name)
            .flat_map(|n| n.spec_pod_cidrs.iter().copied())
            .collect();
        crate::node_blocks::claim(&self.client, &self.args.blocks, me, &reserved).await
    }

    /// Metrics for every excluded node; a log line and an Event for those
    /// newly or differently excluded, rate-limited per node.
    async fn report(&mut self, verdicts: &BTreeMap<String, Verdict>, objects: &[Arc<Node>]) {
        let m = &self.health.metrics;
        m.excluded.clear();
        let mut rejected = BTreeMap::new();
        for (name, verdict) in verdicts {
            if let Verdict::Rejected(why) = verdict {
                m.excluded
                    .get_or_create(&ReasonLabels {
                        reason: why.reason().into(),
                    })
                    .inc();
                rejected.insert(name.clone(), why.to_string());
            }
        }
        for name in self.reports.select(&rejected, Instant::now()) {
            let Some(Verdict::Rejected(why)) = verdicts.get(&name) else {
                continue;
            };
            m.rejected
                .get_or_create(&ReasonLabels {
                    reason: why.reason().into(),
                })
                .inc();
            let note = why.to_string();
            tracing::warn!(node = %name, reason = why.reason(), "{note}; node excluded from the mesh");
            if let Some(node) = objects.iter().find(|o| o.name_any() == name) {
                match cluster::report_exclusion(&self.events, node, note).await {
                    Ok(()) => m.count_write("event"),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "could not record an Event")
                    }
                }
            }
        }
    }

    /// The subnets this node's own addresses are on: where, unless
    /// `--host-cidr` says otherwise, other nodes' host addresses are
    /// believed (see [`crate::planner::host_addresses`]).
    async fn own_subnets(&self, own: &[IpAddr]) -> Vec<IpNet> {
        let mut subnets = Vec::new();
        for ip in own {
            match self.reconciler.netlink().subnet_of_address(*ip).await {
                Ok(Some(net)) => subnets.push(net),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(address = %ip, error = %format!("{e:#}"), "reading this node's subnet")
                }
            }
        }
        if !subnets.is_empty() {
            tracing::info!(
                ?subnets,
                "pods reach other nodes' host addresses in these subnets through the mesh"
            );
        }
        subnets
    }

    async fn mtu(&mut self, endpoint: Option<SocketAddr>, internal_ip: Option<IpAddr>) -> u32 {
        if let Some(m) = self.args.mtu.or(self.mtu) {
            return m;
        }
        let mut underlay = None;
        for ip in [endpoint.map(|e| e.ip()), internal_ip]
            .into_iter()
            .flatten()
        {
            if let Ok(Some(m)) = self.reconciler.netlink().mtu_of_address(ip).await {
                underlay = Some(m);
                break;
            }
        }
        let mtu = underlay
            .unwrap_or(DEFAULT_UNDERLAY_MTU)
            .saturating_sub(WIREGUARD_OVERHEAD);
        tracing::info!(mtu, underlay = ?underlay, "WireGuard interface MTU");
        self.mtu = Some(mtu);
        mtu
    }
}

/// Each published public key (current and next) to its node, where no
/// other node publishes it: names for the first pass's peers.
fn keys_by_node(nodes: &[NodeInfo]) -> BTreeMap<PublicKey, String> {
    let mut seen: BTreeMap<PublicKey, Option<String>> = BTreeMap::new();
    for node in nodes {
        for annotation in [crate::annotations::PUBLIC_KEY, NEXT_PUBLIC_KEY] {
            if let Some(key) = node
                .annotations
                .get(annotation)
                .and_then(|k| k.parse().ok())
            {
                seen.entry(key)
                    .and_modify(|n| {
                        if n.as_deref() != Some(node.name.as_str()) {
                            *n = None;
                        }
                    })
                    .or_insert_with(|| Some(node.name.clone()));
            }
        }
    }
    seen.into_iter()
        .filter_map(|(k, n)| Some((k, n?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// Each accepted peer with its claimed pod CIDRs, this node with its own
    /// blocks (whatever its own verdict says), and no other node.
    #[test]
    fn node_pod_cidrs_are_the_accepted_claims_and_our_own_blocks() {
        // Pod CIDR 198.19.k.0/24.
        let claim = |k: u8| crate::annotations::fixtures::published(k).1;
        let verdicts = BTreeMap::from([
            ("node-1".to_string(), Verdict::Accepted(claim(9))),
            ("node-2".to_string(), Verdict::Accepted(claim(2))),
            ("node-3".to_string(), Verdict::Pending),
        ]);
        let own: Vec<IpNet> = vec!["198.19.1.0/24".parse().unwrap()];
        assert_eq!(
            node_pod_cidrs(&verdicts, "node-1", &own),
            BTreeMap::from([
                ("node-1".to_string(), own.clone()),
                ("node-2".to_string(), vec!["198.19.2.0/24".parse().unwrap()]),
            ])
        );
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["meshd", "--node-name", "n"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).run
    }

    /// The kernel's boundary: a device that answers one key (kernel
    /// WireGuard, wireguard-go: `Reconciler` reports no overlap) switches at
    /// an announced time; Weft's own overlaps unless told not to.
    #[test]
    fn a_one_key_device_switches_and_weft_s_device_overlaps() {
        let defaults = args(&[]);
        assert_eq!(
            defaults.keys.mechanism(false),
            Mechanism::Switch { lead: 5 }
        );
        assert_eq!(
            defaults.keys.mechanism(true),
            Mechanism::Overlap { max_overlap: 300 }
        );
        let never = args(&["--key-overlap", "never", "--key-switch-lead", "0s"]);
        assert_eq!(never.keys.mechanism(true), Mechanism::Switch { lead: 0 });
        let err = Cli::try_parse_from(["meshd", "--node-name", "n", "--key-max-age", "soon"])
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("--key-max-age"), "{err}");
    }

    #[test]
    fn timers_are_checked_against_each_other() {
        assert!(check_timers(&args(&[])).is_ok(), "the defaults");
        for (bad, want) in [
            (
                &["--persistent-keepalive", "30", "--peer-timeout", "30"][..],
                "--peer-timeout 30 must exceed --persistent-keepalive 30",
            ),
            (
                &["--probe-timeout", "0s"],
                "--probe-timeout 0s must be above zero",
            ),
            (
                &["--peer-timeout", "15", "--probe-timeout", "15s"],
                "below --peer-timeout 15s",
            ),
        ] {
            let err = check_timers(&args(bad)).unwrap_err().to_string();
            assert!(err.contains(want), "{bad:?}: {err}");
        }
    }

    #[test]
    fn endpoint_candidates_are_checked() {
        let ranges = ClusterRanges::lab();
        let ok = args(&["--endpoint-candidate", "192.0.2.7:4500,10.8.0.1:51820"]);
        assert_eq!(ok.endpoint_candidates.len(), 2);
        assert!(check_candidates(&ok, &ranges).is_ok());
        let loopback = args(&["--endpoint-candidate", "127.0.0.1:51820"]);
        let err = check_candidates(&loopback, &ranges)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--endpoint-candidate 127.0.0.1:51820"),
            "{err}"
        );
        let many: Vec<String> = (1..=9).map(|i| format!("10.8.0.{i}:51820")).collect();
        let many = args(&["--endpoint-candidate", &many.join(",")]);
        let err = check_candidates(&many, &ranges).unwrap_err().to_string();
        assert!(err.contains("given 9 times"), "{err}");
    }

    #[test]
    fn cluster_ranges_are_required_and_checked() {
        let err = cluster_ranges(&args(&[])).unwrap_err().to_string();
        assert!(err.contains("--cluster-cidr is required"), "{err}");
        let r = cluster_ranges(&args(&[
            "--cluster-cidr",
            "198.19.0.0/16",
            "--cluster-cidr",
            "fd98:19::/48",
        ]))
        .unwrap();
        assert_eq!(r.pods.v4.to_string(), "198.19.0.0/16");
        assert_eq!(
            r.all().count(),
            4,
            "pods and the default mesh ranges, both families; no peer ranges unless given"
        );
        let err = cluster_ranges(&args(&[
            "--cluster-cidr",
            "100.65.0.0/16",
            "--peer-cidr",
            "100.65.128.0/17",
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--cluster-cidr 100.65.0.0/16 overlaps --peer-cidr"),
            "{err}"
        );
        for (bad, want) in [
            (["--cluster-cidr", "198.19.0.1/16"], "host bits"),
            (
                ["--cluster-cidr", "fd98:19::/48"],
                "--cluster-cidr: an IPv4 range is required",
            ),
        ] {
            let err = cluster_ranges(&args(&bad)).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let err = cluster_ranges(&args(&[
            "--cluster-cidr",
            "198.19.0.0/16",
            "--mesh-cidr",
            "10.0.0.0/8",
            "--mesh-cidr",
            "10.1.0.0/16",
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("--mesh-cidr 10.1.0.0/16"), "{err}");
    }

    /// A link flapping at every look (four a second, as a busy link is
    /// looked at) changes the published link state once a second at most;
    /// a change after a quiet interval goes out at once.
    #[test]
    fn link_state_changes_go_out_at_most_once_per_interval() {
        let mut throttle = Throttle::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let admitted = (0..40)
            .filter(|i| throttle.admit(LINK_STATE_INTERVAL, at(250 * i)))
            .count();
        assert_eq!(admitted, 10, "ten seconds of flapping");
        assert!(throttle.admit(LINK_STATE_INTERVAL, at(12_000)));
        assert!(!throttle.admit(LINK_STATE_INTERVAL, at(12_999)));
    }

    /// Reports are taken at once after a quiet interval, otherwise when the
    /// interval since the last one taken ends; reports meanwhile wait for
    /// that one take, and only a different set is news.
    #[test]
    fn policy_reports_are_published_at_most_once_per_interval() {
        let (tx, reports) = tokio::sync::watch::channel(None);
        let mut status = PolicyStatus {
            reports,
            published: None,
            taken: None,
            due: None,
        };
        let t0 = Instant::now();
        let set = |policies| {
            Some(PolicyApplied {
                policies,
                revision: 10 + policies as u64,
            })
        };
        tx.send_replace(set(1));
        status.reported(t0);
        assert_eq!(status.due, Some(t0), "the first report is due at once");
        assert!(status.take(t0));
        assert_eq!(status.published, set(1));

        let t1 = t0 + Duration::from_secs(1);
        tx.send_replace(set(2));
        status.reported(t1);
        tx.send_replace(set(3));
        status.reported(t1 + Duration::from_secs(1));
        assert_eq!(
            status.due,
            Some(t0 + POLICY_STATUS_INTERVAL),
            "reports within the interval wait for its end, together"
        );
        assert!(status.take(t0 + POLICY_STATUS_INTERVAL));
        assert_eq!(status.published, set(3), "the latest report is taken");
        assert_eq!(status.due, None);

        // Back to a set already published: taken, but nothing to write.
        let later = t0 + 4 * POLICY_STATUS_INTERVAL;
        tx.send_replace(set(3));
        status.reported(later);
        assert_eq!(status.due, Some(later), "after a quiet interval, at once");
        assert!(!status.take(later));
    }
}
