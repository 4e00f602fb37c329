//! The object store behind the lab API server: objects keyed by kind,
//! namespace and name; one monotonically increasing resourceVersion; a bounded
//! log of recent changes that watches resume from; and a broadcast channel
//! that fans changes out to live watches.
//!
//! Every verb's semantics (preconditions, status subresource, generation,
//! finalizers, no-op updates) live here, free of HTTP, so they can be tested
//! directly and the HTTP layer stays a thin translation.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;

use super::admission::Operation;
use super::kinds::{namespace_kind, Kind, KINDS};
use super::patch::{self, PatchType};
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::validate;

/// Namespaces every cluster starts with.
const BUILTIN_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

/// Live watches that fall this many events behind are closed with 410 (the
/// client relists), so a stuck watcher cannot hold memory without bound.
const WATCH_CHANNEL: usize = 4096;

/// Admission control: judges a write under the store's lock, after the
/// object is defaulted and validated and before anything is written, so
/// what it admits is exactly what is stored.
pub trait Admit: Sync {
    fn admit(
        &self,
        operation: Operation,
        old: Option<&Value>,
        new: Option<&Value>,
    ) -> Result<(), ApiError>;
}

/// Admits every write (the store's own writes and tests).
pub struct AdmitAll;

impl Admit for AdmitAll {
    fn admit(&self, _: Operation, _: Option<&Value>, _: Option<&Value>) -> Result<(), ApiError> {
        Ok(())
    }
}

/// How a write is made: for real or as a dry run, and who admits it.
#[derive(Clone, Copy)]
pub struct Write<'a> {
    pub dry_run: bool,
    pub admit: &'a dyn Admit,
}

impl Write<'static> {
    /// Written for real, admitted without questions.
    pub const COMMIT: Write<'static> = Write {
        dry_run: false,
        admit: &AdmitAll,
    };
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    kind: usize,
    namespace: String,
    name: String,
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    kind: usize,
    namespace: String,
    typ: EventType,
    object: Arc<Value>,
    previous: Option<Arc<Value>>,
}

impl Event {
    /// This change as seen through `filter` (`None` if the watch does not see
    /// it). An object whose labels leave the selector is DELETED for that
    /// watch and one that enters it is ADDED, as the real watch cache does.
    pub fn seen_by(&self, kind: &'static Kind, filter: &Filter) -> Option<(EventType, Arc<Value>)> {
        if self.kind != index(kind) || !filter.namespace_matches(&self.namespace) {
            return None;
        }
        let now = self.typ != EventType::Deleted && filter.matches(&self.object);
        let before = match (&self.previous, self.typ) {
            (Some(prev), EventType::Modified) => filter.matches(prev),
            (_, EventType::Deleted) => filter.matches(&self.object),
            _ => false,
        };
        let typ = match (before, now) {
            (false, true) => EventType::Added,
            (true, true) => EventType::Modified,
            (true, false) => EventType::Deleted,
            (false, false) => return None,
        };
        Some((typ, self.object.clone()))
    }
}

/// Which objects a list, watch or delete-collection sees.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `None`: all namespaces (or a cluster-scoped kind).
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    fn namespace_matches(&self, ns: &str) -> bool {
        self.namespace.as_deref().is_none_or(|want| want == ns)
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = object["metadata"].get("labels").and_then(Value::as_object);
        self.labels.matches(labels) && self.fields.matches(object)
    }
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    Main,
    Status,
}

impl Subresource {
    /// As in a URL and in RBAC rules: empty for the main resource.
    pub fn as_str(self) -> &'static str {
        match self {
            Subresource::Main => "",
            Subresource::Status => "status",
        }
    }
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// Synthetic ADDED events for every current object, then live changes
    /// (resourceVersion unset or "0").
    Current,
    /// Changes after this resourceVersion; 410 if the log no longer has them.
    After(u64),
}

/// A started watch: events to send first, then the live feed.
pub struct Watch {
    pub initial: Vec<(EventType, Arc<Value>)>,
    pub live: broadcast::Receiver<Arc<Event>>,
    /// The resourceVersion the initial events bring the client up to.
    pub rv: u64,
}

/// `DeleteOptions.preconditions`.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    log: VecDeque<Arc<Event>>,
    log_cap: usize,
    /// The newest resourceVersion whose event has left the log.
    compacted: u64,
}

/// A store's objects (by kind's plural) and resourceVersion, as saved.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub rv: u64,
    pub objects: Vec<(String, Value)>,
}

/// The object store.
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Arc<Event>>,
}

fn index(kind: &'static Kind) -> usize {
    KINDS
        .iter()
        .position(|k| std::ptr::eq(k, kind))
        .expect("kinds come from KINDS")
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object["metadata"].get(field).and_then(Value::as_str)
}

fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("made an object above")
}

