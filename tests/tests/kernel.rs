//! Kernel WireGuard, end to end. Every current distribution's kernel has
//! WireGuard, so `auto` takes the kernel path on real nodes; this machine's
//! kernel has none. `the_kernel_path_passes_in_a_vm` boots one QEMU guest on
//! Debian's kernel (meshlab's VM: the host's files, the guest's kernel) and
//! runs there this file's tests ignored "needs kernel WireGuard" and the other targets'
//! tests listed in [`ALSO_IN_THE_VM`], which then meet kernel links.
//! `auto_picks_kernel_wireguard_exactly_where_the_kernel_has_it` asserts
//! the host's half of `auto` (userspace where the kernel has no WireGuard);
//! the guest's half is in the mixed mesh's test.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{link_kind, node, wait_for, Lab, Traffic};
use meshlab::vm::{Guest, Lifetime, Vm};

/// How a test run in the guest shows it met the guest's kernel, where it
/// could also pass on the host's.
#[derive(Debug, Clone, Copy)]
enum Proof {
    /// Its labs printed their data planes, all kernel links.
    KernelLinks,
    /// It printed this.
    Printed(&'static str),
    /// It cannot pass without the guest's kernel (it makes kernel links).
    Itself,
}

/// Tests of other targets that run again in the guest, where they meet
/// kernel links instead of userspace devices: (target, test, proof).
const ALSO_IN_THE_VM: &[(&str, &str, Proof)] = &[
    // Not here, to keep the suite in its time (each costs two minutes
    // under TCG) where the guest's own runs already cover it:
    // host_encryption's test (every lab here runs WEFT_ENCRYPT_HOST on
    // kernel links: `up` waits until each node routes the others' host
    // addresses into the mesh, which loops unless the kernel device marks
    // its datagrams, and the host counter must be 0 at teardown);
    // mesh::full_mesh_carries_pod_traffic_only_encrypted (pods of both
    // families cross kernel links in this file's own tests, and the
    // sentinel counts plaintext in every one); and
    // faults::changing_a_peer_keeps_every_data_plane_alive (the kernel
    // device's in-place peer changes are dataplane's test below; meshd's
    // diff is the same for both kinds).
    // meshd killed: the kernel link is adopted, no ping lost
    (
        "mesh",
        "kill_9_of_meshd_loses_no_pings_and_the_data_plane_is_adopted",
        Proof::KernelLinks,
    ),
    // the fail-closed backstops with a peer pending and removed
    (
        "faults",
        "no_plaintext_whatever_happens_to_a_peer",
        Proof::KernelLinks,
    ),
    // relays and failover
    (
        "routing",
        "a_cut_link_is_routed_through_a_relay_and_back_without_resetting_tcp",
        Proof::KernelLinks,
    ),
    // uninstall removes the kernel link
    (
        "uninstall",
        "the_cleanup_daemonset_leaves_nothing_of_weft_on_any_node",
        Proof::KernelLinks,
    ),
    // the data plane suite held against kernel WireGuard: the contract
    // both implementations keep, and every packet kind between them
    (
        "dataplane",
        "kernel_peers_change_in_place_under_traffic_without_loss",
        Proof::Itself,
    ),
    (
        "dataplane",
        "every_offload_path_crosses_to_kernel_wireguard_unchanged",
        Proof::Itself,
    ),
    // post-quantum preshared keys on kernel links, under `require`: agreed,
    // the first key restarts the entries (the kernel keeps sessions across
    // a key change), pods reach each other only then, and a capture of the
    // session opens with the key only. (The rotation-under-traffic test
    // passes here too, 0 of 500 pings lost, but takes four minutes.)
    (
        "post_quantum",
        "a_capture_does_not_open_with_the_x25519_secrets_alone",
        Proof::KernelLinks,
    ),
    // kube-proxy's IPVS mode for real, under NetworkPolicy
    (
        "policy",
        "service_traffic_through_ipvs_is_judged_by_the_client_s_egress_policy",
        Proof::Printed("IPVS: the kernel's"),
    ),
];

/// What is wrong with a guest run's output for `proof`, if anything.
fn unproven(proof: Proof, stderr: &str) -> Option<String> {
    match proof {
        Proof::Itself => None,
        Proof::Printed(marker) => {
            (!stderr.contains(marker)).then(|| format!("it did not print {marker:?}"))
        }
        Proof::KernelLinks => {
            let planes: Vec<&str> = stderr
                .lines()
                .filter_map(|l| l.strip_prefix(common::DATA_PLANES_MARKER))
                .collect();
            let all_kernel = !planes.is_empty()
                && planes
                    .iter()
                    .flat_map(|l| l.split_whitespace())
                    .all(|n| n.ends_with("=wireguard"));
            (!all_kernel)
                .then(|| format!("its labs' data planes were not all kernel links: {planes:?}"))
        }
    }
}

#[test]
fn a_guest_run_counts_only_with_its_proof_and_its_count() {
    let planes = |l: &str| format!("{}{l}\n", common::DATA_PLANES_MARKER);
    let kernel = planes("node-1=wireguard node-2=wireguard");
    let mixed = planes("node-1=wireguard node-2=tun");
    let cases = [
        (Proof::KernelLinks, kernel.as_str(), true),
        (Proof::KernelLinks, mixed.as_str(), false),
        (Proof::KernelLinks, "no lab printed anything\n", false),
        (
            Proof::Printed("IPVS: the kernel's"),
            "IPVS: the kernel's\n",
            true,
        ),
        (
            Proof::Printed("IPVS: the kernel's"),
            "IPVS: a stand-in\n",
            false,
        ),
        (Proof::Itself, "", true),
    ];
    for (proof, stderr, ok) in cases {
        assert_eq!(
            unproven(proof, stderr).is_none(),
            ok,
            "{proof:?} {stderr:?}"
        );
    }
    let summary = "running 1 test\ntest x ... ok\n\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 8 filtered out; finished in 1.2s\n";
    assert_eq!(passed(summary), Some(1));
    assert_eq!(passed("running 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 9 filtered out; finished in 0.00s\n"), Some(0));
    assert_eq!(passed("test result: FAILED. 0 passed; 1 failed"), None);
}

/// How many tests libtest says passed (its summary line).
fn passed(stdout: &str) -> Option<usize> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .find_map(|l| l.split(" passed").next()?.trim().parse().ok())
}

