//! The container image: deploy/image/build makes it from the Containerfile
//! with podman, and a lab whose nodes run the DaemonSet's containers from it
//! (`meshlab up --runtime podman`) meshes and carries pod traffic.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{run_bounded, Lab};

fn podman(args: &[&str]) -> String {
    let mut cmd = Command::new("podman");
    cmd.args(args);
    let out = run_bounded(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_image_builds_and_a_podman_lab_carries_pod_traffic() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Offline: the base from this machine's Debian source (tests/setup
    // installs podman and mmdebstrap); the dev build the suite just made.
    let mut build = Command::new("bash");
    build
        .arg(repo.join("deploy/image/build"))
        .args(["--profile", "dev", "--base-from-debian"]);
    let out = run_bounded(build, Duration::from_secs(900));
    assert!(
        out.status.success(),
        "deploy/image/build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        image,
        format!("localhost/weft:{}", env!("CARGO_PKG_VERSION"))
    );
    // What the image holds: the three binaries and nft, nothing to fetch.
    let run = |entrypoint: &str, arg: &str| {
        podman(&[
            "run",
            "--rm",
            "--network=none",
            "--ulimit=nofile=1024:1024",
            "--ulimit=nproc=1024:1024",
            "--entrypoint",
            entrypoint,
            &image,
            arg,
        ])
    };
    assert!(run("nft", "--version").starts_with("nftables"));
    for bin in ["meshd", "meshctl", "weft"] {
        run("ls", &format!("/usr/local/bin/{bin}"));
    }
    for plugin in weft_meshd::cni::REFERENCE_PLUGINS {
        run("ls", &format!("/usr/lib/cni/{plugin}"));
    }

    let lab = Lab::up(
        "t-podman",
        &[
            "--nodes",
            "2",
            "--runtime",
            "podman",
            "--pods-per-node",
            "1",
        ],
    );
    // Every container of the DaemonSet runs from the image.
    let label = format!("label=dev.weft.meshlab={}", lab.dir().display());
    let listed = podman(&[
        "ps",
        "--filter",
        &label,
        "--format",
        "{{.Names}} {{.Image}}",
    ]);
    let mut running: Vec<&str> = listed.lines().collect();
    running.sort();
    assert_eq!(
        running,
        [
            format!("t-podman-node-1-dataplane {image}"),
            format!("t-podman-node-1-meshd {image}"),
            format!("t-podman-node-2-dataplane {image}"),
            format!("t-podman-node-2-meshd {image}"),
        ]
    );
    // The init container installed the image's plugin (static: it runs on
    // the host) and the reference plugins on each node.
    for node in ["node-1", "node-2"] {
        let bin = lab.dir().join(node).join("root/opt/cni/bin");
        let weft = std::fs::read(bin.join("weft")).unwrap();
        assert_eq!(
            weft_meshd::elf::linking(&weft),
            Ok(weft_meshd::elf::Linking::Static)
        );
        for plugin in weft_meshd::cni::REFERENCE_PLUGINS {
            assert!(bin.join(plugin).is_file(), "{node} lacks {plugin}");
        }
    }
    // Pod traffic both ways, both families.
    let pods = lab.pods();
    assert_eq!(pods.len(), 2, "{pods:?}");
    for (from, to) in [(&pods[0], &pods[1]), (&pods[1], &pods[0])] {
        for ip in &to.2 {
            let out = lab.meshlab(&[
                "pod", "exec", &from.0, "--", "ping", "-n", "-c", "2", "-W", "2", ip,
            ]);
            assert!(
                out.status.success(),
                "{} cannot reach {} at {ip}",
                from.0,
                to.0
            );
        }
    }
    drop(lab);
    // Teardown removed the containers.
    assert_eq!(podman(&["ps", "--all", "--quiet", "--filter", &label]), "");
}
