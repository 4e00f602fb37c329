//! `meshctl`: Weft's admin command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weft_policy::case;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
