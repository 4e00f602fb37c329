//! Access control around the store, in kube-apiserver's order:
//! authentication (a bearer token → [`User`]), authorization (the Node
//! authorizer, then RBAC) and admission (NodeRestriction, then validating
//! policies over the object about to be written). Each step decides in a
//! pure module ([`auth`], [`kubelet`], [`rbac`], [`admission`]); this one
//! gathers their inputs from the store.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::admission::{self, Operation};
use super::auth::{Claims, Credential, KubernetesClaim, ObjectRef, Signer, User, ISSUER};
use super::kinds::{lookup, Gvk, Kind};
use super::kubelet::{self, Decision};
use super::rbac::{self, Attributes, Rules};
use super::status::ApiError;
use super::store::{Admit, Filter, Store};

fn kind(group: &str, plural: &str) -> &'static Kind {
    lookup(group, "v1", plural).expect("access control's kinds are served")
}

fn all(store: &Store, kind: &'static Kind) -> Vec<Arc<Value>> {
    store.list(kind, &Filter::default()).0
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The user a bearer token authenticates as: the admin token, a service
/// account token whose signature verifies, that has not expired, and whose
/// service account and bound Node still exist with the uids it names
/// (deleting either revokes it, as in Kubernetes), or a kubelet credential
/// whose signature verifies and that has not expired.
pub fn authenticate(
    store: &Store,
    signer: &Signer,
    admin_token: &str,
    bearer: Option<&str>,
) -> Result<User, ApiError> {
    let token = bearer.ok_or_else(ApiError::unauthorized)?;
    // Digests compared, so the time taken reveals nothing of the token.
    let digest = |t: &str| ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
    if digest(token).as_ref() == digest(admin_token).as_ref() {
        return Ok(User::admin());
    }
    let claims = match signer.verify_credential(token, now()) {
        Ok(Credential::ServiceAccount(claims)) => claims,
        // Whether or not its Node exists: a kubelet's client certificate
        // outlives its Node, and lets it register the Node again.
        Ok(Credential::Kubelet(claims)) => return Ok(claims.user()),
        Err(e) => {
            tracing::debug!(error = %e, "a bearer token was refused");
            return Err(ApiError::unauthorized());
        }
    };
    let k = &claims.kubernetes;
    let exists = |kind, ns: &str, r: &ObjectRef| {
        store
            .get(kind, ns, &r.name)
            .is_ok_and(|o| o["metadata"]["uid"] == r.uid.as_str())
    };
    if !exists(kind("", "serviceaccounts"), &k.namespace, &k.serviceaccount)
        || k.node
            .as_ref()
            .is_some_and(|n| !exists(kind("", "nodes"), "", n))
    {
        return Err(ApiError::unauthorized());
    }
    Ok(claims.user())
}

/// The Node authorizer, then RBAC over the stored roles; `system:masters`
/// skips both.
pub fn authorize(store: &Store, user: &User, a: &Attributes) -> Result<(), ApiError> {
    if user.is_master() || kubelet::authorize(user, a) == Decision::Allow {
        return Ok(());
    }
    let (cluster_roles, cluster_role_bindings, roles, role_bindings) = (
        all(store, kind("rbac.authorization.k8s.io", "clusterroles")),
        all(
            store,
            kind("rbac.authorization.k8s.io", "clusterrolebindings"),
        ),
        all(store, kind("rbac.authorization.k8s.io", "roles")),
        all(store, kind("rbac.authorization.k8s.io", "rolebindings")),
    );
    let rules = Rules {
        cluster_roles: &cluster_roles,
        cluster_role_bindings: &cluster_role_bindings,
        roles: &roles,
        role_bindings: &role_bindings,
    };
    if rbac::allowed(user, a, &rules) {
        Ok(())
    } else {
        Err(rbac::forbidden(user, a))
    }
}

/// Admission for one write request: NodeRestriction, then the validating
/// policies and bindings as they were when the request arrived
/// (kube-apiserver judges from its informer cache, also a moment behind).
pub struct Admission<'a> {
    policies: Vec<Arc<Value>>,
    bindings: Vec<Arc<Value>>,
    user: &'a User,
    attributes: Attributes<'a>,
    dry_run: bool,
}

