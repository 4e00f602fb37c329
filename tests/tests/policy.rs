//! NetworkPolicy enforced by meshd on real pods across nodes, with real
//! TCP connections, following policy changes made through the API.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{pid_of_meshd, signal, wait_for, Lab};

const SERVER: &str = "import socket,threading
def run(p):
  s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',p));s.listen(16)
  while True:
    c,_=s.accept();c.close()
for p in (80,81): threading.Thread(target=run,args=(p,)).start()";

const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: 80}]
";

fn connects(lab: &Lab, from: &str, addr: &str, port: u16) -> bool {
    let probe =
        format!("import socket;socket.create_connection(('{addr}',{port}),timeout=1).close()");
    lab.meshlab(&["pod", "exec", from, "--", "/usr/bin/python3", "-c", &probe])
        .status
        .success()
}

#[test]
fn meshd_enforces_policy_changes_on_real_connections() {
    let lab = Lab::up("t-policy", &["--nodes", "2"]);
    let a = lab.ok(&[
        "pod",
        "add",
        "node-1",
        "a",
        "--namespace",
        "x",
        "--label",
        "pod=a",
    ]);
    let a = a.split_whitespace().next().unwrap().to_string();
    lab.ok(&[
        "pod",
        "add",
        "node-2",
        "b",
        "--namespace",
        "x",
        "--label",
        "pod=b",
    ]);
    lab.ok(&[
        "pod",
        "add",
        "node-1",
        "c",
        "--namespace",
        "y",
        "--label",
        "pod=c",
    ]);
    let mut server = lab
        .command(&["pod", "exec", "x/a", "--", "/usr/bin/python3", "-c", SERVER])
        .spawn()
        .unwrap();
    wait_for("the server in x/a", Duration::from_secs(10), || {
        connects(&lab, "y/c", &a, 80)
    });

    let manifest = lab.dir().join("policy.yaml");
    std::fs::write(&manifest, POLICY).unwrap();
    lab.ok(&["kubectl", "--", "create", "-f", manifest.to_str().unwrap()]);
    // Same-node traffic from an unselected peer is cut; so is another port.
    wait_for("y/c -> x/a to be blocked", Duration::from_secs(10), || {
        !connects(&lab, "y/c", &a, 80)
    });
    assert!(
        connects(&lab, "x/b", &a, 80),
        "the allowed cross-node peer was cut"
    );
    assert!(
        !connects(&lab, "x/b", &a, 81),
        "a port the policy does not allow passed"
    );

    // The drops are counted against the policy, and explained live.
    wait_for(
        "drops counted for x/only-b",
        Duration::from_secs(15),
        || {
            lab.metric(
                "node-1",
                "weft_policy_dropped_packets_total{direction=\"ingress\",policy=\"x/only-b\"}",
            ) > 0.0
        },
    );
    let explain = |from: &str, port: &str| {
        let meshctl = std::path::Path::new(common::MESHLAB).with_file_name("meshctl");
        let out = Command::new(meshctl)
            .args([
                "policy", "explain", "--from", from, "--to", "x/a", "--port", port,
            ])
            .env("KUBECONFIG", lab.kubeconfig())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let denied = explain("y/c", "80/TCP");
    assert!(denied.starts_with("DENIED: y/c -> x/a 80/TCP"), "{denied}");
    assert!(denied.contains("isolated by x/only-b"), "{denied}");
    assert!(
        denied.contains("to allow it: add an ingress rule to one of x/only-b"),
        "{denied}"
    );
    let allowed = explain("x/b", "80");
    assert!(allowed.starts_with("ALLOWED"), "{allowed}");
    assert!(
        allowed.contains("allowed by x/only-b ingress rule 0"),
        "{allowed}"
    );

    // Every node reports it enforces the cluster's one policy.
    wait_for(
        "both nodes in sync with 1 policy",
        Duration::from_secs(15),
        || policy_sync(&lab) == [("in-sync".into(), 1), ("in-sync".into(), 1)],
    );

    // node-2's agent is frozen while the policy goes: node-1 follows and
    // says so, node-2 shows behind until its agent runs again.
    let frozen = Frozen::new(pid_of_meshd(&lab, "node-2"));
    lab.ok(&["kubectl", "--", "delete", "-f", manifest.to_str().unwrap()]);
    wait_for("y/c -> x/a to be restored", Duration::from_secs(10), || {
        connects(&lab, "y/c", &a, 80)
    });
    wait_for(
        "node-1 in sync with no policy",
        Duration::from_secs(15),
        || policy_sync(&lab)[0] == ("in-sync".into(), 0),
    );
    let sync = policy_sync(&lab);
    drop(frozen);
    assert_eq!(sync[1], ("behind".into(), 1), "node-2's agent was frozen");
    let table = lab.meshctl(&["status"]);
    assert!(table.lines().next().unwrap().contains("POLICY"), "{table}");
    wait_for("node-2 in sync again", Duration::from_secs(15), || {
        policy_sync(&lab)[1] == ("in-sync".into(), 0)
    });
    let _ = server.kill();
    let _ = server.wait();
}

/// A stopped process (SIGSTOP), continued when dropped, whatever the test
/// did meanwhile.
struct Frozen(i64);

impl Frozen {
    fn new(pid: i64) -> Self {
        signal(pid, "-STOP");
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Not `signal`: a panic while unwinding would abort the test run.
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// Each node's NetworkPolicy enforcement per `meshctl status`: its state
/// against the cluster's policies and how many it enforces (-1: none
/// reported), in node order.
fn policy_sync(lab: &Lab) -> Vec<(String, i64)> {
    let status: serde_json::Value =
        serde_json::from_str(&lab.meshctl(&["status", "-o", "json"])).expect("JSON");
    status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["policy"].as_str().unwrap_or("-").to_string(),
                n["policyApplied"]["policies"].as_i64().unwrap_or(-1),
            )
        })
        .collect()
}

