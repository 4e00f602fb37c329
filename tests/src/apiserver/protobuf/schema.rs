//! The protobuf messages the lab decodes, as tables: field number → JSON
//! name, type and label, transcribed from k8s.io/api's `generated.proto`
//! (Kubernetes 1.33) for exactly the kinds kubectl 1.33 sends as protobuf
//! that the lab serves, and what they nest. The tests check every number
//! against `k8s-pb`'s types, which carry the upstream ones.
//!
//! Names are the JSON names: where the protobuf name differs (Go struct
//! tags disagree, e.g. `BoundObjectReference.uID`), the JSON one is
//! written. None of these messages embeds an inlined Go struct.

use super::super::access::TOKEN_REQUEST;
use super::super::kinds::Gvk;

/// One message: its fields and how it prints as JSON.
#[derive(Debug)]
pub struct Message {
    /// For error messages and tests (the protobuf name).
    pub name: &'static str,
    pub fields: &'static [Field],
    pub form: Form,
}

#[derive(Debug)]
pub struct Field {
    pub number: u32,
    pub json: &'static str,
    pub ty: Type,
    pub label: Label,
}

/// A field's value type (a map's value type, for maps, whose keys are
/// strings in every Kubernetes message).
#[derive(Debug)]
pub enum Type {
    String,
    /// Printed as standard base64, as Go's encoding/json prints `[]byte`.
    Bytes,
    /// Bytes that carry JSON, printed as that JSON (`FieldsV1.Raw`).
    Json,
    Bool,
    Int32,
    Int64,
    Message(&'static Message),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Singular,
    Repeated,
    /// `map<string, T>`: repeated entries {key = 1, value = 2}.
    Map,
}

/// How a message prints as JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// An object of its fields.
    Object,
    /// `ObjectMeta`: an object whose zero numbers and `false`s are dropped
    /// too — every scalar there is a value field the server owns or omits
    /// when zero (no `generation: 0`).
    Meta,
    /// `metav1.Time` {seconds = 1, nanos = 2}: an RFC 3339 string, the zero
    /// time `null`.
    Time,
    /// A wrapper printed as its one field (`Quantity.string`, `FieldsV1.Raw`).
    Unwrap(&'static str),
}

const fn field(number: u32, json: &'static str, ty: Type, label: Label) -> Field {
    Field {
        number,
        json,
        ty,
        label,
    }
}

const fn one(number: u32, json: &'static str, ty: Type) -> Field {
    field(number, json, ty, Label::Singular)
}

const fn many(number: u32, json: &'static str, ty: Type) -> Field {
    field(number, json, ty, Label::Repeated)
}

const fn map(number: u32, json: &'static str, ty: Type) -> Field {
    field(number, json, ty, Label::Map)
}

const fn object(name: &'static str, fields: &'static [Field]) -> Message {
    Message {
        name,
        fields,
        form: Form::Object,
    }
}

use Type::{Bool, Bytes, Int32, Int64, Json, String};

// k8s.io/apimachinery/pkg/apis/meta/v1

const TIME: Message = Message {
    name: "Time",
    fields: &[one(1, "seconds", Int64), one(2, "nanos", Int32)],
    form: Form::Time,
};

const FIELDS_V1: Message = Message {
    name: "FieldsV1",
    fields: &[one(1, "Raw", Json)],
    form: Form::Unwrap("Raw"),
};

const OWNER_REFERENCE: Message = object(
    "OwnerReference",
    &[
        one(5, "apiVersion", String),
        one(1, "kind", String),
        one(3, "name", String),
        one(4, "uid", String),
        one(6, "controller", Bool),
        one(7, "blockOwnerDeletion", Bool),
    ],
);

const MANAGED_FIELDS_ENTRY: Message = object(
    "ManagedFieldsEntry",
    &[
        one(1, "manager", String),
        one(2, "operation", String),
        one(3, "apiVersion", String),
        one(4, "time", Type::Message(&TIME)),
        one(6, "fieldsType", String),
        one(7, "fieldsV1", Type::Message(&FIELDS_V1)),
        one(8, "subresource", String),
    ],
);

const OBJECT_META: Message = Message {
    name: "ObjectMeta",
    fields: &[
        one(1, "name", String),
        one(2, "generateName", String),
        one(3, "namespace", String),
        one(4, "selfLink", String),
        one(5, "uid", String),
        one(6, "resourceVersion", String),
        one(7, "generation", Int64),
        one(8, "creationTimestamp", Type::Message(&TIME)),
        one(9, "deletionTimestamp", Type::Message(&TIME)),
        one(10, "deletionGracePeriodSeconds", Int64),
        map(11, "labels", String),
        map(12, "annotations", String),
        many(13, "ownerReferences", Type::Message(&OWNER_REFERENCE)),
        many(14, "finalizers", String),
        many(17, "managedFields", Type::Message(&MANAGED_FIELDS_ENTRY)),
    ],
    form: Form::Meta,
};

const META: Type = Type::Message(&OBJECT_META);

const LABEL_SELECTOR_REQUIREMENT: Message = object(
    "LabelSelectorRequirement",
    &[
        one(1, "key", String),
        one(2, "operator", String),
        many(3, "values", String),
    ],
);

const LABEL_SELECTOR: Message = object(
    "LabelSelector",
    &[
        map(1, "matchLabels", String),
        many(
            2,
            "matchExpressions",
            Type::Message(&LABEL_SELECTOR_REQUIREMENT),
        ),
    ],
);

// k8s.io/apimachinery/pkg/runtime: the envelope's type.

/// `runtime.TypeMeta` (not meta/v1's, whose numbers are swapped).
pub const TYPE_META: Message = object(
    "TypeMeta",
    &[one(1, "apiVersion", String), one(2, "kind", String)],
);

// k8s.io/apimachinery/pkg/api/resource

const QUANTITY: Message = Message {
    name: "Quantity",
    fields: &[one(1, "string", String)],
    form: Form::Unwrap("string"),
};

// k8s.io/api/core/v1

const CONFIG_MAP: Message = object(
    "ConfigMap",
    &[
        one(1, "metadata", META),
        one(4, "immutable", Bool),
        map(2, "data", String),
        map(3, "binaryData", Bytes),
    ],
);

const NAMESPACE_CONDITION: Message = object(
    "NamespaceCondition",
    &[
        one(1, "type", String),
        one(2, "status", String),
        one(4, "lastTransitionTime", Type::Message(&TIME)),
        one(5, "reason", String),
        one(6, "message", String),
    ],
);

const NAMESPACE: Message = object(
    "Namespace",
    &[
        one(1, "metadata", META),
        one(
            2,
            "spec",
            Type::Message(&object("NamespaceSpec", &[many(1, "finalizers", String)])),
        ),
        one(
            3,
            "status",
            Type::Message(&object(
                "NamespaceStatus",
                &[
                    one(1, "phase", String),
                    many(2, "conditions", Type::Message(&NAMESPACE_CONDITION)),
                ],
            )),
        ),
    ],
);

const OBJECT_REFERENCE: Message = object(
    "ObjectReference",
    &[
        one(1, "kind", String),
        one(2, "namespace", String),
        one(3, "name", String),
        one(4, "uid", String),
        one(5, "apiVersion", String),
        one(6, "resourceVersion", String),
        one(7, "fieldPath", String),
    ],
);

const SERVICE_ACCOUNT: Message = object(
    "ServiceAccount",
    &[
        one(1, "metadata", META),
        many(2, "secrets", Type::Message(&OBJECT_REFERENCE)),
        many(
            3,
            "imagePullSecrets",
            Type::Message(&object("LocalObjectReference", &[one(1, "name", String)])),
        ),
        one(4, "automountServiceAccountToken", Bool),
    ],
);

const SCOPED_RESOURCE_SELECTOR_REQUIREMENT: Message = object(
    "ScopedResourceSelectorRequirement",
    &[
        one(1, "scopeName", String),
        one(2, "operator", String),
        many(3, "values", String),
    ],
);

const RESOURCE_QUOTA: Message = object(
    "ResourceQuota",
    &[
        one(1, "metadata", META),
        one(
            2,
            "spec",
            Type::Message(&object(
                "ResourceQuotaSpec",
                &[
                    map(1, "hard", Type::Message(&QUANTITY)),
                    many(2, "scopes", String),
                    one(
                        3,
                        "scopeSelector",
                        Type::Message(&object(
                            "ScopeSelector",
                            &[many(
                                1,
                                "matchExpressions",
                                Type::Message(&SCOPED_RESOURCE_SELECTOR_REQUIREMENT),
                            )],
                        )),
                    ),
                ],
            )),
        ),
        one(
            3,
            "status",
            Type::Message(&object(
                "ResourceQuotaStatus",
                &[
                    map(1, "hard", Type::Message(&QUANTITY)),
                    map(2, "used", Type::Message(&QUANTITY)),
                ],
            )),
        ),
    ],
);

// k8s.io/api/rbac/v1

const POLICY_RULE: Message = object(
    "PolicyRule",
    &[
        many(1, "verbs", String),
        many(2, "apiGroups", String),
        many(3, "resources", String),
        many(4, "resourceNames", String),
        many(5, "nonResourceURLs", String),
    ],
);

const RULES: Field = many(2, "rules", Type::Message(&POLICY_RULE));

const CLUSTER_ROLE: Message = object(
    "ClusterRole",
    &[
        one(1, "metadata", META),
        RULES,
        one(
            3,
            "aggregationRule",
            Type::Message(&object(
                "AggregationRule",
                &[many(
                    1,
                    "clusterRoleSelectors",
                    Type::Message(&LABEL_SELECTOR),
                )],
            )),
        ),
    ],
);

const ROLE: Message = object("Role", &[one(1, "metadata", META), RULES]);

const SUBJECTS: Field = many(
    2,
    "subjects",
    Type::Message(&object(
        "Subject",
        &[
            one(1, "kind", String),
            one(2, "apiGroup", String),
            one(3, "name", String),
            one(4, "namespace", String),
        ],
    )),
);

const ROLE_REF: Field = one(
    3,
    "roleRef",
    Type::Message(&object(
        "RoleRef",
        &[
            one(1, "apiGroup", String),
            one(2, "kind", String),
            one(3, "name", String),
        ],
    )),
);

const CLUSTER_ROLE_BINDING: Message = object(
    "ClusterRoleBinding",
    &[one(1, "metadata", META), SUBJECTS, ROLE_REF],
);

const ROLE_BINDING: Message = object(
    "RoleBinding",
    &[one(1, "metadata", META), SUBJECTS, ROLE_REF],
);

// k8s.io/api/authentication/v1

const TOKEN_REQUEST_MESSAGE: Message = object(
    "TokenRequest",
    &[
        one(1, "metadata", META),
        one(
            2,
            "spec",
            Type::Message(&object(
                "TokenRequestSpec",
                &[
                    many(1, "audiences", String),
                    one(4, "expirationSeconds", Int64),
                    one(
                        3,
                        "boundObjectRef",
                        Type::Message(&object(
                            "BoundObjectReference",
                            &[
                                one(1, "kind", String),
                                one(2, "apiVersion", String),
                                one(3, "name", String),
                                // protobuf: uID
                                one(4, "uid", String),
                            ],
                        )),
                    ),
                ],
            )),
        ),
        one(
            3,
            "status",
            Type::Message(&object(
                "TokenRequestStatus",
                &[
                    one(1, "token", String),
                    one(2, "expirationTimestamp", Type::Message(&TIME)),
                ],
            )),
        ),
    ],
);

const fn gvk(group: &'static str, version: &'static str, kind: &'static str) -> Gvk {
    Gvk {
        group,
        version,
        kind,
    }
}

const RBAC: &str = "rbac.authorization.k8s.io";

/// The types the lab accepts in protobuf: what kubectl 1.33's generators
/// send that the lab serves (`create configmap|namespace|serviceaccount|
/// quota|clusterrole|clusterrolebinding|role|rolebinding|token`). Manifests
/// (`create -f`, `apply`) and deletes go as JSON.
pub static TYPES: &[(Gvk, &Message)] = &[
    (gvk("", "v1", "ConfigMap"), &CONFIG_MAP),
    (gvk("", "v1", "Namespace"), &NAMESPACE),
    (gvk("", "v1", "ServiceAccount"), &SERVICE_ACCOUNT),
    (gvk("", "v1", "ResourceQuota"), &RESOURCE_QUOTA),
    (gvk(RBAC, "v1", "ClusterRole"), &CLUSTER_ROLE),
    (gvk(RBAC, "v1", "ClusterRoleBinding"), &CLUSTER_ROLE_BINDING),
    (gvk(RBAC, "v1", "Role"), &ROLE),
    (gvk(RBAC, "v1", "RoleBinding"), &ROLE_BINDING),
    (TOKEN_REQUEST, &TOKEN_REQUEST_MESSAGE),
];

/// The message of `gvk`, if the lab decodes it.
pub fn message(gvk: Gvk) -> Option<&'static Message> {
    TYPES.iter().find(|(g, _)| *g == gvk).map(|(_, m)| *m)
}
