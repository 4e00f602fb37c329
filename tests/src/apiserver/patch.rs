//! The three patch types kubectl, kube-rs and client-go send.
//!
//! JSON merge (RFC 7386) and JSON patch (RFC 6902) come from the `json-patch`
//! crate. Strategic merge is Kubernetes' own: maps merge like a merge patch,
//! but lists that the API marks `patchStrategy: merge` merge element-wise by a
//! key instead of being replaced. The real server reads those keys from Go
//! struct tags; here they are the table [`MERGE_KEYS`] for the fields of the
//! kinds we serve.

use serde_json::{Map, Value};

use super::status::ApiError;

/// A patch body and how to apply it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    Strategic,
}

impl PatchType {
    /// The patch type named by a request's `Content-Type`.
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        match content_type.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Ok(Self::Json),
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            other => Err(ApiError::unsupported_media_type(other)),
        }
    }
}

/// Applies `patch` to `target`, returning the patched document.
pub fn apply(target: &Value, patch: &Value, kind: PatchType) -> Result<Value, ApiError> {
    let mut doc = target.clone();
    match kind {
        PatchType::Merge => json_patch::merge(&mut doc, patch),
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut doc, &ops)
                .map_err(|e| ApiError::unprocessable(format!("the JSON patch failed: {e}")))?;
        }
        PatchType::Strategic => {
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "a strategic merge patch must be a JSON object",
                ));
            }
            strategic(&mut doc, patch, "")?;
        }
    }
    Ok(doc)
}

/// How a list field merges under a strategic merge patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListMerge {
    /// Elements are objects matched by this key.
    ByKey(&'static str),
    /// Elements are scalars; the patch adds missing ones.
    Primitive,
}

/// `patchStrategy: merge` lists of the kinds served, by dotted path.
const MERGE_KEYS: &[(&str, ListMerge)] = &[
    ("metadata.finalizers", ListMerge::Primitive),
    ("metadata.ownerReferences", ListMerge::ByKey("uid")),
    ("spec.podCIDRs", ListMerge::Primitive),
    ("spec.taints", ListMerge::ByKey("key")),
    ("status.addresses", ListMerge::ByKey("type")),
    ("status.conditions", ListMerge::ByKey("type")),
    ("status.podIPs", ListMerge::ByKey("ip")),
    ("status.hostIPs", ListMerge::ByKey("ip")),
    ("spec.containers", ListMerge::ByKey("name")),
    ("spec.initContainers", ListMerge::ByKey("name")),
    ("spec.volumes", ListMerge::ByKey("name")),
    ("spec.containers.ports", ListMerge::ByKey("containerPort")),
    ("spec.containers.env", ListMerge::ByKey("name")),
    (
        "spec.containers.volumeMounts",
        ListMerge::ByKey("mountPath"),
    ),
];

fn list_merge(path: &str) -> Option<ListMerge> {
    MERGE_KEYS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, strategy)| *strategy)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn strategic(target: &mut Value, patch: &Value, path: &str) -> Result<(), ApiError> {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return Ok(());
    };
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replacement = patch.clone();
            replacement.remove("$patch");
            *target = Value::Object(replacement);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown patch directive $patch: {other:?} at {path:?}"
            )))
        }
        None => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let map = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(remove)) = (map.get_mut(field), value.as_array())
            {
                list.retain(|v| !remove.contains(v));
            }
            continue;
        }
        if key.starts_with("$setElementOrder/") || key == "$retainKeys" {
            continue;
        }
        let child = join(path, key);
        match value {
            Value::Null => {
                map.remove(key);
            }
            Value::Array(items) => match (list_merge(&child), map.get_mut(key)) {
                (Some(strategy), Some(Value::Array(existing))) => {
                    merge_list(existing, items, strategy, &child)?
                }
                _ => {
                    let cleaned = items.iter().filter(|i| !is_directive(i)).cloned().collect();
                    map.insert(key.clone(), Value::Array(cleaned));
                }
            },
            Value::Object(_) => {
                let slot = map.entry(key.clone()).or_insert(Value::Null);
                strategic(slot, value, &child)?;
            }
            scalar => {
                map.insert(key.clone(), scalar.clone());
            }
        }
    }
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        map.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k.as_str())));
    }
    Ok(())
}

