//! containerd 1.6's CRI — the path kubelet uses — attaching pod sandboxes
//! with Weft's conflist on lab nodes. containerd runs inside each node's
//! namespace with its own root, state and socket; the sandbox image is a
//! busybox rootfs built here (nothing can be pulled).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{wait_for, Lab};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    PortMapping, Protocol, RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
};
use serde_json::Value;
use tonic::transport::Channel;

fn sh(cmd: &str) -> String {
    let out = Command::new("bash").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An OCI image archive of a busybox rootfs whose command sleeps.
fn sandbox_image(dir: &Path) -> PathBuf {
    let w = dir.display();
    sh(&format!(
        "set -e; rm -rf {w}/oci; mkdir -p {w}/oci/rootfs/bin {w}/oci/layout/blobs/sha256
         cp /bin/busybox {w}/oci/rootfs/bin/busybox; ln -s busybox {w}/oci/rootfs/bin/sh; ln -s busybox {w}/oci/rootfs/bin/sleep
         tar -C {w}/oci/rootfs -cf {w}/oci/layer.tar .
         blob() {{ d=$(sha256sum $1 | cut -d' ' -f1); cp $1 {w}/oci/layout/blobs/sha256/$d; echo $d $(stat -c %s $1); }}
         read L LS <<< $(blob {w}/oci/layer.tar)
         printf '{{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{{\"Cmd\":[\"/bin/sleep\",\"100000\"]}},\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":[\"sha256:%s\"]}}}}' $L > {w}/oci/config.json
         read C CS <<< $(blob {w}/oci/config.json)
         printf '{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:%s\",\"size\":%s}},\"layers\":[{{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:%s\",\"size\":%s}}]}}' $C $CS $L $LS > {w}/oci/manifest.json
         read M MS <<< $(blob {w}/oci/manifest.json)
         printf '{{\"schemaVersion\":2,\"manifests\":[{{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:%s\",\"size\":%s,\"annotations\":{{\"org.opencontainers.image.ref.name\":\"latest\"}}}}]}}' $M $MS > {w}/oci/layout/index.json
         echo '{{\"imageLayoutVersion\":\"1.0.0\"}}' > {w}/oci/layout/oci-layout
         tar -C {w}/oci/layout -cf {w}/oci/image.tar ."
    ));
    dir.join("oci/image.tar")
}

/// containerd in `node`'s namespace, CNI pointed at the node's Weft
/// conflist; returns its socket.
fn start_containerd(lab: &Lab, node: &str, image: &Path) -> PathBuf {
    let node_dir = lab.dir().join(node);
    // The node's own /opt/cni/bin and /etc/cni/net.d (the lab maps the
    // DaemonSet's host paths under root/).
    let (host, root) = (node_dir.join("root"), node_dir.join("containerd"));
    let (bin, conf) = (host.join("opt/cni/bin"), host.join("etc/cni/net.d"));
    std::fs::create_dir_all(&root).unwrap();
    // containerd 1.6 sets up the pod's loopback with the loopback plugin
    // from the same bin_dir: the install-cni container installed it.
    assert!(
        bin.join("loopback").is_file(),
        "install-cni left out loopback"
    );
    let socket = root.join("containerd.sock");
    let config = format!(
        r#"version = 2
root = "{root}/root"
state = "{root}/state"
[grpc]
  address = "{socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:latest"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
"#,
        root = root.display(),
        socket = socket.display(),
        bin = bin.display(),
        conf = conf.display()
    );
    std::fs::write(root.join("config.toml"), config).unwrap();
    let log = std::fs::File::create(root.join("containerd.log")).unwrap();
    // nsenter, not `ip netns exec`: the latter remounts /sys in a new mount
    // namespace, hiding the cgroup mounts runc needs.
    let mut containerd = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}-{node}", lab.name))
        .args(["containerd", "--config"])
        .arg(root.join("config.toml"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("containerd (run tests/setup)");
    // Lab teardown stops it; reap it then.
    std::thread::spawn(move || containerd.wait());
    wait_for(
        &format!("containerd on {node}"),
        Duration::from_secs(20),
        || socket.exists(),
    );
    sh(&format!(
        "ctr --address {} -n k8s.io images import --base-name localhost/pause {}",
        socket.display(),
        image.display()
    ));
    socket
}

async fn cri(socket: &Path) -> RuntimeServiceClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connecting to containerd's CRI socket");
    RuntimeServiceClient::new(channel)
}

fn sandbox_config(name: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..PodSandboxConfig::default()
    }
}

