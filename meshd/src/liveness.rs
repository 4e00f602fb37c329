//! Which peers are down: a peer from which nothing was heard for `timeout` —
//! its received-bytes counter did not move and no new handshake completed.
//! Both signals count because implementations differ: the kernel,
//! wireguard-go and Weft's device count keepalives in rx bytes; a program
//! that does not still shows an idle session rekeying every two minutes
//! while keepalives flow. A down peer stays configured and WireGuard keeps
//! retrying its handshake (persistent keepalive), so it is heard again by
//! itself; it is up again once heard for `timeout` without a silence that
//! long (hysteresis: a flapping link changes state at most once per
//! `timeout`). Pure: the caller supplies the clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// What the data plane says about a peer: bytes received and the Unix
/// second of the last handshake (0: none).
pub type Reading = (u64, u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    reading: Reading,
    /// When the reading last changed.
    since: Instant,
    down: bool,
    /// While down: since when it has been heard without a long silence.
    heard_since: Option<Instant>,
}

/// Remembers when each peer's counter last moved.
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

    /// Takes readings at `now`; returns the peers that are down. A peer
    /// first seen now gets the whole timeout as grace (or, if it starts
    /// down, must be heard for it).
    pub fn observe(
        &mut self,
        readings: &[(K, Reading)],
        now: Instant,
        timeout: Duration,
    ) -> BTreeSet<K> {
        let current: BTreeSet<&K> = readings.iter().map(|(k, _)| k).collect();
        self.seen.retain(|k, _| current.contains(k));
        for (key, reading) in readings {
            let s = self.seen.entry(key.clone()).or_insert(Seen {
                reading: *reading,
                since: now,
                down: self.start_down.contains(key),
                heard_since: None,
            });
            if s.reading != *reading {
                s.reading = *reading;
                s.since = now;
                if s.down && s.heard_since.is_none() {
                    s.heard_since = Some(now);
                }
            }
            if now.duration_since(s.since) > timeout {
                s.down = true;
                s.heard_since = None;
            } else if s
                .heard_since
                .is_some_and(|h| now.duration_since(h) >= timeout)
            {
                s.down = false;
                s.heard_since = None;
            }
        }
        self.seen
            .iter()
            .filter(|(_, s)| s.down)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_peers_go_down_and_come_back() {
        let (a, b) = ("a", "b");
        let t = Duration::from_secs(10);
        let start = Instant::now();
        let mut l = Liveness::new(BTreeSet::new());
        assert!(
            l.observe(&[(a, (0, 0)), (b, (0, 0))], start, t).is_empty(),
            "grace for new peers"
        );
        let later = start + Duration::from_secs(11);
        assert_eq!(
            l.observe(&[(a, (500, 0)), (b, (0, 0))], later, t),
            BTreeSet::from([b])
        );
        // b is heard again, but stays down until heard for the timeout.
        let mut again = later;
        for bytes in 1..=10 {
            again += Duration::from_secs(1);
            assert_eq!(
                l.observe(&[(a, (500 + bytes, 0)), (b, (92 + bytes, 0))], again, t),
                BTreeSet::from([b]),
                "second {bytes} of being heard"
            );
        }
        again += Duration::from_secs(1);
        assert!(
            l.observe(&[(a, (600, 0)), (b, (200, 0))], again, t)
                .is_empty(),
            "b is heard for the timeout: up"
        );
        // A fresh handshake alone (a data plane that counts no keepalive bytes) is heard too.
        let much_later = again + Duration::from_secs(11);
        assert!(l
            .observe(
                &[(a, (500, 1_700_000_000)), (b, (92, 1_700_000_000))],
                much_later,
                t
            )
            .is_empty());
        // A removed peer is forgotten; re-added, it gets grace again.
        l.observe(&[(a, (600, 0))], much_later, t);
        assert!(l
            .observe(
                &[(a, (700, 0)), (b, (92, 0))],
                much_later + Duration::from_secs(11),
                t
            )
            .is_empty());
    }

    #[test]
    fn a_peer_heard_briefly_between_silences_stays_down() {
        let a = "a";
        let t = Duration::from_secs(3);
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut l = Liveness::new(BTreeSet::new());
        l.observe(&[(a, (0, 0))], at(0), t);
        assert_eq!(l.observe(&[(a, (0, 0))], at(4), t), BTreeSet::from([a]));
        // Heard at 5 and 6, silent until 10: the hearing restarts.
        for (s, bytes) in [(5, 1), (6, 2), (7, 2), (10, 2), (11, 3), (12, 4), (13, 5)] {
            assert_eq!(
                l.observe(&[(a, (bytes, 0))], at(s), t),
                BTreeSet::from([a]),
                "second {s}"
            );
        }
        assert!(l.observe(&[(a, (6, 0))], at(14), t).is_empty());
    }

    #[test]
    fn a_peer_published_down_before_a_restart_starts_down() {
        let t = Duration::from_secs(3);
        let start = Instant::now();
        let mut l = Liveness::new(BTreeSet::from(["b"]));
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(
            l.observe(&[("a", (0, 0)), ("b", (0, 0))], at(0), t),
            BTreeSet::from(["b"])
        );
        assert_eq!(
            l.observe(&[("a", (1, 0)), ("b", (1, 0))], at(1), t),
            BTreeSet::from(["b"])
        );
        assert!(l
            .observe(&[("a", (2, 0)), ("b", (2, 0))], at(4), t)
            .is_empty());
    }
}
