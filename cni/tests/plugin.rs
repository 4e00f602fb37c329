//! The `weft` binary driven as a runtime drives it: environment variables,
//! configuration on stdin, results on stdout, in network namespaces made
//! here. Needs root.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

const WEFT: &str = env!("CARGO_BIN_EXE_weft");

/// A node namespace with its state and address store, and pod namespaces;
/// all removed on drop, also after a failed assertion or an earlier crash.
struct Sandbox {
    node: String,
    pods: Vec<String>,
    dir: tempfile::TempDir,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Sandbox {
    fn new(name: &str, blocks: &[&str]) -> Sandbox {
        let node = format!("cnit-{name}");
        clean(&node);
        ip(&["netns", "add", &node]);
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        let dir = tempfile::tempdir().unwrap();
        let sb = Sandbox {
            node,
            pods: Vec::new(),
            dir,
        };
        if !blocks.is_empty() {
            sb.publish_node(blocks);
            sb.publish_policy("loaded");
        }
        sb
    }

    fn state(&self) -> std::path::PathBuf {
        self.dir.path().join("node.json")
    }

    /// Writes the node state as meshd does after a mesh sync.
    fn publish_node(&self, blocks: &[&str]) {
        std::fs::write(
            self.state(),
            json!({"version": 1, "podCIDRs": blocks, "mtu": 1420}).to_string(),
        )
        .unwrap();
    }

    /// Writes the policy state as meshd's policy engine does.
    fn publish_policy(&self, enforcement: &str) {
        std::fs::write(
            self.dir.path().join("policy.json"),
            json!({"version": 1, "enforcement": enforcement, "reason": "the engine said so"})
                .to_string(),
        )
        .unwrap();
    }

    fn pod(&mut self, i: usize) -> String {
        let name = format!("{}-p{i}", self.node);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        self.pods.push(name.clone());
        format!("/run/netns/{name}")
    }

    fn conf(&self, version: &str) -> Value {
        json!({"cniVersion": version, "name": "weft", "type": "weft",
               "stateFile": self.state(), "ipamDir": self.dir.path().join("ipam")})
    }

    /// Runs the plugin in the node namespace; returns (success, stdout JSON or Null).
    fn run(&self, command: &str, container: &str, netns: &str, conf: &Value) -> (bool, Value) {
        self.run_raw(
            command,
            &[
                ("CNI_CONTAINERID", container),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", "eth0"),
            ],
            conf.to_string().as_bytes(),
        )
    }

    fn run_raw(&self, command: &str, env: &[(&str, &str)], stdin: &[u8]) -> (bool, Value) {
        self.run_plugin(WEFT, command, env, stdin)
    }

    /// Runs any plugin binary in the node namespace.
    fn run_plugin(
        &self,
        binary: &str,
        command: &str,
        env: &[(&str, &str)],
        stdin: &[u8],
    ) -> (bool, Value) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node, binary])
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", "/usr/lib/cni")
            // Runtimes pass their PATH on; portmap runs iptables from it.
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
        };
        (out.status.success(), value)
    }

    fn node_links(&self) -> String {
        String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-n", &self.node, "-o", "link"])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned()
    }

    fn pings(&self, target: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.node, "ping", "-c1", "-W1", target])
            .output()
            .unwrap()
            .status
            .success()
    }
}

fn clean(node: &str) {
    let list = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if ns == node || ns.starts_with(&format!("{node}-p")) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        clean(&self.node);
    }
}

