//! Object metadata validation with the real server's rules, so that a bad
//! name, label or annotation fails here as it would in production (422).

use serde_json::Value;
use weft_meshd::annotations::{dns_label, dns_subdomain};

use super::kinds::Kind;
use super::status::FieldError;

/// The real server's cap on the total size of an object's annotations.
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

/// Checks name, labels and annotations; returns every problem found.
pub fn metadata(kind: &Kind, object: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let meta = &object["metadata"];
    match meta.get("name").and_then(Value::as_str) {
        None | Some("") => errors.push(FieldError::required("metadata.name")),
        Some(name) => {
            let ok = if kind.name_is_label() {
                dns_label(name)
            } else {
                dns_subdomain(name)
            };
            if !ok {
                errors.push(FieldError::invalid(
                    "metadata.name",
                    format!("{name:?}: a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                        if kind.name_is_label() { "label" } else { "subdomain" }),
                ));
            }
        }
    }
    if let Some(labels) = meta.get("labels") {
        string_map(
            labels,
            "metadata.labels",
            &mut errors,
            |field, key, value, errors| {
                qualified_key(field, key, errors);
                if !label_value(value) {
                    errors.push(FieldError::invalid(
                    field,
                    format!("{value:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63 characters)"),
                ));
                }
            },
        );
    }
    if let Some(annotations) = meta.get("annotations") {
        let mut total = 0;
        string_map(
            annotations,
            "metadata.annotations",
            &mut errors,
            |field, key, value, errors| {
                qualified_key(field, key, errors);
                total += key.len() + value.len();
            },
        );
        if total > ANNOTATIONS_MAX_BYTES {
            errors.push(FieldError::too_long(
                "metadata.annotations",
                format!("Too long: may not be more than {ANNOTATIONS_MAX_BYTES} bytes"),
            ));
        }
    }
    errors
}

/// Checks what an update may not change, given the stored object: a
/// ConfigMap with `immutable: true` keeps its data and stays immutable
/// (only its metadata may change, and it may be deleted), as
/// kube-apiserver's `ValidateConfigMapUpdate` has it.
pub fn update(kind: &Kind, old: &Value, new: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let is_configmap = kind.group.is_empty() && kind.kind == "ConfigMap";
    if !is_configmap || old["immutable"] != Value::Bool(true) {
        return errors;
    }
    let forbidden = |field: &str| FieldError {
        field: field.into(),
        reason: "FieldValueForbidden",
        message: "Forbidden: field is immutable when `immutable` is set".into(),
    };
    if new["immutable"] != Value::Bool(true) {
        errors.push(forbidden("immutable"));
    }
    for field in ["data", "binaryData"] {
        if map_or_empty(&old[field]) != map_or_empty(&new[field]) {
            errors.push(forbidden(field));
        }
    }
    errors
}

/// A map field's value, `None` for absent, null or `{}` (the real server
/// stores an empty map as none, so the three are the same data).
fn map_or_empty(value: &Value) -> Option<&Value> {
    match value {
        Value::Null => None,
        Value::Object(map) if map.is_empty() => None,
        other => Some(other),
    }
}

/// Visits a `map[string]string` field, reporting non-object or non-string values.
fn string_map(
    value: &Value,
    field: &str,
    errors: &mut Vec<FieldError>,
    mut each: impl FnMut(&str, &str, &str, &mut Vec<FieldError>),
) {
    match value {
        Value::Null => {}
        Value::Object(map) => {
            for (k, v) in map {
                let path = format!("{field}[{k}]");
                match v.as_str() {
                    Some(s) => each(&path, k, s, errors),
                    None => errors.push(FieldError::invalid(path, "must be a string")),
                }
            }
        }
        _ => errors.push(FieldError::invalid(field, "must be a map of strings")),
    }
}

/// `prefix/name` where prefix is a DNS subdomain and name a label-like token.
fn qualified_key(field: &str, key: &str, errors: &mut Vec<FieldError>) {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(dns_subdomain);
    if !prefix_ok || name.is_empty() || !label_value(name) {
        errors.push(FieldError::invalid(
            field,
            format!("{key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63), with an optional DNS subdomain prefix and '/'"),
        ));
    }
}

fn label_value(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && alnum(s.chars().next())
        && alnum(s.chars().last())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::kinds::{lookup, namespace_kind};
    use serde_json::json;

    fn fields(kind: &Kind, obj: Value) -> Vec<String> {
        metadata(kind, &obj).into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn names() {
        let nodes = lookup("", "v1", "nodes").unwrap();
        assert!(fields(nodes, json!({"metadata": {"name": "node-1.lab"}})).is_empty());
        assert_eq!(
            fields(nodes, json!({"metadata": {"name": "Node_1"}})),
            ["metadata.name"]
        );
        assert_eq!(fields(nodes, json!({"metadata": {}})), ["metadata.name"]);
        assert_eq!(
            fields(namespace_kind(), json!({"metadata": {"name": "a.b"}})),
            ["metadata.name"]
        );
    }

    #[test]
    fn labels_and_annotations() {
        let nodes = lookup("", "v1", "nodes").unwrap();
        let ok = json!({"metadata": {"name": "n", "labels": {"topology.kubernetes.io/zone": "a", "x": ""},
                                      "annotations": {"weft.dev/key": "anything at all / ok"}}});
        assert!(fields(nodes, ok).is_empty());
        let bad = json!({"metadata": {"name": "n", "labels": {"-bad": "v", "good": "no spaces"},
                                       "annotations": {"a": 5}}});
        assert_eq!(
            fields(nodes, bad),
            [
                "metadata.labels[-bad]",
                "metadata.labels[good]",
                "metadata.annotations[a]"
            ]
        );
        let huge = json!({"metadata": {"name": "n", "annotations": {"a": "x".repeat(ANNOTATIONS_MAX_BYTES)}}});
        assert_eq!(fields(nodes, huge), ["metadata.annotations"]);
    }
}
