//! The REST surface: turns Kubernetes URLs, verbs, query parameters and
//! bodies into store calls, and store results into responses and watch
//! streams. No semantics of its own beyond the wire format.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::access::{self, Admission};
use super::auth::{Signer, User};
use super::discovery;
use super::kinds::{lookup, Gvk, Kind};
use super::patch::PatchType;
use super::protobuf;
use super::rbac::Attributes;
use super::selector::{FieldSelector, LabelSelector};
use super::status::{self, ApiError};
use super::store::{Filter, Preconditions, Store, Subresource, Watch, WatchStart, Write};
use super::table;

/// The real server's request body limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// The watch timeout when the client sets none (the real server picks 30–60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

pub type Body = BoxBody<Bytes, Infallible>;

/// State shared by every connection.
pub struct Shared {
    pub store: Store,
    /// The admin's token (`system:masters`).
    pub token: String,
    /// Signs and verifies service account tokens.
    pub signer: Signer,
    pub bookmark_interval: Duration,
    pub shutdown: CancellationToken,
}

/// What a URL addresses.
#[derive(Debug, PartialEq)]
enum Route<'a> {
    Health,
    Version,
    OpenApiV2,
    CoreVersions,
    Groups,
    Group(&'a str),
    Resources(&'a str, &'a str),
    Collection {
        kind: &'static Kind,
        namespace: Option<&'a str>,
    },
    Object {
        kind: &'static Kind,
        namespace: Option<&'a str>,
        name: &'a str,
        sub: Subresource,
    },
    /// TokenRequest: `…/namespaces/NS/serviceaccounts/NAME/token`.
    Token {
        namespace: &'a str,
        name: &'a str,
    },
}

fn route(path: &str) -> Option<Route<'_>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["healthz" | "livez" | "readyz", ..] => Some(Route::Health),
        ["version"] => Some(Route::Version),
        ["openapi", "v2"] => Some(Route::OpenApiV2),
        ["api"] => Some(Route::CoreVersions),
        ["api", "v1", rest @ ..] => resource_route("", "v1", rest),
        ["apis"] => Some(Route::Groups),
        ["apis", group] => Some(Route::Group(group)),
        ["apis", group, version, rest @ ..] => resource_route(group, version, rest),
        _ => None,
    }
}

fn resource_route<'a>(group: &'a str, version: &'a str, rest: &[&'a str]) -> Option<Route<'a>> {
    let found = |plural: &str| lookup(group, version, plural);
    let sub = |s: &str| (s == "status").then_some(Subresource::Status);
    match *rest {
        [] => discovery::resources(group, version).map(|_| Route::Resources(group, version)),
        ["namespaces", ns, plural] if plural != "status" => {
            let kind = found(plural).filter(|k| k.namespaced)?;
            Some(Route::Collection {
                kind,
                namespace: Some(ns),
            })
        }
        ["namespaces", ns, plural, name] => {
            let kind = found(plural).filter(|k| k.namespaced)?;
            Some(Route::Object {
                kind,
                namespace: Some(ns),
                name,
                sub: Subresource::Main,
            })
        }
        ["namespaces", ns, "serviceaccounts", name, "token"] if group.is_empty() => {
            Some(Route::Token {
                namespace: ns,
                name,
            })
        }
        ["namespaces", ns, plural, name, s] => {
            let kind = found(plural).filter(|k| k.namespaced && k.status_subresource)?;
            Some(Route::Object {
                kind,
                namespace: Some(ns),
                name,
                sub: sub(s)?,
            })
        }
        [plural] => Some(Route::Collection {
            kind: found(plural)?,
            namespace: None,
        }),
        [plural, name] => {
            let kind = found(plural).filter(|k| !k.namespaced)?;
            Some(Route::Object {
                kind,
                namespace: None,
                name,
                sub: Subresource::Main,
            })
        }
        [plural, name, s] => {
            let kind = found(plural).filter(|k| !k.namespaced && k.status_subresource)?;
            Some(Route::Object {
                kind,
                namespace: None,
                name,
                sub: sub(s)?,
            })
        }
        _ => None,
    }
}

fn full(body: Vec<u8>) -> Body {
    Full::new(Bytes::from(body)).boxed()
}

fn respond(code: u16, value: &Value) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(e: &ApiError) -> Response<Body> {
    respond(e.code, &e.to_status())
}

