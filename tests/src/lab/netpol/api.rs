//! Moving the lab's API objects to a case's state in place: namespace
//! labels, pod labels and named ports, and the case's policies — created,
//! replaced when changed, deleted when the case has them no more.

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ContainerPort, Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::Client;
use weft_policy::case::Case;

/// The numeric resourceVersion of a written object (the lab's are numbers).
fn revision(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Applies `case`; returns the newest resourceVersion written (0: nothing
/// changed).
pub async fn apply(client: Client, case: &Case) -> Result<u64> {
    let mut newest = 0;
    let post = PostParams::default();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in &case.namespaces {
        let written = match namespaces.get_opt(&ns.name).await? {
            Some(object) if object.metadata.labels.as_ref() == Some(&ns.labels) => continue,
            Some(mut object) => {
                object.metadata.labels = Some(ns.labels.clone());
                namespaces.replace(&ns.name, &post, &object).await?
            }
            None => {
                let object = Namespace {
                    metadata: ObjectMeta {
                        name: Some(ns.name.clone()),
                        labels: Some(ns.labels.clone()),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                };
                namespaces.create(&post, &object).await?
            }
        };
        newest = newest.max(revision(&written.metadata));
    }
    for pod in &case.pods {
        let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
        let mut object = api.get(&pod.name).await?;
        let ports: Vec<ContainerPort> = pod
            .ports
            .iter()
            .map(|p| ContainerPort {
                name: Some(p.name.clone()),
                container_port: i32::from(p.port),
                protocol: Some(p.protocol.to_string()),
                ..ContainerPort::default()
            })
            .collect();
        let ports = (!ports.is_empty()).then_some(ports);
        let container = object
            .spec
            .get_or_insert_with(Default::default)
            .containers
            .first_mut()
            .with_context(|| format!("pod {} has no container", pod.key()))?;
        if object.metadata.labels.as_ref() == Some(&pod.labels) && container.ports == ports {
            continue;
        }
        // The lab lets a pod's ports change; a real cluster would need a
        // new pod, which is what upstream's model does per test.
        container.ports = ports;
        object.metadata.labels = Some(pod.labels.clone());
        let written = api.replace(&pod.name, &post, &object).await?;
        newest = newest.max(revision(&written.metadata));
    }
    for ns in &case.namespaces {
        let wanted = case
            .policies
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() == Some(ns.name.as_str()));
        let api = Api::namespaced(client.clone(), &ns.name);
        newest = newest.max(sync(&api, wanted, |a, b| a.spec == b.spec).await?);
    }
    let api = Api::all(client.clone());
    let wanted = case.cluster_policies.iter();
    newest = newest.max(sync(&api, wanted, |a, b| a.spec == b.spec).await?);
    Ok(newest)
}

/// Makes the objects of `api` the `wanted` ones: others deleted, changed
/// ones (by `same`) replaced, missing ones created. Returns the newest
/// resourceVersion written (0: none).
async fn sync<'a, K>(
    api: &Api<K>,
    wanted: impl Iterator<Item = &'a K> + Clone,
    same: impl Fn(&K, &K) -> bool,
) -> Result<u64>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + 'a,
{
    let post = PostParams::default();
    let mut newest = 0;
    for existing in api.list(&ListParams::default()).await? {
        let name = existing.meta().name.clone().unwrap_or_default();
        if wanted
            .clone()
            .all(|w| w.meta().name.as_deref() != Some(name.as_str()))
        {
            if let Some(gone) = api.delete(&name, &DeleteParams::default()).await?.left() {
                newest = newest.max(revision(gone.meta()));
            }
        }
    }
    for object in wanted {
        let name = object.meta().name.as_deref().unwrap_or_default();
        let written = match api.get_opt(name).await? {
            Some(old) if same(&old, object) => continue,
            Some(old) => {
                let mut new = object.clone();
                new.meta_mut().resource_version = old.meta().resource_version.clone();
                api.replace(name, &post, &new).await?
            }
            None => api.create(&post, object).await?,
        };
        newest = newest.max(revision(written.meta()));
    }
    Ok(newest)
}

/// Makes sure each pod of `case` has its Service, as upstream's probes do:
/// `s-<pod>` in the pod's namespace, selecting `pod: <name>` (upstream's
/// label for every pod), with every port and protocol the case serves.
/// Returns each pod's ClusterIP, by `namespace/name`.
pub async fn services(
    client: Client,
    case: &Case,
) -> Result<std::collections::BTreeMap<String, std::net::Ipv4Addr>> {
    use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
    let mut ips = std::collections::BTreeMap::new();
    for pod in &case.pods {
        anyhow::ensure!(
            pod.labels.get("pod") == Some(&pod.name),
            "case {}: pod {} lacks upstream's label pod: {} (probing through Services needs it)",
            case.id,
            pod.key(),
            pod.name
        );
        let services: Api<Service> = Api::namespaced(client.clone(), &pod.namespace);
        let name = format!("s-{}", pod.name);
        let ports: Vec<ServicePort> = case
            .server_ports
            .iter()
            .flat_map(|port| {
                case.server_protocols.iter().map(move |protocol| {
                    let protocol = protocol.to_string();
                    ServicePort {
                        name: Some(format!("{}-{port}", protocol.to_lowercase())),
                        port: i32::from(*port),
                        protocol: Some(protocol),
                        ..ServicePort::default()
                    }
                })
            })
            .collect();
        let wanted = ServiceSpec {
            selector: Some([("pod".to_string(), pod.name.clone())].into()),
            ports: Some(ports),
            ..ServiceSpec::default()
        };
        let service = match services.get_opt(&name).await? {
            Some(s)
                if s.spec.as_ref().map(|s| (&s.selector, &s.ports))
                    == Some((&wanted.selector, &wanted.ports)) =>
            {
                s
            }
            existing => {
                if existing.is_some() {
                    services.delete(&name, &DeleteParams::default()).await?;
                }
                let object = Service {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(wanted),
                    ..Service::default()
                };
                services
                    .create(&PostParams::default(), &object)
                    .await
                    .with_context(|| format!("creating Service {}/{name}", pod.namespace))?
            }
        };
        let ip = service
            .spec
            .and_then(|s| s.cluster_ip)
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("Service {}/{name} has no IPv4 ClusterIP", pod.namespace))?;
        ips.insert(pod.key(), ip);
    }
    Ok(ips)
}
