use super::*;

const INTERVAL: Duration = Duration::from_secs(120);

struct End {
    key: PrivateKey,
    link: Link,
    installed: Vec<Agreed>,
}

/// Two nodes' keys and each one's view of the pair.
fn pair_keys() -> (PrivateKey, PrivateKey, PairKey, PairKey) {
    let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
    let ab = PairKey::new(&a, &b.public_key()).unwrap();
    let ba = PairKey::new(&b, &a.public_key()).unwrap();
    (a, b, ab, ba)
}

/// Two ends, `a` leading; `wire` decides which datagrams arrive.
struct Pair2 {
    a: End,
    b: End,
    now: Instant,
}

impl Pair2 {
    fn new() -> Self {
        let now = Instant::now();
        let (a, b, ab, ba) = pair_keys();
        Pair2 {
            a: End {
                key: a,
                link: Link::new(ab, true, INTERVAL, now),
                installed: Vec::new(),
            },
            b: End {
                key: b,
                link: Link::new(ba, false, INTERVAL, now),
                installed: Vec::new(),
            },
            now,
        }
    }

    /// Hands `message` from one end to the other.
    fn receive(&mut self, to_b: bool, message: Message) -> Out {
        let to = if to_b { &mut self.b } else { &mut self.a };
        let out = to.link.receive(message, self.now);
        to.installed.extend(out.install.clone());
        out
    }

    /// Delivers `bytes` from one end to the other; returns the answers.
    fn deliver(&mut self, to_b: bool, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.receive(to_b, Message::decode(bytes).unwrap()).send
    }

    /// Runs the exchange to rest, dropping the datagrams `lose` picks (by
    /// their order on the wire).
    fn run(&mut self, lose: &dyn Fn(usize, &[u8]) -> bool, seconds: u64) {
        let mut sent = 0usize;
        for _ in 0..seconds * 4 {
            self.now += Duration::from_millis(250);
            let mut queue: Vec<(bool, Vec<u8>)> = Vec::new();
            for (to_b, end) in [(true, &mut self.a), (false, &mut self.b)] {
                let out = end.link.tick(self.now);
                end.installed.extend(out.install);
                queue.extend(out.send.into_iter().map(|m| (to_b, m)));
            }
            while let Some((to_b, bytes)) = queue.pop() {
                sent += 1;
                if lose(sent, &bytes) {
                    continue;
                }
                for answer in self.deliver(to_b, &bytes) {
                    queue.push((!to_b, answer));
                }
            }
        }
    }
}

fn kind(bytes: &[u8]) -> &'static str {
    Message::decode(bytes).unwrap().kind()
}

#[test]
fn the_leader_offers_and_both_install_the_same_key() {
    let mut p = Pair2::new();
    p.run(&|_, _| false, 2);
    assert_eq!(p.a.installed.len(), 1);
    assert_eq!(p.b.installed.len(), 1);
    assert_eq!(p.a.installed[0].psk, p.b.installed[0].psk);
    assert_eq!(p.a.installed[0].epoch, 1);
    // Nothing more until the interval has passed; then a new key.
    p.run(&|_, _| false, 60);
    assert_eq!(p.a.installed.len(), 1);
    p.run(&|_, _| false, 62);
    assert_eq!(p.a.installed.len(), 2);
    assert_eq!(p.b.installed.len(), 2);
    assert_eq!(p.a.installed[1].psk, p.b.installed[1].psk);
    assert_ne!(p.a.installed[1].psk, p.a.installed[0].psk);
    assert_eq!(p.b.installed[1].epoch, 2);
}

/// Whatever single message is lost, both ends end up with the same key:
/// each is sent again until answered, and a repeat is answered the same.
#[test]
fn any_lost_message_is_sent_again_and_both_agree() {
    for lost in ["offer", "accept", "confirm", "done"] {
        let mut p = Pair2::new();
        let dropped = std::cell::Cell::new(false);
        p.run(&|_, bytes| kind(bytes) == lost && !dropped.replace(true), 5);
        assert!(dropped.get(), "a {lost} was sent");
        assert_eq!(p.a.installed.len(), 1, "{lost} lost: the leader installs");
        assert_eq!(
            p.b.installed.len(),
            1,
            "{lost} lost: the other end installs"
        );
        assert_eq!(p.a.installed[0].psk, p.b.installed[0].psk, "{lost} lost");
    }
}

