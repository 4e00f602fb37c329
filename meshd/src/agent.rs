//! `meshd run`: the node agent's event loop.
//!
//! Node watch events (debounced) and a one-second look at the data plane
//! (is it alive, which peers are heard from) trigger a sync: build the
//! snapshot, publish this node's annotations if they changed, plan, and
//! reconcile the difference. A periodic resync is only a safety net. When
//! meshd stops, the data plane and routes stay: traffic keeps flowing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;
use weft_keys::{KeyStore, PrivateKey, PublicKey, SealingKey};

use crate::annotations::render;
use crate::cluster::{self, annotation_patch, node_info};
use crate::dataplane::{DataPlane, Mode, UserspaceProgram};
use crate::http::{self, Health};
use crate::liveness::Liveness;
use crate::metrics::{PeerLabels, ReasonLabels, StateLabels};
use crate::model::{ClusterSnapshot, LocalConfig, MeshRanges, Verdict};
use crate::planner::{own_claim, own_endpoint, plan};
use crate::reconcile::netlink::Netlink;
use crate::reconcile::Reconciler;

/// WireGuard's per-packet overhead on an IPv6 underlay (the larger case).
const WIREGUARD_OVERHEAD: u32 = 80;
const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// Watch events closer together than this are applied as one.
const DEBOUNCE: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// This node's name (the Node object meshd publishes on).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Kubeconfig to use; default: $KUBECONFIG, then in-cluster.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Where the key and data plane logs live.
    #[arg(long, default_value = "/var/lib/weft")]
    pub state_dir: PathBuf,
    /// The WireGuard interface.
    #[arg(long, default_value = "weft0")]
    pub interface: String,
    #[arg(long, default_value_t = 51820)]
    pub listen_port: u16,
    /// Publish this endpoint instead of InternalIP:listen-port.
    #[arg(long)]
    pub endpoint: Option<SocketAddr>,
    /// The cluster's mesh ranges (one IPv4, optionally one IPv6); the same on every node.
    #[arg(long = "mesh-cidr", default_values = ["100.64.0.0/16", "fd64:77:65::/64"])]
    pub mesh_cidrs: Vec<IpNet>,
    /// Seconds between keepalives to each peer; 0 turns them (and peer liveness) off.
    #[arg(long, default_value_t = 25)]
    pub persistent_keepalive: u16,
    /// A peer not heard from for this many seconds (no bytes, no new handshake)
    /// is down: its routes become unreachable. WireGuard itself gives up on a
    /// session after 180 s.
    #[arg(long, default_value_t = 180)]
    pub peer_timeout: u64,
    #[arg(long, value_enum, default_value = "auto")]
    pub dataplane: Mode,
    /// `builtin` (boringtun in `meshd dataplane`, started and adopted by meshd),
    /// a wireguard-go compatible program, or `none` (another process — a
    /// separate container — runs `meshd dataplane`; meshd only adopts it).
    #[arg(long, default_value = "builtin")]
    pub userspace_program: String,
    /// Threads of the builtin userspace data plane.
    #[arg(long, default_value_t = 1)]
    pub dataplane_threads: usize,
    /// MTU of the WireGuard interface; default: the underlay's minus 80.
    #[arg(long)]
    pub mtu: Option<u32>,
    /// Encrypt the key file at rest with this 32-byte base64 key.
    #[arg(long)]
    pub sealing_key_file: Option<PathBuf>,
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, default_value = "127.0.0.1:9475")]
    pub metrics_addr: SocketAddr,
    /// Seconds between full resyncs (a safety net; changes are event-driven).
    #[arg(long, default_value_t = 60)]
    pub resync: u64,
    #[command(flatten)]
    pub cni: crate::cni::CniArgs,
    #[command(flatten)]
    pub blocks: crate::node_blocks::BlockArgs,
    /// Enforce Kubernetes NetworkPolicy for this node's pods (needs `nft`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub network_policy: bool,
    /// Log packets NetworkPolicy drops to the kernel log (prefix "weft
    /// drop"), at most this many per second per group of isolating
    /// policies; 0: count them only.
    #[arg(long, default_value_t = 0)]
    pub log_policy_drops: u32,
}

