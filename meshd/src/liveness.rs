//! Which peers are down. Two kinds of evidence:
//!
//! - **Silence**: nothing heard from a peer for `silence` — its
//!   received-bytes counter did not move and no new handshake completed.
//!   Both signals count because implementations differ: the kernel,
//!   wireguard-go and Weft's device count keepalives in rx bytes; a program
//!   that does not still shows an idle session rekeying every two minutes
//!   while keepalives flow. Persistent keepalives bound an idle link's
//!   silence, so this is all an idle link needs.
//! - **An unanswered probe**: a link that carries traffic should not wait
//!   out the silence. A peer with a session that this node sent more than
//!   WireGuard's own housekeeping to, and heard nothing from for half of
//!   `unanswered`, is probed (the caller sends an ICMP echo to its mesh
//!   address through the tunnel, which its kernel answers through the
//!   tunnel); unanswered for `unanswered` after the probe went out, it is
//!   down. Only a peer that has answered an echo before is judged so: one
//!   whose kernel ignores echoes, or whose firewall drops them, is judged
//!   by silence alone. Until a peer has answered one, it is sent one echo
//!   per `silence` to find out. Idle links otherwise send nothing more
//!   than their keepalives.
//!
//! A peer not heard since it was first seen (a node still starting), or
//! whose counters went back (a new data plane), gets the whole silence as
//! grace. A down peer stays configured and WireGuard keeps retrying its
//! handshake (persistent keepalive), so it is heard again by itself; it is
//! up again once heard for `silence` without a silence that long
//! (hysteresis: a flapping link changes state at most once per `silence`).
//! Pure: the caller supplies the clock, sends the probes and reports which
//! went out and which were answered.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// What the data plane says about a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    /// Bytes received: authenticated packets only.
    pub rx: u64,
    /// Bytes sent.
    pub tx: u64,
    /// The Unix second of the last handshake (0: none).
    pub handshake: u64,
}

/// What a node may send a peer without expecting an answer: one
/// keepalive (32 bytes on the wire) and one handshake initiation (148),
/// as persistent keepalives and rekeying do on an idle link.
const HOUSEKEEPING: u64 = 32 + 148;

/// How long each kind of evidence takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// Silence after which a peer is down; also how long a down peer must
    /// be heard to be up again (`--peer-timeout`).
    pub silence: Duration,
    /// How long a probe of a peer that was sent traffic may go unanswered
    /// (`--probe-timeout`).
    pub unanswered: Duration,
}

/// The judgement of one set of readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement<K> {
    pub down: BTreeSet<K>,
    /// Peers to probe now: sent traffic, not heard since.
    pub probe: BTreeSet<K>,
    /// Peers to send an echo to learn whether they answer echoes.
    pub ask: BTreeSet<K>,
    /// Some peer was sent bytes since the last readings: a failure may be
    /// starting, so the caller reads again sooner.
    pub busy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// The received bytes and handshake last read.
    heard: (u64, u64),
    /// When they last changed.
    since: Instant,
    /// Bytes sent when they last changed, and at the last reading.
    tx_then: u64,
    tx_last: u64,
    /// Heard at least once since first seen (probes apply).
    answered: bool,
    /// It has answered an echo: an unanswered one is evidence.
    echoes: bool,
    /// When the outstanding probe went out.
    probing: Option<Instant>,
    /// When an echo last went out to learn whether it answers echoes.
    asked: Option<Instant>,
    down: bool,
    /// While down: since when it has been heard without a long silence.
    heard_since: Option<Instant>,
}

impl Seen {
    fn new(r: &Reading, now: Instant, down: bool) -> Self {
        Seen {
            heard: (r.rx, r.handshake),
            since: now,
            tx_then: r.tx,
            tx_last: r.tx,
            answered: false,
            echoes: false,
            probing: None,
            asked: None,
            down,
            heard_since: None,
        }
    }

    fn go_down(&mut self) {
        self.down = true;
        self.heard_since = None;
        self.probing = None;
    }

