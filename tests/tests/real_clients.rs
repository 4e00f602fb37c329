//! Real Kubernetes clients against a running lab: Debian's kubectl and the
//! official Python client. They must not be able to tell the lab's API
//! server from the real one for what Weft and its admins do.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{run_bounded, Lab};
use serde_json::Value;

const NETPOL: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-ingress
  namespace: default
spec:
  podSelector:
    matchLabels: {app: web}
  policyTypes: [Ingress]
"#;

#[test]
fn debian_kubectl() {
    let kubectl_path = meshlab::lab::preflight::kubectl().expect("kubectl (run tests/setup)");
    let version = Command::new(&kubectl_path)
        .args(["version", "--client", "--short"])
        .output()
        .unwrap();
    eprintln!(
        "kubectl: {}",
        String::from_utf8_lossy(&version.stdout).trim()
    );

    let lab = Lab::up("t-kubectl", &["--nodes", "2"]);
    let nodes: Value = serde_json::from_str(&lab.kubectl(&["get", "nodes", "-o", "json"])).unwrap();
    let items = nodes["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let node1 = &items[0];
    assert_eq!(node1["metadata"]["name"], "node-1");
    assert_eq!(
        node1["status"]["addresses"][0],
        serde_json::json!({"type": "InternalIP", "address": "198.18.1.1"})
    );
    assert_eq!(node1["spec"]["podCIDRs"][1], "fd98:19:0:1::/64");

    assert!(lab
        .kubectl(&["annotate", "node", "node-1", "weft.dev/owner=kubectl"])
        .contains("annotated"));
    assert!(lab
        .kubectl(&["label", "node", "node-1", "role=edge"])
        .contains("labeled"));
    let got = lab.kubectl(&[
        "get",
        "node",
        "node-1",
        "-o",
        "jsonpath={.metadata.annotations.weft\\.dev/owner} {.metadata.labels.role}",
    ]);
    assert_eq!(got, "kubectl edge");
    assert!(
        lab.kubectl(&["get", "nodes", "-l", "role=edge", "-o", "name"])
            .trim()
            == "node/node-1"
    );
    // Overwriting without --overwrite is refused client-side after a GET; with it, applied.
    let refused = lab.meshlab(&["kubectl", "--", "label", "node", "node-1", "role=core"]);
    assert!(!refused.status.success());
    lab.kubectl(&["label", "node", "node-1", "role=core", "--overwrite"]);

    let manifest = lab.dir().join("netpol.yaml");
    std::fs::write(&manifest, NETPOL).unwrap();
    let m = manifest.to_str().unwrap();
    assert!(lab.kubectl(&["create", "-f", m]).contains("created"));
    let np: Value =
        serde_json::from_str(&lab.kubectl(&["get", "networkpolicy", "deny-ingress", "-o", "json"]))
            .unwrap();
    assert_eq!(np["spec"]["podSelector"]["matchLabels"]["app"], "web");
    assert_eq!(np["metadata"]["generation"], 1);
    let dup = lab.meshlab(&["kubectl", "--", "create", "-f", m]);
    assert!(String::from_utf8_lossy(&dup.stderr).contains("AlreadyExists"));
    assert!(lab.kubectl(&["delete", "-f", m]).contains("deleted"));
    let gone = lab.meshlab(&["kubectl", "--", "get", "networkpolicy", "deny-ingress"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
    assert!(lab
        .kubectl(&["delete", "node", "node-2"])
        .contains("deleted"));
    assert_eq!(
        lab.kubectl(&["get", "nodes", "-o", "name"]).trim(),
        "node/node-1"
    );
}

#[test]
fn official_python_client() {
    let lab = Lab::up("t-python", &["--nodes", "2"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python_watch.py");
    // Debian's interpreter: python3-kubernetes is installed for it, not for
    // whatever python3 comes first on PATH.
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args([script, &lab.kubeconfig(), "node-2"]);
    let out = run_bounded(cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("list_node node-1,node-2"), "{stdout}");
    assert!(stdout.contains("watch MODIFIED node-2"), "{stdout}");
}

/// `kubectl apply -k` of deploy/ and of every overlay, with Debian's kubectl
/// (1.20, kustomize 2.0) and the image's newer one: each installs, reads
/// back as rendered, and `delete -k` removes it again.
#[test]
fn both_kubectls_install_and_remove_every_variant() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut variants = vec![repo.join("deploy")];
    for overlay in std::fs::read_dir(repo.join("deploy/overlays")).unwrap() {
        variants.push(overlay.unwrap().path());
    }
    variants.sort();
    assert!(variants.len() >= 5, "{variants:?}");
    let kubectls: Vec<std::path::PathBuf> = [
        std::path::PathBuf::from(meshlab::lab::preflight::DEBIAN_KUBECTL),
        std::path::PathBuf::from("/usr/bin/kubectl"),
    ]
    .into_iter()
    .filter(|k| k.is_file())
    .collect();
    assert!(!kubectls.is_empty(), "no kubectl (run tests/setup)");

    let lab = Lab::up("t-install", &["--nodes", "1"]);
    let run = |kubectl: &std::path::Path, args: &[&str]| -> String {
        let mut cmd = Command::new(kubectl);
        cmd.args(args).env("KUBECONFIG", lab.kubeconfig());
        let out = run_bounded(cmd, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            kubectl.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The lab installed deploy/ at `up`: start from nothing. (The lab's API
    // server deletes a namespace's contents at once, where kube-apiserver's
    // namespace controller takes a while: kubectl's later deletes of those
    // contents would see 404, hence --ignore-not-found.)
    let delete = |kubectl: &std::path::Path, v: &str| {
        run(kubectl, &["delete", "--ignore-not-found", "-k", v]);
    };
    delete(&kubectls[0], repo.join("deploy").to_str().unwrap());
    for kubectl in &kubectls {
        for variant in &variants {
            let v = variant.to_str().unwrap();
            let rendered = run(kubectl, &["kustomize", v]);
            let declared: Vec<Value> = serde_norway::Deserializer::from_str(&rendered)
                .map(|d| serde::Deserialize::deserialize(d).unwrap())
                .collect();
            run(kubectl, &["apply", "-k", v]);
            // What the server holds equals what was rendered.
            for (kind, name, field) in [
                ("DaemonSet", "weft", "spec"),
                ("ConfigMap", "weft-config", "data"),
            ] {
                let declared = declared.iter().find(|o| o["kind"] == kind).unwrap();
                let args = ["get", kind, "-n", "weft-system", name, "-o", "json"];
                let got: Value = serde_json::from_str(&run(kubectl, &args)).unwrap();
                assert_eq!(
                    got[field],
                    declared[field],
                    "{kind} of {v} with {}",
                    kubectl.display()
                );
            }
            run(
                kubectl,
                &["get", "validatingadmissionpolicy", "weft-meshd-own-node"],
            );
            delete(kubectl, v);
            for (kind, ns) in [
                ("daemonsets", "weft-system"),
                ("clusterroles", ""),
                ("validatingadmissionpolicies", ""),
            ] {
                let mut args = vec!["get", kind, "-o", "name"];
                if !ns.is_empty() {
                    args.extend(["-n", ns]);
                }
                let left = run(kubectl, &args);
                assert!(
                    !left.contains("weft"),
                    "{v}: {kind} left after delete -k: {left}"
                );
            }
        }
        // The cleanup DaemonSet of docs/install.md's uninstall.
        let cleanup = repo.join("deploy/uninstall");
        let cleanup = cleanup.to_str().unwrap();
        run(kubectl, &["apply", "-k", cleanup]);
        let got: Value = serde_json::from_str(&run(
            kubectl,
            &[
                "get",
                "daemonset",
                "-n",
                "kube-system",
                "weft-cleanup",
                "-o",
                "json",
            ],
        ))
        .unwrap();
        assert_eq!(
            got["spec"]["template"]["spec"]["initContainers"][0]["args"][0],
            "uninstall"
        );
        run(kubectl, &["delete", "-k", cleanup]);
    }
}