/// Exactly one IPv4 range and at most one IPv6 range.
pub fn mesh_ranges(cidrs: &[IpNet]) -> Result<MeshRanges> {
    let mut v4 = None;
    let mut v6 = None;
    for c in cidrs {
        if c.trunc() != *c {
            bail!(
                "--mesh-cidr {c}: host bits set (did you mean {}?)",
                c.trunc()
            );
        }
        match c {
            IpNet::V4(n) if v4.is_none() => v4 = Some(*n),
            IpNet::V6(n) if v6.is_none() => v6 = Some(*n),
            _ => bail!("--mesh-cidr {c}: give one IPv4 range and at most one IPv6 range"),
        }
    }
    let v4 = v4.context("--mesh-cidr: an IPv4 range is required")?;
    Ok(MeshRanges { v4, v6 })
}

async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            let config = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?;
            Ok(Client::try_from(config)?)
        }
        None => Client::try_default()
            .await
            .context("no kubeconfig: set --kubeconfig or KUBECONFIG, or run in a cluster"),
    }
}

struct Agent {
    args: RunArgs,
    client: Client,
    key: PrivateKey,
    local: LocalConfig,
    reconciler: Reconciler,
    health: Arc<Health>,
    recorder: Recorder,
    liveness: Liveness,
    /// Exclusions already reported, so each is reported once.
    reported: BTreeMap<String, String>,
    mtu: Option<u32>,
    peer_names: BTreeMap<PublicKey, String>,
    needs_sync: bool,
    /// Blocks claimed through the API, and the Nodes there were then.
    claimed: Option<(BTreeSet<String>, Vec<IpNet>)>,
}

pub async fn run(args: RunArgs) -> Result<()> {
    let mesh = mesh_ranges(&args.mesh_cidrs)?;
    let sealing = args
        .sealing_key_file
        .as_deref()
        .map(SealingKey::from_file)
        .transpose()?;
    let key = KeyStore::new(args.state_dir.join("key.json"), sealing)
        .load_or_create()?
        .current;
    tracing::info!(node = %args.node_name, public_key = %key.public_key(), "starting");
    let client = client(args.kubeconfig.as_ref()).await?;
    crate::cni::enable_forwarding()?;
    crate::cni::install(&args.cni)?;
    let health = Arc::new(Health {
        ready: Default::default(),
        metrics: Default::default(),
    });
    http::serve(args.metrics_addr, health.clone()).await?;
    if args.network_policy {
        let options = weft_policy::render::Options {
            log_per_second: (args.log_policy_drops > 0).then_some(args.log_policy_drops),
        };
        tokio::spawn(crate::policy::run(
            client.clone(),
            args.node_name.clone(),
            options,
            health.clone(),
        ));
    }

    let program = match args.userspace_program.as_str() {
        "builtin" => UserspaceProgram::Builtin {
            threads: args.dataplane_threads,
        },
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
    let reconciler = Reconciler::new(dataplane, Netlink::new()?);

    let (reader, writer) = reflector::store();
    let changed = Arc::new(Notify::new());
    let nodes: Api<Node> = Api::all(client.clone());
    let notify = changed.clone();
    tokio::spawn(async move {
        let stream =
            reflector(writer, watcher(nodes, watcher::Config::default())).default_backoff();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => notify.notify_one(),
                Err(e) => tracing::warn!(error = %e, "watching Nodes (retrying)"),
            }
        }
    });
    reader
        .wait_until_ready()
        .await
        .context("waiting for the first list of Nodes")?;

    let mut agent = Agent {
        local: LocalConfig {
            node_name: args.node_name.clone(),
            mesh,
            persistent_keepalive: (args.persistent_keepalive > 0)
                .then_some(args.persistent_keepalive),
            down_peers: BTreeSet::new(),
        },
        recorder: cluster::recorder(client.clone(), &args.node_name),
        args,
        client,
        key,
        reconciler,
        health,
        liveness: Liveness::default(),
        reported: BTreeMap::new(),
        mtu: None,
        peer_names: BTreeMap::new(),
        needs_sync: true,
        claimed: None,
    };
    let mut observe = tokio::time::interval(Duration::from_secs(1));
    let mut resync = tokio::time::interval(Duration::from_secs(agent.args.resync.max(1)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            // Stop signals first: a meshd being stopped must not start
            // anything new (a data plane it recreated would outlive it).
            biased;
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = changed.notified() => tokio::time::sleep(DEBOUNCE).await,
            _ = observe.tick() => {
                if !agent.observe().await && !agent.needs_sync {
                    continue;
                }
            }
            _ = resync.tick() => {}
        }
        agent.sync(&reader).await;
    }
    tracing::info!("stopping; the data plane and routes stay in place");
    Ok(())
}

