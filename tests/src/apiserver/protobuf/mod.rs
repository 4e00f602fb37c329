//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`), as Go
//! clients send them, decoded into the JSON object model the store keeps.
//!
//! The wire format is kube-apiserver's: the magic `k8s\0`, then a
//! `runtime.Unknown` {typeMeta = 1, raw = 2, contentEncoding = 3,
//! contentType = 4} whose `raw` is the kind's message from k8s.io/api.
//! The lab decodes only the messages in [`schema`] (what kubectl sends in
//! protobuf); any other type is refused with 415 as kube-apiserver refuses
//! protobuf for a custom resource, which every client answers by sending
//! JSON. Maintained Rust crates give no usable decoder: `k8s-pb` has
//! prost structs without reflection, `k8s-rs-pb`'s descriptors deadlock.
//!
//! The walker is generic over the tables; how Kubernetes' Go types print
//! as JSON lives in [`schema::Form`] and here:
//! - Presence: Go clients encode every non-pointer field, set or not, and
//!   pointer fields only when set. An empty string is dropped (it is
//!   "unset" for every string field these messages have), booleans and
//!   numbers are kept as sent (a pointer's explicit `false` means
//!   something, a non-pointer's zero means what its absence means) but in
//!   `ObjectMeta` ([`Form::Meta`]). Inside maps and lists nothing is
//!   dropped (`data: {empty: ""}`).
//! - A singular field sent twice keeps its last value (protobuf would
//!   merge messages; Go clients never send one twice).
//! - Unknown field numbers are skipped, as protobuf readers do: a newer
//!   client's fields are not an error.

pub mod schema;

use base64::Engine;
use serde_json::{Map, Value};

use super::kinds::Gvk;
use schema::{Field, Form, Label, Message, Type};

/// The media type, as in `Content-Type`.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// Every protobuf body starts with it (kube-apiserver's `protobuf.Serializer`).
const MAGIC: &[u8; 4] = b"k8s\0";

/// Kubernetes' last representable second (9999-12-31T23:59:59Z).
const LAST_SECOND: i64 = 253_402_300_799;
/// `Time.Unix()` of Go's zero time, which some encoders send for it.
const GO_ZERO_TIME: i64 = -62_135_596_800;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtobufError {
    #[error("the protobuf body does not start with the magic number k8s\\0")]
    NoMagic,
    #[error("the protobuf envelope (runtime.Unknown) is malformed: {0}")]
    Envelope(Malformed),
    #[error("the protobuf envelope's contentEncoding {0:?} is not supported (only none)")]
    ContentEncoding(String),
    #[error("the protobuf envelope's contentType {0:?} is not supported (only {MEDIA_TYPE})")]
    ContentType(String),
    /// Not a type the lab decodes: 415, as kube-apiserver answers for a
    /// custom resource, and the client sends JSON instead.
    #[error("{MEDIA_TYPE} is not supported for {kind} ({api_version}) by the lab API server: send application/json")]
    NotDecoded { kind: String, api_version: String },
    #[error("the body is a {got_kind} ({got_api_version}), but the URL addresses {kind} ({api_version})")]
    WrongKind {
        got_kind: String,
        got_api_version: String,
        kind: String,
        api_version: String,
    },
    #[error("the protobuf {kind} is malformed: {malformed}")]
    Body { kind: String, malformed: Malformed },
}

impl ProtobufError {
    /// Whether kube-apiserver answers 415 (else 400).
    pub fn unsupported_media_type(&self) -> bool {
        matches!(self, Self::NotDecoded { .. })
    }
}

