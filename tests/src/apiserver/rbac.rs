//! RBAC authorization over the stored (Cluster)Roles and (Cluster)RoleBindings,
//! as kube-apiserver's RBAC authorizer decides it, so the lab proves that
//! deploy/'s roles are both sufficient for meshd and no wider than claimed.
//! `system:masters` (the lab admin) is allowed everything before RBAC.

use serde_json::Value;

use super::auth::{service_account_user, User};
use super::kinds::Kind;
use super::status::ApiError;

/// What a resource request asks to do, in RBAC's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes<'a> {
    pub verb: &'a str,
    pub kind: &'static Kind,
    /// Empty, or `status`, `token`…
    pub subresource: &'a str,
    /// Empty at the cluster scope.
    pub namespace: &'a str,
    /// Empty for collection requests.
    pub name: &'a str,
}

/// Everything RBAC decides from: the four kinds' stored objects.
#[derive(Default)]
pub struct Rules<'a> {
    pub cluster_roles: &'a [std::sync::Arc<Value>],
    pub cluster_role_bindings: &'a [std::sync::Arc<Value>],
    pub roles: &'a [std::sync::Arc<Value>],
    pub role_bindings: &'a [std::sync::Arc<Value>],
}

/// Whether any binding that names `user` grants a role with a rule that
/// covers `a`. RBAC only allows: no rule denies.
pub fn allowed(user: &User, a: &Attributes, rules: &Rules) -> bool {
    if user.is_master() {
        return true;
    }
    let find = |objects: &[std::sync::Arc<Value>], ns: &str, name: &str| {
        objects
            .iter()
            .find(|o| {
                o["metadata"]["name"] == name
                    && o["metadata"]["namespace"].as_str().unwrap_or("") == ns
            })
            .cloned()
    };
    let cluster = rules.cluster_role_bindings.iter().filter_map(|b| {
        (b["roleRef"]["kind"] == "ClusterRole")
            .then(|| find(rules.cluster_roles, "", str_of(&b["roleRef"]["name"])))
            .flatten()
            .map(|role| (b.clone(), role))
    });
    let namespaced = rules
        .role_bindings
        .iter()
        .filter(|b| !a.namespace.is_empty() && b["metadata"]["namespace"] == a.namespace)
        .filter_map(|b| {
            let name = str_of(&b["roleRef"]["name"]);
            match str_of(&b["roleRef"]["kind"]) {
                "Role" => find(rules.roles, a.namespace, name),
                "ClusterRole" => find(rules.cluster_roles, "", name),
                _ => None,
            }
            .map(|role| (b.clone(), role))
        });
    cluster
        .chain(namespaced)
        .filter(|(binding, _)| names(binding, user))
        .any(|(_, role)| {
            role["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| covers(r, a))
        })
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// Whether a binding's subjects include the user (or one of its groups).
fn names(binding: &Value, user: &User) -> bool {
    let binding_ns = str_of(&binding["metadata"]["namespace"]);
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| {
            let name = str_of(&s["name"]);
            match str_of(&s["kind"]) {
                "User" => user.name == name,
                "Group" => user.groups.iter().any(|g| g == name),
                "ServiceAccount" => {
                    // A RoleBinding's subject may leave the namespace out.
                    let ns = s["namespace"].as_str().unwrap_or(binding_ns);
                    user.name == service_account_user(ns, name)
                }
                _ => false,
            }
        })
}

/// Whether one policy rule covers the request.
fn covers(rule: &Value, a: &Attributes) -> bool {
    let list = |field: &str| -> Vec<&str> {
        rule[field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect()
    };
    let any = |items: &[&str], want: &str| items.iter().any(|i| *i == "*" || *i == want);
    let resource = if a.subresource.is_empty() {
        a.kind.plural.to_string()
    } else {
        format!("{}/{}", a.kind.plural, a.subresource)
    };
    let resources = list("resources");
    let resource_ok = resources.iter().any(|r| {
        *r == "*"
            || *r == resource
            || (!a.subresource.is_empty()
                && (*r == format!("*/{}", a.subresource) || *r == format!("{}/*", a.kind.plural)))
    });
    let names = list("resourceNames");
    any(&list("verbs"), a.verb)
        && any(&list("apiGroups"), a.kind.group)
        && resource_ok
        && (names.is_empty() || (!a.name.is_empty() && names.contains(&a.name)))
}

/// kube-apiserver's 403 for a request RBAC does not allow.
pub fn forbidden(user: &User, a: &Attributes) -> ApiError {
    let resource = if a.subresource.is_empty() {
        a.kind.plural.to_string()
    } else {
        format!("{}/{}", a.kind.plural, a.subresource)
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace {:?}", a.namespace)
    };
    ApiError::forbidden_on(
        a.kind,
        a.name,
        format!(
            "User {:?} cannot {} resource {resource:?} in API group {:?} {scope}",
            user.name, a.verb, a.kind.group
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::apiserver::auth::{Claims, KubernetesClaim, ObjectRef, ISSUER};
    use crate::apiserver::kinds::lookup;

    fn meshd() -> User {
        Claims {
            iss: ISSUER.into(),
            sub: String::new(),
            aud: vec![],
            iat: 0,
            nbf: 0,
            exp: 0,
            jti: "j".into(),
            kubernetes: KubernetesClaim {
                namespace: "weft-system".into(),
                serviceaccount: ObjectRef {
                    name: "meshd".into(),
                    uid: "u".into(),
                },
                node: None,
            },
        }
        .user()
    }

    fn arcs(v: Value) -> Vec<Arc<Value>> {
        v.as_array()
            .unwrap()
            .iter()
            .cloned()
            .map(Arc::new)
            .collect()
    }

    #[test]
    fn grants_exactly_what_the_bound_rules_say() {
        let cluster_roles = arcs(json!([
            {"metadata": {"name": "nodes"}, "rules": [
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch", "patch"]},
                {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]}]},
            {"metadata": {"name": "unbound"}, "rules": [
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}
        ]));
        let cluster_role_bindings = arcs(json!([
            {"metadata": {"name": "b"}, "roleRef": {"kind": "ClusterRole", "name": "nodes"},
             "subjects": [{"kind": "ServiceAccount", "name": "meshd", "namespace": "weft-system"}]},
            {"metadata": {"name": "other"}, "roleRef": {"kind": "ClusterRole", "name": "unbound"},
             "subjects": [{"kind": "ServiceAccount", "name": "meshd", "namespace": "default"}]}
        ]));
        let roles = arcs(json!([
            {"metadata": {"name": "blocks", "namespace": "weft-system"}, "rules": [
                {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "update"],
                 "resourceNames": ["weft-node-blocks"]}]}
        ]));
        let role_bindings = arcs(json!([
            {"metadata": {"name": "blocks", "namespace": "weft-system"},
             "roleRef": {"kind": "Role", "name": "blocks"},
             "subjects": [{"kind": "ServiceAccount", "name": "meshd"}]}
        ]));
        let rules = Rules {
            cluster_roles: &cluster_roles,
            cluster_role_bindings: &cluster_role_bindings,
            roles: &roles,
            role_bindings: &role_bindings,
        };
        let nodes = lookup("", "v1", "nodes").unwrap();
        let cms = lookup("", "v1", "configmaps").unwrap();
        let events = lookup("events.k8s.io", "v1", "events").unwrap();
        let at = |verb, kind, sub, ns, name| Attributes {
            verb,
            kind,
            subresource: sub,
            namespace: ns,
            name,
        };
        let user = meshd();
        let table = [
            (at("patch", nodes, "", "", "node-2"), true),
            (at("watch", nodes, "", "", ""), true),
            (at("create", nodes, "", "", ""), false),
            (at("delete", nodes, "", "", "node-1"), false),
            (at("patch", nodes, "status", "", "node-1"), false),
            (at("create", events, "", "default", ""), true),
            (at("get", cms, "", "weft-system", "weft-node-blocks"), true),
            (at("get", cms, "", "weft-system", "kube-root-ca.crt"), false),
            (at("list", cms, "", "weft-system", ""), false),
            (at("get", cms, "", "default", "weft-node-blocks"), false),
        ];
        for (a, want) in table {
            assert_eq!(allowed(&user, &a, &rules), want, "{a:?}");
        }
        assert!(allowed(
            &User::admin(),
            &at("create", nodes, "", "", ""),
            &Rules::default()
        ));
        let e = forbidden(&user, &at("create", nodes, "", "", ""));
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "nodes is forbidden: User \"system:serviceaccount:weft-system:meshd\" cannot create resource \"nodes\" in API group \"\" at the cluster scope"
        );
        let e = forbidden(&user, &at("list", cms, "", "weft-system", ""));
        assert!(
            e.message.ends_with("in the namespace \"weft-system\""),
            "{}",
            e.message
        );
    }
}
