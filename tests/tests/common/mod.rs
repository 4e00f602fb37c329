//! Helpers for end-to-end tests on a real lab. Each test uses its own lab
//! name, so tests run in parallel and a crashed run's leftovers are cleared
//! by the next `up` of the same name.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::Value;
use weft_keys::{PrivateKey, ProofSubject};
use weft_meshd::model::{ClusterRanges, Ranges};
use weft_meshd::planner::mesh_address_of;

pub const MESHLAB: &str = env!("CARGO_BIN_EXE_meshlab");

/// Short lab timers (keepalive 1 s, peer timeout 5 s), so links settle
/// and fail over in seconds.
pub const FAST: [&str; 4] = [
    "--config",
    "WEFT_PERSISTENT_KEEPALIVE=1",
    "--config",
    "WEFT_PEER_TIMEOUT=5",
];

/// How a lab in meshlab's guest reports its nodes' data planes.
pub const DATA_PLANES_MARKER: &str = "lab data planes: ";

/// A lab that is torn down when dropped, even if the test panicked.
pub struct Lab {
    pub name: String,
    pub root: PathBuf,
    /// Whether nodes' host traffic to each other crosses WireGuard (the
    /// lab's default): the sentinel's host counter must then stay 0.
    pub host_encrypted: bool,
}