/// `ip netns exec` into a pod's network namespace.
fn in_pod(lab: &Lab, pod: &str, args: &[&str]) -> String {
    lab.ok(&[&["pod", "exec", pod, "--"], args].concat())
}

/// A counter of the pod's own network stack (`/proc/net/snmp` or
/// `snmp6`): what actually arrived there, whatever the node did.
fn snmp(lab: &Lab, pod: &str, table: &str, field: &str) -> u64 {
    let file = snmp_file(table);
    snmp_field(&in_pod(lab, pod, &["cat", file]), table, field)
}

/// The same counter of a node's own stack.
fn snmp_of_node(lab: &Lab, node: &str, table: &str, field: &str) -> u64 {
    let file = snmp_file(table);
    snmp_field(&lab.ok(&["exec", node, "--", "cat", file]), table, field)
}

fn snmp_file(table: &str) -> &'static str {
    if table.ends_with('6') {
        "/proc/net/snmp6"
    } else {
        "/proc/net/snmp"
    }
}

/// `field` of `table` in the text of `/proc/net/snmp` (or `snmp6`).
fn snmp_field(text: &str, table: &str, field: &str) -> u64 {
    if table.ends_with('6') {
        return text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{table}{field}")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{table}{field} in snmp6"));
    }
    let mut rows = text.lines().filter(|l| l.starts_with(&format!("{table}:")));
    let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == field)
        .unwrap_or_else(|| panic!("{table} {field}"));
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

fn add_pod(lab: &Lab, node: &str, pod: &str, labels: &[&str]) -> Vec<String> {
    let (namespace, name) = pod.split_once('/').unwrap();
    let mut args = vec!["pod", "add", node, name, "--namespace", namespace];
    for l in labels {
        args.extend(["--label", l]);
    }
    lab.ok(&args)
        .split_whitespace()
        .filter(|w| w.parse::<std::net::IpAddr>().is_ok())
        .map(str::to_string)
        .collect()
}

/// The address the node's IPAM hands out after `ip` (it goes round the
/// block from the last address given).
fn next_address(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>().unwrap() {
        std::net::IpAddr::V4(a) => std::net::Ipv4Addr::from(u32::from(a) + 1).to_string(),
        std::net::IpAddr::V6(a) => std::net::Ipv6Addr::from(u128::from(a) + 1).to_string(),
    }
}

/// Serves on port 80 in pod `x/<app>` (labelled `app: <app>`), reachable at
/// `addr` from `outsider` until a policy lets only `app: client` pods in,
/// then no longer: the serving process.
fn serve_to_clients_only(lab: &Lab, app: &str, addr: &str, outsider: &str) -> std::process::Child {
    let pod = format!("x/{app}");
    let serving = lab
        .command(&["pod", "exec", &pod, "--", "/usr/bin/python3", "-c", SERVER])
        .spawn()
        .unwrap();
    wait_for(&format!("the {app}"), Duration::from_secs(10), || {
        connects(lab, outsider, addr, 80)
    });
    create(
        lab,
        "clients.yaml",
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: clients, namespace: x}}\n\
             spec: {{podSelector: {{matchLabels: {{app: {app}}}}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]}}]}}\n"
        ),
    );
    wait_for(
        &format!("{outsider} to be refused"),
        Duration::from_secs(10),
        || !connects(lab, outsider, addr, 80),
    );
    serving
}