/// Serves one request; never fails at the HTTP level (errors are `Status`es).
pub async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let response = match dispatch(&shared, req).await {
        Ok(r) => r,
        Err(e) => error(&e),
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
    response
}

async fn dispatch(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let Some(route) = route(&path) else {
        return Err(ApiError::no_route(&path));
    };
    let query: HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let method = req.method().clone();
    let user = match route {
        Route::Health | Route::Version => User::admin(), // unauthenticated, read-only
        _ => access::authenticate(&shared.store, &shared.signer, &shared.token, bearer(&req))?,
    };
    if let Some(a) = attributes(&route, &method, &query) {
        access::authorize(&shared.store, &user, &a)?;
    }
    match (route, &method) {
        (Route::Health, &Method::GET) => {
            let mut r = Response::new(full(b"ok".to_vec()));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            Ok(r)
        }
        (Route::Version, &Method::GET) => Ok(respond(200, &discovery::version())),
        (Route::OpenApiV2, &Method::GET) => Ok(openapi_v2()),
        (Route::CoreVersions, &Method::GET) => Ok(respond(200, &discovery::core_versions())),
        (Route::Groups, &Method::GET) => Ok(respond(200, &discovery::groups())),
        (Route::Group(g), &Method::GET) => discovery::group(g)
            .map(|d| respond(200, &d))
            .ok_or_else(|| ApiError::no_route(&path)),
        (Route::Resources(g, v), &Method::GET) => discovery::resources(g, v)
            .map(|d| respond(200, &d))
            .ok_or_else(|| ApiError::no_route(&path)),
        (Route::Collection { kind, namespace }, m) => {
            collection(
                shared,
                req,
                &user,
                kind,
                namespace.map(str::to_string),
                &query,
                m.clone(),
            )
            .await
        }
        (Route::Token { namespace, name }, &Method::POST) => {
            let body = read_body(req, access::TOKEN_REQUEST, true).await?;
            access::token_request(&shared.store, &shared.signer, namespace, name, &body)
                .map(|r| respond(201, &r))
        }
        (
            Route::Object {
                kind,
                namespace,
                name,
                sub,
            },
            m,
        ) => {
            let (ns, name) = (namespace.unwrap_or("").to_string(), name.to_string());
            let target = Target {
                kind,
                ns: &ns,
                name: &name,
                sub,
            };
            object(shared, req, &user, target, &query, m.clone()).await
        }
        (_, m) => Err(ApiError::method_not_allowed(m.as_str())),
    }
}

/// The bearer token of the request, if it has one.
fn bearer<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
}

/// What RBAC judges a resource request by; `None` for discovery, which
/// every authenticated user may read (`system:discovery`).
fn attributes<'a>(
    route: &Route<'a>,
    method: &Method,
    query: &'a HashMap<String, String>,
) -> Option<Attributes<'a>> {
    let verb = |collection: bool| -> &'static str {
        match (method, collection) {
            (&Method::GET, true) if flag(query, "watch") => "watch",
            (&Method::GET, true) => "list",
            (&Method::GET, false) => "get",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, true) => "deletecollection",
            (&Method::DELETE, false) => "delete",
            _ => "unknown",
        }
    };
    match *route {
        Route::Collection { kind, namespace } => Some(Attributes {
            verb: verb(true),
            kind,
            subresource: "",
            namespace: namespace.unwrap_or(""),
            name: match method {
                &Method::GET => query
                    .get("fieldSelector")
                    .and_then(|s| super::selector::exact_name(s))
                    .unwrap_or(""),
                _ => "",
            },
        }),
        Route::Object {
            kind,
            namespace,
            name,
            sub,
        } => Some(Attributes {
            verb: verb(false),
            kind,
            subresource: sub.as_str(),
            namespace: namespace.unwrap_or(""),
            name,
        }),
        Route::Token { namespace, name } => Some(Attributes {
            verb: verb(false),
            kind: lookup("", "v1", "serviceaccounts")?,
            subresource: "token",
            namespace,
            name,
        }),
        _ => None,
    }
}

