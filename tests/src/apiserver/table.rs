//! Server-side printing: the `meta.k8s.io/v1` `Table` kubectl asks for with
//! `Accept: application/json;as=Table;…`. Columns are the ones the real
//! server prints for kinds without custom columns: Name and Age.

use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

/// Whether the Accept header asks for a Table.
pub fn wanted(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

/// A Table of `items` at `resource_version`.
pub fn render(items: &[&Value], resource_version: u64, now: SystemTime) -> Value {
    let rows: Vec<Value> = items
        .iter()
        .map(|item| {
            let meta = &item["metadata"];
            let age = meta["creationTimestamp"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .and_then(|t| now.duration_since(t).ok())
                .map(short_age)
                .unwrap_or_else(|| "<unknown>".into());
            json!({
                "cells": [meta["name"], age],
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": meta,
                },
            })
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": [
            {"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0},
            {"name": "Age", "type": "string", "format": "", "description": "CreationTimestamp is a timestamp representing the server time when this object was created.", "priority": 0},
        ],
        "rows": rows,
    })
}

/// kubectl's age format: `45s`, `12m`, `5h`, `3d`.
fn short_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rows_with_age() {
        let now = humantime::parse_rfc3339("2026-01-01T01:00:00Z").unwrap();
        let node = json!({"metadata": {"name": "n1", "creationTimestamp": "2026-01-01T00:00:00Z"}});
        let t = render(&[&node], 7, now);
        assert_eq!(t["rows"][0]["cells"], json!(["n1", "60m"]));
        assert_eq!(t["metadata"]["resourceVersion"], "7");
        assert!(wanted(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wanted("application/json"));
    }
}
