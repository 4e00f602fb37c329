//! `weft`: the CNI plugin binary the container runtime executes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitCode;

use weft_cni::config::answer_version;
use weft_cni::plugin;
use weft_cni::spec::{CniError, Code, Env};

fn main() -> ExitCode {
    let vars: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin).map_err(|e| {
        CniError::new(
            Code::Io,
            format!("reading the network configuration from stdin: {e}"),
        )
    });
    let outcome = read
        .and_then(|_| Env::from_vars(&vars))
        .and_then(|env| plugin::run(&env, &stdin));
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(result)) => {
            let _ = writeln!(out, "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&answer_version(&stdin)));
            ExitCode::FAILURE
        }
    }
}
