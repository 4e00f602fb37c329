//! The lab's namespaces, isolation and lifecycle, with real packets.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{run_bounded, Lab, MESHLAB};

fn host_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Interface indices and names only: counters and states change on their own.
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .collect();
    names.sort();
    names.join(",")
}

fn lab_namespaces(name: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("{name}-")))
                .collect()
        })
        .unwrap_or_default()
}

fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{pid}: {cmd}"));
            }
        }
    }
    found
}

#[test]
fn nodes_reach_each_other_and_nothing_else_and_down_leaves_nothing() {
    let before = host_links();
    let lab = Lab::up("t-life", &["--nodes", "3", "--topology", "node-3=eu/eu-b"]);
    let status = lab.status();
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert_eq!(nodes[2]["labels"]["topology.kubernetes.io/zone"], "eu-b");
    assert!(nodes.iter().all(|n| n["registered"] == true));
    assert_eq!(
        nodes[0]["podCIDRs"],
        serde_json::json!(["198.19.1.0/24", "fd98:19:0:1::/64"])
    );

    // Underlay reachability between nodes, with real packets.
    let ping = lab.meshlab(&[
        "exec",
        "node-1",
        "--",
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "2",
        "198.18.1.2",
    ]);
    assert!(
        ping.status.success(),
        "node-1 cannot ping node-2: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    assert!(String::from_utf8_lossy(&ping.stdout).contains("2 received"));

    // Nothing reaches outside the lab (checked without sending anything):
    // every node's default route ends at the fabric gateway, and the fabric
    // forwards only to the lab's outside host and has no route out.
    for node in ["node-1", "node-2", "node-3"] {
        let routes = lab.ok(&["exec", node, "--", "ip", "route", "show", "default"]);
        assert_eq!(routes.trim(), "default via 198.18.0.1 dev eth0", "{node}");
    }
    let fabric = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", "t-life-fabric"])
            .args(args)
            .output()
            .unwrap()
    };
    let forwarding = fabric(&[
        "cat",
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv6/conf/all/forwarding",
    ]);
    // Both families: the fabric routes the nodes' IPv6 underlay to the
    // outside host too.
    assert_eq!(String::from_utf8_lossy(&forwarding.stdout), "1\n1\n");
    for escape in ["192.0.2.1", "2001:db8::1"] {
        assert!(
            !fabric(&["ip", "route", "get", escape]).status.success(),
            "the fabric routes {escape} out of the lab"
        );
    }
    // The lab added nothing to the host's namespace.
    assert_eq!(
        host_links(),
        before,
        "the lab changed the host's interfaces"
    );

    // The API server answers inside node namespaces at the fabric address.
    let kubectl = meshlab::lab::preflight::kubectl().expect("kubectl (run tests/setup)");
    let from_node = lab.meshlab(&[
        "exec",
        "node-2",
        "--",
        kubectl.to_str().unwrap(),
        "get",
        "nodes",
        "-o",
        "name",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&from_node.stdout).lines().count(),
        3,
        "{}",
        String::from_utf8_lossy(&from_node.stderr)
    );

    let dir = lab.dir();
    let root = lab.root.clone();
    drop(lab);
    assert!(
        lab_namespaces("t-life").is_empty(),
        "namespaces left: {:?}",
        lab_namespaces("t-life")
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!root.join("t-life.lock").exists(), "lock file left behind");
    assert!(
        processes_mentioning(dir.to_str().unwrap()).is_empty(),
        "processes left: {:?}",
        processes_mentioning(dir.to_str().unwrap())
    );
    assert_eq!(host_links(), before);
}

#[test]
fn a_running_lab_is_refused_and_a_crashed_one_is_cleaned_up() {
    let lab = Lab::up("t-crash", &["--nodes", "2"]);
    let again = lab.meshlab(&["up", "--nodes", "2"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already up"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // Crash: the API server dies hard and nobody runs `down`.
    let pid = lab.status()["apiServer"]["pid"].as_i64().unwrap();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(200));
    let status = lab.status();
    assert_eq!(status["apiServer"]["running"], false);
    let out = lab.meshlab(&["up", "--nodes", "3"]);
    assert!(
        out.status.success(),
        "up after a crash failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cleaned up an earlier run"));
    assert_eq!(lab.status()["nodes"].as_array().unwrap().len(), 3);
    // The fabric, the outside host and three nodes.
    assert_eq!(lab_namespaces("t-crash").len(), 5);
}

#[test]
fn down_without_state_still_removes_leftovers() {
    let lab = Lab::up("t-orphan", &["--nodes", "1"]);
    std::fs::remove_file(lab.dir().join("lab.json")).unwrap();
    let out = lab.ok(&["down"]);
    assert!(out.is_empty());
    assert!(lab_namespaces("t-orphan").is_empty());
    assert!(processes_mentioning(lab.dir().to_str().unwrap()).is_empty());
}

#[test]
fn clear_errors_for_bad_input_missing_tools_and_non_root() {
    let fails = |cmd: &mut Command| {
        let out = run_bounded(
            std::mem::replace(cmd, Command::new("true")),
            Duration::from_secs(30),
        );
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let meshlab = |args: &[&str]| {
        let mut c = Command::new(MESHLAB);
        c.args(["--root", "/run/meshlab-tests", "--name", "t-errors"])
            .args(args);
        c
    };
    assert!(fails(&mut meshlab(&["up", "--nodes", "0"])).contains("--nodes 0"));
    assert!(fails(&mut meshlab(&["up", "--topology", "node-7=r/z"])).contains("no node \"node-7\""));
    assert!(
        fails(Command::new(MESHLAB).args(["--name", "Bad_Name", "status"])).contains("lab name")
    );
    assert!(
        fails(meshlab(&["up"]).env("PATH", "/nonexistent")).contains("apt-get install iproute2")
    );
    let nobody = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        MESHLAB,
        "--root",
        "/tmp/meshlab-nobody",
        "up",
    ];
    assert!(fails(Command::new("setpriv").args(nobody)).contains("must run as root"));
    assert!(!Path::new("/run/meshlab-tests/t-errors").exists());
}