/// How long the whole guest run may take (scaled for TCG by the VM).
const SUITE_LIMIT: Duration = Duration::from_secs(600);

/// The newest build of test target `name` next to this one that holds
/// `test` (cargo names every target's binary `NAME-HASH` in one
/// directory, so no other target of the workspace may be named like a
/// test target listed here: a benchmark once was, and ran in its place).
fn sibling(name: &str, test: &str) -> PathBuf {
    let me = std::env::current_exe().expect("this test binary");
    let dir = me.parent().expect("its directory");
    let holds = |path: &Path| {
        std::process::Command::new(path)
            .args(["--list", "--include-ignored", "--exact", test])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{test}: test")))
    };
    let newest = std::fs::read_dir(dir)
        .expect("the test binaries' directory")
        .filter_map(|e| e.ok())
        .filter(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            file.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|hash| hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter(|e| holds(&e.path()))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    newest
        .unwrap_or_else(|| {
            panic!(
                "no test binary {name}-HASH with {test} in {}",
                dir.display()
            )
        })
        .path()
}

/// Tests of this file the guest does not run: the harness, and the check
/// of `auto` on both kernels, whose guest half
/// (`a_mixed_mesh_carries_pods_and_rotates_keys_across_kinds`: `auto`
/// nodes on kernel links beside a userspace one) the guest runs anyway.
const HOST_ONLY: &[&str] = &[
    "the_kernel_path_passes_in_a_vm",
    "auto_picks_kernel_wireguard_exactly_where_the_kernel_has_it",
];

/// The tests of this file the guest runs: every one but [`HOST_ONLY`].
fn own_tests() -> usize {
    let me = std::env::current_exe().expect("this test binary");
    let list = std::process::Command::new(me)
        .args(["--list", "--include-ignored"])
        .output()
        .expect("listing this binary's tests");
    String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|name| !HOST_ONLY.contains(name))
        .count()
}

