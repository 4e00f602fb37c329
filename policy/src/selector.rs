//! `metav1.LabelSelector` matching: matchLabels and matchExpressions (In,
//! NotIn, Exists, DoesNotExist), all terms ANDed; the empty selector
//! matches everything.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Why a selector cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("matchExpressions {key:?} {operator}: needs values")]
    NeedsValues { key: String, operator: String },
    #[error("matchExpressions {key:?} {operator}: takes no values")]
    TakesNoValues { key: String, operator: String },
    #[error("matchExpressions {key:?}: unknown operator {operator:?}")]
    UnknownOperator { key: String, operator: String },
}

/// Why a selector cannot be used (it then matches nothing: a policy with a
/// broken selector must not open traffic).
pub fn check(selector: &LabelSelector) -> Result<(), SelectorError> {
    for e in selector.match_expressions.iter().flatten() {
        let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
        let (key, operator) = (e.key.clone(), e.operator.clone());
        match e.operator.as_str() {
            "In" | "NotIn" if !has_values => {
                return Err(SelectorError::NeedsValues { key, operator })
            }
            "Exists" | "DoesNotExist" if has_values => {
                return Err(SelectorError::TakesNoValues { key, operator })
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            _ => return Err(SelectorError::UnknownOperator { key, operator }),
        }
    }
    Ok(())
}

/// Whether `labels` satisfy `selector`.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    if check(selector).is_err() {
        return false;
    }
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn operators() {
        let labels = BTreeMap::from([
            ("pod".to_string(), "a".to_string()),
            ("tier".to_string(), "web".to_string()),
        ]);
        let sel = |exprs: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: None,
            match_expressions: Some(exprs),
        };
        assert!(matches(&LabelSelector::default(), &labels));
        assert!(matches(&sel(vec![req("pod", "In", &["a", "b"])]), &labels));
        assert!(!matches(&sel(vec![req("pod", "NotIn", &["a"])]), &labels));
        assert!(matches(
            &sel(vec![req("missing", "NotIn", &["a"])]),
            &labels
        ));
        assert!(matches(&sel(vec![req("tier", "Exists", &[])]), &labels));
        assert!(matches(&sel(vec![req("x", "DoesNotExist", &[])]), &labels));
        assert!(
            !matches(&sel(vec![req("pod", "In", &[])]), &labels),
            "a broken selector matches nothing"
        );
        let ml = LabelSelector {
            match_labels: Some(BTreeMap::from([("pod".into(), "b".into())])),
            match_expressions: None,
        };
        assert!(!matches(&ml, &labels));
    }
}