/// The containers of the DaemonSet in `manifests` as the YAML declares them:
/// `(name, command + args, env names)`.
fn declared_containers(manifests: &Path) -> Vec<(String, Vec<String>, Vec<String>)> {
    let text = std::fs::read_to_string(manifests.join("base/daemonset.yaml")).unwrap();
    let ds: serde_json::Value = serde_norway::from_str(&text).unwrap();
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let strings = |v: &serde_json::Value| -> Vec<String> {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect()
            };
            let mut argv = strings(&c["command"]);
            argv.extend(strings(&c["args"]));
            let env = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e["name"].as_str().unwrap().to_string())
                .collect();
            (c["name"].as_str().unwrap().to_string(), argv, env)
        })
        .collect()
}

fn proc_strings(pid: i64, file: &str) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/{file}"))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Whether `running` is `declared` with its host paths under `root`
/// (`--flag=/x` runs as `--flag=<root>/x`) and the image's binaries from
/// the build (`/usr/local/bin/meshd` runs as `…/target/…/meshd`).
fn same_argument(running: &str, declared: &str, root: &Path) -> bool {
    if running == declared {
        return true;
    }
    if let Some(binary) = declared.strip_prefix("/usr/local/bin/") {
        return running.ends_with(&format!("/{binary}"));
    }
    match declared.split_once("=/") {
        Some((flag, path)) => running == format!("{flag}={}/{path}", root.display()),
        None => false,
    }
}

#[test]
fn every_node_runs_exactly_the_daemonsets_containers() {
    // A copy of deploy/ with one flag changed: the lab must run the change.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let copy = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(repo.join("deploy/."))
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(status.success());
    let ds = copy.path().join("base/daemonset.yaml");
    let text = std::fs::read_to_string(&ds).unwrap();
    let changed = text.replacen(
        "        - --metrics-addr=",
        "        - --log-policy-drops=7\n        - --metrics-addr=",
        1,
    );
    assert_ne!(text, changed, "the manifest's meshd args moved");
    std::fs::write(&ds, changed).unwrap();

    let manifests = copy.path().to_str().unwrap();
    let lab = Lab::up("t-manifest", &["--nodes", "2", "--manifests", manifests]);
    let declared = declared_containers(copy.path());
    let status = lab.status();
    for node in ["node-1", "node-2"] {
        let root = lab.dir().join(node).join("root");
        for (name, argv, env) in &declared {
            let pid: i64 =
                std::fs::read_to_string(lab.dir().join(node).join(format!("{name}.pid")))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
            // `ip netns exec NETNS` execs the container's command in place.
            let running = proc_strings(pid, "cmdline");
            assert_eq!(
                running.len(),
                argv.len(),
                "{node}/{name}: {running:?} vs {argv:?}"
            );
            for (r, d) in running.iter().zip(argv) {
                assert!(
                    same_argument(r, d, &root),
                    "{node}/{name}: runs {r:?}, the manifest says {d:?}"
                );
            }
            let environ = proc_strings(pid, "environ");
            for e in env {
                assert!(
                    environ.iter().any(|kv| kv.starts_with(&format!("{e}="))),
                    "{node}/{name}: no {e} in {environ:?}"
                );
            }
        }
        assert!(
            proc_strings(
                common::node(&status, node)["meshd"]["pid"]
                    .as_i64()
                    .unwrap(),
                "cmdline"
            )
            .contains(&"--log-policy-drops=7".to_string()),
            "the changed flag is not what {node} runs"
        );
    }
    // The install's objects are in the API server, the lab's values in the
    // ConfigMap.
    let resync = lab.kubectl(&[
        "get",
        "configmap",
        "-n",
        "weft-system",
        "weft-config",
        "-o",
        "jsonpath={.data.WEFT_RESYNC}",
    ]);
    assert_eq!(resync.trim(), "10");
    for kind in ["daemonset/weft", "serviceaccount/meshd"] {
        lab.kubectl(&["get", "-n", "weft-system", kind]);
    }
}

/// `link cut` drops the underlay between exactly two nodes, both ways, and
/// `link restore` lets it through again.
#[test]
fn a_cut_link_drops_the_underlay_between_two_nodes_only() {
    let lab = Lab::up("t-link", &["--nodes", "3"]);
    let underlay = |k: u8| format!("198.18.1.{k}");
    lab.ok(&["link", "cut", "node-3", "node-1"]);
    assert_eq!(lab.ok(&["link", "list"]), "node-1 node-3\n");
    assert!(
        !lab.reaches("node-1", &underlay(3)),
        "node-1 still reaches node-3"
    );
    assert!(
        !lab.reaches("node-3", &underlay(1)),
        "node-3 still reaches node-1"
    );
    for (from, to) in [("node-1", 2), ("node-2", 3), ("node-3", 2), ("node-2", 1)] {
        assert!(lab.reaches(from, &underlay(to)), "{from} lost node-{to}");
    }
    for (a, b, says) in [
        ("node-1", "node-1", "two different nodes"),
        ("node-1", "node-9", "no node \"node-9\""),
    ] {
        let out = lab.meshlab(&["link", "cut", a, b]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{a} {b}: {err}"
        );
    }
    lab.ok(&["link", "restore", "node-1", "node-3"]);
    assert_eq!(lab.ok(&["link", "list"]), "");
    assert!(lab.reaches("node-1", &underlay(3)));
    assert!(lab.reaches("node-3", &underlay(1)));
}
