//! Services as a real cluster has them: the lab's API server allocates
//! ClusterIPs and its kube-proxy translates them on every node (nftables
//! mode), so pods reach Services across the mesh, NetworkPolicy is
//! enforced on what a Service delivers, and nothing leaves in plaintext.

mod common;

use std::time::Duration;

use common::{wait_for, Lab};

/// Answers every connection on port 8080 with its pod's name (`x/<name>`).
fn serve(lab: &Lab, pod: &str) -> std::process::Child {
    let name = pod.rsplit('/').next().unwrap_or(pod);
    let script = format!(
        "import socket\n\
         s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',8080));s.listen(16)\n\
         while True:\n\
         \x20 c,_=s.accept();c.sendall(b'{name}');c.close()\n"
    );
    lab.command(&["pod", "exec", pod, "--", "/usr/bin/python3", "-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The name the Service at `ip:80` answered `from` with; `Err` with why not
/// (python's exception name: `ConnectionRefusedError`, `TimeoutError`).
fn ask(lab: &Lab, from: &str, ip: &str) -> Result<String, String> {
    let probe = format!(
        "import socket\n\
         try:\n\
         \x20 c=socket.create_connection(('{ip}',80),timeout=1.5);print('ok',c.recv(64).decode())\n\
         except Exception as e:\n\
         \x20 print('err',type(e).__name__)\n"
    );
    let out = lab.meshlab(&["pod", "exec", from, "--", "/usr/bin/python3", "-c", &probe]);
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match text.split_once(' ') {
        Some(("ok", name)) => Ok(name.to_string()),
        Some((_, why)) => Err(why.to_string()),
        None => Err(format!("no answer: {out:?}")),
    }
}

/// Creates Service `name` in namespace `x` selecting `app=<app>`, port 80
/// to 8080; its ClusterIP.
fn service(lab: &Lab, name: &str, app: &str) -> String {
    lab.create(
        &format!("svc-{name}.yaml"),
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: x}}\n\
             spec: {{selector: {{app: {app}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
        ),
        "{.spec.clusterIP}",
    )
}

fn add_pod(lab: &Lab, node: &str, name: &str, app: &str) {
    lab.ok(&[
        "pod",
        "add",
        node,
        name,
        "--namespace",
        "x",
        "--label",
        &format!("app={app}"),
    ]);
}

/// A Service's endpoints on two nodes are all reached from a third pod,
/// through the mesh only; a backend reaching its own Service gets itself
/// too (hairpin); a Service without endpoints refuses at once.
#[test]
fn pods_reach_services_across_nodes_and_back_to_themselves() {
    let lab = Lab::up("t-svc", &["--nodes", "3"]);
    add_pod(&lab, "node-2", "web-2", "web");
    add_pod(&lab, "node-3", "web-3", "web");
    add_pod(&lab, "node-1", "client", "client");
    let servers = vec![serve(&lab, "x/web-2"), serve(&lab, "x/web-3")];
    let ip = service(&lab, "web", "web");
    assert!(ip.starts_with("10.96."), "the API server allocated {ip:?}");
    wait_for("the Service to answer", Duration::from_secs(15), || {
        ask(&lab, "x/client", &ip).is_ok()
    });
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(ask(&lab, "x/client", &ip).expect("every connection answered"));
    }
    assert_eq!(
        seen,
        ["web-2", "web-3"].map(String::from).into(),
        "both endpoints serve"
    );
    let mut itself = false;
    for _ in 0..20 {
        itself |= ask(&lab, "x/web-2", &ip).expect("hairpin answered") == "web-2";
    }
    assert!(itself, "web-2 never reached itself through its Service");
    let none = service(&lab, "nobody", "nobody");
    wait_for(
        "a Service without endpoints to refuse",
        Duration::from_secs(10),
        || ask(&lab, "x/client", &none).is_err_and(|why| why == "ConnectionRefusedError"),
    );
    assert_eq!(lab.plaintext(), Some(0), "plaintext on the fabric");
    stop(servers);
}

/// Ends the servers (the lab's teardown would too, if a check failed first).
fn stop(servers: Vec<std::process::Child>) {
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
}

/// NetworkPolicy holds for what a Service delivers: the backend's ingress
/// policy admits only `app=client`, so a client reaches it through its
/// ClusterIP and another pod is refused; the client's egress policy,
/// allowing only the backends, still lets it reach them through the
/// Service (judged on the endpoint, after translation).
#[test]
fn network_policy_holds_through_services() {
    let lab = Lab::up("t-svcpol", &["--nodes", "2"]);
    add_pod(&lab, "node-2", "web", "web");
    add_pod(&lab, "node-1", "client", "client");
    add_pod(&lab, "node-1", "other", "other");
    let server = serve(&lab, "x/web");
    let ip = service(&lab, "web", "web");
    for from in ["x/client", "x/other"] {
        wait_for(
            &format!("{from} to reach the Service"),
            Duration::from_secs(15),
            || ask(&lab, from, &ip).is_ok(),
        );
    }
    let path = lab.dir().join("policies.yaml");
    std::fs::write(
        &path,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: web, namespace: x}\n\
         spec: {podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]}\n\
         ---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: client, namespace: x}\n\
         spec: {podSelector: {matchLabels: {app: client}}, policyTypes: [Egress], egress: [{to: [{podSelector: {matchLabels: {app: web}}}]}]}\n",
    )
    .unwrap();
    lab.ok(&["kubectl", "--", "create", "-f", path.to_str().unwrap()]);
    // Each node programs its side on its own: x/other is refused once
    // node-2 has web's ingress, x/client admitted once node-1 also has
    // client's egress with web's address in it.
    wait_for(
        "the policies to refuse x/other and admit x/client",
        Duration::from_secs(15),
        || ask(&lab, "x/other", &ip).is_err() && ask(&lab, "x/client", &ip).as_deref() == Ok("web"),
    );
    for _ in 0..5 {
        assert_eq!(ask(&lab, "x/client", &ip).as_deref(), Ok("web"));
        assert!(
            ask(&lab, "x/other", &ip).is_err(),
            "x/other got through the Service"
        );
    }
    assert_eq!(lab.plaintext(), Some(0), "plaintext on the fabric");
    stop(vec![server]);
}