fn create(lab: &Lab, name: &str, manifest: &str) -> u64 {
    lab.create(name, manifest, "{.metadata.resourceVersion}")
        .parse()
        .unwrap()
}

fn wait_programmed(lab: &Lab, node: &str, revision: u64) {
    wait_for(
        &format!("{node} to apply revision {revision}"),
        Duration::from_secs(10),
        || lab.metric(node, "weft_policy_synced_revision") >= revision as f64,
    );
}

/// UDP datagrams to `targets` (port 9) in a tight loop for `seconds`,
/// from `pod`, in the background.
fn flood(lab: &Lab, pod: &str, targets: &[String], seconds: u32) -> std::process::Child {
    let script = format!(
        "import socket,time\n\
         end=time.time()+{seconds}\n\
         ts=[(socket.socket(socket.AF_INET6 if ':' in t else socket.AF_INET,socket.SOCK_DGRAM),t) for t in {targets:?}]\n\
         while time.time()<end:\n\
         \x20 for s,t in ts:\n\
         \x20   try: s.sendto(b'x',(t,9))\n\
         \x20   except OSError: pass\n\
         \x20 time.sleep(0.0005)\n"
    );
    lab.command(&["pod", "exec", pod, "--", "/usr/bin/python3", "-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Probed in a tight loop from before it exists, a pod that a deny-all
/// policy isolates receives nothing: not between its attach and the
/// moment meshd programs it, not after. The same probes reach a pod no
/// policy isolates (so they can fail the first half).
#[test]
fn a_new_pod_gets_nothing_before_its_policy_is_programmed() {
    let lab = Lab::up("t-window", &["--nodes", "2"]);
    add_pod(&lab, "node-2", "y/prober", &[]);
    for namespace in ["x", "z"] {
        lab.ok(&["kubectl", "--", "create", "namespace", namespace]);
    }
    let revision = create(
        &lab,
        "deny.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: deny-all, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n",
    );
    for (pod, isolated) in [("x/new", true), ("z/open", false)] {
        let (namespace, _) = pod.split_once('/').unwrap();
        let before = add_pod(&lab, "node-1", &format!("{namespace}/before"), &[]);
        wait_programmed(&lab, "node-1", revision);
        let predicted: Vec<String> = before.iter().map(|ip| next_address(ip)).collect();
        let mut prober = flood(&lab, "y/prober", &predicted, 5);
        std::thread::sleep(Duration::from_millis(1500));
        let got = add_pod(&lab, "node-1", pod, &[]);
        assert_eq!(
            got, predicted,
            "the new pod's addresses were not the ones probed"
        );
        let _ = prober.wait();
        let arrived = snmp(&lab, pod, "Udp", "NoPorts") + snmp(&lab, pod, "Udp6", "NoPorts");
        if isolated {
            assert_eq!(
                arrived, 0,
                "{pod} received probes before or after its policy was programmed"
            );
        } else {
            assert!(
                arrived > 0,
                "no probe reached {pod}, which no policy isolates: the probes prove nothing"
            );
        }
    }
}

/// A pod cannot send from an address that is not its own, in either
/// family: the packet dies on its node, before conntrack or policy.
#[test]
fn a_spoofed_source_is_dropped() {
    let lab = Lab::up("t-spoof", &["--nodes", "2"]);
    let own = add_pod(&lab, "node-1", "x/a", &[]);
    let target = add_pod(&lab, "node-2", "x/c", &[]);
    for (own, ip, spoofed, table) in [
        (&own[0], &target[0], "198.19.1.200", "Icmp"),
        (&own[1], &target[1], "fd98:19:0:1::c8", "Icmp6"),
    ] {
        let field = "InEchos";
        wait_for("x/a to reach x/c", Duration::from_secs(10), || {
            lab.meshlab(&["pod", "exec", "x/a", "--", "ping", "-c1", "-W1", ip])
                .status
                .success()
        });
        let before = snmp(&lab, "x/c", table, field);
        in_pod(
            &lab,
            "x/a",
            &["ip", "addr", "add", spoofed, "dev", "eth0", "nodad"],
        );
        let _ = lab.meshlab(&[
            "pod", "exec", "x/a", "--", "ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", spoofed,
            ip,
        ]);
        assert_eq!(
            snmp(&lab, "x/c", table, field),
            before,
            "x/c received pings from the spoofed source {spoofed}"
        );
        // The same pings from x/a's own address arrive.
        let _ = lab.meshlab(&[
            "pod", "exec", "x/a", "--", "ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", own, ip,
        ]);
        assert_eq!(snmp(&lab, "x/c", table, field), before + 3);
    }
}

/// A finished pod (a completed Job keeps its Pod object, addresses and
/// all) is not a policy peer: its address, now another pod's, gets none
/// of its allows. Marked running again, it is: the probe can fail.
#[test]
fn a_finished_pods_address_gets_no_allow() {
    let lab = Lab::up("t-finished", &["--nodes", "2"]);
    let server = add_pod(&lab, "node-2", "x/server", &["app=server"]);
    let reused = add_pod(&lab, "node-1", "x/newcomer", &[]);
    let mut serving = serve_to_clients_only(&lab, "server", &server[0], "x/newcomer");
    // The Job's pod that held the newcomer's address, finished.
    create(
        &lab,
        "job.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: job, namespace: x, labels: {app: client}}\n\
         spec: {nodeName: node-1, containers: [{name: c, image: busybox}]}\n",
    );
    let set_phase = |phase: &str| {
        let ips: Vec<serde_json::Value> = reused
            .iter()
            .map(|ip| serde_json::json!({"ip": ip}))
            .collect();
        lab.patch_pod_status(
            "x",
            "job",
            &serde_json::json!({"phase": phase, "podIP": reused[0], "podIPs": ips}),
        )
    };
    let revision = set_phase("Succeeded");
    wait_programmed(&lab, "node-2", revision);
    for _ in 0..5 {
        assert!(
            !connects(&lab, "x/newcomer", &server[0], 80),
            "the newcomer got the finished client's allow"
        );
    }
    let revision = set_phase("Running");
    wait_programmed(&lab, "node-2", revision);
    wait_for(
        "a running client's address to be allowed (the probe can pass)",
        Duration::from_secs(10),
        || connects(&lab, "x/newcomer", &server[0], 80),
    );
    let _ = serving.kill();
    let _ = serving.wait();
}

/// A pod is programmed from what the CNI plugin recorded when it attached
/// it (namespace and name from CNI_ARGS, with its addresses), not only once
/// the API reports its addresses: here the API never does.
#[test]
fn a_pod_is_programmed_from_its_attachment() {
    let lab = Lab::up("t-attach", &["--nodes", "2"]);
    add_pod(&lab, "node-2", "y/client", &[]);
    let out = lab.ok(&[
        "pod",
        "add",
        "node-1",
        "quiet",
        "--namespace",
        "z",
        "--no-status",
    ]);
    let quiet: Vec<String> = out.split_whitespace().map(str::to_string).collect();
    assert_eq!(quiet.len(), 2, "{out}");
    let reported = lab.ok(&[
        "kubectl",
        "--",
        "get",
        "pod",
        "-n",
        "z",
        "quiet",
        "-o",
        "jsonpath={.status.podIPs}",
    ]);
    assert!(
        reported.trim().is_empty(),
        "the Pod reports addresses: {reported}"
    );
    for ip in &quiet {
        wait_for(
            &format!("y/client to reach z/quiet at {ip}"),
            Duration::from_secs(5),
            || {
                lab.meshlab(&["pod", "exec", "y/client", "--", "ping", "-c1", "-W1", ip])
                    .status
                    .success()
            },
        );
    }
}

/// With NetworkPolicy on, no pod attaches on a node whose policy program
/// cannot be loaded: the CNI plugin answers "try again later" naming why,
/// instead of a network with neither isolation nor anti-spoofing. Here
/// node-1's meshd runs without `nft` (an image without it: a PATH holding
/// only `ip`); with `nft` back, the next ADD attaches.
#[test]
fn no_pod_attaches_while_the_policy_program_cannot_be_loaded() {
    let lab = Lab::up("t-unloaded", &["--nodes", "2"]);
    let peer = add_pod(&lab, "node-2", "x/peer", &[]);
    let bare = lab.dir().join("path-without-nft");
    std::fs::create_dir_all(&bare).unwrap();
    std::os::unix::fs::symlink("/usr/sbin/ip", bare.join("ip")).unwrap();
    let restart = |path: &std::ffi::OsStr| {
        let mut c = lab.command(&["container", "restart", "node-1", "meshd"]);
        c.env("PATH", path);
        let out = common::run_bounded(c, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "restarting meshd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let policy_state = lab.dir().join("node-1/root/run/weft/policy.json");
    restart(bare.as_os_str());
    wait_for(
        "node-1 to publish its policy enforcement broken",
        Duration::from_secs(30),
        || std::fs::read_to_string(&policy_state).is_ok_and(|s| s.contains("\"broken\"")),
    );
    let refused = lab.meshlab(&["pod", "add", "node-1", "late", "--namespace", "x"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a pod attached while NetworkPolicy was not enforced"
    );
    assert!(
        said.contains("\"code\":11")
            && said.contains("NetworkPolicy enforcement is broken on this node"),
        "not the CNI error naming the cause: {said}"
    );

    restart(&std::env::var_os("PATH").unwrap_or_default());
    wait_for(
        "node-1 to load its policy program",
        Duration::from_secs(30),
        || std::fs::read_to_string(&policy_state).is_ok_and(|s| s.contains("\"loaded\"")),
    );
    let ips = add_pod(&lab, "node-1", "x/late", &[]);
    assert!(!ips.is_empty());
    wait_for("x/late to reach x/peer", Duration::from_secs(10), || {
        lab.meshlab(&[
            "pod", "exec", "x/late", "--", "ping", "-c1", "-W1", &peer[0],
        ])
        .status
        .success()
    });
}

/// A pod's reported addresses count for policy only inside its node's pod
/// CIDRs: a Pod on node-3 labelled as an allowed client, whose status
/// (written by node-3's kubelet) names the address of a pod on node-2,
/// lends that pod nothing. The legitimate client on node-3 is allowed, so
/// the probe can pass.
#[test]
fn a_pod_address_from_another_node_gets_no_allow() {
    let lab = Lab::up("t-bound", &["--nodes", "3"]);
    let backend = add_pod(&lab, "node-1", "x/backend", &["app=backend"]);
    let outsider = add_pod(&lab, "node-2", "x/outsider", &[]);
    add_pod(&lab, "node-3", "x/client", &["app=client"]);
    let mut serving = serve_to_clients_only(&lab, "backend", &backend[0], "x/outsider");
    wait_for("x/client to be allowed", Duration::from_secs(10), || {
        connects(&lab, "x/client", &backend[0], 80)
    });
    // node-3's kubelet reports a client pod with x/outsider's addresses.
    let revision = lab.register_pod(
        "x",
        "impostor",
        "node-3",
        &serde_json::json!({"app": "client"}),
        &outsider,
    );
    wait_programmed(&lab, "node-1", revision);
    for _ in 0..5 {
        assert!(
            !connects(&lab, "x/outsider", &backend[0], 80),
            "x/outsider got the allow of a node-3 pod claiming its address"
        );
    }
    assert!(connects(&lab, "x/client", &backend[0], 80));
    assert!(
        lab.metric("node-1", "weft_policy_unbound_pod_addresses_total") >= outsider.len() as f64,
        "the ignored addresses are not counted"
    );
    let _ = serving.kill();
    let _ = serving.wait();
}

/// What a pod sends to its own node (the kubelet, node-local DNS,
/// host-network pods: the input hook, not forward) gets the same egress
/// verdicts as what it sends anywhere else: refused under an egress
/// deny-all, let through by an ipBlock allowing it; and a spoofed source
/// is dropped there too. Neighbour discovery with the node keeps working
/// for an isolated pod (its allowed IPv6 traffic still gets out).
#[test]
fn a_pod_s_egress_policy_governs_its_own_node_too() {
    let lab = Lab::up("t-tonode", &["--nodes", "2"]);
    let a = add_pod(&lab, "node-1", "x/a", &["app=a"]);
    let remote = add_pod(&lab, "node-2", "x/r", &[]);
    let node = "198.18.1.1";
    let gateway6 = "fd98:19:0:1::1";
    let pings = |target: &str| {
        lab.meshlab(&["pod", "exec", "x/a", "--", "ping", "-c1", "-W1", target])
            .status
            .success()
    };
    for target in [node, gateway6, &remote[1]] {
        wait_for(
            &format!("x/a to reach {target}"),
            Duration::from_secs(10),
            || pings(target),
        );
    }
    let egress = |name: &str, to: &str| {
        create(
            &lab,
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: {name}, namespace: x}}\n\
                 spec: {{podSelector: {{matchLabels: {{app: a}}}}, policyTypes: [Egress], egress: [{to}]}}\n"
            ),
        )
    };
    let revision = egress("deny", "");
    wait_programmed(&lab, "node-1", revision);
    for target in [node, gateway6] {
        assert!(
            !pings(target),
            "egress deny-all, yet x/a reaches its node at {target}"
        );
    }
    let revision = egress(
        "to-node",
        &format!(
            "{{to: [{{ipBlock: {{cidr: {node}/32}}}}, {{ipBlock: {{cidr: 'fd98:19::/48'}}}}]}}"
        ),
    );
    wait_programmed(&lab, "node-1", revision);
    assert!(pings(node), "the ipBlock allows x/a to reach {node}");
    assert!(
        pings(&remote[1]),
        "an isolated pod's allowed IPv6 traffic gets out"
    );

    // A spoofed source towards the node is dropped before any verdict.
    let before = snmp_of_node(&lab, "node-1", "Icmp", "InEchos");
    in_pod(
        &lab,
        "x/a",
        &["ip", "addr", "add", "198.19.1.200", "dev", "eth0", "nodad"],
    );
    let _ = lab.meshlab(&[
        "pod",
        "exec",
        "x/a",
        "--",
        "ping",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1",
        "-I",
        "198.19.1.200",
        node,
    ]);
    assert_eq!(
        snmp_of_node(&lab, "node-1", "Icmp", "InEchos"),
        before,
        "node-1 answered a spoofed source"
    );
    let _ = lab.meshlab(&[
        "pod", "exec", "x/a", "--", "ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", &a[0], node,
    ]);
    assert_eq!(
        snmp_of_node(&lab, "node-1", "Icmp", "InEchos"),
        before + 3,
        "x/a's own pings arrive"
    );
}

/// IPVS's path for UDP to a virtual server, with the same hooks and
/// addresses: the datagram, locally delivered to `VIP:PORT` (an address on
/// `kube-ipvs0`), is taken at the input hook before the filter chains (the
/// lab drops it at priority 99, where IPVS takes it; this reads it as it
/// arrived), and the node sends it on to `TARGET:PORT` with the client
/// pod's address still its source (the output hook; what a policy drops
/// there fails the send with EPERM).
const IPVS_STANDIN: &str = "import socket,struct,sys
vip,port,target=socket.inet_aton(sys.argv[1]),int(sys.argv[2]),sys.argv[3]
r=socket.socket(socket.AF_PACKET,socket.SOCK_DGRAM,socket.htons(0x0800))
while True:
  p=r.recv(4096)
  h=(p[0]&15)*4
  if p[9]!=17 or p[16:20]!=vip or struct.unpack('!H',p[h+2:h+4])[0]!=port: continue
  src,sport=socket.inet_ntoa(p[12:16]),struct.unpack('!H',p[h:h+2])[0]
  o=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)
  o.setsockopt(socket.SOL_IP,19,1)
  o.bind((src,sport))
  try: o.sendto(p[h+8:],(target,port))
  except PermissionError: pass
  o.close()";

/// Service traffic that kube-proxy's IPVS mode carries never crosses the
/// forward hook on the client's node: it is delivered locally to a
/// virtual server and sent on by the node. Weft judges it where its
/// destination is known (output), by the client's egress policy: allowed
/// to the backend's pods, it arrives; allowed elsewhere only, it does not,
/// while an unisolated pod's still does. Real IPVS where the kernel has it
/// (kube-proxy's virtual server in NAT mode, as `ipvsadm` makes it: in
/// meshlab's VM, `kernel::the_kernel_path_passes_in_a_vm`); elsewhere a
/// stand-in that takes the same hooks with the same addresses.
#[test]
fn service_traffic_through_ipvs_is_judged_by_the_client_s_egress_policy() {
    let lab = Lab::up("t-ipvs", &["--nodes", "2"]);
    add_pod(&lab, "node-1", "x/client", &["app=client"]);
    add_pod(&lab, "node-1", "x/other", &[]);
    let web = add_pod(&lab, "node-2", "x/web", &["app=web"]);
    let vip = "10.96.100.1";
    let real = lab
        .meshlab(&["exec", "node-1", "--", "ipvsadm", "-L", "-n"])
        .status
        .success();
    eprintln!("IPVS: {}", if real { "the kernel's" } else { "a stand-in" });
    // What reaches IPVS's turn at the input hook (priority 98, NAT_SRC - 2):
    // counted just before it.
    let mut steps = vec![vec![
        "nft",
        "add table ip ipvs-turn; add chain ip ipvs-turn in { type filter hook input priority 97; }; \
         add rule ip ipvs-turn in ip daddr 10.96.100.1 udp dport 9999 counter",
    ]];
    let backend = format!("{}:9999", web[0]);
    if real {
        steps.extend([
            vec!["ip", "link", "add", "kube-ipvs0", "type", "dummy"],
            vec!["ipvsadm", "-A", "-u", "10.96.100.1:9999", "-s", "rr"],
            vec![
                "ipvsadm",
                "-a",
                "-u",
                "10.96.100.1:9999",
                "-r",
                &backend,
                "-m",
            ],
        ]);
    } else {
        // This kernel has no dummy module, and an empty bridge holds an
        // address just as well; IPVS's taking the packet is a drop here
        // and a relay in userspace.
        steps.extend([
            vec!["ip", "link", "add", "kube-ipvs0", "type", "bridge"],
            vec![
                "nft",
                "add table ip ipvs-standin; add chain ip ipvs-standin in { type filter hook input priority 98; }; \
                 add rule ip ipvs-standin in ip daddr 10.96.100.1 udp dport 9999 drop",
            ],
        ]);
    }
    steps.extend([
        vec!["ip", "addr", "add", "10.96.100.1/32", "dev", "kube-ipvs0"],
        vec!["ip", "link", "set", "kube-ipvs0", "up"],
    ]);
    for step in steps {
        lab.ok(&[&["exec", "node-1", "--"], step.as_slice()].concat());
    }
    let mut relay = (!real).then(|| {
        lab.command(&[
            "exec",
            "node-1",
            "--",
            "/usr/bin/python3",
            "-c",
            IPVS_STANDIN,
            vip,
            "9999",
            &web[0],
        ])
        .spawn()
        .unwrap()
    });
    let send = |from: &str| {
        let script = format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             for _ in range(3): s.sendto(b'x',('{vip}',9999))"
        );
        in_pod(&lab, from, &["/usr/bin/python3", "-c", &script]);
    };
    // Datagrams reaching x/web (no listener: counted as NoPorts).
    let arrives = |from: &str| {
        let before = snmp(&lab, "x/web", "Udp", "NoPorts");
        send(from);
        std::thread::sleep(Duration::from_millis(300));
        snmp(&lab, "x/web", "Udp", "NoPorts") > before
    };
    wait_for("the stand-in to relay", Duration::from_secs(10), || {
        arrives("x/client")
    });
    let egress_to = |app: &str| {
        create(
            &lab,
            &format!("to-{app}.yaml"),
            &format!(
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: client-to-{app}, namespace: x}}\n\
                 spec: {{podSelector: {{matchLabels: {{app: client}}}}, policyTypes: [Egress], \
                 egress: [{{to: [{{podSelector: {{matchLabels: {{app: {app}}}}}}}]}}]}}\n"
            ),
        )
    };
    // What reached IPVS's priority at the input hook (nothing judged it
    // before: the virtual server's address is no destination policy knows).
    let taken = || -> u64 {
        let chain = lab.ok(&[
            "exec",
            "node-1",
            "--",
            "nft",
            "list",
            "chain",
            "ip",
            "ipvs-turn",
            "in",
        ]);
        let after = chain.split("packets ").nth(1).unwrap_or_default();
        after
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .parse()
            .unwrap_or(0)
    };
    let revision = egress_to("web");
    wait_programmed(&lab, "node-1", revision);
    let before = taken();
    assert!(
        arrives("x/client"),
        "allowed to x/web's pods, yet refused through the virtual server"
    );
    assert!(
        taken() >= before + 3,
        "the datagrams were judged before IPVS's turn"
    );
    lab.ok(&[
        "kubectl",
        "--",
        "delete",
        "networkpolicy",
        "-n",
        "x",
        "client-to-web",
    ]);
    let revision = egress_to("db");
    wait_programmed(&lab, "node-1", revision);
    assert!(
        !arrives("x/client"),
        "x/client's egress allows only app=db, yet x/web got its datagrams"
    );
    assert!(arrives("x/other"), "an unisolated pod's datagrams stopped");
    if let Some(relay) = relay.as_mut() {
        let _ = relay.kill();
        let _ = relay.wait();
    }
}