#[test]
fn add_check_del_in_every_supported_version() {
    let mut sb = Sandbox::new("versions", &["198.19.1.0/24", "fd98:19:0:1::/64"]);
    for (i, version) in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let netns = sb.pod(i);
        let container = format!("ctr{i}");
        let mut conf = sb.conf(version);
        let (ok, result) = sb.run("ADD", &container, &netns, &conf);
        assert!(ok, "ADD {version}: {result}");
        assert_eq!(result["cniVersion"], *version);
        let ips = result["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 2, "dual stack");
        assert_eq!(
            ips[0].get("version").is_some(),
            version.starts_with("0."),
            "{version}: {result}"
        );
        assert_eq!(result["interfaces"][1]["sandbox"], netns.as_str());
        assert_eq!(
            result["interfaces"][1].get("mtu").is_some(),
            *version == "1.1.0"
        );
        let pod_ip = ips[0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        assert!(
            sb.pings(&pod_ip),
            "{version}: the node cannot reach its pod {pod_ip}"
        );
        conf["prevResult"] = result.clone();
        let (ok, out) = sb.run("CHECK", &container, &netns, &conf);
        assert!(ok, "CHECK {version}: {out}");
        let (ok, out) = sb.run("DEL", &container, &netns, &conf);
        assert!(ok && out.is_null(), "DEL {version}: {out}");
        let (ok, _) = sb.run("DEL", &container, &netns, &conf);
        assert!(ok, "DEL twice must succeed");
        assert!(!sb.pings(&pod_ip));
        // CHECK after DEL fails with the plugin's code.
        let (ok, err) = sb.run("CHECK", &container, &netns, &conf);
        assert!(!ok && err["code"] == 100, "{err}");
    }
    assert!(
        !sb.node_links().contains("wp"),
        "veths left: {}",
        sb.node_links()
    );
}

#[test]
fn version_status_and_gc() {
    let mut sb = Sandbox::new("status", &[]);
    let (ok, v) = sb.run_raw("VERSION", &[], br#"{"cniVersion":"1.0.0"}"#);
    assert!(ok);
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("1.0.0")));
    let conf = sb.conf("1.0.0");
    let (ok, err) = sb.run_raw("STATUS", &[], conf.to_string().as_bytes());
    assert!(
        !ok && err["code"] == 50,
        "STATUS before meshd wrote state: {err}"
    );
    let netns = sb.pod(0);
    let (ok, err) = sb.run("ADD", "early", &netns, &conf);
    assert!(
        !ok && err["code"] == 11,
        "ADD before meshd wrote state: {err}"
    );

    // The mesh is made, but NetworkPolicy is not enforced yet, then broken.
    sb.publish_node(&["198.19.2.0/24"]);
    for (enforcement, says) in [
        (None, "not loaded on this node yet"),
        (
            Some("pending"),
            "not loaded on this node yet: the engine said so",
        ),
        (Some("broken"), "broken on this node: the engine said so"),
    ] {
        if let Some(e) = enforcement {
            sb.publish_policy(e);
        }
        let (ok, err) = sb.run_raw("STATUS", &[], conf.to_string().as_bytes());
        assert!(
            !ok && err["code"] == 50,
            "STATUS, policy {enforcement:?}: {err}"
        );
        let (ok, err) = sb.run("ADD", "early", &netns, &conf);
        assert!(
            !ok && err["code"] == 11,
            "ADD, policy {enforcement:?}: {err}"
        );
        let msg = err["msg"].as_str().unwrap();
        assert!(
            msg.starts_with("NetworkPolicy enforcement is ") && msg.contains(says),
            "{msg}"
        );
    }
    sb.publish_policy("loaded");
    assert!(sb.run_raw("STATUS", &[], conf.to_string().as_bytes()).0);
    for i in 0..3 {
        let netns = sb.pod(i + 1);
        assert!(sb.run("ADD", &format!("g{i}"), &netns, &conf).0);
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "g1", "ifname": "eth0"}]);
    let (ok, out) = sb.run_raw("GC", &[], gc.to_string().as_bytes());
    assert!(ok, "GC: {out}");
    assert_eq!(
        sb.node_links().matches(" wp").count(),
        1,
        "GC keeps exactly the valid attachment's veth: {}",
        sb.node_links()
    );
    let held: Value = serde_json::from_slice(
        &std::fs::read(sb.dir.path().join("ipam/allocations.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(held["held"].as_object().unwrap().len(), 1);
}

#[test]
fn bad_input_gets_spec_errors_and_leaks_nothing() {
    let mut sb = Sandbox::new("bad", &["198.19.3.0/29"]); // 5 usable addresses
    let netns = sb.pod(0);
    let env = [
        ("CNI_CONTAINERID", "x"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (ok, err) = sb.run_raw("ADD", &env, b"{not json");
    assert!(!ok && err["code"] == 6, "{err}");
    let (ok, err) = sb.run_raw("ADD", &env[..1], sb.conf("1.0.0").to_string().as_bytes());
    assert!(
        !ok && err["code"] == 4 && err["msg"].as_str().unwrap().contains("CNI_NETNS"),
        "{err}"
    );
    let (ok, err) = sb.run_raw("ADD", &env, sb.conf("7.0.0").to_string().as_bytes());
    assert!(!ok && err["code"] == 1, "{err}");
    let mut bad_mtu = sb.conf("1.0.0");
    bad_mtu["mtu"] = json!("big");
    let (ok, err) = sb.run_raw("ADD", &env, bad_mtu.to_string().as_bytes());
    assert!(
        !ok && err["code"] == 7 && err["msg"].as_str().unwrap().contains("mtu"),
        "{err}"
    );
    let (ok, err) = sb.run("ADD", "x", "/run/netns/does-not-exist", &sb.conf("1.0.0"));
    assert!(!ok && err["code"] == 4, "{err}");
    // Exhaustion: five pods fit, the sixth is told to try again; nothing half-made stays.
    let conf = sb.conf("1.0.0");
    for i in 0..5 {
        let netns = sb.pod(i + 1);
        assert!(sb.run("ADD", &format!("e{i}"), &netns, &conf).0);
    }
    let netns = sb.pod(9);
    let (ok, err) = sb.run("ADD", "e9", &netns, &conf);
    assert!(
        !ok && err["code"] == 11 && err["msg"].as_str().unwrap().contains("198.19.3.0/29"),
        "{err}"
    );
    assert_eq!(
        sb.node_links().matches(" wp").count(),
        5,
        "a failed ADD left a veth"
    );
}

#[test]
fn a_hundred_parallel_adds_get_distinct_addresses() {
    let mut sb = Sandbox::new("parallel", &["198.19.4.0/24", "fd98:19:0:4::/64"]);
    let netns: Vec<String> = (0..100).map(|i| sb.pod(i)).collect();
    let conf = sb.conf("1.0.0");
    let sb = std::sync::Arc::new(sb);
    let threads: Vec<_> = netns
        .into_iter()
        .enumerate()
        .map(|(i, ns)| {
            let (sb, conf) = (sb.clone(), conf.clone());
            std::thread::spawn(move || sb.run("ADD", &format!("par{i}"), &ns, &conf))
        })
        .collect();
    let mut addresses = std::collections::BTreeSet::new();
    for t in threads {
        let (ok, result) = t.join().unwrap();
        assert!(ok, "{result}");
        for ip in result["ips"].as_array().unwrap() {
            assert!(
                addresses.insert(ip["address"].as_str().unwrap().to_string()),
                "handed out twice: {ip}"
            );
        }
    }
    assert_eq!(addresses.len(), 200);
}

#[test]
fn sigkill_mid_add_leaves_nothing_gc_cannot_reclaim() {
    let mut sb = Sandbox::new("kill", &["198.19.5.0/24"]);
    let conf = sb.conf("1.0.0");
    for i in 0..20 {
        let netns = sb.pod(i);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &sb.node, WEFT])
            .env_clear()
            .envs([
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", &format!("k{i}")),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        // Kill at a different point each time (0-14 ms into the ADD).
        std::thread::sleep(Duration::from_micros(750 * (i as u64 % 20)));
        let _ = child.kill();
        let _ = child.wait();
    }
    // The runtime knows none of them: GC reclaims every address and veth.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    let (ok, out) = sb.run_raw("GC", &[], gc.to_string().as_bytes());
    assert!(ok, "GC: {out}");
    assert!(
        !sb.node_links().contains(" wp"),
        "veths survived GC: {}",
        sb.node_links()
    );
    let path = sb.dir.path().join("ipam/allocations.json");
    if path.exists() {
        let held: Value = serde_json::from_slice(&std::fs::read(path).unwrap())
            .expect("the store is never half-written");
        assert!(held["held"].as_object().unwrap().is_empty(), "{held}");
    }
    // And the node still works.
    let netns = sb.pod(99);
    assert!(sb.run("ADD", "after", &netns, &conf).0);
}

#[test]
fn chains_with_debian_portmap() {
    let mut sb = Sandbox::new("portmap", &["198.19.6.0/24"]);
    let pod = sb.pod(0);
    let pod_ns = pod.trim_start_matches("/run/netns/").to_string();
    // A client machine wired to the node; the node forwards (meshd's job in production).
    let client = format!("{}-pclient", sb.node);
    ip(&["netns", "add", &client]);
    ip(&[
        "-n", &sb.node, "link", "add", "cl0", "type", "veth", "peer", "name", "cl1", "netns",
        &client,
    ]);
    ip(&["-n", &sb.node, "addr", "add", "198.18.9.1/24", "dev", "cl0"]);
    ip(&["-n", &sb.node, "link", "set", "cl0", "up"]);
    ip(&["-n", &client, "addr", "add", "198.18.9.2/24", "dev", "cl1"]);
    ip(&["-n", &client, "link", "set", "cl1", "up"]);
    let forward = Command::new("ip")
        .args([
            "netns",
            "exec",
            &sb.node,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
        .status()
        .unwrap();
    assert!(forward.success());

    let conf = sb.conf("1.0.0");
    let (ok, result) = sb.run("ADD", "pm", &pod, &conf);
    assert!(ok, "{result}");
    let serve = "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                 s.bind(('0.0.0.0',8080))\ns.listen(1)\ns.settimeout(20)\nc,_=s.accept()\nc.sendall(b'weft-pod')\nc.close()";
    let mut server = Command::new("ip")
        .args(["netns", "exec", &pod_ns, "/usr/bin/python3", "-c", serve])
        .spawn()
        .unwrap();
    let portmap = json!({"cniVersion": "1.0.0", "name": "weft", "type": "portmap", "capabilities": {"portMappings": true},
                         "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]},
                         "prevResult": result.clone()});
    let env = [
        ("CNI_CONTAINERID", "pm"),
        ("CNI_NETNS", pod.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (ok, chained) = sb.run_plugin(
        "/usr/lib/cni/portmap",
        "ADD",
        &env,
        portmap.to_string().as_bytes(),
    );
    assert!(ok, "portmap rejected weft's result: {chained}");
    assert_eq!(
        chained["ips"], result["ips"],
        "portmap passes weft's result on"
    );
    std::thread::sleep(Duration::from_millis(300));
    let connect = "import socket\ns=socket.create_connection(('198.18.9.1',18080),timeout=5)\nprint(s.recv(100).decode())";
    let reply = Command::new("ip")
        .args(["netns", "exec", &client, "/usr/bin/python3", "-c", connect])
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        String::from_utf8_lossy(&reply.stdout).trim(),
        "weft-pod",
        "hostPort did not reach the pod: {}",
        String::from_utf8_lossy(&reply.stderr)
    );
    let (ok, out) = sb.run_plugin(
        "/usr/lib/cni/portmap",
        "DEL",
        &env,
        portmap.to_string().as_bytes(),
    );
    assert!(ok, "portmap DEL: {out}");
    let mut del = conf.clone();
    del["prevResult"] = result;
    assert!(sb.run("DEL", "pm", &pod, &del).0);
}

#[test]
fn chains_with_debian_bandwidth() {
    let mut sb = Sandbox::new("bandwidth", &["198.19.7.0/24", "fd98:19:0:7::/64"]);
    let pod = sb.pod(0);
    let conf = sb.conf("1.0.0");
    let (ok, result) = sb.run("ADD", "bw", &pod, &conf);
    assert!(ok, "{result}");
    let host_veth = result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let limits = json!({"ingressRate": 8_000_000, "ingressBurst": 65536, "egressRate": 4_000_000, "egressBurst": 65536});
    let bandwidth = json!({"cniVersion": "1.0.0", "name": "weft", "type": "bandwidth", "capabilities": {"bandwidth": true},
                           "runtimeConfig": {"bandwidth": limits}, "prevResult": result.clone()});
    let env = [
        ("CNI_CONTAINERID", "bw"),
        ("CNI_NETNS", pod.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (ok, chained) = sb.run_plugin(
        "/usr/lib/cni/bandwidth",
        "ADD",
        &env,
        bandwidth.to_string().as_bytes(),
    );
    assert!(ok, "bandwidth rejected weft's result: {chained}");
    let qdiscs = String::from_utf8_lossy(
        &Command::new("tc")
            .args(["-n", &sb.node, "qdisc", "show", "dev", &host_veth])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        qdiscs.contains("tbf") && qdiscs.contains("8Mbit"),
        "no 8 Mbit/s shaping towards the pod on {host_veth}: {qdiscs}"
    );
    assert!(
        qdiscs.contains("ingress"),
        "no ingress hook for the pod's egress limit: {qdiscs}"
    );
    let (ok, out) = sb.run_plugin(
        "/usr/lib/cni/bandwidth",
        "DEL",
        &env,
        bandwidth.to_string().as_bytes(),
    );
    assert!(ok, "bandwidth DEL: {out}");
    let mut del = conf.clone();
    del["prevResult"] = result;
    assert!(sb.run("DEL", "bw", &pod, &del).0);
    assert!(!sb.node_links().contains(" wp"), "{}", sb.node_links());
}