/// The other end starts an exchange itself when the leader is silent
/// (restarted, or its first offers lost), and offers crossing on the wire
/// settle on the leader's.
#[test]
fn the_other_end_starts_when_the_leader_is_silent_and_crossing_offers_settle() {
    let mut p = Pair2::new();
    // Every offer from the leader is lost for a while: b's own offer after
    // its 3 s grace is what agrees the key (a answers it).
    p.run(
        &|n, bytes| n < 12 && kind(bytes) == "offer" && n % 2 == 1,
        12,
    );
    assert_eq!(p.a.installed.len(), 1);
    assert_eq!(p.a.installed[0].psk, p.b.installed[0].psk);

    // Both offer at the same instant: the leader ignores the other's
    // offer, the other drops its own and answers; one key results.
    let mut p = Pair2::new();
    p.now += Duration::from_secs(10);
    let a = p.a.link.tick(p.now).send;
    let b = p.b.link.tick(p.now).send;
    assert_eq!((a.len(), b.len()), (1, 1), "both offered");
    assert!(
        p.deliver(false, &b[0]).is_empty(),
        "the leader ignores the other's offer"
    );
    let accept = p.deliver(true, &a[0]);
    let confirm = p.deliver(false, &accept[0]);
    let done = p.deliver(true, &confirm[0]);
    p.deliver(false, &done[0]);
    assert_eq!(p.a.installed.len(), 1);
    assert_eq!(p.a.installed[0].psk, p.b.installed[0].psk);
}

impl Pair2 {
    /// An offer from b as b's node would make it (a fresh exchange).
    fn offer_from_b(&self, epoch: u64) -> Message {
        let ba = PairKey::new(&self.b.key, &self.a.key.public_key()).unwrap();
        pq::initiate(&ba, epoch).1
    }

    /// Runs a's offer through to both installs.
    fn complete(&mut self, offer: &[u8]) {
        let accept = self.deliver(true, offer);
        let confirm = self.deliver(false, &accept[0]);
        let done = self.deliver(true, &confirm[0]);
        self.deliver(false, &done[0]);
    }
}

/// An accept made without b's key is refused and reported; the exchange
/// goes on and completes with the real answer. So is an offer that is not
/// b's (no pair MAC), before any costly work, and a confirm nobody asked
/// for.
#[test]
fn forged_messages_are_refused_and_the_exchange_goes_on() {
    let mut p = Pair2::new();
    p.now += Duration::from_millis(250);
    let offer = p.a.link.tick(p.now).send.remove(0);
    // Another pair's exchange, at a's epoch: a well-formed accept.
    let (_, _, xy, yx) = pair_keys();
    let (_, x_offer) = pq::initiate(&xy, 1);
    let Message::Offer { ek, e, mac, .. } = x_offer else {
        panic!()
    };
    let (forged, _) = pq::respond(&yx, 1, &ek, &e, &mac).unwrap();
    let out = p.receive(false, forged);
    assert!(out.send.is_empty() && out.install.is_none());
    assert!(matches!(out.failed, Some(Failure::Refused(why)) if why.contains("accept refused")));
    // An offer with another pair's MAC, as if from b's address.
    let (_, x_offer) = pq::initiate(&xy, 5);
    let out = p.receive(true, x_offer);
    assert!(out.send.is_empty());
    assert!(matches!(out.failed, Some(Failure::Refused(why)) if why.contains("offer")));
    p.complete(&offer);
    assert_eq!(p.a.installed[0].psk, p.b.installed[0].psk);
    let Message::Confirm { tag, .. } = p.a.installed[0].confirm() else {
        panic!()
    };
    let out = p.receive(true, Message::Confirm { epoch: 9, tag });
    assert!(out.install.is_none() && out.failed.is_some());
}

