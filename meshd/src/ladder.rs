//! Which of a peer's addresses this node sends to: the best the planner
//! offers ([`crate::planner::nat::offers`]) that answers.
//!
//! The planner sends to the best offer this node has not given up on. Once
//! the data plane is given it, the address is on trial: an authenticated
//! packet from the peer (bytes received, or a handshake completed) confirms
//! it; none within the trial's window, and it is given up, so the next plan
//! sends to the next offer. A confirmed address whose link goes down
//! ([`crate::liveness`]) is given up if the peer is not heard again within
//! a window, so a path that stops working is re-evaluated and a blip
//! changes nothing. Once every offer is given up, the peer starts over from
//! its best with a window twice as long (up to [`MAX_DOUBLINGS`] times),
//! so an unreachable peer's addresses are cycled ever more slowly — each
//! change is published ([`crate::annotations::GIVEN_UP`]).
//!
//! A peer heard from another of its addresses than the one planned is
//! followed there: WireGuard already sends to where its packets come from
//! (roaming), so the addresses before that one are taken as given up and
//! the plan agrees with the data plane. Two ends that started apart (one
//! gave the other's best address up while the other was not yet running)
//! so meet at the one the later end tries. A worse address that works is
//! otherwise kept until it stops working: trying a better one would risk
//! the traffic on it. Pure: the caller supplies the clock and the readings.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::annotations::GivenUp;
use crate::liveness::Reading;

/// A trial's window doubles at most this many times (8 windows: 200 s
/// with the shipped keepalive), so a pair that had nothing working finds
/// the address that works again within that once the network heals.
pub const MAX_DOUBLINGS: u32 = 3;

/// The window for an address on trial: two keepalive intervals (the peer's
/// next keepalive may go to an address of ours that no longer works, and
/// ours must reach it first so that it roams back) plus WireGuard's
/// handshake retry (`REKEY_TIMEOUT`).
pub fn trial_window(keepalive: Duration) -> Duration {
    keepalive * 2 + Duration::from_secs(5)
}

/// What the plan says of a peer.
#[derive(Debug, Clone, Copy)]
pub struct Planned<'a> {
    /// Best first.
    pub offers: &'a [SocketAddr],
    /// What the data plane was given.
    pub endpoint: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Trial {
    at: SocketAddr,
    since: Instant,
    /// Received bytes and last handshake when the trial began.
    heard: (u64, u64),
    state: TrialState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrialState {
    /// No authenticated answer yet.
    Trying,
    Confirmed,
    /// Confirmed, then its link went down at `since`, with these counters:
    /// given up unless the peer is heard again within a window (a blip
    /// does not send a pair to a worse address for good).
    Doubted {
        since: Instant,
        heard: (u64, u64),
    },
}

/// What the data plane says of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub reading: Reading,
    /// Where it sends to: the planned address, or where the peer's packets
    /// last came from.
    pub endpoint: Option<SocketAddr>,
}

#[derive(Debug, Clone, Default)]
struct Rungs {
    /// Received bytes and last handshake at the last look.
    last: (u64, u64),
    trial: Option<Trial>,
    given_up: BTreeSet<SocketAddr>,
    /// Times every offer was given up since one was last confirmed.
    rounds: u32,
    /// When the plan last followed the data plane to another address: at
    /// most once a window, so a peer alternating its source addresses
    /// cannot make this node republish on every look.
    followed: Option<Instant>,
}

/// Each peer's trial and the addresses given up.
#[derive(Debug, Clone, Default)]
pub struct Ladder {
    peers: BTreeMap<String, Rungs>,
    /// The peers down at the last look: going down is news only once.
    down: BTreeSet<String>,
}

impl Ladder {
    /// The addresses given up, per peer (the planner's input).
    pub fn given_up(&self) -> GivenUp {
        self.peers
            .iter()
            .filter(|(_, r)| !r.given_up.is_empty())
            .map(|(name, r)| (name.clone(), r.given_up.clone()))
            .collect()
    }

    /// The address each peer answered at, while it has not been given up
    /// (the planner keeps it while it is offered).
    pub fn confirmed(&self) -> BTreeMap<String, SocketAddr> {
        self.peers
            .iter()
            .filter_map(|(name, r)| {
                let t = r.trial?;
                (t.state != TrialState::Trying).then(|| (name.clone(), t.at))
            })
            .collect()
    }

