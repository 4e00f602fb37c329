//! What a node's kubelet (`system:node:<name>` in `system:nodes`) may do,
//! decided as kube-apiserver decides it, in two steps:
//!
//! - the Node authorizer, which comes before RBAC: a kubelet may read every
//!   Node and create, update, patch and delete Node objects and their
//!   status, any of them. What it does not allow goes on to RBAC, which
//!   grants `system:nodes` nothing in the lab (the `system:node` role is not
//!   bound by default since Kubernetes 1.8);
//! - NodeRestriction admission, which keeps each kubelet to its own Node.
//!   It is admission, not authorization, because a create names its object
//!   only in the body; it runs before validating admission policies, as a
//!   built-in plugin does.
//!
//! NodeRestriction leaves a Node's annotations to its kubelet, which is why
//! Weft's own admission policy guards the `weft.dev/` ones.
//!
//! Left out, because the lab's kinds or requests never reach them: the
//! Node authorizer's grants on pods, events, services, secrets, config
//! maps, leases and the like (the lab's kubelet makes no such requests),
//! and NodeRestriction's limits on the labels and taints a kubelet sets on
//! its own Node.

use super::auth::User;
use super::kinds::Kind;
use super::rbac::Attributes;
use super::status::ApiError;

/// The Node authorizer's answer. It never denies: what it does not allow
/// goes on to the next authorizer (RBAC), as in kube-apiserver's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    NoOpinion,
}

fn is_nodes(kind: &Kind) -> bool {
    kind.group.is_empty() && kind.plural == "nodes"
}

/// The Node authorizer's rules for Node objects (`system:node`'s rules):
/// `nodes` get, list, watch, create, update, patch, delete; `nodes/status`
/// update, patch. Any Node: [`restrict`] keeps a kubelet to its own.
pub fn authorize(user: &User, a: &Attributes) -> Decision {
    // Not a kubelet, or one it cannot tell the node of: not its business.
    let Some(node) = user.node_name() else {
        return Decision::NoOpinion;
    };
    if node.is_empty() || !is_nodes(a.kind) {
        return Decision::NoOpinion;
    }
    let verbs: &[&str] = match a.subresource {
        "" => &[
            "get", "list", "watch", "create", "update", "patch", "delete",
        ],
        "status" => &["update", "patch"],
        _ => &[],
    };
    if verbs.contains(&a.verb) {
        Decision::Allow
    } else {
        Decision::NoOpinion
    }
}

