//! `meshctl`: Weft's admin command line.

mod keys;
mod peer;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ListParams};
use kube::ResourceExt;
use weft_meshd::annotations::PolicyApplied;
use weft_meshd::cluster::{node_info, object_ref};
use weft_meshd::graph::{MeshGraph, MeshSettings, PolicySync};
use weft_meshd::model::{ClusterSnapshot, Hop};
use weft_meshd::peers::{parse as parse_peer, WeftPeer};
use weft_policy::eval::Outcome;
use weft_policy::{case, NamespaceInfo, PodInfo, PolicyRef, Protocol, Tier};

#[derive(Parser)]
#[command(version, about = "Weft's admin command line")]
struct Cli {
    /// The kubeconfig to use (default: $KUBECONFIG, then ~/.kube/config,
    /// then in-cluster), as kubectl does.
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// NetworkPolicy tools.
    Policy {
        #[command(subcommand)]
        action: PolicyCmd,
    },
    /// The mesh as every node computes it from the cluster: nodes, links
    /// reported down and the relay each such pair goes through.
    Graph {
        #[arg(long, value_enum, default_value = "dot")]
        format: GraphFormat,
        /// Draw direct links up to this many nodes (dot and svg).
        #[arg(long, default_value_t = 40)]
        max_direct: usize,
        #[command(flatten)]
        source: MeshSource,
    },
    /// Node keys: status, rotation, revocation.
    Keys {
        #[command(subcommand)]
        action: keys::KeysCmd,
    },
    /// External peers: laptops, VMs and sites that reach the cluster
    /// through a gateway node with a stock WireGuard client.
    Peer {
        #[command(subcommand)]
        action: peer::PeerCmd,
    },
    /// Shell completion for meshctl: `source <(meshctl completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Mesh health from the cluster: each node's state, key, endpoint,
    /// link state, paths and whether it enforces the cluster's
    /// NetworkPolicies; with NODE, how it reaches each other node.
    Status {
        node: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        source: MeshSource,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GraphFormat {
    Json,
    Dot,
    /// Graphviz's `dot -Tsvg` (package graphviz).
    Svg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    /// The table with more columns.
    Wide,
    Json,
}

/// Where the cluster's Weft settings are.
#[derive(clap::Args)]
struct MeshSource {
    /// The ConfigMap (NAMESPACE/NAME) holding the cluster settings meshd
    /// runs with (deploy/base/config.yaml).
    #[arg(long, default_value = concat!(weft_meshd::weft_namespace!(), "/weft-config"))]
    config_map: String,
    /// The namespace of the nodes' block claims.
    #[arg(long, default_value = weft_meshd::cluster::NAMESPACE)]
    block_namespace: String,
    /// The revoked keys (NAMESPACE/NAME); absent is none.
    #[arg(long, default_value = weft_meshd::revoked::DEFAULT_RECORD)]
    revoked_keys: String,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Check conformance case files (the shared/netpol format) through
    /// compiled per-node programs; one PASS/FAIL line per case.
    Check {
        #[arg(required = true)]
        cases: Vec<PathBuf>,
    },
    /// Why a connection is allowed or denied: the verdict of each direction
    /// and the rule (or the isolating policies) that decided it, from the
    /// live cluster (KUBECONFIG or in-cluster) or a case file.
    Explain {
        /// A conformance case file holding the pods and policies, instead
        /// of the cluster.
        #[arg(long)]
        case: Option<PathBuf>,
        /// The client pod, NAMESPACE/NAME.
        #[arg(long)]
        from: String,
        /// The server pod, NAMESPACE/NAME.
        #[arg(long)]
        to: String,
        /// PORT/PROTOCOL, e.g. 80/TCP.
        #[arg(long)]
        port: String,
    },
}

/// `80/TCP` (protocol defaults to TCP).
fn parse_port(arg: &str) -> Result<(u16, Protocol)> {
    let (port, protocol) = arg.split_once('/').unwrap_or((arg, "TCP"));
    let port = port
        .parse()
        .with_context(|| format!("--port {arg:?}: expected PORT/PROTOCOL, e.g. 80/TCP"))?;
    let protocol = Protocol::parse(Some(&protocol.to_uppercase()))
        .with_context(|| format!("--port {arg:?}"))?;
    Ok((port, protocol))
}

/// A client as kubectl would make one.
async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no cluster: set --kubeconfig or KUBECONFIG, or run in a cluster")?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Whether [`mesh`] judges each node's NetworkPolicy enforcement (it lists
/// the cluster's NetworkPolicies to do so).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Policies {
    Skip,
    Judge,
}

/// The cluster's Weft settings and its Nodes, block claims, revoked keys
/// and WeftPeers (none where the CRD is not installed), as meshd reads them.
async fn gather(
    client: &kube::Client,
    source: &MeshSource,
) -> Result<(MeshSettings, ClusterSnapshot)> {
    let (ns, name) = object_ref("--config-map", &source.config_map)?;
    let config = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .with_context(|| format!("reading ConfigMap {}", source.config_map))?;
    let settings = MeshSettings::from_config(&config.data.unwrap_or_default())
        .with_context(|| format!("ConfigMap {}", source.config_map))?;
    let claims = Api::<ConfigMap>::namespaced(client.clone(), &source.block_namespace)
        .list(
            &ListParams::default()
                .labels(&format!("{}=true", weft_meshd::node_blocks::CLAIM_LABEL)),
        )
        .await
        .with_context(|| format!("listing the block claims in {}", source.block_namespace))?;
    let (blocks, _) = weft_meshd::node_blocks::record(&claims.items, &settings.block_plans);
    let (ns, name) = object_ref("--revoked-keys", &source.revoked_keys)?;
    let record = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .with_context(|| format!("reading ConfigMap {}", source.revoked_keys))?;
    let (revoked, _) = weft_meshd::revoked::of(record.as_ref());
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing nodes")?;
    let peers = match Api::<WeftPeer>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list.items,
        Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
        Err(e) => return Err(e).context("listing weftpeers"),
    };
    let snapshot = ClusterSnapshot {
        nodes: nodes.items.iter().map(node_info).collect(),
        blocks,
        revoked: std::sync::Arc::new(revoked),
        now: weft_keys::unix_now(),
        peers: peers
            .iter()
            .map(|p| (p.name_any(), parse_peer(p, &settings.ranges)))
            .collect(),
    };
    Ok((settings, snapshot))
}

