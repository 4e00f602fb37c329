//! NetworkPolicy enforced by meshd on real pods across nodes, with real
//! TCP connections, following policy changes made through the API.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{wait_for, Lab};

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
        allowed.contains("allowed by x/only-b Ingress rule 0"),
        "{allowed}"
    );

    lab.ok(&["kubectl", "--", "delete", "-f", manifest.to_str().unwrap()]);
    wait_for("y/c -> x/a to be restored", Duration::from_secs(10), || {
        connects(&lab, "y/c", &a, 80)
    });
    let _ = server.kill();
    let _ = server.wait();
}
