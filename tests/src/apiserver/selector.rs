//! Label selectors (`a=b,c!=d,e in (x,y),f notin (z),g,!h`) and field
//! selectors (`metadata.name=x,spec.nodeName!=y`) as the real server parses them.

use serde_json::Value;

use super::kinds::Kind;
use super::status::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            reqs.push(parse_label_term(term).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unable to parse requirement: invalid label selector term {term:?}"
                ))
            })?);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Splits on commas that are not inside a `( … )` value set.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_label_term(term: &str) -> Option<LabelReq> {
    if let Some(key) = term.strip_prefix('!') {
        return valid_key(key.trim()).map(|k| LabelReq::NotExists(k.to_string()));
    }
    for (op, set_op) in [(" notin ", false), (" in ", true)] {
        if let Some((key, rest)) = term.split_once(op) {
            let values = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
            let values: Vec<String> = values
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            let key = valid_key(key.trim())?.to_string();
            return Some(if set_op {
                LabelReq::In(key, values)
            } else {
                LabelReq::NotIn(key, values)
            });
        }
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Some(LabelReq::NotEq(
            valid_key(key.trim())?.to_string(),
            value.trim().to_string(),
        ));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Some(LabelReq::Eq(
            valid_key(key.trim())?.to_string(),
            value.trim().to_string(),
        ));
    }
    valid_key(term).map(|k| LabelReq::Exists(k.to_string()))
}

fn valid_key(key: &str) -> Option<&str> {
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    ok.then_some(key)
}

/// The name a field selector pins with `metadata.name=NAME`: a list or
/// watch with one is authorized like a get of that object (RBAC
/// `resourceNames` cover it), as kube-apiserver's request info says.
pub fn exact_name(selector: &str) -> Option<&str> {
    selector.split(',').map(str::trim).find_map(|term| {
        let (field, value) = term.split_once("==").or_else(|| term.split_once('='))?;
        (field.trim() == "metadata.name").then(|| value.trim())
    })
}

/// A parsed field selector over the fields a kind supports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str, kind: &Kind) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {term:?}: expected field=value or field!=value"
                )));
            };
            let field = field.trim();
            let supported = field == "metadata.name"
                || (field == "metadata.namespace" && kind.namespaced)
                || kind.field_labels.contains(&field);
            if !supported {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            reqs.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field_value(object, field);
            (actual == *value) == *equal
        })
    }
}

/// A field's value as the server's field label functions render it: strings
/// as is, booleans and numbers as text, absent as the empty string.
fn field_value(object: &Value, field: &str) -> String {
    let mut cur = object;
    for part in field.split('.') {
        match cur.get(part) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::kinds::lookup;
    use serde_json::json;

    fn labels(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn label_operators() {
        let l = labels(json!({"app": "web", "tier": "front", "zone": "a"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(Some(&l));
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier!=back"));
        assert!(m("zone in (a, b),tier notin (back)"));
        assert!(!m("zone in (b,c)"));
        assert!(m("app,!missing"));
        assert!(!m("!app"));
        assert!(m("missing notin (x)"));
        assert!(!m("missing in (x)"));
        assert!(LabelSelector::parse("a in b").is_err());
        assert!(LabelSelector::parse("a b=c").is_err());
    }

    #[test]
    fn an_exact_name_is_found_only_in_an_equality() {
        assert_eq!(exact_name("metadata.name=a"), Some("a"));
        assert_eq!(exact_name("spec.x=1, metadata.name==b"), Some("b"));
        assert_eq!(exact_name("metadata.name!=a"), None);
        assert_eq!(exact_name("metadata.namespace=a"), None);
        assert_eq!(exact_name(""), None);
    }

    #[test]
    fn field_selector_checks_support() {
        let pods = lookup("", "v1", "pods").unwrap();
        let nodes = lookup("", "v1", "nodes").unwrap();
        let pod = json!({"metadata": {"name": "p", "namespace": "x"}, "spec": {"nodeName": "n1", "hostNetwork": false}});
        let f = FieldSelector::parse("spec.nodeName=n1,metadata.namespace!=y", pods).unwrap();
        assert!(f.matches(&pod));
        assert!(FieldSelector::parse("spec.hostNetwork=false", pods)
            .unwrap()
            .matches(&pod));
        assert!(!FieldSelector::parse("metadata.name=q", pods)
            .unwrap()
            .matches(&pod));
        let err = FieldSelector::parse("spec.nodeName=n1", nodes).unwrap_err();
        assert_eq!(err.message, "field label not supported: spec.nodeName");
        assert!(FieldSelector::parse("metadata.namespace=x", nodes).is_err());
    }
}
