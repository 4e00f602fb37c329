//! API conformance of the lab server, driven through kube-rs — the client
//! meshd uses — against an in-process server on loopback.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, Config, ResourceExt};
use meshlab::apiserver::{launch, Endpoint, Options, Running};
use serde_json::json;
use tokio::time::timeout;

struct Lab {
    server: Running,
    client: Client,
    _dir: tempfile::TempDir,
}

async fn server(options: Options) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = launch(
        vec![Endpoint {
            listener,
            kubeconfig: kubeconfig.clone(),
            advertise: None,
        }],
        options,
    )
    .unwrap();
    let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = Client::try_from(config).unwrap();
    Lab {
        server,
        client,
        _dir: dir,
    }
}

fn node(name: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDRs": ["198.19.1.0/24"]},
    }))
    .unwrap()
}

/// Creates nodes `{prefix}0` … `{prefix}{n-1}`.
async fn create_nodes(nodes: &Api<Node>, prefix: &str, n: usize) {
    for i in 0..n {
        nodes
            .create(&PostParams::default(), &node(&format!("{prefix}{i}")))
            .await
            .unwrap();
    }
}

fn annotate(key: &str, value: Option<&str>) -> Patch<serde_json::Value> {
    Patch::Merge(json!({"metadata": {"annotations": {key: value}}}))
}

const WAIT: Duration = Duration::from_secs(10);

/// Collects `n` non-bookmark events, failing with a clear message if they
/// don't arrive in time.
async fn next_events<S>(stream: &mut S, n: usize) -> Vec<WatchEvent<Node>>
where
    S: futures::Stream<Item = kube::Result<WatchEvent<Node>>> + Unpin,
{
    let mut out = Vec::new();
    while out.len() < n {
        let ev = timeout(WAIT, stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {n} watch events arrived within {WAIT:?}",
                    out.len()
                )
            })
            .expect("watch stream ended early")
            .expect("watch stream failed");
        if !matches!(ev, WatchEvent::Bookmark(_)) {
            out.push(ev);
        }
    }
    out
}

fn describe(ev: &WatchEvent<Node>) -> (String, String, u64) {
    let (typ, n) = match ev {
        WatchEvent::Added(n) => ("ADDED", n),
        WatchEvent::Modified(n) => ("MODIFIED", n),
        WatchEvent::Deleted(n) => ("DELETED", n),
        other => panic!("unexpected event {other:?}"),
    };
    let rv = n.resource_version().unwrap().parse().unwrap();
    (typ.to_string(), n.name_any(), rv)
}

