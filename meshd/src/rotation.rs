//! Key rotation, decided: from the key file's state and what the node sees
//! — an admin's request, the key's age, revoked keys, which peers have
//! moved — what the key file, the device and the annotations should hold.
//! Pure; the agent saves the state first, then publishes and configures.
//! The state machine, and what happens when either side restarts, is in
//! docs/security.md ("Key rotation").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use weft_keys::{KeyState, NextKey, PrivateKey, PublicKey};

use crate::annotations::NextPublicKey;
use crate::planner::OwnKeys;

/// How this node's device lets it change keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// Weft's device answers both keys: peers move as soon as they see the
    /// next key, and the old key goes once every peer that is up has moved
    /// (or `max_overlap` seconds passed).
    Overlap { max_overlap: u64 },
    /// A device with one key (kernel WireGuard, wireguard-go): the node
    /// and its peers switch together at a time announced `lead` seconds
    /// ahead. With `lead` 0 this is the naive rotation (peers switch when
    /// they see the new key).
    Switch { lead: u64 },
}

/// What a peer's progress looks like from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerProgress {
    /// It completed a handshake with the next key.
    pub moved: bool,
    /// Its link is up (a peer that is down does not hold the rotation up;
    /// it moves when it comes back).
    pub up: bool,
}

/// Everything a rotation step decides from.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub state: &'a KeyState,
    /// Unix seconds.
    pub now: u64,
    /// `None` until the device has been asked (the first sync).
    pub mechanism: Option<Mechanism>,
    /// An admin's request (`weft.dev/rotate-requested`): rotate if the key
    /// is older.
    pub requested: Option<u64>,
    /// `--key-max-age`, in seconds.
    pub max_age: Option<u64>,
    pub revoked: &'a BTreeSet<PublicKey>,
    /// The device holds [`device_keys`] of `state`.
    pub device_ready: bool,
    /// This node's Node already carries the next public key.
    pub announced: bool,
    /// Every peer, by node name; `None` before this meshd has planned its
    /// peers (right after a restart): no peer counts as moved then.
    pub peers: Option<&'a BTreeMap<String, PeerProgress>>,
}

/// The keys the device should hold.
#[derive(Clone, PartialEq)]
pub struct DeviceKeys {
    pub private: PrivateKey,
    /// The key still answered while peers move (Weft's device only).
    pub previous: Option<PrivateKey>,
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKeys")
            .field("public", &self.private.public_key())
            .field(
                "previous",
                &self.previous.as_ref().map(PrivateKey::public_key),
            )
            .finish()
    }
}

/// Why a step changed the key state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started {
        requested: bool,
    },
    /// Every peer that is up moved (or, with a switch, its time came).
    Finished,
    /// The overlap ran out with these peers not moved.
    TimedOut {
        pending: Vec<String>,
    },
    /// A key this node holds was revoked: replaced at once, no overlap
    /// (the old key is refused everywhere anyway).
    Replaced {
        revoked: PublicKey,
    },
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The key state, saved before anything else when it changed.
    pub state: KeyState,
    pub device: DeviceKeys,
    /// What to announce.
    pub keys: OwnKeys,
    /// When a step is due by time alone (Unix seconds).
    pub wake_at: Option<u64>,
    pub event: Option<Event>,
}

/// Whether an admin's rotation request (Unix seconds) is still to be
/// carried out: it is newer than the key (`since`; a node that does not
/// say has not).
pub fn request_pending(requested: u64, since: Option<u64>) -> bool {
    since.is_none_or(|since| requested > since)
}

/// The keys the device holds in `state`: while overlapping, the next key
/// with the current one still answered; before a scheduled switch, the
/// current key alone.
pub fn device_keys(state: &KeyState) -> DeviceKeys {
    match &state.next {
        Some(next) if next.at.is_none() => DeviceKeys {
            private: next.key.clone(),
            previous: Some(state.current.clone()),
        },
        _ => DeviceKeys {
            private: state.current.clone(),
            previous: None,
        },
    }
}