impl<'a> Admission<'a> {
    pub fn new(store: &Store, user: &'a User, attributes: Attributes<'a>, dry_run: bool) -> Self {
        let group = "admissionregistration.k8s.io";
        Self {
            policies: all(store, kind(group, "validatingadmissionpolicies")),
            bindings: all(store, kind(group, "validatingadmissionpolicybindings")),
            user,
            attributes,
            dry_run,
        }
    }
}

impl Admit for Admission<'_> {
    fn admit(
        &self,
        operation: Operation,
        old: Option<&Value>,
        new: Option<&Value>,
    ) -> Result<(), ApiError> {
        let a = &self.attributes;
        // A create names its object in the body.
        let name = match new.and_then(|n| n["metadata"]["name"].as_str()) {
            Some(n) if a.name.is_empty() => n,
            _ => a.name,
        };
        // A built-in plugin: it judges before any policy does.
        kubelet::restrict(self.user, a.kind, name)?;
        admission::validate(
            &self.policies,
            &self.bindings,
            &admission::Request {
                operation,
                kind: a.kind,
                subresource: a.subresource,
                namespace: a.namespace,
                name,
                user: self.user,
                dry_run: self.dry_run,
                old,
                new,
            },
        )
    }
}

/// The body of a token request, in and out (a subresource's, not a kind
/// the lab serves).
pub const TOKEN_REQUEST: Gvk = Gvk {
    group: "authentication.k8s.io",
    version: "v1",
    kind: "TokenRequest",
};

/// TokenRequest (`POST …/serviceaccounts/NAME/token`): a token for the
/// service account, bound to the Node named in `spec.boundObjectRef` (the
/// node claim Weft's admission policy keys on), valid for
/// `spec.expirationSeconds` (default one hour, at least ten minutes).
pub fn token_request(
    store: &Store,
    signer: &Signer,
    namespace: &str,
    name: &str,
    body: &Value,
) -> Result<Value, ApiError> {
    let sa_kind = kind("", "serviceaccounts");
    let sa = store.get(sa_kind, namespace, name)?;
    let spec = &body["spec"];
    let invalid = |field: &str, message: &str| {
        ApiError::invalid(
            sa_kind,
            name,
            vec![super::status::FieldError::invalid(field, message)],
        )
    };
    let expiration = match &spec["expirationSeconds"] {
        Value::Null => 3600,
        v => v.as_u64().filter(|s| *s >= 600).ok_or_else(|| {
            invalid(
                "spec.expirationSeconds",
                "may not specify a duration less than 10 minutes",
            )
        })?,
    };
    let bound = &spec["boundObjectRef"];
    let node = match bound["kind"].as_str() {
        None if bound.is_null() => None,
        Some("Node") => {
            let node_name = bound["name"]
                .as_str()
                .ok_or_else(|| invalid("spec.boundObjectRef.name", "Required value"))?;
            let node = store.get(kind("", "nodes"), "", node_name)?;
            let uid = node["metadata"]["uid"].as_str().unwrap_or_default();
            if bound["uid"].as_str().is_some_and(|want| want != uid) {
                return Err(ApiError::conflict(
                    kind("", "nodes"),
                    node_name,
                    "the UID in the bound object reference does not match",
                ));
            }
            Some(ObjectRef {
                name: node_name.to_string(),
                uid: uid.to_string(),
            })
        }
        _ => {
            return Err(invalid(
                "spec.boundObjectRef.kind",
                "the lab API server binds tokens to Nodes only",
            ))
        }
    };
    let audiences: Vec<String> = match spec["audiences"].as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => vec![ISSUER.into()],
    };
    let now = now();
    let claims = Claims {
        iss: ISSUER.into(),
        sub: super::auth::service_account_user(namespace, name),
        aud: audiences.clone(),
        iat: now,
        nbf: now,
        exp: now + expiration,
        jti: uuid::Uuid::new_v4().to_string(),
        kubernetes: KubernetesClaim {
            namespace: namespace.into(),
            serviceaccount: ObjectRef {
                name: name.into(),
                uid: sa["metadata"]["uid"].as_str().unwrap_or_default().into(),
            },
            node,
        },
    };
    let expires =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(claims.exp));
    let mut response = json!({
        "kind": TOKEN_REQUEST.kind,
        "apiVersion": TOKEN_REQUEST.api_version(),
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": null},
        "spec": spec.clone(),
        "status": {"token": signer.mint(&claims), "expirationTimestamp": expires.to_string()},
    });
    response["spec"]["expirationSeconds"] = json!(expiration);
    response["spec"]["audiences"] = json!(audiences);
    Ok(response)
}