#[tokio::test]
async fn list_then_watch_sees_every_change_once_in_order() {
    let lab = server(Options::default()).await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    nodes
        .create(&PostParams::default(), &node("before"))
        .await
        .unwrap();
    let list = nodes.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let rv = list.metadata.resource_version.unwrap();
    let mut stream = nodes
        .watch(&WatchParams::default().timeout(30), &rv)
        .await
        .unwrap()
        .boxed();

    let pp = PatchParams::default();
    let a = nodes
        .create(&PostParams::default(), &node("a"))
        .await
        .unwrap();
    let b = nodes
        .create(&PostParams::default(), &node("b"))
        .await
        .unwrap();
    let a2 = nodes
        .patch("a", &pp, &annotate("weft.dev/x", Some("1")))
        .await
        .unwrap();
    nodes.delete("b", &DeleteParams::default()).await.unwrap();
    let a3 = nodes
        .patch("a", &pp, &annotate("weft.dev/x", None))
        .await
        .unwrap();

    let seen: Vec<_> = next_events(&mut stream, 5)
        .await
        .iter()
        .map(describe)
        .collect();
    let kinds: Vec<_> = seen
        .iter()
        .map(|(t, n, _)| (t.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("ADDED", "a"),
            ("ADDED", "b"),
            ("MODIFIED", "a"),
            ("DELETED", "b"),
            ("MODIFIED", "a")
        ]
    );
    let rvs: Vec<u64> = seen.iter().map(|s| s.2).collect();
    assert!(
        rvs.windows(2).all(|w| w[0] < w[1]),
        "resourceVersions must increase: {rvs:?}"
    );
    let rv_of = |n: &Node| n.resource_version().unwrap().parse::<u64>().unwrap();
    assert_eq!(
        (rvs[0], rvs[1], rvs[2], rvs[4]),
        (rv_of(&a), rv_of(&b), rv_of(&a2), rv_of(&a3))
    );
    assert!(a3.annotations().get("weft.dev/x").is_none());
    lab.server.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_writers_each_change_seen_exactly_once() {
    let lab = server(Options::default()).await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    create_nodes(&nodes, "w", 3).await;
    let rv = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = nodes
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .unwrap()
        .boxed();
    const PER_WRITER: usize = 40;
    let writers: Vec<_> = (0..3)
        .map(|i| {
            let nodes = nodes.clone();
            tokio::spawn(async move {
                for j in 0..PER_WRITER {
                    let v = j.to_string();
                    nodes
                        .patch(
                            &format!("w{i}"),
                            &PatchParams::default(),
                            &annotate("n", Some(&v)),
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let events = next_events(&mut stream, 3 * PER_WRITER).await;
    let mut per_node: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut last = 0;
    for ev in &events {
        let (typ, name, rv) = describe(ev);
        assert_eq!(typ, "MODIFIED");
        assert!(rv > last, "events out of order");
        last = rv;
        let WatchEvent::Modified(n) = ev else {
            unreachable!()
        };
        let seq: u64 = n.annotations()["n"].parse().unwrap();
        per_node.entry(name).or_default().push(seq);
    }
    let want: Vec<u64> = (0..PER_WRITER as u64).collect();
    for (name, seqs) in per_node {
        assert_eq!(seqs, want, "{name}: every change once, in order");
    }
    lab.server.stop().await.unwrap();
}

#[tokio::test]
async fn watch_from_expired_version_gets_410() {
    let lab = server(Options {
        watch_log: 8,
        ..Options::default()
    })
    .await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    nodes
        .create(&PostParams::default(), &node("x"))
        .await
        .unwrap();
    let old = nodes.get("x").await.unwrap().resource_version().unwrap();
    for i in 0..20 {
        nodes
            .patch(
                "x",
                &PatchParams::default(),
                &annotate("i", Some(&i.to_string())),
            )
            .await
            .unwrap();
    }
    let mut stream = nodes
        .watch(&WatchParams::default().timeout(10), &old)
        .await
        .unwrap()
        .boxed();
    match timeout(WAIT, stream.next()).await.unwrap() {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    lab.server.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_updates_have_one_winner() {
    let lab = server(Options::default()).await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    let base = nodes
        .create(&PostParams::default(), &node("c"))
        .await
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (nodes, barrier, mut mine) = (nodes.clone(), barrier.clone(), base.clone());
            mine.labels_mut().insert("winner".into(), i.to_string());
            tokio::spawn(async move {
                barrier.wait().await;
                nodes.replace("c", &PostParams::default(), &mine).await
            })
        })
        .collect();
    let (mut ok, mut conflicts) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "Conflict" => conflicts += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!((ok, conflicts), (1, 15));
    lab.server.stop().await.unwrap();
}

#[tokio::test]
async fn patches_behave_as_on_a_real_server() {
    let lab = server(Options::default()).await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    let pp = PatchParams::default();
    nodes
        .create(&PostParams::default(), &node("p"))
        .await
        .unwrap();

    let merged = nodes
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"metadata": {"annotations": {"a": "1", "b": "2"}}})),
        )
        .await
        .unwrap();
    assert_eq!(merged.annotations().len(), 2);
    let strategic = nodes
        .patch(
            "p",
            &pp,
            &Patch::Strategic(json!({"metadata": {"annotations": {"a": null, "c": "3"}}})),
        )
        .await
        .unwrap();
    let keys: Vec<_> = strategic.annotations().keys().cloned().collect();
    assert_eq!(keys, ["b", "c"]);

    // Strategic merge on status conditions merges by type; merge patch replaces.
    let ready = |status: &str| json!({"type": "Ready", "status": status});
    let pressure = json!({"type": "MemoryPressure", "status": "False"});
    nodes
        .patch_status(
            "p",
            &pp,
            &Patch::Merge(json!({"status": {"conditions": [ready("False"), pressure]}})),
        )
        .await
        .unwrap();
    let s = nodes
        .patch_status(
            "p",
            &pp,
            &Patch::Strategic(json!({"status": {"conditions": [ready("True")]}})),
        )
        .await
        .unwrap();
    let conditions = s.status.unwrap().conditions.unwrap();
    let summary: Vec<_> = conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str()))
        .collect();
    assert_eq!(summary, [("Ready", "True"), ("MemoryPressure", "False")]);

    // A stale resourceVersion inside a patch is a precondition.
    let stale = Patch::Merge(json!({"metadata": {"resourceVersion": "1", "labels": {"x": "y"}}}));
    let err = nodes.patch("p", &pp, &stale).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409));

    // JSON patch: applied, and a failing `test` op is rejected without effect.
    let jp: json_patch::Patch =
        serde_json::from_value(json!([{"op": "add", "path": "/metadata/labels/j", "value": "k"}]))
            .unwrap();
    let patched = nodes.patch("p", &pp, &Patch::Json::<()>(jp)).await.unwrap();
    assert_eq!(patched.labels()["j"], "k");
    let failing: json_patch::Patch = serde_json::from_value(
        json!([{"op": "test", "path": "/metadata/labels/j", "value": "nope"}]),
    )
    .unwrap();
    let err = nodes
        .patch("p", &pp, &Patch::Json::<()>(failing))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 422));

    // The main resource ignores status; the status subresource ignores the rest.
    let mut body = nodes.get("p").await.unwrap();
    body.status.as_mut().unwrap().conditions = None;
    body.labels_mut().insert("main".into(), "yes".into());
    let replaced = nodes
        .replace("p", &PostParams::default(), &body)
        .await
        .unwrap();
    assert_eq!(replaced.labels()["main"], "yes");
    assert_eq!(replaced.status.unwrap().conditions.unwrap().len(), 2);
    lab.server.stop().await.unwrap();
}

