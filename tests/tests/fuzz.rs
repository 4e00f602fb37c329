//! Property-based fuzzing of every parser that reads untrusted input: other
//! nodes' annotations, the UAPI (replies and requests), CNI stdin and
//! environment, NetworkPolicy objects, and the lab API server's protobuf
//! request bodies. Each target generates inputs that are mostly
//! almost-valid (valid tokens, mangled and recombined) and
//! checks that nothing panics and that what is accepted keeps its
//! invariants. Input sizes are bounded, so memory is too.
//!
//! CI runs each target for `WEFT_FUZZ_SECONDS` (default 3); `tests/fuzz
//! SECONDS` runs them for as long as you like, in release mode. A failure
//! prints the input proptest shrank it to.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Runs `test` on inputs from `strategy` until the time budget is spent;
/// returns how many inputs were tried.
fn fuzz<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64
where
    S::Value: std::fmt::Debug,
{
    let budget: u64 = std::env::var("WEFT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let deadline = Instant::now() + Duration::from_secs(budget);
    let mut tried = 0u64;
    let mut round = 0u64;
    while Instant::now() < deadline {
        let config = Config {
            cases: 256,
            failure_persistence: None,
            rng_seed: proptest::test_runner::RngSeed::Fixed(
                round.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ budget,
            ),
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: {e}");
        }
        tried += 256;
        round += 1;
    }
    println!("{name}: {tried} inputs in {budget} s, no failure");
    tried
}

/// Text that is mostly made of `tokens`, sometimes mangled, sometimes noise.
fn text_from(tokens: Vec<&'static str>) -> impl Strategy<Value = String> {
    let token = prop_oneof![
        6 => proptest::sample::select(tokens),
        1 => Just(""),
        1 => "[ -~]{0,24}".prop_map(|s| Box::leak(s.into_boxed_str()) as &str),
    ];
    let piece = (
        token,
        prop_oneof![Just(""), Just(","), Just(" "), Just(":"), Just("/")],
    );
    prop_oneof![
        8 => proptest::collection::vec(piece, 0..6).prop_map(|ps| {
            ps.into_iter().map(|(t, sep)| format!("{t}{sep}")).collect::<String>()
        }),
        1 => "\\PC{0,64}",
        1 => (0usize..12_000).prop_map(|n| "9".repeat(n)),
    ]
}

mod annotations {
    use super::*;
    use weft_keys::{PrivateKey, ProofSubject};
    use weft_meshd::annotations::{parse, FORCE_ENDPOINT, KEY_PROOF, OWNED, PUBLIC_KEY, VERSION};
    use weft_meshd::model::{
        ClusterRanges, ClusterSnapshot, LocalConfig, NodeInfo, Placement, Ranges,
    };
    use weft_meshd::planner::{backstops, plan};

    /// The lab's ranges, through the same checks meshd's flags go through.
    fn ranges() -> ClusterRanges {
        use meshlab::lab::topology::{
            CLUSTER_V4, CLUSTER_V6, MESH_V4, MESH_V6, PEERS_V4, PEERS_V6,
        };
        let flag = |name, a: &str, b: &str| {
            Ranges::from_flag(name, &[a.parse().unwrap(), b.parse().unwrap()]).unwrap()
        };
        ClusterRanges {
            pods: flag("--cluster-cidr", CLUSTER_V4, CLUSTER_V6),
            mesh: flag("--mesh-cidr", MESH_V4, MESH_V6),
            peers: Some(flag("--peer-cidr", PEERS_V4, PEERS_V6)),
        }
    }

    fn value() -> impl Strategy<Value = String> {
        text_from(vec![
            "1",
            "2",
            "198.18.1.1:51820",
            "[fd00::1]:51820",
            "127.0.0.1:1",
            "[::ffff:10.0.0.1]:5",
            "198.19.1.0/24",
            "198.19.0.0/16",
            "8.8.8.0/24",
            "fd98:19:0:1::/64",
            "198.18.128.1",
            "198.18.128.65",
            "fd98:18::1",
            "fd98:18::8000:0:1",
            "0.0.0.0:0",
            "AK64kaURB7gIujba7uPpXZuBtMVJZA8BQwbhn1xWC2c=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "255.255.255.255:1",
            "n1,n2",
            "n0",
            "N1,-x",
            "n3,n3",
        ])
    }

    fn node() -> impl Strategy<Value = NodeInfo> {
        // Every annotation meshd writes, the admin's, and one it does not know.
        let keys: Vec<&str> = OWNED
            .iter()
            .copied()
            .chain([FORCE_ENDPOINT, "weft.dev/x"])
            .collect();
        let key = proptest::sample::select(keys);
        (
            proptest::collection::btree_map(key.prop_map(String::from), value(), 0..7),
            proptest::collection::vec(
                proptest::sample::select(vec![
                    "198.19.1.0/24",
                    "198.19.0.0/16",
                    "10.0.0.0/8",
                    "fd98:19:0:1::/64",
                ]),
                0..3,
            ),
            0i64..3,
            0u8..6,
            any::<[u8; 32]>(),
        )
            .prop_map(|(mut annotations, spec, created, n, key)| {
                let (name, uid) = (format!("n{n}"), format!("uid-{}", key[1] % 2));
                // Half the nodes carry a well-formed key, and most of those
                // its proof for this node, so parsing goes deep.
                if key[0] % 2 == 0 {
                    let private = PrivateKey::from_bytes(key);
                    annotations.insert(PUBLIC_KEY.into(), private.public_key().to_string());
                    if key[2] % 4 != 0 {
                        let subject = ProofSubject {
                            node: &name,
                            uid: "uid-0",
                        };
                        annotations.insert(KEY_PROOF.into(), private.prove(subject).to_string());
                    }
                    annotations
                        .entry(VERSION.into())
                        .or_insert_with(|| "2".into());
                }
                NodeInfo {
                    name,
                    uid,
                    created,
                    internal_ips: vec![],
                    external_ips: vec![],
                    spec_pod_cidrs: spec.iter().map(|c| c.parse().unwrap()).collect(),
                    annotations,
                    placement: Placement::anywhere(),
                }
            })
    }

    #[test]
    fn fuzz_annotations() {
        let r = ranges();
        fuzz(
            "annotations",
            proptest::collection::vec(node(), 1..6),
            |nodes| {
                for n in &nodes {
                    if let Ok(Some(claim)) = parse(n, &r, &n.spec_pod_cidrs) {
                        for p in claim.prefixes() {
                            prop_assert!(
                                r.all().any(|range| range.contains(&p)),
                                "{p} accepted outside the ranges"
                            );
                        }
                    }
                }
                let snapshot = ClusterSnapshot {
                    nodes: nodes.clone(),
                    ..Default::default()
                };
                let local = LocalConfig::new(&nodes[0].name, r);
                let d = plan(&snapshot, &local);
                prop_assert!(backstops(&r).is_subset(&d.routes));
                Ok(())
            },
        );
    }
}

mod uapi {
    use super::*;
    use std::collections::HashSet;
    use weft_dataplane::device::settings::Settings;
    use weft_dataplane::uapi::parse_set;

    fn message() -> impl Strategy<Value = String> {
        let key = proptest::sample::select(vec![
            "set",
            "get",
            "private_key",
            "listen_port",
            "fwmark",
            "replace_peers",
            "public_key",
            "remove",
            "update_only",
            "endpoint",
            "persistent_keepalive_interval",
            "preshared_key",
            "replace_allowed_ips",
            "allowed_ip",
            "protocol_version",
            "errno",
            "own_public_key",
            "last_handshake_time_sec",
            "last_handshake_time_nsec",
            "rx_bytes",
            "tx_bytes",
            "x",
        ]);
        let value = text_from(vec![
            "1",
            "0",
            "true",
            "false",
            "51820",
            "198.18.1.2:51820",
            "[fd00::1]:1",
            "10.0.0.0/8",
            "fd00::/64",
            "10.0.0.1/33",
            "-1",
            "99999999999999999999",
            "6161616161616161616161616161616161616161616161616161616161616161",
            "6262626262626262626262626262626262626262626262626262626262626262",
        ]);
        proptest::collection::vec((key, value), 0..24).prop_map(|lines| {
            let mut text: String = lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
            text.push('\n');
            text
        })
    }

    #[test]
    fn fuzz_uapi() {
        fuzz("uapi", (message(), message()), |(first, second)| {
            // Two requests in a row against the device's settings: whatever
            // parses, applying it keeps each prefix on at most one peer and
            // each key on at most one peer.
            let mut settings = Settings::default();
            for request in [first, second] {
                if let Ok(set) = parse_set(&format!("set=1\n{request}")) {
                    settings = settings.apply(&set);
                }
                let mut prefixes = HashSet::new();
                let mut keys = HashSet::new();
                for p in &settings.peers {
                    prop_assert!(keys.insert(p.public_key), "a key on two peers");
                    for ip in &p.allowed_ips {
                        prop_assert!(prefixes.insert(*ip), "{ip} on two peers");
                    }
                }
            }
            Ok(())
        });
    }
}

mod cni {
    use super::*;
    use weft_cni::config::{answer_version, parse};
    use weft_cni::spec::Env;

    fn stdin() -> impl Strategy<Value = Vec<u8>> {
        let version =
            proptest::sample::select(vec!["0.3.1", "0.4.0", "1.0.0", "1.1.0", "2.0.0", "", "1"]);
        let scalar = prop_oneof![
            Just(serde_json::json!(null)),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            "\\PC{0,16}".prop_map(|s| serde_json::json!(s)),
            Just(serde_json::json!({"ips": [{"address": "198.19.1.2/24"}]})),
            Just(serde_json::json!([1, "a", null])),
        ];
        let field = proptest::sample::select(vec![
            "name",
            "type",
            "mtu",
            "stateFile",
            "ipamDir",
            "prevResult",
            "runtimeConfig",
            "args",
            "extra",
        ]);
        (
            version,
            proptest::collection::btree_map(field, scalar, 0..6),
            any::<u8>(),
        )
            .prop_map(|(v, fields, mangle)| {
                let mut conf = serde_json::json!({"cniVersion": v, "name": "weft", "type": "weft"});
                for (k, val) in fields {
                    conf[k] = val;
                }
                let mut bytes = conf.to_string().into_bytes();
                // Now and then, not JSON at all.
                if mangle % 7 == 0 && !bytes.is_empty() {
                    let n = bytes.len() / 2;
                    bytes.truncate(n);
                }
                bytes
            })
    }

    fn env() -> impl Strategy<Value = BTreeMap<String, String>> {
        let key = proptest::sample::select(vec![
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_ARGS",
            "CNI_PATH",
        ]);
        let value = text_from(vec![
            "ADD",
            "DEL",
            "CHECK",
            "VERSION",
            "STATUS",
            "GC",
            "abc123",
            "/run/netns/x",
            "eth0",
            "IgnoreUnknown=1;K8S_POD_NAME=a;K8S_POD_NAMESPACE=b",
            "a=b;;=c;d",
            "../../etc",
            "0123456789abcdef",
            "eth0eth0eth0eth0",
        ]);
        proptest::collection::btree_map(key.prop_map(String::from), value, 0..6)
    }

    #[test]
    fn fuzz_cni() {
        fuzz("cni", (stdin(), env()), |(stdin, env)| {
            let _ = answer_version(&stdin);
            let _ = parse(&stdin);
            if let Ok(e) = Env::from_vars(&env) {
                // What is accepted is usable as is: no path tricks in names.
                prop_assert!(!e.container_id.contains('/'));
                prop_assert!(e.ifname.len() <= 15 && !e.ifname.contains('/'));
            }
            Ok(())
        });
    }
}

mod protobuf {
    use super::*;
    use meshlab::apiserver::protobuf::{decode, schema::TYPES};

    fn varint(mut n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out
    }

    /// Fields numbered as the schema's are (1-17), with any wire type,
    /// nested up to three deep: mostly well-formed, sometimes not.
    fn message() -> impl Strategy<Value = Vec<u8>> {
        let key = (1u64..18, 0u64..8).prop_map(|(n, w)| varint(n << 3 | w));
        let leaf = prop_oneof![
            (key.clone(), any::<u64>()).prop_map(|(k, v)| [k, varint(v)].concat()),
            (key.clone(), "\\PC{0,12}")
                .prop_map(|(k, s)| { [k, varint(s.len() as u64), s.into_bytes()].concat() }),
            proptest::collection::vec(any::<u8>(), 0..8),
        ];
        leaf.prop_recursive(3, 64, 6, move |inner| {
            (key.clone(), proptest::collection::vec(inner, 0..6)).prop_map(|(k, fields)| {
                let body = fields.concat();
                [k, varint(body.len() as u64), body].concat()
            })
        })
    }

    #[test]
    fn fuzz_protobuf_bodies() {
        let types = 0..TYPES.len();
        let bodies = (
            types,
            proptest::collection::vec(message(), 0..8),
            any::<u16>(),
        );
        fuzz("protobuf", bodies, |(i, fields, cut)| {
            let raw = fields.concat();
            let mut body = [&b"k8s\0"[..], &[0x12], &varint(raw.len() as u64), &raw].concat();
            // Now and then, cut short.
            if cut % 5 == 0 {
                body.truncate(usize::from(cut) % (body.len() + 1));
            }
            let gvk = TYPES[i].0;
            if let Ok(object) = decode(&body, gvk) {
                prop_assert_eq!(object["kind"].as_str(), Some(gvk.kind));
            }
            Ok(())
        });
    }
}

mod policy {
    use super::*;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use serde_json::{json, Value};
    use weft_policy::render::{render, Options};
    use weft_policy::{compile, Identity, NamespaceInfo, PodInfo};

    fn selector() -> impl Strategy<Value = Value> {
        let label = proptest::sample::select(vec!["app", "pod", "ns", "", "a/b", "x.y/z"]);
        let val = proptest::sample::select(vec!["a", "b", "", "web", "-bad-"]);
        let op = proptest::sample::select(vec!["In", "NotIn", "Exists", "DoesNotExist", "Bogus"]);
        prop_oneof![
            Just(json!({})),
            proptest::collection::btree_map(label.clone(), val.clone(), 0..3)
                .prop_map(|m| json!({"matchLabels": m})),
            (label, op, proptest::collection::vec(val, 0..3)).prop_map(
                |(k, o, v)| json!({"matchExpressions": [{"key": k, "operator": o, "values": v}]})
            ),
        ]
    }

    fn peer() -> impl Strategy<Value = Value> {
        let cidr = proptest::sample::select(vec![
            "10.0.0.0/8",
            "198.19.1.5/32",
            "0.0.0.0/0",
            "::/0",
            "fd98:19::/48",
            "10.0.0.1/8",
            "nonsense",
            "10.0.0.0/99",
        ]);
        prop_oneof![
            selector().prop_map(|s| json!({"podSelector": s})),
            selector().prop_map(|s| json!({"namespaceSelector": s})),
            (selector(), selector())
                .prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
            (cidr.clone(), proptest::collection::vec(cidr, 0..3))
                .prop_map(|(c, e)| json!({"ipBlock": {"cidr": c, "except": e}})),
        ]
    }

    fn port() -> impl Strategy<Value = Value> {
        let protocol = proptest::sample::select(vec!["TCP", "UDP", "SCTP", "ICMP", "", "tcp"]);
        let number = prop_oneof![
            (0i64..70_000).prop_map(|n| json!(n)),
            proptest::sample::select(vec!["http", "serve-80-tcp", "", "a-very-long-port-name-x"])
                .prop_map(|s| json!(s)),
        ];
        (protocol, number, proptest::option::of(-5i32..70_000)).prop_map(|(p, n, end)| {
            let mut port = json!({"protocol": p, "port": n});
            if let Some(e) = end {
                port["endPort"] = json!(e);
            }
            port
        })
    }

    fn rule(side: &'static str) -> impl Strategy<Value = Value> {
        (
            proptest::option::of(proptest::collection::vec(peer(), 0..3)),
            proptest::option::of(proptest::collection::vec(port(), 0..3)),
        )
            .prop_map(move |(peers, ports)| {
                let mut r = json!({});
                if let Some(p) = peers {
                    r[side] = json!(p);
                }
                if let Some(p) = ports {
                    r["ports"] = json!(p);
                }
                r
            })
    }

    fn policy() -> impl Strategy<Value = Value> {
        let types = proptest::sample::subsequence(vec!["Ingress", "Egress", "Bogus"], 0..3);
        (
            proptest::sample::select(vec!["x", "y"]),
            selector(),
            proptest::option::of(proptest::collection::vec(rule("from"), 0..3)),
            proptest::option::of(proptest::collection::vec(rule("to"), 0..3)),
            proptest::option::of(types),
            0u8..4,
        )
            .prop_map(|(ns, sel, ingress, egress, types, n)| {
                let mut spec = json!({"podSelector": sel});
                if let Some(i) = ingress {
                    spec["ingress"] = json!(i);
                }
                if let Some(e) = egress {
                    spec["egress"] = json!(e);
                }
                if let Some(t) = types {
                    spec["policyTypes"] = json!(t);
                }
                json!({"metadata": {"name": format!("p{n}"), "namespace": ns}, "spec": spec})
            })
    }

    fn world() -> (Vec<PodInfo>, Vec<NamespaceInfo>) {
        let pods = ["x/a", "x/b", "y/a"]
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let (namespace, name) = key.split_once('/').unwrap();
                PodInfo {
                    identity: Identity::Api,
                    namespace: namespace.into(),
                    name: name.into(),
                    node: if i == 2 { "n2".into() } else { "n1".into() },
                    labels: BTreeMap::from([("app".into(), name.into())]),
                    ips: vec![format!("198.19.1.{}", i + 2).parse().unwrap()],
                    ports: vec![weft_policy::NamedPort {
                        name: "http".into(),
                        port: 80,
                        protocol: weft_policy::Protocol::Tcp,
                    }],
                }
            })
            .collect();
        let namespaces = ["x", "y"]
            .iter()
            .map(|n| NamespaceInfo {
                name: n.to_string(),
                labels: BTreeMap::from([("ns".into(), n.to_string())]),
            })
            .collect();
        (pods, namespaces)
    }

    #[test]
    fn fuzz_network_policy() {
        let (pods, namespaces) = world();
        fuzz(
            "network policy",
            proptest::collection::vec(policy(), 0..4),
            |objects| {
                // What the API server would hand over: anything that decodes.
                let policies: Vec<NetworkPolicy> = objects
                    .into_iter()
                    .filter_map(|v| serde_json::from_value(v).ok())
                    .collect();
                let program = compile("n1", &policies, Default::default(), &pods, &namespaces);
                let _ = render(
                    &program,
                    &Options {
                        log_per_second: Some(5),
                    },
                );
                Ok(())
            },
        );
    }
}