    fn hear(&mut self, r: &Reading, now: Instant) {
        self.heard = (r.rx, r.handshake);
        self.since = now;
        self.tx_then = r.tx;
        self.answered = true;
        self.probing = None;
        if self.down && self.heard_since.is_none() {
            self.heard_since = Some(now);
        }
    }

    /// Sent traffic, with a session, and heard nothing for half the probe
    /// timeout.
    fn suspect(&self, r: &Reading, now: Instant, t: Timers) -> bool {
        self.answered
            && !self.down
            && r.handshake != 0
            && r.tx - self.tx_then > HOUSEKEEPING
            && now.duration_since(self.since) >= t.unanswered / 2
    }

    /// Still to learn whether it answers echoes, and not asked for a while.
    fn unasked(&self, now: Instant, t: Timers) -> bool {
        self.answered
            && !self.echoes
            && !self.down
            && self
                .asked
                .is_none_or(|a| now.duration_since(a) >= t.silence)
    }
}

/// Remembers when each peer's counters last moved.
#[derive(Debug, Clone)]
pub struct Liveness<K> {
    seen: BTreeMap<K, Seen>,
    /// Peers that start down when first seen: those a restarted meshd had
    /// published as unreachable, so a restart does not bring their links
    /// back before they are heard.
    start_down: BTreeSet<K>,
}

impl<K: Ord + Clone> Liveness<K> {
    pub fn new(start_down: BTreeSet<K>) -> Self {
        Self {
            seen: BTreeMap::new(),
            start_down,
        }
    }

    /// Whether a probe is outstanding (the caller reads again sooner).
    pub fn probing(&self) -> bool {
        self.seen.values().any(|s| s.probing.is_some())
    }

    /// Takes readings at `now`, and the peers whose echo answers arrived
    /// since the last readings: the peers that are down and those to probe.
    pub fn observe(
        &mut self,
        readings: &[(K, Reading)],
        echoed: &BTreeSet<K>,
        now: Instant,
        t: Timers,
    ) -> Judgement<K> {
        let current: BTreeSet<&K> = readings.iter().map(|(k, _)| k).collect();
        self.seen.retain(|k, _| current.contains(k));
        let mut busy = false;
        let (mut probe, mut ask) = (BTreeSet::new(), BTreeSet::new());
        for (key, r) in readings {
            let start_down = self.start_down.contains(key);
            let s = self
                .seen
                .entry(key.clone())
                .or_insert_with(|| Seen::new(r, now, start_down));
            if r.rx < s.heard.0 || r.tx < s.tx_last {
                // Counters went back: a new data plane or peer entry.
                // Judged afresh, from a new grace.
                *s = Seen::new(r, now, s.down);
            }
            busy |= r.tx != s.tx_last;
            s.tx_last = r.tx;
            // An echo's answer only says that the peer answers echoes: it
            // is heard by the bytes its answer adds to the counter, which
            // only authenticated packets move (a reply forged on the
            // underlay is dropped by the source guard, but even one that
            // got through would keep no link up).
            s.echoes |= echoed.contains(key);
            let mut suspect = false;
            if (r.rx, r.handshake) != s.heard {
                s.hear(r, now);
            } else if s.suspect(r, now, t) {
                match s.probing {
                    Some(p) if s.echoes && now.duration_since(p) >= t.unanswered => s.go_down(),
                    _ => suspect = true,
                }
            }
            if now.duration_since(s.since) > t.silence {
                s.go_down();
            } else if s
                .heard_since
                .is_some_and(|h| now.duration_since(h) >= t.silence)
            {
                s.down = false;
                s.heard_since = None;
            }
            if suspect && !s.down {
                probe.insert(key.clone());
            } else if s.unasked(now, t) {
                ask.insert(key.clone());
            }
        }
        let down = self
            .seen
            .iter()
            .filter(|(_, s)| s.down)
            .map(|(k, _)| k.clone())
            .collect();
        Judgement {
            down,
            probe,
            ask,
            busy,
        }
    }