impl Agent {
    /// Looks at the data plane; true if the plan or the device needs a sync.
    async fn observe(&mut self) -> bool {
        if !self.reconciler.dataplane.alive().await {
            tracing::warn!(interface = %self.reconciler.dataplane.iface, "the data plane is gone; recreating it");
            return true;
        }
        let stats = match self.reconciler.peer_stats().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "reading peer statistics");
                return true;
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
            Some(_) => {
                let readings: Vec<_> = stats
                    .iter()
                    .map(|s| {
                        let handshake = s
                            .last_handshake
                            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_secs());
                        (s.key, (s.rx_bytes, handshake))
                    })
                    .collect();
                self.liveness.observe(
                    &readings,
                    Instant::now(),
                    Duration::from_secs(self.args.peer_timeout),
                )
            }
            None => BTreeSet::new(),
        };
        m.peers
            .get_or_create(&StateLabels {
                state: "down".into(),
            })
            .set(down.len() as i64);
        m.peers
            .get_or_create(&StateLabels { state: "up".into() })
            .set((stats.len() - down.len()) as i64);
        if down != self.local.down_peers {
            tracing::info!(down = ?down.iter().map(|k| self.peer_names.get(k).cloned().unwrap_or_else(|| k.to_string())).collect::<Vec<_>>(), "peer liveness changed");
            self.local.down_peers = down;
            return true;
        }
        false
    }

    async fn sync(&mut self, reader: &Store<Node>) {
        let started = Instant::now();
        let result = self.try_sync(reader).await;
        let m = &self.health.metrics;
        match result {
            Ok(()) => {
                self.needs_sync = false;
                self.health.ready.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                self.needs_sync = true;
                m.reconcile_errors.inc();
                tracing::warn!(error = %format!("{e:#}"), "sync failed; retrying in a second");
            }
        }
        m.reconciles.inc();
        m.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    }

    async fn try_sync(&mut self, reader: &Store<Node>) -> Result<()> {
        let objects = reader.state();
        let mut snapshot = ClusterSnapshot {
            nodes: objects.iter().map(|n| node_info(n)).collect(),
        };
        let name = self.local.node_name.clone();
        let me = snapshot
            .nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("Node {name} is not registered yet"))?;
        let endpoint = own_endpoint(me, self.args.endpoint, self.args.listen_port)
            .map_err(anyhow::Error::msg)?;
        let internal_ip = me.internal_ips.first().copied();
        let current = me.annotations.clone();
        let pod_cidrs = match me.spec_pod_cidrs.is_empty() {
            false => me.spec_pod_cidrs.clone(),
            true => self.claimed_blocks(&snapshot).await?,
        };
        let claim = own_claim(
            &snapshot,
            &self.local,
            self.key.public_key(),
            endpoint,
            pod_cidrs,
        )
        .map_err(anyhow::Error::msg)?;
        let desired_annotations = render(&claim);
        if let Some(patch) = annotation_patch(&current, &desired_annotations) {
            cluster::patch_node(&self.client, &name, &patch).await?;
            self.health.metrics.count_write("annotations");
            tracing::info!(?patch, "published this node's annotations");
        }
        // Plan with what was just published rather than wait for its echo.
        if let Some(me) = snapshot.nodes.iter_mut().find(|n| n.name == name) {
            me.annotations.extend(desired_annotations);
        }
        let desired = plan(&snapshot, &self.local);
        self.peer_names = desired
            .peers
            .iter()
            .map(|(k, p)| (*k, p.node.clone()))
            .collect();
        self.report(&desired.verdicts, &objects).await;

        let mtu = self.mtu(endpoint, internal_ip).await;
        let node_state = weft_ipam::NodeState::new(claim.pod_cidrs.clone(), mtu);
        if crate::cni::publish_state(&self.args.cni.cni_state_file, &node_state)? {
            tracing::info!(path = %self.args.cni.cni_state_file.display(), "published the node state for the CNI plugin");
        }
        let outcome = self
            .reconciler
            .reconcile(&desired, &self.key, self.args.listen_port, mtu)
            .await?;
        let m = &self.health.metrics;
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
        for key in &outcome.new_peers {
            if let Some(peer) = desired.peers.get(key) {
                start_handshake(peer);
            }
        }
        Ok(())
    }

    /// The blocks this node claims through the API (no `spec.podCIDRs`).
    /// Asks the API only when the set of Nodes changed since the last claim.
    async fn claimed_blocks(&mut self, snapshot: &ClusterSnapshot) -> Result<Vec<IpNet>> {
        let live: BTreeSet<String> = snapshot.nodes.iter().map(|n| n.name.clone()).collect();
        if let Some((seen, blocks)) = &self.claimed {
            if *seen == live {
                return Ok(blocks.clone());
            }
        }
        let reserved: Vec<IpNet> = snapshot
            .nodes
            .iter()
            .filter(|n| n.name != self.local.node_name)
            .flat_map(|n| n.spec_pod_cidrs.iter().copied())
            .collect();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let blocks = crate::node_blocks::claim(
            &self.client,
            &self.args.blocks,
            &self.local.node_name,
            &live,
            &reserved,
            now,
        )
        .await?;
        self.claimed = Some((live, blocks.clone()));
        Ok(blocks)
    }

    /// Events and metrics for excluded nodes; each exclusion reported once.
    async fn report(&mut self, verdicts: &BTreeMap<String, Verdict>, objects: &[Arc<Node>]) {
        let m = &self.health.metrics;
        m.excluded.clear();
        let mut still = BTreeMap::new();
        for (name, verdict) in verdicts {
            let Verdict::Rejected(why) = verdict else {
                continue;
            };
            m.excluded
                .get_or_create(&ReasonLabels {
                    reason: why.reason().into(),
                })
                .inc();
            let note = why.to_string();
            if self.reported.get(name) != Some(&note) {
                m.rejected
                    .get_or_create(&ReasonLabels {
                        reason: why.reason().into(),
                    })
                    .inc();
                tracing::warn!(node = %name, reason = why.reason(), "{note}; node excluded from the mesh");
                if let Some(node) = objects.iter().find(|o| o.name_any() == *name) {
                    match cluster::report_exclusion(&self.recorder, node, note.clone()).await {
                        Ok(()) => m.count_write("event"),
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "could not record an Event")
                        }
                    }
                }
            }
            still.insert(name.clone(), note);
        }
        self.reported = still;
    }

    async fn mtu(&mut self, endpoint: SocketAddr, internal_ip: Option<std::net::IpAddr>) -> u32 {
        if let Some(m) = self.args.mtu.or(self.mtu) {
            return m;
        }
        let netlink = Netlink::new();
        let mut underlay = None;
        if let Ok(n) = netlink {
            for ip in [Some(endpoint.ip()), internal_ip].into_iter().flatten() {
                if let Ok(Some(m)) = n.mtu_of_address(ip).await {
                    underlay = Some(m);
                    break;
                }
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

/// Sends one datagram through the tunnel to a new peer's mesh address, so
/// the data plane handshakes now rather than at the first keepalive
/// (boringtun, unlike the kernel and wireguard-go, does not send a keepalive
/// when one is configured). Both sides do this when they add each other;
/// whichever is second finds the other ready.
fn start_handshake(peer: &crate::model::Peer) {
    let Some(target) = peer
        .allowed_ips
        .iter()
        .find(|n| n.prefix_len() == n.max_prefix_len())
        .map(|n| n.addr())
    else {
        return;
    };
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // The discard port: nothing answers, the handshake is the point.
    let sent = std::net::UdpSocket::bind(bind).and_then(|s| s.send_to(&[], (target, 9)));
    if let Err(e) = sent {
        tracing::debug!(%target, error = %e, "could not prompt a handshake");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_range_flags() {
        let r = mesh_ranges(&[
            "198.18.128.0/17".parse().unwrap(),
            "fd98:18::/64".parse().unwrap(),
        ])
        .unwrap();
        assert_eq!(r.v4.to_string(), "198.18.128.0/17");
        assert!(mesh_ranges(&["fd98:18::/64".parse().unwrap()])
            .unwrap_err()
            .to_string()
            .contains("IPv4 range is required"));
        assert!(mesh_ranges(&[
            "10.0.0.0/8".parse().unwrap(),
            "10.1.0.0/16".parse().unwrap()
        ])
        .is_err());
        assert!(mesh_ranges(&["10.0.0.1/8".parse().unwrap()])
            .unwrap_err()
            .to_string()
            .contains("host bits"));
    }
}