/// How a write is made: dry-run or not, admitted by the policies in force.
fn admission<'a>(
    store: &Store,
    user: &'a User,
    kind: &'static Kind,
    ns: &'a str,
    name: &'a str,
    sub: Subresource,
    dry_run: bool,
) -> Admission<'a> {
    let attributes = Attributes {
        verb: "",
        kind,
        subresource: sub.as_str(),
        namespace: ns,
        name,
    };
    Admission::new(store, user, attributes, dry_run)
}

/// kubectl validates manifests against `/openapi/v2` and fails without it.
/// An empty protobuf `Document` is a valid answer that declares no schemas,
/// so kubectl skips client-side validation (as it does for unknown kinds).
/// The type is octet-stream: client-go cannot parse the protobuf media type
/// (`…spec.v2@v1.0+protobuf`) and returns octet-stream bodies raw.
fn openapi_v2() -> Response<Body> {
    let mut r = Response::new(full(Vec::new()));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    r
}

fn dry_run(query: &HashMap<String, String>) -> bool {
    query.get("dryRun").is_some_and(|v| v == "All")
}

fn flag(query: &HashMap<String, String>, name: &str) -> bool {
    query
        .get(name)
        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

fn filter(
    kind: &'static Kind,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Result<Filter, ApiError> {
    Ok(Filter {
        namespace,
        labels: LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?,
        fields: FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str), kind)?,
    })
}