    /// The probes that went out at `now`: their clocks start (a probe that
    /// could not be sent is no evidence).
    pub fn sent(&mut self, probes: &BTreeSet<K>, now: Instant) {
        for key in probes {
            if let Some(s) = self.seen.get_mut(key) {
                if s.echoes {
                    s.probing.get_or_insert(now);
                } else {
                    s.asked = Some(now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Received bytes and handshake, nothing sent.
    fn heard(rx: u64, handshake: u64) -> Reading {
        Reading {
            rx,
            tx: 0,
            handshake,
        }
    }

    fn timers(silence: u64) -> Timers {
        Timers {
            silence: Duration::from_secs(silence),
            unanswered: Duration::from_secs(1),
        }
    }

    fn down<K: Ord + Clone>(
        l: &mut Liveness<K>,
        readings: &[(K, Reading)],
        now: Instant,
        t: Timers,
    ) -> BTreeSet<K> {
        l.observe(readings, &BTreeSet::new(), now, t).down
    }

    #[test]
    fn silent_peers_go_down_and_come_back() {
        let (a, b) = ("a", "b");
        let t = timers(10);
        let start = Instant::now();
        let mut l = Liveness::new(BTreeSet::new());
        assert!(
            down(&mut l, &[(a, heard(0, 0)), (b, heard(0, 0))], start, t).is_empty(),
            "grace for new peers"
        );
        let later = start + Duration::from_secs(11);
        assert_eq!(
            down(&mut l, &[(a, heard(500, 0)), (b, heard(0, 0))], later, t),
            BTreeSet::from([b])
        );
        // b is heard again, but stays down until heard for the timeout.
        let mut again = later;
        for bytes in 1..=10 {
            again += Duration::from_secs(1);
            assert_eq!(
                down(
                    &mut l,
                    &[(a, heard(500 + bytes, 0)), (b, heard(92 + bytes, 0))],
                    again,
                    t
                ),
                BTreeSet::from([b]),
                "second {bytes} of being heard"
            );
        }
        again += Duration::from_secs(1);
        assert!(
            down(&mut l, &[(a, heard(600, 0)), (b, heard(200, 0))], again, t).is_empty(),
            "b is heard for the timeout: up"
        );
        // A fresh handshake alone (a data plane that counts no keepalive bytes) is heard too.
        let much_later = again + Duration::from_secs(11);
        let handshake = 1_700_000_000;
        assert!(down(
            &mut l,
            &[(a, heard(600, handshake)), (b, heard(200, handshake))],
            much_later,
            t
        )
        .is_empty());
        // A removed peer is forgotten; re-added, it gets grace again.
        down(&mut l, &[(a, heard(700, handshake))], much_later, t);
        assert!(down(
            &mut l,
            &[(a, heard(800, handshake)), (b, heard(200, handshake))],
            much_later + Duration::from_secs(11),
            t
        )
        .is_empty());
    }

    #[test]
    fn a_peer_heard_briefly_between_silences_stays_down() {
        let a = "a";
        let t = timers(3);
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut l = Liveness::new(BTreeSet::new());
        down(&mut l, &[(a, heard(0, 0))], at(0), t);
        assert_eq!(
            down(&mut l, &[(a, heard(0, 0))], at(4), t),
            BTreeSet::from([a])
        );
        // Heard at 5 and 6, silent until 10: the hearing restarts.
        for (s, bytes) in [(5, 1), (6, 2), (7, 2), (10, 2), (11, 3), (12, 4), (13, 5)] {
            assert_eq!(
                down(&mut l, &[(a, heard(bytes, 0))], at(s), t),
                BTreeSet::from([a]),
                "second {s}"
            );
        }
        assert!(down(&mut l, &[(a, heard(6, 0))], at(14), t).is_empty());
    }

    #[test]
    fn a_peer_published_down_before_a_restart_starts_down() {
        let t = timers(3);
        let start = Instant::now();
        let mut l = Liveness::new(BTreeSet::from(["b"]));
        let at = |s: u64| start + Duration::from_secs(s);
        let both = |bytes| [("a", heard(bytes, 0)), ("b", heard(bytes, 0))];
        assert_eq!(down(&mut l, &both(0), at(0), t), BTreeSet::from(["b"]));
        assert_eq!(down(&mut l, &both(1), at(1), t), BTreeSet::from(["b"]));
        assert!(down(&mut l, &both(2), at(4), t).is_empty());
    }

    /// One peer's readings (with a session) at given milliseconds, whether
    /// its echo answer arrived, and what the judgement must be then:
    /// (ms, rx, tx, echoed, probe?, down?). The probes judged are sent.
    type Row = (u64, u64, u64, bool, bool, bool);

    /// How the peer starts: heard once (rx 1), and whether it has answered
    /// an echo by then.
    #[derive(Clone, Copy)]
    enum Start {
        NeverHeard,
        Heard,
        AnsweredAnEcho,
    }

    fn judged(start_as: Start, rows: &[Row]) {
        let t = timers(30);
        let start = Instant::now();
        let mut l = Liveness::new(BTreeSet::new());
        let session = |rx, tx| Reading {
            rx,
            tx,
            handshake: 1,
        };
        let echoed = |yes: bool| match yes {
            true => BTreeSet::from(["p"]),
            false => BTreeSet::new(),
        };
        l.observe(&[("p", session(0, 0))], &BTreeSet::new(), start, t);
        let first = match start_as {
            Start::NeverHeard => None,
            Start::Heard => Some(false),
            Start::AnsweredAnEcho => Some(true),
        };
        if let Some(echo) = first {
            let j = l.observe(&[("p", session(1, 0))], &echoed(echo), start, t);
            l.sent(&j.probe.union(&j.ask).cloned().collect(), start);
        }
        for &(ms, rx, tx, echo, probe, is_down) in rows {
            let now = start + Duration::from_millis(ms);
            let j = l.observe(&[("p", session(rx, tx))], &echoed(echo), now, t);
            assert_eq!(
                (
                    j.probe.contains("p") || j.ask.contains("p"),
                    j.down.contains("p")
                ),
                (probe, is_down),
                "at {ms} ms (rx {rx}, tx {tx}, echoed {echo}): (probe or ask, down)"
            );
            l.sent(&j.probe.union(&j.ask).cloned().collect(), now);
        }
    }

    #[test]
    fn a_busy_link_that_stops_answering_is_probed_and_down_within_the_probe_timeout() {
        judged(
            Start::AnsweredAnEcho,
            &[
                // Traffic both ways: nothing to probe.
                (1000, 901, 1000, false, false, false),
                (2000, 1901, 2000, false, false, false),
                // Sent, nothing back for less than half the probe timeout.
                (2250, 1901, 2300, false, false, false),
                // Half of it: probe, and again on each reading.
                (2500, 1901, 3400, false, true, false),
                (2750, 1901, 3900, false, true, false),
                (3250, 1901, 4400, false, true, false),
                // The probe timeout since the first went out: down.
                (3500, 1901, 4900, false, false, true),
                (4500, 1901, 5000, false, false, true),
            ],
        );
    }

    #[test]
    fn a_probe_answered_in_time_keeps_the_link_up() {
        judged(
            Start::AnsweredAnEcho,
            &[
                // A one-way stream: sent, nothing back until the echo's answer.
                (1000, 1, 5000, false, true, false),
                (1250, 1, 6000, false, true, false),
                (1500, 101, 7000, true, false, false),
                (2000, 101, 9000, false, true, false),
                (2400, 201, 11000, true, false, false),
            ],
        );
    }

    #[test]
    fn an_idle_link_s_keepalives_and_rekeying_are_never_probed() {
        // Each side's keepalive every 10 s, a handshake initiation with a
        // rekey: at most 180 bytes sent between two things heard.
        judged(
            Start::AnsweredAnEcho,
            &[
                (5000, 1, 32, false, false, false),
                (9000, 1, 180, false, false, false),
                (10000, 33, 180, false, false, false),
                (15000, 33, 212, false, false, false),
                (20000, 65, 360, false, false, false),
            ],
        );
    }

    #[test]
    fn a_peer_never_heard_gets_the_silence_as_grace_not_a_probe() {
        judged(
            Start::NeverHeard,
            &[
                (1000, 0, 5000, false, false, false),
                (5000, 0, 50000, false, false, false),
                (29000, 0, 90000, false, false, false),
                (31000, 0, 95000, false, false, true),
            ],
        );
    }

    #[test]
    fn a_peer_that_never_answered_an_echo_is_judged_by_silence_alone() {
        judged(
            Start::Heard,
            &[
                // Busy and silent: probed, but no answer is no evidence
                // (its kernel may ignore echoes, a firewall may drop them).
                (1000, 1, 5000, false, true, false),
                (2000, 1, 9000, false, true, false),
                (10000, 1, 20000, false, true, false),
                (31000, 1, 30000, false, false, true),
            ],
        );
    }

    #[test]
    fn an_idle_peer_is_asked_once_per_silence_whether_it_answers_echoes() {
        judged(
            Start::Heard,
            &[
                // Asked when first heard (by judged's start); not again
                // within the silence.
                (10000, 33, 32, false, false, false),
                (29000, 65, 64, false, false, false),
                (30000, 97, 96, false, true, false),
                (30100, 97, 180, true, false, false),
                // It answered: never asked again.
                (61000, 129, 212, false, false, false),
            ],
        );
    }

    #[test]
    fn an_echo_answer_that_moves_no_counter_keeps_no_link_up() {
        judged(
            Start::AnsweredAnEcho,
            &[
                (1000, 1, 5000, false, true, false),
                (1500, 1, 5500, true, true, false),
                (2000, 1, 6000, true, false, true),
            ],
        );
    }

    #[test]
    fn a_peer_down_by_probe_is_up_only_after_being_heard_for_the_silence() {
        judged(
            Start::AnsweredAnEcho,
            &[
                (1000, 1, 5000, false, true, false),
                (2000, 1, 5100, false, false, true),
                // Heard again at once (it was only slow): still down.
                (3000, 33, 5100, false, false, true),
                (20000, 65, 5200, false, false, true),
                (32000, 97, 5300, false, false, true),
                (33000, 129, 5400, false, false, false),
                // Up, and probed again when it stops answering.
                (34000, 129, 9000, false, true, false),
            ],
        );
    }

    #[test]
    fn counters_that_go_back_are_a_new_peer_entry_judged_afresh() {
        judged(
            Start::AnsweredAnEcho,
            &[
                (1000, 901, 1000, false, false, false),
                // A new data plane: counters from zero. Not heard since:
                // grace, and whether it answers echoes is asked again.
                (2000, 0, 0, false, false, false),
                (3000, 0, 5000, false, false, false),
                (4000, 50, 6000, false, true, false),
                (5000, 50, 9000, false, true, false),
                (6500, 50, 12000, false, true, false),
                (7000, 80, 12000, true, false, false),
                (8000, 80, 15000, false, true, false),
                (9000, 80, 16000, false, false, true),
            ],
        );
    }

    #[test]
    fn readings_say_when_traffic_was_sent_and_clocks_start_only_for_sent_probes() {
        let t = timers(30);
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let reading = |rx, tx| Reading {
            rx,
            tx,
            handshake: 1,
        };
        let mut l = Liveness::new(BTreeSet::new());
        let none = BTreeSet::new();
        l.observe(&[("p", reading(0, 0))], &none, at(0), t);
        l.observe(&[("p", reading(1, 0))], &BTreeSet::from(["p"]), at(0), t);
        assert!(!l.observe(&[("p", reading(1, 0))], &none, at(100), t).busy);
        let j = l.observe(&[("p", reading(1, 5000))], &none, at(600), t);
        assert!(j.busy && j.probe.contains("p"));
        // The probe could not be sent: no clock, so never down by probe.
        assert!(!l.probing());
        let j = l.observe(&[("p", reading(1, 6000))], &none, at(5000), t);
        assert!(j.down.is_empty() && j.probe.contains("p"));
        l.sent(&j.probe, at(5000));
        assert!(l.probing());
        let j = l.observe(&[("p", reading(1, 7000))], &none, at(6000), t);
        assert_eq!(j.down, BTreeSet::from(["p"]));
    }
}
