//! The Kubernetes side: Node objects into planner input, this node's
//! annotations out (only when their content changes), and Events on nodes
//! the planner excluded.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::Value;

use weft_policy::cnp::ClusterNetworkPolicy;

use crate::annotations::PREFIX;
use crate::model::{NodeInfo, Placement};

/// The well-known topology labels link costs are computed from.
/// The namespace Weft is installed in. Its admission policies
/// (deploy/base/admission.yaml) name meshd's service account in it, so it
/// is fixed: a macro, so that the defaults built from it stay constants.
#[macro_export]
macro_rules! weft_namespace {
    () => {
        "weft-system"
    };
}
pub const NAMESPACE: &str = weft_namespace!();

/// meshd refuses to run in another namespace than [`NAMESPACE`] (a
/// kustomize `namespace:` override moves every object but cannot rewrite
/// the service account the admission policies' CEL names, and every write
/// of meshd's would then be refused, one by one): `pod_namespace` is its
/// Pod's (`POD_NAMESPACE`, from the downward API), `None` outside a Pod.
pub fn check_namespace(pod_namespace: Option<&str>) -> Result<(), WrongNamespace> {
    match pod_namespace {
        Some(ns) if ns != NAMESPACE => Err(WrongNamespace(ns.to_string())),
        _ => Ok(()),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("meshd runs in namespace {0:?}, but Weft's admission policies name its service account in {NAMESPACE:?}: install Weft into {NAMESPACE} (a kustomize namespace override is not supported; see docs/install.md)")]
pub struct WrongNamespace(String);

pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// `false` keeps a node from relaying others' traffic. Under the
/// `node-restriction.kubernetes.io/` prefix, which the NodeRestriction
/// admission plugin keeps kubelets from setting or removing: only an
/// admin can change it.
pub const RELAY_LABEL: &str = "node-restriction.kubernetes.io/weft-relay";

/// A kind meshd watches through a reflector.
pub trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static
{
}

/// A reflector store of `api`, kept current in the background (watch
/// errors are retried with backoff); `on_event` sees every event once the
/// store has it.
pub fn reflect<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
    mut on_event: impl FnMut(&watcher::Event<K>) + Send + 'static,
) -> Store<K> {
    let (reader, writer) = reflector::store();
    tokio::spawn(async move {
        let stream = reflector(writer, watcher(api, config)).default_backoff();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => on_event(&event),
                Err(e) => tracing::warn!(error = %e, kind = %K::kind(&()), "watching (retrying)"),
            }
        }
    });
    reader
}

/// The numeric resourceVersion of an object (0 if it is not a number).
pub fn revision(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `NAMESPACE/NAME` given as `flag` (a ConfigMap meshd or meshctl reads),
/// split; an error names the flag.
pub fn object_ref<'a>(flag: &str, value: &'a str) -> Result<(&'a str, &'a str)> {
    value
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .with_context(|| format!("{flag} {value:?}: expected NAMESPACE/NAME"))
}

/// An idle API connection sends its first TCP keepalive after this long,
/// repeats it every [`API_KEEPALIVE_INTERVAL`], and is dead after
/// [`API_KEEPALIVE_RETRIES`] unanswered.
const API_KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const API_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const API_KEEPALIVE_RETRIES: u32 = 3;

/// A client whose connections send TCP keepalives. A watch only reads: on
/// a connection that died silently — its node's NAT changed its public
/// address, taking its flows with it — it would wait for events until the
/// watch times out (minutes), and meshd would plan from a stale cluster.
/// A keepalive then fails (or draws the server's reset) within 25 s, and
/// the watch is started again; a request on such a connection fails after
/// as long unacknowledged (`TCP_USER_TIMEOUT`) rather than after the
/// kernel's retransmissions (about 15 minutes). The rest is kube's own
/// client (base URI, authentication with token refresh, kubeconfig's
/// extra headers) minus its retry layer: meshd retries every failed sync
/// itself.
pub fn keepalive_client(config: kube::Config) -> Result<Client> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use kube::client::ConfigExt;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(config.connect_timeout);
    http.set_keepalive(Some(API_KEEPALIVE_IDLE));
    http.set_keepalive_interval(Some(API_KEEPALIVE_INTERVAL));
    http.set_keepalive_retries(Some(API_KEEPALIVE_RETRIES));
    http.set_tcp_user_timeout(Some(
        API_KEEPALIVE_IDLE + API_KEEPALIVE_INTERVAL * API_KEEPALIVE_RETRIES,
    ));
    let https = config.rustls_https_connector_with_connector(http)?;
    let http_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(http_client);
    Ok(Client::new(service, config.default_namespace))
}