async fn read_bytes(body: Incoming) -> Result<Bytes, ApiError> {
    Ok(Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::too_large(format!("the request body exceeds {MAX_BODY} bytes"))
            } else {
                ApiError::bad_request(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes())
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

/// The body of a write as the object's JSON, whichever way it was sent:
/// JSON as is, protobuf decoded ([`protobuf`]) for `addressed`, the type
/// the URL takes. `Value::Null` when empty and not `required`.
async fn read_body(
    req: Request<Incoming>,
    addressed: Gvk,
    required: bool,
) -> Result<Value, ApiError> {
    let media_type = content_type(&req);
    let bytes = read_bytes(req.into_body()).await?;
    if bytes.is_empty() && !required {
        return Ok(Value::Null);
    }
    match media_type.split(';').next().unwrap_or("").trim() {
        "" | "application/json" | "*/*" => parse_json(&bytes),
        protobuf::MEDIA_TYPE => protobuf::decode(&bytes, addressed).map_err(|e| {
            if e.unsupported_media_type() {
                ApiError::unsupported_media_type_because(e.to_string())
            } else {
                ApiError::bad_request(e.to_string())
            }
        }),
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

/// A delete's body, `DeleteOptions`, which every group version registers
/// (kubectl sends it as JSON; the lab decodes it in no other form).
fn delete_options(kind: &Kind) -> Gvk {
    Gvk {
        kind: "DeleteOptions",
        ..kind.gvk()
    }
}

/// A patch, whose media type (the patch type) the caller has checked.
async fn read_patch(req: Request<Incoming>) -> Result<Value, ApiError> {
    parse_json(&read_bytes(req.into_body()).await?)
}

fn content_type<B>(req: &Request<B>) -> String {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string()
}

fn wants_table<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(table::wanted)
}

#[allow(clippy::too_many_arguments)]
async fn collection(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    user: &User,
    kind: &'static Kind,
    namespace: Option<String>,
    query: &HashMap<String, String>,
    method: Method,
) -> Result<Response<Body>, ApiError> {
    let store = &shared.store;
    match method {
        Method::GET if flag(query, "watch") => {
            let f = filter(kind, namespace, query)?;
            Ok(watch(shared, kind, f, query))
        }
        Method::GET => {
            let f = filter(kind, namespace, query)?;
            let (items, rv) = store.list(kind, &f);
            if wants_table(&req) {
                let refs: Vec<&Value> = items.iter().map(|v| v.as_ref()).collect();
                return Ok(respond(200, &table::render(&refs, rv, SystemTime::now())));
            }
            Ok(respond(200, &list_body(kind, &items, rv)))
        }
        Method::POST => {
            let Some(ns) = namespace.or_else(|| (!kind.namespaced).then(String::new)) else {
                return Err(ApiError::method_not_allowed("POST"));
            };
            let body = read_body(req, kind.gvk(), true).await?;
            let dry = dry_run(query);
            let admit = admission(store, user, kind, &ns, "", Subresource::Main, dry);
            let w = Write {
                dry_run: dry,
                admit: &admit,
            };
            store.create(kind, &ns, body, w).map(|o| respond(201, &o))
        }
        Method::DELETE => {
            let ns = namespace.clone().unwrap_or_default();
            let f = filter(kind, namespace, query)?;
            let dry = dry_run(query);
            let admit = admission(store, user, kind, &ns, "", Subresource::Main, dry);
            let w = Write {
                dry_run: dry,
                admit: &admit,
            };
            let deleted = store.delete_collection(kind, &f, w)?;
            let items: Vec<Arc<Value>> = deleted.into_iter().map(Arc::new).collect();
            Ok(respond(200, &list_body(kind, &items, store.current_rv())))
        }
        m => Err(ApiError::method_not_allowed(m.as_str())),
    }
}

/// The object a request addresses.
struct Target<'a> {
    kind: &'static Kind,
    ns: &'a str,
    name: &'a str,
    sub: Subresource,
}

async fn object(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    user: &User,
    target: Target<'_>,
    query: &HashMap<String, String>,
    method: Method,
) -> Result<Response<Body>, ApiError> {
    let Target {
        kind,
        ns,
        name,
        sub,
    } = target;
    let store = &shared.store;
    let dry = dry_run(query);
    let admit = admission(store, user, kind, ns, name, sub, dry);
    let w = Write {
        dry_run: dry,
        admit: &admit,
    };
    match method {
        Method::GET => {
            let o = store.get(kind, ns, name)?;
            if wants_table(&req) {
                return Ok(respond(
                    200,
                    &table::render(&[o.as_ref()], store.current_rv(), SystemTime::now()),
                ));
            }
            Ok(respond(200, &o))
        }
        Method::PUT => {
            let body = read_body(req, kind.gvk(), true).await?;
            store
                .update(kind, ns, name, body, sub, w)
                .map(|o| respond(200, &o))
        }
        Method::PATCH => {
            let patch_type = PatchType::from_content_type(&content_type(&req))?;
            let body = read_patch(req).await?;
            store
                .patch(kind, ns, name, &body, patch_type, sub, w)
                .map(|o| respond(200, &o))
        }
        Method::DELETE if sub == Subresource::Main => {
            let body = read_body(req, delete_options(kind), false).await?;
            let pre = Preconditions {
                uid: body["preconditions"]["uid"].as_str().map(str::to_string),
                resource_version: body["preconditions"]["resourceVersion"]
                    .as_str()
                    .map(str::to_string),
            };
            let gone = store.delete(kind, ns, name, &pre, w)?;
            if query.get("as").is_some_and(|v| v == "Status") {
                let uid = gone["metadata"]["uid"].as_str().unwrap_or_default();
                return Ok(respond(200, &status::success(kind, name, uid)));
            }
            Ok(respond(200, &gone))
        }
        m => Err(ApiError::method_not_allowed(m.as_str())),
    }
}

/// A `<Kind>List`. Items carry no `kind`/`apiVersion`, as from the real server.
fn list_body(kind: &Kind, items: &[Arc<Value>], rv: u64) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|item| {
            let mut v = item.as_ref().clone();
            if let Some(m) = v.as_object_mut() {
                m.remove("kind");
                m.remove("apiVersion");
            }
            v
        })
        .collect();
    json!({
        "kind": format!("{}List", kind.kind),
        "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })
}

struct WatchOptions {
    timeout: Duration,
    bookmarks: bool,
    initial_events_end: bool,
}

fn watch(
    shared: &Arc<Shared>,
    kind: &'static Kind,
    filter: Filter,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let opts = WatchOptions {
        timeout: query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs),
        bookmarks: flag(query, "allowWatchBookmarks"),
        initial_events_end: flag(query, "sendInitialEvents"),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let start = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => Ok(WatchStart::Current),
        Some(rv) => rv
            .parse()
            .map(WatchStart::After)
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}"))),
    };
    let started = start.and_then(|s| shared.store.watch(kind, &filter, s));
    let shared = shared.clone();
    tokio::spawn(async move {
        match started {
            Ok(w) => pump(&shared, kind, &filter, w, opts, &tx).await,
            // The real server answers 200 and reports an expired or invalid
            // start as the stream's only event.
            Err(e) => {
                let _ = tx.send(line("ERROR", &e.to_status())).await;
            }
        }
    });
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut r = Response::new(StreamBody::new(stream).boxed());
    let headers = r.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        "cache-control",
        HeaderValue::from_static("no-cache, private"),
    );
    r
}