/// ClusterNetworkPolicy through the API on real connections. `nodes` peers
/// follow the Nodes' labels (a Node relabelled is enough, no policy
/// written); an Admin Accept in front of an Admin Deny wins; a policy with
/// an unusable Deny rule is enforced fail-closed (it denies all), reports
/// `Accepted=False` naming the field, and one node (not each) records a
/// Warning Event about it.
#[test]
fn cluster_network_policies_follow_nodes_and_bad_ones_fail_closed() {
    let lab = Lab::up("t-cnp", &["--nodes", "3"]);
    let a = add_pod(&lab, "node-2", "x/a", &["app=a"]);
    let b = add_pod(&lab, "node-3", "y/b", &[]);
    let pings = |pod: &str, target: &str| {
        lab.meshlab(&["pod", "exec", pod, "--", "ping", "-c1", "-W1", target])
            .status
            .success()
    };
    let (node1, node3) = ("198.18.1.1", "198.18.1.3");
    for target in [node1, node3, &b[0]] {
        wait_for(
            &format!("x/a to reach {target}"),
            Duration::from_secs(10),
            || pings("x/a", target),
        );
    }
    lab.kubectl(&["label", "node", "node-3", "role=infra"]);
    let revision = create(
        &lab,
        "nodes.yaml",
        "apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: infra}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: x}}}
  egress:
  - {name: edge, action: Accept, to: [{nodes: {matchLabels: {edge: 'true'}}}]}
  - {name: infra, action: Deny, to: [{nodes: {matchLabels: {role: infra}}}]}
",
    );
    wait_programmed(&lab, "node-2", revision);
    assert!(
        !pings("x/a", node3),
        "the Deny to infra nodes lets x/a reach node-3"
    );
    assert!(pings("x/a", node1), "node-1 is no infra node");
    assert!(pings("x/a", &b[0]), "a pod is no node");
    lab.kubectl(&["label", "node", "node-1", "role=infra"]);
    wait_for(
        "node-1, now infra, to be denied",
        Duration::from_secs(10),
        || !pings("x/a", node1),
    );
    lab.kubectl(&["label", "node", "node-1", "edge=true"]);
    wait_for(
        "node-1, now edge, to be accepted first",
        Duration::from_secs(10),
        || pings("x/a", node1),
    );
    let explained = lab.meshctl(&[
        "policy", "explain", "--from", "x/a", "--to", "y/b", "--port", "80/TCP",
    ]);
    assert!(explained.starts_with("ALLOWED"), "{explained}");

    // An ingress peer may not be `networks`: the rule cannot be read, and a
    // Deny that cannot be read denies all. (y/b has not pinged x/a: a ping
    // socket may reuse its echo id, which conntrack would take as the
    // earlier exchange.)
    let revision = create(
        &lab,
        "broken.yaml",
        "apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: broken}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: x}}}
  ingress:
  - {name: outsiders, action: Deny, from: [{networks: [203.0.113.0/24]}]}
",
    );
    wait_programmed(&lab, "node-2", revision);
    assert!(!pings("y/b", &a[0]), "an unusable Deny rule let y/b in");
    let condition = || {
        lab.kubectl(&[
            "get",
            "clusternetworkpolicy",
            "broken",
            "-o",
            "jsonpath={.status.conditions[0].status} {.status.conditions[0].reason} {.status.conditions[0].message}",
        ])
    };
    wait_for("broken's condition", Duration::from_secs(10), || {
        condition().starts_with("False InvalidRule")
    });
    assert!(
        condition().contains("spec.ingress[0].from[0]: ingress peers are namespaces or pods only"),
        "{}",
        condition()
    );
    // Every node has had its chance to race for the write.
    std::thread::sleep(Duration::from_secs(2));
    let about_broken: Vec<_> = lab
        .events()
        .into_iter()
        .filter(|e| e["regarding"]["name"] == "broken")
        .collect();
    assert_eq!(about_broken.len(), 1, "{about_broken:#?}");
    assert_eq!(about_broken[0]["regarding"]["kind"], "ClusterNetworkPolicy");
    assert_eq!(about_broken[0]["reason"], "WeftPolicyInvalid");
}