/// Boots the guest and runs the kernel path there: this file's tests (the
/// ones for both kernels included), then the other targets' listed tests.
/// Everything runs; the failures are reported together. A run counts only
/// if it ran what it should (libtest's count) and shows it met the guest's
/// kernel ([`Proof`]).
#[test]
fn the_kernel_path_passes_in_a_vm() {
    let dir = Vm::dir(
        Path::new(meshlab::vm::DEFAULT_ROOT),
        Guest::Run("kernel-suite"),
    );
    let vm = Vm::boot(&dir, Lifetime::Process).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("VM up: {:?}, kernel {}", vm.accel, vm.kernel_release);
    let cwd = std::env::current_dir().expect("the working directory");
    let me = std::env::current_exe()
        .expect("this test binary")
        .to_string_lossy()
        .into_owned();
    let mut own = vec![me, "--include-ignored".into(), "--exact".into()];
    for skipped in HOST_ONLY {
        own.extend(["--skip".to_string(), skipped.to_string()]);
    }
    own.extend(["--test-threads".into(), "1".into()]);
    let mut runs: Vec<(String, Vec<String>, usize, Proof)> =
        vec![("kernel".into(), own, own_tests(), Proof::Itself)];
    for (target, test, proof) in ALSO_IN_THE_VM {
        let argv = vec![
            sibling(target, test).to_string_lossy().into_owned(),
            "--exact".into(),
            test.to_string(),
            "--include-ignored".into(),
            "--nocapture".into(),
        ];
        runs.push((format!("{target}::{test}"), argv, 1, *proof));
    }
    let mut failed = Vec::new();
    for (what, argv, expected, proof) in runs {
        let started = std::time::Instant::now();
        let out = vm
            .run(&argv, &cwd, SUITE_LIMIT)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        eprintln!(
            "in the VM: {what}: exit {} after {:.0?}",
            out.code,
            started.elapsed()
        );
        let wrong = if !out.success() {
            Some("it failed".to_string())
        } else if passed(&stdout) != Some(expected) {
            Some(format!("{:?} passed, not {expected}", passed(&stdout)))
        } else {
            unproven(proof, &stderr)
        };
        if let Some(wrong) = wrong {
            eprintln!("{what}: {wrong}:\n{stdout}\n{stderr}");
            failed.push(what);
        }
    }
    assert!(failed.is_empty(), "failed in the VM: {failed:?}");
}