fn line(typ: &str, object: &Value) -> Bytes {
    let mut out = serde_json::to_vec(&json!({"type": typ, "object": object})).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

fn bookmark(kind: &Kind, rv: u64, initial_events_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        &json!({"kind": kind.kind, "apiVersion": kind.api_version(), "metadata": meta}),
    )
}

/// Feeds one watch stream until it times out, the client leaves, the
/// watcher falls too far behind (410, the client relists) or the server stops.
async fn pump(
    shared: &Shared,
    kind: &'static Kind,
    filter: &Filter,
    w: Watch,
    opts: WatchOptions,
    tx: &mpsc::Sender<Bytes>,
) {
    let Watch {
        initial,
        mut live,
        rv,
    } = w;
    for (typ, object) in initial {
        if tx.send(line(typ.as_str(), &object)).await.is_err() {
            return;
        }
    }
    if opts.initial_events_end && opts.bookmarks && tx.send(bookmark(kind, rv, true)).await.is_err()
    {
        return;
    }
    let mut last_rv = rv;
    let deadline = tokio::time::sleep(opts.timeout);
    tokio::pin!(deadline);
    let period = shared.bookmark_interval;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        let out = tokio::select! {
            _ = &mut deadline => {
                if opts.bookmarks {
                    let _ = tx.send(bookmark(kind, last_rv, false)).await;
                }
                return;
            }
            _ = shared.shutdown.cancelled() => return,
            _ = tx.closed() => return,
            _ = ticks.tick(), if opts.bookmarks => bookmark(kind, last_rv, false),
            event = live.recv() => match event {
                Ok(e) => {
                    last_rv = e.rv;
                    match e.seen_by(kind, filter) {
                        Some((typ, object)) => line(typ.as_str(), &object),
                        None => continue,
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let gone = ApiError::gone(format!("the watch fell {n} events behind; relist"));
                    let _ = tx.send(line("ERROR", &gone.to_status())).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if tx.send(out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let nodes = lookup("", "v1", "nodes").unwrap();
        let pods = lookup("", "v1", "pods").unwrap();
        let ns = lookup("", "v1", "namespaces").unwrap();
        assert_eq!(
            route("/api/v1/nodes"),
            Some(Route::Collection {
                kind: nodes,
                namespace: None
            })
        );
        assert_eq!(
            route("/api/v1/nodes/n1/status"),
            Some(Route::Object {
                kind: nodes,
                namespace: None,
                name: "n1",
                sub: Subresource::Status
            })
        );
        assert_eq!(
            route("/api/v1/namespaces/x/pods"),
            Some(Route::Collection {
                kind: pods,
                namespace: Some("x")
            })
        );
        assert_eq!(
            route("/api/v1/namespaces/x"),
            Some(Route::Object {
                kind: ns,
                namespace: None,
                name: "x",
                sub: Subresource::Main
            })
        );
        assert_eq!(
            route("/api/v1/namespaces/x/status"),
            Some(Route::Object {
                kind: ns,
                namespace: None,
                name: "x",
                sub: Subresource::Status
            })
        );
        assert_eq!(
            route("/api/v1/pods"),
            Some(Route::Collection {
                kind: pods,
                namespace: None
            })
        );
        assert_eq!(
            route("/api/v1/pods/p"),
            None,
            "namespaced objects need a namespace"
        );
        assert_eq!(
            route("/api/v1/namespaces/x/nodes"),
            None,
            "nodes are cluster-scoped"
        );
        assert_eq!(
            route("/apis/networking.k8s.io/v1"),
            Some(Route::Resources("networking.k8s.io", "v1"))
        );
        assert_eq!(route("/apis/nope.io/v1"), None);
        assert_eq!(
            route("/api/v1/namespaces/x/events/e/status"),
            None,
            "events have no status"
        );
    }

    #[test]
    fn the_bearer_token_is_taken_from_its_header() {
        let req = |h: &str| {
            Request::builder()
                .header(AUTHORIZATION, h)
                .body(())
                .unwrap()
        };
        assert_eq!(bearer(&req("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&req("bearer abc ")), Some("abc"));
        assert_eq!(bearer(&req("Basic abc")), None);
        assert_eq!(bearer(&req("abc")), None);
    }
}