/// The sandbox's IPs and the path of its network namespace.
async fn sandbox_status(
    client: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> (Vec<String>, String) {
    let status = client
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let network = status.status.unwrap().network.unwrap();
    let mut ips = vec![network.ip];
    ips.extend(network.additional_ips.into_iter().map(|i| i.ip));
    let info: Value = serde_json::from_str(&status.info["info"]).unwrap();
    let netns = info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .expect("a network namespace path")
        .to_string();
    (ips, netns)
}

/// StopPodSandbox (the CNI DEL), then RemovePodSandbox, as kubelet does.
async fn remove_sandbox(client: &mut RuntimeServiceClient<Channel>, id: String) {
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .expect("StopPodSandbox");
    client
        .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
        .await
        .expect("RemovePodSandbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_cri_sandboxes_get_mesh_addresses_and_release_them() {
    let lab = tokio::task::spawn_blocking(|| Lab::up("t-cri", &["--nodes", "2"]))
        .await
        .unwrap();
    let image = sandbox_image(&lab.dir());
    let sockets: Vec<PathBuf> = ["node-1", "node-2"]
        .iter()
        .map(|n| start_containerd(&lab, n, &image))
        .collect();
    let mut one = cri(&sockets[0]).await;
    let mut two = cri(&sockets[1]).await;

    let run = |name: &str| RunPodSandboxRequest {
        config: Some(sandbox_config(name)),
        runtime_handler: String::new(),
    };
    let id1 = one
        .run_pod_sandbox(run("web"))
        .await
        .expect("RunPodSandbox on node-1")
        .into_inner()
        .pod_sandbox_id;
    let id2 = two
        .run_pod_sandbox(run("client"))
        .await
        .expect("RunPodSandbox on node-2")
        .into_inner()
        .pod_sandbox_id;
    let (ips1, _) = sandbox_status(&mut one, &id1).await;
    let (ips2, netns2) = sandbox_status(&mut two, &id2).await;
    assert!(
        ips1[0].starts_with("198.19.1."),
        "node-1's sandbox got {ips1:?}, not an address of node-1's block"
    );
    assert!(
        ips1.iter().any(|ip| ip.starts_with("fd98:19:0:1:")),
        "no IPv6 address: {ips1:?}"
    );
    assert!(ips2[0].starts_with("198.19.2."), "{ips2:?}");

    // kubelet reports the sandboxes' addresses on their Pods; until meshd
    // has programmed a pod, its traffic is dropped.
    let lab = tokio::task::spawn_blocking(move || {
        for (node, name, ips) in [("node-1", "web", &ips1), ("node-2", "client", &ips2)] {
            lab.register_pod("default", name, node, &serde_json::json!({}), ips);
        }
        // The sandbox on node-2 reaches the one on node-1 through the mesh.
        for target in &ips1 {
            let ping = || {
                Command::new("nsenter")
                    .arg(format!("--net={netns2}"))
                    .args(["ping", "-c", "1", "-W", "1", target])
                    .output()
                    .unwrap()
            };
            common::wait_for(
                &format!("the sandbox on node-2 to reach {target}"),
                Duration::from_secs(10),
                || ping().status.success(),
            );
        }
        lab
    })
    .await
    .unwrap();

    remove_sandbox(&mut one, id1).await;
    let held: Value = serde_json::from_slice(
        &std::fs::read(
            lab.dir()
                .join("node-1/root/var/lib/weft/ipam/allocations.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        held["held"].as_object().unwrap().is_empty(),
        "the address was not released: {held}"
    );
    assert!(
        !lab.ok(&["exec", "node-1", "--", "ip", "-o", "link"])
            .contains(" wp"),
        "the veth survived"
    );
    remove_sandbox(&mut two, id2).await;
    tokio::task::spawn_blocking(move || drop(lab))
        .await
        .unwrap();
}

/// A process killed when dropped, even if the test failed.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pod's hostPort is reached on its node's address: containerd hands the
/// sandbox's port mappings (the pod spec's hostPorts, as kubelet passes
/// them) to the plugins with the `portMappings` capability, and Weft's
/// conflist chains `portmap` (installed by install-cni) after its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_s_host_port_is_reached_on_its_node_s_address() {
    let lab = tokio::task::spawn_blocking(|| Lab::up("t-hostport", &["--nodes", "2"]))
        .await
        .unwrap();
    let image = sandbox_image(&lab.dir());
    let mut one = cri(&start_containerd(&lab, "node-1", &image)).await;
    let config = PodSandboxConfig {
        port_mappings: vec![PortMapping {
            protocol: Protocol::Tcp.into(),
            container_port: 8080,
            host_port: 30080,
            host_ip: String::new(),
        }],
        ..sandbox_config("web")
    };
    let id = one
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox with a hostPort")
        .into_inner()
        .pod_sandbox_id;
    let (ips, netns) = sandbox_status(&mut one, &id).await;
    let lab = tokio::task::spawn_blocking(move || {
        lab.register_pod("default", "web", "node-1", &serde_json::json!({}), &ips);
        let _server = Killed(
            Command::new("nsenter")
                .arg(format!("--net={netns}"))
                .args([
                    "busybox",
                    "nc",
                    "-ll",
                    "-p",
                    "8080",
                    "-e",
                    "/bin/echo",
                    "hostport-ok",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("busybox (run tests/setup)"),
        );
        // From node-2, to node-1's underlay address (198.18.1.k for node k).
        let ask = || {
            Command::new("ip")
                .args(["netns", "exec", &format!("{}-node-2", lab.name)])
                .args(["busybox", "nc", "-w", "2", "198.18.1.1", "30080"])
                .output()
                .unwrap()
        };
        wait_for(
            "node-2 to reach the pod's hostPort on node-1's address",
            Duration::from_secs(15),
            || String::from_utf8_lossy(&ask().stdout).contains("hostport-ok"),
        );
        lab
    })
    .await
    .unwrap();
    remove_sandbox(&mut one, id).await;
    tokio::task::spawn_blocking(move || drop(lab))
        .await
        .unwrap();
}