impl Lab {
    /// `meshlab up` with extra arguments; panics with meshlab's output on failure.
    pub fn up(name: &str, args: &[&str]) -> Lab {
        assert!(
            nix_is_root(),
            "end-to-end lab tests need root (network namespaces)"
        );
        let lab = Lab {
            name: name.to_string(),
            root: PathBuf::from("/run/meshlab-tests"),
            host_encrypted: !args.contains(&"WEFT_ENCRYPT_HOST=false"),
        };
        let out = lab.meshlab(&[&["up"], args].concat());
        assert!(
            out.status.success(),
            "meshlab up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if meshlab::vm::in_guest() {
            // What kernel::the_kernel_path_passes_in_a_vm checks: these
            // tests met kernel links, not a fallback.
            let status = lab.status();
            let kinds: Vec<String> = status["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n["name"].as_str())
                .map(|n| format!("{n}={}", link_kind(&lab, n)))
                .collect();
            eprintln!("{DATA_PLANES_MARKER}{}", kinds.join(" "));
        }
        lab
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(MESHLAB);
        c.arg("--root")
            .arg(&self.root)
            .arg("--name")
            .arg(&self.name)
            .args(args);
        c
    }

    /// Runs meshlab with a bounded wait, so a hung command fails the test
    /// instead of hanging it.
    pub fn meshlab(&self, args: &[&str]) -> Output {
        run_bounded(self.command(args), Duration::from_secs(60))
    }

    /// Runs meshlab and returns stdout, panicking with stderr on failure.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.meshlab(args);
        assert!(
            out.status.success(),
            "meshlab {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Frames the fabric's plaintext sentinel has counted so far (read
    /// straight from the fabric, so it works whatever else is broken).
    pub fn plaintext(&self) -> Option<u64> {
        meshlab::lab::sentinel::count(&format!("{}-fabric", self.name))
            .ok()
            .map(|c| c.packets)
    }

    /// Merges `status` into Pod `namespace/name`'s status subresource (as
    /// kubelet reports it), through the lab's own client; returns the new
    /// resourceVersion.
    pub fn patch_pod_status(&self, namespace: &str, name: &str, status: &serde_json::Value) -> u64 {
        use k8s_openapi::api::core::v1::Pod;
        use kube::api::{Api, Patch, PatchParams};
        let dir = meshlab::lab::state::LabDir::new(&self.root, &self.name);
        let patch = serde_json::json!({ "status": status });
        let pod = meshlab::lab::client::block_on(&dir, |client| async move {
            let pods: Api<Pod> = Api::namespaced(client, namespace);
            Ok(pods
                .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
                .await?)
        })
        .unwrap_or_else(|e| panic!("patching {namespace}/{name}'s status: {e:#}"));
        pod.metadata
            .resource_version
            .and_then(|v| v.parse().ok())
            .expect("a numeric resourceVersion")
    }

    /// Registers a running Pod on `node` with `ips`, as kubelet does for a
    /// sandbox it started; returns the resourceVersion of its status.
    pub fn register_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        labels: &serde_json::Value,
        ips: &[String],
    ) -> u64 {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        });
        let path = self.dir().join(format!("pod-{namespace}-{name}.json"));
        std::fs::write(&path, pod.to_string()).unwrap();
        self.ok(&["kubectl", "--", "create", "-f", path.to_str().unwrap()]);
        let pod_ips: Vec<serde_json::Value> =
            ips.iter().map(|ip| serde_json::json!({"ip": ip})).collect();
        self.patch_pod_status(
            namespace,
            name,
            &serde_json::json!({"phase": "Running", "podIP": ips.first(), "podIPs": pod_ips}),
        )
    }

    /// Frames of node-to-node host traffic outside WireGuard the sentinel
    /// has counted so far.
    pub fn host_plaintext(&self) -> Option<u64> {
        meshlab::lab::sentinel::count_host(&format!("{}-fabric", self.name))
            .ok()
            .map(|c| c.packets)
    }

    /// Zeroes the sentinel's host counter, for host traffic that is
    /// plaintext by design (an address not believed).
    pub fn reset_host_plaintext(&self) {
        meshlab::lab::sentinel::reset_host(&format!("{}-fabric", self.name))
            .expect("resetting the sentinel's host counter");
    }

    /// Zeroes the sentinel, for a test that provoked a leak on purpose.
    pub fn reset_plaintext(&self) {
        meshlab::lab::sentinel::reset(&format!("{}-fabric", self.name))
            .expect("resetting the plaintext sentinel");
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json is JSON")
    }

    /// `meshlab kubectl -- ARGS` (Debian's kubectl against the lab); stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.ok(&[&["kubectl", "--"], args].concat())
    }

    /// Meshd's Events (events.k8s.io, in `weft-system`).
    pub fn events(&self) -> Vec<serde_json::Value> {
        let events: serde_json::Value = serde_json::from_str(&self.ok(&[
            "kubectl",
            "--",
            "get",
            "--raw",
            "/apis/events.k8s.io/v1/namespaces/weft-system/events",
        ]))
        .expect("the event list is JSON");
        events["items"].as_array().cloned().unwrap_or_default()
    }

    /// Every pod of the lab as `(name, node, ips)`, from `meshlab status`.
    pub fn pods(&self) -> Vec<(String, String, Vec<String>)> {
        self.status()["pods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let ips = p["ips"].as_array().unwrap().iter();
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["node"].as_str().unwrap().to_string(),
                    ips.map(|i| i.as_str().unwrap().to_string()).collect(),
                )
            })
            .collect()
    }

    /// meshctl against the lab as its admin; panics with stderr on failure.
    pub fn meshctl(&self, args: &[&str]) -> String {
        let out = self.meshctl_output(args);
        assert!(
            out.status.success(),
            "meshctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// meshctl against the lab as its admin, bounded.
    pub fn meshctl_output(&self, args: &[&str]) -> Output {
        let bin = meshlab::lab::agents::sibling("meshctl").expect("meshctl is built");
        let mut c = Command::new(bin);
        c.arg("--kubeconfig").arg(self.kubeconfig()).args(args);
        run_bounded(c, Duration::from_secs(120))
    }

    /// `kubectl create -f` of `manifest` (written to the lab's directory as
    /// `file`); what `jsonpath` selects of the created object.
    pub fn create(&self, file: &str, manifest: &str, jsonpath: &str) -> String {
        let path = self.dir().join(file);
        std::fs::write(&path, manifest).unwrap();
        let path = path.to_string_lossy();
        let jsonpath = format!("jsonpath={jsonpath}");
        self.ok(&["kubectl", "--", "create", "-f", &path, "-o", &jsonpath])
            .trim()
            .to_string()
    }

    pub fn kubeconfig(&self) -> String {
        self.ok(&["kubeconfig"]).trim().to_string()
    }

    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.name)
    }

    /// The end of the lab's logs (the API server's, every node's
    /// containers'), which `down` removes, so a failure in CI shows what the
    /// agents said.
    fn print_logs(&self) {
        const LINES: usize = 15;
        let files = |dir: PathBuf| {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
        };
        let mut logs: Vec<PathBuf> = files(self.dir())
            .flat_map(|p| match p.is_dir() {
                true => files(p).collect(),
                false => vec![p],
            })
            .filter(|f| f.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- the last {LINES} lines of {} ---\n{}",
                log.display(),
                lines[lines.len().saturating_sub(LINES)..].join("\n")
            );
        }
    }
}

