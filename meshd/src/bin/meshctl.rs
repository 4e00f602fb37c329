//! `meshctl`: Weft's admin command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ListParams};
use weft_policy::{case, NamespaceInfo, PodInfo, Protocol, Step};

#[derive(Parser)]
#[command(version, about = "Weft's admin command line")]
struct Cli {
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

/// Pods, namespaces and policies as the cluster has them now.
async fn cluster() -> Result<(Vec<NetworkPolicy>, Vec<PodInfo>, Vec<NamespaceInfo>)> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the cluster (KUBECONFIG?)")?;
    let list = ListParams::default();
    let pods = Api::<Pod>::all(client.clone())
        .list(&list)
        .await
        .context("listing pods")?;
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&list)
        .await
        .context("listing namespaces")?;
    let policies = Api::<NetworkPolicy>::all(client)
        .list(&list)
        .await
        .context("listing networkpolicies")?;
    Ok((
        policies.items,
        pods.items.iter().map(PodInfo::from_pod).collect(),
        namespaces
            .items
            .iter()
            .map(NamespaceInfo::from_namespace)
            .collect(),
    ))
}

fn explain(case_file: Option<&Path>, from: &str, to: &str, port: &str) -> Result<String> {
    let (port, protocol) = parse_port(port)?;
    let d = match case_file {
        Some(path) => case::explain(&case::load(path)?, from, to, protocol, port)?,
        None => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (policies, pods, namespaces) = runtime.block_on(cluster())?;
            weft_policy::explain(&policies, &pods, &namespaces, from, to, protocol, port)?
        }
    };
    let verdict = if d.allowed() { "ALLOWED" } else { "DENIED" };
    let mut out = format!(
        "{verdict}: {from} -> {to} {port}/{protocol}\n  egress from {from}: {}\n  ingress to {to}: {}\n",
        d.egress, d.ingress
    );
    for (step, side, peer) in [(&d.egress, "egress", to), (&d.ingress, "ingress", from)] {
        if let Step::Denied(by) = step {
            out.push_str(&format!(
                "  to allow it: add an {side} rule to one of {} whose peers include {peer} and whose ports include {port}/{protocol}\n",
                by.join(", ")
            ));
        }
    }
    Ok(out)
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
        } => match explain(case.as_deref(), &from, &to, &port) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshctl: {e:#}");
                ExitCode::from(2)
            }
        },
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