/// One step of the state machine.
pub fn step(inputs: &Inputs) -> Step {
    let now = inputs.now;
    let mut state = inputs.state.clone();
    let mut event = None;
    let held = std::iter::once(&state.current)
        .chain(state.next.as_ref().map(|n| &n.key))
        .map(PrivateKey::public_key)
        .find(|k| inputs.revoked.contains(k));
    if let Some(revoked) = held {
        state = KeyState::generate(now);
        event = Some(Event::Replaced { revoked });
    } else if let (None, Some(mechanism)) = (&state.next, inputs.mechanism) {
        let requested = inputs
            .requested
            .is_some_and(|r| request_pending(r, Some(state.since)));
        let aged = inputs
            .max_age
            .is_some_and(|age| now >= state.since.saturating_add(age));
        if requested || aged {
            state.next = Some(NextKey {
                key: PrivateKey::generate(),
                started: now,
                at: match mechanism {
                    Mechanism::Overlap { .. } => None,
                    Mechanism::Switch { lead } => Some(now + lead),
                },
            });
            event = Some(Event::Started { requested });
        }
    }
    // The device holds what this state needs (a step that just started or
    // replaced a key has not been applied yet). A next key already
    // announced stays announced: after a restart, the device kept it (the
    // data plane outlives meshd) or this pass gives it back.
    let ready = (inputs.device_ready || inputs.announced)
        && device_keys(&state) == device_keys(inputs.state);
    let no_peers = BTreeMap::new();
    let peers = inputs.peers.unwrap_or(&no_peers);
    let pending: BTreeSet<String> = peers
        .iter()
        .filter(|(_, p)| !(ready && p.moved))
        .map(|(name, _)| name.clone())
        .collect();
    let mut wake_at = None;
    if let Some(next) = state.next.clone() {
        let finished = match (next.at, inputs.mechanism) {
            (Some(at), _) if now >= at => Some(Event::Finished),
            (Some(at), _) => {
                wake_at = Some(at);
                None
            }
            // A device that answers one key cannot overlap: switch now.
            (None, Some(Mechanism::Switch { .. })) => Some(Event::Finished),
            (None, overlap) => {
                let waiting = inputs.peers.is_none()
                    || peers.iter().any(|(name, p)| p.up && pending.contains(name));
                let max = match overlap {
                    Some(Mechanism::Overlap { max_overlap }) => max_overlap,
                    _ => u64::MAX,
                };
                let deadline = next.started.saturating_add(max);
                if ready && inputs.announced && !waiting {
                    Some(Event::Finished)
                } else if now >= deadline && ready && inputs.announced {
                    Some(Event::TimedOut {
                        pending: pending.iter().cloned().collect(),
                    })
                } else {
                    wake_at = Some(deadline);
                    None
                }
            }
        };
        if let Some(finished) = finished {
            state = KeyState {
                current: next.key,
                since: now,
                next: None,
            };
            event = Some(finished);
        }
    }
    let device = device_keys(&state);
    let next = state.next.as_ref().and_then(|next| {
        let key = next.key.public_key();
        match next.at {
            // Peers may move only once the device answers the next key.
            None => ready.then(|| NextPublicKey {
                key,
                at: None,
                pending: Arc::new(pending),
            }),
            Some(at) => Some(NextPublicKey {
                key,
                at: Some(at),
                pending: Arc::default(),
            }),
        }
    });
    Step {
        keys: OwnKeys {
            public_key: state.current.public_key(),
            since: state.since,
            next,
        },
        device,
        state,
        wake_at,
        event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVERLAP: Mechanism = Mechanism::Overlap { max_overlap: 300 };

    fn steady(since: u64) -> KeyState {
        KeyState {
            current: PrivateKey::from_bytes([1; 32]),
            since,
            next: None,
        }
    }

    fn rotating(started: u64, at: Option<u64>) -> KeyState {
        KeyState {
            next: Some(NextKey {
                key: PrivateKey::from_bytes([2; 32]),
                started,
                at,
            }),
            ..steady(10)
        }
    }

    /// (name, moved, up)
    type PeerRow<'a> = (&'a str, bool, bool);

    fn peers(list: &[PeerRow]) -> BTreeMap<String, PeerProgress> {
        list.iter()
            .map(|(n, moved, up)| {
                (
                    n.to_string(),
                    PeerProgress {
                        moved: *moved,
                        up: *up,
                    },
                )
            })
            .collect()
    }

    struct Case<'a> {
        state: KeyState,
        requested: Option<u64>,
        max_age: Option<u64>,
        mechanism: Option<Mechanism>,
        ready: bool,
        announced: bool,
        peers: &'a [PeerRow<'a>],
        revoked: &'a [PublicKey],
    }

    fn case(state: KeyState) -> Case<'static> {
        Case {
            state,
            requested: None,
            max_age: None,
            mechanism: Some(OVERLAP),
            ready: true,
            announced: true,
            peers: &[],
            revoked: &[],
        }
    }

    fn run(c: Case, now: u64) -> Step {
        let revoked: BTreeSet<PublicKey> = c.revoked.iter().copied().collect();
        let peers = peers(c.peers);
        step(&Inputs {
            state: &c.state,
            now,
            mechanism: c.mechanism,
            requested: c.requested,
            max_age: c.max_age,
            revoked: &revoked,
            device_ready: c.ready,
            announced: c.announced,
            peers: Some(&peers),
        })
    }

    #[test]
    fn a_steady_key_stays_until_asked_or_old() {
        let s = run(case(steady(10)), 100);
        assert_eq!((s.state.clone(), s.event.clone()), (steady(10), None));
        assert_eq!(s.device.previous, None);
        assert_eq!(s.keys.next, None);
        // A request older than the key is satisfied already.
        assert_eq!(
            run(
                Case {
                    requested: Some(10),
                    ..case(steady(10))
                },
                100
            )
            .event,
            None
        );
        for c in [
            Case {
                requested: Some(11),
                ..case(steady(10))
            },
            Case {
                max_age: Some(90),
                ..case(steady(10))
            },
        ] {
            let s = run(c, 100);
            assert!(matches!(s.event, Some(Event::Started { .. })), "{s:?}");
            assert_eq!(
                s.state.next.as_ref().map(|n| (n.started, n.at)),
                Some((100, None))
            );
        }
        assert_eq!(
            run(
                Case {
                    max_age: Some(91),
                    ..case(steady(10))
                },
                100
            )
            .event,
            None
        );
        // Not before the device has said what it can do.
        let unknown = Case {
            requested: Some(50),
            mechanism: None,
            ..case(steady(10))
        };
        assert_eq!(run(unknown, 100).event, None);
    }

    #[test]
    fn the_next_key_is_announced_only_once_the_device_answers_it() {
        let s = run(
            Case {
                ready: false,
                announced: false,
                ..case(rotating(100, None))
            },
            101,
        );
        assert_eq!(
            s.device.private.public_key(),
            PrivateKey::from_bytes([2; 32]).public_key()
        );
        assert_eq!(s.device.previous, Some(PrivateKey::from_bytes([1; 32])));
        assert_eq!(
            s.keys.next, None,
            "peers must not move to a key nothing answers"
        );
        assert_eq!(
            s.keys.public_key,
            PrivateKey::from_bytes([1; 32]).public_key()
        );
        let s = run(
            Case {
                announced: false,
                peers: &[("b", false, true)],
                ..case(rotating(100, None))
            },
            101,
        );
        let next = s.keys.next.expect("announced");
        assert_eq!(next.at, None);
        assert_eq!(next.pending.iter().collect::<Vec<_>>(), ["b"]);
        assert_eq!(
            s.event, None,
            "not finished before the announcement is seen"
        );
    }

    #[test]
    fn the_overlap_ends_when_every_peer_that_is_up_moved_or_time_ran_out() {
        let table: &[(&[PeerRow], u64, Option<Event>)] = &[
            (&[("b", true, true), ("c", false, true)], 150, None),
            (
                &[("b", true, true), ("c", true, true)],
                150,
                Some(Event::Finished),
            ),
            // A peer that is down does not hold it up.
            (
                &[("b", true, true), ("c", false, false)],
                150,
                Some(Event::Finished),
            ),
            (
                &[("b", true, true), ("c", false, true)],
                400,
                Some(Event::TimedOut {
                    pending: vec!["c".into()],
                }),
            ),
            (&[], 101, Some(Event::Finished)),
        ];
        for (peers, now, expected) in table {
            let s = run(
                Case {
                    peers,
                    ..case(rotating(100, None))
                },
                *now,
            );
            assert_eq!(&s.event, expected, "{peers:?} at {now}");
            if expected.is_some() {
                assert_eq!(
                    s.state,
                    KeyState {
                        current: PrivateKey::from_bytes([2; 32]),
                        since: *now,
                        next: None
                    }
                );
                assert_eq!(s.device.previous, None, "the old key leaves the device");
                assert_eq!(s.keys.next, None);
            } else {
                assert_eq!(s.wake_at, Some(400));
            }
        }
    }

    /// An overlap whose announcement never got out (the API unreachable)
    /// does not run out: peers that never saw the next key still need the
    /// old one.
    #[test]
    fn an_unannounced_overlap_does_not_time_out() {
        let c = Case {
            announced: false,
            peers: &[("b", false, true)],
            ..case(rotating(100, None))
        };
        let s = run(c, 1_000);
        assert_eq!(s.event, None);
        assert_eq!(s.device.previous, Some(PrivateKey::from_bytes([1; 32])));
    }

    /// Right after a restart: the announcement stays out (no flapping of
    /// the next key for peers), and nothing finishes before the peers are
    /// known.
    #[test]
    fn a_restarted_meshd_keeps_announcing_and_waits_to_know_its_peers() {
        let state = rotating(100, None);
        let revoked = BTreeSet::new();
        let s = step(&Inputs {
            state: &state,
            now: 150,
            mechanism: None,
            requested: None,
            max_age: None,
            revoked: &revoked,
            device_ready: false,
            announced: true,
            peers: None,
        });
        assert_eq!(s.event, None);
        assert!(s.keys.next.is_some(), "the next key stays announced");
        assert_eq!(s.device.previous, Some(PrivateKey::from_bytes([1; 32])));
    }

    #[test]
    fn a_switch_is_announced_ahead_and_happens_at_its_time() {
        let lead = Case {
            requested: Some(50),
            mechanism: Some(Mechanism::Switch { lead: 5 }),
            ..case(steady(10))
        };
        let s = run(lead, 100);
        assert_eq!(s.keys.next.as_ref().and_then(|n| n.at), Some(105));
        assert_eq!(
            s.device.private,
            PrivateKey::from_bytes([1; 32]),
            "not before its time"
        );
        assert_eq!(s.device.previous, None);
        assert_eq!(s.wake_at, Some(105));
        let at = run(
            Case {
                mechanism: Some(Mechanism::Switch { lead: 5 }),
                ..case(rotating(100, Some(105)))
            },
            105,
        );
        assert_eq!(at.event, Some(Event::Finished));
        assert_eq!(at.device.private, PrivateKey::from_bytes([2; 32]));
        // Naive: no lead, the new key at once.
        let naive = Case {
            requested: Some(50),
            mechanism: Some(Mechanism::Switch { lead: 0 }),
            ..case(steady(10))
        };
        let s = run(naive, 100);
        assert_eq!(s.event, Some(Event::Finished));
        assert!(s.state.next.is_none() && s.state.since == 100);
    }

    #[test]
    fn a_revoked_key_is_replaced_at_once_whatever_the_phase() {
        for (state, revoked) in [
            (steady(10), PrivateKey::from_bytes([1; 32]).public_key()),
            (
                rotating(100, None),
                PrivateKey::from_bytes([1; 32]).public_key(),
            ),
            (
                rotating(100, None),
                PrivateKey::from_bytes([2; 32]).public_key(),
            ),
        ] {
            let s = run(
                Case {
                    revoked: &[revoked],
                    ..case(state)
                },
                120,
            );
            assert_eq!(s.event, Some(Event::Replaced { revoked }));
            assert!(s.state.next.is_none() && s.state.since == 120);
            assert_ne!(s.keys.public_key, revoked);
            assert_eq!(s.device.previous, None);
        }
    }

    #[test]
    fn a_step_on_its_own_output_changes_nothing() {
        // Idempotent: replaying a step (a restart) decides the same.
        for state in [steady(10), rotating(100, None), rotating(100, Some(500))] {
            let first = run(
                Case {
                    peers: &[("b", false, true)],
                    ..case(state)
                },
                200,
            );
            let again = run(
                Case {
                    peers: &[("b", false, true)],
                    ..case(first.state.clone())
                },
                200,
            );
            assert_eq!(again.state, first.state);
            assert_eq!(again.device, first.device);
            assert_eq!(again.event, None);
        }
    }
}
