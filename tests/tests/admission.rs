//! Each node's agent may write only its own Node, and there only the
//! annotations meshd owns. The lab API server authenticates every node's
//! pod by a token bound to its Node and enforces deploy/'s RBAC and
//! ValidatingAdmissionPolicy as kube-apiserver does; these tests use one
//! node's real credentials as an attacker on that node would.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{client, kubeconfig_with, kubelet_token, pod_token, run_bounded, Lab};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{json, Value};

const DENIED: &str = "is forbidden: ValidatingAdmissionPolicy 'weft-meshd-own-node' with binding 'weft-meshd-own-node' denied request: ";

/// The API server's answer to a failed request: (code, message).
fn refused<T: std::fmt::Debug>(result: kube::Result<T>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.message),
        other => panic!("expected the API server to refuse, got {other:?}"),
    }
}

fn annotations(patch: Value) -> Patch<Value> {
    Patch::Merge(json!({"metadata": {"annotations": patch}}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_credentials_write_only_its_own_weft_annotations() {
    let lab = tokio::task::spawn_blocking(|| Lab::up("t-admit", &["--nodes", "2"]))
        .await
        .unwrap();
    let admin: Api<Node> = Api::all(client(Path::new(&lab.kubeconfig())).await);
    let node1 = kubeconfig_with(&lab, &pod_token(&lab, "node-1"), "node-1");
    let nodes: Api<Node> = Api::all(client(&node1).await);
    let pp = PatchParams::default();
    let key_of = |n: &Node| n.metadata.annotations.as_ref().unwrap()["weft.dev/public-key"].clone();
    let key2 = key_of(&admin.get("node-2").await.unwrap());

    // Another node's key: the hijack the policy exists to stop.
    let (code, message) = refused(
        nodes
            .patch(
                "node-2",
                &pp,
                &annotations(json!({"weft.dev/public-key": "AAAA"})),
            )
            .await,
    );
    assert_eq!(code, 403);
    assert_eq!(
        message,
        format!(
            "nodes \"node-2\" {DENIED}the Weft agent on node node-1 may not change Node node-2"
        )
    );
    assert_eq!(key_of(&admin.get("node-2").await.unwrap()), key2);

    // Its own Node, but beyond its annotations.
    for (what, patch, why) in [
        (
            "a label",
            json!({"metadata": {"labels": {"zone": "x"}}}),
            "spec, labels",
        ),
        (
            "the spec",
            json!({"spec": {"unschedulable": true}}),
            "spec, labels",
        ),
        (
            "another annotation",
            json!({"metadata": {"annotations": {"example.com/owner": "me"}}}),
            "only the annotations it owns",
        ),
        (
            "a weft.dev/ key meshd does not own",
            json!({"metadata": {"annotations": {"weft.dev/relay": "yes"}}}),
            "only the annotations it owns",
        ),
        (
            "an admin's rotation request",
            json!({"metadata": {"annotations": {"weft.dev/rotate-requested": "2026-12-02T12:00:00Z"}}}),
            "only the annotations it owns",
        ),
    ] {
        let (code, message) = refused(nodes.patch("node-1", &pp, &Patch::Merge(patch)).await);
        assert_eq!(code, 403, "{what}");
        assert!(
            message.starts_with(&format!("nodes \"node-1\" {DENIED}")),
            "{what}: {message}"
        );
        assert!(message.contains(why), "{what}: {message}");
    }

    // What RBAC never granted.
    let node9: Node = serde_json::from_value(json!({"metadata": {"name": "node-9"}})).unwrap();
    let (code, message) = refused(nodes.create(&PostParams::default(), &node9).await);
    assert_eq!(code, 403);
    assert_eq!(message, "nodes is forbidden: User \"system:serviceaccount:weft-system:meshd\" cannot create resource \"nodes\" in API group \"\" at the cluster scope");
    let (code, _) = refused(nodes.delete("node-1", &DeleteParams::default()).await);
    assert_eq!(code, 403);
    let config_maps: Api<ConfigMap> = Api::namespaced(client(&node1).await, "kube-system");
    let (code, message) = refused(config_maps.get("kube-root-ca.crt").await);
    assert_eq!(code, 403, "{message}");
    // The revoked keys: read, never written (a node must not un-revoke).
    let revoked: Api<ConfigMap> = Api::namespaced(client(&node1).await, "weft-system");
    let mut record = revoked
        .get("weft-revoked-keys")
        .await
        .expect("meshd reads it");
    record.data = Some(Default::default());
    let (code, message) = refused(
        revoked
            .replace("weft-revoked-keys", &PostParams::default(), &record)
            .await,
    );
    assert_eq!(code, 403, "{message}");
    let (code, _) = refused(
        revoked
            .delete("weft-revoked-keys", &DeleteParams::default())
            .await,
    );
    assert_eq!(code, 403);

    // Its own annotations: allowed (meshd puts its endpoint back).
    nodes
        .patch(
            "node-1",
            &pp,
            &annotations(json!({"weft.dev/endpoint": "198.18.1.1:1"})),
        )
        .await
        .expect("node-1 may update its own endpoint");

    // A token whose node claim was rewritten no longer verifies.
    let token = pod_token(&lab, "node-1");
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["kubernetes.io"]["node"]["name"] = json!("node-2");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap()),
        parts[2]
    );
    let forged: Api<Node> = Api::all(client(&kubeconfig_with(&lab, &forged, "forged")).await);
    assert_eq!(refused(forged.list(&Default::default()).await).0, 401);

    // A token dies with the Node it is bound to.
    let node2 = kubeconfig_with(&lab, &pod_token(&lab, "node-2"), "node-2");
    let as_node2: Api<Node> = Api::all(client(&node2).await);
    as_node2
        .list(&Default::default())
        .await
        .expect("node-2's token works");
    admin
        .delete("node-2", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(refused(as_node2.list(&Default::default()).await).0, 401);
    tokio::task::spawn_blocking(move || drop(lab))
        .await
        .unwrap();
}

/// Both real kubectls get kube-apiserver's Status for a denial, through
/// the node's credentials. kubectl reads an object before it patches it, and
/// meshd's role has no `get`: an admin widening RBAC (the case admission
/// exists for) grants it here first, so the request reaches the policy.
#[test]
fn kubectl_sees_the_denial_as_from_kube_apiserver() {
    let lab = Lab::up("t-admit-kubectl", &["--nodes", "2"]);
    let grant = r#"{"apiVersion": "v1", "kind": "List", "items": [
      {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
       "metadata": {"name": "wider"},
       "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]},
      {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
       "metadata": {"name": "wider"},
       "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "wider"},
       "subjects": [{"kind": "ServiceAccount", "name": "meshd", "namespace": "weft-system"}]}]}"#;
    let grant_file = lab.dir().join("wider.json");
    std::fs::write(&grant_file, grant).unwrap();
    let node1 = kubeconfig_with(&lab, &pod_token(&lab, "node-1"), "node-1");
    let kubectls: Vec<PathBuf> = [meshlab::lab::preflight::DEBIAN_KUBECTL, "/usr/bin/kubectl"]
        .into_iter()
        .map(PathBuf::from)
        .filter(|k| k.is_file())
        .collect();
    assert!(!kubectls.is_empty(), "no kubectl (run tests/setup)");
    let run = |kubectl: &Path, kubeconfig: &Path, args: &[&str]| {
        let mut cmd = Command::new(kubectl);
        cmd.args(args).env("KUBECONFIG", kubeconfig);
        run_bounded(cmd, Duration::from_secs(60))
    };
    let admin = PathBuf::from(lab.kubeconfig());
    let out = run(
        &kubectls[0],
        &admin,
        &["apply", "-f", grant_file.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for kubectl in &kubectls {
        let args = [
            "annotate",
            "node",
            "node-2",
            "--overwrite",
            "weft.dev/public-key=AAAA",
        ];
        let out = run(kubectl, &node1, &args);
        assert!(!out.status.success(), "{}", kubectl.display());
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("Error from server (Forbidden): nodes \"node-2\" {DENIED}the Weft agent on node node-1 may not change Node node-2\n"),
            "{}",
            kubectl.display()
        );
    }
}

/// A compromised node also holds its kubelet's credential, with which it
/// may change its own Node (the Node authorizer) and no other
/// (NodeRestriction): the lab's kubelet identity refuses as kube-apiserver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_may_change_only_its_own_node() {
    use std::os::unix::fs::PermissionsExt;
    let lab = tokio::task::spawn_blocking(|| Lab::up("t-kubelet", &["--nodes", "2"]))
        .await
        .unwrap();
    let file = lab.dir().join("node-1").join("kubelet.kubeconfig");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    let admin: Api<Node> = Api::all(client(Path::new(&lab.kubeconfig())).await);
    let kubelet = kubeconfig_with(&lab, &kubelet_token(&lab, "node-1"), "kubelet-node-1");
    let nodes: Api<Node> = Api::all(client(&kubelet).await);
    let label =
        |value: &str| Patch::Merge(json!({"metadata": {"labels": {"example.com/zone": value}}}));
    let zone = |n: &Node| {
        n.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("example.com/zone").cloned())
    };
    let pp = PatchParams::default();

    nodes
        .patch("node-1", &pp, &label("a"))
        .await
        .expect("a kubelet may change its own Node");
    assert_eq!(
        zone(&admin.get("node-1").await.unwrap()).as_deref(),
        Some("a")
    );

    let (code, message) = refused(nodes.patch("node-2", &pp, &label("a")).await);
    assert_eq!(code, 403);
    assert_eq!(
        message,
        "nodes \"node-2\" is forbidden: node \"node-1\" is not allowed to modify node \"node-2\""
    );
    assert_eq!(zone(&admin.get("node-2").await.unwrap()), None);
    tokio::task::spawn_blocking(move || drop(lab))
        .await
        .unwrap();
}