impl Drop for Lab {
    /// Tears the lab down, then fails the test if the plaintext sentinel
    /// counted anything during it (a test already failing keeps its own
    /// message).
    fn drop(&mut self) {
        // A test that took the lab down itself leaves no sentinel to read.
        let armed = std::path::Path::new(&format!("/run/netns/{}-fabric", self.name)).exists();
        if std::thread::panicking() {
            self.print_logs();
        }
        let plaintext = self.plaintext();
        let host_plaintext = self.host_plaintext();
        let host_flows = meshlab::lab::sentinel::host_flows(&format!("{}-fabric", self.name));
        let out = self.meshlab(&["down"]);
        if !out.status.success() {
            eprintln!(
                "meshlab down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if armed && !std::thread::panicking() {
            assert_eq!(
                plaintext,
                Some(0),
                "the plaintext sentinel counted frames with cluster pod or mesh addresses on the fabric (None: it could not be read)"
            );
            if self.host_encrypted {
                assert_eq!(
                    host_plaintext,
                    Some(0),
                    "the sentinel counted node-to-node host traffic outside WireGuard with WEFT_ENCRYPT_HOST (None: it could not be read):\n{host_flows}"
                );
            }
        }
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// The pid of `name`'s running meshd (from `meshlab status`).
pub fn pid_of_meshd(lab: &Lab, name: &str) -> i64 {
    node(&lab.status(), name)["meshd"]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{name}'s meshd is not running"))
}

/// The pid of `name`'s userspace data plane (the `meshd dataplane` process).
pub fn dataplane_pid(lab: &Lab, name: &str) -> i32 {
    let found: Vec<i32> = lab
        .processes(name)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(" dataplane "))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(found.len(), 1, "{name}'s data plane processes: {found:?}");
    found[0]
}

/// Stops a node's meshd cleanly (its data plane stays) and waits for it.
pub fn stop_meshd(lab: &Lab, name: &str) {
    signal(pid_of_meshd(lab, name), "-TERM");
    wait_for(
        &format!("{name}'s meshd to exit"),
        Duration::from_secs(5),
        || node(&lab.status(), name)["meshd"]["running"] == false,
    );
}

/// `kill SIG PID`, which must succeed.
pub fn signal(pid: i64, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success(),
        "kill {sig} {pid}"
    );
}

/// Runs a command, killing it if it outlives `limit`.
pub fn run_bounded(cmd: Command, limit: Duration) -> Output {
    run_bounded_with_input(cmd, None, limit)
}

/// [`run_bounded`] with `input` on the command's stdin.
pub fn run_bounded_with_input(mut cmd: Command, input: Option<&[u8]>, limit: Duration) -> Output {
    use std::io::{Read, Write};
    if input.is_some() {
        cmd.stdin(std::process::Stdio::piped());
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning a command");
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input).expect("writing the command's stdin");
    }
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let readers = (
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        }),
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        }),
    );
    let deadline = std::time::Instant::now() + meshlab::lab::scaled(limit);
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a command") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: readers.0.join().unwrap_or_default(),
        stderr: readers.1.join().unwrap_or_default(),
    }
}