/// What is wrong where (a JSON path; empty for the message itself).
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{}{why}", if at.is_empty() { String::new() } else { format!("at {at}: ") })]
pub struct Malformed {
    pub at: String,
    pub why: Why,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Why {
    #[error("the message ends inside a field")]
    Truncated,
    #[error("a varint is longer than 10 bytes")]
    LongVarint,
    #[error("field number 0 is not valid")]
    FieldZero,
    #[error("wire type {0} is not valid (groups, 3 and 4, are not used by Kubernetes)")]
    WireType(u8),
    #[error("wire type {got} where {expected} was expected")]
    UnexpectedWireType { got: u8, expected: u8 },
    #[error("the string is not UTF-8")]
    NotUtf8,
    #[error("the embedded JSON is not valid: {0}")]
    NotJson(String),
    #[error("{seconds}s {nanos}ns is not a time the lab keeps (1970 to 9999)")]
    Time { seconds: i64, nanos: i64 },
}

fn malformed(at: &str, why: Why) -> Malformed {
    Malformed {
        at: at.to_string(),
        why,
    }
}

/// Decodes a protobuf request body for `addressed` (the type the URL
/// takes) into the object's JSON, `kind` and `apiVersion` included.
pub fn decode(body: &[u8], addressed: Gvk) -> Result<Value, ProtobufError> {
    let api_version = addressed.api_version();
    let message = schema::message(addressed).ok_or_else(|| ProtobufError::NotDecoded {
        kind: addressed.kind.to_string(),
        api_version: api_version.clone(),
    })?;
    let rest = body.strip_prefix(MAGIC).ok_or(ProtobufError::NoMagic)?;
    let envelope = Envelope::parse(rest).map_err(ProtobufError::Envelope)?;
    if !envelope.content_encoding.is_empty() {
        return Err(ProtobufError::ContentEncoding(envelope.content_encoding));
    }
    if !matches!(envelope.content_type.as_str(), "" | MEDIA_TYPE) {
        return Err(ProtobufError::ContentType(envelope.content_type));
    }
    // An empty type is the URL's, as kube-apiserver defaults it.
    let matches = |got: &str, want: &str| got.is_empty() || got == want;
    if !matches(&envelope.kind, addressed.kind) || !matches(&envelope.api_version, &api_version) {
        return Err(ProtobufError::WrongKind {
            got_kind: envelope.kind,
            got_api_version: envelope.api_version,
            kind: addressed.kind.to_string(),
            api_version,
        });
    }
    let mut object = match decode_message(message, envelope.raw, "") {
        Ok(Value::Object(map)) => map,
        // Every message in TYPES prints as an object.
        Ok(_) => Map::new(),
        Err(malformed) => {
            return Err(ProtobufError::Body {
                kind: addressed.kind.to_string(),
                malformed,
            })
        }
    };
    object.insert("kind".into(), addressed.kind.into());
    object.insert("apiVersion".into(), api_version.into());
    Ok(Value::Object(object))
}

/// `runtime.Unknown`, with `raw` undecoded.
struct Envelope<'a> {
    api_version: String,
    kind: String,
    raw: &'a [u8],
    content_encoding: String,
    content_type: String,
}

impl<'a> Envelope<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, Malformed> {
        let mut envelope = Envelope {
            api_version: String::new(),
            kind: String::new(),
            raw: &[],
            content_encoding: String::new(),
            content_type: String::new(),
        };
        let mut reader = Reader(bytes);
        while let Some((number, wire)) = reader.field().map_err(|why| malformed("", why))? {
            match number {
                1 => {
                    let type_meta =
                        decode_message(&schema::TYPE_META, wire.bytes("typeMeta")?, "typeMeta")?;
                    let text =
                        |name: &str| type_meta[name].as_str().unwrap_or_default().to_string();
                    envelope.api_version = text("apiVersion");
                    envelope.kind = text("kind");
                }
                2 => envelope.raw = wire.bytes("raw")?,
                3 => envelope.content_encoding = wire.string("contentEncoding")?,
                4 => envelope.content_type = wire.string("contentType")?,
                _ => {}
            }
        }
        Ok(envelope)
    }
}

/// One field's value on the wire.
#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Len(&'a [u8]),
    Fixed32,
}

const VARINT: u8 = 0;
const LEN: u8 = 2;

impl<'a> Wire<'a> {
    fn wire_type(self) -> u8 {
        match self {
            Wire::Varint(_) => VARINT,
            Wire::Fixed64 => 1,
            Wire::Len(_) => LEN,
            Wire::Fixed32 => 5,
        }
    }

    fn unexpected(self, expected: u8, at: &str) -> Malformed {
        malformed(
            at,
            Why::UnexpectedWireType {
                got: self.wire_type(),
                expected,
            },
        )
    }

    fn bytes(self, at: &str) -> Result<&'a [u8], Malformed> {
        match self {
            Wire::Len(b) => Ok(b),
            _ => Err(self.unexpected(LEN, at)),
        }
    }

    fn string(self, at: &str) -> Result<String, Malformed> {
        let bytes = self.bytes(at)?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|_| malformed(at, Why::NotUtf8))
    }

    fn varint(self, at: &str) -> Result<u64, Malformed> {
        match self {
            Wire::Varint(n) => Ok(n),
            _ => Err(self.unexpected(VARINT, at)),
        }
    }
}