/// Whether this kernel can make WireGuard links.
fn kernel_has_wireguard() -> bool {
    std::process::Command::new("modprobe")
        .arg("wireguard")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Pings every other node's pods in both families from each node.
fn pods_reach_each_other(lab: &Lab, nodes: &[&str]) {
    for from in nodes {
        for to in nodes.iter().filter(|n| *n != from) {
            for target in lab.pod_addresses(to) {
                let out = lab.ping(from, &target, 2, 0.2);
                assert!(
                    out.status.success(),
                    "{from} cannot reach {to} at {target}: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
    }
}

/// On both kernels: `auto` picks kernel WireGuard where the kernel has it
/// and Weft's userspace device where it has not, and pods cross either.
#[test]
fn auto_picks_kernel_wireguard_exactly_where_the_kernel_has_it() {
    let lab = Lab::up("t-kernel-auto", &["--nodes", "2", "--pods-per-node", "1"]);
    // The guest's kernel has WireGuard by definition (it refuses to boot
    // without the module): there, nothing may fall back.
    let want = if meshlab::vm::in_guest() || kernel_has_wireguard() {
        "wireguard"
    } else {
        "tun"
    };
    for name in ["node-1", "node-2"] {
        assert_eq!(link_kind(&lab, name), want, "{name}'s data plane");
    }
    pods_reach_each_other(&lab, &["node-1", "node-2"]);
    // Every netlink answer read to its end (the kernel path polls its link
    // every second; a dropped answer's rest is a warning each time).
    for name in ["node-1", "node-2"] {
        let log =
            std::fs::read_to_string(lab.dir().join(name).join("meshd.log")).expect("meshd's log");
        assert!(
            !log.contains("failed to forward response back to the handle"),
            "{name}: netlink answers dropped unread"
        );
    }
}

/// The kernel-only overlay installs where the kernel has WireGuard.
#[test]
#[ignore = "needs kernel WireGuard: runs in the VM (the_kernel_path_passes_in_a_vm)"]
fn the_kernel_only_overlay_installs() {
    // Rendered as an admin would (the lab takes overlays with patches only
    // rendered).
    let overlay = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/overlays/kernel-only");
    let rendered = std::process::Command::new("/usr/bin/kubectl")
        .arg("kustomize")
        .arg(&overlay)
        .output()
        .expect("kubectl kustomize");
    assert!(rendered.status.success(), "{rendered:?}");
    let file = tempfile::NamedTempFile::with_suffix(".yaml").expect("a temporary file");
    std::fs::write(file.path(), &rendered.stdout).expect("writing the manifests");
    let manifests = file.path().to_string_lossy().into_owned();
    let lab = Lab::up(
        "t-kernel-only",
        &[
            "--nodes",
            "2",
            "--pods-per-node",
            "1",
            "--manifests",
            &manifests,
        ],
    );
    for name in ["node-1", "node-2"] {
        assert_eq!(link_kind(&lab, name), "wireguard", "{name}'s data plane");
    }
    pods_reach_each_other(&lab, &["node-1", "node-2"]);
}

/// A mixed mesh: kernel links on node-1 and node-3, Weft's userspace
/// device on node-2. Pods cross between them both ways in both families,
/// and each kind rotates its key under traffic to the other. The kernel
/// link switches at the announced time and every session is renegotiated;
/// the userspace device answers both keys, but a kernel peer cannot keep a
/// session across a peer's key change (a peer is its key there), so it
/// re-handshakes. Either way one handshake's worth of packets may be lost:
/// a quarter of a second of pings for the switch, half a second for the
/// re-handshake, stretched by the time scale under TCG, where a handshake
/// takes hundreds of milliseconds (the host holds the switch to 1 in 100
/// on wireguard-go,
/// `keys::a_one_key_data_plane_switches_at_the_announced_time`). The TCP
/// streams survive, and afterwards no device knows the old key.
#[test]
#[ignore = "needs kernel WireGuard: runs in the VM (the_kernel_path_passes_in_a_vm)"]
fn a_mixed_mesh_carries_pods_and_rotates_keys_across_kinds() {
    let lab = Lab::up(
        "t-kernel-mixed",
        &[
            "--nodes",
            "3",
            "--pods-per-node",
            "1",
            "--userspace",
            "node-2",
        ],
    );
    assert_eq!(link_kind(&lab, "node-1"), "wireguard");
    assert_eq!(link_kind(&lab, "node-2"), "tun");
    assert_eq!(link_kind(&lab, "node-3"), "wireguard");
    pods_reach_each_other(&lab, &["node-1", "node-2", "node-3"]);

    let key = |name: &str| {
        node(&lab.status(), name)["publicKey"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // (rotating node, pings it may lose of 400 per direction): a quarter
    // and half a second of them, stretched with a handshake's time on a
    // slow machine.
    let scale = meshlab::lab::scaled(Duration::from_secs(1)).as_secs() as u32;
    for (rotating, bound) in [("node-1", 5 * scale), ("node-2", 10 * scale)] {
        let before = key(rotating);
        // Rate-capped: TCG encrypts in emulated instructions, and a
        // saturated guest slows the handshake measured.
        let there = Traffic::start_at(&lab, "pod-1-1", "pod-2-1", 20, "1M");
        let back = Traffic::start_at(&lab, "pod-2-1", "pod-1-1", 20, "1M");
        std::thread::sleep(Duration::from_secs(3));
        let out = lab.meshctl(&["keys", "rotate", rotating]);
        assert!(
            out.starts_with(&format!("{rotating}: rotated to ")),
            "{out}"
        );
        for (direction, traffic) in [("node-1 to node-2", there), ("node-2 to node-1", back)] {
            let (lost, retransmits) = traffic.finish();
            eprintln!("{rotating} rotated, {direction}: {lost} of 400 pings lost, {retransmits} TCP retransmits");
            assert!(
                lost <= bound,
                "{rotating} rotated, {direction}: {lost} of 400 pings lost"
            );
        }
        wait_for(
            "the rotated key on every device",
            Duration::from_secs(30),
            || {
                let now = key(rotating);
                now != before
                    && lab.status()["nodes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|n| n["peers"].as_array().cloned().unwrap_or_default())
                        .all(|p| p["publicKey"].as_str() != Some(before.as_str()))
            },
        );
    }
    pods_reach_each_other(&lab, &["node-1", "node-2", "node-3"]);
}

/// NetworkPolicy over SCTP with real associations: on the host, whose
/// kernel has no SCTP sockets, `meshlab netpol` can only exchange INIT and
/// INIT ACK on raw sockets. The case has blocked and connected cells, so a
/// probe that always or never connects fails it.
#[test]
#[ignore = "needs kernel SCTP: runs in the VM (the_kernel_path_passes_in_a_vm)"]
fn sctp_network_policy_holds_on_real_associations() {
    let lab = Lab::up("t-kernel-sctp", &[]);
    let case = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("netpol/upstream/056-sctp-support-a-default-deny-ingress-policy.yaml");
    let mut netpol = lab.command(&["netpol"]);
    netpol.arg(&case);
    let out = common::run_bounded(netpol, Duration::from_secs(300));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stderr.contains("associations over this kernel's SCTP sockets"),
        "not real SCTP:\n{stderr}"
    );
    assert!(
        out.status.success() && stdout.contains("PASS 056-"),
        "{stdout}\n{stderr}"
    );
}

/// Receives one TCP stream on port 5001 (both families) and prints its
/// SHA-256.
const RECEIVE: &str = "import hashlib,socket
s=socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)
s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)
s.bind(('::',5001)); s.listen(1); s.settimeout(120)
c,_=s.accept(); c.settimeout(120); h=hashlib.sha256()
while True:
  b=c.recv(65536)
  if not b: break
  h.update(b)
print(h.hexdigest())";

/// Sends 4 MiB of random bytes to argv[1]:5001 and prints their SHA-256.
const SEND: &str = "import hashlib,os,socket,sys
d=os.urandom(4<<20)
c=socket.create_connection((sys.argv[1],5001),timeout=120)
c.sendall(d); c.shutdown(socket.SHUT_WR); c.recv(1)
print(hashlib.sha256(d).hexdigest())";

/// The underlay as a WAN is, made by netem (which only the guest's kernel
/// has): delay with jitter, 1% loss and reordering, on both nodes, between
/// a kernel link and Weft's userspace device. A stream crosses each way in
/// each family byte for byte, and netem really dropped packets.
#[test]
#[ignore = "needs netem: runs in the VM (the_kernel_path_passes_in_a_vm)"]
fn streams_cross_a_lossy_reordering_underlay_unchanged() {
    let lab = Lab::up(
        "t-kernel-netem",
        &[
            "--nodes",
            "2",
            "--pods-per-node",
            "1",
            "--userspace",
            "node-2",
        ],
    );
    for name in ["node-1", "node-2"] {
        lab.ok(&[
            "exec", name, "--", "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay",
            "10ms", "5ms", "loss", "1%", "reorder", "25%", "50%",
        ]);
    }
    let address = |pod: &str, family: usize| {
        let (_, _, ips) = lab
            .pods()
            .into_iter()
            .find(|(name, _, _)| name == pod)
            .unwrap_or_else(|| panic!("no pod {pod}"));
        ips[family].clone()
    };
    for (from, to, family) in [("pod-1-1", "pod-2-1", 0), ("pod-2-1", "pod-1-1", 1)] {
        let limit = Duration::from_secs(180);
        let receiver = lab.command(&["pod", "exec", to, "--", "/usr/bin/python3", "-c", RECEIVE]);
        let receiver = std::thread::spawn(move || common::run_bounded(receiver, limit));
        std::thread::sleep(Duration::from_secs(2));
        let target = address(to, family);
        let sender = common::run_bounded(
            lab.command(&[
                "pod",
                "exec",
                from,
                "--",
                "/usr/bin/python3",
                "-c",
                SEND,
                &target,
            ]),
            limit,
        );
        let received = receiver.join().expect("the receiver");
        let (sent, got) = (
            String::from_utf8_lossy(&sender.stdout).trim().to_string(),
            String::from_utf8_lossy(&received.stdout).trim().to_string(),
        );
        assert!(
            sender.status.success() && sent.len() == 64,
            "{from} -> {to} ({target}): {}",
            String::from_utf8_lossy(&sender.stderr)
        );
        assert_eq!(got, sent, "{from} -> {to} ({target}): other bytes arrived");
    }
    for name in ["node-1", "node-2"] {
        let stats = lab.ok(&[
            "exec", name, "--", "tc", "-s", "qdisc", "show", "dev", "eth0",
        ]);
        let dropped: u64 = stats
            .split("dropped ")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(dropped > 0, "{name}: netem dropped nothing:\n{stats}");
    }
}