/// The mesh as the cluster has it now.
async fn mesh(
    kubeconfig: Option<&Path>,
    source: &MeshSource,
    policies: Policies,
) -> Result<MeshGraph> {
    let client = client(kubeconfig).await?;
    let (settings, snapshot) = gather(&client, source).await?;
    let policies = match policies {
        Policies::Skip => None,
        Policies::Judge => {
            let list = Api::<NetworkPolicy>::all(client.clone())
                .list(&ListParams::default())
                .await
                .context("listing networkpolicies")?;
            let cluster = weft_meshd::cluster::cluster_policies(&client).await?;
            Some(PolicyApplied::of(
                list.items
                    .iter()
                    .map(|p| &p.metadata)
                    .chain(cluster.iter().map(|p| &p.metadata)),
            ))
        }
    };
    Ok(MeshGraph::of(&snapshot, &settings, policies))
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn graph(
    kubeconfig: Option<&Path>,
    format: GraphFormat,
    max_direct: usize,
    source: &MeshSource,
) -> Result<String> {
    let g = block_on(mesh(kubeconfig, source, Policies::Skip))?;
    match format {
        GraphFormat::Json => Ok(serde_json::to_string_pretty(&g)? + "\n"),
        GraphFormat::Dot => Ok(g.dot(max_direct)),
        GraphFormat::Svg => {
            let mut child = std::process::Command::new("dot")
                .arg("-Tsvg")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("--format svg runs Graphviz's `dot` (apt-get install graphviz), or use --format dot")?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(g.dot(max_direct).as_bytes())?;
            }
            let out = child.wait_with_output()?;
            anyhow::ensure!(
                out.status.success(),
                "dot -Tsvg failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    }
}

fn hop_text(hop: &Hop) -> String {
    match hop {
        Hop::Direct => "direct".into(),
        Hop::Via(r) => format!("via {r}"),
        Hop::None => "none".into(),
    }
}

fn status(
    kubeconfig: Option<&Path>,
    node: Option<&str>,
    output: Output,
    source: &MeshSource,
) -> Result<String> {
    let g = block_on(mesh(kubeconfig, source, Policies::Judge))?;
    let Some(name) = node else {
        return Ok(match output {
            Output::Json => serde_json::to_string_pretty(&g)? + "\n",
            Output::Table | Output::Wide => {
                let wide = matches!(output, Output::Wide);
                let now = weft_keys::unix_now();
                let mut header = vec![
                    "NODE",
                    "STATE",
                    "ZONE",
                    "ENDPOINT",
                    "KEY",
                    "UNREACHABLE",
                    "PATHS (direct/relayed/none)",
                    "POLICY",
                ];
                if wide {
                    header.extend(["KEY AGE", "ROTATION", "POLICIES APPLIED"]);
                }
                let mut rows = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
                for n in &g.nodes {
                    let paths = g.paths_from(&n.name);
                    let count = |f: fn(&Hop) -> bool| paths.values().filter(|h| f(h)).count();
                    let mut row = vec![
                        n.name.clone(),
                        n.reason
                            .as_ref()
                            .map_or(n.state.to_string(), |r| format!("{}: {r}", n.state)),
                        n.zone.clone().unwrap_or_else(|| "-".into()),
                        n.endpoint
                            .clone()
                            .or_else(|| n.nat.as_ref().map(|m| format!("NAT {m}")))
                            .unwrap_or_else(|| "-".into()),
                        n.public_key
                            .as_deref()
                            .map_or("-".into(), |k| k.chars().take(8).collect()),
                        if n.unreachable.is_empty() {
                            "-".into()
                        } else {
                            n.unreachable.join(",")
                        },
                        if n.state == "accepted" {
                            format!(
                                "{}/{}/{}",
                                count(|h| *h == Hop::Direct),
                                count(|h| matches!(h, Hop::Via(_))),
                                count(|h| *h == Hop::None)
                            )
                        } else {
                            "-".into()
                        },
                        n.policy.map_or("-", PolicySync::as_str).into(),
                    ];
                    if wide {
                        row.push(
                            n.key_since
                                .map_or("-".into(), |s| keys::age(now.saturating_sub(s))),
                        );
                        row.push(keys::rotation(n, now));
                        row.push(n.policy_applied.map_or("-".into(), |p| p.to_string()));
                    }
                    rows.push(row);
                }
                weft_meshd::table::render(&rows)
            }
        });
    };
    let me = g
        .nodes
        .iter()
        .find(|n| n.name == name)
        .with_context(|| format!("no node {name:?} in the cluster"))?;
    anyhow::ensure!(
        me.state == "accepted",
        "node {name} is {}{}",
        me.state,
        me.reason
            .as_ref()
            .map_or(String::new(), |r| format!(": {r}"))
    );
    let paths = g.paths_from(name);
    let reported_by = |peer: &str| -> String {
        let by_me = me.unreachable.iter().any(|u| u == peer);
        let by_peer = g
            .nodes
            .iter()
            .any(|n| n.name == peer && n.unreachable.iter().any(|u| u == name));
        match (by_me, by_peer) {
            (false, false) => "up".into(),
            (true, false) => format!("down (reported by {name})"),
            (false, true) => format!("down (reported by {peer})"),
            (true, true) => "down (reported by both)".into(),
        }
    };
    // How this node sends to each peer directly: the peer's endpoint or
    // another of its addresses (and those it gave up on), its address
    // behind the same NAT, a hole punched through both NATs, or why not.
    let reach_text = |peer: &str| {
        let Some(reach) = g.reach(name, peer) else {
            return "-".to_string();
        };
        let given_up = g.given_up(name, peer);
        match given_up.is_empty() {
            true => reach.to_string(),
            false => {
                let list: Vec<String> = given_up.iter().map(ToString::to_string).collect();
                format!("{reach} (gave up on {})", list.join(", "))
            }
        }
    };
    // Whether this node's link to each peer carries a post-quantum session
    // (a relayed peer's traffic crosses the relay's links, each judged on
    // its own row).
    let post_quantum = |peer: &str, hop: &Hop| -> String {
        use weft_meshd::pq::Mode;
        match &me.post_quantum {
            None => "off".into(),
            Some(_) if matches!(hop, Hop::Via(_)) => "per hop".into(),
            Some(r) if !r.missing.contains(peer) => "live".into(),
            Some(r) if r.mode == Mode::Require => "none: no traffic".into(),
            Some(_) => "none: classical".into(),
        }
    };
    Ok(match output {
        Output::Json => {
            let peers: Vec<serde_json::Value> = paths
                .iter()
                .map(|(peer, hop)| serde_json::json!({"node": peer, "path": hop_text(hop), "link": reported_by(peer), "reach": reach_text(peer), "postQuantum": post_quantum(peer, hop)}))
                .collect();
            serde_json::to_string_pretty(&serde_json::json!({"node": me, "peers": peers}))? + "\n"
        }
        Output::Table | Output::Wide => {
            let mut rows =
                vec![["PEER", "PATH", "LINK", "DIRECTLY", "POST-QUANTUM"].map(String::from)];
            for (peer, hop) in &paths {
                rows.push([
                    peer.clone(),
                    hop_text(hop),
                    reported_by(peer),
                    reach_text(peer),
                    post_quantum(peer, hop),
                ]);
            }
            weft_meshd::table::render(&rows)
        }
    })
}

/// Pods, namespaces, nodes and policies as the cluster has them now.
async fn cluster(kubeconfig: Option<&Path>) -> Result<weft_policy::Snapshot> {
    let client = client(kubeconfig).await?;
    let list = ListParams::default();
    let pods = Api::<Pod>::all(client.clone())
        .list(&list)
        .await
        .context("listing pods")?;
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&list)
        .await
        .context("listing namespaces")?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&list)
        .await
        .context("listing nodes")?;
    let policies = Api::<NetworkPolicy>::all(client.clone())
        .list(&list)
        .await
        .context("listing networkpolicies")?;
    Ok(weft_policy::Snapshot {
        policies: policies.items,
        cluster_policies: weft_meshd::cluster::cluster_policies(&client).await?,
        pods: pods.items.iter().map(PodInfo::from_pod).collect(),
        namespaces: namespaces
            .items
            .iter()
            .map(NamespaceInfo::from_namespace)
            .collect(),
        nodes: nodes
            .items
            .iter()
            .map(weft_policy::NodeInfo::from_node)
            .collect(),
    })
}

fn explain(
    kubeconfig: Option<&Path>,
    case_file: Option<&Path>,
    from: &str,
    to: &str,
    port: &str,
) -> Result<String> {
    let (port, protocol) = parse_port(port)?;
    let d = match case_file {
        Some(path) => case::explain(&case::load(path)?, from, to, protocol, port)?,
        None => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let snapshot = runtime.block_on(cluster(kubeconfig))?;
            weft_policy::explain(&snapshot, from, to, protocol, port)?
        }
    };
    let verdict = if d.allowed() { "ALLOWED" } else { "DENIED" };
    let mut out = format!(
        "{verdict}: {from} -> {to} {port}/{protocol}\n  egress from {from}: {}\n  ingress to {to}: {}\n",
        d.egress, d.ingress
    );
    for (step, side, peer) in [(&d.egress, "egress", to), (&d.ingress, "ingress", from)] {
        match &step.outcome {
            Outcome::Isolated(by) => out.push_str(&format!(
                "  to allow it: add an {side} rule to one of {} whose peers include {peer} and whose ports include {port}/{protocol}\n",
                by.join(", ")
            )),
            Outcome::Denied(rule) => out.push_str(&match rule.policy {
                PolicyRef::Cluster { tier: Tier::Baseline, .. } => format!(
                    "  to allow it: a NetworkPolicy (asked before Baseline) allowing {peer} on {port}/{protocol}, or a Baseline Accept in front of {rule}\n"
                ),
                _ => format!(
                    "  to allow it: an Admin Accept in front of {rule} whose peers include {peer}, or a Pass that hands it to NetworkPolicy\n"
                ),
            }),
            _ => {}
        }
    }
    Ok(out)
}