/// The fields of one message, in wire order.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Why> {
        if n > self.0.len() {
            return Err(Why::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64, Why> {
        let mut value = 0u64;
        for i in 0..10 {
            let [byte] = self.take(1)? else {
                return Err(Why::Truncated);
            };
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Why::LongVarint)
    }

    /// The next field's number and value; `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, Wire<'a>)>, Why> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 {
            return Err(Why::FieldZero);
        }
        let wire = match (key & 7) as u8 {
            VARINT => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            LEN => {
                let len = usize::try_from(self.varint()?).map_err(|_| Why::Truncated)?;
                Wire::Len(self.take(len)?)
            }
            5 => {
                self.take(4)?;
                Wire::Fixed32
            }
            other => return Err(Why::WireType(other)),
        };
        Ok(Some((number, wire)))
    }
}

fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// A message as JSON, by its table.
fn decode_message(message: &Message, bytes: &[u8], path: &str) -> Result<Value, Malformed> {
    let mut out = Map::new();
    let mut reader = Reader(bytes);
    while let Some((number, wire)) = reader.field().map_err(|why| malformed(path, why))? {
        let Some(field) = message
            .fields
            .iter()
            .find(|f| u64::from(f.number) == number)
        else {
            continue;
        };
        // A wrapper's one field is no JSON field of its own.
        let here = match message.form {
            Form::Unwrap(_) => path.to_string(),
            _ => child(path, field.json),
        };
        match field.label {
            Label::Singular => {
                out.insert(field.json.into(), decode_value(&field.ty, wire, &here)?);
            }
            Label::Repeated => {
                let items = out
                    .entry(field.json)
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(items) = items {
                    let here = format!("{here}[{}]", items.len());
                    items.push(decode_value(&field.ty, wire, &here)?);
                }
            }
            Label::Map => {
                let (key, value) = decode_entry(field, wire, &here)?;
                let entries = out
                    .entry(field.json)
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(entries) = entries {
                    entries.insert(key, value);
                }
            }
        }
    }
    out.retain(|_, v| !unset(message.form, v));
    Ok(match message.form {
        Form::Object | Form::Meta => Value::Object(out),
        Form::Time => {
            let int = |name: &str| out.get(name).and_then(Value::as_i64).unwrap_or(0);
            time_json(int("seconds"), int("nanos"), path)?
        }
        Form::Unwrap(name) => out.remove(name).unwrap_or(Value::Null),
    })
}

/// Whether a singular field's value is what Go sends for "unset".
fn unset(form: Form, value: &Value) -> bool {
    match value {
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => form == Form::Meta && !b,
        Value::Number(n) => form == Form::Meta && n.as_i64() == Some(0),
        _ => false,
    }
}

fn decode_value(ty: &Type, wire: Wire, at: &str) -> Result<Value, Malformed> {
    Ok(match ty {
        Type::String => Value::String(wire.string(at)?),
        // Go's encoding/json writes []byte as standard base64.
        Type::Bytes => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(wire.bytes(at)?))
        }
        Type::Json => {
            let bytes = wire.bytes(at)?;
            if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(bytes)
                    .map_err(|e| malformed(at, Why::NotJson(e.to_string())))?
            }
        }
        Type::Bool => Value::Bool(wire.varint(at)? != 0),
        // int32 is sign-extended to 64 bits on the wire: its low half is it.
        Type::Int32 => (wire.varint(at)? as i32).into(),
        Type::Int64 => (wire.varint(at)? as i64).into(),
        Type::Message(m) => decode_message(m, wire.bytes(at)?, at)?,
    })
}

/// A map entry {key = 1, value = 2}; a missing part is its type's empty
/// value, as in protobuf.
fn decode_entry(field: &Field, wire: Wire, at: &str) -> Result<(String, Value), Malformed> {
    let mut reader = Reader(wire.bytes(at)?);
    let (mut key, mut value) = (String::new(), None);
    while let Some((number, wire)) = reader.field().map_err(|why| malformed(at, why))? {
        match number {
            1 => key = wire.string(at)?,
            2 => value = Some(wire),
            _ => {}
        }
    }
    let here = format!("{at}[{key}]");
    let value = match value {
        Some(wire) => decode_value(&field.ty, wire, &here)?,
        None => decode_value(&field.ty, empty(&field.ty), &here)?,
    };
    Ok((key, value))
}