/// An offer reaching the initiator between its confirm and the
/// acknowledgement (b restarted, or a replay) is ignored: taking it would
/// drop the acknowledgement b's install waits on, and split the pair.
#[test]
fn an_offer_mid_exchange_splits_nothing() {
    let mut p = Pair2::new();
    p.now += Duration::from_millis(250);
    let offer = p.a.link.tick(p.now).send.remove(0);
    let accept = p.deliver(true, &offer);
    let confirm = p.deliver(false, &accept[0]);
    let stray = p.offer_from_b(9);
    assert!(
        p.receive(false, stray).send.is_empty(),
        "ignored while confirming"
    );
    let done = p.deliver(true, &confirm[0]);
    p.deliver(false, &done[0]);
    assert_eq!(p.a.installed.len(), p.b.installed.len());
    assert_eq!(p.a.installed[0].psk, p.b.installed[0].psk);
}

/// A peer's epoch is a label: the highest there is neither overflows this
/// end's count nor is taken over.
#[test]
fn a_peer_s_epoch_is_only_a_label() {
    let mut p = Pair2::new();
    let huge = p.offer_from_b(u64::MAX);
    assert_eq!(p.receive(false, huge).send.len(), 1, "answered");
    p.run(&|_, _| false, 20);
    assert!(p.a.installed.iter().all(|k| k.epoch < 10));
}

/// New offers from one peer are answered at most every 250 ms (each is an
/// ML-KEM encapsulation); a repeat of the one answered gets the same
/// answer, whenever it comes.
#[test]
fn offers_are_answered_at_a_bounded_rate() {
    let mut p = Pair2::new();
    let first = p.offer_from_b(1).encode();
    let answer = p.deliver(false, &first);
    assert_eq!(answer.len(), 1);
    assert!(
        p.receive(false, p.offer_from_b(2)).send.is_empty(),
        "too soon"
    );
    assert_eq!(
        p.deliver(false, &first),
        answer,
        "a repeat: the same accept"
    );
    p.now += ANSWER_EVERY;
    assert_eq!(p.receive(false, p.offer_from_b(3)).send.len(), 1);
}

#[test]
fn an_unanswered_offer_is_given_up_and_tried_again_later() {
    let mut p = Pair2::new();
    p.run(&|_, bytes| kind(bytes) == "offer", 6);
    assert!(p.a.installed.is_empty());
    assert!(p.a.link.failures() >= 1);
    // The link heals: the next try agrees.
    p.run(&|_, _| false, 10);
    assert_eq!(p.a.installed.len(), 1);
    assert_eq!(p.a.link.failures(), 0);
}

fn key(n: u8) -> PublicKey {
    PublicKey::from_bytes([n; 32])
}

fn peer(node: &str, mesh: &str, allowed: &[&str]) -> Peer {
    Peer {
        node: node.into(),
        kind: crate::model::PeerKind::Node,
        endpoint: None,
        offers: Vec::new(),
        allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
        mesh_addresses: vec![mesh.parse().unwrap()],
        persistent_keepalive: None,
        replaces: None,
        preshared_key: None,
        key_ends_sessions: false,
    }
}

fn stat(k: PublicKey, handshake: Option<SystemTime>) -> PeerStats {
    PeerStats {
        key: k,
        endpoint: None,
        last_handshake: handshake,
        rx_bytes: 0,
        tx_bytes: 0,
        routes_its_endpoint: false,
    }
}