/// NodeRestriction for a write (create, update, patch, delete, of the
/// object or its status) of the Node `name` of `kind`: a kubelet writes
/// only the Node of its own name, refused with the plugin's message
/// otherwise. Everyone else, and every other kind, passes.
pub fn restrict(user: &User, kind: &'static Kind, name: &str) -> Result<(), ApiError> {
    let Some(node) = user.node_name() else {
        return Ok(());
    };
    if !is_nodes(kind) {
        return Ok(());
    }
    if node.is_empty() {
        return Err(ApiError::forbidden_on(
            kind,
            name,
            format!("could not determine node from user {:?}", user.name),
        ));
    }
    if name != node {
        return Err(ApiError::forbidden_on(
            kind,
            name,
            format!("node {node:?} is not allowed to modify node {name:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::auth::{KubeletClaims, NODES};
    use crate::apiserver::kinds::lookup;
    use crate::apiserver::rbac::{self, Rules};

    fn kubelet(node: &str) -> User {
        KubeletClaims::for_node(node, 0).user()
    }

    fn at<'a>(verb: &'a str, kind: &'static Kind, sub: &'a str, ns: &'a str) -> Attributes<'a> {
        Attributes {
            verb,
            kind,
            subresource: sub,
            namespace: ns,
            name: "",
        }
    }

    /// Whether the request gets through authorization (Node, then RBAC
    /// with nothing bound, as for `system:nodes` in the lab) and
    /// NodeRestriction, as `access` chains them.
    fn passes(user: &User, a: &Attributes, write: bool) -> Result<(), ApiError> {
        if authorize(user, a) == Decision::NoOpinion && !rbac::allowed(user, a, &Rules::default()) {
            return Err(rbac::forbidden(user, a));
        }
        if write {
            restrict(user, a.kind, a.name)?;
        }
        Ok(())
    }

    #[test]
    fn a_kubelet_reads_every_node_and_writes_only_its_own() {
        let nodes = lookup("", "v1", "nodes").unwrap();
        let cms = lookup("", "v1", "configmaps").unwrap();
        let user = kubelet("node-1");
        let table = [
            // verb, kind, subresource, namespace, name, allowed
            ("get", nodes, "", "", "node-2", true),
            ("list", nodes, "", "", "", true),
            ("watch", nodes, "", "", "", true),
            ("patch", nodes, "", "", "node-1", true),
            ("update", nodes, "", "", "node-1", true),
            ("create", nodes, "", "", "node-1", true),
            ("delete", nodes, "", "", "node-1", true),
            ("patch", nodes, "status", "", "node-1", true),
            ("update", nodes, "status", "", "node-1", true),
            ("patch", nodes, "", "", "node-2", false),
            ("update", nodes, "", "", "node-2", false),
            ("create", nodes, "", "", "node-2", false),
            ("delete", nodes, "", "", "node-2", false),
            ("patch", nodes, "status", "", "node-2", false),
            ("get", nodes, "status", "", "node-1", false),
            ("deletecollection", nodes, "", "", "", false),
            ("create", cms, "", "default", "", false),
            ("get", cms, "", "weft-system", "weft-revoked-keys", false),
            ("list", cms, "", "weft-system", "", false),
        ];
        for (verb, kind, sub, ns, name, want) in table {
            let a = Attributes {
                name,
                ..at(verb, kind, sub, ns)
            };
            let write = !matches!(verb, "get" | "list" | "watch");
            assert_eq!(passes(&user, &a, write).is_ok(), want, "{a:?}");
        }
    }

    #[test]
    fn refusals_read_as_kube_apiservers() {
        let nodes = lookup("", "v1", "nodes").unwrap();
        let cms = lookup("", "v1", "configmaps").unwrap();
        let user = kubelet("node-1");
        let other = Attributes {
            name: "node-2",
            ..at("patch", nodes, "", "")
        };
        let e = passes(&user, &other, true).unwrap_err();
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "nodes \"node-2\" is forbidden: node \"node-1\" is not allowed to modify node \"node-2\""
        );
        let e = passes(&user, &at("create", cms, "", "default"), true).unwrap_err();
        assert_eq!(e.code, 403);
        assert_eq!(
            e.message,
            "configmaps is forbidden: User \"system:node:node-1\" cannot create resource \"configmaps\" in API group \"\" in the namespace \"default\""
        );
    }

    #[test]
    fn only_kubelets_are_judged() {
        let nodes = lookup("", "v1", "nodes").unwrap();
        let patch = Attributes {
            name: "node-2",
            ..at("patch", nodes, "", "")
        };
        // The admin and service accounts: RBAC's business, not this one's.
        assert_eq!(authorize(&User::admin(), &patch), Decision::NoOpinion);
        assert!(restrict(&User::admin(), nodes, "node-2").is_ok());
        // Named like a kubelet, but not in system:nodes: no kubelet.
        let mut impostor = kubelet("node-2");
        impostor.groups.retain(|g| g != NODES);
        assert_eq!(authorize(&impostor, &patch), Decision::NoOpinion);
        assert!(restrict(&impostor, nodes, "node-3").is_ok());
        // A kubelet of no node is let nowhere.
        let nameless = User {
            name: "system:node:".into(),
            ..kubelet("x")
        };
        assert_eq!(authorize(&nameless, &patch), Decision::NoOpinion);
        let e = restrict(&nameless, nodes, "node-2").unwrap_err();
        assert_eq!(
            e.message,
            "nodes \"node-2\" is forbidden: could not determine node from user \"system:node:\""
        );
        // Other kinds pass NodeRestriction untouched (RBAC judged them).
        let cms = lookup("", "v1", "configmaps").unwrap();
        assert!(restrict(&kubelet("node-1"), cms, "x").is_ok());
    }
}