/// The wire value protobuf reads for an absent field of type `ty`.
fn empty(ty: &Type) -> Wire<'static> {
    match ty {
        Type::Bool | Type::Int32 | Type::Int64 => Wire::Varint(0),
        Type::String | Type::Bytes | Type::Json | Type::Message(_) => Wire::Len(&[]),
    }
}

/// `metav1.Time` as Go prints it: RFC 3339 in seconds, the zero time `null`.
fn time_json(seconds: i64, nanos: i64, at: &str) -> Result<Value, Malformed> {
    if (seconds == 0 || seconds == GO_ZERO_TIME) && nanos == 0 {
        return Ok(Value::Null);
    }
    let out_of_range = || malformed(at, Why::Time { seconds, nanos });
    let (Ok(secs), Ok(nanos)) = (u64::try_from(seconds), u32::try_from(nanos)) else {
        return Err(out_of_range());
    };
    if seconds > LAST_SECOND || nanos >= 1_000_000_000 {
        return Err(out_of_range());
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
    Ok(Value::String(
        humantime::format_rfc3339_seconds(t).to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::access::TOKEN_REQUEST;
    use crate::apiserver::kinds::{lookup, KINDS};
    use k8s_pb::api::authentication::v1 as authn;
    use k8s_pb::api::core::v1 as core;
    use k8s_pb::api::rbac::v1 as rbac;
    use k8s_pb::apimachinery::pkg::api::resource::Quantity;
    use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
    use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
    use prost::Message as _;
    use serde_json::json;

    /// `raw` in kube-apiserver's envelope, as a Go client sends it.
    fn envelope(gvk: Gvk, raw: Vec<u8>) -> Vec<u8> {
        let unknown = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(gvk.api_version()),
                kind: Some(gvk.kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        [&MAGIC[..], &unknown.encode_to_vec()].concat()
    }

    fn gvk_of(plural: &str) -> Gvk {
        KINDS
            .iter()
            .find(|k| k.plural == plural)
            .map(|k| k.gvk())
            .unwrap_or_else(|| panic!("{plural}"))
    }

    fn time(seconds: i64, nanos: i32) -> Option<meta::Time> {
        Some(meta::Time {
            seconds: Some(seconds),
            nanos: Some(nanos),
        })
    }

    fn string(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// ObjectMeta as Go encodes it for a new object: every value field,
    /// set or not.
    fn new_meta(name: &str, namespace: &str) -> Option<meta::ObjectMeta> {
        Some(meta::ObjectMeta {
            name: string(name),
            generate_name: string(""),
            namespace: string(namespace),
            self_link: string(""),
            uid: string(""),
            resource_version: string(""),
            generation: Some(0),
            creation_timestamp: Some(meta::Time::default()),
            ..Default::default()
        })
    }

    /// What `new_meta` prints as.
    fn new_meta_json(name: &str, namespace: &str) -> Value {
        let mut m = json!({"name": name, "creationTimestamp": null});
        if !namespace.is_empty() {
            m["namespace"] = json!(namespace);
        }
        m
    }

    fn quantities(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, Quantity> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Quantity { string: string(v) }))
            .collect()
    }

    fn decoded(gvk: Gvk, raw: Vec<u8>) -> Value {
        decode(&envelope(gvk, raw), gvk).unwrap_or_else(|e| panic!("{}: {e}", gvk.kind))
    }

    /// Every field of ObjectMeta and what it nests, with distinct values:
    /// a wrong number or type in the table loses or breaks one.
    #[test]
    fn a_configmap_with_every_metadata_field() {
        let cm = core::ConfigMap {
            metadata: Some(meta::ObjectMeta {
                name: string("c1"),
                generate_name: string("c-"),
                namespace: string("default"),
                self_link: string("/api/v1/namespaces/default/configmaps/c1"),
                uid: string("u-1"),
                resource_version: string("7"),
                generation: Some(3),
                creation_timestamp: time(1_700_000_000, 0),
                deletion_timestamp: time(1_700_000_060, 5),
                deletion_grace_period_seconds: Some(30),
                labels: [("app".to_string(), "web".to_string())].into(),
                annotations: [("note".to_string(), String::new())].into(),
                owner_references: vec![meta::OwnerReference {
                    api_version: string("apps/v1"),
                    kind: string("DaemonSet"),
                    name: string("weft"),
                    uid: string("u-2"),
                    controller: Some(true),
                    block_owner_deletion: Some(false),
                }],
                finalizers: strings(&["weft.dev/cleanup"]),
                managed_fields: vec![meta::ManagedFieldsEntry {
                    manager: string("kubectl"),
                    operation: string("Update"),
                    api_version: string("v1"),
                    time: time(1_700_000_000, 0),
                    fields_type: string("FieldsV1"),
                    fields_v1: Some(meta::FieldsV1 {
                        raw: Some(br#"{"f:data":{"f:a":{}}}"#.to_vec()),
                    }),
                    subresource: string("status"),
                }],
            }),
            immutable: Some(false),
            data: [
                ("a".to_string(), "b".to_string()),
                ("empty".to_string(), String::new()),
            ]
            .into(),
            binary_data: [("bin".to_string(), vec![0, 1, 255])].into(),
        };
        assert_eq!(
            decoded(gvk_of("configmaps"), cm.encode_to_vec()),
            json!({
                "kind": "ConfigMap", "apiVersion": "v1",
                "metadata": {
                    "name": "c1", "generateName": "c-", "namespace": "default",
                    "selfLink": "/api/v1/namespaces/default/configmaps/c1",
                    "uid": "u-1", "resourceVersion": "7", "generation": 3,
                    "creationTimestamp": "2023-11-14T22:13:20Z",
                    "deletionTimestamp": "2023-11-14T22:14:20Z",
                    "deletionGracePeriodSeconds": 30,
                    "labels": {"app": "web"}, "annotations": {"note": ""},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                        "name": "weft", "uid": "u-2", "controller": true,
                        "blockOwnerDeletion": false}],
                    "finalizers": ["weft.dev/cleanup"],
                    "managedFields": [{"manager": "kubectl", "operation": "Update",
                        "apiVersion": "v1", "time": "2023-11-14T22:13:20Z",
                        "fieldsType": "FieldsV1", "fieldsV1": {"f:data": {"f:a": {}}},
                        "subresource": "status"}],
                },
                "immutable": false,
                "data": {"a": "b", "empty": ""},
                "binaryData": {"bin": "AAH/"},
            })
        );
    }

    /// Presence as Go clients send it: ObjectMeta's zero value fields are
    /// dropped, a pointer's explicit false is kept, an empty string is
    /// unset, a non-pointer struct prints as `{}`.
    #[test]
    fn a_namespace_and_a_service_account_as_kubectl_sends_them() {
        let ns = core::Namespace {
            metadata: new_meta("team", ""),
            spec: Some(core::NamespaceSpec {
                finalizers: strings(&["kubernetes"]),
            }),
            status: Some(core::NamespaceStatus {
                phase: string("Active"),
                conditions: vec![core::NamespaceCondition {
                    r#type: string("NamespaceDeletionDiscoveryFailure"),
                    status: string("False"),
                    last_transition_time: time(1_700_000_000, 0),
                    reason: string("ResourcesDiscovered"),
                    message: string(""),
                }],
            }),
        };
        assert_eq!(
            decoded(gvk_of("namespaces"), ns.encode_to_vec()),
            json!({
                "kind": "Namespace", "apiVersion": "v1",
                "metadata": new_meta_json("team", ""),
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active", "conditions": [{
                    "type": "NamespaceDeletionDiscoveryFailure", "status": "False",
                    "lastTransitionTime": "2023-11-14T22:13:20Z",
                    "reason": "ResourcesDiscovered"}]},
            })
        );
        let bare = core::Namespace {
            metadata: new_meta("bare", ""),
            spec: Some(core::NamespaceSpec::default()),
            status: Some(core::NamespaceStatus {
                phase: string(""),
                conditions: vec![],
            }),
        };
        assert_eq!(
            decoded(gvk_of("namespaces"), bare.encode_to_vec()),
            json!({"kind": "Namespace", "apiVersion": "v1",
                   "metadata": new_meta_json("bare", ""), "spec": {}, "status": {}})
        );
        let sa = core::ServiceAccount {
            metadata: new_meta("robot", "team"),
            secrets: vec![core::ObjectReference {
                kind: string("Secret"),
                namespace: string("team"),
                name: string("robot-token"),
                uid: string("u-3"),
                api_version: string("v1"),
                resource_version: string("9"),
                field_path: string("data"),
            }],
            image_pull_secrets: vec![core::LocalObjectReference {
                name: string("registry"),
            }],
            automount_service_account_token: Some(false),
        };
        assert_eq!(
            decoded(gvk_of("serviceaccounts"), sa.encode_to_vec()),
            json!({
                "kind": "ServiceAccount", "apiVersion": "v1",
                "metadata": new_meta_json("robot", "team"),
                "secrets": [{"kind": "Secret", "namespace": "team", "name": "robot-token",
                    "uid": "u-3", "apiVersion": "v1", "resourceVersion": "9",
                    "fieldPath": "data"}],
                "imagePullSecrets": [{"name": "registry"}],
                "automountServiceAccountToken": false,
            })
        );
    }

    #[test]
    fn a_resource_quota_prints_its_quantities_as_strings() {
        let quota = core::ResourceQuota {
            metadata: new_meta("critical", "weft-system"),
            spec: Some(core::ResourceQuotaSpec {
                hard: quantities(&[("pods", "2"), ("cpu", "500m")]),
                scopes: strings(&["BestEffort"]),
                scope_selector: Some(core::ScopeSelector {
                    match_expressions: vec![core::ScopedResourceSelectorRequirement {
                        scope_name: string("PriorityClass"),
                        operator: string("In"),
                        values: strings(&["system-node-critical"]),
                    }],
                }),
            }),
            status: Some(core::ResourceQuotaStatus {
                hard: quantities(&[("pods", "2")]),
                used: quantities(&[("pods", "1")]),
            }),
        };
        assert_eq!(
            decoded(gvk_of("resourcequotas"), quota.encode_to_vec()),
            json!({
                "kind": "ResourceQuota", "apiVersion": "v1",
                "metadata": new_meta_json("critical", "weft-system"),
                "spec": {
                    "hard": {"pods": "2", "cpu": "500m"},
                    "scopes": ["BestEffort"],
                    "scopeSelector": {"matchExpressions": [{"scopeName": "PriorityClass",
                        "operator": "In", "values": ["system-node-critical"]}]},
                },
                "status": {"hard": {"pods": "2"}, "used": {"pods": "1"}},
            })
        );
    }

    #[test]
    fn rbac_roles_and_bindings() {
        let rule = rbac::PolicyRule {
            verbs: strings(&["get", "list"]),
            api_groups: strings(&[""]),
            resources: strings(&["configmaps"]),
            resource_names: strings(&["weft-config"]),
            non_resource_ur_ls: strings(&["/healthz"]),
        };
        let rule_json = json!({"verbs": ["get", "list"], "apiGroups": [""],
            "resources": ["configmaps"], "resourceNames": ["weft-config"],
            "nonResourceURLs": ["/healthz"]});
        let cluster_role = rbac::ClusterRole {
            metadata: new_meta("reader", ""),
            rules: vec![rule.clone()],
            aggregation_rule: Some(rbac::AggregationRule {
                cluster_role_selectors: vec![meta::LabelSelector {
                    match_labels: [("weft.dev/aggregate".to_string(), "true".to_string())].into(),
                    match_expressions: vec![meta::LabelSelectorRequirement {
                        key: string("tier"),
                        operator: string("NotIn"),
                        values: strings(&["edge"]),
                    }],
                }],
            }),
        };
        let rbac_gvk = |kind| Gvk {
            group: "rbac.authorization.k8s.io",
            version: "v1",
            kind,
        };
        assert_eq!(
            decoded(rbac_gvk("ClusterRole"), cluster_role.encode_to_vec()),
            json!({
                "kind": "ClusterRole", "apiVersion": "rbac.authorization.k8s.io/v1",
                "metadata": new_meta_json("reader", ""),
                "rules": [rule_json],
                "aggregationRule": {"clusterRoleSelectors": [{
                    "matchLabels": {"weft.dev/aggregate": "true"},
                    "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["edge"]}],
                }]},
            })
        );
        let role = rbac::Role {
            metadata: new_meta("reader", "team"),
            rules: vec![rule],
        };
        assert_eq!(
            decoded(rbac_gvk("Role"), role.encode_to_vec())["rules"],
            json!([rule_json])
        );
        let subjects = vec![
            rbac::Subject {
                kind: string("ServiceAccount"),
                api_group: string(""),
                name: string("robot"),
                namespace: string("team"),
            },
            rbac::Subject {
                kind: string("User"),
                api_group: string("rbac.authorization.k8s.io"),
                name: string("alice"),
                namespace: string(""),
            },
        ];
        let role_ref = Some(rbac::RoleRef {
            api_group: string("rbac.authorization.k8s.io"),
            kind: string("ClusterRole"),
            name: string("reader"),
        });
        let expected = |kind: &str, namespace: &str| {
            json!({
                "kind": kind, "apiVersion": "rbac.authorization.k8s.io/v1",
                "metadata": new_meta_json("readers", namespace),
                "subjects": [
                    {"kind": "ServiceAccount", "name": "robot", "namespace": "team"},
                    {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "alice"},
                ],
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": "reader"},
            })
        };
        let crb = rbac::ClusterRoleBinding {
            metadata: new_meta("readers", ""),
            subjects: subjects.clone(),
            role_ref: role_ref.clone(),
        };
        assert_eq!(
            decoded(rbac_gvk("ClusterRoleBinding"), crb.encode_to_vec()),
            expected("ClusterRoleBinding", "")
        );
        let rb = rbac::RoleBinding {
            metadata: new_meta("readers", "team"),
            subjects,
            role_ref,
        };
        assert_eq!(
            decoded(rbac_gvk("RoleBinding"), rb.encode_to_vec()),
            expected("RoleBinding", "team")
        );
    }

    #[test]
    fn a_token_request_takes_json_names() {
        let tr = authn::TokenRequest {
            metadata: new_meta("robot", "team"),
            spec: Some(authn::TokenRequestSpec {
                audiences: strings(&["https://kubernetes.default.svc"]),
                expiration_seconds: Some(3600),
                bound_object_ref: Some(authn::BoundObjectReference {
                    kind: string("Node"),
                    api_version: string("v1"),
                    name: string("node-1"),
                    u_id: string("u-1"),
                }),
            }),
            status: Some(authn::TokenRequestStatus {
                token: string("t"),
                expiration_timestamp: time(1_700_003_600, 0),
            }),
        };
        assert_eq!(
            decoded(TOKEN_REQUEST, tr.encode_to_vec()),
            json!({
                "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": new_meta_json("robot", "team"),
                "spec": {"audiences": ["https://kubernetes.default.svc"],
                    "expirationSeconds": 3600,
                    "boundObjectRef": {"kind": "Node", "apiVersion": "v1",
                                       "name": "node-1", "uid": "u-1"}},
                "status": {"token": "t", "expirationTimestamp": "2023-11-14T23:13:20Z"},
            })
        );
    }

    #[test]
    fn every_decoded_type_but_token_requests_is_a_served_kind() {
        for (gvk, message) in schema::TYPES {
            assert_eq!(message.name, gvk.kind);
            if *gvk != TOKEN_REQUEST {
                let kind = KINDS.iter().find(|k| k.gvk() == *gvk);
                assert!(kind.is_some(), "{gvk:?} is not served");
            }
        }
    }

    /// Fields a newer client knows are skipped, whatever their wire type.
    #[test]
    fn unknown_fields_are_skipped() {
        let cm = core::ConfigMap {
            metadata: new_meta("c1", "default"),
            data: [("a".to_string(), "b".to_string())].into(),
            ..Default::default()
        };
        let mut raw = cm.encode_to_vec();
        raw.extend([
            0x98,
            0x06,
            7, // field 99 (a two-byte key), varint 7
            (5 << 3) | 1,
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            8, // field 5, fixed64
            (6 << 3) | 5,
            1,
            2,
            3,
            4, // field 6, fixed32
            (7 << 3) | 2,
            2,
            0xff,
            0xfe, // field 7, bytes (not UTF-8)
        ]);
        assert_eq!(
            decoded(gvk_of("configmaps"), raw),
            decoded(gvk_of("configmaps"), cm.encode_to_vec())
        );
    }

    #[test]
    fn an_envelope_without_a_type_takes_the_url_s() {
        let cm = core::ConfigMap {
            metadata: new_meta("c1", "default"),
            ..Default::default()
        };
        let unknown = Unknown {
            raw: Some(cm.encode_to_vec()),
            ..Default::default()
        };
        let body = [&MAGIC[..], &unknown.encode_to_vec()].concat();
        assert_eq!(
            decode(&body, gvk_of("configmaps")).map(|v| v["kind"].clone()),
            Ok(json!("ConfigMap"))
        );
    }

    /// Types kubectl never sends in protobuf get 415, naming the type; the
    /// client then sends JSON.
    #[test]
    fn other_types_are_unsupported_media_types() {
        let pod = core::Pod::default().encode_to_vec();
        let pods = gvk_of("pods");
        let err = decode(&envelope(pods, pod), pods).unwrap_err();
        assert!(err.unsupported_media_type());
        assert_eq!(
            err.to_string(),
            "application/vnd.kubernetes.protobuf is not supported for Pod (v1) by the lab API server: send application/json"
        );
        let delete = Gvk {
            kind: "DeleteOptions",
            ..lookup("", "v1", "configmaps").map(|k| k.gvk()).unwrap()
        };
        let err = decode(&envelope(delete, vec![]), delete).unwrap_err();
        assert!(err.unsupported_media_type(), "{err}");
    }

    /// Malformed bodies: 400 naming what is wrong and where.
    #[test]
    fn refusals_name_what_is_wrong() {
        let cms = gvk_of("configmaps");
        let refusal = |body: &[u8]| decode(body, cms).map_err(|e| e.to_string()).unwrap_err();
        let body_with = |raw: &[u8]| envelope(cms, raw.to_vec());
        assert_eq!(
            refusal(br#"{"kind":"ConfigMap"}"#),
            "the protobuf body does not start with the magic number k8s\\0"
        );
        assert_eq!(
            refusal(&envelope(gvk_of("serviceaccounts"), vec![])),
            "the body is a ServiceAccount (v1), but the URL addresses ConfigMap (v1)"
        );
        assert_eq!(
            refusal(&[&MAGIC[..], &[0x12, 0x05, 0x0a]].concat()),
            "the protobuf envelope (runtime.Unknown) is malformed: the message ends inside a field"
        );
        let gzip = Unknown {
            content_encoding: string("gzip"),
            ..Default::default()
        };
        assert_eq!(
            refusal(&[&MAGIC[..], &gzip.encode_to_vec()].concat()),
            "the protobuf envelope's contentEncoding \"gzip\" is not supported (only none)"
        );
        let yaml = Unknown {
            content_type: string("application/yaml"),
            ..Default::default()
        };
        assert_eq!(
            refusal(&[&MAGIC[..], &yaml.encode_to_vec()].concat()),
            "the protobuf envelope's contentType \"application/yaml\" is not supported (only application/vnd.kubernetes.protobuf)"
        );
        // metadata (1) as a varint
        assert_eq!(
            refusal(&body_with(&[0x08, 0x01])),
            "the protobuf ConfigMap is malformed: at metadata: wire type 0 where 2 was expected"
        );
        // metadata { name: "\xff" }
        assert_eq!(
            refusal(&body_with(&[0x0a, 0x03, 0x0a, 0x01, 0xff])),
            "the protobuf ConfigMap is malformed: at metadata.name: the string is not UTF-8"
        );
        // metadata { creationTimestamp { seconds: -5 } }
        let before_1970 = core::ConfigMap {
            metadata: Some(meta::ObjectMeta {
                creation_timestamp: time(-5, 0),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            refusal(&body_with(&before_1970.encode_to_vec())),
            "the protobuf ConfigMap is malformed: at metadata.creationTimestamp: -5s 0ns is not a time the lab keeps (1970 to 9999)"
        );
        let not_json = core::ConfigMap {
            metadata: Some(meta::ObjectMeta {
                managed_fields: vec![meta::ManagedFieldsEntry {
                    fields_v1: Some(meta::FieldsV1 {
                        raw: Some(b"{f:".to_vec()),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(refusal(&body_with(&not_json.encode_to_vec())).starts_with(
            "the protobuf ConfigMap is malformed: at metadata.managedFields[0].fieldsV1: the embedded JSON is not valid"
        ));
        // data { key: "a" value: <truncated> }
        assert_eq!(
            refusal(&body_with(&[0x12, 0x05, 0x0a, 0x01, b'a', 0x12, 0x09])),
            "the protobuf ConfigMap is malformed: at data: the message ends inside a field"
        );
        assert_eq!(
            refusal(&body_with(&[0x0b])),
            "the protobuf ConfigMap is malformed: wire type 3 is not valid (groups, 3 and 4, are not used by Kubernetes)"
        );
        assert_eq!(
            refusal(&body_with(&[
                0x20, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ])),
            "the protobuf ConfigMap is malformed: a varint is longer than 10 bytes"
        );
        assert_eq!(
            refusal(&body_with(&[0x00, 0x01])),
            "the protobuf ConfigMap is malformed: field number 0 is not valid"
        );
    }

    /// Every prefix of a valid body is refused or decoded, never a panic.
    #[test]
    fn truncated_bodies_never_panic() {
        let cm = core::ConfigMap {
            metadata: new_meta("c1", "default"),
            binary_data: [("bin".to_string(), vec![0, 1, 255])].into(),
            ..Default::default()
        };
        let body = envelope(gvk_of("configmaps"), cm.encode_to_vec());
        for end in 0..body.len() {
            let _ = decode(&body[..end], gvk_of("configmaps"));
        }
    }
}
