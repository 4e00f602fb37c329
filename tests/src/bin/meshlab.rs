//! `meshlab`: a local multi-node Weft cluster in network namespaces.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use meshlab::lab::state::{LabDir, DEFAULT_ROOT};
use meshlab::lab::topology::{
    load_topology, parse_config, parse_label, parse_topology, LabSpec, NodeDataplane, NodePlan,
    DEBIAN_WIREGUARD_GO,
};
use meshlab::lab::{
    agents, bench, bench_cni, bench_failover, bench_planner, bench_policy, bench_rotate, control,
    kube_proxy, lifecycle, netpol, pods, preflight, status, strict_runtime, topology,
};
use meshlab::vm;

#[derive(Parser)]
#[command(
    version,
    about = "A local multi-node Weft cluster in network namespaces, with an embedded Kubernetes API server"
)]
struct Cli {
    /// The lab's name; it prefixes its network namespaces. Separate names are separate labs.
    #[arg(long, global = true, env = "MESHLAB_NAME", default_value = "weft")]
    name: String,
    /// Where labs keep their runtime directories.
    #[arg(long, global = true, env = "MESHLAB_ROOT", default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Run the command in the lab's QEMU guest on the distribution's kernel
    /// (kernel WireGuard, SCTP, netem, IPVS): `up` boots it, `down` powers
    /// it off (docs/lab.md).
    #[arg(long, global = true)]
    vm: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum ApiCmd {
    /// Stop the API server and start it again with its objects (as a
    /// restarted kube-apiserver: every watch gets 410 and relists).
    Restart,
}

#[derive(Subcommand)]
enum PodCmd {
    /// Attach pod NAME on NODE through the node's weft CNI plugin.
    Add {
        node: String,
        #[arg(value_name = "NAME")]
        pod: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// A label: KEY=VALUE (repeatable).
        #[arg(long)]
        label: Vec<String>,
        /// Do not report the pod's addresses on its Pod object (as if
        /// kubelet had not yet): only the CNI plugin's record has them.
        #[arg(long)]
        no_status: bool,
    },
    /// Delete pod NAMESPACE/NAME (CNI DEL, namespace, Pod object).
    Del { pod: String },
    /// Run a command in pod NAMESPACE/NAME's network namespace.
    Exec {
        pod: String,
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
}

#[derive(Subcommand)]
enum PeerCmd {
    /// Bring an external peer up beyond the fabric's router with stock
    /// wg-quick: with --config, that configuration (what `meshctl peer
    /// config` printed, with its PrivateKey); without, `meshctl peer add
    /// NAME` makes the WeftPeer and its key first.
    Add {
        #[arg(value_name = "NAME")]
        peer: String,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Apply a new configuration to a running peer (`wg syncconf`), as an
    /// admin does after its gateway rotated its key or failed over.
    Apply {
        #[arg(value_name = "NAME")]
        peer: String,
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Take a peer down and remove its host (its WeftPeer stays).
    Del {
        #[arg(value_name = "NAME")]
        peer: String,
    },
    /// Run a command in the peer's network namespace.
    Exec {
        #[arg(value_name = "NAME")]
        peer: String,
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
}

/// `NAMESPACE/NAME`, or `NAME` in `default`.
fn pod_ref(arg: &str) -> (String, String) {
    match arg.split_once('/') {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => ("default".to_string(), arg.to_string()),
    }
}

#[derive(Subcommand)]
enum BenchCmd {
    /// iperf3 between two nodes' pods: Weft, wireguard-go configured identically, raw underlay.
    Throughput {
        /// Runs per path and stream count (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// TCP stream counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        streams: Vec<u32>,
        /// wireguard-go 867a4c4, the peer to beat; default: the one tests/setup
        /// builds from tests/anchors. Without either its rows are left out.
        #[arg(long, env = "MESHLAB_WIREGUARD_GO")]
        wireguard_go: Option<PathBuf>,
    },
    /// CNI ADD/DEL latency: weft vs Debian's bridge+host-local, dual-stack.
    Cni {
        /// ADD/DEL cycles per plugin.
        #[arg(long, default_value_t = 200)]
        cycles: usize,
    },
    /// meshd's planner at scale: verdicts (indexed vs pairwise), paths and
    /// one Node event's whole decision, with peak memory.
    Planner {
        #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
        nodes: Vec<usize>,
        /// Percent of all node pairs whose link is reported down.
        #[arg(long, default_value_t = 1.0)]
        down: f64,
        /// Timed runs per figure (the median is reported).
        #[arg(long, default_value_t = 9)]
        runs: usize,
        /// Time the pairwise verdicts (quadratic) up to this many nodes.
        #[arg(long, default_value_t = 5000)]
        pairwise_up_to: usize,
    },
    /// Key rotation under traffic through the node: Weft's overlap vs the
    /// scheduled switch of one-key devices vs the naive rotation, for one
    /// node and for every node (rolling).
    Rotate {
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Only the post-quantum preshared-key rows.
        #[arg(long)]
        preshared_keys: bool,
    },
    /// Failover under traffic on 4 nodes: a link cut, restored, and the
    /// relay in use killed, with the shipped timers and the lab's.
    Failover {
        /// Runs of every event (each on fresh labs); the table shows each
        /// figure's range over them.
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
    /// NetworkPolicy and ClusterNetworkPolicy at scale: compile, full
    /// sync, one pod and one policy change as differences vs whole-table
    /// replaces.
    Policy {
        #[arg(long, default_value_t = 10_000)]
        pods: usize,
        #[arg(long, default_value_t = 1_000)]
        policies: usize,
        #[arg(long, default_value_t = 100)]
        namespaces: usize,
        /// Nodes the pods are spread over (node-1 is measured).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// ClusterNetworkPolicies per tier (Admin and Baseline).
        #[arg(long, default_value_t = 10)]
        cluster_policies: usize,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boot a guest, run COMMAND in it (the host's files, the guest's
    /// kernel), power it off; exits with COMMAND's status.
    Run {
        /// How long COMMAND may run (scaled for a guest without KVM).
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Add the next node (node-N+1): namespace, Node object, meshd; waits for the mesh.
    Add {
        /// Its region and zone labels.
        #[arg(long, value_name = "REGION/ZONE")]
        topology: Option<String>,
        /// Its data plane is Debian's wireguard-go.
        #[arg(long)]
        wireguard_go: bool,
    },
    /// Delete a node: its Node object, processes and namespace.
    Del { node: String },
}

#[derive(Subcommand)]
enum LinkCmd {
    /// Drop the underlay between two nodes, both ways, in the fabric.
    Cut { a: String, b: String },
    /// Let it through again.
    Restore { a: String, b: String },
    /// The cut links, one `A B` per line.
    List,
}

#[derive(Subcommand)]
enum ContainerCmd {
    Restart { node: String, container: String },
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the fabric, the nodes and the API server, and register the Nodes.
    Up {
        /// How many nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// A node's region and zone labels: NODE=REGION/ZONE (repeatable);
        /// or a topology FILE of sites (separate fabrics joined by a router,
        /// some behind NAT; docs/lab.md), which sets the number of nodes.
        #[arg(long, value_name = "NODE=REGION/ZONE|FILE")]
        topology: Vec<String>,
        /// An extra label on a node: NODE:KEY=VALUE (repeatable).
        #[arg(long, value_name = "NODE:KEY=VALUE")]
        label: Vec<String>,
        /// Run this node's data plane on Debian's wireguard-go instead of boringtun (repeatable).
        #[arg(long, value_name = "NODE")]
        wireguard_go: Vec<String>,
        /// Run this node's data plane in Weft's userspace device even where
        /// the kernel has WireGuard: a mixed mesh (repeatable).
        #[arg(long, value_name = "NODE")]
        userspace: Vec<String>,
        /// Pods to attach on every node through the weft CNI plugin.
        #[arg(long, default_value_t = 0)]
        pods_per_node: usize,
        /// Register Nodes without spec.podCIDRs: meshd claims its blocks through the API.
        #[arg(long)]
        self_allocated_blocks: bool,
        /// The API server listens for nodes at this node's own address (in
        /// its namespace), as on a kubeadm control-plane node.
        #[arg(long, value_name = "NODE")]
        control_plane: Option<String>,
        /// The manifests whose DaemonSet every node runs: a kustomization
        /// directory of plain resources or a rendered YAML file (`kubectl
        /// kustomize deploy/overlays/X > FILE`); default: this tree's deploy/.
        #[arg(long, value_name = "PATH")]
        manifests: Option<std::path::PathBuf>,
        /// How each node's containers run: as processes with the built
        /// binaries, or as podman containers of the DaemonSet's image
        /// (build it first: deploy/image/build).
        #[arg(long, value_enum, default_value_t)]
        runtime: topology::Runtime,
        /// A value in the manifests' ConfigMap, replacing the lab's:
        /// KEY=VALUE (repeatable), e.g. WEFT_PEER_TIMEOUT=3.
        #[arg(long, value_name = "KEY=VALUE")]
        config: Vec<String>,
    },
    /// Attach, delete or enter pods.
    Pod {
        #[command(subcommand)]
        action: PodCmd,
    },
    /// External peers: a laptop beyond the fabric with a stock WireGuard
    /// client (docs/lab.md).
    Peer {
        #[command(subcommand)]
        action: PeerCmd,
    },
    /// Add a node to a running lab, or delete one.
    Node {
        #[command(subcommand)]
        action: NodeCmd,
    },
    /// Start the node's pod where it is not running (every container that
    /// is not, e.g. after a test killed meshd).
    StartMeshd { node: String },
    /// Uninstall Weft from every node as an admin would: stop Weft's pod,
    /// then run the cleanup DaemonSet's pod (deploy/uninstall) to remove
    /// what Weft made there. The lab stays up for inspection.
    Uninstall {
        /// The cleanup manifests; default: this tree's deploy/uninstall.
        #[arg(long, value_name = "PATH")]
        manifests: Option<std::path::PathBuf>,
    },
    /// Cut or restore the underlay link between two nodes.
    Link {
        #[command(subcommand)]
        action: LinkCmd,
    },
    /// A NAT'd site's router takes another public address (its NAT's
    /// mappings go with the old one); prints the new address.
    NatRenumber { site: String },
    /// Restart one container of a node's pod (just its process, as the
    /// kubelet does); prints the new pid.
    Container {
        #[command(subcommand)]
        action: ContainerCmd,
    },
    /// The lab's API server.
    Api {
        #[command(subcommand)]
        action: ApiCmd,
    },
    /// Print a node's meshd metrics (Prometheus text).
    Metrics { node: String },
    /// Benchmarks (they bring up labs of their own).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Run NetworkPolicy conformance cases (shared/netpol format) with real
    /// TCP/UDP/SCTP connections between pods on three nodes; multi-step
    /// cases are applied in place, in the order given.
    Netpol {
        #[arg(required = true, value_name = "CASE.yaml")]
        cases: Vec<PathBuf>,
        /// Leave the lab running if this run brought it up.
        #[arg(long)]
        keep: bool,
        /// Probe each pod through its own Service's ClusterIP, as upstream
        /// does (cases must label pods `pod: <name>`).
        #[arg(long)]
        via_services: bool,
    },
    /// Send WireGuard datagrams forged from public data to a device, from
    /// this namespace (`ip netns exec NS meshlab forge …`), for attack
    /// tests: initiations claiming its peers, data messages with given
    /// receiver indices and noise for ciphertext.
    Forge {
        /// The device's address:port.
        to: SocketAddr,
        /// The device's public key.
        #[arg(long, value_name = "KEY")]
        device: weft_keys::PublicKey,
        /// A peer of the device to claim in initiations (repeatable).
        #[arg(long, value_name = "KEY")]
        claim: Vec<weft_keys::PublicKey>,
        /// A receiver index for data messages (repeatable).
        #[arg(long)]
        index: Vec<u32>,
        /// Also cookie replies from each claimed peer, to the device's
        /// handshake message with this sender index and mac1 (hex).
        #[arg(long, value_name = "INDEX:MAC1", value_parser = meshlab::forge::parse_cookie_target)]
        cookie_reply: Option<(u32, [u8; 16])>,
        /// How long to keep sending.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// The pause between two rounds.
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        every: std::time::Duration,
    },
    /// Remove every process, namespace and file of the lab (also after a crash).
    Down,
    /// A QEMU guest on the distribution's kernel.
    Vm {
        #[command(subcommand)]
        action: VmCmd,
    },
    /// Show the lab's nodes.
    Status {
        /// Machine-readable output (schema in docs/lab.md).
        #[arg(long)]
        json: bool,
    },
    /// Print the path of the lab's kubeconfig.
    Kubeconfig {
        /// The kubeconfig for processes inside node namespaces.
        #[arg(long)]
        node: bool,
    },
    /// Run a command inside a node's network namespace (KUBECONFIG set for it).
    Exec {
        node: String,
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
    /// Run kubectl against the lab.
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Translate Services on every node, as kube-proxy (started by `up`;
    /// not for direct use).
    #[command(hide = true)]
    KubeProxy {
        #[arg(long)]
        lab_dir: PathBuf,
    },
    /// Serve the lab's API (started by `up`; not for direct use).
    #[command(hide = true)]
    Apiserver {
        #[arg(long)]
        lab_dir: PathBuf,
        #[arg(long)]
        fabric_netns: String,
        #[arg(long)]
        fabric_listen: SocketAddr,
    },
}

/// A node of the running lab, by name.
fn node_plan(dir: &LabDir, node: &str) -> Result<NodePlan> {
    let state = dir.running_state()?;
    Ok(state.plan.nodes[state.node_index(node)?].clone())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESHLAB_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Run by podman as the lab's OCI runtime (see strict_runtime).
    let mut args = std::env::args_os();
    let invoked_as = args.next().map(PathBuf::from);
    if invoked_as.as_deref().and_then(|p| p.file_name()) == Some(strict_runtime::NAME.as_ref()) {
        return match strict_runtime::run(args.collect()) {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => {
                eprintln!("{}: {e:#}", strict_runtime::NAME);
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `meshlab --vm …`: the same command inside the lab's guest, booted by
/// `up` and powered off after `down`; exits with the guest command's status.
fn in_vm(cli: &Cli) -> Result<()> {
    let dir = vm::Vm::dir(Path::new(vm::DEFAULT_ROOT), vm::Guest::Lab(&cli.name));
    let guest = match (vm::Vm::attach(&dir), &cli.command) {
        (Some(guest), _) => guest,
        (None, Cmd::Up { .. }) => {
            eprintln!("meshlab: booting the VM");
            let guest = vm::Vm::boot(&dir, vm::Lifetime::Detached)?;
            eprintln!(
                "meshlab: VM up ({:?}, kernel {})",
                guest.accel, guest.kernel_release
            );
            guest
        }
        (None, Cmd::Down) => return Ok(()),
        (None, _) => bail!("no VM for lab {}: `meshlab --vm up` first", cli.name),
    };
    // Only `down` ends the guest: whatever else fails, the lab stays.
    let down = matches!(cli.command, Cmd::Down);
    let code = (|| {
        let meshlab = std::env::current_exe()?.to_string_lossy().into_owned();
        // The same arguments, `--vm` included: the guest's meshlab knows
        // it runs there (vm::GUEST_ENV) and does not forward again.
        let argv: Vec<String> = [
            "env".to_string(),
            format!("MESHLAB_NAME={}", cli.name),
            format!("MESHLAB_ROOT={}", cli.root.display()),
            meshlab,
        ]
        .into_iter()
        .chain(
            std::env::args_os()
                .skip(1)
                .map(|a| a.to_string_lossy().into_owned()),
        )
        .collect();
        guest.run_forwarded(
            &argv,
            &std::env::current_dir()?,
            std::time::Duration::from_secs(3600),
        )
    })();
    if down {
        guest.stop();
    } else {
        guest.detach();
    }
    match code? {
        0 => Ok(()),
        code => std::process::exit(code),
    }
}

/// `meshlab vm run`: a guest for one command.
fn vm_run(name: &str, timeout: std::time::Duration, command: &[String]) -> Result<()> {
    let dir = vm::Vm::dir(Path::new(vm::DEFAULT_ROOT), vm::Guest::Run(name));
    let guest = vm::Vm::boot(&dir, vm::Lifetime::Process)?;
    eprintln!(
        "meshlab: VM up ({:?}, kernel {})",
        guest.accel, guest.kernel_release
    );
    let code = guest.run_forwarded(command, &std::env::current_dir()?, timeout)?;
    guest.stop();
    match code {
        0 => Ok(()),
        code => std::process::exit(code),
    }
}

fn run(cli: Cli) -> Result<()> {
    topology::check_name(&cli.name)?;
    if cli.vm && !vm::in_guest() {
        return in_vm(&cli);
    }
    let dir = LabDir::new(&cli.root, &cli.name);
    match cli.command {
        Cmd::Vm {
            action: VmCmd::Run { timeout, command },
        } => vm_run(&cli.name, timeout, &command),
        Cmd::Up {
            nodes,
            topology,
            label,
            wireguard_go,
            userspace,
            pods_per_node,
            self_allocated_blocks,
            control_plane,
            manifests,
            runtime,
            config,
        } => {
            let mut spec = LabSpec {
                name: cli.name.clone(),
                nodes,
                dataplanes: wireguard_go
                    .into_iter()
                    .map(|n| {
                        let program = NodeDataplane::Program(DEBIAN_WIREGUARD_GO.to_string());
                        (n, program)
                    })
                    .chain(userspace.into_iter().map(|n| (n, NodeDataplane::Userspace)))
                    .collect(),
                pods_per_node,
                self_allocated: self_allocated_blocks,
                control_plane,
                manifests,
                runtime,
                ..LabSpec::default()
            };
            for t in &topology {
                if t.contains('=') {
                    let (node, rz) = parse_topology(t)?;
                    spec.topology.insert(node, rz);
                } else {
                    spec.sites = load_topology(std::path::Path::new(t))?;
                }
            }
            for l in &label {
                let (node, k, v) = parse_label(l)?;
                spec.labels.entry(node).or_default().insert(k, v);
            }
            for c in &config {
                let (k, v) = parse_config(c)?;
                spec.config.insert(k, v);
            }
            lifecycle::up(&dir, &spec, &mut |step| eprintln!("meshlab: {step}"))?;
            print!("{}", status::table(&status::collect(&dir)?));
            Ok(())
        }
        Cmd::Node {
            action:
                NodeCmd::Add {
                    topology,
                    wireguard_go,
                },
        } => {
            let next = format!("node-{}", dir.running_state()?.next_node());
            let mut spec = LabSpec {
                name: cli.name.clone(),
                ..LabSpec::default()
            };
            if let Some(t) = topology {
                let (_, rz) = parse_topology(&format!("{next}={t}"))?;
                spec.topology.insert(next.clone(), rz);
            }
            if wireguard_go {
                let program = NodeDataplane::Program(DEBIAN_WIREGUARD_GO.to_string());
                spec.dataplanes.insert(next, program);
            }
            let node = lifecycle::add_node(&dir, &spec, &mut |step| eprintln!("meshlab: {step}"))?;
            println!("{}", node.name);
            Ok(())
        }
        Cmd::Node {
            action: NodeCmd::Del { node },
        } => {
            lifecycle::delete_node(&dir, &node)?;
            eprintln!("meshlab: {node} deleted");
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Throughput {
                    runs,
                    seconds,
                    streams,
                    wireguard_go,
                },
        } => {
            anyhow::ensure!(
                runs >= 1 && seconds >= 1,
                "--runs and --seconds must be at least 1"
            );
            anyhow::ensure!(
                streams.iter().all(|&s| (1..=128).contains(&s)),
                "--streams: each count must be 1 to 128"
            );
            if let Some(p) = &wireguard_go {
                anyhow::ensure!(p.is_file(), "--wireguard-go {}: no such file", p.display());
            }
            // The one tests/setup builds, when none is named.
            let wireguard_go = wireguard_go.or_else(|| {
                let built = PathBuf::from(preflight::WIREGUARD_GO_867A4C4);
                built.is_file().then_some(built)
            });
            let spec = bench::ThroughputSpec {
                runs,
                seconds,
                streams,
                wireguard_go,
            };
            let measured =
                bench::throughput(&cli.root, &spec, &mut |step| eprintln!("meshlab: {step}"))?;
            print!("{}", bench::table(&measured.rows));
            anyhow::ensure!(
                measured.failed.is_empty(),
                "not measured: {}",
                measured.failed.join("; ")
            );
            Ok(())
        }
        Cmd::Bench {
            what: BenchCmd::Cni { cycles },
        } => {
            anyhow::ensure!(cycles >= 1, "--cycles must be at least 1");
            let results = bench_cni::run(cycles, &mut |step| eprintln!("meshlab: {step}"))?;
            print!("{}", bench_cni::table(&results));
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Policy {
                    pods,
                    policies,
                    namespaces,
                    nodes,
                    cluster_policies,
                },
        } => {
            anyhow::ensure!(
                pods >= nodes && nodes >= 1 && namespaces >= 1 && policies >= 1,
                "--pods, --policies, --namespaces and --nodes must be at least 1, with a pod per node"
            );
            let scale = bench_policy::Scale {
                pods,
                policies,
                namespaces,
                nodes,
                cluster_policies,
            };
            let report = bench_policy::run(scale, &mut |step| eprintln!("meshlab: {step}"))?;
            print!("{}", bench_policy::table(&report));
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Planner {
                    nodes,
                    down,
                    runs,
                    pairwise_up_to,
                },
        } => {
            anyhow::ensure!(runs >= 1, "--runs must be at least 1");
            let rows = bench_planner::run(&nodes, down, runs, pairwise_up_to, &mut |step| {
                eprintln!("meshlab: {step}")
            })?;
            print!("{}", bench_planner::table(&rows));
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Rotate {
                    nodes,
                    preshared_keys,
                },
        } => {
            anyhow::ensure!(nodes >= 2, "--nodes must be at least 2");
            let mut progress = |step: &str| eprintln!("meshlab: {step}");
            let rows = match preshared_keys {
                true => bench_rotate::preshared_keys(&cli.root, &mut progress)?,
                false => bench_rotate::run(&cli.root, nodes, &mut progress)?,
            };
            print!("{}", bench_rotate::table(&rows));
            Ok(())
        }
        Cmd::Bench {
            what: BenchCmd::Failover { runs },
        } => {
            anyhow::ensure!(runs >= 1, "--runs must be at least 1");
            let mut rows = Vec::new();
            for run in 1..=runs {
                let mut progress = |step: &str| eprintln!("meshlab: run {run} of {runs}: {step}");
                rows.extend(bench_failover::run(&cli.root, &mut progress)?);
            }
            print!("{}", bench_failover::table(&rows));
            Ok(())
        }
        Cmd::Metrics { node } => {
            print!("{}", agents::metrics(&node_plan(&dir, &node)?)?);
            Ok(())
        }
        Cmd::Container {
            action: ContainerCmd::Restart { node, container },
        } => {
            let state = dir.running_state()?;
            let pid = agents::restart(&dir, &state.plan, &node_plan(&dir, &node)?, &container)?;
            println!("{pid}");
            Ok(())
        }
        Cmd::NatRenumber { site } => {
            println!("{}", lifecycle::renumber_nat(&dir, &site)?);
            Ok(())
        }
        Cmd::Link { action } => match action {
            LinkCmd::Cut { a, b } => lifecycle::set_link(&dir, &a, &b, true),
            LinkCmd::Restore { a, b } => lifecycle::set_link(&dir, &a, &b, false),
            LinkCmd::List => {
                for (a, b) in dir.running_state()?.cuts {
                    println!("{a} {b}");
                }
                Ok(())
            }
        },
        Cmd::Uninstall { manifests } => {
            let state = dir.running_state()?;
            let path = manifests.unwrap_or_else(|| {
                std::path::Path::new(meshlab::lab::manifest::DEFAULT_DIR).join("uninstall")
            });
            let cleanup = meshlab::lab::manifest::load(&path)?;
            for node in &state.plan.nodes {
                agents::uninstall(&dir, &state.plan, node, &cleanup)?;
                eprintln!("meshlab: uninstalled Weft from {}", node.name);
            }
            Ok(())
        }
        Cmd::StartMeshd { node } => {
            let state = dir.running_state()?;
            let pid = agents::start(&dir, &state.plan, &node_plan(&dir, &node)?)?;
            println!("{pid}");
            Ok(())
        }
        Cmd::Pod {
            action:
                PodCmd::Add {
                    node,
                    pod: name,
                    namespace,
                    label,
                    no_status,
                },
        } => {
            let mut labels = std::collections::BTreeMap::new();
            for l in &label {
                let (k, v) = l
                    .split_once('=')
                    .with_context(|| format!("--label {l:?}: expected KEY=VALUE"))?;
                labels.insert(k.to_string(), v.to_string());
            }
            let status = match no_status {
                true => pods::Status::Unreported,
                false => pods::Status::Reported,
            };
            let pod = lifecycle::add_pod(&dir, &node, &namespace, &name, &labels, status)?;
            println!("{}", pod.ips.join(" "));
            Ok(())
        }
        Cmd::Peer {
            action: PeerCmd::Add { peer: name, config },
        } => {
            let config = match config {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("--config {}", path.display()))?,
                None => {
                    let out = Command::new(agents::sibling("meshctl")?)
                        .arg("--kubeconfig")
                        .arg(dir.kubeconfig())
                        .args(["peer", "add", &name])
                        .output()
                        .context("running meshctl peer add")?;
                    anyhow::ensure!(
                        out.status.success(),
                        "meshctl peer add {name}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    String::from_utf8(out.stdout)?
                }
            };
            let peer = lifecycle::add_peer(&dir, &name, &config)?;
            println!(
                "peer {} up in {} ({}, interface {})",
                peer.name, peer.netns, peer.underlay, peer.interface
            );
            Ok(())
        }
        Cmd::Peer {
            action: PeerCmd::Apply { peer: name, config },
        } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("--config {}", config.display()))?;
            let state = dir.running_state()?;
            meshlab::lab::peers::apply(state.peer(&name)?, &text)
        }
        Cmd::Peer {
            action: PeerCmd::Del { peer: name },
        } => lifecycle::remove_peer(&dir, &name),
        Cmd::Peer {
            action:
                PeerCmd::Exec {
                    peer: name,
                    command,
                },
        } => {
            let state = dir.running_state()?;
            let err = Command::new("ip")
                .args(["netns", "exec", &state.peer(&name)?.netns])
                .args(&command)
                .exec();
            Err(err).context("running ip netns exec")
        }
        Cmd::Pod {
            action: PodCmd::Del { pod },
        } => {
            let (namespace, name) = pod_ref(&pod);
            lifecycle::delete_pod(&dir, &namespace, &name)
        }
        Cmd::Pod {
            action: PodCmd::Exec { pod, command },
        } => {
            let (namespace, name) = pod_ref(&pod);
            let state = dir.running_state()?;
            let record = &state.pods[state.pod_index(&namespace, &name)?];
            let err = Command::new("ip")
                .args(["netns", "exec", &record.netns])
                .args(&command)
                .exec();
            Err(err).context("running ip netns exec")
        }
        Cmd::Netpol {
            cases,
            keep,
            via_services,
        } => {
            let options = netpol::Options {
                cases,
                keep,
                via_services,
            };
            let outcomes = netpol::run(
                &dir,
                &options,
                &mut |o| print!("{}", weft_policy::case::report(&o.case, &o.mismatches)),
                &mut |step| eprintln!("meshlab: {step}"),
            )?;
            println!("{}", netpol::summary(&outcomes));
            let failed = outcomes.iter().filter(|o| !o.mismatches.is_empty()).count();
            anyhow::ensure!(failed == 0, "{failed} of {} cases failed", outcomes.len());
            Ok(())
        }
        Cmd::Forge {
            to,
            device,
            claim,
            index,
            cookie_reply,
            duration,
            every,
        } => {
            let target = meshlab::forge::Target {
                to,
                device,
                claims: claim,
                indices: index,
                cookie: cookie_reply,
            };
            let sent = meshlab::forge::flood(&target, every, duration)
                .with_context(|| format!("sending to {to}"))?;
            eprintln!("meshlab: {sent} forged datagrams sent to {to}");
            Ok(())
        }
        Cmd::Down => {
            let removed = lifecycle::down(&dir)?;
            eprintln!(
                "meshlab: lab {} removed ({} processes, {} namespaces)",
                cli.name, removed.processes, removed.namespaces
            );
            Ok(())
        }
        Cmd::Status { json } => {
            let report = status::collect(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", status::table(&report));
            }
            Ok(())
        }
        Cmd::Kubeconfig { node } => {
            let path = if node {
                dir.node_kubeconfig()
            } else {
                dir.kubeconfig()
            };
            anyhow::ensure!(
                path.exists(),
                "lab {:?} is not up (no {})",
                cli.name,
                path.display()
            );
            println!("{}", path.display());
            Ok(())
        }
        Cmd::Exec { node, command } => {
            let netns = node_plan(&dir, &node)?.netns;
            let err = Command::new("ip")
                .args(["netns", "exec", &netns])
                .args(&command)
                .env("KUBECONFIG", dir.node_kubeconfig())
                .exec();
            Err(err).context("running ip netns exec")
        }
        Cmd::Kubectl { args } => {
            let kubeconfig = dir.kubeconfig();
            anyhow::ensure!(kubeconfig.exists(), "lab {:?} is not up", cli.name);
            let err = Command::new(preflight::kubectl()?)
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(&args)
                .exec();
            Err(err).context("running kubectl")
        }
        Cmd::Api {
            action: ApiCmd::Restart,
        } => {
            let state = lifecycle::restart_api_server(&dir)?;
            println!(
                "API server restarted: pid {}, {}",
                state.api_server.pid, state.api_server.url
            );
            Ok(())
        }
        Cmd::KubeProxy { lab_dir } => {
            anyhow::ensure!(
                lab_dir == dir.path(),
                "--lab-dir must be {}",
                dir.path().display()
            );
            tokio::runtime::Runtime::new()?.block_on(kube_proxy::run(&dir))
        }
        Cmd::Apiserver {
            lab_dir,
            fabric_netns,
            fabric_listen,
        } => {
            anyhow::ensure!(
                lab_dir == dir.path(),
                "--lab-dir must be {}",
                dir.path().display()
            );
            control::run(&dir, &fabric_netns, fabric_listen)
        }
    }
}