/// Everything but metadata and status: what `generation` tracks.
fn spec_part(object: &Value) -> Map<String, Value> {
    let mut m = object.as_object().cloned().unwrap_or_default();
    for k in ["metadata", "status", "kind", "apiVersion"] {
        m.remove(k);
    }
    m
}

fn random_suffix() -> String {
    // The alphabet the real server uses for generateName: no vowels, no
    // look-alike characters.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4().as_bytes()[..5]
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

impl Store {
    /// A store holding the built-in namespaces, whose change log keeps the
    /// last `log_cap` events for resuming watches.
    pub fn new(log_cap: usize) -> Self {
        let (tx, _) = broadcast::channel(WATCH_CHANNEL);
        let store = Self {
            inner: Mutex::new(Inner {
                rv: 0,
                objects: BTreeMap::new(),
                log: VecDeque::new(),
                log_cap: log_cap.max(1),
                compacted: 0,
            }),
            tx,
        };
        for name in BUILTIN_NAMESPACES {
            store
                .create(
                    namespace_kind(),
                    "",
                    json!({"metadata": {"name": name}}),
                    Write::COMMIT,
                )
                .expect("built-in namespaces are valid");
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied change:
        // every mutation is a single insert/remove after all checks.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every object and the newest resourceVersion, to restore a server
    /// from after a restart.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            rv: inner.rv,
            objects: inner
                .objects
                .iter()
                .map(|(k, v)| (KINDS[k.kind].plural.to_string(), (**v).clone()))
                .collect(),
        }
    }

    /// A store holding `snapshot`'s objects, as a restarted kube-apiserver
    /// whose watch cache starts empty: resourceVersions go on from past the
    /// snapshot's, and a watch resuming from any older one gets 410 Gone
    /// (clients relist).
    pub fn restore(snapshot: Snapshot, log_cap: usize) -> Self {
        let (tx, _) = broadcast::channel(WATCH_CHANNEL);
        // Past anything a client may have seen, even a write the snapshot
        // missed.
        let rv = snapshot.rv + 1000;
        let objects = snapshot
            .objects
            .into_iter()
            .filter_map(|(plural, object)| {
                let kind = KINDS.iter().position(|k| k.plural == plural)?;
                let key = Key {
                    kind,
                    namespace: meta_str(&object, "namespace")
                        .unwrap_or_default()
                        .to_string(),
                    name: meta_str(&object, "name")?.to_string(),
                };
                Some((key, Arc::new(object)))
            })
            .collect();
        Self {
            inner: Mutex::new(Inner {
                rv,
                objects,
                log: VecDeque::new(),
                log_cap: log_cap.max(1),
                compacted: rv,
            }),
            tx,
        }
    }

    /// The newest resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    pub fn get(&self, kind: &'static Kind, ns: &str, name: &str) -> Result<Arc<Value>, ApiError> {
        self.lock()
            .objects
            .get(&key(kind, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, name))
    }

    /// Matching objects, sorted by namespace then name, and the list's resourceVersion.
    pub fn list(&self, kind: &'static Kind, filter: &Filter) -> (Vec<Arc<Value>>, u64) {
        let inner = self.lock();
        let items = objects_of(&inner, kind, filter)
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.rv)
    }

    pub fn watch(
        &self,
        kind: &'static Kind,
        filter: &Filter,
        start: WatchStart,
    ) -> Result<Watch, ApiError> {
        let inner = self.lock();
        let initial = match start {
            WatchStart::Current => objects_of(&inner, kind, filter)
                .map(|(_, v)| (EventType::Added, v.clone()))
                .collect(),
            WatchStart::After(rv) if rv < inner.compacted => {
                return Err(ApiError::gone(format!(
                    "too old resource version: {rv} ({})",
                    inner.compacted + 1
                )))
            }
            WatchStart::After(rv) => inner
                .log
                .iter()
                .filter(|e| e.rv > rv)
                .filter_map(|e| e.seen_by(kind, filter))
                .collect(),
        };
        // Subscribing under the lock: nothing committed after the snapshot
        // above can be missed, and nothing in it is sent twice.
        Ok(Watch {
            initial,
            live: self.tx.subscribe(),
            rv: inner.rv,
        })
    }

    pub fn create(
        &self,
        kind: &'static Kind,
        ns: &str,
        body: Value,
        w: Write,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let mut object = prepare_create(kind, ns, body)?;
        let name = meta_str(&object, "name").unwrap_or_default().to_string();
        if kind.group.is_empty() && kind.kind == "Service" {
            let stored = inner
                .objects
                .iter()
                .filter(|(k, _)| k.kind == index(kind))
                .map(|(_, o)| o.as_ref());
            super::services::allocate(&mut object, stored)
                .map_err(|e| ApiError::invalid(kind, &name, vec![e]))?;
        }
        if kind.namespaced {
            check_namespace_open(&inner, ns)?;
        }
        let k = key(kind, ns, &name);
        // As kube-apiserver: admission first, storage (which finds the name
        // taken) after, so a refused request is refused whatever exists.
        w.admit.admit(Operation::Create, None, Some(&object))?;
        if inner.objects.contains_key(&k) {
            return Err(ApiError::already_exists(kind, &name));
        }
        if w.dry_run {
            return Ok(object);
        }
        Ok(self
            .commit(&mut inner, k, EventType::Added, object, None)
            .as_ref()
            .clone())
    }

    pub fn update(
        &self,
        kind: &'static Kind,
        ns: &str,
        name: &str,
        body: Value,
        sub: Subresource,
        w: Write,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let old = current(&inner, kind, ns, name)?;
        let new = prepare_update(kind, ns, name, &old, body, sub)?;
        self.finish_update(&mut inner, kind, ns, name, old, new, w)
    }

    /// Applies a patch to the current object and stores the result as an
    /// update would (a `resourceVersion` in the patch is a precondition).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        kind: &'static Kind,
        ns: &str,
        name: &str,
        body: &Value,
        patch_type: PatchType,
        sub: Subresource,
        w: Write,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let old = current(&inner, kind, ns, name)?;
        let patched = patch::apply(&old, body, patch_type)?;
        let new = prepare_update(kind, ns, name, &old, patched, sub)?;
        self.finish_update(&mut inner, kind, ns, name, old, new, w)
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_update(
        &self,
        inner: &mut Inner,
        kind: &'static Kind,
        ns: &str,
        name: &str,
        old: Arc<Value>,
        new: Value,
        w: Write,
    ) -> Result<Value, ApiError> {
        // Admission judges no-op updates too, as on the real server.
        w.admit.admit(Operation::Update, Some(&old), Some(&new))?;
        // An update that changes nothing is not written and bumps nothing,
        // as on the real server (so idle controllers cause no watch traffic).
        if new == *old {
            return Ok(old.as_ref().clone());
        }
        if w.dry_run {
            return Ok(new);
        }
        let k = key(kind, ns, name);
        let finalized = meta_str(&new, "deletionTimestamp").is_some() && finalizers_empty(&new);
        let typ = if finalized {
            EventType::Deleted
        } else {
            EventType::Modified
        };
        let stored = self.commit(inner, k, typ, new, Some(old));
        if finalized {
            // Its last finalizer gone, the object is removed only now, and
            // its dependents with it.
            self.collect_garbage(inner, uids([&stored]));
        }
        Ok(stored.as_ref().clone())
    }

    /// Deletes an object, or marks it for deletion while finalizers remain.
    /// A namespace takes its contents with it, and whatever is removed
    /// takes its dependents (objects naming it in `ownerReferences`).
    pub fn delete(
        &self,
        kind: &'static Kind,
        ns: &str,
        name: &str,
        pre: &Preconditions,
        w: Write,
    ) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let old = current(&inner, kind, ns, name)?;
        if let Some(uid) = &pre.uid {
            if meta_str(&old, "uid") != Some(uid.as_str()) {
                return Err(ApiError::conflict(
                    kind,
                    name,
                    &format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        meta_str(&old, "uid").unwrap_or("")
                    ),
                ));
            }
        }
        if let Some(rv) = &pre.resource_version {
            if meta_str(&old, "resourceVersion") != Some(rv.as_str()) {
                return Err(ApiError::conflict(kind, name, &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", meta_str(&old, "resourceVersion").unwrap_or(""))));
            }
        }
        w.admit.admit(Operation::Delete, Some(&old), None)?;
        if w.dry_run {
            return Ok(old.as_ref().clone());
        }
        if !finalizers_empty(&old) {
            if meta_str(&old, "deletionTimestamp").is_some() {
                return Ok(old.as_ref().clone());
            }
            let marked = marked_for_deletion(&old);
            let k = key(kind, ns, name);
            return Ok(self
                .commit(&mut inner, k, EventType::Modified, marked, Some(old))
                .as_ref()
                .clone());
        }
        let mut removed = uids([&old]);
        if std::ptr::eq(kind, namespace_kind()) {
            let contents: Vec<(Key, Arc<Value>)> = inner
                .objects
                .iter()
                .filter(|(k, _)| KINDS[k.kind].namespaced && k.namespace == name)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            removed.extend(uids(contents.iter().map(|(_, v)| v)));
            for (k, v) in contents {
                let gone = v.as_ref().clone();
                self.commit(&mut inner, k, EventType::Deleted, gone, Some(v));
            }
        }
        let k = key(kind, ns, name);
        let gone = old.as_ref().clone();
        let gone = self.commit(&mut inner, k, EventType::Deleted, gone, Some(old));
        self.collect_garbage(&mut inner, removed);
        Ok(gone.as_ref().clone())
    }

    /// kube-apiserver's garbage collector, done at once rather than in the
    /// background: every object whose `ownerReferences` name a removed
    /// object's uid is deleted as a plain delete would delete it (removed,
    /// or only marked while finalizers remain), and the dependents of what
    /// is removed follow in turn. Ownership is by uid alone, so namespaced
    /// dependents of a cluster-scoped owner (a Node) are found too. Each
    /// round removes objects or marks unmarked ones, so cycles end.
    fn collect_garbage(&self, inner: &mut Inner, mut removed: BTreeSet<String>) {
        while !removed.is_empty() {
            let dependents: Vec<(Key, Arc<Value>)> = inner
                .objects
                .iter()
                .filter(|(_, v)| owner_uids(v).any(|uid| removed.contains(uid)))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            removed.clear();
            for (k, v) in dependents {
                if finalizers_empty(&v) {
                    removed.extend(uids([&v]));
                    let gone = v.as_ref().clone();
                    self.commit(inner, k, EventType::Deleted, gone, Some(v));
                } else if meta_str(&v, "deletionTimestamp").is_none() {
                    let marked = marked_for_deletion(&v);
                    self.commit(inner, k, EventType::Modified, marked, Some(v));
                }
            }
        }
    }

    /// Deletes every object the filter selects; returns what was deleted.
    pub fn delete_collection(
        &self,
        kind: &'static Kind,
        filter: &Filter,
        w: Write,
    ) -> Result<Vec<Value>, ApiError> {
        let (items, _) = self.list(kind, filter);
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let ns = meta_str(&item, "namespace").unwrap_or_default();
            let name = meta_str(&item, "name").unwrap_or_default();
            match self.delete(kind, ns, name, &Preconditions::default(), w) {
                Ok(v) => out.push(v),
                // Deleted concurrently: the goal is met.
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn commit(
        &self,
        inner: &mut Inner,
        k: Key,
        typ: EventType,
        mut object: Value,
        previous: Option<Arc<Value>>,
    ) -> Arc<Value> {
        inner.rv += 1;
        meta_mut(&mut object).insert("resourceVersion".into(), json!(inner.rv.to_string()));
        let object = Arc::new(object);
        if typ == EventType::Deleted {
            inner.objects.remove(&k);
        } else {
            inner.objects.insert(k.clone(), object.clone());
        }
        let event = Arc::new(Event {
            rv: inner.rv,
            kind: k.kind,
            namespace: k.namespace,
            typ,
            object: object.clone(),
            previous,
        });
        inner.log.push_back(event.clone());
        while inner.log.len() > inner.log_cap {
            if let Some(old) = inner.log.pop_front() {
                inner.compacted = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(event);
        object
    }
}

fn key(kind: &'static Kind, ns: &str, name: &str) -> Key {
    Key {
        kind: index(kind),
        namespace: if kind.namespaced {
            ns.to_string()
        } else {
            String::new()
        },
        name: name.to_string(),
    }
}

fn objects_of<'a>(
    inner: &'a Inner,
    kind: &'static Kind,
    filter: &'a Filter,
) -> impl Iterator<Item = (&'a Key, &'a Arc<Value>)> + 'a {
    let kind = index(kind);
    inner.objects.iter().filter(move |(k, v)| {
        k.kind == kind && filter.namespace_matches(&k.namespace) && filter.matches(v)
    })
}

fn current(
    inner: &Inner,
    kind: &'static Kind,
    ns: &str,
    name: &str,
) -> Result<Arc<Value>, ApiError> {
    inner
        .objects
        .get(&key(kind, ns, name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(kind, name))
}

fn check_namespace_open(inner: &Inner, ns: &str) -> Result<(), ApiError> {
    let namespace = current(inner, namespace_kind(), "", ns)?;
    if meta_str(&namespace, "deletionTimestamp").is_some() {
        return Err(ApiError::forbidden(format!(
            "unable to create new content in namespace {ns} because it is being terminated"
        )));
    }
    Ok(())
}

/// `object` as a delete leaves it while finalizers remain.
fn marked_for_deletion(object: &Value) -> Value {
    let mut marked = object.clone();
    let meta = meta_mut(&mut marked);
    meta.insert("deletionTimestamp".into(), json!(now_rfc3339()));
    meta.insert("deletionGracePeriodSeconds".into(), json!(0));
    marked
}

/// The uids of `objects` (every stored object has one).
fn uids<'a>(objects: impl IntoIterator<Item = &'a Arc<Value>>) -> BTreeSet<String> {
    objects
        .into_iter()
        .filter_map(|o| meta_str(o, "uid"))
        .map(str::to_string)
        .collect()
}

/// The uids an object's `ownerReferences` name.
fn owner_uids(object: &Value) -> impl Iterator<Item = &str> {
    object["metadata"]
        .get("ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("uid").and_then(Value::as_str))
}

fn finalizers_empty(object: &Value) -> bool {
    object["metadata"]
        .get("finalizers")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
}

/// Fills `kind`/`apiVersion` when absent and rejects a body of another kind,
/// or one whose name or namespace contradicts the URL.
fn check_identity(
    kind: &'static Kind,
    ns: &str,
    name: Option<&str>,
    body: &mut Value,
) -> Result<(), ApiError> {
    let Some(map) = body.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let api_version = kind.api_version();
    for (field, want) in [("apiVersion", api_version.as_str()), ("kind", kind.kind)] {
        match map.get(field).and_then(Value::as_str) {
            None | Some("") => {
                map.insert(field.into(), json!(want));
            }
            Some(got) if got == want => {}
            Some(got) => {
                return Err(ApiError::bad_request(format!(
                    "the {field} in the data ({got}) does not match the expected {field} ({want})"
                )))
            }
        }
    }
    let meta = meta_mut(body);
    if kind.namespaced {
        match meta.get("namespace").and_then(Value::as_str) {
            None | Some("") => {
                meta.insert("namespace".into(), json!(ns));
            }
            Some(got) if got == ns => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
        }
    } else {
        meta.remove("namespace");
    }
    if let Some(url_name) = name {
        match meta.get("name").and_then(Value::as_str) {
            None | Some("") => {
                meta.insert("name".into(), json!(url_name));
            }
            Some(got) if got == url_name => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    "the name of the object does not match the name on the URL",
                ))
            }
        }
    }
    Ok(())
}