/// Which entries get a key, and (with `require`) which carry more than
/// their node's own mesh address, by the pair's state.
#[test]
fn entries_get_keys_and_require_opens_only_live_pairs() {
    let now = SystemTime::now();
    let t = |secs_ago: u64| now - Duration::from_secs(secs_ago);
    let plan = || {
        BTreeMap::from([
            // node-2: direct, and relays node-4.
            (
                key(2),
                peer(
                    "node-2",
                    "100.64.0.2",
                    &[
                        "100.64.0.2/32",
                        "10.2.0.0/24",
                        "100.64.0.4/32",
                        "10.4.0.0/24",
                    ],
                ),
            ),
            (
                key(3),
                peer("node-3", "100.64.0.3", &["100.64.0.3/32", "10.3.0.0/24"]),
            ),
            // node-4: relayed (its addresses are on node-2's entry).
            (key(4), peer("node-4", "100.64.0.4", &[])),
            (
                key(5),
                peer("node-5", "100.64.0.5", &["100.64.0.5/32", "10.5.0.0/24"]),
            ),
            (
                key(6),
                peer("node-6", "100.64.0.6", &["100.64.0.6/32", "10.6.0.0/24"]),
            ),
            (
                key(7),
                peer("node-7", "100.64.0.7", &["100.64.0.7/32", "10.7.0.0/24"]),
            ),
        ])
    };
    let psk = |n: u8| PresharedKey::from_bytes([n; 32]);
    let table = Table::from([
        // Agreed 10 s ago, handshaken since: live.
        (
            "node-2".to_string(),
            Installed {
                epoch: 3,
                psk: psk(2),
                at: t(10),
            },
        ),
        // Agreed 5 s ago, last handshake before that: pending.
        (
            "node-3".to_string(),
            Installed {
                epoch: 1,
                psk: psk(3),
                at: t(5),
            },
        ),
        (
            "node-4".to_string(),
            Installed {
                epoch: 1,
                psk: psk(4),
                at: t(20),
            },
        ),
        // Agreed long ago, no handshake since: stale, classical.
        (
            "node-5".to_string(),
            Installed {
                epoch: 7,
                psk: psk(5),
                at: t(400),
            },
        ),
        (
            "node-6".to_string(),
            Installed {
                epoch: 2,
                psk: psk(6),
                at: t(3),
            },
        ),
        (
            "node-7".to_string(),
            Installed {
                epoch: 9,
                psk: psk(7),
                at: t(4),
            },
        ),
    ]);
    // Handshakes as read after the keys were given (a first key restarts
    // the entries: what they report came after).
    let stats = vec![
        stat(key(2), Some(t(2))),
        stat(key(3), None),
        stat(key(4), Some(t(1))),
        stat(key(5), Some(t(390))),
        stat(key(6), Some(t(1))),
        stat(key(7), None),
    ];
    let first = |psk| Given {
        psk,
        after_key: false,
    };
    let given = BTreeMap::from([
        // A first key, handshaken since: live.
        ("node-2".to_string(), first(psk(2))),
        // A first key, no session yet: pending.
        ("node-3".to_string(), first(psk(3))),
        ("node-4".to_string(), first(psk(4))),
        ("node-5".to_string(), first(psk(5))),
        // A newer key agreed, not yet given: the device's key decides.
        ("node-6".to_string(), first(psk(9))),
        // It replaced a key: live before its own handshake.
        (
            "node-7".to_string(),
            Given {
                psk: psk(7),
                after_key: true,
            },
        ),
    ]);
    let memory = Memory {
        given,
        dropped: BTreeMap::new(),
    };
    let hs = handshakes(&plan(), &stats);
    let states = states(&plan(), &table, &memory, &hs, &BTreeSet::new(), now);
    assert_eq!(
        states,
        BTreeMap::from([
            ("node-2".to_string(), State::Live),
            ("node-3".to_string(), State::Pending),
            // node-4 is relayed: no state of its own (its traffic crosses
            // node-2's link).
            ("node-5".to_string(), State::Classical),
            ("node-6".to_string(), State::Live),
            ("node-7".to_string(), State::Live),
        ])
    );
    let allowed = |p: &BTreeMap<PublicKey, Peer>, k: u8| -> Vec<String> {
        p[&key(k)]
            .allowed_ips
            .iter()
            .map(ToString::to_string)
            .collect()
    };

    let mut off = plan();
    shape(&mut off, &table, &states, Mode::Off);
    assert_eq!(off, plan(), "off changes nothing");

    let mut prefer = plan();
    shape(&mut prefer, &table, &states, Mode::Prefer);
    assert_eq!(prefer[&key(2)].preshared_key, Some(psk(2)));
    assert_eq!(
        prefer[&key(3)].preshared_key,
        Some(psk(3)),
        "pending: the next handshake takes it"
    );
    assert_eq!(
        prefer[&key(5)].preshared_key,
        None,
        "a stale key is dropped"
    );
    assert_eq!(
        allowed(&prefer, 3),
        allowed(&plan(), 3),
        "prefer never narrows"
    );

    let mut require = plan();
    shape(&mut require, &table, &states, Mode::Require);
    assert_eq!(
        allowed(&require, 2),
        allowed(&plan(), 2),
        "live: everything"
    );
    assert_eq!(
        allowed(&require, 3),
        vec!["100.64.0.3/32"],
        "pending: its mesh address only"
    );
    assert_eq!(allowed(&require, 5), vec!["100.64.0.5/32"]);
    assert!(
        allowed(&require, 4).is_empty(),
        "a relayed node's entry gains nothing"
    );
    // A relay that is not live drops the nodes it carries.
    let states_2_pending = BTreeMap::from([("node-2".to_string(), State::Pending)]);
    let mut relay = plan();
    shape(&mut relay, &table, &states_2_pending, Mode::Require);
    assert_eq!(allowed(&relay, 2), vec!["100.64.0.2/32"]);
    // A node with no key at all under require: its mesh address only.
    let mut none = plan();
    shape(&mut none, &Table::new(), &BTreeMap::new(), Mode::Require);
    assert_eq!(allowed(&none, 2), vec!["100.64.0.2/32"]);
    assert_eq!(none[&key(2)].preshared_key, None);

    // A link reported down goes back to no key (the two ends may hold
    // different ones), and its key is not given again once it is up: only
    // the next exchange's is.
    let down = BTreeSet::from(["node-2".to_string()]);
    let mut memory = memory;
    let when_down = super::states(&plan(), &table, &memory, &hs, &down, now);
    assert_eq!(when_down["node-2"], State::Classical);
    memory.drop_down(&table, &down);
    let up_again = super::states(&plan(), &table, &memory, &hs, &BTreeSet::new(), now);
    assert_eq!(
        up_again["node-2"],
        State::Classical,
        "the dropped key stays dropped"
    );
    let mut next = table.clone();
    next.get_mut("node-2").unwrap().psk = psk(20);
    memory.drop_down(&next, &BTreeSet::new());
    assert!(memory.dropped.is_empty(), "forgotten once replaced");
    memory.given.remove("node-2");
    let fresh = super::states(&plan(), &next, &memory, &hs, &BTreeSet::new(), now);
    assert_eq!(fresh["node-2"], State::Pending, "a first key again");
}

/// A first key is no key's successor; the next is; a key dropped (stale,
/// classical) makes the one after a first key again.
#[test]
fn the_device_s_keys_are_followed_from_first_to_next() {
    let mut plan = BTreeMap::from([(key(2), peer("node-2", "100.64.0.2", &[]))]);
    let with = |plan: &mut BTreeMap<PublicKey, Peer>, k: Option<u8>| {
        plan.get_mut(&key(2)).unwrap().preshared_key = k.map(|k| PresharedKey::from_bytes([k; 32]));
    };
    with(&mut plan, Some(1));
    let g = given(BTreeMap::new(), &plan);
    assert!(!g["node-2"].after_key, "a first key");
    let g = given(g, &plan);
    assert!(!g["node-2"].after_key, "the same key stays a first key");
    with(&mut plan, Some(2));
    let g = given(g, &plan);
    assert!(g["node-2"].after_key, "a next key");
    with(&mut plan, None);
    let g = given(g, &plan);
    assert!(g.is_empty());
    with(&mut plan, Some(3));
    assert!(
        !given(g, &plan)["node-2"].after_key,
        "first again after none"
    );
}