/// Prints a command's output, or its error (exit 2).
fn done(result: Result<String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Policy {
            action:
                PolicyCmd::Explain {
                    case,
                    from,
                    to,
                    port,
                },
        } => done(explain(
            cli.kubeconfig.as_deref(),
            case.as_deref(),
            &from,
            &to,
            &port,
        )),
        Cmd::Graph {
            format,
            max_direct,
            source,
        } => done(graph(
            cli.kubeconfig.as_deref(),
            format,
            max_direct,
            &source,
        )),
        Cmd::Keys { action } => done(keys::run(cli.kubeconfig.as_deref(), action)),
        Cmd::Peer { action } => done(peer::run(cli.kubeconfig.as_deref(), action)),
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "meshctl", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Cmd::Status {
            node,
            output,
            source,
        } => done(status(
            cli.kubeconfig.as_deref(),
            node.as_deref(),
            output,
            &source,
        )),
        Cmd::Policy {
            action: PolicyCmd::Check { cases },
        } => {
            let (mut passed, mut failed) = (0, 0);
            for path in &cases {
                match case::load(path) {
                    Ok(c) => {
                        let mismatches = case::check(&c);
                        print!("{}", case::report(&c, &mismatches));
                        if mismatches.is_empty() {
                            passed += 1;
                        } else {
                            failed += 1;
                        }
                    }
                    Err(e) => {
                        println!("FAIL {}: {e}", path.display());
                        failed += 1;
                    }
                }
            }
            println!("{passed} passed, {failed} failed");
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