/// `object` if valid, as created (`old` is `None`) or as an update of `old`.
fn validated(kind: &'static Kind, old: Option<&Value>, object: Value) -> Result<Value, ApiError> {
    let mut errors = validate::metadata(kind, &object);
    if let Some(old) = old {
        errors.extend(validate::update(kind, old, &object));
    }
    if errors.is_empty() {
        Ok(object)
    } else {
        let name = meta_str(&object, "name").unwrap_or_default().to_string();
        Err(ApiError::invalid(kind, &name, errors))
    }
}

/// The namespace label the real server maintains (NetworkPolicy
/// namespaceSelectors rely on it).
fn label_namespace(kind: &'static Kind, object: &mut Value) {
    if !std::ptr::eq(kind, namespace_kind()) {
        return;
    }
    let name = meta_str(object, "name").unwrap_or_default().to_string();
    let meta = meta_mut(object);
    let labels = meta.entry("labels").or_insert_with(|| json!({}));
    if !labels.is_object() {
        *labels = json!({});
    }
    labels["kubernetes.io/metadata.name"] = json!(name);
}

fn prepare_create(kind: &'static Kind, ns: &str, mut body: Value) -> Result<Value, ApiError> {
    check_identity(kind, ns, None, &mut body)?;
    let meta = meta_mut(&mut body);
    let name = meta.get("name").and_then(Value::as_str).unwrap_or_default();
    if name.is_empty() {
        if let Some(prefix) = meta.get("generateName").and_then(Value::as_str) {
            let generated = format!("{prefix}{}", random_suffix());
            meta.insert("name".into(), json!(generated));
        }
    }
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
    for f in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
    ] {
        meta.remove(f);
    }
    if kind.tracks_generation {
        meta.insert("generation".into(), json!(1));
    } else {
        meta.remove("generation");
    }
    label_namespace(kind, &mut body);
    if std::ptr::eq(kind, namespace_kind()) && body["status"]["phase"].is_null() {
        body["status"] = json!({"phase": "Active"});
    }
    validated(kind, None, body)
}

