//! The resource kinds the lab API server serves. Adding a kind (a CRD-like
//! Peer kind, AdminNetworkPolicy) is one more entry in [`KINDS`].

/// One served resource kind and how the real API server treats it.
#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    /// API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    /// Lower-case plural used in URLs (`nodes`).
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    /// Has a `/status` subresource: the main resource ignores `.status`
    /// writes and `/status` writes only `.status`.
    pub status_subresource: bool,
    /// `metadata.generation` is set and bumped on spec changes.
    pub tracks_generation: bool,
    /// Field selector labels beyond `metadata.name`/`metadata.namespace`.
    pub field_labels: &'static [&'static str],
}

/// A type's group, version and kind: what a body's `apiVersion` and `kind`
/// name, whether or not the lab serves it as a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gvk {
    /// Empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
}

impl Gvk {
    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

impl Kind {
    pub fn gvk(&self) -> Gvk {
        Gvk {
            group: self.group,
            version: self.version,
            kind: self.kind,
        }
    }

    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        self.gvk().api_version()
    }

    /// Whether `name` is a valid object name for this kind: namespaces are
    /// DNS labels, everything else DNS subdomains (as in the real server).
    pub fn name_is_label(&self) -> bool {
        self.group.is_empty() && self.plural == "namespaces"
    }
}

const CORE_EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
];

/// Every kind the server serves.
pub static KINDS: &[Kind] = &[
    Kind {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        short_names: &["ns"],
        namespaced: false,
        status_subresource: true,
        tracks_generation: false,
        field_labels: &["status.phase"],
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        singular: "node",
        short_names: &["no"],
        namespaced: false,
        status_subresource: true,
        tracks_generation: false,
        field_labels: &["spec.unschedulable"],
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        singular: "pod",
        short_names: &["po"],
        namespaced: true,
        status_subresource: true,
        tracks_generation: true,
        field_labels: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        short_names: &["ev"],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
        field_labels: CORE_EVENT_FIELDS,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        singular: "configmap",
        short_names: &["cm"],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
        field_labels: &[],
    },
    Kind {
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        plural: "events",
        singular: "event",
        short_names: &["ev"],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
        field_labels: &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ],
    },
    Kind {
        group: "networking.k8s.io",
        version: "v1",
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        singular: "networkpolicy",
        short_names: &["netpol"],
        namespaced: true,
        status_subresource: false,
        tracks_generation: true,
        field_labels: &[],
    },
    // Stored as given, so `kubectl apply -k deploy/base` installs; the
    // kinds they define are served here whether or not one is stored.
    Kind {
        group: "apiextensions.k8s.io",
        version: "v1",
        kind: "CustomResourceDefinition",
        plural: "customresourcedefinitions",
        singular: "customresourcedefinition",
        short_names: &["crd", "crds"],
        namespaced: false,
        status_subresource: true,
        tracks_generation: true,
        field_labels: &[],
    },
    // The CRD of deploy/base/crd-clusternetworkpolicies.yaml (its schema
    // is not checked here: meshd must bear what a server without one
    // would store).
    Kind {
        group: "policy.networking.k8s.io",
        version: "v1alpha2",
        kind: "ClusterNetworkPolicy",
        plural: "clusternetworkpolicies",
        singular: "clusternetworkpolicy",
        short_names: &["cnp"],
        namespaced: false,
        status_subresource: true,
        tracks_generation: true,
        field_labels: &[],
    },
    // deploy/base/crd-weftpeers.yaml: external peers.
    Kind {
        group: "weft.dev",
        version: "v1alpha1",
        kind: "WeftPeer",
        plural: "weftpeers",
        singular: "weftpeer",
        short_names: &[],
        namespaced: false,
        status_subresource: true,
        tracks_generation: true,
        field_labels: &[],
    },
    Kind {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        singular: "lease",
        short_names: &[],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
        field_labels: &[],
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        singular: "service",
        short_names: &["svc"],
        namespaced: true,
        status_subresource: true,
        tracks_generation: false,
        field_labels: &[],
    },
    // The API servers' own addresses (`default/kubernetes`, which the API
    // server keeps).
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        singular: "endpointslice",
        short_names: &[],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
        field_labels: &[],
    },
    // What `kubectl apply -k deploy/` installs.
    Kind {
        group: "",
        version: "v1",
        kind: "ResourceQuota",
        plural: "resourcequotas",
        singular: "resourcequota",
        short_names: &["quota"],
        namespaced: true,
        status_subresource: true,
        tracks_generation: false,
        field_labels: &[],
    },
    Kind {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        short_names: &["sa"],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
        field_labels: &[],
    },
    Kind {
        group: "apps",
        version: "v1",
        kind: "DaemonSet",
        plural: "daemonsets",
        singular: "daemonset",
        short_names: &["ds"],
        namespaced: true,
        status_subresource: true,
        tracks_generation: true,
        field_labels: &[],
    },
    Kind {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "ClusterRole",
        plural: "clusterroles",
        singular: "clusterrole",
        short_names: &[],
        namespaced: false,
        status_subresource: false,
        tracks_generation: false,
        field_labels: &[],
    },
    Kind {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "ClusterRoleBinding",
        plural: "clusterrolebindings",
        singular: "clusterrolebinding",
        short_names: &[],
        namespaced: false,
        status_subresource: false,
        tracks_generation: false,
        field_labels: &[],
    },
    Kind {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "Role",
        plural: "roles",
        singular: "role",
        short_names: &[],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
        field_labels: &[],
    },
    Kind {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "RoleBinding",
        plural: "rolebindings",
        singular: "rolebinding",
        short_names: &[],
        namespaced: true,
        status_subresource: false,
        tracks_generation: false,
        field_labels: &[],
    },
    Kind {
        group: "admissionregistration.k8s.io",
        version: "v1",
        kind: "ValidatingAdmissionPolicy",
        plural: "validatingadmissionpolicies",
        singular: "validatingadmissionpolicy",
        short_names: &[],
        namespaced: false,
        status_subresource: true,
        tracks_generation: true,
        field_labels: &[],
    },
    Kind {
        group: "admissionregistration.k8s.io",
        version: "v1",
        kind: "ValidatingAdmissionPolicyBinding",
        plural: "validatingadmissionpolicybindings",
        singular: "validatingadmissionpolicybinding",
        short_names: &[],
        namespaced: false,
        status_subresource: false,
        tracks_generation: true,
        field_labels: &[],
    },
];

/// The kind served at `group/version/plural`.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
}

/// The core `Namespace` kind, which the store treats specially.
pub fn namespace_kind() -> &'static Kind {
    lookup("", "v1", "namespaces").expect("namespaces are always served")
}

/// Distinct `(group, version)` pairs, in table order.
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for k in KINDS {
        if !out.contains(&(k.group, k.version)) {
            out.push((k.group, k.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plurals_are_unique_per_group_version() {
        for (i, a) in KINDS.iter().enumerate() {
            for b in &KINDS[i + 1..] {
                assert!(
                    (a.group, a.version, a.plural) != (b.group, b.version, b.plural),
                    "{} served twice",
                    a.plural
                );
            }
        }
    }

    #[test]
    fn api_version_of_core_and_groups() {
        assert_eq!(namespace_kind().api_version(), "v1");
        let np = lookup("networking.k8s.io", "v1", "networkpolicies").unwrap();
        assert_eq!(np.api_version(), "networking.k8s.io/v1");
        assert!(group_versions().contains(&("coordination.k8s.io", "v1")));
    }
}