impl Lab {
    /// `ping` from inside `node` (bounded by count × interval + slack).
    pub fn ping(&self, node: &str, target: &str, count: u32, interval: f64) -> Output {
        let (c, i) = (count.to_string(), interval.to_string());
        self.meshlab(&[
            "exec", node, "--", "ping", "-n", "-c", &c, "-i", &i, "-W", "1", target,
        ])
    }

    /// Whether one ping from `node` to `target` gets an answer.
    pub fn reaches(&self, node: &str, target: &str) -> bool {
        self.ping(node, target, 1, 0.2).status.success()
    }

    /// The value of a metric line (`name{labels} value`) of a node's meshd; 0 if absent.
    pub fn metric(&self, node: &str, series: &str) -> f64 {
        self.try_metric(node, series)
            .unwrap_or_else(|| panic!("{node}'s meshd does not serve metrics"))
    }

    /// As [`Lab::metric`], `None` while the node's meshd does not answer.
    pub fn try_metric(&self, node: &str, series: &str) -> Option<f64> {
        let out = self.meshlab(&["metrics", node]);
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Some(
            text.lines()
                .find(|l| l.split_whitespace().next() == Some(series))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
        )
    }

    /// The pod stand-in (gateway) address of each family on `node` (from status).
    pub fn pod_addresses(&self, node: &str) -> Vec<String> {
        let status = self.status();
        let n = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == node)
            .expect("node in status");
        n["podCIDRs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let net: ipnet::IpNet = c.as_str().unwrap().parse().unwrap();
                weft_ipam::gateway(&net).to_string()
            })
            .collect()
    }

    /// `(pid, command line)` of every process in `node`'s network namespace
    /// (`pkill` would match processes of every namespace on the machine).
    pub fn processes(&self, node: &str) -> Vec<(i32, String)> {
        let out = Command::new("ip")
            .args(["netns", "pids", &format!("{}-{node}", self.name)])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter_map(|pid: i32| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                Some((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")))
            })
            .collect()
    }

    /// `node`'s routes to other nodes' host addresses (`ip route show
    /// table 77`: those pods' traffic takes through the mesh).
    pub fn host_routes(&self, node: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("{}-{node}", self.name)])
            .args(["ip", "route", "show", "table", "77"])
            .output()
            .expect("ip route");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether `ping` was answered, and the source address of the first echo
    /// request seen on `iface` in `netns` meanwhile ("" for none; tcpdump
    /// bounded to 10 s).
    /// (Echoes to mesh addresses are meshd's probes of its peers, not
    /// anyone's ping: left out.)
    pub fn first_echo(&self, netns: &str, iface: &str, ping: &[&str]) -> (bool, String) {
        let filter = format!(
            "icmp[icmptype] == icmp-echo and not dst net {}",
            meshlab::lab::topology::MESH_V4
        );
        self.first_packet(netns, iface, &filter, ping)
    }

    /// [`Lab::first_echo`] for IPv6 echo requests.
    pub fn first_echo6(&self, netns: &str, iface: &str, ping: &[&str]) -> (bool, String) {
        let filter = format!(
            "icmp6 and ip6[40] == 128 and not dst net {}",
            meshlab::lab::topology::MESH_V6
        );
        self.first_packet(netns, iface, &filter, ping)
    }

    /// Whether `ping` succeeded, and the source address of the first packet
    /// matching the tcpdump `filter` on `iface` in `netns` meanwhile.
    fn first_packet(
        &self,
        netns: &str,
        iface: &str,
        filter: &str,
        ping: &[&str],
    ) -> (bool, String) {
        let tcpdump = std::process::Command::new("timeout")
            .args(["10", "ip", "netns", "exec", netns])
            .args(["tcpdump", "-c1", "-nn", "-i", iface, filter])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tcpdump (run tests/setup)");
        // tcpdump needs a moment to attach.
        std::thread::sleep(Duration::from_millis(500));
        let answered = self.meshlab(ping).status.success();
        let out = tcpdump.wait_with_output().expect("tcpdump's output");
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        // "… IP 198.18.1.1 > 203.0.113.10: ICMP echo request, …"
        let source = line
            .split_whitespace()
            .skip_while(|w| *w != "IP" && *w != "IP6")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        (answered, source)
    }

    /// Starts a packet capture on the fabric bridge; stop it with [`Capture::stop`].
    pub fn capture(&self) -> Capture {
        let file = self
            .dir()
            .join(format!("capture-{}.pcap", std::process::id()));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{}-fabric", self.name),
                "tcpdump",
                "-i",
                "br0",
                "-nn",
                "-U",
                "-w",
            ])
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tcpdump (run tests/setup)");
        // tcpdump needs a moment to attach before traffic starts.
        std::thread::sleep(Duration::from_millis(500));
        Capture { child, file }
    }
}