#[tokio::test]
async fn errors_are_status_objects() {
    let lab = server(Options::default()).await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    let code = |r: kube::Result<Node>| match r {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    };
    assert_eq!(code(nodes.get("missing").await), (404, "NotFound".into()));
    nodes
        .create(&PostParams::default(), &node("dup"))
        .await
        .unwrap();
    assert_eq!(
        code(nodes.create(&PostParams::default(), &node("dup")).await),
        (409, "AlreadyExists".into())
    );
    let mut bad = node("bad");
    bad.labels_mut().insert("no spaces".into(), "v".into());
    assert_eq!(
        code(nodes.create(&PostParams::default(), &bad).await),
        (422, "Invalid".into())
    );
    let pols: Api<NetworkPolicy> = Api::namespaced(lab.client.clone(), "missing-ns");
    let np: NetworkPolicy =
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {}})).unwrap();
    match pols.create(&PostParams::default(), &np).await {
        Err(kube::Error::Api(s)) => assert_eq!(
            (s.code, s.message.as_str()),
            (404, "namespaces \"missing-ns\" not found")
        ),
        other => panic!("expected 404, got {other:?}"),
    }
    lab.server.stop().await.unwrap();
}

#[tokio::test]
async fn reflector_converges_and_many_watchers_are_served() {
    let lab = server(Options {
        bookmark_interval: Duration::from_millis(100),
        ..Options::default()
    })
    .await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    let (reader, writer) = reflector::store();
    let stream =
        reflector(writer, watcher(nodes.clone(), watcher::Config::default())).applied_objects();
    let runner = tokio::spawn(stream.try_for_each(|_| async { Ok(()) }));

    let mut watchers = Vec::new();
    for _ in 0..100 {
        watchers.push(
            nodes
                .watch(&WatchParams::default().timeout(30), "0")
                .await
                .unwrap()
                .boxed(),
        );
    }
    create_nodes(&nodes, "r", 5).await;
    nodes.delete("r0", &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // bookmarks flow meanwhile
    let wanted = ["r1", "r2", "r3", "r4"];
    let converged = timeout(WAIT, async {
        loop {
            let mut names: Vec<String> = reader.state().iter().map(|n| n.name_any()).collect();
            names.sort();
            if names == wanted {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        converged.is_ok(),
        "reflector did not converge to {wanted:?}: {:?}",
        reader.state().len()
    );
    for mut w in watchers {
        let evs = next_events(&mut w, 6).await;
        assert!(matches!(evs.last(), Some(WatchEvent::Deleted(n)) if n.name_any() == "r0"));
    }
    runner.abort();
    let stopped = timeout(Duration::from_secs(5), lab.server.stop()).await;
    assert!(
        stopped.is_ok(),
        "server did not stop within 5 s with watches open"
    );
}

#[tokio::test]
async fn namespaces_and_field_selectors() {
    let lab = server(Options::default()).await;
    let namespaces: Api<Namespace> = Api::all(lab.client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
    let created = namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    assert_eq!(created.labels()["kubernetes.io/metadata.name"], "x");
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert_eq!(
        names,
        [
            "default",
            "kube-node-lease",
            "kube-public",
            "kube-system",
            "x"
        ]
    );
    let only_x = namespaces
        .list(&ListParams::default().fields("metadata.name=x"))
        .await
        .unwrap();
    assert_eq!(only_x.items.len(), 1);
    let labelled = namespaces
        .list(&ListParams::default().labels("kubernetes.io/metadata.name in (x,default)"))
        .await
        .unwrap();
    assert_eq!(labelled.items.len(), 2);
    let bad = namespaces
        .list(&ListParams::default().fields("spec.nope=1"))
        .await
        .unwrap_err();
    assert!(matches!(bad, kube::Error::Api(s) if s.code == 400));
    lab.server.stop().await.unwrap();
}

#[tokio::test]
async fn dry_run_delete_collection_and_body_limit() {
    let lab = server(Options::default()).await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let echoed = nodes.create(&dry, &node("dry")).await.unwrap();
    assert_eq!(echoed.name_any(), "dry");
    assert!(
        nodes.get_opt("dry").await.unwrap().is_none(),
        "a dry run must not persist"
    );

    for (name, group) in [("g1", "a"), ("g2", "a"), ("g3", "b")] {
        let mut n = node(name);
        n.labels_mut().insert("group".into(), group.into());
        nodes.create(&PostParams::default(), &n).await.unwrap();
    }
    nodes
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("group=a"),
        )
        .await
        .unwrap();
    let left: Vec<String> = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .iter()
        .map(|n| n.name_any())
        .collect();
    assert_eq!(left, ["g3"]);

    let mut huge = node("huge");
    huge.annotations_mut()
        .insert("big".into(), "x".repeat(4 * 1024 * 1024));
    match nodes.create(&PostParams::default(), &huge).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 413),
        other => panic!("expected 413, got {other:?}"),
    }
    lab.server.stop().await.unwrap();
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_end() {
    let lab = server(Options::default()).await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    create_nodes(&nodes, "s", 3).await;
    // Streaming lists: sendInitialEvents=true; kube-runtime only finishes
    // its initial sync when the bookmark marked initial-events-end arrives.
    let mut events = watcher(nodes.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    let done = timeout(WAIT, async {
        while let Some(ev) = events.try_next().await.unwrap() {
            match ev {
                watcher::Event::InitApply(n) => initial.push(n.name_any()),
                watcher::Event::InitDone => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        done.is_ok(),
        "no initial-events-end bookmark; saw {initial:?}"
    );
    assert_eq!(initial, ["s0", "s1", "s2"]);
    lab.server.stop().await.unwrap();
}

#[tokio::test]
async fn twenty_nodes_claiming_blocks_at_once_get_distinct_ones() {
    let lab = server(Options::default()).await;
    let args = weft_meshd::node_blocks::BlockArgs {
        pod_cidr_source: weft_meshd::node_blocks::PodCidrSource::NodeOrBlocks,
        cluster: weft_meshd::model::ClusterCidrs {
            cluster_cidrs: vec![
                "198.19.0.0/16".parse().unwrap(),
                "fd98:19::/48".parse().unwrap(),
            ],
        },
        node_block_v4: 24,
        node_block_v6: 64,
        block_namespace: "kube-system".into(),
    };
    let node = |i: u32| weft_meshd::model::NodeInfo {
        name: format!("n{i}"),
        uid: format!("uid-{i}"),
        created: 0,
        internal_ips: Vec::new(),
        external_ips: vec![],
        spec_pod_cidrs: Vec::new(),
        annotations: Default::default(),
        placement: weft_meshd::model::Placement::anywhere(),
    };
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (client, args, me) = (lab.client.clone(), args.clone(), node(i));
            tokio::spawn(async move {
                weft_meshd::node_blocks::claim(&client, &args, &me, &[])
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut all = std::collections::BTreeSet::new();
    for t in tasks {
        let blocks = t.await.unwrap();
        assert_eq!(blocks.len(), 2, "one block per family");
        for b in blocks {
            assert!(all.insert(b), "{b} handed out twice");
        }
    }
    assert_eq!(all.len(), 40);
    // A repeated claim is answered from the claims without writing.
    let claims = |lab: &Lab| {
        let lab_client = lab.client.clone();
        async move {
            let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
                Api::namespaced(lab_client, "kube-system");
            cms.list(&Default::default())
                .await
                .unwrap()
                .items
                .iter()
                .map(|c| c.resource_version().unwrap())
                .collect::<Vec<_>>()
        }
    };
    let before = claims(&lab).await;
    assert_eq!(before.len(), 20, "one claim per node");
    weft_meshd::node_blocks::claim(&lab.client, &args, &node(3), &[])
        .await
        .unwrap();
    assert_eq!(claims(&lab).await, before, "steady state writes nothing");
    lab.server.stop().await.unwrap();
}

/// Protobuf bodies reach the decoder by their media type: a type the lab
/// does not decode gets 415 naming it (the client falls back to JSON), a
/// body that is not protobuf 400 naming what is wrong. (What the decoder
/// accepts: real_clients, with kubectl 1.33.)
#[tokio::test]
async fn protobuf_bodies_are_decoded_or_refused_by_type() {
    let lab = server(Options::default()).await;
    let namespaces: Api<Namespace> = Api::all(lab.client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some("pb".into());
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let send = |method: &str, path: &str, body: &[u8]| {
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/vnd.kubernetes.protobuf")
            .body(body.to_vec())
            .unwrap();
        let client = lab.client.clone();
        async move {
            match client.request::<serde_json::Value>(request).await {
                Err(kube::Error::Api(s)) => (s.code, s.message),
                other => panic!("expected an API error, got {other:?}"),
            }
        }
    };
    assert_eq!(
        send("POST", "/api/v1/namespaces/pb/pods", b"k8s\0").await,
        (
            415,
            "application/vnd.kubernetes.protobuf is not supported for Pod (v1) by the lab API server: send application/json".into()
        )
    );
    assert_eq!(
        send("POST", "/api/v1/namespaces/pb/configmaps", b"{}").await,
        (
            400,
            "the protobuf body does not start with the magic number k8s\\0".into()
        )
    );
    assert_eq!(
        send("DELETE", "/api/v1/namespaces/pb", b"k8s\0").await,
        (
            415,
            "application/vnd.kubernetes.protobuf is not supported for DeleteOptions (v1) by the lab API server: send application/json".into()
        )
    );
    lab.server.stop().await.unwrap();
}
