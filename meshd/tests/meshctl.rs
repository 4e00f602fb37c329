//! meshctl as an admin meets it before any cluster: shell completion and
//! errors that name what is wrong.

use std::process::{Command, Output};

fn meshctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .output()
        .expect("meshctl runs")
}

#[test]
fn completion_covers_every_command_and_flag() {
    for shell in ["bash", "zsh", "fish"] {
        let out = meshctl(&["completion", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for word in [
            "status",
            "graph",
            "policy",
            "keys",
            "rotate",
            "revoke",
            "kubeconfig",
            "format",
        ] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = meshctl(&["completion", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'tcsh' for '<SHELL>'"));
}

#[test]
fn bad_arguments_name_the_flag() {
    for (args, names) in [
        (
            &["--kubeconfig", "/nonexistent/kubeconfig", "status"][..],
            "--kubeconfig /nonexistent/kubeconfig",
        ),
        (
            &["graph", "--format", "png"][..],
            "invalid value 'png' for '--format <FORMAT>'",
        ),
        (
            &["status", "-o", "yaml"][..],
            "invalid value 'yaml' for '--output <OUTPUT>'",
        ),
        (
            &["keys", "status", "-o", "yaml"][..],
            "invalid value 'yaml' for '--output <OUTPUT>'",
        ),
        (&["keys", "rotate"][..], "<NODES|--all|--peer <PEER>>"),
        (&["keys", "revoke"][..], "<NODE|--peer <PEER>>"),
        (
            &["peer", "add", "laptop", "--reach", "pods"][..],
            "invalid value 'pods' for '--reach <REACH>'",
        ),
        (
            &["peer", "config", "laptop", "-o", "ini"][..],
            "invalid value 'ini' for '--output <OUTPUT>'",
        ),
        (
            &["keys", "rotate", "node-1", "--all"][..],
            "'[NODES]...' cannot be used with '--all'",
        ),
        (
            &["keys", "rotate", "--all", "--timeout", "soon"][..],
            "invalid value 'soon' for '--timeout <TIMEOUT>'",
        ),
        (
            &["keys", "rotate", "--all", "--parallel", "0"][..],
            "invalid value '0' for '--parallel <PARALLEL>'",
        ),
        (
            &["keys", "rotate", "node-1", "--parallel", "2"][..],
            "'[NODES]...' cannot be used with '--parallel <PARALLEL>'",
        ),
        (
            &["keys", "revoke", "n", "--revoked-keys", "nons"][..],
            "--revoked-keys \"nons\": expected NAMESPACE/NAME",
        ),
    ] {
        let out = meshctl(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(names), "{args:?}: {err}");
    }
}