/// A running tcpdump on the fabric.
pub struct Capture {
    child: std::process::Child,
    file: PathBuf,
}

impl Capture {
    /// Stops the capture; returns one line per captured packet.
    pub fn stop(mut self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .expect("reading the capture");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Packets that are neither WireGuard (UDP port 51820) nor the control plane
/// (the API server at 198.18.0.1) nor link-layer housekeeping: plaintext
/// leaking onto the fabric.
pub fn plaintext(packets: &[String]) -> Vec<String> {
    packets
        .iter()
        .filter(|p| !p.contains(" ARP,") && !p.contains("198.18.0.1.6443"))
        // Link-local housekeeping (IPv6 neighbour discovery, MLD, IGMP) is not pod traffic.
        .filter(|p| {
            !p.contains("IP6 fe80")
                && !p.contains("IP6 :: >")
                && !p.contains("> ff02::")
                && !p.contains("> 224.0.0.")
        })
        .filter(|p| !(p.contains(".51820 > ") && p.contains(".51820: UDP")))
        // A node without a data plane refuses WireGuard datagrams; the ICMP
        // error quotes only the encrypted datagram.
        .filter(|p| !p.contains("ICMP") || !p.contains("udp port 51820 unreachable"))
        .cloned()
        .collect()
}

/// One node's entry in `meshlab status --json`.
pub fn node<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in status"))
}

/// Traffic between two pods while something happens: one TCP stream over
/// IPv4 (iperf3, rate-capped so the two cores are not its) and 20 pings a
/// second over IPv6.
pub struct Traffic {
    server: JoinHandle<Output>,
    client: JoinHandle<Output>,
    pings: JoinHandle<Output>,
    count: u32,
}

impl Traffic {
    pub fn start(lab: &Lab, from: &str, to: &str, seconds: u32) -> Traffic {
        Traffic::start_at(lab, from, to, seconds, "100M")
    }

    /// [`Traffic::start`] with the TCP stream capped at `rate` (iperf3's
    /// `-b`): Debian's wireguard-go drops packets of its own at 100 Mbit/s
    /// on two busy cores.
    pub fn start_at(lab: &Lab, from: &str, to: &str, seconds: u32, rate: &str) -> Traffic {
        let (_, _, ips) = lab
            .pods()
            .into_iter()
            .find(|(name, _, _)| name == to)
            .unwrap_or_else(|| panic!("no pod {to}"));
        let (v4, v6) = (ips[0].clone(), ips[1].clone());
        let limit = Duration::from_secs(u64::from(seconds) + 60);
        let server = lab.command(&["pod", "exec", to, "--", "iperf3", "-s", "-1"]);
        let server = std::thread::spawn(move || run_bounded(server, limit));
        // Until it listens (a slow machine takes longer to start it).
        std::thread::sleep(meshlab::lab::scaled(Duration::from_millis(500)));
        let t = seconds.to_string();
        let client = lab.command(&[
            "pod", "exec", from, "--", "iperf3", "-J", "-c", &v4, "-t", &t, "-b", rate,
        ]);
        let client = std::thread::spawn(move || run_bounded(client, limit));
        let count = seconds * 20;
        let c = count.to_string();
        let pings = lab.command(&[
            "pod", "exec", from, "--", "ping", "-n", "-c", &c, "-i", "0.05", "-W", "1", &v6,
        ]);
        let pings = std::thread::spawn(move || run_bounded(pings, limit));
        std::thread::sleep(Duration::from_secs(2));
        Traffic {
            server,
            client,
            pings,
            count,
        }
    }

