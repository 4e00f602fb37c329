//! The lab's kube-proxy (and EndpointSlice controller): what gives Services
//! their meaning on a real node. One process per lab (`meshlab
//! kube-proxy`, started by `up`) lists Services and Pods through the API
//! and keeps, in every node's namespace, kube-proxy's nftables-mode
//! translation: a ClusterIP port is DNAT'd, at prerouting (pods) and output
//! (the node), to one of the Service's ready endpoints chosen at random;
//! a pod reaching itself through its Service is masqueraded (hairpin); a
//! Service without endpoints rejects. Pods' traffic to a Service thus
//! crosses the mesh — and NetworkPolicy — as a real cluster's does.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::Ipv4Addr;
use std::time::Duration;

use std::os::unix::process::CommandExt;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};

use super::netns;
use super::state::LabDir;

/// The nftables table, in every node's namespace.
pub const TABLE: &str = "weft-lab-kube-proxy";
/// The mark of hairpin traffic, masqueraded at postrouting (kube-proxy's).
const MASQUERADE_MARK: u32 = 0x4000;
/// Its log, in the lab's directory.
const LOG_FILE: &str = "kube-proxy.log";
/// How often the process looks again.
const INTERVAL: Duration = Duration::from_millis(300);

/// One Service port and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frontend {
    pub cluster_ip: Ipv4Addr,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub port: u16,
    /// Ready endpoints: pod address and target port.
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// The frontends of `services` with their endpoints among `pods`: the
/// running, non-host-network pods of the Service's namespace that its
/// selector selects, at the port its target names (a number, or a
/// container port's name on that pod; a pod without it is no endpoint).
pub fn frontends(services: &[Service], pods: &[Pod]) -> Vec<Frontend> {
    let mut out = Vec::new();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let Some(cluster_ip) = spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok()) else {
            continue;
        };
        let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let namespace = service.metadata.namespace.as_deref();
        let selected: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == namespace)
            .filter(|p| {
                let labels = p.metadata.labels.clone().unwrap_or_default();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .filter(|p| {
                let status = p.status.as_ref();
                status.and_then(|s| s.phase.as_deref()) == Some("Running")
                    && !p
                        .spec
                        .as_ref()
                        .and_then(|s| s.host_network)
                        .unwrap_or(false)
            })
            .collect();
        for port in spec.ports.iter().flatten() {
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            out.push(Frontend {
                cluster_ip,
                protocol: port.protocol.as_deref().unwrap_or("TCP").to_lowercase(),
                port: number,
                endpoints: selected.iter().filter_map(|p| endpoint(p, port)).collect(),
            });
        }
    }
    out
}

/// A pod's endpoint for one Service port.
fn endpoint(pod: &Pod, port: &ServicePort) -> Option<(Ipv4Addr, u16)> {
    let ip: Ipv4Addr = pod
        .status
        .as_ref()?
        .pod_ips
        .iter()
        .flatten()
        .find_map(|p| p.ip.parse().ok())?;
    let target = match &port.target_port {
        None => port.port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => {
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name.as_str()))?
                .container_port
        }
    };
    Some((ip, u16::try_from(target).ok()?))
}

