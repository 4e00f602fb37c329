//! A compiled program rendered to nftables and applied in a node namespace
//! enforces with real TCP connections between pod namespaces. Needs root.

use std::collections::BTreeMap;
use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;
use weft_policy::engine::Engine;
use weft_policy::{
    compile, netlink, nft, render, Identity, NamedPort, NamespaceInfo, PodInfo, Protocol,
};

const NODE: &str = "polt-node";

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

/// Namespaces (and servers) made here; removed on drop, and before a run in
/// case an earlier one crashed.
struct World {
    servers: Vec<Child>,
    /// `net.netfilter.nf_log_all_netns` as found, restored on drop.
    log_all_netns: Option<String>,
}

const LOG_ALL_NETNS: &str = "/proc/sys/net/netfilter/nf_log_all_netns";

fn clean() {
    for ns in [NODE, "polt-a", "polt-b", "polt-c"] {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        if let Some(was) = &self.log_all_netns {
            let _ = std::fs::write(LOG_ALL_NETNS, was);
        }
        clean();
    }
}

/// Pod `name` at 198.19.9.`host`, wired to the node as the weft plugin does.
fn wire(name: &str, host: u8) {
    let (pod_ns, addr) = (format!("polt-{name}"), format!("198.19.9.{host}"));
    ip(&["netns", "add", &pod_ns]);
    ip(&[
        "-n",
        NODE,
        "link",
        "add",
        &format!("v{name}"),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &pod_ns,
    ]);
    ip(&[
        "-n",
        NODE,
        "addr",
        "add",
        "198.19.9.1/32",
        "dev",
        &format!("v{name}"),
    ]);
    ip(&["-n", NODE, "link", "set", &format!("v{name}"), "up"]);
    ip(&[
        "-n",
        NODE,
        "route",
        "add",
        &format!("{addr}/32"),
        "dev",
        &format!("v{name}"),
    ]);
    ip(&[
        "-n",
        &pod_ns,
        "addr",
        "add",
        &format!("{addr}/32"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", &pod_ns, "link", "set", "eth0", "up"]);
    ip(&["-n", &pod_ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &pod_ns,
        "route",
        "add",
        "198.19.9.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    ip(&[
        "-n",
        &pod_ns,
        "route",
        "add",
        "default",
        "via",
        "198.19.9.1",
        "dev",
        "eth0",
    ]);
}

/// A server in pod `name` accepting on `ports` until killed.
fn serve(name: &str, ports: &[u16]) -> Child {
    let script = format!(
        "import socket,threading\nports={ports:?}\ndef run(p):\n s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',p));s.listen(16)\n while True:\n  c,_=s.accept();c.close()\nfor p in ports: threading.Thread(target=run,args=(p,)).start()\n"
    );
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("polt-{name}"),
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("python3")
}

/// Whether a TCP connection from pod `from` to `addr`:`port` succeeds within a second.
fn connects(from: &str, addr: &str, port: u16) -> bool {
    let script =
        format!("import socket\nsocket.create_connection(('{addr}',{port}),timeout=1).close()");
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("polt-{from}"),
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn pod(ns: &str, name: &str, host: u8) -> PodInfo {
    PodInfo {
        identity: Identity::Api,
        namespace: ns.into(),
        name: name.into(),
        node: "n".into(),
        labels: BTreeMap::from([("pod".to_string(), name.to_string())]),
        ips: vec![format!("198.19.9.{host}").parse().unwrap()],
        ports: vec![NamedPort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Tcp,
        }],
    }
}

#[test]
fn a_rendered_program_enforces_with_real_connections() {
    clean();
    ip(&["netns", "add", NODE]);
    let mut world = World {
        servers: Vec::new(),
        log_all_netns: None,
    };
    assert!(Command::new("ip")
        .args([
            "netns",
            "exec",
            NODE,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1"
        ])
        .status()
        .unwrap()
        .success());
    for (name, host) in [("a", 2), ("b", 3), ("c", 4)] {
        wire(name, host);
    }
    world.servers.push(serve("a", &[80, 81]));
    world.servers.push(serve("b", &[80]));
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        connects("c", "198.19.9.2", 80),
        "the pods are not wired (no policy yet)"
    );

    // x/a accepts only x/b, on its named port http (80).
    let policy: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "only-b", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": "http"}]}]}
    }))
    .unwrap();
    let pods = vec![pod("x", "a", 2), pod("x", "b", 3), pod("y", "c", 4)];
    let namespaces = [
        NamespaceInfo {
            name: "x".into(),
            labels: BTreeMap::new(),
        },
        NamespaceInfo {
            name: "y".into(),
            labels: BTreeMap::new(),
        },
    ];
    let ruleset = |policy: &NetworkPolicy, pods: &[PodInfo]| {
        render::render(
            &compile(
                "n",
                std::slice::from_ref(policy),
                Default::default(),
                pods,
                &namespaces,
            ),
            &render::Options::default(),
        )
    };
    let first = ruleset(&policy, &pods);
    // No table yet: the structure, then every element over netlink.
    let (transaction, _) = nft::fresh(&first);
    in_node(move || {
        let mut session = nft::Session::open()?;
        assert!(!session.table_exists()?, "a table before the first load");
        session.apply(&transaction)?;
        assert!(session.table_exists()?, "no table after the first load");
        Ok::<_, weft_policy::netlink::EnforceError>(())
    })
    .unwrap();

    assert!(connects("b", "198.19.9.2", 80), "b -> a:80 is allowed");
    assert!(!connects("b", "198.19.9.2", 81), "b -> a:81 is not");
    assert!(!connects("c", "198.19.9.2", 80), "c -> a:80 is not");
    assert!(connects("c", "198.19.9.3", 80), "b is not isolated");
    assert!(
        connects("a", "198.19.9.3", 80),
        "a's egress is not isolated; replies flow"
    );
    let drops: u64 = in_node(nft::counters).unwrap().values().sum();
    assert!(drops > 0, "denied SYNs were not counted");

    // Drop logging: the group chain gains a rate-limited log line; a
    // denied SYN reaches the kernel log with the isolating policy named.
    // (Outside the host's namespace the kernel logs only when told to.)
    world.log_all_netns = std::fs::read_to_string(LOG_ALL_NETNS).ok();
    std::fs::write(LOG_ALL_NETNS, "1").unwrap();
    let logged = render::render(
        &compile(
            "n",
            std::slice::from_ref(&policy),
            Default::default(),
            &pods,
            &namespaces,
        ),
        &render::Options {
            log_per_second: Some(5),
        },
    );
    let (transaction, changes) = nft::diff(&first, &logged).expect("a change");
    assert_eq!(changes.sets, 0, "{changes:?}");
    in_node(move || apply(&transaction)).unwrap();
    let kernel_log = || {
        let out = Command::new("dmesg").output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    // The ring buffer rotates: what is new follows the last line seen
    // (each starts with its timestamp).
    let last = kernel_log().pop().unwrap_or_default();
    assert!(!connects("c", "198.19.9.2", 81));
    let now = kernel_log();
    let new = now.iter().position(|l| *l == last).map_or(0, |i| i + 1);
    assert!(
        now[new..]
            .iter()
            .any(|l| l.contains("weft drop ingress isolated by x/only-b: ")
                && l.contains("DST=198.19.9.2")
                && l.contains("DPT=81")),
        "no drop logged"
    );
    let (transaction, _) = nft::diff(&logged, &first).expect("a change");
    in_node(move || apply(&transaction)).unwrap();

    // b is relabelled pod=z: only set elements change.
    let mut relabelled = pods.clone();
    relabelled[1].labels.insert("pod".into(), "z".into());
    let second = ruleset(&policy, &relabelled);
    let (transaction, changes) = nft::diff(&first, &second).expect("a change");
    assert_eq!((changes.chains, changes.sets), (0, 0), "{changes:?}");
    assert_eq!(changes.elements_removed, 1, "{changes:?}");
    assert!(
        netlink::Batch::of(&transaction.commands).is_some(),
        "an element-only change goes straight over netlink"
    );
    in_node(move || apply(&transaction)).unwrap();
    assert!(!connects("b", "198.19.9.2", 80), "b, now pod=z, -> a:80");

    // Relabelled back, the policy moves to port 81: its chain changes
    // and the sets of its rule, nothing else.
    let second = ruleset(&policy, &pods);
    let (transaction, _) = nft::diff(&ruleset(&policy, &relabelled), &second).expect("a change");
    in_node(move || apply(&transaction)).unwrap();
    let relabelled = pods.clone();
    // The policy moves to port 81: its chain changes, nothing else's.
    let mut moved = policy.clone();
    moved.spec.as_mut().unwrap().ingress.as_mut().unwrap()[0].ports =
        serde_json::from_value(json!([{"port": 81}])).unwrap();
    let third = ruleset(&moved, &relabelled);
    let (transaction, changes) = nft::diff(&second, &third).expect("a change");
    assert_eq!(changes.chains, 1, "{changes:?}");
    in_node(move || apply(&transaction)).unwrap();
    assert!(connects("b", "198.19.9.2", 81), "b -> a:81 now");
    assert!(!connects("c", "198.19.9.2", 81), "c -> a:81 still not");
    assert!(!connects("b", "198.19.9.2", 80), "b -> a:80 no more");
    assert!(
        nft::diff(&third, &third).is_none(),
        "no change, no transaction"
    );

    // What the differences built is what one full apply builds.
    let listing = || {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                NODE,
                "nft",
                "list",
                "table",
                "inet",
                render::TABLE,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // Objects list in creation order; their contents must agree.
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.contains("packets"))
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    };
    let by_difference = listing();
    let (transaction, _) = nft::full(&third);
    in_node(move || apply(&transaction)).unwrap();
    assert_eq!(by_difference, listing());

    // Pod by pod through the engine: b relabelled pod=a joins a's group
    // (a verdict-map entry, over netlink) and is isolated like a.
    let mut engine = Engine::new("n", render::Options::default());
    engine.load(weft_policy::Snapshot {
        policies: vec![moved],
        namespaces: namespaces.to_vec(),
        pods: relabelled,
        ..Default::default()
    });
    assert_eq!(engine.ruleset(), &third);
    assert!(connects("c", "198.19.9.3", 80), "b is not isolated yet");
    let mut b_as_a = pods[1].clone();
    b_as_a.labels.insert("pod".into(), "a".into());
    let (transaction, changes) = engine.pod("x/b", Some(b_as_a)).expect("a change");
    assert!(netlink::Batch::of(&transaction.commands).is_some());
    assert_eq!((changes.chains, changes.sets), (0, 0), "{changes:?}");
    in_node(move || apply(&transaction)).unwrap();
    assert!(
        !connects("c", "198.19.9.3", 80),
        "b, now pod=a, is isolated"
    );
}

/// Runs one transaction in a session of its own (the calling thread's
/// network namespace).
fn apply(transaction: &nft::Transaction) -> Result<(), weft_policy::netlink::EnforceError> {
    nft::Session::open()?.apply(transaction)
}

/// Runs `f` on a thread inside the node namespace (`nft` runs in the
/// namespace of the thread that starts it).
fn in_node<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let node = File::open(format!("/run/netns/{NODE}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&node, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}