    /// Judges each planned peer's address on trial from what the data
    /// plane says of it, with `down` the peers [`crate::liveness`] judges
    /// down now. What was given up is then [`Ladder::given_up`]'s.
    pub fn observe(
        &mut self,
        planned: &BTreeMap<&str, Planned>,
        seen: &BTreeMap<&str, Seen>,
        down: &BTreeSet<String>,
        now: Instant,
        window: Duration,
    ) {
        // A peer with one address has nothing to fall back to, but where
        // it answered is kept (see `confirmed`) should more be offered.
        self.peers.retain(|name, _| {
            planned
                .get(name.as_str())
                .is_some_and(|p| !p.offers.is_empty())
        });
        for (name, plan) in planned {
            let (Some(at), Some(device)) = (plan.endpoint, seen.get(name)) else {
                continue;
            };
            if plan.offers.is_empty() {
                continue;
            }
            let rungs = self.peers.entry(name.to_string()).or_default();
            rungs.given_up.retain(|a| plan.offers.contains(a));
            let r = device.reading;
            let heard = (r.rx, r.handshake);
            let just_heard = heard != rungs.last && heard.0 >= rungs.last.0;
            rungs.last = heard;
            let roamed = device
                .endpoint
                .filter(|d| *d != at)
                .and_then(|d| Some((d, plan.offers.iter().position(|a| *a == d)?)));
            let may_follow = rungs
                .followed
                .is_none_or(|t| now.duration_since(t) >= window);
            if let (true, true, Some((d, rank))) = (just_heard, may_follow, roamed) {
                rungs.given_up = plan.offers[..rank].iter().copied().collect();
                rungs.rounds = 0;
                rungs.followed = Some(now);
                rungs.trial = Some(Trial {
                    at: d,
                    since: now,
                    heard,
                    state: TrialState::Confirmed,
                });
                continue;
            }
            let mut trial = match rungs.trial {
                // Counters that went back: a new data plane, a new trial.
                Some(t) if t.at == at && heard.0 >= t.heard.0 => t,
                _ => Trial {
                    at,
                    since: now,
                    heard,
                    state: TrialState::Trying,
                },
            };
            let newly_down = down.contains(*name) && !self.down.contains(*name);
            let patience = window * 2u32.pow(rungs.rounds.min(MAX_DOUBLINGS));
            let give_up = match trial.state {
                TrialState::Trying if heard != trial.heard => {
                    rungs.rounds = 0;
                    trial.state = TrialState::Confirmed;
                    false
                }
                TrialState::Trying => now.duration_since(trial.since) >= patience,
                TrialState::Confirmed if newly_down => {
                    trial.state = TrialState::Doubted { since: now, heard };
                    false
                }
                TrialState::Confirmed => false,
                TrialState::Doubted { heard: then, .. } if heard != then => {
                    trial.state = TrialState::Confirmed;
                    false
                }
                TrialState::Doubted { since, .. } => now.duration_since(since) >= window,
            };
            if give_up {
                rungs.given_up.insert(at);
                rungs.trial = None;
                if plan.offers.iter().all(|a| rungs.given_up.contains(a)) {
                    rungs.given_up.clear();
                    rungs.rounds += 1;
                }
            } else {
                rungs.trial = Some(trial);
            }
        }
        self.down = down.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const WINDOW: Duration = Duration::from_secs(10);

    /// One peer, "b", offering a private address then its endpoint.
    struct Case {
        ladder: Ladder,
        offers: Vec<SocketAddr>,
        start: Instant,
    }

    impl Case {
        fn new() -> Self {
            Self {
                ladder: Ladder::default(),
                offers: vec![addr("10.0.0.2:51820"), addr("198.51.100.2:51820")],
                start: Instant::now(),
            }
        }

        /// The endpoint the planner gives: the best offer not given up.
        fn planned(&self) -> SocketAddr {
            let given_up = self.ladder.given_up();
            let skip = given_up.get("b").cloned().unwrap_or_default();
            *self
                .offers
                .iter()
                .find(|a| !skip.contains(a))
                .unwrap_or(&self.offers[0])
        }

        /// A look at `secs` with these readings: whether the endpoint to
        /// plan changed.
        fn look(&mut self, secs: u64, rx: u64, handshake: u64, down: bool) -> bool {
            let planned = self.planned();
            self.look_from(secs, rx, handshake, down, planned)
        }

        /// A look with the data plane sending to `device`.
        fn look_from(
            &mut self,
            secs: u64,
            rx: u64,
            handshake: u64,
            down: bool,
            device: SocketAddr,
        ) -> bool {
            let endpoint = Some(self.planned());
            let planned = BTreeMap::from([(
                "b",
                Planned {
                    offers: &self.offers,
                    endpoint,
                },
            )]);
            let readings = BTreeMap::from([(
                "b",
                Seen {
                    reading: Reading {
                        rx,
                        tx: 0,
                        handshake,
                    },
                    endpoint: Some(device),
                },
            )]);
            let down: BTreeSet<String> = down.then(|| "b".to_string()).into_iter().collect();
            let now = self.start + Duration::from_secs(secs);
            let before = self.ladder.given_up();
            self.ladder.observe(&planned, &readings, &down, now, WINDOW);
            self.ladder.given_up() != before
        }
    }

    #[test]
    fn an_address_that_answers_is_kept() {
        let mut c = Case::new();
        assert!(!c.look(0, 0, 0, false));
        assert!(!c.look(2, 148, 100, false), "a handshake confirms it");
        assert!(!c.look(60, 148, 100, false), "quiet but confirmed");
        assert_eq!(c.planned(), addr("10.0.0.2:51820"));
    }

    #[test]
    fn an_address_that_never_answers_is_given_up_for_the_next() {
        let mut c = Case::new();
        assert!(!c.look(0, 0, 0, false));
        assert!(!c.look(9, 0, 0, false));
        assert!(c.look(10, 0, 0, false), "a window without an answer");
        assert_eq!(c.planned(), addr("198.51.100.2:51820"));
        assert_eq!(
            c.ladder.given_up()["b"],
            BTreeSet::from([addr("10.0.0.2:51820")])
        );
        // The next address answers: kept, the first stays given up.
        assert!(!c.look(11, 0, 0, false));
        assert!(!c.look(12, 148, 12, false));
        assert!(!c.look(100, 148, 12, false));
        assert_eq!(c.planned(), addr("198.51.100.2:51820"));
    }

    #[test]
    fn a_confirmed_address_is_given_up_when_its_link_goes_down_for_a_window() {
        let mut c = Case::new();
        c.look(0, 0, 0, false);
        c.look(1, 148, 1, false);
        assert!(!c.look(30, 148, 1, true), "went down: doubted");
        assert!(!c.look(39, 148, 1, true));
        assert!(c.look(40, 148, 1, true), "not heard for a window");
        assert_eq!(c.planned(), addr("198.51.100.2:51820"));
        // Still down while the next is tried: not news again.
        assert!(!c.look(41, 148, 1, true));
        assert!(!c.look(43, 300, 1, true), "heard at the next: confirmed");
        assert!(!c.look(90, 300, 1, true));
        assert_eq!(c.planned(), addr("198.51.100.2:51820"));
    }

    /// A blip: down, and heard again at the same address within a window
    /// (liveness may still say down: it waits a peer timeout of hearing).
    #[test]
    fn a_blip_keeps_the_address() {
        let mut c = Case::new();
        c.look(0, 0, 0, false);
        c.look(1, 148, 1, false);
        assert!(!c.look(30, 148, 1, true));
        assert!(!c.look(33, 180, 1, true), "heard again");
        assert!(!c.look(60, 180, 1, true));
        assert!(!c.look(61, 180, 1, false));
        assert_eq!(c.planned(), addr("10.0.0.2:51820"));
        // Down again later: doubted again.
        assert!(!c.look(70, 180, 1, true));
        assert!(c.look(80, 180, 1, true));
    }

    #[test]
    fn when_nothing_answers_the_peer_starts_over_ever_more_slowly() {
        let mut c = Case::new();
        c.look(0, 0, 0, false);
        assert!(c.look(10, 0, 0, false));
        c.look(10, 0, 0, false);
        assert!(c.look(20, 0, 0, false), "the second given up too");
        assert!(c.ladder.given_up().is_empty(), "started over");
        assert_eq!(c.planned(), addr("10.0.0.2:51820"));
        c.look(20, 0, 0, false);
        assert!(!c.look(39, 0, 0, false), "twice the window now");
        assert!(c.look(40, 0, 0, false));
        // Heard at the second: the window is back to one...
        c.look(41, 0, 0, false);
        c.look(42, 148, 42, false);
        assert!(!c.look(50, 148, 42, true));
        assert!(c.look(60, 148, 42, true));
        // ...and doubles again when that goes down with the first given up.
        assert!(c.ladder.given_up().is_empty(), "started over");
        c.look(60, 148, 42, true);
        assert!(!c.look(79, 148, 42, true));
        assert!(c.look(80, 148, 42, true));
        // At most eight windows, however long nothing answers: each
        // give-up at most 80 s after the last.
        let mut at = 80;
        let mut gaps = Vec::new();
        for _ in 0..12 {
            c.look(at, 148, 42, true);
            let from = at;
            at += 1;
            while !c.look(at, 148, 42, true) {
                at += 1;
            }
            gaps.push(at - from);
        }
        let waited = *gaps.iter().max().unwrap();
        assert_eq!(waited, 80, "capped at {MAX_DOUBLINGS} doublings");
    }

    #[test]
    fn a_new_data_plane_starts_a_new_trial() {
        let mut c = Case::new();
        c.look(0, 500, 7, false);
        c.look(8, 500, 7, false);
        // Counters back to zero at 9: a fresh window from there.
        assert!(!c.look(9, 0, 0, false));
        assert!(!c.look(18, 0, 0, false));
        assert!(c.look(19, 0, 0, false));
    }

    /// The peer's packets come from another of its addresses: WireGuard
    /// sends there now, and the plan follows, up or down the offers.
    #[test]
    fn a_peer_heard_from_another_of_its_addresses_is_followed_there() {
        let (private, public) = (addr("10.0.0.2:51820"), addr("198.51.100.2:51820"));
        let mut c = Case::new();
        // The private address given up while the peer was not running.
        c.look(0, 0, 0, false);
        assert!(c.look(10, 0, 0, false));
        assert_eq!(c.planned(), public);
        // It starts and reaches us from its private address: followed.
        c.look(11, 0, 0, false);
        assert!(c.look_from(12, 148, 12, false, private));
        assert_eq!(c.planned(), private);
        assert!(!c.look(13, 200, 12, false));
        assert!(!c.look(60, 200, 12, false), "confirmed there");
        // Later heard from its public address only: followed down.
        assert!(c.look_from(61, 300, 12, false, public));
        assert_eq!(c.planned(), public);
        assert_eq!(c.ladder.given_up()["b"], BTreeSet::from([private]));
        // A peer alternating between its addresses is followed at most
        // once a window.
        let changes = (62..162)
            .filter(|&t| {
                let from = if t % 2 == 0 { private } else { public };
                c.look_from(t, 300 + t * 100, 12, false, from)
            })
            .count();
        assert!(changes <= 10, "{changes} changes in 100 looks");
        // Not heard anew: a roamed endpoint alone is no news.
        let mut quiet = Case::new();
        quiet.look(0, 148, 1, false);
        assert!(!quiet.look_from(1, 148, 1, false, public));
        // An address it does not offer: the trial is confirmed, no more.
        let mut elsewhere = Case::new();
        elsewhere.look(0, 0, 0, false);
        assert!(!elsewhere.look_from(1, 148, 1, false, addr("203.0.113.1:9")));
        assert!(!elsewhere.look(60, 148, 1, false));
        assert_eq!(elsewhere.planned(), private);
    }

    #[test]
    fn a_peer_with_one_address_gives_up_nothing_and_keeps_it_once_answered() {
        let mut ladder = Ladder::default();
        let one = [addr("198.51.100.2:51820")];
        let planned = BTreeMap::from([(
            "b",
            Planned {
                offers: &one,
                endpoint: Some(one[0]),
            },
        )]);
        let seen = |rx| {
            BTreeMap::from([(
                "b",
                Seen {
                    reading: Reading {
                        rx,
                        ..Reading::default()
                    },
                    endpoint: Some(one[0]),
                },
            )])
        };
        let start = Instant::now();
        for s in [0, 100, 1000] {
            let now = start + Duration::from_secs(s);
            ladder.observe(&planned, &seen(0), &BTreeSet::new(), now, WINDOW);
            assert!(ladder.given_up().is_empty());
            assert!(ladder.confirmed().is_empty(), "never answered");
        }
        let now = start + Duration::from_secs(1001);
        ladder.observe(&planned, &seen(148), &BTreeSet::new(), now, WINDOW);
        assert_eq!(ladder.confirmed(), BTreeMap::from([("b".into(), one[0])]));
        // Offered nothing: forgotten.
        ladder.observe(&BTreeMap::new(), &seen(148), &BTreeSet::new(), now, WINDOW);
        assert!(ladder.confirmed().is_empty());
    }
}