fn is_directive(item: &Value) -> bool {
    item.get("$patch").is_some()
}

fn merge_list(
    existing: &mut Vec<Value>,
    items: &[Value],
    strategy: ListMerge,
    path: &str,
) -> Result<(), ApiError> {
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *existing = items.iter().filter(|i| !is_directive(i)).cloned().collect();
        return Ok(());
    }
    match strategy {
        ListMerge::Primitive => {
            for item in items {
                if !existing.contains(item) {
                    existing.push(item.clone());
                }
            }
        }
        ListMerge::ByKey(key) => {
            for item in items {
                let id = item.get(key).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "map: {item} does not contain declared merge key: {key} (at {path})"
                    ))
                })?;
                let pos = existing.iter().position(|e| e.get(key) == Some(id));
                let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(p), true) => {
                        existing.remove(p);
                    }
                    (None, true) => {}
                    (Some(p), false) => strategic(&mut existing[p], item, path)?,
                    (None, false) => existing.push(item.clone()),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_and_strategic_agree_on_maps() {
        let node = json!({"metadata": {"annotations": {"a": "1", "b": "2"}, "labels": {"x": "y"}}});
        let patch = json!({"metadata": {"annotations": {"a": null, "c": "3"}}});
        let want = json!({"metadata": {"annotations": {"b": "2", "c": "3"}, "labels": {"x": "y"}}});
        assert_eq!(apply(&node, &patch, PatchType::Merge).unwrap(), want);
        assert_eq!(apply(&node, &patch, PatchType::Strategic).unwrap(), want);
    }

    #[test]
    fn strategic_merges_conditions_by_type() {
        let node = json!({"status": {"conditions": [
            {"type": "Ready", "status": "False"},
            {"type": "MemoryPressure", "status": "False"}]}});
        let patch = json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "NetworkUnavailable", "status": "False"}]}});
        let out = apply(&node, &patch, PatchType::Strategic).unwrap();
        assert_eq!(
            out["status"]["conditions"],
            json!([
                {"type": "Ready", "status": "True"},
                {"type": "MemoryPressure", "status": "False"},
                {"type": "NetworkUnavailable", "status": "False"}])
        );
        let merge = apply(&node, &patch, PatchType::Merge).unwrap();
        assert_eq!(merge["status"]["conditions"], patch["status"]["conditions"]);
    }

    #[test]
    fn strategic_directives() {
        let doc = json!({"metadata": {"finalizers": ["a", "b"], "labels": {"k": "v", "l": "w"}},
                         "spec": {"taints": [{"key": "t1", "effect": "NoSchedule"}, {"key": "t2"}]}});
        let patch = json!({
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "labels": {"$patch": "replace", "n": "m"}},
            "spec": {"taints": [{"key": "t1", "$patch": "delete"}]}});
        let out = apply(&doc, &patch, PatchType::Strategic).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        assert_eq!(out["metadata"]["labels"], json!({"n": "m"}));
        assert_eq!(out["spec"]["taints"], json!([{"key": "t2"}]));
        let missing_key = json!({"spec": {"taints": [{"effect": "NoExecute"}]}});
        assert_eq!(
            apply(&doc, &missing_key, PatchType::Strategic)
                .unwrap_err()
                .code,
            400
        );
    }

    #[test]
    fn json_patch_ops_and_failures() {
        let doc = json!({"metadata": {"labels": {"a": "b"}}});
        let ok = json!([{"op": "add", "path": "/metadata/labels/c", "value": "d"},
                        {"op": "test", "path": "/metadata/labels/a", "value": "b"}]);
        assert_eq!(
            apply(&doc, &ok, PatchType::Json).unwrap()["metadata"]["labels"]["c"],
            "d"
        );
        let failing = json!([{"op": "test", "path": "/metadata/labels/a", "value": "x"}]);
        assert_eq!(
            apply(&doc, &failing, PatchType::Json).unwrap_err().code,
            422
        );
        let garbage = json!({"op": "add"});
        assert_eq!(
            apply(&doc, &garbage, PatchType::Json).unwrap_err().code,
            400
        );
    }

    #[test]
    fn content_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchType::Merge
        );
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml")
                .unwrap_err()
                .code,
            415
        );
    }
}
