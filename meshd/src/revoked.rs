//! The cluster's revoked keys: one ConfigMap that admins write (`meshctl
//! keys revoke`) and every meshd watches; meshd may read it, never write
//! it. A node holding a listed key is out of the mesh before anything else
//! about it is looked at, and stays out whatever it publishes until it
//! rotates to a new key.
//!
//! Data key [`DATA_KEY`], one line per key: `<public key> <node> <time>`
//! (base64, the node it was revoked on, RFC 3339).

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::ConfigMap;
use weft_keys::PublicKey;

use crate::annotations::{parse_time, render_time};

/// `--revoked-keys`' default: NAMESPACE/NAME of the ConfigMap.
pub const DEFAULT_RECORD: &str = concat!(crate::weft_namespace!(), "/weft-revoked-keys");
pub const DATA_KEY: &str = "keys";

/// One revoked key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub key: PublicKey,
    /// The node that held it.
    pub node: String,
    /// When it was revoked (Unix seconds).
    pub at: u64,
}

/// A line of the record that says nothing usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{DATA_KEY} line {line}: {why}")]
pub struct LineError {
    pub line: usize,
    pub why: String,
}

/// The record's lines; a bad line is reported and skipped (the others
/// still count: one typo must not un-revoke every key).
pub fn parse(text: &str) -> (Vec<Revocation>, Vec<LineError>) {
    let mut list = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let error = |why: String| LineError { line: i + 1, why };
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [key, node, at] = fields[..] else {
            errors.push(error("expected <public key> <node> <RFC 3339 time>".into()));
            continue;
        };
        let parsed = key
            .parse::<PublicKey>()
            .map_err(|e| error(format!("public key: {e}")))
            .and_then(|key| {
                let at = parse_time(at).map_err(|e| error(format!("time: {e}")))?;
                Ok(Revocation {
                    key,
                    node: node.to_string(),
                    at,
                })
            });
        match parsed {
            Ok(r) => list.push(r),
            Err(e) => errors.push(e),
        }
    }
    (list, errors)
}

pub fn render(list: &[Revocation]) -> String {
    list.iter()
        .map(|r| format!("{} {} {}\n", r.key, r.node, render_time(r.at)))
        .collect()
}

/// The revoked keys a ConfigMap holds (none if it does not exist).
pub fn of(record: Option<&ConfigMap>) -> (BTreeSet<PublicKey>, Vec<LineError>) {
    let text = record
        .and_then(|cm| cm.data.as_ref())
        .and_then(|d| d.get(DATA_KEY))
        .map_or("", String::as_str);
    let (list, errors) = parse(text);
    (list.into_iter().map(|r| r.key).collect(), errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_keys::PrivateKey;

    #[test]
    fn round_trips_and_skips_only_bad_lines() {
        let list = vec![
            Revocation {
                key: PrivateKey::generate().public_key(),
                node: "node-1".into(),
                at: 1_764_676_800,
            },
            Revocation {
                key: PrivateKey::generate().public_key(),
                node: "node-2".into(),
                at: 1_764_676_801,
            },
        ];
        let text = render(&list);
        assert_eq!(parse(&text), (list.clone(), vec![]));
        let noisy = format!("garbage\n{text}\nAAAA node-3 2026-12-02T12:00:00Z\n");
        let (parsed, errors) = parse(&noisy);
        assert_eq!(parsed, list, "good lines count whatever else is there");
        assert_eq!(errors.len(), 2);
        assert!(
            errors[0].to_string().starts_with("keys line 1:"),
            "{}",
            errors[0]
        );
        assert!(
            errors[1].to_string().contains("public key"),
            "{}",
            errors[1]
        );
    }
}