/// The table as `nft -f` reads it, replacing any earlier one.
pub fn ruleset(frontends: &[Frontend]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable ip {TABLE} {{"
    );
    let hooks = [
        ("prerouting", "nat", "prerouting", "dstnat", "jump services"),
        ("output", "nat", "output", "-100", "jump services"),
        (
            "postrouting",
            "nat",
            "postrouting",
            "srcnat",
            &format!("meta mark & {MASQUERADE_MARK:#x} == {MASQUERADE_MARK:#x} masquerade") as &str,
        ),
        (
            "filter-forward",
            "filter",
            "forward",
            "-110",
            "jump no-endpoints",
        ),
        (
            "filter-output",
            "filter",
            "output",
            "-110",
            "jump no-endpoints",
        ),
    ];
    for (name, kind, hook, prio, body) in hooks {
        let _ = writeln!(
            s,
            "  chain {name} {{ type {kind} hook {hook} priority {prio}; policy accept; {body}; }}"
        );
    }
    let mut services = String::new();
    let mut rejects = String::new();
    for (i, f) in frontends.iter().enumerate() {
        let matches = format!("ip daddr {} {} dport {}", f.cluster_ip, f.protocol, f.port);
        if f.endpoints.is_empty() {
            let _ = writeln!(rejects, "    {matches} reject");
            continue;
        }
        let _ = writeln!(services, "    {matches} goto service-{i}");
        let choices: Vec<String> = (0..f.endpoints.len())
            .map(|j| format!("{j} : goto endpoint-{i}-{j}"))
            .collect();
        let _ = writeln!(
            s,
            "  chain service-{i} {{ numgen random mod {} vmap {{ {} }}; }}",
            f.endpoints.len(),
            choices.join(", ")
        );
        for (j, (ip, port)) in f.endpoints.iter().enumerate() {
            let _ = writeln!(
                s,
                "  chain endpoint-{i}-{j} {{ ip saddr {ip} meta mark set meta mark | {MASQUERADE_MARK:#x}; meta l4proto {} dnat to {ip}:{port}; }}",
                f.protocol
            );
        }
    }
    let _ = writeln!(s, "  chain services {{\n{services}  }}");
    let _ = writeln!(s, "  chain no-endpoints {{\n{rejects}  }}");
    s.push_str("}\n");
    s
}

/// The process: every [`INTERVAL`], the lab's Services and Pods, and every
/// node's namespace given the table when it differs from what it has.
pub async fn run(dir: &LabDir) -> Result<()> {
    let mut applied: BTreeMap<String, String> = BTreeMap::new();
    loop {
        // A client per pass: the API server restarts on another port.
        let listed = async {
            let client = super::client::client(dir).await?;
            let lp = ListParams::default();
            let s = Api::<Service>::all(client.clone()).list(&lp).await?;
            let p = Api::<Pod>::all(client).list(&lp).await?;
            anyhow::Ok((s.items, p.items))
        };
        match listed.await {
            Ok((s, p)) => {
                let rules = ruleset(&frontends(&s, &p));
                let nodes = dir
                    .read_state()?
                    .map(|state| state.plan.nodes)
                    .unwrap_or_default();
                for node in nodes {
                    if applied.get(&node.netns) == Some(&rules) {
                        continue;
                    }
                    match netns::nft(&node.netns, &["-f", "-"], Some(&rules)) {
                        Ok(_) => {
                            applied.insert(node.netns.clone(), rules.clone());
                        }
                        Err(e) => {
                            tracing::warn!(node = %node.name, error = %format!("{e:#}"), "kube-proxy: applying the Service rules")
                        }
                    }
                }
            }
            // The API server restarting: kube-proxy keeps its rules and waits.
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "kube-proxy: listing"),
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

/// Starts the process for the lab in `dir` (its command line names the
/// lab's directory, so `down` ends it with the lab's other processes).
pub fn spawn(dir: &LabDir) -> Result<()> {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.file(LOG_FILE))?;
    std::process::Command::new(std::env::current_exe()?)
        .arg("--root")
        .arg(&dir.root)
        .arg("--name")
        .arg(&dir.name)
        .arg("kube-proxy")
        .arg("--lab-dir")
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the lab's kube-proxy")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(
        ns: &str,
        ip: &str,
        selector: serde_json::Value,
        ports: serde_json::Value,
    ) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "s", "namespace": ns},
            "spec": {"clusterIP": ip, "selector": selector, "ports": ports}
        }))
        .unwrap()
    }

    fn pod(ns: &str, app: &str, ip: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("p-{ip}"), "namespace": ns, "labels": {"app": app}},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": phase, "podIPs": [{"ip": "fd98:19::9"}, {"ip": ip}]}
        }))
        .unwrap()
    }

    #[test]
    fn endpoints_are_the_running_selected_pods_of_the_namespace() {
        let pods = [
            pod("x", "web", "198.19.1.2", "Running"),
            pod("x", "web", "198.19.2.2", "Running"),
            pod("x", "web", "198.19.3.2", "Pending"),
            pod("y", "web", "198.19.4.2", "Running"),
            pod("x", "db", "198.19.5.2", "Running"),
        ];
        let services = [
            service(
                "x",
                "10.96.0.5",
                json!({"app": "web"}),
                json!([{"port": 80, "targetPort": "http"}, {"port": 53, "protocol": "UDP"}]),
            ),
            service("x", "None", json!({"app": "web"}), json!([{"port": 80}])),
            service(
                "x",
                "10.96.0.6",
                json!({"app": "gone"}),
                json!([{"port": 80}]),
            ),
        ];
        let f = frontends(&services, &pods);
        let ep = |s: &[&str], port: u16| -> Vec<(Ipv4Addr, u16)> {
            s.iter().map(|ip| (ip.parse().unwrap(), port)).collect()
        };
        assert_eq!(f.len(), 3, "headless Services have no frontend");
        assert_eq!((f[0].protocol.as_str(), f[0].port), ("tcp", 80));
        assert_eq!(
            f[0].endpoints,
            ep(&["198.19.1.2", "198.19.2.2"], 8080),
            "named target port"
        );
        assert_eq!((f[1].protocol.as_str(), f[1].port), ("udp", 53));
        assert_eq!(f[1].endpoints, ep(&["198.19.1.2", "198.19.2.2"], 53));
        assert!(f[2].endpoints.is_empty());

        let rules = ruleset(&f);
        assert!(
            rules.contains("ip daddr 10.96.0.5 tcp dport 80 goto service-0"),
            "{rules}"
        );
        assert!(
            rules.contains(
                "numgen random mod 2 vmap { 0 : goto endpoint-0-0, 1 : goto endpoint-0-1 }"
            ),
            "{rules}"
        );
        assert!(rules.contains("ip saddr 198.19.1.2 meta mark set meta mark | 0x4000; meta l4proto tcp dnat to 198.19.1.2:8080"), "{rules}");
        assert!(
            rules.contains("ip daddr 10.96.0.6 tcp dport 80 reject"),
            "{rules}"
        );
    }
}