/// A Node as the planner sees it. Malformed control-plane fields (an
/// unparsable podCIDR or address) are dropped, not fatal.
pub fn node_info(node: &Node) -> NodeInfo {
    let created = node
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(i64::MAX, |t| t.0.as_second());
    let addresses = |kind: &str| -> Vec<IpAddr> {
        node.status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(|addrs| {
                addrs
                    .iter()
                    .filter(|a| a.type_ == kind)
                    .filter_map(|a| a.address.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let spec_pod_cidrs: Vec<IpNet> = node
        .spec
        .as_ref()
        .and_then(|s| s.pod_cidrs.as_ref())
        .map(|c| c.iter().filter_map(|c| c.parse().ok()).collect())
        .unwrap_or_default();
    let annotations = node
        .annotations()
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let labels = node.labels();
    let placement = Placement {
        region: labels.get(REGION_LABEL).cloned(),
        zone: labels.get(ZONE_LABEL).cloned(),
        may_relay: labels.get(RELAY_LABEL).map(String::as_str) != Some("false"),
    };
    NodeInfo {
        name: node.name_any(),
        uid: node.metadata.uid.clone().unwrap_or_default(),
        created,
        internal_ips: addresses("InternalIP"),
        external_ips: addresses("ExternalIP"),
        spec_pod_cidrs,
        annotations,
        placement,
    }
}

pub async fn patch_node(client: &Client, name: &str, patch: &Value) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .with_context(|| format!("publishing annotations on Node {name}"))?;
    Ok(())
}

/// Where meshd's Events go: its own namespace (its role allows creating
/// Events there and nowhere else), each regarding a Node.
#[derive(Clone)]
pub struct Events {
    api: Api<Event>,
    /// This node's name: the reporting instance.
    instance: String,
}

impl Events {
    pub fn new(client: Client, namespace: &str, node_name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            instance: node_name.to_string(),
        }
    }
}

/// A Warning Event regarding `node`: its annotations were rejected.
/// (`kubectl describe node` finds Events regarding a Node in any
/// namespace.)
pub async fn report_exclusion(events: &Events, node: &Node, note: String) -> Result<()> {
    let warning = Warning {
        action: "ExcludeFromMesh",
        reason: "WeftAnnotationsRejected",
        note,
    };
    warn(events, node_ref(&node.name_any(), node.uid()), warning).await
}

/// A reference to the Node `name` (of `uid`).
pub fn node_ref(name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(name.into()),
        uid,
        ..ObjectReference::default()
    }
}

/// Every ClusterNetworkPolicy (none where the CRD is not installed).
pub async fn cluster_policies(client: &Client) -> Result<Vec<ClusterNetworkPolicy>> {
    let api = Api::all(client.clone());
    Ok(list_served(&api, &ListParams::default())
        .await?
        .unwrap_or_default())
}

/// The objects of the kind of `api`; `None` where the API does not serve
/// that kind (a CRD not installed: it answers 404).
pub async fn list_served<K: Watched>(api: &Api<K>, params: &ListParams) -> Result<Option<Vec<K>>> {
    match api.list(params).await {
        Ok(list) => Ok(Some(list.items)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(e).with_context(|| format!("listing {}", K::plural(&()))),
    }
}

/// What a Warning Event says.
pub struct Warning {
    pub action: &'static str,
    pub reason: &'static str,
    pub note: String,
}

/// Merge-patches `object`'s status with `status`, on condition that the
/// object is still the version read: of nodes racing to write the same
/// status one wins. Whether this write went through (it lost: `false`).
pub async fn patch_status_once<K>(api: &Api<K>, object: &K, status: Value) -> Result<bool>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": object.resource_version()},
        "status": status,
    });
    match api
        .patch_status(
            &object.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A reference to `object` for an Event.
pub fn reference<K: kube::Resource<DynamicType = ()>>(object: &K) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: Some(object.name_any()),
        uid: object.uid(),
        ..ObjectReference::default()
    }
}

/// A Warning Event regarding the object `regarding`.
pub async fn warn(events: &Events, regarding: ObjectReference, warning: Warning) -> Result<()> {
    let name = regarding.name.clone().unwrap_or_default();
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}.")),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        reporting_controller: Some("weft-meshd".into()),
        reporting_instance: Some(events.instance.clone()),
        action: Some(warning.action.into()),
        reason: Some(warning.reason.into()),
        type_: Some("Warning".into()),
        note: Some(warning.note.chars().take(1024).collect()),
        regarding: Some(regarding),
        ..Event::default()
    };
    events
        .api
        .create(&PostParams::default(), &event)
        .await
        .context("recording an Event")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meshd_runs_only_in_weft_s_namespace() {
        assert_eq!(check_namespace(None), Ok(()), "outside a Pod");
        assert_eq!(check_namespace(Some("weft-system")), Ok(()));
        let e = check_namespace(Some("networking")).unwrap_err().to_string();
        assert!(
            e.contains("\"networking\"") && e.contains("install Weft into weft-system"),
            "{e}"
        );
    }
}
