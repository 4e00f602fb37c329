//! `meshctl`: Weft's admin command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weft_policy::{case, Protocol};

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
    /// and the rule (or the isolating policies) that decided it.
    Explain {
        /// A conformance case file holding the pods and policies.
        #[arg(long)]
        case: PathBuf,
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
fn parse_port(arg: &str) -> Result<(u16, Protocol), String> {
    let (port, protocol) = arg.split_once('/').unwrap_or((arg, "TCP"));
    let port = port
        .parse()
        .map_err(|_| format!("--port {arg:?}: expected PORT/PROTOCOL, e.g. 80/TCP"))?;
    let protocol = Protocol::parse(Some(&protocol.to_uppercase()))
        .map_err(|e| format!("--port {arg:?}: {e}"))?;
    Ok((port, protocol))
}

fn explain(
    case_file: &std::path::Path,
    from: &str,
    to: &str,
    port: &str,
) -> Result<String, String> {
    let (port, protocol) = parse_port(port)?;
    let c = case::load(case_file)?;
    let d = case::explain(&c, from, to, protocol, port)?;
    let verdict = if d.allowed() { "ALLOWED" } else { "DENIED" };
    Ok(format!("{verdict}: {from} -> {to} {port}/{protocol}\n  egress from {from}: {}\n  ingress to {to}: {}\n", d.egress, d.ingress))
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
        } => match explain(&case, &from, &to, &port) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshctl: {e}");
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
