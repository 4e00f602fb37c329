//! Errors as the real API server reports them: a `meta.k8s.io/v1` `Status`
//! with the HTTP code, a machine-readable reason and a message.

use serde_json::{json, Value};

use super::kinds::Kind;

/// A failed request, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn not_found(kind: &Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", resource(kind)),
        )
        .with_details(details(kind, name))
    }

    pub fn no_route(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
    }

    pub fn already_exists(kind: &Kind, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", resource(kind)),
        )
        .with_details(details(kind, name))
    }

    pub fn conflict(kind: &Kind, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                resource(kind)
            ),
        )
        .with_details(details(kind, name))
    }

    /// The real server's wording for a stale `resourceVersion`.
    pub fn stale(kind: &Kind, name: &str) -> Self {
        Self::conflict(
            kind,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    /// kube-apiserver's `NewForbidden`: `nodes "n" is forbidden: why`.
    pub fn forbidden_on(kind: &Kind, name: &str, why: impl std::fmt::Display) -> Self {
        let message = if name.is_empty() {
            format!("{} is forbidden: {why}", resource(kind))
        } else {
            format!("{} \"{name}\" is forbidden: {why}", resource(kind))
        };
        Self::new(403, "Forbidden", message).with_details(details(kind, name))
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(413, "RequestEntityTooLarge", message)
    }

    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::unsupported_media_type_because(format!("the body of the request was in an unknown format - accepted media types include: application/json, application/vnd.kubernetes.protobuf, application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"))
    }

    pub fn unsupported_media_type_because(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    /// 422 with one cause per invalid field.
    pub fn invalid(kind: &Kind, name: &str, causes: Vec<FieldError>) -> Self {
        let summary: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let mut d = details(kind, name);
        d["causes"] = causes
            .iter()
            .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
            .collect();
        Self::new(
            422,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: {}",
                kind_title(kind),
                summary.join(", ")
            ),
        )
        .with_details(d)
    }

    /// 422 without field causes: a well-formed request that cannot apply
    /// (a JSON patch whose `test` fails or whose path is missing).
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    /// The `Status` object sent as the response body or in a watch `ERROR`.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// One invalid field of a 422 response.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

impl FieldError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: message.into(),
        }
    }

    pub fn required(field: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueRequired",
            message: "Required value".into(),
        }
    }

    pub fn too_long(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueTooLong",
            message: message.into(),
        }
    }
}

/// `nodes`, `networkpolicies.networking.k8s.io`: how the real server names a
/// resource in messages.
fn resource(kind: &Kind) -> String {
    if kind.group.is_empty() {
        kind.plural.to_string()
    } else {
        format!("{}.{}", kind.plural, kind.group)
    }
}

fn kind_title(kind: &Kind) -> String {
    if kind.group.is_empty() {
        kind.kind.to_string()
    } else {
        format!("{}.{}", kind.kind, kind.group)
    }
}

fn details(kind: &Kind, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": kind.plural});
    if !kind.group.is_empty() {
        d["group"] = json!(kind.group);
    }
    d
}

/// `Status` for a successful delete (some clients ask for it instead of the object).
pub fn success(kind: &Kind, name: &str, uid: &str) -> Value {
    let mut d = details(kind, name);
    d["uid"] = json!(uid);
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": d})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::kinds::lookup;

    #[test]
    fn conflict_reads_like_the_real_server() {
        let nodes = lookup("", "v1", "nodes").unwrap();
        let s = ApiError::stale(nodes, "a").to_status();
        assert_eq!(s["code"], 409);
        assert_eq!(s["reason"], "Conflict");
        assert_eq!(
            s["message"],
            "Operation cannot be fulfilled on nodes \"a\": the object has been modified; please apply your changes to the latest version and try again"
        );
    }

    #[test]
    fn invalid_lists_causes() {
        let np = lookup("networking.k8s.io", "v1", "networkpolicies").unwrap();
        let s = ApiError::invalid(np, "p", vec![FieldError::required("metadata.name")]).to_status();
        assert_eq!(s["code"], 422);
        assert_eq!(s["details"]["group"], "networking.k8s.io");
        assert_eq!(s["details"]["causes"][0]["field"], "metadata.name");
    }
}
