//! Real Kubernetes clients against a running lab: Debian's kubectl and the
//! official Python client. They must not be able to tell the lab's API
//! server from the real one for what Weft and its admins do.

mod common;

use std::process::Command;
use std::time::Duration;

use base64::Engine;
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
    let kubeconfig = std::path::PathBuf::from(lab.kubeconfig());
    let run = |kubectl: &std::path::Path, args: &[&str]| run_kubectl(kubectl, &kubeconfig, args);
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

/// The lab's API server in this process, on loopback: what is under test
/// here is what clients send, not the lab around it. Stops when dropped.
struct Server {
    runtime: Option<tokio::runtime::Runtime>,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = meshlab::apiserver::Endpoint {
            listener,
            kubeconfig: dir.path().join("kubeconfig"),
            advertise: None,
        };
        let _entered = runtime.enter();
        meshlab::apiserver::launch(vec![endpoint], meshlab::apiserver::Options::default()).unwrap();
        Server {
            runtime: Some(runtime),
            dir,
        }
    }

    fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// Runs a kubectl against the server; panics with its stderr on failure.
    fn run(&self, kubectl: &std::path::Path, args: &[&str]) -> String {
        run_kubectl(kubectl, &self.kubeconfig(), args)
    }

    fn json(&self, kubectl: &std::path::Path, args: &[&str]) -> Value {
        let out = self.run(kubectl, args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Debian's kubectl 1.20 (JSON only) and, where the machine has it,
/// /usr/bin/kubectl (1.33, which sends protobuf for built-in kinds made by
/// its generators: `create configmap`, `create namespace` …).
fn both_kubectls() -> Vec<std::path::PathBuf> {
    let kubectls: Vec<std::path::PathBuf> =
        [meshlab::lab::preflight::DEBIAN_KUBECTL, "/usr/bin/kubectl"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .filter(|k| k.is_file())
            .collect();
    assert!(!kubectls.is_empty(), "no kubectl (run tests/setup)");
    kubectls
}

const CONFIGMAP_YAML: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: NAME
  namespace: default
  labels: {app.kubernetes.io/name: weft}
  annotations: {weft.dev/note: "from a manifest"}
data:
  cluster-ranges: "198.19.0.0/16,fd98:19::/48"
  empty: ""
binaryData:
  blob: AAEC/w==
"#;

const POD_YAML: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: NAME
  namespace: default
  labels: {app: web}
spec:
  nodeName: node-1
  hostNetwork: false
  terminationGracePeriodSeconds: 0
  containers:
  - name: web
    image: busybox
    args: [httpd, -f, -p, "8080"]
    ports: [{containerPort: 8080, protocol: TCP, name: http}]
    env:
    - name: RANGE
      valueFrom: {configMapKeyRef: {name: weft-config, key: cluster-ranges, optional: false}}
    livenessProbe:
      httpGet: {path: /, port: http}
      initialDelaySeconds: 3
    resources: {limits: {cpu: 100m, memory: 64Mi}}
    securityContext: {allowPrivilegeEscalation: false, runAsUser: 0}
  volumes:
  - name: state
    hostPath: {path: /var/lib/weft, type: DirectoryOrCreate}
"#;

const NODE_YAML: &str = r#"apiVersion: v1
kind: Node
metadata:
  name: NAME
  labels: {kubernetes.io/hostname: NAME, topology.kubernetes.io/zone: lab-1a}
  annotations: {weft.dev/public-key: AAAA}
spec:
  podCIDRs: [198.19.7.0/24, "fd98:19:0:7::/64"]
  taints: [{key: example.com/edge, value: "true", effect: NoSchedule}]
"#;

/// Both kubectls create ConfigMaps (from literals and a file, which 1.33
/// sends as protobuf, and from a manifest), Pods and Nodes; the other
/// kubectl and the Python client read back exactly what was written.
#[test]
fn both_kubectls_read_what_the_other_wrote() {
    let kubectls = both_kubectls();
    let server = Server::start();
    let blob = server.dir.path().join("blob");
    std::fs::write(&blob, [0u8, 1, 2, 255]).unwrap();
    let python_script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python_read.py");
    for (i, writer) in kubectls.iter().enumerate() {
        let reader = &kubectls[(i + 1) % kubectls.len()];
        let who = format!("{} then {}", writer.display(), reader.display());
        let literal = format!("literal-{i}");
        let from_file = format!("--from-file=blob={}", blob.display());
        let create = [
            "create",
            "configmap",
            "-n",
            "default",
            &literal,
            "--from-literal=a=b",
            "--from-literal=empty=",
            &from_file,
        ];
        let built = server.json(
            writer,
            &[&create[..], &["--dry-run=client", "-o", "json"]].concat(),
        );
        server.run(writer, &create);
        let got = server.json(
            reader,
            &["get", "configmap", "-n", "default", &literal, "-o", "json"],
        );
        assert_eq!(
            got["data"],
            serde_json::json!({"a": "b", "empty": ""}),
            "{who}"
        );
        assert_eq!(
            got["binaryData"],
            serde_json::json!({"blob": "AAEC/w=="}),
            "{who}"
        );
        for field in ["data", "binaryData"] {
            assert_eq!(got[field], built[field], "{field}, {who}");
        }
        assert_eq!(got["metadata"]["name"], literal.as_str(), "{who}");
        assert_eq!(got["metadata"]["namespace"], "default", "{who}");
        assert!(got["metadata"].get("labels").is_none(), "{who}: {got}");

        let mut python_args = vec!["configmap".to_string(), "default".into(), literal.clone()];
        for (template, kind, fields) in [
            (CONFIGMAP_YAML, "configmap", &["data", "binaryData"][..]),
            (POD_YAML, "pod", &["spec"][..]),
            (NODE_YAML, "node", &["spec"][..]),
        ] {
            let name = format!("{kind}-{i}");
            let manifest = server.dir.path().join(format!("{name}.yaml"));
            let text = template.replace("NAME", &name);
            std::fs::write(&manifest, &text).unwrap();
            let declared: Value = serde_norway::from_str(&text).unwrap();
            server.run(writer, &["create", "-f", manifest.to_str().unwrap()]);
            let mut get = vec!["get", kind, &name, "-o", "json"];
            if kind != "node" {
                get.extend(["-n", "default"]);
                python_args.extend([kind.to_string(), "default".into(), name.clone()]);
            } else {
                python_args.extend([kind.to_string(), name.clone()]);
            }
            let got = server.json(reader, &get);
            for field in fields {
                assert_eq!(got[field], declared[field], "{kind} {field}, {who}");
            }
            for field in ["labels", "annotations"] {
                assert_eq!(
                    got["metadata"][field], declared["metadata"][field],
                    "{kind} {field}, {who}"
                );
            }
        }

        // The official Python client reads the same objects.
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(python_script)
            .arg(server.kubeconfig())
            .args(&python_args);
        let out = run_bounded(cmd, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "python client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(read.len(), 4, "{read:?}");
        assert_eq!(
            read[0]["data"],
            serde_json::json!({"a": "b", "empty": ""}),
            "{who}"
        );
        assert_eq!(
            read[0]["binaryData"],
            serde_json::json!({"blob": "AAEC/w=="}),
            "{who}"
        );
        assert_eq!(
            read[1]["data"]["cluster-ranges"],
            "198.19.0.0/16,fd98:19::/48"
        );
        let container = &read[2]["spec"]["containers"][0];
        assert_eq!(container["livenessProbe"]["httpGet"]["port"], "http");
        assert_eq!(
            container["env"][0]["valueFrom"]["configMapKeyRef"]["optional"],
            false
        );
        assert_eq!(container["securityContext"]["runAsUser"], 0);
        assert_eq!(
            read[2]["spec"]["volumes"][0]["hostPath"]["path"],
            "/var/lib/weft"
        );
        assert_eq!(read[3]["spec"]["podCIDRs"][1], "fd98:19:0:7::/64");
        assert_eq!(read[3]["spec"]["taints"][0]["effect"], "NoSchedule");
    }
}

/// What kubectl's generators build (1.33 sends these as protobuf) is what
/// the server stores: each object read back equals the client's own
/// `--dry-run=client` rendering, but for what the server owns.
#[test]
fn kubectl_generators_store_what_the_client_built() {
    let kubectls = both_kubectls();
    let server = Server::start();
    let server_owned = |mut v: Value| {
        if let Some(meta) = v["metadata"].as_object_mut() {
            for k in [
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "generation",
                "managedFields",
            ] {
                meta.remove(k);
            }
            if let Some(labels) = meta.get_mut("labels").and_then(Value::as_object_mut) {
                labels.remove("kubernetes.io/metadata.name");
                if labels.is_empty() {
                    meta.remove("labels");
                }
            }
        }
        if let Some(o) = v.as_object_mut() {
            o.remove("status");
        }
        v
    };
    for (i, writer) in kubectls.iter().enumerate() {
        let reader = &kubectls[(i + 1) % kubectls.len()];
        let who = format!("{} then {}", writer.display(), reader.display());
        let n = |base: &str| format!("{base}-{i}");
        let (ns, sa, role, binding) = (n("team"), n("robot"), n("reader"), n("readers"));
        let generators: Vec<(Vec<String>, Vec<String>)> = vec![
            (
                vec!["create".into(), "namespace".into(), ns.clone()],
                vec!["namespace".into(), ns.clone()],
            ),
            (
                vec![
                    "create".into(),
                    "serviceaccount".into(),
                    "-n".into(),
                    ns.clone(),
                    sa.clone(),
                ],
                vec!["serviceaccount".into(), "-n".into(), ns.clone(), sa.clone()],
            ),
            (
                [
                    "create",
                    "quota",
                    "-n",
                    &ns,
                    &n("critical"),
                    "--hard=pods=2,cpu=500m",
                    "--scopes=BestEffort",
                ]
                .map(String::from)
                .to_vec(),
                vec!["quota".into(), "-n".into(), ns.clone(), n("critical")],
            ),
            (
                [
                    "create",
                    "clusterrole",
                    &role,
                    "--verb=get,list",
                    "--resource=nodes,configmaps",
                ]
                .map(String::from)
                .to_vec(),
                vec!["clusterrole".into(), role.clone()],
            ),
            (
                [
                    "create",
                    "clusterrolebinding",
                    &binding,
                    &format!("--clusterrole={role}"),
                    "--user=alice",
                    "--group=admins",
                    &format!("--serviceaccount={ns}:{sa}"),
                ]
                .map(String::from)
                .to_vec(),
                vec!["clusterrolebinding".into(), binding.clone()],
            ),
            (
                [
                    "create",
                    "role",
                    "-n",
                    &ns,
                    &role,
                    "--verb=get",
                    "--resource=configmaps",
                    "--resource-name=weft-config",
                ]
                .map(String::from)
                .to_vec(),
                vec!["role".into(), "-n".into(), ns.clone(), role.clone()],
            ),
            (
                [
                    "create",
                    "rolebinding",
                    "-n",
                    &ns,
                    &binding,
                    &format!("--role={role}"),
                    "--user=bob",
                ]
                .map(String::from)
                .to_vec(),
                vec![
                    "rolebinding".into(),
                    "-n".into(),
                    ns.clone(),
                    binding.clone(),
                ],
            ),
        ];
        for (create, get) in generators {
            let create: Vec<&str> = create.iter().map(String::as_str).collect();
            let built = server.json(
                writer,
                &[&create[..], &["--dry-run=client", "-o", "json"]].concat(),
            );
            server.run(writer, &create);
            let get: Vec<&str> = get.iter().map(String::as_str).collect();
            let got = server.json(reader, &[&["get"], &get[..], &["-o", "json"]].concat());
            assert_eq!(server_owned(got), server_owned(built), "{create:?}, {who}");
        }
        // TokenRequest (1.33 sends it in protobuf; 1.20 has no `create
        // token`): the token carries the audience and lifetime asked for.
        let mut help = Command::new(writer);
        help.args(["create", "token", "--help"]);
        let help = run_bounded(help, Duration::from_secs(60));
        if String::from_utf8_lossy(&help.stdout).contains("--audience") {
            let token = server.run(
                writer,
                &[
                    "create",
                    "token",
                    "-n",
                    &ns,
                    &sa,
                    "--audience=weft",
                    "--duration=20m",
                ],
            );
            let payload = token.trim().split('.').nth(1).unwrap_or_default();
            let claims: Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .ok()
                .and_then(|json| serde_json::from_slice(&json).ok())
                .unwrap_or_else(|| panic!("{who}: not a JWT: {token}"));
            assert_eq!(claims["aud"], serde_json::json!(["weft"]), "{who}");
            assert_eq!(
                claims["exp"]
                    .as_u64()
                    .zip(claims["iat"].as_u64())
                    .map(|(e, i)| e - i),
                Some(1200),
                "{who}"
            );
        }
    }
}

/// Runs `kubectl` with `kubeconfig` (bounded); panics with its stderr on
/// failure.
fn run_kubectl(kubectl: &std::path::Path, kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let mut cmd = Command::new(kubectl);
    cmd.args(args).env("KUBECONFIG", kubeconfig);
    let out = run_bounded(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        kubectl.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
