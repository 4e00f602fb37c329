//! Pods in the lab: a network namespace attached by the node's installed
//! `weft` plugin exactly as a runtime would (environment, the node's
//! conflist on stdin), recorded as a Pod object with its IPs.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::agents;
use super::state::LabDir;
use super::topology::NodePlan;
use super::{client, netns};

/// A pod as the lab records it (`lab.json`, `status --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    pub ips: Vec<String>,
}

/// The namespace of pod `namespace/name` in lab `lab`.
pub fn netns_name(lab: &str, namespace: &str, name: &str) -> String {
    format!("{lab}-pod-{namespace}-{name}")
}

/// The `weft` plugin's configuration as a runtime hands it over from the
/// conflist: the plugin's entry with the list's `cniVersion` and `name`.
pub fn weft_config(conflist: &Value) -> Value {
    let mut conf = conflist["plugins"][0].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    conf
}

/// Runs the node's installed plugin with `command` for a pod.
fn cni(
    dir: &LabDir,
    node: &NodePlan,
    command: &str,
    container_id: &str,
    pod: (&str, &str),
    pod_netns: &str,
) -> Result<Value> {
    let cni_args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
        pod.0, pod.1
    );
    let netns = format!("/run/netns/{pod_netns}");
    plugin(
        dir,
        node,
        command,
        &[
            ("CNI_CONTAINERID", container_id),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
            // What kubelet's runtimes pass: the plugin records which pod this is.
            ("CNI_ARGS", &cni_args),
        ],
    )
}

/// CNI STATUS, as a runtime asks before it sends pods: whether the node's
/// plugin can take an ADD now (its error says why not).
pub fn status(dir: &LabDir, node: &NodePlan) -> Result<()> {
    plugin(dir, node, "STATUS", &[]).map(drop)
}

/// Runs the node's installed plugin with `command` and `vars`, the node's
/// conflist's plugin configuration on stdin, in the node's namespace.
fn plugin(dir: &LabDir, node: &NodePlan, command: &str, vars: &[(&str, &str)]) -> Result<Value> {
    let bin = agents::cni_bin_dir(dir, node);
    let conf = weft_config(&agents::conflist(dir, node)?);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.netns])
        .arg(bin.join(weft_meshd::cni::PLUGIN))
        .env_clear()
        .env("CNI_COMMAND", command)
        .envs(vars.iter().copied())
        .env("CNI_PATH", &bin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running the weft plugin")?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "weft {command} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout)?
    })
}

/// Creates pod `namespace/name` on `node`.
/// Whether a new pod's addresses are reported on its Pod object, as
/// kubelet does once the sandbox is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Reported,
    /// Never reported: only what the CNI plugin recorded says which
    /// addresses the pod has.
    Unreported,
}

/// Attaches a pod the way a cluster does: the Pod object exists first (the
/// scheduler put it on the node), then the runtime calls CNI ADD naming it,
/// then kubelet reports its addresses.
pub fn add(
    dir: &LabDir,
    node: &NodePlan,
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    status: Status,
) -> Result<PodRecord> {
    let pod_netns = netns_name(&dir.name, namespace, name);
    if netns::exists(&pod_netns) {
        bail!("pod {namespace}/{name} exists already");
    }
    let mut record = PodRecord {
        namespace: namespace.into(),
        name: name.into(),
        node: node.name.clone(),
        netns: pod_netns.clone(),
        container_id: uuid::Uuid::new_v4().simple().to_string(),
        ips: Vec::new(),
    };
    netns::ip(&["netns", "add", &pod_netns])?;
    let attached = create_object(dir, &record, labels).and_then(|()| {
        cni(
            dir,
            node,
            "ADD",
            &record.container_id,
            (namespace, name),
            &pod_netns,
        )
    });
    let result = match attached {
        Ok(r) => r,
        Err(e) => {
            let _ = netns::delete(&pod_netns);
            let _ = delete_object(dir, &record);
            return Err(e);
        }
    };
    record.ips = result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|i| i["address"].as_str()?.split('/').next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if status == Status::Reported {
        report_status(dir, &record)?;
    }
    Ok(record)
}

/// Creates the Pod object (and its namespace if needed), as scheduled.
fn create_object(dir: &LabDir, pod: &PodRecord, labels: &BTreeMap<String, String>) -> Result<()> {
    client::block_on(dir, |client| async move {
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        if namespaces.get_opt(&pod.namespace).await?.is_none() {
            let ns = serde_json::from_value(json!({"metadata": {"name": pod.namespace}}))?;
            namespaces.create(&PostParams::default(), &ns).await?;
        }
        let pods: Api<Pod> = Api::namespaced(client, &pod.namespace);
        let object: Pod = serde_json::from_value(json!({
            "metadata": {"name": pod.name, "labels": labels, "annotations": {"meshlab.weft.dev/netns": pod.netns}},
            "spec": {"nodeName": pod.node, "containers": [{"name": "app", "image": "meshlab/netns"}]},
        }))?;
        pods.create(&PostParams::default(), &object).await?;
        Ok(())
    })
}

/// Reports the pod running with its addresses, as kubelet does.
fn report_status(dir: &LabDir, pod: &PodRecord) -> Result<()> {
    client::block_on(dir, |client| async move {
        let pods: Api<Pod> = Api::namespaced(client, &pod.namespace);
        let ips: Vec<Value> = pod.ips.iter().map(|ip| json!({"ip": ip})).collect();
        let status =
            json!({"status": {"phase": "Running", "podIP": pod.ips.first(), "podIPs": ips}});
        pods.patch_status(&pod.name, &PatchParams::default(), &Patch::Merge(status))
            .await?;
        Ok(())
    })
}

/// Deletes a pod: CNI DEL, its namespace and its Pod object.
pub fn delete(dir: &LabDir, node: &NodePlan, pod: &PodRecord) -> Result<()> {
    let who = (pod.namespace.as_str(), pod.name.as_str());
    cni(dir, node, "DEL", &pod.container_id, who, &pod.netns)?;
    if netns::exists(&pod.netns) {
        netns::delete(&pod.netns)?;
    }
    delete_object(dir, pod)
}

fn delete_object(dir: &LabDir, pod: &PodRecord) -> Result<()> {
    client::block_on(dir, |client| async move {
        let pods: Api<Pod> = Api::namespaced(client, &pod.namespace);
        pods.delete(&pod.name, &Default::default()).await?;
        Ok(())
    })
}