fn prepare_update(
    kind: &'static Kind,
    ns: &str,
    name: &str,
    old: &Value,
    mut body: Value,
    sub: Subresource,
) -> Result<Value, ApiError> {
    check_identity(kind, ns, Some(name), &mut body)?;
    let old_rv = meta_str(old, "resourceVersion").unwrap_or_default();
    if let Some(sent) = meta_str(&body, "resourceVersion").filter(|s| !s.is_empty()) {
        if sent != old_rv {
            return Err(ApiError::stale(kind, name));
        }
    }
    let mut new = match sub {
        Subresource::Status => {
            let mut merged = old.clone();
            merged["status"] = body.get("status").cloned().unwrap_or(Value::Null);
            merged
        }
        Subresource::Main if kind.status_subresource => {
            body["status"] = old.get("status").cloned().unwrap_or(Value::Null);
            body
        }
        Subresource::Main => body,
    };
    if new["status"].is_null() {
        if let Some(map) = new.as_object_mut() {
            map.remove("status");
        }
    }
    let meta = meta_mut(&mut new);
    for f in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old["metadata"].get(f) {
            Some(v) => meta.insert(f.into(), v.clone()),
            None => meta.remove(f),
        };
    }
    meta.insert("resourceVersion".into(), json!(old_rv));
    if kind.tracks_generation && spec_part(old) != spec_part(&new) {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
        meta_mut(&mut new).insert("generation".into(), json!(generation));
    }
    label_namespace(kind, &mut new);
    validated(kind, Some(old), new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::kinds::lookup;

    fn nodes() -> &'static Kind {
        lookup("", "v1", "nodes").unwrap()
    }
    fn netpols() -> &'static Kind {
        lookup("networking.k8s.io", "v1", "networkpolicies").unwrap()
    }

    fn node(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {"podCIDR": "198.19.1.0/24"}, "status": {"phase": "x"}})
    }

    #[test]
    fn create_sets_server_fields() {
        let s = Store::new(100);
        let n = s.create(nodes(), "", node("a"), Write::COMMIT).unwrap();
        assert_eq!(n["kind"], "Node");
        assert_eq!(n["apiVersion"], "v1");
        assert!(n["metadata"]["uid"].as_str().unwrap().len() == 36);
        assert!(n["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
        assert!(n["metadata"].get("generation").is_none());
        assert_eq!(
            s.create(nodes(), "", node("a"), Write::COMMIT)
                .unwrap_err()
                .reason,
            "AlreadyExists"
        );
        let p = s
            .create(
                netpols(),
                "default",
                json!({"metadata": {"generateName": "p-"}, "spec": {}}),
                Write::COMMIT,
            )
            .unwrap();
        assert_eq!(p["metadata"]["generation"], 1);
        assert!(p["metadata"]["name"].as_str().unwrap().starts_with("p-"));
        let missing_ns = s.create(
            netpols(),
            "nope",
            json!({"metadata": {"name": "p"}}),
            Write::COMMIT,
        );
        assert_eq!(missing_ns.unwrap_err().code, 404);
    }

    #[test]
    fn stale_update_conflicts_and_noop_writes_nothing() {
        let s = Store::new(100);
        let n = s.create(nodes(), "", node("a"), Write::COMMIT).unwrap();
        let rv = s.current_rv();
        let same = s
            .update(
                nodes(),
                "",
                "a",
                n.clone(),
                Subresource::Main,
                Write::COMMIT,
            )
            .unwrap();
        assert_eq!(s.current_rv(), rv, "a no-op update must not write");
        assert_eq!(same, n);
        let mut changed = n.clone();
        changed["metadata"]["labels"] = json!({"x": "y"});
        s.update(
            nodes(),
            "",
            "a",
            changed.clone(),
            Subresource::Main,
            Write::COMMIT,
        )
        .unwrap();
        changed["metadata"]["labels"] = json!({"x": "z"});
        let err = s
            .update(nodes(), "", "a", changed, Subresource::Main, Write::COMMIT)
            .unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
    }

    #[test]
    fn status_subresource_splits_writes() {
        let s = Store::new(100);
        let n = s.create(nodes(), "", node("a"), Write::COMMIT).unwrap();
        let mut body = n.clone();
        body["status"] = json!({"phase": "changed"});
        body["spec"]["podCIDR"] = json!("198.19.2.0/24");
        let main = s
            .update(
                nodes(),
                "",
                "a",
                body.clone(),
                Subresource::Main,
                Write::COMMIT,
            )
            .unwrap();
        assert_eq!(main["status"]["phase"], "x");
        assert_eq!(main["spec"]["podCIDR"], "198.19.2.0/24");
        body["metadata"]["resourceVersion"] = main["metadata"]["resourceVersion"].clone();
        body["spec"]["podCIDR"] = json!("198.19.3.0/24");
        let status = s
            .update(nodes(), "", "a", body, Subresource::Status, Write::COMMIT)
            .unwrap();
        assert_eq!(status["status"]["phase"], "changed");
        assert_eq!(status["spec"]["podCIDR"], "198.19.2.0/24");
    }

    #[test]
    fn generation_follows_spec_only() {
        let s = Store::new(100);
        let p = s
            .create(
                netpols(),
                "default",
                json!({"metadata": {"name": "p"}, "spec": {"podSelector": {}}}),
                Write::COMMIT,
            )
            .unwrap();
        let mut labelled = p.clone();
        labelled["metadata"]["labels"] = json!({"a": "b"});
        let p = s
            .update(
                netpols(),
                "default",
                "p",
                labelled,
                Subresource::Main,
                Write::COMMIT,
            )
            .unwrap();
        assert_eq!(p["metadata"]["generation"], 1);
        let patched = s
            .patch(
                netpols(),
                "default",
                "p",
                &json!({"spec": {"policyTypes": ["Ingress"]}}),
                PatchType::Merge,
                Subresource::Main,
                Write::COMMIT,
            )
            .unwrap();
        assert_eq!(patched["metadata"]["generation"], 2);
    }

    #[test]
    fn finalizers_defer_deletion() {
        let s = Store::new(100);
        let mut n = node("a");
        n["metadata"]["finalizers"] = json!(["weft.dev/test"]);
        s.create(nodes(), "", n, Write::COMMIT).unwrap();
        let marked = s
            .delete(nodes(), "", "a", &Preconditions::default(), Write::COMMIT)
            .unwrap();
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        assert!(s.get(nodes(), "", "a").is_ok());
        s.patch(
            nodes(),
            "",
            "a",
            &json!({"metadata": {"finalizers": null}}),
            PatchType::Merge,
            Subresource::Main,
            Write::COMMIT,
        )
        .unwrap();
        assert_eq!(s.get(nodes(), "", "a").unwrap_err().code, 404);
    }

    #[test]
    fn namespace_delete_cascades_and_is_labelled() {
        let s = Store::new(100);
        let ns = s
            .create(
                namespace_kind(),
                "",
                json!({"metadata": {"name": "x"}}),
                Write::COMMIT,
            )
            .unwrap();
        assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "x");
        assert_eq!(ns["status"]["phase"], "Active");
        s.create(
            netpols(),
            "x",
            json!({"metadata": {"name": "p"}}),
            Write::COMMIT,
        )
        .unwrap();
        s.delete(
            namespace_kind(),
            "",
            "x",
            &Preconditions::default(),
            Write::COMMIT,
        )
        .unwrap();
        assert_eq!(s.get(netpols(), "x", "p").unwrap_err().code, 404);
    }

    fn configmaps() -> &'static Kind {
        lookup("", "v1", "configmaps").unwrap()
    }

    /// A ConfigMap named `name` whose owner is `owner` (as created).
    fn owned_configmap(name: &str, owner: &Value) -> Value {
        json!({"metadata": {"name": name, "ownerReferences": [{
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
        }]}})
    }

    fn weft_system(s: &Store) {
        s.create(
            namespace_kind(),
            "",
            json!({"metadata": {"name": "weft-system"}}),
            Write::COMMIT,
        )
        .unwrap();
    }

    fn delete(s: &Store, kind: &'static Kind, ns: &str, name: &str) -> Value {
        s.delete(kind, ns, name, &Preconditions::default(), Write::COMMIT)
            .unwrap()
    }

    #[test]
    fn deleting_a_node_collects_configmaps_it_owns_in_any_namespace() {
        let s = Store::new(100);
        weft_system(&s);
        let a = s.create(nodes(), "", node("a"), Write::COMMIT).unwrap();
        let b = s.create(nodes(), "", node("b"), Write::COMMIT).unwrap();
        for (name, owner) in [("weft-blocks-a", &a), ("weft-blocks-b", &b)] {
            s.create(
                configmaps(),
                "weft-system",
                owned_configmap(name, owner),
                Write::COMMIT,
            )
            .unwrap();
        }
        let filter = Filter::default();
        let mut w = s.watch(configmaps(), &filter, WatchStart::Current).unwrap();
        delete(&s, nodes(), "", "a");
        assert_eq!(
            s.get(configmaps(), "weft-system", "weft-blocks-a")
                .unwrap_err()
                .code,
            404
        );
        assert!(s.get(configmaps(), "weft-system", "weft-blocks-b").is_ok());
        let seen: Vec<_> = std::iter::from_fn(|| w.live.try_recv().ok())
            .filter_map(|e| e.seen_by(configmaps(), &filter))
            .map(|(typ, o)| (typ, o["metadata"]["name"].clone()))
            .collect();
        assert_eq!(seen, [(EventType::Deleted, json!("weft-blocks-a"))]);
    }

    #[test]
    fn owner_chains_are_collected_and_finalizers_hold_dependents() {
        let s = Store::new(100);
        weft_system(&s);
        let a = s.create(nodes(), "", node("a"), Write::COMMIT).unwrap();
        let create = |body: Value| {
            s.create(configmaps(), "weft-system", body, Write::COMMIT)
                .unwrap()
        };
        let child = create(owned_configmap("child", &a));
        create(owned_configmap("grandchild", &child));
        let mut held = owned_configmap("held", &a);
        held["metadata"]["finalizers"] = json!(["weft.dev/test"]);
        let held = create(held);
        create(owned_configmap("held-child", &held));

        delete(&s, nodes(), "", "a");
        for name in ["child", "grandchild"] {
            let gone = s.get(configmaps(), "weft-system", name);
            assert_eq!(gone.unwrap_err().code, 404, "{name}");
        }
        let held = s.get(configmaps(), "weft-system", "held").unwrap();
        assert!(held["metadata"]["deletionTimestamp"].is_string());
        assert!(
            s.get(configmaps(), "weft-system", "held-child").is_ok(),
            "a dependent goes only when its owner is actually removed"
        );
        s.patch(
            configmaps(),
            "weft-system",
            "held",
            &json!({"metadata": {"finalizers": null}}),
            PatchType::Merge,
            Subresource::Main,
            Write::COMMIT,
        )
        .unwrap();
        for name in ["held", "held-child"] {
            let gone = s.get(configmaps(), "weft-system", name);
            assert_eq!(gone.unwrap_err().code, 404, "{name}");
        }
    }

    #[test]
    fn an_immutable_configmap_keeps_its_data_but_can_be_deleted() {
        let s = Store::new(100);
        let cm = s
            .create(
                configmaps(),
                "default",
                json!({"metadata": {"name": "c"}, "immutable": true, "data": {"k": "v"}}),
                Write::COMMIT,
            )
            .unwrap();
        let mut changed = cm.clone();
        changed["data"]["k"] = json!("w");
        let err = s
            .update(
                configmaps(),
                "default",
                "c",
                changed,
                Subresource::Main,
                Write::COMMIT,
            )
            .unwrap_err();
        assert_eq!((err.code, err.reason), (422, "Invalid"));
        assert!(
            err.message
                .contains("data: Forbidden: field is immutable when `immutable` is set"),
            "{}",
            err.message
        );
        let patch = |body: Value| {
            s.patch(
                configmaps(),
                "default",
                "c",
                &body,
                PatchType::Merge,
                Subresource::Main,
                Write::COMMIT,
            )
        };
        for body in [
            json!({"data": {"k": "w"}}),
            json!({"data": {"more": "x"}}),
            json!({"binaryData": {"b": "AA=="}}),
            json!({"immutable": false}),
        ] {
            let err = patch(body.clone()).unwrap_err();
            assert_eq!((err.code, err.reason), (422, "Invalid"), "{body}");
        }
        let labelled = patch(json!({"metadata": {"labels": {"x": "y"}}})).unwrap();
        assert_eq!(labelled["data"], json!({"k": "v"}));
        delete(&s, configmaps(), "default", "c");
        assert_eq!(s.get(configmaps(), "default", "c").unwrap_err().code, 404);
    }

    #[test]
    fn watch_resumes_from_log_and_expires() {
        let s = Store::new(3);
        let base = s.current_rv();
        for i in 0..5 {
            s.create(nodes(), "", node(&format!("n{i}")), Write::COMMIT)
                .unwrap();
        }
        let err = s
            .watch(nodes(), &Filter::default(), WatchStart::After(base))
            .err()
            .unwrap();
        assert_eq!(err.code, 410);
        let w = s
            .watch(
                nodes(),
                &Filter::default(),
                WatchStart::After(s.current_rv() - 2),
            )
            .unwrap();
        let names: Vec<_> = w
            .initial
            .iter()
            .map(|(_, o)| o["metadata"]["name"].clone())
            .collect();
        assert_eq!(names, [json!("n3"), json!("n4")]);
    }

    #[test]
    fn a_restored_store_keeps_objects_and_sends_every_old_watch_away() {
        let s = Store::new(100);
        s.create(nodes(), "", node("a"), Write::COMMIT).unwrap();
        let seen = s.current_rv();
        let json = serde_json::to_vec(&s.snapshot()).unwrap();
        let r = Store::restore(serde_json::from_slice(&json).unwrap(), 100);
        assert_eq!(r.get(nodes(), "", "a").unwrap()["metadata"]["name"], "a");
        assert!(r.get(namespace_kind(), "", "default").is_ok());
        let err = r
            .watch(nodes(), &Filter::default(), WatchStart::After(seen))
            .err()
            .unwrap();
        assert_eq!(err.code, 410, "a client's old resourceVersion must relist");
        let created = r.create(nodes(), "", node("b"), Write::COMMIT).unwrap();
        let rv: u64 = created["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(rv > seen, "resourceVersions go on past the snapshot's");
        assert!(r
            .watch(
                nodes(),
                &Filter::default(),
                WatchStart::After(r.current_rv())
            )
            .is_ok());
    }

    #[test]
    fn selector_transitions_become_added_and_deleted() {
        let s = Store::new(100);
        s.create(nodes(), "", node("a"), Write::COMMIT).unwrap();
        let filter = Filter {
            labels: LabelSelector::parse("role=mesh").unwrap(),
            ..Filter::default()
        };
        let mut w = s.watch(nodes(), &filter, WatchStart::Current).unwrap();
        assert!(w.initial.is_empty());
        let label = |v: Value| json!({"metadata": {"labels": {"role": v}}});
        s.patch(
            nodes(),
            "",
            "a",
            &label(json!("mesh")),
            PatchType::Merge,
            Subresource::Main,
            Write::COMMIT,
        )
        .unwrap();
        s.patch(
            nodes(),
            "",
            "a",
            &label(json!("other")),
            PatchType::Merge,
            Subresource::Main,
            Write::COMMIT,
        )
        .unwrap();
        let seen: Vec<_> = (0..2)
            .map(|_| {
                w.live
                    .try_recv()
                    .unwrap()
                    .seen_by(nodes(), &filter)
                    .unwrap()
                    .0
            })
            .collect();
        assert_eq!(seen, [EventType::Added, EventType::Deleted]);
    }
}