    /// (pings lost, TCP retransmits); panics if the TCP stream failed.
    pub fn finish(self) -> (u32, u64) {
        let client = self.client.join().unwrap();
        let report: Value = serde_json::from_slice(&client.stdout).unwrap_or(Value::Null);
        assert!(
            client.status.success() && report["error"].is_null(),
            "the TCP stream failed (reset?): {}\n{}",
            report["error"],
            String::from_utf8_lossy(&client.stderr)
        );
        let _ = self.server.join();
        let pings = self.pings.join().unwrap();
        let summary = String::from_utf8_lossy(&pings.stdout);
        let received: u32 = summary
            .split(", ")
            .find_map(|part| part.strip_suffix(" received"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ping summary:\n{summary}"));
        let retransmits = report["end"]["sum_sent"]["retransmits"]
            .as_u64()
            .unwrap_or(0);
        (self.count - received, retransmits)
    }
}

/// The kind of `node`'s WireGuard interface (`ip -details link`): the
/// `wireguard` link or the userspace device's `tun`.
pub fn link_kind(lab: &Lab, name: &str) -> String {
    let status = lab.status();
    let iface = node(&status, name)["wgInterface"]
        .as_str()
        .expect("a WireGuard interface")
        .to_string();
    let out = lab.ok(&[
        "exec", name, "--", "ip", "-details", "-json", "link", "show", &iface,
    ]);
    let links: serde_json::Value = serde_json::from_str(&out).expect("ip -json");
    links[0]["linkinfo"]["info_kind"]
        .as_str()
        .unwrap_or_else(|| panic!("{name}: no link kind in {out}"))
        .to_string()
}

/// Polls `check` every 20 ms until it holds, failing with `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let limit = meshlab::lab::scaled(limit);
    let started = std::time::Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// A hostile Node, registered the way a compromised kubelet could: its
/// spec (what the control plane "assigned"), and annotations signed with
/// its own key where it has one (so the parser gets past the proof to what
/// is under test).
pub struct Hostile {
    pub name: &'static str,
    pub spec: Option<String>,
    pub annotations: Vec<(&'static str, String)>,
    /// The key it proves (None: its annotations say what key it has).
    pub key: Option<PrivateKey>,
    pub reason: &'static str,
}

impl Hostile {
    /// A claim that is valid but for what `edit` changes.
    pub fn valid(name: &'static str, cidr: &str, reason: &'static str) -> Self {
        let key = PrivateKey::generate();
        let block: ipnet::IpNet = cidr.parse().unwrap();
        let mesh =
            mesh_address_of(&lab_ranges(), &block).map_or_else(String::new, |a| a.to_string());
        Hostile {
            name,
            spec: Some(cidr.to_string()),
            annotations: vec![
                ("weft.dev/version", "2".into()),
                ("weft.dev/public-key", key.public_key().to_string()),
                ("weft.dev/endpoint", "198.18.1.50:51820".into()),
                ("weft.dev/mesh-addresses", mesh),
                ("weft.dev/pod-cidrs", cidr.into()),
            ],
            key: Some(key),
            reason,
        }
    }

    pub fn with(mut self, key: &'static str, value: &str) -> Self {
        self.annotations.retain(|(k, _)| *k != key);
        self.annotations.push((key, value.to_string()));
        self
    }

    /// Registers the Node, then publishes its annotations (a proof is bound
    /// to the UID the API server gives it).
    pub fn register(&self, lab: &Lab) {
        let spec = self.spec.as_ref().map_or_else(String::new, |c| {
            format!(r#","spec":{{"podCIDRs":["{c}"]}}"#)
        });
        let manifest = format!(
            r#"{{"apiVersion":"v1","kind":"Node","metadata":{{"name":"{}"}}{spec}}}"#,
            self.name
        );
        let path = lab.dir().join(format!("{}.json", self.name));
        std::fs::write(&path, manifest).unwrap();
        lab.ok(&["kubectl", "--", "create", "-f", path.to_str().unwrap()]);
        let uid = lab.kubectl(&["get", "node", self.name, "-o", "jsonpath={.metadata.uid}"]);
        let mut annotations = self.annotations.clone();
        if let Some(key) = &self.key {
            let subject = ProofSubject {
                node: self.name,
                uid: uid.trim(),
            };
            annotations.push(("weft.dev/key-proof", key.prove(subject).to_string()));
        }
        let mut args = vec![
            "annotate".to_string(),
            "node".into(),
            self.name.into(),
            "--overwrite".into(),
        ];
        args.extend(annotations.iter().map(|(k, v)| format!("{k}={v}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.kubectl(&args);
    }
}

/// The lab's ranges, as meshd's flags give them.
pub fn lab_ranges() -> ClusterRanges {
    use meshlab::lab::topology::{CLUSTER_V4, CLUSTER_V6, MESH_V4, MESH_V6, PEERS_V4, PEERS_V6};
    let flag = |name, a: &str, b: &str| {
        Ranges::from_flag(name, &[a.parse().unwrap(), b.parse().unwrap()]).unwrap()
    };
    ClusterRanges {
        pods: flag("--cluster-cidr", CLUSTER_V4, CLUSTER_V6),
        mesh: flag("--mesh-cidr", MESH_V4, MESH_V6),
        peers: Some(flag("--peer-cidr", PEERS_V4, PEERS_V6)),
    }
}

/// The pod token the lab's kubelet issued to `node`.
pub fn pod_token(lab: &Lab, node: &str) -> String {
    token_in(&lab.dir().join(node).join("kubeconfig"))
}

/// The credential of `node`'s kubelet (`system:node:<node>`).
pub fn kubelet_token(lab: &Lab, node: &str) -> String {
    token_in(&lab.dir().join(node).join("kubelet.kubeconfig"))
}

fn token_in(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let kubeconfig: Value = serde_norway::from_str(&text).unwrap();
    kubeconfig["users"][0]["user"]["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{} has a token", path.display()))
        .to_string()
}

/// A kubeconfig for the host's API address that authenticates with `token`
/// (the pod's own points at the fabric address, reachable only inside the
/// node's namespace).
pub fn kubeconfig_with(lab: &Lab, token: &str, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(lab.kubeconfig()).unwrap();
    let mut kubeconfig: Value = serde_norway::from_str(&text).unwrap();
    kubeconfig["users"][0]["user"]["token"] = serde_json::json!(token);
    let path = lab.dir().join(format!("{name}.kubeconfig"));
    std::fs::write(&path, serde_norway::to_string(&kubeconfig).unwrap()).unwrap();
    path
}

pub async fn client(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// The UDP payload of the first datagram matching the tcpdump `filter` on
/// `iface` in namespace `netns` while `during` runs (bounded: 10 s after it).
pub fn first_datagram(netns: &str, iface: &str, filter: &str, during: impl FnOnce()) -> Vec<u8> {
    use std::io::Read;
    let mut tcpdump = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(["tcpdump", "-c1", "-nn", "-x", "-i", iface, filter])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump (run tests/setup)");
    // tcpdump needs a moment to attach.
    std::thread::sleep(Duration::from_millis(500));
    during();
    let seen = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        matches!(tcpdump.try_wait(), Ok(Some(_)))
    });
    if !seen {
        let _ = tcpdump.kill();
        let _ = tcpdump.wait();
        panic!("tcpdump saw no {filter:?} in {netns} within 10 s");
    }
    let mut text = String::new();
    if let Some(mut out) = tcpdump.stdout.take() {
        out.read_to_string(&mut text).expect("tcpdump's output");
    }
    // `-x`: the IP packet in hex, after each line's offset.
    let ip: Vec<u8> = text
        .lines()
        .filter_map(|l| l.trim().split_once(":  ").map(|(_, hex)| hex))
        .flat_map(|hex| hex.split_whitespace())
        .flat_map(|word| {
            (0..word.len() / 2)
                .map(move |k| u8::from_str_radix(&word[2 * k..2 * k + 2], 16).expect("hex"))
        })
        .collect();
    let header = usize::from(ip[0] & 0xf) * 4;
    ip[header + 8..].to_vec()
}

/// The TTL (IPv4) or hop limit (IPv6) of the reply to one ping from pod
/// `from` to `target`; `None` if no reply came.
pub fn reply_ttl(lab: &Lab, from: &str, target: &str) -> Option<u32> {
    let out = lab.meshlab(&[
        "pod", "exec", from, "--", "ping", "-n", "-c", "1", "-W", "2", target,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("ttl=").or_else(|| w.strip_prefix("hlim=")))
        .and_then(|v| v.parse().ok())
}

/// Pod `name`'s addresses (IPv4, IPv6).
pub fn pod_ips(lab: &Lab, name: &str) -> (String, String) {
    let (_, _, ips) = lab
        .pods()
        .into_iter()
        .find(|(n, _, _)| n == name)
        .unwrap_or_else(|| panic!("no pod {name}"));
    (ips[0].clone(), ips[1].clone())
}

/// Which peer of `at`'s data plane carries `target`'s pod CIDR (read from
/// the device, not from meshd).
pub fn carrier(lab: &Lab, at: &str, target: &str) -> Option<String> {
    let status = lab.status();
    let cidr = node(&status, target)["podCIDRs"][0]
        .as_str()
        .expect("a pod CIDR")
        .to_string();
    node(&status, at)["peers"]
        .as_array()?
        .iter()
        .find(|p| {
            p["allowedIps"]
                .as_array()
                .is_some_and(|a| a.iter().any(|ip| ip == cidr.as_str()))
        })
        .and_then(|p| p["node"].as_str().map(String::from))
}

/// Where `at`'s data plane sends to `peer` (its device's endpoint; "" for
/// none).
pub fn endpoint_of(lab: &Lab, at: &str, peer: &str) -> String {
    node(&lab.status(), at)["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["node"] == peer)
        .and_then(|p| p["endpoint"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// A lab of the sites `topology` describes (a topology file's text,
/// docs/lab.md), one pod per node, with `extra` arguments.
pub fn sites_lab(name: &str, topology: &str, extra: &[&str]) -> Lab {
    let dir = std::env::temp_dir().join(format!("weft-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let file = dir.join("sites.yaml");
    std::fs::write(&file, topology).expect("writing the topology");
    let mut args = vec![
        "--topology",
        file.to_str().expect("a UTF-8 path"),
        "--pods-per-node",
        "1",
    ];
    args.extend(extra);
    let lab = Lab::up(name, &args);
    let _ = std::fs::remove_dir_all(&dir);
    lab
}

/// Node `n`'s annotation `key` ("" when absent).
pub fn annotation(lab: &Lab, n: &str, key: &str) -> String {
    let path = format!(
        "jsonpath={{.metadata.annotations.{}}}",
        key.replace('.', "\\.")
    );
    lab.kubectl(&["get", "node", n, "-o", &path])
}

/// How `meshctl status AT` says `at` reaches `peer` (its "reach").
pub fn meshctl_reach(lab: &Lab, at: &str, peer: &str) -> String {
    let status = lab.meshctl(&["status", at, "-o", "json"]);
    let status: Value = serde_json::from_str(&status).expect("meshctl status JSON");
    status["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["node"] == peer)
        .and_then(|p| p["reach"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The pod CIDRs of `nodes`, as the lab's status has them.
pub fn pod_cidrs_of(lab: &Lab, nodes: &[&str]) -> Vec<String> {
    let status = lab.status();
    nodes
        .iter()
        .flat_map(|n| {
            node(&status, n)["podCIDRs"]
                .as_array()
                .expect("pod CIDRs")
                .iter()
                .map(|c| c.as_str().expect("a CIDR").to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}
